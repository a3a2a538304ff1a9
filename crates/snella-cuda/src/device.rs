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
    /// The stream every op runs on (in order; the host syncs only to read results). Only
    /// [`Gpu::upload_beside`] also copies on a second stream, ordered against this one by events.
    pub stream: Arc<CudaStream>,
    /// cuBLAS on `stream`.
    pub blas: CudaBlas,
    module: Arc<CudaModule>,
    /// Loaded kernels, each with the dynamic shared memory (bytes) it was last allowed
    /// ([`Gpu::func_shared`]; 0 until it opts in).
    funcs: Mutex<HashMap<&'static str, (CudaFunction, usize)>>,
    peak: AtomicUsize,
    /// The pool's bytes in use at [`Gpu::reset_peak`].
    used_at_reset: AtomicUsize,
    /// The GEMM precision ([`Precision`] as u8).
    precision: std::sync::atomic::AtomicU8,
    /// A page-locked staging buffer for large uploads (grow-only), see [`Gpu::upload`].
    staging: Mutex<Option<cudarc::driver::PinnedHostSlice<f32>>>,
    /// The copy stream and buffers of [`Gpu::upload_beside`], made at its first call.
    pub(crate) beside: Mutex<Option<crate::beside::Beside>>,
    /// The device's default memory pool (what `cuMemAllocAsync` draws from), when the device has one.
    pool: Option<PoolHandle>,
    /// `"NVIDIA H200 (sm_90)"`-style description.
    pub description: String,
    /// cuBLASLt, created at the first fused-epilogue GEMM ([`Gpu::lt`]).
    lt: std::sync::OnceLock<crate::gemm_lt::Lt>,
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
        // SAFETY: every op of a Gpu runs in order on its one stream, so cudarc's per-buffer
        // read/write events (two driver objects created and destroyed per allocation) order nothing;
        // the one exception, the copy stream of `Gpu::upload_beside`, orders its buffers with its
        // own events (crate::beside).
        unsafe { ctx.disable_event_tracking() };
        let stream = ctx.default_stream();
        let pool = default_pool(&ctx);
        let module = ctx
            .load_module(Ptx::from_binary(FATBIN.to_vec()))
            .map_err(|e| cuda_err("cannot load snella's kernels (is the GPU sm_80 or newer?)", e))?;
        let blas = CudaBlas::new(stream.clone()).map_err(|e| cuda_err("cannot create a cuBLAS handle", e))?;
        let name = ctx.name().unwrap_or_else(|_| "CUDA device".into());
        let (ma, mi) = ctx.compute_capability().unwrap_or((0, 0));
        Ok(Arc::new(Gpu { ctx, stream, blas, module, funcs: Mutex::new(HashMap::new()), peak: AtomicUsize::new(0), used_at_reset: AtomicUsize::new(0), precision: std::sync::atomic::AtomicU8::new(Precision::F32 as u8), staging: Mutex::new(None), beside: Mutex::new(None), pool, description: format!("{name} (sm_{ma}{mi}), {driver}"), lt: std::sync::OnceLock::new() }))
    }

    /// The cuBLASLt handle and workspace of this device, created on first use.
    ///
    /// # Errors
    /// As [`crate::gemm_lt::Lt::new`].
    pub fn lt(&self) -> Result<&crate::gemm_lt::Lt, SnellaError> {
        if let Some(l) = self.lt.get() {
            return Ok(l);
        }
        let l = crate::gemm_lt::Lt::new(self)?;
        let _ = self.lt.set(l);
        Ok(self.lt.get().expect("set above"))
    }

    /// The kernel `name` of the fatbin (cached).
    ///
    /// # Panics
    /// If the fatbin lacks the kernel: a build error inside snella.
    pub fn func(&self, name: &'static str) -> CudaFunction {
        self.func_entry(&mut self.funcs.lock().expect("kernel cache"), name).0.clone()
    }

    /// [`Gpu::func`] for a launch with `dynamic` bytes of dynamic shared memory beside the kernel's
    /// `static_bytes`: when the two exceed the 48 KiB a block gets without opting in, the kernel's
    /// `CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES` is raised — once per kernel and size, not
    /// at every launch (sm_80+ GPUs allow at least 99 KiB in all).
    ///
    /// # Errors
    /// `CUDA_ERROR` naming the kernel when the driver refuses the size.
    ///
    /// # Panics
    /// As [`Gpu::func`].
    pub fn func_shared(&self, name: &'static str, dynamic: usize, static_bytes: usize) -> Result<CudaFunction, SnellaError> {
        let mut funcs = self.funcs.lock().expect("kernel cache");
        let (f, allowed) = self.func_entry(&mut funcs, name);
        if dynamic + static_bytes > 48 * 1024 && dynamic > *allowed {
            let attr = cudarc::driver::sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES;
            f.set_attribute(attr, dynamic as i32).map_err(|e| cuda_err(name, e))?;
            *allowed = dynamic;
        }
        Ok(f.clone())
    }

    fn func_entry<'a>(&self, funcs: &'a mut HashMap<&'static str, (CudaFunction, usize)>, name: &'static str) -> &'a mut (CudaFunction, usize) {
        funcs.entry(name).or_insert_with(|| (self.module.load_function(name).unwrap_or_else(|e| panic!("kernel {name} missing from the fatbin: {e:?}")), 0))
    }

    /// `n` zeros on the device.
    ///
    /// # Errors
    /// `CUDA_OOM` naming the bytes asked for and free.
    pub fn zeros(&self, n: usize) -> Result<CudaSlice<f32>, SnellaError> {
        let r = self.stream.alloc_zeros::<f32>(n.max(1)).map_err(|e| self.oom(n * 4, e));
        if self.pool.is_none() {
            self.note_usage();
        }
        r
    }

    /// Records the device memory in use (driver view: total − free) into the running peak. Only
    /// needed without a memory pool; with one, [`Gpu::peak_bytes`] reads the pool's high-water mark.
    pub fn note_usage(&self) {
        if let Ok((free, total)) = self.ctx.mem_get_info() {
            self.peak.fetch_max(total - free, Ordering::Relaxed);
        }
    }

    /// Peak device memory since [`Gpu::reset_peak`], in bytes. With a memory pool: the memory in use
    /// outside the pool at the reset (context, kernels, cuBLAS workspace, other allocations) plus
    /// the pool's high-water mark of bytes handed out (`CU_MEMPOOL_ATTR_USED_MEM_HIGH`: live
    /// tensors, not the pool's cached reserve). Without one: the largest `total − free` seen at
    /// allocations.
    pub fn peak_bytes(&self) -> usize {
        match &self.pool {
            // The high mark counts the pool's bytes in use (absolute, not growth since the reset); it
            // restarts from 0 at the reset, so before any allocation it may read below what is live.
            Some(p) => {
                let high = (p.get(PoolAttr::CU_MEMPOOL_ATTR_USED_MEM_HIGH) as usize).max(self.used_at_reset.load(Ordering::Relaxed));
                self.peak.load(Ordering::Relaxed) + high
            }
            None => self.peak.load(Ordering::Relaxed),
        }
    }

    /// Peak bytes of live tensors since [`Gpu::reset_peak`]: the memory pool's high-water mark of
    /// bytes handed out, without what lives outside the pool (CUDA context, kernel images, cuBLAS's
    /// own workspace) — the measure PyTorch's `torch.cuda.max_memory_allocated()` gives, for
    /// like-for-like comparisons with the reference. `None` without a memory pool.
    pub fn peak_tensor_bytes(&self) -> Option<usize> {
        self.pool.as_ref().map(|p| (p.get(PoolAttr::CU_MEMPOOL_ATTR_USED_MEM_HIGH) as usize).max(self.used_at_reset.load(Ordering::Relaxed)))
    }

    /// Restarts the peak from the memory in use now.
    pub fn reset_peak(&self) {
        self.peak.store(0, Ordering::Relaxed);
        match &self.pool {
            Some(p) => {
                let (free, total) = self.ctx.mem_get_info().unwrap_or((0, 0));
                let reserved = p.get(PoolAttr::CU_MEMPOOL_ATTR_RESERVED_MEM_CURRENT) as usize;
                let used = p.get(PoolAttr::CU_MEMPOOL_ATTR_USED_MEM_CURRENT) as usize;
                p.set(PoolAttr::CU_MEMPOOL_ATTR_USED_MEM_HIGH, 0);
                // outside the pool; what is live in it now is already part of the high mark
                self.peak.store((total - free).saturating_sub(reserved), Ordering::Relaxed);
                self.used_at_reset.store(used, Ordering::Relaxed);
            }
            None => self.note_usage(),
        }
    }

    /// `n` (at least 1) uninitialised values of `T` on the device, from the stream's pool.
    ///
    /// # Errors
    /// `CUDA_OOM` naming the bytes asked for and free.
    ///
    /// # Safety
    /// The caller writes every element before reading it.
    pub unsafe fn uninit<T: cudarc::driver::DeviceRepr>(&self, n: usize) -> Result<CudaSlice<T>, SnellaError> {
        self.stream.alloc::<T>(n.max(1)).map_err(|e| self.oom(n * std::mem::size_of::<T>(), e))
    }

    /// An out-of-memory error naming how much was asked for and how much is free.
    pub fn oom(&self, bytes: usize, e: impl std::fmt::Debug) -> SnellaError {
        let free = self.ctx.mem_get_info().map(|(f, _)| f).unwrap_or(0);
        SnellaError::Device {
            code: "CUDA_OOM".into(),
            message: format!("cannot allocate {:.1} MiB on the GPU ({:.1} MiB free): {e:?}", bytes as f64 / 1048576.0, free as f64 / 1048576.0),
        }
    }

    /// Copies `data` to a new device buffer. Large arrays (≥ 1 Mi values, e.g. a batch of images) go
    /// through a reused page-locked staging buffer, filled by all cores in parallel, so the DMA runs at
    /// full speed instead of the driver's pageable-memory path (≈ 6 GB/s here); smaller ones are
    /// copied directly. Waits for the stream first when staging (the previous copy out of the buffer).
    ///
    /// # Errors
    /// `CUDA_OOM` for the device buffer; `CUDA_ERROR` when the staging buffer or the copy fails.
    pub fn upload(&self, data: &[f32]) -> Result<CudaSlice<f32>, SnellaError> {
        let n = data.len();
        if n < STAGED_MIN {
            return self.stream.clone_htod(data).map_err(|e| self.oom(n * 4, e));
        }
        let mut g = self.staging.lock().expect("staging buffer");
        // the previous copy out of the buffer must be done before it is refilled or freed
        self.sync()?;
        let host = self.fill_pinned(&mut g, data)?;
        // SAFETY: the copy below writes all n values.
        let mut dev = unsafe { self.uninit::<f32>(n) }?;
        {
            let (dp, _rec) = cudarc::driver::DevicePtrMut::device_ptr_mut(&mut dev, &self.stream);
            // SAFETY: `host` (n values) stays valid and unwritten until the next upload, which waits for the
            // stream (above) before writing into it; dev holds n values.
            unsafe { cudarc::driver::result::memcpy_htod_async(dp, &*host, self.stream.cu_stream()) }.map_err(|e| cuda_err("upload", e))?;
        }
        Ok(dev)
    }

    /// Copies `data` into the page-locked buffer `buf` (grown, never shrunk, to hold it), by all
    /// cores in parallel, and returns its first `data.len()` values. The caller has made sure no copy
    /// still reads `buf` ([`Gpu::upload`], [`Gpu::upload_beside`]).
    ///
    /// # Errors
    /// `CUDA_ERROR` when the page-locked buffer cannot be allocated or mapped.
    pub(crate) fn fill_pinned<'a>(&self, buf: &'a mut Option<cudarc::driver::PinnedHostSlice<f32>>, data: &[f32]) -> Result<&'a mut [f32], SnellaError> {
        use rayon::prelude::*;
        let n = data.len();
        if buf.as_ref().is_none_or(|p| p.len() < n) {
            *buf = None;
            // SAFETY: the buffer is written below before any copy reads it.
            *buf = Some(unsafe { self.ctx.alloc_pinned::<f32>(n.max(1)) }.map_err(|e| cuda_err("page-locked buffer for uploads", e))?);
        }
        let host = buf.as_mut().expect("set above").as_mut_slice().map_err(|e| cuda_err("page-locked buffer for uploads", e))?;
        host[..n].par_chunks_mut(1 << 16).zip(data.par_chunks(1 << 16)).for_each(|(d, s)| d.copy_from_slice(s));
        Ok(&mut host[..n])
    }

    /// Waits for all queued work.
    ///
    /// # Errors
    /// `CUDA_ERROR` when a queued kernel failed.
    pub fn sync(&self) -> Result<(), SnellaError> {
        self.stream.synchronize().map_err(|e| cuda_err("stream synchronize", e))
    }
}

