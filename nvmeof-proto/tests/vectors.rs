//! Byte-exact PDU vectors, written by hand from the NVMe/TCP transport specification's field tables
//! (and checked against the layouts the Linux host driver builds in `include/linux/nvme-tcp.h`; one
//! difference: Linux's `nvme_tcp_term_pdu` leaves a hole before FEI, while the specification and SPDK
//! put FEI at byte 10, as here — the Linux host only reads FES).
//!
//! Digests in these vectors come from a bit-by-bit CRC32C written here from the polynomial, so the codec's
//! table/instruction-based CRC is checked against an independent oracle.

use bytes::{Bytes, BytesMut};
use nvmeof_proto::nvme::{Cqe, SglDescriptor, Sqe, Status};
use nvmeof_proto::{
    C2hData, CapsuleCmd, CapsuleResp, DecodeError, DecoderConfig, Digests, Direction, EncodeOptions,
    FatalErrorStatus, H2cData, HeaderField, IcReq, IcResp, Payload, Pdu, PduDecoder, R2t, TermReq,
};

/// Reflected CRC32C (Castagnoli, polynomial 0x82F63B78), one bit at a time.
fn crc32c_ref(data: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &b in data {
        crc ^= u32::from(b);
        for _ in 0..8 {
            crc = if crc & 1 != 0 { (crc >> 1) ^ 0x82f6_3b78 } else { crc >> 1 };
        }
    }
    !crc
}

fn any_direction(digests: Digests, pda: u8) -> DecoderConfig {
    DecoderConfig { direction: None, digests, pda, max_capsule_data: 1 << 20, max_data_pdu: 1 << 20 }
}

/// Encodes `pdu` and asserts the bytes; decodes `bytes` and asserts the PDU.
fn check(pdu: Pdu, opts: EncodeOptions, bytes: &[u8]) {
    let encoded = pdu.clone().encode(&opts).unwrap();
    assert_eq!(encoded.to_vec(), bytes, "encoding of {pdu:?}");
    assert_eq!(encoded.len(), bytes.len());
    let mut dec = PduDecoder::new(any_direction(opts.digests, opts.pda));
    let mut buf = BytesMut::from(bytes);
    assert_eq!(dec.decode(&mut buf).unwrap(), Some(pdu));
    assert!(buf.is_empty());
}

fn sqe_example() -> (Sqe, [u8; 64]) {
    // Read (0x02) of 8 blocks at LBA 0x10 on NSID 1, CID 0x0123, transport SGL of 4096 bytes.
    let mut raw = [0u8; 64];
    raw[0] = 0x02;
    raw[1] = 0x40;
    raw[2..4].copy_from_slice(&[0x23, 0x01]);
    raw[4..8].copy_from_slice(&[1, 0, 0, 0]);
    raw[32..36].copy_from_slice(&[0x00, 0x10, 0, 0]);
    raw[39] = 0x5a;
    raw[40] = 0x10;
    raw[48] = 0x07;
    let mut sqe = Sqe::zeroed();
    sqe.opcode = 0x02;
    sqe.flags = 0x40;
    sqe.cid.set(0x0123);
    sqe.nsid.set(1);
    sqe.dptr = SglDescriptor::transport(4096);
    sqe.cdw10.set(0x10);
    sqe.cdw12.set(7);
    (sqe, raw)
}

#[test]
fn icreq() {
    // Linux host: PFV 0, HPDA 0, digests as asked, MAXR2T 0.
    let mut v = vec![0x00, 0x00, 0x80, 0x00, 0x80, 0x00, 0x00, 0x00];
    v.extend_from_slice(&[0x00, 0x00, 0x00, 0x03, 0x00, 0x00, 0x00, 0x00]);
    v.resize(128, 0);
    let pdu = Pdu::IcReq(IcReq { pfv: 0, hpda: 0, digests: Digests::BOTH, maxr2t: 0 });
    // ICReq never carries digests, whatever the connection negotiates later.
    check(pdu, EncodeOptions { digests: Digests::BOTH, pda: 0 }, &v);
}

#[test]
fn icresp() {
    let mut v = vec![0x01, 0x00, 0x80, 0x00, 0x80, 0x00, 0x00, 0x00];
    v.extend_from_slice(&[0x00, 0x00, 0x00, 0x01, 0x00, 0x00, 0x02, 0x00]);
    v.resize(128, 0);
    let pdu = Pdu::IcResp(IcResp {
        pfv: 0,
        cpda: 0,
        digests: Digests { header: true, data: false },
        maxh2cdata: 0x2_0000,
    });
    check(pdu, EncodeOptions::default(), &v);
}

