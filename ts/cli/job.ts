/**
 * The main job shared by `snella train` and `snella demo`: load, attach, train with a progress bar,
 * evaluate, summarise sparsity and save the adapter.
 * @module
 */
import * as fs from 'node:fs';
import * as path from 'node:path';
import { SingleBar } from 'cli-progress';
import { ImageDataset } from '../data';
import { SnellaError } from '../errors';
import { VitModel, type Device, type Method, type LayerReport, type Precision } from '../model';
import { evaluate, train, type EpochInfo, type TrainOptions } from '../train';
import { validateTrainOptions } from '../validate';
import { epochTestTop1, jobRecorder, wrapCallbacks, writeJobReport } from '../report/job';

/** Everything a run needs; CLI flags map 1:1 onto these. */
export interface JobOptions {
  /** Recompute block activations in backward (activation checkpointing): less memory. */
  recompute?: boolean;
  /** Gradient accumulation: micro-batches per step (default 1). */
  microBatches?: number;
  /** Data-parallel training on CUDA GPUs 0..gpus−1 (NCCL); 1 or absent: one device. */
  gpus?: number;
  /** Multi-process data-parallel training: `host:port` where rank 0 listens. */
  rendezvous?: string;
  /** This process's rank in the multi-process group (with `rendezvous`). */
  worldRank?: number;
  /** The number of processes in the multi-process group (with `rendezvous`). */
  world?: number;
  /** Seconds to wait for every rank of the multi-process group (with `rendezvous`; default 600). */
  rendezvousTimeout?: number;
  /** Checkpoint (timm-named safetensors). */
  model: string;
  /** Data folder: list files + images.tar/images (VTAB-1k style), or class subfolders. */
  data: string;
  /** Training split (list file name without `.txt`), ignored for ImageFolder data. */
  trainSplit: string;
  /** Test split. For ImageFolder data, a separate folder given by `testData`. */
  testSplit: string;
  /** Separate test folder (ImageFolder data). */
  testData?: string;
  /** Method. */
  method: Method;
  /** Rank r. */
  rank: number;
  /** Kernel pieces H. */
  heads: number;
  /** Initial sparsity s0. */
  s0: number;
  /** Target sparsity sT. */
  sT: number;
  /** Allocator β1. */
  beta1: number;
  /** Allocator β2. */
  beta2: number;
  /** Epochs. */
  epochs: number;
  /** Batch size. */
  batch: number;
  /** Learning rate. */
  lr: number;
  /** Weight decay. */
  wd: number;
  /** Warm-up epochs. */
  warmup: number;
  /** Seed. */
  seed: number;
  /** Output folder for the adapter and results. */
  out: string;
  /** Device. */
  device: Device;
  /** GEMM precision on CUDA (default `f32`). */
  precision?: Precision;
  /** Print one JSON line instead of human output. */
  json: boolean;
  /** Replace existing output files. */
  overwrite: boolean;
  /** Training checkpoint folder (default `OUT/checkpoint`): saved each epoch and on Ctrl-C. */
  checkpointDir?: string;
  /** Continue from the checkpoint in `checkpointDir`. */
  resume?: boolean;
  /** Folder for the HTML training report (`report.html`, `history.json`); none when absent. */
  report?: string;
  /** Evaluate the test set after every epoch (default: on when `report` is set). */
  evalEveryEpoch?: boolean;
}

/** The summary a run prints (and writes as `results.json`). */
export interface JobResult {
  /** Method. */
  method: Method;
  /** Test top-1 in [0, 1]. */
  testTop1: number;
  /** Test images. */
  testCount: number;
  /** Training wall seconds. */
  trainSeconds: number;
  /** Training images per second. */
  imagesPerSecond: number;
  /** Trainable values. */
  trainable: number;
  /** Fraction of adapter entries kept (SNELLA/SNELL). */
  keptFraction?: number;
  /** Per-epoch summaries. */
  epochs: EpochInfo[];
  /** Device used. */
  device: string;
  /** GEMM precision in effect (`f32` on the CPU, whatever was asked). */
  precision: Precision;
  /** Micro-batches per step (gradient accumulation; 1 = none). */
  microBatches: number;
  /** Data-parallel ranks (GPUs or processes) that trained together; 1 = one device. */
  world: number;
  /** Where the adapter was written (absent on ranks other than 0, which write nothing). */
  adapterDir?: string;
  /** Test top-1 after each epoch, in [0, 1], when evaluated every epoch. */
  epochTestTop1?: number[];
  /** The HTML training report written, when `report` was set. */
  report?: string;
}

