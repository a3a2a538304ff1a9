// Multi-head self-attention core (timm Attention between qkv and proj), in two forms: the row-softmax
// kernels around cuBLAS's batched products (f32/TF32; this first part), and the fused bf16
// FlashAttention-2 kernels (the second part, below). CPU reference: snella_core::ops::attention.
//
// The products (S = scale·q·kᵀ, O = P·v; backward dP = dO·vᵀ, dv = Pᵀ·dO, dq = dS·k, dk = dSᵀ·q)
// run on cuBLAS, one batched call per product over every (image, head) (crates/snella-cuda/src/ops/
// attention.rs); the probabilities P [b, heads, t, t] are materialised for the backward. What is
// left to these kernels is the softmax over keys and its backward, one warp per row, each row
// reduced by one warp in a fixed order (deterministic).
#include "common.cuh"

// In place: p[row, :] = softmax(p[row, :]) for rows [0, rows) of length t.
// Grid ceil(rows / 8), block 256 (8 warps, one row each).
extern "C" __global__ void __launch_bounds__(256)
    snella_softmax_rows_fwd(float* __restrict__ p, unsigned rows, unsigned t) {
  const unsigned row = blockIdx.x * 8 + (threadIdx.x >> 5), lane = threadIdx.x & 31;
  if (row >= rows) return;
  float* r = p + (size_t)row * t;
  float mx = -INFINITY;
  for (unsigned j = lane; j < t; j += 32) mx = fmaxf(mx, r[j]);
  mx = snella_warp_max(mx);
  float sum = 0.f;
  for (unsigned j = lane; j < t; j += 32) {
    float e = expf(r[j] - mx);
    r[j] = e;
    sum += e;
  }
  const float inv = 1.f / snella_warp_sum(sum);
  for (unsigned j = lane; j < t; j += 32) r[j] *= inv;
}

// Softmax backward with the score scale folded in: ds[row, :] = scale · P ⊙ (dP − Σ_j dP⊙P),
// in place over ds (which holds dP on entry). Grid ceil(rows / 8), block 256.
extern "C" __global__ void __launch_bounds__(256)
    snella_softmax_rows_bwd(const float* __restrict__ p, float* __restrict__ ds, unsigned rows, unsigned t, float scale) {
  const unsigned row = blockIdx.x * 8 + (threadIdx.x >> 5), lane = threadIdx.x & 31;
  if (row >= rows) return;
  const float* pr = p + (size_t)row * t;
  float* dr = ds + (size_t)row * t;
  float dot = 0.f;
  for (unsigned j = lane; j < t; j += 32) dot += pr[j] * dr[j];
  dot = snella_warp_sum(dot);
  for (unsigned j = lane; j < t; j += 32) dr[j] = scale * pr[j] * (dr[j] - dot);
}
// ---------------------------------------------------------------------------------------------
// Fused (flash-style) attention for the bf16 precision, head dim 64 (FlashAttention-2, Dao 2023,
// Algorithms 1 and 2): q·kᵀ, the online softmax and P·v run in one kernel per 64-query tile, with the
// scores kept in registers (mma.sync m16n8k16 bf16 → f32; a score accumulator is re-used as the A
// operand of P·v without leaving the registers). Only the row log-sum-exp is saved, not P. q, k, v
// and dO enter in bf16 (as PyTorch's autocast feeds bf16 to its SDPA; an f32 qkv is rounded by the
// launcher, dO by the backward's first kernel); P and dS enter their products as bf16 hi + lo pairs
// (fa_mma_pk); accumulation, the softmax statistics and every output are f32.
// Session 9: tiles are staged by cp.async straight into shared memory, the next tile's copies in
// flight while this one is multiplied (double buffering; no staging registers), fragments come by
// ldmatrix, and a warp skips the products whose rows or columns lie wholly past t (zero-filled
// there, so what is skipped adds exact zeros: the same results).
// CPU reference: snella_core::ops::attention (attention_fwd / attention_bwd, and attention_lse for
// the saved statistics).

#include <cuda_bf16.h>

#define FA_HD 64   // head dim
#define FA_T 64    // queries per block (16 per warp, 4 warps) and keys per tile
#define FA_S 72    // shared row stride in bf16 elements: 144 bytes, the ldmatrix rows are conflict-free
#define FA_TS (FA_T * FA_S)  // one staged 64×64 tile, in bf16 elements

typedef __nv_bfloat16 fa_bf16;

__device__ __forceinline__ uint32_t fa_pack(float lo, float hi) {
  __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);  // .x (low half) = the lower column
  return *reinterpret_cast<uint32_t*>(&v);
}

