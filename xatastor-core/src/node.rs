//! The storage node: volume lifecycle over a [`VolumeProvisioner`], recorded in the [`Catalog`], and
//! exported lazily through an `nvmeof-target` [`Target`].
//!
//! ```text
//!   admin call ──▶ Node ──▶ 1. intent + records   (catalog transaction, fsync)
//!                      ├──▶ 2. backend operation  (provisioner: create / snapshot / clone / …)
//!                      └──▶ 3. commit or undo     (catalog transaction: state Ready, intent gone)
//!   restart ─────▶ Node::open ──▶ check the recorded backend ──▶ reconcile every pending intent
//!
//!   host Connect(subnqn) ──▶ Target ──▶ SubsystemSource::activate ──▶ catalog lookup + open device
//!   last controller gone + idle timeout ──▶ reaper unloads the subsystem (fd closed, RAM freed)
//! ```
//!
//! Every lifecycle call is *intent → backend operation → commit*, written once
//! (`Node::journaled`). A crash (kill -9, power loss) at any point leaves an intent in the catalog;
//! [`Node::open`] finishes or undoes it depending on what the backend shows: volumes, a clone or
//! snapshots the backend has are kept (made `Ready`), ones it does not have are forgotten — except
//! that a batch of creates is all or none: if the backend made only some of a batch, those are
//! deleted again and the whole batch is forgotten; a resize is applied again; a delete is carried
//! through (also one that failed in the backend: it stays `Deleting` until then). Reconciliation logs one summary line (counts), not the names.
//!
//! **Backend.** The catalog records which backend its volumes live on (kind and dataset or
//! directory). [`Node::open`] refuses a different one ([`NodeError::BackendMismatch`]) unless
//! [`NodeConfig::rebind_backend`] says the volumes really moved there, or the catalog has no volume.
//! A backend whose volumes do not outlive the process (memory) is recorded per provisioner instance
//! (a new process has a new one): at the next start the previous instance's volumes are forgotten,
//! with one log line. A volume the backend lacks is never
//! reported ready ([`VolumeState::Missing`]) and never exported.
//!
//! **Sizes.** Shrinking destroys data: it is refused unless forced, and a forced shrink is refused
//! while a host is connected (the volume is unloaded and fenced against new connections while the
//! backend shrinks it). Growing and creating are refused past the overcommit limit
//! ([`NodeConfig::overcommit_ratio`]): provisioned bytes over the backend pool's size.
//!
//! **Host access** is editable at any time: allow a host, deny an allowed one (an error for one that
//! is not), let any host connect or stop that; each change raises a discovery log change event and,
//! when asked, disconnects the hosts that lost access. A forced delete and a deny with disconnect take
//! the namespace away from the hosts first (a Namespace Attribute Changed event; see
//! [`nvmeof_target::Target::detach_namespaces`]), so a Linux host drops its block device at once
//! instead of retrying for its `ctrl_loss_tmo`.
//!
//! **Host authentication** (DH-HMAC-CHAP, see [`crate::secrets`]). A volume may require every host
//! to authenticate ([`Node::set_require_auth`]; recorded in the catalog, applied to the loaded
//! subsystem at once). A host may have a secret for a volume, and a controller secret for
//! bidirectional authentication ([`Node::set_host_secrets`], [`Node::allow_host_with_secrets`],
//! [`Node::generate_host_secrets`]): a host with a secret must authenticate even where the volume
//! does not require it of everyone. Secrets live in the secrets directory (0700, files 0600), never
//! in the catalog or a log line; the catalog lists which hosts have one, so that a lost secrets
//! file keeps the volume from being exported instead of letting its hosts in without. Changing a
//! secret never drops a connected host: the new secret is checked at the host's next
//! (re)authentication — a Linux host re-authenticates its queues when its
//! `/sys/class/nvme/nvmeX/dhchap_secret` (or `dhchap_ctrl_secret`) is written, and on reconnect.
//!
//! Every change is ordered so that a crash never leaves a host able to skip an authentication that
//! was set up, and needs nothing reconciled at start: a secret is written (file, fsync, rename,
//! directory fsync) *before* the catalog lists its host or the host is allowed, and the catalog
//! stops listing a host (or denies it) *before* its secret is removed. After a crash between the two
//! steps the secret still applies (the call failed; repeating it finishes it). A new volume's
//! secrets are written before its create is recorded (after removing any file a deleted volume of
//! the same name left); a delete removes them with the backend volume and is carried through at the
//! next start like the rest of it; a create or clone that is undone removes them. Clones get no
//! secret of their origin unless asked ([`VolumeAuthOptions::inherit_secrets`]), but they require
//! authentication whenever their origin does (their data is the origin's).
//!
//! Start-up reads nothing per volume (the catalog is opened, pending intents — usually none — are
//! reconciled). A volume costs nothing while no host uses it: its subsystem is built on the first
//! Connect (an index lookup and opening its device) and dropped again `idle_unload` after its last
//! controller went away (INFO lines `volume loaded` / `volume unloaded`). Discovery for a host is
//! served from the catalog's host index.
//!
//! Lifecycle calls are serialised per node (the catalog serialises its writes anyway); I/O is never
//! paused by them: snapshots and clones are taken by the backend under live I/O.

#![cfg_attr(
    not(test),
    deny(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing, clippy::panic)
)]

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

use nvmeof_target::{
    HostAccess, NamespaceConfig, StatsSnapshot, Subsystem, SubsystemConfig, SubsystemSource, Target,
};
use parking_lot::Mutex;

use nvmeof_target::auth::{DhchapSecret, HostSecrets, OsEntropy};

use crate::catalog::{
    unix_now, BackendRecord, Catalog, CatalogError, CatalogTxn, Intent, SnapshotRecord, VolumeRecord,
    VolumeState,
};
use crate::provision::{
    ProvisionError, SnapshotName, SnapshotRef, Usage, VolumeName, VolumeProvisioner, VolumeSpec,
};
use crate::ratelimit::RateLimit;
use crate::secrets::{
    LoadedSecrets, NodeHostKeys, SecretParams, SecretsDir, SecretsError, VolumeAuth, VolumeSecrets,
};

/// Longest wait for hosts to see that a volume's namespace was taken away from them before their
/// connections are cut (forced delete, deny with disconnect); a live Linux host answers in
/// milliseconds.
pub const DETACH_WAIT: Duration = Duration::from_secs(3);

/// The largest volume: 1 EiB (far beyond any pool; keeps every size computation in range).
pub const MAX_VOLUME_BYTES: u64 = 1 << 60;

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
    /// The secrets directory or a secrets file is unusable (permissions, owner, contents, I/O).
    #[error(transparent)]
    Secrets(#[from] SecretsError),
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
    /// No random bytes for a new secret.
    #[error("cannot make a secret: {0}")]
    Entropy(String),
    /// The volume is being created or deleted.
    #[error("{0} is being created or deleted")]
    NotReady(String),
    /// The catalog's volumes live on another backend than the one the node was started with.
    #[error("the catalog's volumes are on {recorded}, not on {given}")]
    BackendMismatch {
        /// The backend recorded in the catalog.
        recorded: BackendRecord,
        /// The backend the node was started with.
        given: BackendRecord,
    },
    /// A smaller size without `force`.
    #[error(
        "shrinking {volume} from {from_bytes} to {to_bytes} bytes destroys the data beyond the new end; \
         use --force (no host may be connected)"
    )]
    ShrinkNotForced {
        /// The volume.
        volume: String,
        /// Its size.
        from_bytes: u64,
        /// The size asked for.
        to_bytes: u64,
    },
    /// A forced shrink of a volume that hosts are connected to.
    #[error(
        "{volume} has {controllers} connected controller(s): disconnect them before shrinking it (a host \
         would read and write beyond the new end)"
    )]
    ShrinkWhileConnected {
        /// The volume.
        volume: String,
        /// Live controllers.
        controllers: usize,
    },
    /// Creating or growing would provision more than the overcommit limit allows.
    #[error(
        "{requested_bytes} more bytes would provision {provisioned_after_bytes} bytes on a pool of \
         {pool_bytes} bytes, {ratio:.2}x its size; the overcommit limit is {limit}x"
    )]
    OvercommitExceeded {
        /// Bytes the call would add.
        requested_bytes: u64,
        /// Provisioned bytes after the call.
        provisioned_after_bytes: u64,
        /// The pool's size.
        pool_bytes: u64,
        /// `provisioned_after_bytes / pool_bytes`.
        ratio: f64,
        /// The configured limit.
        limit: f64,
    },
    /// Denying a host that is not among the allowed ones.
    #[error("host {host} is not among the allowed hosts of volume {volume}")]
    HostNotAllowed {
        /// The volume.
        volume: String,
        /// The host NQN.
        host: String,
    },
    /// Denying one host of a volume that lets any host connect.
    #[error(
        "volume {volume} lets any host connect, so no single host can be denied: turn any-host off first, \
         then allow hosts one by one"
    )]
    AnyHostAllowed {
        /// The volume.
        volume: String,
    },
}

/// A step of a lifecycle operation, for crash tests ([`NodeConfig::crash_hook`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Step {
    /// The intent (and records) are committed to the catalog; the backend has not been touched.
    IntentRecorded,
    /// One item of a multi-item backend operation is done (each volume of a batch create), more
    /// are to come.
    BackendPartial,
    /// The backend operation is done; the catalog does not know yet.
    BackendDone,
    /// The operation is committed.
    Committed,
    /// A volume's secrets file is written or removed (durably); for `set-secrets` the catalog does
    /// not list the host yet, for `remove-secrets` and `deny-host` it already stopped listing it.
    SecretsFileWritten,
    /// The catalog's list of hosts with secrets (or its allowed hosts) is committed; for
    /// `set-secrets` and `allow-host` the secrets file was written before, for `remove-secrets`
    /// and `deny-host` it is still to be changed.
    SecretsCatalogWritten,
}

