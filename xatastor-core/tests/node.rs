//! The storage node over the io_uring server with the in-tree host: lazy activation on Connect,
//! discovery from the catalog's host index, idle unload, clone exported at once, resize seen by a
//! connected host, delete refused while connected and forced, identities stable across restarts,
//! the shrink rule, the backend recorded in the catalog, host access edited with discovery change
//! events, capacity and the overcommit limit.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use nvmeof_proto::nvme::{Sqe, Status};
use nvmeof_proto::Payload;
use nvmeof_target::{Target, TargetConfig};
use xatastor_core::catalog::VolumeState;
use xatastor_core::provisioners::{FileProvisioner, MemoryProvisioner};
use xatastor_core::{CreateVolume, Node, NodeConfig, NodeError, Server, ServerConfig, VolumeProvisioner};

const HOST: &str = "nqn.2014-08.org.nvmexpress:uuid:node-test-host";
const OTHER_HOST: &str = "nqn.2014-08.org.nvmexpress:uuid:node-test-other";
const DISCOVERY: &str = "nqn.2014-08.org.nvmexpress.discovery";

mod common;
use common::{connect_io, eventually, rw, Host};

fn connect(addr: SocketAddr, subnqn: &str, hostnqn: &str) -> Result<(Host, u16), Status> {
    common::connect_admin(addr, subnqn, hostnqn, 0)
}

fn io_queue(addr: SocketAddr, subnqn: &str, cntlid: u16) -> Host {
    connect_io(addr, subnqn, HOST, 1, cntlid)
}

struct Fixture {
    _dir: tempfile::TempDir,
    node: Node,
    server: Server,
}

fn start(dir: tempfile::TempDir, prov: Arc<dyn VolumeProvisioner>, idle: Duration) -> Fixture {
    let target = Target::new(TargetConfig::default());
    let mut config = NodeConfig::new(dir.path().join("catalog.redb"));
    config.idle_unload = idle;
    let node = Node::open(config, prov, target.clone()).unwrap();
    let mut sc = ServerConfig::new("127.0.0.1:0".parse().unwrap());
    sc.workers = 2;
    let server = Server::start(target, sc).unwrap();
    Fixture { _dir: dir, node, server }
}

fn identify_ns_size_blocks(a: &mut Host) -> u64 {
    let mut sqe = Sqe::zeroed();
    sqe.opcode = 0x06;
    sqe.nsid.set(1);
    sqe.cdw10.set(0); // CNS 0: namespace
    let c = a.command(sqe, None, 4096).unwrap();
    assert_eq!(c.status(), Status::SUCCESS);
    let b = c.data.to_bytes();
    u64::from_le_bytes(b[0..8].try_into().unwrap())
}

/// Subsystem NQNs in the discovery log page the node serves to `hostnqn`.
fn discover(addr: SocketAddr, hostnqn: &str) -> Vec<String> {
    let (mut d, _) = connect(addr, DISCOVERY, hostnqn).unwrap();
    let mut sqe = Sqe::zeroed();
    sqe.opcode = 0x02;
    let len = 16 * 1024u32;
    sqe.cdw10.set(0x70 | ((len / 4 - 1) << 16));
    let c = d.command(sqe, None, len).unwrap();
    assert_eq!(c.status(), Status::SUCCESS);
    let page = c.data.to_bytes();
    let numrec = u64::from_le_bytes(page[8..16].try_into().unwrap()) as usize;
    (0..numrec)
        .map(|i| {
            let e = &page[1024 * (i + 1)..1024 * (i + 2)];
            String::from_utf8_lossy(&e[256..512]).trim_end_matches(['\0', ' ']).to_owned()
        })
        .collect()
}

fn volume(name: &str, size: u64, hosts: &[&str]) -> CreateVolume {
    let mut c = CreateVolume::new(name, size);
    c.allowed_hosts = hosts.iter().map(|h| (*h).to_owned()).collect();
    c
}

