//! `xatastor-scale --upgrade N,…`: how long a zero-downtime upgrade takes, and how long the hosts'
//! commands wait, against the number of connections.
//!
//! For each N, a fresh `xatastor-target` (the binary next to this one, file backend, one volume any
//! host may connect to) serves N controllers (one admin queue each, connected from 250 loopback
//! source addresses, each with a KATO of 5 minutes and an Asynchronous Event Request outstanding) plus one
//! probe controller whose I/O queue reads 4 KiB at QD1 without pause. Then this process runs
//! `xatastor-target upgrade --json` (to the same binary) and reports:
//!
//! - `pause ms` and `quiesce ms` from the node's report (the longest a command waited; the time to
//!   write every connection down);
//! - `upgrade ms`: the wall time of the `upgrade` command (starting the new process included);
//! - `probe max ms`: the longest read of the probe during the run (what a host sees);
//! - the RSS of the old process before and of the new process after;
//! - `lost`: controllers that did not answer a Keep Alive afterwards (sent on every admin queue at
//!   once), and `closed`: connections the new process could not take in.
//!
//! ```sh
//! cargo build --release -p xatastor-benches -p xatastor-examples
//! target/release/xatastor-scale --upgrade 1000,10000,18000
//! ```
//!
//! This process holds every connection's socket, so N is bounded by its open-file limit (20,000 on
//! the machines this was written on: about 19,800 connections); counts that do not fit are skipped
//! with a message. The node is bounded too: while it writes its connections down, the old process
//! holds a duplicate of every socket (two descriptors per connection), so with a limit of 20,000 an
//! upgrade of more than about 9,900 connections fails (the node says so and serves on). 100K
//! connections need hosts whose hard limit is far above that, and clients in several processes.

use std::io::{ErrorKind, Read};
use std::net::{SocketAddr, TcpStream};
use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use nvmeof_proto::nvme::fabrics::CNTLID_DYNAMIC;
use nvmeof_proto::nvme::registers::{offset, PropertyWidth};
use nvmeof_proto::nvme::{Sqe, Status};
use nvmeof_target::host::{self, BlockingHost, HostOptions};

use super::connected::{keep_alive, ok, pin, socket_from};

/// Asynchronous Event Request (admin opcode 0x0C).
const ASYNC_EVENT_REQUEST: u8 = 0x0C;
/// Descriptors this process needs besides the connections.
const SPARE_FDS: u64 = 200;
/// KATO the controllers connect with: long enough that none expires while the others connect
/// (this measures the handover, not keep-alive traffic).
const KATO_MS: u32 = 300_000;

/// What to run (from the command line).
pub(crate) struct Options {
    /// Connection counts.
    pub(crate) counts: Vec<u64>,
    /// Target worker threads.
    pub(crate) workers: usize,
    /// Core the target runs on.
    pub(crate) target_cpu: Option<usize>,
    /// Core this process runs on.
    pub(crate) client_cpu: Option<usize>,
}

/// `xatastor-target`, next to this binary.
fn target_binary() -> PathBuf {
    let me = std::env::current_exe().expect("own path");
    let bin = me.with_file_name("xatastor-target");
    if !bin.exists() {
        eprintln!(
            "{} not found: build it with `cargo build --release -p xatastor-examples` (same profile as this binary)",
            bin.display()
        );
        std::process::exit(1);
    }
    bin
}

/// A number of the flat JSON report (`"key": 12.5`).
fn report_number(report: &str, key: &str) -> Option<f64> {
    let at = report.find(&format!("\"{key}\""))? + key.len() + 2;
    let rest = report.get(at..)?.trim_start().strip_prefix(':')?.trim_start();
    let end = rest.find(|c: char| !(c.is_ascii_digit() || matches!(c, '.' | '-' | 'e' | 'E' | '+')))?;
    rest.get(..end)?.parse().ok()
}

struct Node {
    dir: tempfile::TempDir,
    /// The node's log (both processes write it; kept after the run).
    log: PathBuf,
    bin: PathBuf,
    child: Child,
    addr: SocketAddr,
    /// The process serving now (another one after the upgrade).
    pid: u32,
}

