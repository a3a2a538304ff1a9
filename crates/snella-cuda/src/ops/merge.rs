//! Launchers of `kernels/merge.cu`: the fused kernelized merge of SNELL/SNELLA (spec §1) and its
//! backward (spec §3). CPU reference: [`snella_core::snella::merge`].
//!
//! Layouts (f32, row-major): `A: [H, in, rh]`, `B: [H, out, rh]`, `M` and `Ĝ: [in, out]`, mixture
//! `[α, γ, β]` on the device (`None`: SNELL, `M = K`). `c_h = 0.1·(−1)^h`; `γ` is clamped to `≥ 1e-4`.
//!
//! Neither pass writes the `[H, in, out]` distance tensor: the forward forms `K` row by row in
//! registers (the softmax's row max and sum are block reductions), and the backward recomputes
//! `D`, `K` and `P` tile by tile. Every reduction runs in one fixed order (no float atomics), so the
//! results are bit-identical from run to run. Against the CPU reference they agree to rounding:
//! `D` and `K` are computed with the CPU's operation order and carry its bits; `expf` and the order
//! of the softmax and gradient sums differ.

use super::{In, Out};
use crate::device::{cuda_err, Gpu};
use cudarc::driver::{LaunchConfig, PushKernelArg};
use snella_core::SnellaError;

/// Backward tile edge (`TI = TJ` in `merge.cu`).
const TILE: usize = 32;
/// Threads per block of every merge kernel.
const THREADS: u32 = 256;
/// The backward keeps `H·32·(rh + 1)` accumulators per block in registers, 9 per thread.
const MAX_H_RH1: usize = 72;
/// Dynamic shared memory per block we allow: the 48 KiB available without opt-in, less the
/// kernels' static shared memory.
const MAX_SHARED: usize = 47 * 1024;

/// Checks the shapes shared by both passes; returns the dynamic shared memory of the backward tiles.
#[allow(clippy::too_many_arguments)]
fn check(
    a: &In, b: &In, heads: usize, n_in: usize, n_out: usize, rh: usize, mix: Option<&In>, m_len: usize, m_name: &str,
) -> Result<usize, SnellaError> {
    let need = |name: &str, got: usize, want: usize, shape: String| {
        if got < want {
            Err(SnellaError::tensor("<device>", name, format!("has {got} elements, expected {shape} = {want}")))
        } else {
            Ok(())
        }
    };
    need("A", a.len(), heads * n_in * rh, format!("[H={heads}, in={n_in}, rh={rh}]"))?;
    need("B", b.len(), heads * n_out * rh, format!("[H={heads}, out={n_out}, rh={rh}]"))?;
    need(m_name, m_len, n_in * n_out, format!("[in={n_in}, out={n_out}]"))?;
    if let Some(x) = mix {
        need("mixture", x.len(), 3, "[α, γ, β]".into())?;
    }
    if heads * (rh + 1) > MAX_H_RH1 {
        return Err(SnellaError::config(
            "rank",
            format!("H={heads}, r/H={rh}"),
            "H·(r/H + 1) ≤ 72 on the CUDA backend (e.g. r ≤ 70 at H = 2)",
        ));
    }
    let rs = rh | 1;
    let shared = (2 * heads * TILE * rs + heads * TILE * (TILE + 1)) * 4;
    if shared > MAX_SHARED {
        return Err(SnellaError::config("heads", heads, "at most 8 kernel pieces (H) on the CUDA backend"));
    }
    if n_in > u32::MAX as usize || n_out > u32::MAX as usize {
        return Err(SnellaError::config("in/out", format!("{n_in}x{n_out}"), "dimensions below 2^32"));
    }
    Ok(shared)
}

/// Streaming multiprocessors of the device (132 on an H200 if the query fails).
fn sm_count(gpu: &Gpu) -> usize {
    gpu.ctx
        .attribute(cudarc::driver::sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)
        .map(|v| v.max(1) as usize)
        .unwrap_or(132)
}

/// Rows per block of the forward and row-statistics kernels: the largest of 8, 4, 2 that still
/// gives two blocks per SM, else 1 (small layers need the parallelism more than the reuse of `B`).
fn rows_per_block(n_in: usize, sms: usize) -> usize {
    [8, 4, 2].into_iter().find(|&r| n_in.div_ceil(r) >= 2 * sms).unwrap_or(1)
}

