//! Identify data structures (NVMe Base Specification, "Identify command" and its CNS values; NVM
//! Command Set Specification, "Identify Namespace data structure"; NVMe over Fabrics attributes of the
//! Identify Controller data structure).
//!
//! Every Identify answer is a 4096-byte data transfer ([`IDENTIFY_DATA_LEN`]). This module holds:
//!
//! - [`Cns`]: which structure a command asks for (the command dwords: [`super::nvm::IdentifyCommand`]);
//! - [`IdentifyController`] (CNS 01h) with its [`PowerStateDescriptor`]s and the capability bit constants
//!   (`ONCS_*`, `SGLS_*`, `OAES_*`, …);
//! - [`IdentifyNamespace`] (CNS 00h) with its [`LbaFormat`]s;
//! - [`NamespaceIdList`] (CNS 02h/07h/10h/1Ah, also the Changed Namespace List log page);
//! - the Namespace Identification Descriptor list (CNS 03h): [`NsIdDescriptor`],
//!   [`write_ns_id_descriptors`], [`parse_ns_id_descriptors`];
//! - string helpers for the fixed-width text fields: [`fill_space_padded`] (ASCII fields such as SN, MN,
//!   FR: left justified, padded with spaces), [`fill_nul_padded`] (NQNs: UTF-8, NUL terminated and
//!   NUL padded) and [`field_str`] to read either back.
//!
//! Offsets follow the NVMe Base Specification 2.0 and were checked against Linux's `struct nvme_id_ctrl`
//! / `struct nvme_id_ns` (`include/linux/nvme.h`) and libnvme's `types.h`, which also names the 2.0
//! fields the kernel header still calls reserved (PELS, DOMAINID, MEGCAP, MAXDNA, MAXCNA, OCFS, …).

use std::collections::BTreeSet;

use zerocopy::little_endian::{U128, U16, U32, U64};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

/// Size of every Identify data structure in bytes.
pub const IDENTIFY_DATA_LEN: usize = 4096;

/// Longest NVMe Qualified Name in bytes (the 256-byte NQN fields hold at most 223 bytes plus a NUL).
pub use super::fabrics::NQN_MAX_LEN;

/// The broadcast namespace identifier (`FFFFFFFFh`): never an active namespace.
pub const NSID_BROADCAST: u32 = 0xffff_ffff;

// ---------------------------------------------------------------------------------------------------
// CNS
// ---------------------------------------------------------------------------------------------------

/// Controller or Namespace Structure (CNS, Identify CDW10 bits 7:0): which data structure an Identify
/// command returns.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
#[repr(u8)]
pub enum Cns {
    /// `00h`: Identify Namespace data structure for the NSID (NVM command set).
    Namespace = 0x00,
    /// `01h`: Identify Controller data structure.
    Controller = 0x01,
    /// `02h`: Active Namespace ID list (NSIDs greater than the command's NSID).
    ActiveNamespaceList = 0x02,
    /// `03h`: Namespace Identification Descriptor list for the NSID.
    NamespaceIdDescriptors = 0x03,
    /// `04h`: NVM Set List.
    NvmSetList = 0x04,
    /// `05h`: I/O Command Set specific Identify Namespace data structure (selected by CSI).
    IoCommandSetNamespace = 0x05,
    /// `06h`: I/O Command Set specific Identify Controller data structure (selected by CSI).
    IoCommandSetController = 0x06,
    /// `07h`: Active Namespace ID list of the namespaces using the I/O Command Set given by CSI.
    IoCommandSetActiveNamespaceList = 0x07,
    /// `08h`: I/O Command Set Independent Identify Namespace data structure.
    IndependentNamespace = 0x08,
    /// `10h`: Allocated Namespace ID list.
    AllocatedNamespaceList = 0x10,
    /// `11h`: Identify Namespace data structure for an allocated NSID.
    AllocatedNamespace = 0x11,
    /// `12h`: list of controllers attached to the NSID.
    NamespaceAttachedControllerList = 0x12,
    /// `13h`: list of controllers in the NVM subsystem.
    ControllerList = 0x13,
    /// `14h`: Primary Controller Capabilities.
    PrimaryControllerCapabilities = 0x14,
    /// `15h`: Secondary Controller list.
    SecondaryControllerList = 0x15,
    /// `16h`: Namespace Granularity List.
    NamespaceGranularityList = 0x16,
    /// `17h`: UUID List.
    UuidList = 0x17,
    /// `18h`: Domain List.
    DomainList = 0x18,
    /// `19h`: Endurance Group List.
    EnduranceGroupList = 0x19,
    /// `1Ah`: I/O Command Set specific Allocated Namespace ID list.
    IoCommandSetAllocatedNamespaceList = 0x1a,
    /// `1Bh`: I/O Command Set specific Identify Namespace data structure for an allocated NSID.
    IoCommandSetAllocatedNamespace = 0x1b,
    /// `1Ch`: Identify I/O Command Set data structure (the I/O Command Set combinations).
    IoCommandSet = 0x1c,
}

impl Cns {
    /// Decodes a CNS value; `None` for values this crate does not know (reserved or newer).
    #[must_use]
    pub const fn from_u8(value: u8) -> Option<Self> {
        Some(match value {
            0x00 => Self::Namespace,
            0x01 => Self::Controller,
            0x02 => Self::ActiveNamespaceList,
            0x03 => Self::NamespaceIdDescriptors,
            0x04 => Self::NvmSetList,
            0x05 => Self::IoCommandSetNamespace,
            0x06 => Self::IoCommandSetController,
            0x07 => Self::IoCommandSetActiveNamespaceList,
            0x08 => Self::IndependentNamespace,
            0x10 => Self::AllocatedNamespaceList,
            0x11 => Self::AllocatedNamespace,
            0x12 => Self::NamespaceAttachedControllerList,
            0x13 => Self::ControllerList,
            0x14 => Self::PrimaryControllerCapabilities,
            0x15 => Self::SecondaryControllerList,
            0x16 => Self::NamespaceGranularityList,
            0x17 => Self::UuidList,
            0x18 => Self::DomainList,
            0x19 => Self::EnduranceGroupList,
            0x1a => Self::IoCommandSetAllocatedNamespaceList,
            0x1b => Self::IoCommandSetAllocatedNamespace,
            0x1c => Self::IoCommandSet,
            _ => return None,
        })
    }

    /// The wire value.
    #[must_use]
    pub const fn as_u8(self) -> u8 {
        self as u8
    }

    /// A human-readable name, as the specification words it.
    #[must_use]
    pub const fn name(self) -> &'static str {
        match self {
            Self::Namespace => "Identify Namespace",
            Self::Controller => "Identify Controller",
            Self::ActiveNamespaceList => "Active Namespace ID list",
            Self::NamespaceIdDescriptors => "Namespace Identification Descriptor list",
            Self::NvmSetList => "NVM Set List",
            Self::IoCommandSetNamespace => "I/O Command Set specific Identify Namespace",
            Self::IoCommandSetController => "I/O Command Set specific Identify Controller",
            Self::IoCommandSetActiveNamespaceList => "I/O Command Set specific Active Namespace ID list",
            Self::IndependentNamespace => "I/O Command Set Independent Identify Namespace",
            Self::AllocatedNamespaceList => "Allocated Namespace ID list",
            Self::AllocatedNamespace => "Identify Namespace for an Allocated Namespace ID",
            Self::NamespaceAttachedControllerList => "Namespace Attached Controller list",
            Self::ControllerList => "Controller list",
            Self::PrimaryControllerCapabilities => "Primary Controller Capabilities",
            Self::SecondaryControllerList => "Secondary Controller list",
            Self::NamespaceGranularityList => "Namespace Granularity List",
            Self::UuidList => "UUID List",
            Self::DomainList => "Domain List",
            Self::EnduranceGroupList => "Endurance Group List",
            Self::IoCommandSetAllocatedNamespaceList => {
                "I/O Command Set specific Allocated Namespace ID list"
            }
            Self::IoCommandSetAllocatedNamespace => {
                "I/O Command Set specific Identify Namespace for an Allocated Namespace ID"
            }
            Self::IoCommandSet => "Identify I/O Command Set data structure",
        }
    }
}

/// Command Set Identifier (CSI) of the NVM Command Set.
pub const CSI_NVM: u8 = 0x00;
/// Command Set Identifier (CSI) of the Key Value Command Set.
pub const CSI_KV: u8 = 0x01;
/// Command Set Identifier (CSI) of the Zoned Namespace Command Set.
pub const CSI_ZNS: u8 = 0x02;

// ---------------------------------------------------------------------------------------------------
// Text fields
// ---------------------------------------------------------------------------------------------------

/// Why a string does not fit a fixed-width text field.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum StringFieldError {
    /// The string is longer than the field allows.
    #[error("string of {len} bytes does not fit a field holding at most {max} bytes")]
    TooLong {
        /// Length of the rejected string in bytes.
        len: usize,
        /// Longest string the field holds.
        max: usize,
    },
    /// An ASCII field got a byte outside printable ASCII (`20h..=7Eh`).
    #[error("string has a byte outside printable ASCII (0x20..=0x7e)")]
    NotPrintableAscii,
    /// A NUL-terminated field got a string containing NUL.
    #[error("string contains a NUL byte")]
    ContainsNul,
}

/// Writes `value` into an ASCII string field: left justified and padded with spaces (`20h`), as the
/// NVMe Base Specification ("ASCII string" convention) requires of SN, MN, FR, and of the discovery log
/// entry's TRADDR and TRSVCID.
///
/// `value` must be printable ASCII and at most `field.len()` bytes (no terminator is needed). On error
/// the field is left unchanged.
pub fn fill_space_padded(field: &mut [u8], value: &str) -> Result<(), StringFieldError> {
    let bytes = value.as_bytes();
    if bytes.len() > field.len() {
        return Err(StringFieldError::TooLong { len: bytes.len(), max: field.len() });
    }
    if !bytes.iter().all(|b| (0x20..=0x7e).contains(b)) {
        return Err(StringFieldError::NotPrintableAscii);
    }
    let padded = bytes.iter().copied().chain(core::iter::repeat(b' '));
    for (dst, src) in field.iter_mut().zip(padded) {
        *dst = src;
    }
    Ok(())
}

/// Writes `value` into a NUL-terminated field (NQNs: UTF-8, terminated and padded with NUL bytes).
///
/// `value` must be at most `field.len() - 1` bytes, so that a terminator always remains, and contain no
/// NUL. NQN fields further limit an NQN to [`NQN_MAX_LEN`] bytes; the NQN setters of this module check
/// that. On error the field is left unchanged.
pub fn fill_nul_padded(field: &mut [u8], value: &str) -> Result<(), StringFieldError> {
    let bytes = value.as_bytes();
    let max = field.len().saturating_sub(1);
    if bytes.len() > max {
        return Err(StringFieldError::TooLong { len: bytes.len(), max });
    }
    if bytes.contains(&0) {
        return Err(StringFieldError::ContainsNul);
    }
    let padded = bytes.iter().copied().chain(core::iter::repeat(0));
    for (dst, src) in field.iter_mut().zip(padded) {
        *dst = src;
    }
    Ok(())
}

