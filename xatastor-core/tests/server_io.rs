//! The io_uring server against the in-tree test initiator over loopback: queues of one controller on
//! different workers, R2T and in-capsule writes, O_DIRECT and asynchronous backends, keep-alive
//! expiry, a host vanishing mid-transfer, a peer that stops reading, and connection limits.

use std::io::Write;
use std::net::SocketAddr;
use std::os::fd::AsFd;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::sync::Arc;
use std::time::Duration;

use nvmeof_proto::nvme::{Sqe, Status};
use nvmeof_proto::{Digests, Payload};
use nvmeof_target::host::{self, BlockingHost, HostOptions};
use nvmeof_target::{
    BackendInfo, BlockBackend, Completer, FileBackend, HostAccess, IoOp, MemoryBackend, NamespaceConfig,
    RawDevice, Submitted, SubsystemConfig, Target, TargetConfig,
};
use xatastor_core::{Server, ServerConfig};

const NQN: &str = "nqn.2026-01.io.xatastor:server-io";
const HOSTNQN: &str = "nqn.2014-08.org.nvmexpress:uuid:server-io-host";

mod common;
use common::{eventually, rw, tcp, Host};

/// Connects an admin queue, enables the controller and asks for 64 I/O queues; returns it and its
/// CNTLID.
fn admin(addr: SocketAddr, kato_ms: u32) -> (Host, u16) {
    let (mut a, cntlid) = common::connect_admin(addr, NQN, HOSTNQN, kato_ms).unwrap();
    common::set_queue_count(&mut a, 64);
    (a, cntlid)
}

fn io_queue(addr: SocketAddr, qid: u16, cntlid: u16) -> Host {
    common::connect_io(addr, NQN, HOSTNQN, qid, cntlid)
}

fn target_with(backend: Arc<dyn BlockBackend>) -> Target {
    let target = Target::new(TargetConfig::default());
    let mut sc = SubsystemConfig::new(NQN, "SIO1");
    sc.access = HostAccess::DenyAllExcept;
    sc.allowed_hosts.push(HOSTNQN.into());
    target.add_subsystem(sc).unwrap();
    target.add_namespace(NQN, NamespaceConfig::derived(NQN, 1, backend)).unwrap();
    target
}

fn server(target: &Target, workers: usize, tweak: impl FnOnce(&mut ServerConfig)) -> Server {
    let mut config = ServerConfig::new("127.0.0.1:0".parse().unwrap());
    config.workers = workers;
    tweak(&mut config);
    Server::start(target.clone(), config).unwrap()
}

fn write(q: &mut Host, slba: u64, data: &[u8]) -> Status {
    q.command(rw(0x01, slba, (data.len() / 512) as u32), Some(Payload::from(data.to_vec())), 0)
        .unwrap()
        .status()
}

fn read(q: &mut Host, slba: u64, len: usize) -> Vec<u8> {
    let c = q.command(rw(0x02, slba, (len / 512) as u32), None, len as u32).unwrap();
    assert_eq!(c.status(), Status::SUCCESS);
    c.data.to_bytes().to_vec()
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len).map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed)).collect()
}

#[test]
fn queues_of_one_controller_on_different_workers() {
    let target = target_with(Arc::new(MemoryBackend::new(64 << 20, 512)));
    let srv = server(&target, 2, |_| {});
    let (mut adm, cntlid) = admin(srv.local_addr(), 0);
    // SO_REUSEPORT spreads connections by their address hash: add I/O queues until both workers
    // serve some of this controller's queues (admin and I/O queues, or I/O queues, on different
    // workers; a 2^-k chance of still missing after k queues).
    let mut queues = Vec::new();
    while srv.worker_stats().iter().any(|w| w.connections == 0) {
        assert!(queues.len() < 60, "all queues landed on one worker");
        queues.push(io_queue(srv.local_addr(), queues.len() as u16 + 1, cntlid));
    }
    // Make sure there are at least two I/O queues, so that reads also cross queues.
    if queues.len() < 2 {
        queues.push(io_queue(srv.local_addr(), queues.len() as u16 + 1, cntlid));
    }
    // Every queue writes its own region through both paths (4 KiB in-capsule, 64 KiB through R2T);
    // every other queue reads it back.
    let n = queues.len();
    for (i, q) in queues.iter_mut().enumerate() {
        assert_eq!(write(q, i as u64 * 256, &pattern(4096, i as u8)), Status::SUCCESS);
        assert_eq!(write(q, i as u64 * 256 + 8, &pattern(65536, i as u8 ^ 0x55)), Status::SUCCESS);
    }
    for i in 0..n {
        let q = &mut queues[(i + 1) % n];
        assert_eq!(read(q, i as u64 * 256, 4096), pattern(4096, i as u8));
        assert_eq!(read(q, i as u64 * 256 + 8, 65536), pattern(65536, i as u8 ^ 0x55));
    }
    assert_eq!(target.controllers()[0].io_queues, n);
    // The admin queue still answers (keep alive) while I/O queues work elsewhere.
    let mut ka = Sqe::zeroed();
    ka.opcode = 0x18;
    assert_eq!(adm.command(ka, None, 0).unwrap().status(), Status::SUCCESS);
    drop(queues);
    drop(adm);
    eventually("controller freed", || target.controllers().is_empty());
    srv.shutdown().unwrap();
}

/// A file opened with `O_DIRECT`: the server must use aligned buffers on its ring; unaligned requests
/// (512-byte blocks on a 4096-aligned device) go through `submit`, here on a buffered descriptor.
#[derive(Debug)]
struct DirectFile {
    direct: std::fs::File,
    buffered: FileBackend,
    size: u64,
}

