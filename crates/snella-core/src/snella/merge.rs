//! Kernelized merge (spec §1) and its analytic backward (spec §3).
//!
//! `A: [H, in, rh]`, `B: [H, out, rh]` (`rh = r/H`), `D_h[i,j] = ‖A[h,i,:] − B[h,j,:]‖₂`,
//! `K = Σ_h c_h·D_h` with `c_h = 0.1·(−1)^h`, and for SNELLA the mixture
//! `M[i,j] = K[i,j] + α·softmax_j(K[i,·]/γ)[j] + β` with `γ` clamped to `≥ GAMMA_MIN`.
//! `M: [in, out]` row-major. The backward recomputes `D`, `K` and the softmax; nothing is saved.
//!
//! Both passes work row by row (input feature `i`), in parallel over rows. `B` is first transposed
//! to `[H, rh, out]` so every inner loop runs over the output features `j` and vectorises. The
//! backward's cross-row sums (`∂L/∂B`, the mixture scalars) are formed per fixed row chunk
//! (`BWD_CHUNKS` = 8 chunks, independent of the thread count) and added in chunk order, so results
//! are bit-identical on every run and for every thread count. On x86-64 CPUs with AVX2 the row
//! loops run in an AVX2 build of the same code (chosen at run time); its per-element arithmetic
//! and reduction order are those of the baseline build, so it returns the same bits.

use crate::Real;
use rayon::prelude::*;

/// Lower clamp of the mixture temperature `γ` in the forward pass (spec §1, Decision).
pub const GAMMA_MIN: f64 = 1e-4;

/// Number of fixed row chunks whose partial `∂L/∂B` sums the backward adds in order (spec §3;
/// fixed so the reduction order, hence every bit of the result, never depends on the threads).
const BWD_CHUNKS: usize = 8;

/// The mixture scalars of a SNELLA adapter (spec §1), or their gradients (spec §3).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Mixture<T> {
    /// Softmax weight α (init 1).
    pub alpha: T,
    /// Softmax temperature γ (init 1, clamped to `≥ GAMMA_MIN` in the forward).
    pub gamma: T,
    /// Constant offset β (init 0).
    pub beta: T,
}

/// The fixed kernel coefficients `c_h = 0.1·(−1)^h`, `h = 0..heads` (spec §1, Decision).
pub fn coeffs(heads: usize) -> Vec<f64> {
    (0..heads).map(|h| if h % 2 == 0 { 0.1 } else { -0.1 }).collect()
}

/// `B: [H, out, rh]` transposed to `[H, rh, out]`.
fn transpose_b<T: Real>(b: &[T], heads: usize, n_out: usize, rh: usize) -> Vec<T> {
    let mut bt = vec![T::zero(); heads * rh * n_out];
    for h in 0..heads {
        for j in 0..n_out {
            for r in 0..rh {
                bt[(h * rh + r) * n_out + j] = b[(h * n_out + j) * rh + r];
            }
        }
    }
    bt
}

/// The clamped temperature `max(γ, GAMMA_MIN)` (NaN propagates) and whether the clamp is active.
fn clamp_gamma<T: Real>(gamma: T) -> (T, bool) {
    let gmin = T::of(GAMMA_MIN);
    if gamma < gmin {
        (gmin, true)
    } else {
        (gamma, false)
    }
}

/// Row `i` of the distances and the kernel: `d[h·out + j] = D_h[i,j]`, `k[j] = K[i,j]`.
/// Every `D_h[i,j]` is summed over `r = 0..rh` in order; the loops run over `j` and vectorise.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn row_kernel<T: Real>(
    a: &[T], bt: &[T], c: &[T], i: usize, n_in: usize, n_out: usize, rh: usize, d: &mut [T], k: &mut [T],
) {
    k.fill(T::zero());
    for (h, (dh, &ch)) in d.chunks_exact_mut(n_out).zip(c).enumerate() {
        dh.fill(T::zero());
        let arow = &a[(h * n_in + i) * rh..(h * n_in + i + 1) * rh];
        for (&av, brow) in arow.iter().zip(bt[h * rh * n_out..(h + 1) * rh * n_out].chunks_exact(n_out)) {
            for (x, &bv) in dh.iter_mut().zip(brow) {
                let t = av - bv;
                *x += t * t;
            }
        }
        for (x, kv) in dh.iter_mut().zip(k.iter_mut()) {
            *x = x.sqrt();
            *kv += ch * *x;
        }
    }
}

/// `p = softmax(k / g)` over one row.
#[inline(always)]
fn row_softmax<T: Real, const AVX: bool>(k: &[T], g: T, p: &mut [T]) {
    let zmax = k.iter().fold(T::neg_infinity(), |m, &x| m.max(x / g));
    for (pv, &kv) in p.iter_mut().zip(k) {
        *pv = (kv / g - zmax).exp();
    }
    let s = sum::<T, AVX>(p);
    for pv in p.iter_mut() {
        *pv = *pv / s;
    }
}

/// Lanes of the fixed-order sums below: 32 independent accumulators (four AVX2 registers).
const LANES: usize = 32;

