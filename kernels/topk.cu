// Exact top-k by magnitude (spec §2): radix select on the f32 bit pattern of |x|, no sort, ties broken
// by lower flat index. CPU reference: snella_core::snella::topk::select_topk (+ its tie_cut).
//
// Key of an entry: the bits of |x| when |x| > 0, else 0 (NaN, ±0 count as magnitude 0). Keys are
// monotone in the magnitude and use bits 30..0 only. The select fixes the bits of the k-th largest
// key in three passes (bits 30..20, 19..9, 8..0): snella_topk_hist builds a histogram of the next
// digit over the keys matching the prefix fixed so far (shared-memory histogram, warp-aggregated
// integer atomics, then integer atomics into the global one: exact and order-independent), and
// snella_topk_select (one block) finds the bucket holding the k-th largest key, updates the prefix and
// the rank still needed, and clears the histogram. Every kernel reads the previous one's state from the
// device state buffer, so the host never synchronises.
// snella_topk_ties then counts, per fixed chunk, the keys equal to the threshold and the largest key
// below it (for τ), and snella_topk_finish (one block) finds the flat index of the `ties`-th tie
// (`tie_cut` = that index + 1) and writes the result words.
//
// State buffer (u32 words), also the `Kept` struct read by sparsify.cu:
//   [0] threshold (f32 bits) [1] tie_cut [2] tau (f32 bits) [3] k [4] ties (kept entries == threshold)
//   [8] prefix [9] need [10] count of keys == prefix in the last bucket [11] max key < threshold
//   [16 .. 16+2048) histogram, [2064 .. 2064+4096) per-chunk tie counts. Must start zeroed.
// Kept set: |x| > threshold, or |x| == threshold and flat index < tie_cut (exactly k entries).
// k = 0: threshold = tau = max |x|, tie_cut = ties = 0. k = n: tau = 0.
#include "common.cuh"

namespace snella_topk {
constexpr unsigned W_THR = 0, W_CUT = 1, W_TAU = 2, W_K = 3, W_TIES = 4;
constexpr unsigned W_PREFIX = 8, W_NEED = 9, W_COUNT = 10, W_TAUMAX = 11;
constexpr unsigned W_HIST = 16, HIST_BINS = 2048;
constexpr unsigned W_CNT = W_HIST + HIST_BINS, MAX_CHUNKS = 4096;

__device__ __forceinline__ unsigned key(float x) {
  const float a = fabsf(x);
  return a > 0.f ? __float_as_uint(a) : 0u;
}

// Digit geometry of pass 0, 1, 2.
__device__ __forceinline__ void geom(unsigned pass, unsigned& shift, unsigned& nb, unsigned& pmask) {
  if (pass == 0) {
    shift = 20; nb = 2048; pmask = 0u;
  } else if (pass == 1) {
    shift = 9; nb = 2048; pmask = 0xFFF00000u;
  } else {
    shift = 0; nb = 512; pmask = 0xFFFFFE00u;
  }
}

// Block-wide exclusive prefix sum of v (u32) over up to 1024 threads; *total gets the block sum.
// scratch: 32 shared words. Contains __syncthreads: every thread must call it.
__device__ __forceinline__ unsigned block_excl_scan(unsigned v, unsigned* scratch, unsigned* total) {
  const unsigned lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = (blockDim.x + 31) >> 5;
  unsigned x = v;
  for (int o = 1; o < 32; o <<= 1) {
    const unsigned y = __shfl_up_sync(0xffffffffu, x, o);
    if (lane >= (unsigned)o) x += y;
  }
  __syncthreads();  // scratch free from a previous call
  if (lane == 31) scratch[warp] = x;
  __syncthreads();
  if (warp == 0) {
    unsigned w = lane < nw ? scratch[lane] : 0u;
    for (int o = 1; o < 32; o <<= 1) {
      const unsigned y = __shfl_up_sync(0xffffffffu, w, o);
      if (lane >= (unsigned)o) w += y;
    }
    scratch[lane] = w;  // inclusive prefix of the warp totals
  }
  __syncthreads();
  *total = scratch[nw - 1];
  return (warp ? scratch[warp - 1] : 0u) + x - v;
}
}  // namespace snella_topk

