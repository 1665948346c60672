//! `nvmf-perf` run as a subprocess against an in-process io_uring server: argument checks, refused
//! Connects, a target that stops answering, `--verify` on a huge namespace and against a volume that
//! loses writes, and the output formats `benches/perf-table.sh` reads.

use std::io::Read;
use std::net::{SocketAddr, TcpListener};
use std::process::{Command, Output, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use nvmeof_target::{
    BackendInfo, BlockBackend, Completer, HostAccess, IoOp, IoOutput, MemoryBackend, NamespaceConfig,
    Submitted, SubsystemConfig, Target, TargetConfig,
};
use xatastor_core::{Server, ServerConfig};

const NQN: &str = "nqn.2026-01.io.xatastor:perf-cli";
const HOSTNQN: &str = "nqn.2014-08.org.nvmexpress:uuid:perf-cli-allowed-host";
/// Generous bound on one nvmf-perf run: a run that takes longer is a hang (every run below is
/// asked for well under a few seconds of I/O).
const HANG_BOUND: Duration = Duration::from_secs(120);

/// A target serving `backend` as namespace 1 of [`NQN`] on loopback.
struct Fixture {
    _server: Server,
    addr: SocketAddr,
}

fn serve(config: TargetConfig, backend: Arc<dyn BlockBackend>, access: HostAccess) -> Fixture {
    let target = Target::new(config);
    let mut sc = SubsystemConfig::new(NQN, "PERFCLI1");
    sc.access = access;
    sc.allowed_hosts.push(HOSTNQN.into());
    target.add_subsystem(sc).unwrap();
    target.add_namespace(NQN, NamespaceConfig::derived(NQN, 1, backend)).unwrap();
    let mut sc = ServerConfig::new("127.0.0.1:0".parse().unwrap());
    sc.workers = 1;
    let server = Server::start(target, sc).unwrap();
    let addr = server.local_addr();
    Fixture { _server: server, addr }
}

fn memory_target(size_bytes: u64) -> Fixture {
    serve(TargetConfig::default(), Arc::new(MemoryBackend::new(size_bytes, 512)), HostAccess::AllowAny)
}

/// Runs nvmf-perf against `addr` with `args` (after `--target ADDR --nqn NQN`); panics if it does
/// not end within [`HANG_BOUND`].
fn perf(addr: SocketAddr, args: &[&str]) -> Output {
    let addr = addr.to_string();
    let mut all = vec!["--target", &addr, "--nqn", NQN];
    all.extend_from_slice(args);
    perf_raw(&all)
}

fn perf_raw(args: &[&str]) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_nvmf-perf"))
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = child.stdout.take().unwrap();
    let mut err = child.stderr.take().unwrap();
    let out = std::thread::spawn(move || {
        let mut v = Vec::new();
        out.read_to_end(&mut v).unwrap();
        v
    });
    let err = std::thread::spawn(move || {
        let mut v = Vec::new();
        err.read_to_end(&mut v).unwrap();
        v
    });
    let step = Duration::from_millis(50);
    let mut waited = Duration::ZERO;
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if waited >= HANG_BOUND {
            child.kill().unwrap();
            let _ = child.wait();
            let e = String::from_utf8_lossy(&err.join().unwrap()).into_owned();
            panic!("nvmf-perf {args:?} hangs (killed after {HANG_BOUND:?}); stderr so far: {e}");
        }
        std::thread::sleep(step);
        waited += step;
    };
    Output { status, stdout: out.join().unwrap(), stderr: err.join().unwrap() }
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// Asserts a failed run that explains itself in exactly one line of stderr, and returns that line.
fn one_line_failure(o: &Output) -> String {
    let (out, err) = (text(&o.stdout), text(&o.stderr));
    assert!(!o.status.success(), "expected a failure; stdout: {out}; stderr: {err}");
    assert!(!out.contains("IOPS"), "a failed run printed a result: {out}");
    let lines: Vec<&str> = err.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "expected a one-line error, got: {err}");
    assert!(lines[0].starts_with("nvmf-perf: "), "{err}");
    lines[0].to_owned()
}

fn json(o: &Output) -> serde_json::Value {
    let out = text(&o.stdout);
    serde_json::from_str(out.trim()).unwrap_or_else(|e| panic!("not one JSON object ({e}): {out}"))
}

