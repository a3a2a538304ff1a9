//! `NativeModel`: a fine-tuning session (model, method, trainer) behind a mutex, with long calls
//! offered as async tasks so the Node event loop stays free.

use crate::{js_err, json_err};
use napi::bindgen_prelude::*;
use napi_derive::napi;
use serde_json::Value;
use snella_core::SnellaError;
use snella_model::backend::Backend;
use snella_model::comm::{Communicator, LocalComm};
use snella_model::cpu::CpuBackend;
use snella_model::dp::DataParallel;
use snella_model::peft::MethodConfig;
use snella_model::rendezvous::{RendezvousConfig, TcpComm};
use snella_model::session::Session;
use snella_model::trainer::{StepStats, TrainConfig};
use std::sync::{Arc, Mutex};

/// A session and, while data-parallel training is set up, its group.
pub struct Engine<B: Backend> {
    /// The model, method and trainer (rank 0 of a local group, or this process's rank).
    pub sess: Session<B>,
    /// The data-parallel group ([`NativeModel::data_parallel`], [`NativeModel::join_group`]).
    pub dp: Option<DataParallel<B>>,
}

impl<B: Backend> Engine<B> {
    fn new(sess: Session<B>) -> Self {
        Engine { sess, dp: None }
    }

    /// The session's state changed outside training: the group re-syncs before its next step.
    fn invalidate(&mut self) {
        if let Some(d) = self.dp.as_mut() {
            d.invalidate();
        }
    }

    /// One step on `x` (or, when `None`, the batch the previous step staged), staging `next` when
    /// the engine can (not in a data-parallel group, whose ranks slice host images).
    fn train_step(&mut self, x: Option<&[f32]>, y: &[u32], next: Option<&[f32]>) -> std::result::Result<StepStats, SnellaError> {
        match (self.dp.as_mut(), x) {
            (Some(d), Some(x)) => d.step(&mut self.sess, x, y),
            (Some(_), None) => Err(SnellaError::config("images", "none", "images for every step in a data-parallel group (nothing is staged there)")),
            (None, x) => self.sess.train_step_next(x, y, next),
        }
    }

    fn begin_epoch(&mut self, t: usize) -> std::result::Result<(), SnellaError> {
        match self.dp.as_mut() {
            Some(d) => d.begin_epoch(&mut self.sess, t),
            None => self.sess.begin_epoch(t),
        }
    }

    fn group_info(&self) -> Value {
        match &self.dp {
            None => Value::Null,
            Some(d) => serde_json::json!({ "kind": d.kind(), "world": d.world(), "rank": d.rank(), "localRanks": d.local_ranks() }),
        }
    }
}

/// A session on either backend (boxed: an [`Engine`] is a few KiB).
pub enum AnySession {
    /// On the CPU.
    Cpu(Box<Engine<CpuBackend>>),
    /// On a CUDA device.
    #[cfg(feature = "cuda")]
    Cuda(Box<Engine<snella_model::cuda::CudaBackend>>),
}

/// Runs `$body` with `$s` bound to the concrete session, whatever its backend.
macro_rules! dispatch {
    ($any:expr, $s:ident => $body:expr) => {
        match $any {
            AnySession::Cpu(e) => match &mut **e {
                Engine { sess: $s, .. } => $body,
            },
            #[cfg(feature = "cuda")]
            AnySession::Cuda(e) => match &mut **e {
                Engine { sess: $s, .. } => $body,
            },
        }
    };
}

/// Runs `$body` with `$e` bound to the concrete [`Engine`], whatever its backend.
macro_rules! dispatch_engine {
    ($any:expr, $e:ident => $body:expr) => {
        match $any {
            AnySession::Cpu($e) => $body,
            #[cfg(feature = "cuda")]
            AnySession::Cuda($e) => $body,
        }
    };
}

/// Checks a device list: non-empty, distinct.
fn check_devices(devices: &[usize]) -> std::result::Result<(), SnellaError> {
    let mut d = devices.to_vec();
    d.sort_unstable();
    d.dedup();
    if devices.is_empty() || d.len() != devices.len() {
        return Err(SnellaError::config("devices", format!("{devices:?}"), "a non-empty list of distinct device ordinals, e.g. [0, 1]"));
    }
    Ok(())
}

