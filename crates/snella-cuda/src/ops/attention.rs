//! The multi-head self-attention core, forward and backward, in two forms:
//! - [`attention_fwd`]/[`attention_bwd`], f32: cuBLAS batched products (one call per product over
//!   every (image, head), through pointer tables) around the row-softmax kernels of
//!   `kernels/attention.cu`, the probabilities saved; the products use the handle's math mode
//!   (strict f32, or TF32 after [`Gpu::set_tf32`]). Any `t`, any `hd`.
//! - [`flash_fwd`]/[`flash_bwd`], fused in bf16 (FlashAttention-2), head dim 64: only each row's
//!   log-sum-exp saved.
//!
//! Layout (timm): `qkv: [b, t, 3·d]` with column `s·d + h·hd + e` for q/k/v (`s` = 0/1/2) of head
//! `h`, element `e`; `out: [b, t, d]` with column `h·hd + e`; `probs: [b, heads, t, t]`;
//! `d = heads·hd`. Each head's q, k, v is a column block of `qkv` (row stride `3·d`), so nothing is
//! gathered or transposed.

use super::reduce::{check_len, dim_u32, grid_stride, scratch};
pub use super::ActRef;
use super::{ActMut, In, Out};
use crate::device::{cuda_err, Gpu};
use crate::gemm::gemm_batched;
use cudarc::driver::{DevicePtr, LaunchConfig, PushKernelArg};
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

/// Dynamic shared memory of the fused backward's main kernel (bytes): `FA_BWD_SHARED` in
/// `kernels/attention.cu` (q and dO tiles twice, k, dS hi and lo: 7 of 64×72 bf16; lse2 and D twice).
const FLASH_BWD_SHARED: usize = 7 * 64 * 72 * 2 + 4 * 64 * 4;

/// The head dim of the fused bf16 attention ([`flash_fwd`], [`flash_bwd`]).
pub const FLASH_HEAD_DIM: usize = 64;

fn check_flash(op: &str, hd: usize, ptrs: &[(&str, u64)]) -> Result<(), SnellaError> {
    if hd != FLASH_HEAD_DIM {
        return Err(SnellaError::config(&format!("{op}.head_dim"), hd, "64 for the fused bf16 attention"));
    }
    for (name, p) in ptrs {
        if p % 16 != 0 {
            return Err(SnellaError::config(&format!("{op}.{name}"), *p as usize, "a 16-byte aligned device address"));
        }
    }
    Ok(())
}

/// The device address of `qkv` in bf16 for the fused kernels, which read bf16 only: an f32 `qkv`
/// is rounded into `hold` first (the bits the kernels' staging rounded it to before session 9).
fn bf16_ptr(gpu: &Gpu, qkv: ActRef, n: usize, hold: &mut Option<cudarc::driver::CudaSlice<u16>>) -> Result<u64, SnellaError> {
    if let ActRef::F32(v) = qkv {
        *hold = Some(crate::gemm::to_bf16(gpu, v, n)?);
    }
    Ok(match hold {
        Some(c) => ActRef::Bf16(c).ptr(gpu),
        None => qkv.ptr(gpu),
    })
}

