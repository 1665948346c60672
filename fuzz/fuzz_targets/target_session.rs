//! A whole target session driven by arbitrary bytes: after a valid ICReq / Connect / enable (so that
//! the fuzzer starts where the interesting states are), the input is fed to the admin queue or an I/O
//! queue in arbitrary pieces, against a memory backend or a fault-injecting one that fails requests,
//! returns wrong lengths and completes out of order.
//!
//! Input: byte 0 = scenario bits, byte 1 = fault pattern, byte 2 = chunk size, then the stream.
//! Checks: no panic; every byte the target sends decodes as valid controller-to-host PDUs; after Close
//! nothing else is emitted; a second, healthy connection of the same target keeps working.
#![no_main]

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use nvmeof_proto::nvme::fabrics::CNTLID_DYNAMIC;
use nvmeof_proto::nvme::registers::{offset, PropertyWidth};
use nvmeof_proto::{DecoderConfig, Digests, PduDecoder};
use nvmeof_target::host::{self, HostOptions, HostQueue};
use nvmeof_target::{
    BackendInfo, BlockBackend, Completer, Connection, Event, HostAccess, IoError, IoOp, IoOutput,
    MemoryBackend, NamespaceConfig, Submitted, SubsystemConfig, Target, TargetConfig, TransportParams,
};

const NQN: &str = "nqn.2026-01.io.xatastor:fuzz";
const HOST: &str = "nqn.2014-08.org.nvmexpress:uuid:fuzz";

/// A backend that fails or misbehaves according to a bit pattern.
#[derive(Debug)]
struct Faulty {
    inner: MemoryBackend,
    pattern: u8,
    n: AtomicU32,
}

impl BlockBackend for Faulty {
    fn size_bytes(&self) -> u64 {
        self.inner.size_bytes()
    }
    fn info(&self) -> BackendInfo {
        self.inner.info()
    }
    fn submit(&self, op: IoOp, completer: Completer) -> Submitted {
        let n = self.n.fetch_add(1, Ordering::Relaxed);
        match (self.pattern >> (n % 8)) & 1 {
            0 => self.inner.submit(op, completer),
            _ if n % 3 == 0 => Submitted::Done(Err(IoError::NoSpace)),
            // A read of the wrong length: the engine must not trust it.
            _ if matches!(op, IoOp::Read { .. }) => Submitted::Done(Ok(IoOutput::Data(vec![0u8; 3].into()))),
            _ => Submitted::Done(Err(IoError::Io(std::io::Error::other("injected")))),
        }
    }
}

fn params() -> TransportParams {
    let a = "127.0.0.1:4420".parse().unwrap();
    TransportParams { local_addr: a, peer_addr: a, port_id: 1 }
}

struct Side {
    conn: Connection,
    host: HostQueue,
    rx: BytesMut,
    out: BytesMut,
    closed: bool,
    parked: Vec<nvmeof_target::IoRequest>,
}

impl Side {
    fn pump(&mut self, now: Instant) {
        for _ in 0..64 {
            let mut progress = false;
            while let Some(p) = self.host.poll_transmit() {
                self.rx.extend_from_slice(&p.to_vec());
                progress = true;
            }
            if !self.closed && !self.rx.is_empty() {
                self.conn.handle_input(&mut self.rx, now);
            }
            progress |= self.drain(now, false);
            if !self.out.is_empty() {
                let _ = self.host.handle_input(&mut self.out);
            }
            if !progress {
                break;
            }
        }
    }

    fn drain(&mut self, now: Instant, park: bool) -> bool {
        let mut progress = false;
        while let Some(ev) = self.conn.poll_event() {
            progress = true;
            assert!(!self.closed, "no events after Close");
            match ev {
                Event::Transmit(p) => self.out.extend_from_slice(&p.to_vec()),
                Event::Io(req) if park => self.parked.push(req),
                Event::Io(req) => {
                    let r = nvmeof_target::execute_blocking(req.namespace.backend().as_ref(), req.op);
                    self.conn.complete_io(req.token, r, now);
                }
                Event::Close(_) => self.closed = true,
                other => panic!("unknown engine event {other:?}"),
            }
        }
        progress
    }
}

