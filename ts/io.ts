/**
 * safetensors files from TypeScript, through the native reader/writer (the same code that reads
 * checkpoints and writes adapters): f32/f16/bf16 in, f32 out.
 * @module
 */
import { native } from './errors';
import { binding } from './native';

/** One tensor: shape (outermost first) and float32 row-major values. */
export interface F32Tensor {
  /** Shape, outermost first. */
  shape: number[];
  /** `shape.reduce((a, b) => a * b)` float32 values, row-major. */
  data: Float32Array;
}

/** What {@link readSafetensors} returns. */
export interface SafetensorsFile {
  /** Every tensor by name, as float32. */
  tensors: Record<string, F32Tensor>;
  /** The `__metadata__` strings (empty when absent). */
  metadata: Record<string, string>;
}

/**
 * Reads every tensor of a safetensors file (F32, F16 or BF16, converted to float32) and its
 * `__metadata__` strings.
 * @throws {@link SnellaError} `FILE` naming the file when it is missing or malformed; `TENSOR` for
 *   another dtype.
 */
export function readSafetensors(file: string): SafetensorsFile {
  const [tensors, metadata] = native(() => binding().readSafetensors(file));
  return { tensors: tensors as Record<string, F32Tensor>, metadata };
}

/**
 * Writes float32 tensors (sorted by name) and string metadata as a safetensors file, atomically
 * (temporary file, fsync, rename).
 * @param opts - `metadata` strings for `__metadata__`; `overwrite` to replace an existing file.
 * @throws {@link SnellaError} `FILE` when the file exists and `overwrite` is not set, or on I/O
 *   failure; `TENSOR` naming a tensor whose values do not fit its shape.
 */
export function writeSafetensors(file: string, tensors: Record<string, F32Tensor>, opts: { metadata?: Record<string, string>; overwrite?: boolean } = {}): void {
  native(() => binding().writeSafetensors(file, tensors, opts.metadata ?? {}, opts.overwrite ?? false));
}
