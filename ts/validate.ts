/**
 * Range checks of {@link train}'s options, naming each field as the user spells it and its allowed
 * range (`invalid config: sT = 1: a sparsity in [0, 1)`), before anything reaches the native side.
 * @module
 */
import { SnellaError } from './errors';
import type { AttachOptions } from './model';
import type { TrainOptions } from './train';

function fail(field: string, v: unknown, range: string): never {
  throw new SnellaError('CONFIG', `invalid config: ${field} = ${String(v)}: ${range}`);
}

/** Every option of {@link train}; `satisfies` keeps the list complete when an option is added. */
const TRAIN_KEYS = Object.keys({
  train: 1, epochs: 1, batchSize: 1, lr: 1, weightDecay: 1, warmupEpochs: 1, sT: 1, allocatorBeta1: 1, allocatorBeta2: 1,
  allocatorWarmupRounds: 1, allocatorFinalRounds: 1, allocatorInterval: 1, recompute: 1, seed: 1, prefetch: 1,
  microBatches: 1, devices: 1, distributed: 1, callbacks: 1, signal: 1, checkpointDir: 1, resume: 1, overwriteCheckpoint: 1,
} satisfies Record<keyof TrainOptions, 1>);

/** Every option of {@link VitModel.attach}. */
const ATTACH_KEYS = Object.keys({
  method: 1, numClasses: 1, rank: 1, heads: 1, targets: 1, s0: 1, rule: 1, seed: 1,
} satisfies Record<keyof AttachOptions, 1>);

/**
 * Refuses a key of an options object that the function does not know (a misspelt `learningRate`
 * for `lr` would otherwise be ignored silently and train with the default).
 * @param opts - the user's options object.
 * @param known - the option names the function reads.
 * @param what - the function, as it appears in the message (`train()`).
 * @throws {@link SnellaError} `CONFIG` naming the first unknown key, a case-insensitive match
 *   when there is one, and the known options.
 */
function checkKnownKeys(opts: object, known: readonly string[], what: string): void {
  for (const k of Object.keys(opts)) {
    if (known.includes(k)) continue;
    const near = known.find((n) => n.toLowerCase() === k.toLowerCase());
    const hint = near ? `did you mean ${near}? ` : '';
    throw new SnellaError('CONFIG', `invalid config: ${k}: not an option of ${what}; ${hint}its options: ${known.join(', ')}`);
  }
}

/**
 * Checks that {@link VitModel.attach}'s options name only known options.
 * @throws {@link SnellaError} `CONFIG` naming an unknown key.
 */
export function validateAttachKeys(opts: AttachOptions): void {
  checkKnownKeys(opts, ATTACH_KEYS, 'attach()');
}

const isInt = (v: unknown): v is number => typeof v === 'number' && Number.isInteger(v);

/**
 * Checks the options of {@link train} that the native trainer would report under internal names
 * (or not at all): `sT`, the allocator's β and schedule, `seed`, `prefetch`, the checkpoint
 * options, `microBatches`, `devices` and `distributed`; and that every key is an option of train().
 * @throws {@link SnellaError} `CONFIG` naming the first field out of range and the allowed range,
 *   or the first key that is not an option.
 */
