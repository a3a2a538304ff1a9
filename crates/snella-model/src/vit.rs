//! The Vision Transformer (timm `VisionTransformer` naming) with explicit forward and backward.
//!
//! `x0 = [cls; patch_embed(img)] + pos_embed`; each block is pre-norm
//! `h = x + proj(attn(qkv(ln1(x))))`, `x' = h + fc2(gelu(fc1(ln2(h))))`; then the final LayerNorm on
//! the class token and the head. Backward computes `∂L/∂x` through frozen layers and parameter
//! gradients only for trainable tensors.

use crate::backend::Backend;
use crate::config::VitConfig;
use crate::linear::{Grad, KeptSets, Linear};
use crate::param::Param;
use snella_core::st::TensorFile;
use snella_core::Result;

/// One transformer block.
pub struct Block<B: Backend> {
    /// `norm1.weight`, `norm1.bias`.
    pub norm1: (Param<B>, Param<B>),
    /// `attn.qkv` (3 output chunks: q, k, v).
    pub qkv: Linear<B>,
    /// `attn.proj`.
    pub proj: Linear<B>,
    /// `norm2.weight`, `norm2.bias`.
    pub norm2: (Param<B>, Param<B>),
    /// `mlp.fc1`.
    pub fc1: Linear<B>,
    /// `mlp.fc2`.
    pub fc2: Linear<B>,
}

/// Saved activations of one block for the backward pass (selective recomputation: the two
/// LayerNorm outputs and the GELU output are not kept but rebuilt in backward from the kept
/// normalised inputs `x̂` and the MLP pre-activation, one cheap element-wise pass each; the block
/// input `x` and the residual `h` are not kept either, as only the LayerNorm backwards read them,
/// through `x̂`).
pub struct BlockCache<B: Backend> {
    /// `x̂` of `norm1` (`[b·t, d]`).
    xh1: B::Act,
    /// `rstd` of `norm1` (`[b·t]`).
    r1: B::Buf,
    qkv: B::Act,
    /// What the attention forward saved for its backward ([`Backend::attention_fwd`]).
    saved: B::Buf,
    att: B::Act,
    /// `x̂` of `norm2`.
    xh2: B::Act,
    /// `rstd` of `norm2`.
    r2: B::Buf,
    /// The MLP pre-activation `fc1(ln2)` as [`Backend::gelu_fwd_keep`] keeps it.
    f1: B::Act,
    /// What qkv, proj, fc1 and fc2 hand from this forward pass to their backward: the kept sets and,
    /// where the backend keeps it, the effective weight ([`KeptSets`]).
    kept: [KeptSets<B>; 4],
}

/// What the forward pass keeps of one block: all its activations, or (with
/// [`Vit::recompute`]) only its input, from which backward recomputes them.
pub enum Saved<B: Backend> {
    /// Every activation the backward needs.
    Full(BlockCache<B>),
    /// The block input `[b·t, d]` only (activation checkpointing), and the kept sets its forward
    /// selected (reused when backward recomputes the block).
    Input(B::Buf, [KeptSets<B>; 4]),
}

/// Saved activations of a whole forward pass.
pub struct Cache<B: Backend> {
    batch: usize,
    cols: B::Act,
    blocks: Vec<Saved<B>>,
    /// `x̂` of the final norm on the class tokens (`[b, d]`).
    cls_xhat: B::Act,
    cls_rstd: B::Buf,
    cls_norm: B::Act,
}

/// A ViT on backend `B`.
pub struct Vit<B: Backend> {
    /// Shape and normalisation.
    pub cfg: VitConfig,
    /// `patch_embed.proj` as a linear on unfolded patches (`weight: [D, C, p, p]`).
    pub patch: Linear<B>,
    /// `cls_token: [1, 1, D]`.
    pub cls_token: Param<B>,
    /// `pos_embed: [1, T, D]`.
    pub pos_embed: Param<B>,
    /// The blocks.
    pub blocks: Vec<Block<B>>,
    /// Final `norm.weight`, `norm.bias`.
    pub norm: (Param<B>, Param<B>),
    /// `head` (`[classes, D]`).
    pub head: Linear<B>,
    /// Activation checkpointing: keep only each block's input during training and recompute the
    /// block's activations in backward (about one more forward pass; activation memory drops from
    /// all blocks' to one block's).
    pub recompute: bool,
}

