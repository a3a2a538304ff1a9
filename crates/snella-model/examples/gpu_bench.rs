//! GPU benchmarks (feature `cuda`), one JSON document on stdout:
//! - `merge`: merge + top-k + sparsify forward and backward of one SNELLA adapter, r=32, s=0.7, for
//!   768×768, 768×3072, 3072×768, 1024×4096 (the PyTorch composite is timed by
//!   `ref_snella.py merge` in the same run, see scripts/gpu/run-all.sh);
//! - `vit_b16_step`: a whole training step of ViT-B/16 at 224 px, 100 classes, random weights,
//!   SNELLA r=32 on q/k/v/proj/fc1/fc2 at s=0.7, at the given batch;
//! - `methods_b8`: LoRA r=32, SNELLA and full fine-tuning at batch 8.
//!
//! `cargo run --release --features cuda -p snella-model --example gpu_bench -- [batch] [steps] [profile|merge|quick]`
//! (`profile`: only the per-op device-time breakdown of one SNELLA and one full step, bf16;
//! `merge`: only the merge timings; `quick`: only the bf16 SNELLA, recompute and full steps).
//! Each step reports `peak_mib` (all device memory the run holds: context, kernels, cuBLAS and the
//! tensors) and `peak_tensor_mib` (the tensors alone, the memory pool's high-water mark: what
//! PyTorch's `max_memory_allocated`, the reference's figure, measures).
//! The headline `vit_b16_step.ours` is bf16 (bf16 GEMM operands, f32 accumulation, f32 tensors);
//! TF32 and strict f32 follow, then recompute, full fine-tuning and LoRA in bf16.

use snella_core::snella::sparsify::SparsifyRule;
use snella_core::snella::topk::kept_count;
use snella_model::adapter::uniform;
use snella_model::random_vit::{random_vit, VitShape};
use snella_model::backend::Backend;
use snella_model::cuda::CudaBackend;
use snella_cuda::device::Precision;
use snella_model::peft::{MethodConfig, MethodKind};
use snella_model::session::Session;
use snella_model::trainer::TrainConfig;
use snella_model::vit::Vit;
use std::time::Instant;

fn merge_ms(be: &CudaBackend, n_in: usize, n_out: usize, iters: usize) -> f64 {
    let (h, rh) = (2, 16);
    let mut rng = 7u64;
    let a = be.upload(&uniform(h * n_in * rh, 0.5, &mut rng));
    let b = be.upload(&uniform(h * n_out * rh, 0.5, &mut rng));
    let mix = be.upload(&[1.0, 1.0, 0.0]);
    let n = n_in * n_out;
    let k = kept_count(n, 0.7);
    let (mut m, mut dw, mut gh) = (be.zeros(n), be.zeros(n), be.zeros(n));
    let g = be.upload(&vec![1.0; n]);
    let (mut da, mut db, mut dmix) = (be.zeros(h * n_in * rh), be.zeros(h * n_out * rh), be.zeros(3));
    let mut run = || {
        // merge and top-k as the training step makes them (one call: the select's first histogram
        // comes from the merge's softmax pass)
        let kept = be.merge_fwd_select(&a, &b, h, n_in, n_out, rh, Some(&mix), &mut m, k);
        be.sparsify_fwd(&m, &kept, SparsifyRule::MagnitudeProduct, &mut dw);
        // backward recomputes M ("recover in backward", keeping K and the distances for the merge
        // backward) and reuses the forward's kept set (same A, B and k: the same set), as the
        // training step does; composed (SNELLA_ADAPTER_BWD=composed), the sparsify rule runs as its
        // own pass here (the step fuses it into the weight-gradient transpose)
        if be.fused_adapter_bwd() {
            // session 9: the step's fused form (M, Ĝ and ∂L/∂K in one row pass from G, K and D)
            be.adapter_bwd_from_grad(&g, 0, n_out, &kept, SparsifyRule::MagnitudeProduct, &a, &b, h, n_in, n_out, rh, Some(&mix), &mut da, &mut db, Some(&mut dmix));
        } else {
            let saved = be.merge_fwd_saving(&a, &b, h, n_in, n_out, rh, Some(&mix), &mut m);
            be.sparsify_bwd(&m, &kept, SparsifyRule::MagnitudeProduct, &g, &mut gh);
            be.merge_bwd_saved(saved.as_ref(), &a, &b, h, n_in, n_out, rh, Some(&mix), &gh, &mut da, &mut db, Some(&mut dmix));
        }
    };
    for _ in 0..5 {
        run();
    }
    be.gpu.sync().unwrap();
    let t = Instant::now();
    for _ in 0..iters {
        run();
    }
    be.gpu.sync().unwrap();
    t.elapsed().as_secs_f64() * 1e3 / iters as f64
}

