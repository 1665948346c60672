//! NVMe/TCP PDUs (NVMe/TCP Transport Specification, "PDU Formats").
//!
//! Every PDU starts with the 8-byte common header, followed by a PDU-specific header; together they are
//! HLEN bytes. PDUs other than ICReq/ICResp/TermReq may carry a header digest, and PDUs with data may
//! carry padding (to align data as the receiver's PDA asks) and a data digest:
//!
//! ```text
//! 0      1      2      3      4             8                 HLEN
//! +------+------+------+------+-------------+-- ... ----------+--------+-----+------ ... ---+--------+
//! | type | flags| HLEN | PDO  | PLEN (le32) | PDU-specific hdr | HDGST  | PAD | DATA         | DDGST  |
//! +------+------+------+------+-------------+-- ... ----------+--------+-----+------ ... ---+--------+
//!                                                               0 or 4         starts at PDO  0 or 4
//! |<-------------------------------------------- PLEN ------------------------------------------->|
//! ```

mod decode;
pub mod encode;
pub mod wire;

pub use decode::{BytesChain, DecoderConfig, PduDecoder, PduInput};
pub use encode::{EncodeOptions, EncodedPdu, MAX_HEADER_LEN};

use bytes::Bytes;

use crate::error::{DecodeError, FatalErrorStatus, HeaderField};
use crate::nvme::{Cqe, Sqe};
use crate::payload::Payload;

/// Length of the common header.
pub const COMMON_HEADER_LEN: usize = 8;

/// Largest data an H2CTermReq/C2HTermReq may carry (the header of the PDU in error): PLEN is at most 152.
pub const TERM_REQ_MAX_DATA_LEN: usize = 128;

/// The smallest MAXH2CDATA a controller may announce in ICResp.
pub const MIN_MAXH2CDATA: u32 = 4096;

/// The one PDU Format Version defined (NVMe/TCP 1.0).
pub const PFV_1_0: u16 = 0;

/// Largest PDU data alignment value (HPDA/CPDA, 0's based dwords): 128-byte alignment.
pub const MAX_PDA: u8 = 31;

/// PDU flag bits (common header byte 1).
pub mod flags {
    /// HDGSTF: a header digest follows the header.
    pub const HDGSTF: u8 = 1 << 0;
    /// DDGSTF: a data digest follows the data.
    pub const DDGSTF: u8 = 1 << 1;
    /// LAST_PDU (H2CData, C2HData): last data PDU of the transfer (of the R2T, for H2CData).
    pub const LAST_PDU: u8 = 1 << 2;
    /// SUCCESS (C2HData): the command completed successfully; no CapsuleResp follows.
    pub const SUCCESS: u8 = 1 << 3;
}

/// Which way a PDU travels.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Direction {
    /// Host to controller: ICReq, H2CTermReq, CapsuleCmd, H2CData.
    HostToController,
    /// Controller to host: ICResp, C2HTermReq, CapsuleResp, C2HData, R2T.
    ControllerToHost,
}

/// PDU-Type values.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum PduType {
    /// Initialize Connection Request.
    IcReq = 0x00,
    /// Initialize Connection Response.
    IcResp = 0x01,
    /// Host to Controller Terminate Connection Request.
    H2cTermReq = 0x02,
    /// Controller to Host Terminate Connection Request.
    C2hTermReq = 0x03,
    /// Command Capsule.
    CapsuleCmd = 0x04,
    /// Response Capsule.
    CapsuleResp = 0x05,
    /// Host to Controller Data.
    H2cData = 0x06,
    /// Controller to Host Data.
    C2hData = 0x07,
    /// Ready to Transfer.
    R2t = 0x09,
}

