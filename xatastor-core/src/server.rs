//! The thread-per-core io_uring NVMe/TCP server.
//!
//! ```text
//!  Server::start ── binds one SO_REUSEPORT listener per worker ── spawns N workers
//!
//!  worker (one thread, one io_uring, no locks on the I/O path):
//!     AcceptMulti(listener) ─▶ new Conn { engine Connection, reassembly buffer, send queue }
//!     RecvMulti(conn)       ─▶ bytes in a provided buffer (worker-wide pool) ─▶ handle_input ─▶ events
//!     Writev(conn)          ◀─ Event::Transmit (header + payload Bytes, no copy)
//!     Read/Writev/Fsync/    ◀─ Event::Io for file, block-device and zvol volumes (O_DIRECT with
//!       Fallocate(fd)          aligned buffers), the PDUs' own buffers as write data
//!     Read(eventfd)         ◀─ engine notifiers (AEN, teardown), async backend completions, shutdown
//!     io_uring_enter(timeout = earliest deadline of a timer heap): idle costs nothing
//! ```
//!
//! - **Receive.** Multishot receives into a provided-buffer ring shared by the worker's connections: an
//!   idle connection holds no receive buffer. Received bytes are copied once from the ring buffer into
//!   the connection's reassembly buffer (at most one partial PDU plus what is being decoded); decoded
//!   PDU data are `Bytes` slices of that buffer, handed to the disk write without another copy.
//! - **Backend I/O.** File-descriptor backends ([`nvmeof_target::BlockBackend::raw_device`]) run on the
//!   ring: reads, writes (FUA as `RWF_DSYNC`), flushes (`fdatasync`), write zeroes and deallocate
//!   (`fallocate`; a device that refuses it falls back to the backend's own implementation). Devices
//!   opened `O_DIRECT` get sector-aligned buffers: reads land in an aligned buffer exposed as `Bytes`
//!   without a copy; write data that is not aligned is copied once into one. Other backends are
//!   called through [`nvmeof_target::BlockBackend::submit`]; those that complete later do so from any
//!   thread through a completion queue and the worker's eventfd.
//! - **Timers.** A heap of engine deadlines (keep-alive, connect timeouts) bounds `io_uring_enter`.
//! - **Limits.** Connections per worker and per peer address; bytes queued for sending per connection
//!   (above the limit the connection's input is not decoded and its receive is cancelled until the
//!   peer reads — a stalled reader cannot make the server buffer without bound); the engine bounds the
//!   data of commands in flight.
//! - **Shutdown.** Stop accepting, close every connection once its responses are sent, wait for
//!   backend I/O in flight, then flush every namespace's backend.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, VecDeque};
use std::io;
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use io_uring::{cqueue, opcode, squeue, types, IoUring, Probe};
use nvmeof_proto::{EncodedPdu, Payload};
use nvmeof_target::{
    execute_blocking, Completer, CompletionSink, Connection, Event, IoError, IoOp, IoOutput, IoRequest,
    IoResult, IoToken, Namespace, Submitted, Target, TransportParams,
};
use parking_lot::Mutex;

use crate::aligned::{is_aligned_ptr, AlignedBuf};

/// How to run the server.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct ServerConfig {
    /// Address to listen on (every worker listens on it with `SO_REUSEPORT`).
    pub listen: SocketAddr,
    /// Worker threads (0: one per available core).
    pub workers: usize,
    /// Port ID reported in discovery log entries.
    pub port_id: u16,
    /// Submission queue entries of each worker's ring.
    pub ring_entries: u32,
    /// Connections a worker accepts at most; more are closed at once.
    pub max_connections_per_worker: usize,
    /// Connections from one peer IP address at most (all workers together); more are closed at once.
    /// A Linux host opens one connection per queue (1 admin + one I/O queue per CPU) for every
    /// volume it attaches, so this is a guard against one peer taking every slot, not a tight limit.
    pub max_connections_per_peer: usize,
    /// Bytes of responses queued for sending on one connection above which its input is no longer
    /// decoded (and its receive is cancelled) until the peer reads.
    pub max_send_queue_bytes: usize,
    /// Size of each receive buffer, in bytes. Receive buffers are shared by all of a worker's
    /// connections (an io_uring provided-buffer ring): an idle connection holds none.
    pub recv_buffer_bytes: usize,
    /// Receive buffers per worker (rounded up to a power of two, at most 32768).
    pub recv_buffers: u16,
}

impl ServerConfig {
    /// Defaults: one worker per core, 1024-entry rings, 65536 connections per worker, 16384 per peer
    /// address, 4 MiB of queued responses per connection, 256 receive buffers of 64 KiB per worker.
    #[must_use]
    pub fn new(listen: SocketAddr) -> Self {
        Self {
            listen,
            workers: 0,
            port_id: 1,
            ring_entries: 1024,
            max_connections_per_worker: 65536,
            max_connections_per_peer: 16384,
            max_send_queue_bytes: 4 << 20,
            recv_buffer_bytes: 64 * 1024,
            recv_buffers: 256,
        }
    }
}

/// A running server. Dropping it does not stop it: call [`Server::shutdown`].
#[derive(Debug)]
pub struct Server {
    local_addr: SocketAddr,
    target: Target,
    stop: Arc<AtomicBool>,
    mailboxes: Vec<Arc<Mailbox>>,
    workers: Vec<JoinHandle<io::Result<()>>>,
}

impl Server {
    /// Probes io_uring, binds the listeners and starts the workers. Fails with a clear error when
    /// io_uring is not available (old kernel, seccomp) or an opcode the server needs is missing.
    pub fn start(target: Target, config: ServerConfig) -> io::Result<Server> {
        let workers = match config.workers {
            0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
            n => n,
        };
        probe()?;
        let mut listeners = Vec::with_capacity(workers);
        let mut addr = config.listen;
        for _ in 0..workers {
            let l = reuseport_listener(addr)?;
            // With port 0 the first bind picks the port; the others join it.
            addr = l.local_addr()?;
            listeners.push(l);
        }
        let stop = Arc::new(AtomicBool::new(false));
        let peers = Arc::new(Mutex::new(HashMap::new()));
        let mut mailboxes = Vec::new();
        let mut handles = Vec::new();
        for (i, listener) in listeners.into_iter().enumerate() {
            let mailbox = Arc::new(Mailbox::new()?);
            mailboxes.push(mailbox.clone());
            let (target, config, stop, peers) = (target.clone(), config.clone(), stop.clone(), peers.clone());
            let handle = std::thread::Builder::new().name(format!("xatastor-w{i}")).spawn(move || {
                let mut w = Worker::new(target, config, listener, mailbox, stop, peers)?;
                w.run()
            })?;
            handles.push(handle);
        }
        tracing::info!(%addr, workers, "NVMe/TCP server listening");
        Ok(Server { local_addr: addr, target, stop, mailboxes, workers: handles })
    }

