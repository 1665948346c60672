//! Prompt host detach: taking a subsystem's namespaces away from a host *before* its connections are
//! cut, so that the host drops its block device at once instead of retrying a lost controller.
//!
//! A Linux host keeps a block device (and queues its I/O) while it reconnects to a lost controller,
//! for `ctrl_loss_tmo` (600 s by default); a 6.1 host does so even when every reconnect fails with
//! Do Not Retry. It drops a namespace at once only when the namespace is no longer active: after a
//! Namespace Attribute Changed event it reads the active namespace list, removes the namespaces
//! missing from it and fails their outstanding I/O. So a forced delete or a forced deny goes:
//!
//! ```text
//!   Target::detach_namespaces(subnqn, host)           per controller of that host (or of all hosts):
//!     ├─ namespaces hidden: Identify lists none, I/O gets Invalid Namespace (no more writes land)
//!     ├─ Namespace Attribute Changed event ──▶ host reads the (empty) active namespace list
//!     │                                        └─▶ Detach::is_acknowledged() turns true
//!     └─ tombstone (subnqn, host) recorded
//!   caller waits (bounded) for the acknowledgement, then cuts the connections
//!   host reconnects ──▶ Connect refused by the subsystem? the tombstone answers it: an empty
//!                       controller, so the host's reconnect succeeds, finds no namespace, and stops
//! ```
//!
//! The engine keeps no clock: waiting for the acknowledgement is the caller's (it polls
//! [`Detach::is_acknowledged`]). A tombstone lasts until the controller the host made on it goes
//! away (the host disconnected), and at most [`MAX_TOMBSTONES`] are kept (the oldest go first).

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use nvmeof_proto::nvme::features::{AsyncEvent, AsyncEventConfig};

use crate::controller::Controller;
use crate::subsystem::{Namespace, Subsystem, SubsystemConfig};
use crate::target::Target;

/// Most tombstones kept at once.
pub const MAX_TOMBSTONES: usize = 4096;

/// A controller's side of a detach.
#[derive(Debug, Default)]
pub(crate) struct DetachState {
    /// The host may see no namespace of the controller's subsystem any more.
    hidden: AtomicBool,
    /// The host read the active namespace list after that.
    acknowledged: AtomicBool,
}

impl Controller {
    /// True once the controller's namespaces were taken away from its host.
    pub(crate) fn namespaces_hidden(&self) -> bool {
        self.detach.hidden.load(Ordering::Acquire)
    }

    /// True once the host read the active namespace list after its namespaces were hidden.
    pub(crate) fn detach_acknowledged(&self) -> bool {
        self.detach.acknowledged.load(Ordering::Acquire)
    }

    /// A controller taken over from another process whose namespaces were hidden there.
    pub(crate) fn restore_detach(&self, acknowledged: bool) {
        self.detach.hidden.store(true, Ordering::Release);
        self.detach.acknowledged.store(acknowledged, Ordering::Release);
    }

    /// The namespace `nsid` if this controller's host may see it.
    pub(crate) fn visible_namespace(&self, nsid: u32) -> Option<Arc<Namespace>> {
        if self.namespaces_hidden() {
            return None;
        }
        self.subsystem.as_ref()?.namespace(nsid)
    }

    /// NSIDs of the namespaces this controller's host may see, in order.
    pub(crate) fn visible_nsids(&self) -> Vec<u32> {
        match &self.subsystem {
            Some(s) if !self.namespaces_hidden() => s.namespaces().keys().copied().collect(),
            _ => Vec::new(),
        }
    }

    /// The host read the active namespace list.
    pub(crate) fn active_list_read(&self) {
        if self.namespaces_hidden() {
            self.detach.acknowledged.store(true, Ordering::Release);
        }
    }

    /// Whether the host knows it has no namespace here, or cannot be told: the controller is gone,
    /// not enabled, or its host did not ask for namespace events.
    fn detach_settled(&self) -> bool {
        self.detach.acknowledged.load(Ordering::Acquire)
            || self.is_dead()
            || !self.is_ready()
            || self.async_event_config() & AsyncEventConfig::NAMESPACE_ATTRIBUTE == 0
    }
}

/// A detach in progress: the controllers whose namespaces were taken away (see
/// [`Target::detach_namespaces`]).
#[derive(Debug)]
#[must_use = "wait for is_acknowledged() before cutting the connections"]
pub struct Detach {
    controllers: Vec<Arc<Controller>>,
}

impl Detach {
    /// How many controllers lost their namespaces.
    #[must_use]
    pub fn len(&self) -> usize {
        self.controllers.len()
    }

