//! Collective communication between data-parallel ranks: the [`Communicator`] trait, the
//! in-process [`LocalComm`] (N ranks as threads of one process), and the deterministic
//! rank-order reduction that every CPU communicator shares.
//!
//! A data-parallel step (see [`crate::dp`]) needs three collectives: the element-wise sum of the
//! trainable gradients ([`Communicator::all_reduce_sum`]), the sum of a few host numbers (loss,
//! correct predictions, error flags: [`Communicator::all_reduce_host`]), and, to set up or check
//! a group, [`Communicator::broadcast`] and [`Communicator::barrier`]. Every rank must call the
//! same collectives in the same order with buffers of the same lengths.
//!
//! The CPU communicators ([`LocalComm`], [`crate::rendezvous::TcpComm`]) add the ranks'
//! contributions **in rank order**, `((x₀ + x₁) + x₂) + …`, starting from rank 0's value. That is
//! the order in which the single-rank trainer accumulates micro-batches
//! ([`crate::trainer::TrainConfig::micro_batches`]), so N ranks reproduce one rank with N
//! micro-batches bit for bit. NCCL ([`crate::nccl`]) sums in its own (ring/tree) order.

use crate::backend::Backend;
use snella_core::{Result, SnellaError};
use std::ops::Range;
use std::sync::{Arc, Condvar, Mutex};

/// A communication failure: a peer left, a socket broke, ranks disagreed on a collective.
pub fn comm_err(message: impl Into<String>) -> SnellaError {
    SnellaError::Device { code: "COMM_ERROR".into(), message: message.into() }
}

/// The rows `[start, end)` of part `part` when `n` rows are split into `parts` contiguous parts
/// whose sizes differ by at most one, the larger parts first: with `n = 10, parts = 4` the parts
/// are `0..3, 3..6, 6..8, 8..10`. Parts past `n` are empty (`n = 2, parts = 3`: `0..1, 1..2, 2..2`).
/// Used for both the micro-batches of one rank and the shards of the ranks, so the two split a
/// batch identically.
///
/// # Panics
/// If `parts == 0` or `part >= parts`.
pub fn shard_range(n: usize, parts: usize, part: usize) -> Range<usize> {
    assert!(parts > 0 && part < parts, "shard_range: part {part} of {parts}");
    let (base, extra) = (n / parts, n % parts);
    let start = part * base + part.min(extra);
    start..start + base + usize::from(part < extra)
}

/// Collective operations among the `world()` ranks of a data-parallel group, on buffers of
/// backend `B`. Every rank must call the same operations in the same order with buffers of the
/// same lengths; a rank that leaves (its handle dropped, its process ended) makes the others'
/// pending and later calls fail with `COMM_ERROR` instead of hanging (where the transport can
/// tell: [`LocalComm`] and TCP always, NCCL only through [`Communicator::abort`]).
pub trait Communicator<B: Backend>: Send {
    /// This rank, in `0..world()`.
    fn rank(&self) -> usize;
    /// The number of ranks.
    fn world(&self) -> usize;
    /// The transport: `"local"` (threads of one process), `"tcp"` (CPU processes over TCP) or
    /// `"nccl"`.
    fn kind(&self) -> &'static str;
    /// Replaces every buffer of `bufs` by its element-wise sum over the ranks (f32). The ranks pass
    /// the same number of buffers with the same lengths, in the same order.
    ///
    /// # Errors
    /// `COMM_ERROR` when a peer left or the lengths differ between ranks.
    fn all_reduce_sum(&self, be: &B, bufs: &mut [&mut B::Buf]) -> Result<()>;
    /// Replaces `vals` (host f64: loss sums, counts, flags) by their element-wise sum over ranks.
    ///
    /// # Errors
    /// As [`Communicator::all_reduce_sum`].
    fn all_reduce_host(&self, be: &B, vals: &mut [f64]) -> Result<()>;
    /// Copies rank `root`'s buffers into every other rank's `bufs` (same lengths on every rank).
    ///
    /// # Errors
    /// As [`Communicator::all_reduce_sum`]; `CONFIG` when `root >= world()`.
    fn broadcast(&self, be: &B, bufs: &mut [&mut B::Buf], root: usize) -> Result<()>;
    /// Returns once every rank has called it.
    ///
    /// # Errors
    /// As [`Communicator::all_reduce_sum`].
    fn barrier(&self, be: &B) -> Result<()>;
    /// Marks the group failed (`why` is passed on): pending and later collectives of every rank
    /// return `COMM_ERROR` naming this rank and `why`. Called when this rank panics mid-step so that
    /// the others do not wait for it forever.
    fn abort(&self, why: &str);
}

