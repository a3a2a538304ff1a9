//! Adapters that add a parallel update `ΔW` to a frozen linear: SNELLA/SNELL (spec §1–§3) and LoRA.
//!
//! An adapter covers one output chunk of a linear (q, k or v of the fused `qkv`, or a whole
//! `proj`/`fc1`/`fc2`): `ΔW: [n_in, n_out]` in the spec's layout. The model adds `ΔWᵀ` to the
//! chunk's rows of the frozen `W0 [out, in]` and runs one GEMM with that effective weight.

use crate::backend::Backend;
use crate::param::Param;
use snella_core::snella::sparsify::SparsifyRule;
use snella_core::snella::topk::kept_count;

/// A kernelized sparse adapter (spec §1–§3). `mixture = None` is SNELL.
pub struct KernelAdapter<B: Backend> {
    /// The adapter name, e.g. `blocks.0.attn.q`.
    pub name: String,
    /// Input features `in`.
    pub n_in: usize,
    /// Output features `out` of this chunk.
    pub n_out: usize,
    /// Kernel pieces `H`.
    pub heads: usize,
    /// Rank per piece `r/H`.
    pub rh: usize,
    /// `A: [H, in, r/H]`.
    pub a: Param<B>,
    /// `B: [H, out, r/H]`.
    pub b: Param<B>,
    /// `[α, γ, β]` (SNELLA only).
    pub mix: Option<Param<B>>,
    /// The current sparsity `s` (fraction zeroed), set by the allocator.
    pub sparsity: f64,
    /// The sparsify rule.
    pub rule: SparsifyRule,
    /// The allocator's EMAs of this layer on the backend while training (`[Ī_A, Ū_A, Ī_B, Ū_B]`,
    /// spec §5), updated there every step; the allocator's host copy is refreshed from them by
    /// [`crate::trainer::Trainer::pull_importance`]. `None` until the first step, and after the
    /// allocator state is replaced (prepare, resume).
    pub ema: Option<[B::Buf; 4]>,
}

/// What one step builds for an adapter: for kernel adapters `M` and its kept set (the linear
/// writes `ΔWᵀ` straight into its effective weight with [`Backend::sparsify_into_weight`], so `ΔW`
/// itself is never stored); for LoRA, `ΔW`.
pub struct Materialized<B: Backend> {
    /// `M: [n_in, n_out]` (kernel adapters).
    pub m: Option<B::Buf>,
    /// The kept set of `|M|` (kernel adapters).
    pub set: Option<B::Kept>,
    /// `ΔW: [n_in, n_out]` (LoRA).
    pub dw: Option<B::Buf>,
    /// What the backward-time merge kept for the merge backward ([`Backend::merge_fwd_saving`]).
    pub saved: Option<B::MergeSaved>,
}

/// PyTorch's `kaiming_uniform_(a=√5)` bound for a tensor whose fan-in is `fan_in`: `1/sqrt(fan_in)`.
fn kaiming_bound(fan_in: usize) -> f64 {
    1.0 / (fan_in as f64).sqrt()
}

/// Uniform values in `±bound` from a seeded SplitMix64 stream.
pub fn uniform(n: usize, bound: f64, rng: &mut u64) -> Vec<f32> {
    (0..n)
        .map(|_| {
            *rng = rng.wrapping_add(0x9E3779B97F4A7C15);
            let mut z = *rng;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58476D1CE4E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D049BB133111EB);
            z ^= z >> 31;
            (((z >> 11) as f64 / (1u64 << 53) as f64) * 2.0 - 1.0) as f32 * bound as f32
        })
        .collect()
}

impl<B: Backend> KernelAdapter<B> {
    /// A new adapter with spec §1 initialisation: `A ~ U(±1/sqrt(in·r/H))`, `B ~ U(±1/sqrt(out·r/H))`,
    /// `α = 1, γ = 1, β = 0`.
    #[allow(clippy::too_many_arguments)]
    pub fn new(be: &B, name: &str, n_in: usize, n_out: usize, rank: usize, heads: usize, mixture: bool, sparsity: f64, rule: SparsifyRule, rng: &mut u64) -> Self {
        let rh = rank / heads;
        let a = uniform(heads * n_in * rh, kaiming_bound(n_in * rh), rng);
        let b = uniform(heads * n_out * rh, kaiming_bound(n_out * rh), rng);
        KernelAdapter {
            name: name.to_string(),
            n_in,
            n_out,
            heads,
            rh,
            a: Param::trainable(be, format!("{name}.snella_A"), vec![heads, n_in, rh], &a),
            b: Param::trainable(be, format!("{name}.snella_B"), vec![heads, n_out, rh], &b),
            mix: mixture.then(|| Param::trainable(be, format!("{name}.snella_mix"), vec![3], &[1.0, 1.0, 0.0])),
            sparsity,
            rule,
            ema: None,
        }
    }