/// Writes an NQN into a 256-byte NQN field (at most [`NQN_MAX_LEN`] bytes, NUL padded).
pub fn fill_nqn(field: &mut [u8], nqn: &str) -> Result<(), StringFieldError> {
    if nqn.len() > NQN_MAX_LEN {
        return Err(StringFieldError::TooLong { len: nqn.len(), max: NQN_MAX_LEN });
    }
    fill_nul_padded(field, nqn)
}

/// The text of a fixed-width string field, whichever padding the writer used: the bytes before the
/// first NUL, with trailing spaces removed. `None` if that is not UTF-8.
///
/// This accepts both space-padded fields (the specification's ASCII strings; SPDK) and NUL-padded ones
/// (Linux nvmet writes TRADDR/TRSVCID NUL padded).
#[must_use]
pub fn field_str(field: &[u8]) -> Option<&str> {
    let end = field.iter().position(|&b| b == 0).unwrap_or(field.len());
    let text = field.get(..end)?;
    let trimmed_len = text.iter().rposition(|&b| b != b' ').map_or(0, |i| i + 1);
    core::str::from_utf8(text.get(..trimmed_len)?).ok()
}

/// The NVMe version value of VER (Identify Controller) and the VS property: major in bits 31:16, minor
/// in 15:8, tertiary in 7:0. `version(2, 0, 0)` is NVMe 2.0.
#[must_use]
pub const fn version(major: u16, minor: u8, tertiary: u8) -> u32 {
    ((major as u32) << 16) | ((minor as u32) << 8) | tertiary as u32
}

// ---------------------------------------------------------------------------------------------------
// Identify Controller
// ---------------------------------------------------------------------------------------------------

/// CMIC bit 0: the NVM subsystem may have more than one port.
pub const CMIC_MULTI_PORT: u8 = 1 << 0;
/// CMIC bit 1: the NVM subsystem may have more than one controller.
pub const CMIC_MULTI_CONTROLLER: u8 = 1 << 1;
/// CMIC bit 2: the controller is an SR-IOV virtual function.
pub const CMIC_SRIOV: u8 = 1 << 2;
/// CMIC bit 3: Asymmetric Namespace Access reporting supported.
pub const CMIC_ANA: u8 = 1 << 3;

/// OAES bit 8: Namespace Attribute Notices (namespace inventory changed) supported.
pub const OAES_NS_ATTRIBUTE: u32 = 1 << 8;
/// OAES bit 9: Firmware Activation Notices supported.
pub const OAES_FW_ACTIVATION: u32 = 1 << 9;
/// OAES bit 10: Telemetry Log Notices supported.
pub const OAES_TELEMETRY_LOG: u32 = 1 << 10;
/// OAES bit 11: Asymmetric Namespace Access Change Notices supported.
pub const OAES_ANA_CHANGE: u32 = 1 << 11;
/// OAES bit 31: Discovery Log Page Change Notification supported (discovery controllers).
pub const OAES_DISCOVERY_CHANGE: u32 = 1 << 31;

/// CTRATT bit 0: 128-bit Host Identifier supported (required for NVMe over Fabrics).
pub const CTRATT_HOST_ID_128: u32 = 1 << 0;
/// CTRATT bit 1: Non-Operational Power State Permissive Mode.
pub const CTRATT_NON_OP_PERMISSIVE: u32 = 1 << 1;
/// CTRATT bit 2: NVM Sets.
pub const CTRATT_NVM_SETS: u32 = 1 << 2;
/// CTRATT bit 3: Read Recovery Levels.
pub const CTRATT_READ_RECOVERY_LEVELS: u32 = 1 << 3;
/// CTRATT bit 4: Endurance Groups.
pub const CTRATT_ENDURANCE_GROUPS: u32 = 1 << 4;
/// CTRATT bit 5: Predictable Latency Mode.
pub const CTRATT_PREDICTABLE_LATENCY: u32 = 1 << 5;
/// CTRATT bit 6: Traffic Based Keep Alive (TBKAS).
pub const CTRATT_TBKAS: u32 = 1 << 6;
/// CTRATT bit 7: Namespace Granularity.
pub const CTRATT_NS_GRANULARITY: u32 = 1 << 7;
/// CTRATT bit 8: SQ Associations.
pub const CTRATT_SQ_ASSOCIATIONS: u32 = 1 << 8;
/// CTRATT bit 9: UUID List.
pub const CTRATT_UUID_LIST: u32 = 1 << 9;
/// CTRATT bit 15: Extended LBA Formats supported (ELBAS).
pub const CTRATT_ELBAS: u32 = 1 << 15;

/// CNTRLTYPE: I/O controller.
pub const CNTRLTYPE_IO: u8 = 1;
/// CNTRLTYPE: Discovery controller.
pub const CNTRLTYPE_DISCOVERY: u8 = 2;
/// CNTRLTYPE: Administrative controller.
pub const CNTRLTYPE_ADMIN: u8 = 3;

/// OACS bit 0: Security Send / Security Receive.
pub const OACS_SECURITY: u16 = 1 << 0;
/// OACS bit 1: Format NVM.
pub const OACS_FORMAT: u16 = 1 << 1;
/// OACS bit 2: Firmware Commit / Firmware Image Download.
pub const OACS_FIRMWARE: u16 = 1 << 2;
/// OACS bit 3: Namespace Management / Namespace Attachment.
pub const OACS_NS_MANAGEMENT: u16 = 1 << 3;
/// OACS bit 4: Device Self-test.
pub const OACS_SELF_TEST: u16 = 1 << 4;
/// OACS bit 5: Directives.
pub const OACS_DIRECTIVES: u16 = 1 << 5;
/// OACS bit 6: NVMe-MI Send / Receive.
pub const OACS_NVME_MI: u16 = 1 << 6;
/// OACS bit 7: Virtualization Management.
pub const OACS_VIRTUALIZATION: u16 = 1 << 7;
/// OACS bit 8: Doorbell Buffer Config.
pub const OACS_DOORBELL_BUFFER: u16 = 1 << 8;
/// OACS bit 9: Get LBA Status.
pub const OACS_GET_LBA_STATUS: u16 = 1 << 9;
/// OACS bit 10: Command and Feature Lockdown.
pub const OACS_LOCKDOWN: u16 = 1 << 10;

/// FRMW bit 0: firmware slot 1 is read only.
pub const FRMW_SLOT1_READ_ONLY: u8 = 1 << 0;
/// FRMW bits 3:1: number of firmware slots (1..=7).
pub const FRMW_SLOTS_MASK: u8 = 0x0e;
/// FRMW bit 4: firmware activation without reset supported.
pub const FRMW_ACTIVATE_WITHOUT_RESET: u8 = 1 << 4;

/// The FRMW value for `slots` firmware slots (clamped to 1..=7) and the given attributes.
#[must_use]
pub const fn frmw(slots: u8, slot1_read_only: bool, activate_without_reset: bool) -> u8 {
    let slots = if slots == 0 {
        1
    } else if slots > 7 {
        7
    } else {
        slots
    };
    (slots << 1)
        | if slot1_read_only { FRMW_SLOT1_READ_ONLY } else { 0 }
        | if activate_without_reset { FRMW_ACTIVATE_WITHOUT_RESET } else { 0 }
}

/// LPA bit 0: SMART / Health log page per namespace.
pub const LPA_SMART_PER_NAMESPACE: u8 = 1 << 0;
/// LPA bit 1: Commands Supported and Effects log page supported (Linux reads it when set).
pub const LPA_COMMAND_EFFECTS: u8 = 1 << 1;
/// LPA bit 2: extended data for Get Log Page (NUMDU, LPOL/LPOU offsets) supported.
pub const LPA_EXTENDED_DATA: u8 = 1 << 2;
/// LPA bit 3: Telemetry Host-Initiated / Controller-Initiated log pages supported.
pub const LPA_TELEMETRY: u8 = 1 << 3;
/// LPA bit 4: Persistent Event log supported.
pub const LPA_PERSISTENT_EVENT: u8 = 1 << 4;
/// LPA bit 5 (NVMe 2.0, MLPS): Supported Log Pages, Feature Identifiers Supported and Effects and
/// NVMe-MI Commands Supported and Effects log pages supported.
pub const LPA_MISC_LOG_PAGES: u8 = 1 << 5;

/// ONCS bit 0: Compare.
pub const ONCS_COMPARE: u16 = 1 << 0;
/// ONCS bit 1: Write Uncorrectable.
pub const ONCS_WRITE_UNCORRECTABLE: u16 = 1 << 1;
/// ONCS bit 2: Dataset Management (deallocate / TRIM).
pub const ONCS_DSM: u16 = 1 << 2;
/// ONCS bit 3: Write Zeroes.
pub const ONCS_WRITE_ZEROES: u16 = 1 << 3;
/// ONCS bit 4: Save field of Set Features and Select field of Get Features.
pub const ONCS_SAVE_SELECT: u16 = 1 << 4;
/// ONCS bit 5: Reservations.
pub const ONCS_RESERVATIONS: u16 = 1 << 5;
/// ONCS bit 6: Timestamp feature.
pub const ONCS_TIMESTAMP: u16 = 1 << 6;
/// ONCS bit 7: Verify.
pub const ONCS_VERIFY: u16 = 1 << 7;
/// ONCS bit 8: Copy.
pub const ONCS_COPY: u16 = 1 << 8;

/// FUSES bit 0: Compare and Write fused operation.
pub const FUSES_COMPARE_AND_WRITE: u16 = 1 << 0;

/// VWC bit 0: a volatile write cache is present (the host then sends Flush).
pub const VWC_PRESENT: u8 = 1 << 0;
/// VWC bits 2:1: Flush with NSID `FFFFFFFFh` behaviour.
pub const VWC_FLUSH_BROADCAST_MASK: u8 = 0b110;
/// VWC bits 2:1 = `10b`: Flush with NSID `FFFFFFFFh` is not supported.
pub const VWC_FLUSH_BROADCAST_UNSUPPORTED: u8 = 0b100;
/// VWC bits 2:1 = `11b`: Flush with NSID `FFFFFFFFh` is supported.
pub const VWC_FLUSH_BROADCAST_SUPPORTED: u8 = 0b110;

/// SGLS bits 1:0 = `01b`: SGLs supported, no alignment requirement.
pub const SGLS_SUPPORTED_BYTE_ALIGNED: u32 = 0b01;
/// SGLS bits 1:0 = `10b`: SGLs supported, data blocks dword aligned.
pub const SGLS_SUPPORTED_DWORD_ALIGNED: u32 = 0b10;
/// SGLS bits 1:0: SGL support field.
pub const SGLS_SUPPORT_MASK: u32 = 0b11;
/// SGLS bit 2: Keyed SGL Data Block descriptor supported (RDMA).
pub const SGLS_KEYED: u32 = 1 << 2;
/// SGLS bit 16: SGL Bit Bucket descriptor supported.
pub const SGLS_BIT_BUCKET: u32 = 1 << 16;
/// SGLS bit 17: byte-aligned contiguous physical buffer of metadata supported.
pub const SGLS_BYTE_ALIGNED_METADATA: u32 = 1 << 17;
/// SGLS bit 18: SGL length larger than the data to be transferred supported.
pub const SGLS_OVERSIZE: u32 = 1 << 18;
/// SGLS bit 19: MPTR containing an SGL descriptor supported.
pub const SGLS_MPTR_SGL: u32 = 1 << 19;
/// SGLS bit 20: Address field as an offset supported — needed for in-capsule data (Data Block, Offset
/// descriptors). Linux nvmet sets it when the port allows in-capsule data.
pub const SGLS_OFFSET: u32 = 1 << 20;
/// SGLS bit 21: Transport SGL Data Block descriptor supported.
pub const SGLS_TRANSPORT_DATA_BLOCK: u32 = 1 << 21;

