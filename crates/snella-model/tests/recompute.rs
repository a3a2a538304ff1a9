//! Activation checkpointing (`TrainConfig::recompute`) changes memory, not results: two SNELLA
//! training steps with and without it give bit-identical parameters, gradients and AdamW moments.

mod common;

use snella_model::cpu::CpuBackend;
use snella_model::peft::{MethodConfig, MethodKind};
use snella_model::session::Session;
use snella_model::trainer::TrainConfig;

fn trained(recompute: bool) -> Vec<(String, Vec<f32>, Vec<f32>, Vec<f32>)> {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/golden/tiny_vit.safetensors");
    let mut s = Session::load(CpuBackend, path).unwrap();
    s.attach(MethodConfig { kind: MethodKind::Snella, rank: 4, heads: 2, s0: 0.3, num_classes: 5, seed: 3, ..MethodConfig::default() }).unwrap();
    s.prepare(TrainConfig { epochs: 2, batch_size: 4, steps_per_epoch: 2, warmup_epochs: 0, recompute, ..TrainConfig::default() }).unwrap();
    s.begin_epoch(0).unwrap();
    for k in 0..2u64 {
        let x: Vec<f32> = snella_core::gradcheck::rand_vec(4 * 3 * 16 * 16, 9 + k, 1.5).iter().map(|&v| v as f32).collect();
        s.train_step(&x, &[0, 1, 2, 3]).unwrap();
    }
    common::trainable_state(&mut s)
}

#[test]
fn recompute_gives_bit_identical_training() {
    let (a, b) = (trained(false), trained(true));
    assert_eq!(a.len(), b.len());
    assert!(a.len() > 30);
    for (x, y) in a.iter().zip(&b) {
        assert_eq!(x, y, "{} differs with recompute", x.0);
    }
}
