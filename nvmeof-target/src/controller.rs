//! Controllers: the state one host's admin queue and I/O queues share across connections.
//!
//! A controller is created by the admin queue's Fabrics Connect and found again by each I/O queue's
//! Connect (through its subsystem NQN and CNTLID: CNTLIDs are allocated per subsystem). The I/O path touches only atomics here; the mutex guards what the
//! admin path and the target's management calls change (queue bookkeeping, asynchronous events).

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicU16, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use nvmeof_proto::nvme::features::AsyncEvent;
use nvmeof_proto::nvme::registers::{Cc, Csts};
use parking_lot::Mutex;

use crate::subsystem::Subsystem;

/// A callback the engine invokes (from any thread) when something outside a connection happened that
/// the connection must act on: an asynchronous event for the host, or its controller being torn down.
/// The driver answers by calling [`crate::Connection::handle_wakeup`] on the connection's own thread.
pub type Notifier = Arc<dyn Fn() + Send + Sync>;

/// Activity closer than this to the last recorded one is not recorded again (see `touch`).
const TOUCH_GRANULARITY_NS: u64 = 1_000_000;

/// The limit of entries a Changed Namespace List holds before it says "more than 1024 changed".
const CHANGED_NS_LIST_MAX: usize = 1024;

pub(crate) struct Controller {
    pub(crate) cntlid: u16,
    /// `None` for a discovery controller.
    pub(crate) subsystem: Option<Arc<Subsystem>>,
    pub(crate) hostnqn: String,
    pub(crate) hostid: [u8; 16],
    created: Instant,
    kato_ms: AtomicU32,
    /// Nanoseconds after `created` of the last Keep Alive (or, with traffic-based keep alive, any
    /// command on any of the controller's queues).
    last_activity_ns: AtomicU64,
    cc: AtomicU32,
    csts: AtomicU32,
    /// Bumped when the host disables the controller (CC.EN 1 → 0): I/O queues of an older generation
    /// are gone.
    enable_generation: AtomicU32,
    io_queues_granted: AtomicU16,
    async_event_config: AtomicU32,
    dead: AtomicBool,
    /// Backend requests handed to drivers and not yet completed, across all the controller's queues
    /// (also after they closed).
    outstanding_io: AtomicUsize,
    /// Namespaces taken away from the host (prompt detach, see `detach.rs`).
    pub(crate) detach: crate::detach::DetachState,
    inner: Mutex<Inner>,
}

#[derive(Default)]
struct Inner {
    /// I/O queue ID → the connection serving it.
    io_qids: BTreeMap<u16, u64>,
    notifiers: Vec<(u64, Notifier)>,
    admin_connection: Option<u64>,
    events: VecDeque<AsyncEvent>,
    changed_namespaces: BTreeSet<u32>,
    changed_overflow: bool,
}

impl Controller {
    pub(crate) fn new(
        cntlid: u16,
        subsystem: Option<Arc<Subsystem>>,
        hostnqn: String,
        hostid: [u8; 16],
        kato_ms: u32,
        now: Instant,
    ) -> Self {
        Self {
            cntlid,
            subsystem,
            hostnqn,
            hostid,
            created: now,
            kato_ms: AtomicU32::new(kato_ms),
            last_activity_ns: AtomicU64::new(0),
            cc: AtomicU32::new(0),
            csts: AtomicU32::new(0),
            enable_generation: AtomicU32::new(0),
            io_queues_granted: AtomicU16::new(0),
            async_event_config: AtomicU32::new(0),
            dead: AtomicBool::new(false),
            outstanding_io: AtomicUsize::new(0),
            detach: Default::default(),
            inner: Mutex::new(Inner::default()),
        }
    }

    pub(crate) fn is_discovery(&self) -> bool {
        self.subsystem.is_none()
    }

    pub(crate) fn is_dead(&self) -> bool {
        self.dead.load(Ordering::Acquire)
    }

    /// Marks the controller gone and wakes every connection that serves it. Returns false if it was
    /// already dead.
    pub(crate) fn kill(&self) -> bool {
        if self.dead.swap(true, Ordering::AcqRel) {
            return false;
        }
        let notifiers: Vec<Notifier> = self.inner.lock().notifiers.iter().map(|(_, n)| n.clone()).collect();
        for n in notifiers {
            n();
        }
        true
    }

    // ---- keep alive ----

    pub(crate) fn kato(&self) -> Option<Duration> {
        match self.kato_ms.load(Ordering::Relaxed) {
            0 => None,
            ms => Some(Duration::from_millis(u64::from(ms))),
        }
    }

    pub(crate) fn set_kato_ms(&self, ms: u32) {
        self.kato_ms.store(ms, Ordering::Relaxed);
    }

    pub(crate) fn kato_ms(&self) -> u32 {
        self.kato_ms.load(Ordering::Relaxed)
    }

