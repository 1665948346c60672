//! The network admin API: authentication (bearer token, TLS client certificates) refuses every call
//! without valid credentials; calls map to the node's operations with the documented gRPC codes.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use nvmeof_target::{Target, TargetConfig};
use rcgen::{BasicConstraints, CertificateParams, ExtendedKeyUsagePurpose, IsCa, KeyPair};
use tonic::Code;
use xatastor_core::admin::{Endpoint, ErrorKind};
use xatastor_core::provisioners::MemoryProvisioner;
use xatastor_core::{Node, NodeConfig};
use xatastor_examples::grpc::{self, pb, AdminServerConfig, ClientAuth, ServerTls};

const TOKEN: &str = "s3cret-token-0123456789abcdef";

fn node(dir: &Path) -> (Node, Endpoint) {
    let target = Target::new(TargetConfig::default());
    let node =
        Node::open(NodeConfig::new(dir.join("catalog.redb")), Arc::new(MemoryProvisioner::new()), target)
            .unwrap();
    (node, Endpoint::new("127.0.0.1:4420".parse().unwrap(), "memory"))
}

fn write(dir: &Path, name: &str, text: &str, mode: u32) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)).unwrap();
    p
}

fn token_server(dir: &Path) -> (grpc::AdminServer, Node) {
    let (node, ep) = node(dir);
    let token_file = write(dir, "token", &format!("{TOKEN}\n"), 0o600);
    let config =
        AdminServerConfig { listen: "127.0.0.1:0".parse().unwrap(), token_file: Some(token_file), tls: None };
    (grpc::serve(&config, node.clone(), ep).unwrap(), node)
}

fn client(server: &grpc::AdminServer, token: Option<&str>) -> grpc::AdminClient {
    let auth = ClientAuth { token: token.map(str::to_owned), ..ClientAuth::default() };
    grpc::connect(&format!("http://{}", server.local_addr()), &auth).unwrap()
}

fn create(name: &str, size_bytes: u64) -> pb::CreateVolumeRequest {
    pb::CreateVolumeRequest { name: name.into(), size_bytes, ..Default::default() }
}

#[tokio::test]
async fn calls_without_the_right_token_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let (server, node) = token_server(dir.path());
    for token in [None, Some("wrong-token-0123456789abcdef"), Some("")] {
        let mut c = client(&server, token);
        let err = c.create_volume(create("v1", 1 << 20)).await.unwrap_err();
        assert_eq!(err.code(), Code::Unauthenticated, "{token:?}: {err:?}");
        let err = c.get_status(pb::GetStatusRequest {}).await.unwrap_err();
        assert_eq!(err.code(), Code::Unauthenticated, "{token:?}: {err:?}");
    }
    // Nothing reached the node.
    assert_eq!(node.stats().unwrap().volumes_total, 0);
    let mut c = client(&server, Some(TOKEN));
    assert_eq!(c.create_volume(create("v1", 1 << 20)).await.unwrap().into_inner().name, "v1");
    assert_eq!(node.stats().unwrap().volumes_total, 1);
}

