//! The Discovery log page (LID 70h; NVMe Base Specification 2.0, "Discovery Log Page", formerly NVMe
//! over Fabrics 1.1 section 5.3) and the values of its entries.
//!
//! ```text
//!  0      1024     2048            1024 × (NUMREC + 1)
//!  │header│entry 0 │entry 1 │ … │
//! ```
//!
//! - [`DiscoveryLogHeader`] (1024 bytes: GENCTR, NUMREC, RECFMT) and [`DiscoveryLogEntry`] (1024 bytes);
//! - value enums [`TransportType`], [`AddressFamily`], [`DiscoverySubtype`], [`TcpSecurityType`] and the
//!   `TREQ_*` / `EFLAGS_*` bits;
//! - [`DiscoveryLogEntry::tcp`] to describe an NVMe/TCP subsystem port;
//! - [`serialize_discovery_log`] for the whole page and [`read_discovery_log`] for the window a Get Log
//!   Page command asks for (hosts read the header first, then the entries, in pieces), computed from the
//!   entries without building the page;
//! - [`DiscoveryLogPage::parse`] for the host side.
//!
//! **TRADDR / TRSVCID padding.** The specification calls these fields ASCII strings, which its
//! conventions define as left justified and padded with spaces; SPDK pads them with spaces. Linux nvmet
//! copies NUL-padded configfs strings instead. Linux hosts do not parse the page in the kernel; nvme-cli
//! and libnvme strip trailing spaces (nvme-cli since 2017, libnvme `sanitize_discovery_log_entry`) and
//! stop at NUL, so both forms work there. This module writes the specification's space padding and reads
//! either form ([`field_str`]). SUBNQN is an NQN: UTF-8, NUL terminated and NUL padded.
//!
//! Offsets were checked against Linux's `struct nvmf_disc_rsp_page_hdr` / `nvmf_disc_rsp_page_entry`.

use core::net::{Ipv4Addr, Ipv6Addr};

use zerocopy::little_endian::{U16, U64};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

use super::identify::{field_str, fill_nqn, fill_space_padded, StringFieldError};
use super::log::copy_window;

/// The well-known NQN of discovery subsystems.
pub const DISCOVERY_NQN: &str = "nqn.2014-08.org.nvmexpress.discovery";

/// Size of the discovery log page header.
pub const DISCOVERY_LOG_HEADER_LEN: usize = 1024;

/// Size of one discovery log page entry.
pub const DISCOVERY_LOG_ENTRY_LEN: usize = 1024;

/// CNTLID of an entry for a subsystem using the dynamic controller model (any controller).
pub use super::fabrics::CNTLID_DYNAMIC;

/// The ASQSZ [`DiscoveryLogEntry::tcp`] reports: the 32 admin queue entries the specification requires
/// as a minimum (and Linux nvmet reports).
pub const DEFAULT_ASQSZ: u16 = 32;

/// Transport Type (TRTYPE).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
#[repr(u8)]
pub enum TransportType {
    /// RDMA.
    Rdma = 1,
    /// Fibre Channel.
    FibreChannel = 2,
    /// TCP.
    Tcp = 3,
    /// Intra-host transport (loopback; reserved for host use).
    IntraHost = 254,
}

impl TransportType {
    /// Decodes a TRTYPE value.
    #[must_use]
    pub const fn from_u8(value: u8) -> Option<Self> {
        Some(match value {
            1 => Self::Rdma,
            2 => Self::FibreChannel,
            3 => Self::Tcp,
            254 => Self::IntraHost,
            _ => return None,
        })
    }

    /// The wire value.
    #[must_use]
    pub const fn as_u8(self) -> u8 {
        self as u8
    }

    /// The name nvme-cli uses.
    #[must_use]
    pub const fn name(self) -> &'static str {
        match self {
            Self::Rdma => "rdma",
            Self::FibreChannel => "fc",
            Self::Tcp => "tcp",
            Self::IntraHost => "loop",
        }
    }
}

