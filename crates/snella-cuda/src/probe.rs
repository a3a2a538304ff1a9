//! Can CUDA work here? Library presence, driver version and device count, as typed errors.

use snella_core::SnellaError;
use std::path::PathBuf;

/// The oldest CUDA driver API version that runs our fatbin: 13.0 (driver 580).
pub const MIN_DRIVER_VERSION: i32 = 13000;

fn unavailable(message: String) -> SnellaError {
    SnellaError::Device { code: "CUDA_UNAVAILABLE".into(), message }
}

/// Extra folders searched for cuBLAS/cuBLASLt after the soname: `$SNELLA_CUDA_LIB_DIR`,
/// `$CUDA_HOME/lib64`, `/usr/local/cuda/lib64`.
fn extra_dirs() -> Vec<PathBuf> {
    let mut v = Vec::new();
    if let Ok(d) = std::env::var("SNELLA_CUDA_LIB_DIR") {
        v.push(PathBuf::from(d));
    }
    if let Ok(d) = std::env::var("CUDA_HOME") {
        v.push(PathBuf::from(d).join("lib64"));
    }
    v.push(PathBuf::from("/usr/local/cuda/lib64"));
    v
}

/// Loads `soname` by name, else from [`extra_dirs`]; a library found by path stays loaded, so
/// cudarc's later load by soname resolves to it. Returns the list of places tried on failure.
fn ensure_lib(soname: &str, present: impl Fn() -> bool) -> Result<(), Vec<String>> {
    if present() {
        return Ok(());
    }
    let mut tried = vec![format!("{soname} (by soname, LD_LIBRARY_PATH and the system cache)")];
    for d in extra_dirs() {
        let p = d.join(soname);
        tried.push(p.display().to_string());
        // SAFETY: loading a CUDA library runs its initialisers, which is what using it requires.
        if let Ok(lib) = unsafe { libloading::Library::new(&p) } {
            std::mem::forget(lib);
            if present() {
                return Ok(());
            }
        }
    }
    Err(tried)
}

/// Checks, in order: the driver library, the driver version (≥ 13.0, driver 580), a device, then
/// libcublas and libcublasLt (CUDA 13).
///
/// # Errors
/// [`SnellaError::Device`] with code `CUDA_UNAVAILABLE` naming what is missing, its version, and
/// every path tried.
pub fn probe() -> Result<String, SnellaError> {
    // SAFETY: is_culib_present only tries to dlopen the library.
    ensure_lib("libcuda.so.1", || unsafe { cudarc::driver::sys::is_culib_present() }).map_err(|t| {
        unavailable(format!("the NVIDIA driver library libcuda.so.1 was not found (tried: {}); install an NVIDIA driver ≥ 580", t.join(", ")))
    })?;
    cudarc::driver::result::init().map_err(|e| unavailable(format!("the NVIDIA driver is present but cuInit failed: {e:?}")))?;
    let mut v = 0i32;
    // SAFETY: the driver library is loaded and initialised; v is a valid out-pointer.
    unsafe { cudarc::driver::sys::cuDriverGetVersion(&mut v) };
    if v < MIN_DRIVER_VERSION {
        return Err(unavailable(format!(
            "the NVIDIA driver supports CUDA {}.{}, snella's kernels need CUDA 13.0 (driver 580 or newer)",
            v / 1000,
            (v % 1000) / 10
        )));
    }
    let n = cudarc::driver::result::device::get_count().map_err(|e| unavailable(format!("cannot count CUDA devices: {e:?}")))?;
    if n < 1 {
        return Err(unavailable("the NVIDIA driver reports no CUDA device".into()));
    }
    // SAFETY: as above, these only try to dlopen.
    ensure_lib("libcublas.so.13", || unsafe { cudarc::cublas::sys::is_culib_present() }).map_err(|t| {
        unavailable(format!("libcublas.so.13 (CUDA 13 toolkit or the nvidia-cublas wheel) was not found (tried: {}); set SNELLA_CUDA_LIB_DIR", t.join(", ")))
    })?;
    ensure_lib("libcublasLt.so.13", || unsafe { cudarc::cublaslt::sys::is_culib_present() }).map_err(|t| {
        unavailable(format!("libcublasLt.so.13 was not found (tried: {}); set SNELLA_CUDA_LIB_DIR", t.join(", ")))
    })?;
    Ok(format!("CUDA driver {}.{}, {n} device(s)", v / 1000, (v % 1000) / 10))
}
