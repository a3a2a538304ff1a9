//! Launcher of `kernels/adamw.cu`: one fused AdamW step, bit-for-bit the CPU's f32 arithmetic.

use super::reduce::{check_len, grid_stride};
use super::{In, Out};
use crate::device::{cuda_err, Gpu};
use cudarc::driver::PushKernelArg;
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
    let step = h.step as f64;
    let has_decay = (h.weight_decay != 0.0) as u32;
    let decay = (1.0 - h.lr * h.weight_decay) as f32;
    let w1 = (1.0 - h.beta1) as f32;
    let b2 = h.beta2 as f32;
    let w2 = (1.0 - h.beta2) as f32;
    let bias_c1 = 1.0 - h.beta1.powf(step);
    let bias_c2 = 1.0 - h.beta2.powf(step);
    let neg_step = (-(h.lr / bias_c1)) as f32;
    let bc2_sqrt = bias_c2.sqrt() as f32;
    let eps = h.eps as f32;
    let n64 = n as u64;
    let f = gpu.func("snella_adamw_step");
    let mut b = gpu.stream.launch_builder(&f);
    b.arg(param).arg(grad).arg(m).arg(v).arg(&n64).arg(&has_decay);
    b.arg(&decay).arg(&w1).arg(&b2).arg(&w2).arg(&neg_step).arg(&bc2_sqrt).arg(&eps);
    // SAFETY: param, grad, m and v hold at least n floats (checked); grid-stride over i < n.
    unsafe { b.launch(grid_stride(n)) }.map(|_| ()).map_err(|e| cuda_err("snella_adamw_step", e))
}