/// Fused attention forward in bf16 (FlashAttention-2, Dao 2023, Algorithm 1), head dim 64: writes
/// `out: [b, t, d]` (f32, or rounded to bf16 from a bf16 `qkv`: the `proj` linear's input in a bf16
/// step, bit-identical to the f32 output rounded) and `lse2: [b, heads, t]`, each row's log-sum-exp
/// of the scores in base 2 (`log2 Σ_j 2^(s_j)`, `s = q·kᵀ·hd^-0.5·log2 e`), from
/// `qkv: [b, t, 3·d]` (f32 or bf16, see [`ActRef`]; layout in the module docs). The probabilities
/// are never stored: [`flash_bwd`] recomputes them from `lse2`.
/// `q`, `k`, `v` are rounded to bf16 for the tensor-core products (as PyTorch's autocast feeds its
/// scaled-dot-product attention) and `P` enters `P·v` as a bf16 hi + lo pair (≈ 16 bits); f32
/// accumulation and softmax statistics.
/// CPU reference: `snella_core::ops::attention::{attention_fwd, attention_lse2}`.
///
/// # Errors
/// `Tensor` when a buffer is shorter than its shape needs; `Config` when `hd ≠ 64`, a buffer is
/// not 16-byte aligned, or `out` is bf16 while `qkv` is f32; `CUDA_ERROR` on a launch failure.
#[allow(clippy::too_many_arguments)]
pub fn flash_fwd(gpu: &Gpu, qkv: ActRef, b: usize, t: usize, heads: usize, hd: usize, mut out: ActMut, lse2: &mut Out) -> Result<(), SnellaError> {
    let op = "flash_attention_fwd";
    let d = heads * hd;
    check_len(op, "qkv", qkv.len(), b * t * 3 * d)?;
    check_len(op, "out", out.len(), b * t * d)?;
    check_len(op, "lse2", lse2.len(), b * heads * t)?;
    if out.is_bf16() && !qkv.is_bf16() {
        return Err(SnellaError::config(&format!("{op}.out"), "bf16 from an f32 qkv", "a bf16 output only from a bf16 qkv"));
    }
    if b == 0 || t == 0 || heads == 0 {
        return Ok(());
    }
    let po = out.ptr(gpu);
    check_flash(op, hd, &[("qkv", qkv.ptr(gpu)), ("out", po)])?;
    let bh = dim_u32(op, "b·heads", b * heads)?;
    let tiles = dim_u32(op, "t/64", t.div_ceil(64))?;
    let (t32, h32) = (dim_u32(op, "t", t)?, dim_u32(op, "heads", heads)?);
    let scale_log2 = ((hd as f64).powf(-0.5) * std::f64::consts::LOG2_E) as f32;
    let mut q16 = None;
    let pq = bf16_ptr(gpu, qkv, b * t * 3 * d, &mut q16)?;
    let name = if out.is_bf16() { "snella_flash_attn_fwd_q16_o16" } else { "snella_flash_attn_fwd_q16" };
    let f = gpu.func(name);
    let mut l = gpu.stream.launch_builder(&f);
    l.arg(&pq).arg(&po).arg(&mut *lse2).arg(&t32).arg(&h32).arg(&scale_log2);
    let cfg = LaunchConfig { grid_dim: (bh, tiles, 1), block_dim: (128, 1, 1), shared_mem_bytes: 0 };
    // SAFETY: lengths checked above (the bf16 copy holds b·t·3d values); each block writes only its
    // own query rows of out and lse2.
    unsafe { l.launch(cfg) }.map_err(|e| cuda_err(name, e))?;
    Ok(())
}

/// Backward of [`flash_fwd`] (FlashAttention-2, Algorithm 2): writes (overwrites) `dqkv: [b, t, 3·d]`
/// from `dout: [b, t, d]`, the forward's `qkv`, its output `out` (f32 or bf16) and its `lse2`. Per head, with `P`
/// recomputed from `lse2`: `dv = Pᵀ·dO`, `dP = dO·vᵀ`, `dS = P ⊙ (dP − rowsum(dO ⊙ O))`,
/// `dq = scale·dS·k`, `dk = scale·dSᵀ·q`; `q`, `k`, `v`, `dO` in bf16, `P` and `dS` as bf16 hi + lo pairs, accumulation in f32.
///
/// Deterministic: each key tile's share of `dq` goes to its own slab of scratch
/// (`⌈t/64⌉·b·heads·t·64` floats) and the slabs are summed in a fixed order; `b·heads·t` more floats
/// hold `rowsum(dO ⊙ O)`, and `b·t·d` bf16 values `dO` rounded (written by the first kernel, staged
/// by the second through `cp.async`), plus a bf16 copy of an f32 `qkv`.
///
/// # Errors
/// `Tensor` when a buffer is shorter than its shape needs; `Config` when `hd ≠ 64` or a buffer is
/// not 16-byte aligned; `CUDA_OOM` for the scratch; `CUDA_ERROR` on a launch failure.
#[allow(clippy::too_many_arguments)]
pub fn flash_bwd(
    gpu: &Gpu, dout: &In, qkv: ActRef, out: ActRef, lse2: &In, b: usize, t: usize, heads: usize, hd: usize, dqkv: &mut Out,
) -> Result<(), SnellaError> {
    flash_bwd_to(gpu, dout, qkv, out, lse2, b, t, heads, hd, ActMut::F32(dqkv))
}

