//! Launcher of `kernels/cross_entropy.cu`: mean softmax cross-entropy fused with its gradient.

use super::reduce::{check_len, dim_u32, scratch};
use super::{In, Out};
use crate::device::{cuda_err, Gpu};
use cudarc::driver::{CudaView, LaunchConfig, PushKernelArg};
use snella_core::SnellaError;

/// For `logits: [b, c]` (f32) and `labels: [b]` (u32 on the device), writes
/// `dlogits = (softmax − onehot)/b` (`[b, c]`, f32) and `stats[0] = mean loss`,
/// `stats[1] = number of rows whose argmax equals the label` (as f32), as
/// `snella_core::ops::cross_entropy::cross_entropy`; the results stay on the device until the host
/// reads `stats`.
///
/// Per row the loss is `logsumexp(row) − row[label]` around the row maximum; the per-row losses
/// are summed in f64 in a fixed order (deterministic). The argmax is the first maximal index. With
/// `b = 0`, `stats = (0, 0)`. Labels are not checked here (that needs a host read): a label `≥ c`
/// gives that row NaN `dlogits` and a NaN loss, which [`super::reduce::all_finite`] detects.
/// Allocates `2·b` floats of scratch.
///
/// # Errors
/// `Tensor` when a buffer is too short (`stats` needs 2); `CUDA_OOM` for the scratch;
/// `CUDA_ERROR` on a launch failure.
pub fn cross_entropy(
    gpu: &Gpu, logits: &In, labels: &CudaView<u32>, b: usize, c: usize, dlogits: &mut Out, stats: &mut Out,
) -> Result<(), SnellaError> {
    let op = "cross_entropy";
    check_len(op, "logits", logits.len(), b * c)?;
    check_len(op, "labels", labels.len(), b)?;
    check_len(op, "dlogits", dlogits.len(), b * c)?;
    check_len(op, "stats", stats.len(), 2)?;
    if b > 0 && c == 0 {
        return Err(SnellaError::config("cross_entropy.c", 0, "at least one class"));
    }
    let (b32, c32) = (dim_u32(op, "b", b)?, dim_u32(op, "c", c)?);
    let mut rows = scratch(gpu, 2 * b)?;
    let inv_b = if b > 0 { 1.0f32 / b as f32 } else { 0.0 };
    if b > 0 {
        let (mut loss, mut hit) = rows.split_at_mut(b);
        let f = gpu.func("snella_cross_entropy_rows");
        let cfg = LaunchConfig { grid_dim: (b.div_ceil(8) as u32, 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 };
        let mut l = gpu.stream.launch_builder(&f);
        l.arg(logits).arg(labels).arg(&b32).arg(&c32).arg(&inv_b).arg(dlogits).arg(&mut loss).arg(&mut hit);
        // SAFETY: logits/dlogits hold b·c floats, labels b u32, loss/hit b floats (checked); one warp
        // per row r < b; a label ≥ c is never used as an index.
        unsafe { l.launch(cfg) }.map_err(|e| cuda_err("snella_cross_entropy_rows", e))?;
    }
    let (loss, hit) = (rows.slice(..b.max(1)), rows.slice(b.min(rows.len() - 1)..));
    let f = gpu.func("snella_cross_entropy_final");
    let cfg = LaunchConfig { grid_dim: (1, 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 };
    let mut l = gpu.stream.launch_builder(&f);
    l.arg(&loss).arg(&hit).arg(&b32).arg(stats);
    // SAFETY: loss and hit hold b floats each (only r < b is read), stats 2 (checked).
    unsafe { l.launch(cfg) }.map(|_| ()).map_err(|e| cuda_err("snella_cross_entropy_final", e))
}
