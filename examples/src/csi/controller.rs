//! The CSI Controller service: volumes, snapshots, clones, expansion and host access on several
//! storage nodes, through each node's admin API.
//!
//! - **Placement.** A new volume goes to the storage node with the most free capacity: what it may
//!   still provision under its overcommit limit, or its pool's free space where it has no limit
//!   (`storageNode` in the StorageClass picks one). Snapshots and clones stay on their source's node.
//! - **Idempotency.** A CreateVolume or CreateSnapshot name is looked up on every node first: the
//!   same name with compatible parameters returns what exists; otherwise `ALREADY_EXISTS`. Deletes
//!   of what does not exist succeed. Concurrent calls on one name get `ABORTED`.
//! - **Publish** allows the Kubernetes node's host NQN (its CSI node id) on the volume and returns
//!   the address, port and subsystem NQN to connect to; **unpublish** denies it with disconnect:
//!   its namespace is taken away first, so the host drops the block device at once.

// Every CSI error is a gRPC status (the spec defines the codes); these are control-plane calls,
// where the size of the error value does not matter.
#![allow(clippy::result_large_err)]

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use parking_lot::Mutex;
use tonic::{Code, Request, Response, Status};

use super::pb;
use super::{
    check_capability, check_csi_name, connect_settings, object_name, status_from_admin, Access, SnapshotId,
    VolumeId, CTX_ADDRESS, CTX_NQN, CTX_PORT, DEFAULT_BLOCK_SIZE, DEFAULT_SIZE_BYTES, PARAM_BLOCK_SIZE,
    PARAM_COMPRESSION, PARAM_STORAGE_NODE,
};
use crate::grpc::{self, pb as admin, AdminClient, ClientAuth};

/// Prefix of the snapshots the driver takes to clone a volume from a volume (deleted again with the
/// clone).
pub const CLONE_SNAPSHOT_PREFIX: &str = "xatastor-csi-clone:";

/// Volume context key: the storage node.
pub const CTX_STORAGE_NODE: &str = "storageNode";

/// One storage node the controller manages.
#[derive(Clone)]
pub struct StorageNode {
    /// Its name in volume IDs.
    pub name: String,
    client: AdminClient,
}

impl StorageNode {
    /// A node reached at `endpoint` (`http://…` or `https://…`) with `auth`.
    pub fn new(name: &str, endpoint: &str, auth: &ClientAuth) -> Result<Self, String> {
        if !super::valid_node_name(name) {
            return Err(format!(
                "storage node name {name:?}: 1-63 of a-z, 0-9, '-', '.', starting and ending alphanumeric"
            ));
        }
        Ok(Self { name: name.to_owned(), client: grpc::connect(endpoint, auth)? })
    }

    fn client(&self) -> AdminClient {
        self.client.clone()
    }

    fn err(&self, s: &Status) -> Status {
        status_from_admin(&self.name, s)
    }
}

/// The Controller service.
#[derive(Clone)]
pub struct Controller {
    nodes: Arc<Vec<StorageNode>>,
    busy: Arc<Mutex<HashSet<String>>>,
}

/// Marks a name as having an operation in flight until dropped.
struct Busy {
    set: Arc<Mutex<HashSet<String>>>,
    key: String,
}

impl Drop for Busy {
    fn drop(&mut self) {
        self.set.lock().remove(&self.key);
    }
}

impl Controller {
    /// A controller over `nodes` (names must be unique).
    pub fn new(nodes: Vec<StorageNode>) -> Result<Self, String> {
        let mut seen = HashSet::new();
        for n in &nodes {
            if !seen.insert(n.name.clone()) {
                return Err(format!("storage node {} is given twice", n.name));
            }
        }
        if nodes.is_empty() {
            return Err("no storage node configured".into());
        }
        Ok(Self { nodes: Arc::new(nodes), busy: Arc::default() })
    }

    fn node(&self, name: &str) -> Option<&StorageNode> {
        self.nodes.iter().find(|n| n.name == name)
    }

    fn lock(&self, key: String) -> Result<Busy, Status> {
        if !self.busy.lock().insert(key.clone()) {
            return Err(Status::aborted(format!("an operation on {key} is in progress")));
        }
        Ok(Busy { set: self.busy.clone(), key })
    }

    /// The volume on its node, or `None` if the node or the volume does not exist.
    async fn volume(&self, id: &VolumeId) -> Result<Option<admin::VolumeDetail>, Status> {
        let Some(node) = self.node(&id.node) else { return Ok(None) };
        match node.client().get_volume(admin::GetVolumeRequest { name: id.volume.clone() }).await {
            Ok(v) => Ok(Some(v.into_inner())),
            Err(s) if node.err(&s).code() == Code::NotFound => Ok(None),
            Err(s) => Err(node.err(&s)),
        }
    }

    /// The volume `name` on any node (every node must answer: otherwise it might be on the silent one).
    async fn find_volume(&self, name: &str) -> Result<Option<(VolumeId, admin::VolumeDetail)>, Status> {
        for node in self.nodes.iter() {
            let id = VolumeId { node: node.name.clone(), volume: name.to_owned() };
            if let Some(v) = self.volume(&id).await? {
                return Ok(Some((id, v)));
            }
        }
        Ok(None)
    }

    /// Snapshots named `name` on any node.
    async fn find_snapshot(&self, name: &str) -> Result<Option<(SnapshotId, admin::Snapshot)>, Status> {
        for node in self.nodes.iter() {
            let req = admin::ListSnapshotsRequest { name: Some(name.to_owned()), ..Default::default() };
            let list = node.client().list_snapshots(req).await.map_err(|s| node.err(&s))?.into_inner();
            if let Some(s) = list.snapshots.into_iter().find(|s| s.state == "ready") {
                let id = SnapshotId {
                    node: node.name.clone(),
                    volume: s.volume.clone(),
                    snapshot: s.name.clone(),
                };
                return Ok(Some((id, s)));
            }
        }
        Ok(None)
    }