/// A local data-parallel group: on the CPU, `devices.len()` CPU ranks in this process (threads,
/// in-process communicator); on CUDA, one rank per listed GPU through NCCL.
fn local_group(a: &mut AnySession, devices: &[usize]) -> std::result::Result<(), SnellaError> {
    check_devices(devices)?;
    match a {
        AnySession::Cpu(e) => {
            let mut comms: Vec<Box<dyn Communicator<CpuBackend>>> =
                LocalComm::group(devices.len()).into_iter().map(|c| Box::new(c) as Box<dyn Communicator<CpuBackend>>).collect();
            let c0 = comms.remove(0);
            e.dp = None;
            e.dp = Some(DataParallel::local(&e.sess, c0, comms.into_iter().map(|c| (CpuBackend, c)).collect())?);
        }
        #[cfg(feature = "cuda")]
        AnySession::Cuda(e) => {
            e.dp = None;
            e.dp = Some(snella_model::nccl::cuda_group(&e.sess, devices)?);
        }
    }
    Ok(())
}

/// Joins a multi-process group as one rank: over TCP on the CPU, through NCCL on CUDA.
fn process_group(a: &mut AnySession, cfg: &RendezvousConfig) -> std::result::Result<(), SnellaError> {
    match a {
        AnySession::Cpu(e) => {
            e.dp = None;
            e.dp = Some(DataParallel::process(Box::new(TcpComm::join(cfg)?)));
        }
        #[cfg(feature = "cuda")]
        AnySession::Cuda(e) => {
            e.dp = None;
            let c = snella_model::nccl::NcclComm::join(&e.sess.be, cfg)?;
            e.dp = Some(DataParallel::process(Box::new(c)));
        }
    }
    Ok(())
}

type Shared = Arc<Mutex<Option<AnySession>>>;

fn with<T>(s: &Shared, f: impl FnOnce(&mut AnySession) -> napi::Result<T>) -> napi::Result<T> {
    let mut g = s.lock().map_err(|_| Error::new(Status::GenericFailure, "[STATE] a previous call panicked; dispose this model"))?;
    let sess = g.as_mut().ok_or_else(|| Error::new(Status::GenericFailure, "[DISPOSED] this model was disposed"))?;
    // A panic inside the engine (a CUDA launch failure, say) becomes a JS error, never a crash.
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| f(sess))).unwrap_or_else(|p| {
        let msg = p.downcast_ref::<String>().cloned().or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string())).unwrap_or_default();
        // Device errors raised inside backend ops keep their code (CUDA_OOM names the bytes asked
        // for and free); the step's parameters are only written at its end, so a smaller batch can
        // follow in the same process.
        let code = ["CUDA_OOM", "CUDA_ERROR"].into_iter().find(|c| msg.contains(c)).unwrap_or("INTERNAL");
        Err(Error::new(Status::GenericFailure, format!("[{code}] {msg}")))
    })
}

/// A ViT fine-tuning session on the CPU or a CUDA backend.
#[napi]
pub struct NativeModel {
    inner: Shared,
    live: crate::live::Tracker,
}

/// Opens `path` on `device`: `cpu`, `cuda` or `cuda:N`. (`auto` is resolved by the TS façade,
/// which tries `cuda` and falls back with the reason.)
fn open(path: &str, device: &str, precision: &str) -> std::result::Result<AnySession, SnellaError> {
    if device == "cpu" {
        return Session::load(CpuBackend, path).map(|s| AnySession::Cpu(Box::new(Engine::new(s))));
    }
    let ordinal = match device {
        "cuda" => Some(0),
        d => d.strip_prefix("cuda:").and_then(|n| n.parse::<usize>().ok()),
    };
    let Some(ordinal) = ordinal else {
        return Err(SnellaError::config("device", device, "one of 'auto', 'cpu', 'cuda', 'cuda:N'"));
    };
    open_cuda(path, ordinal, precision)
}

