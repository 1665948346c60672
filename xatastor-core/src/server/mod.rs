//! The thread-per-core io_uring NVMe/TCP server.
//!
//! ```text
//!  Server::start ── checks the port is free ── one SO_REUSEPORT listener per worker ── N workers
//!
//!  worker (one thread, one io_uring, no locks on the I/O path):
//!     AcceptMulti(listener) ─▶ new Conn { engine Connection, receive state, send queue }
//!     RecvMulti(conn)       ─▶ bytes in a provided buffer (worker-wide pool) ─▶ handle_input ─▶ events
//!     Recv(conn, placed)    ─▶ direct mode: a PDU whose data lands aligned for an O_DIRECT device
//!     Writev(conn)          ◀─ Event::Transmit (header + payload Bytes, no copy), one per turn
//!     Read/Write(v)/Fsync/  ◀─ Event::Io for file, block-device and zvol volumes (O_DIRECT with
//!       Fallocate/UringCmd     aligned buffers), the PDUs' own buffers as write data
//!     Read(eventfd)         ◀─ engine notifiers (AEN, teardown), async backend completions, shutdown
//!     io_uring_enter        spin for a short poll window after a hot connection's input, else
//!                           block until a completion or the earliest timer: idle costs nothing
//! ```
//!
//! - **Receive.** Multishot receives into a provided-buffer ring shared by the worker's connections:
//!   an idle connection holds no receive buffer. Received bytes are copied once from the ring buffer
//!   into the connection's reassembly buffer; decoded PDU data are `Bytes` slices of that buffer,
//!   handed to the backend without another copy. I/O queues of `O_DIRECT` volumes receive each PDU
//!   into memory placed so that its data is aligned for the device (see the `conn` module): a zvol
//!   write reaches the device with no copy in user space.
//! - **Backend I/O.** File-descriptor backends ([`nvmeof_target::BlockBackend::raw_device`]) run on the
//!   ring: reads, writes (FUA as `RWF_DSYNC`), flushes (`fdatasync`), write zeroes and deallocate
//!   (`fallocate`, where the device declares the mode), a zvol's deallocation (the block-device
//!   discard command over whole blocks, zero writes over partial ones; Linux 6.12+). What the ring
//!   cannot do — zeroing on a device that refuses `fallocate`, deallocation on a kernel without the
//!   discard command, requests an `O_DIRECT` device cannot take as they are — runs on the blocking pool ([`ServerConfig::blocking_threads`]) and completes through
//!   the worker's mailbox: no request of one volume makes a worker wait. Lazy activation of a volume
//!   (catalog read, device open) runs there as well, while its Connect waits
//!   ([`nvmeof_target::Target::set_activation_runner`]). Other backends are called through
//!   [`nvmeof_target::BlockBackend::submit`]; those that complete later do so from any thread through
//!   a completion queue and the worker's eventfd.
//! - **Operations in flight** live in slabs keyed by the full 64-bit `user_data` of their ring
//!   entries (kind, generation, slot), never freed before their last completion.
//! - **Timers.** A heap of engine deadlines (keep-alive, connect timeouts) bounds `io_uring_enter`.
//! - **Limits.** Connections per worker and per peer address; bytes queued for sending per connection
//!   (above the limit the connection's input is not decoded and its receive is cancelled until the
//!   peer reads — a stalled reader cannot make the server buffer without bound); the engine bounds the
//!   data of commands in flight.
//! - **The port.** Only the workers of one server share the listening port: a port another process
//!   listens on (even with `SO_REUSEPORT`) is an error at start, not a split of its connections.
//! - **Shutdown.** Stop accepting, close every connection once its responses are sent, wait for
//!   backend I/O in flight, then flush every namespace's backend.

mod blocking;
mod bufring;
mod conn;
mod disk;
mod pool;
mod slab;
mod worker;

use std::collections::HashMap;
use std::io;
use std::net::{SocketAddr, TcpListener};
use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use io_uring::{opcode, IoUring, Probe};
use nvmeof_target::{execute_blocking, CompletionSink, IoOp, IoResult, IoToken, Target};
use parking_lot::Mutex;

