//! The admin API of `xatastor-target`: request and response types and the handler that carries a
//! request out on a [`Node`]. No transport here: [`socket`] serves it on the local Unix socket (the
//! CLI's), and any other transport (gRPC for a CSI driver) calls [`handle`] the same way.
//!
//! ```text
//!   CLI ── one JSON line ──▶ socket::serve ─┐
//!   other transport ───────────────────────┴─▶ handle(node, endpoint, Request) ─▶ Result<Value, AdminError>
//!                                                                                   │
//!   {"ok":true,"result":…} / {"ok":false,"kind":"not_found","error":"volume x does not exist"} ◀┘
//! ```
//!
//! Requests are JSON objects tagged by `op` ([`Request`]); the protocol reference (every request,
//! its fields, the result and the error kinds) is in `docs/admin-protocol.md`.

pub mod socket;

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use xatastor_core::catalog::{SnapshotRecord, VolumeRecord};
use xatastor_core::{CreateVolume, Node, NodeError, ProvisionError};

/// A request to the admin endpoint.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Request {
    /// Create a volume.
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
        /// Disconnect connected hosts first.
        #[serde(default)]
        force: bool,
    },
    /// Clone a snapshot into a new volume.
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
    },
    /// Allow a host.
    VolumeAllowHost {
        /// Volume.
        name: String,
        /// Host NQN.
        host: String,
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
        /// Tear down its controllers too.
        #[serde(default)]
        disconnect: bool,
    },
    /// Take snapshots (several at once: one backend step).
    SnapshotCreate {
        /// `(volume, snapshot)` pairs.
        snapshots: Vec<(String, String)>,
    },
    /// List a volume's snapshots.
    SnapshotList {
        /// Volume.
        volume: String,
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
    /// Record the backend's volumes and snapshots the catalog does not know (one-time import of an
    /// existing pool).
    Adopt,
}

/// Most volumes one `volume_create_batch` makes (its records are built in memory first).
pub const MAX_BATCH: u64 = 1_000_000;

fn default_block_size() -> u32 {
    512
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
            Self::VolumeSetAnyHost { .. } => "volume_set_any_host",
            Self::VolumeDenyHost { .. } => "volume_deny_host",
            Self::SnapshotCreate { .. } => "snapshot_create",
            Self::SnapshotList { .. } => "snapshot_list",
            Self::SnapshotDelete { .. } => "snapshot_delete",
            Self::Status => "status",
            Self::Adopt => "adopt",
        }
    }
}

/// What the server knows about itself that responses mention (the `nvme connect` line).
#[derive(Clone, Debug)]
pub struct Endpoint {
    /// The address the server listens on.
    pub listen: std::net::SocketAddr,
    /// The address hosts are told to connect to (`--advertise`, else the listen address unless
    /// that is 0.0.0.0 or ::).
    pub advertise: String,
    /// The backend (`memory`, `file`, `zvol:<dataset>`).
    pub backend: String,
}

/// A failed request: a machine-readable kind and a one-line message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AdminError {
    /// `not_found`, `exists`, `busy`, `has_dependents`, `invalid`, `unsupported`, `no_space`,
    /// `not_ready`, `backend_mismatch` or `internal`.
    pub kind: &'static str,
    /// What went wrong, for a person.
    pub message: String,
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

/// The response line for a result: `{"ok":true,"result":…}` or
/// `{"ok":false,"kind":"…","error":"…"}`.
#[must_use]
pub fn response_json(result: &Result<Value, AdminError>) -> Value {
    match result {
        Ok(v) => json!({ "ok": true, "result": v }),
        Err(e) => json!({ "ok": false, "kind": e.kind, "error": e.message }),
    }
}

fn kind_of(e: &NodeError) -> &'static str {
    match e {
        NodeError::NotFound(_) | NodeError::Provision(ProvisionError::NotFound(_)) => "not_found",
        NodeError::AlreadyExists(_) | NodeError::Provision(ProvisionError::AlreadyExists(_)) => "exists",
        NodeError::Busy { .. }
        | NodeError::ShrinkWhileConnected { .. }
        | NodeError::Provision(ProvisionError::Busy(_)) => "busy",
        NodeError::HostNotAllowed { .. } => "not_found",
        NodeError::ShrinkNotForced { .. } | NodeError::AnyHostAllowed { .. } => "invalid",
        NodeError::OvercommitExceeded { .. } => "no_space",
        NodeError::BackendMismatch { .. } => "backend_mismatch",
        NodeError::HasDependents { .. } | NodeError::Provision(ProvisionError::HasDependents { .. }) => {
            "has_dependents"
        }
        NodeError::InvalidArgument(_) | NodeError::Provision(ProvisionError::InvalidArgument(_)) => "invalid",
        NodeError::Provision(ProvisionError::Unsupported(_)) => "unsupported",
        NodeError::Provision(ProvisionError::NoSpace(_)) => "no_space",
        NodeError::NotReady(_) => "not_ready",
        _ => "internal",
    }
}

fn volume_json(r: &VolumeRecord, ep: &Endpoint) -> Value {
    let host = match (r.allowed_hosts.first(), r.allow_any_host) {
        (Some(h), _) => format!(" --hostnqn={h}"),
        // nvme-cli uses the host's own /etc/nvme/hostnqn.
        (None, true) => String::new(),
        (None, false) => " --hostnqn=<an allowed host NQN>".into(),
    };
    json!({
        "name": r.name,
        "size_bytes": r.size_bytes,
        "block_size": r.block_size,
        "compression": r.compression,
        "origin": r.origin.as_ref().map(|(v, s)| format!("{v}@{s}")),
        "nqn": r.nqn,
        "nguid": hex(&r.nguid),
        "uuid": uuid(&r.uuid),
        "serial": r.serial,
        "allow_any_host": r.allow_any_host,
        "allowed_hosts": r.allowed_hosts,
        "state": r.state.as_str(),
        "created_unix_s": r.created_unix_s,
        "connect": format!("nvme connect -t tcp -a {} -s {} -n {}{host}", ep.advertise, ep.listen.port(), r.nqn),
    })
}