/// Adds the lanes pairwise (`l` with `l + 16`, then `l + 8`, …): the one fixed combine order of
/// every lane sum here, scalar or SIMD.
#[inline(always)]
fn combine<T: Real>(mut acc: [T; LANES]) -> T {
    let mut w = LANES / 2;
    while w > 0 {
        for l in 0..w {
            let v = acc[l + w];
            acc[l] += v;
        }
        w /= 2;
    }
    acc[0]
}

/// Whether `T` is `f32` (the SIMD paths are written for f32).
#[inline(always)]
fn is_f32<T: Real>() -> bool {
    std::any::TypeId::of::<T>() == std::any::TypeId::of::<f32>()
}

/// Reinterprets `&[T]` as `&[f32]`.
///
/// # Safety
/// `T` must be `f32` ([`is_f32`]).
#[inline(always)]
unsafe fn as_f32<T>(x: &[T]) -> &[f32] {
    std::slice::from_raw_parts(x.as_ptr().cast::<f32>(), x.len())
}

/// `Σ x·y` in a fixed order: lane `l` sums the products at indices `≡ l (mod 32)` of the
/// 32-aligned head, the lanes are combined by [`combine`], then the tail is added in order.
/// With `AVX` (the caller guarantees AVX2) f32 runs on four AVX2 registers with the same
/// per-lane arithmetic, hence the same bits.
#[inline(always)]
fn dot<T: Real, const AVX: bool>(x: &[T], y: &[T]) -> T {
    #[cfg(target_arch = "x86_64")]
    if AVX && is_f32::<T>() {
        // SAFETY: T is f32 (checked), and AVX is only set on the AVX2 code path.
        return unsafe { T::of(avx2::dot_f32(as_f32(x), as_f32(y)) as f64) };
    }
    let n = x.len().min(y.len());
    let head = n - n % LANES;
    let mut acc = [T::zero(); LANES];
    for (xa, ya) in x[..head].chunks_exact(LANES).zip(y[..head].chunks_exact(LANES)) {
        for l in 0..LANES {
            acc[l] += xa[l] * ya[l];
        }
    }
    let mut s = combine(acc);
    for (&a, &b) in x[head..n].iter().zip(&y[head..n]) {
        s += a * b;
    }
    s
}

/// `Σ x` in the fixed order of [`dot`].
#[inline(always)]
fn sum<T: Real, const AVX: bool>(x: &[T]) -> T {
    #[cfg(target_arch = "x86_64")]
    if AVX && is_f32::<T>() {
        // SAFETY: T is f32 (checked), and AVX is only set on the AVX2 code path.
        return unsafe { T::of(avx2::sum_f32(as_f32(x)) as f64) };
    }
    let head = x.len() - x.len() % LANES;
    let mut acc = [T::zero(); LANES];
    for xa in x[..head].chunks_exact(LANES) {
        for l in 0..LANES {
            acc[l] += xa[l];
        }
    }
    let mut s = combine(acc);
    for &a in &x[head..] {
        s += a;
    }
    s
}

#[allow(clippy::too_many_arguments)]
fn check_shapes<T>(a: &[T], b: &[T], heads: usize, n_in: usize, n_out: usize, rh: usize, m: &[T], what: &str) {
    assert_eq!(a.len(), heads * n_in * rh, "{what}: A has {} elements, expected [H={heads}, in={n_in}, rh={rh}]", a.len());
    assert_eq!(b.len(), heads * n_out * rh, "{what}: B has {} elements, expected [H={heads}, out={n_out}, rh={rh}]", b.len());
    assert_eq!(m.len(), n_in * n_out, "{what}: M has {} elements, expected [in={n_in}, out={n_out}]", m.len());
}

/// The read-only inputs shared by every row of one merge call.
struct Ctx<'a, T> {
    a: &'a [T],
    /// `B` transposed to `[H, rh, out]`.
    bt: &'a [T],
    /// `c_h` as `T`.
    c: &'a [T],
    n_in: usize,
    n_out: usize,
    rh: usize,
    mixture: Option<Mixture<T>>,
    /// `max(γ, GAMMA_MIN)` (1 without mixture).
    g: T,
}

/// Forward of row `i` into `mrow` (scratch `d: [H·out]`, `p: [out]`).
#[inline(always)]
fn fwd_row<T: Real, const AVX: bool>(cx: &Ctx<T>, i: usize, d: &mut [T], p: &mut [T], mrow: &mut [T]) {
    row_kernel(cx.a, cx.bt, cx.c, i, cx.n_in, cx.n_out, cx.rh, d, mrow);
    if let Some(mx) = cx.mixture {
        row_softmax::<T, AVX>(mrow, cx.g, p);
        for (mv, &pv) in mrow.iter_mut().zip(p.iter()) {
            *mv = *mv + mx.alpha * pv + mx.beta;
        }
    }
}

/// One row chunk's share of the backward.
struct ChunkGrad<T> {
    /// `∂L/∂A` of the chunk's rows, `[H, rows, rh]`.
    da: Vec<T>,
    /// Partial `Σ_i E_h[i,j]·A[h,i,r]` as `[H, rh + 1, out]`; row `rh` holds `Σ_i E_h[i,j]`.
    dbt: Vec<T>,
    /// Partial `Σ Ĝ⊙P`, `Σ Ĝ`, `Σ P⊙K⊙(Ĝ − rowsum(Ĝ⊙P))`.
    sums: [f64; 3],
}

