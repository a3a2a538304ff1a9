// Multi-head self-attention core (timm Attention between qkv and proj), forward and backward, f32.
// CPU reference: snella_core::ops::attention::{attention_fwd, attention_bwd}.
//
// Layout: qkv [b, t, 3·d], column s·d + h·hd + e is q/k/v (s = 0/1/2) of head h, element e;
// out / dout [b, t, d] with column h·hd + e; probs [b, heads, t, t]. d = heads·hd, hd ≤ 128,
// any t. Scores are scaled by hd^-0.5 (passed in as `scale`); the softmax runs over keys.
//
// The probabilities are materialised (the backward needs them), so the forward writes the scaled
// scores straight into `probs`, normalises each row in place, then forms P·V. Every block works on
// one (batch, head) and a tile of SNELLA_ATT_QT query rows (or SNELLA_ATT_KT key rows for dk/dv),
// with keys/values streamed through shared memory in tiles of SNELLA_ATT_KT rows. No atomics:
// every output element is summed by one thread in a fixed order, so results are deterministic.
#include "common.cuh"

#define SNELLA_ATT_QT 16       // query rows per block
#define SNELLA_ATT_KT 32       // key rows per shared-memory tile
#define SNELLA_ATT_MAXHD 128   // largest head dim
#define SNELLA_ATT_LD 129      // shared row stride capacity (hd | 1 ≤ 129)
#define SNELLA_ATT_THREADS 256
#define SNELLA_ATT_ACC ((SNELLA_ATT_QT * SNELLA_ATT_MAXHD) / SNELLA_ATT_THREADS)   // 8
#define SNELLA_ATT_ACC_KV ((SNELLA_ATT_KT * SNELLA_ATT_MAXHD) / SNELLA_ATT_THREADS)  // 16

// Copies rows [r0, r0 + n) of one head's slot (base already points at slot/head column 0) into
// dst [n, ld]; src row stride `stride` floats.
static __device__ __forceinline__ void snella_att_load_rows(float* __restrict__ dst, const float* __restrict__ base,
                                                            size_t stride, unsigned r0, unsigned n, unsigned hd,
                                                            unsigned ld) {
  for (unsigned idx = threadIdx.x; idx < n * hd; idx += blockDim.x) {
    unsigned r = idx / hd, e = idx - r * hd;
    dst[r * ld + e] = base[(size_t)(r0 + r) * stride + e];
  }
}

// Copies the [nr, nc] tile at (r0, c0) of a row-major [*, t] matrix into dst [SNELLA_ATT_*][KT + 1].
static __device__ __forceinline__ void snella_att_load_tile(float (*dst)[SNELLA_ATT_KT + 1], const float* src,
                                                            unsigned t, unsigned r0, unsigned nr, unsigned c0,
                                                            unsigned nc) {
  for (unsigned idx = threadIdx.x; idx < nr * SNELLA_ATT_KT; idx += blockDim.x) {
    unsigned r = idx / SNELLA_ATT_KT, c = idx - r * SNELLA_ATT_KT;
    if (c < nc) dst[r][c] = src[(size_t)(r0 + r) * t + c0 + c];
  }
}

