//! Joining a multi-process data-parallel group over TCP: the rendezvous (`--rendezvous host:port
//! --world-rank R --world W`) and [`TcpComm`], a CPU communicator over the rendezvous's sockets.
//!
//! **Rendezvous.** Rank 0 listens on `host:port` (the address every rank is given; when that
//! address cannot be bound locally, rank 0 listens on `0.0.0.0:port`). Every other rank connects
//! (retrying until the deadline, so the processes may start in any order) and sends a hello
//! (`SNELLAR1`, its rank and the world size, little-endian u32s). Once all `W − 1` ranks are in,
//! rank 0 checks that every rank is in `1..W`, appears once and agrees on `W`, then sends each the
//! 128-byte group id (`SNELLAOK` + id), or an error (`SNELLAER` + length + text) that names the
//! problem on every rank. For NCCL the id is the `ncclUniqueId` made by rank 0; the sockets are then
//! closed. For [`TcpComm`] the sockets stay open and carry the collectives.
//!
//! **TcpComm.** A star through rank 0: each collective, every rank sends its contribution to rank
//! 0, which adds them in rank order ([`crate::comm::combine`], as [`crate::comm::LocalComm`] does)
//! and sends the result back. So a multi-process CPU group reproduces the single-process one, and
//! one rank with `W` micro-batches, bit for bit. It exists to run and test the multi-process path
//! without GPUs; on GPUs use NCCL.

use crate::backend::Backend;
use crate::comm::{combine, comm_err, staged, Communicator, Payload};
use snella_core::{Result, SnellaError};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// The size of a group id (`ncclUniqueId`).
pub const ID_BYTES: usize = 128;
const HELLO: &[u8; 8] = b"SNELLAR1";
const OK: &[u8; 8] = b"SNELLAOK";
const ERR: &[u8; 8] = b"SNELLAER";
/// How long [`rendezvous`] waits for the other ranks by default.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(600);

/// Where and as whom to join: `addr` (`host:port` of rank 0), this process's `rank` and the
/// `world` size.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RendezvousConfig {
    /// `host:port` where rank 0 listens.
    pub addr: String,
    /// This process's rank in `0..world`.
    pub rank: usize,
    /// The number of processes (ranks).
    pub world: usize,
    /// How long to wait for the others.
    pub timeout: Duration,
}

impl RendezvousConfig {
    /// Checks the fields, naming the option as the CLI spells it.
    ///
    /// # Errors
    /// [`SnellaError::Config`] for `world = 0`, `rank ≥ world`, or an address that is not
    /// `host:port` with a port in 1..65535.
    pub fn validate(&self) -> Result<()> {
        if self.world == 0 {
            return Err(SnellaError::config("world", 0, "an integer ≥ 1 (the number of processes)"));
        }
        if self.rank >= self.world {
            return Err(SnellaError::config("worldRank", self.rank, &format!("an integer in [0, world = {})", self.world)));
        }
        let port = self.addr.rsplit_once(':').and_then(|(h, p)| if h.is_empty() { None } else { p.parse::<u16>().ok() });
        if !matches!(port, Some(p) if p > 0) {
            return Err(SnellaError::config("rendezvous", &self.addr, "host:port with a port in [1, 65535], e.g. 10.0.0.1:29500"));
        }
        Ok(())
    }
}

/// The sockets of a joined group: on rank 0 one per other rank (index = rank, `None` at 0), on the
/// others one to rank 0 (index 0).
pub struct Link {
    /// This rank.
    pub rank: usize,
    /// The number of ranks.
    pub world: usize,
    /// The sockets, indexed by peer rank.
    pub peers: Vec<Option<TcpStream>>,
}

fn io_err(what: &str, e: std::io::Error) -> SnellaError {
    comm_err(format!("{what}: {e}"))
}

fn read_u32(s: &mut TcpStream) -> std::io::Result<u32> {
    let mut b = [0u8; 4];
    s.read_exact(&mut b)?;
    Ok(u32::from_le_bytes(b))
}

/// Sends an error frame (best effort) to a peer.
fn send_err(s: &mut TcpStream, msg: &str) {
    let mut f = ERR.to_vec();
    f.extend((msg.len() as u32).to_le_bytes());
    f.extend(msg.as_bytes());
    let _ = s.write_all(&f);
}

