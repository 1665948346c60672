//! Command dword decoding for the NVM I/O commands and the admin commands a fabrics target serves
//! (NVM Command Set Specification, "Read", "Write", "Write Zeroes", "Dataset Management"; NVMe Base
//! Specification, "Identify", "Get Log Page", "Get Features", "Set Features", "Abort").
//!
//! These are not new wire structs: each type decodes the command dwords of an [`Sqe`] (`from_sqe`) and
//! writes them back (`apply`, which leaves opcode, CID, NSID and the data pointer alone), so a test
//! initiator can build commands with the same code a target parses them with. Counts that the wire
//! carries 0's based are held 1-based here unless the field name says otherwise.
//!
//! Flush and Asynchronous Event Request have no command-specific fields; Keep Alive neither.

use zerocopy::little_endian::{U16, U32, U64};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

use super::features::{FeatureId, FeatureSelect};
use super::sgl::SglDescriptor;
use super::sqe::{Sqe, SQE_FLAGS_PSDT_SGL};

const fn bit(value: u32, n: u32) -> bool {
    value & (1 << n) != 0
}

const fn flag(value: bool, n: u32) -> u32 {
    (value as u32) << n
}

/// An SQE with the common fields set and PSDT selecting SGLs: the starting point the `to_sqe`
/// builders fill in.
#[must_use]
pub fn new_sqe(opcode: u8, cid: u16, nsid: u32, dptr: SglDescriptor) -> Sqe {
    let mut sqe = Sqe::zeroed();
    sqe.opcode = opcode;
    sqe.flags = SQE_FLAGS_PSDT_SGL;
    sqe.cid = U16::new(cid);
    sqe.nsid = U32::new(nsid);
    sqe.dptr = dptr;
    sqe
}

/// Largest block count one Read/Write/Write Zeroes can carry (NLB is 16 bits, 0's based).
pub const MAX_NLB: u32 = 1 << 16;

/// Read, Write (and Compare, Verify, Write Uncorrectable, which share the layout).
///
/// | dword | bits | field |
/// | --- | --- | --- |
/// | 10 | 31:0 | SLBA bits 31:0 |
/// | 11 | 31:0 | SLBA bits 63:32 |
/// | 12 | 15:0 | NLB: number of logical blocks, 0's based |
/// | 12 | 23:20 | DTYPE: directive type |
/// | 12 | 29:26 | PRINFO: protection information field |
/// | 12 | 30 | FUA: force unit access |
/// | 12 | 31 | LR: limited retry |
/// | 13 | 7:0 | DSM: dataset management hints |
/// | 13 | 31:16 | DSPEC: directive specific |
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct RwCommand {
    /// Starting LBA.
    pub slba: u64,
    /// Number of logical blocks, 1-based (1..=65536).
    pub nlb: u32,
    /// Force unit access.
    pub fua: bool,
    /// Limited retry.
    pub limited_retry: bool,
    /// Protection information field (4 bits).
    pub prinfo: u8,
    /// Directive type (4 bits).
    pub dtype: u8,
    /// Directive specific.
    pub dspec: u16,
    /// Dataset management hints (CDW13 bits 7:0).
    pub dsm: u8,
}

impl RwCommand {
    /// A plain command for `nlb` blocks at `slba`.
    #[must_use]
    pub fn new(slba: u64, nlb: u32) -> Self {
        Self { slba, nlb, ..Self::default() }
    }

    /// Decodes CDW10..=13.
    #[must_use]
    pub fn from_sqe(sqe: &Sqe) -> Self {
        let cdw12 = sqe.cdw12.get();
        let cdw13 = sqe.cdw13.get();
        Self {
            slba: slba(sqe),
            nlb: (cdw12 & 0xffff) + 1,
            fua: bit(cdw12, 30),
            limited_retry: bit(cdw12, 31),
            prinfo: ((cdw12 >> 26) & 0xf) as u8,
            dtype: ((cdw12 >> 20) & 0xf) as u8,
            dspec: (cdw13 >> 16) as u16,
            dsm: cdw13 as u8,
        }
    }