impl BlockBackend for DirectFile {
    fn size_bytes(&self) -> u64 {
        self.size
    }
    fn info(&self) -> BackendInfo {
        self.buffered.info()
    }
    fn submit(&self, op: IoOp, completer: Completer) -> Submitted {
        self.buffered.submit(op, completer)
    }
    fn raw_device(&self) -> Option<RawDevice<'_>> {
        Some(RawDevice::new(self.direct.as_fd()).direct(4096).punch_hole(true).zero_range(true))
    }
}

#[test]
fn o_direct_volume_on_the_ring() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("direct.img");
    let size = 8u64 << 20;
    std::fs::File::create(&path).unwrap().set_len(size).unwrap();
    let direct = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_DIRECT)
        .open(&path)
        .expect("O_DIRECT open (the test directory's file system must support O_DIRECT)");
    let backend = DirectFile { direct, buffered: FileBackend::open(&path, 512).unwrap(), size };
    let target = target_with(Arc::new(backend));
    let srv = server(&target, 1, |_| {});
    let (_adm, cntlid) = admin(srv.local_addr(), 0);
    let mut q = io_queue(srv.local_addr(), 1, cntlid);
    let before = srv.worker_stats()[0];
    // Aligned: 4 KiB in-capsule and 128 KiB through R2T, both on the ring, straight from the memory
    // the PDUs were received into (the queue receives in direct mode: data lands aligned).
    let a = pattern(4096, 1);
    let b = pattern(128 * 1024, 2);
    assert_eq!(write(&mut q, 8, &a), Status::SUCCESS);
    assert_eq!(write(&mut q, 1024, &b), Status::SUCCESS);
    let after = srv.worker_stats()[0];
    assert_eq!(after.bounced_writes, before.bounced_writes, "no aligned write was copied to a bounce buffer");
    assert_eq!(
        after.received_bytes_copied, before.received_bytes_copied,
        "nothing was copied out of the shared receive buffers: the queue receives in direct mode"
    );
    // Small writes (4 and 8 KiB) land in aligned buffers the worker recycles: many in a row, each
    // read back intact, none bounced.
    let small: Vec<(u64, Vec<u8>)> = (0..48u64)
        .map(|i| (4096 + i * 16, pattern(if i % 3 == 0 { 8192 } else { 4096 }, 10 + i as u8)))
        .collect();
    for (lba, data) in &small {
        assert_eq!(write(&mut q, *lba, data), Status::SUCCESS);
    }
    for (lba, data) in &small {
        assert_eq!(&read(&mut q, *lba, data.len()), data, "LBA {lba}");
    }
    assert_eq!(srv.worker_stats()[0].bounced_writes, before.bounced_writes);
    // Not 4096-aligned: through the backend's own path.
    let c = pattern(1024, 3);
    assert_eq!(write(&mut q, 3, &c), Status::SUCCESS);
    let mut flush = Sqe::zeroed();
    flush.nsid.set(1);
    assert_eq!(q.command(flush, None, 0).unwrap().status(), Status::SUCCESS);
    assert_eq!(read(&mut q, 8, 4096), a);
    assert_eq!(read(&mut q, 1024, 128 * 1024), b);
    assert_eq!(read(&mut q, 3, 1024), c);
    // Write zeroes over part of `b` (fallocate on the ring), seen in the file itself.
    let mut wz = rw(0x08, 1024, 16);
    wz.cdw12.set(wz.cdw12.get() | (1 << 25)); // DEAC
    assert_eq!(q.command(wz, None, 0).unwrap().status(), Status::SUCCESS);
    let file = std::fs::File::open(&path).unwrap();
    let mut got = vec![0u8; 128 * 1024];
    file.read_exact_at(&mut got, 1024 * 512).unwrap();
    assert!(got[..16 * 512].iter().all(|&x| x == 0));
    assert_eq!(got[16 * 512..], b[16 * 512..]);
    let mut got = vec![0u8; 4096];
    file.read_exact_at(&mut got, 8 * 512).unwrap();
    assert_eq!(got, a);
    drop(q);
    srv.shutdown().unwrap();
}

/// Completes every request on another thread, a little later.
#[derive(Debug)]
struct Deferred(MemoryBackend);

impl BlockBackend for Deferred {
    fn size_bytes(&self) -> u64 {
        self.0.size_bytes()
    }
    fn info(&self) -> BackendInfo {
        self.0.info()
    }
    fn submit(&self, op: IoOp, completer: Completer) -> Submitted {
        let result = nvmeof_target::execute_blocking(&self.0, op);
        std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(2));
            completer.complete(result);
        });
        Submitted::Pending
    }
}

#[test]
fn asynchronous_backend_completes_through_the_worker_mailbox() {
    let target = target_with(Arc::new(Deferred(MemoryBackend::new(8 << 20, 512))));
    let srv = server(&target, 1, |_| {});
    let (_adm, cntlid) = admin(srv.local_addr(), 0);
    let mut q = io_queue(srv.local_addr(), 1, cntlid);
    // 32 writes in flight at once, completed in whatever order the threads finish.
    let mut cids = Vec::new();
    for i in 0..32u64 {
        cids.push(q.submit(rw(0x01, i * 8, 8), Some(Payload::from(pattern(4096, i as u8))), 0).unwrap());
    }
    for _ in 0..32 {
        let c = q.next_completion().unwrap();
        assert_eq!(c.status(), Status::SUCCESS);
        assert!(cids.contains(&c.cqe.cid.get()));
    }
    for i in 0..32u64 {
        assert_eq!(read(&mut q, i * 8, 4096), pattern(4096, i as u8));
    }
    drop(q);
    srv.shutdown().unwrap();
}

/// Holds each request (and so its write data, which may be a slice of a receive buffer) on another
/// thread for a while before executing it.
#[derive(Debug)]
struct Holding(Arc<MemoryBackend>);

