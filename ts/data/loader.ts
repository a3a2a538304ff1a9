/**
 * {@link BatchLoader}: seeded, shuffled mini-batches with background
 * prefetching.
 *
 * @module
 */
import { checkUint32, permutation } from './shuffle';
import { SnellaError } from '../errors';

/**
 * What a {@link BatchLoader} reads from; {@link ImageDataset} is one.
 */
export interface BatchSource {
  /** Number of samples. */
  readonly length: number;
  /** Label of each sample, `[length]`, integers ≥ 0. */
  readonly labels: ArrayLike<number>;
  /**
   * Float32 NCHW images `[indices.length, C, H, W]` for the given sample
   * indices.
   */
  load(indices: readonly number[]): Promise<Float32Array>;
}

/** Options of {@link BatchLoader}. */
export interface BatchLoaderOptions {
  /** Samples per batch, integer ≥ 1. */
  batchSize: number;
  /** Visit samples in a seeded random order (true) or in index order (false). */
  shuffle: boolean;
  /** Run seed for the shuffle, integer in 0..2^32−1; default 0. */
  seed?: number;
  /** Drop the last batch when it is smaller than `batchSize`; default false. */
  dropLast?: boolean;
  /**
   * Batches decoded and assembled ahead of the one the consumer holds,
   * integer ≥ 0; default 2. 0 decodes each batch only when asked for.
   */
  prefetch?: number;
}

/** One mini-batch. */
export interface Batch {
  /** Float32 NCHW `[size, 3, imageSize, imageSize]`, as from `load()`. */
  images: Float32Array;
  /** Class index of each image, `[size]` uint32. */
  labels: Uint32Array;
  /** Number of samples in this batch: `batchSize`, or fewer for the last one. */
  size: number;
  /** Sample indices of the batch, in batch order. */
  indices: number[];
}

/**
 * Iterates a data set in mini-batches, one epoch at a time.
 *
 * The order of epoch `e` is `permutation(length, seed, e)` from `./shuffle`
 * (mulberry32 + Fisher–Yates, the same on every run and machine) when
 * `shuffle` is true, else `0, 1, …, length−1`. Consecutive runs of
 * `batchSize` indices of that order form the batches; the last, partial batch
 * is kept unless `dropLast`. While the consumer works on one batch, the next
 * `prefetch` batches are already being loaded.
 *
 * @example
 * ```ts
 * const loader = new BatchLoader(ds, { batchSize: 64, shuffle: true, seed: 0 });
 * for await (const { images, labels, size } of loader.epoch(0)) { ... }
 * ```
 */
export class BatchLoader {
  /** The data set read. */
  readonly dataset: BatchSource;
  /** Samples per batch. */
  readonly batchSize: number;
  /** Whether epochs are shuffled. */
  readonly shuffle: boolean;
  /** Run seed. */
  readonly seed: number;
  /** Whether a last partial batch is dropped. */
  readonly dropLast: boolean;
  /** Batches loaded ahead. */
  readonly prefetch: number;

  /**
   * @param dataset - an {@link ImageDataset} or any {@link BatchSource}.
   *   For an `onBadImage: 'skip'` data set, call `prepare()` first.
   * @param opts - see {@link BatchLoaderOptions}.
   * @throws Error naming the field and its allowed range for invalid options.
   */
  constructor(dataset: BatchSource, opts: BatchLoaderOptions) {
    if (opts === null || typeof opts !== 'object') {
      throw new SnellaError('CONFIG', 'BatchLoader options must be an object with { batchSize, shuffle }');
    }
    const { batchSize, shuffle, seed = 0, dropLast = false, prefetch = 2 } = opts;
    if (!Number.isInteger(batchSize) || batchSize < 1) {
      throw new SnellaError('CONFIG', `batchSize must be an integer >= 1, got ${String(batchSize)}`);
    }
    if (typeof shuffle !== 'boolean') throw new SnellaError('CONFIG', `shuffle must be a boolean, got ${String(shuffle)}`);
    if (!Number.isInteger(seed) || seed < 0 || seed > 0xffffffff) {
      throw new SnellaError('CONFIG', `seed must be an integer in 0..4294967295, got ${String(seed)}`);
    }
    if (typeof dropLast !== 'boolean') throw new SnellaError('CONFIG', `dropLast must be a boolean, got ${String(dropLast)}`);
    if (!Number.isInteger(prefetch) || prefetch < 0) {
      throw new SnellaError('CONFIG', `prefetch must be an integer >= 0, got ${String(prefetch)}`);
    }
    this.dataset = dataset;
    this.batchSize = batchSize;
    this.shuffle = shuffle;
    this.seed = seed;
    this.dropLast = dropLast;
    this.prefetch = prefetch;
  }

  /**
   * Batches per epoch for the data set's current length:
   * `floor(length / batchSize)` with `dropLast`, else `ceil(length / batchSize)`.
   */
  get stepsPerEpoch(): number {
    const n = this.dataset.length;
    return this.dropLast ? Math.floor(n / this.batchSize) : Math.ceil(n / this.batchSize);
  }

  /**
   * The sample order of epoch `e`, `[length]` uint32, each index once.
   * @throws RangeError if `e` is not an integer in 0..2^32−1.
   */
  order(e: number): Uint32Array {
    checkUint32('epoch', e);
    const n = this.dataset.length;
    if (this.shuffle) return permutation(n, this.seed, e);
    const id = new Uint32Array(n);
    for (let i = 0; i < n; i++) id[i] = i;
    return id;
  }

  /**
   * The batches of epoch `e`. The order is fixed when `epoch()` is called;
   * loading starts at the first `next()`. Leaving the loop early (`break`)
   * stops scheduling; batches already in flight finish and are dropped.
   *
   * @param e - epoch number, integer in 0..2^32−1.
   * @returns an async iterable of {@link Batch}es, `stepsPerEpoch` of them.
   * @throws RangeError (synchronously) for a bad `e`; the iteration rejects
   *   with the data set's error (e.g. a file that cannot be decoded).
   */
  epoch(e: number): AsyncIterable<Batch> {
    const order = this.order(e);
    return this.run(order, this.stepsPerEpoch);
  }

  private async *run(order: Uint32Array, steps: number): AsyncGenerator<Batch, void, undefined> {
    const queue: Promise<Batch>[] = [];
    let nextStep = 0;
    const launch = (): void => {
      const p = this.assemble(order, nextStep++);
      p.catch(() => undefined); // a dropped prefetch must not be an unhandled rejection
      queue.push(p);
    };
    while (queue.length > 0 || nextStep < steps) {
      while (nextStep < steps && queue.length < this.prefetch + 1) launch();
      const batch = await queue.shift()!;
      while (nextStep < steps && queue.length < this.prefetch) launch();
      yield batch;
    }
  }

  private async assemble(order: Uint32Array, step: number): Promise<Batch> {
    const start = step * this.batchSize;
    const end = Math.min(start + this.batchSize, order.length);
    const indices = Array.from(order.subarray(start, end));
    const images = await this.dataset.load(indices);
    const labels = new Uint32Array(indices.length);
    for (let k = 0; k < indices.length; k++) labels[k] = this.dataset.labels[indices[k]];
    return { images, labels, size: indices.length, indices };
  }
}
