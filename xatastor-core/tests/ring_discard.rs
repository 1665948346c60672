//! Deallocation on the worker's ring for block devices that declare their discard granularity (as a
//! zvol does): the block-device discard command over whole granularity blocks, zero writes over the
//! partial head and tail — through the io_uring server and the in-tree NVMe/TCP host, on a loop
//! device. And the fallback: a descriptor on which the kernel refuses the command has its
//! deallocations done by the backend on the blocking pool, with the same result.
//!
//! The loop-device tests need root and `losetup` (util-linux); without them they fail with a message
//! saying so — they are never skipped.

use std::net::SocketAddr;
use std::os::fd::AsFd;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

use nvmeof_proto::nvme::{Sqe, Status};
use nvmeof_proto::Payload;
use nvmeof_target::{
    BackendInfo, BlockBackend, Completer, FileBackend, HostAccess, IoOp, NamespaceConfig, RawDevice,
    Submitted, SubsystemConfig, Target, TargetConfig,
};
use xatastor_core::{Server, ServerConfig, WorkerStats};

mod common;
use common::{rw, Host};

const NQN: &str = "nqn.2026-01.io.xatastor:ring-discard";
const HOSTNQN: &str = "nqn.2014-08.org.nvmexpress:uuid:ring-discard-host";

/// A loop device over a sparse file, detached on drop.
struct LoopDevice {
    dev: PathBuf,
    backing: PathBuf,
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
        Self { dev, backing, _dir: dir }
    }

    /// 512-byte blocks the backing file has allocated.
    fn backing_blocks(&self) -> u64 {
        std::fs::metadata(&self.backing).unwrap().blocks()
    }

    /// The device's `queue/discard_granularity`.
    fn discard_granularity(&self) -> u64 {
        let name = self.dev.file_name().unwrap().to_string_lossy().into_owned();
        let p = format!("/sys/block/{name}/queue/discard_granularity");
        let g: u64 = std::fs::read_to_string(&p).unwrap().trim().parse().unwrap();
        assert!(g > 512 && g.is_power_of_two(), "{p}: {g} (a loop device discards in file-system blocks)");
        g
    }
}

impl Drop for LoopDevice {
    fn drop(&mut self) {
        let _ = Command::new("losetup").arg("-d").arg(&self.dev).status();
    }
}

/// A device opened `O_DIRECT` for the ring, declaring a discard granularity and no `fallocate`
/// modes (as a zvol does); the backend's own path (the blocking pool) is a [`FileBackend`] on the
/// same path.
#[derive(Debug)]
struct Declared {
    direct: std::fs::File,
    pool: FileBackend,
    granularity: u64,
}

impl Declared {
    fn open(path: &Path, granularity: u64) -> Self {
        let direct = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_DIRECT)
            .open(path)
            .expect("O_DIRECT open");
        Self { direct, pool: FileBackend::open(path, 512).unwrap(), granularity }
    }
}

impl BlockBackend for Declared {
    fn size_bytes(&self) -> u64 {
        self.pool.size_bytes()
    }
    fn info(&self) -> BackendInfo {
        self.pool.info()
    }
    fn submit(&self, op: IoOp, completer: Completer) -> Submitted {
        self.pool.submit(op, completer)
    }
    fn raw_device(&self) -> Option<RawDevice<'_>> {
        Some(RawDevice::new(self.direct.as_fd()).direct(512).discard_granularity(Some(self.granularity)))
    }
}

/// A one-worker server exporting `backend` and an I/O queue connected to it.
fn serve(backend: Arc<dyn BlockBackend>) -> (Server, Host, Host) {
    let target = Target::new(TargetConfig::default());
    let mut sc = SubsystemConfig::new(NQN, "RDC1");
    sc.access = HostAccess::DenyAllExcept;
    sc.allowed_hosts.push(HOSTNQN.into());
    target.add_subsystem(sc).unwrap();
    target.add_namespace(NQN, NamespaceConfig::derived(NQN, 1, backend)).unwrap();
    let mut config = ServerConfig::new("127.0.0.1:0".parse().unwrap());
    config.workers = 1;
    let srv = Server::start(target, config).unwrap();
    let addr: SocketAddr = srv.local_addr();
    let (mut adm, cntlid) = common::connect_admin(addr, NQN, HOSTNQN, 0).unwrap();
    common::set_queue_count(&mut adm, 1);
    let q = common::connect_io(addr, NQN, HOSTNQN, 1, cntlid);
    (srv, adm, q)
}