/// Address Family (ADRFAM).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
#[repr(u8)]
pub enum AddressFamily {
    /// IPv4.
    Ipv4 = 1,
    /// IPv6.
    Ipv6 = 2,
    /// InfiniBand.
    InfiniBand = 3,
    /// Fibre Channel.
    FibreChannel = 4,
    /// Intra-host transport.
    IntraHost = 254,
}

impl AddressFamily {
    /// Decodes an ADRFAM value.
    #[must_use]
    pub const fn from_u8(value: u8) -> Option<Self> {
        Some(match value {
            1 => Self::Ipv4,
            2 => Self::Ipv6,
            3 => Self::InfiniBand,
            4 => Self::FibreChannel,
            254 => Self::IntraHost,
            _ => return None,
        })
    }

    /// The wire value.
    #[must_use]
    pub const fn as_u8(self) -> u8 {
        self as u8
    }

    /// The name nvme-cli uses.
    #[must_use]
    pub const fn name(self) -> &'static str {
        match self {
            Self::Ipv4 => "ipv4",
            Self::Ipv6 => "ipv6",
            Self::InfiniBand => "infiniband",
            Self::FibreChannel => "fibre-channel",
            Self::IntraHost => "loop",
        }
    }
}

/// Subsystem Type (SUBTYPE) of a discovery log entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
#[repr(u8)]
pub enum DiscoverySubtype {
    /// A referral to another discovery service.
    Referral = 1,
    /// An NVM subsystem (I/O controllers).
    NvmSubsystem = 2,
    /// The current discovery subsystem itself.
    CurrentDiscovery = 3,
}

impl DiscoverySubtype {
    /// Decodes a SUBTYPE value.
    #[must_use]
    pub const fn from_u8(value: u8) -> Option<Self> {
        Some(match value {
            1 => Self::Referral,
            2 => Self::NvmSubsystem,
            3 => Self::CurrentDiscovery,
            _ => return None,
        })
    }

    /// The wire value.
    #[must_use]
    pub const fn as_u8(self) -> u8 {
        self as u8
    }

    /// A human-readable name.
    #[must_use]
    pub const fn name(self) -> &'static str {
        match self {
            Self::Referral => "discovery subsystem referral",
            Self::NvmSubsystem => "nvme subsystem",
            Self::CurrentDiscovery => "current discovery subsystem",
        }
    }
}

/// TCP Security Type (SECTYPE, byte 0 of the TSAS of a TCP entry).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
#[repr(u8)]
pub enum TcpSecurityType {
    /// No security.
    None = 0,
    /// TLS 1.2 (deprecated for NVMe/TCP).
    Tls12 = 1,
    /// TLS 1.3.
    Tls13 = 2,
}

impl TcpSecurityType {
    /// Decodes a SECTYPE value.
    #[must_use]
    pub const fn from_u8(value: u8) -> Option<Self> {
        Some(match value {
            0 => Self::None,
            1 => Self::Tls12,
            2 => Self::Tls13,
            _ => return None,
        })
    }

    /// The wire value.
    #[must_use]
    pub const fn as_u8(self) -> u8 {
        self as u8
    }
}

/// TREQ bits 1:0: secure channel requirement.
pub const TREQ_SECURE_CHANNEL_MASK: u8 = 0b11;
/// TREQ secure channel: not specified.
pub const TREQ_SECURE_CHANNEL_NOT_SPECIFIED: u8 = 0;
/// TREQ secure channel: required.
pub const TREQ_SECURE_CHANNEL_REQUIRED: u8 = 1;
/// TREQ secure channel: not required.
pub const TREQ_SECURE_CHANNEL_NOT_REQUIRED: u8 = 2;
/// TREQ bit 2: the controller can disable SQ flow control (Connect CATTR bit 2); Linux nvmet sets it.
pub const TREQ_DISABLE_SQ_FLOW_CONTROL: u8 = 1 << 2;

