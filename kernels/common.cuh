// Shared helpers of snella's kernels (included by every .cu file; device code only).
#pragma once
#include <cuda_runtime.h>
#include <cuda_bf16.h>
#include <stdint.h>

// Stores an f32 result as the destination's element type: f32 as is, bf16 rounded to nearest even
// (the rounding of kernels/convert.cu and of half::bf16::from_f32).
__device__ __forceinline__ void snella_store(float* p, float v) { *p = v; }
__device__ __forceinline__ void snella_store(__nv_bfloat16* p, float v) { *p = __float2bfloat16_rn(v); }

// Warp-wide sum (all 32 lanes active).
__device__ __forceinline__ float snella_warp_sum(float v) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// Warp-wide max (all 32 lanes active).
__device__ __forceinline__ float snella_warp_max(float v) {
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

// The top-k's key of a value (spec §2 competition by magnitude): the f32 bits of |x| when |x| > 0,
// else 0 (NaN and ±0 count as magnitude 0). Monotone in |x|; bits 30..0 only. Shared by topk.cu
// (the select), sparsify.cu (membership) and merge.cu (the softmax pass's digit-0 histogram).
__device__ __forceinline__ unsigned snella_magnitude_key(float x) {
  const float a = fabsf(x);
  return a > 0.f ? __float_as_uint(a) : 0u;
}

// Adds `bin` of every lane with `ok` to the shared histogram h, one atomic per distinct bin of the
// warp (integer counts: exact in any order). Every lane of the warp must call it.
__device__ __forceinline__ void snella_hist_add_warp(unsigned* h, bool ok, unsigned bin) {
  const unsigned act = __ballot_sync(0xffffffffu, ok);
  if (ok) {
    const unsigned peers = __match_any_sync(act, bin);
    if ((threadIdx.x & 31) == (unsigned)(__ffs(peers) - 1)) atomicAdd(&h[bin], (unsigned)__popc(peers));
  }
}

// The sparsify rule's stop-gradient factor (spec §2; kernels/sparsify.cu) for the entry of flat index
// `i` with magnitude `a` (|m|): rule 0 magnitude-product |m|·1_S, 1 soft-threshold max(|m| − τ, 0),
// 2 mask 1_S; i ∈ S ⇔ key(a) > thr, or == thr and i < cut (the kept-set words of kernels/topk.cu).
__device__ __forceinline__ float snella_sparsify_factor(float a, unsigned long long i, unsigned thr, unsigned cut, float tau,
                                                        unsigned rule) {
  if (rule == 1) {
    const float d = __fsub_rn(a, tau);
    return d > 0.f ? d : 0.f;
  }
  const unsigned kk = a > 0.f ? __float_as_uint(a) : 0u;  // snella_magnitude_key of |m| (a is |m| already)
  const bool keep = kk > thr || (kk == thr && i < (unsigned long long)cut);
  return keep ? (rule == 0 ? a : 1.f) : 0.f;
}

// One adapter of the batched forward merge path (session 10; crates/snella-cuda/src/ops/merge_batch.rs
// builds the table, 8 u64 words per adapter): the `_batch` entry points of merge.cu, topk.cu and
// sparsify.cu take a table of these and give blockIdx.z to one adapter each, with the launch's shape
// (H, in, out, rh) shared by all of them. A null mix means SNELL (M = K). st is the adapter's top-k
// state (KEPT_WORDS words, zeroed by snella_merge_fwd_tiles_batch), w0/w its chunk of W0 [c, in] and
// of the bf16 effective weight.
struct SnellaFwdJob {
  const float* A;
  const float* B;
  const float* mix;
  float* M;
  unsigned* st;
  const float* w0;
  __nv_bfloat16* w;
  unsigned k, rule;
};
// Words of a top-k state and the first word of its digit-0 histogram (topk.cu's layout, which
// asserts both; ops/topk.rs KEPT_WORDS, HIST0_WORD).
#define SNELLA_KEPT_WORDS (32u + 2048u + 2048u + 512u + 4096u)
#define SNELLA_KEPT_HIST0 32u

// One adapter of the batched backward merge path (session 10; ops/merge_batch.rs, 18 u64 words):
// the `_batch` backward entry points of merge.cu give blockIdx.z to one adapter each (one shape for
// all). G: its chunk of the layer's weight gradient [n_in rows at stride ld]; kept: its forward's
// top-k state; K, D, dK, rowstat [n_in, 4], gpart [n_in] (the rows' ∂γ shares), partA, partB, tgpart
// (the tiles kernel's partials): scratch; dA, dB, dmix: the outputs (dmix null: none).
struct SnellaBwdJob {
  const float* A;
  const float* B;
  const float* mix;
  const float* G;
  unsigned long long ld;
  const unsigned* kept;
  unsigned rule, pad;
  float* K;
  float* D;
  float* dK;
  float* rowstat;
  float* gpart;
  float* partA;
  float* partB;
  float* tgpart;
  float* dA;
  float* dB;
  float* dmix;
};
