//! Row-major GEMM on slices, backed by the `matrixmultiply` crate (multi-threaded).

use crate::Real;
use rayon::prelude::*;

/// `C[m,n] = alpha · op(A)[m,k] · op(B)[k,n] + beta · C`, all row-major and contiguous.
///
/// `A` is stored `[m, k]` when `ta` is false and `[k, m]` when true; `B` is stored `[k, n]` when
/// `tb` is false and `[n, k]` when true. When `beta == 0`, `C` is overwritten (NaNs in it are not
/// propagated).
///
/// # Panics
/// If a slice is shorter than its shape needs (a programming error inside snella).
#[allow(clippy::too_many_arguments)]
pub fn gemm<T: Real>(
    ta: bool, tb: bool, m: usize, n: usize, k: usize,
    alpha: T, a: &[T], b: &[T], beta: T, c: &mut [T],
) {
    assert!(a.len() >= m * k, "gemm: A has {} elements, needs {}", a.len(), m * k);
    assert!(b.len() >= k * n, "gemm: B has {} elements, needs {}", b.len(), k * n);
    assert!(c.len() >= m * n, "gemm: C has {} elements, needs {}", c.len(), m * n);
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        for v in c[..m * n].iter_mut() {
            *v = if beta == T::zero() { T::zero() } else { *v * beta };
        }
        return;
    }
    let (rsa, csa) = if ta { (1, m as isize) } else { (k as isize, 1) };
    let (rsb, csb) = if tb { (1, k as isize) } else { (n as isize, 1) };
    // Split the rows of C (or, for few rows, its columns) across rayon's threads: each part is an
    // independent GEMM on disjoint output, so results do not depend on the thread count.
    let threads = rayon::current_num_threads();
    let flops = m * n * k;
    if threads > 1 && flops >= PAR_MIN_FLOPS {
        let parts = threads * 2;
        if m >= parts * 8 {
            let rows = m.div_ceil(parts);
            c[..m * n].par_chunks_mut(rows * n).enumerate().for_each(|(i, cc)| {
                let r0 = i * rows;
                let mr = cc.len() / n;
                let a0 = r0 as isize * rsa;
                // SAFETY: rows r0..r0+mr of op(A) and C are inside the asserted extents.
                unsafe { T::gemm_strided(mr, k, n, alpha, a.as_ptr().offset(a0), rsa, csa, b.as_ptr(), rsb, csb, beta, cc.as_mut_ptr(), n as isize, 1) };
            });
            return;
        }
        if n >= parts * 8 {
            let cols = n.div_ceil(parts);
            let cptr = SendPtr(c.as_mut_ptr());
            (0..n.div_ceil(cols)).into_par_iter().for_each(|i| {
                let c0 = i * cols;
                let nc = cols.min(n - c0);
                let cp = &cptr;
                // SAFETY: columns c0..c0+nc of op(B) and C are inside the asserted extents, and the
                // parts write disjoint columns of C.
                unsafe { T::gemm_strided(m, k, nc, alpha, a.as_ptr(), rsa, csa, b.as_ptr().offset(c0 as isize * csb), rsb, csb, beta, cp.0.add(c0), n as isize, 1) };
            });
            return;
        }
    }
    // SAFETY: the asserts above bound every extent by its slice.
    unsafe { T::gemm_strided(m, k, n, alpha, a.as_ptr(), rsa, csa, b.as_ptr(), rsb, csb, beta, c.as_mut_ptr(), n as isize, 1) };
}

/// Below this many multiply-adds a GEMM runs on one thread.
const PAR_MIN_FLOPS: usize = 1 << 18;

/// A raw output pointer shared by the column-split parts, which write disjoint columns.
struct SendPtr<T>(*mut T);
// SAFETY: only used for disjoint writes inside one `gemm` call, which outlives the parts.
unsafe impl<T> Sync for SendPtr<T> {}
unsafe impl<T> Send for SendPtr<T> {}

#[cfg(test)]
mod tests {
    use super::*;

    fn naive(ta: bool, tb: bool, m: usize, n: usize, k: usize, a: &[f64], b: &[f64]) -> Vec<f64> {
        let mut c = vec![0.0; m * n];
        for i in 0..m {
            for j in 0..n {
                let mut s = 0.0;
                for p in 0..k {
                    let av = if ta { a[p * m + i] } else { a[i * k + p] };
                    let bv = if tb { b[j * k + p] } else { b[p * n + j] };
                    s += av * bv;
                }
                c[i * n + j] = s;
            }
        }
        c
    }

    #[test]
    fn parallel_splits_match_naive_bit_for_bit_across_thread_counts() {
        for (m, n, k) in [(300, 7, 200), (5, 900, 70), (129, 257, 33)] {
            let a: Vec<f64> = (0..m * k).map(|i| (i as f64 * 0.37).sin()).collect();
            let b: Vec<f64> = (0..k * n).map(|i| (i as f64 * 0.71).cos()).collect();
            for ta in [false, true] {
                for tb in [false, true] {
                    let want = naive(ta, tb, m, n, k, &a, &b);
                    let mut c = vec![0.0; m * n];
                    gemm(ta, tb, m, n, k, 1.0, &a, &b, 0.0, &mut c);
                    let one = rayon::ThreadPoolBuilder::new().num_threads(1).build().unwrap();
                    let mut c1 = vec![0.0; m * n];
                    one.install(|| gemm(ta, tb, m, n, k, 1.0, &a, &b, 0.0, &mut c1));
                    for (x, w) in c.iter().zip(&want) {
                        assert!((x - w).abs() < 1e-10);
                    }
                    assert_eq!(c, c1, "thread count changed the result");
                }
            }
        }
    }

    #[test]
    fn all_transpose_combinations_match_naive() {
        let (m, n, k) = (5, 7, 3);
        let a: Vec<f64> = (0..m * k).map(|i| (i as f64 * 0.37).sin()).collect();
        let b: Vec<f64> = (0..k * n).map(|i| (i as f64 * 0.71).cos()).collect();
        for ta in [false, true] {
            for tb in [false, true] {
                let want = naive(ta, tb, m, n, k, &a, &b);
                let mut c = vec![1.0; m * n];
                gemm(ta, tb, m, n, k, 2.0, &a, &b, 0.5, &mut c);
                for (x, w) in c.iter().zip(&want) {
                    assert!((x - (2.0 * w + 0.5)).abs() < 1e-12);
                }
            }
        }
    }
}