/// EFLAGS bit 0 (DUPRETINFO): duplicate returned information — the same port is reported in another
/// entry of this log page.
pub const EFLAGS_DUPLICATE_RETURNED_INFO: u16 = 1 << 0;
/// EFLAGS bit 1 (EPCSD): explicit persistent connection supported for discovery.
pub const EFLAGS_EXPLICIT_PERSISTENT_CONNECTION: u16 = 1 << 1;
/// EFLAGS bit 2 (NCC): no CDC connectivity.
pub const EFLAGS_NO_CDC_CONNECTIVITY: u16 = 1 << 2;

/// The discovery log page header: 1024 bytes.
///
/// | bytes | field |
/// | --- | --- |
/// | 0..8 | GENCTR: generation counter, changed whenever the page content changes |
/// | 8..16 | NUMREC: number of records (entries) |
/// | 16..18 | RECFMT: record format (0) |
/// | 18..1024 | reserved |
#[derive(Clone, Copy, Debug, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct DiscoveryLogHeader {
    /// Generation Counter.
    pub genctr: U64,
    /// Number of Records.
    pub numrec: U64,
    /// Record Format.
    pub recfmt: U16,
    /// Reserved.
    pub rsvd: [u8; 1006],
}

impl DiscoveryLogHeader {
    /// A header for `numrec` entries at generation `genctr`, record format 0.
    #[must_use]
    pub fn new(genctr: u64, numrec: u64) -> Self {
        let mut h = <Self as zerocopy::FromZeros>::new_zeroed();
        h.genctr = U64::new(genctr);
        h.numrec = U64::new(numrec);
        h
    }
}

/// A discovery log page entry: 1024 bytes.
///
/// | bytes | field |
/// | --- | --- |
/// | 0 | TRTYPE: transport type |
/// | 1 | ADRFAM: address family |
/// | 2 | SUBTYPE: subsystem type |
/// | 3 | TREQ: transport requirements |
/// | 4..6 | PORTID: NVM subsystem port ID |
/// | 6..8 | CNTLID: controller ID (`FFFFh`: dynamic model, any) |
/// | 8..10 | ASQSZ: admin max SQ size |
/// | 10..12 | EFLAGS: entry flags |
/// | 12..32 | reserved |
/// | 32..64 | TRSVCID: transport service identifier (TCP port, ASCII) |
/// | 64..256 | reserved |
/// | 256..512 | SUBNQN: NVM subsystem qualified name |
/// | 512..768 | TRADDR: transport address (ASCII) |
/// | 768..1024 | TSAS: transport specific address subtype (TCP: SECTYPE in byte 0) |
#[derive(Clone, Copy, Debug, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct DiscoveryLogEntry {
    /// Transport Type ([`TransportType`]).
    pub trtype: u8,
    /// Address Family ([`AddressFamily`]).
    pub adrfam: u8,
    /// Subsystem Type ([`DiscoverySubtype`]).
    pub subtype: u8,
    /// Transport Requirements (`TREQ_*`).
    pub treq: u8,
    /// Port ID.
    pub portid: U16,
    /// Controller ID.
    pub cntlid: U16,
    /// Admin Max SQ Size.
    pub asqsz: U16,
    /// Entry Flags (`EFLAGS_*`).
    pub eflags: U16,
    /// Reserved.
    pub rsvd12: [u8; 20],
    /// Transport Service Identifier (ASCII, space padded).
    pub trsvcid: [u8; 32],
    /// Reserved.
    pub rsvd64: [u8; 192],
    /// NVM Subsystem Qualified Name (UTF-8, NUL padded).
    pub subnqn: [u8; 256],
    /// Transport Address (ASCII, space padded).
    pub traddr: [u8; 256],
    /// Transport Specific Address Subtype.
    pub tsas: [u8; 256],
}

