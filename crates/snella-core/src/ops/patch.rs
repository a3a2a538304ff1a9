//! Patch embedding as im2col + GEMM (timm `PatchEmbed`: a conv with kernel = stride = patch).

use crate::Real;

/// Unfolds `images: [b, ch, h, w]` (NCHW) into `cols: [b·np, ch·p·p]`, `np = (h/p)·(w/p)`, patches
/// in row-major order, each patch flattened as `(channel, ky, kx)` to match a conv weight
/// `[d, ch, p, p]` viewed as `[d, ch·p·p]`.
pub fn im2col<T: Real>(images: &[T], b: usize, ch: usize, h: usize, w: usize, p: usize, cols: &mut [T]) {
    let _ = (images, b, ch, h, w, p, cols);
    todo!("helper A")
}
