/**
 * The training loop: epochs of seeded batches, AdamW with warm-up + cosine schedule, the SNELLA
 * allocator at each epoch start, callbacks and cancellation through an `AbortSignal`.
 * @module
 */
import { BatchLoader, type BatchSource } from './data/loader';
import { nativeAsync, native, SnellaError } from './errors';
import type { VitModel } from './model';

/** Options of {@link train}; defaults are the reference recipe of spec §8. */
export interface TrainOptions {
  /** Training images. */
  train: BatchSource;
  /** Epochs T (default 40). Also the allocator's rounds. */
  epochs?: number;
  /** Images per step (default 64). */
  batchSize?: number;
  /** Peak learning rate (default 1e-3). */
  lr?: number;
  /** AdamW decoupled weight decay for tensors with ≥ 2 dims except `cls_token` (default 0.05). */
  weightDecay?: number;
  /** Linear warm-up epochs before the cosine decay (default 4). */
  warmupEpochs?: number;
  /** Target sparsity sT of the allocator, fraction zeroed in [0, 1) (default 0.5). */
  sT?: number;
  /** Allocator EMA factor β1 of the importance (default 0.85, spec §5). */
  allocatorBeta1?: number;
  /** Allocator EMA factor β2 of the uncertainty (default 0.85). */
  allocatorBeta2?: number;
  /** Allocator warm-up rounds t_i (default 0). */
  allocatorWarmupRounds?: number;
  /** Allocator final rounds t_f (default 0). */
  allocatorFinalRounds?: number;
  /** Re-allocate every `interval` rounds (default 1). */
  allocatorInterval?: number;
  /** Seed of the batch order (default 0). */
  seed?: number;
  /** Batches prepared ahead while a step runs (default 2). */
  prefetch?: number;
  /** Progress callbacks. */
  callbacks?: TrainCallbacks;
  /** Stops training at the next step boundary; {@link train} then resolves with `aborted: true`. */
  signal?: AbortSignal;
}

/** What {@link TrainCallbacks.onStep} receives. */
export interface StepInfo {
  /** Optimizer step, 1-based over the run. */
  step: number;
  /** Total steps of the run. */
  totalSteps: number;
  /** Epoch, 0-based. */
  epoch: number;
  /** Mean cross-entropy of the batch. */
  loss: number;
  /** Top-1 accuracy of the batch, in [0, 1]. */
  accuracy: number;
  /** Learning rate used. */
  lr: number;
  /** Images in the batch. */
  batch: number;
  /** Images per second of this step (wall clock, including data waits). */
  imagesPerSecond: number;
}

/** What {@link TrainCallbacks.onEpochEnd} receives. */
export interface EpochInfo {
  /** Epoch, 0-based. */
  epoch: number;
  /** Mean training loss over the epoch's batches (weighted by batch size). */
  loss: number;
  /** Training top-1 over the epoch, in [0, 1]. */
  accuracy: number;
  /** Wall seconds of the epoch. */
  seconds: number;
  /** Training images per second over the epoch. */
  imagesPerSecond: number;
  /** Mean sparsity over adapted layers weighted by size (fraction zeroed), when SNELLA/SNELL. */
  sparsity?: number;
}

/** Hooks called during {@link train}. Each may be async; training waits for it. */
export interface TrainCallbacks {
  /** Before an epoch's first step, after the allocator re-decided sparsities. */
  onEpochStart?(epoch: number): void | Promise<void>;
  /** After every optimizer step. */
  onStep?(info: StepInfo): void | Promise<void>;
  /** After an epoch's last step. */
  onEpochEnd?(info: EpochInfo): void | Promise<void>;
}

/** The result of {@link train}. */
export interface TrainResult {
  /** Per-epoch summaries. */
  epochs: EpochInfo[];
  /** Steps taken. */
  steps: number;
  /** Wall seconds. */
  seconds: number;
  /** Training images per second over the run. */
  imagesPerSecond: number;
  /** Whether the signal stopped training early. */
  aborted: boolean;
}

function check(name: string, v: number, ok: boolean, range: string): void {
  if (!ok) throw new SnellaError('CONFIG', `invalid config: ${name} = ${v}: ${range}`);
}

/**
 * Fine-tunes `model` (with a method attached) on `opts.train`.
 *
 * @example
 * ```ts
 * const r = await train(model, { train: ds, epochs: 3, callbacks: { onStep: (s) => console.log(s.loss) } });
 * ```
 * @throws {@link SnellaError} `CONFIG` naming a field out of range (batch 0, epochs 0, …);
 *   `NON_FINITE` naming the first non-finite tensor when the loss or a gradient turns NaN/Inf.
 */
