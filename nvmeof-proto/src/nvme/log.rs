//! Log pages (NVMe Base Specification, "Get Log Page command" and "Log Page Identifiers").
//!
//! - [`LogPageId`]: the log page identifiers (LID, Get Log Page CDW10 bits 7:0);
//! - the Get Log Page command's parameters are decoded by [`super::nvm::GetLogPageCommand`];
//! - [`copy_window`]: the window `[offset, offset + len)` of a page, zero filled past its end — hosts read
//!   log pages in pieces;
//! - fixed-layout pages: [`SupportedLogPages`] (00h), [`ErrorInformationEntry`] (01h), [`SmartLog`]
//!   (02h), [`FirmwareSlotLog`] (03h), the Changed Namespace List (04h, [`changed_namespace_list`]),
//!   [`CommandsSupportedEffects`] (05h).
//!
//! The discovery log page (70h) is in [`crate::nvme::discovery`]. Offsets were checked against
//! Linux's `struct nvme_smart_log`, `nvme_error_slot`, `nvme_fw_slot_info_log`, `nvme_effects_log` and
//! `nvme_supported_log`.

use zerocopy::little_endian::{U128, U16, U32, U64};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

use super::identify::{
    field_str, fill_space_padded, smallest_distinct, NamespaceIdList, StringFieldError, NSID_BROADCAST,
};
use super::status::Status;

/// Log Page Identifier (LID).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
#[repr(u8)]
pub enum LogPageId {
    /// `00h`: Supported Log Pages.
    SupportedLogPages = 0x00,
    /// `01h`: Error Information.
    ErrorInformation = 0x01,
    /// `02h`: SMART / Health Information.
    SmartHealth = 0x02,
    /// `03h`: Firmware Slot Information.
    FirmwareSlot = 0x03,
    /// `04h`: Changed Namespace List.
    ChangedNamespaceList = 0x04,
    /// `05h`: Commands Supported and Effects.
    CommandsSupportedEffects = 0x05,
    /// `06h`: Device Self-test.
    DeviceSelfTest = 0x06,
    /// `07h`: Telemetry Host-Initiated.
    TelemetryHostInitiated = 0x07,
    /// `08h`: Telemetry Controller-Initiated.
    TelemetryControllerInitiated = 0x08,
    /// `09h`: Endurance Group Information.
    EnduranceGroupInformation = 0x09,
    /// `0Ah`: Predictable Latency Per NVM Set.
    PredictableLatencyPerNvmSet = 0x0a,
    /// `0Bh`: Predictable Latency Event Aggregate.
    PredictableLatencyEventAggregate = 0x0b,
    /// `0Ch`: Asymmetric Namespace Access.
    AsymmetricNamespaceAccess = 0x0c,
    /// `0Dh`: Persistent Event Log.
    PersistentEventLog = 0x0d,
    /// `0Eh`: LBA Status Information.
    LbaStatusInformation = 0x0e,
    /// `0Fh`: Endurance Group Event Aggregate.
    EnduranceGroupEventAggregate = 0x0f,
    /// `10h`: Media Unit Status.
    MediaUnitStatus = 0x10,
    /// `11h`: Supported Capacity Configuration List.
    SupportedCapacityConfigurationList = 0x11,
    /// `12h`: Feature Identifiers Supported and Effects.
    FeatureIdentifiersSupportedEffects = 0x12,
    /// `13h`: NVMe-MI Commands Supported and Effects.
    NvmeMiCommandsSupportedEffects = 0x13,
    /// `14h`: Command and Feature Lockdown.
    CommandFeatureLockdown = 0x14,
    /// `15h`: Boot Partition.
    BootPartition = 0x15,
    /// `16h`: Rotational Media Information.
    RotationalMediaInformation = 0x16,
    /// `70h`: Discovery (discovery controllers).
    Discovery = 0x70,
    /// `71h`: Host Discovery.
    HostDiscovery = 0x71,
    /// `72h`: AVE Discovery.
    AveDiscovery = 0x72,
    /// `73h`: Pull Model DDC Request.
    PullModelDdcRequest = 0x73,
    /// `80h`: Reservation Notification.
    ReservationNotification = 0x80,
    /// `81h`: Sanitize Status.
    SanitizeStatus = 0x81,
}