// Grid (ceil(t / QT), b·heads), block 256. Writes probs rows [i0, i0 + QT) of head (bi, h) and
// out[bi, i, h·hd : (h+1)·hd] for those rows.
extern "C" __global__ void __launch_bounds__(SNELLA_ATT_THREADS)
    snella_attention_fwd(const float* __restrict__ qkv, float* __restrict__ out, float* __restrict__ probs, unsigned t,
                         unsigned heads, unsigned hd, float scale) {
  __shared__ float qs[SNELLA_ATT_QT * SNELLA_ATT_LD];
  __shared__ float ts[SNELLA_ATT_KT * SNELLA_ATT_LD];
  __shared__ float ps[SNELLA_ATT_QT][SNELLA_ATT_KT + 1];
  const unsigned bh = blockIdx.y, bi = bh / heads, h = bh - bi * heads;
  const unsigned d = heads * hd, ld = hd | 1u;
  const size_t row3 = 3 * (size_t)d;
  const unsigned i0 = blockIdx.x * SNELLA_ATT_QT, nq = min(SNELLA_ATT_QT, t - i0);
  const float* base = qkv + (size_t)bi * t * row3 + (size_t)h * hd;
  float* P = probs + (size_t)bh * t * t;
  const unsigned tid = threadIdx.x, warp = tid >> 5, lane = tid & 31, nwarps = blockDim.x >> 5;

  snella_att_load_rows(qs, base, row3, i0, nq, hd, ld);
  // 1. Scaled scores S = scale·q·kᵀ into P.
  for (unsigned j0 = 0; j0 < t; j0 += SNELLA_ATT_KT) {
    const unsigned nk = min(SNELLA_ATT_KT, t - j0);
    __syncthreads();
    snella_att_load_rows(ts, base + d, row3, j0, nk, hd, ld);
    __syncthreads();
    for (unsigned idx = tid; idx < SNELLA_ATT_QT * SNELLA_ATT_KT; idx += blockDim.x) {
      const unsigned ii = idx / SNELLA_ATT_KT, jj = idx - ii * SNELLA_ATT_KT;
      if (ii < nq && jj < nk) {
        const float* qr = qs + ii * ld;
        const float* kr = ts + jj * ld;
        float acc = 0.f;
        for (unsigned e = 0; e < hd; ++e) acc += qr[e] * kr[e];
        P[(size_t)(i0 + ii) * t + j0 + jj] = scale * acc;
      }
    }
  }
  __syncthreads();
  // 2. Row softmax in place, one warp per row.
  for (unsigned ii = warp; ii < nq; ii += nwarps) {
    float* row = P + (size_t)(i0 + ii) * t;
    float mx = -INFINITY;
    for (unsigned j = lane; j < t; j += 32) mx = fmaxf(mx, row[j]);
    mx = snella_warp_max(mx);
    float s = 0.f;
    for (unsigned j = lane; j < t; j += 32) {
      float e = expf(row[j] - mx);
      row[j] = e;
      s += e;
    }
    s = snella_warp_sum(s);
    const float inv = 1.0f / s;
    for (unsigned j = lane; j < t; j += 32) row[j] *= inv;
  }
  __syncthreads();
  // 3. O = P·V.
  float acc[SNELLA_ATT_ACC];
#pragma unroll
  for (int k = 0; k < SNELLA_ATT_ACC; ++k) acc[k] = 0.f;
  const unsigned nout = nq * hd;
  for (unsigned j0 = 0; j0 < t; j0 += SNELLA_ATT_KT) {
    const unsigned nk = min(SNELLA_ATT_KT, t - j0);
    __syncthreads();
    snella_att_load_rows(ts, base + 2 * (size_t)d, row3, j0, nk, hd, ld);
    snella_att_load_tile(ps, P, t, i0, nq, j0, nk);
    __syncthreads();
#pragma unroll
    for (int k = 0; k < SNELLA_ATT_ACC; ++k) {
      const unsigned idx = tid + k * SNELLA_ATT_THREADS;
      if (idx < nout) {
        const unsigned ii = idx / hd, e = idx - ii * hd;
        float a = acc[k];
        for (unsigned jj = 0; jj < nk; ++jj) a += ps[ii][jj] * ts[jj * ld + e];
        acc[k] = a;
      }
    }
  }
#pragma unroll
  for (int k = 0; k < SNELLA_ATT_ACC; ++k) {
    const unsigned idx = tid + k * SNELLA_ATT_THREADS;
    if (idx < nout) {
      const unsigned ii = idx / hd, e = idx - ii * hd;
      out[((size_t)bi * t + i0 + ii) * d + (size_t)h * hd + e] = acc[k];
    }
  }
}