// d += a·b for one 16×8×16 tile (PTX ISA "mma.m16n8k16" fragment layouts: g = lane/4, q = lane%4;
// a: rows g, g+8 × cols 2q.., 2q+8..; b: k rows 2q.., 2q+8.. × col g; d: rows g, g+8 × cols 2q, 2q+1).
__device__ __forceinline__ void fa_mma(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// Four 8×8 bf16 matrices from shared memory (ldmatrix .x4): lane l gives the address of row l%8 of
// matrix l/8; r[i] receives this lane's pair of matrix i (row lane/4, columns 2·(lane%4), +1).
__device__ __forceinline__ void fa_ldsm4(uint32_t (&r)[4], const fa_bf16* p) {
  const uint32_t a = (uint32_t)__cvta_generic_to_shared(p);
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(a));
}

// The A fragment of the 16×16 tile at (row r0, col k0) of a shared [m][k] tile.
__device__ __forceinline__ void fa_lda(uint32_t (&a)[4], const fa_bf16* s, int r0, int k0, int lane) {
  const int j = lane >> 3;
  fa_ldsm4(a, s + (r0 + (j & 1) * 8 + (lane & 7)) * FA_S + k0 + (j >> 1) * 8);
}

// B fragments of two adjacent n-tiles (n0, n0 + 8) at k0 of an operand stored [n][k] in shared
// memory: b[0], b[1] for n0; b[2], b[3] for n0 + 8.
__device__ __forceinline__ void fa_ldb2(uint32_t (&b)[4], const fa_bf16* s, int n0, int k0, int lane) {
  const int j = lane >> 3;
  fa_ldsm4(b, s + (n0 + (j >> 1) * 8 + (lane & 7)) * FA_S + k0 + (j & 1) * 8);
}

// A 16×64 tile of f32 accumulators (8 n-tiles of 16×8), one per warp.
typedef float fa_acc[8][4];

__device__ __forceinline__ void fa_zero(fa_acc& c) {
#pragma unroll
  for (int n = 0; n < 8; ++n) c[n][0] = c[n][1] = c[n][2] = c[n][3] = 0.f;
}

// B fragments of two adjacent n-tiles (n0, n0 + 8) at k0 of an operand stored [k][n] in shared
// memory, transposed on the fly by ldmatrix .trans: b[0], b[1] for n0; b[2], b[3] for n0 + 8.
__device__ __forceinline__ void fa_ldb_t(uint32_t (&b)[4], const fa_bf16* s, int k0, int n0, int lane) {
  const int j = lane >> 3, r = lane & 7;
  const uint32_t a = (uint32_t)__cvta_generic_to_shared(s + (k0 + (j & 1) * 8 + r) * FA_S + n0 + (j >> 1) * 8);
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(b[0]), "=r"(b[1]), "=r"(b[2]), "=r"(b[3])
               : "r"(a));
}

// c += a·Bᵀ over k = 64 for the warp's 16 rows: `a` = the 16×64 A operand as four k-chunks of
// fragments, B = a shared 64×64 tile stored [n][k] (c's 64 columns are B's rows). Column pairs of
// n-tiles starting at or past `lim` are skipped (c keeps its values there).
__device__ __forceinline__ void fa_mma_nk(fa_acc& c, const uint32_t (&a)[4][4], const fa_bf16* sh, int lane, int lim) {
#pragma unroll
  for (int n = 0; n < 8; n += 2) {
    if (n * 8 >= lim) break;
#pragma unroll
    for (int kk = 0; kk < 4; ++kk) {
      uint32_t b[4];
      fa_ldb2(b, sh, n * 8, kk * 16, lane);
      fa_mma(c[n], a[kk], b[0], b[1]);
      fa_mma(c[n + 1], a[kk], b[2], b[3]);
    }
  }
}

// Splits two f32 values into bf16 hi + lo pairs: hi = bf16(v), lo = bf16(v − hi), so hi + lo keeps
// about 16 bits of v's mantissa (two bf16 products then cost twice the mma work of one).
__device__ __forceinline__ void fa_split(uint32_t& hi, uint32_t& lo, float a, float b) {
  const __nv_bfloat162 h = __floats2bfloat162_rn(a, b);
  const float2 hf = __bfloat1622float2(h);
  const __nv_bfloat162 l = __floats2bfloat162_rn(a - hf.x, b - hf.y);
  hi = *reinterpret_cast<const uint32_t*>(&h);
  lo = *reinterpret_cast<const uint32_t*>(&l);
}