/// Backward over rows `r0..r1` (spec §3): recomputes `D`, `K`, `P` row by row, forms
/// `∂L/∂K` and `E_h`, writes the rows of `∂L/∂A` and accumulates this chunk's `∂L/∂B` partials.
#[inline(always)]
fn bwd_chunk<T: Real, const AVX: bool>(cx: &Ctx<T>, dm: &[T], r0: usize, r1: usize) -> ChunkGrad<T> {
    let (n_in, n_out, rh, g) = (cx.n_in, cx.n_out, cx.rh, cx.g);
    let heads = cx.c.len();
    let rows = r1 - r0;
    let mut out =
        ChunkGrad { da: vec![T::zero(); heads * rows * rh], dbt: vec![T::zero(); heads * (rh + 1) * n_out], sums: [0.0; 3] };
    let mut d = vec![T::zero(); heads * n_out];
    let mut k = vec![T::zero(); n_out];
    let mut p = vec![T::zero(); n_out];
    let mut dk = vec![T::zero(); n_out];
    let mut e = vec![T::zero(); n_out];
    for i in r0..r1 {
        row_kernel(cx.a, cx.bt, cx.c, i, n_in, n_out, rh, &mut d, &mut k);
        let grow = &dm[i * n_out..(i + 1) * n_out];
        let dkrow: &[T] = if let Some(mx) = cx.mixture {
            row_softmax::<T, AVX>(&k, g, &mut p);
            let s = dot::<T, AVX>(grow, &p);
            out.sums[0] += s.f64();
            out.sums[1] += sum::<T, AVX>(grow).f64();
            // p ← P ⊙ (Ĝ − rowsum(Ĝ⊙P)); ∂L/∂K = Ĝ + (α/γ)·p.
            let ag = mx.alpha / g;
            for ((pv, &gv), dkv) in p.iter_mut().zip(grow).zip(dk.iter_mut()) {
                *pv *= gv - s;
                *dkv = gv + ag * *pv;
            }
            out.sums[2] += dot::<T, AVX>(&p, &k).f64();
            &dk
        } else {
            grow
        };
        for (h, (dh, &ch)) in d.chunks_exact(n_out).zip(cx.c).enumerate() {
            // E_h = c_h·∂L/∂K ⊘ D_h, 0 where D_h = 0.
            for ((ev, &dv), &gk) in e.iter_mut().zip(dh).zip(dkrow) {
                *ev = if dv == T::zero() { T::zero() } else { ch * gk / dv };
            }
            let rowsum = sum::<T, AVX>(&e);
            let arow = &cx.a[(h * n_in + i) * rh..(h * n_in + i + 1) * rh];
            let darow = &mut out.da[(h * rows + i - r0) * rh..(h * rows + i - r0 + 1) * rh];
            let btb = &cx.bt[h * rh * n_out..(h + 1) * rh * n_out];
            for ((dav, &av), brow) in darow.iter_mut().zip(arow).zip(btb.chunks_exact(n_out)) {
                *dav = av * rowsum - dot::<T, AVX>(&e, brow);
            }
            let part = &mut out.dbt[h * (rh + 1) * n_out..(h + 1) * (rh + 1) * n_out];
            let (acc_ea, acc_e) = part.split_at_mut(rh * n_out);
            for (&av, accrow) in arow.iter().zip(acc_ea.chunks_exact_mut(n_out)) {
                for (x, &ev) in accrow.iter_mut().zip(&e) {
                    *x += ev * av;
                }
            }
            for (x, &ev) in acc_e.iter_mut().zip(&e) {
                *x += ev;
            }
        }
    }
    out
}

/// The row loops compiled for AVX2, chosen at run time. Rust never contracts `a·b + c` into an FMA
/// and every reduction here has one explicit order (the lane layout of [`dot`]), so these return
/// bit-identical results to the baseline build; only the vector width differs.
#[cfg(target_arch = "x86_64")]
mod avx2 {
    use super::{bwd_chunk, combine, fwd_row, ChunkGrad, Ctx, LANES};
    use crate::Real;
    use std::arch::x86_64::*;

    /// Whether the running CPU supports AVX2 (cached by the standard library).
    #[inline]
    pub(super) fn available() -> bool {
        std::is_x86_feature_detected!("avx2")
    }

    /// [`fwd_row`] compiled with AVX2.
    ///
    /// # Safety
    /// The CPU must support AVX2 ([`available`]).
    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn fwd_row_avx2<T: Real>(cx: &Ctx<T>, i: usize, d: &mut [T], p: &mut [T], mrow: &mut [T]) {
        fwd_row::<T, true>(cx, i, d, p, mrow)
    }

    /// [`bwd_chunk`] compiled with AVX2.
    ///
    /// # Safety
    /// The CPU must support AVX2 ([`available`]).
    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn bwd_chunk_avx2<T: Real>(cx: &Ctx<T>, dm: &[T], r0: usize, r1: usize) -> ChunkGrad<T> {
        bwd_chunk::<T, true>(cx, dm, r0, r1)
    }