/// `parts[0] + parts[1] + …` element-wise, added in rank order starting from rank 0's values.
///
/// # Panics
/// If `parts` is empty or the lengths differ (callers check lengths first).
pub fn sum_in_rank_order<T: Copy + std::ops::AddAssign>(parts: &[&[T]]) -> Vec<T> {
    let mut out = parts[0].to_vec();
    for p in &parts[1..] {
        assert_eq!(p.len(), out.len(), "sum_in_rank_order: lengths differ");
        for (o, &v) in out.iter_mut().zip(p.iter()) {
            *o += v;
        }
    }
    out
}

/// What one rank contributes to a collective of a CPU communicator.
#[derive(Clone, Debug, PartialEq)]
pub enum Payload {
    /// Buffers to sum element-wise (f32), one `Vec` per buffer.
    SumF32(Vec<Vec<f32>>),
    /// Host values to sum (f64).
    SumF64(Vec<f64>),
    /// Buffers to broadcast from `root` (non-root ranks send their lengths only, as empty data).
    Bcast {
        /// The root rank.
        root: usize,
        /// The root's buffers; on other ranks, empty vectors of the right count.
        data: Vec<Vec<f32>>,
        /// The buffer lengths this rank expects.
        lens: Vec<usize>,
    },
    /// A barrier.
    Barrier,
}

impl Payload {
    /// The collective's name, for errors.
    pub fn name(&self) -> &'static str {
        match self {
            Payload::SumF32(_) => "all_reduce_sum",
            Payload::SumF64(_) => "all_reduce_host",
            Payload::Bcast { .. } => "broadcast",
            Payload::Barrier => "barrier",
        }
    }

    /// The buffer lengths of this contribution (for the cross-rank consistency check).
    fn shape(&self) -> Vec<usize> {
        match self {
            Payload::SumF32(v) => v.iter().map(|b| b.len()).collect(),
            Payload::SumF64(v) => vec![v.len()],
            Payload::Bcast { lens, .. } => lens.clone(),
            Payload::Barrier => vec![],
        }
    }
}

/// Combines the contributions of all ranks (index = rank) into the one result every rank receives:
/// sums in rank order, the root's buffers for a broadcast, nothing for a barrier.
///
/// # Errors
/// `COMM_ERROR` naming the first rank whose collective or buffer lengths differ from rank 0's.
pub fn combine(parts: Vec<Payload>) -> Result<Payload> {
    let first = &parts[0];
    for (r, p) in parts.iter().enumerate().skip(1) {
        if std::mem::discriminant(p) != std::mem::discriminant(first) {
            return Err(comm_err(format!("ranks disagree on the collective: rank 0 called {}, rank {r} called {}", first.name(), p.name())));
        }
        if p.shape() != first.shape() {
            return Err(comm_err(format!(
                "ranks disagree on the buffer lengths of {}: rank 0 has {:?}, rank {r} has {:?}",
                first.name(),
                first.shape(),
                p.shape()
            )));
        }
        if let (Payload::Bcast { root: a, .. }, Payload::Bcast { root: b, .. }) = (first, p) {
            if a != b {
                return Err(comm_err(format!("ranks disagree on the broadcast root: rank 0 says {a}, rank {r} says {b}")));
            }
        }
    }
    Ok(match first {
        Payload::SumF32(v) => Payload::SumF32(
            (0..v.len())
                .map(|i| {
                    let bufs: Vec<&[f32]> = parts.iter().map(|p| match p {
                        Payload::SumF32(v) => v[i].as_slice(),
                        _ => unreachable!("checked above"),
                    }).collect();
                    sum_in_rank_order(&bufs)
                })
                .collect(),
        ),
        Payload::SumF64(_) => {
            let vals: Vec<&[f64]> = parts.iter().map(|p| match p {
                Payload::SumF64(v) => v.as_slice(),
                _ => unreachable!("checked above"),
            }).collect();
            Payload::SumF64(sum_in_rank_order(&vals))
        }
        Payload::Bcast { root, .. } => {
            let root = *root;
            let mut parts = parts;
            let p = parts.swap_remove(root);
            let Payload::Bcast { data, lens, .. } = p else { unreachable!("checked above") };
            if data.iter().map(|d| d.len()).collect::<Vec<_>>() != lens {
                return Err(comm_err(format!("broadcast: root {root} sent buffers of lengths other than it announced")));
            }
            Payload::Bcast { root, data, lens }
        }
        Payload::Barrier => Payload::Barrier,
    })
}

