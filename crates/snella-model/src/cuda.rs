//! The CUDA backend: f32 device buffers, cuBLAS GEMMs and the kernels of `kernels/` (feature `cuda`).
//!
//! Every method enqueues work on the one stream of [`Gpu`]; the host waits only where a result is
//! read (`download`, the loss in `cross_entropy`, `all_finite`, `kept_set`). Launch failures are
//! programming errors at this level and panic with the op name; the napi layer turns a panic into
//! a JS error and the process survives.

use crate::backend::{AdamwSlot, Backend, ImportanceSlot, Weight};
use cudarc::driver::{CudaEvent, CudaSlice};
use snella_core::ops::adamw::AdamWParams;
use snella_core::snella::sparsify::SparsifyRule;
use snella_core::snella::topk::KeptSet;
use snella_core::SnellaError;
use snella_cuda::ops::{adamw, attention, cross_entropy, ActMut, elementwise, gelu, importance, layernorm, merge, patch, reduce, sparsify, topk};
use snella_cuda::{gemm, Gpu};
use std::sync::{Arc, Mutex};

/// A layer input as the CUDA backend keeps it ([`Backend::Act`]): f32 in the f32 and TF32
/// precisions, bf16 (round to nearest even, converted once) in bf16, where every product reads it so.
pub enum CudaAct {
    /// The f32 activation.
    F32(CudaSlice<f32>),
    /// Its bf16 copy (the f32 one is dropped).
    Bf16(CudaSlice<u16>),
}

impl CudaAct {
    /// Runs `f` with the kernels' output reference to this tensor ([`snella_cuda::ops::ActMut`]).
    fn with_mut<R>(&mut self, f: impl FnOnce(snella_cuda::ops::ActMut<'_, '_>) -> R) -> R {
        match self {
            CudaAct::F32(x) => f(snella_cuda::ops::ActMut::F32(&mut x.slice_mut(..))),
            CudaAct::Bf16(x16) => f(snella_cuda::ops::ActMut::Bf16(x16)),
        }
    }
    /// Runs `f` with the kernels' reference to this tensor ([`attention::ActRef`]).
    fn with_ref<R>(&self, f: impl FnOnce(attention::ActRef<'_, '_>) -> R) -> R {
        match self {
            CudaAct::F32(x) => f(attention::ActRef::F32(&x.slice(..))),
            CudaAct::Bf16(x16) => f(attention::ActRef::Bf16(x16)),
        }
    }
}

/// The CUDA backend on one device.
#[derive(Clone)]
pub struct CudaBackend {
    /// The device.
    pub gpu: Arc<Gpu>,
    /// Per-op device timing (benchmarks only, see [`CudaBackend::enable_profile`]).
    prof: Option<Arc<Mutex<Vec<(&'static str, CudaEvent, CudaEvent)>>>>,
    /// Whether bf16 attention with head dim 64 runs fused ([`CudaBackend::flash_attention`]); true
    /// by default, false when the environment variable `SNELLA_ATTENTION=unfused` is set when the
    /// backend is made. Turning it off (before a step, never between a forward and its backward)
    /// keeps the cuBLAS products with the probabilities saved, for comparisons.
    pub fused_attention: bool,
    /// Whether a bf16 step multiplies adapted linears by `W0` and `ΔWᵀ` in two products
    /// ([`Backend::separate_delta_products`]) instead of by one bf16 effective weight `W0 + ΔWᵀ`.
    /// False by default (session 7: same accuracy over 5 seeds of the spec §8 recipe, one GEMM
    /// less per adapted linear, see `snella_model::linear`); true when the environment variable
    /// `SNELLA_DELTA_PRODUCTS=separate` is set when the backend is made (for comparisons).
    pub separate_delta: bool,
    /// Whether a bf16 step keeps each adapted linear's bf16 effective weight from forward to
    /// backward ([`Backend::keep_effective_weight`]); true by default, false rebuilds it in backward
    /// (the same bits; for comparisons and tests).
    pub keep_weight: bool,
    /// Whether a bf16 step's LayerNorm backward also writes its `dx` in bf16 for the next linear's
    /// products ([`Backend::layernorm_bwd_xhat_act`]); true by default, false leaves the conversion
    /// to the products (the same bits; for comparisons and tests).
    pub ln_bf16_dy: bool,
    /// Whether adapted linears take their kernel adapters' backward fused from the weight gradient
    /// ([`Backend::fused_adapter_bwd`]); true by default, false when the environment variable
    /// `SNELLA_ADAPTER_BWD=composed` is set when the backend is made (for comparisons and tests:
    /// the same gradients to f32 rounding, not the same bits).
    pub fused_adapter_bwd: bool,
    /// Whether a bf16 forward builds every adapted linear's effective weight up front, one launch
    /// per kernel for each group of same-shape adapters ([`Backend::batch_effective_weights`],
    /// session 10; the same bits as linear by linear, tested on an H100 in session 11). True by
    /// default; false when the environment variable `SNELLA_MERGE_BATCH` is `off` when the backend
    /// is made (linear by linear, for comparisons).
    pub batch_merge: bool,
    /// Whether a backward pass defers every kernel adapter's backward to one batched call at its
    /// end ([`Backend::batch_adapter_bwd`], session 10; it applies with the fused adapter backward;
    /// the same bits). True by default; false with `SNELLA_MERGE_BATCH=off` or `=fwd` (forward only).
    pub batch_merge_bwd: bool,
    /// Whether a bf16 step has `qkv` (with the fused attention) and `fc1` written in bf16 by their
    /// GEMMs, the bias rounded to bf16 as PyTorch's autocast does ([`Backend::linear_out_act`],
    /// session 10). True by default since session 11 (H100: 1947 → 2052 img/s; recipe 5 seeds
    /// mean 43.6% vs 42.0% with f32 outputs, same call); `SNELLA_LINEAR_OUT=f32` keeps f32 outputs
    /// converted afterwards, the bias added in f32.
    pub linear_out_bf16: bool,
}

/// One row of [`CudaBackend::profile_report`]: an op, its summed device time (ms) and its calls.
#[derive(Clone, Debug)]
pub struct OpTime {
    /// The op (Backend method; GEMMs split by operand layout).
    pub op: &'static str,
    /// Summed device time between the events around each call, ms.
    pub ms: f64,
    /// Calls.
    pub calls: usize,
}

impl CudaBackend {
    /// The LayerNorm backward from `x̂` (see [`Backend::layernorm_bwd_xhat_act`]), writing the bf16
    /// copy of `dx` into `dx16` when given.
    #[allow(clippy::too_many_arguments)]
    fn layernorm_bwd_into(&self, dy: &CudaSlice<f32>, xhat: &CudaAct, g: &CudaSlice<f32>, rstd: &CudaSlice<f32>, rows: usize, d: usize, dx: &mut CudaSlice<f32>, dx16: Option<&mut CudaSlice<u16>>, res: Option<&CudaSlice<f32>>, dg: Option<&mut CudaSlice<f32>>, db: Option<&mut CudaSlice<f32>>) {
        self.timed("layernorm_bwd", || {
            let mut dgv = dg.map(|v| v.slice_mut(..));
            let mut dbv = db.map(|v| v.slice_mut(..));
            let rv = res.map(|r| r.slice(..));
            let r = xhat.with_ref(|h| layernorm::layernorm_bwd_xhat_bf16_copy(&self.gpu, &dy.slice(..), h, &g.slice(..), &rstd.slice(..), rows, d, &mut dx.slice_mut(..), dx16, rv.as_ref(), dgv.as_mut(), dbv.as_mut()));
            ok("layernorm_bwd_xhat", r);
        })
    }

