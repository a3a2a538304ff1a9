//! Exact GELU, `x·Φ(x)` with the error function (PyTorch `nn.GELU()` default), forward and backward.

use crate::Real;
use rayon::prelude::*;

/// Elements per parallel task.
const CHUNK: usize = 4096;

/// `y[i] = 0.5·x[i]·(1 + erf(x[i]/√2))`.
///
/// Computed as PyTorch's CPU kernel does: `x·0.5·(1 + erf(x·(1/√2)))`.
///
/// # Panics
/// If `y` is shorter than `x`.
pub fn gelu_fwd<T: Real>(x: &[T], y: &mut [T]) {
    assert!(y.len() >= x.len(), "gelu_fwd: y has {} elements, needs {}", y.len(), x.len());
    let half = T::of(0.5);
    let one = T::one();
    let inv_sqrt2 = T::of(std::f64::consts::FRAC_1_SQRT_2);
    y[..x.len()].par_chunks_mut(CHUNK).zip(x.par_chunks(CHUNK)).for_each(|(yc, xc)| {
        for (o, &v) in yc.iter_mut().zip(xc) {
            *o = v * half * (one + (v * inv_sqrt2).erf());
        }
    });
}

/// `dx[i] = dy[i]·(Φ(x) + x·φ(x))`, from the saved pre-activation `x`.
///
/// `Φ` is the standard normal CDF and `φ` its density, computed as PyTorch's CPU kernel does.
///
/// # Panics
/// If `dy` or `dx` is shorter than `x`.
pub fn gelu_bwd<T: Real>(x: &[T], dy: &[T], dx: &mut [T]) {
    let n = x.len();
    assert!(dy.len() >= n, "gelu_bwd: dy has {} elements, needs {n}", dy.len());
    assert!(dx.len() >= n, "gelu_bwd: dx has {} elements, needs {n}", dx.len());
    let half = T::of(0.5);
    let one = T::one();
    let inv_sqrt2 = T::of(std::f64::consts::FRAC_1_SQRT_2);
    // 1/√(2π) = (2/√π)·(1/√2)·0.5
    let beta = T::of(std::f64::consts::FRAC_2_SQRT_PI * std::f64::consts::FRAC_1_SQRT_2 * 0.5);
    let neg_half = T::of(-0.5);
    dx[..n]
        .par_chunks_mut(CHUNK)
        .zip(x.par_chunks(CHUNK).zip(dy[..n].par_chunks(CHUNK)))
        .for_each(|(dxc, (xc, dyc))| {
            for ((o, &v), &g) in dxc.iter_mut().zip(xc).zip(dyc) {
                let cdf = half * (one + (v * inv_sqrt2).erf());
                let pdf = beta * (neg_half * v * v).exp();
                *o = g * (cdf + v * pdf);
            }
        });
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gradcheck::{assert_close, numeric_grad, rand_vec};

    #[test]
    fn gelu_forward_known_values() {
        let x = [1.0f64, 0.0, -1.0, 2.0, -3.0];
        let mut y = [0.0; 5];
        gelu_fwd(&x, &mut y);
        let want = [0.8413447460685429, 0.0, -0.15865525393145707, 1.9544997361036416, -0.00404969409489031];
        for (a, b) in y.iter().zip(want) {
            assert!((a - b).abs() < 1e-14, "{a} vs {b}");
        }
        // f32 agrees to f32 precision.
        let x32 = [1.0f32, -1.0];
        let mut y32 = [0.0f32; 2];
        gelu_fwd(&x32, &mut y32);
        assert!((y32[0] - 0.841_344_7).abs() < 1e-6);
        assert!((y32[1] + 0.158_655_26).abs() < 1e-6);
    }

    #[test]
    fn gelu_backward_known_value() {
        // d/dx gelu at 1 = Φ(1) + φ(1) = 0.8413447460685429 + 0.24197072451914337.
        let mut dx = [0.0];
        gelu_bwd(&[1.0f64], &[2.0], &mut dx);
        assert!((dx[0] - 2.0 * 1.0833154705876864).abs() < 1e-14, "{}", dx[0]);
    }

    #[test]
    fn gelu_backward_matches_finite_differences() {
        let n = 3 * 7 + 2;
        let x = rand_vec(n, 11, 3.0);
        let w = rand_vec(n, 12, 1.0);
        let num = numeric_grad(&x, 1e-5, |x| {
            let mut y = vec![0.0; n];
            gelu_fwd(x, &mut y);
            y.iter().zip(&w).map(|(a, b)| a * b).sum()
        });
        let mut dx = vec![0.0; n];
        gelu_bwd(&x, &w, &mut dx);
        assert_close("gelu dx", &dx, &num, 1e-6);
    }

    #[test]
    fn gelu_large_input_runs_in_chunks() {
        let n = 3 * CHUNK + 17;
        let x = rand_vec(n, 5, 4.0);
        let mut y = vec![0.0; n];
        gelu_fwd(&x, &mut y);
        let i = n - 1;
        let want = 0.5 * x[i] * (1.0 + libm::erf(x[i] / 2f64.sqrt()));
        assert!((y[i] - want).abs() < 1e-14);
    }
}
