//! Multi-head self-attention core (timm `Attention` between `qkv` and `proj`), forward and backward.
//!
//! Layout: `qkv: [b, t, 3·d]` where column `s·d + h·hd + e` is q/k/v (`s` = 0/1/2) of head `h`,
//! element `e` (timm reshapes to `(b, t, 3, heads, hd)`); `out: [b, t, d]` with column `h·hd + e`.
//! Scores are scaled by `hd^-0.5`; the softmax runs over keys.
//!
//! Both directions run one task per (batch, head) in parallel (rayon): each task gathers its head's
//! `q, k, v: [t, hd]` into contiguous scratch, does the products with [`crate::gemm::gemm`]
//! (single-threaded at these sizes) and writes a private slab; the slabs are then scattered into
//! the interleaved output in parallel over the batch. No reduction crosses tasks, so results are
//! deterministic.

use crate::gemm::gemm;
use crate::Real;
use rayon::prelude::*;

/// Copies head `h`'s slot `s` (0 = q, 1 = k, 2 = v) of batch element `bi` into `dst: [t, hd]`.
#[inline]
#[allow(clippy::too_many_arguments)]
fn gather<T: Real>(qkv: &[T], bi: usize, s: usize, h: usize, t: usize, heads: usize, hd: usize, dst: &mut [T]) {
    let d = heads * hd;
    let base = bi * t * 3 * d + s * d + h * hd;
    for (i, row) in dst[..t * hd].chunks_exact_mut(hd).enumerate() {
        let src = base + i * 3 * d;
        row.copy_from_slice(&qkv[src..src + hd]);
    }
}

/// In-place numerically stable softmax of each row of `s: [t, t]`.
#[inline]
fn softmax_rows<T: Real>(s: &mut [T], t: usize) {
    for row in s.chunks_exact_mut(t) {
        let mx = row.iter().copied().fold(T::neg_infinity(), T::max);
        let mut sum = T::zero();
        for v in row.iter_mut() {
            *v = (*v - mx).exp();
            sum += *v;
        }
        let inv = T::one() / sum;
        for v in row.iter_mut() {
            *v *= inv;
        }
    }
}

/// Writes `out: [b, t, d]` and saves the attention probabilities `probs: [b, heads, t, t]`.
///
/// `qkv: [b, t, 3·d]` with `d = heads·hd` (layout in the module doc). For each batch element and
/// head: `P = softmax(q·kᵀ·hd^-0.5)` over keys, `out_h = P·v`.
///
/// # Panics
/// If a slice is shorter than its shape needs.
#[allow(clippy::too_many_arguments)]
pub fn attention_fwd<T: Real>(
    qkv: &[T], b: usize, t: usize, heads: usize, hd: usize, out: &mut [T], probs: &mut [T],
) {
    let d = heads * hd;
    let (tt, thd) = (t * t, t * hd);
    assert!(qkv.len() >= b * t * 3 * d, "attention_fwd: qkv has {} elements, needs {}", qkv.len(), b * t * 3 * d);
    assert!(out.len() >= b * t * d, "attention_fwd: out has {} elements, needs {}", out.len(), b * t * d);
    assert!(probs.len() >= b * heads * tt, "attention_fwd: probs has {} elements, needs {}", probs.len(), b * heads * tt);
    if b == 0 || t == 0 || d == 0 {
        return;
    }
    let scale = T::of((hd as f64).powf(-0.5));
    // Per (batch, head) output slabs `[b, heads, t, hd]`.
    let mut ohead = vec![T::zero(); b * heads * thd];
    probs[..b * heads * tt]
        .par_chunks_mut(tt)
        .zip(ohead.par_chunks_mut(thd))
        .enumerate()
        .for_each_init(
            || vec![T::zero(); 3 * thd],
            |scratch, (bh, (p, o))| {
                let (bi, h) = (bh / heads, bh % heads);
                let (q, rest) = scratch.split_at_mut(thd);
                let (k, v) = rest.split_at_mut(thd);
                gather(qkv, bi, 0, h, t, heads, hd, q);
                gather(qkv, bi, 1, h, t, heads, hd, k);
                gather(qkv, bi, 2, h, t, heads, hd, v);
                // S = scale · q · kᵀ  [t, t]
                gemm(false, true, t, t, hd, scale, q, k, T::zero(), p);
                softmax_rows(p, t);
                // O = P · v  [t, hd]
                gemm(false, false, t, hd, t, T::one(), p, v, T::zero(), o);
            },
        );
    out[..b * t * d].par_chunks_mut(t * d).enumerate().for_each(|(bi, ob)| {
        for h in 0..heads {
            let slab = &ohead[(bi * heads + h) * thd..(bi * heads + h + 1) * thd];
            for (i, src) in slab.chunks_exact(hd).enumerate() {
                ob[i * d + h * hd..i * d + (h + 1) * hd].copy_from_slice(src);
            }
        }
    });
}

