//! In-process host/target pairs with a fake clock (in the style of quinn-proto's test utilities).
#![allow(dead_code, unreachable_pub)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use nvmeof_proto::nvme::fabrics::CNTLID_DYNAMIC;
use nvmeof_proto::nvme::nvm::{GetLogPageCommand, IdentifyCommand, RwCommand};
use nvmeof_proto::nvme::registers::{offset, PropertyWidth};
use nvmeof_proto::nvme::{Sqe, Status};
use nvmeof_proto::Payload;
use nvmeof_target::host::{self, Completion, HostOptions, HostQueue};
use nvmeof_target::{
    execute_blocking, CloseReason, Connection, Event, HostAccess, IoRequest, MemoryBackend, NamespaceConfig,
    SubsystemConfig, Target, TargetConfig, TransportParams,
};

pub const SUBNQN: &str = "nqn.2026-01.io.xatastor:test-vol";
pub const HOSTNQN: &str = "nqn.2014-08.org.nvmexpress:uuid:00000000-0000-0000-0000-000000000001";
pub const HOSTID: [u8; 16] = [7; 16];

pub fn params() -> TransportParams {
    TransportParams {
        local_addr: "127.0.0.1:4420".parse().unwrap(),
        peer_addr: "127.0.0.1:50000".parse().unwrap(),
        port_id: 1,
    }
}

/// A target with one subsystem (allowing HOSTNQN) and one 64 MiB memory namespace.
pub fn target_with_volume() -> (Target, Arc<MemoryBackend>) {
    target_with_config(TargetConfig::default())
}

pub fn target_with_config(config: TargetConfig) -> (Target, Arc<MemoryBackend>) {
    let target = Target::new(config);
    let mut sc = SubsystemConfig::new(SUBNQN, "XS0001");
    sc.allowed_hosts.push(HOSTNQN.into());
    target.add_subsystem(sc).unwrap();
    let backend = Arc::new(MemoryBackend::new(64 << 20, 512));
    target.add_namespace(SUBNQN, NamespaceConfig::derived(SUBNQN, 1, backend.clone())).unwrap();
    (target, backend)
}

pub fn allow_any(target: &Target, nqn: &str) {
    target.set_host_access(nqn, HostAccess::AllowAny).unwrap();
}

/// One TCP connection: the target's side and the host's side, with the bytes in between.
pub struct Link {
    pub conn: Connection,
    pub host: HostQueue,
    pub to_target: BytesMut,
    pub to_host: BytesMut,
    pub closed: Option<CloseReason>,
    pub host_error: Option<String>,
    /// When set, I/O requests are parked here instead of being executed at once.
    pub defer_io: bool,
    pub parked: Vec<IoRequest>,
    /// Completions that arrived while a test waited for another command.
    pub stash: Vec<Completion>,
}

impl Link {
    pub fn new(target: &Target, options: HostOptions, now: Instant) -> Self {
        Self {
            conn: target.accept(params(), now),
            host: HostQueue::new(options),
            to_target: BytesMut::new(),
            to_host: BytesMut::new(),
            closed: None,
            host_error: None,
            defer_io: false,
            parked: Vec::new(),
            stash: Vec::new(),
        }
    }

    /// Moves bytes both ways and runs I/O until nothing happens any more.
    pub fn pump(&mut self, now: Instant) {
        loop {
            let mut progress = false;
            while let Some(pdu) = self.host.poll_transmit() {
                self.to_target.extend_from_slice(&pdu.to_vec());
                progress = true;
            }
            if !self.to_target.is_empty() && self.closed.is_none() {
                let before = self.to_target.len();
                self.conn.handle_input(&mut self.to_target, now);
                progress |= self.to_target.len() != before;
            }
            progress |= self.drain_events(now);
            if !self.to_host.is_empty() && self.host_error.is_none() {
                if let Err(e) = self.host.handle_input(&mut self.to_host) {
                    self.host_error = Some(e.to_string());
                }
            }
            if !progress {
                return;
            }
        }
    }