    /// Counters of each worker, in worker order.
    #[must_use]
    pub fn worker_stats(&self) -> Vec<WorkerStats> {
        self.mailboxes
            .iter()
            .map(|m| WorkerStats {
                connections: m.stats.connections.load(Ordering::Relaxed),
                connections_held: m.stats.held.load(Ordering::Relaxed),
                accepted: m.stats.accepted.load(Ordering::Relaxed),
                refused: m.stats.refused.load(Ordering::Relaxed),
            })
            .collect()
    }

    /// The address the server listens on (with the port the system chose for port 0).
    #[must_use]
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Stops accepting, closes every connection once its pending responses are sent, waits for the
    /// backend I/O in flight and the workers, then flushes every namespace's backend (so writes that
    /// were acknowledged without FUA are durable too). Returns the first error (a worker's, or a
    /// flush that failed).
    pub fn shutdown(self) -> io::Result<()> {
        self.stop.store(true, Ordering::Release);
        for m in &self.mailboxes {
            m.signal();
        }
        let mut first: io::Result<()> = Ok(());
        for w in self.workers {
            let r = w.join().map_err(|_| io::Error::other("a worker thread panicked")).and_then(|r| r);
            if first.is_ok() {
                first = r;
            }
        }
        for nqn in self.target.subsystem_nqns() {
            let Some(subsystem) = self.target.subsystem(&nqn) else { continue };
            for ns in subsystem.namespaces().values() {
                if let Err(e) = execute_blocking(ns.backend().as_ref(), IoOp::Flush) {
                    tracing::error!(subsystem = %nqn, nsid = ns.nsid(), error = %e, "flush at shutdown failed");
                    if first.is_ok() {
                        first =
                            Err(io::Error::other(format!("flush of {nqn} nsid {} failed: {e}", ns.nsid())));
                    }
                }
            }
        }
        first
    }
}

/// Checks that io_uring works here and has the opcodes the server uses.
fn probe() -> io::Result<()> {
    let ring = IoUring::new(8).map_err(|e| {
        io::Error::new(e.kind(), format!("io_uring is not available ({e}); a Linux 6.x kernel without seccomp limits on io_uring is required"))
    })?;
    let mut probe = Probe::new();
    ring.submitter().register_probe(&mut probe)?;
    for (code, name) in [
        (opcode::AcceptMulti::CODE, "accept"),
        (opcode::RecvMulti::CODE, "recv"),
        (opcode::Writev::CODE, "writev"),
        (opcode::Read::CODE, "read"),
        (opcode::Fsync::CODE, "fsync"),
        (opcode::Fallocate::CODE, "fallocate"),
        (opcode::AsyncCancel::CODE, "async cancel"),
    ] {
        if !probe.is_supported(code) {
            return Err(io::Error::new(
                io::ErrorKind::Unsupported,
                format!("io_uring lacks the {name} opcode (a Linux 6.x kernel is required)"),
            ));
        }
    }
    Ok(())
}

fn reuseport_listener(addr: SocketAddr) -> io::Result<TcpListener> {
    let socket = socket2::Socket::new(socket2::Domain::for_address(addr), socket2::Type::STREAM, None)?;
    socket.set_reuse_address(true)?;
    socket.set_reuse_port(true)?;
    socket.bind(&addr.into())?;
    socket.listen(1024)?;
    Ok(socket.into())
}

/// What other threads hand a worker: engine wake-ups and backend completions, announced through
/// the worker's eventfd (which its ring always has a read armed on).
#[derive(Debug)]
struct Mailbox {
    eventfd: OwnedFd,
    /// Connections (slot, generation) whose engine asked for `handle_wakeup`.
    woken: Mutex<Vec<(usize, u32)>>,
    /// Results of backend requests that completed on another thread.
    completions: Mutex<Vec<(IoToken, IoResult)>>,
    stats: Counters,
}

/// The worker's counters, written by the worker only, read by anyone.
#[derive(Debug, Default)]
struct Counters {
    connections: AtomicUsize,
    held: AtomicUsize,
    accepted: AtomicU64,
    refused: AtomicU64,
}

/// A snapshot of one worker's counters ([`Server::worker_stats`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct WorkerStats {
    /// Open connections (queues) served by this worker.
    pub connections: usize,
    /// Connections whose input is held back because the peer does not read its responses.
    pub connections_held: usize,
    /// Connections accepted since start.
    pub accepted: u64,
    /// Connections closed at once because a limit was reached.
    pub refused: u64,
}

impl Mailbox {
    fn new() -> io::Result<Self> {
        let eventfd = rustix::event::eventfd(0, rustix::event::EventfdFlags::CLOEXEC)?;
        Ok(Self {
            eventfd,
            woken: Mutex::new(Vec::new()),
            completions: Mutex::new(Vec::new()),
            stats: Counters::default(),
        })
    }

    /// Wakes the worker blocked in `io_uring_enter`.
    fn signal(&self) {
        let _ = rustix::io::write(&self.eventfd, &1u64.to_ne_bytes());
    }
}

impl CompletionSink for Mailbox {
    fn complete(&self, token: IoToken, result: IoResult) {
        self.completions.lock().push((token, result));
        self.signal();
    }
}

const KIND_ACCEPT: u64 = 1;
const KIND_RECV: u64 = 2;
const KIND_SEND: u64 = 3;
const KIND_WAKE: u64 = 4;
const KIND_DISK: u64 = 5;

/// A backend operation the worker runs on its ring for a file-descriptor backend.
struct DiskOp {
    slot: usize,
    generation: u32,
    token: IoToken,
    /// Keeps the backend, and so its file descriptor, alive until the operation completes.
    namespace: Arc<Namespace>,
    kind: DiskKind,
}