/// Joins the group described by `cfg`. Rank 0 passes the group `id` to distribute (`Some`); the
/// others pass `None` and receive it. Returns the id and the open sockets.
///
/// # Errors
/// [`SnellaError::Config`] from [`RendezvousConfig::validate`]; `COMM_ERROR` naming the address,
/// the ranks still missing at the deadline, a rank out of range or seen twice, a disagreement on
/// the world size, or a socket failure.
pub fn rendezvous(cfg: &RendezvousConfig, id: Option<[u8; ID_BYTES]>) -> Result<([u8; ID_BYTES], Link)> {
    cfg.validate()?;
    let deadline = Instant::now() + cfg.timeout;
    if cfg.world == 1 {
        return Ok((id.unwrap_or([0; ID_BYTES]), Link { rank: 0, world: 1, peers: vec![None] }));
    }
    if cfg.rank == 0 {
        let id = id.ok_or_else(|| SnellaError::config("id", "none", "rank 0 provides the group id"))?;
        root(cfg, id, deadline).map(|l| (id, l))
    } else {
        leaf(cfg, deadline)
    }
}

fn listen(addr: &str) -> Result<TcpListener> {
    TcpListener::bind(addr).or_else(|e| {
        let port = addr.rsplit_once(':').map(|(_, p)| p).unwrap_or("0");
        TcpListener::bind(format!("0.0.0.0:{port}")).map_err(|e2| io_err(&format!("rank 0 cannot listen on {addr} ({e}) nor on 0.0.0.0:{port}"), e2))
    })
}

