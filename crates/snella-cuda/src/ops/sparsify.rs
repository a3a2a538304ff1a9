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
fn code(rule: SparsifyRule) -> u32 {
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
    let (n64, rule32) = (n as u64, code(rule));
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