enum DiskKind {
    /// Reads into `buf` (zeroed first: a short read of a sparse file's tail reads zeros).
    Read {
        buf: ReadBuf,
        offset: u64,
    },
    /// Writes with these iovecs, which point into `_data` (the PDUs' own buffers: no copy) or, for
    /// unaligned data on an `O_DIRECT` device, into `_bounce`.
    Write {
        _data: Option<Payload>,
        _bounce: Option<AlignedBuf>,
        iov: Vec<libc::iovec>,
        len: usize,
        offset: u64,
        fua: bool,
    },
    Flush,
    /// One `fallocate` per range (write zeroes, deallocate); `op` is run by the backend instead if
    /// the device does not support the mode.
    Allocate {
        remaining: usize,
        error: Option<i32>,
        op: IoOp,
    },
}

enum ReadBuf {
    Plain(BytesMut),
    Aligned(AlignedBuf),
}

fn user_data(kind: u64, slot: usize, generation: u32) -> u64 {
    (kind << 56) | ((slot as u64 & 0xff_ffff) << 32) | u64::from(generation)
}

fn split_user_data(ud: u64) -> (u64, usize, u32) {
    (ud >> 56, ((ud >> 32) & 0xff_ffff) as usize, ud as u32)
}

/// Send at most this many PDUs in one `writev`.
const MAX_PDUS_PER_SEND: usize = 64;

/// Iovecs of one `writev` (Linux's `IOV_MAX`); one PDU has at most a few dozen (header, data
/// segments, digest), so a single PDU always fits.
const MAX_IOVECS: usize = 1024;

/// While a connection's input is held back (send queue over the limit), received bytes beyond this
/// make the worker cancel its receive until the peer reads.
const RX_HOLD_BYTES: usize = 256 * 1024;

struct Conn {
    stream: TcpStream,
    peer_ip: IpAddr,
    engine: Connection,
    generation: u32,
    rx: BytesMut,
    recv_inflight: bool,
    /// Received bytes are waiting undecoded in `rx` because the send queue is over its limit.
    input_held: bool,
    /// The receive was cancelled because the peer does not read its responses.
    recv_paused: bool,
    queued: VecDeque<EncodedPdu>,
    /// Bytes in `queued` and `sending` not written yet.
    queued_bytes: usize,
    /// PDUs of the `writev` in flight, and its iovecs (both must stay put until it completes).
    sending: Vec<EncodedPdu>,
    iov: Vec<libc::iovec>,
    /// Bytes of `sending` already written by earlier partial writes.
    sent: usize,
    send_inflight: bool,
    woken: Arc<AtomicBool>,
    /// The deadline this connection has in the worker's timer heap.
    timer: Option<Instant>,
    /// The engine closed the connection: flush, then close the socket.
    closing: bool,
    /// The socket failed or the peer is gone: nothing more is sent.
    dead: bool,
}

struct Worker {
    // Declared first so it is dropped first: the kernel lets go of the buffer ring before its memory
    // (`bufs`, below) is freed.
    ring: IoUring,
    bufs: BufRing,
    target: Target,
    config: ServerConfig,
    listener: TcpListener,
    mailbox: Arc<Mailbox>,
    wake_buf: Box<u64>,
    stop: Arc<AtomicBool>,
    peers: Arc<Mutex<HashMap<IpAddr, usize>>>,
    conns: Vec<Option<Box<Conn>>>,
    free: Vec<usize>,
    next_generation: u32,
    live: usize,
    accepting: bool,
    /// Engine deadlines: (when, slot, generation). Entries whose connection has since moved its
    /// deadline are skipped when they come up.
    timers: BinaryHeap<Reverse<(Instant, usize, u32)>>,
    /// Entries that did not fit the submission queue, submitted as soon as there is room.
    backlog: VecDeque<squeue::Entry>,
    /// Backend operations in flight on the ring; their buffers live here until completion.
    disk_ops: Vec<Option<Box<DiskOp>>>,
    disk_free: Vec<usize>,
    /// Backend requests that will complete through the mailbox: token → (slot, generation).
    pending: HashMap<IoToken, (usize, u32)>,
    cqes: Vec<(u64, i32, u32)>,
    /// Reused list of the engine's I/O requests (no allocation per event batch).
    io_scratch: Vec<IoRequest>,
    /// Namespaces (by address) whose device refused `fallocate`: write zeroes and deallocate go
    /// straight to the backend. A new namespace at a reused address merely takes the backend's
    /// (correct, slower) path for these two operations until the set is cleared.
    no_fallocate: std::collections::HashSet<usize>,
}

impl Worker {
    fn new(
        target: Target,
        config: ServerConfig,
        listener: TcpListener,
        mailbox: Arc<Mailbox>,
        stop: Arc<AtomicBool>,
        peers: Arc<Mutex<HashMap<IpAddr, usize>>>,
    ) -> io::Result<Self> {
        let ring = IoUring::new(config.ring_entries.max(64))?;
        let bufs = BufRing::new(config.recv_buffers, config.recv_buffer_bytes.max(4096))?;
        // SAFETY: the ring memory is page aligned, holds `entries` initialised entries and stays
        // allocated until after `ring` is dropped (field order of `Worker`).
        unsafe {
            ring.submitter().register_buf_ring_with_flags(bufs.ring_addr(), bufs.entries(), BUF_GROUP, 0)?
        };
        Ok(Self {
            ring,
            bufs,
            target,
            config,
            listener,
            mailbox,
            wake_buf: Box::new(0),
            stop,
            peers,
            conns: Vec::new(),
            free: Vec::new(),
            next_generation: 1,
            live: 0,
            accepting: true,
            timers: BinaryHeap::new(),
            backlog: VecDeque::new(),
            disk_ops: Vec::new(),
            disk_free: Vec::new(),
            pending: HashMap::new(),
            cqes: Vec::new(),
            io_scratch: Vec::new(),
            no_fallocate: std::collections::HashSet::new(),
        })
    }

    /// Queues an entry whose buffers stay valid until its completion.
    ///
    /// # Safety
    /// Every buffer the entry points to must stay valid and unmoved until its completion is reaped.
    unsafe fn push(&mut self, entry: squeue::Entry) {
        // SAFETY: the caller guarantees the entry's buffers outlive the operation.
        if unsafe { self.ring.submission().push(&entry) }.is_err() {
            self.backlog.push_back(entry);
        }
    }

