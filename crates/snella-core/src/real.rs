//! The scalar trait every CPU op is generic over: `f32` for training, `f64` for gradient checks.

use num_traits::Float;
use std::fmt::Debug;
use std::iter::Sum;
use std::ops::{AddAssign, MulAssign, SubAssign};

/// A floating-point scalar usable by every CPU op (`f32` or `f64`).
pub trait Real:
    Float + Debug + Default + Send + Sync + Sum + AddAssign + SubAssign + MulAssign + 'static
{
    /// Converts from `f64` (rounding for `f32`).
    fn of(v: f64) -> Self;
    /// Converts to `f64` exactly.
    fn f64(self) -> f64;
    /// The error function, `erf(x)`, used by exact GELU.
    fn erf(self) -> Self;
    /// Row-major strided GEMM kernel: see [`crate::gemm::gemm`].
    ///
    /// # Safety
    /// Every pointer must be valid for the strided `m×k`, `k×n` and `m×n` extents.
    #[allow(clippy::too_many_arguments)]
    unsafe fn gemm_strided(
        m: usize, k: usize, n: usize, alpha: Self,
        a: *const Self, rsa: isize, csa: isize,
        b: *const Self, rsb: isize, csb: isize,
        beta: Self, c: *mut Self, rsc: isize, csc: isize,
    );
}

impl Real for f32 {
    fn of(v: f64) -> Self { v as f32 }
    fn f64(self) -> f64 { self as f64 }
    fn erf(self) -> Self { libm::erff(self) }
    unsafe fn gemm_strided(
        m: usize, k: usize, n: usize, alpha: Self,
        a: *const Self, rsa: isize, csa: isize,
        b: *const Self, rsb: isize, csb: isize,
        beta: Self, c: *mut Self, rsc: isize, csc: isize,
    ) {
        // SAFETY: forwarded from this function's contract.
        unsafe { matrixmultiply::sgemm(m, k, n, alpha, a, rsa, csa, b, rsb, csb, beta, c, rsc, csc) }
    }
}

impl Real for f64 {
    fn of(v: f64) -> Self { v }
    fn f64(self) -> f64 { self }
    fn erf(self) -> Self { libm::erf(self) }
    unsafe fn gemm_strided(
        m: usize, k: usize, n: usize, alpha: Self,
        a: *const Self, rsa: isize, csa: isize,
        b: *const Self, rsb: isize, csb: isize,
        beta: Self, c: *mut Self, rsc: isize, csc: isize,
    ) {
        // SAFETY: forwarded from this function's contract.
        unsafe { matrixmultiply::dgemm(m, k, n, alpha, a, rsa, csa, b, rsb, csb, beta, c, rsc, csc) }
    }
}