fn connect(target: &Target, digests: Digests, qid: u16, cntlid: u16, now: Instant) -> Side {
    let mut s = Side {
        conn: target.accept(params(), now),
        host: HostQueue::new(HostOptions { digests, ..HostOptions::default() }),
        rx: BytesMut::new(),
        out: BytesMut::new(),
        closed: false,
        parked: Vec::new(),
    };
    s.pump(now);
    let (sqe, data) =
        host::connect_command(qid, if qid == 0 { 32 } else { 128 }, 5000, cntlid, [1; 16], NQN, HOST);
    s.host.submit(sqe, Some(data), 0);
    s.pump(now);
    if qid == 0 {
        for cc in [0x0046_0001u64] {
            s.host.submit(host::property_set(offset::CC, PropertyWidth::Four, cc), None, 0);
        }
        let mut nq = nvmeof_proto::nvme::Sqe::zeroed();
        nq.opcode = 0x09;
        nq.cdw10.set(0x07);
        nq.cdw11.set(0x0003_0003);
        s.host.submit(nq, None, 0);
        s.pump(now);
    }
    while s.host.poll_completion().is_some() {}
    s
}

fuzz_target!(|data: &[u8]| {
    let Some((&[scenario, faults, chunk], stream)) = data.split_first_chunk::<3>() else { return };
    #[allow(clippy::disallowed_methods)]
    let start = Instant::now();
    let mut config = TargetConfig::default();
    config.maxh2cdata = 4096;
    config.max_data_in_flight_per_connection = 64 * 1024;
    let target = Target::new(config);
    target
        .add_subsystem(SubsystemConfig { access: HostAccess::AllowAny, ..SubsystemConfig::new(NQN, "FUZZ") })
        .unwrap();
    let backend: Arc<dyn BlockBackend> = if scenario & 0x4 != 0 {
        Arc::new(Faulty { inner: MemoryBackend::new(1 << 20, 512), pattern: faults, n: AtomicU32::new(0) })
    } else {
        Arc::new(MemoryBackend::new(1 << 20, 512))
    };
    target.add_namespace(NQN, NamespaceConfig::derived(NQN, 1, backend)).unwrap();
    let digests = Digests { header: scenario & 0x1 != 0, data: scenario & 0x2 != 0 };
    let mut admin = connect(&target, digests, 0, CNTLID_DYNAMIC, start);
    let cntlid = admin.conn.cntlid().unwrap_or(1);
    let mut io = connect(&target, digests, 1, cntlid, start);
    let mut healthy = connect(&target, digests, 2, cntlid, start);

    let victim = if scenario & 0x8 != 0 { &mut admin } else { &mut io };
    let park = scenario & 0x10 != 0;
    let step = usize::from(chunk).max(1);
    let mut now = start;
    for piece in stream.chunks(step) {
        if victim.closed {
            break;
        }
        victim.rx.extend_from_slice(piece);
        victim.conn.handle_input(&mut victim.rx, now);
        victim.drain(now, park);
        // Complete parked I/O newest first.
        if victim.parked.len() > 3 {
            while let Some(req) = victim.parked.pop() {
                let r = nvmeof_target::execute_blocking(req.namespace.backend().as_ref(), req.op);
                victim.conn.complete_io(req.token, r, now);
            }
            victim.drain(now, park);
        }
        now += Duration::from_millis(u64::from(chunk) * 10);
        victim.conn.handle_timeout(now);
        victim.drain(now, park);
    }
    while let Some(req) = victim.parked.pop() {
        let r = nvmeof_target::execute_blocking(req.namespace.backend().as_ref(), req.op);
        victim.conn.complete_io(req.token, r, now);
    }
    victim.drain(now, false);

    // Whatever the target sent must be well-formed controller-to-host PDUs.
    let mut dec = PduDecoder::new(DecoderConfig { digests, max_data_pdu: 1 << 20, ..DecoderConfig::host() });
    let mut out = std::mem::take(&mut victim.out);
    loop {
        match dec.decode(&mut out) {
            Ok(Some(_)) => {}
            Ok(None) => break,
            Err(e) => panic!("target sent an invalid PDU: {e}"),
        }
    }
    assert!(out.is_empty(), "target sent a truncated PDU");

    // Another I/O queue of the same controller keeps working when only an I/O queue was attacked
    // (an attacked admin queue may legitimately take the controller down).
    let victim_was_io = scenario & 0x8 == 0;
    healthy.conn.handle_wakeup(now);
    healthy.drain(now, false);
    if victim_was_io {
        assert!(!healthy.closed, "an I/O queue's trouble closed another queue");
        let mut w = nvmeof_proto::nvme::Sqe::zeroed();
        w.opcode = 0x01;
        w.nsid.set(1);
        nvmeof_proto::nvme::nvm::RwCommand::new(0, 1).apply(&mut w);
        healthy.host.submit(w, Some(vec![0x5a; 512].into()), 0);
        healthy.pump(now);
        let c = healthy.host.poll_completion().expect("the healthy queue answers");
        // The write may fail only because the namespace's backend injects faults.
        assert!(c.status().is_success() || scenario & 0x4 != 0, "healthy write failed: {:?}", c.status());
    }
});
