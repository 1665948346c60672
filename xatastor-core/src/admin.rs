//! The node's admin API: request and response types and the handler that carries a request out on a
//! [`Node`]. Transports only carry these: [`socket`] serves them as JSON lines on the local Unix
//! socket (the CLI's), and a network transport (the gRPC admin service of `xatastor-target`) calls
//! [`handle`] the same way.
//!
//! ```text
//!   CLI ── one JSON line ──▶ socket::serve ─┐
//!   gRPC, other transports ────────────────┴─▶ handle(node, endpoint, Request) ─▶ Result<Response, AdminError>
//!                                                                                   │
//!   {"ok":true,"result":…} / {"ok":false,"kind":"not_found","error":"volume x does not exist"} ◀┘
//! ```
//!
//! Requests are JSON objects tagged by `op` ([`Request`]); the protocol reference (every request,
//! its fields, the result and the error kinds) is in `docs/admin-protocol.md`.
//!
//! **Idempotent by name.** Creating a volume, a clone or a snapshot that exists already with the same
//! parameters returns the existing one, so a caller that lost an answer (a CSI driver, a script) can
//! simply ask again; with different parameters it fails with [`ErrorKind::Exists`]. Deleting is not
//! idempotent here (a missing volume is [`ErrorKind::NotFound`]): callers that need it (CSI) treat
//! that kind as done.
//!
//! **Host authentication** (DH-HMAC-CHAP): `volume_create`/`volume_clone` take `require_auth`,
//! [`Request::VolumeSetRequireAuth`] turns it on and off, [`Request::VolumeAllowHost`] with
//! `dhchap_secret` (and `dhchap_ctrl_secret`) allows a host with secrets — again with new ones
//! rotates them without dropping connected controllers —, [`Request::VolumeGenerateHostSecret`]
//! does the same with secrets the node makes and returns them (the only answer that carries a
//! secret), and [`Request::VolumeRemoveHostSecret`] removes them. Secrets travel as [`SecretText`],
//! whose `Debug` shows `<redacted>`: transports log requests with `Debug`. `volume_show` tells which
//! hosts have secrets and prints connect lines with placeholders, never a secret.
//!
//! Calling it in-process:
//!
//! ```
//! use std::sync::Arc;
//! use nvmeof_target::{Target, TargetConfig};
//! use xatastor_core::admin::{self, Endpoint, Request, Response};
//! use xatastor_core::provisioners::MemoryProvisioner;
//! use xatastor_core::{Node, NodeConfig};
//!
//! let dir = std::env::temp_dir().join(format!("xatastor-admin-doc-{}", std::process::id()));
//! std::fs::create_dir_all(&dir)?;
//! let target = Target::new(TargetConfig::default());
//! let node = Node::open(NodeConfig::new(dir.join("catalog.redb")), Arc::new(MemoryProvisioner::new()), target)?;
//! let ep = Endpoint::new("127.0.0.1:4420".parse()?, "memory");
//! let create = Request::VolumeCreate {
//!     name: "pg".into(),
//!     size_bytes: 1 << 30,
//!     block_size: 512,
//!     compression: None,
//!     allowed_hosts: vec![],
//!     allow_any_host: false,
//!     require_auth: false,
//! };
//! let Response::Volume(v) = admin::handle(&node, &ep, create.clone())? else { unreachable!() };
//! // Asking again with the same parameters returns the same volume.
//! let Response::Volume(again) = admin::handle(&node, &ep, create)? else { unreachable!() };
//! assert_eq!(v.nqn, again.nqn);
//! # drop(node);
//! # std::fs::remove_dir_all(&dir)?;
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

pub mod socket;

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use nvmeof_target::auth::{DhchapHash, DhchapSecret, HostSecrets};
use zeroize::Zeroizing;

use crate::catalog::{SnapshotRecord, VolumeRecord, VolumeState};
use crate::secrets::{SecretParams, VolumeAuth};
use crate::{CreateVolume, Node, NodeError, ProvisionError, SecretsError, VolumeAuthOptions};

