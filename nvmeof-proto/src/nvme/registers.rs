//! Controller properties: the controller registers a fabrics host reads and writes with Property Get /
//! Property Set (NVMe Base Specification, "Controller Registers" and "Controller Properties"; NVMe over
//! Fabrics, "Property Definitions").
//!
//! | offset | property | size | on fabrics |
//! | --- | --- | --- | --- |
//! | `0x00` | CAP: Controller Capabilities | 8 | yes |
//! | `0x08` | VS: Version | 4 | yes |
//! | `0x0c` | INTMS: Interrupt Mask Set | 4 | no (PCIe only) |
//! | `0x10` | INTMC: Interrupt Mask Clear | 4 | no (PCIe only) |
//! | `0x14` | CC: Controller Configuration | 4 | yes |
//! | `0x1c` | CSTS: Controller Status | 4 | yes |
//! | `0x20` | NSSR: NVM Subsystem Reset | 4 | yes |
//! | `0x24` | AQA: Admin Queue Attributes | 4 | no (PCIe only) |
//! | `0x28` | ASQ: Admin SQ Base Address | 8 | no (PCIe only) |
//! | `0x30` | ACQ: Admin CQ Base Address | 8 | no (PCIe only) |
//!
//! Over fabrics only CAP, VS, CC, CSTS and NSSR are defined; [`property_width`] tells a target which
//! offsets exist and with which access size, so that it can answer anything else with *Invalid Field in
//! Command*.
//!
//! The register types ([`Cap`], [`Version`], [`Cc`], [`Csts`]) are plain newtypes over the raw value with
//! getters and `with_*` builders. Builders mask the value to the field's width: bits that do not fit
//! are dropped.

use core::fmt;

/// Property offsets (byte offsets into the controller's register space).
pub mod offset {
    /// CAP: Controller Capabilities (8 bytes).
    pub const CAP: u32 = 0x00;
    /// VS: Version (4 bytes).
    pub const VS: u32 = 0x08;
    /// INTMS: Interrupt Mask Set (4 bytes; PCIe only).
    pub const INTMS: u32 = 0x0c;
    /// INTMC: Interrupt Mask Clear (4 bytes; PCIe only).
    pub const INTMC: u32 = 0x10;
    /// CC: Controller Configuration (4 bytes).
    pub const CC: u32 = 0x14;
    /// CSTS: Controller Status (4 bytes).
    pub const CSTS: u32 = 0x1c;
    /// NSSR: NVM Subsystem Reset (4 bytes).
    pub const NSSR: u32 = 0x20;
    /// AQA: Admin Queue Attributes (4 bytes; PCIe only).
    pub const AQA: u32 = 0x24;
    /// ASQ: Admin Submission Queue Base Address (8 bytes; PCIe only).
    pub const ASQ: u32 = 0x28;
    /// ACQ: Admin Completion Queue Base Address (8 bytes; PCIe only).
    pub const ACQ: u32 = 0x30;
}

/// The value a host writes to NSSR to request an NVM Subsystem Reset: `"NVMe"` in ASCII, little endian.
pub const NSSR_RESET_VALUE: u32 = 0x4e56_4d65;

/// Access size of a property, as Property Get/Set encode it in ATTRIB bits 2:0.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum PropertyWidth {
    /// 4 bytes (ATTRIB size `0`).
    Four,
    /// 8 bytes (ATTRIB size `1`).
    Eight,
}

impl PropertyWidth {
    /// Decodes the size field (bits 2:0) of a Property Get/Set ATTRIB byte; `None` for reserved sizes.
    #[must_use]
    pub const fn from_attrib(attrib: u8) -> Option<Self> {
        match attrib & 0x7 {
            0 => Some(Self::Four),
            1 => Some(Self::Eight),
            _ => None,
        }
    }

    /// The ATTRIB byte that selects this width.
    #[must_use]
    pub const fn to_attrib(self) -> u8 {
        match self {
            Self::Four => 0,
            Self::Eight => 1,
        }
    }

    /// Size in bytes.
    #[must_use]
    pub const fn bytes(self) -> usize {
        match self {
            Self::Four => 4,
            Self::Eight => 8,
        }
    }
}

