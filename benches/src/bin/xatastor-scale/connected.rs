//! `xatastor-scale --connected N,…`: what *connected and idle* controllers cost a node.
//!
//! For each connection count N, a fresh target process (this binary, `--serve-connected`) loads one
//! memory-backed volume per controller and serves them with the io_uring server. This process then
//!
//! 1. connects the controllers: per controller an admin queue (ICReq, Connect with the KATO, CC.EN),
//!    and on every `--io-queue-every`-th one also an I/O queue, so that the admin queues plus the I/O
//!    queues make N connections. The connections come from 250 loopback source addresses
//!    (127.1.0.1 …) so that neither the ephemeral ports nor the per-address limit run out;
//! 2. holds them for `--hold-secs`: every controller sends a Keep Alive each KATO/2, each at its
//!    own random phase (independent hosts), as the Linux host does without traffic-based keep
//!    alive — with it (the target announces TBKAS), an idle Linux host sends one every KATO/4; the
//!    keep-alive rate below doubles then, the CPU per keep-alive does not change;
//! 3. checks every controller at the end (one more Keep Alive per admin queue, one 4 KiB read per I/O
//!    queue) and asks the target how many controllers it holds.
//!
//! Figures per N: the target's RSS with the volumes loaded and nothing connected, the RSS added per
//! controller (connected, and after the hold), keep-alives answered and their round trip, the
//! target's CPU time per keep-alive (all of its CPU over the hold, divided by the keep-alives — so
//! timers and everything else are charged to them), and controllers lost.
//!
//! ```sh
//! cargo run --release -p xatastor-benches --bin xatastor-scale -- \
//!     --connected 1000,5000,18000 --hold-secs 300 --target-cpu 0 --client-cpu 1
//! ```
//!
//! `--target-nofile SOFT:HARD` starts the target with that open-file limit (the server raises the
//! soft limit to the hard one at start). With a hard limit below N the target runs out of
//! descriptors: the connections it cannot accept wait in the listen backlog, the run reports how
//! many controllers did connect and counts the warning lines the target logged meanwhile.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::io::{BufRead, BufReader, ErrorKind, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpStream};
use std::os::fd::{AsRawFd, FromRawFd};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use hdrhistogram::Histogram;
use nvmeof_proto::nvme::fabrics::CNTLID_DYNAMIC;
use nvmeof_proto::nvme::nvm::RwCommand;
use nvmeof_proto::nvme::registers::{offset, PropertyWidth};
use nvmeof_proto::nvme::{Sqe, Status};
use nvmeof_target::host::{self, BlockingHost, HostOptions};
use nvmeof_target::{MemoryBackend, NamespaceConfig, SubsystemConfig, Target, TargetConfig};
use xatastor_core::{Server, ServerConfig};

use super::HOST;

/// Loopback source addresses the connections are spread over.
const SOURCES: u32 = 250;
/// Keep Alive (admin opcode 0x18).
const KEEP_ALIVE: u8 = 0x18;
/// KATO the controllers connect with; each sets the measured one as its first command of the hold,
/// so that a long connect phase does not expire the first controllers.
const SETUP_KATO_MS: u32 = 120_000;
/// How long connection setup waits for the target before counting a connection as not accepted.
const SETUP_TIMEOUT: Duration = Duration::from_secs(5);

/// What to run (from the command line).
pub(crate) struct Options {
    /// Connection counts.
    pub(crate) counts: Vec<u64>,
    /// How long the controllers are held, in seconds.
    pub(crate) hold_secs: u64,
    /// Keep-alive timeout each controller connects with, in milliseconds.
    pub(crate) kato_ms: u32,
    /// Every this many controllers, one also has an I/O queue.
    pub(crate) io_queue_every: u64,
    /// Target worker threads.
    pub(crate) workers: usize,
    /// Core the target runs on.
    pub(crate) target_cpu: Option<usize>,
    /// Core this process runs on.
    pub(crate) client_cpu: Option<usize>,
    /// Open-file limit (soft, hard) the target starts with.
    pub(crate) target_nofile: Option<(u64, u64)>,
    /// The target's batch window for quiet admin queues, in milliseconds.
    pub(crate) admin_batch_window_ms: u64,
}