/// Called at each [`Step`] of each operation (named `create`, `clone`, `snapshot`, `resize`,
/// `delete`, `delete-snapshot`, `set-secrets`, `remove-secrets`, `allow-host`, `deny-host`).
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
    /// Provisioned bytes may be at most this many times the backend pool's size (creates and grows
    /// past it are refused). `None`: no limit. Ignored where the backend cannot tell its size.
    pub overcommit_ratio: Option<f64>,
    /// Record the provisioner's backend in the catalog even if another one is recorded (the dataset
    /// was renamed, the directory moved). Volumes the backend lacks then show as missing.
    pub rebind_backend: bool,
    /// Called at every step of every lifecycle operation (crash tests abort the process there).
    pub crash_hook: Option<CrashHook>,
    /// The directory of the volumes' DH-HMAC-CHAP secrets (created 0700; refused if others may
    /// access it). `None`: `secrets` beside the catalog file.
    pub secrets_dir: Option<PathBuf>,
}

impl std::fmt::Debug for NodeConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NodeConfig")
            .field("catalog_path", &self.catalog_path)
            .field("nqn_prefix", &self.nqn_prefix)
            .field("idle_unload", &self.idle_unload)
            .field("overcommit_ratio", &self.overcommit_ratio)
            .field("rebind_backend", &self.rebind_backend)
            .field("secrets_dir", &self.secrets_dir)
            .finish_non_exhaustive()
    }
}

impl NodeConfig {
    /// Defaults: NQN prefix from the catalog, volumes unloaded 30 s after their last controller, no
    /// overcommit limit, the recorded backend enforced, secrets in `secrets` beside the catalog.
    #[must_use]
    pub fn new(catalog_path: impl Into<PathBuf>) -> Self {
        Self {
            catalog_path: catalog_path.into(),
            nqn_prefix: None,
            idle_unload: Duration::from_secs(30),
            overcommit_ratio: None,
            rebind_backend: false,
            crash_hook: None,
            secrets_dir: None,
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

/// How a new volume (or clone) authenticates its hosts from the start
/// ([`Node::create_volumes_with_auth`], [`Node::clone_volume_with_auth`]).
///
/// Setting it at creation leaves no moment in which an allowed host could connect without: the
/// secrets are written before the volume can be exported.
#[derive(Clone, Debug, Default)]
#[non_exhaustive]
pub struct VolumeAuthOptions {
    /// Every host must authenticate. A clone requires it also when its origin does.
    pub require_auth: bool,
    /// Secrets of hosts, stored with the volume: `(host NQN, secrets)`.
    pub host_secrets: Vec<(String, HostSecrets)>,
    /// Clones only: copy every host secret of the origin volume (those in `host_secrets` take
    /// precedence). Without it a clone starts with no secret.
    pub inherit_secrets: bool,
}

impl VolumeAuthOptions {
    /// Nothing asked: no secret, not required (a clone still follows its origin's requirement).
    #[must_use]
    pub fn new() -> Self {
        Self::default()
    }
}

/// A volume with what is known about it right now.
#[derive(Clone, Debug, PartialEq)]
pub struct VolumeInfo {
    /// The catalog record (`state` is [`VolumeState::Missing`] when the backend lacks the volume).
    pub record: VolumeRecord,
    /// Space used, from the backend (`None` if it could not be read).
    pub usage: Option<Usage>,
    /// Its subsystem is loaded (a host is or was recently connected).
    pub active: bool,
    /// Live controllers.
    pub controllers: usize,
    /// Authentication: required or not, hosts with secrets (never the secrets).
    pub auth: VolumeAuth,
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
    /// Volumes whose DH-HMAC-CHAP secrets are in memory (those loaded; none while all are idle).
    pub secrets_loaded: usize,
}

/// Space: what the volumes may grow to against what the backend's pool has.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
#[non_exhaustive]
pub struct NodeCapacity {
    /// Sum of all volume sizes (thin: what hosts may write, not what is written).
    pub provisioned_bytes: u64,
    /// The pool's size (`None` if the backend cannot tell).
    pub pool_bytes: Option<u64>,
    /// Bytes used in the pool (by volumes, snapshots and anything else on it).
    pub used_bytes: Option<u64>,
    /// Bytes still available in the pool.
    pub available_bytes: Option<u64>,
    /// `provisioned_bytes / pool_bytes`.
    pub overcommit: Option<f64>,
    /// The configured limit of `overcommit` (`None`: no limit).
    pub overcommit_limit: Option<f64>,
}

/// I/O counters of the node's volumes, loaded or not: monotonic for the life of the process (a
/// volume's counters are added to the unloaded total when its subsystem is dropped).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct IoTotals {
    /// Read commands completed.
    pub reads: u64,
    /// Write commands completed.
    pub writes: u64,
    /// Bytes read.
    pub read_bytes: u64,
    /// Bytes written.
    pub write_bytes: u64,
    /// Flush, Write Zeroes and Dataset Management commands completed.
    pub other: u64,
    /// Commands completed with an error status.
    pub errors: u64,
}

impl IoTotals {
    fn add(&mut self, s: &StatsSnapshot) {
        self.reads = self.reads.saturating_add(s.reads);
        self.writes = self.writes.saturating_add(s.writes);
        self.read_bytes = self.read_bytes.saturating_add(s.read_bytes);
        self.write_bytes = self.write_bytes.saturating_add(s.write_bytes);
        self.other = self.other.saturating_add(s.other);
        self.errors = self.errors.saturating_add(s.errors);
    }
}

struct Inner {
    catalog: Catalog,
    provisioner: Arc<dyn VolumeProvisioner>,
    target: Target,
    prefix: String,
    ops: Mutex<()>,
    hook: Option<CrashHook>,
    idle_unload: Duration,
    overcommit_ratio: Option<f64>,
    reaper: Mutex<Option<std::thread::JoinHandle<()>>>,
    stop: AtomicBool,
    /// Volumes that must not be activated right now (being shrunk).
    fenced: Mutex<HashSet<String>>,
    /// Counters of the subsystems dropped so far.
    unloaded_io: Mutex<IoTotals>,
    /// Warnings a host can trigger over and over.
    open_failures: RateLimit,
    /// The secrets directory.
    secrets: SecretsDir,
    /// Secrets of the loaded volumes (the target's [`nvmeof_target::auth::HostKeys`] reads them).
    loaded_secrets: Arc<LoadedSecrets>,
}

impl Inner {
    /// Reads volume `rec`'s secrets into memory (when it is activated); returns the entry's
    /// generation. A secrets file that lacks a host the catalog lists is refused
    /// ([`SecretsError::Missing`]) after reading the record again: a removal commits the catalog
    /// before it rewrites the file, so a record read before that may list one host too many.
    fn load_secrets(&self, rec: &VolumeRecord) -> Result<u64, NodeError> {
        self.loaded_secrets.load(&rec.name, || {
            let secrets = self.secrets.read(&rec.name)?;
            let lacking = |hosts: &[String]| -> Vec<String> {
                hosts.iter().filter(|h| secrets.get(h).is_none()).cloned().collect()
            };
            if lacking(&rec.dhchap_hosts).is_empty() {
                return Ok(secrets);
            }
            let listed = self.catalog.volume(&rec.name)?.map(|r| r.dhchap_hosts).unwrap_or_default();
            let missing = lacking(&listed);
            if missing.is_empty() {
                Ok(secrets)
            } else {
                Err(SecretsError::Missing { path: self.secrets.file_of(&rec.name), hosts: missing }.into())
            }
        })
    }

    /// The secrets of volume `rec`, refused if its file lacks a host the catalog lists (the file was
    /// lost or replaced: [`SecretsError::Missing`]), so that no change made on top of such a file
    /// forgets the hosts it lacks — which could then connect without authenticating. `except` is
    /// a host the caller is about to give a secret (or take it from).
    fn read_secrets_checked(
        &self,
        rec: &VolumeRecord,
        except: Option<&str>,
    ) -> Result<VolumeSecrets, NodeError> {
        let secrets = self.secrets.read(&rec.name)?;
        let missing: Vec<String> = rec
            .dhchap_hosts
            .iter()
            .filter(|h| Some(h.as_str()) != except && secrets.get(h).is_none())
            .cloned()
            .collect();
        if missing.is_empty() {
            Ok(secrets)
        } else {
            Err(SecretsError::Missing { path: self.secrets.file_of(&rec.name), hosts: missing }.into())
        }
    }

    /// Gives volume `name`'s loaded subsystem (if any) the requirement the catalog records now.
    /// Serialised with every other such call, so the last one applies the latest record.
    fn apply_require_auth(&self, name: &str) {
        self.loaded_secrets.with_update_lock(name, || match self.catalog.volume(name) {
            Ok(Some(rec)) => {
                if self.target.subsystem(&rec.nqn).is_some() {
                    // Unloaded meanwhile: nothing to apply.
                    let _ = self.target.set_auth_required(&rec.nqn, rec.require_auth);
                }
            }
            Ok(None) => {}
            Err(e) => {
                tracing::error!(volume = name, error = %e, "catalog lookup failed applying the authentication requirement")
            }
        });
    }

    /// Adds a dropped subsystem's counters to the unloaded total.
    fn retire(&self, subsystem: &Subsystem) {
        let mut totals = self.unloaded_io.lock();
        for ns in subsystem.namespaces().values() {
            totals.add(&ns.stats().snapshot());
        }
    }
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

/// Stops the reaper when the last `Node` clone goes away, and waits for it: the reaper may hold
/// the node's state for a moment during a tick, and the catalog's file lock goes with that state —
/// once the last clone is dropped, the same catalog can be opened again at once.
struct StopGuard(Weak<Inner>);

impl Drop for StopGuard {
    fn drop(&mut self) {
        let handle = self.0.upgrade().and_then(|inner| {
            inner.stop.store(true, Ordering::Release);
            let handle = inner.reaper.lock().take();
            if let Some(h) = &handle {
                h.thread().unpark();
            }
            handle
        });
        if let Some(h) = handle {
            if h.thread().id() != std::thread::current().id() {
                let _ = h.join();
            }
        }
    }
}

/// Keeps a volume from being activated while it lives.
struct Fence<'a> {
    inner: &'a Inner,
    name: String,
}

impl<'a> Fence<'a> {
    fn new(inner: &'a Inner, name: &str) -> Self {
        inner.fenced.lock().insert(name.to_owned());
        Self { inner, name: name.to_owned() }
    }
}

impl Drop for Fence<'_> {
    fn drop(&mut self) {
        self.inner.fenced.lock().remove(&self.name);
    }
}

/// The [`SubsystemSource`] the node gives its target (holds the node weakly).
struct Source(Weak<Inner>);

fn check_host(h: &str) -> Result<(), NodeError> {
    if h.is_empty() || h.len() > 223 || !h.starts_with("nqn.") || h.contains('\0') {
        return Err(NodeError::InvalidArgument(format!(
            "{h:?} is not a host NQN (nqn.…, at most 223 bytes)"
        )));
    }
    Ok(())
}

/// A host NQN that may have a secret: a host NQN without control characters (the secrets file has
/// one host a line).
fn check_secret_host(h: &str) -> Result<(), NodeError> {
    check_host(h)?;
    if h.chars().any(char::is_control) {
        return Err(NodeError::InvalidArgument(format!("host NQN {h:?} contains control characters")));
    }
    Ok(())
}

/// The secrets of a new volume, checked (each host once, valid NQNs).
fn secrets_of(hosts: &[(String, HostSecrets)]) -> Result<VolumeSecrets, NodeError> {
    let mut secrets = VolumeSecrets::new();
    for (h, s) in hosts {
        check_secret_host(h)?;
        if secrets.get(h).is_some() {
            return Err(NodeError::InvalidArgument(format!("host {h} is given two secrets")));
        }
        secrets.set(h, s.clone());
    }
    Ok(secrets)
}

fn check_size(size_bytes: u64, block_size: u32) -> Result<(), NodeError> {
    if size_bytes == 0 || size_bytes % u64::from(block_size) != 0 {
        return Err(NodeError::InvalidArgument(format!(
            "size {size_bytes} is not a positive multiple of the block size {block_size}"
        )));
    }
    if size_bytes > MAX_VOLUME_BYTES {
        return Err(NodeError::InvalidArgument(format!(
            "size {size_bytes} is larger than the largest volume ({MAX_VOLUME_BYTES} bytes, 1 EiB)"
        )));
    }
    Ok(())
}

fn is_not_found(e: &ProvisionError) -> bool {
    matches!(e, ProvisionError::NotFound(_))
}

/// "Not found" counts as done (deletes).
fn done_if_not_found(r: Result<(), ProvisionError>) -> Result<(), ProvisionError> {
    match r {
        Err(e) if is_not_found(&e) => Ok(()),
        other => other,
    }
}

/// The backend record of a provisioner, its location relative to the catalog's directory when it
/// lies inside it (so a data directory can be moved whole).
fn backend_record(p: &dyn VolumeProvisioner, catalog_dir: &Path) -> BackendRecord {
    let mut location = p.location();
    let dir = std::fs::canonicalize(catalog_dir).unwrap_or_else(|_| catalog_dir.to_owned());
    if let Ok(rest) = Path::new(&location).strip_prefix(&dir) {
        location = if rest.as_os_str().is_empty() { ".".into() } else { rest.display().to_string() };
    }
    BackendRecord { kind: p.kind().to_owned(), location, durable: p.durable() }
}

/// Whether a finished operation's intent is dropped, or kept for the next start to carry through.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum IntentAfter {
    Drop,
    Keep,
}