#[test]
fn lazy_activation_discovery_and_idle_unload() {
    let f =
        start(tempfile::tempdir().unwrap(), Arc::new(MemoryProvisioner::new()), Duration::from_millis(300));
    let addr = f.server.local_addr();
    let mut reqs: Vec<CreateVolume> = (0..200).map(|i| volume(&format!("vol{i:03}"), 1 << 20, &[])).collect();
    reqs.push(volume("mine", 8 << 20, &[HOST]));
    f.node.create_volumes(reqs).unwrap();
    // Nothing is loaded: 201 volumes cost no subsystem, no fd, no thread.
    assert_eq!(f.node.stats().unwrap().volumes_active, 0);
    assert!(f.node.target().subsystem_nqns().is_empty());
    // Discovery comes from the catalog's host index: only what this host may use.
    let mine = f.node.nqn_of("mine");
    assert_eq!(discover(addr, HOST), std::slice::from_ref(&mine));
    assert!(discover(addr, OTHER_HOST).is_empty());
    // Connect activates the volume; I/O works.
    let (mut admin, cntlid) = connect(addr, &mine, HOST).unwrap();
    assert_eq!(f.node.stats().unwrap().volumes_active, 1);
    let mut q = io_queue(addr, &mine, cntlid);
    let data: Vec<u8> = (0..8192u32).map(|i| (i % 251) as u8).collect();
    assert_eq!(
        q.command(rw(0x01, 16, 16), Some(Payload::from(data.clone())), 0).unwrap().status(),
        Status::SUCCESS
    );
    // A host that is not allowed is refused, and an unknown NQN is an invalid parameter.
    assert_eq!(connect(addr, &mine, OTHER_HOST).unwrap_err(), Status::CONNECT_INVALID_HOST.with_dnr());
    assert!(connect(addr, &f.node.nqn_of("nope"), HOST).is_err());
    let mut ka = Sqe::zeroed();
    ka.opcode = 0x18;
    assert_eq!(admin.command(ka, None, 0).unwrap().status(), Status::SUCCESS);
    // Disconnect: after the idle timeout the volume is unloaded again...
    drop(q);
    drop(admin);
    eventually("idle volume unloaded", || f.node.stats().unwrap().volumes_active == 0);
    // ...and its data is still there on the next connect.
    let (_admin, cntlid) = connect(addr, &mine, HOST).unwrap();
    let mut q = io_queue(addr, &mine, cntlid);
    let c = q.command(rw(0x02, 16, 16), None, 8192).unwrap();
    assert_eq!(c.data.to_bytes(), data);
    drop(q);
    f.server.shutdown().unwrap();
}

#[test]
fn clone_is_exportable_at_once_and_independent() {
    let f = start(tempfile::tempdir().unwrap(), Arc::new(MemoryProvisioner::new()), Duration::from_secs(30));
    let addr = f.server.local_addr();
    f.node.create_volume(volume("src", 4 << 20, &[HOST])).unwrap();
    let src = f.node.nqn_of("src");
    let (_a, cntlid) = connect(addr, &src, HOST).unwrap();
    let mut q = io_queue(addr, &src, cntlid);
    let before = vec![0xAAu8; 4096];
    assert_eq!(
        q.command(rw(0x01, 0, 8), Some(Payload::from(before.clone())), 0).unwrap().status(),
        Status::SUCCESS
    );
    // Snapshot and clone while the source is connected (no pause); then the source changes.
    f.node.snapshot(&[("src".into(), "s1".into())]).unwrap();
    f.node.clone_volume("src", "s1", volume("branch", 0, &[HOST])).unwrap();
    let after = vec![0xBBu8; 4096];
    assert_eq!(
        q.command(rw(0x01, 0, 8), Some(Payload::from(after.clone())), 0).unwrap().status(),
        Status::SUCCESS
    );
    let branch = f.node.nqn_of("branch");
    let (_b, cntlid) = connect(addr, &branch, HOST).unwrap();
    let mut bq = io_queue(addr, &branch, cntlid);
    assert_eq!(bq.command(rw(0x02, 0, 8), None, 4096).unwrap().data.to_bytes(), before);
    assert_eq!(q.command(rw(0x02, 0, 8), None, 4096).unwrap().data.to_bytes(), after);
    // The snapshot has a dependent clone: it cannot be deleted, nor can its volume.
    assert!(matches!(f.node.delete_snapshot("src", "s1"), Err(NodeError::HasDependents { .. })));
    assert!(matches!(f.node.delete_volume("src", true), Err(NodeError::HasDependents { .. })));
    drop((q, bq));
    f.server.shutdown().unwrap();
}

