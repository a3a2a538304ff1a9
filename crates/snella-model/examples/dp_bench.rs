//! Data-parallel scaling benchmark (feature `cuda`): images/s of ViT-B/16 (224 px, 100 classes,
//! random weights) with SNELLA r=32 at s=0.7 on q/k/v/proj/fc1/fc2, at a fixed batch per GPU, on
//! 1, 2, 4, … GPUs of this machine (one process, one worker thread and NCCL rank per GPU), and the
//! scaling efficiency `img/s(n) / (n · img/s(1))`. One JSON document on stdout.
//!
//! `cargo run --release --features cuda -p snella-model --example dp_bench -- [batch_per_gpu=64]
//! [steps=10] [gpus=1,2,4,8 (those that exist)] [precision=bf16|tf32|f32]` (bf16: bf16 GEMM
//! operands with f32 accumulation, the setting; parameters, gradients and AdamW stay f32).
//!
//! The model is written once to a temporary safetensors file (`$TMPDIR`), since the replicas of a
//! data-parallel group load the checkpoint of rank 0.

use snella_core::st::{self, HostTensor};
use snella_cuda::device::Precision;
use snella_model::adapter::uniform;
use snella_model::random_vit::{random_vit, VitShape};
use snella_model::cuda::CudaBackend;
use snella_model::nccl::{cuda_group, nccl_version};
use snella_model::peft::{MethodConfig, MethodKind};
use snella_model::session::Session;
use snella_model::trainer::TrainConfig;
use std::collections::BTreeMap;
use std::time::Instant;

/// Writes a ViT-B/16 with random weights (timm names) to `path`.
fn write_vit_b16(path: &std::path::Path) {
    let f = random_vit(&VitShape::vit_b16(100), 1);
    let tensors: BTreeMap<String, HostTensor> = f.tensors.into_iter().collect();
    let meta: BTreeMap<String, String> = f.metadata.into_iter().collect();
    st::write_atomic(path, &st::serialize(&tensors, &meta), true).expect("write the benchmark model");
}

/// Times `steps` steps on `n` GPUs (after 3 warm-up steps); returns (step ms, images/s).
fn bench(path: &str, n: usize, per_gpu: usize, steps: usize, precision: Precision) -> serde_json::Value {
    let be = CudaBackend::new(0).expect("GPU 0");
    be.gpu.set_precision(precision).unwrap();
    let mut s = Session::load(be.clone(), path).expect("load");
    s.attach(MethodConfig { kind: MethodKind::Snella, rank: 32, heads: 2, s0: 0.7, num_classes: 100, ..MethodConfig::default() }).unwrap();
    let global = per_gpu * n;
    s.prepare(TrainConfig { epochs: 1, steps_per_epoch: 1000, batch_size: global, warmup_epochs: 0, ..TrainConfig::default() }).unwrap();
    let mut g = (n > 1).then(|| cuda_group(&s, &(0..n).collect::<Vec<_>>()).expect("NCCL group"));
    match g.as_mut() {
        Some(g) => g.begin_epoch(&mut s, 0).unwrap(),
        None => s.begin_epoch(0).unwrap(),
    }
    let mut rng = 3u64;
    let images = uniform(global * 3 * 224 * 224, 1.0, &mut rng);
    let labels: Vec<u32> = (0..global as u32).map(|i| i % 100).collect();
    let mut step = |s: &mut Session<CudaBackend>| match g.as_mut() {
        Some(g) => g.step(s, &images, &labels).unwrap(),
        None => s.train_step(&images, &labels).unwrap(),
    };
    for _ in 0..3 {
        step(&mut s);
    }
    be.gpu.sync().unwrap();
    let t = Instant::now();
    for _ in 0..steps {
        step(&mut s);
    }
    be.gpu.sync().unwrap();
    let dt = t.elapsed().as_secs_f64() / steps as f64;
    eprintln!("{n} GPU(s): {:.1} ms/step, {:.1} img/s", dt * 1e3, global as f64 / dt);
    serde_json::json!({ "gpus": n, "global_batch": global, "step_ms": (dt * 1e5).round() / 100.0, "img_per_s": (global as f64 / dt * 10.0).round() / 10.0 })
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let per_gpu: usize = args.get(1).and_then(|a| a.parse().ok()).unwrap_or(64);
    let steps: usize = args.get(2).and_then(|a| a.parse().ok()).unwrap_or(10);
    snella_cuda::probe::probe().expect("CUDA");
    let count = cudarc::driver::result::device::get_count().unwrap() as usize;
    let wanted: Vec<usize> = args.get(3).map(|a| a.split(',').filter_map(|x| x.parse().ok()).collect()).unwrap_or_else(|| vec![1, 2, 4, 8]);
    let list: Vec<usize> = wanted.into_iter().filter(|&n| n >= 1 && n <= count).collect();
    let pname = args.get(4).map(String::as_str).unwrap_or("bf16");
    let precision = match pname {
        "f32" => Precision::F32,
        "tf32" => Precision::Tf32,
        "bf16" => Precision::Bf16,
        p => panic!("precision must be bf16, tf32 or f32, not {p}"),
    };
    let path = std::env::temp_dir().join("snella-dp-bench-vit_b16.safetensors");
    write_vit_b16(&path);
    let path_s = path.display().to_string();
    let device = CudaBackend::new(0).unwrap().gpu.description.clone();
    let runs: Vec<serde_json::Value> = list.iter().map(|&n| bench(&path_s, n, per_gpu, steps, precision)).collect();
    let base = runs.first().and_then(|r| r["img_per_s"].as_f64()).unwrap_or(0.0);
    let runs: Vec<serde_json::Value> = runs
        .into_iter()
        .map(|mut r| {
            let (n, ips) = (r["gpus"].as_f64().unwrap(), r["img_per_s"].as_f64().unwrap());
            r["efficiency"] = serde_json::json!(if base > 0.0 { (ips / (n * base) * 1000.0).round() / 1000.0 } else { 0.0 });
            r
        })
        .collect();
    let _ = std::fs::remove_file(&path);
    let out = serde_json::json!({
        "bench": "data-parallel scaling",
        "model": "vit_base_patch16_224 (random weights), 100 classes",
        "method": "snella r=32 H=2 s=0.7 on q,k,v,proj,fc1,fc2",
        "batch_per_gpu": per_gpu,
        "steps": steps,
        "precision": match precision {
            Precision::Bf16 => "bf16 (bf16 GEMM operands, f32 accumulation; f32 parameters, gradients, AdamW)",
            Precision::Tf32 => "tf32 (f32 storage, TF32 GEMMs)",
            Precision::F32 => "f32",
        },
        "device": device,
        "gpus_on_machine": count,
        "nccl": nccl_version().unwrap_or_else(|e| e.to_string()),
        "nccl_nvls_enable": std::env::var("NCCL_NVLS_ENABLE").unwrap_or_default(),
        "target_efficiency": 0.9,
        "runs": runs,
        "command": format!("dp_bench {per_gpu} {steps} {} {pname}", list.iter().map(|n| n.to_string()).collect::<Vec<_>>().join(",")),
    });
    println!("{}", serde_json::to_string_pretty(&out).unwrap());
}
