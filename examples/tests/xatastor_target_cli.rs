//! The `xatastor-target` binary as an operator uses it: `serve` in a temporary data directory, then
//! the admin subcommands (text and `--json`), their errors (one line, non-zero exit), the admin
//! socket's permissions, metrics, a host connecting to a created volume and its clone, and a clean
//! shutdown on SIGTERM.

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
}

impl Drop for Served {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn serve(dir: &Path) -> Served {
    let mut child = Command::new(BIN)
        .args(["--data-dir", &dir.display().to_string(), "serve", "--backend", "memory"])
        .args(["--listen", "127.0.0.1:0", "--metrics-listen", "127.0.0.1:0", "--workers", "1"])
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut err = BufReader::new(child.stderr.take().unwrap());
    let (mut addr, mut metrics) = (String::new(), String::new());
    let mut line = String::new();
    while err.read_line(&mut line).unwrap() > 0 {
        if let Some(rest) = line.trim().strip_prefix("xatastor-target: serving ") {
            addr = rest.rsplit(" on ").next().unwrap().to_owned();
        }
        if let Some(m) = line.trim().strip_prefix("metrics      http://") {
            metrics = m.trim_end_matches("/metrics").to_owned();
        }
        if line.contains("nvme connect") {
            break;
        }
        line.clear();
    }
    assert!(!addr.is_empty(), "the server did not say where it listens");
    // Keep draining stderr so the server never blocks on it.
    std::thread::spawn(move || std::io::copy(&mut err, &mut std::io::sink()));
    Served { child, addr, metrics }
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
    ] {
        let out = cli(d, &args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?} succeeded");
        assert_eq!(err.lines().count(), 1, "{args:?}: {err}");
        assert!(err.starts_with("xatastor-target: ") && err.contains(expect), "{args:?}: {err}");
    }

    // Metrics: node gauges and the active volumes' counters.
    let mut m = TcpStream::connect(&served.metrics).unwrap();
    m.write_all(b"GET /metrics HTTP/1.0\r\n\r\n").unwrap();
    let mut body = String::new();
    m.read_to_string(&mut body).unwrap();
    assert!(body.contains("xatastor_volumes 52"), "{body}");
    assert!(body.contains("xatastor_volume_writes_total{volume=\"pg-main\"}"), "{body}");

    // Delete, then SIGTERM: a clean exit, and the admin socket is gone.
    ok(d, &["volume", "delete", "pg-branch"]);
    ok(d, &["snapshot", "delete", "pg-main@s1"]);
    let mut served = served;
    // SAFETY: kill(2) on our own child's pid.
    unsafe { libc::kill(served.child.id() as i32, libc::SIGTERM) };
    let status = served.child.wait().unwrap();
    assert!(status.success(), "exit after SIGTERM: {status:?}");
    assert!(!sock.exists());
    let out = cli(d, &["volume", "list"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot reach the server"));
}
