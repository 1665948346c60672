//! `nvmf-perf`: an NVMe/TCP load generator in the style of SPDK's `perf`, built on `nvmeof-proto` and
//! the sans-I/O host of `nvmeof-target`.
//!
//! It connects an admin queue and N I/O queues (one TCP connection and one thread each) to a target,
//! keeps Q commands outstanding on every queue, runs a read / write / mixed, random / sequential
//! workload of block size B for a duration after a warm-up, and reports IOPS, MiB/s and latency
//! (min / p50 / p99 / p99.9 / max). `--verify` writes a pattern that names the block and its
//! generation and checks every read against what was last written.
//!
//! ```sh
//! nvmf-perf --target 127.0.0.1:4420 --nqn nqn.2026-01.io.xatastor:blocking \
//!     --queues 2 --qd 32 --workload randread --bs 4096 --time 10
//! ```
#![allow(clippy::disallowed_methods)] // a load generator reads the clock

use std::collections::{HashMap, HashSet};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use bytes::BytesMut;
use clap::{Parser, ValueEnum};
use hdrhistogram::Histogram;
use nvmeof_proto::nvme::fabrics::CNTLID_DYNAMIC;
use nvmeof_proto::nvme::identify::{IdentifyController, IdentifyNamespace};
use nvmeof_proto::nvme::nvm::{IdentifyCommand, RwCommand};
use nvmeof_proto::nvme::registers::{offset, PropertyWidth};
use nvmeof_proto::nvme::{Sqe, Status};
use nvmeof_proto::{Digests, Payload};
use nvmeof_target::host::{self, Completion, HostOptions, HostQueue};
use zerocopy::FromBytes;

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Workload {
    Read,
    Write,
    Randread,
    Randwrite,
    Randrw,
}

/// NVMe/TCP load generator.
#[derive(Parser, Debug, Clone)]
#[command(version, about)]
struct Args {
    /// Target address.
    #[arg(long, default_value = "127.0.0.1:4420")]
    target: SocketAddr,
    /// Subsystem NQN.
    #[arg(long)]
    nqn: String,
    /// Host NQN to connect as.
    #[arg(long, default_value = "nqn.2014-08.org.nvmexpress:uuid:00000000-0000-0000-0000-00000000beef")]
    hostnqn: String,
    /// Namespace ID.
    #[arg(long, default_value_t = 1)]
    nsid: u32,
    /// I/O queues (TCP connections, one thread each).
    #[arg(long, default_value_t = 1)]
    queues: u16,
    /// Commands outstanding per queue.
    #[arg(long, default_value_t = 32)]
    qd: u32,
    /// Access pattern.
    #[arg(long, value_enum, default_value_t = Workload::Randread)]
    workload: Workload,
    /// Percentage of reads for `randrw`.
    #[arg(long, default_value_t = 70)]
    rwmix_read: u32,
    /// Block size in bytes (a multiple of the namespace's block size).
    #[arg(long, default_value_t = 4096)]
    bs: u32,
    /// Measured run time in seconds.
    #[arg(long, default_value_t = 10.0)]
    time: f64,
    /// Warm-up before measuring, in seconds.
    #[arg(long, default_value_t = 2.0)]
    warmup: f64,
    /// Use only the first N MiB of the namespace (0: all of it).
    #[arg(long, default_value_t = 0)]
    range_mib: u64,
    /// Write a self-describing pattern and check every read against the last write.
    #[arg(long)]
    verify: bool,
    /// Ask for header and data digests.
    #[arg(long)]
    digests: bool,
    /// Print the result as one JSON object.
    #[arg(long)]
    json: bool,
}

struct Conn {
    stream: TcpStream,
    queue: HostQueue,
    rx: BytesMut,
    buf: Vec<u8>,
    out: Vec<u8>,
}

impl Conn {
    fn open(addr: SocketAddr, opts: HostOptions) -> Result<Self, String> {
        let stream = TcpStream::connect(addr).map_err(|e| format!("connect {addr}: {e}"))?;
        stream.set_nodelay(true).map_err(|e| e.to_string())?;
        let mut c = Self {
            stream,
            queue: HostQueue::new(opts),
            rx: BytesMut::new(),
            buf: vec![0; 1 << 20],
            out: Vec::new(),
        };
        c.flush()?;
        while !c.queue.is_ready() {
            c.receive()?;
        }
        Ok(c)
    }

