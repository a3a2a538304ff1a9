// Reductions of the training step, f32: the bias gradient (column sums) and a non-finite check.
// CPU reference: snella_core::ops::linear::bias_grad. (A reduction has no backward of its own:
// bias_grad *is* the backward of add_bias.)
#include "common.cuh"

#define SNELLA_RED_CHUNK 64

// Partial column sums of dy [rows, cols] over each chunk of SNELLA_RED_CHUNK rows (chunks
// blockIdx.y, blockIdx.y + gridDim.y, ...), for 32 columns from blockIdx.x·32. Block (32, 8):
// thread (tx, ty) sums rows ty, ty+8, ... of the chunk, then the 8 partials are added in a fixed
// tree (deterministic). part: [nchunks, cols], nchunks = ceil(rows / SNELLA_RED_CHUNK).
extern "C" __global__ void snella_colsum_partial(const float* __restrict__ dy, unsigned rows, unsigned cols,
                                                 float* __restrict__ part) {
  __shared__ float sm[8][33];
  unsigned tx = threadIdx.x, ty = threadIdx.y;
  unsigned col = blockIdx.x * 32 + tx;
  unsigned nchunks = (rows + SNELLA_RED_CHUNK - 1) / SNELLA_RED_CHUNK;
  for (unsigned chunk = blockIdx.y; chunk < nchunks; chunk += gridDim.y) {
    unsigned r0 = chunk * SNELLA_RED_CHUNK;
    unsigned r1 = min(r0 + SNELLA_RED_CHUNK, rows);
    float a = 0.f;
    if (col < cols)
      for (unsigned r = r0 + ty; r < r1; r += 8) a += dy[(size_t)r * cols + col];
    __syncthreads();  // the previous chunk's tree is done with sm
    sm[ty][tx] = a;
    __syncthreads();
    for (unsigned s = 4; s > 0; s >>= 1) {
      if (ty < s) sm[ty][tx] += sm[ty + s][tx];
      __syncthreads();
    }
    if (ty == 0 && col < cols) part[(size_t)chunk * cols + col] = sm[0][tx];
  }
}

// db[c] = (accumulate ? db[c] : 0) + Σ_k part[k, c], chunks in order; part [nchunks, cols].
extern "C" __global__ void snella_colsum_final(const float* __restrict__ part, unsigned nchunks, unsigned cols,
                                               float* __restrict__ db, unsigned accumulate) {
  unsigned c = blockIdx.x * blockDim.x + threadIdx.x;
  if (c >= cols) return;
  float s = 0.f;
  for (unsigned k = 0; k < nchunks; ++k) s += part[(size_t)k * cols + c];
  db[c] = accumulate ? db[c] + s : s;
}

// Whether this thread's grid-stride share of x[0..n) holds a NaN or ±Inf (exponent bits all ones).
__device__ __forceinline__ bool snella_any_non_finite(const float* __restrict__ x, unsigned long long n) {
  bool bad = false;
  for (unsigned long long i = (unsigned long long)blockIdx.x * blockDim.x + threadIdx.x; i < n;
       i += (unsigned long long)gridDim.x * blockDim.x)
    bad |= (__float_as_uint(x[i]) & 0x7f800000u) == 0x7f800000u;
  return bad;
}

// flag[0] = 1 when any of x[0..n) is NaN or ±Inf (exponent bits all ones); flag is never cleared
// here, so several tensors can be checked into one flag. Grid-stride.
extern "C" __global__ void snella_all_finite(const float* __restrict__ x, unsigned long long n,
                                             unsigned* __restrict__ flag) {
  const bool bad = snella_any_non_finite(x, n);
  if (__any_sync(0xffffffffu, bad) && (threadIdx.x & 31) == 0) flag[0] = 1u;
}

// Multi-tensor form of snella_all_finite: table holds (pointer, length) pairs of `count` f32 tensors;
// flags[t] = 1 when tensor t holds a NaN or ±Inf (flags start at 0). Grid (x: element blocks,
// y: tensors, strided), 256 threads.
extern "C" __global__ void snella_all_finite_multi(const unsigned long long* __restrict__ table, unsigned count,
                                                   unsigned* __restrict__ flags) {
  for (unsigned t = blockIdx.y; t < count; t += gridDim.y) {
    const bool bad = snella_any_non_finite(reinterpret_cast<const float*>(table[2 * t]), table[2 * t + 1]);
    if (__any_sync(0xffffffffu, bad) && (threadIdx.x & 31) == 0) flags[t] = 1u;
  }
}