/// What a reconciliation did, for its summary line.
#[derive(Debug, Default)]
struct Reconciled {
    operations: usize,
    volumes_kept: usize,
    volumes_forgotten: usize,
    volumes_undone: usize,
    snapshots_kept: usize,
    snapshots_forgotten: usize,
    resizes: usize,
    deletes: usize,
}

impl Node {
    /// Opens the catalog, checks that it belongs to `provisioner`'s backend (recording it on the
    /// first start), opens the secrets directory ([`NodeConfig::secrets_dir`]; created 0700, refused
    /// if others may access it), reconciles pending intents with the backend, and attaches the node
    /// to `target` as its [`SubsystemSource`] (volumes are exported on demand from now on) and as its
    /// [`nvmeof_target::auth::HostKeys`] (replacing any the target had; subsystems that are not the
    /// node's volumes have no host secrets through it). No secret is read here: a volume's secrets
    /// are read when a host's Connect loads it.
    pub fn open(
        config: NodeConfig,
        provisioner: Arc<dyn VolumeProvisioner>,
        target: Target,
    ) -> Result<Node, NodeError> {
        let catalog_dir = match config.catalog_path.parent().filter(|d| !d.as_os_str().is_empty()) {
            Some(dir) => {
                std::fs::create_dir_all(dir)
                    .map_err(|e| ProvisionError::io(format!("creating {}", dir.display()), e))?;
                dir.to_owned()
            }
            None => PathBuf::from("."),
        };
        let catalog = Catalog::open(&config.catalog_path)?;
        Self::check_backend(&catalog, &*provisioner, &catalog_dir, config.rebind_backend)?;
        let prefix = match (config.nqn_prefix, catalog.meta("nqn_prefix")?) {
            (Some(p), _) => p,
            (None, Some(stored)) => String::from_utf8_lossy(&stored).into_owned(),
            (None, None) => {
                let id = uuid::Uuid::new_v4().simple().to_string();
                let p = format!("nqn.2026-01.io.xatastor:node-{}", id.get(..16).unwrap_or(&id));
                let mut t = catalog.begin()?;
                t.set_meta("nqn_prefix", p.as_bytes())?;
                t.commit()?;
                p
            }
        };
        let secrets = SecretsDir::open(config.secrets_dir.unwrap_or_else(|| catalog_dir.join("secrets")))?;
        let loaded_secrets = Arc::new(LoadedSecrets::new().map_err(|e| {
            NodeError::InvalidArgument(format!("cannot make the node's placeholder secret: {e}"))
        })?);
        target.set_host_keys(Arc::new(NodeHostKeys::new(&prefix, loaded_secrets.clone())));
        let inner = Arc::new(Inner {
            catalog,
            provisioner,
            target: target.clone(),
            prefix,
            ops: Mutex::new(()),
            hook: config.crash_hook,
            idle_unload: config.idle_unload,
            overcommit_ratio: config.overcommit_ratio,
            reaper: Mutex::new(None),
            stop: AtomicBool::new(false),
            fenced: Mutex::new(HashSet::new()),
            unloaded_io: Mutex::new(IoTotals::default()),
            open_failures: RateLimit::new(Duration::from_secs(10)),
            secrets,
            loaded_secrets,
        });
        let node = Node { _guard: Arc::new(StopGuard(Arc::downgrade(&inner))), inner };
        node.reconcile()?;
        node.load_secrets_of_loaded_volumes();
        target.set_source(Arc::new(Source(Arc::downgrade(&node.inner))));
        let weak = Arc::downgrade(&node.inner);
        let handle = std::thread::Builder::new()
            .name("xatastor-reaper".into())
            .spawn(move || reaper(&weak))
            .map_err(|e| ProvisionError::io("starting the reaper thread", e))?;
        *node.inner.reaper.lock() = Some(handle);
        Ok(node)
    }

    /// Secrets of volumes the target already has loaded (a node opened again on the same target):
    /// without them their hosts could not authenticate.
    fn load_secrets_of_loaded_volumes(&self) {
        let prefix = format!("{}:", self.inner.prefix);
        for nqn in self.inner.target.subsystem_nqns() {
            let Some(name) = nqn.strip_prefix(&prefix) else { continue };
            match self.inner.catalog.volume(name) {
                Ok(Some(rec)) => {
                    if let Err(e) = self.inner.load_secrets(&rec) {
                        tracing::error!(volume = name, error = %e, "cannot load the secrets of a loaded volume: its hosts cannot authenticate");
                    }
                    let _ = self.inner.target.set_auth_required(&nqn, rec.require_auth);
                }
                Ok(None) => {}
                Err(e) => tracing::error!(volume = name, error = %e, "catalog lookup failed"),
            }
        }
    }

