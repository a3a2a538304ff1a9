// Device helpers of the kernelized merge kernels (kernels/merge.cu), shared by its forward and
// backward: the tile geometry, the CPU-ordered distance and K arithmetic on 32×32 tiles
// (tile_k, k_col), block reductions, the E tiles of the backward (recomputed or from the saved K, D),
// the online softmax state of the row statistics, and the bodies of the row-statistics and tiles
// kernels. Split from merge.cu in session 9 to keep files short; the kernels and their launch notes
// stay in merge.cu. CPU reference: snella_core::snella::merge.
#pragma once
#include "common.cuh"

namespace snella_merge {
constexpr int THREADS = 256;          // every kernel here except the mixture reduce (also 256)
constexpr int NWARPS = THREADS / 32;
constexpr int TI = 32;                // backward tile: rows
constexpr int TIF = 32;               // forward tile: rows (snella_merge_fwd_tiles; 24 ran slower)
constexpr int TJ = 32;                // backward tile: columns (one per lane)
// Row strides in shared memory, multiples of 4 floats so that the sums read 4 consecutive entries
// with one 16-byte load (session 8; 33 before): a warp's 16-byte reads of the E tile's rows (lane x,
// row x) fall on distinct banks in each quarter-warp phase at a stride of 36, and its reads of the
// A, B tiles are warp-uniform (one address for all lanes).
constexpr int ES = TJ + 4;            // row stride of the E tile [H][TI][ES]
constexpr int TS = 36;                // row stride of the transposed A, B tiles [H][rh + 1][TS]

__device__ __forceinline__ float coeff(unsigned h) { return (h & 1u) ? -0.1f : 0.1f; }

// max(γ, 1e-4) with NaN propagating, as the CPU's clamp_gamma.
__device__ __forceinline__ float clamp_gamma(float g) { return g < 1e-4f ? 1e-4f : g; }

// K[i0 + q, j] for q < R from the A rows in shared memory (sa: [R][H][rh]) and B[h, j, :] in global
// memory (the backward's row statistics). Same arithmetic and order as the CPU's row_kernel:
// d = Σ_r (a − b)², D = √d, K = Σ_h c_h·D.
template <int R>
__device__ __forceinline__ void k_col(const float* sa, const float* __restrict__ B, unsigned H, unsigned n_out,
                                      unsigned rh, unsigned j, float (&k)[R]) {
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
      k[q] = __fadd_rn(k[q], __fmul_rn(c, __fsqrt_rn(d2[q])));
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

// K of the entries (ii = 4w + q, jj), q < 4, of a 32 × 32 tile from the transposed A and B tiles
// (load_tile_t) into kk, handing each distance D_h to sink(h, q, d). The CPU's row_kernel order with
// explicitly rounded mul/add: d = Σ_r (a − b)², D = √d, K = Σ_h c_h·D. A warp's four rows are
// adjacent in the transposed A tile, so each r takes one warp-uniform 16-byte load of A and one
// load of B (session 8: rows w + 8q took four loads of A per r).
template <typename Sink>
__device__ __forceinline__ void tile_k(const float* as, const float* bs, unsigned H, unsigned rh, unsigned jj, unsigned w,
                                       float (&kk)[4], Sink sink) {
#pragma unroll
  for (int q = 0; q < 4; q++) kk[q] = 0.f;
  for (unsigned h = 0; h < H; h++) {
    float d2[4];
#pragma unroll
    for (int q = 0; q < 4; q++) d2[q] = 0.f;
    const float* bp = bs + h * (rh + 1) * TS + jj;
    const float* ap = as + h * (rh + 1) * TS + 4 * w;
#pragma unroll 4
    for (unsigned r = 0; r < rh; r++) {
      const float b = bp[r * TS];
      const float4 a4 = *reinterpret_cast<const float4*>(ap + r * TS);
      const float av[4] = {a4.x, a4.y, a4.z, a4.w};
#pragma unroll
      for (int q = 0; q < 4; q++) {
        const float t = __fsub_rn(av[q], b);
        d2[q] = __fadd_rn(d2[q], __fmul_rn(t, t));
      }
    }
    const float c = coeff(h);
#pragma unroll
    for (int q = 0; q < 4; q++) {
      const float d = __fsqrt_rn(d2[q]);
      sink(h, q, d);
      kk[q] = __fadd_rn(kk[q], __fmul_rn(c, d));
    }
  }
}

// One 32×32 tile of the backward: E_h[i0 + ii, j0 + jj] into es [H][TI][ES], from the transposed A
// tile as [H][rh + 1][TS] and B tile bs (load_tile_t) in shared memory. Thread (warp w, lane l)
// handles jj = l and ii = 4w + q, q < 4 (tile_k's rows). Entries outside [n_in, n_out] get E = 0.
// Returns this thread's share of Σ P⊙(Ĝ − s)⊙K (0 without the mixture). Mirrors the CPU's bwd_chunk:
// pm = P·(Ĝ − s), ∂L/∂K = Ĝ + (α/γ)·pm, E = (c_h·∂L/∂K)/D (0 where D = 0); the divisions giving P
// and E are the fast ones (__fdividef, ≤ 2 ulp for the divisors here: D > 0 is a distance, S ≥ 1 a
// softmax sum), each a few instructions instead of an IEEE division's check and slow path.
__device__ __forceinline__ float e_tile(const float* as, const float* bs, float* es, const float* __restrict__ G,
                                        const float* __restrict__ rowstat, unsigned i0, unsigned j0, unsigned n_in,
                                        unsigned n_out, unsigned H, unsigned rh, bool mix, float alpha, float g) {
  const unsigned jj = threadIdx.x & 31, w = threadIdx.x >> 5;
  float kk[4];
  tile_k(as, bs, H, rh, jj, w, kk, [&](unsigned h, int q, float d) { es[(h * TI + 4 * w + q) * ES + jj] = d; });
  const float ag = mix ? __fdiv_rn(alpha, g) : 0.f;
  float gam = 0.f;
#pragma unroll
  for (int q = 0; q < 4; q++) {
    const unsigned ii = 4 * w + q, i = i0 + ii, j = j0 + jj;
    const bool valid = i < n_in && j < n_out;
    const float gv = valid ? G[(size_t)i * n_out + j] : 0.f;
    float dk = gv;
    if (mix && valid) {
      const float zmax = rowstat[4 * i], s_exp = rowstat[4 * i + 1], s = rowstat[4 * i + 2];
      const float p = __fdividef(expf(__fsub_rn(__fdiv_rn(kk[q], g), zmax)), s_exp);
      const float pm = __fmul_rn(p, __fsub_rn(gv, s));
      dk = __fadd_rn(gv, __fmul_rn(ag, pm));
      gam = fmaf(pm, kk[q], gam);
    }
    for (unsigned h = 0; h < H; h++) {
      float* e = es + (h * TI + ii) * ES + jj;
      const float d = *e;
      *e = (valid && d != 0.f) ? __fdividef(__fmul_rn(coeff(h), dk), d) : 0.f;
    }
  }
  return gam;
}

// Loads tile rows x0 .. x0 + 31 of X [H, rows, rh] transposed into dst [H][rh + 1][TS]:
// dst[(h·(rh + 1) + r)·TS + x] = X[h, x0 + x, r] (zeros past `rows`), and the ones row r = rh, so that
// the tile is X1 = [X | 1] column by column. Consecutive threads load consecutive floats of the
// tile's contiguous run in X (coalesced); (x, r) advance by (⌊nt/rh⌋, nt mod rh) per step instead
// of dividing every time.
__device__ __forceinline__ void load_tile_t(float* dst, const float* __restrict__ X, unsigned H, unsigned rows,
                                            unsigned rh, unsigned x0) {
  const unsigned nt = blockDim.x, qd = nt / rh, qm = nt % rh, per = 32 * rh;
  const unsigned xs = threadIdx.x / rh, rst = threadIdx.x % rh;
  for (unsigned h = 0; h < H; h++) {
    const float* src = X + ((size_t)h * rows + x0) * rh;
    float* d = dst + h * (rh + 1) * TS;
    unsigned x = xs, r = rst;
    for (unsigned e = threadIdx.x; e < per; e += nt) {
      d[r * TS + x] = x0 + x < rows ? src[e] : 0.f;
      x += qd;
      r += qm;
      if (r >= rh) {
        r -= rh;
        x++;
      }
    }
    if (threadIdx.x < 32) d[rh * TS + threadIdx.x] = 1.f;
  }
}

// One 32×32 tile of E from the saved K and D (the backward-time merge's): the arithmetic of e_tile,
// element-wise (thread (warp w, lane l): jj = l, ii = 4w + q, e_tile's rows, so that each thread's
// ∂γ share sums the same entries in the same order), into es [H][TI][ES]; entries outside
// [n_in, n_out] get E = 0. Returns this thread's share of Σ P⊙(Ĝ − s)⊙K.
__device__ __forceinline__ float e_tile_saved(float* es, const float* __restrict__ K, const float* __restrict__ D,
                                              const float* __restrict__ G, const float* __restrict__ rowstat,
                                              unsigned i0, unsigned j0, unsigned n_in, unsigned n_out, unsigned H,
                                              bool mix, float alpha, float g) {
  const unsigned jj = threadIdx.x & 31, w = threadIdx.x >> 5;
  const float ag = mix ? __fdiv_rn(alpha, g) : 0.f;
  float gam = 0.f;
#pragma unroll
  for (int q = 0; q < 4; q++) {
    const unsigned ii = 4 * w + q, i = i0 + ii, j = j0 + jj;
    const bool valid = i < n_in && j < n_out;
    const size_t ij = (size_t)i * n_out + j;
    const float gv = valid ? G[ij] : 0.f;
    float dk = gv;
    if (mix && valid) {
      const float kv = K[ij];
      const float zmax = rowstat[4 * i], s_exp = rowstat[4 * i + 1], s = rowstat[4 * i + 2];
      const float p = __fdividef(expf(__fsub_rn(__fdiv_rn(kv, g), zmax)), s_exp);
      const float pm = __fmul_rn(p, __fsub_rn(gv, s));
      dk = __fadd_rn(gv, __fmul_rn(ag, pm));
      gam = fmaf(pm, kv, gam);
    }
    for (unsigned h = 0; h < H; h++) {
      const float d = valid ? D[(size_t)h * n_in * n_out + ij] : 0.f;
      es[(h * TI + ii) * ES + jj] = d != 0.f ? __fdividef(__fmul_rn(coeff(h), dk), d) : 0.f;
    }
  }
  return gam;
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

// Backward step 2, fused: the E tiles are formed in shared memory and summed against the B and A
// tiles at once, so E [H, in, out] never reaches global memory. Grid (ceil(n_jt / jt), n_it), 256
// threads: block (x, y) takes row tile y (rows i0 = 32y ..) and the column tiles x·jt .. x·jt + jt − 1.
// For each column tile it forms E (recomputed from the A, B tiles by e_tile, or element-wise from the
// saved K and D by e_tile_saved when D is not null), then
//   partB[y, h, r, j] = Σ_{i in tile} E_h[i, j]·A1[h, i, r]   (written per column tile)
//   partA[x, h, r, i] += Σ_{j in tile} E_h[i, j]·B1[h, j, r]  (kept in registers over the jt tiles)
// with X1 = [X | 1] (the ones column, r = rh, gives the row and column sums of E_h). Partials are
// laid out [split, H, rh + 1, rows] so that both the writes here and the reads of the finish kernel
// are coalesced along rows. The block's share of Σ P⊙(Ĝ − s)⊙K (∂γ) goes to gpart[y·gridDim.x + x].
// Thread t owns (h, row) = (t mod H·32) and the r-group g = t div H·32 (G = 256 / (H·32) groups, H ≤ 8):
// r = g, g + G, …, at most RM of them. Every sum runs in one fixed order: deterministic.
// Dynamic shared memory: (2·H·(rh + 1)·TS + H·32·ES) floats. The transposed tiles put the sums'
// operands at compile-time offsets from a few per-thread row pointers: the unrolled loops are loads
// and FMAs only (the first version indexed [row][r] tiles with runtime strides: 28% of its
// instructions were address arithmetic, ncu on the H200). A thread with fewer than RM sums computes
// the spare ones on a valid row (clamped) and does not store them.
template <int RM>
__device__ __forceinline__ void bwd_tiles_body(const float* __restrict__ A, const float* __restrict__ B, unsigned H,
                                               unsigned n_in, unsigned n_out, unsigned rh, const float* __restrict__ mix,
                                               const float* __restrict__ G, const float* __restrict__ rowstat,
                                               const float* __restrict__ K, const float* __restrict__ D, unsigned jt,
                                               float* __restrict__ partA, float* __restrict__ partB,
                                               float* __restrict__ gpart, float* sh) {
  __shared__ float red[NWARPS][1];
  __shared__ float gsum[1];
  const bool has_mix = mix != nullptr;
  const float alpha = has_mix ? mix[0] : 0.f, g = has_mix ? clamp_gamma(mix[1]) : 1.f;
  const unsigned r1 = rh + 1;
  float* as = sh;
  float* bs = as + H * r1 * TS;
  float* es = bs + H * r1 * TS;
  const unsigned i0 = blockIdx.y * TI;
  const unsigned n_jt = (n_out + TJ - 1) / TJ, jt0 = blockIdx.x * jt, jt1 = min(jt0 + jt, n_jt);
  // this thread's (h, row) and r-group: r = grp + k·ng, k < cnt
  const unsigned pairs = H * 32, ng = THREADS / pairs, t = threadIdx.x;
  const unsigned hh = (t % pairs) / 32, x = t % 32, grp = t / pairs;
  const unsigned cnt = grp < ng && grp < r1 ? (r1 - grp + ng - 1) / ng : 0;
  // rows of the transposed tiles this thread reads (clamped to r ≤ rh for the spare sums)
  unsigned roff[RM];
#pragma unroll
  for (int k = 0; k < RM; k++) roff[k] = (hh * r1 + min(grp + k * ng, rh)) * TS;
  load_tile_t(as, A, H, n_in, rh, i0);
  float acc_a[RM];
#pragma unroll
  for (int k = 0; k < RM; k++) acc_a[k] = 0.f;
  float gam = 0.f;
  for (unsigned tj = jt0; tj < jt1; tj++) {
    const unsigned j0 = tj * TJ;
    load_tile_t(bs, B, H, n_out, rh, j0);
    __syncthreads();
    gam += D != nullptr ? e_tile_saved(es, K, D, G, rowstat, i0, j0, n_in, n_out, H, has_mix, alpha, g)
                        : e_tile(as, bs, es, G, rowstat, i0, j0, n_in, n_out, H, rh, has_mix, alpha, g);
    __syncthreads();
    if (cnt > 0) {
      // partB: column x of this tile, summed over the tile's rows
      float acc_b[RM];
#pragma unroll
      for (int k = 0; k < RM; k++) acc_b[k] = 0.f;
      // (four rows at a time: one warp-uniform 16-byte load of A1 per sum; the same order of fmas)
      const float* ec = es + hh * TI * ES + x;
#pragma unroll 1
      for (int i4 = 0; i4 < TI; i4 += 4) {
        float e[4];
#pragma unroll
        for (int u = 0; u < 4; u++) e[u] = ec[(i4 + u) * ES];
#pragma unroll
        for (int k = 0; k < RM; k++) {
          const float4 a4 = *reinterpret_cast<const float4*>(as + roff[k] + i4);
          acc_b[k] = fmaf(e[0], a4.x, acc_b[k]);
          acc_b[k] = fmaf(e[1], a4.y, acc_b[k]);
          acc_b[k] = fmaf(e[2], a4.z, acc_b[k]);
          acc_b[k] = fmaf(e[3], a4.w, acc_b[k]);
        }
      }
      if (j0 + x < n_out) {
        float* pb = partB + ((size_t)(blockIdx.y * H + hh) * r1 + grp) * n_out + j0 + x;
#pragma unroll
        for (int k = 0; k < RM; k++)
          if ((unsigned)k < cnt) pb[(size_t)k * ng * n_out] = acc_b[k];
      }
      // partA: row x of the row tile, summed over this tile's columns
      // (four columns at a time: one 16-byte load of the E row, one warp-uniform one of B1 per sum)
      const float* er = es + (hh * TI + x) * ES;
#pragma unroll 1
      for (int j4 = 0; j4 < TJ; j4 += 4) {
        const float4 e4 = *reinterpret_cast<const float4*>(er + j4);
#pragma unroll
        for (int k = 0; k < RM; k++) {
          const float4 b4 = *reinterpret_cast<const float4*>(bs + roff[k] + j4);
          acc_a[k] = fmaf(e4.x, b4.x, acc_a[k]);
          acc_a[k] = fmaf(e4.y, b4.y, acc_a[k]);
          acc_a[k] = fmaf(e4.z, b4.z, acc_a[k]);
          acc_a[k] = fmaf(e4.w, b4.w, acc_a[k]);
        }
      }
    }
    __syncthreads();
  }
  if (cnt > 0 && i0 + x < n_in) {
    float* pa = partA + ((size_t)(blockIdx.x * H + hh) * r1 + grp) * n_in + i0 + x;
#pragma unroll
    for (int k = 0; k < RM; k++)
      if ((unsigned)k < cnt) pa[(size_t)k * ng * n_in] = acc_a[k];
  }
  if (!has_mix) return;  // uniform across the block
  float gv[1] = {gam};
  block_reduce<1, false>(gv, red, gsum);
  if (threadIdx.x == 0) gpart[(size_t)blockIdx.y * gridDim.x + blockIdx.x] = gsum[0];
}
}  // namespace snella_merge