    fn flush(&mut self) -> Result<(), String> {
        while let Some(pdu) = self.queue.poll_transmit() {
            for chunk in pdu.chunks() {
                self.out.extend_from_slice(chunk);
            }
        }
        if !self.out.is_empty() {
            self.stream.write_all(&self.out).map_err(|e| format!("send: {e}"))?;
            self.out.clear();
        }
        Ok(())
    }

    fn receive(&mut self) -> Result<(), String> {
        let n = loop {
            match self.stream.read(&mut self.buf) {
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                r => break r.map_err(|e| format!("receive: {e}"))?,
            }
        };
        if n == 0 {
            return Err("the target closed the connection".into());
        }
        self.rx.extend_from_slice(self.buf.get(..n).unwrap_or_default());
        self.queue.handle_input(&mut self.rx).map_err(|e| e.to_string())?;
        self.flush()
    }

    fn command(&mut self, sqe: Sqe, data: Option<Payload>, read_len: u32) -> Result<Completion, String> {
        let cid = self.queue.submit(sqe, data, read_len);
        self.flush()?;
        loop {
            while let Some(c) = self.queue.poll_completion() {
                if c.cqe.cid.get() == cid {
                    return Ok(c);
                }
            }
            self.receive()?;
        }
    }
}

fn check(c: &Completion, what: &str) -> Result<(), String> {
    if c.status().is_success() {
        Ok(())
    } else {
        Err(format!("{what} failed: {}", c.status()))
    }
}

struct Setup {
    cntlid: u16,
    block_size: u32,
    blocks: u64,
    mdts_bytes: u64,
    _admin: Conn,
}