use blocking::BlockingPool;
use worker::Worker;

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
    /// How long a worker polls its ring before blocking after input on a *hot* connection (one whose
    /// requests follow each other within four windows): a busy host's next request is then served
    /// without a wake-up. A worker woken within four windows after it gave up polling polls twice
    /// as long the next time, up to four windows; a longer sleep resets it to this value. Zero turns
    /// polling off. Idle workers and sparse traffic (keep-alives) never poll.
    pub poll_window: Duration,
    /// Threads that run the backend requests the ring cannot (zeroing on devices without
    /// `fallocate`, `BLKDISCARD`, misaligned `O_DIRECT` requests), shared by all workers, so that
    /// those never block a worker (at least 1).
    pub blocking_threads: usize,
    /// How long the input of a *quiet* admin queue may wait so that the worker wakes once for many
    /// of them. An admin queue whose commands come a second or more apart (an idle host's
    /// keep-alives) leaves the ring for a readiness set the worker looks at once per window:
    /// thousands of idle controllers cost one wake-up per window instead of one per keep-alive. Its
    /// commands are answered up to this much later; the first command that follows another within
    /// a second brings the queue back. I/O queues are never delayed. Zero turns this off.
    pub admin_batch_window: Duration,
    /// The share of the ring's backend operations (of file-descriptor volumes) a connection keeps
    /// while the worker's connections to other volumes have some in flight too: at most as many as
    /// those together have in flight or waiting, but never fewer than this. The rest wait in the
    /// connection, in order. A deep queue next to a queue-depth-1 tenant then keeps this many in
    /// front of the tenant's request (in the kernel's queues, or its workers for files that cannot
    /// read without blocking) instead of all of its own; two deep queues are not held back by each
    /// other, nor are the queues of one volume (a host's queues), and a connection alone is not
    /// limited. Lower: a light tenant's latency gets closer to what it sees alone, and a deep queue
    /// next to it gets less throughput. Zero: no limit.
    pub disk_share: usize,
}

impl ServerConfig {
    /// Defaults: one worker per core, 1024-entry rings, 65536 connections per worker, 16384 per peer
    /// address, 4 MiB of queued responses per connection, 256 receive buffers of 64 KiB per worker,
    /// a 50 µs poll window, 4 blocking-pool threads, a 10 ms batch window for quiet admin queues,
    /// a disk share of 16 operations per connection.
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
            poll_window: Duration::from_micros(50),
            blocking_threads: 4,
            admin_batch_window: Duration::from_millis(10),
            disk_share: 4,
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
    blocking: BlockingPool,
    blocking_threads: Vec<JoinHandle<()>>,
    /// Duplicates of the workers' listening sockets.
    listener_fds: Vec<OwnedFd>,
}

impl Server {
    /// Probes io_uring, binds the listeners and starts the workers. Fails with a clear error when
    /// io_uring is not available (old kernel, seccomp) or an opcode the server needs is missing, and
    /// when another process listens on the address.
    pub fn start(target: Target, config: ServerConfig) -> io::Result<Server> {
        let workers = match config.workers {
            0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
            n => n,
        };
        probe()?;
        check_port_free(config.listen)?;
        let mut listeners = Vec::with_capacity(workers);
        let mut addr = config.listen;
        for _ in 0..workers {
            let l = reuseport_listener(addr)?;
            // With port 0 the first bind picks the port; the others join it.
            addr = l.local_addr()?;
            listeners.push(l);
        }
        let imported = listeners.iter().map(|_| Vec::new()).collect();
        Self::run_workers(target, config, listeners, imported)
    }