// Histogram of digit `pass` over the keys matching the current prefix. Grid-stride, 256 threads.
extern "C" __global__ void __launch_bounds__(256)
    snella_topk_hist(const float* __restrict__ m, unsigned long long n, unsigned* __restrict__ st, unsigned pass) {
  using namespace snella_topk;
  __shared__ unsigned h[HIST_BINS];
  unsigned shift, nb, pmask;
  geom(pass, shift, nb, pmask);
  const unsigned prefix = st[W_PREFIX];
  for (unsigned b = threadIdx.x; b < nb; b += blockDim.x) h[b] = 0u;
  __syncthreads();
  const unsigned lane = threadIdx.x & 31;
  const unsigned long long stride = (unsigned long long)gridDim.x * blockDim.x;
  // `base` is the same for every lane of a warp, so the loop and the warp intrinsics stay converged.
  for (unsigned long long base = (unsigned long long)blockIdx.x * blockDim.x + (threadIdx.x & ~31u); base < n;
       base += stride) {
    const unsigned long long idx = base + lane;
    bool ok = idx < n;
    const unsigned kk = ok ? key(m[idx]) : 0u;
    ok = ok && (kk & pmask) == prefix;
    const unsigned bin = (kk >> shift) & (nb - 1);
    const unsigned act = __ballot_sync(0xffffffffu, ok);
    if (ok) {
      const unsigned peers = __match_any_sync(act, bin);
      if (lane == (unsigned)(__ffs(peers) - 1)) atomicAdd(&h[bin], (unsigned)__popc(peers));
    }
  }
  __syncthreads();
  for (unsigned b = threadIdx.x; b < nb; b += blockDim.x)
    if (h[b]) atomicAdd(&st[W_HIST + b], h[b]);
}

// Finds the bucket of pass `pass` holding the need-th largest key (need = k0 on pass 0), appends its
// digit to the prefix, stores the remaining rank and the bucket's count, and clears the histogram.
// One block of 1024 threads.
extern "C" __global__ void __launch_bounds__(1024) snella_topk_select(unsigned* __restrict__ st, unsigned pass,
                                                                      unsigned k0) {
  using namespace snella_topk;
  __shared__ unsigned scratch[32];
  unsigned shift, nb, pmask;
  geom(pass, shift, nb, pmask);
  const unsigned need = pass == 0 ? k0 : st[W_NEED];
  const unsigned t = threadIdx.x;
  const bool has = 2 * t < nb;
  // Thread t owns bins nb−1−2t and nb−2−2t (descending order = descending keys).
  const unsigned c0 = has ? st[W_HIST + nb - 1 - 2 * t] : 0u;
  const unsigned c1 = has ? st[W_HIST + nb - 2 - 2 * t] : 0u;
  unsigned total;
  const unsigned above = block_excl_scan(c0 + c1, scratch, &total);
  if (has) {
    unsigned bin = 0xFFFFFFFFu, above_bin = 0, cnt = 0;
    if (above < need && need - above <= c0) {
      bin = nb - 1 - 2 * t; above_bin = above; cnt = c0;
    } else if (above + c0 < need && need - above - c0 <= c1) {
      bin = nb - 2 - 2 * t; above_bin = above + c0; cnt = c1;
    }
    if (bin != 0xFFFFFFFFu) {
      st[W_PREFIX] = st[W_PREFIX] | (bin << shift);
      st[W_NEED] = need - above_bin;
      st[W_COUNT] = cnt;
    }
  }
  __syncthreads();
  for (unsigned b = t; b < HIST_BINS; b += blockDim.x) st[W_HIST + b] = 0u;
}