// c += (hi + lo)·B over the 16-wide k-chunk j of a shared 64×64 B tile stored [k][n]: the A
// operand as two bf16 fragments (hi, lo), two products per fragment (fa_mma_pk, and the backward's dq).
__device__ __forceinline__ void fa_mma_hilo(fa_acc& c, const uint32_t (&hi)[4], const uint32_t (&lo)[4], const fa_bf16* sh, int j,
                                            int lane) {
#pragma unroll
  for (int n = 0; n < 8; n += 2) {
    uint32_t b[4];
    fa_ldb_t(b, sh, j * 16, n * 8, lane);
    fa_mma(c[n], hi, b[0], b[1]);
    fa_mma(c[n], lo, b[0], b[1]);
    fa_mma(c[n + 1], hi, b[2], b[3]);
    fa_mma(c[n + 1], lo, b[2], b[3]);
  }
}

// c += P·B over k = 64 for the warp's 16 rows: P = the 16×64 accumulator tile `p` (FA-2's register
// re-use as the A operand), B = a shared 64×64 tile stored [k][n]. P (probabilities, or dS in the
// backward) enters as bf16 hi + lo terms, two products per fragment: a single bf16 rounding of P
// (8 bits; what FlashAttention and PyTorch's autocast SDPA do) cost ≈ 0.4 pt of the spec §8 recipe's
// test top-1 against the unfused path's f32 P (bench/PERF.md), the split keeps P to ≈ 16 bits.
// k-chunks of 16 starting at or past `lim` are skipped (their P and B rows are zero there).
__device__ __forceinline__ void fa_mma_pk(fa_acc& c, const fa_acc& p, const fa_bf16* sh, int lane, int lim) {
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    if (j * 16 >= lim) break;
    uint32_t ph[4], pl[4];
    fa_split(ph[0], pl[0], p[2 * j][0], p[2 * j][1]);
    fa_split(ph[1], pl[1], p[2 * j][2], p[2 * j][3]);
    fa_split(ph[2], pl[2], p[2 * j + 1][0], p[2 * j + 1][1]);
    fa_split(ph[3], pl[3], p[2 * j + 1][2], p[2 * j + 1][3]);
    fa_mma_hilo(c, ph, pl, sh, j, lane);
  }
}

// cp.async (sm_80+): `bytes` (16 or 4) from global to shared memory without registers; with `ok`
// false nothing is read and the shared bytes are zero-filled (the src-size 0 form).
__device__ __forceinline__ void fa_cp16(void* dst, const void* src, bool ok) {
  const uint32_t s = (uint32_t)__cvta_generic_to_shared(dst);
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(s), "l"(src), "r"(ok ? 16 : 0));
}
__device__ __forceinline__ void fa_cp4(void* dst, const void* src, bool ok) {
  const uint32_t s = (uint32_t)__cvta_generic_to_shared(dst);
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(s), "l"(src), "r"(ok ? 4 : 0));
}
__device__ __forceinline__ void fa_commit() { asm volatile("cp.async.commit_group;\n" ::); }
// Waits until at most N of this thread's committed groups are still in flight.
template <int N>
__device__ __forceinline__ void fa_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}

// Starts copying a 64-row tile of one head's 64 bf16 columns (`src`, row stride `ld` elements; rows
// [r0, r0 + 64), those ≥ n zero-filled) into sh[r][c]: 512 chunks of 16 bytes, 4 per thread of a
// 128-thread block.
__device__ __forceinline__ void fa_cp_tile(fa_bf16* sh, const fa_bf16* __restrict__ src, size_t ld, int r0, int n) {
#pragma unroll
  for (int u = 0; u < 4; ++u) {
    const int i = threadIdx.x + u * 128, r = i >> 3, c = (i & 7) * 8;
    const bool ok = r0 + r < n;
    fa_cp16(sh + r * FA_S + c, ok ? src + (size_t)(r0 + r) * ld + c : src, ok);
  }
}

// Forward. Grid (b·heads, ceil(t/64)), block 128. qkv [b, t, 3d] bf16 (d = heads·64; head h's q, k, v
// at columns h·64, d + h·64, 2d + h·64); writes out [b, t, d] and lse2 [b·heads, t], the row
// log-sum-exp of the scores in base 2: lse2 = log2 Σ_j 2^(s_j) with s = q·kᵀ·scale·log2(e)
// (`scale_log2`). Keys ≥ t are masked, query rows ≥ t are not written; a warp whose 16 queries all
// lie past t does no products.
// Two adjacent outputs of one row, as f32 or (the _o16 kernel) rounded to bf16 for the proj linear.
__device__ __forceinline__ void fa_out2(float* p, float a, float b) { *reinterpret_cast<float2*>(p) = make_float2(a, b); }
__device__ __forceinline__ void fa_out2(__nv_bfloat16* p, float a, float b) {
  *reinterpret_cast<__nv_bfloat162*>(p) = __floats2bfloat162_rn(a, b);
}

