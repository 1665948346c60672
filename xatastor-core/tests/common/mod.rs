//! Helpers shared by the integration tests that talk to the server with the in-tree host.
#![allow(dead_code)] // each test file uses a subset

pub(crate) mod marker;

use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;
use std::time::Duration;

use nvmeof_proto::nvme::fabrics::{CNTLID_DYNAMIC, CONNECT_AUTHREQ_ATR};
use nvmeof_proto::nvme::registers::{offset, PropertyWidth};
use nvmeof_proto::nvme::{Sqe, Status};
use nvmeof_target::auth::{DhchapSecret, OsEntropy};
use nvmeof_target::host::{self, AuthOutcome, BlockingHost, HostAuthConfig, HostAuthenticator, HostOptions};

/// The in-tree initiator over TCP.
pub(crate) type Host = BlockingHost<TcpStream>;

/// A TCP connection with a read timeout (a hung server fails the test instead of hanging it) and
/// no Nagle delay (a host sends each PDU at once, as the Linux initiator does).
pub(crate) fn tcp(addr: SocketAddr) -> TcpStream {
    tune(TcpStream::connect(addr).unwrap())
}

/// Gives a connected stream the read timeout and the no-Nagle setting of [`tcp`].
pub(crate) fn tune(s: TcpStream) -> TcpStream {
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    s.set_nodelay(true).unwrap();
    s
}

/// Connects an admin queue to `subnqn` as `hostnqn` and enables the controller; returns it and its
/// CNTLID, or the Connect command's status.
pub(crate) fn connect_admin(
    addr: SocketAddr,
    subnqn: &str,
    hostnqn: &str,
    kato_ms: u32,
) -> Result<(Host, u16), Status> {
    let mut a = Host::new(tcp(addr), HostOptions::default()).unwrap();
    let (sqe, data) = host::connect_command(0, 32, kato_ms, CNTLID_DYNAMIC, [7; 16], subnqn, hostnqn);
    let c = a.command(sqe, Some(data), 0).unwrap();
    if c.status() != Status::SUCCESS {
        return Err(c.status());
    }
    let cntlid = c.cqe.dw0.get() as u16;
    let c = a.command(host::property_set(offset::CC, PropertyWidth::Four, 0x0046_0001), None, 0).unwrap();
    assert_eq!(c.status(), Status::SUCCESS);
    Ok((a, cntlid))
}

/// Set Features, Number of Queues: asks for `n` I/O queues.
pub(crate) fn set_queue_count(a: &mut Host, n: u16) {
    let mut nq = Sqe::zeroed();
    nq.opcode = 0x09;
    nq.cdw10.set(0x07);
    let z = u32::from(n.saturating_sub(1)); // 0's based
    nq.cdw11.set(z << 16 | z);
    assert_eq!(a.command(nq, None, 0).unwrap().status(), Status::SUCCESS);
}

/// Connects I/O queue `qid` of controller `cntlid`.
pub(crate) fn connect_io(addr: SocketAddr, subnqn: &str, hostnqn: &str, qid: u16, cntlid: u16) -> Host {
    connect_io_over(tcp(addr), subnqn, hostnqn, qid, cntlid)
}

/// Connects I/O queue `qid` of controller `cntlid` over a stream the caller connected.
pub(crate) fn connect_io_over(stream: TcpStream, subnqn: &str, hostnqn: &str, qid: u16, cntlid: u16) -> Host {
    let mut q = Host::new(stream, HostOptions::default()).unwrap();
    let (sqe, data) = host::connect_command(qid, 128, 0, cntlid, [7; 16], subnqn, hostnqn);
    assert_eq!(q.command(sqe, Some(data), 0).unwrap().status(), Status::SUCCESS);
    q
}

/// A read (0x02) or write (0x01) of `blocks` 512-byte blocks at `slba` on namespace 1.
pub(crate) fn rw(opcode: u8, slba: u64, blocks: u32) -> Sqe {
    host::rw_command(opcode, 1, slba, blocks)
}

