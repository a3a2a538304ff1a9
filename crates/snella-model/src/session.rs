//! A fine-tuning session: a model, its method and training state, and what users do with them
//! (train, evaluate, report, merge, save and load adapters). The napi layer wraps this 1:1.

use crate::backend::Backend;
use crate::peft::{attach, MethodConfig};
use crate::trainer::{kernel_adapters, Images, StepStats, TrainConfig, Trainer};
use crate::vit::Vit;
use snella_core::st::{self, HostTensor};
use snella_core::{Result, SnellaError};
use std::collections::BTreeMap;
use std::path::Path;

/// File names inside an adapter folder (a PEFT-like layout).
pub const ADAPTER_WEIGHTS: &str = "adapter_model.safetensors";
/// The JSON config beside the weights.
pub const ADAPTER_CONFIG: &str = "adapter_config.json";

/// One row of the per-layer report.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct LayerReport {
    /// Adapter name, e.g. `blocks.0.attn.q`.
    pub name: String,
    /// Input features.
    pub n_in: usize,
    /// Output features.
    pub n_out: usize,
    /// Entries of `ΔW` (`in·out`).
    pub entries: usize,
    /// Entries kept at the current sparsity.
    pub kept: usize,
    /// Current sparsity (fraction zeroed).
    pub sparsity: f64,
    /// The allocator's normalised score (0 before any statistics).
    pub score: f64,
}

/// Model + method + training state on backend `B`.
pub struct Session<B: Backend> {
    /// The backend.
    pub be: B,
    /// The model.
    pub vit: Vit<B>,
    /// The method attached, if any.
    pub method: Option<MethodConfig>,
    /// Training state, once [`Session::prepare`] was called.
    pub trainer: Option<Trainer>,
    /// The checkpoint the model came from.
    pub source: String,
    /// The next batch's images, staged on the backend by the last [`Session::train_step_next`],
    /// with the optimizer step count after that step: they are used only while the trainer is
    /// still at that step (any other step, or a new trainer, makes them stale).
    pub staged: Option<(u64, B::Buf)>,
}

impl<B: Backend> Session<B> {
    /// Loads a timm-named ViT safetensors checkpoint.
    ///
    /// # Errors
    /// [`SnellaError::File`]/[`SnellaError::Tensor`] naming the file and tensor.
    pub fn load(be: B, path: &str) -> Result<Self> {
        let f = st::read(path)?;
        let vit = Vit::from_file(&be, f)?;
        Ok(Session::new(be, vit, path))
    }

    /// A session over a model already built (`source` names where it came from), with nothing
    /// attached or prepared.
    pub fn new(be: B, vit: Vit<B>, source: &str) -> Self {
        Session { be, vit, method: None, trainer: None, source: source.to_string(), staged: None }
    }

    /// Attaches a method (see [`attach`]). Only once per session.
    ///
    /// # Errors
    /// As [`attach`]; [`SnellaError::Config`] when a method is already attached.
    pub fn attach(&mut self, cfg: MethodConfig) -> Result<()> {
        if let Some(m) = &self.method {
            return Err(SnellaError::config("method", format!("{:?}", cfg.kind), &format!("no second method: {:?} is attached already", m.kind)));
        }
        attach(&self.be, &mut self.vit, &cfg)?;
        self.method = Some(cfg);
        Ok(())
    }

    /// Sets up training (optimizer schedule, allocator).
    ///
    /// # Errors
    /// [`SnellaError::Config`] for invalid settings, or when no method is attached.
    pub fn prepare(&mut self, cfg: TrainConfig) -> Result<()> {
        if self.method.is_none() {
            return Err(SnellaError::config("method", "none", "attach a method before training"));
        }
        let t = Trainer::new(&mut self.vit, cfg)?;
        self.set_trainer(Some(t));
        Ok(())
    }

    /// Installs `trainer` (a new one, a resumed one, rank 0's copy) and forgets the backend copies of
    /// the allocator's EMAs, which belonged to the trainer replaced: the next step uploads the new
    /// trainer's. Every replacement of the trainer goes through here.
    pub fn set_trainer(&mut self, trainer: Option<Trainer>) {
        Trainer::drop_device_importance(&mut self.vit);
        self.trainer = trainer;
    }