    async fn snapshot(&self, id: &SnapshotId) -> Result<Option<admin::Snapshot>, Status> {
        let Some(node) = self.node(&id.node) else { return Ok(None) };
        let req = admin::ListSnapshotsRequest { volume: Some(id.volume.clone()), ..Default::default() };
        match node.client().list_snapshots(req).await {
            Ok(l) => {
                Ok(l.into_inner().snapshots.into_iter().find(|s| s.name == id.snapshot && s.state == "ready"))
            }
            Err(s) if node.err(&s).code() == Code::NotFound => Ok(None),
            Err(s) => Err(node.err(&s)),
        }
    }

    /// The node a new volume of `size` goes to.
    async fn place(&self, size: u64, pinned: Option<&str>) -> Result<&StorageNode, Status> {
        let mut best: Option<(&StorageNode, u64, u64)> = None;
        let mut reasons = Vec::new();
        for node in self.nodes.iter().filter(|n| pinned.is_none_or(|p| p == n.name)) {
            let cap = match node.client().get_capacity(admin::GetCapacityRequest {}).await {
                Ok(c) => c.into_inner(),
                Err(s) => {
                    reasons.push(format!("{}: {}", node.name, s.message()));
                    continue;
                }
            };
            let Some(free) = free_capacity(&cap) else { continue };
            if free < size {
                reasons.push(format!("{}: {free} bytes free", node.name));
                continue;
            }
            let better = best.is_none_or(|(_, f, p)| free > f || (free == f && cap.provisioned_bytes < p));
            if better {
                best = Some((node, free, cap.provisioned_bytes));
            }
        }
        match (best, pinned) {
            (Some((n, _, _)), _) => Ok(n),
            (None, Some(p)) if self.node(p).is_none() => Err(Status::invalid_argument(format!(
                "parameter {PARAM_STORAGE_NODE}: no storage node {p:?}"
            ))),
            (None, _) => Err(Status::resource_exhausted(format!(
                "no storage node has {size} bytes free ({})",
                reasons.join("; ")
            ))),
        }
    }
}

/// What a node may still take: its headroom under the overcommit limit, else its pool's free space;
/// `None` when it cannot tell (taken as unlimited).
#[must_use]
pub fn free_capacity(c: &admin::Capacity) -> Option<u64> {
    Some(c.provisionable_bytes.or(c.pool_available_bytes).unwrap_or(u64::MAX))
}

/// Volume parameters of a CreateVolume (or GetCapacity) request, checked.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct Params {
    storage_node: Option<String>,
    compression: Option<String>,
    block_size: Option<u32>,
    connect: Vec<(&'static str, u32)>,
}

fn params(p: &HashMap<String, String>) -> Result<Params, Status> {
    let known = [PARAM_STORAGE_NODE, PARAM_COMPRESSION, PARAM_BLOCK_SIZE];
    for k in p.keys() {
        let connect = super::CONNECT_PARAMS.iter().any(|(c, ..)| c == k);
        // The external-provisioner passes its own keys (PVC name, namespace) with this prefix.
        if !known.contains(&k.as_str()) && !connect && !k.starts_with("csi.storage.k8s.io/") {
            return Err(Status::invalid_argument(format!(
                "unknown parameter {k:?} (known: {}, {})",
                known.join(", "),
                super::CONNECT_PARAMS.iter().map(|(c, ..)| *c).collect::<Vec<_>>().join(", ")
            )));
        }
    }
    let block_size = match p.get(PARAM_BLOCK_SIZE).map(String::as_str) {
        None => None,
        Some("512") => Some(512),
        Some("4096") => Some(4096),
        Some(other) => {
            return Err(Status::invalid_argument(format!("{PARAM_BLOCK_SIZE}={other:?}: 512 or 4096")))
        }
    };
    Ok(Params {
        storage_node: p.get(PARAM_STORAGE_NODE).cloned(),
        compression: p.get(PARAM_COMPRESSION).cloned().filter(|c| !c.is_empty()),
        block_size,
        connect: connect_settings(p)?,
    })
}

/// The size to make from a capacity range: at least `min` (a source's size) and `required`, a
/// multiple of `block`, at most `limit`; `DEFAULT_SIZE_BYTES` (within the limit) when nothing is asked.
fn size_for(range: Option<&pb::CapacityRange>, block: u64, min: u64) -> Result<u64, Status> {
    let (req, lim) = range.map_or((0, 0), |r| (r.required_bytes, r.limit_bytes));
    if req < 0 || lim < 0 {
        return Err(Status::invalid_argument("capacity range: negative bytes"));
    }
    let (req, lim) = (req as u64, lim as u64);
    if lim > 0 && req > lim {
        return Err(Status::invalid_argument(format!("capacity range: required {req} > limit {lim}")));
    }
    let round_up = |x: u64| x.div_ceil(block).saturating_mul(block);
    let want = if req > 0 {
        round_up(req.max(min))
    } else if min > 0 {
        round_up(min)
    } else if lim > 0 && lim < DEFAULT_SIZE_BYTES {
        lim / block * block
    } else {
        DEFAULT_SIZE_BYTES
    };
    if want == 0 || (lim > 0 && want > lim) {
        return Err(Status::out_of_range(format!(
            "no size of {block}-byte blocks of at least {} bytes fits the limit of {lim} bytes",
            req.max(min)
        )));
    }
    Ok(want)
}