fn root(cfg: &RendezvousConfig, id: [u8; ID_BYTES], deadline: Instant) -> Result<Link> {
    let l = listen(&cfg.addr)?;
    l.set_nonblocking(true).map_err(|e| io_err("listener", e))?;
    let mut peers: Vec<Option<TcpStream>> = (0..cfg.world).map(|_| None).collect();
    let mut problem: Option<String> = None;
    let mut extra: Vec<TcpStream> = Vec::new();
    while peers.iter().skip(1).any(|p| p.is_none()) && problem.is_none() {
        match l.accept() {
            Ok((mut s, from)) => {
                s.set_nonblocking(false).map_err(|e| io_err("socket", e))?;
                s.set_read_timeout(Some(Duration::from_secs(30))).map_err(|e| io_err("socket", e))?;
                let mut magic = [0u8; 8];
                let hello = s.read_exact(&mut magic).and_then(|_| Ok((read_u32(&mut s)?, read_u32(&mut s)?)));
                let (rank, world) = match hello {
                    Ok((r, w)) if &magic == HELLO => (r as usize, w as usize),
                    _ => continue, // not one of ours (a port scan, a stale process): ignore it
                };
                if world != cfg.world {
                    problem = Some(format!("rank {rank} (from {from}) says world = {world}, rank 0 says world = {}", cfg.world));
                } else if rank == 0 || rank >= cfg.world {
                    problem = Some(format!("a process (from {from}) says it is rank {rank}; ranks 1..{} connect to rank 0", cfg.world));
                } else if peers[rank].is_some() {
                    problem = Some(format!("rank {rank} joined twice (again from {from}); give every process its own --world-rank"));
                }
                if problem.is_some() {
                    extra.push(s);
                } else {
                    peers[rank] = Some(s);
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                if Instant::now() >= deadline {
                    let missing: Vec<String> = (1..cfg.world).filter(|&r| peers[r].is_none()).map(|r| r.to_string()).collect();
                    problem = Some(format!(
                        "rank 0 waited {:.0} s on {} for ranks {} of world {}; start them with --rendezvous {} and their --world-rank",
                        cfg.timeout.as_secs_f64(),
                        cfg.addr,
                        missing.join(", "),
                        cfg.world,
                        cfg.addr
                    ));
                } else {
                    std::thread::sleep(Duration::from_millis(20));
                }
            }
            Err(e) => return Err(io_err(&format!("rank 0 accepting on {}", cfg.addr), e)),
        }
    }
    if let Some(p) = problem {
        for s in peers.iter_mut().flatten().chain(extra.iter_mut()) {
            send_err(s, &p);
        }
        return Err(comm_err(format!("rendezvous on {}: {p}", cfg.addr)));
    }
    let mut frame = OK.to_vec();
    frame.extend(id);
    for (r, s) in peers.iter_mut().enumerate().skip(1) {
        let s = s.as_mut().expect("all joined");
        s.set_read_timeout(None).map_err(|e| io_err("socket", e))?;
        let _ = s.set_nodelay(true);
        s.write_all(&frame).map_err(|e| io_err(&format!("sending the group id to rank {r}"), e))?;
    }
    Ok(Link { rank: 0, world: cfg.world, peers })
}

fn leaf(cfg: &RendezvousConfig, deadline: Instant) -> Result<([u8; ID_BYTES], Link)> {
    let addrs: Vec<SocketAddr> = cfg.addr.to_socket_addrs().map_err(|e| io_err(&format!("rank {} cannot resolve {}", cfg.rank, cfg.addr), e))?.collect();
    let mut last = String::from("no address");
    let mut s = loop {
        let tried = addrs.iter().find_map(|a| match TcpStream::connect_timeout(a, Duration::from_secs(2)) {
            Ok(s) => Some(s),
            Err(e) => {
                last = e.to_string();
                None
            }
        });
        if let Some(s) = tried {
            break s;
        }
        if Instant::now() >= deadline {
            return Err(comm_err(format!(
                "rank {} could not reach rank 0 at {} within {:.0} s (last error: {last}); is rank 0 started with --rendezvous {}?",
                cfg.rank,
                cfg.addr,
                cfg.timeout.as_secs_f64(),
                cfg.addr
            )));
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let _ = s.set_nodelay(true);
    let mut hello = HELLO.to_vec();
    hello.extend((cfg.rank as u32).to_le_bytes());
    hello.extend((cfg.world as u32).to_le_bytes());
    s.write_all(&hello).map_err(|e| io_err(&format!("rank {} sending its hello to {}", cfg.rank, cfg.addr), e))?;
    let left = deadline.saturating_duration_since(Instant::now()).max(Duration::from_secs(1));
    s.set_read_timeout(Some(left)).map_err(|e| io_err("socket", e))?;
    let mut magic = [0u8; 8];
    s.read_exact(&mut magic).map_err(|e| io_err(&format!("rank {} waiting for the group id from {}", cfg.rank, cfg.addr), e))?;
    if &magic == ERR {
        let n = read_u32(&mut s).unwrap_or(0) as usize;
        let mut m = vec![0u8; n.min(1 << 16)];
        let _ = s.read_exact(&mut m);
        return Err(comm_err(format!("rendezvous on {}: {}", cfg.addr, String::from_utf8_lossy(&m))));
    }
    if &magic != OK {
        return Err(comm_err(format!("rank {}: {} answered with something other than a snella rendezvous", cfg.rank, cfg.addr)));
    }
    let mut id = [0u8; ID_BYTES];
    s.read_exact(&mut id).map_err(|e| io_err("reading the group id", e))?;
    s.set_read_timeout(None).map_err(|e| io_err("socket", e))?;
    let mut peers: Vec<Option<TcpStream>> = (0..cfg.world).map(|_| None).collect();
    peers[0] = Some(s);
    Ok((id, Link { rank: cfg.rank, world: cfg.world, peers }))
}

// ---- TcpComm: frames of Payload ----

const T_F32: u8 = 1;
const T_F64: u8 = 2;
const T_BCAST: u8 = 3;
const T_BARRIER: u8 = 4;
const T_ERROR: u8 = 255;

fn encode(p: &Result<Payload>) -> Vec<u8> {
    let mut f = Vec::new();
    let f32s = |f: &mut Vec<u8>, v: &[f32]| {
        f.extend((v.len() as u64).to_le_bytes());
        f.reserve(v.len() * 4);
        for x in v {
            f.extend(x.to_le_bytes());
        }
    };
    match p {
        Ok(Payload::SumF32(v)) => {
            f.push(T_F32);
            f.extend((v.len() as u32).to_le_bytes());
            for b in v {
                f32s(&mut f, b);
            }
        }
        Ok(Payload::SumF64(v)) => {
            f.push(T_F64);
            f.extend((v.len() as u64).to_le_bytes());
            for x in v {
                f.extend(x.to_le_bytes());
            }
        }
        Ok(Payload::Bcast { root, data, lens }) => {
            f.push(T_BCAST);
            f.extend((*root as u32).to_le_bytes());
            f.extend((lens.len() as u32).to_le_bytes());
            for l in lens {
                f.extend((*l as u64).to_le_bytes());
            }
            for b in data {
                f32s(&mut f, b);
            }
        }
        Ok(Payload::Barrier) => f.push(T_BARRIER),
        Err(e) => {
            f.push(T_ERROR);
            let m = e.to_string();
            f.extend((m.len() as u64).to_le_bytes());
            f.extend(m.as_bytes());
        }
    }
    let mut out = (f.len() as u64).to_le_bytes().to_vec();
    out.extend(f);
    out
}

/// A bounds-checked reader over a received frame.
struct Cur<'a>(&'a [u8]);

impl Cur<'_> {
    fn take(&mut self, n: usize) -> Result<&[u8]> {
        if self.0.len() < n {
            return Err(comm_err("a truncated collective frame"));
        }
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        Ok(a)
    }
    fn u32(&mut self) -> Result<usize> {
        Ok(u32::from_le_bytes(self.take(4)?.try_into().expect("4 bytes")) as usize)
    }
    fn u64(&mut self) -> Result<usize> {
        Ok(u64::from_le_bytes(self.take(8)?.try_into().expect("8 bytes")) as usize)
    }
    fn f32s(&mut self) -> Result<Vec<f32>> {
        let n = self.u64()?;
        let b = self.take(n.checked_mul(4).ok_or_else(|| comm_err("a corrupt collective frame"))?)?;
        Ok(b.chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().expect("4 bytes"))).collect())
    }
}

