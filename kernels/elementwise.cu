// Element-wise ops of the ViT step: residual add, bias add, transpose(-add) and strided row copies.
// Forward and backward are the same ops here (add is its own adjoint; transpose likewise).
// CPU references: snella-model's CpuBackend (add_assign, transpose), snella_core::ops::linear::add_bias, and
// Backend::copy_rows's default (a loop of copies) for snella_copy_rows.
#include "common.cuh"

// y[i] += x[i], i < n.
extern "C" __global__ void snella_add_assign(float* __restrict__ y, const float* __restrict__ x, unsigned n) {
  unsigned i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i < n) y[i] += x[i];
}

// y[r, c] += bias[c] for y [rows, cols]. Grid (ceil(cols/256), ≤ 1024): each thread keeps one
// bias value in a register and walks the rows with stride gridDim.y (no per-element modulo).
extern "C" __global__ void snella_add_bias(float* __restrict__ y, const float* __restrict__ bias, unsigned rows, unsigned cols) {
  const unsigned c = blockIdx.x * blockDim.x + threadIdx.x;
  if (c >= cols) return;
  const float bv = bias[c];
  for (unsigned r = blockIdx.y; r < rows; r += gridDim.y) y[(size_t)r * cols + c] += bv;
}

// dst[j, i] = src[i, j] (or +=) for src [rows, cols], through a 32x33 shared tile.
extern "C" __global__ void snella_transpose(const float* __restrict__ src, float* __restrict__ dst, unsigned rows, unsigned cols, unsigned accumulate) {
  __shared__ float tile[32][33];
  unsigned c0 = blockIdx.x * 32, r0 = blockIdx.y * 32;
#pragma unroll
  for (unsigned q = 0; q < 4; q++) {  // block (32, 8): rows threadIdx.y + 8q, loads all in flight
    const unsigned dy = threadIdx.y + 8 * q;
    unsigned r = r0 + dy, c = c0 + threadIdx.x;
    if (r < rows && c < cols) tile[dy][threadIdx.x] = src[(size_t)r * cols + c];
  }
  __syncthreads();
#pragma unroll
  for (unsigned q = 0; q < 4; q++) {  // block (32, 8): rows threadIdx.y + 8q, loads all in flight
    const unsigned dy = threadIdx.y + 8 * q;
    unsigned c = c0 + dy, r = r0 + threadIdx.x;  // dst row c, column r
    if (r < rows && c < cols) {
      size_t o = (size_t)c * rows + r;
      float v = tile[threadIdx.x][dy];
      dst[o] = accumulate ? dst[o] + v : v;
    }
  }
}

// dst[dst_off + q·dst_stride + e] = src[src_off + q·src_stride + e] for q < count, e < len (a stride of 0
// repeats one source row). Grid (ceil(len/256), ≤ 1024): rows walked with stride gridDim.y. Replaces
// one memcpy per image in the token assembly and the class-token gathers of the ViT step.
extern "C" __global__ void snella_copy_rows(const float* __restrict__ src, unsigned long long src_off, unsigned long long src_stride,
                                            float* __restrict__ dst, unsigned long long dst_off, unsigned long long dst_stride,
                                            unsigned len, unsigned count) {
  const unsigned e = blockIdx.x * blockDim.x + threadIdx.x;
  if (e >= len) return;
  for (unsigned q = blockIdx.y; q < count; q += gridDim.y)
    dst[dst_off + q * dst_stride + e] = src[src_off + q * src_stride + e];
}
