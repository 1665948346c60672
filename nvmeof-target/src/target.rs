//! The target: the shared registry of subsystems and controllers, and its management API.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use nvmeof_proto::nvme::discovery::DISCOVERY_NQN;
use nvmeof_proto::nvme::fabrics::{CNTLID_MAX, CNTLID_MIN, NQN_MAX_LEN};
use nvmeof_proto::nvme::features::{AsyncEvent, AsyncEventConfig};
use nvmeof_proto::nvme::identify::fill_space_padded;
use parking_lot::{Mutex, RwLock};

use crate::auth::{Entropy, HostKeys, HostSecrets, OsEntropy};
use crate::config::{TargetConfig, TransportParams};
use crate::connection::Connection;
use crate::controller::{Controller, ControllerInfo};
use crate::subsystem::{HostAccess, Namespace, NamespaceConfig, Subsystem, SubsystemConfig};

/// Errors of the target's management calls.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TargetError {
    /// No subsystem with this NQN.
    #[error("no subsystem {0}")]
    NoSuchSubsystem(String),
    /// A subsystem with this NQN exists already.
    #[error("subsystem {0} exists already")]
    SubsystemExists(String),
    /// The NQN is empty, too long (over 223 bytes) or is the discovery NQN.
    #[error("invalid NQN {0:?}")]
    InvalidNqn(String),
    /// Serial or model number is not printable ASCII of the allowed length (20 / 40).
    #[error("invalid {field}: {value:?}")]
    InvalidIdentity {
        /// Which field.
        field: &'static str,
        /// The value given.
        value: String,
    },
    /// No namespace with this ID in the subsystem.
    #[error("no namespace {nsid} in {subnqn}")]
    NoSuchNamespace {
        /// Subsystem NQN.
        subnqn: String,
        /// Namespace ID.
        nsid: u32,
    },
    /// The namespace ID is in use.
    #[error("namespace {nsid} exists in {subnqn}")]
    NamespaceExists {
        /// Subsystem NQN.
        subnqn: String,
        /// Namespace ID.
        nsid: u32,
    },
    /// The namespace ID is 0, the broadcast value or beyond the configured maximum.
    #[error("invalid namespace ID {0}")]
    InvalidNsid(u32),
    /// Hosts are connected and the operation was not forced.
    #[error("{0} has {1} connected controller(s); use force to disconnect them")]
    Busy(String, usize),
    /// The backend refused (e.g. it cannot resize).
    #[error("backend: {0}")]
    Backend(#[from] std::io::Error),
}

pub(crate) struct Shared {
    pub(crate) config: TargetConfig,
    subsystems: RwLock<BTreeMap<String, Arc<Subsystem>>>,
    controllers: Mutex<ControllerTable>,
    /// Torn-down controllers whose backend requests have not all completed yet.
    draining: Mutex<Vec<Arc<Controller>>>,
    pub(crate) discovery_genctr: AtomicU64,
    next_connection_id: AtomicU64,
    source: RwLock<Option<Arc<dyn SubsystemSource>>>,
    /// Empty stand-ins for subsystems hosts were detached from (see `detach.rs`).
    pub(crate) tombstones: Mutex<crate::detach::Tombstones>,
    host_keys: RwLock<Option<Arc<dyn HostKeys>>>,
    entropy: RwLock<Arc<dyn Entropy>>,
    /// DH-HMAC-CHAP sequence number S1 of the last challenge (0: none sent yet).
    pub(crate) auth_seqnum: AtomicU32,
}

/// Where subsystems that are not loaded come from: lets a storage node keep a million volumes on
/// disk and build a volume's subsystem only when a host connects to it (lazy activation).
///
/// The target asks the source on an admin-queue Connect to an NQN it does not have loaded, and when
/// it builds a host's discovery log. Loading and unloading through the source is silent: what a host
/// may see does not change, so no discovery change event is raised (call
/// [`Target::notify_discovery_changed`] when the source's own contents change).
pub trait SubsystemSource: Send + Sync {
    /// Builds the subsystem `subnqn` (with its namespaces) if the source has it, or `None`. Called on
    /// the connection's thread: keep it short (an index lookup and opening a device).
    fn activate(&self, subnqn: &str) -> Option<(SubsystemConfig, Vec<NamespaceConfig>)>;