/// How the target process runs.
pub(crate) struct Serve {
    /// Loaded volumes (one per controller).
    pub(crate) volumes: u64,
    /// Worker threads.
    pub(crate) workers: usize,
    /// Core to run on.
    pub(crate) cpu: Option<usize>,
    /// Open-file limit (soft, hard) to start with.
    pub(crate) nofile: Option<(u64, u64)>,
    /// Batch window for quiet admin queues.
    pub(crate) admin_batch_window: Duration,
}

fn nqn(i: u64) -> String {
    format!("nqn.2026-12.io.xatastor.scale:connected-{i:06}")
}

/// Controllers and I/O queues that make `connections` connections.
fn split(connections: u64, every: u64) -> (u64, u64) {
    let every = every.max(1);
    let mut controllers = connections * every / (every + 1);
    while controllers + controllers.div_ceil(every) < connections {
        controllers += 1;
    }
    let io = connections.saturating_sub(controllers).min(controllers.div_ceil(every));
    (controllers, io)
}

pub(crate) fn pin(cpu: usize) {
    // SAFETY: cpu_set_t is plain data; CPU_SET writes inside it; sched_setaffinity reads it.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        if libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) != 0 {
            eprintln!("cannot pin to CPU {cpu}: {}", std::io::Error::last_os_error());
            std::process::exit(2);
        }
    }
}

/// Target side (a child process): `volumes` loaded volumes, the io_uring server, then a line of
/// figures for every line read on stdin; exits at the end of stdin.
pub(crate) fn serve(o: &Serve) {
    let volumes = o.volumes;
    if let Some(cpu) = o.cpu {
        pin(cpu);
    }
    if let Some((soft, hard)) = o.nofile {
        let lim = libc::rlimit { rlim_cur: soft, rlim_max: hard };
        // SAFETY: setrlimit reads the struct it is given.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) } != 0 {
            eprintln!("setrlimit(NOFILE, {soft}:{hard}): {}", std::io::Error::last_os_error());
            std::process::exit(2);
        }
    }
    // As `xatastor-target serve` does: the soft open-file limit goes up to the hard one.
    match xatastor_core::raise_open_file_limit() {
        Ok((old, new)) if old != new => eprintln!("raised the open-file limit from {old} to {new}"),
        Ok(_) => {}
        Err(e) => eprintln!("cannot raise the open-file limit: {e}"),
    }
    // Warnings (descriptors running out, …) go to stderr, which the parent counts.
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .with_max_level(tracing::Level::WARN)
        .init();
    let target = Target::new(TargetConfig::default());
    for i in 0..volumes {
        let name = nqn(i);
        let mut config = SubsystemConfig::new(name.clone(), format!("SCALE{i:06}"));
        config.allowed_hosts = vec![HOST.to_owned()];
        target.add_subsystem(config).expect("add subsystem");
        let backend = Arc::new(MemoryBackend::new(64 << 20, 512));
        target.add_namespace(&name, NamespaceConfig::derived(&name, 1, backend)).expect("add namespace");
    }
    let mut sc = ServerConfig::new("127.0.0.1:0".parse().expect("address"));
    sc.workers = o.workers;
    sc.admin_batch_window = o.admin_batch_window;
    sc.max_connections_per_peer = 1 << 20;
    let server = Server::start(target.clone(), sc).expect("server");
    println!("ready {}", server.local_addr().port());
    std::io::stdout().flush().expect("stdout");
    for line in std::io::stdin().lock().lines() {
        if line.is_err() {
            break;
        }
        let w = server.worker_stats();
        println!(
            "{} {} {} {}",
            target.controller_count(),
            w.iter().map(|s| s.quiet_admin_queues).sum::<usize>(),
            w.iter().map(|s| s.admin_batches).sum::<u64>(),
            w.iter().map(|s| s.admin_batched_receives).sum::<u64>()
        );
        std::io::stdout().flush().expect("stdout");
    }
    let _ = server.shutdown();
}

struct TargetProcess {
    child: Child,
    stdin: Option<ChildStdin>,
    stdout: BufReader<ChildStdout>,
    port: u16,
    log: std::path::PathBuf,
}