    fn flush_backlog(&mut self) {
        while let Some(e) = self.backlog.front() {
            // SAFETY: entries in the backlog were built under the same guarantees as in `push`.
            if unsafe { self.ring.submission().push(e) }.is_err() {
                return;
            }
            self.backlog.pop_front();
        }
    }

    fn arm_accept(&mut self) {
        let e = opcode::AcceptMulti::new(types::Fd(self.listener.as_raw_fd())).build().user_data(user_data(
            KIND_ACCEPT,
            0,
            0,
        ));
        // SAFETY: accept writes no buffer of ours; the listener lives as long as the worker.
        unsafe { self.push(e) };
    }

    fn arm_wake(&mut self) {
        let buf: *mut u64 = &mut *self.wake_buf;
        let e = opcode::Read::new(types::Fd(self.mailbox.eventfd.as_raw_fd()), buf.cast(), 8)
            .build()
            .user_data(user_data(KIND_WAKE, 0, 0));
        // SAFETY: `wake_buf` is a Box owned by the worker, never moved or freed while it runs; the
        // eventfd is owned by the mailbox, which the worker holds.
        unsafe { self.push(e) };
    }

    #[allow(clippy::disallowed_methods)] // the driver owns the clock
    fn run(&mut self) -> io::Result<()> {
        self.arm_accept();
        self.arm_wake();
        loop {
            self.flush_backlog();
            if self.stop.load(Ordering::Acquire) && self.accepting {
                self.begin_shutdown();
            }
            if !self.accepting
                && self.live == 0
                && self.pending.is_empty()
                && self.disk_ops.iter().all(Option::is_none)
            {
                return Ok(());
            }
            let deadline = self.timers.peek().map(|Reverse((t, _, _))| *t);
            let now = Instant::now();
            let result = match deadline.map(|d| d.saturating_duration_since(now)) {
                Some(d) => {
                    let ts = timespec(d);
                    let args = types::SubmitArgs::new().timespec(&ts);
                    self.ring.submitter().submit_with_args(1, &args)
                }
                None => self.ring.submit_and_wait(1),
            };
            match result {
                Ok(_) => {}
                Err(e) if e.raw_os_error() == Some(libc::ETIME) || e.kind() == io::ErrorKind::Interrupted => {
                }
                Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {}
                Err(e) => return Err(e),
            }
            let now = Instant::now();
            let mut cqes = std::mem::take(&mut self.cqes);
            cqes.extend(self.ring.completion().map(|c| (c.user_data(), c.result(), c.flags())));
            for &(ud, res, flags) in &cqes {
                let (kind, slot, generation) = split_user_data(ud);
                match kind {
                    KIND_ACCEPT => self.on_accept(res, flags, now),
                    KIND_RECV => self.on_recv(slot, generation, res, flags, now),
                    KIND_SEND => self.on_send(slot, generation, res, now),
                    KIND_WAKE => self.on_wake(now),
                    KIND_DISK => self.on_disk(slot, res, now),
                    _ => {}
                }
            }
            cqes.clear();
            self.cqes = cqes;
            self.run_timers(now);
        }
    }

    fn run_timers(&mut self, now: Instant) {
        while let Some(&Reverse((t, slot, generation))) = self.timers.peek() {
            if t > now {
                break;
            }
            self.timers.pop();
            let Some(c) = self.conn_mut(slot, generation) else { continue };
            if c.timer != Some(t) {
                continue; // moved since; its current deadline has its own entry
            }
            c.timer = None;
            c.engine.handle_timeout(now);
            self.after_engine(slot, now);
        }
        // Deadlines that keep moving (keep-alive on a busy admin queue) leave stale entries behind;
        // rebuild the heap when they outnumber the live ones.
        if self.timers.len() > 4 * self.live + 64 {
            self.timers = self
                .conns
                .iter()
                .enumerate()
                .filter_map(|(slot, c)| {
                    let c = c.as_ref()?;
                    Some(Reverse((c.timer?, slot, c.generation)))
                })
                .collect();
        }
    }

    fn on_accept(&mut self, res: i32, flags: u32, now: Instant) {
        if !cqueue::more(flags) && self.accepting {
            self.arm_accept();
        }
        if res < 0 {
            if res != -libc::ECANCELED || self.accepting {
                tracing::warn!(error = %io::Error::from_raw_os_error(-res), "accept failed");
            }
            return;
        }
        // SAFETY: a successful accept completion carries a new file descriptor that nothing else owns.
        let stream = TcpStream::from(unsafe { OwnedFd::from_raw_fd(res) });
        if !self.accepting {
            return;
        }
        let (Ok(local), Ok(peer)) = (stream.local_addr(), stream.peer_addr()) else { return };
        if self.live >= self.config.max_connections_per_worker {
            tracing::warn!(%peer, limit = self.config.max_connections_per_worker, "connection limit of the worker reached: closing a new connection");
            self.mailbox.stats.refused.fetch_add(1, Ordering::Relaxed);
            return;
        }
        let peer_ip = peer.ip().to_canonical();
        {
            let mut peers = self.peers.lock();
            let n = peers.entry(peer_ip).or_insert(0);
            if *n >= self.config.max_connections_per_peer {
                tracing::warn!(%peer, limit = self.config.max_connections_per_peer, "connection limit of the peer address reached: closing a new connection");
                self.mailbox.stats.refused.fetch_add(1, Ordering::Relaxed);
                return;
            }
            *n += 1;
        }
        let _ = stream.set_nodelay(true);
        let params = TransportParams { local_addr: local, peer_addr: peer, port_id: self.config.port_id };
        let mut engine = self.target.accept(params, now);
        let slot = self.free.pop().unwrap_or_else(|| {
            self.conns.push(None);
            self.conns.len() - 1
        });
        let generation = self.next_generation;
        self.next_generation = self.next_generation.wrapping_add(1).max(1);
        let woken = Arc::new(AtomicBool::new(false));
        let (flag, mailbox) = (woken.clone(), self.mailbox.clone());
        engine.set_notifier(Arc::new(move || {
            if !flag.swap(true, Ordering::AcqRel) {
                mailbox.woken.lock().push((slot, generation));
                mailbox.signal();
            }
        }));
        let conn = Box::new(Conn {
            stream,
            peer_ip,
            engine,
            generation,
            rx: BytesMut::new(),
            recv_inflight: false,
            input_held: false,
            recv_paused: false,
            queued: VecDeque::new(),
            queued_bytes: 0,
            sending: Vec::new(),
            iov: Vec::new(),
            sent: 0,
            send_inflight: false,
            woken,
            timer: None,
            closing: false,
            dead: false,
        });
        if let Some(c) = self.conns.get_mut(slot) {
            *c = Some(conn);
        }
        self.live += 1;
        self.mailbox.stats.connections.store(self.live, Ordering::Relaxed);
        self.mailbox.stats.accepted.fetch_add(1, Ordering::Relaxed);
        self.arm_recv(slot);
        self.after_engine(slot, now); // arms the connect timeout
    }