    /// True if no controller was affected.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.controllers.is_empty()
    }

    /// True once every affected host has read its (now empty) active namespace list — it has
    /// dropped the block device — or cannot be told (its controller is gone or not enabled, or it
    /// did not ask for namespace events). Cutting the connections before then leaves a host to
    /// find out only when it reconnects.
    #[must_use]
    pub fn is_acknowledged(&self) -> bool {
        self.controllers.iter().all(|c| c.detach_settled())
    }
}

/// Empty stand-ins for subsystems a host lost, keyed by (subsystem NQN, host NQN).
#[derive(Debug, Default)]
pub(crate) struct Tombstones {
    by_key: HashMap<(String, String), Arc<Subsystem>>,
    order: VecDeque<(String, String)>,
}

impl Target {
    /// Takes the namespaces of subsystem `subnqn` away from the controllers of `hostnqn` (of every
    /// host if `None`): Identify no longer lists them, I/O to them fails with Invalid Namespace,
    /// and each controller gets a Namespace Attribute Changed event for each of them. Their hosts'
    /// reconnects, once the caller has cut the connections (a forced
    /// [`Target::remove_subsystem`], [`Target::deny_host`] with `disconnect`), are answered with an
    /// empty controller so that they stop (see the module docs). A subsystem without controllers
    /// gives an empty [`Detach`].
    pub fn detach_namespaces(&self, subnqn: &str, hostnqn: Option<&str>) -> Detach {
        let controllers: Vec<Arc<Controller>> = self
            .controllers_of(subnqn)
            .into_iter()
            .filter(|c| hostnqn.is_none_or(|h| c.hostnqn == h) && !c.is_dead())
            .collect();
        for c in &controllers {
            let Some(subsys) = &c.subsystem else { continue };
            self.add_tombstone(subsys, &c.hostnqn);
            if c.detach.hidden.swap(true, Ordering::AcqRel) {
                continue;
            }
            tracing::info!(
                subsystem = subnqn,
                host = %c.hostnqn,
                cntlid = c.cntlid,
                "namespaces taken away from the host"
            );
            for nsid in subsys.namespaces().keys() {
                c.raise_event(
                    AsyncEvent::NAMESPACE_ATTRIBUTE_CHANGED,
                    AsyncEventConfig::NAMESPACE_ATTRIBUTE,
                    Some(*nsid),
                );
            }
        }
        Detach { controllers }
    }

    fn add_tombstone(&self, subsys: &Subsystem, hostnqn: &str) {
        let key = (subsys.nqn().to_owned(), hostnqn.to_owned());
        let mut t = self.shared.tombstones.lock();
        if t.by_key.contains_key(&key) {
            return;
        }
        while t.order.len() >= MAX_TOMBSTONES {
            let Some(old) = t.order.pop_front() else { break };
            t.by_key.remove(&old);
        }
        let mut config = SubsystemConfig::new(subsys.nqn(), subsys.serial());
        config.model = subsys.model().to_owned();
        // A host that had to authenticate still has to; one that did not need not. Decided now,
        // while the subsystem is there: once it is gone, its host keys may well fail closed.
        config.require_auth = self.auth_required(subsys, hostnqn);
        config.allowed_hosts.push(hostnqn.to_owned());
        t.order.push_back(key.clone());
        t.by_key.insert(key, Arc::new(Subsystem::new(config)));
    }

    /// The empty stand-in for `subnqn` that `hostnqn` may reconnect to after a detach.
    pub(crate) fn tombstone(&self, subnqn: &str, hostnqn: &str) -> Option<Arc<Subsystem>> {
        let t = self.shared.tombstones.lock();
        t.by_key.get(&(subnqn.to_owned(), hostnqn.to_owned())).cloned()
    }

    /// True if `subsys` is the tombstone `hostnqn` may use (not in the subsystem table, yet a valid
    /// home for its controllers).
    pub(crate) fn is_tombstone_of(&self, subsys: &Arc<Subsystem>, hostnqn: &str) -> bool {
        self.tombstone(subsys.nqn(), hostnqn).is_some_and(|t| Arc::ptr_eq(&t, subsys))
    }

    /// A controller went away: if it lived on a tombstone, the tombstone has done its job (the host
    /// disconnected from it) and is dropped.
    pub(crate) fn controller_gone(&self, ctrl: &Controller) {
        let Some(subsys) = &ctrl.subsystem else { return };
        let key = (subsys.nqn().to_owned(), ctrl.hostnqn.clone());
        let mut t = self.shared.tombstones.lock();
        if t.by_key.get(&key).is_some_and(|s| Arc::ptr_eq(s, subsys)) {
            t.by_key.remove(&key);
            t.order.retain(|k| k != &key);
        }
    }

    /// Number of tombstones kept (for tests and metrics).
    #[must_use]
    pub fn tombstone_count(&self) -> usize {
        self.shared.tombstones.lock().by_key.len()
    }
}
