//! The encoder: header bytes plus the payload's own `Bytes`, ready for a vectored write.

use std::io::{self, IoSlice, Write};

use bytes::Bytes;
use zerocopy::little_endian::{U16, U32};
use zerocopy::IntoBytes;

use super::wire::{
    CapsuleCmdHeader, CapsuleRespHeader, CommonHeader, DataHeader, IcReqHeader, IcRespHeader, R2tHeader,
    TermReqHeader,
};
use super::{data_offset, flags, C2hData, Digests, H2cData, Pdu, TERM_REQ_MAX_DATA_LEN};
use crate::digest::{crc32c, DIGEST_LEN};
use crate::payload::Payload;

/// How to encode PDUs for a connection.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EncodeOptions {
    /// Digests negotiated for the connection (ignored for ICReq, ICResp and TermReqs).
    pub digests: Digests,
    /// The PDU data alignment the *receiver* asked for: the host's HPDA when a controller sends, the
    /// controller's CPDA when a host sends. Values above 31 count as 31.
    pub pda: u8,
}

/// Errors of [`Pdu::encode`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum EncodeError {
    /// The PDU would be longer than PLEN (32 bits) can describe.
    #[error("PDU data of {len} bytes is too large to encode")]
    TooLarge {
        /// The data length asked for.
        len: usize,
    },
    /// An H2CData or C2HData PDU without data (DATAL must not be zero).
    #[error("a data PDU must carry data")]
    EmptyData,
    /// A C2HData PDU with SUCCESS but without LAST_PDU (the host would reject it).
    #[error("C2HData SUCCESS requires LAST_PDU")]
    SuccessWithoutLast,
}

/// Longest header an encoded PDU has: a capsule header with its digest (76 bytes) padded to a
/// multiple of the receiver's data alignment ((PDA + 1) × 4 bytes; with PDA 17, 72-byte units: 144).
pub const MAX_HEADER_LEN: usize = 144;

/// Headers up to this length are kept inline in the [`EncodedPdu`] (every header a controller sends
/// on a live queue: response capsules, C2HData and R2T, 24 bytes plus a digest).
const INLINE_HEADER_LEN: usize = 32;

/// A header being built, on the stack: `N` is [`INLINE_HEADER_LEN`] for the short headers a
/// controller sends on a live queue (built where they stay), [`MAX_HEADER_LEN`] otherwise.
struct HeaderBuf<const N: usize> {
    bytes: [u8; N],
    len: usize,
}

impl<const N: usize> HeaderBuf<N> {
    const fn new() -> Self {
        Self { bytes: [0; N], len: 0 }
    }

    fn as_slice(&self) -> &[u8] {
        self.bytes.get(..self.len).unwrap_or_default()
    }

    /// Appends `b` (as much as fits; the caller picked `N` to fit the header).
    fn put_slice(&mut self, b: &[u8]) {
        let n = b.len().min(N - self.len);
        if let (Some(dst), Some(src)) = (self.bytes.get_mut(self.len..self.len + n), b.get(..n)) {
            dst.copy_from_slice(src);
        }
        self.len += n;
    }

    /// Zero padding up to `len` bytes in all (the array is zeroed).
    fn pad_to(&mut self, len: usize) {
        self.len = self.len.max(len.min(N));
    }
}

/// Builds a header of `data_start` bytes into a `HeaderBuf<N>`.
fn build_header<const N: usize>(
    pdu: &Pdu,
    ch: CommonHeader,
    datal: u32,
    header_digest: bool,
    data_start: usize,
) -> HeaderBuf<N> {
    let mut header = HeaderBuf::<N>::new();
    write_header(pdu, ch, datal, &mut header);
    if header_digest {
        let crc = crc32c(header.as_slice());
        header.put_slice(&crc.to_le_bytes());
    }
    header.pad_to(data_start);
    header
}

/// The header bytes of an encoded PDU: short ones inline (no allocation; a vectored write points at
/// them where the `EncodedPdu` sits in a send queue), longer ones (ICReq/ICResp, command capsules) on
/// the heap.
#[derive(Clone, PartialEq, Eq)]
enum Header {
    Inline { bytes: [u8; INLINE_HEADER_LEN], len: u8 },
    Heap(Bytes),
}

impl Header {
    fn as_slice(&self) -> &[u8] {
        match self {
            Header::Inline { bytes, len } => bytes.get(..usize::from(*len)).unwrap_or_default(),
            Header::Heap(b) => b,
        }
    }
}

impl std::fmt::Debug for Header {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("Header").field(&self.as_slice()).finish()
    }
}

