//! A worker: one thread, one io_uring, its own listener, connections, receive buffers and disk I/O.
//!
//! ```text
//!  loop {
//!      wait      submit queued entries; spin for the poll window if a connection is hot, else
//!                block in io_uring_enter until a completion or the earliest timer
//!      reap      accept / receive / send / disk / wake-up completions → engine calls
//!      send      one writev per connection with output (everything the turn produced)
//!      timers    engine deadlines that passed (keep-alive, connect timeout)
//!  }
//! ```
//!
//! The ring is made with `SINGLE_ISSUER | DEFER_TASKRUN | TASKRUN_FLAG` where the kernel has them:
//! completion work (a socket became readable, a disk write finished) is not run by interrupting the
//! worker but in batches when it enters the kernel, and the `TASKRUN` flag in the shared ring tells
//! the worker, without a system call, that such work is waiting.
//!
//! **Poll window.** A worker that just served a *hot* connection (one whose input arrives again
//! within a few poll windows, such as a host keeping a queue busy) spins on the ring for up to
//! [`super::ServerConfig::poll_window`] before it blocks: the next request of a busy host is then
//! picked up without a wake-up (a cross-core interrupt, tens of µs on a VM). The window adapts
//! ([`next_window`]): a worker woken soon after it stopped polling polls longer the next time, up to
//! four windows. A worker whose connections are idle, or only see sparse traffic like keep-alives,
//! blocks at once and uses no CPU.
//!
//! **Burst memory.** When the worker is about to block, the connections that were active since it
//! last did give back what a burst made them hold (send and receive vectors, the engine's tables),
//! so an idle connected queue costs only its fixed state. A busy connection (input within
//! [`TRIM_AFTER`] of its previous input) keeps it through sleeps shorter than that, and the worker
//! wakes to take it back [`TRIM_AFTER`] after its last input.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, HashSet, VecDeque};
use std::io;
use std::net::{IpAddr, TcpListener, TcpStream};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Buf, Bytes, BytesMut};
use io_uring::{cqueue, opcode, squeue, types, IoUring};
use nvmeof_target::{
    Completer, Connection, Event, IoError, IoOp, IoRequest, IoToken, Namespace, Submitted, Target,
    TransportParams,
};
use parking_lot::Mutex;

use super::blocking::BlockingPool;
use super::bufring::{BufRing, BUF_GROUP};
use super::conn::{pdu_len, Conn, DirectStep, RxMode};
use super::disk::{self, DiskOp, Outcome, Plan};
use super::pool::ReadPool;
use super::slab::{Key, Slab};
use super::{Mailbox, ServerConfig};
use crate::ratelimit::RateLimit;

mod handover;

const KIND_ACCEPT: u8 = 1;

/// How long accepting pauses after the process or the system ran out of file descriptors.
const ACCEPT_PAUSE: Duration = Duration::from_millis(100);
/// At most one warning line per this long about accepts that fail for lack of resources.
const ACCEPT_REPORT_EVERY: Duration = Duration::from_secs(10);
const KIND_RECV: u8 = 2;
const KIND_SEND: u8 = 3;
const KIND_WAKE: u8 = 4;
const KIND_DISK: u8 = 5;
/// Cancellations: their completions need nothing.
const KIND_CANCEL: u8 = 6;
/// The readiness set of quiet admin queues: its poll (`QUIET_POLL`) and the batch-window timer
/// linked after it (`QUIET_TIMER`).
const KIND_QUIET: u8 = 7;
const QUIET_POLL: u64 = 1;
const QUIET_TIMER: u64 = 2;
/// An admin queue whose input comes at least this far apart from the previous one is quiet (an
/// idle host's keep-alives: every KATO/2 or KATO/4; a host's bursts of admin commands come
/// milliseconds apart); input closer than this brings it back.
const QUIET_GAP: Duration = Duration::from_millis(100);
/// Engine deadlines wake a sleeping worker on multiples of this (from its start): every deadline of
/// a tick is handled in one wake-up. Keep-alive deadlines move with every keep-alive and leave an
/// outdated entry in the timer heap behind; without ticks each of those would wake the worker once.
/// (Controllers announce a keep-alive granularity of one second.)
const TIMER_TICK: Duration = Duration::from_millis(250);
/// Quiet admin queues taken from the readiness set per call (a window takes all that are ready).
const QUIET_BATCH: usize = 1024;

/// While a connection's input is held back (send queue over the limit), received bytes beyond this
/// make the worker cancel its receive until the peer reads.
const RX_HOLD_BYTES: usize = 256 * 1024;

/// Backend operations a connection may keep on the ring while connections to other volumes have
/// some there too: as many as those together have in flight or waiting, and at least `floor`
/// ([`super::ServerConfig::disk_share`]; 0: no limit). `own` is the demand (in flight and waiting)
/// of the connection's volume on the worker, `total` every connection's. A deep queue next to a
/// queue-depth-1 tenant keeps `floor`, so the tenant's request finds few of its operations ahead of
/// it; two deep queues are not held back by each other.
fn disk_limit(floor: usize, own: usize, total: usize) -> usize {
    if floor == 0 {
        return usize::MAX;
    }
    floor.max(total.saturating_sub(own))
}

/// Bytes the PDU at the front of `buf` still lacks (its common header first, then the rest up to its
/// PLEN); all the bytes there are if PLEN is not one a PDU can have (the decoder reports that).
fn missing(buf: &[u8]) -> usize {
    missing_of(buf, buf.len())
}

/// A PDU at least this long that arrives over several receive buffers is assembled as a chain of
/// slices of them (no copy); shorter ones are copied into the reassembly buffer.
const CHAIN_MIN_PDU: usize = 16 * 1024;

/// [`missing`] for input of `total` bytes whose first part is `front`.
fn missing_of(front: &[u8], total: usize) -> usize {
    const CH: usize = 8;
    match pdu_len(front) {
        None => CH.saturating_sub(total),
        Some(plen) if plen < CH => usize::MAX,
        Some(plen) => plen.saturating_sub(total),
    }
}

/// Lists `key` in `list` unless `listed` says it is there already.
fn list_once(listed: &mut bool, list: &mut Vec<Key>, key: Key) {
    if !*listed {
        *listed = true;
        list.push(key);
    }
}

/// Moves what is left of a receive buffer's `chunk` into a connection's reassembly buffer `buf` (a
/// copy, counted), so that the receive buffer can go back to the kernel.
fn keep_rest(buf: &mut BytesMut, chunk: &mut Bytes, stats: &super::Counters) {
    buf.extend_from_slice(chunk);
    stats.rx_copied.fetch_add(chunk.len() as u64, Ordering::Relaxed);
    chunk.clear();
}

/// A send of at most this many PDUs (one command's response: data and completion) by the turn's only
/// connection with output goes out with a system call of its own (see `Worker::send_alone`).
const SEND_ALONE_PDUS: usize = 2;

/// A connection whose input arrives again within this many poll windows is hot.
const HOT_WINDOWS: u32 = 4;

/// A busy connection (its last two inputs came within this long of each other) keeps its burst
/// memory (send and receive vectors, the engine's tables) through the worker's short sleeps between
/// its requests; it gives it back once it has had no input for this long. Under load every sleep
/// would otherwise free what the next request allocates again.
const TRIM_AFTER: Duration = Duration::from_millis(1);

/// When a connection that was active keeps its burst memory through a sleep starting `now`: until
/// the returned instant if it is busy and had input within [`TRIM_AFTER`]; `None`: give it back now.
fn keep_burst_memory(busy: bool, last_input: Option<Instant>, now: Instant) -> Option<Instant> {
    last_input.map(|t| t + TRIM_AFTER).filter(|&due| busy && due > now)
}

/// The poll window after a sleep of `slept` that began when a poll of `window` found nothing.
///
/// A sleep that ended within [`HOT_WINDOWS`] base windows means the window was too short for this
/// host's pace: the next input came soon, and waking the worker for it (a cross-core interrupt,
/// paid by the sender's core too) cost more than polling on would have. The window doubles, up to
/// `HOT_WINDOWS` × `base` (the longest gap at which a connection counts as hot at all, so a worker
/// never polls for traffic sparser than that). A longer sleep means the host paused: back to `base`.
fn next_window(window: Duration, base: Duration, slept: Duration) -> Duration {
    let max = base * HOT_WINDOWS;
    if slept < max {
        (window * 2).min(max)
    } else {
        base
    }
}

/// PDUs one connection decodes per loop turn at most. A host keeping 128 commands in flight gets them
/// served in rounds of this many, and another connection's request waits for one round, not for all
/// of them (the responses of each round go out at its end).
const PDU_BUDGET: u32 = 32;
/// PDUs one connection decodes per loop turn while other connections' input waits (received in this
/// turn and not handled yet, or deferred): a short round, so that a queue-depth-1 request next to a
/// deep queue waits for little. Alone, a connection keeps the longer round (fewer turns, fewer system
/// calls per command). The kernel's pending completion work counts only when another connection had
/// input in one of the last [`SHARED_TURNS`] turns: a busy connection's own next input is there most
/// of the time, and short rounds for it alone cost throughput.
const PDU_SHARE: u32 = 8;
/// See [`PDU_SHARE`].
const SHARED_TURNS: u64 = 16;
/// How long connections share the ring's backend operations (see
/// [`super::ServerConfig::disk_share`]) after one started while a connection to another volume had
/// some there.
const DISK_CONTENTION: Duration = Duration::from_millis(10);

/// A backend request that will complete through the mailbox.
struct PendingIo {
    conn: Key,
    token: IoToken,
}

