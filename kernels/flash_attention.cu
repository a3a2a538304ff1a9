// Fused ("flash-style") multi-head self-attention for head dimension 64 on bf16 tensor cores with
// f32 accumulation: forward and backward without the [b, heads, t, t] probabilities in memory.
// CPU reference: snella_core::ops::attention (attention_fwd / attention_bwd), the same math in f32.
//
// Layouts as kernels/attention.cu (timm): qkv [b, t, 3·d] (q, k, v of head h at columns h·64,
// d + h·64, 2d + h·64), out and dout [b, t, d], d = heads·64. Saved for the backward: the row
// log-sum-exp lse [b, heads, t] of the scaled scores (P = exp(scale·q·kᵀ − lse)).
//
// The sequence is short (ViT: 65–257 tokens), so a block holds every key (and value) of one
// (image, head) in shared memory as bf16, padded to tp = t rounded up to 16 with zero rows, staged
// once; its 4 warps take the 16-row tiles of that (image, head) in turn (tile = warp + 4·k, over
// gridDim.x blocks when there are few images): a warp stages its 16 rows, forms its 16 × tp score
// rows with wmma 16×16×16 products into shared f32, takes the exact row softmax there (no online
// rescaling needed: the whole row is at hand), and multiplies on. Three kernels:
//   snella_flash_attn_fwd     query tiles: S = q·kᵀ, P = softmax(scale·S) (bf16), O = P·v, lse;
//   snella_flash_attn_bwd_dq  query tiles: D = rowsum(dO ⊙ O) (saved for the next kernel),
//                             P from lse, dP = dO·vᵀ, dS = P ⊙ (dP − D), dq = scale·dS·k;
//   snella_flash_attn_bwd_dkv key tiles:   Pᵀ, dv = Pᵀ·dO, dPᵀ = v·dOᵀ, dSᵀ, dk = scale·dSᵀ·q.
// Operands are rounded to bf16 once when staged (q, k, v, dO, and P, dS before their products),
// every product accumulates in f32, softmax, exp and the row sums are f32. Deterministic: no atomics.
// Grid (splits, heads, b), 128 threads, dynamic shared memory as sized by the launcher
// (crates/snella-cuda/src/ops/flash_attention.rs; ≤ 227 KB: t ≤ 304 on sm_90, else the f32 kernels).
#include "common.cuh"
#include <cuda_bf16.h>
#include <mma.h>

