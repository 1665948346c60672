//! Host authentication on the node, over the io_uring server with the in-tree host: a host with a
//! secret must prove it (right secret in, wrong secret out, bidirectional), an auth-required volume
//! refuses hosts without one while other volumes still take them, rotation keeps connected hosts
//! and applies at the next authentication, secrets survive a restart in 0600 files in a 0700
//! directory (looser permissions are refused), a lost secrets file keeps the volume unexported,
//! secrets leave memory with the volume, and deny/delete/clone treat secrets as documented.

use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use nvmeof_proto::nvme::registers::{offset, PropertyWidth};
use nvmeof_proto::nvme::Status;
use nvmeof_proto::Payload;
use nvmeof_target::auth::DhchapSecret;
use nvmeof_target::host;
use nvmeof_target::{Target, TargetConfig};
use xatastor_core::provisioners::{FileProvisioner, MemoryProvisioner};
use xatastor_core::{
    CreateVolume, DhchapHash, HostSecrets, Node, NodeConfig, NodeError, SecretParams, SecretsError, Server,
    ServerConfig, VolumeAuthOptions, VolumeProvisioner,
};

mod common;
use common::{authenticate, connect_admin_only, connect_io_only, enable, eventually, rw, Host};

const HOST: &str = "nqn.2014-08.org.nvmexpress:uuid:auth-test-host";
const OTHER: &str = "nqn.2014-08.org.nvmexpress:uuid:auth-test-other";
const MIB: u64 = 1 << 20;

struct Fixture {
    _tmp: tempfile::TempDir,
    node: Node,
    server: Server,
}

impl Fixture {
    fn addr(&self) -> SocketAddr {
        self.server.local_addr()
    }
}

/// A node with its catalog (and secrets) in `dir`, served on an ephemeral port.
fn serve(dir: &Path, prov: Arc<dyn VolumeProvisioner>, idle: Duration) -> Result<(Node, Server), NodeError> {
    let target = Target::new(TargetConfig::default());
    let mut config = NodeConfig::new(dir.join("catalog.redb"));
    config.idle_unload = idle;
    let node = Node::open(config, prov, target.clone())?;
    let mut sc = ServerConfig::new("127.0.0.1:0".parse().unwrap());
    sc.workers = 2;
    let server = Server::start(target, sc).unwrap();
    Ok((node, server))
}

fn memory_node_idle(idle: Duration) -> Fixture {
    let tmp = tempfile::tempdir().unwrap();
    let (node, server) = serve(tmp.path(), Arc::new(MemoryProvisioner::new()), idle).unwrap();
    Fixture { _tmp: tmp, node, server }
}

fn memory_node() -> Fixture {
    memory_node_idle(Duration::from_secs(60))
}

fn gen(transform: Option<DhchapHash>) -> DhchapSecret {
    Node::generate_secret(SecretParams { key_len_bytes: 32, transform }).unwrap()
}

fn volume(name: &str, hosts: &[&str]) -> CreateVolume {
    let mut c = CreateVolume::new(name, 4 * MIB);
    c.allowed_hosts = hosts.iter().map(|h| (*h).to_owned()).collect();
    c
}

fn write_read(q: &mut Host, slba: u64, byte: u8) {
    let data = vec![byte; 512];
    let c = q.command(rw(0x01, slba, 1), Some(Payload::from(data.clone())), 0).unwrap();
    assert_eq!(c.status(), Status::SUCCESS, "write");
    let c = q.command(rw(0x02, slba, 1), None, 512).unwrap();
    assert_eq!(c.status(), Status::SUCCESS, "read");
    assert_eq!(c.data.to_bytes(), data);
}

