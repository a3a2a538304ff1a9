//! Per-element importance and uncertainty EMAs of the allocator (spec §5).

use crate::Real;

/// One importance update (spec §5), element-wise over a parameter `p` and its gradient `g`:
///
/// `I = |p ⊙ g|`, then `Ī ← β1·Ī + (1−β1)·I`, then `Ū ← β2·Ū + (1−β2)·|I − Ī|`, where the `Ī` in
/// the last step is the freshly updated one (as in the released code). Start both EMAs at 0.
///
/// **Decision (spec §5):** a non-finite `I` is replaced by 0; the return value is how many
/// elements were non-finite, so the caller can report an event naming the layer.
///
/// # Panics
/// If the four slices differ in length.
pub fn importance_update<T: Real>(p: &[T], g: &[T], ibar: &mut [T], ubar: &mut [T], beta1: T, beta2: T) -> usize {
    let n = p.len();
    assert!(
        g.len() == n && ibar.len() == n && ubar.len() == n,
        "importance_update: lengths differ (p {n}, g {}, ibar {}, ubar {})",
        g.len(),
        ibar.len(),
        ubar.len()
    );
    let (c1, c2) = (T::one() - beta1, T::one() - beta2);
    let mut bad = 0usize;
    for (((&pv, &gv), ib), ub) in p.iter().zip(g).zip(ibar.iter_mut()).zip(ubar.iter_mut()) {
        let mut i = (pv * gv).abs();
        if !i.is_finite() {
            i = T::zero();
            bad += 1;
        }
        *ib = beta1 * *ib + c1 * i;
        *ub = beta2 * *ub + c2 * (i - *ib).abs();
    }
    bad
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn two_step_ema_by_hand() {
        let (mut ib, mut ub) = (vec![0.0f64; 2], vec![0.0f64; 2]);
        // Step 1: I = [|2·−3|, |0.5·4|] = [6, 2].
        assert_eq!(importance_update(&[2.0, 0.5], &[-3.0, 4.0], &mut ib, &mut ub, 0.85, 0.85), 0);
        // Ī = 0.15·I = [0.9, 0.3]; Ū = 0.15·|I − Ī| = [0.765, 0.255].
        assert!((ib[0] - 0.9).abs() < 1e-15 && (ib[1] - 0.3).abs() < 1e-15);
        assert!((ub[0] - 0.765).abs() < 1e-15 && (ub[1] - 0.255).abs() < 1e-15);
        // Step 2: I = [1, 2]. Ī = 0.85·0.9 + 0.15 = 0.915; Ū = 0.85·0.765 + 0.15·|1 − 0.915| = 0.66300.
        importance_update(&[1.0, 1.0], &[1.0, 2.0], &mut ib, &mut ub, 0.85, 0.85);
        assert!((ib[0] - 0.915).abs() < 1e-15, "{}", ib[0]);
        assert!((ub[0] - 0.663).abs() < 1e-15, "{}", ub[0]);
        // Ī = 0.85·0.3 + 0.3 = 0.555; Ū = 0.85·0.255 + 0.15·|2 − 0.555| = 0.43350.
        assert!((ib[1] - 0.555).abs() < 1e-15 && (ub[1] - 0.4335).abs() < 1e-15, "{ib:?} {ub:?}");
    }

    #[test]
    fn nan_and_inf_gradients_are_counted_and_zeroed() {
        let (mut ib, mut ub) = (vec![1.0f32; 3], vec![1.0f32; 3]);
        let n = importance_update(&[1.0, 2.0, f32::MAX], &[f32::NAN, 1.0, 10.0], &mut ib, &mut ub, 0.5, 0.5);
        assert_eq!(n, 2);
        // NaN → I = 0: Ī = 0.5, Ū = 0.5 + 0.5·|0 − 0.5| = 0.75; overflow to Inf likewise.
        assert_eq!((ib[0], ub[0]), (0.5, 0.75));
        assert_eq!((ib[2], ub[2]), (0.5, 0.75));
        // I = 2: Ī = 1.5, Ū = 0.5 + 0.5·0.5 = 0.75.
        assert_eq!((ib[1], ub[1]), (1.5, 0.75));
    }
}
