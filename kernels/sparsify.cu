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

// The rule factor: snella_sparsify_factor (common.cuh, shared with merge.cu's fused backward rows).

// Grid-stride over n entries (n < 2^32), 256 threads. Forward: src = m; backward: src = g.
extern "C" __global__ void __launch_bounds__(256)
    snella_sparsify_apply(const float* __restrict__ m, const float* __restrict__ src, float* __restrict__ out,
                          unsigned long long n, const unsigned* __restrict__ kept, unsigned rule) {
  const unsigned thr = kept[0], cut = kept[1];
  const float tau = __uint_as_float(kept[2]);
  const unsigned long long stride = (unsigned long long)gridDim.x * blockDim.x;
  for (unsigned long long i = (unsigned long long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride) {
    out[i] = __fmul_rn(src[i], snella_sparsify_factor(fabsf(m[i]), i, thr, cut, tau, rule));
  }
}

// Fused forward into the effective weight (spec §2 + the linear's W0 + ΔWᵀ): for M [n_in, c]
// (one adapter's merged matrix, row-major) and the chunk's rows of W0 [c, n_in],
//   w[o, i] = w0[o, i] + M[i, o]·factor(M[i, o]),
// i.e. sparsify, transpose and add in one pass (ΔW is never written). Grid (ceil(c/32),
// ceil(n_in/32)), block (32, 8), a 32×33 shared tile. Same f32 operations as sparsify_apply
// followed by the accumulating transpose, so bit-identical to that composition; T = bf16 writes
// that f32 result rounded (the bf16 step's weight without an f32 copy and a conversion pass).
template <bool W0, typename T>
__device__ __forceinline__ void sparsify_into_weight(const float* __restrict__ m, const float* __restrict__ w0, T* __restrict__ w,
                                unsigned n_in, unsigned c, const unsigned* __restrict__ kept, unsigned rule) {
  __shared__ float tile[32][33];
  const unsigned thr = kept[0], cut = kept[1];
  const float tau = __uint_as_float(kept[2]);
  const unsigned o0 = blockIdx.x * 32, i0 = blockIdx.y * 32;
#pragma unroll
  for (unsigned q = 0; q < 4; q++) {  // block (32, 8): rows threadIdx.y + 8q, loads all in flight
    const unsigned dy = threadIdx.y + 8 * q;
    const unsigned i = i0 + dy, o = o0 + threadIdx.x;
    if (i < n_in && o < c) {
      const unsigned long long idx = (unsigned long long)i * c + o;
      const float v = m[idx];
      tile[dy][threadIdx.x] = __fmul_rn(v, snella_sparsify_factor(fabsf(v), idx, thr, cut, tau, rule));
    }
  }
  __syncthreads();
#pragma unroll
  for (unsigned q = 0; q < 4; q++) {  // block (32, 8): rows threadIdx.y + 8q, loads all in flight
    const unsigned dy = threadIdx.y + 8 * q;
    const unsigned o = o0 + dy, i = i0 + threadIdx.x;
    if (i < n_in && o < c) {
      const size_t at = (size_t)o * n_in + i;
      snella_store(w + at, __fadd_rn(W0 ? w0[at] : 0.f, tile[threadIdx.x][dy]));
    }
  }
}

extern "C" __global__ void __launch_bounds__(256)
    snella_sparsify_into_weight(const float* __restrict__ m, const float* __restrict__ w0, float* __restrict__ w,
                                unsigned n_in, unsigned c, const unsigned* __restrict__ kept, unsigned rule) {
  sparsify_into_weight<true>(m, w0, w, n_in, c, kept, rule);
}
// The same writing a bf16 weight (session 8).
extern "C" __global__ void __launch_bounds__(256)
    snella_sparsify_into_weight_bf16(const float* __restrict__ m, const float* __restrict__ w0, __nv_bfloat16* __restrict__ w,
                                     unsigned n_in, unsigned c, const unsigned* __restrict__ kept, unsigned rule) {
  sparsify_into_weight<true>(m, w0, w, n_in, c, kept, rule);
}
// The bf16 form for adapter blockIdx.z of a job table (common.cuh SnellaFwdJob: its M, kept set,
// rule, W0 chunk and weight chunk; one n_in, c for all), session 10.
extern "C" __global__ void __launch_bounds__(256)
    snella_sparsify_into_weight_bf16_batch(const SnellaFwdJob* __restrict__ jobs, unsigned n_in, unsigned c) {
  const SnellaFwdJob& jb = jobs[blockIdx.z];
  sparsify_into_weight<true>(jb.M, jb.w0, jb.w, n_in, c, jb.st, jb.rule);
}
// The same without W0 (w0 unused): the chunk's ΔWᵀ alone, as 0 + ΔWᵀ (a −0 entry becomes +0, as
// the composition onto zeros gives): what a bf16 step multiplies next to W0.
extern "C" __global__ void __launch_bounds__(256)
    snella_sparsify_into_weight_nw0(const float* __restrict__ m, const float* __restrict__ w0, float* __restrict__ w,
                                    unsigned n_in, unsigned c, const unsigned* __restrict__ kept, unsigned rule) {
  sparsify_into_weight<false>(m, w0, w, n_in, c, kept, rule);
}

// Fused backward from the weight gradient (spec §3): for Gᵀ = ∂L/∂W of the chunk [c, n_in]
// (row-major, the layer's weight-gradient layout) and M [n_in, c],
//   gh[i, o] = Gᵀ[o, i]·factor(M[i, o]),
// i.e. transpose and sparsify backward in one pass. Grid (ceil(n_in/32), ceil(c/32)), block (32, 8).
// Bit-identical to the transpose followed by sparsify_apply.
extern "C" __global__ void __launch_bounds__(256)
    snella_sparsify_bwd_from_weight(const float* __restrict__ gt, const float* __restrict__ m, float* __restrict__ gh,
                                    unsigned n_in, unsigned c, const unsigned* __restrict__ kept, unsigned rule) {
  __shared__ float tile[32][33];
  const unsigned thr = kept[0], cut = kept[1];
  const float tau = __uint_as_float(kept[2]);
  const unsigned i0 = blockIdx.x * 32, o0 = blockIdx.y * 32;
#pragma unroll
  for (unsigned q = 0; q < 4; q++) {  // block (32, 8): rows threadIdx.y + 8q, loads all in flight
    const unsigned dy = threadIdx.y + 8 * q;
    const unsigned o = o0 + dy, i = i0 + threadIdx.x;
    if (i < n_in && o < c) tile[dy][threadIdx.x] = gt[(size_t)o * n_in + i];
  }
  __syncthreads();
#pragma unroll
  for (unsigned q = 0; q < 4; q++) {  // block (32, 8): rows threadIdx.y + 8q, loads all in flight
    const unsigned dy = threadIdx.y + 8 * q;
    const unsigned i = i0 + dy, o = o0 + threadIdx.x;
    if (i < n_in && o < c) {
      const unsigned long long idx = (unsigned long long)i * c + o;
      gh[idx] = __fmul_rn(tile[threadIdx.x][dy], snella_sparsify_factor(fabsf(m[idx]), idx, thr, cut, tau, rule));
    }
  }
}
