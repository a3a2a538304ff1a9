//! One full training step on the GPU against the CPU step (feature `cuda`): the same tiny ViT
//! (`tests/golden/tiny_vit.safetensors`), the same SNELLA adapters and the same batch; compares the
//! logits, the loss, every adapter gradient and every parameter after AdamW.
//!
//! Tolerances (f32 on both sides, different summation orders, TF32 off):
//! `max|gpu − cpu| / max(max|cpu|, 1e-6) ≤ 1e-4` for logits, loss and updated parameters, ≤ 2e-3
//! for gradients (the mixture scalars sum over all in·out entries). The kept sets must be equal.
//! Without a GPU the test prints `skipped: no CUDA (…)` and returns.
#![cfg(feature = "cuda")]

use snella_model::backend::Backend;
use snella_model::cpu::CpuBackend;
use snella_model::cuda::CudaBackend;
use snella_model::peft::{MethodConfig, MethodKind};
use snella_model::random_vit::{random_vit, VitShape};
use snella_model::vit::Vit;
use snella_model::session::Session;
use snella_model::trainer::{kernel_adapters, TrainConfig};
use snella_model::allocator::AllocatorConfig;

/// max |a − b| / max |b| (floor 1e-6); infinite when a difference is NaN (`f64::max` would skip it).
fn rel(a: &[f32], b: &[f32]) -> f64 {
    let scale = b.iter().fold(0f64, |m, &v| m.max((v as f64).abs())).max(1e-6);
    a.iter().zip(b).fold(0f64, |m, (&x, &y)| {
        let d = ((x - y) as f64).abs();
        if d.is_nan() { f64::INFINITY } else { m.max(d) }
    }) / scale
}

fn session<B: Backend>(be: B) -> Session<B> {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/golden/tiny_vit.safetensors");
    prepared(Session::load(be, path).expect("tiny vit"))
}

/// A ViT with head dim 64 (D 128, 2 heads, 2 blocks, 32 px / 16: 5 tokens), random weights in
/// ±0.3: the shape on which the CUDA backend's bf16 attention is the fused (flash) kernel.
fn session_hd64<B: Backend>(be: B) -> Session<B> {
    session_hd64_kind(be, MethodKind::Snella)
}

/// [`session_hd64`] with the given method attached.
fn session_hd64_kind<B: Backend>(be: B, kind: MethodKind) -> Session<B> {
    let shape = VitShape { img_size: 32, patch_size: 16, embed_dim: 128, depth: 2, num_heads: 2, mlp_hidden: 256, num_classes: 5, init_bound: 0.3 };
    let vit = Vit::from_file(&be, random_vit(&shape, 21)).expect("random vit");
    prepared_kind(Session::new(be, vit, ""), kind)
}

/// One training step on `x` (6 images, fixed labels); every trainable tensor's name, value and
/// gradient after it.
fn step_params(mut s: Session<CudaBackend>, x: &[f32]) -> Vec<(String, Vec<f32>, Vec<f32>)> {
    s.train_step(x, &[0, 1, 2, 3, 4, 1]).unwrap();
    let be = s.be.clone();
    s.vit.params_mut().into_iter().filter_map(|p| p.train.as_ref().map(|t| (p.name.clone(), be.download(&p.value), be.download(&t.grad)))).collect()
}

/// A CUDA backend multiplying in bf16, or `None` after printing `skipped: no CUDA (…)`.
fn bf16_gpu() -> Option<CudaBackend> {
    if let Err(e) = snella_cuda::probe::probe() {
        println!("skipped: no CUDA ({e})");
        return None;
    }
    let be = CudaBackend::new(0).unwrap();
    be.gpu.set_precision(snella_cuda::device::Precision::Bf16).unwrap();
    Some(be)
}

/// `a` and `b` (from [`step_params`]) hold the same tensors bit for bit.
fn assert_same_params(a: &[(String, Vec<f32>, Vec<f32>)], b: &[(String, Vec<f32>, Vec<f32>)], what: &str) {
    assert!(a.len() > 10, "{what}: {} trainable tensors", a.len());
    assert_eq!(a.len(), b.len(), "{what}: trainable tensor count");
    for (x, y) in a.iter().zip(b) {
        assert_eq!(x, y, "{what}: {} differs", x.0);
    }
    println!("{what}: {} trainable tensors bit-identical", a.len());
}