/// FCATT bit 0: the NVM subsystem uses the static controller model (clear: dynamic).
pub const FCATT_STATIC_CONTROLLER: u8 = 1 << 0;

/// OFCS bit 0: the Disconnect command is supported.
pub const OFCS_DISCONNECT: u16 = 1 << 0;

/// DCTYPE: discovery controller type not reported.
pub const DCTYPE_NOT_REPORTED: u8 = 0;
/// DCTYPE: Direct Discovery Controller.
pub const DCTYPE_DDC: u8 = 1;
/// DCTYPE: Central Discovery Controller.
pub const DCTYPE_CDC: u8 = 2;

/// A power state descriptor of the Identify Controller data structure: 32 bytes.
///
/// | bytes | field |
/// | --- | --- |
/// | 0..2 | MP: maximum power (units per MXPS) |
/// | 3 | flags: MXPS (bit 0: units of 0.0001 W instead of 0.01 W), NOPS (bit 1: non-operational) |
/// | 4..8 | ENLAT: entry latency (µs) |
/// | 8..12 | EXLAT: exit latency (µs) |
/// | 12..16 | RRT, RRL, RWT, RWL: relative read/write throughput/latency |
/// | 16..18 | IDLP: idle power |
/// | 18 | IPS: idle power scale (bits 7:6) |
/// | 20..22 | ACTP: active power |
/// | 22 | APW (bits 2:0), APS (bits 7:6) |
#[derive(Clone, Copy, Debug, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct PowerStateDescriptor {
    /// Maximum power.
    pub mp: U16,
    /// Reserved.
    pub rsvd2: u8,
    /// MXPS (bit 0) and NOPS (bit 1).
    pub flags: u8,
    /// Entry latency in microseconds.
    pub enlat: U32,
    /// Exit latency in microseconds.
    pub exlat: U32,
    /// Relative read throughput.
    pub rrt: u8,
    /// Relative read latency.
    pub rrl: u8,
    /// Relative write throughput.
    pub rwt: u8,
    /// Relative write latency.
    pub rwl: u8,
    /// Idle power.
    pub idlp: U16,
    /// Idle power scale (bits 7:6).
    pub ips: u8,
    /// Reserved.
    pub rsvd19: u8,
    /// Active power.
    pub actp: U16,
    /// Active power workload (bits 2:0) and active power scale (bits 7:6).
    pub apw_aps: u8,
    /// Reserved.
    pub rsvd23: [u8; 9],
}

/// Power state descriptor flag: MP is in units of 0.0001 W (clear: 0.01 W).
pub const PSD_FLAGS_MXPS: u8 = 1 << 0;
/// Power state descriptor flag: non-operational state.
pub const PSD_FLAGS_NOPS: u8 = 1 << 1;

/// The Identify Controller data structure (CNS 01h): 4096 bytes.
///
/// | bytes | field |
/// | --- | --- |
/// | 0..2 | VID: PCI vendor ID |
/// | 2..4 | SSVID: PCI subsystem vendor ID |
/// | 4..24 | SN: serial number (ASCII, space padded) |
/// | 24..64 | MN: model number (ASCII, space padded) |
/// | 64..72 | FR: firmware revision (ASCII, space padded) |
/// | 72 | RAB: recommended arbitration burst |
/// | 73..76 | IEEE OUI |
/// | 76 | CMIC |
/// | 77 | MDTS: maximum data transfer size (power of two, units of CAP.MPSMIN; 0 = no limit) |
/// | 78..80 | CNTLID |
/// | 80..84 | VER |
/// | 84..88 | RTD3R: RTD3 resume latency (µs) |
/// | 88..92 | RTD3E: RTD3 entry latency (µs; Linux derives its shutdown timeout from it) |
/// | 92..96 | OAES: optional asynchronous events supported |
/// | 96..100 | CTRATT: controller attributes |
/// | 100..102 | RRLS: read recovery levels supported |
/// | 111 | CNTRLTYPE: controller type |
/// | 112..128 | FGUID: FRU globally unique identifier |
/// | 128..134 | CRDT1..3: command retry delay times (100 ms units) |
/// | 253..256 | NVMSR, VWCI, MEC (NVMe-MI) |
/// | 256..258 | OACS: optional admin command support |
/// | 258 | ACL: abort command limit (0's based) |
/// | 259 | AERL: asynchronous event request limit (0's based) |
/// | 260 | FRMW: firmware updates |
/// | 261 | LPA: log page attributes |
/// | 262 | ELPE: error log page entries (0's based) |
/// | 263 | NPSS: number of power states supported (0's based) |
/// | 264 | AVSCC |
/// | 265 | APSTA: autonomous power state transition attributes |
/// | 266..268 | WCTEMP: warning composite temperature threshold (K) |
/// | 268..270 | CCTEMP: critical composite temperature threshold (K) |
/// | 270..272 | MTFA |
/// | 272..276 | HMPRE |
/// | 276..280 | HMMIN |
/// | 280..296 | TNVMCAP: total NVM capacity (bytes) |
/// | 296..312 | UNVMCAP: unallocated NVM capacity (bytes) |
/// | 312..316 | RPMBS |
/// | 316..318 | EDSTT |
/// | 318 | DSTO |
/// | 319 | FWUG |
/// | 320..322 | KAS: keep alive support (granularity, 100 ms units; 0 = unsupported) |
/// | 322..324 | HCTMA |
/// | 324..326 | MNTMT |
/// | 326..328 | MXTMT |
/// | 328..332 | SANICAP |
/// | 332..336 | HMMINDS |
/// | 336..338 | HMMAXD |
/// | 338..340 | NSETIDMAX |
/// | 340..342 | ENDGIDMAX |
/// | 342 | ANATT |
/// | 343 | ANACAP |
/// | 344..348 | ANAGRPMAX |
/// | 348..352 | NANAGRPID |
/// | 352..356 | PELS |
/// | 356..358 | DOMAINID |
/// | 368..384 | MEGCAP |
/// | 512 | SQES: max (bits 7:4) and required (3:0) SQ entry size, log2 (`0x66` for 64 bytes) |
/// | 513 | CQES: max and required CQ entry size, log2 (`0x44` for 16 bytes) |
/// | 514..516 | MAXCMD: maximum outstanding commands (fabrics) |
/// | 516..520 | NN: number of namespaces (highest valid NSID) |
/// | 520..522 | ONCS: optional NVM command support |
/// | 522..524 | FUSES |
/// | 524 | FNA: format NVM attributes |
/// | 525 | VWC: volatile write cache |
/// | 526..528 | AWUN |
/// | 528..530 | AWUPF |
/// | 530 | ICSVSCC |
/// | 531 | NWPC |
/// | 532..534 | ACWU |
/// | 534..536 | OCFS: optional copy formats supported |
/// | 536..540 | SGLS: SGL support |
/// | 540..544 | MNAN |
/// | 544..560 | MAXDNA |
/// | 560..564 | MAXCNA |
/// | 564..568 | OAQD |
/// | 768..1024 | SUBNQN (UTF-8, NUL padded) |
/// | 1792..1796 | IOCCSZ: I/O queue command capsule size (16-byte units, ≥ 4) |
/// | 1796..1800 | IORCSZ: I/O queue response capsule size (16-byte units, ≥ 1) |
/// | 1800..1802 | ICDOFF: in-capsule data offset (16-byte units) |
/// | 1802 | FCATT: fabrics controller attributes |
/// | 1803 | MSDBD: maximum SGL data block descriptors |
/// | 1804..1806 | OFCS: optional fabric commands support |
/// | 1806 | DCTYPE: discovery controller type |
/// | 2048..3072 | PSD0..PSD31: power state descriptors |
/// | 3072..4096 | vendor specific |
///
/// Everything not listed is reserved and must be zero.
#[derive(Clone, Copy, Debug, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct IdentifyController {
    /// PCI Vendor ID.
    pub vid: U16,
    /// PCI Subsystem Vendor ID.
    pub ssvid: U16,
    /// Serial Number (ASCII, space padded): see [`IdentifyController::set_serial_number`].
    pub sn: [u8; 20],
    /// Model Number (ASCII, space padded): see [`IdentifyController::set_model_number`].
    pub mn: [u8; 40],
    /// Firmware Revision (ASCII, space padded): see [`IdentifyController::set_firmware_revision`].
    pub fr: [u8; 8],
    /// Recommended Arbitration Burst.
    pub rab: u8,
    /// IEEE OUI Identifier (least significant byte first).
    pub ieee: [u8; 3],
    /// Controller Multi-Path I/O and Namespace Sharing Capabilities (`CMIC_*`).
    pub cmic: u8,
    /// Maximum Data Transfer Size: 2^MDTS units of the minimum memory page size; 0 means no limit.
    pub mdts: u8,
    /// Controller ID.
    pub cntlid: U16,
    /// Version (see [`version`]).
    pub ver: U32,
    /// RTD3 Resume Latency (µs).
    pub rtd3r: U32,
    /// RTD3 Entry Latency (µs).
    pub rtd3e: U32,
    /// Optional Asynchronous Events Supported (`OAES_*`).
    pub oaes: U32,
    /// Controller Attributes (`CTRATT_*`).
    pub ctratt: U32,
    /// Read Recovery Levels Supported.
    pub rrls: U16,
    /// Reserved.
    pub rsvd102: [u8; 9],
    /// Controller Type (`CNTRLTYPE_*`).
    pub cntrltype: u8,
    /// FRU Globally Unique Identifier.
    pub fguid: [u8; 16],
    /// Command Retry Delay Time 1 (100 ms units).
    pub crdt1: U16,
    /// Command Retry Delay Time 2.
    pub crdt2: U16,
    /// Command Retry Delay Time 3.
    pub crdt3: U16,
    /// Reserved.
    pub rsvd134: [u8; 119],
    /// NVM Subsystem Report (NVMe-MI).
    pub nvmsr: u8,
    /// VPD Write Cycle Information (NVMe-MI).
    pub vwci: u8,
    /// Management Endpoint Capabilities (NVMe-MI).
    pub mec: u8,
    /// Optional Admin Command Support (`OACS_*`).
    pub oacs: U16,
    /// Abort Command Limit (0's based).
    pub acl: u8,
    /// Asynchronous Event Request Limit (0's based).
    pub aerl: u8,
    /// Firmware Updates (see [`frmw`]).
    pub frmw: u8,
    /// Log Page Attributes (`LPA_*`).
    pub lpa: u8,
    /// Error Log Page Entries (0's based).
    pub elpe: u8,
    /// Number of Power States Support (0's based).
    pub npss: u8,
    /// Admin Vendor Specific Command Configuration.
    pub avscc: u8,
    /// Autonomous Power State Transition Attributes.
    pub apsta: u8,
    /// Warning Composite Temperature Threshold (Kelvin).
    pub wctemp: U16,
    /// Critical Composite Temperature Threshold (Kelvin).
    pub cctemp: U16,
    /// Maximum Time for Firmware Activation (100 ms units).
    pub mtfa: U16,
    /// Host Memory Buffer Preferred Size (4 KiB units).
    pub hmpre: U32,
    /// Host Memory Buffer Minimum Size (4 KiB units).
    pub hmmin: U32,
    /// Total NVM Capacity (bytes).
    pub tnvmcap: U128,
    /// Unallocated NVM Capacity (bytes).
    pub unvmcap: U128,
    /// Replay Protected Memory Block Support.
    pub rpmbs: U32,
    /// Extended Device Self-test Time (minutes).
    pub edstt: U16,
    /// Device Self-test Options.
    pub dsto: u8,
    /// Firmware Update Granularity (4 KiB units).
    pub fwug: u8,
    /// Keep Alive Support: granularity of the keep alive timer in 100 ms units (0: not supported).
    pub kas: U16,
    /// Host Controlled Thermal Management Attributes.
    pub hctma: U16,
    /// Minimum Thermal Management Temperature (K).
    pub mntmt: U16,
    /// Maximum Thermal Management Temperature (K).
    pub mxtmt: U16,
    /// Sanitize Capabilities.
    pub sanicap: U32,
    /// Host Memory Buffer Minimum Descriptor Entry Size.
    pub hmminds: U32,
    /// Host Memory Maximum Descriptors Entries.
    pub hmmaxd: U16,
    /// NVM Set Identifier Maximum.
    pub nsetidmax: U16,
    /// Endurance Group Identifier Maximum.
    pub endgidmax: U16,
    /// ANA Transition Time (seconds).
    pub anatt: u8,
    /// Asymmetric Namespace Access Capabilities.
    pub anacap: u8,
    /// ANA Group Identifier Maximum.
    pub anagrpmax: U32,
    /// Number of ANA Group Identifiers.
    pub nanagrpid: U32,
    /// Persistent Event Log Size (64 KiB units).
    pub pels: U32,
    /// Domain Identifier.
    pub domainid: U16,
    /// Reserved.
    pub rsvd358: [u8; 10],
    /// Max Endurance Group Capacity (bytes).
    pub megcap: U128,
    /// Reserved.
    pub rsvd384: [u8; 128],
    /// Submission Queue Entry Size: maximum (bits 7:4) and required (bits 3:0), log2 of bytes.
    pub sqes: u8,
    /// Completion Queue Entry Size: maximum (bits 7:4) and required (bits 3:0), log2 of bytes.
    pub cqes: u8,
    /// Maximum Outstanding Commands.
    pub maxcmd: U16,
    /// Number of Namespaces: the highest namespace identifier the controller may report.
    pub nn: U32,
    /// Optional NVM Command Support (`ONCS_*`).
    pub oncs: U16,
    /// Fused Operation Support (`FUSES_*`).
    pub fuses: U16,
    /// Format NVM Attributes.
    pub fna: u8,
    /// Volatile Write Cache (`VWC_*`).
    pub vwc: u8,
    /// Atomic Write Unit Normal (logical blocks, 0's based).
    pub awun: U16,
    /// Atomic Write Unit Power Fail (logical blocks, 0's based).
    pub awupf: U16,
    /// I/O Command Set Vendor Specific Command Configuration.
    pub icsvscc: u8,
    /// Namespace Write Protection Capabilities.
    pub nwpc: u8,
    /// Atomic Compare & Write Unit.
    pub acwu: U16,
    /// Optional Copy Formats Supported.
    pub ocfs: U16,
    /// SGL Support (`SGLS_*`).
    pub sgls: U32,
    /// Maximum Number of Allowed Namespaces.
    pub mnan: U32,
    /// Maximum Domain Namespace Attachments.
    pub maxdna: U128,
    /// Maximum I/O Controller Namespace Attachments.
    pub maxcna: U32,
    /// Optimal Aggregated Queue Depth.
    pub oaqd: U32,
    /// Reserved.
    pub rsvd568: [u8; 200],
    /// NVM Subsystem NVMe Qualified Name (UTF-8, NUL padded): see [`IdentifyController::set_subnqn`].
    pub subnqn: [u8; 256],
    /// Reserved.
    pub rsvd1024: [u8; 768],
    /// I/O Queue Command Capsule Supported Size (16-byte units; 4 = SQE only).
    pub ioccsz: U32,
    /// I/O Queue Response Capsule Supported Size (16-byte units; 1 = CQE only).
    pub iorcsz: U32,
    /// In Capsule Data Offset (16-byte units).
    pub icdoff: U16,
    /// Fabrics Controller Attributes (`FCATT_*`).
    pub fcatt: u8,
    /// Maximum SGL Data Block Descriptors (0: no limit).
    pub msdbd: u8,
    /// Optional Fabric Commands Support (`OFCS_*`).
    pub ofcs: U16,
    /// Discovery Controller Type (`DCTYPE_*`).
    pub dctype: u8,
    /// Reserved.
    pub rsvd1807: [u8; 241],
    /// Power State Descriptors 0..=31.
    pub psd: [PowerStateDescriptor; 32],
    /// Vendor specific.
    pub vs: [u8; 1024],
}

