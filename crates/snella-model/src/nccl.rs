//! NCCL collectives for the CUDA backend (feature `cuda`): [`NcclComm`], a [`Communicator`] over
//! `libnccl.so.2`, loaded at run time.
//!
//! **Why our own binding and not cudarc's `nccl` feature.** cudarc 0.19's dynamic loader looks for
//! `libnccl.so`, `libnccl.so.13`/`.12`/`.11`/`.10`/`.9`/`.1` and a few others, but not
//! `libnccl.so.2`, the only name that NCCL's runtime packages install (the `libnccl2` deb/rpm and
//! the `nvidia-nccl-cu12`/`-cu13` pip wheels that PyTorch pulls in); and it panics when nothing
//! loads. The nine functions used here are bound through `libloading` instead, so a missing NCCL
//! is an error value (`CUDA_UNAVAILABLE` naming `libnccl.so.2` and every path tried) and the addon
//! still loads without it.
//!
//! **NVLink multicast stays off.** Before NCCL is loaded, `NCCL_NVLS_ENABLE=0` is set in the
//! process environment (overriding any other value): on the shared GPU hosts NVLS can take the
//! GPUs out of service.
//!
//! Groups: [`NcclComm::init_all`] for every GPU of this process (one communicator per device,
//! `ncclCommInitAll`), [`NcclComm::join`] for one rank per process through the TCP
//! [`crate::rendezvous`] (rank 0 makes the `ncclUniqueId` and sends it to the others). NCCL sums in
//! its own ring/tree order, so N GPUs match one GPU within f32 rounding, not bit for bit.

use crate::backend::Backend;
use crate::comm::{comm_err, Communicator};
use crate::cuda::CudaBackend;
use crate::rendezvous::{rendezvous, RendezvousConfig, ID_BYTES};
use cudarc::driver::{CudaSlice, DevicePtrMut};
use libloading::Library;
use snella_core::{Result, SnellaError};
use std::ffi::{c_char, c_int, c_void, CStr};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};

type NcclResult = c_int;
type RawComm = *mut c_void;
type Stream = cudarc::driver::sys::CUstream;

/// `ncclUniqueId`: 128 opaque bytes, passed by value.
#[repr(C)]
#[derive(Clone, Copy)]
struct UniqueId {
    internal: [c_char; ID_BYTES],
}

const NCCL_FLOAT32: c_int = 7;
const NCCL_FLOAT64: c_int = 8;
const NCCL_SUM: c_int = 0;

/// The NCCL entry points snella uses.
struct Api {
    path: String,
    version: unsafe extern "C" fn(*mut c_int) -> NcclResult,
    unique_id: unsafe extern "C" fn(*mut UniqueId) -> NcclResult,
    init_rank: unsafe extern "C" fn(*mut RawComm, c_int, UniqueId, c_int) -> NcclResult,
    init_all: unsafe extern "C" fn(*mut RawComm, c_int, *const c_int) -> NcclResult,
    all_reduce: unsafe extern "C" fn(*const c_void, *mut c_void, usize, c_int, c_int, RawComm, Stream) -> NcclResult,
    broadcast: unsafe extern "C" fn(*const c_void, *mut c_void, usize, c_int, c_int, RawComm, Stream) -> NcclResult,
    abort: unsafe extern "C" fn(RawComm) -> NcclResult,
    error_string: unsafe extern "C" fn(NcclResult) -> *const c_char,
    last_error: Option<unsafe extern "C" fn(RawComm) -> *const c_char>,
    _lib: Library,
}

/// Where `libnccl.so.2` is looked for after the soname: `$SNELLA_NCCL_LIB_DIR`,
/// `$SNELLA_CUDA_LIB_DIR`, `$CUDA_HOME/lib64`, `/usr/local/cuda/lib64`, `/usr/lib/x86_64-linux-gnu`.
fn nccl_dirs() -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = ["SNELLA_NCCL_LIB_DIR", "SNELLA_CUDA_LIB_DIR"].iter().filter_map(|k| std::env::var(k).ok()).map(PathBuf::from).collect();
    if let Ok(h) = std::env::var("CUDA_HOME") {
        v.push(PathBuf::from(h).join("lib64"));
    }
    v.push("/usr/local/cuda/lib64".into());
    v.push("/usr/lib/x86_64-linux-gnu".into());
    v
}

fn unavailable(message: String) -> SnellaError {
    SnellaError::Device { code: "CUDA_UNAVAILABLE".into(), message }
}

