//! snella-model: ViT blocks, adapters (SNELLA, SNELL, LoRA), the allocator, AdamW and the training
//! step, written as explicit layer-level forward/backward over a [`backend::Backend`].

pub mod allocator;
