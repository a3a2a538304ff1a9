//! Patch embedding as im2col + GEMM (timm `PatchEmbed`: a conv with kernel = stride = patch).

use crate::Real;
use rayon::prelude::*;

/// Unfolds `images: [b, ch, h, w]` (NCHW) into `cols: [b·np, ch·p·p]`, `np = (h/p)·(w/p)`, patches
/// in row-major order, each patch flattened as `(channel, ky, kx)` to match a conv weight
/// `[d, ch, p, p]` viewed as `[d, ch·p·p]`.
///
/// `cols[bi·np + py·(w/p) + px, c·p² + ky·p + kx] = images[bi, c, py·p + ky, px·p + kx]`.
/// Trailing pixels when `h` or `w` is not a multiple of `p` are dropped, as the strided conv does.
/// Parallel over images.
///
/// # Panics
/// If `p == 0` or a slice is shorter than its shape needs.
pub fn im2col<T: Real>(images: &[T], b: usize, ch: usize, h: usize, w: usize, p: usize, cols: &mut [T]) {
    assert!(p > 0, "im2col: patch size must be positive");
    let (gh, gw) = (h / p, w / p);
    let np = gh * gw;
    let k = ch * p * p;
    assert!(images.len() >= b * ch * h * w, "im2col: images has {} elements, needs {}", images.len(), b * ch * h * w);
    assert!(cols.len() >= b * np * k, "im2col: cols has {} elements, needs {}", cols.len(), b * np * k);
    if b == 0 || np == 0 || k == 0 {
        return;
    }
    cols[..b * np * k].par_chunks_mut(np * k).enumerate().for_each(|(bi, dst)| {
        let img = &images[bi * ch * h * w..(bi + 1) * ch * h * w];
        for (pi, row) in dst.chunks_exact_mut(k).enumerate() {
            let (py, px) = (pi / gw, pi % gw);
            for c in 0..ch {
                for ky in 0..p {
                    let src = c * h * w + (py * p + ky) * w + px * p;
                    let o = c * p * p + ky * p;
                    row[o..o + p].copy_from_slice(&img[src..src + p]);
                }
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn im2col_tiny_image_mapping() {
        // b=1, ch=2, h=w=4, p=2: images[c, y, x] = 100·c + 10·y + x.
        let (b, ch, h, w, p) = (1, 2, 4, 4, 2);
        let img: Vec<f64> = (0..ch * h * w).map(|i| (100 * (i / 16) + 10 * ((i / 4) % 4) + i % 4) as f64).collect();
        let mut cols = vec![f64::NAN; 4 * 8];
        im2col(&img, b, ch, h, w, p, &mut cols);
        #[rustfmt::skip]
        let want = [
            0.0, 1.0, 10.0, 11.0, 100.0, 101.0, 110.0, 111.0,   // patch (0,0)
            2.0, 3.0, 12.0, 13.0, 102.0, 103.0, 112.0, 113.0,   // patch (0,1)
            20.0, 21.0, 30.0, 31.0, 120.0, 121.0, 130.0, 131.0, // patch (1,0)
            22.0, 23.0, 32.0, 33.0, 122.0, 123.0, 132.0, 133.0, // patch (1,1)
        ];
        assert_eq!(cols, want);
    }

    #[test]
    fn im2col_batch_and_general_index() {
        let (b, ch, h, w, p) = (2, 3, 6, 9, 3);
        let img: Vec<f32> = (0..b * ch * h * w).map(|i| i as f32).collect();
        let (gh, gw) = (h / p, w / p);
        let k = ch * p * p;
        let mut cols = vec![0f32; b * gh * gw * k];
        im2col(&img, b, ch, h, w, p, &mut cols);
        for bi in 0..b {
            for py in 0..gh {
                for px in 0..gw {
                    for c in 0..ch {
                        for ky in 0..p {
                            for kx in 0..p {
                                let got = cols[(bi * gh * gw + py * gw + px) * k + c * p * p + ky * p + kx];
                                let want = img[((bi * ch + c) * h + py * p + ky) * w + px * p + kx];
                                assert_eq!(got, want);
                            }
                        }
                    }
                }
            }
        }
    }
}
