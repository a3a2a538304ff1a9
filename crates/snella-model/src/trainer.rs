//! The training step: forward, cross-entropy, backward, allocator statistics and AdamW with the
//! warm-up + cosine schedule (spec §5–§6).

use crate::adapter::{Delta, KernelAdapter};
use crate::allocator::{Allocator, AllocatorConfig, LayerInfo};
use crate::backend::{AdamwSlot, Backend, ImportanceSlot};
use crate::vit::Vit;
use snella_core::ops::adamw::AdamWParams;
use snella_core::{Result, SnellaError};

/// Optimisation settings of a run (spec §6 and §8 defaults).
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct TrainConfig {
    /// Epochs `T` (also the allocator's rounds).
    pub epochs: usize,
    /// Images per step.
    pub batch_size: usize,
    /// Optimizer steps per epoch (`ceil(train images / batch)`).
    pub steps_per_epoch: usize,
    /// Peak learning rate.
    pub lr: f64,
    /// Decoupled weight decay for tensors with ≥ 2 dims (not `cls_token`).
    pub weight_decay: f64,
    /// Linear warm-up length in epochs.
    pub warmup_epochs: usize,
    /// AdamW β1.
    pub beta1: f64,
    /// AdamW β2.
    pub beta2: f64,
    /// AdamW ε.
    pub eps: f64,
    /// The allocator (used by SNELLA and SNELL); `rounds` is set to `epochs`.
    pub allocator: AllocatorConfig,
    /// Recompute block activations in backward instead of keeping them (activation
    /// checkpointing, [`crate::vit::Vit::recompute`]): less memory for larger batches, ~1/3 more compute.
    #[serde(default)]
    pub recompute: bool,
    /// Gradient accumulation: each step runs its batch as this many micro-batches (contiguous
    /// slices whose sizes differ by at most one, [`crate::comm::shard_range`]), one forward and
    /// backward pass each, and adds their gradients in order before the one AdamW update. The loss
    /// of every micro-batch is normalised by the whole batch size, so the update is that of the whole
    /// batch (up to f32 summation order) with the activation memory of one micro-batch. `1` (the
    /// default) is the plain step. With `M` micro-batches the result equals `M` data-parallel CPU
    /// ranks ([`crate::dp`]) bit for bit.
    #[serde(default = "one")]
    pub micro_batches: usize,
}

fn one() -> usize {
    1
}

impl Default for TrainConfig {
    fn default() -> Self {
        TrainConfig {
            epochs: 40,
            batch_size: 64,
            steps_per_epoch: 1,
            lr: 1e-3,
            weight_decay: 0.05,
            warmup_epochs: 4,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            allocator: AllocatorConfig::default(),
            recompute: false,
            micro_batches: 1,
        }
    }
}

impl TrainConfig {
    /// Checks every field, naming the first one out of range.
    ///
    /// # Errors
    /// [`SnellaError::Config`] with the field name and the allowed range.
    pub fn validate(&self) -> Result<()> {
        if self.epochs == 0 {
            return Err(SnellaError::config("epochs", self.epochs, "an integer ≥ 1"));
        }
        if self.batch_size == 0 {
            return Err(SnellaError::config("batchSize", self.batch_size, "an integer ≥ 1"));
        }
        if self.micro_batches == 0 || self.micro_batches > self.batch_size {
            return Err(SnellaError::config("microBatches", self.micro_batches, &format!("an integer in [1, batchSize = {}]", self.batch_size)));
        }
        if self.steps_per_epoch == 0 {
            return Err(SnellaError::config("stepsPerEpoch", self.steps_per_epoch, "an integer ≥ 1 (is the training set empty?)"));
        }
        if !(self.lr.is_finite() && self.lr > 0.0) {
            return Err(SnellaError::config("lr", self.lr, "a finite number > 0"));
        }
        if !(self.weight_decay.is_finite() && self.weight_decay >= 0.0) {
            return Err(SnellaError::config("weightDecay", self.weight_decay, "a finite number ≥ 0"));
        }
        if self.warmup_epochs > self.epochs {
            return Err(SnellaError::config("warmupEpochs", self.warmup_epochs, &format!("an integer in [0, epochs = {}]", self.epochs)));
        }
        for (f, v) in [("beta1", self.beta1), ("beta2", self.beta2)] {
            if !(0.0..1.0).contains(&v) {
                return Err(SnellaError::config(f, v, "a number in [0, 1)"));
            }
        }
        if !(self.eps.is_finite() && self.eps > 0.0) {
            return Err(SnellaError::config("eps", self.eps, "a finite number > 0"));
        }
        Ok(())
    }
}

