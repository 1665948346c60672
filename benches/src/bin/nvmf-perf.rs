//! `nvmf-perf`: an NVMe/TCP load generator in the style of SPDK's `perf`, built on `nvmeof-proto` and
//! the sans-I/O host of `nvmeof-target`.
//!
//! It connects an admin queue and N I/O queues (one TCP connection and one thread each) to a target,
//! keeps Q commands outstanding on every queue, runs a read / write / mixed, random / sequential
//! workload of I/O size B for a duration after a warm-up, and reports IOPS, MiB/s and latency
//! (min / p50 / p99 / p99.9 / max). `--verify` writes a pattern that names the block and its
//! generation and checks every read against what was last written.
//!
//! ```text
//!  main ── admin queue: Connect, CAP, enable, Identify, Number of Queues
//!    ├── queue 1 thread ── TCP ── Connect ─┐
//!    ├── queue 2 thread ── TCP ── Connect ─┼─ all connected? go : stop everyone, one-line error
//!    └── …                                 ┘
//!  main waits for the run time or for the first queue to fail (which ends the run at once);
//!  every socket has read and write timeouts, so no thread waits forever.
//! ```
//!
//! ```sh
//! nvmf-perf --target 127.0.0.1:4420 --nqn nqn.2026-01.io.xatastor:blocking \
//!     --queues 2 --qd 32 --workload randread --bs-bytes 4096 --time-secs 10
//! ```
#![allow(clippy::disallowed_methods)] // a load generator reads the clock

use std::collections::{HashMap, HashSet};
use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream, ToSocketAddrs};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use clap::{Parser, ValueEnum};
use hdrhistogram::Histogram;
use nvmeof_proto::nvme::fabrics::{ConnectData, InvalidParameter, CNTLID_DYNAMIC};
use nvmeof_proto::nvme::identify::{IdentifyController, IdentifyNamespace};
use nvmeof_proto::nvme::nvm::{IdentifyCommand, RwCommand};
use nvmeof_proto::nvme::registers::{offset, Cap, Csts, PropertyWidth};
use nvmeof_proto::nvme::{Sqe, Status};
use nvmeof_proto::{Digests, Payload};
use nvmeof_target::host::{self, Completion, HostOptions, HostQueue};
use zerocopy::FromBytes;

/// Host NQN used unless `--hostnqn` is given.
const DEFAULT_HOSTNQN: &str = "nqn.2014-08.org.nvmexpress:uuid:00000000-0000-0000-0000-00000000beef";
/// Host identifier sent in every Connect (one controller: admin and I/O queues must agree).
const HOSTID: [u8; 16] = [0x42; 16];
/// Entries of the admin queue (the least a target must accept).
const ADMIN_QUEUE_ENTRIES: u16 = 32;
/// Most I/O blocks (of `--bs`) `--verify` keeps a generation for, all queues together: 64 MiB of map.
const MAX_VERIFY_BLOCKS: u64 = 1 << 24;
/// Mismatching reads described one by one before the summary line.
const VERIFY_EXAMPLES: usize = 5;
/// Generation flag: the last write of this block failed, its content is unknown until rewritten.
const GENERATION_UNKNOWN: u32 = 1 << 31;
/// What a queue thread returns when the run was called off by another queue's failure.
const CALLED_OFF: &str = "called off";