/// Width of the property at `offset` if the property is defined over fabrics (CAP: 8 bytes; VS, CC,
/// CSTS, NSSR: 4 bytes), `None` for any other offset — including the PCIe-only registers.
///
/// A target answers Property Get/Set with *Invalid Field in Command* when this is `None` or differs from
/// the command's ATTRIB size.
#[must_use]
pub const fn property_width(offset: u32) -> Option<PropertyWidth> {
    match offset {
        offset::CAP => Some(PropertyWidth::Eight),
        offset::VS | offset::CC | offset::CSTS | offset::NSSR => Some(PropertyWidth::Four),
        _ => None,
    }
}

/// Name of the property at `offset`, for logs (`None` if not one in this module's table).
#[must_use]
pub const fn property_name(offset: u32) -> Option<&'static str> {
    match offset {
        offset::CAP => Some("CAP"),
        offset::VS => Some("VS"),
        offset::INTMS => Some("INTMS"),
        offset::INTMC => Some("INTMC"),
        offset::CC => Some("CC"),
        offset::CSTS => Some("CSTS"),
        offset::NSSR => Some("NSSR"),
        offset::AQA => Some("AQA"),
        offset::ASQ => Some("ASQ"),
        offset::ACQ => Some("ACQ"),
        _ => None,
    }
}

const fn mask64(width: u32) -> u64 {
    if width >= 64 {
        u64::MAX
    } else {
        (1u64 << width) - 1
    }
}

const fn get64(raw: u64, lo: u32, width: u32) -> u64 {
    (raw >> lo) & mask64(width)
}

const fn set64(raw: u64, lo: u32, width: u32, value: u64) -> u64 {
    let mask = mask64(width) << lo;
    (raw & !mask) | ((value << lo) & mask)
}

const fn get32(raw: u32, lo: u32, width: u32) -> u32 {
    // Registers are at most 32 bits here; the 64-bit helper does the work.
    get64(raw as u64, lo, width) as u32
}

const fn set32(raw: u32, lo: u32, width: u32, value: u32) -> u32 {
    set64(raw as u64, lo, width, value as u64) as u32
}

const fn bool_bit(value: bool) -> u64 {
    if value {
        1
    } else {
        0
    }
}

/// CAP: Controller Capabilities (offset `0x00`, 8 bytes, read only).
///
/// | bits | field |
/// | --- | --- |
/// | 15:0 | MQES: maximum queue entries supported, 0's based |
/// | 16 | CQR: contiguous queues required |
/// | 18:17 | AMS: arbitration mechanisms supported |
/// | 31:24 | TO: timeout for CSTS.RDY transitions, in 500 ms units |
/// | 35:32 | DSTRD: doorbell stride |
/// | 36 | NSSRS: NVM subsystem reset supported |
/// | 44:37 | CSS: command sets supported (bit 37 NVM, bit 43 I/O command sets, bit 44 admin only) |
/// | 45 | BPS: boot partition support |
/// | 47:46 | CPS: controller power scope |
/// | 51:48 | MPSMIN: memory page size minimum, 2^(12 + MPSMIN) |
/// | 55:52 | MPSMAX: memory page size maximum, 2^(12 + MPSMAX) |
/// | 56 | PMRS: persistent memory region supported |
/// | 57 | CMBS: controller memory buffer supported |
/// | 58 | NSSS: NVM subsystem shutdown supported |
/// | 60:59 | CRMS: controller ready modes supported (bit 59 CRWMS, bit 60 CRIMS) |
/// | 61 | NSSES: NVM subsystem shutdown enhancements supported |
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Cap(pub u64);

impl Cap {
    /// CSS bit 0 (CAP bit 37): the NVM command set.
    pub const CSS_NVM: u8 = 1 << 0;
    /// CSS bit 6 (CAP bit 43): one or more I/O command sets (selected with CC.CSS = `110b`).
    pub const CSS_IO_COMMAND_SETS: u8 = 1 << 6;
    /// CSS bit 7 (CAP bit 44): no I/O command set, admin only (discovery controllers).
    pub const CSS_ADMIN_ONLY: u8 = 1 << 7;

    /// The raw 64-bit value.
    #[must_use]
    pub const fn raw(self) -> u64 {
        self.0
    }

    /// MQES: maximum individual queue size, 0's based.
    #[must_use]
    pub const fn mqes(self) -> u16 {
        get64(self.0, 0, 16) as u16
    }

    /// Maximum queue entries as a count (MQES + 1).
    #[must_use]
    pub const fn max_queue_entries(self) -> u32 {
        self.mqes() as u32 + 1
    }

    /// CQR: contiguous queues required.
    #[must_use]
    pub const fn cqr(self) -> bool {
        get64(self.0, 16, 1) != 0
    }