#[test]
fn queue_depth_beyond_the_targets_queues_is_refused_up_front() {
    let t = memory_target(64 << 20);
    // The target's queues hold 1024 entries by default: 100000 outstanding commands cannot fit.
    let o = perf(t.addr, &["--qd", "100000", "--time-secs", "0.2", "--warmup-secs", "0"]);
    let line = one_line_failure(&o);
    assert!(line.contains("--qd"), "{line}");
    assert!(line.contains("1024"), "the error names the target's queue size: {line}");
}

#[test]
fn queue_depth_limit_comes_from_the_target() {
    let mut config = TargetConfig::default();
    config.max_queue_entries = 64;
    let t = serve(config, Arc::new(MemoryBackend::new(64 << 20, 512)), HostAccess::AllowAny);
    let o = perf(t.addr, &["--qd", "64", "--time-secs", "0.2", "--warmup-secs", "0"]);
    let line = one_line_failure(&o);
    assert!(line.contains("--qd") && line.contains("63"), "{line}");
    // The largest allowed depth runs.
    let o = perf(t.addr, &["--qd", "63", "--time-secs", "0.2", "--warmup-secs", "0"]);
    assert!(o.status.success(), "{}", text(&o.stderr));
}

#[test]
fn zero_queue_depth_is_refused() {
    let t = memory_target(64 << 20);
    let o = perf(t.addr, &["--qd", "0", "--time-secs", "0.2", "--warmup-secs", "0"]);
    assert!(!o.status.success());
    assert!(!text(&o.stdout).contains("IOPS"));
    let err = text(&o.stderr);
    assert!(err.contains("--qd") && err.contains("at least 1"), "{err}");
}

#[test]
fn zero_queues_is_refused() {
    let t = memory_target(64 << 20);
    let o = perf(t.addr, &["--queues", "0", "--time-secs", "0.2", "--warmup-secs", "0"]);
    assert!(!o.status.success(), "{}", text(&o.stdout));
    assert!(!text(&o.stdout).contains("IOPS"), "{}", text(&o.stdout));
    let err = text(&o.stderr);
    assert!(err.contains("--queues") && err.contains("at least 1"), "{err}");
}

/// A volume whose I/O never completes (a stuck device): the completers are kept, never used.
#[derive(Debug)]
struct StuckBackend {
    geometry: MemoryBackend,
    held: Mutex<Vec<Completer>>,
}

impl BlockBackend for StuckBackend {
    fn size_bytes(&self) -> u64 {
        self.geometry.size_bytes()
    }
    fn info(&self) -> BackendInfo {
        self.geometry.info()
    }
    fn submit(&self, _op: IoOp, completer: Completer) -> Submitted {
        self.held.lock().unwrap().push(completer);
        Submitted::Pending
    }
}

#[test]
fn a_target_that_stops_answering_ends_the_run_with_an_error() {
    let t = serve(
        TargetConfig::default(),
        Arc::new(StuckBackend { geometry: MemoryBackend::new(64 << 20, 512), held: Mutex::default() }),
        HostAccess::AllowAny,
    );
    // An hour of run time asked for: only the I/O timeout can end this run early.
    let o = perf(
        t.addr,
        &["--queues", "2", "--qd", "4", "--time-secs", "3600", "--warmup-secs", "0", "--timeout-secs", "1"],
    );
    let line = one_line_failure(&o);
    assert!(line.contains("queue") && line.contains("no answer"), "{line}");
}

#[test]
fn a_peer_that_never_answers_the_handshake_ends_the_run() {
    // Accepts TCP connections and never says a word.
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let _accepting = std::thread::spawn(move || {
        let mut held = Vec::new();
        while let Ok((s, _)) = listener.accept() {
            held.push(s);
        }
    });
    let o = perf(addr, &["--time-secs", "1", "--warmup-secs", "0", "--timeout-secs", "1"]);
    let line = one_line_failure(&o);
    assert!(line.contains("no answer"), "{line}");
}

#[test]
fn refused_host_is_explained_and_hostnqn_is_suggested() {
    let t = serve(
        TargetConfig::default(),
        Arc::new(MemoryBackend::new(64 << 20, 512)),
        HostAccess::DenyAllExcept,
    );
    let o = perf(t.addr, &["--time-secs", "0.2", "--warmup-secs", "0"]);
    let line = one_line_failure(&o);
    assert!(line.contains("Connect Invalid Host"), "names the status: {line}");
    assert!(line.contains("--hostnqn"), "suggests --hostnqn: {line}");
    // The allowed host gets in.
    let o = perf(t.addr, &["--hostnqn", HOSTNQN, "--time-secs", "0.2", "--warmup-secs", "0"]);
    assert!(o.status.success(), "{}", text(&o.stderr));
    assert!(text(&o.stdout).contains("IOPS"));
}

