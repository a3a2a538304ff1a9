//! Launchers of `kernels/topk.cu`: exact top-k of `|M|` on the device (spec §2, per-layer
//! competition). CPU reference: [`snella_core::snella::topk::select_topk`].
//!
//! Radix select on the f32 bit pattern of `|x|` (NaN and `±0` count as 0), three histogram passes
//! and no sort, for any size below 2³² entries: five launches (four for `k = 0`; one less when the
//! producer of `M` built the first histogram, [`select_topk_after_digit0`]) and one zeroed
//! allocation. Each kernel reads the previous one's prefix and remaining rank from device memory,
//! so the whole select is queued without a host synchronisation; only [`kept_to_host`] waits.

use super::In;
use crate::device::{cuda_err, Gpu};
use cudarc::driver::{CudaSlice, LaunchConfig, PushKernelArg};
use snella_core::snella::topk::KeptSet;
use snella_core::SnellaError;

/// Word of [`CudaKept::dev`]: the threshold magnitude (f32 bits).
pub const W_THRESHOLD: usize = 0;
/// Word of [`CudaKept::dev`]: the tie cut (entries equal to the threshold are kept below this flat index).
pub const W_TIE_CUT: usize = 1;
/// Word of [`CudaKept::dev`]: `τ`, the largest dropped magnitude (f32 bits; 0 when `k == n`).
pub const W_TAU: usize = 2;
/// Word of [`CudaKept::dev`]: `k`.
pub const W_K: usize = 3;
/// Word of [`CudaKept::dev`]: the number of kept entries equal to the threshold.
pub const W_TIES: usize = 4;
/// Length of [`CudaKept::dev`]: the 5 result words, selection state, the histograms of the three
/// digits (2048 + 2048 + 512 bins) and 4096 per-chunk tie counts (layout in `kernels/topk.cu`).
pub const KEPT_WORDS: usize = 32 + 2048 + 2048 + 512 + 4096;
/// Most chunks of the tie count (`MAX_CHUNKS` in `topk.cu`).
const MAX_CHUNKS: usize = 4096;
/// First word of the digit-0 histogram in [`CudaKept::dev`] (`W_HIST0` in `topk.cu`): 2048 bins of
/// bits 30..20 of the key, which `snella_merge_fwd_softmax` can fill (see [`select_topk_after_digit0`]).
pub const HIST0_WORD: usize = 32;
/// Bins of the digit-0 histogram.
pub const HIST0_BINS: usize = 2048;

/// A zeroed selection state ([`KEPT_WORDS`] words) for [`select_topk_after_digit0`], whose digit-0
/// histogram (words [`HIST0_WORD`]`..+`[`HIST0_BINS`]) a producer of `M` fills first.
///
/// # Errors
/// `CUDA_OOM` when the allocation fails.
pub fn new_state(gpu: &Gpu) -> Result<CudaSlice<u32>, SnellaError> {
    gpu.stream.alloc_zeros::<u32>(KEPT_WORDS).map_err(|e| gpu.oom(KEPT_WORDS * 4, e))
}

/// The kept set of one layer on the device (spec §2), as `snella_sparsify_apply` reads it.
///
/// `dev` (u32 words, [`KEPT_WORDS`] long) starts with `{threshold: f32 bits, tie_cut, tau: f32 bits,
/// k, ties}`: an entry `x` at flat index `i` is kept iff `|x| > threshold`, or `|x| == threshold` and
/// `i < tie_cut` (ties go to the lower flat indices, so exactly `k` entries are kept). NaN counts as
/// magnitude 0. For `k == 0`, `threshold = tau = max |x|` and `tie_cut = ties = 0`.
pub struct CudaKept {
    /// The result words followed by the selection's scratch (see [`KEPT_WORDS`]).
    pub dev: CudaSlice<u32>,
    /// The number of entries the set was selected from.
    pub n: usize,
    /// The number of kept entries.
    pub k: usize,
}

fn launch_err(what: &'static str) -> impl Fn(cudarc::driver::DriverError) -> SnellaError {
    move |e| cuda_err(what, e)
}

/// Selects the `k` entries of largest magnitude among the first `n` entries of `m` (spec §2), exactly,
/// ties by lower flat index. Queued on the stream; nothing is read back.
///
/// - `m`: f32, at least `n` entries (typically the merged `M: [in, out]` of one layer).
/// - returns the [`CudaKept`] description of the set (threshold, tie cut, `τ`, `k`, ties).
///
/// Matches [`snella_core::snella::topk::select_topk`] on `|m|` exactly (threshold, ties, `τ`).
///
/// # Errors
/// `Config` when `k > n` or `n ≥ 2³²`; `Tensor` when `m` is shorter than `n`; `CUDA_OOM` /
/// `CUDA_ERROR` on allocation or launch failure.
pub fn select_topk(gpu: &Gpu, m: &In, n: usize, k: usize) -> Result<CudaKept, SnellaError> {
    select_from(gpu, m, n, k, None)
}