#[test]
fn resize_is_seen_and_delete_needs_force_while_connected() {
    let f = start(tempfile::tempdir().unwrap(), Arc::new(MemoryProvisioner::new()), Duration::from_secs(30));
    let addr = f.server.local_addr();
    f.node.create_volume(volume("v", 1 << 20, &[HOST])).unwrap();
    let nqn = f.node.nqn_of("v");
    let (mut admin, _) = connect(addr, &nqn, HOST).unwrap();
    assert_eq!(identify_ns_size_blocks(&mut admin), 2048);
    f.node.resize("v", 4 << 20, false).unwrap();
    assert_eq!(identify_ns_size_blocks(&mut admin), 8192);
    assert_eq!(f.node.volume("v").unwrap().record.size_bytes, 4 << 20);
    match f.node.delete_volume("v", false) {
        Err(NodeError::Busy { controllers, .. }) => assert_eq!(controllers, 1),
        other => panic!("expected Busy, got {other:?}"),
    }
    f.node.delete_volume("v", true).unwrap();
    // The forced delete disconnected the host.
    assert!(admin.receive().is_err(), "the controller was torn down");
    assert!(matches!(f.node.volume("v"), Err(NodeError::NotFound(_))));
    assert!(connect(addr, &nqn, HOST).is_err());
    f.server.shutdown().unwrap();
}

#[test]
fn identities_are_stable_across_restarts() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().to_owned();
    let prov: Arc<dyn VolumeProvisioner> = Arc::new(MemoryProvisioner::new());
    let f = start(dir, prov.clone(), Duration::from_secs(30));
    let rec = f.node.create_volume(volume("keep", 1 << 20, &[HOST])).unwrap();
    let prefix = f.node.nqn_prefix().to_owned();
    f.server.shutdown().unwrap();
    let Fixture { _dir, node, .. } = f;
    drop(node);
    let target = Target::new(TargetConfig::default());
    let node = Node::open(NodeConfig::new(path.join("catalog.redb")), prov, target).unwrap();
    assert_eq!(node.nqn_prefix(), prefix);
    let again = node.volume("keep").unwrap().record;
    assert_eq!(
        (again.nqn, again.nguid, again.uuid, again.serial),
        (rec.nqn, rec.nguid, rec.uuid, rec.serial)
    );
    drop(_dir);
}

#[test]
fn snapshots_and_clones_under_live_io() {
    let f = start(tempfile::tempdir().unwrap(), Arc::new(MemoryProvisioner::new()), Duration::from_secs(30));
    let addr = f.server.local_addr();
    f.node.create_volume(volume("busy", 16 << 20, &[HOST])).unwrap();
    let nqn = f.node.nqn_of("busy");
    let (_admin, cntlid) = connect(addr, &nqn, HOST).unwrap();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let done = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let writer = {
        let (stop, done, nqn) = (stop.clone(), done.clone(), nqn.clone());
        std::thread::spawn(move || {
            let mut q = io_queue(addr, &nqn, cntlid);
            let mut i = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let block = vec![(i % 251) as u8; 4096];
                let s =
                    q.command(rw(0x01, (i % 4096) * 8, 8), Some(Payload::from(block)), 0).unwrap().status();
                assert_eq!(s, Status::SUCCESS);
                i += 1;
                done.store(i, std::sync::atomic::Ordering::Relaxed);
            }
            i
        })
    };
    eventually("writer started", || done.load(std::sync::atomic::Ordering::Relaxed) > 100);
    for k in 0..8 {
        let before = done.load(std::sync::atomic::Ordering::Relaxed);
        f.node.snapshot(&[("busy".into(), format!("s{k}"))]).unwrap();
        f.node.clone_volume("busy", &format!("s{k}"), volume(&format!("c{k}"), 0, &[HOST])).unwrap();
        // Writes keep completing between lifecycle calls (nothing waits for a pause to end).
        eventually("writes continue after a snapshot", || {
            done.load(std::sync::atomic::Ordering::Relaxed) > before + 10
        });
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let total = writer.join().unwrap();
    assert!(total > 100 + 8 * 10);
    assert_eq!(f.node.snapshots("busy").unwrap().len(), 8);
    f.server.shutdown().unwrap();
}

