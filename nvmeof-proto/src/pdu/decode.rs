//! The incremental stream decoder.

use bytes::{Buf, Bytes, BytesMut};
use zerocopy::FromBytes;

use super::encode::MAX_HEADER_LEN;
use super::wire::{
    CapsuleCmdHeader, CapsuleRespHeader, CommonHeader, DataHeader, IcReqHeader, IcRespHeader, R2tHeader,
    TermReqHeader,
};
use super::{
    flags, pda_alignment, C2hData, CapsuleCmd, CapsuleResp, Digests, Direction, H2cData, IcReq, IcResp, Pdu,
    PduType, R2t, TermReq, COMMON_HEADER_LEN, MAX_PDA, TERM_REQ_MAX_DATA_LEN,
};
use crate::digest::{crc32c, DIGEST_LEN};
use crate::error::{DecodeError, FatalErrorStatus, HeaderField};
use crate::payload::Payload;

/// Received bytes a [`PduDecoder`] takes PDUs from: a reassembly buffer ([`BytesMut`]), a
/// [`Bytes`] a driver received into and decodes in place (a receive buffer shared with the kernel,
/// say, that goes back to it when the last PDU taken from it is dropped), or a [`BytesChain`] of
/// several such buffers (a PDU longer than one receive buffer, assembled without copying). A PDU's
/// data is a slice of the input's memory either way (several slices for a chain).
///
/// The decoder reads a PDU's header through `Deref`: the first contiguous part of the input, which
/// must hold the header (a chain keeps [`MAX_HEADER_LEN`] + 8 bytes contiguous at its front).
pub trait PduInput: std::ops::Deref<Target = [u8]> + sealed::Sealed {
    /// All the bytes the input holds (for a chain: more than `Deref` shows).
    fn total_len(&self) -> usize {
        self.len()
    }
    /// Copies the bytes at `pos..pos + out.len()` into `out` (zeros where the input ends).
    fn peek_at(&self, pos: usize, out: &mut [u8]) {
        let src = self.get(pos..).unwrap_or_default();
        let n = src.len().min(out.len());
        if let (Some(d), Some(s)) = (out.get_mut(..n), src.get(..n)) {
            d.copy_from_slice(s);
        }
        out.iter_mut().skip(n).for_each(|b| *b = 0);
    }
    /// Removes the first `n` bytes (at most the length) and returns them.
    fn take_front(&mut self, n: usize) -> Bytes;
    /// Removes the first `plen` bytes and returns bytes `start..start + len` of them as a payload.
    fn take_payload(&mut self, plen: usize, start: usize, len: usize) -> Payload {
        let mut data = self.take_front(plen);
        data.advance(start.min(data.len()));
        if data.len() > len {
            data.truncate(len);
        }
        data.into()
    }
    /// Drops the first `n` bytes (at most the length).
    fn skip_front(&mut self, n: usize);
    /// Drops everything.
    fn clear_input(&mut self);
}

mod sealed {
    pub trait Sealed {}
    impl Sealed for bytes::BytesMut {}
    impl Sealed for bytes::Bytes {}
    impl Sealed for super::BytesChain {}
}

impl PduInput for BytesMut {
    /// Splits the bytes off: the buffer keeps its memory, and can reuse it (without allocating) once
    /// the PDUs taken from it are dropped. (A driver that gives every PDU a buffer of its own hands
    /// it in as [`Bytes`] instead: the memory then moves into the PDU's data.)
    fn take_front(&mut self, n: usize) -> Bytes {
        self.split_to(n.min(self.len())).freeze()
    }

    fn skip_front(&mut self, n: usize) {
        self.advance(n.min(self.len()));
    }

    fn clear_input(&mut self) {
        self.clear();
    }
}

impl PduInput for Bytes {
    fn take_front(&mut self, n: usize) -> Bytes {
        let n = n.min(self.len());
        if n == self.len() {
            std::mem::take(self)
        } else {
            self.split_to(n)
        }
    }

    fn skip_front(&mut self, n: usize) {
        self.advance(n.min(self.len()));
    }

    fn clear_input(&mut self) {
        self.clear();
    }
}

/// Bytes front part that [`BytesChain`] keeps contiguous (a PDU header and its digest, padded).
const CHAIN_HEAD: usize = MAX_HEADER_LEN + 8;