/// Forward of the kernelized merge (spec §1): `M[i,j] = Σ_h c_h·‖A[h,i,:] − B[h,j,:]‖₂` and, with
/// the mixture, `+ α·softmax_j(K[i,·]/max(γ, 1e-4))[j] + β`.
///
/// - `a`: `[heads, n_in, rh]`, `b`: `[heads, n_out, rh]` (f32).
/// - `mix`: `[α, γ, β]` on the device (SNELLA), or `None` (SNELL: `M = K`).
/// - `m`: output `[n_in, n_out]`, overwritten.
///
/// One launch. Matches [`snella_core::snella::merge::merge_fwd`] to f32 rounding (`K`, hence the
/// whole SNELL output, bit for bit).
///
/// # Errors
/// `Tensor` when a buffer is shorter than its shape; `Config` when `heads·(rh + 1) > 72`;
/// `CUDA_ERROR` on a launch failure.
#[allow(clippy::too_many_arguments)]
pub fn merge_fwd(
    gpu: &Gpu, a: &In, b: &In, heads: usize, n_in: usize, n_out: usize, rh: usize, mix: Option<&In>, m: &mut Out,
) -> Result<(), SnellaError> {
    check(a, b, heads, n_in, n_out, rh, mix, m.len(), "M")?;
    if n_in == 0 || n_out == 0 {
        return Ok(());
    }
    let rows = rows_per_block(n_in, sm_count(gpu));
    let name = match rows {
        8 => "snella_merge_fwd_r8",
        4 => "snella_merge_fwd_r4",
        2 => "snella_merge_fwd_r2",
        _ => "snella_merge_fwd_r1",
    };
    let f = gpu.func(name);
    let (h32, i32_, o32, r32) = (heads as u32, n_in as u32, n_out as u32, rh as u32);
    let null = 0u64;
    let cfg = LaunchConfig {
        grid_dim: (n_in.div_ceil(rows) as u32, 1, 1),
        block_dim: (THREADS, 1, 1),
        shared_mem_bytes: (rows * heads * rh * 4) as u32,
    };
    let mut lb = gpu.stream.launch_builder(&f);
    lb.arg(a).arg(b).arg(&h32).arg(&i32_).arg(&o32).arg(&r32);
    match mix {
        Some(x) => lb.arg(x),
        None => lb.arg(&null),
    };
    lb.arg(m);
    // SAFETY: the lengths were checked against the shapes; the kernel bounds-checks rows and columns,
    // and the dynamic shared memory holds rows·H·rh floats.
    unsafe { lb.launch(cfg) }.map(|_| ()).map_err(|e| cuda_err(name, e))
}

/// Splits `tiles` tiles into chunks so that `other · splits` blocks reach about `target`; returns
/// `(splits, tiles per split)`.
fn split(other: usize, tiles: usize, target: usize) -> (usize, usize) {
    let want = target.div_ceil(other.max(1)).clamp(1, tiles.max(1));
    let tps = tiles.div_ceil(want).max(1);
    (tiles.div_ceil(tps).max(1), tps)
}