fn decode(frame: &[u8]) -> Result<Payload> {
    let mut c = Cur(frame);
    let tag = c.take(1)?[0];
    match tag {
        T_F32 => {
            let n = c.u32()?;
            Ok(Payload::SumF32((0..n).map(|_| c.f32s()).collect::<Result<_>>()?))
        }
        T_F64 => {
            let n = c.u64()?;
            let b = c.take(n.checked_mul(8).ok_or_else(|| comm_err("a corrupt collective frame"))?)?;
            Ok(Payload::SumF64(b.chunks_exact(8).map(|x| f64::from_le_bytes(x.try_into().expect("8 bytes"))).collect()))
        }
        T_BCAST => {
            let root = c.u32()?;
            let n = c.u32()?;
            let lens = (0..n).map(|_| c.u64()).collect::<Result<Vec<_>>>()?;
            let data = (0..n).map(|_| c.f32s()).collect::<Result<Vec<_>>>()?;
            Ok(Payload::Bcast { root, data, lens })
        }
        T_BARRIER => Ok(Payload::Barrier),
        T_ERROR => {
            let n = c.u64()?;
            Err(comm_err(String::from_utf8_lossy(c.take(n)?).trim_start_matches("COMM_ERROR: ").to_string()))
        }
        t => Err(comm_err(format!("an unknown collective frame (tag {t})"))),
    }
}

fn read_frame(s: &mut TcpStream) -> std::io::Result<Vec<u8>> {
    let mut n = [0u8; 8];
    s.read_exact(&mut n)?;
    let mut f = vec![0u8; u64::from_le_bytes(n) as usize];
    s.read_exact(&mut f)?;
    Ok(f)
}

/// A CPU communicator between processes, over the sockets of a [`rendezvous`] (see the module
/// docs). Collectives are staged through the host, like [`crate::comm::LocalComm`]'s.
pub struct TcpComm {
    rank: usize,
    world: usize,
    peers: Mutex<Vec<Option<TcpStream>>>,
    /// Clones of the sockets, to shut them down from [`Communicator::abort`] while a collective
    /// holds `peers`.
    shutdown: Vec<TcpStream>,
}

impl TcpComm {
    /// Joins the group (see [`rendezvous`]) and keeps its sockets for the collectives.
    ///
    /// # Errors
    /// As [`rendezvous`].
    pub fn join(cfg: &RendezvousConfig) -> Result<Self> {
        let (_, link) = rendezvous(cfg, Some([0; ID_BYTES]).filter(|_| cfg.rank == 0))?;
        Self::from_link(link)
    }