    /// Records the backend on the first start; refuses another one; forgets the volumes of a
    /// non-durable backend's previous instance.
    fn check_backend(
        catalog: &Catalog,
        provisioner: &dyn VolumeProvisioner,
        catalog_dir: &Path,
        rebind: bool,
    ) -> Result<(), NodeError> {
        let given = backend_record(provisioner, catalog_dir);
        let recorded = catalog.backend()?;
        if recorded.as_ref() == Some(&given) {
            return Ok(());
        }
        let volumes = catalog.volume_count()?;
        let pending = !catalog.intents()?.is_empty();
        let mut t = catalog.begin()?;
        match recorded {
            None if volumes > 0 => {
                tracing::info!(backend = %given, volumes, "recording the backend of the catalog's volumes");
            }
            None => {}
            Some(old) if !old.durable && old.kind == given.kind && (volumes > 0 || pending) => {
                let n = t.clear_volumes()?;
                tracing::info!(
                    backend = %given,
                    volumes = n,
                    "forgot the volumes of the previous run: {} volumes do not outlive their process",
                    given.kind
                );
            }
            Some(old) if volumes == 0 && !pending => {
                tracing::info!(from = %old, to = %given, "the catalog has no volume: recording the new backend");
            }
            Some(old) if rebind => {
                tracing::warn!(
                    from = %old,
                    to = %given,
                    volumes,
                    "rebinding the catalog to another backend: volumes it lacks will show as missing"
                );
            }
            Some(old) => return Err(NodeError::BackendMismatch { recorded: old, given }),
        }
        t.set_backend(&given)?;
        t.commit()?;
        Ok(())
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

    /// The provisioner.
    #[must_use]
    pub fn provisioner(&self) -> &Arc<dyn VolumeProvisioner> {
        &self.inner.provisioner
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
        self.inner.target.controller_count_of(nqn)
    }

    fn ready_volume(&self, name: &str) -> Result<VolumeRecord, NodeError> {
        let rec =
            self.inner.catalog.volume(name)?.ok_or_else(|| NodeError::NotFound(format!("volume {name}")))?;
        if rec.state != VolumeState::Ready {
            return Err(NodeError::NotReady(format!("volume {name}")));
        }
        Ok(rec)
    }

    /// The one shape of every lifecycle operation: `record` writes the records and returns the
    /// intent (one transaction, with the intent); `backend` does the backend operation; `finish`
    /// commits its outcome (success or failure) in a second transaction that also drops the intent.
    /// The crash hook sees each step.
    fn journaled<R>(
        &self,
        op: &'static str,
        record: impl FnOnce(&mut CatalogTxn) -> Result<Intent, NodeError>,
        backend: impl FnOnce() -> Result<R, NodeError>,
        finish: impl FnOnce(&mut CatalogTxn, Result<&R, &NodeError>) -> Result<IntentAfter, NodeError>,
    ) -> Result<R, NodeError> {
        let mut t = self.inner.catalog.begin()?;
        let intent = record(&mut t)?;
        let id = t.add_intent(&intent)?;
        t.commit()?;
        self.step(op, Step::IntentRecorded);
        let result = backend();
        if result.is_ok() {
            self.step(op, Step::BackendDone);
        }
        let mut t = self.inner.catalog.begin()?;
        if finish(&mut t, result.as_ref())? == IntentAfter::Drop {
            t.remove_intent(id)?;
        }
        t.commit()?;
        let r = result?;
        self.step(op, Step::Committed);
        Ok(r)
    }

    /// Refuses `more_bytes` of new provisioned size past the overcommit limit (or past `u64`).
    fn check_capacity(&self, more_bytes: u64) -> Result<(), NodeError> {
        let now = self.inner.catalog.provisioned_bytes()?;
        let after = now.checked_add(more_bytes).ok_or_else(|| {
            NodeError::InvalidArgument(format!(
                "{more_bytes} more bytes on top of the {now} provisioned do not fit in 64 bits"
            ))
        })?;
        let Some(limit) = self.inner.overcommit_ratio else { return Ok(()) };
        let pool = match self.inner.provisioner.capacity() {
            Ok(Some(c)) if c.total_bytes > 0 => c.total_bytes,
            Ok(_) => return Ok(()),
            Err(e) => {
                tracing::warn!(error = %e, "cannot read the pool's capacity; not checking the overcommit limit");
                return Ok(());
            }
        };
        let ratio = after as f64 / pool as f64;
        if ratio > limit {
            return Err(NodeError::OvercommitExceeded {
                requested_bytes: more_bytes,
                provisioned_after_bytes: after,
                pool_bytes: pool,
                ratio,
                limit,
            });
        }
        Ok(())
    }

    /// Provisioned bytes against the backend pool's size.
    pub fn capacity(&self) -> Result<NodeCapacity, NodeError> {
        let provisioned_bytes = self.inner.catalog.provisioned_bytes()?;
        let pool = self.inner.provisioner.capacity()?;
        Ok(NodeCapacity {
            provisioned_bytes,
            pool_bytes: pool.map(|c| c.total_bytes),
            used_bytes: pool.map(|c| c.total_bytes.saturating_sub(c.available_bytes)),
            available_bytes: pool.map(|c| c.available_bytes),
            overcommit: pool
                .filter(|c| c.total_bytes > 0)
                .map(|c| provisioned_bytes as f64 / c.total_bytes as f64),
            overcommit_limit: self.inner.overcommit_ratio,
        })
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
        check_size(req.size_bytes, req.block_size)?;
        for h in &req.allowed_hosts {
            check_host(h)?;
        }
        let mut hosts = req.allowed_hosts.clone();
        hosts.sort_unstable();
        hosts.dedup();
        let mut rec = VolumeRecord::new(&req.name, &self.inner.prefix, req.size_bytes, req.block_size);
        rec.compression.clone_from(&req.compression);
        rec.origin = origin;
        rec.allow_any_host = req.allow_any_host;
        rec.allowed_hosts = hosts;
        Ok(rec)
    }

    /// Removes the secrets of a volume whose create was undone (logged if that fails: nothing can
    /// use them, and the next create of the name replaces them).
    fn forget_secrets_of_undone(&self, name: &str) {
        if let Err(e) = self.inner.secrets.remove(name) {
            tracing::warn!(volume = name, error = %e, "cannot remove the secrets of a volume that was not created");
        }
    }

    /// Refuses a name the backend has although the catalog does not (it was made outside the node:
    /// adopt it instead), so that undoing a create never deletes a volume the node did not make.
    fn check_backend_free(&self, name: &str) -> Result<(), NodeError> {
        if self.inner.provisioner.exists(&VolumeName::new(name.to_owned())?)? {
            return Err(NodeError::AlreadyExists(format!(
                "volume {name} (in the backend, not in the catalog: `volume adopt` imports it)"
            )));
        }
        Ok(())
    }

    /// Creates a volume.
    pub fn create_volume(&self, req: CreateVolume) -> Result<VolumeRecord, NodeError> {
        let mut v = self.create_volumes(vec![req])?;
        v.pop().ok_or_else(|| NodeError::InvalidArgument("nothing created".into()))
    }

    /// Creates many volumes with one catalog transaction before and one after (fleet provisioning).
    /// All or none, also across a crash: if the backend fails on one, those already made are deleted
    /// again; after a crash in the middle, [`Node::open`] does the same.
    pub fn create_volumes(&self, reqs: Vec<CreateVolume>) -> Result<Vec<VolumeRecord>, NodeError> {
        self.create_volumes_with_auth(reqs, &VolumeAuthOptions::default())
    }

    /// Creates a volume that authenticates its hosts from the start (see [`VolumeAuthOptions`]).
    pub fn create_volume_with_auth(
        &self,
        req: CreateVolume,
        auth: &VolumeAuthOptions,
    ) -> Result<VolumeRecord, NodeError> {
        let mut v = self.create_volumes_with_auth(vec![req], auth)?;
        v.pop().ok_or_else(|| NodeError::InvalidArgument("nothing created".into()))
    }

    /// [`Node::create_volumes`] with the same authentication settings for every volume of the batch:
    /// each gets the requirement and the secrets, written before the create is recorded (a volume
    /// of the batch is never exported without them) — for the whole batch with one data fsync (one
    /// file, hard-linked; a later change of one volume's secrets is that volume's alone).
    pub fn create_volumes_with_auth(
        &self,
        reqs: Vec<CreateVolume>,
        auth: &VolumeAuthOptions,
    ) -> Result<Vec<VolumeRecord>, NodeError> {
        let secrets = secrets_of(&auth.host_secrets)?;
        let _op = self.inner.ops.lock();
        let mut recs = Vec::with_capacity(reqs.len());
        let mut seen = HashSet::new();
        let mut total = 0u64;
        for r in &reqs {
            if !seen.insert(r.name.as_str()) {
                return Err(NodeError::InvalidArgument(format!("{} is given twice", r.name)));
            }
            let mut rec = self.new_record(r, None)?;
            rec.require_auth = auth.require_auth;
            rec.dhchap_hosts = secrets.hosts().map(|(h, _)| h.to_owned()).collect();
            total = total.checked_add(rec.size_bytes).ok_or_else(|| {
                NodeError::InvalidArgument("the sizes of the volumes add up to more than 64 bits".into())
            })?;
            recs.push(rec);
        }
        if recs.is_empty() {
            return Ok(recs);
        }
        if let Some(name) = self.inner.catalog.first_existing(recs.iter().map(|r| r.name.as_str()))? {
            return Err(NodeError::AlreadyExists(format!("volume {name}")));
        }
        for r in &recs {
            self.check_backend_free(&r.name)?;
        }
        self.check_capacity(total)?;
        // Before anything is recorded: the new volumes' secrets, replacing whatever a deleted volume
        // of the same name may have left.
        let names: Vec<&str> = recs.iter().map(|r| r.name.as_str()).collect();
        self.inner.secrets.write_many(&names, &secrets)?;
        if !secrets.is_empty() {
            self.step("create", Step::SecretsFileWritten);
        }
        let made: Mutex<Vec<VolumeName>> = Mutex::new(Vec::new());
        let count = recs.len();
        self.journaled(
            "create",
            |t| {
                for r in &recs {
                    if t.volume(&r.name)?.is_some() {
                        return Err(NodeError::AlreadyExists(format!("volume {}", r.name)));
                    }
                    t.put_volume(r)?;
                }
                Ok(Intent::Create { names: recs.iter().map(|r| r.name.clone()).collect() })
            },
            || {
                for (i, r) in recs.iter().enumerate() {
                    let spec = VolumeSpec {
                        name: VolumeName::new(r.name.clone())?,
                        size_bytes: r.size_bytes,
                        block_size: r.block_size,
                        compression: r.compression.clone(),
                    };
                    self.inner.provisioner.create(&spec)?;
                    made.lock().push(spec.name);
                    if i + 1 < count {
                        self.step("create", Step::BackendPartial);
                    }
                }
                Ok(())
            },
            |t, result| {
                if result.is_err() {
                    for name in made.lock().iter() {
                        if let Err(e) = self.inner.provisioner.delete_volume(name) {
                            tracing::error!(volume = %name, error = %e, "undoing a failed batch create");
                        }
                    }
                    for r in &recs {
                        t.remove_volume(&r.name)?;
                        self.forget_secrets_of_undone(&r.name);
                    }
                    return Ok(IntentAfter::Drop);
                }
                for r in &recs {
                    t.put_volume(&VolumeRecord { state: VolumeState::Ready, ..r.clone() })?;
                }
                Ok(IntentAfter::Drop)
            },
        )?;
        for r in &mut recs {
            r.state = VolumeState::Ready;
        }
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
        for (vol, snap) in snapshots {
            let r = SnapshotRef {
                volume: VolumeName::new(vol.clone())?,
                snapshot: SnapshotName::new(snap.clone())?,
            };
            let v = self.ready_volume(vol)?;
            if self.inner.catalog.snapshot(vol, snap)?.is_some() || refs.contains(&r) {
                return Err(NodeError::AlreadyExists(format!("snapshot {vol}@{snap}")));
            }
            refs.push(r);
            recs.push(SnapshotRecord {
                volume: vol.clone(),
                name: snap.clone(),
                size_bytes: v.size_bytes,
                state: VolumeState::Creating,
                created_unix_s: unix_now(),
            });
        }
        if refs.is_empty() {
            return Err(NodeError::InvalidArgument("no snapshot given".into()));
        }
        self.journaled(
            "snapshot",
            |t| {
                for r in &recs {
                    t.put_snapshot(r)?;
                }
                Ok(Intent::Snapshot { snapshots: snapshots.to_vec() })
            },
            || Ok(self.inner.provisioner.snapshot(&refs)?),
            |t, result| {
                for r in &recs {
                    if result.is_ok() {
                        t.put_snapshot(&SnapshotRecord { state: VolumeState::Ready, ..r.clone() })?;
                    } else {
                        t.remove_snapshot(&r.volume, &r.name)?;
                    }
                }
                Ok(IntentAfter::Drop)
            },
        )?;
        for r in &mut recs {
            r.state = VolumeState::Ready;
        }
        Ok(recs)
    }

    /// Creates volume `req.name` as a clone of `volume@snapshot`. `req.size_bytes` 0 means the
    /// snapshot's size; a smaller size or one that is not a multiple of the volume's block size is
    /// refused. The clone is exportable when this returns. It requires authentication if its origin
    /// does, and has no host secret (see [`Node::clone_volume_with_auth`]).
    pub fn clone_volume(
        &self,
        volume: &str,
        snapshot: &str,
        req: CreateVolume,
    ) -> Result<VolumeRecord, NodeError> {
        self.clone_volume_with_auth(volume, snapshot, req, &VolumeAuthOptions::default())
    }

    /// [`Node::clone_volume`] with authentication settings: the clone requires authentication if
    /// `auth` or its origin does; its secrets are `auth.host_secrets`, plus the origin's if
    /// `auth.inherit_secrets` — written before the clone is recorded.
    pub fn clone_volume_with_auth(
        &self,
        volume: &str,
        snapshot: &str,
        mut req: CreateVolume,
        auth: &VolumeAuthOptions,
    ) -> Result<VolumeRecord, NodeError> {
        let explicit = secrets_of(&auth.host_secrets)?;
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
        if req.size_bytes == 0 {
            req.size_bytes = snap.size_bytes;
        } else if req.size_bytes < snap.size_bytes {
            return Err(NodeError::InvalidArgument(format!(
                "a clone of {volume}@{snapshot} needs at least the snapshot's {} bytes, not {}",
                snap.size_bytes, req.size_bytes
            )));
        }
        if req.compression.is_none() {
            req.compression.clone_from(&parent.compression);
        }
        let mut rec = self.new_record(&req, Some((volume.to_owned(), snapshot.to_owned())))?;
        if self.inner.catalog.volume(&rec.name)?.is_some() {
            return Err(NodeError::AlreadyExists(format!("volume {}", rec.name)));
        }
        self.check_backend_free(&rec.name)?;
        self.check_capacity(rec.size_bytes)?;
        let mut secrets = if auth.inherit_secrets {
            self.inner.read_secrets_checked(&parent, None)?
        } else {
            VolumeSecrets::new()
        };
        secrets.overlay(&explicit);
        rec.require_auth = auth.require_auth || parent.require_auth;
        rec.dhchap_hosts = secrets.hosts().map(|(h, _)| h.to_owned()).collect();
        self.inner.secrets.write(&rec.name, &secrets)?;
        if !secrets.is_empty() {
            self.step("clone", Step::SecretsFileWritten);
        }
        let spec = VolumeSpec {
            name: VolumeName::new(rec.name.clone())?,
            size_bytes: rec.size_bytes,
            block_size: rec.block_size,
            compression: rec.compression.clone(),
        };
        let ready = VolumeRecord { state: VolumeState::Ready, ..rec.clone() };
        self.journaled(
            "clone",
            |t| {
                t.put_volume(&rec)?;
                Ok(Intent::Clone {
                    name: rec.name.clone(),
                    origin: (volume.to_owned(), snapshot.to_owned()),
                    size_bytes: rec.size_bytes,
                })
            },
            || Ok(self.inner.provisioner.clone_snapshot(&origin, &spec)?),
            |t, result| {
                match result {
                    Ok(()) => t.put_volume(&ready)?,
                    Err(_) => {
                        t.remove_volume(&rec.name)?;
                        self.forget_secrets_of_undone(&rec.name);
                    }
                }
                Ok(IntentAfter::Drop)
            },
        )?;
        if ready.allow_any_host || !ready.allowed_hosts.is_empty() {
            self.inner.target.notify_discovery_changed();
        }
        Ok(ready)
    }

    /// Resizes a volume; connected hosts see a larger size at once (Namespace Attribute Changed).
    ///
    /// A smaller size destroys the data beyond it: refused unless `force`, and refused while hosts
    /// are connected even then. During a forced shrink the volume is unloaded and cannot be
    /// connected to.
    pub fn resize(&self, name: &str, new_size_bytes: u64, force: bool) -> Result<VolumeRecord, NodeError> {
        let _op = self.inner.ops.lock();
        let mut rec = self.ready_volume(name)?;
        check_size(new_size_bytes, rec.block_size)?;
        if new_size_bytes == rec.size_bytes {
            return Ok(rec);
        }
        let shrink = new_size_bytes < rec.size_bytes;
        let _fence = if shrink {
            if !force {
                return Err(NodeError::ShrinkNotForced {
                    volume: name.to_owned(),
                    from_bytes: rec.size_bytes,
                    to_bytes: new_size_bytes,
                });
            }
            let fence = Fence::new(&self.inner, name);
            if let Some(subsystem) = self.inner.target.subsystem(&rec.nqn) {
                if !self.inner.target.unload_subsystem(&rec.nqn) {
                    return Err(NodeError::ShrinkWhileConnected {
                        volume: name.to_owned(),
                        controllers: self.controllers_of(&rec.nqn).max(1),
                    });
                }
                self.inner.retire(&subsystem);
                self.inner.loaded_secrets.forget(name); // fenced: not loaded again meanwhile
            }
            Some(fence)
        } else {
            self.check_capacity(new_size_bytes - rec.size_bytes)?;
            None
        };
        let vol = VolumeName::new(name.to_owned())?;
        let from = rec.size_bytes;
        self.journaled(
            "resize",
            |_| Ok(Intent::Resize { name: name.to_owned(), from, to: new_size_bytes }),
            || Ok(self.inner.provisioner.resize(&vol, new_size_bytes, shrink)?),
            |t, result| {
                if result.is_ok() {
                    t.put_volume(&VolumeRecord { size_bytes: new_size_bytes, ..rec.clone() })?;
                }
                Ok(IntentAfter::Drop)
            },
        )?;
        rec.size_bytes = new_size_bytes;
        if shrink {
            tracing::info!(
                volume = name,
                from_bytes = from,
                to_bytes = new_size_bytes,
                "volume shrunk (forced)"
            );
        } else if self.inner.target.subsystem(&rec.nqn).is_some() {
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
        if live > 0 {
            self.detach_hosts(name, &rec.nqn, None);
        }
        let deleting = VolumeRecord { state: VolumeState::Deleting, ..rec.clone() };
        self.journaled(
            "delete",
            |t| {
                t.put_volume(&deleting)?; // not exported, not discoverable from here on
                Ok(Intent::DeleteVolume { name: name.to_owned() })
            },
            || {
                if let Some(subsystem) = self.inner.target.subsystem(&rec.nqn) {
                    let _ = self.inner.target.remove_subsystem(&rec.nqn, true);
                    self.inner.retire(&subsystem);
                }
                self.delete_in_backend(name)?;
                self.inner.loaded_secrets.forget(name);
                if self.inner.secrets.remove(name)? {
                    self.step("delete", Step::SecretsFileWritten);
                }
                Ok(())
            },
            |t, result| match result {
                Ok(()) => {
                    t.remove_volume_and_snapshots(name)?;
                    Ok(IntentAfter::Drop)
                }
                // Still `Deleting`, with its intent: the next start carries the delete through.
                Err(_) => Ok(IntentAfter::Keep),
            },
        )?;
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
            done_if_not_found(self.inner.provisioner.delete_snapshot(&r))?;
        }
        Ok(done_if_not_found(self.inner.provisioner.delete_volume(&vol))?)
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
        self.journaled(
            "delete-snapshot",
            |_| Ok(Intent::DeleteSnapshot { snapshot: (volume.to_owned(), snapshot.to_owned()) }),
            || Ok(done_if_not_found(self.inner.provisioner.delete_snapshot(&r))?),
            |t, result| {
                if result.is_ok() {
                    t.remove_snapshot(volume, snapshot)?;
                }
                Ok(IntentAfter::Drop)
            },
        )
    }

    /// Takes the volume's namespace away from the hosts about to be disconnected (all, or
    /// `hostnqn`) and waits until they have seen it, at most [`DETACH_WAIT`]: the Linux host then
    /// drops the block device and fails its I/O at once, instead of queueing it while it retries for
    /// its `ctrl_loss_tmo`. Its reconnects get an empty controller, so that it stops.
    #[allow(clippy::disallowed_methods)] // the node waits on its own clock, not the engine's
    fn detach_hosts(&self, volume: &str, nqn: &str, hostnqn: Option<&str>) {
        let detach = self.inner.target.detach_namespaces(nqn, hostnqn);
        if detach.is_empty() {
            return;
        }
        let start = std::time::Instant::now();
        while !detach.is_acknowledged() && start.elapsed() < DETACH_WAIT {
            std::thread::sleep(Duration::from_millis(2));
        }
        tracing::info!(
            volume,
            controllers = detach.len(),
            acknowledged = detach.is_acknowledged(),
            waited_ms = start.elapsed().as_millis() as u64,
            "hosts detached before disconnecting them"
        );
    }

    /// Writes a volume record whose host access changed.
    fn save(&self, rec: &VolumeRecord) -> Result<(), NodeError> {
        let mut t = self.inner.catalog.begin()?;
        t.put_volume(rec)?;
        Ok(t.commit()?)
    }

    /// Lets `hostnqn` connect to the volume (nothing changes if it may already). Raises a discovery
    /// log change event.
    pub fn allow_host(&self, name: &str, hostnqn: &str) -> Result<VolumeRecord, NodeError> {
        check_host(hostnqn)?;
        let _op = self.inner.ops.lock();
        let mut rec = self.ready_volume(name)?;
        if rec.allowed_hosts.iter().any(|h| h == hostnqn) {
            return Ok(rec);
        }
        rec.allowed_hosts.push(hostnqn.to_owned());
        rec.allowed_hosts.sort_unstable();
        self.save(&rec)?;
        self.host_allowed(&rec, hostnqn);
        Ok(rec)
    }

    /// Tells the target (or, for a volume that is not loaded, discovery) that `hostnqn` was allowed.
    fn host_allowed(&self, rec: &VolumeRecord, hostnqn: &str) {
        let target = &self.inner.target;
        // A loaded subsystem raises the event itself.
        if target.subsystem(&rec.nqn).is_none() || target.allow_host(&rec.nqn, hostnqn).is_err() {
            target.notify_discovery_changed();
        }
    }

    /// Lets `hostnqn` connect to the volume with DH-HMAC-CHAP `secrets` (`allow-host …
    /// --dhchap-secret-file`): the secrets are stored (replacing earlier ones) *before* the host is
    /// allowed, so that at no moment, crash included, may it connect without them. Raises a
    /// discovery log change event if the host was not allowed yet. Connected hosts stay connected
    /// (see [`Node::set_host_secrets`]).
    pub fn allow_host_with_secrets(
        &self,
        name: &str,
        hostnqn: &str,
        secrets: HostSecrets,
    ) -> Result<VolumeRecord, NodeError> {
        check_secret_host(hostnqn)?;
        let _op = self.inner.ops.lock();
        let mut rec = self.ready_volume(name)?;
        let before = rec.clone();
        self.write_host_secrets("allow-host", &mut rec, hostnqn, secrets)?;
        let newly_allowed = !rec.allowed_hosts.iter().any(|h| h == hostnqn);
        if newly_allowed {
            rec.allowed_hosts.push(hostnqn.to_owned());
            rec.allowed_hosts.sort_unstable();
        }
        if rec != before {
            self.save(&rec)?;
            self.step("allow-host", Step::SecretsCatalogWritten);
        }
        if newly_allowed {
            self.host_allowed(&rec, hostnqn);
        }
        Ok(rec)
    }

    /// Stops `hostnqn` from connecting and removes its DH-HMAC-CHAP secrets for the volume; with
    /// `disconnect`, its controllers are torn down too (without, a controller that authenticates
    /// again fails, having no secret any more). Raises a discovery log change event. An error for a
    /// host that is not allowed, and for a volume that lets any host connect (one host cannot be
    /// excluded from "any"). The host is denied before its secrets go, so a crash in between leaves
    /// it denied with secrets nothing uses.
    pub fn deny_host(&self, name: &str, hostnqn: &str, disconnect: bool) -> Result<VolumeRecord, NodeError> {
        let _op = self.inner.ops.lock();
        let mut rec = self.ready_volume(name)?;
        if rec.allow_any_host {
            return Err(NodeError::AnyHostAllowed { volume: name.to_owned() });
        }
        if !rec.allowed_hosts.iter().any(|h| h == hostnqn) {
            return Err(NodeError::HostNotAllowed { volume: name.to_owned(), host: hostnqn.to_owned() });
        }
        rec.allowed_hosts.retain(|h| h != hostnqn);
        rec.dhchap_hosts.retain(|h| h != hostnqn);
        self.save(&rec)?;
        self.step("deny-host", Step::SecretsCatalogWritten);
        if disconnect {
            self.detach_hosts(name, &rec.nqn, Some(hostnqn));
        }
        let target = &self.inner.target;
        if target.subsystem(&rec.nqn).is_none() || target.deny_host(&rec.nqn, hostnqn, disconnect).is_err() {
            target.notify_discovery_changed();
        }
        match self.remove_secrets_file_entry("deny-host", name, hostnqn) {
            Ok(_) => {}
            // The host is denied; its secrets are unused until it is allowed again.
            Err(e) => {
                tracing::warn!(volume = name, host = hostnqn, error = %e, "denied, but its secrets could not be removed")
            }
        }
        Ok(rec)
    }

    /// Writes `hostnqn`'s secrets into the volume's secrets file (durably) and into memory if the
    /// volume is loaded, and brings `rec`'s list of hosts with secrets up to date (the caller saves
    /// it, after: a listed host must have its secret on disk).
    fn write_host_secrets(
        &self,
        op: &'static str,
        rec: &mut VolumeRecord,
        hostnqn: &str,
        secrets: HostSecrets,
    ) -> Result<VolumeSecrets, NodeError> {
        let mut all = self.inner.read_secrets_checked(rec, Some(hostnqn))?;
        let rotated = all.get(hostnqn).is_some();
        let bidirectional = secrets.controller.is_some();
        all.set(hostnqn, secrets);
        self.inner.secrets.write(&rec.name, &all)?;
        self.step(op, Step::SecretsFileWritten);
        self.inner.loaded_secrets.update_if_loaded(&rec.name, &all);
        rec.dhchap_hosts = all.hosts().map(|(h, _)| h.to_owned()).collect();
        tracing::info!(
            volume = %rec.name,
            host = hostnqn,
            bidirectional,
            "{}",
            if rotated {
                "host secret replaced (used from the host's next authentication; connected hosts stay)"
            } else {
                "host secret set"
            }
        );
        Ok(all)
    }

    /// Removes `hostnqn`'s line from the volume's secrets file (durably) and from memory; false if
    /// it had none.
    fn remove_secrets_file_entry(
        &self,
        op: &'static str,
        name: &str,
        hostnqn: &str,
    ) -> Result<bool, NodeError> {
        let mut all = self.inner.secrets.read(name)?;
        if !all.remove(hostnqn) {
            // From memory even so: the file may have lost the host behind the node's back.
            self.inner.loaded_secrets.remove_host_if_loaded(name, hostnqn);
            return Ok(false);
        }
        self.inner.secrets.write(name, &all)?;
        self.step(op, Step::SecretsFileWritten);
        // Only this host: other hosts a damaged file lacks keep their secrets in memory.
        self.inner.loaded_secrets.remove_host_if_loaded(name, hostnqn);
        tracing::info!(volume = name, host = hostnqn, "host secret removed");
        Ok(true)
    }

    /// Sets (or replaces: rotation) the DH-HMAC-CHAP secrets of `hostnqn` for the volume: its secret
    /// and, for bidirectional authentication, the controller's. The host must authenticate with
    /// them from its next Connect or re-authentication on, even if the volume does not require
    /// authentication of every host. Connected hosts are not dropped: a Linux host goes on with its
    /// queues and re-authenticates them when its `dhchap_secret` (`dhchap_ctrl_secret`) in
    /// `/sys/class/nvme/nvmeX/` is written, or when it reconnects. The host need not be allowed yet
    /// (storing the secret first, then allowing the host, is the safe order; or use
    /// [`Node::allow_host_with_secrets`]). Returns the volume's settings, without secrets.
    pub fn set_host_secrets(
        &self,
        name: &str,
        hostnqn: &str,
        secrets: HostSecrets,
    ) -> Result<VolumeAuth, NodeError> {
        check_secret_host(hostnqn)?;
        let _op = self.inner.ops.lock();
        let mut rec = self.ready_volume(name)?;
        let before = rec.dhchap_hosts.clone();
        let all = self.write_host_secrets("set-secrets", &mut rec, hostnqn, secrets)?;
        if rec.dhchap_hosts != before {
            self.save(&rec)?;
            self.step("set-secrets", Step::SecretsCatalogWritten);
        }
        Ok(VolumeAuth::from_secrets(rec.require_auth, &all))
    }

    /// Makes new secrets for `hostnqn` (a host secret, and a controller secret if `bidirectional`)
    /// like `nvme gen-dhchap-key` does, stores them as [`Node::set_host_secrets`] does, and returns
    /// them: the only time the node hands a secret out (give it to the host, which needs it for
    /// `nvme connect --dhchap-secret` / `--dhchap-ctrl-secret`).
    pub fn generate_host_secrets(
        &self,
        name: &str,
        hostnqn: &str,
        params: SecretParams,
        bidirectional: bool,
    ) -> Result<HostSecrets, NodeError> {
        let mut secrets = HostSecrets::new(Self::generate_secret(params)?);
        if bidirectional {
            secrets = secrets.with_controller(Self::generate_secret(params)?);
        }
        self.set_host_secrets(name, hostnqn, secrets.clone())?;
        Ok(secrets)
    }

    /// A new random secret from the operating system's generator, like `nvme gen-dhchap-key`.
    pub fn generate_secret(params: SecretParams) -> Result<DhchapSecret, NodeError> {
        DhchapSecret::generate(&OsEntropy, params.key_len_bytes, params.transform).map_err(|e| match e {
            nvmeof_target::auth::SecretError::Length(_) => NodeError::InvalidArgument(e.to_string()),
            e => NodeError::Entropy(e.to_string()),
        })
    }

    /// Removes the DH-HMAC-CHAP secrets of `hostnqn` for the volume: from now on the host connects
    /// without authenticating, unless the volume requires it of every host (then it cannot connect).
    /// Connected hosts stay. False if the host had none. The catalog stops listing the host before
    /// the secret goes, so a crash in between leaves the secret in force.
    pub fn remove_host_secrets(&self, name: &str, hostnqn: &str) -> Result<bool, NodeError> {
        let _op = self.inner.ops.lock();
        let mut rec = self.ready_volume(name)?;
        let listed = rec.dhchap_hosts.iter().any(|h| h == hostnqn);
        if listed {
            rec.dhchap_hosts.retain(|h| h != hostnqn);
            self.save(&rec)?;
            self.step("remove-secrets", Step::SecretsCatalogWritten);
        }
        let had = self.remove_secrets_file_entry("remove-secrets", name, hostnqn)?;
        Ok(had || listed)
    }

    /// Sets whether every host must authenticate to the volume (DH-HMAC-CHAP): with it, a host
    /// without a secret cannot connect. Applies to the loaded subsystem at once, for queues
    /// connected from then on; connected hosts are not dropped unless `disconnect` (with `required`):
    /// then the controllers of hosts that have no secret — which cannot have authenticated, and could
    /// not again — are torn down.
    pub fn set_require_auth(
        &self,
        name: &str,
        required: bool,
        disconnect: bool,
    ) -> Result<VolumeRecord, NodeError> {
        let _op = self.inner.ops.lock();
        let mut rec = self.ready_volume(name)?;
        if rec.require_auth != required {
            rec.require_auth = required;
            self.save(&rec)?;
            self.inner.apply_require_auth(name);
            tracing::info!(volume = name, required, "authentication requirement changed");
        }
        if required && disconnect {
            let secrets = self.inner.secrets.read(name)?;
            let target = &self.inner.target;
            for c in target.controllers_of_subsystem(&rec.nqn) {
                if secrets.get(&c.hostnqn).is_none() {
                    tracing::info!(volume = name, host = %c.hostnqn, cntlid = c.cntlid, "disconnecting a host without a secret");
                    target.disconnect_controller(&c.subnqn, c.cntlid);
                }
            }
        }
        Ok(rec)
    }

    /// The volume's authentication settings (required or not, hosts with secrets), without a
    /// secret: for `volume show` and its `nvme connect` line ([`VolumeAuth::connect_options`]).
    pub fn volume_auth(&self, name: &str) -> Result<VolumeAuth, NodeError> {
        let rec =
            self.inner.catalog.volume(name)?.ok_or_else(|| NodeError::NotFound(format!("volume {name}")))?;
        Ok(VolumeAuth::from_secrets(rec.require_auth, &self.inner.read_secrets_checked(&rec, None)?))
    }

    /// The secrets directory.
    #[must_use]
    pub fn secrets_dir(&self) -> &Path {
        self.inner.secrets.path()
    }

    /// Lets any host connect (`true`) or only the allowed hosts (`false`). Raises a discovery log
    /// change event. Turning it off with `disconnect` tears down the controllers of the hosts that
    /// are not allowed; without, they stay connected until they disconnect.
    pub fn set_allow_any_host(
        &self,
        name: &str,
        allow_any_host: bool,
        disconnect: bool,
    ) -> Result<VolumeRecord, NodeError> {
        let _op = self.inner.ops.lock();
        let mut rec = self.ready_volume(name)?;
        if rec.allow_any_host == allow_any_host {
            return Ok(rec);
        }
        rec.allow_any_host = allow_any_host;
        self.save(&rec)?;
        let target = &self.inner.target;
        let access = if allow_any_host { HostAccess::AllowAny } else { HostAccess::DenyAllExcept };
        if target.subsystem(&rec.nqn).is_none() || target.set_host_access(&rec.nqn, access).is_err() {
            target.notify_discovery_changed();
        }
        if disconnect && !allow_any_host {
            for c in target.controllers_of_subsystem(&rec.nqn) {
                if !rec.allowed_hosts.contains(&c.hostnqn) {
                    tracing::info!(volume = name, host = %c.hostnqn, cntlid = c.cntlid, "disconnecting a host that lost access");
                    target.disconnect_controller(&c.subnqn, c.cntlid);
                }
            }
        }
        Ok(rec)
    }

    /// `rec` with state [`VolumeState::Missing`] if it is ready in the catalog and the backend says
    /// it does not have it.
    fn with_backend_state(&self, mut rec: VolumeRecord) -> VolumeRecord {
        if rec.state == VolumeState::Ready {
            let missing = VolumeName::new(rec.name.clone())
                .map_err(NodeError::from)
                .and_then(|n| Ok(!self.inner.provisioner.exists(&n)?));
            match missing {
                Ok(true) => rec.state = VolumeState::Missing,
                Ok(false) => {}
                Err(e) => {
                    tracing::debug!(volume = %rec.name, error = %e, "cannot ask the backend about a volume")
                }
            }
        }
        rec
    }

    /// A volume with its usage and activity.
    pub fn volume(&self, name: &str) -> Result<VolumeInfo, NodeError> {
        let mut record =
            self.inner.catalog.volume(name)?.ok_or_else(|| NodeError::NotFound(format!("volume {name}")))?;
        let usage = match VolumeName::new(name.to_owned()) {
            Ok(n) if record.state == VolumeState::Ready => match self.inner.provisioner.usage(&n) {
                Ok(u) => Some(u),
                Err(e) if is_not_found(&e) => {
                    record.state = VolumeState::Missing;
                    None
                }
                Err(_) => None,
            },
            _ => None,
        };
        let active = self.inner.target.subsystem(&record.nqn).is_some();
        let controllers = if active { self.controllers_of(&record.nqn) } else { 0 };
        let auth =
            VolumeAuth::from_secrets(record.require_auth, &self.inner.read_secrets_checked(&record, None)?);
        Ok(VolumeInfo { record, usage, active, controllers, auth })
    }

    /// Up to `limit` volume records in name order, names starting with `prefix`, after `after`. A
    /// volume the backend lacks is reported [`VolumeState::Missing`] (one existence check per ready
    /// volume on the page).
    pub fn volumes(
        &self,
        prefix: &str,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<VolumeRecord>, NodeError> {
        let recs = self.inner.catalog.volumes(prefix, after, limit)?;
        Ok(recs.into_iter().map(|r| self.with_backend_state(r)).collect())
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
            controllers: self.inner.target.controller_count(),
            secrets_loaded: self.inner.loaded_secrets.len(),
        })
    }

