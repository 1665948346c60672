//! Features and asynchronous events (NVMe Base Specification, "Feature Values" under Set Features,
//! and "Asynchronous Event Request command").
//!
//! Feature identifiers ([`FeatureId`]) travel in CDW10 bits 7:0 of Get/Set Features (decoded by
//! [`crate::nvme::nvm::GetFeaturesCommand`] / [`crate::nvme::nvm::SetFeaturesCommand`]); the feature
//! value goes in CDW11 for Set Features and comes back in completion DW0 for Get Features. This module
//! decodes the values a fabrics target deals with: Number of Queues, Asynchronous Event Configuration,
//! Keep Alive Timer and Volatile Write Cache, and the completion DW0 of an Asynchronous Event Request
//! ([`AsyncEvent`]).

use super::opcode::code_enum;

code_enum! {
    /// Feature identifiers (FID, Get/Set Features CDW10 bits 7:0).
    pub enum FeatureId {
        /// Arbitration.
        Arbitration = 0x01 => "Arbitration",
        /// Power Management.
        PowerManagement = 0x02 => "Power Management",
        /// LBA Range Type.
        LbaRangeType = 0x03 => "LBA Range Type",
        /// Temperature Threshold.
        TemperatureThreshold = 0x04 => "Temperature Threshold",
        /// Error Recovery.
        ErrorRecovery = 0x05 => "Error Recovery",
        /// Volatile Write Cache ([`VolatileWriteCache`]).
        VolatileWriteCache = 0x06 => "Volatile Write Cache",
        /// Number of Queues ([`NumberOfQueues`]).
        NumberOfQueues = 0x07 => "Number of Queues",
        /// Interrupt Coalescing.
        InterruptCoalescing = 0x08 => "Interrupt Coalescing",
        /// Interrupt Vector Configuration.
        InterruptVectorConfig = 0x09 => "Interrupt Vector Configuration",
        /// Write Atomicity Normal.
        WriteAtomicityNormal = 0x0a => "Write Atomicity Normal",
        /// Asynchronous Event Configuration ([`AsyncEventConfig`]).
        AsyncEventConfig = 0x0b => "Asynchronous Event Configuration",
        /// Autonomous Power State Transition.
        AutonomousPowerStateTransition = 0x0c => "Autonomous Power State Transition",
        /// Host Memory Buffer.
        HostMemoryBuffer = 0x0d => "Host Memory Buffer",
        /// Timestamp.
        Timestamp = 0x0e => "Timestamp",
        /// Keep Alive Timer ([`KeepAliveTimer`]).
        KeepAliveTimer = 0x0f => "Keep Alive Timer",
        /// Host Controlled Thermal Management.
        HostControlledThermalManagement = 0x10 => "Host Controlled Thermal Management",
        /// Non-Operational Power State Config.
        NonOperationalPowerStateConfig = 0x11 => "Non-Operational Power State Config",
        /// Read Recovery Level Config.
        ReadRecoveryLevel = 0x12 => "Read Recovery Level Config",
        /// Predictable Latency Mode Config.
        PredictableLatencyModeConfig = 0x13 => "Predictable Latency Mode Config",
        /// Predictable Latency Mode Window.
        PredictableLatencyModeWindow = 0x14 => "Predictable Latency Mode Window",
        /// LBA Status Information Attributes (formerly LBA Status Information Report Interval).
        LbaStatusInfoAttributes = 0x15 => "LBA Status Information Attributes",
        /// Host Behavior Support.
        HostBehaviorSupport = 0x16 => "Host Behavior Support",
        /// Sanitize Config.
        SanitizeConfig = 0x17 => "Sanitize Config",
        /// Endurance Group Event Configuration.
        EnduranceGroupEventConfig = 0x18 => "Endurance Group Event Configuration",
        /// Software Progress Marker.
        SoftwareProgressMarker = 0x80 => "Software Progress Marker",
        /// Host Identifier.
        HostIdentifier = 0x81 => "Host Identifier",
        /// Reservation Notification Mask.
        ReservationNotificationMask = 0x82 => "Reservation Notification Mask",
        /// Reservation Persistence.
        ReservationPersistence = 0x83 => "Reservation Persistence",
        /// Namespace Write Protection Config.
        NamespaceWriteProtectionConfig = 0x84 => "Namespace Write Protection Config",
    }
}

