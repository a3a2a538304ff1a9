//! Row-major GEMM on cuBLAS (f32 in and out, f32 accumulation).
//!
//! Row-major `C[m,n] = op(A)·op(B)` is column-major `Cᵀ = op(B)ᵀ·op(A)ᵀ`, so cuBLAS is called with
//! the operands swapped: `(n, m, k)`, B first.

use crate::device::{cuda_err, Gpu, Precision};
use cudarc::cublas::sys::cublasOperation_t::{CUBLAS_OP_N, CUBLAS_OP_T};
use cudarc::cublas::{Gemm, GemmConfig};
use cudarc::driver::{CudaSlice, DevicePtr, DevicePtrMut};
use snella_core::SnellaError;

/// `C = alpha·op(A)·op(B) + beta·C`, row-major, as `snella_core::gemm::gemm` (A is `[m,k]`, or
/// `[k,m]` when `ta`; B is `[k,n]`, or `[n,k]` when `tb`). All f32 in memory; the products run in
/// the device's [`Precision`]: strict f32, TF32 tensor cores, or bf16 operands (each converted on
/// the fly) with f32 accumulation and an f32 `C`.
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
    if gpu.precision() == Precision::Bf16 && k > 0 {
        return gemm_bf16(gpu, ta, tb, m, n, k, alpha, a, b, beta, c);
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

/// Converts the first `n` values of `src` (f32) to a new bf16 buffer (round to nearest even), as the
/// bf16 products convert their operands (a linear layer's input is converted once and kept so).
///
/// # Errors
/// `CUDA_OOM` for the copy; `CUDA_ERROR` on a launch failure.
pub fn to_bf16<S: DevicePtr<f32>>(gpu: &Gpu, src: &S, n: usize) -> Result<cudarc::driver::CudaSlice<u16>, SnellaError> {
    use cudarc::driver::PushKernelArg;
    // SAFETY: the kernel below writes all n elements before any read.
    let mut dst = unsafe { gpu.uninit::<u16>(n) }?;
    let f = gpu.func("snella_f32_to_bf16");
    let n64 = n as u64;
    let cfg = crate::ops::reduce::grid_stride(n.div_ceil(4));
    let (sp, _rs) = src.device_ptr(&gpu.stream);
    let mut l = gpu.stream.launch_builder(&f);
    l.arg(&sp).arg(&mut dst).arg(&n64);
    // SAFETY: src holds ≥ n floats (the caller's GEMM extents) and dst n bf16 values.
    unsafe { l.launch(cfg) }.map_err(|e| cuda_err("snella_f32_to_bf16", e))?;
    Ok(dst)
}

/// A linear layer's weight `W: [n_out, n_in]` as the bf16 products read it: f32 (converted to bf16
/// by each product that reads it) or already in bf16 (converted once by the caller, e.g. an effective
/// weight `W0 + ΔWᵀ` made in forward and multiplied again in backward).
pub enum Wt<'a, W> {
    /// f32 values.
    F32(&'a W),
    /// bf16 values (round to nearest even of the f32 weight, as [`to_bf16`] makes them).
    Bf16(&'a CudaSlice<u16>),
}

impl<W: DevicePtr<f32>> Wt<'_, W> {
    /// The bf16 weight of `n` values: converted from f32, or the caller's (length checked).
    fn bf16(&self, gpu: &Gpu, what: &'static str, n: usize) -> Result<std::borrow::Cow<'_, CudaSlice<u16>>, SnellaError> {
        match self {
            Wt::F32(w) => Ok(std::borrow::Cow::Owned(to_bf16(gpu, *w, n)?)),
            Wt::Bf16(w16) => {
                crate::ops::reduce::check_len(what, "W", w16.len(), n)?;
                Ok(std::borrow::Cow::Borrowed(*w16))
            }
        }
    }
}

fn bf16_weight_err(what: &str) -> SnellaError {
    SnellaError::config(&format!("{what}.w"), "bf16", "an f32 weight outside the bf16 precision")
}

/// [`gemm`] with bf16 operands: `A` (its `m·k` stored values) and `B` (`k·n`) are converted to bf16,
/// then `cublasGemmEx` multiplies them with f32 accumulation (`CUBLAS_COMPUTE_32F`) into the f32 `C`.
#[allow(clippy::too_many_arguments)]
fn gemm_bf16<A: DevicePtr<f32>, B: DevicePtr<f32>, C: DevicePtrMut<f32>>(
    gpu: &Gpu, ta: bool, tb: bool, m: usize, n: usize, k: usize, alpha: f32, a: &A, b: &B, beta: f32, c: &mut C,
) -> Result<(), SnellaError> {
    let (a16, b16) = (to_bf16(gpu, a, m * k)?, to_bf16(gpu, b, k * n)?);
    gemm_ex_bf16(gpu, ta, tb, m, n, k, alpha, &a16, &b16, beta, c)
}

/// The two products of a linear layer's backward, row-major f32 in memory: `dx = dy·W`
/// (`dy: [rows, n_out]`, `W: [n_out, n_in]`, `dx: [rows, n_in]`) and `gt = dyᵀ·x` (`x: [rows, n_in]`,
/// `gt: [n_out, n_in]`), each when given, in the device's precision; in bf16 `dy` is converted once
/// for both. A bf16 `w` ([`Wt::Bf16`]) needs the bf16 precision.
///
/// # Errors
/// `CUDA_ERROR` when cuBLAS fails; `CUDA_OOM` for the bf16 copies; `Config` for a bf16 `w` in
/// f32/TF32.
#[allow(clippy::too_many_arguments)]
pub fn linear_bwd_products<Y: DevicePtr<f32>, W: DevicePtr<f32>, X: DevicePtr<f32>, D: DevicePtrMut<f32>, G: DevicePtrMut<f32>>(
    gpu: &Gpu, dy: &Y, w: Wt<'_, W>, x: &X, rows: usize, n_in: usize, n_out: usize, dx: Option<&mut D>, gt: Option<&mut G>,
) -> Result<(), SnellaError> {
    if gpu.precision() != Precision::Bf16 || rows == 0 || n_in == 0 || n_out == 0 {
        if let Some(dx) = dx {
            match w {
                Wt::F32(w) => gemm(gpu, false, false, rows, n_in, n_out, 1.0, dy, w, 0.0, dx)?,
                // a kept bf16 weight beside an empty product: dx is empty, or zeros for n_out = 0
                Wt::Bf16(_) if gpu.precision() == Precision::Bf16 => {
                    if rows * n_in > 0 {
                        gpu.stream.memset_zeros(dx).map_err(|e| cuda_err("linear_bwd_products (zero dx)", e))?;
                    }
                }
                Wt::Bf16(_) => return Err(bf16_weight_err("linear_bwd_products")),
            }
        }
        if let Some(gt) = gt {
            gemm(gpu, true, false, n_out, n_in, rows, 1.0, dy, x, 0.0, gt)?;
        }
        return Ok(());
    }
    let x16 = match gt.is_some() {
        true => Some(to_bf16(gpu, x, rows * n_in)?),
        false => None,
    };
    linear_bwd_products_bf16x(gpu, dy, w, x16.as_ref(), rows, n_in, n_out, dx, gt)
}

/// [`linear_bwd_products`] in bf16 with the input `x` already in bf16 (`x16: [rows, n_in]`, as a
/// linear layer keeps it from its forward; needed only for `gt`).
///
/// # Errors
/// `Config` when `gt` is asked for without `x16`; `CUDA_ERROR` when cuBLAS fails; `CUDA_OOM` for the
/// bf16 copies of `dy` and `W`.
#[allow(clippy::too_many_arguments)]
pub fn linear_bwd_products_bf16x<Y: DevicePtr<f32>, W: DevicePtr<f32>, D: DevicePtrMut<f32>, G: DevicePtrMut<f32>>(
    gpu: &Gpu, dy: &Y, w: Wt<'_, W>, x16: Option<&CudaSlice<u16>>, rows: usize, n_in: usize, n_out: usize, dx: Option<&mut D>, gt: Option<&mut G>,
) -> Result<(), SnellaError> {
    // nothing to convert for an empty product (the bf16 form handles the empty cases)
    let dy16 = to_bf16(gpu, dy, if n_in == 0 { 0 } else { rows * n_out })?;
    linear_bwd_products_bf16(gpu, &dy16, w, x16, rows, n_in, n_out, dx, gt)
}

/// [`linear_bwd_products_bf16x`] with `dy` already in bf16 (`dy16: [rows, n_out]`, as the GELU and
/// fused-attention backward kernels can write it): the same products on the same operands, without
/// the conversion pass.
///
/// # Errors
/// `Tensor` when `dy16`, `x16` or a bf16 `w` is short; otherwise as [`linear_bwd_products_bf16x`].
#[allow(clippy::too_many_arguments)]
pub fn linear_bwd_products_bf16<W: DevicePtr<f32>, D: DevicePtrMut<f32>, G: DevicePtrMut<f32>>(
    gpu: &Gpu, dy16: &CudaSlice<u16>, w: Wt<'_, W>, x16: Option<&CudaSlice<u16>>, rows: usize, n_in: usize, n_out: usize, dx: Option<&mut D>, gt: Option<&mut G>,
) -> Result<(), SnellaError> {
    bwd_products_bf16(gpu, dy16, w, x16, rows, n_in, n_out, dx, gt, false)
}

/// [`linear_bwd_products_bf16`] writing the weight gradient in `ΔW`'s layout instead:
/// `g = x16ᵀ·dy16: [n_in, n_out]` (the same products, operands swapped; what a kernel adapter's
/// backward reads row by row, `snella_cuda::ops::merge::merge_bwd_from_grad`).
///
/// # Errors
/// As [`linear_bwd_products_bf16`].
#[allow(clippy::too_many_arguments)]
pub fn linear_bwd_products_bf16_g<W: DevicePtr<f32>, D: DevicePtrMut<f32>, G: DevicePtrMut<f32>>(
    gpu: &Gpu, dy16: &CudaSlice<u16>, w: Wt<'_, W>, x16: &CudaSlice<u16>, rows: usize, n_in: usize, n_out: usize, dx: Option<&mut D>, g: &mut G,
) -> Result<(), SnellaError> {
    bwd_products_bf16(gpu, dy16, w, Some(x16), rows, n_in, n_out, dx, Some(g), true)
}

/// The two products of [`linear_bwd_products_bf16`]; the weight gradient `[n_in, n_out]` when `in_out`.
#[allow(clippy::too_many_arguments)]
fn bwd_products_bf16<W: DevicePtr<f32>, D: DevicePtrMut<f32>, G: DevicePtrMut<f32>>(
    gpu: &Gpu, dy16: &CudaSlice<u16>, w: Wt<'_, W>, x16: Option<&CudaSlice<u16>>, rows: usize, n_in: usize, n_out: usize, dx: Option<&mut D>, gt: Option<&mut G>,
    in_out: bool,
) -> Result<(), SnellaError> {
    if rows == 0 || n_in == 0 {
        return Ok(());
    }
    if n_out == 0 {
        // dx = dy·W over an empty sum: zeros (gt is empty)
        if let Some(dx) = dx {
            gpu.stream.memset_zeros(dx).map_err(|e| cuda_err("linear_bwd_products (zero dx)", e))?;
        }
        return Ok(());
    }
    crate::ops::reduce::check_len("linear_bwd_products", "dy", dy16.len(), rows * n_out)?;
    if let Some(x16) = x16 {
        crate::ops::reduce::check_len("linear_bwd_products", "x", x16.len(), rows * n_in)?;
    }
    if let Some(dx) = dx {
        let w16 = w.bf16(gpu, "linear_bwd_products", n_out * n_in)?;
        gemm_ex_bf16(gpu, false, false, rows, n_in, n_out, 1.0, dy16, &w16, 0.0, dx)?;
    }
    if let Some(gt) = gt {
        let x16 = x16.ok_or_else(|| SnellaError::config("linear_bwd_products.x", 0, "the layer input in bf16 for the weight gradient"))?;
        if in_out {
            gemm_ex_bf16(gpu, true, false, n_in, n_out, rows, 1.0, x16, dy16, 0.0, gt)?;
        } else {
            gemm_ex_bf16(gpu, true, false, n_out, n_in, rows, 1.0, dy16, x16, 0.0, gt)?;
        }
    }
    Ok(())
}

/// `cublasGemmEx` on bf16 operands already converted, f32 accumulation into the f32 `C`.
#[allow(clippy::too_many_arguments)]
fn gemm_ex_bf16<C: DevicePtrMut<f32>>(
    gpu: &Gpu, ta: bool, tb: bool, m: usize, n: usize, k: usize, alpha: f32,
    a16: &cudarc::driver::CudaSlice<u16>, b16: &cudarc::driver::CudaSlice<u16>, beta: f32, c: &mut C,
) -> Result<(), SnellaError> {
    use cudarc::cublas::sys::{cublasComputeType_t, cublasGemmAlgo_t, cublasGemmEx, cublasStatus_t, cudaDataType};
    let (ap, _ra) = a16.device_ptr(&gpu.stream);
    let (bp, _rb) = b16.device_ptr(&gpu.stream);
    let (cp, _rc) = c.device_ptr_mut(&gpu.stream);
    let (lda, ldb) = (if tb { k } else { n }, if ta { m } else { k });
    // SAFETY: the handle is bound to gpu.stream; a16/b16 hold the converted operands, C holds m·n
    // f32 values (the caller's extents); alpha/beta are host f32 (the default pointer mode).
    let st = unsafe {
        cublasGemmEx(
            *gpu.blas.handle(),
            if tb { CUBLAS_OP_T } else { CUBLAS_OP_N },
            if ta { CUBLAS_OP_T } else { CUBLAS_OP_N },
            n as i32,
            m as i32,
            k as i32,
            &alpha as *const f32 as *const _,
            bp as *const _,
            cudaDataType::CUDA_R_16BF,
            lda as i32,
            ap as *const _,
            cudaDataType::CUDA_R_16BF,
            ldb as i32,
            &beta as *const f32 as *const _,
            cp as *mut _,
            cudaDataType::CUDA_R_32F,
            n as i32,
            cublasComputeType_t::CUBLAS_COMPUTE_32F,
            cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
        )
    };
    if st == cublasStatus_t::CUBLAS_STATUS_SUCCESS { Ok(()) } else { Err(cuda_err("cublasGemmEx (bf16)", st)) }
}

/// Row-major batched GEMM over problems at explicit element offsets (one cuBLAS call for all of
/// them): `C_z = alpha·op(A_z)·op(B_z) + beta·C_z`, where `A_z` starts `a_offs[z]` elements after
/// `a`'s start, and so on; `lda`, `ldb`, `ldc` are the row strides (elements) of the stored matrices. Used where
/// the problems are not evenly strided (every head of every image of the attention). The pointer
/// tables (3 × count × 8 bytes) are uploaded per call. f32 products in the handle's math mode.
///
/// # Errors
/// `CUDA_ERROR` when cuBLAS or the upload fails.
///
/// # Safety
/// Every `A_z`, `B_z`, `C_z` must lie inside its buffer; problems must not write overlapping `C`.
#[allow(clippy::too_many_arguments)]
pub unsafe fn gemm_batched<A: DevicePtr<f32>, B: DevicePtr<f32>, C: DevicePtrMut<f32>>(
    gpu: &Gpu, ta: bool, tb: bool, m: usize, n: usize, k: usize, alpha: f32,
    a: &A, a_offs: &[usize], lda: usize, b: &B, b_offs: &[usize], ldb: usize,
    beta: f32, c: &mut C, c_offs: &[usize], ldc: usize,
) -> Result<(), SnellaError> {
    use cudarc::cublas::sys::{cublasSgemmBatched, cublasStatus_t};
    let count = a_offs.len();
    if m == 0 || n == 0 || count == 0 {
        return Ok(());
    }
    let (ap, _ra) = a.device_ptr(&gpu.stream);
    let (bp, _rb) = b.device_ptr(&gpu.stream);
    let (cp, _rc) = c.device_ptr_mut(&gpu.stream);
    // column-major view: cuBLAS's A is our B, its B our A (see `gemm`)
    let mut table: Vec<u64> = Vec::with_capacity(3 * count);
    table.extend(b_offs.iter().map(|&o| bp + 4 * o as u64));
    table.extend(a_offs.iter().map(|&o| ap + 4 * o as u64));
    table.extend(c_offs.iter().map(|&o| cp + 4 * o as u64));
    let dev = gpu.stream.clone_htod(&table).map_err(|e| cuda_err("upload of the batched GEMM's pointer table", e))?;
    let (dp, _rd) = dev.device_ptr(&gpu.stream);
    let st = cublasSgemmBatched(
        *gpu.blas.handle(),
        if tb { CUBLAS_OP_T } else { CUBLAS_OP_N },
        if ta { CUBLAS_OP_T } else { CUBLAS_OP_N },
        n as i32,
        m as i32,
        k as i32,
        &alpha,
        dp as *const *const f32,
        ldb as i32,
        (dp + 8 * count as u64) as *const *const f32,
        lda as i32,
        &beta,
        (dp + 16 * count as u64) as *const *mut f32,
        ldc as i32,
        count as i32,
    );
    if st == cublasStatus_t::CUBLAS_STATUS_SUCCESS { Ok(()) } else { Err(cuda_err("cublasSgemmBatched", st)) }
}

/// The forward of a linear layer, row-major f32 in memory: `y = x·Wᵀ (+ x·Δ) + bias (+ residual)`
/// (`x: [rows, n_in]`, `W`, `Δ: [n_out, n_in]`, `y`, `residual: [rows, n_out]`), the bias and the
/// residual added by cuBLASLt's epilogues ([`crate::gemm_lt`]) instead of separate passes. In bf16
/// `x`, `W` and `Δ` are converted once each and `Δ`'s product accumulates onto the first (the
/// adapted linears' two products, see `snella_model::linear`); in f32/TF32 one product, with `W`
/// already the effective weight and `Δ` `None`. A bf16 `w` ([`Wt::Bf16`]) needs the bf16 precision.
///
/// # Errors
/// `CUDA_ERROR` when cuBLASLt fails; `CUDA_OOM` for the bf16 copies; `Config` for a bf16 `w` in
/// f32/TF32.
#[allow(clippy::too_many_arguments)]
pub fn linear_fwd<X: DevicePtr<f32>, W: DevicePtr<f32>, Bi: DevicePtr<f32>, R: DevicePtr<f32>, Y: DevicePtrMut<f32>>(
    gpu: &Gpu, x: &X, w: Wt<'_, W>, delta: Option<&W>, bias: &Bi, residual: Option<&R>, rows: usize, n_in: usize, n_out: usize, y: &mut Y,
) -> Result<(), SnellaError> {
    use crate::gemm_lt::{matmul, OperandType};
    if rows == 0 || n_out == 0 {
        return Ok(());
    }
    if gpu.precision() == Precision::Bf16 && n_in > 0 {
        let x16 = to_bf16(gpu, x, rows * n_in)?;
        return linear_fwd_bf16x(gpu, &x16, w, delta, bias, residual, rows, n_in, n_out, y);
    }
    let Wt::F32(w) = w else { return Err(bf16_weight_err("linear_fwd")) };
    let (bp, _rb) = bias.device_ptr(&gpu.stream);
    let rp = residual.map(|r| r.device_ptr(&gpu.stream));
    let res = rp.as_ref().map(|(p, _)| *p);
    let yp = {
        let (p, _r) = y.device_ptr_mut(&gpu.stream);
        p
    };
    // SAFETY: the caller's buffers hold the row-major extents given.
    unsafe { matmul(gpu, false, true, rows, n_out, n_in, OperandType::F32, x, w, res, if delta.is_none() { Some(bp) } else { None }, y)? };
    if let Some(dl) = delta {
        // SAFETY: as above; C = y (in place).
        unsafe { matmul(gpu, false, true, rows, n_out, n_in, OperandType::F32, x, dl, Some(yp), Some(bp), y)? };
    }
    Ok(())
}

/// [`linear_fwd`] in bf16 with the input already in bf16 (`x16: [rows, n_in]`, converted once by the
/// caller and kept for the backward), and `w` in f32 or bf16.
///
/// # Errors
/// `CUDA_ERROR` when cuBLASLt fails; `CUDA_OOM` for the bf16 copies of `W` and `Δ`; `Tensor` when
/// `x16` or a bf16 `w` is short.
#[allow(clippy::too_many_arguments)]
pub fn linear_fwd_bf16x<W: DevicePtr<f32>, Bi: DevicePtr<f32>, R: DevicePtr<f32>, Y: DevicePtrMut<f32>>(
    gpu: &Gpu, x16: &CudaSlice<u16>, w: Wt<'_, W>, delta: Option<&W>, bias: &Bi, residual: Option<&R>, rows: usize, n_in: usize, n_out: usize, y: &mut Y,
) -> Result<(), SnellaError> {
    use crate::gemm_lt::{matmul, OperandType};
    if rows == 0 || n_out == 0 {
        return Ok(());
    }
    let (bp, _rb) = bias.device_ptr(&gpu.stream);
    let rp = residual.map(|r| r.device_ptr(&gpu.stream));
    let res = rp.as_ref().map(|(p, _)| *p);
    let yp = {
        let (p, _r) = y.device_ptr_mut(&gpu.stream);
        p
    };
    if n_in == 0 {
        return Err(SnellaError::config("linear_fwd.n_in", 0, "at least 1 with a bf16 input"));
    }
    crate::ops::reduce::check_len("linear_fwd", "x", x16.len(), rows * n_in)?;
    let w16 = w.bf16(gpu, "linear_fwd", n_out * n_in)?;
    // SAFETY: the converted operands hold the extents given; y holds rows·n_out values.
    unsafe { matmul(gpu, false, true, rows, n_out, n_in, OperandType::Bf16, x16, &*w16, res, if delta.is_none() { Some(bp) } else { None }, y)? };
    if let Some(dl) = delta {
        let d16 = to_bf16(gpu, dl, n_out * n_in)?;
        // SAFETY: as above; C = y (in place).
        unsafe { matmul(gpu, false, true, rows, n_out, n_in, OperandType::Bf16, x16, &d16, Some(yp), Some(bp), y)? };
    }
    Ok(())
}

/// `y16 = x16·Wᵀ + b` written in bf16 (`[rows, n_out]`, `u16` bits) by the GEMM's epilogue, with the
/// bias rounded to bf16 first (as PyTorch's autocast `F.linear` casts it): the output of a linear
/// whose consumers read it in bf16 only (`qkv` for the fused attention, `fc1` for the GELU; session
/// 10), saving the f32 output and its conversion pass. `w` in f32 (converted) or bf16.
///
/// # Errors
/// `CUDA_ERROR` when cuBLASLt fails; `CUDA_OOM` for the bf16 copies of `W` and `b`; `Tensor` when
/// `x16`, a bf16 `w` or `y16` is short, or the bias is not `n_out` long.
#[allow(clippy::too_many_arguments)]
pub fn linear_fwd_bf16_out<W: DevicePtr<f32>>(
    gpu: &Gpu, x16: &CudaSlice<u16>, w: Wt<'_, W>, bias: &cudarc::driver::CudaView<'_, f32>, rows: usize, n_in: usize, n_out: usize, y16: &mut CudaSlice<u16>,
) -> Result<(), SnellaError> {
    use crate::gemm_lt::{matmul, OperandType};
    use crate::ops::reduce::check_len;
    if rows == 0 || n_out == 0 {
        return Ok(());
    }
    if n_in == 0 {
        return Err(SnellaError::config("linear_fwd.n_in", 0, "at least 1 with a bf16 input"));
    }
    check_len("linear_fwd", "x", x16.len(), rows * n_in)?;
    check_len("linear_fwd", "y", y16.len(), rows * n_out)?;
    if bias.len() != n_out {
        return Err(SnellaError::tensor("<device>", "linear_fwd.bias", format!("has {} elements, expected out = {n_out}", bias.len())));
    }
    let w16 = w.bf16(gpu, "linear_fwd", n_out * n_in)?;
    let b16 = to_bf16(gpu, bias, n_out)?;
    let (bp, _rb) = b16.device_ptr(&gpu.stream);
    // SAFETY: x16 holds rows·n_in, w16 n_out·n_in, b16 n_out and y16 rows·n_out values (checked).
    unsafe { matmul(gpu, false, true, rows, n_out, n_in, OperandType::Bf16, x16, &*w16, None, Some(bp), y16) }
}
