//! Launchers of `kernels/layernorm.cu`: LayerNorm over the last dimension, forward and backward (f32), and the forms that keep the normalised input x̂ (f32 or bf16) for the backward.

use super::reduce::{check_len, dim_u32, scratch, ROW_CHUNK};
use super::{ActMut, ActRef, In, Out};
use crate::device::{cuda_err, Gpu};
use cudarc::driver::{DevicePtr, LaunchConfig, PushKernelArg};
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
    let Some((r32, d32)) = fwd_dims("layernorm_fwd", x, y.len(), gamma, beta, Some(mean), rstd, rows, d)? else { return Ok(()) };
    let f = gpu.func("snella_layernorm_fwd");
    let mut b = gpu.stream.launch_builder(&f);
    b.arg(x).arg(gamma).arg(beta).arg(&r32).arg(&d32).arg(&eps).arg(y).arg(mean).arg(rstd);
    // SAFETY: every buffer holds what its shape needs (checked); the kernel bounds-checks rows.
    unsafe { b.launch(row_cfg(rows)) }.map(|_| ()).map_err(|e| cuda_err("snella_layernorm_fwd", e))
}

/// The forward's buffer checks (`y_len`: the output's length); the kernel's `rows`, `d`, or `None`
/// when there is nothing to do.
#[allow(clippy::too_many_arguments)]
fn fwd_dims(op: &str, x: &In, y_len: usize, gamma: &In, beta: &In, mean: Option<&Out>, rstd: &Out, rows: usize, d: usize) -> Result<Option<(u32, u32)>, SnellaError> {
    check_len(op, "x", x.len(), rows * d)?;
    check_len(op, "y", y_len, rows * d)?;
    check_len(op, "gamma", gamma.len(), d)?;
    check_len(op, "beta", beta.len(), d)?;
    if let Some(mean) = mean {
        check_len(op, "mean", mean.len(), rows)?;
    }
    check_len(op, "rstd", rstd.len(), rows)?;
    if rows == 0 || d == 0 {
        return Ok(None);
    }
    Ok(Some((dim_u32(op, "rows", rows)?, dim_u32(op, "d", d)?)))
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
    let Some((r32, d32)) = bwd_dims(op, dgamma.as_deref(), dbeta.as_deref(), rows, d)? else { return Ok(()) };
    let f = gpu.func("snella_layernorm_bwd_dx");
    let mut b = gpu.stream.launch_builder(&f);
    b.arg(dy).arg(x).arg(gamma).arg(mean).arg(rstd).arg(&r32).arg(&d32).arg(dx);
    // SAFETY: every buffer holds what its shape needs (checked); the kernel bounds-checks rows.
    unsafe { b.launch(row_cfg(rows)) }.map_err(|e| cuda_err("snella_layernorm_bwd_dx", e))?;
    if dgamma.is_none() && dbeta.is_none() {
        return Ok(());
    }
    param_grads(gpu, rows, d, dgamma, dbeta, |pg, pb, cfg| {
        let f = gpu.func("snella_layernorm_bwd_param_partial");
        let mut b = gpu.stream.launch_builder(&f);
        b.arg(dy).arg(x).arg(mean).arg(rstd).arg(&r32).arg(&d32).arg(pg).arg(pb);
        // SAFETY: dy, x hold rows·d floats, mean/rstd rows, pg/pb nchunks·d; every part element
        // (chunk < nchunks, column < d) is written.
        unsafe { b.launch(cfg) }.map(|_| ()).map_err(|e| cuda_err("snella_layernorm_bwd_param_partial", e))
    })
}

/// The backward's checks of the parameter-gradient buffers (`[d]` each, when given); the kernel's
/// `rows`, `d`, or `None` when there is nothing to do.
fn bwd_dims(op: &str, dgamma: Option<&Out>, dbeta: Option<&Out>, rows: usize, d: usize) -> Result<Option<(u32, u32)>, SnellaError> {
    if let Some(g) = dgamma {
        check_len(op, "dgamma", g.len(), d)?;
    }
    if let Some(g) = dbeta {
        check_len(op, "dbeta", g.len(), d)?;
    }
    if rows == 0 || d == 0 {
        return Ok(None);
    }
    Ok(Some((dim_u32(op, "rows", rows)?, dim_u32(op, "d", d)?)))
}

