// Mean softmax cross-entropy fused with its gradient, f32 (the loss sum in f64).
// CPU reference: snella_core::ops::cross_entropy::cross_entropy.
//
// Kernel 1: one warp per row writes dlogits and the row's loss and hit (argmax == label) into
// scratch [2, b]. Kernel 2: one block sums the scratch in f64 in a fixed order and writes
// stats[0] = mean loss, stats[1] = number of hits (as float). Deterministic.
#include "common.cuh"

// For row r of logits [b, c] with label labels[r]: row loss lse − x[label] into row_loss[r],
// 1/0 into row_hit[r] (argmax = first maximal index, as torch.argmax), and
// dlogits = (softmax − onehot)·inv_b. A label ≥ c gives a NaN loss and NaN dlogits for that row.
extern "C" __global__ void snella_cross_entropy_rows(const float* __restrict__ logits, const unsigned* __restrict__ labels,
                                                     unsigned b, unsigned c, float inv_b, float* __restrict__ dlogits,
                                                     float* __restrict__ row_loss, float* __restrict__ row_hit) {
  unsigned warps = blockDim.x >> 5;
  unsigned r = blockIdx.x * warps + (threadIdx.x >> 5);
  unsigned lane = threadIdx.x & 31;
  if (r >= b) return;
  const float* x = logits + (size_t)r * c;
  float* dx = dlogits + (size_t)r * c;
  unsigned lab = labels[r];
  // Per-lane max with the first index (strict >, increasing j), then a warp reduce that keeps the
  // larger value, or the smaller index on ties.
  float mx = -INFINITY;
  unsigned am = 0xffffffffu;
  for (unsigned j = lane; j < c; j += 32) {
    float v = x[j];
    if (am == 0xffffffffu || v > mx) {
      mx = v;
      am = j;
    }
  }
  for (int o = 16; o > 0; o >>= 1) {
    float omx = __shfl_xor_sync(0xffffffffu, mx, o);
    unsigned oam = __shfl_xor_sync(0xffffffffu, am, o);
    if (oam != 0xffffffffu && (am == 0xffffffffu || omx > mx || (omx == mx && oam < am))) {
      mx = omx;
      am = oam;
    }
  }
  float s = 0.f;
  for (unsigned j = lane; j < c; j += 32) s += expf(x[j] - mx);
  s = snella_warp_sum(s);
  float lse = mx + logf(s);
  bool ok = lab < c;
  for (unsigned j = lane; j < c; j += 32) {
    float p = expf(x[j] - lse);
    dx[j] = ok ? (j == lab ? (p - 1.0f) * inv_b : p * inv_b) : NAN;
  }
  if (lane == 0) {
    row_loss[r] = ok ? lse - x[lab] : NAN;
    row_hit[r] = (ok && am == lab) ? 1.0f : 0.0f;
  }
}

// stats[0] = (Σ_r row_loss[r]) / b in f64, stats[1] = Σ_r row_hit[r]; one block of 256 threads,
// thread i sums rows i, i+256, ... then a fixed tree. b = 0 gives (0, 0).
extern "C" __global__ void snella_cross_entropy_final(const float* __restrict__ row_loss, const float* __restrict__ row_hit,
                                                      unsigned b, float* __restrict__ stats) {
  __shared__ double sl[256];
  __shared__ unsigned sh[256];
  double l = 0.0;
  unsigned h = 0;
  for (unsigned r = threadIdx.x; r < b; r += blockDim.x) {
    l += (double)row_loss[r];
    h += row_hit[r] != 0.0f;
  }
  sl[threadIdx.x] = l;
  sh[threadIdx.x] = h;
  __syncthreads();
  for (unsigned s = blockDim.x / 2; s > 0; s >>= 1) {
    if (threadIdx.x < s) {
      sl[threadIdx.x] += sl[threadIdx.x + s];
      sh[threadIdx.x] += sh[threadIdx.x + s];
    }
    __syncthreads();
  }
  if (threadIdx.x == 0) {
    stats[0] = b ? (float)(sl[0] / (double)b) : 0.0f;
    stats[1] = (float)sh[0];
  }
}
