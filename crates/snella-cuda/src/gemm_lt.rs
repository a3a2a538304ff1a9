//! Row-major GEMMs with fused epilogues on cuBLASLt (design.md: "use cuBLASLt epilogues where they
//! fuse"): `D = op(A)·op(B) + C + bias` with the residual `C` and the bias vector added by the GEMM
//! itself instead of two more passes over `D`. Operands are f32 (strict f32 or TF32 compute) or
//! bf16 (f32 accumulation); `C`, `D` and the bias are f32, or bf16 for an output only bf16
//! consumers read (session 10).
//!
//! As in [`crate::gemm`], row-major `D[m,n]` is column-major `Dᵀ[n,m] = op(B)ᵀ·op(A)ᵀ`: cuBLASLt's
//! A is our B and its B our A, and the bias (one value per row of the column-major `D`) is one per
//! column of ours. The matmul descriptors, layouts and the heuristic's algorithm are cached per
//! shape on the [`Lt`] of each [`Gpu`]; the bias pointer is set per call.

use crate::device::{cuda_err, Gpu, Precision};
use cudarc::cublaslt::result as lt;
use cudarc::cublaslt::sys;
use cudarc::driver::{CudaSlice, DevicePtr, DevicePtrMut};
use snella_core::SnellaError;
use std::collections::HashMap;
use std::ffi::c_void;
use std::sync::Mutex;

/// The data type of both GEMM operands.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum OperandType {
    /// f32 operands, multiplied in the device's f32 or TF32 [`Precision`].
    F32,
    /// bf16 operands (as `u16` bits), f32 accumulation.
    Bf16,
}

#[derive(Clone, Copy, PartialEq, Eq, Hash)]
struct Key {
    ta: bool,
    tb: bool,
    m: usize,
    n: usize,
    k: usize,
    ty: OperandType,
    tf32: bool,
    bias: bool,
    /// `D` (and `C`, the bias) in bf16 instead of f32 ([`OutputType`]).
    d16: bool,
    /// Alignment (bytes, a power of two ≤ 256) of the A, B, C and D addresses: the heuristic's
    /// algorithm is only valid for pointers at least this aligned.
    align: [u32; 4],
}

/// The largest power of two ≤ 256 dividing `addr` (cuBLASLt's default assumption is 256).
fn alignment(addr: u64) -> u32 {
    if addr == 0 { 256 } else { (1u64 << addr.trailing_zeros().min(8)) as u32 }
}

/// The cuBLASLt objects of one shape.
struct Plan {
    desc: sys::cublasLtMatmulDesc_t,
    a: sys::cublasLtMatrixLayout_t,
    b: sys::cublasLtMatrixLayout_t,
    c: sys::cublasLtMatrixLayout_t,
    algo: sys::cublasLtMatmulAlgo_t,
}

impl Drop for Plan {
    fn drop(&mut self) {
        // SAFETY: created by this module (null while not created yet) and destroyed once, here.
        unsafe {
            for l in [self.a, self.b, self.c] {
                if !l.is_null() {
                    let _ = lt::destroy_matrix_layout(l);
                }
            }
            if !self.desc.is_null() {
                let _ = lt::destroy_matmul_desc(self.desc);
            }
        }
    }
}

/// A cuBLASLt handle, its workspace (32 MiB) and the plans by shape, for one [`Gpu`].
pub struct Lt {
    handle: sys::cublasLtHandle_t,
    workspace: CudaSlice<u8>,
    plans: Mutex<HashMap<Key, Plan>>,
}

// SAFETY: the raw cuBLASLt handles are used only through `&Lt` under the plans mutex or on the one
// stream of the owning Gpu, whose ops are issued in order.
unsafe impl Send for Lt {}
unsafe impl Sync for Lt {}

const WORKSPACE: usize = 32 << 20;

impl Lt {
    /// Creates the handle and workspace on `gpu`'s stream.
    ///
    /// # Errors
    /// `CUDA_ERROR` when cuBLASLt cannot create a handle; `CUDA_OOM` for the workspace.
    pub fn new(gpu: &Gpu) -> Result<Self, SnellaError> {
        gpu.ctx.bind_to_thread().map_err(|e| cuda_err("binding the CUDA context", e))?;
        // the workspace first: a failed allocation then leaves no handle behind
        // SAFETY: cuBLASLt's workspace needs no initial contents.
        let workspace = unsafe { gpu.uninit::<u8>(WORKSPACE) }?;
        let handle = lt::create_handle().map_err(|e| cuda_err("cublasLtCreate", e))?;
        Ok(Lt { handle, workspace, plans: Mutex::new(HashMap::new()) })
    }
}

impl Drop for Lt {
    fn drop(&mut self) {
        self.plans.lock().map(|mut p| p.clear()).ok();
        // SAFETY: created in `new`, destroyed once.
        unsafe {
            let _ = lt::destroy_handle(self.handle);
        }
    }
}