template <typename O>
__device__ __forceinline__ void flash_fwd(const fa_bf16* __restrict__ qkv, O* __restrict__ out, float* __restrict__ lse2, unsigned t,
                                          unsigned heads, float scale_log2) {
  __shared__ __align__(16) fa_bf16 qs[FA_TS], ks[2][FA_TS], vs[2][FA_TS];  // 45 KiB
  const int bh = blockIdx.x, bi = bh / heads, h = bh % heads, nt_ = (int)t;
  const int d = heads * FA_HD;
  const size_t ld = 3 * (size_t)d;
  const fa_bf16* base = qkv + (size_t)bi * t * ld + h * FA_HD;
  const int q0 = blockIdx.y * FA_T, w = threadIdx.x >> 5, lane = threadIdx.x & 31, q = lane & 3;
  const bool live = q0 + w * 16 < nt_;  // this warp holds at least one query < t
  const int tiles = (nt_ + FA_T - 1) / FA_T;
  fa_cp_tile(qs, base, ld, q0, nt_);
  fa_cp_tile(ks[0], base + d, ld, 0, nt_);
  fa_cp_tile(vs[0], base + 2 * d, ld, 0, nt_);
  fa_commit();
  uint32_t qa[4][4];
  fa_acc o;
  fa_zero(o);
  float m0 = -INFINITY, m1 = -INFINITY, l0 = 0.f, l1 = 0.f;
  for (int kt = 0; kt < tiles; ++kt) {
    const int k0 = kt * FA_T, buf = kt & 1, nk = min(nt_ - k0, FA_T);
    if (kt + 1 < tiles) {  // the next tile's k and v, in flight during this tile's products
      fa_cp_tile(ks[buf ^ 1], base + d, ld, k0 + FA_T, nt_);
      fa_cp_tile(vs[buf ^ 1], base + 2 * d, ld, k0 + FA_T, nt_);
    }
    fa_commit();
    fa_wait<1>();
    __syncthreads();
    if (live) {
      if (kt == 0) {
#pragma unroll
        for (int kk = 0; kk < 4; ++kk) fa_lda(qa[kk], qs, w * 16, kk * 16, lane);
      }
      fa_acc s;
      fa_zero(s);
      fa_mma_nk(s, qa, ks[buf], lane, nk);
      float mx0 = -INFINITY, mx1 = -INFINITY;
#pragma unroll
      for (int n = 0; n < 8; ++n)
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          const bool ok = n * 8 + 2 * q + e < nk;
          s[n][e] = ok ? s[n][e] * scale_log2 : -INFINITY;
          s[n][2 + e] = ok ? s[n][2 + e] * scale_log2 : -INFINITY;
          mx0 = fmaxf(mx0, s[n][e]);
          mx1 = fmaxf(mx1, s[n][2 + e]);
        }
      mx0 = fmaxf(mx0, __shfl_xor_sync(0xffffffffu, mx0, 1));
      mx0 = fmaxf(mx0, __shfl_xor_sync(0xffffffffu, mx0, 2));
      mx1 = fmaxf(mx1, __shfl_xor_sync(0xffffffffu, mx1, 1));
      mx1 = fmaxf(mx1, __shfl_xor_sync(0xffffffffu, mx1, 2));
      // every tile holds at least one valid key, so the new maxima are finite
      const float n0 = fmaxf(m0, mx0), n1 = fmaxf(m1, mx1);
      const float c0 = exp2f(m0 - n0), c1 = exp2f(m1 - n1);
      m0 = n0;
      m1 = n1;
      l0 *= c0;
      l1 *= c1;
#pragma unroll
      for (int n = 0; n < 8; ++n) {
        o[n][0] *= c0;
        o[n][1] *= c0;
        o[n][2] *= c1;
        o[n][3] *= c1;
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          s[n][e] = exp2f(s[n][e] - m0);
          s[n][2 + e] = exp2f(s[n][2 + e] - m1);
          l0 += s[n][e];
          l1 += s[n][2 + e];
        }
      }
      fa_mma_pk(o, s, vs[buf], lane, nk);
    }
    __syncthreads();  // this tile's readers are done before its buffer is refilled
  }
  if (!live) return;
  const int g = lane >> 2;
  l0 += __shfl_xor_sync(0xffffffffu, l0, 1);
  l0 += __shfl_xor_sync(0xffffffffu, l0, 2);
  l1 += __shfl_xor_sync(0xffffffffu, l1, 1);
  l1 += __shfl_xor_sync(0xffffffffu, l1, 2);
  const int r0 = q0 + w * 16 + g, r1 = r0 + 8;
  if (r0 < nt_) {
    const float inv = 1.f / l0;
    O* dst = out + ((size_t)bi * t + r0) * d + h * FA_HD + 2 * q;
#pragma unroll
    for (int n = 0; n < 8; ++n) fa_out2(dst + n * 8, o[n][0] * inv, o[n][1] * inv);
    if (q == 0) lse2[(size_t)bh * t + r0] = m0 + log2f(l0);
  }
  if (r1 < nt_) {
    const float inv = 1.f / l1;
    O* dst = out + ((size_t)bi * t + r1) * d + h * FA_HD + 2 * q;
#pragma unroll
    for (int n = 0; n < 8; ++n) fa_out2(dst + n * 8, o[n][2] * inv, o[n][3] * inv);
    if (q == 0) lse2[(size_t)bh * t + r1] = m1 + log2f(l1);
  }
}