    /// Starts epoch `t` (allocator round).
    ///
    /// # Errors
    /// When not prepared.
    pub fn begin_epoch(&mut self, t: usize) -> Result<()> {
        let tr = self.trainer.as_mut().ok_or_else(|| SnellaError::config("trainer", "none", "call prepare() before training"))?;
        tr.begin_epoch(&self.be, &mut self.vit, t);
        Ok(())
    }

    fn check_images(&self, images: &[f32], b: usize) -> Result<()> {
        let c = &self.vit.cfg;
        let per = c.in_chans * c.img_size * c.img_size;
        if images.len() != b * per {
            return Err(SnellaError::tensor("<input>", "images", format!("has {} values; expected {b}×{}×{}×{} = {}", images.len(), c.in_chans, c.img_size, c.img_size, b * per)));
        }
        Ok(())
    }

    /// One training step.
    ///
    /// # Errors
    /// Shape errors, labels out of range, a merged model, non-finite values (see [`Trainer::step`]).
    pub fn train_step(&mut self, images: &[f32], labels: &[u32]) -> Result<StepStats> {
        self.check_batch(images, labels)?;
        self.staged = None;
        let Session { be, vit, trainer, .. } = self;
        let tr = trainer.as_mut().ok_or_else(|| SnellaError::config("trainer", "none", "call prepare() before training"))?;
        tr.step(be, vit, images, labels)
    }

    /// One training step that also stages `next`, the next batch's images (`[b', C, H, W]`, any
    /// `b' ≥ 1`), on the backend while this step computes ([`Trainer::step_next`]): on CUDA the next
    /// step then starts without waiting for its upload. `images: None` trains on the batch the
    /// previous call staged (its [`StepStats::staged`] was true, and no other step ran since);
    /// `Some` trains on these images and drops anything staged. The result is the same as
    /// [`Session::train_step`] on the same images. An error other than a bad `next` drops the
    /// staged batch too: pass the images again.
    ///
    /// # Errors
    /// As [`Session::train_step`]; [`SnellaError::Config`] for `images: None` with nothing staged
    /// (or staged before another step);
    /// [`SnellaError::Tensor`] when `next` or the staged batch does not hold whole images of the
    /// model's size (the staged batch must hold `labels.len()` of them).
    pub fn train_step_next(&mut self, images: Option<&[f32]>, labels: &[u32], next: Option<&[f32]>) -> Result<StepStats> {
        let c = &self.vit.cfg;
        let per = c.in_chans * c.img_size * c.img_size;
        if let Some(n) = next {
            if n.is_empty() || n.len() % per != 0 {
                return Err(SnellaError::tensor("<next>", "images", format!("has {} values; expected a whole number ≥ 1 of {}×{}×{} images", n.len(), c.in_chans, c.img_size, c.img_size)));
            }
        }
        let at = self.trainer.as_ref().map(|t| t.step);
        let staged = self.staged.take().and_then(|(step, x)| (Some(step) == at).then_some(x));
        let x = match images {
            Some(h) => {
                self.check_batch(h, labels)?;
                Images::Host(h)
            }
            None => {
                let Some(x) = staged else {
                    return Err(SnellaError::config("images", "none", "images for this step: the previous step staged none (pass `next` to stage a batch)"));
                };
                self.check_labels(labels)?;
                self.check_not_merged()?;
                Images::Staged(x)
            }
        };
        let Session { be, vit, trainer, .. } = self;
        let tr = trainer.as_mut().ok_or_else(|| SnellaError::config("trainer", "none", "call prepare() before training"))?;
        let (stats, staged) = tr.step_next(be, vit, x, labels, per, next)?;
        self.staged = staged.map(|x| (stats.step, x));
        Ok(stats)
    }

    /// Checks a training batch before any work: `images` holds `labels.len() ≥ 1` images of the
    /// model's size, every label is below the class count, and the model is not merged.
    ///
    /// # Errors
    /// [`SnellaError::Tensor`] for the shape or a label out of range; [`SnellaError::Config`] for an
    /// empty batch or a merged model.
    pub fn check_batch(&self, images: &[f32], labels: &[u32]) -> Result<()> {
        self.check_images(images, labels.len())?;
        self.check_labels(labels)?;
        self.check_not_merged()
    }

