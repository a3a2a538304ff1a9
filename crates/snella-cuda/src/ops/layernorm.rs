//! Launchers of `kernels/layernorm.cu`: LayerNorm over the last dimension, forward and backward, f32.

use super::reduce::{check_len, dim_u32, scratch, ROW_CHUNK};
use super::{In, Out};
use crate::device::{cuda_err, Gpu};
use cudarc::driver::{CudaSlice, LaunchConfig, PushKernelArg};
use snella_core::SnellaError;

/// Rows per 256-thread block of the row kernels (one warp per row).
const ROWS_PER_BLOCK: usize = 8;

fn row_cfg(rows: usize) -> LaunchConfig {
    LaunchConfig { grid_dim: (rows.div_ceil(ROWS_PER_BLOCK) as u32, 1, 1), block_dim: (32 * ROWS_PER_BLOCK as u32, 1, 1), shared_mem_bytes: 0 }
}

/// `y = (x − mean)·rstd·gamma + beta` per row of `x: [rows, d]` (f32), as
/// `snella_core::ops::layernorm::layernorm_fwd`; writes `y: [rows, d]` and, for the backward,
/// `mean, rstd: [rows]` (`rstd = 1/sqrt(var + eps)`, biased variance, two passes).
/// `gamma, beta: [d]`. One warp per row.
///
/// # Errors
/// `Tensor` when a buffer is shorter than its shape needs; `CUDA_ERROR` on a launch failure.
#[allow(clippy::too_many_arguments)]
pub fn layernorm_fwd(
    gpu: &Gpu, x: &In, gamma: &In, beta: &In, rows: usize, d: usize, eps: f32,
    y: &mut Out, mean: &mut Out, rstd: &mut Out,
) -> Result<(), SnellaError> {
    let Some((r32, d32)) = fwd_dims("layernorm_fwd", x, y.len(), gamma, beta, mean, rstd, rows, d)? else { return Ok(()) };
    let f = gpu.func("snella_layernorm_fwd");
    let mut b = gpu.stream.launch_builder(&f);
    b.arg(x).arg(gamma).arg(beta).arg(&r32).arg(&d32).arg(&eps).arg(y).arg(mean).arg(rstd);
    // SAFETY: every buffer holds what its shape needs (checked); the kernel bounds-checks rows.
    unsafe { b.launch(row_cfg(rows)) }.map(|_| ()).map_err(|e| cuda_err("snella_layernorm_fwd", e))
}

/// The forward's buffer checks (`y_len`: the output's length); the kernel's `rows`, `d`, or `None`
/// when there is nothing to do.
#[allow(clippy::too_many_arguments)]
fn fwd_dims(op: &str, x: &In, y_len: usize, gamma: &In, beta: &In, mean: &Out, rstd: &Out, rows: usize, d: usize) -> Result<Option<(u32, u32)>, SnellaError> {
    check_len(op, "x", x.len(), rows * d)?;
    check_len(op, "y", y_len, rows * d)?;
    check_len(op, "gamma", gamma.len(), d)?;
    check_len(op, "beta", beta.len(), d)?;
    check_len(op, "mean", mean.len(), rows)?;
    check_len(op, "rstd", rstd.len(), rows)?;
    if rows == 0 || d == 0 {
        return Ok(None);
    }
    Ok(Some((dim_u32(op, "rows", rows)?, dim_u32(op, "d", d)?)))
}

/// [`layernorm_fwd`] with `y` rounded to bf16 (nearest even) into `y16` (`u16` bit patterns): a
/// linear layer's input in the bf16 precision, written once instead of f32 then converted.
/// Bit-identical to [`layernorm_fwd`] followed by `crate::gemm::to_bf16`; `mean`, `rstd` as there.
///
/// # Errors
/// `Tensor` when a buffer is shorter than its shape needs; `CUDA_ERROR` on a launch failure.
#[allow(clippy::too_many_arguments)]
pub fn layernorm_fwd_bf16(
    gpu: &Gpu, x: &In, gamma: &In, beta: &In, rows: usize, d: usize, eps: f32,
    y16: &mut CudaSlice<u16>, mean: &mut Out, rstd: &mut Out,
) -> Result<(), SnellaError> {
    let Some((r32, d32)) = fwd_dims("layernorm_fwd_bf16", x, y16.len(), gamma, beta, mean, rstd, rows, d)? else { return Ok(()) };
    let f = gpu.func("snella_layernorm_fwd_bf16");
    let mut b = gpu.stream.launch_builder(&f);
    b.arg(x).arg(gamma).arg(beta).arg(&r32).arg(&d32).arg(&eps).arg(y16).arg(mean).arg(rstd);
    // SAFETY: every buffer holds what its shape needs (checked); the kernel bounds-checks rows.
    unsafe { b.launch(row_cfg(rows)) }.map(|_| ()).map_err(|e| cuda_err("snella_layernorm_fwd_bf16", e))
}