/// Loads NCCL once (after setting `NCCL_NVLS_ENABLE=0`).
fn api() -> Result<&'static Api> {
    static API: OnceLock<std::result::Result<Api, String>> = OnceLock::new();
    API.get_or_init(|| {
        // Before NCCL reads its environment: never NVLink multicast (see the module docs).
        std::env::set_var("NCCL_NVLS_ENABLE", "0");
        let mut tried = Vec::new();
        let mut names: Vec<String> = std::env::var("SNELLA_NCCL_LIB").ok().into_iter().collect();
        names.extend(["libnccl.so.2".to_string(), "libnccl.so".to_string()]);
        names.extend(nccl_dirs().into_iter().map(|d| d.join("libnccl.so.2").display().to_string()));
        for n in names {
            // SAFETY: loading NCCL runs its initialisers, which is what using it requires.
            match unsafe { Library::new(&n) } {
                Ok(lib) => return bind(lib, n),
                Err(e) => tried.push(format!("{n} ({e})")),
            }
        }
        Err(format!(
            "libnccl.so.2 (NCCL 2, needed for data-parallel training on several GPUs) was not found; tried: {}. Install NCCL (the libnccl2 package or the nvidia-nccl-cu12/-cu13 wheel) and put its lib folder on LD_LIBRARY_PATH or in SNELLA_NCCL_LIB_DIR",
            tried.join("; ")
        ))
    })
    .as_ref()
    .map_err(|m| unavailable(m.clone()))
}

fn bind(lib: Library, path: String) -> std::result::Result<Api, String> {
    macro_rules! sym {
        ($name:literal) => {
            // SAFETY: the symbol has the C signature of the field it is stored in (nccl.h, NCCL 2).
            *unsafe { lib.get($name) }.map_err(|e| format!("{path} lacks {}: {e}", String::from_utf8_lossy(&$name[..$name.len() - 1])))?
        };
    }
    Ok(Api {
        version: sym!(b"ncclGetVersion\0"),
        unique_id: sym!(b"ncclGetUniqueId\0"),
        init_rank: sym!(b"ncclCommInitRank\0"),
        init_all: sym!(b"ncclCommInitAll\0"),
        all_reduce: sym!(b"ncclAllReduce\0"),
        broadcast: sym!(b"ncclBroadcast\0"),
        abort: sym!(b"ncclCommAbort\0"),
        error_string: sym!(b"ncclGetErrorString\0"),
        // SAFETY: as above; absent before NCCL 2.13.
        last_error: unsafe { lib.get(b"ncclGetLastError\0") }.ok().map(|s| *s),
        path,
        _lib: lib,
    })
}

/// Turns an NCCL result code into `Ok` or a `COMM_ERROR` naming the call, NCCL's text for the code
/// and its last error message.
fn check(api: &Api, what: &str, r: NcclResult, comm: RawComm) -> Result<()> {
    if r == 0 {
        return Ok(());
    }
    // SAFETY: NCCL returns static or comm-owned NUL-terminated strings.
    let text = unsafe { CStr::from_ptr((api.error_string)(r)) }.to_string_lossy().into_owned();
    let last = api.last_error.map(|f| unsafe { CStr::from_ptr(f(comm)) }.to_string_lossy().into_owned()).filter(|s| !s.is_empty());
    Err(comm_err(format!("{what} failed: NCCL error {r} ({text}){}", last.map(|l| format!(": {l}")).unwrap_or_default())))
}

/// The loaded NCCL's version and path, e.g. `NCCL 2.27.3 (/…/libnccl.so.2)`.
///
/// # Errors
/// `CUDA_UNAVAILABLE` naming `libnccl.so.2` and every path tried.
pub fn nccl_version() -> Result<String> {
    let a = api()?;
    let mut v: c_int = 0;
    // SAFETY: v is a valid out-pointer.
    check(a, "ncclGetVersion", unsafe { (a.version)(&mut v) }, std::ptr::null_mut())?;
    let (major, minor, patch) = if v >= 10000 { (v / 10000, (v % 10000) / 100, v % 100) } else { (v / 1000, (v % 1000) / 100, v % 100) };
    Ok(format!("NCCL {major}.{minor}.{patch} ({})", a.path))
}

/// A new group id (`ncclUniqueId`), made by rank 0 and handed to the others.
///
/// # Errors
/// `CUDA_UNAVAILABLE` without NCCL; `COMM_ERROR` when NCCL fails (e.g. no network interface).
pub fn unique_id() -> Result<[u8; ID_BYTES]> {
    let a = api()?;
    let mut id = UniqueId { internal: [0; ID_BYTES] };
    // SAFETY: id is a valid out-pointer of the right size.
    check(a, "ncclGetUniqueId", unsafe { (a.unique_id)(&mut id) }, std::ptr::null_mut())?;
    Ok(id.internal.map(|c| c as u8))
}

