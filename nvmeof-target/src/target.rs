//! The target: the shared registry of subsystems and controllers, and its management API.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering};
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
    subsystems: RwLock<Subsystems>,
    controllers: Mutex<ControllerRegistry>,
    /// Live controllers in `controllers` (all subsystems, discovery included): read without the lock.
    controller_count: AtomicUsize,
    /// Torn-down controllers whose backend requests have not all completed yet.
    draining: Mutex<Vec<Arc<Controller>>>,
    pub(crate) discovery_genctr: AtomicU64,
    next_connection_id: AtomicU64,
    source: RwLock<Option<Arc<dyn SubsystemSource>>>,
    /// Where activations run, if not on the connection's thread.
    activation_runner: RwLock<Option<ActivationRunner>>,
    /// Empty stand-ins for subsystems hosts were detached from (see `detach.rs`).
    pub(crate) tombstones: Mutex<crate::detach::Tombstones>,
    host_keys: RwLock<Option<Arc<dyn HostKeys>>>,
    entropy: RwLock<Arc<dyn Entropy>>,
    /// DH-HMAC-CHAP sequence number S1 of the last challenge (0: none sent yet).
    pub(crate) auth_seqnum: AtomicU32,
    /// Target-wide limits of per-command warnings.
    pub(crate) warnings: crate::ratelimit::WarningLimits,
}

/// Runs a job on another thread (see [`Target::set_activation_runner`]): typically a driver's pool for
/// blocking work. A runner that cannot take the job (shutting down) drops it; the connection waiting
/// for it then ends at its connect timeout.
pub type ActivationRunner = Arc<dyn Fn(Box<dyn FnOnce() + Send>) + Send + Sync>;

/// Where subsystems that are not loaded come from: lets a storage node keep a million volumes on
/// disk and build a volume's subsystem only when a host connects to it (lazy activation).
///
/// The target asks the source on an admin-queue Connect to an NQN it does not have loaded, and when
/// it serves a host's discovery log. Loading and unloading through the source is silent: what a host
/// may see does not change, so no discovery change event is raised (call
/// [`Target::notify_discovery_changed`] when the source's own contents change).
///
/// # Discovery
///
/// The source is asked for a host's discovery list by position, a window at a time, so that a Get
/// Log Page costs what its window holds whatever the number of subsystems: the number of entries
/// ([`SubsystemSource::discovery_len`]), the entries in a range of positions
/// ([`SubsystemSource::discovery_range`]) and whether it lists a given subsystem
/// ([`SubsystemSource::discovery_lists`]). Positions follow an order of the source's choosing that
/// must stay the same while its contents do not change (a host reads the log page in several
/// windows, and compares the generation counter to know whether to read again). The source lists the
/// subsystems it builds, loaded or not: a subsystem the source activated is listed by the source
/// only. Subsystems added with [`Target::add_subsystem`] are listed after the source's entries,
/// unless the source lists them too.
pub trait SubsystemSource: Send + Sync {
    /// Builds the subsystem `subnqn` (with its namespaces) if the source has it, or `None`. Called on
    /// the target's activation runner if it has one ([`Target::set_activation_runner`]), else on the
    /// connection's thread (then keep it short: an index lookup and opening a device).
    fn activate(&self, subnqn: &str) -> Option<(SubsystemConfig, Vec<NamespaceConfig>)>;

    /// Number of entries in `hostnqn`'s discovery list: the subsystems it may connect to.
    fn discovery_len(&self, hostnqn: &str) -> u64;

    /// NQNs of the entries at positions `first .. first + count` of `hostnqn`'s discovery list (fewer
    /// where the list ends). Called on the connection's thread for each discovery Get Log Page:
    /// the work should follow `count`, not the length of the list.
    fn discovery_range(&self, hostnqn: &str, first: u64, count: usize) -> Vec<String>;

    /// True if `subnqn` is in `hostnqn`'s discovery list.
    fn discovery_lists(&self, hostnqn: &str, subnqn: &str) -> bool;

    /// Called once the subsystem built by [`SubsystemSource::activate`] is loaded (visible through
    /// [`Target::subsystem`]). The default does nothing.
    fn activated(&self, subnqn: &str) {
        let _ = subnqn;
    }
}

/// Loaded subsystems.
#[derive(Default)]
struct Subsystems {
    /// Every loaded subsystem by NQN.
    all: BTreeMap<String, Arc<Subsystem>>,
    /// Those added through [`Target::add_subsystem`] (not built by the source): the ones the target
    /// lists in discovery logs itself.
    added: BTreeMap<String, Arc<Subsystem>>,
}

