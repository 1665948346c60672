//! Both drivers over real TCP on loopback — the blocking thread-per-connection one and the tokio one: a
//! host (the in-tree test initiator) connects an admin queue and two I/O queues to a memory volume and
//! to a file volume, writes through R2T and in-capsule paths, reads back, and disconnects.

use std::net::{TcpListener, TcpStream};
use std::sync::Arc;
use std::time::Duration;

use nvmeof_proto::nvme::fabrics::CNTLID_DYNAMIC;
use nvmeof_proto::nvme::registers::{offset, PropertyWidth};
use nvmeof_proto::nvme::{Sqe, Status};
use nvmeof_proto::{Digests, Payload};
use nvmeof_target::host::{self, BlockingHost, Completion, HostOptions};
use nvmeof_target::{
    BlockBackend, FileBackend, HostAccess, MemoryBackend, NamespaceConfig, SubsystemConfig, Target,
    TargetConfig,
};

const NQN: &str = "nqn.2026-01.io.xatastor:tcp-test";
const HOSTNQN: &str = "nqn.2014-08.org.nvmexpress:uuid:tcp-test-host";

/// The in-tree blocking host over TCP, panicking on errors (this is a test).
struct TcpHost(BlockingHost<TcpStream>);

impl TcpHost {
    fn connect(addr: std::net::SocketAddr, opts: HostOptions) -> Self {
        let stream = TcpStream::connect(addr).unwrap();
        stream.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        Self(BlockingHost::new(stream, opts).unwrap())
    }

    fn command(&mut self, sqe: Sqe, data: Option<Payload>, read_len: u32) -> Completion {
        self.0.command(sqe, data, read_len).unwrap()
    }
}

#[derive(Clone, Copy)]
enum Driver {
    Blocking,
    Tokio,
    /// The io_uring server of xatastor-core, two workers.
    IoUring,
}

fn serve(target: Target, driver: Driver) -> std::net::SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    match driver {
        Driver::Blocking => {
            std::thread::spawn(move || xatastor_examples::blocking::serve(listener, target, 1));
        }
        Driver::IoUring => {
            drop(listener);
            let mut config = xatastor_core::ServerConfig::new("127.0.0.1:0".parse().unwrap());
            config.workers = 2;
            let server = xatastor_core::Server::start(target, config).unwrap();
            let addr = server.local_addr();
            // Leaked on purpose: the server runs until the test process ends.
            std::mem::forget(server);
            return addr;
        }
        Driver::Tokio => {
            listener.set_nonblocking(true).unwrap();
            std::thread::spawn(move || {
                let rt = tokio::runtime::Builder::new_multi_thread()
                    .worker_threads(2)
                    .enable_all()
                    .build()
                    .unwrap();
                rt.block_on(async move {
                    let listener = tokio::net::TcpListener::from_std(listener).unwrap();
                    xatastor_examples::tokio_driver::serve(listener, target, 1).await
                })
            });
        }
    }
    addr
}

fn rw(opcode: u8, slba: u64, blocks: u32) -> Sqe {
    host::rw_command(opcode, 1, slba, blocks)
}

