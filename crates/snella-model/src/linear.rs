//! A linear layer `y = x·Wᵀ + b` (`W: [out, in]`, timm layout) with optional parallel adapters.
//!
//! With adapters, forward and backward use one effective weight `W0 + ΔWᵀ` (each adapter's `ΔWᵀ`
//! added to its chunk of output rows): one GEMM for `y`, one for `∂L/∂x`, and `∂L/∂ΔW = xᵀ·∂L/∂y`
//! for the adapters. Backward rebuilds `M` from the adapter parameters instead of keeping it
//! (spec §2, "dump in forward, recover in backward"). Where the products read the weight in bf16
//! ([`Backend::keep_effective_weight`], CUDA bf16), the forward's bf16 `W0 + ΔWᵀ` (2 bytes per
//! entry) is kept for `∂L/∂x` instead of being rebuilt from `M` and converted again (session 7: one
//! sparsify pass and one conversion per layer less in backward; the weights of ViT-B/16 are 170 MB
//! in bf16, the measured peak rose by 152 MiB); the
//! backward still rebuilds `M` and its saved tensors for the adapters' own gradients. When every
//! chunk carries a kernel adapter the forward builds that weight directly in the products' form
//! ([`Backend::effective_weight_act`]; session 8: no f32 weight and no conversion pass). With
//! activation checkpointing the weight is rebuilt by the recomputed forward instead.
//!
//! **Decision (session 7; design.md's "W0 + ΔWᵀ in bf16 for the forward GEMM"):** the bf16 forward
//! multiplies by one bf16 effective weight too. Session 3 had switched it to two products,
//! `x·W0ᵀ + x·ΔW` (as the reference does under autocast), because one bf16 weight keeps 8 bits of
//! `W0 + ΔWᵀ` and a `ΔW` far below `W0` is rounded away in the forward, and seed 0 of the spec §8
//! recipe had given 42.7% that way against 43.4% with two products. Measured again over five seeds
//! on the H200 (bench/results/gpu-recipe-h200-session7.json), one weight is no worse: 43.98 / 44.29
//! / 42.58 / 43.80 / 44.59% (mean 43.85%) against 43.80 / 44.29 / 41.11 / 43.74 / 40.75% (mean
//! 42.74%) with two products. This is the rounding mixed-precision training applies to full
//! fine-tuning (an f32 master weight cast to bf16 for each forward): `ΔW` is accumulated in f32
//! and reaches the forward once it exceeds half a bf16 step of `W0`. It saves one GEMM per
//! adapted linear in forward (ViT-B/16 b64 step 44.1 → 39.3 ms). The two-product form stays
//! available for comparisons ([`Backend::separate_delta_products`], `SNELLA_DELTA_PRODUCTS=separate`).
//!
//! `∂L/∂x` keeps the single effective weight in every precision (session 3): there the rounding of
//! `W0 + ΔWᵀ` to bf16 is an error of the same size as the rounding of `W0` alone (a `ΔW` below the
//! resolution of `W0` changes `∂L/∂x` by less than that rounding does), and it only shapes the
//! gradient passed down, not what the adapter's own gradient `xᵀ·∂L/∂y` sees.

use crate::adapter::{Delta, Materialized};
use crate::backend::{AdapterJob, Backend, GradJob, Weight, WeightJob};
use crate::param::Param;

/// `∂L/∂y` as a linear layer's backward receives it ([`Linear::backward_grad`]): f32, or as a
/// [`Backend::Act`] (from [`Backend::gelu_bwd_to_act`] or [`Backend::attention_bwd_to_act`]; in a
/// CUDA bf16 step the bf16 gradient the products would have converted it to anyway), which needs a
/// frozen bias (a bias gradient sums the f32 `∂L/∂y`).
pub enum Grad<B: Backend> {
    /// f32 `[rows, out]`.
    F32(B::Buf),
    /// As the backend keeps a layer input.
    Act(B::Act),
}

