//! Helpers shared by the CUDA-vs-CPU tests: open the GPU (or report `skipped: no CUDA`), move data,
//! and compare with a stated relative tolerance.
#![allow(dead_code)]

use cudarc::driver::CudaSlice;
use snella_core::gradcheck::rand_vec;
use snella_cuda::Gpu;
use std::sync::Arc;

/// The GPU, or `None` after printing why the test is skipped.
pub fn setup() -> Option<Arc<Gpu>> {
    if let Err(e) = snella_cuda::probe::probe() {
        println!("skipped: no CUDA ({e})");
        return None;
    }
    Some(Gpu::new(0).expect("CUDA is present but the GPU cannot be opened"))
}

pub fn rand32(n: usize, seed: u64, scale: f64) -> Vec<f32> {
    rand_vec(n, seed, scale).iter().map(|&v| v as f32).collect()
}

pub fn up<T: cudarc::driver::DeviceRepr>(gpu: &Gpu, v: &[T]) -> CudaSlice<T> {
    if v.is_empty() {
        // SAFETY: a 1-element buffer no kernel reads.
        return unsafe { gpu.stream.alloc::<T>(1) }.unwrap();
    }
    gpu.stream.clone_htod(v).unwrap()
}

pub fn down<T: cudarc::driver::DeviceRepr + Default + Clone>(gpu: &Gpu, s: &CudaSlice<T>) -> Vec<T> {
    gpu.sync().unwrap();
    gpu.stream.clone_dtoh(s).unwrap()
}

/// Asserts `|got − want| ≤ rtol·max(|want|, mean|want|)` elementwise; prints and returns the max
/// absolute and max relative errors.
pub fn check(name: &str, got: &[f32], want: &[f32], rtol: f64) -> (f64, f64) {
    assert!(got.len() >= want.len(), "{name}: {} values, want {}", got.len(), want.len());
    let n = want.len();
    let mean = want.iter().map(|v| v.abs() as f64).sum::<f64>() / n.max(1) as f64;
    let floor = if mean > 0.0 { mean } else { 1.0 };
    let (mut max_abs, mut max_rel, mut worst) = (0f64, 0f64, 0usize);
    for i in 0..n {
        let (a, b) = (got[i] as f64, want[i] as f64);
        assert!(a.is_finite() && b.is_finite(), "{name}[{i}]: gpu {a} vs cpu {b}");
        let e = (a - b).abs();
        let r = e / b.abs().max(floor);
        max_abs = max_abs.max(e);
        if r > max_rel {
            max_rel = r;
            worst = i;
        }
    }
    println!("  {name}: n={n} max|err|={max_abs:.3e} max rel={max_rel:.3e} (mean|ref|={mean:.3e})");
    assert!(max_rel <= rtol, "{name}: rel error {max_rel:e} > {rtol:e} at {worst}: gpu {} vs cpu {}", got[worst], want[worst]);
    (max_abs, max_rel)
}
