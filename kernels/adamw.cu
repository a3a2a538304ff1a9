// One fused AdamW step (torch.optim.AdamW, single-tensor), f32. AdamW has no backward.
// CPU reference: snella_core::ops::adamw::adamw_step. Each operation is written with the
// round-to-nearest intrinsics so nvcc cannot contract a multiply and add into an FMA: the
// arithmetic is the CPU's op by op, so results match it bit for bit.
#include "common.cuh"

// For i < n: p *= decay (when has_decay); m = m + w1·(g − m); v = v·b2; v = v + (w2·g)·g;
// denom = sqrt(v)/bc2_sqrt + eps; p = p + (neg_step·m)/denom. Scalars precomputed on the host
// in f64 and rounded to f32, as the CPU does. Grid-stride.
namespace snella_adamw {
// One element's update (the CPU's f32 operations, one by one).
__device__ __forceinline__ void update(float* __restrict__ param, const float* __restrict__ grad, float* __restrict__ m,
                                       float* __restrict__ v, unsigned long long i, unsigned has_decay, float decay,
                                       float w1, float b2, float w2, float neg_step, float bc2_sqrt, float eps) {
  float p = param[i], g = grad[i], mi = m[i], vi = v[i];
  if (has_decay) p = __fmul_rn(p, decay);
  mi = __fadd_rn(mi, __fmul_rn(w1, __fsub_rn(g, mi)));
  vi = __fmul_rn(vi, b2);
  vi = __fadd_rn(vi, __fmul_rn(__fmul_rn(w2, g), g));
  float denom = __fadd_rn(__fdiv_rn(__fsqrt_rn(vi), bc2_sqrt), eps);
  p = __fadd_rn(p, __fdiv_rn(__fmul_rn(neg_step, mi), denom));
  param[i] = p;
  m[i] = mi;
  v[i] = vi;
}
}  // namespace snella_adamw

extern "C" __global__ void snella_adamw_step(float* __restrict__ param, const float* __restrict__ grad,
                                             float* __restrict__ m, float* __restrict__ v, unsigned long long n,
                                             unsigned has_decay, float decay, float w1, float b2, float w2,
                                             float neg_step, float bc2_sqrt, float eps) {
  for (unsigned long long i = (unsigned long long)blockIdx.x * blockDim.x + threadIdx.x; i < n;
       i += (unsigned long long)gridDim.x * blockDim.x)
    snella_adamw::update(param, grad, m, v, i, has_decay, decay, w1, b2, w2, neg_step, bc2_sqrt, eps);
}

// Multi-tensor form: table holds, per tensor, (param, grad, m, v, n, has_decay) as six u64; the
// scalars are shared (one learning rate and step for all tensors). Grid (x: element blocks,
// y: tensors, strided), 256 threads. Bit-identical to snella_adamw_step per tensor.
extern "C" __global__ void snella_adamw_multi(const unsigned long long* __restrict__ table, unsigned count,
                                              float decay, float w1, float b2, float w2, float neg_step,
                                              float bc2_sqrt, float eps) {
  for (unsigned t = blockIdx.y; t < count; t += gridDim.y) {
    const unsigned long long* e = table + 6 * t;
    float* param = reinterpret_cast<float*>(e[0]);
    const float* grad = reinterpret_cast<const float*>(e[1]);
    float* m = reinterpret_cast<float*>(e[2]);
    float* v = reinterpret_cast<float*>(e[3]);
    const unsigned long long n = e[4];
    const unsigned has_decay = (unsigned)e[5];
    for (unsigned long long i = (unsigned long long)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (unsigned long long)gridDim.x * blockDim.x)
      snella_adamw::update(param, grad, m, v, i, has_decay, decay, w1, b2, w2, neg_step, bc2_sqrt, eps);
  }
}