impl BlockBackend for Holding {
    fn size_bytes(&self) -> u64 {
        self.0.size_bytes()
    }
    fn info(&self) -> BackendInfo {
        self.0.info()
    }
    fn submit(&self, op: IoOp, completer: Completer) -> Submitted {
        let backend = self.0.clone();
        std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(20));
            completer.complete(nvmeof_target::execute_blocking(backend.as_ref(), op));
        });
        Submitted::Pending
    }
}

/// Received PDUs are decoded in place from the worker's receive buffers; writes in flight keep
/// theirs. With a handful of buffers and many slow writes, the server copies instead of running out,
/// and a connection that did run out receives again once buffers come back.
#[test]
fn slow_writes_holding_receive_buffers_do_not_stall_the_worker() {
    let target = target_with(Arc::new(Holding(Arc::new(MemoryBackend::new(8 << 20, 512)))));
    let srv = server(&target, 1, |c| {
        c.recv_buffers = 4;
        c.recv_buffer_bytes = 8192;
    });
    let (_adm, cntlid) = admin(srv.local_addr(), 0);
    let mut queues: Vec<Host> = (1..=3).map(|qid| io_queue(srv.local_addr(), qid, cntlid)).collect();
    for round in 0..3u64 {
        for (n, q) in queues.iter_mut().enumerate() {
            for i in 0..32u64 {
                let lba = (n as u64 * 32 + i) * 8;
                q.submit(rw(0x01, lba, 8), Some(Payload::from(pattern(4096, (lba + round) as u8))), 0)
                    .unwrap();
            }
        }
        for q in &mut queues {
            for _ in 0..32 {
                assert_eq!(q.next_completion().unwrap().status(), Status::SUCCESS);
            }
        }
    }
    for (n, q) in queues.iter_mut().enumerate() {
        for i in 0..32u64 {
            let lba = (n as u64 * 32 + i) * 8;
            assert_eq!(read(q, lba, 4096), pattern(4096, (lba + 2) as u8));
        }
    }
    drop(queues);
    srv.shutdown().unwrap();
}

/// PDUs longer than a receive buffer (128 KiB of H2CData arriving in 4 KiB buffers) are assembled
/// from slices of several buffers, with and without data digests (computed over the slices), while
/// the few buffers run out and the server falls back to copying; every byte lands where it belongs.
#[test]
fn long_pdus_over_many_small_receive_buffers() {
    for (digests, buffers, size) in [
        (Digests::NONE, 16, 4096),
        (Digests::BOTH, 16, 4096),
        (Digests::NONE, 256, 65536),
        (Digests::BOTH, 256, 65536),
    ] {
        let target = target_with(Arc::new(MemoryBackend::new(16 << 20, 512)));
        let srv = server(&target, 1, |c| {
            c.recv_buffers = buffers;
            c.recv_buffer_bytes = size;
        });
        let (_adm, cntlid) = admin(srv.local_addr(), 0);
        let opts = HostOptions { digests, ..HostOptions::default() };
        let mut q = Host::new(common::tcp(srv.local_addr()), opts).unwrap();
        let (sqe, data) = host::connect_command(1, 128, 0, cntlid, [7; 16], NQN, HOSTNQN);
        assert_eq!(q.command(sqe, Some(data), 0).unwrap().status(), Status::SUCCESS);
        for i in 0..8u64 {
            let lba = i * 256;
            q.submit(rw(0x01, lba, 256), Some(Payload::from(pattern(128 * 1024, i as u8))), 0).unwrap();
        }
        for _ in 0..8 {
            assert_eq!(q.next_completion().unwrap().status(), Status::SUCCESS);
        }
        for i in 0..8u64 {
            assert_eq!(
                read(&mut q, i * 256, 128 * 1024),
                pattern(128 * 1024, i as u8),
                "digests {digests:?}"
            );
        }
        drop(q);
        srv.shutdown().unwrap();
    }
}

#[test]
fn keep_alive_expiry_frees_the_controller_and_closes_its_queues() {
    let target = target_with(Arc::new(MemoryBackend::new(1 << 20, 512)));
    let srv = server(&target, 2, |_| {});
    // KATO 1 s and no keep-alive or other traffic after the queue is up.
    let (mut adm, cntlid) = admin(srv.local_addr(), 1000);
    let mut q = io_queue(srv.local_addr(), 1, cntlid);
    assert_eq!(target.controllers().len(), 1);
    eventually("controller freed by the keep-alive timer", || target.controllers().is_empty());
    // Both sockets are closed by the server.
    for h in [&mut adm, &mut q] {
        let e = h.receive().expect_err("the server closes the queue");
        assert!(
            matches!(e.kind(), std::io::ErrorKind::UnexpectedEof | std::io::ErrorKind::ConnectionReset),
            "{e}"
        );
    }
    eventually("connections released", || srv.worker_stats().iter().all(|w| w.connections == 0));
    srv.shutdown().unwrap();
}