impl LogPageId {
    /// Decodes a LID; `None` for values this crate does not know (reserved, vendor specific, newer).
    #[must_use]
    pub const fn from_u8(value: u8) -> Option<Self> {
        Some(match value {
            0x00 => Self::SupportedLogPages,
            0x01 => Self::ErrorInformation,
            0x02 => Self::SmartHealth,
            0x03 => Self::FirmwareSlot,
            0x04 => Self::ChangedNamespaceList,
            0x05 => Self::CommandsSupportedEffects,
            0x06 => Self::DeviceSelfTest,
            0x07 => Self::TelemetryHostInitiated,
            0x08 => Self::TelemetryControllerInitiated,
            0x09 => Self::EnduranceGroupInformation,
            0x0a => Self::PredictableLatencyPerNvmSet,
            0x0b => Self::PredictableLatencyEventAggregate,
            0x0c => Self::AsymmetricNamespaceAccess,
            0x0d => Self::PersistentEventLog,
            0x0e => Self::LbaStatusInformation,
            0x0f => Self::EnduranceGroupEventAggregate,
            0x10 => Self::MediaUnitStatus,
            0x11 => Self::SupportedCapacityConfigurationList,
            0x12 => Self::FeatureIdentifiersSupportedEffects,
            0x13 => Self::NvmeMiCommandsSupportedEffects,
            0x14 => Self::CommandFeatureLockdown,
            0x15 => Self::BootPartition,
            0x16 => Self::RotationalMediaInformation,
            0x70 => Self::Discovery,
            0x71 => Self::HostDiscovery,
            0x72 => Self::AveDiscovery,
            0x73 => Self::PullModelDdcRequest,
            0x80 => Self::ReservationNotification,
            0x81 => Self::SanitizeStatus,
            _ => return None,
        })
    }

    /// The wire value.
    #[must_use]
    pub const fn as_u8(self) -> u8 {
        self as u8
    }

    /// The specification's name of the log page.
    #[must_use]
    pub const fn name(self) -> &'static str {
        match self {
            Self::SupportedLogPages => "Supported Log Pages",
            Self::ErrorInformation => "Error Information",
            Self::SmartHealth => "SMART / Health Information",
            Self::FirmwareSlot => "Firmware Slot Information",
            Self::ChangedNamespaceList => "Changed Namespace List",
            Self::CommandsSupportedEffects => "Commands Supported and Effects",
            Self::DeviceSelfTest => "Device Self-test",
            Self::TelemetryHostInitiated => "Telemetry Host-Initiated",
            Self::TelemetryControllerInitiated => "Telemetry Controller-Initiated",
            Self::EnduranceGroupInformation => "Endurance Group Information",
            Self::PredictableLatencyPerNvmSet => "Predictable Latency Per NVM Set",
            Self::PredictableLatencyEventAggregate => "Predictable Latency Event Aggregate",
            Self::AsymmetricNamespaceAccess => "Asymmetric Namespace Access",
            Self::PersistentEventLog => "Persistent Event Log",
            Self::LbaStatusInformation => "LBA Status Information",
            Self::EnduranceGroupEventAggregate => "Endurance Group Event Aggregate",
            Self::MediaUnitStatus => "Media Unit Status",
            Self::SupportedCapacityConfigurationList => "Supported Capacity Configuration List",
            Self::FeatureIdentifiersSupportedEffects => "Feature Identifiers Supported and Effects",
            Self::NvmeMiCommandsSupportedEffects => "NVMe-MI Commands Supported and Effects",
            Self::CommandFeatureLockdown => "Command and Feature Lockdown",
            Self::BootPartition => "Boot Partition",
            Self::RotationalMediaInformation => "Rotational Media Information",
            Self::Discovery => "Discovery",
            Self::HostDiscovery => "Host Discovery",
            Self::AveDiscovery => "AVE Discovery",
            Self::PullModelDdcRequest => "Pull Model DDC Request",
            Self::ReservationNotification => "Reservation Notification",
            Self::SanitizeStatus => "Sanitize Status",
        }
    }
}

// ---------------------------------------------------------------------------------------------------
// Get Log Page command and windows
// ---------------------------------------------------------------------------------------------------

/// Copies the window `[offset, offset + out.len())` of `page` into `out`; bytes past the end of the
/// page (or all of them, if `offset` is past the end) are zero.
///
/// This is the Get Log Page transfer for a page held as bytes. It never panics and its work is
/// bounded by `out.len()` whatever `offset` is.
pub fn copy_window(page: &[u8], offset: u64, out: &mut [u8]) {
    let src = usize::try_from(offset).ok().and_then(|o| page.get(o..)).unwrap_or(&[]);
    let n = src.len().min(out.len());
    if let (Some(dst), Some(src)) = (out.get_mut(..n), src.get(..n)) {
        dst.copy_from_slice(src);
    }
    if let Some(rest) = out.get_mut(n..) {
        rest.fill(0);
    }
}

// ---------------------------------------------------------------------------------------------------
// Supported Log Pages (00h)
// ---------------------------------------------------------------------------------------------------

/// LID Supported and Effects bit 0 (LSUPP): the log page is supported.
pub const LID_SUPPORTED: u32 = 1 << 0;
/// LID Supported and Effects bit 1 (IOS): index offset (Get Log Page OT bit) supported.
pub const LID_INDEX_OFFSET_SUPPORTED: u32 = 1 << 1;

/// The Supported Log Pages log page (LID 00h): one dword per LID, 1024 bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct SupportedLogPages {
    /// LID Supported and Effects descriptor for each LID (`LID_*`).
    pub lids: [U32; 256],
}

