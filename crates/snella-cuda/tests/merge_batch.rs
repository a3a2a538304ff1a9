//! The batched forward merge path (`ops::merge_batch`, session 10) against the per-adapter path it
//! replaces (`merge_fwd_select`, then `sparsify_into_weight_bf16` per chunk): bit-identical bf16
//! weights and kept-set words for layers of several chunks whose adapters share launch groups with
//! other layers' adapters, SNELL and SNELLA, one and two kernel pieces, every rule, `k` from 0 to
//! `n`, odd shapes and a row wider than 3072 (the softmax's re-reading path). Without CUDA it
//! prints `skipped: no CUDA (...)` and returns (project rule).

use snella_core::snella::sparsify::SparsifyRule;
use snella_core::snella::topk::kept_count;
use snella_cuda::ops::merge_batch::{effective_weights_bf16, AdapterJob, LayerJob};
use snella_cuda::ops::{merge, sparsify, topk};

mod common;
use common::{down, rand32, setup, up};

/// One adapter's host description: heads, rh, mixture, k, rule.
struct Spec {
    heads: usize,
    rh: usize,
    mix: Option<[f32; 3]>,
    k: usize,
    rule: SparsifyRule,
}

#[test]
fn batched_effective_weights_equal_the_per_adapter_path() {
    let Some(gpu) = setup() else { return };
    use SparsifyRule::{Mask, MagnitudeProduct as Mp, SoftThreshold as St};
    let mixa = Some([1.1f32, 0.9, 0.01]);
    let mixb = Some([0.7f32, 1e-6, -0.02]); // γ under the clamp
    // (n_in, c, chunks): layers 0 and 2 share the (H=2, 33, 65, rh=4, mixture) group
    let layers: Vec<(usize, usize, Vec<Spec>)> = vec![
        (33, 65, vec![
            Spec { heads: 2, rh: 4, mix: mixa, k: kept_count(33 * 65, 0.7), rule: Mp },
            Spec { heads: 2, rh: 4, mix: mixb, k: 0, rule: Mp },
            Spec { heads: 2, rh: 4, mix: mixa, k: 33 * 65, rule: St },
        ]),
        (70, 31, vec![Spec { heads: 2, rh: 3, mix: None, k: 1, rule: Mask }]),
        (33, 65, vec![Spec { heads: 2, rh: 4, mix: mixa, k: 33 * 65 / 3, rule: St }]),
        (9, 4100, vec![Spec { heads: 2, rh: 4, mix: mixa, k: kept_count(9 * 4100, 0.5), rule: Mp }]),
        (97, 300, vec![
            Spec { heads: 1, rh: 8, mix: mixa, k: kept_count(97 * 300, 0.9), rule: Mp },
            Spec { heads: 1, rh: 8, mix: None, k: 5, rule: Mask },
        ]),
        (0, 12, vec![Spec { heads: 2, rh: 4, mix: mixa, k: 0, rule: Mp }]), // empty: no launch, zeroed state
    ];
    // host parameters, uploaded
    let mut seed = 500u64;
    let mut params = Vec::new();
    for (n_in, c, chunks) in &layers {
        let w0 = rand32(chunks.len() * c * n_in, seed, 1.0);
        let per: Vec<_> = chunks
            .iter()
            .map(|s| {
                seed += 3;
                let a = rand32(s.heads * n_in * s.rh, seed, 0.3);
                let mut b = rand32(s.heads * c * s.rh, seed + 1, 0.3);
                if *c > 2 && s.heads * s.rh > 0 {
                    // B row 2 equal to B row 0: equal columns of M, so ties at the threshold
                    let row0 = b[..s.rh].to_vec();
                    b[2 * s.rh..3 * s.rh].copy_from_slice(&row0);
                }
                (up(&gpu, &a), up(&gpu, &b), s.mix.map(|m| up(&gpu, &m)))
            })
            .collect();
        seed += 11;
        params.push((up(&gpu, &w0), per));
    }
    let jobs: Vec<LayerJob<'_>> = layers
        .iter()
        .zip(&params)
        .map(|((n_in, c, specs), (w0, per))| LayerJob {
            w0: w0.slice(..),
            n_in: *n_in,
            c: *c,
            chunks: specs
                .iter()
                .zip(per)
                .map(|(s, (a, b, mx))| AdapterJob { a: a.slice(..), b: b.slice(..), mix: mx.as_ref().map(|x| x.slice(..)), heads: s.heads, rh: s.rh, k: s.k, rule: s.rule })
                .collect(),
        })
        .collect();
    let got = effective_weights_bf16(&gpu, &jobs).unwrap();
    assert_eq!(got.len(), layers.len());
    let mut checked = 0;
    for (li, ((n_in, c, specs), (w0, per))) in layers.iter().zip(&params).enumerate() {
        let n = n_in * c;
        let mut want_w = up(&gpu, &vec![0u16; specs.len() * n]);
        for (ci, (s, (a, b, mx))) in specs.iter().zip(per).enumerate() {
            let mut m = gpu.zeros(n).unwrap();
            let mv = mx.as_ref().map(|x| x.slice(..));
            let kept = merge::merge_fwd_select(&gpu, &a.slice(..), &b.slice(..), s.heads, *n_in, *c, s.rh, mv.as_ref(), &mut m.slice_mut(..), s.k).unwrap();
            let w0c = w0.slice(ci * n..(ci + 1) * n);
            sparsify::sparsify_into_weight_bf16(&gpu, &m.slice(..), &kept, s.rule, &w0c, *n_in, *c, &mut want_w, ci * n).unwrap();
            let got_set = &got[li].1[ci];
            assert_eq!((got_set.n, got_set.k), (n, s.k), "layer {li} chunk {ci}: n, k");
            assert_eq!(topk::kept_words(&gpu, got_set).unwrap(), topk::kept_words(&gpu, &kept).unwrap(), "layer {li} chunk {ci}: kept words");
            checked += 1;
        }
        if n == 0 {
            continue; // (both weights are 1-element placeholders)
        }
        let (gw, ww) = (down(&gpu, &got[li].0), down(&gpu, &want_w));
        assert_eq!(gw.len(), ww.len(), "layer {li}: weight length");
        let differ = gw.iter().zip(&ww).filter(|(x, y)| x != y).count();
        assert_eq!(differ, 0, "layer {li} ({n_in}x{c}, {} chunks): {differ} bf16 weight words differ", specs.len());
    }
    println!("merge_batch: {checked} adapters in {} layers, weights and kept sets bit-identical to the per-adapter path", layers.len());
}