fn lt_err(what: &str) -> impl Fn(lt::CublasError) -> SnellaError + '_ {
    move |e| cuda_err(what, e)
}

/// Sets one matmul-descriptor attribute.
fn set_desc<T>(desc: sys::cublasLtMatmulDesc_t, attr: sys::cublasLtMatmulDescAttributes_t, v: &T) -> Result<(), SnellaError> {
    // SAFETY: v points at a live value of the attribute's documented type and size.
    unsafe { lt::set_matmul_desc_attribute(desc, attr, v as *const T as *const c_void, std::mem::size_of::<T>()) }.map_err(lt_err("cublasLtMatmulDescSetAttribute"))
}

fn plan(lt_: &Lt, key: Key) -> Result<Plan, SnellaError> {
    use sys::cublasLtMatmulDescAttributes_t as A;
    let ty = match key.ty {
        OperandType::F32 => sys::cudaDataType::CUDA_R_32F,
        OperandType::Bf16 => sys::cudaDataType::CUDA_R_16BF,
    };
    let compute = match (key.ty, key.tf32) {
        (OperandType::F32, true) => sys::cublasComputeType_t::CUBLAS_COMPUTE_32F_FAST_TF32,
        _ => sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
    };
    let (lm, ln, k) = (key.n as u64, key.m as u64, key.k as u64);
    // cuBLASLt's A is our B: [n, k] op'd; its B is our A
    let (a_rows, a_cols, lda) = if key.tb { (k, lm, k) } else { (lm, k, lm) };
    let (b_rows, b_cols, ldb) = if key.ta { (ln, k, ln) } else { (k, ln, k) };
    // built up field by field: on an error, Drop releases what was created so far
    // SAFETY: an all-zero algo is a placeholder, overwritten by the heuristic's before any use.
    let mut p = Plan { desc: std::ptr::null_mut(), a: std::ptr::null_mut(), b: std::ptr::null_mut(), c: std::ptr::null_mut(), algo: unsafe { std::mem::zeroed() } };
    p.desc = lt::create_matmul_desc(compute, sys::cudaDataType::CUDA_R_32F).map_err(lt_err("cublasLtMatmulDescCreate"))?;
    let mk = |t, r, c, ld: u64| lt::create_matrix_layout(t, r, c, ld as i64).map_err(lt_err("cublasLtMatrixLayoutCreate"));
    p.a = mk(ty, a_rows, a_cols, lda)?;
    p.b = mk(ty, b_rows, b_cols, ldb)?;
    let out_ty = if key.d16 { sys::cudaDataType::CUDA_R_16BF } else { sys::cudaDataType::CUDA_R_32F };
    p.c = mk(out_ty, lm, ln, lm)?;
    let (ta, tb) = (key.tb as i32, key.ta as i32);
    set_desc(p.desc, A::CUBLASLT_MATMUL_DESC_TRANSA, &ta)?;
    set_desc(p.desc, A::CUBLASLT_MATMUL_DESC_TRANSB, &tb)?;
    let epi = if key.bias { sys::cublasLtEpilogue_t::CUBLASLT_EPILOGUE_BIAS } else { sys::cublasLtEpilogue_t::CUBLASLT_EPILOGUE_DEFAULT };
    set_desc(p.desc, A::CUBLASLT_MATMUL_DESC_EPILOGUE, &epi)?;
    if key.bias {
        // a bf16 D takes a bf16 bias (CUDA 13's heuristic refused bf16 D with an f32 bias, session 9)
        set_desc(p.desc, A::CUBLASLT_MATMUL_DESC_BIAS_DATA_TYPE, &out_ty)?;
    }
    let pref = lt::create_matmul_pref().map_err(lt_err("cublasLtMatmulPreferenceCreate"))?;
    let ws = WORKSPACE;
    use sys::cublasLtMatmulPreferenceAttributes_t as P;
    // our A is cuBLASLt's B and ours B its A (see the module docs)
    let [al_a, al_b, al_c, al_d] = key.align;
    // SAFETY: pref is live; the attributes are a size_t and four u32.
    let r = unsafe {
        lt::set_matmul_pref_attribute(pref, P::CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &ws as *const usize as *const c_void, std::mem::size_of::<usize>())
            .and_then(|_| lt::set_matmul_pref_attribute(pref, P::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, &al_b as *const u32 as *const c_void, 4))
            .and_then(|_| lt::set_matmul_pref_attribute(pref, P::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES, &al_a as *const u32 as *const c_void, 4))
            .and_then(|_| lt::set_matmul_pref_attribute(pref, P::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, &al_c as *const u32 as *const c_void, 4))
            .and_then(|_| lt::set_matmul_pref_attribute(pref, P::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES, &al_d as *const u32 as *const c_void, 4))
            .and_then(|_| lt::get_matmul_algo_heuristic(lt_.handle, p.desc, p.a, p.b, p.c, p.c, pref))
    };
    // SAFETY: created above, destroyed once.
    unsafe {
        let _ = lt::destroy_matmul_pref(pref);
    }
    let h = r.map_err(lt_err("cublasLtMatmulAlgoGetHeuristic"))?;
    p.algo = h.algo;
    Ok(p)
}