    pub fn drain_events(&mut self, now: Instant) -> bool {
        let mut progress = false;
        while let Some(ev) = self.conn.poll_event() {
            progress = true;
            match ev {
                Event::Transmit(pdu) => self.to_host.extend_from_slice(&pdu.to_vec()),
                Event::Io(req) if self.defer_io => self.parked.push(req),
                Event::Io(req) => {
                    let r = execute_blocking(req.namespace.backend().as_ref(), req.op);
                    self.conn.complete_io(req.token, r, now);
                }
                Event::Close(reason) => self.closed = Some(reason),
                other => panic!("unexpected engine event: {other:?}"),
            }
        }
        progress
    }

    /// Submits a command and runs the link until it completes.
    pub fn command(&mut self, sqe: Sqe, data: Option<Payload>, read_len: u32, now: Instant) -> Completion {
        let cid = self.host.submit(sqe, data, read_len);
        self.pump(now);
        self.take_completion(cid)
    }

    pub fn take_completion(&mut self, cid: u16) -> Completion {
        while let Some(c) = self.host.poll_completion() {
            self.stash.push(c);
        }
        let pos = self.stash.iter().position(|c| c.cqe.cid.get() == cid).unwrap_or_else(|| {
            panic!(
                "command {cid} did not complete (closed: {:?}, host error: {:?})",
                self.closed, self.host_error
            )
        });
        self.stash.remove(pos)
    }

    /// Completions not yet taken (e.g. asynchronous events).
    pub fn pending_completions(&mut self) -> Vec<Completion> {
        while let Some(c) = self.host.poll_completion() {
            self.stash.push(c);
        }
        std::mem::take(&mut self.stash)
    }
}

/// Connects an admin queue the way the Linux host does (`nvme connect`): ICReq, Connect, CAP, CC with
/// EN=0 then EN=1, CSTS until ready, VS, Identify Controller. Returns the CNTLID.
pub fn bring_up_admin(link: &mut Link, subnqn: &str, kato_ms: u32, now: Instant) -> u16 {
    link.pump(now);
    assert!(link.host.is_ready(), "ICResp: {:?} {:?}", link.closed, link.host_error);
    let (sqe, data) = host::connect_command(0, 32, kato_ms, CNTLID_DYNAMIC, HOSTID, subnqn, HOSTNQN);
    let c = link.command(sqe, Some(data), 0, now);
    assert_eq!(c.status(), Status::SUCCESS, "admin Connect");
    let cntlid = c.cqe.dw0.get() as u16;
    let cap = link.command(host::property_get(offset::CAP, PropertyWidth::Eight), None, 0, now);
    assert_eq!(cap.status(), Status::SUCCESS);
    assert_eq!((cap.cqe.result_u64() >> 48) & 0xf, 0, "MPSMIN must be 0 (4 KiB pages)");
    for cc in [0x0046_0000u64, 0x0046_0001] {
        let r = link.command(host::property_set(offset::CC, PropertyWidth::Four, cc), None, 0, now);
        assert_eq!(r.status(), Status::SUCCESS);
    }
    let csts = link.command(host::property_get(offset::CSTS, PropertyWidth::Four), None, 0, now);
    assert_eq!(csts.cqe.dw0.get() & 1, 1, "CSTS.RDY");
    let vs = link.command(host::property_get(offset::VS, PropertyWidth::Four), None, 0, now);
    assert!(vs.cqe.dw0.get() >= 0x0001_0300);
    cntlid
}

pub fn identify(link: &mut Link, cns: u8, nsid: u32, now: Instant) -> Completion {
    let mut sqe = Sqe::zeroed();
    sqe.opcode = 0x06;
    sqe.nsid.set(nsid);
    IdentifyCommand { cns, ..Default::default() }.apply(&mut sqe);
    link.command(sqe, None, 4096, now)
}

