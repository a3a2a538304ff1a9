//! Launchers of `kernels/flash_attention.cu`: fused multi-head self-attention for head dimension 64
//! on bf16 tensor cores (f32 accumulation), forward and backward, saving the row log-sum-exp
//! `lse: [b, heads, t]` instead of the probabilities `[b, heads, t, t]` (the design's "flash-style
//! forward and backward"; Dao et al., FlashAttention, 2022, §3.1: recompute P from the saved
//! softmax statistics in the backward).
//!
//! Layouts as [`super::attention`]: `qkv: [b, t, 3·d]`, `out`/`dout: [b, t, d]`, `d = heads·64`.
//! A block keeps every key of one (image, head) in shared memory, so `t` is limited by the
//! device's shared memory per block ([`supported`]: `t ≤ 304` on an H200); the CUDA backend uses
//! these kernels in bf16 precision where [`supported`] holds and the f32 kernels otherwise.

use super::reduce::{check_len, dim_u32, scratch};
use super::{In, Out};
use crate::device::{cuda_err, Gpu};
use cudarc::driver::sys::{CUdevice_attribute, CUfunction_attribute_enum};
use cudarc::driver::{LaunchConfig, PushKernelArg};
use snella_core::SnellaError;

/// The head dimension these kernels are built for (every timm ViT from Ti to L).
pub const HEAD_DIM: usize = 64;
const HDP: usize = 72;
const WARPS: usize = 4;

/// `t` rounded up to the 16-row tensor-core tile.
fn padded(t: usize) -> usize {
    t.div_ceil(16) * 16
}

/// Dynamic shared memory (bytes) of the three kernels for `t` tokens: forward, dq, dkv (the
/// layouts at the top of each kernel: staged k/v or q/dO, each warp's staged rows, f32 scratch
/// rows of `max(tp, 64) + 4` and bf16 P rows of `tp + 8`).
fn smem(t: usize) -> [usize; 3] {
    let tp = padded(t);
    let (sf, sp) = (tp.max(HEAD_DIM) + 4, tp + 8);
    let common = 2 * tp * HDP * 2 + WARPS * 16 * sf * 4 + WARPS * 16 * sp * 2;
    [common + WARPS * 16 * HDP * 2, common + WARPS * 32 * HDP * 2, common + WARPS * 32 * HDP * 2 + 2 * tp * 4]
}

/// Whether the fused kernels can run attention with `t` tokens and head dimension `hd` on this
/// device: `hd = 64` and every kernel's shared memory within the device's per-block opt-in limit.
pub fn supported(gpu: &Gpu, t: usize, hd: usize) -> bool {
    let limit = gpu.ctx.attribute(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN).map(|v| v.max(0) as usize).unwrap_or(0);
    hd == HEAD_DIM && t >= 1 && smem(t).iter().all(|&s| s <= limit)
}

/// Loads kernel `name` with `bytes` of dynamic shared memory allowed.
fn kernel(gpu: &Gpu, name: &'static str, bytes: usize) -> Result<cudarc::driver::CudaFunction, SnellaError> {
    let f = gpu.func(name);
    f.set_attribute(CUfunction_attribute_enum::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES, bytes as i32).map_err(|e| cuda_err(name, e))?;
    Ok(f)
}

/// Grid (splits, heads, b): one block per (image, head) stages its keys once; with few images the
/// 16-row tiles of each (image, head) are spread over up to ⌈tiles / 4⌉ blocks to fill the GPU.
fn cfg(gpu: &Gpu, t: usize, heads: usize, b: usize, bytes: usize) -> LaunchConfig {
    let sms = gpu.ctx.attribute(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT).map(|v| v.max(1) as usize).unwrap_or(132);
    let max_splits = t.div_ceil(16).div_ceil(WARPS).max(1);
    let splits = sms.div_ceil(b * heads).clamp(1, max_splits);
    LaunchConfig { grid_dim: (splits as u32, heads as u32, b as u32), block_dim: (32 * WARPS as u32, 1, 1), shared_mem_bytes: bytes as u32 }
}

/// Checks the shapes shared by both directions; returns `(t, tp, heads)` as u32.
fn dims(gpu: &Gpu, op: &str, b: usize, t: usize, heads: usize, hd: usize) -> Result<(u32, u32, u32), SnellaError> {
    if !supported(gpu, t, hd) {
        return Err(SnellaError::config(&format!("{op}.shape"), format!("t={t}, head dim {hd}"), "head dim 64 and t within the device's shared memory (see flash_attention::supported)"));
    }
    if b > 65535 || heads > 65535 {
        return Err(SnellaError::config(&format!("{op}.shape"), format!("b={b}, heads={heads}"), "at most 65535 images and heads per launch"));
    }
    Ok((dim_u32(op, "t", t)?, dim_u32(op, "tp", padded(t))?, heads as u32))
}

