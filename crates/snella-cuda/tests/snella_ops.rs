//! The SNELLA kernels (`kernels/{merge,topk,sparsify}.cu`) against the CPU references of
//! `snella_core::snella` (spec §1–§3), on shapes that do not divide the tile sizes. Without CUDA
//! every test prints `skipped: no CUDA (...)` and returns (project rule).
//!
//! Tolerances:
//! - merge forward vs the CPU in f32: `|gpu − cpu| ≤ 1e-5·max(|cpu|, mean|cpu|)` per element
//!   (relative, with the tensor's mean magnitude as the floor for entries near zero);
//! - merge backward `dA`, `dB` vs the CPU in f32: the same with `1e-4`; `dmix` against the CPU in
//!   f64: `|gpu − f64| ≤ 1e-4·|f64| + 4·|cpu_f32 − f64|` (the f32 CPU's own error bounds the
//!   cancellation in these global sums);
//! - top-k: exact (threshold, ties, `τ`, `k` equal to the CPU's `KeptSet`; `tie_cut` equal to the
//!   index after the `ties`-th tie; exactly `k` kept), the input uploaded from the host;
//! - sparsify forward/backward: bit-identical to the CPU given the same `M` (NaN matches NaN).

use cudarc::driver::CudaSlice;
use snella_core::gradcheck::rand_vec;
use snella_core::snella::merge::{self as cpu_merge, Mixture};
use snella_core::snella::sparsify::{self as cpu_sparsify, SparsifyRule};
use snella_core::snella::topk::{self as cpu_topk, kept_count, KeptSet};
use snella_cuda::ops::{merge, sparsify, topk};
use snella_cuda::Gpu;

mod common;
use common::{check, down, rand32, setup, up};

const H: usize = 2;






/// Shapes `(in, out, rh)`: odd sizes that do not divide the 32×32 tiles or the 8-row blocks.
/// On an H200 (132 SMs) the row kernels use 1, 1, 2, 2, 1, 8 and 4 rows per block for these.
// (37, 50, 40): r = 80 at H = 2, beyond the H·(r/H + 1) ≤ 72 of the session-2 backward kernel.
const SHAPES: [(usize, usize, usize); 8] =
    [(5, 7, 3), (192, 768, 4), (768, 3072, 16), (1000, 37, 8), (33, 65, 32), (3072, 768, 16), (1111, 45, 6), (37, 50, 40)];

fn mixture(gamma: f32) -> Mixture<f32> {
    Mixture { alpha: 1.1, gamma, beta: 0.01 }
}

/// A, B for one shape (uniform ±0.3); for the 5×7 shape A[0,1,:] = B[0,2,:] so that D_0[1,2] = 0.
fn params(n_in: usize, n_out: usize, rh: usize, seed: u64) -> (Vec<f32>, Vec<f32>) {
    let mut a = rand32(H * n_in * rh, seed, 0.3);
    let b = rand32(H * n_out * rh, seed + 1, 0.3);
    if n_in > 1 && n_out > 2 {
        a[rh..2 * rh].copy_from_slice(&b[2 * rh..3 * rh]);
    }
    (a, b)
}

fn mix_cases(n_in: usize) -> Vec<Option<Mixture<f32>>> {
    let mut v = vec![None, Some(mixture(0.9))];
    if n_in == 5 {
        v.push(Some(mixture(1e-6))); // the γ clamp
    }
    v
}

#[test]
fn merge_fwd_matches_cpu() {
    let Some(gpu) = setup() else { return };
    for (si, &(n_in, n_out, rh)) in SHAPES.iter().enumerate() {
        let (a, b) = params(n_in, n_out, rh, 10 + si as u64);
        let (da, db) = (up(&gpu, &a), up(&gpu, &b));
        for mx in mix_cases(n_in) {
            let mut want = vec![0f32; n_in * n_out];
            cpu_merge::merge_fwd(&a, &b, H, n_in, n_out, rh, mx, &mut want);
            let dmix = mx.map(|m| up(&gpu, &[m.alpha, m.gamma, m.beta]));
            let mut dm = gpu.zeros(n_in * n_out).unwrap();
            let mv = dmix.as_ref().map(|x| x.slice(..));
            merge::merge_fwd(&gpu, &da.slice(..), &db.slice(..), H, n_in, n_out, rh, mv.as_ref(), &mut dm.slice_mut(..)).unwrap();
            let got = down(&gpu, &dm);
            let bits_differ = got.iter().zip(&want).filter(|(x, y)| x.to_bits() != y.to_bits()).count();
            println!("merge fwd {n_in}x{n_out} rh={rh} mix={mx:?}: {bits_differ} of {} entries differ in bits", want.len());
            check("M", &got, &want, 1e-5);
        }
    }
}

/// The merge with the top-k's first histogram built in its softmax pass (`merge_fwd_select`) gives
/// the same `M` bits and the same kept-set words as `merge_fwd` followed by `select_topk`, with and
/// without the mixture, for rows held in registers (≤ 768 and ≤ 3072 wide) and wider ones (4100:
/// the re-reading path), several `k`, and a row of equal values (ties in one bin).
#[test]
fn merge_fwd_select_equals_merge_then_select() {
    let Some(gpu) = setup() else { return };
    let mut shapes: Vec<(usize, usize, usize)> = SHAPES.to_vec();
    shapes.push((9, 4100, 4));
    for (si, &(n_in, n_out, rh)) in shapes.iter().enumerate() {
        let (mut a, b) = params(n_in, n_out, rh, 80 + si as u64);
        if si == 0 {
            // rows 0 and 2 of A equal: equal rows of M, so equal magnitudes in the histogram
            let row0 = a[..rh].to_vec();
            a[2 * rh..3 * rh].copy_from_slice(&row0);
        }
        let (da, db) = (up(&gpu, &a), up(&gpu, &b));
        let n = n_in * n_out;
        for mx in mix_cases(n_in) {
            let dmix = mx.map(|m| up(&gpu, &[m.alpha, m.gamma, m.beta]));
            let mv = dmix.as_ref().map(|x| x.slice(..));
            let mut m1 = gpu.zeros(n).unwrap();
            merge::merge_fwd(&gpu, &da.slice(..), &db.slice(..), H, n_in, n_out, rh, mv.as_ref(), &mut m1.slice_mut(..)).unwrap();
            let want_m = down(&gpu, &m1);
            for k in [0, 1, n / 3, kept_count(n, 0.7), n] {
                let want = topk::kept_words(&gpu, &topk::select_topk(&gpu, &m1.slice(..), n, k).unwrap()).unwrap();
                let mut m2 = gpu.zeros(n).unwrap();
                let kept = merge::merge_fwd_select(&gpu, &da.slice(..), &db.slice(..), H, n_in, n_out, rh, mv.as_ref(), &mut m2.slice_mut(..), k).unwrap();
                same_bits(&format!("M {n_in}x{n_out} mix={}", mx.is_some()), &down(&gpu, &m2), &want_m);
                assert_eq!(topk::kept_words(&gpu, &kept).unwrap(), want, "{n_in}x{n_out} mix={} k={k}: kept words", mx.is_some());
                assert_eq!((kept.n, kept.k), (n, k));
            }
        }
    }
    println!("merge_fwd_select: the same M and kept sets as merge_fwd + select_topk");
}

