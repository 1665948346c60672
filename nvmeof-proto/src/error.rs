//! Decode errors: small `Copy` values that carry what a Termination Request needs.

use core::fmt;

use crate::pdu::PduType;

/// Fatal Error Status (FES) of an H2CTermReq / C2HTermReq PDU (NVMe/TCP Transport Specification,
/// "Fatal Error Status Values").
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct FatalErrorStatus(pub u16);

impl FatalErrorStatus {
    /// Invalid PDU Header Field; FEI is the byte offset of the field.
    pub const INVALID_PDU_HEADER_FIELD: Self = Self(0x01);
    /// PDU Sequence Error: a valid PDU arrived when it must not (e.g. H2CData without an R2T).
    pub const PDU_SEQUENCE_ERROR: Self = Self(0x02);
    /// Header Digest Error.
    pub const HEADER_DIGEST_ERROR: Self = Self(0x03);
    /// Data Transfer Out of Range: data offset/length outside the command's transfer.
    pub const DATA_TRANSFER_OUT_OF_RANGE: Self = Self(0x04);
    /// Data Transfer Limit Exceeded (also: R2T limit exceeded).
    pub const DATA_TRANSFER_LIMIT_EXCEEDED: Self = Self(0x05);
    /// Unsupported Parameter (in ICReq/ICResp); FEI is the byte offset of the parameter.
    pub const UNSUPPORTED_PARAMETER: Self = Self(0x06);

    /// The specification's name, if the value is defined.
    #[must_use]
    pub fn name(self) -> Option<&'static str> {
        Some(match self.0 {
            0x01 => "Invalid PDU Header Field",
            0x02 => "PDU Sequence Error",
            0x03 => "Header Digest Error",
            0x04 => "Data Transfer Out of Range",
            0x05 => "Data Transfer Limit Exceeded",
            0x06 => "Unsupported Parameter",
            _ => return None,
        })
    }
}

impl fmt::Debug for FatalErrorStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.name() {
            Some(n) => write!(f, "FatalErrorStatus({:#04x} {n})", self.0),
            None => write!(f, "FatalErrorStatus({:#04x})", self.0),
        }
    }
}

impl fmt::Display for FatalErrorStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.name() {
            Some(n) => f.write_str(n),
            None => write!(f, "fatal error status {:#04x}", self.0),
        }
    }
}

/// A field of a PDU header, named so that an error can say which one is wrong and where it is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum HeaderField {
    /// Common header byte 0: PDU-Type (unknown, or not allowed in this direction).
    PduType,
    /// Common header byte 1: FLAGS.
    Flags,
    /// Common header byte 2: HLEN.
    HeaderLength,
    /// Common header byte 3: PDO.
    DataOffset,
    /// Common header bytes 4..8: PLEN.
    PduLength,
    /// ICReq/ICResp bytes 8..10: PFV.
    PduFormatVersion,
    /// ICReq byte 10 (HPDA) / ICResp byte 10 (CPDA).
    DataAlignment,
    /// ICReq/ICResp byte 11: DGST.
    DigestTypes,
    /// ICResp bytes 12..16: MAXH2CDATA.
    MaxH2cData,
    /// H2CData/C2HData bytes 16..20: DATAL.
    DataLength,
}

impl HeaderField {
    /// Byte offset of the field from the start of the PDU: the FEI of an Invalid PDU Header Field or
    /// Unsupported Parameter termination.
    #[must_use]
    pub const fn offset(self) -> u32 {
        match self {
            Self::PduType => 0,
            Self::Flags => 1,
            Self::HeaderLength => 2,
            Self::DataOffset => 3,
            Self::PduLength => 4,
            Self::PduFormatVersion => 8,
            Self::DataAlignment => 10,
            Self::DigestTypes => 11,
            Self::MaxH2cData => 12,
            Self::DataLength => 16,
        }
    }
}

