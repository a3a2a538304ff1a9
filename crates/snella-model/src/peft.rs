//! Fine-tuning methods: which tensors train and where adapters go (spec §4).

use crate::adapter::{uniform, Delta, KernelAdapter, LoraAdapter};
use crate::backend::Backend;
use crate::vit::Vit;
use snella_core::snella::sparsify::SparsifyRule;
use snella_core::{Result, SnellaError};

/// A fine-tuning method.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MethodKind {
    /// Kernelized merge with mixture, top-k and the allocator (SNELLA).
    Snella,
    /// Kernelized merge without mixture (SNELL); the allocator still runs.
    Snell,
    /// Low-rank adapters (`ΔW = downᵀ·upᵀ`).
    Lora,
    /// Linear probe: head and `cls_token` only.
    Linear,
    /// Full fine-tuning: every tensor.
    Full,
}

impl MethodKind {
    /// Parses `snella | snell | lora | linear | full`.
    ///
    /// # Errors
    /// [`SnellaError::Config`] naming the field `method`.
    pub fn parse(s: &str) -> Result<Self> {
        Ok(match s {
            "snella" => MethodKind::Snella,
            "snell" => MethodKind::Snell,
            "lora" => MethodKind::Lora,
            "linear" => MethodKind::Linear,
            "full" => MethodKind::Full,
            _ => return Err(SnellaError::config("method", s, "one of snella, snell, lora, linear, full")),
        })
    }
    /// Whether the method uses the kernelized merge (and so the allocator).
    pub fn is_kernel(self) -> bool {
        matches!(self, MethodKind::Snella | MethodKind::Snell)
    }
}

/// Parses a sparsify rule name: `magnitude-product | soft-threshold | mask`.
///
/// # Errors
/// [`SnellaError::Config`] naming the field `rule`.
pub fn parse_rule(s: &str) -> Result<SparsifyRule> {
    Ok(match s {
        "magnitude-product" => SparsifyRule::MagnitudeProduct,
        "soft-threshold" => SparsifyRule::SoftThreshold,
        "mask" => SparsifyRule::Mask,
        _ => return Err(SnellaError::config("rule", s, "one of magnitude-product, soft-threshold, mask")),
    })
}

/// The name of a sparsify rule, as parsed by [`parse_rule`].
pub fn rule_name(r: SparsifyRule) -> &'static str {
    match r {
        SparsifyRule::MagnitudeProduct => "magnitude-product",
        SparsifyRule::SoftThreshold => "soft-threshold",
        SparsifyRule::Mask => "mask",
    }
}

/// How to fine-tune: the method and its hyper-parameters.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct MethodConfig {
    /// The method.
    pub kind: MethodKind,
    /// Rank `r` (SNELLA/SNELL/LoRA).
    pub rank: usize,
    /// Kernel pieces `H` (spec §1, default 2).
    pub heads: usize,
    /// Target adapter names or regexes (spec §4); default q, k, v, proj, fc1, fc2 of every block.
    pub targets: Vec<String>,
    /// Initial sparsity `s0` of every kernel adapter.
    pub s0: f64,
    /// Sparsify rule name (see [`parse_rule`]).
    pub rule: String,
    /// Classes of the new head.
    pub num_classes: usize,
    /// Seed of the head and adapter initialisation.
    pub seed: u64,
}

impl Default for MethodConfig {
    fn default() -> Self {
        MethodConfig {
            kind: MethodKind::Snella,
            rank: 8,
            heads: 2,
            targets: ["q", "k", "v", "proj", "fc1", "fc2"].map(String::from).to_vec(),
            s0: 0.01,
            rule: "magnitude-product".into(),
            num_classes: 0,
            seed: 0,
        }
    }
}

/// The adaptable slots of a ViT: `(name, block, which)`, with `which` one of q, k, v, proj, fc1, fc2.
pub fn adaptable_names(depth: usize) -> Vec<(String, usize, &'static str)> {
    let mut v = Vec::new();
    for i in 0..depth {
        for (w, path) in [("q", "attn.q"), ("k", "attn.k"), ("v", "attn.v"), ("proj", "attn.proj"), ("fc1", "mlp.fc1"), ("fc2", "mlp.fc2")] {
            v.push((format!("blocks.{i}.{path}"), i, w));
        }
    }
    v
}

/// Whether `target` selects `name`: exact name, a dotted suffix (`fc1`, `attn.q`, `3.mlp.fc2`), or a
/// regular expression matching the whole name.
pub fn target_matches(target: &str, name: &str) -> bool {
    if name == target || name.ends_with(&format!(".{target}")) {
        return true;
    }
    regex::Regex::new(&format!("^(?:{target})$")).map(|r| r.is_match(name)).unwrap_or(false)
}

