//! Writes the seed corpus of the fuzz targets: valid PDU streams of every type, with and without
//! digests and padding, prefixed by the two configuration bytes the targets read.
//!
//! ```sh
//! cargo run -p nvmeof-proto --example fuzz_seeds -- fuzz/seeds
//! ```

use std::path::PathBuf;

use bytes::Bytes;
use nvmeof_proto::nvme::{Cqe, SglDescriptor, Sqe, Status};
use nvmeof_proto::{
    C2hData, CapsuleCmd, CapsuleResp, Digests, EncodeOptions, FatalErrorStatus, H2cData, IcReq, IcResp, Pdu,
    R2t, TermReq,
};

fn main() -> std::io::Result<()> {
    let root = PathBuf::from(std::env::args().nth(1).unwrap_or_else(|| "fuzz/seeds".into()));
    let mut write_cmd = Sqe::zeroed();
    write_cmd.opcode = 0x01;
    write_cmd.flags = 0x40;
    write_cmd.cid.set(1);
    write_cmd.nsid.set(1);
    write_cmd.dptr = SglDescriptor::in_capsule(0, 512);
    let mut read_cmd = write_cmd;
    read_cmd.opcode = 0x02;
    read_cmd.cid.set(2);
    read_cmd.dptr = SglDescriptor::transport(4096);

    let host: Vec<Pdu> = vec![
        Pdu::IcReq(IcReq { pfv: 0, hpda: 0, digests: Digests::BOTH, maxr2t: 0 }),
        Pdu::CapsuleCmd(CapsuleCmd { sqe: write_cmd, data: vec![0xa5; 512].into() }),
        Pdu::CapsuleCmd(CapsuleCmd { sqe: read_cmd, data: Default::default() }),
        Pdu::H2cData(H2cData { cccid: 3, ttag: 1, datao: 0, last: true, data: vec![0x5a; 4096].into() }),
        Pdu::H2cTermReq(TermReq {
            fes: FatalErrorStatus::PDU_SEQUENCE_ERROR,
            fei: 0,
            data: Bytes::from_static(&[6, 4, 24, 24]),
        }),
    ];
    let controller: Vec<Pdu> = vec![
        Pdu::IcResp(IcResp { pfv: 0, cpda: 0, digests: Digests::BOTH, maxh2cdata: 131072 }),
        Pdu::CapsuleResp(CapsuleResp { cqe: Cqe::new(1, 1, 1, Status::SUCCESS) }),
        Pdu::R2t(R2t { cccid: 3, ttag: 1, r2to: 0, r2tl: 4096 }),
        Pdu::C2hData(C2hData {
            cccid: 2,
            datao: 0,
            last: true,
            success: true,
            data: vec![0x3c; 4096].into(),
        }),
        Pdu::C2hTermReq(TermReq {
            fes: FatalErrorStatus::HEADER_DIGEST_ERROR,
            fei: 0,
            data: Bytes::from_static(&[4, 1, 72, 76]),
        }),
    ];

    for target in ["pdu_decode", "pdu_split"] {
        let dir = root.join(target);
        std::fs::create_dir_all(&dir)?;
        for (dir_bits, pdus) in [(1u8, &host), (2u8, &controller)] {
            for digests in [Digests::NONE, Digests::BOTH, Digests { header: true, data: false }] {
                for pda in [0u8, 7] {
                    let opts = EncodeOptions { digests, pda };
                    let mode = dir_bits | (u8::from(digests.header) << 2) | (u8::from(digests.data) << 3);
                    let mut stream = vec![mode, pda];
                    if target == "pdu_split" {
                        // Cut points: every 7th byte for the first 28 steps.
                        stream.push(16);
                        stream.extend_from_slice(&[7; 4]);
                    }
                    for (i, pdu) in pdus.iter().enumerate() {
                        let one = pdu.clone().encode(&opts).map_err(std::io::Error::other)?.to_vec();
                        let mut single = stream.clone();
                        single.extend_from_slice(&one);
                        let name = format!("{mode:02x}-{pda:02}-{i}");
                        std::fs::write(dir.join(name), &single)?;
                        stream.extend_from_slice(&one);
                    }
                    std::fs::write(dir.join(format!("{mode:02x}-{pda:02}-all")), &stream)?;
                }
            }
        }
    }
    println!("wrote seeds under {}", root.display());
    Ok(())
}