/// [`select_topk`] with the digit-0 histogram of `|m|` already in `state` (made by [`new_state`] and
/// filled by the kernel that wrote `m`, e.g. `snella_merge_fwd_softmax`): the select starts at
/// digit 1, four launches instead of five. The same result as [`select_topk`] when the histogram
/// counts exactly the keys of the first `n` entries of `m`.
///
/// # Errors
/// As [`select_topk`]; `Tensor` when `state` is not [`KEPT_WORDS`] long.
pub fn select_topk_after_digit0(gpu: &Gpu, m: &In, n: usize, k: usize, state: CudaSlice<u32>) -> Result<CudaKept, SnellaError> {
    if state.len() != KEPT_WORDS {
        return Err(SnellaError::tensor("<device>", "top-k state", format!("has {} words, expected {KEPT_WORDS}", state.len())));
    }
    select_from(gpu, m, n, k, Some(state))
}

/// The select from digit 0 (`state` `None`: a new zeroed state) or from digit 1 (`state` holding
/// the digit-0 histogram).
fn select_from(gpu: &Gpu, m: &In, n: usize, k: usize, state: Option<CudaSlice<u32>>) -> Result<CudaKept, SnellaError> {
    if m.len() < n {
        return Err(SnellaError::tensor("<device>", "M", format!("has {} elements, expected at least n = {n}", m.len())));
    }
    if k > n {
        return Err(SnellaError::config("k", k, &format!("at most n = {n} (the number of entries)")));
    }
    if n > u32::MAX as usize {
        return Err(SnellaError::config("n", n, "below 2^32 entries per layer on the CUDA backend"));
    }
    let first_pass = if state.is_some() { 1u32 } else { 0 };
    let mut dev = match state {
        Some(s) => s,
        None => new_state(gpu)?,
    };
    if n == 0 {
        return Ok(CudaKept { dev, n, k });
    }
    let n64 = n as u64;
    let k0 = k.max(1) as u32; // k = 0 selects the maximum (k = 1) and reports it with no kept entry
    let hist = gpu.func("snella_topk_hist");
    let hist_cfg = LaunchConfig { grid_dim: (n.div_ceil(2048).min(1024) as u32, 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 };
    let one_cfg = LaunchConfig { grid_dim: (1, 1, 1), block_dim: (1024, 1, 1), shared_mem_bytes: 0 };
    for pass in first_pass..3 {
        let mut lb = gpu.stream.launch_builder(&hist);
        lb.arg(m).arg(&n64).arg(&mut dev).arg(&pass).arg(&k0);
        // SAFETY: m holds ≥ n floats, dev KEPT_WORDS words; the kernel bounds-checks idx < n.
        unsafe { lb.launch(hist_cfg) }.map_err(launch_err("snella_topk_hist"))?;
    }
    let chunk = n.div_ceil(MAX_CHUNKS).max(2048);
    let nchunks = n.div_ceil(chunk);
    let (chunk64, nchunks32, k32) = (chunk as u64, nchunks as u32, k as u32);
    if k > 0 {
        let f = gpu.func("snella_topk_ties");
        let cfg = LaunchConfig { grid_dim: (nchunks32, 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 };
        let mut lb = gpu.stream.launch_builder(&f);
        lb.arg(m).arg(&n64).arg(&mut dev).arg(&chunk64);
        // SAFETY: nchunks·chunk ≥ n and nchunks ≤ 4096 count words; bounds-checked.
        unsafe { lb.launch(cfg) }.map_err(launch_err("snella_topk_ties"))?;
    }
    let f = gpu.func("snella_topk_finish");
    let mut lb = gpu.stream.launch_builder(&f);
    lb.arg(m).arg(&n64).arg(&mut dev).arg(&k32).arg(&nchunks32).arg(&chunk64);
    // SAFETY: as above; one block.
    unsafe { lb.launch(one_cfg) }.map_err(launch_err("snella_topk_finish"))?;
    Ok(CudaKept { dev, n, k })
}

/// Reads a [`CudaKept`] back as the CPU's [`KeptSet`] (threshold and `τ` widened to f64, `ties` =
/// the number of kept entries equal to the threshold). Waits for the stream.
///
/// # Errors
/// `CUDA_ERROR` when the copy (or a queued kernel) failed.
pub fn kept_to_host(gpu: &Gpu, kept: &CudaKept) -> Result<KeptSet, SnellaError> {
    let w = kept_words(gpu, kept)?;
    Ok(KeptSet {
        threshold: f32::from_bits(w[W_THRESHOLD]) as f64,
        ties: w[W_TIES] as usize,
        k: w[W_K] as usize,
        tau: f32::from_bits(w[W_TAU]) as f64,
    })
}

/// The five result words `[threshold bits, tie_cut, tau bits, k, ties]` of a [`CudaKept`] (for tests
/// and diagnostics). Waits for the stream.
///
/// # Errors
/// `CUDA_ERROR` when the copy (or a queued kernel) failed.
pub fn kept_words(gpu: &Gpu, kept: &CudaKept) -> Result<[u32; 5], SnellaError> {
    let v = gpu.stream.clone_dtoh(&kept.dev.slice(0..5)).map_err(|e| cuda_err("kept_to_host", e))?;
    Ok([v[0], v[1], v[2], v[3], v[4]])
}