/// A whole controller with one I/O queue, each queue authenticated with `secret` (and `ctrl`).
fn bring_up(
    addr: SocketAddr,
    subnqn: &str,
    hostnqn: &str,
    secret: &DhchapSecret,
    ctrl: Option<&DhchapSecret>,
) -> (Host, Host, u16) {
    let (mut admin, cntlid, atr) = connect_admin_only(addr, subnqn, hostnqn, 0).unwrap();
    assert!(atr, "the admin Connect asks for authentication");
    authenticate(&mut admin, hostnqn, subnqn, secret, ctrl, 1).unwrap();
    enable(&mut admin);
    common::set_queue_count(&mut admin, 1);
    let (mut io, atr) = connect_io_only(addr, subnqn, hostnqn, 1, cntlid).unwrap();
    assert!(atr, "the I/O Connect asks for authentication");
    authenticate(&mut io, hostnqn, subnqn, secret, ctrl, 2).unwrap();
    (admin, io, cntlid)
}

/// The queue is gone: the target closed it.
fn assert_closed(q: &mut Host) {
    let r = q.command(host::property_get(offset::CAP, PropertyWidth::Eight), None, 0);
    assert!(r.is_err(), "the queue is still open: {:?}", r.map(|c| c.status()));
}

fn mode(p: &Path) -> u32 {
    std::fs::metadata(p).unwrap().permissions().mode() & 0o7777
}

#[test]
fn right_secret_connects_wrong_secret_and_no_secret_are_refused() {
    let f = memory_node();
    let addr = f.addr();
    f.node.create_volume(volume("vol", &[OTHER])).unwrap();
    let s = gen(Some(DhchapHash::Sha256));
    f.node.allow_host_with_secrets("vol", HOST, HostSecrets::new(s.clone())).unwrap();
    let nqn = f.node.nqn_of("vol");

    // The right secret: in, on every queue, and I/O works.
    let (_admin, mut io, _) = bring_up(addr, &nqn, HOST, &s, None);
    write_read(&mut io, 0, 0x5a);

    // Before it has authenticated a queue can do nothing but authenticate.
    let (mut early, _, atr) = connect_admin_only(addr, &nqn, HOST, 0).unwrap();
    assert!(atr);
    let c = early.command(host::property_get(offset::CAP, PropertyWidth::Eight), None, 0).unwrap();
    assert_eq!(c.status(), Status::AUTHENTICATION_REQUIRED.with_dnr());

    // A wrong secret: refused, the queue torn down.
    let (mut bad, _, _) = connect_admin_only(addr, &nqn, HOST, 0).unwrap();
    let e = authenticate(&mut bad, HOST, &nqn, &gen(None), None, 1).unwrap_err();
    assert_eq!(e.kind(), std::io::ErrorKind::PermissionDenied, "{e}");
    assert_closed(&mut bad);

    // The volume does not require authentication of every host: OTHER, with no secret, connects
    // without authenticating and does I/O.
    let (mut admin2, cntlid2, atr) = connect_admin_only(addr, &nqn, OTHER, 0).unwrap();
    assert!(!atr, "no secret, not required: no authentication asked");
    enable(&mut admin2);
    common::set_queue_count(&mut admin2, 1);
    let (mut io2, atr) = connect_io_only(addr, &nqn, OTHER, 1, cntlid2).unwrap();
    assert!(!atr);
    write_read(&mut io2, 1, 0xa5);

    // Now it is required of every host: OTHER's next Connect must authenticate, and has nothing to
    // authenticate with; its connected queues stay (and the host with a secret still gets in).
    let rec = f.node.set_require_auth("vol", true, false).unwrap();
    assert!(rec.require_auth);
    let (mut other, _, atr) = connect_admin_only(addr, &nqn, OTHER, 0).unwrap();
    assert!(atr, "required of every host");
    let c = other.command(host::property_get(offset::CAP, PropertyWidth::Eight), None, 0).unwrap();
    assert_eq!(c.status(), Status::AUTHENTICATION_REQUIRED.with_dnr());
    let e = authenticate(&mut other, OTHER, &nqn, &s, None, 1).unwrap_err();
    assert_eq!(e.kind(), std::io::ErrorKind::PermissionDenied, "a secret of another host does not help");
    assert_closed(&mut other);
    write_read(&mut io2, 2, 0x11);
    bring_up(addr, &nqn, HOST, &s, None);

    // With `disconnect`, the hosts without a secret are dropped; the others stay.
    f.node.set_require_auth("vol", true, true).unwrap();
    assert_closed(&mut io2);
    write_read(&mut io, 3, 0x22);

    // Not required any more: OTHER connects without authenticating again.
    f.node.set_require_auth("vol", false, false).unwrap();
    let (_, _, atr) = connect_admin_only(addr, &nqn, OTHER, 0).unwrap();
    assert!(!atr);
}