    /// NQNs of the subsystems `hostnqn` may connect to, loaded or not (for its discovery log).
    fn discovery_nqns(&self, hostnqn: &str) -> Vec<String>;

    /// Called once the subsystem built by [`SubsystemSource::activate`] is loaded (visible through
    /// [`Target::subsystem`]). The default does nothing.
    fn activated(&self, subnqn: &str) {
        let _ = subnqn;
    }
}

#[derive(Default)]
struct ControllerTable {
    by_id: HashMap<u16, Arc<Controller>>,
    next: u16,
}

/// An NVMe over Fabrics target: subsystems, their namespaces, and the controllers hosts create.
///
/// Cheap to clone (one `Arc`); every clone is the same target. Connections are made with
/// [`Target::accept`]. Management calls may be made from any thread while hosts are connected:
/// namespace changes raise *Namespace Attribute Changed* events to connected controllers, and changes
/// to what a host may see raise *Discovery Log Page Change* events to discovery controllers.
#[derive(Clone)]
pub struct Target {
    pub(crate) shared: Arc<Shared>,
}

impl std::fmt::Debug for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Target")
            .field("subsystems", &self.shared.subsystems.read().len())
            .field("controllers", &self.shared.controllers.lock().by_id.len())
            .finish_non_exhaustive()
    }
}

fn check_nqn(nqn: &str) -> Result<(), TargetError> {
    if nqn.is_empty() || nqn.len() > NQN_MAX_LEN || nqn == DISCOVERY_NQN || nqn.contains('\0') {
        return Err(TargetError::InvalidNqn(nqn.to_owned()));
    }
    Ok(())
}

impl Target {
    /// A target with no subsystems.
    #[must_use]
    pub fn new(config: TargetConfig) -> Self {
        Self {
            shared: Arc::new(Shared {
                config: config.sanitized(),
                subsystems: RwLock::new(BTreeMap::new()),
                controllers: Mutex::new(ControllerTable { by_id: HashMap::new(), next: CNTLID_MIN }),
                draining: Mutex::new(Vec::new()),
                discovery_genctr: AtomicU64::new(1),
                next_connection_id: AtomicU64::new(1),
                source: RwLock::new(None),
                tombstones: Mutex::default(),
                host_keys: RwLock::new(None),
                entropy: RwLock::new(Arc::new(OsEntropy)),
                auth_seqnum: AtomicU32::new(0),
            }),
        }
    }

    /// The (sanitized) configuration.
    #[must_use]
    pub fn config(&self) -> &TargetConfig {
        &self.shared.config
    }

    /// Starts serving a new TCP connection. `now` starts its connect timeout.
    #[must_use]
    pub fn accept(&self, params: TransportParams, now: Instant) -> Connection {
        let id = self.shared.next_connection_id.fetch_add(1, Ordering::Relaxed);
        Connection::new(self.clone(), id, params, now)
    }

    // ---- subsystems ----

    /// Adds a subsystem.
    pub fn add_subsystem(&self, config: SubsystemConfig) -> Result<Arc<Subsystem>, TargetError> {
        check_nqn(&config.nqn)?;
        let mut sn = [0u8; 20];
        fill_space_padded(&mut sn, &config.serial)
            .map_err(|_| TargetError::InvalidIdentity { field: "serial", value: config.serial.clone() })?;
        let mut mn = [0u8; 40];
        fill_space_padded(&mut mn, &config.model)
            .map_err(|_| TargetError::InvalidIdentity { field: "model", value: config.model.clone() })?;
        self.bump_genctr();
        let subsys = {
            let mut map = self.shared.subsystems.write();
            if map.contains_key(&config.nqn) {
                return Err(TargetError::SubsystemExists(config.nqn));
            }
            let subsys = Arc::new(Subsystem::new(config));
            map.insert(subsys.nqn().to_owned(), subsys.clone());
            subsys
        };
        self.discovery_changed();
        Ok(subsys)
    }

