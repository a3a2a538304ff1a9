//! Softmax cross-entropy with mean reduction over the batch, fused with its gradient.

use crate::Real;

/// For `logits: [b, c]` and integer `labels: [b]`, returns `(mean loss, number of rows whose argmax
/// equals the label)` and writes `dlogits = (softmax − onehot)/b`.
///
/// Per row the loss is `logsumexp(row) − row[label]`, with the log-sum-exp taken around the row
/// maximum (numerically stable); the per-row losses are summed in `f64` in row order. The argmax
/// is the first maximal index (as `torch.argmax`). With `b = 0` it returns `(0, 0)`. This is
/// [`cross_entropy_sum`] with `norm = b`, the sum divided by `b`.
///
/// # Panics
/// If a label is `≥ c` (the caller validates labels with a clear error first).
pub fn cross_entropy<T: Real>(logits: &[T], labels: &[u32], b: usize, c: usize, dlogits: &mut [T]) -> (T, usize) {
    if b == 0 {
        return (T::zero(), 0);
    }
    let (sum, correct) = cross_entropy_sum(logits, labels, b, c, b, dlogits);
    (T::of(sum / b as f64), correct)
}

/// Softmax cross-entropy of `b` rows with an explicit normaliser: writes
/// `dlogits = (softmax − onehot)·(1/norm)` and returns `(Σ_r loss_r in f64, correct top-1)`.
///
/// With `norm` the *global* batch size, the gradients of a batch's parts (micro-batches, or the
/// shards of data-parallel ranks) add up to the gradient of the whole batch, each part rounding
/// exactly as the others do (the factor `1/norm` is the same f32 value everywhere). The per-row
/// losses are summed in `f64` in row order; `b = 0` returns `(0, 0)` and writes nothing.
///
/// # Panics
/// If a label is `≥ c`, a slice is shorter than its shape, or `norm = 0` with `b > 0`.
pub fn cross_entropy_sum<T: Real>(logits: &[T], labels: &[u32], b: usize, c: usize, norm: usize, dlogits: &mut [T]) -> (f64, usize) {
    assert!(logits.len() >= b * c, "cross_entropy: logits has {} elements, needs {}", logits.len(), b * c);
    assert!(dlogits.len() >= b * c, "cross_entropy: dlogits has {} elements, needs {}", dlogits.len(), b * c);
    assert!(labels.len() >= b, "cross_entropy: labels has {} elements, needs {b}", labels.len());
    if b == 0 {
        return (0.0, 0);
    }
    assert!(norm > 0, "cross_entropy: the normaliser must be positive");
    let inv_b = T::one() / T::of(norm as f64);
    let mut loss_sum = 0f64;
    let mut correct = 0usize;
    for r in 0..b {
        let row = &logits[r * c..(r + 1) * c];
        let drow = &mut dlogits[r * c..(r + 1) * c];
        let lab = labels[r] as usize;
        assert!(lab < c, "cross_entropy: label {lab} of row {r} is not below the class count {c}");
        let (mut amax, mut mx) = (0usize, row[0]);
        for (j, &v) in row.iter().enumerate().skip(1) {
            if v > mx {
                mx = v;
                amax = j;
            }
        }
        if amax == lab {
            correct += 1;
        }
        let mut sum = T::zero();
        for &v in row {
            sum += (v - mx).exp();
        }
        let lse = mx + sum.ln();
        loss_sum += (lse - row[lab]).f64();
        for (j, (o, &v)) in drow.iter_mut().zip(row).enumerate() {
            let p = (v - lse).exp();
            *o = if j == lab { (p - T::one()) * inv_b } else { p * inv_b };
        }
    }
    (loss_sum, correct)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gradcheck::{assert_close, numeric_grad, rand_vec};

    #[test]
    fn cross_entropy_known_logits() {
        // Row 0: [1, 2, 3], label 2 (correct); row 1: [0, 0, 0], label 0 (argmax 0 → correct);
        // row 2: [1000, 0, -1000], label 1 (wrong; stability with huge logits).
        let logits = [1.0f64, 2.0, 3.0, 0.0, 0.0, 0.0, 1000.0, 0.0, -1000.0];
        let labels = [2u32, 0, 1];
        let mut dl = [0.0; 9];
        let (loss, correct) = cross_entropy(&logits, &labels, 3, 3, &mut dl);
        let lse0 = (1f64.exp() + 2f64.exp() + 3f64.exp()).ln();
        let l0 = lse0 - 3.0;
        let l1 = 3f64.ln();
        let l2 = 1000.0; // lse = 1000 + ln(1 + e^-1000 + e^-2000) = 1000
        assert!((loss - (l0 + l1 + l2) / 3.0).abs() < 1e-12, "{loss}");
        assert!((l0 - 0.4076059644443801).abs() < 1e-14);
        assert_eq!(correct, 2);
        let p0: Vec<f64> = [1.0f64, 2.0, 3.0].iter().map(|v| (v - lse0).exp()).collect();
        let want = [
            p0[0] / 3.0, p0[1] / 3.0, (p0[2] - 1.0) / 3.0,
            (1.0 / 3.0 - 1.0) / 3.0, 1.0 / 9.0, 1.0 / 9.0,
            1.0 / 3.0, -1.0 / 3.0, 0.0,
        ];
        for (a, w) in dl.iter().zip(want) {
            assert!((a - w).abs() < 1e-14, "{a} vs {w}");
        }
        assert!(dl.iter().all(|v| v.is_finite()));
    }

    #[test]
    fn cross_entropy_f32_stable() {
        let logits = [100.0f32, -100.0, 50.0];
        let mut dl = [0f32; 3];
        let (loss, correct) = cross_entropy(&logits, &[2], 1, 3, &mut dl);
        assert!((loss - 50.0).abs() < 1e-4, "{loss}");
        assert_eq!(correct, 0);
        assert!((dl[0] - 1.0).abs() < 1e-6 && (dl[2] + 1.0).abs() < 1e-6);
    }

    #[test]
    fn cross_entropy_grad_matches_finite_differences() {
        let (b, c) = (3, 7);
        let logits = rand_vec(b * c, 61, 3.0);
        let labels = [4u32, 0, 6];
        let mut scratch = vec![0.0; b * c];
        let num = numeric_grad(&logits, 1e-5, |x| cross_entropy(x, &labels, b, c, &mut scratch).0);
        let mut dl = vec![0.0; b * c];
        cross_entropy(&logits, &labels, b, c, &mut dl);
        assert_close("cross_entropy dlogits", &dl, &num, 1e-6);
    }

    #[test]
    #[should_panic(expected = "label 3")]
    fn cross_entropy_panics_on_bad_label() {
        let mut dl = [0.0; 3];
        cross_entropy(&[0.0f64, 1.0, 2.0], &[3], 1, 3, &mut dl);
    }

    #[test]
    fn explicit_normaliser_splits_a_batch_exactly() {
        // Two halves normalised by the whole batch give the whole batch's dlogits bit for bit.
        let (b, c) = (6, 5);
        let logits: Vec<f32> = rand_vec(b * c, 7, 4.0).iter().map(|&v| v as f32).collect();
        let labels = [0u32, 4, 2, 2, 1, 3];
        let mut whole = vec![0f32; b * c];
        let (mean, correct) = cross_entropy(&logits, &labels, b, c, &mut whole);
        let mut parts = vec![0f32; b * c];
        let (s1, c1) = cross_entropy_sum(&logits[..2 * c], &labels[..2], 2, c, b, &mut parts[..2 * c]);
        let (s2, c2) = cross_entropy_sum(&logits[2 * c..], &labels[2..], 4, c, b, &mut parts[2 * c..]);
        assert_eq!(whole, parts);
        assert_eq!(c1 + c2, correct);
        assert!(((s1 + s2) / b as f64 - mean as f64).abs() < 1e-6);
        assert_eq!(cross_entropy_sum(&logits, &labels, 0, c, 0, &mut parts), (0.0, 0));
    }
}