#[test]
fn host_vanishing_mid_transfer_does_not_affect_others() {
    let target = target_with(Arc::new(MemoryBackend::new(16 << 20, 512)));
    let srv = server(&target, 1, |_| {});
    let (_adm, cntlid) = admin(srv.local_addr(), 0);
    let mut good = io_queue(srv.local_addr(), 1, cntlid);
    let mut bad = io_queue(srv.local_addr(), 2, cntlid);
    // `bad` starts a 256 KiB write (R2T), sends half of its first data PDU, and vanishes.
    let _cid = bad.queue().submit(rw(0x01, 0, 512), Some(Payload::from(pattern(256 * 1024, 9))), 0);
    bad.flush().unwrap(); // the command capsule
    let mut rx = bytes::BytesMut::new();
    let h2c = loop {
        let mut buf = [0u8; 4096];
        let n = match std::io::Read::read(bad.stream(), &mut buf) {
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            r => r.unwrap(),
        };
        assert!(n > 0);
        rx.extend_from_slice(&buf[..n]);
        bad.queue().handle_input(&mut rx).unwrap();
        if let Some(pdu) = bad.queue().poll_transmit() {
            break pdu; // H2CData for the R2T
        }
    };
    let bytes: Vec<u8> = h2c.chunks().flatten().copied().collect();
    bad.stream().write_all(&bytes[..bytes.len() / 2]).unwrap();
    drop(bad);
    // `good` keeps working on the same worker.
    assert_eq!(write(&mut good, 1000, &pattern(8192, 4)), Status::SUCCESS);
    assert_eq!(read(&mut good, 1000, 8192), pattern(8192, 4));
    eventually("the vanished queue is released", || srv.worker_stats()[0].connections == 2);
    drop(good);
    srv.shutdown().unwrap();
}

#[test]
fn a_peer_that_stops_reading_is_held_back_then_served() {
    let target = target_with(Arc::new(MemoryBackend::new(64 << 20, 512)));
    let srv = server(&target, 1, |c| c.max_send_queue_bytes = 256 * 1024);
    let (_adm, cntlid) = admin(srv.local_addr(), 0);
    let mut other = io_queue(srv.local_addr(), 2, cntlid);
    let mut slow = io_queue(srv.local_addr(), 1, cntlid);
    // 120 reads of 256 KiB (30 MiB of responses) sent at once, and nothing read for now: more than
    // the socket buffers hold, so the server's send queue fills and it stops decoding input.
    for i in 0..120u64 {
        slow.submit(rw(0x02, i * 512, 512), None, 256 * 1024).unwrap();
    }
    eventually("input of the slow peer held", || srv.worker_stats()[0].connections_held == 1);
    // Another queue on the same worker is unaffected.
    assert_eq!(write(&mut other, 0, &pattern(8192, 5)), Status::SUCCESS);
    assert_eq!(read(&mut other, 0, 8192), pattern(8192, 5));
    // The slow peer reads: every command completes, and nothing is held any more.
    for _ in 0..120 {
        let c = slow.next_completion().unwrap();
        assert_eq!(c.status(), Status::SUCCESS);
        assert_eq!(c.data.len(), 256 * 1024);
    }
    assert_eq!(srv.worker_stats()[0].connections_held, 0);
    drop((slow, other));
    srv.shutdown().unwrap();
}

#[test]
fn connections_per_peer_are_limited() {
    let target = target_with(Arc::new(MemoryBackend::new(1 << 20, 512)));
    let srv = server(&target, 2, |c| c.max_connections_per_peer = 3);
    let kept: Vec<Host> =
        (0..3).map(|_| Host::new(tcp(srv.local_addr()), HostOptions::default()).unwrap()).collect();
    // A fourth connection from the same address is closed at once.
    let refused = Host::new(tcp(srv.local_addr()), HostOptions::default());
    assert!(refused.is_err(), "a fourth connection was served");
    assert_eq!(srv.worker_stats().iter().map(|w| w.refused).sum::<u64>(), 1);
    // Once one goes away, a new one is accepted again.
    drop(kept);
    eventually("connections released", || srv.worker_stats().iter().all(|w| w.connections == 0));
    let again = Host::new(tcp(srv.local_addr()), HostOptions::default());
    assert!(again.is_ok());
    drop(again);
    srv.shutdown().unwrap();
}

/// A file volume whose device refuses `fallocate` (the ring cannot zero it) and whose own zeroing is
/// slow: each Write Zeroes waits at a gate (at most 60 s) before zeroing, like a zero-writing loop over
/// a large range or a zvol's `BLKDISCARD`. Reads and writes run on the ring.
#[derive(Debug)]
struct SlowZeroing {
    file: FileBackend,
    gate: Arc<(parking_lot::Mutex<bool>, parking_lot::Condvar)>,
    zeroed: Arc<std::sync::atomic::AtomicUsize>,
}

impl BlockBackend for SlowZeroing {
    fn size_bytes(&self) -> u64 {
        self.file.size_bytes()
    }
    fn info(&self) -> BackendInfo {
        self.file.info()
    }
    fn submit(&self, op: IoOp, completer: Completer) -> Submitted {
        if matches!(op, IoOp::WriteZeroes { .. }) {
            let (open, cv) = &*self.gate;
            let mut open = open.lock();
            if !*open {
                let _ = cv.wait_for(&mut open, Duration::from_secs(60));
            }
        }
        let result = self.file.submit(op, completer);
        self.zeroed.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        result
    }
    fn raw_device(&self) -> Option<RawDevice<'_>> {
        // Declares no fallocate mode: Write Zeroes cannot go on the ring.
        self.file.raw_device().map(|d| d.punch_hole(false).zero_range(false))
    }
}