    fn arm_recv(&mut self, slot: usize) {
        let Some(c) = self.conns.get_mut(slot).and_then(|c| c.as_mut()) else { return };
        if c.recv_inflight || c.recv_paused || c.closing || c.dead {
            return;
        }
        c.recv_inflight = true;
        let e = opcode::RecvMulti::new(types::Fd(c.stream.as_raw_fd()), BUF_GROUP)
            .build()
            .user_data(user_data(KIND_RECV, slot, c.generation));
        // SAFETY: the receive writes into buffers of the provided-buffer ring, which the worker owns
        // for as long as its io_uring exists.
        unsafe { self.push(e) };
    }

    fn conn_mut(&mut self, slot: usize, generation: u32) -> Option<&mut Conn> {
        self.conns.get_mut(slot)?.as_deref_mut().filter(|c| c.generation == generation)
    }

    /// Decodes received input, one PDU at a time, while the connection's send queue is under its
    /// limit: a burst of small read commands cannot turn into an unbounded pile of responses. Input
    /// left over stays in `rx` (held) until the peer reads.
    fn feed(&mut self, slot: usize, now: Instant) {
        let limit = self.config.max_send_queue_bytes;
        loop {
            let Some(c) = self.conns.get_mut(slot).and_then(|c| c.as_deref_mut()) else { return };
            if c.closing || c.rx.is_empty() {
                return;
            }
            if c.queued_bytes > limit {
                if !c.input_held {
                    c.input_held = true;
                    self.mailbox.stats.held.fetch_add(1, Ordering::Relaxed);
                }
                return;
            }
            if c.input_held {
                c.input_held = false;
                self.mailbox.stats.held.fetch_sub(1, Ordering::Relaxed);
            }
            // PLEN of the PDU at the front (the decoder checks it; here it only splits the input).
            let plen = c.rx.get(4..8).and_then(|b| b.try_into().ok()).map(|b| u32::from_le_bytes(b) as usize);
            match plen {
                Some(n) if n >= 8 && n < c.rx.len() => {
                    let mut pdu = c.rx.split_to(n);
                    c.engine.handle_input(&mut pdu, now);
                }
                _ => {
                    // The last PDU, or a partial one (the decoder keeps what it needs in `rx`).
                    let mut rx = std::mem::take(&mut c.rx);
                    c.engine.handle_input(&mut rx, now);
                    c.rx = rx;
                    self.drain_events(slot, now);
                    return;
                }
            }
            self.drain_events(slot, now);
        }
    }

    fn on_recv(&mut self, slot: usize, generation: u32, res: i32, flags: u32, now: Instant) {
        let bid = cqueue::buffer_select(flags);
        let more = cqueue::more(flags);
        let Some(c) =
            self.conns.get_mut(slot).and_then(|c| c.as_deref_mut()).filter(|c| c.generation == generation)
        else {
            if let Some(bid) = bid {
                self.bufs.recycle(bid);
            }
            return;
        };
        if !more {
            c.recv_inflight = false;
        }
        if res == -libc::ENOBUFS || res == -libc::ECANCELED {
            // ENOBUFS: every buffer was taken between two reaps; they are back now: receive again
            // (unless paused). ECANCELED: paused below because the peer does not read.
        } else if res <= 0 {
            c.dead = res < 0;
            c.engine.handle_peer_closed();
        } else if let Some(bid) = bid {
            c.rx.extend_from_slice(self.bufs.get(bid, res as usize));
            self.bufs.recycle(bid);
            self.feed(slot, now);
            if let Some(c) = self.conn_mut(slot, generation) {
                if c.input_held && c.rx.len() > RX_HOLD_BYTES && c.recv_inflight && !c.recv_paused {
                    // Input keeps piling up while the peer does not read: stop receiving.
                    c.recv_paused = true;
                    let e =
                        opcode::AsyncCancel::new(user_data(KIND_RECV, slot, generation)).build().user_data(0);
                    // SAFETY: cancelling touches no buffer.
                    unsafe { self.push(e) };
                }
            }
        }
        self.after_engine(slot, now);
        self.arm_recv(slot);
    }

    fn on_send(&mut self, slot: usize, generation: u32, res: i32, now: Instant) {
        let Some(c) = self.conn_mut(slot, generation) else { return };
        c.send_inflight = false;
        if res < 0 {
            c.dead = true;
            c.sending.clear();
            c.queued.clear();
            c.queued_bytes = 0;
            c.engine.handle_peer_closed();
        } else {
            c.sent += res as usize;
            let total: usize = c.sending.iter().map(EncodedPdu::len).sum();
            if c.sent >= total {
                c.sending.clear();
                c.sent = 0;
                c.queued_bytes = c.queued_bytes.saturating_sub(total);
            }
        }
        // Input held back because of a full send queue: decode it now, and receive again.
        let held = c.input_held;
        if held {
            self.feed(slot, now);
        }
        let resume = self.conn_mut(slot, generation).is_some_and(|c| {
            let go = c.recv_paused && !c.input_held;
            if go {
                c.recv_paused = false;
            }
            go
        });
        self.after_engine(slot, now);
        if resume {
            self.arm_recv(slot);
        }
    }