// The launcher rounds an f32 qkv to bf16 first (the same bits the staging rounded before session 9).
extern "C" __global__ void __launch_bounds__(128)
    snella_flash_attn_fwd_q16(const fa_bf16* __restrict__ qkv, float* __restrict__ out, float* __restrict__ lse2,
                              unsigned t, unsigned heads, float scale_log2) {
  flash_fwd(qkv, out, lse2, t, heads, scale_log2);
}
// The same writing the output rounded to bf16 (the proj linear's input in a bf16 step, written once
// instead of f32 then converted; bit-identical to that).
extern "C" __global__ void __launch_bounds__(128)
    snella_flash_attn_fwd_q16_o16(const fa_bf16* __restrict__ qkv, fa_bf16* __restrict__ out,
                                  float* __restrict__ lse2, unsigned t, unsigned heads, float scale_log2) {
  flash_fwd(qkv, out, lse2, t, heads, scale_log2);
}

// Backward, step 1: dvec[bh·t + i] = Σ_e dO[b, i, h·64 + e] · O[b, i, h·64 + e] (FA-2's D = rowsum(dO ⊙ O),
// which equals Σ_j P_ij·dP_ij), O in f32 or (the _o16 kernel) in the bf16 a linear layer keeps; and
// do16 = dO rounded to bf16 (the operand of step 2's products). One warp per row; grid
// ceil(b·heads·t / 8), block 256.
template <typename O>
__device__ __forceinline__ void flash_bwd_dot(const float* __restrict__ dout, const O* __restrict__ out, float* __restrict__ dvec,
                                              fa_bf16* __restrict__ do16, unsigned rows, unsigned t, unsigned heads) {
  const unsigned row = blockIdx.x * 8 + (threadIdx.x >> 5), lane = threadIdx.x & 31;
  if (row >= rows) return;
  const unsigned bh = row / t, i = row % t, bi = bh / heads, h = bh % heads, d = heads * FA_HD;
  const size_t at = ((size_t)bi * t + i) * d + h * FA_HD + 2 * lane;
  // dO rounded to bf16 as step 2's dP = dO·vᵀ reads it, so that Σ_j P_ij·(dP_ij − D_i) ≈ 0 holds
  // for the products actually formed (an f32 D would bias every dS row by the rounding of dO)
  const __nv_bfloat162 a16 = __float22bfloat162_rn(*reinterpret_cast<const float2*>(dout + at));
  *reinterpret_cast<__nv_bfloat162*>(do16 + at) = a16;
  const float2 a = __bfloat1622float2(a16);
  float2 b;
  if constexpr (sizeof(O) == 4) {
    b = *reinterpret_cast<const float2*>(out + at);
  } else {
    b = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(out + at));
  }
  const float s = snella_warp_sum(a.x * b.x + a.y * b.y);
  if (lane == 0) dvec[row] = s;
}
extern "C" __global__ void __launch_bounds__(256)
    snella_flash_attn_bwd_dot(const float* __restrict__ dout, const float* __restrict__ out, float* __restrict__ dvec,
                              fa_bf16* __restrict__ do16, unsigned rows, unsigned t, unsigned heads) {
  flash_bwd_dot(dout, out, dvec, do16, rows, t, heads);
}
extern "C" __global__ void __launch_bounds__(256)
    snella_flash_attn_bwd_dot_o16(const float* __restrict__ dout, const fa_bf16* __restrict__ out, float* __restrict__ dvec,
                                  fa_bf16* __restrict__ do16, unsigned rows, unsigned t, unsigned heads) {
  flash_bwd_dot(dout, out, dvec, do16, rows, t, heads);
}

