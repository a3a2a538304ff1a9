//! Launchers of `kernels/merge.cu`: the fused kernelized merge of SNELL/SNELLA (spec §1) and its
//! backward (spec §3). CPU reference: [`snella_core::snella::merge`].
//!
//! Layouts (f32, row-major): `A: [H, in, rh]`, `B: [H, out, rh]`, `M` and `Ĝ: [in, out]`, mixture
//! `[α, γ, β]` on the device (`None`: SNELL, `M = K`). `c_h = 0.1·(−1)^h`; `γ` is clamped to `≥ 1e-4`.
//!
//! The forward forms `K` on 32×32 tiles (`snella_merge_fwd_tiles`, the A and B tiles in shared
//! memory), then with the mixture one block per row applies the softmax (`snella_merge_fwd_softmax`:
//! row max, row sum, rewrite); the backward recomputes `D`, `K` and `P` (or reads the `K` and `D` saved by
//! [`merge_fwd_saving`]) tile by tile into `E_h = c_h·∂L/∂K ⊘ D_h` in shared memory and sums each
//! tile against `B` and `A` at once into per-block partials (`E` is never stored). Every reduction
//! runs in one fixed order (no float atomics), so the results are bit-identical from run to run.
//! Against the CPU reference they agree to rounding: `D` and `K` are computed with the CPU's
//! operation order and carry its bits; `expf`, the backward's fast divisions for `P` and `E`
//! (≤ 2 ulp) and the order of the softmax and gradient sums differ.

use super::{In, Out};
use crate::device::{cuda_err, Gpu};
use cudarc::driver::{CudaSlice, LaunchConfig, PushKernelArg};
use snella_core::SnellaError;

/// Backward tile edge (`TI = TJ` in `merge.cu`).
const TILE: usize = 32;
/// Rows of a forward tile (`TIF` in merge.cu; the columns are [`TILE`]).
const FWD_ROWS: usize = 32;
/// Row stride (floats) of the transposed A, B tiles and of the E tile in shared memory (`TS`, `ES`
/// in merge.cu: multiples of 4 for 16-byte loads; 33 before session 8).
const STRIDE: usize = 36;
/// Threads per block of every merge kernel.
const THREADS: u32 = 256;
/// Static shared memory of the merge kernels (bytes), below the 48 KiB a block gets without opting in.
const STATIC_SHARED: usize = 1024;
/// Dynamic shared memory per block we allow; above the default the tiles kernels opt in
/// ([`Gpu::func_shared`]; every sm_80+ GPU allows at least 99 KiB). 52 KiB keeps at least the `r/H`
/// limits of the 33-float strides before session 8 (165, 74, 28, 5 at H = 1, 2, 4, 8).
const MAX_SHARED: usize = 52 * 1024;

/// Checks the shapes shared by both passes; returns the dynamic shared memory of the backward tiles
/// kernel (`snella_merge_bwd_tiles_r*`), the larger of the two passes'.
#[allow(clippy::too_many_arguments)]
pub(crate) fn check(
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
    let shared = check_pieces(heads, rh)?;
    if n_in > u32::MAX as usize || n_out > u32::MAX as usize {
        return Err(SnellaError::config("in/out", format!("{n_in}x{n_out}"), "dimensions below 2^32"));
    }
    Ok(shared)
}

/// Whether the merge kernels take `heads` kernel pieces of rank `rh = r/H` each: `1 ≤ H ≤ 8` (one
/// backward block covers `H·32` rows of a tile) and the backward tiles kernel's shared memory,
/// `(2·H·(rh + 1)·36 + H·32·36)·4` bytes, within 52 KiB (`rh ≤ 167, 75, 29, 6` at `H = 1, 2, 4, 8`).
/// Returns that shared memory in bytes. Needs no device (adapters are checked with it when they are
/// attached, before any step).
///
/// # Errors
/// `Config` naming `heads` (out of 1..=8) or `heads/rank` (beyond the shared memory).
pub fn check_pieces(heads: usize, rh: usize) -> Result<usize, SnellaError> {
    if heads == 0 || heads > 8 {
        return Err(SnellaError::config("heads", heads, "1 to 8 kernel pieces on the CUDA backend (one backward block covers H·32 rows of a tile)"));
    }
    // the transposed A and B tiles [H][rh + 1][36] and the E tile [H][32][36] (merge.cu TS, ES)
    let shared = (2 * heads * (rh + 1) * STRIDE + heads * TILE * STRIDE) * 4;
    // (the second condition is implied by the first today, ≤ 22 sums; kept as the kernels' own bound)
    if shared > MAX_SHARED || tile_sums_per_thread(heads, rh) > 32 {
        return Err(SnellaError::config(
            "heads/rank",
            format!("H={heads}, r/H={rh}"),
            "(2·H·(r/H + 1)·36 + H·32·36)·4 bytes ≤ 52 KiB of shared memory on the CUDA backend (e.g. r/H ≤ 75 at H = 2, ≤ 167 at H = 1)",
        ));
    }
    Ok(shared)
}