/** Opens `root` with `split` when it names a list file, subfolder or archive there, else as a whole. */
function openSplit(root: string, split: string, flag: string, size: number, norm: { mean: [number, number, number]; std: [number, number, number] }) {
  const has = [`${split}.txt`, split, `${split}.tar`].some((f) => fs.existsSync(path.join(root, f)));
  if (!has && fs.existsSync(root) && fs.statSync(root).isDirectory()) {
    const lists = fs.readdirSync(root).filter((f) => f.endsWith('.txt')).map((f) => f.slice(0, -4));
    if (lists.length) {
      const hint = lists.find((l) => /train/.test(l) === (flag === '--train-split')) ?? lists[0];
      throw new SnellaError('CONFIG', `${flag} ${split}: ${root} has no ${split}.txt, ${split}/ or ${split}.tar; its list files are ${lists.join(', ')} (e.g. ${flag} ${hint})`);
    }
  }
  return ImageDataset.open(root, has ? split : undefined, { imageSize: size, normalization: norm });
}

/** A compact per-block sparsity summary: one line per block with q/k/v/proj/fc1/fc2 sparsities. */
export function sparsitySummary(rep: LayerReport[]): string {
  const rows = new Map<string, string[]>();
  for (const l of rep) {
    const m = /^blocks\.(\d+)\.(?:attn|mlp)\.(\w+)$/.exec(l.name);
    const key = m ? `block ${m[1].padStart(2)}` : l.name;
    const cell = `${m ? m[2] : ''} ${(l.sparsity * 100).toFixed(1)}%`;
    rows.set(key, [...(rows.get(key) ?? []), cell]);
  }
  const total = rep.reduce((s, l) => s + l.entries, 0);
  const kept = rep.reduce((s, l) => s + l.kept, 0);
  const lines = [...rows].map(([k, v]) => `  ${k}: ${v.join('  ')}`);
  lines.push(`  overall: ${kept} of ${total} entries kept (sparsity ${((1 - kept / total) * 100).toFixed(1)}%)`);
  return lines.join('\n');
}

/**
 * Runs the main job.
 * @throws {@link SnellaError} for bad options, files or data (the message names what is wrong).
 */
