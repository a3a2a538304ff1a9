/**
 * Test helpers: the tiny golden ViT (16 px, patch 4, dim 12, depth 2, 5 classes) and seeded
 * random image sources for fast training runs.
 */
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import type { BatchSource } from '../../ts';

export const ROOT = path.resolve(__dirname, '../..');
export const TINY = path.join(ROOT, 'crates/snella-model/tests/golden/tiny_vit.safetensors');
export const VIT_TINY = path.join(ROOT, 'assets/models/vit_tiny_patch8_64.safetensors');
export const FLOWERS = path.join(ROOT, 'assets/flowers10-64');

export function tmpDir(tag = 'snella-test-'): string {
  return fs.mkdtempSync(path.join(os.tmpdir(), tag));
}

/** A value in [-2, 2) from (seed, index) by SplitMix-like hashing (deterministic). */
function noise(seed: number, i: number): number {
  let z = (Math.imul(seed ^ 0x9e3779b9, 0x85ebca6b) + Math.imul(i, 0xc2b2ae35)) | 0;
  z = Math.imul(z ^ (z >>> 16), 0x85ebca6b);
  z = Math.imul(z ^ (z >>> 13), 0xc2b2ae35);
  z ^= z >>> 16;
  return ((z >>> 0) / 2 ** 32) * 4 - 2;
}

/**
 * `n` random `[3, side, side]` images with labels `i % classes`; image `i` is always the same.
 * `poison(i)` may return true to put a NaN into image `i` (checked at each load).
 */
export function randomSource(n: number, opts: { side?: number; classes?: number; seed?: number; poison?: (i: number) => boolean } = {}): BatchSource {
  const side = opts.side ?? 16;
  const classes = opts.classes ?? 5;
  const seed = opts.seed ?? 1;
  const per = 3 * side * side;
  return {
    length: n,
    labels: Array.from({ length: n }, (_, i) => i % classes),
    async load(indices: readonly number[]): Promise<Float32Array> {
      const out = new Float32Array(indices.length * per);
      indices.forEach((idx, k) => {
        for (let j = 0; j < per; j++) out[k * per + j] = noise(seed + idx, j);
        if (opts.poison?.(idx)) out[k * per] = Number.NaN;
      });
      return out;
    },
  };
}
