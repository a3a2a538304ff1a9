// Sparsify rules (spec §2) and their backward (spec §3), element-wise, reading the kept-set words
// written by topk.cu ([0] threshold bits, [1] tie_cut, [2] tau bits) from device memory.
// CPU reference: snella_core::snella::sparsify (sparsify_fwd / sparsify_bwd), bit for bit.
//
// out[i] = src[i] · factor_i, with the stop-gradient factor of the rule computed from m:
//   rule 0 magnitude-product: |m|·1_S     (forward src = m: ΔW = M⊙|M|⊙1_S; backward src = g)
//   rule 1 soft-threshold:    max(|m| − τ, 0)
//   rule 2 mask:              1_S
// i ∈ S ⇔ key(|m_i|) > key(threshold), or == and i < tie_cut (key: f32 bits of |x| when |x| > 0, else 0,
// as in topk.cu: NaN never beats a positive threshold).
#include "common.cuh"

namespace snella_sparsify {
__device__ __forceinline__ unsigned key(float a) { return a > 0.f ? __float_as_uint(a) : 0u; }
}  // namespace snella_sparsify

// Grid-stride over n entries (n < 2^32), 256 threads. Forward: src = m; backward: src = g.
extern "C" __global__ void __launch_bounds__(256)
    snella_sparsify_apply(const float* __restrict__ m, const float* __restrict__ src, float* __restrict__ out,
                          unsigned long long n, const unsigned* __restrict__ kept, unsigned rule) {
  const unsigned thr = kept[0], cut = kept[1];
  const float tau = __uint_as_float(kept[2]);
  const unsigned long long stride = (unsigned long long)gridDim.x * blockDim.x;
  for (unsigned long long i = (unsigned long long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride) {
    const float a = fabsf(m[i]);
    float f;
    if (rule == 1) {
      const float d = __fsub_rn(a, tau);
      f = d > 0.f ? d : 0.f;
    } else {
      const unsigned kk = snella_sparsify::key(a);
      const bool keep = kk > thr || (kk == thr && i < (unsigned long long)cut);
      f = keep ? (rule == 0 ? a : 1.f) : 0.f;
    }
    out[i] = __fmul_rn(src[i], f);
  }
}
