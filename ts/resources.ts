/**
 * Counts of live native objects, for leak checks.
 * @module
 */
import { binding } from './native';

/** What {@link liveObjects} returns. */
export interface LiveObjects {
  /** Native models loaded and neither disposed nor garbage-collected. */
  models: number;
  /**
   * Bytes of the tensors those models hold: parameters, gradients, AdamW moments, the saved `W0`
   * of merged layers and allocator statistics (host or GPU memory; per-step activations, freed
   * when a step returns, are not counted).
   */
  bytes: number;
}

/**
 * The number of live native models and the bytes they hold. Both return to their earlier values
 * after {@link VitModel.dispose}; a model that is never disposed is released when garbage-collected.
 *
 * @example
 * ```ts
 * const before = liveObjects();
 * const m = VitModel.load('vit.safetensors', { device: 'cpu' });
 * m.dispose();
 * console.log(liveObjects().models === before.models); // true
 * ```
 */
export function liveObjects(): LiveObjects {
  const o = binding().liveObjects();
  return { models: Number(o.models), bytes: Number(o.bytes) };
}