impl IdentifyController {
    /// An all-zero structure.
    #[must_use]
    pub fn zeroed() -> Self {
        <Self as zerocopy::FromZeros>::new_zeroed()
    }

    /// Sets SN (at most 20 printable ASCII bytes, space padded).
    pub fn set_serial_number(&mut self, serial: &str) -> Result<(), StringFieldError> {
        fill_space_padded(&mut self.sn, serial)
    }

    /// Sets MN (at most 40 printable ASCII bytes, space padded).
    pub fn set_model_number(&mut self, model: &str) -> Result<(), StringFieldError> {
        fill_space_padded(&mut self.mn, model)
    }

    /// Sets FR (at most 8 printable ASCII bytes, space padded).
    pub fn set_firmware_revision(&mut self, revision: &str) -> Result<(), StringFieldError> {
        fill_space_padded(&mut self.fr, revision)
    }

    /// Sets SUBNQN (at most [`NQN_MAX_LEN`] bytes, NUL padded).
    pub fn set_subnqn(&mut self, nqn: &str) -> Result<(), StringFieldError> {
        fill_nqn(&mut self.subnqn, nqn)
    }

    /// SN without its padding (`None` if not UTF-8).
    #[must_use]
    pub fn serial_number(&self) -> Option<&str> {
        field_str(&self.sn)
    }

    /// MN without its padding.
    #[must_use]
    pub fn model_number(&self) -> Option<&str> {
        field_str(&self.mn)
    }

    /// FR without its padding.
    #[must_use]
    pub fn firmware_revision(&self) -> Option<&str> {
        field_str(&self.fr)
    }

    /// SUBNQN up to its terminator.
    #[must_use]
    pub fn subnqn(&self) -> Option<&str> {
        field_str(&self.subnqn)
    }
}

impl Default for IdentifyController {
    fn default() -> Self {
        Self::zeroed()
    }
}

// ---------------------------------------------------------------------------------------------------
// Identify Namespace
// ---------------------------------------------------------------------------------------------------

/// An LBA format descriptor: 4 bytes.
///
/// | bytes | field |
/// | --- | --- |
/// | 0..2 | MS: metadata size per LBA (bytes) |
/// | 2 | LBADS: LBA data size, log2 of bytes (≥ 9; 0 = format not available) |
/// | 3 | RP: relative performance (bits 1:0; 0 best … 3 degraded) |
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, Default, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned,
)]
#[repr(C)]
pub struct LbaFormat {
    /// Metadata Size (bytes per LBA).
    pub ms: U16,
    /// LBA Data Size, as a power of two.
    pub lbads: u8,
    /// Relative Performance (bits 1:0).
    pub rp: u8,
}

impl LbaFormat {
    /// The format for `data_size`-byte blocks without metadata, best performance; `None` unless
    /// `data_size` is a power of two in `512..=65536`.
    #[must_use]
    pub fn with_data_size(data_size: u32) -> Option<Self> {
        if !data_size.is_power_of_two() || !(512..=65536).contains(&data_size) {
            return None;
        }
        Some(Self { ms: U16::new(0), lbads: data_size.trailing_zeros() as u8, rp: 0 })
    }

    /// LBA data size in bytes, or `None` if LBADS is below 9 (format not available) or absurd.
    #[must_use]
    pub fn data_size(&self) -> Option<u64> {
        if self.lbads < 9 {
            return None;
        }
        1u64.checked_shl(u32::from(self.lbads))
    }

    /// Relative performance (0 best, 1 better, 2 good, 3 degraded).
    #[must_use]
    pub fn relative_performance(&self) -> u8 {
        self.rp & 0x3
    }
}

/// NSFEAT bit 0: thin provisioning (NCAP may be less than NSZE).
pub const NSFEAT_THIN_PROVISIONING: u8 = 1 << 0;
/// NSFEAT bit 1: NAWUN, NAWUPF and NACWU are valid.
pub const NSFEAT_ATOMICS: u8 = 1 << 1;
/// NSFEAT bit 2: deallocated or unwritten logical block error supported.
pub const NSFEAT_DEALLOC_ERROR: u8 = 1 << 2;
/// NSFEAT bit 3: the NGUID and EUI64 fields are never reused.
pub const NSFEAT_ID_NO_REUSE: u8 = 1 << 3;
/// NSFEAT bit 4: NPWG, NPWA, NPDG, NPDA and NOWS are valid (Linux uses them for I/O topology).
pub const NSFEAT_OPTIMAL_IO: u8 = 1 << 4;

/// FLBAS bits 3:0: low bits of the index of the LBA format in use.
pub const FLBAS_INDEX_LOW_MASK: u8 = 0x0f;
/// FLBAS bit 4: metadata is transferred at the end of the data LBA (extended LBA).
pub const FLBAS_EXTENDED_METADATA: u8 = 1 << 4;
/// FLBAS bits 6:5: high bits (5:4) of the LBA format index when more than 16 formats exist.
pub const FLBAS_INDEX_HIGH_MASK: u8 = 0x60;

/// NMIC bit 0: the namespace may be attached to more than one controller.
pub const NMIC_SHARED: u8 = 1 << 0;

/// NSATTR bit 0: the namespace is write protected.
pub const NSATTR_WRITE_PROTECTED: u8 = 1 << 0;

/// DLFEAT bits 2:0 = `001b`: reads of deallocated blocks return all zeros.
pub const DLFEAT_READ_ZEROES: u8 = 0b001;
/// DLFEAT bit 3: Write Zeroes with the Deallocate bit deallocates.
pub const DLFEAT_WRITE_ZEROES_DEALLOCATES: u8 = 1 << 3;

