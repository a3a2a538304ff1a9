//! Launchers of `kernels/sparsify.cu`: the sparsify rules (spec §2) and their backward (spec §3),
//! element-wise, with the kept set read from device memory (a [`CudaKept`] from
//! [`super::topk::select_topk`]). CPU reference: [`snella_core::snella::sparsify`], bit for bit.

use super::topk::CudaKept;
use super::{In, Out};
use crate::device::{cuda_err, Gpu};
use cudarc::driver::{LaunchConfig, PushKernelArg};
use snella_core::snella::sparsify::SparsifyRule;
use snella_core::SnellaError;

/// The rule's code in `snella_sparsify_apply`.
/// The kernels' code of a sparsify rule (kernels/common.cuh `snella_sparsify_factor`).
pub(crate) fn rule_code(rule: SparsifyRule) -> u32 {
    match rule {
        SparsifyRule::MagnitudeProduct => 0,
        SparsifyRule::SoftThreshold => 1,
        SparsifyRule::Mask => 2,
    }
}

/// `out[i] = src[i]·factor(m[i])` over the `kept.n` entries.
fn apply(gpu: &Gpu, m: &In, kept: &CudaKept, rule: SparsifyRule, src: Option<&In>, out: &mut Out) -> Result<(), SnellaError> {
    let n = kept.n;
    for (name, len) in [("M", m.len()), ("output", out.len()), ("gradient", src.map_or(n, |s| s.len()))] {
        if len < n {
            return Err(SnellaError::tensor("<device>", name, format!("has {len} elements, the kept set covers {n}")));
        }
    }
    if n == 0 {
        return Ok(());
    }
    let f = gpu.func("snella_sparsify_apply");
    let (n64, rule32) = (n as u64, rule_code(rule));
    let cfg = LaunchConfig { grid_dim: (n.div_ceil(256).min(1 << 20) as u32, 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 };
    let mut lb = gpu.stream.launch_builder(&f);
    lb.arg(m).arg(src.unwrap_or(m)).arg(out).arg(&n64).arg(&kept.dev).arg(&rule32);
    // SAFETY: m, src and out hold ≥ n floats and kept.dev the result words; grid-stride with i < n.
    unsafe { lb.launch(cfg) }.map(|_| ()).map_err(|e| cuda_err("snella_sparsify_apply", e))
}

/// Forward (spec §2): `dw = rule(m)` over the `kept.n` entries of `m` (`[in, out]`, f32), given the
/// kept set of `|m|`: magnitude-product `dw = m·|m|·1_S`, soft-threshold `dw = m·max(|m| − τ, 0)`,
/// mask `dw = m·1_S`. Bit-identical to [`snella_core::snella::sparsify::sparsify_fwd`].
///
/// # Errors
/// `Tensor` when `m` or `dw` is shorter than `kept.n`; `CUDA_ERROR` on a launch failure.
pub fn sparsify_fwd(gpu: &Gpu, m: &In, kept: &CudaKept, rule: SparsifyRule, dw: &mut Out) -> Result<(), SnellaError> {
    apply(gpu, m, kept, rule, None, dw)
}

/// Backward (spec §3): `dm = g ⊙ factor` with the stop-gradient factor of `rule` (`|m|·1_S`,
/// `max(|m| − τ, 0)` or `1_S`); entries outside `S` get 0. `m`, `g`, `dm`: f32, `kept.n` entries.
/// Bit-identical to [`snella_core::snella::sparsify::sparsify_bwd`].
///
/// # Errors
/// `Tensor` when a buffer is shorter than `kept.n`; `CUDA_ERROR` on a launch failure.
pub fn sparsify_bwd(gpu: &Gpu, m: &In, kept: &CudaKept, rule: SparsifyRule, g: &In, dm: &mut Out) -> Result<(), SnellaError> {
    apply(gpu, m, kept, rule, Some(g), dm)
}

fn check_t(op: &str, n_in: usize, c: usize, kept: &CudaKept, lens: &[(&str, usize)]) -> Result<(u32, u32), SnellaError> {
    if kept.n != n_in * c {
        return Err(SnellaError::tensor("<device>", &format!("{op}.kept"), format!("covers {} entries, M is {n_in}×{c}", kept.n)));
    }
    for (name, len) in lens {
        super::reduce::check_len(op, name, *len, n_in * c)?;
    }
    if n_in.div_ceil(32) > 65535 || c.div_ceil(32) > 65535 {
        return Err(SnellaError::config(&format!("{op}.shape"), format!("{n_in}×{c}"), "at most 2097120 rows or columns"));
    }
    Ok((n_in as u32, c as u32))
}

/// Forward fused into a linear's effective weight (spec §2): for one adapter's `m: [n_in, c]`, its
/// kept set and the chunk's frozen rows `w0: [c, n_in]`, writes `w[o, i] = w0[o, i] + rule(m)[i, o]`
/// (`w: [c, n_in]`, f32); without `w0`, `w[o, i] = 0 + rule(m)[i, o]` (the chunk's `ΔWᵀ` alone, as
/// the bf16 step multiplies it next to `W0`). One pass: `ΔW` is never stored. Bit-identical to
/// [`sparsify_fwd`] then an accumulating transpose onto a copy of `w0` (or onto zeros).
///
/// # Errors
/// `Tensor` when a buffer is shorter than `n_in·c` or the kept set has another size;
/// `CUDA_ERROR` on a launch failure.
#[allow(clippy::too_many_arguments)]
pub fn sparsify_into_weight(gpu: &Gpu, m: &In, kept: &CudaKept, rule: SparsifyRule, w0: Option<&In>, n_in: usize, c: usize, w: &mut Out) -> Result<(), SnellaError> {
    let op = "sparsify_into_weight";
    let w0_len = w0.map_or(n_in * c, |v| v.len());
    let (ni, cc) = check_t(op, n_in, c, kept, &[("m", m.len()), ("w0", w0_len), ("w", w.len())])?;
    if n_in * c == 0 {
        return Ok(());
    }
    let f = gpu.func(if w0.is_some() { "snella_sparsify_into_weight" } else { "snella_sparsify_into_weight_nw0" });
    let rule32 = rule_code(rule);
    let cfg = LaunchConfig { grid_dim: (c.div_ceil(32) as u32, n_in.div_ceil(32) as u32, 1), block_dim: (32, 8, 1), shared_mem_bytes: 0 };
    let mut lb = gpu.stream.launch_builder(&f);
    lb.arg(m);
    match w0 {
        Some(v) => lb.arg(v),
        None => lb.arg(m), // not read by the _nw0 kernel
    };
    lb.arg(w).arg(&ni).arg(&cc).arg(&kept.dev).arg(&rule32);
    // SAFETY: m, w0 (when given) and w hold ≥ n_in·c floats (checked); the kernel bounds every index
    // by n_in, c.
    unsafe { lb.launch(cfg) }.map(|_| ()).map_err(|e| cuda_err(op, e))
}

/// [`sparsify_into_weight`] writing a bf16 weight: `w[w_off + o·n_in + i] = bf16(w0[o, i] +
/// rule(m)[i, o])` (`w`: bf16 bit patterns, the chunk's `c` rows at element offset `w_off`; round
/// to nearest even, as [`crate::gemm::to_bf16`] rounds), so that a bf16 step builds the effective
/// weight its products read without an f32 copy and a conversion pass (session 8). Bit-identical to
/// [`sparsify_into_weight`] followed by [`crate::gemm::to_bf16`].
///
/// # Errors
/// `Tensor` when `m` or `w0` is shorter than `n_in·c`, `w` shorter than `w_off + n_in·c`, or the
/// kept set has another size; `CUDA_ERROR` on a launch failure.
#[allow(clippy::too_many_arguments)]
pub fn sparsify_into_weight_bf16(
    gpu: &Gpu, m: &In, kept: &CudaKept, rule: SparsifyRule, w0: &In, n_in: usize, c: usize, w: &mut cudarc::driver::CudaSlice<u16>, w_off: usize,
) -> Result<(), SnellaError> {
    use cudarc::driver::DevicePtrMut;
    let op = "sparsify_into_weight_bf16";
    let w_room = w.len().saturating_sub(w_off);
    let (ni, cc) = check_t(op, n_in, c, kept, &[("m", m.len()), ("w0", w0.len()), ("w past w_off", w_room)])?;
    if n_in * c == 0 {
        return Ok(());
    }
    let f = gpu.func("snella_sparsify_into_weight_bf16");
    let rule32 = rule_code(rule);
    let cfg = LaunchConfig { grid_dim: (c.div_ceil(32) as u32, n_in.div_ceil(32) as u32, 1), block_dim: (32, 8, 1), shared_mem_bytes: 0 };
    let at = w.device_ptr_mut(&gpu.stream).0 + 2 * w_off as u64;
    let mut lb = gpu.stream.launch_builder(&f);
    lb.arg(m).arg(w0).arg(&at).arg(&ni).arg(&cc).arg(&kept.dev).arg(&rule32);
    // SAFETY: m and w0 hold ≥ n_in·c floats, w ≥ w_off + n_in·c bf16 values (checked); the kernel
    // bounds every index by n_in, c.
    unsafe { lb.launch(cfg) }.map(|_| ()).map_err(|e| cuda_err(op, e))
}

/// Backward fused with the transpose out of the weight gradient (spec §3): for the chunk's
/// `gt = ∂L/∂W: [c, n_in]` and `m: [n_in, c]`, writes `gh[i, o] = gt[o, i]·factor(m[i, o])`
/// (`gh: [n_in, c]`, f32). Bit-identical to a transpose then [`sparsify_bwd`].
///
/// # Errors
/// `Tensor` when a buffer is shorter than `n_in·c` or the kept set has another size;
/// `CUDA_ERROR` on a launch failure.
#[allow(clippy::too_many_arguments)]
pub fn sparsify_bwd_from_weight(gpu: &Gpu, gt: &In, m: &In, kept: &CudaKept, rule: SparsifyRule, n_in: usize, c: usize, gh: &mut Out) -> Result<(), SnellaError> {
    let op = "sparsify_bwd_from_weight";
    let (ni, cc) = check_t(op, n_in, c, kept, &[("gt", gt.len()), ("m", m.len()), ("gh", gh.len())])?;
    if n_in * c == 0 {
        return Ok(());
    }
    let f = gpu.func("snella_sparsify_bwd_from_weight");
    let rule32 = rule_code(rule);
    let cfg = LaunchConfig { grid_dim: (n_in.div_ceil(32) as u32, c.div_ceil(32) as u32, 1), block_dim: (32, 8, 1), shared_mem_bytes: 0 };
    let mut lb = gpu.stream.launch_builder(&f);
    lb.arg(gt).arg(m).arg(gh).arg(&ni).arg(&cc).arg(&kept.dev).arg(&rule32);
    // SAFETY: gt, m and gh hold ≥ n_in·c floats (checked); the kernel bounds every index by n_in, c.
    unsafe { lb.launch(cfg) }.map(|_| ()).map_err(|e| cuda_err(op, e))
}