/// Which value Get Features returns (SEL, CDW10 bits 10:8).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum FeatureSelect {
    /// `000b`: current value.
    Current,
    /// `001b`: default value.
    Default,
    /// `010b`: saved value.
    Saved,
    /// `011b`: supported capabilities ([`FeatureCapabilities`] in DW0).
    SupportedCapabilities,
    /// A reserved value (`100b`..`111b`).
    Reserved(u8),
}

impl FeatureSelect {
    /// Decodes the 3-bit field.
    #[must_use]
    pub const fn from_bits(bits: u8) -> Self {
        match bits & 0x7 {
            0 => Self::Current,
            1 => Self::Default,
            2 => Self::Saved,
            3 => Self::SupportedCapabilities,
            v => Self::Reserved(v),
        }
    }

    /// The 3-bit field value.
    #[must_use]
    pub const fn to_bits(self) -> u8 {
        match self {
            Self::Current => 0,
            Self::Default => 1,
            Self::Saved => 2,
            Self::SupportedCapabilities => 3,
            Self::Reserved(v) => v & 0x7,
        }
    }
}

/// Completion DW0 of Get Features with SEL = supported capabilities.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct FeatureCapabilities {
    /// Bit 0: the feature is saveable.
    pub saveable: bool,
    /// Bit 1: the feature is namespace specific.
    pub namespace_specific: bool,
    /// Bit 2: the feature is changeable.
    pub changeable: bool,
}

impl FeatureCapabilities {
    /// Encodes completion DW0.
    #[must_use]
    pub const fn to_dw0(self) -> u32 {
        (self.saveable as u32) | ((self.namespace_specific as u32) << 1) | ((self.changeable as u32) << 2)
    }

    /// Decodes completion DW0.
    #[must_use]
    pub const fn from_dw0(dw0: u32) -> Self {
        Self { saveable: dw0 & 1 != 0, namespace_specific: dw0 & 2 != 0, changeable: dw0 & 4 != 0 }
    }
}

/// Number of Queues (FID `0x07`): Set Features CDW11 (requested) and completion DW0 (allocated).
///
/// | bits | field |
/// | --- | --- |
/// | 15:0 | NSQR / NSQA: number of I/O submission queues, 0's based |
/// | 31:16 | NCQR / NCQA: number of I/O completion queues, 0's based |
///
/// Both counts exclude the admin queue. A request of `0xffff` (65536 queues) is invalid.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct NumberOfQueues {
    /// Number of I/O submission queues, 0's based.
    pub nsq: u16,
    /// Number of I/O completion queues, 0's based.
    pub ncq: u16,
}

impl NumberOfQueues {
    /// From 1-based counts (a count of zero encodes as zero: one queue; counts above 65536 saturate).
    #[must_use]
    pub fn from_counts(submission_queues: u32, completion_queues: u32) -> Self {
        let zero_based = |n: u32| u16::try_from(n.saturating_sub(1)).unwrap_or(u16::MAX);
        Self { nsq: zero_based(submission_queues), ncq: zero_based(completion_queues) }
    }

    /// Decodes CDW11 / DW0.
    #[must_use]
    pub const fn from_dw(dw: u32) -> Self {
        Self { nsq: dw as u16, ncq: (dw >> 16) as u16 }
    }

    /// Encodes CDW11 / DW0.
    #[must_use]
    pub const fn to_dw(self) -> u32 {
        ((self.ncq as u32) << 16) | self.nsq as u32
    }

    /// Number of I/O submission queues (1-based).
    #[must_use]
    pub const fn submission_queues(self) -> u32 {
        self.nsq as u32 + 1
    }

    /// Number of I/O completion queues (1-based).
    #[must_use]
    pub const fn completion_queues(self) -> u32 {
        self.ncq as u32 + 1
    }

    /// False if a Set Features request asks for `0xffff` (65536) queues of either kind, which a
    /// controller answers with *Invalid Field in Command*.
    #[must_use]
    pub const fn is_valid_request(self) -> bool {
        self.nsq != u16::MAX && self.ncq != u16::MAX
    }
}

