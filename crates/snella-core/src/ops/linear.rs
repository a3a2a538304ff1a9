//! Bias add and bias gradient for linear layers (`y = x·Wᵀ + b`); the GEMMs are in `crate::gemm`.

use crate::Real;

/// `y[r, :] += bias` for every row `r` of `y: [rows, cols]`; `bias: [cols]`.
pub fn add_bias<T: Real>(y: &mut [T], bias: &[T], rows: usize, cols: usize) {
    let _ = (y, bias, rows, cols);
    todo!("helper A")
}

/// `db[c] (+)= Σ_r dy[r, c]` for `dy: [rows, cols]`; overwrites `db` unless `accumulate`.
pub fn bias_grad<T: Real>(dy: &[T], rows: usize, cols: usize, db: &mut [T], accumulate: bool) {
    let _ = (dy, rows, cols, db, accumulate);
    todo!("helper A")
}
