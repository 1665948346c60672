//! The admin API on the network: the gRPC service `xatastor.admin.v1.Admin`
//! (`proto/xatastor/admin/v1/admin.proto`) over the same handler as the local socket
//! ([`xatastor_core::admin::handle`]), and a client for it.
//!
//! ```text
//!   CSI controller, tools ──TLS (client certificate) and/or bearer token──▶ --admin-listen ADDR
//!        │  CreateVolume{name, size_bytes, …}                                   │ check_auth
//!        ▼                                                                      ▼
//!   AdminClient ◀── Volume / Status{NOT_FOUND, ALREADY_EXISTS, …} ◀── admin::handle(node, …)
//! ```
//!
//! Off unless `serve --admin-listen` is given, and never without authentication: TLS with a
//! client CA (only clients with a certificate it signed get through), a bearer token read from a
//! file only its owner may read (mode 0600), or both. A call without valid credentials ends with
//! `UNAUTHENTICATED` before it reaches the node.
//!
//! DH-HMAC-CHAP secrets travel in `AllowHostRequest` and `GenerateHostSecretResponse`; their
//! `Debug` (written here, not generated) prints `<redacted>` instead. Send them only over TLS.

use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use tonic::metadata::MetadataValue;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity, ServerTlsConfig};
use tonic::{Code, Status};
use xatastor_core::admin::{
    self, AdminError, CapacityView, Endpoint, ErrorKind, Request, Response, SecretText, SnapshotView,
    StatusView, VolumeDetail, VolumeView,
};
use xatastor_core::Node;

/// The generated messages, server and client of `xatastor.admin.v1`.
#[allow(missing_docs, unreachable_pub, clippy::all, clippy::pedantic, rustdoc::all)]
pub mod pb {
    include!("generated/xatastor.admin.v1.rs");
}

// The messages that carry DH-HMAC-CHAP secrets are generated without `Debug`: theirs leaves the
// secrets out (a request or response printed in a log line shows no secret).

impl std::fmt::Debug for pb::AllowHostRequest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AllowHostRequest")
            .field("name", &self.name)
            .field("host", &self.host)
            .field("dhchap_secret", &self.dhchap_secret.as_ref().map(|_| "<redacted>"))
            .field("dhchap_ctrl_secret", &self.dhchap_ctrl_secret.as_ref().map(|_| "<redacted>"))
            .finish()
    }
}

impl std::fmt::Debug for pb::GenerateHostSecretResponse {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GenerateHostSecretResponse")
            .field("host", &self.host)
            .field("dhchap_secret", &"<redacted>")
            .field("dhchap_ctrl_secret", &self.dhchap_ctrl_secret.as_ref().map(|_| "<redacted>"))
            .field("volume", &self.volume)
            .field("connect", &self.connect)
            .finish()
    }
}

/// The response metadata key that carries the error kind of the socket protocol.
pub const ERROR_KIND_KEY: &str = "xatastor-error-kind";

/// How long calls in flight may take to finish when the service stops.
const SHUTDOWN_GRACE: std::time::Duration = std::time::Duration::from_secs(2);

/// Shortest bearer token accepted (a token is a password: make it long and random).
pub const MIN_TOKEN_LEN: usize = 16;

/// Where the server's TLS files are (PEM).
#[derive(Clone, Debug)]
pub struct ServerTls {
    /// The server's certificate chain.
    pub cert: PathBuf,
    /// Its private key.
    pub key: PathBuf,
    /// The CA that signs the clients' certificates (clients without one are refused).
    pub client_ca: PathBuf,
}

/// How the admin service is served.
#[derive(Clone, Debug)]
pub struct AdminServerConfig {
    /// The address to listen on.
    pub listen: SocketAddr,
    /// A file holding the bearer token (mode 0600: only its owner may read it).
    pub token_file: Option<PathBuf>,
    /// TLS with client certificates.
    pub tls: Option<ServerTls>,
}