/// The mixture gradients `gm = [∂α, ∂γ, ∂β]` of a GPU merge backward against the CPU's in f32 and
/// f64 (`|gpu − f64| ≤ 1e-4·|f64| + 4·|cpu_f32 − f64|`), `∂γ = 0` under the γ clamp, zeros without
/// a mixture.
fn check_dmix(label: &str, gm: &[f32], wmix: Option<Mixture<f32>>, wmix64: Option<Mixture<f64>>, mx: Option<Mixture<f32>>) {
    match (wmix, wmix64) {
        (Some(w), Some(w64)) => {
            let names = ["dalpha", "dgamma", "dbeta"];
            let (c32, c64) = ([w.alpha, w.gamma, w.beta], [w64.alpha, w64.gamma, w64.beta]);
            for q in 0..3 {
                let (gv, cv, rv) = (gm[q] as f64, c32[q] as f64, c64[q]);
                let tol = 1e-4 * rv.abs() + 4.0 * (cv - rv).abs() + 1e-30;
                println!("  {}: gpu {gv:.9e} cpu32 {cv:.9e} f64 {rv:.9e} |gpu−f64|={:.3e} (tol {tol:.3e})", names[q], (gv - rv).abs());
                assert!((gv - rv).abs() <= tol, "{label}: {}: gpu {gv} vs f64 {rv} (cpu f32 {cv})", names[q]);
            }
            if mx.is_some_and(|m| m.gamma < 1e-4) {
                assert_eq!(gm[1], 0.0, "{label}: dgamma must be 0 while the clamp is active");
            }
        }
        _ => assert_eq!(gm, &[0.0; 3][..], "{label}: dmix without mixture is zeroed"),
    }
}

#[test]
fn merge_bwd_matches_cpu() {
    let Some(gpu) = setup() else { return };
    for (si, &(n_in, n_out, rh)) in SHAPES.iter().enumerate() {
        let (a, b) = params(n_in, n_out, rh, 20 + si as u64);
        let g = rand32(n_in * n_out, 30 + si as u64, 1.0);
        let (dav, dbv, dg) = (up(&gpu, &a), up(&gpu, &b), up(&gpu, &g));
        let a64: Vec<f64> = a.iter().map(|&v| v as f64).collect();
        let b64: Vec<f64> = b.iter().map(|&v| v as f64).collect();
        let g64: Vec<f64> = g.iter().map(|&v| v as f64).collect();
        for mx in mix_cases(n_in) {
            println!("merge bwd {n_in}x{n_out} rh={rh} mix={mx:?}");
            let (mut wa, mut wb) = (vec![0f32; a.len()], vec![0f32; b.len()]);
            let wmix = cpu_merge::merge_bwd(&a, &b, H, n_in, n_out, rh, mx, &g, &mut wa, &mut wb);
            let (mut wa64, mut wb64) = (vec![0f64; a.len()], vec![0f64; b.len()]);
            let mx64 = mx.map(|m| Mixture { alpha: m.alpha as f64, gamma: m.gamma as f64, beta: m.beta as f64 });
            let wmix64 = cpu_merge::merge_bwd(&a64, &b64, H, n_in, n_out, rh, mx64, &g64, &mut wa64, &mut wb64);

            let dmixin = mx.map(|m| up(&gpu, &[m.alpha, m.gamma, m.beta]));
            let run = || {
                let mut ga = gpu.zeros(a.len()).unwrap();
                let mut gb = gpu.zeros(b.len()).unwrap();
                let mut gm = up(&gpu, &[7.0, 7.0, 7.0]);
                let mv = dmixin.as_ref().map(|x| x.slice(..));
                let mut gmv = gm.slice_mut(..);
                merge::merge_bwd(
                    &gpu, &dav.slice(..), &dbv.slice(..), H, n_in, n_out, rh, mv.as_ref(), &dg.slice(..),
                    &mut ga.slice_mut(..), &mut gb.slice_mut(..), Some(&mut gmv),
                )
                .unwrap();
                (down(&gpu, &ga), down(&gpu, &gb), down(&gpu, &gm))
            };
            let (ga, gb, gm) = run();
            let a32_64: Vec<f32> = wa64.iter().map(|&v| v as f32).collect();
            let b32_64: Vec<f32> = wb64.iter().map(|&v| v as f32).collect();
            check("dA", &ga, &wa, 1e-4);
            check("dB", &gb, &wb, 1e-4);
            print!("  (vs f64)");
            check("dA", &ga, &a32_64, 1e-4);
            print!("  (vs f64)");
            check("dB", &gb, &b32_64, 1e-4);
            check_dmix("merge bwd", &gm, wmix, wmix64, mx);
            // Determinism: a second run gives the same bits.
            let (ga2, gb2, gm2) = run();
            let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            assert!(bits(&ga) == bits(&ga2) && bits(&gb) == bits(&gb2) && bits(&gm) == bits(&gm2), "merge_bwd is not deterministic");

            // The backward-time path: merge_fwd_saving gives the same M bits as merge_fwd and keeps K
            // and D; merge_bwd_saved from them gives the recomputing backward's bits (the same K, D,
            // row-statistics reduction tree, E arithmetic and tile sums).
            let mv = dmixin.as_ref().map(|x| x.slice(..));
            let (mut m1, mut m2) = (gpu.zeros(n_in * n_out).unwrap(), gpu.zeros(n_in * n_out).unwrap());
            merge::merge_fwd(&gpu, &dav.slice(..), &dbv.slice(..), H, n_in, n_out, rh, mv.as_ref(), &mut m1.slice_mut(..)).unwrap();
            let saved = merge::merge_fwd_saving(&gpu, &dav.slice(..), &dbv.slice(..), H, n_in, n_out, rh, mv.as_ref(), &mut m2.slice_mut(..)).unwrap();
            assert_eq!(bits(&down(&gpu, &m1)), bits(&down(&gpu, &m2)), "merge_fwd_saving changed M");
            let (mut sa, mut sb, mut sm) = (gpu.zeros(a.len()).unwrap(), gpu.zeros(b.len()).unwrap(), up(&gpu, &[7.0f32, 7.0, 7.0]));
            {
                let mut smv = sm.slice_mut(..);
                merge::merge_bwd_saved(&gpu, Some(&saved), &dav.slice(..), &dbv.slice(..), H, n_in, n_out, rh, mv.as_ref(), &dg.slice(..), &mut sa.slice_mut(..), &mut sb.slice_mut(..), Some(&mut smv)).unwrap();
            }
            let (sa, sb, sm) = (down(&gpu, &sa), down(&gpu, &sb), down(&gpu, &sm));
            let differ = |x: &[f32], y: &[f32]| x.iter().zip(y).filter(|(p, q)| p.to_bits() != q.to_bits()).count();
            println!("  saved vs recomputed: {} of {} dA, {} of {} dB, {} of 3 dmix values differ in bits", differ(&sa, &ga), ga.len(), differ(&sb, &gb), gb.len(), differ(&sm, &gm));
            // one tiles kernel with one arithmetic and sum order for both sources of K and D
            assert_eq!((differ(&sa, &ga), differ(&sb, &gb), differ(&sm, &gm)), (0, 0, 0), "saved vs recomputed backward differ in bits");
            print!("  (saved vs cpu)");
            check("dA", &sa, &wa, 1e-4);
        }
    }
}