/// An NCCL communicator handle and whether it was aborted (released).
struct Handle {
    comm: RawComm,
    aborted: AtomicBool,
}

// SAFETY: an NCCL communicator may be used from any thread, one call at a time (the data-parallel
// code calls it from the one thread that runs its rank); `ncclCommAbort` is designed to be called
// from another thread, to release a rank blocked in a collective.
unsafe impl Send for Handle {}
unsafe impl Sync for Handle {}

impl Handle {
    fn abort(&self, api: &Api) {
        if !self.aborted.swap(true, Ordering::SeqCst) {
            // SAFETY: the handle is live until this first abort; NCCL allows it while another thread
            // is blocked on the communicator, and makes that thread's collectives return.
            unsafe { (api.abort)(self.comm) };
        }
    }
}

/// One rank of an NCCL group, bound to one GPU's stream (see the module docs).
pub struct NcclComm {
    h: Arc<Handle>,
    /// Every rank of this process's group (from [`NcclComm::init_all`]; only this one otherwise):
    /// [`Communicator::abort`] releases them all, so that a rank that failed (a CUDA out-of-memory
    /// in its forward pass, say) does not leave the others waiting in a collective for ever.
    clique: Vec<Arc<Handle>>,
    rank: usize,
    world: usize,
    api: &'static Api,
}

impl NcclComm {
    /// One communicator per backend in `bes` (one GPU each, distinct devices), ranks in order,
    /// through `ncclCommInitAll`.
    ///
    /// # Errors
    /// `CUDA_UNAVAILABLE` without NCCL; `COMM_ERROR` when NCCL refuses (e.g. the same GPU twice).
    pub fn init_all(bes: &[CudaBackend]) -> Result<Vec<NcclComm>> {
        let a = api()?;
        let devs: Vec<c_int> = bes.iter().map(|b| b.gpu.ctx.ordinal() as c_int).collect();
        let mut comms: Vec<RawComm> = vec![std::ptr::null_mut(); bes.len()];
        // SAFETY: comms has room for devs.len() handles; devs are valid ordinals.
        check(a, &format!("ncclCommInitAll on devices {devs:?}"), unsafe { (a.init_all)(comms.as_mut_ptr(), devs.len() as c_int, devs.as_ptr()) }, std::ptr::null_mut())?;
        let world = comms.len();
        let clique: Vec<Arc<Handle>> = comms.into_iter().map(|comm| Arc::new(Handle { comm, aborted: AtomicBool::new(false) })).collect();
        Ok(clique.iter().enumerate().map(|(rank, h)| NcclComm { h: h.clone(), clique: clique.clone(), rank, world, api: a }).collect())
    }

    /// Rank `rank` of `world` in the group of `id` (every rank calls this, each in its own process
    /// or thread, on its own GPU `be`); returns once all have joined.
    ///
    /// # Errors
    /// As [`NcclComm::init_all`].
    pub fn init_rank(be: &CudaBackend, rank: usize, world: usize, id: [u8; ID_BYTES]) -> Result<NcclComm> {
        let a = api()?;
        be.gpu.ctx.bind_to_thread().map_err(|e| comm_err(format!("binding the CUDA context: {e:?}")))?;
        let uid = UniqueId { internal: id.map(|b| b as c_char) };
        let mut comm: RawComm = std::ptr::null_mut();
        // SAFETY: comm is a valid out-pointer; rank < world.
        check(a, &format!("ncclCommInitRank (rank {rank} of {world})"), unsafe { (a.init_rank)(&mut comm, world as c_int, uid, rank as c_int) }, std::ptr::null_mut())?;
        let h = Arc::new(Handle { comm, aborted: AtomicBool::new(false) });
        Ok(NcclComm { clique: vec![h.clone()], h, rank, world, api: a })
    }

    /// Joins a multi-process group through the TCP rendezvous of `cfg`: rank 0 makes the NCCL id
    /// and hands it to the others, then every rank initialises NCCL on its GPU `be`.
    ///
    /// # Errors
    /// As [`rendezvous`] and [`NcclComm::init_rank`].
    pub fn join(be: &CudaBackend, cfg: &RendezvousConfig) -> Result<NcclComm> {
        cfg.validate()?;
        api()?;
        let id = if cfg.rank == 0 { Some(unique_id()?) } else { None };
        let (id, _link) = rendezvous(cfg, id)?;
        Self::init_rank(be, cfg.rank, cfg.world, id)
    }

