// The allocator's per-element importance and uncertainty EMAs (spec §5), f32. No backward (the
// allocator is not differentiated). CPU reference: snella_core::snella::importance::importance_update.
// Each operation uses the round-to-nearest intrinsics (no FMA contraction), so the EMAs equal the
// CPU's bit for bit.
#include "common.cuh"

// For i < n: I = |p·g| (0 when not finite, counted in *bad); ibar = b1·ibar + c1·I;
// ubar = b2·ubar + c2·|I − ibar| (the fresh ibar). `bad` is an f32 counter (exact below 2^24,
// integer adds in any order give the same sum). Grid-stride.
namespace snella_importance {
// The update over this thread's grid-stride share of one tensor; adds its non-finite count to *bad.
__device__ __forceinline__ void update(const float* __restrict__ p, const float* __restrict__ g, float* __restrict__ ibar,
                                       float* __restrict__ ubar, unsigned long long n, float b1, float c1, float b2,
                                       float c2, float* __restrict__ bad) {
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
}  // namespace snella_importance

extern "C" __global__ void snella_importance_update(const float* __restrict__ p, const float* __restrict__ g,
                                                    float* __restrict__ ibar, float* __restrict__ ubar,
                                                    unsigned long long n, float b1, float c1, float b2, float c2,
                                                    float* __restrict__ bad) {
  snella_importance::update(p, g, ibar, ubar, n, b1, c1, b2, c2, bad);
}

// The same update over many tensors in one launch: table holds 6 u64 per tensor (p, g, ibar, ubar,
// n, counter slot); tensor t is handled by the blocks with blockIdx.y ≡ t (mod gridDim.y), its
// non-finite count added to bad[slot]. Each element gets the single-tensor kernel's arithmetic.
extern "C" __global__ void snella_importance_update_multi(const unsigned long long* __restrict__ table, unsigned count,
                                                          float b1, float c1, float b2, float c2, float* __restrict__ bad) {
  for (unsigned t = blockIdx.y; t < count; t += gridDim.y) {
    const unsigned long long* e = table + 6 * t;
    snella_importance::update(reinterpret_cast<const float*>(e[0]), reinterpret_cast<const float*>(e[1]),
                              reinterpret_cast<float*>(e[2]), reinterpret_cast<float*>(e[3]), e[4], b1, c1, b2, c2,
                              bad + e[5]);
  }
}
