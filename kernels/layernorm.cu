// LayerNorm over the last dimension (timm nn.LayerNorm, eps passed in), forward and backward, f32,
// and the forms that keep the normalised input x̂ for the backward (f32 or bf16) instead of x.
// CPU reference: snella_core::ops::layernorm::{layernorm_fwd, layernorm_bwd, layernorm_fwd_xhat,
// layernorm_affine, layernorm_bwd_xhat}.
//
// Forward and dx: one warp per row (8 rows per 256-thread block); the row is read from global
// memory (L1/L2) once per pass. dgamma/dbeta: deterministic two-kernel column reduction
// (fixed-shape partial sums per chunk of SNELLA_LN_CHUNK rows, then the chunks in order).
#include "common.cuh"
#include <cuda_bf16.h>

#define SNELLA_LN_CHUNK 64

__device__ __forceinline__ float snella_ln_load(const float* p) { return *p; }
__device__ __forceinline__ float snella_ln_load(const __nv_bfloat16* p) { return __bfloat162float(*p); }
// v as a T would hold it (rounded to nearest even for bf16), back in f32.
__device__ __forceinline__ float snella_ln_as(float v, const float*) { return v; }
__device__ __forceinline__ float snella_ln_as(float v, const __nv_bfloat16*) { return __bfloat162float(__float2bfloat16_rn(v)); }

// Where the backward reads x̂ of element o (row r) from: recomputed from x, mean, rstd, or saved.
struct SnellaXhatFromX {
  const float* __restrict__ x;
  const float* __restrict__ mean;
  const float* __restrict__ rstd;
  __device__ __forceinline__ float at(size_t o, unsigned r) const { return (x[o] - mean[r]) * rstd[r]; }
};
template <typename T>
struct SnellaXhatSaved {
  const T* __restrict__ xh;
  __device__ __forceinline__ float at(size_t o, unsigned) const { return snella_ln_load(xh + o); }
};

// Mean and rstd = 1/sqrt(var + eps) (biased variance, two passes) of the row xr [d], summed by one
// warp in a fixed order; every lane gets both.
__device__ __forceinline__ void snella_ln_stats(const float* __restrict__ xr, unsigned d, float eps, unsigned lane, float& mu,
                                                float& rs) {
  float inv_d = 1.0f / (float)d;
  float s = 0.f;
  for (unsigned j = lane; j < d; j += 32) s += xr[j];
  s = snella_warp_sum(s);
  mu = s * inv_d;
  float ss = 0.f;
  for (unsigned j = lane; j < d; j += 32) {
    float c = xr[j] - mu;
    ss += c * c;
  }
  ss = snella_warp_sum(ss);
  rs = 1.0f / sqrtf(ss * inv_d + eps);
}

// y = (x - mean)·rstd·gamma + beta per row of x [rows, d]; mean, rstd [rows] (f32).
template <typename Y>
__device__ __forceinline__ void snella_layernorm_fwd_body(const float* __restrict__ x, const float* __restrict__ gamma,
                                                          const float* __restrict__ beta, unsigned rows, unsigned d, float eps,
                                                          Y* __restrict__ y, float* __restrict__ mean, float* __restrict__ rstd) {
  unsigned warps = blockDim.x >> 5;
  unsigned row = blockIdx.x * warps + (threadIdx.x >> 5);
  unsigned lane = threadIdx.x & 31;
  if (row >= rows) return;  // whole warp leaves together
  const float* xr = x + (size_t)row * d;
  float mu, rs;
  snella_ln_stats(xr, d, eps, lane, mu, rs);
  Y* yr = y + (size_t)row * d;
  for (unsigned j = lane; j < d; j += 32) snella_store(yr + j, (xr[j] - mu) * rs * gamma[j] + beta[j]);
  if (lane == 0) {
    mean[row] = mu;
    rstd[row] = rs;
  }
}

extern "C" __global__ void snella_layernorm_fwd(const float* __restrict__ x, const float* __restrict__ gamma,
                                                const float* __restrict__ beta, unsigned rows, unsigned d, float eps,
                                                float* __restrict__ y, float* __restrict__ mean, float* __restrict__ rstd) {
  snella_layernorm_fwd_body(x, gamma, beta, rows, d, eps, y, mean, rstd);
}