/// Streaming multiprocessors of the device (132 on an H200 if the query fails).
pub(crate) fn sm_count(gpu: &Gpu) -> usize {
    gpu.ctx
        .attribute(cudarc::driver::sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)
        .map(|v| v.max(1) as usize)
        .unwrap_or(132)
}

/// Rows per block of the recomputing backward's row-statistics kernels: the largest of 8, 4, 2 that still
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
/// One launch (SNELL), two with the mixture. Matches [`snella_core::snella::merge::merge_fwd`] to
/// f32 rounding (`K`, hence the whole SNELL output, bit for bit).
///
/// # Errors
/// `Tensor` when a buffer is shorter than its shape; `Config` (naming the field) when `heads` is 0 or
/// above 8, when `r/H` is beyond the shared-memory limit (`r/H ≤ 75` at `H = 2`, `≤ 167` at `H = 1`),
/// or when `in` exceeds 65535·32 rows; `CUDA_ERROR` on a launch failure.
#[allow(clippy::too_many_arguments)]
pub fn merge_fwd(
    gpu: &Gpu, a: &In, b: &In, heads: usize, n_in: usize, n_out: usize, rh: usize, mix: Option<&In>, m: &mut Out,
) -> Result<(), SnellaError> {
    check(a, b, heads, n_in, n_out, rh, mix, m.len(), "M")?;
    fwd_launch(gpu, a, b, heads, n_in, n_out, rh, mix, Some(&mut *m), None, None)
}

/// [`merge_fwd`] followed by the top-k of `|M|` ([`crate::ops::topk::select_topk`], spec §2): with
/// the mixture the softmax pass also builds the select's digit-0 histogram from the values it writes
/// ([`crate::ops::topk::select_topk_after_digit0`]), so the select reads `M` once less and launches
/// once less. The same `M` and kept set, bit for bit, as the two calls.
///
/// # Errors
/// As [`merge_fwd`] and [`crate::ops::topk::select_topk`].
#[allow(clippy::too_many_arguments)]
pub fn merge_fwd_select(
    gpu: &Gpu, a: &In, b: &In, heads: usize, n_in: usize, n_out: usize, rh: usize, mix: Option<&In>, m: &mut Out, k: usize,
) -> Result<crate::ops::topk::CudaKept, SnellaError> {
    use crate::ops::topk;
    check(a, b, heads, n_in, n_out, rh, mix, m.len(), "M")?;
    let n = n_in * n_out;
    if mix.is_none() || n == 0 {
        fwd_launch(gpu, a, b, heads, n_in, n_out, rh, mix, Some(&mut *m), None, None)?;
        return topk::select_topk(gpu, &m.as_view(), n, k);
    }
    let mut state = topk::new_state(gpu)?;
    {
        let mut h0 = state.slice_mut(topk::HIST0_WORD..topk::HIST0_WORD + topk::HIST0_BINS);
        fwd_launch(gpu, a, b, heads, n_in, n_out, rh, mix, Some(&mut *m), None, Some(&mut h0))?;
    }
    topk::select_topk_after_digit0(gpu, &m.as_view(), n, k, state)
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
    fwd_launch(gpu, a, b, heads, n_in, n_out, rh, mix, Some(&mut *m), Some(&mut saved), None)?;
    Ok(saved)
}