    /// AMS: arbitration mechanisms supported (bit 0 weighted round robin, bit 1 vendor specific).
    #[must_use]
    pub const fn ams(self) -> u8 {
        get64(self.0, 17, 2) as u8
    }

    /// TO: worst-case time for CSTS.RDY to change, in 500 ms units.
    #[must_use]
    pub const fn to(self) -> u8 {
        get64(self.0, 24, 8) as u8
    }

    /// TO in milliseconds.
    #[must_use]
    pub const fn timeout_ms(self) -> u32 {
        self.to() as u32 * 500
    }

    /// DSTRD: doorbell stride, 2^(2 + DSTRD) bytes.
    #[must_use]
    pub const fn dstrd(self) -> u8 {
        get64(self.0, 32, 4) as u8
    }

    /// NSSRS: NVM subsystem reset supported.
    #[must_use]
    pub const fn nssrs(self) -> bool {
        get64(self.0, 36, 1) != 0
    }

    /// CSS: command sets supported (see [`Cap::CSS_NVM`] and friends).
    #[must_use]
    pub const fn css(self) -> u8 {
        get64(self.0, 37, 8) as u8
    }

    /// BPS: boot partition support.
    #[must_use]
    pub const fn bps(self) -> bool {
        get64(self.0, 45, 1) != 0
    }

    /// CPS: controller power scope.
    #[must_use]
    pub const fn cps(self) -> u8 {
        get64(self.0, 46, 2) as u8
    }

    /// MPSMIN: minimum memory page size is 2^(12 + MPSMIN).
    #[must_use]
    pub const fn mpsmin(self) -> u8 {
        get64(self.0, 48, 4) as u8
    }

    /// MPSMAX: maximum memory page size is 2^(12 + MPSMAX).
    #[must_use]
    pub const fn mpsmax(self) -> u8 {
        get64(self.0, 52, 4) as u8
    }

    /// PMRS: persistent memory region supported.
    #[must_use]
    pub const fn pmrs(self) -> bool {
        get64(self.0, 56, 1) != 0
    }

    /// CMBS: controller memory buffer supported.
    #[must_use]
    pub const fn cmbs(self) -> bool {
        get64(self.0, 57, 1) != 0
    }

    /// NSSS: NVM subsystem shutdown supported.
    #[must_use]
    pub const fn nsss(self) -> bool {
        get64(self.0, 58, 1) != 0
    }

    /// CRMS: controller ready modes supported (bit 0 = CRWMS, bit 1 = CRIMS). When non-zero a Linux
    /// host also reads the CRTO property (offset `0x68`), so a fabrics target leaves this zero.
    #[must_use]
    pub const fn crms(self) -> u8 {
        get64(self.0, 59, 2) as u8
    }

    /// NSSES: NVM subsystem shutdown enhancements supported.
    #[must_use]
    pub const fn nsses(self) -> bool {
        get64(self.0, 61, 1) != 0
    }

    /// With MQES (0's based).
    #[must_use]
    pub const fn with_mqes(self, mqes: u16) -> Self {
        Self(set64(self.0, 0, 16, mqes as u64))
    }

    /// With CQR.
    #[must_use]
    pub const fn with_cqr(self, cqr: bool) -> Self {
        Self(set64(self.0, 16, 1, bool_bit(cqr)))
    }

    /// With AMS (2 bits).
    #[must_use]
    pub const fn with_ams(self, ams: u8) -> Self {
        Self(set64(self.0, 17, 2, ams as u64))
    }

    /// With TO (500 ms units).
    #[must_use]
    pub const fn with_to(self, to: u8) -> Self {
        Self(set64(self.0, 24, 8, to as u64))
    }

    /// With DSTRD (4 bits).
    #[must_use]
    pub const fn with_dstrd(self, dstrd: u8) -> Self {
        Self(set64(self.0, 32, 4, dstrd as u64))
    }

    /// With NSSRS.
    #[must_use]
    pub const fn with_nssrs(self, nssrs: bool) -> Self {
        Self(set64(self.0, 36, 1, bool_bit(nssrs)))
    }

    /// With CSS (8 bits, see [`Cap::CSS_NVM`] and friends).
    #[must_use]
    pub const fn with_css(self, css: u8) -> Self {
        Self(set64(self.0, 37, 8, css as u64))
    }

    /// With BPS.
    #[must_use]
    pub const fn with_bps(self, bps: bool) -> Self {
        Self(set64(self.0, 45, 1, bool_bit(bps)))
    }

