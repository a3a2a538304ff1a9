// Multi-head self-attention core (timm Attention between qkv and proj): the row-softmax kernels
// around cuBLAS's strided-batched products. CPU reference: snella_core::ops::attention.
//
// The products (S = scale·q·kᵀ, O = P·v; backward dP = dO·vᵀ, dv = Pᵀ·dO, dq = dS·k, dk = dSᵀ·q)
// run on cuBLAS, one batched call per product over every (image, head) (crates/snella-cuda/src/ops/
// attention.rs); the probabilities P [b, heads, t, t] are materialised for the backward. What is
// left to these kernels is the softmax over keys and its backward, one warp per row, each row
// reduced by one warp in a fixed order (deterministic).
#include "common.cuh"

// In place: p[row, :] = softmax(p[row, :]) for rows [0, rows) of length t.
// Grid ceil(rows / 8), block 256 (8 warps, one row each).
extern "C" __global__ void __launch_bounds__(256)
    snella_softmax_rows_fwd(float* __restrict__ p, unsigned rows, unsigned t) {
  const unsigned row = blockIdx.x * 8 + (threadIdx.x >> 5), lane = threadIdx.x & 31;
  if (row >= rows) return;
  float* r = p + (size_t)row * t;
  float mx = -INFINITY;
  for (unsigned j = lane; j < t; j += 32) mx = fmaxf(mx, r[j]);
  mx = snella_warp_max(mx);
  float sum = 0.f;
  for (unsigned j = lane; j < t; j += 32) {
    float e = expf(r[j] - mx);
    r[j] = e;
    sum += e;
  }
  const float inv = 1.f / snella_warp_sum(sum);
  for (unsigned j = lane; j < t; j += 32) r[j] *= inv;
}

// Softmax backward with the score scale folded in: ds[row, :] = scale · P ⊙ (dP − Σ_j dP⊙P),
// in place over ds (which holds dP on entry). Grid ceil(rows / 8), block 256.
extern "C" __global__ void __launch_bounds__(256)
    snella_softmax_rows_bwd(const float* __restrict__ p, float* __restrict__ ds, unsigned rows, unsigned t, float scale) {
  const unsigned row = blockIdx.x * 8 + (threadIdx.x >> 5), lane = threadIdx.x & 31;
  if (row >= rows) return;
  const float* pr = p + (size_t)row * t;
  float* dr = ds + (size_t)row * t;
  float dot = 0.f;
  for (unsigned j = lane; j < t; j += 32) dot += pr[j] * dr[j];
  dot = snella_warp_sum(dot);
  for (unsigned j = lane; j < t; j += 32) dr[j] = scale * pr[j] * (dr[j] - dot);
}
