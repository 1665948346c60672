//! The 16-byte completion queue entry.

use zerocopy::little_endian::{U16, U32};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

use super::status::Status;

/// A completion queue entry as it travels in a CapsuleResp PDU: 16 bytes, little endian.
///
/// | bytes | field |
/// | --- | --- |
/// | 0..4 | dword 0: command specific (Connect: CNTLID; Property Get: value low) |
/// | 4..8 | dword 1: command specific (Property Get: value high) |
/// | 8..10 | SQ head pointer (SQHD) |
/// | 10..12 | SQ identifier |
/// | 12..14 | command identifier |
/// | 14..16 | phase tag (bit 0, always 0 on fabrics) and status field (bits 15:1) |
#[derive(Clone, Copy, Debug, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct Cqe {
    /// Command-specific dword 0.
    pub dw0: U32,
    /// Command-specific dword 1.
    pub dw1: U32,
    /// Submission queue head pointer.
    pub sqhd: U16,
    /// Submission queue identifier.
    pub sqid: U16,
    /// Identifier of the command this completes.
    pub cid: U16,
    /// Phase tag (bit 0) and status field (bits 15:1).
    pub status: U16,
}

/// Size of a CQE in bytes.
pub const CQE_LEN: usize = 16;

impl Cqe {
    /// A completion for `cid` with `status` and a zero result.
    #[must_use]
    pub fn new(cid: u16, sqid: u16, sqhd: u16, status: Status) -> Self {
        Self {
            dw0: U32::new(0),
            dw1: U32::new(0),
            sqhd: U16::new(sqhd),
            sqid: U16::new(sqid),
            cid: U16::new(cid),
            status: U16::new(status.to_field() << 1),
        }
    }

    /// The completion status (phase tag stripped).
    #[must_use]
    pub fn status(&self) -> Status {
        Status::from_field(self.status.get() >> 1)
    }

    /// The 64-bit result formed by dwords 0 and 1 (Property Get).
    #[must_use]
    pub fn result_u64(&self) -> u64 {
        u64::from(self.dw0.get()) | (u64::from(self.dw1.get()) << 32)
    }

    /// Sets dwords 0 and 1 from a 64-bit result.
    pub fn set_result_u64(&mut self, value: u64) {
        // Truncation is the point: low and high halves.
        self.dw0 = U32::new(value as u32);
        self.dw1 = U32::new((value >> 32) as u32);
    }
}

impl Default for Cqe {
    fn default() -> Self {
        <Self as zerocopy::FromZeros>::new_zeroed()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use core::mem::{offset_of, size_of};

    #[test]
    fn layout_matches_spec() {
        assert_eq!(size_of::<Cqe>(), CQE_LEN);
        assert_eq!(offset_of!(Cqe, sqhd), 8);
        assert_eq!(offset_of!(Cqe, sqid), 10);
        assert_eq!(offset_of!(Cqe, cid), 12);
        assert_eq!(offset_of!(Cqe, status), 14);
    }

    #[test]
    fn result_u64_round_trips() {
        let mut cqe = Cqe::default();
        cqe.set_result_u64(0x1122_3344_5566_7788);
        assert_eq!(cqe.dw0.get(), 0x5566_7788);
        assert_eq!(cqe.dw1.get(), 0x1122_3344);
        assert_eq!(cqe.result_u64(), 0x1122_3344_5566_7788);
    }
}
