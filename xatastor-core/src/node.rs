//! The storage node: volume lifecycle over a [`VolumeProvisioner`], recorded in the [`Catalog`], and
//! exported lazily through an `nvmeof-target` [`Target`].
//!
//! ```text
//!   admin call ──▶ Node ──▶ 1. intent + records   (catalog transaction, fsync)
//!                      ├──▶ 2. backend operation  (provisioner: create / snapshot / clone / …)
//!                      └──▶ 3. commit             (catalog transaction: state Ready, intent gone)
//!   restart ─────▶ Node::open ──▶ reconcile every pending intent against the backend
//!
//!   host Connect(subnqn) ──▶ Target ──▶ SubsystemSource::activate ──▶ catalog lookup + open device
//!   last controller gone + idle timeout ──▶ reaper unloads the subsystem (fd closed, RAM freed)
//! ```
//!
//! Every lifecycle call is *intent → backend operation → commit*. A crash (kill -9, power loss) at
//! any point leaves an intent in the catalog; [`Node::open`] finishes or undoes it depending on what
//! the backend shows: a volume, clone or snapshot the backend has is kept (made `Ready`), one it
//! does not have is forgotten; a resize is applied again; a delete is carried through.
//!
//! Start-up reads nothing per volume (the catalog is opened, pending intents — usually none — are
//! reconciled). A volume costs nothing while no host uses it: its subsystem is built on the first
//! Connect (an index lookup and opening its device) and dropped again `idle_unload` after its last
//! controller went away. Discovery for a host is served from the catalog's host index.
//!
//! Lifecycle calls are serialised per node (the catalog serialises its writes anyway); I/O is never
//! paused by them: snapshots and clones are taken by the backend under live I/O.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

use nvmeof_target::{HostAccess, NamespaceConfig, SubsystemConfig, SubsystemSource, Target};
use parking_lot::Mutex;

use crate::catalog::{Catalog, CatalogError, Intent, SnapshotRecord, VolumeRecord, VolumeState};
use crate::provision::{
    ProvisionError, SnapshotName, SnapshotRef, Usage, VolumeName, VolumeProvisioner, VolumeSpec,
};

/// Errors of node operations.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum NodeError {
    /// The backend refused or failed.
    #[error(transparent)]
    Provision(#[from] ProvisionError),
    /// The catalog failed.
    #[error(transparent)]
    Catalog(#[from] CatalogError),
    /// No such volume or snapshot.
    #[error("{0} does not exist")]
    NotFound(String),
    /// The name is taken.
    #[error("{0} already exists")]
    AlreadyExists(String),
    /// Hosts are connected and the call was not forced.
    #[error("{volume} has {controllers} connected controller(s); use --force to disconnect them")]
    Busy {
        /// The volume.
        volume: String,
        /// Live controllers.
        controllers: usize,
    },
    /// Clones depend on the snapshot(s) being deleted.
    #[error("{what} has dependent clones: {clones:?}; delete them first")]
    HasDependents {
        /// What was to be deleted.
        what: String,
        /// The clones.
        clones: Vec<String>,
    },
    /// A bad argument (size, block size, host NQN, …).
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// The volume is being created or deleted.
    #[error("{0} is being created or deleted")]
    NotReady(String),
}

/// A step of a lifecycle operation, for crash tests ([`NodeConfig::crash_hook`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Step {
    /// The intent (and records) are committed to the catalog; the backend has not been touched.
    IntentRecorded,
    /// The backend operation is done; the catalog does not know yet.
    BackendDone,
    /// The operation is committed.
    Committed,
}

/// Called at each [`Step`] of each operation (named `create`, `clone`, `snapshot`, `resize`,
/// `delete`, `delete-snapshot`).
pub type CrashHook = Arc<dyn Fn(&'static str, Step) + Send + Sync>;

/// How to run a node.
#[derive(Clone)]
#[non_exhaustive]
pub struct NodeConfig {
    /// The catalog file (created if missing).
    pub catalog_path: PathBuf,
    /// NQN prefix of the node's volumes: a volume's subsystem NQN is `<prefix>:<volume name>`.
    /// `None`: the one stored in the catalog, or a new `nqn.2026-01.io.xatastor:node-<random>`
    /// stored there on first start (so NQNs stay stable across restarts).
    pub nqn_prefix: Option<String>,
    /// How long a volume stays loaded after its last controller left.
    pub idle_unload: Duration,
    /// Called at every step of every lifecycle operation (crash tests abort the process there).
    pub crash_hook: Option<CrashHook>,
}

impl std::fmt::Debug for NodeConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NodeConfig")
            .field("catalog_path", &self.catalog_path)
            .field("nqn_prefix", &self.nqn_prefix)
            .field("idle_unload", &self.idle_unload)
            .finish_non_exhaustive()
    }
}

