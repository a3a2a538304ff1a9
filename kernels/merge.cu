// Kernelized merge of SNELL/SNELLA (spec §1) and its fused backward (spec §3).
// CPU reference: snella_core::snella::merge (merge_fwd / merge_bwd).
//
// Layouts (row-major f32): A [H, in, rh], B [H, out, rh], M and Ĝ [in, out], mixture [α, γ, β]
// (a null pointer means SNELL: M = K). c_h = 0.1·(−1)^h, γ clamped to ≥ 1e-4.
//
// Forward (snella_merge_fwd_r{1,2,4,8}): one block of 256 threads per R rows (R chosen by the launcher
// so the grid fills the GPU); the A rows of the block sit in shared memory, each thread walks the
// columns j = tid, tid + 256, … and forms K for the R rows from one pass over B[h, j, :]. With the
// mixture, K is written to M (the only [in, out] buffer), the row max of K/γ and then the row sum of
// exp(K/γ − max) are block-reduced, and a last sweep rewrites M = K + α·P + β. D_h and K are computed
// with explicitly rounded mul/add (no FMA contraction) in the CPU's order, so they carry the CPU's
// bits; only expf and the softmax sum order differ.
//
// Backward, recomputing D, K and P (no stored M), launched by crates/snella-cuda/src/ops/merge.rs:
//   1. snella_merge_bwd_rowstats_r{1,2,4,8} (mixture only): per row i, in one pass over j with an
//      online (rescaled) softmax: max_j K/γ, S = Σ_j exp(K/γ − max), s_i = Σ_j Ĝ·P, Σ_j Ĝ → rowstat [in, 4].
//   2. snella_merge_bwd_e: one 32×32 tile per block recomputes D_h, K, P, ∂L/∂K and writes
//      E_h = c_h·∂L/∂K ⊘ D_h to E [H, in, out] (f32 scratch), with the tile's Σ P⊙(Ĝ − s)⊙K (∂γ).
//   3. (cuBLAS, strict f32) E_h·[B_h | 1] and E_hᵀ·[A_h | 1] (snella_merge_pad_ones adds the ones
//      columns, which yield the row and column sums of E_h).
//   4. snella_merge_bwd_finish: dX = X·Σ part[.., rh] − Σ part[.., r] for dA and dB, and in its last
//      block (∂α, ∂γ, ∂β) from rowstat and the ∂γ partials in f64.
// Every reduction has one fixed order (no float atomics; cuBLAS GEMMs are deterministic): results
// are bit-identical run to run.
#include "common.cuh"