#[test]
fn existing_backend_volumes_are_adopted_once() {
    let prov = Arc::new(MemoryProvisioner::new());
    // Volumes made on the backend before the node managed it (a pool with zvols already).
    for n in ["old-a", "old-b"] {
        let spec = xatastor_core::VolumeSpec {
            name: xatastor_core::VolumeName::new(n).unwrap(),
            size_bytes: 2 << 20,
            block_size: 512,
            compression: None,
        };
        prov.create(&spec).unwrap();
    }
    prov.snapshot(&[xatastor_core::SnapshotRef {
        volume: xatastor_core::VolumeName::new("old-a").unwrap(),
        snapshot: xatastor_core::SnapshotName::new("s").unwrap(),
    }])
    .unwrap();
    let f = start(tempfile::tempdir().unwrap(), prov, Duration::from_secs(30));
    f.node.create_volume(volume("new", 1 << 20, &[])).unwrap();
    let mut adopted = f.node.adopt_existing().unwrap();
    adopted.sort();
    assert_eq!(adopted, ["old-a", "old-b"]);
    assert!(f.node.adopt_existing().unwrap().is_empty(), "a second adoption finds nothing new");
    let a = f.node.volume("old-a").unwrap();
    assert_eq!(a.record.size_bytes, 2 << 20);
    assert!(a.record.allowed_hosts.is_empty() && !a.record.allow_any_host, "adopted volumes start closed");
    assert_eq!(f.node.snapshots("old-a").unwrap().len(), 1);
    // Usable like any other: allow a host, connect.
    f.node.allow_host("old-b", HOST).unwrap();
    assert!(connect(f.server.local_addr(), &f.node.nqn_of("old-b"), HOST).is_ok());
    f.server.shutdown().unwrap();
}

fn write_block(q: &mut Host, slba: u64, fill: u8) {
    let data = Payload::from(vec![fill; 512]);
    assert_eq!(q.command(rw(0x01, slba, 1), Some(data), 0).unwrap().status(), Status::SUCCESS);
}

fn read_block(q: &mut Host, slba: u64) -> Vec<u8> {
    let c = q.command(rw(0x02, slba, 1), None, 512).unwrap();
    assert_eq!(c.status(), Status::SUCCESS);
    c.data.to_bytes().to_vec()
}