/// What one step reports.
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct StepStats {
    /// The optimizer step just taken (1-based).
    pub step: u64,
    /// Mean cross-entropy of the batch.
    pub loss: f32,
    /// Correct top-1 predictions in the batch.
    pub correct: usize,
    /// Images in the batch.
    pub batch: usize,
    /// The learning rate used.
    pub lr: f64,
    /// Whether this step also staged the next batch's images on the backend
    /// ([`Trainer::step_next`]); the caller then passes no images for that batch.
    #[serde(default)]
    pub staged: bool,
}

/// A training batch's images `[b, C, H, W]` (f32, normalised, NCHW).
pub enum Images<'a, B: Backend> {
    /// On the host (uploaded by the step).
    Host(&'a [f32]),
    /// Already on the backend: what the previous [`Trainer::step_next`] staged with
    /// [`Backend::upload_beside`].
    Staged(B::Buf),
}

/// Training state that is not in the model: step counters and the allocator.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct Trainer {
    /// Settings.
    pub cfg: TrainConfig,
    /// Optimizer steps taken.
    pub step: u64,
    /// The epoch in progress (set by [`Trainer::begin_epoch`]).
    pub epoch: usize,
    /// The allocator, for SNELLA and SNELL.
    pub allocator: Option<Allocator>,
}

/// The kernel adapters of a model, in a fixed order (blocks, then q, k, v, proj, fc1, fc2).
pub fn kernel_adapters<B: Backend>(vit: &Vit<B>) -> Vec<&KernelAdapter<B>> {
    vit.linears().into_iter().flat_map(|l| l.deltas.iter()).filter_map(|d| match d {
        Some(Delta::Kernel(k)) => Some(k),
        _ => None,
    }).collect()
}

/// Mutable [`kernel_adapters`].
pub fn kernel_adapters_mut<B: Backend>(vit: &mut Vit<B>) -> Vec<&mut KernelAdapter<B>> {
    vit.linears_mut().into_iter().flat_map(|l| l.deltas.iter_mut()).filter_map(|d| match d {
        Some(Delta::Kernel(k)) => Some(k),
        _ => None,
    }).collect()
}

impl Trainer {
    /// A trainer for `vit` (with its method attached). Builds the allocator when the model has
    /// kernel adapters.
    ///
    /// # Errors
    /// [`SnellaError::Config`] from [`TrainConfig::validate`] or the allocator's validation.
    pub fn new<B: Backend>(vit: &mut Vit<B>, mut cfg: TrainConfig) -> Result<Self> {
        cfg.validate()?;
        cfg.allocator.rounds = cfg.epochs;
        let layers: Vec<LayerInfo> = kernel_adapters(vit)
            .iter()
            .map(|k| LayerInfo { name: k.name.clone(), n_in: k.n_in, n_out: k.n_out, a_len: k.a.numel(), b_len: k.b.numel() })
            .collect();
        let allocator = if layers.is_empty() { None } else { Some(Allocator::new(cfg.allocator.clone(), layers)?) };
        if let Some(a) = &allocator {
            for (k, s) in kernel_adapters_mut(vit).into_iter().zip(a.sparsities()) {
                k.sparsity = *s;
            }
        }
        Ok(Trainer { cfg, step: 0, epoch: 0, allocator })
    }

