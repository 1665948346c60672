//! Programs the node starts (the new binary of an upgrade, the `zfs` command) inherit none of the
//! hosts' connections: a node holding N connections would otherwise give a new binary N sockets
//! before it receives them again (and run out of descriptors at half the open-file limit), and a
//! child that outlived the node would keep hosts' connections open.

use std::net::TcpStream;
use std::os::unix::fs::PermissionsExt;
use std::process::{Command, Stdio};
use std::time::Duration;

const BIN: &str = env!("CARGO_BIN_EXE_xatastor-target");

#[test]
#[allow(clippy::disallowed_methods)] // a test's deadline for a child process
fn a_program_the_node_starts_inherits_no_connection() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let out = dir.path().join("sockets");
    // The "new binary": records the sockets it was started with, and fails the upgrade.
    let script = dir.path().join("new-binary");
    std::fs::write(&script, "#!/bin/sh\nls -l /proc/$$/fd | grep -c 'socket:' > \"$FDS_OUT\"\nexit 3\n")
        .unwrap();
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
    let log = std::fs::File::create(dir.path().join("node.log")).unwrap();
    let mut node = Command::new(BIN)
        .args(["--data-dir", data.to_str().unwrap(), "serve", "--backend", "file"])
        .args(["--listen", "127.0.0.1:0", "--metrics-listen", "off", "--workers", "1"])
        .env("FDS_OUT", &out)
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap();
    // The listening address, from `status`.
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let listen = loop {
        let o = Command::new(BIN)
            .args(["--data-dir", data.to_str().unwrap(), "--json", "status"])
            .output()
            .unwrap();
        if o.status.success() {
            let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
            break v["listen"].as_str().unwrap().to_owned();
        }
        assert!(std::time::Instant::now() < deadline, "the node did not come up");
        std::thread::sleep(Duration::from_millis(50));
    };
    // Hosts connected (their connections accepted by the node).
    let hosts: Vec<TcpStream> = (0..20).map(|_| TcpStream::connect(&listen).unwrap()).collect();
    std::thread::sleep(Duration::from_millis(200));
    let o = Command::new(BIN)
        .args(["--data-dir", data.to_str().unwrap(), "upgrade", "--binary", script.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(!o.status.success(), "the script fails the upgrade");
    let sockets: usize = std::fs::read_to_string(&out).expect("the script ran").trim().parse().unwrap();
    // The rendezvous socket is the node's to accept on, not the child's; stderr is a file.
    assert_eq!(sockets, 0, "sockets inherited by the node's child (hosts connected: {})", hosts.len());
    let _ = node.kill();
    let _ = node.wait();
}
