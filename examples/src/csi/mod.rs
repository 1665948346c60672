//! A CSI driver (Container Storage Interface, spec v1.9) for Xatastor storage nodes: the
//! [`controller`] places and manages volumes on several storage nodes through their network admin
//! API ([`crate::grpc`]); the [`node`] plugin on each Kubernetes host connects the kernel's NVMe/TCP
//! initiator, makes and mounts the file system.
//!
//! ```text
//!   external-provisioner / -attacher / -resizer / -snapshotter ──▶ xatastor-csi controller
//!        CreateVolume: the storage node with the most free capacity     │ admin gRPC (TLS / token)
//!        ControllerPublish: allow the node's host NQN                   ├──▶ storage node "a"
//!                                                                       └──▶ storage node "b"
//!   kubelet ──▶ xatastor-csi node (one per host, node id = /etc/nvme/hostnqn)
//!        NodeStage: nvme connect, find /dev/nvmeXnY by subsystem NQN, mkfs.xfs if blank, mount
//!        NodePublish: bind mount (or the block device itself)
//! ```
//!
//! IDs name their storage node: a volume is `NODE/VOLUME`, a snapshot `NODE/VOLUME@SNAPSHOT`;
//! snapshots and clones stay on their source's node (they are ZFS snapshots and clones). Every RPC
//! is idempotent and fails with the gRPC code the spec gives for the case.

// Every CSI error is a gRPC status (the spec defines the codes); these are control-plane calls,
// where the size of the error value does not matter.
#![allow(clippy::result_large_err)]

pub mod call;
pub mod controller;
pub mod node;

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use tonic::{Code, Status};

/// The generated CSI messages, servers and clients (`csi.v1`).
#[allow(missing_docs, unreachable_pub, clippy::all, clippy::pedantic, rustdoc::all)]
pub mod pb {
    include!("../generated/csi.v1.rs");
}

/// The driver's name (`GetPluginInfo`, the Kubernetes `CSIDriver` object).
pub const DRIVER_NAME: &str = "csi.xatastor.io";

/// Size of a volume created without a capacity range.
pub const DEFAULT_SIZE_BYTES: u64 = 1 << 30;

/// Block size of CSI volumes unless the `blockSize` parameter says 512.
pub const DEFAULT_BLOCK_SIZE: u32 = 4096;

/// StorageClass parameter: the storage node to create on (default: the one with the most free
/// capacity).
pub const PARAM_STORAGE_NODE: &str = "storageNode";
/// StorageClass parameter: compression (zvol backend: lz4, zstd, off, …).
pub const PARAM_COMPRESSION: &str = "compression";
/// StorageClass parameter: logical block size, 512 or 4096.
pub const PARAM_BLOCK_SIZE: &str = "blockSize";
/// StorageClass parameter: I/O queues of the host's NVMe/TCP controller.
pub const PARAM_NR_IO_QUEUES: &str = "nrIoQueues";
/// StorageClass parameter: keep-alive timeout in seconds.
pub const PARAM_KEEP_ALIVE_TMO: &str = "keepAliveTmo";
/// StorageClass parameter: seconds the host retries a lost controller before giving up.
pub const PARAM_CTRL_LOSS_TMO: &str = "ctrlLossTmo";
/// StorageClass parameter: seconds between the host's reconnect attempts.
pub const PARAM_RECONNECT_DELAY: &str = "reconnectDelay";

/// Connection settings of the host (volume context keys, StorageClass parameters), with their
/// defaults and allowed ranges.
pub const CONNECT_PARAMS: [(&str, u32, u32, u32); 4] = [
    (PARAM_NR_IO_QUEUES, 2, 1, 128),
    (PARAM_KEEP_ALIVE_TMO, 5, 1, 255),
    (PARAM_CTRL_LOSS_TMO, 600, 1, 86_400),
    (PARAM_RECONNECT_DELAY, 2, 1, 3600),
];

