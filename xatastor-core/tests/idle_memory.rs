//! What an idle connected queue costs the server: heap bytes held per connection once a burst of
//! large reads and writes is over. Receive buffers come from the worker's pool, not from the
//! connection, and a worker that goes idle makes its quiet connections give back what the burst made
//! them hold (reassembly buffer, send vectors, the engine's tables), so what stays is the queue's and
//! its controller's fixed state. Measured: about 2 KiB per connection (8 controllers of 8 I/O queues
//! each; the figure also carries the worker's own tables divided among them); the design goal, 4 KiB,
//! is what this test asserts.
//!
//! The server runs in this process under a counting allocator; the hosts run in a child process (this
//! test binary again, the ignored `idle_memory_client` test), so every byte counted is the server's.

mod common;

use std::alloc::{GlobalAlloc, Layout, System};
use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicIsize, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use nvmeof_proto::Payload;
use nvmeof_target::{
    BackendInfo, BlockBackend, Completer, HostAccess, IoOp, IoOutput, NamespaceConfig, Submitted,
    SubsystemConfig, Target, TargetConfig,
};
use xatastor_core::{Server, ServerConfig};

struct Counting;

static LIVE: AtomicIsize = AtomicIsize::new(0);

// SAFETY: forwards to the system allocator unchanged; only counts bytes.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LIVE.fetch_add(layout.size() as isize, Ordering::Relaxed);
        // SAFETY: the caller's contract for `alloc` is passed on.
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        LIVE.fetch_add(layout.size() as isize, Ordering::Relaxed);
        // SAFETY: as in `alloc`.
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE.fetch_sub(layout.size() as isize, Ordering::Relaxed);
        // SAFETY: as in `alloc`.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        LIVE.fetch_add(new_size as isize - layout.size() as isize, Ordering::Relaxed);
        // SAFETY: as in `alloc`.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

const NQN: &str = "nqn.2026-01.io.xatastor:idle-memory";
const HOSTNQN: &str = "nqn.2014-08.org.nvmexpress:uuid:00000000-0000-0000-0000-00000000abcd";
const CONTROLLERS: usize = 8;
const IO_QUEUES: u16 = 8;

/// Reads zeros, forgets writes: holds no data, so what the test counts is the queues' memory.
#[derive(Debug)]
struct Null;

static ZEROS: [u8; 128 * 1024] = [0; 128 * 1024];

impl BlockBackend for Null {
    fn size_bytes(&self) -> u64 {
        1 << 30
    }
    fn info(&self) -> BackendInfo {
        MemoryInfo::info()
    }
    fn submit(&self, op: IoOp, completer: Completer) -> Submitted {
        drop(completer);
        Submitted::Done(Ok(match op {
            IoOp::Read { len, .. } => IoOutput::Data(Payload::from(Bytes::from_static(
                ZEROS.get(..len as usize).unwrap_or_default(),
            ))),
            _ => IoOutput::Done,
        }))
    }
}

/// A memory backend's Identify facts, for the null backend.
struct MemoryInfo;

impl MemoryInfo {
    fn info() -> BackendInfo {
        nvmeof_target::MemoryBackend::new(4096, 512).info()
    }
}

#[test]
fn an_idle_queue_after_a_burst_holds_at_most_4_kib() {
    let target = Target::new(TargetConfig::default());
    target
        .add_subsystem(SubsystemConfig { access: HostAccess::AllowAny, ..SubsystemConfig::new(NQN, "IDLE") })
        .unwrap();
    target.add_namespace(NQN, NamespaceConfig::derived(NQN, 1, Arc::new(Null))).unwrap();
    let mut config = ServerConfig::new("127.0.0.1:0".parse().unwrap());
    config.workers = 1;
    let server = Server::start(target.clone(), config).unwrap();
    // Warm-up: the worker's buffers and tables reach their size with one connection.
    let warm = common::connect_admin(server.local_addr(), NQN, HOSTNQN, 0).unwrap();
    drop(warm);
    common::eventually("warm-up connection released", || server.worker_stats()[0].connections == 0);
    let before = LIVE.load(Ordering::Relaxed);

    let mut child = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "idle_memory_client", "--ignored", "--nocapture", "--test-threads", "1"])
        .env("IDLE_MEMORY_ADDR", server.local_addr().to_string())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let idle = lines.by_ref().map_while(Result::ok).any(|l| l.contains("QUEUES-IDLE"));
    assert!(idle, "the client did not get its queues idle");
    let connections = CONTROLLERS * (1 + usize::from(IO_QUEUES));
    common::eventually("all connections up", || server.worker_stats()[0].connections == connections);
    // Let the worker go to sleep (an idle worker gives its queues' spare memory back then).
    std::thread::sleep(std::time::Duration::from_millis(300));
    let after = LIVE.load(Ordering::Relaxed);
    let per = (after - before) / connections as isize;
    println!("heap held per idle connection after a burst: {per} bytes ({connections} connections)");
    child.stdin.take().unwrap().write_all(b"done\n").unwrap();
    assert!(child.wait().unwrap().success());
    assert!(per <= 4 * 1024, "{per} bytes per idle connection (goal: at most 4 KiB)");
    server.shutdown().unwrap();
}

/// The hosts of the test above (run by it as a child process).
#[test]
#[ignore = "run by an_idle_queue_after_a_burst_holds_at_most_4_kib"]
fn idle_memory_client() {
    let Ok(addr) = std::env::var("IDLE_MEMORY_ADDR") else {
        panic!("run by an_idle_queue_after_a_burst_holds_at_most_4_kib, not alone")
    };
    let addr = addr.parse().unwrap();
    let mut hosts = Vec::new();
    for _ in 0..CONTROLLERS {
        let (mut admin, cntlid) = common::connect_admin(addr, NQN, HOSTNQN, 0).unwrap();
        common::set_queue_count(&mut admin, IO_QUEUES);
        let mut queues = Vec::new();
        for qid in 1..=IO_QUEUES {
            let mut q = common::connect_io(addr, NQN, HOSTNQN, qid, cntlid);
            // A burst: 32 writes and 32 reads of 128 KiB in flight at once.
            for i in 0..32u64 {
                let data = Payload::from(vec![7u8; 128 * 1024]);
                q.submit(common::rw(0x01, i * 256, 256), Some(data), 0).unwrap();
            }
            for _ in 0..32 {
                assert!(q.next_completion().unwrap().status().is_success());
            }
            for i in 0..32u64 {
                q.submit(common::rw(0x02, i * 256, 256), None, 128 * 1024).unwrap();
            }
            for _ in 0..32 {
                assert!(q.next_completion().unwrap().status().is_success());
            }
            queues.push(q);
        }
        hosts.push((admin, queues));
    }
    // Not `println!` (the harness may capture it); the line may follow the harness's "test ... ".
    let mut out = std::io::stdout().lock();
    out.write_all(b"QUEUES-IDLE\n").unwrap();
    out.flush().unwrap();
    drop(out);
    let mut line = String::new();
    std::io::stdin().read_line(&mut line).unwrap();
    drop(hosts);
}