    /// The I/O counters of every volume since the node started, loaded or unloaded since: these
    /// never go down while the process lives.
    #[must_use]
    pub fn io_totals(&self) -> IoTotals {
        let prefix = format!("{}:", self.inner.prefix);
        // Read the unloaded total first: a subsystem retired meanwhile is then counted twice at
        // worst for this one reading, never missed (totals stay monotonic).
        let mut totals = *self.inner.unloaded_io.lock();
        let target = &self.inner.target;
        for nqn in target.subsystem_nqns().iter().filter(|n| n.starts_with(&prefix)) {
            if let Some(s) = target.subsystem(nqn) {
                for ns in s.namespaces().values() {
                    totals.add(&ns.stats().snapshot());
                }
            }
        }
        totals
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
            // Nothing a volume of the same name left behind applies to the adopted one.
            self.inner.secrets.remove(&rec.name)?;
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

    /// Finishes or undoes every pending intent (see the module documentation) and logs one summary.
    fn reconcile(&self) -> Result<(), NodeError> {
        let _op = self.inner.ops.lock();
        let intents = self.inner.catalog.intents()?;
        if intents.is_empty() {
            return Ok(());
        }
        let mut done = Reconciled::default();
        for (id, intent) in intents {
            let mut t = self.inner.catalog.begin()?;
            self.reconcile_one(&mut t, &intent, &mut done)?;
            t.remove_intent(id)?;
            t.commit()?;
            done.operations += 1;
        }
        tracing::info!(
            operations = done.operations,
            volumes_kept = done.volumes_kept,
            volumes_forgotten = done.volumes_forgotten,
            volumes_undone = done.volumes_undone,
            snapshots_kept = done.snapshots_kept,
            snapshots_forgotten = done.snapshots_forgotten,
            resizes = done.resizes,
            deletes = done.deletes,
            "reconciled the operations a crash interrupted"
        );
        Ok(())
    }

    fn reconcile_one(
        &self,
        t: &mut CatalogTxn,
        intent: &Intent,
        done: &mut Reconciled,
    ) -> Result<(), NodeError> {
        let p = &self.inner.provisioner;
        match intent {
            Intent::Create { names } => {
                // All or none: the batch is kept only if the backend made every volume of it.
                let mut present = Vec::new();
                for name in names {
                    let vol = VolumeName::new(name.clone())?;
                    if p.exists(&vol)? {
                        present.push(vol);
                    }
                }
                tracing::debug!(volumes = names.len(), in_backend = present.len(), "reconciling a create");
                if present.len() == names.len() {
                    for name in names {
                        if let Some(rec) = t.volume(name)? {
                            t.put_volume(&VolumeRecord { state: VolumeState::Ready, ..rec })?;
                            done.volumes_kept += 1;
                        }
                    }
                } else {
                    for vol in &present {
                        done_if_not_found(p.delete_volume(vol))?;
                        done.volumes_undone += 1;
                    }
                    for name in names {
                        t.remove_volume(name)?;
                        self.forget_secrets_of_undone(name);
                    }
                    done.volumes_forgotten += names.len() - present.len();
                }
            }
            Intent::Clone { name, size_bytes, .. } => {
                let vol = VolumeName::new(name.clone())?;
                match t.volume(name)? {
                    Some(rec) if p.exists(&vol)? => {
                        // The clone may have been made but not grown yet.
                        if p.usage(&vol).map(|u| u.size_bytes < *size_bytes).unwrap_or(false) {
                            p.resize(&vol, *size_bytes, false)?;
                        }
                        t.put_volume(&VolumeRecord { state: VolumeState::Ready, ..rec })?;
                        done.volumes_kept += 1;
                    }
                    _ => {
                        t.remove_volume(name)?;
                        self.forget_secrets_of_undone(name);
                        done.volumes_forgotten += 1;
                    }
                }
            }
            Intent::Snapshot { snapshots } => {
                for (vol, snap) in snapshots {
                    let r = SnapshotRef {
                        volume: VolumeName::new(vol.clone())?,
                        snapshot: SnapshotName::new(snap.clone())?,
                    };
                    match t.snapshot(vol, snap)? {
                        Some(rec) if p.snapshot_exists(&r)? => {
                            t.put_snapshot(&SnapshotRecord { state: VolumeState::Ready, ..rec })?;
                            done.snapshots_kept += 1;
                        }
                        _ => {
                            t.remove_snapshot(vol, snap)?;
                            done.snapshots_forgotten += 1;
                        }
                    }
                }
            }
            Intent::Resize { name, from, to } => {
                if let Some(rec) = t.volume(name)? {
                    let vol = VolumeName::new(name.clone())?;
                    // The shrink rule was checked before the intent was recorded.
                    let size_bytes = match p.resize(&vol, *to, to < from) {
                        Ok(()) => *to,
                        Err(e) => {
                            tracing::warn!(volume = %name, error = %e, "resize could not be finished; keeping the old size");
                            p.usage(&vol).map_or(*from, |u| u.size_bytes)
                        }
                    };
                    t.put_volume(&VolumeRecord { size_bytes, ..rec })?;
                    done.resizes += 1;
                }
            }
            Intent::DeleteVolume { name } => {
                self.delete_in_backend(name)?;
                self.inner.secrets.remove(name)?;
                t.remove_volume_and_snapshots(name)?;
                done.deletes += 1;
            }
            Intent::DeleteSnapshot { snapshot: (vol, snap) } => {
                let r = SnapshotRef {
                    volume: VolumeName::new(vol.clone())?,
                    snapshot: SnapshotName::new(snap.clone())?,
                };
                done_if_not_found(p.delete_snapshot(&r))?;
                t.remove_snapshot(vol, snap)?;
                done.deletes += 1;
            }
        }
        Ok(())
    }
}

impl SubsystemSource for Source {
    fn activate(&self, subnqn: &str) -> Option<(SubsystemConfig, Vec<NamespaceConfig>)> {
        let inner = self.0.upgrade()?;
        let name = subnqn.strip_prefix(inner.prefix.as_str())?.strip_prefix(':')?;
        if inner.fenced.lock().contains(name) {
            tracing::debug!(volume = name, "connect refused: the volume is being shrunk");
            return None;
        }
        let rec = match inner.catalog.volume(name) {
            Ok(Some(r)) if r.state == VolumeState::Ready => r,
            Ok(_) => return None,
            Err(e) => {
                if let Some(more) = inner.open_failures.check_now() {
                    tracing::error!(volume = name, error = %e, suppressed = more, "catalog lookup failed on connect");
                }
                return None;
            }
        };
        let backend = match VolumeName::new(name.to_owned())
            .and_then(|n| inner.provisioner.open(&n, rec.block_size))
        {
            Ok(b) => b,
            Err(e) => {
                if let Some(more) = inner.open_failures.check_now() {
                    let why =
                        if is_not_found(&e) { "the backend does not have it" } else { "it cannot be opened" };
                    tracing::warn!(volume = name, error = %e, suppressed = more, "connect refused: {why}");
                }
                return None;
            }
        };
        // Its secrets into memory, before the subsystem exists: every lookup the target makes for
        // it finds them. A volume whose secrets cannot be read is not exported (its hosts must not
        // get in without them).
        if let Err(e) = inner.load_secrets(&rec) {
            if let Some(more) = inner.open_failures.check_now() {
                tracing::error!(volume = name, error = %e, suppressed = more, "connect refused: the volume's secrets are unusable");
            }
            return None;
        }
        let mut config = SubsystemConfig::new(rec.nqn.clone(), rec.serial.clone());
        config.model = "Xatastor volume".into();
        config.access = if rec.allow_any_host { HostAccess::AllowAny } else { HostAccess::DenyAllExcept };
        config.allowed_hosts = rec.allowed_hosts.clone();
        config.require_auth = rec.require_auth;
        let ns = NamespaceConfig { nsid: 1, backend, nguid: rec.nguid, uuid: rec.uuid };
        Some((config, vec![ns]))
    }