/// Publish context keys.
pub const CTX_ADDRESS: &str = "address";
/// Publish context: the NVMe/TCP port.
pub const CTX_PORT: &str = "port";
/// Publish and volume context: the subsystem NQN.
pub const CTX_NQN: &str = "nqn";

/// A volume ID: `NODE/VOLUME`.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct VolumeId {
    /// The storage node.
    pub node: String,
    /// The volume's name there.
    pub volume: String,
}

impl VolumeId {
    /// Parses `NODE/VOLUME`; `None` for anything else (such a volume does not exist).
    #[must_use]
    pub fn parse(id: &str) -> Option<Self> {
        let (node, volume) = id.split_once('/')?;
        (valid_node_name(node) && valid_object_name(volume))
            .then(|| Self { node: node.to_owned(), volume: volume.to_owned() })
    }
}

impl std::fmt::Display for VolumeId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.node, self.volume)
    }
}

/// A snapshot ID: `NODE/VOLUME@SNAPSHOT`.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct SnapshotId {
    /// The storage node.
    pub node: String,
    /// The volume.
    pub volume: String,
    /// The snapshot's name.
    pub snapshot: String,
}

impl SnapshotId {
    /// Parses `NODE/VOLUME@SNAPSHOT`; `None` for anything else.
    #[must_use]
    pub fn parse(id: &str) -> Option<Self> {
        let (node, rest) = id.split_once('/')?;
        let (volume, snapshot) = rest.split_once('@')?;
        (valid_node_name(node) && valid_object_name(volume) && valid_object_name(snapshot)).then(|| Self {
            node: node.to_owned(),
            volume: volume.to_owned(),
            snapshot: snapshot.to_owned(),
        })
    }

    /// The source volume's ID.
    #[must_use]
    pub fn volume_id(&self) -> VolumeId {
        VolumeId { node: self.node.clone(), volume: self.volume.clone() }
    }
}

impl std::fmt::Display for SnapshotId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}@{}", self.node, self.volume, self.snapshot)
    }
}

/// A storage node name in IDs: 1–63 of `a-z 0-9 - .`, starting and ending alphanumeric.
#[must_use]
pub fn valid_node_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
        && s.bytes().next().is_some_and(|b| b.is_ascii_alphanumeric())
        && s.bytes().last().is_some_and(|b| b.is_ascii_alphanumeric())
}

/// A name the storage node accepts for a volume or snapshot (1–128 of ASCII letters, digits, `_`,
/// `.`, `:`, `-`; not starting with `.` or `-`).
#[must_use]
pub fn valid_object_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 128
        && s.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b':' | b'-'))
        && !s.starts_with(['.', '-'])
}