/// A ViT-B/16 (224 px, 100 classes) with random weights, timm names.
fn vit_b16(be: &CudaBackend) -> Vit<CudaBackend> {
    Vit::from_file(be, random_vit(&VitShape::vit_b16(100), 1)).expect("vit-b/16")
}

fn step_bench(be: &CudaBackend, kind: MethodKind, batch: usize, steps: usize) -> String {
    step_bench_with(be, kind, batch, steps, false)
}

fn step_bench_with(be: &CudaBackend, kind: MethodKind, batch: usize, steps: usize, recompute: bool) -> String {
    let mut s = Session::new(be.clone(), vit_b16(be), "");
    s.attach(MethodConfig { kind, rank: 32, heads: 2, s0: 0.7, num_classes: 100, ..MethodConfig::default() }).unwrap();
    s.prepare(TrainConfig { epochs: 1, steps_per_epoch: 1000, batch_size: batch, warmup_epochs: 0, recompute, ..TrainConfig::default() }).unwrap();
    let n = batch * 3 * 224 * 224;
    let mut rng = 3u64;
    let images = uniform(n, 1.0, &mut rng);
    let labels: Vec<u32> = (0..batch as u32).map(|i| i % 100).collect();
    // The next batch is staged during each step (Session::train_step_next), as the TypeScript
    // training loop does; SNELLA_PREFETCH=off uploads each batch at the start of its step instead.
    let prefetch = std::env::var("SNELLA_PREFETCH").map_or(true, |v| v != "off");
    let step = |s: &mut Session<CudaBackend>| {
        if prefetch {
            let here = if s.staged.is_some() { None } else { Some(&images[..]) };
            s.train_step_next(here, &labels, Some(&images)).unwrap();
        } else {
            s.train_step(&images, &labels).unwrap();
        }
    };
    be.gpu.reset_peak();
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
    format!(
        "{{\"method\":\"{kind:?}\",\"prefetch\":{prefetch},\"batch\":{batch},\"dtype\":\"f32\",\"step_ms\":{:.2},\"img_per_s\":{:.1},\"peak_mib\":{:.1},\"peak_tensor_mib\":{:.1},\"trainable\":{}}}",
        dt * 1e3,
        batch as f64 / dt,
        be.gpu.peak_bytes() as f64 / 1048576.0,
        be.gpu.peak_tensor_bytes().unwrap_or(0) as f64 / 1048576.0,
        s.trainable_count()
    )
}

/// Per-op device time of one training step (events around every Backend op), after 2 warm-up
/// steps, with the step's wall time under profiling for comparison.
fn profile_step(be: &CudaBackend, kind: MethodKind, batch: usize) -> String {
    let mut pb = be.clone();
    pb.enable_profile();
    let mut s = Session::new(pb.clone(), vit_b16(&pb), "");
    s.attach(MethodConfig { kind, rank: 32, heads: 2, s0: 0.7, num_classes: 100, ..MethodConfig::default() }).unwrap();
    s.prepare(TrainConfig { epochs: 1, steps_per_epoch: 1000, batch_size: batch, warmup_epochs: 0, ..TrainConfig::default() }).unwrap();
    let mut rng = 3u64;
    let images = uniform(batch * 3 * 224 * 224, 1.0, &mut rng);
    let labels: Vec<u32> = (0..batch as u32).map(|i| i % 100).collect();
    for _ in 0..2 {
        s.train_step(&images, &labels).unwrap();
    }
    pb.profile_report().unwrap();
    let t = Instant::now();
    s.train_step(&images, &labels).unwrap();
    pb.gpu.sync().unwrap();
    let wall = t.elapsed().as_secs_f64() * 1e3;
    let ops = pb.profile_report().unwrap();
    let total: f64 = ops.iter().map(|o| o.ms).sum();
    let rows: Vec<String> = ops.iter().map(|o| format!("{{\"op\":\"{}\",\"ms\":{:.3},\"calls\":{}}}", o.op, o.ms, o.calls)).collect();
    format!("{{\"method\":\"{kind:?}\",\"batch\":{batch},\"wall_ms\":{wall:.2},\"ops_ms\":{total:.2},\"ops\":[{}]}}", rows.join(","))
}