export function validateTrainOptions(opts: TrainOptions, epochs: number): void {
  checkKnownKeys(opts, TRAIN_KEYS, 'train()');
  const unit = (field: string, v: number | undefined, what: string) => {
    if (v !== undefined && !(typeof v === 'number' && v >= 0 && v < 1)) fail(field, v, `${what} in [0, 1)`);
  };
  if (opts.lr !== undefined && !(typeof opts.lr === 'number' && Number.isFinite(opts.lr) && opts.lr > 0)) fail('lr', opts.lr, 'a finite number > 0');
  if (opts.weightDecay !== undefined && !(typeof opts.weightDecay === 'number' && Number.isFinite(opts.weightDecay) && opts.weightDecay >= 0)) {
    fail('weightDecay', opts.weightDecay, 'a finite number ≥ 0');
  }
  if (opts.warmupEpochs !== undefined && !(isInt(opts.warmupEpochs) && opts.warmupEpochs >= 0 && opts.warmupEpochs <= epochs)) {
    fail('warmupEpochs', opts.warmupEpochs, `an integer in [0, epochs = ${epochs}]`);
  }
  unit('sT', opts.sT, 'a sparsity');
  unit('allocatorBeta1', opts.allocatorBeta1, 'a number');
  unit('allocatorBeta2', opts.allocatorBeta2, 'a number');
  for (const f of ['allocatorWarmupRounds', 'allocatorFinalRounds'] as const) {
    const v = opts[f];
    if (v !== undefined && !(isInt(v) && v >= 0)) fail(f, v, 'an integer ≥ 0');
  }
  const ti = opts.allocatorWarmupRounds ?? 0;
  const tf = opts.allocatorFinalRounds ?? 0;
  if (ti + tf >= epochs) {
    fail('allocatorWarmupRounds + allocatorFinalRounds', `${ti} + ${tf}`, `must be at most epochs − 1 = ${epochs - 1}, i.e. in [0, ${epochs - 1}] (the allocator schedule has no room between warm-up and final rounds)`);
  }
  if (opts.allocatorInterval !== undefined && !(isInt(opts.allocatorInterval) && opts.allocatorInterval >= 1)) {
    fail('allocatorInterval', opts.allocatorInterval, 'an integer ≥ 1');
  }
  if (opts.seed !== undefined && !(isInt(opts.seed) && opts.seed >= 0 && opts.seed <= 0xffffffff)) {
    fail('seed', opts.seed, 'an integer in [0, 4294967295]');
  }
  if (opts.prefetch !== undefined && !(isInt(opts.prefetch) && opts.prefetch >= 0)) fail('prefetch', opts.prefetch, 'an integer ≥ 0');
  if (opts.checkpointDir !== undefined && !(typeof opts.checkpointDir === 'string' && opts.checkpointDir.length > 0)) {
    fail('checkpointDir', opts.checkpointDir, 'a folder path (non-empty string)');
  }
  if (opts.resume && opts.checkpointDir === undefined) fail('resume', true, 'needs checkpointDir (the folder of the checkpoint to continue)');
  validateParallelOptions(opts);
}

/**
 * Checks `microBatches`, `devices` and `distributed` of {@link train}'s options.
 * @throws {@link SnellaError} `CONFIG` naming the field and its allowed range.
 */
function validateParallelOptions(opts: TrainOptions): void {
  const batchSize = opts.batchSize ?? 64;
  const m = opts.microBatches;
  if (m !== undefined && !(isInt(m) && m >= 1 && m <= batchSize)) fail('microBatches', m, `an integer in [1, batchSize = ${batchSize}]`);
  const d = opts.devices;
  if (d !== undefined) {
    if (!Array.isArray(d) || d.length === 0 || !d.every((x) => isInt(x) && x >= 0) || new Set(d).size !== d.length) {
      fail('devices', JSON.stringify(d), 'a non-empty array of distinct device ordinals (integers ≥ 0), e.g. [0, 1]');
    }
    if (d.length > batchSize) fail('devices', JSON.stringify(d), `at most batchSize = ${batchSize} devices (each takes a slice of at least one image per step)`);
    if (opts.distributed !== undefined) fail('devices', JSON.stringify(d), 'not together with distributed (each process of a multi-process group trains on its model\'s one device)');
  }
  const x = opts.distributed;
  if (x === undefined) return;
  if (typeof x !== 'object' || x === null) fail('distributed', x, 'an object { rendezvous, rank, world }');
  if (!(isInt(x.world) && x.world >= 1)) fail('distributed.world', x.world, 'an integer ≥ 1 (the number of processes)');
  if (!(isInt(x.rank) && x.rank >= 0 && x.rank < x.world)) fail('distributed.rank', x.rank, `an integer in [0, world = ${x.world})`);
  const port = typeof x.rendezvous === 'string' ? /^.+:(\d+)$/.exec(x.rendezvous) : null;
  if (!port || Number(port[1]) < 1 || Number(port[1]) > 65535) {
    fail('distributed.rendezvous', x.rendezvous, 'host:port where rank 0 listens, port in [1, 65535], e.g. 10.0.0.1:29500');
  }
  const t = x.timeoutSeconds;
  if (t !== undefined && !(typeof t === 'number' && Number.isFinite(t) && t > 0)) fail('distributed.timeoutSeconds', t, 'a finite number of seconds > 0');
}
