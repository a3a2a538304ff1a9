//! The CPU backend: f32 on host `Vec`s, calling the `snella_core` reference ops.

use crate::backend::{Backend, Weight};
use rayon::prelude::*;
use snella_core::gemm::gemm;
use snella_core::ops::{adamw, attention, cross_entropy, gelu, layernorm, linear, patch};
use snella_core::snella::merge::{self, Mixture};
use snella_core::snella::sparsify::{self, SparsifyRule};
use snella_core::snella::topk::{self, KeptSet};

/// `[α, γ, β]` as a [`Mixture`].
fn mixture(v: &Vec<f32>) -> Mixture<f32> {
    Mixture { alpha: v[0], gamma: v[1], beta: v[2] }
}

/// The f32 CPU backend. Multi-threaded through rayon and matrixmultiply's threads.
#[derive(Clone, Copy, Debug, Default)]
pub struct CpuBackend;

#[allow(clippy::too_many_arguments)]
impl Backend for CpuBackend {
    type Buf = Vec<f32>;
    type Kept = KeptSet;
    type MergeSaved = ();
    type Act = Vec<f32>;

    fn name(&self) -> &'static str { "cpu" }
    fn zeros(&self, n: usize) -> Vec<f32> { vec![0.0; n] }
    fn act(&self, x: Vec<f32>) -> Vec<f32> { x }
    fn upload(&self, data: &[f32]) -> Vec<f32> { data.to_vec() }
    fn download(&self, buf: &Vec<f32>) -> Vec<f32> { buf.clone() }
    fn len(&self, buf: &Vec<f32>) -> usize { buf.len() }
    fn copy(&self, src: &Vec<f32>, so: usize, dst: &mut Vec<f32>, d: usize, n: usize) {
        dst[d..d + n].copy_from_slice(&src[so..so + n]);
    }
    fn fill_zero(&self, buf: &mut Vec<f32>) { buf.fill(0.0) }
    fn gemm(&self, ta: bool, tb: bool, m: usize, n: usize, k: usize, alpha: f32, a: &Vec<f32>, ao: usize, b: &Vec<f32>, bo: usize, beta: f32, c: &mut Vec<f32>, co: usize) {
        gemm(ta, tb, m, n, k, alpha, &a[ao..], &b[bo..], beta, &mut c[co..]);
    }
    fn linear_fwd(&self, x: &Vec<f32>, w: Weight<'_, Self>, delta: Option<&Vec<f32>>, bias: &Vec<f32>, residual: Option<&Vec<f32>>, rows: usize, n_in: usize, n_out: usize, y: &mut Vec<f32>) {
        let (Weight::Buf(w) | Weight::Act(w)) = w;
        self.gemm(false, true, rows, n_out, n_in, 1.0, x, 0, w, 0, 0.0, y, 0);
        if let Some(d) = delta {
            self.gemm(false, true, rows, n_out, n_in, 1.0, x, 0, d, 0, 1.0, y, 0);
        }
        self.add_bias(y, bias, rows, n_out);
        if let Some(r) = residual {
            self.add_assign(y, r);
        }
    }
    fn linear_bwd_products_act(&self, dy: &Vec<f32>, w: Weight<'_, Self>, x: &Vec<f32>, rows: usize, n_in: usize, n_out: usize, dx: Option<&mut Vec<f32>>, gt: Option<&mut Vec<f32>>) {
        self.linear_bwd_products(dy, w, x, rows, n_in, n_out, dx, gt)
    }
    fn linear_bwd_products(&self, dy: &Vec<f32>, w: Weight<'_, Self>, x: &Vec<f32>, rows: usize, n_in: usize, n_out: usize, dx: Option<&mut Vec<f32>>, gt: Option<&mut Vec<f32>>) {
        let (Weight::Buf(w) | Weight::Act(w)) = w;
        if let Some(dx) = dx {
            self.gemm(false, false, rows, n_in, n_out, 1.0, dy, 0, w, 0, 0.0, dx, 0);
        }
        if let Some(gt) = gt {
            self.gemm(true, false, n_out, n_in, rows, 1.0, dy, 0, x, 0, 0.0, gt, 0);
        }
    }
    fn add_assign(&self, y: &mut Vec<f32>, x: &Vec<f32>) {
        y.par_chunks_mut(4096).zip(x.par_chunks(4096)).for_each(|(y, x)| {
            for (a, b) in y.iter_mut().zip(x) { *a += *b; }
        });
    }
    fn add_bias(&self, y: &mut Vec<f32>, bias: &Vec<f32>, rows: usize, cols: usize) { linear::add_bias(y, bias, rows, cols) }
    fn bias_grad(&self, dy: &Vec<f32>, rows: usize, cols: usize, db: &mut Vec<f32>, acc: bool) { linear::bias_grad(dy, rows, cols, db, acc) }
    fn transpose(&self, src: &Vec<f32>, so: usize, rows: usize, cols: usize, dst: &mut Vec<f32>, d: usize, acc: bool) {
        let s = &src[so..so + rows * cols];
        dst[d..d + rows * cols].par_chunks_mut(rows).enumerate().for_each(|(j, out)| {
            for (i, o) in out.iter_mut().enumerate() {
                let v = s[i * cols + j];
                if acc { *o += v } else { *o = v }
            }
        });
    }
    fn layernorm_fwd(&self, x: &Vec<f32>, g: &Vec<f32>, b: &Vec<f32>, rows: usize, d: usize, eps: f32, y: &mut Vec<f32>, mean: &mut Vec<f32>, rstd: &mut Vec<f32>) {
        layernorm::layernorm_fwd(x, g, b, rows, d, eps, y, mean, rstd)
    }
    fn layernorm_bwd(&self, dy: &Vec<f32>, x: &Vec<f32>, g: &Vec<f32>, mean: &Vec<f32>, rstd: &Vec<f32>, rows: usize, d: usize, dx: &mut Vec<f32>, dg: Option<&mut Vec<f32>>, db: Option<&mut Vec<f32>>) {
        layernorm::layernorm_bwd(dy, x, g, mean, rstd, rows, d, dx, dg.map(|v| v.as_mut_slice()), db.map(|v| v.as_mut_slice()))
    }
    fn layernorm_fwd_xhat(&self, x: &Vec<f32>, g: &Vec<f32>, b: &Vec<f32>, rows: usize, d: usize, eps: f32, rstd: &mut Vec<f32>) -> (Vec<f32>, Vec<f32>) {
        let (mut y, mut xhat) = (vec![0.0; rows * d], vec![0.0; rows * d]);
        layernorm::layernorm_fwd_xhat(x, g, b, rows, d, eps, &mut y, &mut xhat, rstd);
        (y, xhat)
    }
    fn layernorm_affine_act(&self, xhat: &Vec<f32>, g: &Vec<f32>, b: &Vec<f32>, rows: usize, d: usize) -> Vec<f32> {
        let mut y = vec![0.0; rows * d];
        layernorm::layernorm_affine(xhat, g, b, rows, d, &mut y);
        y
    }
    fn layernorm_bwd_xhat(&self, dy: &Vec<f32>, xhat: &Vec<f32>, g: &Vec<f32>, rstd: &Vec<f32>, rows: usize, d: usize, dx: &mut Vec<f32>, res: Option<&Vec<f32>>, dg: Option<&mut Vec<f32>>, db: Option<&mut Vec<f32>>) {
        layernorm::layernorm_bwd_xhat(dy, xhat, g, rstd, rows, d, dx, dg.map(|v| v.as_mut_slice()), db.map(|v| v.as_mut_slice()));
        if let Some(r) = res {
            self.add_assign(dx, r);
        }
    }
    fn gelu_fwd_keep(&self, x: Vec<f32>, n: usize) -> (Vec<f32>, Vec<f32>) {
        let mut y = vec![0.0; n];
        gelu::gelu_fwd(&x[..n], &mut y);
        (x, y)
    }
    fn gelu_fwd_from(&self, x: &Vec<f32>, n: usize) -> Vec<f32> {
        let mut y = vec![0.0; n];
        gelu::gelu_fwd(&x[..n], &mut y);
        y
    }
    fn gelu_bwd_act(&self, x: &Vec<f32>, dy: &Vec<f32>, dx: &mut Vec<f32>) { gelu::gelu_bwd(x, dy, dx) }
    fn gelu_fwd(&self, x: &Vec<f32>, y: &mut Vec<f32>) { gelu::gelu_fwd(x, y) }
    fn gelu_bwd(&self, x: &Vec<f32>, dy: &Vec<f32>, dx: &mut Vec<f32>) { gelu::gelu_bwd(x, dy, dx) }
    fn attention_fwd(&self, qkv: &Vec<f32>, b: usize, t: usize, h: usize, hd: usize) -> (Vec<f32>, Vec<f32>) {
        let (mut out, mut probs) = (vec![0f32; b * t * h * hd], vec![0f32; b * h * t * t]);
        attention::attention_fwd(qkv, b, t, h, hd, &mut out, &mut probs);
        (out, probs)
    }
    fn attention_bwd(&self, dout: &Vec<f32>, qkv: &Vec<f32>, _out: &Vec<f32>, probs: &Vec<f32>, b: usize, t: usize, h: usize, hd: usize, dqkv: &mut Vec<f32>) {
        attention::attention_bwd(dout, qkv, probs, b, t, h, hd, dqkv)
    }
    fn cross_entropy(&self, logits: &Vec<f32>, labels: &[u32], b: usize, c: usize, dl: &mut Vec<f32>) -> (f32, usize) {
        cross_entropy::cross_entropy(logits, labels, b, c, dl)
    }
    fn cross_entropy_sum(&self, logits: &Vec<f32>, labels: &[u32], b: usize, c: usize, norm: usize, dl: &mut Vec<f32>) -> (f64, usize) {
        cross_entropy::cross_entropy_sum(logits, labels, b, c, norm, dl)
    }
    fn im2col(&self, images: &Vec<f32>, b: usize, ch: usize, h: usize, w: usize, p: usize, cols: &mut Vec<f32>) {
        patch::im2col(images, b, ch, h, w, p, cols)
    }
    fn importance_update(&self, p: &Vec<f32>, g: &Vec<f32>, ibar: &mut Vec<f32>, ubar: &mut Vec<f32>, beta1: f32, beta2: f32, bad: &mut Vec<f32>, slot: usize) {
        bad[slot] += snella_core::snella::importance::importance_update(p, g, ibar, ubar, beta1, beta2) as f32;
    }
    fn adamw(&self, param: &mut Vec<f32>, grad: &Vec<f32>, m: &mut Vec<f32>, v: &mut Vec<f32>, h: &adamw::AdamWParams) {
        adamw::adamw_step(param, grad, m, v, h)
    }
    fn merge_fwd(&self, a: &Vec<f32>, b: &Vec<f32>, heads: usize, n_in: usize, n_out: usize, rh: usize, mix: Option<&Vec<f32>>, m: &mut Vec<f32>) {
        merge::merge_fwd(a, b, heads, n_in, n_out, rh, mix.map(mixture), m)
    }
    fn merge_bwd(&self, a: &Vec<f32>, b: &Vec<f32>, heads: usize, n_in: usize, n_out: usize, rh: usize, mix: Option<&Vec<f32>>, dm: &Vec<f32>, da: &mut Vec<f32>, db: &mut Vec<f32>, dmix: Option<&mut Vec<f32>>) {
        let g = merge::merge_bwd(a, b, heads, n_in, n_out, rh, mix.map(mixture), dm, da, db);
        if let (Some(g), Some(out)) = (g, dmix) {
            out.copy_from_slice(&[g.alpha, g.gamma, g.beta]);
        }
    }
    fn kept_set(&self, kept: &KeptSet) -> KeptSet { *kept }
    fn select_topk(&self, m: &Vec<f32>, k: usize) -> KeptSet {
        let mags: Vec<f32> = m.par_iter().map(|v| v.abs()).collect();
        topk::select_topk(&mags, k)
    }
    fn sparsify_fwd(&self, m: &Vec<f32>, set: &KeptSet, rule: SparsifyRule, dw: &mut Vec<f32>) { sparsify::sparsify_fwd(m, set, rule, dw) }
    fn sparsify_bwd(&self, m: &Vec<f32>, set: &KeptSet, rule: SparsifyRule, g: &Vec<f32>, dm: &mut Vec<f32>) { sparsify::sparsify_bwd(m, set, rule, g, dm) }
    fn all_finite(&self, x: &Vec<f32>) -> bool { x.iter().all(|v| v.is_finite()) }
}