/// The Identify Namespace data structure of the NVM Command Set (CNS 00h): 4096 bytes.
///
/// | bytes | field |
/// | --- | --- |
/// | 0..8 | NSZE: namespace size (logical blocks) |
/// | 8..16 | NCAP: namespace capacity |
/// | 16..24 | NUSE: namespace utilization |
/// | 24 | NSFEAT |
/// | 25 | NLBAF: number of LBA formats (0's based) |
/// | 26 | FLBAS: formatted LBA size (index of the LBA format in use) |
/// | 27 | MC: metadata capabilities |
/// | 28 | DPC: end-to-end data protection capabilities |
/// | 29 | DPS: end-to-end data protection type settings |
/// | 30 | NMIC: multi-path I/O and namespace sharing |
/// | 31 | RESCAP: reservation capabilities |
/// | 32 | FPI: format progress indicator |
/// | 33 | DLFEAT: deallocate logical block features |
/// | 34..48 | NAWUN, NAWUPF, NACWU, NABSN, NABO, NABSPF, NOIOB (u16 each) |
/// | 48..64 | NVMCAP: NVM capacity (bytes) |
/// | 64..74 | NPWG, NPWA, NPDG, NPDA, NOWS (u16 each) |
/// | 74..76 | MSSRL |
/// | 76..80 | MCL |
/// | 80 | MSRC |
/// | 81 | KPIOS |
/// | 82 | NULBAF |
/// | 84..88 | KPIODAAG |
/// | 92..96 | ANAGRPID |
/// | 99 | NSATTR |
/// | 100..102 | NVMSETID |
/// | 102..104 | ENDGID |
/// | 104..120 | NGUID |
/// | 120..128 | EUI64 |
/// | 128..384 | LBAF0..LBAF63 |
/// | 3072..4096 | vendor specific |
#[derive(Clone, Copy, Debug, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct IdentifyNamespace {
    /// Namespace Size (logical blocks).
    pub nsze: U64,
    /// Namespace Capacity (logical blocks).
    pub ncap: U64,
    /// Namespace Utilization (logical blocks).
    pub nuse: U64,
    /// Namespace Features (`NSFEAT_*`).
    pub nsfeat: u8,
    /// Number of LBA Formats (0's based).
    pub nlbaf: u8,
    /// Formatted LBA Size (`FLBAS_*`; see [`IdentifyNamespace::lba_format_index`]).
    pub flbas: u8,
    /// Metadata Capabilities.
    pub mc: u8,
    /// End-to-end Data Protection Capabilities.
    pub dpc: u8,
    /// End-to-end Data Protection Type Settings.
    pub dps: u8,
    /// Namespace Multi-path I/O and Namespace Sharing Capabilities (`NMIC_*`).
    pub nmic: u8,
    /// Reservation Capabilities.
    pub rescap: u8,
    /// Format Progress Indicator.
    pub fpi: u8,
    /// Deallocate Logical Block Features (`DLFEAT_*`).
    pub dlfeat: u8,
    /// Namespace Atomic Write Unit Normal.
    pub nawun: U16,
    /// Namespace Atomic Write Unit Power Fail.
    pub nawupf: U16,
    /// Namespace Atomic Compare & Write Unit.
    pub nacwu: U16,
    /// Namespace Atomic Boundary Size Normal.
    pub nabsn: U16,
    /// Namespace Atomic Boundary Offset.
    pub nabo: U16,
    /// Namespace Atomic Boundary Size Power Fail.
    pub nabspf: U16,
    /// Namespace Optimal I/O Boundary (logical blocks).
    pub noiob: U16,
    /// NVM Capacity (bytes).
    pub nvmcap: U128,
    /// Namespace Preferred Write Granularity (0's based, logical blocks).
    pub npwg: U16,
    /// Namespace Preferred Write Alignment (0's based).
    pub npwa: U16,
    /// Namespace Preferred Deallocate Granularity (0's based).
    pub npdg: U16,
    /// Namespace Preferred Deallocate Alignment (0's based).
    pub npda: U16,
    /// Namespace Optimal Write Size (0's based).
    pub nows: U16,
    /// Maximum Single Source Range Length (Copy).
    pub mssrl: U16,
    /// Maximum Copy Length.
    pub mcl: U32,
    /// Maximum Source Range Count (0's based).
    pub msrc: u8,
    /// Key Per I/O Status.
    pub kpios: u8,
    /// Number of Unique Attribute LBA Formats.
    pub nulbaf: u8,
    /// Reserved.
    pub rsvd83: u8,
    /// Key Per I/O Data Access Alignment and Granularity.
    pub kpiodaag: U32,
    /// Reserved.
    pub rsvd88: [u8; 4],
    /// ANA Group Identifier.
    pub anagrpid: U32,
    /// Reserved.
    pub rsvd96: [u8; 3],
    /// Namespace Attributes (`NSATTR_*`).
    pub nsattr: u8,
    /// NVM Set Identifier.
    pub nvmsetid: U16,
    /// Endurance Group Identifier.
    pub endgid: U16,
    /// Namespace Globally Unique Identifier.
    pub nguid: [u8; 16],
    /// IEEE Extended Unique Identifier.
    pub eui64: [u8; 8],
    /// LBA Format descriptors 0..=63.
    pub lbaf: [LbaFormat; 64],
    /// Reserved.
    pub rsvd384: [u8; 2688],
    /// Vendor specific.
    pub vs: [u8; 1024],
}

impl IdentifyNamespace {
    /// An all-zero structure (what a controller returns for an allocated but inactive NSID).
    #[must_use]
    pub fn zeroed() -> Self {
        <Self as zerocopy::FromZeros>::new_zeroed()
    }

    /// The index of the LBA format in use, from FLBAS bits 3:0 and 6:5.
    #[must_use]
    pub fn lba_format_index(&self) -> u8 {
        (self.flbas & FLBAS_INDEX_LOW_MASK) | ((self.flbas & FLBAS_INDEX_HIGH_MASK) >> 1)
    }

    /// Sets the index of the LBA format in use (0..=63), keeping FLBAS bit 4; `false` (and no change) if
    /// `index` is out of range.
    pub fn set_lba_format_index(&mut self, index: u8) -> bool {
        if index >= 64 {
            return false;
        }
        self.flbas = (self.flbas & FLBAS_EXTENDED_METADATA) | (index & 0x0f) | ((index & 0x30) << 1);
        true
    }

    /// The LBA format in use.
    #[must_use]
    pub fn current_lba_format(&self) -> Option<LbaFormat> {
        self.lbaf.get(usize::from(self.lba_format_index())).copied()
    }

    /// Fills the LBA format list with `formats` (at most 64), sets NLBAF accordingly and clears the
    /// remaining descriptors; `false` (and no change) if `formats` is empty or longer than 64.
    pub fn set_lba_formats(&mut self, formats: &[LbaFormat]) -> bool {
        if formats.is_empty() || formats.len() > self.lbaf.len() {
            return false;
        }
        let padded = formats.iter().copied().chain(core::iter::repeat(LbaFormat::default()));
        for (dst, src) in self.lbaf.iter_mut().zip(padded) {
            *dst = src;
        }
        self.nlbaf = (formats.len() - 1) as u8;
        true
    }
}

impl Default for IdentifyNamespace {
    fn default() -> Self {
        Self::zeroed()
    }
}

// ---------------------------------------------------------------------------------------------------
// Namespace ID lists
// ---------------------------------------------------------------------------------------------------

/// A Namespace List: up to 1024 NSIDs in increasing order, the unused tail zero (4096 bytes).
///
/// Returned for CNS 02h (active NSIDs greater than the command's NSID), 07h, 10h, 1Ah, and used as the
/// Changed Namespace List log page (see `log::changed_namespace_list`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct NamespaceIdList {
    /// The identifiers; the first zero ends the list.
    pub ids: [U32; 1024],
}

impl NamespaceIdList {
    /// How many identifiers a list holds.
    pub const CAPACITY: usize = 1024;

    /// An empty list.
    #[must_use]
    pub fn zeroed() -> Self {
        <Self as zerocopy::FromZeros>::new_zeroed()
    }

    /// The Active Namespace ID list answer for an Identify command with NSID `after`: the (at most 1024)
    /// smallest distinct identifiers of `nsids` greater than `after`, ascending. `nsids` may come in
    /// any order and hold duplicates; the broadcast NSID is skipped. Memory stays bounded by 1024
    /// entries whatever the input length.
    ///
    /// (The command itself must be failed with *Invalid Namespace or Format* when its NSID is
    /// `FFFFFFFEh` or `FFFFFFFFh`; that check is the caller's.)
    #[must_use]
    pub fn active(after: u32, nsids: impl IntoIterator<Item = u32>) -> Self {
        let set = smallest_distinct(
            nsids.into_iter().filter(|&id| id > after && id != NSID_BROADCAST),
            Self::CAPACITY,
        );
        Self::from_ascending(set)
    }

    /// A list holding `ids` in the order given (at most [`Self::CAPACITY`] are taken).
    pub(crate) fn from_ascending(ids: impl IntoIterator<Item = u32>) -> Self {
        let mut list = Self::zeroed();
        for (slot, id) in list.ids.iter_mut().zip(ids) {
            *slot = U32::new(id);
        }
        list
    }

    /// The identifiers up to the first zero.
    pub fn iter(&self) -> impl Iterator<Item = u32> + '_ {
        self.ids.iter().map(|id| id.get()).take_while(|&id| id != 0)
    }

    /// Number of identifiers before the first zero.
    #[must_use]
    pub fn len(&self) -> usize {
        self.iter().count()
    }

    /// True if the list is empty.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.ids.first().is_none_or(|id| id.get() == 0)
    }
}

impl Default for NamespaceIdList {
    fn default() -> Self {
        Self::zeroed()
    }
}

/// Reads a Namespace List from received bytes of any length: little-endian u32s up to the first zero
/// or the end of the data (a trailing partial dword is ignored).
pub fn parse_ns_id_list(data: &[u8]) -> impl Iterator<Item = u32> + '_ {
    data.chunks_exact(4)
        .map(|c| <[u8; 4]>::try_from(c).map_or(0, u32::from_le_bytes))
        .take_while(|&id| id != 0)
}

/// The `k` smallest distinct values of `values`, with memory bounded by `k + 1`.
pub(crate) fn smallest_distinct(values: impl Iterator<Item = u32>, k: usize) -> BTreeSet<u32> {
    let mut set = BTreeSet::new();
    for v in values {
        if set.len() == k && set.last().is_some_and(|&max| v >= max) {
            continue;
        }
        set.insert(v);
        if set.len() > k {
            set.pop_last();
        }
    }
    set
}

// ---------------------------------------------------------------------------------------------------
// Namespace Identification Descriptor list
// ---------------------------------------------------------------------------------------------------

