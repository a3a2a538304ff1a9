//! Launchers of `kernels/gelu.cu`: exact (erf) GELU forward and backward, f32.

use super::reduce::{check_len, grid_stride};
use super::{In, Out};
use crate::device::{cuda_err, Gpu};
use cudarc::driver::PushKernelArg;
use snella_core::SnellaError;

/// `y[i] = 0.5·x[i]·(1 + erf(x[i]/√2))` over the `n = x.len()` elements of `x` (f32), as
/// `snella_core::ops::gelu::gelu_fwd` (with CUDA's `erff`, accurate to a few ulp).
///
/// # Errors
/// `Tensor` when `y` is shorter than `x`; `CUDA_ERROR` on a launch failure.
pub fn gelu_fwd(gpu: &Gpu, x: &In, y: &mut Out) -> Result<(), SnellaError> {
    let n = x.len();
    check_len("gelu_fwd", "y", y.len(), n)?;
    if n == 0 {
        return Ok(());
    }
    let f = gpu.func("snella_gelu_fwd");
    let n64 = n as u64;
    let mut b = gpu.stream.launch_builder(&f);
    b.arg(x).arg(y).arg(&n64);
    // SAFETY: x and y hold at least n floats; grid-stride over i < n.
    unsafe { b.launch(grid_stride(n)) }.map(|_| ()).map_err(|e| cuda_err("snella_gelu_fwd", e))
}

/// `dx[i] = dy[i]·(Φ(x[i]) + x[i]·φ(x[i]))` over the `n = x.len()` elements of the saved
/// pre-activation `x` (f32), as `snella_core::ops::gelu::gelu_bwd`. `dx` is overwritten.
///
/// # Errors
/// `Tensor` when `dy` or `dx` is shorter than `x`; `CUDA_ERROR` on a launch failure.
pub fn gelu_bwd(gpu: &Gpu, x: &In, dy: &In, dx: &mut Out) -> Result<(), SnellaError> {
    let n = x.len();
    check_len("gelu_bwd", "dy", dy.len(), n)?;
    check_len("gelu_bwd", "dx", dx.len(), n)?;
    if n == 0 {
        return Ok(());
    }
    let f = gpu.func("snella_gelu_bwd");
    let n64 = n as u64;
    let mut b = gpu.stream.launch_builder(&f);
    b.arg(x).arg(dy).arg(dx).arg(&n64);
    // SAFETY: x, dy and dx hold at least n floats; grid-stride over i < n.
    unsafe { b.launch(grid_stride(n)) }.map(|_| ()).map_err(|e| cuda_err("snella_gelu_bwd", e))
}
