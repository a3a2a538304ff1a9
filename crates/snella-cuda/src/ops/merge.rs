//! Launchers of `kernels/merge.cu`: the fused kernelized merge of SNELL/SNELLA (spec §1) and its
//! backward (spec §3). CPU reference: [`snella_core::snella::merge`].
//!
//! Layouts (f32, row-major): `A: [H, in, rh]`, `B: [H, out, rh]`, `M` and `Ĝ: [in, out]`, mixture
//! `[α, γ, β]` on the device (`None`: SNELL, `M = K`). `c_h = 0.1·(−1)^h`; `γ` is clamped to `≥ 1e-4`.
//!
//! The forward forms `K` row by row in registers (the softmax's row max and sum are block
//! reductions); the backward recomputes `D`, `K` and `P` tile by tile into the transient
//! `E_h = c_h·∂L/∂K ⊘ D_h` (`[H, in, out]` f32 scratch, freed at return) and sums it against `B` and
//! `A` with two cuBLAS GEMMs. Every reduction runs in one fixed order (no float atomics), so the
//! results are bit-identical from run to run. Against the CPU reference they agree to rounding:
//! `D` and `K` are computed with the CPU's operation order and carry its bits; `expf` and the order
//! of the softmax and gradient sums differ.

use super::{In, Out};
use crate::device::{cuda_err, Gpu};
use cudarc::driver::{CudaSlice, LaunchConfig, PushKernelArg};
use snella_core::SnellaError;

/// Backward tile edge (`TI = TJ` in `merge.cu`).
const TILE: usize = 32;
/// Threads per block of every merge kernel.
const THREADS: u32 = 256;
/// Dynamic shared memory per block we allow: the 48 KiB available without opt-in, less the
/// kernels' static shared memory.
const MAX_SHARED: usize = 47 * 1024;