impl PduType {
    /// Decodes a PDU-Type byte.
    #[must_use]
    pub const fn from_u8(v: u8) -> Option<Self> {
        Some(match v {
            0x00 => Self::IcReq,
            0x01 => Self::IcResp,
            0x02 => Self::H2cTermReq,
            0x03 => Self::C2hTermReq,
            0x04 => Self::CapsuleCmd,
            0x05 => Self::CapsuleResp,
            0x06 => Self::H2cData,
            0x07 => Self::C2hData,
            0x09 => Self::R2t,
            _ => return None,
        })
    }

    /// The fixed HLEN of this PDU type.
    #[must_use]
    pub const fn header_len(self) -> u8 {
        match self {
            Self::IcReq | Self::IcResp => 128,
            Self::CapsuleCmd => 72,
            Self::H2cTermReq
            | Self::C2hTermReq
            | Self::CapsuleResp
            | Self::H2cData
            | Self::C2hData
            | Self::R2t => 24,
        }
    }

    /// The direction this type travels in.
    #[must_use]
    pub const fn direction(self) -> Direction {
        match self {
            Self::IcReq | Self::H2cTermReq | Self::CapsuleCmd | Self::H2cData => Direction::HostToController,
            Self::IcResp | Self::C2hTermReq | Self::CapsuleResp | Self::C2hData | Self::R2t => {
                Direction::ControllerToHost
            }
        }
    }

    /// Flag bits defined for this type; any other bit set is an invalid header field.
    #[must_use]
    pub const fn allowed_flags(self) -> u8 {
        match self {
            Self::IcReq | Self::IcResp | Self::H2cTermReq | Self::C2hTermReq => 0,
            Self::CapsuleCmd => flags::HDGSTF | flags::DDGSTF,
            Self::CapsuleResp | Self::R2t => flags::HDGSTF,
            Self::H2cData => flags::HDGSTF | flags::DDGSTF | flags::LAST_PDU,
            Self::C2hData => flags::HDGSTF | flags::DDGSTF | flags::LAST_PDU | flags::SUCCESS,
        }
    }

    /// True for types that carry a header digest when header digests are enabled.
    #[must_use]
    pub const fn has_digests(self) -> bool {
        !matches!(self, Self::IcReq | Self::IcResp | Self::H2cTermReq | Self::C2hTermReq)
    }

    /// True for types whose data starts at PDO and may be protected by a data digest.
    #[must_use]
    pub const fn carries_data(self) -> bool {
        matches!(self, Self::CapsuleCmd | Self::H2cData | Self::C2hData)
    }
}

/// Which digests a connection uses, as negotiated by ICReq/ICResp (DGST byte: bit 0 header, bit 1 data).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Digests {
    /// Header digest (HDGST) enabled.
    pub header: bool,
    /// Data digest (DDGST) enabled.
    pub data: bool,
}

impl Digests {
    /// No digests.
    pub const NONE: Self = Self { header: false, data: false };
    /// Header and data digests.
    pub const BOTH: Self = Self { header: true, data: true };

    /// Decodes the DGST byte of ICReq/ICResp (reserved bits ignored).
    #[must_use]
    pub const fn from_bits(bits: u8) -> Self {
        Self { header: bits & 0x01 != 0, data: bits & 0x02 != 0 }
    }

    /// Encodes the DGST byte.
    #[must_use]
    pub const fn to_bits(self) -> u8 {
        (self.header as u8) | ((self.data as u8) << 1)
    }

    /// The digests both sides want: a digest is used when the host asks for it and the controller
    /// supports it. Note that the Linux host fails the connection unless ICResp grants exactly the
    /// digests it asked for, so a controller should support both.
    #[must_use]
    pub const fn intersect(self, other: Self) -> Self {
        Self { header: self.header && other.header, data: self.data && other.data }
    }
}

/// Alignment in bytes that a PDA value (HPDA/CPDA, 0's based dwords) asks for; values above
/// [`MAX_PDA`] count as [`MAX_PDA`] (128 bytes).
#[must_use]
pub const fn pda_alignment(pda: u8) -> usize {
    let pda = if pda > MAX_PDA { MAX_PDA } else { pda };
    (pda as usize + 1) * 4
}

