//! Finite-difference gradient checking in f64, used by the tests of every backward.

/// Central-difference gradient of a scalar function `f` at `x`, with step `h`.
///
/// Returns `∂f/∂x_i ≈ (f(x + h·e_i) − f(x − h·e_i)) / 2h` for every `i`.
pub fn numeric_grad(x: &[f64], h: f64, mut f: impl FnMut(&[f64]) -> f64) -> Vec<f64> {
    let mut xp = x.to_vec();
    (0..x.len())
        .map(|i| {
            let orig = xp[i];
            xp[i] = orig + h;
            let fp = f(&xp);
            xp[i] = orig - h;
            let fm = f(&xp);
            xp[i] = orig;
            (fp - fm) / (2.0 * h)
        })
        .collect()
}

/// The largest relative error `|a − n| / max(1, |a|, |n|)` between an analytic gradient `a`
/// and a numeric gradient `n`.
pub fn max_rel_err(analytic: &[f64], numeric: &[f64]) -> f64 {
    assert_eq!(analytic.len(), numeric.len());
    analytic
        .iter()
        .zip(numeric)
        .map(|(a, n)| (a - n).abs() / 1f64.max(a.abs()).max(n.abs()))
        .fold(0.0, f64::max)
}

/// Asserts that the analytic and numeric gradients agree to `tol` (relative, see [`max_rel_err`]).
///
/// # Panics
/// With the name, the worst index and both values when they disagree.
pub fn assert_close(name: &str, analytic: &[f64], numeric: &[f64], tol: f64) {
    let err = max_rel_err(analytic, numeric);
    if err > tol {
        let (i, _) = analytic
            .iter()
            .zip(numeric)
            .map(|(a, n)| (a - n).abs())
            .enumerate()
            .fold((0, 0.0), |acc, (i, d)| if d > acc.1 { (i, d) } else { acc });
        panic!("{name}: gradient mismatch, max rel err {err:.3e} > {tol:.1e}; worst index {i}: analytic {} numeric {}", analytic[i], numeric[i]);
    }
}

/// A deterministic pseudo-random vector in `[-scale, scale]` (SplitMix64), for tests.
pub fn rand_vec(n: usize, seed: u64, scale: f64) -> Vec<f64> {
    let mut s = seed.wrapping_add(0x9E3779B97F4A7C15);
    (0..n)
        .map(|_| {
            s = s.wrapping_add(0x9E3779B97F4A7C15);
            let mut z = s;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58476D1CE4E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D049BB133111EB);
            z ^= z >> 31;
            ((z >> 11) as f64 / (1u64 << 53) as f64 * 2.0 - 1.0) * scale
        })
        .collect()
}
