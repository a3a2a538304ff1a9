//! Golden parity with an independent PyTorch implementation (`scripts/golden/make_golden.py`).
//!
//! On a tiny timm ViT (`tests/golden/tiny_vit.safetensors`: 16 px, patch 4, dim 12, depth 2,
//! 2 heads, 5 classes) with SNELLA adapters on q, k, v, proj, fc1, fc2 of both blocks (r = 4,
//! H = 2, s = 0.3, magnitude-product, α/γ/β = 0.7/1.3/0.05, large random A and B), and a fixed
//! batch of 3 images, compares with `tests/golden/snella_step.safetensors`:
//! the sparsified `ΔW` of every adapter, the logits, the loss, the gradient of every trainable
//! tensor, and every trainable tensor after one AdamW step.
//!
//! Error measure, per tensor: `rel = max_i |ours_i − golden_i| / max(max_i |golden_i|, 1e-6)`,
//! i.e. the largest absolute deviation relative to the tensor's largest golden magnitude. Every
//! compared tensor must have `rel ≤ 1e-4` (float32 on both sides).
//!
//! The golden files are committed; this test fails (it does not skip) when they are missing.
//! Regenerate them with `CUDA_VISIBLE_DEVICES= python3 scripts/golden/make_golden.py --out
//! crates/snella-model/tests/golden` (needs torch, timm, safetensors).

use snella_core::st::{self, TensorFile};
use snella_model::allocator::AllocatorConfig;
use snella_model::backend::Backend;
use snella_model::cpu::CpuBackend;
use snella_model::peft::{MethodConfig, MethodKind};
use snella_model::session::Session;
use snella_model::trainer::{kernel_adapters, TrainConfig};
use std::collections::BTreeSet;
use std::path::PathBuf;

const TOL: f64 = 1e-4;
const LR: f64 = 1e-2;
const SPARSITY: f64 = 0.3;
const BATCH: usize = 3;

fn golden_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests").join("golden")
}

fn golden_path(name: &str) -> String {
    let p = golden_dir().join(name);
    assert!(
        p.is_file(),
        "golden file {} is missing: regenerate it with scripts/golden/make_golden.py (see this test's header)",
        p.display()
    );
    p.display().to_string()
}

/// `max|a − b| / max(max|b|, 1e-6)` (see the module docs).
fn rel_err(a: &[f32], b: &[f32]) -> f64 {
    assert_eq!(a.len(), b.len(), "length mismatch");
    let scale = b.iter().fold(0f64, |m, &v| m.max((v as f64).abs())).max(1e-6);
    let diff = a.iter().zip(b).fold(0f64, |m, (&x, &y)| {
        let d = (x as f64 - y as f64).abs();
        if d.is_nan() { f64::INFINITY } else { m.max(d) }
    });
    diff / scale
}

fn get<'a>(f: &'a TensorFile, name: &str) -> &'a [f32] {
    &f.tensors.get(name).unwrap_or_else(|| panic!("golden tensor '{name}' is missing from {}", f.path)).data
}

/// Collects comparisons; reports all of them, and fails at the end listing the offenders.
#[derive(Default)]
struct Report {
    rows: Vec<(String, f64)>,
}

impl Report {
    fn check(&mut self, what: &str, ours: &[f32], golden: &[f32]) {
        self.rows.push((what.to_string(), rel_err(ours, golden)));
    }
    /// The largest error per group (the text before the first ':').
    fn summary(&self) -> Vec<(String, f64, String)> {
        let mut out: Vec<(String, f64, String)> = Vec::new();
        for (name, e) in &self.rows {
            let g = name.split(':').next().unwrap_or(name).to_string();
            match out.iter_mut().find(|r| r.0 == g) {
                Some(r) if *e > r.1 || e.is_nan() => {
                    r.1 = *e;
                    r.2 = name.clone();
                }
                Some(_) => {}
                None => out.push((g, *e, name.clone())),
            }
        }
        out
    }
    fn finish(self) {
        for (g, e, worst) in self.summary() {
            println!("max rel err {g:<24} {e:.3e}  ({worst})");
        }
        let bad: Vec<String> = self.rows.iter().filter(|(_, e)| e.is_nan() || *e > TOL).map(|(n, e)| format!("{n}: {e:.3e}")).collect();
        assert!(bad.is_empty(), "{} of {} comparisons exceed rel err {TOL:e}:\n  {}", bad.len(), self.rows.len(), bad.join("\n  "));
    }
}