/// Runs one collective of a CPU communicator through `exchange` (which delivers this rank's
/// contribution and returns the combined result), staging the backend buffers through the host.
fn host_staged<B: Backend>(be: &B, bufs: &mut [&mut B::Buf], payload: Payload, exchange: impl FnOnce(Payload) -> Result<Payload>) -> Result<()> {
    match exchange(payload)? {
        Payload::SumF32(v) | Payload::Bcast { data: v, .. } => {
            for (b, h) in bufs.iter_mut().zip(v) {
                **b = be.upload(&h);
            }
            Ok(())
        }
        other => Err(comm_err(format!("unexpected reply to a buffer collective: {}", other.name()))),
    }
}

/// The host-staged `all_reduce_sum` / `all_reduce_host` / `broadcast` / `barrier` of a CPU
/// communicator whose transport is `exchange` (used by [`LocalComm`] and
/// [`crate::rendezvous::TcpComm`]).
pub(crate) mod staged {
    use super::*;

    /// See [`Communicator::all_reduce_sum`].
    pub fn all_reduce_sum<B: Backend>(be: &B, bufs: &mut [&mut B::Buf], exchange: impl FnOnce(Payload) -> Result<Payload>) -> Result<()> {
        let refs: Vec<&B::Buf> = bufs.iter().map(|b| &**b).collect();
        let host = be.download_many(&refs);
        host_staged(be, bufs, Payload::SumF32(host), exchange)
    }

    /// See [`Communicator::all_reduce_host`].
    pub fn all_reduce_host(vals: &mut [f64], exchange: impl FnOnce(Payload) -> Result<Payload>) -> Result<()> {
        match exchange(Payload::SumF64(vals.to_vec()))? {
            Payload::SumF64(v) => {
                vals.copy_from_slice(&v);
                Ok(())
            }
            other => Err(comm_err(format!("unexpected reply to all_reduce_host: {}", other.name()))),
        }
    }

    /// See [`Communicator::broadcast`].
    pub fn broadcast<B: Backend>(be: &B, bufs: &mut [&mut B::Buf], root: usize, rank: usize, world: usize, exchange: impl FnOnce(Payload) -> Result<Payload>) -> Result<()> {
        if root >= world {
            return Err(SnellaError::config("root", root, &format!("a rank in [0, {world})")));
        }
        let lens: Vec<usize> = bufs.iter().map(|b| be.len(b)).collect();
        let data = if rank == root {
            let refs: Vec<&B::Buf> = bufs.iter().map(|b| &**b).collect();
            be.download_many(&refs)
        } else {
            vec![Vec::new(); bufs.len()]
        };
        host_staged(be, bufs, Payload::Bcast { root, data, lens }, exchange)
    }
}

/// The state shared by the ranks of one [`LocalComm`] group.
struct LocalState {
    /// Contributions of the collective being gathered (index = rank).
    slots: Vec<Option<Payload>>,
    /// How many ranks have contributed to it.
    arrived: usize,
    /// The result of the last complete collective, while ranks are still reading it.
    result: Option<Arc<Result<Payload>>>,
    /// Ranks that have yet to read `result`.
    readers: usize,
    /// Ranks whose handle was dropped.
    left: Vec<bool>,
    /// Set by [`Communicator::abort`]: the reason every later collective fails.
    failed: Option<String>,
}

struct LocalShared {
    world: usize,
    state: Mutex<LocalState>,
    cv: Condvar,
}

/// An in-process communicator: `world` ranks that are threads of one process (one handle per rank,
/// from [`LocalComm::group`]). Collectives meet in shared memory; sums run in rank order on the
/// thread of the last rank to arrive. Works for every backend by staging buffers through the host
/// (on the CPU backend that is a copy). Dropping a handle while others wait in a collective makes
/// their call fail with `COMM_ERROR` naming the rank that left.
pub struct LocalComm {
    rank: usize,
    shared: Arc<LocalShared>,
}