    /// Copies the allocator's EMAs from the backend (where [`Trainer::step`] updates them) into the
    /// allocator's host state, so scores, reports and checkpoints read the current values. One
    /// download of every layer's `Ī`, `Ū` (a host wait on CUDA); a no-op before the first step.
    pub fn pull_importance<B: Backend>(&mut self, be: &B, vit: &Vit<B>) {
        let Some(a) = self.allocator.as_mut() else { return };
        let ks = kernel_adapters(vit);
        let bufs: Vec<&B::Buf> = ks.iter().filter_map(|k| k.ema.as_ref()).flat_map(|e| e.iter()).collect();
        if bufs.is_empty() {
            return;
        }
        let host = be.download_many(&bufs);
        let mut it = host.into_iter();
        for (l, k) in ks.iter().enumerate() {
            if k.ema.is_some() {
                for dst in a.ema_mut(l) {
                    *dst = it.next().expect("four EMA buffers per layer");
                }
            }
        }
    }

    /// Forgets the backend copies of the allocator's EMAs (after the allocator state was replaced,
    /// e.g. by a resumed checkpoint); the next step uploads the allocator's host state again.
    pub fn drop_device_importance<B: Backend>(vit: &mut Vit<B>) {
        for k in kernel_adapters_mut(vit) {
            k.ema = None;
        }
    }

    /// Total optimizer steps of the run.
    pub fn total_steps(&self) -> u64 {
        (self.cfg.epochs * self.cfg.steps_per_epoch) as u64
    }

    /// The learning rate at 0-based step `s`: linear warm-up `lr·(s+1)/W` for `s < W`, then cosine
    /// `lr·½(1 + cos(π(s−W)/max(1, S−W)))` (spec §6; as the reference implementation).
    pub fn lr_at(&self, s: u64) -> f64 {
        let warm = (self.cfg.warmup_epochs * self.cfg.steps_per_epoch) as u64;
        let total = self.total_steps();
        let f = if s < warm {
            (s + 1) as f64 / warm as f64
        } else {
            0.5 * (1.0 + (std::f64::consts::PI * (s - warm) as f64 / (total.saturating_sub(warm)).max(1) as f64).cos())
        };
        self.cfg.lr * f
    }

    /// Starts epoch `t`: the allocator re-decides per-layer sparsities (spec §5).
    pub fn begin_epoch<B: Backend>(&mut self, be: &B, vit: &mut Vit<B>, t: usize) {
        self.epoch = t;
        self.pull_importance(be, vit);
        if let Some(a) = self.allocator.as_mut() {
            let s = a.begin_round(t).to_vec();
            for (k, s) in kernel_adapters_mut(vit).into_iter().zip(s) {
                k.sparsity = s;
            }
        }
    }

    /// One training step on `images: [b, C, H, W]` (normalised, NCHW) and `labels: [b]`: with
    /// [`TrainConfig::micro_batches`] `= M > 1`, `M` forward/backward passes over contiguous slices
    /// whose gradients are added in order, then one update.
    ///
    /// # Errors
    /// [`SnellaError::NonFinite`] naming the loss or the first trainable tensor whose gradient is
    /// NaN/Inf; the parameters are then left as they were before the step. When the gradients are
    /// finite but the AdamW update makes a parameter NaN/Inf (e.g. an enormous learning rate), the
    /// error names that parameter `(after the update)`; the model then holds the non-finite values
    /// (continue from the last checkpoint, which [`Session::save_checkpoint`] never overwrites with
    /// such a state).
    ///
    /// [`Session::save_checkpoint`]: crate::session::Session::save_checkpoint
    pub fn step<B: Backend>(&mut self, be: &B, vit: &mut Vit<B>, images: &[f32], labels: &[u32]) -> Result<StepStats> {
        let b = labels.len();
        let (loss_sum, correct) = self.accumulate(be, vit, images, labels, b);
        self.apply(be, vit, loss_sum, correct, b)
    }

