//! LayerNorm over the last dimension (timm `nn.LayerNorm(eps=1e-6)`), forward and backward.

use crate::Real;
use rayon::prelude::*;

/// Rows per partial sum of `dgamma`/`dbeta` in [`layernorm_bwd`]; the partial sums are added in
/// chunk order, so the result does not depend on the number of threads.
const ROW_CHUNK: usize = 64;

/// `y = (x − mean)·rstd·gamma + beta` per row of `x: [rows, d]`; writes `mean, rstd: [rows]`
/// (`rstd = 1/sqrt(var + eps)`, biased variance) for the backward.
///
/// `gamma, beta: [d]`; `y: [rows, d]`. Mean and variance are computed in two passes in `T`.
/// Parallel over rows.
///
/// # Panics
/// If a slice is shorter than its shape needs.
#[allow(clippy::too_many_arguments)]
pub fn layernorm_fwd<T: Real>(
    x: &[T], gamma: &[T], beta: &[T], rows: usize, d: usize, eps: T,
    y: &mut [T], mean: &mut [T], rstd: &mut [T],
) {
    let mut xhat = vec![T::zero(); rows * d];
    fwd_impl("layernorm_fwd", x, gamma, beta, rows, d, eps, y, &mut xhat, mean, rstd);
}

/// [`layernorm_fwd`] keeping the normalised input `xhat = x̂ = (x − mean)·rstd: [rows, d]` for the
/// backward ([`layernorm_bwd_xhat`]) instead of `x` and `mean`: selective recomputation keeps
/// `x̂` and `rstd` and rebuilds `y = x̂·gamma + beta` with [`layernorm_affine`] when the backward
/// needs it. Writes `y`, `xhat` and `rstd: [rows]`; `y` as in [`layernorm_fwd`].
///
/// # Panics
/// If a slice is shorter than its shape needs.
#[allow(clippy::too_many_arguments)]
pub fn layernorm_fwd_xhat<T: Real>(
    x: &[T], gamma: &[T], beta: &[T], rows: usize, d: usize, eps: T,
    y: &mut [T], xhat: &mut [T], rstd: &mut [T],
) {
    let mut mean = vec![T::zero(); rows];
    fwd_impl("layernorm_fwd_xhat", x, gamma, beta, rows, d, eps, y, xhat, &mut mean, rstd);
}

/// The forward of [`layernorm_fwd`] and [`layernorm_fwd_xhat`] (each passes a scratch buffer for
/// what it does not return): `y = x̂·gamma + beta` with x̂ per row (two-pass mean and variance in
/// `T`), parallel over rows.
#[allow(clippy::too_many_arguments)]
fn fwd_impl<T: Real>(
    op: &str, x: &[T], gamma: &[T], beta: &[T], rows: usize, d: usize, eps: T,
    y: &mut [T], xhat: &mut [T], mean: &mut [T], rstd: &mut [T],
) {
    let n = rows * d;
    assert!(x.len() >= n && y.len() >= n && xhat.len() >= n, "{op}: x/y/xhat shorter than rows·d = {n}");
    assert!(gamma.len() >= d && beta.len() >= d, "{op}: gamma/beta shorter than d = {d}");
    assert!(mean.len() >= rows && rstd.len() >= rows, "{op}: mean/rstd shorter than rows = {rows}");
    if rows == 0 || d == 0 {
        return;
    }
    let (gamma, beta) = (&gamma[..d], &beta[..d]);
    let inv_d = T::one() / T::of(d as f64);
    y[..n]
        .par_chunks_mut(d)
        .zip(xhat[..n].par_chunks_mut(d))
        .zip(x[..n].par_chunks(d))
        .zip(mean[..rows].par_iter_mut().zip(rstd[..rows].par_iter_mut()))
        .with_min_len(8)
        .for_each(|(((yr, hr), xr), (mu_out, rs_out))| {
            let mut s = T::zero();
            for &v in xr {
                s += v;
            }
            let mu = s * inv_d;
            let mut ss = T::zero();
            for &v in xr {
                let c = v - mu;
                ss += c * c;
            }
            let rs = T::one() / (ss * inv_d + eps).sqrt();
            for ((((o, h), &v), &g), &bt) in yr.iter_mut().zip(hr.iter_mut()).zip(xr).zip(gamma).zip(beta) {
                *h = (v - mu) * rs;
                *o = *h * g + bt;
            }
            *mu_out = mu;
            *rs_out = rs;
        });
}