/// The forward launches (shapes checked by the caller): `snella_merge_fwd_tiles` over 32×32 tiles
/// writes `K` (and the saved `K`, `D`), then with the mixture `snella_merge_fwd_softmax` rewrites
/// each row of `M` in place.
#[allow(clippy::too_many_arguments)]
fn fwd_launch(
    gpu: &Gpu, a: &In, b: &In, heads: usize, n_in: usize, n_out: usize, rh: usize, mix: Option<&In>, mut m: Option<&mut Out>,
    saved: Option<&mut MergeSaved>, hist0: Option<&mut cudarc::driver::CudaViewMut<u32>>,
) -> Result<(), SnellaError> {
    if n_in == 0 || n_out == 0 {
        return Ok(());
    }
    let (n_it, n_jt) = (n_in.div_ceil(FWD_ROWS), n_out.div_ceil(TILE));
    if n_it > 65535 {
        return Err(SnellaError::config("in", n_in, "at most 65535·32 rows on the CUDA backend"));
    }
    let (h32, i32_, o32, r32) = (heads as u32, n_in as u32, n_out as u32, rh as u32);
    let null = 0u64;
    let shared = 2 * heads * (rh + 1) * STRIDE * 4;
    let f = gpu.func_shared("snella_merge_fwd_tiles", shared, STATIC_SHARED)?;
    let cfg = LaunchConfig { grid_dim: (n_jt as u32, n_it as u32, 1), block_dim: (THREADS, 1, 1), shared_mem_bytes: shared as u32 };
    let mut lb = gpu.stream.launch_builder(&f);
    lb.arg(a).arg(b).arg(&h32).arg(&i32_).arg(&o32).arg(&r32);
    match m.as_mut() {
        Some(m) => lb.arg(&mut **m),
        None => lb.arg(&null),
    };
    match saved {
        Some(sv) => lb.arg(&mut sv.k).arg(&mut sv.d),
        None => lb.arg(&null).arg(&null),
    };
    // SAFETY: the lengths were checked against the shapes (K and D sized by merge_fwd_saving); the
    // kernel bounds-checks rows and columns; the shared memory (2·H·(rh + 1)·36 floats) is within the
    // limit `check` enforces for the larger backward tiles.
    unsafe { lb.launch(cfg) }.map_err(|e| cuda_err("snella_merge_fwd_tiles", e))?;
    if let (Some(x), Some(m)) = (mix, m) {
        let f = gpu.func("snella_merge_fwd_softmax");
        let cfg = LaunchConfig { grid_dim: (n_in as u32, 1, 1), block_dim: (THREADS, 1, 1), shared_mem_bytes: 0 };
        let mut lb = gpu.stream.launch_builder(&f);
        lb.arg(m).arg(&o32).arg(x);
        match hist0 {
            Some(h) => lb.arg(h),
            None => lb.arg(&null),
        };
        // SAFETY: M holds n_in·n_out floats (checked), one block per row; the mixture 3 floats; hist0
        // (when given) 2048 words.
        unsafe { lb.launch(cfg) }.map_err(|e| cuda_err("snella_merge_fwd_softmax", e))?;
    }
    Ok(())
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
/// Two to three launches (see `bwd_tiles`) and one scratch allocation of about
/// `H·(rh + 1)·(in·⌈out/32⌉/jt + out·⌈in/32⌉)` floats (+ `4·in` with the mixture) for the partial
/// sums, `jt` ≥ 1 column tiles per block. Deterministic.
/// Matches [`snella_core::snella::merge::merge_bwd`] to f32 rounding.
///
/// # Errors
/// `Tensor` when a buffer is shorter than its shape; `Config` (naming the field) when `heads` is 0 or
/// above 8, when `r/H` is beyond the shared-memory limit (see [`merge_fwd`]), or when `in` exceeds
/// 65535·32 rows; `CUDA_OOM` for the scratch; `CUDA_ERROR` on a launch failure.
#[allow(clippy::too_many_arguments)]
pub fn merge_bwd(
    gpu: &Gpu, a: &In, b: &In, heads: usize, n_in: usize, n_out: usize, rh: usize, mix: Option<&In>, dm: &In,
    da: &mut Out, db: &mut Out, dmix: Option<&mut Out>,
) -> Result<(), SnellaError> {
    merge_bwd_saved(gpu, None, a, b, heads, n_in, n_out, rh, mix, dm, da, db, dmix)
}

/// [`merge_bwd`] reusing `K` and the distances saved by [`merge_fwd_saving`] from the same `A`,
/// `B` (and mixture): the row statistics and `E` are then element-wise passes over them instead of
/// recomputing `D`, with the recomputing path's arithmetic and sum order (the saved `K`, `D` carry
/// the recomputed bits), so the results are the same bits (asserted on the GPU). `None` recomputes.
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
    let Some(dmix) = grads(gpu, heads, n_in, n_out, rh, mix, da, db, dmix)? else { return Ok(()) };
    bwd_tiles(gpu, saved, a, b, heads, n_in, n_out, rh, mix, dm, da, db, dmix, shared)
}