/// Asynchronous Event Configuration (FID `0x0b`): which events the host wants reported (CDW11 / DW0).
///
/// | bits | field |
/// | --- | --- |
/// | 7:0 | SMART / health critical warnings |
/// | 8 | Namespace Attribute Notices |
/// | 9 | Firmware Activation Notices |
/// | 10 | Telemetry Log Notices |
/// | 11 | Asymmetric Namespace Access Change Notices |
/// | 31 | Discovery Log Page Change Notification (discovery controllers) |
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct AsyncEventConfig(pub u32);

impl AsyncEventConfig {
    /// SMART / health critical warning bits 7:0.
    pub const SMART_MASK: u32 = 0xff;
    /// Bit 8: Namespace Attribute Notices.
    pub const NAMESPACE_ATTRIBUTE: u32 = 1 << 8;
    /// Bit 9: Firmware Activation Notices.
    pub const FIRMWARE_ACTIVATION: u32 = 1 << 9;
    /// Bit 10: Telemetry Log Notices.
    pub const TELEMETRY_LOG: u32 = 1 << 10;
    /// Bit 11: Asymmetric Namespace Access Change Notices.
    pub const ANA_CHANGE: u32 = 1 << 11;
    /// Bit 31: Discovery Log Page Change Notification.
    pub const DISCOVERY_LOG_CHANGE: u32 = 1 << 31;

    /// The raw value.
    #[must_use]
    pub const fn bits(self) -> u32 {
        self.0
    }

    /// True if every bit of `mask` is set.
    #[must_use]
    pub const fn contains(self, mask: u32) -> bool {
        self.0 & mask == mask
    }

    /// With the bits of `mask` set or cleared.
    #[must_use]
    pub const fn with(self, mask: u32, enabled: bool) -> Self {
        if enabled {
            Self(self.0 | mask)
        } else {
            Self(self.0 & !mask)
        }
    }
}

/// Keep Alive Timer (FID `0x0f`): CDW11 / DW0 is KATO, the keep alive timeout in milliseconds
/// (0 disables the timer). A fabrics host normally sets it in the admin Connect instead.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct KeepAliveTimer {
    /// Keep alive timeout in milliseconds.
    pub kato_ms: u32,
}

impl KeepAliveTimer {
    /// Decodes CDW11 / DW0.
    #[must_use]
    pub const fn from_dw(dw: u32) -> Self {
        Self { kato_ms: dw }
    }

    /// Encodes CDW11 / DW0.
    #[must_use]
    pub const fn to_dw(self) -> u32 {
        self.kato_ms
    }
}

/// Volatile Write Cache (FID `0x06`): CDW11 / DW0 bit 0 is WCE (write cache enable).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct VolatileWriteCache {
    /// WCE: the volatile write cache is enabled.
    pub enabled: bool,
}

impl VolatileWriteCache {
    /// Decodes CDW11 / DW0 (bits 31:1 are reserved and ignored).
    #[must_use]
    pub const fn from_dw(dw: u32) -> Self {
        Self { enabled: dw & 1 != 0 }
    }

    /// Encodes CDW11 / DW0.
    #[must_use]
    pub const fn to_dw(self) -> u32 {
        self.enabled as u32
    }
}

/// Asynchronous event type (completion DW0 bits 2:0 of an Asynchronous Event Request).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum AsyncEventType {
    /// `0`: error status.
    Error,
    /// `1`: SMART / health status.
    SmartHealth,
    /// `2`: notice.
    Notice,
    /// `6`: I/O command specific status.
    IoCommandSpecific,
    /// `7`: vendor specific.
    VendorSpecific,
    /// A reserved value (`3`..`5`).
    Reserved(u8),
}

impl AsyncEventType {
    /// Decodes the 3-bit field.
    #[must_use]
    pub const fn from_bits(bits: u8) -> Self {
        match bits & 0x7 {
            0 => Self::Error,
            1 => Self::SmartHealth,
            2 => Self::Notice,
            6 => Self::IoCommandSpecific,
            7 => Self::VendorSpecific,
            v => Self::Reserved(v),
        }
    }

    /// The 3-bit field value.
    #[must_use]
    pub const fn to_bits(self) -> u8 {
        match self {
            Self::Error => 0,
            Self::SmartHealth => 1,
            Self::Notice => 2,
            Self::IoCommandSpecific => 6,
            Self::VendorSpecific => 7,
            Self::Reserved(v) => v & 0x7,
        }
    }
}

