//! Launchers of `kernels/attention.cu`: the multi-head self-attention core, forward and backward, f32.
//!
//! Layout (timm): `qkv: [b, t, 3·d]` with column `s·d + h·hd + e` for q/k/v (`s` = 0/1/2) of head
//! `h`, element `e`; `out: [b, t, d]` with column `h·hd + e`; `probs: [b, heads, t, t]`;
//! `d = heads·hd`. Any `t`; `hd ≤ 128`.

use super::reduce::{check_len, dim_u32, scratch};
use super::{In, Out};
use crate::device::{cuda_err, Gpu};
use cudarc::driver::{LaunchConfig, PushKernelArg};
use snella_core::SnellaError;

/// The largest head dimension the kernels take (`SNELLA_ATT_MAXHD`).
pub const MAX_HEAD_DIM: usize = 128;
/// Query rows per block (`SNELLA_ATT_QT`).
const QT: usize = 16;
/// Key rows per block of the dk/dv kernel (`SNELLA_ATT_KT`).
const KT: usize = 32;

fn check_dims(op: &str, b: usize, t: usize, heads: usize, hd: usize) -> Result<[u32; 3], SnellaError> {
    if hd > MAX_HEAD_DIM {
        return Err(SnellaError::config(&format!("{op}.head_dim"), hd, "at most 128 on the CUDA attention kernels"));
    }
    if b * heads > 65535 {
        return Err(SnellaError::config(&format!("{op}.b·heads"), b * heads, "at most 65535 (the grid's y dimension)"));
    }
    dim_u32(op, "t·t", t * t)?;
    Ok([t as u32, heads as u32, hd as u32])
}

/// Writes `out: [b, t, d]` and saves `probs: [b, heads, t, t]` from `qkv: [b, t, 3·d]` (all f32),
/// as `snella_core::ops::attention::attention_fwd`: per batch element and head,
/// `P = softmax(q·kᵀ·hd^-0.5)` over keys, `out_h = P·v`.
///
/// # Errors
/// `Config` when `hd > 128`; `Tensor` when a buffer is shorter than its shape needs;
/// `CUDA_ERROR` on a launch failure.
#[allow(clippy::too_many_arguments)]
pub fn attention_fwd(
    gpu: &Gpu, qkv: &In, b: usize, t: usize, heads: usize, hd: usize, out: &mut Out, probs: &mut Out,
) -> Result<(), SnellaError> {
    let op = "attention_fwd";
    let d = heads * hd;
    check_len(op, "qkv", qkv.len(), b * t * 3 * d)?;
    check_len(op, "out", out.len(), b * t * d)?;
    check_len(op, "probs", probs.len(), b * heads * t * t)?;
    let [t32, h32, hd32] = check_dims(op, b, t, heads, hd)?;
    if b == 0 || t == 0 || d == 0 {
        return Ok(());
    }
    let scale = (hd as f64).powf(-0.5) as f32;
    let cfg = LaunchConfig { grid_dim: (t.div_ceil(QT) as u32, (b * heads) as u32, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 };
    let f = gpu.func("snella_attention_fwd");
    let mut l = gpu.stream.launch_builder(&f);
    l.arg(qkv).arg(out).arg(probs).arg(&t32).arg(&h32).arg(&hd32).arg(&scale);
    // SAFETY: qkv, out and probs hold their shapes (checked); hd ≤ 128 fits the shared tiles;
    // every index is bounded by t, hd and b·heads (the grid).
    unsafe { l.launch(cfg) }.map(|_| ()).map_err(|e| cuda_err("snella_attention_fwd", e))
}

/// Backward of [`attention_fwd`], as `snella_core::ops::attention::attention_bwd`: writes (overwrites)
/// `dqkv: [b, t, 3·d]` from `dout: [b, t, d]`, the forward input `qkv` and the saved
/// `probs: [b, heads, t, t]` (all f32). Per head: `dv = Pᵀ·dO`, `dP = dO·vᵀ`,
/// `dS = P ⊙ (dP − rowsum(dP ⊙ P))`, `dq = scale·dS·k`, `dk = scale·dSᵀ·q`.
///
/// Two kernels (query tiles for dS and dq, key tiles for dk and dv); deterministic (no atomics).
/// Allocates `b·heads·t·t` floats of scratch for dS.
///
/// # Errors
/// `Config` when `hd > 128`; `Tensor` when a buffer is shorter than its shape needs; `CUDA_OOM`
/// for the scratch; `CUDA_ERROR` on a launch failure.
#[allow(clippy::too_many_arguments)]
pub fn attention_bwd(
    gpu: &Gpu, dout: &In, qkv: &In, probs: &In, b: usize, t: usize, heads: usize, hd: usize, dqkv: &mut Out,
) -> Result<(), SnellaError> {
    let op = "attention_bwd";
    let d = heads * hd;
    check_len(op, "qkv", qkv.len(), b * t * 3 * d)?;
    check_len(op, "dqkv", dqkv.len(), b * t * 3 * d)?;
    check_len(op, "dout", dout.len(), b * t * d)?;
    check_len(op, "probs", probs.len(), b * heads * t * t)?;
    let [t32, h32, hd32] = check_dims(op, b, t, heads, hd)?;
    if b == 0 || t == 0 || d == 0 {
        return Ok(());
    }
    let scale = (hd as f64).powf(-0.5) as f32;
    let mut ds = scratch(gpu, b * heads * t * t)?;
    let cfg = LaunchConfig { grid_dim: (t.div_ceil(QT) as u32, (b * heads) as u32, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 };
    let f = gpu.func("snella_attention_bwd_dq");
    let mut l = gpu.stream.launch_builder(&f);
    l.arg(dout).arg(qkv).arg(probs).arg(&mut ds).arg(&mut *dqkv).arg(&t32).arg(&h32).arg(&hd32).arg(&scale);
    // SAFETY: buffers hold their shapes (checked), ds b·heads·t·t; each block writes the dS rows it
    // later reads; hd ≤ 128 fits the shared tiles.
    unsafe { l.launch(cfg) }.map_err(|e| cuda_err("snella_attention_bwd_dq", e))?;
    let cfg = LaunchConfig { grid_dim: (t.div_ceil(KT) as u32, (b * heads) as u32, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 };
    let f = gpu.func("snella_attention_bwd_dkv");
    let mut l = gpu.stream.launch_builder(&f);
    l.arg(dout).arg(qkv).arg(probs).arg(&ds).arg(dqkv).arg(&t32).arg(&h32).arg(&hd32).arg(&scale);
    // SAFETY: as above; ds was fully written by the previous kernel on the same stream.
    unsafe { l.launch(cfg) }.map(|_| ()).map_err(|e| cuda_err("snella_attention_bwd_dkv", e))
}
