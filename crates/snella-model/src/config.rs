//! The ViT configuration, read from a timm-named safetensors checkpoint's metadata.

use snella_core::st::TensorFile;
use snella_core::{Result, SnellaError};

/// Shape of a timm `VisionTransformer` (class token, learned position embedding, pre-norm blocks,
/// final LayerNorm, class-token pooling, linear head).
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct VitConfig {
    /// Input side in pixels (square images).
    pub img_size: usize,
    /// Patch side in pixels.
    pub patch_size: usize,
    /// Input channels (3).
    pub in_chans: usize,
    /// Embedding dimension `D`.
    pub embed_dim: usize,
    /// Number of blocks.
    pub depth: usize,
    /// Attention heads.
    pub num_heads: usize,
    /// MLP hidden size (`mlp_ratio · D`).
    pub mlp_hidden: usize,
    /// Classes of the checkpoint's head.
    pub num_classes: usize,
    /// LayerNorm ε (timm ViT: 1e-6).
    pub ln_eps: f32,
    /// Per-channel normalisation mean (from metadata; ImageNet's by default).
    pub mean: [f32; 3],
    /// Per-channel normalisation std.
    pub std: [f32; 3],
}

impl VitConfig {
    /// Tokens per image: patches plus the class token.
    pub fn tokens(&self) -> usize {
        (self.img_size / self.patch_size).pow(2) + 1
    }
    /// Head dimension `D / heads`.
    pub fn head_dim(&self) -> usize {
        self.embed_dim / self.num_heads
    }

    /// Reads the config from the metadata of a checkpoint, inferring what metadata lacks from the
    /// tensor shapes (`patch_embed.proj.weight`, `pos_embed`, `blocks.*`, `head.weight`).
    ///
    /// # Errors
    /// [`SnellaError::Tensor`] / [`SnellaError::File`] naming the checkpoint when a needed tensor is
    /// missing or the metadata is inconsistent with the tensors.
    pub fn from_file(f: &TensorFile) -> Result<Self> {
        let shape = |n: &str| -> Result<Vec<usize>> {
            f.tensors
                .get(n)
                .map(|t| t.shape.clone())
                .ok_or_else(|| SnellaError::tensor(&f.path, n, "missing; is this a timm VisionTransformer checkpoint?"))
        };
        let pe = shape("patch_embed.proj.weight")?;
        if pe.len() != 4 || pe[2] != pe[3] {
            return Err(SnellaError::tensor(&f.path, "patch_embed.proj.weight", format!("has shape {pe:?}; expected [dim, chans, p, p]")));
        }
        let (embed_dim, in_chans, patch_size) = (pe[0], pe[1], pe[2]);
        let pos = shape("pos_embed")?;
        let tokens = pos.get(1).copied().unwrap_or(0);
        let side = ((tokens.saturating_sub(1)) as f64).sqrt().round() as usize;
        if side * side + 1 != tokens {
            return Err(SnellaError::tensor(&f.path, "pos_embed", format!("has {tokens} tokens; expected a square grid plus a class token")));
        }
        let mut depth = 0;
        while f.tensors.contains_key(&format!("blocks.{depth}.attn.qkv.weight")) {
            depth += 1;
        }
        let fc1 = shape("blocks.0.mlp.fc1.weight")?;
        let head = shape("head.weight")?;
        let num_heads: usize = f.meta("num_heads")?.ok_or_else(|| SnellaError::file(&f.path, "metadata 'num_heads' is missing (cannot be inferred from shapes)"))?;
        if num_heads == 0 || embed_dim % num_heads != 0 {
            return Err(SnellaError::file(&f.path, format!("metadata num_heads = {num_heads} does not divide embed_dim {embed_dim}")));
        }
        let parse3 = |key: &str, default: [f32; 3]| -> Result<[f32; 3]> {
            match f.metadata.get(key) {
                None => Ok(default),
                Some(s) => {
                    let v: Vec<f32> = s.split(',').map(|x| x.trim().parse::<f32>()).collect::<std::result::Result<_, _>>()
                        .map_err(|_| SnellaError::file(&f.path, format!("metadata '{key}' = '{s}' is not three numbers")))?;
                    <[f32; 3]>::try_from(v).map_err(|_| SnellaError::file(&f.path, format!("metadata '{key}' = '{s}' is not three numbers")))
                }
            }
        };
        let cfg = VitConfig {
            img_size: side * patch_size,
            patch_size,
            in_chans,
            embed_dim,
            depth,
            num_heads,
            mlp_hidden: fc1[0],
            num_classes: head[0],
            ln_eps: 1e-6,
            mean: parse3("mean", [0.485, 0.456, 0.406])?,
            std: parse3("std", [0.229, 0.224, 0.225])?,
        };
        if let Some(img) = f.meta::<usize>("img_size")? {
            if img != cfg.img_size {
                return Err(SnellaError::file(&f.path, format!("metadata img_size = {img} but pos_embed implies {}", cfg.img_size)));
            }
        }
        Ok(cfg)
    }
}