    /// An uninitialised activation of `n` values, bf16 or f32, for an op that writes all of it.
    fn act_uninit(&self, n: usize, bf16: bool) -> CudaAct {
        if bf16 {
            // SAFETY: the caller's op writes every value before anything reads it.
            CudaAct::Bf16(ok("alloc", unsafe { self.gpu.uninit::<u16>(n) }))
        } else {
            CudaAct::F32(self.empty(n))
        }
    }

    /// The attention backward into `dqkv` (f32, or bf16 from the fused kernels): the path is fixed by
    /// what `attention_input` made of `qkv` (see `attention_fwd`).
    #[allow(clippy::too_many_arguments)]
    fn attention_bwd_into(&self, dout: &CudaSlice<f32>, qkv: &CudaAct, out: &CudaAct, saved: &CudaSlice<f32>, b: usize, t: usize, h: usize, hd: usize, dqkv: ActMut) {
        let r = match (qkv, dqkv) {
            (CudaAct::Bf16(q16), d) => {
                assert_eq!(saved.len(), (b * h * t).max(1), "CUDA backend, attention_bwd: the fused forward saves the log-sum-exp [b·heads·t]");
                out.with_ref(|o| attention::flash_bwd_to(&self.gpu, &dout.slice(..), attention::ActRef::Bf16(q16), o, &saved.slice(..), b, t, h, hd, d))
            }
            (CudaAct::F32(q), ActMut::F32(d)) => attention::attention_bwd(&self.gpu, &dout.slice(..), &q.slice(..), &saved.slice(..), b, t, h, hd, d),
            (CudaAct::F32(_), ActMut::Bf16(_)) => Err(SnellaError::config("attention_bwd.dqkv", "bf16", "an f32 dqkv for an f32 qkv")),
        };
        ok("attention_bwd", r);
    }

    /// Opens CUDA device `ordinal`.
    ///
    /// # Errors
    /// `CUDA_UNAVAILABLE` naming the missing driver/library and the paths tried, or `CUDA_ERROR`.
    pub fn new(ordinal: usize) -> Result<Self, SnellaError> {
        let fused_attention = std::env::var("SNELLA_ATTENTION").map(|v| v != "unfused").unwrap_or(true);
        let separate_delta = std::env::var("SNELLA_DELTA_PRODUCTS").map(|v| v == "separate").unwrap_or(false);
        let fused_adapter_bwd = std::env::var("SNELLA_ADAPTER_BWD").map(|v| v != "composed").unwrap_or(true);
        // session 10's paths, the defaults since they ran on an H100 in session 11 (bench/PERF.md
        // "Session 11"): SNELLA_MERGE_BATCH=off|fwd, SNELLA_LINEAR_OUT=f32 go back for comparisons
        let linear_out_bf16 = std::env::var("SNELLA_LINEAR_OUT").map(|v| v != "f32").unwrap_or(true);
        let batch = std::env::var("SNELLA_MERGE_BATCH").unwrap_or_default();
        let (batch_merge, batch_merge_bwd) = (batch != "off", batch != "off" && batch != "fwd");
        Ok(CudaBackend { gpu: Gpu::new(ordinal)?, prof: None, fused_attention, separate_delta, keep_weight: true, ln_bf16_dy: true, fused_adapter_bwd, batch_merge, batch_merge_bwd, linear_out_bf16 })
    }

    /// Starts recording a pair of device events around every op (for the benchmark's per-op
    /// breakdown; it adds two event records per op, so time whole steps without it).
    pub fn enable_profile(&mut self) {
        self.prof = Some(Arc::new(Mutex::new(Vec::new())));
    }

    /// Waits for the device and returns the summed time per op since the last report (largest
    /// first), then clears the record. Empty unless [`CudaBackend::enable_profile`] was called.
    ///
    /// # Errors
    /// `CUDA_ERROR` when an event cannot be read.
    pub fn profile_report(&self) -> Result<Vec<OpTime>, SnellaError> {
        let Some(p) = &self.prof else { return Ok(Vec::new()) };
        self.gpu.sync()?;
        let evs = std::mem::take(&mut *p.lock().expect("profile"));
        let mut acc: Vec<OpTime> = Vec::new();
        for (op, a, b) in &evs {
            let ms = a.elapsed_ms(b).map_err(|e| snella_cuda::device::cuda_err("event elapsed", e))? as f64;
            match acc.iter_mut().find(|o| o.op == *op) {
                Some(o) => { o.ms += ms; o.calls += 1; }
                None => acc.push(OpTime { op, ms, calls: 1 }),
            }
        }
        acc.sort_by(|a, b| b.ms.total_cmp(&a.ms));
        Ok(acc)
    }

    /// Whether attention runs fused in bf16 ([`attention::flash_fwd`]: FlashAttention-2, only the
    /// row log-sum-exp saved): in the bf16 precision with head dim 64. In f32 and TF32 the products
    /// stay on cuBLAS with the probabilities saved (the exact path the CPU step is checked against).
    /// The precision is fixed for a training session, so a forward and its backward agree.
    pub fn flash_attention(&self, hd: usize) -> bool {
        self.fused_attention && self.gpu.precision() == snella_cuda::device::Precision::Bf16 && hd == attention::FLASH_HEAD_DIM
    }