/// One rule for every backend: a smaller size is refused unless forced, a forced shrink is refused
/// while a host is connected, and once nobody is, it shrinks (the data before the new end stays).
#[test]
fn shrinking_needs_force_and_no_connected_host() {
    let dir = tempfile::tempdir().unwrap();
    let files: Arc<dyn VolumeProvisioner> = Arc::new(FileProvisioner::new(dir.path().join("files")).unwrap());
    for prov in [Arc::new(MemoryProvisioner::new()) as Arc<dyn VolumeProvisioner>, files] {
        let kind = prov.kind();
        let f = start(tempfile::tempdir().unwrap(), prov, Duration::from_millis(200));
        let addr = f.server.local_addr();
        f.node.create_volume(volume("shr", 4 << 20, &[HOST])).unwrap();
        let nqn = f.node.nqn_of("shr");
        let (mut admin, cntlid) = connect(addr, &nqn, HOST).unwrap();
        let mut q = io_queue(addr, &nqn, cntlid);
        write_block(&mut q, 0, 0x11);
        write_block(&mut q, 6000, 0x22); // at 3 MiB
        match f.node.resize("shr", 2 << 20, false) {
            Err(NodeError::ShrinkNotForced { from_bytes, to_bytes, .. }) => {
                assert_eq!((from_bytes, to_bytes), (4 << 20, 2 << 20), "{kind}")
            }
            other => panic!("{kind}: a shrink without force: {other:?}"),
        }
        match f.node.resize("shr", 2 << 20, true) {
            Err(NodeError::ShrinkWhileConnected { controllers, .. }) => assert_eq!(controllers, 1, "{kind}"),
            other => panic!("{kind}: a forced shrink while connected: {other:?}"),
        }
        // Nothing changed for the connected host.
        assert_eq!(identify_ns_size_blocks(&mut admin), 8192, "{kind}");
        assert_eq!(read_block(&mut q, 6000), vec![0x22; 512], "{kind}");
        assert_eq!(f.node.volume("shr").unwrap().record.size_bytes, 4 << 20, "{kind}");
        drop((q, admin));
        eventually("the host is gone", || f.node.volume("shr").unwrap().controllers == 0);
        let rec = f.node.resize("shr", 2 << 20, true).unwrap();
        assert_eq!(rec.size_bytes, 2 << 20, "{kind}");
        assert_eq!(f.node.volume("shr").unwrap().usage.unwrap().size_bytes, 2 << 20, "{kind}");
        let (mut admin, cntlid) = connect(addr, &nqn, HOST).unwrap();
        assert_eq!(identify_ns_size_blocks(&mut admin), 4096, "{kind}");
        let mut q = io_queue(addr, &nqn, cntlid);
        assert_eq!(read_block(&mut q, 0), vec![0x11; 512], "{kind}: the data before the new end stays");
        // Growing needs no force and keeps the host connected.
        f.node.resize("shr", 8 << 20, false).unwrap();
        assert_eq!(identify_ns_size_blocks(&mut admin), 16384, "{kind}");
        assert_eq!(read_block(&mut q, 6000), vec![0; 512], "{kind}: shrunk away, grown again: zeros");
        drop((q, admin));
        f.server.shutdown().unwrap();
    }
}

