//! The sparsify rules (spec §2) applied to the merged matrix `M`, and their backward (spec §3).

use super::topk::KeptSet;
use crate::Real;

/// How the kept set turns `M` into `ΔW` (spec §2).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SparsifyRule {
    /// `ΔW = M ⊙ sg(|M|) ⊙ 1_S` (released code; default).
    MagnitudeProduct,
    /// `ΔW = M ⊙ sg(max(|M| − τ, 0))` (paper Eq. 5), `τ` = largest dropped magnitude.
    SoftThreshold,
    /// `ΔW = M ⊙ 1_S`.
    Mask,
}

/// Forward: `dw = rule(m)` over `[n_in·n_out]` entries, given the kept set from `select_topk(|m|)`.
pub fn sparsify_fwd<T: Real>(m: &[T], set: &KeptSet, rule: SparsifyRule, dw: &mut [T]) {
    let _ = (m, set, rule, dw);
    todo!("helper B")
}

/// Backward: `dm = Ĝ = g ⊙ factor` where the factor is the stop-gradient term of `rule`.
pub fn sparsify_bwd<T: Real>(m: &[T], set: &KeptSet, rule: SparsifyRule, g: &[T], dm: &mut [T]) {
    let _ = (m, set, rule, g, dm);
    todo!("helper B")
}