#[test]
fn term_reqs() {
    let quoted = [0x04u8, 0x00, 0x49, 0x00, 0x48, 0x00, 0x00, 0x00];
    for (ty, pdu_type) in [(0x02u8, true), (0x03u8, false)] {
        let mut v = vec![ty, 0x00, 0x18, 0x00, 0x20, 0x00, 0x00, 0x00];
        v.extend_from_slice(&[0x01, 0x00, 0x02, 0x00, 0x00, 0x00]);
        v.resize(24, 0);
        v.extend_from_slice(&quoted);
        let t = TermReq {
            fes: FatalErrorStatus::INVALID_PDU_HEADER_FIELD,
            fei: 2,
            data: Bytes::copy_from_slice(&quoted),
        };
        let pdu = if pdu_type { Pdu::H2cTermReq(t) } else { Pdu::C2hTermReq(t) };
        check(pdu, EncodeOptions { digests: Digests::BOTH, pda: 3 }, &v);
    }
}

#[test]
fn capsule_cmd_without_data() {
    let (sqe, raw) = sqe_example();
    let mut v = vec![0x04, 0x00, 0x48, 0x00, 0x48, 0x00, 0x00, 0x00];
    v.extend_from_slice(&raw);
    check(Pdu::CapsuleCmd(CapsuleCmd { sqe, data: Payload::new() }), EncodeOptions::default(), &v);
}

#[test]
fn capsule_cmd_with_in_capsule_data_and_digests() {
    let (mut sqe, mut raw) = sqe_example();
    sqe.opcode = 0x01;
    raw[0] = 0x01;
    sqe.dptr = SglDescriptor::in_capsule(0, 8);
    raw[32..40].copy_from_slice(&[8, 0, 0, 0, 0, 0, 0, 0x01]);
    let data = *b"ABCDEFGH";
    // HDGSTF|DDGSTF, HLEN 72, PDO 76 (= HLEN + HDGST, CPDA 0), PLEN 76 + 8 + 4 = 88.
    let mut v = vec![0x04, 0x03, 0x48, 0x4c, 0x58, 0x00, 0x00, 0x00];
    v.extend_from_slice(&raw);
    let hd = crc32c_ref(&v);
    v.extend_from_slice(&hd.to_le_bytes());
    v.extend_from_slice(&data);
    v.extend_from_slice(&crc32c_ref(&data).to_le_bytes());
    let pdu = Pdu::CapsuleCmd(CapsuleCmd { sqe, data: Payload::from(data.to_vec()) });
    check(pdu, EncodeOptions { digests: Digests::BOTH, pda: 0 }, &v);
}

#[test]
fn capsule_cmd_data_aligned_to_cpda() {
    let (sqe, raw) = sqe_example();
    // CPDA 7: data aligned to 32 bytes; HLEN 72 → PDO 96, 24 bytes of padding.
    let mut v = vec![0x04, 0x00, 0x48, 0x60, 0x64, 0x00, 0x00, 0x00];
    v.extend_from_slice(&raw);
    v.resize(96, 0);
    v.extend_from_slice(b"data");
    let pdu = Pdu::CapsuleCmd(CapsuleCmd { sqe, data: Payload::from(&b"data"[..]) });
    check(pdu, EncodeOptions { digests: Digests::NONE, pda: 7 }, &v);
}

#[test]
fn capsule_resp() {
    let mut cqe = Cqe::new(0x0123, 1, 5, Status::LBA_OUT_OF_RANGE.with_dnr());
    cqe.dw0.set(0xdead_beef);
    let mut v = vec![0x05, 0x00, 0x18, 0x00, 0x18, 0x00, 0x00, 0x00];
    // DW0, DW1, SQHD 5, SQID 1, CID 0x0123, status (0x4080 << 1 = 0x8100).
    v.extend_from_slice(&[0xef, 0xbe, 0xad, 0xde, 0, 0, 0, 0, 5, 0, 1, 0, 0x23, 0x01, 0x00, 0x81]);
    check(Pdu::CapsuleResp(CapsuleResp { cqe }), EncodeOptions::default(), &v);
}