/// The storage node's name for a CSI name: the name itself when the node accepts it (Kubernetes'
/// `pvc-<uuid>`, `snapshot-<uuid>`), else `csi-` and a 128-bit hash of it (any Unicode the CO sends).
#[must_use]
pub fn object_name(csi_name: &str) -> String {
    if valid_object_name(csi_name) && !csi_name.starts_with("csi-") {
        return csi_name.to_owned();
    }
    let mut out = String::from("csi-");
    for seed in [0xcbf2_9ce4_8422_2325u64, 0x6c62_272e_07bb_0142] {
        let mut h = seed;
        for b in csi_name.bytes() {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
        out.push_str(&format!("{h:016x}"));
    }
    out
}

/// Checks a CO-given name: present, at most 128 bytes... of any text but control characters.
pub fn check_csi_name(name: &str, what: &str) -> Result<(), Status> {
    if name.is_empty() {
        return Err(Status::invalid_argument(format!("{what} is required")));
    }
    if name.chars().any(|c| c.is_control() && c != '\t' && c != '\n' && c != '\r') {
        return Err(Status::invalid_argument(format!("{what} contains control characters")));
    }
    Ok(())
}

/// The connection settings: the StorageClass parameters (or volume context) with defaults,
/// checked.
pub fn connect_settings(params: &HashMap<String, String>) -> Result<Vec<(&'static str, u32)>, Status> {
    CONNECT_PARAMS
        .iter()
        .map(|&(key, default, min, max)| match params.get(key) {
            None => Ok((key, default)),
            Some(v) => match v.trim().parse::<u32>() {
                Ok(n) if (min..=max).contains(&n) => Ok((key, n)),
                _ => Err(Status::invalid_argument(format!(
                    "parameter {key}={v:?}: a number from {min} to {max}"
                ))),
            },
        })
        .collect()
}

/// The CSI status for a failed admin call, with the storage node named in the message.
#[must_use]
pub fn status_from_admin(node: &str, s: &Status) -> Status {
    use xatastor_core::admin::ErrorKind;
    let e = crate::grpc::error_of(s);
    let code = match s.code() {
        Code::Unauthenticated | Code::PermissionDenied => {
            return Status::unavailable(format!(
                "storage node {node} refused the driver's credentials: {}",
                s.message()
            ))
        }
        Code::Unavailable | Code::DeadlineExceeded | Code::Unknown | Code::Cancelled
            if e.kind == ErrorKind::Internal || s.metadata().get(crate::grpc::ERROR_KIND_KEY).is_none() =>
        {
            return Status::unavailable(format!("storage node {node} unreachable: {}", s.message()));
        }
        _ => match e.kind {
            ErrorKind::NotFound => Code::NotFound,
            ErrorKind::Exists => Code::AlreadyExists,
            ErrorKind::Busy | ErrorKind::HasDependents | ErrorKind::BackendMismatch => {
                Code::FailedPrecondition
            }
            ErrorKind::Invalid | ErrorKind::Unsupported => Code::InvalidArgument,
            ErrorKind::NoSpace => Code::ResourceExhausted,
            ErrorKind::NotReady => Code::Aborted,
            _ => Code::Internal,
        },
    };
    Status::new(code, format!("storage node {node}: {}", e.message))
}

/// Where a CSI endpoint listens: a Unix socket (`unix:///csi/csi.sock` or a path) or TCP
/// (`tcp://127.0.0.1:10000`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CsiEndpoint {
    /// A Unix socket path.
    Unix(PathBuf),
    /// A TCP address.
    Tcp(std::net::SocketAddr),
}

impl CsiEndpoint {
    /// Parses `unix://PATH`, `tcp://ADDR` or a plain path.
    pub fn parse(s: &str) -> Result<Self, String> {
        if let Some(p) = s.strip_prefix("unix://") {
            return Ok(Self::Unix(PathBuf::from(p)));
        }
        if let Some(a) = s.strip_prefix("tcp://") {
            return a.parse().map(Self::Tcp).map_err(|e| format!("endpoint {s:?}: {e}"));
        }
        if s.starts_with('/') {
            return Ok(Self::Unix(PathBuf::from(s)));
        }
        Err(format!("endpoint {s:?}: unix:///path/csi.sock or tcp://host:port"))
    }
}

/// Binds a Unix socket for the CSI endpoint (a stale socket file is replaced).
pub fn bind_unix(path: &Path) -> std::io::Result<tokio::net::UnixListener> {
    if path.exists() {
        std::fs::remove_file(path)?;
    }
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    tokio::net::UnixListener::bind(path)
}

/// A CSI client over a Unix socket (tests, tools).
pub async fn unix_channel(path: &Path) -> Result<tonic::transport::Channel, tonic::transport::Error> {
    let path = path.to_owned();
    tonic::transport::Endpoint::from_static("http://[::1]:1")
        .connect_with_connector(tower::service_fn(move |_: tonic::transport::Uri| {
            let path = path.clone();
            async move {
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(
                    tokio::net::UnixStream::connect(path).await?,
                ))
            }
        }))
        .await
}

