//! Multi-head self-attention core (timm `Attention` between `qkv` and `proj`), forward and backward.
//!
//! Layout: `qkv: [b, t, 3·d]` where column `s·d + h·hd + e` is q/k/v (`s` = 0/1/2) of head `h`,
//! element `e` (timm reshapes to `(b, t, 3, heads, hd)`); `out: [b, t, d]` with column `h·hd + e`.
//! Scores are scaled by `hd^-0.5`; the softmax runs over keys.

use crate::Real;

/// Writes `out: [b, t, d]` and saves the attention probabilities `probs: [b, heads, t, t]`.
#[allow(clippy::too_many_arguments)]
pub fn attention_fwd<T: Real>(
    qkv: &[T], b: usize, t: usize, heads: usize, hd: usize, out: &mut [T], probs: &mut [T],
) {
    let _ = (qkv, b, t, heads, hd, out, probs);
    todo!("helper A")
}

/// Backward of [`attention_fwd`]: writes `dqkv: [b, t, 3·d]` from `dout: [b, t, d]`.
#[allow(clippy::too_many_arguments)]
pub fn attention_bwd<T: Real>(
    dout: &[T], qkv: &[T], probs: &[T], b: usize, t: usize, heads: usize, hd: usize, dqkv: &mut [T],
) {
    let _ = (dout, qkv, probs, b, t, heads, hd, dqkv);
    todo!("helper A")
}