    /// Removes a subsystem. With live controllers this fails unless `force`, which disconnects them.
    pub fn remove_subsystem(&self, nqn: &str, force: bool) -> Result<(), TargetError> {
        let live = self.controllers_of(nqn);
        if !live.is_empty() && !force {
            return Err(TargetError::Busy(nqn.to_owned(), live.len()));
        }
        self.bump_genctr();
        if self.shared.subsystems.write().remove(nqn).is_none() {
            return Err(TargetError::NoSuchSubsystem(nqn.to_owned()));
        }
        // Collected after unpublishing, so a Connect racing with the removal is caught too (Connect
        // re-checks that its subsystem is still published after creating its controller).
        for c in self.controllers_of(nqn) {
            self.remove_controller(&c, "subsystem removed");
        }
        self.discovery_changed();
        Ok(())
    }

    /// Sets where subsystems that are not loaded come from (see [`SubsystemSource`]).
    pub fn set_source(&self, source: Arc<dyn SubsystemSource>) {
        *self.shared.source.write() = Some(source);
    }

    /// The subsystem `nqn`, loaded from the [`SubsystemSource`] if it is not loaded yet.
    pub(crate) fn subsystem_or_activate(&self, nqn: &str) -> Option<Arc<Subsystem>> {
        if let Some(s) = self.subsystem(nqn) {
            return Some(s);
        }
        let source = self.shared.source.read().clone()?;
        let (config, namespaces) = source.activate(nqn)?;
        if config.nqn != nqn || check_nqn(nqn).is_err() {
            return None;
        }
        let subsys = {
            let mut map = self.shared.subsystems.write();
            if let Some(s) = map.get(nqn) {
                return Some(s.clone()); // another connection activated it meanwhile
            }
            let subsys = Arc::new(Subsystem::new(config));
            let max = self.shared.config.max_namespaces;
            subsys.update_namespaces(|m| {
                for ns in namespaces.into_iter().filter(|n| n.nsid != 0 && n.nsid <= max) {
                    let block_size = ns.backend.info().block_size;
                    let ns = Arc::new(Namespace::new(ns, block_size));
                    m.insert(ns.nsid(), ns);
                }
            });
            map.insert(nqn.to_owned(), subsys.clone());
            subsys
        };
        tracing::debug!(subnqn = nqn, "subsystem activated");
        source.activated(nqn);
        Some(subsys)
    }

    /// Unloads a subsystem that came from the [`SubsystemSource`] if no controller uses it; it is
    /// built again on the next Connect. Returns whether it was unloaded. Raises no discovery event.
    pub fn unload_subsystem(&self, nqn: &str) -> bool {
        if !self.controllers_of(nqn).is_empty() {
            return false;
        }
        let removed = self.shared.subsystems.write().remove(nqn).is_some();
        // A Connect that raced with the removal re-checks its subsystem and retries.
        for c in self.controllers_of(nqn) {
            self.remove_controller(&c, "subsystem unloaded");
        }
        removed
    }

    /// NQNs of the subsystems `hostnqn` may see, loaded or known to the source.
    pub(crate) fn discovery_nqns(&self, hostnqn: &str) -> Vec<String> {
        let mut nqns: Vec<String> =
            self.subsystems_for_host(hostnqn).iter().map(|s| s.nqn().to_owned()).collect();
        if let Some(source) = self.shared.source.read().clone() {
            nqns.extend(source.discovery_nqns(hostnqn));
        }
        nqns.sort_unstable();
        nqns.dedup();
        nqns
    }