fn ln_params<B: Backend>(be: &B, f: &mut TensorFile, name: &str, d: usize) -> Result<(Param<B>, Param<B>)> {
    let w = f.take(&format!("{name}.weight"), &[d])?;
    let b = f.take(&format!("{name}.bias"), &[d])?;
    Ok((Param::frozen(be, format!("{name}.weight"), vec![d], &w.data), Param::frozen(be, format!("{name}.bias"), vec![d], &b.data)))
}

fn linear<B: Backend>(be: &B, f: &mut TensorFile, name: &str, n_in: usize, n_out: usize, chunks: usize) -> Result<Linear<B>> {
    let w = f.take(&format!("{name}.weight"), &[n_out, n_in])?;
    let b = f.take(&format!("{name}.bias"), &[n_out])?;
    Ok(Linear::new(be, name, n_in, n_out, chunks, &w.data, &b.data))
}

impl<B: Backend> Vit<B> {
    /// Builds the model from a parsed checkpoint, every tensor frozen.
    ///
    /// # Errors
    /// [`snella_core::SnellaError::Tensor`] naming the file and tensor when one is missing or its
    /// shape does not fit the config.
    pub fn from_file(be: &B, mut f: TensorFile) -> Result<Self> {
        let cfg = VitConfig::from_file(&f)?;
        let (d, p, c, t) = (cfg.embed_dim, cfg.patch_size, cfg.in_chans, cfg.tokens());
        let pw = f.take("patch_embed.proj.weight", &[d, c, p, p])?;
        let pb = f.take("patch_embed.proj.bias", &[d])?;
        let mut patch = Linear::new(be, "patch_embed.proj", c * p * p, d, 1, &pw.data, &pb.data);
        patch.weight.shape = vec![d, c, p, p];
        let cls = f.take("cls_token", &[1, 1, d])?;
        let pos = f.take("pos_embed", &[1, t, d])?;
        let mut blocks = Vec::with_capacity(cfg.depth);
        for i in 0..cfg.depth {
            let n = format!("blocks.{i}");
            blocks.push(Block {
                norm1: ln_params(be, &mut f, &format!("{n}.norm1"), d)?,
                qkv: linear(be, &mut f, &format!("{n}.attn.qkv"), d, 3 * d, 3)?,
                proj: linear(be, &mut f, &format!("{n}.attn.proj"), d, d, 1)?,
                norm2: ln_params(be, &mut f, &format!("{n}.norm2"), d)?,
                fc1: linear(be, &mut f, &format!("{n}.mlp.fc1"), d, cfg.mlp_hidden, 1)?,
                fc2: linear(be, &mut f, &format!("{n}.mlp.fc2"), cfg.mlp_hidden, d, 1)?,
            });
        }
        let norm = ln_params(be, &mut f, "norm", d)?;
        let head = linear(be, &mut f, "head", d, cfg.num_classes, 1)?;
        Ok(Vit {
            patch,
            cls_token: Param::frozen(be, "cls_token", vec![1, 1, d], &cls.data),
            pos_embed: Param::frozen(be, "pos_embed", vec![1, t, d], &pos.data),
            blocks,
            norm,
            head,
            cfg,
            recompute: false,
        })
    }

    /// Every linear layer, in forward order (patch embedding, blocks, head).
    pub fn linears_mut(&mut self) -> Vec<&mut Linear<B>> {
        let mut v = vec![&mut self.patch];
        for b in self.blocks.iter_mut() {
            v.extend([&mut b.qkv, &mut b.proj, &mut b.fc1, &mut b.fc2]);
        }
        v.push(&mut self.head);
        v
    }

    /// Every linear layer, in forward order.
    pub fn linears(&self) -> Vec<&Linear<B>> {
        let mut v = vec![&self.patch];
        for b in self.blocks.iter() {
            v.extend([&b.qkv, &b.proj, &b.fc1, &b.fc2]);
        }
        v.push(&self.head);
        v
    }