    /// Writes CDW10..=13. `nlb` is clamped to `1..=65536`; 4-bit fields are masked.
    pub fn apply(&self, sqe: &mut Sqe) {
        set_slba(sqe, self.slba);
        sqe.cdw12 = U32::new(
            encode_nlb(self.nlb)
                | ((u32::from(self.dtype) & 0xf) << 20)
                | ((u32::from(self.prinfo) & 0xf) << 26)
                | flag(self.fua, 30)
                | flag(self.limited_retry, 31),
        );
        sqe.cdw13 = U32::new((u32::from(self.dspec) << 16) | u32::from(self.dsm));
    }

    /// A complete SQE for this command (`opcode` is Read, Write, …; `dptr` describes the data).
    #[must_use]
    pub fn to_sqe(&self, opcode: u8, cid: u16, nsid: u32, dptr: SglDescriptor) -> Sqe {
        let mut sqe = new_sqe(opcode, cid, nsid, dptr);
        self.apply(&mut sqe);
        sqe
    }

    /// One past the last LBA, `None` on overflow (which a target reports as *LBA Out of Range*).
    #[must_use]
    pub fn end_lba(&self) -> Option<u64> {
        self.slba.checked_add(u64::from(self.nlb))
    }

    /// Transfer length in bytes for `block_size`-byte logical blocks (metadata excluded).
    #[must_use]
    pub fn len_bytes(&self, block_size: u32) -> u64 {
        u64::from(self.nlb) * u64::from(block_size)
    }
}

fn slba(sqe: &Sqe) -> u64 {
    u64::from(sqe.cdw10.get()) | (u64::from(sqe.cdw11.get()) << 32)
}

fn set_slba(sqe: &mut Sqe, slba: u64) {
    // Low and high halves: truncation is the point.
    sqe.cdw10 = U32::new(slba as u32);
    sqe.cdw11 = U32::new((slba >> 32) as u32);
}

fn encode_nlb(nlb: u32) -> u32 {
    nlb.clamp(1, MAX_NLB) - 1
}

/// Write Zeroes.
///
/// | dword | bits | field |
/// | --- | --- | --- |
/// | 10, 11 | | SLBA |
/// | 12 | 15:0 | NLB, 0's based |
/// | 12 | 25 | DEAC: deallocate |
/// | 12 | 29:26 | PRINFO |
/// | 12 | 30 | FUA |
/// | 12 | 31 | LR |
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct WriteZeroesCommand {
    /// Starting LBA.
    pub slba: u64,
    /// Number of logical blocks, 1-based (1..=65536).
    pub nlb: u32,
    /// Deallocate the blocks if the controller can (reads must still return zeroes).
    pub deallocate: bool,
    /// Force unit access.
    pub fua: bool,
    /// Limited retry.
    pub limited_retry: bool,
    /// Protection information field (4 bits).
    pub prinfo: u8,
}

impl WriteZeroesCommand {
    /// Decodes CDW10..=12.
    #[must_use]
    pub fn from_sqe(sqe: &Sqe) -> Self {
        let cdw12 = sqe.cdw12.get();
        Self {
            slba: slba(sqe),
            nlb: (cdw12 & 0xffff) + 1,
            deallocate: bit(cdw12, 25),
            fua: bit(cdw12, 30),
            limited_retry: bit(cdw12, 31),
            prinfo: ((cdw12 >> 26) & 0xf) as u8,
        }
    }

    /// Writes CDW10..=12. `nlb` is clamped to `1..=65536`.
    pub fn apply(&self, sqe: &mut Sqe) {
        set_slba(sqe, self.slba);
        sqe.cdw12 = U32::new(
            encode_nlb(self.nlb)
                | flag(self.deallocate, 25)
                | ((u32::from(self.prinfo) & 0xf) << 26)
                | flag(self.fua, 30)
                | flag(self.limited_retry, 31),
        );
    }

    /// One past the last LBA, `None` on overflow.
    #[must_use]
    pub fn end_lba(&self) -> Option<u64> {
        self.slba.checked_add(u64::from(self.nlb))
    }
}

/// Most ranges one Dataset Management command carries (NR is 8 bits, 0's based).
pub const DSM_MAX_RANGES: usize = 256;