pub fn get_log_page(
    link: &mut Link,
    lid: u8,
    nsid: u32,
    offset: u64,
    len: u32,
    rae: bool,
    now: Instant,
) -> Completion {
    let mut sqe = Sqe::zeroed();
    sqe.opcode = 0x02;
    sqe.nsid.set(nsid);
    let mut g = GetLogPageCommand::new(lid, offset, u64::from(len));
    g.rae = rae;
    g.apply(&mut sqe);
    link.command(sqe, None, len, now)
}

pub fn set_features(link: &mut Link, cdw10: u32, value: u32, now: Instant) -> Completion {
    let mut sqe = Sqe::zeroed();
    sqe.opcode = 0x09;
    sqe.cdw10.set(cdw10);
    sqe.cdw11.set(value);
    link.command(sqe, None, 0, now)
}

/// Connects an I/O queue of controller `cntlid`.
pub fn bring_up_io(link: &mut Link, cntlid: u16, qid: u16, now: Instant) {
    link.pump(now);
    assert!(link.host.is_ready());
    let (sqe, data) = host::connect_command(qid, 128, 0, cntlid, HOSTID, SUBNQN, HOSTNQN);
    let c = link.command(sqe, Some(data), 0, now);
    assert_eq!(c.status(), Status::SUCCESS, "I/O Connect qid {qid}");
}

pub fn rw_sqe(opcode: u8, slba: u64, blocks: u32, fua: bool) -> Sqe {
    let mut sqe = Sqe::zeroed();
    sqe.opcode = opcode;
    sqe.nsid.set(1);
    let mut rw = RwCommand::new(slba, blocks);
    rw.fua = fua;
    rw.apply(&mut sqe);
    sqe
}

pub fn write(link: &mut Link, slba: u64, data: Vec<u8>, now: Instant) -> Completion {
    let blocks = (data.len() / 512) as u32;
    link.command(rw_sqe(0x01, slba, blocks, false), Some(Payload::from(data)), 0, now)
}

pub fn read(link: &mut Link, slba: u64, blocks: u32, now: Instant) -> Completion {
    link.command(rw_sqe(0x02, slba, blocks, false), None, blocks * 512, now)
}

/// A fake clock.
pub struct Clock(pub Instant);

impl Clock {
    #[allow(clippy::disallowed_methods)] // the fake clock's starting point
    pub fn new() -> Self {
        Self(Instant::now())
    }
    pub fn advance(&mut self, d: Duration) -> Instant {
        self.0 += d;
        self.0
    }
}

/// An admin queue brought up as Linux does, two I/O queues granted, and I/O queue 1 connected.
pub fn io_setup(target: &Target, opts: HostOptions, kato_ms: u32, now: Instant) -> (Link, Link, u16) {
    let mut admin = Link::new(target, opts, now);
    let cntlid = bring_up_admin(&mut admin, SUBNQN, kato_ms, now);
    assert_eq!(set_features(&mut admin, 0x07, (1 << 16) | 1, now).status(), Status::SUCCESS);
    let mut io = Link::new(target, opts, now);
    bring_up_io(&mut io, cntlid, 1, now);
    (admin, io, cntlid)
}

// ---- authentication ----

use nvmeof_proto::nvme::fabrics::CONNECT_AUTHREQ_ATR;
use nvmeof_target::auth::{DeterministicEntropy, DhchapSecret, HostSecrets, MemoryHostKeys};
use nvmeof_target::host::{AuthOutcome, HostAuthConfig, HostAuthError, HostAuthenticator};

/// Fixed secrets (any 32/48/64-byte keys do; these are the nvme-cli 2.3 examples).
pub const HOST_SECRET: &str = "DHHC-1:00:AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh+KfiaR:";
pub const CTRL_SECRET: &str = "DHHC-1:01:bHuByyp0b3RFSx1xQPMVO1HKmUWfzveoahfydpW4fNgSLMVm:";
pub const OTHER_SECRET: &str =
    "DHHC-1:02:yRbznXvUOKyUzpjxLyIgLGvEOxsb9/CBo2/XbRG0sXMHJv918yV2tXSc+gbRp7T1eXmwtA==:";

