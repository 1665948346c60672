//! `ZvolBackend` declares "discard whole blocks, zero the rest" to a driver's ring exactly where its
//! own deallocation would take that path (a zvol, or a device forced to it), and the io_uring server
//! then deallocates on its ring: a loop device stands in for the zvol.
//!
//! Needs root and `losetup` (util-linux); without them it fails with a message saying so.

use std::net::TcpStream;
use std::path::PathBuf;
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use nvmeof_proto::nvme::fabrics::CNTLID_DYNAMIC;
use nvmeof_proto::nvme::registers::{offset, PropertyWidth};
use nvmeof_proto::nvme::{Sqe, Status};
use nvmeof_proto::Payload;
use nvmeof_target::host::{self, BlockingHost, HostOptions};
use nvmeof_target::{BlockBackend, HostAccess, NamespaceConfig, SubsystemConfig, Target, TargetConfig};
use xatastor_core::{Server, ServerConfig};
use zvol_backend::{ZvolBackend, ZvolOptions};

const NQN: &str = "nqn.2026-01.io.xatastor:zvol-ring-discard";
const HOSTNQN: &str = "nqn.2014-08.org.nvmexpress:uuid:zvol-ring-discard-host";

/// A loop device over a sparse file, detached on drop.
struct LoopDevice {
    dev: PathBuf,
    _dir: tempfile::TempDir,
}

impl LoopDevice {
    fn new(size: u64) -> Self {
        let dir = tempfile::tempdir().expect("temporary directory");
        let backing = dir.path().join("backing.img");
        std::fs::File::create(&backing).and_then(|f| f.set_len(size)).expect("sparse backing file");
        let out = Command::new("losetup").args(["-f", "--show"]).arg(&backing).output().unwrap_or_else(|e| {
            panic!("cannot run losetup ({e}): this test needs util-linux, root and /dev/loop-control")
        });
        assert!(
            out.status.success(),
            "losetup -f --show failed ({}): this test needs root and a free loop device",
            String::from_utf8_lossy(&out.stderr).trim()
        );
        let dev = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
        assert!(dev.starts_with("/dev/"), "losetup printed {dev:?}");
        Self { dev, _dir: dir }
    }
}

impl Drop for LoopDevice {
    fn drop(&mut self) {
        let _ = Command::new("losetup").arg("-d").arg(&self.dev).status();
    }
}

type Host = BlockingHost<TcpStream>;

fn host(addr: std::net::SocketAddr) -> Host {
    let s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    s.set_nodelay(true).unwrap();
    Host::new(s, HostOptions::default()).unwrap()
}

/// An enabled controller's admin queue and one I/O queue.
fn connect(addr: std::net::SocketAddr) -> (Host, Host) {
    let mut adm = host(addr);
    let (sqe, data) = host::connect_command(0, 32, 0, CNTLID_DYNAMIC, [7; 16], NQN, HOSTNQN);
    let c = adm.command(sqe, Some(data), 0).unwrap();
    assert_eq!(c.status(), Status::SUCCESS);
    let cntlid = c.cqe.dw0.get() as u16;
    let cc = host::property_set(offset::CC, PropertyWidth::Four, 0x0046_0001);
    assert_eq!(adm.command(cc, None, 0).unwrap().status(), Status::SUCCESS);
    let mut nq = Sqe::zeroed();
    nq.opcode = 0x09; // Set Features, Number of Queues: 1
    nq.cdw10.set(0x07);
    assert_eq!(adm.command(nq, None, 0).unwrap().status(), Status::SUCCESS);
    let mut q = host(addr);
    let (sqe, data) = host::connect_command(1, 128, 0, cntlid, [7; 16], NQN, HOSTNQN);
    assert_eq!(q.command(sqe, Some(data), 0).unwrap().status(), Status::SUCCESS);
    (adm, q)
}

#[test]
fn a_block_device_declares_its_discard_granularity_only_on_the_zvol_path() {
    let lo = LoopDevice::new(16 << 20);
    let b = ZvolBackend::open_with(&lo.dev, ZvolOptions { block_size: 512, direct: true }).unwrap();
    // A loop device is no zvol: it punches holes (PUNCH_HOLE), nothing to declare.
    assert_eq!(b.raw_device().unwrap().discard_granularity, None);
    b.__force_discard_and_zero();
    assert_eq!(b.raw_device().unwrap().discard_granularity, Some(b.discard_granularity()));

    // A regular file never declares it (it is not a block device).
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("file.img");
    std::fs::File::create(&path).and_then(|f| f.set_len(1 << 20)).unwrap();
    let f = ZvolBackend::open(&path, 512).unwrap();
    f.__force_discard_and_zero();
    assert_eq!(f.raw_device().unwrap().discard_granularity, None);
}

#[test]
fn zvol_style_deallocation_runs_on_the_servers_ring() {
    let lo = LoopDevice::new(16 << 20);
    let b = ZvolBackend::open_with(&lo.dev, ZvolOptions { block_size: 512, direct: true }).unwrap();
    b.__force_discard_and_zero();
    let gb = b.discard_granularity() / 512;
    assert!(gb > 1, "the loop device discards in blocks larger than a sector");

    let target = Target::new(TargetConfig::default());
    let mut sc = SubsystemConfig::new(NQN, "ZRD1");
    sc.access = HostAccess::DenyAllExcept;
    sc.allowed_hosts.push(HOSTNQN.into());
    target.add_subsystem(sc).unwrap();
    target.add_namespace(NQN, NamespaceConfig::derived(NQN, 1, Arc::new(b))).unwrap();
    let mut config = ServerConfig::new("127.0.0.1:0".parse().unwrap());
    config.workers = 1;
    let srv = Server::start(target, config).unwrap();
    let (_adm, mut q) = connect(srv.local_addr());

    let data: Vec<u8> = (0..16 * gb as usize * 512).map(|i| (i as u8).wrapping_mul(13) | 1).collect();
    let blocks = (data.len() / 512) as u32;
    let w = q.command(host::rw_command(0x01, 1, 0, blocks), Some(Payload::from(data.clone())), 0);
    assert_eq!(w.unwrap().status(), Status::SUCCESS);
    let before = srv.worker_stats()[0];
    // Deallocate from 1 LBA into a granularity block to 2 LBAs into another.
    let (start, end) = (gb + 1, 7 * gb + 2);
    let mut list = vec![0u8; 4096];
    list[4..8].copy_from_slice(&((end - start) as u32).to_le_bytes());
    list[8..16].copy_from_slice(&start.to_le_bytes());
    let mut dsm = Sqe::zeroed();
    dsm.opcode = 0x09;
    dsm.nsid.set(1);
    dsm.cdw11.set(1 << 2); // AD
    assert_eq!(q.command(dsm, Some(Payload::from(list)), 0).unwrap().status(), Status::SUCCESS);
    let after = srv.worker_stats()[0];
    assert_eq!(after.ring_discards, before.ring_discards + 1, "the deallocation ran on the ring");
    assert_eq!(after.pool_requests, before.pool_requests, "nothing went to the blocking pool");

    let c = q.command(host::rw_command(0x02, 1, 0, blocks), None, blocks * 512).unwrap();
    assert_eq!(c.status(), Status::SUCCESS);
    let back = c.data.to_bytes();
    let (s, e) = ((start * 512) as usize, (end * 512) as usize);
    assert_eq!(back[..s], data[..s], "before the range");
    assert!(back[s..e].iter().all(|&x| x == 0), "the whole range reads as zeros");
    assert_eq!(back[e..], data[e..], "after the range");
    drop(q);
    srv.shutdown().unwrap();
}
