//! Exact top-k by magnitude (spec §2): radix select, never a full sort; ties by lower flat index.
//!
//! Magnitudes are compared through [`mag_key`], the bit pattern of the magnitude as an `f64`
//! (monotone for non-negative values; NaN, zero and negative inputs all map to key 0, i.e. they
//! count as magnitude 0). The select runs most-significant-digit radix passes over those keys:
//! each pass builds a histogram (in parallel, integer counts, so order-independent and exact) of
//! one digit among the keys that share the digits fixed so far, and fixes the digit of the k-th
//! largest key. Once the candidate bucket is small it is gathered into a compact vector, so later
//! passes do not rescan the whole input.

use crate::Real;
use rayon::prelude::*;

/// The kept set `S` of one layer (spec §2), described without a mask: every entry with `|M| > threshold`
/// is kept, plus the first `ties` entries (in flat index order) with `|M| == threshold`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct KeptSet {
    /// The k-th largest magnitude (f64 holds every f32 exactly).
    pub threshold: f64,
    /// How many entries equal to `threshold` are kept, lowest flat indices first.
    pub ties: usize,
    /// The number of kept entries `k`.
    pub k: usize,
    /// `τ`, the largest dropped magnitude (0 when nothing is dropped), for the soft-threshold rule.
    pub tau: f64,
}

/// Elements per parallel work item of the scans in this module and in `sparsify` (fixed, so the
/// tie bookkeeping is independent of the thread count).
pub(crate) const PAR_CHUNK: usize = 1 << 16;

/// The order-preserving sort key of a magnitude (spec §2): the `f64` bit pattern of `x` for
/// `x > 0`, and 0 for `x ≤ 0` or NaN (NaN magnitudes count as 0).
#[inline(always)]
pub fn mag_key<T: Real>(x: T) -> u64 {
    let v = x.f64();
    if v > 0.0 {
        v.to_bits()
    } else {
        0
    }
}

/// The key of a [`KeptSet::threshold`] (same mapping as [`mag_key`]).
#[inline]
pub(crate) fn threshold_key(threshold: f64) -> u64 {
    mag_key(threshold)
}

/// `k = N − ⌊s·N⌋` (spec §2) for `n` entries at sparsity `s ∈ [0, 1)`.
pub fn kept_count(n: usize, sparsity: f64) -> usize {
    n - (sparsity * n as f64).floor() as usize
}

/// Histogram of the digit `(key >> shift) & (2^bits − 1)` over the keys `key & pmask == prefix`,
/// and the bitwise OR of those keys. One histogram per thread-sized slice (integer counts, so the
/// result does not depend on how the work is split).
fn hist_pass<S: Copy + Sync, F: Fn(S) -> u64 + Sync>(
    data: &[S], key: F, prefix: u64, pmask: u64, shift: u32, bits: u32,
) -> (Vec<u64>, u64) {
    let nb = 1usize << bits;
    let dmask = (nb - 1) as u64;
    let parts = rayon::current_num_threads().clamp(1, 64).min(data.len().div_ceil(PAR_CHUNK)).max(1);
    // u32 counts: each slice must hold fewer than 2^32 keys.
    let slice = data.len().div_ceil(parts).clamp(1, u32::MAX as usize);
    let hists: Vec<(Vec<u32>, u64)> = data
        .par_chunks(slice)
        .map(|chunk| {
            let mut h = vec![0u32; nb];
            let mut or = 0u64;
            for &x in chunk {
                let kk = key(x);
                if kk & pmask == prefix {
                    h[((kk >> shift) & dmask) as usize] += 1;
                    or |= kk;
                }
            }
            (h, or)
        })
        .collect();
    let mut total = vec![0u64; nb];
    let mut or = 0u64;
    for (h, o) in &hists {
        for (t, &c) in total.iter_mut().zip(h) {
            *t += c as u64;
        }
        or |= o;
    }
    (total, or)
}

/// The keys with `key & pmask == prefix`, in any order.
fn gather<S: Copy + Sync, F: Fn(S) -> u64 + Sync>(data: &[S], key: F, prefix: u64, pmask: u64) -> Vec<u64> {
    data.par_chunks(PAR_CHUNK)
        .flat_map_iter(|c| c.iter().map(|&x| key(x)).filter(|&kk| kk & pmask == prefix))
        .collect()
}