impl Drop for Gpu {
    /// Waits for queued work before the fields go, so the staging buffer is not freed under a copy.
    fn drop(&mut self) {
        let _ = self.stream.synchronize();
    }
}

use cudarc::driver::sys::CUmemPool_attribute as PoolAttr;

/// Uploads of at least this many values go through the page-locked staging buffer.
const STAGED_MIN: usize = 1 << 20;

/// The device's default memory pool.
struct PoolHandle(cudarc::driver::sys::CUmemoryPool);
// SAFETY: a CUmemoryPool is a driver handle usable from any thread.
unsafe impl Send for PoolHandle {}
unsafe impl Sync for PoolHandle {}

impl PoolHandle {
    fn get(&self, a: PoolAttr) -> u64 {
        let mut v: u64 = 0;
        // SAFETY: the pool outlives the context; these attributes are 64-bit values.
        unsafe { cudarc::driver::sys::cuMemPoolGetAttribute(self.0, a, &mut v as *mut u64 as *mut _) };
        v
    }
    fn set(&self, a: PoolAttr, mut v: u64) {
        // SAFETY: as above; these attributes take 64-bit values.
        unsafe { cudarc::driver::sys::cuMemPoolSetAttribute(self.0, a, &mut v as *mut u64 as *mut _) };
    }
}