/// Asynchronous event information values for [`AsyncEventType::Notice`] events.
pub mod notice {
    /// Namespace Attribute Changed (read the Changed Namespace List log page, `0x04`).
    pub const NAMESPACE_ATTRIBUTE_CHANGED: u8 = 0x00;
    /// Firmware Activation Starting.
    pub const FIRMWARE_ACTIVATION_STARTING: u8 = 0x01;
    /// Telemetry Log Changed.
    pub const TELEMETRY_LOG_CHANGED: u8 = 0x02;
    /// Asymmetric Namespace Access Change (read the ANA log page, `0x0c`).
    pub const ANA_CHANGE: u8 = 0x03;
    /// Discovery Log Page Change (read the discovery log page, `0x70`).
    pub const DISCOVERY_LOG_PAGE_CHANGE: u8 = 0xf0;
}

/// An asynchronous event: the completion DW0 of an Asynchronous Event Request.
///
/// | bits | field |
/// | --- | --- |
/// | 2:0 | asynchronous event type |
/// | 7:3 | reserved |
/// | 15:8 | asynchronous event information |
/// | 23:16 | log page identifier the host reads to clear the event |
/// | 31:24 | reserved |
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct AsyncEvent {
    /// Event type.
    pub kind: AsyncEventType,
    /// Event information (for notices: one of the [`notice`] values).
    pub info: u8,
    /// Identifier of the log page associated with the event.
    pub log_page: u8,
}

impl AsyncEvent {
    /// Namespace Attribute Changed: notice, information `0x00`, Changed Namespace List log (`0x04`).
    pub const NAMESPACE_ATTRIBUTE_CHANGED: AsyncEvent = AsyncEvent {
        kind: AsyncEventType::Notice,
        info: notice::NAMESPACE_ATTRIBUTE_CHANGED,
        log_page: 0x04,
    };

    /// ANA Change: notice, information `0x03`, Asymmetric Namespace Access log (`0x0c`).
    pub const ANA_CHANGE: AsyncEvent =
        AsyncEvent { kind: AsyncEventType::Notice, info: notice::ANA_CHANGE, log_page: 0x0c };

    /// Discovery Log Page Change: notice, information `0xf0`, discovery log page (`0x70`).
    pub const DISCOVERY_LOG_CHANGED: AsyncEvent =
        AsyncEvent { kind: AsyncEventType::Notice, info: notice::DISCOVERY_LOG_PAGE_CHANGE, log_page: 0x70 };

    /// Encodes completion DW0.
    #[must_use]
    pub const fn to_dw0(self) -> u32 {
        (self.kind.to_bits() as u32) | ((self.info as u32) << 8) | ((self.log_page as u32) << 16)
    }