/// A request the ring cannot run (here: Write Zeroes on a device without `fallocate`, whose zeroing
/// takes long) runs on the blocking pool: the worker keeps serving another connection's reads and
/// writes while it is in progress, and the request completes afterwards with its data zeroed.
#[test]
fn a_slow_backend_operation_does_not_block_the_worker() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("slow.img");
    std::fs::File::create(&path).unwrap().set_len(8 << 20).unwrap();
    let gate = Arc::new((parking_lot::Mutex::new(false), parking_lot::Condvar::new()));
    let zeroed = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let backend = SlowZeroing {
        file: FileBackend::open(&path, 512).unwrap(),
        gate: gate.clone(),
        zeroed: zeroed.clone(),
    };
    let target = target_with(Arc::new(backend));
    let srv = server(&target, 1, |_| {});
    let (_adm, cntlid) = admin(srv.local_addr(), 0);
    let mut slow = io_queue(srv.local_addr(), 1, cntlid);
    let mut other = io_queue(srv.local_addr(), 2, cntlid);
    let data = pattern(64 * 1024, 7);
    assert_eq!(write(&mut slow, 0, &data), Status::SUCCESS);
    // Write Zeroes over the first 32 KiB: held at the gate.
    let wz = slow.submit(rw(0x08, 0, 64), None, 0).unwrap();
    // The other connection on the same worker is served meanwhile (reads and writes on the ring).
    for i in 0..16u64 {
        let d = pattern(4096, i as u8);
        assert_eq!(write(&mut other, 1024 + i * 8, &d), Status::SUCCESS);
        assert_eq!(read(&mut other, 1024 + i * 8, 4096), d);
    }
    assert_eq!(
        zeroed.load(std::sync::atomic::Ordering::SeqCst),
        0,
        "the other connection was served while the Write Zeroes was still held"
    );
    *gate.0.lock() = true;
    gate.1.notify_all();
    let c = slow.next_completion().unwrap();
    assert_eq!((c.cqe.cid.get(), c.status()), (wz, Status::SUCCESS));
    assert_eq!(zeroed.load(std::sync::atomic::Ordering::SeqCst), 1);
    assert!(read(&mut slow, 0, 32 * 1024).iter().all(|&b| b == 0));
    assert_eq!(read(&mut slow, 64, 32 * 1024), data[32 * 1024..]);
    drop((slow, other));
    srv.shutdown().unwrap();
}

/// A source of one lazily activated subsystem whose activation waits at a gate (at most 60 s), like
/// a catalog read and a device that takes its time to appear.
struct SlowSource {
    gate: Arc<(parking_lot::Mutex<bool>, parking_lot::Condvar)>,
    waiting: Arc<std::sync::atomic::AtomicBool>,
    activated: Arc<std::sync::atomic::AtomicUsize>,
}

const LAZY_NQN: &str = "nqn.2026-01.io.xatastor:server-io-lazy";

impl nvmeof_target::SubsystemSource for SlowSource {
    fn activate(&self, subnqn: &str) -> Option<(SubsystemConfig, Vec<NamespaceConfig>)> {
        if subnqn != LAZY_NQN {
            return None;
        }
        let (open, cv) = &*self.gate;
        let mut open = open.lock();
        self.waiting.store(true, std::sync::atomic::Ordering::SeqCst);
        if !*open {
            let _ = cv.wait_for(&mut open, Duration::from_secs(60));
        }
        drop(open);
        self.activated.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let mut sc = SubsystemConfig::new(LAZY_NQN, "LAZY1");
        sc.access = HostAccess::AllowAny;
        let ns = NamespaceConfig::derived(LAZY_NQN, 1, Arc::new(MemoryBackend::new(8 << 20, 512)));
        Some((sc, vec![ns]))
    }
    fn discovery_len(&self, _hostnqn: &str) -> u64 {
        1
    }
    fn discovery_range(&self, _hostnqn: &str, first: u64, count: usize) -> Vec<String> {
        if first == 0 && count > 0 {
            vec![LAZY_NQN.to_owned()]
        } else {
            Vec::new()
        }
    }
    fn discovery_lists(&self, _hostnqn: &str, subnqn: &str) -> bool {
        subnqn == LAZY_NQN
    }
}

/// A Connect to a volume that is not loaded waits for its activation on the blocking pool, not on the
/// worker: another host on the same worker keeps doing I/O meanwhile, and the Connect succeeds once
/// the activation is done (it runs once).
#[test]
fn a_slow_activation_does_not_block_the_worker() {
    let target = target_with(Arc::new(MemoryBackend::new(8 << 20, 512)));
    let gate = Arc::new((parking_lot::Mutex::new(false), parking_lot::Condvar::new()));
    let activated = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let waiting = Arc::new(std::sync::atomic::AtomicBool::new(false));
    target.set_source(Arc::new(SlowSource {
        gate: gate.clone(),
        waiting: waiting.clone(),
        activated: activated.clone(),
    }));
    let srv = server(&target, 1, |_| {});
    let addr = srv.local_addr();
    let (_adm, cntlid) = admin(addr, 0);
    let mut q = io_queue(addr, 1, cntlid);
    let lazy = std::thread::spawn(move || common::connect_admin(addr, LAZY_NQN, HOSTNQN, 0));
    // The lazy Connect is waiting (its activation has not finished) ...
    common::eventually("the activation started", || waiting.load(std::sync::atomic::Ordering::SeqCst));
    for i in 0..16u64 {
        let d = pattern(4096, i as u8);
        assert_eq!(write(&mut q, i * 8, &d), Status::SUCCESS);
        assert_eq!(read(&mut q, i * 8, 4096), d);
    }
    assert_eq!(
        activated.load(std::sync::atomic::Ordering::SeqCst),
        0,
        "the other host was served while the activation was still waiting"
    );
    *gate.0.lock() = true;
    gate.1.notify_all();
    let (mut lazy_admin, lazy_cntlid) = lazy.join().unwrap().expect("the lazy Connect succeeds");
    assert_eq!(activated.load(std::sync::atomic::Ordering::SeqCst), 1);
    common::set_queue_count(&mut lazy_admin, 1);
    let mut lq = common::connect_io(addr, LAZY_NQN, HOSTNQN, 1, lazy_cntlid);
    let d = pattern(4096, 99);
    assert_eq!(write(&mut lq, 0, &d), Status::SUCCESS);
    assert_eq!(read(&mut lq, 0, 4096), d);
    drop((q, lq, lazy_admin));
    srv.shutdown().unwrap();
}