/// Dataset Management.
///
/// | dword | bits | field |
/// | --- | --- | --- |
/// | 10 | 7:0 | NR: number of ranges, 0's based |
/// | 11 | 0 | IDR: integral dataset for read |
/// | 11 | 1 | IDW: integral dataset for write |
/// | 11 | 2 | AD: deallocate |
///
/// The data (host to controller) is `ranges` × 16-byte [`DsmRange`]s.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct DsmCommand {
    /// Number of ranges, 1-based (1..=256).
    pub ranges: u16,
    /// AD: deallocate the ranges.
    pub deallocate: bool,
    /// IDW: integral dataset for write.
    pub integral_write: bool,
    /// IDR: integral dataset for read.
    pub integral_read: bool,
}

impl DsmCommand {
    /// Decodes CDW10..=11.
    #[must_use]
    pub fn from_sqe(sqe: &Sqe) -> Self {
        let cdw11 = sqe.cdw11.get();
        Self {
            ranges: (sqe.cdw10.get() & 0xff) as u16 + 1,
            deallocate: bit(cdw11, 2),
            integral_write: bit(cdw11, 1),
            integral_read: bit(cdw11, 0),
        }
    }

    /// Writes CDW10..=11. `ranges` is clamped to `1..=256`.
    pub fn apply(&self, sqe: &mut Sqe) {
        let nr = u32::from(self.ranges.clamp(1, 256) - 1);
        sqe.cdw10 = U32::new(nr);
        sqe.cdw11 =
            U32::new(flag(self.integral_read, 0) | flag(self.integral_write, 1) | flag(self.deallocate, 2));
    }

    /// Length of the range list in bytes (`ranges` × 16).
    #[must_use]
    pub fn payload_len(&self) -> usize {
        usize::from(self.ranges) * core::mem::size_of::<DsmRange>()
    }
}

/// One Dataset Management range (16 bytes).
///
/// | bytes | field |
/// | --- | --- |
/// | 0..4 | context attributes |
/// | 4..8 | length in logical blocks (1-based) |
/// | 8..16 | starting LBA |
#[derive(Clone, Copy, Debug, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct DsmRange {
    /// Context attributes.
    pub context_attributes: U32,
    /// Length in logical blocks.
    pub nlb: U32,
    /// Starting LBA.
    pub slba: U64,
}

impl DsmRange {
    /// A range of `nlb` blocks at `slba` with no context attributes.
    #[must_use]
    pub fn new(slba: u64, nlb: u32) -> Self {
        Self { context_attributes: U32::new(0), nlb: U32::new(nlb), slba: U64::new(slba) }
    }
}

/// Why a Dataset Management range list could not be read.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum DsmError {
    /// More ranges than one command can carry.
    #[error("{ranges} ranges requested, at most 256 allowed")]
    TooManyRanges {
        /// Ranges requested.
        ranges: usize,
    },
    /// The payload holds fewer bytes than the ranges need.
    #[error("range list needs {needed} bytes, payload has {got}")]
    PayloadTooShort {
        /// Bytes needed.
        needed: usize,
        /// Bytes present.
        got: usize,
    },
}

/// Reads the first `ranges` (1-based, at most 256) DSM ranges from `payload`, in place. Bytes beyond
/// them are ignored.
pub fn parse_dsm_ranges(payload: &[u8], ranges: usize) -> Result<&[DsmRange], DsmError> {
    if ranges > DSM_MAX_RANGES {
        return Err(DsmError::TooManyRanges { ranges });
    }
    <[DsmRange]>::ref_from_prefix_with_elems(payload, ranges).map(|(list, _)| list).map_err(|_| {
        DsmError::PayloadTooShort { needed: ranges * core::mem::size_of::<DsmRange>(), got: payload.len() }
    })
}

/// Identify.
///
/// | dword | bits | field |
/// | --- | --- | --- |
/// | 10 | 7:0 | CNS: controller or namespace structure |
/// | 10 | 31:16 | CNTID: controller identifier |
/// | 11 | 15:0 | CNS specific identifier (e.g. NVM set, endurance group) |
/// | 11 | 31:24 | CSI: command set identifier |
/// | 14 | 6:0 | UUID index |
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct IdentifyCommand {
    /// Controller or namespace structure to return.
    pub cns: u8,
    /// Controller identifier.
    pub cntid: u16,
    /// CNS-specific identifier.
    pub cns_specific_id: u16,
    /// Command set identifier.
    pub csi: u8,
    /// UUID index (7 bits).
    pub uuid_index: u8,
}