    /// Four 8-lane registers as the 32 lanes of [`super::dot`] (register `q` holds lanes `8q..8q+8`).
    #[inline]
    #[target_feature(enable = "avx2")]
    unsafe fn lanes(v: [__m256; 4]) -> [f32; LANES] {
        let mut out = [0f32; LANES];
        for (q, r) in v.iter().enumerate() {
            _mm256_storeu_ps(out.as_mut_ptr().add(8 * q), *r);
        }
        out
    }

    /// [`super::dot`] for f32.
    ///
    /// # Safety
    /// The CPU must support AVX2.
    #[inline]
    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn dot_f32(x: &[f32], y: &[f32]) -> f32 {
        let n = x.len().min(y.len());
        let head = n - n % LANES;
        let mut acc = [_mm256_setzero_ps(); 4];
        let (px, py) = (x.as_ptr(), y.as_ptr());
        let mut i = 0;
        while i < head {
            for (q, a) in acc.iter_mut().enumerate() {
                // SAFETY: i + 8q + 8 ≤ head ≤ n, within both slices.
                let prod = _mm256_mul_ps(_mm256_loadu_ps(px.add(i + 8 * q)), _mm256_loadu_ps(py.add(i + 8 * q)));
                *a = _mm256_add_ps(*a, prod);
            }
            i += LANES;
        }
        let mut s = combine(lanes(acc));
        for (&a, &b) in x[head..n].iter().zip(&y[head..n]) {
            s += a * b;
        }
        s
    }

    /// [`super::sum`] for f32.
    ///
    /// # Safety
    /// The CPU must support AVX2.
    #[inline]
    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn sum_f32(x: &[f32]) -> f32 {
        let head = x.len() - x.len() % LANES;
        let mut acc = [_mm256_setzero_ps(); 4];
        let px = x.as_ptr();
        let mut i = 0;
        while i < head {
            for (q, a) in acc.iter_mut().enumerate() {
                // SAFETY: i + 8q + 8 ≤ head ≤ x.len().
                *a = _mm256_add_ps(*a, _mm256_loadu_ps(px.add(i + 8 * q)));
            }
            i += LANES;
        }
        let mut s = combine(lanes(acc));
        for &a in &x[head..] {
            s += a;
        }
        s
    }
}

/// [`fwd_row`], with AVX2 when available.
fn fwd_row_dispatch<T: Real>(cx: &Ctx<T>, i: usize, d: &mut [T], p: &mut [T], mrow: &mut [T]) {
    #[cfg(target_arch = "x86_64")]
    if avx2::available() {
        // SAFETY: AVX2 support was just checked.
        return unsafe { avx2::fwd_row_avx2(cx, i, d, p, mrow) };
    }
    fwd_row::<T, false>(cx, i, d, p, mrow)
}

/// [`bwd_chunk`], with AVX2 when available.
fn bwd_chunk_dispatch<T: Real>(cx: &Ctx<T>, dm: &[T], r0: usize, r1: usize) -> ChunkGrad<T> {
    #[cfg(target_arch = "x86_64")]
    if avx2::available() {
        // SAFETY: AVX2 support was just checked.
        return unsafe { avx2::bwd_chunk_avx2(cx, dm, r0, r1) };
    }
    bwd_chunk::<T, false>(cx, dm, r0, r1)
}

/// Forward (spec §1): writes `m: [n_in, n_out]`, `M = K + α·softmax_j(K/max(γ, GAMMA_MIN)) + β`.
/// `mixture = None` is the SNELL variant (`M = K`).
///
/// Parallel over rows; each row is computed independently, so the result is deterministic.
///
/// # Panics
/// If a slice length does not match the shapes.
#[allow(clippy::too_many_arguments)]
pub fn merge_fwd<T: Real>(
    a: &[T], b: &[T], heads: usize, n_in: usize, n_out: usize, rh: usize,
    mixture: Option<Mixture<T>>, m: &mut [T],
) {
    check_shapes(a, b, heads, n_in, n_out, rh, m, "merge_fwd");
    if n_in == 0 || n_out == 0 {
        return;
    }
    let bt = transpose_b(b, heads, n_out, rh);
    let c: Vec<T> = coeffs(heads).into_iter().map(T::of).collect();
    let g = mixture.map_or(T::one(), |mx| clamp_gamma(mx.gamma).0);
    let cx = Ctx { a, bt: &bt, c: &c, n_in, n_out, rh, mixture, g };
    m.par_chunks_mut(n_out).enumerate().with_min_len(4).for_each_init(
        || (vec![T::zero(); heads * n_out], vec![T::zero(); n_out]),
        |(d, p), (i, mrow)| fwd_row_dispatch(&cx, i, d, p, mrow),
    );
}

