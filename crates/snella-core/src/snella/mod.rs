//! The SNELLA adapter math (spec §1–§3): kernelized merge, exact top-k select, sparsify rules.

pub mod importance;
pub mod merge;
pub mod sparsify;
pub mod topk;