/// The parameter gradients of a LayerNorm backward, deterministically: `partial` launches, with the
/// given config, the kernel writing each chunk's (`ROW_CHUNK` rows) sums of `dy·x̂` and `dy` into the
/// two `[nchunks, d]` halves of a scratch buffer; the chunks are then added in order into `dgamma`,
/// `dbeta` (`+=`, each when given).
fn param_grads(
    gpu: &Gpu, rows: usize, d: usize, dgamma: Option<&mut Out>, dbeta: Option<&mut Out>,
    partial: impl FnOnce(&mut Out, &mut Out, LaunchConfig) -> Result<(), SnellaError>,
) -> Result<(), SnellaError> {
    let nchunks = rows.div_ceil(ROW_CHUNK);
    let mut part = scratch(gpu, 2 * nchunks * d)?;
    {
        let (mut pg, mut pb) = part.split_at_mut(nchunks * d);
        let cfg = LaunchConfig { grid_dim: (d.div_ceil(32) as u32, nchunks.min(65535) as u32, 1), block_dim: (32, 8, 1), shared_mem_bytes: 0 };
        partial(&mut pg, &mut pb, cfg)?;
    }
    let (n32, d32) = (nchunks as u32, d as u32);
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

/// The kernel of a form: `f32` or `bf16`.
fn form(f32: &'static str, bf16: &'static str, is_bf16: bool) -> &'static str {
    if is_bf16 { bf16 } else { f32 }
}

/// LayerNorm forward keeping the normalised input `x̂ = (x − mean)·rstd` for the backward instead of
/// `x` and `mean` (selective recomputation: the output is rebuilt by [`layernorm_affine`] in
/// backward rather than kept). From `x: [rows, d]` (f32) writes `xhat` and `y = fma(x̂, gamma, beta)`
/// (`[rows, d]`, both f32 or both bf16: `x̂` rounded to nearest even first and `y` computed from the
/// rounded `x̂`, so the rebuilt `y` is bit-identical) and `rstd: [rows]`. CPU reference:
/// `snella_core::ops::layernorm::layernorm_fwd_xhat`.
///
/// # Errors
/// `Tensor` when a buffer is shorter than its shape needs; `Config` when `y` and `xhat` differ in
/// form; `CUDA_ERROR` on a launch failure.
#[allow(clippy::too_many_arguments)]
pub fn layernorm_fwd_xhat(
    gpu: &Gpu, x: &In, gamma: &In, beta: &In, rows: usize, d: usize, eps: f32,
    mut y: ActMut, mut xhat: ActMut, rstd: &mut Out,
) -> Result<(), SnellaError> {
    let op = "layernorm_fwd_xhat";
    check_len(op, "xhat", xhat.len(), rows * d)?;
    if y.is_bf16() != xhat.is_bf16() {
        return Err(SnellaError::config(&format!("{op}.xhat"), "a different form than y", "y and xhat both f32 or both bf16"));
    }
    let Some((r32, d32)) = fwd_dims(op, x, y.len(), gamma, beta, None, rstd, rows, d)? else { return Ok(()) };
    let name = form("snella_layernorm_fwd_xhat", "snella_layernorm_fwd_xhat_bf16", y.is_bf16());
    let f = gpu.func(name);
    let (py, ph) = (y.ptr(gpu), xhat.ptr(gpu));
    let mut b = gpu.stream.launch_builder(&f);
    b.arg(x).arg(gamma).arg(beta).arg(&r32).arg(&d32).arg(&eps).arg(&py).arg(&ph).arg(rstd);
    // SAFETY: every buffer holds what its shape needs (checked; y and xhat in the kernel's form);
    // the kernel bounds-checks rows.
    unsafe { b.launch(row_cfg(rows)) }.map(|_| ()).map_err(|e| cuda_err(op, e))
}

/// `y = fma(x̂, gamma, beta)` per row of a saved `x̂: [rows, d]` (f32 or bf16; `y` in the same
/// form): the output of [`layernorm_fwd_xhat`] rebuilt in backward, bit-identically. CPU reference:
/// `snella_core::ops::layernorm::layernorm_affine`.
///
/// # Errors
/// `Tensor` when a buffer is shorter than its shape needs; `Config` when `y` and `xhat` differ in
/// form; `CUDA_ERROR` on a launch failure.
pub fn layernorm_affine(gpu: &Gpu, xhat: ActRef, gamma: &In, beta: &In, rows: usize, d: usize, mut y: ActMut) -> Result<(), SnellaError> {
    let op = "layernorm_affine";
    check_len(op, "xhat", xhat.len(), rows * d)?;
    check_len(op, "y", y.len(), rows * d)?;
    check_len(op, "gamma", gamma.len(), d)?;
    check_len(op, "beta", beta.len(), d)?;
    if y.is_bf16() != xhat.is_bf16() {
        return Err(SnellaError::config(&format!("{op}.y"), "a different form than xhat", "y and xhat both f32 or both bf16"));
    }
    if rows == 0 || d == 0 {
        return Ok(());
    }
    let (r32, d32) = (dim_u32(op, "rows", rows)?, dim_u32(op, "d", d)?);
    let name = form("snella_layernorm_affine", "snella_layernorm_affine_bf16", y.is_bf16());
    let f = gpu.func(name);
    let (ph, py) = (xhat.ptr(gpu), y.ptr(gpu));
    let mut b = gpu.stream.launch_builder(&f);
    b.arg(&ph).arg(gamma).arg(beta).arg(&r32).arg(&d32).arg(&py);
    // SAFETY: xhat and y hold rows·d values of the kernel's form, gamma/beta d (checked).
    unsafe { b.launch(row_cfg(rows)) }.map(|_| ()).map_err(|e| cuda_err(op, e))
}