#[test]
fn capsule_resp_with_header_digest() {
    let cqe = Cqe::new(9, 0, 0, Status::SUCCESS);
    let mut v = vec![0x05, 0x01, 0x18, 0x00, 0x1c, 0x00, 0x00, 0x00];
    v.extend_from_slice(&[0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 9, 0, 0, 0]);
    v.extend_from_slice(&crc32c_ref(&v).to_le_bytes());
    check(Pdu::CapsuleResp(CapsuleResp { cqe }), EncodeOptions { digests: Digests::BOTH, pda: 0 }, &v);
}

#[test]
fn h2c_data_last() {
    let mut v = vec![0x06, 0x04, 0x18, 0x18, 0x1c, 0x00, 0x00, 0x00];
    v.extend_from_slice(&[
        0x23, 0x01, 0x07, 0x00, 0x00, 0x10, 0x00, 0x00, 0x04, 0x00, 0x00, 0x00, 0, 0, 0, 0,
    ]);
    v.extend_from_slice(b"wxyz");
    let pdu = Pdu::H2cData(H2cData {
        cccid: 0x0123,
        ttag: 7,
        datao: 0x1000,
        last: true,
        data: Payload::from(&b"wxyz"[..]),
    });
    check(pdu, EncodeOptions::default(), &v);
}

#[test]
fn c2h_data_success_with_digests() {
    let data: Vec<u8> = (0..=255u8).collect();
    // LAST|SUCCESS|DDGSTF|HDGSTF, PDO 28, PLEN 28 + 256 + 4 = 288.
    let mut v = vec![0x07, 0x0f, 0x18, 0x1c, 0x20, 0x01, 0x00, 0x00];
    v.extend_from_slice(&[
        0x05, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x01, 0x00, 0x00, 0, 0, 0, 0,
    ]);
    v.extend_from_slice(&crc32c_ref(&v).to_le_bytes());
    v.extend_from_slice(&data);
    v.extend_from_slice(&crc32c_ref(&data).to_le_bytes());
    let pdu =
        Pdu::C2hData(C2hData { cccid: 5, datao: 0, last: true, success: true, data: Payload::from(data) });
    check(pdu, EncodeOptions { digests: Digests::BOTH, pda: 0 }, &v);
}

#[test]
fn c2h_data_aligned_to_hpda() {
    // HPDA 7 asks for 32-byte alignment: PDO 32, 8 bytes of padding after the 24-byte header.
    let mut v = vec![0x07, 0x00, 0x18, 0x20, 0x22, 0x00, 0x00, 0x00];
    v.extend_from_slice(&[
        0x05, 0x00, 0x00, 0x00, 0x00, 0x02, 0x00, 0x00, 0x02, 0x00, 0x00, 0x00, 0, 0, 0, 0,
    ]);
    v.extend_from_slice(&[0; 8]);
    v.extend_from_slice(b"hi");
    let pdu = Pdu::C2hData(C2hData {
        cccid: 5,
        datao: 0x200,
        last: false,
        success: false,
        data: Payload::from(&b"hi"[..]),
    });
    check(pdu, EncodeOptions { digests: Digests::NONE, pda: 7 }, &v);
}

#[test]
fn r2t() {
    let mut v = vec![0x09, 0x00, 0x18, 0x00, 0x18, 0x00, 0x00, 0x00];
    v.extend_from_slice(&[
        0x23, 0x01, 0x02, 0x00, 0x00, 0x00, 0x01, 0x00, 0x00, 0x00, 0x02, 0x00, 0, 0, 0, 0,
    ]);
    let pdu = Pdu::R2t(R2t { cccid: 0x0123, ttag: 2, r2to: 0x1_0000, r2tl: 0x2_0000 });
    check(pdu, EncodeOptions::default(), &v);
}

#[test]
fn scattered_payload_is_sent_as_is_and_digested_in_place() {
    let segments =
        [Bytes::from_static(b"hello, "), Bytes::from_static(b"scattered "), Bytes::from_static(b"world")];
    let payload: Payload = segments.iter().cloned().collect();
    let pdu = Pdu::C2hData(C2hData { cccid: 1, datao: 0, last: true, success: false, data: payload });
    let enc = pdu.encode(&EncodeOptions { digests: Digests::BOTH, pda: 0 }).unwrap();
    // The payload segments are the very same memory (no gathering copy).
    for (sent, original) in enc.data().segments().iter().zip(&segments) {
        assert_eq!(sent.as_ptr(), original.as_ptr());
    }
    assert_eq!(enc.data_digest(), Some(crc32c_ref(b"hello, scattered world").to_le_bytes()));
    let mut slices = Vec::new();
    enc.io_slices(&mut slices);
    assert_eq!(slices.len(), 5, "header, three segments, digest");
}