fn fits(range: Option<&pb::CapacityRange>, size: u64) -> bool {
    let (req, lim) = range.map_or((0, 0), |r| (r.required_bytes.max(0) as u64, r.limit_bytes.max(0) as u64));
    size >= req && (lim == 0 || size <= lim)
}

fn to_i64(x: u64) -> i64 {
    i64::try_from(x).unwrap_or(i64::MAX)
}

fn csi_volume(
    id: &VolumeId,
    v: &admin::Volume,
    params: &Params,
    source: Option<pb::VolumeContentSource>,
) -> pb::Volume {
    let mut ctx: HashMap<String, String> =
        params.connect.iter().map(|(k, v)| ((*k).to_owned(), v.to_string())).collect();
    ctx.insert(CTX_NQN.into(), v.nqn.clone());
    ctx.insert(CTX_STORAGE_NODE.into(), id.node.clone());
    pb::Volume {
        capacity_bytes: to_i64(v.size_bytes),
        volume_id: id.to_string(),
        volume_context: ctx,
        content_source: source,
        accessible_topology: Vec::new(),
    }
}

fn csi_snapshot(id: &SnapshotId, s: &admin::Snapshot) -> pb::Snapshot {
    pb::Snapshot {
        size_bytes: to_i64(s.size_bytes),
        snapshot_id: id.to_string(),
        source_volume_id: id.volume_id().to_string(),
        creation_time: Some(prost_types::Timestamp { seconds: to_i64(s.created_unix_s), nanos: 0 }),
        ready_to_use: s.state == "ready",
        group_snapshot_id: String::new(),
    }
}

fn check_capabilities(caps: &[pb::VolumeCapability]) -> Result<Vec<Access>, Status> {
    if caps.is_empty() {
        return Err(Status::invalid_argument("volume capabilities are required"));
    }
    caps.iter().map(|c| check_capability(c).map_err(Status::invalid_argument)).collect()
}

/// Where the volume came from, as the request names it.
enum Source {
    Snapshot(SnapshotId),
    Volume(VolumeId),
}

fn source_of(s: Option<&pb::VolumeContentSource>) -> Result<Option<Source>, Status> {
    use pb::volume_content_source::Type;
    match s.and_then(|s| s.r#type.as_ref()) {
        None => Ok(None),
        Some(Type::Snapshot(s)) => match SnapshotId::parse(&s.snapshot_id) {
            Some(id) => Ok(Some(Source::Snapshot(id))),
            None => Err(Status::not_found(format!("snapshot {:?} does not exist", s.snapshot_id))),
        },
        Some(Type::Volume(v)) => match VolumeId::parse(&v.volume_id) {
            Some(id) => Ok(Some(Source::Volume(id))),
            None => Err(Status::not_found(format!("volume {:?} does not exist", v.volume_id))),
        },
    }
}

type Reply<T> = Result<Response<T>, Status>;

#[tonic::async_trait]
impl pb::controller_server::Controller for Controller {
    async fn create_volume(&self, r: Request<pb::CreateVolumeRequest>) -> Reply<pb::CreateVolumeResponse> {
        let r = r.into_inner();
        check_csi_name(&r.name, "name")?;
        check_capabilities(&r.volume_capabilities)?;
        let p = params(&r.parameters)?;
        if !r.mutable_parameters.is_empty() {
            return Err(Status::invalid_argument("mutable parameters are not supported"));
        }
        let name = object_name(&r.name);
        let _busy = self.lock(format!("volume {name}"))?;
        let source = source_of(r.volume_content_source.as_ref())?;
        let block = u64::from(p.block_size.unwrap_or(DEFAULT_BLOCK_SIZE));

        // The source: it must exist; the new volume lives on its node.
        let (origin, source_size, pinned) = match &source {
            None => (None, 0, p.storage_node.clone()),
            Some(Source::Snapshot(s)) => {
                let snap = self
                    .snapshot(s)
                    .await?
                    .ok_or_else(|| Status::not_found(format!("snapshot {s} does not exist")))?;
                (Some((s.volume.clone(), s.snapshot.clone())), snap.size_bytes, Some(s.node.clone()))
            }
            Some(Source::Volume(v)) => {
                let vol = self
                    .volume(v)
                    .await?
                    .ok_or_else(|| Status::not_found(format!("volume {v} does not exist")))?;
                let size = vol.volume.map_or(0, |v| v.size_bytes);
                let snap = object_name(&format!("{CLONE_SNAPSHOT_PREFIX}{name}"));
                (Some((v.volume.clone(), snap)), size, Some(v.node.clone()))
            }
        };
        if let (Some(pinned), Some(asked)) = (&pinned, &p.storage_node) {
            if pinned != asked {
                return Err(Status::invalid_argument(format!(
                    "{PARAM_STORAGE_NODE}={asked} but the source lives on {pinned}"
                )));
            }
        }

        // Idempotency: the same name anywhere.
        if let Some((id, existing)) = self.find_volume(&name).await? {
            let v = existing.volume.unwrap_or_default();
            let existing_origin = v.origin_volume.clone().zip(v.origin_snapshot.clone());
            let same = fits(r.capacity_range.as_ref(), v.size_bytes)
                && p.block_size.is_none_or(|b| b == v.block_size)
                && p.compression.as_ref().is_none_or(|c| v.compression.as_ref() == Some(c))
                && existing_origin == origin
                && pinned.as_ref().is_none_or(|n| *n == id.node);
            if !same {
                return Err(Status::already_exists(format!(
                    "volume {:?} exists ({id}, {} bytes) with other parameters",
                    r.name, v.size_bytes
                )));
            }
            return Ok(Response::new(pb::CreateVolumeResponse {
                volume: Some(csi_volume(&id, &v, &p, r.volume_content_source.clone())),
            }));
        }

        let size = size_for(r.capacity_range.as_ref(), block, source_size)?;
        let v = match (&source, &origin) {
            (None, _) => {
                let node = self.place(size, pinned.as_deref()).await?;
                let req = admin::CreateVolumeRequest {
                    name: name.clone(),
                    size_bytes: size,
                    block_size: block as u32,
                    compression: p.compression.clone(),
                    allowed_hosts: Vec::new(),
                    allow_any_host: false,
                    ..Default::default()
                };
                let v = node.client().create_volume(req).await.map_err(|s| node.err(&s))?.into_inner();
                (VolumeId { node: node.name.clone(), volume: name.clone() }, v)
            }
            (Some(src), Some((vol, snap))) => {
                let node_name = match src {
                    Source::Snapshot(s) => &s.node,
                    Source::Volume(v) => &v.node,
                };
                let node = self
                    .node(node_name)
                    .ok_or_else(|| Status::not_found(format!("storage node {node_name}")))?;
                if let Source::Volume(_) = src {
                    let req = admin::CreateSnapshotsRequest {
                        snapshots: vec![admin::SnapshotRef { volume: vol.clone(), snapshot: snap.clone() }],
                    };
                    node.client().create_snapshots(req).await.map_err(|s| node.err(&s))?;
                }
                let req = admin::CloneVolumeRequest {
                    volume: vol.clone(),
                    snapshot: snap.clone(),
                    name: name.clone(),
                    size_bytes: size,
                    allowed_hosts: Vec::new(),
                    ..Default::default()
                };
                let v = node.client().clone_volume(req).await.map_err(|s| node.err(&s))?.into_inner();
                (VolumeId { node: node.name.clone(), volume: name.clone() }, v)
            }
            (Some(_), None) => return Err(Status::internal("source without origin")),
        };
        tracing::info!(volume = %v.0, size_bytes = v.1.size_bytes, "volume created");
        Ok(Response::new(pb::CreateVolumeResponse {
            volume: Some(csi_volume(&v.0, &v.1, &p, r.volume_content_source)),
        }))
    }

