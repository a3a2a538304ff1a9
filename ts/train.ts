/**
 * The training loop: epochs of seeded batches, AdamW with warm-up + cosine schedule, the SNELLA
 * allocator at each epoch start, callbacks and cancellation through an `AbortSignal`.
 * @module
 */
import { BatchLoader, type BatchSource } from './data/loader';
import { nativeAsync, native, SnellaError } from './errors';
import type { VitModel } from './model';
import { batchesFrom, TrainCheckpoints, type ResumePoint } from './checkpoint';
import { validateTrainOptions } from './validate';

/** Options of {@link train}; defaults are the reference recipe of spec §8. */
export interface TrainOptions {
  /** Training images and labels: an {@link ImageDataset}, {@link TensorDataset} or any {@link BatchSource}. */
  train: BatchSource;
  /** Epochs T (default 40). Also the allocator's rounds. */
  epochs?: number;
  /** Images per step (default 64). */
  batchSize?: number;
  /** Peak learning rate of AdamW (β = 0.9, 0.999, ε = 1e-8), reached after the warm-up (default 1e-3). */
  lr?: number;
  /** AdamW decoupled weight decay for tensors with ≥ 2 dims except `cls_token` (default 0.05). */
  weightDecay?: number;
  /**
   * Warm-up epochs (default 4): over its `W` steps the rate rises linearly, `lr·(s+1)/W` at 0-based
   * step `s`, then decays per step on a cosine to 0 at the end of the run (spec §6).
   */
  warmupEpochs?: number;
  /** Target sparsity sT of the allocator, fraction zeroed in [0, 1) (default 0.5). */
  sT?: number;
  /** Allocator EMA factor β1 of the importance (default 0.85, spec §5). */
  allocatorBeta1?: number;
  /** Allocator EMA factor β2 of the uncertainty (default 0.85). */
  allocatorBeta2?: number;
  /** Allocator warm-up rounds t_i, kept at s0 (default 0). */
  allocatorWarmupRounds?: number;
  /** Allocator final rounds t_f, kept at sT (default 0). */
  allocatorFinalRounds?: number;
  /** Re-allocate every `interval` rounds (default 1). */
  allocatorInterval?: number;
  /**
   * Activation checkpointing (default false): keep only each block's input during the forward
   * pass and recompute the block in backward. Same results bit for bit; activation memory drops
   * from all blocks' to one block's, for about one more forward pass of compute.
   */
  recompute?: boolean;
  /** Seed of the batch order, integer in 0..2^32−1 (default 0); see {@link BatchLoader}. */
  seed?: number;
  /** Batches prepared ahead while a step runs (default 2). */
  prefetch?: number;
  /**
   * Gradient accumulation (default 1): each step runs its `batchSize` images as this many
   * micro-batches (contiguous slices whose sizes differ by at most one), one forward and backward
   * pass each, and adds their gradients in order before the one AdamW update. The loss of every
   * micro-batch is normalised by the whole batch, so the step is that of the whole batch (up to f32
   * rounding) with the activation memory of one micro-batch: a bigger effective batch on a small GPU.
   * An integer in [1, batchSize]. With `devices` or `distributed`, each rank's shard is split so.
   */
  microBatches?: number;
  /**
   * Data-parallel training inside this process (default: none): one rank per entry, each with a full
   * copy of the model. On CUDA, the ordinals of the GPUs to use, the model's own first (`[0, 1]`):
   * one worker thread per GPU, each with its own context and stream; the gradients of everything
   * trained (adapters, head, `cls_token`) are all-reduced with NCCL (`libnccl.so.2` must be
   * loadable; NVLink multicast is kept off). On the CPU, `devices.length` CPU ranks in this process
   * with an in-process communicator: for testing the data-parallel path, no speed-up. `batchSize`
   * stays the global batch: rank `r` of `N` takes the `r`-th contiguous slice of every batch (sizes
   * differing by at most one), so the data order is the same as on one device. With the same seed,
   * N CPU ranks give bit for bit the result of one device with `microBatches: N`; through NCCL
   * the same within f32 rounding. Evaluation, reports and checkpoints use the model (rank 0).
   */
  devices?: number[];
  /**
   * Multi-process (multi-host) data-parallel training (default: none): this process is rank `rank`
   * of `world`, all of them meeting at `rendezvous` (`host:port` where rank 0 listens; the others
   * connect, retrying for up to `timeoutSeconds`, default 600). Every process must run the same
   * model, method, data, seed and options (the ranks compare a hash of their training state before
   * the first step) and load the whole batch; each trains on its slice. On CUDA the ranks
   * all-reduce through NCCL (one GPU per process: the model's), on the CPU over the rendezvous's
   * TCP connections. Only rank 0 saves checkpoints. Stop every process together: a rank that stops
   * alone makes the others fail (TCP) or wait (NCCL).
   */
  distributed?: DistributedOptions;
  /** Progress callbacks. */
  callbacks?: TrainCallbacks;
  /** Stops training at the next step boundary; {@link train} then resolves with `aborted: true`. */
  signal?: AbortSignal;
  /**
   * A folder for training checkpoints (`checkpoint.safetensors`, see {@link VitModel.saveCheckpoint}):
   * saved at the end of every epoch and, when the signal stops training, at that step boundary.
   * A run that fails with `NON_FINITE` saves nothing, so the last good checkpoint is kept. Without
   * `resume`, an existing checkpoint there is an error unless `overwriteCheckpoint`.
   */
  checkpointDir?: string;
  /**
   * Continue from the checkpoint in `checkpointDir` (default false): restores the model, optimizer
   * and allocator state, skips finished epochs and batches, and continues the same batch order, so
   * the result equals an uninterrupted run's bit for bit. The other options must be the ones the
   * checkpoint was made with (the error names the first that differs).
   */
  resume?: boolean;
  /** Replace a checkpoint already in `checkpointDir` when not resuming (default false). */
  overwriteCheckpoint?: boolean;
}