    /// Records host activity (Keep Alive, or any command: traffic-based keep alive).
    pub(crate) fn touch(&self, now: Instant) {
        let ns = u64::try_from(now.saturating_duration_since(self.created).as_nanos()).unwrap_or(u64::MAX);
        // Keep-alive time is counted in seconds: a write per millisecond at most keeps the I/O path
        // from bouncing this cache line between the cores of a controller's queues.
        if ns > self.last_activity_ns.load(Ordering::Relaxed).saturating_add(TOUCH_GRANULARITY_NS) {
            self.last_activity_ns.fetch_max(ns, Ordering::Relaxed);
        }
    }

    /// When the keep-alive timer expires, if it runs.
    pub(crate) fn keep_alive_deadline(&self) -> Option<Instant> {
        let kato = self.kato()?;
        let last = Duration::from_nanos(self.last_activity_ns.load(Ordering::Relaxed));
        Some(self.created + last + kato)
    }

    // ---- registers ----

    pub(crate) fn cc(&self) -> Cc {
        Cc(self.cc.load(Ordering::Acquire))
    }

    pub(crate) fn set_cc(&self, cc: Cc) {
        self.cc.store(cc.0, Ordering::Release);
    }

    pub(crate) fn csts(&self) -> Csts {
        Csts(self.csts.load(Ordering::Acquire))
    }

    pub(crate) fn set_csts(&self, csts: Csts) {
        self.csts.store(csts.0, Ordering::Release);
    }

    pub(crate) fn is_ready(&self) -> bool {
        self.csts().rdy()
    }

    pub(crate) fn enable_generation(&self) -> u32 {
        self.enable_generation.load(Ordering::Acquire)
    }

    // ---- backend requests ----

    pub(crate) fn io_started(&self) {
        self.outstanding_io.fetch_add(1, Ordering::AcqRel);
    }

    pub(crate) fn io_finished(&self) {
        // Saturating: a driver that drops a connection gives up its requests once.
        let _ = self.outstanding_io.fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| n.checked_sub(1));
    }

    pub(crate) fn outstanding_io(&self) -> usize {
        self.outstanding_io.load(Ordering::Acquire)
    }

    /// The host disabled the controller (CC.EN 1 → 0): its I/O queues are deleted and its feature
    /// settings and pending events return to their defaults.
    pub(crate) fn reset(&self) {
        self.enable_generation.fetch_add(1, Ordering::AcqRel);
        self.io_queues_granted.store(0, Ordering::Relaxed);
        self.async_event_config.store(0, Ordering::Relaxed);
        let notifiers: Vec<Notifier> = {
            let mut inner = self.inner.lock();
            inner.io_qids.clear();
            inner.events.clear();
            inner.changed_namespaces.clear();
            inner.changed_overflow = false;
            let admin = inner.admin_connection;
            inner.notifiers.iter().filter(|(id, _)| Some(*id) != admin).map(|(_, n)| n.clone()).collect()
        };
        for n in notifiers {
            n();
        }
    }

    // ---- features ----

    pub(crate) fn io_queues_granted(&self) -> u16 {
        self.io_queues_granted.load(Ordering::Relaxed)
    }

    pub(crate) fn set_io_queues_granted(&self, n: u16) {
        self.io_queues_granted.store(n, Ordering::Relaxed);
    }

    pub(crate) fn async_event_config(&self) -> u32 {
        self.async_event_config.load(Ordering::Relaxed)
    }

    pub(crate) fn set_async_event_config(&self, v: u32) {
        self.async_event_config.store(v, Ordering::Relaxed);
    }

    // ---- connections ----

    /// Registers (or replaces) a connection's notifier.
    pub(crate) fn attach_connection(&self, conn_id: u64, admin: bool, notifier: Option<Notifier>) {
        let mut inner = self.inner.lock();
        if admin {
            inner.admin_connection = Some(conn_id);
        }
        inner.notifiers.retain(|(id, _)| *id != conn_id);
        if let Some(n) = notifier {
            inner.notifiers.push((conn_id, n));
        }
    }

    pub(crate) fn detach_connection(&self, conn_id: u64, qid: u16) {
        let mut inner = self.inner.lock();
        inner.notifiers.retain(|(id, _)| *id != conn_id);
        // Only if the qid is still this connection's (a reset may have handed it to a newer one).
        if qid != 0 && inner.io_qids.get(&qid) == Some(&conn_id) {
            inner.io_qids.remove(&qid);
        }
    }

    /// Claims an I/O queue ID for a connection of enable generation `generation`; false if it is
    /// taken, beyond what was granted, or the controller was torn down or reset meanwhile.
    pub(crate) fn claim_io_queue(&self, qid: u16, conn_id: u64, generation: u32) -> bool {
        if qid == 0 || qid > self.io_queues_granted().max(1) {
            return false;
        }
        let mut inner = self.inner.lock();
        if self.is_dead() || self.enable_generation() != generation || inner.io_qids.contains_key(&qid) {
            return false;
        }
        inner.io_qids.insert(qid, conn_id);
        true
    }

    pub(crate) fn io_queue_count(&self) -> usize {
        self.inner.lock().io_qids.len()
    }

    // ---- asynchronous events ----

    /// Queues an event for the host (if it enabled that kind) and wakes the admin connection.
    pub(crate) fn raise_event(&self, event: AsyncEvent, enabled_by: u32, changed_nsid: Option<u32>) {
        let notifier = {
            let mut inner = self.inner.lock();
            if let Some(nsid) = changed_nsid {
                if inner.changed_namespaces.len() < CHANGED_NS_LIST_MAX {
                    inner.changed_namespaces.insert(nsid);
                } else {
                    inner.changed_overflow = true;
                }
            }
            if self.async_event_config() & enabled_by == 0 {
                return;
            }
            // One outstanding event per kind: the host reads the log page and learns everything.
            if !inner.events.contains(&event) {
                inner.events.push_back(event);
            }
            let admin = inner.admin_connection;
            inner.notifiers.iter().find(|(id, _)| Some(*id) == admin).map(|(_, n)| n.clone())
        };
        if let Some(n) = notifier {
            n();
        }
    }

    pub(crate) fn next_event(&self) -> Option<AsyncEvent> {
        self.inner.lock().events.pop_front()
    }

    /// The Changed Namespace List (cleared unless `retain`): sorted NSIDs, or `None` for "more than
    /// 1024 changed".
    pub(crate) fn changed_namespaces(&self, retain: bool) -> Option<Vec<u32>> {
        let mut inner = self.inner.lock();
        let out = if inner.changed_overflow {
            None
        } else {
            Some(inner.changed_namespaces.iter().copied().collect())
        };
        if !retain {
            inner.changed_namespaces.clear();
            inner.changed_overflow = false;
        }
        out
    }
}