// Forward keeping x̂ = (x − mean)·rstd (as T: f32, or bf16 rounded to nearest even) for the backward
// instead of x and mean (selective recomputation: the output is not kept, snella_layernorm_affine
// rebuilds it). y = fma(x̂, gamma, beta) from the x̂ as stored, so the rebuilt y is bit-identical.
template <typename T>
__device__ __forceinline__ void snella_layernorm_fwd_xhat_body(const float* __restrict__ x, const float* __restrict__ gamma,
                                                               const float* __restrict__ beta, unsigned rows, unsigned d,
                                                               float eps, T* __restrict__ y, T* __restrict__ xhat,
                                                               float* __restrict__ rstd) {
  unsigned warps = blockDim.x >> 5;
  unsigned row = blockIdx.x * warps + (threadIdx.x >> 5);
  unsigned lane = threadIdx.x & 31;
  if (row >= rows) return;
  const float* xr = x + (size_t)row * d;
  float mu, rs;
  snella_ln_stats(xr, d, eps, lane, mu, rs);
  T* yr = y + (size_t)row * d;
  T* hr = xhat + (size_t)row * d;
  for (unsigned j = lane; j < d; j += 32) {
    float xh = snella_ln_as((xr[j] - mu) * rs, hr);
    snella_store(hr + j, xh);
    snella_store(yr + j, fmaf(xh, gamma[j], beta[j]));
  }
  if (lane == 0) rstd[row] = rs;
}

extern "C" __global__ void snella_layernorm_fwd_xhat(const float* __restrict__ x, const float* __restrict__ gamma,
                                                     const float* __restrict__ beta, unsigned rows, unsigned d, float eps,
                                                     float* __restrict__ y, float* __restrict__ xhat, float* __restrict__ rstd) {
  snella_layernorm_fwd_xhat_body(x, gamma, beta, rows, d, eps, y, xhat, rstd);
}

extern "C" __global__ void snella_layernorm_fwd_xhat_bf16(const float* __restrict__ x, const float* __restrict__ gamma,
                                                          const float* __restrict__ beta, unsigned rows, unsigned d, float eps,
                                                          __nv_bfloat16* __restrict__ y, __nv_bfloat16* __restrict__ xhat,
                                                          float* __restrict__ rstd) {
  snella_layernorm_fwd_xhat_body(x, gamma, beta, rows, d, eps, y, xhat, rstd);
}

// y = fma(x̂, gamma, beta) from a saved x̂ [rows, d] (the forward's output rebuilt in backward); one
// warp per row.
template <typename T>
__device__ __forceinline__ void snella_layernorm_affine_body(const T* __restrict__ xhat, const float* __restrict__ gamma,
                                                             const float* __restrict__ beta, unsigned rows, unsigned d,
                                                             T* __restrict__ y) {
  unsigned warps = blockDim.x >> 5;
  unsigned row = blockIdx.x * warps + (threadIdx.x >> 5);
  unsigned lane = threadIdx.x & 31;
  if (row >= rows) return;
  const T* hr = xhat + (size_t)row * d;
  T* yr = y + (size_t)row * d;
  for (unsigned j = lane; j < d; j += 32) snella_store(yr + j, fmaf(snella_ln_load(hr + j), gamma[j], beta[j]));
}

extern "C" __global__ void snella_layernorm_affine(const float* __restrict__ xhat, const float* __restrict__ gamma,
                                                   const float* __restrict__ beta, unsigned rows, unsigned d,
                                                   float* __restrict__ y) {
  snella_layernorm_affine_body(xhat, gamma, beta, rows, d, y);
}

// bf16: two values per lane and step when d is even, xhat and y 4-byte and gamma, beta 8-byte
// aligned (each value computed exactly as by the scalar body); otherwise the scalar body.
extern "C" __global__ void snella_layernorm_affine_bf16(const __nv_bfloat16* __restrict__ xhat, const float* __restrict__ gamma,
                                                        const float* __restrict__ beta, unsigned rows, unsigned d,
                                                        __nv_bfloat16* __restrict__ y) {
  if ((d & 1) || ((reinterpret_cast<uintptr_t>(gamma) | reinterpret_cast<uintptr_t>(beta)) & 7) ||
      ((reinterpret_cast<uintptr_t>(xhat) | reinterpret_cast<uintptr_t>(y)) & 3)) {
    snella_layernorm_affine_body(xhat, gamma, beta, rows, d, y);
    return;
  }
  unsigned warps = blockDim.x >> 5;
  unsigned row = blockIdx.x * warps + (threadIdx.x >> 5);
  unsigned lane = threadIdx.x & 31;
  if (row >= rows) return;
  const __nv_bfloat162* hr = reinterpret_cast<const __nv_bfloat162*>(xhat + (size_t)row * d);
  __nv_bfloat162* yr = reinterpret_cast<__nv_bfloat162*>(y + (size_t)row * d);
  for (unsigned j = lane; j < d / 2; j += 32) {
    const float2 h = __bfloat1622float2(hr[j]);
    const float2 g = reinterpret_cast<const float2*>(gamma)[j], b = reinterpret_cast<const float2*>(beta)[j];
    yr[j] = __floats2bfloat162_rn(fmaf(h.x, g.x, b.x), fmaf(h.y, g.y, b.y));
  }
}