namespace snella_merge {
constexpr int THREADS = 256;          // every kernel here except the mixture reduce (also 256)
constexpr int NWARPS = THREADS / 32;
constexpr int TI = 32;                // backward tile: rows
constexpr int TJ = 32;                // backward tile: columns (one per lane)
constexpr int ES = TJ + 1;            // row stride of the E tile in shared memory

__device__ __forceinline__ float coeff(unsigned h) { return (h & 1u) ? -0.1f : 0.1f; }

// max(γ, 1e-4) with NaN propagating, as the CPU's clamp_gamma.
__device__ __forceinline__ float clamp_gamma(float g) { return g < 1e-4f ? 1e-4f : g; }

// K[i0 + q, j] for q < R from the A rows in shared memory (sa: [R][H][rh]) and B[h, j, :] in global
// memory. Same arithmetic and order as the CPU's row_kernel: d = Σ_r (a − b)², D = √d, K = Σ_h c_h·D.
// With dsave (not null), D_h[i0 + q, j] is also stored to dsave[h, i0 + q, j] ([H, n_in, n_out]) for
// the rows i0 + q < n_in: the backward's saved distances.
template <int R>
__device__ __forceinline__ void k_col(const float* sa, const float* __restrict__ B, unsigned H, unsigned n_out,
                                      unsigned rh, unsigned j, float (&k)[R], float* __restrict__ dsave = nullptr,
                                      unsigned i0 = 0, unsigned n_in = 0) {
  const unsigned hr = H * rh;
#pragma unroll
  for (int q = 0; q < R; q++) k[q] = 0.f;
  for (unsigned h = 0; h < H; h++) {
    float d2[R];
#pragma unroll
    for (int q = 0; q < R; q++) d2[q] = 0.f;
    const float* bp = B + ((size_t)h * n_out + j) * rh;
    const float* ap = sa + h * rh;
    if ((rh & 3u) == 0u && (reinterpret_cast<uintptr_t>(B) & 15u) == 0u) {
      // 16-byte loads of this column's B row (when B starts 16-byte aligned; rows are 4k floats), so
      // a warp's loads use whole sectors; same r order, so the same bits.
      const float4* bp4 = reinterpret_cast<const float4*>(bp);
      for (unsigned r4 = 0; r4 < rh / 4; r4++) {
        const float4 b4 = __ldg(bp4 + r4);
        const float bb[4] = {b4.x, b4.y, b4.z, b4.w};
#pragma unroll
        for (int u = 0; u < 4; u++) {
#pragma unroll
          for (int q = 0; q < R; q++) {
            const float t = __fsub_rn(ap[q * hr + 4 * r4 + u], bb[u]);
            d2[q] = __fadd_rn(d2[q], __fmul_rn(t, t));
          }
        }
      }
    } else {
      for (unsigned r = 0; r < rh; r++) {
        const float b = __ldg(bp + r);
#pragma unroll
        for (int q = 0; q < R; q++) {
          const float t = __fsub_rn(ap[q * hr + r], b);
          d2[q] = __fadd_rn(d2[q], __fmul_rn(t, t));
        }
      }
    }
    const float c = coeff(h);
#pragma unroll
    for (int q = 0; q < R; q++) {
      const float d = __fsqrt_rn(d2[q]);
      if (dsave != nullptr && i0 + q < n_in) dsave[((size_t)h * n_in + i0 + q) * n_out + j] = d;
      k[q] = __fadd_rn(k[q], __fmul_rn(c, d));
    }
  }
}

// Block-wide reduction of R values per thread (sum or max), in a fixed order; every thread gets the
// results in out[R] (shared). red: [NWARPS][R] shared scratch.
template <int R, bool MAX>
__device__ __forceinline__ void block_reduce(float (&v)[R], float (*red)[R], float* out) {
  const unsigned lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
#pragma unroll
  for (int q = 0; q < R; q++) {
    float x = v[q];
    for (int o = 16; o > 0; o >>= 1) {
      const float y = __shfl_xor_sync(0xffffffffu, x, o);
      x = MAX ? fmaxf(x, y) : x + y;
    }
    v[q] = x;
  }
  if (lane == 0) {
#pragma unroll
    for (int q = 0; q < R; q++) red[warp][q] = v[q];
  }
  __syncthreads();
  if (threadIdx.x < R) {
    float x = red[0][threadIdx.x];
    for (int w = 1; w < NWARPS; w++) x = MAX ? fmaxf(x, red[w][threadIdx.x]) : x + red[w][threadIdx.x];
    out[threadIdx.x] = x;
  }
  __syncthreads();
}

// Loads the A rows i0 .. i0 + R − 1 (zeros past n_in) into sa [R][H][rh].
template <int R>
__device__ __forceinline__ void load_rows(float* sa, const float* __restrict__ A, unsigned H, unsigned n_in, unsigned rh,
                                          unsigned i0) {
  const unsigned hr = H * rh;
  for (unsigned t = threadIdx.x; t < R * hr; t += blockDim.x) {
    const unsigned q = t / hr, rem = t % hr, h = rem / rh, r = rem % rh, i = i0 + q;
    sa[t] = i < n_in ? A[((size_t)h * n_in + i) * rh + r] : 0.f;
  }
}

// One 32×32 tile of the backward: E_h[i0 + ii, j0 + jj] into es [H][TI][ES], from the A tile
// as [H][TI][rs] and the B tile bs [H][TJ][rs] in shared memory (rs: odd row stride ≥ rh). Thread
// (warp w, lane l) handles jj = l and ii = w + 8q, q < 4. Entries outside [n_in, n_out] get E = 0.
// Returns this thread's share of Σ P⊙(Ĝ − s)⊙K (0 without the mixture). Mirrors the CPU's bwd_chunk:
// pm = P·(Ĝ − s), ∂L/∂K = Ĝ + (α/γ)·pm, E = (c_h·∂L/∂K)/D (0 where D = 0).
__device__ __forceinline__ float e_tile(const float* as, const float* bs, float* es, const float* __restrict__ G,
                                        const float* __restrict__ rowstat, unsigned i0, unsigned j0, unsigned n_in,
                                        unsigned n_out, unsigned H, unsigned rh, unsigned rs, bool mix, float alpha,
                                        float g) {
  const unsigned jj = threadIdx.x & 31, w = threadIdx.x >> 5;
  float kk[4] = {0.f, 0.f, 0.f, 0.f};
  for (unsigned h = 0; h < H; h++) {
    float d2[4] = {0.f, 0.f, 0.f, 0.f};
    const float* bp = bs + (h * TJ + jj) * rs;
    const float* ap = as + (h * TI + w) * rs;
    for (unsigned r = 0; r < rh; r++) {
      const float b = bp[r];
#pragma unroll
      for (int q = 0; q < 4; q++) {
        const float t = __fsub_rn(ap[q * 8 * rs + r], b);
        d2[q] = __fadd_rn(d2[q], __fmul_rn(t, t));
      }
    }
    const float c = coeff(h);
#pragma unroll
    for (int q = 0; q < 4; q++) {
      const float d = __fsqrt_rn(d2[q]);
      es[(h * TI + w + 8 * q) * ES + jj] = d;
      kk[q] = __fadd_rn(kk[q], __fmul_rn(c, d));
    }
  }
  const float ag = mix ? __fdiv_rn(alpha, g) : 0.f;
  float gam = 0.f;
#pragma unroll
  for (int q = 0; q < 4; q++) {
    const unsigned ii = w + 8 * q, i = i0 + ii, j = j0 + jj;
    const bool valid = i < n_in && j < n_out;
    const float gv = valid ? G[(size_t)i * n_out + j] : 0.f;
    float dk = gv;
    if (mix && valid) {
      const float zmax = rowstat[4 * i], s_exp = rowstat[4 * i + 1], s = rowstat[4 * i + 2];
      const float p = __fdiv_rn(expf(__fsub_rn(__fdiv_rn(kk[q], g), zmax)), s_exp);
      const float pm = __fmul_rn(p, __fsub_rn(gv, s));
      dk = __fadd_rn(gv, __fmul_rn(ag, pm));
      gam = fmaf(pm, kk[q], gam);
    }
    for (unsigned h = 0; h < H; h++) {
      float* e = es + (h * TI + ii) * ES + jj;
      const float d = *e;
      *e = (valid && d != 0.f) ? __fdiv_rn(__fmul_rn(coeff(h), dk), d) : 0.f;
    }
  }
  return gam;
}

// Loads tile rows x0 .. x0 + 31 of X [H, rows, rh] into dst [H][32][rs] (zeros past `rows`).
__device__ __forceinline__ void load_tile(float* dst, const float* __restrict__ X, unsigned H, unsigned rows, unsigned rh,
                                          unsigned rs, unsigned x0) {
  const unsigned per = 32 * rh;
  for (unsigned t = threadIdx.x; t < H * per; t += blockDim.x) {
    const unsigned h = t / per, rem = t % per, x = rem / rh, r = rem % rh, row = x0 + x;
    dst[(h * 32 + x) * rs + r] = row < rows ? X[((size_t)h * rows + row) * rh + r] : 0.f;
  }
}


// Forward body for R rows per block (see snella_merge_fwd_r*). Dynamic shared memory R·H·rh floats.
template <int R>
__device__ __forceinline__ void fwd_body(const float* __restrict__ A, const float* __restrict__ B, unsigned H,
                                         unsigned n_in, unsigned n_out, unsigned rh, const float* __restrict__ mix,
                                         float* __restrict__ M, float* sa, float* __restrict__ ksave,
                                         float* __restrict__ dsave) {
  __shared__ float red[NWARPS][R];
  __shared__ float zmax[R], ssum[R];
  const unsigned i0 = blockIdx.x * R;
  load_rows<R>(sa, A, H, n_in, rh, i0);
  __syncthreads();
  float g = 1.f;
  if (mix) g = clamp_gamma(mix[1]);
  float v[R];
#pragma unroll
  for (int q = 0; q < R; q++) v[q] = -INFINITY;
  for (unsigned j = threadIdx.x; j < n_out; j += blockDim.x) {
    float k[R];
    k_col<R>(sa, B, H, n_out, rh, j, k, dsave, i0, n_in);
#pragma unroll
    for (int q = 0; q < R; q++) {
      if (i0 + q < n_in) {
        M[(size_t)(i0 + q) * n_out + j] = k[q];
        if (ksave != nullptr) ksave[(size_t)(i0 + q) * n_out + j] = k[q];
        if (mix) v[q] = fmaxf(v[q], __fdiv_rn(k[q], g));
      }
    }
  }
  if (!mix) return;
  const float alpha = mix[0], beta = mix[2];
  block_reduce<R, true>(v, red, zmax);
  // Each thread re-reads only the K values it wrote itself (same thread, program order).
#pragma unroll
  for (int q = 0; q < R; q++) v[q] = 0.f;
  for (unsigned j = threadIdx.x; j < n_out; j += blockDim.x) {
#pragma unroll
    for (int q = 0; q < R; q++)
      if (i0 + q < n_in) v[q] += expf(__fsub_rn(__fdiv_rn(M[(size_t)(i0 + q) * n_out + j], g), zmax[q]));
  }
  block_reduce<R, false>(v, red, ssum);
  for (unsigned j = threadIdx.x; j < n_out; j += blockDim.x) {
#pragma unroll
    for (int q = 0; q < R; q++) {
      if (i0 + q < n_in) {
        float* mp = M + (size_t)(i0 + q) * n_out + j;
        const float k = *mp;
        const float p = __fdiv_rn(expf(__fsub_rn(__fdiv_rn(k, g), zmax[q])), ssum[q]);
        *mp = __fadd_rn(__fadd_rn(k, __fmul_rn(alpha, p)), beta);
      }
    }
  }
}

// Online-softmax state of one row: running max z, Σ exp(z − max), Σ Ĝ·exp(z − max).
struct Soft {
  float m, s, t;
};

// Merges two online-softmax states (an empty state has m = −∞ and s = t = 0).
__device__ __forceinline__ Soft soft_merge(Soft a, Soft b) {
  if (a.m == -INFINITY) return b;
  if (b.m == -INFINITY) return a;
  const float m = fmaxf(a.m, b.m);
  const float fa = expf(a.m - m), fb = expf(b.m - m);
  return Soft{m, a.s * fa + b.s * fb, a.t * fa + b.t * fb};
}

// Row-statistics body for R rows per block (see snella_merge_bwd_rowstats_r*).
template <int R>
__device__ __forceinline__ void rowstats_body(const float* __restrict__ A, const float* __restrict__ B, unsigned H,
                                              unsigned n_in, unsigned n_out, unsigned rh,
                                              const float* __restrict__ mix, const float* __restrict__ G,
                                              float* __restrict__ rowstat, float* sa) {
  __shared__ Soft red[NWARPS][R];
  __shared__ float redu[NWARPS][R];
  const unsigned i0 = blockIdx.x * R;
  load_rows<R>(sa, A, H, n_in, rh, i0);
  __syncthreads();
  const float g = clamp_gamma(mix[1]);
  Soft st[R];
  float u[R];
#pragma unroll
  for (int q = 0; q < R; q++) {
    st[q] = Soft{-INFINITY, 0.f, 0.f};
    u[q] = 0.f;
  }
  for (unsigned j = threadIdx.x; j < n_out; j += blockDim.x) {
    float k[R];
    k_col<R>(sa, B, H, n_out, rh, j, k);
#pragma unroll
    for (int q = 0; q < R; q++) {
      if (i0 + q < n_in) {
        const float z = __fdiv_rn(k[q], g);
        const float gv = G[(size_t)(i0 + q) * n_out + j];
        if (z > st[q].m) {
          const float f = st[q].m == -INFINITY ? 0.f : expf(st[q].m - z);
          st[q] = Soft{z, fmaf(st[q].s, f, 1.f), fmaf(st[q].t, f, gv)};
        } else {
          const float e = expf(z - st[q].m);
          st[q].s += e;
          st[q].t = fmaf(gv, e, st[q].t);
        }
        u[q] += gv;
      }
    }
  }
  const unsigned lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
#pragma unroll
  for (int q = 0; q < R; q++) {
    for (int o = 16; o > 0; o >>= 1) {
      const Soft other{__shfl_xor_sync(0xffffffffu, st[q].m, o), __shfl_xor_sync(0xffffffffu, st[q].s, o),
                       __shfl_xor_sync(0xffffffffu, st[q].t, o)};
      st[q] = soft_merge(st[q], other);
      u[q] += __shfl_xor_sync(0xffffffffu, u[q], o);
    }
    if (lane == 0) {
      red[warp][q] = st[q];
      redu[warp][q] = u[q];
    }
  }
  __syncthreads();
  if (threadIdx.x < R && i0 + threadIdx.x < n_in) {
    const unsigned q = threadIdx.x;
    Soft x = red[0][q];
    float uu = redu[0][q];
    for (int w = 1; w < NWARPS; w++) {
      x = soft_merge(x, red[w][q]);
      uu += redu[w][q];
    }
    float* o = rowstat + 4 * (size_t)(i0 + q);
    o[0] = x.m;
    o[1] = x.s;
    o[2] = __fdiv_rn(x.t, x.s);
    o[3] = uu;
  }
}

}  // namespace snella_merge

