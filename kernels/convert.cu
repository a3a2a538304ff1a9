// f32 → bf16 conversion for the bf16 GEMM path (cuBLAS with bf16 operands and f32 accumulation,
// as PyTorch's autocast casts a matmul's inputs). No backward: the products' gradients are
// computed by further bf16 products of the f32 gradients, each converted here.
// CPU reference: half::bf16::from_f32 (round to nearest even), see crates/snella-cuda/tests.
#include "common.cuh"
#include <cuda_bf16.h>

// dst[i] = bf16(src[i]) (round to nearest even; NaN stays NaN) for i < n. Four values per
// thread when both pointers are suitably aligned, grid-stride.
extern "C" __global__ void __launch_bounds__(256)
    snella_f32_to_bf16(const float* __restrict__ src, __nv_bfloat16* __restrict__ dst, unsigned long long n) {
  const unsigned long long stride = (unsigned long long)gridDim.x * blockDim.x;
  const unsigned long long tid = (unsigned long long)blockIdx.x * blockDim.x + threadIdx.x;
  const bool vec = ((reinterpret_cast<uintptr_t>(src) & 15) == 0) && ((reinterpret_cast<uintptr_t>(dst) & 7) == 0);
  if (vec) {
    const unsigned long long n4 = n / 4;
    for (unsigned long long i = tid; i < n4; i += stride) {
      const float4 v = reinterpret_cast<const float4*>(src)[i];
      __nv_bfloat162 lo = __floats2bfloat162_rn(v.x, v.y), hi = __floats2bfloat162_rn(v.z, v.w);
      reinterpret_cast<__nv_bfloat162*>(dst)[2 * i] = lo;
      reinterpret_cast<__nv_bfloat162*>(dst)[2 * i + 1] = hi;
    }
    for (unsigned long long i = n4 * 4 + tid; i < n; i += stride) dst[i] = __float2bfloat16_rn(src[i]);
  } else {
    for (unsigned long long i = tid; i < n; i += stride) dst[i] = __float2bfloat16_rn(src[i]);
  }
}