#[test]
fn bidirectional_authentication() {
    let f = memory_node();
    let addr = f.addr();
    f.node.create_volume(volume("bi", &[HOST])).unwrap();
    let nqn = f.node.nqn_of("bi");
    let params = SecretParams { key_len_bytes: 48, transform: Some(DhchapHash::Sha384) };
    let secrets = f.node.generate_host_secrets("bi", HOST, params, true).unwrap();
    let ctrl = secrets.controller.clone().expect("a controller secret");
    assert_eq!(secrets.host.key_len(), 48);
    assert_eq!(ctrl.transform(), Some(DhchapHash::Sha384));
    assert_ne!(*secrets.host.to_dhhc1(), *ctrl.to_dhhc1());

    let (mut admin, cntlid, atr) = connect_admin_only(addr, &nqn, HOST, 0).unwrap();
    assert!(atr);
    let out = authenticate(&mut admin, HOST, &nqn, &secrets.host, Some(&ctrl), 1).unwrap();
    assert!(out.bidirectional, "the controller proved its secret");
    enable(&mut admin);
    common::set_queue_count(&mut admin, 1);
    let (mut io, _) = connect_io_only(addr, &nqn, HOST, 1, cntlid).unwrap();
    authenticate(&mut io, HOST, &nqn, &secrets.host, Some(&ctrl), 2).unwrap();
    write_read(&mut io, 0, 1);

    // A host that expects another controller secret refuses the controller.
    let (mut wrong, _, _) = connect_admin_only(addr, &nqn, HOST, 0).unwrap();
    let e = authenticate(&mut wrong, HOST, &nqn, &secrets.host, Some(&gen(None)), 1).unwrap_err();
    assert_eq!(e.kind(), std::io::ErrorKind::PermissionDenied, "{e}");
    assert!(e.to_string().contains("controller failed to authenticate"), "{e}");

    // The host may still authenticate one way only.
    let (mut uni, _, _) = connect_admin_only(addr, &nqn, HOST, 0).unwrap();
    assert!(!authenticate(&mut uni, HOST, &nqn, &secrets.host, None, 1).unwrap().bidirectional);

    // Without a controller secret on the node, a host that asks for one is refused.
    f.node.set_host_secrets("bi", HOST, HostSecrets::new(secrets.host.clone())).unwrap();
    let (mut ask, _, _) = connect_admin_only(addr, &nqn, HOST, 0).unwrap();
    assert!(authenticate(&mut ask, HOST, &nqn, &secrets.host, Some(&ctrl), 1).is_err());
}

#[test]
fn auth_required_volume_refuses_hosts_without_a_secret_from_its_creation() {
    let f = memory_node();
    let addr = f.addr();
    let mut auth = VolumeAuthOptions::new();
    auth.require_auth = true;
    let s = gen(None);
    auth.host_secrets.push((HOST.to_owned(), HostSecrets::new(s.clone())));
    let rec = f.node.create_volume_with_auth(volume("req", &[HOST, OTHER]), &auth).unwrap();
    assert!(rec.require_auth);
    assert_eq!(rec.dhchap_hosts, [HOST]);
    let nqn = f.node.nqn_of("req");
    // OTHER is allowed but has no secret: it must authenticate and cannot.
    let (mut q, _, atr) = connect_admin_only(addr, &nqn, OTHER, 0).unwrap();
    assert!(atr);
    assert!(authenticate(&mut q, OTHER, &nqn, &gen(None), None, 1).is_err());
    assert_closed(&mut q);
    // HOST gets in.
    let (_a, mut io, _) = bring_up(addr, &nqn, HOST, &s, None);
    write_read(&mut io, 0, 9);
    // Another volume without the requirement still takes hosts that send nothing.
    f.node.create_volume(volume("open", &[OTHER])).unwrap();
    let (_, _, atr) = connect_admin_only(addr, &f.node.nqn_of("open"), OTHER, 0).unwrap();
    assert!(!atr);
    // The show data: placeholders, never a secret.
    let info = f.node.volume("req").unwrap();
    assert!(info.auth.require_auth);
    assert_eq!(info.auth.connect_options(HOST), " --dhchap-secret=<host secret>");
    assert_eq!(info.auth.connect_options(OTHER), " --dhchap-secret=<host secret>");
    let open = f.node.volume_auth("open").unwrap();
    assert_eq!(open.connect_options(OTHER), "");
    let dump = format!("{info:?} {auth:?} {:?}", f.node.volume_auth("req").unwrap());
    assert!(!dump.contains(&s.to_dhhc1()[10..40]), "{dump}");
}

