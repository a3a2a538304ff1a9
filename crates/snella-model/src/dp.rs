//! Data-parallel training: N ranks, each with a full copy of the model, split every global batch,
//! sum their gradients and take the identical update.
//!
//! One step on every rank ([`dp_step`]):
//! 1. rank `r` of `N` takes rows [`shard_range`]`(B, N, r)` of the global batch of `B` images (a
//!    contiguous slice; the batch itself comes from the seeded epoch order, so the sharding is
//!    deterministic), runs forward and backward on it with the cross-entropy normalised by the
//!    **global** `B` ([`crate::trainer::Trainer::forward_backward`]);
//! 2. the loss sum and correct count are summed over ranks (host values), so a non-finite loss
//!    stops every rank at once;
//! 3. every trainable gradient (adapters, head, `cls_token`: whatever the method trains) is
//!    all-reduced (summed);
//! 4. every rank runs [`crate::trainer::Trainer::apply`]: the checks, the allocator's importance
//!    statistics and AdamW. The statistics `Ī, Ū` of spec §5 are computed from the *all-reduced*
//!    gradient, `I = |p ⊙ Σ_r ∇_r p|`, which every rank holds identically: every rank keeps an
//!    identical allocator and takes the identical per-layer sparsity decision at each round, without
//!    a second collective. (All-reducing per-rank statistics instead would give `Σ_r |p ⊙ ∇_r p|`,
//!    which is not what one device computes from the whole batch.)
//!
//! With the CPU communicators, which add in rank order, N ranks give exactly the parameters,
//! moments and allocator state of one rank running the same global batch as N micro-batches
//! ([`crate::trainer::TrainConfig::micro_batches`]); `tests/dp.rs` checks this bit for bit.
//!
//! [`DataParallel`] runs a group for a [`Session`]: either all ranks in this process (the session
//! is rank 0, every other rank a worker thread with its own replica and backend, e.g. one per GPU),
//! or one rank per process (multi-host, joined through [`crate::rendezvous`]).

use crate::backend::Backend;
use crate::comm::{comm_err, shard_range, Communicator};
use crate::session::Session;
use crate::trainer::{kernel_adapters, kernel_adapters_mut, trained_grads_mut, StepStats, Trainer};
use crate::vit::Vit;
use snella_core::{Result, SnellaError};
use std::panic::{catch_unwind, resume_unwind, AssertUnwindSafe};
use std::sync::{mpsc, Arc};
use std::thread::JoinHandle;

/// One rank's training step on its shard `images: [b, C, H, W]`, `labels: [b]` (`b` may be 0 when
/// the global batch has fewer images than ranks) of a global batch of `global` images. With
/// [`crate::trainer::TrainConfig::micro_batches`] `> 1` the shard itself runs as that many
/// micro-batches (gradient accumulation on every rank).
///
/// # Errors
/// [`SnellaError::NonFinite`] as [`Trainer::step`], on every rank alike (the decision is taken from
/// all-reduced values); `COMM_ERROR` when the group fails.
pub fn dp_step<B: Backend>(tr: &mut Trainer, be: &B, vit: &mut Vit<B>, comm: &dyn Communicator<B>, images: &[f32], labels: &[u32], global: usize) -> Result<StepStats> {
    let t0 = trace_enabled().then(std::time::Instant::now);
    let (loss, correct) = tr.accumulate(be, vit, images, labels, global);
    let t1 = t0.map(|_| std::time::Instant::now());
    let mut h = [loss, correct as f64];
    comm.all_reduce_host(be, &mut h)?;
    if !h[0].is_finite() {
        return Err(SnellaError::NonFinite { tensor: "loss".into(), step: tr.step + 1 });
    }
    let t2 = t0.map(|_| std::time::Instant::now());
    let mut grads = trained_grads_mut(vit);
    comm.all_reduce_sum(be, &mut grads)?;
    let out = tr.apply(be, vit, h[0], h[1] as usize, global);
    if let (Some(t0), Some(t1), Some(t2)) = (t0, t1, t2) {
        let ms = |a: std::time::Instant, b: std::time::Instant| (b - a).as_secs_f64() * 1e3;
        let t3 = std::time::Instant::now();
        eprintln!(
            "dp trace rank {}: forward+backward queued {:.1} ms, loss all-reduce (waits for the device) {:.1} ms, gradient all-reduce + apply {:.1} ms",
            comm.rank(),
            ms(t0, t1),
            ms(t1, t2),
            ms(t2, t3)
        );
    }
    out
}