/// Received buffers in order, decoded as one stream without copying them together: a PDU longer
/// than a receive buffer has its data as several slices (a multi-segment [`Payload`]). Only the
/// front [`MAX_HEADER_LEN`] + 8 bytes are kept contiguous (copied, if a header straddles buffers).
#[derive(Clone, Debug, Default)]
pub struct BytesChain {
    parts: std::collections::VecDeque<Bytes>,
    len: usize,
}

impl BytesChain {
    /// An empty chain.
    #[must_use]
    pub fn new() -> Self {
        Self::default()
    }

    /// Appends received bytes.
    pub fn push(&mut self, bytes: Bytes) {
        if bytes.is_empty() {
            return;
        }
        self.len += bytes.len();
        self.parts.push_back(bytes);
        self.normalize();
    }

    /// Bytes held in all.
    #[must_use]
    pub fn total(&self) -> usize {
        self.len
    }

    /// True if the chain holds nothing.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Makes the front part hold at least [`CHAIN_HEAD`] bytes (or everything) contiguously.
    fn normalize(&mut self) {
        let want = CHAIN_HEAD.min(self.len);
        if self.parts.front().is_none_or(|f| f.len() >= want) || self.parts.len() < 2 {
            return;
        }
        let mut head = BytesMut::with_capacity(want);
        while head.len() < want {
            let Some(mut part) = self.parts.pop_front() else { break };
            let n = (want - head.len()).min(part.len());
            head.extend_from_slice(part.get(..n).unwrap_or_default());
            part.advance(n);
            if !part.is_empty() {
                self.parts.push_front(part);
            }
        }
        self.parts.push_front(head.freeze());
    }

    /// Removes the first `n` bytes as parts (no copy).
    fn take_parts(&mut self, mut n: usize, out: &mut Payload) {
        n = n.min(self.len);
        self.len -= n;
        while n > 0 {
            let Some(mut part) = self.parts.pop_front() else { break };
            if part.len() > n {
                out.push(part.split_to(n));
                self.parts.push_front(part);
                break;
            }
            n -= part.len();
            out.push(part);
        }
        self.normalize();
    }
}

impl std::ops::Deref for BytesChain {
    type Target = [u8];
    /// The front part (at least the first [`MAX_HEADER_LEN`] + 8 bytes, or all of them).
    fn deref(&self) -> &[u8] {
        self.parts.front().map_or(&[], |b| &b[..])
    }
}

impl PduInput for BytesChain {
    fn total_len(&self) -> usize {
        self.len
    }

    fn peek_at(&self, mut pos: usize, out: &mut [u8]) {
        let mut done = 0;
        for part in &self.parts {
            if done == out.len() {
                break;
            }
            if pos >= part.len() {
                pos -= part.len();
                continue;
            }
            let n = (part.len() - pos).min(out.len() - done);
            if let (Some(d), Some(s)) = (out.get_mut(done..done + n), part.get(pos..pos + n)) {
                d.copy_from_slice(s);
            }
            done += n;
            pos = 0;
        }
        out.iter_mut().skip(done).for_each(|b| *b = 0);
    }

    fn take_front(&mut self, n: usize) -> Bytes {
        let mut p = Payload::new();
        self.take_parts(n, &mut p);
        p.to_bytes()
    }

    fn take_payload(&mut self, plen: usize, start: usize, len: usize) -> Payload {
        let plen = plen.min(self.len);
        let mut skipped = Payload::new();
        self.take_parts(start.min(plen), &mut skipped);
        let mut data = Payload::new();
        self.take_parts(len.min(plen.saturating_sub(start)), &mut data);
        self.skip_front(plen.saturating_sub(start + len));
        data
    }

    fn skip_front(&mut self, n: usize) {
        let mut dropped = Payload::new();
        self.take_parts(n, &mut dropped);
    }

    fn clear_input(&mut self) {
        self.parts.clear();
        self.len = 0;
    }
}