fn prepared<B: Backend>(s: Session<B>) -> Session<B> {
    prepared_kind(s, MethodKind::Snella)
}

fn prepared_kind<B: Backend>(mut s: Session<B>, kind: MethodKind) -> Session<B> {
    s.attach(MethodConfig { kind, rank: 4, heads: 2, s0: 0.3, num_classes: 5, seed: 11, ..MethodConfig::default() }).unwrap();
    s.prepare(TrainConfig {
        epochs: 2,
        batch_size: 6,
        steps_per_epoch: 1,
        lr: 1e-2,
        warmup_epochs: 0,
        allocator: AllocatorConfig { s0: 0.3, s_t: 0.5, ..AllocatorConfig::default() },
        ..TrainConfig::default()
    })
    .unwrap();
    s.begin_epoch(0).unwrap();
    s
}

#[test]
fn gpu_step_matches_cpu_step() {
    if let Err(e) = snella_cuda::probe::probe() {
        println!("skipped: no CUDA ({e})");
        return;
    }
    let mut cpu = session(CpuBackend);
    let mut gpu = session(CudaBackend::new(0).unwrap());
    let x: Vec<f32> = snella_core::gradcheck::rand_vec(6 * 3 * 16 * 16, 5, 1.5).iter().map(|&v| v as f32).collect();
    let y = [0u32, 1, 2, 3, 4, 1];
    let (lc, lg) = (cpu.predict(&x, 6).unwrap(), gpu.predict(&x, 6).unwrap());
    let e = rel(&lg, &lc);
    println!("logits rel err {e:.2e}");
    assert!(e <= 1e-4, "logits {e}");
    let (sc, sg) = (cpu.train_step(&x, &y).unwrap(), gpu.train_step(&x, &y).unwrap());
    println!("loss cpu {} gpu {}", sc.loss, sg.loss);
    assert!(((sc.loss - sg.loss) as f64).abs() <= 1e-4 * (sc.loss as f64).abs().max(1.0));
    assert_eq!(sc.correct, sg.correct);
    let (kc, kg) = (kernel_adapters(&cpu.vit), kernel_adapters(&gpu.vit));
    let kc_len = kc.len();
    for (a, b) in kc.iter().zip(&kg) {
        assert_eq!(a.kept(), b.kept(), "{}", a.name);
    }
    let (cb, gb) = (cpu.be, gpu.be.clone());
    let (pc, pg) = (cpu.vit.params_mut(), gpu.vit.params_mut());
    let mut worst = (0f64, 0f64);
    for (p, q) in pc.into_iter().zip(pg) {
        let (Some(tc), Some(tg)) = (&p.train, &q.train) else { continue };
        let ge = rel(&gb.download(&tg.grad), &cb.download(&tc.grad));
        let ve = rel(&gb.download(&q.value), &cb.download(&p.value));
        println!("{:40} grad {ge:.2e} value {ve:.2e}", p.name);
        assert!(ge <= 2e-3, "{} gradient rel err {ge}", p.name);
        assert!(ve <= 1e-4, "{} updated value rel err {ve}", p.name);
        worst = (worst.0.max(ge), worst.1.max(ve));
    }
    println!("worst: gradient {:.2e}, updated value {:.2e}", worst.0, worst.1);
    // The allocator's EMAs, updated on the device, against the CPU's (same tolerance as the
    // gradients they are computed from).
    cpu.pull_importance();
    gpu.pull_importance();
    let (ac, ag) = (cpu.trainer.as_ref().unwrap().allocator.as_ref().unwrap(), gpu.trainer.as_ref().unwrap().allocator.as_ref().unwrap());
    for l in 0..kc_len {
        for (i, (c, g)) in ac.ema(l).iter().zip(ag.ema(l)).enumerate() {
            let e = rel(g, c);
            assert!(c.iter().any(|&v| v != 0.0), "layer {l} EMA {i} is all zero");
            assert!(e <= 2e-3, "layer {l} EMA {i} rel err {e}");
        }
    }
}