/// The catalog records its backend: another one is refused at start, a memory backend's volumes
/// do not come back as ready after a restart, and a volume the backend lacks is never ready.
#[test]
fn the_catalog_knows_its_backend() {
    let dir = tempfile::tempdir().unwrap();
    let catalog = dir.path().join("catalog.redb");
    let open = |p: Arc<dyn VolumeProvisioner>, rebind: bool| {
        let mut config = NodeConfig::new(&catalog);
        config.rebind_backend = rebind;
        Node::open(config, p, Target::new(TargetConfig::default()))
    };
    let files =
        || Arc::new(FileProvisioner::new(dir.path().join("files")).unwrap()) as Arc<dyn VolumeProvisioner>;
    let node = open(files(), false).unwrap();
    node.create_volume(volume("f1", 1 << 20, &[HOST])).unwrap();
    node.create_volume(volume("f2", 1 << 20, &[HOST])).unwrap();
    drop(node);
    // Another backend: refused, with both named.
    for other in [
        Arc::new(MemoryProvisioner::new()) as Arc<dyn VolumeProvisioner>,
        Arc::new(FileProvisioner::new(dir.path().join("elsewhere")).unwrap()),
    ] {
        match open(other, false) {
            Err(e @ NodeError::BackendMismatch { .. }) => {
                let msg = e.to_string();
                assert!(msg.contains("file in files") && msg.lines().count() == 1, "{msg}");
            }
            other => panic!("started on another backend: {other:?}"),
        }
    }
    // The same one: fine, volumes ready.
    let node = open(files(), false).unwrap();
    assert_eq!(node.volume("f1").unwrap().record.state, VolumeState::Ready);
    // A volume deleted behind the node's back is missing, not ready, and cannot be connected to.
    std::fs::remove_file(dir.path().join("files/volumes/f2.img")).unwrap();
    assert_eq!(node.volume("f2").unwrap().record.state, VolumeState::Missing);
    let states: Vec<_> = node.volumes("", None, 10).unwrap().into_iter().map(|r| (r.name, r.state)).collect();
    assert_eq!(states, [("f1".into(), VolumeState::Ready), ("f2".into(), VolumeState::Missing)]);
    let mut sc = ServerConfig::new("127.0.0.1:0".parse().unwrap());
    sc.workers = 1;
    let server = Server::start(node.target().clone(), sc).unwrap();
    assert!(connect(server.local_addr(), &node.nqn_of("f2"), HOST).is_err());
    assert!(connect(server.local_addr(), &node.nqn_of("f1"), HOST).is_ok());
    server.shutdown().unwrap();
    drop(node);
    // Rebinding (the volumes moved): allowed when asked; what the new backend lacks is missing.
    let node = open(Arc::new(FileProvisioner::new(dir.path().join("elsewhere")).unwrap()), true).unwrap();
    assert_eq!(node.volume("f1").unwrap().record.state, VolumeState::Missing);
    drop(node);

    // Memory: the same provisioner reopened in one process keeps its volumes; a new one (a restart)
    // does not have them, and the catalog forgets them.
    let dir = tempfile::tempdir().unwrap();
    let catalog = dir.path().join("catalog.redb");
    let mem: Arc<dyn VolumeProvisioner> = Arc::new(MemoryProvisioner::new());
    let node =
        Node::open(NodeConfig::new(&catalog), mem.clone(), Target::new(TargetConfig::default())).unwrap();
    let prefix = node.nqn_prefix().to_owned();
    node.create_volume(volume("m1", 1 << 20, &[HOST])).unwrap();
    drop(node);
    let node = Node::open(NodeConfig::new(&catalog), mem, Target::new(TargetConfig::default())).unwrap();
    assert_eq!(node.volume("m1").unwrap().record.state, VolumeState::Ready);
    drop(node);
    let node = Node::open(
        NodeConfig::new(&catalog),
        Arc::new(MemoryProvisioner::new()),
        Target::new(TargetConfig::default()),
    )
    .unwrap();
    assert!(matches!(node.volume("m1"), Err(NodeError::NotFound(_))), "a memory volume outlived its process");
    assert_eq!(node.stats().unwrap().volumes_total, 0);
    assert_eq!(node.capacity().unwrap().provisioned_bytes, 0);
    assert_eq!(node.nqn_prefix(), prefix, "the node keeps its NQN prefix");
    node.create_volume(volume("m1", 1 << 20, &[HOST])).unwrap();
}

/// Submits an Asynchronous Event Request for discovery log changes on discovery controller `d`.
fn arm_discovery_event(d: &mut Host) -> u16 {
    let mut aec = Sqe::zeroed();
    aec.opcode = 0x09; // Set Features, Asynchronous Event Configuration
    aec.cdw10.set(0x0b);
    aec.cdw11.set(1 << 31);
    assert_eq!(d.command(aec, None, 0).unwrap().status(), Status::SUCCESS);
    let mut aer = Sqe::zeroed();
    aer.opcode = 0x0c;
    d.submit(aer, None, 0).unwrap()
}

/// Waits for the AER `cid` to complete with a discovery log change notice, then reads the log page
/// (which re-enables the event) and submits the next AER; returns its CID.
fn expect_discovery_event(d: &mut Host, cid: u16, after: &str) -> u16 {
    let c = d.next_completion().unwrap_or_else(|e| panic!("no discovery change event after {after}: {e}"));
    assert_eq!(c.cqe.cid.get(), cid);
    assert_eq!(c.cqe.dw0.get() & 0x00ff_ff07, 0x0070_f002, "a discovery log change notice");
    let mut sqe = Sqe::zeroed();
    sqe.opcode = 0x02;
    sqe.cdw10.set(0x70 | ((4096 / 4 - 1) << 16));
    assert_eq!(d.command(sqe, None, 4096).unwrap().status(), Status::SUCCESS);
    let mut aer = Sqe::zeroed();
    aer.opcode = 0x0c;
    d.submit(aer, None, 0).unwrap()
}

