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
    /// Abramowitz & Stegun 7.1.26 (max abs error 1.5e-7, about f32 resolution), the same
    /// approximation PyTorch's vectorised CPU `erf` uses; branch-free and ~10× faster than
    /// `libm::erff`, which dominated the CPU step's GELU. `f64` keeps the exact `libm::erf` for the
    /// finite-difference checks.
    fn erf(self) -> Self {
        let (p, a1, a2, a3, a4, a5) = (0.327_591_1f32, 0.254_829_6f32, -0.284_496_74f32, 1.421_413_8f32, -1.453_152_1f32, 1.061_405_4f32);
        let x = self.abs();
        let t = 1.0 / (1.0 + p * x);
        let poly = ((((a5 * t + a4) * t + a3) * t + a2) * t + a1) * t;
        let r = 1.0 - poly * (-x * x).exp();
        r.copysign(self)
    }
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
