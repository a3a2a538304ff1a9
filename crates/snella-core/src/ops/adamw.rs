//! AdamW (Loshchilov & Hutter, decoupled weight decay), as `torch.optim.AdamW`.

use crate::Real;
use rayon::prelude::*;

/// Elements per parallel task of [`adamw_step`] (element-wise, so deterministic).
const CHUNK: usize = 8192;

/// Hyper-parameters of one AdamW update.
#[derive(Clone, Copy, Debug)]
pub struct AdamWParams {
    /// Learning rate for this step (after the schedule).
    pub lr: f64,
    /// First-moment decay β1.
    pub beta1: f64,
    /// Second-moment decay β2.
    pub beta2: f64,
    /// ε added to the denominator.
    pub eps: f64,
    /// Decoupled weight decay (0 for the no-decay group).
    pub weight_decay: f64,
    /// The 1-based step count, for bias correction.
    pub step: u64,
}

/// One in-place AdamW update of `param` from `grad`, with moments `m`, `v`:
/// `p ← p·(1 − lr·wd)`, `m ← β1·m + (1−β1)·g`, `v ← β2·v + (1−β2)·g²`,
/// `p ← p − lr·(m/(1−β1^t)) / (sqrt(v/(1−β2^t)) + ε)` — the exact order of PyTorch's
/// single-tensor implementation.
///
/// The scalars (`1 − lr·wd`, `1 − β1`, `β2`, `1 − β2`, `lr/(1−β1^t)`, `sqrt(1−β2^t)`, `ε`) are
/// computed in `f64` as Python does and rounded to `T`; the tensor arithmetic is in `T`, op by op
/// as PyTorch's CPU kernels do it:
/// `p *= (1−lr·wd)` (skipped when `wd = 0`, an exact no-op), `m = m + (1−β1)·(g − m)`
/// (`exp_avg.lerp_(grad, 1−β1)`), `v = v·β2 + (1−β2)·g·g` (`mul_` then `addcmul_`),
/// `denom = sqrt(v)/sqrt(1−β2^t) + ε`, `p = p + (−step_size·m)/denom` (`addcdiv_`).
///
/// # Panics
/// If `grad`, `m` or `v` has a different length than `param`.
pub fn adamw_step<T: Real>(param: &mut [T], grad: &[T], m: &mut [T], v: &mut [T], h: &AdamWParams) {
    let n = param.len();
    assert!(grad.len() == n && m.len() == n && v.len() == n, "adamw_step: param/grad/m/v lengths differ");
    let step = h.step as f64;
    let decay = (h.weight_decay != 0.0).then(|| T::of(1.0 - h.lr * h.weight_decay));
    let w1 = T::of(1.0 - h.beta1);
    let b2 = T::of(h.beta2);
    let w2 = T::of(1.0 - h.beta2);
    let bias_c1 = 1.0 - h.beta1.powf(step);
    let bias_c2 = 1.0 - h.beta2.powf(step);
    let neg_step_size = T::of(-(h.lr / bias_c1));
    let bias_c2_sqrt = T::of(bias_c2.sqrt());
    let eps = T::of(h.eps);
    param
        .par_chunks_mut(CHUNK)
        .zip(grad.par_chunks(CHUNK))
        .zip(m.par_chunks_mut(CHUNK).zip(v.par_chunks_mut(CHUNK)))
        .for_each(|((pc, gc), (mc, vc))| {
            for (((p, &g), mi), vi) in pc.iter_mut().zip(gc).zip(mc.iter_mut()).zip(vc.iter_mut()) {
                if let Some(dec) = decay {
                    *p *= dec;
                }
                *mi += w1 * (g - *mi);
                *vi *= b2;
                *vi += w2 * g * g;
                let denom = vi.sqrt() / bias_c2_sqrt + eps;
                *p += neg_step_size * *mi / denom;
            }
        });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn adamw_first_step_by_hand() {
        // Step 1 from zero moments: m = 0.1·g, v = 0.001·g², m̂ = g, v̂ = g²,
        // p ← p·(1 − lr·wd) − lr·g/(|g| + ε).
        let h = AdamWParams { lr: 1e-3, beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.05, step: 1 };
        let mut p = vec![0.5f64, -2.0, 1.0];
        let g = [0.2f64, -0.4, 0.0];
        let (mut m, mut v) = (vec![0.0; 3], vec![0.0; 3]);
        adamw_step(&mut p, &g, &mut m, &mut v, &h);
        let dec = 1.0 - 1e-3 * 0.05;
        let want = [0.5 * dec - 1e-3 * 0.2 / (0.2 + 1e-8), -2.0 * dec + 1e-3 * 0.4 / (0.4 + 1e-8), dec];
        for (a, w) in p.iter().zip(want) {
            assert!((a - w).abs() < 1e-15, "{a} vs {w}");
        }
        assert!((m[0] - 0.02).abs() < 1e-15 && (v[1] - 0.001 * 0.16).abs() < 1e-15);
    }

    #[test]
    fn adamw_two_steps_by_hand_f32() {
        // Second step with non-zero moments, no weight decay; reference in f64 from the formula.
        let h1 = AdamWParams { lr: 0.01, beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.0, step: 1 };
        let h2 = AdamWParams { step: 2, ..h1 };
        let (g1, g2) = (0.3f64, -0.1f64);
        let mut p = [1.0f32];
        let (mut m, mut v) = ([0f32], [0f32]);
        adamw_step(&mut p, &[g1 as f32], &mut m, &mut v, &h1);
        adamw_step(&mut p, &[g2 as f32], &mut m, &mut v, &h2);
        let m2 = 0.9 * (0.1 * g1) + 0.1 * g2;
        let v2 = 0.999 * (0.001 * g1 * g1) + 0.001 * g2 * g2;
        let p1 = 1.0 - 0.01 * g1 / (g1.abs() + 1e-8);
        let p2 = p1 - 0.01 / (1.0 - 0.81) * m2 / ((v2 / (1.0 - 0.999f64.powi(2))).sqrt() + 1e-8);
        assert!(((p[0] as f64 - p2) / p2).abs() < 1e-6, "{} vs {p2}", p[0]);
        assert!(((m[0] as f64 - m2) / m2).abs() < 1e-6);
        assert!(((v[0] as f64 - v2) / v2).abs() < 1e-6);
    }

    #[test]
    fn adamw_large_tensor_is_elementwise() {
        let n = 3 * CHUNK + 5;
        let h = AdamWParams { lr: 1e-3, beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.1, step: 3 };
        let g: Vec<f32> = (0..n).map(|i| ((i % 17) as f32 - 8.0) * 0.01).collect();
        let mut p: Vec<f32> = (0..n).map(|i| (i % 5) as f32 * 0.1).collect();
        let (mut m, mut v) = (vec![0.01f32; n], vec![0.001f32; n]);
        let (mut p1, mut m1, mut v1) = (vec![p[n - 1]], vec![m[n - 1]], vec![v[n - 1]]);
        adamw_step(&mut p, &g, &mut m, &mut v, &h);
        adamw_step(&mut p1, &g[n - 1..], &mut m1, &mut v1, &h);
        assert_eq!((p[n - 1], m[n - 1], v[n - 1]), (p1[0], m1[0], v1[0]));
    }
}
