//! `xatastor-target upgrade` under load: 1,000 controllers, each with an Asynchronous Event
//! Request outstanding and a Keep Alive every KATO/2 (5 s, as Linux hosts), a dozen of them with an
//! I/O queue running QD32 of 4 KiB writes and read-back verifies.
//!
//! 1. Two upgrades that fail — a new binary that exits at once, one that speaks another handover
//!    format — say why, and the same process serves on: every controller answers, I/O goes on.
//! 2. A real upgrade (to the same binary) while all of that runs: the process changes, every
//!    connection and controller is handed over and none closed, every command is answered exactly
//!    once (CIDs are never reused soon, so a second answer would show), every read returns what was
//!    written.
//! 3. After it: the new process keeps every controller over several KATOs and ends the one whose
//!    host went quiet; growing a volume raises Namespace Attribute Changed, which completes the AERs
//!    the hosts sent to the old process, on that volume's controllers only.

#![allow(clippy::disallowed_methods)] // a test host reads the clock for its keep-alive timers

use std::collections::HashMap;
use std::io::{BufRead, BufReader, ErrorKind, Read, Write};
use std::net::TcpStream;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::BytesMut;
use nvmeof_proto::nvme::fabrics::CNTLID_DYNAMIC;
use nvmeof_proto::nvme::features::{AsyncEvent, AsyncEventConfig};
use nvmeof_proto::nvme::registers::{offset, PropertyWidth};
use nvmeof_proto::nvme::{Sqe, Status};
use nvmeof_proto::Payload;
use nvmeof_target::host::{self, BlockingHost, Completion, HostOptions};
use nvmeof_target::HANDOVER_FORMAT_VERSION;

const BIN: &str = env!("CARGO_BIN_EXE_xatastor-target");
/// Controllers (one admin queue each).
const CONTROLLERS: usize = 1000;
/// Of which this many also have an I/O queue with traffic.
const IO_CONTROLLERS: usize = 12;
/// Volumes the controllers are spread over (controller k on volume k % VOLUMES).
const VOLUMES: usize = 4;
/// The controller whose host stops sending keep-alives after the upgrade (on volume 2, no I/O
/// queue).
const SILENT: usize = 998;
/// Distinct host NQNs (a host has several controllers).
const HOSTS: usize = 20;
/// Commands each I/O queue keeps outstanding.
const QD: usize = 32;
/// 4 KiB in 512-byte blocks.
const BLOCKS: u32 = 8;
/// The Linux host's default keep-alive timeout; the test sends a Keep Alive every half of it.
const KATO_MS: u32 = 5000;
/// KATO the controllers connect with (connecting 1,000 takes a while in a debug build); each sets
/// [`KATO_MS`] as its first command once all are connected.
const SETUP_KATO_MS: u32 = 120_000;
/// How long a command may stay unanswered before it counts as lost (far beyond any pause: this
/// only ends a test that would otherwise hang).
const LOST_AFTER: Duration = Duration::from_secs(60);

const ASYNC_EVENT_REQUEST: u8 = 0x0C;
const KEEP_ALIVE: u8 = 0x18;
const SET_FEATURES: u8 = 0x09;

fn host_nqn(h: usize) -> String {
    format!("nqn.2014-08.org.nvmexpress:uuid:00000000-0000-4000-8000-{h:012}")
}

fn host_id(h: usize) -> [u8; 16] {
    let mut id = [0x40u8; 16];
    id[..8].copy_from_slice(&(h as u64).to_le_bytes());
    id
}

// ---- the node ----

/// A node started by the test; after an upgrade another process serves (`pid`).
struct Node {
    dir: PathBuf,
    child: Child,
    addr: String,
    /// The process serving now.
    pid: u32,
    log: Arc<Mutex<String>>,
    /// Reads the node's stderr (both processes') to its end.
    reader: Option<std::thread::JoinHandle<()>>,
}