/// What a [`PduDecoder`] accepts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DecoderConfig {
    /// PDUs travelling in this direction are accepted, others are an invalid PDU-Type. `None` accepts
    /// both directions (a protocol analyser, a fuzzer).
    pub direction: Option<Direction>,
    /// Digests negotiated for the connection. ICReq, ICResp and TermReqs never carry digests.
    pub digests: Digests,
    /// The PDU data alignment this receiver asked for (its HPDA as a host, its CPDA as a controller);
    /// values above [`MAX_PDA`] count as [`MAX_PDA`]. Data must start at an offset that is a multiple of
    /// the alignment; a larger offset than the minimum is accepted (some senders pad more).
    pub pda: u8,
    /// Largest in-capsule data accepted in a CapsuleCmd. A controller should accept at least 8192
    /// bytes on every queue: the Linux host sends Fabrics commands (Connect: 1024 bytes of data) in the
    /// capsule whatever IOCCSZ says.
    pub max_capsule_data: u32,
    /// Largest data accepted in one H2CData / C2HData PDU. On a host this must cover the largest read
    /// it issues: a controller may send a whole read in one C2HData PDU.
    pub max_data_pdu: u32,
}

impl DecoderConfig {
    /// A controller's receiver before ICReq: host-to-controller PDUs, no digests, CPDA 0, 8 KiB of
    /// in-capsule data, 128 KiB per H2CData PDU.
    #[must_use]
    pub const fn controller() -> Self {
        Self {
            direction: Some(Direction::HostToController),
            digests: Digests::NONE,
            pda: 0,
            max_capsule_data: 8192,
            max_data_pdu: 128 * 1024,
        }
    }

    /// A host's receiver before ICResp: controller-to-host PDUs, no digests, HPDA 0, 1 MiB per C2HData.
    #[must_use]
    pub const fn host() -> Self {
        Self {
            direction: Some(Direction::ControllerToHost),
            digests: Digests::NONE,
            pda: 0,
            max_capsule_data: 0,
            max_data_pdu: 1024 * 1024,
        }
    }

    /// Largest PDU this configuration can accept, in bytes: what a receive buffer must be able to hold.
    #[must_use]
    pub fn max_pdu_len(&self) -> usize {
        let data = self.max_capsule_data.max(self.max_data_pdu) as usize;
        // ICReq/ICResp are 128 bytes; the header, digest and padding in front of data are at most
        // 128 bytes too (alignment is at most 128), but a sender may pad more: up to PDO = 255.
        (u8::MAX as usize).saturating_add(data).saturating_add(DIGEST_LEN)
    }
}

impl Default for DecoderConfig {
    fn default() -> Self {
        Self::controller()
    }
}

/// Where the parts of a PDU are, worked out from its (digest-checked) header.
#[derive(Clone, Copy, Debug)]
struct Layout {
    pdu_type: PduType,
    flags: u8,
    plen: usize,
    /// Start and length of the data, if any.
    data: Option<(usize, usize)>,
    data_digest: bool,
}

/// Decodes a byte stream into PDUs, one at a time, without copying their data.
///
/// Feed received bytes into a [`BytesMut`] and call [`PduDecoder::decode`] until it returns `Ok(None)`:
///
/// - `Ok(Some(pdu))`: a whole, valid PDU was removed from the front of the buffer. Its data is a slice
///   of the buffer's memory.
/// - `Ok(None)`: not enough bytes yet; [`PduDecoder::needed`] says how many more bytes the next step
///   needs.
/// - `Err(e)`: invalid input. If [`DecodeError::is_fatal`], the buffer is left as it was (the offending
///   header is at its front, to be quoted in the termination request) and the connection must end.
///   A data digest error consumes the PDU and leaves the stream in sync.
///
/// A PDU is checked in the order the Linux host and target check it, so that a corrupted header is
/// reported as a digest error rather than as whatever field the corruption hit:
///
/// ```text
///  8 bytes            PDU-Type, direction, HLEN
///  HLEN (+4) bytes    header digest, then FLAGS, PDO, PLEN and the data length against the limits
///  PLEN bytes         DATAL, data digest
/// ```
///
/// The decision depends only on the bytes, never on how they were split: feeding a stream in any
/// pieces yields the same PDUs and the same error. A receiver never buffers more than
/// [`DecoderConfig::max_pdu_len`] bytes for one PDU, because PLEN is checked against the limits before
/// the decoder waits for the data.
#[derive(Clone, Debug)]
pub struct PduDecoder {
    config: DecoderConfig,
    needed: usize,
}

impl PduDecoder {
    /// A decoder with the given configuration.
    #[must_use]
    pub const fn new(config: DecoderConfig) -> Self {
        Self { config, needed: COMMON_HEADER_LEN }
    }

    /// The current configuration.
    #[must_use]
    pub const fn config(&self) -> &DecoderConfig {
        &self.config
    }

