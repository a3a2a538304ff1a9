/**
 * Options of {@link ImageDataset} and their validation.
 *
 * @module
 */
import { IMAGENET_NORMALIZATION, validateNormalization, type Normalization } from './normalize';
import { SnellaError } from '../errors';

/** What to do with a file that cannot be decoded as an image. */
export type BadImagePolicy = 'error' | 'skip';

/** Options shared by every {@link ImageDataset} constructor. */
export interface DatasetOptions {
  /** Side of the square output images in pixels, integer ≥ 1 (e.g. 224). */
  imageSize: number;
  /** Pixel normalisation; default {@link IMAGENET_NORMALIZATION}. */
  normalization?: Normalization;
  /**
   * `'error'` (default): a corrupt image makes `prepare()`/`load()` throw.
   * `'skip'`: `prepare()` drops corrupt images and lists them in
   * `ImageDataset.skipped`.
   */
  onBadImage?: BadImagePolicy;
  /**
   * Number of classes, integer ≥ 1. Default: the length of `classes.json`
   * (list data sets) or the number of class folders (ImageFolder), else
   * max label + 1. Every label must be below it.
   */
  numClasses?: number;
  /** Keep decoded images in memory after their first decode; default true. */
  cache?: boolean;
  /** Images decoded at once by `load()`/`prepare()`, integer ≥ 1; default 8. */
  concurrency?: number;
}

/** {@link DatasetOptions} with every default filled in. */
export interface ResolvedDatasetOptions {
  /** Output side in pixels, integer ≥ 1. */
  imageSize: number;
  /** A copy of the normalisation (default ImageNet). */
  normalization: Normalization;
  /** Bad-image policy (default `'error'`). */
  onBadImage: BadImagePolicy;
  /** Number of classes if given, else undefined (derived by the data set). */
  numClasses: number | undefined;
  /** Whether decoded images are cached (default true). */
  cache: boolean;
  /** Concurrent decodes (default 8). */
  concurrency: number;
}

/**
 * Validates options and fills in defaults.
 *
 * @throws Error naming the field and its allowed range/values for any invalid
 *   field (e.g. `"imageSize must be an integer >= 1, got 0"`).
 */
export function resolveDatasetOptions(opts: DatasetOptions): ResolvedDatasetOptions {
  if (opts === null || typeof opts !== 'object') {
    throw new SnellaError('CONFIG', 'dataset options must be an object with at least { imageSize }');
  }
  const { imageSize, onBadImage = 'error', numClasses, cache = true, concurrency = 8 } = opts;
  if (!Number.isInteger(imageSize) || imageSize < 1) {
    throw new SnellaError('CONFIG', `imageSize must be an integer >= 1, got ${String(imageSize)}`);
  }
  if (onBadImage !== 'error' && onBadImage !== 'skip') {
    throw new SnellaError('CONFIG', `onBadImage must be 'error' or 'skip', got ${JSON.stringify(onBadImage)}`);
  }
  if (numClasses !== undefined && (!Number.isInteger(numClasses) || numClasses < 1)) {
    throw new SnellaError('CONFIG', `numClasses must be an integer >= 1, got ${String(numClasses)}`);
  }
  if (typeof cache !== 'boolean') throw new SnellaError('CONFIG', `cache must be a boolean, got ${String(cache)}`);
  if (!Number.isInteger(concurrency) || concurrency < 1) {
    throw new SnellaError('CONFIG', `concurrency must be an integer >= 1, got ${String(concurrency)}`);
  }
  const normalization = opts.normalization ?? IMAGENET_NORMALIZATION;
  validateNormalization(normalization);
  return {
    imageSize,
    normalization: { mean: [...normalization.mean], std: [...normalization.std] },
    onBadImage,
    numClasses,
    cache,
    concurrency,
  };
}