/// The gradient outputs of a merge backward: checks `dA`, `dB` and `dmix` against their shapes,
/// zeroes all of them for an empty merge (then `None`: nothing left to compute) and `dmix` without
/// a mixture (then `Some(None)`), else hands `dmix` on.
#[allow(clippy::too_many_arguments)]
fn grads<'d, 'v>(
    gpu: &Gpu, heads: usize, n_in: usize, n_out: usize, rh: usize, mix: Option<&In>, da: &mut Out, db: &mut Out, dmix: Option<&'d mut Out<'v>>,
) -> Result<Option<Option<&'d mut Out<'v>>>, SnellaError> {
    for (name, got, want) in [("dA", da.len(), heads * n_in * rh), ("dB", db.len(), heads * n_out * rh), ("dmix", dmix.as_ref().map_or(3, |d| d.len()), 3)] {
        if got < want {
            return Err(SnellaError::tensor("<device>", name, format!("has {got} elements, expected {want}")));
        }
    }
    let zero = |buf: &mut Out, what: &str| gpu.stream.memset_zeros(buf).map_err(|e| cuda_err(what, e));
    if n_in == 0 || n_out == 0 {
        zero(da, "merge_bwd: zero dA")?;
        zero(db, "merge_bwd: zero dB")?;
        if let Some(d) = dmix {
            zero(d, "merge_bwd: zero dmix")?;
        }
        return Ok(None);
    }
    Ok(Some(match (mix, dmix) {
        (None, Some(d)) => {
            zero(d, "merge_bwd: zero dmix")?;
            None
        }
        (_, d) => d,
    }))
}