#[cfg(feature = "cuda")]
fn open_cuda(path: &str, ordinal: usize, precision: &str) -> std::result::Result<AnySession, SnellaError> {
    use snella_cuda::device::Precision;
    let be = snella_model::cuda::CudaBackend::new(ordinal)?;
    be.gpu.set_precision(match precision {
        "tf32" => Precision::Tf32,
        "bf16" => Precision::Bf16,
        _ => Precision::F32,
    })?;
    Session::load(be, path).map(|s| AnySession::Cuda(Box::new(Engine::new(s))))
}

#[cfg(not(feature = "cuda"))]
fn open_cuda(_path: &str, _ordinal: usize, _precision: &str) -> std::result::Result<AnySession, SnellaError> {
    Err(SnellaError::Device { code: "CUDA_UNAVAILABLE".into(), message: "this build of snella was made without the CUDA backend".into() })
}

#[napi]
impl NativeModel {
    /// Loads a timm-named ViT safetensors checkpoint on `device` (`cpu` | `cuda` | `cuda:N`);
    /// `precision` of the GEMMs on CUDA: `f32` (default, strict), `tf32` (TF32 tensor cores) or `bf16`
    /// (bf16 operands, f32 accumulation, as PyTorch's autocast); the CPU always computes in f32.
    #[napi(factory)]
    pub fn load(path: String, device: String, precision: Option<String>) -> napi::Result<Self> {
        let precision = match precision.as_deref() {
            None => "f32",
            Some(p @ ("f32" | "tf32" | "bf16")) => p,
            Some(p) => return Err(js_err(SnellaError::config("precision", p, "'f32', 'tf32' or 'bf16'"))),
        };
        let mut s = open(&path, &device, precision).map_err(js_err)?;
        let live = crate::live::Tracker::new(dispatch!(&mut s, x => x.native_bytes()));
        Ok(NativeModel { inner: Arc::new(Mutex::new(Some(s))), live })
    }

    /// Re-counts this model's bytes in [`crate::live::live_objects`] after a call that changed them.
    fn recount(&self) {
        if let Ok(b) = with(&self.inner, |a| dispatch!(a, s => Ok(s.native_bytes()))) {
            self.live.set(b);
        }
    }

    /// The backend in use: `"cpu"` or `"cuda"`.
    #[napi(getter)]
    pub fn device(&self) -> napi::Result<String> {
        with(&self.inner, |a| dispatch!(a, s => Ok(snella_model::backend::Backend::name(&s.be).to_string())))
    }

    /// The ViT configuration (JSON of `VitConfig`).
    #[napi]
    pub fn config(&self) -> napi::Result<Value> {
        with(&self.inner, |a| dispatch!(a, s => Ok(serde_json::to_value(&s.vit.cfg).expect("json"))))
    }

    /// Attaches a method (`MethodConfig` as JSON, camel-cased keys are not accepted: snake_case).
    #[napi]
    pub fn attach(&self, cfg: Value) -> napi::Result<()> {
        let mut c: MethodConfig = serde_json::from_value(cfg).map_err(|e| json_err("method config", e))?;
        if c.targets.is_empty() {
            c.targets = MethodConfig::default().targets;
        }
        let r = with(&self.inner, |a| dispatch!(a, s => s.attach(c).map_err(js_err)));
        self.recount();
        r
    }

    /// The attached method (JSON) or null.
    #[napi]
    pub fn method(&self) -> napi::Result<Value> {
        with(&self.inner, |a| dispatch!(a, s => Ok(serde_json::to_value(&s.method).expect("json"))))
    }

    /// Prepares training (`TrainConfig` as JSON, snake_case keys).
    #[napi]
    pub fn prepare(&self, cfg: Value) -> napi::Result<()> {
        let c: TrainConfig = serde_json::from_value(cfg).map_err(|e| json_err("training config", e))?;
        let r = with(&self.inner, |a| dispatch_engine!(a, e => {
            e.invalidate();
            e.sess.prepare(c).map_err(js_err)
        }));
        self.recount();
        r
    }