    /// With CPS (2 bits).
    #[must_use]
    pub const fn with_cps(self, cps: u8) -> Self {
        Self(set64(self.0, 46, 2, cps as u64))
    }

    /// With MPSMIN (4 bits).
    #[must_use]
    pub const fn with_mpsmin(self, mpsmin: u8) -> Self {
        Self(set64(self.0, 48, 4, mpsmin as u64))
    }

    /// With MPSMAX (4 bits).
    #[must_use]
    pub const fn with_mpsmax(self, mpsmax: u8) -> Self {
        Self(set64(self.0, 52, 4, mpsmax as u64))
    }

    /// With PMRS.
    #[must_use]
    pub const fn with_pmrs(self, pmrs: bool) -> Self {
        Self(set64(self.0, 56, 1, bool_bit(pmrs)))
    }

    /// With CMBS.
    #[must_use]
    pub const fn with_cmbs(self, cmbs: bool) -> Self {
        Self(set64(self.0, 57, 1, bool_bit(cmbs)))
    }

    /// With NSSS.
    #[must_use]
    pub const fn with_nsss(self, nsss: bool) -> Self {
        Self(set64(self.0, 58, 1, bool_bit(nsss)))
    }

    /// With CRMS (2 bits).
    #[must_use]
    pub const fn with_crms(self, crms: u8) -> Self {
        Self(set64(self.0, 59, 2, crms as u64))
    }

    /// With NSSES.
    #[must_use]
    pub const fn with_nsses(self, nsses: bool) -> Self {
        Self(set64(self.0, 61, 1, bool_bit(nsses)))
    }
}

impl fmt::Debug for Cap {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Cap")
            .field("raw", &format_args!("{:#018x}", self.0))
            .field("mqes", &self.mqes())
            .field("cqr", &self.cqr())
            .field("ams", &self.ams())
            .field("to", &self.to())
            .field("dstrd", &self.dstrd())
            .field("nssrs", &self.nssrs())
            .field("css", &format_args!("{:#04x}", self.css()))
            .field("bps", &self.bps())
            .field("cps", &self.cps())
            .field("mpsmin", &self.mpsmin())
            .field("mpsmax", &self.mpsmax())
            .field("pmrs", &self.pmrs())
            .field("cmbs", &self.cmbs())
            .field("nsss", &self.nsss())
            .field("crms", &self.crms())
            .field("nsses", &self.nsses())
            .finish()
    }
}

/// VS: Version (offset `0x08`, 4 bytes, read only): major (bits 31:16), minor (15:8), tertiary (7:0).
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct Version(pub u32);

impl Version {
    /// NVMe 1.2 (`0x00010200`).
    pub const V1_2: Version = Version::new(1, 2, 0);
    /// NVMe 1.3 (`0x00010300`).
    pub const V1_3: Version = Version::new(1, 3, 0);
    /// NVMe 1.4 (`0x00010400`).
    pub const V1_4: Version = Version::new(1, 4, 0);
    /// NVMe 2.0 (`0x00020000`).
    pub const V2_0: Version = Version::new(2, 0, 0);

    /// A version from its parts.
    #[must_use]
    pub const fn new(major: u16, minor: u8, tertiary: u8) -> Self {
        Self(((major as u32) << 16) | ((minor as u32) << 8) | tertiary as u32)
    }

    /// The raw 32-bit value.
    #[must_use]
    pub const fn raw(self) -> u32 {
        self.0
    }

    /// Major version (bits 31:16).
    #[must_use]
    pub const fn major(self) -> u16 {
        (self.0 >> 16) as u16
    }

    /// Minor version (bits 15:8).
    #[must_use]
    pub const fn minor(self) -> u8 {
        (self.0 >> 8) as u8
    }

    /// Tertiary version (bits 7:0).
    #[must_use]
    pub const fn tertiary(self) -> u8 {
        self.0 as u8
    }
}

impl fmt::Debug for Version {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Version({self})")
    }
}

impl fmt::Display for Version {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}.{}", self.major(), self.minor(), self.tertiary())
    }
}

/// Shutdown Notification (CC.SHN, bits 15:14).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ShutdownNotification {
    /// `00b`: no notification.
    None,
    /// `01b`: normal shutdown.
    Normal,
    /// `10b`: abrupt shutdown.
    Abrupt,
    /// `11b`: reserved.
    Reserved,
}

