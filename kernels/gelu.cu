// Exact GELU, x·Φ(x) with erff (PyTorch nn.GELU() default), forward and backward, f32.
// CPU reference: snella_core::ops::gelu::{gelu_fwd, gelu_bwd} (whose f32 erf is a polynomial
// approximation; erff here is accurate to ~2 ulp, so the GPU is the closer of the two to f64).
#include "common.cuh"

#define SNELLA_INV_SQRT2 0.70710678118654752440f
// 1/√(2π)
#define SNELLA_INV_SQRT_2PI 0.39894228040143267794f

// y[i] = x[i]·0.5·(1 + erf(x[i]/√2)), i < n (grid-stride).
extern "C" __global__ void snella_gelu_fwd(const float* __restrict__ x, float* __restrict__ y, unsigned long long n) {
  for (unsigned long long i = (unsigned long long)blockIdx.x * blockDim.x + threadIdx.x; i < n;
       i += (unsigned long long)gridDim.x * blockDim.x) {
    float v = x[i];
    y[i] = v * 0.5f * (1.0f + erff(v * SNELLA_INV_SQRT2));
  }
}

// dx[i] = dy[i]·(Φ(x) + x·φ(x)) from the saved pre-activation x, i < n (grid-stride).
extern "C" __global__ void snella_gelu_bwd(const float* __restrict__ x, const float* __restrict__ dy,
                                           float* __restrict__ dx, unsigned long long n) {
  for (unsigned long long i = (unsigned long long)blockIdx.x * blockDim.x + threadIdx.x; i < n;
       i += (unsigned long long)gridDim.x * blockDim.x) {
    float v = x[i];
    float cdf = 0.5f * (1.0f + erff(v * SNELLA_INV_SQRT2));
    float pdf = SNELLA_INV_SQRT_2PI * expf(-0.5f * v * v);
    dx[i] = dy[i] * (cdf + v * pdf);
  }
}
