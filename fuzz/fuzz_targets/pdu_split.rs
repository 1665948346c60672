//! Split invariance: a stream decoded in arbitrary pieces gives the same PDUs and errors as the
//! stream decoded at once. Input: 2 config bytes, 1 byte N, N cut-point bytes, then the stream.
#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use nvmeof_proto::{DecodeError, DecoderConfig, Pdu, PduDecoder};

mod common;

fn run(cfg: DecoderConfig, stream: &[u8], cuts: &[usize]) -> Vec<Result<Pdu, DecodeError>> {
    let mut dec = PduDecoder::new(cfg);
    let mut buf = BytesMut::new();
    let mut out = Vec::new();
    let mut from = 0;
    for &to in cuts.iter().chain(std::iter::once(&stream.len())) {
        buf.extend_from_slice(&stream[from..to]);
        from = to;
        loop {
            match dec.decode(&mut buf) {
                Ok(Some(p)) => out.push(Ok(p)),
                Ok(None) => break,
                Err(e) => {
                    let fatal = e.is_fatal();
                    out.push(Err(e));
                    if fatal {
                        return out;
                    }
                }
            }
        }
    }
    out
}

fuzz_target!(|data: &[u8]| {
    let Some((cfg, _, rest)) = common::config(data) else { return };
    let Some((&n, rest)) = rest.split_first() else { return };
    let n = usize::from(n).min(rest.len()) / 4;
    let (cut_bytes, stream) = rest.split_at(n);
    let mut cuts: Vec<usize> = cut_bytes
        .iter()
        .scan(0usize, |pos, &step| {
            *pos += usize::from(step);
            Some(*pos)
        })
        .filter(|&c| c <= stream.len())
        .collect();
    cuts.dedup();
    assert_eq!(run(cfg, stream, &[]), run(cfg, stream, &cuts));
});