#[test]
fn unknown_subsystem_is_explained() {
    let t = memory_target(64 << 20);
    let addr = t.addr.to_string();
    let o = perf_raw(&[
        "--target",
        &addr,
        "--nqn",
        "nqn.2026-01.io.xatastor:nobody-here",
        "--time-secs",
        "0.2",
        "--warmup-secs",
        "0",
    ]);
    let line = one_line_failure(&o);
    assert!(line.contains("Connect Invalid Parameters") && line.contains("--nqn"), "{line}");
}

#[test]
fn verify_on_a_huge_namespace_tracks_a_bounded_range() {
    // 1 EiB, thin: only what is written takes memory.
    let t = memory_target(1 << 60);
    let o = perf(
        t.addr,
        &[
            "--verify",
            "--workload",
            "randrw",
            "--qd",
            "8",
            "--time-secs",
            "0.3",
            "--warmup-secs",
            "0",
            "--json",
        ],
    );
    assert!(o.status.success(), "stderr: {}", text(&o.stderr));
    let r = json(&o);
    assert_eq!(r["verify_failures"], 0);
    assert!(r["iops"].as_f64().unwrap() > 0.0, "{r}");
    assert!(text(&o.stderr).contains("--range-mib"), "says which range it uses: {}", text(&o.stderr));

    // An explicit range too large to track is refused, not attempted.
    let o =
        perf(t.addr, &["--verify", "--range-mib", "1000000000", "--time-secs", "0.3", "--warmup-secs", "0"]);
    let line = one_line_failure(&o);
    assert!(line.contains("--verify") && line.contains("--range-mib"), "{line}");
}

/// A volume that acknowledges writes and drops them (reads return what was there before).
#[derive(Debug)]
struct LosesWrites(MemoryBackend);

impl BlockBackend for LosesWrites {
    fn size_bytes(&self) -> u64 {
        self.0.size_bytes()
    }
    fn info(&self) -> BackendInfo {
        self.0.info()
    }
    fn submit(&self, op: IoOp, completer: Completer) -> Submitted {
        match op {
            IoOp::Write { .. } => Submitted::Done(Ok(IoOutput::Done)),
            op => self.0.submit(op, completer),
        }
    }
}

#[test]
fn verify_failures_are_summarised_and_fail_the_run() {
    let t = serve(
        TargetConfig::default(),
        Arc::new(LosesWrites(MemoryBackend::new(64 << 20, 512))),
        HostAccess::AllowAny,
    );
    let o = perf(
        t.addr,
        &[
            "--verify",
            "--workload",
            "randrw",
            "--rwmix-read-percent",
            "50",
            "--range-mib",
            "1",
            "--qd",
            "4",
            "--time-secs",
            "0.5",
            "--warmup-secs",
            "0",
            "--json",
        ],
    );
    assert!(!o.status.success(), "lost writes must fail the run");
    let r = json(&o);
    let failures = r["verify_failures"].as_u64().unwrap();
    // Each block is written before it is checked, and every write is lost.
    assert!(failures > 0, "{r}");
    let err = text(&o.stderr);
    let lines: Vec<&str> = err.lines().collect();
    assert!(lines.len() <= 6, "at most 5 examples and one summary line, got {} lines: {err}", lines.len());
    let summary = lines.last().unwrap();
    assert!(summary.contains(&failures.to_string()) && summary.contains("verify"), "{err}");
    assert!(lines.iter().take(lines.len() - 1).all(|l| l.contains("LBA")), "{err}");
}

#[test]
fn verify_passes_on_a_good_volume() {
    let t = memory_target(64 << 20);
    let o = perf(
        t.addr,
        &[
            "--verify",
            "--workload",
            "randrw",
            "--queues",
            "2",
            "--qd",
            "8",
            "--bs",
            "8192",
            "--range-mib",
            "4",
            "--time-secs",
            "0.3",
            "--warmup-secs",
            "0.1",
        ],
    );
    assert!(o.status.success(), "{}", text(&o.stderr));
    let out = text(&o.stdout);
    assert!(out.contains("errors 0, verify failures 0"), "{out}");
}