/// A request to the admin endpoint.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
#[non_exhaustive]
pub enum Request {
    /// Create a volume (idempotent: the same name with the same size, block size and compression
    /// returns the existing volume).
    VolumeCreate {
        /// Name.
        name: String,
        /// Size in bytes.
        size_bytes: u64,
        /// 512 or 4096 (default 512).
        #[serde(default = "default_block_size")]
        block_size: u32,
        /// Compression (backends that have it).
        #[serde(default)]
        compression: Option<String>,
        /// Hosts allowed to connect.
        #[serde(default)]
        allowed_hosts: Vec<String>,
        /// Any host may connect.
        #[serde(default)]
        allow_any_host: bool,
        /// Every host must authenticate (DH-HMAC-CHAP) from the start.
        #[serde(default)]
        require_auth: bool,
    },
    /// Create `count` volumes named `<prefix><n>` (n from `start`) in one catalog transaction.
    VolumeCreateBatch {
        /// Name prefix.
        prefix: String,
        /// First number.
        start: u64,
        /// How many.
        count: u64,
        /// Size of each.
        size_bytes: u64,
        /// 512 or 4096 (default 512).
        #[serde(default = "default_block_size")]
        block_size: u32,
        /// Hosts allowed to connect to each.
        #[serde(default)]
        allowed_hosts: Vec<String>,
        /// Every host must authenticate (DH-HMAC-CHAP) to each from the start.
        #[serde(default)]
        require_auth: bool,
    },
    /// List volumes.
    VolumeList {
        /// Name prefix filter.
        #[serde(default)]
        prefix: String,
        /// Start after this name (paging).
        #[serde(default)]
        after: Option<String>,
        /// At most this many; 0: all.
        #[serde(default)]
        limit: usize,
    },
    /// Show one volume.
    VolumeShow {
        /// Name.
        name: String,
    },
    /// Resize a volume.
    VolumeResize {
        /// Name.
        name: String,
        /// New size in bytes.
        size_bytes: u64,
        /// Allow a smaller size (destroys the data beyond it; refused while a host is connected).
        #[serde(default)]
        force: bool,
    },
    /// Delete a volume (and its snapshots).
    VolumeDelete {
        /// Name.
        name: String,
        /// Disconnect connected hosts first (their block device goes away at once).
        #[serde(default)]
        force: bool,
    },
    /// Clone a snapshot into a new volume (idempotent: an existing volume of this name cloned from
    /// the same snapshot, of the same size, is returned).
    VolumeClone {
        /// Source volume.
        volume: String,
        /// Source snapshot.
        snapshot: String,
        /// New volume.
        name: String,
        /// Size (0 or absent: the snapshot's).
        #[serde(default)]
        size_bytes: u64,
        /// Hosts allowed to connect to the clone.
        #[serde(default)]
        allowed_hosts: Vec<String>,
        /// Every host must authenticate (DH-HMAC-CHAP) from the start; a clone requires it anyway
        /// when its origin does.
        #[serde(default)]
        require_auth: bool,
    },
    /// Allow a host; with `dhchap_secret`, the host must authenticate with it (DH-HMAC-CHAP).
    ///
    /// Asking again with new secrets for a host that has some replaces them (rotation): its
    /// connected controllers stay, and its next authentication must use the new secret.
    VolumeAllowHost {
        /// Volume.
        name: String,
        /// Host NQN.
        host: String,
        /// The host's secret in the DHHC-1 representation (`nvme gen-dhchap-key` prints one).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        dhchap_secret: Option<SecretText>,
        /// The controller's secret for bidirectional authentication (needs `dhchap_secret`).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        dhchap_ctrl_secret: Option<SecretText>,
    },
    /// Allow a host with a secret the node makes (like `nvme gen-dhchap-key`), and a controller
    /// secret too if `bidirectional`: the answer carries them, the only time the node hands them
    /// out. A host that had secrets gets the new ones (rotation, as with `volume_allow_host`).
    VolumeGenerateHostSecret {
        /// Volume.
        name: String,
        /// Host NQN.
        host: String,
        /// The key transformation, as `nvme gen-dhchap-key --hmac`: 0 none, 1 SHA-256,
        /// 2 SHA-384, 3 SHA-512.
        #[serde(default)]
        hmac: u8,
        /// Key length: 32, 48 or 64 (default 32).
        #[serde(default = "default_key_length")]
        key_length_bytes: usize,
        /// Make a controller secret too (bidirectional authentication).
        #[serde(default)]
        bidirectional: bool,
    },
    /// Remove a host's DH-HMAC-CHAP secrets: the host stays allowed and connects without
    /// authenticating (unless the volume requires authentication; then it cannot connect).
    /// Connected controllers stay.
    VolumeRemoveHostSecret {
        /// Volume.
        name: String,
        /// Host NQN.
        host: String,
    },
    /// Require every host to authenticate, or not.
    VolumeSetRequireAuth {
        /// Volume.
        name: String,
        /// Every host must authenticate; a host without a secret cannot connect.
        require_auth: bool,
        /// Turning it on: also disconnect the hosts that have no secret now.
        #[serde(default)]
        disconnect: bool,
    },
    /// Let any host connect, or only the allowed ones.
    VolumeSetAnyHost {
        /// Volume.
        name: String,
        /// Any host may connect.
        allow_any_host: bool,
        /// Turning it off: disconnect the hosts that are not allowed.
        #[serde(default)]
        disconnect: bool,
    },
    /// Deny a host.
    VolumeDenyHost {
        /// Volume.
        name: String,
        /// Host NQN.
        host: String,
        /// Tear down its controllers too (its block device goes away at once).
        #[serde(default)]
        disconnect: bool,
    },
    /// Take snapshots (several at once: one backend step). Pairs that exist already are returned as
    /// they are (idempotent).
    SnapshotCreate {
        /// `(volume, snapshot)` pairs.
        snapshots: Vec<(String, String)>,
    },
    /// List snapshots: of one volume, or of all volumes (in volume, then snapshot name order).
    SnapshotList {
        /// Volume (absent: every volume's snapshots; that walks the whole catalog).
        #[serde(default)]
        volume: Option<String>,
        /// Only snapshots with this name.
        #[serde(default)]
        name: Option<String>,
        /// Start after this `volume@snapshot` (paging).
        #[serde(default)]
        after: Option<String>,
        /// At most this many; 0: all.
        #[serde(default)]
        limit: usize,
    },
    /// Delete a snapshot.
    SnapshotDelete {
        /// Volume.
        volume: String,
        /// Snapshot.
        snapshot: String,
    },
    /// Node gauges and where it listens.
    Status,
    /// Space: the pool, what is provisioned, and what may still be provisioned.
    Capacity,
    /// Record the backend's volumes and snapshots the catalog does not know (one-time import of an
    /// existing pool).
    Adopt,
    /// Zero-downtime upgrade: start `binary` (default: the binary the server was started from) and
    /// hand it every connection (see [`crate::upgrade`]). Answered when the new process serves, or
    /// with the reason the upgrade did not happen (the server then serves on). Only servers that
    /// can start a new process answer it ([`Endpoint::with_upgrade`]).
    Upgrade {
        /// The new binary.
        #[serde(default)]
        binary: Option<String>,
    },
}

/// Most volumes one `volume_create_batch` makes (its records are built in memory first).
pub const MAX_BATCH: u64 = 1_000_000;

fn default_block_size() -> u32 {
    512
}

fn default_key_length() -> usize {
    32
}

/// A secret in a request or a response (a DHHC-1 string). On the wire it is the plain string;
/// `Debug` never shows it (requests are logged with `Debug`), and it is wiped from memory when
/// dropped.
#[derive(Clone, Default)]
pub struct SecretText(Zeroizing<String>);

impl SecretText {
    /// Wraps `s`.
    #[must_use]
    pub fn new(s: impl Into<String>) -> Self {
        Self(Zeroizing::new(s.into()))
    }

    /// The secret itself.
    #[must_use]
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for SecretText {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("<redacted>")
    }
}

impl PartialEq for SecretText {
    fn eq(&self, other: &Self) -> bool {
        self.0.as_bytes() == other.0.as_bytes()
    }
}