/// Backward (spec §3): from `dm = Ĝ = ∂L/∂M: [n_in, n_out]` writes `da: [H, n_in, rh]`,
/// `db: [H, n_out, rh]` (overwritten) and returns the mixture gradients `(∂L/∂α, ∂L/∂γ, ∂L/∂β)`
/// when `mixture` is given. `∂L/∂γ` is 0 while `γ < GAMMA_MIN` (the clamp is active).
///
/// `D`, `K` and `P` are recomputed row by row; with `E_h = c_h·∂L/∂K ⊘ D_h` (0 where `D_h = 0`),
/// `∂L/∂A[h,i] = A[h,i]·Σ_j E_h[i,j] − Σ_j E_h[i,j]·B[h,j]` and
/// `∂L/∂B[h,j] = B[h,j]·Σ_i E_h[i,j] − Σ_i E_h[i,j]·A[h,i]`. Deterministic (fixed reduction order).
///
/// # Panics
/// If a slice length does not match the shapes.
#[allow(clippy::too_many_arguments)]
pub fn merge_bwd<T: Real>(
    a: &[T], b: &[T], heads: usize, n_in: usize, n_out: usize, rh: usize,
    mixture: Option<Mixture<T>>, dm: &[T], da: &mut [T], db: &mut [T],
) -> Option<Mixture<T>> {
    check_shapes(a, b, heads, n_in, n_out, rh, dm, "merge_bwd");
    assert_eq!(da.len(), a.len(), "merge_bwd: dA has {} elements, A has {}", da.len(), a.len());
    assert_eq!(db.len(), b.len(), "merge_bwd: dB has {} elements, B has {}", db.len(), b.len());
    if n_in == 0 || n_out == 0 {
        da.fill(T::zero());
        db.fill(T::zero());
        return mixture.map(|_| Mixture { alpha: T::zero(), gamma: T::zero(), beta: T::zero() });
    }
    let bt = transpose_b(b, heads, n_out, rh);
    let c: Vec<T> = coeffs(heads).into_iter().map(T::of).collect();
    let (g, clamped) = mixture.map_or((T::one(), false), |mx| clamp_gamma(mx.gamma));
    let cx = Ctx { a, bt: &bt, c: &c, n_in, n_out, rh, mixture, g };
    let rows_per = n_in.div_ceil(BWD_CHUNKS);
    let nchunks = n_in.div_ceil(rows_per);
    let chunks: Vec<ChunkGrad<T>> = (0..nchunks)
        .into_par_iter()
        .map(|ci| bwd_chunk_dispatch(&cx, dm, ci * rows_per, ((ci + 1) * rows_per).min(n_in)))
        .collect();
    // ∂L/∂A: copy each chunk's rows into place.
    for (ci, ch) in chunks.iter().enumerate() {
        let (r0, r1) = (ci * rows_per, ((ci + 1) * rows_per).min(n_in));
        let rows = r1 - r0;
        for h in 0..heads {
            da[(h * n_in + r0) * rh..(h * n_in + r1) * rh].copy_from_slice(&ch.da[h * rows * rh..(h + 1) * rows * rh]);
        }
    }
    // ∂L/∂B[h,j,r] = B[h,j,r]·Σ_i E_h[i,j] − Σ_i E_h[i,j]·A[h,i,r], chunk partials added in order.
    if rh > 0 {
        db.par_chunks_mut(rh).enumerate().with_min_len(64).for_each(|(hj, dbrow)| {
            let (h, j) = (hj / n_out, hj % n_out);
            let base = h * (rh + 1) * n_out + j;
            let mut colsum = T::zero();
            for ch in &chunks {
                colsum += ch.dbt[base + rh * n_out];
            }
            for (r, dbv) in dbrow.iter_mut().enumerate() {
                let mut s = T::zero();
                for ch in &chunks {
                    s += ch.dbt[base + r * n_out];
                }
                *dbv = b[hj * rh + r] * colsum - s;
            }
        });
    }
    mixture.map(|mx| {
        let [sa, sb, sg] = chunks.iter().fold([0.0f64; 3], |acc, ch| {
            [acc[0] + ch.sums[0], acc[1] + ch.sums[1], acc[2] + ch.sums[2]]
        });
        let dgamma = if clamped { T::zero() } else { -(mx.alpha / (g * g)) * T::of(sg) };
        Mixture { alpha: T::of(sa), gamma: dgamma, beta: T::of(sb) }
    })
}

#[cfg(test)]
mod tests {
    use super::super::sparsify::{sparsify_bwd, sparsify_fwd, SparsifyRule};
    use super::super::topk::{kept_count, select_topk};
    use super::*;
    use crate::gradcheck::{assert_close, numeric_grad, rand_vec};

    const H: usize = 2;
    const NI: usize = 5;
    const NO: usize = 7;
    const RH: usize = 3;
    const NA: usize = H * NI * RH;
    const NB: usize = H * NO * RH;

    fn mix(x: &[f64]) -> Option<Mixture<f64>> {
        (x.len() == NA + NB + 3).then(|| Mixture { alpha: x[NA + NB], gamma: x[NA + NB + 1], beta: x[NA + NB + 2] })
    }

    fn fwd(x: &[f64]) -> Vec<f64> {
        let mut m = vec![0.0; NI * NO];
        merge_fwd(&x[..NA], &x[NA..NA + NB], H, NI, NO, RH, mix(x), &mut m);
        m
    }

    /// Analytic gradient of `Σ W ⊙ M` (dm = w) with respect to `x = [A, B, (α, γ, β)]`.
    fn analytic(x: &[f64], dm: &[f64]) -> Vec<f64> {
        let (mut da, mut db) = (vec![0.0; NA], vec![0.0; NB]);
        let gm = merge_bwd(&x[..NA], &x[NA..NA + NB], H, NI, NO, RH, mix(x), dm, &mut da, &mut db);
        let mut out = da;
        out.extend(db);
        if let Some(g) = gm {
            out.extend([g.alpha, g.gamma, g.beta]);
        }
        out
    }