/// NIDT: IEEE Extended Unique Identifier (8 bytes).
pub const NIDT_EUI64: u8 = 0x01;
/// NIDT: Namespace Globally Unique Identifier (16 bytes).
pub const NIDT_NGUID: u8 = 0x02;
/// NIDT: Namespace UUID (16 bytes).
pub const NIDT_UUID: u8 = 0x03;
/// NIDT: Command Set Identifier (1 byte).
pub const NIDT_CSI: u8 = 0x04;

/// One Namespace Identification Descriptor: a 4-byte header (NIDT, NIDL, 2 reserved bytes) followed by
/// NIDL bytes of identifier.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum NsIdDescriptor<'a> {
    /// IEEE EUI-64.
    Eui64([u8; 8]),
    /// NGUID.
    Nguid([u8; 16]),
    /// UUID (RFC 4122 byte order, as it appears on the wire).
    Uuid([u8; 16]),
    /// Command Set Identifier.
    Csi(u8),
    /// A descriptor type this crate does not interpret.
    Other {
        /// Descriptor type.
        nidt: u8,
        /// Identifier bytes (1..=255 of them).
        nid: &'a [u8],
    },
}

impl NsIdDescriptor<'_> {
    /// The NIDT value.
    #[must_use]
    pub fn nidt(&self) -> u8 {
        match self {
            Self::Eui64(_) => NIDT_EUI64,
            Self::Nguid(_) => NIDT_NGUID,
            Self::Uuid(_) => NIDT_UUID,
            Self::Csi(_) => NIDT_CSI,
            Self::Other { nidt, .. } => *nidt,
        }
    }

    /// The identifier bytes (NID).
    #[must_use]
    pub fn nid(&self) -> &[u8] {
        match self {
            Self::Eui64(v) => v.as_slice(),
            Self::Nguid(v) | Self::Uuid(v) => v.as_slice(),
            Self::Csi(v) => core::slice::from_ref(v),
            Self::Other { nid, .. } => nid,
        }
    }

    /// Bytes this descriptor occupies in the list (4 + NIDL).
    #[must_use]
    pub fn encoded_len(&self) -> usize {
        4 + self.nid().len()
    }
}

/// A malformed or oversized Namespace Identification Descriptor list.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum NsIdDescError {
    /// The descriptor starting at `offset` runs past the end of the data.
    #[error("namespace identification descriptor at offset {offset} is truncated")]
    Truncated {
        /// Byte offset of the descriptor header.
        offset: usize,
    },
    /// A known descriptor type with the wrong NIDL.
    #[error("namespace identification descriptor type {nidt:#04x} at offset {offset} has length {nidl}, expected {expected}")]
    BadLength {
        /// Byte offset of the descriptor header.
        offset: usize,
        /// Descriptor type.
        nidt: u8,
        /// Length found.
        nidl: u8,
        /// Length the type requires.
        expected: u8,
    },
    /// A descriptor to encode has an empty or over-255-byte identifier.
    #[error("namespace identification descriptor identifier must be 1..=255 bytes, got {len}")]
    InvalidIdentifierLength {
        /// Identifier length given.
        len: usize,
    },
    /// The descriptors do not fit the output buffer.
    #[error("namespace identification descriptors need {needed} bytes, buffer holds {capacity}")]
    NoSpace {
        /// Bytes needed.
        needed: usize,
        /// Bytes available.
        capacity: usize,
    },
}

/// Encodes `descriptors` at the start of `out` and zero-fills the rest (the zero NIDL after the last
/// descriptor ends the list). Returns the bytes used by descriptors. On error `out` is unchanged.
///
/// For an Identify CNS 03h answer pass a [`IDENTIFY_DATA_LEN`]-byte buffer.
pub fn write_ns_id_descriptors(
    descriptors: &[NsIdDescriptor<'_>],
    out: &mut [u8],
) -> Result<usize, NsIdDescError> {
    let mut needed = 0usize;
    for d in descriptors {
        let len = d.nid().len();
        if len == 0 || len > 255 {
            return Err(NsIdDescError::InvalidIdentifierLength { len });
        }
        needed = needed.saturating_add(d.encoded_len());
    }
    if needed > out.len() {
        return Err(NsIdDescError::NoSpace { needed, capacity: out.len() });
    }
    let encoded = descriptors.iter().flat_map(|d| {
        let nid = d.nid();
        // Length checked above: 1..=255.
        [d.nidt(), nid.len() as u8, 0, 0].into_iter().chain(nid.iter().copied())
    });
    for (dst, src) in out.iter_mut().zip(encoded.chain(core::iter::repeat(0))) {
        *dst = src;
    }
    Ok(needed)
}

/// Iterates over a received Namespace Identification Descriptor list. Stops at the end of the data or
/// at a descriptor with NIDL 0; yields one error (then stops) for a truncated descriptor or a known type
/// with the wrong length. Never panics, whatever the input.
#[must_use]
pub fn parse_ns_id_descriptors(data: &[u8]) -> NsIdDescriptors<'_> {
    NsIdDescriptors { data, pos: 0, done: false }
}

/// Iterator returned by [`parse_ns_id_descriptors`].
#[derive(Clone, Debug)]
pub struct NsIdDescriptors<'a> {
    data: &'a [u8],
    pos: usize,
    done: bool,
}

impl<'a> NsIdDescriptors<'a> {
    fn step(&mut self) -> Option<Result<NsIdDescriptor<'a>, NsIdDescError>> {
        let offset = self.pos;
        let rest = self.data.get(offset..)?;
        if rest.is_empty() {
            return None;
        }
        let (Some(&nidt), Some(&nidl), Some(_)) = (rest.first(), rest.get(1), rest.get(3)) else {
            // Fewer than 4 bytes left: padding if all zero, otherwise a cut-off header.
            return if rest.iter().all(|&b| b == 0) {
                None
            } else {
                Some(Err(NsIdDescError::Truncated { offset }))
            };
        };
        if nidl == 0 {
            return None;
        }
        let expected = match nidt {
            NIDT_EUI64 => 8,
            NIDT_NGUID | NIDT_UUID => 16,
            NIDT_CSI => 1,
            _ => nidl,
        };
        if nidl != expected {
            return Some(Err(NsIdDescError::BadLength { offset, nidt, nidl, expected }));
        }
        let end = 4 + usize::from(nidl);
        let Some(nid) = rest.get(4..end) else {
            return Some(Err(NsIdDescError::Truncated { offset }));
        };
        self.pos = offset + end;
        let desc = match nidt {
            NIDT_EUI64 => nid.try_into().map(NsIdDescriptor::Eui64).ok()?,
            NIDT_NGUID => nid.try_into().map(NsIdDescriptor::Nguid).ok()?,
            NIDT_UUID => nid.try_into().map(NsIdDescriptor::Uuid).ok()?,
            NIDT_CSI => NsIdDescriptor::Csi(*nid.first()?),
            _ => NsIdDescriptor::Other { nidt, nid },
        };
        Some(Ok(desc))
    }
}

impl<'a> Iterator for NsIdDescriptors<'a> {
    type Item = Result<NsIdDescriptor<'a>, NsIdDescError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.done {
            return None;
        }
        let item = self.step();
        if !matches!(item, Some(Ok(_))) {
            self.done = true;
        }
        item
    }
}

impl core::iter::FusedIterator for NsIdDescriptors<'_> {}

#[cfg(test)]
mod tests {
    use super::*;
    use core::mem::{offset_of, size_of};

    #[test]
    fn cns_round_trips() {
        for v in 0..=255u8 {
            if let Some(cns) = Cns::from_u8(v) {
                assert_eq!(cns.as_u8(), v);
                assert!(!cns.name().is_empty());
            }
        }
        assert_eq!(Cns::from_u8(0x01), Some(Cns::Controller));
        assert_eq!(Cns::from_u8(0x03), Some(Cns::NamespaceIdDescriptors));
        assert_eq!(Cns::from_u8(0x1c), Some(Cns::IoCommandSet));
        assert_eq!(Cns::from_u8(0x09), None);
        assert_eq!(Cns::from_u8(0xff), None);
    }

    #[test]
    fn controller_layout_matches_spec() {
        type C = IdentifyController;
        assert_eq!(size_of::<C>(), IDENTIFY_DATA_LEN);
        assert_eq!(size_of::<PowerStateDescriptor>(), 32);
        let expected = [
            (offset_of!(C, ssvid), 2),
            (offset_of!(C, sn), 4),
            (offset_of!(C, mn), 24),
            (offset_of!(C, fr), 64),
            (offset_of!(C, rab), 72),
            (offset_of!(C, ieee), 73),
            (offset_of!(C, cmic), 76),
            (offset_of!(C, mdts), 77),
            (offset_of!(C, cntlid), 78),
            (offset_of!(C, ver), 80),
            (offset_of!(C, rtd3r), 84),
            (offset_of!(C, rtd3e), 88),
            (offset_of!(C, oaes), 92),
            (offset_of!(C, ctratt), 96),
            (offset_of!(C, rrls), 100),
            (offset_of!(C, cntrltype), 111),
            (offset_of!(C, fguid), 112),
            (offset_of!(C, crdt1), 128),
            (offset_of!(C, crdt2), 130),
            (offset_of!(C, crdt3), 132),
            (offset_of!(C, nvmsr), 253),
            (offset_of!(C, vwci), 254),
            (offset_of!(C, mec), 255),
            (offset_of!(C, oacs), 256),
            (offset_of!(C, acl), 258),
            (offset_of!(C, aerl), 259),
            (offset_of!(C, frmw), 260),
            (offset_of!(C, lpa), 261),
            (offset_of!(C, elpe), 262),
            (offset_of!(C, npss), 263),
            (offset_of!(C, avscc), 264),
            (offset_of!(C, apsta), 265),
            (offset_of!(C, wctemp), 266),
            (offset_of!(C, cctemp), 268),
            (offset_of!(C, mtfa), 270),
            (offset_of!(C, hmpre), 272),
            (offset_of!(C, hmmin), 276),
            (offset_of!(C, tnvmcap), 280),
            (offset_of!(C, unvmcap), 296),
            (offset_of!(C, rpmbs), 312),
            (offset_of!(C, edstt), 316),
            (offset_of!(C, dsto), 318),
            (offset_of!(C, fwug), 319),
            (offset_of!(C, kas), 320),
            (offset_of!(C, hctma), 322),
            (offset_of!(C, mntmt), 324),
            (offset_of!(C, mxtmt), 326),
            (offset_of!(C, sanicap), 328),
            (offset_of!(C, hmminds), 332),
            (offset_of!(C, hmmaxd), 336),
            (offset_of!(C, nsetidmax), 338),
            (offset_of!(C, endgidmax), 340),
            (offset_of!(C, anatt), 342),
            (offset_of!(C, anacap), 343),
            (offset_of!(C, anagrpmax), 344),
            (offset_of!(C, nanagrpid), 348),
            (offset_of!(C, pels), 352),
            (offset_of!(C, domainid), 356),
            (offset_of!(C, megcap), 368),
            (offset_of!(C, sqes), 512),
            (offset_of!(C, cqes), 513),
            (offset_of!(C, maxcmd), 514),
            (offset_of!(C, nn), 516),
            (offset_of!(C, oncs), 520),
            (offset_of!(C, fuses), 522),
            (offset_of!(C, fna), 524),
            (offset_of!(C, vwc), 525),
            (offset_of!(C, awun), 526),
            (offset_of!(C, awupf), 528),
            (offset_of!(C, icsvscc), 530),
            (offset_of!(C, nwpc), 531),
            (offset_of!(C, acwu), 532),
            (offset_of!(C, ocfs), 534),
            (offset_of!(C, sgls), 536),
            (offset_of!(C, mnan), 540),
            (offset_of!(C, maxdna), 544),
            (offset_of!(C, maxcna), 560),
            (offset_of!(C, oaqd), 564),
            (offset_of!(C, subnqn), 768),
            (offset_of!(C, rsvd1024), 1024),
            (offset_of!(C, ioccsz), 1792),
            (offset_of!(C, iorcsz), 1796),
            (offset_of!(C, icdoff), 1800),
            (offset_of!(C, fcatt), 1802),
            (offset_of!(C, msdbd), 1803),
            (offset_of!(C, ofcs), 1804),
            (offset_of!(C, dctype), 1806),
            (offset_of!(C, psd), 2048),
            (offset_of!(C, vs), 3072),
        ];
        for (i, (got, want)) in expected.iter().enumerate() {
            assert_eq!(got, want, "entry {i}");
        }
        type P = PowerStateDescriptor;
        assert_eq!(offset_of!(P, flags), 3);
        assert_eq!(offset_of!(P, enlat), 4);
        assert_eq!(offset_of!(P, exlat), 8);
        assert_eq!(offset_of!(P, rrt), 12);
        assert_eq!(offset_of!(P, idlp), 16);
        assert_eq!(offset_of!(P, ips), 18);
        assert_eq!(offset_of!(P, actp), 20);
        assert_eq!(offset_of!(P, apw_aps), 22);
    }