fn setup(args: &Args, opts: HostOptions) -> Result<Setup, String> {
    let mut admin = Conn::open(args.target, opts)?;
    let hostid = [0x42; 16];
    let (sqe, data) = host::connect_command(0, 32, 0, CNTLID_DYNAMIC, hostid, &args.nqn, &args.hostnqn);
    let c = admin.command(sqe, Some(data), 0)?;
    check(&c, "admin Connect")?;
    let cntlid = c.cqe.dw0.get() as u16;
    check(
        &admin.command(host::property_set(offset::CC, PropertyWidth::Four, 0x0046_0001), None, 0)?,
        "enable",
    )?;
    for _ in 0..1000 {
        let csts = admin.command(host::property_get(offset::CSTS, PropertyWidth::Four), None, 0)?;
        if csts.cqe.dw0.get() & 1 == 1 {
            break;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    let mut id = Sqe::zeroed();
    id.opcode = 0x06;
    IdentifyCommand { cns: 1, ..Default::default() }.apply(&mut id);
    let c = admin.command(id, None, 4096)?;
    check(&c, "Identify Controller")?;
    let ctrl = IdentifyController::read_from_bytes(&c.data.to_bytes()).map_err(|_| "short Identify")?;
    let mdts_bytes = match ctrl.mdts {
        0 => u64::MAX,
        m => 4096u64 << m,
    };
    let mut id = Sqe::zeroed();
    id.opcode = 0x06;
    id.nsid.set(args.nsid);
    IdentifyCommand { cns: 0, ..Default::default() }.apply(&mut id);
    let c = admin.command(id, None, 4096)?;
    check(&c, "Identify Namespace")?;
    let ns = IdentifyNamespace::read_from_bytes(&c.data.to_bytes()).map_err(|_| "short Identify")?;
    let block_size = ns.current_lba_format().and_then(|f| f.data_size()).unwrap_or(512) as u32;
    let mut nq = Sqe::zeroed();
    nq.opcode = 0x09;
    nq.cdw10.set(0x07);
    let n = u32::from(args.queues.max(1)) - 1;
    nq.cdw11.set(n | (n << 16));
    let c = admin.command(nq, None, 0)?;
    check(&c, "Set Features (Number of Queues)")?;
    let granted = (c.cqe.dw0.get() & 0xffff).min(c.cqe.dw0.get() >> 16) + 1;
    if granted < u32::from(args.queues) {
        return Err(format!("the target grants only {granted} I/O queues"));
    }
    Ok(Setup { cntlid, block_size, blocks: ns.nsze.get(), mdts_bytes, _admin: admin })
}

/// The verify pattern: every 8-byte word names the block, its generation and its position.
fn pattern(block: u64, generation: u32, bs: u32) -> Vec<u8> {
    (0..u64::from(bs) / 8)
        .flat_map(|i| ((block << 24) ^ (u64::from(generation) << 8) ^ i).to_le_bytes())
        .collect()
}

struct QueueResult {
    hist: Histogram<u64>,
    ios: u64,
    bytes: u64,
    errors: u64,
    verify_failures: u64,
    elapsed: Duration,
}

struct Inflight {
    start: Instant,
    block: u64,
    read: bool,
    generation: u32,
}

#[allow(clippy::too_many_arguments)]
fn run_queue(
    args: &Args,
    opts: HostOptions,
    cntlid: u16,
    qid: u16,
    first_block: u64,
    blocks: u64,
    lba_per_io: u64,
    start: &Barrier,
    stop: &AtomicBool,
) -> Result<QueueResult, String> {
    let mut c = Conn::open(args.target, opts)?;
    let (sqe, data) = host::connect_command(
        qid,
        args.qd.saturating_add(1).min(65535) as u16,
        0,
        cntlid,
        [0x42; 16],
        &args.nqn,
        &args.hostnqn,
    );
    check(&c.command(sqe, Some(data), 0)?, "I/O Connect")?;
    let mut rng = fastrand::Rng::with_seed(u64::from(qid) * 7919);
    let mut generation: Vec<u32> = if args.verify { vec![0; blocks as usize] } else { Vec::new() };
    let mut busy: HashSet<u64> = HashSet::new();
    let mut inflight: HashMap<u16, Inflight> = HashMap::new();
    let mut seq = 0u64;
    let mut hist = Histogram::<u64>::new_with_bounds(1, 60_000_000_000, 3).map_err(|e| e.to_string())?;
    let (mut ios, mut bytes, mut errors, mut verify_failures) = (0u64, 0u64, 0u64, 0u64);
    let warmup = Duration::from_secs_f64(args.warmup);
    start.wait();
    let t0 = Instant::now();
    let mut measuring_since: Option<Instant> = None;

    let mut submit = |c: &mut Conn,
                      inflight: &mut HashMap<u16, Inflight>,
                      busy: &mut HashSet<u64>,
                      generation: &mut Vec<u32>| {
        let read = match args.workload {
            Workload::Read | Workload::Randread => true,
            Workload::Write | Workload::Randwrite => false,
            Workload::Randrw => rng.u32(0..100) < args.rwmix_read,
        };
        let block = loop {
            let b = match args.workload {
                Workload::Read | Workload::Write => {
                    seq = (seq + 1) % blocks;
                    seq
                }
                _ => rng.u64(0..blocks),
            };
            if !args.verify || busy.insert(b) {
                break b;
            }
        };
        let slba = (first_block + block) * lba_per_io;
        let mut sqe = Sqe::zeroed();
        sqe.opcode = if read { 0x02 } else { 0x01 };
        sqe.nsid.set(args.nsid);
        RwCommand::new(slba, lba_per_io as u32).apply(&mut sqe);
        let mut gen = 0;
        let cid = if read {
            if args.verify {
                gen = generation.get(block as usize).copied().unwrap_or(0);
            }
            c.queue.submit(sqe, None, args.bs)
        } else {
            let data = if args.verify {
                let g = generation.get_mut(block as usize).map(|g| {
                    *g += 1;
                    *g
                });
                gen = g.unwrap_or(0);
                pattern(block, gen, args.bs)
            } else {
                vec![0x5a; args.bs as usize]
            };
            c.queue.submit(sqe, Some(Payload::from(data)), 0)
        };
        inflight.insert(cid, Inflight { start: Instant::now(), block, read, generation: gen });
    };

    for _ in 0..args.qd {
        submit(&mut c, &mut inflight, &mut busy, &mut generation);
    }
    c.flush()?;
    loop {
        c.receive()?;
        let now = Instant::now();
        if measuring_since.is_none() && now.duration_since(t0) >= warmup {
            measuring_since = Some(now);
        }
        let stopping = stop.load(Ordering::Relaxed);
        while let Some(done) = c.queue.poll_completion() {
            let Some(io) = inflight.remove(&done.cqe.cid.get()) else { continue };
            busy.remove(&io.block);
            if measuring_since.is_some() {
                let ns = u64::try_from(now.duration_since(io.start).as_nanos()).unwrap_or(u64::MAX);
                let _ = hist.record(ns.max(1));
                ios += 1;
                bytes += u64::from(args.bs);
                if done.status() != Status::SUCCESS {
                    errors += 1;
                }
            }
            if args.verify
                && io.read
                && io.generation > 0
                && done.data != Payload::from(pattern(io.block, io.generation, args.bs))
            {
                verify_failures += 1;
                eprintln!("verify: block {} generation {} differs", io.block, io.generation);
            }
            if !stopping {
                submit(&mut c, &mut inflight, &mut busy, &mut generation);
            }
        }
        c.flush()?;
        if stopping && inflight.is_empty() {
            break;
        }
    }
    let elapsed = measuring_since.map_or(Duration::ZERO, |s| Instant::now().duration_since(s));
    Ok(QueueResult { hist, ios, bytes, errors, verify_failures, elapsed })
}

fn main() -> ExitCode {
    let args = Args::parse();
    match run(&args) {
        Ok(ok) => {
            if ok {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            }
        }
        Err(e) => {
            eprintln!("nvmf-perf: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run(args: &Args) -> Result<bool, String> {
    let digests = if args.digests { Digests::BOTH } else { Digests::NONE };
    let opts = HostOptions { digests, ..HostOptions::default() };
    let s = setup(args, opts)?;
    if args.bs == 0 || args.bs % s.block_size != 0 {
        return Err(format!("--bs must be a multiple of the block size {}", s.block_size));
    }
    if u64::from(args.bs) > s.mdts_bytes {
        return Err(format!("--bs {} exceeds the target's maximum transfer {}", args.bs, s.mdts_bytes));
    }
    let lba_per_io = u64::from(args.bs / s.block_size);
    let mut total_ios = s.blocks / lba_per_io;
    if args.range_mib > 0 {
        total_ios = total_ios.min(args.range_mib * (1 << 20) / u64::from(args.bs));
    }
    // Each queue gets its own region, so verification never sees two queues race on a block.
    let per_queue = total_ios / u64::from(args.queues.max(1));
    if per_queue < u64::from(args.qd) * 2 {
        return Err("the namespace (or --range-mib) is too small for this queue depth".into());
    }
    let stop = Arc::new(AtomicBool::new(false));
    let barrier = Arc::new(Barrier::new(usize::from(args.queues) + 1));
    let mut handles = Vec::new();
    for q in 0..args.queues {
        let (args, stop, barrier) = (args.clone(), stop.clone(), barrier.clone());
        let cntlid = s.cntlid;
        handles.push(std::thread::spawn(move || {
            let r = run_queue(
                &args,
                opts,
                cntlid,
                q + 1,
                u64::from(q) * per_queue,
                per_queue,
                lba_per_io,
                &barrier,
                &stop,
            );
            if r.is_err() {
                // Let the others go on to the end.
                stop.store(true, Ordering::Relaxed);
            }
            r
        }));
    }
    barrier.wait();
    std::thread::sleep(Duration::from_secs_f64(args.warmup + args.time));
    stop.store(true, Ordering::Relaxed);
    let mut hist = Histogram::<u64>::new_with_bounds(1, 60_000_000_000, 3).map_err(|e| e.to_string())?;
    let (mut ios, mut bytes, mut errors, mut verify_failures) = (0, 0, 0, 0);
    let mut elapsed = Duration::ZERO;
    for h in handles {
        let r = h.join().map_err(|_| "a queue thread panicked")??;
        hist.add(&r.hist).map_err(|e| e.to_string())?;
        ios += r.ios;
        bytes += r.bytes;
        errors += r.errors;
        verify_failures += r.verify_failures;
        elapsed = elapsed.max(r.elapsed);
    }
    let secs = elapsed.as_secs_f64().max(1e-9);
    let us = |q: f64| hist.value_at_quantile(q) as f64 / 1000.0;
    let (iops, mibs) = (ios as f64 / secs, bytes as f64 / secs / (1 << 20) as f64);
    if args.json {
        println!(
            "{{\"workload\":\"{:?}\",\"bs\":{},\"queues\":{},\"qd\":{},\"iops\":{:.0},\"mib_s\":{:.1},\"lat_us\":{{\"min\":{:.1},\"p50\":{:.1},\"p99\":{:.1},\"p999\":{:.1},\"max\":{:.1}}},\"errors\":{},\"verify_failures\":{}}}",
            args.workload, args.bs, args.queues, args.qd, iops, mibs,
            hist.min() as f64 / 1000.0, us(0.5), us(0.99), us(0.999), hist.max() as f64 / 1000.0, errors, verify_failures
        );
    } else {
        println!(
            "{:?} bs={} queues={} qd={}: {:.0} IOPS, {:.1} MiB/s, latency us min {:.1} p50 {:.1} p99 {:.1} p99.9 {:.1} max {:.1}, errors {}, verify failures {}",
            args.workload, args.bs, args.queues, args.qd, iops, mibs,
            hist.min() as f64 / 1000.0, us(0.5), us(0.99), us(0.999), hist.max() as f64 / 1000.0, errors, verify_failures
        );
    }
    Ok(errors == 0 && verify_failures == 0)
}