impl ShutdownNotification {
    /// Decodes the 2-bit field.
    #[must_use]
    pub const fn from_bits(bits: u8) -> Self {
        match bits & 0x3 {
            0 => Self::None,
            1 => Self::Normal,
            2 => Self::Abrupt,
            _ => Self::Reserved,
        }
    }

    /// The 2-bit field value.
    #[must_use]
    pub const fn to_bits(self) -> u8 {
        match self {
            Self::None => 0,
            Self::Normal => 1,
            Self::Abrupt => 2,
            Self::Reserved => 3,
        }
    }
}

/// Shutdown Status (CSTS.SHST, bits 3:2).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ShutdownStatus {
    /// `00b`: normal operation, no shutdown requested.
    Normal,
    /// `01b`: shutdown processing occurring.
    Occurring,
    /// `10b`: shutdown processing complete.
    Complete,
    /// `11b`: reserved.
    Reserved,
}

impl ShutdownStatus {
    /// Decodes the 2-bit field.
    #[must_use]
    pub const fn from_bits(bits: u8) -> Self {
        match bits & 0x3 {
            0 => Self::Normal,
            1 => Self::Occurring,
            2 => Self::Complete,
            _ => Self::Reserved,
        }
    }

    /// The 2-bit field value.
    #[must_use]
    pub const fn to_bits(self) -> u8 {
        match self {
            Self::Normal => 0,
            Self::Occurring => 1,
            Self::Complete => 2,
            Self::Reserved => 3,
        }
    }
}

/// CC: Controller Configuration (offset `0x14`, 4 bytes, read/write).
///
/// | bits | field |
/// | --- | --- |
/// | 0 | EN: enable |
/// | 6:4 | CSS: I/O command set selected (`000b` NVM, `110b` all supported I/O sets, `111b` admin only) |
/// | 10:7 | MPS: memory page size, 2^(12 + MPS) |
/// | 13:11 | AMS: arbitration mechanism selected (`000b` round robin) |
/// | 15:14 | SHN: shutdown notification |
/// | 19:16 | IOSQES: I/O SQ entry size, 2^n bytes (6 for 64 bytes) |
/// | 23:20 | IOCQES: I/O CQ entry size, 2^n bytes (4 for 16 bytes) |
/// | 24 | CRIME: controller ready independent of media enable |
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Cc(pub u32);

impl Cc {
    /// CC.CSS `000b`: NVM command set.
    pub const CSS_NVM: u8 = 0b000;
    /// CC.CSS `110b`: all supported I/O command sets.
    pub const CSS_ALL: u8 = 0b110;
    /// CC.CSS `111b`: admin command set only.
    pub const CSS_ADMIN_ONLY: u8 = 0b111;
    /// IOSQES for the 64-byte NVMe SQE.
    pub const IOSQES_64: u8 = 6;
    /// IOCQES for the 16-byte NVMe CQE.
    pub const IOCQES_16: u8 = 4;

    /// The raw 32-bit value.
    #[must_use]
    pub const fn raw(self) -> u32 {
        self.0
    }

    /// EN: enable.
    #[must_use]
    pub const fn en(self) -> bool {
        get32(self.0, 0, 1) != 0
    }

    /// CSS: I/O command set selected (3 bits).
    #[must_use]
    pub const fn css(self) -> u8 {
        get32(self.0, 4, 3) as u8
    }

    /// MPS: memory page size is 2^(12 + MPS).
    #[must_use]
    pub const fn mps(self) -> u8 {
        get32(self.0, 7, 4) as u8
    }

    /// Memory page size in bytes (2^(12 + MPS)).
    #[must_use]
    pub const fn page_size(self) -> u32 {
        1u32 << (12 + self.mps() as u32)
    }

    /// AMS: arbitration mechanism selected (3 bits).
    #[must_use]
    pub const fn ams(self) -> u8 {
        get32(self.0, 11, 3) as u8
    }

    /// SHN: shutdown notification.
    #[must_use]
    pub const fn shn(self) -> ShutdownNotification {
        ShutdownNotification::from_bits(get32(self.0, 14, 2) as u8)
    }

    /// IOSQES: I/O submission queue entry size, 2^n bytes.
    #[must_use]
    pub const fn iosqes(self) -> u8 {
        get32(self.0, 16, 4) as u8
    }

    /// IOCQES: I/O completion queue entry size, 2^n bytes.
    #[must_use]
    pub const fn iocqes(self) -> u8 {
        get32(self.0, 20, 4) as u8
    }