pub(super) struct Worker {
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
    conns: Slab<Box<Conn>>,
    disk: Slab<DiskOp>,
    pending: Slab<PendingIo>,
    accepting: bool,
    /// The multishot accept is in the kernel (it holds a reference to the listening socket until
    /// its last completion arrives).
    accept_armed: bool,
    /// Accepting is paused until then: the process or the system ran out of file descriptors or
    /// memory, and retrying at once would spin (each retry fails the same way).
    accept_paused_until: Option<Instant>,
    /// Failed accepts not yet reported, and when the last report was made (one line per
    /// [`ACCEPT_REPORT_EVERY`] at most).
    accept_failures: u64,
    accept_reported_at: Option<Instant>,
    /// Warnings a peer can trigger once per connection or per attempt (connection limits, failed
    /// accepts, unknown engine events): at most one line per [`ACCEPT_REPORT_EVERY`] each, with
    /// the count of the others.
    refused_log: RateLimit,
    accept_error_log: RateLimit,
    event_log: RateLimit,
    /// Engine deadlines: (when, connection). Entries whose connection has since moved its deadline
    /// are skipped when they come up.
    timers: BinaryHeap<Reverse<(Instant, Key)>>,
    /// Entries that did not fit the submission queue, submitted as soon as there is room.
    backlog: VecDeque<squeue::Entry>,
    cqes: Vec<(u64, i32, u32)>,
    /// Reused list of the engine's I/O requests (no allocation per event batch).
    io_scratch: Vec<IoRequest>,
    /// Connections with output to send at the end of this turn.
    dirty: Vec<Key>,
    /// Namespaces (by address) whose device refused a `fallocate` mode it declared: write zeroes and
    /// deallocate go straight to the backend. A new namespace at a reused address merely takes the
    /// backend's (correct, slower) path for these two operations until the set is cleared.
    no_fallocate: HashSet<usize>,
    /// Spin instead of blocking until then (a hot connection had input).
    spin_until: Option<Instant>,
    /// The poll window in use (see [`next_window`]).
    window: Duration,
    /// When the worker went to sleep after a poll that found nothing (see [`next_window`]).
    slept_after_poll: Option<Instant>,
    /// Aligned read buffers for `O_DIRECT` devices.
    read_pool: Arc<ReadPool>,
    /// Connections whose receive ended for want of buffers.
    starved: Vec<Key>,
    /// Where requests of file-descriptor backends that the ring cannot run go.
    blocking: BlockingPool,
    /// Connections that had any activity since the worker was last idle: when it goes idle, those
    /// that are quiet give back what a burst made them hold.
    active: Vec<Key>,
    /// When the busy connections that kept their burst memory at the last sleep are due to give it
    /// back (see [`TRIM_AFTER`]).
    trim_at: Option<Instant>,
    /// Loop turns so far (for the per-connection budget of PDUs per turn).
    turn: u64,
    /// Connections with decoded-later input waiting (see [`PDU_BUDGET`]).
    deferred: Vec<Key>,
    /// Receive completions of this turn's batch not handled yet, counted only when more than one
    /// connection has some in the batch (other connections' input waits).
    recv_left: usize,
    /// The last loop turn in which more than one connection had input.
    shared_turn: u64,
    /// Connections share the ring's backend operations until then (see [`DISK_CONTENTION`]).
    disk_contended_until: Option<Instant>,
    /// Backend requests waiting in all connections for their share of the ring.
    disk_waiting_total: usize,
    /// The shared ring-demand count of each volume that connections of this worker use, by the
    /// address of its namespace (see `Conn::ring_group`).
    ring_groups: HashMap<usize, Arc<AtomicUsize>>,
    /// Quiet admin queues (None when the batch window is zero). Declared after `ring`: the timer
    /// it holds outlives the ring's operations.
    quiet: Option<Quiet>,
    /// When the worker started: the origin of its timer ticks.
    epoch: Instant,
    /// The worker's index (connections handed over keep it).
    index: usize,
    /// Where the worker is in a handover to another process.
    handover: handover::Phase,
    /// Connections woken while written down for a handover (handled if it does not happen).
    woken_later: Vec<u64>,
    /// Handed over: stop at once, without closing anything.
    abandoned: bool,
}

/// Quiet admin queues: their sockets wait in an epoll set instead of having a receive armed on the
/// ring. A poll of the set, with a timer of one batch window linked after it, wakes the worker once
/// per window in which any of them had input; it then receives from all that have.
struct Quiet {
    epoll: OwnedFd,
    /// The poll and its timer are in the ring.
    armed: bool,
    /// Connections in the set.
    count: usize,
    window: Box<types::Timespec>,
    events: Vec<rustix::event::epoll::Event>,
    /// Quiet queues with input, waiting for receive buffers to be free (a window can find more
    /// ready queues than the worker has buffers).
    ready: VecDeque<Key>,
}

impl Quiet {
    fn new(window: Duration) -> io::Result<Option<Self>> {
        if window.is_zero() {
            return Ok(None);
        }
        let epoll = rustix::event::epoll::create(rustix::event::epoll::CreateFlags::CLOEXEC)?;
        Ok(Some(Self {
            epoll,
            armed: false,
            count: 0,
            window: Box::new(timespec(window)),
            events: Vec::new(),
            ready: VecDeque::new(),
        }))
    }
}

impl Worker {
    #[allow(clippy::disallowed_methods)] // the driver owns the clock
    #[allow(clippy::too_many_arguments)]
    pub(super) fn new(
        index: usize,
        target: Target,
        config: ServerConfig,
        listener: TcpListener,
        mailbox: Arc<Mailbox>,
        stop: Arc<AtomicBool>,
        peers: Arc<Mutex<HashMap<IpAddr, usize>>>,
        blocking: BlockingPool,
    ) -> io::Result<Self> {
        let ring = new_ring(config.ring_entries.max(64))?;
        let quiet = Quiet::new(config.admin_batch_window)?;
        let window = config.poll_window;
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
            conns: Slab::default(),
            disk: Slab::default(),
            pending: Slab::default(),
            accepting: true,
            accept_armed: false,
            accept_paused_until: None,
            accept_failures: 0,
            accept_reported_at: None,
            refused_log: RateLimit::new(ACCEPT_REPORT_EVERY),
            accept_error_log: RateLimit::new(ACCEPT_REPORT_EVERY),
            event_log: RateLimit::new(ACCEPT_REPORT_EVERY),
            timers: BinaryHeap::new(),
            backlog: VecDeque::new(),
            cqes: Vec::new(),
            io_scratch: Vec::new(),
            dirty: Vec::new(),
            no_fallocate: HashSet::new(),
            spin_until: None,
            window,
            slept_after_poll: None,
            read_pool: Arc::new(ReadPool::default()),
            starved: Vec::new(),
            blocking,
            active: Vec::new(),
            trim_at: None,
            turn: 0,
            deferred: Vec::new(),
            quiet,
            recv_left: 0,
            shared_turn: 0,
            disk_contended_until: None,
            disk_waiting_total: 0,
            ring_groups: HashMap::new(),
            epoch: Instant::now(),
            index,
            handover: handover::Phase::Off,
            woken_later: Vec::new(),
            abandoned: false,
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
        // Close-on-exec: a program the node starts (the `zfs` command, the new binary of an
        // upgrade) must not inherit the hosts' connections.
        let e = opcode::AcceptMulti::new(types::Fd(self.listener.as_raw_fd()))
            .flags(libc::SOCK_CLOEXEC)
            .build()
            .user_data(u64::from(KIND_ACCEPT) << 56);
        // SAFETY: accept writes no buffer of ours; the listener lives as long as the worker.
        unsafe { self.push(e) };
        self.accept_armed = true;
    }

    fn arm_wake(&mut self) {
        let buf: *mut u64 = &mut *self.wake_buf;
        let e = opcode::Read::new(types::Fd(self.mailbox.eventfd.as_raw_fd()), buf.cast(), 8)
            .build()
            .user_data(u64::from(KIND_WAKE) << 56);
        // SAFETY: `wake_buf` is a Box owned by the worker, never moved or freed while it runs; the
        // eventfd is owned by the mailbox, which the worker holds.
        unsafe { self.push(e) };
    }

    fn cancel(&mut self, user_data: u64) {
        let e = opcode::AsyncCancel::new(user_data).build().user_data(u64::from(KIND_CANCEL) << 56);
        // SAFETY: cancelling touches no buffer.
        unsafe { self.push(e) };
    }