#[test]
fn decoded_data_is_a_slice_of_the_receive_buffer() {
    let pdu = Pdu::H2cData(H2cData {
        cccid: 1,
        ttag: 1,
        datao: 0,
        last: true,
        data: Payload::from(vec![7u8; 4096]),
    });
    let wire = pdu.encode(&EncodeOptions::default()).unwrap().to_vec();
    let mut buf = BytesMut::from(&wire[..]);
    let base = buf.as_ptr() as usize;
    let mut dec = PduDecoder::new(DecoderConfig::controller());
    let Some(Pdu::H2cData(d)) = dec.decode(&mut buf).unwrap() else { panic!("expected H2CData") };
    assert_eq!(d.data.segments().len(), 1);
    assert_eq!(d.data.segments()[0].as_ptr() as usize, base + 24, "data points into the buffer");
}

// ---- invalid input: each rule of the common header, with the offset a termination request reports ----

fn controller() -> PduDecoder {
    PduDecoder::new(DecoderConfig::controller())
}

fn decode_err(dec: &mut PduDecoder, bytes: &[u8]) -> DecodeError {
    let mut buf = BytesMut::from(bytes);
    let err = dec.decode(&mut buf).unwrap_err();
    if err.is_fatal() {
        assert_eq!(&buf[..], bytes, "a fatal error leaves the offending PDU in the buffer");
    }
    err
}

fn capsule_bytes(flags: u8, hlen: u8, pdo: u8, plen: u32) -> Vec<u8> {
    let mut v = vec![0x04, flags, hlen, pdo];
    v.extend_from_slice(&plen.to_le_bytes());
    v.resize((plen as usize).clamp(usize::from(hlen).max(8), 4096), 0);
    v
}

#[test]
fn invalid_pdu_type() {
    let mut dec = controller();
    let err = decode_err(&mut dec, &[0x08, 0, 24, 0, 24, 0, 0, 0]);
    assert_eq!(err, DecodeError::InvalidHeaderField(HeaderField::PduType));
    assert_eq!(err.fatal_status(), Some(FatalErrorStatus::INVALID_PDU_HEADER_FIELD));
    assert_eq!(err.fei(), 0);
    // A controller must not receive controller-to-host PDUs.
    let resp =
        Pdu::CapsuleResp(CapsuleResp { cqe: Cqe::default() }).encode(&EncodeOptions::default()).unwrap();
    assert_eq!(decode_err(&mut dec, &resp.to_vec()), DecodeError::InvalidHeaderField(HeaderField::PduType));
    // ... and a host none of the host-to-controller ones.
    let mut host = PduDecoder::new(DecoderConfig::host());
    let cmd = capsule_bytes(0, 72, 0, 72);
    assert_eq!(decode_err(&mut host, &cmd), DecodeError::InvalidHeaderField(HeaderField::PduType));
}

#[test]
fn invalid_flags() {
    let mut dec = controller();
    // LAST_PDU is not a CapsuleCmd flag.
    let err = decode_err(&mut dec, &capsule_bytes(0x04, 72, 0, 72));
    assert_eq!(err, DecodeError::InvalidHeaderField(HeaderField::Flags));
    assert_eq!(err.fei(), 1);
    // HDGSTF without a negotiated header digest.
    assert_eq!(
        decode_err(&mut dec, &capsule_bytes(0x01, 72, 0, 76)),
        DecodeError::InvalidHeaderField(HeaderField::Flags)
    );
    // DDGSTF on a capsule without data.
    assert_eq!(
        decode_err(&mut dec, &capsule_bytes(0x02, 72, 0, 72)),
        DecodeError::InvalidHeaderField(HeaderField::Flags)
    );
    // Header digest negotiated, digest present and right, but HDGSTF clear.
    let mut with_digest = PduDecoder::new(DecoderConfig {
        digests: Digests { header: true, data: false },
        ..DecoderConfig::controller()
    });
    let mut v = capsule_bytes(0x00, 72, 0, 76);
    let crc = crc32c_ref(&v[..72]);
    v[72..76].copy_from_slice(&crc.to_le_bytes());
    assert_eq!(decode_err(&mut with_digest, &v), DecodeError::InvalidHeaderField(HeaderField::Flags));
    // ICReq has no flags at all.
    let mut icreq = vec![0x00, 0x01, 128, 0, 128, 0, 0, 0];
    icreq.resize(128, 0);
    assert_eq!(decode_err(&mut dec, &icreq), DecodeError::InvalidHeaderField(HeaderField::Flags));
    // C2HData: SUCCESS requires LAST_PDU.
    let mut host = PduDecoder::new(DecoderConfig::host());
    let mut c2h = vec![0x07, 0x08, 24, 24, 28, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 4, 0, 0, 0, 0, 0, 0, 0];
    c2h.extend_from_slice(b"data");
    assert_eq!(decode_err(&mut host, &c2h), DecodeError::InvalidHeaderField(HeaderField::Flags));
    c2h[1] = 0x0c;
    assert!(matches!(host.decode(&mut BytesMut::from(&c2h[..])), Ok(Some(Pdu::C2hData(_)))));
}