const AFTER_HELP: &str = "\
Output: one line of text, or with --json one JSON object
  {\"workload\",\"bs\",\"queues\",\"qd\",\"iops\",\"mib_s\",\"lat_us\":{\"min\",\"p50\",\"p99\",\"p999\",\"max\"},
   \"errors\",\"verify_failures\"}
on stdout. Failed I/Os and verify mismatches are summarised on stderr (a few examples, one summary line).

Exit status: 0 when every I/O succeeded (and with --verify every read matched); 1 when I/Os failed,
reads differed, or the run could not start or was cut short (one line on stderr says why); 2 for
invalid arguments.

Host access: a target only lets allowed hosts connect. On xatastor-target allow the host NQN on the
volume (`xatastor-target volume allow-host VOLUME NQN`, or create it with --allow-any-host), or pass an
allowed host NQN with --hostnqn.";

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Workload {
    /// Sequential reads.
    Read,
    /// Sequential writes.
    Write,
    /// Random reads.
    Randread,
    /// Random writes.
    Randwrite,
    /// Random reads and writes, --rwmix-read-percent of them reads.
    Randrw,
    /// Sequential Write Zeroes of --bs-bytes each (no data moves, so --bs may exceed the target's
    /// maximum transfer: up to 65536 blocks per command); not with --verify.
    Writezeroes,
}

/// NVMe/TCP load generator: N queues with Q commands outstanding each, reporting IOPS, MiB/s and
/// latency percentiles.
#[derive(Parser, Debug, Clone)]
#[command(version, long_about = None, after_help = AFTER_HELP)]
struct Args {
    /// Address of the target's NVMe/TCP listener.
    #[arg(long, value_name = "HOST:PORT", default_value = "127.0.0.1:4420", value_parser = parse_addr)]
    target: SocketAddr,
    /// NQN of the subsystem to load (`xatastor-target volume show VOLUME` prints it).
    #[arg(long, value_name = "NQN", value_parser = parse_nqn)]
    nqn: String,
    /// Host NQN to connect as. The target must allow it: `xatastor-target volume allow-host VOLUME
    /// NQN`, or a subsystem that allows any host.
    #[arg(long, value_name = "NQN", default_value = DEFAULT_HOSTNQN, value_parser = parse_nqn)]
    hostnqn: String,
    /// Namespace ID to load (at least 1).
    #[arg(long, value_name = "NSID", default_value_t = 1, value_parser = at_least_one::<u32>)]
    nsid: u32,
    /// I/O queues: one TCP connection and one thread each (at least 1; the target may grant fewer).
    #[arg(long, value_name = "COUNT", default_value_t = 1, value_parser = at_least_one::<u16>)]
    queues: u16,
    /// Queue depth: commands kept outstanding on each queue (at least 1, at most the target's queue
    /// size less one).
    #[arg(long, value_name = "COMMANDS", default_value_t = 32, value_parser = at_least_one::<u32>)]
    qd: u32,
    /// Access pattern.
    #[arg(long, value_enum, default_value_t = Workload::Randread)]
    workload: Workload,
    /// Share of reads in the `randrw` workload, in percent (0-100).
    #[arg(long, visible_alias = "rwmix-read", value_name = "PERCENT", default_value_t = 70,
          value_parser = clap::value_parser!(u32).range(0..=100))]
    rwmix_read_percent: u32,
    /// Size of each I/O in bytes: a multiple of the namespace's block size, at most the target's
    /// maximum data transfer size.
    #[arg(long = "bs-bytes", visible_alias = "bs", value_name = "BYTES", default_value_t = 4096,
          value_parser = at_least_one::<u32>)]
    bs: u32,
    /// Measured run time in seconds (after the warm-up).
    #[arg(long, visible_alias = "time", value_name = "SECONDS", default_value = "10",
          value_parser = parse_positive_secs, allow_negative_numbers = true)]
    time_secs: Duration,
    /// Warm-up before measuring, in seconds: I/O runs but is not counted in IOPS and latency.
    #[arg(long, visible_alias = "warmup", value_name = "SECONDS", default_value = "2",
          value_parser = parse_secs, allow_negative_numbers = true)]
    warmup_secs: Duration,
    /// Use only the first N MiB of the namespace (0: all of it; with --verify at most what the
    /// verify map tracks, 16,777,216 I/Os of --bs, i.e. 64 GiB at 4 KiB).
    #[arg(long, value_name = "MIB", default_value_t = 0)]
    range_mib: u64,
    /// Write a pattern naming the block and its write, and check every read of a block written in
    /// this run against the last write. Without --range-mib, a namespace larger than the verify map
    /// tracks is used only up to that size.
    #[arg(long)]
    verify: bool,
    /// Ask for header and data digests (CRC32C).
    #[arg(long)]
    digests: bool,
    /// Give up, with an error, when the target does not answer for this many seconds (TCP connect,
    /// handshake, any command or I/O) or does not take data for as long.
    #[arg(long, value_name = "SECONDS", default_value = "30", value_parser = parse_positive_secs, allow_negative_numbers = true)]
    timeout_secs: Duration,
    /// Print the result as one JSON object (see below) instead of a line of text.
    #[arg(long)]
    json: bool,
}

fn parse_addr(s: &str) -> Result<SocketAddr, String> {
    s.to_socket_addrs()
        .map_err(|e| format!("{e} (expected HOST:PORT, e.g. 127.0.0.1:4420)"))?
        .next()
        .ok_or_else(|| format!("{s} resolves to no address"))
}

fn parse_nqn(s: &str) -> Result<String, String> {
    ConnectData::new(HOSTID, 0, s, s).map_err(|e| e.to_string())?;
    Ok(s.to_owned())
}

fn at_least_one<T>(s: &str) -> Result<T, String>
where
    T: std::str::FromStr + Default + PartialEq,
    T::Err: std::fmt::Display,
{
    let v: T = s.parse().map_err(|e: T::Err| e.to_string())?;
    if v == T::default() {
        return Err("must be at least 1".into());
    }
    Ok(v)
}

