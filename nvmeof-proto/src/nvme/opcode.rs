//! Command opcodes: admin commands, NVM command set I/O commands and Fabrics command types
//! (NVMe Base Specification, "Admin Command Set" and "Opcodes for Admin Commands"; NVM Command Set
//! Specification, "Opcodes for NVM Commands"; NVMe over Fabrics, "Fabrics Command Type (FCTYPE)").
//!
//! Each set is a `#[non_exhaustive]` enum whose discriminant is the wire value: `AdminOpcode::Identify
//! as u8 == 0x06`. [`AdminOpcode::from_u8`] and friends decode a received byte, `None` meaning an opcode
//! this crate does not name (a target answers *Invalid Command Opcode*). `name()` gives the
//! specification's name for logs.
//!
//! Opcodes are laid out so that bits 1:0 give the direction of the data transfer
//! ([`DataDirection::from_opcode`]); Fabrics command types follow the same rule.
//!
//! ```text
//!  opcode: 7   6..2     1..0
//!         GEN  FUNC   DIRECTION  00 none, 01 host→controller, 10 controller→host, 11 bidirectional
//! ```

/// The opcode of every Fabrics command (Connect, Property Get/Set, …); the command type is then in
/// SQE byte 4 ([`FabricsCommandType`]).
pub const FABRICS_OPCODE: u8 = 0x7f;

/// Direction of a command's data transfer, from bits 1:0 of its opcode (or Fabrics command type).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DataDirection {
    /// `00b`: no data transfer.
    None,
    /// `01b`: host to controller (the host sends data: writes, Set Features, Connect data, …).
    HostToController,
    /// `10b`: controller to host (the controller returns data: reads, Identify, Get Log Page, …).
    ControllerToHost,
    /// `11b`: bidirectional (vendor commands; the Fabrics opcode `0x7f`, whose real direction is given
    /// by its command type).
    Bidirectional,
}

impl DataDirection {
    /// Direction encoded in bits 1:0 of an opcode or Fabrics command type.
    #[must_use]
    pub const fn from_opcode(opcode: u8) -> Self {
        match opcode & 0x3 {
            0 => Self::None,
            1 => Self::HostToController,
            2 => Self::ControllerToHost,
            _ => Self::Bidirectional,
        }
    }

    /// True when the host sends data to the controller (`01b` or `11b`).
    #[must_use]
    pub const fn host_to_controller(self) -> bool {
        matches!(self, Self::HostToController | Self::Bidirectional)
    }

    /// True when the controller sends data to the host (`10b` or `11b`).
    #[must_use]
    pub const fn controller_to_host(self) -> bool {
        matches!(self, Self::ControllerToHost | Self::Bidirectional)
    }
}