impl NodeConfig {
    /// Defaults: NQN prefix from the catalog, volumes unloaded 30 s after their last controller.
    #[must_use]
    pub fn new(catalog_path: impl Into<PathBuf>) -> Self {
        Self {
            catalog_path: catalog_path.into(),
            nqn_prefix: None,
            idle_unload: Duration::from_secs(30),
            crash_hook: None,
        }
    }
}

/// What to create.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CreateVolume {
    /// Volume name.
    pub name: String,
    /// Size in bytes (a multiple of the block size).
    pub size_bytes: u64,
    /// 512 or 4096.
    pub block_size: u32,
    /// Compression where the backend has it.
    pub compression: Option<String>,
    /// Host NQNs allowed to connect.
    pub allowed_hosts: Vec<String>,
    /// Any host may connect.
    pub allow_any_host: bool,
}

impl CreateVolume {
    /// A volume of `size_bytes` with 512-byte blocks that no host may use yet.
    #[must_use]
    pub fn new(name: impl Into<String>, size_bytes: u64) -> Self {
        Self {
            name: name.into(),
            size_bytes,
            block_size: 512,
            compression: None,
            allowed_hosts: Vec::new(),
            allow_any_host: false,
        }
    }
}

/// A volume with what is known about it right now.
#[derive(Clone, Debug, PartialEq)]
pub struct VolumeInfo {
    /// The catalog record.
    pub record: VolumeRecord,
    /// Space used, from the backend (`None` if it could not be read).
    pub usage: Option<Usage>,
    /// Its subsystem is loaded (a host is or was recently connected).
    pub active: bool,
    /// Live controllers.
    pub controllers: usize,
}

/// Node-wide gauges.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct NodeStats {
    /// Volumes in the catalog.
    pub volumes_total: u64,
    /// Volumes whose subsystem is loaded.
    pub volumes_active: usize,
    /// Live controllers (all subsystems, discovery included).
    pub controllers: usize,
}

struct Inner {
    catalog: Catalog,
    provisioner: Arc<dyn VolumeProvisioner>,
    target: Target,
    prefix: String,
    ops: Mutex<()>,
    hook: Option<CrashHook>,
    idle_unload: Duration,
    reaper: Mutex<Option<std::thread::Thread>>,
    stop: AtomicBool,
}

/// A storage node: the catalog, the provisioner and the target, kept consistent.
///
/// Cheap to clone; every clone is the same node. The reaper thread stops when the last clone is
/// dropped.
#[derive(Clone)]
pub struct Node {
    inner: Arc<Inner>,
    _guard: Arc<StopGuard>,
}

impl std::fmt::Debug for Node {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Node").field("prefix", &self.inner.prefix).finish_non_exhaustive()
    }
}

/// Stops the reaper when the last `Node` clone goes away.
struct StopGuard(Weak<Inner>);

impl Drop for StopGuard {
    fn drop(&mut self) {
        if let Some(inner) = self.0.upgrade() {
            inner.stop.store(true, Ordering::Release);
            if let Some(t) = inner.reaper.lock().as_ref() {
                t.unpark();
            }
        }
    }
}

/// The [`SubsystemSource`] the node gives its target (holds the node weakly).
struct Source(Weak<Inner>);

#[allow(clippy::disallowed_methods)] // wall-clock creation times
fn unix_now() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

fn random_id() -> [u8; 16] {
    let mut id = [0u8; 16];
    for b in &mut id {
        *b = fastrand::u8(..);
    }
    id
}

fn check_host(h: &str) -> Result<(), NodeError> {
    if h.is_empty() || h.len() > 223 || !h.starts_with("nqn.") || h.contains('\0') {
        return Err(NodeError::InvalidArgument(format!(
            "{h:?} is not a host NQN (nqn.…, at most 223 bytes)"
        )));
    }
    Ok(())
}

fn is_not_found(e: &ProvisionError) -> bool {
    matches!(e, ProvisionError::NotFound(_))
}