/// The same step in bf16 (bf16 GEMM operands, f32 accumulation), with one bf16 effective weight
/// `W0 + ΔWᵀ` (the default) and with `W0` and `ΔWᵀ` multiplied apart (`separate_delta`), against the
/// f32 CPU step, with bf16 tolerances relative to each tensor's
/// largest magnitude: logits and loss 3e-2, gradients 1e-1. The updated values: AdamW's first step
/// moves an element by `lr·g/(|g| + ε)` ≈ ±lr, so an element whose gradient is near 0 may move the
/// other way under bf16 rounding: at most 5% of a tensor's gradient signs may differ, and every
/// element whose gradient has the same sign on both (and |g| ≥ 1e-4) must land within 1e-5 of the
/// CPU's value.
#[test]
fn gpu_bf16_step_matches_cpu_step_within_bf16_tolerance() {
    if let Err(e) = snella_cuda::probe::probe() {
        println!("skipped: no CUDA ({e})");
        return;
    }
    for separate in [false, true] {
        let mut be = CudaBackend::new(0).unwrap();
        be.gpu.set_precision(snella_cuda::device::Precision::Bf16).unwrap();
        be.separate_delta = separate;
        assert_eq!(be.separate_delta_products(), separate);
        let x: Vec<f32> = snella_core::gradcheck::rand_vec(6 * 3 * 16 * 16, 5, 1.5).iter().map(|&v| v as f32).collect();
        let tag = if separate { "tiny ViT, W0 and ΔWᵀ apart" } else { "tiny ViT, one effective weight" };
        let errs = bf16_step_check(tag, session(CpuBackend), session(be), &x);
        let bad: Vec<String> = errs.iter().filter(|(_, ge)| *ge > 1e-1).map(|(n, ge)| format!("{n} {ge:.3e}")).collect();
        assert!(bad.is_empty(), "{tag}: bf16 gradient rel err above 1e-1: {}", bad.join(", "));
    }
}

/// As [`gpu_bf16_step_matches_cpu_step_within_bf16_tolerance`] on a head-dim-64 model, where the
/// bf16 attention is the fused kernel (only the log-sum-exp saved, `P` recomputed in backward), and
/// and (the next test) with the fused attention off (cuBLAS products in TF32, f32 `P` saved). The same bounds
/// for both, except that the mixture gradients (`∂α, ∂γ, ∂β` of each adapter: sums over all `in·out`
/// entries that largely cancel, so a small one carries a large relative error) are judged as one
/// vector over all adapters, relative to its largest magnitude, instead of per adapter. On this
/// model (weights in ±0.3, more sensitive to bf16 than the tiny one) per-adapter mixture errors
/// reach 0.22 (unfused) and 0.32 (fused) of a tiny tensor's own scale (H200), while a plumbing
/// error (wrong `lse`, wrong `O`) gives errors of order 1. The kernels' own accuracy is checked
/// against f64 in `snella-cuda`'s `flash_attention_matches_cpu`.
#[test]
fn gpu_bf16_step_with_fused_attention_matches_cpu_step() {
    hd64_bf16_step(true);
}

/// The head-dim-64 check of [`gpu_bf16_step_with_fused_attention_matches_cpu_step`] with the fused
/// attention switched off (cuBLAS products, `P` saved).
#[test]
fn gpu_bf16_step_with_unfused_attention_matches_cpu_step() {
    hd64_bf16_step(false);
}

fn hd64_bf16_step(fused: bool) {
    if let Err(e) = snella_cuda::probe::probe() {
        println!("skipped: no CUDA ({e})");
        return;
    }
    let mut be = CudaBackend::new(0).unwrap();
    be.gpu.set_precision(snella_cuda::device::Precision::Bf16).unwrap();
    be.fused_attention = fused;
    assert_eq!(be.flash_attention(64), fused, "bf16 with head dim 64 takes the fused attention unless it is switched off");
    let x: Vec<f32> = snella_core::gradcheck::rand_vec(6 * 3 * 32 * 32, 6, 1.5).iter().map(|&v| v as f32).collect();
    let tag = if fused { "head-dim-64 ViT, fused attention" } else { "head-dim-64 ViT, cuBLAS attention" };
    let errs = bf16_step_check(tag, session_hd64(CpuBackend), session_hd64(be), &x);
    let bad: Vec<String> = errs.iter().filter(|(n, ge)| !n.ends_with("snella_mix") && *ge > 1e-1).map(|(n, ge)| format!("{n} {ge:.3e}")).collect();
    assert!(bad.is_empty(), "{tag}: bf16 gradient rel err above 1e-1: {}", bad.join(", "));
}