/// The PDO an encoder gives a data-carrying PDU: header, header digest and the least padding that
/// aligns the data to the receiver's PDA (at most 144, see [`MAX_HEADER_LEN`]; it always fits the
/// PDO byte).
#[must_use]
pub const fn data_offset(pdu_type: PduType, header_digest: bool, pda: u8) -> usize {
    let unaligned = pdu_type.header_len() as usize + if header_digest { 4 } else { 0 };
    let align = pda_alignment(pda);
    unaligned.div_ceil(align) * align
}

/// Initialize Connection Request: the first PDU a host sends.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IcReq {
    /// PDU Format Version (must be [`PFV_1_0`]).
    pub pfv: u16,
    /// Host PDU Data Alignment for controller-to-host data PDUs (0's based dwords, ≤ 31).
    pub hpda: u8,
    /// Digests the host asks for.
    pub digests: Digests,
    /// Maximum number of outstanding R2Ts per command, 0's based.
    pub maxr2t: u32,
}

impl IcReq {
    /// Checks the parameters a controller must understand: PFV and HPDA. Returns the error to terminate
    /// with otherwise.
    pub fn validate(&self) -> Result<(), DecodeError> {
        if self.pfv != PFV_1_0 {
            return Err(DecodeError::UnsupportedParameter(HeaderField::PduFormatVersion));
        }
        if self.hpda > MAX_PDA {
            return Err(DecodeError::InvalidHeaderField(HeaderField::DataAlignment));
        }
        Ok(())
    }
}

/// Initialize Connection Response.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IcResp {
    /// PDU Format Version (must be [`PFV_1_0`]).
    pub pfv: u16,
    /// Controller PDU Data Alignment for host-to-controller data PDUs (0's based dwords, ≤ 31).
    pub cpda: u8,
    /// Digests the connection uses.
    pub digests: Digests,
    /// Maximum data length of one H2CData PDU, in bytes (≥ 4096, a multiple of 4).
    pub maxh2cdata: u32,
}

impl IcResp {
    /// Checks the parameters a host must understand: PFV, CPDA and MAXH2CDATA.
    pub fn validate(&self) -> Result<(), DecodeError> {
        if self.pfv != PFV_1_0 {
            return Err(DecodeError::UnsupportedParameter(HeaderField::PduFormatVersion));
        }
        if self.cpda > MAX_PDA {
            return Err(DecodeError::InvalidHeaderField(HeaderField::DataAlignment));
        }
        if self.maxh2cdata < MIN_MAXH2CDATA || self.maxh2cdata % 4 != 0 {
            return Err(DecodeError::InvalidHeaderField(HeaderField::MaxH2cData));
        }
        Ok(())
    }
}

/// H2CTermReq / C2HTermReq: the sender found a fatal transport error and closes the connection.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TermReq {
    /// Fatal Error Status.
    pub fes: FatalErrorStatus,
    /// Fatal Error Information (e.g. the byte offset of an invalid field).
    pub fei: u32,
    /// The header of the PDU in error (at most [`TERM_REQ_MAX_DATA_LEN`] bytes).
    pub data: Bytes,
}

impl TermReq {
    /// The termination request that reports `err`, given `offending`, the received bytes starting at
    /// the PDU in error (e.g. the receive buffer after a fatal [`crate::PduDecoder::decode`] error).
    /// It quotes the PDU's header: HLEN bytes (per its type, or as received for an unknown type), at
    /// least the common header, at most 128 bytes and no more than was received. `None` if no
    /// termination request is to be sent.
    #[must_use]
    pub fn for_error(err: &DecodeError, offending: &[u8]) -> Option<Self> {
        let fes = err.fatal_status()?;
        let hlen = match (offending.first(), offending.get(2)) {
            (Some(&t), Some(&received_hlen)) => {
                PduType::from_u8(t).map_or(received_hlen, PduType::header_len)
            }
            _ => 0,
        };
        // Clamp to [8, 128], then to what was received (which may be less than 8).
        let quote = usize::from(hlen).clamp(COMMON_HEADER_LEN, TERM_REQ_MAX_DATA_LEN).min(offending.len());
        let data = Bytes::copy_from_slice(offending.get(..quote).unwrap_or(offending));
        Some(Self { fes, fei: err.fei(), data })
    }
}

