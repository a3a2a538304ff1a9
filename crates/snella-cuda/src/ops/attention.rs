//! The multi-head self-attention core, forward and backward, f32: cuBLAS batched products (one call
//! per product over every (image, head), through pointer tables) around the row-softmax kernels of
//! `kernels/attention.cu`. The products use the handle's math mode (strict f32, or TF32 after
//! [`Gpu::set_tf32`]).
//!
//! Layout (timm): `qkv: [b, t, 3·d]` with column `s·d + h·hd + e` for q/k/v (`s` = 0/1/2) of head
//! `h`, element `e`; `out: [b, t, d]` with column `h·hd + e`; `probs: [b, heads, t, t]`;
//! `d = heads·hd`. Each head's q, k, v is a column block of `qkv` (row stride `3·d`), so nothing is
//! gathered or transposed. Any `t`, any `hd`.

use super::reduce::{check_len, dim_u32, scratch};
use super::{In, Out};
use crate::device::{cuda_err, Gpu};
use crate::gemm::gemm_batched;
use cudarc::driver::{LaunchConfig, PushKernelArg};
use snella_core::SnellaError;

fn rows_cfg(rows: usize) -> LaunchConfig {
    LaunchConfig { grid_dim: (rows.div_ceil(8) as u32, 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 }
}

/// Writes `out: [b, t, d]` and saves `probs: [b, heads, t, t]` from `qkv: [b, t, 3·d]` (all f32),
/// as `snella_core::ops::attention::attention_fwd`: per batch element and head,
/// `P = softmax(q·kᵀ·hd^-0.5)` over keys, `out_h = P·v`.
///
/// # Errors
/// `Tensor` when a buffer is shorter than its shape needs;
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
    if b == 0 || t == 0 || d == 0 {
        return Ok(());
    }
    let rows = b * heads * t;
    let rows32 = dim_u32(op, "b·heads·t", rows)?;
    let t32 = dim_u32(op, "t", t)?;
    let scale = (hd as f64).powf(-0.5) as f32;
    let (r3, tt) = (3 * d, t * t);
    // offsets of problem z = image·heads + head
    let z = |f: &dyn Fn(usize, usize) -> usize| -> Vec<usize> { (0..b * heads).map(|z| f(z / heads, z % heads)).collect() };
    let (q_off, k_off, v_off) = (z(&|i, h| i * t * r3 + h * hd), z(&|i, h| i * t * r3 + d + h * hd), z(&|i, h| i * t * r3 + 2 * d + h * hd));
    let (p_off, o_off) = (z(&|i, h| (i * heads + h) * tt), z(&|i, h| i * t * d + h * hd));
    // S = scale · q · kᵀ → probs
    // SAFETY: every problem lies inside qkv [b,t,3d] / probs [b,heads,t,t] (lengths checked).
    unsafe { gemm_batched(gpu, false, true, t, t, hd, scale, qkv, &q_off, r3, qkv, &k_off, r3, 0.0, probs, &p_off, t)? };
    let f = gpu.func("snella_softmax_rows_fwd");
    let mut l = gpu.stream.launch_builder(&f);
    l.arg(&mut *probs).arg(&rows32).arg(&t32);
    // SAFETY: probs holds rows·t floats (checked); each warp touches only its row.
    unsafe { l.launch(rows_cfg(rows)) }.map_err(|e| cuda_err("snella_softmax_rows_fwd", e))?;
    // out = P · v
    // SAFETY: as above; out [b,t,d] column block per head.
    unsafe { gemm_batched(gpu, false, false, t, hd, t, 1.0, &*probs, &p_off, t, qkv, &v_off, r3, 0.0, out, &o_off, d)? };
    Ok(())
}

/// Backward of [`attention_fwd`], as `snella_core::ops::attention::attention_bwd`: writes (overwrites)
/// `dqkv: [b, t, 3·d]` from `dout: [b, t, d]`, the forward input `qkv` and the saved
/// `probs: [b, heads, t, t]` (all f32). Per head: `dv = Pᵀ·dO`, `dP = dO·vᵀ`,
/// `dS = P ⊙ (dP − rowsum(dP ⊙ P))`, `dq = scale·dS·k`, `dk = scale·dSᵀ·q`.
///
/// Deterministic (cuBLAS products and one warp per softmax row). Allocates `b·heads·t·t` floats of
/// scratch for dP/dS.
///
/// # Errors
/// `Tensor` when a buffer is shorter than its shape needs; `CUDA_OOM`
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
    if b == 0 || t == 0 || d == 0 {
        return Ok(());
    }
    let rows = b * heads * t;
    let rows32 = dim_u32(op, "b·heads·t", rows)?;
    let t32 = dim_u32(op, "t", t)?;
    let scale = (hd as f64).powf(-0.5) as f32;
    let (r3, tt) = (3 * d, t * t);
    let mut ds = scratch(gpu, b * heads * tt)?;
    let z = |f: &dyn Fn(usize, usize) -> usize| -> Vec<usize> { (0..b * heads).map(|z| f(z / heads, z % heads)).collect() };
    let (q_off, k_off, v_off) = (z(&|i, h| i * t * r3 + h * hd), z(&|i, h| i * t * r3 + d + h * hd), z(&|i, h| i * t * r3 + 2 * d + h * hd));
    let (p_off, o_off) = (z(&|i, h| (i * heads + h) * tt), z(&|i, h| i * t * d + h * hd));
    // dP = dO · vᵀ → ds ; dv = Pᵀ · dO
    // SAFETY: every problem lies inside its buffer (lengths checked); outputs are disjoint.
    unsafe { gemm_batched(gpu, false, true, t, t, hd, 1.0, dout, &o_off, d, qkv, &v_off, r3, 0.0, &mut ds, &p_off, t)? };
    unsafe { gemm_batched(gpu, true, false, t, hd, t, 1.0, probs, &p_off, t, dout, &o_off, d, 0.0, dqkv, &v_off, r3)? };
    let f = gpu.func("snella_softmax_rows_bwd");
    let mut l = gpu.stream.launch_builder(&f);
    l.arg(probs).arg(&mut ds).arg(&rows32).arg(&t32).arg(&scale);
    // SAFETY: probs and ds hold rows·t floats; each warp touches only its row.
    unsafe { l.launch(rows_cfg(rows)) }.map_err(|e| cuda_err("snella_softmax_rows_bwd", e))?;
    // dq = dS · k ; dk = dSᵀ · q (dS already carries the scale)
    // SAFETY: as above.
    unsafe { gemm_batched(gpu, false, false, t, hd, t, 1.0, &ds, &p_off, t, qkv, &k_off, r3, 0.0, &mut *dqkv, &q_off, r3)? };
    unsafe { gemm_batched(gpu, true, false, t, hd, t, 1.0, &ds, &p_off, t, qkv, &q_off, r3, 0.0, dqkv, &k_off, r3)? };
    Ok(())
}