/// The default memory pool of `ctx`'s device, set to keep freed memory cached across
/// synchronisations (release threshold = max), as a caching allocator does: with the driver's
/// default threshold of 0 every host wait hands the step's memory back and the next step maps it
/// again. `None` when the device has no memory pools (cudarc then allocates synchronously).
fn default_pool(ctx: &Arc<CudaContext>) -> Option<PoolHandle> {
    if !ctx.has_async_alloc() {
        return None;
    }
    let mut pool = std::ptr::null_mut();
    // SAFETY: the context is current-capable and cu_device is its device.
    let r = unsafe { cudarc::driver::sys::cuDeviceGetDefaultMemPool(&mut pool, ctx.cu_device()) };
    if r != cudarc::driver::sys::cudaError_enum::CUDA_SUCCESS || pool.is_null() {
        return None;
    }
    let p = PoolHandle(pool);
    p.set(PoolAttr::CU_MEMPOOL_ATTR_RELEASE_THRESHOLD, u64::MAX);
    Some(p)
}

impl Gpu {
    /// Lets cuBLAS use TF32 tensor cores for f32 GEMMs (10-bit mantissa inputs, f32 accumulation),
    /// or restores strict f32. Strict f32 is what the CPU-parity tests use.
    ///
    /// # Errors
    /// `CUDA_ERROR` when cuBLAS refuses the mode.
    pub fn set_tf32(&self, on: bool) -> Result<(), SnellaError> {
        self.set_precision(if on { Precision::Tf32 } else { Precision::F32 })
    }

