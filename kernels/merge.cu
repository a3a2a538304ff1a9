// Kernelized merge of SNELL/SNELLA (spec §1) and its fused backward (spec §3).
// CPU reference: snella_core::snella::merge (merge_fwd / merge_bwd).
//
// Layouts (row-major f32): A [H, in, rh], B [H, out, rh], M and Ĝ [in, out], mixture [α, γ, β]
// (a null pointer means SNELL: M = K). c_h = 0.1·(−1)^h, γ clamped to ≥ 1e-4.
//
// Forward: snella_merge_fwd_tiles forms K for one 32×32 tile per block from the A and B tiles in
// shared memory and writes it to M (SNELL: M = K); with the mixture, snella_merge_fwd_softmax then
// rewrites each row in place as M = K + α·P + β (row max of K/γ, row sum of exp(K/γ − max), rewrite).
// D_h and K are computed with explicitly rounded mul/add (no FMA contraction) in the CPU's order, so
// they carry the CPU's bits; only expf and the softmax sum order differ (and, in the backward, the fast
// divisions giving P and E). (Session 6: this replaces a
// row kernel — R rows of A per block, each thread walking columns — that gave each B row R ≤ 8 uses
// and 384 blocks at ViT-B sizes: 23 µs per 768×768 merge on the H200.)
//
// Backward, recomputing D, K and P (no stored M), launched by crates/snella-cuda/src/ops/merge.rs:
//   1. snella_merge_bwd_rowstats_r{1,2,4,8} (mixture only): per row i, in one pass over j with an
//      online (rescaled) softmax: max_j K/γ, S = Σ_j exp(K/γ − max), s_i = Σ_j Ĝ·P, Σ_j Ĝ → rowstat [in, 4].
//   2. snella_merge_bwd_tiles_r{6,8,32}: per block one row tile of 32 and a run of 32-column tiles; each
//      tile recomputes D_h, K, P, ∂L/∂K into E_h = c_h·∂L/∂K ⊘ D_h in shared memory and sums it at once
//      against [B_h | 1] and [A_h | 1] (the ones columns give the row and column sums of E_h) into
//      per-block partials, with the tile's Σ P⊙(Ĝ − s)⊙K (∂γ). E never reaches global memory.
//   3. snella_merge_bwd_finish: dX = X·Σ part[.., rh, ..] − Σ part[.., r, ..] for dA and dB, and in its
//      last block (∂α, ∂γ, ∂β) from rowstat and the ∂γ partials in f64.
// From the saved K and D of the backward-time merge (snella_merge_fwd_tiles with ksave/dsave), step 1 is
// snella_merge_bwd_rowstats_saved and step 2 reads them instead of recomputing (same arithmetic).
// Every reduction has one fixed order (no float atomics): results are bit-identical run to run.
//
// Session 6: steps 2–3 were a kernel writing E [H, in, out] to global memory, then two strict-f32
// cuBLAS GEMMs (E_h·[B_h | 1], E_hᵀ·[A_h | 1]); at r/H = 16 those GEMMs got 48 to 192 blocks of
// 32×32 tiles and took 6.2 of the 48.6 ms ViT-B/16 bf16 step (ncu, H200).
#include "common.cuh"
#include "merge_tiles.cuh"  // the device helpers (tiles, reductions, the backward bodies)

