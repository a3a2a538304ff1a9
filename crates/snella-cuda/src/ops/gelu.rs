//! Launchers of `kernels/gelu.cu`: exact (erf) GELU forward (f32 or bf16 output) and backward, f32.

use super::reduce::{check_len, grid_stride};
use super::{In, Out};
use crate::device::{cuda_err, Gpu};
use cudarc::driver::{CudaSlice, PushKernelArg};
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

/// [`gelu_fwd`] with the output rounded to bf16 (nearest even) into `y16` (`u16` bit patterns): the
/// next linear layer's input in the bf16 precision, written once instead of f32 then converted.
/// Bit-identical to [`gelu_fwd`] followed by `crate::gemm::to_bf16`.
///
/// # Errors
/// `Tensor` when `y16` is shorter than `x`; `CUDA_ERROR` on a launch failure.
pub fn gelu_fwd_bf16(gpu: &Gpu, x: &In, y16: &mut CudaSlice<u16>) -> Result<(), SnellaError> {
    let n = x.len();
    check_len("gelu_fwd_bf16", "y", y16.len(), n)?;
    if n == 0 {
        return Ok(());
    }
    let f = gpu.func("snella_gelu_fwd_bf16");
    let n64 = n as u64;
    let mut b = gpu.stream.launch_builder(&f);
    b.arg(x).arg(y16).arg(&n64);
    // SAFETY: x holds n floats and y16 n bf16 values; grid-stride over i < n.
    unsafe { b.launch(grid_stride(n.div_ceil(4))) }.map(|_| ()).map_err(|e| cuda_err("snella_gelu_fwd_bf16", e))
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
