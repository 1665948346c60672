//! DH-HMAC-CHAP against hostile hosts, two ways:
//!
//! - **direct** (byte 0 bit 7 set): the per-queue state machine (`nvmeof_target::fuzzing::AuthHarness`)
//!   fed with arbitrary messages and receives, fast;
//! - **engine**: a whole connection (ICReq, Connect to a subsystem that requires authentication),
//!   then arbitrary Authentication Send / Receive commands (in the capsule or by R2T, with mangled
//!   TL/AL/SECP), other commands, and clock jumps.
//!
//! Either way the host may first run the honest protocol part of the way (byte 0 bits 0..1: nothing,
//! up to the Challenge, or a full authentication), so the fuzzer starts in every state.
//!
//! The target prefers the null group unless byte 0 bit 4 is set (then: its defaults, FFDHE first), so
//! that most runs spend their time on the protocol rather than on exponentiations (the DH code has
//! its own byte-exact vectors).
//!
//! Checks: no panic; the target only ever sends well-formed PDUs and well-formed authentication
//! messages; nothing happens after Close; and a queue that was never honestly authenticated never
//! becomes usable (the fuzzer does not know the secret, so it cannot forge a response).
//!
//! Input: byte 0 = scenario bits, then operations: `op` byte, then its operands (see `run_*`).
#![no_main]

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use nvmeof_proto::nvme::auth::{AuthMessage, DhGroup};
use nvmeof_proto::nvme::fabrics::{AuthReceiveCommand, AuthSendCommand, CNTLID_DYNAMIC, CONNECT_AUTHREQ_ATR};
use nvmeof_proto::nvme::registers::{offset, PropertyWidth};
use nvmeof_proto::nvme::{Cqe, Status};
use nvmeof_proto::{DecoderConfig, Digests, Payload, PduDecoder};
use nvmeof_target::auth::{AuthConfig, DeterministicEntropy, DhchapSecret, HostSecrets, MemoryHostKeys};
use nvmeof_target::fuzzing::{AuthHarness, Step};
use nvmeof_target::host::{self, Completion, HostAuthConfig, HostAuthenticator, HostOptions, HostQueue};
use nvmeof_target::{
    Connection, Event, HostAccess, MemoryBackend, NamespaceConfig, SubsystemConfig, Target, TargetConfig,
    TransportParams,
};

const NQN: &str = "nqn.2026-01.io.xatastor:fuzz";
const HOST: &str = "nqn.2014-08.io.example:host";
const HOST_SECRET: &str = "DHHC-1:00:AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh+KfiaR:";
const CTRL_SECRET: &str = "DHHC-1:01:bHuByyp0b3RFSx1xQPMVO1HKmUWfzveoahfydpW4fNgSLMVm:";

/// Splits operands off the input.
struct Input<'a>(&'a [u8]);

impl<'a> Input<'a> {
    fn byte(&mut self) -> Option<u8> {
        let (&b, rest) = self.0.split_first()?;
        self.0 = rest;
        Some(b)
    }
    fn u16(&mut self) -> Option<u16> {
        Some(u16::from_le_bytes([self.byte()?, self.byte()?]))
    }
    fn bytes(&mut self, n: usize) -> &'a [u8] {
        let n = n.min(self.0.len());
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        head
    }
}

fn auth_config(scenario: u8) -> AuthConfig {
    if scenario & 0x10 != 0 {
        AuthConfig::default()
    } else {
        AuthConfig { dh_groups: vec![DhGroup::Null, DhGroup::Ffdhe2048], ..AuthConfig::default() }
    }
}

fn host_config(bidirectional: bool) -> Arc<HostAuthConfig> {
    let mut c = HostAuthConfig::new(HOST, NQN, DhchapSecret::parse(HOST_SECRET).unwrap());
    // Keep the honest part cheap: the null group or ffdhe2048.
    c.dh_groups = vec![DhGroup::Null, DhGroup::Ffdhe2048];
    if bidirectional {
        c.controller_secret = Some(DhchapSecret::parse(CTRL_SECRET).unwrap());
    }
    Arc::new(c)
}

fn check_message(bytes: &[u8]) {
    if let Err(e) = AuthMessage::parse(bytes) {
        panic!("target sent an invalid authentication message: {e}");
    }
}

// ---- direct ----

fn ok_completion(data: Vec<u8>) -> Completion {
    Completion { cqe: Cqe::new(1, 0, 0, Status::SUCCESS), data: Payload::from(data), via_success_flag: false }
}