/// Whether `SNELLA_DP_TRACE` is set (read once): [`dp_step`] then prints each rank's phase times
/// (wall-clock ms, from this rank's thread) to stderr, to find where data-parallel scaling is lost.
fn trace_enabled() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| std::env::var_os("SNELLA_DP_TRACE").is_some_and(|v| !v.is_empty() && v != "0"))
}

/// A borrowed `[T]` handed to the worker threads of one [`DataParallel::step`] without copying it
/// (each shard of a ViT-B/16 batch of 64 is 38.5 MB; copying three of them per step on the calling
/// thread cost more than the step's communication).
///
/// Soundness: `step` waits for the result of every job it queued (or learns that the worker thread
/// is gone, so the job never runs) before it returns or unwinds, so the slice outlives every use.
struct Borrowed<T> {
    ptr: *const T,
    len: usize,
}

// SAFETY: only shared reads of `T: Sync` data, during the borrow that `step` holds (see above).
unsafe impl<T: Sync> Send for Borrowed<T> {}

impl<T> Borrowed<T> {
    fn new(s: &[T]) -> Self {
        Borrowed { ptr: s.as_ptr(), len: s.len() }
    }
    /// SAFETY: the caller guarantees the original slice is still borrowed (see the type's docs).
    unsafe fn get(&self) -> &[T] {
        std::slice::from_raw_parts(self.ptr, self.len)
    }
}

/// One trainable tensor in a [`Snapshot`]: name, shape, value and AdamW moments `m`, `v`.
#[derive(Clone, Debug)]
struct TensorState {
    name: String,
    shape: Vec<usize>,
    value: Vec<f32>,
    m: Vec<f32>,
    v: Vec<f32>,
}

/// A host copy of what training changes in a session: every trainable parameter with its AdamW
/// moments, the per-layer sparsities and the trainer (step, schedule, allocator). Copies rank 0's
/// state into the replicas of a local group.
#[derive(Clone, Debug)]
pub struct Snapshot {
    /// Each trainable parameter, in [`Vit::params_mut`] order.
    params: Vec<TensorState>,
    sparsities: Vec<f64>,
    trainer: Option<Trainer>,
}

impl Snapshot {
    /// Copies the training state of `sess` to the host (the allocator's statistics included:
    /// they are pulled from the backend first).
    pub fn take<B: Backend>(sess: &mut Session<B>) -> Self {
        sess.pull_importance();
        let be = sess.be.clone();
        let trained: Vec<_> = sess.vit.params_mut().into_iter().filter(|p| p.train.is_some()).collect();
        let bufs: Vec<&B::Buf> = trained.iter().flat_map(|p| {
            let t = p.train.as_ref().expect("filtered trainable");
            [&p.value, &t.m, &t.v]
        }).collect();
        let mut h = be.download_many(&bufs).into_iter(); // one host wait for every tensor
        let params = trained
            .iter()
            .map(|p| TensorState { name: p.name.clone(), shape: p.shape.clone(), value: h.next().expect("value"), m: h.next().expect("m"), v: h.next().expect("v") })
            .collect();
        let sparsities = kernel_adapters(&sess.vit).iter().map(|k| k.sparsity).collect();
        Snapshot { params, sparsities, trainer: sess.trainer.clone() }
    }

