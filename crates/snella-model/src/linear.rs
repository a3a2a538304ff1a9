//! A linear layer `y = x·Wᵀ + b` (`W: [out, in]`, timm layout) with optional parallel adapters.
//!
//! With adapters, forward and backward use one effective weight `W0 + ΔWᵀ` (each adapter's `ΔWᵀ`
//! added to its chunk of output rows): one GEMM for `y`, one for `∂L/∂x`, and `∂L/∂ΔW = xᵀ·∂L/∂y`
//! for the adapters. Backward rebuilds `ΔW` from the adapter parameters instead of keeping it
//! (spec §2, "dump in forward, recover in backward").

use crate::adapter::{Delta, Materialized};
use crate::backend::Backend;
use crate::param::Param;

/// A linear layer with optional adapters on equal output chunks.
pub struct Linear<B: Backend> {
    /// Layer name without suffix, e.g. `blocks.0.attn.qkv`.
    pub name: String,
    /// Input features.
    pub n_in: usize,
    /// Output features.
    pub n_out: usize,
    /// `W0: [out, in]` (trainable only for full fine-tuning).
    pub weight: Param<B>,
    /// `b: [out]`.
    pub bias: Param<B>,
    /// One slot per output chunk (`n_out / deltas.len()` rows each; 3 for a fused `qkv`, else 1),
    /// holding the chunk's adapter when it has one.
    pub deltas: Vec<Option<Delta<B>>>,
    /// The original `W0` while merged (see [`Linear::merge`]).
    pub original: Option<B::Buf>,
}

impl<B: Backend> Linear<B> {
    /// A frozen linear from host weights `w: [out, in]`, `b: [out]`.
    pub fn new(be: &B, name: &str, n_in: usize, n_out: usize, chunks: usize, w: &[f32], b: &[f32]) -> Self {
        Linear {
            name: name.to_string(),
            n_in,
            n_out,
            weight: Param::frozen(be, format!("{name}.weight"), vec![n_out, n_in], w),
            bias: Param::frozen(be, format!("{name}.bias"), vec![n_out], b),
            deltas: (0..chunks).map(|_| None).collect(),
            original: None,
        }
    }

    /// Rows of `W` per adapter chunk.
    pub fn chunk(&self) -> usize {
        self.n_out / self.deltas.len().max(1)
    }

    /// Whether any chunk has an adapter.
    pub fn adapted(&self) -> bool {
        self.deltas.iter().any(|d| d.is_some())
    }

    /// `W0 + Σ ΔWᵀ` and the materialised adapters, or `None` when there are no active adapters
    /// (none attached, or merged into `W` already). Kernel adapters write their sparsified `ΔWᵀ`
    /// into their chunk in one pass ([`Backend::sparsify_into_weight`]); LoRA adds its `ΔWᵀ` onto a
    /// copy of the chunk; chunks without an adapter are copied.
    fn effective(&self, be: &B) -> Option<(B::Buf, Vec<Option<Materialized<B>>>)> {
        if !self.adapted() || self.original.is_some() {
            return None;
        }
        let mut w = be.empty(self.n_out * self.n_in);
        let c = self.chunk();
        let n = c * self.n_in;
        let mats: Vec<Option<Materialized<B>>> = self.deltas.iter().map(|d| d.as_ref().map(|d| d.materialize(be))).collect();
        for (i, (d, m)) in self.deltas.iter().zip(&mats).enumerate() {
            let off = i * n;
            match (d, m) {
                (Some(Delta::Kernel(k)), Some(m)) => {
                    let (mm, set) = (m.m.as_ref().expect("M"), m.set.as_ref().expect("kept set"));
                    be.sparsify_into_weight(mm, set, k.rule, &self.weight.value, off, self.n_in, c, &mut w, off);
                }
                (_, Some(m)) => {
                    be.copy(&self.weight.value, off, &mut w, off, n);
                    be.transpose(m.dw.as_ref().expect("LoRA ΔW"), 0, self.n_in, c, &mut w, off, true);
                }
                _ => be.copy(&self.weight.value, off, &mut w, off, n),
            }
        }
        Some((w, mats))
    }

    /// Forward for `rows` rows of `x: [rows, in]`, returning `y: [rows, out]`.
    pub fn forward(&self, be: &B, x: &B::Buf, rows: usize) -> B::Buf {
        let mut y = be.empty(rows * self.n_out);
        let eff = self.effective(be);
        let w = eff.as_ref().map(|e| &e.0).unwrap_or(&self.weight.value);
        be.gemm(false, true, rows, self.n_out, self.n_in, 1.0, x, 0, w, 0, 0.0, &mut y, 0);
        be.add_bias(&mut y, &self.bias.value, rows, self.n_out);
        y
    }

    /// Backward: writes the gradients of trainable weights, bias and adapters, and returns
    /// `∂L/∂x: [rows, in]` when `need_dx`.
    pub fn backward(&mut self, be: &B, x: &B::Buf, dy: &B::Buf, rows: usize, need_dx: bool) -> Option<B::Buf> {
        let eff = self.effective(be);
        let dx = need_dx.then(|| {
            let w = eff.as_ref().map(|e| &e.0).unwrap_or(&self.weight.value);
            let mut dx = be.empty(rows * self.n_in);
            be.gemm(false, false, rows, self.n_in, self.n_out, 1.0, dy, 0, w, 0, 0.0, &mut dx, 0);
            dx
        });
        let (n_in, n_out) = (self.n_in, self.n_out);
        if let Some(t) = self.bias.train.as_mut() {
            be.bias_grad(dy, rows, n_out, &mut t.grad, false);
        }
        let need_gt = self.weight.train.is_some() || eff.is_some();
        if need_gt {
            // Gᵀ = ∂L/∂W = dyᵀ·x : [out, in].
            let mut gt = be.empty(n_out * n_in);
            be.gemm(true, false, n_out, n_in, rows, 1.0, dy, 0, x, 0, 0.0, &mut gt, 0);
            if let Some((_, mats)) = eff.as_ref() {
                let c = self.chunk();
                for (i, (d, m)) in self.deltas.iter_mut().zip(mats).enumerate() {
                    let (Some(d), Some(m)) = (d.as_mut(), m.as_ref()) else { continue };
                    match d {
                        Delta::Kernel(k) => {
                            let mut gh = be.empty(n_in * c);
                            let (mm, set) = (m.m.as_ref().expect("M"), m.set.as_ref().expect("kept set"));
                            be.sparsify_bwd_from_weight(&gt, i * c * n_in, mm, set, k.rule, n_in, c, &mut gh);
                            k.backward_from_masked(be, &gh);
                        }
                        Delta::Lora(l) => {
                            let mut g = be.empty(n_in * c);
                            be.transpose(&gt, i * c * n_in, c, n_in, &mut g, 0, false);
                            l.backward(be, &g);
                        }
                    }
                }
            }
            if let Some(t) = self.weight.train.as_mut() {
                t.grad = gt;
            }
        }
        dx
    }

    /// Writes `W = W0 + ΔWᵀ` into the weight (spec §7), keeping `W0` for [`Linear::unmerge`].
    /// Does nothing without adapters or when already merged.
    pub fn merge(&mut self, be: &B) {
        if let Some((w, _)) = self.effective(be) {
            let w0 = std::mem::replace(&mut self.weight.value, w);
            self.original = Some(w0);
        }
    }

    /// Restores the original `W0` bit-exactly after [`Linear::merge`].
    pub fn unmerge(&mut self) {
        if let Some(w0) = self.original.take() {
            self.weight.value = w0;
        }
    }
}