    /// CRIME: controller ready independent of media enable.
    #[must_use]
    pub const fn crime(self) -> bool {
        get32(self.0, 24, 1) != 0
    }

    /// With EN.
    #[must_use]
    pub const fn with_en(self, en: bool) -> Self {
        Self(set32(self.0, 0, 1, bool_bit(en) as u32))
    }

    /// With CSS (3 bits).
    #[must_use]
    pub const fn with_css(self, css: u8) -> Self {
        Self(set32(self.0, 4, 3, css as u32))
    }

    /// With MPS (4 bits).
    #[must_use]
    pub const fn with_mps(self, mps: u8) -> Self {
        Self(set32(self.0, 7, 4, mps as u32))
    }

    /// With AMS (3 bits).
    #[must_use]
    pub const fn with_ams(self, ams: u8) -> Self {
        Self(set32(self.0, 11, 3, ams as u32))
    }

    /// With SHN.
    #[must_use]
    pub const fn with_shn(self, shn: ShutdownNotification) -> Self {
        Self(set32(self.0, 14, 2, shn.to_bits() as u32))
    }

    /// With IOSQES (4 bits).
    #[must_use]
    pub const fn with_iosqes(self, iosqes: u8) -> Self {
        Self(set32(self.0, 16, 4, iosqes as u32))
    }

    /// With IOCQES (4 bits).
    #[must_use]
    pub const fn with_iocqes(self, iocqes: u8) -> Self {
        Self(set32(self.0, 20, 4, iocqes as u32))
    }

    /// With CRIME.
    #[must_use]
    pub const fn with_crime(self, crime: bool) -> Self {
        Self(set32(self.0, 24, 1, bool_bit(crime) as u32))
    }
}

impl fmt::Debug for Cc {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Cc")
            .field("raw", &format_args!("{:#010x}", self.0))
            .field("en", &self.en())
            .field("css", &self.css())
            .field("mps", &self.mps())
            .field("ams", &self.ams())
            .field("shn", &self.shn())
            .field("iosqes", &self.iosqes())
            .field("iocqes", &self.iocqes())
            .field("crime", &self.crime())
            .finish()
    }
}

/// CSTS: Controller Status (offset `0x1c`, 4 bytes, read only).
///
/// | bits | field |
/// | --- | --- |
/// | 0 | RDY: ready |
/// | 1 | CFS: controller fatal status |
/// | 3:2 | SHST: shutdown status |
/// | 4 | NSSRO: NVM subsystem reset occurred |
/// | 5 | PP: processing paused |
/// | 6 | ST: shutdown type |
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Csts(pub u32);

impl Csts {
    /// The raw 32-bit value.
    #[must_use]
    pub const fn raw(self) -> u32 {
        self.0
    }

    /// RDY: ready.
    #[must_use]
    pub const fn rdy(self) -> bool {
        get32(self.0, 0, 1) != 0
    }

    /// CFS: controller fatal status.
    #[must_use]
    pub const fn cfs(self) -> bool {
        get32(self.0, 1, 1) != 0
    }

    /// SHST: shutdown status.
    #[must_use]
    pub const fn shst(self) -> ShutdownStatus {
        ShutdownStatus::from_bits(get32(self.0, 2, 2) as u8)
    }

    /// NSSRO: NVM subsystem reset occurred.
    #[must_use]
    pub const fn nssro(self) -> bool {
        get32(self.0, 4, 1) != 0
    }

    /// PP: processing paused.
    #[must_use]
    pub const fn pp(self) -> bool {
        get32(self.0, 5, 1) != 0
    }

    /// ST: shutdown type (set: the shutdown was an NVM subsystem shutdown).
    #[must_use]
    pub const fn st(self) -> bool {
        get32(self.0, 6, 1) != 0
    }

    /// With RDY.
    #[must_use]
    pub const fn with_rdy(self, rdy: bool) -> Self {
        Self(set32(self.0, 0, 1, bool_bit(rdy) as u32))
    }

    /// With CFS.
    #[must_use]
    pub const fn with_cfs(self, cfs: bool) -> Self {
        Self(set32(self.0, 1, 1, bool_bit(cfs) as u32))
    }

    /// With SHST.
    #[must_use]
    pub const fn with_shst(self, shst: ShutdownStatus) -> Self {
        Self(set32(self.0, 2, 2, shst.to_bits() as u32))
    }

