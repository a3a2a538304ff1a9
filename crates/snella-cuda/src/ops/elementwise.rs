//! Launchers of `kernels/elementwise.cu`: residual add, bias add, the transpose(-add) and strided
//! row copies.

use super::grid;
use crate::device::{cuda_err, Gpu};
use super::{In, Out};
use cudarc::driver::PushKernelArg;
use snella_core::SnellaError;

/// `y += x` over `n` elements.
///
/// # Errors
/// `CUDA_ERROR` on a launch failure.
pub fn add_assign(gpu: &Gpu, y: &mut Out, x: &In, n: usize) -> Result<(), SnellaError> {
    let f = gpu.func("snella_add_assign");
    let n32 = n as u32;
    let mut b = gpu.stream.launch_builder(&f);
    b.arg(y).arg(x).arg(&n32);
    // SAFETY: y and x hold n floats; the kernel bounds-checks i < n.
    unsafe { b.launch(grid(n)) }.map(|_| ()).map_err(|e| cuda_err("snella_add_assign", e))
}

/// `y[r, c] += bias[c]` for `y: [rows, cols]`.
///
/// # Errors
/// `CUDA_ERROR` on a launch failure.
pub fn add_bias(gpu: &Gpu, y: &mut Out, bias: &In, rows: usize, cols: usize) -> Result<(), SnellaError> {
    let f = gpu.func("snella_add_bias");
    let (r, c) = (rows as u32, cols as u32);
    let mut b = gpu.stream.launch_builder(&f);
    b.arg(y).arg(bias).arg(&r).arg(&c);
    // SAFETY: y holds rows·cols floats and bias cols; bounds-checked in the kernel.
    let cfg = cudarc::driver::LaunchConfig { grid_dim: ((cols as u32).div_ceil(256).max(1), (rows as u32).clamp(1, 1024), 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 };
    unsafe { b.launch(cfg) }.map(|_| ()).map_err(|e| cuda_err("snella_add_bias", e))
}

/// `dst[j, i] (+)= src[i, j]` for `src: [rows, cols]`.
///
/// # Errors
/// `CUDA_ERROR` on a launch failure.
pub fn transpose(gpu: &Gpu, src: &In, rows: usize, cols: usize, dst: &mut Out, accumulate: bool) -> Result<(), SnellaError> {
    let f = gpu.func("snella_transpose");
    let (r, c, acc) = (rows as u32, cols as u32, accumulate as u32);
    let cfg = cudarc::driver::LaunchConfig { grid_dim: ((cols as u32).div_ceil(32), (rows as u32).div_ceil(32), 1), block_dim: (32, 8, 1), shared_mem_bytes: 0 };
    let mut b = gpu.stream.launch_builder(&f);
    b.arg(src).arg(dst).arg(&r).arg(&c).arg(&acc);
    // SAFETY: src holds rows·cols floats and dst cols·rows; bounds-checked in the kernel.
    unsafe { b.launch(cfg) }.map(|_| ()).map_err(|e| cuda_err("snella_transpose", e))
}

/// Strided row copy, one launch: `dst[dst_off + q·dst_stride + e] = src[src_off + q·src_stride + e]`
/// for `q < count`, `e < len` (f32 elements; `src_stride = 0` repeats one row). CPU reference:
/// `snella_model::backend::Backend::copy_rows`'s default.
///
/// # Errors
/// `CONFIG_ERROR` when a row would fall outside `src` or `dst`; `CUDA_ERROR` on a launch failure.
#[allow(clippy::too_many_arguments)]
pub fn copy_rows(gpu: &Gpu, src: &In, src_off: usize, src_stride: usize, dst: &mut Out, dst_off: usize, dst_stride: usize, len: usize, count: usize) -> Result<(), SnellaError> {
    if len == 0 || count == 0 {
        return Ok(());
    }
    let (src_len, dst_len) = (src.len(), dst.len());
    if src_off + (count - 1) * src_stride + len > src_len || dst_off + (count - 1) * dst_stride + len > dst_len {
        return Err(SnellaError::config("copy_rows", format!("{count} rows of {len} at strides {src_stride}/{dst_stride}"), &format!("rows inside the source ({src_len}) and destination ({dst_len}) buffers")));
    }
    let f = gpu.func("snella_copy_rows");
    let (so, ss, d_o, ds) = (src_off as u64, src_stride as u64, dst_off as u64, dst_stride as u64);
    let (l, c) = (len as u32, count as u32);
    let cfg = cudarc::driver::LaunchConfig { grid_dim: (l.div_ceil(256), c.clamp(1, 1024), 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 };
    let mut b = gpu.stream.launch_builder(&f);
    b.arg(src).arg(&so).arg(&ss).arg(dst).arg(&d_o).arg(&ds).arg(&l).arg(&c);
    // SAFETY: every row lies inside its buffer (checked above).
    unsafe { b.launch(cfg) }.map(|_| ()).map_err(|e| cuda_err("snella_copy_rows", e))
}