/// The fused backward from the layer's weight gradient (`merge_bwd_from_grad`: the chunk's columns of
/// `G [in, 3·out]`, the forward's kept set, every sparsify rule) against the CPU composition: Ĝ =
/// `sparsify_bwd` of the GPU's `M` with that set, then `merge_bwd` (f32, and f64 for `dmix`), at the
/// tolerances of `merge_bwd_matches_cpu`; deterministic. Shapes: odd sizes, the ViT-B chunk
/// shapes, and rows wider than 3072 (the re-reading variant of the row kernel).
#[test]
fn merge_bwd_from_grad_matches_cpu_composition() {
    let Some(gpu) = setup() else { return };
    let shapes = [(5usize, 7usize, 3usize), (33, 65, 32), (768, 768, 16), (200, 3072, 16), (3072, 200, 16), (9, 3300, 4), (1111, 45, 6)];
    for (si, &(n_in, c, rh)) in shapes.iter().enumerate() {
        let (a, b) = params(n_in, c, rh, 60 + si as u64);
        let (dav, dbv) = (up(&gpu, &a), up(&gpu, &b));
        let ld = 3 * c; // the middle chunk of a qkv-like layer gradient
        let gfull = rand32(n_in * ld, 70 + si as u64, 1.0);
        let dgf = up(&gpu, &gfull);
        let g: Vec<f32> = (0..n_in).flat_map(|i| gfull[i * ld + c..i * ld + 2 * c].to_vec()).collect();
        let n = n_in * c;
        for mx in mix_cases(n_in) {
            let mixv = mx.map(|m| up(&gpu, &[m.alpha, m.gamma, m.beta]));
            let mv = mixv.as_ref().map(|x| x.slice(..));
            for (rule, k) in [(SparsifyRule::MagnitudeProduct, n - n * 7 / 10), (SparsifyRule::SoftThreshold, n / 3 + 1), (SparsifyRule::Mask, n)] {
                let label = format!("from_grad {n_in}x{c} rh={rh} mix={} {rule:?} k={k}", mx.is_some());
                let mut dm = gpu.zeros(n).unwrap();
                let kept = merge::merge_fwd_select(&gpu, &dav.slice(..), &dbv.slice(..), H, n_in, c, rh, mv.as_ref(), &mut dm.slice_mut(..), k).unwrap();
                let m = down(&gpu, &dm);
                let set = topk::kept_to_host(&gpu, &kept).unwrap();
                let mut gh = vec![0f32; n];
                cpu_sparsify::sparsify_bwd(&m, &set, rule, &g, &mut gh);
                let (mut wa, mut wb) = (vec![0f32; a.len()], vec![0f32; b.len()]);
                let wmix = cpu_merge::merge_bwd(&a, &b, H, n_in, c, rh, mx, &gh, &mut wa, &mut wb);
                let to64 = |v: &[f32]| v.iter().map(|&x| x as f64).collect::<Vec<f64>>();
                let (mut wa64, mut wb64) = (vec![0f64; a.len()], vec![0f64; b.len()]);
                let mx64 = mx.map(|m| Mixture { alpha: m.alpha as f64, gamma: m.gamma as f64, beta: m.beta as f64 });
                let wmix64 = cpu_merge::merge_bwd(&to64(&a), &to64(&b), H, n_in, c, rh, mx64, &to64(&gh), &mut wa64, &mut wb64);
                let run = || {
                    let (mut ga, mut gb, mut gm) = (up(&gpu, &vec![f32::NAN; a.len()]), up(&gpu, &vec![f32::NAN; b.len()]), up(&gpu, &[7.0f32, 7.0, 7.0]));
                    {
                        let mut gmv = gm.slice_mut(..);
                        merge::merge_bwd_from_grad(
                            &gpu, &dav.slice(..), &dbv.slice(..), H, n_in, c, rh, mv.as_ref(), &dgf.slice(c..), ld, &kept, rule,
                            &mut ga.slice_mut(..), &mut gb.slice_mut(..), Some(&mut gmv),
                        )
                        .unwrap();
                    }
                    (down(&gpu, &ga), down(&gpu, &gb), down(&gpu, &gm))
                };
                let (ga, gb, gm) = run();
                println!("{label}");
                check("dA", &ga, &wa, 1e-4);
                check("dB", &gb, &wb, 1e-4);
                check_dmix(&label, &gm, wmix, wmix64, mx);
                let (ga2, gb2, gm2) = run();
                let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                assert!(bits(&ga) == bits(&ga2) && bits(&gb) == bits(&gb2) && bits(&gm) == bits(&gm2), "{label}: not deterministic");
            }
        }
    }
    // a gradient too short for its rows is refused, naming G
    let (a, b) = params(4, 6, 2, 1);
    let (dav, dbv, dg) = (up(&gpu, &a), up(&gpu, &b), gpu.zeros(20).unwrap());
    let mut dm = gpu.zeros(24).unwrap();
    let kept = merge::merge_fwd_select(&gpu, &dav.slice(..), &dbv.slice(..), H, 4, 6, 2, None, &mut dm.slice_mut(..), 5).unwrap();
    let (mut ga, mut gb) = (gpu.zeros(a.len()).unwrap(), gpu.zeros(b.len()).unwrap());
    let e = merge::merge_bwd_from_grad(&gpu, &dav.slice(..), &dbv.slice(..), H, 4, 6, 2, None, &dg.slice(..), 6, &kept, SparsifyRule::Mask, &mut ga.slice_mut(..), &mut gb.slice_mut(..), None).unwrap_err();
    assert!(format!("{e}").contains('G'), "{e}");
    // and a mixture gradient shorter than [α, γ, β], naming dmix (nothing is launched)
    let dg = gpu.zeros(24).unwrap();
    let (mixv, mut dmix) = (up(&gpu, &[1.0f32, 1.0, 0.0]), gpu.zeros(2).unwrap());
    let mut dmv = dmix.slice_mut(..);
    let e = merge::merge_bwd_from_grad(
        &gpu, &dav.slice(..), &dbv.slice(..), H, 4, 6, 2, Some(&mixv.slice(..)), &dg.slice(..), 6, &kept, SparsifyRule::Mask, &mut ga.slice_mut(..), &mut gb.slice_mut(..), Some(&mut dmv),
    )
    .unwrap_err();
    assert!(format!("{e}").contains("dmix"), "{e}");
}

