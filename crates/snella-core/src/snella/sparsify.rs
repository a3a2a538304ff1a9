//! The sparsify rules (spec §2) applied to the merged matrix `M`, and their backward (spec §3).
//!
//! No mask is materialised: the kept set is tested per entry from its [`KeptSet`] description,
//! with the tie rule resolved by one flat-index cut (see `topk::tie_cut`), so both passes are
//! element-wise, parallel over fixed chunks, and deterministic.

use super::topk::{mag_key, threshold_key, tie_cut, KeptSet, PAR_CHUNK};
use crate::Real;
use rayon::prelude::*;

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

/// `out = src ⊙ factor` over a run of entries in which "kept" means `|m| ≥ thr` (`GE`) or
/// `|m| > thr`; a plain comparison, so the loop is branch-free and vectorises.
fn run<T: Real, const GE: bool>(rule: SparsifyRule, m: &[T], src: &[T], out: &mut [T], thr: T) {
    let keep = |a: T| if GE { a >= thr } else { a > thr };
    match rule {
        SparsifyRule::MagnitudeProduct => {
            for ((ov, &mv), &sv) in out.iter_mut().zip(m).zip(src) {
                let a = mv.abs();
                *ov = sv * if keep(a) { a } else { T::zero() };
            }
        }
        SparsifyRule::Mask => {
            for ((ov, &mv), &sv) in out.iter_mut().zip(m).zip(src) {
                *ov = sv * if keep(mv.abs()) { T::one() } else { T::zero() };
            }
        }
        SparsifyRule::SoftThreshold => unreachable!("soft-threshold needs no kept set"),
    }
}

/// `out[i] = src[i] · factor_i`, with the stop-gradient factor of `rule` computed from `m`.
fn apply<T: Real>(m: &[T], set: &KeptSet, rule: SparsifyRule, src: &[T], out: &mut [T]) {
    assert_eq!(m.len(), out.len(), "sparsify: output length {} differs from m ({})", out.len(), m.len());
    assert_eq!(m.len(), src.len(), "sparsify: input length {} differs from m ({})", src.len(), m.len());
    if rule == SparsifyRule::SoftThreshold {
        let tau = T::of(set.tau);
        out.par_chunks_mut(PAR_CHUNK).zip(m.par_chunks(PAR_CHUNK)).zip(src.par_chunks(PAR_CHUNK)).for_each(
            |((o, mc), sc)| {
                for ((ov, &mv), &sv) in o.iter_mut().zip(mc).zip(sc) {
                    let f = mv.abs() - tau;
                    *ov = sv * if f > T::zero() { f } else { T::zero() };
                }
            },
        );
        return;
    }
    let thr = threshold_key(set.threshold);
    // Fast path: with a positive threshold exactly representable in T, the key order equals the
    // order of T (NaN is never kept), and the tie rule is "≥ thr before `cut`, > thr from `cut` on".
    let thr_t = T::of(set.threshold);
    let fast = thr > 0 && thr_t.f64() == f64::from_bits(thr);
    let cut = if fast {
        tie_cut(m, |x: T| x.abs() == thr_t, set.ties)
    } else {
        tie_cut(m, |x: T| mag_key(x.abs()) == thr, set.ties)
    };
    out.par_chunks_mut(PAR_CHUNK).enumerate().for_each(|(ci, o)| {
        let base = ci * PAR_CHUNK;
        let mc = &m[base..base + o.len()];
        let sc = &src[base..base + o.len()];
        if fast {
            let lc = cut.clamp(base, base + o.len()) - base;
            let (o1, o2) = o.split_at_mut(lc);
            run::<T, true>(rule, &mc[..lc], &sc[..lc], o1, thr_t);
            run::<T, false>(rule, &mc[lc..], &sc[lc..], o2, thr_t);
        } else {
            for (t, ((ov, &mv), &sv)) in o.iter_mut().zip(mc).zip(sc).enumerate() {
                let a = mv.abs();
                let kk = mag_key(a);
                let keep = kk > thr || (kk == thr && base + t < cut);
                let f = match (rule, keep) {
                    (_, false) => T::zero(),
                    (SparsifyRule::MagnitudeProduct, true) => a,
                    (_, true) => T::one(),
                };
                *ov = sv * f;
            }
        }
    });
}

/// Forward (spec §2): `dw = rule(m)` over `[n_in·n_out]` entries, given the kept set from
/// `select_topk(|m|)`:
/// magnitude-product `dw = m·|m|·1_S`, soft-threshold `dw = m·max(|m| − τ, 0)`, mask `dw = m·1_S`.
///
/// # Panics
/// If `dw` and `m` differ in length.
pub fn sparsify_fwd<T: Real>(m: &[T], set: &KeptSet, rule: SparsifyRule, dw: &mut [T]) {
    apply(m, set, rule, m, dw);
}