#[test]
fn rotation_keeps_connected_hosts_and_the_next_authentication_uses_the_new_secret() {
    let f = memory_node_idle(Duration::from_millis(200));
    let addr = f.addr();
    f.node.create_volume(volume("rot", &[HOST])).unwrap();
    let nqn = f.node.nqn_of("rot");
    let old = gen(None);
    f.node.set_host_secrets("rot", HOST, HostSecrets::new(old.clone())).unwrap();
    let (mut admin, mut io, _) = bring_up(addr, &nqn, HOST, &old, None);
    write_read(&mut io, 0, 1);

    let new = gen(Some(DhchapHash::Sha512));
    let auth = f.node.set_host_secrets("rot", HOST, HostSecrets::new(new.clone())).unwrap();
    assert_eq!(auth.hosts.len(), 1);
    // The connected host goes on.
    write_read(&mut io, 1, 2);
    // Its next authentication (Linux: after writing the new secret to sysfs) uses the new secret.
    authenticate(&mut admin, HOST, &nqn, &new, None, 3).unwrap();
    authenticate(&mut io, HOST, &nqn, &new, None, 4).unwrap();
    write_read(&mut io, 2, 3);
    // The old secret no longer works: not on a new Connect, and not on a re-authentication (which
    // ends that queue, only that one).
    let (mut q, _, _) = connect_admin_only(addr, &nqn, HOST, 0).unwrap();
    assert!(authenticate(&mut q, HOST, &nqn, &old, None, 1).is_err());
    assert!(authenticate(&mut io, HOST, &nqn, &old, None, 5).is_err());
    assert_closed(&mut io);
    let c = admin.command(host::property_get(offset::CAP, PropertyWidth::Eight), None, 0).unwrap();
    assert_eq!(c.status(), Status::SUCCESS, "the admin queue stays");
    drop((admin, q));

    // Unloaded when idle: its secrets leave memory too; a rotation meanwhile applies at the next
    // Connect.
    eventually("idle volume unloaded", || f.node.stats().unwrap().volumes_active == 0);
    assert_eq!(f.node.stats().unwrap().secrets_loaded, 0, "no secret in memory for an idle volume");
    let newer = gen(None);
    f.node.set_host_secrets("rot", HOST, HostSecrets::new(newer.clone())).unwrap();
    assert_eq!(f.node.stats().unwrap().secrets_loaded, 0, "setting a secret loads nothing");
    let (mut q, _, _) = connect_admin_only(addr, &nqn, HOST, 0).unwrap();
    assert_eq!(f.node.stats().unwrap().secrets_loaded, 1);
    assert!(authenticate(&mut q, HOST, &nqn, &new, None, 1).is_err());
    bring_up(addr, &nqn, HOST, &newer, None);

    // Removing the secret: the host connects without authenticating.
    assert!(f.node.remove_host_secrets("rot", HOST).unwrap());
    assert!(!f.node.remove_host_secrets("rot", HOST).unwrap(), "idempotent");
    let (_, _, atr) = connect_admin_only(addr, &nqn, HOST, 0).unwrap();
    assert!(!atr);
    assert!(f.node.catalog().volume("rot").unwrap().unwrap().dhchap_hosts.is_empty());
    assert!(!f.node.secrets_dir().join("rot.dhchap").exists());
}