    /// Starts epoch `t` (the allocator's round).
    #[napi]
    pub fn begin_epoch(&self, t: u32) -> napi::Result<()> {
        with(&self.inner, |a| dispatch_engine!(a, e => e.begin_epoch(t as usize).map_err(js_err)))
    }

    /// One training step (async): images `[b,3,H,W]` f32 (or `null`: the batch the previous step
    /// staged, when it returned `staged: true`), labels `[b]`, and optionally the next batch's
    /// images, which the step copies to the device while it computes (`staged: true` in the result;
    /// not in a data-parallel group). See `Session::train_step_next`.
    #[napi(ts_return_type = "Promise<{ step: number, loss: number, correct: number, batch: number, lr: number, staged: boolean }>")]
    pub fn train_step(&self, images: Option<Float32Array>, labels: Uint32Array, next: Option<Float32Array>) -> AsyncTask<Job> {
        AsyncTask::new(Job { inner: self.inner.clone(), kind: JobKind::Train(images.map(|x| x.to_vec()), labels.to_vec(), next.map(|x| x.to_vec())) })
    }

    /// Logits `[b, classes]` (async).
    #[napi(ts_return_type = "Promise<Float32Array>")]
    pub fn predict(&self, images: Float32Array, batch: u32) -> AsyncTask<Job> {
        AsyncTask::new(Job { inner: self.inner.clone(), kind: JobKind::Predict(images.to_vec(), batch as usize) })
    }

    /// `{ lossSum, correct }` over a labelled batch (async).
    #[napi(ts_return_type = "Promise<{ lossSum: number, correct: number }>")]
    pub fn evaluate(&self, images: Float32Array, labels: Uint32Array) -> AsyncTask<Job> {
        AsyncTask::new(Job { inner: self.inner.clone(), kind: JobKind::Evaluate(images.to_vec(), labels.to_vec()) })
    }

    /// Per-layer report (JSON array of `LayerReport`).
    #[napi]
    pub fn report(&self) -> napi::Result<Value> {
        with(&self.inner, |a| dispatch!(a, s => Ok(serde_json::to_value(s.report()).expect("json"))))
    }

    /// Allocator history and events (JSON) or null.
    #[napi]
    pub fn allocator(&self) -> napi::Result<Value> {
        with(&self.inner, |a| {
            dispatch!(a, s => Ok(match s.trainer.as_ref().and_then(|t| t.allocator.as_ref()) {
                None => Value::Null,
                Some(a) => serde_json::json!({ "history": a.history(), "events": a.events() }),
            }))
        })
    }

    /// Trainer state: `{ step, epoch }` or null.
    #[napi]
    pub fn progress(&self) -> napi::Result<Value> {
        with(&self.inner, |a| dispatch!(a, s => Ok(s.trainer.as_ref().map(|t| serde_json::json!({ "step": t.step, "epoch": t.epoch })).unwrap_or(Value::Null))))
    }

    /// Device memory `{ usedBytes, totalBytes }` as the CUDA driver reports it (all users of the
    /// GPU, this process's memory pool included), or null on the CPU.
    #[napi(ts_return_type = "{ usedBytes: number, totalBytes: number } | null")]
    pub fn device_memory(&self) -> napi::Result<Value> {
        with(&self.inner, |a| match a {
            AnySession::Cpu(_) => Ok(Value::Null),
            #[cfg(feature = "cuda")]
            AnySession::Cuda(e) => {
                let s = &e.sess;
                s.be.gpu.sync().map_err(js_err)?;
                let (free, total) = s.be.gpu.ctx.mem_get_info().map_err(|e| js_err(snella_cuda::device::cuda_err("cuMemGetInfo", e)))?;
                Ok(serde_json::json!({ "usedBytes": total - free, "totalBytes": total }))
            }
        })
    }

    /// Number of trainable values.
    #[napi]
    pub fn trainable_count(&self) -> napi::Result<u32> {
        with(&self.inner, |a| dispatch!(a, s => Ok(s.trainable_count() as u32)))
    }