    /// Like [`Server::start`], with listening sockets made elsewhere (kept by a service manager
    /// across a restart, so that no connection was refused meanwhile): each becomes a worker's
    /// listener, and more workers join the port (`SO_REUSEPORT`) up to `config.workers`. The
    /// sockets must listen on `config.listen` and have `SO_REUSEPORT` set if more workers join.
    ///
    /// # Errors
    /// As [`Server::start`]; no socket given.
    pub fn start_with_listeners(
        target: Target,
        config: ServerConfig,
        mut listeners: Vec<TcpListener>,
    ) -> io::Result<Server> {
        probe()?;
        let first = listeners
            .first()
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "no listening socket given"))?;
        let addr = first.local_addr()?;
        let workers = match config.workers {
            0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
            n => n,
        };
        while listeners.len() < workers {
            listeners.push(reuseport_listener(addr)?);
        }
        let imported = listeners.iter().map(|_| Vec::new()).collect();
        Self::run_workers(target, config, listeners, imported)
    }

    /// Duplicates of the listening sockets, in worker order (to keep them in a service manager's
    /// store, see [`Server::start_with_listeners`]).
    ///
    /// # Errors
    /// A descriptor could not be duplicated.
    pub fn listeners(&self) -> io::Result<Vec<OwnedFd>> {
        self.listener_fds.iter().map(|fd| fd.try_clone()).collect()
    }

    /// Starts serving the listening sockets and connections another process handed over (see
    /// [`crate::upgrade`]): one worker per listening socket (the handing process's number of
    /// workers), each connection on the worker of the same index as in the old process. The
    /// commands the old process held run first, then the input it had received and not decoded.
    pub(crate) fn start_taking_over(
        target: Target,
        config: ServerConfig,
        takeover: Takeover,
    ) -> io::Result<Server> {
        probe()?;
        let Takeover { listeners, conns } = takeover;
        if listeners.is_empty() {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, "no listening socket was handed over"));
        }
        let mut imported: Vec<Vec<Imported>> = listeners.iter().map(|_| Vec::new()).collect();
        let n = imported.len();
        for c in conns {
            if let Some(list) = imported.get_mut(c.worker % n) {
                list.push(c);
            }
        }
        Self::run_workers(target, config, listeners, imported)
    }

    fn run_workers(
        target: Target,
        config: ServerConfig,
        listeners: Vec<TcpListener>,
        imported: Vec<Vec<Imported>>,
    ) -> io::Result<Server> {
        let workers = listeners.len();
        let addr = listeners.first().map(TcpListener::local_addr).transpose()?.unwrap_or(config.listen);
        let listener_fds =
            listeners.iter().map(|l| l.try_clone().map(OwnedFd::from)).collect::<io::Result<Vec<_>>>()?;
        let stop = Arc::new(AtomicBool::new(false));
        let peers = Arc::new(Mutex::new(HashMap::new()));
        let (blocking, blocking_threads) = BlockingPool::start(config.blocking_threads)?;
        // Lazy activation (reading the catalog, opening a device) runs on the pool too: a Connect to a
        // volume that is not loaded waits there, not on the worker.
        let pool = blocking.clone();
        target.set_activation_runner(Some(Arc::new(move |job| {
            let _ = pool.run(job);
        })));
        let mut mailboxes = Vec::new();
        let mut handles = Vec::new();
        // After a takeover, serving starts when every worker has its connections back.
        let (installed_tx, installed) = std::sync::mpsc::channel::<()>();
        let taking_over = imported.iter().any(|list| !list.is_empty());
        for (i, (listener, imported)) in listeners.into_iter().zip(imported).enumerate() {
            let installed_tx = installed_tx.clone();
            let mailbox = Arc::new(Mailbox::new()?);
            mailboxes.push(mailbox.clone());
            let (t, c, s, p) = (target.clone(), config.clone(), stop.clone(), peers.clone());
            let pool = blocking.clone();
            let spawned = std::thread::Builder::new().name(format!("xatastor-w{i}")).spawn(move || {
                let mut w = Worker::new(i, t, c, listener, mailbox, s, p, pool)?;
                w.install(imported);
                let _ = installed_tx.send(());
                drop(installed_tx);
                w.run()
            });
            match spawned {
                Ok(handle) => handles.push(handle),
                Err(e) => {
                    // Stop what did start before reporting the error.
                    let server = Server {
                        local_addr: addr,
                        target,
                        stop,
                        mailboxes,
                        workers: handles,
                        blocking,
                        blocking_threads,
                        listener_fds,
                    };
                    let _ = server.shutdown();
                    return Err(e);
                }
            }
        }
        drop(installed_tx);
        if taking_over {
            // A worker that failed to start sends nothing: its sender is dropped, and the wait ends.
            for _ in 0..workers {
                if installed.recv().is_err() {
                    break;
                }
            }
        }
        tracing::info!(%addr, workers, "NVMe/TCP server listening");
        Ok(Server {
            local_addr: addr,
            target,
            stop,
            mailboxes,
            workers: handles,
            blocking,
            blocking_threads,
            listener_fds,
        })
    }

    /// Prepares a handover: every worker stops accepting (new connections wait in the listen
    /// backlog), holds the commands that arrive, lets the started ones finish and their responses go
    /// out, stops receiving, and writes its connections down. Within `timeout`, or the workers
    /// resume serving and the reason is returned. After success the workers serve nothing until
    /// [`Server::resume`] or [`Server::abandon`].
    pub(crate) fn export_connections(&self, timeout: Duration) -> Result<ServerExport, String> {
        #[allow(clippy::disallowed_methods)] // a deadline for the workers, not the data path
        let deadline = std::time::Instant::now() + timeout;
        let (tx, rx) = std::sync::mpsc::channel();
        for m in &self.mailboxes {
            m.handover.lock().push(HandoverCmd::Begin { deadline, reply: tx.clone() });
            m.signal();
        }
        drop(tx);
        let mut export = ServerExport::default();
        let mut failure = None;
        for _ in 0..self.mailboxes.len() {
            match rx.recv_timeout(timeout + Duration::from_secs(1)) {
                Ok(Ok(w)) => {
                    export.listeners.push((w.worker, w.listener));
                    export.conns.extend(w.conns);
                }
                Ok(Err(e)) => {
                    failure.get_or_insert(e);
                }
                Err(_) => {
                    failure.get_or_insert_with(|| "a worker did not answer in time".to_owned());
                    break;
                }
            }
        }
        if let Some(e) = failure {
            self.resume();
            return Err(e);
        }
        export.listeners.sort_by_key(|(i, _)| *i);
        Ok(export)
    }

    /// Tells the workers to stop without closing their connections (see [`Server::abandon`]);
    /// returns at once.
    pub(crate) fn let_go(&self) {
        for m in &self.mailboxes {
            m.handover.lock().push(HandoverCmd::Abandon);
            m.signal();
        }
    }

    /// Ends a handover that did not happen: held commands run, receiving and accepting resume.
    pub(crate) fn resume(&self) {
        for m in &self.mailboxes {
            m.handover.lock().push(HandoverCmd::Resume);
            m.signal();
        }
    }

    /// After a handover: the workers stop without a word to the hosts (their connections live on in
    /// the process that took them over) and without flushing (that process serves the volumes now;
    /// what was written is in the kernel's hands either way). Returns when they have stopped.
    pub fn abandon(self) {
        self.let_go();
        for w in self.workers {
            let _ = w.join();
        }
        self.target.set_activation_runner(None);
        self.blocking.close();
        for t in self.blocking_threads {
            let _ = t.join();
        }
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
                poll_hits: m.stats.spin_hits.load(Ordering::Relaxed),
                poll_misses: m.stats.spin_misses.load(Ordering::Relaxed),
                poll_time: Duration::from_nanos(m.stats.spin_ns.load(Ordering::Relaxed)),
                received_bytes_copied: m.stats.rx_copied.load(Ordering::Relaxed),
                bounced_writes: m.stats.bounced.load(Ordering::Relaxed),
                accept_failures: m.stats.accept_failures.load(Ordering::Relaxed),
                ring_discards: m.stats.ring_discards.load(Ordering::Relaxed),
                ring_refusals: m.stats.ring_refusals.load(Ordering::Relaxed),
                pool_requests: m.stats.pool_requests.load(Ordering::Relaxed),
                quiet_admin_queues: m.stats.dormant.load(Ordering::Relaxed),
                admin_batches: m.stats.batch_wakeups.load(Ordering::Relaxed),
                admin_batched_receives: m.stats.batched_inputs.load(Ordering::Relaxed),
                disk_share_waits: m.stats.disk_waits.load(Ordering::Relaxed),
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
        // The workers waited for their requests on the pool; nothing is queued there any more.
        self.target.set_activation_runner(None);
        self.blocking.close();
        for t in self.blocking_threads {
            if t.join().is_err() && first.is_ok() {
                first = Err(io::Error::other("a blocking-pool thread panicked"));
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

/// A request to a worker about a handover.
#[derive(Debug)]
enum HandoverCmd {
    /// Quiesce and write the connections down by `deadline`; the answer goes to `reply`.
    Begin { deadline: std::time::Instant, reply: std::sync::mpsc::Sender<Result<WorkerExport, String>> },
    /// Serve again.
    Resume,
    /// Stop without closing the connections.
    Abandon,
}

/// What one worker wrote down.
#[derive(Debug)]
struct WorkerExport {
    worker: usize,
    listener: OwnedFd,
    conns: Vec<ExportedConn>,
}

/// A connection written down for a handover: its socket (the worker's own descriptor, not a
/// duplicate: a node near its open-file limit can still hand over) and its state (with the input
/// received and not decoded yet).
#[derive(Debug)]
pub(crate) struct ExportedConn {
    /// The worker it was served by.
    pub(crate) worker: usize,
    /// Valid while the worker is written down: it closes no connection until
    /// [`Server::resume`] or [`Server::let_go`].
    pub(crate) fd: std::os::fd::RawFd,
    pub(crate) state: nvmeof_target::ConnectionState,
}

/// Everything the workers wrote down: their listening sockets (in worker order) and connections.
#[derive(Debug, Default)]
pub(crate) struct ServerExport {
    pub(crate) listeners: Vec<(usize, OwnedFd)>,
    pub(crate) conns: Vec<ExportedConn>,
}

/// A connection taken over from another process, ready for a worker.
pub(crate) struct Imported {
    /// The worker index it had in the old process.
    pub(crate) worker: usize,
    pub(crate) stream: std::net::TcpStream,
    pub(crate) engine: nvmeof_target::Connection,
    pub(crate) unread: Vec<u8>,
}

impl std::fmt::Debug for Imported {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Imported")
            .field("worker", &self.worker)
            .field("engine", &self.engine)
            .finish_non_exhaustive()
    }
}

/// Listening sockets and connections taken over from another process.
#[derive(Debug, Default)]
pub(crate) struct Takeover {
    pub(crate) listeners: Vec<TcpListener>,
    pub(crate) conns: Vec<Imported>,
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
        (opcode::Write::CODE, "write"),
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

/// Fails if another socket listens on `addr` (or on the wildcard address of its port) for longer
/// than [`PORT_WAIT`].
///
/// The workers share their port through `SO_REUSEPORT`, which the kernel extends to any process of
/// the same user: without this check a second server on the same address would silently receive a
/// share of the first one's connections. A plain bind (no `SO_REUSEPORT`) conflicts with every
/// listener on the port, ours included, so it is made before ours and dropped again. (Two servers
/// started within the same instant could both pass; a server started later fails here.)
///
/// A process that has just exited may still hold its listener for a moment (an io_uring instance
/// is torn down asynchronously, and a killed server's multishot accepts keep their sockets until
/// then): a restart waits for the port instead of failing at once.
fn check_port_free(addr: SocketAddr) -> io::Result<()> {
    if addr.port() == 0 {
        return Ok(());
    }
    #[allow(clippy::disallowed_methods)] // start-up, not the data path
    let deadline = std::time::Instant::now() + PORT_WAIT;
    let mut logged = false;
    loop {
        let socket = socket2::Socket::new(socket2::Domain::for_address(addr), socket2::Type::STREAM, None)?;
        socket.set_reuse_address(true)?;
        match socket.bind(&addr.into()) {
            Ok(()) => return Ok(()),
            #[allow(clippy::disallowed_methods)] // start-up, not the data path
            Err(e) if e.kind() == io::ErrorKind::AddrInUse && std::time::Instant::now() < deadline => {
                if !logged {
                    tracing::info!(%addr, "the port is in use; waiting up to {} s for it (a server that just exited?)", PORT_WAIT.as_secs());
                    logged = true;
                }
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            Err(e) if e.kind() == io::ErrorKind::AddrInUse => {
                return Err(io::Error::new(
                    io::ErrorKind::AddrInUse,
                    format!(
                        "{addr} is already in use by another process (another node serving this port?); waited {} s for it",
                        PORT_WAIT.as_secs()
                    ),
                ))
            }
            Err(e) => return Err(e),
        }
    }
}

/// Raises the process's soft limit of open files to its hard limit, and returns the (old, new)
/// soft limits.
///
/// Every connection is a file descriptor; services often start with a soft limit of 1024
/// (systemd's default for units), which caps a node at about a thousand connections although
/// the hard limit (524288 under systemd) allows far more. A server meant to hold many connections
/// calls this once at start (`xatastor-target serve` does), before [`Server::start`]: an io_uring
/// accept obeys the limit of the moment it was armed. It never lowers a limit.
///
/// # Errors
/// The limit could not be read or set.
pub fn raise_open_file_limit() -> io::Result<(u64, u64)> {
    use rustix::process::{getrlimit, setrlimit, Resource, Rlimit};
    let limit = getrlimit(Resource::Nofile);
    let old = limit.current.unwrap_or(u64::MAX);
    let Some(hard) = limit.maximum else {
        return Ok((old, old));
    };
    if old >= hard {
        return Ok((old, old));
    }
    setrlimit(Resource::Nofile, Rlimit { current: Some(hard), maximum: Some(hard) })?;
    Ok((old, hard))
}

/// How long a starting server waits for its port to be released by a process that just exited.
const PORT_WAIT: std::time::Duration = std::time::Duration::from_secs(3);

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
    /// Connections (slab keys) whose engine asked for `handle_wakeup`.
    woken: Mutex<Vec<u64>>,
    /// Results of backend requests that completed on another thread (token: the worker's own key
    /// of the request).
    completions: Mutex<Vec<(IoToken, IoResult)>>,
    /// Handover requests for the worker (see [`Server::export_connections`]).
    handover: Mutex<Vec<HandoverCmd>>,
    stats: Counters,
}

/// The worker's counters, written by the worker only, read by anyone.
#[derive(Debug, Default)]
struct Counters {
    connections: AtomicUsize,
    held: AtomicUsize,
    accepted: AtomicU64,
    refused: AtomicU64,
    spin_hits: AtomicU64,
    spin_misses: AtomicU64,
    spin_ns: AtomicU64,
    rx_copied: AtomicU64,
    bounced: AtomicU64,
    accept_failures: AtomicU64,
    ring_discards: AtomicU64,
    ring_refusals: AtomicU64,
    pool_requests: AtomicU64,
    dormant: AtomicUsize,
    batch_wakeups: AtomicU64,
    batched_inputs: AtomicU64,
    disk_waits: AtomicU64,
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
    /// Poll windows that found work before they ran out.
    pub poll_hits: u64,
    /// Poll windows that ran out (the worker then blocked).
    pub poll_misses: u64,
    /// Time spent polling (the CPU the poll window costs).
    pub poll_time: Duration,
    /// Bytes copied out of the shared receive buffers into connections' reassembly buffers (ring
    /// mode). Queues of `O_DIRECT` volumes receive in direct mode and copy nothing.
    pub received_bytes_copied: u64,
    /// Writes to `O_DIRECT` devices whose data was not aligned and was copied into an aligned
    /// buffer first.
    pub bounced_writes: u64,
    /// Accepts that failed for lack of file descriptors or memory (each pauses accepting for
    /// 100 ms; the connections wait in the listen backlog meanwhile).
    pub accept_failures: u64,
    /// Deallocate and Write Zeroes (with DEAC) requests done on the ring with the block-device
    /// discard command (a zvol's deallocation: the whole granularity blocks discarded, the partial
    /// ones written with zeros).
    pub ring_discards: u64,
    /// Write Zeroes / Deallocate requests the device or kernel refused on the ring although the
    /// device declared the mode (`fallocate`, or the discard command on a kernel without it); each
    /// ran on the blocking pool, as do that volume's later ones on this worker.
    pub ring_refusals: u64,
    /// Requests of file-descriptor volumes run on the blocking pool because the ring cannot do them
    /// (zeroing without `fallocate`, deallocation without the discard command, misaligned
    /// `O_DIRECT` requests).
    pub pool_requests: u64,
    /// Quiet admin queues waiting in the worker's readiness set (see
    /// [`ServerConfig::admin_batch_window`]).
    pub quiet_admin_queues: usize,
    /// Batch windows the worker served quiet admin queues in.
    pub admin_batches: u64,
    /// Receives of quiet admin queues served in those windows (their ratio to `admin_batches` is
    /// how many keep-alives one wake-up answered).
    pub admin_batched_receives: u64,
    /// Backend requests that waited for their connection's share of the ring
    /// ([`ServerConfig::disk_share`]).
    pub disk_share_waits: u64,
}

impl Mailbox {
    fn new() -> io::Result<Self> {
        let eventfd = rustix::event::eventfd(0, rustix::event::EventfdFlags::CLOEXEC)?;
        Ok(Self {
            eventfd,
            woken: Mutex::new(Vec::new()),
            completions: Mutex::new(Vec::new()),
            handover: Mutex::new(Vec::new()),
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