export async function runJob(o: JobOptions, signal?: AbortSignal): Promise<JobResult> {
  const distributed = distributedOptions(o);
  // In a multi-process group only rank 0 writes the adapter, results, report and checkpoints.
  const root = (distributed?.rank ?? 0) === 0;
  if (!root) o = { ...o, report: undefined, evalEveryEpoch: false };
  const log = (s: string) => {
    if (!o.json) process.stdout.write(s + '\n');
  };
  const adapterDir = path.join(o.out, 'adapter');
  const checkpointDir = o.checkpointDir ?? path.join(o.out, 'checkpoint');
  if (root && !o.overwrite && !o.resume && fs.existsSync(path.join(adapterDir, 'adapter_model.safetensors'))) {
    throw new SnellaError('FILE', `${adapterDir}: an adapter is already there; pass --overwrite or another --out`);
  }
  const model = VitModel.load(o.model, { device: o.device, precision: o.precision });
  try {
    if (model.deviceReason) log(`device: cpu (${model.deviceReason})`);
    const precision: Precision = model.device === 'cuda' ? (o.precision ?? 'f32') : 'f32';
    if (o.precision && o.precision !== precision) log(`precision: ${o.precision} has no effect on the cpu (it computes in f32)`);
    const cfg = model.config;
    const norm = { mean: cfg.mean, std: cfg.std };
    const trainDs = await openSplit(o.data, o.trainSplit, '--train-split', cfg.img_size, norm);
    const testDs = await openSplit(o.testData ?? o.data, o.testSplit, '--test-split', cfg.img_size, norm);
    await Promise.all([trainDs.prepare(), testDs.prepare()]);
    const numClasses = trainDs.numClasses;
    model.attach({ method: o.method, numClasses, rank: o.rank, heads: o.heads, s0: o.s0, seed: o.seed });
    log(`snella ${o.method}: ${path.basename(o.model)} (${cfg.depth} blocks, dim ${cfg.embed_dim}, ${cfg.img_size}px) on ${model.device}`);
    log(`data: ${trainDs.length} training and ${testDs.length} test images, ${numClasses} classes; ${model.trainableCount} trainable values`);
    const gpus = o.gpus ?? 1;
    if (gpus > 1 && model.device !== 'cuda') {
      throw new SnellaError('CONFIG', `invalid config: gpus = ${gpus}: --gpus needs CUDA GPUs, and the model runs on the ${model.device}${model.deviceReason ? ` (${model.deviceReason})` : ''}; on the CPU, --micro-batches ${gpus} gives the same result`);
    }
    const devices = gpus > 1 ? Array.from({ length: gpus }, (_, i) => i) : undefined;
    if (devices) log(`data-parallel: ${gpus} GPUs (NCCL), ${o.batch} images per step (${Math.floor(o.batch / gpus)}–${Math.ceil(o.batch / gpus)} per GPU)`);
    // the bar starts with the first step, so nothing is drawn before an error raised while the
    // run starts (e.g. ranks that never join)
    const bar = new SingleBar({
      format: 'epoch {epoch}/{epochs} |{bar}| {value}/{total} steps | loss {loss} | {ips} img/s | eta {eta}s',
      hideCursor: true,
      noTTYOutput: !o.json,
      notTTYSchedule: 5000,
      stream: process.stdout,
    });
    const rec = jobRecorder(model, o, testDs);
    const steps = Math.ceil(trainDs.length / o.batch) * o.epochs;
    let barStarted = false;
    const trainOpts: TrainOptions = {
      train: trainDs,
      epochs: o.epochs,
      batchSize: o.batch,
      lr: o.lr,
      weightDecay: o.wd,
      warmupEpochs: o.warmup,
      sT: o.sT,
      allocatorBeta1: o.beta1,
      allocatorBeta2: o.beta2,
      seed: o.seed,
      recompute: o.recompute ?? false,
      microBatches: o.microBatches ?? 1,
      ...(devices ? { devices } : {}),
      ...(distributed ? { distributed } : {}),
      signal,
      checkpointDir,
      resume: o.resume ?? false,
      overwriteCheckpoint: o.overwrite,
      callbacks: wrapCallbacks(rec, {
        onStep: (s) => {
          if (o.json) return;
          if (!barStarted) {
            bar.start(steps, 0, { epoch: 1, epochs: o.epochs, loss: '-', ips: '-' });
            barStarted = true;
          }
          bar.update(s.step, { epoch: s.epoch + 1, epochs: o.epochs, loss: s.loss.toFixed(3), ips: s.imagesPerSecond.toFixed(1) });
        },
      }),
    };
    if (distributed) {
      // train() checks these too; here first, so that a bad option is reported before the (long) wait
      validateTrainOptions(trainOpts, o.epochs);
      log(`data-parallel: rank ${distributed.rank} of ${distributed.world} processes, rendezvous ${distributed.rendezvous}`);
      log(`waiting for all ${distributed.world} ranks at ${distributed.rendezvous} (up to ${distributed.timeoutSeconds ?? 600} s; start every rank with the same options)`);
    }
    let r: Awaited<ReturnType<typeof train>>;
    try {
      r = await train(model, trainOpts);
    } finally {
      // also on an error: a running bar keeps the process alive and the cursor hidden
      if (barStarted) bar.stop();
    }
    // with a test evaluation after every epoch, the last one is the final result: not run twice
    const test = rec?.lastTest && !r.aborted && r.epochs.length ? rec.lastTest : await evaluate(model, testDs);
    const report = rec && o.report !== undefined ? writeJobReport(rec, o.report, test, r) : undefined;
    const trainSeconds = Math.max(1e-9, r.seconds - (rec?.evalSeconds ?? 0));
    const rep = model.report();
    const total = rep.reduce((s, l) => s + l.entries, 0);
    if (root) model.saveAdapter(adapterDir, { overwrite: o.overwrite || (o.resume ?? false) });
    const result: JobResult = {
      method: o.method,
      testTop1: test.top1,
      testCount: test.count,
      trainSeconds,
      imagesPerSecond: (r.imagesPerSecond * r.seconds) / trainSeconds,
      trainable: model.trainableCount,
      keptFraction: total ? rep.reduce((s, l) => s + l.kept, 0) / total : undefined,
      epochs: r.epochs,
      device: model.device,
      precision,
      microBatches: o.microBatches ?? 1,
      world: devices?.length ?? distributed?.world ?? 1,
      ...(root ? { adapterDir } : {}),
      ...(rec && epochTestTop1(rec)),
      ...(report ? { report } : {}),
    };
    if (root) fs.writeFileSync(path.join(o.out, 'results.json'), JSON.stringify(result, null, 2));
    if (r.resumedFrom) log(`resumed from ${checkpointDir} at epoch ${r.resumedFrom.epoch + 1}, batch ${r.resumedFrom.batch} (step ${r.resumedFrom.step})`);
    if (r.aborted) log(`stopped early (signal); checkpoint saved in ${checkpointDir}/: continue with --resume`);
    log(`test top-1: ${(test.top1 * 100).toFixed(2)}% on ${test.count} images (loss ${test.loss.toFixed(4)})`);
    log(`training: ${result.trainSeconds.toFixed(1)} s, ${result.imagesPerSecond.toFixed(1)} images/s`);
    if (rep.length) log(`per-layer sparsity (fraction zeroed):\n${sparsitySummary(rep)}`);
    if (root) log(`adapter written to ${adapterDir}/ (adapter_model.safetensors, adapter_config.json)`);
    else log(`rank ${distributed?.rank}: done (rank 0 writes the adapter and results)`);
    if (report) log(`report written to ${report}`);
    if (o.json) process.stdout.write(JSON.stringify(result) + '\n');
    return result;
  } finally {
    model.dispose();
  }
}