impl IdentifyCommand {
    /// Decodes CDW10, CDW11 and CDW14.
    #[must_use]
    pub fn from_sqe(sqe: &Sqe) -> Self {
        let cdw10 = sqe.cdw10.get();
        let cdw11 = sqe.cdw11.get();
        Self {
            cns: cdw10 as u8,
            cntid: (cdw10 >> 16) as u16,
            cns_specific_id: cdw11 as u16,
            csi: (cdw11 >> 24) as u8,
            uuid_index: (sqe.cdw14.get() & 0x7f) as u8,
        }
    }

    /// The CNS value, if this crate knows it.
    #[must_use]
    pub fn cns_kind(&self) -> Option<super::identify::Cns> {
        super::identify::Cns::from_u8(self.cns)
    }

    /// Writes CDW10, CDW11 and CDW14.
    pub fn apply(&self, sqe: &mut Sqe) {
        sqe.cdw10 = U32::new(u32::from(self.cns) | (u32::from(self.cntid) << 16));
        sqe.cdw11 = U32::new(u32::from(self.cns_specific_id) | (u32::from(self.csi) << 24));
        sqe.cdw14 = U32::new(u32::from(self.uuid_index) & 0x7f);
    }
}

/// Get Log Page.
///
/// | dword | bits | field |
/// | --- | --- | --- |
/// | 10 | 7:0 | LID: log page identifier |
/// | 10 | 14:8 | LSP: log specific parameter (older revisions define bits 11:8 only) |
/// | 10 | 15 | RAE: retain asynchronous event |
/// | 10 | 31:16 | NUMDL: number of dwords, lower half (0's based) |
/// | 11 | 15:0 | NUMDU: number of dwords, upper half |
/// | 11 | 31:16 | LSI: log specific identifier |
/// | 12 | 31:0 | LPOL: log page offset, lower |
/// | 13 | 31:0 | LPOU: log page offset, upper |
/// | 14 | 23 | OT: offset type (set: the offset is an index, not bytes) |
/// | 14 | 31:24 | CSI: command set identifier |
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct GetLogPageCommand {
    /// Log page identifier.
    pub lid: u8,
    /// Log specific parameter (7 bits).
    pub lsp: u8,
    /// Retain asynchronous event: reading the log does not clear the event.
    pub rae: bool,
    /// Number of dwords to return, 0's based (NUMDU:NUMDL).
    pub numd: u32,
    /// Log specific identifier.
    pub lsi: u16,
    /// Log page offset (bytes, or an index when `offset_is_index`).
    pub offset: u64,
    /// OT: the offset is an index into a list of entries.
    pub offset_is_index: bool,
    /// Command set identifier.
    pub csi: u8,
}

impl GetLogPageCommand {
    /// A request for `len` bytes (rounded down to whole dwords, at least one) of log `lid` from byte
    /// `offset`.
    #[must_use]
    pub fn new(lid: u8, offset: u64, len: u64) -> Self {
        let dwords = (len / 4).max(1) - 1;
        Self { lid, numd: u32::try_from(dwords).unwrap_or(u32::MAX), offset, ..Self::default() }
    }

    /// Decodes CDW10..=14.
    #[must_use]
    pub fn from_sqe(sqe: &Sqe) -> Self {
        let cdw10 = sqe.cdw10.get();
        let cdw11 = sqe.cdw11.get();
        let cdw14 = sqe.cdw14.get();
        Self {
            lid: cdw10 as u8,
            lsp: ((cdw10 >> 8) & 0x7f) as u8,
            rae: bit(cdw10, 15),
            numd: (cdw10 >> 16) | ((cdw11 & 0xffff) << 16),
            lsi: (cdw11 >> 16) as u16,
            offset: u64::from(sqe.cdw12.get()) | (u64::from(sqe.cdw13.get()) << 32),
            offset_is_index: bit(cdw14, 23),
            csi: (cdw14 >> 24) as u8,
        }
    }