impl Node {
    /// Opens the catalog, reconciles pending intents with the backend, and attaches the node to
    /// `target` as its [`SubsystemSource`] (volumes are exported on demand from now on).
    pub fn open(
        config: NodeConfig,
        provisioner: Arc<dyn VolumeProvisioner>,
        target: Target,
    ) -> Result<Node, NodeError> {
        if let Some(dir) = config.catalog_path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)
                .map_err(|e| ProvisionError::io(format!("creating {}", dir.display()), e))?;
        }
        let catalog = Catalog::open(&config.catalog_path)?;
        let prefix = match (config.nqn_prefix, catalog.meta("nqn_prefix")?) {
            (Some(p), _) => p,
            (None, Some(stored)) => String::from_utf8_lossy(&stored).into_owned(),
            (None, None) => {
                let p = format!("nqn.2026-01.io.xatastor:node-{:016x}", fastrand::u64(..));
                let mut t = catalog.begin()?;
                t.set_meta("nqn_prefix", p.as_bytes())?;
                t.commit()?;
                p
            }
        };
        let inner = Arc::new(Inner {
            catalog,
            provisioner,
            target: target.clone(),
            prefix,
            ops: Mutex::new(()),
            hook: config.crash_hook,
            idle_unload: config.idle_unload,
            reaper: Mutex::new(None),
            stop: AtomicBool::new(false),
        });
        let node = Node { _guard: Arc::new(StopGuard(Arc::downgrade(&inner))), inner };
        node.reconcile()?;
        target.set_source(Arc::new(Source(Arc::downgrade(&node.inner))));
        let weak = Arc::downgrade(&node.inner);
        let handle = std::thread::Builder::new()
            .name("xatastor-reaper".into())
            .spawn(move || reaper(&weak))
            .map_err(|e| ProvisionError::io("starting the reaper thread", e))?;
        *node.inner.reaper.lock() = Some(handle.thread().clone());
        Ok(node)
    }

    /// The target the node exports through.
    #[must_use]
    pub fn target(&self) -> &Target {
        &self.inner.target
    }

    /// The catalog.
    #[must_use]
    pub fn catalog(&self) -> &Catalog {
        &self.inner.catalog
    }

    /// The NQN prefix of this node's volumes.
    #[must_use]
    pub fn nqn_prefix(&self) -> &str {
        &self.inner.prefix
    }

    /// The subsystem NQN of volume `name`.
    #[must_use]
    pub fn nqn_of(&self, name: &str) -> String {
        format!("{}:{name}", self.inner.prefix)
    }

    fn step(&self, op: &'static str, step: Step) {
        if let Some(h) = &self.inner.hook {
            h(op, step);
        }
    }

    fn controllers_of(&self, nqn: &str) -> usize {
        self.inner.target.controllers().iter().filter(|c| c.subnqn == nqn).count()
    }

    fn ready_volume(&self, name: &str) -> Result<VolumeRecord, NodeError> {
        let rec =
            self.inner.catalog.volume(name)?.ok_or_else(|| NodeError::NotFound(format!("volume {name}")))?;
        if rec.state != VolumeState::Ready {
            return Err(NodeError::NotReady(format!("volume {name}")));
        }
        Ok(rec)
    }

    fn new_record(
        &self,
        req: &CreateVolume,
        origin: Option<(String, String)>,
    ) -> Result<VolumeRecord, NodeError> {
        VolumeName::new(req.name.clone())?;
        if req.block_size != 512 && req.block_size != 4096 {
            return Err(NodeError::InvalidArgument(format!("block size {} (512 or 4096)", req.block_size)));
        }
        if req.size_bytes == 0 || req.size_bytes % u64::from(req.block_size) != 0 {
            return Err(NodeError::InvalidArgument(format!(
                "size {} is not a positive multiple of the block size {}",
                req.size_bytes, req.block_size
            )));
        }
        for h in &req.allowed_hosts {
            check_host(h)?;
        }
        let mut uuid = random_id();
        uuid[6] = (uuid[6] & 0x0f) | 0x40; // RFC 4122 version 4
        uuid[8] = (uuid[8] & 0x3f) | 0x80;
        let mut hosts = req.allowed_hosts.clone();
        hosts.sort_unstable();
        hosts.dedup();
        Ok(VolumeRecord {
            name: req.name.clone(),
            size_bytes: req.size_bytes,
            block_size: req.block_size,
            compression: req.compression.clone(),
            origin,
            nqn: self.nqn_of(&req.name),
            nguid: random_id(),
            uuid,
            serial: format!("XS{:018x}", fastrand::u64(..) >> 8),
            allow_any_host: req.allow_any_host,
            allowed_hosts: hosts,
            state: VolumeState::Creating,
            created_unix_s: unix_now(),
        })
    }

    /// Creates a volume.
    pub fn create_volume(&self, req: CreateVolume) -> Result<VolumeRecord, NodeError> {
        let mut v = self.create_volumes(vec![req])?;
        v.pop().ok_or_else(|| NodeError::InvalidArgument("nothing created".into()))
    }

    /// Creates many volumes with one catalog transaction before and one after (fleet provisioning).
    /// All or none: if the backend fails on one, those already made are deleted again.
    pub fn create_volumes(&self, reqs: Vec<CreateVolume>) -> Result<Vec<VolumeRecord>, NodeError> {
        let _op = self.inner.ops.lock();
        let mut recs = Vec::with_capacity(reqs.len());
        let mut seen = std::collections::HashSet::new();
        for r in &reqs {
            if !seen.insert(r.name.as_str()) {
                return Err(NodeError::InvalidArgument(format!("{} is given twice", r.name)));
            }
            recs.push(self.new_record(r, None)?);
        }
        // 1. intent + records
        let mut t = self.inner.catalog.begin()?;
        for r in &recs {
            if t.volume(&r.name)?.is_some() {
                return Err(NodeError::AlreadyExists(format!("volume {}", r.name)));
            }
            t.put_volume(r)?;
        }
        let id = t.add_intent(&Intent::Create { names: recs.iter().map(|r| r.name.clone()).collect() })?;
        t.commit()?;
        self.step("create", Step::IntentRecorded);
        // 2. backend
        let mut made: Vec<VolumeName> = Vec::new();
        let mut failure = None;
        for r in &recs {
            let spec = VolumeSpec {
                name: VolumeName::new(r.name.clone())?,
                size_bytes: r.size_bytes,
                block_size: r.block_size,
                compression: r.compression.clone(),
            };
            match self.inner.provisioner.create(&spec) {
                Ok(()) => made.push(spec.name),
                Err(e) => {
                    failure = Some(e);
                    break;
                }
            }
        }
        self.step("create", Step::BackendDone);
        // 3. commit (or undo)
        let mut t = self.inner.catalog.begin()?;
        if let Some(e) = failure {
            for name in &made {
                if let Err(e2) = self.inner.provisioner.delete_volume(name) {
                    tracing::error!(volume = %name, error = %e2, "undoing a failed batch create");
                }
            }
            for r in &recs {
                t.remove_volume(&r.name)?;
            }
            t.remove_intent(id)?;
            t.commit()?;
            return Err(e.into());
        }
        for r in &mut recs {
            r.state = VolumeState::Ready;
            t.put_volume(r)?;
        }
        t.remove_intent(id)?;
        t.commit()?;
        self.step("create", Step::Committed);
        if recs.iter().any(|r| r.allow_any_host || !r.allowed_hosts.is_empty()) {
            self.inner.target.notify_discovery_changed();
        }
        Ok(recs)
    }

    /// Takes snapshots of several volumes in one backend step (atomic where the backend is).
    pub fn snapshot(&self, snapshots: &[(String, String)]) -> Result<Vec<SnapshotRecord>, NodeError> {
        let _op = self.inner.ops.lock();
        let mut refs = Vec::new();
        let mut recs = Vec::new();
        let mut t = self.inner.catalog.begin()?;
        for (vol, snap) in snapshots {
            let r = SnapshotRef {
                volume: VolumeName::new(vol.clone())?,
                snapshot: SnapshotName::new(snap.clone())?,
            };
            let v = t.volume(vol)?.ok_or_else(|| NodeError::NotFound(format!("volume {vol}")))?;
            if v.state != VolumeState::Ready {
                return Err(NodeError::NotReady(format!("volume {vol}")));
            }
            if t.snapshot(vol, snap)?.is_some() || refs.contains(&r) {
                return Err(NodeError::AlreadyExists(format!("snapshot {vol}@{snap}")));
            }
            let rec = SnapshotRecord {
                volume: vol.clone(),
                name: snap.clone(),
                size_bytes: v.size_bytes,
                state: VolumeState::Creating,
                created_unix_s: unix_now(),
            };
            t.put_snapshot(&rec)?;
            refs.push(r);
            recs.push(rec);
        }
        if refs.is_empty() {
            return Err(NodeError::InvalidArgument("no snapshot given".into()));
        }
        let id = t.add_intent(&Intent::Snapshot { snapshots: snapshots.to_vec() })?;
        t.commit()?;
        self.step("snapshot", Step::IntentRecorded);
        let result = self.inner.provisioner.snapshot(&refs);
        self.step("snapshot", Step::BackendDone);
        let mut t = self.inner.catalog.begin()?;
        for r in &mut recs {
            if result.is_ok() {
                r.state = VolumeState::Ready;
                t.put_snapshot(r)?;
            } else {
                t.remove_snapshot(&r.volume, &r.name)?;
            }
        }
        t.remove_intent(id)?;
        t.commit()?;
        result?;
        self.step("snapshot", Step::Committed);
        Ok(recs)
    }

    /// Creates volume `req.name` as a clone of `volume@snapshot` (size: the snapshot's, or larger).
    /// The clone is exportable when this returns.
    pub fn clone_volume(
        &self,
        volume: &str,
        snapshot: &str,
        mut req: CreateVolume,
    ) -> Result<VolumeRecord, NodeError> {
        let _op = self.inner.ops.lock();
        let origin = SnapshotRef {
            volume: VolumeName::new(volume.to_owned())?,
            snapshot: SnapshotName::new(snapshot.to_owned())?,
        };
        let snap = self
            .inner
            .catalog
            .snapshot(volume, snapshot)?
            .filter(|s| s.state == VolumeState::Ready)
            .ok_or_else(|| NodeError::NotFound(format!("snapshot {volume}@{snapshot}")))?;
        let parent = self.ready_volume(volume)?;
        req.block_size = parent.block_size;
        req.size_bytes = req.size_bytes.max(snap.size_bytes);
        if req.compression.is_none() {
            req.compression.clone_from(&parent.compression);
        }
        let mut rec = self.new_record(&req, Some((volume.to_owned(), snapshot.to_owned())))?;
        let mut t = self.inner.catalog.begin()?;
        if t.volume(&rec.name)?.is_some() {
            return Err(NodeError::AlreadyExists(format!("volume {}", rec.name)));
        }
        t.put_volume(&rec)?;
        let id = t.add_intent(&Intent::Clone {
            name: rec.name.clone(),
            origin: (volume.to_owned(), snapshot.to_owned()),
            size_bytes: rec.size_bytes,
        })?;
        t.commit()?;
        self.step("clone", Step::IntentRecorded);
        let spec = VolumeSpec {
            name: VolumeName::new(rec.name.clone())?,
            size_bytes: rec.size_bytes,
            block_size: rec.block_size,
            compression: rec.compression.clone(),
        };
        let result = self.inner.provisioner.clone_snapshot(&origin, &spec);
        self.step("clone", Step::BackendDone);
        let mut t = self.inner.catalog.begin()?;
        match &result {
            Ok(()) => {
                rec.state = VolumeState::Ready;
                t.put_volume(&rec)?;
            }
            Err(_) => t.remove_volume(&rec.name)?,
        }
        t.remove_intent(id)?;
        t.commit()?;
        result?;
        self.step("clone", Step::Committed);
        if rec.allow_any_host || !rec.allowed_hosts.is_empty() {
            self.inner.target.notify_discovery_changed();
        }
        Ok(rec)
    }

    /// Resizes a volume; connected hosts see the new size (Namespace Attribute Changed).
    pub fn resize(&self, name: &str, new_size_bytes: u64) -> Result<VolumeRecord, NodeError> {
        let _op = self.inner.ops.lock();
        let mut rec = self.ready_volume(name)?;
        if new_size_bytes == 0 || new_size_bytes % u64::from(rec.block_size) != 0 {
            return Err(NodeError::InvalidArgument(format!(
                "size {new_size_bytes} is not a positive multiple of the block size {}",
                rec.block_size
            )));
        }
        let mut t = self.inner.catalog.begin()?;
        let id = t.add_intent(&Intent::Resize {
            name: name.to_owned(),
            from: rec.size_bytes,
            to: new_size_bytes,
        })?;
        t.commit()?;
        self.step("resize", Step::IntentRecorded);
        let result = self.inner.provisioner.resize(&VolumeName::new(name.to_owned())?, new_size_bytes);
        self.step("resize", Step::BackendDone);
        let mut t = self.inner.catalog.begin()?;
        if result.is_ok() {
            rec.size_bytes = new_size_bytes;
            t.put_volume(&rec)?;
        }
        t.remove_intent(id)?;
        t.commit()?;
        result?;
        self.step("resize", Step::Committed);
        if self.inner.target.subsystem(&rec.nqn).is_some() {
            if let Err(e) = self.inner.target.resize_namespace(&rec.nqn, 1, new_size_bytes) {
                tracing::warn!(volume = name, error = %e, "resized, but the loaded namespace did not follow");
            }
        }
        Ok(rec)
    }

    /// Deletes a volume and its snapshots. Refused while hosts are connected unless `force` (which
    /// disconnects them first), and while clones depend on one of its snapshots.
    pub fn delete_volume(&self, name: &str, force: bool) -> Result<(), NodeError> {
        let _op = self.inner.ops.lock();
        let rec =
            self.inner.catalog.volume(name)?.ok_or_else(|| NodeError::NotFound(format!("volume {name}")))?;
        let clones = self.inner.catalog.clones_of_volume(name)?;
        if !clones.is_empty() {
            return Err(NodeError::HasDependents { what: format!("volume {name}"), clones });
        }
        let live = self.controllers_of(&rec.nqn);
        if live > 0 && !force {
            return Err(NodeError::Busy { volume: name.to_owned(), controllers: live });
        }
        let mut t = self.inner.catalog.begin()?;
        let mut deleting = rec.clone();
        deleting.state = VolumeState::Deleting;
        t.put_volume(&deleting)?; // not exported, not discoverable from here on
        let id = t.add_intent(&Intent::DeleteVolume { name: name.to_owned() })?;
        t.commit()?;
        self.step("delete", Step::IntentRecorded);
        if self.inner.target.subsystem(&rec.nqn).is_some() {
            let _ = self.inner.target.remove_subsystem(&rec.nqn, true);
        }
        self.delete_in_backend(name)?;
        self.step("delete", Step::BackendDone);
        let mut t = self.inner.catalog.begin()?;
        for s in t.snapshot_names(name)? {
            t.remove_snapshot(name, &s)?;
        }
        t.remove_volume(name)?;
        t.remove_intent(id)?;
        t.commit()?;
        self.step("delete", Step::Committed);
        if rec.allow_any_host || !rec.allowed_hosts.is_empty() {
            self.inner.target.notify_discovery_changed();
        }
        Ok(())
    }

    /// Deletes a volume's snapshots and the volume in the backend; "not found" counts as done. A
    /// device still closing after its hosts were disconnected is the provisioner's to wait for
    /// (zvol-backend retries `Busy` for a while; files and memory are never busy).
    fn delete_in_backend(&self, name: &str) -> Result<(), NodeError> {
        let vol = VolumeName::new(name.to_owned())?;
        for s in self.inner.catalog.snapshots_of(name)? {
            let r = SnapshotRef { volume: vol.clone(), snapshot: SnapshotName::new(s.name)? };
            match self.inner.provisioner.delete_snapshot(&r) {
                Ok(()) => {}
                Err(e) if is_not_found(&e) => {}
                Err(e) => return Err(e.into()),
            }
        }
        match self.inner.provisioner.delete_volume(&vol) {
            Ok(()) => Ok(()),
            Err(e) if is_not_found(&e) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    /// Deletes a snapshot. Refused while clones depend on it.
    pub fn delete_snapshot(&self, volume: &str, snapshot: &str) -> Result<(), NodeError> {
        let _op = self.inner.ops.lock();
        if self.inner.catalog.snapshot(volume, snapshot)?.is_none() {
            return Err(NodeError::NotFound(format!("snapshot {volume}@{snapshot}")));
        }
        let clones = self.inner.catalog.clones_of(volume, snapshot)?;
        if !clones.is_empty() {
            return Err(NodeError::HasDependents { what: format!("snapshot {volume}@{snapshot}"), clones });
        }
        let r = SnapshotRef {
            volume: VolumeName::new(volume.to_owned())?,
            snapshot: SnapshotName::new(snapshot.to_owned())?,
        };
        let mut t = self.inner.catalog.begin()?;
        let id =
            t.add_intent(&Intent::DeleteSnapshot { snapshot: (volume.to_owned(), snapshot.to_owned()) })?;
        t.commit()?;
        self.step("delete-snapshot", Step::IntentRecorded);
        match self.inner.provisioner.delete_snapshot(&r) {
            Ok(()) => {}
            Err(e) if is_not_found(&e) => {}
            Err(e) => {
                let mut t = self.inner.catalog.begin()?;
                t.remove_intent(id)?;
                t.commit()?;
                return Err(e.into());
            }
        }
        self.step("delete-snapshot", Step::BackendDone);
        let mut t = self.inner.catalog.begin()?;
        t.remove_snapshot(volume, snapshot)?;
        t.remove_intent(id)?;
        t.commit()?;
        self.step("delete-snapshot", Step::Committed);
        Ok(())
    }

    /// Lets `hostnqn` connect to the volume.
    pub fn allow_host(&self, name: &str, hostnqn: &str) -> Result<VolumeRecord, NodeError> {
        check_host(hostnqn)?;
        let _op = self.inner.ops.lock();
        let mut rec = self.ready_volume(name)?;
        if !rec.allowed_hosts.iter().any(|h| h == hostnqn) {
            rec.allowed_hosts.push(hostnqn.to_owned());
            rec.allowed_hosts.sort_unstable();
            let mut t = self.inner.catalog.begin()?;
            t.put_volume(&rec)?;
            t.commit()?;
        }
        if self.inner.target.subsystem(&rec.nqn).is_some() {
            let _ = self.inner.target.allow_host(&rec.nqn, hostnqn);
        }
        self.inner.target.notify_discovery_changed();
        Ok(rec)
    }

    /// Stops `hostnqn` from connecting; with `disconnect`, its controllers are torn down too.
    pub fn deny_host(&self, name: &str, hostnqn: &str, disconnect: bool) -> Result<VolumeRecord, NodeError> {
        let _op = self.inner.ops.lock();
        let mut rec = self.ready_volume(name)?;
        rec.allowed_hosts.retain(|h| h != hostnqn);
        let mut t = self.inner.catalog.begin()?;
        t.put_volume(&rec)?;
        t.commit()?;
        if self.inner.target.subsystem(&rec.nqn).is_some() {
            let _ = self.inner.target.deny_host(&rec.nqn, hostnqn, disconnect);
        }
        self.inner.target.notify_discovery_changed();
        Ok(rec)
    }

    /// A volume with its usage and activity.
    pub fn volume(&self, name: &str) -> Result<VolumeInfo, NodeError> {
        let record =
            self.inner.catalog.volume(name)?.ok_or_else(|| NodeError::NotFound(format!("volume {name}")))?;
        let usage = match VolumeName::new(name.to_owned()) {
            Ok(n) if record.state == VolumeState::Ready => self.inner.provisioner.usage(&n).ok(),
            _ => None,
        };
        let active = self.inner.target.subsystem(&record.nqn).is_some();
        let controllers = if active { self.controllers_of(&record.nqn) } else { 0 };
        Ok(VolumeInfo { record, usage, active, controllers })
    }

    /// Up to `limit` volume records in name order, names starting with `prefix`, after `after`.
    pub fn volumes(
        &self,
        prefix: &str,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<VolumeRecord>, NodeError> {
        Ok(self.inner.catalog.volumes(prefix, after, limit)?)
    }

    /// Snapshots of a volume.
    pub fn snapshots(&self, volume: &str) -> Result<Vec<SnapshotRecord>, NodeError> {
        if self.inner.catalog.volume(volume)?.is_none() {
            return Err(NodeError::NotFound(format!("volume {volume}")));
        }
        Ok(self.inner.catalog.snapshots_of(volume)?)
    }

    /// Node-wide gauges.
    pub fn stats(&self) -> Result<NodeStats, NodeError> {
        let prefix = format!("{}:", self.inner.prefix);
        Ok(NodeStats {
            volumes_total: self.inner.catalog.volume_count()?,
            volumes_active: self
                .inner
                .target
                .subsystem_nqns()
                .iter()
                .filter(|n| n.starts_with(&prefix))
                .count(),
            controllers: self.inner.target.controllers().len(),
        })
    }

    /// Adds the backend's volumes and snapshots that the catalog does not know (a one-time import of
    /// an existing pool; never on the start path). Returns the names of the adopted volumes.
    pub fn adopt_existing(&self) -> Result<Vec<String>, NodeError> {
        let _op = self.inner.ops.lock();
        let listed = self.inner.provisioner.list()?;
        let mut t = self.inner.catalog.begin()?;
        let mut adopted = Vec::new();
        for v in listed {
            if t.volume(v.name.as_str())?.is_some() {
                continue;
            }
            let req = CreateVolume::new(v.name.as_str(), v.size_bytes.max(512));
            let mut rec =
                self.new_record(&req, v.origin.map(|o| (o.volume.to_string(), o.snapshot.to_string())))?;
            rec.size_bytes = v.size_bytes;
            rec.state = VolumeState::Ready;
            t.put_volume(&rec)?;
            for s in v.snapshots {
                t.put_snapshot(&SnapshotRecord {
                    volume: v.name.to_string(),
                    name: s.to_string(),
                    size_bytes: v.size_bytes,
                    state: VolumeState::Ready,
                    created_unix_s: unix_now(),
                })?;
            }
            adopted.push(v.name.to_string());
        }
        t.commit()?;
        Ok(adopted)
    }

    /// Finishes or undoes every pending intent (see the module documentation).
    fn reconcile(&self) -> Result<(), NodeError> {
        let _op = self.inner.ops.lock();
        let p = &self.inner.provisioner;
        for (id, intent) in self.inner.catalog.intents()? {
            tracing::info!(?intent, "reconciling an operation interrupted by a crash");
            let mut t = self.inner.catalog.begin()?;
            match &intent {
                Intent::Create { names } => {
                    for name in names {
                        let exists = p.exists(&VolumeName::new(name.clone())?)?;
                        match t.volume(name)? {
                            Some(mut rec) if exists => {
                                rec.state = VolumeState::Ready;
                                t.put_volume(&rec)?;
                            }
                            _ => t.remove_volume(name)?,
                        }
                    }
                }
                Intent::Clone { name, size_bytes, .. } => {
                    let vol = VolumeName::new(name.clone())?;
                    match t.volume(name)? {
                        Some(mut rec) if p.exists(&vol)? => {
                            // The clone may have been made but not grown yet.
                            if p.usage(&vol).map(|u| u.size_bytes < *size_bytes).unwrap_or(false) {
                                p.resize(&vol, *size_bytes)?;
                            }
                            rec.state = VolumeState::Ready;
                            t.put_volume(&rec)?;
                        }
                        _ => t.remove_volume(name)?,
                    }
                }
                Intent::Snapshot { snapshots } => {
                    for (vol, snap) in snapshots {
                        let r = SnapshotRef {
                            volume: VolumeName::new(vol.clone())?,
                            snapshot: SnapshotName::new(snap.clone())?,
                        };
                        match t.snapshot(vol, snap)? {
                            Some(mut rec) if p.snapshot_exists(&r)? => {
                                rec.state = VolumeState::Ready;
                                t.put_snapshot(&rec)?;
                            }
                            _ => t.remove_snapshot(vol, snap)?,
                        }
                    }
                }
                Intent::Resize { name, from, to } => {
                    if let Some(mut rec) = t.volume(name)? {
                        let vol = VolumeName::new(name.clone())?;
                        rec.size_bytes = match p.resize(&vol, *to) {
                            Ok(()) => *to,
                            Err(e) => {
                                tracing::warn!(volume = %name, error = %e, "resize could not be finished; keeping the old size");
                                p.usage(&vol).map_or(*from, |u| u.size_bytes)
                            }
                        };
                        t.put_volume(&rec)?;
                    }
                }
                Intent::DeleteVolume { name } => {
                    self.delete_in_backend(name)?;
                    for s in t.snapshot_names(name)? {
                        t.remove_snapshot(name, &s)?;
                    }
                    t.remove_volume(name)?;
                }
                Intent::DeleteSnapshot { snapshot: (vol, snap) } => {
                    let r = SnapshotRef {
                        volume: VolumeName::new(vol.clone())?,
                        snapshot: SnapshotName::new(snap.clone())?,
                    };
                    match p.delete_snapshot(&r) {
                        Ok(()) => {}
                        Err(e) if is_not_found(&e) => {}
                        Err(e) => return Err(e.into()),
                    }
                    t.remove_snapshot(vol, snap)?;
                }
            }
            t.remove_intent(id)?;
            t.commit()?;
        }
        Ok(())
    }
}

impl SubsystemSource for Source {
    fn activate(&self, subnqn: &str) -> Option<(SubsystemConfig, Vec<NamespaceConfig>)> {
        let inner = self.0.upgrade()?;
        let name = subnqn.strip_prefix(inner.prefix.as_str())?.strip_prefix(':')?;
        let rec = match inner.catalog.volume(name) {
            Ok(Some(r)) if r.state == VolumeState::Ready => r,
            Ok(_) => return None,
            Err(e) => {
                tracing::error!(volume = name, error = %e, "catalog lookup failed on connect");
                return None;
            }
        };
        let backend = match VolumeName::new(name.to_owned())
            .map_err(|e| e.to_string())
            .and_then(|n| inner.provisioner.open(&n, rec.block_size).map_err(|e| e.to_string()))
        {
            Ok(b) => b,
            Err(e) => {
                tracing::error!(volume = name, error = %e, "cannot open the volume for a host");
                return None;
            }
        };
        let mut config = SubsystemConfig::new(rec.nqn.clone(), rec.serial.clone());
        config.model = "Xatastor volume".into();
        config.access = if rec.allow_any_host { HostAccess::AllowAny } else { HostAccess::DenyAllExcept };
        config.allowed_hosts = rec.allowed_hosts.clone();
        let ns = NamespaceConfig { nsid: 1, backend, nguid: rec.nguid, uuid: rec.uuid };
        tracing::debug!(volume = name, "volume activated");
        Some((config, vec![ns]))
    }

    fn activated(&self, _subnqn: &str) {
        if let Some(inner) = self.0.upgrade() {
            if let Some(t) = inner.reaper.lock().as_ref() {
                t.unpark(); // something to watch now
            }
        }
    }

    fn discovery_nqns(&self, hostnqn: &str) -> Vec<String> {
        let Some(inner) = self.0.upgrade() else { return Vec::new() };
        match inner.catalog.volumes_for_host(hostnqn) {
            Ok(names) => names.into_iter().map(|n| format!("{}:{n}", inner.prefix)).collect(),
            Err(e) => {
                tracing::error!(error = %e, "catalog lookup failed for discovery");
                Vec::new()
            }
        }
    }
}

/// Unloads volumes whose last controller left more than `idle_unload` ago. Sleeps without a
/// timeout while nothing is loaded (an idle node has no timer running).
#[allow(clippy::disallowed_methods)] // the reaper owns its clock
fn reaper(weak: &Weak<Inner>) {
    let mut idle_since: HashMap<String, std::time::Instant> = HashMap::new();
    loop {
        let (period, loaded) = {
            let Some(inner) = weak.upgrade() else { return };
            if inner.stop.load(Ordering::Acquire) {
                return;
            }
            let prefix = format!("{}:", inner.prefix);
            let loaded: std::collections::HashSet<String> =
                inner.target.subsystem_nqns().into_iter().filter(|n| n.starts_with(&prefix)).collect();
            let busy: std::collections::HashSet<String> =
                inner.target.controllers().into_iter().map(|c| c.subnqn).collect();
            let now = std::time::Instant::now();
            idle_since.retain(|n, _| loaded.contains(n) && !busy.contains(n));
            let mut unloaded = 0;
            for nqn in &loaded {
                if busy.contains(nqn) {
                    continue;
                }
                let since = *idle_since.entry(nqn.clone()).or_insert(now);
                if now.duration_since(since) >= inner.idle_unload && inner.target.unload_subsystem(nqn) {
                    tracing::debug!(subnqn = %nqn, "idle volume unloaded");
                    idle_since.remove(nqn);
                    unloaded += 1;
                }
            }
            // A volume activated meanwhile unparks this thread, so the next round sees it.
            let still = loaded.len() > unloaded;
            ((inner.idle_unload / 2).max(Duration::from_millis(50)), still)
        };
        if loaded {
            std::thread::park_timeout(period);
        } else {
            std::thread::park();
        }
    }
}