/// The text line and the JSON keys `benches/perf-table.sh` reads, under the option names it passes.
#[test]
fn output_formats_stay_readable_by_perf_table() {
    let t = memory_target(64 << 20);
    let common = [
        "--workload",
        "randread",
        "--bs",
        "4096",
        "--queues",
        "1",
        "--qd",
        "4",
        "--time",
        "0.2",
        "--warmup",
        "0",
    ];
    let mut args = common.to_vec();
    args.extend(["--range-mib", "16", "--json"]);
    let o = perf(t.addr, &args);
    assert!(o.status.success(), "{}", text(&o.stderr));
    let r = json(&o);
    assert_eq!(r["workload"], "Randread");
    assert_eq!(r["bs"], 4096);
    assert_eq!(r["queues"], 1);
    assert_eq!(r["qd"], 4);
    assert!(r["iops"].as_f64().unwrap() > 0.0);
    assert!(r["mib_s"].as_f64().unwrap() > 0.0);
    for k in ["min", "p50", "p99", "p999", "max"] {
        assert!(r["lat_us"][k].as_f64().unwrap() > 0.0, "lat_us.{k} in {r}");
    }
    assert_eq!(r["errors"], 0);
    assert_eq!(r["verify_failures"], 0);

    let o = perf(t.addr, &common);
    assert!(o.status.success(), "{}", text(&o.stderr));
    let out = text(&o.stdout);
    assert!(out.starts_with("Randread bs=4096 queues=1 qd=4: "), "{out}");
    assert!(out.contains(" IOPS, ") && out.contains(" MiB/s, latency us min "), "{out}");
}

#[test]
fn help_describes_every_option() {
    let o = perf_raw(&["--help"]);
    assert!(o.status.success());
    let help = text(&o.stdout);
    for opt in [
        "--target",
        "--nqn",
        "--hostnqn",
        "--nsid",
        "--queues",
        "--qd",
        "--workload",
        "--rwmix-read-percent",
        "--bs",
        "--time-secs",
        "--warmup-secs",
        "--range-mib",
        "--verify",
        "--digests",
        "--timeout-secs",
        "--json",
    ] {
        assert!(help.contains(opt), "{opt} missing from --help:\n{help}");
    }
    // Every option comes with a description: in clap's long help, the line after an option's
    // name is indented text, never the next option.
    let lines: Vec<&str> = help.lines().collect();
    for (i, l) in lines.iter().enumerate() {
        let t = l.trim_start();
        if t.starts_with("--") && !t.starts_with("--help") && !t.starts_with("--version") {
            let next = lines.get(i + 1).map_or("", |n| n.trim());
            assert!(!next.is_empty() && !next.starts_with('-'), "no description for {t}:\n{help}");
        }
    }
    assert!(help.contains("allow-host"), "says how a target allows the host NQN:\n{help}");
}

#[test]
fn write_zeroes_workload_zeroes_in_commands_larger_than_a_transfer() {
    let backend = Arc::new(MemoryBackend::new(64 << 20, 512));
    let t = serve(TargetConfig::default(), backend.clone(), HostAccess::AllowAny);
    let o = perf(
        t.addr,
        &["--workload", "write", "--bs-bytes", "131072", "--time-secs", "0.3", "--warmup-secs", "0"],
    );
    assert!(o.status.success(), "{}", text(&o.stderr));
    assert!(backend.allocated_bytes() > 0, "the writes landed");
    // 8 MiB per command: more than the target's 512 KiB maximum transfer, fine for Write Zeroes.
    let o = perf(
        t.addr,
        &[
            "--workload",
            "writezeroes",
            "--bs-bytes",
            "8388608",
            "--qd",
            "1",
            "--time-secs",
            "1",
            "--warmup-secs",
            "0",
            "--json",
        ],
    );
    assert!(o.status.success(), "{}", text(&o.stderr));
    let j = json(&o);
    assert_eq!(j["errors"], 0);
    assert!(j["iops"].as_f64().unwrap() > 0.0);
    assert_eq!(backend.allocated_bytes(), 0, "8 sequential commands of 8 MiB zeroed all 64 MiB");
    let o =
        perf(t.addr, &["--workload", "writezeroes", "--verify", "--time-secs", "0.2", "--warmup-secs", "0"]);
    assert!(one_line_failure(&o).contains("--verify"));
}
