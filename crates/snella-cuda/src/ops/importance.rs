//! Launcher of `kernels/importance.cu`: the allocator's importance/uncertainty EMA update
//! (spec §5) on the device, so the per-element statistics never cross to the host per step.

use super::reduce::{check_len, grid_stride};
use super::{In, Out};
use crate::device::{cuda_err, Gpu};
use cudarc::driver::PushKernelArg;
use snella_core::SnellaError;

/// One EMA update over a parameter `p` and its gradient `g` (f32, `n = p.len()`), as
/// `snella_core::snella::importance::importance_update`: `I = |p ⊙ g|` (a non-finite `I` counts as
/// 0), `Ī ← β1·Ī + (1−β1)·I`, `Ū ← β2·Ū + (1−β2)·|I − Ī|`, bit-identical to the CPU. Adds the
/// number of non-finite `I` to `bad[0]` (an f32 counter).
///
/// # Errors
/// `Tensor` when `g`, `ibar` or `ubar` is shorter than `p`, or `bad` is empty; `CUDA_ERROR` on a
/// launch failure.
#[allow(clippy::too_many_arguments)]
pub fn importance_update(gpu: &Gpu, p: &In, g: &In, ibar: &mut Out, ubar: &mut Out, beta1: f32, beta2: f32, bad: &mut Out) -> Result<(), SnellaError> {
    let n = p.len();
    check_len("importance_update", "g", g.len(), n)?;
    check_len("importance_update", "ibar", ibar.len(), n)?;
    check_len("importance_update", "ubar", ubar.len(), n)?;
    check_len("importance_update", "bad", bad.len(), 1)?;
    if n == 0 {
        return Ok(());
    }
    let (c1, c2) = (1.0f32 - beta1, 1.0f32 - beta2);
    let n64 = n as u64;
    let f = gpu.func("snella_importance_update");
    let mut b = gpu.stream.launch_builder(&f);
    b.arg(p).arg(g).arg(ibar).arg(ubar).arg(&n64).arg(&beta1).arg(&c1).arg(&beta2).arg(&c2).arg(bad);
    // SAFETY: p, g, ibar, ubar hold n floats and bad one (checked); grid-stride over i < n.
    unsafe { b.launch(grid_stride(n)) }.map(|_| ()).map_err(|e| cuda_err("snella_importance_update", e))
}