namespace snella_flash {
using namespace nvcuda;
typedef __nv_bfloat16 bf;
constexpr unsigned HD = 64;     // head dimension
constexpr unsigned HDP = 72;    // row stride (elements) of staged bf16 q/k/v/dO rows (16-byte rows apart)
constexpr unsigned WARPS = 4;
constexpr unsigned U = 4;       // float4 loads in flight per thread while staging

// Row stride (floats) of a warp's f32 scratch: wide enough for a score row (tp) and an output row (64).
__device__ __forceinline__ unsigned scratch_stride(unsigned tp) { return (tp > HD ? tp : HD) + 4; }

typedef wmma::fragment<wmma::matrix_a, 16, 16, 16, bf, wmma::row_major> FragA;
typedef wmma::fragment<wmma::matrix_b, 16, 16, 16, bf, wmma::col_major> FragBt;  // a transposed operand
typedef wmma::fragment<wmma::matrix_b, 16, 16, 16, bf, wmma::row_major> FragB;
typedef wmma::fragment<wmma::accumulator, 16, 16, 16, float> FragC;

// Stages rows r0 .. r0 + n − 1 of one 64-column block of a row-major f32 matrix (row stride
// `stride`, block at column `col`, image base offset `base`) into dst [n][HDP] as bf16; rows ≥ t
// become zeros. Threads tid (of nth) share the work, U loads in flight each.
__device__ __forceinline__ void stage(bf* dst, const float* __restrict__ src, size_t base, unsigned r0, unsigned n,
                                      unsigned t, unsigned stride, unsigned col, unsigned tid, unsigned nth) {
  const unsigned total = n * (HD / 4);
  for (unsigned i0 = tid; i0 < total; i0 += U * nth) {
    float4 v[U];
#pragma unroll
    for (unsigned u = 0; u < U; u++) {
      const unsigned idx = i0 + u * nth, r = idx / (HD / 4), c4 = idx % (HD / 4);
      v[u] = make_float4(0.f, 0.f, 0.f, 0.f);
      if (idx < total && r0 + r < t) v[u] = __ldg(reinterpret_cast<const float4*>(src + base + (size_t)(r0 + r) * stride + col + 4 * c4));
    }
#pragma unroll
    for (unsigned u = 0; u < U; u++) {
      const unsigned idx = i0 + u * nth, r = idx / (HD / 4), c4 = idx % (HD / 4);
      if (idx < total) {
        __nv_bfloat162* d = reinterpret_cast<__nv_bfloat162*>(dst + r * HDP + 4 * c4);
        d[0] = __floats2bfloat162_rn(v[u].x, v[u].y);
        d[1] = __floats2bfloat162_rn(v[u].z, v[u].w);
      }
    }
  }
}

// out[16 × tp] (row-major f32, stride ldo) = a[16 × 64] · bᵀ for b [tp][HDP] (bf16 rows): the 16
// score rows of one warp against every staged row of b.
__device__ __forceinline__ void rows_times_t(const bf* a, const bf* b, unsigned tp, float* out, unsigned ldo) {
  FragA fa[HD / 16];
#pragma unroll
  for (unsigned k = 0; k < HD / 16; k++) wmma::load_matrix_sync(fa[k], a + 16 * k, HDP);
  for (unsigned n = 0; n < tp / 16; n++) {
    FragC c;
    wmma::fill_fragment(c, 0.f);
#pragma unroll
    for (unsigned k = 0; k < HD / 16; k++) {
      FragBt fb;
      wmma::load_matrix_sync(fb, b + n * 16 * HDP + 16 * k, HDP);
      wmma::mma_sync(c, fa[k], fb, c);
    }
    wmma::store_matrix_sync(out + 16 * n, c, ldo, wmma::mem_row_major);
  }
}

// out[16 × 64] (f32, stride ldo) = p[16 × tp] (bf16, stride ldp) · b [tp][HDP].
__device__ __forceinline__ void rows_times(const bf* p, unsigned ldp, const bf* b, unsigned tp, float* out, unsigned ldo) {
#pragma unroll
  for (unsigned n = 0; n < HD / 16; n++) {
    FragC c;
    wmma::fill_fragment(c, 0.f);
    for (unsigned k = 0; k < tp / 16; k++) {
      FragA fa;
      FragB fb;
      wmma::load_matrix_sync(fa, p + 16 * k, ldp);
      wmma::load_matrix_sync(fb, b + k * 16 * HDP + 16 * n, HDP);
      wmma::mma_sync(c, fa, fb, c);
    }
    wmma::store_matrix_sync(out + 16 * n, c, ldo, wmma::mem_row_major);
  }
}

// Writes the warp's 16 × 64 result rows (f32 scratch x, stride ldx), times `mul`, to dst rows
// r0 + r < t at column `col` (row stride `stride`, image base `base`).
__device__ __forceinline__ void write_rows(const float* x, unsigned ldx, float mul, float* __restrict__ dst, size_t base,
                                           unsigned r0, unsigned t, unsigned stride, unsigned col) {
  const unsigned lane = threadIdx.x & 31;
  for (unsigned idx = lane; idx < 16 * HD; idx += 32) {
    const unsigned r = idx / HD, e = idx % HD;
    if (r0 + r < t) dst[base + (size_t)(r0 + r) * stride + col + e] = mul * x[r * ldx + e];
  }
}
}  // namespace snella_flash

// Forward. lse may be null (inference: nothing saved).
extern "C" __global__ void __launch_bounds__(128)
    snella_flash_attn_fwd(const float* __restrict__ qkv, float* __restrict__ out, float* __restrict__ lse, unsigned t,
                          unsigned tp, unsigned heads, float scale) {
  using namespace snella_flash;
  extern __shared__ __align__(128) unsigned char snella_flash_fwd_sm[];
  const unsigned img = blockIdx.z, h = blockIdx.y, warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const unsigned d = heads * HD, r3 = 3 * d, sf = scratch_stride(tp), sp = tp + 8;
  bf* ks = reinterpret_cast<bf*>(snella_flash_fwd_sm);  // [tp][HDP]
  bf* vs = ks + tp * HDP;                                // [tp][HDP]
  bf* qw = vs + tp * HDP + warp * 16 * HDP;              // [WARPS][16][HDP]
  float* xw = reinterpret_cast<float*>(vs + tp * HDP + WARPS * 16 * HDP) + warp * 16 * sf;  // [WARPS][16][sf]
  bf* pw = reinterpret_cast<bf*>(reinterpret_cast<float*>(vs + tp * HDP + WARPS * 16 * HDP) + WARPS * 16 * sf) + warp * 16 * sp;
  const size_t base = (size_t)img * t * r3;
  stage(ks, qkv, base, 0, tp, t, r3, d + h * HD, threadIdx.x, blockDim.x);
  stage(vs, qkv, base, 0, tp, t, r3, 2 * d + h * HD, threadIdx.x, blockDim.x);
  __syncthreads();
  for (unsigned tile = blockIdx.x * WARPS + warp; tile * 16 < t; tile += gridDim.x * WARPS) {
    const unsigned w0 = tile * 16;
    stage(qw, qkv, base, w0, 16, t, r3, h * HD, lane, 32);
    __syncwarp();
    rows_times_t(qw, ks, tp, xw, sf);
    __syncwarp();
    for (unsigned r = 0; r < 16; r++) {
      float* srow = xw + r * sf;
      float mx = -INFINITY;
      for (unsigned j = lane; j < t; j += 32) mx = fmaxf(mx, scale * srow[j]);
      mx = snella_warp_max(mx);
      float sum = 0.f;
      for (unsigned j = lane; j < t; j += 32) {
        const float e = expf(scale * srow[j] - mx);
        srow[j] = e;
        sum += e;
      }
      sum = snella_warp_sum(sum);
      const float inv = 1.f / sum;
      for (unsigned j = lane; j < tp; j += 32) pw[r * sp + j] = __float2bfloat16_rn(j < t ? srow[j] * inv : 0.f);
      if (lse != nullptr && lane == 0 && w0 + r < t) lse[((size_t)img * heads + h) * t + w0 + r] = mx + logf(sum);
    }
    __syncwarp();
    rows_times(pw, sp, vs, tp, xw, sf);
    __syncwarp();
    write_rows(xw, sf, 1.f, out, (size_t)img * t * d, w0, t, d, h * HD);
    __syncwarp();
  }
}

