/**
 * A data set of pre-decoded images held in a safetensors file: `images` `[N, H, W, 3]` with
 * integer pixel values 0..255 (stored as F32/F16/BF16) and `labels` `[N]`. Useful where image
 * decoding is not available or too slow (the GPU machine has no sharp), or to decode once.
 * @module
 */
import { SnellaError } from '../errors';
import { binding } from '../native';
import { normalizationTable, writeNCHW, type Normalization } from './normalize';
import { IMAGENET_NORMALIZATION } from './normalize';

/** Pre-decoded images and labels; implements the loader's `BatchSource`. */
export class TensorDataset {
  /** Number of images. */
  readonly length: number;
  /** Side of the square images in pixels. */
  readonly imageSize: number;
  /** Classes: `max(label) + 1`. */
  readonly numClasses: number;
  /** Label of each image. */
  readonly labels: Int32Array;
  private readonly pixels: Uint8Array;
  private readonly lut: Float32Array;

  private constructor(pixels: Uint8Array, labels: Int32Array, size: number, norm: Normalization) {
    this.pixels = pixels;
    this.labels = labels;
    this.length = labels.length;
    this.imageSize = size;
    this.numClasses = labels.reduce((m, v) => Math.max(m, v), -1) + 1;
    this.lut = normalizationTable(norm);
  }

  /**
   * Reads `file` (see the module doc).
   * @throws {@link SnellaError} `DATA` naming the file when `images`/`labels` are missing or malformed.
   */
  static fromSafetensors(file: string, opts: { normalization?: Normalization } = {}): TensorDataset {
    const [t] = binding().readSafetensors(file);
    const im = t.images;
    const lb = t.labels;
    if (!im || im.shape.length !== 4 || im.shape[3] !== 3 || im.shape[1] !== im.shape[2]) {
      throw new SnellaError('DATA', `${file}: tensor 'images' must be [N, S, S, 3], found ${JSON.stringify(im?.shape ?? null)}`);
    }
    if (!lb || lb.shape.length !== 1 || lb.shape[0] !== im.shape[0]) {
      throw new SnellaError('DATA', `${file}: tensor 'labels' must be [${im.shape[0]}], found ${JSON.stringify(lb?.shape ?? null)}`);
    }
    const pixels = new Uint8Array(im.data.length);
    for (let i = 0; i < im.data.length; i++) {
      const v = im.data[i];
      if (!(v >= 0 && v <= 255 && Number.isInteger(v))) throw new SnellaError('DATA', `${file}: images[${i}] = ${v} is not a pixel value 0..255`);
      pixels[i] = v;
    }
    const labels = Int32Array.from(lb.data, (v, i) => {
      if (!(v >= 0 && Number.isInteger(v))) throw new SnellaError('DATA', `${file}: labels[${i}] = ${v} is not a class index`);
      return v;
    });
    return new TensorDataset(pixels, labels, im.shape[1], opts.normalization ?? IMAGENET_NORMALIZATION);
  }

  /** Float32 NCHW `[indices.length, 3, S, S]`, normalised. */
  async load(indices: readonly number[]): Promise<Float32Array> {
    const s = this.imageSize;
    const per = s * s * 3;
    const out = new Float32Array(indices.length * per);
    indices.forEach((idx, slot) => writeNCHW(out, slot, this.pixels.subarray(idx * per, (idx + 1) * per), s, this.lut));
    return out;
  }
}