/// Why a discovery log entry could not be built.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum DiscoveryEntryError {
    /// SUBNQN does not fit or is not a valid NQN string.
    #[error("invalid SUBNQN")]
    SubNqn(#[source] StringFieldError),
    /// TRADDR does not fit or is not printable ASCII.
    #[error("invalid TRADDR")]
    Traddr(#[source] StringFieldError),
    /// TRSVCID does not fit or is not printable ASCII.
    #[error("invalid TRSVCID")]
    Trsvcid(#[source] StringFieldError),
    /// TRADDR is neither an IPv4 nor an IPv6 address literal.
    #[error("TRADDR is not an IPv4 or IPv6 address")]
    NotAnIpAddress,
}

impl DiscoveryLogEntry {
    /// An all-zero entry.
    #[must_use]
    pub fn zeroed() -> Self {
        <Self as zerocopy::FromZeros>::new_zeroed()
    }

    /// An entry for an NVMe/TCP port: TRTYPE TCP, ADRFAM from the form of `traddr` (an IPv4 or IPv6
    /// literal, e.g. `"192.0.2.1"`, `"2001:db8::1"`), CNTLID [`CNTLID_DYNAMIC`], ASQSZ
    /// [`DEFAULT_ASQSZ`], TREQ "not specified", SECTYPE none, EFLAGS 0. TRADDR and TRSVCID (e.g. `"4420"`)
    /// are space padded, SUBNQN NUL padded.
    ///
    /// Adjust the public fields afterwards for anything else (TLS: `treq` and
    /// [`DiscoveryLogEntry::set_tcp_security_type`]; SQ flow control disable: [`TREQ_DISABLE_SQ_FLOW_CONTROL`]).
    pub fn tcp(
        subnqn: &str,
        traddr: &str,
        trsvcid: &str,
        portid: u16,
        subtype: DiscoverySubtype,
    ) -> Result<Self, DiscoveryEntryError> {
        let adrfam = if traddr.parse::<Ipv4Addr>().is_ok() {
            AddressFamily::Ipv4
        } else if traddr.parse::<Ipv6Addr>().is_ok() {
            AddressFamily::Ipv6
        } else {
            return Err(DiscoveryEntryError::NotAnIpAddress);
        };
        let mut e = Self::zeroed();
        e.trtype = TransportType::Tcp.as_u8();
        e.adrfam = adrfam.as_u8();
        e.subtype = subtype.as_u8();
        e.treq = TREQ_SECURE_CHANNEL_NOT_SPECIFIED;
        e.portid = U16::new(portid);
        e.cntlid = U16::new(CNTLID_DYNAMIC);
        e.asqsz = U16::new(DEFAULT_ASQSZ);
        e.set_subnqn(subnqn).map_err(DiscoveryEntryError::SubNqn)?;
        e.set_traddr(traddr).map_err(DiscoveryEntryError::Traddr)?;
        e.set_trsvcid(trsvcid).map_err(DiscoveryEntryError::Trsvcid)?;
        e.set_tcp_security_type(TcpSecurityType::None);
        Ok(e)
    }

    /// Sets TRSVCID (at most 32 printable ASCII bytes, space padded).
    pub fn set_trsvcid(&mut self, trsvcid: &str) -> Result<(), StringFieldError> {
        fill_space_padded(&mut self.trsvcid, trsvcid)
    }

    /// Sets TRADDR (at most 256 printable ASCII bytes, space padded).
    pub fn set_traddr(&mut self, traddr: &str) -> Result<(), StringFieldError> {
        fill_space_padded(&mut self.traddr, traddr)
    }

    /// Sets SUBNQN (at most 223 bytes, NUL padded).
    pub fn set_subnqn(&mut self, subnqn: &str) -> Result<(), StringFieldError> {
        fill_nqn(&mut self.subnqn, subnqn)
    }

    /// TRSVCID without padding (space or NUL); `None` if not UTF-8.
    #[must_use]
    pub fn trsvcid(&self) -> Option<&str> {
        field_str(&self.trsvcid)
    }

    /// TRADDR without padding (space or NUL); `None` if not UTF-8.
    #[must_use]
    pub fn traddr(&self) -> Option<&str> {
        field_str(&self.traddr)
    }

    /// SUBNQN up to its terminator; `None` if not UTF-8.
    #[must_use]
    pub fn subnqn(&self) -> Option<&str> {
        field_str(&self.subnqn)
    }

    /// TRTYPE, if known.
    #[must_use]
    pub fn transport_type(&self) -> Option<TransportType> {
        TransportType::from_u8(self.trtype)
    }

    /// ADRFAM, if known.
    #[must_use]
    pub fn address_family(&self) -> Option<AddressFamily> {
        AddressFamily::from_u8(self.adrfam)
    }

    /// SUBTYPE, if known.
    #[must_use]
    pub fn subsystem_type(&self) -> Option<DiscoverySubtype> {
        DiscoverySubtype::from_u8(self.subtype)
    }

    /// The secure channel requirement (TREQ bits 1:0, `TREQ_SECURE_CHANNEL_*`).
    #[must_use]
    pub fn secure_channel(&self) -> u8 {
        self.treq & TREQ_SECURE_CHANNEL_MASK
    }

    /// SECTYPE of a TCP entry (TSAS byte 0), if known.
    #[must_use]
    pub fn tcp_security_type(&self) -> Option<TcpSecurityType> {
        TcpSecurityType::from_u8(self.tsas.first().copied().unwrap_or(0))
    }

    /// Sets SECTYPE of a TCP entry (TSAS byte 0).
    pub fn set_tcp_security_type(&mut self, sectype: TcpSecurityType) {
        if let Some(b) = self.tsas.first_mut() {
            *b = sectype.as_u8();
        }
    }
}

impl Default for DiscoveryLogEntry {
    fn default() -> Self {
        Self::zeroed()
    }
}

/// Length in bytes of a discovery log page with `numrec` entries (saturating; never overflows).
#[must_use]
pub fn discovery_log_len(numrec: u64) -> u64 {
    numrec.saturating_add(1).saturating_mul(DISCOVERY_LOG_ENTRY_LEN as u64)
}

/// The whole discovery log page: header (GENCTR `genctr`, NUMREC `entries.len()`) then the entries.
#[must_use]
pub fn serialize_discovery_log(genctr: u64, entries: &[DiscoveryLogEntry]) -> Vec<u8> {
    let header = DiscoveryLogHeader::new(genctr, entries.len() as u64);
    let mut page = Vec::with_capacity(DISCOVERY_LOG_HEADER_LEN + entries.as_bytes().len());
    page.extend_from_slice(header.as_bytes());
    page.extend_from_slice(entries.as_bytes());
    page
}

/// Writes bytes `[offset, offset + out.len())` of the discovery log page of `genctr` and `entries` into
/// `out` — the data of a Get Log Page command with that offset and length — without building the page.
/// Bytes past the end of the page are zero (the specification's answer for reads beyond the end).
///
/// Never panics; the work is proportional to `out.len()`, whatever `offset` and the number of entries.
pub fn read_discovery_log(genctr: u64, entries: &[DiscoveryLogEntry], offset: u64, out: &mut [u8]) {
    let header = DiscoveryLogHeader::new(genctr, entries.len() as u64);
    // Header part (zero-fills everything after the header within the window).
    copy_window(header.as_bytes(), offset, out);
    // Entries part: the window of the entry array, placed after the header.
    let header_len = DISCOVERY_LOG_HEADER_LEN as u64;
    let entry_bytes = entries.as_bytes();
    match offset.checked_sub(header_len) {
        Some(entry_offset) => copy_window(entry_bytes, entry_offset, out),
        None => {
            // The window starts inside the header: entries begin `header_len - offset` bytes in.
            let skip = usize::try_from(header_len - offset).unwrap_or(usize::MAX);
            if let Some(rest) = out.get_mut(skip..) {
                copy_window(entry_bytes, 0, rest);
            }
        }
    }
}

/// A received discovery log page, read in place.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DiscoveryLogPage<'a> {
    /// The header.
    pub header: &'a DiscoveryLogHeader,
    /// The NUMREC entries.
    pub entries: &'a [DiscoveryLogEntry],
}

/// Why received bytes are not a complete discovery log page.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum DiscoveryLogError {
    /// Fewer bytes than the header, or than NUMREC entries need.
    #[error("discovery log page needs {needed} bytes, got {available}")]
    Truncated {
        /// Bytes the page needs (saturating).
        needed: u64,
        /// Bytes received.
        available: usize,
    },
}