/// Bad input is refused by name before anything is launched.
#[test]
fn batched_effective_weights_refuse_short_tensors_and_k_beyond_n() {
    let Some(gpu) = setup() else { return };
    let (a, b, w0) = (up(&gpu, &[0.1f32; 2 * 8 * 4]), up(&gpu, &[0.1f32; 2 * 6 * 4]), up(&gpu, &[0f32; 48]));
    let job = |k: usize, bl: usize| LayerJob {
        w0: w0.slice(..),
        n_in: 8,
        c: 6,
        chunks: vec![AdapterJob { a: a.slice(..), b: b.slice(..bl), mix: None, heads: 2, rh: 4, k, rule: SparsifyRule::MagnitudeProduct }],
    };
    let e = effective_weights_bf16(&gpu, &[job(49, 48)]).err().expect("k > n refused").to_string();
    assert!(e.contains('k') && e.contains("48"), "{e}");
    let e = effective_weights_bf16(&gpu, &[job(5, 40)]).err().expect("short B refused").to_string();
    assert!(e.contains("chunk 0 B") && e.contains("48"), "{e}");
}

/// The batched adapter backward (`adapter_bwd_batch`) against `merge_bwd_from_grad` per adapter:
/// bit-identical `dA`, `dB` and `dmix` for adapters reading their chunk of a wider weight gradient
/// (row stride `ld > c`), in shared launch groups, SNELL and SNELLA (γ under the clamp too), and
/// an empty adapter (zeroed through the per-adapter path).
#[test]
fn batched_adapter_backward_equals_the_per_adapter_path() {
    let Some(gpu) = setup() else { return };
    use snella_cuda::ops::merge_batch::{adapter_bwd_batch, GradJob};
    // (n_in, c, chunks of a layer with ld = chunks·c, heads, rh, mixture per chunk)
    type Case = (usize, usize, usize, usize, Vec<Option<[f32; 3]>>);
    let cases: Vec<Case> = vec![
        (33, 65, 2, 4, vec![Some([1.1, 0.9, 0.01]), Some([0.7, 1e-6, -0.02]), None]),
        (33, 65, 2, 4, vec![Some([0.9, 1.2, 0.0])]),
        (70, 31, 1, 8, vec![None, Some([1.0, 1.0, 0.0])]),
        (9, 4100, 2, 4, vec![Some([1.0, 0.5, 0.1])]),
        (0, 12, 2, 4, vec![Some([1.0, 1.0, 0.0])]),
        // r/H = 8 and 16: the r8 and r32 tiles kernels
        (40, 50, 2, 8, vec![Some([1.0, 0.8, 0.2]), None]),
        (20, 300, 1, 16, vec![None, Some([1.1, 0.9, 0.0]), Some([0.7, 1.3, 0.3])]),
    ];
    struct One {
        a: cudarc::driver::CudaSlice<f32>,
        b: cudarc::driver::CudaSlice<f32>,
        mix: Option<cudarc::driver::CudaSlice<f32>>,
        kept: topk::CudaKept,
        rule: SparsifyRule,
        off: usize,
        layer: usize,
        /// Whether the job asks for `(∂α, ∂γ, ∂β)`: training asks only with a mixture (linear.rs),
        /// so SNELL jobs and every other mixture job go without (the batched path's no-dmix groups).
        dmix: bool,
    }
    let mut seed = 900u64;
    let mut grads = Vec::new();
    let mut ones = Vec::new();
    for (li, (n_in, c, heads, rh, mixes)) in cases.iter().enumerate() {
        let ld = c * mixes.len();
        grads.push(up(&gpu, &rand32((n_in * ld).max(1), seed, 1.0)));
        for (ci, mx) in mixes.iter().enumerate() {
            seed += 5;
            let (a, b) = (up(&gpu, &rand32((heads * n_in * rh).max(1), seed, 0.3)), up(&gpu, &rand32(heads * c * rh, seed + 1, 0.3)));
            let mix = mx.map(|m| up(&gpu, &m));
            let n = n_in * c;
            let mut m = gpu.zeros(n.max(1)).unwrap();
            let mv = mix.as_ref().map(|x| x.slice(..));
            let kept = merge::merge_fwd_select(&gpu, &a.slice(..), &b.slice(..), *heads, *n_in, *c, *rh, mv.as_ref(), &mut m.slice_mut(..), kept_count(n, 0.6)).unwrap();
            let rule = [SparsifyRule::MagnitudeProduct, SparsifyRule::SoftThreshold, SparsifyRule::Mask][ci % 3];
            let dmix = mix.is_some() && ones.len() % 2 == 0;
            ones.push(One { a, b, mix, kept, rule, off: ci * c, layer: li, dmix });
        }
    }
    let shape = |o: &One| {
        let (n_in, c, heads, rh, mixes) = &cases[o.layer];
        (*n_in, *c, *heads, *rh, c * mixes.len())
    };
    // the per-adapter path
    let mut want = Vec::new();
    for o in &ones {
        let (n_in, c, heads, rh, ld) = shape(o);
        let (mut da, mut db, mut dm) = (up(&gpu, &vec![f32::NAN; (heads * n_in * rh).max(1)]), up(&gpu, &vec![f32::NAN; heads * c * rh]), up(&gpu, &[f32::NAN; 3]));
        let mv = o.mix.as_ref().map(|x| x.slice(..));
        let mut dmv = dm.slice_mut(..);
        merge::merge_bwd_from_grad(&gpu, &o.a.slice(..), &o.b.slice(..), heads, n_in, c, rh, mv.as_ref(), &grads[o.layer].slice(o.off..), ld, &o.kept, o.rule, &mut da.slice_mut(..), &mut db.slice_mut(..), if o.dmix { Some(&mut dmv) } else { None }).unwrap();
        want.push((down(&gpu, &da), down(&gpu, &db), down(&gpu, &dm)));
    }
    // batched
    let mut outs: Vec<_> = ones
        .iter()
        .map(|o| {
            let (n_in, c, heads, rh, _) = shape(o);
            (up(&gpu, &vec![f32::NAN; (heads * n_in * rh).max(1)]), up(&gpu, &vec![f32::NAN; heads * c * rh]), up(&gpu, &[f32::NAN; 3]))
        })
        .collect();
    {
        let mut jobs: Vec<GradJob<'_, '_>> = ones
            .iter()
            .zip(outs.iter_mut())
            .map(|(o, (da, db, dm))| {
                let (n_in, c, heads, rh, ld) = shape(o);
                GradJob {
                    g: grads[o.layer].slice(o.off..),
                    ld,
                    kept: &o.kept,
                    rule: o.rule,
                    a: o.a.slice(..),
                    b: o.b.slice(..),
                    heads,
                    n_in,
                    c,
                    rh,
                    mix: o.mix.as_ref().map(|x| x.slice(..)),
                    da: da.slice_mut(..),
                    db: db.slice_mut(..),
                    dmix: if o.dmix { Some(dm.slice_mut(..)) } else { None },
                }
            })
            .collect();
        adapter_bwd_batch(&gpu, &mut jobs).unwrap();
    }
    for (i, ((da, db, dm), (wa, wb, wm))) in outs.iter().zip(&want).enumerate() {
        let bits = |x: &[f32]| x.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(&down(&gpu, da)), bits(wa), "adapter {i}: dA");
        assert_eq!(bits(&down(&gpu, db)), bits(wb), "adapter {i}: dB");
        assert_eq!(bits(&down(&gpu, dm)), bits(wm), "adapter {i}: dmix");
        assert!(wa.iter().chain(wb).all(|v| v.is_finite()), "adapter {i}: every gradient written");
        assert_eq!(wm.iter().all(|v| v.is_finite()), ones[i].dmix, "adapter {i}: dmix written exactly when asked for");
    }
    let asked = ones.iter().filter(|o| o.dmix).count();
    println!("adapter_bwd_batch: {} adapters ({asked} with dmix) bit-identical to merge_bwd_from_grad one by one", ones.len());
}