/// The Identity service: the plugin's name and version, its capabilities, readiness.
#[derive(Clone, Debug)]
pub struct Identity {
    /// Whether this instance serves the Controller service.
    pub controller: bool,
}

#[tonic::async_trait]
impl pb::identity_server::Identity for Identity {
    async fn get_plugin_info(
        &self,
        _: tonic::Request<pb::GetPluginInfoRequest>,
    ) -> Result<tonic::Response<pb::GetPluginInfoResponse>, Status> {
        Ok(tonic::Response::new(pb::GetPluginInfoResponse {
            name: DRIVER_NAME.into(),
            vendor_version: env!("CARGO_PKG_VERSION").into(),
            manifest: HashMap::new(),
        }))
    }

    async fn get_plugin_capabilities(
        &self,
        _: tonic::Request<pb::GetPluginCapabilitiesRequest>,
    ) -> Result<tonic::Response<pb::GetPluginCapabilitiesResponse>, Status> {
        use pb::plugin_capability::{service, volume_expansion, Service, Type, VolumeExpansion};
        // The same for every instance (controller and node plugins), as the spec asks.
        let capabilities = vec![
            pb::PluginCapability {
                r#type: Some(Type::Service(Service { r#type: service::Type::ControllerService as i32 })),
            },
            pb::PluginCapability {
                r#type: Some(Type::VolumeExpansion(VolumeExpansion {
                    r#type: volume_expansion::Type::Online as i32,
                })),
            },
        ];
        Ok(tonic::Response::new(pb::GetPluginCapabilitiesResponse { capabilities }))
    }

    async fn probe(
        &self,
        _: tonic::Request<pb::ProbeRequest>,
    ) -> Result<tonic::Response<pb::ProbeResponse>, Status> {
        Ok(tonic::Response::new(pb::ProbeResponse { ready: Some(true) }))
    }
}

/// What a volume capability asks for, once checked.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Access {
    /// The raw block device.
    Block,
    /// A file system: type (`xfs` or `ext4`) and mount flags.
    Mount {
        /// File system type.
        fs_type: String,
        /// Extra mount options.
        flags: Vec<String>,
    },
}

