/**
 * Per-channel normalisation of 8-bit RGB pixels into float32 NCHW tensors.
 *
 * @module
 */
import { SnellaError } from '../errors';

/**
 * Per-channel mean and standard deviation, in units of the [0, 1] pixel
 * scale, channel order R, G, B. A pixel value `x` (0..255) becomes
 * `(x / 255 - mean[c]) / std[c]`.
 */
export interface Normalization {
  /** Channel means (R, G, B), finite numbers. */
  mean: [number, number, number];
  /** Channel standard deviations (R, G, B), finite and > 0. */
  std: [number, number, number];
}

/** The ImageNet statistics used by torchvision and timm ViT checkpoints. */
export const IMAGENET_NORMALIZATION: Readonly<Normalization> = Object.freeze({
  mean: [0.485, 0.456, 0.406] as [number, number, number],
  std: [0.229, 0.224, 0.225] as [number, number, number],
});

/**
 * Checks a normalisation.
 * @throws Error naming the field if `mean` or `std` is not 3 finite numbers,
 *   or a `std` entry is not > 0.
 */
export function validateNormalization(n: Normalization): void {
  for (const field of ['mean', 'std'] as const) {
    const v = n?.[field];
    if (!Array.isArray(v) || v.length !== 3 || !v.every((x) => typeof x === 'number' && Number.isFinite(x))) {
      throw new SnellaError('CONFIG', `normalization.${field} must be an array of 3 finite numbers (R, G, B), got ${JSON.stringify(v)}`);
    }
  }
  if (!n.std.every((x) => x > 0)) {
    throw new SnellaError('CONFIG', `normalization.std must be > 0 for every channel, got ${JSON.stringify(n.std)}`);
  }
}

/**
 * Lookup table for one normalisation: `lut[c * 256 + x]` is
 * `Math.fround((x / 255 - mean[c]) / std[c])`, computed in float64 and
 * rounded once to float32.
 *
 * @returns Float32Array of length 768.
 */
export function normalizationTable(n: Normalization): Float32Array {
  validateNormalization(n);
  const lut = new Float32Array(3 * 256);
  for (let c = 0; c < 3; c++) {
    for (let x = 0; x < 256; x++) lut[c * 256 + x] = (x / 255 - n.mean[c]) / n.std[c];
  }
  return lut;
}

/**
 * Writes one HWC uint8 RGB image into a float32 NCHW batch at sample slot
 * `slot`, normalising through `lut`.
 *
 * @param out - batch buffer, `[n, 3, size, size]` float32, n > slot.
 * @param slot - index of the sample in the batch.
 * @param rgb - pixels, `[size, size, 3]` uint8 (row-major, channel last).
 * @param size - image side in pixels.
 * @param lut - table from {@link normalizationTable}.
 * @throws RangeError if `rgb` or `out` is too small.
 */
export function writeNCHW(out: Float32Array, slot: number, rgb: Uint8Array, size: number, lut: Float32Array): void {
  const plane = size * size;
  if (rgb.length !== plane * 3) {
    throw new RangeError(`writeNCHW: expected ${plane * 3} bytes of RGB pixels, got ${rgb.length}`);
  }
  const base = slot * 3 * plane;
  if (base + 3 * plane > out.length) {
    throw new RangeError(`writeNCHW: slot ${slot} does not fit an output of ${out.length} floats`);
  }
  const r = base;
  const g = base + plane;
  const b = base + 2 * plane;
  for (let p = 0, q = 0; p < plane; p++, q += 3) {
    out[r + p] = lut[rgb[q]];
    out[g + p] = lut[256 + rgb[q + 1]];
    out[b + p] = lut[512 + rgb[q + 2]];
  }
}