impl TargetProcess {
    fn start(volumes: u64, o: &Options, log: std::path::PathBuf) -> Self {
        let mut cmd = Command::new(std::env::current_exe().expect("own path"));
        cmd.args(["--serve-connected", &volumes.to_string(), "--workers", &o.workers.to_string()]);
        cmd.args(["--admin-batch-window-ms", &o.admin_batch_window_ms.to_string()]);
        if let Some(cpu) = o.target_cpu {
            cmd.args(["--target-cpu", &cpu.to_string()]);
        }
        if let Some((s, h)) = o.target_nofile {
            cmd.args(["--target-nofile", &format!("{s}:{h}")]);
        }
        let mut child = cmd
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&log).expect("log file"))
            .spawn()
            .expect("start the target");
        let stdin = child.stdin.take();
        let mut stdout = BufReader::new(child.stdout.take().expect("stdout"));
        let mut line = String::new();
        stdout.read_line(&mut line).expect("target output");
        let port = line.strip_prefix("ready ").and_then(|p| p.trim().parse().ok()).unwrap_or_else(|| {
            eprintln!("the target did not start: {line:?}; see {}", log.display());
            std::process::exit(1);
        });
        Self { child, stdin, stdout, port, log }
    }

    /// Controllers, quiet admin queues, batch windows, receives served in them.
    fn stats(&mut self) -> [u64; 4] {
        let stdin = self.stdin.as_mut().expect("stdin");
        writeln!(stdin).and_then(|()| stdin.flush()).expect("ask the target");
        let mut line = String::new();
        self.stdout.read_line(&mut line).expect("target output");
        let mut f = line.split_whitespace().map(|x| x.parse().unwrap_or(0));
        [(); 4].map(|()| f.next().unwrap_or(0))
    }

    fn rss_kib(&self) -> u64 {
        super::rss_kib_of(&self.child.id().to_string())
    }

    /// CPU time of all the target's threads, in nanoseconds.
    fn cpu_ns(&self) -> u64 {
        super::cpu_ns_of(self.child.id())
    }

    fn warnings(&self) -> usize {
        std::fs::read_to_string(&self.log)
            .map(|s| s.lines().filter(|l| l.contains("WARN")).count())
            .unwrap_or(0)
    }

    fn stop(mut self) {
        drop(self.stdin.take());
        let _ = self.child.wait();
    }
}

/// One controller (its admin queue) and, on some, an I/O queue.
struct Ctrl {
    admin: BlockingHost<TcpStream>,
    rx: BytesMut,
    io: Option<BlockingHost<TcpStream>>,
    /// When the outstanding keep-alive was sent.
    sent: Option<Instant>,
    /// The measured KATO is set (the first command of the hold does it).
    kato_set: bool,
    /// The admin queue's socket, for epoll.
    admin_fd: std::os::fd::RawFd,
}

pub(crate) fn socket_from(k: u64, to: SocketAddr) -> std::io::Result<TcpStream> {
    let k = (k % u64::from(SOURCES)) as u32;
    let src = Ipv4Addr::new(127, 1, (k / 250) as u8, (k % 250 + 1) as u8);
    let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)?;
    s.bind(&SocketAddr::V4(SocketAddrV4::new(src, 0)).into())?;
    s.connect_timeout(&to.into(), Duration::from_secs(1))?;
    let s: TcpStream = s.into();
    s.set_nodelay(true)?;
    s.set_read_timeout(Some(SETUP_TIMEOUT))?;
    Ok(s)
}

/// The completion if it succeeded, else an error naming `what` and its status.
pub(crate) fn ok(c: std::io::Result<host::Completion>, what: &str) -> std::io::Result<host::Completion> {
    let c = c?;
    if c.status() == Status::SUCCESS {
        Ok(c)
    } else {
        Err(std::io::Error::other(format!("{what}: {:?}", c.status())))
    }
}

fn connect_controller(i: u64, to: SocketAddr, with_io: bool) -> std::io::Result<Ctrl> {
    let subnqn = nqn(i);
    let mut hostid = [0u8; 16];
    hostid[..8].copy_from_slice(&i.to_le_bytes());
    let mut admin = BlockingHost::new(socket_from(i, to)?, HostOptions::default())?;
    let (sqe, data) = host::connect_command(0, 32, SETUP_KATO_MS, CNTLID_DYNAMIC, hostid, &subnqn, HOST);
    let c = ok(admin.command(sqe, Some(data), 0), "connect")?;
    let cntlid = c.cqe.dw0.get() as u16;
    ok(admin.command(host::property_set(offset::CC, PropertyWidth::Four, 0x0046_0001), None, 0), "CC")?;
    let io = if with_io {
        let mut nq = Sqe::zeroed();
        nq.opcode = 0x09;
        nq.cdw10.set(0x07);
        ok(admin.command(nq, None, 0), "set features")?;
        let mut q = BlockingHost::new(socket_from(i + 7, to)?, HostOptions::default())?;
        let (sqe, data) = host::connect_command(1, 32, 0, cntlid, hostid, &subnqn, HOST);
        ok(q.command(sqe, Some(data), 0), "connect I/O queue")?;
        Some(q)
    } else {
        None
    };
    let admin_fd = admin.stream().as_raw_fd();
    Ok(Ctrl { admin, rx: BytesMut::new(), io, sent: None, kato_set: false, admin_fd })
}