impl SupportedLogPages {
    /// A page listing no log page.
    #[must_use]
    pub fn zeroed() -> Self {
        <Self as zerocopy::FromZeros>::new_zeroed()
    }

    /// A page marking each of `lids` supported.
    #[must_use]
    pub fn with(lids: impl IntoIterator<Item = u8>) -> Self {
        let mut page = Self::zeroed();
        for lid in lids {
            page.set(lid, LID_SUPPORTED);
        }
        page
    }

    /// Sets the descriptor of `lid`.
    pub fn set(&mut self, lid: u8, flags: u32) {
        if let Some(d) = self.lids.get_mut(usize::from(lid)) {
            *d = U32::new(flags);
        }
    }

    /// The descriptor of `lid`.
    #[must_use]
    pub fn get(&self, lid: u8) -> u32 {
        self.lids.get(usize::from(lid)).map_or(0, |d| d.get())
    }
}

impl Default for SupportedLogPages {
    fn default() -> Self {
        Self::zeroed()
    }
}

// ---------------------------------------------------------------------------------------------------
// Error Information (01h)
// ---------------------------------------------------------------------------------------------------

/// One Error Information log entry: 64 bytes (the page is ELPE + 1 of them, newest first).
///
/// | bytes | field |
/// | --- | --- |
/// | 0..8 | error count (unique, incrementing; 0 = unused entry) |
/// | 8..10 | submission queue ID |
/// | 10..12 | command ID |
/// | 12..14 | status field (bits 15:1) and phase tag (bit 0) of the completion |
/// | 14..16 | parameter error location: byte (bits 7:0) and bit (10:8) in the command; `FFFFh` = n/a |
/// | 16..24 | LBA |
/// | 24..28 | namespace |
/// | 28 | vendor specific information available (log page ID, 0 = none) |
/// | 29 | transport type (TRTYPE) |
/// | 32..40 | command specific information |
/// | 40..42 | transport type specific information |
#[derive(Clone, Copy, Debug, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct ErrorInformationEntry {
    /// Error Count.
    pub error_count: U64,
    /// Submission Queue ID.
    pub sqid: U16,
    /// Command ID.
    pub cid: U16,
    /// Status field (bits 15:1) and phase tag (bit 0).
    pub status: U16,
    /// Parameter Error Location.
    pub parameter_error_location: U16,
    /// LBA of the first failing block.
    pub lba: U64,
    /// Namespace of the error.
    pub nsid: U32,
    /// Vendor Specific Information Available.
    pub vendor_specific: u8,
    /// Transport Type (TRTYPE).
    pub trtype: u8,
    /// Reserved.
    pub rsvd30: [u8; 2],
    /// Command Specific Information.
    pub command_specific: U64,
    /// Transport Type Specific Information.
    pub transport_specific: U16,
    /// Reserved.
    pub rsvd42: [u8; 22],
}

/// Parameter Error Location value meaning "not specific to a field".
pub const PARAMETER_ERROR_LOCATION_NONE: u16 = 0xffff;

impl ErrorInformationEntry {
    /// An all-zero (unused) entry.
    #[must_use]
    pub fn zeroed() -> Self {
        <Self as zerocopy::FromZeros>::new_zeroed()
    }

    /// The completion status recorded.
    #[must_use]
    pub fn status(&self) -> Status {
        Status::from_field(self.status.get() >> 1)
    }

    /// Records a completion status (phase tag clear).
    pub fn set_status(&mut self, status: Status) {
        self.status = U16::new(status.to_field() << 1);
    }

    /// Points at bit `bit` (0..=7) of byte `byte` of the failing command.
    pub fn set_parameter_error_location(&mut self, byte: u8, bit: u8) {
        self.parameter_error_location = U16::new(u16::from(byte) | (u16::from(bit & 0x7) << 8));
    }
}

impl Default for ErrorInformationEntry {
    fn default() -> Self {
        Self::zeroed()
    }
}

// ---------------------------------------------------------------------------------------------------
// SMART / Health (02h)
// ---------------------------------------------------------------------------------------------------

/// Critical Warning bit 0: available spare below threshold.
pub const CRITICAL_WARNING_SPARE: u8 = 1 << 0;
/// Critical Warning bit 1: a temperature is outside its threshold.
pub const CRITICAL_WARNING_TEMPERATURE: u8 = 1 << 1;
/// Critical Warning bit 2: reliability degraded by media or internal errors.
pub const CRITICAL_WARNING_RELIABILITY: u8 = 1 << 2;
/// Critical Warning bit 3: all of the media is read only.
pub const CRITICAL_WARNING_READ_ONLY: u8 = 1 << 3;
/// Critical Warning bit 4: volatile memory backup device failed.
pub const CRITICAL_WARNING_VOLATILE_BACKUP: u8 = 1 << 4;
/// Critical Warning bit 5: persistent memory region became read only.
pub const CRITICAL_WARNING_PMR_READ_ONLY: u8 = 1 << 5;