fn stats(srv: &Server) -> WorkerStats {
    srv.worker_stats()[0]
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len).map(|i| (i as u8).wrapping_mul(29).wrapping_add(seed) | 1).collect()
}

fn write(q: &mut Host, slba: u64, data: &[u8]) {
    let c = q.command(rw(0x01, slba, (data.len() / 512) as u32), Some(Payload::from(data.to_vec())), 0);
    assert_eq!(c.unwrap().status(), Status::SUCCESS, "write at LBA {slba}");
}

fn read(q: &mut Host, slba: u64, blocks: u32) -> Vec<u8> {
    let c = q.command(rw(0x02, slba, blocks), None, blocks * 512).unwrap();
    assert_eq!(c.status(), Status::SUCCESS, "read at LBA {slba}");
    c.data.to_bytes().to_vec()
}

/// Dataset Management, Deallocate, of `(slba, blocks)` ranges.
fn deallocate(q: &mut Host, ranges: &[(u64, u32)]) -> Status {
    let mut list = vec![0u8; 4096];
    for (i, &(slba, nlb)) in ranges.iter().enumerate() {
        let r = &mut list[i * 16..i * 16 + 16];
        r[4..8].copy_from_slice(&nlb.to_le_bytes());
        r[8..16].copy_from_slice(&slba.to_le_bytes());
    }
    let mut dsm = Sqe::zeroed();
    dsm.opcode = 0x09;
    dsm.nsid.set(1);
    dsm.cdw10.set(ranges.len() as u32 - 1);
    dsm.cdw11.set(1 << 2); // AD
    q.command(dsm, Some(Payload::from(list)), 0).unwrap().status()
}

/// Write Zeroes with DEAC of `blocks` at `slba`.
fn write_zeroes_deac(q: &mut Host, slba: u64, blocks: u32) -> Status {
    let mut wz = rw(0x08, slba, blocks);
    wz.cdw12.set(wz.cdw12.get() | (1 << 25));
    q.command(wz, None, 0).unwrap().status()
}

/// Reads `[from, to)` (LBAs) back and checks that `zeroed` (LBAs, inside it) reads as zeros and the
/// rest as `data`, which was written at `from`.
fn check(q: &mut Host, from: u64, data: &[u8], zeroed: std::ops::Range<u64>, what: &str) {
    let back = read(q, from, (data.len() / 512) as u32);
    let (s, e) = (((zeroed.start - from) * 512) as usize, ((zeroed.end - from) * 512) as usize);
    assert_eq!(back[..s], data[..s], "{what}: the data before the range is intact");
    assert!(back[s..e].iter().all(|&b| b == 0), "{what}: the whole range reads as zeros");
    assert_eq!(back[e..], data[e..], "{what}: the data after the range is intact");
}