/// Backward of [`layernorm_fwd`], as `snella_core::ops::layernorm::layernorm_bwd` (f32): writes
/// `dx: [rows, d]` from `dy: [rows, d]`, the forward input `x`, `gamma: [d]` and the saved
/// `mean, rstd: [rows]`; when given, ACCUMULATES (`+=`) `dgamma = Σ_rows dy·x̂` and
/// `dbeta = Σ_rows dy` into `[d]` buffers.
///
/// The parameter gradients are deterministic: partial sums over fixed chunks of 64 rows into
/// scratch (`2·ceil(rows/64)·d` floats, allocated here), then the chunks added in order.
///
/// # Errors
/// `Tensor` when a buffer is shorter than its shape needs; `CUDA_OOM` for the scratch;
/// `CUDA_ERROR` on a launch failure.
#[allow(clippy::too_many_arguments)]
pub fn layernorm_bwd(
    gpu: &Gpu, dy: &In, x: &In, gamma: &In, mean: &In, rstd: &In, rows: usize, d: usize,
    dx: &mut Out, dgamma: Option<&mut Out>, dbeta: Option<&mut Out>,
) -> Result<(), SnellaError> {
    let op = "layernorm_bwd";
    check_len(op, "dy", dy.len(), rows * d)?;
    check_len(op, "x", x.len(), rows * d)?;
    check_len(op, "dx", dx.len(), rows * d)?;
    check_len(op, "gamma", gamma.len(), d)?;
    check_len(op, "mean", mean.len(), rows)?;
    check_len(op, "rstd", rstd.len(), rows)?;
    if let Some(g) = &dgamma {
        check_len(op, "dgamma", g.len(), d)?;
    }
    if let Some(g) = &dbeta {
        check_len(op, "dbeta", g.len(), d)?;
    }
    if rows == 0 || d == 0 {
        return Ok(());
    }
    let (r32, d32) = (dim_u32(op, "rows", rows)?, dim_u32(op, "d", d)?);
    let f = gpu.func("snella_layernorm_bwd_dx");
    let mut b = gpu.stream.launch_builder(&f);
    b.arg(dy).arg(x).arg(gamma).arg(mean).arg(rstd).arg(&r32).arg(&d32).arg(dx);
    // SAFETY: every buffer holds what its shape needs (checked); the kernel bounds-checks rows.
    unsafe { b.launch(row_cfg(rows)) }.map_err(|e| cuda_err("snella_layernorm_bwd_dx", e))?;
    if dgamma.is_none() && dbeta.is_none() {
        return Ok(());
    }
    let nchunks = rows.div_ceil(ROW_CHUNK);
    let mut part = scratch(gpu, 2 * nchunks * d)?;
    {
        let (mut pg, mut pb) = part.split_at_mut(nchunks * d);
        let f = gpu.func("snella_layernorm_bwd_param_partial");
        let cfg = LaunchConfig { grid_dim: (d.div_ceil(32) as u32, nchunks.min(65535) as u32, 1), block_dim: (32, 8, 1), shared_mem_bytes: 0 };
        let mut b = gpu.stream.launch_builder(&f);
        b.arg(dy).arg(x).arg(mean).arg(rstd).arg(&r32).arg(&d32).arg(&mut pg).arg(&mut pb);
        // SAFETY: dy, x hold rows·d floats, mean/rstd rows, pg/pb nchunks·d; every part element
        // (chunk < nchunks, column < d) is written.
        unsafe { b.launch(cfg) }.map_err(|e| cuda_err("snella_layernorm_bwd_param_partial", e))?;
    }
    let n32 = nchunks as u32;
    if let Some(out) = dgamma {
        param_final(gpu, &part.slice(..nchunks * d), n32, d32, out)?;
    }
    if let Some(out) = dbeta {
        param_final(gpu, &part.slice(nchunks * d..2 * nchunks * d), n32, d32, out)?;
    }
    Ok(())
}

/// `out[c] += Σ_k part[k, c]` over the `nchunks` chunk partials `part: [nchunks, d]`, in order.
fn param_final(gpu: &Gpu, part: &In, nchunks: u32, d: u32, out: &mut Out) -> Result<(), SnellaError> {
    let f = gpu.func("snella_layernorm_bwd_param_final");
    let mut b = gpu.stream.launch_builder(&f);
    b.arg(part).arg(&nchunks).arg(&d).arg(out);
    // SAFETY: part holds nchunks·d floats and out d (checked by the caller); c < d is checked.
    unsafe { b.launch(super::grid(d as usize)) }.map(|_| ()).map_err(|e| cuda_err("snella_layernorm_bwd_param_final", e))
}