// dx = rstd·(g − mean(g) − x̂·mean(g·x̂)) with g = dy·gamma, x̂ from XH; one warp per row.
// `res` (may be null): a gradient added to dx in the same pass (the residual branch's, which the
// block's backward would otherwise add with a separate read-modify-write of dx). `dx16` (may be
// null): dx rounded to bf16 as well (the next linear's ∂L/∂y in a bf16 step; session 8). (Session 8
// also tried holding dy and x̂ in registers between the passes, 24 values each per lane at d = 768:
// 95 registers, and the ViT-B step's LayerNorm backward went 1.56 → 2.45 ms on an H100; reverted.)
template <typename XH>
__device__ __forceinline__ void snella_layernorm_bwd_dx_body(const float* __restrict__ dy, XH xh_of,
                                                            const float* __restrict__ gamma, const float* __restrict__ rstd,
                                                            unsigned rows, unsigned d, float* __restrict__ dx,
                                                            const float* __restrict__ res, __nv_bfloat16* __restrict__ dx16) {
  unsigned warps = blockDim.x >> 5;
  unsigned row = blockIdx.x * warps + (threadIdx.x >> 5);
  unsigned lane = threadIdx.x & 31;
  if (row >= rows) return;
  const float* dyr = dy + (size_t)row * d;
  size_t base = (size_t)row * d;
  float rs = rstd[row];
  float sg = 0.f, sgx = 0.f;
  for (unsigned j = lane; j < d; j += 32) {
    float gg = dyr[j] * gamma[j];
    sg += gg;
    sgx += gg * xh_of.at(base + j, row);
  }
  sg = snella_warp_sum(sg);
  sgx = snella_warp_sum(sgx);
  float inv_d = 1.0f / (float)d;
  float mg = sg * inv_d, mgx = sgx * inv_d;
  float* dxr = dx + base;
  if (res) {
    const float* rr = res + base;
    for (unsigned j = lane; j < d; j += 32) {
      const float v = rs * (dyr[j] * gamma[j] - mg - xh_of.at(base + j, row) * mgx) + rr[j];
      dxr[j] = v;
      if (dx16) snella_store(dx16 + base + j, v);
    }
  } else {
    for (unsigned j = lane; j < d; j += 32) {
      const float v = rs * (dyr[j] * gamma[j] - mg - xh_of.at(base + j, row) * mgx);
      dxr[j] = v;
      if (dx16) snella_store(dx16 + base + j, v);
    }
  }
}

// x̂ = (x − mean)·rstd recomputed from the forward input.
extern "C" __global__ void snella_layernorm_bwd_dx(const float* __restrict__ dy, const float* __restrict__ x,
                                                   const float* __restrict__ gamma, const float* __restrict__ mean,
                                                   const float* __restrict__ rstd, unsigned rows, unsigned d,
                                                   float* __restrict__ dx) {
  snella_layernorm_bwd_dx_body(dy, SnellaXhatFromX{x, mean, rstd}, gamma, rstd, rows, d, dx, nullptr, nullptr);
}

// x̂ saved by snella_layernorm_fwd_xhat(_bf16); dx += res when res is not null; dx16 (may be null)
// gets dx rounded to bf16.
extern "C" __global__ void snella_layernorm_bwd_dx_xhat(const float* __restrict__ dy, const float* __restrict__ xhat,
                                                        const float* __restrict__ gamma, const float* __restrict__ rstd,
                                                        unsigned rows, unsigned d, float* __restrict__ dx,
                                                        const float* __restrict__ res, __nv_bfloat16* __restrict__ dx16) {
  snella_layernorm_bwd_dx_body(dy, SnellaXhatSaved<float>{xhat}, gamma, rstd, rows, d, dx, res, dx16);
}