// Backward, step 2. Grid (b·heads·⌈t/64⌉) — block x takes key tile x % ⌈t/64⌉ of head x / ⌈t/64⌉,
// so a head's key tiles run side by side and share its q and dO in L2 — block 128, dynamic shared
// memory FA_BWD_SHARED bytes. Each block owns 64 keys: it walks every 64-query tile, recomputes
// Pᵀ = 2^(s − lse2) from q, k, and accumulates dv = Pᵀ·dO and dk = scale·dSᵀ·q in registers, with
// dSᵀ = Pᵀ ⊙ (dPᵀ − D), dPᵀ = v·dOᵀ; its share of dq (scale·dS·k over its 64 keys) goes to
// dqp[key tile][bh][t][64] (no atomics: summed in a fixed order by step 3, deterministic). Writes
// the k and v columns of dqkv [b, t, 3d] for its keys. The next query tile's q, dO, lse2 and D are
// copied in while this one is multiplied (two buffers); rows past t arrive as zeros, so a padded
// query's dO and q rows are zero and it adds exact zeros to dv, dk.
#define FA_BWD_SHARED (7 * FA_TS * 2 + 4 * FA_T * 4)  // q, dO (×2 buffers), k, dS hi, dS lo; lse2, D (×2)

// Two adjacent values of dqkv: f32, or rounded to bf16 (the gradient as the qkv linear's backward
// products consume it: the same bits as the f32 value rounded later).
__device__ __forceinline__ void fa_store2(float* p, float a, float b) { *reinterpret_cast<float2*>(p) = make_float2(a, b); }
__device__ __forceinline__ void fa_store2(__nv_bfloat16* p, float a, float b) {
  *reinterpret_cast<__nv_bfloat162*>(p) = __floats2bfloat162_rn(a, b);
}
__device__ __forceinline__ void fa_store1(float* p, float a) { *p = a; }
__device__ __forceinline__ void fa_store1(__nv_bfloat16* p, float a) { *p = __float2bfloat16_rn(a); }

// Starts copying query tile i0 (q, dO, and the rows' lse2 and D) into buffer `buf` of step 2.
__device__ __forceinline__ void fa_bwd_stage(fa_bf16* sh, float* stat, const fa_bf16* __restrict__ qb, const fa_bf16* __restrict__ db,
                                             const float* __restrict__ lrow, const float* __restrict__ drow, size_t ld, int d,
                                             int buf, int i0, int n) {
  fa_cp_tile(sh + buf * FA_TS, qb, ld, i0, n);
  fa_cp_tile(sh + (2 + buf) * FA_TS, db, d, i0, n);
  const int x = threadIdx.x & 63;
  const bool ok = i0 + x < n;
  const float* src = threadIdx.x < 64 ? lrow : drow;
  fa_cp4(stat + buf * 128 + threadIdx.x, ok ? src + i0 + x : src, ok);
}

