//! The forward merge path of many adapters in a few launches (session 10): for every kernel adapter
//! of a step, the kernelized merge (spec §1), its exact top-k (spec §2) and the bf16 effective
//! weight `W0 + ΔWᵀ` of its linear ([`super::sparsify::sparsify_into_weight_bf16`]'s pass), with one
//! launch per kernel for each group of adapters of the same shape instead of one per adapter.
//!
//! Why: at ViT-B/16 the per-adapter path queues ≈ 7 kernels and a memset for each of 72 adapters;
//! 48 of them are 768×768, whose kernels fill 0.3–0.7 of an H100 (ncu, session 8) and whose fixed
//! launch and ramp costs dominated the merge path (PERF.md "Session 9", next steps (1)).
//!
//! Each `_batch` kernel (merge.cu, topk.cu, sparsify.cu) is the per-adapter kernel's own body, with
//! its pointers read from a job table (`SnellaFwdJob` in kernels/common.cuh, 8 u64 words per
//! adapter) at `blockIdx.z`; the arithmetic and reduction orders are unchanged, so `M`, the kept set
//! and the weight are bit-identical to [`super::merge::merge_fwd_select`] followed by
//! [`super::sparsify::sparsify_into_weight_bf16`] (tested in `tests/snella_ops.rs`). The top-k
//! states are zeroed by the first kernel instead of a memset each.

use super::merge::{check, check_pieces};
use super::sparsify::rule_code;
use super::topk::{CudaKept, KEPT_WORDS};
use super::In;
use crate::device::{cuda_err, Gpu};
use cudarc::driver::{CudaSlice, DevicePtr, DevicePtrMut, LaunchConfig, PushKernelArg};
use snella_core::snella::sparsify::SparsifyRule;
use snella_core::SnellaError;

/// Bytes of `M` one launch group may hold at once (larger groups are split): bounds the transient
/// `M` of a big model (ViT-B/16: 113 MB per shape group, one launch group each).
const MAX_GROUP_BYTES: usize = 256 << 20;
/// Most chunks of the top-k's tie count (`MAX_CHUNKS` in topk.cu).
const MAX_CHUNKS: usize = 4096;

/// A launch group of the forward: `(H, n_in, c, rh, mixture)`.
type FwdKey = (usize, usize, usize, usize, bool);
/// A launch group of the backward: `(H, n_in, c, rh, mixture, dmix)`.
type BwdKey = (usize, usize, usize, usize, bool, bool);
/// One linear's result: its bf16 effective weight and its chunks' kept sets.
pub type LayerWeight = (CudaSlice<u16>, Vec<CudaKept>);

/// A per-adapter check's error with the tensor's name prefixed by where it is in the batch (`at`:
/// e.g. "layer 3 chunk 1"); other errors (a `Config` names its own field) are returned as they are.
fn located(e: SnellaError, at: &str) -> SnellaError {
    match e {
        SnellaError::Tensor { file, tensor, message } => SnellaError::Tensor { file, tensor: format!("{at} {tensor}"), message },
        other => other,
    }
}

/// One kernel adapter of a linear for [`effective_weights_bf16`].
pub struct AdapterJob<'a> {
    /// `A: [heads, n_in, rh]` (f32).
    pub a: In<'a>,
    /// `B: [heads, c, rh]` (f32; `c` = the linear's rows per chunk).
    pub b: In<'a>,
    /// `[α, γ, β]` (SNELLA) or `None` (SNELL: `M = K`).
    pub mix: Option<In<'a>>,
    /// Kernel pieces `H` (1..=8).
    pub heads: usize,
    /// Rank per piece `r/H`.
    pub rh: usize,
    /// Entries kept by the top-k, `k ≤ n_in·c`.
    pub k: usize,
    /// The sparsify rule.
    pub rule: SparsifyRule,
}