// Backward, part 1. Grid (ceil(t / QT), b·heads), block 256. For query rows [i0, i0 + QT) of head
// (bi, h): dP = dO·vᵀ, dS = P ⊙ (dP − rowsum(dP ⊙ P)) written to ds [b, heads, t, t] (scratch),
// then dq = scale·dS·k written to dqkv (slot 0).
extern "C" __global__ void __launch_bounds__(SNELLA_ATT_THREADS)
    snella_attention_bwd_dq(const float* __restrict__ dout, const float* __restrict__ qkv,
                            const float* __restrict__ probs, float* __restrict__ ds, float* __restrict__ dqkv,
                            unsigned t, unsigned heads, unsigned hd, float scale) {
  __shared__ float os[SNELLA_ATT_QT * SNELLA_ATT_LD];
  __shared__ float ts[SNELLA_ATT_KT * SNELLA_ATT_LD];
  __shared__ float ss[SNELLA_ATT_QT][SNELLA_ATT_KT + 1];
  const unsigned bh = blockIdx.y, bi = bh / heads, h = bh - bi * heads;
  const unsigned d = heads * hd, ld = hd | 1u;
  const size_t row3 = 3 * (size_t)d;
  const unsigned i0 = blockIdx.x * SNELLA_ATT_QT, nq = min(SNELLA_ATT_QT, t - i0);
  const float* base = qkv + (size_t)bi * t * row3 + (size_t)h * hd;
  const float* P = probs + (size_t)bh * t * t;
  float* S = ds + (size_t)bh * t * t;
  const unsigned tid = threadIdx.x, warp = tid >> 5, lane = tid & 31, nwarps = blockDim.x >> 5;

  snella_att_load_rows(os, dout + (size_t)bi * t * d + (size_t)h * hd, d, i0, nq, hd, ld);
  // 1. dP = dO·vᵀ into S.
  for (unsigned j0 = 0; j0 < t; j0 += SNELLA_ATT_KT) {
    const unsigned nk = min(SNELLA_ATT_KT, t - j0);
    __syncthreads();
    snella_att_load_rows(ts, base + 2 * (size_t)d, row3, j0, nk, hd, ld);
    __syncthreads();
    for (unsigned idx = tid; idx < SNELLA_ATT_QT * SNELLA_ATT_KT; idx += blockDim.x) {
      const unsigned ii = idx / SNELLA_ATT_KT, jj = idx - ii * SNELLA_ATT_KT;
      if (ii < nq && jj < nk) {
        const float* orow = os + ii * ld;
        const float* vr = ts + jj * ld;
        float acc = 0.f;
        for (unsigned e = 0; e < hd; ++e) acc += orow[e] * vr[e];
        S[(size_t)(i0 + ii) * t + j0 + jj] = acc;
      }
    }
  }
  __syncthreads();
  // 2. dS = P ⊙ (dP − Σ_j dP·P), one warp per row, in place.
  for (unsigned ii = warp; ii < nq; ii += nwarps) {
    float* srow = S + (size_t)(i0 + ii) * t;
    const float* prow = P + (size_t)(i0 + ii) * t;
    float dot = 0.f;
    for (unsigned j = lane; j < t; j += 32) dot += srow[j] * prow[j];
    dot = snella_warp_sum(dot);
    for (unsigned j = lane; j < t; j += 32) srow[j] = prow[j] * (srow[j] - dot);
  }
  __syncthreads();
  // 3. dq = scale·dS·k.
  float acc[SNELLA_ATT_ACC];
#pragma unroll
  for (int k = 0; k < SNELLA_ATT_ACC; ++k) acc[k] = 0.f;
  const unsigned nout = nq * hd;
  for (unsigned j0 = 0; j0 < t; j0 += SNELLA_ATT_KT) {
    const unsigned nk = min(SNELLA_ATT_KT, t - j0);
    __syncthreads();
    snella_att_load_rows(ts, base + d, row3, j0, nk, hd, ld);
    snella_att_load_tile(ss, S, t, i0, nq, j0, nk);
    __syncthreads();
#pragma unroll
    for (int k = 0; k < SNELLA_ATT_ACC; ++k) {
      const unsigned idx = tid + k * SNELLA_ATT_THREADS;
      if (idx < nout) {
        const unsigned ii = idx / hd, e = idx - ii * hd;
        float a = acc[k];
        for (unsigned jj = 0; jj < nk; ++jj) a += ss[ii][jj] * ts[jj * ld + e];
        acc[k] = a;
      }
    }
  }
#pragma unroll
  for (int k = 0; k < SNELLA_ATT_ACC; ++k) {
    const unsigned idx = tid + k * SNELLA_ATT_THREADS;
    if (idx < nout) {
      const unsigned ii = idx / hd, e = idx - ii * hd;
      dqkv[((size_t)bi * t + i0 + ii) * row3 + (size_t)h * hd + e] = scale * acc[k];
    }
  }
}