/// The SMART / Health Information log page (LID 02h): 512 bytes.
///
/// | bytes | field |
/// | --- | --- |
/// | 0 | critical warning |
/// | 1..3 | composite temperature (Kelvin) |
/// | 3 | available spare (%) |
/// | 4 | available spare threshold (%) |
/// | 5 | percentage used |
/// | 6 | endurance group critical warning summary |
/// | 32..48 | data units read (thousands of 512-byte units) |
/// | 48..64 | data units written |
/// | 64..80 | host read commands |
/// | 80..96 | host write commands |
/// | 96..112 | controller busy time (minutes) |
/// | 112..128 | power cycles |
/// | 128..144 | power on hours |
/// | 144..160 | unsafe shutdowns |
/// | 160..176 | media and data integrity errors |
/// | 176..192 | number of error information log entries |
/// | 192..196 | warning composite temperature time (minutes) |
/// | 196..200 | critical composite temperature time (minutes) |
/// | 200..216 | temperature sensors 1..8 (Kelvin, 0 = not implemented) |
/// | 216..232 | thermal management temperature 1/2 transition counts and total times |
///
/// The 128-bit counters are [`U128`] fields: `log.power_cycles.set(u128::from(n))`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct SmartLog {
    /// Critical Warning (`CRITICAL_WARNING_*`).
    pub critical_warning: u8,
    /// Composite Temperature (Kelvin).
    pub temperature: U16,
    /// Available Spare (percent).
    pub available_spare: u8,
    /// Available Spare Threshold (percent).
    pub available_spare_threshold: u8,
    /// Percentage Used (may exceed 100).
    pub percentage_used: u8,
    /// Endurance Group Critical Warning Summary.
    pub endurance_group_critical_warning: u8,
    /// Reserved.
    pub rsvd7: [u8; 25],
    /// Data Units Read (see [`SmartLog::data_units`]).
    pub data_units_read: U128,
    /// Data Units Written.
    pub data_units_written: U128,
    /// Host Read Commands.
    pub host_read_commands: U128,
    /// Host Write Commands.
    pub host_write_commands: U128,
    /// Controller Busy Time (minutes).
    pub controller_busy_time: U128,
    /// Power Cycles.
    pub power_cycles: U128,
    /// Power On Hours.
    pub power_on_hours: U128,
    /// Unsafe Shutdowns.
    pub unsafe_shutdowns: U128,
    /// Media and Data Integrity Errors.
    pub media_errors: U128,
    /// Number of Error Information Log Entries over the controller's life.
    pub error_log_entries: U128,
    /// Warning Composite Temperature Time (minutes).
    pub warning_temperature_time: U32,
    /// Critical Composite Temperature Time (minutes).
    pub critical_temperature_time: U32,
    /// Temperature Sensors 1..=8 (Kelvin).
    pub temperature_sensors: [U16; 8],
    /// Thermal Management Temperature 1 Transition Count.
    pub thermal_mgmt_temp1_transitions: U32,
    /// Thermal Management Temperature 2 Transition Count.
    pub thermal_mgmt_temp2_transitions: U32,
    /// Total Time For Thermal Management Temperature 1 (seconds).
    pub thermal_mgmt_temp1_time: U32,
    /// Total Time For Thermal Management Temperature 2 (seconds).
    pub thermal_mgmt_temp2_time: U32,
    /// Reserved.
    pub rsvd232: [u8; 280],
}

impl SmartLog {
    /// An all-zero page.
    #[must_use]
    pub fn zeroed() -> Self {
        <Self as zerocopy::FromZeros>::new_zeroed()
    }

    /// The Data Units Read/Written value for `bytes` transferred: thousands of 512-byte units, rounded
    /// up (1 means 1 to 512,000 bytes).
    #[must_use]
    pub fn data_units(bytes: u128) -> u128 {
        bytes.div_ceil(512_000)
    }

    /// Sets the composite temperature from degrees Celsius (stored in Kelvin, clamped at 0 K).
    pub fn set_temperature_celsius(&mut self, celsius: i16) {
        self.temperature = U16::new(celsius_to_kelvin(celsius));
    }
}

/// Degrees Celsius to the Kelvin value of temperature fields (clamped at 0).
#[must_use]
pub fn celsius_to_kelvin(celsius: i16) -> u16 {
    u16::try_from(i32::from(celsius) + 273).unwrap_or(0)
}

impl Default for SmartLog {
    fn default() -> Self {
        Self::zeroed()
    }
}

// ---------------------------------------------------------------------------------------------------
// Firmware Slot Information (03h)
// ---------------------------------------------------------------------------------------------------

