//! snella-model: ViT blocks, adapters (SNELLA, SNELL, LoRA), the allocator, AdamW and the training
//! step, written as explicit layer-level forward/backward over a [`backend::Backend`].

pub mod adapter;
pub mod allocator;
pub mod backend;
pub mod checkpoint;
pub mod comm;
pub mod config;
pub mod cpu;
pub mod dp;
#[cfg(feature = "cuda")]
pub mod cuda;
pub mod linear;
#[cfg(feature = "cuda")]
pub mod nccl;
pub mod param;
pub mod peft;
pub mod random_vit;
pub mod rendezvous;
pub mod resources;
pub mod session;
pub mod trainer;
pub mod vit;