    #[test]
    fn controller_byte_exact() {
        let mut c = IdentifyController::zeroed();
        c.vid = U16::new(0x1b36);
        c.set_serial_number("SN01").unwrap();
        c.set_model_number("xatastor").unwrap();
        c.set_firmware_revision("0.1").unwrap();
        c.cntlid = U16::new(0x0102);
        c.ver = U32::new(version(2, 0, 0));
        c.oaes = U32::new(OAES_NS_ATTRIBUTE | OAES_DISCOVERY_CHANGE);
        c.tnvmcap = U128::new(0x0102_0304);
        c.kas = U16::new(5);
        c.sqes = 0x66;
        c.cqes = 0x44;
        c.nn = U32::new(1024);
        c.oncs = U16::new(ONCS_DSM | ONCS_WRITE_ZEROES | ONCS_COPY);
        c.sgls = U32::new(SGLS_SUPPORTED_BYTE_ALIGNED | SGLS_OFFSET);
        c.set_subnqn("nqn.2014-08.org.example:s").unwrap();
        c.ioccsz = U32::new(4 + 512);
        c.iorcsz = U32::new(1);
        c.msdbd = 1;
        c.psd[0].mp = U16::new(0x09c4);

        let mut raw = [0u8; IDENTIFY_DATA_LEN];
        raw[0..2].copy_from_slice(&[0x36, 0x1b]);
        raw[4..24].copy_from_slice(b"SN01                ");
        raw[24..64].copy_from_slice(b"xatastor                                ");
        raw[64..72].copy_from_slice(b"0.1     ");
        raw[78..80].copy_from_slice(&[0x02, 0x01]);
        raw[80..84].copy_from_slice(&[0x00, 0x00, 0x02, 0x00]);
        raw[92..96].copy_from_slice(&[0x00, 0x01, 0x00, 0x80]);
        raw[280..284].copy_from_slice(&[0x04, 0x03, 0x02, 0x01]);
        raw[320] = 5;
        raw[512] = 0x66;
        raw[513] = 0x44;
        raw[516..520].copy_from_slice(&[0x00, 0x04, 0, 0]);
        raw[520..522].copy_from_slice(&[0x0c, 0x01]);
        raw[536..540].copy_from_slice(&[0x01, 0x00, 0x10, 0x00]);
        raw[768..768 + 25].copy_from_slice(b"nqn.2014-08.org.example:s");
        raw[1792..1796].copy_from_slice(&[0x04, 0x02, 0, 0]);
        raw[1796] = 1;
        raw[1803] = 1;
        raw[2048..2050].copy_from_slice(&[0xc4, 0x09]);
        assert_eq!(c.as_bytes(), &raw[..]);

        let back = IdentifyController::read_from_bytes(&raw[..]).unwrap();
        assert_eq!(back, c);
        assert_eq!(back.serial_number(), Some("SN01"));
        assert_eq!(back.model_number(), Some("xatastor"));
        assert_eq!(back.firmware_revision(), Some("0.1"));
        assert_eq!(back.subnqn(), Some("nqn.2014-08.org.example:s"));
    }

    #[test]
    fn string_fields_validate_and_pad() {
        let mut f = [0xaau8; 8];
        assert_eq!(fill_space_padded(&mut f, "123456789"), Err(StringFieldError::TooLong { len: 9, max: 8 }));
        assert_eq!(fill_space_padded(&mut f, "tab\t"), Err(StringFieldError::NotPrintableAscii));
        assert_eq!(fill_space_padded(&mut f, "é"), Err(StringFieldError::NotPrintableAscii));
        assert_eq!(f, [0xaa; 8], "unchanged on error");
        fill_space_padded(&mut f, "12345678").unwrap();
        assert_eq!(&f, b"12345678");
        fill_space_padded(&mut f, "").unwrap();
        assert_eq!(&f, b"        ");
        assert_eq!(field_str(&f), Some(""));

        let mut n = [0xaau8; 8];
        assert_eq!(fill_nul_padded(&mut n, "12345678"), Err(StringFieldError::TooLong { len: 8, max: 7 }));
        assert_eq!(fill_nul_padded(&mut n, "a\0b"), Err(StringFieldError::ContainsNul));
        fill_nul_padded(&mut n, "héllo").unwrap();
        assert_eq!(&n, b"h\xc3\xa9llo\0\0");
        assert_eq!(field_str(&n), Some("héllo"));

        let mut nqn = [0u8; 256];
        let long = "n".repeat(NQN_MAX_LEN + 1);
        assert_eq!(
            fill_nqn(&mut nqn, &long),
            Err(StringFieldError::TooLong { len: NQN_MAX_LEN + 1, max: NQN_MAX_LEN })
        );
        fill_nqn(&mut nqn, &long[..NQN_MAX_LEN]).unwrap();
        assert_eq!(field_str(&nqn).map(str::len), Some(NQN_MAX_LEN));

        // Readers accept both paddings, and NUL-terminated text followed by garbage.
        assert_eq!(field_str(b"4420\0\0\0\0"), Some("4420"));
        assert_eq!(field_str(b"4420    "), Some("4420"));
        assert_eq!(field_str(b"4420\0xyz"), Some("4420"));
        assert_eq!(field_str(b"\xff\xfe"), None);
        assert_eq!(field_str(b""), Some(""));
    }

    #[test]
    fn frmw_and_version_encode() {
        assert_eq!(frmw(1, true, false), 0x03);
        assert_eq!(frmw(0, false, true), 0x12);
        assert_eq!(frmw(9, false, false), 0x0e);
        assert_eq!(version(1, 4, 0), 0x0001_0400);
    }

    #[test]
    fn namespace_layout_matches_spec() {
        type N = IdentifyNamespace;
        assert_eq!(size_of::<N>(), IDENTIFY_DATA_LEN);
        assert_eq!(size_of::<LbaFormat>(), 4);
        let expected = [
            (offset_of!(N, ncap), 8),
            (offset_of!(N, nuse), 16),
            (offset_of!(N, nsfeat), 24),
            (offset_of!(N, nlbaf), 25),
            (offset_of!(N, flbas), 26),
            (offset_of!(N, mc), 27),
            (offset_of!(N, dpc), 28),
            (offset_of!(N, dps), 29),
            (offset_of!(N, nmic), 30),
            (offset_of!(N, rescap), 31),
            (offset_of!(N, fpi), 32),
            (offset_of!(N, dlfeat), 33),
            (offset_of!(N, nawun), 34),
            (offset_of!(N, nawupf), 36),
            (offset_of!(N, nacwu), 38),
            (offset_of!(N, nabsn), 40),
            (offset_of!(N, nabo), 42),
            (offset_of!(N, nabspf), 44),
            (offset_of!(N, noiob), 46),
            (offset_of!(N, nvmcap), 48),
            (offset_of!(N, npwg), 64),
            (offset_of!(N, npwa), 66),
            (offset_of!(N, npdg), 68),
            (offset_of!(N, npda), 70),
            (offset_of!(N, nows), 72),
            (offset_of!(N, mssrl), 74),
            (offset_of!(N, mcl), 76),
            (offset_of!(N, msrc), 80),
            (offset_of!(N, kpios), 81),
            (offset_of!(N, nulbaf), 82),
            (offset_of!(N, kpiodaag), 84),
            (offset_of!(N, anagrpid), 92),
            (offset_of!(N, nsattr), 99),
            (offset_of!(N, nvmsetid), 100),
            (offset_of!(N, endgid), 102),
            (offset_of!(N, nguid), 104),
            (offset_of!(N, eui64), 120),
            (offset_of!(N, lbaf), 128),
            (offset_of!(N, rsvd384), 384),
            (offset_of!(N, vs), 3072),
        ];
        for (i, (got, want)) in expected.iter().enumerate() {
            assert_eq!(got, want, "entry {i}");
        }
    }

    #[test]
    fn namespace_byte_exact() {
        let mut ns = IdentifyNamespace::zeroed();
        ns.nsze = U64::new(0x20_0000);
        ns.ncap = U64::new(0x20_0000);
        ns.nuse = U64::new(0x1000);
        ns.nsfeat = NSFEAT_THIN_PROVISIONING | NSFEAT_OPTIMAL_IO;
        assert!(ns.set_lba_formats(&[
            LbaFormat::with_data_size(512).unwrap(),
            LbaFormat::with_data_size(4096).unwrap(),
        ]));
        assert!(ns.set_lba_format_index(1));
        ns.dlfeat = DLFEAT_READ_ZEROES | DLFEAT_WRITE_ZEROES_DEALLOCATES;
        ns.npwg = U16::new(7);
        ns.anagrpid = U32::new(1);
        ns.nguid = [0x11; 16];
        ns.eui64 = [0x22; 8];

        let mut raw = [0u8; IDENTIFY_DATA_LEN];
        raw[0..8].copy_from_slice(&0x20_0000u64.to_le_bytes());
        raw[8..16].copy_from_slice(&0x20_0000u64.to_le_bytes());
        raw[16..24].copy_from_slice(&0x1000u64.to_le_bytes());
        raw[24] = 0x11;
        raw[25] = 1; // two formats, 0's based
        raw[26] = 1;
        raw[33] = 0x09;
        raw[64] = 7;
        raw[92] = 1;
        raw[104..120].copy_from_slice(&[0x11; 16]);
        raw[120..128].copy_from_slice(&[0x22; 8]);
        raw[128..132].copy_from_slice(&[0, 0, 9, 0]);
        raw[132..136].copy_from_slice(&[0, 0, 12, 0]);
        assert_eq!(ns.as_bytes(), &raw[..]);

        assert_eq!(ns.lba_format_index(), 1);
        assert_eq!(ns.current_lba_format().and_then(|f| f.data_size()), Some(4096));
    }