/// A host's discovery list, or a window of it: how many entries there are, and the NQNs of those in
/// the window.
pub(crate) struct DiscoveryWindow {
    /// Entries in the whole list (NUMREC).
    pub(crate) total: u64,
    /// NQNs of the entries at the window's positions.
    pub(crate) nqns: Vec<String>,
}

/// The controllers of one subsystem, by CNTLID. CNTLIDs are unique per subsystem (NVMe), so each
/// subsystem allocates its own from `CNTLID_MIN..=CNTLID_MAX`.
struct ControllerSet {
    by_id: HashMap<u16, Arc<Controller>>,
    /// Where the search for a free CNTLID starts (the one after the last handed out).
    next: u16,
}

impl ControllerSet {
    fn new() -> Self {
        Self { by_id: HashMap::new(), next: CNTLID_MIN }
    }

    /// A free CNTLID, or `None` when all `CNTLID_MIN..=CNTLID_MAX` are taken.
    fn allocate(&mut self) -> Option<u16> {
        let span = usize::from(CNTLID_MAX - CNTLID_MIN) + 1;
        if self.by_id.len() >= span {
            return None;
        }
        let mut id = self.next.clamp(CNTLID_MIN, CNTLID_MAX);
        while self.by_id.contains_key(&id) {
            id = if id >= CNTLID_MAX { CNTLID_MIN } else { id + 1 };
        }
        self.next = if id >= CNTLID_MAX { CNTLID_MIN } else { id + 1 };
        Some(id)
    }
}

/// Every live controller, indexed per subsystem: what a question about one subsystem costs depends
/// on that subsystem's controllers only. A subsystem without controllers has no entry (an idle
/// volume costs nothing here).
struct ControllerRegistry {
    /// Subsystem NQN → its controllers (controllers on a detach tombstone share their subsystem's NQN,
    /// and so its CNTLID space: a host names a controller by subsystem NQN and CNTLID).
    by_subsystem: HashMap<Box<str>, ControllerSet>,
    /// Controllers of the discovery subsystem.
    discovery: ControllerSet,
}

impl ControllerRegistry {
    fn set(&self, subnqn: &str) -> Option<&ControllerSet> {
        if subnqn == DISCOVERY_NQN {
            Some(&self.discovery)
        } else {
            self.by_subsystem.get(subnqn)
        }
    }
}

fn controller_nqn(c: &Controller) -> &str {
    c.subsystem.as_ref().map_or(DISCOVERY_NQN, |s| s.nqn())
}

fn controller_info(c: &Controller) -> ControllerInfo {
    ControllerInfo {
        cntlid: c.cntlid,
        subnqn: controller_nqn(c).to_owned(),
        hostnqn: c.hostnqn.clone(),
        io_queues: c.io_queue_count(),
        kato_ms: c.kato_ms(),
    }
}

/// An NVMe over Fabrics target: subsystems, their namespaces, and the controllers hosts create.
///
/// Cheap to clone (one `Arc`); every clone is the same target. Connections are made with
/// [`Target::accept`]. Management calls may be made from any thread while hosts are connected:
/// namespace changes raise *Namespace Attribute Changed* events to connected controllers, and changes
/// to what a host may see raise *Discovery Log Page Change* events to discovery controllers.
///
/// Controllers are indexed per subsystem: each subsystem (the discovery subsystem too) allocates its
/// own controller IDs (`1..=0xffef`), so a target holds any number of controllers across
/// subsystems, and a controller is named by its subsystem NQN and CNTLID. Counting or listing the
/// controllers of a subsystem costs what that subsystem has ([`Target::controller_count_of`],
/// [`Target::controllers_of_subsystem`]); the total is a counter ([`Target::controller_count`]).
#[derive(Clone)]
pub struct Target {
    pub(crate) shared: Arc<Shared>,
}

