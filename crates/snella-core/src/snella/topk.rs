//! Exact top-k by magnitude (spec §2): radix select, never a full sort; ties by lower flat index.

use crate::Real;

/// The kept set `S` of one layer, described without a mask: every entry with `|M| > threshold`
/// is kept, plus the first `ties` entries (in flat index order) with `|M| == threshold`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct KeptSet {
    /// The k-th largest magnitude (f64 holds every f32 exactly).
    pub threshold: f64,
    /// How many entries equal to `threshold` are kept, lowest flat indices first.
    pub ties: usize,
    /// The number of kept entries `k`.
    pub k: usize,
    /// `τ`, the largest dropped magnitude (0 when nothing is dropped), for the soft-threshold rule.
    pub tau: f64,
}

/// `k = N − ⌊s·N⌋` (spec §2) for `n` entries at sparsity `s ∈ [0, 1)`.
pub fn kept_count(n: usize, sparsity: f64) -> usize {
    n - (sparsity * n as f64).floor() as usize
}

/// Exact selection of the `k` largest of `mags` (all `≥ 0`; NaN is treated as 0).
pub fn select_topk<T: Real>(mags: &[T], k: usize) -> KeptSet {
    let _ = (mags, k);
    todo!("helper B")
}

/// Writes `mask[i] = true` for the kept entries of `set` (`mags` as given to [`select_topk`]).
pub fn kept_mask<T: Real>(mags: &[T], set: &KeptSet, mask: &mut [bool]) {
    let _ = (mags, set, mask);
    todo!("helper B")
}