/// What a controller imported from another process starts with (see `handover.rs`).
pub(crate) struct Restore {
    pub(crate) cc: u32,
    pub(crate) csts: u32,
    pub(crate) enable_generation: u32,
    pub(crate) io_queues_granted: u16,
    pub(crate) async_event_config: u32,
    pub(crate) events: VecDeque<AsyncEvent>,
    pub(crate) changed_namespaces: BTreeSet<u32>,
    pub(crate) changed_overflow: bool,
}

/// The parts of a controller's locked state a handover writes down.
pub(crate) struct Snapshot {
    pub(crate) events: Vec<AsyncEvent>,
    pub(crate) changed_namespaces: Vec<u32>,
    pub(crate) changed_overflow: bool,
}

impl Controller {
    /// Its events and Changed Namespace List, as they are now.
    pub(crate) fn snapshot(&self) -> Snapshot {
        let inner = self.inner.lock();
        Snapshot {
            events: inner.events.iter().copied().collect(),
            changed_namespaces: inner.changed_namespaces.iter().copied().collect(),
            changed_overflow: inner.changed_overflow,
        }
    }

    /// Sets the state of a controller taken over from another process (before any connection uses it).
    pub(crate) fn restore(&self, r: Restore) {
        self.cc.store(r.cc, Ordering::Release);
        self.csts.store(r.csts, Ordering::Release);
        self.enable_generation.store(r.enable_generation, Ordering::Release);
        self.io_queues_granted.store(r.io_queues_granted, Ordering::Relaxed);
        self.async_event_config.store(r.async_event_config, Ordering::Relaxed);
        let mut inner = self.inner.lock();
        inner.events = r.events;
        inner.changed_namespaces = r.changed_namespaces;
        inner.changed_overflow = r.changed_overflow;
    }
}

impl fmt::Debug for Controller {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Controller")
            .field("cntlid", &self.cntlid)
            .field("subsystem", &self.subsystem.as_ref().map(|s| s.nqn()))
            .field("hostnqn", &self.hostnqn)
            .field("dead", &self.is_dead())
            .finish_non_exhaustive()
    }
}

/// A description of a live controller, for management tools. A controller is identified by
/// (`subnqn`, `cntlid`): each subsystem allocates its own CNTLIDs, so two subsystems may both have a
/// controller 1.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ControllerInfo {
    /// Controller ID, unique within `subnqn`.
    pub cntlid: u16,
    /// Subsystem NQN (the discovery NQN for discovery controllers).
    pub subnqn: String,
    /// Host NQN.
    pub hostnqn: String,
    /// Connected I/O queues.
    pub io_queues: usize,
    /// Keep Alive Timeout in milliseconds (0: none).
    pub kato_ms: u32,
}