fn run_direct(scenario: u8, mut input: Input<'_>, start: Instant) {
    let secrets = if scenario & 0x08 != 0 {
        None
    } else {
        let s = HostSecrets::new(DhchapSecret::parse(HOST_SECRET).unwrap());
        Some(if scenario & 0x04 != 0 {
            s.with_controller(DhchapSecret::parse(CTRL_SECRET).unwrap())
        } else {
            s
        })
    };
    let mut h = AuthHarness::new(
        secrets,
        auth_config(scenario),
        start + Duration::from_secs(10),
        u64::from(scenario),
    );
    let mut now = start;
    let mut honest = false;
    // The honest host, part of the way.
    let prefix = scenario & 0x03;
    if prefix != 0 {
        let mut host = HostAuthenticator::new(
            host_config(scenario & 0x04 != 0),
            1,
            Arc::new(DeterministicEntropy::new(9)),
        );
        let mut steps = 0;
        while let Some((sqe, data, read_len)) = host.poll_command() {
            if prefix == 1 && steps == 2 {
                break; // stop after Negotiate + Challenge
            }
            steps += 1;
            let completion = match data {
                Some(d) => {
                    h.send(&d.to_bytes(), now);
                    ok_completion(Vec::new())
                }
                None => {
                    let _ = sqe;
                    let (msg, _) = h.receive(read_len, now);
                    ok_completion(msg.unwrap_or_default())
                }
            };
            host.handle_completion(&completion);
        }
        honest = h.is_authenticated();
    }
    let mut closed = false;
    while let Some(op) = input.byte() {
        if closed {
            break;
        }
        match op & 0x03 {
            0 | 1 => {
                let len = usize::from(input.u16().unwrap_or(0)) % 2048;
                let msg = input.bytes(len);
                match h.send(msg, now) {
                    Step::Authenticated => assert!(honest, "authenticated without the secret"),
                    Step::Aborted => closed = true,
                    Step::Continue | Step::Failed => {}
                }
            }
            2 => {
                let al = u32::from(input.u16().unwrap_or(0));
                let (msg, end) = h.receive(al, now);
                if let Some(m) = msg {
                    assert!(m.len() <= al as usize, "message larger than the host's buffer");
                    check_message(&m);
                }
                closed |= end;
            }
            _ => {
                now += Duration::from_millis(u64::from(input.byte().unwrap_or(0)) * 100);
                closed |= h.timeout(now);
            }
        }
        if h.is_authenticated() {
            assert!(honest, "queue usable without the secret");
        }
    }
}

// ---- engine ----

fn params() -> TransportParams {
    let a = "127.0.0.1:4420".parse().unwrap();
    TransportParams { local_addr: a, peer_addr: a, port_id: 1 }
}

struct Side {
    conn: Connection,
    host: HostQueue,
    to_target: BytesMut,
    to_host: BytesMut,
    sent: Vec<u8>,
    closed: bool,
    completions: Vec<Completion>,
}

impl Side {
    fn pump(&mut self, now: Instant) {
        for _ in 0..64 {
            let mut progress = false;
            while let Some(p) = self.host.poll_transmit() {
                self.to_target.extend_from_slice(&p.to_vec());
                progress = true;
            }
            if !self.closed && !self.to_target.is_empty() {
                self.conn.handle_input(&mut self.to_target, now);
            }
            while let Some(ev) = self.conn.poll_event() {
                progress = true;
                assert!(!self.closed, "no events after Close");
                match ev {
                    Event::Transmit(p) => {
                        let bytes = p.to_vec();
                        self.sent.extend_from_slice(&bytes);
                        self.to_host.extend_from_slice(&bytes);
                    }
                    Event::Io(req) => {
                        let r = nvmeof_target::execute_blocking(req.namespace.backend().as_ref(), req.op);
                        self.conn.complete_io(req.token, r, now);
                    }
                    Event::Close(_) => self.closed = true,
                    other => panic!("unknown engine event {other:?}"),
                }
            }
            if !self.to_host.is_empty() && self.host.handle_input(&mut self.to_host).is_err() {
                self.to_host.clear();
            }
            while let Some(c) = self.host.poll_completion() {
                self.completions.push(c);
            }
            if !progress {
                break;
            }
        }
    }

    fn command(
        &mut self,
        sqe: nvmeof_proto::nvme::Sqe,
        data: Option<Payload>,
        read_len: u32,
        now: Instant,
    ) -> Option<Completion> {
        // Completions of earlier commands (an Authentication Send by R2T) may share the CID.
        self.completions.clear();
        let cid = self.host.submit(sqe, data, read_len);
        self.pump(now);
        let pos = self.completions.iter().position(|c| c.cqe.cid.get() == cid)?;
        Some(self.completions.remove(pos))
    }
}