    /// Writes CDW10..=14.
    pub fn apply(&self, sqe: &mut Sqe) {
        sqe.cdw10 = U32::new(
            u32::from(self.lid)
                | ((u32::from(self.lsp) & 0x7f) << 8)
                | flag(self.rae, 15)
                | ((self.numd & 0xffff) << 16),
        );
        sqe.cdw11 = U32::new((self.numd >> 16) | (u32::from(self.lsi) << 16));
        // Low and high halves of the offset.
        sqe.cdw12 = U32::new(self.offset as u32);
        sqe.cdw13 = U32::new((self.offset >> 32) as u32);
        sqe.cdw14 = U32::new(flag(self.offset_is_index, 23) | (u32::from(self.csi) << 24));
    }

    /// The log page, if this crate knows its identifier.
    #[must_use]
    pub fn log_page(&self) -> Option<super::log::LogPageId> {
        super::log::LogPageId::from_u8(self.lid)
    }

    /// Number of bytes requested: (NUMD + 1) × 4.
    #[must_use]
    pub fn len_bytes(&self) -> u64 {
        (u64::from(self.numd) + 1) * 4
    }
}

/// Get Features.
///
/// | dword | bits | field |
/// | --- | --- | --- |
/// | 10 | 7:0 | FID: feature identifier |
/// | 10 | 10:8 | SEL: select (current, default, saved, supported capabilities) |
/// | 11 | 31:0 | feature specific |
/// | 14 | 6:0 | UUID index |
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct GetFeaturesCommand {
    /// Feature identifier (raw; see [`GetFeaturesCommand::feature`]).
    pub fid: u8,
    /// Which value to return.
    pub select: FeatureSelect,
    /// Feature-specific CDW11.
    pub cdw11: u32,
}

impl GetFeaturesCommand {
    /// Decodes CDW10..=11.
    #[must_use]
    pub fn from_sqe(sqe: &Sqe) -> Self {
        let cdw10 = sqe.cdw10.get();
        Self {
            fid: cdw10 as u8,
            select: FeatureSelect::from_bits(((cdw10 >> 8) & 0x7) as u8),
            cdw11: sqe.cdw11.get(),
        }
    }

    /// Writes CDW10..=11.
    pub fn apply(&self, sqe: &mut Sqe) {
        sqe.cdw10 = U32::new(u32::from(self.fid) | (u32::from(self.select.to_bits()) << 8));
        sqe.cdw11 = U32::new(self.cdw11);
    }

    /// The feature identifier, if this crate names it.
    #[must_use]
    pub fn feature(&self) -> Option<FeatureId> {
        FeatureId::from_u8(self.fid)
    }
}

/// Set Features.
///
/// | dword | bits | field |
/// | --- | --- | --- |
/// | 10 | 7:0 | FID: feature identifier |
/// | 10 | 31 | SV: save across power cycles and resets |
/// | 11 | 31:0 | feature value |
/// | 12..14 | | feature specific |
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct SetFeaturesCommand {
    /// Feature identifier (raw; see [`SetFeaturesCommand::feature`]).
    pub fid: u8,
    /// SV: make the value persistent.
    pub save: bool,
    /// Feature value (CDW11).
    pub value: u32,
}

impl SetFeaturesCommand {
    /// Decodes CDW10..=11.
    #[must_use]
    pub fn from_sqe(sqe: &Sqe) -> Self {
        let cdw10 = sqe.cdw10.get();
        Self { fid: cdw10 as u8, save: bit(cdw10, 31), value: sqe.cdw11.get() }
    }

    /// Writes CDW10..=11.
    pub fn apply(&self, sqe: &mut Sqe) {
        sqe.cdw10 = U32::new(u32::from(self.fid) | flag(self.save, 31));
        sqe.cdw11 = U32::new(self.value);
    }

    /// The feature identifier, if this crate names it.
    #[must_use]
    pub fn feature(&self) -> Option<FeatureId> {
        FeatureId::from_u8(self.fid)
    }
}

/// Abort: CDW10 bits 15:0 SQID, bits 31:16 CID of the command to abort.
///
/// Completion DW0 bit 0 clear means the command was aborted, set means it was not.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct AbortCommand {
    /// Submission queue of the command to abort.
    pub sqid: u16,
    /// Identifier of the command to abort.
    pub cid: u16,
}