/// Activation checkpointing on the GPU in bf16 (fused attention, the kept bf16 `x̂` and MLP
/// pre-activation with their rebuilds) changes memory, not results: one step with `recompute`
/// gives bit-identical gradients and updated values to one without, as `recompute.rs` checks on
/// the CPU. (Written in session 5 after the device time was spent: first run pending.)
#[test]
fn gpu_bf16_recompute_gives_bit_identical_step() {
    let Some(be) = bf16_gpu() else { return };
    let x: Vec<f32> = snella_core::gradcheck::rand_vec(6 * 3 * 32 * 32, 8, 1.5).iter().map(|&v| v as f32).collect();
    let run = |recompute: bool| {
        let mut s = session_hd64(be.clone());
        s.trainer.as_mut().expect("prepared").cfg.recompute = recompute;
        step_params(s, &x)
    };
    assert_same_params(&run(false), &run(true), "bf16 step with and without recompute");
}

/// One bf16 training step (SNELLA and LoRA, images from `seed`) with a backend switch on and off
/// (`set(backend, on)`) gives bit-identical gradients and updated values (`what` names the switch).
/// Both runs take the composed adapter backward (`fused_adapter_bwd` off): the fused one needs the
/// kept weight and a bf16 `∂L/∂y`, which the switches below take away from one side, and it sums the
/// weight gradient in another order (compared in `gpu_bf16_fused_adapter_backward_matches_composed`).
fn bf16_switch_gives_same_step(seed: u64, what: &str, set: impl Fn(&mut CudaBackend, bool)) {
    if let Err(e) = snella_cuda::probe::probe() {
        println!("skipped: no CUDA ({e})");
        return;
    }
    let x: Vec<f32> = snella_core::gradcheck::rand_vec(6 * 3 * 32 * 32, seed, 1.5).iter().map(|&v| v as f32).collect();
    for kind in [MethodKind::Snella, MethodKind::Lora] {
        let run = |on: bool| {
            let mut be = CudaBackend::new(0).unwrap();
            be.gpu.set_precision(snella_cuda::device::Precision::Bf16).unwrap();
            be.fused_adapter_bwd = false;
            set(&mut be, on);
            step_params(session_hd64_kind(be, kind), &x)
        };
        assert_same_params(&run(true), &run(false), &format!("{kind:?}: {what}"));
    }
}

/// Keeping each adapted linear's bf16 effective weight from forward to backward (the default,
/// `keep_weight`) gives bit-identical gradients and updated values to rebuilding it in backward,
/// for SNELLA (the weight from `M`, the kernel adapters still materialised in backward) and LoRA
/// (not materialised at all in backward when the weight is kept).
#[test]
fn gpu_bf16_kept_effective_weight_gives_bit_identical_step() {
    bf16_switch_gives_same_step(9, "kept vs rebuilt effective weight", |be, keep| {
        be.keep_weight = keep;
        assert_eq!(be.keep_effective_weight(), keep);
    });
}

/// The LayerNorm backward's bf16 copy of `dx` (the `proj` and `fc2` products' `∂L/∂y`, default
/// `ln_bf16_dy`) gives bit-identical gradients and updated values to the products converting the
/// f32 `dx` themselves, for SNELLA and LoRA (frozen biases: the bf16 copy is taken).
#[test]
fn gpu_bf16_layernorm_dy_copy_gives_bit_identical_step() {
    bf16_switch_gives_same_step(11, "LayerNorm bf16 dy vs the products' conversion", |be, on| be.ln_bf16_dy = on);
}

/// Every adapted linear's effective weight and kept sets built up front by one batched call, and
/// every kernel adapter's backward in one batched call at the end of the backward pass
/// (`batch_merge`, `batch_merge_bwd`, session 10: one launch per kernel for each group of same-shape
/// adapters) give bit-identical gradients and updated values to the linear-by-linear path, with the
/// default (fused) adapter backward on both sides, for SNELLA (LoRA: no batched job, the same path).
#[test]
fn gpu_bf16_batched_effective_weights_give_bit_identical_step() {
    bf16_switch_gives_same_step(13, "batched vs per-linear effective weights", |be, on| {
        be.fused_adapter_bwd = true;
        (be.batch_merge, be.batch_merge_bwd) = (on, on);
        assert_eq!((be.batch_effective_weights(), be.batch_adapter_bwd()), (on, on));
    });
}