/// The Firmware Slot Information log page (LID 03h): 512 bytes.
///
/// | bytes | field |
/// | --- | --- |
/// | 0 | AFI: active firmware slot (bits 2:0), slot activated at next reset (bits 6:4) |
/// | 8..64 | FRS1..FRS7: firmware revision per slot (ASCII, 8 bytes each; zero = empty) |
#[derive(Clone, Copy, Debug, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct FirmwareSlotLog {
    /// Active Firmware Info.
    pub afi: u8,
    /// Reserved.
    pub rsvd1: [u8; 7],
    /// Firmware Revision for slots 1..=7 (index 0 is slot 1).
    pub frs: [[u8; 8]; 7],
    /// Reserved.
    pub rsvd64: [u8; 448],
}

impl FirmwareSlotLog {
    /// An all-zero page.
    #[must_use]
    pub fn zeroed() -> Self {
        <Self as zerocopy::FromZeros>::new_zeroed()
    }

    /// The page of a controller with one slot: slot 1 active, holding `revision` (which should equal
    /// Identify Controller FR).
    pub fn single(revision: &str) -> Result<Self, StringFieldError> {
        let mut log = Self::zeroed();
        log.set_active_slot(1);
        if let Some(slot) = log.frs.first_mut() {
            fill_space_padded(slot, revision)?;
        }
        Ok(log)
    }

    /// The FRS field of `slot` (1..=7).
    pub fn slot_mut(&mut self, slot: u8) -> Option<&mut [u8; 8]> {
        self.frs.get_mut(usize::from(slot).checked_sub(1)?)
    }

    /// The firmware revision in `slot` (1..=7), without padding; `None` for an invalid slot or an
    /// unreadable field. An empty slot reads as `""`.
    #[must_use]
    pub fn revision(&self, slot: u8) -> Option<&str> {
        field_str(self.frs.get(usize::from(slot).checked_sub(1)?)?)
    }

    /// The active slot (AFI bits 2:0).
    #[must_use]
    pub fn active_slot(&self) -> u8 {
        self.afi & 0x7
    }

    /// Sets the active slot (1..=7; AFI bits 2:0).
    pub fn set_active_slot(&mut self, slot: u8) {
        self.afi = (self.afi & !0x7) | (slot & 0x7);
    }

    /// The slot activated at the next reset (AFI bits 6:4; 0 = none indicated).
    #[must_use]
    pub fn next_reset_slot(&self) -> u8 {
        (self.afi >> 4) & 0x7
    }

    /// Sets the slot activated at the next reset (AFI bits 6:4).
    pub fn set_next_reset_slot(&mut self, slot: u8) {
        self.afi = (self.afi & !0x70) | ((slot & 0x7) << 4);
    }
}

impl Default for FirmwareSlotLog {
    fn default() -> Self {
        Self::zeroed()
    }
}

// ---------------------------------------------------------------------------------------------------
// Changed Namespace List (04h)
// ---------------------------------------------------------------------------------------------------

/// First entry of a Changed Namespace List when more than 1024 namespaces changed.
pub const CHANGED_NS_LIST_OVERFLOW: u32 = 0xffff_ffff;

/// The Changed Namespace List log page (LID 04h, 4096 bytes) for the namespaces in `nsids`: ascending,
/// without duplicates; if more than 1024 distinct namespaces changed, the single entry
/// [`CHANGED_NS_LIST_OVERFLOW`] and zeros. Zero and the broadcast NSID are ignored. Memory stays bounded
/// whatever the input length.
#[must_use]
pub fn changed_namespace_list(nsids: impl IntoIterator<Item = u32>) -> NamespaceIdList {
    let cap = NamespaceIdList::CAPACITY;
    let set = smallest_distinct(nsids.into_iter().filter(|&id| id != 0 && id != NSID_BROADCAST), cap + 1);
    if set.len() > cap {
        NamespaceIdList::from_ascending([CHANGED_NS_LIST_OVERFLOW])
    } else {
        NamespaceIdList::from_ascending(set)
    }
}

// ---------------------------------------------------------------------------------------------------
// Commands Supported and Effects (05h)
// ---------------------------------------------------------------------------------------------------

/// Commands Supported and Effects bit 0 (CSUPP): the command is supported.
pub const EFFECTS_CSUPP: u32 = 1 << 0;
/// Bit 1 (LBCC): the command may change logical block content.
pub const EFFECTS_LBCC: u32 = 1 << 1;
/// Bit 2 (NCC): the command may change namespace capabilities.
pub const EFFECTS_NCC: u32 = 1 << 2;
/// Bit 3 (NIC): the command may change the namespace inventory.
pub const EFFECTS_NIC: u32 = 1 << 3;
/// Bit 4 (CCC): the command may change controller capabilities.
pub const EFFECTS_CCC: u32 = 1 << 4;
/// Bits 15:14 (CSER): command submission and execution relaxations.
pub const EFFECTS_CSER_MASK: u32 = 0x3 << 14;
/// Bits 18:16 (CSE): command submission and execution restrictions.
pub const EFFECTS_CSE_MASK: u32 = 0x7 << 16;
/// CSE = 1: no other command for the same namespace may be outstanding.
pub const EFFECTS_CSE_SINGLE_NAMESPACE: u32 = 1 << 16;
/// CSE = 2: no other command for any namespace may be outstanding.
pub const EFFECTS_CSE_ALL_NAMESPACES: u32 = 2 << 16;
/// Bit 19 (USS): UUID selection supported.
pub const EFFECTS_UUID_SELECTION: u32 = 1 << 19;
/// Bits 31:20 (CSP): command scope.
pub const EFFECTS_CSP_MASK: u32 = 0xfff << 20;

