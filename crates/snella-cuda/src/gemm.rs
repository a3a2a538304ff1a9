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

/// Row-major strided-batched GEMM with explicit row strides, over `batch` problems:
/// `C_i = alpha·op(A_i)·op(B_i) + beta·C_i`, where `A_i` starts `i·stride_a` elements after `a`'s
/// start, and so on. `lda`, `ldb`, `ldc` are the row strides (elements) of the stored matrices
/// (`A` stored `[m,k]`, or `[k,m]` when `ta`; `B` stored `[k,n]`, or `[n,k]` when `tb`), so a matrix
/// can be a column block of a wider row-major tensor (e.g. one head of `qkv: [b, t, 3·d]`).
///
/// # Errors
/// `CUDA_ERROR` when cuBLAS fails.
///
/// # Safety
/// Every `A_i`, `B_i`, `C_i` must lie inside its buffer; problems must not write overlapping `C`.
#[allow(clippy::too_many_arguments)]
pub unsafe fn gemm_strided<A: DevicePtr<f32>, B: DevicePtr<f32>, C: DevicePtrMut<f32>>(
    gpu: &Gpu, ta: bool, tb: bool, m: usize, n: usize, k: usize, alpha: f32,
    a: &A, lda: usize, stride_a: usize, b: &B, ldb: usize, stride_b: usize,
    beta: f32, c: &mut C, ldc: usize, stride_c: usize, batch: usize,
) -> Result<(), SnellaError> {
    use cudarc::cublas::StridedBatchedConfig;
    if m == 0 || n == 0 || batch == 0 {
        return Ok(());
    }
    let cfg = StridedBatchedConfig {
        gemm: GemmConfig {
            transa: if tb { CUBLAS_OP_T } else { CUBLAS_OP_N },
            transb: if ta { CUBLAS_OP_T } else { CUBLAS_OP_N },
            m: n as i32,
            n: m as i32,
            k: k as i32,
            alpha,
            lda: ldb as i32,
            ldb: lda as i32,
            beta,
            ldc: ldc as i32,
        },
        batch_size: batch as i32,
        stride_a: stride_b as i64,
        stride_b: stride_a as i64,
        stride_c: stride_c as i64,
    };
    gpu.blas.gemm_strided_batched(cfg, b, a, c).map_err(|e| cuda_err("cuBLAS sgemm (strided batched)", e))
}
