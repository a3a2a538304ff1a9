//! CPU reference ops for a ViT training step: forward and backward of each layer, row-major.
//!
//! Each file holds one op family with its forward and backward; each backward is checked by
//! finite differences in f64 in that file's tests.

pub mod adamw;
pub mod attention;
pub mod cross_entropy;
pub mod gelu;
pub mod layernorm;
pub mod linear;
pub mod patch;