/// Records the order in which reads reach the backend; the first read waits at a gate (at most 30 s)
/// so that everything the hosts send meanwhile is waiting in the worker's sockets at once.
#[derive(Debug)]
struct Recording {
    inner: MemoryBackend,
    order: parking_lot::Mutex<Vec<u64>>,
    gate: Arc<(parking_lot::Mutex<bool>, parking_lot::Condvar)>,
}

impl BlockBackend for Recording {
    fn size_bytes(&self) -> u64 {
        self.inner.size_bytes()
    }
    fn info(&self) -> BackendInfo {
        self.inner.info()
    }
    fn submit(&self, op: IoOp, completer: Completer) -> Submitted {
        if let IoOp::Read { offset, .. } = op {
            let first = {
                let mut order = self.order.lock();
                order.push(offset);
                order.len() == 1
            };
            if first {
                let (open, cv) = &*self.gate;
                let mut open = open.lock();
                if !*open {
                    let _ = cv.wait_for(&mut open, Duration::from_secs(30));
                }
            }
        }
        self.inner.submit(op, completer)
    }
}

/// One connection with 128 reads in flight does not make another connection's read wait for all of
/// them: a connection decodes a bounded number of commands per loop turn, so the other read reaches
/// the backend within the next round (here: among the first 70 of 129, not last).
#[test]
fn a_deep_queue_does_not_make_another_connection_wait_for_all_of_it() {
    let gate = Arc::new((parking_lot::Mutex::new(false), parking_lot::Condvar::new()));
    let backend = Arc::new(Recording {
        inner: MemoryBackend::new(8 << 20, 512),
        order: parking_lot::Mutex::new(Vec::new()),
        gate: gate.clone(),
    });
    let target = target_with(backend.clone());
    let srv = server(&target, 1, |_| {});
    let (_adm, cntlid) = admin(srv.local_addr(), 0);
    let mut deep = io_queue(srv.local_addr(), 1, cntlid);
    let mut other = io_queue(srv.local_addr(), 2, cntlid);
    // The first read blocks the worker at the gate; the other 127 and the other connection's read
    // arrive meanwhile.
    deep.submit(rw(0x02, 0, 8), None, 4096).unwrap();
    common::eventually("the first read reached the backend", || backend.order.lock().len() == 1);
    for i in 1..128u64 {
        deep.submit(rw(0x02, i * 8, 8), None, 4096).unwrap();
    }
    other.submit(rw(0x02, 8192, 8), None, 4096).unwrap();
    // Give the bytes time to land in the sockets (the worker is blocked; no timing is asserted).
    std::thread::sleep(Duration::from_millis(200));
    *gate.0.lock() = true;
    gate.1.notify_all();
    for _ in 0..128 {
        assert_eq!(deep.next_completion().unwrap().status(), Status::SUCCESS);
    }
    assert_eq!(other.next_completion().unwrap().status(), Status::SUCCESS);
    let order = backend.order.lock().clone();
    assert_eq!(order.len(), 129);
    let at = order.iter().position(|&o| o == 8192 * 512).unwrap();
    // While the other connection's input waits, the deep queue gets short rounds (8 PDUs).
    assert!(at < 20, "the other connection's read was #{} of 129 to reach the backend", at + 1);
    drop((deep, other));
    srv.shutdown().unwrap();
}

fn keep_alive(a: &mut Host) -> Status {
    let mut ka = Sqe::zeroed();
    ka.opcode = 0x18;
    a.command(ka, None, 0).unwrap().status()
}

/// An admin queue whose commands come far apart (an idle host's keep-alives) waits in the worker's
/// set of quiet queues, is still answered, and comes back to the ring when commands follow each
/// other closely; its I/O queue is never quiet. A quiet queue whose host goes away is freed.
#[test]
fn quiet_admin_queues_are_served_in_batches_and_come_back_when_busy() {
    let target = target_with(Arc::new(MemoryBackend::new(1 << 20, 512)));
    let srv = server(&target, 1, |c| c.admin_batch_window = Duration::from_millis(20));
    let (mut adm, cntlid) = admin(srv.local_addr(), 30_000);
    let mut q = io_queue(srv.local_addr(), 1, cntlid);
    assert_eq!(srv.worker_stats()[0].quiet_admin_queues, 0);
    // Keep-alives 300 ms apart: the queue is quiet after the first; each is answered.
    for _ in 0..3 {
        std::thread::sleep(Duration::from_millis(300));
        assert_eq!(keep_alive(&mut adm), Status::SUCCESS);
        // The I/O queue's commands, also far apart, stay on the ring.
        assert_eq!(write(&mut q, 0, &pattern(4096, 3)), Status::SUCCESS);
    }
    let w = srv.worker_stats()[0];
    assert_eq!(w.quiet_admin_queues, 1, "{w:?}");
    assert!(w.admin_batches >= 2 && w.admin_batched_receives >= 2, "{w:?}");
    assert_eq!(read(&mut q, 0, 4096), pattern(4096, 3));
    // Commands back to back: the queue leaves the quiet set and is served at once again.
    for _ in 0..4 {
        assert_eq!(keep_alive(&mut adm), Status::SUCCESS);
    }
    assert_eq!(srv.worker_stats()[0].quiet_admin_queues, 0);
    let batched = srv.worker_stats()[0].admin_batched_receives;
    for _ in 0..20 {
        assert_eq!(keep_alive(&mut adm), Status::SUCCESS);
    }
    assert_eq!(srv.worker_stats()[0].admin_batched_receives, batched, "busy queue still batched");
    // Quiet again, then the host goes away: the connections are freed.
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(keep_alive(&mut adm), Status::SUCCESS);
    assert_eq!(srv.worker_stats()[0].quiet_admin_queues, 1);
    drop(adm);
    drop(q);
    eventually("connections freed", || {
        let w = srv.worker_stats()[0];
        w.connections == 0 && w.quiet_admin_queues == 0
    });
    eventually("controller freed", || target.controllers().is_empty());
    srv.shutdown().unwrap();
}