/// Backward of the kernelized merge (spec §3), recomputing `D`, `K` and `P` (no stored `M`).
///
/// - `dm`: `Ĝ = ∂L/∂M`, `[n_in, n_out]` (already through the sparsify backward).
/// - `da`: `[heads, n_in, rh]`, `db`: `[heads, n_out, rh]`, overwritten with
///   `∂L/∂A[h,i] = A[h,i]·Σ_j E_h[i,j] − Σ_j E_h[i,j]·B[h,j]` and
///   `∂L/∂B[h,j] = B[h,j]·Σ_i E_h[i,j] − Σ_i E_h[i,j]·A[h,i]`, `E_h = c_h·∂L/∂K ⊘ D_h` (0 where `D_h = 0`).
/// - `dmix`: `[3]`, overwritten with `(∂α, ∂γ, ∂β)` when `mix` is given (`∂γ = 0` while `γ < 1e-4`);
///   zeros when `mix` is `None`.
///
/// Three launches (two without the mixture). Deterministic: the cross-row and cross-column sums
/// are per-tile partials reduced in a fixed order (one scratch allocation of
/// `O((in + out)·H·(rh + 1))` floats, no float atomics). Matches
/// [`snella_core::snella::merge::merge_bwd`] to f32 rounding.
///
/// # Errors
/// `Tensor` when a buffer is shorter than its shape; `Config` when `heads·(rh + 1) > 72`;
/// `CUDA_OOM` for the scratch; `CUDA_ERROR` on a launch failure.
#[allow(clippy::too_many_arguments)]
pub fn merge_bwd(
    gpu: &Gpu, a: &In, b: &In, heads: usize, n_in: usize, n_out: usize, rh: usize, mix: Option<&In>, dm: &In,
    da: &mut Out, db: &mut Out, dmix: Option<&mut Out>,
) -> Result<(), SnellaError> {
    let shared = check(a, b, heads, n_in, n_out, rh, mix, dm.len(), "dM")?;
    let need = |name: &str, got: usize, want: usize| {
        if got < want {
            Err(SnellaError::tensor("<device>", name, format!("has {got} elements, expected {want}")))
        } else {
            Ok(())
        }
    };
    need("dA", da.len(), heads * n_in * rh)?;
    need("dB", db.len(), heads * n_out * rh)?;
    if let Some(d) = dmix.as_ref() {
        need("dmix", d.len(), 3)?;
    }
    let zero = |buf: &mut Out, what: &str| gpu.stream.memset_zeros(buf).map_err(|e| cuda_err(what, e));
    if n_in == 0 || n_out == 0 {
        zero(da, "merge_bwd: zero dA")?;
        zero(db, "merge_bwd: zero dB")?;
        if let Some(d) = dmix {
            zero(d, "merge_bwd: zero dmix")?;
        }
        return Ok(());
    }
    let dmix = match (mix, dmix) {
        (None, Some(d)) => {
            zero(d, "merge_bwd: zero dmix")?;
            None
        }
        (_, d) => d,
    };
    bwd_core(gpu, a, b, heads, n_in, n_out, rh, mix, dm, da, db, dmix, shared)
}

