//! Byte layouts of the PDU headers, as `zerocopy` structs of little-endian fields.
//!
//! These are the exact wire formats; [`super::Pdu`] is the decoded, validated form.

use zerocopy::little_endian::{U16, U32};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

use crate::nvme::{Cqe, Sqe};

/// The 8-byte common header of every PDU.
#[derive(Clone, Copy, Debug, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct CommonHeader {
    /// PDU-Type.
    pub pdu_type: u8,
    /// Flags (see [`super::flags`]).
    pub flags: u8,
    /// Header length (common + PDU-specific header, without digest).
    pub hlen: u8,
    /// PDU data offset (0 when the PDU has no data).
    pub pdo: u8,
    /// Total PDU length including header, digests, padding and data.
    pub plen: U32,
}

/// ICReq (HLEN = PLEN = 128).
#[derive(Clone, Copy, Debug, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct IcReqHeader {
    /// Common header.
    pub ch: CommonHeader,
    /// PDU Format Version (bytes 8..10).
    pub pfv: U16,
    /// Host PDU Data Alignment (byte 10).
    pub hpda: u8,
    /// Digest types enabled (byte 11).
    pub dgst: u8,
    /// Maximum outstanding R2Ts per command, 0's based (bytes 12..16).
    pub maxr2t: U32,
    /// Reserved (bytes 16..128).
    pub reserved: [u8; 112],
}

/// ICResp (HLEN = PLEN = 128).
#[derive(Clone, Copy, Debug, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct IcRespHeader {
    /// Common header.
    pub ch: CommonHeader,
    /// PDU Format Version (bytes 8..10).
    pub pfv: U16,
    /// Controller PDU Data Alignment (byte 10).
    pub cpda: u8,
    /// Digest types enabled (byte 11).
    pub dgst: u8,
    /// Maximum H2CData data length (bytes 12..16).
    pub maxh2cdata: U32,
    /// Reserved (bytes 16..128).
    pub reserved: [u8; 112],
}

/// H2CTermReq / C2HTermReq (HLEN = 24; the PDU in error's header follows).
#[derive(Clone, Copy, Debug, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct TermReqHeader {
    /// Common header.
    pub ch: CommonHeader,
    /// Fatal Error Status (bytes 8..10).
    pub fes: U16,
    /// Fatal Error Information (bytes 10..14).
    pub fei: U32,
    /// Reserved (bytes 14..24).
    pub reserved: [u8; 10],
}

/// CapsuleCmd (HLEN = 72).
#[derive(Clone, Copy, Debug, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct CapsuleCmdHeader {
    /// Common header.
    pub ch: CommonHeader,
    /// Submission queue entry (bytes 8..72).
    pub sqe: Sqe,
}

/// CapsuleResp (HLEN = 24).
#[derive(Clone, Copy, Debug, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct CapsuleRespHeader {
    /// Common header.
    pub ch: CommonHeader,
    /// Completion queue entry (bytes 8..24).
    pub cqe: Cqe,
}

/// H2CData / C2HData (HLEN = 24). In C2HData the TTAG field is reserved.
#[derive(Clone, Copy, Debug, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct DataHeader {
    /// Common header.
    pub ch: CommonHeader,
    /// Command capsule CID (bytes 8..10).
    pub cccid: U16,
    /// Transfer tag (bytes 10..12; reserved in C2HData).
    pub ttag: U16,
    /// Data offset (bytes 12..16).
    pub datao: U32,
    /// Data length (bytes 16..20).
    pub datal: U32,
    /// Reserved (bytes 20..24).
    pub reserved: [u8; 4],
}

/// R2T (HLEN = 24).
#[derive(Clone, Copy, Debug, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct R2tHeader {
    /// Common header.
    pub ch: CommonHeader,
    /// Command capsule CID (bytes 8..10).
    pub cccid: U16,
    /// Transfer tag (bytes 10..12).
    pub ttag: U16,
    /// R2T offset (bytes 12..16).
    pub r2to: U32,
    /// R2T length (bytes 16..20).
    pub r2tl: U32,
    /// Reserved (bytes 20..24).
    pub reserved: [u8; 4],
}

#[cfg(test)]
mod tests {
    use super::*;
    use core::mem::{offset_of, size_of};

    #[test]
    fn sizes_are_the_fixed_hlens() {
        assert_eq!(size_of::<CommonHeader>(), 8);
        assert_eq!(size_of::<IcReqHeader>(), 128);
        assert_eq!(size_of::<IcRespHeader>(), 128);
        assert_eq!(size_of::<TermReqHeader>(), 24);
        assert_eq!(size_of::<CapsuleCmdHeader>(), 72);
        assert_eq!(size_of::<CapsuleRespHeader>(), 24);
        assert_eq!(size_of::<DataHeader>(), 24);
        assert_eq!(size_of::<R2tHeader>(), 24);
    }

    #[test]
    fn field_offsets_match_the_spec() {
        assert_eq!(offset_of!(CommonHeader, plen), 4);
        assert_eq!(offset_of!(IcReqHeader, pfv), 8);
        assert_eq!(offset_of!(IcReqHeader, hpda), 10);
        assert_eq!(offset_of!(IcReqHeader, dgst), 11);
        assert_eq!(offset_of!(IcReqHeader, maxr2t), 12);
        assert_eq!(offset_of!(IcRespHeader, maxh2cdata), 12);
        assert_eq!(offset_of!(TermReqHeader, fes), 8);
        assert_eq!(offset_of!(TermReqHeader, fei), 10);
        assert_eq!(offset_of!(DataHeader, cccid), 8);
        assert_eq!(offset_of!(DataHeader, ttag), 10);
        assert_eq!(offset_of!(DataHeader, datao), 12);
        assert_eq!(offset_of!(DataHeader, datal), 16);
        assert_eq!(offset_of!(R2tHeader, r2to), 12);
        assert_eq!(offset_of!(R2tHeader, r2tl), 16);
    }
}
