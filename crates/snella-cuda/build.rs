//! Compiles `kernels/*.cu` ahead of time into one fatbin (SASS for sm_80/86/89/90 plus compute_90
//! PTX) with nvcc from the pinned CUDA 13.0 wheels (design.md), embedded by `src/module.rs`.
//!
//! nvcc is looked up in this order: `$SNELLA_NVCC`, `$NVCC`, `PATH`, then the project-local
//! `.toolchain/cuda` installed by `scripts/setup-cuda.sh`. Without nvcc the build fails loudly: it
//! never ships a CPU-only binary silently. `SNELLA_CUDA_ARCHS` (e.g. `90`) narrows the targets for
//! development builds.
use std::path::{Path, PathBuf};
use std::process::Command;

fn find_nvcc(root: &Path) -> Option<PathBuf> {
    for var in ["SNELLA_NVCC", "NVCC"] {
        if let Ok(p) = std::env::var(var) {
            if !p.is_empty() {
                return Some(PathBuf::from(p));
            }
        }
    }
    if let Ok(path) = std::env::var("PATH") {
        for dir in std::env::split_paths(&path) {
            let c = dir.join("nvcc");
            if c.is_file() {
                return Some(c);
            }
        }
    }
    let local = root.join(".toolchain/cuda/site/nvidia/cu13/bin/nvcc");
    local.is_file().then_some(local)
}

fn main() {
    let manifest = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").unwrap());
    let root = manifest.parent().unwrap().parent().unwrap().to_path_buf();
    let kdir = root.join("kernels");
    println!("cargo:rerun-if-changed={}", kdir.display());
    for v in ["SNELLA_NVCC", "NVCC", "SNELLA_CUDA_ARCHS", "PATH"] {
        println!("cargo:rerun-if-env-changed={v}");
    }
    let mut sources: Vec<PathBuf> = std::fs::read_dir(&kdir)
        .expect("kernels/ folder")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "cu"))
        .collect();
    sources.sort();
    for s in &sources {
        println!("cargo:rerun-if-changed={}", s.display());
    }
    let out = PathBuf::from(std::env::var("OUT_DIR").unwrap());
    let all = out.join("snella_all.cu");
    let body: String = sources.iter().map(|s| format!("#include \"{}\"\n", s.display())).collect();
    std::fs::write(&all, body).unwrap();
    let nvcc = find_nvcc(&root).unwrap_or_else(|| {
        panic!(
            "snella-cuda: nvcc not found (tried $SNELLA_NVCC, $NVCC, PATH, {}). Run scripts/setup-cuda.sh to install the pinned CUDA 13.0 wheels.",
            root.join(".toolchain/cuda/site/nvidia/cu13/bin/nvcc").display()
        )
    });
    let archs = std::env::var("SNELLA_CUDA_ARCHS").unwrap_or_else(|_| "80,86,89,90".into());
    let mut cmd = Command::new(&nvcc);
    cmd.arg("--fatbin").arg("-O3").arg("-std=c++17").arg("-lineinfo").arg("-I").arg(&kdir);
    let list: Vec<&str> = archs.split(',').map(str::trim).filter(|s| !s.is_empty()).collect();
    for a in &list {
        cmd.arg("-gencode").arg(format!("arch=compute_{a},code=sm_{a}"));
    }
    let top = list.iter().max().copied().unwrap_or("90");
    cmd.arg("-gencode").arg(format!("arch=compute_{top},code=compute_{top}"));
    let fatbin = out.join("snella.fatbin");
    cmd.arg("-o").arg(&fatbin).arg(&all);
    let status = cmd.status().unwrap_or_else(|e| panic!("snella-cuda: cannot run {}: {e}", nvcc.display()));
    assert!(status.success(), "snella-cuda: nvcc failed on kernels/ ({})", nvcc.display());
}