// Backward, query tiles: dsum[b, heads, t] = rowsum(dO ⊙ O) and the q columns of dqkv.
extern "C" __global__ void __launch_bounds__(128)
    snella_flash_attn_bwd_dq(const float* __restrict__ qkv, const float* __restrict__ out, const float* __restrict__ dout,
                             const float* __restrict__ lse, float* __restrict__ dsum, float* __restrict__ dqkv, unsigned t,
                             unsigned tp, unsigned heads, float scale) {
  using namespace snella_flash;
  extern __shared__ __align__(128) unsigned char snella_flash_dq_sm[];
  const unsigned img = blockIdx.z, h = blockIdx.y, warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const unsigned d = heads * HD, r3 = 3 * d, sf = scratch_stride(tp), sp = tp + 8;
  bf* ks = reinterpret_cast<bf*>(snella_flash_dq_sm);  // [tp][HDP]
  bf* vs = ks + tp * HDP;                              // [tp][HDP]
  bf* qw = vs + tp * HDP + warp * 32 * HDP;            // [WARPS][2][16][HDP]: q rows, then dO rows
  bf* dow = qw + 16 * HDP;
  float* xw = reinterpret_cast<float*>(vs + tp * HDP + WARPS * 32 * HDP) + warp * 16 * sf;
  bf* pw = reinterpret_cast<bf*>(reinterpret_cast<float*>(vs + tp * HDP + WARPS * 32 * HDP) + WARPS * 16 * sf) + warp * 16 * sp;
  const size_t base = (size_t)img * t * r3, obase = (size_t)img * t * d, rbase = ((size_t)img * heads + h) * t;
  stage(ks, qkv, base, 0, tp, t, r3, d + h * HD, threadIdx.x, blockDim.x);
  stage(vs, qkv, base, 0, tp, t, r3, 2 * d + h * HD, threadIdx.x, blockDim.x);
  __syncthreads();
  for (unsigned tile = blockIdx.x * WARPS + warp; tile * 16 < t; tile += gridDim.x * WARPS) {
    const unsigned w0 = tile * 16;
    stage(qw, qkv, base, w0, 16, t, r3, h * HD, lane, 32);
    stage(dow, dout, obase, w0, 16, t, d, h * HD, lane, 32);
    float dr[16], lr[16];
#pragma unroll
    for (unsigned r = 0; r < 16; r++) {
      const unsigned q = w0 + r;
      float v = 0.f;
      if (q < t)
        for (unsigned e = lane; e < HD; e += 32) v += dout[obase + (size_t)q * d + h * HD + e] * out[obase + (size_t)q * d + h * HD + e];
      v = snella_warp_sum(v);
      dr[r] = v;
      lr[r] = q < t ? lse[rbase + q] : 0.f;
      if (lane == 0 && q < t) dsum[rbase + q] = v;
    }
    __syncwarp();
    rows_times_t(qw, ks, tp, xw, sf);  // S
    __syncwarp();
#pragma unroll
    for (unsigned r = 0; r < 16; r++)
      for (unsigned j = lane; j < tp; j += 32)
        pw[r * sp + j] = __float2bfloat16_rn(j < t && w0 + r < t ? expf(scale * xw[r * sf + j] - lr[r]) : 0.f);
    __syncwarp();
    rows_times_t(dow, vs, tp, xw, sf);  // dP
    __syncwarp();
#pragma unroll
    for (unsigned r = 0; r < 16; r++)
      for (unsigned j = lane; j < tp; j += 32)
        pw[r * sp + j] = __float2bfloat16_rn(__bfloat162float(pw[r * sp + j]) * (xw[r * sf + j] - dr[r]));  // dS
    __syncwarp();
    rows_times(pw, sp, ks, tp, xw, sf);  // dS·k
    __syncwarp();
    write_rows(xw, sf, scale, dqkv, base, w0, t, r3, h * HD);
    __syncwarp();
  }
}

