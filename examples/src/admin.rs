//! The local admin endpoint of `xatastor-target`: one JSON request per line on a Unix socket in the
//! data directory (mode 0600, so only the server's user can manage volumes; nothing on the network),
//! one JSON response line back.
//!
//! ```text
//!   $ xatastor-target volume create pg-main --size 10GiB --allow-host nqn.2014-08.org.nvmexpress:uuid:…
//!        │  {"op":"volume_create","name":"pg-main","size_bytes":10737418240,…}\n
//!        ▼
//!   <data dir>/admin.sock ──▶ Node::create_volume ──▶ {"ok":true,"result":{…}}\n
//! ```
//!
//! Errors come back as `{"ok":false,"kind":"not_found","error":"volume x does not exist"}`; the CLI
//! prints the message on one line and exits non-zero.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use xatastor_core::catalog::{SnapshotRecord, VolumeRecord};
use xatastor_core::{CreateVolume, Node, NodeError, ProvisionError};

/// Largest request line accepted (a batch create of many volumes fits).
const MAX_REQUEST_BYTES: u64 = 64 << 20;

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
        /// 512 or 4096.
        block_size: u32,
        /// Compression (backends that have it).
        compression: Option<String>,
        /// Hosts allowed to connect.
        allowed_hosts: Vec<String>,
        /// Any host may connect.
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
        /// 512 or 4096.
        block_size: u32,
        /// Hosts allowed to connect to each.
        allowed_hosts: Vec<String>,
    },
    /// List volumes.
    VolumeList {
        /// Name prefix filter.
        prefix: String,
        /// Start after this name (paging).
        after: Option<String>,
        /// At most this many.
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
        /// Size (0: the snapshot's).
        size_bytes: u64,
        /// Hosts allowed to connect to the clone.
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

/// What the server knows about itself that responses mention (the `nvme connect` line).
#[derive(Clone, Debug)]
pub struct Endpoint {
    /// Address hosts connect to.
    pub traddr: String,
    /// Port.
    pub trsvcid: u16,
    /// Backend kind.
    pub backend: String,
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
    let host = r.allowed_hosts.first().cloned().unwrap_or_else(|| "<your host NQN>".into());
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
        "state": format!("{:?}", r.state).to_lowercase(),
        "created_unix_s": r.created_unix_s,
        "connect": format!("nvme connect -t tcp -a {} -s {} -n {} --hostnqn={host}", ep.traddr, ep.trsvcid, r.nqn),
    })
}

fn snapshot_json(s: &SnapshotRecord) -> Value {
    json!({
        "volume": s.volume,
        "name": s.name,
        "size_bytes": s.size_bytes,
        "state": format!("{:?}", s.state).to_lowercase(),
        "created_unix_s": s.created_unix_s,
    })
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn uuid(b: &[u8; 16]) -> String {
    let h = hex(b);
    format!("{}-{}-{}-{}-{}", &h[0..8], &h[8..12], &h[12..16], &h[16..20], &h[20..32])
}

/// Carries out one request.
pub fn handle(node: &Node, ep: &Endpoint, req: Request) -> Result<Value, NodeError> {
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
            let v = node.volumes(&prefix, after.as_deref(), limit)?;
            Value::Array(v.iter().map(|r| volume_json(r, ep)).collect())
        }
        Request::VolumeShow { name } => {
            let info = node.volume(&name)?;
            let mut v = volume_json(&info.record, ep);
            v["active"] = json!(info.active);
            v["controllers"] = json!(info.controllers);
            v["snapshots"] = json!(node.snapshots(&name)?.iter().map(|s| s.name.clone()).collect::<Vec<_>>());
            if let Some(u) = info.usage {
                v["used_bytes"] = json!(u.used_bytes);
                v["referenced_bytes"] = json!(u.referenced_bytes);
                v["logical_used_bytes"] = json!(u.logical_used_bytes);
                v["compress_ratio"] = json!(u.compress_ratio);
            }
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
            json!({
                "volumes_total": s.volumes_total,
                "volumes_active": s.volumes_active,
                "controllers": s.controllers,
                "nqn_prefix": node.nqn_prefix(),
                "listen": format!("{}:{}", ep.traddr, ep.trsvcid),
                "backend": ep.backend,
                "catalog_bytes": node.catalog().file_bytes(),
            })
        }
    })
}

/// Binds the admin socket at `path` (mode 0600; a stale socket from a dead server is replaced) and
/// serves it on a thread, one thread per admin client (admin traffic is rare).
pub fn serve(path: &Path, node: Node, ep: Endpoint) -> std::io::Result<()> {
    if path.exists() {
        // Refuse to take over from a live server; replace a stale socket.
        if UnixStream::connect(path).is_ok() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::AddrInUse,
                format!("another server is running (its admin socket {} answers)", path.display()),
            ));
        }
        std::fs::remove_file(path)?;
    }
    let listener = UnixListener::bind(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    std::thread::Builder::new().name("xatastor-admin".into()).spawn(move || {
        for stream in listener.incoming() {
            let Ok(stream) = stream else { continue };
            let (node, ep) = (node.clone(), ep.clone());
            let _ = std::thread::Builder::new().name("xatastor-admin-conn".into()).spawn(move || {
                serve_client(stream, &node, &ep);
            });
        }
    })?;
    Ok(())
}

fn serve_client(stream: UnixStream, node: &Node, ep: &Endpoint) {
    let Ok(mut out) = stream.try_clone() else { return };
    let mut reader = BufReader::new(std::io::Read::take(stream, MAX_REQUEST_BYTES));
    let mut line = String::new();
    while reader.read_line(&mut line).map(|n| n > 0).unwrap_or(false) {
        let response = match serde_json::from_str::<Request>(&line) {
            Ok(req) => {
                tracing::info!(request = line.trim_end(), "admin request");
                match handle(node, ep, req) {
                    Ok(result) => json!({ "ok": true, "result": result }),
                    Err(e) => {
                        tracing::warn!(error = %e, "admin request failed");
                        json!({ "ok": false, "kind": kind_of(&e), "error": e.to_string() })
                    }
                }
            }
            Err(e) => json!({ "ok": false, "kind": "invalid", "error": format!("bad request: {e}") }),
        };
        if writeln!(out, "{response}").is_err() {
            return;
        }
        line.clear();
    }
}

/// Sends one request to the server's admin socket and returns its result, or the server's error
/// message.
pub fn call(path: &Path, req: &Request) -> Result<Value, String> {
    let mut stream = UnixStream::connect(path).map_err(|e| {
        format!(
            "cannot reach the server at {} ({e}); is `xatastor-target serve` running with this --data-dir?",
            path.display()
        )
    })?;
    let line = serde_json::to_string(req).map_err(|e| e.to_string())?;
    writeln!(stream, "{line}").map_err(|e| format!("sending to the server: {e}"))?;
    let mut resp = String::new();
    BufReader::new(&stream).read_line(&mut resp).map_err(|e| format!("reading the server's answer: {e}"))?;
    let v: Value = serde_json::from_str(&resp).map_err(|e| format!("bad answer from the server: {e}"))?;
    if v["ok"].as_bool() == Some(true) {
        Ok(v["result"].clone())
    } else {
        Err(v["error"].as_str().unwrap_or("the server reported an error").to_owned())
    }
}