/// Waits (without asserting on time) until `f` holds; panics after a generous bound.
pub(crate) fn eventually(what: &str, mut f: impl FnMut() -> bool) {
    for _ in 0..2000 {
        if f() {
            return;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    panic!("never happened: {what}");
}

/// [`tcp`] without Nagle's algorithm: a command written as header and data goes out at once
/// instead of waiting for the delayed ACK of the header (about 40 ms per command).
pub(crate) fn tcp_nodelay(addr: SocketAddr) -> TcpStream {
    let s = tcp(addr);
    s.set_nodelay(true).unwrap();
    s
}

/// The admin Connect alone: the queue, its CNTLID and whether the target asks it to authenticate
/// (AUTHREQ.ATR), or the Connect command's status.
pub(crate) fn connect_admin_only(
    addr: SocketAddr,
    subnqn: &str,
    hostnqn: &str,
    kato_ms: u32,
) -> Result<(Host, u16, bool), Status> {
    let mut a = Host::new(tcp_nodelay(addr), HostOptions::default()).unwrap();
    let (sqe, data) = host::connect_command(0, 32, kato_ms, CNTLID_DYNAMIC, [7; 16], subnqn, hostnqn);
    let c = a.command(sqe, Some(data), 0).unwrap();
    if c.status() != Status::SUCCESS {
        return Err(c.status());
    }
    let dw0 = c.cqe.dw0.get();
    Ok((a, dw0 as u16, dw0 & CONNECT_AUTHREQ_ATR != 0))
}

/// I/O queue `qid` of `cntlid`, connected: the queue and whether it must authenticate.
pub(crate) fn connect_io_only(
    addr: SocketAddr,
    subnqn: &str,
    hostnqn: &str,
    qid: u16,
    cntlid: u16,
) -> Result<(Host, bool), Status> {
    let mut q = Host::new(tcp_nodelay(addr), HostOptions::default()).unwrap();
    let (sqe, data) = host::connect_command(qid, 128, 0, cntlid, [7; 16], subnqn, hostnqn);
    let c = q.command(sqe, Some(data), 0).unwrap();
    if c.status() != Status::SUCCESS {
        return Err(c.status());
    }
    Ok((q, c.cqe.dw0.get() & CONNECT_AUTHREQ_ATR != 0))
}

/// One DH-HMAC-CHAP transaction on `q` as `hostnqn` with the in-tree host: `secret` proves the
/// host, `ctrl` (if given) asks the controller to prove itself. A refusal is `PermissionDenied`.
pub(crate) fn authenticate(
    q: &mut Host,
    hostnqn: &str,
    subnqn: &str,
    secret: &DhchapSecret,
    ctrl: Option<&DhchapSecret>,
    t_id: u16,
) -> std::io::Result<AuthOutcome> {
    let mut config = HostAuthConfig::new(hostnqn, subnqn, secret.clone());
    config.controller_secret = ctrl.cloned();
    let mut auth = HostAuthenticator::new(Arc::new(config), t_id, Arc::new(OsEntropy));
    q.authenticate(&mut auth)
}

/// Enables the controller of an admin queue (CC.EN).
pub(crate) fn enable(a: &mut Host) {
    let c = a.command(host::property_set(offset::CC, PropertyWidth::Four, 0x0046_0001), None, 0).unwrap();
    assert_eq!(c.status(), Status::SUCCESS, "CC.EN");
}

/// Every log line of the process, captured from the moment [`LogCapture::install`] is called (a
/// test binary of its own: the subscriber is the process's).
#[derive(Clone, Default)]
pub(crate) struct LogCapture(Arc<std::sync::Mutex<Vec<u8>>>);

impl LogCapture {
    /// Installs the process's log subscriber at `level`, writing into the returned capture.
    pub(crate) fn install(level: tracing::Level) -> Self {
        let capture = Self::default();
        let sink = capture.clone();
        tracing_subscriber::fmt()
            .with_max_level(level)
            .with_ansi(false)
            .with_writer(move || sink.clone())
            .init();
        capture
    }

    /// What was logged so far.
    pub(crate) fn text(&self) -> String {
        String::from_utf8(self.0.lock().unwrap().clone()).unwrap()
    }
}

impl std::io::Write for LogCapture {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}
