// Exact GELU, x·Φ(x) with erff (PyTorch nn.GELU() default), forward and backward in f32; and the
// bf16 forms that keep the pre-activation in bf16 for the backward (whose
// output is then recomputed from it instead of kept: selective recomputation).
// CPU reference: snella_core::ops::gelu::{gelu_fwd, gelu_bwd} (whose f32 erf is a polynomial
// approximation; erff here is accurate to ~2 ulp, so the GPU is the closer of the two to f64).
#include "common.cuh"
#include <cuda_bf16.h>

#define SNELLA_INV_SQRT2 0.70710678118654752440f
// 1/√(2π)
#define SNELLA_INV_SQRT_2PI 0.39894228040143267794f

__device__ __forceinline__ float snella_gelu(float v) { return v * 0.5f * (1.0f + erff(v * SNELLA_INV_SQRT2)); }
__device__ __forceinline__ float snella_gelu_grad(float v, float dy) {
  const float cdf = 0.5f * (1.0f + erff(v * SNELLA_INV_SQRT2));
  const float pdf = SNELLA_INV_SQRT_2PI * expf(-0.5f * v * v);
  return dy * (cdf + v * pdf);
}

// y[i] = x[i]·0.5·(1 + erf(x[i]/√2)), i < n (grid-stride; four at a time when x and y are 16-byte
// aligned, element-wise identical).
extern "C" __global__ void snella_gelu_fwd(const float* __restrict__ x, float* __restrict__ y, unsigned long long n) {
  const unsigned long long stride = (unsigned long long)gridDim.x * blockDim.x;
  const unsigned long long tid = (unsigned long long)blockIdx.x * blockDim.x + threadIdx.x;
  unsigned long long done = 0;
  if (((reinterpret_cast<uintptr_t>(x) | reinterpret_cast<uintptr_t>(y)) & 15) == 0) {
    const unsigned long long n4 = n / 4;
    for (unsigned long long i = tid; i < n4; i += stride) {
      const float4 v = reinterpret_cast<const float4*>(x)[i];
      reinterpret_cast<float4*>(y)[i] = make_float4(snella_gelu(v.x), snella_gelu(v.y), snella_gelu(v.z), snella_gelu(v.w));
    }
    done = n4 * 4;
  }
  for (unsigned long long i = done + tid; i < n; i += stride) y[i] = snella_gelu(x[i]);
}

// dx[i] = dy[i]·(Φ(x) + x·φ(x)) from the saved pre-activation x, i < n (grid-stride; four at a
// time when all three are 16-byte aligned, element-wise identical).
extern "C" __global__ void snella_gelu_bwd(const float* __restrict__ x, const float* __restrict__ dy,
                                           float* __restrict__ dx, unsigned long long n) {
  const unsigned long long stride = (unsigned long long)gridDim.x * blockDim.x;
  const unsigned long long tid = (unsigned long long)blockIdx.x * blockDim.x + threadIdx.x;
  unsigned long long done = 0;
  if (((reinterpret_cast<uintptr_t>(x) | reinterpret_cast<uintptr_t>(dy) | reinterpret_cast<uintptr_t>(dx)) & 15) == 0) {
    const unsigned long long n4 = n / 4;
    for (unsigned long long i = tid; i < n4; i += stride) {
      const float4 v = reinterpret_cast<const float4*>(x)[i], g = reinterpret_cast<const float4*>(dy)[i];
      reinterpret_cast<float4*>(dx)[i] = make_float4(snella_gelu_grad(v.x, g.x), snella_gelu_grad(v.y, g.y),
                                                     snella_gelu_grad(v.z, g.z), snella_gelu_grad(v.w, g.w));
    }
    done = n4 * 4;
  }
  for (unsigned long long i = done + tid; i < n; i += stride) dx[i] = snella_gelu_grad(x[i], dy[i]);
}

// The bf16 pre-activation kept for the backward: xk[i] = bf16(x[i]) and y[i] = bf16(gelu(xk[i])), the
// output computed from the rounded pre-activation so that snella_gelu_fwd_from_bf16 rebuilds it
// bit-identically (and the backward's derivative is taken where the forward was). Four at a time
// when x is 16-byte and xk, y 8-byte aligned (element-wise identical).
extern "C" __global__ void snella_gelu_fwd_keep_bf16(const float* __restrict__ x, __nv_bfloat16* __restrict__ xk,
                                                     __nv_bfloat16* __restrict__ y, unsigned long long n) {
  const unsigned long long stride = (unsigned long long)gridDim.x * blockDim.x;
  const unsigned long long tid = (unsigned long long)blockIdx.x * blockDim.x + threadIdx.x;
  unsigned long long done = 0;
  if ((reinterpret_cast<uintptr_t>(x) & 15) == 0 && ((reinterpret_cast<uintptr_t>(xk) | reinterpret_cast<uintptr_t>(y)) & 7) == 0) {
    const unsigned long long n4 = n / 4;
    for (unsigned long long i = tid; i < n4; i += stride) {
      const float4 v = reinterpret_cast<const float4*>(x)[i];
      const __nv_bfloat162 a = __floats2bfloat162_rn(v.x, v.y), b = __floats2bfloat162_rn(v.z, v.w);
      reinterpret_cast<__nv_bfloat162*>(xk)[2 * i] = a;
      reinterpret_cast<__nv_bfloat162*>(xk)[2 * i + 1] = b;
      const float2 fa = __bfloat1622float2(a), fb = __bfloat1622float2(b);
      reinterpret_cast<__nv_bfloat162*>(y)[2 * i] = __floats2bfloat162_rn(snella_gelu(fa.x), snella_gelu(fa.y));
      reinterpret_cast<__nv_bfloat162*>(y)[2 * i + 1] = __floats2bfloat162_rn(snella_gelu(fb.x), snella_gelu(fb.y));
    }
    done = n4 * 4;
  }
  for (unsigned long long i = done + tid; i < n; i += stride) {
    const __nv_bfloat16 k = __float2bfloat16_rn(x[i]);
    xk[i] = k;
    y[i] = __float2bfloat16_rn(snella_gelu(__bfloat162float(k)));
  }
}