#[test]
fn invalid_header_length() {
    let err = decode_err(&mut controller(), &capsule_bytes(0, 64, 0, 72));
    assert_eq!(err, DecodeError::InvalidHeaderField(HeaderField::HeaderLength));
    assert_eq!(err.fei(), 2);
}

#[test]
fn invalid_data_offset() {
    // In-capsule data cannot start inside the header, nor off the CPDA alignment (CPDA 0: 4 bytes).
    for pdo in [70u8, 74] {
        let err = decode_err(&mut controller(), &capsule_bytes(0, 72, pdo, 90));
        assert_eq!(err, DecodeError::InvalidHeaderField(HeaderField::DataOffset), "pdo {pdo}");
        assert_eq!(err.fei(), 3);
    }
    // Data present but PDO 0.
    assert_eq!(
        decode_err(&mut controller(), &capsule_bytes(0, 72, 0, 73)),
        DecodeError::InvalidHeaderField(HeaderField::DataOffset)
    );
    // A data-less capsule may say PDO 0 or PDO = end of header, nothing else.
    assert_eq!(
        decode_err(&mut controller(), &capsule_bytes(0, 72, 76, 72)),
        DecodeError::InvalidHeaderField(HeaderField::DataOffset)
    );
    let mut dec = controller();
    assert!(matches!(dec.decode(&mut BytesMut::from(&capsule_bytes(0, 72, 72, 72)[..])), Ok(Some(_))));
    // Data PDUs must carry data.
    let h2c = [0x06, 0x04, 24, 0, 24, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0];
    assert_eq!(decode_err(&mut controller(), &h2c), DecodeError::InvalidHeaderField(HeaderField::DataOffset));
}

#[test]
fn data_may_start_later_than_the_minimum_if_aligned() {
    // SPDK pads to max(HLEN + HDGST, alignment) rather than rounding up; accept any aligned PDO.
    let (sqe, raw) = sqe_example();
    let mut v = vec![0x04, 0x00, 0x48, 0x80, 0x84, 0x00, 0x00, 0x00];
    v.extend_from_slice(&raw);
    v.resize(128, 0);
    v.extend_from_slice(b"late");
    let mut dec = PduDecoder::new(DecoderConfig { pda: 7, ..DecoderConfig::controller() });
    let pdu = dec.decode(&mut BytesMut::from(&v[..])).unwrap();
    assert_eq!(pdu, Some(Pdu::CapsuleCmd(CapsuleCmd { sqe, data: Payload::from(&b"late"[..]) })));
}

#[test]
fn invalid_pdu_length() {
    let mut dec = controller();
    for plen in [0u32, 71] {
        let err = decode_err(&mut dec, &capsule_bytes(0, 72, 0, plen));
        assert_eq!(err, DecodeError::InvalidHeaderField(HeaderField::PduLength), "plen {plen}");
        assert_eq!(err.fei(), 4);
    }
    // PDO beyond PLEN: no room for data.
    assert_eq!(
        decode_err(&mut dec, &capsule_bytes(0, 72, 76, 74)),
        DecodeError::InvalidHeaderField(HeaderField::PduLength)
    );
    // ICReq is exactly 128 bytes.
    let mut icreq = vec![0x00, 0x00, 128, 0, 129, 0, 0, 0];
    icreq.resize(129, 0);
    assert_eq!(decode_err(&mut dec, &icreq), DecodeError::InvalidHeaderField(HeaderField::PduLength));
}