#[tokio::test]
async fn operations_idempotency_and_error_codes() {
    let dir = tempfile::tempdir().unwrap();
    let (server, _node) = token_server(dir.path());
    let mut c = client(&server, Some(TOKEN));
    let host = "nqn.2014-08.org.nvmexpress:uuid:00000000-0000-4000-8000-000000000001";

    let mut req = create("pg", 64 << 20);
    req.allowed_hosts.push(host.into());
    let v = c.create_volume(req.clone()).await.unwrap().into_inner();
    assert_eq!((v.size_bytes, v.block_size, v.state.as_str()), (64 << 20, 512, "ready"));
    assert!(v.connect.contains(&v.nqn), "{}", v.connect);
    // Same parameters: the same volume again.
    let again = c.create_volume(req.clone()).await.unwrap().into_inner();
    assert_eq!((again.nqn, again.uuid), (v.nqn.clone(), v.uuid.clone()));
    // Different parameters: ALREADY_EXISTS, kind `exists`.
    let err = c.create_volume(create("pg", 128 << 20)).await.unwrap_err();
    assert_eq!(err.code(), Code::AlreadyExists, "{err:?}");
    assert_eq!(grpc::error_of(&err).kind, ErrorKind::Exists);
    assert!(err.message().contains("size"), "{}", err.message());

    // Bad requests: clear messages and INVALID_ARGUMENT.
    for (bad, expect) in [
        (pb::CreateVolumeRequest { block_size: 1000, ..create("b1", 1 << 20) }, "block size"),
        (create("b2", 1000), "multiple of the block size"),
        (create("bad/name", 1 << 20), "'/'"),
        (pb::CreateVolumeRequest { allowed_hosts: vec!["host".into()], ..create("b3", 1 << 20) }, "host NQN"),
    ] {
        let err = c.create_volume(bad).await.unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
        assert!(err.message().contains(expect), "{expect}: {}", err.message());
    }
    let err = c.get_volume(pb::GetVolumeRequest { name: "nope".into() }).await.unwrap_err();
    assert_eq!((err.code(), err.message()), (Code::NotFound, "volume nope does not exist"));

    // Snapshots: idempotent too; a clone; dependents block the delete.
    let snap = pb::CreateSnapshotsRequest {
        snapshots: vec![pb::SnapshotRef { volume: "pg".into(), snapshot: "s1".into() }],
    };
    let s = c.create_snapshots(snap.clone()).await.unwrap().into_inner().snapshots;
    assert_eq!((s.len(), s[0].name.as_str(), s[0].size_bytes), (1, "s1", 64 << 20));
    let s2 = c.create_snapshots(snap).await.unwrap().into_inner().snapshots;
    assert_eq!(s2, s);
    let clone_req = pb::CloneVolumeRequest {
        volume: "pg".into(),
        snapshot: "s1".into(),
        name: "branch".into(),
        size_bytes: 0,
        allowed_hosts: vec![host.into()],
        require_auth: false,
    };
    let b = c.clone_volume(clone_req.clone()).await.unwrap().into_inner();
    assert_eq!((b.origin_volume.as_deref(), b.origin_snapshot.as_deref()), (Some("pg"), Some("s1")));
    assert_eq!(c.clone_volume(clone_req.clone()).await.unwrap().into_inner().nqn, b.nqn);
    let err =
        c.clone_volume(pb::CloneVolumeRequest { size_bytes: 128 << 20, ..clone_req }).await.unwrap_err();
    assert_eq!(err.code(), Code::AlreadyExists, "{err:?}");
    let err = c
        .delete_snapshot(pb::DeleteSnapshotRequest { volume: "pg".into(), snapshot: "s1".into() })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert_eq!(grpc::error_of(&err).kind, ErrorKind::HasDependents);
    let all = c
        .list_snapshots(pb::ListSnapshotsRequest {
            volume: None,
            name: Some("s1".into()),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(all.snapshots.len(), 1);

    // Hosts, resize, listing, capacity and status.
    let d = c
        .deny_host(pb::DenyHostRequest { name: "pg".into(), host: host.into(), disconnect: true })
        .await
        .unwrap()
        .into_inner();
    assert!(d.allowed_hosts.is_empty());
    let err = c
        .deny_host(pb::DenyHostRequest { name: "pg".into(), host: host.into(), disconnect: true })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    let r = c
        .resize_volume(pb::ResizeVolumeRequest { name: "pg".into(), size_bytes: 128 << 20, force: false })
        .await
        .unwrap();
    assert_eq!(r.into_inner().size_bytes, 128 << 20);
    let list = c.list_volumes(pb::ListVolumesRequest::default()).await.unwrap().into_inner();
    assert_eq!(list.volumes.iter().map(|v| v.name.as_str()).collect::<Vec<_>>(), ["branch", "pg"]);
    let cap = c.get_capacity(pb::GetCapacityRequest {}).await.unwrap().into_inner();
    assert_eq!(cap.provisioned_bytes, (128 << 20) + (64 << 20));
    assert!(cap.pool_bytes.is_some());
    let st = c.get_status(pb::GetStatusRequest {}).await.unwrap().into_inner();
    assert_eq!((st.volumes_total, st.backend.as_str()), (2, "memory"));
    let detail = c.get_volume(pb::GetVolumeRequest { name: "pg".into() }).await.unwrap().into_inner();
    assert_eq!(detail.snapshots, ["s1"]);

    // Deletes.
    c.delete_volume(pb::DeleteVolumeRequest { name: "branch".into(), force: false }).await.unwrap();
    let err =
        c.delete_volume(pb::DeleteVolumeRequest { name: "branch".into(), force: false }).await.unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
}

#[test]
fn the_server_refuses_to_start_without_safe_authentication() {
    let dir = tempfile::tempdir().unwrap();
    let (node, ep) = node(dir.path());
    let listen = "127.0.0.1:0".parse().unwrap();
    let err =
        grpc::serve(&AdminServerConfig { listen, token_file: None, tls: None }, node.clone(), ep.clone())
            .unwrap_err();
    assert!(err.contains("needs authentication"), "{err}");
    for (name, text, mode, expect) in [
        ("world", TOKEN, 0o644, "chmod 600"),
        ("group", TOKEN, 0o640, "chmod 600"),
        ("short", "abc", 0o600, "at least 16"),
        ("two", "aaaaaaaaaaaaaaaa bbbbbbbbbbbbbbbbb", 0o600, "one word"),
    ] {
        let token_file = Some(write(dir.path(), name, text, mode));
        let err = grpc::serve(&AdminServerConfig { listen, token_file, tls: None }, node.clone(), ep.clone())
            .unwrap_err();
        assert!(err.contains(expect), "{name}: {err}");
    }
}

struct Pki {
    cert_pem: String,
    key_pem: String,
}

/// A self-signed CA.
fn ca() -> (rcgen::Certificate, KeyPair) {
    let key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    (params.self_signed(&key).unwrap(), key)
}

/// A certificate for `localhost` / 127.0.0.1, for `purpose`, signed by the CA.
fn leaf(ca: &(rcgen::Certificate, KeyPair), purpose: ExtendedKeyUsagePurpose) -> Pki {
    let key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::new(vec!["localhost".into(), "127.0.0.1".into()]).unwrap();
    params.extended_key_usages = vec![purpose];
    let cert = params.signed_by(&key, &ca.0, &ca.1).unwrap();
    Pki { cert_pem: cert.pem(), key_pem: key.serialize_pem() }
}

#[tokio::test]
async fn tls_client_certificates_are_required() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let ca = ca();
    let ca_pem = ca.0.pem();
    let server_pki = leaf(&ca, ExtendedKeyUsagePurpose::ServerAuth);
    let client_pki = leaf(&ca, ExtendedKeyUsagePurpose::ClientAuth);
    // A client certificate from another CA.
    let stranger = leaf(&self::ca(), ExtendedKeyUsagePurpose::ClientAuth);

    let tls = ServerTls {
        cert: write(d, "server.pem", &server_pki.cert_pem, 0o644),
        key: write(d, "server.key", &server_pki.key_pem, 0o600),
        client_ca: write(d, "ca.pem", &ca_pem, 0o644),
    };
    let (node, ep) = node(d);
    let config =
        AdminServerConfig { listen: "127.0.0.1:0".parse().unwrap(), token_file: None, tls: Some(tls) };
    let server = grpc::serve(&config, node.clone(), ep).unwrap();
    let url = format!("https://localhost:{}", server.local_addr().port());
    let auth = |identity: Option<(&Pki,)>| ClientAuth {
        token: None,
        server_ca: Some(ca_pem.clone().into_bytes()),
        identity: identity.map(|(p,)| (p.cert_pem.clone().into_bytes(), p.key_pem.clone().into_bytes())),
        domain: None,
    };

    // No client certificate, a certificate of another CA, plain HTTP/2: refused.
    for (what, auth) in [("no certificate", auth(None)), ("another CA", auth(Some((&stranger,))))] {
        let mut c = grpc::connect(&url, &auth).unwrap();
        let err = c.create_volume(create("v", 1 << 20)).await.unwrap_err();
        assert_ne!(err.code(), Code::Ok, "{what}");
    }
    let mut plain =
        grpc::connect(&format!("http://127.0.0.1:{}", server.local_addr().port()), &ClientAuth::default())
            .unwrap();
    assert!(plain.create_volume(create("v", 1 << 20)).await.is_err());
    assert_eq!(node.stats().unwrap().volumes_total, 0, "a refused client reached the node");

    // With the CA's client certificate: served.
    let mut c = grpc::connect(&url, &auth(Some((&client_pki,)))).unwrap();
    assert_eq!(c.create_volume(create("v", 1 << 20)).await.unwrap().into_inner().name, "v");
    assert_eq!(node.stats().unwrap().volumes_total, 1);
}