// Forward (spec §1): M [n_in, n_out] from A, B and the optional mixture (null: SNELL, M = K), R rows
// per block; with ksave / dsave (not null; the backward-time merge) K [n_in, n_out] and the distances
// D [H, n_in, n_out] are saved too, for snella_merge_bwd_rowstats_saved / snella_merge_bwd_e_saved. Grid: ceil(n_in / R) blocks of 256 threads; dynamic shared memory R·H·rh floats.
#define SNELLA_MERGE_FWD(R)                                                                                        \
  extern "C" __global__ void __launch_bounds__(256) snella_merge_fwd_r##R(                                          \
      const float* __restrict__ A, const float* __restrict__ B, unsigned H, unsigned n_in, unsigned n_out,         \
      unsigned rh, const float* __restrict__ mix, float* __restrict__ M, float* __restrict__ ksave,                 \
      float* __restrict__ dsave) {                                                                                 \
    extern __shared__ float snella_merge_fwd_sa_##R[];                                                             \
    snella_merge::fwd_body<R>(A, B, H, n_in, n_out, rh, mix, M, snella_merge_fwd_sa_##R, ksave, dsave);            \
  }
SNELLA_MERGE_FWD(1)
SNELLA_MERGE_FWD(2)
SNELLA_MERGE_FWD(4)
SNELLA_MERGE_FWD(8)
#undef SNELLA_MERGE_FWD

// Backward step 1 (mixture only): rowstat[i] = (max_j K/γ, Σ_j exp(K/γ − max), s_i = Σ_j Ĝ·P, Σ_j Ĝ),
// R rows per block. Grid: ceil(n_in / R) blocks of 256; dynamic shared memory R·H·rh floats.
#define SNELLA_MERGE_ROWSTATS(R)                                                                                   \
  extern "C" __global__ void __launch_bounds__(256) snella_merge_bwd_rowstats_r##R(                                 \
      const float* __restrict__ A, const float* __restrict__ B, unsigned H, unsigned n_in, unsigned n_out,         \
      unsigned rh, const float* __restrict__ mix, const float* __restrict__ G, float* __restrict__ rowstat) {      \
    extern __shared__ float snella_merge_rs_sa_##R[];                                                              \
    snella_merge::rowstats_body<R>(A, B, H, n_in, n_out, rh, mix, G, rowstat, snella_merge_rs_sa_##R);             \
  }
SNELLA_MERGE_ROWSTATS(1)
SNELLA_MERGE_ROWSTATS(2)
SNELLA_MERGE_ROWSTATS(4)
SNELLA_MERGE_ROWSTATS(8)
#undef SNELLA_MERGE_ROWSTATS

// Backward step 2: one 32×32 tile per block (grid (n_jt, n_it)): E_h[i, j] (e_tile) into
// E [H, n_in, n_out], and the block's share of Σ P⊙(Ĝ − s)⊙K (∂γ) into
// gpart[blockIdx.y·gridDim.x + blockIdx.x]. The sums over j and over i of E·B and Eᵀ·A are then two
// f32 GEMMs. Dynamic shared memory: (2·H·32·rs + H·32·33) floats, rs = rh | 1.
extern "C" __global__ void __launch_bounds__(256)
    snella_merge_bwd_e(const float* __restrict__ A, const float* __restrict__ B, unsigned H, unsigned n_in,
                       unsigned n_out, unsigned rh, const float* __restrict__ mix, const float* __restrict__ G,
                       const float* __restrict__ rowstat, float* __restrict__ E, float* __restrict__ gpart) {
  using namespace snella_merge;
  extern __shared__ float snella_merge_e_sh[];
  __shared__ float red[NWARPS][1];
  __shared__ float gsum[1];
  const bool has_mix = mix != nullptr;
  const float alpha = has_mix ? mix[0] : 0.f, g = has_mix ? clamp_gamma(mix[1]) : 1.f;
  const unsigned rs = rh | 1u;
  float* as = snella_merge_e_sh;
  float* bs = as + H * TI * rs;
  float* es = bs + H * TJ * rs;
  const unsigned i0 = blockIdx.y * TI, j0 = blockIdx.x * TJ;
  load_tile(as, A, H, n_in, rh, rs, i0);
  load_tile(bs, B, H, n_out, rh, rs, j0);
  __syncthreads();
  float gv[1] = {e_tile(as, bs, es, G, rowstat, i0, j0, n_in, n_out, H, rh, rs, has_mix, alpha, g)};
  // each thread writes the entries it computed (jj = lane, ii = warp + 8q): rows of 32 coalesced
  const unsigned jj = threadIdx.x & 31, w = threadIdx.x >> 5, j = j0 + jj;
  for (unsigned h = 0; h < H; h++)
#pragma unroll
    for (int q = 0; q < 4; q++) {
      const unsigned ii = w + 8 * q, i = i0 + ii;
      if (i < n_in && j < n_out) E[((size_t)h * n_in + i) * n_out + j] = es[(h * TI + ii) * ES + jj];
    }
  block_reduce<1, false>(gv, red, gsum);
  if (threadIdx.x == 0) gpart[(size_t)blockIdx.y * gridDim.x + blockIdx.x] = gsum[0];
}

// Backward step 1 from the saved K (mixture only): rowstat[i] as snella_merge_bwd_rowstats_r*, one
// block of 256 threads per row (the same online-softmax updates and merge tree of the threads'
// partial states). Grid n_in.
extern "C" __global__ void __launch_bounds__(256)
    snella_merge_bwd_rowstats_saved(const float* __restrict__ K, unsigned n_in, unsigned n_out,
                                    const float* __restrict__ mix, const float* __restrict__ G,
                                    float* __restrict__ rowstat) {
  using namespace snella_merge;
  __shared__ Soft red[NWARPS];
  __shared__ float redu[NWARPS];
  const unsigned i = blockIdx.x, lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const float g = clamp_gamma(mix[1]);
  Soft st{-INFINITY, 0.f, 0.f};
  float u = 0.f;
  for (unsigned j = threadIdx.x; j < n_out; j += blockDim.x) {
    const float z = __fdiv_rn(K[(size_t)i * n_out + j], g);
    const float gv = G[(size_t)i * n_out + j];
    if (z > st.m) {
      const float f = st.m == -INFINITY ? 0.f : expf(st.m - z);
      st = Soft{z, fmaf(st.s, f, 1.f), fmaf(st.t, f, gv)};
    } else {
      const float e = expf(z - st.m);
      st.s += e;
      st.t = fmaf(gv, e, st.t);
    }
    u += gv;
  }
  for (int o = 16; o > 0; o >>= 1) {
    const Soft other{__shfl_xor_sync(0xffffffffu, st.m, o), __shfl_xor_sync(0xffffffffu, st.s, o),
                     __shfl_xor_sync(0xffffffffu, st.t, o)};
    st = soft_merge(st, other);
    u += __shfl_xor_sync(0xffffffffu, u, o);
  }
  if (lane == 0) {
    red[warp] = st;
    redu[warp] = u;
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    Soft x = red[0];
    float uu = redu[0];
    for (int w = 1; w < NWARPS; w++) {
      x = soft_merge(x, red[w]);
      uu += redu[w];
    }
    float* o = rowstat + 4 * (size_t)i;
    o[0] = x.m;
    o[1] = x.s;
    o[2] = __fdiv_rn(x.t, x.s);
    o[3] = uu;
  }
}

// Backward step 2 from the saved K and D: E_h[i, j] = c_h·∂L/∂K / D_h (0 where D_h = 0) with the
// arithmetic of e_tile, element-wise. Grid
// (ceil(n_out / 256), n_in): block (x, i) writes the ∂γ partial Σ P⊙(Ĝ − s)⊙K of its 256 columns to
// gpart[i·gridDim.x + x].
extern "C" __global__ void __launch_bounds__(256)
    snella_merge_bwd_e_saved(const float* __restrict__ K, const float* __restrict__ D, unsigned H, unsigned n_in,
                             unsigned n_out, const float* __restrict__ mix, const float* __restrict__ G,
                             const float* __restrict__ rowstat, float* __restrict__ E, float* __restrict__ gpart) {
  using namespace snella_merge;
  __shared__ float red[NWARPS][1];
  __shared__ float gsum[1];
  const bool has_mix = mix != nullptr;
  const float alpha = has_mix ? mix[0] : 0.f, g = has_mix ? clamp_gamma(mix[1]) : 1.f;
  const float ag = has_mix ? __fdiv_rn(alpha, g) : 0.f;
  const unsigned i = blockIdx.y, j = blockIdx.x * blockDim.x + threadIdx.x;
  float gam = 0.f;
  if (j < n_out) {
    const size_t ij = (size_t)i * n_out + j;
    const float gv = G[ij];
    float dk = gv;
    if (has_mix) {
      const float kv = K[ij];
      const float zmax = rowstat[4 * (size_t)i], s_exp = rowstat[4 * (size_t)i + 1], s = rowstat[4 * (size_t)i + 2];
      const float p = __fdiv_rn(expf(__fsub_rn(__fdiv_rn(kv, g), zmax)), s_exp);
      const float pm = __fmul_rn(p, __fsub_rn(gv, s));
      dk = __fadd_rn(gv, __fmul_rn(ag, pm));
      gam = __fmul_rn(pm, kv);
    }
    for (unsigned h = 0; h < H; h++) {
      const size_t hij = (size_t)h * n_in * n_out + ij;
      const float d = D[hij];
      E[hij] = d != 0.f ? __fdiv_rn(__fmul_rn(coeff(h), dk), d) : 0.f;
    }
  }
  if (!has_mix) return;  // uniform across the block
  float gv1[1] = {gam};
  block_reduce<1, false>(gv1, red, gsum);
  if (threadIdx.x == 0) gpart[(size_t)i * gridDim.x + blockIdx.x] = gsum[0];
}

// Xp [rows, rh + 1] = [X | 1] for X [rows, rh]: the ones column makes the E GEMMs also return the
// row (column) sums of E. Grid-stride.
extern "C" __global__ void snella_merge_pad_ones(const float* __restrict__ X, float* __restrict__ Xp,
                                                 unsigned long long rows, unsigned rh) {
  const unsigned long long n = rows * (rh + 1);
  for (unsigned long long idx = (unsigned long long)blockIdx.x * blockDim.x + threadIdx.x; idx < n;
       idx += (unsigned long long)gridDim.x * blockDim.x) {
    const unsigned long long row = idx / (rh + 1), r = idx % (rh + 1);
    Xp[idx] = r < rh ? X[row * rh + r] : 1.f;
  }
}

// dX[h, x, r] = X[h, x, r]·Σ_s part[s, h, x, rh] − Σ_s part[s, h, x, r] (splits in index order).
static __device__ __forceinline__ void snella_merge_reduce_one(const float* __restrict__ part, unsigned nsplit,
                                                               unsigned H, unsigned rows, unsigned rh, size_t idx,
                                                               const float* __restrict__ X, float* __restrict__ dX) {
  const size_t hx = idx / rh, r = idx % rh;
  const size_t stride = (size_t)H * rows * (rh + 1);
  const float* p = part + hx * (rh + 1);
  float colsum = 0.f, s = 0.f;
  for (unsigned k = 0; k < nsplit; k++) {
    colsum += p[k * stride + rh];
    s += p[k * stride + r];
  }
  dX[idx] = __fsub_rn(__fmul_rn(X[idx], colsum), s);
}

// Backward step 3, 256 threads per block: blocks [0, nb_a) write dA [H, n_in, rh] from partA
// [ns_a, H, n_in, rh + 1], blocks [nb_a, nb_a + nb_b) dB from partB; when dmix is not null, the last
// block writes dmix = (Σ_i s_i, −(α/γ²)·Σ gpart, Σ_i Σ_j Ĝ), summed in f64 in a fixed order, with
// ∂γ = 0 while the clamp γ < 1e-4 is active (as the CPU).
extern "C" __global__ void __launch_bounds__(256)
    snella_merge_bwd_finish(const float* __restrict__ partA, unsigned ns_a, const float* __restrict__ partB,
                            unsigned ns_b, unsigned H, unsigned n_in, unsigned n_out, unsigned rh,
                            const float* __restrict__ A, const float* __restrict__ B, float* __restrict__ dA,
                            float* __restrict__ dB, unsigned nb_a, unsigned nb_b, const float* __restrict__ rowstat,
                            const float* __restrict__ gpart, unsigned ng, const float* __restrict__ mix,
                            float* __restrict__ dmix) {
  if (blockIdx.x < nb_a) {
    const size_t idx = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (idx < (size_t)H * n_in * rh) snella_merge_reduce_one(partA, ns_a, H, n_in, rh, idx, A, dA);
    return;
  }
  if (blockIdx.x < nb_a + nb_b) {
    const size_t idx = (size_t)(blockIdx.x - nb_a) * blockDim.x + threadIdx.x;
    if (idx < (size_t)H * n_out * rh) snella_merge_reduce_one(partB, ns_b, H, n_out, rh, idx, B, dB);
    return;
  }
  if (dmix == nullptr) return;
  __shared__ double red[3][8];
  double sa = 0.0, sb = 0.0, sg = 0.0;
  for (unsigned i = threadIdx.x; i < n_in; i += blockDim.x) {
    sa += (double)rowstat[4 * (size_t)i + 2];
    sb += (double)rowstat[4 * (size_t)i + 3];
  }
  for (unsigned b = threadIdx.x; b < ng; b += blockDim.x) sg += (double)gpart[b];
  for (int o = 16; o > 0; o >>= 1) {
    sa += __shfl_xor_sync(0xffffffffu, sa, o);
    sb += __shfl_xor_sync(0xffffffffu, sb, o);
    sg += __shfl_xor_sync(0xffffffffu, sg, o);
  }
  const unsigned lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  if (lane == 0) {
    red[0][warp] = sa;
    red[1][warp] = sb;
    red[2][warp] = sg;
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    sa = sb = sg = 0.0;
    for (int w = 0; w < 8; w++) {
      sa += red[0][w];
      sb += red[1][w];
      sg += red[2][w];
    }
    const float alpha = mix[0], gamma = mix[1];
    const float g = snella_merge::clamp_gamma(gamma);
    const bool clamped = gamma < 1e-4f;
    dmix[0] = (float)sa;
    dmix[1] = clamped ? 0.f : __fmul_rn(-__fdiv_rn(alpha, __fmul_rn(g, g)), (float)sg);
    dmix[2] = (float)sb;
  }
}