    async fn delete_volume(&self, r: Request<pb::DeleteVolumeRequest>) -> Reply<pb::DeleteVolumeResponse> {
        let r = r.into_inner();
        if r.volume_id.is_empty() {
            return Err(Status::invalid_argument("volume id is required"));
        }
        let Some(id) = VolumeId::parse(&r.volume_id) else {
            return Ok(Response::new(pb::DeleteVolumeResponse {}));
        };
        let Some(node) = self.node(&id.node) else { return Ok(Response::new(pb::DeleteVolumeResponse {})) };
        let _busy = self.lock(format!("volume {}", id.volume))?;
        let Some(v) = self.volume(&id).await? else { return Ok(Response::new(pb::DeleteVolumeResponse {})) };
        let origin = v.volume.and_then(|v| v.origin_volume.zip(v.origin_snapshot));
        // A storage node deletes a volume's snapshots with it; CSI snapshots outlive their source
        // volume's claim, so a volume that has any is not deleted (the CO retries once they are
        // gone). Snapshots taken only to clone from are the driver's own and do not count.
        let req = admin::ListSnapshotsRequest { volume: Some(id.volume.clone()), ..Default::default() };
        match node.client().list_snapshots(req).await {
            Ok(l) => {
                let kept: Vec<String> = l
                    .into_inner()
                    .snapshots
                    .into_iter()
                    .filter(|s| !s.name.starts_with(CLONE_SNAPSHOT_PREFIX))
                    .map(|s| s.name)
                    .collect();
                if !kept.is_empty() {
                    return Err(Status::failed_precondition(format!(
                        "volume {id} has snapshots ({}): delete them first (its snapshots would be deleted with it)",
                        kept.join(", ")
                    )));
                }
            }
            Err(s) if node.err(&s).code() == Code::NotFound => {
                return Ok(Response::new(pb::DeleteVolumeResponse {}))
            }
            Err(s) => return Err(node.err(&s)),
        }
        let req = admin::DeleteVolumeRequest { name: id.volume.clone(), force: false };
        match node.client().delete_volume(req).await {
            Ok(_) => {}
            Err(s) if node.err(&s).code() == Code::NotFound => {}
            Err(s) => {
                let e = grpc::error_of(&s);
                return Err(match e.kind {
                    xatastor_core::admin::ErrorKind::Busy => Status::failed_precondition(format!(
                        "volume {id} is in use: a host is connected (unpublish it first): {}",
                        e.message
                    )),
                    _ => node.err(&s),
                });
            }
        }
        // The snapshot taken to clone it from a volume goes with it.
        if let Some((vol, snap)) = origin.filter(|(_, s)| s.starts_with(CLONE_SNAPSHOT_PREFIX)) {
            let req = admin::DeleteSnapshotRequest { volume: vol, snapshot: snap };
            if let Err(s) = node.client().delete_snapshot(req).await {
                tracing::warn!(volume = %id, error = %s.message(), "could not delete the clone's source snapshot");
            }
        }
        tracing::info!(volume = %id, "volume deleted");
        Ok(Response::new(pb::DeleteVolumeResponse {}))
    }