extern "C" __global__ void snella_layernorm_bwd_dx_xhat_bf16(const float* __restrict__ dy, const __nv_bfloat16* __restrict__ xhat,
                                                             const float* __restrict__ gamma, const float* __restrict__ rstd,
                                                             unsigned rows, unsigned d, float* __restrict__ dx,
                                                             const float* __restrict__ res, __nv_bfloat16* __restrict__ dx16) {
  snella_layernorm_bwd_dx_body(dy, SnellaXhatSaved<__nv_bfloat16>{xhat}, gamma, rstd, rows, d, dx, res, dx16);
}

// Partial sums of dy·x̂ and dy over each chunk of SNELLA_LN_CHUNK rows (chunks blockIdx.y,
// blockIdx.y + gridDim.y, ...), for 32 columns from blockIdx.x·32. Block (32, 8): thread (tx, ty)
// sums rows ty, ty+8, ... of the chunk, then the 8 partials are added in a fixed tree.
// part_g, part_b: [nchunks, d], nchunks = ceil(rows / SNELLA_LN_CHUNK).
template <typename XH>
__device__ __forceinline__ void snella_layernorm_bwd_param_partial_body(const float* __restrict__ dy, XH xh_of, unsigned rows,
                                                                        unsigned d, float* __restrict__ part_g,
                                                                        float* __restrict__ part_b) {
  __shared__ float sg[8][33], sb[8][33];
  unsigned tx = threadIdx.x, ty = threadIdx.y;
  unsigned col = blockIdx.x * 32 + tx;
  unsigned nchunks = (rows + SNELLA_LN_CHUNK - 1) / SNELLA_LN_CHUNK;
  for (unsigned chunk = blockIdx.y; chunk < nchunks; chunk += gridDim.y) {
    unsigned r0 = chunk * SNELLA_LN_CHUNK;
    unsigned r1 = min(r0 + SNELLA_LN_CHUNK, rows);
    float ag = 0.f, ab = 0.f;
    if (col < d) {
      for (unsigned r = r0 + ty; r < r1; r += 8) {
        size_t o = (size_t)r * d + col;
        float g = dy[o];
        ag += g * xh_of.at(o, r);
        ab += g;
      }
    }
    __syncthreads();  // the previous chunk's tree is done with sg/sb
    sg[ty][tx] = ag;
    sb[ty][tx] = ab;
    __syncthreads();
    for (unsigned s = 4; s > 0; s >>= 1) {
      if (ty < s) {
        sg[ty][tx] += sg[ty + s][tx];
        sb[ty][tx] += sb[ty + s][tx];
      }
      __syncthreads();
    }
    if (ty == 0 && col < d) {
      part_g[(size_t)chunk * d + col] = sg[0][tx];
      part_b[(size_t)chunk * d + col] = sb[0][tx];
    }
  }
}

extern "C" __global__ void snella_layernorm_bwd_param_partial(const float* __restrict__ dy, const float* __restrict__ x,
                                                              const float* __restrict__ mean,
                                                              const float* __restrict__ rstd, unsigned rows, unsigned d,
                                                              float* __restrict__ part_g, float* __restrict__ part_b) {
  snella_layernorm_bwd_param_partial_body(dy, SnellaXhatFromX{x, mean, rstd}, rows, d, part_g, part_b);
}

extern "C" __global__ void snella_layernorm_bwd_param_partial_xhat(const float* __restrict__ dy, const float* __restrict__ xhat,
                                                                   unsigned rows, unsigned d, float* __restrict__ part_g,
                                                                   float* __restrict__ part_b) {
  snella_layernorm_bwd_param_partial_body(dy, SnellaXhatSaved<float>{xhat}, rows, d, part_g, part_b);
}

extern "C" __global__ void snella_layernorm_bwd_param_partial_xhat_bf16(const float* __restrict__ dy,
                                                                        const __nv_bfloat16* __restrict__ xhat, unsigned rows,
                                                                        unsigned d, float* __restrict__ part_g,
                                                                        float* __restrict__ part_b) {
  snella_layernorm_bwd_param_partial_body(dy, SnellaXhatSaved<__nv_bfloat16>{xhat}, rows, d, part_g, part_b);
}

// out[c] += Σ_k part[k, c] over k = 0..nchunks in order; part [nchunks, d].
extern "C" __global__ void snella_layernorm_bwd_param_final(const float* __restrict__ part, unsigned nchunks, unsigned d,
                                                            float* __restrict__ out) {
  unsigned c = blockIdx.x * blockDim.x + threadIdx.x;
  if (c >= d) return;
  float s = 0.f;
  for (unsigned k = 0; k < nchunks; ++k) s += part[(size_t)k * d + c];
  out[c] += s;
}