/// An encoded PDU: the header bytes (common header, PDU header, header digest, padding; a
/// controller's response, data and R2T headers are kept inline: no allocation), then the payload segments as they were given (never copied), then the
/// data digest.
///
/// Write it with [`EncodedPdu::io_slices`] (vectored) or [`EncodedPdu::write_to`].
#[derive(Clone, Debug, PartialEq, Eq)]
#[must_use]
pub struct EncodedPdu {
    header: Header,
    data: Payload,
    data_digest: Option<[u8; DIGEST_LEN]>,
}

impl EncodedPdu {
    /// Header bytes: common header, PDU-specific header, header digest and padding.
    #[must_use]
    pub fn header(&self) -> &[u8] {
        self.header.as_slice()
    }

    /// The payload, exactly as it was given to the encoder.
    #[must_use]
    pub fn data(&self) -> &Payload {
        &self.data
    }

    /// The data digest trailer, if the PDU has one.
    #[must_use]
    pub fn data_digest(&self) -> Option<[u8; DIGEST_LEN]> {
        self.data_digest
    }

    /// Total length on the wire (PLEN).
    #[must_use]
    pub fn len(&self) -> usize {
        self.header.as_slice().len() + self.data.len() + self.data_digest.map_or(0, |d| d.len())
    }

    /// Always false: a PDU has at least its header.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// How many chunks [`EncodedPdu::chunks`] yields (iovecs of a vectored write).
    #[must_use]
    pub fn chunk_count(&self) -> usize {
        1 + self.data.segments().len() + usize::from(self.data_digest.is_some())
    }

    /// The PDU's byte chunks in wire order.
    pub fn chunks(&self) -> impl Iterator<Item = &[u8]> {
        core::iter::once(self.header.as_slice())
            .chain(self.data.segments().iter().map(|s| &s[..]))
            .chain(self.data_digest.as_ref().map(|d| &d[..]))
    }

    /// Appends the PDU's chunks to `out` as `IoSlice`s for a vectored write (`writev`, `sendmsg`,
    /// io_uring `SendMsg`).
    pub fn io_slices<'a>(&'a self, out: &mut Vec<IoSlice<'a>>) {
        out.extend(self.chunks().map(IoSlice::new));
    }

    /// Writes the whole PDU to a blocking writer, chunk by chunk.
    pub fn write_to<W: Write + ?Sized>(&self, w: &mut W) -> io::Result<()> {
        self.chunks().try_for_each(|c| w.write_all(c))
    }

    /// The PDU as one contiguous vector (copies; for tests and diagnostics).
    #[must_use]
    pub fn to_vec(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(self.len());
        self.chunks().for_each(|c| v.extend_from_slice(c));
        v
    }

    /// The parts: header bytes (copied out), payload, data digest.
    #[must_use]
    pub fn into_parts(self) -> (Bytes, Payload, Option<[u8; DIGEST_LEN]>) {
        (Bytes::copy_from_slice(self.header.as_slice()), self.data, self.data_digest)
    }
}

