/**
 * Deterministic, seeded shuffling: mulberry32 PRNG + Fisher–Yates.
 *
 * The exact algorithm is part of the contract (same seed and epoch give the
 * same order on every machine and in every release), so it is spelled out
 * here for reimplementation in other languages.
 *
 * @module
 */

/**
 * mulberry32, a 32-bit-state PRNG (Tommy Ettinger, public domain):
 *
 * ```text
 * state = (state + 0x6D2B79F5) mod 2^32
 * t = state
 * t = imul(t ^ (t >>> 15), t | 1)
 * t ^= t + imul(t ^ (t >>> 7), t | 61)
 * out = (t ^ (t >>> 14)) >>> 0          // uint32
 * ```
 *
 * @param seed - initial state; reduced to uint32 (`seed >>> 0`).
 * @returns a function giving the next uint32 (0 ≤ x < 2^32) on each call.
 */
export function mulberry32(seed: number): () => number {
  let state = seed >>> 0;
  return () => {
    state = (state + 0x6d2b79f5) >>> 0;
    let t = state;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return (t ^ (t >>> 14)) >>> 0;
  };
}

/**
 * The murmur3 32-bit finaliser (fmix32): a bijective mix of a uint32.
 * @returns uint32.
 */
export function fmix32(x: number): number {
  let h = x >>> 0;
  h ^= h >>> 16;
  h = Math.imul(h, 0x85ebca6b);
  h ^= h >>> 13;
  h = Math.imul(h, 0xc2b2ae35);
  h ^= h >>> 16;
  return h >>> 0;
}

/**
 * The mulberry32 state for one epoch of one run:
 * `fmix32(seed ^ fmix32(epoch + 0x9E3779B9 mod 2^32))`.
 *
 * @param seed - uint32 run seed.
 * @param epoch - uint32 epoch number.
 * @returns uint32.
 */
export function epochSeed(seed: number, epoch: number): number {
  return fmix32((seed >>> 0) ^ fmix32(((epoch >>> 0) + 0x9e3779b9) >>> 0));
}

/**
 * A seeded random permutation of `0..n-1`.
 *
 * Starts from the identity and runs Fisher–Yates from the back with the
 * mulberry32 stream seeded by {@link epochSeed}(seed, epoch): for
 * `i = n-1 … 1`, `j = (next() * (i + 1)) >> 32` (exact 64-bit product),
 * swap `p[i]`, `p[j]`.
 *
 * @param n - length, integer ≥ 0.
 * @param seed - run seed, integer 0 ≤ seed < 2^32.
 * @param epoch - epoch number, integer 0 ≤ epoch < 2^32.
 * @returns Uint32Array of length n holding each of 0..n-1 exactly once.
 * @throws RangeError naming the argument if one is out of range.
 */
export function permutation(n: number, seed: number, epoch: number): Uint32Array {
  checkUint32('seed', seed);
  checkUint32('epoch', epoch);
  if (!Number.isInteger(n) || n < 0 || n > 0xffffffff) {
    throw new RangeError(`n must be an integer in 0..4294967295, got ${n}`);
  }
  const p = new Uint32Array(n);
  for (let i = 0; i < n; i++) p[i] = i;
  const next = mulberry32(epochSeed(seed, epoch));
  for (let i = n - 1; i > 0; i--) {
    const j = mulHigh32(next(), i + 1);
    const t = p[i];
    p[i] = p[j];
    p[j] = t;
  }
  return p;
}

/**
 * `floor(a * b / 2^32)` computed exactly for uint32 `a` and `b` (the high word
 * of the 64-bit product), using float64 arithmetic on 16-bit halves.
 */
export function mulHigh32(a: number, b: number): number {
  const ah = a >>> 16;
  const al = a & 0xffff;
  return Math.floor((ah * b + Math.floor((al * b) / 65536)) / 65536);
}

/**
 * @throws RangeError `"<name> must be an integer in 0..4294967295, got <v>"`.
 */
export function checkUint32(name: string, v: number): void {
  if (!Number.isInteger(v) || v < 0 || v > 0xffffffff) {
    throw new RangeError(`${name} must be an integer in 0..4294967295, got ${v}`);
  }
}