impl AbortCommand {
    /// Completion DW0 when the command was not aborted (bit 0 set).
    pub const NOT_ABORTED_DW0: u32 = 1;

    /// Decodes CDW10.
    #[must_use]
    pub fn from_sqe(sqe: &Sqe) -> Self {
        let cdw10 = sqe.cdw10.get();
        Self { sqid: cdw10 as u16, cid: (cdw10 >> 16) as u16 }
    }

    /// Writes CDW10.
    pub fn apply(&self, sqe: &mut Sqe) {
        sqe.cdw10 = U32::new(u32::from(self.sqid) | (u32::from(self.cid) << 16));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nvme::opcode::{AdminOpcode, IoOpcode};
    use core::mem::{offset_of, size_of};

    fn sqe_from(raw: &[u8; 64]) -> Sqe {
        Sqe::read_from_bytes(&raw[..]).unwrap()
    }

    #[test]
    fn read_byte_exact() {
        let mut raw = [0u8; 64];
        raw[0] = 0x02;
        raw[1] = 0x40;
        raw[2..4].copy_from_slice(&5u16.to_le_bytes());
        raw[4..8].copy_from_slice(&1u32.to_le_bytes());
        raw[24..40].copy_from_slice(SglDescriptor::transport(8 * 512).as_bytes());
        raw[40..48].copy_from_slice(&0x0000_0001_0000_0010u64.to_le_bytes()); // SLBA
        raw[48..52].copy_from_slice(&(7u32 | (1 << 30)).to_le_bytes()); // NLB 8, FUA
        let sqe = sqe_from(&raw);
        let rw = RwCommand::from_sqe(&sqe);
        assert_eq!(rw.slba, 0x1_0000_0010);
        assert_eq!(rw.nlb, 8);
        assert!(rw.fua);
        assert!(!rw.limited_retry);
        assert_eq!(rw.len_bytes(512), 4096);
        assert_eq!(rw.end_lba(), Some(0x1_0000_0018));

        let built = RwCommand { fua: true, ..RwCommand::new(0x1_0000_0010, 8) }.to_sqe(
            IoOpcode::Read as u8,
            5,
            1,
            SglDescriptor::transport(4096),
        );
        assert_eq!(built.as_bytes(), &raw[..]);
    }

    #[test]
    fn rw_all_fields_round_trip() {
        let rw = RwCommand {
            slba: u64::MAX - 3,
            nlb: MAX_NLB,
            fua: true,
            limited_retry: true,
            prinfo: 0xa,
            dtype: 0x2,
            dspec: 0xbeef,
            dsm: 0x42,
        };
        let mut sqe = Sqe::zeroed();
        rw.apply(&mut sqe);
        assert_eq!(sqe.cdw12.get(), 0xffff | (0x2 << 20) | (0xa << 26) | (1 << 30) | (1 << 31));
        assert_eq!(sqe.cdw13.get(), 0xbeef_0042);
        assert_eq!(RwCommand::from_sqe(&sqe), rw);
        assert_eq!(rw.end_lba(), None);
        // Out-of-range counts are clamped when encoding.
        RwCommand::new(0, 0).apply(&mut sqe);
        assert_eq!(RwCommand::from_sqe(&sqe).nlb, 1);
        RwCommand::new(0, 70_000).apply(&mut sqe);
        assert_eq!(RwCommand::from_sqe(&sqe).nlb, MAX_NLB);
    }

    #[test]
    fn write_zeroes_bits() {
        let mut raw = [0u8; 64];
        raw[0] = 0x08;
        raw[40..44].copy_from_slice(&100u32.to_le_bytes());
        raw[48..52].copy_from_slice(&(15u32 | (1 << 25)).to_le_bytes());
        let wz = WriteZeroesCommand::from_sqe(&sqe_from(&raw));
        assert_eq!(wz.slba, 100);
        assert_eq!(wz.nlb, 16);
        assert!(wz.deallocate);
        assert!(!wz.fua);
        assert_eq!(wz.end_lba(), Some(116));
        let mut sqe = Sqe::zeroed();
        sqe.opcode = 0x08;
        wz.apply(&mut sqe);
        assert_eq!(sqe.as_bytes(), &raw[..]);
        let all = WriteZeroesCommand { fua: true, limited_retry: true, prinfo: 0xf, ..wz };
        all.apply(&mut sqe);
        assert_eq!(WriteZeroesCommand::from_sqe(&sqe), all);
    }

    #[test]
    fn dsm_command_and_ranges() {
        let mut raw = [0u8; 64];
        raw[0] = 0x09;
        raw[40] = 1; // NR: 2 ranges
        raw[44] = 0b100; // AD
        let dsm = DsmCommand::from_sqe(&sqe_from(&raw));
        assert_eq!(
            dsm,
            DsmCommand { ranges: 2, deallocate: true, integral_write: false, integral_read: false }
        );
        assert_eq!(dsm.payload_len(), 32);
        let mut sqe = Sqe::zeroed();
        sqe.opcode = 0x09;
        dsm.apply(&mut sqe);
        assert_eq!(sqe.as_bytes(), &raw[..]);
        let idrw = DsmCommand { ranges: 256, deallocate: false, integral_write: true, integral_read: true };
        idrw.apply(&mut sqe);
        assert_eq!(sqe.cdw10.get(), 0xff);
        assert_eq!(sqe.cdw11.get(), 0b011);
        assert_eq!(DsmCommand::from_sqe(&sqe), idrw);

        assert_eq!(size_of::<DsmRange>(), 16);
        assert_eq!(offset_of!(DsmRange, nlb), 4);
        assert_eq!(offset_of!(DsmRange, slba), 8);
        let mut payload = Vec::new();
        payload.extend_from_slice(&0u32.to_le_bytes());
        payload.extend_from_slice(&8u32.to_le_bytes());
        payload.extend_from_slice(&0x1000u64.to_le_bytes());
        payload.extend_from_slice(DsmRange::new(0x2000, 16).as_bytes());
        payload.extend_from_slice(&[0xee; 5]); // trailing bytes ignored
        let ranges = parse_dsm_ranges(&payload, 2).unwrap();
        assert_eq!(ranges.len(), 2);
        assert_eq!(ranges[0], DsmRange::new(0x1000, 8));
        assert_eq!(ranges[1].slba.get(), 0x2000);
        assert_eq!(ranges[1].nlb.get(), 16);
        assert_eq!(
            parse_dsm_ranges(&payload[..31], 2),
            Err(DsmError::PayloadTooShort { needed: 32, got: 31 })
        );
        assert_eq!(parse_dsm_ranges(&[], 0).map(<[DsmRange]>::len), Ok(0));
        assert_eq!(parse_dsm_ranges(&[0; 8192], 257), Err(DsmError::TooManyRanges { ranges: 257 }));
        assert_eq!(parse_dsm_ranges(&[0; 4096], 256).map(<[DsmRange]>::len), Ok(256));
        assert!(parse_dsm_ranges(&[0; 4095], 256).is_err());
    }

    #[test]
    fn identify_fields() {
        let mut raw = [0u8; 64];
        raw[0] = 0x06;
        raw[40] = 0x01; // CNS: identify controller
        raw[42..44].copy_from_slice(&0x0042u16.to_le_bytes()); // CNTID
        raw[44..46].copy_from_slice(&0x0007u16.to_le_bytes());
        raw[47] = 0x02; // CSI: zoned
        raw[56] = 0x03; // UUID index
        let id = IdentifyCommand::from_sqe(&sqe_from(&raw));
        assert_eq!(id, IdentifyCommand { cns: 1, cntid: 0x42, cns_specific_id: 7, csi: 2, uuid_index: 3 });
        let mut sqe = Sqe::zeroed();
        sqe.opcode = AdminOpcode::Identify as u8;
        id.apply(&mut sqe);
        assert_eq!(sqe.as_bytes(), &raw[..]);
        let built = new_sqe(AdminOpcode::Identify as u8, 9, 0, SglDescriptor::transport(4096));
        assert_eq!((built.psdt(), built.cid.get()), (1, 9));
    }

    #[test]
    fn get_log_page_fields() {
        // Linux: discovery log, 4 KiB from offset 0x1000, RAE set, LSP 1.
        let mut raw = [0u8; 64];
        raw[0] = 0x02;
        raw[40] = 0x70; // LID
        raw[41] = 0x01 | 0x80; // LSP 1, RAE
        raw[42..44].copy_from_slice(&1023u16.to_le_bytes()); // NUMDL
        raw[44..46].copy_from_slice(&0u16.to_le_bytes()); // NUMDU
        raw[46..48].copy_from_slice(&0x1234u16.to_le_bytes()); // LSI
        raw[48..52].copy_from_slice(&0x1000u32.to_le_bytes()); // LPOL
        raw[52..56].copy_from_slice(&0x1u32.to_le_bytes()); // LPOU
        raw[58] = 0x80; // OT (bit 23)
        raw[59] = 0x00; // CSI
        let glp = GetLogPageCommand::from_sqe(&sqe_from(&raw));
        assert_eq!(glp.lid, 0x70);
        assert_eq!(glp.lsp, 1);
        assert!(glp.rae);
        assert_eq!(glp.numd, 1023);
        assert_eq!(glp.len_bytes(), 4096);
        assert_eq!(glp.lsi, 0x1234);
        assert_eq!(glp.offset, 0x1_0000_1000);
        assert!(glp.offset_is_index);
        let mut sqe = Sqe::zeroed();
        sqe.opcode = 0x02;
        glp.apply(&mut sqe);
        assert_eq!(sqe.as_bytes(), &raw[..]);

        // NUMD spans NUMDU:NUMDL.
        let big =
            GetLogPageCommand { numd: 0x0003_0001, csi: 0x02, lsp: 0x7f, ..GetLogPageCommand::default() };
        big.apply(&mut sqe);
        assert_eq!(sqe.cdw10.get() >> 16, 0x0001);
        assert_eq!(sqe.cdw11.get() & 0xffff, 0x0003);
        assert_eq!(GetLogPageCommand::from_sqe(&sqe), big);
        assert_eq!(GetLogPageCommand { numd: u32::MAX, ..big }.len_bytes(), 1 << 34);
        assert_eq!(GetLogPageCommand::new(0x70, 0, 1024).numd, 255);
        assert_eq!(GetLogPageCommand::new(0x70, 0, 2).numd, 0);
    }

    #[test]
    fn features_and_abort() {
        let mut raw = [0u8; 64];
        raw[0] = 0x09;
        raw[40] = 0x07; // Number of Queues
        raw[43] = 0x80; // SV
        raw[44..48].copy_from_slice(&0x0007_0007u32.to_le_bytes());
        let set = SetFeaturesCommand::from_sqe(&sqe_from(&raw));
        assert_eq!(set, SetFeaturesCommand { fid: 7, save: true, value: 0x0007_0007 });
        assert_eq!(set.feature(), Some(FeatureId::NumberOfQueues));
        let mut sqe = Sqe::zeroed();
        sqe.opcode = 0x09;
        set.apply(&mut sqe);
        assert_eq!(sqe.as_bytes(), &raw[..]);

        let mut raw = [0u8; 64];
        raw[0] = 0x0a;
        raw[40] = 0x0b;
        raw[41] = 0x03; // SEL: supported capabilities
        let get = GetFeaturesCommand::from_sqe(&sqe_from(&raw));
        assert_eq!(get.feature(), Some(FeatureId::AsyncEventConfig));
        assert_eq!(get.select, FeatureSelect::SupportedCapabilities);
        let mut sqe = Sqe::zeroed();
        sqe.opcode = 0x0a;
        get.apply(&mut sqe);
        assert_eq!(sqe.as_bytes(), &raw[..]);

        let mut raw = [0u8; 64];
        raw[0] = 0x08;
        raw[40..42].copy_from_slice(&2u16.to_le_bytes());
        raw[42..44].copy_from_slice(&0x99u16.to_le_bytes());
        let abort = AbortCommand::from_sqe(&sqe_from(&raw));
        assert_eq!(abort, AbortCommand { sqid: 2, cid: 0x99 });
        let mut sqe = Sqe::zeroed();
        sqe.opcode = 0x08;
        abort.apply(&mut sqe);
        assert_eq!(sqe.as_bytes(), &raw[..]);
    }
}