// Forward step 1: K for one 32×32 tile per block (grid (n_jt, n_it), 256 threads; thread (warp w,
// lane l) takes column jj = l and rows ii = 4w + q, q < 4). (Session 7: 24-row tiles, 768 blocks
// instead of 576 at 768×768, ran 7% slower over a step, 2.61 → 2.80 ms, ncu on the H200.) Written
// to M (= K, the SNELL output) and, when not null, to ksave [n_in, n_out] and the distances to
// dsave [H, n_in, n_out] (the backward-time merge's saved tensors; M may then be null:
// snella_merge_bwd_rows_grad needs no M). D_h and K use the CPU's operation order with explicitly
// rounded mul/add (no FMA contraction), so they carry its bits. Dynamic shared memory 2·H·(rh + 1)·TS
// floats (the transposed tiles of load_tile_t).
namespace snella_merge {
__device__ __forceinline__ void fwd_tiles_body(const float* __restrict__ A, const float* __restrict__ B, unsigned H,
                                               unsigned n_in, unsigned n_out, unsigned rh, float* __restrict__ M,
                                               float* __restrict__ ksave, float* __restrict__ dsave) {
  extern __shared__ __align__(16) float snella_merge_ft_sh[];
  float* as = snella_merge_ft_sh;
  float* bs = as + H * (rh + 1) * TS;
  const unsigned i0 = blockIdx.y * TIF, j0 = blockIdx.x * TJ;
  load_tile_t(as, A, H, n_in, rh, i0);
  load_tile_t(bs, B, H, n_out, rh, j0);
  __syncthreads();
  const unsigned jj = threadIdx.x & 31, w = threadIdx.x >> 5, j = j0 + jj;
  float kk[TIF / 8];
  tile_k(as, bs, H, rh, jj, w, kk, [&](unsigned h, int q, float d) {
    const unsigned i = i0 + 4 * w + q;
    if (dsave != nullptr && i < n_in && j < n_out) dsave[((size_t)h * n_in + i) * n_out + j] = d;
  });
#pragma unroll
  for (int q = 0; q < TIF / 8; q++) {
    const unsigned i = i0 + 4 * w + q;
    if (i < n_in && j < n_out) {
      if (M != nullptr) M[(size_t)i * n_out + j] = kk[q];
      if (ksave != nullptr) ksave[(size_t)i * n_out + j] = kk[q];
    }
  }
}
}  // namespace snella_merge

extern "C" __global__ void __launch_bounds__(256)
    snella_merge_fwd_tiles(const float* __restrict__ A, const float* __restrict__ B, unsigned H, unsigned n_in,
                           unsigned n_out, unsigned rh, float* __restrict__ M, float* __restrict__ ksave,
                           float* __restrict__ dsave) {
  snella_merge::fwd_tiles_body(A, B, H, n_in, n_out, rh, M, ksave, dsave);
}

// The same for adapter blockIdx.z of a job table (common.cuh SnellaFwdJob; one shape for all), writing
// M only; block (0, 0) of each adapter also zeroes its top-k state for the kernels after it (the
// softmax pass's histogram, the select), which saves a memset per adapter.
extern "C" __global__ void __launch_bounds__(256)
    snella_merge_fwd_tiles_batch(const SnellaFwdJob* __restrict__ jobs, unsigned H, unsigned n_in, unsigned n_out,
                                 unsigned rh) {
  const SnellaFwdJob& jb = jobs[blockIdx.z];
  if (blockIdx.x == 0 && blockIdx.y == 0)
    for (unsigned w = threadIdx.x; w < SNELLA_KEPT_WORDS; w += blockDim.x) jb.st[w] = 0u;
  snella_merge::fwd_tiles_body(jb.A, jb.B, H, n_in, n_out, rh, jb.M, nullptr, nullptr);
}