/// Why a byte stream could not be decoded into a PDU.
///
/// "Not enough bytes yet" is *not* an error: the decoder returns `Ok(None)` for it. Every variant but
/// [`DecodeError::DataDigest`] is fatal to the connection: the receiver sends a termination request with
/// [`DecodeError::fatal_status`] and [`DecodeError::fei`] (none for [`DecodeError::MalformedTermReq`]),
/// then closes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum DecodeError {
    /// A header field has a value the transport specification does not allow here.
    #[error("invalid PDU header field {0:?} (byte {off})", off = .0.offset())]
    InvalidHeaderField(HeaderField),
    /// An ICReq/ICResp parameter this implementation does not support.
    #[error("unsupported connection parameter {0:?} (byte {off})", off = .0.offset())]
    UnsupportedParameter(HeaderField),
    /// The header digest does not match the header.
    #[error("header digest mismatch: received {received:#010x}, computed {computed:#010x}")]
    HeaderDigest {
        /// Digest found in the PDU.
        received: u32,
        /// Digest computed over the received header.
        computed: u32,
    },
    /// A PDU carries more data than the receiver accepts (checked from the header, before any of the
    /// data is buffered).
    #[error("PDU data of {len} bytes exceeds the limit of {max} bytes")]
    DataLimitExceeded {
        /// Data length the header announces.
        len: u32,
        /// The receiver's limit.
        max: u32,
    },
    /// A termination request is itself malformed. The connection ends without a termination request
    /// in reply (NVMe/TCP: invalid termination requests end the connection without reporting an
    /// error).
    #[error("malformed termination request: invalid {0:?}")]
    MalformedTermReq(HeaderField),
    /// The data digest does not match the data. The PDU has been consumed and the stream is still in
    /// sync; the command it belongs to fails with *Transient Transport Error* (a receiver may also
    /// choose to treat this as fatal, as Linux's target does). The fields say which command and which
    /// part of its data, so the receiver can account for the transfer (a C2HData with `success` set
    /// means no response capsule will follow).
    #[error("data digest mismatch in {pdu_type:?} for command {cccid:#06x}: received {received:#010x}, computed {computed:#010x}")]
    DataDigest {
        /// Type of the PDU whose data is corrupt.
        pdu_type: PduType,
        /// Command capsule CID (CapsuleCmd) or CCCID (H2CData/C2HData) the data belongs to.
        cccid: u16,
        /// Transfer tag (H2CData only; zero otherwise).
        ttag: u16,
        /// Data offset within the command's data (H2CData/C2HData; zero for a capsule).
        datao: u32,
        /// Length of the corrupt data.
        datal: u32,
        /// LAST_PDU was set.
        last: bool,
        /// SUCCESS was set (C2HData).
        success: bool,
        /// Digest found in the PDU.
        received: u32,
        /// Digest computed over the received data.
        computed: u32,
    },
}

impl DecodeError {
    /// The Fatal Error Status to put in the termination request, or `None` if none is to be sent
    /// (the error is not fatal, or the offending PDU was itself a termination request).
    #[must_use]
    pub const fn fatal_status(&self) -> Option<FatalErrorStatus> {
        match self {
            Self::InvalidHeaderField(_) => Some(FatalErrorStatus::INVALID_PDU_HEADER_FIELD),
            Self::UnsupportedParameter(_) => Some(FatalErrorStatus::UNSUPPORTED_PARAMETER),
            Self::HeaderDigest { .. } => Some(FatalErrorStatus::HEADER_DIGEST_ERROR),
            Self::DataLimitExceeded { .. } => Some(FatalErrorStatus::DATA_TRANSFER_LIMIT_EXCEEDED),
            Self::MalformedTermReq(_) | Self::DataDigest { .. } => None,
        }
    }

    /// The Fatal Error Information: the byte offset of the offending field for header-field and
    /// parameter errors, zero (reserved) otherwise.
    #[must_use]
    pub const fn fei(&self) -> u32 {
        match self {
            Self::InvalidHeaderField(f) | Self::UnsupportedParameter(f) | Self::MalformedTermReq(f) => {
                f.offset()
            }
            _ => 0,
        }
    }

    /// True if the connection cannot continue after this error.
    #[must_use]
    pub const fn is_fatal(&self) -> bool {
        !matches!(self, Self::DataDigest { .. })
    }
}
