//! The `Backend` trait's default compositions behind the fused adapter backward
//! (`linear_bwd_products_g`, `adapter_bwd_from_grad`; what a backend without fused kernels runs)
//! against `snella_core` directly on the CPU: the weight gradient in `ΔW`'s layout is the
//! transpose of `dyᵀ·x` bit for bit, and one chunk's backward from it equals `sparsify_bwd` of
//! that chunk's columns followed by `merge_bwd`, bit for bit (the same f32 operations in order).

use snella_core::snella::merge::{self as core_merge, Mixture};
use snella_core::snella::sparsify::{self as core_sparsify, SparsifyRule};
use snella_core::snella::topk::select_topk;
use snella_model::backend::{Backend, Weight};
use snella_model::cpu::CpuBackend;

fn rand(n: usize, seed: u64, scale: f64) -> Vec<f32> {
    snella_core::gradcheck::rand_vec(n, seed, scale).iter().map(|&v| v as f32).collect()
}

#[test]
fn adapter_backward_from_the_layer_gradient_equals_the_composition() {
    let be = CpuBackend;
    let (rows, n_in, c, chunks, heads, rh) = (7usize, 6usize, 5usize, 3usize, 2usize, 3usize);
    let n_out = c * chunks;
    let (x, dy, w) = (rand(rows * n_in, 1, 1.0), rand(rows * n_out, 2, 1.0), rand(n_out * n_in, 3, 1.0));
    // g = xᵀ·dy [n_in, n_out] and dx = dy·W
    let (xb, dyb, wb) = (be.upload(&x), be.upload(&dy), be.upload(&w));
    let (mut g, mut dx) = (be.zeros(n_in * n_out), be.zeros(rows * n_in));
    be.linear_bwd_products_g(&dyb, Weight::Buf(&wb), &xb, rows, n_in, n_out, Some(&mut dx), &mut g);
    let (mut gt, mut dx2) = (be.zeros(n_out * n_in), be.zeros(rows * n_in));
    be.linear_bwd_products(&dyb, Weight::Buf(&wb), &xb, rows, n_in, n_out, Some(&mut dx2), Some(&mut gt));
    let (g, gt) = (be.download(&g), be.download(&gt));
    assert_eq!(be.download(&dx), be.download(&dx2), "dx");
    for i in 0..n_in {
        for o in 0..n_out {
            assert_eq!(g[i * n_out + o].to_bits(), gt[o * n_in + i].to_bits(), "g[{i}, {o}] is not gt[{o}, {i}]");
        }
    }
    // chunk 1's adapter: Ĝ = sparsify_bwd(M, set, G[:, c..2c]) then merge_bwd
    let (a, b) = (rand(heads * n_in * rh, 4, 0.3), rand(heads * c * rh, 5, 0.3));
    let mix = Mixture { alpha: 1.1f32, gamma: 0.9, beta: 0.01 };
    let mut m = vec![0f32; n_in * c];
    core_merge::merge_fwd(&a, &b, heads, n_in, c, rh, Some(mix), &mut m);
    let set = select_topk(&m, 11);
    let gc: Vec<f32> = (0..n_in).flat_map(|i| g[i * n_out + c..i * n_out + 2 * c].to_vec()).collect();
    for rule in [SparsifyRule::MagnitudeProduct, SparsifyRule::SoftThreshold, SparsifyRule::Mask] {
        let mut gh = vec![0f32; n_in * c];
        core_sparsify::sparsify_bwd(&m, &set, rule, &gc, &mut gh);
        let (mut wa, mut wbb) = (vec![0f32; a.len()], vec![0f32; b.len()]);
        let wmix = core_merge::merge_bwd(&a, &b, heads, n_in, c, rh, Some(mix), &gh, &mut wa, &mut wbb).expect("mixture gradients");
        let (ab, bb, mixb, gb) = (be.upload(&a), be.upload(&b), be.upload(&[mix.alpha, mix.gamma, mix.beta]), be.upload(&g));
        let (mut da, mut db, mut dmix) = (be.zeros(a.len()), be.zeros(b.len()), be.zeros(3));
        be.adapter_bwd_from_grad(&gb, c, n_out, &set, rule, &ab, &bb, heads, n_in, c, rh, Some(&mixb), &mut da, &mut db, Some(&mut dmix));
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(&be.download(&da)), bits(&wa), "{rule:?}: dA");
        assert_eq!(bits(&be.download(&db)), bits(&wbb), "{rule:?}: dB");
        assert_eq!(bits(&be.download(&dmix)), bits(&[wmix.alpha, wmix.gamma, wmix.beta]), "{rule:?}: dmix");
    }
}
