//! Completion status codes (NVMe Base Specification, "Status Field Definition"; NVMe over Fabrics,
//! "Fabrics Command Status Values").
//!
//! The 15-bit status field sits in bits 15:1 of CQE bytes 14..16:
//!
//! ```text
//!  14   13   12..11   10..8   7..0
//! DNR  More   CRD      SCT     SC
//! ```

use core::fmt;

/// Status Code Type (SCT).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum StatusCodeType {
    /// Generic command status (`0x0`).
    Generic,
    /// Command specific status (`0x1`), including the Fabrics command statuses.
    CommandSpecific,
    /// Media and data integrity errors (`0x2`).
    MediaError,
    /// Path related status (`0x3`).
    Path,
    /// Vendor specific (`0x7`).
    VendorSpecific,
    /// A reserved SCT value.
    Reserved(u8),
}

impl StatusCodeType {
    /// The 3-bit wire value.
    #[must_use]
    pub const fn to_bits(self) -> u8 {
        match self {
            Self::Generic => 0,
            Self::CommandSpecific => 1,
            Self::MediaError => 2,
            Self::Path => 3,
            Self::VendorSpecific => 7,
            Self::Reserved(v) => v & 0x7,
        }
    }

    /// Decodes a 3-bit wire value.
    #[must_use]
    pub const fn from_bits(bits: u8) -> Self {
        match bits & 0x7 {
            0 => Self::Generic,
            1 => Self::CommandSpecific,
            2 => Self::MediaError,
            3 => Self::Path,
            7 => Self::VendorSpecific,
            v => Self::Reserved(v),
        }
    }
}

/// A completion status: the 15-bit status field of a CQE.
///
/// Constants name the statuses a fabrics target returns; any other value can be built with
/// [`Status::new`]. Failing NVMe commands are reported with a `Status`, never with a Rust error.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Status(u16);

const SCT_SHIFT: u16 = 8;
const CRD_SHIFT: u16 = 11;
const MORE_BIT: u16 = 1 << 13;
const DNR_BIT: u16 = 1 << 14;