/// Set Features, Keep Alive Timer (FID 0Fh).
fn set_kato(ms: u32) -> Sqe {
    let mut sf = Sqe::zeroed();
    sf.opcode = 0x09;
    sf.cdw10.set(0x0F);
    sf.cdw11.set(ms);
    sf
}

pub(crate) fn keep_alive() -> Sqe {
    let mut ka = Sqe::zeroed();
    ka.opcode = KEEP_ALIVE;
    ka
}

/// Writes every PDU the host's queue has to a non-blocking stream (a capsule is 72 bytes: the socket
/// buffer has room unless the target stopped reading, which counts as a failure after a while).
#[allow(clippy::disallowed_methods)] // a benchmark client: it owns its clock
pub(crate) fn send_all(h: &mut BlockingHost<TcpStream>) -> std::io::Result<()> {
    let pdus: Vec<_> = std::iter::from_fn(|| h.queue().poll_transmit()).collect();
    let stream = h.stream();
    for pdu in &pdus {
        for chunk in pdu.chunks() {
            let mut chunk: &[u8] = chunk;
            let start = Instant::now();
            while !chunk.is_empty() {
                match stream.write(chunk) {
                    Ok(0) => return Err(ErrorKind::WriteZero.into()),
                    Ok(n) => chunk = chunk.get(n..).unwrap_or_default(),
                    Err(e) if e.kind() == ErrorKind::WouldBlock && start.elapsed() < SETUP_TIMEOUT => {
                        std::thread::sleep(Duration::from_micros(100));
                    }
                    Err(e) => return Err(e),
                }
            }
        }
    }
    Ok(())
}

/// Reads what arrived (non-blocking); returns the completions' statuses.
fn poll_ctrl(c: &mut Ctrl) -> std::io::Result<Vec<Status>> {
    let mut buf = [0u8; 4096];
    loop {
        match c.admin.stream().read(&mut buf) {
            Ok(0) => return Err(ErrorKind::UnexpectedEof.into()),
            Ok(n) => c.rx.extend_from_slice(buf.get(..n).unwrap_or_default()),
            Err(e) if e.kind() == ErrorKind::WouldBlock => break,
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    c.admin.queue().handle_input(&mut c.rx).map_err(|e| std::io::Error::new(ErrorKind::InvalidData, e))?;
    let mut out = Vec::new();
    while let Some(done) = c.admin.queue().poll_completion() {
        out.push(done.status());
    }
    Ok(out)
}

/// Readiness of the admin queues' sockets (level-triggered).
struct Epoll(std::os::fd::OwnedFd);

impl Epoll {
    fn new(ctrls: &[Ctrl]) -> Self {
        // SAFETY: epoll_create1 has no memory arguments; a non-negative result is a new descriptor
        // that nothing else owns.
        let fd = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
        assert!(fd >= 0, "epoll_create1: {}", std::io::Error::last_os_error());
        // SAFETY: see above.
        let ep = Self(unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) });
        for (k, c) in ctrls.iter().enumerate() {
            let mut ev =
                libc::epoll_event { events: libc::EPOLLIN as u32 | libc::EPOLLRDHUP as u32, u64: k as u64 };
            let sock = c.admin_fd;
            // SAFETY: both descriptors are open; `ev` is a valid epoll_event for the call.
            let r = unsafe { libc::epoll_ctl(ep.0.as_raw_fd(), libc::EPOLL_CTL_ADD, sock, &mut ev) };
            assert!(r == 0, "epoll_ctl: {}", std::io::Error::last_os_error());
        }
        ep
    }

    /// Indices of the controllers whose admin socket is readable, waiting up to `timeout`.
    fn wait(&self, timeout: Duration, out: &mut Vec<usize>) {
        let mut events = [libc::epoll_event { events: 0, u64: 0 }; 256];
        let ms = i32::try_from(timeout.as_micros().div_ceil(1000)).unwrap_or(i32::MAX);
        // SAFETY: `events` is writable for its length.
        let n = unsafe { libc::epoll_wait(self.0.as_raw_fd(), events.as_mut_ptr(), events.len() as i32, ms) };
        out.clear();
        out.extend(events.iter().take(usize::try_from(n).unwrap_or(0)).map(|e| e.u64 as usize));
    }
}

