// The allocator's per-element importance and uncertainty EMAs (spec §5), f32. No backward (the
// allocator is not differentiated). CPU reference: snella_core::snella::importance::importance_update.
// Each operation uses the round-to-nearest intrinsics (no FMA contraction), so the EMAs equal the
// CPU's bit for bit.
#include "common.cuh"

// For i < n: I = |p·g| (0 when not finite, counted in *bad); ibar = b1·ibar + c1·I;
// ubar = b2·ubar + c2·|I − ibar| (the fresh ibar). `bad` is an f32 counter (exact below 2^24,
// integer adds in any order give the same sum). Grid-stride.
extern "C" __global__ void snella_importance_update(const float* __restrict__ p, const float* __restrict__ g,
                                                    float* __restrict__ ibar, float* __restrict__ ubar,
                                                    unsigned long long n, float b1, float c1, float b2, float c2,
                                                    float* __restrict__ bad) {
  unsigned nbad = 0;
  for (unsigned long long i = (unsigned long long)blockIdx.x * blockDim.x + threadIdx.x; i < n;
       i += (unsigned long long)gridDim.x * blockDim.x) {
    float imp = fabsf(__fmul_rn(p[i], g[i]));
    if (!isfinite(imp)) {
      imp = 0.f;
      nbad++;
    }
    const float ib = __fadd_rn(__fmul_rn(b1, ibar[i]), __fmul_rn(c1, imp));
    ibar[i] = ib;
    ubar[i] = __fadd_rn(__fmul_rn(b2, ubar[i]), __fmul_rn(c2, fabsf(__fsub_rn(imp, ib))));
  }
  nbad = __reduce_add_sync(0xffffffffu, nbad);
  if ((threadIdx.x & 31) == 0 && nbad) atomicAdd(bad, (float)nbad);
}
