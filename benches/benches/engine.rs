//! Target-side CPU cost of one I/O command through the sans-I/O engine, memory backend, no sockets:
//! decode the capsule, run the command, execute the backend I/O, encode the response.
//!
//! ```sh
//! cargo bench -p xatastor-benches --bench engine
//! ```

use std::hint::black_box;
use std::sync::Arc;
use std::time::Instant;

use bytes::BytesMut;
use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use nvmeof_proto::nvme::fabrics::CNTLID_DYNAMIC;
use nvmeof_proto::nvme::nvm::RwCommand;
use nvmeof_proto::nvme::registers::{offset, PropertyWidth};
use nvmeof_proto::nvme::{SglDescriptor, Sqe};
use nvmeof_proto::{CapsuleCmd, EncodeOptions, Payload, Pdu};
use nvmeof_target::host::{self, HostOptions, HostQueue};
use nvmeof_target::{
    execute_blocking, Connection, Event, HostAccess, MemoryBackend, NamespaceConfig, SubsystemConfig, Target,
    TargetConfig, TransportParams,
};

const NQN: &str = "nqn.2026-01.io.xatastor:bench";

fn pump(conn: &mut Connection, host: &mut HostQueue, now: Instant) {
    let mut to_target = BytesMut::new();
    let mut to_host = BytesMut::new();
    for _ in 0..16 {
        while let Some(p) = host.poll_transmit() {
            to_target.extend_from_slice(&p.to_vec());
        }
        conn.handle_input(&mut to_target, now);
        while let Some(ev) = conn.poll_event() {
            match ev {
                Event::Transmit(p) => to_host.extend_from_slice(&p.to_vec()),
                Event::Io(r) => {
                    let res = execute_blocking(r.namespace.backend().as_ref(), r.op);
                    conn.complete_io(r.token, res, now);
                }
                Event::Close(r) => panic!("closed: {r:?}"),
                other => panic!("unexpected event: {other:?}"),
            }
        }
        host.handle_input(&mut to_host).unwrap();
    }
    while host.poll_completion().is_some() {}
}

/// An I/O queue connection, connected and ready.
#[allow(clippy::disallowed_methods)]
fn io_queue() -> (Target, Connection, Connection, Instant) {
    let now = Instant::now();
    let target = Target::new(TargetConfig::default());
    target
        .add_subsystem(SubsystemConfig { access: HostAccess::AllowAny, ..SubsystemConfig::new(NQN, "B1") })
        .unwrap();
    let backend = Arc::new(MemoryBackend::new(1 << 30, 512));
    target.add_namespace(NQN, NamespaceConfig::derived(NQN, 1, backend)).unwrap();
    let addr = "127.0.0.1:4420".parse().unwrap();
    let params = TransportParams { local_addr: addr, peer_addr: addr, port_id: 1 };
    let mut admin = target.accept(params, now);
    let mut h = HostQueue::new(HostOptions::default());
    pump(&mut admin, &mut h, now);
    let (sqe, data) = host::connect_command(0, 32, 0, CNTLID_DYNAMIC, [1; 16], NQN, "nqn.bench:host");
    h.submit(sqe, Some(data), 0);
    h.submit(host::property_set(offset::CC, PropertyWidth::Four, 0x0046_0001), None, 0);
    let mut nq = Sqe::zeroed();
    nq.opcode = 0x09;
    nq.cdw10.set(0x07);
    h.submit(nq, None, 0);
    pump(&mut admin, &mut h, now);
    let cntlid = admin.cntlid().unwrap();
    let mut io = target.accept(params, now);
    let mut h = HostQueue::new(HostOptions::default());
    pump(&mut io, &mut h, now);
    let (sqe, data) = host::connect_command(1, 128, 0, cntlid, [1; 16], NQN, "nqn.bench:host");
    h.submit(sqe, Some(data), 0);
    pump(&mut io, &mut h, now);
    assert_eq!(io.qid(), Some(1));
    (target, admin, io, now)
}

fn capsule(opcode: u8, slba: u64, data: Option<Vec<u8>>) -> Vec<u8> {
    let mut sqe = Sqe::zeroed();
    sqe.opcode = opcode;
    sqe.flags = 0x40;
    sqe.cid.set(9);
    sqe.nsid.set(1);
    RwCommand::new(slba, 8).apply(&mut sqe);
    let payload = match data {
        Some(d) => {
            sqe.dptr = SglDescriptor::in_capsule(0, d.len() as u32);
            Payload::from(d)
        }
        None => {
            sqe.dptr = SglDescriptor::transport(4096);
            Payload::new()
        }
    };
    Pdu::CapsuleCmd(CapsuleCmd { sqe, data: payload }).encode(&EncodeOptions::default()).unwrap().to_vec()
}

fn run_one(io: &mut Connection, buf: &mut BytesMut, now: Instant) -> usize {
    io.handle_input(buf, now);
    let mut sent = 0;
    while let Some(ev) = io.poll_event() {
        match ev {
            Event::Transmit(p) => sent += p.len(),
            Event::Io(r) => {
                let res = execute_blocking(r.namespace.backend().as_ref(), r.op);
                io.complete_io(r.token, res, now);
            }
            Event::Close(r) => panic!("closed: {r:?}"),
            other => panic!("unexpected event: {other:?}"),
        }
    }
    sent
}

fn engine(c: &mut Criterion) {
    let mut g = c.benchmark_group("engine");
    g.throughput(Throughput::Elements(1));
    for (name, bytes) in [
        ("read_4k", capsule(0x02, 64, None)),
        ("write_4k_in_capsule", capsule(0x01, 64, Some(vec![7; 4096]))),
    ] {
        let (_target, _admin, mut io, now) = io_queue();
        g.bench_function(name, |b| {
            b.iter_batched_ref(
                || BytesMut::from(&bytes[..]),
                |buf| black_box(run_one(&mut io, buf, now)),
                BatchSize::SmallInput,
            );
        });
    }
    g.finish();
}

criterion_group!(benches, engine);
criterion_main!(benches);