/// Defines a `#[repr(u8)]` `#[non_exhaustive]` code enum with `from_u8`, `code` and `name`.
macro_rules! code_enum {
    (
        $(#[$meta:meta])*
        $vis:vis enum $name:ident {
            $( $(#[$doc:meta])* $variant:ident = $value:literal => $text:literal, )*
        }
    ) => {
        $(#[$meta])*
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
        #[non_exhaustive]
        #[repr(u8)]
        $vis enum $name {
            $( $(#[$doc])* $variant = $value, )*
        }

        impl $name {
            /// Every value this enum names, in ascending order of wire value.
            pub const ALL: &'static [Self] = &[ $( Self::$variant, )* ];

            /// Decodes a wire value; `None` if this crate does not name it.
            #[must_use]
            pub const fn from_u8(value: u8) -> Option<Self> {
                match value {
                    $( $value => Some(Self::$variant), )*
                    _ => None,
                }
            }

            /// The wire value (same as `self as u8`).
            #[must_use]
            pub const fn code(self) -> u8 {
                self as u8
            }

            /// The specification's name, for logs.
            #[must_use]
            pub const fn name(self) -> &'static str {
                match self {
                    $( Self::$variant => $text, )*
                }
            }
        }

        impl From<$name> for u8 {
            fn from(value: $name) -> u8 {
                value as u8
            }
        }

        impl core::fmt::Display for $name {
            fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
                f.write_str(self.name())
            }
        }
    };
}
pub(crate) use code_enum;

code_enum! {
    /// Admin command set opcodes (SQE byte 0 on the admin queue).
    pub enum AdminOpcode {
        /// Delete I/O Submission Queue.
        DeleteIoSq = 0x00 => "Delete I/O Submission Queue",
        /// Create I/O Submission Queue.
        CreateIoSq = 0x01 => "Create I/O Submission Queue",
        /// Get Log Page.
        GetLogPage = 0x02 => "Get Log Page",
        /// Delete I/O Completion Queue.
        DeleteIoCq = 0x04 => "Delete I/O Completion Queue",
        /// Create I/O Completion Queue.
        CreateIoCq = 0x05 => "Create I/O Completion Queue",
        /// Identify.
        Identify = 0x06 => "Identify",
        /// Abort.
        Abort = 0x08 => "Abort",
        /// Set Features.
        SetFeatures = 0x09 => "Set Features",
        /// Get Features.
        GetFeatures = 0x0a => "Get Features",
        /// Asynchronous Event Request.
        AsyncEventRequest = 0x0c => "Asynchronous Event Request",
        /// Namespace Management.
        NamespaceManagement = 0x0d => "Namespace Management",
        /// Firmware Commit (formerly Firmware Activate).
        FirmwareCommit = 0x10 => "Firmware Commit",
        /// Firmware Image Download.
        FirmwareDownload = 0x11 => "Firmware Image Download",
        /// Device Self-test.
        DeviceSelfTest = 0x14 => "Device Self-test",
        /// Namespace Attachment.
        NamespaceAttachment = 0x15 => "Namespace Attachment",
        /// Keep Alive.
        KeepAlive = 0x18 => "Keep Alive",
        /// Directive Send.
        DirectiveSend = 0x19 => "Directive Send",
        /// Directive Receive.
        DirectiveReceive = 0x1a => "Directive Receive",
        /// Virtualization Management.
        VirtualizationManagement = 0x1c => "Virtualization Management",
        /// NVMe-MI Send.
        NvmeMiSend = 0x1d => "NVMe-MI Send",
        /// NVMe-MI Receive.
        NvmeMiReceive = 0x1e => "NVMe-MI Receive",
        /// Doorbell Buffer Config (PCIe only).
        DoorbellBufferConfig = 0x7c => "Doorbell Buffer Config",
        /// Fabrics command; the command type is in SQE byte 4 ([`FabricsCommandType`]).
        Fabrics = 0x7f => "Fabrics Command",
        /// Format NVM.
        FormatNvm = 0x80 => "Format NVM",
        /// Security Send.
        SecuritySend = 0x81 => "Security Send",
        /// Security Receive.
        SecurityReceive = 0x82 => "Security Receive",
        /// Sanitize.
        Sanitize = 0x84 => "Sanitize",
        /// Get LBA Status.
        GetLbaStatus = 0x86 => "Get LBA Status",
    }
}

code_enum! {
    /// NVM command set I/O opcodes (SQE byte 0 on an I/O queue).
    pub enum IoOpcode {
        /// Flush.
        Flush = 0x00 => "Flush",
        /// Write.
        Write = 0x01 => "Write",
        /// Read.
        Read = 0x02 => "Read",
        /// Write Uncorrectable.
        WriteUncorrectable = 0x04 => "Write Uncorrectable",
        /// Compare.
        Compare = 0x05 => "Compare",
        /// Write Zeroes.
        WriteZeroes = 0x08 => "Write Zeroes",
        /// Dataset Management (deallocate / TRIM).
        DatasetManagement = 0x09 => "Dataset Management",
        /// Verify.
        Verify = 0x0c => "Verify",
        /// Reservation Register.
        ReservationRegister = 0x0d => "Reservation Register",
        /// Reservation Report.
        ReservationReport = 0x0e => "Reservation Report",
        /// Reservation Acquire.
        ReservationAcquire = 0x11 => "Reservation Acquire",
        /// Reservation Release.
        ReservationRelease = 0x15 => "Reservation Release",
        /// Copy.
        Copy = 0x19 => "Copy",
    }
}

code_enum! {
    /// Fabrics command types (FCTYPE, SQE byte 4 of a command with opcode [`FABRICS_OPCODE`]).
    pub enum FabricsCommandType {
        /// Property Set.
        PropertySet = 0x00 => "Property Set",
        /// Connect.
        Connect = 0x01 => "Connect",
        /// Property Get.
        PropertyGet = 0x04 => "Property Get",
        /// Authentication Send.
        AuthenticationSend = 0x05 => "Authentication Send",
        /// Authentication Receive.
        AuthenticationReceive = 0x06 => "Authentication Receive",
        /// Disconnect.
        Disconnect = 0x08 => "Disconnect",
    }
}

impl AdminOpcode {
    /// Direction of this command's data transfer (opcode bits 1:0). For [`AdminOpcode::Fabrics`] this is
    /// [`DataDirection::Bidirectional`]; ask [`FabricsCommandType::data_direction`] instead.
    #[must_use]
    pub const fn data_direction(self) -> DataDirection {
        DataDirection::from_opcode(self as u8)
    }
}

impl IoOpcode {
    /// Direction of this command's data transfer (opcode bits 1:0).
    #[must_use]
    pub const fn data_direction(self) -> DataDirection {
        DataDirection::from_opcode(self as u8)
    }
}

impl FabricsCommandType {
    /// Direction of this command's data transfer (command type bits 1:0): Connect and Authentication
    /// Send carry host data, Authentication Receive returns data, the others move none.
    #[must_use]
    pub const fn data_direction(self) -> DataDirection {
        DataDirection::from_opcode(self as u8)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wire_values_match_linux_nvme_h() {
        assert_eq!(AdminOpcode::GetLogPage as u8, 0x02);
        assert_eq!(AdminOpcode::Identify as u8, 0x06);
        assert_eq!(AdminOpcode::SetFeatures as u8, 0x09);
        assert_eq!(AdminOpcode::GetFeatures as u8, 0x0a);
        assert_eq!(AdminOpcode::AsyncEventRequest as u8, 0x0c);
        assert_eq!(AdminOpcode::KeepAlive as u8, 0x18);
        assert_eq!(AdminOpcode::DoorbellBufferConfig as u8, 0x7c);
        assert_eq!(AdminOpcode::Fabrics as u8, FABRICS_OPCODE);
        assert_eq!(AdminOpcode::GetLbaStatus as u8, 0x86);
        assert_eq!(IoOpcode::WriteZeroes as u8, 0x08);
        assert_eq!(IoOpcode::DatasetManagement as u8, 0x09);
        assert_eq!(IoOpcode::ReservationRelease as u8, 0x15);
        assert_eq!(IoOpcode::Copy as u8, 0x19);
        assert_eq!(FabricsCommandType::Connect as u8, 0x01);
        assert_eq!(FabricsCommandType::PropertyGet as u8, 0x04);
        assert_eq!(FabricsCommandType::Disconnect as u8, 0x08);
    }

    #[test]
    fn from_u8_round_trips_every_named_value() {
        for &op in AdminOpcode::ALL {
            assert_eq!(AdminOpcode::from_u8(op.code()), Some(op));
            assert_eq!(u8::from(op), op as u8);
        }
        for &op in IoOpcode::ALL {
            assert_eq!(IoOpcode::from_u8(op.code()), Some(op));
        }
        for &t in FabricsCommandType::ALL {
            assert_eq!(FabricsCommandType::from_u8(t.code()), Some(t));
        }
        assert_eq!(AdminOpcode::ALL.len(), 28);
        assert_eq!(IoOpcode::ALL.len(), 13);
        assert_eq!(FabricsCommandType::ALL.len(), 6);
    }

    #[test]
    fn unknown_values_decode_to_none() {
        assert_eq!(AdminOpcode::from_u8(0x03), None);
        assert_eq!(AdminOpcode::from_u8(0xc0), None);
        assert_eq!(IoOpcode::from_u8(0x03), None);
        assert_eq!(FabricsCommandType::from_u8(0x02), None);
    }

    #[test]
    fn names_for_logs() {
        assert_eq!(AdminOpcode::Identify.name(), "Identify");
        assert_eq!(IoOpcode::WriteZeroes.to_string(), "Write Zeroes");
        assert_eq!(FabricsCommandType::PropertyGet.name(), "Property Get");
    }

    #[test]
    fn direction_follows_low_two_bits() {
        assert_eq!(AdminOpcode::Identify.data_direction(), DataDirection::ControllerToHost);
        assert_eq!(AdminOpcode::GetLogPage.data_direction(), DataDirection::ControllerToHost);
        assert_eq!(AdminOpcode::SetFeatures.data_direction(), DataDirection::HostToController);
        assert_eq!(AdminOpcode::GetFeatures.data_direction(), DataDirection::ControllerToHost);
        assert_eq!(AdminOpcode::KeepAlive.data_direction(), DataDirection::None);
        assert_eq!(AdminOpcode::AsyncEventRequest.data_direction(), DataDirection::None);
        assert_eq!(AdminOpcode::Fabrics.data_direction(), DataDirection::Bidirectional);
        assert_eq!(IoOpcode::Write.data_direction(), DataDirection::HostToController);
        assert_eq!(IoOpcode::Read.data_direction(), DataDirection::ControllerToHost);
        assert_eq!(IoOpcode::Flush.data_direction(), DataDirection::None);
        assert_eq!(IoOpcode::DatasetManagement.data_direction(), DataDirection::HostToController);
        assert_eq!(IoOpcode::ReservationReport.data_direction(), DataDirection::ControllerToHost);
        assert_eq!(FabricsCommandType::Connect.data_direction(), DataDirection::HostToController);
        assert_eq!(FabricsCommandType::PropertySet.data_direction(), DataDirection::None);
        assert_eq!(
            FabricsCommandType::AuthenticationReceive.data_direction(),
            DataDirection::ControllerToHost
        );
        assert!(DataDirection::Bidirectional.host_to_controller());
        assert!(DataDirection::Bidirectional.controller_to_host());
        assert!(!DataDirection::None.controller_to_host());
    }
}