/// Checks the shapes shared by both passes; returns the dynamic shared memory of the backward's E kernel.
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
    let rs = rh | 1;
    let shared = (2 * heads * TILE * rs + heads * TILE * (TILE + 1)) * 4;
    if shared > MAX_SHARED {
        return Err(SnellaError::config(
            "heads/rank",
            format!("H={heads}, r/H={rh}"),
            "(2·H·32·((r/H) | 1) + H·32·33)·4 bytes ≤ 47 KiB of shared memory on the CUDA backend (e.g. r/H ≤ 77 at H = 2, ≤ 171 at H = 1)",
        ));
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
/// `Tensor` when a buffer is shorter than its shape; `Config` when `heads > 8`;
/// `CUDA_ERROR` on a launch failure.
#[allow(clippy::too_many_arguments)]
pub fn merge_fwd(
    gpu: &Gpu, a: &In, b: &In, heads: usize, n_in: usize, n_out: usize, rh: usize, mix: Option<&In>, m: &mut Out,
) -> Result<(), SnellaError> {
    check(a, b, heads, n_in, n_out, rh, mix, m.len(), "M")?;
    fwd_launch(gpu, a, b, heads, n_in, n_out, rh, mix, m, None)
}

/// What the backward-time merge keeps for [`merge_bwd_saved`]: `K: [in, out]` and the distances
/// `D: [H, in, out]` (f32), so that the backward's row statistics and `E` do not recompute them.
/// Transient: built at the start of an adapted linear's backward and dropped at its end.
pub struct MergeSaved {
    /// `K = Σ_h c_h·D_h`, `[in, out]`.
    pub k: CudaSlice<f32>,
    /// `D_h[i, j] = ‖A[h,i,:] − B[h,j,:]‖₂`, `[H, in, out]`.
    pub d: CudaSlice<f32>,
}

/// [`merge_fwd`] that also returns `K` and the distances for [`merge_bwd_saved`] (`(1 + H)·in·out`
/// floats; the same `M`, bit for bit).
///
/// # Errors
/// As [`merge_fwd`]; `CUDA_OOM` for the saved tensors.
#[allow(clippy::too_many_arguments)]
pub fn merge_fwd_saving(
    gpu: &Gpu, a: &In, b: &In, heads: usize, n_in: usize, n_out: usize, rh: usize, mix: Option<&In>, m: &mut Out,
) -> Result<MergeSaved, SnellaError> {
    check(a, b, heads, n_in, n_out, rh, mix, m.len(), "M")?;
    // SAFETY: the forward writes every element of K and D (rows < n_in, columns < n_out).
    let mut saved = unsafe { MergeSaved { k: gpu.uninit::<f32>((n_in * n_out).max(1))?, d: gpu.uninit::<f32>((heads * n_in * n_out).max(1))? } };
    fwd_launch(gpu, a, b, heads, n_in, n_out, rh, mix, m, Some(&mut saved))?;
    Ok(saved)
}

/// The forward launch (shapes checked by the caller).
#[allow(clippy::too_many_arguments)]
fn fwd_launch(
    gpu: &Gpu, a: &In, b: &In, heads: usize, n_in: usize, n_out: usize, rh: usize, mix: Option<&In>, m: &mut Out,
    saved: Option<&mut MergeSaved>,
) -> Result<(), SnellaError> {
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
    match saved {
        Some(sv) => lb.arg(&mut sv.k).arg(&mut sv.d),
        None => lb.arg(&null).arg(&null),
    };
    // SAFETY: the lengths were checked against the shapes (K and D sized by merge_fwd_saving); the
    // kernel bounds-checks rows and columns, and the dynamic shared memory holds rows·H·rh floats.
    unsafe { lb.launch(cfg) }.map(|_| ()).map_err(|e| cuda_err(name, e))
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
/// Four to five launches and two strict-f32 cuBLAS GEMMs (see `bwd_gemm`), one scratch allocation
/// of `H·in·out + 2·H·(in + out)·(rh + 1)` floats (+ `4·in` with the mixture). Deterministic.
/// Matches [`snella_core::snella::merge::merge_bwd`] to f32 rounding.
///
/// # Errors
/// `Tensor` when a buffer is shorter than its shape; `Config` when `heads > 8` or a dimension is
/// too large; `CUDA_OOM` for the scratch; `CUDA_ERROR` on a launch failure.
#[allow(clippy::too_many_arguments)]
pub fn merge_bwd(
    gpu: &Gpu, a: &In, b: &In, heads: usize, n_in: usize, n_out: usize, rh: usize, mix: Option<&In>, dm: &In,
    da: &mut Out, db: &mut Out, dmix: Option<&mut Out>,
) -> Result<(), SnellaError> {
    merge_bwd_saved(gpu, None, a, b, heads, n_in, n_out, rh, mix, dm, da, db, dmix)
}

/// [`merge_bwd`] reusing `K` and the distances saved by [`merge_fwd_saving`] from the same `A`,
/// `B` (and mixture): the row statistics and `E` are then element-wise passes over them instead of
/// recomputing `D`: the same `dA`, `dB` bits as the recomputing path (measured on the H200), and
/// `∂γ` to f32 rounding (its partial sums are grouped by row chunk instead of by tile). `None`
/// recomputes.
///
/// # Errors
/// As [`merge_bwd`]; `Tensor` when `saved` does not hold `in·out` and `H·in·out` values.
#[allow(clippy::too_many_arguments)]
pub fn merge_bwd_saved(
    gpu: &Gpu, saved: Option<&MergeSaved>, a: &In, b: &In, heads: usize, n_in: usize, n_out: usize, rh: usize,
    mix: Option<&In>, dm: &In, da: &mut Out, db: &mut Out, dmix: Option<&mut Out>,
) -> Result<(), SnellaError> {
    let shared = check(a, b, heads, n_in, n_out, rh, mix, dm.len(), "dM")?;
    if let Some(sv) = saved {
        if sv.k.len() < n_in * n_out || sv.d.len() < heads * n_in * n_out {
            return Err(SnellaError::tensor("<device>", "merge saved K/D", format!("has {}/{} elements, expected {}/{}", sv.k.len(), sv.d.len(), n_in * n_out, heads * n_in * n_out)));
        }
    }
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
    bwd_gemm(gpu, saved, a, b, heads, n_in, n_out, rh, mix, dm, da, db, dmix, shared)
}

/// [`merge_bwd`] for `n_in, n_out ≥ 1` through a materialised `E: [H, in, out]` (f32 scratch):
/// 1. the row statistics of the softmax (mixture only);
/// 2. `snella_merge_bwd_e`: `E_h` tile by tile (and the `∂γ` partials);
/// 3. two strict-f32 strided-batched GEMMs over `h`: `partA_h = E_h·[B_h | 1]` and
///    `partB_h = E_hᵀ·[A_h | 1]` (the ones columns give the row and column sums of `E_h`);
/// 4. `snella_merge_bwd_finish`: `dA = A ⊙ rowsum − E·B`, `dB = B ⊙ colsum − Eᵀ·A`, `dmix`.
///
/// The sums over `j` and `i` thus run on cuBLAS instead of shared-memory loops in the tiles kernel
/// (session 3: the earlier tiles kernel formed each `E` tile twice, once for `∂A`, once for `∂B`,
/// and summed in shared memory; 768×3072 merge + top-k + sparsify fwd+bwd 0.413 → 0.375 ms on the
/// H200, and it lifts that kernel's `H·(r/H + 1) ≤ 72` limit).
#[allow(clippy::too_many_arguments)]
fn bwd_gemm(
    gpu: &Gpu, saved: Option<&MergeSaved>, a: &In, b: &In, heads: usize, n_in: usize, n_out: usize, rh: usize, mix: Option<&In>, dm: &In,
    da: &mut Out, db: &mut Out, dmix: Option<&mut Out>, shared: usize,
) -> Result<(), SnellaError> {
    let (h32, i32_, o32, r32) = (heads as u32, n_in as u32, n_out as u32, rh as u32);
    let null = 0u64;
    let sms = sm_count(gpu);
    let (n_it, n_jt) = (n_in.div_ceil(TILE), n_out.div_ceil(TILE));
    if n_it > 65535 {
        return Err(SnellaError::config("in", n_in, "at most 65535·32 rows on the CUDA backend"));
    }
    // the saved-tensor kernels take one grid row per matrix row
    let saved = saved.filter(|_| n_in <= 65535);
    let r1 = rh + 1;
    // One scratch buffer: rowstat [n_in, 4] (mixture only) | E [H, in, out] | A' | B' | partA | partB | gpart.
    let len_rs = if mix.is_some() { 4 * n_in } else { 0 };
    let len_e = heads * n_in * n_out;
    let (len_ap, len_bp) = (heads * n_in * r1, heads * n_out * r1);
    // ∂γ partials: one per E tile, or per (row, 256 columns) from the saved tensors
    let len_gp = if saved.is_some() { n_in * n_out.div_ceil(THREADS as usize) } else { n_it * n_jt };
    let total = len_rs + len_e + 2 * len_ap + 2 * len_bp + len_gp;
    // SAFETY: every element read later is written first by the kernels and GEMMs below.
    let mut scratch = unsafe { gpu.uninit::<f32>(total) }?;
    let (mut rowstat, mut rest) = scratch.split_at_mut(len_rs);
    let (mut e, mut rest) = rest.split_at_mut(len_e);
    let (mut a1, mut rest) = rest.split_at_mut(len_ap);
    let (mut b1, mut rest) = rest.split_at_mut(len_bp);
    let (mut part_a, mut rest) = rest.split_at_mut(len_ap);
    let (mut part_b, mut gpart) = rest.split_at_mut(len_bp);

    if let (Some(x), Some(sv)) = (mix, saved) {
        let f = gpu.func("snella_merge_bwd_rowstats_saved");
        let cfg = LaunchConfig { grid_dim: (n_in as u32, 1, 1), block_dim: (THREADS, 1, 1), shared_mem_bytes: 0 };
        let mut lb = gpu.stream.launch_builder(&f);
        lb.arg(&sv.k).arg(&i32_).arg(&o32).arg(x).arg(dm).arg(&mut rowstat);
        // SAFETY: K and dM hold n_in·n_out floats (checked), rowstat 4·n_in; one block per row.
        unsafe { lb.launch(cfg) }.map_err(|e| cuda_err("snella_merge_bwd_rowstats_saved", e))?;
    } else if let Some(x) = mix {
        rowstats(gpu, a, b, heads, n_in, n_out, rh, x, dm, &mut rowstat, sms)?;
    }
    let rowstat = rowstat.as_view();
    if let Some(sv) = saved {
        let f = gpu.func("snella_merge_bwd_e_saved");
        let cfg = LaunchConfig { grid_dim: (n_out.div_ceil(THREADS as usize) as u32, n_in as u32, 1), block_dim: (THREADS, 1, 1), shared_mem_bytes: 0 };
        let mut lb = gpu.stream.launch_builder(&f);
        lb.arg(&sv.k).arg(&sv.d).arg(&h32).arg(&i32_).arg(&o32);
        match mix {
            Some(x) => lb.arg(x).arg(dm).arg(&rowstat),
            None => lb.arg(&null).arg(dm).arg(&null),
        };
        lb.arg(&mut e).arg(&mut gpart);
        // SAFETY: K, D, dM and E hold (H·)n_in·n_out floats (checked / sized above), gpart one value
        // per block of the grid; each thread touches only its (i, j).
        unsafe { lb.launch(cfg) }.map_err(|e| cuda_err("snella_merge_bwd_e_saved", e))?;
    } else {
        let f = gpu.func("snella_merge_bwd_e");
        let cfg = LaunchConfig { grid_dim: (n_jt as u32, n_it as u32, 1), block_dim: (THREADS, 1, 1), shared_mem_bytes: shared as u32 };
        let mut lb = gpu.stream.launch_builder(&f);
        lb.arg(a).arg(b).arg(&h32).arg(&i32_).arg(&o32).arg(&r32);
        match mix {
            Some(x) => lb.arg(x).arg(dm).arg(&rowstat),
            None => lb.arg(&null).arg(dm).arg(&null),
        };
        lb.arg(&mut e).arg(&mut gpart);
        // SAFETY: E holds H·n_in·n_out floats, gpart n_it·n_jt; the grid is n_jt × n_it tiles and
        // the kernel writes only entries inside [n_in, n_out].
        unsafe { lb.launch(cfg) }.map_err(|e| cuda_err("snella_merge_bwd_e", e))?;
    }
    for (src, dst, rows) in [(a, &mut a1, heads * n_in), (b, &mut b1, heads * n_out)] {
        let f = gpu.func("snella_merge_pad_ones");
        let (rows64, n) = (rows as u64, rows * r1);
        let mut lb = gpu.stream.launch_builder(&f);
        lb.arg(src).arg(dst).arg(&rows64).arg(&r32);
        // SAFETY: src holds rows·rh floats (checked), dst rows·(rh + 1); grid-stride over the latter.
        unsafe { lb.launch(super::reduce::grid_stride(n)) }.map_err(|e| cuda_err("snella_merge_pad_ones", e))?;
    }
    let e = e.as_view();
    // SAFETY: per h, E_h [n_in, n_out], A'_h [n_in, rh+1], B'_h [n_out, rh+1] and the partials lie
    // inside their buffers (sized above).
    unsafe {
        crate::gemm::gemm_strided_f32(gpu, false, false, n_in, r1, n_out, &e, n_out, n_in * n_out, &b1, r1, n_out * r1, &mut part_a, r1, n_in * r1, heads)?;
        crate::gemm::gemm_strided_f32(gpu, true, false, n_out, r1, n_in, &e, n_out, n_in * n_out, &a1, r1, n_in * r1, &mut part_b, r1, n_out * r1, heads)?;
    }
    finish(gpu, heads, n_in, n_out, rh, a, b, da, db, mix, dmix, &part_a.as_view(), 1, &part_b.as_view(), 1, &rowstat, &gpart.as_view(), len_gp)
}

/// Backward step 1 (mixture only): `rowstat [n_in, 4]` = (max_j K/γ, Σ_j exp(K/γ − max),
/// s_i = Σ_j Ĝ·P, Σ_j Ĝ) per row.
#[allow(clippy::too_many_arguments)]
fn rowstats(gpu: &Gpu, a: &In, b: &In, heads: usize, n_in: usize, n_out: usize, rh: usize, mix: &In, dm: &In, rowstat: &mut Out, sms: usize) -> Result<(), SnellaError> {
    let (h32, i32_, o32, r32) = (heads as u32, n_in as u32, n_out as u32, rh as u32);
    let rows = rows_per_block(n_in, sms);
    let name = match rows {
        8 => "snella_merge_bwd_rowstats_r8",
        4 => "snella_merge_bwd_rowstats_r4",
        2 => "snella_merge_bwd_rowstats_r2",
        _ => "snella_merge_bwd_rowstats_r1",
    };
    let f = gpu.func(name);
    let cfg = LaunchConfig { grid_dim: (n_in.div_ceil(rows) as u32, 1, 1), block_dim: (THREADS, 1, 1), shared_mem_bytes: (rows * heads * rh * 4) as u32 };
    let mut lb = gpu.stream.launch_builder(&f);
    lb.arg(a).arg(b).arg(&h32).arg(&i32_).arg(&o32).arg(&r32).arg(mix).arg(dm).arg(rowstat);
    // SAFETY: shapes checked; rowstat holds 4·n_in floats; bounds-checked in the kernel.
    unsafe { lb.launch(cfg) }.map(|_| ()).map_err(|e| cuda_err(name, e))
}

/// Backward's last step: `dA`, `dB` from the partials (`ns_a`, `ns_b` splits, summed in index
/// order) and, with the mixture and `dmix`, the mixture gradients from `rowstat` and the `ng` ∂γ
/// partials in `gpart`.
#[allow(clippy::too_many_arguments)]
fn finish(
    gpu: &Gpu, heads: usize, n_in: usize, n_out: usize, rh: usize, a: &In, b: &In, da: &mut Out, db: &mut Out, mix: Option<&In>,
    dmix: Option<&mut Out>, part_a: &In, ns_a: usize, part_b: &In, ns_b: usize, rowstat: &In, gpart: &In, ng: usize,
) -> Result<(), SnellaError> {
    let (h32, i32_, o32, r32) = (heads as u32, n_in as u32, n_out as u32, rh as u32);
    let null = 0u64;
    let (nb_a, nb_b) = ((heads * n_in * rh).div_ceil(THREADS as usize), (heads * n_out * rh).div_ceil(THREADS as usize));
    let with_mix = mix.is_some() && dmix.is_some();
    let blocks = nb_a + nb_b + with_mix as usize;
    if blocks == 0 {
        return Ok(());
    }
    let f = gpu.func("snella_merge_bwd_finish");
    let (ns_a32, ns_b32, nb_a32, nb_b32, ng32) = (ns_a as u32, ns_b as u32, nb_a as u32, nb_b as u32, ng as u32);
    let cfg = LaunchConfig { grid_dim: (blocks as u32, 1, 1), block_dim: (THREADS, 1, 1), shared_mem_bytes: 0 };
    let mut lb = gpu.stream.launch_builder(&f);
    lb.arg(part_a).arg(&ns_a32).arg(part_b).arg(&ns_b32).arg(&h32).arg(&i32_).arg(&o32).arg(&r32);
    lb.arg(a).arg(b).arg(da).arg(db).arg(&nb_a32).arg(&nb_b32);
    match (mix, dmix) {
        (Some(x), Some(d)) => lb.arg(rowstat).arg(gpart).arg(&ng32).arg(x).arg(d),
        _ => lb.arg(&null).arg(gpart).arg(&ng32).arg(&null).arg(&null),
    };
    // SAFETY: the partials were written for every valid (h, row, r); dA and dB hold H·n_in·rh and
    // H·n_out·rh floats (bounds-checked); the mixture block runs only with dmix.
    unsafe { lb.launch(cfg) }.map(|_| ()).map_err(|e| cuda_err("snella_merge_bwd_finish", e))
}