    fn check_not_merged(&self) -> Result<()> {
        if self.vit.linears().iter().any(|l| l.original.is_some()) {
            return Err(SnellaError::config("merged", "true", "unmerge() before training"));
        }
        Ok(())
    }

    fn check_labels(&self, labels: &[u32]) -> Result<()> {
        let c = self.vit.head.n_out;
        if labels.is_empty() {
            return Err(SnellaError::config("batch", 0, "at least one image"));
        }
        if let Some(bad) = labels.iter().find(|&&l| l as usize >= c) {
            return Err(SnellaError::tensor("<input>", "labels", format!("label {bad} is out of range [0, {c})")));
        }
        Ok(())
    }

    /// Logits `[b, classes]` for `images: [b, C, H, W]`.
    ///
    /// # Errors
    /// On a shape mismatch.
    pub fn predict(&self, images: &[f32], b: usize) -> Result<Vec<f32>> {
        self.check_images(images, b)?;
        let x = self.be.upload(images);
        let (logits, _) = self.vit.forward(&self.be, &x, b, false);
        Ok(self.be.download(&logits))
    }

    /// `(summed cross-entropy, correct top-1)` over a batch.
    ///
    /// # Errors
    /// On a shape mismatch or labels out of range.
    pub fn evaluate(&self, images: &[f32], labels: &[u32]) -> Result<(f64, usize)> {
        self.check_labels(labels)?;
        let b = labels.len();
        let logits = self.predict(images, b)?;
        let c = self.vit.head.n_out;
        let mut d = vec![0.0f32; b * c];
        let (loss, correct) = snella_core::ops::cross_entropy::cross_entropy(&logits, labels, b, c, &mut d);
        Ok((loss as f64 * b as f64, correct))
    }

    /// The allocator's current statistics on the host (they are updated on the backend during
    /// training; see [`Trainer::pull_importance`]).
    pub fn pull_importance(&mut self) {
        if let Some(t) = self.trainer.as_mut() {
            t.pull_importance(&self.be, &self.vit);
        }
    }

    /// The per-layer report of kept entries and allocator scores.
    pub fn report(&mut self) -> Vec<LayerReport> {
        self.pull_importance();
        let scores = self.trainer.as_ref().and_then(|t| t.allocator.as_ref()).map(|a| a.scores());
        kernel_adapters(&self.vit)
            .iter()
            .enumerate()
            .map(|(i, k)| LayerReport {
                name: k.name.clone(),
                n_in: k.n_in,
                n_out: k.n_out,
                entries: k.numel(),
                kept: k.kept(),
                sparsity: k.sparsity,
                score: scores.as_ref().map(|s| s[i]).unwrap_or(0.0),
            })
            .collect()
    }

    /// Trainable parameter count.
    pub fn trainable_count(&mut self) -> usize {
        self.vit.params_mut().iter().filter(|p| p.train.is_some()).map(|p| p.numel()).sum()
    }

    /// Merges every adapter into its frozen weight (spec §7).
    pub fn merge(&mut self) {
        let be = self.be.clone();
        for l in self.vit.linears_mut() {
            l.merge(&be);
        }
    }

    /// Restores every `W0` bit-exactly.
    pub fn unmerge(&mut self) {
        for l in self.vit.linears_mut() {
            l.unmerge();
        }
    }