/// Any-host on and off, allow, deny (an error for a host that is not allowed): every change takes
/// effect on Connect and in discovery, raises a discovery change event, and can disconnect the
/// hosts that lost access.
#[test]
fn host_access_is_fully_editable() {
    let f = start(tempfile::tempdir().unwrap(), Arc::new(MemoryProvisioner::new()), Duration::from_secs(30));
    let addr = f.server.local_addr();
    let mut open = volume("open", 1 << 20, &[]);
    open.allow_any_host = true;
    f.node.create_volume(open).unwrap();
    let nqn = f.node.nqn_of("open");
    let (mut d, _) = connect(addr, DISCOVERY, OTHER_HOST).unwrap();
    let mut aer = arm_discovery_event(&mut d);
    assert_eq!(discover(addr, OTHER_HOST), std::slice::from_ref(&nqn));
    let (mut other, _) = connect(addr, &nqn, OTHER_HOST).unwrap();
    // One host cannot be excluded from "any".
    assert!(matches!(f.node.deny_host("open", OTHER_HOST, true), Err(NodeError::AnyHostAllowed { .. })));
    // Any-host off, disconnecting the hosts that are not allowed.
    let rec = f.node.set_allow_any_host("open", false, true).unwrap();
    assert!(!rec.allow_any_host);
    aer = expect_discovery_event(&mut d, aer, "change 1");
    assert!(other.receive().is_err(), "the host that lost access was disconnected");
    assert_eq!(connect(addr, &nqn, OTHER_HOST).unwrap_err(), Status::CONNECT_INVALID_HOST.with_dnr());
    assert!(discover(addr, OTHER_HOST).is_empty());
    assert!(!f.node.volume("open").unwrap().record.allow_any_host, "stored");
    // Denying a host that was never allowed is an error, and changes nothing.
    match f.node.deny_host("open", HOST, false) {
        Err(e @ NodeError::HostNotAllowed { .. }) => assert!(e.to_string().contains(HOST), "{e}"),
        other => panic!("deny of a host that is not allowed: {other:?}"),
    }
    // Allow, deny.
    f.node.allow_host("open", OTHER_HOST).unwrap();
    aer = expect_discovery_event(&mut d, aer, "change 2");
    assert_eq!(discover(addr, OTHER_HOST), std::slice::from_ref(&nqn));
    let (mut other, _) = connect(addr, &nqn, OTHER_HOST).unwrap();
    let rec = f.node.deny_host("open", OTHER_HOST, true).unwrap();
    assert!(rec.allowed_hosts.is_empty());
    aer = expect_discovery_event(&mut d, aer, "change 3");
    assert!(other.receive().is_err(), "deny --disconnect tore the controller down");
    assert!(connect(addr, &nqn, OTHER_HOST).is_err());
    // Any-host on again, on an unloaded volume too.
    f.node.create_volume(volume("cold", 1 << 20, &[])).unwrap(); // nobody may see it: no event
    f.node.set_allow_any_host("cold", true, false).unwrap();
    let _ = expect_discovery_event(&mut d, aer, "change 4");
    assert_eq!(discover(addr, OTHER_HOST), [f.node.nqn_of("cold")]);
    assert!(connect(addr, &f.node.nqn_of("cold"), OTHER_HOST).is_ok());
    f.server.shutdown().unwrap();
}

