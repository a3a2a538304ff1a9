//! A ViT with random weights under timm's tensor names, for benchmarks and tests that need a model
//! of a given shape but not a trained checkpoint (the GPU step benchmark's ViT-B/16, a head-dim-64
//! model for the fused-attention step test).

use crate::adapter::uniform;
use snella_core::st::{HostTensor, TensorFile};
use std::collections::BTreeMap;

/// The shape of a random ViT ([`random_vit`]).
#[derive(Clone, Debug)]
pub struct VitShape {
    /// Input side in pixels.
    pub img_size: usize,
    /// Patch side in pixels.
    pub patch_size: usize,
    /// Embedding dimension `D`.
    pub embed_dim: usize,
    /// Blocks.
    pub depth: usize,
    /// Attention heads (`D / heads` is the head dim).
    pub num_heads: usize,
    /// MLP hidden size.
    pub mlp_hidden: usize,
    /// Classes of the head.
    pub num_classes: usize,
    /// Weight matrices, the class token and the position embedding are drawn from
    /// `U(±init_bound)` (0.02: timm's init scale); biases are 0, LayerNorm weights 1.
    pub init_bound: f64,
}

impl VitShape {
    /// ViT-B/16 at 224 px (`vit_base_patch16_224`: D 768, 12 blocks, 12 heads, MLP 3072) with
    /// `num_classes` classes and timm's init scale.
    pub fn vit_b16(num_classes: usize) -> Self {
        VitShape { img_size: 224, patch_size: 16, embed_dim: 768, depth: 12, num_heads: 12, mlp_hidden: 3072, num_classes, init_bound: 0.02 }
    }
}

/// The tensors of a ViT of `shape` (timm names, f32) from a seeded SplitMix64 stream (the same
/// `seed` gives the same weights), with `num_heads` in the metadata, as [`TensorFile`] named
/// `<random ...>`; load it with `Vit::from_file` or serialise it with `snella_core::st::serialize`.
pub fn random_vit(shape: &VitShape, seed: u64) -> TensorFile {
    let VitShape { img_size, patch_size: p, embed_dim: d, depth, num_heads, mlp_hidden: mlp, num_classes: c, init_bound } = *shape;
    let t = (img_size / p).pow(2) + 1;
    let mut rng = seed;
    let mut tensors = BTreeMap::new();
    let mut put = |name: String, shape: Vec<usize>, random: bool, rng: &mut u64| {
        let n: usize = shape.iter().product();
        let data = if random {
            uniform(n, init_bound, rng)
        } else if name.contains("norm") && name.ends_with("weight") {
            vec![1.0; n]
        } else {
            vec![0.0; n]
        };
        tensors.insert(name, HostTensor::new(shape, data));
    };
    put("patch_embed.proj.weight".into(), vec![d, 3, p, p], true, &mut rng);
    put("patch_embed.proj.bias".into(), vec![d], false, &mut rng);
    put("cls_token".into(), vec![1, 1, d], true, &mut rng);
    put("pos_embed".into(), vec![1, t, d], true, &mut rng);
    for i in 0..depth {
        for n in ["norm1", "norm2"] {
            put(format!("blocks.{i}.{n}.weight"), vec![d], false, &mut rng);
            put(format!("blocks.{i}.{n}.bias"), vec![d], false, &mut rng);
        }
        for (n, o, inn) in [("attn.qkv", 3 * d, d), ("attn.proj", d, d), ("mlp.fc1", mlp, d), ("mlp.fc2", d, mlp)] {
            put(format!("blocks.{i}.{n}.weight"), vec![o, inn], true, &mut rng);
            put(format!("blocks.{i}.{n}.bias"), vec![o], false, &mut rng);
        }
    }
    put("norm.weight".into(), vec![d], false, &mut rng);
    put("norm.bias".into(), vec![d], false, &mut rng);
    put("head.weight".into(), vec![c, d], true, &mut rng);
    put("head.bias".into(), vec![c], false, &mut rng);
    TensorFile {
        path: format!("<random ViT D{d} depth {depth} heads {num_heads} {img_size}px/{p}>"),
        tensors: tensors.into_iter().collect(),
        metadata: [("num_heads".to_string(), num_heads.to_string())].into_iter().collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpu::CpuBackend;
    use crate::vit::Vit;

    #[test]
    fn random_vit_loads_with_its_shape_and_is_seeded() {
        let shape = VitShape { img_size: 32, patch_size: 16, embed_dim: 128, depth: 2, num_heads: 2, mlp_hidden: 256, num_classes: 5, init_bound: 0.5 };
        let f = random_vit(&shape, 9);
        assert_eq!(f.tensors.len(), 4 + 2 * 12 + 4);
        let w = &f.tensors["blocks.1.mlp.fc2.weight"];
        assert_eq!(w.shape, vec![128, 256]);
        assert!(w.data.iter().all(|v| v.abs() <= 0.5) && w.data.iter().any(|v| v.abs() > 0.25));
        assert!(f.tensors["blocks.0.norm1.weight"].data.iter().all(|&v| v == 1.0));
        assert!(f.tensors["head.bias"].data.iter().all(|&v| v == 0.0));
        assert_eq!(random_vit(&shape, 9).tensors["pos_embed"].data, f.tensors["pos_embed"].data);
        assert_ne!(random_vit(&shape, 10).tensors["pos_embed"].data, f.tensors["pos_embed"].data);
        let vit = Vit::from_file(&CpuBackend, f).unwrap();
        assert_eq!((vit.cfg.tokens(), vit.cfg.head_dim(), vit.cfg.num_classes), (5, 64, 5));
    }
}
