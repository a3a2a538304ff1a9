//! Staging the next batch during a step (`Session::train_step_next`) changes when images are
//! uploaded, not results: three SNELLA steps over three different batches give bit-identical
//! parameters, gradients and AdamW moments to `Session::train_step`, and misuse is refused by name.
//! (CPU here; `cuda_step.rs` runs the same comparison on the GPU, where the upload goes through a
//! second stream.)

mod common;

use snella_model::cpu::CpuBackend;
use snella_model::peft::{MethodConfig, MethodKind};
use snella_model::session::Session;
use snella_model::trainer::TrainConfig;

const PER: usize = 3 * 16 * 16;

fn session(micro_batches: usize) -> Session<CpuBackend> {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/golden/tiny_vit.safetensors");
    let mut s = Session::load(CpuBackend, path).unwrap();
    s.attach(MethodConfig { kind: MethodKind::Snella, rank: 4, heads: 2, s0: 0.3, num_classes: 5, seed: 3, ..MethodConfig::default() }).unwrap();
    s.prepare(TrainConfig { epochs: 2, batch_size: 4, steps_per_epoch: 3, warmup_epochs: 0, micro_batches, ..TrainConfig::default() }).unwrap();
    s.begin_epoch(0).unwrap();
    s
}

fn batch(k: u64) -> Vec<f32> {
    snella_core::gradcheck::rand_vec(4 * PER, 20 + k, 1.5).iter().map(|&v| v as f32).collect()
}

const LABELS: [u32; 4] = [0, 3, 2, 4];

#[test]
fn staged_steps_give_bit_identical_training() {
    let xs: Vec<Vec<f32>> = (0..3).map(batch).collect();
    let mut plain = session(1);
    let losses: Vec<f32> = xs.iter().map(|x| plain.train_step(x, &LABELS).unwrap().loss).collect();
    let mut staged = session(1);
    let mut got = Vec::new();
    for (i, x) in xs.iter().enumerate() {
        let here = if i == 0 { Some(&x[..]) } else { None };
        let r = staged.train_step_next(here, &LABELS, xs.get(i + 1).map(|v| &v[..])).unwrap();
        assert_eq!(r.staged, i + 1 < xs.len(), "step {i} staged the next batch");
        got.push(r.loss);
    }
    assert_eq!(losses, got);
    let (a, b) = (common::trainable_state(&mut plain), common::trainable_state(&mut staged));
    assert!(a.len() > 30);
    for (x, y) in a.iter().zip(&b) {
        assert_eq!(x, y, "{} differs when batches are staged", x.0);
    }
}

#[test]
fn staged_step_refuses_misuse_by_name() {
    let mut s = session(1);
    // nothing staged yet
    let e = s.train_step_next(None, &LABELS, None).unwrap_err().to_string();
    assert!(e.contains("images") && e.contains("staged none"), "{e}");
    // `next` must hold whole images
    let e = s.train_step_next(Some(&batch(0)), &LABELS, Some(&batch(1)[..PER + 1])).unwrap_err().to_string();
    assert!(e.contains("<next>") && e.contains(&format!("{}", PER + 1)), "{e}");
    // a staged batch of 4 images cannot train with 3 labels
    assert!(s.train_step_next(Some(&batch(0)), &LABELS, Some(&batch(1))).unwrap().staged);
    let e = s.train_step_next(None, &LABELS[..3], None).unwrap_err().to_string();
    assert!(e.contains("<staged>") && e.contains(&format!("{}", 4 * PER)), "{e}");
    // after a plain step nothing is staged any more
    assert!(s.train_step_next(Some(&batch(0)), &LABELS, Some(&batch(1))).unwrap().staged);
    s.train_step(&batch(1), &LABELS).unwrap();
    assert!(s.train_step_next(None, &LABELS, None).is_err());
    // nor after a new trainer (prepare again), even with the batch still held
    assert!(s.train_step_next(Some(&batch(0)), &LABELS, Some(&batch(1))).unwrap().staged);
    s.prepare(TrainConfig { epochs: 2, batch_size: 4, steps_per_epoch: 3, warmup_epochs: 0, ..TrainConfig::default() }).unwrap();
    let e = s.train_step_next(None, &LABELS, None).unwrap_err().to_string();
    assert!(e.contains("staged none"), "{e}");
}

#[test]
fn micro_batches_train_without_staging() {
    let mut s = session(2);
    let r = s.train_step_next(Some(&batch(0)), &LABELS, Some(&batch(1))).unwrap();
    assert!(!r.staged, "micro-batched steps slice host images: nothing is staged");
    let e = s.train_step_next(None, &LABELS, None).unwrap_err().to_string();
    assert!(e.contains("staged none"), "{e}");
    // the same step as train_step
    let mut p = session(2);
    let a = p.train_step(&batch(0), &LABELS).unwrap();
    assert_eq!(a.loss, r.loss);
}
