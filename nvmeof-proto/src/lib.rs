//! # nvmeof-proto
//!
//! The NVMe/TCP wire protocol as pure functions and types: the nine PDUs of the NVMe/TCP transport,
//! an incremental zero-copy stream decoder, an encoder for vectored writes, CRC32C digests, and the NVMe
//! and NVMe over Fabrics structures a target and a host exchange. No I/O, no runtime, no clock, no
//! `unsafe`.
//!
//! ```text
//!   socket bytes ──▶ BytesMut ──▶ PduDecoder::decode ──▶ Pdu ──▶ (your engine)
//!                                  │  checks the 8-byte common header first:
//!                                  │  type/direction, flags, HLEN, PDO, PLEN, size limits
//!                                  └─ data = Bytes slice of the receive buffer (no copy)
//!
//!   (your engine) ──▶ Pdu ──▶ Pdu::encode ──▶ EncodedPdu { header, payload segments, data digest }
//!                                                  └─▶ writev / sendmsg / io_uring, no gathering copy
//! ```
//!
//! Errors are data: a [`DecodeError`] says which Fatal Error Status and which field offset a
//! termination request must carry ([`TermReq::for_error`]); "not enough bytes yet" is `Ok(None)`, not an
//! error. The NVMe structures in [`nvme`] are `zerocopy` little-endian layouts that are read in place.
//!
//! ## Example
//!
//! A host's CapsuleCmd carrying a Flush, encoded with both digests and decoded by a controller:
//!
//! ```
//! use bytes::BytesMut;
//! use nvmeof_proto::nvme::Sqe;
//! use nvmeof_proto::{CapsuleCmd, DecoderConfig, Digests, EncodeOptions, Pdu, PduDecoder};
//!
//! let mut sqe = Sqe::zeroed();
//! sqe.opcode = 0x00; // Flush
//! sqe.cid.set(7);
//! sqe.nsid.set(1);
//! let opts = EncodeOptions { digests: Digests::BOTH, pda: 0 };
//! let wire = Pdu::CapsuleCmd(CapsuleCmd { sqe, data: Default::default() }).encode(&opts)?;
//!
//! let mut decoder = PduDecoder::new(DecoderConfig { digests: Digests::BOTH, ..DecoderConfig::controller() });
//! let mut rx = BytesMut::new();
//! // Bytes arrive in pieces: the decoder asks for more until the PDU is complete.
//! let bytes = wire.to_vec();
//! rx.extend_from_slice(&bytes[..5]);
//! assert_eq!(decoder.decode(&mut rx)?, None);
//! assert_eq!(decoder.needed(), 3);
//! rx.extend_from_slice(&bytes[5..]);
//! match decoder.decode(&mut rx)? {
//!     Some(Pdu::CapsuleCmd(cmd)) => assert_eq!(cmd.sqe.cid.get(), 7),
//!     other => panic!("unexpected {other:?}"),
//! }
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! ## Limits
//!
//! The decoder never allocates: the caller owns the receive buffer, and [`DecoderConfig`] bounds how
//! large a PDU may be ([`DecoderConfig::max_pdu_len`]) — checked from the common header before any data
//! is waited for.
#![forbid(unsafe_code)]
#![cfg_attr(
    not(test),
    deny(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing, clippy::panic)
)]

pub mod digest;
pub mod error;
pub mod nvme;
pub mod payload;
pub mod pdu;

pub use error::{DecodeError, FatalErrorStatus, HeaderField};
pub use payload::Payload;
pub use pdu::encode::EncodeError;
pub use pdu::{
    BytesChain, C2hData, CapsuleCmd, CapsuleResp, DecoderConfig, Digests, Direction, EncodeOptions,
    EncodedPdu, H2cData, IcReq, IcResp, Pdu, PduDecoder, PduInput, PduType, R2t, TermReq,
};