/// The kernels of [`merge_bwd`] for `n_in, n_out ≥ 1`.
#[allow(clippy::too_many_arguments)]
fn bwd_core(
    gpu: &Gpu, a: &In, b: &In, heads: usize, n_in: usize, n_out: usize, rh: usize, mix: Option<&In>, dm: &In,
    da: &mut Out, db: &mut Out, dmix: Option<&mut Out>, shared: usize,
) -> Result<(), SnellaError> {
    let (h32, i32_, o32, r32) = (heads as u32, n_in as u32, n_out as u32, rh as u32);
    let null = 0u64;
    let sms = sm_count(gpu);
    // the splits aim at 8 blocks per SM (3 resident; measured, bench/PERF.md)
    let target = 8 * sms;
    let (n_it, n_jt) = (n_in.div_ceil(TILE), n_out.div_ceil(TILE));
    let (ns_a, tps_a) = split(n_it, n_jt, target);
    let (ns_b, tps_b) = split(n_jt, n_it, target);
    let r1 = rh + 1;
    // One scratch buffer: rowstat [n_in, 4] (mixture only) | partA | partB | gpart.
    let len_rs = if mix.is_some() { 4 * n_in } else { 0 };
    let (len_pa, len_pb, len_gp) = (ns_a * heads * n_in * r1, ns_b * heads * n_out * r1, n_it * ns_a);
    let total = (len_rs + len_pa + len_pb + len_gp).max(1);
    // SAFETY: every element read later is written first by the kernels below.
    let mut scratch = unsafe { gpu.uninit::<f32>(total) }?;
    let (mut rowstat, mut rest) = scratch.split_at_mut(len_rs);
    let (mut part_a, mut rest) = rest.split_at_mut(len_pa);
    let (mut part_b, mut gpart) = rest.split_at_mut(len_pb);

    // 1. Row statistics of the softmax (mixture only).
    if let Some(x) = mix {
        let rows = rows_per_block(n_in, sms);
        let name = match rows {
            8 => "snella_merge_bwd_rowstats_r8",
            4 => "snella_merge_bwd_rowstats_r4",
            2 => "snella_merge_bwd_rowstats_r2",
            _ => "snella_merge_bwd_rowstats_r1",
        };
        let f = gpu.func(name);
        let cfg = LaunchConfig {
            grid_dim: (n_in.div_ceil(rows) as u32, 1, 1),
            block_dim: (THREADS, 1, 1),
            shared_mem_bytes: (rows * heads * rh * 4) as u32,
        };
        let mut lb = gpu.stream.launch_builder(&f);
        lb.arg(a).arg(b).arg(&h32).arg(&i32_).arg(&o32).arg(&r32).arg(x).arg(dm).arg(&mut rowstat);
        // SAFETY: shapes checked; rowstat holds 4·n_in floats; bounds-checked in the kernel.
        unsafe { lb.launch(cfg) }.map_err(|e| cuda_err(name, e))?;
    }
    let rowstat = rowstat.as_view();
    // 2. ∂A and ∂B partials (and the ∂γ partials), one grid.
    {
        let f = gpu.func("snella_merge_bwd_tiles");
        let (ns_a32, tps_a32, tps_b32) = (ns_a as u32, tps_a as u32, tps_b as u32);
        let cfg = LaunchConfig {
            grid_dim: ((n_it * ns_a + n_jt * ns_b) as u32, 1, 1),
            block_dim: (THREADS, 1, 1),
            shared_mem_bytes: shared as u32,
        };
        let mut lb = gpu.stream.launch_builder(&f);
        lb.arg(a).arg(b).arg(&h32).arg(&i32_).arg(&o32).arg(&r32);
        match mix {
            Some(x) => lb.arg(x).arg(dm).arg(&rowstat),
            None => lb.arg(&null).arg(dm).arg(&null),
        };
        lb.arg(&ns_a32).arg(&tps_a32).arg(&tps_b32).arg(&mut part_a).arg(&mut gpart).arg(&mut part_b);
        // SAFETY: part_a holds ns_a·H·n_in·(rh+1) floats, gpart n_it·ns_a and part_b
        // ns_b·H·n_out·(rh+1); the grid is exactly n_it·ns_a + n_jt·ns_b blocks.
        unsafe { lb.launch(cfg) }.map_err(|e| cuda_err("snella_merge_bwd_tiles", e))?;
    }
    // 3. dA, dB from the partials, and the mixture gradients.
    let (nb_a, nb_b) = ((heads * n_in * rh).div_ceil(THREADS as usize), (heads * n_out * rh).div_ceil(THREADS as usize));
    let with_mix = mix.is_some() && dmix.is_some();
    let blocks = nb_a + nb_b + with_mix as usize;
    if blocks == 0 {
        return Ok(());
    }
    let f = gpu.func("snella_merge_bwd_finish");
    let (ns_a32, ns_b32, nb_a32, nb_b32, ng32) = (ns_a as u32, ns_b as u32, nb_a as u32, nb_b as u32, len_gp as u32);
    let cfg = LaunchConfig { grid_dim: (blocks as u32, 1, 1), block_dim: (THREADS, 1, 1), shared_mem_bytes: 0 };
    let (part_a, part_b, gpart) = (part_a.as_view(), part_b.as_view(), gpart.as_view());
    let mut lb = gpu.stream.launch_builder(&f);
    lb.arg(&part_a).arg(&ns_a32).arg(&part_b).arg(&ns_b32).arg(&h32).arg(&i32_).arg(&o32).arg(&r32);
    lb.arg(a).arg(b).arg(da).arg(db).arg(&nb_a32).arg(&nb_b32);
    match (mix, dmix) {
        (Some(x), Some(d)) => lb.arg(&rowstat).arg(&gpart).arg(&ng32).arg(x).arg(d),
        _ => lb.arg(&null).arg(&gpart).arg(&ng32).arg(&null).arg(&null),
    };
    // SAFETY: the partials were written in step 2 for every valid (h, row, r); dA and dB hold
    // H·n_in·rh and H·n_out·rh floats (bounds-checked); the mixture block runs only with dmix.
    unsafe { lb.launch(cfg) }.map(|_| ()).map_err(|e| cuda_err("snella_merge_bwd_finish", e))
}