/// Row-major `D[m,n] = op(A)·op(B) + C + bias` (`C: [m,n]` when given — it may be `D` itself —,
/// `bias: [n]` when given; `C`, `D` and the bias of [`OutputType`] `E`: f32, or bf16 as `u16` bits),
/// `A` `[m,k]` (`[k,m]` when `ta`) and `B` `[k,n]` (`[n,k]` when `tb`)
/// of `ty` (bf16 as `u16` bits). f32 operands multiply in the device's precision (strict f32 or
/// TF32). The sum is formed as cuBLASLt's epilogue does: `(op(A)·op(B) + C) + bias`.
///
/// # Errors
/// `CUDA_ERROR` when cuBLASLt fails (no algorithm, launch failure).
///
/// # Safety
/// The buffers must hold the extents given; `C`, when not `D`, must not overlap `D`.
#[allow(clippy::too_many_arguments)]
pub unsafe fn matmul<A: DevicePtr<T>, B: DevicePtr<T>, T, E: OutputType, D: DevicePtrMut<E>>(
    gpu: &Gpu, ta: bool, tb: bool, m: usize, n: usize, k: usize, ty: OperandType, a: &A, b: &B, c: Option<u64>,
    bias: Option<u64>, d: &mut D,
) -> Result<(), SnellaError> {
    if m == 0 || n == 0 {
        return Ok(());
    }
    let (ap, _ra) = a.device_ptr(&gpu.stream);
    let (bp, _rb) = b.device_ptr(&gpu.stream);
    let (dp, _rd) = d.device_ptr_mut(&gpu.stream);
    matmul_ptrs(gpu, ta, tb, m, n, k, ty, ap, bp, c, bias, dp, E::BF16)
}

/// The element type of [`matmul`]'s `C`, `D` and bias: `f32`, or `u16` holding bf16 bits (session
/// 10: a linear's output that only bf16 consumers read — `qkv` for the fused attention, the MLP
/// pre-activation for the GELU — written by the epilogue, the f32 sum rounded once to nearest
/// even, with a bf16 bias as PyTorch's autocast `F.linear` casts it; no f32 copy, no conversion pass).
pub trait OutputType {
    /// Whether the values are bf16.
    const BF16: bool;
}
impl OutputType for f32 {
    const BF16: bool = false;
}
impl OutputType for u16 {
    const BF16: bool = true;
}

/// The cuBLASLt call of [`matmul`] on device addresses (`d16`: `C`, `D` and
/// the bias in bf16).
#[allow(clippy::too_many_arguments)]
unsafe fn matmul_ptrs(
    gpu: &Gpu, ta: bool, tb: bool, m: usize, n: usize, k: usize, ty: OperandType, ap: u64, bp: u64, c: Option<u64>, bias: Option<u64>, dp: u64, d16: bool,
) -> Result<(), SnellaError> {
    let lt_ = gpu.lt()?;
    let (wp, _rw) = lt_.workspace.device_ptr(&gpu.stream);
    let (alpha, beta) = (1.0f32, if c.is_some() { 1.0f32 } else { 0.0 });
    let cp = c.unwrap_or(dp);
    let align = [alignment(ap), alignment(bp), alignment(cp), alignment(dp)];
    let key = Key { ta, tb, m, n, k, ty, tf32: gpu.precision() != Precision::F32, bias: bias.is_some(), d16, align };
    let mut plans = lt_.plans.lock().expect("cuBLASLt plans");
    if !plans.contains_key(&key) {
        let p = plan(lt_, key)?;
        plans.insert(key, p);
    }
    let p = plans.get(&key).expect("plan inserted above");
    if let Some(bias_ptr) = bias {
        set_desc(p.desc, sys::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_BIAS_POINTER, &bias_ptr)?;
    }
    lt::matmul(
        lt_.handle,
        p.desc,
        &alpha as *const f32 as *const c_void,
        &beta as *const f32 as *const c_void,
        bp as *const c_void,
        p.a,
        ap as *const c_void,
        p.b,
        cp as *const c_void,
        p.c,
        dp as *mut c_void,
        p.c,
        &p.algo,
        wp as *mut c_void,
        WORKSPACE,
        gpu.stream.cu_stream() as *mut _,
    )
    .map_err(lt_err("cublasLtMatmul"))
}
