//! The thread-per-core io_uring NVMe/TCP server (first version).
//!
//! ```text
//!  Server::start ── binds one SO_REUSEPORT listener per worker ── spawns N workers
//!
//!  worker (one thread, one io_uring):
//!     AcceptMulti(listener) ─▶ new Conn { engine Connection, reassembly buffer, send queue }
//!     RecvMulti(conn)       ─▶ bytes in a provided buffer ─▶ Connection::handle_input ─▶ events
//!     Writev(conn)          ◀─ Event::Transmit (header + payload Bytes, no copy)
//!     Read/Writev/Fsync(fd) ◀─ Event::Io for file and block-device volumes
//!     Read(eventfd)         ◀─ notifiers (AEN, teardown), async backend completions, shutdown
//!     io_uring_enter(timeout = earliest engine deadline): idle costs nothing
//! ```
//!
//! What this version does and does not do yet (the server issue continues it): connections, their
//! receive and send paths, timers and wake-ups all run on the worker's ring, and so do reads, writes
//! (FUA as `RWF_DSYNC`) and flushes of file-descriptor backends (files, block devices), with the
//! PDUs' own buffers as the write data. Receives are multishot into a provided-buffer ring shared by
//! the worker's connections (an idle connection holds no receive buffer; received bytes are copied
//! from the ring buffer into the connection's reassembly buffer, which holds at most one partial PDU
//! plus what is still being decoded). Write Zeroes / Deallocate and non-fd backends go through
//! [`nvmeof_target::execute_blocking`] (immediate for memory volumes). `O_DIRECT` devices are not
//! yet driven on the ring (they would need aligned buffers).

use std::collections::VecDeque;
use std::io;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use io_uring::{cqueue, opcode, squeue, types, IoUring, Probe};
use nvmeof_proto::{EncodedPdu, Payload};
use nvmeof_target::{
    execute_blocking, Connection, Event, IoError, IoOp, IoOutput, IoRequest, IoResult, IoToken, Namespace,
    Target, TransportParams,
};

/// How to run the server.
#[derive(Clone, Debug)]
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
    /// Size of each receive buffer, in bytes. Receive buffers are shared by all of a worker's
    /// connections (an io_uring provided-buffer ring): an idle connection holds none.
    pub recv_buffer_bytes: usize,
    /// Receive buffers per worker (rounded up to a power of two, at most 32768).
    pub recv_buffers: u16,
}

impl ServerConfig {
    /// Defaults: one worker per core, 1024-entry rings, 65536 connections per worker, 256 receive
    /// buffers of 64 KiB per worker.
    #[must_use]
    pub fn new(listen: SocketAddr) -> Self {
        Self {
            listen,
            workers: 0,
            port_id: 1,
            ring_entries: 1024,
            max_connections_per_worker: 65536,
            recv_buffer_bytes: 64 * 1024,
            recv_buffers: 256,
        }
    }
}