/// The Commands Supported and Effects log page (LID 05h): 4096 bytes.
///
/// | bytes | field |
/// | --- | --- |
/// | 0..1024 | ACS0..ACS255: admin command effects, indexed by opcode |
/// | 1024..2048 | IOCS0..IOCS255: I/O command effects, indexed by opcode |
/// | 2048..4096 | reserved |
///
/// Linux reads this page when LPA bit 1 is set and, for commands marked LBCC/NCC/NIC/CCC, quiesces I/O
/// and rescans around them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct CommandsSupportedEffects {
    /// Admin Command Supported entries.
    pub acs: [U32; 256],
    /// I/O Command Supported entries.
    pub iocs: [U32; 256],
    /// Reserved.
    pub rsvd: [u8; 2048],
}

impl CommandsSupportedEffects {
    /// An all-zero page (nothing supported).
    #[must_use]
    pub fn zeroed() -> Self {
        <Self as zerocopy::FromZeros>::new_zeroed()
    }

    /// The effects of admin `opcode`.
    #[must_use]
    pub fn admin(&self, opcode: u8) -> u32 {
        self.acs.get(usize::from(opcode)).map_or(0, |e| e.get())
    }

    /// Sets the effects of admin `opcode` (include [`EFFECTS_CSUPP`] for a supported command).
    pub fn set_admin(&mut self, opcode: u8, effects: u32) {
        if let Some(e) = self.acs.get_mut(usize::from(opcode)) {
            *e = U32::new(effects);
        }
    }

    /// The effects of I/O `opcode`.
    #[must_use]
    pub fn io(&self, opcode: u8) -> u32 {
        self.iocs.get(usize::from(opcode)).map_or(0, |e| e.get())
    }

    /// Sets the effects of I/O `opcode`.
    pub fn set_io(&mut self, opcode: u8, effects: u32) {
        if let Some(e) = self.iocs.get_mut(usize::from(opcode)) {
            *e = U32::new(effects);
        }
    }
}