/// Capacity: provisioned bytes follow creates, clones, resizes and deletes; past the overcommit
/// limit creating and growing are refused with the numbers; sizes beyond 1 EiB are refused.
#[test]
fn capacity_and_the_overcommit_limit() {
    let dir = tempfile::tempdir().unwrap();
    let files = Arc::new(FileProvisioner::new(dir.path().join("files")).unwrap());
    let pool = files.capacity().unwrap().unwrap().total_bytes;
    let mut config = NodeConfig::new(dir.path().join("catalog.redb"));
    config.overcommit_ratio = Some(2.0);
    let node = Node::open(config, files, Target::new(TargetConfig::default())).unwrap();
    let c = node.capacity().unwrap();
    assert_eq!((c.provisioned_bytes, c.pool_bytes, c.overcommit_limit), (0, Some(pool), Some(2.0)));
    let block = |n: u64| n / 4096 * 4096;
    let mut a = volume("a", block(pool), &[]);
    a.block_size = 4096;
    node.create_volume(a).unwrap();
    let c = node.capacity().unwrap();
    assert_eq!(c.provisioned_bytes, block(pool));
    assert!((c.overcommit.unwrap() - block(pool) as f64 / pool as f64).abs() < 1e-9);
    assert!(c.used_bytes.unwrap() + c.available_bytes.unwrap() <= pool);
    // One more pool's worth is refused.
    let mut b = volume("b", block(pool) + 4096 * 2, &[]);
    b.block_size = 4096;
    match node.create_volume(b) {
        Err(e @ NodeError::OvercommitExceeded { .. }) => {
            assert!(e.to_string().contains("limit is 2x"), "{e}")
        }
        other => panic!("past the overcommit limit: {other:?}"),
    }
    assert!(matches!(node.volume("b"), Err(NodeError::NotFound(_))));
    assert!(matches!(
        node.resize("a", 2 * block(pool) + 4096 * 2, false),
        Err(NodeError::OvercommitExceeded { .. })
    ));
    assert_eq!(node.resize("a", block(pool) + 4096, false).unwrap().size_bytes, block(pool) + 4096);
    assert_eq!(node.capacity().unwrap().provisioned_bytes, block(pool) + 4096);
    // Batches count whole.
    let batch: Vec<CreateVolume> = (0..3).map(|i| volume(&format!("x{i}"), block(pool) / 2, &[])).collect();
    assert!(matches!(node.create_volumes(batch), Err(NodeError::OvercommitExceeded { .. })));
    assert_eq!(node.stats().unwrap().volumes_total, 1);
    // Sizes beyond 1 EiB, and sums beyond 64 bits, are clear errors.
    let e = node.create_volume(volume("huge", 9_000_000 << 40, &[])).unwrap_err();
    assert!(e.to_string().contains("larger than the largest volume"), "{e}");
    let batch: Vec<CreateVolume> = (0..20).map(|i| volume(&format!("h{i}"), 1 << 60, &[])).collect();
    let e = node.create_volumes(batch).unwrap_err();
    assert!(e.to_string().contains("64 bits"), "{e}");
    node.delete_volume("a", false).unwrap();
    assert_eq!(node.capacity().unwrap().provisioned_bytes, 0);
}

/// A clone's size: the snapshot's by default, larger if asked; smaller, or not a multiple of the
/// block size, is refused (not silently replaced by the snapshot's size).
#[test]
fn clone_sizes_are_checked() {
    let f = start(tempfile::tempdir().unwrap(), Arc::new(MemoryProvisioner::new()), Duration::from_secs(30));
    let mut v = volume("src", 4 << 20, &[]);
    v.block_size = 4096;
    f.node.create_volume(v).unwrap();
    f.node.snapshot(&[("src".into(), "s".into())]).unwrap();
    for (size, what) in [(2 << 20, "at least"), ((8 << 20) + 512, "multiple of the block size")] {
        match f.node.clone_volume("src", "s", volume("c", size, &[])) {
            Err(e @ NodeError::InvalidArgument(_)) => assert!(e.to_string().contains(what), "{e}"),
            other => panic!("clone of size {size}: {other:?}"),
        }
    }
    assert_eq!(f.node.clone_volume("src", "s", volume("c0", 0, &[])).unwrap().size_bytes, 4 << 20);
    assert_eq!(f.node.clone_volume("src", "s", volume("c1", 8 << 20, &[])).unwrap().size_bytes, 8 << 20);
    f.server.shutdown().unwrap();
}