    /// Writes the state into `sess`, which has the same method attached (same trainable tensors).
    ///
    /// # Errors
    /// [`SnellaError::Tensor`] naming the first trainable tensor whose name or shape differs.
    pub fn restore<B: Backend>(&self, sess: &mut Session<B>) -> Result<()> {
        let be = sess.be.clone();
        let mut mine: Vec<_> = sess.vit.params_mut().into_iter().filter(|p| p.train.is_some()).collect();
        if mine.len() != self.params.len() {
            return Err(SnellaError::tensor("<replica>", "trainable tensors", format!("has {} trainable tensors; rank 0 has {}", mine.len(), self.params.len())));
        }
        for (p, TensorState { name, shape, value, m, v }) in mine.iter_mut().zip(&self.params) {
            if &p.name != name || &p.shape != shape {
                return Err(SnellaError::tensor("<replica>", &p.name, format!("is {:?}; rank 0 has '{name}' {shape:?} at this place", p.shape)));
            }
            p.value = be.upload(value);
            let t = p.train.as_mut().expect("filtered trainable");
            t.m = be.upload(m);
            t.v = be.upload(v);
        }
        for (k, s) in kernel_adapters_mut(&mut sess.vit).into_iter().zip(&self.sparsities) {
            k.sparsity = *s;
        }
        // The allocator's statistics now come from the snapshot: the backend copies are re-made.
        sess.set_trainer(self.trainer.clone());
        Ok(())
    }
}

/// A 64-bit FNV-1a hash of the training state (step, epoch, training options, sparsities, trainable
/// values), to check that the ranks of a multi-process group start from the same state.
pub fn fingerprint<B: Backend>(sess: &mut Session<B>) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    let mut eat = |bytes: &[u8]| {
        for &b in bytes {
            h = (h ^ b as u64).wrapping_mul(0x0100_0000_01b3);
        }
    };
    if let Some(t) = &sess.trainer {
        eat(&t.step.to_le_bytes());
        eat(&(t.epoch as u64).to_le_bytes());
        // the options too (lr, epochs, batch, warm-up, allocator, …): ranks that differ only there
        // would drift apart without any other sign
        eat(serde_json::to_string(&t.cfg).unwrap_or_default().as_bytes());
    }
    for k in kernel_adapters(&sess.vit) {
        eat(&k.sparsity.to_bits().to_le_bytes());
    }
    let be = sess.be.clone();
    let values: Vec<&B::Buf> = sess.vit.params_mut().into_iter().filter(|p| p.train.is_some()).map(|p| &p.value).collect();
    for v in be.download_many(&values).iter().flatten() {
        eat(&v.to_bits().to_le_bytes());
    }
    h
}

/// The text of a panic payload.
pub fn panic_text(p: &(dyn std::any::Any + Send)) -> String {
    p.downcast_ref::<String>().cloned().or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string())).unwrap_or_else(|| "a panic".into())
}

/// One rank of a local group: its own session (model replica, trainer, backend) and communicator.
pub struct Replica<B: Backend> {
    /// The replica.
    pub sess: Session<B>,
    /// This rank's communicator.
    pub comm: Box<dyn Communicator<B>>,
}

type Job<B> = Box<dyn FnOnce(&mut Replica<B>) + Send>;

/// A thread that owns one [`Replica`] and runs jobs on it in order.
struct Worker<B: Backend> {
    rank: usize,
    tx: Option<mpsc::Sender<Job<B>>>,
    thread: Option<JoinHandle<()>>,
}

impl<B: Backend> Worker<B> {
    /// Starts the thread of `rank`, which builds its replica with `make`; the receiver reports
    /// whether that worked.
    fn start(rank: usize, make: impl FnOnce() -> Result<Replica<B>> + Send + 'static) -> Result<(Self, mpsc::Receiver<Result<()>>)> {
        let (tx, rx) = mpsc::channel::<Job<B>>();
        let (itx, irx) = mpsc::channel::<Result<()>>();
        let thread = std::thread::Builder::new()
            .name(format!("snella-rank-{rank}"))
            .spawn(move || {
                let mut rep = match catch_unwind(AssertUnwindSafe(make)) {
                    Ok(Ok(r)) => r,
                    Ok(Err(e)) => {
                        let _ = itx.send(Err(e));
                        return;
                    }
                    Err(p) => {
                        let _ = itx.send(Err(comm_err(format!("rank {rank} failed to start: {}", panic_text(&*p)))));
                        return;
                    }
                };
                let _ = itx.send(Ok(()));
                while let Ok(job) = rx.recv() {
                    job(&mut rep);
                }
            })
            .map_err(|e| comm_err(format!("cannot start the thread of rank {rank}: {e}")))?;
        Ok((Worker { rank, tx: Some(tx), thread: Some(thread) }, irx))
    }

