//! Property tests: `decode(encode(x)) == x` for every PDU type and option, and split invariance of the
//! stream decoder (any split of the byte stream yields the same PDUs and the same error).

use bytes::{Bytes, BytesMut};
use nvmeof_proto::nvme::{Cqe, Sqe};
use nvmeof_proto::{
    BytesChain, C2hData, CapsuleCmd, CapsuleResp, DecodeError, DecoderConfig, Digests, Direction,
    EncodeOptions, FatalErrorStatus, H2cData, IcReq, IcResp, Payload, Pdu, PduDecoder, R2t, TermReq,
};
use proptest::prelude::*;
use zerocopy::FromBytes;

const MAX_DATA: usize = 9000;

fn payload(min: usize) -> impl Strategy<Value = Payload> {
    // Between one and three segments, so scattered payloads are covered too.
    (proptest::collection::vec(any::<u8>(), min..MAX_DATA), 0usize..3, any::<prop::sample::Index>()).prop_map(
        |(v, splits, at)| {
            let b = Bytes::from(v);
            if splits == 0 || b.len() < 2 {
                return Payload::from(b);
            }
            let cut = 1 + at.index(b.len() - 1);
            [b.slice(..cut), b.slice(cut..)].into_iter().collect()
        },
    )
}

fn digests() -> impl Strategy<Value = Digests> {
    (any::<bool>(), any::<bool>()).prop_map(|(header, data)| Digests { header, data })
}

fn sqe() -> impl Strategy<Value = Sqe> {
    proptest::array::uniform32(any::<u8>()).prop_flat_map(|a| {
        proptest::array::uniform32(any::<u8>()).prop_map(move |b| {
            let mut raw = [0u8; 64];
            raw[..32].copy_from_slice(&a);
            raw[32..].copy_from_slice(&b);
            Sqe::read_from_bytes(&raw[..]).unwrap()
        })
    })
}

fn cqe() -> impl Strategy<Value = Cqe> {
    proptest::array::uniform16(any::<u8>()).prop_map(|raw| Cqe::read_from_bytes(&raw[..]).unwrap())
}

fn term_req() -> impl Strategy<Value = TermReq> {
    (any::<u16>(), any::<u32>(), proptest::collection::vec(any::<u8>(), 0..=128))
        .prop_map(|(fes, fei, d)| TermReq { fes: FatalErrorStatus(fes), fei, data: Bytes::from(d) })
}

fn host_pdu() -> impl Strategy<Value = Pdu> {
    prop_oneof![
        (any::<u16>(), 0u8..=31, digests(), any::<u32>())
            .prop_map(|(pfv, hpda, digests, maxr2t)| Pdu::IcReq(IcReq { pfv, hpda, digests, maxr2t })),
        term_req().prop_map(Pdu::H2cTermReq),
        (sqe(), prop_oneof![Just(Payload::new()), payload(1)])
            .prop_map(|(sqe, data)| Pdu::CapsuleCmd(CapsuleCmd { sqe, data })),
        (any::<u16>(), any::<u16>(), any::<u32>(), any::<bool>(), payload(1)).prop_map(
            |(cccid, ttag, datao, last, data)| Pdu::H2cData(H2cData { cccid, ttag, datao, last, data })
        ),
    ]
}

fn controller_pdu() -> impl Strategy<Value = Pdu> {
    prop_oneof![
        (any::<u16>(), 0u8..=31, digests(), any::<u32>()).prop_map(|(pfv, cpda, digests, maxh2cdata)| {
            Pdu::IcResp(IcResp { pfv, cpda, digests, maxh2cdata })
        }),
        term_req().prop_map(Pdu::C2hTermReq),
        cqe().prop_map(|cqe| Pdu::CapsuleResp(CapsuleResp { cqe })),
        (any::<u16>(), any::<u32>(), any::<bool>(), any::<bool>(), payload(1)).prop_map(
            |(cccid, datao, last, success, data)| Pdu::C2hData(C2hData {
                cccid,
                datao,
                last: last || success,
                success,
                data
            })
        ),
        (any::<u16>(), any::<u16>(), any::<u32>(), any::<u32>())
            .prop_map(|(cccid, ttag, r2to, r2tl)| { Pdu::R2t(R2t { cccid, ttag, r2to, r2tl }) }),
    ]
}

fn config(direction: Option<Direction>, opts: EncodeOptions) -> DecoderConfig {
    DecoderConfig {
        direction,
        digests: opts.digests,
        pda: opts.pda,
        max_capsule_data: MAX_DATA as u32,
        max_data_pdu: MAX_DATA as u32,
    }
}

fn options() -> impl Strategy<Value = EncodeOptions> {
    (digests(), 0u8..=31).prop_map(|(digests, pda)| EncodeOptions { digests, pda })
}

/// Decodes a whole stream fed in the given pieces; stops at the first fatal error.
fn decode_stream(cfg: DecoderConfig, stream: &[u8], cuts: &[usize]) -> Vec<Result<Pdu, DecodeError>> {
    let mut dec = PduDecoder::new(cfg);
    let mut buf = BytesMut::new();
    let mut out = Vec::new();
    let mut bounds: Vec<usize> = cuts.iter().map(|&c| c.min(stream.len())).collect();
    bounds.sort_unstable();
    bounds.push(stream.len());
    let mut from = 0;
    for to in bounds {
        buf.extend_from_slice(&stream[from..to]);
        from = to;
        loop {
            match dec.decode(&mut buf) {
                Ok(Some(pdu)) => out.push(Ok(pdu)),
                Ok(None) => break,
                Err(e) if e.is_fatal() => {
                    out.push(Err(e));
                    return out;
                }
                Err(e) => out.push(Err(e)),
            }
        }
    }
    out
}

