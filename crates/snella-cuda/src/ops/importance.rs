//! Launcher of `kernels/importance.cu`: the allocator's importance/uncertainty EMA update
//! (spec §5) on the device, so the per-element statistics never cross to the host per step.

use super::reduce::{check_len, grid_stride};
use super::{In, Out};
use crate::device::{cuda_err, Gpu};
use cudarc::driver::{CudaSlice, DevicePtr, DevicePtrMut, PushKernelArg};
use snella_core::SnellaError;

/// One EMA update over a parameter `p` and its gradient `g` (f32, `n = p.len()`), as
/// `snella_core::snella::importance::importance_update`: `I = |p ⊙ g|` (a non-finite `I` counts as
/// 0), `Ī ← β1·Ī + (1−β1)·I`, `Ū ← β2·Ū + (1−β2)·|I − Ī|`, bit-identical to the CPU. Adds the
/// number of non-finite `I` to `bad[0]` (an f32 counter).
///
/// # Errors
/// `Tensor` when `g`, `ibar` or `ubar` is shorter than `p`, or `bad` is empty; `CUDA_ERROR` on a
/// launch failure.
#[allow(clippy::too_many_arguments)]
pub fn importance_update(gpu: &Gpu, p: &In, g: &In, ibar: &mut Out, ubar: &mut Out, beta1: f32, beta2: f32, bad: &mut Out) -> Result<(), SnellaError> {
    let n = p.len();
    check_len("importance_update", "g", g.len(), n)?;
    check_len("importance_update", "ibar", ibar.len(), n)?;
    check_len("importance_update", "ubar", ubar.len(), n)?;
    check_len("importance_update", "bad", bad.len(), 1)?;
    if n == 0 {
        return Ok(());
    }
    let (c1, c2) = (1.0f32 - beta1, 1.0f32 - beta2);
    let n64 = n as u64;
    let f = gpu.func("snella_importance_update");
    let mut b = gpu.stream.launch_builder(&f);
    b.arg(p).arg(g).arg(ibar).arg(ubar).arg(&n64).arg(&beta1).arg(&c1).arg(&beta2).arg(&c2).arg(bad);
    // SAFETY: p, g, ibar, ubar hold n floats and bad one (checked); grid-stride over i < n.
    unsafe { b.launch(grid_stride(n)) }.map(|_| ()).map_err(|e| cuda_err("snella_importance_update", e))
}

/// One tensor of [`importance_update_multi`]: a parameter, its gradient, its EMAs `Ī`, `Ū` (f32,
/// equal lengths) and the index of its non-finite counter in `bad`.
pub struct ImportanceTensor<'a> {
    /// The parameter `p`.
    pub p: &'a CudaSlice<f32>,
    /// Its gradient `g`.
    pub g: &'a CudaSlice<f32>,
    /// `Ī`, updated in place.
    pub ibar: &'a mut CudaSlice<f32>,
    /// `Ū`, updated in place.
    pub ubar: &'a mut CudaSlice<f32>,
    /// Index of this tensor's counter in `bad`.
    pub slot: usize,
}

/// [`importance_update`] over many tensors in one launch (the allocator's 2 per adapter: 144 for
/// ViT-B/16's 72 adapters), bit-identical to one call per tensor. The pointer table (6 × u64 per
/// tensor) is uploaded per call.
///
/// # Errors
/// `Tensor` when a gradient or EMA is shorter than its parameter or a slot is outside `bad`;
/// `CUDA_ERROR` on a launch or upload failure.
pub fn importance_update_multi(gpu: &Gpu, tensors: &mut [ImportanceTensor<'_>], beta1: f32, beta2: f32, bad: &mut CudaSlice<f32>) -> Result<(), SnellaError> {
    let count = tensors.len() as u32;
    let mut table: Vec<u64> = Vec::with_capacity(6 * tensors.len());
    let mut records = Vec::with_capacity(4 * tensors.len());
    let mut longest = 0usize;
    for (i, t) in tensors.iter_mut().enumerate() {
        let n = t.p.len();
        for (what, len) in [("g", t.g.len()), ("ibar", t.ibar.len()), ("ubar", t.ubar.len())] {
            check_len("importance_update_multi", &format!("tensor {i} {what}"), len, n)?;
        }
        check_len("importance_update_multi", &format!("bad (slot {} of tensor {i})", t.slot), bad.len(), t.slot + 1)?;
        longest = longest.max(n);
        let (pp, rp) = t.p.device_ptr(&gpu.stream);
        let (gp, rg) = t.g.device_ptr(&gpu.stream);
        let (ip, ri) = t.ibar.device_ptr_mut(&gpu.stream);
        let (up, ru) = t.ubar.device_ptr_mut(&gpu.stream);
        table.extend([pp, gp, ip, up, n as u64, t.slot as u64]);
        records.extend([rp, rg, ri, ru]);
    }
    if longest == 0 {
        return Ok(());
    }
    let dev = gpu.stream.clone_htod(&table).map_err(|e| cuda_err("upload of the importance tensor table", e))?;
    let (c1, c2) = (1.0f32 - beta1, 1.0f32 - beta2);
    let cfg = cudarc::driver::LaunchConfig {
        grid_dim: (longest.div_ceil(256).clamp(1, 64) as u32, count.min(65535), 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    };
    let f = gpu.func("snella_importance_update_multi");
    let mut b = gpu.stream.launch_builder(&f);
    b.arg(&dev).arg(&count).arg(&beta1).arg(&c1).arg(&beta2).arg(&c2).arg(bad);
    // SAFETY: the table holds valid device pointers of tensors of the lengths given and slots inside
    // `bad` (checked); each thread touches elements i < n of one tensor.
    unsafe { b.launch(cfg) }.map_err(|e| cuda_err("snella_importance_update_multi", e))?;
    drop(records);
    Ok(())
}