    /// Changes the configuration, e.g. to enable digests and set the PDA once ICReq/ICResp were
    /// exchanged. Bytes already buffered are decoded with the new configuration.
    pub fn set_config(&mut self, config: DecoderConfig) {
        self.config = config;
    }

    /// Bytes still missing before the next call can make progress, as of the last call to
    /// [`PduDecoder::decode`] that returned `Ok(None)`.
    #[must_use]
    pub const fn needed(&self) -> usize {
        self.needed
    }

    /// Decodes the PDU at the front of `buf`, removing it from the buffer.
    pub fn decode<B: PduInput>(&mut self, buf: &mut B) -> Result<Option<Pdu>, DecodeError> {
        let Ok((ch, _)) = CommonHeader::read_from_prefix(buf) else {
            return Ok(self.wait(COMMON_HEADER_LEN, buf.total_len()));
        };
        let pdu_type = self.check_type_and_hlen(&ch)?;
        let hlen = usize::from(pdu_type.header_len());
        let header_digest = pdu_type.has_digests() && self.config.digests.header;
        let header_end = hlen + if header_digest { DIGEST_LEN } else { 0 };
        if buf.total_len() < header_end || buf.len() < header_end.min(buf.total_len()) {
            return Ok(self.wait(header_end, buf.total_len()));
        }
        if header_digest {
            check_header_digest(buf, hlen)?;
        }
        let layout = self.layout(pdu_type, &ch, header_end)?;
        if buf.total_len() < layout.plen {
            return Ok(self.wait(layout.plen, buf.total_len()));
        }
        self.needed = COMMON_HEADER_LEN;
        decode_body(buf, &layout).map(Some)
    }

    fn wait(&mut self, want: usize, have: usize) -> Option<Pdu> {
        self.needed = want.saturating_sub(have).max(1);
        None
    }

    /// Stage one: what the common header must say before anything else can be located.
    fn check_type_and_hlen(&self, ch: &CommonHeader) -> Result<PduType, DecodeError> {
        let pdu_type = PduType::from_u8(ch.pdu_type).ok_or(invalid(HeaderField::PduType))?;
        if self.config.direction.is_some_and(|d| d != pdu_type.direction()) {
            return Err(invalid(HeaderField::PduType));
        }
        if ch.hlen != pdu_type.header_len() {
            return Err(term_or_invalid(pdu_type, HeaderField::HeaderLength));
        }
        Ok(pdu_type)
    }

    /// Stage two, once the header (and its digest) is verified: flags, PDO, PLEN, limits.
    fn layout(&self, pdu_type: PduType, ch: &CommonHeader, header_end: usize) -> Result<Layout, DecodeError> {
        let cfg = &self.config;
        let fl = ch.flags;
        if fl & !pdu_type.allowed_flags() != 0 {
            return Err(term_or_invalid(pdu_type, HeaderField::Flags));
        }
        if pdu_type.has_digests() && (fl & flags::HDGSTF != 0) != cfg.digests.header {
            return Err(invalid(HeaderField::Flags));
        }
        if pdu_type == PduType::C2hData && fl & flags::SUCCESS != 0 && fl & flags::LAST_PDU == 0 {
            return Err(invalid(HeaderField::Flags));
        }
        let plen = usize::try_from(ch.plen.get()).unwrap_or(usize::MAX);
        let mut layout = Layout { pdu_type, flags: fl, plen, data: None, data_digest: false };
        let hlen = usize::from(ch.hlen);

        match pdu_type {
            PduType::IcReq | PduType::IcResp | PduType::CapsuleResp | PduType::R2t => {
                // PDO is not used by these types (senders put 0 there).
                if plen != header_end {
                    return Err(invalid(HeaderField::PduLength));
                }
            }
            PduType::H2cTermReq | PduType::C2hTermReq => {
                // PDO is reserved in termination requests; the data is the quoted header.
                if plen < hlen || plen > hlen + TERM_REQ_MAX_DATA_LEN {
                    return Err(DecodeError::MalformedTermReq(HeaderField::PduLength));
                }
                layout.data = Some((hlen, plen - hlen));
            }
            PduType::CapsuleCmd | PduType::H2cData | PduType::C2hData => {
                let ddgst_flag = fl & flags::DDGSTF != 0;
                let pdo = usize::from(ch.pdo);
                if plen < header_end {
                    return Err(invalid(HeaderField::PduLength));
                }
                if plen == header_end && pdu_type == PduType::CapsuleCmd {
                    // A capsule without data: PDO is 0 (Linux, SPDK) or points at the end.
                    if ddgst_flag {
                        return Err(invalid(HeaderField::Flags));
                    }
                    if pdo != 0 && pdo != header_end {
                        return Err(invalid(HeaderField::DataOffset));
                    }
                    return Ok(layout);
                }
                if ddgst_flag != cfg.digests.data {
                    return Err(invalid(HeaderField::Flags));
                }
                if pdo < header_end || pdo % pda_alignment(cfg.pda.min(MAX_PDA)) != 0 {
                    return Err(invalid(HeaderField::DataOffset));
                }
                let trailer = if ddgst_flag { DIGEST_LEN } else { 0 };
                let data_len = plen
                    .checked_sub(pdo + trailer)
                    .filter(|&n| n > 0)
                    .ok_or(invalid(HeaderField::PduLength))?;
                let max =
                    if pdu_type == PduType::CapsuleCmd { cfg.max_capsule_data } else { cfg.max_data_pdu };
                if data_len > max as usize {
                    let len = u32::try_from(data_len).unwrap_or(u32::MAX);
                    return Err(DecodeError::DataLimitExceeded { len, max });
                }
                layout.data = Some((pdo, data_len));
                layout.data_digest = ddgst_flag;
            }
        }
        Ok(layout)
    }
}

