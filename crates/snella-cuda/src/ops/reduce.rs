//! Launchers of `kernels/reduce.cu`: the bias gradient (deterministic column sums) and a device-side
//! non-finite check; plus the argument checks and scratch helpers shared by this crate's op launchers.

use super::{In, Out};
use crate::device::{cuda_err, Gpu};
use cudarc::driver::{CudaSlice, CudaViewMut, LaunchConfig, PushKernelArg};
use snella_core::SnellaError;

/// Rows per partial sum of the two-pass column reductions (must equal `SNELLA_RED_CHUNK` and
/// `SNELLA_LN_CHUNK` in the kernels).
pub(crate) const ROW_CHUNK: usize = 64;

/// A `Tensor` error unless a buffer of `have` elements holds the `need` an op requires.
pub(crate) fn check_len(op: &str, name: &str, have: usize, need: usize) -> Result<(), SnellaError> {
    if have < need {
        return Err(SnellaError::tensor("<device>", &format!("{op}.{name}"), format!("has {have} elements, needs {need}")));
    }
    Ok(())
}

/// `v` as a kernel's `unsigned` argument, or a `Config` error naming the dimension.
pub(crate) fn dim_u32(op: &str, name: &str, v: usize) -> Result<u32, SnellaError> {
    u32::try_from(v).map_err(|_| SnellaError::config(&format!("{op}.{name}"), v, "at most 4294967295 on the GPU"))
}

/// An uninitialised device scratch buffer of `n` (≥ 1) floats; every kernel that reads it writes it first.
pub(crate) fn scratch(gpu: &Gpu, n: usize) -> Result<CudaSlice<f32>, SnellaError> {
    // SAFETY: callers launch a kernel that writes every element they later read.
    unsafe { gpu.uninit::<f32>(n) }
}