#[test]
fn merge_rejects_bad_shapes() {
    let Some(gpu) = setup() else { return };
    let a = gpu.zeros(10).unwrap();
    let b = gpu.zeros(10).unwrap();
    let mut m = gpu.zeros(10).unwrap();
    let r = merge::merge_fwd(&gpu, &a.slice(..), &b.slice(..), 2, 5, 5, 3, None, &mut m.slice_mut(..));
    assert!(r.is_err(), "a short A must be rejected");
    let (a200, b200) = (gpu.zeros(200).unwrap(), gpu.zeros(200).unwrap());
    let r = merge::merge_fwd(&gpu, &a200.slice(..), &b200.slice(..), 1, 1, 1, 200, None, &mut m.slice_mut(..));
    assert!(r.is_err(), "rh beyond the shared-memory limit must be rejected");
    let r = merge::merge_fwd(&gpu, &a200.slice(..), &b200.slice(..), 9, 2, 2, 1, None, &mut m.slice_mut(..));
    match r {
        Err(snella_core::SnellaError::Config { field, .. }) => assert_eq!(field, "heads", "H = 9: the error names the field"),
        other => panic!("H = 9 must be rejected with a Config error naming `heads`, got {other:?}"),
    }
}

/// The backward for other piece counts (the tiles kernel lays H·32 rows × ⌊256 / (H·32)⌋ r-groups
/// over its 256 threads; (2, 28) takes the RM = 8 instantiation, the others RM = 6) and for a run of
/// column tiles that does not divide the tile count (640×2500: 79 column tiles, 2 per block on an
/// H200), and at the largest `r/H` for H = 8 and 2 (6 and 75: above 47 KiB of shared memory, the
/// kernels opt in), with the mixture, against the CPU: `dA`, `dB` in f32 as in `merge_bwd_matches_cpu`, the
/// mixture gradients against f64 with that test's bound; the saved path gives the same bits.
#[test]
fn merge_bwd_other_piece_counts() {
    let Some(gpu) = setup() else { return };
    let cases = [(1usize, 70usize, 90usize, 8usize), (3, 70, 90, 5), (5, 40, 33, 3), (8, 40, 33, 4), (2, 70, 90, 28), (2, 640, 2500, 16), (8, 40, 33, 6), (2, 70, 90, 75)];
    for &(h, n_in, n_out, rh) in &cases {
        let a = rand32(h * n_in * rh, 500 + h as u64, 0.3);
        let b = rand32(h * n_out * rh, 600 + h as u64, 0.3);
        let g = rand32(n_in * n_out, 700 + h as u64, 1.0);
        let mx = mixture(0.9);
        let (mut wa, mut wb) = (vec![0f32; a.len()], vec![0f32; b.len()]);
        let w32 = cpu_merge::merge_bwd(&a, &b, h, n_in, n_out, rh, Some(mx), &g, &mut wa, &mut wb).expect("mixture gradients");
        let (a64, b64, g64): (Vec<f64>, Vec<f64>, Vec<f64>) =
            (a.iter().map(|&v| v as f64).collect(), b.iter().map(|&v| v as f64).collect(), g.iter().map(|&v| v as f64).collect());
        let (mut wa64, mut wb64) = (vec![0f64; a.len()], vec![0f64; b.len()]);
        let mx64 = Mixture { alpha: mx.alpha as f64, gamma: mx.gamma as f64, beta: mx.beta as f64 };
        let w64 = cpu_merge::merge_bwd(&a64, &b64, h, n_in, n_out, rh, Some(mx64), &g64, &mut wa64, &mut wb64).expect("mixture gradients");
        let (da, db, dg, dmix) = (up(&gpu, &a), up(&gpu, &b), up(&gpu, &g), up(&gpu, &[mx.alpha, mx.gamma, mx.beta]));
        let (mut ga, mut gb, mut gm) = (gpu.zeros(a.len()).unwrap(), gpu.zeros(b.len()).unwrap(), gpu.zeros(3).unwrap());
        let mv = dmix.slice(..);
        let mut gmv = gm.slice_mut(..);
        merge::merge_bwd(&gpu, &da.slice(..), &db.slice(..), h, n_in, n_out, rh, Some(&mv), &dg.slice(..), &mut ga.slice_mut(..), &mut gb.slice_mut(..), Some(&mut gmv)).unwrap();
        println!("merge bwd H={h} {n_in}x{n_out} rh={rh}");
        let (ga, gb, gm) = (down(&gpu, &ga), down(&gpu, &gb), down(&gpu, &gm));
        check("dA", &ga, &wa, 1e-4);
        check("dB", &gb, &wb, 1e-4);
        let (c32, c64) = ([w32.alpha, w32.gamma, w32.beta], [w64.alpha, w64.gamma, w64.beta]);
        for q in 0..3 {
            let (gv, cv, rv) = (gm[q] as f64, c32[q] as f64, c64[q]);
            let tol = 1e-4 * rv.abs() + 4.0 * (cv - rv).abs() + 1e-30;
            assert!((gv - rv).abs() <= tol, "H={h} dmix[{q}]: gpu {gv} vs f64 {rv} (cpu f32 {cv})");
        }
        // the backward-time path (saved K, D) gives the same bits
        let mut m2 = gpu.zeros(n_in * n_out).unwrap();
        let saved = merge::merge_fwd_saving(&gpu, &da.slice(..), &db.slice(..), h, n_in, n_out, rh, Some(&mv), &mut m2.slice_mut(..)).unwrap();
        let (mut sa, mut sb, mut sm) = (gpu.zeros(a.len()).unwrap(), gpu.zeros(b.len()).unwrap(), gpu.zeros(3).unwrap());
        {
            let mut smv = sm.slice_mut(..);
            merge::merge_bwd_saved(&gpu, Some(&saved), &da.slice(..), &db.slice(..), h, n_in, n_out, rh, Some(&mv), &dg.slice(..), &mut sa.slice_mut(..), &mut sb.slice_mut(..), Some(&mut smv)).unwrap();
        }
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        assert!(bits(&down(&gpu, &sa)) == bits(&ga) && bits(&down(&gpu, &sb)) == bits(&gb) && bits(&down(&gpu, &sm)) == bits(&gm), "H={h}: saved vs recomputed backward differ in bits");
    }
}