fn exercise(backend: Arc<dyn BlockBackend>, digests: Digests, driver: Driver) {
    let target = Target::new(TargetConfig::default());
    let mut sc = SubsystemConfig::new(NQN, "TCP1");
    sc.access = HostAccess::DenyAllExcept;
    sc.allowed_hosts.push(HOSTNQN.into());
    target.add_subsystem(sc).unwrap();
    target.add_namespace(NQN, NamespaceConfig::derived(NQN, 1, backend)).unwrap();
    let addr = serve(target.clone(), driver);
    let opts = HostOptions { digests, ..HostOptions::default() };

    let mut admin = TcpHost::connect(addr, opts);
    let (sqe, data) = host::connect_command(0, 32, 5000, CNTLID_DYNAMIC, [3; 16], NQN, HOSTNQN);
    let c = admin.command(sqe, Some(data), 0);
    assert_eq!(c.status(), Status::SUCCESS);
    let cntlid = c.cqe.dw0.get() as u16;
    let c = admin.command(host::property_set(offset::CC, PropertyWidth::Four, 0x0046_0001), None, 0);
    assert_eq!(c.status(), Status::SUCCESS);
    let mut nq = Sqe::zeroed();
    nq.opcode = 0x09;
    nq.cdw10.set(0x07);
    nq.cdw11.set(0x0001_0001);
    assert_eq!(admin.command(nq, None, 0).status(), Status::SUCCESS);

    let mut queues: Vec<TcpHost> = (1..=2)
        .map(|qid| {
            let mut q = TcpHost::connect(addr, opts);
            let (sqe, data) = host::connect_command(qid, 128, 0, cntlid, [3; 16], NQN, HOSTNQN);
            assert_eq!(q.command(sqe, Some(data), 0).status(), Status::SUCCESS);
            q
        })
        .collect();
    let big: Vec<u8> = (0..256 * 1024u32).map(|i| (i % 241) as u8).collect();
    assert_eq!(
        queues[0].command(rw(0x01, 0, 512), Some(Payload::from(big.clone())), 0).status(),
        Status::SUCCESS
    );
    let small = vec![0x77u8; 2048];
    assert_eq!(
        queues[1].command(rw(0x01, 600, 4), Some(Payload::from(small.clone())), 0).status(),
        Status::SUCCESS
    );
    let mut flush = Sqe::zeroed();
    flush.nsid.set(1);
    assert_eq!(queues[1].command(flush, None, 0).status(), Status::SUCCESS);
    let r = queues[1].command(rw(0x02, 0, 512), None, 256 * 1024);
    assert_eq!(r.data, Payload::from(big));
    let r = queues[0].command(rw(0x02, 600, 4), None, 2048);
    assert_eq!(r.data, Payload::from(small));
    assert_eq!(target.controllers()[0].io_queues, 2);

    // Linux-style teardown: I/O sockets closed, then shutdown through CC, then the admin socket.
    drop(queues);
    let c = admin.command(host::property_set(offset::CC, PropertyWidth::Four, 0x0046_4001), None, 0);
    assert_eq!(c.status(), Status::SUCCESS);
    let mut shst = 0;
    for _ in 0..100 {
        let c = admin.command(host::property_get(offset::CSTS, PropertyWidth::Four), None, 0);
        shst = (c.cqe.dw0.get() >> 2) & 3;
        if shst == 2 {
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(shst, 2, "shutdown completes");
    drop(admin);
    for _ in 0..200 {
        if target.controllers().is_empty() {
            return;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    panic!("controller not freed after the admin socket closed");
}

#[test]
fn blocking_driver_memory_volume() {
    exercise(Arc::new(MemoryBackend::new(16 << 20, 512)), Digests::NONE, Driver::Blocking);
}

#[test]
fn blocking_driver_file_volume_with_digests() {
    let dir = tempfile::tempdir().unwrap();
    let backend = FileBackend::create(dir.path().join("vol.img"), 16 << 20, 512).unwrap();
    exercise(Arc::new(backend), Digests::BOTH, Driver::Blocking);
}

#[test]
fn tokio_driver_memory_volume_with_digests() {
    exercise(Arc::new(MemoryBackend::new(16 << 20, 512)), Digests::BOTH, Driver::Tokio);
}

#[test]
fn tokio_driver_file_volume() {
    let dir = tempfile::tempdir().unwrap();
    let backend = FileBackend::create(dir.path().join("vol.img"), 16 << 20, 512).unwrap();
    exercise(Arc::new(backend), Digests::NONE, Driver::Tokio);
}

#[test]
fn io_uring_server_memory_volume() {
    exercise(Arc::new(MemoryBackend::new(16 << 20, 512)), Digests::NONE, Driver::IoUring);
}

#[test]
fn io_uring_server_file_volume_with_digests() {
    let dir = tempfile::tempdir().unwrap();
    let backend = FileBackend::create(dir.path().join("vol.img"), 16 << 20, 512).unwrap();
    exercise(Arc::new(backend), Digests::BOTH, Driver::IoUring);
}
