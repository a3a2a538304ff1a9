//! Training checkpoints for exact resume.
//!
//! A checkpoint is one safetensors file, `dir/checkpoint.safetensors`, so that a single atomic
//! rename publishes it (a crash or `SIGKILL` at any moment leaves either the previous complete
//! checkpoint or the new one, never a mix of two files). It holds:
//!
//! - `param.<name>`, `adam_m.<name>`, `adam_v.<name>`: every trainable tensor and its AdamW moments;
//! - `allocator.<layer>.<A|B>.<ibar|ubar>`: the allocator's per-element EMAs (SNELLA/SNELL);
//! - in the `__metadata__` key `snella_checkpoint`, a JSON object: the ViT config, the method,
//!   per-layer sparsities, the trainer (step, epoch, config, and the allocator's schedule,
//!   sparsities, history and events), a fingerprint of the frozen base weights, the
//!   [`ResumePoint`] (where the data order continues) and free-form `extra` state of the caller
//!   (the TS loop stores its batch-order seed there).
//!
//! Gradients are not stored: every backward pass overwrites them.

use crate::backend::Backend;
use crate::peft::MethodConfig;
use crate::session::Session;
use crate::trainer::{kernel_adapters, kernel_adapters_mut, Trainer};
use snella_core::st::{self, HostTensor};
use snella_core::{Result, SnellaError};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// The file name inside a checkpoint folder.
pub const CHECKPOINT_FILE: &str = "checkpoint.safetensors";
/// The `__metadata__` key holding the JSON state.
pub const STATE_KEY: &str = "snella_checkpoint";
/// The value of the checkpoint's `format` field and metadata key.
pub const FORMAT: &str = "snella-checkpoint";

/// Where training continues after a checkpoint: the next batch of the data order, which the TS
/// loop derives from `(seed, epoch)` alone.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ResumePoint {
    /// The epoch to continue in (0-based; equals `epochs` when the run is complete).
    pub epoch: usize,
    /// The index of the next batch within that epoch (batches before it are done).
    pub batch: usize,
    /// Whether `begin_epoch(epoch)` (the allocator's round) still has to be called.
    pub begin_epoch: bool,
    /// Optimizer steps taken so far.
    pub step: u64,
    /// Whether every epoch is done.
    pub finished: bool,
}

/// What [`Session::load_checkpoint`] returns.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct CheckpointInfo {
    /// Where to continue.
    pub resume: ResumePoint,
    /// The caller's state given to [`Session::save_checkpoint_with`] (`null` when none).
    pub extra: serde_json::Value,
    /// The file read.
    pub path: String,
}

/// The checkpoint file of folder `dir`.
pub fn checkpoint_path(dir: &str) -> PathBuf {
    Path::new(dir).join(CHECKPOINT_FILE)
}

/// Whether folder `dir` holds a checkpoint file.
pub fn checkpoint_exists(dir: &str) -> bool {
    checkpoint_path(dir).is_file()
}

/// The resume point of a trainer: derived from its step and epoch counters (a round is known to
/// have begun when the allocator's last history record is for the current epoch; without an
/// allocator `begin_epoch` only sets the counter, so repeating it is harmless).
pub fn resume_point(t: &Trainer) -> ResumePoint {
    let spe = t.cfg.steps_per_epoch.max(1) as u64;
    let in_epoch = t.step.saturating_sub(t.epoch as u64 * spe);
    let (epoch, batch, begin) = if in_epoch >= spe {
        (t.epoch + 1, 0, true)
    } else {
        let begun = t.allocator.as_ref().map(|a| a.history().last().map(|r| r.round) == Some(t.epoch)).unwrap_or(false);
        (t.epoch, in_epoch as usize, !begun)
    };
    let finished = epoch >= t.cfg.epochs;
    ResumePoint { epoch, batch, begin_epoch: begin && !finished, step: t.step, finished }
}