    fn live(&self) -> Result<()> {
        if self.h.aborted.load(Ordering::SeqCst) {
            return Err(comm_err(format!("the NCCL communicator of rank {} was aborted after a failure", self.rank)));
        }
        Ok(())
    }

    /// `ncclAllReduce(sum)` in place on `n` values of type `dtype` at `ptr`, on `be`'s stream.
    fn reduce_raw(&self, be: &CudaBackend, ptr: u64, n: usize, dtype: c_int) -> Result<()> {
        self.live()?;
        be.gpu.ctx.bind_to_thread().map_err(|e| comm_err(format!("binding the CUDA context: {e:?}")))?;
        let p = ptr as *mut c_void;
        // SAFETY: ptr addresses n live values of dtype on this rank's device, ordered on the stream.
        let r = unsafe { (self.api.all_reduce)(p, p, n, dtype, NCCL_SUM, self.h.comm, be.gpu.stream.cu_stream()) };
        check(self.api, "ncclAllReduce", r, self.h.comm)
    }

    /// Copies `bufs` into one packed buffer (or uses the only one), runs `f` on it, copies back.
    fn packed(&self, be: &CudaBackend, bufs: &mut [&mut CudaSlice<f32>], f: impl FnOnce(&mut CudaSlice<f32>, usize) -> Result<()>) -> Result<()> {
        if bufs.len() == 1 {
            let n = bufs[0].len();
            return f(&mut *bufs[0], n);
        }
        let total: usize = bufs.iter().map(|b| b.len()).sum();
        if total == 0 {
            return Ok(());
        }
        let mut flat = be.empty(total); // every value is copied in below
        let mut off = 0;
        for b in bufs.iter() {
            be.copy(b, 0, &mut flat, off, b.len());
            off += b.len();
        }
        f(&mut flat, total)?;
        let mut off = 0;
        for b in bufs.iter_mut() {
            let n = b.len();
            be.copy(&flat, off, b, 0, n);
            off += n;
        }
        Ok(())
    }
}

impl Communicator<CudaBackend> for NcclComm {
    fn rank(&self) -> usize {
        self.rank
    }
    fn world(&self) -> usize {
        self.world
    }
    fn kind(&self) -> &'static str {
        "nccl"
    }
    fn all_reduce_sum(&self, be: &CudaBackend, bufs: &mut [&mut CudaSlice<f32>]) -> Result<()> {
        self.packed(be, bufs, |flat, n| {
            let stream = be.gpu.stream.clone();
            let (ptr, _sync) = flat.device_ptr_mut(&stream);
            self.reduce_raw(be, ptr, n, NCCL_FLOAT32)
        })
    }
    fn all_reduce_host(&self, be: &CudaBackend, vals: &mut [f64]) -> Result<()> {
        if vals.is_empty() {
            return Ok(());
        }
        let stream = be.gpu.stream.clone();
        let mut d: CudaSlice<f64> = stream.clone_htod(vals).map_err(|e| be.gpu.oom(vals.len() * 8, e))?;
        {
            let (ptr, _sync) = d.device_ptr_mut(&stream);
            self.reduce_raw(be, ptr, vals.len(), NCCL_FLOAT64)?;
        }
        let h = stream.clone_dtoh(&d).map_err(|e| comm_err(format!("reading the all-reduced values: {e:?}")))?;
        vals.copy_from_slice(&h);
        Ok(())
    }
    fn broadcast(&self, be: &CudaBackend, bufs: &mut [&mut CudaSlice<f32>], root: usize) -> Result<()> {
        if root >= self.world {
            return Err(SnellaError::config("root", root, &format!("a rank in [0, {})", self.world)));
        }
        self.packed(be, bufs, |flat, n| {
            self.live()?;
            be.gpu.ctx.bind_to_thread().map_err(|e| comm_err(format!("binding the CUDA context: {e:?}")))?;
            let stream = be.gpu.stream.clone();
            let (ptr, _sync) = flat.device_ptr_mut(&stream);
            let p = ptr as *mut c_void;
            // SAFETY: p addresses n live f32 values on this rank's device.
            let r = unsafe { (self.api.broadcast)(p, p, n, NCCL_FLOAT32, root as c_int, self.h.comm, stream.cu_stream()) };
            check(self.api, "ncclBroadcast", r, self.h.comm)
        })
    }
    fn barrier(&self, be: &CudaBackend) -> Result<()> {
        let mut one = [0.0f64];
        self.all_reduce_host(be, &mut one)
    }
    fn abort(&self, _why: &str) {
        for h in &self.clique {
            h.abort(self.api);
        }
    }
}