    /// A communicator over an existing [`Link`].
    ///
    /// # Errors
    /// `COMM_ERROR` when a socket cannot be cloned.
    pub fn from_link(link: Link) -> Result<Self> {
        let shutdown = link.peers.iter().flatten().map(|s| s.try_clone().map_err(|e| io_err("socket", e))).collect::<Result<Vec<_>>>()?;
        Ok(TcpComm { rank: link.rank, world: link.world, peers: Mutex::new(link.peers), shutdown })
    }

    fn exchange(&self, p: Payload) -> Result<Payload> {
        let mut peers = self.peers.lock().unwrap_or_else(|e| e.into_inner());
        if self.world == 1 {
            return combine(vec![p]);
        }
        let gone = |r: usize, e: std::io::Error| comm_err(format!("rank {r} of {} left the group or its connection broke ({e})", self.world));
        if self.rank == 0 {
            let mut parts = vec![p];
            for r in 1..self.world {
                let s = peers[r].as_mut().expect("root holds every peer");
                let f = read_frame(s).map_err(|e| gone(r, e))?;
                parts.push(decode(&f)?);
            }
            let result = combine(parts);
            let frame = encode(&result);
            for (r, s) in peers.iter_mut().enumerate().skip(1) {
                s.as_mut().expect("root holds every peer").write_all(&frame).map_err(|e| gone(r, e))?;
            }
            result
        } else {
            let s = peers[0].as_mut().expect("leaf holds rank 0");
            s.write_all(&encode(&Ok(p))).map_err(|e| gone(0, e))?;
            let f = read_frame(s).map_err(|e| gone(0, e))?;
            decode(&f)
        }
    }
}

