/**
 * Training checkpoints for exact resume: what {@link VitModel.saveCheckpoint} writes, what
 * {@link VitModel.loadCheckpoint} returns, and the helpers {@link train} uses for its
 * `checkpointDir` / `resume` options.
 * @module
 */
import * as fs from 'node:fs';
import * as path from 'node:path';
import { BatchLoader, type Batch, type BatchSource } from './data/loader';
import { native, SnellaError } from './errors';
import type { VitModel } from './model';

/** The file inside a checkpoint folder. */
export const CHECKPOINT_FILE = 'checkpoint.safetensors';

/**
 * Where training continues after a checkpoint. The batch order of epoch `e` is a pure function of
 * `(seed, e)` (see {@link BatchLoader}), so the epoch and the next batch index fix the data order.
 */
export interface ResumePoint {
  /** The epoch to continue in, 0-based (equals `epochs` when the run is complete). */
  epoch: number;
  /** The index of the next batch within that epoch (earlier batches are done). */
  batch: number;
  /** Whether the epoch's start (the allocator's round) still has to run. */
  beginEpoch: boolean;
  /** Optimizer steps taken so far. */
  step: number;
  /** Whether every epoch is done. */
  finished: boolean;
}

/** What {@link VitModel.loadCheckpoint} returns. */
export interface CheckpointInfo {
  /** Where to continue. */
  resume: ResumePoint;
  /** The `extra` value given to {@link VitModel.saveCheckpoint} (`null` when none). */
  extra: unknown;
  /** The checkpoint file read. */
  path: string;
}

/** Whether folder `dir` holds a checkpoint. */
export function checkpointExists(dir: string): boolean {
  return fs.existsSync(path.join(dir, CHECKPOINT_FILE));
}

/** Converts the native (snake_case) checkpoint info. */
export function toCheckpointInfo(v: unknown): CheckpointInfo {
  const o = v as { resume: { epoch: number; batch: number; begin_epoch: boolean; step: number; finished: boolean }; extra: unknown; path: string };
  const r = o.resume;
  return { resume: { epoch: r.epoch, batch: r.batch, beginEpoch: r.begin_epoch, step: r.step, finished: r.finished }, extra: o.extra ?? null, path: o.path };
}

/** The batch-order settings {@link train} stores in a checkpoint's `extra` and checks on resume. */
export interface DataOrderState {
  /** The batch-order seed. */
  seed: number;
  /** Training images. */
  trainLength: number;
}

/**
 * The checkpointing of one {@link train} call: checks the folder, restores the state on resume,
 * and saves at epoch ends and on abort.
 */
export class TrainCheckpoints {
  private constructor(
    private readonly model: VitModel,
    /** The checkpoint folder. */
    readonly dir: string,
    private readonly state: DataOrderState,
    /** Where this call starts (epoch 0, batch 0 for a new run). */
    readonly start: ResumePoint,
    /** Whether the start came from a checkpoint. */
    readonly resumed: boolean,
  ) {}

  /**
   * Sets up checkpointing in `dir` for a prepared model. With `resume`, loads the checkpoint (its
   * training settings must equal the prepared ones; the error names the first that differs) and
   * checks the batch order; without, refuses to replace an existing checkpoint unless `overwrite`.
   * @throws {@link SnellaError} `FILE` (no checkpoint to resume from, or one would be replaced),
   *   `CONFIG` naming a setting that differs from the checkpoint's, or the loader's errors.
   */
  static open(model: VitModel, dir: string, opts: { resume: boolean; overwrite: boolean; state: DataOrderState }): TrainCheckpoints {
    const file = path.join(dir, CHECKPOINT_FILE);
    const fresh: ResumePoint = { epoch: 0, batch: 0, beginEpoch: true, step: 0, finished: false };
    if (!opts.resume) {
      if (!opts.overwrite && fs.existsSync(file)) {
        throw new SnellaError('FILE', `${file}: a checkpoint is already there; pass resume: true (--resume) to continue it, or overwriteCheckpoint (--overwrite) to start over`);
      }
      return new TrainCheckpoints(model, dir, opts.state, fresh, false);
    }
    if (!fs.existsSync(file)) throw new SnellaError('FILE', `${file}: no checkpoint to resume from`);
    const info = model.loadCheckpoint(dir);
    const saved = (info.extra ?? {}) as Partial<DataOrderState>;
    for (const k of ['seed', 'trainLength'] as const) {
      if (saved[k] !== undefined && saved[k] !== opts.state[k]) {
        const field = k === 'seed' ? 'seed' : 'train.length';
        throw new SnellaError('CONFIG', `invalid config: ${field} = ${opts.state[k]}: must equal the checkpoint's value ${saved[k]} to resume (the batch order depends on it)`);
      }
    }
    return new TrainCheckpoints(model, dir, opts.state, info.resume, true);
  }

  /** Saves the model's current state (replacing this run's previous checkpoint). */
  save(): void {
    this.model.saveCheckpoint(this.dir, { overwrite: true, extra: this.state });
  }
}

/**
 * The batches of epoch `epoch` from batch index `start` on: the same batches, in the same order,
 * that `loader.epoch(epoch)` yields after skipping `start` of them, without loading the skipped
 * ones.
 */
export function batchesFrom(loader: BatchLoader, epoch: number, start: number): AsyncIterable<Batch> {
  if (start <= 0) return loader.epoch(epoch);
  const order = loader.order(epoch);
  const rest = order.subarray(Math.min(start * loader.batchSize, order.length));
  const ds = loader.dataset;
  const view: BatchSource = {
    length: rest.length,
    labels: Array.from(rest, (i) => ds.labels[i]),
    load: (idx) => ds.load(idx.map((k) => rest[k])),
  };
  const sub = new BatchLoader(view, { batchSize: loader.batchSize, shuffle: false, dropLast: loader.dropLast, prefetch: loader.prefetch });
  return (async function* () {
    for await (const b of sub.epoch(0)) yield { ...b, indices: b.indices.map((k) => rest[k]) };
  })();
}

/** Native errors converted; see {@link VitModel.saveCheckpoint}. */
export function saveCheckpoint(model: VitModel, dir: string, overwrite: boolean, extra: unknown): void {
  native(() => model.native.saveCheckpoint(dir, overwrite, extra ?? null));
}

/** Native errors converted; see {@link VitModel.loadCheckpoint}. */
export function loadCheckpoint(model: VitModel, dir: string): CheckpointInfo {
  return toCheckpointInfo(native(() => model.native.loadCheckpoint(dir)));
}
