//! Heap allocations the io_uring server makes per I/O in steady state.
//!
//! A server (one worker) runs in this process with a counting global allocator; the load comes from
//! `nvmf-perf` in another process, so every allocation counted is the server's. After a warm-up, the
//! allocations made during a measuring window are divided by the commands the namespace completed in
//! it. Backends: the memory backend (what `xatastor-target --backend memory` serves) and an
//! `O_DIRECT` file on the machine's file system (the path a zvol takes: the server's ring, aligned
//! buffers).
//!
//! ```sh
//! cargo bench -p xatastor-benches --bench server_allocs
//! ```

use std::alloc::{GlobalAlloc, Layout, System};
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use nvmeof_target::{
    BlockBackend, HostAccess, MemoryBackend, NamespaceConfig, SubsystemConfig, Target, TargetConfig,
};
use xatastor_core::{Server, ServerConfig};

struct Counting;

static ALLOCATIONS: AtomicU64 = AtomicU64::new(0);

// SAFETY: forwards to the system allocator unchanged; only counts calls.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        // SAFETY: the caller's contract for `alloc` is passed on.
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        // SAFETY: as in `alloc`.
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: as in `alloc`.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        // SAFETY: as in `alloc`.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

const NQN: &str = "nqn.2026-01.io.xatastor:allocs";

fn commands(target: &Target) -> u64 {
    let Some(ns) = target.subsystem(NQN).and_then(|s| s.namespace(1)) else { return 0 };
    let s = ns.stats().snapshot();
    s.reads + s.writes
}

/// Runs `workload` at `bs` with `qd` against the backend and returns allocations per command.
fn measure(backend: Arc<dyn BlockBackend>, workload: &str, bs: usize, qd: u32) -> f64 {
    let target = Target::new(TargetConfig::default());
    target
        .add_subsystem(SubsystemConfig {
            access: HostAccess::AllowAny,
            ..SubsystemConfig::new(NQN, "ALLOCS")
        })
        .expect("subsystem");
    target.add_namespace(NQN, NamespaceConfig::derived(NQN, 1, backend)).expect("namespace");
    let mut config = ServerConfig::new("127.0.0.1:0".parse().expect("address"));
    config.workers = 1;
    let server = Server::start(target.clone(), config).expect("server");
    let mut perf = Command::new(env!("CARGO_BIN_EXE_nvmf-perf"))
        .args(["--target", &server.local_addr().to_string(), "--nqn", NQN])
        .args(["--workload", workload, "--bs-bytes", &bs.to_string(), "--qd", &qd.to_string()])
        .args(["--time-secs", "6", "--warmup-secs", "0", "--range-mib", "256"])
        .stdout(std::process::Stdio::null())
        .spawn()
        .expect("nvmf-perf");
    // Warm-up: buffers, maps and queues reach their steady size.
    std::thread::sleep(Duration::from_secs(3));
    let (a0, c0) = (ALLOCATIONS.load(Ordering::Relaxed), commands(&target));
    std::thread::sleep(Duration::from_secs(2));
    let (a1, c1) = (ALLOCATIONS.load(Ordering::Relaxed), commands(&target));
    let status = perf.wait().expect("nvmf-perf");
    assert!(status.success(), "nvmf-perf failed: {status}");
    server.shutdown().expect("shutdown");
    (a1 - a0) as f64 / (c1 - c0).max(1) as f64
}

fn main() {
    // `cargo test` runs benches with --bench absent: do nothing then (no timing in tests).
    if !std::env::args().any(|a| a == "--bench") {
        return;
    }
    let dir = tempfile::tempdir_in("/var/tmp").expect("scratch directory");
    let path = dir.path().join("direct.img");
    std::fs::File::create(&path).and_then(|f| f.set_len(256 << 20)).expect("scratch file");
    println!("{:<28} {:>8} {:>4} {:>16}", "backend / workload", "bs", "qd", "allocations/cmd");
    for (workload, bs, qd) in
        [("randread", 4096, 32), ("randwrite", 4096, 32), ("read", 131072, 8), ("write", 131072, 8)]
    {
        let memory: Arc<dyn BlockBackend> = Arc::new(MemoryBackend::new(256 << 20, 512));
        let per = measure(memory, workload, bs, qd);
        println!("{:<28} {:>8} {:>4} {:>16.3}", format!("memory / {workload}"), bs, qd, per);
        let direct: Arc<dyn BlockBackend> =
            Arc::new(zvol_backend::ZvolBackend::open(&path, 4096).expect("O_DIRECT open"));
        let per = measure(direct, workload, bs, qd);
        println!("{:<28} {:>8} {:>4} {:>16.3}", format!("O_DIRECT file / {workload}"), bs, qd, per);
    }
}