    /// Every parameter (frozen and trainable, adapters included), in a fixed order.
    pub fn params_mut(&mut self) -> Vec<&mut Param<B>> {
        let mut v: Vec<&mut Param<B>> = vec![&mut self.cls_token, &mut self.pos_embed];
        let (patch, blocks, norm, head) = (&mut self.patch, &mut self.blocks, &mut self.norm, &mut self.head);
        fn lin<'a, B: Backend>(v: &mut Vec<&'a mut Param<B>>, l: &'a mut Linear<B>) {
            v.push(&mut l.weight);
            v.push(&mut l.bias);
            for d in l.deltas.iter_mut().flatten() {
                v.extend(d.params_mut());
            }
        }
        lin(&mut v, patch);
        for b in blocks.iter_mut() {
            v.push(&mut b.norm1.0);
            v.push(&mut b.norm1.1);
            lin(&mut v, &mut b.qkv);
            lin(&mut v, &mut b.proj);
            v.push(&mut b.norm2.0);
            v.push(&mut b.norm2.1);
            lin(&mut v, &mut b.fc1);
            lin(&mut v, &mut b.fc2);
        }
        v.push(&mut norm.0);
        v.push(&mut norm.1);
        lin(&mut v, head);
        v
    }

    /// Forward pass on `images: [b, C, H, W]` (normalised NCHW); returns `logits: [b, classes]` and,
    /// when `train`, the activations for [`Vit::backward`].
    pub fn forward(&self, be: &B, images: &B::Buf, b: usize, train: bool) -> (B::Buf, Option<Cache<B>>) {
        let cfg = &self.cfg;
        let (d, p, t) = (cfg.embed_dim, cfg.patch_size, cfg.tokens());
        let np = t - 1;
        let mut cols = be.empty(b * np * cfg.in_chans * p * p);
        be.im2col(images, b, cfg.in_chans, cfg.img_size, cfg.img_size, p, &mut cols);
        let cols = be.act(cols);
        let pe = self.patch.forward(be, &cols, b * np);
        let mut x = be.empty(b * t * d);
        be.copy_rows(&self.cls_token.value, 0, 0, &mut x, 0, t * d, d, b);
        be.copy_rows(&pe, 0, np * d, &mut x, d, t * d, np * d, b);
        be.add_bias(&mut x, &self.pos_embed.value, b, t * d);
        let mut caches = Vec::new();
        // session 10: every adapted linear's effective weight and kept sets up front, in one backend
        // call (CUDA bf16: one launch per kernel for each group of same-shape adapters instead of
        // about seven per adapter); with checkpointing the weights are made block by block instead
        let mut pre = if be.batch_effective_weights() && !(train && self.recompute) { self.effective_weights(be) } else { Vec::new() }.into_iter();
        for blk in &self.blocks {
            if train && self.recompute {
                let mut keep = be.empty(b * t * d);
                be.copy(&x, 0, &mut keep, 0, b * t * d);
                let (out, _, kept) = Self::block_fwd(be, cfg, blk, x, b, false, None);
                // the effective weights are rebuilt by the recomputed forward (memory is the point)
                caches.push(Saved::Input(keep, kept.map(KeptSets::without_weight)));
                x = out;
                continue;
            }
            let (out, c, _) = Self::block_fwd(be, cfg, blk, x, b, train, pre.next());
            x = out;
            if let Some(c) = c {
                caches.push(Saved::Full(c));
            }
        }
        let mut cls_in = be.empty(b * d);
        be.copy_rows(&x, 0, t * d, &mut cls_in, 0, d, d, b);
        let mut rstd = be.empty(b);
        let (cls_norm, cls_xhat) = be.layernorm_fwd_xhat(&cls_in, &self.norm.0.value, &self.norm.1.value, b, d, cfg.ln_eps, &mut rstd);
        let logits = self.head.forward(be, &cls_norm, b);
        let cache = train.then_some(Cache { batch: b, cols, blocks: caches, cls_xhat, cls_rstd: rstd, cls_norm });
        (logits, cache)
    }

    /// Every block's `[qkv, proj, fc1, fc2]` kept sets with their effective weights, made by one
    /// [`Backend::effective_weights`] call (linears that [`Linear::weight_job`] leaves out get empty
    /// [`KeptSets`] and build theirs in their forward).
    fn effective_weights(&self, be: &B) -> Vec<[KeptSets<B>; 4]> {
        let jobs: Vec<_> = self.blocks.iter().flat_map(|b| [&b.qkv, &b.proj, &b.fc1, &b.fc2]).map(|l| l.weight_job()).collect();
        let has: Vec<bool> = jobs.iter().map(Option::is_some).collect();
        let mut made = be.effective_weights(&jobs.into_iter().flatten().collect::<Vec<_>>()).into_iter();
        let mut kept = has.into_iter().map(|h| match h {
            true => {
                let (w, sets) = made.next().expect("one result per job");
                KeptSets { sets: sets.into_iter().map(Some).collect(), weight: Some(w) }
            }
            false => KeptSets::default(),
        });
        self.blocks.iter().map(|_| std::array::from_fn(|_| kept.next().expect("four linears per block"))).collect()
    }

    /// One block's forward; `kept` reuses the kept sets of an earlier forward of the same step (a
    /// recompute), and the sets used are returned.
    #[allow(clippy::type_complexity)]
    fn block_fwd(be: &B, cfg: &VitConfig, blk: &Block<B>, x: B::Buf, b: usize, train: bool, kept: Option<[KeptSets<B>; 4]>) -> (B::Buf, Option<BlockCache<B>>, [KeptSets<B>; 4]) {
        let [kq, kp, k1, k2] = kept.map(|k| k.map(Some)).unwrap_or([None, None, None, None]);
        let (d, t, rows) = (cfg.embed_dim, cfg.tokens(), b * cfg.tokens());
        let mut r1 = be.empty(rows);
        let (ln1, xh1) = be.layernorm_fwd_xhat(&x, &blk.norm1.0.value, &blk.norm1.1.value, rows, d, cfg.ln_eps, &mut r1);
        // session 10 (CUDA bf16): qkv and fc1 written in bf16 by their GEMMs, read only in bf16
        let (fc1_act, qkv_act) = be.linear_out_act(cfg.head_dim());
        let (qkv, k_qkv) = if qkv_act {
            blk.qkv.forward_act(be, &ln1, rows, kq)
        } else {
            let (qkv, k) = blk.qkv.forward_keep(be, &ln1, rows, kq);
            (be.attention_input(qkv, cfg.head_dim()), k)
        };
        drop(ln1);
        let (att, saved) = be.attention_fwd(&qkv, b, t, cfg.num_heads, cfg.head_dim());
        let (h, k_proj) = blk.proj.forward_res(be, &att, rows, kp, Some(&x));
        drop(x);
        let mut r2 = be.empty(rows);
        let (ln2, xh2) = be.layernorm_fwd_xhat(&h, &blk.norm2.0.value, &blk.norm2.1.value, rows, d, cfg.ln_eps, &mut r2);
        // the pre-activation is kept as a bf16 linear's output is under autocast (CUDA bf16) and the
        // GELU output is rebuilt from it in backward (from the same bf16 values where the GEMM writes
        // them, as the forward's GELU reads them then)
        let (f1, g, k_fc1) = if fc1_act {
            let (f1, k) = blk.fc1.forward_act(be, &ln2, rows, k1);
            let g = be.gelu_fwd_from(&f1, rows * cfg.mlp_hidden);
            (f1, g, k)
        } else {
            let (f1, k) = blk.fc1.forward_keep(be, &ln2, rows, k1);
            let (f1, g) = be.gelu_fwd_keep(f1, rows * cfg.mlp_hidden);
            (f1, g, k)
        };
        drop(ln2);
        let (out, k_fc2) = blk.fc2.forward_res(be, &g, rows, k2, Some(&h));
        if !train {
            return (out, None, [k_qkv, k_proj, k_fc1, k_fc2]);
        }
        let cache = BlockCache { xh1, r1, qkv, saved, att, xh2, r2, f1, kept: [k_qkv, k_proj, k_fc1, k_fc2] };
        (out, Some(cache), Default::default())
    }

    /// Backward pass from `dlogits: [b, classes]`, writing the gradient of every trainable parameter.
    pub fn backward(&mut self, be: &B, cache: Cache<B>, dlogits: &B::Buf) {
        let cfg = self.cfg.clone();
        let (b, d, t) = (cache.batch, cfg.embed_dim, cfg.tokens());
        let rows = b * t;
        let dcls_norm = self.head.backward(be, &cache.cls_norm, dlogits, b, true).expect("dx");
        let mut dcls = be.empty(b * d);
        let (ng, nb) = (&mut self.norm.0, &mut self.norm.1);
        let dg = ng.train.as_mut().map(|s| { be.fill_zero(&mut s.grad); &mut s.grad });
        let db = nb.train.as_mut().map(|s| { be.fill_zero(&mut s.grad); &mut s.grad });
        be.layernorm_bwd_xhat(&dcls_norm, &cache.cls_xhat, &ng.value, &cache.cls_rstd, b, d, &mut dcls, None, dg, db);
        let mut dx = be.zeros(rows * d);
        be.copy_rows(&dcls, 0, d, &mut dx, 0, t * d, d, b);
        // a block's input gradient is the previous block's fc2 ∂L/∂y: with a frozen fc2 bias the
        // LayerNorm backward also writes it in the form the products read
        let fc2_frozen: Vec<bool> = self.blocks.iter().map(|blk| blk.fc2.bias.train.is_none()).collect();
        // session 10: the kernel adapters' backward waits for one batched call at the end (not with
        // checkpointing, where the weight gradients held until then, 340 MB at ViT-B, would add to
        // the peak that checkpointing is there to lower)
        let defer = be.batch_adapter_bwd() && !self.recompute;
        if defer {
            self.linears_mut().into_iter().for_each(|l| l.defer_adapter_bwd = true);
        }
        let mut dx_act = None;
        for (i, (blk, saved)) in self.blocks.iter_mut().zip(cache.blocks).enumerate().rev() {
            let c = match saved {
                Saved::Full(c) => c,
                Saved::Input(x, kept) => Self::block_fwd(be, &cfg, blk, x, b, true, Some(kept)).1.expect("recomputed block cache"),
            };
            let want_act = i > 0 && fc2_frozen[i - 1];
            (dx, dx_act) = Self::block_bwd(be, &cfg, blk, c, dx, dx_act.take(), b, want_act);
        }
        drop(dx_act);
        if let Some(s) = self.pos_embed.train.as_mut() {
            be.bias_grad(&dx, b, t * d, &mut s.grad, false);
        }
        if let Some(s) = self.cls_token.train.as_mut() {
            let mut rows0 = be.empty(b * d);
            be.copy_rows(&dx, 0, t * d, &mut rows0, 0, d, d, b);
            be.bias_grad(&rows0, b, d, &mut s.grad, false);
        }
        if self.patch.weight.train.is_some() || self.patch.bias.train.is_some() || self.patch.adapted() {
            let np = t - 1;
            let mut dpe = be.empty(b * np * d);
            be.copy_rows(&dx, d, t * d, &mut dpe, 0, np * d, np * d, b);
            self.patch.backward(be, &cache.cols, &dpe, b * np, false);
        }
        if defer {
            let mut lins = self.linears_mut();
            {
                let mut jobs: Vec<_> = lins.iter_mut().flat_map(|l| l.grad_jobs()).collect();
                if !jobs.is_empty() {
                    be.adapter_bwd_batch(&mut jobs);
                }
            }
            lins.iter_mut().for_each(|l| {
                l.defer_adapter_bwd = false;
                l.pending = None;
            });
        }
    }

    /// One block's backward from `dout` (f32) and, when the LayerNorm backward after it made one,
    /// `dout_act` (the same gradient as `fc2`'s products read it; used when `fc2`'s bias is frozen).
    /// Returns the input gradient and, when `want_act`, its product form where the backend makes one.
    #[allow(clippy::too_many_arguments)]
    fn block_bwd(be: &B, cfg: &VitConfig, blk: &mut Block<B>, c: BlockCache<B>, dout: B::Buf, dout_act: Option<B::Act>, b: usize, want_act: bool) -> (B::Buf, Option<B::Act>) {
        let (d, t, rows) = (cfg.embed_dim, cfg.tokens(), b * cfg.tokens());
        let [k_qkv, k_proj, k_fc1, k_fc2] = c.kept;
        let g = be.gelu_fwd_from(&c.f1, rows * cfg.mlp_hidden);
        // (the caller asks the block after for `dout_act` only where this fc2's bias is frozen)
        debug_assert!(dout_act.is_none() || blk.fc2.bias.train.is_none());
        let dg = match dout_act {
            Some(a) => blk.fc2.backward_grad(be, &g, &Grad::Act(a), rows, true, Some(k_fc2)),
            None => blk.fc2.backward_with(be, &g, &dout, rows, true, Some(k_fc2)),
        }
        .expect("dx");
        drop(g);
        // with frozen biases (every PEFT method), fc1's and qkv's ∂L/∂y come from the GELU and
        // attention backward in the form their products consume (bf16 in a CUDA bf16 step: no
        // conversion pass); a trainable bias sums the f32 gradient
        let df1 = if blk.fc1.bias.train.is_none() {
            Grad::Act(be.gelu_bwd_to_act(&c.f1, &dg))
        } else {
            let mut df1 = be.empty(rows * cfg.mlp_hidden);
            be.gelu_bwd_act(&c.f1, &dg, &mut df1);
            Grad::F32(df1)
        };
        drop(dg);
        let ln2 = be.layernorm_affine_act(&c.xh2, &blk.norm2.0.value, &blk.norm2.1.value, rows, d);
        let dln2 = blk.fc1.backward_grad(be, &ln2, &df1, rows, true, Some(k_fc1)).expect("dx");
        drop((ln2, df1));
        let (dh, dh_act) = Self::norm_bwd(be, &mut blk.norm2, &dln2, &c.xh2, &c.r2, rows, d, &dout, blk.proj.bias.train.is_none());
        let datt = match dh_act {
            Some(a) => blk.proj.backward_grad(be, &c.att, &Grad::Act(a), rows, true, Some(k_proj)),
            None => blk.proj.backward_with(be, &c.att, &dh, rows, true, Some(k_proj)),
        }
        .expect("dx");
        let (nh, hd) = (cfg.num_heads, cfg.head_dim());
        let dqkv = if blk.qkv.bias.train.is_none() {
            Grad::Act(be.attention_bwd_to_act(&datt, &c.qkv, &c.att, &c.saved, b, t, nh, hd))
        } else {
            let mut dqkv = be.empty(rows * 3 * d);
            be.attention_bwd(&datt, &c.qkv, &c.att, &c.saved, b, t, nh, hd, &mut dqkv);
            Grad::F32(dqkv)
        };
        drop(datt);
        let ln1 = be.layernorm_affine_act(&c.xh1, &blk.norm1.0.value, &blk.norm1.1.value, rows, d);
        let dln1 = blk.qkv.backward_grad(be, &ln1, &dqkv, rows, true, Some(k_qkv)).expect("dx");
        drop((ln1, dqkv));
        Self::norm_bwd(be, &mut blk.norm1, &dln1, &c.xh1, &c.r1, rows, d, &dh, want_act)
    }

    /// A block LayerNorm's backward from its kept `x̂` and `rstd` with the residual gradient `res`
    /// added: `dx: [rows, d]`, the affine gradients when trainable, and, when `act`, `dx` also in
    /// the next linear's product form ([`Backend::layernorm_bwd_xhat_act`], where the backend makes
    /// one).
    #[allow(clippy::too_many_arguments)]
    fn norm_bwd(be: &B, norm: &mut (Param<B>, Param<B>), dy: &B::Buf, xhat: &B::Act, rstd: &B::Buf, rows: usize, d: usize, res: &B::Buf, act: bool) -> (B::Buf, Option<B::Act>) {
        let mut dx = be.empty(rows * d);
        let (w, bb) = (&mut norm.0, &mut norm.1);
        let gw = w.train.as_mut().map(|s| { be.fill_zero(&mut s.grad); &mut s.grad });
        let gb = bb.train.as_mut().map(|s| { be.fill_zero(&mut s.grad); &mut s.grad });
        let dx_act = if act {
            be.layernorm_bwd_xhat_act(dy, xhat, &w.value, rstd, rows, d, &mut dx, Some(res), gw, gb)
        } else {
            be.layernorm_bwd_xhat(dy, xhat, &w.value, rstd, rows, d, &mut dx, Some(res), gw, gb);
            None
        };
        (dx, dx_act)
    }
}
