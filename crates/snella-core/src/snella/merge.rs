//! Kernelized merge (spec §1) and its analytic backward (spec §3).
//!
//! `A: [H, in, rh]`, `B: [H, out, rh]` (`rh = r/H`), `D_h[i,j] = ‖A[h,i,:] − B[h,j,:]‖₂`,
//! `K = Σ_h c_h·D_h` with `c_h = 0.1·(−1)^h`, and for SNELLA the mixture
//! `M[i,j] = K[i,j] + α·softmax_j(K[i,·]/γ)[j] + β` with `γ` clamped to `≥ GAMMA_MIN`.
//! `M: [in, out]` row-major. The backward recomputes `D`, `K` and the softmax; nothing is saved.

use crate::Real;

/// Lower clamp of the mixture temperature `γ` in the forward pass (spec §1, Decision).
pub const GAMMA_MIN: f64 = 1e-4;

/// The mixture scalars of a SNELLA adapter (or their gradients).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Mixture<T> {
    /// Softmax weight α (init 1).
    pub alpha: T,
    /// Softmax temperature γ (init 1, clamped to `≥ GAMMA_MIN` in the forward).
    pub gamma: T,
    /// Constant offset β (init 0).
    pub beta: T,
}

/// The fixed kernel coefficients `c_h = 0.1·(−1)^h`, `h = 0..heads` (spec §1, Decision).
pub fn coeffs(heads: usize) -> Vec<f64> {
    (0..heads).map(|h| if h % 2 == 0 { 0.1 } else { -0.1 }).collect()
}

/// Forward: writes `m: [n_in, n_out]`. `mixture = None` is the SNELL variant (`M = K`).
#[allow(clippy::too_many_arguments)]
pub fn merge_fwd<T: Real>(
    a: &[T], b: &[T], heads: usize, n_in: usize, n_out: usize, rh: usize,
    mixture: Option<Mixture<T>>, m: &mut [T],
) {
    let _ = (a, b, heads, n_in, n_out, rh, mixture, m);
    todo!("helper B")
}

/// Backward: from `dm = ∂L/∂M: [n_in, n_out]` writes `da: [H, n_in, rh]`, `db: [H, n_out, rh]`
/// (overwritten) and returns the mixture gradients `(∂L/∂α, ∂L/∂γ, ∂L/∂β)` when `mixture` is given.
/// `∂L/∂γ` is 0 while `γ < GAMMA_MIN` (the clamp is active).
#[allow(clippy::too_many_arguments)]
pub fn merge_bwd<T: Real>(
    a: &[T], b: &[T], heads: usize, n_in: usize, n_out: usize, rh: usize,
    mixture: Option<Mixture<T>>, dm: &[T], da: &mut [T], db: &mut [T],
) -> Option<Mixture<T>> {
    let _ = (a, b, heads, n_in, n_out, rh, mixture, dm, da, db);
    todo!("helper B")
}