    /// Tells discovery controllers that what hosts may see has changed (for [`SubsystemSource`]s:
    /// a volume created, deleted, or a host allowed or denied).
    pub fn notify_discovery_changed(&self) {
        self.discovery_changed();
    }

    /// The subsystem with this NQN.
    #[must_use]
    pub fn subsystem(&self, nqn: &str) -> Option<Arc<Subsystem>> {
        self.shared.subsystems.read().get(nqn).cloned()
    }

    /// NQNs of all subsystems.
    #[must_use]
    pub fn subsystem_nqns(&self) -> Vec<String> {
        self.shared.subsystems.read().keys().cloned().collect()
    }

    pub(crate) fn subsystems_for_host(&self, hostnqn: &str) -> Vec<Arc<Subsystem>> {
        self.shared.subsystems.read().values().filter(|s| s.allows_host(hostnqn)).cloned().collect()
    }

    fn subsystem_or_err(&self, nqn: &str) -> Result<Arc<Subsystem>, TargetError> {
        self.subsystem(nqn).ok_or_else(|| TargetError::NoSuchSubsystem(nqn.to_owned()))
    }

    /// Lets `hostnqn` connect to the subsystem.
    pub fn allow_host(&self, subnqn: &str, hostnqn: &str) -> Result<(), TargetError> {
        self.bump_genctr();
        if self.subsystem_or_err(subnqn)?.set_host_allowed(hostnqn, true) {
            self.discovery_changed();
        }
        Ok(())
    }

    /// Stops `hostnqn` from connecting to the subsystem. Controllers it has already are kept unless
    /// `disconnect`.
    pub fn deny_host(&self, subnqn: &str, hostnqn: &str, disconnect: bool) -> Result<(), TargetError> {
        self.bump_genctr();
        if self.subsystem_or_err(subnqn)?.set_host_allowed(hostnqn, false) {
            self.discovery_changed();
        }
        if disconnect {
            for c in self.controllers_of(subnqn).into_iter().filter(|c| c.hostnqn == hostnqn) {
                self.remove_controller(&c, "host denied");
            }
        }
        Ok(())
    }

    /// Sets whether any host may connect ([`HostAccess::AllowAny`]) or only the allowed ones.
    pub fn set_host_access(&self, subnqn: &str, access: HostAccess) -> Result<(), TargetError> {
        self.bump_genctr();
        self.subsystem_or_err(subnqn)?.set_access(access);
        self.discovery_changed();
        Ok(())
    }

    /// Sets whether every host must authenticate to the subsystem (DH-HMAC-CHAP, see
    /// [`crate::auth`]). Applies to queues connected from now on; live ones are not disturbed.
    pub fn set_auth_required(&self, subnqn: &str, required: bool) -> Result<(), TargetError> {
        self.subsystem_or_err(subnqn)?.set_require_auth(required);
        Ok(())
    }

    /// Sets where the DH-HMAC-CHAP secrets of hosts come from (see [`HostKeys`]); replaces an earlier
    /// one. Without one no host has a secret (and no host can connect to a subsystem that requires
    /// authentication).
    pub fn set_host_keys(&self, keys: Arc<dyn HostKeys>) {
        *self.shared.host_keys.write() = Some(keys);
    }

    /// Sets the random number source of authentication (challenges, sequence numbers, DH
    /// exponents); the operating system's by default. Tests use a deterministic one.
    pub fn set_entropy(&self, entropy: Arc<dyn Entropy>) {
        *self.shared.entropy.write() = entropy;
    }

    pub(crate) fn host_keys(&self) -> Option<Arc<dyn HostKeys>> {
        self.shared.host_keys.read().clone()
    }

    pub(crate) fn entropy(&self) -> Arc<dyn Entropy> {
        self.shared.entropy.read().clone()
    }

    /// True if `hostnqn` must authenticate its queues to `subsys`: the subsystem requires it of
    /// everyone, or the host has a secret.
    pub(crate) fn auth_required(&self, subsys: &Subsystem, hostnqn: &str) -> bool {
        subsys.requires_auth() || self.host_secrets(subsys.nqn(), hostnqn).is_some()
    }