    /// [`Trainer::step`] that also stages `next` (the next batch's images, any size) on the backend
    /// while this step computes, so that the next step does not wait for its upload: the host fills
    /// a page-locked buffer and the DMA runs on a second stream during this step's forward
    /// ([`Backend::upload_beside`]). Pass the returned buffer as [`Images::Staged`] to the next call.
    /// With [`TrainConfig::micro_batches`] `> 1` nothing is staged (the step slices host images).
    ///
    /// # Errors
    /// As [`Trainer::step`]; [`SnellaError::Config`] for [`Images::Staged`] with micro-batches, and
    /// [`SnellaError::Tensor`] when staged images do not hold `labels.len()` images of `per` values.
    pub fn step_next<B: Backend>(&mut self, be: &B, vit: &mut Vit<B>, images: Images<'_, B>, labels: &[u32], per: usize, next: Option<&[f32]>) -> Result<(StepStats, Option<B::Buf>)> {
        let b = labels.len();
        let x = match images {
            Images::Host(h) if self.cfg.micro_batches.max(1) > 1 || b == 0 => return self.step(be, vit, h, labels).map(|s| (s, None)),
            Images::Staged(_) if self.cfg.micro_batches.max(1) > 1 => {
                return Err(SnellaError::config("micro_batches", self.cfg.micro_batches, "1 for a step on staged images (pass the images instead)"));
            }
            Images::Host(h) => be.upload(h),
            Images::Staged(x) => x,
        };
        if be.len(&x) != b * per {
            return Err(SnellaError::tensor("<staged>", "images", format!("has {} values; expected {b} images of {per} = {}", be.len(&x), b * per)));
        }
        let ((loss_sum, correct), staged) = self.forward_backward_x(be, vit, x, labels, b, next);
        let stats = self.apply(be, vit, loss_sum, correct, b)?;
        Ok((StepStats { staged: staged.is_some(), ..stats }, staged))
    }

    /// Forward and backward of `images: [b, C, H, W]`, `labels: [b]` (a whole batch, or one
    /// data-parallel rank's shard of it) as [`TrainConfig::micro_batches`] micro-batches, each
    /// normalised by `norm` (the global batch size), their gradients added in order into the
    /// trainable parameters' gradients. Returns `(Σ loss in f64, correct)`; stops early with a
    /// non-finite loss sum (the gradients are then unusable). `b = 0` leaves zero gradients.
    pub fn accumulate<B: Backend>(&self, be: &B, vit: &mut Vit<B>, images: &[f32], labels: &[u32], norm: usize) -> (f64, usize) {
        let b = labels.len();
        if b == 0 {
            zero_grads(be, vit);
            return (0.0, 0);
        }
        let per = images.len() / b;
        let m = self.cfg.micro_batches.max(1);
        let (mut loss_sum, mut correct) = (0f64, 0usize);
        // From the second micro-batch on, the running sum waits in `spare` while backward writes
        // the micro-batch's gradients, then is added to them: `(g₀ + g₁) + g₂ …`, the order in
        // which the CPU communicators reduce the shards of data-parallel ranks.
        let mut spare: Vec<B::Buf> = Vec::new();
        for i in 0..m {
            let r = crate::comm::shard_range(b, m, i);
            if i > 0 {
                let mut grads = trained_grads_mut(vit);
                if spare.is_empty() {
                    // every backward overwrites every gradient, so the spare set needs no zeros
                    spare = grads.iter().map(|g| be.empty(be.len(g))).collect();
                }
                for (g, s) in grads.iter_mut().zip(spare.iter_mut()) {
                    std::mem::swap(*g, s);
                }
            }
            let (l, c) = if r.is_empty() {
                zero_grads(be, vit);
                (0.0, 0)
            } else {
                self.forward_backward(be, vit, &images[r.start * per..r.end * per], &labels[r.clone()], norm)
            };
            loss_sum += l;
            correct += c;
            if !l.is_finite() {
                return (loss_sum, correct);
            }
            if i > 0 {
                for (g, s) in trained_grads_mut(vit).into_iter().zip(&spare) {
                    be.add_assign(g, s);
                }
            }
        }
        (loss_sum, correct)
    }