impl Node {
    #[allow(clippy::disallowed_methods)]
    fn start(o: &Options, log: PathBuf) -> Self {
        let dir = tempfile::tempdir().expect("temporary directory");
        let bin = target_binary();
        let mut cmd = Command::new(&bin);
        cmd.arg("--data-dir").arg(dir.path());
        cmd.args(["serve", "--backend", "file", "--listen", "127.0.0.1:0", "--metrics-listen", "off"]);
        cmd.args(["--workers", &o.workers.to_string(), "--log", "info,nvmeof_target=warn"]);
        if let Some(cpu) = o.target_cpu {
            // SAFETY: the closure runs in the child between fork and exec and only makes
            // async-signal-safe system calls (sched_setaffinity) on a local cpu_set_t.
            unsafe {
                cmd.pre_exec(move || {
                    let mut set: libc::cpu_set_t = std::mem::zeroed();
                    libc::CPU_SET(cpu, &mut set);
                    if libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
        }
        let file = std::fs::File::create(&log).expect("log file");
        let child =
            cmd.stdin(Stdio::null()).stdout(Stdio::null()).stderr(file).spawn().expect("start the node");
        let pid = child.id();
        let mut node = Self { dir, log, bin, child, addr: SocketAddr::from(([127, 0, 0, 1], 0)), pid };
        // The admin socket answers once the node serves; its status says where it listens.
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let out = node.cli(&["--json", "status"]);
            if out.0 {
                let listen = out.1.split("\"listen\"").nth(1).and_then(|r| r.split('"').nth(1)).unwrap_or("");
                node.addr = listen.parse().expect("the node's listen address");
                break;
            }
            if node.child.try_wait().expect("node").is_some() || Instant::now() > deadline {
                eprintln!("the node did not start: see {}", node.log.display());
                std::process::exit(1);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        node
    }

    /// Runs `xatastor-target --data-dir D ARGS…`: (success, stdout, stderr).
    fn cli(&self, args: &[&str]) -> (bool, String, String) {
        let out =
            Command::new(&self.bin).arg("--data-dir").arg(self.dir.path()).args(args).output().expect("cli");
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    fn rss_kib(&self) -> u64 {
        super::rss_kib_of(&self.pid.to_string())
    }

    #[allow(clippy::disallowed_methods)]
    fn stop(mut self) {
        // SAFETY: kill(2) on the node process this run started (directly or through its upgrade).
        unsafe { libc::kill(self.pid as i32, libc::SIGTERM) };
        if self.pid == self.child.id() {
            let _ = self.child.wait();
            return;
        }
        let _ = self.child.wait();
        let deadline = Instant::now() + Duration::from_secs(30);
        while Path::new(&format!("/proc/{}", self.pid)).exists() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// One controller's admin queue (non-blocking after setup).
struct Admin {
    host: BlockingHost<TcpStream>,
    rx: BytesMut,
    /// The Keep Alive of the final check is outstanding.
    waiting: bool,
    lost: bool,
}

fn connect_admin(
    i: u64,
    to: SocketAddr,
    subnqn: &str,
    hostnqn: &str,
    kato_ms: u32,
) -> std::io::Result<Admin> {
    let mut hostid = [0u8; 16];
    hostid[..8].copy_from_slice(&i.to_le_bytes());
    let mut admin = BlockingHost::new(socket_from(i, to)?, HostOptions::default())?;
    let (sqe, data) = host::connect_command(0, 32, kato_ms, CNTLID_DYNAMIC, hostid, subnqn, hostnqn);
    ok(admin.command(sqe, Some(data), 0), "connect")?;
    ok(admin.command(host::property_set(offset::CC, PropertyWidth::Four, 0x0046_0001), None, 0), "CC")?;
    let mut aer = Sqe::zeroed();
    aer.opcode = ASYNC_EVENT_REQUEST;
    admin.submit(aer, None, 0)?;
    admin.stream().set_nonblocking(true)?;
    Ok(Admin { host: admin, rx: BytesMut::new(), waiting: false, lost: false })
}

/// A Keep Alive on every admin queue at once; returns the controllers that did not answer (closed,
/// an error, or nothing within `limit`).
#[allow(clippy::disallowed_methods)]
fn keep_alive_all(admins: &mut [Admin], limit: Duration) -> u64 {
    for a in admins.iter_mut() {
        a.host.queue().submit(keep_alive(), None, 0);
        a.waiting = super::connected::send_all(&mut a.host).is_ok();
        a.lost = !a.waiting;
    }
    let mut fds: Vec<libc::pollfd> = admins
        .iter_mut()
        .map(|a| libc::pollfd { fd: a.host.stream().as_raw_fd(), events: libc::POLLIN, revents: 0 })
        .collect();
    let deadline = Instant::now() + limit;
    let mut buf = vec![0u8; 4096];
    while admins.iter().any(|a| a.waiting) && Instant::now() < deadline {
        for f in &mut fds {
            f.revents = 0;
        }
        // SAFETY: `fds` is a valid array of pollfd for its length.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, 10) };
        if n <= 0 {
            continue;
        }
        for (a, f) in admins.iter_mut().zip(&fds) {
            if f.revents == 0 || !a.waiting {
                continue;
            }
            loop {
                match a.host.stream().read(&mut buf) {
                    Ok(0) => {
                        a.lost = true;
                        break;
                    }
                    Ok(n) => a.rx.extend_from_slice(buf.get(..n).unwrap_or_default()),
                    Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                    Err(e) if e.kind() == ErrorKind::Interrupted => {}
                    Err(_) => {
                        a.lost = true;
                        break;
                    }
                }
            }
            if a.host.queue().handle_input(&mut a.rx).is_err() {
                a.lost = true;
            }
            while let Some(c) = a.host.queue().poll_completion() {
                a.lost |= c.status() != Status::SUCCESS;
                a.waiting = false;
            }
            if a.lost {
                a.waiting = false;
            }
        }
    }
    admins.iter().filter(|a| a.lost || a.waiting).count() as u64
}

/// A controller with an I/O queue reading 4 KiB at QD1 until stopped; the longest read, in µs.
#[allow(clippy::disallowed_methods)]
fn probe(to: SocketAddr, subnqn: String, hostnqn: String, stop: Arc<AtomicBool>, max_us: Arc<AtomicU64>) {
    let hostid = [0xEE; 16];
    let mut reads = 0u64;
    let mut run = || -> std::io::Result<()> {
        let s = TcpStream::connect(to)?;
        s.set_nodelay(true)?;
        let mut admin = BlockingHost::new(s, HostOptions::default())?;
        let (sqe, data) = host::connect_command(0, 32, KATO_MS, CNTLID_DYNAMIC, hostid, &subnqn, &hostnqn);
        let cntlid = ok(admin.command(sqe, Some(data), 0), "connect")?.cqe.dw0.get() as u16;
        ok(admin.command(host::property_set(offset::CC, PropertyWidth::Four, 0x0046_0001), None, 0), "CC")?;
        let s = TcpStream::connect(to)?;
        s.set_nodelay(true)?;
        s.set_read_timeout(Some(Duration::from_secs(60)))?;
        let mut q = BlockingHost::new(s, HostOptions::default())?;
        let (sqe, data) = host::connect_command(1, 32, 0, cntlid, hostid, &subnqn, &hostnqn);
        ok(q.command(sqe, Some(data), 0), "connect I/O")?;
        let mut lba = 0u64;
        while !stop.load(Ordering::Relaxed) {
            let t = Instant::now();
            ok(q.command(host::rw_command(0x02, 1, lba, 8), None, 4096), "read")?;
            max_us.fetch_max(t.elapsed().as_micros() as u64, Ordering::Relaxed);
            reads += 1;
            lba = (lba + 8) % (1 << 20);
        }
        // The admin queue lives until here.
        drop(admin);
        Ok(())
    };
    if let Err(e) = run() {
        eprintln!("probe: after {reads} reads: {e}");
        max_us.store(u64::MAX, Ordering::Relaxed);
    }
}

struct Row {
    connections: u64,
    handed: u64,
    controllers: u64,
    closed: u64,
    held: u64,
    quiesce_ms: f64,
    pause_ms: f64,
    wall_ms: f64,
    probe_max_ms: f64,
    rss_old_kib: u64,
    rss_new_kib: u64,
    lost: u64,
}

/// Runs every count and prints a table.
pub(crate) fn run(o: &Options) {
    if let Some(cpu) = o.client_cpu {
        pin(cpu);
    }
    let _ = xatastor_core::raise_open_file_limit();
    // SAFETY: getrlimit writes the struct it is given.
    let limit = unsafe {
        let mut l: libc::rlimit = std::mem::zeroed();
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut l);
        l.rlim_cur
    };
    println!(
        "# the client holds every connection: at most {} fit its open-file limit of {limit}",
        limit.saturating_sub(SPARE_FDS)
    );
    println!(
        "{:>7} {:>7} {:>7} {:>6} {:>5} {:>10} {:>9} {:>10} {:>12} {:>11} {:>11} {:>5}",
        "conns",
        "handed",
        "ctrls",
        "closed",
        "held",
        "quiesce ms",
        "pause ms",
        "upgrade ms",
        "probe max ms",
        "RSS old MiB",
        "RSS new MiB",
        "lost"
    );
    for &n in &o.counts {
        if n + SPARE_FDS > limit {
            println!(
                "{n:>7} skipped: this process holds every connection and may open {limit} files; more \
                 connections need a higher hard limit (or clients in several processes)"
            );
            continue;
        }
        let Some(r) = run_one(n, o) else { continue };
        println!(
            "{:>7} {:>7} {:>7} {:>6} {:>5} {:>10.1} {:>9.1} {:>10.1} {:>12.1} {:>11.1} {:>11.1} {:>5}",
            r.connections,
            r.handed,
            r.controllers,
            r.closed,
            r.held,
            r.quiesce_ms,
            r.pause_ms,
            r.wall_ms,
            r.probe_max_ms,
            r.rss_old_kib as f64 / 1024.0,
            r.rss_new_kib as f64 / 1024.0,
            r.lost
        );
    }
}

#[allow(clippy::disallowed_methods)]
fn run_one(n: u64, o: &Options) -> Option<Row> {
    let log = std::env::temp_dir().join(format!("xatastor-scale-upgrade-{}-{n}.log", std::process::id()));
    let mut node = Node::start(o, log);
    let (created, out, err) =
        node.cli(&["--json", "volume", "create", "upgrade", "--size", "1GiB", "--allow-any-host"]);
    if !created {
        eprintln!("volume create: {err}");
        node.stop();
        return None;
    }
    let subnqn = out.split("\"nqn\"").nth(1).and_then(|r| r.split('"').nth(1)).unwrap_or("").to_owned();
    let hostnqn = super::HOST.to_owned();

    let started = Instant::now();
    let mut admins = Vec::with_capacity(n as usize);
    for i in 0..n {
        match connect_admin(i, node.addr, &subnqn, &hostnqn, KATO_MS) {
            Ok(a) => admins.push(a),
            Err(e) => {
                eprintln!("controller {i}: {e}");
                break;
            }
        }
        if (i + 1) % 1000 == 0 {
            eprint!("\r{} controllers connected in {:.1} s ", i + 1, started.elapsed().as_secs_f64());
        }
    }
    eprintln!("\r{} controllers connected in {:.1} s", admins.len(), started.elapsed().as_secs_f64());
    let stop = Arc::new(AtomicBool::new(false));
    let max_us = Arc::new(AtomicU64::new(0));
    let probe_thread = {
        let (to, s, h, stop, m) = (node.addr, subnqn.clone(), hostnqn.clone(), stop.clone(), max_us.clone());
        std::thread::spawn(move || probe(to, s, h, stop, m))
    };
    std::thread::sleep(Duration::from_secs(1));
    let rss_old = node.rss_kib();
    max_us.store(0, Ordering::Relaxed);

    let t = Instant::now();
    let (upgraded, report, err) = node.cli(&["--json", "upgrade"]);
    let wall_ms = t.elapsed().as_secs_f64() * 1e3;
    // Reads go on a moment in the new process before the probe stops.
    std::thread::sleep(Duration::from_millis(500));
    stop.store(true, Ordering::Relaxed);
    let _ = probe_thread.join();
    if !upgraded {
        eprintln!("upgrade with {n} connections failed: {err}; node log: {}", node.log.display());
        drop(admins);
        node.stop();
        return None;
    }
    let num = |k: &str| report_number(&report, k).unwrap_or(f64::NAN);
    node.pid = num("new_pid") as u32;
    std::thread::sleep(Duration::from_millis(200));
    let rss_new = node.rss_kib();
    let lost = keep_alive_all(&mut admins, Duration::from_secs(30));
    let probe_max = max_us.load(Ordering::Relaxed);
    let row = Row {
        connections: admins.len() as u64 + 2,
        handed: num("connections") as u64,
        controllers: num("controllers") as u64,
        closed: num("closed") as u64,
        held: num("held_commands") as u64,
        quiesce_ms: num("quiesce_ms"),
        pause_ms: num("pause_ms"),
        wall_ms,
        probe_max_ms: if probe_max == u64::MAX { f64::NAN } else { probe_max as f64 / 1e3 },
        rss_old_kib: rss_old,
        rss_new_kib: rss_new,
        lost,
    };
    drop(admins);
    node.stop();
    Some(row)
}

#[cfg(test)]
mod tests {
    use super::report_number;

    #[test]
    fn numbers_are_read_from_the_report() {
        let r = "{\n  \"upgraded\": {\n    \"closed\": 0,\n    \"new_pid\": 4242,\n    \"pause_ms\": 12.5,\n    \"quiesce_ms\": 1.25e-3\n  }\n}";
        assert_eq!(report_number(r, "new_pid"), Some(4242.0));
        assert_eq!(report_number(r, "pause_ms"), Some(12.5));
        assert_eq!(report_number(r, "quiesce_ms"), Some(0.00125));
        assert_eq!(report_number(r, "closed"), Some(0.0));
        assert_eq!(report_number(r, "missing"), None);
    }
}