#[test]
fn secrets_survive_a_restart_in_private_files_and_looser_permissions_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    // A data directory others may read, as a default umask makes it.
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    let files = || -> Arc<dyn VolumeProvisioner> { Arc::new(FileProvisioner::new(dir).unwrap()) };
    let s = gen(Some(DhchapHash::Sha256));
    let c = gen(None);
    let secrets = dir.join("secrets");
    let nqn = {
        let (node, server) = serve(dir, files(), Duration::from_secs(60)).unwrap();
        node.create_volume(volume("keep", &[HOST, OTHER])).unwrap();
        node.set_host_secrets("keep", HOST, HostSecrets::new(s.clone()).with_controller(c.clone())).unwrap();
        node.set_require_auth("keep", true, false).unwrap();
        let nqn = node.nqn_of("keep");
        let (_a, mut io, _) = bring_up(server.local_addr(), &nqn, HOST, &s, Some(&c));
        write_read(&mut io, 0, 0x77);
        // The directory is 0700, the file 0600, whatever the data directory's permissions.
        assert_eq!(node.secrets_dir(), secrets);
        assert_eq!(mode(&secrets), 0o700);
        assert_eq!(mode(&secrets.join("keep.dhchap")), 0o600);
        let names: Vec<String> = std::fs::read_dir(&secrets)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        assert_eq!(names, ["keep.dhchap"], "no temporary file left");
        drop((_a, io));
        server.shutdown().unwrap();
        nqn
    };
    // Nothing secret in the catalog file.
    let catalog = std::fs::read(dir.join("catalog.redb")).unwrap();
    for secret in [&s, &c] {
        let text = secret.to_dhhc1();
        let needle = &text.as_bytes()[10..40];
        assert!(!catalog.windows(needle.len()).any(|w| w == needle), "a secret in the catalog");
    }

    // Restart: a new target, node and server find the secrets and the requirement again.
    {
        let (node, server) = serve(dir, files(), Duration::from_secs(60)).unwrap();
        let addr = server.local_addr();
        assert_eq!(node.nqn_of("keep"), nqn);
        let (_a, mut io, _) = bring_up(addr, &nqn, HOST, &s, Some(&c));
        write_read(&mut io, 1, 0x78);
        let (mut q, _, _) = connect_admin_only(addr, &nqn, HOST, 0).unwrap();
        assert!(authenticate(&mut q, HOST, &nqn, &c, None, 1).is_err(), "wrong secret");
        let (mut q, _, atr) = connect_admin_only(addr, &nqn, OTHER, 0).unwrap();
        assert!(atr, "still required of every host");
        assert!(authenticate(&mut q, OTHER, &nqn, &s, None, 1).is_err());
        let auth = node.volume_auth("keep").unwrap();
        assert!(auth.require_auth);
        assert_eq!(
            auth.connect_options(HOST),
            " --dhchap-secret=<host secret> --dhchap-ctrl-secret=<controller secret>"
        );
        drop((_a, io));
        server.shutdown().unwrap();
    }

    // A secrets file others may read: the volume is not exported, and admin calls say why.
    let file = secrets.join("keep.dhchap");
    std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o644)).unwrap();
    {
        let (node, server) = serve(dir, files(), Duration::from_secs(60)).unwrap();
        assert!(connect_admin_only(server.local_addr(), &nqn, HOST, 0).is_err(), "not exported");
        let e = node.volume_auth("keep").unwrap_err();
        assert!(matches!(e, NodeError::Secrets(SecretsError::Permissions { mode: 0o644, .. })), "{e}");
        assert!(e.to_string().contains("chmod 600"), "{e}");
        let e = node.set_host_secrets("keep", HOST, HostSecrets::new(s.clone())).unwrap_err();
        assert!(matches!(e, NodeError::Secrets(SecretsError::Permissions { .. })), "{e}");
        // Fixed: exported again at the next Connect.
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o600)).unwrap();
        bring_up(server.local_addr(), &nqn, HOST, &s, Some(&c));
        server.shutdown().unwrap();
    }

    // A secrets directory others may enter: the node does not start.
    std::fs::set_permissions(&secrets, std::fs::Permissions::from_mode(0o750)).unwrap();
    let e = serve(dir, files(), Duration::from_secs(60)).map(|_| ()).unwrap_err();
    assert!(
        matches!(e, NodeError::Secrets(SecretsError::Permissions { mode: 0o750, expected: 0o700, .. })),
        "{e}"
    );
    assert!(e.to_string().contains("chmod 700"), "{e}");
    std::fs::set_permissions(&secrets, std::fs::Permissions::from_mode(0o700)).unwrap();
    serve(dir, files(), Duration::from_secs(60)).unwrap();
}