pub fn secret(s: &str) -> DhchapSecret {
    DhchapSecret::parse(s).unwrap()
}

/// `target_with_volume` plus a key store holding HOST_SECRET (and CTRL_SECRET) for HOSTNQN, and a
/// deterministic entropy source.
pub fn target_with_auth(require_auth: bool) -> (Target, Arc<MemoryHostKeys>) {
    let (target, _) = target_with_volume();
    target.set_auth_required(SUBNQN, require_auth).unwrap();
    target.set_entropy(Arc::new(DeterministicEntropy::new(42)));
    let keys = Arc::new(MemoryHostKeys::new());
    keys.set(SUBNQN, HOSTNQN, HostSecrets::new(secret(HOST_SECRET)).with_controller(secret(CTRL_SECRET)));
    target.set_host_keys(keys.clone());
    (target, keys)
}

pub fn host_auth(host_secret: &str, ctrl_secret: Option<&str>) -> Arc<HostAuthConfig> {
    let mut c = HostAuthConfig::new(HOSTNQN, SUBNQN, secret(host_secret));
    c.controller_secret = ctrl_secret.map(secret);
    Arc::new(c)
}

/// Runs a host authentication transaction over the link.
pub fn authenticate(
    link: &mut Link,
    config: Arc<HostAuthConfig>,
    t_id: u16,
    seed: u64,
    now: Instant,
) -> Result<AuthOutcome, HostAuthError> {
    let mut auth = HostAuthenticator::new(config, t_id, Arc::new(DeterministicEntropy::new(seed)));
    while let Some((sqe, data, read_len)) = auth.poll_command() {
        let c = link.command(sqe, data, read_len, now);
        auth.handle_completion(&c);
    }
    auth.result().cloned().expect("authentication finished")
}

/// The admin Connect alone; returns the completion.
pub fn connect_admin(link: &mut Link, subnqn: &str, hostnqn: &str, kato_ms: u32, now: Instant) -> Completion {
    link.pump(now);
    assert!(link.host.is_ready(), "ICResp: {:?} {:?}", link.closed, link.host_error);
    let (sqe, data) = host::connect_command(0, 32, kato_ms, CNTLID_DYNAMIC, HOSTID, subnqn, hostnqn);
    link.command(sqe, Some(data), 0, now)
}

/// Like `bring_up_admin`, with DH-HMAC-CHAP between Connect and the rest (the Connect must ask for
/// it). Returns the CNTLID and what was negotiated.
pub fn bring_up_admin_auth(link: &mut Link, config: Arc<HostAuthConfig>, now: Instant) -> (u16, AuthOutcome) {
    let c = connect_admin(link, SUBNQN, HOSTNQN, 5000, now);
    assert_eq!(c.status(), Status::SUCCESS, "admin Connect");
    assert_ne!(c.cqe.dw0.get() & CONNECT_AUTHREQ_ATR, 0, "Connect asks for authentication");
    let cntlid = c.cqe.dw0.get() as u16;
    let outcome = authenticate(link, config, 1, 7, now).expect("authentication");
    for cc in [0x0046_0000u64, 0x0046_0001] {
        let r = link.command(host::property_set(offset::CC, PropertyWidth::Four, cc), None, 0, now);
        assert_eq!(r.status(), Status::SUCCESS);
    }
    (cntlid, outcome)
}

/// Connects I/O queue `qid` of `cntlid`; returns the Connect completion.
pub fn connect_io(link: &mut Link, cntlid: u16, qid: u16, now: Instant) -> Completion {
    link.pump(now);
    let (sqe, data) = host::connect_command(qid, 128, 0, cntlid, HOSTID, SUBNQN, HOSTNQN);
    link.command(sqe, Some(data), 0, now)
}
