//! Exact resume: training straight through equals training, saving a checkpoint, loading it into a
//! fresh session and continuing — bit for bit (parameters, AdamW moments, allocator, trainer).
//!
//! The tiny golden ViT (16 px, patch 4, dim 12, depth 2, 5 classes) with SNELLA on every slot,
//! random batches, 2 epochs of 3 steps.

use snella_core::SnellaError;
use snella_model::allocator::AllocatorConfig;
use snella_model::backend::Backend;
use snella_model::checkpoint::{checkpoint_path, ResumePoint};
use snella_model::cpu::CpuBackend;
use snella_model::peft::{MethodConfig, MethodKind};
use snella_model::session::Session;
use snella_model::trainer::{kernel_adapters, TrainConfig};
use std::path::PathBuf;

const EPOCHS: usize = 2;
const SPE: usize = 3;
const BATCH: usize = 4;

fn tiny() -> String {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/golden/tiny_vit.safetensors").display().to_string()
}

fn tmp(tag: &str) -> String {
    let d = std::env::temp_dir().join(format!("snella-ckpt-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d.display().to_string()
}

fn method(kind: MethodKind) -> MethodConfig {
    MethodConfig { kind, rank: 4, heads: 2, s0: 0.1, num_classes: 5, seed: 7, ..MethodConfig::default() }
}

fn train_cfg() -> TrainConfig {
    TrainConfig {
        epochs: EPOCHS,
        batch_size: BATCH,
        steps_per_epoch: SPE,
        lr: 2e-2,
        weight_decay: 0.05,
        warmup_epochs: 1,
        allocator: AllocatorConfig { s0: 0.1, s_t: 0.6, ..AllocatorConfig::default() },
        ..TrainConfig::default()
    }
}

/// The batch of `(epoch, step)`: seeded uniform images in ±2 and labels in 0..5.
fn batch(epoch: usize, step: usize) -> (Vec<f32>, Vec<u32>) {
    let mut s = (epoch as u64) << 32 | step as u64;
    let mut next = || {
        s = s.wrapping_add(0x9E3779B97F4A7C15);
        let mut z = s;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58476D1CE4E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D049BB133111EB);
        z ^ (z >> 31)
    };
    let images = (0..BATCH * 3 * 16 * 16).map(|_| ((next() >> 11) as f64 / (1u64 << 53) as f64 * 4.0 - 2.0) as f32).collect();
    let labels = (0..BATCH).map(|_| (next() % 5) as u32).collect();
    (images, labels)
}

fn fresh(kind: MethodKind) -> Session<CpuBackend> {
    let mut s = Session::load(CpuBackend, &tiny()).unwrap();
    s.attach(method(kind)).unwrap();
    s.prepare(train_cfg()).unwrap();
    s
}

/// Runs the steps of `(epoch, step)` pairs from `from` (inclusive) to `to` (exclusive), calling
/// `begin_epoch` at each epoch's first step, or at `from` when `begin` says so.
fn run(s: &mut Session<CpuBackend>, from: (usize, usize), to: (usize, usize), begin: bool) {
    let (mut e, mut k) = from;
    let mut first = true;
    while (e, k) < to {
        if (first && begin) || (!first && k == 0) {
            s.begin_epoch(e).unwrap();
        }
        first = false;
        let (x, y) = batch(e, k);
        s.train_step(&x, &y).unwrap();
        k += 1;
        if k == SPE {
            e += 1;
            k = 0;
        }
    }
}

/// Everything that must match bit for bit, as `(name, bits)`.
fn state(s: &mut Session<CpuBackend>) -> Vec<(String, Vec<u32>)> {
    let be = s.be;
    let mut out = Vec::new();
    for p in s.vit.params_mut() {
        if let Some(t) = &p.train {
            out.push((p.name.clone(), be.download(&p.value).iter().map(|v| v.to_bits()).collect()));
            out.push((format!("{} m", p.name), be.download(&t.m).iter().map(|v| v.to_bits()).collect()));
            out.push((format!("{} v", p.name), be.download(&t.v).iter().map(|v| v.to_bits()).collect()));
        }
    }
    for k in kernel_adapters(&s.vit) {
        out.push((format!("{} sparsity", k.name), vec![k.sparsity.to_bits() as u32, (k.sparsity.to_bits() >> 32) as u32]));
    }
    out
}

fn assert_same(a: &mut Session<CpuBackend>, b: &mut Session<CpuBackend>) {
    // The allocator's EMAs live on the backend during training; bring the host copies up to date.
    a.pull_importance();
    b.pull_importance();
    let (sa, sb) = (state(a), state(b));
    assert_eq!(sa.len(), sb.len());
    for ((na, va), (nb, vb)) in sa.iter().zip(&sb) {
        assert_eq!(na, nb);
        assert!(va == vb, "{na} differs after resume");
    }
    let (ta, tb) = (a.trainer.as_ref().unwrap(), b.trainer.as_ref().unwrap());
    assert_eq!((ta.step, ta.epoch), (tb.step, tb.epoch));
    assert_eq!(ta.cfg, tb.cfg);
    // Allocator: schedule, sparsities, history, events and every EMA element (PartialEq on f32/f64).
    assert_eq!(ta.allocator, tb.allocator);
    let ser = |t: &snella_model::trainer::Trainer| serde_json::to_string(&t.allocator).unwrap();
    assert_eq!(ser(ta), ser(tb), "allocator JSON");
}

#[test]
fn epoch_boundary_resume_is_bit_exact() {
    for kind in [MethodKind::Snella, MethodKind::Lora] {
        let mut straight = fresh(kind);
        run(&mut straight, (0, 0), (EPOCHS, 0), true);

        let dir = tmp(&format!("epoch-{kind:?}"));
        let mut first = fresh(kind);
        run(&mut first, (0, 0), (1, 0), true);
        first.save_checkpoint(&dir, false).unwrap();
        drop(first);

        // A fresh session without a method: the checkpoint attaches it.
        let mut resumed = Session::load(CpuBackend, &tiny()).unwrap();
        let info = resumed.load_checkpoint(&dir).unwrap();
        assert_eq!(info.resume, ResumePoint { epoch: 1, batch: 0, begin_epoch: true, step: SPE as u64, finished: false });
        run(&mut resumed, (info.resume.epoch, info.resume.batch), (EPOCHS, 0), info.resume.begin_epoch);
        assert_same(&mut straight, &mut resumed);
        let _ = std::fs::remove_dir_all(&dir);
    }
}

#[test]
fn mid_epoch_resume_into_a_prepared_session_is_bit_exact() {
    let mut straight = fresh(MethodKind::Snella);
    run(&mut straight, (0, 0), (EPOCHS, 0), true);

    let dir = tmp("mid");
    let mut first = fresh(MethodKind::Snella);
    run(&mut first, (0, 0), (1, 2), true); // stopped after epoch 1's second step
    first.save_checkpoint_with(&dir, false, serde_json::json!({ "seed": 3 })).unwrap();

    let mut resumed = fresh(MethodKind::Snella); // attached and prepared with the same settings
    let info = resumed.load_checkpoint(&dir).unwrap();
    assert_eq!(info.resume, ResumePoint { epoch: 1, batch: 2, begin_epoch: false, step: 5, finished: false });
    assert_eq!(info.extra, serde_json::json!({ "seed": 3 }));
    run(&mut resumed, (1, 2), (EPOCHS, 0), info.resume.begin_epoch);
    assert_same(&mut straight, &mut resumed);

    // At the end: a finished resume point.
    resumed.save_checkpoint(&dir, true).unwrap();
    let mut done = Session::load(CpuBackend, &tiny()).unwrap();
    let info = done.load_checkpoint(&dir).unwrap();
    assert!(info.resume.finished && info.resume.epoch == EPOCHS && !info.resume.begin_epoch, "{:?}", info.resume);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn naive_resume_without_moments_or_allocator_differs() {
    // The test above is meaningful: restoring only the parameters (as an adapter does) is not exact.
    let mut straight = fresh(MethodKind::Snella);
    run(&mut straight, (0, 0), (EPOCHS, 0), true);
    let dir = tmp("naive");
    let mut first = fresh(MethodKind::Snella);
    run(&mut first, (0, 0), (1, 0), true);
    first.save_adapter(&dir, false).unwrap();
    let mut resumed = fresh(MethodKind::Snella);
    resumed.load_adapter(&dir).unwrap();
    resumed.prepare(train_cfg()).unwrap();
    resumed.trainer.as_mut().unwrap().step = SPE as u64;
    run(&mut resumed, (1, 0), (EPOCHS, 0), true);
    assert_ne!(state(&mut straight), state(&mut resumed));
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn checkpoints_refuse_overwrite_and_mismatched_settings() {
    let dir = tmp("refuse");
    let mut s = fresh(MethodKind::Snella);
    run(&mut s, (0, 0), (0, 1), true);
    s.save_checkpoint(&dir, false).unwrap();
    let before = std::fs::read(checkpoint_path(&dir)).unwrap();
    run(&mut s, (0, 1), (0, 2), false);
    let e = s.save_checkpoint(&dir, false).unwrap_err().to_string();
    assert!(e.contains("already exists") && e.contains("checkpoint.safetensors"), "{e}");
    assert_eq!(std::fs::read(checkpoint_path(&dir)).unwrap(), before, "not overwritten");

    // Another learning rate in the prepared session: the error names the field.
    let mut other = Session::load(CpuBackend, &tiny()).unwrap();
    other.attach(method(MethodKind::Snella)).unwrap();
    other.prepare(TrainConfig { lr: 1e-3, ..train_cfg() }).unwrap();
    let e = other.load_checkpoint(&dir).unwrap_err();
    assert!(matches!(&e, SnellaError::Config { field, .. } if field == "train.lr"), "{e}");
    // Another method config.
    let mut other = Session::load(CpuBackend, &tiny()).unwrap();
    other.attach(MethodConfig { rank: 2, ..method(MethodKind::Snella) }).unwrap();
    let e = other.load_checkpoint(&dir).unwrap_err();
    assert!(matches!(&e, SnellaError::Config { field, .. } if field == "method.rank"), "{e}");
    // Other base weights of the same shape.
    let mut other = Session::load(CpuBackend, &tiny()).unwrap();
    let be = other.be;
    for p in other.vit.params_mut() {
        if p.name == "blocks.1.mlp.fc2.weight" {
            let mut w = be.download(&p.value);
            w[0] += 1.0;
            p.value = be.upload(&w);
        }
    }
    let e = other.load_checkpoint(&dir).unwrap_err().to_string();
    assert!(e.contains("other base weights") && e.contains("checkpoint.safetensors"), "{e}");
    // A missing checkpoint names the file.
    let e = Session::load(CpuBackend, &tiny()).unwrap().load_checkpoint("/nonexistent/ckpt").unwrap_err().to_string();
    assert!(e.contains("/nonexistent/ckpt/checkpoint.safetensors"), "{e}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_non_finite_state_is_never_saved() {
    let dir = tmp("nan");
    let mut s = fresh(MethodKind::Snella);
    run(&mut s, (0, 0), (0, 1), true);
    s.save_checkpoint(&dir, false).unwrap();
    let good = std::fs::read(checkpoint_path(&dir)).unwrap();
    // An enormous learning rate: finite gradients, non-finite parameters after the update.
    s.trainer.as_mut().unwrap().cfg.lr = 1e39;
    let (x, y) = batch(0, 1);
    let e = s.train_step(&x, &y).unwrap_err();
    match &e {
        SnellaError::NonFinite { tensor, step } => {
            assert!(tensor.ends_with("(after the update)"), "{tensor}");
            assert_eq!(*step, 2);
        }
        other => panic!("expected NonFinite, got {other}"),
    }
    let e = s.save_checkpoint(&dir, true).unwrap_err();
    assert!(matches!(e, SnellaError::NonFinite { .. }), "{e}");
    assert_eq!(std::fs::read(checkpoint_path(&dir)).unwrap(), good, "the good checkpoint is kept");
    let mut back = Session::load(CpuBackend, &tiny()).unwrap();
    assert_eq!(back.load_checkpoint(&dir).unwrap().resume.step, 1);
    let _ = std::fs::remove_dir_all(&dir);
}