    fn on_wake(&mut self, now: Instant) {
        self.arm_wake();
        let woken = std::mem::take(&mut *self.mailbox.woken.lock());
        for (slot, generation) in woken {
            let Some(c) = self.conn_mut(slot, generation) else { continue };
            c.woken.store(false, Ordering::Release);
            c.engine.handle_wakeup(now);
            self.after_engine(slot, now);
        }
        let done = std::mem::take(&mut *self.mailbox.completions.lock());
        for (token, result) in done {
            let Some((slot, generation)) = self.pending.remove(&token) else { continue };
            if let Some(c) = self.conn_mut(slot, generation) {
                c.engine.complete_io(token, result, now);
                self.after_engine(slot, now);
            }
        }
    }

    /// Carries out the engine's events, keeps the connection's timer current, starts a send if none
    /// is in flight, and frees the connection once it is closed and quiet.
    fn after_engine(&mut self, slot: usize, now: Instant) {
        self.drain_events(slot, now);
        if let Some(c) = self.conns.get_mut(slot).and_then(|c| c.as_mut()) {
            let t = c.engine.poll_timeout();
            if t != c.timer {
                c.timer = t;
                if let Some(t) = t {
                    self.timers.push(Reverse((t, slot, c.generation)));
                }
            }
        }
        self.start_send(slot);
        self.maybe_free(slot);
    }

    /// Takes the engine's events: queues transmits, starts backend I/O (whose immediate completions
    /// may produce more events).
    fn drain_events(&mut self, slot: usize, now: Instant) {
        loop {
            let Some(c) = self.conns.get_mut(slot).and_then(|c| c.as_mut()) else { return };
            let generation = c.generation;
            let mut ios = std::mem::take(&mut self.io_scratch);
            while let Some(ev) = c.engine.poll_event() {
                match ev {
                    Event::Transmit(pdu) => {
                        if !c.dead {
                            c.queued_bytes += pdu.len();
                            c.queued.push_back(pdu);
                        }
                    }
                    Event::Io(req) => ios.push(req),
                    Event::Close(reason) => {
                        tracing::debug!(?reason, "connection closed");
                        c.closing = true;
                    }
                }
            }
            if ios.is_empty() {
                self.io_scratch = ios;
                return;
            }
            for req in ios.drain(..) {
                self.start_io(slot, generation, req, now);
            }
            self.io_scratch = ios;
        }
    }

    /// Runs a backend request: on the ring for file-descriptor backends, otherwise through the
    /// backend itself.
    fn start_io(&mut self, slot: usize, generation: u32, req: IoRequest, now: Instant) {
        let IoRequest { token, namespace, op } = req;
        let Some((fd, base, align)) = namespace.backend().raw_device().map(|d| {
            let align = if d.direct { (d.alignment.max(1) as usize).next_power_of_two() } else { 1 };
            (d.fd.as_raw_fd(), d.base_offset, align)
        }) else {
            return self.submit_to_backend(slot, generation, token, namespace, op, now);
        };
        let aligned = |offset: u64, len: u64| offset % align as u64 == 0 && len % align as u64 == 0;
        let (kind, entries): (DiskKind, usize) = match op {
            IoOp::Read { offset, len } if aligned(offset, u64::from(len)) => {
                let buf = if align > 1 {
                    match AlignedBuf::zeroed(len as usize, align) {
                        Some(b) => ReadBuf::Aligned(b),
                        None => {
                            return self.fail_io(slot, generation, token, "aligned buffer too large", now)
                        }
                    }
                } else {
                    ReadBuf::Plain(BytesMut::zeroed(len as usize))
                };
                (DiskKind::Read { buf, offset }, 1)
            }
            IoOp::Write { offset, data, fua } if aligned(offset, data.len() as u64) => {
                let len = data.len();
                let in_place =
                    data.segments().iter().all(|s| is_aligned_ptr(s.as_ptr(), align) && s.len() % align == 0);
                let kind = if in_place {
                    let iov = data
                        .segments()
                        .iter()
                        .map(|s| libc::iovec { iov_base: s.as_ptr() as *mut libc::c_void, iov_len: s.len() })
                        .collect();
                    DiskKind::Write { _data: Some(data), _bounce: None, iov, len, offset, fua }
                } else {
                    let Some(mut b) = AlignedBuf::zeroed(len, align) else {
                        return self.fail_io(slot, generation, token, "aligned buffer too large", now);
                    };
                    let mut at = 0;
                    for seg in data.segments() {
                        if let Some(dst) = b.as_mut_slice().get_mut(at..at + seg.len()) {
                            dst.copy_from_slice(seg);
                        }
                        at += seg.len();
                    }
                    let iov =
                        vec![libc::iovec { iov_base: b.as_mut_slice().as_mut_ptr().cast(), iov_len: len }];
                    DiskKind::Write { _data: None, _bounce: Some(b), iov, len, offset, fua }
                };
                (kind, 1)
            }
            IoOp::Flush => (DiskKind::Flush, 1),
            op @ (IoOp::WriteZeroes { .. } | IoOp::Discard { .. }) => {
                let n = match &op {
                    IoOp::Discard { ranges } => ranges.len(),
                    _ => 1,
                };
                let refused = self.no_fallocate.contains(&(Arc::as_ptr(&namespace) as usize));
                if n == 0 || refused {
                    return self.submit_to_backend(slot, generation, token, namespace, op, now);
                }
                (DiskKind::Allocate { remaining: n, error: None, op }, n)
            }
            // Not aligned for this O_DIRECT device: the backend handles it (with its own buffers).
            op => return self.submit_to_backend(slot, generation, token, namespace, op, now),
        };
        let index = self.disk_free.pop().unwrap_or_else(|| {
            self.disk_ops.push(None);
            self.disk_ops.len() - 1
        });
        let mut op = Box::new(DiskOp { slot, generation, token, namespace, kind });
        let ud = user_data(KIND_DISK, index, 0);
        let fd = types::Fd(fd);
        let mut sqes: Vec<squeue::Entry> = Vec::with_capacity(entries);
        match &mut op.kind {
            DiskKind::Read { buf, offset } => {
                let (ptr, len) = match buf {
                    ReadBuf::Plain(b) => (b.as_mut_ptr(), b.len()),
                    ReadBuf::Aligned(b) => (b.as_mut_slice().as_mut_ptr(), b.len()),
                };
                sqes.push(opcode::Read::new(fd, ptr, len as u32).offset(base + *offset).build());
            }
            DiskKind::Write { iov, offset, fua, .. } => {
                sqes.push(
                    opcode::Writev::new(fd, iov.as_ptr(), iov.len() as u32)
                        .offset(base + *offset)
                        .rw_flags(if *fua { libc::RWF_DSYNC } else { 0 })
                        .build(),
                );
            }
            DiskKind::Flush => {
                sqes.push(opcode::Fsync::new(fd).flags(types::FsyncFlags::DATASYNC).build());
            }
            DiskKind::Allocate { op: IoOp::WriteZeroes { offset, len, deallocate }, .. } => {
                let mode = if *deallocate {
                    libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE
                } else {
                    libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE
                };
                sqes.push(opcode::Fallocate::new(fd, *len).offset(base + *offset).mode(mode).build());
            }
            DiskKind::Allocate { op: IoOp::Discard { ranges }, .. } => {
                let mode = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
                for r in ranges.iter() {
                    sqes.push(opcode::Fallocate::new(fd, r.len).offset(base + r.offset).mode(mode).build());
                }
            }
            DiskKind::Allocate { .. } => {}
        }
        if let Some(s) = self.disk_ops.get_mut(index) {
            *s = Some(op);
        }
        for e in sqes {
            // SAFETY: the operation's buffers (the read buffer, the write iovecs and the payload or
            // bounce buffer they point to) live in the boxed `DiskOp` stored in `disk_ops` until its
            // last completion is reaped, and the namespace it holds keeps the backend's fd open.
            unsafe { self.push(e.user_data(ud)) };
        }
    }

