// Shared helpers of snella's kernels (included by every .cu file; device code only).
#pragma once
#include <cuda_runtime.h>
#include <stdint.h>

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