/// The backward of one adapter straight from its layer's weight gradient in `ΔW`'s layout (spec §2's
/// sparsify backward and §3 in one go; session 9): `g` holds `G = xᵀ·∂L/∂y` for this chunk as
/// `n_in` rows of `c` values at row stride `ld` (the chunk's columns of the layer's `[n_in, out]`
/// gradient, `ld = out`), `kept` the forward's kept set of `M` and `rule` its sparsify rule. Writes
/// `da`, `db` and (with the mixture) `dmix` as [`merge_bwd`] would from `Ĝ = G ⊙ factor(M)`, but
/// neither `M` nor `Ĝ` is formed: the backward-time merge keeps `K` and `D` only, and one row kernel
/// (`snella_merge_bwd_rows_grad`) rebuilds `M` (the forward's bits, hence its kept set), `Ĝ`, the
/// row statistics and `∂L/∂K`, which the tiles kernel then spreads over `E_h = c_h·∂L/∂K ⊘ D_h`.
/// Deterministic; scratch `(2 + H)·n_in·c` floats plus the tiles kernel's partials.
/// Matches [`snella_core::snella::sparsify::sparsify_bwd`] then [`snella_core::snella::merge::merge_bwd`]
/// to f32 rounding.
///
/// # Errors
/// As [`merge_bwd`]; `Tensor` when `g` is shorter than `(n_in − 1)·ld + c` or `ld < c`, or the kept
/// set was not selected from `n_in·c` entries.
#[allow(clippy::too_many_arguments)]
pub fn merge_bwd_from_grad(
    gpu: &Gpu, a: &In, b: &In, heads: usize, n_in: usize, c: usize, rh: usize, mix: Option<&In>, g: &In, ld: usize,
    kept: &crate::ops::topk::CudaKept, rule: snella_core::snella::sparsify::SparsifyRule, da: &mut Out, db: &mut Out, dmix: Option<&mut Out>,
) -> Result<(), SnellaError> {
    let g_need = if n_in == 0 || c == 0 { 0 } else { (n_in - 1) * ld + c };
    if ld < c || g.len() < g_need {
        return Err(SnellaError::tensor("<device>", "G", format!("has {} elements at row stride {ld}, expected {n_in} rows of {c}", g.len())));
    }
    if kept.n != n_in * c {
        return Err(SnellaError::tensor("<device>", "kept set", format!("was selected from {} entries, expected in·out = {}", kept.n, n_in * c)));
    }
    let shared = check(a, b, heads, n_in, c, rh, mix, n_in * c, "G")?;
    let Some(dmix) = grads(gpu, heads, n_in, c, rh, mix, da, db, dmix)? else { return Ok(()) };
    // K and D, M not formed
    // SAFETY: the forward tiles kernel writes every element of K and D (rows < n_in, columns < c).
    let mut saved = unsafe { MergeSaved { k: gpu.uninit::<f32>(n_in * c)?, d: gpu.uninit::<f32>(heads * n_in * c)? } };
    fwd_launch(gpu, a, b, heads, n_in, c, rh, None, None, Some(&mut saved), None)?;
    // ∂L/∂K, rowstat [n_in, 4] and the rows' ∂γ shares [n_in] in one scratch buffer
    let with_mix = mix.is_some();
    let len_rs = if with_mix { 5 * n_in } else { 0 };
    // SAFETY: the rows kernel writes all n_in·c values of ∂L/∂K and, with the mixture, the 5·n_in
    // statistics before any read.
    let mut scratch = unsafe { gpu.uninit::<f32>(n_in * c + len_rs.max(1)) }?;
    let (mut dk, mut stats) = scratch.split_at_mut(n_in * c);
    {
        let f = gpu.func("snella_merge_bwd_rows_grad");
        let (ld64, c32, rule32) = (ld as u64, c as u32, crate::ops::sparsify::rule_code(rule));
        let null = 0u64;
        let cfg = LaunchConfig { grid_dim: (n_in as u32, 1, 1), block_dim: (THREADS, 1, 1), shared_mem_bytes: 0 };
        let mut lb = gpu.stream.launch_builder(&f);
        lb.arg(&saved.k).arg(g).arg(&ld64).arg(&c32);
        match mix {
            Some(x) => lb.arg(x),
            None => lb.arg(&null),
        };
        lb.arg(&kept.dev).arg(&rule32).arg(&mut dk);
        let (mut rs, mut gp) = stats.split_at_mut(if with_mix { 4 * n_in } else { 0 });
        if with_mix {
            lb.arg(&mut rs).arg(&mut gp);
        } else {
            lb.arg(&null).arg(&null);
        }
        // SAFETY: K, dK hold n_in·c floats, G (n_in − 1)·ld + c (checked), the kept words KEPT_WORDS;
        // rowstat 4·n_in and gpart n_in floats with the mixture (null without, unread); one block per row.
        unsafe { lb.launch(cfg) }.map_err(|e| cuda_err("snella_merge_bwd_rows_grad", e))?;
    }
    let (dk, stats) = (dk.as_view(), stats.as_view());
    let parts = tiles(gpu, Some(&saved), a, b, heads, n_in, c, rh, None, &dk, shared)?;
    let (rowstat, gpart) = if with_mix { (stats.slice(..4 * n_in), stats.slice(4 * n_in..5 * n_in)) } else { (stats.slice(..0), stats.slice(..0)) };
    finish(gpu, heads, n_in, c, rh, a, b, da, db, mix, dmix, &parts.a(), parts.n_sa, &parts.b(), parts.n_it, &rowstat, &gpart, gpart.len())
}