/// FNV-1a over the names, shapes and bits of the frozen tensors: detects resuming on another base
/// model of the same shape.
fn fingerprint<B: Backend>(s: &mut Session<B>) -> String {
    let be = s.be.clone();
    let mut h: u64 = 0xcbf29ce484222325;
    let mut eat = |bytes: &[u8]| {
        for &b in bytes {
            h ^= b as u64;
            h = h.wrapping_mul(0x100000001b3);
        }
    };
    for p in s.vit.params_mut() {
        if p.train.is_some() {
            continue;
        }
        eat(p.name.as_bytes());
        for d in &p.shape {
            eat(&(*d as u64).to_le_bytes());
        }
        for v in be.download(&p.value) {
            eat(&v.to_bits().to_le_bytes());
        }
    }
    format!("{h:016x}")
}

/// The first differing field of two JSON objects, as a dotted path (`allocator.s_t`).
fn first_difference(a: &serde_json::Value, b: &serde_json::Value, prefix: &str) -> Option<(String, String, String)> {
    use serde_json::Value;
    match (a, b) {
        (Value::Object(x), Value::Object(y)) => {
            let mut keys: Vec<&String> = x.keys().chain(y.keys()).collect();
            keys.sort();
            keys.dedup();
            for k in keys {
                let path = if prefix.is_empty() { k.clone() } else { format!("{prefix}.{k}") };
                let (va, vb) = (x.get(k).unwrap_or(&Value::Null), y.get(k).unwrap_or(&Value::Null));
                if let Some(d) = first_difference(va, vb, &path) {
                    return Some(d);
                }
            }
            None
        }
        _ if a == b => None,
        _ => Some((prefix.to_string(), a.to_string(), b.to_string())),
    }
}

/// Refuses a difference between the session's settings and the checkpoint's, naming the field.
fn same<T: serde::Serialize>(what: &str, ours: &T, saved: &T) -> Result<()> {
    let (a, b) = (serde_json::to_value(ours).expect("json"), serde_json::to_value(saved).expect("json"));
    match first_difference(&a, &b, "") {
        None => Ok(()),
        Some((field, x, y)) => Err(SnellaError::config(
            &format!("{what}.{field}"),
            x,
            &format!("must equal the checkpoint's value {y} to resume (start a new run, or use the same settings)"),
        )),
    }
}

impl<B: Backend> Session<B> {
    /// [`Session::save_checkpoint_with`] without caller state.
    ///
    /// # Errors
    /// See [`Session::save_checkpoint_with`].
    pub fn save_checkpoint(&mut self, dir: &str, overwrite: bool) -> Result<()> {
        self.save_checkpoint_with(dir, overwrite, serde_json::Value::Null)
    }