    #[allow(clippy::disallowed_methods)] // the driver owns the clock
    pub(super) fn run(&mut self) -> io::Result<()> {
        self.arm_accept();
        self.arm_wake();
        loop {
            if self.abandoned {
                return Ok(());
            }
            self.flush_backlog();
            if self.stop.load(Ordering::Acquire) && self.accepting {
                self.begin_shutdown();
            }
            // The worker also waits for the cancelled accept's last completion: until then the
            // kernel holds the listening socket, and a server started right after this one exits
            // would find the port still taken.
            if !self.accepting
                && !self.accept_armed
                && self.conns.is_empty()
                && self.pending.is_empty()
                && self.disk.is_empty()
            {
                return Ok(());
            }
            self.wait()?;
            self.turn = self.turn.wrapping_add(1);
            let now = Instant::now();
            if let Some(slept) = self.slept_after_poll.take() {
                let base = self.config.poll_window;
                self.window = next_window(self.window, base, now.saturating_duration_since(slept));
            }
            let mut cqes = std::mem::take(&mut self.cqes);
            cqes.extend(self.ring.completion().map(|c| (c.user_data(), c.result(), c.flags())));
            // Receive completions still to handle count as other connections' input waiting only
            // when more than one connection has them in this batch: a connection alone is not cut
            // short by its own next receive.
            let mut first = None;
            let mut shared = false;
            for &(ud, _, _) in &cqes {
                if (ud >> 56) as u8 == KIND_RECV && *first.get_or_insert(ud) != ud {
                    self.shared_turn = self.turn;
                    shared = true;
                    break;
                }
            }
            self.recv_left = if shared {
                cqes.iter().filter(|&&(ud, _, _)| (ud >> 56) as u8 == KIND_RECV).count()
            } else {
                0
            };
            for &(ud, res, flags) in &cqes {
                let (kind, key) = Key::from_user_data(ud);
                match kind {
                    KIND_ACCEPT => self.on_accept(res, flags, now),
                    KIND_RECV => {
                        self.recv_left = self.recv_left.saturating_sub(1);
                        self.on_recv(key, res, flags, now);
                    }
                    KIND_SEND => self.on_send(key, res, now),
                    KIND_WAKE => self.on_wake(now),
                    KIND_DISK => self.on_disk(key, res, now),
                    KIND_QUIET => self.on_quiet(ud, now),
                    _ => {}
                }
            }
            cqes.clear();
            self.cqes = cqes;
            self.run_deferred(now);
            self.send_alone(now);
            self.flush_sends();
            self.run_timers(now);
            self.resume_accept(now);
            self.reclaim_buffers();
            self.receive_quiet();
            self.arm_quiet();
            if self.handing_over() {
                self.handover_step(now);
                self.flush_sends();
            }
        }
    }

    /// Submits what is queued and waits for completions: spinning while the poll window is open,
    /// blocking (bounded by the earliest timer) otherwise.
    #[allow(clippy::disallowed_methods)] // the driver owns the clock
    fn wait(&mut self) -> io::Result<()> {
        // Entries that did not fit in the ring (thousands of connections armed at once, after a
        // takeover) go in on the next turns: submit without sleeping, or they would wait for an
        // unrelated completion.
        if !self.ring.completion().is_empty() || !self.deferred.is_empty() || !self.backlog.is_empty() {
            return self.enter(|ring| ring.submit().map(drop));
        }
        let mut polled = false;
        if let Some(until) = self.spin_until {
            // Submit what is queued; with nothing queued (the response went out with a system call
            // of its own) there is nothing to enter the kernel for.
            let queued = {
                let sq = self.ring.submission();
                !sq.is_empty() || sq.cq_overflow()
            };
            if queued {
                self.enter(|ring| ring.submit().map(drop))?;
            }
            let start = Instant::now();
            let mut spins = 0u32;
            loop {
                if !self.ring.completion().is_empty() {
                    self.note_spin(start, true);
                    return Ok(());
                }
                if self.ring.submission().taskrun() {
                    // Completion work is waiting in the kernel: an enter runs it.
                    self.enter(|ring| ring.submit().map(drop))?;
                    continue;
                }
                spins = spins.wrapping_add(1);
                if spins % 32 == 0 && Instant::now() >= until {
                    break;
                }
                std::hint::spin_loop();
            }
            self.note_spin(start, false);
            self.spin_until = None;
            polled = true;
        }
        #[allow(clippy::disallowed_methods)] // the driver owns the clock
        let now = Instant::now();
        if polled {
            self.slept_after_poll = Some(now);
        }
        // About to sleep: nothing is waiting, a good time to tidy up.
        self.release_idle_memory(now);
        let tick = |t: Instant| {
            let ticks = t.saturating_duration_since(self.epoch).as_nanos().div_ceil(TIMER_TICK.as_nanos());
            self.epoch + TIMER_TICK * u32::try_from(ticks).unwrap_or(u32::MAX)
        };
        // Engine deadlines do not run while the connections are written down for a handover.
        let timer = if self.rx_frozen() { None } else { self.timers.peek().map(|Reverse((t, _))| tick(*t)) };
        // Quiet queues whose poll could not be armed (no room in the ring): back within a window.
        let unarmed = self
            .quiet
            .as_ref()
            .filter(|q| q.count > 0 && !q.armed)
            .map(|_| now + self.config.admin_batch_window);
        let deadline = [timer, self.accept_paused_until, self.trim_at, unarmed, self.handover_deadline()]
            .into_iter()
            .flatten()
            .min();
        match deadline.map(|d| d.saturating_duration_since(Instant::now())) {
            Some(d) => {
                let ts = timespec(d);
                let args = types::SubmitArgs::new().timespec(&ts);
                self.enter(|ring| ring.submitter().submit_with_args(1, &args).map(drop))
            }
            None => self.enter(|ring| ring.submit_and_wait(1).map(drop)),
        }
    }

    /// Connections that were active and are quiet now give back their burst memory (receive and send
    /// vectors, the engine's tables): an idle connected queue holds only its fixed state. Runs when
    /// the worker is about to sleep, over the connections that had any activity since it last did.
    /// A busy connection with input in the last [`TRIM_AFTER`] keeps its memory until then (the
    /// worker's sleep ends by [`Worker::trim_at`] to give it back).
    fn release_idle_memory(&mut self, now: Instant) {
        let mut active = std::mem::take(&mut self.active);
        self.trim_at = None;
        active.retain(|&key| {
            let Some(c) = self.conns.get_mut(key) else { return false };
            if let Some(due) = keep_burst_memory(c.busy, c.last_input, now) {
                self.trim_at = Some(self.trim_at.map_or(due, |t| t.min(due)));
                return true;
            }
            c.active = false;
            c.rx.release_idle();
            c.tx.release_idle();
            c.engine.release_idle_memory();
            if c.disk_waiting.is_empty() {
                c.disk_waiting = VecDeque::new();
            }
            false
        });
        let kept = !active.is_empty();
        self.active = active;
        if kept {
            return;
        }
        // The worker's own vectors, sized by the last burst (a few entries are kept).
        self.active.shrink_to(64);
        self.cqes.shrink_to(64);
        self.io_scratch.shrink_to(16);
        self.dirty.shrink_to(16);
    }