/// Like [`decode_stream`], with the pieces pushed into a [`BytesChain`] (no reassembly copy).
fn decode_chained(cfg: DecoderConfig, stream: &[u8], cuts: &[usize]) -> Vec<Result<Pdu, DecodeError>> {
    let mut dec = PduDecoder::new(cfg);
    let mut chain = BytesChain::new();
    let mut out = Vec::new();
    let mut bounds: Vec<usize> = cuts.iter().map(|&c| c.min(stream.len())).collect();
    bounds.sort_unstable();
    bounds.push(stream.len());
    let mut from = 0;
    for to in bounds {
        chain.push(bytes::Bytes::copy_from_slice(&stream[from..to]));
        from = to;
        loop {
            match dec.decode(&mut chain) {
                Ok(Some(pdu)) => out.push(Ok(pdu)),
                Ok(None) => break,
                Err(e) if e.is_fatal() => {
                    out.push(Err(e));
                    return out;
                }
                Err(e) => out.push(Err(e)),
            }
        }
    }
    out
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn a_chain_of_pieces_decodes_like_one_buffer(
        pdus in proptest::collection::vec(prop_oneof![host_pdu(), controller_pdu()], 1..8),
        opts in options(),
        flips in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 0..2),
        cuts in proptest::collection::vec(any::<prop::sample::Index>(), 0..24),
    ) {
        let mut stream = Vec::new();
        for p in &pdus {
            stream.extend_from_slice(&p.clone().encode(&opts).unwrap().to_vec());
        }
        for (at, x) in flips {
            let i = at.index(stream.len());
            stream[i] ^= x;
        }
        let cfg = config(None, opts);
        let cut_points: Vec<usize> = cuts.iter().map(|i| i.index(stream.len() + 1)).collect();
        prop_assert_eq!(decode_stream(cfg, &stream, &[]), decode_chained(cfg, &stream, &cut_points));
    }

    #[test]
    fn host_pdus_round_trip(pdu in host_pdu(), opts in options()) {
        let wire = pdu.clone().encode(&opts).unwrap();
        let mut buf = BytesMut::from(&wire.to_vec()[..]);
        let mut dec = PduDecoder::new(config(Some(Direction::HostToController), opts));
        prop_assert_eq!(dec.decode(&mut buf).unwrap(), Some(pdu));
        prop_assert!(buf.is_empty());
    }

    #[test]
    fn controller_pdus_round_trip(pdu in controller_pdu(), opts in options()) {
        let wire = pdu.clone().encode(&opts).unwrap();
        let mut buf = BytesMut::from(&wire.to_vec()[..]);
        let mut dec = PduDecoder::new(config(Some(Direction::ControllerToHost), opts));
        prop_assert_eq!(dec.decode(&mut buf).unwrap(), Some(pdu));
        prop_assert!(buf.is_empty());
    }

    #[test]
    fn split_stream_decodes_the_same(
        pdus in proptest::collection::vec(prop_oneof![host_pdu(), controller_pdu()], 1..8),
        opts in options(),
        garbage in proptest::collection::vec(any::<u8>(), 0..64),
        cuts in proptest::collection::vec(any::<prop::sample::Index>(), 0..24),
    ) {
        let mut stream = Vec::new();
        for p in &pdus {
            stream.extend_from_slice(&p.clone().encode(&opts).unwrap().to_vec());
        }
        stream.extend_from_slice(&garbage);
        let cfg = config(None, opts);
        let whole = decode_stream(cfg, &stream, &[]);
        let cut_points: Vec<usize> = cuts.iter().map(|i| i.index(stream.len() + 1)).collect();
        let split = decode_stream(cfg, &stream, &cut_points);
        prop_assert_eq!(&whole, &split);
        // Every encoded PDU came back, in order, before anything the garbage produced.
        let decoded: Vec<&Pdu> = whole.iter().filter_map(|r| r.as_ref().ok()).take(pdus.len()).collect();
        prop_assert_eq!(decoded, pdus.iter().collect::<Vec<_>>());
    }

    #[test]
    fn byte_at_a_time_equals_all_at_once(
        bytes in proptest::collection::vec(any::<u8>(), 0..600),
        opts in options(),
    ) {
        let cfg = config(None, opts);
        let whole = decode_stream(cfg, &bytes, &[]);
        let cuts: Vec<usize> = (0..bytes.len()).collect();
        prop_assert_eq!(whole, decode_stream(cfg, &bytes, &cuts));
    }

    #[test]
    fn corrupted_streams_never_panic_and_split_the_same(
        pdus in proptest::collection::vec(prop_oneof![host_pdu(), controller_pdu()], 1..4),
        opts in options(),
        flips in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..4),
        cuts in proptest::collection::vec(any::<prop::sample::Index>(), 0..8),
    ) {
        let mut stream = Vec::new();
        for p in &pdus {
            stream.extend_from_slice(&p.clone().encode(&opts).unwrap().to_vec());
        }
        for (at, x) in flips {
            let i = at.index(stream.len());
            stream[i] ^= x;
        }
        let cfg = config(None, opts);
        let cut_points: Vec<usize> = cuts.iter().map(|i| i.index(stream.len() + 1)).collect();
        prop_assert_eq!(decode_stream(cfg, &stream, &[]), decode_stream(cfg, &stream, &cut_points));
    }
}