fn key(x: f32) -> u32 {
    let a = x.abs();
    if a > 0.0 {
        a.to_bits()
    } else {
        0
    }
}

/// One past the flat index of the `ties`-th entry whose magnitude key equals the threshold's (0 for none).
fn host_tie_cut(m: &[f32], threshold: f64, ties: usize) -> usize {
    if ties == 0 {
        return 0;
    }
    let t = key(threshold as f32);
    let mut seen = 0;
    for (i, &x) in m.iter().enumerate() {
        if key(x) == t {
            seen += 1;
            if seen == ties {
                return i + 1;
            }
        }
    }
    panic!("fewer than {ties} ties");
}

/// GPU select on `m` vs the CPU's select on `|m|`; returns the GPU kept set (device) and the CPU's.
fn check_topk(gpu: &Gpu, dm: &CudaSlice<f32>, m: &[f32], k: usize, label: &str) -> (topk::CudaKept, KeptSet) {
    let n = m.len();
    let kept = topk::select_topk(gpu, &dm.slice(..), n, k).unwrap();
    let words = topk::kept_words(gpu, &kept).unwrap();
    let got = topk::kept_to_host(gpu, &kept).unwrap();
    let mags: Vec<f32> = m.iter().map(|x| x.abs()).collect();
    let want = cpu_topk::select_topk(&mags, k);
    assert_eq!(got, want, "{label}: n={n} k={k}: kept set");
    let cut = host_tie_cut(m, want.threshold, want.ties);
    assert_eq!(words[topk::W_TIE_CUT] as usize, cut, "{label}: n={n} k={k}: tie cut");
    let thr = words[topk::W_THRESHOLD];
    let count = m.iter().enumerate().filter(|&(i, &x)| key(x) > thr || (key(x) == thr && i < cut)).count();
    assert_eq!(count, k, "{label}: n={n}: kept count");
    (kept, want)
}

fn ks(n: usize) -> Vec<usize> {
    let mut v = vec![0, 1, 2, n / 3, kept_count(n, 0.5), kept_count(n, 0.99), n.saturating_sub(1), n];
    v.retain(|&k| k <= n);
    v.sort();
    v.dedup();
    v
}

#[test]
fn topk_random_matches_cpu() {
    let Some(gpu) = setup() else { return };
    for (si, &n) in [1usize, 35, 1000 * 37, 192 * 768, 768 * 3072].iter().enumerate() {
        let m = rand32(n, 40 + si as u64, 1.0);
        let dm = up(&gpu, &m);
        for k in ks(n) {
            check_topk(&gpu, &dm, &m, k, "random");
        }
    }
    println!("topk random: ok");
}