impl<'a> DiscoveryLogPage<'a> {
    /// Reads a page: the header, then NUMREC entries; bytes after them are ignored. Never panics.
    pub fn parse(bytes: &'a [u8]) -> Result<Self, DiscoveryLogError> {
        let truncated = |needed: u64| DiscoveryLogError::Truncated { needed, available: bytes.len() };
        let (header, rest) = DiscoveryLogHeader::ref_from_prefix(bytes)
            .map_err(|_| truncated(DISCOVERY_LOG_HEADER_LEN as u64))?;
        let numrec = header.numrec.get();
        let needed = discovery_log_len(numrec);
        let count = usize::try_from(numrec).map_err(|_| truncated(needed))?;
        let (entries, _) =
            <[DiscoveryLogEntry]>::ref_from_prefix_with_elems(rest, count).map_err(|_| truncated(needed))?;
        Ok(Self { header, entries })
    }

    /// GENCTR.
    #[must_use]
    pub fn genctr(&self) -> u64 {
        self.header.genctr.get()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use core::mem::{offset_of, size_of};

    const NQN: &str = "nqn.2024-01.io.xatastor:vol1";

    #[test]
    fn layout_matches_spec() {
        assert_eq!(size_of::<DiscoveryLogHeader>(), DISCOVERY_LOG_HEADER_LEN);
        assert_eq!(offset_of!(DiscoveryLogHeader, numrec), 8);
        assert_eq!(offset_of!(DiscoveryLogHeader, recfmt), 16);
        type E = DiscoveryLogEntry;
        assert_eq!(size_of::<E>(), DISCOVERY_LOG_ENTRY_LEN);
        assert_eq!(offset_of!(E, adrfam), 1);
        assert_eq!(offset_of!(E, subtype), 2);
        assert_eq!(offset_of!(E, treq), 3);
        assert_eq!(offset_of!(E, portid), 4);
        assert_eq!(offset_of!(E, cntlid), 6);
        assert_eq!(offset_of!(E, asqsz), 8);
        assert_eq!(offset_of!(E, eflags), 10);
        assert_eq!(offset_of!(E, trsvcid), 32);
        assert_eq!(offset_of!(E, subnqn), 256);
        assert_eq!(offset_of!(E, traddr), 512);
        assert_eq!(offset_of!(E, tsas), 768);
    }

    #[test]
    fn value_enums_round_trip() {
        for v in 0..=255u8 {
            if let Some(t) = TransportType::from_u8(v) {
                assert_eq!(t.as_u8(), v);
                assert!(!t.name().is_empty());
            }
            if let Some(a) = AddressFamily::from_u8(v) {
                assert_eq!(a.as_u8(), v);
                assert!(!a.name().is_empty());
            }
            if let Some(s) = DiscoverySubtype::from_u8(v) {
                assert_eq!(s.as_u8(), v);
                assert!(!s.name().is_empty());
            }
            if let Some(s) = TcpSecurityType::from_u8(v) {
                assert_eq!(s.as_u8(), v);
            }
        }
        assert_eq!(TransportType::from_u8(3), Some(TransportType::Tcp));
        assert_eq!(TransportType::from_u8(254), Some(TransportType::IntraHost));
        assert_eq!(AddressFamily::from_u8(2), Some(AddressFamily::Ipv6));
        assert_eq!(DiscoverySubtype::from_u8(3), Some(DiscoverySubtype::CurrentDiscovery));
        assert_eq!(TcpSecurityType::from_u8(2), Some(TcpSecurityType::Tls13));
        assert_eq!(TcpSecurityType::from_u8(0xff), None);
    }

    fn expected_tcp_entry() -> [u8; 1024] {
        let mut raw = [0u8; 1024];
        raw[0] = 3; // TCP
        raw[1] = 1; // IPv4
        raw[2] = 2; // NVM subsystem
        raw[3] = 0;
        raw[4..6].copy_from_slice(&[0x01, 0x00]);
        raw[6..8].copy_from_slice(&[0xff, 0xff]);
        raw[8..10].copy_from_slice(&[32, 0]);
        raw[32..64].fill(b' ');
        raw[32..36].copy_from_slice(b"4420");
        raw[256..256 + NQN.len()].copy_from_slice(NQN.as_bytes());
        raw[512..768].fill(b' ');
        raw[512..521].copy_from_slice(b"192.0.2.7");
        raw
    }

    #[test]
    fn tcp_entry_byte_exact() {
        let e = DiscoveryLogEntry::tcp(NQN, "192.0.2.7", "4420", 1, DiscoverySubtype::NvmSubsystem).unwrap();
        assert_eq!(e.as_bytes(), &expected_tcp_entry());
        assert_eq!(e.transport_type(), Some(TransportType::Tcp));
        assert_eq!(e.address_family(), Some(AddressFamily::Ipv4));
        assert_eq!(e.subsystem_type(), Some(DiscoverySubtype::NvmSubsystem));
        assert_eq!(e.secure_channel(), TREQ_SECURE_CHANNEL_NOT_SPECIFIED);
        assert_eq!(e.tcp_security_type(), Some(TcpSecurityType::None));
        assert_eq!(e.traddr(), Some("192.0.2.7"));
        assert_eq!(e.trsvcid(), Some("4420"));
        assert_eq!(e.subnqn(), Some(NQN));
    }

    #[test]
    fn tcp_entry_ipv6_and_errors() {
        let mut e = DiscoveryLogEntry::tcp(
            DISCOVERY_NQN,
            "2001:db8::1",
            "8009",
            7,
            DiscoverySubtype::CurrentDiscovery,
        )
        .unwrap();
        assert_eq!(e.address_family(), Some(AddressFamily::Ipv6));
        e.treq = TREQ_SECURE_CHANNEL_REQUIRED | TREQ_DISABLE_SQ_FLOW_CONTROL;
        e.set_tcp_security_type(TcpSecurityType::Tls13);
        assert_eq!(e.as_bytes()[3], 0x05);
        assert_eq!(e.as_bytes()[768], 2);
        assert_eq!(e.secure_channel(), TREQ_SECURE_CHANNEL_REQUIRED);

        assert_eq!(
            DiscoveryLogEntry::tcp(NQN, "storage.example", "4420", 1, DiscoverySubtype::NvmSubsystem),
            Err(DiscoveryEntryError::NotAnIpAddress)
        );
        assert!(matches!(
            DiscoveryLogEntry::tcp(NQN, "192.0.2.1", &"9".repeat(33), 1, DiscoverySubtype::NvmSubsystem),
            Err(DiscoveryEntryError::Trsvcid(StringFieldError::TooLong { len: 33, max: 32 }))
        ));
        assert!(matches!(
            DiscoveryLogEntry::tcp(&"n".repeat(224), "192.0.2.1", "4420", 1, DiscoverySubtype::NvmSubsystem),
            Err(DiscoveryEntryError::SubNqn(StringFieldError::TooLong { .. }))
        ));
    }

    #[test]
    fn nul_padded_fields_from_linux_nvmet_read_back() {
        let mut raw = expected_tcp_entry();
        raw[32..64].fill(0);
        raw[32..36].copy_from_slice(b"4420");
        raw[512..768].fill(0);
        raw[512..521].copy_from_slice(b"192.0.2.7");
        let e = DiscoveryLogEntry::read_from_bytes(&raw[..]).unwrap();
        assert_eq!(e.trsvcid(), Some("4420"));
        assert_eq!(e.traddr(), Some("192.0.2.7"));
    }

    fn sample_entries(n: u16) -> Vec<DiscoveryLogEntry> {
        (0..n)
            .map(|i| {
                let mut e =
                    DiscoveryLogEntry::tcp(NQN, "192.0.2.7", "4420", i, DiscoverySubtype::NvmSubsystem)
                        .unwrap();
                // Make every byte position distinguishable across entries.
                e.rsvd64.fill(i as u8);
                e
            })
            .collect()
    }

    #[test]
    fn serialized_page_byte_exact() {
        let entries = sample_entries(2);
        let page = serialize_discovery_log(0x0102, &entries);
        assert_eq!(page.len() as u64, discovery_log_len(2));
        assert_eq!(page.len(), 3072);
        let mut header = [0u8; 1024];
        header[0..2].copy_from_slice(&[0x02, 0x01]);
        header[8] = 2;
        assert_eq!(&page[..1024], &header[..]);
        assert_eq!(&page[1024..2048], entries[0].as_bytes());
        assert_eq!(&page[2048..], entries[1].as_bytes());

        let parsed = DiscoveryLogPage::parse(&page).unwrap();
        assert_eq!(parsed.genctr(), 0x0102);
        assert_eq!(parsed.header.recfmt.get(), 0);
        assert_eq!(parsed.entries, &entries[..]);
        assert_eq!(parsed.entries[1].portid.get(), 1);
    }

    #[test]
    fn windows_match_the_serialized_page() {
        let entries = sample_entries(3);
        let page = serialize_discovery_log(42, &entries);
        let total = page.len() as u64;
        let offsets = [0u64, 1, 16, 1000, 1023, 1024, 1025, 2047, 2048, 3000, 4095, 4096, 5000];
        let lens = [0usize, 1, 4, 16, 1024, 1500, 4096, 6000];
        for &offset in &offsets {
            for &len in &lens {
                let mut out = vec![0xeeu8; len];
                read_discovery_log(42, &entries, offset, &mut out);
                let mut want = vec![0u8; len];
                copy_window(&page, offset, &mut want);
                assert_eq!(out, want, "offset {offset} len {len}");
                if offset >= total {
                    assert!(out.iter().all(|&b| b == 0));
                }
            }
        }
    }

    #[test]
    fn windows_with_no_entries_and_extreme_offsets() {
        let mut out = [0xeeu8; 2048];
        read_discovery_log(9, &[], 0, &mut out);
        assert_eq!(out[0], 9);
        assert!(out[1..].iter().all(|&b| b == 0));
        let entries = sample_entries(1);
        for offset in [u64::MAX, u64::MAX - 1, 1 << 40, u64::from(u32::MAX)] {
            let mut out = [0xeeu8; 64];
            read_discovery_log(1, &entries, offset, &mut out);
            assert_eq!(out, [0; 64]);
        }
    }

    #[test]
    fn parser_rejects_truncated_pages() {
        let entries = sample_entries(2);
        let page = serialize_discovery_log(1, &entries);
        assert_eq!(
            DiscoveryLogPage::parse(&page[..100]),
            Err(DiscoveryLogError::Truncated { needed: 1024, available: 100 })
        );
        assert_eq!(
            DiscoveryLogPage::parse(&page[..3071]),
            Err(DiscoveryLogError::Truncated { needed: 3072, available: 3071 })
        );
        // A header claiming an absurd record count.
        let mut bogus = page.clone();
        bogus[8..16].copy_from_slice(&u64::MAX.to_le_bytes());
        assert_eq!(
            DiscoveryLogPage::parse(&bogus),
            Err(DiscoveryLogError::Truncated { needed: u64::MAX, available: 3072 })
        );
        // Trailing bytes are ignored.
        let mut longer = page.clone();
        longer.extend_from_slice(&[0xff; 10]);
        assert_eq!(DiscoveryLogPage::parse(&longer).unwrap().entries.len(), 2);
        assert!(DiscoveryLogPage::parse(&[]).is_err());
    }

    proptest::proptest! {
        #[test]
        fn any_window_matches_the_serialized_page(
            n in 0u16..5,
            genctr in proptest::prelude::any::<u64>(),
            offset in 0u64..8000,
            len in 0usize..7000,
        ) {
            let entries = sample_entries(n);
            let page = serialize_discovery_log(genctr, &entries);
            let mut out = vec![0xeeu8; len];
            read_discovery_log(genctr, &entries, offset, &mut out);
            let mut want = vec![0u8; len];
            copy_window(&page, offset, &mut want);
            proptest::prop_assert_eq!(out, want);
        }

        #[test]
        fn parser_never_panics(bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..3000)) {
            let _ = DiscoveryLogPage::parse(&bytes);
        }
    }
}
