//! Bias add and bias gradient for linear layers (`y = x·Wᵀ + b`); the GEMMs are in `crate::gemm`.

use crate::Real;
use rayon::prelude::*;

/// Rows summed sequentially into one partial sum by [`bias_grad`]; the partial sums are then added
/// in chunk order, so the result does not depend on the number of threads.
const ROW_CHUNK: usize = 64;

/// `y[r, :] += bias` for every row `r` of `y: [rows, cols]`; `bias: [cols]`.
///
/// # Panics
/// If `y` is shorter than `rows·cols` or `bias` shorter than `cols`.
pub fn add_bias<T: Real>(y: &mut [T], bias: &[T], rows: usize, cols: usize) {
    assert!(y.len() >= rows * cols, "add_bias: y has {} elements, needs {}", y.len(), rows * cols);
    assert!(bias.len() >= cols, "add_bias: bias has {} elements, needs {cols}", bias.len());
    if rows == 0 || cols == 0 {
        return;
    }
    let bias = &bias[..cols];
    y[..rows * cols].par_chunks_mut(cols).with_min_len(16).for_each(|row| {
        for (o, &bv) in row.iter_mut().zip(bias) {
            *o += bv;
        }
    });
}

/// `db[c] (+)= Σ_r dy[r, c]` for `dy: [rows, cols]`; overwrites `db` unless `accumulate`.
///
/// Deterministic: rows are summed sequentially within fixed chunks of 64 rows (in parallel over
/// chunks) and the chunk sums are added in chunk order.
///
/// # Panics
/// If `dy` is shorter than `rows·cols` or `db` shorter than `cols`.
pub fn bias_grad<T: Real>(dy: &[T], rows: usize, cols: usize, db: &mut [T], accumulate: bool) {
    assert!(dy.len() >= rows * cols, "bias_grad: dy has {} elements, needs {}", dy.len(), rows * cols);
    assert!(db.len() >= cols, "bias_grad: db has {} elements, needs {cols}", db.len());
    let db = &mut db[..cols];
    if !accumulate {
        db.fill(T::zero());
    }
    if rows == 0 || cols == 0 {
        return;
    }
    let partials: Vec<Vec<T>> = dy[..rows * cols]
        .par_chunks(ROW_CHUNK * cols)
        .map(|chunk| {
            let mut acc = vec![T::zero(); cols];
            for row in chunk.chunks_exact(cols) {
                for (a, &v) in acc.iter_mut().zip(row) {
                    *a += v;
                }
            }
            acc
        })
        .collect();
    let mut total = vec![T::zero(); cols];
    for p in &partials {
        for (a, &v) in total.iter_mut().zip(p) {
            *a += v;
        }
    }
    for (d, t) in db.iter_mut().zip(total) {
        *d += t;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gradcheck::{assert_close, numeric_grad, rand_vec};

    #[test]
    fn add_bias_adds_per_row() {
        let mut y = vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0];
        add_bias(&mut y, &[10.0, 20.0, 30.0], 2, 3);
        assert_eq!(y, vec![11.0, 22.0, 33.0, 14.0, 25.0, 36.0]);
    }

    #[test]
    fn bias_grad_sums_columns_and_accumulates() {
        let dy = vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0];
        let mut db = vec![100.0, 100.0, 100.0];
        bias_grad(&dy, 2, 3, &mut db, false);
        assert_eq!(db, vec![5.0, 7.0, 9.0]);
        bias_grad(&dy, 2, 3, &mut db, true);
        assert_eq!(db, vec![10.0, 14.0, 18.0]);
    }

    #[test]
    fn bias_grad_many_rows_matches_sequential_sum() {
        // More rows than one chunk, with a ragged last chunk.
        let (rows, cols) = (203, 5);
        let dy = rand_vec(rows * cols, 3, 1.0);
        let mut db = vec![0.0; cols];
        bias_grad(&dy, rows, cols, &mut db, false);
        for c in 0..cols {
            let s: f64 = (0..rows).map(|r| dy[r * cols + c]).sum();
            assert!((db[c] - s).abs() < 1e-12, "col {c}: {} vs {s}", db[c]);
        }
    }

    #[test]
    fn bias_grad_matches_finite_differences() {
        let (rows, cols) = (3, 7);
        let x = rand_vec(rows * cols, 1, 1.0);
        let w = rand_vec(rows * cols, 2, 1.0);
        let bias = rand_vec(cols, 4, 1.0);
        let loss = |bias: &[f64]| {
            let mut y = x.clone();
            add_bias(&mut y, bias, rows, cols);
            y.iter().zip(&w).map(|(a, b)| a * b).sum::<f64>()
        };
        let num = numeric_grad(&bias, 1e-5, loss);
        let mut db = vec![0.0; cols];
        bias_grad(&w, rows, cols, &mut db, false);
        assert_close("dbias", &db, &num, 1e-6);
    }
}
