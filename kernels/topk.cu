// Exact top-k by magnitude (spec §2): radix select on the f32 bit pattern of |x|, no sort, ties broken
// by lower flat index. CPU reference: snella_core::snella::topk::select_topk (+ its tie_cut).
//
// Key of an entry: the bits of |x| when |x| > 0, else 0 (NaN, ±0 count as magnitude 0). Keys are
// monotone in the magnitude and use bits 30..0 only. The select fixes the bits of the k-th largest
// key in three digits (bits 30..20, 19..9, 8..0). snella_topk_hist(pass p) builds the histogram of
// digit p over the keys matching the prefix fixed so far (shared-memory histogram with warp-aggregated
// integer atomics, then integer atomics into the global histogram p: exact and order-independent).
// The selection step of digit p (find the bucket holding the need-th largest key by a block scan of
// histogram p) runs at the start of the NEXT kernel, redundantly in every block, which saves a launch
// per digit; block 0 stores the resulting state for the kernel after. Every kernel reads the state of
// the previous ones from device memory, so the host never synchronises. 4 launches (5 with ties):
// hist 0, hist 1, hist 2, ties, finish.
// snella_topk_ties counts, per fixed chunk, the keys equal to the threshold and the largest key below
// it (for τ); snella_topk_finish (one block) finds the flat index of the `ties`-th tie (tie_cut = that
// index + 1) and writes the result words.
//
// State buffer (u32 words), also the `Kept` struct read by sparsify.cu; must start zeroed:
//   [0] threshold (f32 bits) [1] tie_cut [2] tau (f32 bits) [3] k [4] ties (kept entries == threshold)
//   [8..11) prefix, need, count after digit 0; [12..15) the same after digit 1; [16] max key < threshold
//   [32 ..) histograms of digit 0 (2048 bins), 1 (2048), 2 (512); [4640 .. 4640+4096) per-chunk tie counts.
// Kept set: |x| > threshold, or |x| == threshold and flat index < tie_cut (exactly k entries).
// k = 0: threshold = tau = max |x|, tie_cut = ties = 0. k = n: tau = 0.
#include "common.cuh"