    /// Hands a request to the backend's own `submit`: immediate backends answer at once, others
    /// complete later from any thread through the mailbox.
    fn submit_to_backend(
        &mut self,
        slot: usize,
        generation: u32,
        token: IoToken,
        namespace: Arc<Namespace>,
        op: IoOp,
        now: Instant,
    ) {
        let completer = Completer::new(token, self.mailbox.clone());
        match namespace.backend().submit(op, completer) {
            Submitted::Done(result) => {
                if let Some(c) = self.conn_mut(slot, generation) {
                    c.engine.complete_io(token, result, now);
                }
            }
            Submitted::Pending => {
                self.pending.insert(token, (slot, generation));
            }
        }
    }

    fn fail_io(&mut self, slot: usize, generation: u32, token: IoToken, why: &str, now: Instant) {
        if let Some(c) = self.conn_mut(slot, generation) {
            c.engine.complete_io(
                token,
                Err(IoError::Io(io::Error::new(io::ErrorKind::OutOfMemory, why))),
                now,
            );
        }
    }

    fn on_disk(&mut self, index: usize, res: i32, now: Instant) {
        let Some(op) = self.disk_ops.get_mut(index).and_then(Option::as_mut) else { return };
        if let DiskKind::Allocate { remaining, error, .. } = &mut op.kind {
            *remaining = remaining.saturating_sub(1);
            if res < 0 && error.is_none() {
                *error = Some(-res);
            }
            if *remaining > 0 {
                return;
            }
        }
        let Some(op) = self.disk_ops.get_mut(index).and_then(Option::take) else { return };
        self.disk_free.push(index);
        let DiskOp { slot, generation, token, namespace, kind } = *op;
        let result: IoResult = match kind {
            DiskKind::Allocate { error: Some(e), op, .. } if e == libc::EOPNOTSUPP => {
                // The file system or device has no such fallocate mode (zvols): the backend does it
                // its way (writing zeros, an ioctl discard) — from now on without trying first.
                if self.no_fallocate.len() > 4096 {
                    self.no_fallocate.clear(); // bounded; entries of unloaded namespaces go too
                }
                self.no_fallocate.insert(Arc::as_ptr(&namespace) as usize);
                self.submit_to_backend(slot, generation, token, namespace, op, now);
                self.after_engine(slot, now);
                return;
            }
            DiskKind::Allocate { error: Some(e), .. } => Err(IoError::Io(io::Error::from_raw_os_error(e))),
            _ if res < 0 => Err(IoError::Io(io::Error::from_raw_os_error(-res))),
            DiskKind::Read { buf: ReadBuf::Plain(b), .. } => Ok(IoOutput::Data(b.freeze().into())),
            DiskKind::Read { buf: ReadBuf::Aligned(b), .. } => {
                Ok(IoOutput::Data(Bytes::from_owner(b).into()))
            }
            DiskKind::Write { len, .. } if (res as usize) < len => {
                Err(IoError::Io(io::Error::new(io::ErrorKind::WriteZero, "short write")))
            }
            DiskKind::Write { .. } | DiskKind::Flush | DiskKind::Allocate { .. } => Ok(IoOutput::Done),
        };
        if let Some(c) = self.conn_mut(slot, generation) {
            c.engine.complete_io(token, result, now);
        }
        self.after_engine(slot, now);
    }

    fn start_send(&mut self, slot: usize) {
        let Some(c) = self.conns.get_mut(slot).and_then(|c| c.as_mut()) else { return };
        if c.send_inflight || c.dead {
            return;
        }
        if c.sending.is_empty() {
            // As many PDUs as fit one writev (IOV_MAX iovecs); read data may be many segments.
            let mut iovecs = 0;
            while let Some(p) = c.queued.front() {
                let n = p.chunks().count();
                if c.sending.len() >= MAX_PDUS_PER_SEND || (iovecs + n > MAX_IOVECS && !c.sending.is_empty())
                {
                    break;
                }
                iovecs += n;
                if let Some(p) = c.queued.pop_front() {
                    c.sending.push(p);
                }
            }
            c.sent = 0;
        }
        if c.sending.is_empty() {
            return;
        }
        // Build the iovecs for what is left after partial writes.
        c.iov.clear();
        let mut skip = c.sent;
        for pdu in &c.sending {
            for chunk in pdu.chunks() {
                if skip >= chunk.len() {
                    skip -= chunk.len();
                    continue;
                }
                let rest = chunk.get(skip..).unwrap_or_default();
                skip = 0;
                c.iov.push(libc::iovec { iov_base: rest.as_ptr() as *mut libc::c_void, iov_len: rest.len() });
            }
        }
        c.send_inflight = true;
        let e = opcode::Writev::new(types::Fd(c.stream.as_raw_fd()), c.iov.as_ptr(), c.iov.len() as u32)
            .build()
            .user_data(user_data(KIND_SEND, slot, c.generation));
        // SAFETY: the iovecs and the bytes they point to (`sending`, reference-counted `Bytes` that
        // nothing frees while they are held here) stay untouched until this write completes
        // (`send_inflight`), and the connection is not freed before then.
        unsafe { self.push(e) };
    }