    fn params(with_mix: bool, seed: u64) -> Vec<f64> {
        let mut x = rand_vec(NA, seed, 1.0);
        x.extend(rand_vec(NB, seed + 1, 1.0));
        if with_mix {
            x.extend([0.7, 0.35, 0.3]);
        }
        x
    }

    #[test]
    fn merge_bwd_matches_finite_differences() {
        for with_mix in [false, true] {
            let x = params(with_mix, 1);
            let w = rand_vec(NI * NO, 9, 1.0);
            let ana = analytic(&x, &w);
            let num = numeric_grad(&x, 1e-6, |x| fwd(x).iter().zip(&w).map(|(m, w)| m * w).sum());
            let tag = if with_mix { "snella" } else { "snell" };
            assert_close(&format!("{tag} dA"), &ana[..NA], &num[..NA], 1e-6);
            assert_close(&format!("{tag} dB"), &ana[NA..NA + NB], &num[NA..NA + NB], 1e-6);
            if with_mix {
                assert_close("dalpha", &ana[NA + NB..NA + NB + 1], &num[NA + NB..NA + NB + 1], 1e-6);
                assert_close("dgamma", &ana[NA + NB + 1..NA + NB + 2], &num[NA + NB + 1..NA + NB + 2], 1e-6);
                assert_close("dbeta", &ana[NA + NB + 2..], &num[NA + NB + 2..], 1e-6);
                assert!(ana[NA + NB + 1].abs() > 1e-3, "dgamma should be non-trivial");
            }
        }
    }

    #[test]
    fn chain_through_sparsify_matches_finite_differences() {
        let n = NI * NO;
        let k = kept_count(n, 0.4);
        for with_mix in [false, true] {
            let x = params(with_mix, 5);
            let m0 = fwd(&x);
            let mags: Vec<f64> = m0.iter().map(|v| v.abs()).collect();
            let set = select_topk(&mags, k);
            // Independent reference of the kept set and τ: full sort by (−|m|, index).
            let mut idx: Vec<usize> = (0..n).collect();
            idx.sort_by(|&p, &q| mags[q].partial_cmp(&mags[p]).unwrap().then(p.cmp(&q)));
            let mut mask = vec![false; n];
            idx[..k].iter().for_each(|&i| mask[i] = true);
            let tau = mags[idx[k]];
            assert_eq!(set.tau, tau);
            let w = rand_vec(n, 21, 1.0);
            for rule in [SparsifyRule::MagnitudeProduct, SparsifyRule::SoftThreshold, SparsifyRule::Mask] {
                // The stop-gradient factor, frozen at the base point.
                let factor: Vec<f64> = (0..n)
                    .map(|i| match rule {
                        SparsifyRule::MagnitudeProduct => if mask[i] { mags[i] } else { 0.0 },
                        SparsifyRule::SoftThreshold => (mags[i] - tau).max(0.0),
                        SparsifyRule::Mask => if mask[i] { 1.0 } else { 0.0 },
                    })
                    .collect();
                let mut dw = vec![0.0; n];
                sparsify_fwd(&m0, &set, rule, &mut dw);
                for i in 0..n {
                    assert_eq!(dw[i], m0[i] * factor[i], "{rule:?} forward at {i}");
                }
                let mut dm = vec![0.0; n];
                sparsify_bwd(&m0, &set, rule, &w, &mut dm);
                let ana = analytic(&x, &dm);
                let num = numeric_grad(&x, 1e-6, |x| {
                    fwd(x).iter().zip(&factor).zip(&w).map(|((m, f), w)| m * f * w).sum()
                });
                assert_close(&format!("{rule:?} mix={with_mix} chain"), &ana, &num, 1e-6);
                assert!(ana.iter().any(|v| v.abs() > 1e-3));
            }
        }
    }