    /// Writes `dir/adapter_model.safetensors` (trainable tensors, allocator statistics) and
    /// `dir/adapter_config.json` (method, per-layer sparsities, allocator state), atomically.
    ///
    /// # Errors
    /// [`SnellaError::File`] when a file exists and `overwrite` is false, or on I/O failure.
    pub fn save_adapter(&mut self, dir: &str, overwrite: bool) -> Result<()> {
        let method = self.method.clone().ok_or_else(|| SnellaError::config("method", "none", "attach a method before saving an adapter"))?;
        let d = Path::new(dir);
        let (wp, cp) = (d.join(ADAPTER_WEIGHTS), d.join(ADAPTER_CONFIG));
        if !overwrite {
            for p in [&wp, &cp] {
                if p.exists() {
                    return Err(SnellaError::file(p, "already exists; pass overwrite to replace it"));
                }
            }
        }
        let be = self.be.clone();
        let mut tensors = BTreeMap::new();
        for p in self.vit.params_mut() {
            if p.train.is_some() {
                tensors.insert(p.name.clone(), HostTensor::new(p.shape.clone(), be.download(&p.value)));
            }
        }
        self.pull_importance();
        let trainer = self.trainer.clone();
        if let Some(a) = trainer.as_ref().and_then(|t| t.allocator.as_ref()) {
            for (name, t) in a.state_tensors() {
                tensors.insert(name, t);
            }
        }
        let sparsities: BTreeMap<String, f64> = kernel_adapters(&self.vit).iter().map(|k| (k.name.clone(), k.sparsity)).collect();
        let config = serde_json::json!({
            "format": "snella-adapter",
            "version": 1,
            "base_model": self.source,
            "vit": self.vit.cfg,
            "method": method,
            "sparsities": sparsities,
            "trainer": trainer.map(|mut t| { if let Some(a) = t.allocator.as_mut() { a.strip_state(); } t }),
        });
        let mut meta = BTreeMap::new();
        meta.insert("format".to_string(), "snella-adapter".to_string());
        st::write_atomic(&wp, &st::serialize(&tensors, &meta), true)?;
        st::write_atomic(&cp, serde_json::to_string_pretty(&config).expect("json").as_bytes(), true)?;
        Ok(())
    }

    /// Loads an adapter folder written by [`Session::save_adapter`] into this freshly loaded base
    /// model: attaches the saved method, then sets every trainable tensor, the sparsities and the
    /// allocator state.
    ///
    /// # Errors
    /// [`SnellaError::File`]/[`SnellaError::Tensor`] naming the file and tensor when something is
    /// missing or does not fit the model.
    pub fn load_adapter(&mut self, dir: &str) -> Result<()> {
        let d = Path::new(dir);
        let cp = d.join(ADAPTER_CONFIG);
        let text = std::fs::read_to_string(&cp).map_err(|e| SnellaError::file(&cp, format!("cannot read: {e}")))?;
        let cfg: serde_json::Value = serde_json::from_str(&text).map_err(|e| SnellaError::file(&cp, format!("not valid JSON: {e}")))?;
        let bad = |m: &str| SnellaError::file(&cp, m.to_string());
        if cfg.get("format").and_then(|v| v.as_str()) != Some("snella-adapter") {
            return Err(bad("field 'format' is not \"snella-adapter\""));
        }
        let method: MethodConfig = serde_json::from_value(cfg["method"].clone()).map_err(|e| bad(&format!("field 'method': {e}")))?;
        let mut f = st::read(d.join(ADAPTER_WEIGHTS))?;
        if self.method.is_none() {
            self.attach(method.clone())?;
        } else if self.method.as_ref().map(|m| m.kind) != Some(method.kind) {
            let have = self.method.as_ref().map(|m| format!("{:?}", m.kind).to_lowercase()).unwrap_or_default();
            return Err(SnellaError::config(
                "method",
                have,
                &format!(
                    "the adapter's method ({}), or a freshly loaded model: loadAdapter() attaches the adapter's method itself",
                    format!("{:?}", method.kind).to_lowercase()
                ),
            ));
        }
        let be = self.be.clone();
        for p in self.vit.params_mut() {
            if p.train.is_some() {
                let t = f.take(&p.name, &p.shape)?;
                p.value = be.upload(&t.data);
            }
        }
        let sp: BTreeMap<String, f64> = serde_json::from_value(cfg["sparsities"].clone()).map_err(|e| bad(&format!("field 'sparsities': {e}")))?;
        for k in crate::trainer::kernel_adapters_mut(&mut self.vit) {
            k.sparsity = *sp.get(&k.name).ok_or_else(|| bad(&format!("field 'sparsities' lacks layer '{}'", k.name)))?;
        }
        if !cfg["trainer"].is_null() {
            let mut t: Trainer = serde_json::from_value(cfg["trainer"].clone()).map_err(|e| bad(&format!("field 'trainer': {e}")))?;
            if let Some(a) = t.allocator.as_mut() {
                a.load_state_tensors(&mut f)?;
            }
            self.set_trainer(Some(t));
        }
        Ok(())
    }
}
