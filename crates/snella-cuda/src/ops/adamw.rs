//! Launcher of `kernels/adamw.cu`: one fused AdamW step, bit-for-bit the CPU's f32 arithmetic.

use super::reduce::{check_len, grid_stride};
use super::{In, Out};
use crate::device::{cuda_err, Gpu};
use cudarc::driver::{CudaSlice, DevicePtr, DevicePtrMut, PushKernelArg};
use snella_core::ops::adamw::AdamWParams;
use snella_core::SnellaError;

/// One in-place AdamW update of `param` from `grad` with moments `m`, `v` (all f32, `n =
/// param.len()` elements), as `snella_core::ops::adamw::adamw_step` (torch's single-tensor order:
/// decay, `lerp` for `m`, `mul`+`addcmul` for `v`, `addcdiv`). The scalars are computed on the host in
/// f64 exactly as the CPU does and rounded to f32; the kernel does each f32 operation with
/// round-to-nearest intrinsics (no FMA contraction), so results equal the CPU's.
///
/// # Errors
/// `Tensor` when `grad`, `m` or `v` is shorter than `param`; `CUDA_ERROR` on a launch failure.
pub fn adamw_step(gpu: &Gpu, param: &mut Out, grad: &In, m: &mut Out, v: &mut Out, h: &AdamWParams) -> Result<(), SnellaError> {
    let n = param.len();
    check_len("adamw_step", "grad", grad.len(), n)?;
    check_len("adamw_step", "m", m.len(), n)?;
    check_len("adamw_step", "v", v.len(), n)?;
    if n == 0 {
        return Ok(());
    }
    let has_decay = (h.weight_decay != 0.0) as u32;
    let [decay, w1, b2, w2, neg_step, bc2_sqrt, eps] = scalars(h);
    let n64 = n as u64;
    let f = gpu.func("snella_adamw_step");
    let mut b = gpu.stream.launch_builder(&f);
    b.arg(param).arg(grad).arg(m).arg(v).arg(&n64).arg(&has_decay);
    b.arg(&decay).arg(&w1).arg(&b2).arg(&w2).arg(&neg_step).arg(&bc2_sqrt).arg(&eps);
    // SAFETY: param, grad, m and v hold at least n floats (checked); grid-stride over i < n.
    unsafe { b.launch(grid_stride(n)) }.map(|_| ()).map_err(|e| cuda_err("snella_adamw_step", e))
}

/// The kernel's f32 scalars `[decay, w1, b2, w2, neg_step, bc2_sqrt, eps]`, computed in f64 exactly as
/// the CPU does and rounded to f32.
fn scalars(h: &AdamWParams) -> [f32; 7] {
    let step = h.step as f64;
    let bias_c1 = 1.0 - h.beta1.powf(step);
    let bias_c2 = 1.0 - h.beta2.powf(step);
    [
        (1.0 - h.lr * h.weight_decay) as f32,
        (1.0 - h.beta1) as f32,
        h.beta2 as f32,
        (1.0 - h.beta2) as f32,
        (-(h.lr / bias_c1)) as f32,
        bias_c2.sqrt() as f32,
        h.eps as f32,
    ]
}

/// One tensor of [`adamw_multi`]: the parameter, its gradient and moments (f32, equal lengths), and
/// whether the weight decay applies to it.
pub struct AdamwTensor<'a> {
    /// The parameter, updated in place.
    pub param: &'a mut CudaSlice<f32>,
    /// Its gradient.
    pub grad: &'a CudaSlice<f32>,
    /// First moment, updated in place.
    pub m: &'a mut CudaSlice<f32>,
    /// Second moment, updated in place.
    pub v: &'a mut CudaSlice<f32>,
    /// Decoupled weight decay `h.weight_decay` applies (else 0).
    pub decay: bool,
}

/// [`adamw_step`] over many tensors in one launch (shared learning rate and step; per-tensor
/// weight-decay flag): bit-identical to one [`adamw_step`] per tensor with `weight_decay` =
/// `h.weight_decay` or 0. The pointer table (6 × u64 per tensor) is uploaded per call.
///
/// # Errors
/// `Tensor` when a gradient or moment is shorter than its parameter; `CUDA_ERROR` on a launch or
/// upload failure.
pub fn adamw_multi(gpu: &Gpu, tensors: &mut [AdamwTensor<'_>], h: &AdamWParams) -> Result<(), SnellaError> {
    let count = tensors.len() as u32;
    if tensors.is_empty() {
        return Ok(());
    }
    let mut table: Vec<u64> = Vec::with_capacity(6 * tensors.len());
    let mut records = Vec::with_capacity(4 * tensors.len());
    let mut longest = 0usize;
    for (i, t) in tensors.iter_mut().enumerate() {
        let n = t.param.len();
        for (what, len) in [("grad", t.grad.len()), ("m", t.m.len()), ("v", t.v.len())] {
            check_len("adamw_multi", &format!("tensor {i} {what}"), len, n)?;
        }
        longest = longest.max(n);
        let (pp, rp) = t.param.device_ptr_mut(&gpu.stream);
        let (gp, rg) = t.grad.device_ptr(&gpu.stream);
        let (mp, rm) = t.m.device_ptr_mut(&gpu.stream);
        let (vp, rv) = t.v.device_ptr_mut(&gpu.stream);
        table.extend([pp, gp, mp, vp, n as u64, t.decay as u64]);
        records.extend([rp, rg, rm, rv]);
    }
    if longest == 0 {
        return Ok(());
    }
    let dev = gpu.stream.clone_htod(&table).map_err(|e| cuda_err("upload of the AdamW tensor table", e))?;
    let [decay, w1, b2, w2, neg_step, bc2_sqrt, eps] = scalars(h);
    let cfg = cudarc::driver::LaunchConfig {
        grid_dim: (longest.div_ceil(256).clamp(1, 64) as u32, count.min(65535), 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    };
    let f = gpu.func("snella_adamw_multi");
    let mut b = gpu.stream.launch_builder(&f);
    b.arg(&dev).arg(&count).arg(&decay).arg(&w1).arg(&b2).arg(&w2).arg(&neg_step).arg(&bc2_sqrt).arg(&eps);
    // SAFETY: the table holds valid device pointers of tensors of the lengths given (checked);
    // each thread touches elements i < n of one tensor.
    unsafe { b.launch(cfg) }.map_err(|e| cuda_err("snella_adamw_multi", e))?;
    drop(records);
    Ok(())
}