impl Default for CommandsSupportedEffects {
    fn default() -> Self {
        Self::zeroed()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nvme::status::StatusCodeType;
    use core::mem::{offset_of, size_of};

    #[test]
    fn lid_round_trips() {
        let mut known = 0;
        for v in 0..=255u8 {
            if let Some(lid) = LogPageId::from_u8(v) {
                assert_eq!(lid.as_u8(), v);
                assert!(!lid.name().is_empty());
                known += 1;
            }
        }
        assert_eq!(known, 29);
        assert_eq!(LogPageId::from_u8(0x02), Some(LogPageId::SmartHealth));
        assert_eq!(LogPageId::from_u8(0x70), Some(LogPageId::Discovery));
        assert_eq!(LogPageId::from_u8(0x81), Some(LogPageId::SanitizeStatus));
        assert_eq!(LogPageId::from_u8(0x17), None);
        assert_eq!(LogPageId::from_u8(0xc0), None);
    }

    #[test]
    fn copy_window_pads_and_never_panics() {
        let page: Vec<u8> = (1..=10).collect();
        let mut out = [0xeeu8; 4];
        copy_window(&page, 0, &mut out);
        assert_eq!(out, [1, 2, 3, 4]);
        copy_window(&page, 8, &mut out);
        assert_eq!(out, [9, 10, 0, 0]);
        copy_window(&page, 10, &mut out);
        assert_eq!(out, [0; 4]);
        let mut out = [0xeeu8; 4];
        copy_window(&page, u64::MAX, &mut out);
        assert_eq!(out, [0; 4]);
        let mut empty = [0u8; 0];
        copy_window(&page, 3, &mut empty);
        let mut big = [0xeeu8; 16];
        copy_window(&page, 0, &mut big);
        assert_eq!(&big[..10], &page[..]);
        assert_eq!(&big[10..], &[0; 6]);
        copy_window(&[], 0, &mut big);
        assert_eq!(big, [0; 16]);
    }

    #[test]
    fn supported_log_pages_layout() {
        assert_eq!(size_of::<SupportedLogPages>(), 1024);
        let mut page = SupportedLogPages::with([0x00, 0x02, 0x70]);
        page.set(0x0c, LID_SUPPORTED | LID_INDEX_OFFSET_SUPPORTED);
        let b = page.as_bytes();
        assert_eq!(&b[0..4], &[1, 0, 0, 0]);
        assert_eq!(&b[4..8], &[0, 0, 0, 0]);
        assert_eq!(&b[8..12], &[1, 0, 0, 0]);
        assert_eq!(&b[0x0c * 4..0x0c * 4 + 4], &[3, 0, 0, 0]);
        assert_eq!(&b[0x70 * 4..0x70 * 4 + 4], &[1, 0, 0, 0]);
        assert_eq!(page.get(0x70), LID_SUPPORTED);
        assert_eq!(page.get(0x01), 0);
    }

    #[test]
    fn error_entry_layout_and_bytes() {
        type E = ErrorInformationEntry;
        assert_eq!(size_of::<E>(), 64);
        assert_eq!(offset_of!(E, sqid), 8);
        assert_eq!(offset_of!(E, cid), 10);
        assert_eq!(offset_of!(E, status), 12);
        assert_eq!(offset_of!(E, parameter_error_location), 14);
        assert_eq!(offset_of!(E, lba), 16);
        assert_eq!(offset_of!(E, nsid), 24);
        assert_eq!(offset_of!(E, vendor_specific), 28);
        assert_eq!(offset_of!(E, trtype), 29);
        assert_eq!(offset_of!(E, command_specific), 32);
        assert_eq!(offset_of!(E, transport_specific), 40);

        let mut e = E::zeroed();
        e.error_count = U64::new(1);
        e.sqid = U16::new(2);
        e.cid = U16::new(0x1234);
        e.set_status(Status::INVALID_FIELD.with_dnr());
        e.set_parameter_error_location(44, 3);
        e.lba = U64::new(0x55);
        e.nsid = U32::new(1);
        e.trtype = 3;
        let mut raw = [0u8; 64];
        raw[0] = 1;
        raw[8] = 2;
        raw[10..12].copy_from_slice(&[0x34, 0x12]);
        raw[12..14].copy_from_slice(&((0x4002u16) << 1).to_le_bytes());
        raw[14..16].copy_from_slice(&[44, 3]);
        raw[16] = 0x55;
        raw[24] = 1;
        raw[29] = 3;
        assert_eq!(e.as_bytes(), &raw);
        let back = E::read_from_bytes(&raw[..]).unwrap();
        assert_eq!(back.status(), Status::INVALID_FIELD.with_dnr());
        assert_eq!(back.status().code_type(), StatusCodeType::Generic);
    }

    #[test]
    fn smart_log_layout_matches_spec() {
        type S = SmartLog;
        assert_eq!(size_of::<S>(), 512);
        let expected = [
            (offset_of!(S, temperature), 1),
            (offset_of!(S, available_spare), 3),
            (offset_of!(S, available_spare_threshold), 4),
            (offset_of!(S, percentage_used), 5),
            (offset_of!(S, endurance_group_critical_warning), 6),
            (offset_of!(S, data_units_read), 32),
            (offset_of!(S, data_units_written), 48),
            (offset_of!(S, host_read_commands), 64),
            (offset_of!(S, host_write_commands), 80),
            (offset_of!(S, controller_busy_time), 96),
            (offset_of!(S, power_cycles), 112),
            (offset_of!(S, power_on_hours), 128),
            (offset_of!(S, unsafe_shutdowns), 144),
            (offset_of!(S, media_errors), 160),
            (offset_of!(S, error_log_entries), 176),
            (offset_of!(S, warning_temperature_time), 192),
            (offset_of!(S, critical_temperature_time), 196),
            (offset_of!(S, temperature_sensors), 200),
            (offset_of!(S, thermal_mgmt_temp1_transitions), 216),
            (offset_of!(S, thermal_mgmt_temp2_transitions), 220),
            (offset_of!(S, thermal_mgmt_temp1_time), 224),
            (offset_of!(S, thermal_mgmt_temp2_time), 228),
            (offset_of!(S, rsvd232), 232),
        ];
        for (i, (got, want)) in expected.iter().enumerate() {
            assert_eq!(got, want, "entry {i}");
        }
    }

    #[test]
    fn smart_log_byte_exact() {
        let mut s = SmartLog::zeroed();
        s.critical_warning = CRITICAL_WARNING_READ_ONLY;
        s.set_temperature_celsius(40);
        s.available_spare = 100;
        s.available_spare_threshold = 10;
        s.data_units_read.set(SmartLog::data_units(512_001));
        s.data_units_written.set(0x0102_0304_0506_0708_090a_0b0c_0d0e_0f10);
        s.power_cycles.set(u128::from(7u64));
        s.power_on_hours.set(u128::from(u64::MAX));
        s.temperature_sensors[0] = U16::new(300);

        let mut raw = [0u8; 512];
        raw[0] = 0x08;
        raw[1..3].copy_from_slice(&313u16.to_le_bytes());
        raw[3] = 100;
        raw[4] = 10;
        raw[32] = 2;
        raw[48..64].copy_from_slice(&[
            0x10, 0x0f, 0x0e, 0x0d, 0x0c, 0x0b, 0x0a, 0x09, 0x08, 0x07, 0x06, 0x05, 0x04, 0x03, 0x02, 0x01,
        ]);
        raw[112] = 7;
        raw[128..136].copy_from_slice(&[0xff; 8]);
        raw[200..202].copy_from_slice(&300u16.to_le_bytes());
        assert_eq!(s.as_bytes(), &raw);
        assert_eq!(SmartLog::read_from_bytes(&raw[..]).unwrap(), s);
    }

    #[test]
    fn smart_helpers() {
        assert_eq!(SmartLog::data_units(0), 0);
        assert_eq!(SmartLog::data_units(1), 1);
        assert_eq!(SmartLog::data_units(512_000), 1);
        assert_eq!(SmartLog::data_units(512_001), 2);
        assert_eq!(celsius_to_kelvin(0), 273);
        assert_eq!(celsius_to_kelvin(-300), 0);
        assert_eq!(celsius_to_kelvin(i16::MAX), 32767 + 273);
    }

    #[test]
    fn firmware_slot_log() {
        assert_eq!(size_of::<FirmwareSlotLog>(), 512);
        assert_eq!(offset_of!(FirmwareSlotLog, frs), 8);
        assert_eq!(offset_of!(FirmwareSlotLog, rsvd64), 64);

        let mut log = FirmwareSlotLog::single("1.2.3").unwrap();
        log.set_next_reset_slot(2);
        fill_space_padded(log.slot_mut(2).unwrap(), "2.0").unwrap();
        let mut raw = [0u8; 512];
        raw[0] = 0x21;
        raw[8..16].copy_from_slice(b"1.2.3   ");
        raw[16..24].copy_from_slice(b"2.0     ");
        assert_eq!(log.as_bytes(), &raw);
        assert_eq!(log.active_slot(), 1);
        assert_eq!(log.next_reset_slot(), 2);
        assert_eq!(log.revision(1), Some("1.2.3"));
        assert_eq!(log.revision(2), Some("2.0"));
        assert_eq!(log.revision(3), Some(""));
        assert_eq!(log.revision(0), None);
        assert_eq!(log.revision(8), None);
        assert!(log.slot_mut(0).is_none());
        assert!(log.slot_mut(8).is_none());
        assert!(FirmwareSlotLog::single("123456789").is_err());
    }

    #[test]
    fn changed_namespace_list_sorts_dedups_and_overflows() {
        let list = changed_namespace_list([5, 3, 5, 0, NSID_BROADCAST, 1]);
        assert_eq!(list.iter().collect::<Vec<_>>(), vec![1, 3, 5]);
        assert_eq!(&list.as_bytes()[..16], &[1, 0, 0, 0, 3, 0, 0, 0, 5, 0, 0, 0, 0, 0, 0, 0]);

        let exactly = changed_namespace_list((1..=1024u32).chain(1..=1024));
        assert_eq!(exactly.len(), 1024);
        assert_eq!(exactly.iter().last(), Some(1024));

        let over = changed_namespace_list((1..=1025u32).rev());
        assert_eq!(over.iter().collect::<Vec<_>>(), vec![CHANGED_NS_LIST_OVERFLOW]);
        assert_eq!(&over.as_bytes()[..4], &[0xff; 4]);
        assert!(over.as_bytes()[4..].iter().all(|&b| b == 0));

        assert!(changed_namespace_list([]).is_empty());
    }

    #[test]
    fn effects_log_layout_and_bytes() {
        type C = CommandsSupportedEffects;
        assert_eq!(size_of::<C>(), 4096);
        assert_eq!(offset_of!(C, iocs), 1024);
        assert_eq!(offset_of!(C, rsvd), 2048);
        let mut c = C::zeroed();
        c.set_admin(0x06, EFFECTS_CSUPP);
        c.set_admin(
            0x80,
            EFFECTS_CSUPP | EFFECTS_LBCC | EFFECTS_NCC | EFFECTS_NIC | EFFECTS_CSE_ALL_NAMESPACES,
        );
        c.set_io(0x01, EFFECTS_CSUPP | EFFECTS_LBCC);
        let b = c.as_bytes();
        assert_eq!(&b[0x06 * 4..0x06 * 4 + 4], &[1, 0, 0, 0]);
        assert_eq!(&b[0x80 * 4..0x80 * 4 + 4], &[0x0f, 0, 0x02, 0]);
        assert_eq!(&b[1024 + 4..1024 + 8], &[0x03, 0, 0, 0]);
        assert_eq!(c.admin(0x80) & EFFECTS_CSE_MASK, EFFECTS_CSE_ALL_NAMESPACES);
        assert_eq!(c.io(0x01), EFFECTS_CSUPP | EFFECTS_LBCC);
        assert_eq!(c.io(0x02), 0);
        assert_eq!(EFFECTS_CSP_MASK, 0xfff0_0000);
    }
}
