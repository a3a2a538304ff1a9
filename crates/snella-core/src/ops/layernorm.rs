//! LayerNorm over the last dimension (timm `nn.LayerNorm(eps=1e-6)`), forward and backward.

use crate::Real;

/// `y = (x − mean)·rstd·gamma + beta` per row of `x: [rows, d]`; writes `mean, rstd: [rows]`
/// (`rstd = 1/sqrt(var + eps)`, biased variance) for the backward.
#[allow(clippy::too_many_arguments)]
pub fn layernorm_fwd<T: Real>(
    x: &[T], gamma: &[T], beta: &[T], rows: usize, d: usize, eps: T,
    y: &mut [T], mean: &mut [T], rstd: &mut [T],
) {
    let _ = (x, gamma, beta, rows, d, eps, y, mean, rstd);
    todo!("helper A")
}

/// Backward of [`layernorm_fwd`]: writes `dx: [rows, d]`; when given, accumulates (`+=`)
/// `dgamma, dbeta: [d]`.
#[allow(clippy::too_many_arguments)]
pub fn layernorm_bwd<T: Real>(
    dy: &[T], x: &[T], gamma: &[T], mean: &[T], rstd: &[T], rows: usize, d: usize,
    dx: &mut [T], dgamma: Option<&mut [T]>, dbeta: Option<&mut [T]>,
) {
    let _ = (dy, x, gamma, mean, rstd, rows, d, dx, dgamma, dbeta);
    todo!("helper A")
}