/// Seconds, fractional allowed, 0 to 10,000,000.
fn parse_secs(s: &str) -> Result<Duration, String> {
    let v: f64 = s.parse().map_err(|_| format!("{s:?} is not a number of seconds"))?;
    if !(0.0..=1e7).contains(&v) {
        return Err("must be between 0 and 10000000 seconds".into());
    }
    Duration::try_from_secs_f64(v).map_err(|e| e.to_string())
}

fn parse_positive_secs(s: &str) -> Result<Duration, String> {
    let d = parse_secs(s)?;
    if d.is_zero() {
        return Err("must be more than 0 seconds".into());
    }
    Ok(d)
}

/// One queue's TCP connection with its host state machine. Reads and writes time out after
/// `timeout`.
struct Conn {
    stream: TcpStream,
    queue: HostQueue,
    rx: BytesMut,
    buf: Vec<u8>,
    out: Vec<u8>,
    timeout: Duration,
}

/// An I/O error as one line; timeouts say so.
fn io_failure(what: &str, e: &std::io::Error, timeout: Duration) -> String {
    match e.kind() {
        ErrorKind::WouldBlock | ErrorKind::TimedOut => {
            format!("no answer from the target within {timeout:?} ({what}; see --timeout-secs)")
        }
        _ => format!("{what}: {e}"),
    }
}

impl Conn {
    fn open(addr: SocketAddr, opts: HostOptions, timeout: Duration) -> Result<Self, String> {
        let stream = TcpStream::connect_timeout(&addr, timeout)
            .map_err(|e| io_failure(&format!("TCP connect to {addr}"), &e, timeout))?;
        let setup = |e: std::io::Error| format!("socket setup: {e}");
        stream.set_nodelay(true).map_err(setup)?;
        stream.set_read_timeout(Some(timeout)).map_err(setup)?;
        stream.set_write_timeout(Some(timeout)).map_err(setup)?;
        let mut c = Self {
            stream,
            queue: HostQueue::new(opts),
            rx: BytesMut::new(),
            buf: vec![0; 1 << 20],
            out: Vec::new(),
            timeout,
        };
        c.flush()?;
        while !c.queue.is_ready() {
            c.receive().map_err(|e| format!("NVMe/TCP handshake with {addr}: {e}"))?;
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
            self.stream.write_all(&self.out).map_err(|e| io_failure("send", &e, self.timeout))?;
            self.out.clear();
        }
        Ok(())
    }

