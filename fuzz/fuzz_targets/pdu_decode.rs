//! Decodes arbitrary bytes as a PDU stream. Must never panic; every PDU that decodes must survive
//! `decode(encode(pdu)) == pdu`, and every fatal error must turn into a termination request.
#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use nvmeof_proto::{PduDecoder, TermReq};

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
                let term = TermReq::for_error(&e, &buf).expect("fatal errors map to a termination request");
                assert!(term.data.len() <= 128);
                break;
            }
            Err(_) => {}
        }
    }
});
