//! Launcher of `kernels/patch.cu`: the patch embedding's im2col, f32 (no backward: images take no
//! gradient).

use super::reduce::{check_len, dim_u32, grid_stride};
use super::{In, Out};
use crate::device::{cuda_err, Gpu};
use cudarc::driver::PushKernelArg;
use snella_core::SnellaError;

/// Unfolds `images: [b, ch, h, w]` (NCHW, f32) into `cols: [b·np, ch·p·p]`, `np = (h/p)·(w/p)`, as
/// `snella_core::ops::patch::im2col`:
/// `cols[bi·np + py·(w/p) + px, c·p² + ky·p + kx] = images[bi, c, py·p + ky, px·p + kx]`.
/// Trailing pixels when `h` or `w` is not a multiple of `p` are dropped.
///
/// # Errors
/// `Config` when `p == 0` or a dimension exceeds `u32`; `Tensor` when a buffer is too short;
/// `CUDA_ERROR` on a launch failure.
#[allow(clippy::too_many_arguments)]
pub fn im2col(gpu: &Gpu, images: &In, b: usize, ch: usize, h: usize, w: usize, p: usize, cols: &mut Out) -> Result<(), SnellaError> {
    if p == 0 {
        return Err(SnellaError::config("im2col.p", 0, "a positive patch size"));
    }
    let np = (h / p) * (w / p);
    let total = b * np * ch * p * p;
    check_len("im2col", "images", images.len(), b * ch * h * w)?;
    check_len("im2col", "cols", cols.len(), total)?;
    if total == 0 {
        return Ok(());
    }
    let dims = [dim_u32("im2col", "b", b)?, dim_u32("im2col", "ch", ch)?, dim_u32("im2col", "h", h)?, dim_u32("im2col", "w", w)?, dim_u32("im2col", "p", p)?];
    let f = gpu.func("snella_im2col");
    let mut l = gpu.stream.launch_builder(&f);
    l.arg(images).arg(cols);
    for v in &dims {
        l.arg(v);
    }
    // SAFETY: images holds b·ch·h·w floats and cols b·np·ch·p² (checked); grid-stride over the
    // output, every source index lies inside the image.
    unsafe { l.launch(grid_stride(total)) }.map(|_| ()).map_err(|e| cuda_err("snella_im2col", e))
}