impl std::fmt::Debug for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Target")
            .field("subsystems", &self.shared.subsystems.read().all.len())
            .field("controllers", &self.controller_count())
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
                subsystems: RwLock::new(Subsystems::default()),
                controllers: Mutex::new(ControllerRegistry {
                    by_subsystem: HashMap::new(),
                    discovery: ControllerSet::new(),
                }),
                controller_count: AtomicUsize::new(0),
                draining: Mutex::new(Vec::new()),
                discovery_genctr: AtomicU64::new(1),
                next_connection_id: AtomicU64::new(1),
                source: RwLock::new(None),
                activation_runner: RwLock::new(None),
                tombstones: Mutex::default(),
                host_keys: RwLock::new(None),
                entropy: RwLock::new(Arc::new(OsEntropy)),
                auth_seqnum: AtomicU32::new(0),
                warnings: Default::default(),
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
            if map.all.contains_key(&config.nqn) {
                return Err(TargetError::SubsystemExists(config.nqn));
            }
            let subsys = Arc::new(Subsystem::new(config));
            map.all.insert(subsys.nqn().to_owned(), subsys.clone());
            map.added.insert(subsys.nqn().to_owned(), subsys.clone());
            subsys
        };
        self.discovery_changed();
        Ok(subsys)
    }

    /// Removes a subsystem. With live controllers this fails unless `force`, which disconnects them.
    pub fn remove_subsystem(&self, nqn: &str, force: bool) -> Result<(), TargetError> {
        let live = self.controller_count_of(nqn);
        if live > 0 && !force {
            return Err(TargetError::Busy(nqn.to_owned(), live));
        }
        self.bump_genctr();
        {
            let mut map = self.shared.subsystems.write();
            map.added.remove(nqn);
            if map.all.remove(nqn).is_none() {
                return Err(TargetError::NoSuchSubsystem(nqn.to_owned()));
            }
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

    /// Sets where activations by the [`SubsystemSource`] run (`None`: on the thread of the connection
    /// that needs the subsystem, inside [`Connection::handle_input`]).
    ///
    /// Activating may be slow — reading a catalog, opening a device, waiting for it to appear — and
    /// a driver serving many connections on one thread should not wait for it. With a runner, an
    /// admin-queue Connect to a subsystem that is not loaded hands the activation to the runner and
    /// waits, answering nothing; the runner's thread loads the subsystem and calls the connection's
    /// notifier ([`Connection::set_notifier`]), and [`Connection::handle_wakeup`] then completes the
    /// Connect. Connections without a notifier activate on their own thread.
    pub fn set_activation_runner(&self, runner: Option<ActivationRunner>) {
        *self.shared.activation_runner.write() = runner;
    }

    pub(crate) fn activation_runner(&self) -> Option<ActivationRunner> {
        self.shared.activation_runner.read().clone()
    }

    /// True if `nqn` is not loaded and the [`SubsystemSource`] would be asked for it.
    pub(crate) fn needs_activation(&self, nqn: &str) -> bool {
        self.shared.source.read().is_some() && self.subsystem(nqn).is_none()
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
            if let Some(s) = map.all.get(nqn) {
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
            map.all.insert(nqn.to_owned(), subsys.clone());
            subsys
        };
        tracing::debug!(subnqn = nqn, "subsystem activated");
        source.activated(nqn);
        Some(subsys)
    }

    /// Unloads a subsystem that came from the [`SubsystemSource`] if no controller uses it; it is
    /// built again on the next Connect. Returns whether it was unloaded. Raises no discovery event.
    pub fn unload_subsystem(&self, nqn: &str) -> bool {
        if self.controller_count_of(nqn) > 0 {
            return false;
        }
        let removed = {
            let mut map = self.shared.subsystems.write();
            map.added.remove(nqn);
            map.all.remove(nqn).is_some()
        };
        // A Connect that raced with the removal re-checks its subsystem and retries.
        for c in self.controllers_of(nqn) {
            self.remove_controller(&c, "subsystem unloaded");
        }
        removed
    }

    /// The window `first .. first + count` of `hostnqn`'s discovery list, and the list's length.
    ///
    /// The list is the source's entries in its order (see [`SubsystemSource`]), then the subsystems
    /// added with [`Target::add_subsystem`] that `hostnqn` may connect to and the source does not
    /// list, in NQN order. The work is the window's plus one membership question to the source per
    /// added subsystem the host may use (none on a node whose subsystems all come from its source).
    pub(crate) fn discovery_window(&self, hostnqn: &str, first: u64, count: usize) -> DiscoveryWindow {
        let source = self.shared.source.read().clone();
        let added: Vec<String> = {
            let map = self.shared.subsystems.read();
            map.added.values().filter(|s| s.allows_host(hostnqn)).map(|s| s.nqn().to_owned()).collect()
        };
        let (listed, extra) = match &source {
            Some(src) => {
                let extra: Vec<String> =
                    added.into_iter().filter(|nqn| !src.discovery_lists(hostnqn, nqn)).collect();
                (src.discovery_len(hostnqn), extra)
            }
            None => (0, added),
        };
        let total = listed.saturating_add(extra.len() as u64);
        let end = first.saturating_add(count as u64).min(total);
        let mut nqns = Vec::new();
        if first < end {
            if let (Some(src), true) = (&source, first < listed) {
                let n = usize::try_from(end.min(listed) - first).unwrap_or(count);
                let mut got = src.discovery_range(hostnqn, first, n);
                got.truncate(n);
                nqns = got;
            }
            if end > listed {
                let from = usize::try_from(first.saturating_sub(listed)).unwrap_or(usize::MAX);
                let to = usize::try_from(end - listed).unwrap_or(usize::MAX);
                nqns.extend(extra.into_iter().take(to).skip(from));
            }
        }
        DiscoveryWindow { total, nqns }
    }

    /// Tells discovery controllers that what hosts may see has changed (for [`SubsystemSource`]s:
    /// a volume created, deleted, or a host allowed or denied).
    pub fn notify_discovery_changed(&self) {
        self.discovery_changed();
    }

    /// The subsystem with this NQN.
    #[must_use]
    pub fn subsystem(&self, nqn: &str) -> Option<Arc<Subsystem>> {
        self.shared.subsystems.read().all.get(nqn).cloned()
    }

    /// NQNs of all subsystems.
    #[must_use]
    pub fn subsystem_nqns(&self) -> Vec<String> {
        self.shared.subsystems.read().all.keys().cloned().collect()
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
            self.shared.controllers.lock().discovery.by_id.values().cloned().collect();
        for c in discovery {
            c.raise_event(AsyncEvent::DISCOVERY_LOG_CHANGED, AsyncEventConfig::DISCOVERY_LOG_CHANGE, None);
        }
    }

    // ---- controllers ----

    /// Live controllers of every subsystem (the discovery subsystem's too), in (subsystem NQN,
    /// CNTLID) order. Costs O(controllers): management tools listing everything; for one subsystem
    /// use [`Target::controllers_of_subsystem`], for counts [`Target::controller_count`].
    #[must_use]
    pub fn controllers(&self) -> Vec<ControllerInfo> {
        let all: Vec<Arc<Controller>> = {
            let reg = self.shared.controllers.lock();
            reg.by_subsystem
                .values()
                .chain(std::iter::once(&reg.discovery))
                .flat_map(|set| set.by_id.values().cloned())
                .collect()
        };
        let mut out: Vec<ControllerInfo> =
            all.iter().filter(|c| !c.is_dead()).map(|c| controller_info(c)).collect();
        out.sort_by(|a, b| (a.subnqn.as_str(), a.cntlid).cmp(&(b.subnqn.as_str(), b.cntlid)));
        out
    }

    /// Live controllers of subsystem `subnqn` (the discovery NQN names the discovery controllers),
    /// in CNTLID order. Costs O(controllers of that subsystem).
    #[must_use]
    pub fn controllers_of_subsystem(&self, subnqn: &str) -> Vec<ControllerInfo> {
        let mut out: Vec<ControllerInfo> =
            self.controllers_of(subnqn).iter().filter(|c| !c.is_dead()).map(|c| controller_info(c)).collect();
        out.sort_by_key(|c| c.cntlid);
        out
    }

    /// Number of live controllers, all subsystems and the discovery subsystem together. O(1).
    #[must_use]
    pub fn controller_count(&self) -> usize {
        self.shared.controller_count.load(Ordering::Acquire)
    }

    /// Number of live controllers of subsystem `subnqn` (the discovery NQN counts the discovery
    /// controllers). O(1).
    #[must_use]
    pub fn controller_count_of(&self, subnqn: &str) -> usize {
        self.shared.controllers.lock().set(subnqn).map_or(0, |set| set.by_id.len())
    }

    /// Disconnects controller `cntlid` of subsystem `subnqn` (all its queues): CNTLIDs are unique
    /// per subsystem only. Returns false if there is no such controller.
    pub fn disconnect_controller(&self, subnqn: &str, cntlid: u16) -> bool {
        let ctrl = self.find_controller(subnqn, cntlid);
        ctrl.is_some_and(|c| {
            self.remove_controller(&c, "disconnected by management");
            true
        })
    }

    /// The controllers of subsystem `subnqn` (of its detach tombstones too, which share its NQN).
    pub(crate) fn controllers_of(&self, subnqn: &str) -> Vec<Arc<Controller>> {
        self.shared
            .controllers
            .lock()
            .set(subnqn)
            .map(|set| set.by_id.values().cloned().collect())
            .unwrap_or_default()
    }

    /// Creates a controller of `subsystem` (the discovery subsystem if `None`) with a CNTLID free in
    /// that subsystem; `None` when the subsystem has all `CNTLID_MIN..=CNTLID_MAX` in use.
    pub(crate) fn create_controller(
        &self,
        subsystem: Option<Arc<Subsystem>>,
        hostnqn: String,
        hostid: [u8; 16],
        kato_ms: u32,
        now: Instant,
    ) -> Option<Arc<Controller>> {
        let mut reg = self.shared.controllers.lock();
        let set = match &subsystem {
            None => &mut reg.discovery,
            Some(s) => reg.by_subsystem.entry(Box::from(s.nqn())).or_insert_with(ControllerSet::new),
        };
        let Some(id) = set.allocate() else {
            return None; // a full subsystem has at least one controller: its entry stays
        };
        let ctrl = Arc::new(Controller::new(id, subsystem, hostnqn, hostid, kato_ms, now));
        set.by_id.insert(id, ctrl.clone());
        self.shared.controller_count.fetch_add(1, Ordering::AcqRel);
        Some(ctrl)
    }

    /// Adds a controller with a given CNTLID (one taken over from another process); `None` if the
    /// CNTLID is taken in its subsystem.
    pub(crate) fn insert_controller(
        &self,
        subsystem: Option<Arc<Subsystem>>,
        cntlid: u16,
        hostnqn: String,
        hostid: [u8; 16],
        kato_ms: u32,
        created: Instant,
    ) -> Option<Arc<Controller>> {
        let mut reg = self.shared.controllers.lock();
        let set = match &subsystem {
            None => &mut reg.discovery,
            Some(s) => reg.by_subsystem.entry(Box::from(s.nqn())).or_insert_with(ControllerSet::new),
        };
        if set.by_id.contains_key(&cntlid) {
            return None;
        }
        let ctrl = Arc::new(Controller::new(cntlid, subsystem, hostnqn, hostid, kato_ms, created));
        set.by_id.insert(cntlid, ctrl.clone());
        // New CNTLIDs continue after the highest one taken over (a host must not get a CNTLID that
        // was in use a moment ago if it can be helped).
        if cntlid >= set.next {
            set.next = cntlid.saturating_add(1);
        }
        self.shared.controller_count.fetch_add(1, Ordering::AcqRel);
        Some(ctrl)
    }

    /// Controller `cntlid` of subsystem `subnqn` (dead or alive: callers check).
    pub(crate) fn find_controller(&self, subnqn: &str, cntlid: u16) -> Option<Arc<Controller>> {
        self.shared.controllers.lock().set(subnqn).and_then(|set| set.by_id.get(&cntlid).cloned())
    }

    /// Tears a controller down: gone from the table, every connection serving it woken to close.
    /// `why` is logged (once, by whoever removes it first).
    pub(crate) fn remove_controller(&self, ctrl: &Arc<Controller>, why: &str) {
        {
            let mut reg = self.shared.controllers.lock();
            let nqn = controller_nqn(ctrl);
            let (removed, now_empty) = {
                let set = if ctrl.is_discovery() {
                    Some(&mut reg.discovery)
                } else {
                    reg.by_subsystem.get_mut(nqn)
                };
                match set {
                    Some(set) if set.by_id.get(&ctrl.cntlid).is_some_and(|c| Arc::ptr_eq(c, ctrl)) => {
                        set.by_id.remove(&ctrl.cntlid);
                        (true, set.by_id.is_empty())
                    }
                    _ => (false, false),
                }
            };
            if removed {
                self.shared.controller_count.fetch_sub(1, Ordering::AcqRel);
                if now_empty && !ctrl.is_discovery() {
                    reg.by_subsystem.remove(nqn);
                }
            }
        }
        if ctrl.kill() {
            if why == crate::handover::HANDED_OVER {
                // It lives on in the process that took it over: nothing for an operator to see.
                tracing::debug!(
                    cntlid = ctrl.cntlid,
                    subsystem = controller_nqn(ctrl),
                    "controller handed over"
                );
            } else {
                tracing::info!(
                    cntlid = ctrl.cntlid,
                    host = %ctrl.hostnqn,
                    subsystem = controller_nqn(ctrl),
                    reason = why,
                    "controller removed"
                );
            }
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
