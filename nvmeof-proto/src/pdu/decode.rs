//! The incremental stream decoder.

use bytes::{Buf, BytesMut};
use zerocopy::FromBytes;

use super::wire::{
    CapsuleCmdHeader, CapsuleRespHeader, CommonHeader, DataHeader, IcReqHeader, IcRespHeader, R2tHeader,
    TermReqHeader,
};
use super::{
    data_offset, flags, C2hData, CapsuleCmd, CapsuleResp, Digests, Direction, H2cData, IcReq, IcResp, Pdu,
    PduType, R2t, TermReq, COMMON_HEADER_LEN, TERM_REQ_MAX_DATA_LEN,
};
use crate::digest::{crc32c, DIGEST_LEN};
use crate::error::{DecodeError, FatalErrorStatus, HeaderField};
use crate::payload::Payload;

/// What a [`PduDecoder`] accepts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DecoderConfig {
    /// PDUs travelling in this direction are accepted, others are an invalid PDU-Type. `None` accepts
    /// both directions (a protocol analyser, a fuzzer).
    pub direction: Option<Direction>,
    /// Digests negotiated for the connection. ICReq, ICResp and TermReqs never carry digests.
    pub digests: Digests,
    /// The PDU data alignment this receiver asked for (its HPDA as a host, its CPDA as a controller).
    pub pda: u8,
    /// Largest in-capsule data accepted in a CapsuleCmd.
    pub max_capsule_data: u32,
    /// Largest data accepted in one H2CData / C2HData PDU.
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
        // ICReq/ICResp are 128 bytes; a command capsule's header, digest and padding reach at most
        // its data offset.
        let header = 128usize.max(data_offset(PduType::CapsuleCmd, true, self.pda));
        header + data + DIGEST_LEN
    }
}

impl Default for DecoderConfig {
    fn default() -> Self {
        Self::controller()
    }
}

