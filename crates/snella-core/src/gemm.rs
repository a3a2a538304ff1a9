//! Row-major GEMM on slices, backed by the `matrixmultiply` crate (multi-threaded).

use crate::Real;

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
    // SAFETY: the asserts above bound every extent by its slice.
    unsafe { T::gemm_strided(m, k, n, alpha, a.as_ptr(), rsa, csa, b.as_ptr(), rsb, csb, beta, c.as_mut_ptr(), n as isize, 1) };
}

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