    /// Runs `f`, between two recorded events when profiling.
    fn timed<T>(&self, op: &'static str, f: impl FnOnce() -> T) -> T {
        let Some(p) = &self.prof else { return f() };
        let ev = || ok("event", self.gpu.ctx.new_event(Some(cudarc::driver::sys::CUevent_flags::CU_EVENT_DEFAULT)).map_err(|e| snella_cuda::device::cuda_err("event", e)));
        let (a, b) = (ev(), ev());
        ok("event", a.record(&self.gpu.stream).map_err(|e| snella_cuda::device::cuda_err("event", e)));
        let r = f();
        ok("event", b.record(&self.gpu.stream).map_err(|e| snella_cuda::device::cuda_err("event", e)));
        p.lock().expect("profile").push((op, a, b));
        r
    }
}

fn ok<T>(what: &str, r: Result<T, SnellaError>) -> T {
    r.unwrap_or_else(|e| panic!("CUDA backend, {what}: {e}"))
}

#[allow(clippy::too_many_arguments)]
impl Backend for CudaBackend {
    type Buf = CudaSlice<f32>;
    type Kept = topk::CudaKept;
    type MergeSaved = merge::MergeSaved;
    type Act = CudaAct;

    fn name(&self) -> &'static str { "cuda" }
    fn zeros(&self, n: usize) -> CudaSlice<f32> { self.timed("alloc_zeros", || { ok("alloc", self.gpu.zeros(n)) }) }
    fn act(&self, x: CudaSlice<f32>) -> CudaAct {
        if self.gpu.precision() != snella_cuda::device::Precision::Bf16 || x.len() == 0 {
            return CudaAct::F32(x);
        }
        self.timed("act (to bf16)", || CudaAct::Bf16(ok("act", gemm::to_bf16(&self.gpu, &x, x.len()))))
    }
    fn upload(&self, data: &[f32]) -> CudaSlice<f32> {
        self.timed("upload", || {
            if data.is_empty() { return self.zeros(0); }
            ok("upload", self.gpu.upload(data))
        })
    }
    fn upload_beside(&self, data: &[f32]) -> CudaSlice<f32> {
        self.timed("upload beside", || ok("upload beside", self.gpu.upload_beside(data)))
    }
    fn download(&self, buf: &CudaSlice<f32>) -> Vec<f32> {
        ok("download", self.gpu.stream.clone_dtoh(buf).map_err(|e| snella_cuda::device::cuda_err("download", e)))
    }
    fn len(&self, buf: &CudaSlice<f32>) -> usize { buf.len() }
    fn copy(&self, src: &CudaSlice<f32>, so: usize, dst: &mut CudaSlice<f32>, d: usize, n: usize) {
        self.timed("copy", || {
            if n == 0 { return; }
            let s = src.slice(so..so + n);
            let mut t = dst.slice_mut(d..d + n);
            ok("copy", self.gpu.stream.memcpy_dtod(&s, &mut t).map_err(|e| snella_cuda::device::cuda_err("copy", e)));
        })
    }
    fn copy_rows(&self, src: &CudaSlice<f32>, so: usize, ss: usize, dst: &mut CudaSlice<f32>, d: usize, ds: usize, len: usize, count: usize) {
        self.timed("copy_rows", || {
            ok("copy_rows", elementwise::copy_rows(&self.gpu, &src.slice(..), so, ss, &mut dst.slice_mut(..), d, ds, len, count));
        })
    }
    fn fill_zero(&self, buf: &mut CudaSlice<f32>) {
        self.timed("fill_zero", || {
            ok("fill_zero", self.gpu.stream.memset_zeros(buf).map_err(|e| snella_cuda::device::cuda_err("memset", e)));
        })
    }
    fn gemm(&self, ta: bool, tb: bool, m: usize, n: usize, k: usize, alpha: f32, a: &CudaSlice<f32>, ao: usize, b: &CudaSlice<f32>, bo: usize, beta: f32, c: &mut CudaSlice<f32>, co: usize) {
        let (av, bv) = (a.slice(ao..), b.slice(bo..));
        let mut cv = c.slice_mut(co..);
        let name = match (ta, tb) { (false, true) => "gemm_nt (fwd)", (false, false) => "gemm_nn (dgrad)", (true, false) => "gemm_tn (wgrad)", _ => "gemm_tt" };
        self.timed(name, || ok("gemm", gemm::gemm(&self.gpu, ta, tb, m, n, k, alpha, &av, &bv, beta, &mut cv)));
    }
    fn linear_fwd(&self, x: &CudaAct, w: Weight<'_, Self>, delta: Option<&CudaSlice<f32>>, bias: &CudaSlice<f32>, residual: Option<&CudaSlice<f32>>, rows: usize, n_in: usize, n_out: usize, y: &mut CudaSlice<f32>) {
        self.timed("linear_fwd (+ bias, residual)", || {
            let rv = residual.map(|r| r.slice(..));
            let r = match x {
                CudaAct::F32(x) => gemm::linear_fwd(&self.gpu, &x.slice(..), wt(w), delta, &bias.slice(..), rv.as_ref(), rows, n_in, n_out, &mut y.slice_mut(..)),
                CudaAct::Bf16(x16) => gemm::linear_fwd_bf16x(&self.gpu, x16, wt(w), delta, &bias.slice(..), rv.as_ref(), rows, n_in, n_out, &mut y.slice_mut(..)),
            };
            ok("linear_fwd", r);
        })
    }
    fn linear_fwd_act(&self, x: &CudaAct, w: Weight<'_, Self>, delta: Option<&CudaSlice<f32>>, bias: &CudaSlice<f32>, rows: usize, n_in: usize, n_out: usize) -> CudaAct {
        match (x, delta) {
            (CudaAct::Bf16(x16), None) if self.gpu.precision() == snella_cuda::device::Precision::Bf16 && self.linear_out_bf16 => {
                self.timed("linear_fwd (+ bias, bf16 out)", || {
                    // SAFETY: the GEMM writes all rows·n_out values.
                    let mut y16 = ok("alloc", unsafe { self.gpu.uninit::<u16>(rows * n_out) });
                    ok("linear_fwd_bf16_out", gemm::linear_fwd_bf16_out(&self.gpu, x16, wt(w), &bias.slice(..), rows, n_in, n_out, &mut y16));
                    CudaAct::Bf16(y16)
                })
            }
            _ => crate::backend::linear_fwd_f32_act(self, x, w, delta, bias, rows, n_in, n_out),
        }
    }
    fn linear_out_act(&self, hd: usize) -> (bool, bool) {
        let on = self.linear_out_bf16 && self.gpu.precision() == snella_cuda::device::Precision::Bf16;
        (on, on && self.flash_attention(hd))
    }
    fn linear_bwd_products(&self, dy: &CudaSlice<f32>, w: Weight<'_, Self>, x: &CudaAct, rows: usize, n_in: usize, n_out: usize, dx: Option<&mut CudaSlice<f32>>, gt: Option<&mut CudaSlice<f32>>) {
        self.timed("linear_bwd_products (dgrad + wgrad)", || {
            let mut dxv = dx.map(|v| v.slice_mut(..));
            let mut gtv = gt.map(|v| v.slice_mut(..));
            let r = match x {
                CudaAct::F32(x) => gemm::linear_bwd_products(&self.gpu, &dy.slice(..), wt(w), &x.slice(..), rows, n_in, n_out, dxv.as_mut(), gtv.as_mut()),
                CudaAct::Bf16(x16) => gemm::linear_bwd_products_bf16x(&self.gpu, &dy.slice(..), wt(w), Some(x16), rows, n_in, n_out, dxv.as_mut(), gtv.as_mut()),
            };
            ok("linear_bwd_products", r);
        })
    }
    fn check_kernel_pieces(&self, heads: usize, rh: usize) -> Result<(), SnellaError> {
        merge::check_pieces(heads, rh).map(|_| ())
    }
    fn linear_bwd_products_act(&self, dy: &CudaAct, w: Weight<'_, Self>, x: &CudaAct, rows: usize, n_in: usize, n_out: usize, dx: Option<&mut CudaSlice<f32>>, gt: Option<&mut CudaSlice<f32>>) {
        match (dy, x) {
            (CudaAct::F32(dy), _) => self.linear_bwd_products(dy, w, x, rows, n_in, n_out, dx, gt),
            (CudaAct::Bf16(dy16), x) => self.timed("linear_bwd_products (dgrad + wgrad)", || {
                let mut dxv = dx.map(|v| v.slice_mut(..));
                let mut gtv = gt.map(|v| v.slice_mut(..));
                // a bf16 dy comes from a bf16 step, whose linear inputs are bf16 too (an empty one
                // may stay f32: converted here)
                let conv;
                let x16 = match x {
                    CudaAct::Bf16(x16) => x16,
                    CudaAct::F32(x) => {
                        conv = ok("linear_bwd_products x", gemm::to_bf16(&self.gpu, x, x.len()));
                        &conv
                    }
                };
                ok("linear_bwd_products", gemm::linear_bwd_products_bf16(&self.gpu, dy16, wt(w), Some(x16), rows, n_in, n_out, dxv.as_mut(), gtv.as_mut()));
            }),
        }
    }
    fn add_assign(&self, y: &mut CudaSlice<f32>, x: &CudaSlice<f32>) {
        self.timed("add_assign", || {
            let n = y.len();
            ok("add_assign", elementwise::add_assign(&self.gpu, &mut y.slice_mut(..), &x.slice(..), n));
        })
    }
    fn add_bias(&self, y: &mut CudaSlice<f32>, bias: &CudaSlice<f32>, rows: usize, cols: usize) {
        self.timed("add_bias", || {
            ok("add_bias", elementwise::add_bias(&self.gpu, &mut y.slice_mut(..), &bias.slice(..), rows, cols));
        })
    }
    fn bias_grad(&self, dy: &CudaSlice<f32>, rows: usize, cols: usize, db: &mut CudaSlice<f32>, acc: bool) {
        self.timed("bias_grad", || {
            ok("bias_grad", reduce::bias_grad(&self.gpu, &dy.slice(..), rows, cols, &mut db.slice_mut(..), acc));
        })
    }
    fn transpose(&self, src: &CudaSlice<f32>, so: usize, rows: usize, cols: usize, dst: &mut CudaSlice<f32>, d: usize, acc: bool) {
        self.timed("transpose", || {
            let s = src.slice(so..so + rows * cols);
            let mut t = dst.slice_mut(d..d + rows * cols);
            ok("transpose", elementwise::transpose(&self.gpu, &s, rows, cols, &mut t, acc));
        })
    }
    fn layernorm_fwd(&self, x: &CudaSlice<f32>, g: &CudaSlice<f32>, b: &CudaSlice<f32>, rows: usize, d: usize, eps: f32, y: &mut CudaSlice<f32>, mean: &mut CudaSlice<f32>, rstd: &mut CudaSlice<f32>) {
        self.timed("layernorm_fwd", || {
            ok("layernorm_fwd", layernorm::layernorm_fwd(&self.gpu, &x.slice(..), &g.slice(..), &b.slice(..), rows, d, eps, &mut y.slice_mut(..), &mut mean.slice_mut(..), &mut rstd.slice_mut(..)));
        })
    }
    fn layernorm_bwd(&self, dy: &CudaSlice<f32>, x: &CudaSlice<f32>, g: &CudaSlice<f32>, mean: &CudaSlice<f32>, rstd: &CudaSlice<f32>, rows: usize, d: usize, dx: &mut CudaSlice<f32>, dg: Option<&mut CudaSlice<f32>>, db: Option<&mut CudaSlice<f32>>) {
        self.timed("layernorm_bwd", || {
            let mut dgv = dg.map(|v| v.slice_mut(..));
            let mut dbv = db.map(|v| v.slice_mut(..));
            ok("layernorm_bwd", layernorm::layernorm_bwd(&self.gpu, &dy.slice(..), &x.slice(..), &g.slice(..), &mean.slice(..), &rstd.slice(..), rows, d, &mut dx.slice_mut(..), dgv.as_mut(), dbv.as_mut()));
        })
    }
    fn layernorm_fwd_xhat(&self, x: &CudaSlice<f32>, g: &CudaSlice<f32>, b: &CudaSlice<f32>, rows: usize, d: usize, eps: f32, rstd: &mut CudaSlice<f32>) -> (CudaAct, CudaAct) {
        let bf16 = self.gpu.precision() == snella_cuda::device::Precision::Bf16;
        self.timed(if bf16 { "layernorm_fwd (bf16 out, x̂ kept)" } else { "layernorm_fwd (x̂ kept)" }, || {
            let (mut y, mut xhat) = (self.act_uninit(rows * d, bf16), self.act_uninit(rows * d, bf16));
            let r = y.with_mut(|yv| xhat.with_mut(|hv| layernorm::layernorm_fwd_xhat(&self.gpu, &x.slice(..), &g.slice(..), &b.slice(..), rows, d, eps, yv, hv, &mut rstd.slice_mut(..))));
            ok("layernorm_fwd_xhat", r);
            (y, xhat)
        })
    }
    fn layernorm_affine_act(&self, xhat: &CudaAct, g: &CudaSlice<f32>, b: &CudaSlice<f32>, rows: usize, d: usize) -> CudaAct {
        self.timed("layernorm_affine (rebuild)", || {
            let mut y = self.act_uninit(rows * d, matches!(xhat, CudaAct::Bf16(_)));
            let r = xhat.with_ref(|h| y.with_mut(|yv| layernorm::layernorm_affine(&self.gpu, h, &g.slice(..), &b.slice(..), rows, d, yv)));
            ok("layernorm_affine", r);
            y
        })
    }
    fn layernorm_bwd_xhat(&self, dy: &CudaSlice<f32>, xhat: &CudaAct, g: &CudaSlice<f32>, rstd: &CudaSlice<f32>, rows: usize, d: usize, dx: &mut CudaSlice<f32>, res: Option<&CudaSlice<f32>>, dg: Option<&mut CudaSlice<f32>>, db: Option<&mut CudaSlice<f32>>) {
        self.layernorm_bwd_into(dy, xhat, g, rstd, rows, d, dx, None, res, dg, db);
    }
    fn layernorm_bwd_xhat_act(&self, dy: &CudaSlice<f32>, xhat: &CudaAct, g: &CudaSlice<f32>, rstd: &CudaSlice<f32>, rows: usize, d: usize, dx: &mut CudaSlice<f32>, res: Option<&CudaSlice<f32>>, dg: Option<&mut CudaSlice<f32>>, db: Option<&mut CudaSlice<f32>>) -> Option<CudaAct> {
        if !self.ln_bf16_dy || self.gpu.precision() != snella_cuda::device::Precision::Bf16 || rows * d == 0 {
            self.layernorm_bwd_into(dy, xhat, g, rstd, rows, d, dx, None, res, dg, db);
            return None;
        }
        // SAFETY: the kernel writes all rows·d values.
        let mut dx16 = ok("alloc", unsafe { self.gpu.uninit::<u16>(rows * d) });
        self.layernorm_bwd_into(dy, xhat, g, rstd, rows, d, dx, Some(&mut dx16), res, dg, db);
        Some(CudaAct::Bf16(dx16))
    }
    fn gelu_fwd_keep(&self, x: CudaSlice<f32>, n: usize) -> (CudaAct, CudaAct) {
        if self.gpu.precision() != snella_cuda::device::Precision::Bf16 || n == 0 {
            let mut y = self.empty(n);
            self.gelu_fwd(&x, &mut y);
            return (CudaAct::F32(x), self.act(y));
        }
        self.timed("gelu_fwd (bf16 out, bf16 input kept)", || {
            // SAFETY: the kernel writes all n values of both.
            let mut xk = ok("alloc", unsafe { self.gpu.uninit::<u16>(n) });
            let mut y16 = ok("alloc", unsafe { self.gpu.uninit::<u16>(n) });
            ok("gelu_fwd_keep_bf16", gelu::gelu_fwd_keep_bf16(&self.gpu, &x.slice(..n), &mut xk, &mut y16));
            (CudaAct::Bf16(xk), CudaAct::Bf16(y16))
        })
    }
    fn gelu_fwd_from(&self, x: &CudaAct, n: usize) -> CudaAct {
        match x {
            CudaAct::F32(x) => {
                let mut y = self.empty(n);
                self.gelu_fwd(x, &mut y);
                CudaAct::F32(y)
            }
            CudaAct::Bf16(xk) => self.timed("gelu_fwd (rebuild, bf16)", || {
                // SAFETY: the kernel writes all n values.
                let mut y16 = ok("alloc", unsafe { self.gpu.uninit::<u16>(n) });
                ok("gelu_fwd_from_bf16", gelu::gelu_fwd_from_bf16(&self.gpu, xk, n, &mut y16));
                CudaAct::Bf16(y16)
            }),
        }
    }
    fn gelu_bwd_act(&self, x: &CudaAct, dy: &CudaSlice<f32>, dx: &mut CudaSlice<f32>) {
        match x {
            CudaAct::F32(x) => self.gelu_bwd(x, dy, dx),
            CudaAct::Bf16(xk) => self.timed("gelu_bwd (bf16 input)", || {
                ok("gelu_bwd_bf16x", gelu::gelu_bwd_bf16x(&self.gpu, xk, &dy.slice(..), &mut dx.slice_mut(..)));
            }),
        }
    }
    fn gelu_bwd_to_act(&self, x: &CudaAct, dy: &CudaSlice<f32>) -> CudaAct {
        match x {
            CudaAct::Bf16(xk) => self.timed("gelu_bwd (bf16 input, bf16 dx)", || {
                // SAFETY: the kernel writes every one of the dy.len() values
                let mut dx = ok("alloc", unsafe { self.gpu.uninit::<u16>(dy.len()) });
                ok("gelu_bwd_bf16x_g16", gelu::gelu_bwd_bf16x_g16(&self.gpu, xk, &dy.slice(..), &mut dx));
                CudaAct::Bf16(dx)
            }),
            CudaAct::F32(_) => {
                let mut dx = self.empty(dy.len());
                self.gelu_bwd_act(x, dy, &mut dx);
                self.act(dx)
            }
        }
    }
    fn gelu_fwd(&self, x: &CudaSlice<f32>, y: &mut CudaSlice<f32>) {
        self.timed("gelu_fwd", || {
            ok("gelu_fwd", gelu::gelu_fwd(&self.gpu, &x.slice(..), &mut y.slice_mut(..)));
        })
    }
    fn gelu_bwd(&self, x: &CudaSlice<f32>, dy: &CudaSlice<f32>, dx: &mut CudaSlice<f32>) {
        self.timed("gelu_bwd", || {
            ok("gelu_bwd", gelu::gelu_bwd(&self.gpu, &x.slice(..), &dy.slice(..), &mut dx.slice_mut(..)));
        })
    }
    fn attention_input(&self, qkv: CudaSlice<f32>, hd: usize) -> CudaAct {
        if !self.flash_attention(hd) || qkv.len() == 0 {
            return CudaAct::F32(qkv);
        }
        self.timed("act (to bf16)", || CudaAct::Bf16(ok("attention_input", gemm::to_bf16(&self.gpu, &qkv, qkv.len()))))
    }
    // The path is fixed by what `attention_input` made of qkv: bf16 (fused attention, `saved` =
    // lse2 [b·h·t]) or f32 (cuBLAS products, `saved` = P [b·h·t·t]), so a forward and its backward
    // cannot disagree even if `fused_attention` or the precision changed in between.
    fn attention_fwd(&self, qkv: &CudaAct, b: usize, t: usize, h: usize, hd: usize) -> (CudaAct, CudaSlice<f32>) {
        let n = b * t * h * hd;
        match qkv {
            // fused: the output is written in bf16 directly (the proj linear's input)
            CudaAct::Bf16(q16) => {
                let mut saved = self.empty(b * h * t);
                let mut out = self.act_uninit(n, true);
                self.timed("attention_fwd", || {
                    let r = out.with_mut(|o| attention::flash_fwd(&self.gpu, attention::ActRef::Bf16(q16), b, t, h, hd, o, &mut saved.slice_mut(..)));
                    ok("attention_fwd", r);
                });
                (out, saved)
            }
            CudaAct::F32(q) => {
                let (mut out, mut saved) = (self.empty(n), self.empty(b * h * t * t));
                self.timed("attention_fwd", || {
                    ok("attention_fwd", attention::attention_fwd(&self.gpu, &q.slice(..), b, t, h, hd, &mut out.slice_mut(..), &mut saved.slice_mut(..)));
                });
                (self.act(out), saved)
            }
        }
    }
    fn attention_bwd(&self, dout: &CudaSlice<f32>, qkv: &CudaAct, out: &CudaAct, saved: &CudaSlice<f32>, b: usize, t: usize, h: usize, hd: usize, dqkv: &mut CudaSlice<f32>) {
        self.timed("attention_bwd", || self.attention_bwd_into(dout, qkv, out, saved, b, t, h, hd, ActMut::F32(&mut dqkv.slice_mut(..))))
    }
    fn attention_bwd_to_act(&self, dout: &CudaSlice<f32>, qkv: &CudaAct, out: &CudaAct, saved: &CudaSlice<f32>, b: usize, t: usize, h: usize, hd: usize) -> CudaAct {
        // the fused kernels write dqkv in bf16 from a bf16 qkv; the cuBLAS path writes f32
        let mut dqkv = self.act_uninit(b * t * 3 * h * hd, matches!(qkv, CudaAct::Bf16(_)));
        self.timed("attention_bwd", || dqkv.with_mut(|d| self.attention_bwd_into(dout, qkv, out, saved, b, t, h, hd, d)));
        match dqkv {
            CudaAct::F32(d) => self.act(d),
            d16 => d16,
        }
    }
    fn cross_entropy(&self, logits: &CudaSlice<f32>, labels: &[u32], b: usize, c: usize, dl: &mut CudaSlice<f32>) -> (f32, usize) {
        self.timed("cross_entropy", || {
            let lab = ok("labels", self.gpu.stream.clone_htod(labels).map_err(|e| self.gpu.oom(labels.len() * 4, e)));
            let mut stats = self.zeros(2);
            ok("cross_entropy", cross_entropy::cross_entropy(&self.gpu, &logits.slice(..), &lab.slice(..), b, c, &mut dl.slice_mut(..), &mut stats.slice_mut(..)));
            let s = self.download(&stats);
            (s[0], s[1] as usize)
        })
    }
    fn im2col(&self, images: &CudaSlice<f32>, b: usize, ch: usize, h: usize, w: usize, p: usize, cols: &mut CudaSlice<f32>) {
        self.timed("im2col", || {
            ok("im2col", patch::im2col(&self.gpu, &images.slice(..), b, ch, h, w, p, &mut cols.slice_mut(..)));
        })
    }
    fn importance_update(&self, p: &CudaSlice<f32>, g: &CudaSlice<f32>, ibar: &mut CudaSlice<f32>, ubar: &mut CudaSlice<f32>, beta1: f32, beta2: f32, bad: &mut CudaSlice<f32>, slot: usize) {
        self.timed("importance_update", || {
            ok("importance_update", importance::importance_update(&self.gpu, &p.slice(..), &g.slice(..), &mut ibar.slice_mut(..), &mut ubar.slice_mut(..), beta1, beta2, &mut bad.slice_mut(slot..slot + 1)));
        })
    }
    fn importance_update_many(&self, slots: &mut [ImportanceSlot<'_, Self>], beta1: f32, beta2: f32, bad: &mut CudaSlice<f32>) {
        self.timed("importance_update_many", || {
            let mut ts: Vec<importance::ImportanceTensor<'_>> =
                slots.iter_mut().map(|s| importance::ImportanceTensor { p: s.p, g: s.g, ibar: &mut *s.ibar, ubar: &mut *s.ubar, slot: s.slot }).collect();
            ok("importance_update_many", importance::importance_update_multi(&self.gpu, &mut ts, beta1, beta2, bad));
        })
    }
    fn adamw(&self, param: &mut CudaSlice<f32>, grad: &CudaSlice<f32>, m: &mut CudaSlice<f32>, v: &mut CudaSlice<f32>, h: &AdamWParams) {
        self.timed("adamw", || {
            ok("adamw", adamw::adamw_step(&self.gpu, &mut param.slice_mut(..), &grad.slice(..), &mut m.slice_mut(..), &mut v.slice_mut(..), h));
        })
    }
    fn merge_fwd(&self, a: &CudaSlice<f32>, b: &CudaSlice<f32>, heads: usize, n_in: usize, n_out: usize, rh: usize, mix: Option<&CudaSlice<f32>>, m: &mut CudaSlice<f32>) {
        self.timed("merge_fwd", || {
            let mv = mix.map(|x| x.slice(..));
            ok("merge_fwd", merge::merge_fwd(&self.gpu, &a.slice(..), &b.slice(..), heads, n_in, n_out, rh, mv.as_ref(), &mut m.slice_mut(..)));
        })
    }
    fn merge_fwd_select(&self, a: &CudaSlice<f32>, b: &CudaSlice<f32>, heads: usize, n_in: usize, n_out: usize, rh: usize, mix: Option<&CudaSlice<f32>>, m: &mut CudaSlice<f32>, k: usize) -> topk::CudaKept {
        self.timed("merge_fwd + select_topk", || {
            let mv = mix.map(|x| x.slice(..));
            ok("merge_fwd_select", merge::merge_fwd_select(&self.gpu, &a.slice(..), &b.slice(..), heads, n_in, n_out, rh, mv.as_ref(), &mut m.slice_mut(..), k))
        })
    }
    fn merge_bwd(&self, a: &CudaSlice<f32>, b: &CudaSlice<f32>, heads: usize, n_in: usize, n_out: usize, rh: usize, mix: Option<&CudaSlice<f32>>, dm: &CudaSlice<f32>, da: &mut CudaSlice<f32>, db: &mut CudaSlice<f32>, dmix: Option<&mut CudaSlice<f32>>) {
        self.timed("merge_bwd", || {
            let mv = mix.map(|x| x.slice(..));
            let mut dmv = dmix.map(|x| x.slice_mut(..));
            ok("merge_bwd", merge::merge_bwd(&self.gpu, &a.slice(..), &b.slice(..), heads, n_in, n_out, rh, mv.as_ref(), &dm.slice(..), &mut da.slice_mut(..), &mut db.slice_mut(..), dmv.as_mut()));
        })
    }
    fn merge_fwd_saving(&self, a: &CudaSlice<f32>, b: &CudaSlice<f32>, heads: usize, n_in: usize, n_out: usize, rh: usize, mix: Option<&CudaSlice<f32>>, m: &mut CudaSlice<f32>) -> Option<merge::MergeSaved> {
        self.timed("merge_fwd_saving", || {
            let mv = mix.map(|x| x.slice(..));
            Some(ok("merge_fwd_saving", merge::merge_fwd_saving(&self.gpu, &a.slice(..), &b.slice(..), heads, n_in, n_out, rh, mv.as_ref(), &mut m.slice_mut(..))))
        })
    }
    fn merge_bwd_saved(&self, saved: Option<&merge::MergeSaved>, a: &CudaSlice<f32>, b: &CudaSlice<f32>, heads: usize, n_in: usize, n_out: usize, rh: usize, mix: Option<&CudaSlice<f32>>, dm: &CudaSlice<f32>, da: &mut CudaSlice<f32>, db: &mut CudaSlice<f32>, dmix: Option<&mut CudaSlice<f32>>) {
        self.timed("merge_bwd", || {
            let mv = mix.map(|x| x.slice(..));
            let mut dmv = dmix.map(|x| x.slice_mut(..));
            ok("merge_bwd", merge::merge_bwd_saved(&self.gpu, saved, &a.slice(..), &b.slice(..), heads, n_in, n_out, rh, mv.as_ref(), &dm.slice(..), &mut da.slice_mut(..), &mut db.slice_mut(..), dmv.as_mut()));
        })
    }
    fn select_topk(&self, m: &CudaSlice<f32>, k: usize) -> topk::CudaKept {
        self.timed("select_topk", || {
            ok("select_topk", topk::select_topk(&self.gpu, &m.slice(..), m.len(), k))
        })
    }
    fn kept_set(&self, kept: &topk::CudaKept) -> KeptSet {
        ok("kept_set", topk::kept_to_host(&self.gpu, kept))
    }
    fn sparsify_fwd(&self, m: &CudaSlice<f32>, set: &topk::CudaKept, rule: SparsifyRule, dw: &mut CudaSlice<f32>) {
        self.timed("sparsify_fwd", || {
            ok("sparsify_fwd", sparsify::sparsify_fwd(&self.gpu, &m.slice(..), set, rule, &mut dw.slice_mut(..)));
        })
    }
    fn sparsify_bwd(&self, m: &CudaSlice<f32>, set: &topk::CudaKept, rule: SparsifyRule, g: &CudaSlice<f32>, dm: &mut CudaSlice<f32>) {
        self.timed("sparsify_bwd", || {
            ok("sparsify_bwd", sparsify::sparsify_bwd(&self.gpu, &m.slice(..), set, rule, &g.slice(..), &mut dm.slice_mut(..)));
        })
    }
    fn sparsify_into_weight(&self, m: &CudaSlice<f32>, set: &topk::CudaKept, rule: SparsifyRule, w0: Option<(&CudaSlice<f32>, usize)>, n_in: usize, c: usize, w: &mut CudaSlice<f32>, w_off: usize) {
        self.timed("sparsify_into_weight", || {
            let n = n_in * c;
            let w0v = w0.map(|(b, off)| b.slice(off..off + n));
            ok("sparsify_into_weight", sparsify::sparsify_into_weight(&self.gpu, &m.slice(..), set, rule, w0v.as_ref(), n_in, c, &mut w.slice_mut(w_off..w_off + n)));
        })
    }
    fn effective_weight_act(&self, w0: &CudaSlice<f32>, chunks: &[(&CudaSlice<f32>, &topk::CudaKept, SparsifyRule)], n_in: usize, c: usize) -> CudaAct {
        let n = c * n_in;
        if self.gpu.precision() != snella_cuda::device::Precision::Bf16 || chunks.is_empty() || n == 0 {
            return crate::backend::effective_weight_f32(self, w0, chunks, n_in, c);
        }
        self.timed("sparsify_into_weight (bf16)", || {
            // SAFETY: every chunk's n values are written below (the kernel covers [c, n_in] whole).
            let mut w = ok("alloc", unsafe { self.gpu.uninit::<u16>(chunks.len() * n) });
            for (i, &(m, set, rule)) in chunks.iter().enumerate() {
                let w0v = w0.slice(i * n..(i + 1) * n);
                ok("sparsify_into_weight_bf16", sparsify::sparsify_into_weight_bf16(&self.gpu, &m.slice(..), set, rule, &w0v, n_in, c, &mut w, i * n));
            }
            CudaAct::Bf16(w)
        })
    }
    fn batch_effective_weights(&self) -> bool {
        self.batch_merge && self.keep_effective_weight() && !self.separate_delta
    }
    fn effective_weights(&self, layers: &[crate::backend::WeightJob<'_, Self>]) -> Vec<(CudaAct, Vec<topk::CudaKept>)> {
        if self.gpu.precision() != snella_cuda::device::Precision::Bf16 {
            return crate::backend::effective_weights_each(self, layers);
        }
        self.timed("effective_weights (batched merge + select + bf16 weight)", || {
            use snella_cuda::ops::merge_batch::{AdapterJob, LayerJob};
            let jobs: Vec<LayerJob<'_>> = layers
                .iter()
                .map(|l| LayerJob {
                    w0: l.w0.slice(..),
                    n_in: l.n_in,
                    c: l.c,
                    chunks: l.chunks.iter().map(|j| AdapterJob { a: j.a.slice(..), b: j.b.slice(..), mix: j.mix.map(|x| x.slice(..)), heads: j.heads, rh: j.rh, k: j.k, rule: j.rule }).collect(),
                })
                .collect();
            let r = ok("effective_weights", snella_cuda::ops::merge_batch::effective_weights_bf16(&self.gpu, &jobs));
            r.into_iter().map(|(w, sets)| (CudaAct::Bf16(w), sets)).collect()
        })
    }
    fn sparsify_bwd_from_weight(&self, gt: &CudaSlice<f32>, gt_off: usize, m: &CudaSlice<f32>, set: &topk::CudaKept, rule: SparsifyRule, n_in: usize, c: usize, gh: &mut CudaSlice<f32>) {
        self.timed("sparsify_bwd_from_weight", || {
            let n = n_in * c;
            ok("sparsify_bwd_from_weight", sparsify::sparsify_bwd_from_weight(&self.gpu, &gt.slice(gt_off..gt_off + n), &m.slice(..), set, rule, n_in, c, &mut gh.slice_mut(..)));
        })
    }
    fn fused_adapter_bwd(&self) -> bool {
        self.fused_adapter_bwd
    }
    fn linear_bwd_products_g(&self, dy: &CudaAct, w: Weight<'_, Self>, x: &CudaAct, rows: usize, n_in: usize, n_out: usize, dx: Option<&mut CudaSlice<f32>>, g: &mut CudaSlice<f32>) {
        let (CudaAct::Bf16(dy16), CudaAct::Bf16(x16)) = (dy, x) else {
            // f32 operands: the products into gt, then its transpose
            return crate::backend::linear_bwd_products_g_composed(self, dy, w, x, rows, n_in, n_out, dx, g);
        };
        self.timed("linear_bwd_products (dgrad + wgrad)", || {
            let mut dxv = dx.map(|v| v.slice_mut(..));
            let mut gv = g.slice_mut(..);
            ok("linear_bwd_products", gemm::linear_bwd_products_bf16_g(&self.gpu, dy16, wt(w), x16, rows, n_in, n_out, dxv.as_mut(), &mut gv));
        })
    }
    fn batch_adapter_bwd(&self) -> bool {
        self.batch_merge_bwd && self.fused_adapter_bwd
    }
    fn adapter_bwd_batch(&self, jobs: &mut [crate::backend::GradJob<'_, Self>]) {
        self.timed("merge_bwd (from the weight gradient, batched)", || {
            use snella_cuda::ops::merge_batch::GradJob;
            let mut views: Vec<GradJob<'_, '_>> = jobs
                .iter_mut()
                .map(|j| GradJob {
                    g: j.g.slice(j.off..),
                    ld: j.ld,
                    kept: j.set,
                    rule: j.rule,
                    a: j.a.slice(..),
                    b: j.b.slice(..),
                    heads: j.heads,
                    n_in: j.n_in,
                    c: j.c,
                    rh: j.rh,
                    mix: j.mix.map(|x| x.slice(..)),
                    da: j.da.slice_mut(..),
                    db: j.db.slice_mut(..),
                    dmix: j.dmix.as_mut().map(|d| d.slice_mut(..)),
                })
                .collect();
            ok("adapter_bwd_batch", snella_cuda::ops::merge_batch::adapter_bwd_batch(&self.gpu, &mut views));
        })
    }
    fn adapter_bwd_from_grad(
        &self, g: &CudaSlice<f32>, off: usize, ld: usize, set: &topk::CudaKept, rule: SparsifyRule, a: &CudaSlice<f32>, b: &CudaSlice<f32>, heads: usize,
        n_in: usize, c: usize, rh: usize, mix: Option<&CudaSlice<f32>>, da: &mut CudaSlice<f32>, db: &mut CudaSlice<f32>, dmix: Option<&mut CudaSlice<f32>>,
    ) {
        self.timed("merge_bwd (from the weight gradient)", || {
            let mv = mix.map(|x| x.slice(..));
            let mut dmv = dmix.map(|x| x.slice_mut(..));
            let r = merge::merge_bwd_from_grad(
                &self.gpu, &a.slice(..), &b.slice(..), heads, n_in, c, rh, mv.as_ref(), &g.slice(off..), ld, set, rule,
                &mut da.slice_mut(..), &mut db.slice_mut(..), dmv.as_mut(),
            );
            ok("merge_bwd_from_grad", r);
        })
    }
    fn separate_delta_products(&self) -> bool {
        self.separate_delta && self.gpu.precision() == snella_cuda::device::Precision::Bf16
    }
    fn keep_effective_weight(&self) -> bool {
        // the bf16 copy the products read (half the f32 weight), kept instead of rebuilt
        self.keep_weight && self.gpu.precision() == snella_cuda::device::Precision::Bf16
    }
    fn empty(&self, n: usize) -> CudaSlice<f32> {
        // SAFETY: callers (Backend::empty's contract) write every element before reading it.
        ok("alloc", unsafe { self.gpu.uninit::<f32>(n) })
    }
    fn first_non_finite(&self, xs: &[&CudaSlice<f32>]) -> Option<usize> {
        self.timed("first_non_finite", || ok("all_finite", reduce::first_non_finite(&self.gpu, xs)))
    }
    fn adamw_many(&self, slots: &mut [AdamwSlot<'_, Self>], h: &AdamWParams) {
        self.timed("adamw_many", || {
            let mut ts: Vec<adamw::AdamwTensor<'_>> =
                slots.iter_mut().map(|s| adamw::AdamwTensor { param: &mut *s.param, grad: s.grad, m: &mut *s.m, v: &mut *s.v, decay: s.decay }).collect();
            ok("adamw_many", adamw::adamw_multi(&self.gpu, &mut ts, h));
        })
    }
    fn download_many(&self, xs: &[&CudaSlice<f32>]) -> Vec<Vec<f32>> {
        self.timed("download_many", || {
            let total: usize = xs.iter().map(|x| x.len()).sum();
            let mut packed = self.zeros(total);
            let mut off = 0;
            for x in xs {
                self.copy(x, 0, &mut packed, off, x.len());
                off += x.len();
            }
            let all = self.download(&packed);
            let mut out = Vec::with_capacity(xs.len());
            let mut off = 0;
            for x in xs {
                out.push(all[off..off + x.len()].to_vec());
                off += x.len();
            }
            out
        })
    }
    fn all_finite(&self, x: &CudaSlice<f32>) -> bool {
        let mut flag = ok("alloc", self.gpu.stream.alloc_zeros::<u32>(1).map_err(|e| self.gpu.oom(4, e)));
        ok("all_finite", reduce::all_finite(&self.gpu, &x.slice(..), &mut flag.slice_mut(..)));
        let v = ok("all_finite", self.gpu.stream.clone_dtoh(&flag).map_err(|e| snella_cuda::device::cuda_err("download", e)));
        v[0] == 0
    }
}

/// A [`Weight`] as the GEMM functions take it: the f32 buffer, or the bf16 copy.
fn wt(w: Weight<'_, CudaBackend>) -> gemm::Wt<'_, CudaSlice<f32>> {
    match w {
        Weight::Buf(b) | Weight::Act(CudaAct::F32(b)) => gemm::Wt::F32(b),
        Weight::Act(CudaAct::Bf16(w16)) => gemm::Wt::Bf16(w16),
    }
}