    fn activated(&self, subnqn: &str) {
        if let Some(inner) = self.0.upgrade() {
            if let Some(name) = subnqn.strip_prefix(inner.prefix.as_str()).and_then(|n| n.strip_prefix(':')) {
                tracing::info!(volume = name, "volume loaded (a host connected)");
                // A requirement changed between the catalog read in `activate` and now would be lost
                // otherwise (the change found nothing loaded).
                inner.apply_require_auth(name);
            }
            if let Some(t) = inner.reaper.lock().as_ref() {
                t.thread().unpark(); // something to watch now
            }
        }
    }

    fn discovery_len(&self, hostnqn: &str) -> u64 {
        let Some(inner) = self.0.upgrade() else { return 0 };
        inner.catalog.discovery_len(hostnqn).unwrap_or_else(|e| {
            discovery_failed(&inner, &e);
            0
        })
    }

    fn discovery_range(&self, hostnqn: &str, first: u64, count: usize) -> Vec<String> {
        let Some(inner) = self.0.upgrade() else { return Vec::new() };
        match inner.catalog.discovery_range(hostnqn, first, count) {
            Ok(names) => names.into_iter().map(|n| format!("{}:{n}", inner.prefix)).collect(),
            Err(e) => {
                discovery_failed(&inner, &e);
                Vec::new()
            }
        }
    }