/// One row of figures.
struct Row {
    connections: u64,
    controllers: u64,
    io_queues: u64,
    refused: u64,
    rss_volumes_kib: u64,
    per_ctrl_connected: f64,
    per_ctrl_held: f64,
    keep_alives: u64,
    hold_secs: f64,
    cpu_pct: f64,
    us_per_ka: f64,
    rtt: Histogram<u64>,
    lost: u64,
    target_controllers: u64,
    warnings: usize,
}

/// Runs every count and prints a table.
pub(crate) fn run(o: &Options) {
    if let Some(cpu) = o.client_cpu {
        pin(cpu);
    }
    println!(
        "{:>6} {:>6} {:>5} {:>6} {:>9} {:>9} {:>9} {:>9} {:>7} {:>7} {:>8} {:>8} {:>8} {:>8} {:>5} {:>5}",
        "conns",
        "ctrls",
        "ioq",
        "refusd",
        "vols MiB",
        "KiB/ctrl",
        "KiB held",
        "KAs",
        "KA/s",
        "CPU %",
        "µs/KA",
        "RTT p50",
        "RTT p99",
        "RTT max",
        "lost",
        "warns"
    );
    for &n in &o.counts {
        let r = run_one(n, o);
        println!(
            "{:>6} {:>6} {:>5} {:>6} {:>9.1} {:>9.2} {:>9.2} {:>9} {:>7.0} {:>7.2} {:>8.2} {:>6}µs {:>6}µs {:>6}µs {:>5} {:>5}",
            r.connections,
            r.controllers,
            r.io_queues,
            r.refused,
            r.rss_volumes_kib as f64 / 1024.0,
            r.per_ctrl_connected,
            r.per_ctrl_held,
            r.keep_alives,
            r.keep_alives as f64 / r.hold_secs,
            r.cpu_pct,
            r.us_per_ka,
            r.rtt.value_at_quantile(0.5),
            r.rtt.value_at_quantile(0.99),
            r.rtt.max(),
            r.lost,
            r.warnings,
        );
        if r.target_controllers != r.controllers.saturating_sub(r.refused) {
            println!(
                "       the target holds {} controllers, {} connected",
                r.target_controllers,
                r.controllers - r.refused
            );
        }
    }
}