/// Exact selection of the `k` largest of `mags` (all `≥ 0`; NaN is treated as 0) (spec §2).
///
/// Radix select on [`mag_key`] (no sort), parallel histogram passes. The result keeps every entry
/// with magnitude `> threshold` plus the first `ties` entries equal to `threshold` (flat index
/// order), exactly `k` in all. `tau` is the largest dropped magnitude (0 when `k == n`); for
/// `k == 0`, `threshold = tau =` the largest magnitude and `ties = 0`.
///
/// # Panics
/// If `k > mags.len()`.
pub fn select_topk<T: Real>(mags: &[T], k: usize) -> KeptSet {
    let n = mags.len();
    assert!(k <= n, "select_topk: k = {k} exceeds the {n} entries");
    if n == 0 {
        return KeptSet { threshold: 0.0, ties: 0, k: 0, tau: 0.0 };
    }
    if k == 0 {
        let max = mags.par_chunks(PAR_CHUNK).map(|c| c.iter().map(|&x| mag_key(x)).max().unwrap_or(0)).max().unwrap_or(0);
        let m = f64::from_bits(max);
        return KeptSet { threshold: m, ties: 0, k: 0, tau: m };
    }
    let mut prefix = 0u64; // the digits of the k-th largest key fixed so far
    let mut pmask = 0u64; // which bits of `prefix` are fixed
    let mut need = k; // rank (from the top, 1-based) of the target among keys matching `prefix`
    let mut hi = 63u32; // bits [lo_bound, hi) remain to fix; bit 63 is always 0
    let mut lo_bound = 0u32;
    // `cands`: every key matching `prefix` once gathered. `tau_pool`: the latest gathered set that
    // also holds the (k+1)-th largest key (it had more than `need` entries), for `tau`.
    let mut cands: Option<Vec<u64>> = None;
    let mut tau_pool: Option<Vec<u64>> = None;
    let mut cands_hold_next = false;
    let mut bucket_count = n;
    let mut first = true;
    while hi > lo_bound {
        let width = if first && n >= 1 << 16 { 16 } else { 11 }.min(hi - lo_bound);
        let shift = hi - width;
        let (h, or) = match &cands {
            None => hist_pass(mags, mag_key::<T>, prefix, pmask, shift, width),
            Some(c) => hist_pass(c, |x| x, prefix, pmask, shift, width),
        };
        if first {
            // Bits below the lowest set bit of any key are 0 in every key: nothing to select there
            // (f32 magnitudes leave the low 29 bits of their f64 pattern empty).
            lo_bound = or.trailing_zeros().min(63);
            first = false;
        }
        let mut b = h.len() - 1;
        let mut above = 0usize;
        loop {
            let c = h[b] as usize;
            if above + c >= need {
                break;
            }
            above += c;
            b -= 1;
        }
        need -= above;
        bucket_count = h[b] as usize;
        prefix |= (b as u64) << shift;
        pmask |= ((h.len() - 1) as u64) << shift;
        hi = shift;
        let pool = cands.as_ref().map_or(n, Vec::len);
        if hi > lo_bound && bucket_count <= pool / 2 {
            let new = match &cands {
                None => gather(mags, mag_key::<T>, prefix, pmask),
                Some(c) => gather(c, |x| x, prefix, pmask),
            };
            if need < new.len() {
                tau_pool = None;
            } else if cands_hold_next {
                tau_pool = cands.take();
            }
            cands_hold_next = need < new.len();
            cands = Some(new);
        }
    }
    let threshold = f64::from_bits(prefix);
    let below = |c: &[u64]| c.iter().map(|&kk| if kk < prefix { kk } else { 0 }).max().unwrap_or(0);
    let tau = if k == n {
        0.0
    } else if need < bucket_count {
        threshold
    } else if let Some(c) = if cands_hold_next { cands.as_ref() } else { tau_pool.as_ref() } {
        f64::from_bits(below(c))
    } else {
        let m = mags
            .par_chunks(PAR_CHUNK)
            .map(|c| c.iter().map(|&x| mag_key(x)).map(|kk| if kk < prefix { kk } else { 0 }).max().unwrap_or(0))
            .max()
            .unwrap_or(0);
        f64::from_bits(m)
    };
    KeptSet { threshold, ties: need, k, tau }
}