fn snapshot_json(s: &SnapshotRecord) -> Value {
    json!({
        "volume": s.volume,
        "name": s.name,
        "size_bytes": s.size_bytes,
        "state": s.state.as_str(),
        "created_unix_s": s.created_unix_s,
    })
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn uuid(b: &[u8; 16]) -> String {
    uuid::Uuid::from_bytes(*b).hyphenated().to_string()
}

/// Carries out one request.
pub fn handle(node: &Node, ep: &Endpoint, req: Request) -> Result<Value, AdminError> {
    handle_node(node, ep, req).map_err(AdminError::from)
}

fn opt<T: Serialize>(v: Option<T>) -> Value {
    v.map_or(Value::Null, |v| json!(v))
}

fn handle_node(node: &Node, ep: &Endpoint, req: Request) -> Result<Value, NodeError> {
    Ok(match req {
        Request::VolumeCreate {
            name,
            size_bytes,
            block_size,
            compression,
            allowed_hosts,
            allow_any_host,
        } => {
            let r = node.create_volume(CreateVolume {
                name,
                size_bytes,
                block_size,
                compression,
                allowed_hosts,
                allow_any_host,
            })?;
            volume_json(&r, ep)
        }
        Request::VolumeCreateBatch { prefix, start, count, size_bytes, block_size, allowed_hosts } => {
            if count > MAX_BATCH {
                return Err(NodeError::InvalidArgument(format!(
                    "a batch has at most {MAX_BATCH} volumes, not {count}"
                )));
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
            let made = node.create_volumes(reqs)?;
            json!({ "created": made.len() })
        }
        Request::VolumeList { prefix, after, limit } => {
            let limit = if limit == 0 { usize::MAX } else { limit };
            let v = node.volumes(&prefix, after.as_deref(), limit)?;
            Value::Array(v.iter().map(|r| volume_json(r, ep)).collect())
        }
        Request::VolumeShow { name } => {
            let info = node.volume(&name)?;
            let mut v = volume_json(&info.record, ep);
            let pool = node.capacity().ok().and_then(|c| c.pool_bytes);
            v["active"] = json!(info.active);
            v["controllers"] = json!(info.controllers);
            v["snapshots"] = json!(node.snapshots(&name)?.iter().map(|s| s.name.clone()).collect::<Vec<_>>());
            if let Some(u) = info.usage {
                v["used_bytes"] = json!(u.used_bytes);
                v["referenced_bytes"] = json!(u.referenced_bytes);
                v["logical_used_bytes"] = json!(u.logical_used_bytes);
                v["compress_ratio"] = json!(u.compress_ratio);
                // What the volume may still write that its backend does not hold yet (thin).
                v["free_bytes"] = json!(info.record.size_bytes.saturating_sub(u.used_bytes));
            }
            // The volume's size against the pool: its share of a full pool.
            v["pool_share"] = opt(pool.filter(|&p| p > 0).map(|p| info.record.size_bytes as f64 / p as f64));
            v
        }
        Request::VolumeResize { name, size_bytes, force } => {
            volume_json(&node.resize(&name, size_bytes, force)?, ep)
        }
        Request::VolumeSetAnyHost { name, allow_any_host, disconnect } => {
            volume_json(&node.set_allow_any_host(&name, allow_any_host, disconnect)?, ep)
        }
        Request::VolumeDelete { name, force } => {
            node.delete_volume(&name, force)?;
            json!({ "deleted": name })
        }
        Request::VolumeClone { volume, snapshot, name, size_bytes, allowed_hosts } => {
            let mut req = CreateVolume::new(name, size_bytes);
            req.allowed_hosts = allowed_hosts;
            volume_json(&node.clone_volume(&volume, &snapshot, req)?, ep)
        }
        Request::VolumeAllowHost { name, host } => volume_json(&node.allow_host(&name, &host)?, ep),
        Request::VolumeDenyHost { name, host, disconnect } => {
            volume_json(&node.deny_host(&name, &host, disconnect)?, ep)
        }
        Request::SnapshotCreate { snapshots } => {
            Value::Array(node.snapshot(&snapshots)?.iter().map(snapshot_json).collect())
        }
        Request::SnapshotList { volume } => {
            Value::Array(node.snapshots(&volume)?.iter().map(snapshot_json).collect())
        }
        Request::SnapshotDelete { volume, snapshot } => {
            node.delete_snapshot(&volume, &snapshot)?;
            json!({ "deleted": format!("{volume}@{snapshot}") })
        }
        Request::Adopt => {
            let adopted = node.adopt_existing()?;
            json!({ "adopted": adopted })
        }
        Request::Status => {
            let s = node.stats()?;
            let c = node.capacity()?;
            json!({
                "volumes_total": s.volumes_total,
                "volumes_active": s.volumes_active,
                "controllers": s.controllers,
                "nqn_prefix": node.nqn_prefix(),
                "listen": ep.listen.to_string(),
                "advertise": ep.advertise,
                "backend": ep.backend,
                "catalog_bytes": node.catalog().file_bytes(),
                "provisioned_bytes": c.provisioned_bytes,
                "pool_bytes": opt(c.pool_bytes),
                "pool_used_bytes": opt(c.used_bytes),
                "pool_available_bytes": opt(c.available_bytes),
                "overcommit": opt(c.overcommit),
                "overcommit_limit": opt(c.overcommit_limit),
            })
        }
    })
}
