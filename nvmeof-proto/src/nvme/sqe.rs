//! The 64-byte submission queue entry (NVMe Base Specification, "Common Command Format").

use zerocopy::little_endian::{U16, U32, U64};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

use super::sgl::SglDescriptor;

/// A submission queue entry as it travels in a CapsuleCmd PDU: 64 bytes, little endian.
///
/// | bytes | field |
/// | --- | --- |
/// | 0 | opcode |
/// | 1 | flags: FUSE (bits 1:0), PSDT (bits 7:6) |
/// | 2..4 | command identifier (CID) |
/// | 4..8 | namespace identifier (NSID); for Fabrics commands byte 4 is FCTYPE |
/// | 8..16 | command dwords 2 and 3 |
/// | 16..24 | metadata pointer (MPTR) |
/// | 24..40 | data pointer: SGL descriptor 1 |
/// | 40..64 | command dwords 10 to 15 |
///
/// Command-specific views (Connect, Property Get/Set, …) are in [`crate::nvme::fabrics`]; this type
/// gives the common fields and raw dwords.
#[derive(Clone, Copy, Debug, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct Sqe {
    /// Opcode (admin, NVM or Fabrics `0x7f`).
    pub opcode: u8,
    /// FUSE (bits 1:0) and PSDT (bits 7:6).
    pub flags: u8,
    /// Command identifier, echoed in the completion.
    pub cid: U16,
    /// Namespace identifier (for Fabrics commands: byte 0 is the command type).
    pub nsid: U32,
    /// Command dword 2.
    pub cdw2: U32,
    /// Command dword 3.
    pub cdw3: U32,
    /// Metadata pointer.
    pub mptr: U64,
    /// Data pointer: the first SGL descriptor (NVMe/TCP always uses SGLs).
    pub dptr: SglDescriptor,
    /// Command dword 10.
    pub cdw10: U32,
    /// Command dword 11.
    pub cdw11: U32,
    /// Command dword 12.
    pub cdw12: U32,
    /// Command dword 13.
    pub cdw13: U32,
    /// Command dword 14.
    pub cdw14: U32,
    /// Command dword 15.
    pub cdw15: U32,
}

/// Size of an SQE in bytes.
pub const SQE_LEN: usize = 64;

/// PSDT value `01b` in [`Sqe::flags`] bits 7:6: SGLs are used for the data transfer and MPTR holds a
/// metadata buffer address. Every command on an NVMe over Fabrics queue uses SGLs.
pub const SQE_FLAGS_PSDT_SGL: u8 = 0x40;

/// Mask of the PSDT bits in [`Sqe::flags`].
pub const SQE_FLAGS_PSDT_MASK: u8 = 0xc0;

/// Mask of the FUSE bits in [`Sqe::flags`].
pub const SQE_FLAGS_FUSE_MASK: u8 = 0x03;

impl Sqe {
    /// An all-zero SQE.
    #[must_use]
    pub fn zeroed() -> Self {
        <Self as zerocopy::FromZeros>::new_zeroed()
    }

    /// The Fabrics command type (byte 4) — meaningful only when [`Sqe::opcode`] is the Fabrics opcode.
    #[must_use]
    pub fn fctype(&self) -> u8 {
        self.nsid.get().to_le_bytes()[0]
    }

    /// The PSDT field (bits 7:6 of [`Sqe::flags`]).
    #[must_use]
    pub fn psdt(&self) -> u8 {
        (self.flags & SQE_FLAGS_PSDT_MASK) >> 6
    }

    /// The FUSE field (bits 1:0 of [`Sqe::flags`]).
    #[must_use]
    pub fn fuse(&self) -> u8 {
        self.flags & SQE_FLAGS_FUSE_MASK
    }

    /// Command dwords 10..=15 as an array, index 0 being CDW10.
    #[must_use]
    pub fn cdw10_15(&self) -> [u32; 6] {
        [
            self.cdw10.get(),
            self.cdw11.get(),
            self.cdw12.get(),
            self.cdw13.get(),
            self.cdw14.get(),
            self.cdw15.get(),
        ]
    }
}

impl Default for Sqe {
    fn default() -> Self {
        Self::zeroed()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use core::mem::{offset_of, size_of};

    #[test]
    fn layout_matches_spec() {
        assert_eq!(size_of::<Sqe>(), SQE_LEN);
        assert_eq!(offset_of!(Sqe, cid), 2);
        assert_eq!(offset_of!(Sqe, nsid), 4);
        assert_eq!(offset_of!(Sqe, mptr), 16);
        assert_eq!(offset_of!(Sqe, dptr), 24);
        assert_eq!(offset_of!(Sqe, cdw10), 40);
        assert_eq!(offset_of!(Sqe, cdw15), 60);
    }

    #[test]
    fn fields_read_little_endian() {
        let mut raw = [0u8; 64];
        raw[0] = 0x02;
        raw[1] = 0x40;
        raw[2..4].copy_from_slice(&[0x34, 0x12]);
        raw[4..8].copy_from_slice(&[1, 0, 0, 0]);
        raw[40..44].copy_from_slice(&[0x78, 0x56, 0x34, 0x12]);
        let sqe = Sqe::read_from_bytes(&raw[..]).unwrap();
        assert_eq!(sqe.opcode, 2);
        assert_eq!(sqe.psdt(), 1);
        assert_eq!(sqe.cid.get(), 0x1234);
        assert_eq!(sqe.nsid.get(), 1);
        assert_eq!(sqe.fctype(), 1);
        assert_eq!(sqe.cdw10.get(), 0x1234_5678);
        assert_eq!(sqe.as_bytes(), &raw[..]);
    }
}