// Forward step 2 (mixture): row i = blockIdx.x of M, holding K, becomes K + α·softmax_j(K/γ) + β in
// place (256 threads): the row max of K/γ, the row sum of exp(K/γ − max) (block reductions in a fixed
// order), then the rewrite. Thread t takes the entries j ≡ t (mod 256) in increasing j, and holds them
// in registers (RV of them: all loads issued before the first use) when n_out ≤ 256·RV for RV = 3
// (rows up to 768 wide) or 12 (up to 3072), else re-reads them (RV = 0); the same order, the same
// bits either way. (Session 7: one register size of 12 for every row ran 18% slower than the loop
// on 768-wide rows, ncu on the H200.)
namespace snella_merge {
constexpr int VPT = 12;  // values per thread held in registers by rowstats_saved: rows up to 3072 wide
// The top-k's digit-0 bin of an output value (kernels/topk.cu: bits 30..20 of its key).
__device__ __forceinline__ unsigned topk_bin0(float x) { return snella_magnitude_key(x) >> 20; }
// The softmax statistics of one row of K/γ (n entries, 256 threads), shared by softmax_row and
// rows_grad so that both form M from the same bits: zmax[0] = max_j K/γ and ssum[0] = Σ_j exp(K/γ −
// zmax), block reductions in a fixed order. With RV > 0 thread t holds the entries j = t + q·256 in
// kv (zeros past n) and receives ev[q] = exp(K/γ − zmax); with RV = 0 the row is re-read from `row`.
template <int RV>
__device__ __forceinline__ void row_softmax_stats(const float (&kv)[RV > 0 ? RV : 1], float (&ev)[RV > 0 ? RV : 1],
                                                  const float* __restrict__ row, unsigned n, float g, float (*red)[1],
                                                  float* zmax, float* ssum) {
  constexpr bool REG = RV > 0;
  constexpr int V = REG ? RV : 1;
  float v[1] = {-INFINITY};
  if (REG) {
#pragma unroll
    for (int q = 0; q < V; q++) {
      ev[q] = __fdiv_rn(kv[q], g);
      if (threadIdx.x + q * THREADS < n) v[0] = fmaxf(v[0], ev[q]);
    }
  } else {
    for (unsigned j = threadIdx.x; j < n; j += THREADS) v[0] = fmaxf(v[0], __fdiv_rn(row[j], g));
  }
  block_reduce<1, true>(v, red, zmax);
  v[0] = 0.f;
  if (REG) {
#pragma unroll
    for (int q = 0; q < V; q++) {
      ev[q] = expf(__fsub_rn(ev[q], zmax[0]));
      if (threadIdx.x + q * THREADS < n) v[0] += ev[q];
    }
  } else {
    for (unsigned j = threadIdx.x; j < n; j += THREADS) v[0] += expf(__fsub_rn(__fdiv_rn(row[j], g), zmax[0]));
  }
  block_reduce<1, false>(v, red, ssum);
}

template <int RV>
__device__ __forceinline__ void softmax_row(float* __restrict__ row, unsigned n_out, float alpha, float g, float beta,
                                            unsigned* hist) {
  constexpr bool REG = RV > 0;
  constexpr int VPT = REG ? RV : 1;
  __shared__ float red[NWARPS][1];
  __shared__ float zmax[1], ssum[1];
  // held in registers (RV > 0): K, then z = K/γ and e = exp(z − max) computed once per entry and
  // re-used by the later passes (session 9: 3 → 1 IEEE divisions by γ and 2 → 1 expf per entry;
  // the same operations on the same values, so the same bits)
  float kv[REG ? VPT : 1], zv[REG ? VPT : 1];
  if (REG) {
#pragma unroll
    for (int q = 0; q < VPT; q++) {
      const unsigned j = threadIdx.x + q * THREADS;
      kv[q] = j < n_out ? row[j] : 0.f;
    }
  }
  row_softmax_stats<RV>(kv, zv, row, n_out, g, red, zmax, ssum);  // zv: e = exp(K/γ − max) from here on
  auto out = [&](float k, float e) { return __fadd_rn(__fadd_rn(k, __fmul_rn(alpha, __fdiv_rn(e, ssum[0]))), beta); };
  if (REG) {
#pragma unroll
    for (int q = 0; q < VPT; q++) {
      const unsigned j = threadIdx.x + q * THREADS;
      const float o = j < n_out ? out(kv[q], zv[q]) : 0.f;
      if (j < n_out) row[j] = o;
      if (hist != nullptr) snella_hist_add_warp(hist, j < n_out, topk_bin0(o));  // uniform branch
    }
  } else {
    for (unsigned j = threadIdx.x; j < n_out; j += THREADS) {
      const float k = row[j];
      const float o = out(k, expf(__fsub_rn(__fdiv_rn(k, g), zmax[0])));
      row[j] = o;
      if (hist != nullptr) atomicAdd(&hist[topk_bin0(o)], 1u);  // lanes may diverge here
    }
  }
}
}  // namespace snella_merge