#[test]
fn deallocate_and_write_zeroes_run_as_ring_discards_on_a_loop_device() {
    let lo = LoopDevice::new(16 << 20);
    let g = lo.discard_granularity();
    let gb = g / 512; // LBAs per granularity block
    let backend = Arc::new(Declared::open(&lo.dev, g));
    let (srv, _adm, mut q) = serve(backend);

    // Deallocate one range that starts 3 LBAs into a granularity block and ends 5 LBAs into
    // another, with whole blocks in between.
    let data = pattern(64 * 4096, 1);
    write(&mut q, 0, &data);
    let (start, end) = (gb + 3, 9 * gb + 5);
    let allocated = lo.backing_blocks();
    let before = stats(&srv);
    assert_eq!(deallocate(&mut q, &[(start, (end - start) as u32)]), Status::SUCCESS);
    let after = stats(&srv);
    assert_eq!(after.ring_discards, before.ring_discards + 1, "the deallocation ran on the ring");
    assert_eq!(after.pool_requests, before.pool_requests, "nothing went to the blocking pool");
    assert_eq!(after.ring_refusals, 0);
    check(&mut q, 0, &data, start..end, "deallocate");
    // The whole blocks were really discarded: the loop device punched them out of its file.
    let freed = allocated.saturating_sub(lo.backing_blocks());
    assert!(freed >= 7 * gb, "7 whole blocks ({} LBAs) discarded, {freed} freed", 7 * gb);

    // Several ranges in one command, one of them inside a single granularity block (zeroed only),
    // one exactly aligned (discarded only).
    let base = 20 * gb;
    let data = pattern(16 * g as usize, 2);
    write(&mut q, base, &data);
    let before = stats(&srv);
    let ranges = [(base + 1, 2u32), (base + 2 * gb, 3 * gb as u32), (base + 6 * gb + 7, (4 * gb) as u32)];
    assert_eq!(deallocate(&mut q, &ranges), Status::SUCCESS);
    assert_eq!(stats(&srv).ring_discards, before.ring_discards + 1);
    let back = read(&mut q, base, (data.len() / 512) as u32);
    let mut want = data.clone();
    for &(slba, nlb) in &ranges {
        let s = ((slba - base) * 512) as usize;
        want[s..s + nlb as usize * 512].fill(0);
    }
    assert!(back == want, "three ranges read as zeros, everything around them is intact");

    // Write Zeroes with DEAC, again unaligned at both ends.
    let base = 40 * gb;
    let data = pattern(8 * g as usize, 3);
    write(&mut q, base, &data);
    let before = stats(&srv);
    let (start, end) = (base + gb - 1, base + 5 * gb + 1);
    assert_eq!(write_zeroes_deac(&mut q, start, (end - start) as u32), Status::SUCCESS);
    let after = stats(&srv);
    assert_eq!(after.ring_discards, before.ring_discards + 1, "write zeroes with DEAC ran on the ring");
    assert_eq!(after.pool_requests, before.pool_requests);
    check(&mut q, base, &data, start..end, "write zeroes");
    drop(q);
    srv.shutdown().unwrap();
}

#[test]
fn a_refused_discard_command_falls_back_to_the_pool() {
    // A regular file has no `uring_cmd`: the kernel refuses the discard command (EOPNOTSUPP), as a
    // kernel before 6.12 does for a block device.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("volume.img");
    std::fs::File::create(&path).and_then(|f| f.set_len(16 << 20)).unwrap();
    let g = 4096u64;
    let gb = g / 512;
    let (srv, _adm, mut q) = serve(Arc::new(Declared::open(&path, g)));

    let data = pattern(64 * 4096, 4);
    write(&mut q, 0, &data);
    let before = stats(&srv);
    let (start, end) = (gb + 3, 9 * gb + 5);
    assert_eq!(deallocate(&mut q, &[(start, (end - start) as u32)]), Status::SUCCESS);
    let after = stats(&srv);
    assert_eq!(after.ring_refusals, before.ring_refusals + 1, "the kernel refused the command");
    assert_eq!(after.pool_requests, before.pool_requests + 1, "the pool did the deallocation");
    assert_eq!(after.ring_discards, before.ring_discards, "no discard completed on the ring");
    check(&mut q, 0, &data, start..end, "deallocate");

    // Remembered: the next one goes to the pool without trying the ring.
    let (start, end) = (12 * gb + 1, 20 * gb + 2);
    assert_eq!(write_zeroes_deac(&mut q, start, (end - start) as u32), Status::SUCCESS);
    let last = stats(&srv);
    assert_eq!(last.ring_refusals, after.ring_refusals, "the ring was not tried again");
    assert_eq!(last.pool_requests, after.pool_requests + 1);
    let mut want = data.clone();
    want[(gb as usize + 3) * 512..(9 * gb as usize + 5) * 512].fill(0);
    want[(start * 512) as usize..(end * 512) as usize].fill(0);
    assert!(
        read(&mut q, 0, (data.len() / 512) as u32) == want,
        "both ranges read as zeros, the rest is intact"
    );
    drop(q);
    srv.shutdown().unwrap();
}