    fn host_secrets(&self, subnqn: &str, hostnqn: &str) -> Option<Arc<HostSecrets>> {
        self.host_keys()?.host_secrets(subnqn, hostnqn)
    }

    // ---- namespaces ----

    /// Attaches a namespace to a subsystem; connected hosts are told.
    pub fn add_namespace(
        &self,
        subnqn: &str,
        config: NamespaceConfig,
    ) -> Result<Arc<Namespace>, TargetError> {
        let subsys = self.subsystem_or_err(subnqn)?;
        let nsid = config.nsid;
        if nsid == 0 || nsid > self.shared.config.max_namespaces {
            return Err(TargetError::InvalidNsid(nsid));
        }
        let block_size = config.backend.info().block_size;
        let ns = Arc::new(Namespace::new(config, block_size));
        let inserted = subsys.update_namespaces(|map| match map.entry(nsid) {
            std::collections::btree_map::Entry::Vacant(v) => {
                v.insert(ns.clone());
                true
            }
            std::collections::btree_map::Entry::Occupied(_) => false,
        });
        if !inserted {
            return Err(TargetError::NamespaceExists { subnqn: subnqn.to_owned(), nsid });
        }
        self.namespace_changed(subnqn, nsid);
        Ok(ns)
    }

    /// Detaches a namespace; connected hosts are told. Commands already running on it finish.
    pub fn remove_namespace(&self, subnqn: &str, nsid: u32) -> Result<Arc<Namespace>, TargetError> {
        let subsys = self.subsystem_or_err(subnqn)?;
        let removed = subsys.update_namespaces(|map| map.remove(&nsid));
        let ns = removed.ok_or_else(|| TargetError::NoSuchNamespace { subnqn: subnqn.to_owned(), nsid })?;
        self.namespace_changed(subnqn, nsid);
        Ok(ns)
    }

    /// Resizes a namespace's backend; connected hosts get a Namespace Attribute Changed event and see
    /// the new size without reconnecting.
    pub fn resize_namespace(&self, subnqn: &str, nsid: u32, new_size_bytes: u64) -> Result<(), TargetError> {
        let ns = self
            .subsystem_or_err(subnqn)?
            .namespace(nsid)
            .ok_or_else(|| TargetError::NoSuchNamespace { subnqn: subnqn.to_owned(), nsid })?;
        ns.backend().resize(new_size_bytes)?;
        self.namespace_changed(subnqn, nsid);
        Ok(())
    }

    fn namespace_changed(&self, subnqn: &str, nsid: u32) {
        for c in self.controllers_of(subnqn) {
            c.raise_event(
                AsyncEvent::NAMESPACE_ATTRIBUTE_CHANGED,
                AsyncEventConfig::NAMESPACE_ATTRIBUTE,
                Some(nsid),
            );
        }
    }

    /// Moves the discovery log generation on. Called before and after each change, so that a host
    /// reading the log in pieces while it changes sees two different generation counters.
    fn bump_genctr(&self) {
        self.shared.discovery_genctr.fetch_add(1, Ordering::AcqRel);
    }

    /// The discovery log changed: new generation, and an event to discovery controllers that asked.
    fn discovery_changed(&self) {
        self.bump_genctr();
        let discovery: Vec<Arc<Controller>> =
            self.shared.controllers.lock().by_id.values().filter(|c| c.is_discovery()).cloned().collect();
        for c in discovery {
            c.raise_event(AsyncEvent::DISCOVERY_LOG_CHANGED, AsyncEventConfig::DISCOVERY_LOG_CHANGE, None);
        }
    }

    // ---- controllers ----

