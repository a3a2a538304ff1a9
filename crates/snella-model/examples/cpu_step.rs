//! CPU training-step throughput: ViT-Tiny (64 px, patch 8) with SNELLA r=8 on q/k/v/proj/fc1/fc2,
//! batch 64 by default. Prints one JSON line with images/s (median of the timed steps).
//!
//! `cargo run --release -p snella-model --example cpu_step -- [checkpoint] [batch] [steps] [method]`

use snella_model::cpu::CpuBackend;
use snella_model::peft::{MethodConfig, MethodKind};
use snella_model::session::Session;
use snella_model::trainer::TrainConfig;
use std::time::Instant;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let ckpt = args.get(1).cloned().unwrap_or_else(|| "assets/models/vit_tiny_patch8_64.safetensors".into());
    let batch: usize = args.get(2).and_then(|s| s.parse().ok()).unwrap_or(64);
    let steps: usize = args.get(3).and_then(|s| s.parse().ok()).unwrap_or(5);
    let method = args.get(4).cloned().unwrap_or_else(|| "snella".into());
    let mut s = Session::load(CpuBackend, &ckpt).expect("checkpoint");
    let kind = MethodKind::parse(&method).expect("method");
    s.attach(MethodConfig { kind, num_classes: 102, ..MethodConfig::default() }).expect("attach");
    s.prepare(TrainConfig { epochs: 10, steps_per_epoch: 100, batch_size: batch, ..TrainConfig::default() }).expect("prepare");
    s.begin_epoch(0).expect("epoch");
    let c = s.vit.cfg.clone();
    let n = batch * c.in_chans * c.img_size * c.img_size;
    let images: Vec<f32> = (0..n).map(|i| ((i * 7919 % 1000) as f32 / 500.0) - 1.0).collect();
    let labels: Vec<u32> = (0..batch as u32).map(|i| i % 102).collect();
    s.train_step(&images, &labels).expect("warm-up step");
    let mut times = Vec::new();
    for _ in 0..steps {
        let t = Instant::now();
        s.train_step(&images, &labels).expect("step");
        times.push(t.elapsed().as_secs_f64());
    }
    times.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let med = times[times.len() / 2];
    println!(
        "{{\"bench\":\"cpu_train_step\",\"model\":\"{}\",\"method\":\"{method}\",\"batch\":{batch},\"threads\":{},\"step_ms\":{:.1},\"img_per_s\":{:.2}}}",
        ckpt.rsplit('/').next().unwrap_or(&ckpt),
        rayon::current_num_threads(),
        med * 1e3,
        batch as f64 / med
    );
}
