//! Decode and encode cost of the PDUs on the I/O path: CapsuleCmd, CapsuleResp and a 4 KiB C2HData,
//! each with and without digests, plus raw CRC32C throughput.
//!
//! ```sh
//! cargo bench -p xatastor-benches --bench codec
//! ```

use std::hint::black_box;

use bytes::{Bytes, BytesMut};
use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use nvmeof_proto::nvme::{Cqe, SglDescriptor, Sqe, Status};
use nvmeof_proto::{
    C2hData, CapsuleCmd, CapsuleResp, DecoderConfig, Digests, Direction, EncodeOptions, Pdu, PduDecoder,
};

fn read_cmd() -> Pdu {
    let mut sqe = Sqe::zeroed();
    sqe.opcode = 0x02;
    sqe.flags = 0x40;
    sqe.cid.set(17);
    sqe.nsid.set(1);
    sqe.dptr = SglDescriptor::transport(4096);
    sqe.cdw10.set(123_456);
    sqe.cdw12.set(7);
    Pdu::CapsuleCmd(CapsuleCmd { sqe, data: Default::default() })
}

fn resp() -> Pdu {
    Pdu::CapsuleResp(CapsuleResp { cqe: Cqe::new(17, 1, 5, Status::SUCCESS) })
}

fn c2h_4k() -> Pdu {
    let data = Bytes::from(vec![0xa5u8; 4096]);
    Pdu::C2hData(C2hData { cccid: 17, datao: 0, last: true, success: true, data: data.into() })
}

fn variants() -> [(&'static str, Digests); 2] {
    [("plain", Digests::NONE), ("digests", Digests::BOTH)]
}

fn decode(c: &mut Criterion) {
    let mut g = c.benchmark_group("decode");
    for (name, pdu, direction) in [
        ("capsule_cmd", read_cmd(), Direction::HostToController),
        ("capsule_resp", resp(), Direction::ControllerToHost),
        ("c2h_data_4k", c2h_4k(), Direction::ControllerToHost),
    ] {
        for (variant, digests) in variants() {
            let opts = EncodeOptions { digests, pda: 0 };
            let wire = pdu.clone().encode(&opts).unwrap().to_vec();
            let cfg = DecoderConfig {
                direction: Some(direction),
                digests,
                pda: 0,
                max_capsule_data: 8192,
                max_data_pdu: 128 * 1024,
            };
            g.throughput(Throughput::Elements(1));
            g.bench_function(format!("{name}/{variant}"), |b| {
                let mut dec = PduDecoder::new(cfg);
                b.iter_batched_ref(
                    || BytesMut::from(&wire[..]),
                    |buf| black_box(dec.decode(buf).unwrap()),
                    BatchSize::SmallInput,
                );
            });
        }
    }
    g.finish();
}

fn encode(c: &mut Criterion) {
    let mut g = c.benchmark_group("encode");
    for (name, pdu) in [("capsule_cmd", read_cmd()), ("capsule_resp", resp()), ("c2h_data_4k", c2h_4k())] {
        for (variant, digests) in variants() {
            let opts = EncodeOptions { digests, pda: 0 };
            g.throughput(Throughput::Elements(1));
            g.bench_function(format!("{name}/{variant}"), |b| {
                b.iter_batched(
                    || pdu.clone(),
                    |p| black_box(p.encode(&opts).unwrap()),
                    BatchSize::SmallInput,
                );
            });
        }
    }
    g.finish();
}

fn crc(c: &mut Criterion) {
    let mut g = c.benchmark_group("crc32c");
    for size in [4096usize, 128 * 1024] {
        let data = vec![0x5au8; size];
        g.throughput(Throughput::Bytes(size as u64));
        g.bench_function(format!("{size}"), |b| b.iter(|| nvmeof_proto::digest::crc32c(black_box(&data))));
    }
    g.finish();
}

criterion_group!(benches, decode, encode, crc);
criterion_main!(benches);
