//! AdamW (Loshchilov & Hutter, decoupled weight decay), as `torch.optim.AdamW`.

use crate::Real;

/// Hyper-parameters of one AdamW update.
#[derive(Clone, Copy, Debug)]
pub struct AdamWParams {
    /// Learning rate for this step (after the schedule).
    pub lr: f64,
    /// First-moment decay β1.
    pub beta1: f64,
    /// Second-moment decay β2.
    pub beta2: f64,
    /// ε added to the denominator.
    pub eps: f64,
    /// Decoupled weight decay (0 for the no-decay group).
    pub weight_decay: f64,
    /// The 1-based step count, for bias correction.
    pub step: u64,
}

/// One in-place AdamW update of `param` from `grad`, with moments `m`, `v`:
/// `p ← p·(1 − lr·wd)`, `m ← β1·m + (1−β1)·g`, `v ← β2·v + (1−β2)·g²`,
/// `p ← p − lr·(m/(1−β1^t)) / (sqrt(v/(1−β2^t)) + ε)` — the exact order of PyTorch's
/// single-tensor implementation.
pub fn adamw_step<T: Real>(param: &mut [T], grad: &[T], m: &mut [T], v: &mut [T], h: &AdamWParams) {
    let _ = (param, grad, m, v, h);
    todo!("helper A")
}