    fn receive(&mut self) -> Result<(), String> {
        let n = loop {
            match self.stream.read(&mut self.buf) {
                Ok(n) => break n,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) => return Err(io_failure("receive", &e, self.timeout)),
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

    /// Property Get; the value (8-byte properties span DW0 and DW1).
    fn property(&mut self, name: &str, offset: u32, width: PropertyWidth) -> Result<u64, String> {
        let c = self.command(host::property_get(offset, width), None, 0)?;
        check(&c, &format!("Property Get {name}"))?;
        Ok(u64::from(c.cqe.dw0.get()) | u64::from(c.cqe.dw1.get()) << 32)
    }
}

fn check(c: &Completion, what: &str) -> Result<(), String> {
    if c.status().is_success() {
        Ok(())
    } else {
        Err(format!("{what} failed: {}", c.status()))
    }
}

/// Why a Connect was refused, in one line: the status, what it means here, and what to change.
fn connect_refused(what: &str, c: &Completion, args: &Args, qid: u16, entries: u16) -> String {
    let status = c.status();
    let code = status.without_flags();
    let hint = if code == Status::CONNECT_INVALID_HOST {
        format!(
            "host NQN {} may not connect to {}: allow it on the target (xatastor-target volume \
             allow-host VOLUME NQN) or pass an allowed host NQN with --hostnqn",
            args.hostnqn, args.nqn
        )
    } else if code == Status::CONNECT_INVALID_PARAMETERS {
        let p = InvalidParameter::from_dw0(c.cqe.dw0.get());
        if p == InvalidParameter::SUBNQN {
            format!("the target serves no subsystem {} (check --nqn)", args.nqn)
        } else if p == InvalidParameter::HOSTNQN {
            format!("the target does not accept host NQN {} (pass another with --hostnqn)", args.hostnqn)
        } else if p == InvalidParameter::SQSIZE {
            format!("the target does not take queues of {entries} entries (lower --qd)")
        } else if p == InvalidParameter::QID {
            format!("the target does not take I/O queue {qid} (lower --queues)")
        } else if p == InvalidParameter::CNTLID {
            "the target does not know this controller (did it restart?)".to_owned()
        } else {
            format!("the target names {p:?} as invalid (check --nqn and --hostnqn)")
        }
    } else if code == Status::CONNECT_CONTROLLER_BUSY {
        "the target is busy: try again".to_owned()
    } else {
        format!("check --nqn {} and --hostnqn {}", args.nqn, args.hostnqn)
    };
    format!("{what} refused by the target: {status}: {hint}")
}

struct Setup {
    cntlid: u16,
    block_size: u32,
    blocks: u64,
    mdts_bytes: u64,
    _admin: Conn,
}

/// Connects the admin queue, checks `--qd` against the target's queue size, enables the controller,
/// reads the namespace's geometry and asks for the I/O queues.
fn setup(args: &Args, opts: HostOptions) -> Result<Setup, String> {
    let mut admin = Conn::open(args.target, opts, args.timeout_secs)?;
    let (sqe, data) =
        host::connect_command(0, ADMIN_QUEUE_ENTRIES, 0, CNTLID_DYNAMIC, HOSTID, &args.nqn, &args.hostnqn);
    let c = admin.command(sqe, Some(data), 0)?;
    if !c.status().is_success() {
        return Err(connect_refused("admin queue Connect", &c, args, 0, ADMIN_QUEUE_ENTRIES));
    }
    let cntlid = c.cqe.dw0.get() as u16;
    let cap = Cap(admin.property("CAP", offset::CAP, PropertyWidth::Eight)?);
    // A queue of N entries takes N - 1 commands; Connect carries N in 16 bits.
    let max_entries = cap.max_queue_entries();
    let max_qd = (max_entries - 1).min(u32::from(u16::MAX) - 1);
    if args.qd > max_qd {
        return Err(format!(
            "--qd {} is more than the target allows: its queues hold at most {max_entries} entries, \
             so at most {max_qd} commands outstanding (--qd at most {max_qd})",
            args.qd
        ));
    }
    check(
        &admin.command(host::property_set(offset::CC, PropertyWidth::Four, 0x0046_0001), None, 0)?,
        "enabling the controller (Property Set CC)",
    )?;
    let ready_within = Duration::from_millis(u64::from(cap.timeout_ms())).max(args.timeout_secs);
    let since = Instant::now();
    loop {
        let csts = Csts(admin.property("CSTS", offset::CSTS, PropertyWidth::Four)? as u32);
        if csts.cfs() {
            return Err("the controller reports a fatal status (CSTS.CFS)".into());
        }
        if csts.rdy() {
            break;
        }
        if since.elapsed() > ready_within {
            return Err(format!("the controller did not become ready within {ready_within:?}"));
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    let mut id = Sqe::zeroed();
    id.opcode = 0x06;
    IdentifyCommand { cns: 1, ..Default::default() }.apply(&mut id);
    let c = admin.command(id, None, 4096)?;
    check(&c, "Identify Controller")?;
    let ctrl = IdentifyController::read_from_bytes(&c.data.to_bytes())
        .map_err(|_| "short Identify Controller data")?;
    // MDTS is a power of two in units of the minimum memory page size; 0: no limit.
    let page_shift = 12 + u32::from(cap.mpsmin());
    let mdts_bytes = match ctrl.mdts {
        0 => u64::MAX,
        m => 1u64.checked_shl(page_shift + u32::from(m)).unwrap_or(u64::MAX),
    };
    let mut id = Sqe::zeroed();
    id.opcode = 0x06;
    id.nsid.set(args.nsid);
    IdentifyCommand { cns: 0, ..Default::default() }.apply(&mut id);
    let c = admin.command(id, None, 4096)?;
    check(&c, &format!("Identify Namespace {} (check --nsid)", args.nsid))?;
    let ns = IdentifyNamespace::read_from_bytes(&c.data.to_bytes()).map_err(|_| "short Identify data")?;
    if ns.nsze.get() == 0 {
        return Err(format!("namespace {} of {} is not active (check --nsid)", args.nsid, args.nqn));
    }
    let block_size = ns
        .current_lba_format()
        .and_then(|f| f.data_size())
        .and_then(|b| u32::try_from(b).ok())
        .ok_or_else(|| format!("namespace {} reports an unusable block size", args.nsid))?;
    let mut nq = Sqe::zeroed();
    nq.opcode = 0x09;
    nq.cdw10.set(0x07);
    let n = u32::from(args.queues) - 1;
    nq.cdw11.set(n | (n << 16));
    let c = admin.command(nq, None, 0)?;
    check(&c, "Set Features (Number of Queues)")?;
    let granted = (c.cqe.dw0.get() & 0xffff).min(c.cqe.dw0.get() >> 16) + 1;
    if granted < u32::from(args.queues) {
        return Err(format!("the target grants only {granted} I/O queues (lower --queues)"));
    }
    Ok(Setup { cntlid, block_size, blocks: ns.nsze.get(), mdts_bytes, _admin: admin })
}

/// The verify pattern: every 8-byte word names the I/O block, its generation and its position.
fn pattern(block: u64, generation: u32, bs: u32) -> Vec<u8> {
    (0..u64::from(bs) / 8)
        .flat_map(|i| ((block << 24) ^ (u64::from(generation) << 8) ^ i).to_le_bytes())
        .collect()
}

/// What a mismatching read holds instead, for the report.
fn describe_mismatch(data: &[u8], block: u64, bs: u32, expected: u32) -> String {
    if data.len() != bs as usize {
        return format!("returned {} bytes instead of {bs}", data.len());
    }
    let want = pattern(block, expected, bs);
    let first = data.iter().zip(&want).position(|(a, b)| a != b).unwrap_or(0);
    let holds = if data.iter().all(|&b| b == 0) {
        "zeros".to_owned()
    } else {
        let w0 = data.get(..8).and_then(|w| <[u8; 8]>::try_from(w).ok()).map_or(0, u64::from_le_bytes);
        match u32::try_from((w0 ^ (block << 24)) >> 8) {
            Ok(g) if g != expected && pattern(block, g, bs) == data => format!("write {g} of it"),
            _ => "other data".to_owned(),
        }
    };
    format!(
        "does not match write {expected} of it: first difference at byte {first}, the block holds {holds}"
    )
}

/// One queue's share of the work.
struct QueueJob {
    qid: u16,
    cntlid: u16,
    /// First I/O block (in units of `--bs`) of this queue's region.
    first_block: u64,
    /// I/O blocks in the region.
    blocks: u64,
    /// Namespace blocks per I/O.
    lba_per_io: u64,
}

/// What all queue threads and the main thread share.
#[derive(Default)]
struct Shared {
    stop: AtomicBool,
    /// Every queue's socket (a clone), so a failure can wake the others; `true` once shut down.
    sockets: Mutex<(bool, Vec<TcpStream>)>,
}

impl Shared {
    fn register(&self, stream: &TcpStream) -> Result<(), String> {
        let clone = stream.try_clone().map_err(|e| format!("socket setup: {e}"))?;
        let mut s = self.sockets.lock().map_err(|_| CALLED_OFF)?;
        if s.0 {
            return Err(CALLED_OFF.into());
        }
        s.1.push(clone);
        Ok(())
    }

    /// Ends every queue's connection: their threads' reads return at once.
    fn shut_down(&self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Ok(mut s) = self.sockets.lock() {
            s.0 = true;
            for sock in &s.1 {
                let _ = sock.shutdown(Shutdown::Both);
            }
        }
    }
}

struct QueueResult {
    hist: Histogram<u64>,
    ios: u64,
    bytes: u64,
    elapsed: Duration,
    /// Failed I/Os (warm-up included) and the first one, described.
    errors: u64,
    first_error: Option<String>,
    /// Reads checked, reads that differed, and the first few described.
    verified: u64,
    verify_failures: u64,
    verify_examples: Vec<String>,
}

struct Inflight {
    start: Instant,
    block: u64,
    read: bool,
    /// The generation a read must find (0: not checked), or the one a write wrote.
    generation: u32,
}

/// The workload of one queue: picks blocks, builds commands, checks completions.
struct Workgen<'a> {
    args: &'a Args,
    job: &'a QueueJob,
    rng: fastrand::Rng,
    seq: u64,
    /// Per I/O block of the region (only with --verify): the last write's generation, 0 if none.
    generation: Vec<u32>,
    busy: HashSet<u64>,
    inflight: HashMap<u16, Inflight>,
}

impl Workgen<'_> {
    fn slba(&self, block: u64) -> u64 {
        (self.job.first_block + block) * self.job.lba_per_io
    }

    fn submit(&mut self, c: &mut Conn) {
        let args = self.args;
        let read = match args.workload {
            Workload::Read | Workload::Randread => true,
            Workload::Write | Workload::Randwrite | Workload::Writezeroes => false,
            Workload::Randrw => self.rng.u32(0..100) < args.rwmix_read_percent,
        };
        let block = loop {
            let b = match args.workload {
                Workload::Read | Workload::Write | Workload::Writezeroes => {
                    self.seq = (self.seq + 1) % self.job.blocks;
                    self.seq
                }
                _ => self.rng.u64(0..self.job.blocks),
            };
            // With --verify no two commands touch one block at once (the region holds at least
            // twice the queue depth, so this ends).
            if !args.verify || self.busy.insert(b) {
                break b;
            }
        };
        let mut sqe = Sqe::zeroed();
        sqe.opcode = if read { 0x02 } else { 0x01 };
        sqe.nsid.set(args.nsid);
        RwCommand::new(self.slba(block), self.job.lba_per_io as u32).apply(&mut sqe);
        let abs = self.job.first_block + block;
        let slot = usize::try_from(block).ok().and_then(|b| self.generation.get_mut(b));
        let (cid, generation) = if args.workload == Workload::Writezeroes {
            sqe.opcode = 0x08;
            (c.queue.submit(sqe, None, 0), 0)
        } else if read {
            let g = slot.map_or(0, |g| *g);
            let g = if g & GENERATION_UNKNOWN != 0 { 0 } else { g };
            (c.queue.submit(sqe, None, args.bs), g)
        } else if let Some(g) = slot {
            let next = match (*g & !GENERATION_UNKNOWN).wrapping_add(1) & !GENERATION_UNKNOWN {
                0 => 1,
                n => n,
            };
            *g = next;
            (c.queue.submit(sqe, Some(Payload::from(pattern(abs, next, args.bs))), 0), next)
        } else {
            (c.queue.submit(sqe, Some(Payload::from(vec![0x5a; args.bs as usize])), 0), 0)
        };
        self.inflight.insert(cid, Inflight { start: Instant::now(), block, read, generation });
    }
}

fn run_queue(
    args: &Args,
    opts: HostOptions,
    job: &QueueJob,
    shared: &Shared,
    connected: &Sender<Event>,
    go: &Receiver<()>,
) -> Result<QueueResult, String> {
    let mut c = Conn::open(args.target, opts, args.timeout_secs)?;
    shared.register(&c.stream)?;
    // Checked against the target's CAP.MQES in `setup`.
    let entries = u16::try_from(args.qd + 1).map_err(|_| "--qd too large")?;
    let (sqe, data) =
        host::connect_command(job.qid, entries, 0, job.cntlid, HOSTID, &args.nqn, &args.hostnqn);
    let r = c.command(sqe, Some(data), 0)?;
    if !r.status().is_success() {
        return Err(connect_refused("I/O queue Connect", &r, args, job.qid, entries));
    }
    let verify_map = if args.verify {
        // `run` bounds the regions of all queues together by MAX_VERIFY_BLOCKS.
        let n = usize::try_from(job.blocks).map_err(|_| "verify region too large")?;
        vec![0u32; n]
    } else {
        Vec::new()
    };
    let mut w = Workgen {
        args,
        job,
        rng: fastrand::Rng::with_seed(u64::from(job.qid) * 7919),
        seq: 0,
        generation: verify_map,
        busy: HashSet::new(),
        inflight: HashMap::new(),
    };
    let mut r = QueueResult {
        hist: Histogram::<u64>::new_with_bounds(1, 60_000_000_000, 3).map_err(|e| e.to_string())?,
        ios: 0,
        bytes: 0,
        elapsed: Duration::ZERO,
        errors: 0,
        first_error: None,
        verified: 0,
        verify_failures: 0,
        verify_examples: Vec::new(),
    };
    let _ = connected.send(Event::Connected);
    if go.recv().is_err() {
        return Err(CALLED_OFF.into());
    }
    let t0 = Instant::now();
    let mut measuring_since: Option<Instant> = None;
    for _ in 0..args.qd {
        w.submit(&mut c);
    }
    c.flush()?;
    loop {
        c.receive()?;
        let now = Instant::now();
        if measuring_since.is_none() && now.duration_since(t0) >= args.warmup_secs {
            measuring_since = Some(now);
        }
        let stopping = shared.stop.load(Ordering::Relaxed);
        while let Some(done) = c.queue.poll_completion() {
            let Some(io) = w.inflight.remove(&done.cqe.cid.get()) else { continue };
            w.busy.remove(&io.block);
            if measuring_since.is_some() {
                let ns = u64::try_from(now.duration_since(io.start).as_nanos()).unwrap_or(u64::MAX);
                let _ = r.hist.record(ns.max(1));
                r.ios += 1;
                r.bytes += u64::from(args.bs);
            }
            let slba = w.slba(io.block);
            let status = done.status();
            if status != Status::SUCCESS {
                r.errors += 1;
                if r.first_error.is_none() {
                    let op = if io.read { "read" } else { "write" };
                    r.first_error = Some(format!("{op} of LBA {slba} ({} blocks): {status}", job.lba_per_io));
                }
                if !io.read {
                    // What the block holds now is unknown: not checked until written again.
                    if let Some(g) = usize::try_from(io.block).ok().and_then(|b| w.generation.get_mut(b)) {
                        *g |= GENERATION_UNKNOWN;
                    }
                }
            } else if io.read && io.generation > 0 {
                r.verified += 1;
                let abs = job.first_block + io.block;
                if done.data != Payload::from(pattern(abs, io.generation, args.bs)) {
                    r.verify_failures += 1;
                    if r.verify_examples.len() < VERIFY_EXAMPLES {
                        let why = describe_mismatch(&done.data.to_bytes(), abs, args.bs, io.generation);
                        r.verify_examples.push(format!(
                            "read of LBA {slba} ({} blocks, queue {}) {why}",
                            job.lba_per_io, job.qid
                        ));
                    }
                }
            }
            if !stopping {
                w.submit(&mut c);
            }
        }
        c.flush()?;
        if stopping && w.inflight.is_empty() {
            break;
        }
    }
    r.elapsed = measuring_since.map_or(Duration::ZERO, |s| s.elapsed());
    Ok(r)
}

/// What a queue thread tells the main thread.
enum Event {
    /// Its I/O queue is connected; it waits for the start.
    Connected,
    /// It ended (after the run, or at a failure).
    Done(u16, Result<Box<QueueResult>, String>),
}

fn main() -> ExitCode {
    let args = Args::parse();
    match run(&args) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("nvmf-perf: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Ends the run after a failure: stops every queue and wakes the waiting ones, then returns `error`.
fn call_off(shared: &Shared, go: Vec<Sender<()>>, handles: Vec<JoinHandle<()>>, error: String) -> String {
    shared.shut_down();
    drop(go);
    for h in handles {
        let _ = h.join();
    }
    error
}

fn run(args: &Args) -> Result<bool, String> {
    if args.verify && args.workload == Workload::Writezeroes {
        return Err("--verify checks reads against writes: it does not go with --workload writezeroes".into());
    }
    let digests = if args.digests { Digests::BOTH } else { Digests::NONE };
    let opts = HostOptions { digests, ..HostOptions::default() };
    let s = setup(args, opts)?;
    if args.bs % s.block_size != 0 {
        return Err(format!(
            "--bs {} is not a multiple of the namespace's block size {}",
            args.bs, s.block_size
        ));
    }
    if u64::from(args.bs) > s.mdts_bytes && args.workload != Workload::Writezeroes {
        return Err(format!("--bs {} exceeds the target's maximum transfer {}", args.bs, s.mdts_bytes));
    }
    let lba_per_io = u64::from(args.bs / s.block_size);
    if lba_per_io > 65536 {
        return Err(format!(
            "--bs {} is more than one command moves (65536 blocks of {} bytes)",
            args.bs, s.block_size
        ));
    }
    let mut total_ios = s.blocks / lba_per_io;
    if args.range_mib > 0 {
        total_ios = total_ios.min(args.range_mib.saturating_mul(1 << 20) / u64::from(args.bs));
    }
    if args.verify && total_ios > MAX_VERIFY_BLOCKS {
        let cap_mib = (MAX_VERIFY_BLOCKS * u64::from(args.bs)) >> 20;
        if args.range_mib > 0 {
            return Err(format!(
                "--verify tracks at most {MAX_VERIFY_BLOCKS} I/O blocks ({cap_mib} MiB at --bs {}): lower \
                 --range-mib to {cap_mib} or less",
                args.bs
            ));
        }
        total_ios = MAX_VERIFY_BLOCKS;
        eprintln!(
            "nvmf-perf: --verify uses the first {cap_mib} MiB of the namespace (it tracks at most \
             {MAX_VERIFY_BLOCKS} I/O blocks); set --range-mib to choose"
        );
    }
    // Each queue gets its own region, so verification never sees two queues race on a block.
    let per_queue = total_ios / u64::from(args.queues);
    if per_queue < u64::from(args.qd) * 2 {
        return Err(format!(
            "the namespace (or --range-mib) holds {total_ios} I/Os of {} bytes: too few for {} queue(s) \
             at --qd {} (each queue needs at least twice its depth)",
            args.bs, args.queues, args.qd
        ));
    }

    let shared = Arc::new(Shared::default());
    let (tx, rx) = mpsc::channel::<Event>();
    let mut handles = Vec::new();
    let mut go = Vec::new();
    for q in 0..args.queues {
        let qid = q + 1;
        let job = QueueJob {
            qid,
            cntlid: s.cntlid,
            first_block: u64::from(q) * per_queue,
            blocks: per_queue,
            lba_per_io,
        };
        let (go_tx, go_rx) = mpsc::channel();
        go.push(go_tx);
        let (q_args, q_shared, q_tx) = (args.clone(), shared.clone(), tx.clone());
        let spawned = std::thread::Builder::new().name(format!("nvmf-perf-q{qid}")).spawn(move || {
            let r =
                catch_unwind(AssertUnwindSafe(|| run_queue(&q_args, opts, &job, &q_shared, &q_tx, &go_rx)))
                    .unwrap_or_else(|_| Err("the queue's thread panicked".into()));
            let _ = q_tx.send(Event::Done(qid, r.map(Box::new)));
        });
        match spawned {
            Ok(h) => handles.push(h),
            Err(e) => {
                return Err(call_off(&shared, go, handles, format!("cannot start queue {qid}'s thread: {e}")))
            }
        }
    }
    drop(tx);
    let failed = |qid: u16, e: String| format!("queue {qid}: {e}");

    // Every queue connects (or fails) within the socket timeouts.
    let mut connected = 0;
    while connected < args.queues {
        let error = match rx.recv() {
            Ok(Event::Connected) => {
                connected += 1;
                continue;
            }
            Ok(Event::Done(qid, Err(e))) => failed(qid, e),
            Ok(Event::Done(qid, Ok(_))) => failed(qid, "ended before the run started".into()),
            Err(_) => "every queue ended before the run started".into(),
        };
        return Err(call_off(&shared, go, handles, error));
    }
    for g in &go {
        let _ = g.send(());
    }
    let mut results = Vec::with_capacity(usize::from(args.queues));
    let end = Instant::now().checked_add(args.warmup_secs + args.time_secs);
    loop {
        let left = end.map_or(Duration::MAX, |e| e.saturating_duration_since(Instant::now()));
        if left.is_zero() {
            break;
        }
        match rx.recv_timeout(left) {
            Ok(Event::Done(qid, Err(e))) => return Err(call_off(&shared, go, handles, failed(qid, e))),
            Ok(Event::Done(_, Ok(r))) => results.push(*r),
            Ok(Event::Connected) => {}
            Err(RecvTimeoutError::Timeout | RecvTimeoutError::Disconnected) => break,
        }
    }
    shared.stop.store(true, Ordering::Relaxed);
    while results.len() < usize::from(args.queues) {
        match rx.recv() {
            Ok(Event::Done(qid, Err(e))) => return Err(call_off(&shared, go, handles, failed(qid, e))),
            Ok(Event::Done(_, Ok(r))) => results.push(*r),
            Ok(Event::Connected) => {}
            Err(_) => {
                return Err(call_off(&shared, go, handles, "a queue ended without a result".into()));
            }
        }
    }
    for h in handles {
        let _ = h.join();
    }
    report(args, results)
}

/// Prints the result (stdout) and the summaries of failed I/Os and mismatching reads (stderr);
/// `true` if the run was clean.
fn report(args: &Args, results: Vec<QueueResult>) -> Result<bool, String> {
    let mut hist = Histogram::<u64>::new_with_bounds(1, 60_000_000_000, 3).map_err(|e| e.to_string())?;
    let (mut ios, mut bytes, mut errors, mut verified, mut verify_failures) = (0, 0, 0, 0, 0);
    let mut elapsed = Duration::ZERO;
    let mut first_error = None;
    let mut examples = Vec::new();
    for r in results {
        hist.add(&r.hist).map_err(|e| e.to_string())?;
        ios += r.ios;
        bytes += r.bytes;
        errors += r.errors;
        verified += r.verified;
        verify_failures += r.verify_failures;
        elapsed = elapsed.max(r.elapsed);
        first_error = first_error.or(r.first_error);
        examples.extend(r.verify_examples);
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
    if let Some(first) = first_error {
        eprintln!("nvmf-perf: {errors} I/O(s) failed; the first: {first}");
    }
    if verify_failures > 0 {
        for e in examples.iter().take(VERIFY_EXAMPLES) {
            eprintln!("nvmf-perf: verify: {e}");
        }
        eprintln!(
            "nvmf-perf: verify failed: {verify_failures} of {verified} checked reads differed from the last \
             write ({} shown above)",
            examples.len().min(VERIFY_EXAMPLES)
        );
    }
    Ok(errors == 0 && verify_failures == 0)
}