#[test]
fn malformed_term_req_is_not_answered_with_one() {
    let mut dec = controller();
    // A TermReq quotes at most 128 bytes: PLEN 153 is malformed.
    let mut term = vec![0x02, 0x00, 24, 0, 153, 0, 0, 0];
    term.resize(153, 0);
    let err = decode_err(&mut dec, &term);
    assert_eq!(err, DecodeError::MalformedTermReq(HeaderField::PduLength));
    assert!(err.is_fatal());
    assert_eq!(err.fatal_status(), None);
    assert_eq!(TermReq::for_error(&err, &term), None);
    // A wrong HLEN or a flag, likewise.
    let mut term = vec![0x02, 0x00, 25, 0, 25, 0, 0, 0];
    term.resize(25, 0);
    assert_eq!(decode_err(&mut dec, &term), DecodeError::MalformedTermReq(HeaderField::HeaderLength));
    let mut term = vec![0x02, 0x01, 24, 0, 24, 0, 0, 0];
    term.resize(24, 0);
    assert_eq!(decode_err(&mut dec, &term), DecodeError::MalformedTermReq(HeaderField::Flags));
}

#[test]
fn data_length_must_match_plen() {
    let mut v = vec![0x06, 0x04, 24, 24, 28, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 5, 0, 0, 0, 0, 0, 0, 0];
    v.extend_from_slice(b"data");
    let err = decode_err(&mut controller(), &v);
    assert_eq!(err, DecodeError::InvalidHeaderField(HeaderField::DataLength));
    assert_eq!(err.fei(), 16);
}

#[test]
fn oversized_pdu_is_refused_from_its_header() {
    let mut dec = controller();
    // An H2CData announcing 1 GiB: refused once its 24-byte header is there, before any data.
    let mut h2c = vec![0x06u8, 0x04, 24, 24, 0x18, 0x00, 0x00, 0x40];
    h2c.resize(24, 0);
    let mut buf = BytesMut::from(&h2c[..8]);
    assert_eq!(dec.decode(&mut buf).unwrap(), None);
    assert_eq!(dec.needed(), 16, "the decoder asks for the header, not for the announced gigabyte");
    buf.extend_from_slice(&h2c[8..]);
    let err = dec.decode(&mut buf).unwrap_err();
    assert_eq!(err, DecodeError::DataLimitExceeded { len: 0x4000_0000, max: 128 * 1024 });
    assert_eq!(err.fatal_status(), Some(FatalErrorStatus::DATA_TRANSFER_LIMIT_EXCEEDED));
    // In-capsule data beyond the capsule limit, likewise.
    let mut buf = BytesMut::from(&capsule_bytes(0, 72, 72, 72 + 8193)[..72]);
    assert_eq!(dec.decode(&mut buf).unwrap_err(), DecodeError::DataLimitExceeded { len: 8193, max: 8192 });
    // PLEN far beyond a TermReq's 152 bytes.
    let mut term = vec![0x02u8, 0, 24, 0, 0xff, 0xff, 0xff, 0xff];
    term.resize(24, 0);
    assert_eq!(
        dec.decode(&mut BytesMut::from(&term[..])).unwrap_err(),
        DecodeError::MalformedTermReq(HeaderField::PduLength)
    );
}

#[test]
fn corrupted_length_is_a_header_digest_error_not_a_hang() {
    // With header digests, a PLEN corrupted upwards must not make the decoder wait for bytes that
    // never come: the digest is checked first.
    let opts = EncodeOptions { digests: Digests::BOTH, pda: 0 };
    let mut wire = Pdu::CapsuleResp(CapsuleResp { cqe: Cqe::default() }).encode(&opts).unwrap().to_vec();
    wire[5] = 0x01; // PLEN 28 -> 284
    let mut host = PduDecoder::new(DecoderConfig { digests: Digests::BOTH, ..DecoderConfig::host() });
    assert!(matches!(decode_err(&mut host, &wire), DecodeError::HeaderDigest { .. }));
}

