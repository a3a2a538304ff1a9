//! The GPU handle: context, stream, cuBLAS and the kernels of the embedded fatbin.

use crate::probe::probe;
use cudarc::cublas::CudaBlas;
use cudarc::driver::{CudaContext, CudaFunction, CudaModule, CudaSlice, CudaStream};
use cudarc::nvrtc::Ptx;
use snella_core::SnellaError;
use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

/// The fatbin built by `build.rs` from `kernels/*.cu` (SASS sm_80/86/89/90 + compute_90 PTX).
static FATBIN: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/snella.fatbin"));

/// A CUDA device ready for snella: one context, one stream, one cuBLAS handle.
pub struct Gpu {
    /// The context.
    pub ctx: Arc<CudaContext>,
    /// The stream every op runs on (in order; the host syncs only to read results).
    pub stream: Arc<CudaStream>,
    /// cuBLAS on `stream`.
    pub blas: CudaBlas,
    module: Arc<CudaModule>,
    funcs: Mutex<HashMap<&'static str, CudaFunction>>,
    peak: AtomicUsize,
    /// `"NVIDIA H200 (sm_90)"`-style description.
    pub description: String,
}

/// Turns a cudarc error into a `CUDA_ERROR` device error naming the operation.
pub fn cuda_err(what: &str, e: impl std::fmt::Debug) -> SnellaError {
    SnellaError::Device { code: "CUDA_ERROR".into(), message: format!("{what}: {e:?}") }
}

impl Gpu {
    /// Opens device `ordinal` after [`probe`] succeeded, and loads the kernels.
    ///
    /// # Errors
    /// `CUDA_UNAVAILABLE` from [`probe`]; `CUDA_ERROR` when the context or module cannot be created
    /// (e.g. a GPU older than sm_80).
    pub fn new(ordinal: usize) -> Result<Arc<Self>, SnellaError> {
        let driver = probe()?;
        let ctx = CudaContext::new(ordinal).map_err(|e| cuda_err("cannot create a CUDA context", e))?;
        let stream = ctx.default_stream();
        let module = ctx
            .load_module(Ptx::from_binary(FATBIN.to_vec()))
            .map_err(|e| cuda_err("cannot load snella's kernels (is the GPU sm_80 or newer?)", e))?;
        let blas = CudaBlas::new(stream.clone()).map_err(|e| cuda_err("cannot create a cuBLAS handle", e))?;
        let name = ctx.name().unwrap_or_else(|_| "CUDA device".into());
        let (ma, mi) = ctx.compute_capability().unwrap_or((0, 0));
        Ok(Arc::new(Gpu { ctx, stream, blas, module, funcs: Mutex::new(HashMap::new()), peak: AtomicUsize::new(0), description: format!("{name} (sm_{ma}{mi}), {driver}") }))
    }

    /// The kernel `name` of the fatbin (cached).
    ///
    /// # Panics
    /// If the fatbin lacks the kernel: a build error inside snella.
    pub fn func(&self, name: &'static str) -> CudaFunction {
        let mut f = self.funcs.lock().expect("kernel cache");
        f.entry(name)
            .or_insert_with(|| self.module.load_function(name).unwrap_or_else(|e| panic!("kernel {name} missing from the fatbin: {e:?}")))
            .clone()
    }

    /// `n` zeros on the device.
    ///
    /// # Errors
    /// `CUDA_OOM` naming the bytes asked for and free.
    pub fn zeros(&self, n: usize) -> Result<CudaSlice<f32>, SnellaError> {
        let r = self.stream.alloc_zeros::<f32>(n.max(1)).map_err(|e| self.oom(n * 4, e));
        self.note_usage();
        r
    }

    /// Records the device memory in use (driver view: total − free, which includes the stream's
    /// memory pool) into the running peak.
    pub fn note_usage(&self) {
        if let Ok((free, total)) = self.ctx.mem_get_info() {
            self.peak.fetch_max(total - free, Ordering::Relaxed);
        }
    }

    /// The peak of [`Gpu::note_usage`] since [`Gpu::reset_peak`], in bytes.
    pub fn peak_bytes(&self) -> usize {
        self.peak.load(Ordering::Relaxed)
    }

    /// Restarts the peak from the memory in use now.
    pub fn reset_peak(&self) {
        self.peak.store(0, Ordering::Relaxed);
        self.note_usage();
    }

    /// An out-of-memory error naming how much was asked for and how much is free.
    pub fn oom(&self, bytes: usize, e: impl std::fmt::Debug) -> SnellaError {
        let free = self.ctx.mem_get_info().map(|(f, _)| f).unwrap_or(0);
        SnellaError::Device {
            code: "CUDA_OOM".into(),
            message: format!("cannot allocate {:.1} MiB on the GPU ({:.1} MiB free): {e:?}", bytes as f64 / 1048576.0, free as f64 / 1048576.0),
        }
    }

    /// Waits for all queued work.
    ///
    /// # Errors
    /// `CUDA_ERROR` when a queued kernel failed.
    pub fn sync(&self) -> Result<(), SnellaError> {
        self.stream.synchronize().map_err(|e| cuda_err("stream synchronize", e))
    }
}

impl Gpu {
    /// Lets cuBLAS use TF32 tensor cores for f32 GEMMs (10-bit mantissa inputs, f32 accumulation),
    /// or restores strict f32. Strict f32 is what the CPU-parity tests use.
    ///
    /// # Errors
    /// `CUDA_ERROR` when cuBLAS refuses the mode.
    pub fn set_tf32(&self, on: bool) -> Result<(), SnellaError> {
        use cudarc::cublas::sys::{cublasMath_t, cublasSetMathMode, cublasStatus_t};
        let mode = if on { cublasMath_t::CUBLAS_TF32_TENSOR_OP_MATH } else { cublasMath_t::CUBLAS_DEFAULT_MATH };
        // SAFETY: the handle is valid for the life of `self`.
        let st = unsafe { cublasSetMathMode(*self.blas.handle(), mode) };
        if st == cublasStatus_t::CUBLAS_STATUS_SUCCESS { Ok(()) } else { Err(cuda_err("cublasSetMathMode", st)) }
    }
}