    /// Forward and backward of one micro-batch (or data-parallel shard) `images: [b, C, H, W]`,
    /// `labels: [b]` (`b ≥ 1`), with the cross-entropy normalised by `norm` (the whole batch's
    /// size): leaves `∂(Σ loss / norm)/∂p` of this slice in every trainable parameter's gradient
    /// and returns `(Σ loss over the slice in f64, correct top-1)`. When the loss is not finite the
    /// backward pass is skipped (the gradients are then stale; the caller stops the step).
    pub fn forward_backward<B: Backend>(&self, be: &B, vit: &mut Vit<B>, images: &[f32], labels: &[u32], norm: usize) -> (f64, usize) {
        let x = be.upload(images);
        self.forward_backward_x(be, vit, x, labels, norm, None).0
    }

    /// [`Trainer::forward_backward`] of images already on the backend (`x`), staging `next` with
    /// [`Backend::upload_beside`] once the forward is queued (the host copies while the device
    /// computes). Returns the loss sum and correct count, and the staged batch.
    fn forward_backward_x<B: Backend>(&self, be: &B, vit: &mut Vit<B>, x: B::Buf, labels: &[u32], norm: usize, next: Option<&[f32]>) -> ((f64, usize), Option<B::Buf>) {
        let b = labels.len();
        vit.recompute = self.cfg.recompute;
        let (logits, cache) = vit.forward(be, &x, b, true);
        drop(x);
        let staged = next.map(|n| be.upload_beside(n));
        let c = vit.head.n_out;
        let mut dlogits = be.empty(b * c);
        let (sum, correct) = if norm == b {
            // The whole batch at once: the backend's fused op, as a plain step always did.
            let (l, k) = be.cross_entropy(&logits, labels, b, c, &mut dlogits);
            (l as f64 * b as f64, k)
        } else {
            be.cross_entropy_sum(&logits, labels, b, c, norm, &mut dlogits)
        };
        if sum.is_finite() {
            vit.backward(be, cache.expect("train cache"), &dlogits);
        }
        ((sum, correct), staged)
    }