export async function train(model: VitModel, opts: TrainOptions): Promise<TrainResult> {
  const epochs = opts.epochs ?? 40;
  const batchSize = opts.batchSize ?? 64;
  check('epochs', epochs, Number.isInteger(epochs) && epochs >= 1, 'an integer ≥ 1');
  check('batchSize', batchSize, Number.isInteger(batchSize) && batchSize >= 1, 'an integer ≥ 1');
  check('train.length', opts.train.length, opts.train.length >= 1, 'at least one training image');
  const method = native(() => model.native.method()) as { s0: number } | null;
  if (!method) throw new SnellaError('CONFIG', 'invalid config: method = none: attach() a method before train()');
  const loader = new BatchLoader(opts.train, { batchSize, shuffle: true, seed: opts.seed ?? 0, prefetch: opts.prefetch ?? 2 });
  const stepsPerEpoch = loader.stepsPerEpoch;
  native(() =>
    model.native.prepare({
      epochs,
      batch_size: batchSize,
      steps_per_epoch: stepsPerEpoch,
      lr: opts.lr ?? 1e-3,
      weight_decay: opts.weightDecay ?? 0.05,
      warmup_epochs: opts.warmupEpochs ?? 4,
      beta1: 0.9,
      beta2: 0.999,
      eps: 1e-8,
      allocator: {
        s0: method.s0,
        s_t: opts.sT ?? 0.5,
        beta1: opts.allocatorBeta1 ?? 0.85,
        beta2: opts.allocatorBeta2 ?? 0.85,
        rounds: epochs,
        warmup_rounds: opts.allocatorWarmupRounds ?? 0,
        final_rounds: opts.allocatorFinalRounds ?? 0,
        interval: opts.allocatorInterval ?? 1,
      },
    }),
  );
  const cb = opts.callbacks ?? {};
  const totalSteps = stepsPerEpoch * epochs;
  const out: EpochInfo[] = [];
  const t0 = performance.now();
  let steps = 0;
  let images = 0;
  let aborted = false;
  for (let epoch = 0; epoch < epochs && !aborted; epoch++) {
    native(() => model.native.beginEpoch(epoch));
    await cb.onEpochStart?.(epoch);
    const e0 = performance.now();
    let lossSum = 0;
    let correct = 0;
    let seen = 0;
    let last = performance.now();
    for await (const batch of loader.epoch(epoch)) {
      if (opts.signal?.aborted) {
        aborted = true;
        break;
      }
      const r = await nativeAsync(() => model.native.trainStep(batch.images, batch.labels));
      const now = performance.now();
      steps++;
      images += batch.size;
      lossSum += r.loss * batch.size;
      correct += r.correct;
      seen += batch.size;
      await cb.onStep?.({
        step: r.step,
        totalSteps,
        epoch,
        loss: r.loss,
        accuracy: r.correct / batch.size,
        lr: r.lr,
        batch: batch.size,
        imagesPerSecond: (batch.size * 1000) / Math.max(1e-9, now - last),
      });
      last = performance.now();
    }
    if (seen === 0) break;
    const seconds = (performance.now() - e0) / 1000;
    const rep = model.report();
    const entries = rep.reduce((s, l) => s + l.entries, 0);
    const info: EpochInfo = {
      epoch,
      loss: lossSum / seen,
      accuracy: correct / seen,
      seconds,
      imagesPerSecond: seen / seconds,
      sparsity: entries ? rep.reduce((s, l) => s + l.sparsity * l.entries, 0) / entries : undefined,
    };
    out.push(info);
    await cb.onEpochEnd?.(info);
  }
  const seconds = (performance.now() - t0) / 1000;
  return { epochs: out, steps, seconds, imagesPerSecond: images / Math.max(seconds, 1e-9), aborted };
}

/** Test-set results of {@link evaluate}. */
export interface EvalResult {
  /** Top-1 accuracy in [0, 1]. */
  top1: number;
  /** Mean cross-entropy. */
  loss: number;
  /** Images evaluated. */
  count: number;
}

/**
 * Top-1 accuracy and mean loss of `model` on `data`, in index order.
 * @param batchSize images per forward pass (default 128).
 */
export async function evaluate(model: VitModel, data: BatchSource, batchSize = 128): Promise<EvalResult> {
  check('batchSize', batchSize, Number.isInteger(batchSize) && batchSize >= 1, 'an integer ≥ 1');
  const loader = new BatchLoader(data, { batchSize, shuffle: false });
  let lossSum = 0;
  let correct = 0;
  let count = 0;
  for await (const b of loader.epoch(0)) {
    const r = await nativeAsync(() => model.native.evaluate(b.images, b.labels));
    lossSum += r.lossSum;
    correct += r.correct;
    count += b.size;
  }
  return { top1: count ? correct / count : 0, loss: count ? lossSum / count : 0, count };
}