    #[test]
    fn flbas_index_uses_high_bits() {
        let mut ns = IdentifyNamespace::zeroed();
        ns.flbas = FLBAS_EXTENDED_METADATA;
        assert!(ns.set_lba_format_index(0x2b));
        assert_eq!(ns.flbas, 0x10 | 0x0b | 0x40);
        assert_eq!(ns.lba_format_index(), 0x2b);
        assert!(!ns.set_lba_format_index(64));
        assert_eq!(ns.lba_format_index(), 0x2b);
        assert!(!ns.set_lba_formats(&[]));
        assert!(!ns.set_lba_formats(&[LbaFormat::default(); 65]));
    }

    #[test]
    fn lba_format_sizes() {
        assert_eq!(LbaFormat::with_data_size(512).map(|f| f.lbads), Some(9));
        assert_eq!(LbaFormat::with_data_size(65536).map(|f| f.lbads), Some(16));
        assert_eq!(LbaFormat::with_data_size(256), None);
        assert_eq!(LbaFormat::with_data_size(131_072), None);
        assert_eq!(LbaFormat::with_data_size(1000), None);
        assert_eq!(LbaFormat::with_data_size(0), None);
        let f = LbaFormat { ms: U16::new(8), lbads: 12, rp: 0xfe };
        assert_eq!(f.as_bytes(), &[8, 0, 12, 0xfe]);
        assert_eq!(f.relative_performance(), 2);
        assert_eq!(LbaFormat { lbads: 0, ..f }.data_size(), None);
        assert_eq!(LbaFormat { lbads: 200, ..f }.data_size(), None);
    }

    #[test]
    fn active_ns_list_filters_sorts_and_bounds() {
        let list = NamespaceIdList::active(2, [9, 1, 3, 3, 2, NSID_BROADCAST, 0, 5]);
        assert_eq!(list.iter().collect::<Vec<_>>(), vec![3, 5, 9]);
        assert_eq!(list.len(), 3);
        let bytes = list.as_bytes();
        assert_eq!(bytes.len(), 4096);
        assert_eq!(&bytes[..16], &[3, 0, 0, 0, 5, 0, 0, 0, 9, 0, 0, 0, 0, 0, 0, 0]);
        assert!(bytes[12..].iter().all(|&b| b == 0));

        // More than 1024: the smallest 1024 above the bound, in order.
        let big = NamespaceIdList::active(0, (1..=5000u32).rev());
        assert_eq!(big.len(), 1024);
        assert_eq!(big.iter().next(), Some(1));
        assert_eq!(big.iter().last(), Some(1024));
        let next = NamespaceIdList::active(1024, (1..=5000u32).rev());
        assert_eq!(next.iter().next(), Some(1025));

        assert!(NamespaceIdList::active(u32::MAX - 1, [1, 2]).is_empty());
    }

    #[test]
    fn ns_list_parser_tolerates_any_length() {
        let list = NamespaceIdList::active(0, [1, 2, 0x0102_0304]);
        assert_eq!(parse_ns_id_list(list.as_bytes()).collect::<Vec<_>>(), vec![1, 2, 0x0102_0304]);
        assert_eq!(parse_ns_id_list(&list.as_bytes()[..10]).collect::<Vec<_>>(), vec![1, 2]);
        assert_eq!(parse_ns_id_list(&[]).count(), 0);
        assert_eq!(parse_ns_id_list(&[1, 0, 0]).count(), 0);
        let full = [0xffu8; 4096];
        assert_eq!(parse_ns_id_list(&full).count(), 1024);
    }

    #[test]
    fn ns_id_descriptors_byte_exact_round_trip() {
        let descs = [
            NsIdDescriptor::Eui64([1, 2, 3, 4, 5, 6, 7, 8]),
            NsIdDescriptor::Nguid([0xaa; 16]),
            NsIdDescriptor::Uuid([0x55; 16]),
            NsIdDescriptor::Csi(CSI_NVM),
        ];
        let mut out = [0xeeu8; IDENTIFY_DATA_LEN];
        let used = write_ns_id_descriptors(&descs, &mut out).unwrap();
        assert_eq!(used, 12 + 20 + 20 + 5);

        let mut raw = vec![0u8; IDENTIFY_DATA_LEN];
        raw[0..4].copy_from_slice(&[1, 8, 0, 0]);
        raw[4..12].copy_from_slice(&[1, 2, 3, 4, 5, 6, 7, 8]);
        raw[12..16].copy_from_slice(&[2, 16, 0, 0]);
        raw[16..32].copy_from_slice(&[0xaa; 16]);
        raw[32..36].copy_from_slice(&[3, 16, 0, 0]);
        raw[36..52].copy_from_slice(&[0x55; 16]);
        raw[52..57].copy_from_slice(&[4, 1, 0, 0, 0]);
        assert_eq!(&out[..], &raw[..]);

        let parsed: Vec<_> = parse_ns_id_descriptors(&out).collect::<Result<_, _>>().unwrap();
        assert_eq!(parsed, descs);
    }

    #[test]
    fn ns_id_descriptors_unknown_types_are_kept() {
        let descs = [NsIdDescriptor::Other { nidt: 0x7f, nid: &[9, 9, 9] }, NsIdDescriptor::Csi(2)];
        let mut out = [0u8; 16];
        assert_eq!(write_ns_id_descriptors(&descs, &mut out), Ok(12));
        assert_eq!(out, [0x7f, 3, 0, 0, 9, 9, 9, 4, 1, 0, 0, 2, 0, 0, 0, 0]);
        let parsed: Vec<_> = parse_ns_id_descriptors(&out).collect::<Result<_, _>>().unwrap();
        assert_eq!(parsed, descs);
    }

    #[test]
    fn ns_id_descriptor_builder_errors() {
        let mut out = [0xeeu8; 16];
        assert_eq!(
            write_ns_id_descriptors(&[NsIdDescriptor::Nguid([0; 16])], &mut out),
            Err(NsIdDescError::NoSpace { needed: 20, capacity: 16 })
        );
        assert_eq!(
            write_ns_id_descriptors(&[NsIdDescriptor::Other { nidt: 9, nid: &[] }], &mut out),
            Err(NsIdDescError::InvalidIdentifierLength { len: 0 })
        );
        let long = [0u8; 256];
        assert_eq!(
            write_ns_id_descriptors(&[NsIdDescriptor::Other { nidt: 9, nid: &long }], &mut out),
            Err(NsIdDescError::InvalidIdentifierLength { len: 256 })
        );
        assert_eq!(out, [0xee; 16], "unchanged on error");
        // An exactly filled buffer needs no terminator.
        let mut exact = [0u8; 5];
        assert_eq!(write_ns_id_descriptors(&[NsIdDescriptor::Csi(0)], &mut exact), Ok(5));
        assert_eq!(parse_ns_id_descriptors(&exact).count(), 1);
    }

    #[test]
    fn ns_id_descriptor_parser_rejects_malformed_input() {
        // Wrong length for a known type.
        let bad_len = [1u8, 16, 0, 0];
        let mut it = parse_ns_id_descriptors(&bad_len);
        assert_eq!(
            it.next(),
            Some(Err(NsIdDescError::BadLength { offset: 0, nidt: 1, nidl: 16, expected: 8 }))
        );
        assert_eq!(it.next(), None);

        // Identifier cut off.
        let cut = [2u8, 16, 0, 0, 1, 2, 3];
        assert_eq!(
            parse_ns_id_descriptors(&cut).collect::<Vec<_>>(),
            vec![Err(NsIdDescError::Truncated { offset: 0 })]
        );

        // Header cut off after a good descriptor.
        let header_cut = [4u8, 1, 0, 0, 0, 4, 1];
        assert_eq!(
            parse_ns_id_descriptors(&header_cut).collect::<Vec<_>>(),
            vec![Ok(NsIdDescriptor::Csi(0)), Err(NsIdDescError::Truncated { offset: 5 })]
        );

        // Zero tail shorter than a header, empty input, and NIDL 0 all end the list.
        assert_eq!(parse_ns_id_descriptors(&[4, 1, 0, 0, 0, 0, 0]).count(), 1);
        assert_eq!(parse_ns_id_descriptors(&[]).count(), 0);
        assert_eq!(parse_ns_id_descriptors(&[3, 0, 0, 0, 1, 2]).count(), 0);
    }

    #[test]
    fn ns_id_descriptor_parser_never_panics() {
        // Every 1-, 2- and 3-byte prefix shape plus a sweep of headers over a short buffer.
        for nidt in 0..=255u8 {
            for nidl in [0u8, 1, 7, 8, 15, 16, 17, 255] {
                let data = [nidt, nidl, 0, 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16];
                for end in 0..=data.len() {
                    for item in parse_ns_id_descriptors(&data[..end]) {
                        let _ = item;
                    }
                }
            }
        }
    }

    proptest::proptest! {
        #[test]
        fn ns_id_descriptor_parser_accepts_any_bytes(
            bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..600),
        ) {
            let mut consumed = 0usize;
            for item in parse_ns_id_descriptors(&bytes) {
                match item {
                    Ok(d) => consumed += d.encoded_len(),
                    Err(_) => break,
                }
            }
            proptest::prop_assert!(consumed <= bytes.len());
        }

        #[test]
        fn ns_id_descriptors_round_trip(
            eui in proptest::option::of(proptest::prelude::any::<[u8; 8]>()),
            uuid in proptest::option::of(proptest::prelude::any::<[u8; 16]>()),
            csi in proptest::option::of(proptest::prelude::any::<u8>()),
        ) {
            let descs: Vec<NsIdDescriptor<'_>> = eui
                .map(NsIdDescriptor::Eui64)
                .into_iter()
                .chain(uuid.map(NsIdDescriptor::Uuid))
                .chain(csi.map(NsIdDescriptor::Csi))
                .collect();
            let mut out = [0u8; IDENTIFY_DATA_LEN];
            write_ns_id_descriptors(&descs, &mut out).unwrap();
            let parsed: Vec<_> = parse_ns_id_descriptors(&out).collect::<Result<_, _>>().unwrap();
            proptest::prop_assert_eq!(parsed, descs);
        }

        #[test]
        fn active_list_is_the_sorted_distinct_prefix(
            ids in proptest::collection::vec(proptest::prelude::any::<u32>(), 0..3000),
            after in proptest::prelude::any::<u32>(),
        ) {
            let list = NamespaceIdList::active(after, ids.iter().copied());
            let mut want: Vec<u32> =
                ids.iter().copied().filter(|&id| id > after && id != NSID_BROADCAST).collect();
            want.sort_unstable();
            want.dedup();
            want.truncate(NamespaceIdList::CAPACITY);
            proptest::prop_assert_eq!(list.iter().collect::<Vec<_>>(), want);
        }
    }
}