fn run_engine(scenario: u8, mut input: Input<'_>, start: Instant) {
    let mut config = TargetConfig::default();
    config.max_data_in_flight_per_connection = 64 * 1024;
    config.auth = auth_config(scenario);
    let target = Target::new(config);
    target
        .add_subsystem(SubsystemConfig {
            access: HostAccess::AllowAny,
            require_auth: true,
            ..SubsystemConfig::new(NQN, "FUZZ")
        })
        .unwrap();
    target
        .add_namespace(NQN, NamespaceConfig::derived(NQN, 1, Arc::new(MemoryBackend::new(1 << 20, 512))))
        .unwrap();
    target.set_entropy(Arc::new(DeterministicEntropy::new(u64::from(scenario))));
    let keys = Arc::new(MemoryHostKeys::new());
    if scenario & 0x08 == 0 {
        let mut s = HostSecrets::new(DhchapSecret::parse(HOST_SECRET).unwrap());
        if scenario & 0x04 != 0 {
            s = s.with_controller(DhchapSecret::parse(CTRL_SECRET).unwrap());
        }
        keys.set(NQN, HOST, s);
    }
    target.set_host_keys(keys);

    let mut side = Side {
        conn: target.accept(params(), start),
        host: HostQueue::new(HostOptions::default()),
        to_target: BytesMut::new(),
        to_host: BytesMut::new(),
        sent: Vec::new(),
        closed: false,
        completions: Vec::new(),
    };
    side.pump(start);
    let (sqe, data) = host::connect_command(0, 32, 0, CNTLID_DYNAMIC, [1; 16], NQN, HOST);
    let c = side.command(sqe, Some(data), 0, start).expect("Connect answered");
    assert!(
        c.status().is_success() && c.cqe.dw0.get() & CONNECT_AUTHREQ_ATR != 0,
        "Connect asks for authentication"
    );

    let mut now = start;
    let mut honest = false;
    let prefix = scenario & 0x03;
    if prefix != 0 {
        let mut auth = HostAuthenticator::new(
            host_config(scenario & 0x04 != 0),
            1,
            Arc::new(DeterministicEntropy::new(9)),
        );
        let mut steps = 0;
        while let Some((sqe, data, read_len)) = auth.poll_command() {
            if prefix == 1 && steps == 2 {
                break;
            }
            steps += 1;
            match side.command(sqe, data, read_len, now) {
                Some(c) => auth.handle_completion(&c),
                None => break,
            }
        }
        honest = matches!(auth.result(), Some(Ok(_)));
    }

    while let Some(op) = input.byte() {
        if side.closed {
            break;
        }
        match op & 0x07 {
            0 | 1 | 2 => {
                let len = usize::from(input.u16().unwrap_or(0)) % 9000;
                let msg = input.bytes(len).to_vec();
                let (sqe, data) = host::auth_send_command(msg.clone());
                let mut cmd = AuthSendCommand::from_sqe(&sqe);
                if op & 0x40 != 0 {
                    cmd.tl.set(cmd.tl.get() ^ u32::from(input.byte().unwrap_or(0)));
                }
                if op & 0x80 != 0 {
                    cmd.secp ^= input.byte().unwrap_or(0);
                }
                if op & 0x20 != 0 {
                    let cid = side.host.submit_data_by_r2t(cmd.to_sqe(), Payload::from(msg));
                    side.pump(now);
                    let _ = cid;
                } else {
                    side.command(cmd.to_sqe(), Some(data), 0, now);
                }
            }
            3 | 4 => {
                let al = u32::from(input.u16().unwrap_or(0));
                let mut cmd = AuthReceiveCommand::from_sqe(&host::auth_receive_command(al));
                if op & 0x40 != 0 {
                    cmd.al.set(cmd.al.get() ^ u32::from(input.byte().unwrap_or(0)));
                }
                if let Some(c) = side.command(cmd.to_sqe(), None, al, now) {
                    if c.status().is_success() && !c.data.is_empty() {
                        check_message(&c.data.to_bytes());
                    }
                }
            }
            5 => {
                // Anything else must be refused until the host has authenticated.
                let cap = side.command(host::property_get(offset::CAP, PropertyWidth::Eight), None, 0, now);
                if let Some(c) = cap {
                    if c.status().is_success() {
                        assert!(honest, "a command ran on a queue that never authenticated");
                    }
                }
            }
            _ => {
                now += Duration::from_millis(u64::from(input.byte().unwrap_or(0)) * 100);
                side.conn.handle_timeout(now);
                side.pump(now);
            }
        }
    }

    // Whatever the target sent must be well-formed controller-to-host PDUs.
    let mut dec = PduDecoder::new(DecoderConfig {
        digests: Digests::NONE,
        max_data_pdu: 1 << 20,
        ..DecoderConfig::host()
    });
    let mut out = BytesMut::from(&side.sent[..]);
    loop {
        match dec.decode(&mut out) {
            Ok(Some(_)) => {}
            Ok(None) => break,
            Err(e) => panic!("target sent an invalid PDU: {e}"),
        }
    }
    assert!(out.is_empty(), "target sent a truncated PDU");
}

fuzz_target!(|data: &[u8]| {
    let Some((&scenario, rest)) = data.split_first() else { return };
    #[allow(clippy::disallowed_methods)]
    let start = Instant::now();
    if scenario & 0x80 != 0 {
        run_direct(scenario, Input(rest), start);
    } else {
        run_engine(scenario, Input(rest), start);
    }
});