/// [`merge_bwd`] for `n_in, n_out ≥ 1`:
/// 1. the row statistics of the softmax (mixture only; from the saved `K` when given);
/// 2. `snella_merge_bwd_tiles_r*`: `E_h` tile by tile in shared memory (recomputed, or from the saved
///    `K` and `D`), summed at once against `[B_h | 1]` and `[A_h | 1]` into per-block partials
///    (`partA [splits, H, rh + 1, in]`, `partB [row tiles, H, rh + 1, out]`) and the `∂γ` partials;
/// 3. `snella_merge_bwd_finish`: `dA = A ⊙ rowsum − E·B`, `dB = B ⊙ colsum − Eᵀ·A`, `dmix`.
///
/// Session 6 (measured with ncu on the H200, ViT-B/16 bf16 step): step 2 replaces a kernel that wrote
/// `E [H, in, out]` to global memory and two strict-f32 cuBLAS GEMMs over it, which took 6.2 of the
/// step's 48.6 ms because cuBLAS gave those skinny products (`N = rh + 1 = 17`) 48 to 192 blocks.
/// Each block takes one 32-row tile and `jt` column tiles, `jt` the largest of 8, 4, 2 that still
/// gives four blocks per SM (the partials of `dA` shrink by `jt`).
#[allow(clippy::too_many_arguments)]
fn bwd_tiles(
    gpu: &Gpu, saved: Option<&MergeSaved>, a: &In, b: &In, heads: usize, n_in: usize, n_out: usize, rh: usize, mix: Option<&In>, dm: &In,
    da: &mut Out, db: &mut Out, dmix: Option<&mut Out>, shared: usize,
) -> Result<(), SnellaError> {
    let sms = sm_count(gpu);
    // SAFETY: the row statistics below write all 4·n_in floats before any read.
    let mut rowstat = unsafe { gpu.uninit::<f32>(if mix.is_some() { 4 * n_in } else { 1 }) }?;
    if let (Some(x), Some(sv)) = (mix, saved) {
        let i32_ = n_in as u32;
        let o32 = n_out as u32;
        let f = gpu.func("snella_merge_bwd_rowstats_saved");
        let cfg = LaunchConfig { grid_dim: (n_in as u32, 1, 1), block_dim: (THREADS, 1, 1), shared_mem_bytes: 0 };
        let mut lb = gpu.stream.launch_builder(&f);
        lb.arg(&sv.k).arg(&i32_).arg(&o32).arg(x).arg(dm).arg(&mut rowstat);
        // SAFETY: K and dM hold n_in·n_out floats (checked), rowstat 4·n_in; one block per row.
        unsafe { lb.launch(cfg) }.map_err(|e| cuda_err("snella_merge_bwd_rowstats_saved", e))?;
    } else if let Some(x) = mix {
        rowstats(gpu, a, b, heads, n_in, n_out, rh, x, dm, &mut rowstat.slice_mut(..), sms)?;
    }
    let rowstat = rowstat.slice(..);
    let parts = tiles(gpu, saved, a, b, heads, n_in, n_out, rh, mix.map(|x| (x, &rowstat)), dm, shared)?;
    let gpart = parts.gpart();
    finish(gpu, heads, n_in, n_out, rh, a, b, da, db, mix, dmix, &parts.a(), parts.n_sa, &parts.b(), parts.n_it, &rowstat, &gpart, parts.len_gp)
}

/// The tiles kernel's per-block partial sums (one scratch buffer: `partA | partB | gpart`).
struct TileParts {
    buf: CudaSlice<f32>,
    len_pa: usize,
    len_pb: usize,
    len_gp: usize,
    /// Column splits of `partA` and row tiles of `partB`.
    n_sa: usize,
    n_it: usize,
}

impl TileParts {
    fn a(&self) -> cudarc::driver::CudaView<'_, f32> {
        self.buf.slice(..self.len_pa)
    }
    fn b(&self) -> cudarc::driver::CudaView<'_, f32> {
        self.buf.slice(self.len_pa..self.len_pa + self.len_pb)
    }
    fn gpart(&self) -> cudarc::driver::CudaView<'_, f32> {
        self.buf.slice(self.len_pa + self.len_pb..)
    }
}

