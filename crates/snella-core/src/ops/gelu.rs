//! Exact GELU, `x·Φ(x)` with the error function (PyTorch `nn.GELU()` default), forward and backward.

use crate::Real;

/// `y[i] = 0.5·x[i]·(1 + erf(x[i]/√2))`.
pub fn gelu_fwd<T: Real>(x: &[T], y: &mut [T]) {
    let _ = (x, y);
    todo!("helper A")
}

/// `dx[i] = dy[i]·(Φ(x) + x·φ(x))`, from the saved pre-activation `x`.
pub fn gelu_bwd<T: Real>(x: &[T], dy: &[T], dx: &mut [T]) {
    let _ = (x, dy, dx);
    todo!("helper A")
}