    /// Saves the adapter folder (atomic; refuses to overwrite unless asked).
    #[napi]
    pub fn save_adapter(&self, dir: String, overwrite: bool) -> napi::Result<()> {
        with(&self.inner, |a| dispatch!(a, s => s.save_adapter(&dir, overwrite).map_err(js_err)))
    }

    /// Loads an adapter folder into this base model.
    #[napi]
    pub fn load_adapter(&self, dir: String) -> napi::Result<()> {
        let r = with(&self.inner, |a| dispatch_engine!(a, e => {
            e.invalidate();
            e.sess.load_adapter(&dir).map_err(js_err)
        }));
        self.recount();
        r
    }

    /// Saves a training checkpoint to `dir/checkpoint.safetensors` (atomic; refuses to overwrite
    /// unless asked; refuses a non-finite state). `extra` is JSON returned by `loadCheckpoint`.
    #[napi]
    pub fn save_checkpoint(&self, dir: String, overwrite: bool, extra: Option<Value>) -> napi::Result<()> {
        let extra = extra.unwrap_or(Value::Null);
        with(&self.inner, |a| dispatch!(a, s => s.save_checkpoint_with(&dir, overwrite, extra).map_err(js_err)))
    }

    /// Loads a training checkpoint; returns `{ resume: { epoch, batch, begin_epoch, step, finished }, extra, path }`.
    #[napi]
    pub fn load_checkpoint(&self, dir: String) -> napi::Result<Value> {
        let r = with(&self.inner, |a| dispatch_engine!(a, e => {
            e.invalidate();
            e.sess.load_checkpoint(&dir).map(|i| serde_json::to_value(i).expect("json")).map_err(js_err)
        }));
        self.recount();
        r
    }

    /// Merges adapters into the weights (spec §7).
    #[napi]
    pub fn merge(&self) -> napi::Result<()> {
        let r = with(&self.inner, |a| {
            dispatch_engine!(a, e => {
                e.invalidate();
                e.sess.merge()
            });
            Ok(())
        });
        self.recount();
        r
    }

    /// Restores the original weights bit-exactly.
    #[napi]
    pub fn unmerge(&self) -> napi::Result<()> {
        let r = with(&self.inner, |a| {
            dispatch_engine!(a, e => {
                e.invalidate();
                e.sess.unmerge()
            });
            Ok(())
        });
        self.recount();
        r
    }

    /// A frozen or trainable tensor by name, as `{ shape, data }` (for tests and export).
    #[napi]
    pub fn tensor(&self, name: String) -> napi::Result<Value> {
        with(&self.inner, |a| {
            dispatch!(a, s => {
                let be = &s.be;
                let p = s.vit.params_mut().into_iter().find(|p| p.name == name).ok_or_else(|| {
                    Error::new(Status::InvalidArg, format!("[TENSOR] no tensor named '{name}'"))
                })?;
                Ok(serde_json::json!({ "shape": p.shape, "data": p.to_host(be) }))
            })
        })
    }

    /// Sets up data-parallel training inside this process (async): on CUDA one rank per GPU of
    /// `devices` (the first must be the model's own GPU; NCCL all-reduces the gradients); on the
    /// CPU `devices.length` CPU ranks (threads, in-process communicator; for testing, no speed-up).
    /// Each rank's replica loads the model's checkpoint and takes its training state before the
    /// next step. Resolves to `{ kind, world, rank, localRanks }`.
    #[napi(ts_return_type = "Promise<{ kind: string, world: number, rank: number, localRanks: number }>")]
    pub fn data_parallel(&self, devices: Vec<u32>) -> AsyncTask<Job> {
        AsyncTask::new(Job { inner: self.inner.clone(), kind: JobKind::Group(devices.into_iter().map(|d| d as usize).collect()) })
    }