    async fn controller_publish_volume(
        &self,
        r: Request<pb::ControllerPublishVolumeRequest>,
    ) -> Reply<pb::ControllerPublishVolumeResponse> {
        let r = r.into_inner();
        if r.volume_id.is_empty() {
            return Err(Status::invalid_argument("volume id is required"));
        }
        if r.node_id.is_empty() {
            return Err(Status::invalid_argument("node id is required"));
        }
        let cap = r
            .volume_capability
            .as_ref()
            .ok_or_else(|| Status::invalid_argument("volume capability is required"))?;
        check_capability(cap).map_err(Status::invalid_argument)?;
        let id = VolumeId::parse(&r.volume_id)
            .ok_or_else(|| Status::not_found(format!("volume {:?} does not exist", r.volume_id)))?;
        if !r.node_id.starts_with("nqn.") || r.node_id.len() > 223 {
            return Err(Status::not_found(format!(
                "node {:?} does not exist (node ids are host NQNs)",
                r.node_id
            )));
        }
        let node =
            self.node(&id.node).ok_or_else(|| Status::not_found(format!("volume {id} does not exist")))?;
        let _busy = self.lock(format!("volume {}", id.volume))?;
        let v = self
            .volume(&id)
            .await?
            .and_then(|d| d.volume)
            .ok_or_else(|| Status::not_found(format!("volume {id} does not exist")))?;
        if v.allowed_hosts.iter().any(|h| h != &r.node_id) {
            return Err(Status::failed_precondition(format!(
                "volume {id} is published to another node ({}); a volume is one node's at a time",
                v.allowed_hosts.join(", ")
            )));
        }
        let req = admin::AllowHostRequest {
            name: id.volume.clone(),
            host: r.node_id.clone(),
            ..Default::default()
        };
        let v = node.client().allow_host(req).await.map_err(|s| node.err(&s))?.into_inner();
        let st = node
            .client()
            .get_status(admin::GetStatusRequest {})
            .await
            .map_err(|s| node.err(&s))?
            .into_inner();
        let port = st.listen.parse::<std::net::SocketAddr>().map(|a| a.port()).map_err(|_| {
            Status::internal(format!("storage node {}: listen address {:?}", node.name, st.listen))
        })?;
        if st.advertise.starts_with('<') {
            return Err(Status::failed_precondition(format!(
                "storage node {} listens on all addresses without --advertise: hosts cannot be told where to connect",
                node.name
            )));
        }
        let publish_context = HashMap::from([
            (CTX_ADDRESS.to_owned(), st.advertise),
            (CTX_PORT.to_owned(), port.to_string()),
            (CTX_NQN.to_owned(), v.nqn),
        ]);
        tracing::info!(volume = %id, host = %r.node_id, "volume published");
        Ok(Response::new(pb::ControllerPublishVolumeResponse { publish_context }))
    }

    async fn controller_unpublish_volume(
        &self,
        r: Request<pb::ControllerUnpublishVolumeRequest>,
    ) -> Reply<pb::ControllerUnpublishVolumeResponse> {
        let r = r.into_inner();
        if r.volume_id.is_empty() {
            return Err(Status::invalid_argument("volume id is required"));
        }
        let done = || Ok(Response::new(pb::ControllerUnpublishVolumeResponse {}));
        let Some(id) = VolumeId::parse(&r.volume_id) else { return done() };
        let Some(node) = self.node(&id.node) else { return done() };
        let _busy = self.lock(format!("volume {}", id.volume))?;
        let Some(v) = self.volume(&id).await?.and_then(|d| d.volume) else { return done() };
        let hosts: Vec<String> = if r.node_id.is_empty() {
            v.allowed_hosts
        } else {
            v.allowed_hosts.into_iter().filter(|h| *h == r.node_id).collect()
        };
        for host in hosts {
            // With disconnect: the namespace is taken away from the host first, so it drops the
            // block device at once.
            let req =
                admin::DenyHostRequest { name: id.volume.clone(), host: host.clone(), disconnect: true };
            match node.client().deny_host(req).await {
                Ok(_) => tracing::info!(volume = %id, %host, "volume unpublished"),
                Err(s) if node.err(&s).code() == Code::NotFound => {}
                Err(s) => return Err(node.err(&s)),
            }
        }
        done()
    }

    async fn validate_volume_capabilities(
        &self,
        r: Request<pb::ValidateVolumeCapabilitiesRequest>,
    ) -> Reply<pb::ValidateVolumeCapabilitiesResponse> {
        let r = r.into_inner();
        if r.volume_id.is_empty() {
            return Err(Status::invalid_argument("volume id is required"));
        }
        if r.volume_capabilities.is_empty() {
            return Err(Status::invalid_argument("volume capabilities are required"));
        }
        let id = VolumeId::parse(&r.volume_id)
            .ok_or_else(|| Status::not_found(format!("volume {:?} does not exist", r.volume_id)))?;
        self.volume(&id).await?.ok_or_else(|| Status::not_found(format!("volume {id} does not exist")))?;
        if let Err(e) = params(&r.parameters) {
            return Ok(Response::new(pb::ValidateVolumeCapabilitiesResponse {
                confirmed: None,
                message: e.message().to_owned(),
            }));
        }
        let resp = match r.volume_capabilities.iter().map(check_capability).collect::<Result<Vec<_>, _>>() {
            Ok(_) => pb::ValidateVolumeCapabilitiesResponse {
                confirmed: Some(pb::validate_volume_capabilities_response::Confirmed {
                    volume_context: r.volume_context,
                    volume_capabilities: r.volume_capabilities,
                    parameters: r.parameters,
                    mutable_parameters: HashMap::new(),
                }),
                message: String::new(),
            },
            Err(message) => pb::ValidateVolumeCapabilitiesResponse { confirmed: None, message },
        };
        Ok(Response::new(resp))
    }