#[test]
fn a_lost_secrets_file_keeps_the_volume_unexported() {
    let f = memory_node();
    let addr = f.addr();
    f.node.create_volume(volume("lost", &[HOST])).unwrap();
    let nqn = f.node.nqn_of("lost");
    f.node.set_host_secrets("lost", HOST, HostSecrets::new(gen(None))).unwrap();
    // The file goes behind the node's back (a restored backup, a wiped directory).
    std::fs::remove_file(f.node.secrets_dir().join("lost.dhchap")).unwrap();
    // The host must not get in without authenticating: the volume is not exported at all.
    assert!(connect_admin_only(addr, &nqn, HOST, 0).is_err());
    // Admin calls say so, and no change on top of the incomplete file forgets HOST.
    let e = f.node.volume_auth("lost").unwrap_err();
    assert!(matches!(&e, NodeError::Secrets(SecretsError::Missing { hosts, .. }) if hosts == &[HOST]), "{e}");
    assert!(matches!(f.node.volume("lost"), Err(NodeError::Secrets(SecretsError::Missing { .. }))));
    let e = f.node.set_host_secrets("lost", OTHER, HostSecrets::new(gen(None))).unwrap_err();
    assert!(matches!(e, NodeError::Secrets(SecretsError::Missing { .. })), "{e}");
    f.node.snapshot(&[("lost".into(), "s".into())]).unwrap();
    let mut inherit = VolumeAuthOptions::new();
    inherit.inherit_secrets = true;
    let e = f.node.clone_volume_with_auth("lost", "s", volume("heir", &[HOST]), &inherit).unwrap_err();
    assert!(matches!(e, NodeError::Secrets(SecretsError::Missing { .. })), "{e}");
    assert!(f.node.catalog().volume("heir").unwrap().is_none());
    assert!(connect_admin_only(addr, &nqn, HOST, 0).is_err());
    // Setting HOST's secret again, or removing it, is how the operator says what is meant.
    let s = gen(None);
    f.node.set_host_secrets("lost", HOST, HostSecrets::new(s.clone())).unwrap();
    bring_up(addr, &nqn, HOST, &s, None);
    std::fs::remove_file(f.node.secrets_dir().join("lost.dhchap")).unwrap();
    // (The loaded volume keeps its secrets in memory: the file is read at the next activation.)
    assert!(f.node.remove_host_secrets("lost", HOST).unwrap(), "the catalog listed it");
    let (_, _, atr) = connect_admin_only(addr, &nqn, HOST, 0).unwrap();
    assert!(!atr);
}