/// Where the parts of a PDU are, worked out from its common header alone.
#[derive(Clone, Copy, Debug)]
struct Layout {
    pdu_type: PduType,
    flags: u8,
    plen: usize,
    hlen: usize,
    header_digest: bool,
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
/// - `Ok(None)`: not enough bytes yet; [`PduDecoder::needed`] says how many more complete the PDU.
/// - `Err(e)`: invalid input. If [`DecodeError::is_fatal`], the buffer is left as it was (the offending
///   header is at its front, to be quoted in the termination request) and the connection must end.
///   A data digest error consumes the PDU and leaves the stream in sync.
///
/// The decision depends only on the bytes, never on how they were split: feeding a stream in any
/// pieces yields the same PDUs and the same error. The common header is validated — including the
/// data length against the configured maxima — as soon as its 8 bytes are there, so a receiver never
/// buffers more than [`DecoderConfig::max_pdu_len`] bytes for one PDU.
#[derive(Clone, Debug)]
pub struct PduDecoder {
    config: DecoderConfig,
    needed: usize,
}

impl PduDecoder {
    /// A decoder with the given configuration.
    #[must_use]
    pub const fn new(config: DecoderConfig) -> Self {
        Self {
            config,
            needed: COMMON_HEADER_LEN,
        }
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

    /// Bytes still missing to complete the PDU at the front of the buffer, as of the last call to
    /// [`PduDecoder::decode`] that returned `Ok(None)`.
    #[must_use]
    pub const fn needed(&self) -> usize {
        self.needed
    }

    /// Validates a common header and returns the PDU's total length (PLEN). This is what
    /// [`PduDecoder::decode`] does first; drivers may use it to size a read.
    pub fn check_header(&self, header: &[u8; COMMON_HEADER_LEN]) -> Result<usize, DecodeError> {
        let ch = CommonHeader::read_from_bytes(header).map_err(|_| invalid(HeaderField::PduLength))?;
        self.layout(&ch).map(|l| l.plen)
    }

    /// Decodes the PDU at the front of `buf`, removing it from the buffer.
    pub fn decode(&mut self, buf: &mut BytesMut) -> Result<Option<Pdu>, DecodeError> {
        let Ok((ch, _)) = CommonHeader::read_from_prefix(buf) else {
            self.needed = COMMON_HEADER_LEN - buf.len();
            return Ok(None);
        };
        let layout = self.layout(&ch)?;
        if buf.len() < layout.plen {
            self.needed = layout.plen - buf.len();
            return Ok(None);
        }
        self.needed = COMMON_HEADER_LEN;
        if layout.header_digest {
            check_header_digest(buf, layout.hlen)?;
        }
        decode_body(buf, &layout).map(Some)
    }

    fn layout(&self, ch: &CommonHeader) -> Result<Layout, DecodeError> {
        let cfg = &self.config;
        let pdu_type = PduType::from_u8(ch.pdu_type).ok_or(invalid(HeaderField::PduType))?;
        if cfg.direction.is_some_and(|d| d != pdu_type.direction()) {
            return Err(invalid(HeaderField::PduType));
        }
        if ch.flags & !pdu_type.allowed_flags() != 0 {
            return Err(invalid(HeaderField::Flags));
        }
        if pdu_type == PduType::C2hData && ch.flags & flags::SUCCESS != 0 && ch.flags & flags::LAST_PDU == 0 {
            return Err(invalid(HeaderField::Flags));
        }
        if ch.hlen != pdu_type.header_len() {
            return Err(invalid(HeaderField::HeaderLength));
        }
        let hlen = usize::from(ch.hlen);
        let header_digest = pdu_type.has_digests() && cfg.digests.header;
        if pdu_type.has_digests() && (ch.flags & flags::HDGSTF != 0) != header_digest {
            return Err(invalid(HeaderField::Flags));
        }
        let plen = usize::try_from(ch.plen.get()).map_err(|_| invalid(HeaderField::PduLength))?;
        let header_end = hlen + if header_digest { DIGEST_LEN } else { 0 };
        let mut layout = Layout {
            pdu_type,
            flags: ch.flags,
            plen,
            hlen,
            header_digest,
            data: None,
            data_digest: false,
        };

        match pdu_type {
            PduType::IcReq | PduType::IcResp | PduType::CapsuleResp | PduType::R2t => {
                if plen != header_end {
                    return Err(invalid(HeaderField::PduLength));
                }
            }
            PduType::H2cTermReq | PduType::C2hTermReq => {
                // PDO is reserved in termination requests; the data is the quoted header.
                if plen < hlen || plen > hlen + TERM_REQ_MAX_DATA_LEN {
                    return Err(invalid(HeaderField::PduLength));
                }
                layout.data = Some((hlen, plen - hlen));
            }
            PduType::CapsuleCmd | PduType::H2cData | PduType::C2hData => {
                let ddgst_flag = ch.flags & flags::DDGSTF != 0;
                if ch.pdo == 0 {
                    // No data: only a command capsule may have none.
                    if pdu_type != PduType::CapsuleCmd {
                        return Err(invalid(HeaderField::DataOffset));
                    }
                    if ddgst_flag {
                        return Err(invalid(HeaderField::Flags));
                    }
                    if plen != header_end {
                        return Err(invalid(HeaderField::PduLength));
                    }
                } else {
                    let pdo = data_offset(pdu_type, header_digest, cfg.pda);
                    if usize::from(ch.pdo) != pdo {
                        return Err(invalid(HeaderField::DataOffset));
                    }
                    if ddgst_flag != cfg.digests.data {
                        return Err(invalid(HeaderField::Flags));
                    }
                    let trailer = if ddgst_flag { DIGEST_LEN } else { 0 };
                    let data_len = plen
                        .checked_sub(pdo + trailer)
                        .filter(|&n| n > 0)
                        .ok_or(invalid(HeaderField::PduLength))?;
                    let max = if pdu_type == PduType::CapsuleCmd {
                        cfg.max_capsule_data
                    } else {
                        cfg.max_data_pdu
                    };
                    if data_len > max as usize {
                        return Err(DecodeError::DataLimitExceeded {
                            len: u32::try_from(data_len).unwrap_or(u32::MAX),
                            max,
                        });
                    }
                    layout.data = Some((pdo, data_len));
                    layout.data_digest = ddgst_flag;
                }
            }
        }
        Ok(layout)
    }
}

const fn invalid(field: HeaderField) -> DecodeError {
    DecodeError::InvalidHeaderField(field)
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
    T::read_from_prefix(buf)
        .map(|(h, _)| h)
        .map_err(|_| invalid(HeaderField::HeaderLength))
}

/// Builds the PDU from a buffer holding all of it; consumes exactly `plen` bytes, except on a fatal
/// error, where the buffer is left untouched.
fn decode_body(buf: &mut BytesMut, layout: &Layout) -> Result<Pdu, DecodeError> {
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
            Pdu::R2t(R2t {
                cccid: h.cccid.get(),
                ttag: h.ttag.get(),
                r2to: h.r2to.get(),
                r2tl: h.r2tl.get(),
            })
        }
        PduType::H2cTermReq | PduType::C2hTermReq => {
            let h: TermReqHeader = header(buf)?;
            let data = take_data(buf, layout).to_bytes();
            let t = TermReq {
                fes: FatalErrorStatus(h.fes.get()),
                fei: h.fei.get(),
                data,
            };
            return Ok(if layout.pdu_type == PduType::H2cTermReq {
                Pdu::H2cTermReq(t)
            } else {
                Pdu::C2hTermReq(t)
            });
        }
        PduType::CapsuleCmd => {
            let h: CapsuleCmdHeader = header(buf)?;
            let ctx = DigestContext {
                pdu_type: layout.pdu_type,
                cccid: h.sqe.cid.get(),
                ttag: 0,
            };
            let data = take_checked_data(buf, layout, ctx)?;
            return Ok(Pdu::CapsuleCmd(CapsuleCmd { sqe: h.sqe, data }));
        }
        PduType::H2cData | PduType::C2hData => {
            let h: DataHeader = header(buf)?;
            let datal = h.datal.get();
            if layout
                .data
                .is_none_or(|(_, len)| Ok(len) != usize::try_from(datal))
            {
                return Err(invalid(HeaderField::DataLength));
            }
            let last = layout.flags & flags::LAST_PDU != 0;
            let (cccid, datao) = (h.cccid.get(), h.datao.get());
            if layout.pdu_type == PduType::H2cData {
                let ttag = h.ttag.get();
                let ctx = DigestContext {
                    pdu_type: layout.pdu_type,
                    cccid,
                    ttag,
                };
                let data = take_checked_data(buf, layout, ctx)?;
                return Ok(Pdu::H2cData(H2cData {
                    cccid,
                    ttag,
                    datao,
                    last,
                    data,
                }));
            }
            let success = layout.flags & flags::SUCCESS != 0;
            let ctx = DigestContext {
                pdu_type: layout.pdu_type,
                cccid,
                ttag: 0,
            };
            let data = take_checked_data(buf, layout, ctx)?;
            return Ok(Pdu::C2hData(C2hData {
                cccid,
                datao,
                last,
                success,
                data,
            }));
        }
    };
    buf.advance(layout.plen);
    Ok(pdu)
}