/// Backward of [`attention_fwd`]: writes `dqkv: [b, t, 3·d]` from `dout: [b, t, d]`.
///
/// Uses the saved `probs: [b, heads, t, t]` and the forward input `qkv`. Per head:
/// `dv = Pᵀ·dO`, `dP = dO·vᵀ`, `dS = P ⊙ (dP − rowsum(dP ⊙ P))`, `dq = scale·dS·k`,
/// `dk = scale·dSᵀ·q`. `dqkv` is overwritten.
///
/// # Panics
/// If a slice is shorter than its shape needs.
#[allow(clippy::too_many_arguments)]
pub fn attention_bwd<T: Real>(
    dout: &[T], qkv: &[T], probs: &[T], b: usize, t: usize, heads: usize, hd: usize, dqkv: &mut [T],
) {
    let d = heads * hd;
    let (tt, thd) = (t * t, t * hd);
    assert!(qkv.len() >= b * t * 3 * d, "attention_bwd: qkv has {} elements, needs {}", qkv.len(), b * t * 3 * d);
    assert!(dqkv.len() >= b * t * 3 * d, "attention_bwd: dqkv has {} elements, needs {}", dqkv.len(), b * t * 3 * d);
    assert!(dout.len() >= b * t * d, "attention_bwd: dout has {} elements, needs {}", dout.len(), b * t * d);
    assert!(probs.len() >= b * heads * tt, "attention_bwd: probs has {} elements, needs {}", probs.len(), b * heads * tt);
    if b == 0 || t == 0 || d == 0 {
        return;
    }
    let scale = T::of((hd as f64).powf(-0.5));
    // Per (batch, head) gradient slabs `[b, heads, 3, t, hd]` (dq, dk, dv).
    let mut dhead = vec![T::zero(); b * heads * 3 * thd];
    dhead.par_chunks_mut(3 * thd).enumerate().for_each_init(
        || vec![T::zero(); 4 * thd + tt],
        |scratch, (bh, dst)| {
            let (bi, h) = (bh / heads, bh % heads);
            let (q, rest) = scratch.split_at_mut(thd);
            let (k, rest) = rest.split_at_mut(thd);
            let (v, rest) = rest.split_at_mut(thd);
            let (dout_h, dp) = rest.split_at_mut(thd);
            gather(qkv, bi, 0, h, t, heads, hd, q);
            gather(qkv, bi, 1, h, t, heads, hd, k);
            gather(qkv, bi, 2, h, t, heads, hd, v);
            for (i, row) in dout_h.chunks_exact_mut(hd).enumerate() {
                let src = (bi * t + i) * d + h * hd;
                row.copy_from_slice(&dout[src..src + hd]);
            }
            let p = &probs[bh * tt..(bh + 1) * tt];
            let (dq, rest) = dst.split_at_mut(thd);
            let (dk, dv) = rest.split_at_mut(thd);
            // dv = Pᵀ · dO
            gemm(true, false, t, hd, t, T::one(), p, dout_h, T::zero(), dv);
            // dP = dO · vᵀ
            gemm(false, true, t, t, hd, T::one(), dout_h, v, T::zero(), dp);
            // dS = P ⊙ (dP − Σ_j dP·P)
            for (dpr, pr) in dp.chunks_exact_mut(t).zip(p.chunks_exact(t)) {
                let mut dot = T::zero();
                for (&a, &pp) in dpr.iter().zip(pr) {
                    dot += a * pp;
                }
                for (a, &pp) in dpr.iter_mut().zip(pr) {
                    *a = pp * (*a - dot);
                }
            }
            // dq = scale · dS · k ; dk = scale · dSᵀ · q
            gemm(false, false, t, hd, t, scale, dp, k, T::zero(), dq);
            gemm(true, false, t, hd, t, scale, dp, q, T::zero(), dk);
        },
    );
    dqkv[..b * t * 3 * d].par_chunks_mut(t * 3 * d).enumerate().for_each(|(bi, db)| {
        for h in 0..heads {
            let bh = bi * heads + h;
            for s in 0..3 {
                let slab = &dhead[(bh * 3 + s) * thd..(bh * 3 + s + 1) * thd];
                for (i, src) in slab.chunks_exact(hd).enumerate() {
                    let c = i * 3 * d + s * d + h * hd;
                    db[c..c + hd].copy_from_slice(src);
                }
            }
        }
    });
}

