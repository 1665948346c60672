//! `discovery-window`: what one discovery Get Log Page costs on a node whose volumes are open to any
//! host (so every host's discovery list holds all of them) — a benchmark, not a test.
//!
//! It creates `--count` volumes (memory provisioner, catalog in a temporary directory), connects a
//! discovery controller in memory (the sans-I/O engine, no socket) and times, with the bytes
//! allocated, a header read (1 KiB at offset 0: what a host reads first) and a 4 KiB window near
//! the end of the page (what a host reading the page piece by piece asks for last).
//!
//! ```sh
//! cargo run --release -p xatastor-benches --bin discovery-window -- --count 100000
//! ```

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use clap::Parser;
use nvmeof_proto::nvme::discovery::DISCOVERY_NQN;
use nvmeof_proto::nvme::fabrics::CNTLID_DYNAMIC;
use nvmeof_proto::nvme::nvm::GetLogPageCommand;
use nvmeof_proto::nvme::registers::{offset, PropertyWidth};
use nvmeof_proto::nvme::{Sqe, Status};
use nvmeof_target::host::{self, Completion, HostOptions, HostQueue};
use nvmeof_target::{Connection, Event, Target, TargetConfig, TransportParams};
use xatastor_core::provisioners::MemoryProvisioner;
use xatastor_core::{CreateVolume, Node, NodeConfig};

const HOST: &str = "nqn.2014-08.org.nvmexpress:uuid:discovery-window";

/// Bytes allocated by this process so far.
static ALLOCATED: AtomicU64 = AtomicU64::new(0);

struct Counting;

// SAFETY: every call is passed on to the system allocator unchanged; only a counter is added.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        ALLOCATED.fetch_add(layout.size() as u64, Ordering::Relaxed);
        // SAFETY: the caller's contract for `alloc` is the system allocator's.
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `ptr` was allocated by `System` with `layout` (every allocation goes through it).
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        ALLOCATED.fetch_add(layout.size() as u64, Ordering::Relaxed);
        // SAFETY: as for `alloc`.
        unsafe { System.alloc_zeroed(layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        ALLOCATED.fetch_add(new_size as u64, Ordering::Relaxed);
        // SAFETY: `ptr` and `layout` come from this allocator, which is `System`'s.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

#[derive(Parser, Debug)]
#[command(about = "Time and bytes allocated per discovery Get Log Page vs. the number of any-host volumes")]
struct Args {
    /// Volumes open to any host.
    #[arg(long, default_value_t = 100_000)]
    count: u64,
    /// Requests timed per kind (the median is printed).
    #[arg(long, default_value_t = 11)]
    reps: usize,
}

/// The host's and the target's side of one in-memory connection.
struct Link {
    conn: Connection,
    host: HostQueue,
}

impl Link {
    /// Moves bytes both ways once.
    fn pump(&mut self, now: Instant) {
        let (mut to_target, mut to_host) = (BytesMut::new(), BytesMut::new());
        while let Some(pdu) = self.host.poll_transmit() {
            to_target.extend_from_slice(&pdu.to_vec());
        }
        self.conn.handle_input(&mut to_target, now);
        while let Some(ev) = self.conn.poll_event() {
            if let Event::Transmit(pdu) = ev {
                to_host.extend_from_slice(&pdu.to_vec());
            }
        }
        self.host.handle_input(&mut to_host).expect("host side");
    }

    fn command(
        &mut self,
        sqe: Sqe,
        data: Option<nvmeof_proto::Payload>,
        read_len: u32,
        now: Instant,
    ) -> Completion {
        let cid = self.host.submit(sqe, data, read_len);
        loop {
            self.pump(now);
            while let Some(c) = self.host.poll_completion() {
                if c.cqe.cid.get() == cid {
                    return c;
                }
            }
        }
    }
}

fn median(mut v: Vec<(Duration, u64)>) -> (Duration, u64) {
    v.sort();
    v[v.len() / 2]
}

fn main() {
    let args = Args::parse();
    let dir = tempfile::tempdir().expect("temporary directory");
    let target = Target::new(TargetConfig::default());
    let node = Node::open(
        NodeConfig::new(dir.path().join("catalog.redb")),
        Arc::new(MemoryProvisioner::new()),
        target.clone(),
    )
    .expect("open node");
    let mut i = 0u64;
    while i < args.count {
        let n = (args.count - i).min(10_000);
        let reqs = (i..i + n)
            .map(|k| {
                let mut c = CreateVolume::new(format!("vol-{k:08}"), 1 << 30);
                c.allow_any_host = true;
                c
            })
            .collect();
        node.create_volumes(reqs).expect("create volumes");
        i += n;
    }

    #[allow(clippy::disallowed_methods)] // a benchmark owns its clock
    let now = Instant::now();
    let addr = "127.0.0.1:4420".parse().expect("address");
    let mut link = Link {
        conn: target.accept(TransportParams { local_addr: addr, peer_addr: addr, port_id: 1 }, now),
        host: HostQueue::new(HostOptions::default()),
    };
    while !link.host.is_ready() {
        link.pump(now); // ICReq/ICResp
    }
    let (sqe, data) = host::connect_command(0, 32, 0, CNTLID_DYNAMIC, [9; 16], DISCOVERY_NQN, HOST);
    assert_eq!(link.command(sqe, Some(data), 0, now).status(), Status::SUCCESS, "Connect");
    let cc = host::property_set(offset::CC, PropertyWidth::Four, 0x0046_0001);
    assert_eq!(link.command(cc, None, 0, now).status(), Status::SUCCESS, "enable");

    let mut get = |offset: u64, len: u32| {
        let mut sqe = Sqe::zeroed();
        sqe.opcode = 0x02;
        GetLogPageCommand::new(0x70, offset, u64::from(len)).apply(&mut sqe);
        let before = ALLOCATED.load(Ordering::Relaxed);
        #[allow(clippy::disallowed_methods)]
        let start = Instant::now();
        let c = link.command(sqe, None, len, now);
        let took = start.elapsed();
        let bytes = ALLOCATED.load(Ordering::Relaxed) - before;
        assert_eq!(c.status(), Status::SUCCESS, "Get Log Page");
        (took, bytes, c)
    };
    // The first request may build what later ones reuse (the catalog's position index of the list).
    let (first_took, first_bytes, header) = get(0, 1024);
    let numrec = u64::from_le_bytes(header.data.to_bytes()[8..16].try_into().expect("header"));
    assert_eq!(numrec, args.count, "NUMREC");
    let high = 1024 + (args.count.saturating_sub(4)) * 1024;
    let headers = median((0..args.reps).map(|_| get(0, 1024)).map(|(t, b, _)| (t, b)).collect());
    let windows = median((0..args.reps).map(|_| get(high, 4096)).map(|(t, b, _)| (t, b)).collect());
    println!(
        "count={} first request: {:.1} us, {} bytes allocated",
        args.count,
        first_took.as_secs_f64() * 1e6,
        first_bytes
    );
    println!(
        "count={} header_1KiB: {:.1} us, {} bytes allocated; window_4KiB@{}: {:.1} us, {} bytes allocated",
        args.count,
        headers.0.as_secs_f64() * 1e6,
        headers.1,
        high,
        windows.0.as_secs_f64() * 1e6,
        windows.1
    );
}