// Backward, part 2. Grid (ceil(t / KT), b·heads), block 256. For key rows [j0, j0 + KT) of head
// (bi, h): dv = Pᵀ·dO and dk = scale·dSᵀ·q (dS from part 1), summed over query tiles in order,
// written to dqkv (slots 2 and 1).
extern "C" __global__ void __launch_bounds__(SNELLA_ATT_THREADS)
    snella_attention_bwd_dkv(const float* __restrict__ dout, const float* __restrict__ qkv,
                             const float* __restrict__ probs, const float* __restrict__ ds, float* __restrict__ dqkv,
                             unsigned t, unsigned heads, unsigned hd, float scale) {
  __shared__ float os[SNELLA_ATT_QT * SNELLA_ATT_LD];
  __shared__ float qs[SNELLA_ATT_QT * SNELLA_ATT_LD];
  __shared__ float ps[SNELLA_ATT_QT][SNELLA_ATT_KT + 1];
  __shared__ float ss[SNELLA_ATT_QT][SNELLA_ATT_KT + 1];
  const unsigned bh = blockIdx.y, bi = bh / heads, h = bh - bi * heads;
  const unsigned d = heads * hd, ld = hd | 1u;
  const size_t row3 = 3 * (size_t)d;
  const unsigned j0 = blockIdx.x * SNELLA_ATT_KT, nk = min(SNELLA_ATT_KT, t - j0);
  const float* base = qkv + (size_t)bi * t * row3 + (size_t)h * hd;
  const float* dbase = dout + (size_t)bi * t * d + (size_t)h * hd;
  const float* P = probs + (size_t)bh * t * t;
  const float* S = ds + (size_t)bh * t * t;
  const unsigned tid = threadIdx.x;

  float av[SNELLA_ATT_ACC_KV], ak[SNELLA_ATT_ACC_KV];
#pragma unroll
  for (int k = 0; k < SNELLA_ATT_ACC_KV; ++k) av[k] = ak[k] = 0.f;
  const unsigned nout = nk * hd;
  for (unsigned i0 = 0; i0 < t; i0 += SNELLA_ATT_QT) {
    const unsigned nq = min(SNELLA_ATT_QT, t - i0);
    __syncthreads();
    snella_att_load_rows(os, dbase, d, i0, nq, hd, ld);
    snella_att_load_rows(qs, base, row3, i0, nq, hd, ld);
    snella_att_load_tile(ps, P, t, i0, nq, j0, nk);
    snella_att_load_tile(ss, S, t, i0, nq, j0, nk);
    __syncthreads();
#pragma unroll
    for (int k = 0; k < SNELLA_ATT_ACC_KV; ++k) {
      const unsigned idx = tid + k * SNELLA_ATT_THREADS;
      if (idx < nout) {
        const unsigned jj = idx / hd, e = idx - jj * hd;
        float a = av[k], b = ak[k];
        for (unsigned ii = 0; ii < nq; ++ii) {
          a += ps[ii][jj] * os[ii * ld + e];
          b += ss[ii][jj] * qs[ii * ld + e];
        }
        av[k] = a;
        ak[k] = b;
      }
    }
  }
#pragma unroll
  for (int k = 0; k < SNELLA_ATT_ACC_KV; ++k) {
    const unsigned idx = tid + k * SNELLA_ATT_THREADS;
    if (idx < nout) {
      const unsigned jj = idx / hd, e = idx - jj * hd;
      float* o = dqkv + ((size_t)bi * t + j0 + jj) * row3 + (size_t)h * hd + e;
      o[d] = scale * ak[k];
      o[2 * (size_t)d] = av[k];
    }
  }
}