    /// Writes `dir/checkpoint.safetensors` atomically (temporary file, fsync, rename, fsync of the
    /// folder): everything [`Session::load_checkpoint`] needs to continue training bit-exactly,
    /// plus `extra` (any JSON the caller wants back on resume).
    ///
    /// # Errors
    /// [`SnellaError::File`] when the checkpoint exists and `overwrite` is false, or on I/O failure;
    /// [`SnellaError::Config`] without a method or a prepared trainer, or while merged;
    /// [`SnellaError::NonFinite`] naming the first trainable tensor (or AdamW moment) holding
    /// NaN/Inf: a poisoned state never replaces a good checkpoint.
    pub fn save_checkpoint_with(&mut self, dir: &str, overwrite: bool, extra: serde_json::Value) -> Result<()> {
        let method = self.method.clone().ok_or_else(|| SnellaError::config("method", "none", "attach a method before saving a checkpoint"))?;
        self.pull_importance();
        let trainer = self.trainer.clone().ok_or_else(|| SnellaError::config("trainer", "none", "call prepare() (or train()) before saving a checkpoint"))?;
        if self.vit.linears().iter().any(|l| l.original.is_some()) {
            return Err(SnellaError::config("merged", "true", "unmerge() before saving a checkpoint"));
        }
        let path = checkpoint_path(dir);
        if !overwrite && path.exists() {
            return Err(SnellaError::file(&path, "already exists; pass overwrite to replace it"));
        }
        let be = self.be.clone();
        let mut tensors = BTreeMap::new();
        for p in self.vit.params_mut() {
            let Some(t) = &p.train else { continue };
            for (kind, buf) in [("param", &p.value), ("adam_m", &t.m), ("adam_v", &t.v)] {
                if !be.all_finite(buf) {
                    let what = if kind == "param" { p.name.clone() } else { format!("{} ({kind})", p.name) };
                    return Err(SnellaError::NonFinite { tensor: what, step: trainer.step });
                }
                tensors.insert(format!("{kind}.{}", p.name), HostTensor::new(p.shape.clone(), be.download(buf)));
            }
        }
        if let Some(a) = trainer.allocator.as_ref() {
            for (name, t) in a.state_tensors() {
                tensors.insert(name, t);
            }
        }
        let sparsities: BTreeMap<String, f64> = kernel_adapters(&self.vit).iter().map(|k| (k.name.clone(), k.sparsity)).collect();
        let resume = resume_point(&trainer);
        let mut stripped = trainer;
        if let Some(a) = stripped.allocator.as_mut() {
            a.strip_state();
        }
        let state = serde_json::json!({
            "format": FORMAT,
            "version": 1,
            "base_model": self.source,
            "base_fingerprint": fingerprint(self),
            "vit": self.vit.cfg,
            "method": method,
            "sparsities": sparsities,
            "trainer": stripped,
            "resume": resume,
            "extra": extra,
        });
        let mut meta = BTreeMap::new();
        meta.insert("format".to_string(), FORMAT.to_string());
        meta.insert(STATE_KEY.to_string(), serde_json::to_string(&state).expect("json"));
        st::write_atomic(&path, &st::serialize(&tensors, &meta), overwrite)?;
        remove_stale_temporaries(&path);
        Ok(())
    }