#[test]
fn topk_ties_and_special_values() {
    let Some(gpu) = setup() else { return };
    // 10 levels: huge tie groups (signs kept, so ±x tie).
    for (si, &n) in [3001usize, 192 * 768].iter().enumerate() {
        let m: Vec<f32> = rand_vec(n, 50 + si as u64, 1.0).iter().map(|x| ((x * 10.0).trunc() / 10.0) as f32).collect();
        let dm = up(&gpu, &m);
        let mut kk = ks(n);
        kk.extend([150, 300, 301, 1500, 2999].iter().filter(|&&k| k <= n));
        for k in kk {
            check_topk(&gpu, &dm, &m, k, "quantised");
        }
    }
    let cases: Vec<(Vec<f32>, &str)> = vec![
        (vec![0.25; 1000], "all equal"),
        (vec![0.0; 10], "all zero"),
        (vec![f32::NAN, 0.5, -0.0, 3.0, f32::NAN, 0.0, -3.0, f32::INFINITY, 1e-45, -1e-45, f32::NEG_INFINITY], "special"),
        (vec![-2.0, 2.0, -2.0, 2.0, 1.0], "signed ties"),
    ];
    for (m, label) in cases {
        let dm = up(&gpu, &m);
        for k in 0..=m.len().min(12) {
            check_topk(&gpu, &dm, &m, k, label);
        }
        for k in ks(m.len()) {
            check_topk(&gpu, &dm, &m, k, label);
        }
    }
    // n = 0.
    let dm = gpu.zeros(1).unwrap();
    let kept = topk::select_topk(&gpu, &dm.slice(..), 0, 0).unwrap();
    assert_eq!(topk::kept_to_host(&gpu, &kept).unwrap(), KeptSet { threshold: 0.0, ties: 0, k: 0, tau: 0.0 });
    assert!(topk::select_topk(&gpu, &dm.slice(..), 1, 2).is_err(), "k > n must be rejected");
    println!("topk ties/special: ok");
}

/// SplitMix64 magnitudes in [0, 1) quantised to 2^-20 (so ties are plentiful), with random signs.
fn big_vector(n: usize) -> Vec<f32> {
    (0..n)
        .map(|i| {
            let mut z = (i as u64).wrapping_mul(0x9E3779B97F4A7C15).wrapping_add(0x1234_5678);
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58476D1CE4E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D049BB133111EB);
            z ^= z >> 31;
            let v = ((z >> 44) as f32) / (1u32 << 20) as f32;
            if z & 1 == 1 {
                -v
            } else {
                v
            }
        })
        .collect()
}

#[test]
fn topk_and_sparsify_over_2_pow_24() {
    let Some(gpu) = setup() else { return };
    let n = (1usize << 24) + 777;
    let m = big_vector(n);
    let dm = up(&gpu, &m);
    let g = rand32(n, 77, 1.0);
    let dg = up(&gpu, &g);
    for k in [kept_count(n, 0.7), n / 2 + 1, 1, n] {
        let t = std::time::Instant::now();
        let (kept, want) = check_topk(&gpu, &dm, &m, k, "2^24+777");
        println!("topk n={n} k={k}: {want:?} (incl. checks {:?})", t.elapsed());
        for rule in [SparsifyRule::MagnitudeProduct, SparsifyRule::SoftThreshold] {
            check_sparsify(&gpu, &dm, &m, &dg, &g, &kept, &want, rule, "2^24+777");
        }
    }
}

/// Bitwise equality, NaN matching NaN.
fn same_bits(name: &str, got: &[f32], want: &[f32]) {
    assert_eq!(got.len(), want.len());
    for i in 0..want.len() {
        let ok = got[i].to_bits() == want[i].to_bits() || (got[i].is_nan() && want[i].is_nan());
        assert!(ok, "{name}[{i}]: gpu {} ({:#x}) vs cpu {} ({:#x})", got[i], got[i].to_bits(), want[i], want[i].to_bits());
    }
}

#[allow(clippy::too_many_arguments)]
fn check_sparsify(
    gpu: &Gpu, dm: &CudaSlice<f32>, m: &[f32], dg: &CudaSlice<f32>, g: &[f32], kept: &topk::CudaKept, set: &KeptSet,
    rule: SparsifyRule, label: &str,
) {
    let n = m.len();
    let mut want = vec![0f32; n];
    cpu_sparsify::sparsify_fwd(m, set, rule, &mut want);
    let mut out = gpu.zeros(n).unwrap();
    sparsify::sparsify_fwd(gpu, &dm.slice(..), kept, rule, &mut out.slice_mut(..)).unwrap();
    same_bits(&format!("{label} {rule:?} k={} fwd", set.k), &down(gpu, &out), &want);
    cpu_sparsify::sparsify_bwd(m, set, rule, g, &mut want);
    sparsify::sparsify_bwd(gpu, &dm.slice(..), kept, rule, &dg.slice(..), &mut out.slice_mut(..)).unwrap();
    same_bits(&format!("{label} {rule:?} k={} bwd", set.k), &down(gpu, &out), &want);
}

#[test]
fn sparsify_matches_cpu_bitwise() {
    let Some(gpu) = setup() else { return };
    let rules = [SparsifyRule::MagnitudeProduct, SparsifyRule::SoftThreshold, SparsifyRule::Mask];
    let mut sets: Vec<(Vec<f32>, &str)> = vec![
        (rand32(1000 * 37, 60, 1.0), "random"),
        (rand_vec(192 * 768, 61, 1.0).iter().map(|x| ((x * 8.0).round() / 8.0) as f32).collect(), "quantised"),
        (vec![-3.0, 1.0, 2.0, -2.0, 2.0, 0.5, -2.0], "small ties"),
        (vec![f32::NAN, 0.5, -0.0, 3.0, f32::NAN, 0.0, -3.0, f32::INFINITY, 1e-45], "special"),
    ];
    sets.push((vec![0.0; 9], "zeros"));
    for (si, (m, label)) in sets.iter().enumerate() {
        let n = m.len();
        let g = rand32(n, 70 + si as u64, 2.0);
        let (dm, dg) = (up(&gpu, m), up(&gpu, &g));
        for k in ks(n) {
            let (kept, set) = check_topk(&gpu, &dm, m, k, label);
            for rule in rules {
                check_sparsify(&gpu, &dm, m, &dg, &g, &kept, &set, rule, label);
            }
        }
    }
    println!("sparsify: ok");
}