/// A grid-stride launch over `n` elements: 256 threads per block, at most 8192 blocks.
pub(crate) fn grid_stride(n: usize) -> LaunchConfig {
    let blocks = n.div_ceil(256).clamp(1, 8192) as u32;
    LaunchConfig { grid_dim: (blocks, 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 }
}

/// Launches the two-pass column sum `out[c] (+)= Σ_r src[r, c]` over `src: [rows, cols]`: chunk
/// partials of [`ROW_CHUNK`] rows into scratch, then the chunks in order.
fn colsum(gpu: &Gpu, src: &In, rows: usize, cols: usize, out: &mut Out, accumulate: bool) -> Result<(), SnellaError> {
    let (r32, c32) = (dim_u32("bias_grad", "rows", rows)?, dim_u32("bias_grad", "cols", cols)?);
    let nchunks = rows.div_ceil(ROW_CHUNK);
    let mut part = scratch(gpu, nchunks * cols)?;
    let f = gpu.func("snella_colsum_partial");
    let cfg = LaunchConfig { grid_dim: (cols.div_ceil(32) as u32, nchunks.min(65535) as u32, 1), block_dim: (32, 8, 1), shared_mem_bytes: 0 };
    let mut b = gpu.stream.launch_builder(&f);
    b.arg(src).arg(&r32).arg(&c32).arg(&mut part);
    // SAFETY: src holds rows·cols floats (checked), part nchunks·cols (rows ≥ 1); the kernel
    // bounds-checks rows and columns and writes every part element.
    unsafe { b.launch(cfg) }.map_err(|e| cuda_err("snella_colsum_partial", e))?;
    let f = gpu.func("snella_colsum_final");
    let (n32, acc) = (nchunks as u32, accumulate as u32);
    let mut b = gpu.stream.launch_builder(&f);
    b.arg(&part).arg(&n32).arg(&c32).arg(out).arg(&acc);
    // SAFETY: part holds nchunks·cols floats, out cols (checked); c < cols is checked.
    unsafe { b.launch(super::grid(cols)) }.map(|_| ()).map_err(|e| cuda_err("snella_colsum_final", e))
}

/// `db[c] (+)= Σ_r dy[r, c]` for `dy: [rows, cols]` f32; overwrites `db: [cols]` unless
/// `accumulate`, as `snella_core::ops::linear::bias_grad`.
///
/// Deterministic: rows are summed in fixed chunks of 64 rows (each by a fixed thread layout and
/// tree), and the chunk sums in chunk order. Allocates `ceil(rows/64)·cols` floats of scratch.
///
/// # Errors
/// `Tensor` when `dy` or `db` is too short; `CUDA_OOM` for the scratch; `CUDA_ERROR` on a launch failure.
pub fn bias_grad(gpu: &Gpu, dy: &In, rows: usize, cols: usize, db: &mut Out, accumulate: bool) -> Result<(), SnellaError> {
    check_len("bias_grad", "dy", dy.len(), rows * cols)?;
    check_len("bias_grad", "db", db.len(), cols)?;
    if cols == 0 {
        return Ok(());
    }
    if rows == 0 {
        if !accumulate {
            gpu.stream.memset_zeros(&mut db.slice_mut(..cols)).map_err(|e| cuda_err("bias_grad: memset", e))?;
        }
        return Ok(());
    }
    colsum(gpu, dy, rows, cols, db, accumulate)
}

/// Sets `flag[0] = 1` (u32, on the device) when any element of `x` (f32) is NaN or ±Inf; leaves it
/// unchanged otherwise, so the caller zeroes the flag once and may check several tensors into it,
/// then reads it when it wants (no host sync here).
///
/// # Errors
/// `Tensor` when `flag` is empty; `CUDA_ERROR` on a launch failure.
pub fn all_finite(gpu: &Gpu, x: &In, flag: &mut CudaViewMut<u32>) -> Result<(), SnellaError> {
    check_len("all_finite", "flag", flag.len(), 1)?;
    let n = x.len();
    if n == 0 {
        return Ok(());
    }
    let f = gpu.func("snella_all_finite");
    let n64 = n as u64;
    let mut b = gpu.stream.launch_builder(&f);
    b.arg(x).arg(&n64).arg(flag);
    // SAFETY: x holds n floats and flag at least one u32; grid-stride over i < n.
    unsafe { b.launch(grid_stride(n)) }.map(|_| ()).map_err(|e| cuda_err("snella_all_finite", e))
}

/// The index of the first of `xs` holding a NaN or ±Inf, if any: one multi-tensor launch over a
/// pointer table (2 × u64 per tensor), then one host wait for the flags.
///
/// # Errors
/// `CUDA_ERROR` on an upload, launch or download failure.
pub fn first_non_finite(gpu: &Gpu, xs: &[&CudaSlice<f32>]) -> Result<Option<usize>, SnellaError> {
    use cudarc::driver::DevicePtr;
    if xs.is_empty() {
        return Ok(None);
    }
    let mut table: Vec<u64> = Vec::with_capacity(2 * xs.len());
    let mut records = Vec::with_capacity(xs.len());
    let mut longest = 0usize;
    for x in xs {
        let (p, r) = x.device_ptr(&gpu.stream);
        table.extend([p, x.len() as u64]);
        records.push(r);
        longest = longest.max(x.len());
    }
    let dev = gpu.stream.clone_htod(&table).map_err(|e| cuda_err("upload of the finite-check table", e))?;
    let mut flags = gpu.stream.alloc_zeros::<u32>(xs.len()).map_err(|e| gpu.oom(4 * xs.len(), e))?;
    let count = xs.len() as u32;
    let cfg = LaunchConfig { grid_dim: (longest.div_ceil(256).clamp(1, 64) as u32, count.min(65535), 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 };
    let f = gpu.func("snella_all_finite_multi");
    let mut b = gpu.stream.launch_builder(&f);
    b.arg(&dev).arg(&count).arg(&mut flags);
    // SAFETY: the table holds valid pointers and lengths of the tensors; flags holds one u32 each.
    unsafe { b.launch(cfg) }.map_err(|e| cuda_err("snella_all_finite_multi", e))?;
    drop(records);
    let v = gpu.stream.clone_dtoh(&flags).map_err(|e| cuda_err("download", e))?;
    Ok(v.iter().position(|&f| f != 0))
}
