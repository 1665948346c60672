//! SGL descriptors as NVMe/TCP uses them (NVMe Base Specification, "Scatter Gather List").
//!
//! NVMe/TCP uses exactly two descriptor kinds in SGL1 of a command:
//! - **Transport SGL Data Block** (`type 0x5`, subtype `0xA`): the data is transferred in separate
//!   H2CData / C2HData PDUs; address is zero, length is the transfer length. A zero length means no data.
//! - **Data Block, Offset** (`type 0x0`, subtype `0x1`): the data is in the command capsule itself
//!   (in-capsule data), at `address` bytes from the start of the capsule's data.

use zerocopy::little_endian::{U32, U64};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

/// SGL descriptor type: Data Block.
pub const SGL_TYPE_DATA_BLOCK: u8 = 0x0;
/// SGL descriptor type: Transport SGL Data Block.
pub const SGL_TYPE_TRANSPORT_DATA_BLOCK: u8 = 0x5;
/// SGL descriptor subtype: address is an offset (in-capsule data).
pub const SGL_SUBTYPE_OFFSET: u8 = 0x1;
/// SGL descriptor subtype: transport specific (NVMe/TCP: "Transport A").
pub const SGL_SUBTYPE_TRANSPORT: u8 = 0xA;

/// A 16-byte SGL descriptor.
///
/// | bytes | field |
/// | --- | --- |
/// | 0..8 | address (or offset for in-capsule data) |
/// | 8..12 | length |
/// | 12..15 | reserved |
/// | 15 | SGL identifier: type (bits 7:4), subtype (bits 3:0) |
#[derive(Clone, Copy, Debug, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct SglDescriptor {
    /// Address, or offset into the capsule's data for in-capsule data.
    pub address: U64,
    /// Length in bytes.
    pub length: U32,
    /// Reserved.
    pub reserved: [u8; 3],
    /// Type (bits 7:4) and subtype (bits 3:0).
    pub identifier: u8,
}

/// What an SGL descriptor in a command capsule says about where the command's data travels.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DataLocation {
    /// No data transfer (Transport SGL Data Block of length zero).
    None,
    /// `length` bytes in separate data PDUs (R2T/H2CData for writes, C2HData for reads).
    Transport {
        /// Transfer length in bytes.
        length: u32,
    },
    /// `length` bytes in the capsule, starting `offset` bytes into its data.
    InCapsule {
        /// Offset from the start of the in-capsule data.
        offset: u64,
        /// Length in bytes.
        length: u32,
    },
}

impl SglDescriptor {
    /// A Transport SGL Data Block descriptor for `length` bytes moved by data PDUs
    /// (length zero: no data).
    #[must_use]
    pub fn transport(length: u32) -> Self {
        Self {
            address: U64::new(0),
            length: U32::new(length),
            reserved: [0; 3],
            identifier: (SGL_TYPE_TRANSPORT_DATA_BLOCK << 4) | SGL_SUBTYPE_TRANSPORT,
        }
    }

    /// A Data Block (offset) descriptor for `length` bytes of in-capsule data at `offset`.
    #[must_use]
    pub fn in_capsule(offset: u64, length: u32) -> Self {
        Self {
            address: U64::new(offset),
            length: U32::new(length),
            reserved: [0; 3],
            identifier: (SGL_TYPE_DATA_BLOCK << 4) | SGL_SUBTYPE_OFFSET,
        }
    }

    /// Descriptor type (bits 7:4 of the identifier).
    #[must_use]
    pub fn sgl_type(&self) -> u8 {
        self.identifier >> 4
    }

    /// Descriptor subtype (bits 3:0 of the identifier).
    #[must_use]
    pub fn subtype(&self) -> u8 {
        self.identifier & 0x0f
    }

    /// Interprets the descriptor as NVMe/TCP defines it; `None` for any other descriptor kind, which a
    /// target answers with *SGL Descriptor Type Invalid* (or *Invalid SGL Last Segment Descriptor*).
    #[must_use]
    pub fn data_location(&self) -> Option<DataLocation> {
        match (self.sgl_type(), self.subtype()) {
            (SGL_TYPE_TRANSPORT_DATA_BLOCK, SGL_SUBTYPE_TRANSPORT) => match self.length.get() {
                0 => Some(DataLocation::None),
                length => Some(DataLocation::Transport { length }),
            },
            (SGL_TYPE_DATA_BLOCK, SGL_SUBTYPE_OFFSET) => {
                Some(DataLocation::InCapsule { offset: self.address.get(), length: self.length.get() })
            }
            _ => None,
        }
    }
}

impl Default for SglDescriptor {
    fn default() -> Self {
        Self::transport(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identifiers_match_what_linux_sends() {
        // Linux host: transport SGL is (0x5 << 4) | 0xA, in-capsule is (0x0 << 4) | 0x1.
        assert_eq!(SglDescriptor::transport(4096).identifier, 0x5a);
        assert_eq!(SglDescriptor::in_capsule(0, 512).identifier, 0x01);
        assert_eq!(core::mem::size_of::<SglDescriptor>(), 16);
    }

    #[test]
    fn byte_exact_transport_descriptor() {
        let d = SglDescriptor::transport(0x2000);
        assert_eq!(d.as_bytes(), &[0, 0, 0, 0, 0, 0, 0, 0, 0x00, 0x20, 0, 0, 0, 0, 0, 0x5a]);
        assert_eq!(d.data_location(), Some(DataLocation::Transport { length: 0x2000 }));
        assert_eq!(SglDescriptor::transport(0).data_location(), Some(DataLocation::None));
    }

    #[test]
    fn unknown_descriptor_kinds_are_rejected() {
        let mut d = SglDescriptor::transport(1);
        d.identifier = 0x20; // segment descriptor
        assert_eq!(d.data_location(), None);
    }
}