/// A borrowed [`Grad`].
enum Dy<'a, B: Backend> {
    Buf(&'a B::Buf),
    Act(&'a B::Act),
}

/// What a linear's forward pass hands to its backward (and to a recomputed forward of the same
/// step): the kept sets of its adapter chunks (`None` for chunks without a kernel adapter), so that
/// the top-k is not selected twice, and, where the backend keeps it
/// ([`Backend::keep_effective_weight`]), the effective weight `W0 + ΔWᵀ` as its products read it.
pub struct KeptSets<B: Backend> {
    /// One entry per output chunk.
    pub sets: Vec<Option<B::Kept>>,
    /// The effective weight `[out, in]` made by [`Backend::act`], when kept.
    pub weight: Option<B::Act>,
}

impl<B: Backend> Default for KeptSets<B> {
    fn default() -> Self {
        KeptSets { sets: Vec::new(), weight: None }
    }
}

impl<B: Backend> KeptSets<B> {
    /// The kept sets alone (the weight dropped: a forward recomputed in backward rebuilds it, so that
    /// activation checkpointing does not hold every layer's weight through the step).
    pub fn without_weight(self) -> Self {
        KeptSets { sets: self.sets, weight: None }
    }
}

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
    /// Whether the fused backward leaves its kernel adapters' backward in [`Linear::pending`] for one
    /// batched call ([`Backend::batch_adapter_bwd`]; set by the ViT backward for its pass) instead
    /// of running it at once (false, the default).
    pub defer_adapter_bwd: bool,
    /// The weight gradient and kept sets waiting for [`Linear::grad_jobs`] (one backward pass: at
    /// most one).
    pub pending: Option<PendingGrad<B>>,
}

/// A weight gradient `g: [n_in, n_out]` and its chunks' kept sets, waiting for the batched adapter
/// backward ([`Backend::adapter_bwd_batch`]).
pub struct PendingGrad<B: Backend> {
    /// `G = xᵀ·∂L/∂y` in `ΔW`'s layout.
    pub g: B::Buf,
    /// One kept set per chunk (every chunk carries a kernel adapter).
    pub sets: Vec<B::Kept>,
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
            defer_adapter_bwd: false,
            pending: None,
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

    /// The adapted weight and the materialised adapters, or `None` when there are no active
    /// adapters (none attached, or merged into `W` already). With `separate` false: `W0 + Σ ΔWᵀ` — kernel adapters write their
    /// sparsified `ΔWᵀ` into their chunk in one pass ([`Backend::sparsify_into_weight`]), LoRA adds
    /// its `ΔWᵀ` onto a copy of the chunk, chunks without an adapter are copied. With it true: `Σ ΔWᵀ`
    /// alone (`[out, in]`, zero rows where a chunk has no adapter), to be multiplied next to `W0`.
    fn effective(&self, be: &B, separate: bool, kept: Option<Vec<Option<B::Kept>>>, for_backward: bool) -> Option<(B::Buf, Vec<Option<Materialized<B>>>)> {
        if !self.active() {
            return None;
        }
        let c = self.chunk();
        let n = c * self.n_in;
        // separate: chunks without a kernel adapter must read as zero (LoRA accumulates onto them);
        // a kernel adapter's chunk is written whole
        let mut w = if separate && !self.all_kernel() { be.zeros(self.n_out * self.n_in) } else { be.empty(self.n_out * self.n_in) };
        let mats = self.materialize_all(be, kept, for_backward, true);
        for (i, (d, m)) in self.deltas.iter().zip(&mats).enumerate() {
            let off = i * n;
            match (d, m) {
                (Some(Delta::Kernel(k)), Some(m)) => {
                    let (mm, set) = (m.m.as_ref().expect("M"), m.set.as_ref().expect("kept set"));
                    let w0 = (!separate).then_some((&self.weight.value, off));
                    be.sparsify_into_weight(mm, set, k.rule, w0, self.n_in, c, &mut w, off);
                }
                (_, Some(m)) => {
                    if !separate {
                        be.copy(&self.weight.value, off, &mut w, off, n);
                    }
                    be.transpose(m.dw.as_ref().expect("LoRA ΔW"), 0, self.n_in, c, &mut w, off, true);
                }
                _ if !separate => be.copy(&self.weight.value, off, &mut w, off, n),
                _ => {}
            }
        }
        Some((w, mats))
    }