impl Drop for NcclComm {
    /// Releases the communicator with `ncclCommAbort`, as cudarc's own `Comm` does: a local call,
    /// where `ncclCommDestroy` may wait for the other ranks of the process to destroy theirs (the
    /// ranks are dropped one after another by their threads). Nothing is in flight by then: every
    /// step ends with host reads of the reduced values.
    fn drop(&mut self) {
        self.h.abort(self.api);
    }
}

/// A data-parallel group over the GPUs `devices` of this process for `sess` (on CUDA): `sess` is
/// rank 0 and must be on `devices[0]`; every other device gets a worker thread with its own
/// context, stream and replica, and the ranks all-reduce through NCCL (`ncclCommInitAll`). The
/// replicas multiply at the session's GEMM precision (f32, TF32 or bf16).
///
/// # Errors
/// [`SnellaError::Config`] (field `devices`) for an empty or repeated list, a device that does not
/// exist (naming how many this machine has) or a first device other than the model's;
/// `CUDA_UNAVAILABLE` without NCCL; the replicas' load errors.
pub fn cuda_group(sess: &crate::session::Session<CudaBackend>, devices: &[usize]) -> Result<crate::dp::DataParallel<CudaBackend>> {
    let list = format!("{devices:?}");
    if devices.is_empty() {
        return Err(SnellaError::config("devices", list, "at least one CUDA device ordinal"));
    }
    let mut seen = devices.to_vec();
    seen.sort_unstable();
    seen.dedup();
    if seen.len() != devices.len() {
        return Err(SnellaError::config("devices", list, "distinct CUDA device ordinals"));
    }
    let count = cudarc::driver::result::device::get_count().map_err(|e| comm_err(format!("cannot count CUDA devices: {e:?}")))? as usize;
    if let Some(&d) = devices.iter().find(|&&d| d >= count) {
        return Err(SnellaError::config(
            "devices",
            list,
            &format!("ordinals of this machine's CUDA devices: it has {count} ({}), so device {d} does not exist", if count == 1 { "cuda:0".to_string() } else { format!("cuda:0 … cuda:{}", count - 1) }),
        ));
    }
    let own = sess.be.gpu.ctx.ordinal();
    if devices[0] != own {
        return Err(SnellaError::config("devices", list, &format!("a list starting with the model's device ({own}): rank 0 is the model itself")));
    }
    let mut bes = vec![sess.be.clone()];
    for &d in &devices[1..] {
        let mut be = CudaBackend::new(d)?;
        be.gpu.set_precision(sess.be.gpu.precision())?;
        be.fused_attention = sess.be.fused_attention; // every rank takes the same attention path
        bes.push(be);
    }
    let mut comms = NcclComm::init_all(&bes)?.into_iter();
    // Opening the other GPUs (and NCCL's init) made their contexts current on this thread: rank 0,
    // which runs here, goes back to its own (cuBLAS calls do not re-bind it).
    sess.be.gpu.ctx.bind_to_thread().map_err(|e| comm_err(format!("binding the CUDA context of device {own}: {e:?}")))?;
    let c0: Box<dyn Communicator<CudaBackend>> = Box::new(comms.next().expect("one per device"));
    let others = bes.into_iter().skip(1).zip(comms).map(|(b, c)| (b, Box::new(c) as Box<dyn Communicator<CudaBackend>>)).collect();
    crate::dp::DataParallel::local(sess, c0, others)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nccl_loads_or_is_an_error_value_naming_what_was_tried() {
        // Never a panic: either NCCL 2 is here, or the error names libnccl.so.2 and the paths tried.
        match nccl_version() {
            Ok(v) => assert!(v.starts_with("NCCL 2."), "{v}"),
            Err(e) => {
                let m = e.to_string();
                assert!(m.starts_with("CUDA_UNAVAILABLE") && m.contains("libnccl.so.2") && m.contains("tried:") && m.contains("/usr/local/cuda/lib64/libnccl.so.2"), "{m}");
                assert!(unique_id().unwrap_err().to_string().contains("libnccl.so.2"));
            }
        }
        // Loading (or trying to) switched NVLink multicast off for this process.
        assert_eq!(std::env::var("NCCL_NVLS_ENABLE").as_deref(), Ok("0"));
    }
}
