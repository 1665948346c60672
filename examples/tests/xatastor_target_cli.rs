//! The `xatastor-target` binary as an operator uses it: `serve` in a temporary data directory, then
//! the admin subcommands (text and `--json`), their errors (one line, non-zero exit), the admin
//! socket's permissions, metrics, a host connecting to a created volume and its clone, and a clean
//! shutdown on SIGTERM; restarts (the backend recorded in the catalog, memory volumes forgotten, a
//! second node on the same data directory), start-up failures that leave nothing behind, sizes,
//! paging, a closed stdout, `--config` without `serve`, host names in `--listen`, `--advertise`,
//! host access edits and the shrink rule.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

use nvmeof_proto::nvme::fabrics::CNTLID_DYNAMIC;
use nvmeof_proto::nvme::nvm::RwCommand;
use nvmeof_proto::nvme::registers::{offset, PropertyWidth};
use nvmeof_proto::nvme::{Sqe, Status};
use nvmeof_proto::Payload;
use nvmeof_target::host::{self, BlockingHost, HostOptions};

const BIN: &str = env!("CARGO_BIN_EXE_xatastor-target");
const HOST: &str = "nqn.2014-08.org.nvmexpress:uuid:cli-test-host";

struct Served {
    child: Child,
    addr: String,
    metrics: String,
    /// Everything the server wrote to stderr so far (a thread keeps reading it).
    log: std::sync::Arc<std::sync::Mutex<String>>,
    /// The `nvme connect` line of the start banner.
    banner_connect: String,
}

impl Drop for Served {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn serve(dir: &Path) -> Served {
    serve_with(
        dir,
        &[
            "serve",
            "--backend",
            "memory",
            "--listen",
            "127.0.0.1:0",
            "--metrics-listen",
            "127.0.0.1:0",
            "--workers",
            "1",
        ],
    )
}

/// Starts `xatastor-target --data-dir DIR ARGS…` and waits for its banner.
fn serve_with(dir: &Path, args: &[&str]) -> Served {
    let mut child = Command::new(BIN)
        .args(["--data-dir", &dir.display().to_string()])
        .args(args)
        .env_remove("NO_COLOR")
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut err = BufReader::new(child.stderr.take().unwrap());
    let (mut addr, mut metrics, mut banner_connect) = (String::new(), String::new(), String::new());
    let log = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
    let mut line = String::new();
    while err.read_line(&mut line).unwrap() > 0 {
        log.lock().unwrap().push_str(&line);
        if let Some(rest) = line.trim().strip_prefix("xatastor-target: serving ") {
            addr = rest.rsplit(" on ").next().unwrap().to_owned();
        }
        if let Some(m) = line.trim().strip_prefix("metrics      http://") {
            metrics = m.trim_end_matches("/metrics").to_owned();
        }
        if line.trim().starts_with("nvme connect") {
            banner_connect = line.trim().to_owned();
            break;
        }
        line.clear();
    }
    assert!(!addr.is_empty(), "the server did not say where it listens: {}", log.lock().unwrap());
    // Keep reading stderr so the server never blocks on it.
    let sink = log.clone();
    std::thread::spawn(move || {
        let mut line = String::new();
        while err.read_line(&mut line).map(|n| n > 0).unwrap_or(false) {
            sink.lock().unwrap().push_str(&line);
            line.clear();
        }
    });
    Served { child, addr, metrics, log, banner_connect }
}

/// Runs `xatastor-target ARGS…` to the end (a start that must fail); returns (success, stderr).
fn run_to_end(dir: &Path, args: &[&str]) -> (bool, String) {
    let out = Command::new(BIN).arg("--data-dir").arg(dir).args(args).output().unwrap();
    (out.status.success(), String::from_utf8_lossy(&out.stderr).into_owned())
}

/// Stops a server with SIGTERM and checks that it exits cleanly.
fn stop(mut served: Served) -> String {
    // SAFETY: kill(2) on our own child's pid.
    unsafe { libc::kill(served.child.id() as i32, libc::SIGTERM) };
    let status = served.child.wait().unwrap();
    assert!(status.success(), "exit after SIGTERM: {status:?}");
    let log = served.log.lock().unwrap().clone();
    log
}

fn err_of(dir: &Path, args: &[&str]) -> String {
    let out = cli(dir, args);
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!out.status.success(), "{args:?} succeeded");
    assert_eq!(err.lines().count(), 1, "{args:?}: {err}");
    assert!(err.starts_with("xatastor-target: "), "{args:?}: {err}");
    err
}