    /// Restores a checkpoint written by [`Session::save_checkpoint`]: attaches the saved method when
    /// none is attached (else requires the same method config), installs the saved trainer (when
    /// one is prepared already, its config must equal the saved one), and sets every trainable
    /// tensor, its AdamW moments, the sparsities and the allocator state. Everything is checked
    /// before a tensor or the trainer is changed (a method attached from the checkpoint stays
    /// attached when a later check fails).
    ///
    /// # Errors
    /// [`SnellaError::File`]/[`SnellaError::Tensor`] naming the file and tensor when something is
    /// missing, malformed, left over or does not fit the model; [`SnellaError::Config`] naming the
    /// first setting that differs from the checkpoint's.
    pub fn load_checkpoint(&mut self, dir: &str) -> Result<CheckpointInfo> {
        let path = checkpoint_path(dir);
        let mut f = st::read(&path)?;
        let bad = |m: String| SnellaError::file(&path, m);
        if f.metadata.get("format").map(String::as_str) != Some(FORMAT) {
            return Err(bad(format!("metadata 'format' is not \"{FORMAT}\"; is this a snella checkpoint?")));
        }
        let text = f.metadata.get(STATE_KEY).ok_or_else(|| bad(format!("metadata '{STATE_KEY}' is missing")))?;
        let state: serde_json::Value = serde_json::from_str(text).map_err(|e| bad(format!("metadata '{STATE_KEY}' is not valid JSON: {e}")))?;
        let field = |k: &str| state.get(k).cloned().unwrap_or(serde_json::Value::Null);
        if field("version") != serde_json::json!(1) {
            return Err(bad(format!("field 'version' is {}; this build reads version 1", field("version"))));
        }
        let vit: crate::config::VitConfig = serde_json::from_value(field("vit")).map_err(|e| bad(format!("field 'vit': {e}")))?;
        if vit != self.vit.cfg {
            return Err(bad(format!("was saved from a model of another shape ({vit:?}); this model is {:?}", self.vit.cfg)));
        }
        let method: MethodConfig = serde_json::from_value(field("method")).map_err(|e| bad(format!("field 'method': {e}")))?;
        let mut trainer: Trainer = serde_json::from_value(field("trainer")).map_err(|e| bad(format!("field 'trainer': {e}")))?;
        let sp: BTreeMap<String, f64> = serde_json::from_value(field("sparsities")).map_err(|e| bad(format!("field 'sparsities': {e}")))?;
        let extra = field("extra");
        if let Some(m) = &self.method {
            same("method", m, &method)?;
        }
        if let Some(t) = &self.trainer {
            same("train", &t.cfg, &trainer.cfg)?;
        }
        if self.vit.linears().iter().any(|l| l.original.is_some()) {
            return Err(SnellaError::config("merged", "true", "unmerge() before loading a checkpoint"));
        }
        if self.method.is_none() {
            self.attach(method)?;
        }
        let fp = field("base_fingerprint");
        if fp.as_str() != Some(fingerprint(self).as_str()) {
            return Err(bad(format!(
                "was saved on other base weights (frozen-weight fingerprint {fp}; this model's is \"{}\", loaded from {}); load the base model '{}'",
                fingerprint(self),
                self.source,
                field("base_model").as_str().unwrap_or("?")
            )));
        }
        // Stage everything, then commit.
        let mut staged = Vec::new();
        for p in self.vit.params_mut() {
            if p.train.is_some() {
                let v = f.take(&format!("param.{}", p.name), &p.shape)?;
                let m = f.take(&format!("adam_m.{}", p.name), &p.shape)?;
                let s = f.take(&format!("adam_v.{}", p.name), &p.shape)?;
                staged.push((v, m, s));
            }
        }
        for k in kernel_adapters(&self.vit) {
            if !sp.contains_key(&k.name) {
                return Err(bad(format!("field 'sparsities' lacks layer '{}'", k.name)));
            }
        }
        if let Some(a) = trainer.allocator.as_mut() {
            a.load_state_tensors(&mut f)?;
            let ours: Vec<&str> = kernel_adapters(&self.vit).iter().map(|k| k.name.as_str()).collect();
            if a.names() != ours {
                return Err(bad(format!("the allocator's layers ({}) differ from the model's kernel adapters ({})", a.names().join(", "), ours.join(", "))));
            }
        }
        if let Some(left) = f.tensors.keys().min() {
            return Err(SnellaError::tensor(&f.path, left, "is not a trainable tensor of this model (wrong method or targets?)"));
        }
        let be = self.be.clone();
        let mut it = staged.into_iter();
        for p in self.vit.params_mut() {
            if let Some(t) = p.train.as_mut() {
                let (v, m, s) = it.next().expect("staged in the same order");
                p.value = be.upload(&v.data);
                t.m = be.upload(&m.data);
                t.v = be.upload(&s.data);
                be.fill_zero(&mut t.grad);
            }
        }
        for k in kernel_adapters_mut(&mut self.vit) {
            k.sparsity = sp[&k.name];
        }
        let resume = resume_point(&trainer);
        self.set_trainer(Some(trainer));
        Ok(CheckpointInfo { resume, extra, path: path.display().to_string() })
    }
}

/// Removes temporary files of [`st::write_atomic`] next to `path` left by processes that no longer
/// run (a save killed mid-write). Only on Linux, where `/proc/<pid>` says whether a process lives.
fn remove_stale_temporaries(path: &Path) {
    if !cfg!(target_os = "linux") {
        return;
    }
    let (Some(dir), Some(name)) = (path.parent(), path.file_name()) else { return };
    let prefix = format!(".{}.tmp-", name.to_string_lossy());
    let Ok(rd) = std::fs::read_dir(if dir.as_os_str().is_empty() { Path::new(".") } else { dir }) else { return };
    for e in rd.flatten() {
        let n = e.file_name().to_string_lossy().to_string();
        let Some(pid) = n.strip_prefix(&prefix).and_then(|p| p.parse::<u32>().ok()) else { continue };
        if pid != std::process::id() && !Path::new(&format!("/proc/{pid}")).exists() {
            let _ = std::fs::remove_file(e.path());
        }
    }
}
