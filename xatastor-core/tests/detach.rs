//! Prompt host detach through the node: a forced delete and a deny with disconnect take the namespace
//! away from the connected host (Namespace Attribute Changed), wait until the host has read its
//! active namespace list, and only then cut the connection; the host's reconnect gets an empty
//! controller.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use nvmeof_proto::nvme::{Sqe, Status};
use nvmeof_target::{Target, TargetConfig};
use xatastor_core::provisioners::MemoryProvisioner;
use xatastor_core::{CreateVolume, Node, NodeConfig, Server, ServerConfig};

mod common;
use common::{connect_admin, connect_io, rw, set_queue_count, Host};

const HOST: &str = "nqn.2014-08.org.nvmexpress:uuid:detach-test-host";

fn start(dir: &tempfile::TempDir) -> (Node, Server) {
    let target = Target::new(TargetConfig::default());
    let node = Node::open(
        NodeConfig::new(dir.path().join("catalog.redb")),
        Arc::new(MemoryProvisioner::new()),
        target.clone(),
    )
    .unwrap();
    let mut sc = ServerConfig::new("127.0.0.1:0".parse().unwrap());
    sc.workers = 1;
    (node, Server::start(target, sc).unwrap())
}

/// A Linux-like host: admin queue with namespace events enabled and an AER outstanding, one I/O
/// queue. Returns (admin, io, AER cid).
fn linux_host(addr: SocketAddr, nqn: &str) -> (Host, Host, u16) {
    let (mut admin, cntlid) = connect_admin(addr, nqn, HOST, 5000).unwrap();
    set_queue_count(&mut admin, 1);
    let mut sf = Sqe::zeroed();
    sf.opcode = 0x09;
    sf.cdw10.set(0x0b);
    sf.cdw11.set(1 << 8);
    assert_eq!(admin.command(sf, None, 0).unwrap().status(), Status::SUCCESS);
    let mut aer = Sqe::zeroed();
    aer.opcode = 0x0c;
    let aer = admin.submit(aer, None, 0).unwrap();
    let io = connect_io(addr, nqn, HOST, 1, cntlid);
    (admin, io, aer)
}

fn active_list(admin: &mut Host) -> Vec<u32> {
    let mut sqe = Sqe::zeroed();
    sqe.opcode = 0x06;
    sqe.cdw10.set(2);
    let c = admin.command(sqe, None, 4096).unwrap();
    assert_eq!(c.status(), Status::SUCCESS);
    c.data
        .to_bytes()
        .chunks(4)
        .map(|b| u32::from_le_bytes(b.try_into().unwrap()))
        .take_while(|&n| n != 0)
        .collect()
}

/// What a Linux host does on the event: waits for the AER completion, reads the Changed Namespace
/// List and the active namespace list (then it drops the block device).
fn react_to_the_event(admin: &mut Host, aer: u16) -> Vec<u32> {
    let c = admin.next_completion().unwrap();
    assert_eq!((c.cqe.cid.get(), c.cqe.dw0.get()), (aer, 0x0004_0002), "namespace attribute changed");
    let mut log = Sqe::zeroed();
    log.opcode = 0x02;
    log.nsid.set(0xffff_ffff);
    log.cdw10.set(0x04 | ((4096 / 4 - 1) << 16));
    assert_eq!(admin.command(log, None, 4096).unwrap().status(), Status::SUCCESS);
    active_list(admin)
}

fn volume(name: &str) -> CreateVolume {
    let mut c = CreateVolume::new(name, 1 << 20);
    c.allowed_hosts.push(HOST.into());
    c
}

#[test]
fn forced_delete_detaches_the_host_before_cutting_it() {
    let dir = tempfile::tempdir().unwrap();
    let (node, server) = start(&dir);
    let addr = server.local_addr();
    node.create_volume(volume("v")).unwrap();
    let nqn = node.nqn_of("v");
    let (mut admin, mut io, aer) = linux_host(addr, &nqn);
    assert_eq!(io.command(rw(0x02, 0, 1), None, 512).unwrap().status(), Status::SUCCESS);

    let deleter = {
        let node = node.clone();
        std::thread::spawn(move || node.delete_volume("v", true))
    };
    // The connection is still up while the host looks: the list it reads is empty.
    assert_eq!(react_to_the_event(&mut admin, aer), Vec::<u32>::new());
    deleter.join().unwrap().unwrap();
    // Then it is cut; I/O after the detach failed instead of reaching the deleted volume.
    let r = io.command(rw(0x02, 0, 1), None, 512);
    assert!(r.is_err() || r.unwrap().status() == Status::INVALID_NAMESPACE.with_dnr());
    assert!(admin.receive().is_err(), "the controller was torn down");

    // The host's reconnect gets an empty controller (so it stops retrying); another host is refused.
    let (mut back, _) = connect_admin(addr, &nqn, HOST, 5000).unwrap();
    assert_eq!(active_list(&mut back), Vec::<u32>::new());
    assert_eq!(
        connect_admin(addr, &nqn, "nqn.2014-08.org.nvmexpress:uuid:someone-else", 0).err(),
        Some(Status::CONNECT_INVALID_PARAMETERS.with_dnr())
    );
    drop(back);
    server.shutdown().unwrap();
}

#[test]
fn deny_with_disconnect_detaches_the_host_first() {
    let dir = tempfile::tempdir().unwrap();
    let (node, server) = start(&dir);
    let addr = server.local_addr();
    node.create_volume(volume("w")).unwrap();
    let nqn = node.nqn_of("w");
    let (mut admin, _io, aer) = linux_host(addr, &nqn);
    let denier = {
        let node = node.clone();
        std::thread::spawn(move || node.deny_host("w", HOST, true))
    };
    assert_eq!(react_to_the_event(&mut admin, aer), Vec::<u32>::new());
    assert!(denier.join().unwrap().unwrap().allowed_hosts.is_empty());
    assert!(admin.receive().is_err(), "the controller was torn down");
    // Reconnects find no namespace; allowed again, the host sees its volume again.
    let (mut back, _) = connect_admin(addr, &nqn, HOST, 5000).unwrap();
    assert_eq!(active_list(&mut back), Vec::<u32>::new());
    drop(back);
    node.allow_host("w", HOST).unwrap();
    let (mut again, _) = connect_admin(addr, &nqn, HOST, 5000).unwrap();
    assert_eq!(active_list(&mut again), [1]);
    drop(again);
    // Without a connected host nothing waits.
    node.deny_host("w", HOST, true).unwrap();
    node.delete_volume("w", true).unwrap();
    server.shutdown().unwrap();
}

#[test]
fn a_host_that_never_answers_does_not_block_the_delete_for_ever() {
    let dir = tempfile::tempdir().unwrap();
    let (node, server) = start(&dir);
    node.create_volume(volume("x")).unwrap();
    let nqn = node.nqn_of("x");
    // Events enabled, but the host never reads anything: the delete goes ahead after the bound.
    let (_admin, _io, _aer) = linux_host(server.local_addr(), &nqn);
    node.delete_volume("x", true).unwrap();
    assert!(node.volume("x").is_err());
    let _ = Duration::ZERO;
    server.shutdown().unwrap();
}