const fn invalid(field: HeaderField) -> DecodeError {
    DecodeError::InvalidHeaderField(field)
}

/// A malformed termination request is not answered with another one: the connection just closes.
const fn term_or_invalid(pdu_type: PduType, field: HeaderField) -> DecodeError {
    match pdu_type {
        PduType::H2cTermReq | PduType::C2hTermReq => DecodeError::MalformedTermReq(field),
        _ => invalid(field),
    }
}

fn read_le32(buf: &[u8], at: usize) -> u32 {
    let mut raw = [0u8; 4];
    if let Some(src) = buf.get(at..at + 4) {
        raw.copy_from_slice(src);
    }
    u32::from_le_bytes(raw)
}

fn check_header_digest(buf: &[u8], hlen: usize) -> Result<(), DecodeError> {
    let computed = crc32c(buf.get(..hlen).unwrap_or_default());
    let received = read_le32(buf, hlen);
    if computed == received {
        Ok(())
    } else {
        Err(DecodeError::HeaderDigest { received, computed })
    }
}

/// Parses a PDU-specific header from the front of `buf` (already known to hold `plen` bytes).
fn header<T: FromBytes>(buf: &[u8]) -> Result<T, DecodeError> {
    T::read_from_prefix(buf).map(|(h, _)| h).map_err(|_| invalid(HeaderField::HeaderLength))
}

/// Builds the PDU from a buffer holding all of it; consumes exactly `plen` bytes, except on a fatal
/// error, where the buffer is left untouched.
fn decode_body<B: PduInput>(buf: &mut B, layout: &Layout) -> Result<Pdu, DecodeError> {
    let pdu = match layout.pdu_type {
        PduType::IcReq => {
            let h: IcReqHeader = header(buf)?;
            Pdu::IcReq(IcReq {
                pfv: h.pfv.get(),
                hpda: h.hpda,
                digests: Digests::from_bits(h.dgst),
                maxr2t: h.maxr2t.get(),
            })
        }
        PduType::IcResp => {
            let h: IcRespHeader = header(buf)?;
            Pdu::IcResp(IcResp {
                pfv: h.pfv.get(),
                cpda: h.cpda,
                digests: Digests::from_bits(h.dgst),
                maxh2cdata: h.maxh2cdata.get(),
            })
        }
        PduType::CapsuleResp => {
            let h: CapsuleRespHeader = header(buf)?;
            Pdu::CapsuleResp(CapsuleResp { cqe: h.cqe })
        }
        PduType::R2t => {
            let h: R2tHeader = header(buf)?;
            Pdu::R2t(R2t { cccid: h.cccid.get(), ttag: h.ttag.get(), r2to: h.r2to.get(), r2tl: h.r2tl.get() })
        }
        PduType::H2cTermReq | PduType::C2hTermReq => {
            let h: TermReqHeader = header(buf)?;
            let data = take_data(buf, layout).to_bytes();
            let t = TermReq { fes: FatalErrorStatus(h.fes.get()), fei: h.fei.get(), data };
            return Ok(if layout.pdu_type == PduType::H2cTermReq {
                Pdu::H2cTermReq(t)
            } else {
                Pdu::C2hTermReq(t)
            });
        }
        PduType::CapsuleCmd => {
            let h: CapsuleCmdHeader = header(buf)?;
            let ctx = DigestContext::new(layout, h.sqe.cid.get(), 0, 0);
            let data = take_checked_data(buf, layout, ctx)?;
            return Ok(Pdu::CapsuleCmd(CapsuleCmd { sqe: h.sqe, data }));
        }
        PduType::H2cData | PduType::C2hData => {
            let h: DataHeader = header(buf)?;
            let datal = h.datal.get();
            if layout.data.is_none_or(|(_, len)| Ok(len) != usize::try_from(datal)) {
                return Err(invalid(HeaderField::DataLength));
            }
            let last = layout.flags & flags::LAST_PDU != 0;
            let (cccid, datao) = (h.cccid.get(), h.datao.get());
            if layout.pdu_type == PduType::H2cData {
                let ttag = h.ttag.get();
                let data = take_checked_data(buf, layout, DigestContext::new(layout, cccid, ttag, datao))?;
                return Ok(Pdu::H2cData(H2cData { cccid, ttag, datao, last, data }));
            }
            let success = layout.flags & flags::SUCCESS != 0;
            let data = take_checked_data(buf, layout, DigestContext::new(layout, cccid, 0, datao))?;
            return Ok(Pdu::C2hData(C2hData { cccid, datao, last, success, data }));
        }
    };
    buf.skip_front(layout.plen);
    Ok(pdu)
}