impl Eq for SecretText {}

impl Serialize for SecretText {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.0)
    }
}

impl<'de> Deserialize<'de> for SecretText {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d).map(Self::new)
    }
}

impl From<Zeroizing<String>> for SecretText {
    fn from(s: Zeroizing<String>) -> Self {
        Self(s)
    }
}

impl Request {
    /// The request's `op` name (for logs).
    #[must_use]
    pub fn op(&self) -> &'static str {
        match self {
            Self::VolumeCreate { .. } => "volume_create",
            Self::VolumeCreateBatch { .. } => "volume_create_batch",
            Self::VolumeList { .. } => "volume_list",
            Self::VolumeShow { .. } => "volume_show",
            Self::VolumeResize { .. } => "volume_resize",
            Self::VolumeDelete { .. } => "volume_delete",
            Self::VolumeClone { .. } => "volume_clone",
            Self::VolumeAllowHost { .. } => "volume_allow_host",
            Self::VolumeGenerateHostSecret { .. } => "volume_generate_host_secret",
            Self::VolumeRemoveHostSecret { .. } => "volume_remove_host_secret",
            Self::VolumeSetRequireAuth { .. } => "volume_set_require_auth",
            Self::VolumeSetAnyHost { .. } => "volume_set_any_host",
            Self::VolumeDenyHost { .. } => "volume_deny_host",
            Self::SnapshotCreate { .. } => "snapshot_create",
            Self::SnapshotList { .. } => "snapshot_list",
            Self::SnapshotDelete { .. } => "snapshot_delete",
            Self::Status => "status",
            Self::Capacity => "capacity",
            Self::Adopt => "adopt",
            Self::Upgrade { .. } => "upgrade",
        }
    }
}

/// What the server knows about itself that responses mention (the `nvme connect` line).
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct Endpoint {
    /// The address the server listens on.
    pub listen: std::net::SocketAddr,
    /// The address hosts are told to connect to (`--advertise`, else the listen address unless
    /// that is 0.0.0.0 or ::).
    pub advertise: String,
    /// The backend (`memory`, `file`, `zvol:<dataset>`).
    pub backend: String,
    /// Carries out an upgrade request (`None`: this server cannot upgrade itself).
    pub upgrade: Option<UpgradeHook>,
}

/// What carries out an upgrade request: given the requested binary, the report (as JSON) or why
/// the upgrade did not happen.
#[derive(Clone)]
pub struct UpgradeHook(pub std::sync::Arc<dyn Fn(Option<String>) -> Result<Value, String> + Send + Sync>);

impl std::fmt::Debug for UpgradeHook {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("UpgradeHook")
    }
}

impl Endpoint {
    /// Hosts are told to connect to `listen`'s address.
    #[must_use]
    pub fn new(listen: std::net::SocketAddr, backend: impl Into<String>) -> Self {
        Self { listen, advertise: listen.ip().to_string(), backend: backend.into(), upgrade: None }
    }

    /// Upgrade requests are carried out by `hook`.
    #[must_use]
    pub fn with_upgrade(mut self, hook: UpgradeHook) -> Self {
        self.upgrade = Some(hook);
        self
    }

    /// Hosts are told to connect to `advertise` instead.
    #[must_use]
    pub fn with_advertise(mut self, advertise: impl Into<String>) -> Self {
        self.advertise = advertise.into();
        self
    }
}

/// What kind of failure a request met (the wire value is [`ErrorKind::as_str`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ErrorKind {
    /// No such volume or snapshot; or (deny) the host is not among the allowed hosts.
    NotFound,
    /// The name is taken (with other parameters, for the idempotent creates).
    Exists,
    /// Hosts are connected.
    Busy,
    /// Clones depend on it.
    HasDependents,
    /// A bad argument, or a request that does not parse.
    Invalid,
    /// The backend cannot do it.
    Unsupported,
    /// The backend is full, or the overcommit limit would be passed.
    NoSpace,
    /// Being created or deleted, missing in the backend, or its secrets file lacks hosts the
    /// catalog says have a secret (set or remove their secrets).
    NotReady,
    /// The node's catalog belongs to another backend.
    BackendMismatch,
    /// Anything else (catalog or backend failure).
    Internal,
}

impl ErrorKind {
    /// The wire name: `not_found`, `exists`, `busy`, `has_dependents`, `invalid`, `unsupported`,
    /// `no_space`, `not_ready`, `backend_mismatch` or `internal`.
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Self::NotFound => "not_found",
            Self::Exists => "exists",
            Self::Busy => "busy",
            Self::HasDependents => "has_dependents",
            Self::Invalid => "invalid",
            Self::Unsupported => "unsupported",
            Self::NoSpace => "no_space",
            Self::NotReady => "not_ready",
            Self::BackendMismatch => "backend_mismatch",
            Self::Internal => "internal",
        }
    }

    /// The kind with this wire name.
    #[must_use]
    pub fn from_wire(s: &str) -> Option<Self> {
        Some(match s {
            "not_found" => Self::NotFound,
            "exists" => Self::Exists,
            "busy" => Self::Busy,
            "has_dependents" => Self::HasDependents,
            "invalid" => Self::Invalid,
            "unsupported" => Self::Unsupported,
            "no_space" => Self::NoSpace,
            "not_ready" => Self::NotReady,
            "backend_mismatch" => Self::BackendMismatch,
            "internal" => Self::Internal,
            _ => return None,
        })
    }
}

impl std::fmt::Display for ErrorKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A failed request: a machine-readable kind and a one-line message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AdminError {
    /// What kind of failure.
    pub kind: ErrorKind,
    /// What went wrong, for a person.
    pub message: String,
}

impl AdminError {
    /// An error of `kind`.
    #[must_use]
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        Self { kind, message: message.into() }
    }
}

impl std::fmt::Display for AdminError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for AdminError {}

impl From<NodeError> for AdminError {
    fn from(e: NodeError) -> Self {
        let mut message = e.to_string();
        if matches!(e, NodeError::OvercommitExceeded { .. }) {
            message.push_str(" (serve --overcommit-ratio sets it)");
        }
        Self { kind: kind_of(&e), message }
    }
}