    /// The end of a step, once the gradients of the whole batch are in place (summed over
    /// micro-batches or all-reduced over ranks): checks the loss and the gradients, feeds the
    /// allocator's importance statistics (spec §5) from those gradients, takes the AdamW step and
    /// checks the updated parameters. `loss_sum` is the cross-entropy summed over the `batch`
    /// images, `correct` their correct top-1 count.
    ///
    /// # Errors
    /// As [`Trainer::step`].
    pub fn apply<B: Backend>(&mut self, be: &B, vit: &mut Vit<B>, loss_sum: f64, correct: usize, batch: usize) -> Result<StepStats> {
        let step = self.step + 1;
        let loss = (loss_sum / batch.max(1) as f64) as f32;
        if !loss.is_finite() {
            return Err(SnellaError::NonFinite { tensor: "loss".into(), step });
        }
        {
            let params = vit.params_mut();
            let trained: Vec<&crate::param::Param<B>> = params.iter().filter(|p| p.train.is_some()).map(|p| &**p).collect();
            let grads: Vec<&B::Buf> = trained.iter().map(|p| &p.train.as_ref().expect("trainable").grad).collect();
            if let Some(i) = be.first_non_finite(&grads) {
                return Err(SnellaError::NonFinite { tensor: format!("{} (gradient)", trained[i].name), step });
            }
        }
        // the allocator's non-finite counts stay on the device until the host waits anyway (below)
        let bad = self.allocator.as_mut().map(|a| update_importance(be, vit, a));
        let lr = self.lr_at(self.step);
        let (b1, b2, eps, wd) = (self.cfg.beta1, self.cfg.beta2, self.cfg.eps, self.cfg.weight_decay);
        {
            let mut slots: Vec<AdamwSlot<'_, B>> = Vec::new();
            for p in vit.params_mut() {
                let crate::param::Param { value, train, .. } = p;
                if let Some(crate::param::TrainState { grad, m, v, decay, .. }) = train.as_mut() {
                    slots.push(AdamwSlot { param: value, grad, m, v, decay: *decay });
                }
            }
            be.adamw_many(&mut slots, &AdamWParams { lr, beta1: b1, beta2: b2, eps, weight_decay: wd, step });
        }
        self.step = step;
        // A finite gradient can still overflow a parameter (a huge learning rate): name it.
        let params = vit.params_mut();
        let trained: Vec<&crate::param::Param<B>> = params.iter().filter(|p| p.train.is_some()).map(|p| &**p).collect();
        let values: Vec<&B::Buf> = trained.iter().map(|p| &p.value).collect();
        let non_finite = be.first_non_finite(&values);
        if let (Some(a), Some(bad)) = (self.allocator.as_mut(), bad) {
            for (l, c) in be.download(&bad).chunks(2).enumerate() {
                a.record_non_finite(step, l, c[0] as usize, c[1] as usize);
            }
        }
        if let Some(i) = non_finite {
            return Err(SnellaError::NonFinite { tensor: format!("{} (after the update)", trained[i].name), step });
        }
        Ok(StepStats { step, loss, correct, batch, lr, staged: false })
    }
}

/// The gradient buffers of every trainable parameter, in [`Vit::params_mut`] order (the order in
/// which data-parallel ranks all-reduce them).
pub fn trained_grads_mut<B: Backend>(vit: &mut Vit<B>) -> Vec<&mut B::Buf> {
    vit.params_mut().into_iter().filter_map(|p| p.train.as_mut().map(|t| &mut t.grad)).collect()
}

/// Sets every trainable gradient to zero (a micro-batch or shard with no images contributes 0).
pub fn zero_grads<B: Backend>(be: &B, vit: &mut Vit<B>) {
    for g in trained_grads_mut(vit) {
        be.fill_zero(g);
    }
}

/// The allocator's importance statistics after a backward (spec §5), on the backend: each kernel
/// adapter's `Ī`, `Ū` of `A` and `B` are updated where the parameters and gradients live (uploaded
/// from the allocator's host state the first time). Returns the non-finite counts (two per layer,
/// on the backend) for the caller to record as allocator events once it waits for the device.
fn update_importance<B: Backend>(be: &B, vit: &mut Vit<B>, a: &Allocator) -> B::Buf {
    let (b1, b2) = (a.config().beta1 as f32, a.config().beta2 as f32);
    let mut ks = kernel_adapters_mut(vit);
    let mut bad = be.zeros(2 * ks.len());
    let mut slots = Vec::with_capacity(2 * ks.len());
    for (l, k) in ks.iter_mut().enumerate() {
        let KernelAdapter { a: pa, b: pb, ema, .. } = &mut **k;
        let e = ema.get_or_insert_with(|| a.ema(l).map(|v| be.upload(v)));
        let [ia, ua, ib, ub] = e;
        slots.push(ImportanceSlot { p: &pa.value, g: &pa.train.as_ref().expect("A trainable").grad, ibar: ia, ubar: ua, slot: 2 * l });
        slots.push(ImportanceSlot { p: &pb.value, g: &pb.train.as_ref().expect("B trainable").grad, ibar: ib, ubar: ub, slot: 2 * l + 1 });
    }
    be.importance_update_many(&mut slots, b1, b2, &mut bad);
    drop(slots);
    bad
}