/// Writes `out: [b, t, d]` and `lse: [b, heads, t]` from `qkv: [b, t, 3·d]` (all f32 in memory):
/// per image and head `P = softmax(scale·q·kᵀ)` with `scale = 64^-0.5`, `out_h = P·v`, and
/// `lse = log Σ_j exp(scale·q·k_jᵀ)` per row. q, k, v and P enter the products as bf16.
///
/// # Errors
/// `CONFIG` when not [`supported`]; `Tensor` when a buffer is shorter than its shape needs;
/// `CUDA_ERROR` on a launch failure.
#[allow(clippy::too_many_arguments)]
pub fn attention_fwd(gpu: &Gpu, qkv: &In, b: usize, t: usize, heads: usize, hd: usize, out: &mut Out, lse: &mut Out) -> Result<(), SnellaError> {
    let op = "flash_attention_fwd";
    let d = heads * hd;
    check_len(op, "qkv", qkv.len(), b * t * 3 * d)?;
    check_len(op, "out", out.len(), b * t * d)?;
    check_len(op, "lse", lse.len(), b * heads * t)?;
    if b == 0 || t == 0 || heads == 0 {
        return Ok(());
    }
    let (t32, tp32, h32) = dims(gpu, op, b, t, heads, hd)?;
    let scale = (hd as f64).powf(-0.5) as f32;
    let bytes = smem(t)[0];
    let f = kernel(gpu, "snella_flash_attn_fwd", bytes)?;
    let mut l = gpu.stream.launch_builder(&f);
    l.arg(qkv).arg(&mut *out).arg(&mut *lse).arg(&t32).arg(&tp32).arg(&h32).arg(&scale);
    // SAFETY: lengths checked above; every block reads rows < t of its image and writes rows < t of
    // its own query tiles and head; shared memory as sized by smem().
    unsafe { l.launch(cfg(gpu, t, heads, b, bytes)) }.map(|_| ()).map_err(|e| cuda_err("snella_flash_attn_fwd", e))
}

/// Backward of [`attention_fwd`]: writes (overwrites) `dqkv: [b, t, 3·d]` from `dout: [b, t, d]`,
/// the forward's input `qkv`, output `out` and `lse`. Per head: `D = rowsum(dO ⊙ O)`,
/// `P = exp(scale·q·kᵀ − lse)`, `dv = Pᵀ·dO`, `dS = P ⊙ (dO·vᵀ − D)`, `dq = scale·dS·k`,
/// `dk = scale·dSᵀ·q`. Two launches (query tiles, then key tiles) and `b·heads·t` floats of
/// scratch for `D`. Deterministic.
///
/// # Errors
/// As [`attention_fwd`]; `CUDA_OOM` for the scratch.
#[allow(clippy::too_many_arguments)]
pub fn attention_bwd(gpu: &Gpu, dout: &In, qkv: &In, out: &In, lse: &In, b: usize, t: usize, heads: usize, hd: usize, dqkv: &mut Out) -> Result<(), SnellaError> {
    let op = "flash_attention_bwd";
    let d = heads * hd;
    check_len(op, "qkv", qkv.len(), b * t * 3 * d)?;
    check_len(op, "dqkv", dqkv.len(), b * t * 3 * d)?;
    check_len(op, "dout", dout.len(), b * t * d)?;
    check_len(op, "out", out.len(), b * t * d)?;
    check_len(op, "lse", lse.len(), b * heads * t)?;
    if b == 0 || t == 0 || heads == 0 {
        return Ok(());
    }
    let (t32, tp32, h32) = dims(gpu, op, b, t, heads, hd)?;
    let scale = (hd as f64).powf(-0.5) as f32;
    let [_, b_dq, b_dkv] = smem(t);
    let mut dsum = scratch(gpu, b * heads * t)?;
    let f = kernel(gpu, "snella_flash_attn_bwd_dq", b_dq)?;
    let mut l = gpu.stream.launch_builder(&f);
    l.arg(qkv).arg(out).arg(dout).arg(lse).arg(&mut dsum).arg(&mut *dqkv).arg(&t32).arg(&tp32).arg(&h32).arg(&scale);
    // SAFETY: lengths checked; blocks write dsum rows and the q columns of their own query rows.
    unsafe { l.launch(cfg(gpu, t, heads, b, b_dq)) }.map_err(|e| cuda_err("snella_flash_attn_bwd_dq", e))?;
    let f = kernel(gpu, "snella_flash_attn_bwd_dkv", b_dkv)?;
    let mut l = gpu.stream.launch_builder(&f);
    l.arg(qkv).arg(dout).arg(lse).arg(&dsum).arg(&mut *dqkv).arg(&t32).arg(&tp32).arg(&h32).arg(&scale);
    // SAFETY: lengths checked; dsum was written for every row < t above; blocks write the k and v
    // columns of their own key rows.
    unsafe { l.launch(cfg(gpu, t, heads, b, b_dkv)) }.map(|_| ()).map_err(|e| cuda_err("snella_flash_attn_bwd_dkv", e))
}