    #[test]
    fn golden_forward_tiny() {
        // in=2, out=3, H=2, rh=1. A[0] = [0, 1], A[1] = [2, 0]; B[0] = [1, 3, 0], B[1] = [0, 2, 5].
        // D0 = [[1,3,0],[0,2,1]], D1 = [[2,0,3],[0,2,5]], K = 0.1·D0 − 0.1·D1.
        let a = [0.0, 1.0, 2.0, 0.0];
        let b = [1.0, 3.0, 0.0, 0.0, 2.0, 5.0];
        let k = [-0.1f64, 0.3, -0.3, 0.0, 0.0, -0.4];
        let mut m = vec![0.0; 6];
        merge_fwd(&a, &b, 2, 2, 3, 1, None, &mut m);
        for (x, y) in m.iter().zip(&k) {
            assert!((x - y).abs() < 1e-15, "{m:?}");
        }
        let (alpha, gamma, beta) = (0.5, 2.0, 0.25);
        merge_fwd(&a, &b, 2, 2, 3, 1, Some(Mixture { alpha, gamma, beta }), &mut m);
        // Row 0: softmax([-0.05, 0.15, -0.15]); row 1: softmax([0, 0, -0.2]).
        let (e0, e1, e2) = ((-0.05f64).exp(), 0.15f64.exp(), (-0.15f64).exp());
        let s0 = e0 + e1 + e2;
        let f = (-0.2f64).exp();
        let s1 = 2.0 + f;
        let want = [
            -0.1 + alpha * e0 / s0 + beta,
            0.3 + alpha * e1 / s0 + beta,
            -0.3 + alpha * e2 / s0 + beta,
            alpha / s1 + beta,
            alpha / s1 + beta,
            -0.4 + alpha * f / s1 + beta,
        ];
        for (x, y) in m.iter().zip(&want) {
            assert!((x - y).abs() < 1e-14, "{m:?} vs {want:?}");
        }
        // A literal: M[0,0] = −0.1 + 0.5·0.319873… + 0.25.
        assert!((m[0] - 0.3099365).abs() < 1e-6, "{}", m[0]);
        // D = 0 entries (D0[0,2], D0[1,0], D1[1,0]) give finite gradients.
        let (mut da, mut db) = (vec![0.0; 4], vec![0.0; 6]);
        let g = merge_bwd(&a, &b, 2, 2, 3, 1, Some(Mixture { alpha, gamma, beta }), &[1.0; 6], &mut da, &mut db).unwrap();
        assert!(da.iter().chain(&db).all(|v| v.is_finite()));
        assert!((g.beta - 6.0).abs() < 1e-15 && (g.alpha - 2.0).abs() < 1e-15, "{g:?}");
    }

    #[test]
    fn gamma_clamp_gives_finite_m_and_zero_dgamma() {
        let mut x = params(true, 3);
        x[NA + NB + 1] = 1e-6;
        let m = fwd(&x);
        assert!(m.iter().all(|v| v.is_finite()));
        let mut x4 = x.clone();
        x4[NA + NB + 1] = GAMMA_MIN;
        assert_eq!(m, fwd(&x4), "γ = 1e-6 must act as γ = 1e-4");
        let ana = analytic(&x, &rand_vec(NI * NO, 4, 1.0));
        assert!(ana.iter().all(|v| v.is_finite()));
        assert_eq!(ana[NA + NB + 1], 0.0);
        // f32 as well.
        let xf: Vec<f32> = x.iter().map(|&v| v as f32).collect();
        let mut mf = vec![0.0f32; NI * NO];
        let mx = Mixture { alpha: xf[NA + NB], gamma: 1e-6f32, beta: xf[NA + NB + 2] };
        merge_fwd(&xf[..NA], &xf[NA..NA + NB], H, NI, NO, RH, Some(mx), &mut mf);
        assert!(mf.iter().all(|v| v.is_finite()));
        let (mut da, mut db) = (vec![0.0f32; NA], vec![0.0f32; NB]);
        let g = merge_bwd(&xf[..NA], &xf[NA..NA + NB], H, NI, NO, RH, Some(mx), &mf, &mut da, &mut db).unwrap();
        assert_eq!(g.gamma, 0.0);
        assert!(da.iter().chain(&db).all(|v| v.is_finite()));
    }

    fn run_f32(n_in: usize, n_out: usize, rh: usize, threads: usize) -> (Vec<f32>, Vec<f32>, Vec<f32>, Mixture<f32>) {
        let a: Vec<f32> = rand_vec(H * n_in * rh, 1, 0.3).iter().map(|&v| v as f32).collect();
        let b: Vec<f32> = rand_vec(H * n_out * rh, 2, 0.3).iter().map(|&v| v as f32).collect();
        let g: Vec<f32> = rand_vec(n_in * n_out, 3, 1.0).iter().map(|&v| v as f32).collect();
        let mx = Some(Mixture { alpha: 1.1f32, gamma: 0.9, beta: 0.01 });
        let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
        pool.install(|| {
            let mut m = vec![0.0f32; n_in * n_out];
            merge_fwd(&a, &b, H, n_in, n_out, rh, mx, &mut m);
            let (mut da, mut db) = (vec![0.0f32; a.len()], vec![0.0f32; b.len()]);
            let gm = merge_bwd(&a, &b, H, n_in, n_out, rh, mx, &g, &mut da, &mut db).unwrap();
            (m, da, db, gm)
        })
    }

    #[test]
    fn bit_identical_across_runs_and_thread_counts() {
        let r1 = run_f32(61, 203, 4, 1);
        let r2 = run_f32(61, 203, 4, 3);
        let r3 = run_f32(61, 203, 4, 3);
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        for r in [&r2, &r3] {
            assert_eq!(bits(&r1.0), bits(&r.0));
            assert_eq!(bits(&r1.1), bits(&r.1));
            assert_eq!(bits(&r1.2), bits(&r.2));
            assert_eq!(r1.3.alpha.to_bits(), r.3.alpha.to_bits());
            assert_eq!(r1.3.gamma.to_bits(), r.3.gamma.to_bits());
            assert_eq!(r1.3.beta.to_bits(), r.3.beta.to_bits());
        }
        assert!(r1.1.iter().any(|&v| v != 0.0) && r1.2.iter().any(|&v| v != 0.0));
    }