// Backward, key tiles: the k and v columns of dqkv (after snella_flash_attn_bwd_dq wrote dsum).
extern "C" __global__ void __launch_bounds__(128)
    snella_flash_attn_bwd_dkv(const float* __restrict__ qkv, const float* __restrict__ dout, const float* __restrict__ lse,
                              const float* __restrict__ dsum, float* __restrict__ dqkv, unsigned t, unsigned tp,
                              unsigned heads, float scale) {
  using namespace snella_flash;
  extern __shared__ __align__(128) unsigned char snella_flash_dkv_sm[];
  const unsigned img = blockIdx.z, h = blockIdx.y, warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const unsigned d = heads * HD, r3 = 3 * d, sf = scratch_stride(tp), sp = tp + 8;
  bf* qs = reinterpret_cast<bf*>(snella_flash_dkv_sm);  // [tp][HDP] every query
  bf* dos = qs + tp * HDP;                              // [tp][HDP]
  bf* kw = dos + tp * HDP + warp * 32 * HDP;            // [WARPS][2][16][HDP]: key rows, then v rows
  bf* vw = kw + 16 * HDP;
  float* xw = reinterpret_cast<float*>(dos + tp * HDP + WARPS * 32 * HDP) + warp * 16 * sf;
  bf* pw = reinterpret_cast<bf*>(reinterpret_cast<float*>(dos + tp * HDP + WARPS * 32 * HDP) + WARPS * 16 * sf) + warp * 16 * sp;
  float* ls = reinterpret_cast<float*>(reinterpret_cast<bf*>(reinterpret_cast<float*>(dos + tp * HDP + WARPS * 32 * HDP) + WARPS * 16 * sf) + WARPS * 16 * sp);  // [tp]
  float* ds = ls + tp;  // [tp]
  const size_t base = (size_t)img * t * r3, obase = (size_t)img * t * d, rbase = ((size_t)img * heads + h) * t;
  stage(qs, qkv, base, 0, tp, t, r3, h * HD, threadIdx.x, blockDim.x);
  stage(dos, dout, obase, 0, tp, t, d, h * HD, threadIdx.x, blockDim.x);
  for (unsigned q = threadIdx.x; q < tp; q += blockDim.x) {
    ls[q] = q < t ? lse[rbase + q] : 0.f;
    ds[q] = q < t ? dsum[rbase + q] : 0.f;
  }
  __syncthreads();
  for (unsigned tile = blockIdx.x * WARPS + warp; tile * 16 < t; tile += gridDim.x * WARPS) {
    const unsigned w0 = tile * 16;
    stage(kw, qkv, base, w0, 16, t, r3, d + h * HD, lane, 32);
    stage(vw, qkv, base, w0, 16, t, r3, 2 * d + h * HD, lane, 32);
    __syncwarp();
    rows_times_t(kw, qs, tp, xw, sf);  // Sᵀ: keys × queries
    __syncwarp();
    for (unsigned r = 0; r < 16; r++)
      for (unsigned q = lane; q < tp; q += 32)
        pw[r * sp + q] = __float2bfloat16_rn(q < t && w0 + r < t ? expf(scale * xw[r * sf + q] - ls[q]) : 0.f);
    __syncwarp();
    rows_times(pw, sp, dos, tp, xw, sf);  // dv = Pᵀ·dO
    __syncwarp();
    write_rows(xw, sf, 1.f, dqkv, base, w0, t, r3, 2 * d + h * HD);
    __syncwarp();
    rows_times_t(vw, dos, tp, xw, sf);  // dPᵀ = v·dOᵀ
    __syncwarp();
    for (unsigned r = 0; r < 16; r++)
      for (unsigned q = lane; q < tp; q += 32)
        pw[r * sp + q] = __float2bfloat16_rn(__bfloat162float(pw[r * sp + q]) * (xw[r * sf + q] - ds[q]));  // dSᵀ
    __syncwarp();
    rows_times(pw, sp, qs, tp, xw, sf);  // dk = dSᵀ·q
    __syncwarp();
    write_rows(xw, sf, scale, dqkv, base, w0, t, r3, d + h * HD);
    __syncwarp();
  }
}