impl Drop for Node {
    fn drop(&mut self) {
        if self.pid != self.child.id() {
            // SAFETY: kill(2) on the process the upgrade started for this test.
            unsafe { libc::kill(self.pid as i32, libc::SIGKILL) };
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Node {
    fn start(dir: &Path) -> Self {
        let mut child = Command::new(BIN)
            .arg("--data-dir")
            .arg(dir)
            .args(["serve", "--backend", "file", "--listen", "127.0.0.1:0", "--metrics-listen", "off"])
            .args(["--workers", "2"])
            .stdin(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut err = BufReader::new(child.stderr.take().unwrap());
        let log = Arc::new(Mutex::new(String::new()));
        let mut addr = String::new();
        let mut line = String::new();
        while err.read_line(&mut line).unwrap() > 0 {
            log.lock().unwrap().push_str(&line);
            if let Some(rest) = line.trim().strip_prefix("xatastor-target: serving ") {
                addr = rest.rsplit(" on ").next().unwrap().to_owned();
            }
            if line.trim().starts_with("nvme connect") {
                break;
            }
            line.clear();
        }
        assert!(!addr.is_empty(), "the node did not say where it listens: {}", log.lock().unwrap());
        // The stderr pipe is inherited by the process an upgrade starts: keep reading it.
        let sink = log.clone();
        let reader = std::thread::spawn(move || {
            let mut line = String::new();
            while err.read_line(&mut line).map(|n| n > 0).unwrap_or(false) {
                sink.lock().unwrap().push_str(&line);
                line.clear();
            }
        });
        let pid = child.id();
        Self { dir: dir.to_owned(), child, addr, pid, log, reader: Some(reader) }
    }

    fn command(&self, args: &[&str]) -> Command {
        let mut c = Command::new(BIN);
        c.arg("--data-dir").arg(&self.dir).args(args).stdin(Stdio::null());
        c
    }

    fn ok(&self, args: &[&str]) -> String {
        let out = self.command(args).output().unwrap();
        assert!(out.status.success(), "{args:?} failed: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8(out.stdout).unwrap()
    }

    fn json(&self, args: &[&str]) -> serde_json::Value {
        let mut a = vec!["--json"];
        a.extend_from_slice(args);
        serde_json::from_str(&self.ok(&a)).unwrap()
    }

    fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }

    /// The serving process is alive (not a zombie).
    fn serving_process_alive(&self) -> bool {
        std::fs::read_to_string(format!("/proc/{}/stat", self.pid))
            .map(|s| s.rsplit_once(')').is_some_and(|(_, rest)| !rest.trim_start().starts_with('Z')))
            .unwrap_or(false)
    }
}

// ---- admin queues: keep-alives and asynchronous events, driven without blocking ----

struct Admin {
    host: BlockingHost<TcpStream>,
    rx: BytesMut,
    volume: usize,
    aer_cid: u16,
    /// The AER's completion (status, DW0), once it came.
    aer: Option<(Status, u32)>,
    /// The outstanding Keep Alive (or the Set Features KATO that starts the keep-alives): CID, when
    /// sent, the round it answers.
    ka: Option<(u16, Instant, u64)>,
    /// The latest round a keep-alive was answered in.
    answered_round: u64,
    next_due: Instant,
    kato_set: bool,
    /// Why this controller failed (closed, error status, unexpected completion).
    failed: Option<String>,
    /// This host stopped sending keep-alives (the target must end the controller).
    silent: bool,
    /// The target closed the connection of a silent host.
    expired: bool,
}

fn set_features(fid: u32, value: u32) -> Sqe {
    let mut sqe = Sqe::zeroed();
    sqe.opcode = SET_FEATURES;
    sqe.cdw10.set(fid);
    sqe.cdw11.set(value);
    sqe
}

fn admin_command(opcode: u8) -> Sqe {
    let mut sqe = Sqe::zeroed();
    sqe.opcode = opcode;
    sqe
}

/// Queues `sqe` with the queue's next CID: CIDs go round all 65,536 values before one is used again,
/// so an answer that came twice cannot pass for the answer of a later command.
fn submit_fresh(h: &mut BlockingHost<TcpStream>, mut sqe: Sqe) -> u16 {
    let q = h.queue();
    if let Some(cid) = q.next_cid() {
        sqe.cid.set(cid);
    }
    q.submit(sqe, None, 0)
}

fn checked(c: std::io::Result<Completion>, what: &str) -> std::io::Result<Completion> {
    let c = c?;
    if c.status() == Status::SUCCESS {
        Ok(c)
    } else {
        Err(std::io::Error::other(format!("{what}: {:?}", c.status())))
    }
}

/// Connects controller `k`: admin queue, CC.EN, namespace attribute notices on, one AER
/// outstanding; and an I/O queue for the first [`IO_CONTROLLERS`].
fn connect(
    k: usize,
    addr: &str,
    nqns: &[String],
) -> std::io::Result<(Admin, Option<BlockingHost<TcpStream>>)> {
    let volume = k % VOLUMES;
    let (hostnqn, hostid) = (host_nqn(k % HOSTS), host_id(k % HOSTS));
    let stream = TcpStream::connect(addr)?;
    stream.set_nodelay(true)?;
    stream.set_read_timeout(Some(LOST_AFTER))?;
    let mut admin = BlockingHost::new(stream, HostOptions::default())?;
    let (sqe, data) =
        host::connect_command(0, 32, SETUP_KATO_MS, CNTLID_DYNAMIC, hostid, &nqns[volume], &hostnqn);
    let cntlid = checked(admin.command(sqe, Some(data), 0), "connect")?.cqe.dw0.get() as u16;
    checked(admin.command(host::property_set(offset::CC, PropertyWidth::Four, 0x0046_0001), None, 0), "CC")?;
    checked(
        admin.command(set_features(0x0B, AsyncEventConfig::NAMESPACE_ATTRIBUTE), None, 0),
        "async event configuration",
    )?;
    let io = if k < IO_CONTROLLERS {
        checked(admin.command(set_features(0x07, 0x0000_0000), None, 0), "number of queues")?;
        let stream = TcpStream::connect(addr)?;
        stream.set_nodelay(true)?;
        stream.set_read_timeout(Some(LOST_AFTER))?;
        let mut q = BlockingHost::new(stream, HostOptions::default())?;
        let (sqe, data) = host::connect_command(1, 128, 0, cntlid, hostid, &nqns[volume], &hostnqn);
        checked(q.command(sqe, Some(data), 0), "connect the I/O queue")?;
        Some(q)
    } else {
        None
    };
    let aer_cid = submit_fresh(&mut admin, admin_command(ASYNC_EVENT_REQUEST));
    admin.flush()?;
    admin.stream().set_nonblocking(true)?;
    let admin = Admin {
        host: admin,
        rx: BytesMut::new(),
        volume,
        aer_cid,
        aer: None,
        ka: None,
        answered_round: 0,
        next_due: Instant::now(),
        kato_set: false,
        failed: None,
        silent: false,
        expired: false,
    };
    Ok((admin, io))
}

/// Every admin queue, with a Keep Alive every KATO/2 each (at its own phase), as Linux hosts do.
struct Admins {
    ctrls: Vec<Admin>,
    round: u64,
    keep_alives: u64,
}

impl Admins {
    fn new(mut ctrls: Vec<Admin>) -> Self {
        let start = Instant::now();
        let period = Duration::from_millis(u64::from(KATO_MS / 2));
        let n = ctrls.len().max(1) as u32;
        for (k, c) in ctrls.iter_mut().enumerate() {
            c.next_due = start + period / n * k as u32;
        }
        Self { ctrls, round: 0, keep_alives: 0 }
    }

    fn send_keep_alive(c: &mut Admin, round: u64) {
        let sqe = if c.kato_set { admin_command(KEEP_ALIVE) } else { set_features(0x0F, KATO_MS) };
        c.kato_set = true;
        let cid = submit_fresh(&mut c.host, sqe);
        if let Err(e) = send_all(&mut c.host) {
            c.failed.get_or_insert(format!("sending a keep-alive: {e}"));
            return;
        }
        c.ka = Some((cid, Instant::now(), round));
    }

    /// Drives the queues until `done` holds; panics after `limit`.
    fn pump_until(&mut self, what: &str, limit: Duration, mut done: impl FnMut(&Self) -> bool) {
        let deadline = Instant::now() + limit;
        let period = Duration::from_millis(u64::from(KATO_MS / 2));
        let mut fds: Vec<libc::pollfd> = self
            .ctrls
            .iter_mut()
            .map(|c| libc::pollfd {
                fd: c.host.stream().as_raw_fd() as RawFd,
                events: libc::POLLIN,
                revents: 0,
            })
            .collect();
        loop {
            self.check_failures();
            if done(self) {
                return;
            }
            let now = Instant::now();
            assert!(now < deadline, "{what}: not done within {} s", limit.as_secs());
            let round = self.round;
            for c in &mut self.ctrls {
                if c.next_due <= now {
                    c.next_due += period;
                    if c.ka.is_none() && !c.silent {
                        Self::send_keep_alive(c, round);
                    }
                }
            }
            for f in &mut fds {
                f.revents = 0;
            }
            // SAFETY: `fds` is a valid array of pollfd for its length.
            let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, 10) };
            if n <= 0 {
                continue;
            }
            for (k, f) in fds.iter().enumerate() {
                if f.revents != 0 {
                    self.receive(k);
                }
            }
        }
    }

    fn receive(&mut self, k: usize) {
        let round = self.round;
        let c = &mut self.ctrls[k];
        if c.failed.is_some() || c.expired {
            return;
        }
        let mut buf = [0u8; 4096];
        loop {
            match c.host.stream().read(&mut buf) {
                Ok(0) if c.silent => {
                    c.expired = true;
                    return;
                }
                Ok(0) => {
                    c.failed = Some("the target closed the connection".into());
                    return;
                }
                Ok(n) => c.rx.extend_from_slice(&buf[..n]),
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(_) if c.silent => {
                    c.expired = true;
                    return;
                }
                Err(e) => {
                    c.failed = Some(format!("reading: {e}"));
                    return;
                }
            }
        }
        if let Err(e) = c.host.queue().handle_input(&mut c.rx) {
            // A second answer to a command is "response for an unknown command" here.
            c.failed = Some(format!("from the target: {e}"));
            return;
        }
        while let Some(done) = c.host.queue().poll_completion() {
            let cid = done.cqe.cid.get();
            if cid == c.aer_cid && c.aer.is_none() {
                c.aer = Some((done.status(), done.cqe.dw0.get()));
            } else if let Some((_, _, sent_round)) = c.ka.filter(|(id, _, _)| *id == cid) {
                if done.status() != Status::SUCCESS {
                    c.failed = Some(format!("keep-alive answered {:?}", done.status()));
                }
                c.ka = None;
                c.answered_round = sent_round;
                self.keep_alives += 1;
                // A round asked for a keep-alive sent after it started: send it now.
                if sent_round < round && !c.silent {
                    Self::send_keep_alive(c, round);
                }
            } else {
                c.failed = Some(format!("a completion for CID {cid}, which is not outstanding"));
            }
        }
    }

    fn check_failures(&self) {
        let failed: Vec<String> = self
            .ctrls
            .iter()
            .enumerate()
            .filter_map(|(k, c)| c.failed.as_ref().map(|f| format!("controller {k}: {f}")))
            .collect();
        assert!(failed.is_empty(), "{} controller(s) failed, the first: {:?}", failed.len(), failed.first());
        let overdue =
            self.ctrls.iter().filter(|c| c.ka.is_some_and(|(_, t, _)| t.elapsed() > LOST_AFTER)).count();
        assert_eq!(overdue, 0, "keep-alives unanswered for {} s", LOST_AFTER.as_secs());
    }

    /// A keep-alive sent from now on is answered on every admin queue.
    fn round(&mut self, what: &str) {
        self.round += 1;
        let round = self.round;
        for c in &mut self.ctrls {
            if c.ka.is_none() && !c.silent {
                Self::send_keep_alive(c, round);
            }
        }
        self.pump_until(what, LOST_AFTER, |a| a.ctrls.iter().all(|c| c.silent || c.answered_round >= round));
    }
}

/// Writes every PDU the queue has to a non-blocking stream (capsules are small; the socket has
/// room unless the target stopped reading for a long time).
fn send_all(h: &mut BlockingHost<TcpStream>) -> std::io::Result<()> {
    let pdus: Vec<_> = std::iter::from_fn(|| h.queue().poll_transmit()).collect();
    for pdu in &pdus {
        for chunk in pdu.chunks() {
            let mut chunk: &[u8] = chunk;
            let start = Instant::now();
            while !chunk.is_empty() {
                match h.stream().write(chunk) {
                    Ok(0) => return Err(ErrorKind::WriteZero.into()),
                    Ok(n) => chunk = &chunk[n..],
                    Err(e) if e.kind() == ErrorKind::WouldBlock && start.elapsed() < LOST_AFTER => {
                        std::thread::sleep(Duration::from_micros(200));
                    }
                    Err(e) => return Err(e),
                }
            }
        }
    }
    Ok(())
}

// ---- I/O queues: QD32 of 4 KiB writes and read-back verifies ----

/// What a slot's outstanding command is.
#[derive(Clone, Copy, Debug)]
enum Op {
    Write { slot: usize, generation: u64 },
    Read { slot: usize, generation: u64 },
}

/// The data of `slot`'s `generation` on I/O controller `k`.
fn pattern(k: usize, slot: usize, generation: u64) -> Vec<u8> {
    let seed = ((k as u64) << 48) ^ ((slot as u64) << 32) ^ generation;
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut out = Vec::with_capacity(4096);
    while out.len() < 4096 {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out
}

#[derive(Debug, Default)]
struct IoTotals {
    /// Commands answered (all of the queues).
    completed: AtomicU64,
    /// Reads whose data matched.
    verified: AtomicU64,
}

/// Runs QD32 on I/O controller `k` until `stop`, then lets every outstanding command finish.
/// Each slot writes a new generation, reads it back and compares. Returns an error for a lost,
/// failed or duplicated command or for data that differs.
fn run_io(
    k: usize,
    mut q: BlockingHost<TcpStream>,
    stop: &AtomicBool,
    totals: &IoTotals,
) -> Result<BlockingHost<TcpStream>, String> {
    // Controllers on one volume use disjoint ranges.
    let base = (k / VOLUMES * QD) as u64 * u64::from(BLOCKS);
    let lba = |slot: usize| base + slot as u64 * u64::from(BLOCKS);
    let mut outstanding: HashMap<u16, Op> = HashMap::new();
    let submit = |q: &mut BlockingHost<TcpStream>, outstanding: &mut HashMap<u16, Op>, op: Op| {
        let mut sqe = match op {
            Op::Write { slot, .. } => host::rw_command(0x01, 1, lba(slot), BLOCKS),
            Op::Read { slot, .. } => host::rw_command(0x02, 1, lba(slot), BLOCKS),
        };
        // As `submit_fresh`.
        let cid = q.queue().next_cid().ok_or("no free CID")?;
        sqe.cid.set(cid);
        let cid = match op {
            Op::Write { slot, generation } => {
                q.submit(sqe, Some(Payload::from(pattern(k, slot, generation))), 0)
            }
            Op::Read { .. } => q.submit(sqe, None, 4096),
        }
        .map_err(|e| format!("I/O controller {k}: submitting: {e}"))?;
        if outstanding.insert(cid, op).is_some() {
            return Err(format!("I/O controller {k}: CID {cid} used twice"));
        }
        Ok::<(), String>(())
    };
    for slot in 0..QD {
        submit(&mut q, &mut outstanding, Op::Write { slot, generation: 0 })?;
    }
    while !outstanding.is_empty() {
        let c = q
            .next_completion()
            .map_err(|e| format!("I/O controller {k}: {} command(s) unanswered: {e}", outstanding.len()))?;
        totals.completed.fetch_add(1, Ordering::Relaxed);
        let cid = c.cqe.cid.get();
        let op = outstanding.remove(&cid).ok_or_else(|| {
            format!("I/O controller {k}: an answer for CID {cid}, which is not outstanding")
        })?;
        if c.status() != Status::SUCCESS {
            return Err(format!("I/O controller {k}: {op:?} failed: {:?}", c.status()));
        }
        let next = match op {
            Op::Write { slot, generation } => Op::Read { slot, generation },
            Op::Read { slot, generation } => {
                if c.data.to_bytes()[..] != pattern(k, slot, generation)[..] {
                    return Err(format!(
                        "I/O controller {k}: slot {slot} read back other data than generation {generation}"
                    ));
                }
                totals.verified.fetch_add(1, Ordering::Relaxed);
                Op::Write { slot, generation: generation + 1 }
            }
        };
        if !stop.load(Ordering::Relaxed) {
            submit(&mut q, &mut outstanding, next)?;
        }
    }
    Ok(q)
}

// ---- the test ----

/// A "new binary" that connects to the rendezvous socket (its last argument) and says it reads
/// handover format 999.
const WRONG_FORMAT_SCRIPT: &str = r#"#!/usr/bin/env python3
import os, socket, struct, sys

def varint(n):
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)

build = b"xatastor-target 9.9.9 (format 999)"
# Msg::Hello { format: u32, pid: u32, build: String }, postcard: variant 0, then the fields.
body = varint(0) + varint(999) + varint(os.getpid()) + varint(len(build)) + build
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.connect(sys.argv[-1])
s.sendall(b"XSHO" + struct.pack("<HHQII", 1, 0, len(body), 0, 0) + body)
# The node answers Refused and stops this process.
while s.recv(65536):
    pass
"#;

/// Runs `upgrade ARGS…` while the admin queues are driven; returns its output.
fn upgrade(node: &Node, admins: &mut Admins, args: &[&str]) -> Output {
    let mut all = vec!["upgrade"];
    all.extend_from_slice(args);
    let mut cli = node.command(&all).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    let mut status = None;
    admins.pump_until("upgrade", Duration::from_secs(120), |_| {
        status = cli.try_wait().unwrap();
        status.is_some()
    });
    let mut stdout = Vec::new();
    let mut stderr = Vec::new();
    cli.stdout.take().unwrap().read_to_end(&mut stdout).unwrap();
    cli.stderr.take().unwrap().read_to_end(&mut stderr).unwrap();
    Output { status: status.unwrap(), stdout, stderr }
}

/// The node still serves after a failed upgrade: the same process, admin requests, every
/// controller's keep-alive, I/O progress.
fn still_serving(node: &mut Node, admins: &mut Admins, io: &IoTotals, what: &str) {
    assert!(node.child.try_wait().unwrap().is_none(), "{what}: the node exited");
    assert_eq!(node.pid, node.child.id());
    assert_eq!(node.json(&["status"])["controllers"], CONTROLLERS, "{what}");
    admins.round(what);
    let before = io.completed.load(Ordering::Relaxed);
    let want = before + (IO_CONTROLLERS * QD * 2) as u64;
    admins.pump_until(what, LOST_AFTER, |_| io.completed.load(Ordering::Relaxed) >= want);
}

#[test]
fn upgrade_under_load_keeps_every_controller_and_command() {
    let dir = tempfile::tempdir().unwrap();
    let mut node = Node::start(dir.path());
    let nqns: Vec<String> = (0..VOLUMES)
        .map(|v| {
            let r = node.json(&["volume", "create", &format!("v{v}"), "--size", "64MiB", "--allow-any-host"]);
            r["nqn"].as_str().unwrap().to_owned()
        })
        .collect();

    // 1,000 controllers, connected by 4 threads.
    let addr = node.addr.clone();
    let mut connected: Vec<(usize, Admin, Option<BlockingHost<TcpStream>>)> = std::thread::scope(|s| {
        let threads: Vec<_> = (0..4)
            .map(|t| {
                let (addr, nqns) = (&addr, &nqns);
                s.spawn(move || {
                    (t..CONTROLLERS)
                        .step_by(4)
                        .map(|k| {
                            let (a, io) =
                                connect(k, addr, nqns).unwrap_or_else(|e| panic!("controller {k}: {e}"));
                            (k, a, io)
                        })
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        threads.into_iter().flat_map(|t| t.join().unwrap()).collect()
    });
    connected.sort_by_key(|(k, _, _)| *k);
    let mut io_queues = Vec::new();
    let ctrls = connected
        .into_iter()
        .map(|(k, a, io)| {
            if let Some(q) = io {
                io_queues.push((k, q));
            }
            a
        })
        .collect();
    let mut admins = Admins::new(ctrls);
    assert_eq!(io_queues.len(), IO_CONTROLLERS);
    assert_eq!(node.json(&["status"])["controllers"], CONTROLLERS);
    // The KATO of the test from now on, then keep-alives at each controller's phase.
    admins.round("setting the keep-alive timeout");

    let stop = Arc::new(AtomicBool::new(false));
    let totals = Arc::new(IoTotals::default());
    let workers: Vec<_> = io_queues
        .into_iter()
        .map(|(k, q)| {
            let (stop, totals) = (stop.clone(), totals.clone());
            std::thread::spawn(move || run_io(k, q, &stop, &totals))
        })
        .collect();
    let want = (IO_CONTROLLERS * QD * 4) as u64;
    admins.pump_until("traffic starting", LOST_AFTER, |_| totals.completed.load(Ordering::Relaxed) >= want);

    // (a) A new binary that exits at once.
    let out = upgrade(&node, &mut admins, &["--binary", "/bin/false"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "an upgrade to /bin/false succeeded: {err}");
    // The reason in one line, then what the fallback (a restart) means for the hosts.
    assert!(
        err.starts_with("xatastor-target: upgrade did not happen: ") && err.lines().count() == 2,
        "{err}"
    );
    assert!(err.contains("hosts") || err.contains("host reconnects"), "{err}");
    assert!(err.contains("exited") && err.contains("before taking over"), "{err}");
    still_serving(&mut node, &mut admins, &totals, "after the upgrade to /bin/false");

    // (b) A new binary that reads another handover format.
    let script = dir.path().join("new-format").join("xatastor-target");
    std::fs::create_dir_all(script.parent().unwrap()).unwrap();
    std::fs::write(&script, WRONG_FORMAT_SCRIPT).unwrap();
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
    let out = upgrade(&node, &mut admins, &["--binary", script.to_str().unwrap()]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "an upgrade to format 999 succeeded: {err}");
    // The reason in one line, then what the fallback (a restart) means for the hosts.
    assert!(
        err.starts_with("xatastor-target: upgrade did not happen: ") && err.lines().count() == 2,
        "{err}"
    );
    assert!(err.contains("hosts") || err.contains("host reconnects"), "{err}");
    assert!(
        err.contains("format 999") && err.contains(&format!("writes {HANDOVER_FORMAT_VERSION}")),
        "the refusal names both versions: {err}"
    );
    still_serving(&mut node, &mut admins, &totals, "after the refused handover format");

    // The upgrade, to the same binary, with everything running.
    let old_pid = node.child.id();
    let before = totals.completed.load(Ordering::Relaxed);
    let out = upgrade(&node, &mut admins, &["--json"]);
    assert!(out.status.success(), "upgrade failed: {}\n{}", String::from_utf8_lossy(&out.stderr), node.log());
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let report = report.get("upgraded").unwrap_or(&report).clone();
    assert_eq!(report["old_pid"], old_pid, "{report}");
    let new_pid = u32::try_from(report["new_pid"].as_u64().unwrap()).unwrap();
    assert_ne!(new_pid, old_pid, "{report}");
    node.pid = new_pid;
    assert_eq!(report["connections"], CONTROLLERS + IO_CONTROLLERS, "{report}");
    assert_eq!(report["controllers"], CONTROLLERS, "{report}");
    assert_eq!(report["closed"], 0, "{report}");
    assert!(report["pause_ms"].as_f64().is_some() && report["quiesce_ms"].as_f64().is_some(), "{report}");
    eprintln!("upgrade report: {report}");
    // The old process exits once the new one serves; the new one answers the admin socket.
    let status = node.child.wait().unwrap();
    assert!(status.success(), "the old process exited with {status}: {}", node.log());
    assert!(node.serving_process_alive(), "the new process {new_pid} is gone: {}", node.log());
    assert_eq!(node.json(&["status"])["controllers"], CONTROLLERS);
    // Every controller answers, and I/O goes on.
    admins.round("keep-alives after the upgrade");
    // The new process runs the imported controllers' keep-alive timers: one host goes quiet and
    // loses its controller after its KATO, while the others, sending a Keep Alive every KATO/2,
    // keep theirs over several KATOs.
    admins.ctrls[SILENT].silent = true;
    let quiet_since = Instant::now();
    admins.pump_until("the silent host's controller ending", LOST_AFTER, |a| a.ctrls[SILENT].expired);
    let hold = Duration::from_millis(u64::from(KATO_MS) * 3 / 2);
    admins.pump_until("holding", LOST_AFTER, |_| quiet_since.elapsed() >= hold);
    admins.round("keep-alives after a KATO and a half");
    assert_eq!(node.json(&["status"])["controllers"], CONTROLLERS - 1);
    let want = totals.completed.load(Ordering::Relaxed).max(before) + (IO_CONTROLLERS * QD * 4) as u64;
    admins.pump_until("I/O after the upgrade", LOST_AFTER, |_| {
        totals.completed.load(Ordering::Relaxed) >= want
    });

    // Stop the traffic: every command answered once, every read equal to what was written.
    stop.store(true, Ordering::Relaxed);
    let finished: Vec<_> = workers.into_iter().map(|w| w.join().unwrap()).collect();
    let mut io_hosts = Vec::new();
    for r in finished {
        io_hosts.push(r.unwrap_or_else(|e| panic!("{e}")));
    }
    assert!(totals.verified.load(Ordering::Relaxed) > 0);
    for q in &mut io_hosts {
        assert_eq!(q.queue().outstanding(), 0);
    }
    eprintln!(
        "{} I/O commands answered, {} reads verified, {} keep-alives answered",
        totals.completed.load(Ordering::Relaxed),
        totals.verified.load(Ordering::Relaxed),
        admins.keep_alives
    );
    // No AER completed on the way: no event was raised.
    let early: Vec<_> =
        admins.ctrls.iter().enumerate().filter(|(_, c)| c.aer.is_some()).map(|(k, _)| k).collect();
    assert!(early.is_empty(), "AERs completed before any event: {early:?}");

    // An event after the upgrade: growing v1 raises Namespace Attribute Changed on its controllers,
    // whose AERs (sent to the old process) complete in the new one.
    assert_eq!(node.json(&["volume", "resize", "v1", "128MiB"])["size_bytes"], 128 << 20);
    admins.pump_until("the AEN after the upgrade", LOST_AFTER, |a| {
        a.ctrls.iter().filter(|c| c.volume == 1).all(|c| c.aer.is_some())
    });
    let expected = AsyncEvent::NAMESPACE_ATTRIBUTE_CHANGED.to_dw0();
    for (k, c) in admins.ctrls.iter().enumerate().filter(|(_, c)| c.volume == 1) {
        assert_eq!(c.aer, Some((Status::SUCCESS, expected)), "controller {k}");
    }
    // The others got none (a keep-alive sent after the resize is answered first).
    admins.round("keep-alives after the event");
    let wrong: Vec<_> = admins
        .ctrls
        .iter()
        .enumerate()
        .filter(|(_, c)| c.volume != 1 && c.aer.is_some())
        .map(|(k, _)| k)
        .collect();
    assert!(wrong.is_empty(), "controllers of other volumes got an event: {wrong:?}");
    assert!(!node.log().contains("panicked"), "{}", node.log());

    // A clean stop of the new process.
    // SAFETY: kill(2) on the process the upgrade started for this test.
    unsafe { libc::kill(new_pid as i32, libc::SIGTERM) };
    let deadline = Instant::now() + LOST_AFTER;
    while node.serving_process_alive() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(!node.serving_process_alive(), "the new process did not stop on SIGTERM");
    node.pid = node.child.id();
    node.reader.take().unwrap().join().unwrap();
    let log = node.log();
    assert!(log.contains("shutting down") && !log.contains("still in use"), "not a clean stop: {log}");
}