    fn maybe_free(&mut self, slot: usize) {
        let Some(c) = self.conns.get_mut(slot).and_then(|c| c.as_mut()) else { return };
        if !c.closing {
            return;
        }
        let flushed = c.dead || (!c.send_inflight && c.sending.is_empty() && c.queued.is_empty());
        if flushed && c.recv_inflight {
            // Ends the receive still in flight (it completes with 0), after which we come back here.
            let _ = c.stream.shutdown(std::net::Shutdown::Both);
            c.dead = true;
            return;
        }
        if flushed && !c.recv_inflight && !c.send_inflight && c.engine.is_drained() {
            let peer_ip = c.peer_ip;
            if c.input_held {
                self.mailbox.stats.held.fetch_sub(1, Ordering::Relaxed);
            }
            if let Some(s) = self.conns.get_mut(slot) {
                *s = None;
            }
            self.free.push(slot);
            self.live -= 1;
            self.mailbox.stats.connections.store(self.live, Ordering::Relaxed);
            let mut peers = self.peers.lock();
            if let Some(n) = peers.get_mut(&peer_ip) {
                *n = n.saturating_sub(1);
                if *n == 0 {
                    peers.remove(&peer_ip);
                }
            }
        }
    }

    /// Stops accepting and closes every connection (the engine tears down their controllers; hosts
    /// reconnect to the next server).
    #[allow(clippy::disallowed_methods)] // the driver owns the clock
    fn begin_shutdown(&mut self) {
        self.accepting = false;
        let e = opcode::AsyncCancel::new(user_data(KIND_ACCEPT, 0, 0)).build().user_data(0);
        // SAFETY: cancelling touches no buffer.
        unsafe { self.push(e) };
        let now = Instant::now();
        for slot in 0..self.conns.len() {
            if let Some(c) = self.conns.get_mut(slot).and_then(|c| c.as_mut()) {
                c.engine.handle_peer_closed();
            }
            self.after_engine(slot, now);
        }
    }
}

/// The buffer group of the receive buffers.
const BUF_GROUP: u16 = 0;

/// An io_uring provided-buffer ring: `entries` receive buffers of `size` bytes, shared by all the
/// connections of a worker. The kernel picks a buffer for each received chunk; the worker copies the
/// bytes out (into the connection's reassembly buffer) and hands the buffer back at once.
struct BufRing {
    ring: std::ptr::NonNull<io_uring::types::BufRingEntry>,
    layout: std::alloc::Layout,
    buffers: Box<[u8]>,
    size: usize,
    entries: u16,
    tail: u16,
}

impl BufRing {
    fn new(count: u16, size: usize) -> io::Result<Self> {
        let entries = count.clamp(1, 32768).next_power_of_two();
        let bytes = usize::from(entries) * std::mem::size_of::<io_uring::types::BufRingEntry>();
        let layout = std::alloc::Layout::from_size_align(bytes.max(4096), 4096).map_err(io::Error::other)?;
        // SAFETY: the layout has a non-zero size.
        let raw = unsafe { std::alloc::alloc_zeroed(layout) };
        let ring = std::ptr::NonNull::new(raw.cast::<io_uring::types::BufRingEntry>())
            .ok_or_else(|| io::Error::new(io::ErrorKind::OutOfMemory, "cannot allocate the buffer ring"))?;
        let buffers = vec![0u8; usize::from(entries) * size].into_boxed_slice();
        let mut r = Self { ring, layout, buffers, size, entries, tail: 0 };
        for bid in 0..entries {
            r.put(bid);
        }
        r.publish();
        Ok(r)
    }

    fn ring_addr(&self) -> u64 {
        self.ring.as_ptr() as u64
    }

    fn entries(&self) -> u16 {
        self.entries
    }

    /// Writes buffer `bid` into the next free ring entry (made visible by [`BufRing::publish`]).
    fn put(&mut self, bid: u16) {
        let index = usize::from(self.tail & (self.entries - 1));
        // SAFETY: `index` < `entries`, the number of entries allocated; the kernel only reads entries
        // between its head and the published tail, and this one is past the published tail.
        let entry = unsafe { &mut *self.ring.as_ptr().add(index) };
        let addr = self.buffers.as_ptr() as u64 + u64::from(bid) * self.size as u64;
        entry.set_addr(addr);
        entry.set_len(self.size as u32);
        entry.set_bid(bid);
        self.tail = self.tail.wrapping_add(1);
    }

    /// Makes the entries written so far visible to the kernel.
    fn publish(&self) {
        // SAFETY: the ring's first entry exists and is initialised; its `resv` field is the ring's
        // tail, which the kernel reads with acquire semantics.
        let tail = unsafe { io_uring::types::BufRingEntry::tail(self.ring.as_ptr()) };
        // SAFETY: the tail is a properly aligned u16 inside the ring's allocation; we are its only
        // writer, and an atomic view of it orders the entry writes before the tail update.
        unsafe { (*(tail as *const std::sync::atomic::AtomicU16)).store(self.tail, Ordering::Release) };
    }

    /// The first `len` bytes of buffer `bid`.
    fn get(&self, bid: u16, len: usize) -> &[u8] {
        let start = usize::from(bid) * self.size;
        self.buffers.get(start..start + len.min(self.size)).unwrap_or_default()
    }

    /// Gives buffer `bid` back to the kernel.
    fn recycle(&mut self, bid: u16) {
        if bid < self.entries {
            self.put(bid);
            self.publish();
        }
    }
}

impl Drop for BufRing {
    fn drop(&mut self) {
        // SAFETY: allocated in `new` with this layout; the io_uring that used it was dropped first.
        unsafe { std::alloc::dealloc(self.ring.as_ptr().cast(), self.layout) };
    }
}

fn timespec(d: Duration) -> types::Timespec {
    types::Timespec::new().sec(d.as_secs()).nsec(d.subsec_nanos())
}