/// Removes the PDU from the buffer and returns its data as a slice of the buffer's memory.
fn take_data<B: PduInput>(buf: &mut B, layout: &Layout) -> Payload {
    match layout.data {
        Some((start, len)) if len > 0 => buf.take_payload(layout.plen, start, len),
        _ => {
            buf.skip_front(layout.plen);
            Payload::new()
        }
    }
}

/// What a data digest error must report so the receiver can fail the right command.
#[derive(Clone, Copy)]
struct DigestContext {
    pdu_type: PduType,
    cccid: u16,
    ttag: u16,
    datao: u32,
    last: bool,
    success: bool,
}

impl DigestContext {
    fn new(layout: &Layout, cccid: u16, ttag: u16, datao: u32) -> Self {
        Self {
            pdu_type: layout.pdu_type,
            cccid,
            ttag,
            datao,
            last: layout.flags & flags::LAST_PDU != 0,
            success: layout.flags & flags::SUCCESS != 0,
        }
    }
}

/// CRC32C of `data` followed by zeros up to a multiple of four bytes: what SPDK sends as the data
/// digest when the data length is not a multiple of four.
fn crc32c_zero_padded(data: &Payload) -> u32 {
    let pad = (4 - data.len() % 4) % 4;
    crc32c::crc32c_append(data.crc32c(), [0u8; 3].get(..pad).unwrap_or_default())
}

/// Like [`take_data`], verifying the data digest if there is one. A mismatch still consumes the PDU.
///
/// The digest covers the data only (NVMe/TCP; Linux). When the data length is not a multiple of four,
/// the digest of the data padded with zeros to a multiple of four is accepted as well, for
/// interoperability with SPDK.
fn take_checked_data<B: PduInput>(
    buf: &mut B,
    layout: &Layout,
    ctx: DigestContext,
) -> Result<Payload, DecodeError> {
    let mut received = None;
    if let Some((start, len)) = layout.data.filter(|_| layout.data_digest) {
        let mut digest = [0u8; DIGEST_LEN];
        buf.peek_at(start + len, &mut digest);
        received = Some(u32::from_le_bytes(digest));
    }
    let data = take_data(buf, layout);
    let mut mismatch = None;
    if let Some(received) = received {
        let computed = data.crc32c();
        let len = data.len();
        if computed != received && (len % 4 == 0 || crc32c_zero_padded(&data) != received) {
            mismatch = Some((received, computed, len));
        }
    }
    match mismatch {
        None => Ok(data),
        Some((received, computed, len)) => Err(DecodeError::DataDigest {
            pdu_type: ctx.pdu_type,
            cccid: ctx.cccid,
            ttag: ctx.ttag,
            datao: ctx.datao,
            datal: u32::try_from(len).unwrap_or(u32::MAX),
            last: ctx.last,
            success: ctx.success,
            received,
            computed,
        }),
    }
}