/// Many quiet admin queues with input in the same window (more than the worker has receive
/// buffers) are all answered; a zero window keeps every queue on the ring.
#[test]
fn a_window_with_more_quiet_queues_than_receive_buffers_answers_them_all() {
    let target = target_with(Arc::new(MemoryBackend::new(1 << 20, 512)));
    target.set_host_access(NQN, HostAccess::AllowAny).unwrap();
    let srv = server(&target, 1, |c| {
        c.admin_batch_window = Duration::from_millis(50);
        c.recv_buffers = 16;
        c.recv_buffer_bytes = 4096;
    });
    let mut admins: Vec<Host> = (0..100).map(|_| admin(srv.local_addr(), 30_000).0).collect();
    std::thread::sleep(Duration::from_millis(200));
    for a in &mut admins {
        assert_eq!(keep_alive(a), Status::SUCCESS);
    }
    assert_eq!(srv.worker_stats()[0].quiet_admin_queues, 100);
    std::thread::sleep(Duration::from_millis(200));
    // All at once: submitted before any answer is read.
    for a in &mut admins {
        let mut ka = Sqe::zeroed();
        ka.opcode = 0x18;
        a.submit(ka, None, 0).unwrap();
    }
    for a in &mut admins {
        assert_eq!(a.next_completion().unwrap().status(), Status::SUCCESS);
    }
    // The second round came through the quiet set (the first made the queues quiet).
    let w = srv.worker_stats()[0];
    assert!(w.admin_batches >= 1 && w.admin_batched_receives >= 100, "{w:?}");
    srv.shutdown().unwrap();

    let srv = server(&target, 1, |c| c.admin_batch_window = Duration::ZERO);
    let (mut adm, _) = admin(srv.local_addr(), 30_000);
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(keep_alive(&mut adm), Status::SUCCESS);
    let w = srv.worker_stats()[0];
    assert_eq!((w.quiet_admin_queues, w.admin_batches), (0, 0), "{w:?}");
    srv.shutdown().unwrap();
}

/// A file volume in which every sector holds its own number (a read of the wrong block shows), and
/// the expected bytes of a 4 KiB read at `slba`.
fn numbered_volume(dir: &std::path::Path, name: &str) -> (Arc<FileBackend>, Vec<u8>) {
    let path = dir.join(name);
    let data: Vec<u8> = (0..(16u32 << 11)).flat_map(|k| k.to_le_bytes().repeat(128)).collect();
    std::fs::write(&path, &data).unwrap();
    (Arc::new(FileBackend::open(&path, 512).unwrap()), data)
}

/// 64 reads in flight on `deep` (checked), and meanwhile one read on `other` if given.
fn deep_round(deep: &mut Host, other: Option<&mut Host>, r: u64, data: &[u8]) {
    let expect = |slba: u64| &data[(slba * 512) as usize..(slba * 512) as usize + 4096];
    let mut cids = std::collections::HashMap::new();
    for i in 0..64 {
        let slba = ((r * 64 + i) * 8) % (16 << 11);
        cids.insert(deep.submit(rw(0x02, slba, 8), None, 4096).unwrap(), slba);
    }
    if let Some(o) = other {
        let slba = (r * 8 + 4096) % (16 << 11);
        assert_eq!(read(o, slba, 4096), expect(slba));
    }
    for _ in 0..64 {
        let c = deep.next_completion().unwrap();
        assert_eq!(c.status(), Status::SUCCESS);
        let slba = cids.remove(&c.cqe.cid.get()).expect("a completion of a command in flight");
        assert_eq!(c.data.to_bytes().as_ref(), expect(slba), "block {slba}");
    }
}

/// A deep queue's operations on a file volume do not all go to the ring ahead of another tenant's:
/// while a connection to another volume has operations there, a connection keeps its share on the
/// ring and the rest wait their turn; alone it is not limited, and another queue of its own volume
/// (a host's second I/O queue) does not limit it either. The data are right either way.
#[test]
fn a_deep_queue_shares_the_ring_with_another_volume_but_not_with_its_own() {
    const OTHER_NQN: &str = "nqn.2026-01.io.xatastor:server-io-other";
    let dir = tempfile::tempdir().unwrap();
    let (backend, data) = numbered_volume(dir.path(), "shared.img");
    let (other_backend, _) = numbered_volume(dir.path(), "other.img");
    let target = target_with(backend);
    let mut sc = SubsystemConfig::new(OTHER_NQN, "SIO2");
    sc.access = HostAccess::DenyAllExcept;
    sc.allowed_hosts.push(HOSTNQN.into());
    target.add_subsystem(sc).unwrap();
    target.add_namespace(OTHER_NQN, NamespaceConfig::derived(OTHER_NQN, 1, other_backend)).unwrap();
    let srv = server(&target, 1, |_| {});
    let waits = || srv.worker_stats()[0].disk_share_waits;
    let (_adm, cntlid) = admin(srv.local_addr(), 0);
    let mut deep = io_queue(srv.local_addr(), 1, cntlid);
    for r in 0..20 {
        deep_round(&mut deep, None, r, &data);
    }
    assert_eq!(waits(), 0, "a connection alone is not limited");
    // A second queue of the same volume, with one read at a time during each round: the same
    // pattern that, with another volume's queue below, holds the deep queue to its share.
    let mut sibling = io_queue(srv.local_addr(), 2, cntlid);
    for r in 20..420 {
        deep_round(&mut deep, Some(&mut sibling), r, &data);
    }
    assert_eq!(waits(), 0, "queues of one volume were held to a share against each other");
    // A queue of another volume.
    let (mut other_adm, other_cntlid) =
        common::connect_admin(srv.local_addr(), OTHER_NQN, HOSTNQN, 0).unwrap();
    common::set_queue_count(&mut other_adm, 4);
    let mut other = common::connect_io(srv.local_addr(), OTHER_NQN, HOSTNQN, 1, other_cntlid);
    for r in 420..820 {
        deep_round(&mut deep, Some(&mut other), r, &data);
        if waits() > 0 {
            break;
        }
    }
    assert!(waits() > 0, "the deep queue was never held to its share");
    // Alone again: after the contention window, all 64 go to the ring.
    std::thread::sleep(Duration::from_millis(50));
    let before = waits();
    deep_round(&mut deep, None, 900, &data);
    assert_eq!(waits(), before);
    srv.shutdown().unwrap();
}