impl Pdu {
    /// Encodes the PDU. The payload moves into the result (no copy); headers of up to 32 bytes
    /// (what a controller sends on a live queue) are kept inline, longer ones take one allocation.
    pub fn encode(mut self, opts: &EncodeOptions) -> Result<EncodedPdu, EncodeError> {
        match &self {
            Pdu::H2cData(H2cData { data, .. }) | Pdu::C2hData(C2hData { data, .. }) if data.is_empty() => {
                return Err(EncodeError::EmptyData);
            }
            Pdu::C2hData(C2hData { success: true, last: false, .. }) => {
                return Err(EncodeError::SuccessWithoutLast);
            }
            _ => {}
        }
        let pdu_type = self.pdu_type();
        let hlen = usize::from(pdu_type.header_len());
        let header_digest = pdu_type.has_digests() && opts.digests.header;
        let header_end = hlen + if header_digest { DIGEST_LEN } else { 0 };
        // The payload moves into the encoded PDU (no reference count is taken).
        let (data, with_data_offset) = match &mut self {
            Pdu::CapsuleCmd(c) => {
                let data = std::mem::replace(&mut c.data, Payload::new());
                let with = !data.is_empty();
                (data, with)
            }
            Pdu::H2cData(d) => (std::mem::replace(&mut d.data, Payload::new()), true),
            Pdu::C2hData(d) => (std::mem::replace(&mut d.data, Payload::new()), true),
            Pdu::H2cTermReq(t) | Pdu::C2hTermReq(t) => {
                let quoted = t.data.slice(..t.data.len().min(TERM_REQ_MAX_DATA_LEN));
                (Payload::from(quoted), false)
            }
            Pdu::IcReq(_) | Pdu::IcResp(_) | Pdu::CapsuleResp(_) | Pdu::R2t(_) => (Payload::new(), false),
        };
        let data_digest = with_data_offset && opts.digests.data;
        let pdo = if with_data_offset { data_offset(pdu_type, header_digest, opts.pda) } else { 0 };
        let data_start = if with_data_offset { pdo } else { header_end };
        let plen = data_start + data.len() + if data_digest { DIGEST_LEN } else { 0 };
        let plen = u32::try_from(plen).map_err(|_| EncodeError::TooLarge { len: data.len() })?;
        let datal = u32::try_from(data.len()).map_err(|_| EncodeError::TooLarge { len: data.len() })?;

        let mut fl = 0u8;
        if header_digest {
            fl |= flags::HDGSTF;
        }
        if data_digest {
            fl |= flags::DDGSTF;
        }
        let ch = CommonHeader {
            pdu_type: pdu_type as u8,
            flags: fl,
            hlen: pdu_type.header_len(),
            pdo: u8::try_from(pdo).unwrap_or(u8::MAX),
            plen: U32::new(plen),
        };

        if data_start > MAX_HEADER_LEN {
            return Err(EncodeError::TooLarge { len: data.len() });
        }
        let header = if data_start <= INLINE_HEADER_LEN {
            let h = build_header::<INLINE_HEADER_LEN>(&self, ch, datal, header_digest, data_start);
            Header::Inline { bytes: h.bytes, len: h.len as u8 }
        } else {
            let h = build_header::<MAX_HEADER_LEN>(&self, ch, datal, header_digest, data_start);
            Header::Heap(Bytes::copy_from_slice(h.as_slice()))
        };

        let data_digest = data_digest.then(|| data.crc32c().to_le_bytes());
        Ok(EncodedPdu { header, data, data_digest })
    }
}

fn write_header<const N: usize>(pdu: &Pdu, mut ch: CommonHeader, datal: u32, out: &mut HeaderBuf<N>) {
    match pdu {
        Pdu::IcReq(r) => out.put_slice(
            IcReqHeader {
                ch,
                pfv: U16::new(r.pfv),
                hpda: r.hpda,
                dgst: r.digests.to_bits(),
                maxr2t: U32::new(r.maxr2t),
                reserved: [0; 112],
            }
            .as_bytes(),
        ),
        Pdu::IcResp(r) => out.put_slice(
            IcRespHeader {
                ch,
                pfv: U16::new(r.pfv),
                cpda: r.cpda,
                dgst: r.digests.to_bits(),
                maxh2cdata: U32::new(r.maxh2cdata),
                reserved: [0; 112],
            }
            .as_bytes(),
        ),
        Pdu::H2cTermReq(t) | Pdu::C2hTermReq(t) => out.put_slice(
            TermReqHeader { ch, fes: U16::new(t.fes.0), fei: U32::new(t.fei), reserved: [0; 10] }.as_bytes(),
        ),
        Pdu::CapsuleCmd(c) => out.put_slice(CapsuleCmdHeader { ch, sqe: c.sqe }.as_bytes()),
        Pdu::CapsuleResp(r) => out.put_slice(CapsuleRespHeader { ch, cqe: r.cqe }.as_bytes()),
        Pdu::H2cData(d) => {
            if d.last {
                ch.flags |= flags::LAST_PDU;
            }
            out.put_slice(
                DataHeader {
                    ch,
                    cccid: U16::new(d.cccid),
                    ttag: U16::new(d.ttag),
                    datao: U32::new(d.datao),
                    datal: U32::new(datal),
                    reserved: [0; 4],
                }
                .as_bytes(),
            );
        }
        Pdu::C2hData(d) => {
            if d.last {
                ch.flags |= flags::LAST_PDU;
            }
            if d.success {
                ch.flags |= flags::SUCCESS;
            }
            out.put_slice(
                DataHeader {
                    ch,
                    cccid: U16::new(d.cccid),
                    ttag: U16::new(0),
                    datao: U32::new(d.datao),
                    datal: U32::new(datal),
                    reserved: [0; 4],
                }
                .as_bytes(),
            );
        }
        Pdu::R2t(r) => out.put_slice(
            R2tHeader {
                ch,
                cccid: U16::new(r.cccid),
                ttag: U16::new(r.ttag),
                r2to: U32::new(r.r2to),
                r2tl: U32::new(r.r2tl),
                reserved: [0; 4],
            }
            .as_bytes(),
        ),
    }
}