impl<B: Backend> Communicator<B> for TcpComm {
    fn rank(&self) -> usize {
        self.rank
    }
    fn world(&self) -> usize {
        self.world
    }
    fn kind(&self) -> &'static str {
        "tcp"
    }
    fn all_reduce_sum(&self, be: &B, bufs: &mut [&mut B::Buf]) -> Result<()> {
        staged::all_reduce_sum(be, bufs, |p| self.exchange(p))
    }
    fn all_reduce_host(&self, _be: &B, vals: &mut [f64]) -> Result<()> {
        staged::all_reduce_host(vals, |p| self.exchange(p))
    }
    fn broadcast(&self, be: &B, bufs: &mut [&mut B::Buf], root: usize) -> Result<()> {
        staged::broadcast(be, bufs, root, self.rank, self.world, |p| self.exchange(p))
    }
    fn barrier(&self, _be: &B) -> Result<()> {
        self.exchange(Payload::Barrier).map(|_| ())
    }
    fn abort(&self, _why: &str) {
        for s in &self.shutdown {
            let _ = s.shutdown(std::net::Shutdown::Both);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpu::CpuBackend;

    /// A port that was free a moment ago on 127.0.0.1.
    pub(crate) fn free_port() -> u16 {
        TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
    }

    fn cfg(port: u16, rank: usize, world: usize, ms: u64) -> RendezvousConfig {
        RendezvousConfig { addr: format!("127.0.0.1:{port}"), rank, world, timeout: Duration::from_millis(ms) }
    }

    #[test]
    fn every_rank_gets_rank_0s_id_in_any_start_order() {
        let port = free_port();
        let mut id = [0u8; ID_BYTES];
        for (i, b) in id.iter_mut().enumerate() {
            *b = (i * 37 % 251) as u8;
        }
        // ranks 2 and 1 start before rank 0, which comes 200 ms later
        let hs: Vec<_> = [2usize, 1, 0]
            .into_iter()
            .map(|r| {
                std::thread::spawn(move || {
                    if r == 0 {
                        std::thread::sleep(Duration::from_millis(200));
                    }
                    let (got, link) = rendezvous(&cfg(port, r, 3, 10_000), (r == 0).then_some(id)).unwrap();
                    (r, got, link.peers.iter().filter(|p| p.is_some()).count())
                })
            })
            .collect();
        for h in hs {
            let (r, got, n) = h.join().unwrap();
            assert_eq!(got, id, "rank {r}");
            assert_eq!(n, if r == 0 { 2 } else { 1 });
        }
    }

    #[test]
    fn tcp_collectives_sum_in_rank_order_like_local_comm() {
        let port = free_port();
        let vals = [1e8f32, 1.0, -1e8];
        let hs: Vec<_> = (0..3)
            .map(|r| {
                std::thread::spawn(move || {
                    let c = TcpComm::join(&cfg(port, r, 3, 10_000)).unwrap();
                    let be = CpuBackend;
                    let mut a = vec![vals[r], r as f32, -0.0];
                    let mut b: Vec<f32> = (0..1000).map(|i| (i * (r + 1)) as f32 * 0.001).collect();
                    Communicator::<CpuBackend>::all_reduce_sum(&c, &be, &mut [&mut a, &mut b]).unwrap();
                    let mut h = [0.25 * r as f64];
                    Communicator::<CpuBackend>::all_reduce_host(&c, &be, &mut h).unwrap();
                    let mut x = vec![r as f32; 4];
                    Communicator::<CpuBackend>::broadcast(&c, &be, &mut [&mut x], 2).unwrap();
                    Communicator::<CpuBackend>::barrier(&c, &be).unwrap();
                    let mut bad = vec![0f32; 2 + r];
                    let e = Communicator::<CpuBackend>::all_reduce_sum(&c, &be, &mut [&mut bad]).unwrap_err().to_string();
                    (a, b, h, x, e)
                })
            })
            .collect();
        let want_b: Vec<f32> = (0..1000).map(|i| ((i as f32 * 0.001) + (2 * i) as f32 * 0.001) + (3 * i) as f32 * 0.001).collect();
        for h in hs {
            let (a, b, h, x, e) = h.join().unwrap();
            assert_eq!(a.iter().map(|v| v.to_bits()).collect::<Vec<_>>(), [0.0f32, 3.0, -0.0].iter().map(|v| v.to_bits()).collect::<Vec<_>>());
            assert_eq!(b, want_b);
            assert_eq!(h, [0.75]);
            assert_eq!(x, vec![2.0; 4]);
            assert!(e.contains("rank 0 has [2], rank 1 has [3]"), "{e}");
        }
    }

    #[test]
    fn rendezvous_errors_name_the_problem() {
        let bad = |c: RendezvousConfig| rendezvous(&c, Some([0; ID_BYTES])).err().unwrap().to_string();
        let e = bad(RendezvousConfig { addr: "localhost".into(), rank: 0, world: 2, timeout: DEFAULT_TIMEOUT });
        assert!(e.contains("rendezvous = localhost") && e.contains("host:port"), "{e}");
        let e = bad(cfg(1, 2, 2, 10));
        assert!(e.contains("worldRank = 2") && e.contains("[0, world = 2)"), "{e}");
        // nobody comes: rank 0 names the address and the missing ranks
        let port = free_port();
        let e = bad(cfg(port, 0, 3, 300));
        assert!(e.contains(&format!("127.0.0.1:{port}")) && e.contains("ranks 1, 2 of world 3"), "{e}");
        // no rank 0: a rank names the address it could not reach
        let port = free_port();
        let e = rendezvous(&cfg(port, 1, 2, 300), None).err().unwrap().to_string();
        assert!(e.contains("rank 1 could not reach rank 0") && e.contains(&format!("127.0.0.1:{port}")), "{e}");
        // disagreeing world sizes: both processes hear why
        let port = free_port();
        let h = std::thread::spawn(move || rendezvous(&cfg(port, 1, 3, 5000), None).err().unwrap().to_string());
        let e0 = rendezvous(&cfg(port, 0, 2, 5000), Some([0; ID_BYTES])).err().unwrap().to_string();
        let e1 = h.join().unwrap();
        for e in [&e0, &e1] {
            assert!(e.contains("rank 1 (from 127.0.0.1:") && e.contains("says world = 3, rank 0 says world = 2"), "{e}");
        }
        // the same rank given to two processes
        let port = free_port();
        let hs: Vec<_> = (0..2u64)
            .map(|i| {
                std::thread::spawn(move || {
                    std::thread::sleep(Duration::from_millis(100 * i));
                    rendezvous(&cfg(port, 1, 3, 5000), None).err().unwrap().to_string()
                })
            })
            .collect();
        let e0 = rendezvous(&cfg(port, 0, 3, 5000), Some([0; ID_BYTES])).err().unwrap().to_string();
        assert!(e0.contains("rank 1 joined twice"), "{e0}");
        for h in hs {
            let e = h.join().unwrap();
            assert!(e.contains("rank 1 joined twice"), "{e}");
        }
    }
}
