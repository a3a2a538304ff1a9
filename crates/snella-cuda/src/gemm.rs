//! Row-major GEMM on cuBLAS (f32 in and out, f32 accumulation).
//!
//! Row-major `C[m,n] = op(A)·op(B)` is column-major `Cᵀ = op(B)ᵀ·op(A)ᵀ`, so cuBLAS is called with
//! the operands swapped: `(n, m, k)`, B first.

use crate::device::{cuda_err, Gpu};
use cudarc::cublas::sys::cublasOperation_t::{CUBLAS_OP_N, CUBLAS_OP_T};
use cudarc::cublas::{Gemm, GemmConfig};
use cudarc::driver::{DevicePtr, DevicePtrMut};
use snella_core::SnellaError;

/// `C = alpha·op(A)·op(B) + beta·C`, row-major, as `snella_core::gemm::gemm` (A is `[m,k]`, or
/// `[k,m]` when `ta`; B is `[k,n]`, or `[n,k]` when `tb`).
///
/// # Errors
/// `CUDA_ERROR` when cuBLAS fails.
#[allow(clippy::too_many_arguments)]
pub fn gemm<A: DevicePtr<f32>, B: DevicePtr<f32>, C: DevicePtrMut<f32>>(
    gpu: &Gpu, ta: bool, tb: bool, m: usize, n: usize, k: usize, alpha: f32, a: &A, b: &B, beta: f32, c: &mut C,
) -> Result<(), SnellaError> {
    if m == 0 || n == 0 {
        return Ok(());
    }
    let cfg = GemmConfig {
        transa: if tb { CUBLAS_OP_T } else { CUBLAS_OP_N },
        transb: if ta { CUBLAS_OP_T } else { CUBLAS_OP_N },
        m: n as i32,
        n: m as i32,
        k: k as i32,
        alpha,
        lda: if tb { k as i32 } else { n as i32 },
        ldb: if ta { m as i32 } else { k as i32 },
        beta,
        ldc: n as i32,
    };
    // SAFETY: the caller's buffers hold at least the row-major extents given.
    unsafe { gpu.blas.gemm(cfg, b, a, c) }.map_err(|e| cuda_err("cuBLAS sgemm", e))
}