    async fn list_volumes(&self, r: Request<pb::ListVolumesRequest>) -> Reply<pb::ListVolumesResponse> {
        let r = r.into_inner();
        if r.max_entries < 0 {
            return Err(Status::invalid_argument("max_entries must not be negative"));
        }
        let max = if r.max_entries == 0 { usize::MAX } else { r.max_entries as usize };
        let (mut idx, mut after) = parse_token(&r.starting_token, self.nodes.len())?;
        let mut entries = Vec::new();
        while idx < self.nodes.len() {
            let node = &self.nodes[idx];
            let want = max.saturating_sub(entries.len());
            let req = admin::ListVolumesRequest {
                prefix: String::new(),
                after: after.take(),
                limit: want.min(1000) as u64,
            };
            let page = node.client().list_volumes(req).await.map_err(|s| node.err(&s))?.into_inner().volumes;
            let full = page.len() >= want.min(1000);
            for v in page {
                let id = VolumeId { node: node.name.clone(), volume: v.name.clone() };
                entries.push(pb::list_volumes_response::Entry {
                    volume: Some(pb::Volume {
                        capacity_bytes: to_i64(v.size_bytes),
                        volume_id: id.to_string(),
                        ..Default::default()
                    }),
                    status: Some(pb::list_volumes_response::VolumeStatus {
                        published_node_ids: v.allowed_hosts.clone(),
                        volume_condition: None,
                    }),
                });
                after = Some(v.name);
            }
            if entries.len() >= max {
                let token = format!("{idx}:{}", after.unwrap_or_default());
                return Ok(Response::new(pb::ListVolumesResponse { entries, next_token: token }));
            }
            if !full {
                idx += 1;
                after = None;
            }
        }
        Ok(Response::new(pb::ListVolumesResponse { entries, next_token: String::new() }))
    }

    async fn get_capacity(&self, r: Request<pb::GetCapacityRequest>) -> Reply<pb::GetCapacityResponse> {
        let r = r.into_inner();
        for c in &r.volume_capabilities {
            if check_capability(c).is_err() {
                return Ok(Response::new(pb::GetCapacityResponse::default()));
            }
        }
        let p = params(&r.parameters)?;
        let (mut total, mut largest) = (0u64, 0u64);
        for node in self.nodes.iter().filter(|n| p.storage_node.as_ref().is_none_or(|s| *s == n.name)) {
            let Ok(cap) = node.client().get_capacity(admin::GetCapacityRequest {}).await else { continue };
            let free = free_capacity(&cap.into_inner()).unwrap_or(0);
            total = total.saturating_add(free);
            largest = largest.max(free);
        }
        Ok(Response::new(pb::GetCapacityResponse {
            available_capacity: to_i64(total),
            maximum_volume_size: Some(to_i64(largest)),
            minimum_volume_size: Some(i64::from(p.block_size.unwrap_or(DEFAULT_BLOCK_SIZE))),
        }))
    }