/// Timing of the training-step sizes: a report, not a test (it asserts nothing), so it is ignored
/// by default; the GPU run script runs it with `--ignored --nocapture` into its own log.
#[test]
#[ignore = "timing report (asserts nothing): run with --ignored --nocapture"]
fn timing_report() {
    let Some(gpu) = setup() else { return };
    for &(n_in, n_out, rh) in &[(192usize, 768usize, 4usize), (768, 3072, 16)] {
        let (a, b) = params(n_in, n_out, rh, 90);
        let g = rand32(n_in * n_out, 91, 1.0);
        let (da, db, dg) = (up(&gpu, &a), up(&gpu, &b), up(&gpu, &g));
        let mixv = up(&gpu, &[1.0, 1.0, 0.0]);
        let mut dm = gpu.zeros(n_in * n_out).unwrap();
        let mut dw = gpu.zeros(n_in * n_out).unwrap();
        let (mut ga, mut gb, mut gm) = (gpu.zeros(a.len()).unwrap(), gpu.zeros(b.len()).unwrap(), gpu.zeros(3).unwrap());
        let reps = 50;
        let time = |f: &mut dyn FnMut()| {
            f();
            gpu.sync().unwrap();
            let t = std::time::Instant::now();
            for _ in 0..reps {
                f();
            }
            gpu.sync().unwrap();
            t.elapsed() / reps
        };
        let mv = mixv.slice(..);
        let tf = time(&mut || {
            merge::merge_fwd(&gpu, &da.slice(..), &db.slice(..), H, n_in, n_out, rh, Some(&mv), &mut dm.slice_mut(..)).unwrap()
        });
        let tb = time(&mut || {
            let mut gmv = gm.slice_mut(..);
            merge::merge_bwd(&gpu, &da.slice(..), &db.slice(..), H, n_in, n_out, rh, Some(&mv), &dg.slice(..), &mut ga.slice_mut(..), &mut gb.slice_mut(..), Some(&mut gmv)).unwrap()
        });
        let k = kept_count(n_in * n_out, 0.5);
        let tk = time(&mut || {
            std::hint::black_box(topk::select_topk(&gpu, &dm.slice(..), n_in * n_out, k).unwrap());
        });
        let kept = topk::select_topk(&gpu, &dm.slice(..), n_in * n_out, k).unwrap();
        let ts = time(&mut || {
            sparsify::sparsify_fwd(&gpu, &dm.slice(..), &kept, SparsifyRule::MagnitudeProduct, &mut dw.slice_mut(..)).unwrap();
        });
        let tn = time(&mut || {
            merge::merge_fwd(&gpu, &da.slice(..), &db.slice(..), H, n_in, n_out, rh, None, &mut dm.slice_mut(..)).unwrap()
        });
        let tnb = time(&mut || {
            merge::merge_bwd(&gpu, &da.slice(..), &db.slice(..), H, n_in, n_out, rh, None, &dg.slice(..), &mut ga.slice_mut(..), &mut gb.slice_mut(..), None).unwrap()
        });
        println!(
            "timing {n_in}x{n_out} rh={rh} (wall per call, {reps} queued): merge fwd {tf:?} (snell {tn:?}), merge bwd {tb:?} (snell {tnb:?}), select_topk {tk:?}, sparsify {ts:?}"
        );
    }
}

/// The allocator's EMA update on the device equals the CPU's bit for bit, over three steps, with
/// NaN/Inf/overflowing products counted (spec §5 decision: a non-finite importance counts as 0).
#[test]
fn importance_update_is_bit_exact() {
    let Some(gpu) = setup() else { return };
    use snella_core::snella::importance::importance_update as cpu_update;
    use snella_cuda::ops::importance::importance_update;
    for &n in &[1usize, 37, 4096 + 13, 3 * 768 * 16 + 5] {
        let (mut ib, mut ub) = (vec![0f32; n], vec![0f32; n]);
        let (gib, gub) = (up(&gpu, &ib), up(&gpu, &ub));
        let (mut gib, mut gub) = (gib, gub);
        for step in 0..3u64 {
            let p = rand32(n, 100 + step + n as u64, 2.0);
            let mut g = rand32(n, 200 + step + n as u64, 1e-3);
            if n > 30 {
                g[3] = f32::NAN;
                g[7] = f32::INFINITY;
                g[11] = f32::MAX; // |p·g| overflows to Inf
            }
            let want_bad = cpu_update(&p, &g, &mut ib, &mut ub, 0.85, 0.85);
            let (gp, gg) = (up(&gpu, &p), up(&gpu, &g));
            let mut bad = up(&gpu, &[0f32]);
            importance_update(&gpu, &gp.slice(..), &gg.slice(..), &mut gib.slice_mut(..), &mut gub.slice_mut(..), 0.85, 0.85, &mut bad.slice_mut(..)).unwrap();
            let got_bad = down(&gpu, &bad)[0] as usize;
            // the overflow case only counts where |p| ≥ 1 makes the product infinite
            assert_eq!(got_bad, want_bad, "n={n} step {step}: non-finite count");
            same_bits(&format!("ibar n={n} step {step}"), &down(&gpu, &gib), &ib);
            same_bits(&format!("ubar n={n} step {step}"), &down(&gpu, &gub), &ub);
        }
    }
}