/// Applies a method to a freshly loaded model: re-initialises the head for `num_classes` (PyTorch
/// `nn.Linear` default init, seeded), sets what trains (spec §4) and attaches adapters.
///
/// # Errors
/// [`SnellaError::Config`] for a rank that is 0, not divisible by `heads`, or larger than a layer
/// dimension, pieces the backend's merge kernels do not take ([`Backend::check_kernel_pieces`]),
/// `num_classes == 0`, or `s0` outside `[0, 1)`; [`SnellaError::Target`] listing the real
/// names when a target matches nothing.
pub fn attach<B: Backend>(be: &B, vit: &mut Vit<B>, cfg: &MethodConfig) -> Result<()> {
    if cfg.num_classes == 0 {
        return Err(SnellaError::config("numClasses", 0, "an integer ≥ 1"));
    }
    let d = vit.cfg.embed_dim;
    let mut rng = cfg.seed.wrapping_mul(0x2545F4914F6CDD1D) ^ 0x5EED;
    let bound = 1.0 / (d as f64).sqrt();
    let hw = uniform(cfg.num_classes * d, bound, &mut rng);
    let hb = uniform(cfg.num_classes, bound, &mut rng);
    vit.head = crate::linear::Linear::new(be, "head", d, cfg.num_classes, 1, &hw, &hb);
    let full = cfg.kind == MethodKind::Full;
    for p in vit.params_mut() {
        p.set_trainable(be, full);
    }
    vit.cls_token.set_trainable(be, true);
    vit.head.weight.set_trainable(be, true);
    vit.head.bias.set_trainable(be, true);
    if matches!(cfg.kind, MethodKind::Linear | MethodKind::Full) {
        return Ok(());
    }
    let slots = adaptable_names(vit.cfg.depth);
    let min_dim = d.min(vit.cfg.mlp_hidden);
    if cfg.rank == 0 || cfg.rank > min_dim {
        return Err(SnellaError::config("rank", cfg.rank, &format!("an integer in [1, {min_dim}] (the smallest adapted dimension)")));
    }
    if cfg.kind.is_kernel() {
        if cfg.heads == 0 || cfg.rank % cfg.heads != 0 {
            return Err(SnellaError::config("rank", cfg.rank, &format!("a multiple of the kernel pieces H = {}", cfg.heads)));
        }
        if !(0.0..1.0).contains(&cfg.s0) {
            return Err(SnellaError::config("s0", cfg.s0, "a sparsity in [0, 1)"));
        }
        be.check_kernel_pieces(cfg.heads, cfg.rank / cfg.heads)?;
    }
    let rule = parse_rule(&cfg.rule)?;
    for t in &cfg.targets {
        if !slots.iter().any(|(n, _, _)| target_matches(t, n)) {
            let names: Vec<&str> = slots.iter().map(|s| s.0.as_str()).collect();
            let shown = if names.len() > 12 { format!("{} … {} ({} in all)", names[..6].join(", "), names[names.len() - 6..].join(", "), names.len()) } else { names.join(", ") };
            let hint = if t.contains("qkv") { " (the fused qkv is adapted as three targets: q, k, v)" } else { "" };
            return Err(SnellaError::Target { target: t.clone(), available: format!("{shown}{hint}") });
        }
    }
    for (name, bi, which) in slots {
        if !cfg.targets.iter().any(|t| target_matches(t, &name)) {
            continue;
        }
        let blk = &mut vit.blocks[bi];
        let (lin, chunk) = match which {
            "q" => (&mut blk.qkv, 0),
            "k" => (&mut blk.qkv, 1),
            "v" => (&mut blk.qkv, 2),
            "proj" => (&mut blk.proj, 0),
            "fc1" => (&mut blk.fc1, 0),
            _ => (&mut blk.fc2, 0),
        };
        let (n_in, n_out) = (lin.n_in, lin.chunk());
        let delta = match cfg.kind {
            MethodKind::Lora => Delta::Lora(LoraAdapter::new(be, &name, n_in, n_out, cfg.rank, &mut rng)),
            k => Delta::Kernel(KernelAdapter::new(be, &name, n_in, n_out, cfg.rank, cfg.heads, k == MethodKind::Snella, cfg.s0, rule, &mut rng)),
        };
        lin.deltas[chunk] = Some(delta);
    }
    Ok(())
}
