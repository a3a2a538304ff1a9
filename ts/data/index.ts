/**
 * The image data layer: data sets from VTAB-1k list files or ImageFolders
 * (folders or `.tar` archives), decoding with sharp, normalised float32 NCHW
 * batches and a seeded, prefetching batch loader.
 *
 * @module
 */
export { forEachLimit } from './concurrency';
export { decodeImage, ImageDecodeError } from './decode';
export { IMAGE_EXTENSIONS, ImageDataset, type SampleRef, type SkippedImage } from './dataset';
export { parseListText, readListFile, type ListEntry } from './listfile';
export { BatchLoader, type Batch, type BatchLoaderOptions, type BatchSource } from './loader';
export { TensorDataset } from './tensor';
export {
  IMAGENET_NORMALIZATION,
  normalizationTable,
  validateNormalization,
  writeNCHW,
  type Normalization,
} from './normalize';
export {
  resolveDatasetOptions,
  type BadImagePolicy,
  type DatasetOptions,
  type ResolvedDatasetOptions,
} from './options';
export { checkUint32, epochSeed, fmix32, mulberry32, mulHigh32, permutation } from './shuffle';
export { DirSource, normalizeRelPath, TarSource, type ImageSource, type TarEntry } from './source';