/// Backward of [`layernorm_fwd_xhat`] from the saved `x̂: [rows, d]` (f32 or bf16) and
/// `rstd: [rows]`, as `snella_core::ops::layernorm::layernorm_bwd_xhat`: writes
/// `dx = rstd·(g − mean(g) − x̂·mean(g·x̂)) (+ res)` (`g = dy·gamma`, f32; `res: [rows, d]`, when
/// given, is added in the same pass: a pre-norm block's residual gradient) and, when given, ACCUMULATES
/// `dgamma += Σ_rows dy·x̂`, `dbeta += Σ_rows dy` (deterministic chunked sums as [`layernorm_bwd`]).
///
/// # Errors
/// `Tensor` when a buffer is shorter than its shape needs; `CUDA_OOM` for the scratch;
/// `CUDA_ERROR` on a launch failure.
#[allow(clippy::too_many_arguments)]
pub fn layernorm_bwd_xhat(
    gpu: &Gpu, dy: &In, xhat: ActRef, gamma: &In, rstd: &In, rows: usize, d: usize,
    dx: &mut Out, res: Option<&In>, dgamma: Option<&mut Out>, dbeta: Option<&mut Out>,
) -> Result<(), SnellaError> {
    layernorm_bwd_xhat_bf16_copy(gpu, dy, xhat, gamma, rstd, rows, d, dx, None, res, dgamma, dbeta)
}

/// [`layernorm_bwd_xhat`] writing, when `dx16` is given (`[rows, d]` bf16 bit patterns), `dx`
/// rounded to bf16 (nearest even) in the same pass as well: the next linear's `∂L/∂y` as a bf16
/// step's products read it, without a conversion pass (session 8).
///
/// # Errors
/// As [`layernorm_bwd_xhat`]; `Tensor` when `dx16` is shorter than `rows·d`.
#[allow(clippy::too_many_arguments)]
pub fn layernorm_bwd_xhat_bf16_copy(
    gpu: &Gpu, dy: &In, xhat: ActRef, gamma: &In, rstd: &In, rows: usize, d: usize,
    dx: &mut Out, dx16: Option<&mut cudarc::driver::CudaSlice<u16>>, res: Option<&In>, dgamma: Option<&mut Out>, dbeta: Option<&mut Out>,
) -> Result<(), SnellaError> {
    use cudarc::driver::DevicePtrMut;
    let op = "layernorm_bwd_xhat";
    if let Some(h) = dx16.as_deref() {
        check_len(op, "dx16", h.len(), rows * d)?;
    }
    check_len(op, "dy", dy.len(), rows * d)?;
    if let Some(r) = res {
        check_len(op, "res", r.len(), rows * d)?;
    }
    check_len(op, "xhat", xhat.len(), rows * d)?;
    check_len(op, "dx", dx.len(), rows * d)?;
    check_len(op, "gamma", gamma.len(), d)?;
    check_len(op, "rstd", rstd.len(), rows)?;
    let Some((r32, d32)) = bwd_dims(op, dgamma.as_deref(), dbeta.as_deref(), rows, d)? else { return Ok(()) };
    let ph = xhat.ptr(gpu);
    let pr: u64 = res.map_or(0, |r| r.device_ptr(&gpu.stream).0);
    let p16: u64 = dx16.map_or(0, |h| h.device_ptr_mut(&gpu.stream).0);
    let name = form("snella_layernorm_bwd_dx_xhat", "snella_layernorm_bwd_dx_xhat_bf16", xhat.is_bf16());
    let f = gpu.func(name);
    let mut b = gpu.stream.launch_builder(&f);
    b.arg(dy).arg(&ph).arg(gamma).arg(rstd).arg(&r32).arg(&d32).arg(dx).arg(&pr).arg(&p16);
    // SAFETY: every buffer holds what its shape needs (checked); the kernel bounds-checks rows.
    unsafe { b.launch(row_cfg(rows)) }.map_err(|e| cuda_err(op, e))?;
    if dgamma.is_none() && dbeta.is_none() {
        return Ok(());
    }
    param_grads(gpu, rows, d, dgamma, dbeta, |pg, pb, cfg| {
        let name = form("snella_layernorm_bwd_param_partial_xhat", "snella_layernorm_bwd_param_partial_xhat_bf16", xhat.is_bf16());
        let f = gpu.func(name);
        let mut b = gpu.stream.launch_builder(&f);
        b.arg(dy).arg(&ph).arg(&r32).arg(&d32).arg(pg).arg(pb);
        // SAFETY: dy, xhat hold rows·d values, pg/pb nchunks·d; every part element is written.
        unsafe { b.launch(cfg) }.map(|_| ()).map_err(|e| cuda_err(op, e))
    })
}