/// Backward step 2: `snella_merge_bwd_tiles_r*` over the whole `[n_in, n_out]` (see [`bwd_tiles`]),
/// with the mixture and its row statistics when given (`dm` = Ĝ), else `dm` taken as `∂L/∂K` itself.
#[allow(clippy::too_many_arguments)]
fn tiles(
    gpu: &Gpu, saved: Option<&MergeSaved>, a: &In, b: &In, heads: usize, n_in: usize, n_out: usize, rh: usize, mix: Option<(&In, &In)>, dm: &In,
    shared: usize,
) -> Result<TileParts, SnellaError> {
    let (h32, i32_, o32, r32) = (heads as u32, n_in as u32, n_out as u32, rh as u32);
    let null = 0u64;
    let sms = sm_count(gpu);
    let (n_it, n_jt) = (n_in.div_ceil(TILE), n_out.div_ceil(TILE));
    if n_it > 65535 {
        return Err(SnellaError::config("in", n_in, "at most 65535·32 rows on the CUDA backend"));
    }
    let r1 = rh + 1;
    let jt = [8usize, 4, 2].into_iter().find(|&t| n_it * n_jt.div_ceil(t) >= 4 * sms).unwrap_or(1);
    let n_sa = n_jt.div_ceil(jt);
    let (len_pa, len_pb, len_gp) = (n_sa * heads * r1 * n_in, n_it * heads * r1 * n_out, n_it * n_sa);
    // SAFETY: the tiles kernel writes every partial of a valid row or column, for every split, and
    // every gpart entry, before the finish reads them.
    let mut buf = unsafe { gpu.uninit::<f32>(len_pa + len_pb + len_gp) }?;
    {
        let (mut part_a, mut rest) = buf.split_at_mut(len_pa);
        let (mut part_b, mut gpart) = rest.split_at_mut(len_pb);
        // the smallest instantiation that holds this thread's count of sums (the kernel computes RM of
        // them, spare ones discarded): RM = 6 at H = 2, r/H = 16 (17 sums over 4 groups)
        let name = match tile_sums_per_thread(heads, rh) {
            0..=6 => "snella_merge_bwd_tiles_r6",
            7..=8 => "snella_merge_bwd_tiles_r8",
            _ => "snella_merge_bwd_tiles_r32",
        };
        let f = gpu.func_shared(name, shared, STATIC_SHARED)?;
        let jt32 = jt as u32;
        let cfg = LaunchConfig { grid_dim: (n_sa as u32, n_it as u32, 1), block_dim: (THREADS, 1, 1), shared_mem_bytes: shared as u32 };
        let mut lb = gpu.stream.launch_builder(&f);
        lb.arg(a).arg(b).arg(&h32).arg(&i32_).arg(&o32).arg(&r32);
        match mix {
            Some((x, rowstat)) => lb.arg(x).arg(dm).arg(rowstat),
            None => lb.arg(&null).arg(dm).arg(&null),
        };
        match saved {
            Some(sv) => lb.arg(&sv.k).arg(&sv.d),
            None => lb.arg(&null).arg(&null),
        };
        lb.arg(&jt32).arg(&mut part_a).arg(&mut part_b).arg(&mut gpart);
        // SAFETY: shapes checked (A, B, dM, K, D; H ≤ 8 and the per-thread sums ≤ 32 by `check`); the
        // partials and gpart are sized above for the grid (n_sa × n_it blocks); the kernel bounds-checks
        // rows and columns.
        unsafe { lb.launch(cfg) }.map_err(|e| cuda_err(name, e))?;
    }
    Ok(TileParts { buf, len_pa, len_pb, len_gp, n_sa, n_it })
}

/// Partial sums each thread of the backward's tiles kernel accumulates: `⌈(rh + 1) / ⌊256 / (32·H)⌋⌉`
/// (`H ≤ 8`).
pub(crate) fn tile_sums_per_thread(heads: usize, rh: usize) -> usize {
    (rh + 1).div_ceil(THREADS as usize / (32 * heads.max(1)))
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

#[cfg(test)]
mod tests {
    use super::check_pieces;
    use snella_core::SnellaError;

    fn field(r: Result<usize, SnellaError>) -> String {
        match r {
            Err(SnellaError::Config { field, .. }) => field,
            other => panic!("expected a Config error, got {other:?}"),
        }
    }

    /// The limits the README states: `r/H ≤ 167, 75, 29, 6` at `H = 1, 2, 4, 8`, and `H` in 1..=8.
    #[test]
    fn piece_limits_match_the_shared_memory() {
        for &(h, max_rh) in &[(1usize, 167usize), (2, 75), (4, 29), (8, 6)] {
            let bytes = check_pieces(h, max_rh).expect("at the limit");
            assert_eq!(bytes, (2 * h * (max_rh + 1) * 36 + h * 32 * 36) * 4);
            assert!(bytes <= 52 * 1024);
            assert_eq!(field(check_pieces(h, max_rh + 1)), "heads/rank", "H={h}: one past the limit");
        }
        assert_eq!(check_pieces(2, 16).unwrap(), (2 * 2 * 17 * 36 + 2 * 32 * 36) * 4, "ViT-B default r = 32, H = 2");
        assert_eq!(field(check_pieces(0, 4)), "heads");
        assert_eq!(field(check_pieces(9, 1)), "heads");
    }
}