    /// With NSSRO.
    #[must_use]
    pub const fn with_nssro(self, nssro: bool) -> Self {
        Self(set32(self.0, 4, 1, bool_bit(nssro) as u32))
    }

    /// With PP.
    #[must_use]
    pub const fn with_pp(self, pp: bool) -> Self {
        Self(set32(self.0, 5, 1, bool_bit(pp) as u32))
    }

    /// With ST.
    #[must_use]
    pub const fn with_st(self, st: bool) -> Self {
        Self(set32(self.0, 6, 1, bool_bit(st) as u32))
    }
}

impl fmt::Debug for Csts {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Csts")
            .field("raw", &format_args!("{:#010x}", self.0))
            .field("rdy", &self.rdy())
            .field("cfs", &self.cfs())
            .field("shst", &self.shst())
            .field("nssro", &self.nssro())
            .field("pp", &self.pp())
            .field("st", &self.st())
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn property_table() {
        assert_eq!(property_width(0x00), Some(PropertyWidth::Eight));
        assert_eq!(property_width(0x08), Some(PropertyWidth::Four));
        assert_eq!(property_width(0x14), Some(PropertyWidth::Four));
        assert_eq!(property_width(0x1c), Some(PropertyWidth::Four));
        assert_eq!(property_width(0x20), Some(PropertyWidth::Four));
        // PCIe-only registers and holes are not properties over fabrics.
        for off in [0x04, 0x0c, 0x10, 0x18, 0x24, 0x28, 0x30, 0x38, 0x68, 0x1000] {
            assert_eq!(property_width(off), None, "offset {off:#x}");
        }
        assert_eq!(property_name(offset::CSTS), Some("CSTS"));
        assert_eq!(property_name(0x18), None);
    }

    #[test]
    fn attrib_size_encoding() {
        assert_eq!(PropertyWidth::from_attrib(0), Some(PropertyWidth::Four));
        assert_eq!(PropertyWidth::from_attrib(1), Some(PropertyWidth::Eight));
        assert_eq!(PropertyWidth::from_attrib(2), None);
        assert_eq!(PropertyWidth::from_attrib(0xf8), Some(PropertyWidth::Four)); // bits 7:3 reserved
        assert_eq!(PropertyWidth::Eight.to_attrib(), 1);
        assert_eq!(PropertyWidth::Eight.bytes(), 8);
    }

    #[test]
    fn cap_fields_at_spec_bits() {
        // What Linux nvmet reports: MQES 1023 (0x3ff), CSS NVM (bit 37), TO 15 (7.5 s).
        let cap = Cap::default().with_mqes(1023).with_css(Cap::CSS_NVM).with_to(15);
        assert_eq!(cap.raw(), 0x0000_0020_0f00_03ff);
        assert_eq!(cap.max_queue_entries(), 1024);
        assert_eq!(cap.timeout_ms(), 7500);

        let cap = Cap(u64::MAX);
        assert_eq!(cap.mqes(), 0xffff);
        assert!(cap.cqr());
        assert_eq!(cap.ams(), 3);
        assert_eq!(cap.dstrd(), 0xf);
        assert_eq!(cap.css(), 0xff);
        assert_eq!(cap.mpsmin(), 0xf);
        assert_eq!(cap.mpsmax(), 0xf);
        assert_eq!(cap.crms(), 3);

        assert_eq!(Cap::default().with_cqr(true).raw(), 1 << 16);
        assert_eq!(Cap::default().with_ams(0b10).raw(), 1 << 18);
        assert_eq!(Cap::default().with_dstrd(1).raw(), 1 << 32);
        assert_eq!(Cap::default().with_nssrs(true).raw(), 1 << 36);
        assert_eq!(Cap::default().with_css(Cap::CSS_IO_COMMAND_SETS).raw(), 1 << 43);
        assert_eq!(Cap::default().with_css(Cap::CSS_ADMIN_ONLY).raw(), 1 << 44);
        assert_eq!(Cap::default().with_bps(true).raw(), 1 << 45);
        assert_eq!(Cap::default().with_cps(1).raw(), 1 << 46);
        assert_eq!(Cap::default().with_mpsmin(1).raw(), 1 << 48);
        assert_eq!(Cap::default().with_mpsmax(1).raw(), 1 << 52);
        assert_eq!(Cap::default().with_pmrs(true).raw(), 1 << 56);
        assert_eq!(Cap::default().with_cmbs(true).raw(), 1 << 57);
        assert_eq!(Cap::default().with_nsss(true).raw(), 1 << 58);
        assert_eq!(Cap::default().with_crms(1).raw(), 1 << 59);
        assert_eq!(Cap::default().with_crms(2).raw(), 1 << 60);
        assert_eq!(Cap::default().with_nsses(true).raw(), 1 << 61);
        // Builders truncate to the field and leave other fields alone.
        assert_eq!(Cap(u64::MAX).with_dstrd(0).raw(), !(0xf << 32));
        assert_eq!(Cap::default().with_mpsmin(0x1f).mpsmin(), 0xf);
        assert_eq!(Cap::default().with_mpsmin(0x1f).mpsmax(), 0);
    }