/// One past the flat index of the last kept tie (spec §2 tie rule): entries `i < cut` that are
/// ties (`is_tie`: magnitude equal to the threshold) are kept. 0 when `ties == 0`; `data.len()` if fewer ties exist.
pub(crate) fn tie_cut<S: Copy + Sync, F: Fn(S) -> bool + Sync>(data: &[S], is_tie: F, ties: usize) -> usize {
    if ties == 0 {
        return 0;
    }
    let counts: Vec<usize> =
        data.par_chunks(PAR_CHUNK).map(|c| c.iter().map(|&x| is_tie(x) as usize).sum()).collect();
    let mut seen = 0usize;
    for (ci, &c) in counts.iter().enumerate() {
        if seen + c >= ties {
            let base = ci * PAR_CHUNK;
            for (t, &x) in data[base..(base + PAR_CHUNK).min(data.len())].iter().enumerate() {
                if is_tie(x) {
                    seen += 1;
                    if seen == ties {
                        return base + t + 1;
                    }
                }
            }
        }
        seen += c;
    }
    data.len()
}

/// Writes `mask[i] = true` for the kept entries of `set` (`mags` as given to [`select_topk`])
/// (spec §2: `|M| > threshold`, or `== threshold` among the first `ties` such entries).
///
/// # Panics
/// If `mask` and `mags` differ in length.
pub fn kept_mask<T: Real>(mags: &[T], set: &KeptSet, mask: &mut [bool]) {
    assert_eq!(mags.len(), mask.len(), "kept_mask: mask length differs from mags");
    let thr = threshold_key(set.threshold);
    let cut = tie_cut(mags, |x: T| mag_key(x) == thr, set.ties);
    mask.par_chunks_mut(PAR_CHUNK).zip(mags.par_chunks(PAR_CHUNK)).enumerate().for_each(|(ci, (mk, mg))| {
        let base = ci * PAR_CHUNK;
        for (t, (o, &x)) in mk.iter_mut().zip(mg).enumerate() {
            let kk = mag_key(x);
            *o = (kk > thr) | ((kk == thr) & (base + t < cut));
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gradcheck::rand_vec;

    /// Kept mask by a full sort of indices by (−mag, index).
    fn sort_mask(mags: &[f64], k: usize) -> Vec<bool> {
        let mut idx: Vec<usize> = (0..mags.len()).collect();
        let key = |x: f64| if x > 0.0 { x } else { 0.0 };
        idx.sort_by(|&a, &b| key(mags[b]).partial_cmp(&key(mags[a])).unwrap().then(a.cmp(&b)));
        let mut m = vec![false; mags.len()];
        for &i in &idx[..k] {
            m[i] = true;
        }
        m
    }

    fn sorted_desc(mags: &[f64]) -> Vec<f64> {
        let mut s: Vec<f64> = mags.iter().map(|&x| if x > 0.0 { x } else { 0.0 }).collect();
        s.sort_by(|a, b| b.partial_cmp(a).unwrap());
        s
    }

    fn check(mags: &[f64], k: usize) {
        let set = select_topk(mags, k);
        let mut mask = vec![false; mags.len()];
        kept_mask(mags, &set, &mut mask);
        assert_eq!(set.k, k);
        assert_eq!(mask.iter().filter(|&&b| b).count(), k, "kept count for k={k}");
        assert_eq!(mask, sort_mask(mags, k), "kept set for k={k}");
        let s = sorted_desc(mags);
        if k > 0 {
            assert_eq!(set.threshold, s[k - 1]);
        }
        let want_tau = if k == mags.len() { 0.0 } else { s[k] };
        assert_eq!(set.tau, want_tau, "tau for k={k}");
    }

    #[test]
    fn random_data_matches_full_sort() {
        let mags: Vec<f64> = rand_vec(5000, 7, 1.0).iter().map(|x| x.abs()).collect();
        for k in [0, 1, 2, 17, 2500, 4999, 5000] {
            check(&mags, k);
        }
    }

    #[test]
    fn quantised_values_with_many_ties() {
        // 10 distinct levels over 3001 entries: huge tie groups.
        let mags: Vec<f64> = rand_vec(3001, 3, 1.0).iter().map(|x| (x.abs() * 10.0).floor() / 10.0).collect();
        for k in [0, 1, 150, 300, 301, 1500, 2999, 3000, 3001] {
            check(&mags, k);
        }
        let f: Vec<f32> = mags.iter().map(|&x| x as f32).collect();
        let set = select_topk(&f, 1234);
        let mut mask = vec![false; f.len()];
        kept_mask(&f, &set, &mut mask);
        let f64s: Vec<f64> = f.iter().map(|&x| x as f64).collect();
        assert_eq!(mask, sort_mask(&f64s, 1234));
    }

    #[test]
    fn k_zero_and_k_n() {
        let mags = vec![0.5, 2.0, 1.0, 2.0];
        let s0 = select_topk(&mags, 0);
        assert_eq!(s0, KeptSet { threshold: 2.0, ties: 0, k: 0, tau: 2.0 });
        let mut mask = vec![true; 4];
        kept_mask(&mags, &s0, &mut mask);
        assert_eq!(mask, vec![false; 4]);
        let sn = select_topk(&mags, 4);
        assert_eq!(sn, KeptSet { threshold: 0.5, ties: 1, k: 4, tau: 0.0 });
        kept_mask(&mags, &sn, &mut mask);
        assert_eq!(mask, vec![true; 4]);
        let s3 = select_topk(&mags, 3);
        assert_eq!(s3, KeptSet { threshold: 1.0, ties: 1, k: 3, tau: 0.5 });
        let s1 = select_topk(&mags, 1);
        assert_eq!(s1, KeptSet { threshold: 2.0, ties: 1, k: 1, tau: 2.0 });
        kept_mask(&mags, &s1, &mut mask);
        assert_eq!(mask, vec![false, true, false, false]);
        let empty: [f64; 0] = [];
        assert_eq!(select_topk(&empty, 0).k, 0);
    }

    #[test]
    fn all_equal_keeps_lowest_indices() {
        let mags = vec![0.25f32; 1000];
        let set = select_topk(&mags, 300);
        assert_eq!(set, KeptSet { threshold: 0.25, ties: 300, k: 300, tau: 0.25 });
        let mut mask = vec![false; 1000];
        kept_mask(&mags, &set, &mut mask);
        assert!(mask[..300].iter().all(|&b| b) && mask[300..].iter().all(|&b| !b));
        let zeros = vec![0.0f64; 10];
        let set = select_topk(&zeros, 4);
        assert_eq!(set, KeptSet { threshold: 0.0, ties: 4, k: 4, tau: 0.0 });
    }

    #[test]
    fn nan_counts_as_zero() {
        let mags = vec![f64::NAN, 0.5, 0.0, 3.0, f64::NAN];
        let set = select_topk(&mags, 3);
        assert_eq!(set, KeptSet { threshold: 0.0, ties: 1, k: 3, tau: 0.0 });
        let mut mask = vec![false; 5];
        kept_mask(&mags, &set, &mut mask);
        assert_eq!(mask, vec![true, true, false, true, false]);
    }

    #[test]
    fn large_vector_over_2_pow_24_matches_full_sort() {
        let n = (1usize << 24) + 12345;
        let t0 = std::time::Instant::now();
        // SplitMix64 stream of f32 magnitudes in [0, 1), quantised to 2^-20 so ties are plentiful.
        let mags: Vec<f32> = (0..n)
            .into_par_iter()
            .map(|i| {
                let mut z = (i as u64).wrapping_mul(0x9E3779B97F4A7C15).wrapping_add(0x1234_5678);
                z = (z ^ (z >> 30)).wrapping_mul(0xBF58476D1CE4E5B9);
                z = (z ^ (z >> 27)).wrapping_mul(0x94D049BB133111EB);
                z ^= z >> 31;
                ((z >> 44) as f32) / (1u32 << 20) as f32
            })
            .collect();
        let k = kept_count(n, 0.7);
        let t1 = std::time::Instant::now();
        let set = select_topk(&mags, k);
        let mut mask = vec![false; n];
        kept_mask(&mags, &set, &mut mask);
        let t_sel = t1.elapsed();
        assert_eq!(mask.par_iter().filter(|&&b| b).count(), k);
        // Reference: full sort of (−mag, index), packed into one u64 (f32 bits are monotone for x ≥ 0).
        let mut packed: Vec<u64> =
            mags.par_iter().enumerate().map(|(i, &x)| ((!x.to_bits() as u64) << 25) | i as u64).collect();
        packed.par_sort_unstable();
        let mut want = vec![false; n];
        for &p in &packed[..k] {
            want[(p & ((1 << 25) - 1)) as usize] = true;
        }
        assert!(mask == want, "kept set differs from the full-sort reference");
        let kth = f32::from_bits(!((packed[k - 1] >> 25) as u32));
        let next = f32::from_bits(!((packed[k] >> 25) as u32));
        assert_eq!(set.threshold, kth as f64);
        assert_eq!(set.tau, next as f64);
        eprintln!("select_topk+kept_mask on {n} entries: {t_sel:?}; whole test {:?}", t0.elapsed());
    }
}