/// Each attention row's log-sum-exp of its scores in base 2: `lse2[bh·t + i] = log2 Σ_j 2^(s_ij)` with
/// `s = q·kᵀ·hd^-0.5·log2 e` (so `P_ij = 2^(s_ij − lse2_i)`), for `qkv: [b, t, 3·d]` (layout in the
/// module doc) into `lse2: [b, heads, t]`, accumulated in f64. What a fused (flash-style) attention
/// saves instead of the probabilities; the reference for the CUDA kernel `snella_flash_attn_fwd`.
///
/// # Panics
/// If a slice is shorter than its shape needs.
pub fn attention_lse2<T: Real>(qkv: &[T], b: usize, t: usize, heads: usize, hd: usize, lse2: &mut [T]) {
    let d = heads * hd;
    assert!(qkv.len() >= b * t * 3 * d, "attention_lse2: qkv has {} elements, needs {}", qkv.len(), b * t * 3 * d);
    assert!(lse2.len() >= b * heads * t, "attention_lse2: lse2 has {} elements, needs {}", lse2.len(), b * heads * t);
    let c = (hd as f64).powf(-0.5) * std::f64::consts::LOG2_E;
    lse2[..b * heads * t].par_chunks_mut(t.max(1)).enumerate().for_each(|(bh, row)| {
        let (bi, h) = (bh / heads, bh % heads);
        let at = |i: usize, s: usize, e: usize| qkv[(bi * t + i) * 3 * d + s * d + h * hd + e].f64();
        let mut sc = vec![0f64; t];
        for (i, out) in row.iter_mut().enumerate() {
            for (j, v) in sc.iter_mut().enumerate() {
                *v = (0..hd).map(|e| at(i, 0, e) * at(j, 1, e)).sum::<f64>() * c;
            }
            let mx = sc.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            *out = T::of(mx + sc.iter().map(|v| (v - mx).exp2()).sum::<f64>().log2());
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gradcheck::{assert_close, numeric_grad, rand_vec};

    /// Naive triple-loop reference: returns `(out, probs)`.
    fn naive(qkv: &[f64], b: usize, t: usize, heads: usize, hd: usize) -> (Vec<f64>, Vec<f64>) {
        let d = heads * hd;
        let idx = |bi: usize, i: usize, s: usize, h: usize, e: usize| (bi * t + i) * 3 * d + s * d + h * hd + e;
        let mut out = vec![0.0; b * t * d];
        let mut probs = vec![0.0; b * heads * t * t];
        let scale = 1.0 / (hd as f64).sqrt();
        for bi in 0..b {
            for h in 0..heads {
                for i in 0..t {
                    let mut s = vec![0.0; t];
                    for (j, sj) in s.iter_mut().enumerate() {
                        for e in 0..hd {
                            *sj += qkv[idx(bi, i, 0, h, e)] * qkv[idx(bi, j, 1, h, e)];
                        }
                        *sj *= scale;
                    }
                    let mx = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                    let z: f64 = s.iter().map(|v| (v - mx).exp()).sum();
                    for j in 0..t {
                        let pj = (s[j] - mx).exp() / z;
                        probs[((bi * heads + h) * t + i) * t + j] = pj;
                        for e in 0..hd {
                            out[(bi * t + i) * d + h * hd + e] += pj * qkv[idx(bi, j, 2, h, e)];
                        }
                    }
                }
            }
        }
        (out, probs)
    }

    fn run_fwd(qkv: &[f64], b: usize, t: usize, heads: usize, hd: usize) -> (Vec<f64>, Vec<f64>) {
        let mut out = vec![f64::NAN; b * t * heads * hd];
        let mut probs = vec![f64::NAN; b * heads * t * t];
        attention_fwd(qkv, b, t, heads, hd, &mut out, &mut probs);
        (out, probs)
    }

    #[test]
    fn attention_forward_matches_naive() {
        for &(b, t, heads, hd) in &[(2, 5, 2, 3), (1, 1, 1, 1), (3, 7, 3, 4)] {
            let qkv = rand_vec(b * t * 3 * heads * hd, 41 + t as u64, 2.0);
            let (out, probs) = run_fwd(&qkv, b, t, heads, hd);
            let (want_out, want_probs) = naive(&qkv, b, t, heads, hd);
            for (a, w) in out.iter().zip(&want_out) {
                assert!((a - w).abs() < 1e-12, "out {a} vs {w}");
            }
            for (a, w) in probs.iter().zip(&want_probs) {
                assert!((a - w).abs() < 1e-12, "probs {a} vs {w}");
            }
            for row in probs.chunks(t) {
                assert!((row.iter().sum::<f64>() - 1.0).abs() < 1e-12);
            }
        }
    }

    #[test]
    fn attention_forward_f32_matches_naive() {
        let (b, t, heads, hd) = (2, 65, 3, 64);
        let qkv = rand_vec(b * t * 3 * heads * hd, 7, 1.0);
        let q32: Vec<f32> = qkv.iter().map(|&v| v as f32).collect();
        let mut out = vec![0f32; b * t * heads * hd];
        let mut probs = vec![0f32; b * heads * t * t];
        attention_fwd(&q32, b, t, heads, hd, &mut out, &mut probs);
        let (want_out, _) = naive(&qkv, b, t, heads, hd);
        for (a, w) in out.iter().zip(&want_out) {
            assert!((*a as f64 - w).abs() < 1e-5, "out {a} vs {w}");
        }
    }

    #[test]
    fn attention_backward_matches_finite_differences() {
        let (b, t, heads, hd) = (2, 5, 2, 3);
        let d = heads * hd;
        let qkv = rand_vec(b * t * 3 * d, 51, 1.5);
        let w = rand_vec(b * t * d, 52, 1.0);
        let num = numeric_grad(&qkv, 1e-5, |x| {
            let (out, _) = run_fwd(x, b, t, heads, hd);
            out.iter().zip(&w).map(|(a, c)| a * c).sum()
        });
        let (_, probs) = run_fwd(&qkv, b, t, heads, hd);
        let mut dqkv = vec![f64::NAN; b * t * 3 * d];
        attention_bwd(&w, &qkv, &probs, b, t, heads, hd, &mut dqkv);
        assert_close("attention dqkv", &dqkv, &num, 1e-6);
    }

    #[test]
    fn attention_lse2_gives_the_probabilities() {
        let (b, t, heads, hd) = (2, 7, 3, 4);
        let qkv = rand_vec(b * t * 3 * heads * hd, 61, 2.0);
        let (_, probs) = naive(&qkv, b, t, heads, hd);
        let mut lse2 = vec![f64::NAN; b * heads * t];
        attention_lse2(&qkv, b, t, heads, hd, &mut lse2);
        let c = 1.0 / (hd as f64).sqrt() * std::f64::consts::LOG2_E;
        let d = heads * hd;
        for bh in 0..b * heads {
            let (bi, h) = (bh / heads, bh % heads);
            for i in 0..t {
                for j in 0..t {
                    let s: f64 = (0..hd).map(|e| qkv[(bi * t + i) * 3 * d + h * hd + e] * qkv[(bi * t + j) * 3 * d + d + h * hd + e]).sum::<f64>() * c;
                    let p = (s - lse2[bh * t + i]).exp2();
                    let want = probs[(bh * t + i) * t + j];
                    assert!((p - want).abs() < 1e-12, "P[{bh},{i},{j}] {p} vs {want}");
                }
            }
        }
    }

    /// Timing of the main training shape; run with `--ignored --nocapture`.
    #[test]
    #[ignore]
    fn attention_timing_main_shape() {
        let (b, t, heads, hd) = (64, 65, 3, 64);
        let d = heads * hd;
        let qkv: Vec<f32> = rand_vec(b * t * 3 * d, 1, 1.0).iter().map(|&v| v as f32).collect();
        let dout: Vec<f32> = rand_vec(b * t * d, 2, 1.0).iter().map(|&v| v as f32).collect();
        let mut out = vec![0f32; b * t * d];
        let mut probs = vec![0f32; b * heads * t * t];
        let mut dqkv = vec![0f32; b * t * 3 * d];
        let n = 20;
        let s = std::time::Instant::now();
        for _ in 0..n {
            attention_fwd(&qkv, b, t, heads, hd, &mut out, &mut probs);
        }
        let f = s.elapsed().as_secs_f64() / n as f64;
        let s = std::time::Instant::now();
        for _ in 0..n {
            attention_bwd(&dout, &qkv, &probs, b, t, heads, hd, &mut dqkv);
        }
        let g = s.elapsed().as_secs_f64() / n as f64;
        println!("attention fwd {:.2} ms, bwd {:.2} ms", f * 1e3, g * 1e3);
    }
}