/// One adapted linear for [`effective_weights_bf16`]: every one of its `chunks.len()` output chunks
/// of `c` rows carries a kernel adapter.
pub struct LayerJob<'a> {
    /// `W0: [chunks·c, n_in]` (f32, frozen).
    pub w0: In<'a>,
    /// Input features.
    pub n_in: usize,
    /// Output rows per chunk (each adapter's `n_out`).
    pub c: usize,
    /// The adapters, chunk by chunk.
    pub chunks: Vec<AdapterJob<'a>>,
}

/// For each linear, its bf16 effective weight `W0 + Σ ΔWᵀ` (`[chunks·c, n_in]`, u16 bf16 bits) and
/// each chunk's kept set (spec §1–§2): the same values, bit for bit, as
/// [`super::merge::merge_fwd_select`] and [`super::sparsify::sparsify_into_weight_bf16`] per adapter.
/// Adapters of one shape `(H, n_in, c, rh, mixture or not)` share each launch: seven launches per
/// shape (six for SNELL) and one small table upload; `M` is transient (at most 256 MiB at once).
///
/// # Errors
/// `Tensor` naming the layer and chunk when `A`, `B`, the mixture or `W0` is shorter than its shape;
/// `Config` when `k > n_in·c`, `n_in·c ≥ 2³²`, or `heads`/`rh` are beyond the kernels' limits
/// ([`check_pieces`]); `CUDA_OOM` / `CUDA_ERROR` on allocation, upload or launch failure.
pub fn effective_weights_bf16(gpu: &Gpu, layers: &[LayerJob<'_>]) -> Result<Vec<LayerWeight>, SnellaError> {
    // validate, and allocate the outputs
    let mut out = Vec::with_capacity(layers.len());
    for (li, l) in layers.iter().enumerate() {
        let n = l.n_in * l.c;
        if l.w0.len() < l.chunks.len() * n {
            return Err(SnellaError::tensor("<device>", &format!("layer {li} W0"), format!("has {} elements, expected {}", l.w0.len(), l.chunks.len() * n)));
        }
        if n > u32::MAX as usize || l.n_in.div_ceil(32) > 65535 {
            return Err(SnellaError::config("in/out", format!("{}x{}", l.n_in, l.c), "below 2^32 entries and 65535·32 rows per adapter on the CUDA backend"));
        }
        let mut sets = Vec::with_capacity(l.chunks.len());
        for (ci, j) in l.chunks.iter().enumerate() {
            // the per-adapter merge's own checks (A, B, mixture, pieces; M is allocated here)
            check(&j.a, &j.b, j.heads, l.n_in, l.c, j.rh, j.mix.as_ref(), n, "M").map_err(|e| located(e, &format!("layer {li} chunk {ci}")))?;
            if j.k > n {
                return Err(SnellaError::config("k", j.k, &format!("at most n = {n} (layer {li} chunk {ci})")));
            }
            // zeroed by snella_merge_fwd_tiles_batch before any other kernel reads it (an empty
            // adapter joins no launch: a zeroed state, as the per-adapter select leaves it)
            let dev = if n == 0 {
                super::topk::new_state(gpu)?
            } else {
                // SAFETY: every word is written (zeroed) by the first kernel of the adapter's group.
                unsafe { gpu.uninit::<u32>(KEPT_WORDS) }?
            };
            sets.push(CudaKept { dev, n, k: j.k });
        }
        // SAFETY: every chunk's c·n_in values are written by the sparsify pass below (n > 0), and a
        // zero-sized weight is never read.
        let w = unsafe { gpu.uninit::<u16>(l.chunks.len() * n) }?;
        out.push((w, sets));
    }
    // groups of one shape, in order of first appearance
    let mut groups: Vec<(FwdKey, Vec<(usize, usize)>)> = Vec::new();
    for (li, l) in layers.iter().enumerate() {
        if l.n_in * l.c == 0 {
            continue;
        }
        for (ci, j) in l.chunks.iter().enumerate() {
            let key = (j.heads, l.n_in, l.c, j.rh, j.mix.is_some());
            match groups.iter_mut().find(|g| g.0 == key) {
                Some(g) => g.1.push((li, ci)),
                None => groups.push((key, vec![(li, ci)])),
            }
        }
    }
    for (key, members) in &groups {
        let n = key.1 * key.2;
        let per = (MAX_GROUP_BYTES / (4 * n)).clamp(1, 65535);
        for part in members.chunks(per) {
            launch_group(gpu, layers, &mut out, *key, part)?;
        }
    }
    Ok(out)
}

/// The seven launches of one group of same-shape adapters (`members`: (layer, chunk) pairs).
fn launch_group(
    gpu: &Gpu, layers: &[LayerJob<'_>], out: &mut [LayerWeight], key: FwdKey, members: &[(usize, usize)],
) -> Result<(), SnellaError> {
    let (heads, n_in, c, rh, mixture) = key;
    let n = n_in * c;
    let z = members.len();
    // SAFETY: adapter z's n values are written by snella_merge_fwd_tiles_batch before any read.
    let mut m = unsafe { gpu.uninit::<f32>(z * n) }?;
    let m_base = m.device_ptr_mut(&gpu.stream).0;
    let mut table: Vec<u64> = Vec::with_capacity(8 * z);
    for (zi, &(li, ci)) in members.iter().enumerate() {
        let l = &layers[li];
        let j = &l.chunks[ci];
        let ptr = |v: &In| v.device_ptr(&gpu.stream).0;
        let w0 = ptr(&l.w0) + 4 * (ci * n) as u64;
        let (w, sets) = &mut out[li];
        let w_at = w.device_ptr_mut(&gpu.stream).0 + 2 * (ci * n) as u64;
        let st = sets[ci].dev.device_ptr_mut(&gpu.stream).0;
        let mix = j.mix.as_ref().map_or(0, ptr);
        table.extend([ptr(&j.a), ptr(&j.b), mix, m_base + 4 * (zi * n) as u64, st, w0, w_at, j.k as u64 | (rule_code(j.rule) as u64) << 32]);
    }
    let jobs = gpu.stream.clone_htod(&table).map_err(|e| cuda_err("upload of the merge job table", e))?;
    let (h32, i32_, c32, r32, n64) = (heads as u32, n_in as u32, c as u32, rh as u32, n as u64);
    let err = |what: &'static str| move |e| cuda_err(what, e);
    let z32 = z as u32;
    // 1. K (= M for SNELL) per 32×32 tile; zeroes each top-k state
    let shared = 2 * heads * (rh + 1) * 36 * 4;
    let f = gpu.func_shared("snella_merge_fwd_tiles_batch", shared, 1024)?;
    let cfg = LaunchConfig { grid_dim: (c.div_ceil(32) as u32, n_in.div_ceil(32) as u32, z32), block_dim: (256, 1, 1), shared_mem_bytes: shared as u32 };
    let mut lb = gpu.stream.launch_builder(&f);
    lb.arg(&jobs).arg(&h32).arg(&i32_).arg(&c32).arg(&r32);
    // SAFETY: the table's A, B hold heads·(n_in | c)·rh floats, M z·n, states KEPT_WORDS words
    // (checked above); the body bounds-checks rows and columns.
    unsafe { lb.launch(cfg) }.map_err(err("snella_merge_fwd_tiles_batch"))?;
    // 2. the mixture's softmax rows, with the top-k's digit-0 histogram
    if mixture {
        let f = gpu.func("snella_merge_fwd_softmax_batch");
        let cfg = LaunchConfig { grid_dim: (n_in as u32, 1, z32), block_dim: (256, 1, 1), shared_mem_bytes: 0 };
        let mut lb = gpu.stream.launch_builder(&f);
        lb.arg(&jobs).arg(&c32);
        // SAFETY: one block per row of each adapter's M; the mixture holds 3 floats (checked).
        unsafe { lb.launch(cfg) }.map_err(err("snella_merge_fwd_softmax_batch"))?;
    }
    // 3. the select (topk.rs select_from's launches, one per digit / ties / finish for all)
    let f = gpu.func("snella_topk_hist_batch");
    let cfg = LaunchConfig { grid_dim: (n.div_ceil(2048).min(1024) as u32, 1, z32), block_dim: (256, 1, 1), shared_mem_bytes: 0 };
    for pass in (if mixture { 1u32 } else { 0 })..3 {
        let mut lb = gpu.stream.launch_builder(&f);
        lb.arg(&jobs).arg(&n64).arg(&pass);
        // SAFETY: each M holds n floats; states KEPT_WORDS words; bounds-checked idx < n.
        unsafe { lb.launch(cfg) }.map_err(err("snella_topk_hist_batch"))?;
    }
    let chunk = n.div_ceil(MAX_CHUNKS).max(2048);
    let nchunks = n.div_ceil(chunk);
    let (chunk64, nchunks32) = (chunk as u64, nchunks as u32);
    let f = gpu.func("snella_topk_ties_batch");
    let cfg = LaunchConfig { grid_dim: (nchunks32, 1, z32), block_dim: (256, 1, 1), shared_mem_bytes: 0 };
    let mut lb = gpu.stream.launch_builder(&f);
    lb.arg(&jobs).arg(&n64).arg(&chunk64);
    // SAFETY: nchunks·chunk ≥ n, nchunks ≤ 4096 count words per state; bounds-checked.
    unsafe { lb.launch(cfg) }.map_err(err("snella_topk_ties_batch"))?;
    let f = gpu.func("snella_topk_finish_batch");
    let cfg = LaunchConfig { grid_dim: (1, 1, z32), block_dim: (1024, 1, 1), shared_mem_bytes: 0 };
    let mut lb = gpu.stream.launch_builder(&f);
    lb.arg(&jobs).arg(&n64).arg(&nchunks32).arg(&chunk64);
    // SAFETY: as above; one block per adapter.
    unsafe { lb.launch(cfg) }.map_err(err("snella_topk_finish_batch"))?;
    // 4. W0 + ΔWᵀ into each chunk of the bf16 weights
    let f = gpu.func("snella_sparsify_into_weight_bf16_batch");
    let cfg = LaunchConfig { grid_dim: (c.div_ceil(32) as u32, n_in.div_ceil(32) as u32, z32), block_dim: (32, 8, 1), shared_mem_bytes: 0 };
    let mut lb = gpu.stream.launch_builder(&f);
    lb.arg(&jobs).arg(&i32_).arg(&c32);
    // SAFETY: each M and W0 chunk hold n floats, each weight chunk n bf16 values (checked/allocated);
    // the body bounds every index by n_in, c.
    unsafe { lb.launch(cfg) }.map_err(err("snella_sparsify_into_weight_bf16_batch"))?;
    drop(m);
    Ok(())
}

/// One kernel adapter's backward for [`adapter_bwd_batch`]: what
/// [`super::merge::merge_bwd_from_grad`] takes for it.
pub struct GradJob<'a, 'b> {
    /// Its chunk of the layer's weight gradient `G = xᵀ·∂L/∂y`: `n_in` rows of `c` values at row
    /// stride `ld` (a view starting at the chunk's first column).
    pub g: In<'a>,
    /// Row stride of `g` (the layer's `n_out`), `≥ c`.
    pub ld: usize,
    /// The forward's kept set of this adapter's `M` (`n_in·c` entries).
    pub kept: &'a CudaKept,
    /// The sparsify rule.
    pub rule: SparsifyRule,
    /// `A: [heads, n_in, rh]`.
    pub a: In<'a>,
    /// `B: [heads, c, rh]`.
    pub b: In<'a>,
    /// Kernel pieces `H`.
    pub heads: usize,
    /// Input features.
    pub n_in: usize,
    /// Output features of the chunk.
    pub c: usize,
    /// Rank per piece `r/H`.
    pub rh: usize,
    /// `[α, γ, β]` or `None` (SNELL).
    pub mix: Option<In<'a>>,
    /// `∂L/∂A`, overwritten.
    pub da: super::Out<'b>,
    /// `∂L/∂B`, overwritten.
    pub db: super::Out<'b>,
    /// `(∂α, ∂γ, ∂β)`, overwritten when given.
    pub dmix: Option<super::Out<'b>>,
}

/// [`super::merge::merge_bwd_from_grad`] for many adapters, four launches for each group of
/// same-shape adapters instead of four per adapter (session 10): the same kernels' bodies over a
/// job table (`SnellaBwdJob`, 18 u64 words per adapter), the same block partition (`jt`) as one
/// adapter alone, so the same bits. Scratch `(2 + H)·n_in·c` floats plus partials per adapter,
/// at most 256 MiB per launch group. Empty shapes and a `dmix` without a mixture go through the
/// per-adapter function (it zeroes them).
///
/// # Errors
/// As [`super::merge::merge_bwd_from_grad`], naming the job's index.
pub fn adapter_bwd_batch(gpu: &Gpu, jobs: &mut [GradJob<'_, '_>]) -> Result<(), SnellaError> {
    use super::merge::{check, merge_bwd_from_grad};
    let mut groups: Vec<(BwdKey, Vec<usize>)> = Vec::new();
    // jobs for the per-adapter function, run once every job is validated (a bad job writes nothing)
    let mut alone = Vec::new();
    for (ji, j) in jobs.iter_mut().enumerate() {
        let named = |e: SnellaError| located(e, &format!("adapter backward job {ji}"));
        if j.n_in == 0 || j.c == 0 || (j.mix.is_none() && j.dmix.is_some()) {
            alone.push(ji);
            continue;
        }
        let n = j.n_in * j.c;
        if j.n_in.div_ceil(32) > 65535 {
            return Err(named(SnellaError::config("in", j.n_in, "at most 65535·32 rows on the CUDA backend")));
        }
        if j.ld < j.c || j.g.len() < (j.n_in - 1) * j.ld + j.c {
            return Err(named(SnellaError::tensor("<device>", "G", format!("has {} elements at row stride {}, expected {} rows of {}", j.g.len(), j.ld, j.n_in, j.c))));
        }
        if j.kept.n != n {
            return Err(named(SnellaError::tensor("<device>", "kept set", format!("was selected from {} entries, expected in·out = {n}", j.kept.n))));
        }
        check(&j.a, &j.b, j.heads, j.n_in, j.c, j.rh, j.mix.as_ref(), n, "G").map_err(named)?;
        for (name, got, want) in [("dA", j.da.len(), j.heads * j.n_in * j.rh), ("dB", j.db.len(), j.heads * j.c * j.rh), ("dmix", j.dmix.as_ref().map_or(3, |d| d.len()), 3)] {
            if got < want {
                return Err(named(SnellaError::tensor("<device>", name, format!("has {got} elements, expected {want}"))));
            }
        }
        let key = (j.heads, j.n_in, j.c, j.rh, j.mix.is_some(), j.dmix.is_some());
        match groups.iter_mut().find(|g| g.0 == key) {
            Some(g) => g.1.push(ji),
            None => groups.push((key, vec![ji])),
        }
    }
    for ji in alone {
        let GradJob { g, ld, kept, rule, a, b, heads, n_in, c, rh, mix, da, db, dmix } = &mut jobs[ji];
        merge_bwd_from_grad(gpu, a, b, *heads, *n_in, *c, *rh, mix.as_ref(), g, *ld, kept, *rule, da, db, dmix.as_mut())
            .map_err(|e| located(e, &format!("adapter backward job {ji}")))?;
    }
    let sms = super::merge::sm_count(gpu);
    for (key, members) in &groups {
        let lay = bwd_layout(*key, sms);
        let per = (MAX_GROUP_BYTES / (4 * lay.total)).clamp(1, 65535);
        for part in members.chunks(per) {
            bwd_group(gpu, jobs, *key, &lay, part)?;
        }
    }
    Ok(())
}

/// Per-adapter scratch of a backward group (floats, in this order): K, D, ∂L/∂K, rowstat, the rows'
/// ∂γ shares, then the tiles kernel's partials; and that kernel's grid.
struct BwdLayout {
    k: usize,
    d: usize,
    dk: usize,
    rowstat: usize,
    gpart: usize,
    part_a: usize,
    part_b: usize,
    tgpart: usize,
    total: usize,
    n_sa: usize,
    n_it: usize,
    jt: usize,
}

fn bwd_layout(key: BwdKey, sms: usize) -> BwdLayout {
    let (heads, n_in, c, rh, mixture, _) = key;
    let n = n_in * c;
    let (n_it, n_jt) = (n_in.div_ceil(32), c.div_ceil(32));
    // the per-adapter partition (ops/merge.rs `tiles`), so that the partial sums keep their order
    let jt = [8usize, 4, 2].into_iter().find(|&t| n_it * n_jt.div_ceil(t) >= 4 * sms).unwrap_or(1);
    let n_sa = n_jt.div_ceil(jt);
    let r1 = rh + 1;
    let stats = if mixture { n_in } else { 0 };
    let sizes = [n, heads * n, n, 4 * stats, stats, n_sa * heads * r1 * n_in, n_it * heads * r1 * c, n_it * n_sa];
    BwdLayout {
        k: sizes[0],
        d: sizes[1],
        dk: sizes[2],
        rowstat: sizes[3],
        gpart: sizes[4],
        part_a: sizes[5],
        part_b: sizes[6],
        tgpart: sizes[7],
        total: sizes.iter().sum(),
        n_sa,
        n_it,
        jt,
    }
}

/// The four launches of one group of same-shape adapter backwards (`members`: job indices).
fn bwd_group(gpu: &Gpu, jobs: &mut [GradJob<'_, '_>], key: BwdKey, lay: &BwdLayout, members: &[usize]) -> Result<(), SnellaError> {
    let (heads, n_in, c, rh, _, with_dmix) = key;
    let z = members.len();
    // SAFETY: every scratch value is written by an earlier kernel of the group before it is read
    // (K, D by kd; ∂L/∂K, rowstat, gpart by rows_grad; the partials by the tiles kernel).
    let mut scratch = unsafe { gpu.uninit::<f32>(z * lay.total) }?;
    let base = scratch.device_ptr_mut(&gpu.stream).0;
    let mut table: Vec<u64> = Vec::with_capacity(18 * z);
    for (zi, &ji) in members.iter().enumerate() {
        let j = &mut jobs[ji];
        let mut at = base + 4 * (zi * lay.total) as u64;
        let mut next = |len: usize| {
            let p = if len == 0 { 0 } else { at };
            at += 4 * len as u64;
            p
        };
        let (k, d, dk, rowstat, gpart, pa, pb, tg) = (next(lay.k), next(lay.d), next(lay.dk), next(lay.rowstat), next(lay.gpart), next(lay.part_a), next(lay.part_b), next(lay.tgpart));
        let ptr = |v: &In| v.device_ptr(&gpu.stream).0;
        let mix = j.mix.as_ref().map_or(0, ptr);
        let dmix = j.dmix.as_mut().map_or(0, |d| d.device_ptr_mut(&gpu.stream).0);
        let (da, db) = (j.da.device_ptr_mut(&gpu.stream).0, j.db.device_ptr_mut(&gpu.stream).0);
        let kept = j.kept.dev.device_ptr(&gpu.stream).0;
        table.extend([ptr(&j.a), ptr(&j.b), mix, ptr(&j.g), j.ld as u64, kept, rule_code(j.rule) as u64, k, d, dk, rowstat, gpart, pa, pb, tg, da, db, dmix]);
    }
    let table_dev = gpu.stream.clone_htod(&table).map_err(|e| cuda_err("upload of the adapter backward job table", e))?;
    let (h32, i32_, c32, r32, z32) = (heads as u32, n_in as u32, c as u32, rh as u32, z as u32);
    let err = |what: &'static str| move |e| cuda_err(what, e);
    // 1. K and D
    let fshared = 2 * heads * (rh + 1) * 36 * 4;
    let f = gpu.func_shared("snella_merge_bwd_kd_batch", fshared, 1024)?;
    let cfg = LaunchConfig { grid_dim: (c.div_ceil(32) as u32, n_in.div_ceil(32) as u32, z32), block_dim: (256, 1, 1), shared_mem_bytes: fshared as u32 };
    let mut lb = gpu.stream.launch_builder(&f);
    lb.arg(&table_dev).arg(&h32).arg(&i32_).arg(&c32).arg(&r32);
    // SAFETY: A, B checked against the shape; K and D sized n and H·n per adapter in the scratch.
    unsafe { lb.launch(cfg) }.map_err(err("snella_merge_bwd_kd_batch"))?;
    // 2. M, Ĝ, the row statistics and ∂L/∂K, one block per row
    let f = gpu.func("snella_merge_bwd_rows_grad_batch");
    let cfg = LaunchConfig { grid_dim: (n_in as u32, 1, z32), block_dim: (256, 1, 1), shared_mem_bytes: 0 };
    let mut lb = gpu.stream.launch_builder(&f);
    lb.arg(&table_dev).arg(&c32);
    // SAFETY: G holds (n_in − 1)·ld + c floats (checked), K, ∂L/∂K n, rowstat 4·n_in and gpart n_in
    // with the mixture (null without), the kept words KEPT_WORDS.
    unsafe { lb.launch(cfg) }.map_err(err("snella_merge_bwd_rows_grad_batch"))?;
    // 3. the tiles with ∂L/∂K as their gradient
    let shared = check_pieces(heads, rh)?;
    let name = match super::merge::tile_sums_per_thread(heads, rh) {
        0..=6 => "snella_merge_bwd_tiles_r6_batch",
        7..=8 => "snella_merge_bwd_tiles_r8_batch",
        _ => "snella_merge_bwd_tiles_r32_batch",
    };
    let f = gpu.func_shared(name, shared, 1024)?;
    let jt32 = lay.jt as u32;
    let cfg = LaunchConfig { grid_dim: (lay.n_sa as u32, lay.n_it as u32, z32), block_dim: (256, 1, 1), shared_mem_bytes: shared as u32 };
    let mut lb = gpu.stream.launch_builder(&f);
    lb.arg(&table_dev).arg(&h32).arg(&i32_).arg(&c32).arg(&r32).arg(&jt32);
    // SAFETY: the partials are sized for this grid (n_sa × n_it blocks) per adapter; the body
    // bounds-checks rows and columns; H ≤ 8 and the per-thread sums ≤ 32 (check_pieces).
    unsafe { lb.launch(cfg) }.map_err(err(name))?;
    // 4. dA, dB (and dmix)
    let (nb_a, nb_b) = ((heads * n_in * rh).div_ceil(256), (heads * c * rh).div_ceil(256));
    let blocks = nb_a + nb_b + with_dmix as usize;
    let f = gpu.func("snella_merge_bwd_finish_batch");
    let (ns_a32, ns_b32, nb_a32, nb_b32) = (lay.n_sa as u32, lay.n_it as u32, nb_a as u32, nb_b as u32);
    let cfg = LaunchConfig { grid_dim: (blocks as u32, 1, z32), block_dim: (256, 1, 1), shared_mem_bytes: 0 };
    let mut lb = gpu.stream.launch_builder(&f);
    lb.arg(&table_dev).arg(&ns_a32).arg(&ns_b32).arg(&h32).arg(&i32_).arg(&c32).arg(&r32).arg(&nb_a32).arg(&nb_b32);
    // SAFETY: dA, dB hold H·n_in·rh and H·c·rh floats (checked), dmix 3 when given (with the
    // mixture); the partials were written for every valid (h, row, r).
    unsafe { lb.launch(cfg) }.map_err(err("snella_merge_bwd_finish_batch"))?;
    drop(scratch);
    Ok(())
}