    async fn controller_get_capabilities(
        &self,
        _: Request<pb::ControllerGetCapabilitiesRequest>,
    ) -> Reply<pb::ControllerGetCapabilitiesResponse> {
        use pb::controller_service_capability::{rpc::Type, Rpc, Type as Cap};
        let capabilities = [
            Type::CreateDeleteVolume,
            Type::PublishUnpublishVolume,
            Type::ListVolumes,
            Type::GetCapacity,
            Type::CreateDeleteSnapshot,
            Type::ListSnapshots,
            Type::CloneVolume,
            Type::ExpandVolume,
            Type::ListVolumesPublishedNodes,
            Type::GetVolume,
            Type::SingleNodeMultiWriter,
        ]
        .into_iter()
        .map(|t| pb::ControllerServiceCapability { r#type: Some(Cap::Rpc(Rpc { r#type: t as i32 })) })
        .collect();
        Ok(Response::new(pb::ControllerGetCapabilitiesResponse { capabilities }))
    }

    async fn create_snapshot(
        &self,
        r: Request<pb::CreateSnapshotRequest>,
    ) -> Reply<pb::CreateSnapshotResponse> {
        let r = r.into_inner();
        if r.source_volume_id.is_empty() {
            return Err(Status::invalid_argument("source volume id is required"));
        }
        check_csi_name(&r.name, "name")?;
        if let Some(k) = r.parameters.keys().find(|k| !k.starts_with("csi.storage.k8s.io/")) {
            return Err(Status::invalid_argument(format!("unknown snapshot parameter {k:?}")));
        }
        let name = object_name(&r.name);
        let _busy = self.lock(format!("snapshot {name}"))?;
        let source = VolumeId::parse(&r.source_volume_id)
            .ok_or_else(|| Status::not_found(format!("volume {:?} does not exist", r.source_volume_id)))?;
        if let Some((id, s)) = self.find_snapshot(&name).await? {
            if id.volume_id() != source {
                return Err(Status::already_exists(format!(
                    "snapshot {:?} exists ({id}) of another volume",
                    r.name
                )));
            }
            return Ok(Response::new(pb::CreateSnapshotResponse { snapshot: Some(csi_snapshot(&id, &s)) }));
        }
        let node = self
            .node(&source.node)
            .ok_or_else(|| Status::not_found(format!("volume {source} does not exist")))?;
        let req = admin::CreateSnapshotsRequest {
            snapshots: vec![admin::SnapshotRef { volume: source.volume.clone(), snapshot: name.clone() }],
        };
        let made = node.client().create_snapshots(req).await.map_err(|s| node.err(&s))?.into_inner();
        let s = made.snapshots.into_iter().next().ok_or_else(|| Status::internal("no snapshot made"))?;
        let id = SnapshotId { node: node.name.clone(), volume: source.volume, snapshot: name };
        tracing::info!(snapshot = %id, "snapshot created");
        Ok(Response::new(pb::CreateSnapshotResponse { snapshot: Some(csi_snapshot(&id, &s)) }))
    }

    async fn delete_snapshot(
        &self,
        r: Request<pb::DeleteSnapshotRequest>,
    ) -> Reply<pb::DeleteSnapshotResponse> {
        let r = r.into_inner();
        if r.snapshot_id.is_empty() {
            return Err(Status::invalid_argument("snapshot id is required"));
        }
        let done = || Ok(Response::new(pb::DeleteSnapshotResponse {}));
        let Some(id) = SnapshotId::parse(&r.snapshot_id) else { return done() };
        let Some(node) = self.node(&id.node) else { return done() };
        let _busy = self.lock(format!("snapshot {}", id.snapshot))?;
        let req = admin::DeleteSnapshotRequest { volume: id.volume.clone(), snapshot: id.snapshot.clone() };
        match node.client().delete_snapshot(req).await {
            Ok(_) => {
                tracing::info!(snapshot = %id, "snapshot deleted");
                done()
            }
            Err(s) if node.err(&s).code() == Code::NotFound => done(),
            Err(s) => Err(node.err(&s)),
        }
    }

    async fn list_snapshots(&self, r: Request<pb::ListSnapshotsRequest>) -> Reply<pb::ListSnapshotsResponse> {
        let r = r.into_inner();
        if r.max_entries < 0 {
            return Err(Status::invalid_argument("max_entries must not be negative"));
        }
        let entry = |id: &SnapshotId, s: &admin::Snapshot| pb::list_snapshots_response::Entry {
            snapshot: Some(csi_snapshot(id, s)),
        };
        if !r.snapshot_id.is_empty() {
            let entries = match SnapshotId::parse(&r.snapshot_id) {
                Some(id) => self.snapshot(&id).await?.map(|s| entry(&id, &s)).into_iter().collect(),
                None => Vec::new(),
            };
            return Ok(Response::new(pb::ListSnapshotsResponse { entries, next_token: String::new() }));
        }
        let max = if r.max_entries == 0 { usize::MAX } else { r.max_entries as usize };
        let (mut idx, mut after) = parse_token(&r.starting_token, self.nodes.len())?;
        let only = if r.source_volume_id.is_empty() {
            None
        } else {
            match VolumeId::parse(&r.source_volume_id) {
                Some(v) if self.node(&v.node).is_some() => Some(v),
                _ => return Ok(Response::new(pb::ListSnapshotsResponse::default())),
            }
        };
        let mut entries = Vec::new();
        while idx < self.nodes.len() {
            let node = &self.nodes[idx];
            if only.as_ref().is_some_and(|v| v.node != node.name) {
                idx += 1;
                after = None;
                continue;
            }
            let want = max.saturating_sub(entries.len()).min(1000);
            let req = admin::ListSnapshotsRequest {
                volume: only.as_ref().map(|v| v.volume.clone()),
                name: None,
                after: after.take(),
                limit: want as u64,
            };
            let page = match node.client().list_snapshots(req).await {
                Ok(p) => p.into_inner().snapshots,
                Err(s) if node.err(&s).code() == Code::NotFound => Vec::new(),
                Err(s) => return Err(node.err(&s)),
            };
            let full = page.len() >= want;
            for s in page.iter().filter(|s| s.state == "ready") {
                let id = SnapshotId {
                    node: node.name.clone(),
                    volume: s.volume.clone(),
                    snapshot: s.name.clone(),
                };
                entries.push(entry(&id, s));
            }
            if let Some(last) = page.last() {
                after = Some(format!("{}@{}", last.volume, last.name));
            }
            if entries.len() >= max {
                let token = format!("{idx}:{}", after.unwrap_or_default());
                return Ok(Response::new(pb::ListSnapshotsResponse { entries, next_token: token }));
            }
            if !full {
                idx += 1;
                after = None;
            }
        }
        Ok(Response::new(pb::ListSnapshotsResponse { entries, next_token: String::new() }))
    }

    async fn controller_expand_volume(
        &self,
        r: Request<pb::ControllerExpandVolumeRequest>,
    ) -> Reply<pb::ControllerExpandVolumeResponse> {
        let r = r.into_inner();
        if r.volume_id.is_empty() {
            return Err(Status::invalid_argument("volume id is required"));
        }
        let range = r.capacity_range.ok_or_else(|| Status::invalid_argument("capacity range is required"))?;
        let block_device = match &r.volume_capability {
            Some(c) => check_capability(c).map_err(Status::invalid_argument)? == Access::Block,
            None => false,
        };
        let id = VolumeId::parse(&r.volume_id)
            .ok_or_else(|| Status::not_found(format!("volume {:?} does not exist", r.volume_id)))?;
        let node =
            self.node(&id.node).ok_or_else(|| Status::not_found(format!("volume {id} does not exist")))?;
        let _busy = self.lock(format!("volume {}", id.volume))?;
        let v = self
            .volume(&id)
            .await?
            .and_then(|d| d.volume)
            .ok_or_else(|| Status::not_found(format!("volume {id} does not exist")))?;
        let size = size_for(Some(&range), u64::from(v.block_size), 0)?;
        let v = if size <= v.size_bytes {
            v // already that large (a retry): volumes never shrink here
        } else {
            let req = admin::ResizeVolumeRequest { name: id.volume.clone(), size_bytes: size, force: false };
            let v = node.client().resize_volume(req).await.map_err(|s| node.err(&s))?.into_inner();
            tracing::info!(volume = %id, size_bytes = size, "volume expanded");
            v
        };
        Ok(Response::new(pb::ControllerExpandVolumeResponse {
            capacity_bytes: to_i64(v.size_bytes),
            node_expansion_required: !block_device,
        }))
    }

    async fn controller_get_volume(
        &self,
        r: Request<pb::ControllerGetVolumeRequest>,
    ) -> Reply<pb::ControllerGetVolumeResponse> {
        let r = r.into_inner();
        if r.volume_id.is_empty() {
            return Err(Status::invalid_argument("volume id is required"));
        }
        let id = VolumeId::parse(&r.volume_id)
            .ok_or_else(|| Status::not_found(format!("volume {:?} does not exist", r.volume_id)))?;
        let d = self
            .volume(&id)
            .await?
            .ok_or_else(|| Status::not_found(format!("volume {id} does not exist")))?;
        let v = d.volume.unwrap_or_default();
        let abnormal = v.state != "ready";
        Ok(Response::new(pb::ControllerGetVolumeResponse {
            volume: Some(pb::Volume {
                capacity_bytes: to_i64(v.size_bytes),
                volume_id: id.to_string(),
                ..Default::default()
            }),
            status: Some(pb::controller_get_volume_response::VolumeStatus {
                published_node_ids: v.allowed_hosts,
                volume_condition: Some(pb::VolumeCondition {
                    abnormal,
                    message: if abnormal { format!("the volume is {}", v.state) } else { String::new() },
                }),
            }),
        }))
    }

    async fn controller_modify_volume(
        &self,
        _: Request<pb::ControllerModifyVolumeRequest>,
    ) -> Reply<pb::ControllerModifyVolumeResponse> {
        Err(Status::unimplemented("ControllerModifyVolume is not supported"))
    }
}

/// A paging token: `NODE_INDEX:AFTER` (empty: from the start). A token this driver did not make is
/// `ABORTED`, as the spec asks.
fn parse_token(token: &str, nodes: usize) -> Result<(usize, Option<String>), Status> {
    if token.is_empty() {
        return Ok((0, None));
    }
    let bad = || Status::aborted(format!("invalid starting token {token:?}"));
    let (i, after) = token.split_once(':').ok_or_else(bad)?;
    let i: usize = i.parse().map_err(|_| bad())?;
    if i >= nodes || after.is_empty() {
        return Err(bad());
    }
    Ok((i, Some(after.to_owned())))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn range(req: i64, lim: i64) -> pb::CapacityRange {
        pb::CapacityRange { required_bytes: req, limit_bytes: lim }
    }

    #[test]
    fn sizes_follow_the_capacity_range() {
        assert_eq!(size_for(None, 4096, 0).unwrap(), DEFAULT_SIZE_BYTES);
        assert_eq!(size_for(Some(&range(1, 0)), 4096, 0).unwrap(), 4096);
        assert_eq!(size_for(Some(&range(10 << 20, 0)), 4096, 0).unwrap(), 10 << 20);
        assert_eq!(size_for(Some(&range(0, 8192)), 4096, 0).unwrap(), 8192);
        assert_eq!(size_for(Some(&range(0, 0)), 512, 5 << 20).unwrap(), 5 << 20, "a source's size");
        assert_eq!(
            size_for(Some(&range(1 << 20, 0)), 512, 5 << 20).unwrap(),
            5 << 20,
            "at least the source's"
        );
        assert_eq!(size_for(Some(&range(5000, 6000)), 4096, 0).unwrap_err().code(), Code::OutOfRange);
        assert_eq!(size_for(Some(&range(0, 100)), 4096, 0).unwrap_err().code(), Code::OutOfRange);
        assert_eq!(size_for(Some(&range(2, 1)), 512, 0).unwrap_err().code(), Code::InvalidArgument);
        assert_eq!(size_for(Some(&range(-1, 0)), 512, 0).unwrap_err().code(), Code::InvalidArgument);
        assert_eq!(size_for(Some(&range(0, 4096)), 4096, 1 << 20).unwrap_err().code(), Code::OutOfRange);
    }

    #[test]
    fn free_capacity_prefers_the_overcommit_headroom() {
        let c = |prov: Option<u64>, avail: Option<u64>| admin::Capacity {
            provisionable_bytes: prov,
            pool_available_bytes: avail,
            ..Default::default()
        };
        assert_eq!(free_capacity(&c(Some(5), Some(100))), Some(5));
        assert_eq!(free_capacity(&c(None, Some(100))), Some(100));
        assert_eq!(free_capacity(&c(None, None)), Some(u64::MAX));
    }

    #[test]
    fn parameters_are_checked() {
        let p = |kv: &[(&str, &str)]| {
            params(&kv.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect())
        };
        assert_eq!(p(&[("blockSize", "512")]).unwrap().block_size, Some(512));
        assert_eq!(p(&[("blockSize", "1024")]).unwrap_err().code(), Code::InvalidArgument);
        assert_eq!(p(&[("colour", "blue")]).unwrap_err().code(), Code::InvalidArgument);
        assert!(p(&[("csi.storage.k8s.io/pvc/name", "data")]).is_ok());
        assert_eq!(
            p(&[("compression", "lz4"), ("storageNode", "a")]).unwrap().storage_node.as_deref(),
            Some("a")
        );
    }

    #[test]
    fn paging_tokens() {
        assert_eq!(parse_token("", 2).unwrap(), (0, None));
        assert_eq!(parse_token("1:pvc-a", 2).unwrap(), (1, Some("pvc-a".into())));
        for bad in ["x", "2:a", "0:", "-1:a", "a:b"] {
            assert_eq!(parse_token(bad, 2).unwrap_err().code(), Code::Aborted, "{bad}");
        }
    }
}