/// [`flash_bwd`] writing `dqkv` in f32 or, from a bf16 `qkv`, in bf16 (`ActMut::Bf16`: every value
/// the f32 one rounded to nearest even, the form in which the `qkv` linear's backward products
/// consume it, so the step skips a conversion pass).
///
/// # Errors
/// As [`flash_bwd`]; `Config` for a bf16 `dqkv` with an f32 `qkv`.
#[allow(clippy::too_many_arguments)]
pub fn flash_bwd_to(
    gpu: &Gpu, dout: &In, qkv: ActRef, out: ActRef, lse2: &In, b: usize, t: usize, heads: usize, hd: usize, mut dqkv: ActMut,
) -> Result<(), SnellaError> {
    let op = "flash_attention_bwd";
    if dqkv.is_bf16() && !qkv.is_bf16() {
        return Err(SnellaError::config(&format!("{op}.dqkv"), "bf16", "an f32 dqkv for an f32 qkv (the bf16 form is for the bf16 step)"));
    }
    let d = heads * hd;
    check_len(op, "qkv", qkv.len(), b * t * 3 * d)?;
    check_len(op, "dqkv", dqkv.len(), b * t * 3 * d)?;
    check_len(op, "dout", dout.len(), b * t * d)?;
    check_len(op, "out", out.len(), b * t * d)?;
    check_len(op, "lse2", lse2.len(), b * heads * t)?;
    if b == 0 || t == 0 || heads == 0 {
        return Ok(());
    }
    let pd = dqkv.ptr(gpu);
    {
        let e = out.ptr(gpu);
        let a = qkv.ptr(gpu);
        let (c, _g2) = dout.device_ptr(&gpu.stream);
        check_flash(op, hd, &[("qkv", a), ("dout", c), ("out", e), ("dqkv", pd)])?;
    }
    let rows = b * heads * t;
    let (rows32, t32, h32) = (dim_u32(op, "b·heads·t", rows)?, dim_u32(op, "t", t)?, dim_u32(op, "heads", heads)?);
    let tiles = t.div_ceil(64);
    let tiles32 = dim_u32(op, "t/64", tiles)?;
    let scale = (hd as f64).powf(-0.5) as f32;
    let scale_log2 = ((hd as f64).powf(-0.5) * std::f64::consts::LOG2_E) as f32;
    let mut dvec = scratch(gpu, rows)?;
    let total = rows * hd;
    let mut dqp = scratch(gpu, tiles * total)?;
    let f = gpu.func(match out {
        ActRef::F32(_) => "snella_flash_attn_bwd_dot",
        ActRef::Bf16(_) => "snella_flash_attn_bwd_dot_o16",
    });
    let mut l = gpu.stream.launch_builder(&f);
    l.arg(dout);
    match out {
        ActRef::F32(o) => l.arg(o),
        ActRef::Bf16(o) => l.arg(o),
    };
    // SAFETY: every element is written by the dot kernel below before the main kernel reads it.
    let mut do16 = unsafe { gpu.uninit::<u16>(b * t * d) }?;
    l.arg(&mut dvec).arg(&mut do16).arg(&rows32).arg(&t32).arg(&h32);
    // SAFETY: dout/out hold b·t·d floats, dvec rows floats, do16 b·t·d values (checked/allocated);
    // one warp per row.
    unsafe { l.launch(rows_cfg(rows)) }.map_err(|e| cuda_err("snella_flash_attn_bwd_dot", e))?;
    let g16 = dqkv.is_bf16();
    let mut q16 = None;
    let pq = bf16_ptr(gpu, qkv, b * t * 3 * d, &mut q16)?;
    let name = if g16 { "snella_flash_attn_bwd_q16_g16" } else { "snella_flash_attn_bwd_q16" };
    let f = gpu.func_shared(name, FLASH_BWD_SHARED, 0)?;
    let blocks = dim_u32(op, "b·heads·⌈t/64⌉", b * heads * tiles)?;
    let mut l = gpu.stream.launch_builder(&f);
    l.arg(&pq).arg(&do16).arg(lse2).arg(&dvec).arg(&pd).arg(&mut dqp).arg(&t32).arg(&h32).arg(&scale).arg(&scale_log2);
    let cfg = LaunchConfig { grid_dim: (blocks, 1, 1), block_dim: (128, 1, 1), shared_mem_bytes: FLASH_BWD_SHARED as u32 };
    // SAFETY: lengths checked (the bf16 copies hold b·t·3d and b·t·d values); each block writes the
    // k/v columns of its own keys and its own dq slab; the shared size is kernels/attention.cu's
    // FA_BWD_SHARED, opted into above.
    unsafe { l.launch(cfg) }.map_err(|e| cuda_err(name, e))?;
    let name = if g16 { "snella_flash_attn_bwd_dq_g16" } else { "snella_flash_attn_bwd_dq" };
    let f = gpu.func(name);
    let mut l = gpu.stream.launch_builder(&f);
    let total64 = total as u64;
    l.arg(&dqp).arg(&pd).arg(&t32).arg(&h32).arg(&tiles32).arg(&total64);
    // SAFETY: dqp holds tiles·total floats, all written above; one thread per q element of dqkv.
    unsafe { l.launch(grid_stride(total)) }.map_err(|e| cuda_err(name, e))?;
    Ok(())
}