    /// Decodes completion DW0 (reserved bits ignored).
    #[must_use]
    pub const fn from_dw0(dw0: u32) -> Self {
        Self {
            kind: AsyncEventType::from_bits(dw0 as u8),
            info: (dw0 >> 8) as u8,
            log_page: (dw0 >> 16) as u8,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn feature_ids_match_linux() {
        assert_eq!(FeatureId::VolatileWriteCache as u8, 0x06);
        assert_eq!(FeatureId::NumberOfQueues as u8, 0x07);
        assert_eq!(FeatureId::AsyncEventConfig as u8, 0x0b);
        assert_eq!(FeatureId::KeepAliveTimer as u8, 0x0f);
        assert_eq!(FeatureId::HostBehaviorSupport as u8, 0x16);
        assert_eq!(FeatureId::EnduranceGroupEventConfig as u8, 0x18);
        assert_eq!(FeatureId::HostIdentifier as u8, 0x81);
        assert_eq!(FeatureId::NamespaceWriteProtectionConfig as u8, 0x84);
        for &fid in FeatureId::ALL {
            assert_eq!(FeatureId::from_u8(fid.code()), Some(fid));
        }
        assert_eq!(FeatureId::ALL.len(), 29);
        assert_eq!(FeatureId::from_u8(0x00), None);
        assert_eq!(FeatureId::from_u8(0x19), None);
        assert_eq!(FeatureId::KeepAliveTimer.name(), "Keep Alive Timer");
    }

    #[test]
    fn number_of_queues_encoding() {
        // Linux host asks for 8 I/O queues: (7 << 16) | 7.
        let q = NumberOfQueues::from_dw(0x0007_0007);
        assert_eq!(q, NumberOfQueues { nsq: 7, ncq: 7 });
        assert_eq!(q.submission_queues(), 8);
        assert_eq!(q.completion_queues(), 8);
        assert_eq!(NumberOfQueues::from_counts(8, 8).to_dw(), 0x0007_0007);
        assert_eq!(NumberOfQueues { nsq: 1, ncq: 0x20 }.to_dw(), 0x0020_0001);
        assert_eq!(NumberOfQueues::from_counts(0, 100_000), NumberOfQueues { nsq: 0, ncq: 0xffff });
        assert!(q.is_valid_request());
        assert!(!NumberOfQueues::from_dw(0xffff_0000).is_valid_request());
        assert!(!NumberOfQueues::from_dw(0x0000_ffff).is_valid_request());
    }

    #[test]
    fn async_event_config_bits_match_linux() {
        assert_eq!(AsyncEventConfig::NAMESPACE_ATTRIBUTE, 0x100);
        assert_eq!(AsyncEventConfig::FIRMWARE_ACTIVATION, 0x200);
        assert_eq!(AsyncEventConfig::ANA_CHANGE, 0x800);
        assert_eq!(AsyncEventConfig::DISCOVERY_LOG_CHANGE, 0x8000_0000);
        let cfg = AsyncEventConfig::default()
            .with(AsyncEventConfig::NAMESPACE_ATTRIBUTE, true)
            .with(AsyncEventConfig::ANA_CHANGE, true);
        assert_eq!(cfg.bits(), 0x900);
        assert!(cfg.contains(AsyncEventConfig::NAMESPACE_ATTRIBUTE));
        assert!(!cfg.contains(AsyncEventConfig::DISCOVERY_LOG_CHANGE));
        assert_eq!(cfg.with(AsyncEventConfig::ANA_CHANGE, false).bits(), 0x100);
    }

    #[test]
    fn async_event_dw0_matches_nvmet() {
        // nvmet: event_type | (event_info << 8) | (log_page << 16)
        assert_eq!(AsyncEvent::NAMESPACE_ATTRIBUTE_CHANGED.to_dw0(), 0x0004_0002);
        assert_eq!(AsyncEvent::ANA_CHANGE.to_dw0(), 0x000c_0302);
        assert_eq!(AsyncEvent::DISCOVERY_LOG_CHANGED.to_dw0(), 0x0070_f002);
        for ev in [
            AsyncEvent::NAMESPACE_ATTRIBUTE_CHANGED,
            AsyncEvent::DISCOVERY_LOG_CHANGED,
            AsyncEvent { kind: AsyncEventType::SmartHealth, info: 0x01, log_page: 0x02 },
            AsyncEvent { kind: AsyncEventType::Reserved(4), info: 0xff, log_page: 0xff },
        ] {
            assert_eq!(AsyncEvent::from_dw0(ev.to_dw0()), ev);
        }
        // Reserved bits are ignored on decode.
        assert_eq!(AsyncEvent::from_dw0(0xff70_f0fa), AsyncEvent::DISCOVERY_LOG_CHANGED);
    }

    #[test]
    fn simple_feature_values() {
        assert_eq!(KeepAliveTimer::from_dw(120_000).kato_ms, 120_000);
        assert_eq!(KeepAliveTimer { kato_ms: 5000 }.to_dw(), 5000);
        assert!(VolatileWriteCache::from_dw(0xffff_ffff).enabled);
        assert!(!VolatileWriteCache::from_dw(0xffff_fffe).enabled);
        assert_eq!(VolatileWriteCache { enabled: true }.to_dw(), 1);
        let caps = FeatureCapabilities { saveable: false, namespace_specific: true, changeable: true };
        assert_eq!(caps.to_dw0(), 0b110);
        assert_eq!(FeatureCapabilities::from_dw0(0b110), caps);
        for bits in 0..8u8 {
            assert_eq!(FeatureSelect::from_bits(bits).to_bits(), bits);
            assert_eq!(AsyncEventType::from_bits(bits).to_bits(), bits);
        }
    }
}