#[test]
fn header_digest_error_is_fatal_and_leaves_the_buffer() {
    let opts = EncodeOptions { digests: Digests::BOTH, pda: 0 };
    let mut wire = Pdu::R2t(R2t { cccid: 1, ttag: 2, r2to: 0, r2tl: 4096 }).encode(&opts).unwrap().to_vec();
    wire[12] ^= 0x80; // flip a bit of R2TO
    let mut host = PduDecoder::new(DecoderConfig { digests: Digests::BOTH, ..DecoderConfig::host() });
    let err = decode_err(&mut host, &wire);
    assert!(matches!(err, DecodeError::HeaderDigest { .. }));
    assert_eq!(err.fatal_status(), Some(FatalErrorStatus::HEADER_DIGEST_ERROR));
    // The termination request quotes the header (HLEN bytes), not the digest or what follows.
    wire.extend_from_slice(&[0xee; 64]);
    let term = TermReq::for_error(&err, &wire).unwrap();
    assert_eq!(term.fes, FatalErrorStatus::HEADER_DIGEST_ERROR);
    assert_eq!(&term.data[..], &wire[..24]);
    // An unknown type quotes its received HLEN, at least the common header, at most 128 bytes, and
    // never more than was received.
    let err = DecodeError::InvalidHeaderField(HeaderField::PduType);
    assert_eq!(TermReq::for_error(&err, &[0x0f, 0, 0, 0, 0, 0, 0, 0, 1, 2]).unwrap().data.len(), 8);
    assert_eq!(TermReq::for_error(&err, &[0x0f, 0, 200, 0]).unwrap().data.len(), 4);
    let long = [0x0f, 0, 255, 0, 0, 0, 0, 0, 1, 2].repeat(30);
    assert_eq!(TermReq::for_error(&err, &long).unwrap().data.len(), 128);
}

#[test]
fn data_digest_error_consumes_the_pdu_and_keeps_the_stream_in_sync() {
    let opts = EncodeOptions { digests: Digests::BOTH, pda: 0 };
    let bad = Pdu::H2cData(H2cData {
        cccid: 0x42,
        ttag: 3,
        datao: 0,
        last: true,
        data: Payload::from(vec![1u8; 512]),
    });
    let mut wire = bad.encode(&opts).unwrap().to_vec();
    let last = wire.len() - 10;
    wire[last] ^= 1; // corrupt one data byte
    let good = Pdu::CapsuleCmd(CapsuleCmd { sqe: Sqe::zeroed(), data: Payload::new() });
    wire.extend_from_slice(&good.clone().encode(&opts).unwrap().to_vec());
    let mut dec = PduDecoder::new(DecoderConfig { digests: Digests::BOTH, ..DecoderConfig::controller() });
    let mut buf = BytesMut::from(&wire[..]);
    let err = dec.decode(&mut buf).unwrap_err();
    assert!(matches!(
        err,
        DecodeError::DataDigest {
            pdu_type: nvmeof_proto::PduType::H2cData,
            cccid: 0x42,
            ttag: 3,
            datao: 0,
            datal: 512,
            last: true,
            success: false,
            ..
        }
    ));
    assert!(!err.is_fatal());
    assert_eq!(TermReq::for_error(&err, &wire), None);
    assert_eq!(dec.decode(&mut buf).unwrap(), Some(good));
    assert!(buf.is_empty());
}

#[test]
fn data_digest_error_on_c2h_success_says_so() {
    // No CapsuleResp follows a C2HData with SUCCESS: the host must learn from the error to end the
    // command.
    let opts = EncodeOptions { digests: Digests::BOTH, pda: 0 };
    let pdu = Pdu::C2hData(C2hData {
        cccid: 9,
        datao: 4096,
        last: true,
        success: true,
        data: vec![3u8; 64].into(),
    });
    let mut wire = pdu.encode(&opts).unwrap().to_vec();
    wire[40] ^= 0xff;
    let mut host = PduDecoder::new(DecoderConfig { digests: Digests::BOTH, ..DecoderConfig::host() });
    let err = host.decode(&mut BytesMut::from(&wire[..])).unwrap_err();
    assert!(matches!(
        err,
        DecodeError::DataDigest { cccid: 9, datao: 4096, datal: 64, last: true, success: true, .. }
    ));
}