fn kind_of(e: &NodeError) -> ErrorKind {
    match e {
        NodeError::NotFound(_) | NodeError::Provision(ProvisionError::NotFound(_)) => ErrorKind::NotFound,
        NodeError::AlreadyExists(_) | NodeError::Provision(ProvisionError::AlreadyExists(_)) => {
            ErrorKind::Exists
        }
        NodeError::Busy { .. }
        | NodeError::ShrinkWhileConnected { .. }
        | NodeError::Provision(ProvisionError::Busy(_)) => ErrorKind::Busy,
        NodeError::HostNotAllowed { .. } => ErrorKind::NotFound,
        NodeError::ShrinkNotForced { .. } | NodeError::AnyHostAllowed { .. } => ErrorKind::Invalid,
        NodeError::OvercommitExceeded { .. } => ErrorKind::NoSpace,
        NodeError::BackendMismatch { .. } => ErrorKind::BackendMismatch,
        NodeError::HasDependents { .. } | NodeError::Provision(ProvisionError::HasDependents { .. }) => {
            ErrorKind::HasDependents
        }
        NodeError::InvalidArgument(_) | NodeError::Provision(ProvisionError::InvalidArgument(_)) => {
            ErrorKind::Invalid
        }
        NodeError::Provision(ProvisionError::Unsupported(_)) => ErrorKind::Unsupported,
        NodeError::Provision(ProvisionError::NoSpace(_)) => ErrorKind::NoSpace,
        NodeError::NotReady(_) => ErrorKind::NotReady,
        // The volume's secrets file lacks hosts the catalog lists: it is not exported until their
        // secrets are set again or removed (the message says so).
        NodeError::Secrets(SecretsError::Missing { .. }) => ErrorKind::NotReady,
        // The secrets directory or a file of the node is unusable (permissions, owner, damaged,
        // I/O), or no random bytes: the node's problem, not the request's (secrets given in a
        // request are parsed before they reach the node: a malformed one is `invalid`).
        NodeError::Secrets(_) | NodeError::Entropy(_) => ErrorKind::Internal,
        _ => ErrorKind::Internal,
    }
}

/// A volume, as every response that returns one shows it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeView {
    /// Name.
    pub name: String,
    /// Size in bytes.
    pub size_bytes: u64,
    /// Logical block size.
    pub block_size: u32,
    /// Compression asked for at creation.
    pub compression: Option<String>,
    /// `volume@snapshot` for clones.
    pub origin: Option<String>,
    /// Subsystem NQN.
    pub nqn: String,
    /// Namespace NGUID (32 hex digits).
    pub nguid: String,
    /// Namespace UUID.
    pub uuid: String,
    /// Controller serial number.
    pub serial: String,
    /// Any host may connect.
    pub allow_any_host: bool,
    /// Host NQNs allowed to connect.
    pub allowed_hosts: Vec<String>,
    /// `creating`, `ready`, `deleting` or `missing`.
    pub state: String,
    /// Creation time, seconds since the Unix epoch.
    pub created_unix_s: u64,
    /// Every host must authenticate (DH-HMAC-CHAP).
    #[serde(default)]
    pub require_auth: bool,
    /// Hosts with a DH-HMAC-CHAP secret for this volume (never the secrets): they must
    /// authenticate even where the volume does not require it of every host.
    #[serde(default)]
    pub dhchap_hosts: Vec<String>,
    /// The `nvme connect` line for it (for the first allowed host), with `<host secret>`
    /// placeholders where a secret goes.
    pub connect: String,
}

/// The `nvme connect` line of volume `r` for `host` (none: the host's own NQN), with the
/// authentication options `auth` (see [`VolumeAuth::connect_options`]).
fn connect_line(r: &VolumeRecord, ep: &Endpoint, host: Option<&str>, auth: &str) -> String {
    let host = match (host, r.allow_any_host) {
        (Some(h), _) => format!(" --hostnqn={h}"),
        // nvme-cli uses the host's own /etc/nvme/hostnqn.
        (None, true) => String::new(),
        (None, false) => " --hostnqn=<an allowed host NQN>".into(),
    };
    format!("nvme connect -t tcp -a {} -s {} -n {}{host}{auth}", ep.advertise, ep.listen.port(), r.nqn)
}

impl VolumeView {
    /// The view of a catalog record served at `ep`.
    #[must_use]
    pub fn new(r: &VolumeRecord, ep: &Endpoint) -> Self {
        let first = r.allowed_hosts.first().map(String::as_str);
        // The record knows which hosts have a secret, not whether one has a controller secret
        // (`volume_show` reads that and adds `--dhchap-ctrl-secret`).
        let auth = if r.require_auth || first.is_some_and(|h| r.dhchap_hosts.iter().any(|d| d == h)) {
            " --dhchap-secret=<host secret>"
        } else {
            ""
        };
        Self {
            name: r.name.clone(),
            size_bytes: r.size_bytes,
            block_size: r.block_size,
            compression: r.compression.clone(),
            origin: r.origin.as_ref().map(|(v, s)| format!("{v}@{s}")),
            nqn: r.nqn.clone(),
            nguid: hex(&r.nguid),
            uuid: uuid::Uuid::from_bytes(r.uuid).hyphenated().to_string(),
            serial: r.serial.clone(),
            allow_any_host: r.allow_any_host,
            allowed_hosts: r.allowed_hosts.clone(),
            state: r.state.as_str().to_owned(),
            created_unix_s: r.created_unix_s,
            require_auth: r.require_auth,
            dhchap_hosts: r.dhchap_hosts.clone(),
            connect: connect_line(r, ep, first, auth),
        }
    }
}

/// A host with a DH-HMAC-CHAP secret for a volume (never the secret itself).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostAuthView {
    /// Host NQN.
    pub host: String,
    /// A controller secret is set too: the host should authenticate the controller
    /// (`--dhchap-ctrl-secret`).
    pub bidirectional: bool,
}

