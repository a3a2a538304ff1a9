//! Launchers of `kernels/gelu.cu`: exact (erf) GELU forward and backward (f32), and the bf16 forms that keep the pre-activation in bf16.

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

/// The bf16 pre-activation kept for the backward (selective recomputation of the MLP): from
/// `x: [n]` (f32) writes `xk = bf16(x)` and `y = bf16(gelu(xk))` (`u16` bit patterns), the output
/// computed from the rounded pre-activation so that [`gelu_fwd_from_bf16`] rebuilds it
/// bit-identically. Reference: [`gelu_fwd`] on the rounded values, then rounded.
///
/// # Errors
/// `Tensor` when `xk` or `y` is shorter than `x`; `CUDA_ERROR` on a launch failure.
pub fn gelu_fwd_keep_bf16(gpu: &Gpu, x: &In, xk: &mut CudaSlice<u16>, y: &mut CudaSlice<u16>) -> Result<(), SnellaError> {
    let n = x.len();
    check_len("gelu_fwd_keep_bf16", "xk", xk.len(), n)?;
    check_len("gelu_fwd_keep_bf16", "y", y.len(), n)?;
    if n == 0 {
        return Ok(());
    }
    let f = gpu.func("snella_gelu_fwd_keep_bf16");
    let n64 = n as u64;
    let mut b = gpu.stream.launch_builder(&f);
    b.arg(x).arg(xk).arg(y).arg(&n64);
    // SAFETY: x holds n floats, xk and y n bf16 values; grid-stride over i < n.
    unsafe { b.launch(grid_stride(n.div_ceil(4))) }.map(|_| ()).map_err(|e| cuda_err("snella_gelu_fwd_keep_bf16", e))
}

/// `y = bf16(gelu(xk))` over the `n` values of a kept bf16 pre-activation `xk` (`u16` bit
/// patterns): the output of [`gelu_fwd_keep_bf16`] rebuilt in backward, bit-identically.
///
/// # Errors
/// `Tensor` when a buffer is shorter than `n`; `CUDA_ERROR` on a launch failure.
pub fn gelu_fwd_from_bf16(gpu: &Gpu, xk: &CudaSlice<u16>, n: usize, y: &mut CudaSlice<u16>) -> Result<(), SnellaError> {
    check_len("gelu_fwd_from_bf16", "xk", xk.len(), n)?;
    check_len("gelu_fwd_from_bf16", "y", y.len(), n)?;
    if n == 0 {
        return Ok(());
    }
    let f = gpu.func("snella_gelu_fwd_from_bf16");
    let n64 = n as u64;
    let mut b = gpu.stream.launch_builder(&f);
    b.arg(xk).arg(y).arg(&n64);
    // SAFETY: xk and y hold at least n bf16 values; grid-stride over i < n.
    unsafe { b.launch(grid_stride(n.div_ceil(2))) }.map(|_| ()).map_err(|e| cuda_err("snella_gelu_fwd_from_bf16", e))
}

/// [`gelu_bwd`] from a kept bf16 pre-activation `xk` (`u16` bit patterns): `dx = dy·gelu'(xk)` over
/// `n = dy.len()` values (f32 `dy`, `dx`). Reference: [`gelu_bwd`] on the rounded values.
///
/// # Errors
/// `Tensor` when `xk` or `dx` is shorter than `dy`; `CUDA_ERROR` on a launch failure.
pub fn gelu_bwd_bf16x(gpu: &Gpu, xk: &CudaSlice<u16>, dy: &In, dx: &mut Out) -> Result<(), SnellaError> {
    let n = dy.len();
    check_len("gelu_bwd_bf16x", "xk", xk.len(), n)?;
    check_len("gelu_bwd_bf16x", "dx", dx.len(), n)?;
    if n == 0 {
        return Ok(());
    }
    let f = gpu.func("snella_gelu_bwd_bf16x");
    let n64 = n as u64;
    let mut b = gpu.stream.launch_builder(&f);
    b.arg(xk).arg(dy).arg(dx).arg(&n64);
    // SAFETY: xk, dy and dx hold at least n values; grid-stride over i < n.
    unsafe { b.launch(grid_stride(n.div_ceil(2))) }.map(|_| ()).map_err(|e| cuda_err("snella_gelu_bwd_bf16x", e))
}

/// [`gelu_bwd_bf16x`] writing `dx` in bf16 (`[n]` `u16` bit patterns, each the f32 result rounded to
/// nearest even: the form in which the `fc1` backward's products consume it, bit-identical to
/// [`gelu_bwd_bf16x`] followed by a conversion).
///
/// # Errors
/// `Tensor` when `xk` or `dx` is shorter than `dy`; `CUDA_ERROR` on a launch failure.
pub fn gelu_bwd_bf16x_g16(gpu: &Gpu, xk: &CudaSlice<u16>, dy: &In, dx: &mut CudaSlice<u16>) -> Result<(), SnellaError> {
    let n = dy.len();
    check_len("gelu_bwd_bf16x_g16", "xk", xk.len(), n)?;
    check_len("gelu_bwd_bf16x_g16", "dx", dx.len(), n)?;
    if n == 0 {
        return Ok(());
    }
    let f = gpu.func("snella_gelu_bwd_bf16x_g16");
    let n64 = n as u64;
    let mut b = gpu.stream.launch_builder(&f);
    b.arg(xk).arg(dy).arg(dx).arg(&n64);
    // SAFETY: xk, dy and dx hold at least n values; grid-stride over i < n.
    unsafe { b.launch(grid_stride(n.div_ceil(2))) }.map(|_| ()).map_err(|e| cuda_err("snella_gelu_bwd_bf16x_g16", e))
}