/// Removes the PDU from the buffer and returns its data as a slice of the buffer's memory.
fn take_data(buf: &mut BytesMut, layout: &Layout) -> Payload {
    let pdu = buf.split_to(layout.plen);
    match layout.data {
        Some((start, len)) if len > 0 => pdu.freeze().slice(start..start + len).into(),
        _ => Payload::new(),
    }
}

#[derive(Clone, Copy)]
struct DigestContext {
    pdu_type: PduType,
    cccid: u16,
    ttag: u16,
}

/// Like [`take_data`], verifying the data digest if there is one. A mismatch still consumes the PDU.
fn take_checked_data(
    buf: &mut BytesMut,
    layout: &Layout,
    ctx: DigestContext,
) -> Result<Payload, DecodeError> {
    let expected = match layout.data {
        Some((start, len)) if layout.data_digest => {
            let computed = crc32c(buf.get(start..start + len).unwrap_or_default());
            Some((computed, read_le32(buf, start + len)))
        }
        _ => None,
    };
    let data = take_data(buf, layout);
    match expected {
        Some((computed, received)) if computed != received => Err(DecodeError::DataDigest {
            pdu_type: ctx.pdu_type,
            cccid: ctx.cccid,
            ttag: ctx.ttag,
            received,
            computed,
        }),
        _ => Ok(data),
    }
}