/// Backward (spec §3): `dm = Ĝ = g ⊙ factor` where the factor is the stop-gradient term of `rule`
/// (`|m|·1_S`, `max(|m| − τ, 0)` or `1_S`); entries outside `S` get 0.
///
/// # Panics
/// If `g`, `dm` and `m` differ in length.
pub fn sparsify_bwd<T: Real>(m: &[T], set: &KeptSet, rule: SparsifyRule, g: &[T], dm: &mut [T]) {
    apply(m, set, rule, g, dm);
}

#[cfg(test)]
mod tests {
    use super::super::topk::{kept_mask, select_topk};
    use super::*;

    const RULES: [SparsifyRule; 3] = [SparsifyRule::MagnitudeProduct, SparsifyRule::SoftThreshold, SparsifyRule::Mask];

    #[test]
    fn rules_match_naive_with_ties() {
        // |m| = [3, 1, 2, 2, 2, 0.5, 2]; k = 3 keeps 3 and the first two 2's (indices 2 and 3).
        let m = vec![-3.0, 1.0, 2.0, -2.0, 2.0, 0.5, -2.0];
        let mags: Vec<f64> = m.iter().map(|x: &f64| x.abs()).collect();
        let set = select_topk(&mags, 3);
        assert_eq!((set.threshold, set.ties, set.tau), (2.0, 2, 2.0));
        let mut mask = vec![false; 7];
        kept_mask(&mags, &set, &mut mask);
        assert_eq!(mask, vec![true, false, true, true, false, false, false]);
        let g = vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0];
        let mut dw = vec![0.0; 7];
        let mut dm = vec![0.0; 7];
        sparsify_fwd(&m, &set, SparsifyRule::MagnitudeProduct, &mut dw);
        assert_eq!(dw, vec![-9.0, 0.0, 4.0, -4.0, 0.0, 0.0, 0.0]);
        sparsify_bwd(&m, &set, SparsifyRule::MagnitudeProduct, &g, &mut dm);
        assert_eq!(dm, vec![3.0, 0.0, 6.0, 8.0, 0.0, 0.0, 0.0]);
        sparsify_fwd(&m, &set, SparsifyRule::SoftThreshold, &mut dw);
        assert_eq!(dw, vec![-3.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0]);
        sparsify_bwd(&m, &set, SparsifyRule::SoftThreshold, &g, &mut dm);
        assert_eq!(dm, vec![1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0]);
        sparsify_fwd(&m, &set, SparsifyRule::Mask, &mut dw);
        assert_eq!(dw, vec![-3.0, 0.0, 2.0, -2.0, 0.0, 0.0, 0.0]);
        sparsify_bwd(&m, &set, SparsifyRule::Mask, &g, &mut dm);
        assert_eq!(dm, vec![1.0, 0.0, 3.0, 4.0, 0.0, 0.0, 0.0]);
        // k = 5: τ = 1 (all 2's kept, the largest dropped is 1).
        let set5 = select_topk(&mags, 5);
        assert_eq!(set5.tau, 1.0);
        sparsify_fwd(&m, &set5, SparsifyRule::SoftThreshold, &mut dw);
        assert_eq!(dw, vec![-6.0, 0.0, 2.0, -2.0, 2.0, 0.0, -2.0]);
    }

    #[test]
    fn large_input_matches_mask_across_chunks() {
        // Quantised values spanning several parallel chunks, so the tie cut crosses chunk borders.
        let n = 3 * PAR_CHUNK + 777;
        let m: Vec<f32> = crate::gradcheck::rand_vec(n, 11, 1.0).iter().map(|&x| ((x * 8.0).round() / 8.0) as f32).collect();
        let mags: Vec<f32> = m.iter().map(|x| x.abs()).collect();
        let set = select_topk(&mags, n / 3);
        let mut mask = vec![false; n];
        kept_mask(&mags, &set, &mut mask);
        assert!(set.ties > 0);
        let g: Vec<f32> = (0..n).map(|i| (i % 13) as f32 - 6.0).collect();
        for rule in RULES {
            let mut dw = vec![0.0f32; n];
            let mut dm = vec![0.0f32; n];
            sparsify_fwd(&m, &set, rule, &mut dw);
            sparsify_bwd(&m, &set, rule, &g, &mut dm);
            for i in 0..n {
                let a = m[i].abs();
                let f = match rule {
                    SparsifyRule::MagnitudeProduct => if mask[i] { a } else { 0.0 },
                    SparsifyRule::SoftThreshold => (a - set.tau as f32).max(0.0),
                    SparsifyRule::Mask => if mask[i] { 1.0 } else { 0.0 },
                };
                assert_eq!(dw[i], m[i] * f, "{rule:?} fwd at {i}");
                assert_eq!(dm[i], g[i] * f, "{rule:?} bwd at {i}");
            }
        }
    }
}
