//! Decodes arbitrary bytes as a PDU stream. Must never panic; every PDU that decodes must survive
//! `decode(encode(pdu)) == pdu`, and every fatal error must turn into a termination request.
#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use nvmeof_proto::{DecodeError, PduDecoder, TermReq};

mod common;

fuzz_target!(|data: &[u8]| {
    let Some((cfg, opts, stream)) = common::config(data) else { return };
    let mut dec = PduDecoder::new(cfg);
    let mut buf = BytesMut::from(stream);
    loop {
        match dec.decode(&mut buf) {
            Ok(Some(pdu)) => {
                let wire = pdu.clone().encode(&opts).expect("a decoded PDU re-encodes");
                let mut again = BytesMut::from(&wire.to_vec()[..]);
                let mut dec2 = PduDecoder::new(cfg);
                assert_eq!(dec2.decode(&mut again).expect("re-encoded PDU decodes"), Some(pdu));
                assert!(again.is_empty());
            }
            Ok(None) => {
                assert!(dec.needed() > 0);
                assert!(buf.len() + dec.needed() <= cfg.max_pdu_len());
                break;
            }
            Err(e) if e.is_fatal() => {
                // Every fatal error but a malformed termination request is answered with one.
                match TermReq::for_error(&e, &buf) {
                    Some(term) => assert!(term.data.len() >= 8.min(buf.len()) && term.data.len() <= 128),
                    None => assert!(matches!(e, DecodeError::MalformedTermReq(_))),
                }
                break;
            }
            Err(_) => {}
        }
    }
});