    #[test]
    fn simd_and_scalar_paths_are_bit_identical() {
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        for n in [0usize, 1, 31, 32, 33, 100, 777] {
            let x: Vec<f32> = rand_vec(n, 1, 2.0).iter().map(|&v| v as f32).collect();
            let y: Vec<f32> = rand_vec(n, 2, 2.0).iter().map(|&v| v as f32).collect();
            #[cfg(target_arch = "x86_64")]
            if avx2::available() {
                // SAFETY: AVX2 checked.
                let (d, s) = unsafe { (avx2::dot_f32(&x, &y), avx2::sum_f32(&x)) };
                assert_eq!(d.to_bits(), dot::<f32, false>(&x, &y).to_bits(), "dot n={n}");
                assert_eq!(s.to_bits(), sum::<f32, false>(&x).to_bits(), "sum n={n}");
            }
            // f64 reference within rounding.
            let d64: f64 = x.iter().zip(&y).map(|(&a, &b)| a as f64 * b as f64).sum();
            assert!((dot::<f32, false>(&x, &y) as f64 - d64).abs() < 1e-4 * (1.0 + d64.abs()));
        }
        let (n_in, n_out, rh) = (13, 203, 5);
        let a: Vec<f32> = rand_vec(H * n_in * rh, 1, 0.3).iter().map(|&v| v as f32).collect();
        let b: Vec<f32> = rand_vec(H * n_out * rh, 2, 0.3).iter().map(|&v| v as f32).collect();
        let g: Vec<f32> = rand_vec(n_in * n_out, 3, 1.0).iter().map(|&v| v as f32).collect();
        let bt = transpose_b(&b, H, n_out, rh);
        let c: Vec<f32> = coeffs(H).into_iter().map(|v| v as f32).collect();
        let cx = Ctx { a: &a, bt: &bt, c: &c, n_in, n_out, rh, mixture: Some(Mixture { alpha: 0.8, gamma: 0.7, beta: 0.1 }), g: 0.7 };
        let (mut d, mut p) = (vec![0.0f32; H * n_out], vec![0.0f32; n_out]);
        let (mut m1, mut m2) = (vec![0.0f32; n_out], vec![0.0f32; n_out]);
        fwd_row::<f32, false>(&cx, 4, &mut d, &mut p, &mut m1);
        fwd_row_dispatch(&cx, 4, &mut d, &mut p, &mut m2);
        assert_eq!(bits(&m1), bits(&m2));
        let (g1, g2) = (bwd_chunk::<f32, false>(&cx, &g, 2, 11), bwd_chunk_dispatch(&cx, &g, 2, 11));
        assert_eq!(bits(&g1.da), bits(&g2.da));
        assert_eq!(bits(&g1.dbt), bits(&g2.dbt));
        assert_eq!(g1.sums.map(f64::to_bits), g2.sums.map(f64::to_bits));
    }

    /// Timing of the training-step sizes; run with `--ignored --nocapture`.
    #[test]
    #[ignore]
    fn bench_merge() {
        for (n_in, n_out, r, reps) in [(192, 768, 8, 72), (768, 3072, 32, 4)] {
            let rh = r / H;
            let a: Vec<f32> = rand_vec(H * n_in * rh, 1, 0.3).iter().map(|&v| v as f32).collect();
            let b: Vec<f32> = rand_vec(H * n_out * rh, 2, 0.3).iter().map(|&v| v as f32).collect();
            let g: Vec<f32> = rand_vec(n_in * n_out, 3, 1.0).iter().map(|&v| v as f32).collect();
            let mx = Some(Mixture { alpha: 1.0f32, gamma: 1.0, beta: 0.0 });
            let mut m = vec![0.0f32; n_in * n_out];
            let (mut da, mut db) = (vec![0.0f32; a.len()], vec![0.0f32; b.len()]);
            let t = std::time::Instant::now();
            for _ in 0..reps {
                merge_fwd(&a, &b, H, n_in, n_out, rh, mx, &mut m);
            }
            let tf = t.elapsed() / reps as u32;
            let t = std::time::Instant::now();
            for _ in 0..reps {
                merge_bwd(&a, &b, H, n_in, n_out, rh, mx, &g, &mut da, &mut db);
            }
            let tb = t.elapsed() / reps as u32;
            let mags: Vec<f32> = m.iter().map(|x| x.abs()).collect();
            let mut dw = vec![0.0f32; m.len()];
            let t = std::time::Instant::now();
            for _ in 0..reps {
                let set = select_topk(&mags, kept_count(m.len(), 0.5));
                sparsify_fwd(&m, &set, SparsifyRule::MagnitudeProduct, &mut dw);
                sparsify_bwd(&m, &set, SparsifyRule::MagnitudeProduct, &g, &mut dw);
            }
            let ts = t.elapsed() / reps as u32;
            let t = std::time::Instant::now();
            for _ in 0..reps {
                std::hint::black_box(select_topk(&mags, kept_count(m.len(), 0.5)));
            }
            let tk = t.elapsed() / reps as u32;
            eprintln!("{n_in}x{n_out} r={r}: fwd {tf:?}, bwd {tb:?}, topk+sparsify fwd+bwd {ts:?} (topk {tk:?}) per call");
        }
    }
}