/// Reads a bearer token from `path`: refuses a file that others may read (or write), and a token
/// shorter than [`MIN_TOKEN_LEN`].
pub fn read_token_file(path: &Path) -> Result<String, String> {
    let meta = std::fs::metadata(path).map_err(|e| format!("token file {}: {e}", path.display()))?;
    let mode = meta.permissions().mode();
    if mode & 0o077 != 0 {
        return Err(format!(
            "token file {} has mode {:o}: only its owner may read it (chmod 600)",
            path.display(),
            mode & 0o777
        ));
    }
    let text = std::fs::read_to_string(path).map_err(|e| format!("token file {}: {e}", path.display()))?;
    let token = text.trim().to_owned();
    if token.len() < MIN_TOKEN_LEN || token.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(format!(
            "token file {}: the token must be one word of at least {MIN_TOKEN_LEN} characters",
            path.display()
        ));
    }
    Ok(token)
}

fn read(path: &Path, what: &str) -> Result<Vec<u8>, String> {
    std::fs::read(path).map_err(|e| format!("{what} {}: {e}", path.display()))
}

/// Compares without stopping at the first difference (the time taken says nothing about where the
/// token differs).
fn same_secret(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Checks the bearer token of a call (when one is configured).
#[derive(Clone)]
struct TokenCheck(Option<Arc<str>>);

impl tonic::service::Interceptor for TokenCheck {
    fn call(&mut self, req: tonic::Request<()>) -> Result<tonic::Request<()>, Status> {
        let Some(token) = &self.0 else { return Ok(req) };
        let given = req.metadata().get("authorization").and_then(|v| v.to_str().ok());
        match given.and_then(|v| v.strip_prefix("Bearer ")) {
            Some(t) if same_secret(t.as_bytes(), token.as_bytes()) => Ok(req),
            Some(_) => Err(Status::unauthenticated("wrong bearer token")),
            None => {
                Err(Status::unauthenticated("a bearer token is required (authorization: Bearer <token>)"))
            }
        }
    }
}

/// The gRPC code for an error kind.
#[must_use]
pub fn code_of(kind: ErrorKind) -> Code {
    match kind {
        ErrorKind::NotFound => Code::NotFound,
        ErrorKind::Exists => Code::AlreadyExists,
        ErrorKind::Busy | ErrorKind::HasDependents | ErrorKind::BackendMismatch => Code::FailedPrecondition,
        ErrorKind::Invalid => Code::InvalidArgument,
        ErrorKind::Unsupported => Code::Unimplemented,
        ErrorKind::NoSpace => Code::ResourceExhausted,
        ErrorKind::NotReady => Code::Unavailable,
        _ => Code::Internal,
    }
}

/// The status an admin error is answered with (its kind also in [`ERROR_KIND_KEY`]).
#[must_use]
pub fn status_of(e: &AdminError) -> Status {
    let mut s = Status::new(code_of(e.kind), e.message.clone());
    s.metadata_mut().insert(ERROR_KIND_KEY, MetadataValue::from_static(e.kind.as_str()));
    s
}

/// The admin error a status stands for (the kind from [`ERROR_KIND_KEY`], else from the code).
#[must_use]
pub fn error_of(s: &Status) -> AdminError {
    let kind = s
        .metadata()
        .get(ERROR_KIND_KEY)
        .and_then(|v| v.to_str().ok())
        .and_then(ErrorKind::from_wire)
        .unwrap_or(match s.code() {
            Code::NotFound => ErrorKind::NotFound,
            Code::AlreadyExists => ErrorKind::Exists,
            Code::FailedPrecondition => ErrorKind::Busy,
            Code::InvalidArgument => ErrorKind::Invalid,
            Code::Unimplemented => ErrorKind::Unsupported,
            Code::ResourceExhausted => ErrorKind::NoSpace,
            Code::Unavailable => ErrorKind::NotReady,
            _ => ErrorKind::Internal,
        });
    AdminError::new(kind, s.message().to_owned())
}

// ---- conversions ----

impl From<VolumeView> for pb::Volume {
    fn from(v: VolumeView) -> Self {
        let (origin_volume, origin_snapshot) = match v.origin.as_deref().and_then(|o| o.split_once('@')) {
            Some((vol, snap)) => (Some(vol.to_owned()), Some(snap.to_owned())),
            None => (None, None),
        };
        Self {
            name: v.name,
            size_bytes: v.size_bytes,
            block_size: v.block_size,
            compression: v.compression,
            origin_volume,
            origin_snapshot,
            nqn: v.nqn,
            nguid: v.nguid,
            uuid: v.uuid,
            serial: v.serial,
            allow_any_host: v.allow_any_host,
            allowed_hosts: v.allowed_hosts,
            state: v.state,
            created_unix_s: v.created_unix_s,
            connect: v.connect,
            require_auth: v.require_auth,
            dhchap_hosts: v.dhchap_hosts,
        }
    }
}

impl From<VolumeDetail> for pb::VolumeDetail {
    fn from(d: VolumeDetail) -> Self {
        Self {
            volume: Some(d.volume.into()),
            active: d.active,
            controllers: u32::try_from(d.controllers).unwrap_or(u32::MAX),
            snapshots: d.snapshots,
            used_bytes: d.used_bytes,
            referenced_bytes: d.referenced_bytes,
            logical_used_bytes: d.logical_used_bytes,
            compress_ratio: d.compress_ratio,
            free_bytes: d.free_bytes,
            pool_share: d.pool_share,
            auth_hosts: d
                .auth_hosts
                .into_iter()
                .map(|h| pb::HostAuth { host: h.host, bidirectional: h.bidirectional })
                .collect(),
            connect_lines: d.connect_lines,
        }
    }
}

impl From<SnapshotView> for pb::Snapshot {
    fn from(s: SnapshotView) -> Self {
        Self {
            volume: s.volume,
            name: s.name,
            size_bytes: s.size_bytes,
            state: s.state,
            created_unix_s: s.created_unix_s,
        }
    }
}

impl From<CapacityView> for pb::Capacity {
    fn from(c: CapacityView) -> Self {
        Self {
            provisioned_bytes: c.provisioned_bytes,
            pool_bytes: c.pool_bytes,
            pool_used_bytes: c.pool_used_bytes,
            pool_available_bytes: c.pool_available_bytes,
            overcommit: c.overcommit,
            overcommit_limit: c.overcommit_limit,
            provisionable_bytes: c.provisionable_bytes,
        }
    }
}

impl From<StatusView> for pb::Status {
    fn from(s: StatusView) -> Self {
        Self {
            volumes_total: s.volumes_total,
            volumes_active: s.volumes_active as u64,
            controllers: s.controllers as u64,
            nqn_prefix: s.nqn_prefix,
            listen: s.listen,
            advertise: s.advertise,
            backend: s.backend,
            catalog_bytes: s.catalog_bytes,
            capacity: Some(s.capacity.into()),
        }
    }
}

fn block_size_or_default(b: u32) -> u32 {
    if b == 0 {
        512
    } else {
        b
    }
}

fn limit(l: u64) -> usize {
    usize::try_from(l).unwrap_or(usize::MAX)
}

// ---- the service ----

/// The `Admin` service of one node.
#[derive(Clone)]
pub struct AdminService {
    node: Node,
    ep: Endpoint,
}

impl AdminService {
    /// The service for `node`, whose responses name the NVMe/TCP endpoint `ep`.
    #[must_use]
    pub fn new(node: Node, ep: Endpoint) -> Self {
        Self { node, ep }
    }

    /// Runs `req` on a blocking thread (node calls fsync the catalog and talk to the backend) and
    /// picks the expected result out of the response.
    async fn run<T>(
        &self,
        req: Request,
        pick: impl FnOnce(Response) -> Option<T>,
    ) -> Result<tonic::Response<T>, Status> {
        let (node, ep) = (self.node.clone(), self.ep.clone());
        let op = req.op();
        tracing::debug!(op, request = ?req, "admin request (gRPC)");
        let result = tokio::task::spawn_blocking(move || admin::handle(&node, &ep, req))
            .await
            .map_err(|e| Status::internal(format!("the request's thread failed: {e}")))?;
        match result {
            Ok(r) => pick(r)
                .map(tonic::Response::new)
                .ok_or_else(|| Status::internal(format!("{op}: unexpected result"))),
            Err(e) => {
                if e.kind == ErrorKind::Internal {
                    tracing::warn!(op, error = %e, "admin request failed");
                } else {
                    tracing::debug!(op, kind = e.kind.as_str(), error = %e, "admin request refused");
                }
                Err(status_of(&e))
            }
        }
    }
}

fn volume(r: Response) -> Option<pb::Volume> {
    match r {
        Response::Volume(v) => Some(v.into()),
        _ => None,
    }
}

fn snapshots(r: Response) -> Option<pb::SnapshotList> {
    match r {
        Response::Snapshots(s) => {
            Some(pb::SnapshotList { snapshots: s.into_iter().map(Into::into).collect() })
        }
        _ => None,
    }
}

type Reply<T> = Result<tonic::Response<T>, Status>;

#[tonic::async_trait]
impl pb::admin_server::Admin for AdminService {
    async fn create_volume(&self, r: tonic::Request<pb::CreateVolumeRequest>) -> Reply<pb::Volume> {
        let r = r.into_inner();
        let req = Request::VolumeCreate {
            name: r.name,
            size_bytes: r.size_bytes,
            block_size: block_size_or_default(r.block_size),
            compression: r.compression,
            allowed_hosts: r.allowed_hosts,
            allow_any_host: r.allow_any_host,
            require_auth: r.require_auth,
        };
        self.run(req, volume).await
    }

    async fn create_volume_batch(
        &self,
        r: tonic::Request<pb::CreateVolumeBatchRequest>,
    ) -> Reply<pb::CreateVolumeBatchResponse> {
        let r = r.into_inner();
        let req = Request::VolumeCreateBatch {
            prefix: r.prefix,
            start: r.start,
            count: r.count,
            size_bytes: r.size_bytes,
            block_size: block_size_or_default(r.block_size),
            allowed_hosts: r.allowed_hosts,
            require_auth: r.require_auth,
        };
        self.run(req, |r| match r {
            Response::Created { created } => Some(pb::CreateVolumeBatchResponse { created: created as u64 }),
            _ => None,
        })
        .await
    }

    async fn list_volumes(
        &self,
        r: tonic::Request<pb::ListVolumesRequest>,
    ) -> Reply<pb::ListVolumesResponse> {
        let r = r.into_inner();
        let req = Request::VolumeList { prefix: r.prefix, after: r.after, limit: limit(r.limit) };
        self.run(req, |r| match r {
            Response::Volumes(v) => {
                Some(pb::ListVolumesResponse { volumes: v.into_iter().map(Into::into).collect() })
            }
            _ => None,
        })
        .await
    }

    async fn get_volume(&self, r: tonic::Request<pb::GetVolumeRequest>) -> Reply<pb::VolumeDetail> {
        self.run(Request::VolumeShow { name: r.into_inner().name }, |r| match r {
            Response::VolumeDetail(d) => Some((*d).into()),
            _ => None,
        })
        .await
    }

    async fn resize_volume(&self, r: tonic::Request<pb::ResizeVolumeRequest>) -> Reply<pb::Volume> {
        let r = r.into_inner();
        self.run(Request::VolumeResize { name: r.name, size_bytes: r.size_bytes, force: r.force }, volume)
            .await
    }

    async fn delete_volume(
        &self,
        r: tonic::Request<pb::DeleteVolumeRequest>,
    ) -> Reply<pb::DeleteVolumeResponse> {
        let r = r.into_inner();
        self.run(Request::VolumeDelete { name: r.name, force: r.force }, |r| match r {
            Response::Deleted { .. } => Some(pb::DeleteVolumeResponse {}),
            _ => None,
        })
        .await
    }

    async fn clone_volume(&self, r: tonic::Request<pb::CloneVolumeRequest>) -> Reply<pb::Volume> {
        let r = r.into_inner();
        let req = Request::VolumeClone {
            volume: r.volume,
            snapshot: r.snapshot,
            name: r.name,
            size_bytes: r.size_bytes,
            allowed_hosts: r.allowed_hosts,
            require_auth: r.require_auth,
        };
        self.run(req, volume).await
    }

    async fn allow_host(&self, r: tonic::Request<pb::AllowHostRequest>) -> Reply<pb::Volume> {
        let r = r.into_inner();
        let req = Request::VolumeAllowHost {
            name: r.name,
            host: r.host,
            dhchap_secret: r.dhchap_secret.map(SecretText::new),
            dhchap_ctrl_secret: r.dhchap_ctrl_secret.map(SecretText::new),
        };
        self.run(req, volume).await
    }

    async fn generate_host_secret(
        &self,
        r: tonic::Request<pb::GenerateHostSecretRequest>,
    ) -> Reply<pb::GenerateHostSecretResponse> {
        let r = r.into_inner();
        let req = Request::VolumeGenerateHostSecret {
            name: r.name,
            host: r.host,
            // Out of range stays out of range (refused as invalid), never wraps to a valid value.
            hmac: u8::try_from(r.hmac).unwrap_or(u8::MAX),
            key_length_bytes: if r.key_length_bytes == 0 { 32 } else { limit(u64::from(r.key_length_bytes)) },
            bidirectional: r.bidirectional,
        };
        self.run(req, |r| match r {
            Response::GeneratedSecrets(g) => {
                let g = *g;
                Some(pb::GenerateHostSecretResponse {
                    host: g.host,
                    dhchap_secret: g.dhchap_secret.expose().to_owned(),
                    dhchap_ctrl_secret: g.dhchap_ctrl_secret.map(|c| c.expose().to_owned()),
                    volume: Some(g.volume.into()),
                    connect: g.connect,
                })
            }
            _ => None,
        })
        .await
    }

    async fn remove_host_secret(&self, r: tonic::Request<pb::RemoveHostSecretRequest>) -> Reply<pb::Volume> {
        let r = r.into_inner();
        self.run(Request::VolumeRemoveHostSecret { name: r.name, host: r.host }, volume).await
    }

    async fn set_require_auth(&self, r: tonic::Request<pb::SetRequireAuthRequest>) -> Reply<pb::Volume> {
        let r = r.into_inner();
        let req = Request::VolumeSetRequireAuth {
            name: r.name,
            require_auth: r.require_auth,
            disconnect: r.disconnect,
        };
        self.run(req, volume).await
    }

    async fn deny_host(&self, r: tonic::Request<pb::DenyHostRequest>) -> Reply<pb::Volume> {
        let r = r.into_inner();
        self.run(Request::VolumeDenyHost { name: r.name, host: r.host, disconnect: r.disconnect }, volume)
            .await
    }

    async fn set_any_host(&self, r: tonic::Request<pb::SetAnyHostRequest>) -> Reply<pb::Volume> {
        let r = r.into_inner();
        let req = Request::VolumeSetAnyHost {
            name: r.name,
            allow_any_host: r.allow_any_host,
            disconnect: r.disconnect,
        };
        self.run(req, volume).await
    }

    async fn create_snapshots(
        &self,
        r: tonic::Request<pb::CreateSnapshotsRequest>,
    ) -> Reply<pb::SnapshotList> {
        let snapshots_asked = r.into_inner().snapshots.into_iter().map(|s| (s.volume, s.snapshot)).collect();
        self.run(Request::SnapshotCreate { snapshots: snapshots_asked }, snapshots).await
    }

    async fn list_snapshots(&self, r: tonic::Request<pb::ListSnapshotsRequest>) -> Reply<pb::SnapshotList> {
        let r = r.into_inner();
        let req =
            Request::SnapshotList { volume: r.volume, name: r.name, after: r.after, limit: limit(r.limit) };
        self.run(req, snapshots).await
    }

    async fn delete_snapshot(
        &self,
        r: tonic::Request<pb::DeleteSnapshotRequest>,
    ) -> Reply<pb::DeleteSnapshotResponse> {
        let r = r.into_inner();
        self.run(Request::SnapshotDelete { volume: r.volume, snapshot: r.snapshot }, |r| match r {
            Response::Deleted { .. } => Some(pb::DeleteSnapshotResponse {}),
            _ => None,
        })
        .await
    }

    async fn get_status(&self, _: tonic::Request<pb::GetStatusRequest>) -> Reply<pb::Status> {
        self.run(Request::Status, |r| match r {
            Response::Status(s) => Some((*s).into()),
            _ => None,
        })
        .await
    }

    async fn get_capacity(&self, _: tonic::Request<pb::GetCapacityRequest>) -> Reply<pb::Capacity> {
        self.run(Request::Capacity, |r| match r {
            Response::Capacity(c) => Some(c.into()),
            _ => None,
        })
        .await
    }

    async fn adopt(&self, _: tonic::Request<pb::AdoptRequest>) -> Reply<pb::AdoptResponse> {
        self.run(Request::Adopt, |r| match r {
            Response::Adopted { adopted } => Some(pb::AdoptResponse { adopted }),
            _ => None,
        })
        .await
    }
}

/// The running admin service; stops when dropped.
#[derive(Debug)]
pub struct AdminServer {
    addr: SocketAddr,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl AdminServer {
    /// The address it listens on.
    #[must_use]
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }
}

impl Drop for AdminServer {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Starts the admin service for `node` on `config.listen`, on a thread of its own (its own small
/// tokio runtime). Fails unless at least one way of authenticating is configured, and on unreadable
/// or unsafe credentials.
pub fn serve(config: &AdminServerConfig, node: Node, ep: Endpoint) -> Result<AdminServer, String> {
    let token = config.token_file.as_deref().map(read_token_file).transpose()?;
    let tls = match &config.tls {
        Some(t) => {
            let identity = Identity::from_pem(read(&t.cert, "TLS certificate")?, read(&t.key, "TLS key")?);
            let ca = Certificate::from_pem(read(&t.client_ca, "client CA")?);
            Some(ServerTlsConfig::new().identity(identity).client_ca_root(ca))
        }
        None => None,
    };
    if token.is_none() && tls.is_none() {
        return Err(
            "the network admin API needs authentication: a token file (--admin-token-file) and/or TLS \
                    with client certificates (--admin-tls-cert, --admin-tls-key, --admin-tls-client-ca)"
                .into(),
        );
    }
    let listener = std::net::TcpListener::bind(config.listen)
        .map_err(|e| format!("admin API on {}: {e}", config.listen))?;
    let addr = listener.local_addr().map_err(|e| e.to_string())?;
    listener.set_nonblocking(true).map_err(|e| e.to_string())?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("xatastor-admin-grpc")
        .enable_all()
        .build()
        .map_err(|e| format!("admin API runtime: {e}"))?;
    let mut builder = tonic::transport::Server::builder();
    if let Some(tls) = tls {
        builder = builder.tls_config(tls).map_err(|e| format!("admin API TLS: {e}"))?;
    }
    let service = pb::admin_server::AdminServer::with_interceptor(
        AdminService::new(node, ep),
        TokenCheck(token.map(Arc::from)),
    );
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let listener = {
        let _guard = rt.enter();
        tokio::net::TcpListener::from_std(listener).map_err(|e| e.to_string())?
    };
    let thread = std::thread::Builder::new()
        .name("xatastor-admin-grpc".into())
        .spawn(move || {
            rt.block_on(async move {
                let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener);
                let (drain, draining) = tokio::sync::oneshot::channel::<()>();
                let server = builder
                    .concurrency_limit_per_connection(64)
                    .add_service(service)
                    .serve_with_incoming_shutdown(incoming, async {
                        let _ = draining.await;
                    });
                tokio::pin!(server);
                tokio::select! {
                    r = &mut server => {
                        if let Err(e) = r {
                            tracing::error!(error = %e, "admin API stopped");
                        }
                    }
                    _ = stopped => {
                        // Calls in flight get a moment to finish; idle client connections do not
                        // hold the shutdown up.
                        let _ = drain.send(());
                        let _ = tokio::time::timeout(SHUTDOWN_GRACE, server).await;
                    }
                }
            });
            rt.shutdown_timeout(std::time::Duration::from_millis(100));
        })
        .map_err(|e| e.to_string())?;
    Ok(AdminServer { addr, stop: Some(stop), thread: Some(thread) })
}

// ---- the client ----

/// How a client proves who it is.
#[derive(Clone, Debug, Default)]
pub struct ClientAuth {
    /// The bearer token.
    pub token: Option<String>,
    /// TLS: the CA that signed the server's certificate (PEM).
    pub server_ca: Option<Vec<u8>>,
    /// TLS: the client's certificate and key (PEM).
    pub identity: Option<(Vec<u8>, Vec<u8>)>,
    /// TLS: the name the server's certificate must carry (default: the host of the endpoint).
    pub domain: Option<String>,
}

impl ClientAuth {
    /// Reads the files of a client's credentials (any may be absent).
    pub fn from_files(
        token_file: Option<&Path>,
        server_ca: Option<&Path>,
        cert: Option<&Path>,
        key: Option<&Path>,
    ) -> Result<Self, String> {
        let identity = match (cert, key) {
            (Some(c), Some(k)) => Some((read(c, "TLS certificate")?, read(k, "TLS key")?)),
            (None, None) => None,
            _ => return Err("a client certificate needs its key, and a key its certificate".into()),
        };
        Ok(Self {
            token: token_file.map(read_token_file).transpose()?,
            server_ca: server_ca.map(|p| read(p, "server CA")).transpose()?,
            identity,
            domain: None,
        })
    }
}

/// Adds the bearer token to every call.
#[derive(Clone)]
pub struct AddToken(Option<MetadataValue<tonic::metadata::Ascii>>);

impl tonic::service::Interceptor for AddToken {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, Status> {
        if let Some(v) = &self.0 {
            req.metadata_mut().insert("authorization", v.clone());
        }
        Ok(req)
    }
}

/// A client of a node's admin service.
pub type AdminClient =
    pb::admin_client::AdminClient<tonic::service::interceptor::InterceptedService<Channel, AddToken>>;

/// Connects to the admin service at `endpoint` (`http://host:port`, or `https://…` with TLS). The
/// connection is made lazily, on the first call (so a node that is down only fails its calls).
pub fn connect(endpoint: &str, auth: &ClientAuth) -> Result<AdminClient, String> {
    let mut ep =
        Channel::from_shared(endpoint.to_owned()).map_err(|e| format!("admin endpoint {endpoint:?}: {e}"))?;
    ep = ep.connect_timeout(std::time::Duration::from_secs(5)).tcp_nodelay(true);
    if auth.server_ca.is_some() || auth.identity.is_some() {
        let mut tls = ClientTlsConfig::new();
        if let Some(ca) = &auth.server_ca {
            tls = tls.ca_certificate(Certificate::from_pem(ca));
        }
        if let Some((cert, key)) = &auth.identity {
            tls = tls.identity(Identity::from_pem(cert, key));
        }
        if let Some(d) = &auth.domain {
            tls = tls.domain_name(d.clone());
        }
        ep = ep.tls_config(tls).map_err(|e| format!("admin endpoint {endpoint:?} TLS: {e}"))?;
    }
    let token = match &auth.token {
        Some(t) => Some(
            MetadataValue::try_from(format!("Bearer {t}"))
                .map_err(|_| "the token is not valid ASCII".to_owned())?,
        ),
        None => None,
    };
    Ok(pb::admin_client::AdminClient::with_interceptor(ep.connect_lazy(), AddToken(token)))
}