    /// Entries of `ΔW`, `N = in·out`.
    pub fn numel(&self) -> usize {
        self.n_in * self.n_out
    }

    /// The kept count `k = N − ⌊s·N⌋` at the current sparsity (spec §2).
    pub fn kept(&self) -> usize {
        kept_count(self.numel(), self.sparsity)
    }

    /// Builds `M` and selects its top-k (spec §1–§2); the sparsify rule is applied where `ΔW` is
    /// used ([`Backend::sparsify_into_weight`], or [`KernelAdapter::delta`]).
    pub fn materialize(&self, be: &B) -> Materialized<B> {
        self.materialize_with(be, None, false)
    }

    /// [`KernelAdapter::materialize`] reusing a kept set selected earlier from the same `A`, `B`
    /// and sparsity (the forward pass's, in backward): `M` is recomputed (spec §2, "recover in
    /// backward"), the deterministic top-k is not repeated. `None` selects it. With `for_backward`
    /// the merge also keeps what the backend reuses in [`KernelAdapter::backward_from_masked`].
    pub fn materialize_with(&self, be: &B, set: Option<B::Kept>, for_backward: bool) -> Materialized<B> {
        let mut m = be.empty(self.numel());
        let (a, b, mix) = (&self.a.value, &self.b.value, self.mix.as_ref().map(|p| &p.value));
        if !for_backward && set.is_none() {
            // merge and select in one backend call (CUDA shares a pass between them)
            let set = be.merge_fwd_select(a, b, self.heads, self.n_in, self.n_out, self.rh, mix, &mut m, self.kept());
            return Materialized { m: Some(m), set: Some(set), dw: None, saved: None };
        }
        let saved = if for_backward {
            be.merge_fwd_saving(a, b, self.heads, self.n_in, self.n_out, self.rh, mix, &mut m)
        } else {
            be.merge_fwd(a, b, self.heads, self.n_in, self.n_out, self.rh, mix, &mut m);
            None
        };
        let set = set.unwrap_or_else(|| be.select_topk(&m, self.kept()));
        Materialized { m: Some(m), set: Some(set), dw: None, saved }
    }

    /// `ΔW: [n_in, n_out]` of the current parameters (spec §1–§2), for export and tests.
    pub fn delta(&self, be: &B) -> B::Buf {
        let mat = self.materialize(be);
        let mut dw = be.zeros(self.numel());
        be.sparsify_fwd(mat.m.as_ref().expect("M"), mat.set.as_ref().expect("kept set"), self.rule, &mut dw);
        dw
    }

    /// Backward from `Ĝ = ∂L/∂M: [n_in, n_out]` (spec §3, the sparsify backward already applied,
    /// e.g. by [`Backend::sparsify_bwd_from_weight`]), writing the gradients of `A`, `B` and the
    /// mixture scalars; `saved` is what [`KernelAdapter::materialize_with`] kept for it, if anything.
    pub fn backward_from_masked(&mut self, be: &B, gh: &B::Buf, saved: Option<&B::MergeSaved>) {
        let (da, db) = (self.a.train.as_mut().expect("A trainable"), self.b.train.as_mut().expect("B trainable"));
        let (mix, dmix) = match self.mix.as_mut() {
            Some(p) => (Some(&p.value), Some(&mut p.train.as_mut().expect("mixture trainable").grad)),
            None => (None, None),
        };
        be.merge_bwd_saved(saved, &self.a.value, &self.b.value, self.heads, self.n_in, self.n_out, self.rh, mix, gh, &mut da.grad, &mut db.grad, dmix);
    }

    /// [`KernelAdapter::backward_from_masked`] straight from the layer's weight gradient in `ΔW`'s
    /// layout ([`Backend::adapter_bwd_from_grad`]): this chunk's columns `[off, off + n_out)` of
    /// `g: [n_in, ld]`, and the kept set `set` of this step's forward.
    pub fn backward_from_grad(&mut self, be: &B, g: &B::Buf, off: usize, ld: usize, set: &B::Kept) {
        let (da, db) = (self.a.train.as_mut().expect("A trainable"), self.b.train.as_mut().expect("B trainable"));
        let (mix, dmix) = match self.mix.as_mut() {
            Some(p) => (Some(&p.value), Some(&mut p.train.as_mut().expect("mixture trainable").grad)),
            None => (None, None),
        };
        be.adapter_bwd_from_grad(g, off, ld, set, self.rule, &self.a.value, &self.b.value, self.heads, self.n_in, self.n_out, self.rh, mix, &mut da.grad, &mut db.grad, dmix);
    }
}

