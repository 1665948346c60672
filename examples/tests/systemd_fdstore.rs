//! `xatastor-target serve` under a stand-in for systemd: it says READY on `$NOTIFY_SOCKET` and keeps
//! its listening sockets in the manager's fd store; killed, it leaves those sockets with the manager,
//! so a host that connects while the node is down waits in the listen backlog instead of being
//! refused; restarted with them (`LISTEN_FDS`), the node serves that connection.

use std::io::{IoSliceMut, Read, Write};
use std::mem::MaybeUninit;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::net::UnixDatagram;
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use bytes::BytesMut;
use nvmeof_proto::{DecoderConfig, Digests, IcReq, Pdu, PduDecoder};
use rustix::net::{RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags};

const BIN: &str = env!("CARGO_BIN_EXE_xatastor-target");

/// A free loopback port (bound and released: a moment later the node binds it).
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// The manager's next message and its descriptors, waiting up to `timeout`.
fn recv(sock: &UnixDatagram, timeout: Duration) -> Option<(String, Vec<OwnedFd>)> {
    sock.set_read_timeout(Some(timeout)).unwrap();
    let mut buf = vec![0u8; 4096];
    let mut space = vec![MaybeUninit::<u8>::uninit(); rustix::cmsg_space!(ScmRights(253))];
    let mut control = RecvAncillaryBuffer::new(&mut space);
    let msg =
        rustix::net::recvmsg(sock, &mut [IoSliceMut::new(&mut buf)], &mut control, RecvFlags::CMSG_CLOEXEC)
            .ok()?;
    let mut fds = Vec::new();
    for m in control.drain() {
        if let RecvAncillaryMessage::ScmRights(rights) = m {
            fds.extend(rights);
        }
    }
    buf.truncate(msg.bytes);
    Some((String::from_utf8_lossy(&buf).into_owned(), fds))
}

/// Reads the manager's messages until READY=1; returns every descriptor stored meanwhile (FDSTORE=1).
#[allow(clippy::disallowed_methods)] // a test's deadline for a child process
fn until_ready(sock: &UnixDatagram, node: &mut Child) -> Vec<OwnedFd> {
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut stored = Vec::new();
    let mut ready = false;
    while Instant::now() < deadline {
        if let Ok(Some(status)) = node.try_wait() {
            panic!("the node exited: {status}");
        }
        let Some((text, fds)) = recv(sock, Duration::from_millis(200)) else {
            if ready {
                break; // READY came; the store message, if any, was before or right after it
            }
            continue;
        };
        if text.lines().any(|l| l == "FDSTORE=1") {
            assert!(text.lines().any(|l| l == "FDNAME=nvme-listen"), "{text}");
            stored.extend(fds);
        }
        if text.lines().any(|l| l == "READY=1") {
            ready = true;
        }
    }
    assert!(ready, "no READY=1 from the node");
    stored
}

fn icreq_bytes() -> Vec<u8> {
    let req = IcReq { pfv: 0, hpda: 0, digests: Digests::default(), maxr2t: 0 };
    Pdu::IcReq(req).encode(&Default::default()).unwrap().to_vec()
}

fn expect_icresp(stream: &mut TcpStream) {
    stream.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let mut buf = BytesMut::new();
    let mut dec = PduDecoder::new(DecoderConfig::host());
    let mut chunk = [0u8; 256];
    loop {
        let n = stream.read(&mut chunk).expect("an answer to the ICReq");
        assert!(n > 0, "the connection was closed instead of served");
        buf.extend_from_slice(&chunk[..n]);
        if let Some(pdu) = dec.decode(&mut buf).unwrap() {
            assert!(matches!(pdu, Pdu::IcResp(_)), "{pdu:?}");
            return;
        }
    }
}

#[test]
fn a_crash_restart_refuses_no_connection() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let notify_path = dir.path().join("notify");
    let manager = UnixDatagram::bind(&notify_path).unwrap();
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let args = ["--data-dir", data.to_str().unwrap(), "serve", "--backend", "file", "--listen", &listen];
    let log = |name: &str| std::fs::File::create(dir.path().join(name)).unwrap();
    let mut first = Command::new(BIN)
        .args(args)
        .args(["--metrics-listen", "off", "--workers", "2"])
        .env("NOTIFY_SOCKET", &notify_path)
        .stdout(Stdio::null())
        .stderr(log("first.log"))
        .spawn()
        .unwrap();
    let stored = until_ready(&manager, &mut first);
    assert_eq!(stored.len(), 2, "one listening socket per worker is stored");
    let addr: SocketAddr = listen.parse().unwrap();
    for fd in &stored {
        let bound = rustix::net::getsockname(fd).unwrap();
        assert_eq!(SocketAddr::try_from(bound).unwrap(), addr);
    }

    // The node dies; the manager still holds the sockets: a host that connects now is queued, not
    // refused.
    first.kill().unwrap();
    first.wait().unwrap();
    let mut early = TcpStream::connect(addr).expect("connect while the node is down");
    early.write_all(&icreq_bytes()).unwrap();

    // The manager restarts the node with the stored sockets at fd 3 and 4 (LISTEN_PID is the pid
    // that execs the node: `sh -c 'LISTEN_PID=$$ exec …'`).
    let raw: Vec<i32> = stored.iter().map(AsRawFd::as_raw_fd).collect();
    let mut cmd = Command::new("sh");
    cmd.arg("-c")
        .arg("LISTEN_PID=$$ exec \"$@\"")
        .arg("sh")
        .arg(BIN)
        .args(args)
        .args(["--metrics-listen", "off", "--workers", "2"])
        .env("NOTIFY_SOCKET", &notify_path)
        .env("LISTEN_FDS", "2")
        .env("LISTEN_FDNAMES", "nvme-listen:nvme-listen")
        .stdout(Stdio::null())
        .stderr(log("second.log"));
    // SAFETY: the closure runs in the forked child before exec; it only calls dup2 (async-signal
    // safe) on descriptors this process holds, and builds an io::Error from errno.
    unsafe {
        cmd.pre_exec(move || {
            for (i, from) in raw.iter().enumerate() {
                if libc::dup2(*from, 3 + i as i32) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
    let mut second = cmd.spawn().unwrap();
    until_ready(&manager, &mut second);
    // The connection made while the node was down is served by the restarted node.
    expect_icresp(&mut early);
    // And so are new ones.
    let mut late = TcpStream::connect(addr).unwrap();
    late.write_all(&icreq_bytes()).unwrap();
    expect_icresp(&mut late);
    let _ = rustix::process::kill_process(
        rustix::process::Pid::from_child(&second),
        rustix::process::Signal::TERM,
    );
    let status = second.wait().unwrap();
    let log = std::fs::read_to_string(dir.path().join("second.log")).unwrap();
    assert!(log.contains("reusing the listening sockets systemd kept"), "{log}");
    assert!(status.success(), "{status}\n{log}");
}