impl LocalComm {
    /// `world` connected handles, index = rank. Move each to the thread that runs that rank.
    ///
    /// # Panics
    /// If `world == 0`.
    pub fn group(world: usize) -> Vec<LocalComm> {
        assert!(world > 0, "LocalComm::group: world must be ≥ 1");
        let shared = Arc::new(LocalShared {
            world,
            state: Mutex::new(LocalState { slots: vec![None; world], arrived: 0, result: None, readers: 0, left: vec![false; world], failed: None }),
            cv: Condvar::new(),
        });
        (0..world).map(|rank| LocalComm { rank, shared: shared.clone() }).collect()
    }

    /// Delivers this rank's contribution and returns the combined result, once every rank has
    /// delivered one.
    fn exchange(&self, p: Payload) -> Result<Payload> {
        let sh = &*self.shared;
        let mut st = sh.state.lock().unwrap_or_else(|e| e.into_inner());
        // Wait until the previous collective's result has been read by every rank.
        while st.result.is_some() && st.failed.is_none() {
            st = sh.cv.wait(st).unwrap_or_else(|e| e.into_inner());
        }
        if let Some(f) = &st.failed {
            return Err(comm_err(f.clone()));
        }
        let name = p.name();
        st.slots[self.rank] = Some(p);
        st.arrived += 1;
        if st.arrived == sh.world {
            let parts: Vec<Payload> = st.slots.iter_mut().map(|s| s.take().expect("every rank arrived")).collect();
            st.arrived = 0;
            st.result = Some(Arc::new(combine(parts)));
            st.readers = sh.world;
            sh.cv.notify_all();
        } else {
            loop {
                if st.result.is_some() {
                    break;
                }
                if let Some(f) = &st.failed {
                    return Err(comm_err(f.clone()));
                }
                if let Some(q) = (0..sh.world).find(|&q| st.left[q] && st.slots[q].is_none()) {
                    return Err(comm_err(format!("rank {q} of {} left the group while rank {} waited in {name}", sh.world, self.rank)));
                }
                st = sh.cv.wait(st).unwrap_or_else(|e| e.into_inner());
            }
        }
        let r = st.result.clone().expect("result present");
        st.readers -= 1;
        if st.readers == 0 {
            st.result = None;
            sh.cv.notify_all();
        }
        drop(st);
        match &*r {
            Ok(p) => Ok(p.clone()),
            Err(e) => Err(comm_err(e.to_string())),
        }
    }
}

impl Drop for LocalComm {
    fn drop(&mut self) {
        let mut st = self.shared.state.lock().unwrap_or_else(|e| e.into_inner());
        st.left[self.rank] = true;
        self.shared.cv.notify_all();
    }
}