/// A host stream that sends the first 4 bytes of every H2CData PDU alone and the rest 50 ms later,
/// so that one of the server's receives ends inside the PDU's common header.
struct SplitHeaders(std::net::TcpStream);

impl std::io::Read for SplitHeaders {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.0.read(buf)
    }
}

impl std::io::Write for SplitHeaders {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        // `BlockingHost::flush` writes each PDU's header as one chunk: H2CData is type 0x06.
        if buf.len() >= 24 && buf[0] == 0x06 {
            self.0.write_all(&buf[..4])?;
            self.0.flush()?;
            std::thread::sleep(Duration::from_millis(50));
            self.0.write_all(&buf[4..])?;
            return Ok(buf.len());
        }
        self.0.write(buf)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.0.flush()
    }
}

/// A long PDU whose first bytes arrived alone (waiting in the reassembly buffer for the rest of its
/// header) continues as slices of the receive buffers: only the few header bytes are copied, not
/// the 128 KiB behind them.
#[test]
fn a_long_pdu_split_inside_its_header_is_not_copied_whole() {
    let target = target_with(Arc::new(MemoryBackend::new(16 << 20, 512)));
    let srv = server(&target, 1, |_| {});
    let (_adm, cntlid) = admin(srv.local_addr(), 0);
    let mut q = BlockingHost::new(SplitHeaders(tcp(srv.local_addr())), HostOptions::default()).unwrap();
    let (sqe, data) = host::connect_command(1, 128, 0, cntlid, [7; 16], NQN, HOSTNQN);
    assert_eq!(q.command(sqe, Some(data), 0).unwrap().status(), Status::SUCCESS);
    let data = pattern(128 * 1024, 9);
    let before = srv.worker_stats()[0].received_bytes_copied;
    for round in 0..3u64 {
        let c = q.command(rw(0x01, 256 * round, 256), Some(Payload::from(data.clone())), 0).unwrap();
        assert_eq!(c.status(), Status::SUCCESS);
    }
    let copied = srv.worker_stats()[0].received_bytes_copied - before;
    assert!(
        copied < 3 * 4096,
        "{copied} bytes of three 128 KiB writes were copied out of the receive buffers"
    );
    let mut plain = io_queue(srv.local_addr(), 2, cntlid);
    for round in 0..3u64 {
        assert_eq!(read(&mut plain, 256 * round, 128 * 1024), data);
    }
    drop(q);
    drop(plain);
    srv.shutdown().unwrap();
}

/// A response of one command goes out with a system call of its own when it is the worker's only
/// output; when the socket takes only part of it, or nothing (the host reads nothing for a while
/// and its receive window is small), the rest goes through the ring, and everything arrives whole
/// and in order.
#[test]
fn responses_the_socket_takes_in_part_arrive_whole_and_in_order() {
    let target = target_with(Arc::new(MemoryBackend::new(64 << 20, 512)));
    let srv = server(&target, 1, |_| {});
    let (_adm, cntlid) = admin(srv.local_addr(), 0);
    // One data PDU and the completion per read.
    let len = 128 * 1024;
    let blocks = (len / 512) as u64;
    let reads = 24u64;
    {
        let mut q = io_queue(srv.local_addr(), 1, cntlid);
        for i in 0..reads {
            assert_eq!(write(&mut q, i * blocks, &pattern(len, i as u8)), Status::SUCCESS);
        }
    }
    // A host socket with a small receive buffer (set before connecting, so the window stays small).
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    socket.connect(&srv.local_addr().into()).unwrap();
    let mut q = common::connect_io_over(common::tune(socket.into()), NQN, HOSTNQN, 1, cntlid);
    for round in 0..2 {
        // 3 MiB of responses and nothing read for a while: the socket fills part-way through one.
        // The reads come one at a time, soon after each other (the worker polls for the next one),
        // so that each response is the worker's only output.
        for i in 0..reads {
            q.submit(rw(0x02, i * blocks, blocks as u32), None, len as u32).unwrap();
            std::thread::sleep(Duration::from_micros(100));
        }
        std::thread::sleep(Duration::from_millis(100));
        let mut seen = Vec::new();
        for _ in 0..reads {
            let c = q.next_completion().unwrap();
            assert_eq!(c.status(), Status::SUCCESS, "round {round}");
            let i = c.data.to_bytes().first().map_or(u64::MAX, |&b| u64::from(b)); // the pattern's seed
            assert!(c.data.to_bytes() == pattern(len, i as u8), "round {round}: read {i} arrived changed");
            seen.push(i);
        }
        seen.sort_unstable();
        assert_eq!(seen, (0..reads).collect::<Vec<_>>(), "round {round}: every read answered once");
        // Queue depth 1 afterwards.
        assert_eq!(read(&mut q, 5 * blocks, len), pattern(len, 5), "round {round}: the next response");
    }
    drop(q);
    srv.shutdown().unwrap();
}