    /// What [`Backend::effective_weights`] needs to build this linear's effective weight and kept
    /// sets (session 10: all layers' at once): `Some` when its adapters are active and every chunk
    /// carries a kernel adapter, as the one-weight forward of [`Linear::forward_res`] requires.
    pub fn weight_job(&self) -> Option<WeightJob<'_, B>> {
        if !self.active() || !self.all_kernel() {
            return None;
        }
        let chunks = self
            .deltas
            .iter()
            .filter_map(|d| match d {
                Some(Delta::Kernel(k)) => {
                    Some(AdapterJob { a: &k.a.value, b: &k.b.value, mix: k.mix.as_ref().map(|p| &p.value), heads: k.heads, rh: k.rh, k: k.kept(), rule: k.rule })
                }
                _ => None,
            })
            .collect();
        Some(WeightJob { w0: &self.weight.value, n_in: self.n_in, c: self.chunk(), chunks })
    }

    /// Whether every chunk carries a kernel (SNELLA/SNELL) adapter.
    fn all_kernel(&self) -> bool {
        self.deltas.iter().all(|d| matches!(d, Some(Delta::Kernel(_))))
    }

    /// Whether adapters are attached and not merged into `W`.
    fn active(&self) -> bool {
        self.adapted() && self.original.is_none()
    }

    /// Each chunk's materialised adapter (`None` without one, and for LoRA unless `lora`), reusing
    /// the kept sets given.
    fn materialize_all(&self, be: &B, kept: Option<Vec<Option<B::Kept>>>, for_backward: bool, lora: bool) -> Vec<Option<Materialized<B>>> {
        let mut kept = kept.unwrap_or_default().into_iter();
        self.deltas
            .iter()
            .map(|d| {
                let set = kept.next().flatten();
                match d {
                    Some(Delta::Lora(_)) if !lora => None,
                    Some(d) => Some(d.materialize_with(be, set, for_backward)),
                    None => None,
                }
            })
            .collect()
    }

    /// Forward for `rows` rows of `x: [rows, in]` (as [`Backend::act`] made it), returning
    /// `y: [rows, out]`.
    pub fn forward(&self, be: &B, x: &B::Act, rows: usize) -> B::Buf {
        self.forward_keep(be, x, rows, None).0
    }

    /// [`Linear::forward`], reusing `kept` (sets selected earlier in this step from the same `A`, `B`
    /// and sparsity, and the effective weight made with them when it was kept) when given, and
    /// returning the adapters' kept sets (and, where [`Backend::keep_effective_weight`], the effective
    /// weight) for [`Linear::backward_with`].
    pub fn forward_keep(&self, be: &B, x: &B::Act, rows: usize, kept: Option<KeptSets<B>>) -> (B::Buf, KeptSets<B>) {
        self.forward_res(be, x, rows, kept, None)
    }

    /// [`Linear::forward_keep`] adding `residual: [rows, out]` to the output (a ViT block's
    /// `x + proj(·)` and `h + fc2(·)`), in the same backend call as the product and the bias.
    pub fn forward_res(&self, be: &B, x: &B::Act, rows: usize, kept: Option<KeptSets<B>>, residual: Option<&B::Buf>) -> (B::Buf, KeptSets<B>) {
        let (b, n_in, n_out) = (&self.bias.value, self.n_in, self.n_out);
        self.forward_with(be, kept, |w, delta| {
            let mut y = be.empty(rows * n_out);
            be.linear_fwd(x, w, delta, b, residual, rows, n_in, n_out, &mut y);
            y
        })
    }

    /// [`Linear::forward_keep`] with the output as [`Backend::linear_fwd_act`] makes it (in a CUDA
    /// bf16 step: written in bf16 by the GEMM, session 10), for a consumer that reads it in that
    /// form only (`qkv`'s fused attention, `fc1`'s GELU).
    pub fn forward_act(&self, be: &B, x: &B::Act, rows: usize, kept: Option<KeptSets<B>>) -> (B::Act, KeptSets<B>) {
        let (b, n_in, n_out) = (&self.bias.value, self.n_in, self.n_out);
        self.forward_with(be, kept, |w, delta| be.linear_fwd_act(x, w, delta, b, rows, n_in, n_out))
    }

    /// The weight of this step's product (kept, built here, or `W0`) handed to `product(weight,
    /// delta)` (`delta`: the separate `Σ ΔWᵀ` of [`Backend::separate_delta_products`]), with the kept
    /// sets (and weight) for the backward.
    fn forward_with<T>(&self, be: &B, kept: Option<KeptSets<B>>, product: impl FnOnce(Weight<'_, B>, Option<&B::Buf>) -> T) -> (T, KeptSets<B>) {
        let n_in = self.n_in;
        let (sets, weight) = kept.map_or((None, None), |k| (Some(k.sets), k.weight));
        if let (Some(wa), true) = (weight, self.active()) {
            // the effective weight made earlier in this step (same A, B and sets)
            let y = product(Weight::Act(&wa), None);
            return (y, KeptSets { sets: sets.unwrap_or_default(), weight: Some(wa) });
        }
        let separate = be.separate_delta_products();
        if !separate && be.keep_effective_weight() && self.active() && self.all_kernel() {
            // the weight straight in the form the products read (CUDA bf16: no f32 copy)
            let mats = self.materialize_all(be, sets, false, false);
            let parts: Vec<_> = self
                .deltas
                .iter()
                .zip(&mats)
                .filter_map(|(d, m)| match (d, m) {
                    (Some(Delta::Kernel(k)), Some(m)) => Some((m.m.as_ref().expect("M"), m.set.as_ref().expect("kept set"), k.rule)),
                    _ => None,
                })
                .collect();
            assert_eq!(parts.len(), self.deltas.len(), "{}: every chunk has a kernel adapter", self.name);
            let wa = be.effective_weight_act(&self.weight.value, &parts, n_in, self.chunk());
            let y = product(Weight::Act(&wa), None);
            let sets = mats.into_iter().map(|m| m.and_then(|m| m.set)).collect();
            return (y, KeptSets { sets, weight: Some(wa) });
        }
        let Some((e, mats)) = self.effective(be, separate, sets, false) else {
            return (product(Weight::Buf(&self.weight.value), None), KeptSets::default());
        };
        let sets = mats.into_iter().map(|m| m.and_then(|m| m.set)).collect();
        let (y, weight) = if separate {
            (product(Weight::Buf(&self.weight.value), Some(&e)), None)
        } else if be.keep_effective_weight() {
            let wa = be.act(e);
            (product(Weight::Act(&wa), None), Some(wa))
        } else {
            (product(Weight::Buf(&e), None), None)
        };
        (y, KeptSets { sets, weight })
    }

    /// Backward from the forward's input `x` (the same [`Backend::Act`]): writes the gradients of
    /// trainable weights, bias and adapters, and returns `∂L/∂x: [rows, in]` when `need_dx`.
    pub fn backward(&mut self, be: &B, x: &B::Act, dy: &B::Buf, rows: usize, need_dx: bool) -> Option<B::Buf> {
        self.backward_with(be, x, dy, rows, need_dx, None)
    }

    /// [`Linear::backward`] reusing the kept sets of this step's forward pass ([`Linear::forward_keep`]):
    /// the adapters' `M` is recomputed from `A`, `B` (spec §2), the top-k is not re-selected (same
    /// `A`, `B` and sparsity, deterministic selection: the same set), and the effective weight for
    /// `∂L/∂x` is the forward's when `kept` carries it (else rebuilt from `M`).
    pub fn backward_with(&mut self, be: &B, x: &B::Act, dy: &B::Buf, rows: usize, need_dx: bool, kept: Option<KeptSets<B>>) -> Option<B::Buf> {
        self.backward_dy(be, x, Dy::Buf(dy), rows, need_dx, kept)
    }

    /// [`Linear::backward_with`] with `∂L/∂y` as a [`Grad`].
    ///
    /// # Panics
    /// For [`Grad::Act`] when the bias is trainable (its gradient sums the f32 `∂L/∂y`; the caller
    /// makes a [`Grad::Act`] only for frozen biases).
    pub fn backward_grad(&mut self, be: &B, x: &B::Act, dy: &Grad<B>, rows: usize, need_dx: bool, kept: Option<KeptSets<B>>) -> Option<B::Buf> {
        let dy = match dy {
            Grad::F32(d) => Dy::Buf(d),
            Grad::Act(d) => {
                assert!(self.bias.train.is_none(), "{}: a Grad::Act needs a frozen bias", self.name);
                Dy::Act(d)
            }
        };
        self.backward_dy(be, x, dy, rows, need_dx, kept)
    }

    fn backward_dy(&mut self, be: &B, x: &B::Act, dy: Dy<'_, B>, rows: usize, need_dx: bool, kept: Option<KeptSets<B>>) -> Option<B::Buf> {
        // one effective weight for ∂L/∂x in every precision (see the module docs): the forward's when
        // kept (then only the kernel adapters' M and saved tensors are rebuilt), else rebuilt
        let active = self.active();
        let (sets, kept_w) = kept.map_or((None, None), |k| (Some(k.sets), k.weight.filter(|_| active)));
        let whole = |s: &Vec<Option<B::Kept>>| s.len() == self.deltas.len() && s.iter().all(Option::is_some);
        let fused = matches!(dy, Dy::Act(_)) && kept_w.is_some() && sets.as_ref().is_some_and(whole);
        if fused && be.fused_adapter_bwd() && self.weight.train.is_none() && self.all_kernel() {
            let (Dy::Act(dy), Some(w), Some(sets)) = (dy, kept_w, sets) else { unreachable!("checked above") };
            let sets = sets.into_iter().map(|s| s.expect("kept set")).collect();
            return self.backward_fused(be, x, dy, &w, rows, need_dx, sets);
        }
        let (w_eff, mats) = match (&kept_w, active) {
            (_, false) => (None, Vec::new()),
            (Some(_), true) => (None, self.materialize_all(be, sets, true, false)),
            (None, true) => {
                let (w, m) = self.effective(be, false, sets, true).expect("active adapters");
                (Some(w), m)
            }
        };
        let (n_in, n_out) = (self.n_in, self.n_out);
        let need_gt = self.weight.train.is_some() || active;
        let mut dx = need_dx.then(|| be.empty(rows * n_in));
        // Gᵀ = ∂L/∂W = dyᵀ·x : [out, in], and ∂L/∂x = dy·W with the adapted weight: one call, so
        // that a bf16 backend converts dy once for both products
        let mut gt = need_gt.then(|| be.empty(n_out * n_in));
        let w = match (&kept_w, &w_eff) {
            (Some(wa), _) => Weight::Act(wa),
            (None, Some(e)) => Weight::Buf(e),
            (None, None) => Weight::Buf(&self.weight.value),
        };
        match dy {
            Dy::Buf(dy) => {
                be.linear_bwd_products(dy, w, x, rows, n_in, n_out, dx.as_mut(), gt.as_mut());
                if let Some(t) = self.bias.train.as_mut() {
                    be.bias_grad(dy, rows, n_out, &mut t.grad, false);
                }
            }
            Dy::Act(dy) => be.linear_bwd_products_act(dy, w, x, rows, n_in, n_out, dx.as_mut(), gt.as_mut()),
        }
        if let Some(gt) = gt {
            if active {
                let c = self.chunk();
                for (i, (d, m)) in self.deltas.iter_mut().zip(&mats).enumerate() {
                    let Some(d) = d.as_mut() else { continue };
                    match d {
                        Delta::Kernel(k) => {
                            let m = m.as_ref().expect("a kernel adapter is materialised for its backward");
                            let mut gh = be.empty(n_in * c);
                            let (mm, set) = (m.m.as_ref().expect("M"), m.set.as_ref().expect("kept set"));
                            be.sparsify_bwd_from_weight(&gt, i * c * n_in, mm, set, k.rule, n_in, c, &mut gh);
                            k.backward_from_masked(be, &gh, m.saved.as_ref());
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

    /// The backward of [`Backend::fused_adapter_bwd`]: `∂L/∂x` with the forward's effective weight
    /// `w` and the weight gradient in `ΔW`'s layout ([`Backend::linear_bwd_products_g`]), from which
    /// each chunk's kernel adapter takes its backward ([`crate::adapter::KernelAdapter::backward_from_grad`]) with
    /// the forward's kept set.
    #[allow(clippy::too_many_arguments)]
    fn backward_fused(&mut self, be: &B, x: &B::Act, dy: &B::Act, w: &B::Act, rows: usize, need_dx: bool, sets: Vec<B::Kept>) -> Option<B::Buf> {
        let (n_in, n_out, c) = (self.n_in, self.n_out, self.chunk());
        let mut dx = need_dx.then(|| be.empty(rows * n_in));
        let mut g = be.empty(n_in * n_out);
        be.linear_bwd_products_g(dy, Weight::Act(w), x, rows, n_in, n_out, dx.as_mut(), &mut g);
        if self.defer_adapter_bwd {
            assert!(self.pending.is_none(), "{}: one deferred adapter backward per pass", self.name);
            self.pending = Some(PendingGrad { g, sets });
            return dx;
        }
        for (i, (d, set)) in self.deltas.iter_mut().zip(&sets).enumerate() {
            if let Some(Delta::Kernel(k)) = d {
                k.backward_from_grad(be, &g, i * c, n_out, set);
            }
        }
        dx
    }

    /// The adapter backward jobs of the weight gradient waiting in [`Linear::pending`] (one per
    /// chunk), borrowing it and the adapters' gradients; empty when nothing waits.
    pub fn grad_jobs(&mut self) -> Vec<GradJob<'_, B>> {
        let (n_in, n_out, c) = (self.n_in, self.n_out, self.chunk());
        let Linear { pending, deltas, .. } = self;
        let Some(p) = pending.as_ref() else { return Vec::new() };
        let mut jobs = Vec::new();
        for (i, (d, set)) in deltas.iter_mut().zip(&p.sets).enumerate() {
            if let Some(Delta::Kernel(k)) = d {
                let (da, db) = (&mut k.a.train.as_mut().expect("A trainable").grad, &mut k.b.train.as_mut().expect("B trainable").grad);
                let (mix, dmix) = match k.mix.as_mut() {
                    Some(p) => (Some(&p.value), Some(&mut p.train.as_mut().expect("mixture trainable").grad)),
                    None => (None, None),
                };
                jobs.push(GradJob { g: &p.g, off: i * c, ld: n_out, set, rule: k.rule, a: &k.a.value, b: &k.b.value, heads: k.heads, n_in, c, rh: k.rh, mix, da, db, dmix });
            }
        }
        jobs
    }

    /// Writes `W = W0 + ΔWᵀ` into the weight (spec §7), keeping `W0` for [`Linear::unmerge`].
    /// Does nothing without adapters or when already merged.
    pub fn merge(&mut self, be: &B) {
        if let Some((w, _)) = self.effective(be, false, None, false) {
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