/// A LoRA adapter: `ΔW = downᵀ·upᵀ` (`down: [r, in]` Kaiming-uniform, `up: [out, r]` zeros), scale 1,
/// as in the reference implementation.
pub struct LoraAdapter<B: Backend> {
    /// The adapter name.
    pub name: String,
    /// Input features.
    pub n_in: usize,
    /// Output features of this chunk.
    pub n_out: usize,
    /// Rank r.
    pub rank: usize,
    /// `down: [r, in]`.
    pub down: Param<B>,
    /// `up: [out, r]`.
    pub up: Param<B>,
}

impl<B: Backend> LoraAdapter<B> {
    /// A new LoRA adapter (`up = 0`, so `ΔW = 0` at start).
    pub fn new(be: &B, name: &str, n_in: usize, n_out: usize, rank: usize, rng: &mut u64) -> Self {
        let down = uniform(rank * n_in, kaiming_bound(n_in), rng);
        LoraAdapter {
            name: name.to_string(),
            n_in,
            n_out,
            rank,
            down: Param::trainable(be, format!("{name}.lora_down"), vec![rank, n_in], &down),
            up: Param::trainable(be, format!("{name}.lora_up"), vec![n_out, rank], &vec![0.0; n_out * rank]),
        }
    }

    /// `ΔW [in, out] = downᵀ · upᵀ`.
    pub fn materialize(&self, be: &B) -> Materialized<B> {
        let mut dw = be.empty(self.n_in * self.n_out);
        be.gemm(true, true, self.n_in, self.n_out, self.rank, 1.0, &self.down.value, 0, &self.up.value, 0, 0.0, &mut dw, 0);
        Materialized { m: None, set: None, dw: Some(dw), saved: None }
    }

    /// Gradients from `G [in, out]`: `∂down = upᵀ·Gᵀ`, `∂up = Gᵀ·downᵀ`.
    pub fn backward(&mut self, be: &B, g: &B::Buf) {
        let (n_in, n_out, r) = (self.n_in, self.n_out, self.rank);
        let gd = &mut self.down.train.as_mut().expect("down trainable").grad;
        be.gemm(true, true, r, n_in, n_out, 1.0, &self.up.value, 0, g, 0, 0.0, gd, 0);
        let gu = &mut self.up.train.as_mut().expect("up trainable").grad;
        be.gemm(true, true, n_out, r, n_in, 1.0, g, 0, &self.down.value, 0, 0.0, gu, 0);
    }
}

/// One adapter on one output chunk of a linear.
pub enum Delta<B: Backend> {
    /// SNELLA or SNELL.
    Kernel(KernelAdapter<B>),
    /// LoRA.
    Lora(LoraAdapter<B>),
}

impl<B: Backend> Delta<B> {
    /// The adapter name.
    pub fn name(&self) -> &str {
        match self {
            Delta::Kernel(k) => &k.name,
            Delta::Lora(l) => &l.name,
        }
    }
    /// Builds this step's `M` and kept set (kernel adapters, reusing `set` when given) or `ΔW` (LoRA).
    /// `for_backward`: see [`KernelAdapter::materialize_with`].
    pub fn materialize_with(&self, be: &B, set: Option<B::Kept>, for_backward: bool) -> Materialized<B> {
        match self {
            Delta::Kernel(k) => k.materialize_with(be, set, for_backward),
            Delta::Lora(l) => l.materialize(be),
        }
    }

    /// The trainable parameters of the adapter.
    pub fn params(&self) -> Vec<&Param<B>> {
        match self {
            Delta::Kernel(k) => [Some(&k.a), Some(&k.b), k.mix.as_ref()].into_iter().flatten().collect(),
            Delta::Lora(l) => vec![&l.down, &l.up],
        }
    }
    /// Mutable access to the trainable parameters.
    pub fn params_mut(&mut self) -> Vec<&mut Param<B>> {
        match self {
            Delta::Kernel(k) => [Some(&mut k.a), Some(&mut k.b), k.mix.as_mut()].into_iter().flatten().collect(),
            Delta::Lora(l) => vec![&mut l.down, &mut l.up],
        }
    }
}