/// Command capsule: an SQE and optional in-capsule data.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CapsuleCmd {
    /// The submission queue entry.
    pub sqe: Sqe,
    /// In-capsule data (empty if the command's data, if any, moves in data PDUs).
    pub data: Payload,
}

/// Response capsule: a CQE.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CapsuleResp {
    /// The completion queue entry.
    pub cqe: Cqe,
}

/// Host to controller data, sent in answer to an R2T.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct H2cData {
    /// Command capsule CID of the command.
    pub cccid: u16,
    /// Transfer tag from the R2T.
    pub ttag: u16,
    /// Offset of this data within the command's data.
    pub datao: u32,
    /// LAST_PDU: last H2CData of the R2T.
    pub last: bool,
    /// The data (DATAL is its length).
    pub data: Payload,
}

/// Controller to host data (read data).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct C2hData {
    /// Command capsule CID of the command.
    pub cccid: u16,
    /// Offset of this data within the command's data.
    pub datao: u32,
    /// LAST_PDU: last C2HData of the command.
    pub last: bool,
    /// SUCCESS: the command completed successfully and no CapsuleResp follows (requires `last`).
    pub success: bool,
    /// The data (DATAL is its length).
    pub data: Payload,
}

/// Ready to Transfer: the controller asks for `r2tl` bytes of the command's data at `r2to`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct R2t {
    /// Command capsule CID of the command.
    pub cccid: u16,
    /// Transfer tag the host echoes in its H2CData PDUs.
    pub ttag: u16,
    /// Offset of the requested data within the command's data.
    pub r2to: u32,
    /// Length of the requested data.
    pub r2tl: u32,
}

/// A decoded (or to-be-encoded) NVMe/TCP PDU.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Pdu {
    /// ICReq.
    IcReq(IcReq),
    /// ICResp.
    IcResp(IcResp),
    /// H2CTermReq.
    H2cTermReq(TermReq),
    /// C2HTermReq.
    C2hTermReq(TermReq),
    /// CapsuleCmd.
    CapsuleCmd(CapsuleCmd),
    /// CapsuleResp.
    CapsuleResp(CapsuleResp),
    /// H2CData.
    H2cData(H2cData),
    /// C2HData.
    C2hData(C2hData),
    /// R2T.
    R2t(R2t),
}

impl Pdu {
    /// The PDU's type.
    #[must_use]
    pub const fn pdu_type(&self) -> PduType {
        match self {
            Self::IcReq(_) => PduType::IcReq,
            Self::IcResp(_) => PduType::IcResp,
            Self::H2cTermReq(_) => PduType::H2cTermReq,
            Self::C2hTermReq(_) => PduType::C2hTermReq,
            Self::CapsuleCmd(_) => PduType::CapsuleCmd,
            Self::CapsuleResp(_) => PduType::CapsuleResp,
            Self::H2cData(_) => PduType::H2cData,
            Self::C2hData(_) => PduType::C2hData,
            Self::R2t(_) => PduType::R2t,
        }
    }

    /// The data the PDU carries after its header (empty for types without data). For TermReqs this is
    /// the quoted header of the PDU in error.
    #[must_use]
    pub fn data_len(&self) -> usize {
        match self {
            Self::CapsuleCmd(c) => c.data.len(),
            Self::H2cData(d) => d.data.len(),
            Self::C2hData(d) => d.data.len(),
            Self::H2cTermReq(t) | Self::C2hTermReq(t) => t.data.len(),
            Self::IcReq(_) | Self::IcResp(_) | Self::CapsuleResp(_) | Self::R2t(_) => 0,
        }
    }
}