/// The fused adapter backward (default `fused_adapter_bwd`: the weight gradient in `ΔW`'s layout,
/// one row kernel for `M`, `Ĝ` and `∂L/∂K`) against the composed one (`M` rebuilt, the transposing
/// sparsify backward, the row statistics) on one bf16 SNELLA step: the same kept sets (one forward),
/// every gradient within 1e-3 of the largest (the weight gradient is summed in another product
/// orientation and the mixture statistics in another order: f32 rounding, not the same bits).
#[test]
fn gpu_bf16_fused_adapter_backward_matches_composed() {
    if let Err(e) = snella_cuda::probe::probe() {
        println!("skipped: no CUDA ({e})");
        return;
    }
    let x: Vec<f32> = snella_core::gradcheck::rand_vec(6 * 3 * 32 * 32, 12, 1.5).iter().map(|&v| v as f32).collect();
    let run = |fused: bool| {
        let mut be = CudaBackend::new(0).unwrap();
        be.gpu.set_precision(snella_cuda::device::Precision::Bf16).unwrap();
        be.fused_adapter_bwd = fused;
        assert_eq!(be.fused_adapter_bwd(), fused);
        step_params(session_hd64_kind(be, MethodKind::Snella), &x)
    };
    let (f, c) = (run(true), run(false));
    assert_eq!(f.len(), c.len());
    let mut adapters = 0;
    for ((name, _, gf), (name2, _, gc)) in f.iter().zip(&c) {
        assert_eq!(name, name2);
        let r = rel(gf, gc);
        println!("  {name}: rel {r:.2e}");
        assert!(r <= 1e-3, "{name}: fused vs composed gradient differ by {r:.3e} of the largest");
        adapters += name.contains("snella_") as usize;
    }
    assert!(adapters >= 2 * 3 * 4, "{adapters} adapter tensors compared");
}

/// The backward takes the attention path its forward took, whatever `fused_attention` says by
/// then: a fused forward followed by a backward on a backend with the fused attention switched off
/// gives bit-identical gradients to an all-fused pass (the path follows the kept `qkv`).
#[test]
fn attention_backward_follows_its_forward_path() {
    if let Err(e) = snella_cuda::probe::probe() {
        println!("skipped: no CUDA ({e})");
        return;
    }
    let be = CudaBackend::new(0).unwrap();
    be.gpu.set_precision(snella_cuda::device::Precision::Bf16).unwrap();
    let mut off = be.clone();
    off.fused_attention = false;
    let x: Vec<f32> = snella_core::gradcheck::rand_vec(6 * 3 * 32 * 32, 7, 1.5).iter().map(|&v| v as f32).collect();
    let y = [0u32, 1, 2, 3, 4, 1];
    let grads = |bwd: &CudaBackend| {
        let mut s = session_hd64(be.clone());
        let xb = be.upload(&x);
        let (logits, cache) = s.vit.forward(&be, &xb, 6, true);
        let mut dl = be.zeros(6 * 5);
        be.cross_entropy(&logits, &y, 6, 5, &mut dl);
        s.vit.backward(bwd, cache.expect("train cache"), &dl);
        s.vit.params_mut().into_iter().filter_map(|p| p.train.as_ref().map(|t| be.download(&t.grad))).collect::<Vec<_>>()
    };
    let (a, b) = (grads(&be), grads(&off));
    assert!(!a.is_empty());
    assert_eq!(a, b, "a fused forward's backward changed with the fused_attention flag");
    println!("fused forward, backward with the flag off: gradients bit-identical ({} tensors)", a.len());
}