impl<B: Backend> Communicator<B> for LocalComm {
    fn rank(&self) -> usize {
        self.rank
    }
    fn world(&self) -> usize {
        self.shared.world
    }
    fn kind(&self) -> &'static str {
        "local"
    }
    fn all_reduce_sum(&self, be: &B, bufs: &mut [&mut B::Buf]) -> Result<()> {
        staged::all_reduce_sum(be, bufs, |p| self.exchange(p))
    }
    fn all_reduce_host(&self, _be: &B, vals: &mut [f64]) -> Result<()> {
        staged::all_reduce_host(vals, |p| self.exchange(p))
    }
    fn broadcast(&self, be: &B, bufs: &mut [&mut B::Buf], root: usize) -> Result<()> {
        staged::broadcast(be, bufs, root, self.rank, self.shared.world, |p| self.exchange(p))
    }
    fn barrier(&self, _be: &B) -> Result<()> {
        self.exchange(Payload::Barrier).map(|_| ())
    }
    fn abort(&self, why: &str) {
        let mut st = self.shared.state.lock().unwrap_or_else(|e| e.into_inner());
        if st.failed.is_none() {
            st.failed = Some(format!("rank {} of {} failed: {why}", self.rank, self.shared.world));
        }
        self.shared.cv.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpu::CpuBackend;

    #[test]
    fn shard_ranges_cover_the_batch_in_order() {
        assert_eq!((0..4).map(|p| shard_range(10, 4, p)).collect::<Vec<_>>(), vec![0..3, 3..6, 6..8, 8..10]);
        assert_eq!((0..3).map(|p| shard_range(2, 3, p)).collect::<Vec<_>>(), vec![0..1, 1..2, 2..2]);
        assert_eq!(shard_range(64, 1, 0), 0..64);
        for n in 0..40 {
            for parts in 1..9 {
                let mut next = 0;
                for p in 0..parts {
                    let r = shard_range(n, parts, p);
                    assert_eq!(r.start, next);
                    assert!(r.len() == n / parts || r.len() == n / parts + 1);
                    next = r.end;
                }
                assert_eq!(next, n);
            }
        }
    }

    /// Runs `f(rank, comm)` on `world` threads and returns their results by rank.
    fn on_ranks<T: Send + 'static>(world: usize, f: impl Fn(usize, LocalComm) -> T + Send + Sync + 'static) -> Vec<T> {
        let f = Arc::new(f);
        let hs: Vec<_> = LocalComm::group(world)
            .into_iter()
            .enumerate()
            .map(|(r, c)| {
                let f = f.clone();
                std::thread::spawn(move || f(r, c))
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    }

    #[test]
    fn all_reduce_sums_in_rank_order_bit_exactly() {
        // 1e8 + 1 + (−1e8): in rank order ((1e8 + 1) − 1e8) = 0 in f32 (1e8 + 1 rounds to 1e8);
        // any other order that adds 1 last gives 1. Rank order is what every rank must see.
        let vals = [1e8f32, 1.0, -1e8];
        let out = on_ranks(3, move |r, c| {
            let be = CpuBackend;
            let mut a = vec![vals[r], r as f32];
            let mut b = vec![0.5f32 * r as f32; 3];
            Communicator::<CpuBackend>::all_reduce_sum(&c, &be, &mut [&mut a, &mut b]).unwrap();
            let mut h = [r as f64, 1.0];
            Communicator::<CpuBackend>::all_reduce_host(&c, &be, &mut h).unwrap();
            (a, b, h)
        });
        for (a, b, h) in &out {
            assert_eq!(a, &vec![0.0, 3.0]);
            assert_eq!(b, &vec![1.5; 3]);
            assert_eq!(h, &[3.0, 3.0]);
        }
        assert_eq!(sum_in_rank_order(&[&[1e8f32][..], &[1.0][..], &[-1e8][..]]), vec![0.0]);
    }

    #[test]
    fn broadcast_and_barrier_and_many_rounds() {
        let out = on_ranks(4, |r, c| {
            let be = CpuBackend;
            let mut seen = Vec::new();
            for round in 0..50 {
                let mut x = vec![(r * 100 + round) as f32; 5];
                Communicator::<CpuBackend>::broadcast(&c, &be, &mut [&mut x], round % 4).unwrap();
                seen.push(x[0]);
                Communicator::<CpuBackend>::barrier(&c, &be).unwrap();
            }
            seen
        });
        let want: Vec<f32> = (0..50).map(|round| ((round % 4) * 100 + round) as f32).collect();
        for s in out {
            assert_eq!(s, want);
        }
    }

    #[test]
    fn mismatched_collectives_and_lengths_are_errors() {
        let out = on_ranks(2, |r, c| {
            let be = CpuBackend;
            let mut x = vec![1.0f32; 3 + r];
            let e1 = Communicator::<CpuBackend>::all_reduce_sum(&c, &be, &mut [&mut x]).unwrap_err().to_string();
            let e2 = if r == 0 {
                Communicator::<CpuBackend>::barrier(&c, &be).unwrap_err().to_string()
            } else {
                Communicator::<CpuBackend>::all_reduce_host(&c, &be, &mut [1.0]).unwrap_err().to_string()
            };
            (e1, e2)
        });
        for (e1, e2) in out {
            assert!(e1.contains("COMM_ERROR") && e1.contains("rank 0 has [3], rank 1 has [4]"), "{e1}");
            assert!(e2.contains("rank 0 called barrier, rank 1 called all_reduce_host"), "{e2}");
        }
    }

    #[test]
    fn a_rank_that_leaves_or_aborts_fails_the_others_instead_of_hanging() {
        let out = on_ranks(3, |r, c| {
            let be = CpuBackend;
            if r == 2 {
                drop(c);
                return String::new();
            }
            Communicator::<CpuBackend>::barrier(&c, &be).unwrap_err().to_string()
        });
        assert!(out[0].contains("rank 2 of 3 left the group"), "{}", out[0]);
        assert!(out[1].contains("rank 2 of 3 left the group"), "{}", out[1]);
        let out = on_ranks(2, |r, c| {
            let be = CpuBackend;
            if r == 1 {
                Communicator::<CpuBackend>::abort(&c, "CUDA_OOM: out of memory");
            }
            Communicator::<CpuBackend>::barrier(&c, &be).unwrap_err().to_string()
        });
        for e in out {
            assert!(e.contains("rank 1 of 2 failed: CUDA_OOM"), "{e}");
        }
    }
}