    /// Sets the precision of every GEMM on this device (see [`Precision`]).
    ///
    /// # Errors
    /// `CUDA_ERROR` when cuBLAS refuses the math mode.
    pub fn set_precision(&self, p: Precision) -> Result<(), SnellaError> {
        use cudarc::cublas::sys::{cublasMath_t, cublasSetMathMode, cublasStatus_t};
        // bf16 mode: the layer GEMMs take bf16 operands (crate::gemm); the attention's batched f32
        // products use TF32.
        let mode = if p == Precision::F32 { cublasMath_t::CUBLAS_DEFAULT_MATH } else { cublasMath_t::CUBLAS_TF32_TENSOR_OP_MATH };
        // SAFETY: the handle is valid for the life of `self`.
        let st = unsafe { cublasSetMathMode(*self.blas.handle(), mode) };
        if st != cublasStatus_t::CUBLAS_STATUS_SUCCESS {
            return Err(cuda_err("cublasSetMathMode", st));
        }
        self.precision.store(p as u8, Ordering::Relaxed);
        Ok(())
    }

    /// The GEMM precision in force.
    pub fn precision(&self) -> Precision {
        match self.precision.load(Ordering::Relaxed) {
            1 => Precision::Tf32,
            2 => Precision::Bf16,
            _ => Precision::F32,
        }
    }
}

/// How a device's GEMMs multiply (all tensors stay f32 in memory; accumulation is always f32).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Precision {
    /// Strict f32 products (the CPU-parity reference; cuBLAS default math).
    F32 = 0,
    /// TF32 tensor cores: inputs rounded to a 10-bit mantissa.
    Tf32 = 1,
    /// bf16 operands (8-bit mantissa, converted per product as PyTorch's autocast does) on the bf16
    /// tensor cores for the layer GEMMs; TF32 for the attention's batched products.
    Bf16 = 2,
}