/// `y = x̂·gamma + beta` per row of a saved `xhat: [rows, d]` (from [`layernorm_fwd_xhat`]): the
/// LayerNorm output rebuilt where the backward needs it (the same values as the forward's `y`).
///
/// # Panics
/// If a slice is shorter than its shape needs.
pub fn layernorm_affine<T: Real>(xhat: &[T], gamma: &[T], beta: &[T], rows: usize, d: usize, y: &mut [T]) {
    let n = rows * d;
    assert!(xhat.len() >= n && y.len() >= n, "layernorm_affine: xhat/y shorter than rows·d = {n}");
    assert!(gamma.len() >= d && beta.len() >= d, "layernorm_affine: gamma/beta shorter than d = {d}");
    if rows == 0 || d == 0 {
        return;
    }
    let (gamma, beta) = (&gamma[..d], &beta[..d]);
    y[..n].par_chunks_mut(d).zip(xhat[..n].par_chunks(d)).with_min_len(8).for_each(|(yr, hr)| {
        for (((o, &h), &g), &bt) in yr.iter_mut().zip(hr).zip(gamma).zip(beta) {
            *o = h * g + bt;
        }
    });
}

/// Backward of [`layernorm_fwd`]: writes `dx: [rows, d]`; when given, accumulates (`+=`)
/// `dgamma, dbeta: [d]`.
///
/// With `x̂ = (x − mean)·rstd` and `g = dy·gamma`:
/// `dx = rstd·(g − mean(g) − x̂·mean(g·x̂))`, `dgamma += Σ_rows dy·x̂`, `dbeta += Σ_rows dy`.
/// `dx` is parallel over rows; the parameter gradients are summed in a fixed order
/// (deterministic).
///
/// # Panics
/// If a slice is shorter than its shape needs.
#[allow(clippy::too_many_arguments)]
pub fn layernorm_bwd<T: Real>(
    dy: &[T], x: &[T], gamma: &[T], mean: &[T], rstd: &[T], rows: usize, d: usize,
    dx: &mut [T], dgamma: Option<&mut [T]>, dbeta: Option<&mut [T]>,
) {
    let n = rows * d;
    assert!(x.len() >= n, "layernorm_bwd: x shorter than rows·d = {n}");
    assert!(mean.len() >= rows && rstd.len() >= rows, "layernorm_bwd: mean/rstd shorter than rows = {rows}");
    if rows == 0 || d == 0 {
        return;
    }
    let mut xhat = vec![T::zero(); n];
    xhat.par_chunks_mut(d).zip(x[..n].par_chunks(d)).zip(mean[..rows].par_iter().zip(rstd[..rows].par_iter())).with_min_len(8).for_each(|((hr, xr), (&mu, &rs))| {
        for (h, &v) in hr.iter_mut().zip(xr) {
            *h = (v - mu) * rs;
        }
    });
    layernorm_bwd_xhat(dy, &xhat, gamma, rstd, rows, d, dx, dgamma, dbeta);
}