/** Where a process joins a multi-process data-parallel group; see {@link TrainOptions.distributed}. */
export interface DistributedOptions {
  /** `host:port` where rank 0 listens (the same string on every process). */
  rendezvous: string;
  /** This process's rank, an integer in [0, world). */
  rank: number;
  /** The number of processes, an integer ≥ 1. */
  world: number;
  /** How long to wait for the other processes, in seconds (default 600). */
  timeoutSeconds?: number;
}

/** The data-parallel group a {@link train} call ran in ({@link TrainResult.dataParallel}). */
export interface DataParallelInfo {
  /** The transport: `nccl` (GPUs), `local` (CPU ranks in this process) or `tcp` (CPU processes). */
  kind: string;
  /** The number of ranks. */
  world: number;
  /** This process's rank (its first, for ranks in this process). */
  rank: number;
  /** How many of the ranks run in this process. */
  localRanks: number;
}

/** What {@link TrainCallbacks.onStep} receives. */
export interface StepInfo {
  /** Optimizer step, 1-based over the run. */
  step: number;
  /** Total steps of the run. */
  totalSteps: number;
  /** Epoch, 0-based. */
  epoch: number;
  /** Mean cross-entropy of the batch, in nats. */
  loss: number;
  /** Top-1 accuracy of the batch, in [0, 1]. */
  accuracy: number;
  /** Learning rate used. */
  lr: number;
  /** Images in the batch. */
  batch: number;
  /** Images per second of this step (wall clock since the previous step, including data waits). */
  imagesPerSecond: number;
}

/** What {@link TrainCallbacks.onEpochEnd} receives. */
export interface EpochInfo {
  /** Epoch, 0-based. */
  epoch: number;
  /** Mean training cross-entropy (nats) over the epoch's images. */
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
  /** Wall seconds of the whole run. */
  seconds: number;
  /** Training images per second over the run. */
  imagesPerSecond: number;
  /** Whether the signal stopped training early. */
  aborted: boolean;
  /** Where this call started when it resumed from a checkpoint. */
  resumedFrom?: ResumePoint;
  /** The data-parallel group, with `devices` or `distributed`. */
  dataParallel?: DataParallelInfo;
}

function check(name: string, v: number, ok: boolean, range: string): void {
  if (!ok) throw new SnellaError('CONFIG', `invalid config: ${name} = ${v}: ${range}`);
}