//
// hist0 (null: none): the top-k's digit-0 histogram of the rewritten M (2048 bins, kernels/topk.cu's
// snella_topk_hist pass 0, integer counts: the same words in any order), built here from the values
// as they are written (a shared histogram per row, added into hist0), so that the select starts at
// digit 1 (session 7: one launch and one read of M less per adapter).
namespace snella_merge {
__device__ __forceinline__ void fwd_softmax_body(float* __restrict__ M, unsigned n_out, const float* __restrict__ mix,
                                                 unsigned* __restrict__ hist0) {
  __shared__ unsigned h[2048];
  unsigned* hs = hist0 != nullptr ? h : nullptr;
  if (hs != nullptr)
    for (unsigned b = threadIdx.x; b < 2048; b += THREADS) h[b] = 0u;  // ordered by the reductions' barriers
  const float alpha = mix[0], g = clamp_gamma(mix[1]), beta = mix[2];
  float* row = M + (size_t)blockIdx.x * n_out;
  if (n_out <= (unsigned)(THREADS * 3))
    softmax_row<3>(row, n_out, alpha, g, beta, hs);
  else if (n_out <= (unsigned)(THREADS * 12))
    softmax_row<12>(row, n_out, alpha, g, beta, hs);
  else
    softmax_row<0>(row, n_out, alpha, g, beta, hs);
  if (hs == nullptr) return;  // uniform
  __syncthreads();
  for (unsigned b = threadIdx.x; b < 2048; b += THREADS)
    if (h[b]) atomicAdd(&hist0[b], h[b]);
}
}  // namespace snella_merge

extern "C" __global__ void __launch_bounds__(256)
    snella_merge_fwd_softmax(float* __restrict__ M, unsigned n_out, const float* __restrict__ mix,
                             unsigned* __restrict__ hist0) {
  snella_merge::fwd_softmax_body(M, n_out, mix, hist0);
}

// The same for adapter blockIdx.z of a job table (SnellaFwdJob, with a mixture), the digit-0
// histogram going to its top-k state (topk.cu W_HIST0).
extern "C" __global__ void __launch_bounds__(256)
    snella_merge_fwd_softmax_batch(const SnellaFwdJob* __restrict__ jobs, unsigned n_out) {
  const SnellaFwdJob& jb = jobs[blockIdx.z];
  snella_merge::fwd_softmax_body(jb.M, n_out, jb.mix, jb.st + SNELLA_KEPT_HIST0);
}

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