#[test]
fn zero_padded_data_digest_is_accepted_for_unaligned_lengths() {
    // SPDK digests data padded with zeros to a multiple of four bytes; Linux digests the data alone.
    let mut dec = PduDecoder::new(DecoderConfig {
        digests: Digests { header: false, data: true },
        ..DecoderConfig::controller()
    });
    for digest_input in [&b"12345"[..], &b"12345\0\0\0"[..]] {
        let mut v = vec![0x06, 0x06, 24, 24, 33, 0, 0, 0, 1, 0, 2, 0, 0, 0, 0, 0, 5, 0, 0, 0, 0, 0, 0, 0];
        v.extend_from_slice(b"12345");
        v.extend_from_slice(&crc32c_ref(digest_input).to_le_bytes());
        let pdu = dec.decode(&mut BytesMut::from(&v[..])).unwrap().unwrap();
        assert_eq!(pdu.data_len(), 5);
    }
    // Anything else is still a digest error.
    let mut v = vec![0x06, 0x06, 24, 24, 33, 0, 0, 0, 1, 0, 2, 0, 0, 0, 0, 0, 5, 0, 0, 0, 0, 0, 0, 0];
    v.extend_from_slice(b"12345");
    v.extend_from_slice(&crc32c_ref(b"12346").to_le_bytes());
    assert!(matches!(dec.decode(&mut BytesMut::from(&v[..])), Err(DecodeError::DataDigest { .. })));
}

#[test]
fn encoder_refuses_pdus_no_receiver_accepts() {
    use nvmeof_proto::EncodeError;
    let empty = Pdu::H2cData(H2cData { cccid: 1, ttag: 1, datao: 0, last: true, data: Payload::new() });
    assert_eq!(empty.encode(&EncodeOptions::default()), Err(EncodeError::EmptyData));
    let unfinished =
        Pdu::C2hData(C2hData { cccid: 1, datao: 0, last: false, success: true, data: vec![1].into() });
    assert_eq!(unfinished.encode(&EncodeOptions::default()), Err(EncodeError::SuccessWithoutLast));
    // A PDA beyond 31 counts as 31: data at 128, which still fits PDO.
    let big_pda =
        Pdu::C2hData(C2hData { cccid: 1, datao: 0, last: true, success: false, data: vec![1].into() });
    let enc = big_pda.encode(&EncodeOptions { digests: Digests::NONE, pda: 200 }).unwrap();
    assert_eq!(enc.header().len(), 128);
    assert_eq!(enc.header()[3], 128);
}

#[test]
fn icreq_parameters_are_validated() {
    let ok = IcReq { pfv: 0, hpda: 31, digests: Digests::NONE, maxr2t: 0 };
    assert_eq!(ok.validate(), Ok(()));
    let err = IcReq { pfv: 1, ..ok }.validate().unwrap_err();
    assert_eq!(err.fatal_status(), Some(FatalErrorStatus::UNSUPPORTED_PARAMETER));
    assert_eq!(err.fei(), 8);
    let err = IcReq { hpda: 32, ..ok }.validate().unwrap_err();
    assert_eq!(err, DecodeError::InvalidHeaderField(HeaderField::DataAlignment));
    assert_eq!(err.fei(), 10);
    let resp = IcResp { pfv: 0, cpda: 0, digests: Digests::NONE, maxh2cdata: 4096 };
    assert_eq!(resp.validate(), Ok(()));
    assert_eq!(IcResp { maxh2cdata: 4095, ..resp }.validate().unwrap_err().fei(), 12);
    assert_eq!(IcResp { maxh2cdata: 4098, ..resp }.validate().unwrap_err().fei(), 12);
}

#[test]
fn incomplete_input_says_how_much_is_missing() {
    let wire = Pdu::R2t(R2t { cccid: 1, ttag: 2, r2to: 0, r2tl: 4096 })
        .encode(&EncodeOptions::default())
        .unwrap()
        .to_vec();
    let mut dec = PduDecoder::new(DecoderConfig::host());
    let mut buf = BytesMut::new();
    assert_eq!(dec.decode(&mut buf).unwrap(), None);
    assert_eq!(dec.needed(), 8);
    buf.extend_from_slice(&wire[..3]);
    assert_eq!(dec.decode(&mut buf).unwrap(), None);
    assert_eq!(dec.needed(), 5);
    buf.extend_from_slice(&wire[3..10]);
    assert_eq!(dec.decode(&mut buf).unwrap(), None);
    assert_eq!(dec.needed(), 14);
    assert_eq!(buf.len(), 10, "nothing is consumed until the PDU is complete");
    buf.extend_from_slice(&wire[10..]);
    assert!(matches!(dec.decode(&mut buf).unwrap(), Some(Pdu::R2t(_))));
}

#[test]
fn decoder_config_describes_the_largest_pdu() {
    let cfg = DecoderConfig { direction: Some(Direction::HostToController), ..DecoderConfig::controller() };
    assert!(cfg.max_pdu_len() >= 128 * 1024 + 128 + 4);
    assert!(cfg.max_pdu_len() <= 128 * 1024 + 256 + 4);
}