/// Checks one capability: an access type, and a single-node access mode (a volume is one host's
/// block device at a time); the file system xfs (default) or ext4.
pub fn check_capability(c: &pb::VolumeCapability) -> Result<Access, String> {
    use pb::volume_capability::access_mode::Mode;
    use pb::volume_capability::AccessType;
    let mode = c.access_mode.map(|m| Mode::try_from(m.mode).unwrap_or(Mode::Unknown));
    match mode {
        None | Some(Mode::Unknown) => return Err("the volume capability has no access mode".into()),
        Some(
            Mode::SingleNodeWriter
            | Mode::SingleNodeReaderOnly
            | Mode::SingleNodeSingleWriter
            | Mode::SingleNodeMultiWriter,
        ) => {}
        Some(m) => {
            return Err(format!("access mode {} is not supported (single-node modes only)", m.as_str_name()))
        }
    }
    match &c.access_type {
        None => Err("the volume capability has no access type (block or mount)".into()),
        Some(AccessType::Block(_)) => Ok(Access::Block),
        Some(AccessType::Mount(m)) => {
            let fs_type = if m.fs_type.is_empty() { "xfs".to_owned() } else { m.fs_type.clone() };
            if fs_type != "xfs" && fs_type != "ext4" {
                return Err(format!("file system {fs_type:?} is not supported (xfs or ext4)"));
            }
            if m.mount_flags.iter().any(|f| f.contains(',') || f.is_empty()) {
                return Err("mount flags are single options without commas".into());
            }
            Ok(Access::Mount { fs_type, flags: m.mount_flags.clone() })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_round_trip_and_reject_garbage() {
        let v = VolumeId::parse("node-a/pvc-1").unwrap();
        assert_eq!(
            (v.node.as_str(), v.volume.as_str(), v.to_string().as_str()),
            ("node-a", "pvc-1", "node-a/pvc-1")
        );
        let s = SnapshotId::parse("node-a/pvc-1@snap-2").unwrap();
        assert_eq!(s.to_string(), "node-a/pvc-1@snap-2");
        assert_eq!(s.volume_id(), v);
        for bad in ["", "x", "/v", "n/", "N/v", "n/v/w", "n/.v", "n/v@s", "-n/v"] {
            assert!(VolumeId::parse(bad).is_none(), "{bad:?}");
        }
        for bad in ["n/v", "n/v@", "n/@s", "n/v@s@t"] {
            assert!(SnapshotId::parse(bad).is_none(), "{bad:?}");
        }
    }

    #[test]
    fn csi_names_map_to_node_names() {
        assert_eq!(object_name("pvc-0f1e"), "pvc-0f1e");
        let odd = object_name("名前 with spaces");
        assert!(valid_object_name(&odd) && odd.starts_with("csi-") && odd.len() == 36, "{odd}");
        assert_eq!(odd, object_name("名前 with spaces"), "stable");
        assert_ne!(odd, object_name("名前 with space"));
        // A name that looks like a mapped one is mapped too (no collision with a hash).
        assert_ne!(object_name("csi-0000000000000000"), "csi-0000000000000000");
        assert_eq!(object_name(&"a".repeat(128)), "a".repeat(128));
        assert!(object_name(&"a".repeat(129)).starts_with("csi-"));
    }

    #[test]
    fn connect_settings_are_checked() {
        let s = connect_settings(&HashMap::new()).unwrap();
        assert!(s.contains(&(PARAM_NR_IO_QUEUES, 2)) && s.contains(&(PARAM_RECONNECT_DELAY, 2)));
        let p = HashMap::from([(PARAM_CTRL_LOSS_TMO.to_owned(), "30".to_owned())]);
        assert!(connect_settings(&p).unwrap().contains(&(PARAM_CTRL_LOSS_TMO, 30)));
        for bad in ["0", "-1", "x", "100000"] {
            let p = HashMap::from([(PARAM_CTRL_LOSS_TMO.to_owned(), bad.to_owned())]);
            assert_eq!(connect_settings(&p).unwrap_err().code(), Code::InvalidArgument, "{bad}");
        }
    }
}

/// The services one endpoint serves.
#[derive(Clone)]
pub struct Services {
    /// The Controller service (the controller plugin).
    pub controller: Option<controller::Controller>,
    /// The Node service (the node plugin).
    pub node: Option<node::Node>,
}

/// Serves Identity and the given services on `endpoint` until `shutdown` completes.
pub async fn serve(
    endpoint: &CsiEndpoint,
    services: Services,
    shutdown: impl std::future::Future<Output = ()> + Send,
) -> Result<(), String> {
    let identity =
        pb::identity_server::IdentityServer::new(Identity { controller: services.controller.is_some() });
    let router = tonic::transport::Server::builder()
        .add_service(identity)
        .add_optional_service(services.controller.map(pb::controller_server::ControllerServer::new))
        .add_optional_service(services.node.map(pb::node_server::NodeServer::new));
    match endpoint {
        CsiEndpoint::Unix(path) => {
            let listener = bind_unix(path).map_err(|e| format!("CSI endpoint {}: {e}", path.display()))?;
            let incoming = tokio_stream::wrappers::UnixListenerStream::new(listener);
            let r = router.serve_with_incoming_shutdown(incoming, shutdown).await;
            let _ = std::fs::remove_file(path);
            r.map_err(|e| format!("CSI endpoint {}: {e}", path.display()))
        }
        CsiEndpoint::Tcp(addr) => {
            router.serve_with_shutdown(*addr, shutdown).await.map_err(|e| format!("CSI endpoint {addr}: {e}"))
        }
    }
}
