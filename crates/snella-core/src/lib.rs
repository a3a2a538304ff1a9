//! snella-core: shapes, errors, safetensors I/O and the CPU reference of every op.
//!
//! Every op here is a free function over row-major slices, generic over [`Real`] (`f32` for
//! training on the CPU backend, `f64` for finite-difference gradient checks). The CUDA kernels in
//! `kernels/` are tested against these functions.

pub mod error;
pub mod gemm;
pub mod gradcheck;
pub mod ops;
pub mod real;
pub mod snella;
pub mod st;

pub use error::{Result, SnellaError};
pub use real::Real;