#[allow(clippy::disallowed_methods)]
fn run_one(connections: u64, o: &Options) -> Row {
    let (controllers, io_queues) = split(connections, o.io_queue_every);
    let log = std::env::temp_dir()
        .join(format!("xatastor-scale-connected-{}-{connections}.log", std::process::id()));
    let mut t = TargetProcess::start(controllers, o, log);
    let to = SocketAddr::from(([127, 0, 0, 1], t.port));
    std::thread::sleep(Duration::from_millis(200));
    let rss_volumes = t.rss_kib();

    // Connect.
    let mut ctrls: Vec<Ctrl> = Vec::with_capacity(controllers as usize);
    let mut refused = 0u64;
    let mut waiting: Vec<TcpStream> = Vec::new();
    let mut backlog_full = false;
    let started = Instant::now();
    for i in 0..controllers {
        let every = o.io_queue_every.max(1);
        let with_io = i % every == 0 && i / every < io_queues;
        if refused > 0 {
            // The target stopped accepting: the rest only wait in its listen backlog, as long as
            // there is room there (a connect that times out means the backlog is full).
            if !backlog_full {
                match socket_from(i, to) {
                    Ok(s) => waiting.push(s),
                    Err(_) => backlog_full = true,
                }
            }
            refused += 1;
            continue;
        }
        match connect_controller(i, to, with_io) {
            Ok(c) => ctrls.push(c),
            Err(e) => {
                eprintln!("controller {i}: {e}; the rest wait in the target's backlog");
                refused += 1;
            }
        }
        if (i + 1) % 1000 == 0 {
            eprint!("\r{} controllers connected in {:.1} s ", i + 1, started.elapsed().as_secs_f64());
        }
    }
    eprintln!("\r{} controllers connected in {:.1} s", ctrls.len(), started.elapsed().as_secs_f64());
    let io_connected = ctrls.iter().filter(|c| c.io.is_some()).count() as u64;
    std::thread::sleep(Duration::from_secs(1));
    let rss_connected = t.rss_kib();

    // Hold: keep-alives every KATO/2 at a random phase per controller.
    let period = Duration::from_millis(u64::from(o.kato_ms / 2).max(1));
    for c in &mut ctrls {
        c.admin.stream().set_nonblocking(true).expect("non-blocking");
    }
    let hold_start = Instant::now();
    // Measured from the end of the first period on: by then every host's timer runs at its phase.
    let mut measure: Option<(Instant, u64, u64)> = None;
    // Each host's timer runs at its own random phase; its first command sets the KATO.
    let mut due: BinaryHeap<Reverse<(Instant, usize)>> =
        (0..ctrls.len()).map(|k| Reverse((hold_start + period.mul_f64(fastrand::f64()), k))).collect();
    let (mut lost_unsent, mut lost_timeout, mut lost_status, mut lost_closed) = (0u64, 0u64, 0u64, 0u64);
    let mut outstanding = 0usize;
    let mut rtt = Histogram::<u64>::new_with_bounds(1, 600_000_000, 3).expect("histogram");
    let mut keep_alives = 0u64;
    let mut lost = vec![false; ctrls.len()];
    let hold = Duration::from_secs(o.hold_secs);
    let kato = Duration::from_millis(u64::from(o.kato_ms));
    let mut last_report = hold_start;
    let mut last_scan = hold_start;
    let epoll = Epoll::new(&ctrls);
    let mut ready = Vec::new();
    loop {
        let now = Instant::now();
        let holding = now < hold_start + hold;
        while let Some(&Reverse((when, k))) = due.peek() {
            if when > now || !holding {
                break;
            }
            due.pop();
            let next = when + period;
            due.push(Reverse((if next > now { next } else { now + period }, k)));
            let c = &mut ctrls[k];
            if lost[k] || c.sent.is_some() {
                continue; // gone, or the previous one is still unanswered (a host waits too)
            }
            let cmd = if c.kato_set { keep_alive() } else { set_kato(o.kato_ms) };
            c.kato_set = true;
            c.admin.queue().submit(cmd, None, 0);
            if send_all(&mut c.admin).is_err() {
                lost[k] = true;
                lost_unsent += 1;
                continue;
            }
            c.sent = Some(Instant::now());
            outstanding += 1;
        }
        // Wait for answers until the next keep-alive is due (at most 10 ms).
        let next = due.peek().map_or(now + Duration::from_millis(10), |Reverse((w, _))| *w);
        let wait =
            if holding { next.saturating_duration_since(Instant::now()) } else { Duration::from_millis(10) };
        epoll.wait(wait.min(Duration::from_millis(10)), &mut ready);
        for &k in &ready {
            let c = &mut ctrls[k];
            if lost[k] {
                continue;
            }
            match poll_ctrl(c) {
                Ok(statuses) if statuses.is_empty() => {}
                Ok(statuses) => {
                    if statuses.iter().any(|s| *s != Status::SUCCESS) {
                        lost[k] = true;
                        lost_status += 1;
                    }
                    keep_alives += statuses.len() as u64;
                    if let Some(sent) = c.sent.take() {
                        rtt.saturating_record(sent.elapsed().as_micros() as u64);
                        outstanding -= 1;
                    }
                }
                Err(_) => {
                    lost[k] = true;
                    lost_closed += 1;
                    if c.sent.take().is_some() {
                        outstanding -= 1;
                    }
                }
            }
        }
        let now = Instant::now();
        if now.duration_since(last_scan) >= Duration::from_millis(100) {
            last_scan = now;
            for (k, c) in ctrls.iter_mut().enumerate() {
                if c.sent.is_some_and(|sent| now.duration_since(sent) > kato) && !lost[k] {
                    lost[k] = true;
                    lost_timeout += 1;
                    c.sent = None;
                    outstanding -= 1;
                }
            }
        }
        if !holding && outstanding == 0 {
            break;
        }
        if measure.is_none() && now >= hold_start + period {
            measure = Some((now, t.cpu_ns(), keep_alives));
        }
        if now.duration_since(last_report) >= Duration::from_secs(30) {
            last_report = now;
            eprintln!(
                "  {:.0} s: {keep_alives} keep-alives, {} lost",
                now.duration_since(hold_start).as_secs_f64(),
                lost.iter().filter(|&&l| l).count()
            );
        }
    }
    if lost_unsent + lost_timeout + lost_status + lost_closed > 0 {
        eprintln!(
            "lost during the hold: {lost_closed} closed by the target, {lost_timeout} unanswered within the \
             KATO, {lost_status} answered with an error, {lost_unsent} could not send"
        );
    }
    let (measure_start, cpu_start, ka_start) = measure.unwrap_or((hold_start, 0, 0));
    let hold_secs = measure_start.elapsed().as_secs_f64();
    let cpu_ns = t.cpu_ns().saturating_sub(cpu_start);
    let measured_keep_alives = keep_alives - ka_start;
    let rss_held = t.rss_kib();
    let warnings = t.warnings();

    // Every controller still answers: one more Keep Alive on every admin queue at once (sent one
    // by one, a long round would let the last ones expire), then a read on every I/O queue.
    let mut pending = 0usize;
    for (k, c) in ctrls.iter_mut().enumerate() {
        if lost[k] {
            continue;
        }
        c.admin.queue().submit(keep_alive(), None, 0);
        if send_all(&mut c.admin).is_err() {
            lost[k] = true;
            continue;
        }
        c.sent = Some(Instant::now());
        pending += 1;
    }
    let deadline = Instant::now() + kato;
    while pending > 0 && Instant::now() < deadline {
        epoll.wait(Duration::from_millis(10), &mut ready);
        for &k in &ready {
            let c = &mut ctrls[k];
            if c.sent.is_none() {
                continue;
            }
            match poll_ctrl(c) {
                Ok(statuses) if statuses.is_empty() => continue,
                Ok(statuses) => lost[k] |= statuses.iter().any(|s| *s != Status::SUCCESS),
                Err(_) => lost[k] = true,
            }
            c.sent = None;
            pending -= 1;
        }
    }
    for (k, c) in ctrls.iter_mut().enumerate() {
        lost[k] |= c.sent.take().is_some();
    }
    let [target_controllers, quiet, windows, batched] = t.stats();
    if windows > 0 {
        eprintln!(
            "target: {quiet} quiet admin queues, {windows} batch windows, {:.1} receives per window",
            batched as f64 / windows as f64
        );
    }
    for (k, c) in ctrls.iter_mut().enumerate() {
        if lost[k] {
            continue;
        }
        lost[k] = !c.io.as_mut().is_none_or(|q| {
            let mut rd = Sqe::zeroed();
            rd.opcode = 0x02;
            rd.nsid.set(1);
            RwCommand::new(0, 8).apply(&mut rd);
            ok(q.command(rd, None, 4096), "read").is_ok()
        });
    }
    let connected = ctrls.len().max(1) as f64;
    let row = Row {
        connections: ctrls.len() as u64 + io_connected,
        controllers,
        io_queues: io_connected,
        refused,
        rss_volumes_kib: rss_volumes,
        per_ctrl_connected: rss_connected.saturating_sub(rss_volumes) as f64 / connected,
        per_ctrl_held: rss_held.saturating_sub(rss_volumes) as f64 / connected,
        keep_alives: measured_keep_alives,
        hold_secs,
        cpu_pct: cpu_ns as f64 / 1e9 / hold_secs * 100.0,
        us_per_ka: cpu_ns as f64 / 1e3 / measured_keep_alives.max(1) as f64,
        rtt,
        lost: lost.iter().filter(|&&l| l).count() as u64,
        target_controllers,
        warnings,
    };
    drop(ctrls);
    drop(waiting);
    t.stop();
    row
}

#[cfg(test)]
mod tests {
    use super::split;

    #[test]
    fn controllers_and_io_queues_make_the_connection_count() {
        for (n, every) in [(1000, 10), (18_000, 10), (5000, 1), (7, 3), (1, 10)] {
            let (c, io) = split(n, every);
            assert_eq!(c + io, n, "{n} every {every}");
            assert!(io <= c.div_ceil(every), "{n} every {every}: {c} + {io}");
        }
    }
}