    /// Joins a multi-process data-parallel group as rank `rank` of `world` through the TCP
    /// rendezvous at `rendezvous` (`host:port` of rank 0), waiting up to `timeoutSeconds` (default
    /// 600) for the others (async): NCCL on CUDA, TCP on the CPU. Resolves to the group's info.
    #[napi(ts_return_type = "Promise<{ kind: string, world: number, rank: number, localRanks: number }>")]
    pub fn join_group(&self, rendezvous: String, rank: u32, world: u32, timeout_seconds: Option<f64>) -> AsyncTask<Job> {
        let timeout = std::time::Duration::from_secs_f64(timeout_seconds.filter(|t| t.is_finite() && *t > 0.0).unwrap_or(600.0));
        let cfg = RendezvousConfig { addr: rendezvous, rank: rank as usize, world: world as usize, timeout };
        AsyncTask::new(Job { inner: self.inner.clone(), kind: JobKind::Join(cfg) })
    }

    /// Ends data-parallel training: frees the replicas and communicators. Idempotent.
    #[napi]
    pub fn leave_group(&self) -> napi::Result<()> {
        with(&self.inner, |a| {
            dispatch_engine!(a, e => e.dp = None);
            Ok(())
        })
    }

    /// Frees the model; later calls fail with `[DISPOSED]`. Idempotent.
    #[napi]
    pub fn dispose(&self) {
        if let Ok(mut g) = self.inner.lock() {
            *g = None;
        }
        self.live.release();
    }

    /// Whether [`NativeModel::dispose`] was called.
    #[napi(getter)]
    pub fn disposed(&self) -> bool {
        self.inner.lock().map(|g| g.is_none()).unwrap_or(true)
    }
}

/// The work of an async call.
pub enum JobKind {
    /// A training step.
    Train(Option<Vec<f32>>, Vec<u32>, Option<Vec<f32>>),
    /// Logits.
    Predict(Vec<f32>, usize),
    /// Loss and accuracy.
    Evaluate(Vec<f32>, Vec<u32>),
    /// A data-parallel group over these devices of this process.
    Group(Vec<usize>),
    /// Joining a multi-process group.
    Join(RendezvousConfig),
}

/// An async call on the model, run on the libuv thread pool.
pub struct Job {
    inner: Shared,
    kind: JobKind,
}

/// The result of a [`Job`].
pub enum JobOut {
    /// JSON result.
    Json(Value),
    /// Logits.
    Floats(Vec<f32>),
}

impl Task for Job {
    type Output = JobOut;
    type JsValue = Unknown<'static>;

    fn compute(&mut self) -> napi::Result<JobOut> {
        let kind = &self.kind;
        with(&self.inner, |a| {
            match kind {
                JobKind::Group(devices) => {
                    local_group(a, devices).map_err(js_err)?;
                    return Ok(JobOut::Json(dispatch_engine!(a, e => e.group_info())));
                }
                JobKind::Join(cfg) => {
                    process_group(a, cfg).map_err(js_err)?;
                    return Ok(JobOut::Json(dispatch_engine!(a, e => e.group_info())));
                }
                JobKind::Train(x, y, next) => {
                    return dispatch_engine!(a, e => e.train_step(x.as_deref(), y, next.as_deref())).map(|r| JobOut::Json(serde_json::to_value(r).expect("json"))).map_err(js_err);
                }
                _ => {}
            }
            dispatch!(a, s => match kind {
                JobKind::Group(_) | JobKind::Join(_) | JobKind::Train(..) => unreachable!("handled above"),
                JobKind::Predict(x, b) => s.predict(x, *b).map(JobOut::Floats).map_err(js_err),
                JobKind::Evaluate(x, y) => s
                    .evaluate(x, y)
                    .map(|(l, c)| JobOut::Json(serde_json::json!({ "lossSum": l, "correct": c })))
                    .map_err(js_err),
            })
        })
    }

    fn resolve(&mut self, env: Env, out: JobOut) -> napi::Result<Unknown<'static>> {
        match out {
            JobOut::Json(v) => env.to_js_value(&v).map(|u| unsafe { std::mem::transmute::<Unknown<'_>, Unknown<'static>>(u) }),
            JobOut::Floats(v) => Float32Array::new(v).into_unknown(&env).map(|u| unsafe { std::mem::transmute::<Unknown<'_>, Unknown<'static>>(u) }),
        }
    }
}