fn main() {
    let a: Vec<String> = std::env::args().collect();
    let batch: usize = a.get(1).and_then(|s| s.parse().ok()).unwrap_or(64);
    let steps: usize = a.get(2).and_then(|s| s.parse().ok()).unwrap_or(10);
    let be = CudaBackend::new(0).expect("CUDA");
    if a.get(3).map(|s| s == "profile").unwrap_or(false) {
        be.gpu.set_precision(Precision::Bf16).expect("bf16");
        let p = [MethodKind::Snella, MethodKind::Full].iter().map(|&k| profile_step(&be, k, batch)).collect::<Vec<_>>();
        println!("{{\"profile_bf16\":[{}]}}", p.join(","));
        return;
    }
    if a.get(3).map(|s| s == "merge").unwrap_or(false) {
        // only the merge + top-k + sparsify forward/backward timings (for kernel tuning)
        for &(i, o) in &[(768, 768), (768, 3072), (3072, 768), (1024, 4096)] {
            println!("{{\"shape\":[{i},{o}],\"ours_ms\":{:.4}}}", merge_ms(&be, i, o, 100));
        }
        return;
    }
    if a.get(3).map(|s| s == "quick").unwrap_or(false) {
        // the bf16 whole-step figures only (SNELLA, SNELLA with recompute, full fine-tuning)
        be.gpu.set_precision(Precision::Bf16).expect("bf16");
        let tag = |j: String| j.replace("\"dtype\":\"f32\"", "\"dtype\":\"bf16\"");
        let main = tag(step_bench(&be, MethodKind::Snella, batch, steps));
        let recompute = tag(step_bench_with(&be, MethodKind::Snella, batch, steps, true)).replace("\"batch\"", "\"recompute\":true,\"batch\"");
        let full = tag(step_bench(&be, MethodKind::Full, batch, steps));
        println!("{{\"device\":\"{}\",\"vit_b16_step\":{{\"ours\":{main},\"ours_recompute\":{recompute},\"ours_full\":{full}}}}}", be.gpu.description);
        return;
    }
    let merges: Vec<String> = [(768, 768), (768, 3072), (3072, 768), (1024, 4096)]
        .iter()
        .map(|&(i, o)| format!("{{\"shape\":[{i},{o}],\"rank\":32,\"sparsity\":0.7,\"ours_ms\":{:.3}}}", merge_ms(&be, i, o, 50)))
        .collect();
    let tag = |j: String, p: &str| j.replace("\"dtype\":\"f32\"", &format!("\"dtype\":\"{p}\""));
    let main_f32 = step_bench(&be, MethodKind::Snella, batch, steps);
    be.gpu.set_precision(Precision::Tf32).expect("tf32");
    let main_tf32 = tag(step_bench(&be, MethodKind::Snella, batch, steps), "tf32");
    be.gpu.set_precision(Precision::Bf16).expect("bf16");
    let main = tag(step_bench(&be, MethodKind::Snella, batch, steps), "bf16");
    let recompute = tag(step_bench_with(&be, MethodKind::Snella, batch, steps, true), "bf16").replace("\"batch\"", "\"recompute\":true,\"batch\"");
    let full = tag(step_bench(&be, MethodKind::Full, batch, steps), "bf16");
    let lora = tag(step_bench(&be, MethodKind::Lora, batch, steps), "bf16");
    be.gpu.set_precision(Precision::F32).expect("f32");
    let b8: Vec<String> = [MethodKind::Lora, MethodKind::Snella, MethodKind::Full].iter().map(|&k| step_bench(&be, k, 8, steps)).collect();
    println!(
        "{{\"device\":\"{}\",\"merge\":[{}],\"vit_b16_step\":{{\"ours\":{main},\"ours_recompute\":{recompute},\"ours_tf32\":{main_tf32},\"ours_f32\":{main_f32},\"ours_full\":{full},\"ours_lora\":{lora}}},\"methods_b8\":[{}]}}",
        be.gpu.description,
        merges.join(","),
        b8.join(",")
    );
}