/**
 * Fine-tunes `model` (with a method attached by {@link VitModel.attach}) on `opts.train` with
 * cross-entropy and AdamW, the recipe of spec §8. Each epoch: the SNELLA allocator re-decides every
 * layer's sparsity (spec §5, s0 → sT on a cubic schedule), then seeded shuffled batches are
 * trained, one optimizer step each; the steps run off the main thread.
 *
 * @param model - the model, with a method attached.
 * @param opts - see {@link TrainOptions}; defaults are the reference recipe.
 * @returns per-epoch summaries, steps, wall seconds and throughput; `aborted` when the signal
 *   stopped it (the model then holds the weights of the last completed step).
 * @throws {@link SnellaError} `CONFIG` naming a field out of range (batch 0, epochs 0, …) or when
 *   no method is attached; `NON_FINITE` naming the first non-finite tensor when the loss or a
 *   gradient turns NaN/Inf; the data set's errors (e.g. an image that cannot be decoded); with
 *   `devices`: `CONFIG` naming a GPU that does not exist (and how many there are),
 *   `CUDA_UNAVAILABLE` when NCCL cannot be loaded (naming the paths tried); with `distributed`:
 *   `COMM_ERROR` when the rendezvous times out (naming the address and the ranks missing), a rank
 *   leaves, or the ranks start from different states.
 *
 * @example
 * ```ts
 * model.attach({ method: 'snella', numClasses: ds.numClasses, rank: 8 });
 * const r = await train(model, {
 *   train: ds, epochs: 3, batchSize: 32, lr: 2e-3, warmupEpochs: 1, sT: 0.5,
 *   callbacks: { onEpochEnd: (e) => console.log(e.epoch, e.loss.toFixed(3), e.sparsity) },
 * });
 * console.log(`${r.steps} steps in ${r.seconds.toFixed(1)} s`);
 * ```
 */
export async function train(model: VitModel, opts: TrainOptions): Promise<TrainResult> {
  const epochs = opts.epochs ?? 40;
  const batchSize = opts.batchSize ?? 64;
  check('epochs', epochs, Number.isInteger(epochs) && epochs >= 1, 'an integer ≥ 1');
  check('batchSize', batchSize, Number.isInteger(batchSize) && batchSize >= 1, 'an integer ≥ 1');
  check('train.length', opts.train.length, opts.train.length >= 1, 'at least one training image');
  validateTrainOptions(opts, epochs);
  checkImageSize(model, opts.train, 'train');
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
      recompute: opts.recompute ?? false,
      micro_batches: opts.microBatches ?? 1,
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
  // In a multi-process group only rank 0 writes checkpoints; the others only read one to resume.
  const root = (opts.distributed?.rank ?? 0) === 0;
  const ckpt = opts.checkpointDir === undefined || (!root && !opts.resume) ? undefined : TrainCheckpoints.open(model, opts.checkpointDir, {
    resume: opts.resume ?? false,
    overwrite: opts.overwriteCheckpoint ?? false,
    state: { seed: opts.seed ?? 0, trainLength: opts.train.length },
  });
  const save = () => {
    if (root) ckpt?.save();
  };
  let dataParallel: DataParallelInfo | undefined;
  if (opts.devices !== undefined) {
    dataParallel = await nativeAsync(() => model.native.dataParallel(opts.devices as number[]));
  } else if (opts.distributed !== undefined) {
    const d = opts.distributed;
    dataParallel = await nativeAsync(() => model.native.joinGroup(d.rendezvous, d.rank, d.world, d.timeoutSeconds));
  }
  try {
    return await trainLoop(model, opts, loader, ckpt, save, dataParallel);
  } finally {
    if (dataParallel) native(() => model.native.leaveGroup());
  }
}

