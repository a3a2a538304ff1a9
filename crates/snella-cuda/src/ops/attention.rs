//! The multi-head self-attention core, forward and backward, f32: cuBLAS strided-batched products
//! (one call per head, batched over the images) around the row-softmax kernels of
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
use crate::gemm::gemm_strided;
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
    for h in 0..heads {
        // S_h = scale · q_h · k_hᵀ  → probs[:, h]
        let (q, k) = (qkv.slice(h * hd..), qkv.slice(d + h * hd..));
        let mut s = probs.slice_mut(h * tt..);
        // SAFETY: every problem lies inside qkv [b,t,3d] / probs [b,heads,t,t] (lengths checked).
        unsafe { gemm_strided(gpu, false, true, t, t, hd, scale, &q, r3, t * r3, &k, r3, t * r3, 0.0, &mut s, t, heads * tt, b)? };
    }
    let f = gpu.func("snella_softmax_rows_fwd");
    let mut l = gpu.stream.launch_builder(&f);
    l.arg(&mut *probs).arg(&rows32).arg(&t32);
    // SAFETY: probs holds rows·t floats (checked); each warp touches only its row.
    unsafe { l.launch(rows_cfg(rows)) }.map_err(|e| cuda_err("snella_softmax_rows_fwd", e))?;
    for h in 0..heads {
        // out_h = P_h · v_h
        let (p, v) = (probs.slice(h * tt..), qkv.slice(2 * d + h * hd..));
        let mut o = out.slice_mut(h * hd..);
        // SAFETY: as above; out [b,t,d] column block h.
        unsafe { gemm_strided(gpu, false, false, t, hd, t, 1.0, &p, t, heads * tt, &v, r3, t * r3, 0.0, &mut o, d, t * d, b)? };
    }
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
    for h in 0..heads {
        let (o, v, p) = (dout.slice(h * hd..), qkv.slice(2 * d + h * hd..), probs.slice(h * tt..));
        // dP_h = dO_h · v_hᵀ → ds[:, h]
        let mut s = ds.slice_mut(h * tt..);
        // SAFETY: every problem lies inside its buffer (lengths checked); outputs are disjoint.
        unsafe { gemm_strided(gpu, false, true, t, t, hd, 1.0, &o, d, t * d, &v, r3, t * r3, 0.0, &mut s, t, heads * tt, b)? };
        // dv_h = P_hᵀ · dO_h
        let mut dv = dqkv.slice_mut(2 * d + h * hd..);
        unsafe { gemm_strided(gpu, true, false, t, hd, t, 1.0, &p, t, heads * tt, &o, d, t * d, 0.0, &mut dv, r3, t * r3, b)? };
    }
    let f = gpu.func("snella_softmax_rows_bwd");
    let mut l = gpu.stream.launch_builder(&f);
    l.arg(probs).arg(&mut ds).arg(&rows32).arg(&t32).arg(&scale);
    // SAFETY: probs and ds hold rows·t floats; each warp touches only its row.
    unsafe { l.launch(rows_cfg(rows)) }.map_err(|e| cuda_err("snella_softmax_rows_bwd", e))?;
    for h in 0..heads {
        let (s, q, k) = (ds.slice(h * tt..), qkv.slice(h * hd..), qkv.slice(d + h * hd..));
        // dq_h = dS_h · k_h ; dk_h = dS_hᵀ · q_h (dS already carries the scale)
        let mut dq = dqkv.slice_mut(h * hd..);
        // SAFETY: as above.
        unsafe { gemm_strided(gpu, false, false, t, hd, t, 1.0, &s, t, heads * tt, &k, r3, t * r3, 0.0, &mut dq, r3, t * r3, b)? };
        let mut dk = dqkv.slice_mut(d + h * hd..);
        unsafe { gemm_strided(gpu, true, false, t, hd, t, 1.0, &s, t, heads * tt, &q, r3, t * r3, 0.0, &mut dk, r3, t * r3, b)? };
    }
    Ok(())
}