/// A running server. Dropping it does not stop it: call [`Server::shutdown`].
#[derive(Debug)]
pub struct Server {
    local_addr: SocketAddr,
    stop: Arc<AtomicBool>,
    wake_fds: Vec<Arc<OwnedFd>>,
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
        let mut wake_fds = Vec::new();
        let mut handles = Vec::new();
        for (i, listener) in listeners.into_iter().enumerate() {
            let wake = Arc::new(eventfd()?);
            wake_fds.push(wake.clone());
            let (target, config, stop) = (target.clone(), config.clone(), stop.clone());
            let handle = std::thread::Builder::new().name(format!("xatastor-w{i}")).spawn(move || {
                let mut w = Worker::new(target, config, listener, wake, stop)?;
                w.run()
            })?;
            handles.push(handle);
        }
        tracing::info!(%addr, workers, "NVMe/TCP server listening");
        Ok(Server { local_addr: addr, stop, wake_fds, workers: handles })
    }

    /// The address the server listens on (with the port the system chose for port 0).
    #[must_use]
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Stops accepting, closes every connection once its pending responses are sent, and waits for
    /// the workers to finish.
    pub fn shutdown(self) -> io::Result<()> {
        self.stop.store(true, Ordering::Release);
        for fd in &self.wake_fds {
            signal(fd.as_raw_fd());
        }
        for w in self.workers {
            w.join().map_err(|_| io::Error::other("a worker thread panicked"))??;
        }
        Ok(())
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
    ] {
        if !probe.is_supported(code) {
            return Err(io::Error::new(
                io::ErrorKind::Unsupported,
                format!("io_uring lacks the {name} opcode"),
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

fn eventfd() -> io::Result<OwnedFd> {
    rustix::event::eventfd(0, rustix::event::EventfdFlags::CLOEXEC).map_err(io::Error::from)
}

/// Wakes a worker blocked in `io_uring_enter`.
fn signal(fd: RawFd) {
    // SAFETY: `fd` is an eventfd owned by the server for as long as its workers run; writing 8 bytes
    // from a valid local buffer is what an eventfd expects.
    let _ = unsafe { libc::write(fd, (&1u64 as *const u64).cast(), 8) };
}

const KIND_ACCEPT: u64 = 1;
const KIND_RECV: u64 = 2;
const KIND_SEND: u64 = 3;
const KIND_WAKE: u64 = 4;
const KIND_DISK: u64 = 5;

/// A read, write or flush the worker runs on its ring for a file-descriptor backend.
struct DiskOp {
    slot: usize,
    generation: u32,
    token: IoToken,
    /// Keeps the backend, and so its file descriptor, alive until the operation completes.
    _namespace: Arc<Namespace>,
    kind: DiskKind,
}

enum DiskKind {
    /// Reads into `buf` (zeroed first: a short read of a sparse file's tail reads zeros).
    Read {
        buf: BytesMut,
    },
    /// Writes the payload's segments (the PDUs' own buffers: no copy) with these iovecs.
    Write {
        _data: Payload,
        iov: Vec<libc::iovec>,
        len: usize,
    },
    Flush,
}

fn user_data(kind: u64, slot: usize, generation: u32) -> u64 {
    (kind << 56) | ((slot as u64 & 0xff_ffff) << 32) | u64::from(generation)
}

fn split_user_data(ud: u64) -> (u64, usize, u32) {
    (ud >> 56, ((ud >> 32) & 0xff_ffff) as usize, ud as u32)
}

/// Send at most this many PDUs in one `writev`.
const MAX_IOVECS: usize = 64;

struct Conn {
    stream: TcpStream,
    engine: Connection,
    generation: u32,
    rx: BytesMut,
    recv_inflight: bool,
    queued: VecDeque<EncodedPdu>,
    /// PDUs of the `writev` in flight, and its iovecs (both must stay put until it completes).
    sending: Vec<EncodedPdu>,
    iov: Vec<libc::iovec>,
    /// Bytes of `sending` already written by earlier partial writes.
    sent: usize,
    send_inflight: bool,
    woken: Arc<AtomicBool>,
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
    wake: Arc<OwnedFd>,
    wake_buf: Box<u64>,
    stop: Arc<AtomicBool>,
    conns: Vec<Option<Box<Conn>>>,
    free: Vec<usize>,
    next_generation: u32,
    live: usize,
    accepting: bool,
    /// Entries that did not fit the submission queue, submitted as soon as there is room.
    backlog: VecDeque<squeue::Entry>,
    /// Backend operations in flight on the ring; their buffers live here until completion.
    disk_ops: Vec<Option<Box<DiskOp>>>,
    disk_free: Vec<usize>,
}

impl Worker {
    fn new(
        target: Target,
        config: ServerConfig,
        listener: TcpListener,
        wake: Arc<OwnedFd>,
        stop: Arc<AtomicBool>,
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
            wake,
            wake_buf: Box::new(0),
            stop,
            conns: Vec::new(),
            free: Vec::new(),
            next_generation: 1,
            live: 0,
            accepting: true,
            backlog: VecDeque::new(),
            disk_ops: Vec::new(),
            disk_free: Vec::new(),
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
        let e = opcode::Read::new(types::Fd(self.wake.as_raw_fd()), buf.cast(), 8)
            .build()
            .user_data(user_data(KIND_WAKE, 0, 0));
        // SAFETY: `wake_buf` is a Box owned by the worker, never moved or freed while it runs.
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
            if !self.accepting && self.live == 0 && self.disk_ops.iter().all(Option::is_none) {
                return Ok(());
            }
            let deadline = self.next_deadline();
            let now = Instant::now();
            let wait = deadline.map(|d| d.saturating_duration_since(now));
            let result = match wait {
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
            let cqes: Vec<(u64, i32, u32)> =
                self.ring.completion().map(|c| (c.user_data(), c.result(), c.flags())).collect();
            for (ud, res, flags) in cqes {
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
            self.run_timers(now);
        }
    }

    fn next_deadline(&self) -> Option<Instant> {
        self.conns.iter().flatten().filter_map(|c| c.engine.poll_timeout()).min()
    }

    fn run_timers(&mut self, now: Instant) {
        for slot in 0..self.conns.len() {
            let due = self
                .conns
                .get(slot)
                .and_then(|c| c.as_ref())
                .and_then(|c| c.engine.poll_timeout())
                .is_some_and(|d| d <= now);
            if due {
                if let Some(c) = self.conns.get_mut(slot).and_then(|c| c.as_mut()) {
                    c.engine.handle_timeout(now);
                }
                self.after_engine(slot, now);
            }
        }
    }

    fn on_accept(&mut self, res: i32, flags: u32, now: Instant) {
        if !cqueue::more(flags) && self.accepting {
            self.arm_accept();
        }
        if res < 0 {
            tracing::warn!(error = %io::Error::from_raw_os_error(-res), "accept failed");
            return;
        }
        // SAFETY: a successful accept completion carries a new file descriptor that nothing else owns.
        let stream = TcpStream::from(unsafe { OwnedFd::from_raw_fd(res) });
        if !self.accepting || self.live >= self.config.max_connections_per_worker {
            tracing::warn!("connection limit reached: closing a new connection");
            return;
        }
        let _ = stream.set_nodelay(true);
        let (Ok(local), Ok(peer)) = (stream.local_addr(), stream.peer_addr()) else { return };
        let params = TransportParams { local_addr: local, peer_addr: peer, port_id: self.config.port_id };
        let mut engine = self.target.accept(params, now);
        let woken = Arc::new(AtomicBool::new(false));
        let (flag, wake) = (woken.clone(), self.wake.clone());
        engine.set_notifier(Arc::new(move || {
            flag.store(true, Ordering::Release);
            signal(wake.as_raw_fd());
        }));
        let generation = self.next_generation;
        self.next_generation = self.next_generation.wrapping_add(1).max(1);
        let conn = Box::new(Conn {
            stream,
            engine,
            generation,
            rx: BytesMut::new(),
            recv_inflight: false,
            queued: VecDeque::new(),
            sending: Vec::new(),
            iov: Vec::new(),
            sent: 0,
            send_inflight: false,
            woken,
            closing: false,
            dead: false,
        });
        let slot = match self.free.pop() {
            Some(s) => {
                if let Some(c) = self.conns.get_mut(s) {
                    *c = Some(conn);
                }
                s
            }
            None => {
                self.conns.push(Some(conn));
                self.conns.len() - 1
            }
        };
        self.live += 1;
        self.arm_recv(slot);
    }

    fn arm_recv(&mut self, slot: usize) {
        let Some(c) = self.conns.get_mut(slot).and_then(|c| c.as_mut()) else { return };
        if c.recv_inflight || c.closing || c.dead {
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
        if res == -libc::ENOBUFS {
            // Every buffer was taken between two reaps; they are back now: receive again.
        } else if res <= 0 {
            c.dead = res < 0;
            c.engine.handle_peer_closed();
        } else if let Some(bid) = bid {
            c.rx.extend_from_slice(self.bufs.get(bid, res as usize));
            self.bufs.recycle(bid);
            let mut rx = std::mem::take(&mut c.rx);
            c.engine.handle_input(&mut rx, now);
            c.rx = rx;
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
            c.engine.handle_peer_closed();
        } else {
            c.sent += res as usize;
            let total: usize = c.sending.iter().map(EncodedPdu::len).sum();
            if c.sent >= total {
                c.sending.clear();
                c.sent = 0;
            }
        }
        self.after_engine(slot, now);
    }

    fn on_wake(&mut self, now: Instant) {
        self.arm_wake();
        for slot in 0..self.conns.len() {
            let woken = self
                .conns
                .get(slot)
                .and_then(|c| c.as_ref())
                .is_some_and(|c| c.woken.swap(false, Ordering::AcqRel));
            if woken {
                if let Some(c) = self.conns.get_mut(slot).and_then(|c| c.as_mut()) {
                    c.engine.handle_wakeup(now);
                }
                self.after_engine(slot, now);
            }
        }
    }

    /// Carries out the engine's events, starts a send if none is in flight, and frees the connection
    /// once it is closed and quiet.
    fn after_engine(&mut self, slot: usize, now: Instant) {
        loop {
            let Some(c) = self.conns.get_mut(slot).and_then(|c| c.as_mut()) else { return };
            let generation = c.generation;
            let mut ios = Vec::new();
            while let Some(ev) = c.engine.poll_event() {
                match ev {
                    Event::Transmit(pdu) => {
                        if !c.dead {
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
                break;
            }
            for req in ios {
                self.start_io(slot, generation, req, now);
            }
        }
        self.start_send(slot);
        self.maybe_free(slot);
    }

    /// Runs a backend request: on the ring for file-descriptor backends (reads, writes, flushes),
    /// otherwise through the backend itself.
    fn start_io(&mut self, slot: usize, generation: u32, req: IoRequest, now: Instant) {
        let IoRequest { token, namespace, op } = req;
        let device =
            namespace.backend().raw_device().filter(|d| !d.direct).map(|d| (d.fd.as_raw_fd(), d.base_offset));
        let ring_op = match (device, op) {
            (Some(_), IoOp::Read { offset, len }) => {
                Some((DiskKind::Read { buf: BytesMut::zeroed(len as usize) }, Some((offset, false))))
            }
            (Some(_), IoOp::Write { offset, data, fua }) => {
                let iov = data
                    .segments()
                    .iter()
                    .map(|s| libc::iovec { iov_base: s.as_ptr() as *mut libc::c_void, iov_len: s.len() })
                    .collect();
                let len = data.len();
                Some((DiskKind::Write { _data: data, iov, len }, Some((offset, fua))))
            }
            (Some(_), IoOp::Flush) => Some((DiskKind::Flush, None)),
            (_, op) => {
                // Memory and other backends, and the rarer operations (write zeroes, deallocate):
                // through the backend (immediate for memory; blocks the worker for file ones).
                let result = execute_blocking(namespace.backend().as_ref(), op);
                if let Some(c) = self.conn_mut(slot, generation) {
                    c.engine.complete_io(token, result, now);
                }
                return;
            }
        };
        let (Some((fd, base)), Some((kind, args))) = (device, ring_op) else { return };
        let (offset, fua) = args.unwrap_or((0, false));
        let mut op = Box::new(DiskOp { slot, generation, token, _namespace: namespace, kind });
        let index = match self.disk_free.pop() {
            Some(i) => i,
            None => {
                self.disk_ops.push(None);
                self.disk_ops.len() - 1
            }
        };
        let ud = user_data(KIND_DISK, index, 0);
        let entry = match &mut op.kind {
            DiskKind::Read { buf } => opcode::Read::new(types::Fd(fd), buf.as_mut_ptr(), buf.len() as u32)
                .offset(base + offset)
                .build(),
            DiskKind::Write { iov, .. } => opcode::Writev::new(types::Fd(fd), iov.as_ptr(), iov.len() as u32)
                .offset(base + offset)
                .rw_flags(if fua { libc::RWF_DSYNC } else { 0 })
                .build(),
            DiskKind::Flush => opcode::Fsync::new(types::Fd(fd)).flags(types::FsyncFlags::DATASYNC).build(),
        }
        .user_data(ud);
        if let Some(s) = self.disk_ops.get_mut(index) {
            *s = Some(op);
        }
        // SAFETY: the operation's buffers (the read buffer, the write iovecs and the payload they point
        // to) live in the boxed `DiskOp` stored in `disk_ops` until its completion is reaped, and the
        // namespace it holds keeps the backend's file descriptor open.
        unsafe { self.push(entry) };
    }

    fn on_disk(&mut self, index: usize, res: i32, now: Instant) {
        let Some(op) = self.disk_ops.get_mut(index).and_then(Option::take) else { return };
        self.disk_free.push(index);
        let result: IoResult = if res < 0 {
            Err(IoError::Io(io::Error::from_raw_os_error(-res)))
        } else {
            match op.kind {
                DiskKind::Read { buf } => Ok(IoOutput::Data(buf.freeze().into())),
                DiskKind::Write { len, .. } if (res as usize) < len => {
                    Err(IoError::Io(io::Error::new(io::ErrorKind::WriteZero, "short write")))
                }
                DiskKind::Write { .. } | DiskKind::Flush => Ok(IoOutput::Done),
            }
        };
        if let Some(c) = self.conn_mut(op.slot, op.generation) {
            c.engine.complete_io(op.token, result, now);
        }
        self.after_engine(op.slot, now);
    }

    fn start_send(&mut self, slot: usize) {
        let Some(c) = self.conns.get_mut(slot).and_then(|c| c.as_mut()) else { return };
        if c.send_inflight || c.dead {
            return;
        }
        if c.sending.is_empty() {
            while c.sending.len() < MAX_IOVECS {
                match c.queued.pop_front() {
                    Some(p) => c.sending.push(p),
                    None => break,
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
            if let Some(s) = self.conns.get_mut(slot) {
                *s = None;
            }
            self.free.push(slot);
            self.live -= 1;
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
        for slot in 0..self.conns.len() {
            if let Some(c) = self.conns.get_mut(slot).and_then(|c| c.as_mut()) {
                c.engine.handle_peer_closed();
            }
            self.after_engine(slot, Instant::now());
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
