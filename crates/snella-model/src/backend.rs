//! The Backend seam: every op the model needs, over buffers the backend owns.
//!
//! The model code (`vit.rs`, `linear.rs`, adapters, trainer) calls only these methods, so a CUDA
//! backend slots in by implementing this trait. The CPU backend ([`crate::cpu::CpuBackend`]) is the
//! f32 reference; each method's semantics are those of the `snella_core` op of the same name.
//! All matrices are row-major and contiguous; `*_off` arguments are element offsets into a buffer.

use snella_core::snella::sparsify::SparsifyRule;
use snella_core::snella::topk::KeptSet;
use snella_core::ops::adamw::AdamWParams;
use snella_core::SnellaError;

/// A linear layer's weight `W: [n_out, n_in]` as [`Backend::linear_fwd`] and the backward products
/// read it: the f32 buffer, or a copy in the backend's activation format made by [`Backend::act`]
/// (on CUDA in bf16: the bf16 weight the products would convert it to; the CPU's is the f32 values).
pub enum Weight<'a, B: Backend> {
    /// The f32 weight.
    Buf(&'a B::Buf),
    /// The weight as [`Backend::act`] made it.
    Act(&'a B::Act),
}

impl<B: Backend> Clone for Weight<'_, B> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<B: Backend> Copy for Weight<'_, B> {}

/// A compute backend (CPU or CUDA). Buffers hold f32 values.
#[allow(clippy::too_many_arguments)]
pub trait Backend: Clone + Send + Sync + 'static {
    /// A device (or host) buffer of f32 values.
    type Buf: Send + Sync;
    /// A layer's kept set (spec §2) as the backend holds it (host struct on CPU, device words on CUDA),
    /// so selecting and applying it needs no host round trip.
    type Kept: Send + Sync;
    /// What a backward-time merge keeps for [`Backend::merge_bwd_saved`] (CUDA: `K` and the
    /// distances `D`, transient; the CPU keeps nothing and recomputes).
    type MergeSaved: Send + Sync;
    /// A layer input as the linear products read it and as the forward keeps it for the backward
    /// ([`Backend::act`]): the f32 buffer itself on the CPU and in CUDA's f32/TF32; in CUDA's bf16
    /// the bf16 copy that every product of that input reads (converted once, half the memory of the
    /// f32 activation, which is dropped).
    type Act: Send + Sync;

    /// A short name: `"cpu"` or `"cuda"`.
    fn name(&self) -> &'static str;
    /// A buffer of `n` zeros.
    fn zeros(&self, n: usize) -> Self::Buf;
    /// `x` (`[rows, n_in]`, f32) as a linear layer's input ([`Backend::Act`]), consuming it.
    fn act(&self, x: Self::Buf) -> Self::Act;
    /// A buffer holding a copy of `data`.
    fn upload(&self, data: &[f32]) -> Self::Buf;
    /// [`Backend::upload`] while the work queued so far runs: the buffer is ready for work queued
    /// after this call. CUDA fills a page-locked buffer and copies on a second stream while the GPU
    /// runs the queued work, which then hides the upload when it lasts longer (the next training
    /// batch during this step's forward pass; `snella_cuda::beside`); the default is
    /// [`Backend::upload`].
    fn upload_beside(&self, data: &[f32]) -> Self::Buf {
        self.upload(data)
    }
    /// A host copy of the whole buffer.
    fn download(&self, buf: &Self::Buf) -> Vec<f32>;
    /// The number of f32 values in `buf`.
    fn len(&self, buf: &Self::Buf) -> usize;
    /// Copies `n` values from `src[src_off..]` to `dst[dst_off..]`.
    fn copy(&self, src: &Self::Buf, src_off: usize, dst: &mut Self::Buf, dst_off: usize, n: usize);
    /// Copies `count` rows of `len` values: row `q` from `src[src_off + q·src_stride..]` to
    /// `dst[dst_off + q·dst_stride..]` (`src_stride = 0` repeats one row). The default is a loop of
    /// [`Backend::copy`] (the CPU reference); the CUDA backend does it in one launch.
    #[allow(clippy::too_many_arguments)]
    fn copy_rows(&self, src: &Self::Buf, src_off: usize, src_stride: usize, dst: &mut Self::Buf, dst_off: usize, dst_stride: usize, len: usize, count: usize) {
        for q in 0..count {
            self.copy(src, src_off + q * src_stride, dst, dst_off + q * dst_stride, len);
        }
    }
    /// Fills `buf` with zeros.
    fn fill_zero(&self, buf: &mut Self::Buf);
    /// Bytes held by a buffer (for memory reports).
    fn bytes(&self, buf: &Self::Buf) -> usize {
        self.len(buf) * 4
    }

    /// `C[c_off..][m,n] = alpha·op(A)·op(B) + beta·C`, see `snella_core::gemm::gemm`.
    fn gemm(
        &self, ta: bool, tb: bool, m: usize, n: usize, k: usize, alpha: f32,
        a: &Self::Buf, a_off: usize, b: &Self::Buf, b_off: usize, beta: f32, c: &mut Self::Buf, c_off: usize,
    );
    /// The forward of a linear layer: `y = x·Wᵀ (+ x·Δ) + bias (+ residual)` (`x: [rows, n_in]`,
    /// `W`, `Δ: [n_out, n_in]`, `y`, `residual: [rows, n_out]`); `Δ` is the adapters' `ΔWᵀ` where
    /// the backend multiplies it apart from `W = W0` ([`Backend::separate_delta_products`]). The
    /// CPU composes [`Backend::gemm`] (a second, accumulating one for `Δ`), [`Backend::add_bias`]
    /// and [`Backend::add_assign`] in that order (the reference); CUDA fuses the bias and the
    /// residual into the GEMM (cuBLASLt epilogues).
    /// `w` is the weight as a buffer or as an activation-format copy ([`Weight`]).
    #[allow(clippy::too_many_arguments)]
    fn linear_fwd(&self, x: &Self::Act, w: Weight<'_, Self>, delta: Option<&Self::Buf>, bias: &Self::Buf, residual: Option<&Self::Buf>, rows: usize, n_in: usize, n_out: usize, y: &mut Self::Buf);
    /// The two products of a linear layer's backward (`y = x·Wᵀ`, `W: [n_out, n_in]`):
    /// `dx = dy·W` (`[rows, n_in]`, when given) and `gt = dyᵀ·x` (`[n_out, n_in]`, when given).
    /// The CPU makes two [`Backend::gemm`] calls; the CUDA backend in bf16 converts `dy` once and
    /// reads `x` in the bf16 its forward kept.
    #[allow(clippy::too_many_arguments)]
    fn linear_bwd_products(&self, dy: &Self::Buf, w: Weight<'_, Self>, x: &Self::Act, rows: usize, n_in: usize, n_out: usize, dx: Option<&mut Self::Buf>, gt: Option<&mut Self::Buf>);
    /// Whether this backend's merge kernels take SNELLA/SNELL adapters of `heads` pieces of rank
    /// `rh = r/H` (checked when adapters are attached, so that a configuration a device cannot run is
    /// refused before training starts). The CPU takes any; CUDA: see `snella_cuda::ops::merge::check_pieces`.
    ///
    /// # Errors
    /// `Config` naming the field that is out of the backend's range.
    fn check_kernel_pieces(&self, heads: usize, rh: usize) -> Result<(), SnellaError> {
        let _ = (heads, rh);
        Ok(())
    }
    /// [`Backend::linear_bwd_products`] with `dy` as a [`Backend::Act`] (the output of
    /// [`Backend::gelu_bwd_to_act`] or [`Backend::attention_bwd_to_act`]): CUDA in bf16 multiplies
    /// the bf16 `dy` directly; the same products as converting an f32 `dy` first.
    #[allow(clippy::too_many_arguments)]
    fn linear_bwd_products_act(&self, dy: &Self::Act, w: Weight<'_, Self>, x: &Self::Act, rows: usize, n_in: usize, n_out: usize, dx: Option<&mut Self::Buf>, gt: Option<&mut Self::Buf>);
    /// `y += x`, element-wise (residual connections).
    fn add_assign(&self, y: &mut Self::Buf, x: &Self::Buf);
    /// `y[r,:] += bias` for `y: [rows, cols]`.
    fn add_bias(&self, y: &mut Self::Buf, bias: &Self::Buf, rows: usize, cols: usize);
    /// `db = Σ_r dy[r,:]` (or `+=` when `accumulate`).
    fn bias_grad(&self, dy: &Self::Buf, rows: usize, cols: usize, db: &mut Self::Buf, accumulate: bool);
    /// `dst[out,in] = src[in,out]ᵀ` (+ `dst` when `accumulate`), at element offsets.
    fn transpose(&self, src: &Self::Buf, src_off: usize, rows: usize, cols: usize, dst: &mut Self::Buf, dst_off: usize, accumulate: bool);
    /// LayerNorm forward (see `snella_core::ops::layernorm`).
    fn layernorm_fwd(&self, x: &Self::Buf, g: &Self::Buf, b: &Self::Buf, rows: usize, d: usize, eps: f32, y: &mut Self::Buf, mean: &mut Self::Buf, rstd: &mut Self::Buf);
    /// LayerNorm backward; `dg`/`db` accumulate when given.
    fn layernorm_bwd(&self, dy: &Self::Buf, x: &Self::Buf, g: &Self::Buf, mean: &Self::Buf, rstd: &Self::Buf, rows: usize, d: usize, dx: &mut Self::Buf, dg: Option<&mut Self::Buf>, db: Option<&mut Self::Buf>);
    /// LayerNorm forward for training with selective recomputation (as
    /// `snella_core::ops::layernorm::layernorm_fwd_xhat`): returns the output `y` (a linear layer's
    /// input) and the normalised input `x̂` (what the backward keeps instead of `x`, `mean` and `y`),
    /// both `[rows, d]` as [`Backend::Act`]s, and writes `rstd: [rows]`. CUDA in bf16 rounds `x̂` to
    /// bf16 and computes `y` from the rounded `x̂`, so that [`Backend::layernorm_affine_act`]
    /// rebuilds it bit-identically.
    #[allow(clippy::too_many_arguments)]
    fn layernorm_fwd_xhat(&self, x: &Self::Buf, g: &Self::Buf, b: &Self::Buf, rows: usize, d: usize, eps: f32, rstd: &mut Self::Buf) -> (Self::Act, Self::Act);
    /// The LayerNorm output `y = x̂·gamma + beta` rebuilt from [`Backend::layernorm_fwd_xhat`]'s
    /// `x̂` (the same values as the forward's `y`).
    fn layernorm_affine_act(&self, xhat: &Self::Act, g: &Self::Buf, b: &Self::Buf, rows: usize, d: usize) -> Self::Act;
    /// LayerNorm backward from the kept `x̂` and `rstd` (`snella_core::ops::layernorm::layernorm_bwd_xhat`),
    /// writing `dx` plus `res: [rows, d]` when given (a pre-norm block's residual gradient, added in
    /// the same pass on CUDA); `dg`/`db` accumulate when given.
    #[allow(clippy::too_many_arguments)]
    fn layernorm_bwd_xhat(&self, dy: &Self::Buf, xhat: &Self::Act, g: &Self::Buf, rstd: &Self::Buf, rows: usize, d: usize, dx: &mut Self::Buf, res: Option<&Self::Buf>, dg: Option<&mut Self::Buf>, db: Option<&mut Self::Buf>);
    /// [`Backend::layernorm_bwd_xhat`] also returning `dx` in the form a linear's products read it
    /// as `∂L/∂y` ([`Backend::linear_bwd_products_act`], for the next linear with a frozen bias),
    /// when the backend writes that form in the same pass (CUDA bf16: `dx` rounded to bf16,
    /// bit-identical to the products' own conversion; session 8), else `None` (the default).
    #[allow(clippy::too_many_arguments)]
    fn layernorm_bwd_xhat_act(&self, dy: &Self::Buf, xhat: &Self::Act, g: &Self::Buf, rstd: &Self::Buf, rows: usize, d: usize, dx: &mut Self::Buf, res: Option<&Self::Buf>, dg: Option<&mut Self::Buf>, db: Option<&mut Self::Buf>) -> Option<Self::Act> {
        self.layernorm_bwd_xhat(dy, xhat, g, rstd, rows, d, dx, res, dg, db);
        None
    }
    /// Exact GELU forward of the `n` values of the MLP pre-activation `x` for training with selective
    /// recomputation, consuming `x`: returns the pre-activation as the backward keeps it and the
    /// output as the next linear layer's input (both [`Backend::Act`]; the output is not kept but
    /// rebuilt by [`Backend::gelu_fwd_from`]). CUDA in bf16 keeps `bf16(x)` (as autocast keeps a
    /// bf16 linear's output) and computes the output from it; elsewhere `x` itself.
    fn gelu_fwd_keep(&self, x: Self::Buf, n: usize) -> (Self::Act, Self::Act);
    /// The GELU output rebuilt from [`Backend::gelu_fwd_keep`]'s kept pre-activation (bit-identical).
    fn gelu_fwd_from(&self, x: &Self::Act, n: usize) -> Self::Act;
    /// Exact GELU backward from the kept pre-activation: `dx = dy·gelu'(x)` (`dy`, `dx` f32).
    fn gelu_bwd_act(&self, x: &Self::Act, dy: &Self::Buf, dx: &mut Self::Buf);
    /// [`Backend::gelu_bwd_act`] returning `dx` in the form the `fc1` backward consumes it (for
    /// [`Backend::linear_bwd_products_act`]): CUDA with `x` kept in bf16 writes `dx` rounded to bf16
    /// in the same kernel (bit-identical to converting the f32 result, one pass fewer); elsewhere
    /// [`Backend::act`] of the f32 result. For a linear whose bias is frozen (its gradient would need
    /// the f32 `dx`).
    fn gelu_bwd_to_act(&self, x: &Self::Act, dy: &Self::Buf) -> Self::Act {
        let mut dx = self.empty(self.len(dy));
        self.gelu_bwd_act(x, dy, &mut dx);
        self.act(dx)
    }
    /// Exact GELU forward.
    fn gelu_fwd(&self, x: &Self::Buf, y: &mut Self::Buf);
    /// Exact GELU backward from the pre-activation.
    fn gelu_bwd(&self, x: &Self::Buf, dy: &Self::Buf, dx: &mut Self::Buf);
    /// `qkv: [b, t, 3·d]` (f32) as the attention keeps it between forward and backward (the
    /// default: [`Backend::act`]; CUDA: bf16 where the attention is fused, which rounds it to bf16
    /// anyway, else f32).
    fn attention_input(&self, qkv: Self::Buf, hd: usize) -> Self::Act {
        let _ = hd;
        self.act(qkv)
    }
    /// Attention core forward (`snella_core::ops::attention::attention_fwd`): `qkv [b,t,3d]` (from
    /// [`Backend::attention_input`]) → `out [b,t,d]` as the `proj` linear's input ([`Backend::Act`]),
    /// and what the backward needs: the probabilities `[b, heads, t, t]` (the CPU reference, and
    /// CUDA's cuBLAS path), or each row's log-sum-exp `[b, heads, t]` where the backend fuses the
    /// attention and recomputes them (CUDA, for a bf16 `qkv`, which writes `out` in bf16 directly).
    fn attention_fwd(&self, qkv: &Self::Act, b: usize, t: usize, heads: usize, hd: usize) -> (Self::Act, Self::Buf);
    /// Attention core backward from the forward's input `qkv`, output `out` (as the `proj` linear
    /// keeps it) and `saved`; overwrites `dqkv [b,t,3d]`.
    #[allow(clippy::too_many_arguments)]
    fn attention_bwd(&self, dout: &Self::Buf, qkv: &Self::Act, out: &Self::Act, saved: &Self::Buf, b: usize, t: usize, heads: usize, hd: usize, dqkv: &mut Self::Buf);
    /// [`Backend::attention_bwd`] returning `dqkv: [b, t, 3·d]` in the form the `qkv` backward
    /// consumes it (for [`Backend::linear_bwd_products_act`]): CUDA's fused kernels write it rounded
    /// to bf16 (bit-identical to converting the f32 result); elsewhere [`Backend::act`] of the f32
    /// result. For a `qkv` linear whose bias is frozen.
    #[allow(clippy::too_many_arguments)]
    fn attention_bwd_to_act(&self, dout: &Self::Buf, qkv: &Self::Act, out: &Self::Act, saved: &Self::Buf, b: usize, t: usize, heads: usize, hd: usize) -> Self::Act {
        let mut dqkv = self.empty(b * t * 3 * heads * hd);
        self.attention_bwd(dout, qkv, out, saved, b, t, heads, hd, &mut dqkv);
        self.act(dqkv)
    }
    /// Mean softmax cross-entropy; returns `(loss, correct)` and writes `dlogits`.
    fn cross_entropy(&self, logits: &Self::Buf, labels: &[u32], b: usize, c: usize, dlogits: &mut Self::Buf) -> (f32, usize);
    /// Softmax cross-entropy of `b` rows with an explicit normaliser `norm` (the global batch size
    /// when a batch is split into micro-batches or data-parallel shards): writes
    /// `dlogits = (softmax − onehot)/norm` and returns `(Σ loss over the b rows in f64, correct)`,
    /// as `snella_core::ops::cross_entropy::cross_entropy_sum`. The default runs it on the host
    /// (one download of the `b×c` logits, one upload of `dlogits`); a backend may override it.
    fn cross_entropy_sum(&self, logits: &Self::Buf, labels: &[u32], b: usize, c: usize, norm: usize, dlogits: &mut Self::Buf) -> (f64, usize) {
        let host = self.download(logits);
        let mut d = vec![0f32; b * c];
        let r = snella_core::ops::cross_entropy::cross_entropy_sum(&host, labels, b, c, norm, &mut d);
        let up = self.upload(&d);
        self.copy(&up, 0, dlogits, 0, b * c);
        r
    }
    /// Patch unfolding of NCHW images.
    fn im2col(&self, images: &Self::Buf, b: usize, ch: usize, h: usize, w: usize, p: usize, cols: &mut Self::Buf);
    /// One AdamW update in place.
    fn adamw(&self, param: &mut Self::Buf, grad: &Self::Buf, m: &mut Self::Buf, v: &mut Self::Buf, h: &AdamWParams);
    /// AdamW updates of many tensors at one learning rate and step (`h`; each slot's `decay` says
    /// whether `h.weight_decay` applies to it, else 0), as one [`Backend::adamw`] per slot (the
    /// default); CUDA does them in one launch, bit-identically.
    fn adamw_many(&self, slots: &mut [AdamwSlot<'_, Self>], h: &AdamWParams) {
        for s in slots.iter_mut() {
            let hs = AdamWParams { weight_decay: if s.decay { h.weight_decay } else { 0.0 }, ..*h };
            self.adamw(s.param, s.grad, s.m, s.v, &hs);
        }
    }
    /// Kernelized merge forward (spec §1): `m [n_in, n_out]`; `mix` holds `[α, γ, β]` (SNELLA) or is
    /// `None` (SNELL).
    fn merge_fwd(&self, a: &Self::Buf, b: &Self::Buf, heads: usize, n_in: usize, n_out: usize, rh: usize, mix: Option<&Self::Buf>, m: &mut Self::Buf);
    /// [`Backend::merge_fwd`] followed by [`Backend::select_topk`] of the `M` it wrote (`k` kept
    /// entries, spec §2): the same `M` and kept set. The default makes the two calls; CUDA builds the
    /// select's first histogram in the merge's softmax pass (one launch and one read of `M` less).
    #[allow(clippy::too_many_arguments)]
    fn merge_fwd_select(&self, a: &Self::Buf, b: &Self::Buf, heads: usize, n_in: usize, n_out: usize, rh: usize, mix: Option<&Self::Buf>, m: &mut Self::Buf, k: usize) -> Self::Kept {
        self.merge_fwd(a, b, heads, n_in, n_out, rh, mix, m);
        self.select_topk(m, k)
    }
    /// [`Backend::merge_fwd`] for a backward pass: may also return what [`Backend::merge_bwd_saved`]
    /// reuses (the same `m`). The default saves nothing.
    #[allow(clippy::too_many_arguments)]
    fn merge_fwd_saving(&self, a: &Self::Buf, b: &Self::Buf, heads: usize, n_in: usize, n_out: usize, rh: usize, mix: Option<&Self::Buf>, m: &mut Self::Buf) -> Option<Self::MergeSaved> {
        self.merge_fwd(a, b, heads, n_in, n_out, rh, mix, m);
        None
    }
    /// [`Backend::merge_bwd`] reusing `saved` from [`Backend::merge_fwd_saving`] of the same `A`, `B`
    /// and mixture (`None`: recompute). The default ignores it.
    #[allow(clippy::too_many_arguments)]
    fn merge_bwd_saved(&self, saved: Option<&Self::MergeSaved>, a: &Self::Buf, b: &Self::Buf, heads: usize, n_in: usize, n_out: usize, rh: usize, mix: Option<&Self::Buf>, dm: &Self::Buf, da: &mut Self::Buf, db: &mut Self::Buf, dmix: Option<&mut Self::Buf>) {
        let _ = saved;
        self.merge_bwd(a, b, heads, n_in, n_out, rh, mix, dm, da, db, dmix)
    }
    /// Kernelized merge backward (spec §3): writes `da`, `db` and, with a mixture, `dmix = [∂α, ∂γ, ∂β]`.
    fn merge_bwd(&self, a: &Self::Buf, b: &Self::Buf, heads: usize, n_in: usize, n_out: usize, rh: usize, mix: Option<&Self::Buf>, dm: &Self::Buf, da: &mut Self::Buf, db: &mut Self::Buf, dmix: Option<&mut Self::Buf>);
    /// Exact top-k of `|m|` (spec §2).
    fn select_topk(&self, m: &Self::Buf, k: usize) -> Self::Kept;
    /// The host description of a kept set (for reports and tests; may synchronise the device).
    fn kept_set(&self, kept: &Self::Kept) -> KeptSet;
    /// Sparsify forward (spec §2).
    fn sparsify_fwd(&self, m: &Self::Buf, set: &Self::Kept, rule: SparsifyRule, dw: &mut Self::Buf);
    /// Sparsify backward (spec §3): `dm = g ⊙ factor`.
    fn sparsify_bwd(&self, m: &Self::Buf, set: &Self::Kept, rule: SparsifyRule, g: &Self::Buf, dm: &mut Self::Buf);
    /// Sparsify forward fused into a linear's effective weight (spec §2): for one adapter's
    /// `m: [n_in, c]` and kept set, `w[w_off + o·n_in + i] = w0[w0_off + o·n_in + i] + rule(m)[i·c + o]`
    /// over the chunk's `c` rows, with `w0 = Some((buffer, w0_off))`; with `None`, the chunk's
    /// `ΔWᵀ` alone (`0 + rule(m)ᵀ`). The default is the composition [`Backend::sparsify_fwd`] into a
    /// temporary, a copy of the `w0` rows (or zeros) and an accumulating [`Backend::transpose`]; the
    /// CUDA backend fuses the three (bit-identical).
    #[allow(clippy::too_many_arguments)]
    fn sparsify_into_weight(&self, m: &Self::Buf, set: &Self::Kept, rule: SparsifyRule, w0: Option<(&Self::Buf, usize)>, n_in: usize, c: usize, w: &mut Self::Buf, w_off: usize) {
        let mut dw = self.zeros(n_in * c);
        self.sparsify_fwd(m, set, rule, &mut dw);
        match w0 {
            Some((w0, w0_off)) => self.copy(w0, w0_off, w, w_off, n_in * c),
            None => self.copy(&self.zeros(n_in * c), 0, w, w_off, n_in * c),
        }
        self.transpose(&dw, 0, n_in, c, w, w_off, true);
    }
    /// Sparsify backward fused with the transpose out of a weight gradient (spec §3): for the
    /// chunk's `gt = ∂L/∂W` rows at `gt_off` (`[c, n_in]`), `gh[i·c + o] = gt[o, i]·factor(m[i·c + o])`.
    /// The default composes [`Backend::transpose`] and [`Backend::sparsify_bwd`]; CUDA fuses them.
    fn sparsify_bwd_from_weight(&self, gt: &Self::Buf, gt_off: usize, m: &Self::Buf, set: &Self::Kept, rule: SparsifyRule, n_in: usize, c: usize, gh: &mut Self::Buf) {
        let mut g = self.zeros(n_in * c);
        self.transpose(gt, gt_off, c, n_in, &mut g, 0, false);
        self.sparsify_bwd(m, set, rule, &g, gh);
    }
    /// Whether a linear layer whose every output chunk carries a kernel adapter, with a frozen
    /// weight, a `∂L/∂y` in the activation format and the forward's effective weight kept, takes its
    /// adapters' backward from [`Backend::linear_bwd_products_g`] and
    /// [`Backend::adapter_bwd_from_grad`] (`M` and `Ĝ` never formed) instead of rebuilding `M` and
    /// going through [`Backend::sparsify_bwd_from_weight`] and [`Backend::merge_bwd_saved`]. The default
    /// is false; CUDA true (session 9: one row kernel instead of the backward's softmax rewrite of
    /// `M`, the transposing sparsify backward and the row statistics).
    fn fused_adapter_bwd(&self) -> bool {
        false
    }
    /// [`Backend::linear_bwd_products_act`] with the weight gradient in `ΔW`'s layout:
    /// `g = xᵀ·dy: [n_in, n_out]` (spec §3's `G` for every chunk side by side; chunk `i`'s columns
    /// `[i·c, (i + 1)·c)`), and `dx = dy·W` when given. The default forms `gt` and transposes it;
    /// CUDA swaps the operands of the product.
    #[allow(clippy::too_many_arguments)]
    fn linear_bwd_products_g(&self, dy: &Self::Act, w: Weight<'_, Self>, x: &Self::Act, rows: usize, n_in: usize, n_out: usize, dx: Option<&mut Self::Buf>, g: &mut Self::Buf) {
        linear_bwd_products_g_composed(self, dy, w, x, rows, n_in, n_out, dx, g)
    }
    /// One kernel adapter's backward (spec §2 sparsify backward, then §3) from its layer's weight
    /// gradient `g: [n_in, ld]` ([`Backend::linear_bwd_products_g`]), the chunk's `c` columns starting
    /// at column `off`: writes `da`, `db` and, with a mixture, `dmix`, as [`Backend::merge_bwd`] from
    /// `Ĝ = G ⊙ factor(M)` with `M` the merge of `a`, `b` (`mix`) and `set` its forward kept set. The
    /// default composes [`Backend::merge_fwd`], [`Backend::transpose`], [`Backend::sparsify_bwd_from_weight`]
    /// and [`Backend::merge_bwd`]; CUDA fuses them (`snella_cuda::ops::merge::merge_bwd_from_grad`).
    #[allow(clippy::too_many_arguments)]
    fn adapter_bwd_from_grad(
        &self, g: &Self::Buf, off: usize, ld: usize, set: &Self::Kept, rule: SparsifyRule, a: &Self::Buf, b: &Self::Buf, heads: usize, n_in: usize, c: usize,
        rh: usize, mix: Option<&Self::Buf>, da: &mut Self::Buf, db: &mut Self::Buf, dmix: Option<&mut Self::Buf>,
    ) {
        let mut m = self.empty(n_in * c);
        self.merge_fwd(a, b, heads, n_in, c, rh, mix, &mut m);
        let mut gt = self.empty(ld * n_in);
        self.transpose(g, 0, n_in, ld, &mut gt, 0, false);
        let mut gh = self.empty(n_in * c);
        self.sparsify_bwd_from_weight(&gt, off * n_in, &m, set, rule, n_in, c, &mut gh);
        self.merge_bwd(a, b, heads, n_in, c, rh, mix, &gh, da, db, dmix);
    }
    /// Whether a ViT backward pass hands every kernel adapter's backward from its layer's weight
    /// gradient to one [`Backend::adapter_bwd_batch`] call at its end, keeping the weight gradients
    /// until then (CUDA bf16 with the fused adapter backward unless `SNELLA_MERGE_BATCH=off` or `fwd`; session 10),
    /// instead of running
    /// [`Backend::adapter_bwd_from_grad`] layer by layer. False by default.
    fn batch_adapter_bwd(&self) -> bool {
        false
    }
    /// [`Backend::adapter_bwd_from_grad`] for many adapters at once (spec §2–§3). The default runs
    /// them one by one; CUDA launches each kernel once per group of same-shape adapters
    /// (`snella_cuda::ops::merge_batch::adapter_bwd_batch`), with the same bits.
    fn adapter_bwd_batch(&self, jobs: &mut [GradJob<'_, Self>]) {
        for j in jobs.iter_mut() {
            self.adapter_bwd_from_grad(j.g, j.off, j.ld, j.set, j.rule, j.a, j.b, j.heads, j.n_in, j.c, j.rh, j.mix, j.da, j.db, j.dmix.as_deref_mut());
        }
    }
    /// Whether adapted linears multiply by `W0` and by `ΔWᵀ` in two products (`x·W0ᵀ + x·ΔW`, as the
    /// reference's autocast does) instead of by one effective weight `W0 + ΔWᵀ`. The default is
    /// false (one product); CUDA in bf16 takes two when asked (`SNELLA_DELTA_PRODUCTS=separate`,
    /// see [`crate::linear`] for the measurements behind the choice).
    fn separate_delta_products(&self) -> bool {
        false
    }
    /// Whether an adapted linear keeps its effective weight `W0 + ΔWᵀ` from forward to backward as
    /// the [`Backend::act`] copy its products read, instead of rebuilding it from `M` in backward.
    /// True where that copy is smaller than the f32 weight (CUDA bf16: 2 bytes per entry, 170 MB
    /// for ViT-B/16) and saves the rebuild and a conversion per layer; false (the default) keeps
    /// the spec's "dump in forward, recover in backward" for the weight as well as `M`.
    fn keep_effective_weight(&self) -> bool {
        false
    }
    /// A linear's effective weight `W0 + Σ ΔWᵀ` (`[chunks·c, n_in]`) as its products read it
    /// ([`Backend::act`]), for a linear whose every chunk carries a kernel adapter: chunk `i` (rows
    /// `i·c ..`) from `chunks[i] = (M, kept set, rule)` and `w0`'s rows, as
    /// [`Backend::sparsify_into_weight`] writes them. The default ([`effective_weight_f32`]) builds
    /// the f32 weight and hands it to [`Backend::act`]; CUDA bf16 writes the bf16 weight in the
    /// same pass (session 8: bit-identical, one conversion launch and an f32 weight less per layer).
    fn effective_weight_act(&self, w0: &Self::Buf, chunks: &[(&Self::Buf, &Self::Kept, SparsifyRule)], n_in: usize, c: usize) -> Self::Act {
        effective_weight_f32(self, w0, chunks, n_in, c)
    }
    /// A linear's output `x·Wᵀ (+ x·delta) + b` (`[rows, n_out]`) in the form [`Backend::act`] makes,
    /// for consumers that read only that form. The default computes it in f32 with
    /// [`Backend::linear_fwd`] and hands it to [`Backend::act`]; CUDA bf16 writes it in bf16 from the
    /// GEMM's epilogue with the bias rounded to bf16 unless `SNELLA_LINEAR_OUT=f32` (session 10;
    /// PyTorch's autocast `F.linear`).
    #[allow(clippy::too_many_arguments)]
    fn linear_fwd_act(&self, x: &Self::Act, w: Weight<'_, Self>, delta: Option<&Self::Buf>, bias: &Self::Buf, rows: usize, n_in: usize, n_out: usize) -> Self::Act {
        linear_fwd_f32_act(self, x, w, delta, bias, rows, n_in, n_out)
    }
    /// Whether a ViT forward takes `fc1`'s output from [`Backend::linear_fwd_act`] (then the GELU
    /// from it with [`Backend::gelu_fwd_from`]) and, when the attention of head dimension `hd` reads
    /// its input in that form, `qkv`'s too, instead of an f32 output converted by
    /// [`Backend::gelu_fwd_keep`] / [`Backend::attention_input`]. False by default (CUDA bf16: true
    /// unless `SNELLA_LINEAR_OUT=f32`).
    fn linear_out_act(&self, hd: usize) -> (bool, bool) {
        let _ = hd;
        (false, false)
    }
    /// Whether a ViT forward pass builds every adapted linear's effective weight and kept sets up
    /// front with one [`Backend::effective_weights`] call (where [`Backend::keep_effective_weight`]
    /// holds: CUDA bf16 unless `SNELLA_MERGE_BATCH=off`, session 10) instead of linear by
    /// linear. False by default.
    fn batch_effective_weights(&self) -> bool {
        false
    }
    /// [`Backend::merge_fwd_select`] for every chunk, then [`Backend::effective_weight_act`], for
    /// many linears at once: per layer its effective weight `[chunks·c, n_in]` and each chunk's kept
    /// set (spec §1–§2). The default runs them layer by layer; CUDA launches each kernel once per
    /// group of same-shape adapters (`snella_cuda::ops::merge_batch`), with the same bits.
    fn effective_weights(&self, layers: &[WeightJob<'_, Self>]) -> Vec<(Self::Act, Vec<Self::Kept>)> {
        effective_weights_each(self, layers)
    }
    /// A buffer of `n` values for an op to overwrite completely: uninitialised on CUDA (no memset),
    /// zeros on the CPU. Never read it before writing every element.
    fn empty(&self, n: usize) -> Self::Buf {
        self.zeros(n)
    }
    /// `true` when every value is finite.
    fn all_finite(&self, x: &Self::Buf) -> bool;
    /// The index of the first buffer holding a NaN/Inf, if any (one host wait on CUDA).
    fn first_non_finite(&self, xs: &[&Self::Buf]) -> Option<usize> {
        xs.iter().position(|x| !self.all_finite(x))
    }
    /// The allocator's per-element EMA update (spec §5) for one parameter `p` and its gradient `g`
    /// (same length): `Ī`, `Ū` in place, as `snella_core::snella::importance::importance_update`
    /// (bit-identical on every backend), adding the count of non-finite `|p ⊙ g|` to `bad[slot]`.
    fn importance_update(&self, p: &Self::Buf, g: &Self::Buf, ibar: &mut Self::Buf, ubar: &mut Self::Buf, beta1: f32, beta2: f32, bad: &mut Self::Buf, slot: usize);
    /// [`Backend::importance_update`] over many tensors (each slot's non-finite count into
    /// `bad[slot.slot]`), as one call per slot (the default; CUDA: one launch).
    fn importance_update_many(&self, slots: &mut [ImportanceSlot<'_, Self>], beta1: f32, beta2: f32, bad: &mut Self::Buf) {
        for s in slots.iter_mut() {
            self.importance_update(s.p, s.g, s.ibar, s.ubar, beta1, beta2, bad, s.slot);
        }
    }
    /// Host copies of several buffers (one host wait on CUDA).
    fn download_many(&self, xs: &[&Self::Buf]) -> Vec<Vec<f32>> {
        xs.iter().map(|x| self.download(x)).collect()
    }
}

/// One tensor of [`Backend::importance_update_many`] (spec §5): an adapter factor, its gradient,
/// its EMAs and the index of its non-finite counter.
pub struct ImportanceSlot<'a, B: Backend + ?Sized> {
    /// The parameter `p`.
    pub p: &'a B::Buf,
    /// Its gradient.
    pub g: &'a B::Buf,
    /// `Ī`, updated in place.
    pub ibar: &'a mut B::Buf,
    /// `Ū`, updated in place.
    pub ubar: &'a mut B::Buf,
    /// Index of this tensor's non-finite counter.
    pub slot: usize,
}

/// One tensor of [`Backend::adamw_many`]: the parameter, its gradient and moments, and whether the
/// decoupled weight decay applies (matrices; not norms, biases, tokens — spec §6).
pub struct AdamwSlot<'a, B: Backend + ?Sized> {
    /// The parameter, updated in place.
    pub param: &'a mut B::Buf,
    /// Its gradient.
    pub grad: &'a B::Buf,
    /// First moment.
    pub m: &'a mut B::Buf,
    /// Second moment.
    pub v: &'a mut B::Buf,
    /// Weight decay applies.
    pub decay: bool,
}

/// One kernel adapter of a [`WeightJob`]: its merge parameters (spec §1), kept count and rule.
pub struct AdapterJob<'a, B: Backend> {
    /// `A: [heads, n_in, rh]`.
    pub a: &'a B::Buf,
    /// `B: [heads, c, rh]`.
    pub b: &'a B::Buf,
    /// `[α, γ, β]` (SNELLA) or `None` (SNELL).
    pub mix: Option<&'a B::Buf>,
    /// Kernel pieces `H`.
    pub heads: usize,
    /// Rank per piece `r/H`.
    pub rh: usize,
    /// The kept count `k` (spec §2).
    pub k: usize,
    /// The sparsify rule.
    pub rule: SparsifyRule,
}

/// A linear whose every output chunk of `c` rows carries a kernel adapter, for
/// [`Backend::effective_weights`].
pub struct WeightJob<'a, B: Backend> {
    /// `W0: [chunks·c, n_in]`.
    pub w0: &'a B::Buf,
    /// Input features.
    pub n_in: usize,
    /// Rows per chunk.
    pub c: usize,
    /// One adapter per chunk.
    pub chunks: Vec<AdapterJob<'a, B>>,
}

/// One kernel adapter's backward for [`Backend::adapter_bwd_batch`]: the arguments of
/// [`Backend::adapter_bwd_from_grad`].
pub struct GradJob<'a, B: Backend> {
    /// The layer's weight gradient `g: [n_in, ld]` (ΔW's layout).
    pub g: &'a B::Buf,
    /// The chunk's first column in `g`.
    pub off: usize,
    /// Columns of `g` (the layer's `n_out`).
    pub ld: usize,
    /// The forward's kept set of this adapter.
    pub set: &'a B::Kept,
    /// The sparsify rule.
    pub rule: SparsifyRule,
    /// `A: [heads, n_in, rh]`.
    pub a: &'a B::Buf,
    /// `B: [heads, c, rh]`.
    pub b: &'a B::Buf,
    /// Kernel pieces `H`.
    pub heads: usize,
    /// Input features.
    pub n_in: usize,
    /// The chunk's output features.
    pub c: usize,
    /// Rank per piece `r/H`.
    pub rh: usize,
    /// `[α, γ, β]` (SNELLA) or `None`.
    pub mix: Option<&'a B::Buf>,
    /// `∂L/∂A`, overwritten.
    pub da: &'a mut B::Buf,
    /// `∂L/∂B`, overwritten.
    pub db: &'a mut B::Buf,
    /// `(∂α, ∂γ, ∂β)`, overwritten when given.
    pub dmix: Option<&'a mut B::Buf>,
}

/// [`Backend::linear_fwd_act`]'s default: [`Backend::linear_fwd`] into an f32 output, then
/// [`Backend::act`] (also what CUDA runs for the operands its bf16-output GEMM does not take).
#[allow(clippy::too_many_arguments)]
pub fn linear_fwd_f32_act<B: Backend>(be: &B, x: &B::Act, w: Weight<'_, B>, delta: Option<&B::Buf>, bias: &B::Buf, rows: usize, n_in: usize, n_out: usize) -> B::Act {
    let mut y = be.empty(rows * n_out);
    be.linear_fwd(x, w, delta, bias, None, rows, n_in, n_out, &mut y);
    be.act(y)
}

/// [`Backend::effective_weights`]'s default: per layer, [`Backend::merge_fwd_select`] into a fresh
/// `M` for each chunk, then [`Backend::effective_weight_act`].
pub fn effective_weights_each<B: Backend>(be: &B, layers: &[WeightJob<'_, B>]) -> Vec<(B::Act, Vec<B::Kept>)> {
    layers
        .iter()
        .map(|l| {
            let ms: Vec<(B::Buf, B::Kept)> = l
                .chunks
                .iter()
                .map(|j| {
                    let mut m = be.empty(l.n_in * l.c);
                    let set = be.merge_fwd_select(j.a, j.b, j.heads, l.n_in, l.c, j.rh, j.mix, &mut m, j.k);
                    (m, set)
                })
                .collect();
            let parts: Vec<_> = ms.iter().zip(&l.chunks).map(|((m, s), j)| (m, s, j.rule)).collect();
            let w = be.effective_weight_act(l.w0, &parts, l.n_in, l.c);
            (w, ms.into_iter().map(|(_, s)| s).collect())
        })
        .collect()
}

/// [`Backend::effective_weight_act`]'s default: each chunk through
/// [`Backend::sparsify_into_weight`] into an f32 weight, then [`Backend::act`].
pub fn effective_weight_f32<B: Backend>(be: &B, w0: &B::Buf, chunks: &[(&B::Buf, &B::Kept, SparsifyRule)], n_in: usize, c: usize) -> B::Act {
    let n = c * n_in;
    let mut w = be.empty(chunks.len() * n);
    for (i, &(m, set, rule)) in chunks.iter().enumerate() {
        be.sparsify_into_weight(m, set, rule, Some((w0, i * n)), n_in, c, &mut w, i * n);
    }
    be.act(w)
}

/// [`Backend::linear_bwd_products_g`] composed: [`Backend::linear_bwd_products_act`] into
/// `gt: [n_out, n_in]`, then its [`Backend::transpose`] into `g: [n_in, n_out]` (the trait's
/// default, and what a backend overriding it runs for operands its own form does not take).
#[allow(clippy::too_many_arguments)]
pub fn linear_bwd_products_g_composed<B: Backend>(be: &B, dy: &B::Act, w: Weight<'_, B>, x: &B::Act, rows: usize, n_in: usize, n_out: usize, dx: Option<&mut B::Buf>, g: &mut B::Buf) {
    let mut gt = be.empty(n_out * n_in);
    be.linear_bwd_products_act(dy, w, x, rows, n_in, n_out, dx, Some(&mut gt));
    be.transpose(&gt, 0, n_out, n_in, g, 0, false);
}