template <typename G>
__device__ __forceinline__ void flash_bwd(const fa_bf16* __restrict__ qkv, const fa_bf16* __restrict__ do16, const float* __restrict__ lse2,
                                          const float* __restrict__ dvec, G* __restrict__ dqkv, float* __restrict__ dqp, unsigned t,
                                          unsigned heads, float scale, float scale_log2) {
  extern __shared__ __align__(16) unsigned char fa_dyn[];
  fa_bf16* const sh = reinterpret_cast<fa_bf16*>(fa_dyn);  // qs[2] | dos[2] | ks | dss | dsl
  fa_bf16* const ks = sh + 4 * FA_TS;                       // k [key][e]
  fa_bf16* const dss = sh + 5 * FA_TS;                      // dS [query][key], bf16 hi term
  fa_bf16* const dsl = sh + 6 * FA_TS;                      // dS − hi, bf16 lo term (see fa_mma_pk)
  float* const stat = reinterpret_cast<float*>(sh + 7 * FA_TS);  // [buffer][lse2 × 64 | D × 64]
  const int nt_ = (int)t, tiles = (nt_ + FA_T - 1) / FA_T;
  const int kt = blockIdx.x % tiles, bh = blockIdx.x / tiles, nbh = gridDim.x / tiles;
  const int bi = bh / heads, h = bh % heads, d = heads * FA_HD;
  const size_t ld = 3 * (size_t)d;
  const fa_bf16* base = qkv + (size_t)bi * t * ld + h * FA_HD;
  const fa_bf16* dbase = do16 + (size_t)bi * t * d + h * FA_HD;
  const float *lrow = lse2 + (size_t)bh * t, *drow = dvec + (size_t)bh * t;
  const int k0 = kt * FA_T, w = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, q = lane & 3;
  // k → ks (kept for dq) and v → dss (read once into registers, before dS first goes there)
  fa_cp_tile(ks, base + d, ld, k0, nt_);
  fa_cp_tile(dss, base + 2 * d, ld, k0, nt_);
  fa_commit();
  fa_bwd_stage(sh, stat, base, dbase, lrow, drow, ld, d, 0, 0, nt_);
  fa_commit();
  fa_wait<1>();
  __syncthreads();
  uint32_t ka[4][4], va[4][4];
#pragma unroll
  for (int kk = 0; kk < 4; ++kk) {
    fa_lda(ka[kk], ks, w * 16, kk * 16, lane);
    fa_lda(va[kk], dss, w * 16, kk * 16, lane);
  }
  fa_acc dk, dv;
  fa_zero(dk);
  fa_zero(dv);
  const bool klive = k0 + w * 16 < nt_;  // this warp owns at least one key < t
  const bool key0 = k0 + w * 16 + g < nt_, key1 = k0 + w * 16 + g + 8 < nt_;
  for (int it = 0; it < tiles; ++it) {
    const int i0 = it * FA_T, buf = it & 1, nq = min(nt_ - i0, FA_T);
    if (it + 1 < tiles) fa_bwd_stage(sh, stat, base, dbase, lrow, drow, ld, d, buf ^ 1, i0 + FA_T, nt_);
    fa_commit();
    fa_wait<1>();
    __syncthreads();  // this tile's copies have landed; the previous tile's dq readers are done
    const fa_bf16 *qs = sh + buf * FA_TS, *dos = sh + (2 + buf) * FA_TS;
    const float *ls = stat + buf * 128, *dl = ls + 64;
    if (klive) {
      // Sᵀ = k·qᵀ (this warp's 16 keys × 64 queries) → Pᵀ
      fa_acc p;
      fa_zero(p);
      fa_mma_nk(p, ka, qs, lane, nq);
#pragma unroll
      for (int n = 0; n < 8; ++n)
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          const float l_ = ls[n * 8 + 2 * q + e];
          p[n][e] = key0 ? exp2f(p[n][e] * scale_log2 - l_) : 0.f;
          p[n][2 + e] = key1 ? exp2f(p[n][2 + e] * scale_log2 - l_) : 0.f;
        }
      // dv += Pᵀ·dO
      fa_mma_pk(dv, p, dos, lane, nq);
      // dPᵀ = v·dOᵀ, then dSᵀ = Pᵀ ⊙ (dPᵀ − D) in place of Pᵀ
      fa_acc dp;
      fa_zero(dp);
      fa_mma_nk(dp, va, dos, lane, nq);
#pragma unroll
      for (int n = 0; n < 8; ++n)
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          const float D = dl[n * 8 + 2 * q + e];
          p[n][e] *= dp[n][e] - D;
          p[n][2 + e] *= dp[n][2 + e] - D;
        }
      // dk += dSᵀ·q (scaled at the end)
      fa_mma_pk(dk, p, qs, lane, nq);
      // dS to shared as [query][key] for the dq products
#pragma unroll
      for (int n = 0; n < 8; ++n)
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          const int at = (n * 8 + 2 * q + e) * FA_S + w * 16 + g;
          const __nv_bfloat16 h0 = __float2bfloat16_rn(p[n][e]), h1 = __float2bfloat16_rn(p[n][2 + e]);
          dss[at] = h0;
          dss[at + 8] = h1;
          dsl[at] = __float2bfloat16_rn(p[n][e] - __bfloat162float(h0));
          dsl[at + 8] = __float2bfloat16_rn(p[n][2 + e] - __bfloat162float(h1));
        }
    }
    __syncthreads();
    // this warp's 16 queries of dq over the tile's keys < t (16-key chunks owned by live warps)
    if (w * 16 < nq) {
      fa_acc dq;
      fa_zero(dq);
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        if (k0 + j * 16 >= nt_) break;
        uint32_t a[4], al[4];
        fa_lda(a, dss, w * 16, j * 16, lane);
        fa_lda(al, dsl, w * 16, j * 16, lane);
        fa_mma_hilo(dq, a, al, ks, j, lane);
      }
      const int r0 = i0 + w * 16 + g, r1 = r0 + 8;
      float* part = dqp + (((size_t)kt * nbh + bh) * t) * FA_HD + 2 * q;