// Per chunk [blockIdx.x·chunk, +chunk): the number of keys equal to the threshold (the final prefix)
// → st[W_CNT + blockIdx.x], and the largest key below it → atomicMax into st[W_TAUMAX]. 256 threads.
extern "C" __global__ void __launch_bounds__(256)
    snella_topk_ties(const float* __restrict__ m, unsigned long long n, unsigned* __restrict__ st,
                     unsigned long long chunk) {
  using namespace snella_topk;
  __shared__ unsigned rc[8], rm[8];
  const unsigned thr = st[W_PREFIX];
  const unsigned long long lo = (unsigned long long)blockIdx.x * chunk;
  const unsigned long long hi = min(lo + chunk, n);
  unsigned cnt = 0, mx = 0;
  for (unsigned long long idx = lo + threadIdx.x; idx < hi; idx += blockDim.x) {
    const unsigned kk = key(m[idx]);
    cnt += kk == thr;
    if (kk < thr) mx = max(mx, kk);
  }
  for (int o = 16; o > 0; o >>= 1) {
    cnt += __shfl_xor_sync(0xffffffffu, cnt, o);
    mx = max(mx, __shfl_xor_sync(0xffffffffu, mx, o));
  }
  const unsigned lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  if (lane == 0) {
    rc[warp] = cnt;
    rm[warp] = mx;
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    unsigned c = 0, x = 0;
    for (unsigned w = 0; w < (blockDim.x >> 5); w++) {
      c += rc[w];
      x = max(x, rm[w]);
    }
    st[W_CNT + blockIdx.x] = c;
    if (x) atomicMax(&st[W_TAUMAX], x);
  }
}

// Writes the result words. For k ≥ 1 it finds the chunk holding the ties-th key equal to the
// threshold (from the per-chunk counts) and scans that chunk in flat order for its index. One block
// of 1024 threads; nchunks ≤ 4096.
extern "C" __global__ void __launch_bounds__(1024)
    snella_topk_finish(const float* __restrict__ m, unsigned long long n, unsigned* __restrict__ st, unsigned k,
                       unsigned nchunks, unsigned long long chunk) {
  using namespace snella_topk;
  __shared__ unsigned scratch[32];
  __shared__ unsigned sel[2];  // chunk, rank within it
  const unsigned thr = st[W_PREFIX];
  if (k == 0) {
    if (threadIdx.x == 0) {
      st[W_THR] = thr;
      st[W_CUT] = 0u;
      st[W_TAU] = thr;
      st[W_K] = 0u;
      st[W_TIES] = 0u;
    }
    return;
  }
  const unsigned ties = st[W_NEED], count = st[W_COUNT];
  if (threadIdx.x == 0) {
    st[W_THR] = thr;
    st[W_TAU] = (unsigned long long)k == n ? 0u : (ties < count ? thr : st[W_TAUMAX]);
    st[W_K] = k;
    st[W_TIES] = ties;
  }
  // The chunk holding the ties-th tie: thread t owns chunks 4t .. 4t + 3.
  unsigned c[4], sum = 0;
#pragma unroll
  for (int u = 0; u < 4; u++) {
    const unsigned b = 4 * threadIdx.x + u;
    c[u] = (b < nchunks && b < MAX_CHUNKS) ? st[W_CNT + b] : 0u;
    sum += c[u];
  }
  unsigned total;
  unsigned run = block_excl_scan(sum, scratch, &total);
#pragma unroll
  for (int u = 0; u < 4; u++) {
    if (run < ties && ties - run <= c[u]) {
      sel[0] = 4 * threadIdx.x + u;
      sel[1] = ties - run;
    }
    run += c[u];
  }
  __syncthreads();
  const unsigned rank = sel[1];
  const unsigned long long lo = (unsigned long long)sel[0] * chunk, hi = min(lo + chunk, n);
  unsigned seen = 0;
  for (unsigned long long tile = lo; tile < hi; tile += blockDim.x) {
    const unsigned long long idx = tile + threadIdx.x;
    const unsigned f = (idx < hi && key(m[idx]) == thr) ? 1u : 0u;
    unsigned tot;
    const unsigned ex = block_excl_scan(f, scratch, &tot);
    if (f && seen + ex + 1 == rank) st[W_CUT] = (unsigned)(idx + 1);
    seen += tot;  // block-uniform
    if (seen >= rank) break;
  }
}