fn http_get(addr: &str, path: &str) -> String {
    let mut m = TcpStream::connect(addr).unwrap();
    write!(m, "GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    let mut body = String::new();
    m.read_to_string(&mut body).unwrap();
    body
}

fn cli(dir: &Path, args: &[&str]) -> Output {
    Command::new(BIN).arg("--data-dir").arg(dir).args(args).output().unwrap()
}

fn ok(dir: &Path, args: &[&str]) -> String {
    let out = cli(dir, args);
    assert!(out.status.success(), "{args:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap()
}

fn json(dir: &Path, args: &[&str]) -> serde_json::Value {
    let mut a = vec!["--json"];
    a.extend_from_slice(args);
    serde_json::from_str(&ok(dir, &a)).unwrap()
}

fn connect_and_write_read(addr: &str, nqn: &str, write: Option<&[u8]>) -> Vec<u8> {
    let s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let mut a = BlockingHost::new(s, HostOptions::default()).unwrap();
    let (sqe, data) = host::connect_command(0, 32, 0, CNTLID_DYNAMIC, [2; 16], nqn, HOST);
    let c = a.command(sqe, Some(data), 0).unwrap();
    assert_eq!(c.status(), Status::SUCCESS, "connect to {nqn}");
    let cntlid = c.cqe.dw0.get() as u16;
    a.command(host::property_set(offset::CC, PropertyWidth::Four, 0x0046_0001), None, 0).unwrap();
    let s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let mut q = BlockingHost::new(s, HostOptions::default()).unwrap();
    let (sqe, data) = host::connect_command(1, 32, 0, cntlid, [2; 16], nqn, HOST);
    assert_eq!(q.command(sqe, Some(data), 0).unwrap().status(), Status::SUCCESS);
    let rw = |opcode: u8| {
        let mut sqe = Sqe::zeroed();
        sqe.opcode = opcode;
        sqe.nsid.set(1);
        RwCommand::new(0, 8).apply(&mut sqe);
        sqe
    };
    if let Some(w) = write {
        assert_eq!(
            q.command(rw(0x01), Some(Payload::from(w.to_vec())), 0).unwrap().status(),
            Status::SUCCESS
        );
    }
    q.command(rw(0x02), None, 4096).unwrap().data.to_bytes().to_vec()
}

#[test]
fn operator_workflow() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let served = serve(d);
    let sock = d.join("admin.sock");
    assert_eq!(std::fs::metadata(&sock).unwrap().permissions().mode() & 0o777, 0o600);

    // Create, then show: the exact connect line.
    let text = ok(d, &["volume", "create", "pg-main", "--size", "64MiB", "--allow-host", HOST]);
    assert!(text.contains("pg-main") && text.contains("nvme connect -t tcp"), "{text}");
    let v = json(d, &["volume", "show", "pg-main"]);
    let nqn = v["nqn"].as_str().unwrap().to_owned();
    assert_eq!(v["size_bytes"], 64 << 20);
    assert_eq!(v["allowed_hosts"][0], HOST);
    assert!(v["connect"].as_str().unwrap().ends_with(&format!("-n {nqn} --hostnqn={HOST}")));
    assert_eq!(v["active"], false);

    // A host writes; snapshot; the source changes; a clone has the snapshot's data.
    let before = vec![0x5Au8; 4096];
    assert_eq!(connect_and_write_read(&served.addr, &nqn, Some(&before)), before);
    ok(d, &["snapshot", "create", "pg-main@s1"]);
    connect_and_write_read(&served.addr, &nqn, Some(&[0xA5u8; 4096]));
    let clone = json(d, &["volume", "clone", "pg-main@s1", "pg-branch", "--allow-host", HOST]);
    assert_eq!(clone["origin"], "pg-main@s1");
    assert_eq!(connect_and_write_read(&served.addr, clone["nqn"].as_str().unwrap(), None), before);

    // Lists, resize, hosts, status.
    let list = json(d, &["volume", "list"]);
    let names: Vec<&str> = list.as_array().unwrap().iter().map(|v| v["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["pg-branch", "pg-main"]);
    assert!(ok(d, &["volume", "list"]).lines().count() == 3, "header + 2 rows");
    assert_eq!(json(d, &["volume", "resize", "pg-main", "128MiB"])["size_bytes"], 128 << 20);
    let other = "nqn.2014-08.org.nvmexpress:uuid:other";
    assert_eq!(
        json(d, &["volume", "allow-host", "pg-main", other])["allowed_hosts"].as_array().unwrap().len(),
        2
    );
    assert_eq!(
        json(d, &["volume", "deny-host", "pg-main", other])["allowed_hosts"].as_array().unwrap().len(),
        1
    );
    assert_eq!(json(d, &["snapshot", "list", "pg-main"])[0]["name"], "s1");
    let st = json(d, &["status"]);
    assert_eq!(st["volumes_total"], 2);
    assert_eq!(
        json(d, &["volume", "create-batch", "--prefix", "t", "--count", "50", "--size", "1MiB"])["created"],
        50
    );

    // Errors: one line on stderr, non-zero exit.
    for (args, expect) in [
        (vec!["volume", "show", "nope"], "volume nope does not exist"),
        (vec!["volume", "create", "pg-main", "--size", "1GiB"], "already exists"),
        (vec!["volume", "create", "bad/name", "--size", "1GiB"], "contains '/'"),
        (vec!["volume", "create", "x", "--size", "1000"], "multiple of the block size"),
        (vec!["snapshot", "delete", "pg-main@s1"], "dependent clones"),
        (vec!["volume", "clone", "pg-main", "y"], "is not VOLUME@SNAPSHOT"),
        (vec!["volume", "clone", "pg-main@s1", "small", "--size", "1MiB"], "at least the snapshot's"),
        (vec!["volume", "resize", "pg-main", "32MiB"], "use --force"),
        (vec!["volume", "create", "huge", "--size", "9000000TiB"], "larger than the largest volume"),
        (vec!["volume", "create", "over", "--size", "1000000TiB"], "overcommit limit"),
        (vec!["volume", "create", "neg", "--size", "-1"], "cannot be negative"),
        (
            vec!["volume", "deny-host", "pg-main", "nqn.2014-08.org.nvmexpress:uuid:never"],
            "not among the allowed",
        ),
        (vec!["volume", "any-host", "nope", "on"], "volume nope does not exist"),
    ] {
        let out = cli(d, &args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?} succeeded");
        // Clap's own errors (a negative size) come with a usage hint; ours are one line.
        if !expect.contains("negative") {
            assert_eq!(err.lines().count(), 1, "{args:?}: {err}");
            assert!(err.starts_with("xatastor-target: "), "{args:?}: {err}");
        }
        assert!(err.contains(expect), "{args:?}: {err}");
    }

    // Metrics: node gauges, capacity, the active volumes' counters and an honest histogram; only at
    // /metrics.
    let body = http_get(&served.metrics, "/metrics");
    assert!(body.starts_with("HTTP/1.1 200 OK"), "{body}");
    assert!(body.contains("xatastor_volumes 52"), "{body}");
    assert!(body.contains("xatastor_volume_writes_total{volume=\"pg-main\"} 2"), "{body}");
    assert!(body.contains("xatastor_provisioned_bytes "), "{body}");
    assert!(body.contains("xatastor_pool_size_bytes "), "{body}");
    assert!(body.contains("xatastor_write_commands_total "), "{body}");
    let count = body
        .lines()
        .find_map(|l| l.strip_prefix("xatastor_volume_latency_seconds_count{volume=\"pg-main\"} "))
        .unwrap_or_else(|| panic!("no latency count: {body}"));
    assert!(count.parse::<u64>().unwrap() >= 4, "{body}");
    let sum: f64 = body
        .lines()
        .find_map(|l| l.strip_prefix("xatastor_volume_latency_seconds_sum{volume=\"pg-main\"} "))
        .unwrap_or_else(|| panic!("no latency sum: {body}"))
        .parse()
        .unwrap();
    assert!((0.0..60.0).contains(&sum), "{sum}");
    assert!(body.contains("# HELP xatastor_volume_latency_seconds The target's time per command"), "{body}");
    assert!(body.contains("le=\"1.28e-7\""), "a 128 ns first bucket (finer than a microsecond): {body}");
    // Per worker: the poll window's CPU time (seconds, a float) and how the windows ended.
    let worker_value = |name: &str| -> f64 {
        body.lines()
            .find_map(|l| l.strip_prefix(&format!("{name}{{worker=\"0\"}} ")))
            .unwrap_or_else(|| panic!("no {name}: {body}"))
            .parse()
            .unwrap_or_else(|e| panic!("{name}: {e}: {body}"))
    };
    let polled = worker_value("xatastor_worker_poll_seconds_total");
    assert!((0.0..60.0).contains(&polled), "{polled}");
    for name in [
        "xatastor_worker_polls_found_work_total",
        "xatastor_worker_polls_expired_total",
        "xatastor_worker_receive_copied_bytes_total",
        "xatastor_worker_blocking_pool_requests_total",
        "xatastor_worker_accept_failures_total",
    ] {
        let v = worker_value(name);
        assert!(v >= 0.0 && v.fract() == 0.0, "{name} {v}");
    }
    assert_eq!(worker_value("xatastor_worker_bounced_writes_total"), 0.0, "memory volumes bounce nothing");
    for path in ["/", "/favicon.ico", "/metricsx"] {
        let r = http_get(&served.metrics, path);
        assert!(r.starts_with("HTTP/1.1 404"), "{path}: {r}");
        assert!(!r.contains("xatastor_volumes"), "{path}: {r}");
    }

    // Sizes: decimal units and fractions; shrink only with --force (no host connected now).
    assert_eq!(json(d, &["volume", "create", "dec", "--size", "10GB"])["size_bytes"], 10_000_000_000u64);
    assert_eq!(json(d, &["volume", "create", "frac", "--size", "1.5MiB"])["size_bytes"], 3 << 19);
    assert_eq!(json(d, &["volume", "resize", "dec", "1G", "--force"])["size_bytes"], 1u64 << 30);
    // Host access: any-host on and off, allow, deny.
    assert_eq!(json(d, &["volume", "any-host", "dec", "on"])["allow_any_host"], true);
    assert!(ok(d, &["volume", "show", "dec"]).contains("hosts      any"));
    let shown = json(d, &["volume", "show", "dec"]);
    assert!(!shown["connect"].as_str().unwrap().contains("--hostnqn"), "any host: nvme-cli's own NQN");
    let e = err_of(d, &["volume", "deny-host", "dec", HOST]);
    assert!(e.contains("lets any host connect"), "{e}");
    assert_eq!(json(d, &["volume", "any-host", "dec", "off", "--disconnect"])["allow_any_host"], false);
    ok(d, &["volume", "allow-host", "dec", HOST]);
    assert_eq!(json(d, &["volume", "deny-host", "dec", HOST])["allowed_hosts"], serde_json::json!([]));
    // Capacity in status and volume show.
    let st = json(d, &["status"]);
    assert!(st["provisioned_bytes"].as_u64().unwrap() > 1 << 30, "{st}");
    assert!(st["pool_bytes"].as_u64().unwrap() > 0 && st["overcommit_limit"] == 20.0, "{st}");
    assert!(ok(d, &["status"]).contains("overcommit"), "text status shows capacity");
    let v = json(d, &["volume", "show", "pg-main"]);
    assert!(v["free_bytes"].as_u64().unwrap() <= 128 << 20 && v["pool_share"].as_f64().unwrap() > 0.0, "{v}");
    // Paging: a full page says how to go on; --limit 0 lists all.
    let out = cli(d, &["volume", "list", "--limit", "3"]);
    assert!(out.status.success());
    assert_eq!(String::from_utf8_lossy(&out.stdout).lines().count(), 4, "header + 3 rows");
    let hint = String::from_utf8_lossy(&out.stderr);
    assert!(hint.contains("--after ") && hint.contains("--limit 0"), "{hint}");
    assert_eq!(json(d, &["volume", "list", "--limit", "0"]).as_array().unwrap().len(), 54);
    // A closed stdout (`| head`): no panic, no error.
    let out = with_closed_stdout(d, &["volume", "list", "--limit", "0"]);
    assert!(out.status.success() && out.stderr.is_empty(), "{out:?}");
    let out = with_closed_stdout(d, &["volume", "show", "pg-main"]);
    assert!(out.status.success() && out.stderr.is_empty(), "{out:?}");

    // Delete, then SIGTERM: a clean exit, and the admin socket is gone.
    ok(d, &["volume", "delete", "pg-branch"]);
    ok(d, &["snapshot", "delete", "pg-main@s1"]);
    let log = stop(served);
    assert!(!sock.exists());
    // A log that is not a terminal has no colour codes; admin calls are not logged at INFO.
    assert!(!log.contains('\x1b'), "ANSI codes in a non-terminal log: {log:?}");
    assert!(!log.contains("admin request") && !log.contains("\\\""), "admin calls at INFO: {log}");
    assert!(log.contains("volume loaded"), "INFO line when a volume loads: {log}");
    let out = cli(d, &["volume", "list"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot reach the server"));
}

/// Runs `xatastor-target --data-dir DIR ARGS…` with a stdout whose reader is already gone.
fn with_closed_stdout(dir: &Path, args: &[&str]) -> Output {
    use std::os::fd::{FromRawFd, OwnedFd};
    let mut fds = [0i32; 2];
    // SAFETY: pipe(2) fills the two descriptors, which we then own.
    assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
    // SAFETY: both are fresh descriptors from pipe(2), owned by nothing else.
    let (read, write) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    drop(read);
    Command::new(BIN).arg("--data-dir").arg(dir).args(args).stdout(Stdio::from(write)).output().unwrap()
}

/// Restarts: the backend recorded in the catalog is used without --backend and another one is
/// refused in one line; memory volumes do not come back as ready; a second node on the same data
/// directory is refused as such; a failed start leaves no admin socket; --config and --listen HOST.
#[test]
fn restarts_and_start_up_messages() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let served = serve(d);
    ok(d, &["volume", "create", "m1", "--size", "1MiB", "--allow-host", HOST]);
    // A second node on the same data directory.
    let (success, err) = run_to_end(
        d,
        &["serve", "--backend", "memory", "--listen", "127.0.0.1:0", "--metrics-listen", "off"],
    );
    assert!(!success);
    assert!(err.contains("another node serves this data directory"), "{err}");
    assert!(!err.contains("Database already open"), "{err}");
    stop(served);

    // Another backend: refused, one line naming the recorded one.
    let (success, err) =
        run_to_end(d, &["serve", "--backend", "file", "--listen", "127.0.0.1:0", "--metrics-listen", "off"]);
    assert!(!success);
    let last = err.lines().last().unwrap();
    assert!(
        last.contains("holds volumes on memory, not on file") && last.contains("--backend memory"),
        "{err}"
    );
    assert!(!d.join("admin.sock").exists());

    // No --backend: the recorded one (memory); its volumes of the previous run are gone.
    let served = serve_with(d, &["--listen", "127.0.0.1:0", "--metrics-listen", "off", "--workers", "1"]);
    assert!(served.log.lock().unwrap().contains("(memory backend"), "{}", served.log.lock().unwrap());
    assert!(
        json(d, &["volume", "list"]).as_array().unwrap().is_empty(),
        "memory volumes outlived their process"
    );
    assert!(err_of(d, &["volume", "show", "m1"]).contains("does not exist"));
    let log = stop(served);
    assert!(log.contains("forgot the volumes of the previous run"), "{log}");

    // A start that fails after the admin socket was bound (the metrics port is taken) leaves none.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().to_string();
    let (success, err) = run_to_end(d, &["serve", "--listen", "127.0.0.1:0", "--metrics-listen", &port]);
    assert!(!success && err.contains("metrics on"), "{err}");
    assert!(!d.join("admin.sock").exists(), "a failed start left admin.sock behind");

    // --config without `serve`, a host name in listen, --advertise in the banner and connect lines.
    let conf = d.join("node.toml");
    std::fs::write(
        &conf,
        "listen = \"localhost:0\"\nbackend = \"memory\"\nmetrics_listen = \"off\"\nworkers = 1\nadvertise = \"node7.example\"\n",
    )
    .unwrap();
    let served = serve_with(d, &["--config", conf.to_str().unwrap()]);
    assert!(served.addr.starts_with("127.0.0.1:"), "localhost resolves to IPv4 first: {}", served.addr);
    assert!(served.banner_connect.contains("-a node7.example -s "), "{}", served.banner_connect);
    let v = json(d, &["volume", "create", "a1", "--size", "1MiB", "--allow-host", HOST]);
    assert!(v["connect"].as_str().unwrap().contains("-a node7.example -s "), "{v}");
    assert_eq!(json(d, &["status"])["advertise"], "node7.example");
    stop(served);

    // Listening on all addresses without --advertise: no 0.0.0.0 in connect lines.
    let served = serve_with(
        d,
        &["--backend", "memory", "--listen", "0.0.0.0:0", "--metrics-listen", "off", "--workers", "1"],
    );
    assert!(!served.banner_connect.contains("0.0.0.0"), "{}", served.banner_connect);
    assert!(served.banner_connect.contains("--advertise"), "{}", served.banner_connect);
    stop(served);
}

/// --help texts describe the binary, not the crate, and give the name and size rules.
#[test]
fn help_texts() {
    let help = |args: &[&str]| {
        let out = Command::new(BIN).args(args).output().unwrap();
        assert!(out.status.success(), "{args:?}");
        String::from_utf8(out.stdout).unwrap()
    };
    let top = help(&["--help"]);
    assert!(top.starts_with("The Xatastor storage node"), "{top}");
    assert!(!top.contains("embedding examples"), "{top}");
    assert!(top.contains("--config") && top.contains("--listen"), "serve's options without `serve`: {top}");
    let create = help(&["volume", "create", "--help"]);
    assert!(create.contains("1-128 bytes") && create.contains("not starting with '.' or '-'"), "{create}");
    assert!(create.contains("10G (= 10GiB)") && create.contains("decimal"), "{create}");
    let blocking = Command::new(env!("CARGO_BIN_EXE_nvmeof-blocking-target")).arg("--help").output().unwrap();
    let blocking = String::from_utf8(blocking.stdout).unwrap();
    assert!(blocking.starts_with("Serve one volume"), "{blocking}");
}

/// The admin socket is the server user's (0600): another user is told that, not "is it running?".
#[test]
fn admin_socket_permission_is_reported_as_such() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let served = serve(d);
    let out = Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups", BIN, "--data-dir"])
        .arg(d)
        .arg("status")
        .output()
        .expect("setpriv (util-linux) runs the client as nobody");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("permission denied") && !err.contains("is `xatastor-target serve` running"),
        "{err}"
    );
    stop(served);
}

/// The file backend on a file system without reflink (this machine's /tmp is ext4) says at start
/// that snapshots will be refused, and they are, with the file system named.
#[test]
fn file_backend_without_reflink_warns_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let fs = Command::new("stat").args(["-f", "-c", "%T"]).arg(d).output().unwrap();
    let fs = String::from_utf8_lossy(&fs.stdout).trim().to_owned();
    assert!(fs.starts_with("ext"), "this test needs a temporary directory on ext4, not {fs}");
    let served = serve_with(d, &["--backend", "file", "--listen", "127.0.0.1:0", "--metrics-listen", "off"]);
    let log = served.log.lock().unwrap().clone();
    assert!(
        log.contains("warning: snapshots and clones will be refused") && log.contains("ext2/ext3/ext4"),
        "{log}"
    );
    ok(d, &["volume", "create", "f", "--size", "1MiB"]);
    let e = err_of(d, &["snapshot", "create", "f@s"]);
    assert!(e.contains("reflink") && e.contains("ext2/ext3/ext4"), "{e}");
    stop(served);
}

/// Started with a soft open-file limit of 1024 (systemd's default for services), the node takes
/// the hard limit and says so: each connection is a file descriptor.
#[test]
fn a_low_open_file_limit_is_raised_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let hard = rustix::process::getrlimit(rustix::process::Resource::Nofile).maximum.unwrap_or(1 << 20);
    assert!(hard > 1024, "this test needs a hard open-file limit above 1024, not {hard}");
    let mut child = Command::new("prlimit")
        .arg(format!("--nofile=1024:{hard}"))
        .arg(BIN)
        .args(["--data-dir", &dir.path().display().to_string()])
        .args(["--backend", "memory", "--listen", "127.0.0.1:0", "--metrics-listen", "off", "--workers", "1"])
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut err = BufReader::new(child.stderr.take().unwrap());
    let (mut log, mut line) = (String::new(), String::new());
    while err.read_line(&mut line).unwrap() > 0 {
        log.push_str(&line);
        if line.trim().starts_with("nvme connect") {
            break;
        }
        line.clear();
    }
    // SAFETY: kill(2) on our own child's pid.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    assert!(child.wait().unwrap().success());
    assert!(
        log.contains("raised the open-file limit")
            && log.contains("from=1024")
            && log.contains(&format!("to={hard}")),
        "{log}"
    );
    // One worker allows 65,536 connections: a hard limit below that (plus the node's own
    // descriptors) is reported in one line, with the number of connections that fit.
    let warned = log.matches("is below what the connection limits allow").count();
    if hard < 65_536 + 64 {
        assert_eq!(warned, 1, "{log}");
        assert!(log.contains(&format!("about {} connections fit", hard - 64)), "{log}");
    } else {
        assert_eq!(warned, 0, "{log}");
    }
}