// Backward step 2 (see snella_merge::bwd_tiles_body; RM = 6 serves H = 2, r/H = 16), held to 48
// registers for five blocks per SM (H200: 64 registers and four blocks ran 37% slower): partA [ceil(n_jt / jt), H, rh + 1, n_in],
// partB [n_it, H, rh + 1, n_out] and the ∂γ partials, for RM ≥ ⌈(rh + 1) / (256 / (H·32))⌉ and H ≤ 8.
// K and D: the saved tensors (both null: recompute D, K and P from A and B).
#define SNELLA_MERGE_BWD_TILES(RM)                                                                                 \
  extern "C" __global__ void __launch_bounds__(256, RM <= 8 ? 5 : 1) snella_merge_bwd_tiles_r##RM(                                   \
      const float* __restrict__ A, const float* __restrict__ B, unsigned H, unsigned n_in, unsigned n_out,         \
      unsigned rh, const float* __restrict__ mix, const float* __restrict__ G, const float* __restrict__ rowstat,   \
      const float* __restrict__ K, const float* __restrict__ D, unsigned jt, float* __restrict__ partA,             \
      float* __restrict__ partB, float* __restrict__ gpart) {                                                      \
    extern __shared__ __align__(16) float snella_merge_bt_sh_##RM[];                                                             \
    snella_merge::bwd_tiles_body<RM>(A, B, H, n_in, n_out, rh, mix, G, rowstat, K, D, jt, partA, partB, gpart,     \
                                     snella_merge_bt_sh_##RM);                                                     \
  }
SNELLA_MERGE_BWD_TILES(6)
SNELLA_MERGE_BWD_TILES(8)
SNELLA_MERGE_BWD_TILES(32)
#undef SNELLA_MERGE_BWD_TILES

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
  auto step = [&](float kv, float gv) {
    const float z = __fdiv_rn(kv, g);
    if (z > st.m) {
      const float f = st.m == -INFINITY ? 0.f : expf(st.m - z);
      st = Soft{z, fmaf(st.s, f, 1.f), fmaf(st.t, f, gv)};
    } else {
      const float e = expf(z - st.m);
      st.s += e;
      st.t = fmaf(gv, e, st.t);
    }
    u += gv;
  };
  const float* kr = K + (size_t)i * n_out;
  const float* gr = G + (size_t)i * n_out;
  unsigned j0 = threadIdx.x;
  // the first VPT entries of this thread loaded before any use (as snella_merge_fwd_softmax), the
  // rest (rows wider than 256·VPT) in the loop; the same order either way
  {
    float kv[VPT], gv[VPT];
#pragma unroll
    for (int q = 0; q < VPT; q++) {
      const unsigned j = j0 + q * THREADS;
      kv[q] = j < n_out ? kr[j] : 0.f;
      gv[q] = j < n_out ? gr[j] : 0.f;
    }
#pragma unroll
    for (int q = 0; q < VPT; q++)
      if (j0 + q * THREADS < n_out) step(kv[q], gv[q]);
    j0 += VPT * THREADS;
  }
  for (unsigned j = j0; j < n_out; j += THREADS) step(kr[j], gr[j]);
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

// Backward step 1 from the layer's weight gradient (session 9; ops/merge.rs merge_bwd_from_grad):
// for row i = blockIdx.x, from the saved K row and the row of G = xᵀ·∂L/∂y [n_in, ld] (the chunk's
// columns [0, c) of it), in one block of 256 threads:
//   M = K + α·P + β as snella_merge_fwd_softmax forms it (the same operations, thread mapping and
//   reductions, so the forward's bits and the forward's kept set), Ĝ = G·factor(M) (spec §2, as
//   snella_sparsify_bwd_from_weight), s_i = Σ_j Ĝ·P, and
//   dK = ∂L/∂K = Ĝ + (α/γ)·P ⊙ (Ĝ − s_i)   (spec §3), written to dK [n_in, c];
//   rowstat[i] = (max_j K/γ, Σ_j exp(K/γ − max), s_i, Σ_j Ĝ) and gpart[i] = Σ_j P·(Ĝ − s_i)·K (∂γ's
//   row share; snella_merge_bwd_finish scales it by −α/γ²).
// The tiles kernel then takes dK as its gradient with no mixture (E_h = c_h·dK ⊘ D_h, K not read).
// SNELL (mix null): dK = Ĝ = G·factor(K), nothing else written. Replaces the backward's softmax
// rewrite of M, the transposing sparsify backward and the row statistics (three passes, M, Ĝ never
// written). Values held in registers (RV per thread) for rows up to 256·RV wide, else re-read (RV = 0,
// the same operations in the same order).
namespace snella_merge {
template <int RV>
__device__ __forceinline__ void rows_grad(const float* __restrict__ kr, const float* __restrict__ gr, float* __restrict__ dkr,
                                          unsigned c, unsigned long long idx0, const float* __restrict__ mix,
                                          const unsigned* __restrict__ kept, unsigned rule, float* __restrict__ rowstat,
                                          float* __restrict__ gpart) {
  constexpr bool REG = RV > 0;
  constexpr int V = REG ? RV : 1;
  __shared__ float red1[NWARPS][1], red2[NWARPS][2];
  __shared__ float zmax[1], ssum[1], sums[2], gsum[1];
  const unsigned thr = kept[0], cut = kept[1];
  const float tau = __uint_as_float(kept[2]);
  float kv[V], gv[V], ev[V];
  if (REG) {
#pragma unroll
    for (int q = 0; q < V; q++) {
      const unsigned j = threadIdx.x + q * THREADS;
      kv[q] = j < c ? kr[j] : 0.f;
      gv[q] = j < c ? gr[j] : 0.f;
    }
  }
  if (mix == nullptr) {  // SNELL: M = K
    if (REG) {
#pragma unroll
      for (int q = 0; q < V; q++) {
        const unsigned j = threadIdx.x + q * THREADS;
        if (j < c) dkr[j] = __fmul_rn(gv[q], snella_sparsify_factor(fabsf(kv[q]), idx0 + j, thr, cut, tau, rule));
      }
    } else {
      for (unsigned j = threadIdx.x; j < c; j += THREADS)
        dkr[j] = __fmul_rn(gr[j], snella_sparsify_factor(fabsf(kr[j]), idx0 + j, thr, cut, tau, rule));
    }
    return;
  }
  const float alpha = mix[0], g = clamp_gamma(mix[1]), beta = mix[2];
  // max_j K/γ and Σ_j exp(K/γ − max) as snella_merge_fwd_softmax forms them; ev holds e from here on
  row_softmax_stats<RV>(kv, ev, kr, c, g, red1, zmax, ssum);
  // P, M (the forward's bits), Ĝ; then s_i = Σ_j Ĝ·P and Σ_j Ĝ
  const float se = ssum[0];
  auto p_of = [&](float k) { return __fdiv_rn(expf(__fsub_rn(__fdiv_rn(k, g), zmax[0])), se); };
  auto ghat = [&](float k, float p, float gval, unsigned j) {
    const float m = __fadd_rn(__fadd_rn(k, __fmul_rn(alpha, p)), beta);
    return __fmul_rn(gval, snella_sparsify_factor(fabsf(m), idx0 + j, thr, cut, tau, rule));
  };
  float su[2] = {0.f, 0.f};
  if (REG) {
#pragma unroll
    for (int q = 0; q < V; q++) {
      const unsigned j = threadIdx.x + q * THREADS;
      if (j < c) {
        ev[q] = __fdiv_rn(ev[q], se);           // P from here on
        gv[q] = ghat(kv[q], ev[q], gv[q], j);  // Ĝ from here on
        su[0] = fmaf(gv[q], ev[q], su[0]);
        su[1] += gv[q];
      }
    }
  } else {
    for (unsigned j = threadIdx.x; j < c; j += THREADS) {
      const float k = kr[j], p = p_of(k), gh = ghat(k, p, gr[j], j);
      su[0] = fmaf(gh, p, su[0]);
      su[1] += gh;
    }
  }
  block_reduce<2, false>(su, red2, sums);
  // dK = Ĝ + (α/γ)·P·(Ĝ − s) and the row's ∂γ share Σ_j P·(Ĝ − s)·K (the tiles kernel's operations)
  const float ag = __fdiv_rn(alpha, g), s = sums[0];
  float v[1] = {0.f};
  auto dk_of = [&](float p, float gh, unsigned j) {  // writes dK, returns P·(Ĝ − s)
    const float pm = __fmul_rn(p, __fsub_rn(gh, s));
    dkr[j] = __fadd_rn(gh, __fmul_rn(ag, pm));
    return pm;
  };
  if (REG) {
#pragma unroll
    for (int q = 0; q < V; q++) {
      const unsigned j = threadIdx.x + q * THREADS;
      if (j < c) v[0] = fmaf(dk_of(ev[q], gv[q], j), kv[q], v[0]);
    }
  } else {
    for (unsigned j = threadIdx.x; j < c; j += THREADS) {
      const float k = kr[j], p = p_of(k);
      v[0] = fmaf(dk_of(p, ghat(k, p, gr[j], j), j), k, v[0]);
    }
  }
  block_reduce<1, false>(v, red1, gsum);
  if (threadIdx.x == 0) {
    rowstat[0] = zmax[0];
    rowstat[1] = se;
    rowstat[2] = s;
    rowstat[3] = sums[1];
    *gpart = gsum[0];
  }
}
}  // namespace snella_merge

// Grid n_in, block 256. K, dK: [n_in, c]; G: row stride ld (≥ c); kept: the kept-set words; rowstat
// [n_in, 4] and gpart [n_in] (mixture only; may be null for SNELL).
namespace snella_merge {
__device__ __forceinline__ void rows_grad_entry(const float* __restrict__ K, const float* __restrict__ G,
                                                unsigned long long ld, unsigned c, const float* __restrict__ mix,
                                                const unsigned* __restrict__ kept, unsigned rule, float* __restrict__ dK,
                                                float* __restrict__ rowstat, float* __restrict__ gpart) {
  const size_t i = blockIdx.x;
  const float* kr = K + i * c;
  const float* gr = G + i * ld;
  float* dkr = dK + i * c;
  float* rs = rowstat != nullptr ? rowstat + 4 * i : nullptr;
  float* gp = gpart != nullptr ? gpart + i : nullptr;
  if (c <= (unsigned)(THREADS * 3))
    rows_grad<3>(kr, gr, dkr, c, i * c, mix, kept, rule, rs, gp);
  else if (c <= (unsigned)(THREADS * 12))
    rows_grad<12>(kr, gr, dkr, c, i * c, mix, kept, rule, rs, gp);
  else
    rows_grad<0>(kr, gr, dkr, c, i * c, mix, kept, rule, rs, gp);
}
}  // namespace snella_merge

extern "C" __global__ void __launch_bounds__(256)
    snella_merge_bwd_rows_grad(const float* __restrict__ K, const float* __restrict__ G, unsigned long long ld, unsigned c,
                               const float* __restrict__ mix, const unsigned* __restrict__ kept, unsigned rule,
                               float* __restrict__ dK, float* __restrict__ rowstat, float* __restrict__ gpart) {
  snella_merge::rows_grad_entry(K, G, ld, c, mix, kept, rule, dK, rowstat, gpart);
}

// dX[h, x, r] = X[h, x, r]·Σ_s part[s, h, rh, x] − Σ_s part[s, h, r, x] for part [nsplit, H, rh + 1, rows]
// (splits in index order); idx enumerates (h, r, x), x fastest, so that the partial reads coalesce.
static __device__ __forceinline__ void snella_merge_reduce_one(const float* __restrict__ part, unsigned nsplit,
                                                               unsigned H, unsigned rows, unsigned rh, size_t idx,
                                                               const float* __restrict__ X, float* __restrict__ dX) {
  const size_t x = idx % rows, hr = idx / rows, h = hr / rh, r = hr % rh;
  const size_t stride = (size_t)H * (rh + 1) * rows;
  const float* p = part + h * (rh + 1) * rows + x;
  float colsum = 0.f, s = 0.f;
  for (unsigned k = 0; k < nsplit; k++) {
    colsum += p[k * stride + rh * rows];
    s += p[k * stride + r * rows];
  }
  const size_t o = (h * rows + x) * rh + r;
  dX[o] = __fsub_rn(__fmul_rn(X[o], colsum), s);
}


// Backward step 3, 256 threads per block: blocks [0, nb_a) write dA [H, n_in, rh] from partA
// [ns_a, H, rh + 1, n_in], blocks [nb_a, nb_a + nb_b) dB from partB; when dmix is not null, the last
// block writes dmix = (Σ_i s_i, −(α/γ²)·Σ gpart, Σ_i Σ_j Ĝ), summed in f64 in a fixed order, with
// ∂γ = 0 while the clamp γ < 1e-4 is active (as the CPU).
namespace snella_merge {
__device__ __forceinline__ void finish_body(const float* __restrict__ partA, unsigned ns_a, const float* __restrict__ partB,
                                            unsigned ns_b, unsigned H, unsigned n_in, unsigned n_out, unsigned rh,
                                            const float* __restrict__ A, const float* __restrict__ B, float* __restrict__ dA,
                                            float* __restrict__ dB, unsigned nb_a, unsigned nb_b,
                                            const float* __restrict__ rowstat, const float* __restrict__ gpart, unsigned ng,
                                            const float* __restrict__ mix, float* __restrict__ dmix) {
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
}  // namespace snella_merge

extern "C" __global__ void __launch_bounds__(256)
    snella_merge_bwd_finish(const float* __restrict__ partA, unsigned ns_a, const float* __restrict__ partB,
                            unsigned ns_b, unsigned H, unsigned n_in, unsigned n_out, unsigned rh,
                            const float* __restrict__ A, const float* __restrict__ B, float* __restrict__ dA,
                            float* __restrict__ dB, unsigned nb_a, unsigned nb_b, const float* __restrict__ rowstat,
                            const float* __restrict__ gpart, unsigned ng, const float* __restrict__ mix,
                            float* __restrict__ dmix) {
  snella_merge::finish_body(partA, ns_a, partB, ns_b, H, n_in, n_out, rh, A, B, dA, dB, nb_a, nb_b, rowstat, gpart, ng,
                            mix, dmix);
}

// The backward from the weight gradient (ops/merge.rs merge_bwd_from_grad's four launches) for
// adapter blockIdx.z of a job table (common.cuh SnellaBwdJob; one shape for all), session 10: the
// same bodies, so the same bits. 1: K and D (M not formed); 2: M, Ĝ, row statistics, ∂L/∂K; 3: the
// tiles with ∂L/∂K as their gradient (no mixture); 4: dA, dB and dmix from the partials and the
// rows' statistics (ng = n_in).
extern "C" __global__ void __launch_bounds__(256)
    snella_merge_bwd_kd_batch(const SnellaBwdJob* __restrict__ jobs, unsigned H, unsigned n_in, unsigned n_out,
                              unsigned rh) {
  const SnellaBwdJob& jb = jobs[blockIdx.z];
  snella_merge::fwd_tiles_body(jb.A, jb.B, H, n_in, n_out, rh, nullptr, jb.K, jb.D);
}
extern "C" __global__ void __launch_bounds__(256)
    snella_merge_bwd_rows_grad_batch(const SnellaBwdJob* __restrict__ jobs, unsigned c) {
  const SnellaBwdJob& jb = jobs[blockIdx.z];
  snella_merge::rows_grad_entry(jb.K, jb.G, jb.ld, c, jb.mix, jb.kept, jb.rule, jb.dK, jb.rowstat, jb.gpart);
}
#define SNELLA_MERGE_BWD_TILES_BATCH(RM)                                                                           \
  extern "C" __global__ void __launch_bounds__(256, RM <= 8 ? 5 : 1) snella_merge_bwd_tiles_r##RM##_batch(         \
      const SnellaBwdJob* __restrict__ jobs, unsigned H, unsigned n_in, unsigned n_out, unsigned rh, unsigned jt) { \
    extern __shared__ __align__(16) float snella_merge_btb_sh_##RM[];                                              \
    const SnellaBwdJob& jb = jobs[blockIdx.z];                                                                     \
    snella_merge::bwd_tiles_body<RM>(jb.A, jb.B, H, n_in, n_out, rh, nullptr, jb.dK, nullptr, jb.K, jb.D, jt,      \
                                     jb.partA, jb.partB, jb.tgpart, snella_merge_btb_sh_##RM);                     \
  }
SNELLA_MERGE_BWD_TILES_BATCH(6)
SNELLA_MERGE_BWD_TILES_BATCH(8)
SNELLA_MERGE_BWD_TILES_BATCH(32)
#undef SNELLA_MERGE_BWD_TILES_BATCH
extern "C" __global__ void __launch_bounds__(256)
    snella_merge_bwd_finish_batch(const SnellaBwdJob* __restrict__ jobs, unsigned ns_a, unsigned ns_b, unsigned H,
                                  unsigned n_in, unsigned n_out, unsigned rh, unsigned nb_a, unsigned nb_b) {
  const SnellaBwdJob& jb = jobs[blockIdx.z];
  snella_merge::finish_body(jb.partA, ns_a, jb.partB, ns_b, H, n_in, n_out, rh, jb.A, jb.B, jb.dA, jb.dB, nb_a, nb_b,
                            jb.rowstat, jb.gpart, n_in, jb.mix, jb.dmix);
}