namespace snella_topk {
constexpr unsigned W_THR = 0, W_CUT = 1, W_TAU = 2, W_K = 3, W_TIES = 4;
constexpr unsigned W_S1 = 8, W_S2 = 12, W_TAUMAX = 16;
constexpr unsigned W_HIST0 = 32, W_HIST1 = W_HIST0 + 2048, W_HIST2 = W_HIST1 + 2048;
constexpr unsigned W_CNT = W_HIST2 + 512, MAX_CHUNKS = 4096;
// the layout the batched kernels of merge.cu use through common.cuh
static_assert(W_CNT + MAX_CHUNKS == SNELLA_KEPT_WORDS && W_HIST0 == SNELLA_KEPT_HIST0, "top-k state layout");

__device__ __forceinline__ unsigned key(float x) { return snella_magnitude_key(x); }

// Digit geometry of pass 0, 1, 2: shift, number of bins, mask of the bits fixed before it, and
// the word of its histogram.
struct Geom {
  unsigned shift, nb, pmask, hist;
};
__device__ __forceinline__ Geom geom(unsigned pass) {
  if (pass == 0) return Geom{20u, 2048u, 0u, W_HIST0};
  if (pass == 1) return Geom{9u, 2048u, 0xFFF00000u, W_HIST1};
  return Geom{0u, 512u, 0xFFFFFE00u, W_HIST2};
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

// The selection state after a digit: the prefix fixed so far, the rank of the target among the keys
// matching it (1-based, from the top), and how many keys match it.
struct Sel {
  unsigned prefix, need, count;
};

// Selection step of digit `pass` (whole block): from the state before it (prefix, need) and its
// complete histogram, the bucket holding the need-th largest key. Thread t scans the bins at
// descending positions [t·per, (t+1)·per). scratch: 32 shared words, res: 3 shared words.
__device__ __forceinline__ Sel select_step(const unsigned* __restrict__ st, unsigned pass, unsigned prefix,
                                           unsigned need, unsigned* scratch, unsigned* res) {
  const Geom gm = geom(pass);
  const unsigned* hist = st + gm.hist;
  const unsigned per = (gm.nb + blockDim.x - 1) / blockDim.x, p0 = threadIdx.x * per;
  unsigned sum = 0;
  for (unsigned u = 0; u < per; u++)
    if (p0 + u < gm.nb) sum += hist[gm.nb - 1 - (p0 + u)];
  unsigned total;
  unsigned run = block_excl_scan(sum, scratch, &total);
  for (unsigned u = 0; u < per; u++) {
    if (p0 + u < gm.nb) {
      const unsigned bin = gm.nb - 1 - (p0 + u), c = hist[bin];
      if (run < need && need - run <= c) {
        res[0] = prefix | (bin << gm.shift);
        res[1] = need - run;
        res[2] = c;
      }
      run += c;
    }
  }
  __syncthreads();
  const Sel s{res[0], res[1], res[2]};
  __syncthreads();
  return s;
}

// The state before digit `pass` (k0 = max(k, 1) for digit 0): steps through digit pass − 1 from the
// state stored by the previous kernel. Whole block.
__device__ __forceinline__ Sel state_before(const unsigned* __restrict__ st, unsigned pass, unsigned k0,
                                            unsigned* scratch, unsigned* res) {
  if (pass == 0) return Sel{0u, k0, 0u};
  if (pass == 1) return select_step(st, 0, 0u, k0, scratch, res);
  return select_step(st, pass - 1, st[pass == 2 ? W_S1 : W_S2], st[(pass == 2 ? W_S1 : W_S2) + 1], scratch, res);
}
}  // namespace snella_topk

// Histogram of digit `pass` over the keys matching the prefix fixed by the digits before (whose last
// selection step this kernel performs first; block 0 stores it for the next kernel). Grid-stride,
// 256 threads.
namespace snella_topk {
__device__ __forceinline__ void hist_body(const float* __restrict__ m, unsigned long long n, unsigned* __restrict__ st,
                                          unsigned pass, unsigned k0) {
  __shared__ unsigned h[2048];
  __shared__ unsigned scratch[32], res[3];
  const Sel before = state_before(st, pass, k0, scratch, res);
  if (pass > 0 && blockIdx.x == 0 && threadIdx.x == 0) {
    unsigned* w = st + (pass == 1 ? W_S1 : W_S2);
    w[0] = before.prefix;
    w[1] = before.need;
    w[2] = before.count;
  }
  const Geom gm = geom(pass);
  const unsigned prefix = before.prefix;
  for (unsigned b = threadIdx.x; b < gm.nb; b += blockDim.x) h[b] = 0u;
  __syncthreads();
  const unsigned lane = threadIdx.x & 31;
  // Each warp takes runs of U·32 consecutive entries and loads all U of a lane's values before using
  // any (session 7: one load in flight per thread left the kernel latency-bound at 0.3 waves, ncu).
  // `base` is the same for every lane of a warp, so the loop and the warp intrinsics stay converged.
  constexpr unsigned U = 8;
  const unsigned long long stride = (unsigned long long)gridDim.x * blockDim.x * U;
  for (unsigned long long base = ((unsigned long long)blockIdx.x * blockDim.x + (threadIdx.x & ~31u)) * U; base < n;
       base += stride) {
    unsigned kk[U];
#pragma unroll
    for (unsigned u = 0; u < U; u++) {
      const unsigned long long idx = base + u * 32 + lane;
      kk[u] = idx < n ? key(m[idx]) : 0u;
    }
#pragma unroll
    for (unsigned u = 0; u < U; u++) {
      const bool ok = base + u * 32 + lane < n && (kk[u] & gm.pmask) == prefix;
      snella_hist_add_warp(h, ok, (kk[u] >> gm.shift) & (gm.nb - 1));
    }
  }
  __syncthreads();
  unsigned* gh = st + gm.hist;
  for (unsigned b = threadIdx.x; b < gm.nb; b += blockDim.x)
    if (h[b]) atomicAdd(&gh[b], h[b]);
}
}  // namespace snella_topk

extern "C" __global__ void __launch_bounds__(256)
    snella_topk_hist(const float* __restrict__ m, unsigned long long n, unsigned* __restrict__ st, unsigned pass,
                     unsigned k0) {
  snella_topk::hist_body(m, n, st, pass, k0);
}

// The same for adapter blockIdx.z of a job table (common.cuh SnellaFwdJob: its M, state and k; n
// entries each), session 10.
extern "C" __global__ void __launch_bounds__(256)
    snella_topk_hist_batch(const SnellaFwdJob* __restrict__ jobs, unsigned long long n, unsigned pass) {
  const SnellaFwdJob& jb = jobs[blockIdx.z];
  snella_topk::hist_body(jb.M, n, jb.st, pass, jb.k > 0u ? jb.k : 1u);
}

// Per chunk [blockIdx.x·chunk, +chunk): the number of keys equal to the threshold (after the last
// selection step, done here per block) → st[W_CNT + blockIdx.x], and the largest key below it →
// atomicMax into st[W_TAUMAX]. 256 threads.
namespace snella_topk {
__device__ __forceinline__ void ties_body(const float* __restrict__ m, unsigned long long n, unsigned* __restrict__ st,
                                          unsigned long long chunk) {
  __shared__ unsigned rc[8], rm[8];
  __shared__ unsigned scratch[32], res[3];
  const unsigned thr = state_before(st, 3, 0u, scratch, res).prefix;
  const unsigned long long lo = (unsigned long long)blockIdx.x * chunk;
  const unsigned long long hi = min(lo + chunk, n);
  unsigned cnt = 0, mx = 0;
  // U loads in flight per thread before any use (as in snella_topk_hist)
  constexpr unsigned U = 8;
  for (unsigned long long base = lo + threadIdx.x; base < hi; base += (unsigned long long)blockDim.x * U) {
    unsigned kk[U];
#pragma unroll
    for (unsigned u = 0; u < U; u++) {
      const unsigned long long idx = base + (unsigned long long)u * blockDim.x;
      kk[u] = idx < hi ? key(m[idx]) : 0xFFFFFFFFu;  // out of range: above every key, counted nowhere
    }
#pragma unroll
    for (unsigned u = 0; u < U; u++) {
      cnt += kk[u] == thr;
      if (kk[u] < thr) mx = max(mx, kk[u]);
    }
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
}  // namespace snella_topk

extern "C" __global__ void __launch_bounds__(256)
    snella_topk_ties(const float* __restrict__ m, unsigned long long n, unsigned* __restrict__ st,
                     unsigned long long chunk) {
  snella_topk::ties_body(m, n, st, chunk);
}

// The same for adapter blockIdx.z of a job table (SnellaFwdJob). Harmless for k = 0 (finish ignores
// the counts then), so a batch launches it for every adapter.
extern "C" __global__ void __launch_bounds__(256)
    snella_topk_ties_batch(const SnellaFwdJob* __restrict__ jobs, unsigned long long n, unsigned long long chunk) {
  const SnellaFwdJob& jb = jobs[blockIdx.z];
  snella_topk::ties_body(jb.M, n, jb.st, chunk);
}

// Writes the result words after the last selection step (done here). For k ≥ 1 it finds the chunk
// holding the ties-th key equal to the threshold (from the per-chunk counts of snella_topk_ties) and
// scans that chunk in flat order for its index. One block of 1024 threads; nchunks ≤ 4096.
namespace snella_topk {
__device__ __forceinline__ void finish_body(const float* __restrict__ m, unsigned long long n, unsigned* __restrict__ st,
                                            unsigned k, unsigned nchunks, unsigned long long chunk) {
  __shared__ unsigned scratch[32], res[3];
  __shared__ unsigned sel[2];  // chunk, rank within it
  const Sel fin = state_before(st, 3, 0u, scratch, res);
  const unsigned thr = fin.prefix;
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
  const unsigned ties = fin.need, count = fin.count;
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
}  // namespace snella_topk

extern "C" __global__ void __launch_bounds__(1024)
    snella_topk_finish(const float* __restrict__ m, unsigned long long n, unsigned* __restrict__ st, unsigned k,
                       unsigned nchunks, unsigned long long chunk) {
  snella_topk::finish_body(m, n, st, k, nchunks, chunk);
}

// The same for adapter blockIdx.z of a job table (SnellaFwdJob: its M, state and k).
extern "C" __global__ void __launch_bounds__(1024)
    snella_topk_finish_batch(const SnellaFwdJob* __restrict__ jobs, unsigned long long n, unsigned nchunks,
                             unsigned long long chunk) {
  const SnellaFwdJob& jb = jobs[blockIdx.z];
  snella_topk::finish_body(jb.M, n, jb.st, jb.k, nchunks, chunk);
}