/// The multi-tensor EMA update (one launch for all of a model's adapter factors) equals the CPU's
/// per-tensor update bit for bit, with each tensor's non-finite count in its own slot.
#[test]
fn importance_update_multi_is_bit_exact() {
    let Some(gpu) = setup() else { return };
    use snella_core::snella::importance::importance_update as cpu_update;
    use snella_cuda::ops::importance::{importance_update_multi, ImportanceTensor};
    let sizes = [1usize, 37, 4096 + 13, 3 * 768 * 16 + 5, 0, 70_000];
    let mut host: Vec<(Vec<f32>, Vec<f32>)> = sizes.iter().map(|&n| (vec![0f32; n], vec![0f32; n])).collect();
    let mut dev: Vec<_> = host.iter().map(|(i, u)| (up(&gpu, i), up(&gpu, u))).collect();
    for step in 0..3u64 {
        let mut want_bad = vec![0f32; 2 * sizes.len()];
        let mut inputs = Vec::new();
        for (t, &n) in sizes.iter().enumerate() {
            let p = rand32(n, 300 + step + 7 * t as u64, 2.0);
            let mut g = rand32(n, 400 + step + 7 * t as u64, 1e-3);
            if n > 30 {
                g[5 + t] = f32::NAN;
                g[9] = f32::NEG_INFINITY;
            }
            let (ib, ub) = &mut host[t];
            want_bad[2 * t + 1] = cpu_update(&p, &g, ib, ub, 0.85, 0.8) as f32;
            inputs.push((up(&gpu, &p), up(&gpu, &g)));
        }
        let mut bad = up(&gpu, &vec![0f32; 2 * sizes.len()]);
        let mut ts: Vec<ImportanceTensor<'_>> = inputs
            .iter()
            .zip(dev.iter_mut())
            .enumerate()
            .map(|(t, ((p, g), (ib, ub)))| ImportanceTensor { p, g, ibar: ib, ubar: ub, slot: 2 * t + 1 })
            .collect();
        importance_update_multi(&gpu, &mut ts, 0.85, 0.8, &mut bad).unwrap();
        drop(ts);
        assert_eq!(down(&gpu, &bad), want_bad, "step {step}: non-finite counts per slot");
        for (t, (ib, ub)) in host.iter().enumerate() {
            same_bits(&format!("ibar tensor {t} step {step}"), &down(&gpu, &dev[t].0)[..ib.len()], ib);
            same_bits(&format!("ubar tensor {t} step {step}"), &down(&gpu, &dev[t].1)[..ub.len()], ub);
        }
    }
    // a slot outside the counter buffer is refused before any launch
    let (p, g) = (up(&gpu, &[1.0; 4]), up(&gpu, &[1.0; 4]));
    let (mut ib, mut ub) = (up(&gpu, &[0.0; 4]), up(&gpu, &[0.0; 4]));
    let mut bad = up(&gpu, &[0.0; 2]);
    let mut ts = [ImportanceTensor { p: &p, g: &g, ibar: &mut ib, ubar: &mut ub, slot: 2 }];
    assert!(importance_update_multi(&gpu, &mut ts, 0.85, 0.85, &mut bad).is_err());
    println!("importance_update_multi: {} tensors x 3 steps bit-exact; counts per slot", sizes.len());
}

/// The fused transposed sparsify kernels against the CPU composition they replace (sparsify then
/// an accumulating transpose onto `W0`; a transpose then sparsify backward), bit for bit, on
/// shapes that do not divide the 32×32 tile, with ties (values rounded to a coarse grid), for
/// every rule; the bf16-weight variant against the f32 result rounded by `half`.
#[test]
fn sparsify_fused_with_weight_transpose_is_bit_exact() {
    let Some(gpu) = setup() else { return };
    use snella_cuda::ops::sparsify::{sparsify_bwd_from_weight, sparsify_into_weight, sparsify_into_weight_bf16};
    for &(n_in, c) in &[(1usize, 1usize), (33, 65), (70, 31), (192, 64), (97, 300)] {
        let n = n_in * c;
        // a coarse grid makes many equal magnitudes, so the tie cut matters
        let m: Vec<f32> = rand32(n, 7 + n as u64, 2.0).iter().map(|v| (v * 8.0).round() / 8.0).collect();
        let w0 = rand32(n, 8 + n as u64, 1.0);
        let gt = rand32(n, 9 + n as u64, 1.0);
        let (dm, dw0, dgt) = (up(&gpu, &m), up(&gpu, &w0), up(&gpu, &gt));
        for rule in [SparsifyRule::MagnitudeProduct, SparsifyRule::SoftThreshold, SparsifyRule::Mask] {
            for k in [1usize, n / 3 + 1, n] {
                let label = format!("{n_in}x{c} k={k} {rule:?}");
                let (kept, set) = check_topk(&gpu, &dm, &m, k, &label);
                // CPU: dw = sparsify(m); w = w0 + dwᵀ (w[o, i] = w0[o, i] + dw[i, o])
                let mut dw = vec![0f32; n];
                cpu_sparsify::sparsify_fwd(&m, &set, rule, &mut dw);
                let mut want_w = w0.clone();
                for i in 0..n_in {
                    for o in 0..c {
                        want_w[o * n_in + i] += dw[i * c + o];
                    }
                }
                let mut gw = up(&gpu, &vec![f32::NAN; n]);
                sparsify_into_weight(&gpu, &dm.slice(..), &kept, rule, Some(&dw0.slice(..)), n_in, c, &mut gw.slice_mut(..)).unwrap();
                same_bits(&format!("{label} w"), &down(&gpu, &gw), &want_w);
                // bf16 weight at an element offset: the f32 result rounded to nearest even (half's
                // rounding), the words around it untouched
                let off = 3;
                let mut gw16 = up(&gpu, &vec![0xFFFFu16; n + off + 2]);
                sparsify_into_weight_bf16(&gpu, &dm.slice(..), &kept, rule, &dw0.slice(..), n_in, c, &mut gw16, off).unwrap();
                let got16 = down(&gpu, &gw16);
                let want16: Vec<u16> = want_w.iter().map(|&v| half::bf16::from_f32(v).to_bits()).collect();
                assert_eq!(&got16[off..off + n], &want16[..], "{label} bf16 w");
                assert!(got16[..off].iter().chain(&got16[off + n..]).all(|&v| v == 0xFFFF), "{label} bf16 w: outside the chunk written");
                // without W0: ΔWᵀ alone, as the composition onto zeros (0 + x: a −0 becomes +0)
                let mut want_d = vec![0f32; n];
                for i in 0..n_in {
                    for o in 0..c {
                        want_d[o * n_in + i] += dw[i * c + o];
                    }
                }
                sparsify_into_weight(&gpu, &dm.slice(..), &kept, rule, None, n_in, c, &mut gw.slice_mut(..)).unwrap();
                same_bits(&format!("{label} ΔWᵀ"), &down(&gpu, &gw), &want_d);
                // CPU: g = gtᵀ (g[i, o] = gt[o, i]); gh = sparsify_bwd(m, g)
                let mut g = vec![0f32; n];
                for i in 0..n_in {
                    for o in 0..c {
                        g[i * c + o] = gt[o * n_in + i];
                    }
                }
                let mut want_gh = vec![0f32; n];
                cpu_sparsify::sparsify_bwd(&m, &set, rule, &g, &mut want_gh);
                let mut gh = up(&gpu, &vec![f32::NAN; n]);
                sparsify_bwd_from_weight(&gpu, &dgt.slice(..), &dm.slice(..), &kept, rule, n_in, c, &mut gh.slice_mut(..)).unwrap();
                same_bits(&format!("{label} gh"), &down(&gpu, &gh), &want_gh);
            }
        }
    }
}