    fn note_spin(&self, start: Instant, found: bool) {
        let stats = &self.mailbox.stats;
        #[allow(clippy::disallowed_methods)] // the driver owns the clock
        let spent = start.elapsed().as_nanos() as u64;
        stats.spin_ns.fetch_add(spent, Ordering::Relaxed);
        if found {
            stats.spin_hits.fetch_add(1, Ordering::Relaxed);
        } else {
            stats.spin_misses.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// One `io_uring_enter`, with the errors that only mean "nothing to do" ignored.
    fn enter(&mut self, f: impl FnOnce(&mut IoUring) -> io::Result<()>) -> io::Result<()> {
        match f(&mut self.ring) {
            Ok(()) => Ok(()),
            Err(e) if e.raw_os_error() == Some(libc::ETIME) || e.kind() == io::ErrorKind::Interrupted => {
                Ok(())
            }
            // The completion queue is full: the caller reaps it first.
            Err(e) if e.raw_os_error() == Some(libc::EBUSY) => Ok(()),
            Err(e) => Err(e),
        }
    }

    fn run_timers(&mut self, now: Instant) {
        if self.rx_frozen() {
            // Written down for another process (or about to be): its clock runs there.
            return;
        }
        while let Some(&Reverse((t, key))) = self.timers.peek() {
            if t > now {
                break;
            }
            self.timers.pop();
            let Some(c) = self.conns.get_mut(key) else { continue };
            if c.queued != Some(t) {
                continue; // an earlier entry of this connection superseded it
            }
            c.queued = None;
            match c.timer {
                None => continue,
                Some(current) if current > now => {
                    // The deadline moved later since (a keep-alive came): wait for it.
                    c.queued = Some(current);
                    self.timers.push(Reverse((current, key)));
                    continue;
                }
                Some(_) => {}
            }
            c.timer = None;
            c.engine.handle_timeout(now);
            self.after_engine(key, now);
        }
        // Deadlines that keep moving (keep-alive on a busy admin queue) leave stale entries behind;
        // rebuild the heap when they outnumber the live ones.
        if self.timers.len() > 4 * self.conns.len() + 64 {
            self.timers = self
                .conns
                .iter_mut()
                .filter_map(|(key, c)| {
                    c.queued = c.timer;
                    Some(Reverse((c.timer?, key)))
                })
                .collect();
        }
        self.flush_sends();
    }

    fn on_accept(&mut self, res: i32, flags: u32, now: Instant) {
        let exhausted = matches!(-res, libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM);
        if exhausted && self.accepting {
            self.accept_exhausted(-res, flags, now);
            return;
        }
        if !cqueue::more(flags) {
            self.accept_armed = false;
            if self.accepting && self.accept_paused_until.is_none() && !self.handing_over() {
                self.arm_accept();
            }
        }
        if res < 0 {
            if res != -libc::ECANCELED || (self.accepting && !self.handing_over()) {
                if let Some(more) = self.accept_error_log.check(now) {
                    tracing::warn!(error = %io::Error::from_raw_os_error(-res), more, "accept failed ({more} more since the last report)");
                }
            }
            return;
        }
        // SAFETY: a successful accept completion carries a new file descriptor that nothing else owns.
        let stream = TcpStream::from(unsafe { OwnedFd::from_raw_fd(res) });
        if !self.accepting {
            return;
        }
        let (Ok(local), Ok(peer)) = (stream.local_addr(), stream.peer_addr()) else { return };
        if self.conns.len() >= self.config.max_connections_per_worker {
            if let Some(more) = self.refused_log.check(now) {
                tracing::warn!(%peer, limit = self.config.max_connections_per_worker, more, "connection limit of the worker reached: closing a new connection ({more} more refused since the last report)");
            }
            self.mailbox.stats.refused.fetch_add(1, Ordering::Relaxed);
            return;
        }
        let Some(key) = self.conns.next_key() else { return };
        let peer_ip = peer.ip().to_canonical();
        {
            let mut peers = self.peers.lock();
            let n = peers.entry(peer_ip).or_insert(0);
            if *n >= self.config.max_connections_per_peer {
                if let Some(more) = self.refused_log.check(now) {
                    tracing::warn!(%peer, limit = self.config.max_connections_per_peer, more, "connection limit of the peer address reached: closing a new connection ({more} more refused since the last report)");
                }
                self.mailbox.stats.refused.fetch_add(1, Ordering::Relaxed);
                return;
            }
            *n += 1;
        }
        let _ = stream.set_nodelay(true);
        let params = TransportParams { local_addr: local, peer_addr: peer, port_id: self.config.port_id };
        let mut engine = self.target.accept(params, now);
        if self.handing_over() {
            // Accepted just before accepting stopped: handed over with the others.
            engine.begin_handover();
        }
        let conn = self.new_conn(key, stream, peer_ip, engine);
        let inserted = self.conns.insert(conn);
        debug_assert_eq!(inserted, Some(key));
        self.mailbox.stats.connections.store(self.conns.len(), Ordering::Relaxed);
        self.mailbox.stats.accepted.fetch_add(1, Ordering::Relaxed);
        self.arm_recv(key);
        self.after_engine(key, now); // arms the connect timeout
    }

    /// A connection for slab key `key`, its engine's notifier waking this worker through the mailbox.
    fn new_conn(&self, key: Key, stream: TcpStream, peer_ip: IpAddr, mut engine: Connection) -> Box<Conn> {
        let woken = Arc::new(AtomicBool::new(false));
        let (flag, mailbox) = (woken.clone(), self.mailbox.clone());
        engine.set_notifier(Arc::new(move || {
            if !flag.swap(true, Ordering::AcqRel) {
                mailbox.woken.lock().push(key.to_u64());
                mailbox.signal();
            }
        }));
        Box::new(Conn::new(stream, peer_ip, engine, woken))
    }

    /// Gives receive buffers whose decoded PDUs are gone back to the kernel, and receives again on
    /// connections that ran out of them.
    fn reclaim_buffers(&mut self) {
        self.bufs.reclaim();
        if self.starved.is_empty() || self.bufs.held() >= usize::from(self.bufs.entries()) {
            return;
        }
        let mut starved = std::mem::take(&mut self.starved);
        for key in starved.drain(..) {
            if let Some(c) = self.conns.get_mut(key) {
                c.rx.starved = false;
            }
            self.arm_recv(key);
        }
        self.starved = starved;
    }

    /// Arms the connection's receive: the multishot one in ring mode, the next placed one in direct
    /// mode.
    fn arm_recv(&mut self, key: Key) {
        if self.rx_frozen() {
            return;
        }
        let Some(c) = self.conns.get_mut(key) else { return };
        if c.rx.armed || c.rx.paused || c.rx.held || c.rx.starved || c.closing || c.dead || c.dormant {
            return;
        }
        let fd = types::Fd(c.stream.as_raw_fd());
        let entry = match &c.rx.mode {
            RxMode::Ring => opcode::RecvMulti::new(fd, BUF_GROUP).build(),
            RxMode::Switching { .. } => return,
            RxMode::Direct(_) => {
                let Some((ptr, len)) = c.rx.direct_target() else { return };
                opcode::Recv::new(fd, ptr, len as u32).build()
            }
        };
        c.rx.armed = true;
        // SAFETY: ring mode receives into the worker's provided buffers, which live as long as its
        // ring; direct mode into the connection's own buffer (`Rx::direct_target`), which nothing
        // touches while `armed`, in a boxed connection that is not freed before the receive ends.
        unsafe { self.push(entry.user_data(key.user_data(KIND_RECV))) };
    }

    /// Decodes received input, one PDU at a time, while the connection's send queue is under its
    /// limit: a burst of small read commands cannot turn into an unbounded pile of responses. Input
    /// left over stays (held) until the peer reads.
    fn feed(&mut self, key: Key, now: Instant) {
        let limit = self.config.max_send_queue_bytes;
        loop {
            let Some(c) = self.conns.get_mut(key) else { return };
            let from_chain = !c.rx.chain.is_empty();
            if c.closing || !c.rx.has_input() {
                break;
            }
            if c.tx.queued_bytes > limit {
                if !c.rx.held {
                    c.rx.held = true;
                    self.mailbox.stats.held.fetch_add(1, Ordering::Relaxed);
                }
                return;
            }
            if c.rx.held {
                c.rx.held = false;
                self.mailbox.stats.held.fetch_sub(1, Ordering::Relaxed);
            }
            let direct = c.rx.is_direct();
            let contended = self.contended();
            let Some(c) = self.conns.get_mut(key) else { return };
            if !from_chain && !direct && !Self::take_budget(c, self.turn, contended) {
                list_once(&mut c.deferred, &mut self.deferred, key);
                return;
            }
            let taken = if from_chain {
                c.engine.handle_input_pdus(&mut c.rx.chain, now, 1)
            } else if direct && !c.rx.direct_pdu_has_data() {
                // No data to carry away: decoded from the placed buffer, which is reused for the
                // next PDU (no allocation per command capsule).
                c.engine.handle_input_pdus(&mut c.rx.buf, now, 1)
            } else if direct {
                // The PDU's placed buffer: its memory moves into the PDU's data (no copy).
                let mut pdu = c.rx.take_data_pdu();
                c.engine.handle_input_pdus(&mut pdu, now, 1)
            } else {
                c.engine.handle_input_pdus(&mut c.rx.buf, now, 1)
            };
            self.drain_events(key, now);
            if direct {
                // Direct mode hands in exactly one PDU; set up the next.
                let max = self.max_pdu(key);
                let Some(c) = self.conns.get_mut(key) else { return };
                c.rx.buf.clear();
                match c.rx.direct_next(max) {
                    // Back in ring mode with the header in the buffer: decode it (the decoder
                    // rejects its length) now, not when more bytes come.
                    DirectStep::Pdu | DirectStep::Fallback => continue,
                    DirectStep::More => break,
                }
            }
            if taken == 0 {
                break;
            }
        }
        self.maybe_go_direct(key, now);
    }

    /// Decodes PDUs straight from a receive buffer (`chunk`): their data are slices of it, and the
    /// buffer goes back to the kernel when the last of them is dropped. A partial PDU already waiting
    /// in the reassembly buffer is completed from the front of `chunk` first (copying only what it
    /// lacks); what cannot be decoded now (a partial PDU at the end, input held back) is copied into
    /// the reassembly buffer.
    fn feed_in_place(&mut self, key: Key, chunk: &mut Bytes, now: Instant) {
        let limit = self.config.max_send_queue_bytes;
        if let Some(c) = self.conns.get(key) {
            // The batch's lookups start together (a hint to the backend).
            let skip = if c.rx.buf.is_empty() { 0 } else { missing(&c.rx.buf).min(chunk.len()) };
            let batch = chunk.get(skip..).unwrap_or_default();
            // Worth it for a batch only (one command waits for its own lookup either way).
            if batch.len() > pdu_len(batch).unwrap_or(0) {
                c.engine.prefetch_input(batch);
            }
        }
        loop {
            let Some(c) = self.conns.get_mut(key) else { return };
            if c.closing || chunk.is_empty() {
                break;
            }
            if !c.rx.chain.is_empty() {
                // A long PDU being assembled from receive buffers (no copy): add what it lacks (or,
                // held back, everything: the chain is the queue then).
                let take = if c.rx.held {
                    chunk.len()
                } else {
                    missing_of(&c.rx.chain, c.rx.chain.total()).min(chunk.len())
                };
                c.rx.chain.push(chunk.split_to(take));
                self.feed(key, now);
                continue;
            }
            if !c.rx.buf.is_empty() {
                // Complete the waiting PDU (or, held back or deferred, just queue everything behind
                // what waits).
                let behind = c.rx.held || c.deferred;
                let plen = pdu_len(&c.rx.buf).unwrap_or(0);
                if !behind && plen >= CHAIN_MIN_PDU && c.rx.buf.len() < plen {
                    // A long PDU whose header waited here (a receive ended inside it): its front
                    // starts the chain, and the rest joins as slices of the receive buffers rather
                    // than being copied behind it.
                    let front = std::mem::take(&mut c.rx.buf).freeze();
                    c.rx.chain.push(front);
                    continue;
                }
                let take = if behind { chunk.len() } else { missing(&c.rx.buf).min(chunk.len()) };
                c.rx.buf.extend_from_slice(chunk.get(..take).unwrap_or_default());
                chunk.advance(take);
                self.mailbox.stats.rx_copied.fetch_add(take as u64, Ordering::Relaxed);
                self.feed(key, now);
                if let Some(c) = self.conns.get_mut(key).filter(|c| c.deferred) {
                    // What is left of the chunk waits behind the deferred input.
                    keep_rest(&mut c.rx.buf, chunk, &self.mailbox.stats);
                    break;
                }
                continue;
            }
            let contended = self.contended();
            let Some(c) = self.conns.get_mut(key) else { return };
            if !Self::take_budget(c, self.turn, contended) {
                // This connection had its share of the turn: the rest waits for the next one (the
                // receive buffer goes back to the kernel now).
                keep_rest(&mut c.rx.buf, chunk, &self.mailbox.stats);
                list_once(&mut c.deferred, &mut self.deferred, key);
                break;
            }
            if c.tx.queued_bytes > limit {
                // Held back: keep the rest for later (the buffer goes back to the kernel now).
                keep_rest(&mut c.rx.buf, chunk, &self.mailbox.stats);
                self.feed(key, now);
                break;
            }
            let taken = c.engine.handle_input_pdus(chunk, now, 1);
            self.drain_events(key, now);
            if taken == 0 {
                // A partial PDU: a long one waits for the rest as slices of the receive buffers
                // (a chain: no copy), a short one in the reassembly buffer.
                if let Some(c) = self.conns.get_mut(key) {
                    if pdu_len(chunk).is_some_and(|plen| plen >= CHAIN_MIN_PDU) {
                        c.rx.chain.push(std::mem::take(chunk));
                    } else {
                        keep_rest(&mut c.rx.buf, chunk, &self.mailbox.stats);
                    }
                }
                chunk.clear();
                break;
            }
        }
        self.maybe_go_direct(key, now);
    }

    /// Counts one PDU against the connection's budget for this turn; false if it is used up.
    /// Other connections' input waits: received in this turn and not handled yet, deferred, or (when
    /// connections shared recent turns) completion work pending in the kernel.
    fn contended(&mut self) -> bool {
        self.recv_left > 0
            || !self.deferred.is_empty()
            || (self.turn.wrapping_sub(self.shared_turn) <= SHARED_TURNS && self.ring.submission().taskrun())
    }

    fn take_budget(c: &mut Conn, turn: u64, contended: bool) -> bool {
        if c.turn != turn {
            c.turn = turn;
            c.turn_pdus = 0;
        }
        if c.turn_pdus >= PDU_BUDGET || (contended && c.turn_pdus >= PDU_SHARE) {
            return false;
        }
        c.turn_pdus += 1;
        true
    }

    /// Deferred connections decode their next round of input (a new turn, a new budget).
    fn run_deferred(&mut self, now: Instant) {
        if self.deferred.is_empty() {
            return;
        }
        let mut list = std::mem::take(&mut self.deferred);
        for key in list.drain(..) {
            let Some(c) = self.conns.get_mut(key) else { continue };
            c.deferred = false;
            self.feed(key, now);
            self.after_engine(key, now);
        }
        if self.deferred.is_empty() {
            self.deferred = list;
        }
    }

    fn max_pdu(&self, key: Key) -> usize {
        self.conns.get(key).map_or(0, |c| c.engine.max_pdu_len())
    }

    /// A live I/O queue of an `O_DIRECT` volume leaves ring mode (once), so its data lands aligned.
    fn maybe_go_direct(&mut self, key: Key, now: Instant) {
        let Some(c) = self.conns.get_mut(key) else { return };
        // A deferred connection has whole PDUs waiting for its next round: switch after them.
        if c.alignment_checked
            || c.closing
            || c.dead
            || c.deferred
            || !matches!(c.rx.mode, RxMode::Ring)
            || !c.rx.chain.is_empty()
        {
            return;
        }
        if c.engine.qid().is_none_or(|q| q == 0) {
            return;
        }
        c.alignment_checked = true;
        let align = c.engine.data_alignment();
        if align <= 1 || c.rx.held || c.rx.paused {
            return;
        }
        c.rx.mode = RxMode::Switching { align };
        if c.rx.armed {
            self.cancel(key.user_data(KIND_RECV));
        } else {
            self.finish_switch(key, now);
        }
    }

    /// The multishot receive has ended: start direct mode with what ring mode left over.
    fn finish_switch(&mut self, key: Key, now: Instant) {
        let max = self.max_pdu(key);
        let Some(c) = self.conns.get_mut(key) else { return };
        let RxMode::Switching { align } = c.rx.mode else { return };
        match c.rx.start_direct(align, max, self.read_pool.clone()) {
            DirectStep::Pdu => self.feed(key, now),
            DirectStep::More | DirectStep::Fallback => {}
        }
        self.arm_recv(key);
    }

    fn on_recv(&mut self, key: Key, res: i32, flags: u32, now: Instant) {
        let bid = cqueue::buffer_select(flags);
        let more = cqueue::more(flags);
        let Some(c) = self.conns.get_mut(key) else {
            if let Some(bid) = bid {
                self.bufs.recycle(bid);
            }
            return;
        };
        if !more {
            c.rx.armed = false;
        }
        let previous = c.last_input.replace(now);
        if res > 0
            && previous
                .is_some_and(|p| now.saturating_duration_since(p) < self.config.poll_window * HOT_WINDOWS)
        {
            // A hot connection: keep polling for a while before blocking.
            self.spin_until = Some(now + self.window);
        }
        if res > 0 {
            c.busy = previous.is_some_and(|p| now.saturating_duration_since(p) < TRIM_AFTER);
        }
        let direct = c.rx.is_direct();
        if res == -libc::ENOBUFS && c.dormant {
            // A quiet queue's receive found no buffer: it waits for one with the others.
            if let Some(q) = self.quiet.as_mut() {
                q.ready.push_back(key);
            }
        } else if res == -libc::ENOBUFS {
            // Every receive buffer is out: receive again once some came back (end of this turn, or
            // when the writes holding them are done).
            c.rx.starved = true;
            self.starved.push(key);
        } else if res == -libc::ECANCELED {
            // Paused because the peer does not read, or leaving ring mode.
        } else if res <= 0 {
            c.dead = res < 0;
            c.engine.handle_peer_closed();
        } else if direct {
            let max = c.engine.max_pdu_len();
            // SAFETY: this completion is the direct receive armed in `arm_recv` at the target
            // `direct_target` gave, and it wrote `res` bytes there; nothing touched the buffer since.
            match unsafe { c.rx.direct_received(res as usize, max) } {
                DirectStep::Pdu | DirectStep::Fallback => self.feed(key, now),
                DirectStep::More => {}
            }
        } else if let Some(bid) = bid {
            // Decode in place from the receive buffer, unless half the buffers are already out that
            // way (writes in flight hold theirs until the backend is done) or input is held back.
            if self.bufs.held() < usize::from(self.bufs.entries()) / 2 && !c.rx.held {
                let mut chunk = self.bufs.take(bid, res as usize);
                self.feed_in_place(key, &mut chunk, now);
            } else {
                let bytes = self.bufs.get(bid, res as usize);
                if c.rx.chain.is_empty() {
                    c.rx.buf.extend_from_slice(bytes);
                } else {
                    // Behind a PDU being assembled in the chain: keep the order.
                    c.rx.chain.push(Bytes::copy_from_slice(bytes));
                }
                self.mailbox.stats.rx_copied.fetch_add(res as u64, Ordering::Relaxed);
                self.bufs.recycle(bid);
                self.feed(key, now);
            }
            if let Some(c) = self.conns.get_mut(key) {
                if c.rx.held
                    && c.rx.buf.len() + c.rx.chain.total() > RX_HOLD_BYTES
                    && c.rx.armed
                    && !c.rx.paused
                {
                    // Input keeps piling up while the peer does not read: stop receiving.
                    c.rx.paused = true;
                    self.cancel(key.user_data(KIND_RECV));
                }
            }
        }
        if let Some(c) = self.conns.get_mut(key) {
            if !more && matches!(c.rx.mode, RxMode::Switching { .. }) && !c.rx.armed {
                self.finish_switch(key, now);
            }
        }
        self.after_engine(key, now);
        if res > 0 {
            // A receive that filled its buffer may have left input in the socket, which the
            // edge-triggered set would not report again: such a queue goes back to the ring.
            let full = res as usize >= self.config.recv_buffer_bytes.max(4096);
            self.update_quiet(key, previous.filter(|_| !full), now);
        }
        self.arm_recv(key);
    }

    /// An admin queue whose input came a while after the previous one leaves the ring for the
    /// readiness set of quiet queues; a quiet one whose input follows the previous closely comes
    /// back (see [`super::ServerConfig::admin_batch_window`]).
    fn update_quiet(&mut self, key: Key, previous: Option<Instant>, now: Instant) {
        let handing_over = self.handing_over();
        let Some(q) = self.quiet.as_mut() else { return };
        let Some(c) = self.conns.get_mut(key) else { return };
        // No previous input (or a full receive): not quiet.
        let sparse = previous.is_some_and(|p| now.saturating_duration_since(p) >= QUIET_GAP);
        if c.dormant {
            if !sparse || c.closing || c.dead {
                c.dormant = false;
                let _ = rustix::event::epoll::delete(&q.epoll, &c.stream);
                q.count -= 1;
                self.mailbox.stats.dormant.store(q.count, Ordering::Relaxed);
            }
            return;
        }
        let eligible = sparse
            && !handing_over
            && c.engine.qid() == Some(0)
            && !c.closing
            && !c.dead
            && !c.deferred
            && matches!(c.rx.mode, RxMode::Ring)
            && c.rx.buf.is_empty()
            && c.rx.chain.is_empty()
            && !c.rx.held
            && !c.rx.paused
            && !c.rx.starved;
        if !eligible {
            return;
        }
        // Edge-triggered: each arrival is reported once, so a window takes every ready queue in a
        // few calls without seeing the same ones again (each receive takes all a quiet queue has).
        let flags = rustix::event::epoll::EventFlags::IN
            | rustix::event::epoll::EventFlags::RDHUP
            | rustix::event::epoll::EventFlags::ET;
        let data = rustix::event::epoll::EventData::new_u64(key.to_u64());
        if rustix::event::epoll::add(&q.epoll, &c.stream, data, flags).is_err() {
            return; // stays on the ring
        }
        c.dormant = true;
        q.count += 1;
        self.mailbox.stats.dormant.store(q.count, Ordering::Relaxed);
        // The multishot receive ends (its last completion says ECANCELED); input from now on waits
        // in the set.
        if c.rx.armed {
            self.cancel(key.user_data(KIND_RECV));
        }
        self.arm_quiet();
    }

    /// Puts the poll of the quiet set and its linked batch-window timer in the ring, if there are
    /// quiet queues and they are not there yet. Both go in together or not at all (a link cannot
    /// span two submissions); without room now, the next loop turn tries again, and the worker does
    /// not sleep longer than a window meanwhile (see `wait`).
    fn arm_quiet(&mut self) {
        let Some(q) = self.quiet.as_mut() else { return };
        if q.armed || q.count == 0 {
            return;
        }
        let ud = u64::from(KIND_QUIET) << 56;
        let poll = opcode::PollAdd::new(types::Fd(q.epoll.as_raw_fd()), libc::POLLIN as u32)
            .build()
            .flags(squeue::Flags::IO_LINK | squeue::Flags::SKIP_SUCCESS)
            .user_data(ud | QUIET_POLL);
        let timer = opcode::Timeout::new(&*q.window).build().user_data(ud | QUIET_TIMER);
        // SAFETY: the poll touches no buffer of ours and the epoll descriptor lives in `quiet`,
        // which outlives the ring; the timer reads `window`, a Box in `quiet`, never moved or
        // freed while the worker runs.
        if unsafe { self.ring.submission().push_multiple(&[poll, timer]) }.is_ok() {
            q.armed = true;
        }
    }

    /// Receives once on quiet queues that have input, as many as half the free receive buffers
    /// allow (the receives complete at once, in this turn's submission; the rest wait for the
    /// next turn).
    fn receive_quiet(&mut self) {
        if self.rx_frozen() {
            return;
        }
        let Some(q) = self.quiet.as_mut() else { return };
        if q.ready.is_empty() {
            return;
        }
        let free = usize::from(self.bufs.entries()).saturating_sub(self.bufs.held());
        let mut budget = free / 2;
        let mut received = 0u64;
        while budget > 0 {
            let Some(key) = q.ready.pop_front() else { break };
            let Some(c) = self.conns.get_mut(key) else { continue };
            if !c.dormant || c.closing || c.dead {
                continue;
            }
            if c.rx.armed || c.rx.starved {
                // Its receive is in flight, or waits for buffers: either way it leaves the quiet
                // set (the ring's receive takes what arrived).
                c.dormant = false;
                let _ = rustix::event::epoll::delete(&q.epoll, &c.stream);
                q.count -= 1;
                continue;
            }
            let entry = opcode::Recv::new(types::Fd(c.stream.as_raw_fd()), std::ptr::null_mut(), 0)
                .buf_group(BUF_GROUP)
                .build()
                .flags(squeue::Flags::BUFFER_SELECT)
                .user_data(key.user_data(KIND_RECV));
            c.rx.armed = true;
            budget -= 1;
            received += 1;
            // SAFETY: the receive writes into one of the worker's provided buffers, which live as
            // long as its ring.
            if unsafe { self.ring.submission().push(&entry) }.is_err() {
                self.backlog.push_back(entry);
            }
        }
        let stats = &self.mailbox.stats;
        stats.batched_inputs.fetch_add(received, Ordering::Relaxed);
        stats.dormant.store(q.count, Ordering::Relaxed);
    }

    /// The batch window after quiet queues had input ended: takes every quiet queue that has input
    /// from the set, receives on them, and waits for the next window.
    fn on_quiet(&mut self, user_data: u64, _now: Instant) {
        if user_data & 0xff != QUIET_TIMER {
            return; // a failed poll: its timer completes too (cancelled), and re-arms
        }
        let Some(q) = self.quiet.as_mut() else { return };
        q.armed = false;
        let mut events = std::mem::take(&mut q.events);
        let zero = rustix::event::Timespec { tv_sec: 0, tv_nsec: 0 };
        loop {
            events.clear();
            events.reserve(QUIET_BATCH);
            let Some(q) = self.quiet.as_mut() else { return };
            let spare = rustix::buffer::spare_capacity(&mut events);
            let got = rustix::event::epoll::wait(&q.epoll, spare, Some(&zero)).unwrap_or(0);
            q.ready.extend(events.iter().take(got).map(|ev| Key::from_u64(ev.data.u64())));
            if got < events.capacity() || got == 0 {
                break;
            }
        }
        self.mailbox.stats.batch_wakeups.fetch_add(1, Ordering::Relaxed);
        if let Some(q) = self.quiet.as_mut() {
            q.events = events; // kept for the next window (QUIET_BATCH entries, one per worker)
        }
        self.receive_quiet();
        self.arm_quiet();
    }

    fn on_send(&mut self, key: Key, res: i32, now: Instant) {
        let Some(c) = self.conns.get_mut(key) else { return };
        if res < 0 {
            c.dead = true;
            c.tx.fail();
            c.engine.handle_peer_closed();
        } else {
            c.tx.complete(res as usize);
        }
        // Input held back because of a full send queue: decode it now, and receive again.
        if c.rx.held {
            self.feed(key, now);
        }
        let resume = self.conns.get_mut(key).is_some_and(|c| {
            let go = (c.rx.paused || c.rx.is_direct()) && !c.rx.held;
            if c.rx.paused && go {
                c.rx.paused = false;
            }
            go
        });
        self.after_engine(key, now);
        if resume {
            self.arm_recv(key);
        }
    }

    fn on_wake(&mut self, now: Instant) {
        self.arm_wake();
        self.on_handover_cmds(now);
        let woken = std::mem::take(&mut *self.mailbox.woken.lock());
        if matches!(self.handover, handover::Phase::Exported) {
            // The connections' state is written down: an event delivered now would be delivered
            // again by the process taking them over. Kept for a resume.
            self.woken_later.extend(woken);
            return;
        }
        for key in woken {
            let key = Key::from_u64(key);
            let Some(c) = self.conns.get_mut(key) else { continue };
            c.woken.store(false, Ordering::Release);
            c.engine.handle_wakeup(now);
            self.after_engine(key, now);
        }
        let done = std::mem::take(&mut *self.mailbox.completions.lock());
        for (token, result) in done {
            let Some(p) = self.pending.remove(Key::from_u64(token.to_raw())) else { continue };
            if let Some(c) = self.conns.get_mut(p.conn) {
                c.engine.complete_io(p.token, result, now);
                self.after_engine(p.conn, now);
            }
        }
    }

    /// Carries out the engine's events, keeps the connection's timer current, lists it for sending,
    /// and frees it once it is closed and quiet.
    fn after_engine(&mut self, key: Key, now: Instant) {
        self.drain_events(key, now);
        if let Some(c) = self.conns.get_mut(key) {
            let t = c.engine.poll_timeout();
            if t != c.timer {
                c.timer = t;
                // A later deadline keeps the entry it has (no heap work per keep-alive).
                if let Some(t) = t.filter(|&t| c.queued.is_none_or(|q| t < q)) {
                    c.queued = Some(t);
                    self.timers.push(Reverse((t, key)));
                }
            }
            if c.tx.ready() {
                list_once(&mut c.dirty, &mut self.dirty, key);
            }
            list_once(&mut c.active, &mut self.active, key);
        }
        self.maybe_free(key);
    }

    /// Takes the engine's events: queues transmits, starts backend I/O (whose immediate completions
    /// may produce more events).
    fn drain_events(&mut self, key: Key, now: Instant) {
        loop {
            let Some(c) = self.conns.get_mut(key) else { return };
            let mut ios = std::mem::take(&mut self.io_scratch);
            while let Some(ev) = c.engine.poll_event() {
                match ev {
                    Event::Transmit(pdu) => {
                        if !c.dead {
                            c.tx.push(pdu);
                        }
                    }
                    Event::Io(req) => ios.push(req),
                    Event::Close(reason) => {
                        tracing::debug!(?reason, "connection closed");
                        c.closing = true;
                    }
                    // An event of a newer engine this driver does not know: the connection's
                    // state can no longer be kept right, so it ends.
                    other => {
                        if let Some(more) = self.event_log.check(now) {
                            tracing::warn!(event = ?other, more, "unknown engine event: closing the connection ({more} more since the last report)");
                        }
                        c.closing = true;
                    }
                }
            }
            if ios.is_empty() {
                self.io_scratch = ios;
                return;
            }
            for req in ios.drain(..) {
                self.start_io(key, req, now);
            }
            self.io_scratch = ios;
        }
    }

    /// Runs a backend request: on the ring for file-descriptor backends, otherwise through the
    /// backend itself.
    fn start_io(&mut self, conn: Key, req: IoRequest, now: Instant) {
        let ring = req.namespace.backend().raw_device().is_some();
        if ring {
            self.join_ring_group(conn, &req.namespace);
        }
        let contended = self.disk_contended_until.is_some_and(|t| now < t);
        let (floor, total) = (self.config.disk_share, self.disk.len() + self.disk_waiting_total);
        if let Some(c) = self.conns.get_mut(conn) {
            let held = contended && c.disk_inflight >= disk_limit(floor, c.group_demand(), total);
            if ring && (!c.disk_waiting.is_empty() || held) {
                c.disk_waiting.push_back(req);
                c.group_add(true);
                self.disk_waiting_total += 1;
                self.mailbox.stats.disk_waits.fetch_add(1, Ordering::Relaxed);
                return;
            }
        }
        self.start_io_now(conn, req, now);
    }

    /// Puts the connection in the ring group of the volume of its first ring request.
    fn join_ring_group(&mut self, conn: Key, namespace: &Arc<Namespace>) {
        let Some(c) = self.conns.get_mut(conn) else { return };
        if c.ring_group.is_some() {
            return;
        }
        if self.ring_groups.len() >= 2 * self.conns.len() + 64 {
            // Groups whose connections are all gone (bounded: the map stays within a few times
            // the number of connections).
            self.ring_groups.retain(|_, g| Arc::strong_count(g) > 1);
        }
        let key = Arc::as_ptr(namespace) as usize;
        let group = self.ring_groups.entry(key).or_default().clone();
        if let Some(c) = self.conns.get_mut(conn) {
            // Its operations so far (none on the ring before its first ring request).
            group.fetch_add(c.disk_inflight + c.disk_waiting.len(), Ordering::Relaxed);
            c.ring_group = Some(group);
        }
    }

    /// Starts the connection's waiting backend requests while its share of the ring allows.
    fn start_waiting(&mut self, conn: Key, now: Instant) {
        let floor = self.config.disk_share;
        loop {
            let contended = self.disk_contended_until.is_some_and(|t| now < t);
            let total = self.disk.len() + self.disk_waiting_total;
            let Some(c) = self.conns.get_mut(conn) else { return };
            if c.disk_waiting.is_empty()
                || (contended && c.disk_inflight >= disk_limit(floor, c.group_demand(), total))
            {
                return;
            }
            let Some(req) = c.disk_waiting.pop_front() else { return };
            c.group_add(false);
            self.disk_waiting_total -= 1;
            self.start_io_now(conn, req, now);
        }
    }

    fn start_io_now(&mut self, conn: Key, req: IoRequest, now: Instant) {
        let IoRequest { token, namespace, op } = req;
        let refused = || self.no_fallocate.contains(&(Arc::as_ptr(&namespace) as usize));
        let plan = match namespace.backend().raw_device() {
            None => Plan::Backend(op),
            Some(_) if matches!(op, IoOp::WriteZeroes { .. } | IoOp::Discard { .. }) && refused() => {
                Plan::Backend(op)
            }
            Some(dev) => disk::plan(op, &dev, &self.read_pool),
        };
        match plan {
            Plan::Backend(op) if namespace.backend().raw_device().is_some() => {
                self.submit_to_pool(conn, token, namespace, op, now);
            }
            Plan::Backend(op) => self.submit_to_backend(conn, token, &namespace, op, now),
            Plan::Fail(why) => {
                self.fail_io(conn, token, io::Error::new(io::ErrorKind::OutOfMemory, why), now)
            }
            Plan::Ring(kind, sqes) => {
                if matches!(kind, disk::DiskKind::Write { _bounce: Some(_), .. }) {
                    self.mailbox.stats.bounced.fetch_add(1, Ordering::Relaxed);
                }
                let Some(key) = self.disk.insert(DiskOp { conn, token, namespace, kind }) else {
                    self.fail_io(conn, token, io::Error::other("too many operations in flight"), now);
                    return;
                };
                let total = self.disk.len() + self.disk_waiting_total;
                if let Some(c) = self.conns.get_mut(conn) {
                    c.disk_inflight += 1;
                    c.group_add(true);
                    if total > c.group_demand() {
                        // A connection to another volume has operations on the ring too.
                        self.disk_contended_until = Some(now + DISK_CONTENTION);
                    }
                }
                for e in sqes {
                    // SAFETY: the entries point into the operation's heap buffers (read buffer,
                    // write data or bounce buffer, iovecs), owned by the `DiskOp` in `self.disk`
                    // until its last completion is reaped; the namespace it holds keeps the fd open.
                    unsafe { self.push(e.user_data(key.user_data(KIND_DISK))) };
                }
            }
        }
    }

    /// Hands a request to the backend's own `submit`: immediate backends answer at once, others
    /// complete later from any thread through the mailbox.
    fn submit_to_backend(
        &mut self,
        conn: Key,
        token: IoToken,
        namespace: &Arc<Namespace>,
        op: IoOp,
        now: Instant,
    ) {
        let Some(slot) = self.pending.next_key() else {
            self.fail_io(conn, token, io::Error::other("too many operations in flight"), now);
            return;
        };
        let completer = Completer::new(IoToken::from_raw(slot.to_u64()), self.mailbox.clone());
        match namespace.backend().submit(op, completer) {
            Submitted::Done(result) => {
                if let Some(c) = self.conns.get_mut(conn) {
                    c.engine.complete_io(token, result, now);
                }
            }
            Submitted::Pending => {
                let inserted = self.pending.insert(PendingIo { conn, token });
                debug_assert_eq!(inserted, Some(slot));
            }
        }
    }

    /// Runs a request of a file-descriptor backend that the ring cannot do (its synchronous path may
    /// take long: zero writes over a range, `BLKDISCARD`) on the blocking pool; the result comes back
    /// through the mailbox like an asynchronous backend's.
    fn submit_to_pool(
        &mut self,
        conn: Key,
        token: IoToken,
        namespace: Arc<Namespace>,
        op: IoOp,
        now: Instant,
    ) {
        let Some(slot) = self.pending.insert(PendingIo { conn, token }) else {
            self.fail_io(conn, token, io::Error::other("too many operations in flight"), now);
            return;
        };
        self.mailbox.stats.pool_requests.fetch_add(1, Ordering::Relaxed);
        let mailbox = self.mailbox.clone();
        let key = IoToken::from_raw(slot.to_u64());
        let job = Box::new(move || {
            let completer = Completer::new(key, mailbox.clone());
            if let Submitted::Done(result) = namespace.backend().submit(op, completer) {
                nvmeof_target::CompletionSink::complete(mailbox.as_ref(), key, result);
            }
        });
        if self.blocking.run(job).is_err() {
            // The pool is closed only after the workers ended: not reached while serving.
            let Some(PendingIo { conn, token }) = self.pending.remove(slot) else { return };
            self.fail_io(conn, token, io::Error::other("the server is shutting down"), now);
        }
    }

    /// Completes a request that could not be started with error `e`.
    fn fail_io(&mut self, conn: Key, token: IoToken, e: io::Error, now: Instant) {
        if let Some(c) = self.conns.get_mut(conn) {
            c.engine.complete_io(token, Err(IoError::Io(e)), now);
        }
    }

    fn on_disk(&mut self, key: Key, res: i32, now: Instant) {
        let Some(op) = self.disk.get_mut(key) else { return };
        let discard = matches!(op.kind, disk::DiskKind::Discard { .. });
        let outcome = disk::on_completion(&mut op.kind, res);
        if matches!(outcome, Outcome::Pending) {
            return;
        }
        let Some(DiskOp { conn, token, namespace, .. }) = self.disk.remove(key) else { return };
        if let Some(c) = self.conns.get_mut(conn) {
            c.disk_inflight = c.disk_inflight.saturating_sub(1);
            c.group_add(false);
        }
        let result = match outcome {
            Outcome::Pending => return,
            Outcome::Done(result) => {
                if discard && result.is_ok() {
                    self.mailbox.stats.ring_discards.fetch_add(1, Ordering::Relaxed);
                }
                result
            }
            Outcome::Refused(op) => {
                // The device refused a mode it declared (fallocate, the discard command): the
                // backend does it its way, and from now on without trying the ring first.
                self.mailbox.stats.ring_refusals.fetch_add(1, Ordering::Relaxed);
                if self.no_fallocate.len() > 4096 {
                    self.no_fallocate.clear(); // bounded; entries of unloaded namespaces go too
                }
                if self.no_fallocate.insert(Arc::as_ptr(&namespace) as usize) {
                    tracing::warn!(
                        nsid = namespace.nsid(),
                        "the device refused fallocate or the discard command although it declared it; using the backend's path"
                    );
                }
                self.submit_to_pool(conn, token, namespace, op, now);
                self.start_waiting(conn, now);
                self.after_engine(conn, now);
                return;
            }
        };
        if let Some(c) = self.conns.get_mut(conn) {
            c.engine.complete_io(token, result, now);
        }
        self.start_waiting(conn, now);
        self.after_engine(conn, now);
    }

    /// When one connection alone has output this turn, and it is one command's response (at most
    /// [`SEND_ALONE_PDUS`] PDUs: a host waiting for each response, queue depth 1), and the worker
    /// is going to poll (a hot connection), sends it with a non-blocking `sendmsg` right away
    /// instead of through the ring: one system call either way, minus the ring's send operation and
    /// the completion the next turn would handle. A larger batch goes through the ring, with the
    /// system call the worker makes anyway to receive more; so does what the socket does not take
    /// at once, and the output of a worker about to sleep (it submits with the call it sleeps in).
    fn send_alone(&mut self, now: Instant) {
        // A worker about to sleep submits the ring write with the system call it sleeps in (sparse
        // traffic such as keep-alives): one system call, not two.
        if self.spin_until.is_none() {
            return;
        }
        let [key] = self.dirty[..] else { return };
        let Some(c) = self.conns.get_mut(key) else { return };
        if c.dead || c.tx.pdus() > SEND_ALONE_PDUS {
            return;
        }
        self.dirty.clear();
        c.dirty = false;
        let Some((iov, n)) = c.tx.prepare() else { return };
        // SAFETY: a zeroed `msghdr` is valid (no name, no control data); it points at the `n`
        // iovecs `prepare` just built, which stay valid (with the `Bytes` they point into) until the
        // send is completed or failed below or the ring's write of them completes.
        let sent = unsafe {
            let mut msg: libc::msghdr = std::mem::zeroed();
            msg.msg_iov = iov.cast_mut();
            msg.msg_iovlen = n as usize;
            libc::sendmsg(c.stream.as_raw_fd(), &msg, libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL)
        };
        if sent >= 0 {
            // Handled as the ring's completion would be; anything left is listed again and goes
            // through the ring in `flush_sends`.
            self.on_send(key, i32::try_from(sent).unwrap_or(i32::MAX), now);
            return;
        }
        let err = io::Error::last_os_error().raw_os_error().unwrap_or(libc::EIO);
        if err == libc::EAGAIN || err == libc::EINTR {
            // The socket is full: the ring waits for room (the iovecs are still the ones prepared).
            let fd = c.stream.as_raw_fd();
            // SAFETY: `iov` and `n` come from this connection's `prepare` above; the failed
            // `sendmsg` left the send queue as it was.
            unsafe { self.push_writev(key, fd, iov, n) };
        } else {
            self.on_send(key, -err, now);
        }
    }

    /// Starts a `writev` on every connection that has output and none in flight.
    fn flush_sends(&mut self) {
        let mut dirty = std::mem::take(&mut self.dirty);
        for key in dirty.drain(..) {
            self.start_send(key);
        }
        self.dirty = dirty;
    }

    fn start_send(&mut self, key: Key) {
        let Some(c) = self.conns.get_mut(key) else { return };
        c.dirty = false;
        if c.dead {
            return;
        }
        let Some((iov, n)) = c.tx.prepare() else { return };
        let fd = c.stream.as_raw_fd();
        // SAFETY: `iov` and `n` come from this connection's `prepare` just above.
        unsafe { self.push_writev(key, fd, iov, n) };
    }

    /// Queues the ring write of the `n` iovecs at `iov` to connection `key`'s socket `fd`.
    ///
    /// # Safety
    /// `iov` and `n` must be what [`Tx::prepare`] of that connection just returned: the iovecs
    /// and the bytes they point to (the PDUs in the send queue's `sending`, reference-counted
    /// `Bytes` that nothing frees while they are held there) stay untouched until this write
    /// completes (`Tx::inflight`), and the connection is not freed before then.
    unsafe fn push_writev(&mut self, key: Key, fd: libc::c_int, iov: *const libc::iovec, n: u32) {
        let e = opcode::Writev::new(types::Fd(fd), iov, n).build().user_data(key.user_data(KIND_SEND));
        // SAFETY: the caller's guarantee above is what `push` needs of the entry's buffers.
        unsafe { self.push(e) };
    }

    fn maybe_free(&mut self, key: Key) {
        let Some(c) = self.conns.get_mut(key) else { return };
        if !c.closing {
            return;
        }
        let flushed = c.dead || c.tx.is_empty();
        if flushed && c.rx.armed {
            // Ends the receive still in flight (it completes with 0), after which we come back here.
            let _ = c.stream.shutdown(std::net::Shutdown::Both);
            c.dead = true;
            return;
        }
        if flushed && !c.rx.armed && !c.tx.inflight && c.engine.is_drained() {
            let Some(c) = self.conns.remove(key) else { return };
            // A drained connection has nothing on the ring or waiting for it; should the engine
            // ever let one go with some, they no longer count against the other connections.
            self.disk_waiting_total = self.disk_waiting_total.saturating_sub(c.disk_waiting.len());
            c.group_change(0, c.disk_inflight + c.disk_waiting.len());
            if c.dormant {
                if let Some(q) = self.quiet.as_mut() {
                    let _ = rustix::event::epoll::delete(&q.epoll, &c.stream);
                    q.count -= 1;
                    self.mailbox.stats.dormant.store(q.count, Ordering::Relaxed);
                }
            }
            if c.rx.held {
                self.mailbox.stats.held.fetch_sub(1, Ordering::Relaxed);
            }
            self.mailbox.stats.connections.store(self.conns.len(), Ordering::Relaxed);
            let mut peers = self.peers.lock();
            if let Some(n) = peers.get_mut(&c.peer_ip) {
                *n = n.saturating_sub(1);
                if *n == 0 {
                    peers.remove(&c.peer_ip);
                }
            }
        }
    }

    /// An accept failed for lack of file descriptors or memory: new connections wait in the
    /// listen backlog while accepting pauses for [`ACCEPT_PAUSE`] (retrying at once would fail the
    /// same way, in a loop), and the failures are reported at most once per [`ACCEPT_REPORT_EVERY`].
    fn accept_exhausted(&mut self, errno: i32, flags: u32, now: Instant) {
        if cqueue::more(flags) {
            // The multishot accept is still armed: stop it; its last completion comes back as
            // cancelled and is not re-armed while paused.
            self.cancel(u64::from(KIND_ACCEPT) << 56);
        } else {
            self.accept_armed = false;
        }
        self.accept_paused_until = Some(now + ACCEPT_PAUSE);
        self.accept_failures += 1;
        self.mailbox.stats.accept_failures.fetch_add(1, Ordering::Relaxed);
        let due = self.accept_reported_at.is_none_or(|at| now.duration_since(at) >= ACCEPT_REPORT_EVERY);
        if due {
            let hint = if errno == libc::EMFILE {
                " (the process's open-file limit: raise it, e.g. LimitNOFILE= in a systemd unit or ulimit -n)"
            } else {
                ""
            };
            tracing::warn!(
                error = %io::Error::from_raw_os_error(errno),
                failures = self.accept_failures,
                connections = self.conns.len(),
                "cannot accept new connections{hint}; pausing accepts for {} ms at a time",
                ACCEPT_PAUSE.as_millis()
            );
            self.accept_failures = 0;
            self.accept_reported_at = Some(now);
        }
    }

    /// Accepting again once a pause is over.
    fn resume_accept(&mut self, now: Instant) {
        if let Some(until) = self.accept_paused_until {
            if now >= until {
                self.accept_paused_until = None;
                if self.accepting && !self.accept_armed {
                    self.arm_accept();
                }
            }
        }
    }

    /// Stops accepting and closes every connection (the engine tears down their controllers; hosts
    /// reconnect to the next server).
    #[allow(clippy::disallowed_methods)] // the driver owns the clock
    fn begin_shutdown(&mut self) {
        self.accepting = false;
        self.cancel(u64::from(KIND_ACCEPT) << 56);
        let now = Instant::now();
        let keys: Vec<Key> = self.conns.keys().collect();
        for key in keys {
            if let Some(c) = self.conns.get_mut(key) {
                c.engine.handle_peer_closed();
            }
            self.after_engine(key, now);
        }
        self.flush_sends();
    }
}

/// A ring with deferred, batched completion work where the kernel supports it (6.1+), falling back
/// to cooperative task running, then to a plain ring.
fn new_ring(entries: u32) -> io::Result<IoUring> {
    let cq = entries.saturating_mul(4);
    let attempts: [fn(&mut io_uring::Builder); 3] = [
        |b| {
            b.setup_single_issuer().setup_defer_taskrun().setup_taskrun_flag();
        },
        |b| {
            b.setup_coop_taskrun().setup_taskrun_flag();
        },
        |_| {},
    ];
    let mut last = None;
    for setup in attempts {
        let mut builder = IoUring::builder();
        builder.setup_submit_all().setup_cqsize(cq);
        setup(&mut builder);
        match builder.build(entries) {
            Ok(ring) => return Ok(ring),
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => last = Some(e),
            Err(e) => return Err(e),
        }
    }
    Err(last.unwrap_or_else(|| io::Error::other("cannot create an io_uring")))
}

fn timespec(d: Duration) -> types::Timespec {
    types::Timespec::new().sec(d.as_secs()).nsec(d.subsec_nanos())
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::{disk_limit, keep_burst_memory, next_window, TRIM_AFTER};

    #[test]
    fn the_poll_window_grows_while_sleeps_end_soon_and_resets_after_a_pause() {
        let base = Duration::from_micros(50);
        let us = Duration::from_micros;
        // Woken 30 µs after giving up: poll twice as long next time, up to four windows.
        assert_eq!(next_window(base, base, us(30)), us(100));
        assert_eq!(next_window(us(100), base, us(120)), us(200));
        assert_eq!(next_window(us(200), base, us(10)), us(200), "never past four base windows");
        // A sleep of four windows or more: the host paused, back to the base window.
        assert_eq!(next_window(us(200), base, us(200)), base);
        assert_eq!(next_window(us(100), base, Duration::from_secs(3)), base);
        // Polling off stays off.
        assert_eq!(next_window(Duration::ZERO, Duration::ZERO, Duration::ZERO), Duration::ZERO);
    }

    #[test]
    fn only_a_busy_connection_with_recent_input_keeps_its_burst_memory() {
        #[allow(clippy::disallowed_methods)] // a fixed origin for the arithmetic below
        let t0 = std::time::Instant::now();
        let soon = t0 + TRIM_AFTER / 2;
        // Busy host, input half a trim delay ago: kept until a trim delay after that input.
        assert_eq!(keep_burst_memory(true, Some(t0), soon), Some(t0 + TRIM_AFTER));
        // The same input pattern, later: given back.
        assert_eq!(keep_burst_memory(true, Some(t0), t0 + TRIM_AFTER), None);
        // Sparse traffic (a keep-alive now and then) never keeps anything.
        assert_eq!(keep_burst_memory(false, Some(t0), soon), None);
        assert_eq!(keep_burst_memory(true, None, soon), None);
    }

    #[test]
    fn a_deep_queue_next_to_a_shallow_one_keeps_the_floor() {
        // 128 of its own, one request of another tenant.
        assert_eq!(disk_limit(4, 128, 129), 4);
        // The other tenant has nothing on the ring at this moment: still the floor.
        assert_eq!(disk_limit(4, 128, 128), 4);
    }

    #[test]
    fn deep_queues_next_to_each_other_keep_what_the_others_ask_for() {
        // Two tenants asking for 128 each: each may keep 128, so neither is held back.
        assert_eq!(disk_limit(4, 128, 256), 128);
        // Ten queue-depth-1 tenants next to a deep one: it keeps as many as they have together.
        assert_eq!(disk_limit(4, 128, 138), 10);
    }

    #[test]
    fn a_zero_floor_turns_the_limit_off() {
        assert_eq!(disk_limit(0, 128, 129), usize::MAX);
    }
}