/** The epochs of {@link train}, once the model is prepared (and in its group, if any). */
async function trainLoop(
  model: VitModel,
  opts: TrainOptions,
  loader: BatchLoader,
  ckpt: TrainCheckpoints | undefined,
  save: () => void,
  dataParallel: DataParallelInfo | undefined,
): Promise<TrainResult> {
  const epochs = opts.epochs ?? 40;
  const stepsPerEpoch = loader.stepsPerEpoch;
  const start = ckpt?.start ?? { epoch: 0, batch: 0, beginEpoch: true, step: 0, finished: false };
  const cb = opts.callbacks ?? {};
  const totalSteps = stepsPerEpoch * epochs;
  const out: EpochInfo[] = [];
  const t0 = performance.now();
  let steps = 0;
  let images = 0;
  let aborted = false;
  for (let epoch = start.epoch; epoch < epochs && !aborted; epoch++) {
    if (opts.signal?.aborted) {
      aborted = true;
      break;
    }
    if (epoch !== start.epoch || start.beginEpoch) native(() => model.native.beginEpoch(epoch));
    await cb.onEpochStart?.(epoch);
    const e0 = performance.now();
    let lossSum = 0;
    let correct = 0;
    let seen = 0;
    let last = performance.now();
    // One batch ahead: each step also stages the next batch's images on the device while it
    // computes (`staged: true`), and the next call then passes no images (not in a data-parallel
    // group, whose ranks slice host images, nor with micro-batches, which slice them too).
    const stage = dataParallel === undefined && (opts.microBatches ?? 1) === 1;
    const it = (epoch === start.epoch ? batchesFrom(loader, epoch, start.batch) : loader.epoch(epoch))[Symbol.asyncIterator]();
    let staged = false;
    try {
      for (let cur = await it.next(); !cur.done; ) {
        const batch = cur.value;
        const nxt = await it.next();
        // checked after loading the next batch, so an abort during that load stops here too
        if (opts.signal?.aborted) {
          aborted = true;
          break;
        }
        const next = stage && !nxt.done ? nxt.value.images : undefined;
        const r = await nativeAsync(() => model.native.trainStep(staged ? null : batch.images, batch.labels, next));
        staged = r.staged;
        cur = nxt;
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
    } finally {
      await it.return?.();
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
    save();
  }
  if (aborted) save();
  const seconds = (performance.now() - t0) / 1000;
  const resumedFrom = ckpt?.resumed ? start : undefined;
  return {
    epochs: out,
    steps,
    seconds,
    imagesPerSecond: images / Math.max(seconds, 1e-9),
    aborted,
    ...(resumedFrom ? { resumedFrom } : {}),
    ...(dataParallel ? { dataParallel } : {}),
  };
}

/** A data set that knows its image side (ImageDataset, TensorDataset) must match the model's input. */
function checkImageSize(model: VitModel, data: BatchSource, what: string): void {
  const size = (data as { imageSize?: number }).imageSize;
  const want = model.config.img_size;
  if (size !== undefined && size !== want) {
    throw new SnellaError('CONFIG', `invalid config: ${what}.imageSize = ${size}: the model takes ${want}×${want} images (open the data set with imageSize: ${want})`);
  }
}

/** Test-set results of {@link evaluate}. */
export interface EvalResult {
  /** Top-1 accuracy in [0, 1]. */
  top1: number;
  /** Mean cross-entropy, in nats. */
  loss: number;
  /** Images evaluated. */
  count: number;
}

/**
 * Top-1 accuracy and mean cross-entropy of `model` on `data`, in index order, in inference mode
 * (no gradients, no change to the model).
 * @param model - the model (attached method or not; labels must be below its number of classes).
 * @param data - labelled images: an {@link ImageDataset}, {@link TensorDataset} or any
 *   {@link BatchSource}.
 * @param batchSize - images per forward pass, integer ≥ 1 (default 128).
 * @throws {@link SnellaError} `CONFIG` for a bad `batchSize`; the data set's errors.
 *
 * @example
 * ```ts
 * const test = await ImageDataset.open('assets/flowers10-64', 'test', { imageSize: 64 });
 * const { top1, loss, count } = await evaluate(model, test, 64);
 * console.log(`top-1 ${(top1 * 100).toFixed(1)}% on ${count} images, loss ${loss.toFixed(3)}`);
 * ```
 */
export async function evaluate(model: VitModel, data: BatchSource, batchSize = 128): Promise<EvalResult> {
  check('batchSize', batchSize, Number.isInteger(batchSize) && batchSize >= 1, 'an integer ≥ 1');
  checkImageSize(model, data, 'data');
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