/**
 * The multi-process group of `--rendezvous/--world-rank/--world` (and `--rendezvous-timeout`), or
 * undefined without `--rendezvous`.
 * @throws {@link SnellaError} `CONFIG` when the three flags are not given together, with `--gpus`, or
 * `--rendezvous-timeout` without them.
 */
function distributedOptions(o: JobOptions): { rendezvous: string; rank: number; world: number; timeoutSeconds?: number } | undefined {
  const given = [o.rendezvous !== undefined, o.worldRank !== undefined, o.world !== undefined];
  if (!given.some(Boolean)) {
    if (o.rendezvousTimeout !== undefined) {
      throw new SnellaError('CONFIG', 'invalid config: rendezvous: --rendezvous-timeout applies to a multi-process group (--rendezvous, --world-rank, --world)');
    }
    return undefined;
  }
  if (!given.every(Boolean)) {
    throw new SnellaError('CONFIG', 'invalid config: rendezvous: --rendezvous host:port, --world-rank R and --world W go together (every process of the group gets all three)');
  }
  if ((o.gpus ?? 1) > 1) {
    throw new SnellaError('CONFIG', `invalid config: gpus = ${o.gpus}: not together with --rendezvous (each process of a multi-process group trains on one GPU, its --device)`);
  }
  return {
    rendezvous: o.rendezvous as string,
    rank: o.worldRank as number,
    world: o.world as number,
    ...(o.rendezvousTimeout !== undefined ? { timeoutSeconds: o.rendezvousTimeout } : {}),
  };
}