    fn discovery_lists(&self, hostnqn: &str, subnqn: &str) -> bool {
        let Some(inner) = self.0.upgrade() else { return false };
        let Some(name) = subnqn.strip_prefix(inner.prefix.as_str()).and_then(|n| n.strip_prefix(':')) else {
            return false;
        };
        inner.catalog.discovery_lists(hostnqn, name).unwrap_or_else(|e| {
            discovery_failed(&inner, &e);
            false
        })
    }
}

/// A catalog read for a discovery log page failed (logged at most once per interval: any host can
/// ask for discovery log pages).
fn discovery_failed(inner: &Inner, e: &CatalogError) {
    if let Some(more) = inner.open_failures.check_now() {
        tracing::error!(error = %e, suppressed = more, "catalog lookup failed for discovery");
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
            let loaded: HashSet<String> =
                inner.target.subsystem_nqns().into_iter().filter(|n| n.starts_with(&prefix)).collect();
            // O(loaded volumes): a count per loaded subsystem, not a scan of every controller.
            let busy: HashSet<&String> =
                loaded.iter().filter(|n| inner.target.controller_count_of(n) > 0).collect();
            let now = std::time::Instant::now();
            idle_since.retain(|n, _| loaded.contains(n) && !busy.contains(n));
            let mut unloaded = 0;
            for nqn in &loaded {
                if busy.contains(nqn) {
                    continue;
                }
                let since = *idle_since.entry(nqn.clone()).or_insert(now);
                if now.duration_since(since) < inner.idle_unload {
                    continue;
                }
                let subsystem = inner.target.subsystem(nqn);
                let name = nqn.strip_prefix(&prefix).unwrap_or(nqn);
                let secrets_generation = inner.loaded_secrets.generation(name);
                if inner.target.unload_subsystem(nqn) {
                    if let Some(s) = subsystem {
                        inner.retire(&s);
                    }
                    // Unless a Connect loaded the volume again meanwhile (a newer generation).
                    if let Some(g) = secrets_generation {
                        inner.loaded_secrets.forget_if(name, g);
                    }
                    tracing::info!(
                        volume = name,
                        idle_s = inner.idle_unload.as_secs(),
                        "volume unloaded (no host for the idle time)"
                    );
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