/// One bf16 training step on both sessions: asserts the logits and loss (3e-2), the updated values
/// where the gradient signs agree (1e-5) and the share of flipped gradient signs (≤ 5%); returns
/// each trainable tensor's gradient error (relative to its largest magnitude) for the caller's bound,
/// the mixture gradients of all adapters last as one pooled vector (`all snella_mix (pooled)`) after
/// their per-adapter entries.
fn bf16_step_check(tag: &str, mut cpu: Session<CpuBackend>, mut gpu: Session<CudaBackend>, x: &[f32]) -> Vec<(String, f64)> {
    let y = [0u32, 1, 2, 3, 4, 1];
    let e = rel(&gpu.predict(x, 6).unwrap(), &cpu.predict(x, 6).unwrap());
    println!("{tag}: bf16 logits rel err {e:.2e}");
    assert!(e <= 3e-2, "logits {e}");
    let (sc, sg) = (cpu.train_step(x, &y).unwrap(), gpu.train_step(x, &y).unwrap());
    println!("{tag}: bf16 loss cpu {} gpu {}", sc.loss, sg.loss);
    assert!(((sc.loss - sg.loss) as f64).abs() <= 3e-2 * (sc.loss as f64).abs().max(1.0));
    let (cb, gb) = (cpu.be, gpu.be.clone());
    let mut worst = (0f64, 0f64);
    let mut errs = Vec::new();
    let mut mix = (Vec::new(), Vec::new());
    // every violation is collected and reported together (one GPU run shows them all)
    let mut fails = Vec::new();
    for (p, q) in cpu.vit.params_mut().into_iter().zip(gpu.vit.params_mut()) {
        let (Some(tc), Some(tg)) = (&p.train, &q.train) else { continue };
        let ge = rel(&gb.download(&tg.grad), &cb.download(&tc.grad));
        let (vg, vc) = (gb.download(&q.value), cb.download(&p.value));
        let (gg, gc) = (gb.download(&tg.grad), cb.download(&tc.grad));
        let same = |i: usize| gg[i].signum() == gc[i].signum() && gc[i].abs() >= 1e-4;
        let ve = (0..vc.len()).filter(|&i| same(i)).fold(0f64, |m, i| {
            let d = (vg[i] - vc[i]).abs() as f64;
            if d.is_nan() { f64::INFINITY } else { m.max(d) }
        });
        if ve > 1e-5 {
            fails.push(format!("{} bf16 updated value differs by {ve} where the gradient signs agree", p.name));
        }
        let flipped = gg.iter().zip(&gc).filter(|(a, b)| a.signum() != b.signum() && **b != 0.0).count();
        if flipped as f64 > 0.05 * gc.len() as f64 {
            fails.push(format!("{}: {flipped} of {} gradient signs differ", p.name, gc.len()));
        }
        worst = (worst.0.max(ge), worst.1.max(ve));
        errs.push((p.name.clone(), ge));
        if p.name.ends_with("snella_mix") {
            mix.0.extend(gg);
            mix.1.extend(gc);
        }
    }
    if !mix.1.is_empty() {
        errs.push(("all snella_mix (pooled)".into(), rel(&mix.0, &mix.1)));
    }
    println!("{tag}: bf16 worst: gradient rel {:.2e}, updated value |Δ| {:.2e} where signs agree (lr 1e-2)", worst.0, worst.1);
    for (name, ge) in &errs {
        println!("  {tag}: {name:40} gradient rel err {ge:.3e}");
    }
    assert!(fails.is_empty(), "{tag}: {}", fails.join("; "));
    errs
}

/// Staging the next batch on the copy stream during a step (`Session::train_step_next`, the
/// bench's and the TypeScript loop's path) gives bit-identical training to uploading each batch at
/// its step: three bf16 SNELLA steps over three different batches (of 4, 6 and 6 images, so the
/// copy buffers grow once after the first call), then
/// every trainable value and gradient compared.
#[test]
fn gpu_staged_batches_give_bit_identical_steps() {
    let Some(be) = bf16_gpu() else { return };
    let per = 3 * 32 * 32;
    let xs: Vec<Vec<f32>> = [4usize, 6, 6].iter().enumerate().map(|(k, &b)| snella_core::gradcheck::rand_vec(b * per, 40 + k as u64, 1.5).iter().map(|&v| v as f32).collect()).collect();
    let labels = |x: &Vec<f32>| (0..(x.len() / per) as u32).map(|i| i % 5).collect::<Vec<u32>>();
    let params = |s: &mut Session<CudaBackend>| {
        let be = s.be.clone();
        s.vit.params_mut().into_iter().filter_map(|p| p.train.as_ref().map(|t| (p.name.clone(), be.download(&p.value), be.download(&t.grad)))).collect::<Vec<_>>()
    };
    let mut plain = session_hd64(be.clone());
    let a: Vec<f32> = xs.iter().map(|x| plain.train_step(x, &labels(x)).unwrap().loss).collect();
    let mut staged = session_hd64(be.clone());
    let mut b = Vec::new();
    for (i, x) in xs.iter().enumerate() {
        let here = if i == 0 { Some(&x[..]) } else { None };
        let r = staged.train_step_next(here, &labels(x), xs.get(i + 1).map(|v| &v[..])).unwrap();
        assert_eq!(r.staged, i + 1 < xs.len());
        b.push(r.loss);
    }
    assert_eq!(a, b, "losses");
    assert_same_params(&params(&mut plain), &params(&mut staged), "staged batches");
}