/// Secrets the node made for a host (`volume_generate_host_secret`): shown this once.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct GeneratedSecrets {
    /// Host NQN.
    pub host: String,
    /// The host's secret (its `nvme connect --dhchap-secret`).
    pub dhchap_secret: SecretText,
    /// The controller's secret (its `--dhchap-ctrl-secret`), if bidirectional.
    pub dhchap_ctrl_secret: Option<SecretText>,
    /// The `nvme connect` line of this host, with placeholders where the secrets go.
    pub connect: String,
    /// The volume, now with the host allowed.
    pub volume: VolumeView,
}

/// A volume with what is known about it right now (`volume_show`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct VolumeDetail {
    /// The volume.
    #[serde(flatten)]
    pub volume: VolumeView,
    /// Loaded because a host uses it (or did recently).
    pub active: bool,
    /// Live controllers.
    pub controllers: usize,
    /// Its snapshots' names.
    pub snapshots: Vec<String>,
    /// Backend bytes it holds (when the backend can tell).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub used_bytes: Option<u64>,
    /// Bytes referenced, shared ones included.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub referenced_bytes: Option<u64>,
    /// Bytes written before compression.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub logical_used_bytes: Option<u64>,
    /// Compression ratio.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub compress_ratio: Option<f64>,
    /// Size not yet backed by the pool (`size_bytes - used_bytes`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub free_bytes: Option<u64>,
    /// The volume's size over the pool's size.
    pub pool_share: Option<f64>,
    /// Hosts with a DH-HMAC-CHAP secret, and whether each has a controller secret (never a
    /// secret).
    #[serde(default)]
    pub auth_hosts: Vec<HostAuthView>,
    /// The `nvme connect` line of each allowed host (one without `--hostnqn` when any host may
    /// connect and none is listed), with `<host secret>` / `<controller secret>` placeholders
    /// where that host needs them.
    #[serde(default)]
    pub connect_lines: Vec<String>,
}

/// A snapshot.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotView {
    /// Its volume.
    pub volume: String,
    /// Its name.
    pub name: String,
    /// The volume's size when it was taken.
    pub size_bytes: u64,
    /// `creating` or `ready`.
    pub state: String,
    /// Creation time, seconds since the Unix epoch.
    pub created_unix_s: u64,
}

impl From<&SnapshotRecord> for SnapshotView {
    fn from(s: &SnapshotRecord) -> Self {
        Self {
            volume: s.volume.clone(),
            name: s.name.clone(),
            size_bytes: s.size_bytes,
            state: s.state.as_str().to_owned(),
            created_unix_s: s.created_unix_s,
        }
    }
}

/// Space on the node.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct CapacityView {
    /// Sum of all volume sizes.
    pub provisioned_bytes: u64,
    /// The pool's size (`None`: the backend cannot tell).
    pub pool_bytes: Option<u64>,
    /// Bytes used in the pool.
    pub pool_used_bytes: Option<u64>,
    /// Bytes still available in the pool.
    pub pool_available_bytes: Option<u64>,
    /// `provisioned_bytes / pool_bytes`.
    pub overcommit: Option<f64>,
    /// The overcommit limit (`None`: no limit).
    pub overcommit_limit: Option<f64>,
    /// Bytes that may still be provisioned before the overcommit limit (`None`: no limit, or the
    /// pool's size is unknown).
    pub provisionable_bytes: Option<u64>,
}

impl CapacityView {
    fn of(node: &Node) -> Result<Self, NodeError> {
        let c = node.capacity()?;
        let provisionable_bytes = match (c.pool_bytes, c.overcommit_limit) {
            (Some(pool), Some(limit)) => {
                let cap = (pool as f64 * limit).min(u64::MAX as f64) as u64;
                Some(cap.saturating_sub(c.provisioned_bytes))
            }
            _ => None,
        };
        Ok(Self {
            provisioned_bytes: c.provisioned_bytes,
            pool_bytes: c.pool_bytes,
            pool_used_bytes: c.used_bytes,
            pool_available_bytes: c.available_bytes,
            overcommit: c.overcommit,
            overcommit_limit: c.overcommit_limit,
            provisionable_bytes,
        })
    }
}

/// Node gauges, where it listens, and its space (`status`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct StatusView {
    /// Volumes in the catalog.
    pub volumes_total: u64,
    /// Volumes loaded.
    pub volumes_active: usize,
    /// Live controllers.
    pub controllers: usize,
    /// The NQN prefix of the node's volumes.
    pub nqn_prefix: String,
    /// The NVMe/TCP listen address.
    pub listen: String,
    /// The address hosts are told.
    pub advertise: String,
    /// The backend.
    pub backend: String,
    /// The catalog file's size.
    pub catalog_bytes: u64,
    /// Space.
    #[serde(flatten)]
    pub capacity: CapacityView,
}

/// A successful request's result.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(untagged)]
#[non_exhaustive]
pub enum Response {
    /// `volume_create`, `volume_resize`, `volume_clone`, `volume_allow_host`, `volume_deny_host`,
    /// `volume_set_any_host`, `volume_set_require_auth`, `volume_remove_host_secret`.
    Volume(VolumeView),
    /// `volume_generate_host_secret`.
    GeneratedSecrets(Box<GeneratedSecrets>),
    /// `volume_show`.
    VolumeDetail(Box<VolumeDetail>),
    /// `volume_list`.
    Volumes(Vec<VolumeView>),
    /// `snapshot_create`, `snapshot_list`.
    Snapshots(Vec<SnapshotView>),
    /// `volume_delete` (`name`), `snapshot_delete` (`volume@snapshot`).
    Deleted {
        /// What was deleted.
        deleted: String,
    },
    /// `volume_create_batch`.
    Created {
        /// How many volumes were made.
        created: usize,
    },
    /// `status`.
    Status(Box<StatusView>),
    /// `capacity`.
    Capacity(CapacityView),
    /// `adopt`.
    Adopted {
        /// Names of the volumes imported.
        adopted: Vec<String>,
    },
    /// `upgrade`.
    Upgraded {
        /// What the upgrade did.
        upgraded: Value,
    },
}