// y[i] = bf16(gelu(xk[i])) from the kept bf16 pre-activation (the forward's output rebuilt in
// backward, bit-identical to snella_gelu_fwd_keep_bf16's). Two at a time when both are 4-byte aligned.
extern "C" __global__ void snella_gelu_fwd_from_bf16(const __nv_bfloat16* __restrict__ xk, __nv_bfloat16* __restrict__ y,
                                                     unsigned long long n) {
  const unsigned long long stride = (unsigned long long)gridDim.x * blockDim.x;
  const unsigned long long tid = (unsigned long long)blockIdx.x * blockDim.x + threadIdx.x;
  unsigned long long done = 0;
  if (((reinterpret_cast<uintptr_t>(xk) | reinterpret_cast<uintptr_t>(y)) & 3) == 0) {
    const unsigned long long n2 = n / 2;
    for (unsigned long long i = tid; i < n2; i += stride) {
      const float2 f = __bfloat1622float2(reinterpret_cast<const __nv_bfloat162*>(xk)[i]);
      reinterpret_cast<__nv_bfloat162*>(y)[i] = __floats2bfloat162_rn(snella_gelu(f.x), snella_gelu(f.y));
    }
    done = n2 * 2;
  }
  for (unsigned long long i = done + tid; i < n; i += stride) y[i] = __float2bfloat16_rn(snella_gelu(__bfloat162float(xk[i])));
}

// dx[i] = dy[i]·(Φ(xk) + xk·φ(xk)) from the kept bf16 pre-activation (f32 dy), dx written as T:
// f32, or bf16 (each f32 result rounded to nearest even: the bits of the f32 output rounded later,
// as the fc1 backward's products round its dy). Two at a time when xk and a bf16 dx are 4-byte,
// dy and an f32 dx 8-byte aligned.
__device__ __forceinline__ void snella_gelu_store2(float* dx, unsigned long long i, float a, float b) {
  reinterpret_cast<float2*>(dx)[i] = make_float2(a, b);
}
__device__ __forceinline__ void snella_gelu_store2(__nv_bfloat16* dx, unsigned long long i, float a, float b) {
  reinterpret_cast<__nv_bfloat162*>(dx)[i] = __floats2bfloat162_rn(a, b);
}
__device__ __forceinline__ void snella_gelu_store1(float* dx, unsigned long long i, float a) { dx[i] = a; }
__device__ __forceinline__ void snella_gelu_store1(__nv_bfloat16* dx, unsigned long long i, float a) { dx[i] = __float2bfloat16_rn(a); }

template <typename T>
__device__ __forceinline__ void snella_gelu_bwd_bf16x_body(const __nv_bfloat16* __restrict__ xk, const float* __restrict__ dy,
                                                           T* __restrict__ dx, unsigned long long n) {
  const unsigned long long stride = (unsigned long long)gridDim.x * blockDim.x;
  const unsigned long long tid = (unsigned long long)blockIdx.x * blockDim.x + threadIdx.x;
  unsigned long long done = 0;
  const uintptr_t dx_align = sizeof(T) == 4 ? 7 : 3;
  if ((reinterpret_cast<uintptr_t>(xk) & 3) == 0 && (reinterpret_cast<uintptr_t>(dx) & dx_align) == 0 &&
      (reinterpret_cast<uintptr_t>(dy) & 7) == 0) {
    const unsigned long long n2 = n / 2;
    for (unsigned long long i = tid; i < n2; i += stride) {
      const float2 v = __bfloat1622float2(reinterpret_cast<const __nv_bfloat162*>(xk)[i]);
      const float2 g = reinterpret_cast<const float2*>(dy)[i];
      snella_gelu_store2(dx, i, snella_gelu_grad(v.x, g.x), snella_gelu_grad(v.y, g.y));
    }
    done = n2 * 2;
  }
  for (unsigned long long i = done + tid; i < n; i += stride) snella_gelu_store1(dx, i, snella_gelu_grad(__bfloat162float(xk[i]), dy[i]));
}

extern "C" __global__ void snella_gelu_bwd_bf16x(const __nv_bfloat16* __restrict__ xk, const float* __restrict__ dy,
                                                 float* __restrict__ dx, unsigned long long n) {
  snella_gelu_bwd_bf16x_body(xk, dy, dx, n);
}
extern "C" __global__ void snella_gelu_bwd_bf16x_g16(const __nv_bfloat16* __restrict__ xk, const float* __restrict__ dy,
                                                     __nv_bfloat16* __restrict__ dx, unsigned long long n) {
  snella_gelu_bwd_bf16x_body(xk, dy, dx, n);
}