/// Backward of [`layernorm_fwd_xhat`] from the saved `xhat: [rows, d]` and `rstd: [rows]`: as
/// [`layernorm_bwd`] (same formulas) without recomputing `x̂` from `x`.
///
/// # Panics
/// If a slice is shorter than its shape needs.
#[allow(clippy::too_many_arguments)]
pub fn layernorm_bwd_xhat<T: Real>(
    dy: &[T], xhat: &[T], gamma: &[T], rstd: &[T], rows: usize, d: usize,
    dx: &mut [T], dgamma: Option<&mut [T]>, dbeta: Option<&mut [T]>,
) {
    let n = rows * d;
    assert!(dy.len() >= n && xhat.len() >= n && dx.len() >= n, "layernorm_bwd_xhat: dy/xhat/dx shorter than rows·d = {n}");
    assert!(gamma.len() >= d, "layernorm_bwd_xhat: gamma shorter than d = {d}");
    assert!(rstd.len() >= rows, "layernorm_bwd_xhat: rstd shorter than rows = {rows}");
    if rows == 0 || d == 0 {
        return;
    }
    let gamma = &gamma[..d];
    let inv_d = T::one() / T::of(d as f64);
    dx[..n]
        .par_chunks_mut(d)
        .zip(dy[..n].par_chunks(d).zip(xhat[..n].par_chunks(d)))
        .zip(rstd[..rows].par_iter())
        .with_min_len(8)
        .for_each(|((dxr, (dyr, hr)), &rs)| {
            let mut sg = T::zero();
            let mut sgx = T::zero();
            for ((&gy, &h), &g) in dyr.iter().zip(hr).zip(gamma) {
                let gg = gy * g;
                sg += gg;
                sgx += gg * h;
            }
            let mg = sg * inv_d;
            let mgx = sgx * inv_d;
            for (((o, &gy), &h), &g) in dxr.iter_mut().zip(dyr).zip(hr).zip(gamma) {
                *o = rs * (gy * g - mg - h * mgx);
            }
        });

    if dgamma.is_none() && dbeta.is_none() {
        return;
    }
    // Per chunk of rows: sequential sums of dy·x̂ and dy, then the chunks in order.
    let chunk_rows = ROW_CHUNK;
    let nchunks = rows.div_ceil(chunk_rows);
    let partials: Vec<(Vec<T>, Vec<T>)> = (0..nchunks)
        .into_par_iter()
        .map(|ci| {
            let mut pg = vec![T::zero(); d];
            let mut pb = vec![T::zero(); d];
            for r in ci * chunk_rows..((ci + 1) * chunk_rows).min(rows) {
                let dyr = &dy[r * d..(r + 1) * d];
                let hr = &xhat[r * d..(r + 1) * d];
                for (((a, b), &gy), &h) in pg.iter_mut().zip(pb.iter_mut()).zip(dyr).zip(hr) {
                    *a += gy * h;
                    *b += gy;
                }
            }
            (pg, pb)
        })
        .collect();
    let mut tg = vec![T::zero(); d];
    let mut tb = vec![T::zero(); d];
    for (pg, pb) in &partials {
        for (a, &v) in tg.iter_mut().zip(pg) {
            *a += v;
        }
        for (a, &v) in tb.iter_mut().zip(pb) {
            *a += v;
        }
    }
    if let Some(dg) = dgamma {
        assert!(dg.len() >= d, "layernorm_bwd_xhat: dgamma shorter than d = {d}");
        for (o, v) in dg.iter_mut().zip(tg) {
            *o += v;
        }
    }
    if let Some(db) = dbeta {
        assert!(db.len() >= d, "layernorm_bwd_xhat: dbeta shorter than d = {d}");
        for (o, v) in db.iter_mut().zip(tb) {
            *o += v;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gradcheck::{assert_close, numeric_grad, rand_vec};

    fn fwd(x: &[f64], gamma: &[f64], beta: &[f64], rows: usize, d: usize) -> Vec<f64> {
        let mut y = vec![0.0; rows * d];
        let (mut m, mut r) = (vec![0.0; rows], vec![0.0; rows]);
        layernorm_fwd(x, gamma, beta, rows, d, 1e-6, &mut y, &mut m, &mut r);
        y
    }

    #[test]
    fn layernorm_forward_known_row() {
        // Row [1, 2, 3, 4]: mean 2.5, biased var 1.25.
        let x = [1.0f64, 2.0, 3.0, 4.0];
        let gamma = [1.0, 2.0, 1.0, 1.0];
        let beta = [0.0, 0.0, 0.5, 0.0];
        let mut y = [0.0; 4];
        let (mut m, mut r) = ([0.0], [0.0]);
        layernorm_fwd(&x, &gamma, &beta, 1, 4, 1e-6, &mut y, &mut m, &mut r);
        let rs = 1.0 / (1.25f64 + 1e-6).sqrt();
        assert_eq!(m[0], 2.5);
        assert!((r[0] - rs).abs() < 1e-14);
        let want = [-1.5 * rs, 2.0 * -0.5 * rs, 0.5 * rs + 0.5, 1.5 * rs];
        for (a, b) in y.iter().zip(want) {
            assert!((a - b).abs() < 1e-14, "{a} vs {b}");
        }
        // ≈ [-1.3416, -0.8944, 0.9472, 1.3416]
        assert!((y[0] + 1.341_640_2).abs() < 1e-5);
    }

    #[test]
    fn layernorm_backward_matches_finite_differences() {
        let (rows, d) = (3, 7);
        let x = rand_vec(rows * d, 21, 2.0);
        let gamma = rand_vec(d, 22, 1.5);
        let beta = rand_vec(d, 23, 1.0);
        let w = rand_vec(rows * d, 24, 1.0);
        let loss = |y: Vec<f64>| -> f64 { y.iter().zip(&w).map(|(a, b)| a * b).sum() };

        let num_x = numeric_grad(&x, 1e-5, |x| loss(fwd(x, &gamma, &beta, rows, d)));
        let num_g = numeric_grad(&gamma, 1e-5, |g| loss(fwd(&x, g, &beta, rows, d)));
        let num_b = numeric_grad(&beta, 1e-5, |b| loss(fwd(&x, &gamma, b, rows, d)));

        let mut y = vec![0.0; rows * d];
        let (mut m, mut r) = (vec![0.0; rows], vec![0.0; rows]);
        layernorm_fwd(&x, &gamma, &beta, rows, d, 1e-6, &mut y, &mut m, &mut r);
        let mut dx = vec![0.0; rows * d];
        // Start from non-zero to check accumulation.
        let mut dg = vec![1.0; d];
        let mut db = vec![-1.0; d];
        layernorm_bwd(&w, &x, &gamma, &m, &r, rows, d, &mut dx, Some(&mut dg), Some(&mut db));
        let dg: Vec<f64> = dg.iter().map(|v| v - 1.0).collect();
        let db: Vec<f64> = db.iter().map(|v| v + 1.0).collect();
        assert_close("layernorm dx", &dx, &num_x, 1e-6);
        assert_close("layernorm dgamma", &dg, &num_g, 1e-6);
        assert_close("layernorm dbeta", &db, &num_b, 1e-6);

        // Without parameter gradients, dx is the same.
        let mut dx2 = vec![0.0; rows * d];
        layernorm_bwd(&w, &x, &gamma, &m, &r, rows, d, &mut dx2, None, None);
        assert_eq!(dx, dx2);
    }

    #[test]
    fn layernorm_param_grads_many_rows_match_sequential() {
        let (rows, d) = (150, 5);
        let x = rand_vec(rows * d, 31, 2.0);
        let gamma = rand_vec(d, 32, 1.0);
        let beta = vec![0.0; d];
        let dy = rand_vec(rows * d, 33, 1.0);
        let mut y = vec![0.0; rows * d];
        let (mut m, mut r) = (vec![0.0; rows], vec![0.0; rows]);
        layernorm_fwd(&x, &gamma, &beta, rows, d, 1e-6, &mut y, &mut m, &mut r);
        let mut dx = vec![0.0; rows * d];
        let (mut dg, mut db) = (vec![0.0; d], vec![0.0; d]);
        layernorm_bwd(&dy, &x, &gamma, &m, &r, rows, d, &mut dx, Some(&mut dg), Some(&mut db));
        for c in 0..d {
            let sg: f64 = (0..rows).map(|i| dy[i * d + c] * (x[i * d + c] - m[i]) * r[i]).sum();
            let sb: f64 = (0..rows).map(|i| dy[i * d + c]).sum();
            assert!((dg[c] - sg).abs() < 1e-12 && (db[c] - sb).abs() < 1e-12);
        }
    }

    #[test]
    fn xhat_forms_keep_the_normalised_input_and_rebuild_y() {
        // The selective-recompute forms. `layernorm_fwd` and `layernorm_fwd_xhat` share one
        // implementation (as do the two backwards), so what is checked here is what they add: the
        // kept x̂ against an independent evaluation of (x − mean)·rstd from the x form's statistics,
        // rstd unchanged, and the affine rebuild equal to the forward's y. The backward formulas are
        // checked against finite differences above (`layernorm_bwd` runs `layernorm_bwd_xhat`).
        let (rows, d) = (70, 9);
        let x = rand_vec(rows * d, 31, 3.0);
        let gamma = rand_vec(d, 32, 1.5);
        let beta = rand_vec(d, 33, 1.0);
        let (mut y, mut m, mut r) = (vec![0.0; rows * d], vec![0.0; rows], vec![0.0; rows]);
        layernorm_fwd(&x, &gamma, &beta, rows, d, 1e-6, &mut y, &mut m, &mut r);
        let (mut y2, mut h, mut r2) = (vec![0.0; rows * d], vec![0.0; rows * d], vec![0.0; rows]);
        layernorm_fwd_xhat(&x, &gamma, &beta, rows, d, 1e-6, &mut y2, &mut h, &mut r2);
        assert_eq!(r, r2);
        for i in 0..rows * d {
            let want = (x[i] - m[i / d]) * r[i / d];
            assert!((h[i] - want).abs() <= 1e-14 * want.abs().max(1.0), "x̂[{i}] = {} vs {want}", h[i]);
        }
        let mut y3 = vec![0.0; rows * d];
        layernorm_affine(&h, &gamma, &beta, rows, d, &mut y3);
        assert_eq!(y2, y3, "the rebuilt y differs from the forward's");
    }
}
