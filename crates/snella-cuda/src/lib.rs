//! snella-cuda: the CUDA backend's device layer (cudarc sys → result → safe, as cudarc layers it).
//!
//! - [`probe`] checks that the driver (CUDA 13.0 / driver ≥ 580), cuBLAS and cuBLASLt can be loaded,
//!   before any other CUDA call, and turns every failure into a typed
//!   [`snella_core::SnellaError::Device`] (`CUDA_UNAVAILABLE`) naming the library and paths tried.
//!   cudarc panics on a missing library, so nothing here calls it before [`probe`] succeeded.
//! - [`device::Gpu`] holds the context, stream, cuBLAS handle and the kernels of the embedded fatbin.
//! - [`gemm`] is the row-major GEMM on cuBLAS, [`gemm_lt`] the GEMMs with fused bias/residual
//!   epilogues on cuBLASLt; [`ops`] the safe launchers of `kernels/*.cu`.

pub mod beside;
pub mod device;
pub mod gemm;
pub mod gemm_lt;
pub mod ops;
pub mod probe;

pub use device::Gpu;