#pragma unroll
      for (int n = 0; n < 8; ++n) {
        if (r0 < nt_) *reinterpret_cast<float2*>(part + (size_t)r0 * FA_HD + n * 8) = make_float2(dq[n][0] * scale, dq[n][1] * scale);
        if (r1 < nt_) *reinterpret_cast<float2*>(part + (size_t)r1 * FA_HD + n * 8) = make_float2(dq[n][2] * scale, dq[n][3] * scale);
      }
    }
  }
  // this block's keys: dk (scaled) and dv into dqkv
  const int r0 = k0 + w * 16 + g, r1 = r0 + 8;
  G* dst = dqkv + (size_t)bi * t * ld + h * FA_HD + 2 * q;
#pragma unroll
  for (int n = 0; n < 8; ++n) {
    if (r0 < nt_) {
      fa_store2(dst + (size_t)r0 * ld + d + n * 8, dk[n][0] * scale, dk[n][1] * scale);
      fa_store2(dst + (size_t)r0 * ld + 2 * d + n * 8, dv[n][0], dv[n][1]);
    }
    if (r1 < nt_) {
      fa_store2(dst + (size_t)r1 * ld + d + n * 8, dk[n][2] * scale, dk[n][3] * scale);
      fa_store2(dst + (size_t)r1 * ld + 2 * d + n * 8, dv[n][2], dv[n][3]);
    }
  }
}

// dqkv in f32 (the launcher rounds an f32 qkv to bf16 first: the bits the staging rounded to before).
// At most 168 registers, so that three blocks fit an SM (session 9, H100: 1690 against 1668 img/s for
// the step at 218 registers and two blocks, A/B in one run; ptxas then spills 76 bytes).
extern "C" __global__ void __launch_bounds__(128, 3)
    snella_flash_attn_bwd_q16(const fa_bf16* __restrict__ qkv, const fa_bf16* __restrict__ do16, const float* __restrict__ lse2,
                              const float* __restrict__ dvec, float* __restrict__ dqkv, float* __restrict__ dqp, unsigned t,
                              unsigned heads, float scale, float scale_log2) {
  flash_bwd(qkv, do16, lse2, dvec, dqkv, dqp, t, heads, scale, scale_log2);
}
// The same writing the k and v columns of dqkv in bf16 (the f32 values rounded: identical bits).
extern "C" __global__ void __launch_bounds__(128, 3)
    snella_flash_attn_bwd_q16_g16(const fa_bf16* __restrict__ qkv, const fa_bf16* __restrict__ do16, const float* __restrict__ lse2,
                                  const float* __restrict__ dvec, fa_bf16* __restrict__ dqkv, float* __restrict__ dqp, unsigned t,
                                  unsigned heads, float scale, float scale_log2) {
  flash_bwd(qkv, do16, lse2, dvec, dqkv, dqp, t, heads, scale, scale_log2);
}

// Backward, step 3: the q columns of dqkv = Σ over the `tiles` key tiles of dqp, in tile order
// (deterministic), in f32 or rounded to bf16 (G). One thread per element of [b·heads, t, 64] (`total`
// of them); grid-stride.
template <typename G>
__device__ __forceinline__ void flash_bwd_dq(const float* __restrict__ dqp, G* __restrict__ dqkv, unsigned t, unsigned heads,
                                             unsigned tiles, unsigned long long total) {
  const unsigned long long stride = (unsigned long long)gridDim.x * blockDim.x;
  for (unsigned long long x = (unsigned long long)blockIdx.x * blockDim.x + threadIdx.x; x < total; x += stride) {
    const unsigned long long row = x / FA_HD;  // bh·t + i
    const unsigned e = (unsigned)(x % FA_HD), i = (unsigned)(row % t), bh = (unsigned)(row / t);
    const unsigned bi = bh / heads, h = bh % heads, d = heads * FA_HD;
    float s = 0.f;
    for (unsigned k = 0; k < tiles; ++k) s += dqp[(unsigned long long)k * total + x];
    fa_store1(dqkv + ((unsigned long long)bi * t + i) * 3ull * d + h * FA_HD + e, s);
  }
}
extern "C" __global__ void __launch_bounds__(256)
    snella_flash_attn_bwd_dq(const float* __restrict__ dqp, float* __restrict__ dqkv, unsigned t, unsigned heads,
                             unsigned tiles, unsigned long long total) {
  flash_bwd_dq(dqp, dqkv, t, heads, tiles, total);
}
extern "C" __global__ void __launch_bounds__(256)
    snella_flash_attn_bwd_dq_g16(const float* __restrict__ dqp, __nv_bfloat16* __restrict__ dqkv, unsigned t, unsigned heads,
                                 unsigned tiles, unsigned long long total) {
  flash_bwd_dq(dqp, dqkv, t, heads, tiles, total);
}