#[test]
fn deny_delete_and_clone_treat_secrets_as_documented() {
    let f = memory_node();
    let addr = f.addr();
    let s = gen(None);
    let mut auth = VolumeAuthOptions::new();
    auth.host_secrets.push((HOST.to_owned(), HostSecrets::new(s.clone())));
    f.node.create_volume_with_auth(volume("base", &[HOST, OTHER]), &auth).unwrap();
    f.node.set_host_secrets("base", OTHER, HostSecrets::new(gen(None))).unwrap();
    f.node.set_require_auth("base", true, false).unwrap();
    f.node.snapshot(&[("base".into(), "s".into())]).unwrap();

    // A clone: the requirement follows its origin, the secrets do not unless asked.
    let plain = f.node.clone_volume("base", "s", volume("plain", &[HOST])).unwrap();
    assert!(plain.require_auth, "the origin requires authentication");
    assert!(plain.dhchap_hosts.is_empty());
    assert!(f.node.volume_auth("plain").unwrap().hosts.is_empty());
    let (mut q, _, atr) = connect_admin_only(addr, &f.node.nqn_of("plain"), HOST, 0).unwrap();
    assert!(atr);
    assert!(authenticate(&mut q, HOST, &f.node.nqn_of("plain"), &s, None, 1).is_err());
    let mut inherit = VolumeAuthOptions::new();
    inherit.inherit_secrets = true;
    let other_new = gen(None);
    inherit.host_secrets.push((OTHER.to_owned(), HostSecrets::new(other_new.clone())));
    let branch =
        f.node.clone_volume_with_auth("base", "s", volume("branch", &[HOST, OTHER]), &inherit).unwrap();
    assert_eq!(branch.dhchap_hosts, [HOST, OTHER]);
    let bnqn = f.node.nqn_of("branch");
    bring_up(addr, &bnqn, HOST, &s, None);
    bring_up(addr, &bnqn, OTHER, &other_new, None);

    // Deny: the host goes, and its secret with it.
    f.node.deny_host("branch", OTHER, true).unwrap();
    assert!(f.node.volume_auth("branch").unwrap().host(OTHER).is_none());
    assert_eq!(f.node.catalog().volume("branch").unwrap().unwrap().dhchap_hosts, [HOST]);
    // Allowed again without a secret (the volume does not require one): no authentication.
    f.node.set_require_auth("branch", false, false).unwrap();
    f.node.allow_host("branch", OTHER).unwrap();
    let (_, _, atr) = connect_admin_only(addr, &bnqn, OTHER, 0).unwrap();
    assert!(!atr, "the old secret did not come back");

    // Delete: the secrets go with the volume; a new volume of the same name has none.
    f.node.delete_volume("branch", true).unwrap();
    assert!(!f.node.secrets_dir().join("branch.dhchap").exists());
    assert!(f.node.secrets_dir().join("base.dhchap").exists());
    f.node.create_volume(volume("branch", &[HOST])).unwrap();
    assert!(f.node.volume_auth("branch").unwrap().hosts.is_empty());
    let (_, _, atr) = connect_admin_only(addr, &bnqn, HOST, 0).unwrap();
    assert!(!atr);
    // A stale file left by a crash is not inherited by a new volume either.
    std::fs::copy(f.node.secrets_dir().join("base.dhchap"), f.node.secrets_dir().join("fresh.dhchap"))
        .unwrap();
    f.node.create_volume(volume("fresh", &[HOST])).unwrap();
    assert!(f.node.volume_auth("fresh").unwrap().hosts.is_empty());
}

#[test]
fn bad_arguments_are_refused() {
    let f = memory_node();
    f.node.create_volume(volume("v", &[HOST])).unwrap();
    let s = HostSecrets::new(gen(None));
    for bad in ["", "not-an-nqn", "nqn.with\nnewline", "nqn.with\ttab"] {
        let e = f.node.set_host_secrets("v", bad, s.clone()).unwrap_err();
        assert!(matches!(e, NodeError::InvalidArgument(_)), "{bad:?}: {e}");
    }
    assert!(matches!(f.node.set_host_secrets("nope", HOST, s.clone()), Err(NodeError::NotFound(_))));
    assert!(matches!(f.node.set_require_auth("nope", true, false), Err(NodeError::NotFound(_))));
    assert!(matches!(f.node.volume_auth("nope"), Err(NodeError::NotFound(_))));
    let e = Node::generate_secret(SecretParams { key_len_bytes: 16, transform: None }).unwrap_err();
    assert!(matches!(e, NodeError::InvalidArgument(_)), "{e}");
    let mut twice = VolumeAuthOptions::new();
    twice.host_secrets = vec![(HOST.into(), s.clone()), (HOST.into(), s)];
    assert!(matches!(
        f.node.create_volume_with_auth(volume("w", &[]), &twice),
        Err(NodeError::InvalidArgument(_))
    ));
    assert!(f.node.catalog().volume("w").unwrap().is_none());
}