#[test]
fn golden_parity_with_pytorch() {
    let vit_path = golden_path("tiny_vit.safetensors");
    let gold = st::read(golden_path("snella_step.safetensors")).expect("read golden step file");
    assert_eq!(get(&gold, "sparsity"), &[SPARSITY as f32], "golden sparsity");

    let be = CpuBackend;
    let mut session = Session::load(be, &vit_path).expect("load tiny ViT");
    session
        .attach(MethodConfig {
            kind: MethodKind::Snella,
            rank: 4,
            heads: 2,
            targets: MethodConfig::default().targets,
            s0: SPARSITY,
            rule: "magnitude-product".into(),
            num_classes: 5,
            seed: 0,
        })
        .expect("attach SNELLA");

    // Overwrite every trainable tensor with the golden value (attach re-initialised the head).
    let golden_names: BTreeSet<String> =
        gold.tensors.keys().filter_map(|k| k.strip_prefix("param.")).map(String::from).collect();
    let mut ours_names = BTreeSet::new();
    for p in session.vit.params_mut() {
        if p.train.is_none() {
            continue;
        }
        ours_names.insert(p.name.clone());
        let t = gold.tensors.get(&format!("param.{}", p.name)).unwrap_or_else(|| panic!("golden lacks param.{}", p.name));
        assert_eq!(t.shape, p.shape, "shape of {}", p.name);
        p.value = be.upload(&t.data);
    }
    assert_eq!(ours_names, golden_names, "trainable tensors differ from the golden file's");
    assert_eq!(ours_names.len(), 12 * 3 + 3);

    let images = get(&gold, "images").to_vec();
    let labels: Vec<u32> = get(&gold, "labels").iter().map(|&l| l as u32).collect();
    assert_eq!(labels.len(), BATCH);

    session
        .prepare(TrainConfig {
            epochs: 1,
            batch_size: BATCH,
            steps_per_epoch: 1,
            lr: LR,
            weight_decay: 0.05,
            warmup_epochs: 0,
            allocator: AllocatorConfig { s0: SPARSITY, s_t: SPARSITY, ..Default::default() },
            ..Default::default()
        })
        .expect("prepare");
    session.begin_epoch(0).expect("begin epoch 0");
    // One step in all, no warm-up: the cosine schedule gives exactly the peak lr at step 0.
    assert_eq!(session.trainer.as_ref().unwrap().lr_at(0), LR, "lr at step 0");
    for k in kernel_adapters(&session.vit) {
        assert_eq!(k.sparsity, SPARSITY, "sparsity of {}", k.name);
        assert_eq!(k.kept(), k.numel() - (SPARSITY * k.numel() as f64).floor() as usize);
    }

    let mut r = Report::default();

    // ΔW of every adapter (the kernelized merge, mixture, top-k and magnitude-product rule).
    for k in kernel_adapters(&session.vit) {
        let dw = be.download(&k.delta(&be));
        r.check(&format!("dw:{}", k.name), &dw, get(&gold, &format!("dw.{}", k.name)));
    }

    // Forward logits.
    let logits = session.predict(&images, BATCH).expect("predict");
    r.check("logits", &logits, get(&gold, "logits"));

    // One training step: loss, gradients, AdamW.
    let stats = session.train_step(&images, &labels).expect("train step");
    assert_eq!(stats.lr, LR, "lr used by the step");
    r.check("loss", &[stats.loss], get(&gold, "loss"));
    let mut n_grad = 0;
    for p in session.vit.params_mut() {
        let Some(t) = p.train.as_ref() else { continue };
        let kind = p.name.rsplit('.').next().unwrap_or(&p.name).to_string();
        r.check(&format!("grad.{kind}:{}", p.name), &be.download(&t.grad), get(&gold, &format!("grad.{}", p.name)));
        r.check(&format!("after.{kind}:{}", p.name), &be.download(&p.value), get(&gold, &format!("after.{}", p.name)));
        n_grad += 1;
    }
    assert_eq!(n_grad, golden_names.len());
    r.finish();
}
