//! The storage node over the io_uring server with the in-tree host: lazy activation on Connect,
//! discovery from the catalog's host index, idle unload, clone exported at once, resize seen by a
//! connected host, delete refused while connected and forced, identities stable across restarts.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use nvmeof_proto::nvme::{Sqe, Status};
use nvmeof_proto::Payload;
use nvmeof_target::{Target, TargetConfig};
use xatastor_core::provisioners::MemoryProvisioner;
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
    f.node.resize("v", 4 << 20).unwrap();
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