macro_rules! statuses {
    ($($(#[$doc:meta])* $name:ident = ($sct:expr, $sc:expr, $text:expr);)*) => {
        impl Status {
            $( $(#[$doc])* pub const $name: Status = Status::new($sct, $sc); )*

            /// The specification's name of this status (without the DNR/More/CRD bits), if it is one
            /// this crate knows.
            #[must_use]
            pub fn name(self) -> Option<&'static str> {
                match self.without_flags() {
                    $( Status::$name => Some($text), )*
                    _ => None,
                }
            }
        }
    };
}

statuses! {
    /// Successful completion.
    SUCCESS = (StatusCodeType::Generic, 0x00, "Successful Completion");
    /// Invalid Command Opcode.
    INVALID_OPCODE = (StatusCodeType::Generic, 0x01, "Invalid Command Opcode");
    /// Invalid Field in Command.
    INVALID_FIELD = (StatusCodeType::Generic, 0x02, "Invalid Field in Command");
    /// Command ID Conflict.
    COMMAND_ID_CONFLICT = (StatusCodeType::Generic, 0x03, "Command ID Conflict");
    /// Data Transfer Error.
    DATA_TRANSFER_ERROR = (StatusCodeType::Generic, 0x04, "Data Transfer Error");
    /// Internal Error.
    INTERNAL_ERROR = (StatusCodeType::Generic, 0x06, "Internal Error");
    /// Command Abort Requested.
    ABORT_REQUESTED = (StatusCodeType::Generic, 0x07, "Command Abort Requested");
    /// Command Aborted due to SQ Deletion.
    ABORTED_SQ_DELETION = (StatusCodeType::Generic, 0x08, "Command Aborted due to SQ Deletion");
    /// Invalid Namespace or Format.
    INVALID_NAMESPACE = (StatusCodeType::Generic, 0x0b, "Invalid Namespace or Format");
    /// Command Sequence Error.
    COMMAND_SEQUENCE_ERROR = (StatusCodeType::Generic, 0x0c, "Command Sequence Error");
    /// Invalid SGL Segment Descriptor.
    INVALID_SGL_SEGMENT_DESCRIPTOR = (StatusCodeType::Generic, 0x0d, "Invalid SGL Segment Descriptor");
    /// Invalid Number of SGL Descriptors.
    INVALID_SGL_DESCRIPTOR_COUNT = (StatusCodeType::Generic, 0x0e, "Invalid Number of SGL Descriptors");
    /// Data SGL Length Invalid.
    DATA_SGL_LENGTH_INVALID = (StatusCodeType::Generic, 0x0f, "Data SGL Length Invalid");
    /// Metadata SGL Length Invalid.
    METADATA_SGL_LENGTH_INVALID = (StatusCodeType::Generic, 0x10, "Metadata SGL Length Invalid");
    /// SGL Descriptor Type Invalid.
    SGL_DESCRIPTOR_TYPE_INVALID = (StatusCodeType::Generic, 0x11, "SGL Descriptor Type Invalid");
    /// SGL Offset Invalid.
    SGL_OFFSET_INVALID = (StatusCodeType::Generic, 0x16, "SGL Offset Invalid");
    /// Host Identifier Inconsistent Format.
    HOST_ID_INCONSISTENT_FORMAT = (StatusCodeType::Generic, 0x18, "Host Identifier Inconsistent Format");
    /// Keep Alive Timer Expired.
    KEEP_ALIVE_EXPIRED = (StatusCodeType::Generic, 0x19, "Keep Alive Timer Expired");
    /// Keep Alive Timeout Invalid.
    KEEP_ALIVE_INVALID = (StatusCodeType::Generic, 0x1a, "Keep Alive Timeout Invalid");
    /// Namespace is Write Protected.
    NAMESPACE_WRITE_PROTECTED = (StatusCodeType::Generic, 0x20, "Namespace is Write Protected");
    /// Command Interrupted.
    COMMAND_INTERRUPTED = (StatusCodeType::Generic, 0x21, "Command Interrupted");
    /// Transient Transport Error.
    TRANSIENT_TRANSPORT_ERROR = (StatusCodeType::Generic, 0x22, "Transient Transport Error");
    /// LBA Out of Range (NVM command set).
    LBA_OUT_OF_RANGE = (StatusCodeType::Generic, 0x80, "LBA Out of Range");
    /// Capacity Exceeded (NVM command set).
    CAPACITY_EXCEEDED = (StatusCodeType::Generic, 0x81, "Capacity Exceeded");
    /// Namespace Not Ready (NVM command set).
    NAMESPACE_NOT_READY = (StatusCodeType::Generic, 0x82, "Namespace Not Ready");

    /// Invalid Queue Identifier.
    INVALID_QUEUE_ID = (StatusCodeType::CommandSpecific, 0x01, "Invalid Queue Identifier");
    /// Invalid Queue Size.
    INVALID_QUEUE_SIZE = (StatusCodeType::CommandSpecific, 0x02, "Invalid Queue Size");
    /// Abort Command Limit Exceeded.
    ABORT_LIMIT_EXCEEDED = (StatusCodeType::CommandSpecific, 0x03, "Abort Command Limit Exceeded");
    /// Asynchronous Event Request Limit Exceeded.
    AER_LIMIT_EXCEEDED = (StatusCodeType::CommandSpecific, 0x05, "Asynchronous Event Request Limit Exceeded");
    /// Invalid Log Page.
    INVALID_LOG_PAGE = (StatusCodeType::CommandSpecific, 0x09, "Invalid Log Page");
    /// Feature Identifier Not Saveable.
    FEATURE_NOT_SAVEABLE = (StatusCodeType::CommandSpecific, 0x0d, "Feature Identifier Not Saveable");
    /// Feature Not Changeable.
    FEATURE_NOT_CHANGEABLE = (StatusCodeType::CommandSpecific, 0x0e, "Feature Not Changeable");
    /// Feature Not Namespace Specific.
    FEATURE_NOT_NAMESPACE_SPECIFIC = (StatusCodeType::CommandSpecific, 0x0f, "Feature Not Namespace Specific");

    /// Connect: Incompatible Format.
    CONNECT_INCOMPATIBLE_FORMAT = (StatusCodeType::CommandSpecific, 0x80, "Connect Incompatible Format");
    /// Connect: Controller Busy.
    CONNECT_CONTROLLER_BUSY = (StatusCodeType::CommandSpecific, 0x81, "Connect Controller Busy");
    /// Connect: Invalid Parameters (the CQE says which, see `fabrics::InvalidParameter`).
    CONNECT_INVALID_PARAMETERS = (StatusCodeType::CommandSpecific, 0x82, "Connect Invalid Parameters");
    /// Connect: Restart Discovery.
    CONNECT_RESTART_DISCOVERY = (StatusCodeType::CommandSpecific, 0x83, "Connect Restart Discovery");
    /// Connect: Invalid Host.
    CONNECT_INVALID_HOST = (StatusCodeType::CommandSpecific, 0x84, "Connect Invalid Host");
    /// Discover Restart (Get Log Page of the discovery log).
    DISCOVER_RESTART = (StatusCodeType::CommandSpecific, 0x90, "Discover Restart");
    /// Authentication Required.
    AUTHENTICATION_REQUIRED = (StatusCodeType::CommandSpecific, 0x91, "Authentication Required");

    /// Write Fault.
    WRITE_FAULT = (StatusCodeType::MediaError, 0x80, "Write Fault");
    /// Unrecovered Read Error.
    UNRECOVERED_READ_ERROR = (StatusCodeType::MediaError, 0x81, "Unrecovered Read Error");
    /// Access Denied.
    ACCESS_DENIED = (StatusCodeType::MediaError, 0x86, "Access Denied");

    /// Internal Path Error.
    INTERNAL_PATH_ERROR = (StatusCodeType::Path, 0x00, "Internal Path Error");
}

impl Status {
    /// Attempted Write to Read Only Range (NVM command set). It shares its value with
    /// [`Status::CONNECT_INVALID_PARAMETERS`]: command-specific codes mean what the command says.
    pub const WRITE_TO_READ_ONLY_RANGE: Status = Status::new(StatusCodeType::CommandSpecific, 0x82);

    /// A status with the given type and code, DNR/More/CRD clear.
    #[must_use]
    pub const fn new(sct: StatusCodeType, sc: u8) -> Self {
        Self(((sct.to_bits() as u16) << SCT_SHIFT) | sc as u16)
    }

    /// Builds a status from the 15-bit status field (CQE bytes 14..16 shifted right by one).
    #[must_use]
    pub const fn from_field(field: u16) -> Self {
        Self(field & 0x7fff)
    }

    /// The 15-bit status field (to be shifted left by one into the CQE).
    #[must_use]
    pub const fn to_field(self) -> u16 {
        self.0
    }

    /// Status Code (SC).
    #[must_use]
    pub const fn code(self) -> u8 {
        (self.0 & 0xff) as u8
    }

    /// Status Code Type (SCT).
    #[must_use]
    pub const fn code_type(self) -> StatusCodeType {
        StatusCodeType::from_bits(((self.0 >> SCT_SHIFT) & 0x7) as u8)
    }

    /// Do Not Retry.
    #[must_use]
    pub const fn dnr(self) -> bool {
        self.0 & DNR_BIT != 0
    }

    /// More (additional information in the Error Information log page).
    #[must_use]
    pub const fn more(self) -> bool {
        self.0 & MORE_BIT != 0
    }

    /// Command Retry Delay index (0..=3).
    #[must_use]
    pub const fn crd(self) -> u8 {
        ((self.0 >> CRD_SHIFT) & 0x3) as u8
    }

    /// The same status with Do Not Retry set: the host must not retry the command as it stands.
    #[must_use]
    pub const fn with_dnr(self) -> Self {
        Self(self.0 | DNR_BIT)
    }

    /// The same status with the More bit set.
    #[must_use]
    pub const fn with_more(self) -> Self {
        Self(self.0 | MORE_BIT)
    }

    /// The status with DNR, More and CRD cleared: the (SCT, SC) pair alone.
    #[must_use]
    pub const fn without_flags(self) -> Self {
        Self(self.0 & 0x07ff)
    }

    /// True for a successful completion.
    #[must_use]
    pub const fn is_success(self) -> bool {
        self.0 & 0x07ff == 0
    }
}

impl fmt::Debug for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Status({:?}/{:#04x}", self.code_type(), self.code())?;
        if let Some(name) = self.name() {
            write!(f, " {name}")?;
        }
        if self.dnr() {
            f.write_str(" DNR")?;
        }
        if self.more() {
            f.write_str(" MORE")?;
        }
        f.write_str(")")
    }
}

impl fmt::Display for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.name() {
            Some(name) => f.write_str(name)?,
            None => write!(f, "status sct={:#x} sc={:#04x}", self.code_type().to_bits(), self.code())?,
        }
        if self.dnr() {
            f.write_str(" (do not retry)")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn field_values_match_linux_constants() {
        // include/linux/nvme.h spells these as SCT<<8 | SC.
        assert_eq!(Status::INVALID_FIELD.to_field(), 0x002);
        assert_eq!(Status::LBA_OUT_OF_RANGE.to_field(), 0x080);
        assert_eq!(Status::CONNECT_INVALID_PARAMETERS.to_field(), 0x182);
        assert_eq!(Status::CONNECT_INVALID_HOST.to_field(), 0x184);
        assert_eq!(Status::INVALID_LOG_PAGE.to_field(), 0x109);
        assert_eq!(Status::UNRECOVERED_READ_ERROR.to_field(), 0x281);
        assert_eq!(Status::INVALID_OPCODE.with_dnr().to_field(), 0x4001);
    }

    #[test]
    fn accessors_split_the_field() {
        let s = Status::from_field(0x4182 | (2 << 11) | (1 << 13));
        assert_eq!(s.code(), 0x82);
        assert_eq!(s.code_type(), StatusCodeType::CommandSpecific);
        assert!(s.dnr());
        assert!(s.more());
        assert_eq!(s.crd(), 2);
        assert_eq!(s.without_flags(), Status::CONNECT_INVALID_PARAMETERS);
        assert_eq!(s.name(), Some("Connect Invalid Parameters"));
        assert!(!s.is_success());
        assert!(Status::SUCCESS.is_success());
    }

    #[test]
    fn display_is_human_readable() {
        assert_eq!(Status::INVALID_OPCODE.with_dnr().to_string(), "Invalid Command Opcode (do not retry)");
        assert_eq!(Status::new(StatusCodeType::VendorSpecific, 0x11).to_string(), "status sct=0x7 sc=0x11");
    }
}