    /// Queues `f` on the worker; the receiver gets its result, or its panic (after which the
    /// worker has aborted the group so that the other ranks do not wait for it).
    fn call<T: Send + 'static>(&self, f: impl FnOnce(&mut Replica<B>) -> T + Send + 'static) -> mpsc::Receiver<std::thread::Result<T>> {
        let (tx, rx) = mpsc::channel();
        let job: Job<B> = Box::new(move |rep: &mut Replica<B>| {
            let r = catch_unwind(AssertUnwindSafe(|| f(rep)));
            if let Err(p) = &r {
                rep.comm.abort(&panic_text(&**p));
            }
            let _ = tx.send(r);
        });
        if let Some(t) = &self.tx {
            let _ = t.send(job);
        }
        rx
    }
}

impl<B: Backend> Drop for Worker<B> {
    fn drop(&mut self) {
        drop(self.tx.take());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Waits for a worker's result; a vanished worker becomes a `COMM_ERROR`.
fn wait<T>(rank: usize, rx: mpsc::Receiver<std::thread::Result<Result<T>>>) -> std::thread::Result<Result<T>> {
    rx.recv().unwrap_or_else(|_| Ok(Err(comm_err(format!("the thread of rank {rank} is gone")))))
}

/// A data-parallel group driving a [`Session`] (see the module docs). Build it with
/// [`DataParallel::local`] (every rank in this process) or [`DataParallel::process`] (this process
/// is one rank), then call [`DataParallel::begin_epoch`] and [`DataParallel::step`] in place of the
/// session's own, and [`DataParallel::invalidate`] after anything else changes the session's state
/// (prepare, loading a checkpoint or adapter): the replicas are then re-copied from rank 0 before the
/// next step.
pub struct DataParallel<B: Backend> {
    comm: Box<dyn Communicator<B>>,
    workers: Vec<Worker<B>>,
    synced: bool,
    failed: Option<String>,
}

impl<B: Backend> Drop for DataParallel<B> {
    /// Lets every worker tear its replica down at once (their threads end when their queue
    /// closes), while this rank's communicator drops with the struct; the workers' own `Drop`
    /// then joins the threads. Communicators whose release waits for the other ranks of the
    /// process are thus released together, not one after another.
    fn drop(&mut self) {
        for w in &mut self.workers {
            drop(w.tx.take());
        }
    }
}

impl<B: Backend> DataParallel<B> {
    /// A group whose ranks all live in this process: `sess` is rank 0 with `comm0`, and each of
    /// `others` (a backend, e.g. another GPU, and the communicator of ranks 1, 2, … in order) gets a
    /// worker thread holding a replica loaded from the session's checkpoint (`sess.source`) with the
    /// same method. The replicas take rank 0's training state before the first step.
    ///
    /// # Errors
    /// [`SnellaError::Config`] when no method is attached or the communicators' ranks are not
    /// `0, 1, …, world − 1`; a replica's load or attach error.
    pub fn local(sess: &Session<B>, comm0: Box<dyn Communicator<B>>, others: Vec<(B, Box<dyn Communicator<B>>)>) -> Result<Self> {
        let method = sess.method.clone().ok_or_else(|| SnellaError::config("method", "none", "attach a method before data-parallel training"))?;
        let world = others.len() + 1;
        let ranks: Vec<(usize, usize)> = std::iter::once((comm0.rank(), comm0.world())).chain(others.iter().map(|(_, c)| (c.rank(), c.world()))).collect();
        if ranks.iter().enumerate().any(|(i, &(r, w))| r != i || w != world) {
            return Err(SnellaError::config("communicators", format!("{ranks:?} (rank, world)"), &format!("ranks 0..{world} in order, each of world {world}")));
        }
        let mut started = Vec::with_capacity(others.len());
        for (i, (be, comm)) in others.into_iter().enumerate() {
            let (source, method) = (sess.source.clone(), method.clone());
            started.push(Worker::start(i + 1, move || {
                let mut s = Session::load(be, &source)?;
                s.attach(method)?;
                Ok(Replica { sess: s, comm })
            })?);
        }
        let mut workers = Vec::with_capacity(started.len());
        let mut first_err = None;
        for (w, init) in started {
            let r = init.recv().unwrap_or_else(|_| Err(comm_err(format!("the thread of rank {} stopped while starting", w.rank))));
            if let Err(e) = r {
                first_err.get_or_insert(e);
            }
            workers.push(w);
        }
        if let Some(e) = first_err {
            return Err(e);
        }
        Ok(DataParallel { comm: comm0, workers, synced: false, failed: None })
    }

    /// A group in which this process is one rank (`comm.rank()` of `comm.world()`), the others
    /// being other processes that make the same calls with the same data, seed and options. Before
    /// the first step the ranks check that they hold the same training state (a hash of it,
    /// compared through one all-reduce).
    pub fn process(comm: Box<dyn Communicator<B>>) -> Self {
        DataParallel { comm, workers: Vec::new(), synced: false, failed: None }
    }

    /// This process's (first) rank.
    pub fn rank(&self) -> usize {
        self.comm.rank()
    }

    /// The number of ranks in the group.
    pub fn world(&self) -> usize {
        self.comm.world()
    }

    /// The ranks that run in this process (1 for a process group).
    pub fn local_ranks(&self) -> usize {
        self.workers.len() + 1
    }

    /// The transport: `local`, `tcp` or `nccl`.
    pub fn kind(&self) -> &'static str {
        self.comm.kind()
    }

    /// The session's state changed outside [`DataParallel::step`]/[`DataParallel::begin_epoch`]:
    /// copy it to the replicas (or, for a process group, re-check it) before the next step.
    pub fn invalidate(&mut self) {
        self.synced = false;
    }

    fn check_failed(&self) -> Result<()> {
        match &self.failed {
            Some(f) => Err(comm_err(format!("the data-parallel group failed earlier ({f}); create it again"))),
            None => Ok(()),
        }
    }

    /// Runs `f` on every worker and waits; the first error wins, a panic is re-raised here.
    fn on_workers(&mut self, f: impl Fn(&mut Replica<B>) -> Result<()> + Send + Sync + 'static) -> Result<()> {
        let f = Arc::new(f);
        let rxs: Vec<_> = self.workers.iter().map(|w| {
            let f = f.clone();
            (w.rank, w.call(move |rep| f(rep)))
        }).collect();
        let mut first = Ok(());
        for (rank, rx) in rxs {
            match wait(rank, rx) {
                Ok(r) => {
                    if first.is_ok() {
                        first = r;
                    }
                }
                Err(p) => {
                    self.failed = Some(panic_text(&*p));
                    resume_unwind(p);
                }
            }
        }
        first
    }

    /// Brings the group to the session's state: copies it to the replicas (local group) or checks
    /// that every process holds the same (process group).
    fn sync(&mut self, sess: &mut Session<B>) -> Result<()> {
        if self.synced {
            return Ok(());
        }
        if self.workers.is_empty() {
            if self.comm.world() > 1 {
                let h = (fingerprint(sess) % (1 << 20)) as f64;
                let mut v = [h, h * h];
                self.comm.all_reduce_host(&sess.be, &mut v)?;
                let w = self.comm.world() as f64;
                if v[0] != w * h || v[1] != w * h * h {
                    return Err(comm_err(format!(
                        "the {} ranks hold different training states (rank {}'s parameters, counters or options differ from another rank's); start every rank with the same model, method, seed, training options (lr, epochs, batch size, warm-up, sT, …) and checkpoint",
                        self.comm.world(),
                        self.comm.rank()
                    )));
                }
            }
        } else {
            let snap = Arc::new(Snapshot::take(sess));
            self.on_workers(move |rep| snap.restore(&mut rep.sess))?;
        }
        self.synced = true;
        Ok(())
    }

    /// Starts epoch `t` (the allocator's round) on the session and every replica.
    ///
    /// # Errors
    /// As [`Session::begin_epoch`].
    pub fn begin_epoch(&mut self, sess: &mut Session<B>, t: usize) -> Result<()> {
        self.check_failed()?;
        sess.begin_epoch(t)?;
        if self.synced && !self.workers.is_empty() {
            self.on_workers(move |rep| rep.sess.begin_epoch(t))?;
        }
        Ok(())
    }

    /// One data-parallel step on the global batch `images: [B, C, H, W]`, `labels: [B]`: each rank
    /// of this process takes its shard ([`shard_range`]), the ranks run [`dp_step`] concurrently,
    /// and the session (rank 0 of a local group) ends with the parameters every rank holds.
    /// Returns the step's statistics over the whole global batch.
    ///
    /// # Errors
    /// As [`Session::train_step`]; `COMM_ERROR` when the group fails (a rank's panic, e.g. a CUDA
    /// out-of-memory, is re-raised here with its message after the other ranks were released; the
    /// group is then unusable).
    pub fn step(&mut self, sess: &mut Session<B>, images: &[f32], labels: &[u32]) -> Result<StepStats> {
        self.check_failed()?;
        sess.check_batch(images, labels)?;
        if sess.trainer.is_none() {
            return Err(SnellaError::config("trainer", "none", "call prepare() before training"));
        }
        self.sync(sess)?;
        let (global, world) = (labels.len(), self.comm.world());
        let per = images.len() / global;
        let rxs: Vec<_> = self
            .workers
            .iter()
            .map(|w| {
                let r = shard_range(global, world, w.rank);
                let (x, y) = (Borrowed::new(&images[r.start * per..r.end * per]), Borrowed::new(&labels[r]));
                (w.rank, w.call(move |rep| {
                    let Session { be, vit, trainer, .. } = &mut rep.sess;
                    // SAFETY: `step` waits for this job's result below before `images`/`labels` go.
                    let (x, y) = unsafe { (x.get(), y.get()) };
                    dp_step(trainer.as_mut().expect("replica prepared"), be, vit, &*rep.comm, x, y, global)
                }))
            })
            .collect();
        let r = shard_range(global, world, self.comm.rank());
        let comm = &*self.comm;
        let mine = catch_unwind(AssertUnwindSafe(|| {
            let Session { be, vit, trainer, .. } = &mut *sess;
            dp_step(trainer.as_mut().expect("checked above"), be, vit, comm, &images[r.start * per..r.end * per], &labels[r.clone()], global)
        }));
        if let Err(p) = &mine {
            self.comm.abort(&panic_text(&**p));
        }
        let theirs: Vec<_> = rxs.into_iter().map(|(rank, rx)| wait(rank, rx)).collect();
        let mine = match mine {
            Ok(m) => m,
            Err(p) => {
                self.failed = Some(panic_text(&*p));
                resume_unwind(p);
            }
        };
        let mut out = mine;
        for t in theirs {
            match t {
                Err(p) => {
                    self.failed = Some(panic_text(&*p));
                    resume_unwind(p);
                }
                Ok(Err(e)) if out.is_ok() => out = Err(e),
                Ok(_) => {}
            }
        }
        if let Err(SnellaError::Device { code, message }) = &out {
            if code == "COMM_ERROR" {
                self.failed = Some(message.clone());
            }
        }
        out
    }
}