    /// Live controllers.
    #[must_use]
    pub fn controllers(&self) -> Vec<ControllerInfo> {
        let table = self.shared.controllers.lock();
        let mut out: Vec<ControllerInfo> = table
            .by_id
            .values()
            .filter(|c| !c.is_dead())
            .map(|c| ControllerInfo {
                cntlid: c.cntlid,
                subnqn: c.subsystem.as_ref().map_or(DISCOVERY_NQN, |s| s.nqn()).to_owned(),
                hostnqn: c.hostnqn.clone(),
                io_queues: c.io_queue_count(),
                kato_ms: c.kato_ms(),
            })
            .collect();
        out.sort_by_key(|c| c.cntlid);
        out
    }

    /// Disconnects a controller (all its queues). Returns false if there is no such controller.
    pub fn disconnect_controller(&self, cntlid: u16) -> bool {
        let ctrl = self.shared.controllers.lock().by_id.get(&cntlid).cloned();
        ctrl.is_some_and(|c| {
            self.remove_controller(&c, "disconnected by management");
            true
        })
    }

    pub(crate) fn controllers_of(&self, subnqn: &str) -> Vec<Arc<Controller>> {
        self.shared
            .controllers
            .lock()
            .by_id
            .values()
            .filter(|c| c.subsystem.as_ref().is_some_and(|s| s.nqn() == subnqn))
            .cloned()
            .collect()
    }

    /// Creates a controller with a free CNTLID; `None` when all are taken.
    pub(crate) fn create_controller(
        &self,
        subsystem: Option<Arc<Subsystem>>,
        hostnqn: String,
        hostid: [u8; 16],
        kato_ms: u32,
        now: Instant,
    ) -> Option<Arc<Controller>> {
        let mut table = self.shared.controllers.lock();
        let span = usize::from(CNTLID_MAX - CNTLID_MIN) + 1;
        if table.by_id.len() >= span {
            return None;
        }
        let mut id = table.next;
        while table.by_id.contains_key(&id) {
            id = if id >= CNTLID_MAX { CNTLID_MIN } else { id + 1 };
        }
        table.next = if id >= CNTLID_MAX { CNTLID_MIN } else { id + 1 };
        let ctrl = Arc::new(Controller::new(id, subsystem, hostnqn, hostid, kato_ms, now));
        table.by_id.insert(id, ctrl.clone());
        Some(ctrl)
    }

    pub(crate) fn find_controller(&self, cntlid: u16) -> Option<Arc<Controller>> {
        self.shared.controllers.lock().by_id.get(&cntlid).cloned()
    }

    /// Tears a controller down: gone from the table, every connection serving it woken to close.
    /// `why` is logged (once, by whoever removes it first).
    pub(crate) fn remove_controller(&self, ctrl: &Arc<Controller>, why: &str) {
        {
            let mut table = self.shared.controllers.lock();
            if table.by_id.get(&ctrl.cntlid).is_some_and(|c| Arc::ptr_eq(c, ctrl)) {
                table.by_id.remove(&ctrl.cntlid);
            }
        }
        if ctrl.kill() {
            tracing::info!(
                cntlid = ctrl.cntlid,
                host = %ctrl.hostnqn,
                subsystem = ctrl.subsystem.as_ref().map_or(DISCOVERY_NQN, |s| s.nqn()),
                reason = why,
                "controller removed"
            );
            if ctrl.outstanding_io() > 0 {
                self.shared.draining.lock().push(ctrl.clone());
            }
        }
        self.controller_gone(ctrl);
    }

    /// True if an earlier controller of `hostnqn` on `subsys` is gone but still has backend requests
    /// running: its host cannot create a new controller for the same subsystem until they complete
    /// (so a retried write cannot be overtaken by an old one still landing).
    pub(crate) fn host_is_draining(&self, subsys: &Arc<Subsystem>, hostnqn: &str) -> bool {
        let mut draining = self.shared.draining.lock();
        draining.retain(|c| c.outstanding_io() > 0);
        draining
            .iter()
            .any(|c| c.hostnqn == hostnqn && c.subsystem.as_ref().is_some_and(|s| Arc::ptr_eq(s, subsys)))
    }
}