/// The response line for a result: `{"ok":true,"result":…}` or
/// `{"ok":false,"kind":"…","error":"…"}`.
#[must_use]
pub fn response_json(result: &Result<Response, AdminError>) -> Value {
    match result {
        Ok(r) => match serde_json::to_value(r) {
            Ok(v) => json!({ "ok": true, "result": v }),
            Err(e) => {
                json!({ "ok": false, "kind": "internal", "error": format!("encoding the answer: {e}") })
            }
        },
        Err(e) => json!({ "ok": false, "kind": e.kind.as_str(), "error": e.message }),
    }
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// Carries out one request.
pub fn handle(node: &Node, ep: &Endpoint, req: Request) -> Result<Response, AdminError> {
    handle_node(node, ep, req)
}

/// The existing volume `name` if it was made with these parameters: `Ok(Some)` (the idempotent
/// answer), `Ok(None)` if there is no such volume, and an `exists` error if it differs.
fn same_volume(
    node: &Node,
    name: &str,
    size_bytes: u64,
    block_size: u32,
    compression: Option<&str>,
    origin: Option<(&str, &str)>,
    require_auth: bool,
) -> Result<Option<VolumeRecord>, AdminError> {
    let Some(rec) = node.catalog().volume(name).map_err(NodeError::from)? else { return Ok(None) };
    let differs = |what: String| {
        Err(AdminError::new(ErrorKind::Exists, format!("volume {name} already exists with {what}")))
    };
    if rec.state == VolumeState::Creating || rec.state == VolumeState::Deleting {
        return Err(NodeError::NotReady(format!("volume {name}")).into());
    }
    if rec.size_bytes != size_bytes {
        return differs(format!("size {} bytes, not {size_bytes}", rec.size_bytes));
    }
    if rec.block_size != block_size {
        return differs(format!("block size {}, not {block_size}", rec.block_size));
    }
    if let Some(c) = compression {
        if rec.compression.as_deref() != Some(c) {
            return differs(format!("compression {:?}, not {c:?}", rec.compression));
        }
    }
    let rec_origin = rec.origin.as_ref().map(|(v, s)| (v.as_str(), s.as_str()));
    if rec_origin != origin {
        let show =
            |o: Option<(&str, &str)>| o.map_or("no origin".to_owned(), |(v, s)| format!("origin {v}@{s}"));
        return differs(format!("{}, not {}", show(rec_origin), show(origin)));
    }
    // Asked to require authentication of a volume that does not: different. The other way round
    // is the same volume (it may have been turned on since).
    if require_auth && !rec.require_auth {
        return differs("no authentication requirement".to_owned());
    }
    Ok(Some(rec))
}

fn handle_node(node: &Node, ep: &Endpoint, req: Request) -> Result<Response, AdminError> {
    let view = |r: &VolumeRecord| VolumeView::new(r, ep);
    Ok(match req {
        Request::VolumeCreate {
            name,
            size_bytes,
            block_size,
            compression,
            allowed_hosts,
            allow_any_host,
            require_auth,
        } => {
            let req =
                CreateVolume { name, size_bytes, block_size, compression, allowed_hosts, allow_any_host };
            match node.create_volume_with_auth(req.clone(), &auth_options(require_auth)) {
                Ok(r) => Response::Volume(view(&r)),
                Err(NodeError::AlreadyExists(e)) => {
                    match same_volume(
                        node,
                        &req.name,
                        size_bytes,
                        block_size,
                        req.compression.as_deref(),
                        None,
                        require_auth,
                    )? {
                        Some(r) => Response::Volume(view(&r)),
                        None => return Err(NodeError::AlreadyExists(e).into()),
                    }
                }
                Err(e) => return Err(e.into()),
            }
        }
        Request::VolumeCreateBatch {
            prefix,
            start,
            count,
            size_bytes,
            block_size,
            allowed_hosts,
            require_auth,
        } => {
            if count > MAX_BATCH {
                return Err(AdminError::new(
                    ErrorKind::Invalid,
                    format!("invalid argument: a batch has at most {MAX_BATCH} volumes, not {count}"),
                ));
            }
            let reqs: Vec<CreateVolume> = (start..start.saturating_add(count))
                .map(|n| CreateVolume {
                    name: format!("{prefix}{n}"),
                    size_bytes,
                    block_size,
                    compression: None,
                    allowed_hosts: allowed_hosts.clone(),
                    allow_any_host: false,
                })
                .collect();
            let made = node.create_volumes_with_auth(reqs, &auth_options(require_auth))?;
            Response::Created { created: made.len() }
        }
        Request::VolumeList { prefix, after, limit } => {
            let limit = if limit == 0 { usize::MAX } else { limit };
            let v = node.volumes(&prefix, after.as_deref(), limit)?;
            Response::Volumes(v.iter().map(view).collect())
        }
        Request::VolumeShow { name } => {
            let info = node.volume(&name)?;
            let pool = node.capacity().ok().and_then(|c| c.pool_bytes);
            let snapshots = node.snapshots(&name)?.iter().map(|s| s.name.clone()).collect();
            let u = info.usage;
            let mut volume = view(&info.record);
            let first = info.record.allowed_hosts.first().map(String::as_str);
            volume.connect = connect_line(
                &info.record,
                ep,
                first,
                &first.map_or_else(|| info.auth.connect_options(""), |h| info.auth.connect_options(h)),
            );
            let mut connect_lines: Vec<String> = info
                .record
                .allowed_hosts
                .iter()
                .map(|h| connect_line(&info.record, ep, Some(h), &info.auth.connect_options(h)))
                .collect();
            if connect_lines.is_empty() && info.record.allow_any_host {
                connect_lines.push(volume.connect.clone());
            }
            Response::VolumeDetail(Box::new(VolumeDetail {
                volume,
                active: info.active,
                controllers: info.controllers,
                snapshots,
                used_bytes: u.map(|u| u.used_bytes),
                referenced_bytes: u.map(|u| u.referenced_bytes),
                logical_used_bytes: u.map(|u| u.logical_used_bytes),
                compress_ratio: u.map(|u| u.compress_ratio),
                // What the volume may still write that its backend does not hold yet (thin).
                free_bytes: u.map(|u| info.record.size_bytes.saturating_sub(u.used_bytes)),
                // The volume's size against the pool: its share of a full pool.
                pool_share: pool.filter(|&p| p > 0).map(|p| info.record.size_bytes as f64 / p as f64),
                auth_hosts: auth_hosts(&info.auth),
                connect_lines,
            }))
        }
        Request::VolumeResize { name, size_bytes, force } => {
            Response::Volume(view(&node.resize(&name, size_bytes, force)?))
        }
        Request::VolumeSetAnyHost { name, allow_any_host, disconnect } => {
            Response::Volume(view(&node.set_allow_any_host(&name, allow_any_host, disconnect)?))
        }
        Request::VolumeDelete { name, force } => {
            node.delete_volume(&name, force)?;
            Response::Deleted { deleted: name }
        }
        Request::VolumeClone { volume, snapshot, name, size_bytes, allowed_hosts, require_auth } => {
            let mut req = CreateVolume::new(name, size_bytes);
            req.allowed_hosts = allowed_hosts;
            match node.clone_volume_with_auth(&volume, &snapshot, req.clone(), &auth_options(require_auth)) {
                Ok(r) => Response::Volume(view(&r)),
                Err(NodeError::AlreadyExists(e)) => {
                    let Some(existing) = node.catalog().volume(&req.name).map_err(NodeError::from)? else {
                        return Err(NodeError::AlreadyExists(e).into());
                    };
                    let size = if size_bytes == 0 {
                        node.catalog()
                            .snapshot(&volume, &snapshot)
                            .map_err(NodeError::from)?
                            .map_or(existing.size_bytes, |s| s.size_bytes)
                    } else {
                        size_bytes
                    };
                    let origin = Some((volume.as_str(), snapshot.as_str()));
                    match same_volume(node, &req.name, size, existing.block_size, None, origin, require_auth)?
                    {
                        Some(r) => Response::Volume(view(&r)),
                        None => return Err(NodeError::AlreadyExists(e).into()),
                    }
                }
                Err(e) => return Err(e.into()),
            }
        }
        Request::VolumeAllowHost { name, host, dhchap_secret, dhchap_ctrl_secret } => {
            let rec = match host_secrets(dhchap_secret.as_ref(), dhchap_ctrl_secret.as_ref())? {
                Some(secrets) => node.allow_host_with_secrets(&name, &host, secrets)?,
                None => node.allow_host(&name, &host)?,
            };
            Response::Volume(view(&rec))
        }
        Request::VolumeGenerateHostSecret { name, host, hmac, key_length_bytes, bidirectional } => {
            let transform = match hmac {
                0 => None,
                1 => Some(DhchapHash::Sha256),
                2 => Some(DhchapHash::Sha384),
                3 => Some(DhchapHash::Sha512),
                other => {
                    return Err(AdminError::new(
                        ErrorKind::Invalid,
                        format!(
                        "invalid argument: hmac {other}: 0 (none), 1 (SHA-256), 2 (SHA-384) or 3 (SHA-512)"
                    ),
                    ))
                }
            };
            if !matches!(key_length_bytes, 32 | 48 | 64) {
                return Err(AdminError::new(
                    ErrorKind::Invalid,
                    format!("invalid argument: key length {key_length_bytes}: 32, 48 or 64 bytes"),
                ));
            }
            let params = SecretParams { key_len_bytes: key_length_bytes, transform };
            let mut secrets = HostSecrets::new(Node::generate_secret(params)?);
            if bidirectional {
                secrets = secrets.with_controller(Node::generate_secret(params)?);
            }
            let rec = node.allow_host_with_secrets(&name, &host, secrets.clone())?;
            let mut auth = String::from(" --dhchap-secret=<host secret>");
            if bidirectional {
                auth.push_str(" --dhchap-ctrl-secret=<controller secret>");
            }
            Response::GeneratedSecrets(Box::new(GeneratedSecrets {
                connect: connect_line(&rec, ep, Some(&host), &auth),
                host,
                dhchap_secret: secrets.host.to_dhhc1().into(),
                dhchap_ctrl_secret: secrets.controller.as_ref().map(|c| c.to_dhhc1().into()),
                volume: view(&rec),
            }))
        }
        Request::VolumeRemoveHostSecret { name, host } => {
            if !node.remove_host_secrets(&name, &host)? {
                return Err(AdminError::new(
                    ErrorKind::NotFound,
                    format!("host {host} has no secret for volume {name}"),
                ));
            }
            let rec = node
                .catalog()
                .volume(&name)
                .map_err(NodeError::from)?
                .ok_or_else(|| NodeError::NotFound(format!("volume {name}")))?;
            Response::Volume(view(&rec))
        }
        Request::VolumeSetRequireAuth { name, require_auth, disconnect } => {
            Response::Volume(view(&node.set_require_auth(&name, require_auth, disconnect)?))
        }
        Request::VolumeDenyHost { name, host, disconnect } => {
            Response::Volume(view(&node.deny_host(&name, &host, disconnect)?))
        }
        Request::SnapshotCreate { snapshots } => snapshot_create(node, snapshots)?,
        Request::SnapshotList { volume, name, after, limit } => Response::Snapshots(snapshot_list(
            node,
            volume.as_deref(),
            name.as_deref(),
            after.as_deref(),
            limit,
        )?),
        Request::SnapshotDelete { volume, snapshot } => {
            node.delete_snapshot(&volume, &snapshot)?;
            Response::Deleted { deleted: format!("{volume}@{snapshot}") }
        }
        Request::Adopt => Response::Adopted { adopted: node.adopt_existing()? },
        Request::Upgrade { binary } => match &ep.upgrade {
            Some(hook) => {
                let upgraded = (hook.0)(binary).map_err(|e| AdminError::new(ErrorKind::NotReady, e))?;
                Response::Upgraded { upgraded }
            }
            None => {
                return Err(AdminError::new(
                    ErrorKind::Unsupported,
                    "this server cannot upgrade itself (only `xatastor-target serve` can)",
                ))
            }
        },
        Request::Capacity => Response::Capacity(CapacityView::of(node)?),
        Request::Status => {
            let s = node.stats()?;
            Response::Status(Box::new(StatusView {
                volumes_total: s.volumes_total,
                volumes_active: s.volumes_active,
                controllers: s.controllers,
                nqn_prefix: node.nqn_prefix().to_owned(),
                listen: ep.listen.to_string(),
                advertise: ep.advertise.clone(),
                backend: ep.backend.clone(),
                catalog_bytes: node.catalog().file_bytes(),
                capacity: CapacityView::of(node)?,
            }))
        }
    })
}

fn auth_options(require_auth: bool) -> VolumeAuthOptions {
    let mut o = VolumeAuthOptions::new();
    o.require_auth = require_auth;
    o
}

fn auth_hosts(auth: &VolumeAuth) -> Vec<HostAuthView> {
    auth.hosts
        .iter()
        .map(|h| HostAuthView { host: h.hostnqn.clone(), bidirectional: h.controller_secret })
        .collect()
}

/// Parses one DHHC-1 secret of a request (`what` names the field); the message never holds it.
fn parse_secret(what: &str, s: &SecretText) -> Result<DhchapSecret, AdminError> {
    DhchapSecret::parse(s.expose())
        .map_err(|e| AdminError::new(ErrorKind::Invalid, format!("invalid argument: {what}: {e}")))
}

/// The host (and controller) secrets of a request, checked: `None` without a host secret.
fn host_secrets(
    host: Option<&SecretText>,
    ctrl: Option<&SecretText>,
) -> Result<Option<HostSecrets>, AdminError> {
    let Some(host) = host else {
        if ctrl.is_some() {
            return Err(AdminError::new(
                ErrorKind::Invalid,
                "invalid argument: a controller secret (dhchap_ctrl_secret) needs a host secret \
                 (dhchap_secret)",
            ));
        }
        return Ok(None);
    };
    let mut secrets = HostSecrets::new(parse_secret("dhchap_secret", host)?);
    if let Some(c) = ctrl {
        let c = parse_secret("dhchap_ctrl_secret", c)?;
        // One key for both directions would let a controller's challenge be answered with the
        // host's own response (a reflection).
        if *c.to_dhhc1() == *secrets.host.to_dhhc1() {
            return Err(AdminError::new(
                ErrorKind::Invalid,
                "invalid argument: the controller secret must differ from the host secret",
            ));
        }
        secrets = secrets.with_controller(c);
    }
    Ok(Some(secrets))
}

/// Takes the snapshots that do not exist yet (in one step) and returns all of them.
fn snapshot_create(node: &Node, snapshots: Vec<(String, String)>) -> Result<Response, AdminError> {
    let mut existing = Vec::new();
    let mut missing = Vec::new();
    for (v, s) in &snapshots {
        match node.catalog().snapshot(v, s).map_err(NodeError::from)? {
            Some(rec) if rec.state == VolumeState::Ready => existing.push(rec),
            Some(_) => return Err(NodeError::NotReady(format!("snapshot {v}@{s}")).into()),
            None => missing.push((v.clone(), s.clone())),
        }
    }
    let made = if missing.is_empty() && !existing.is_empty() { Vec::new() } else { node.snapshot(&missing)? };
    // In the order asked for.
    let all: Vec<SnapshotView> = snapshots
        .iter()
        .filter_map(|(v, s)| {
            made.iter().chain(&existing).find(|r| &r.volume == v && &r.name == s).map(SnapshotView::from)
        })
        .collect();
    Ok(Response::Snapshots(all))
}

/// Volumes read from the catalog per step when listing every volume's snapshots.
const SNAPSHOT_SCAN_PAGE: usize = 1024;

fn snapshot_list(
    node: &Node,
    volume: Option<&str>,
    name: Option<&str>,
    after: Option<&str>,
    limit: usize,
) -> Result<Vec<SnapshotView>, AdminError> {
    let limit = if limit == 0 { usize::MAX } else { limit };
    let after = match after {
        Some(a) => match a.split_once('@') {
            Some((v, s)) => Some((v.to_owned(), s.to_owned())),
            None => {
                return Err(AdminError::new(
                    ErrorKind::Invalid,
                    format!("invalid argument: after {a:?} is not VOLUME@SNAPSHOT"),
                ))
            }
        },
        None => None,
    };
    let keep = |r: &SnapshotRecord| {
        name.is_none_or(|n| r.name == n)
            && after
                .as_ref()
                .is_none_or(|(av, asn)| (r.volume.as_str(), r.name.as_str()) > (av.as_str(), asn.as_str()))
    };
    let mut out = Vec::new();
    if let Some(v) = volume {
        for r in node.snapshots(v)?.iter().filter(|r| keep(r)).take(limit) {
            out.push(SnapshotView::from(r));
        }
        return Ok(out);
    }
    let catalog = node.catalog();
    // Start at the volume of `after` (inclusive: it may have more snapshots after that one).
    let mut cursor: Option<String> = after.as_ref().map(|(v, _)| v.clone());
    let mut first = true;
    loop {
        let page = match (&cursor, first) {
            (Some(c), true) => {
                let mut p = catalog.volume(c).map_err(NodeError::from)?.into_iter().collect::<Vec<_>>();
                p.extend(catalog.volumes("", Some(c), SNAPSHOT_SCAN_PAGE).map_err(NodeError::from)?);
                p
            }
            (c, _) => catalog.volumes("", c.as_deref(), SNAPSHOT_SCAN_PAGE).map_err(NodeError::from)?,
        };
        first = false;
        let Some(last) = page.last() else { return Ok(out) };
        cursor = Some(last.name.clone());
        for v in &page {
            for r in catalog.snapshots_of(&v.name).map_err(NodeError::from)?.iter().filter(|r| keep(r)) {
                out.push(SnapshotView::from(r));
                if out.len() >= limit {
                    return Ok(out);
                }
            }
        }
    }
}