    #[test]
    fn version_constants() {
        assert_eq!(Version::V1_3.raw(), 0x0001_0300);
        assert_eq!(Version::V1_4.raw(), 0x0001_0400);
        assert_eq!(Version::V2_0.raw(), 0x0002_0000);
        let v = Version(0x0001_0402);
        assert_eq!((v.major(), v.minor(), v.tertiary()), (1, 4, 2));
        assert_eq!(v.to_string(), "1.4.2");
        assert!(Version::V1_3 < Version::V2_0);
    }

    #[test]
    fn cc_as_linux_writes_it() {
        // Linux host enable: CSS NVM, MPS 0 (4 KiB), AMS RR, SHN none, IOSQES 6, IOCQES 4, EN.
        let cc = Cc(0x0046_0001);
        assert!(cc.en());
        assert_eq!(cc.css(), Cc::CSS_NVM);
        assert_eq!(cc.mps(), 0);
        assert_eq!(cc.page_size(), 4096);
        assert_eq!(cc.shn(), ShutdownNotification::None);
        assert_eq!(cc.iosqes(), Cc::IOSQES_64);
        assert_eq!(cc.iocqes(), Cc::IOCQES_16);
        let built = Cc::default().with_iosqes(6).with_iocqes(4).with_en(true);
        assert_eq!(built, cc);
        // Normal shutdown: SHN = 01b at bits 15:14.
        assert_eq!(cc.with_shn(ShutdownNotification::Normal).raw(), 0x0046_4001);
        assert_eq!(Cc(0x8000).shn(), ShutdownNotification::Abrupt);
        assert_eq!(Cc::default().with_css(Cc::CSS_ALL).raw(), 0x60);
        assert_eq!(Cc::default().with_mps(1).raw(), 1 << 7);
        assert_eq!(Cc::default().with_ams(1).raw(), 1 << 11);
        assert_eq!(Cc::default().with_crime(true).raw(), 1 << 24);
        assert_eq!(Cc(0x0046_4001).with_en(false).raw(), 0x0046_4000);
    }

    #[test]
    fn csts_bits() {
        let csts = Csts::default().with_rdy(true).with_shst(ShutdownStatus::Complete);
        assert_eq!(csts.raw(), 0b1001);
        assert!(csts.rdy());
        assert_eq!(csts.shst(), ShutdownStatus::Complete);
        assert_eq!(Csts(0b0100).shst(), ShutdownStatus::Occurring);
        assert_eq!(Csts::default().with_cfs(true).raw(), 1 << 1);
        assert_eq!(Csts::default().with_nssro(true).raw(), 1 << 4);
        assert_eq!(Csts::default().with_pp(true).raw(), 1 << 5);
        assert_eq!(Csts::default().with_st(true).raw(), 1 << 6);
        assert_eq!(csts.with_shst(ShutdownStatus::Normal).raw(), 1);
    }

    #[test]
    fn shutdown_enums_round_trip() {
        for bits in 0..4u8 {
            assert_eq!(ShutdownNotification::from_bits(bits).to_bits(), bits);
            assert_eq!(ShutdownStatus::from_bits(bits).to_bits(), bits);
        }
    }

    #[test]
    fn debug_prints_fields() {
        let s = format!("{:?}", Cc(0x0046_4001));
        assert!(s.contains("en: true"), "{s}");
        assert!(s.contains("shn: Normal"), "{s}");
        assert!(format!("{:?}", Csts(1)).contains("rdy: true"));
        assert!(format!("{:?}", Cap(0x3ff)).contains("mqes: 1023"));
        assert_eq!(format!("{:?}", Version::V1_4), "Version(1.4.0)");
    }

    #[test]
    fn nssr_value_is_nvme_ascii() {
        assert_eq!(&NSSR_RESET_VALUE.to_be_bytes(), b"NVMe");
    }
}
