//! Fabrics commands: Connect (with its 1024-byte data), Property Get / Property Set and Disconnect
//! (NVMe over Fabrics Specification, "Fabrics Command Set": "Connect Command and Response", "Property
//! Get Command and Response", "Property Set Command and Response", "Disconnect Command and Response").
//!
//! Every Fabrics command is an [`Sqe`] with opcode [`FABRICS_OPCODE`] and the command type (FCTYPE) in
//! byte 4. The views in this module are 64-byte `zerocopy` structs with the same size and alignment
//! as [`Sqe`]; [`ConnectCommand::from_sqe`] / [`ConnectCommand::to_sqe`] (and the `From` impls) convert
//! by value, [`ConnectCommand::view`] reinterprets a borrowed `Sqe` in place.
//!
//! ```text
//!  byte  0       1      2..4   4       5..24   24..40   40..64
//!       0x7f   rsvd    CID   FCTYPE   rsvd    SGL1     command type specific
//! ```

use core::fmt;

use zerocopy::little_endian::{U16, U32, U64};
use zerocopy::{FromBytes, FromZeros, Immutable, IntoBytes, KnownLayout, Unaligned};

use super::opcode::{FabricsCommandType, FABRICS_OPCODE};
use super::registers::PropertyWidth;
use super::sgl::SglDescriptor;
use super::sqe::{Sqe, SQE_FLAGS_PSDT_SGL};

/// Record format of the Connect and Disconnect commands this crate speaks (the only one defined).
pub const RECFMT_0: u16 = 0;

/// Queue identifier of the admin queue in Connect.
pub const ADMIN_QID: u16 = 0;

/// Size of the Connect command's data (host identifier, controller ID, NQNs) in bytes.
pub const CONNECT_DATA_LEN: usize = 1024;

/// Size of an NQN field in Connect data and the discovery log (NUL terminated, zero padded).
pub const NQN_FIELD_LEN: usize = 256;

/// Longest NQN the specification allows, in bytes of UTF-8 (excluding the NUL terminator).
pub const NQN_MAX_LEN: usize = 223;

/// Controller ID a host puts in Connect data for the admin queue under the dynamic controller model:
/// "allocate any controller".
pub const CNTLID_DYNAMIC: u16 = 0xffff;

/// Controller ID meaning "any controller" under the static controller model.
pub const CNTLID_STATIC_ANY: u16 = 0xfffe;

/// Lowest controller ID a subsystem may allocate.
pub const CNTLID_MIN: u16 = 0x0001;

/// Highest controller ID a subsystem may allocate (`0xfff0..=0xffff` are reserved or special).
pub const CNTLID_MAX: u16 = 0xffef;

/// True if `cntlid` is in the range a subsystem may allocate (`0x0001..=0xffef`).
#[must_use]
pub const fn is_allocatable_cntlid(cntlid: u16) -> bool {
    cntlid >= CNTLID_MIN && cntlid <= CNTLID_MAX
}

/// Connect CATTR bits 1:0: priority class (`00b` urgent … `11b` low; only for weighted round robin).
pub const CATTR_PRIORITY_CLASS_MASK: u8 = 0x3;
/// Connect CATTR bit 2: the host asks to disable SQ flow control (SQHD in completions becomes
/// meaningless; Linux sets this on every queue).
pub const CATTR_DISABLE_SQ_FLOW_CONTROL: u8 = 1 << 2;
/// Connect CATTR bit 3: I/O queue deletion support (NVMe over Fabrics 1.1+).
pub const CATTR_IO_QUEUE_DELETION: u8 = 1 << 3;

/// Connect response DW0 bit 17 (AUTHREQ.ATR): the host must authenticate (DH-HMAC-CHAP) before using
/// the queue. A target without in-band authentication leaves it — and all of bits 31:16 — zero.
pub const CONNECT_AUTHREQ_ATR: u32 = 1 << 17;
/// Connect response DW0 bit 18 (AUTHREQ.ASCR): authentication with secure channel concatenation
/// required. A target without in-band authentication leaves it zero.
pub const CONNECT_AUTHREQ_ASCR: u32 = 1 << 18;

/// DW0 of a successful Connect response: the controller ID in bits 15:0; the authentication
/// requirements (AUTHREQ, bits 31:16, [`CONNECT_AUTHREQ_ATR`] / [`CONNECT_AUTHREQ_ASCR`]) left zero.
#[must_use]
pub const fn connect_success_dw0(cntlid: u16) -> u32 {
    cntlid as u32
}

/// DW0 of a successful Connect response that asks the host to authenticate the queue with
/// DH-HMAC-CHAP before using it (AUTHREQ.ATR set, no secure channel concatenation).
#[must_use]
pub const fn connect_success_dw0_auth_required(cntlid: u16) -> u32 {
    cntlid as u32 | CONNECT_AUTHREQ_ATR
}

/// The controller ID in DW0 of a successful Connect response (bits 15:0).
#[must_use]
pub const fn cntlid_from_dw0(dw0: u32) -> u16 {
    dw0 as u16
}

/// Implements the conversions between [`Sqe`] and a 64-byte command view.
macro_rules! sqe_view {
    ($ty:ident) => {
        impl $ty {
            /// Copies the view out of an [`Sqe`] (same 64 bytes, reinterpreted).
            #[must_use]
            pub fn from_sqe(sqe: &Sqe) -> Self {
                zerocopy::transmute!(*sqe)
            }

            /// The same 64 bytes as an [`Sqe`].
            #[must_use]
            pub fn to_sqe(&self) -> Sqe {
                zerocopy::transmute!(*self)
            }

            /// Reinterprets a borrowed [`Sqe`] in place.
            #[must_use]
            pub fn view(sqe: &Sqe) -> &Self {
                zerocopy::transmute_ref!(sqe)
            }

            /// Reinterprets a mutably borrowed [`Sqe`] in place.
            #[must_use]
            pub fn view_mut(sqe: &mut Sqe) -> &mut Self {
                zerocopy::transmute_mut!(sqe)
            }
        }

        impl From<Sqe> for $ty {
            fn from(sqe: Sqe) -> Self {
                zerocopy::transmute!(sqe)
            }
        }

        impl From<$ty> for Sqe {
            fn from(cmd: $ty) -> Self {
                zerocopy::transmute!(cmd)
            }
        }

        impl Default for $ty {
            fn default() -> Self {
                Self::new_zeroed()
            }
        }
    };
}

/// The common header of every Fabrics command, with the command-type-specific bytes left raw.
///
/// | bytes | field |
/// | --- | --- |
/// | 0 | opcode (`0x7f`) |
/// | 1 | reserved (flags: PSDT for commands that carry data) |
/// | 2..4 | command identifier |
/// | 4 | FCTYPE |
/// | 5..40 | reserved, or SGL1 at 24..40 for commands that carry data |
/// | 40..64 | command type specific |
#[derive(Clone, Copy, Debug, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct FabricsCommandHeader {
    /// Opcode: [`FABRICS_OPCODE`].
    pub opcode: u8,
    /// Reserved / flags.
    pub flags: u8,
    /// Command identifier.
    pub cid: U16,
    /// Fabrics command type.
    pub fctype: u8,
    /// Reserved (bytes 5..24) and SGL1 (bytes 24..40) when the command has data.
    pub reserved: [u8; 35],
    /// Command-type-specific bytes 40..64.
    pub specific: [u8; 24],
}

sqe_view!(FabricsCommandHeader);

impl FabricsCommandHeader {
    /// The command type, if this crate names it.
    #[must_use]
    pub fn command_type(&self) -> Option<FabricsCommandType> {
        FabricsCommandType::from_u8(self.fctype)
    }

    /// True if the opcode is [`FABRICS_OPCODE`].
    #[must_use]
    pub fn is_fabrics(&self) -> bool {
        self.opcode == FABRICS_OPCODE
    }
}

/// Connect command (FCTYPE `0x01`): creates the admin queue (QID 0, which also creates the controller)
/// or an I/O queue. Its 1024 bytes of [`ConnectData`] travel in-capsule or by data PDUs, per SGL1.
///
/// | bytes | field |
/// | --- | --- |
/// | 0 | opcode (`0x7f`) |
/// | 1 | flags (PSDT) |
/// | 2..4 | command identifier |
/// | 4 | FCTYPE (`0x01`) |
/// | 5..24 | reserved |
/// | 24..40 | SGL1: the Connect data |
/// | 40..42 | RECFMT: record format (0) |
/// | 42..44 | QID: queue identifier (0 = admin) |
/// | 44..46 | SQSIZE: submission queue size, 0's based |
/// | 46 | CATTR: connect attributes |
/// | 47 | reserved |
/// | 48..52 | KATO: keep alive timeout in milliseconds (admin queue only; 0 disables) |
/// | 52..64 | reserved |
#[derive(Clone, Copy, Debug, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct ConnectCommand {
    /// Opcode: [`FABRICS_OPCODE`].
    pub opcode: u8,
    /// Flags (PSDT in bits 7:6).
    pub flags: u8,
    /// Command identifier.
    pub cid: U16,
    /// Fabrics command type: Connect (`0x01`).
    pub fctype: u8,
    /// Reserved.
    pub reserved1: [u8; 19],
    /// SGL descriptor of the 1024-byte Connect data.
    pub sgl1: SglDescriptor,
    /// Record format (0).
    pub recfmt: U16,
    /// Queue identifier: 0 for the admin queue.
    pub qid: U16,
    /// Submission queue size, 0's based.
    pub sqsize: U16,
    /// Connect attributes ([`CATTR_DISABLE_SQ_FLOW_CONTROL`], …).
    pub cattr: u8,
    /// Reserved.
    pub reserved2: u8,
    /// Keep alive timeout in milliseconds.
    pub kato: U32,
    /// Reserved.
    pub reserved3: [u8; 12],
}

sqe_view!(ConnectCommand);

impl ConnectCommand {
    /// A Connect command for queue `qid` of `queue_size` entries (1-based; encoded 0's based, a size of
    /// zero encodes as zero) whose data is described by `sgl1`.
    #[must_use]
    pub fn new(cid: u16, qid: u16, queue_size: u16, kato_ms: u32, sgl1: SglDescriptor) -> Self {
        let mut cmd = Self::new_zeroed();
        cmd.opcode = FABRICS_OPCODE;
        cmd.flags = SQE_FLAGS_PSDT_SGL;
        cmd.cid = U16::new(cid);
        cmd.fctype = FabricsCommandType::Connect as u8;
        cmd.sgl1 = sgl1;
        cmd.recfmt = U16::new(RECFMT_0);
        cmd.qid = U16::new(qid);
        cmd.sqsize = U16::new(queue_size.saturating_sub(1));
        cmd.kato = U32::new(kato_ms);
        cmd
    }

    /// True for a Connect of the admin queue.
    #[must_use]
    pub fn is_admin(&self) -> bool {
        self.qid.get() == ADMIN_QID
    }

    /// Queue size as an entry count (SQSIZE + 1).
    #[must_use]
    pub fn queue_size(&self) -> u32 {
        u32::from(self.sqsize.get()) + 1
    }

    /// True if the host asked to disable SQ flow control (CATTR bit 2).
    #[must_use]
    pub fn sq_flow_control_disabled(&self) -> bool {
        self.cattr & CATTR_DISABLE_SQ_FLOW_CONTROL != 0
    }
}

/// Why an NQN field or string was rejected.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum NqnError {
    /// The NQN is empty.
    #[error("NQN is empty")]
    Empty,
    /// The 256-byte field holds no NUL terminator.
    #[error("NQN field is not NUL terminated")]
    NotTerminated,
    /// The NQN is longer than the 223 bytes the specification allows.
    #[error("NQN is {len} bytes long, more than 223")]
    TooLong {
        /// Length in bytes.
        len: usize,
    },
    /// The NQN is not valid UTF-8.
    #[error("NQN is not valid UTF-8")]
    InvalidUtf8,
    /// The string to store contains a NUL byte.
    #[error("NQN contains a NUL byte")]
    ContainsNul,
}

/// Reads a NUL-terminated, zero-padded NQN field: the bytes before the first NUL, which must be
/// non-empty, at most [`NQN_MAX_LEN`] bytes and valid UTF-8. Bytes after the terminator are ignored.
pub fn nqn_str(field: &[u8; NQN_FIELD_LEN]) -> Result<&str, NqnError> {
    let len = field.iter().position(|&b| b == 0).ok_or(NqnError::NotTerminated)?;
    let bytes = field.get(..len).ok_or(NqnError::NotTerminated)?;
    if bytes.is_empty() {
        return Err(NqnError::Empty);
    }
    if len > NQN_MAX_LEN {
        return Err(NqnError::TooLong { len });
    }
    core::str::from_utf8(bytes).map_err(|_| NqnError::InvalidUtf8)
}

/// Stores `nqn` in a 256-byte NQN field, zero padded (so NUL terminated). The field is left unchanged
/// on error: empty, longer than [`NQN_MAX_LEN`] bytes, or containing a NUL byte.
pub fn set_nqn(field: &mut [u8; NQN_FIELD_LEN], nqn: &str) -> Result<(), NqnError> {
    let bytes = nqn.as_bytes();
    if bytes.is_empty() {
        return Err(NqnError::Empty);
    }
    if bytes.len() > NQN_MAX_LEN {
        return Err(NqnError::TooLong { len: bytes.len() });
    }
    if bytes.contains(&0) {
        return Err(NqnError::ContainsNul);
    }
    let (head, tail) = field.split_at_mut(bytes.len());
    head.copy_from_slice(bytes);
    tail.fill(0);
    Ok(())
}

/// Connect command data: 1024 bytes sent with the Connect command.
///
/// | bytes | field |
/// | --- | --- |
/// | 0..16 | HOSTID: host identifier (a UUID) |
/// | 16..18 | CNTLID: controller ID ([`CNTLID_DYNAMIC`] for an admin Connect under the dynamic model; the allocated ID for an I/O Connect) |
/// | 18..256 | reserved |
/// | 256..512 | SUBNQN: NVM subsystem NQN |
/// | 512..768 | HOSTNQN: host NQN |
/// | 768..1024 | reserved |
#[derive(Clone, Copy, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct ConnectData {
    /// Host identifier.
    pub hostid: [u8; 16],
    /// Controller ID.
    pub cntlid: U16,
    /// Reserved.
    pub reserved1: [u8; 238],
    /// NVM subsystem NQN, NUL terminated.
    pub subnqn: [u8; NQN_FIELD_LEN],
    /// Host NQN, NUL terminated.
    pub hostnqn: [u8; NQN_FIELD_LEN],
    /// Reserved.
    pub reserved2: [u8; 256],
}

impl ConnectData {
    /// Connect data for `hostid`, `cntlid` and the two NQNs.
    pub fn new(hostid: [u8; 16], cntlid: u16, subnqn: &str, hostnqn: &str) -> Result<Self, NqnError> {
        let mut data = Self::new_zeroed();
        data.hostid = hostid;
        data.cntlid = U16::new(cntlid);
        set_nqn(&mut data.subnqn, subnqn)?;
        set_nqn(&mut data.hostnqn, hostnqn)?;
        Ok(data)
    }

    /// Reads Connect data from the start of `bytes`; `None` if fewer than 1024 bytes.
    #[must_use]
    pub fn ref_from_data(bytes: &[u8]) -> Option<&Self> {
        Self::ref_from_prefix(bytes).ok().map(|(data, _)| data)
    }

    /// The subsystem NQN.
    pub fn subnqn(&self) -> Result<&str, NqnError> {
        nqn_str(&self.subnqn)
    }

    /// The host NQN.
    pub fn hostnqn(&self) -> Result<&str, NqnError> {
        nqn_str(&self.hostnqn)
    }

    /// Stores the subsystem NQN.
    pub fn set_subnqn(&mut self, nqn: &str) -> Result<(), NqnError> {
        set_nqn(&mut self.subnqn, nqn)
    }

    /// Stores the host NQN.
    pub fn set_hostnqn(&mut self, nqn: &str) -> Result<(), NqnError> {
        set_nqn(&mut self.hostnqn, nqn)
    }
}

impl Default for ConnectData {
    fn default() -> Self {
        Self::new_zeroed()
    }
}

impl fmt::Debug for ConnectData {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ConnectData")
            .field("hostid", &format_args!("{:02x?}", self.hostid))
            .field("cntlid", &format_args!("{:#06x}", self.cntlid.get()))
            .field("subnqn", &self.subnqn())
            .field("hostnqn", &self.hostnqn())
            .finish_non_exhaustive()
    }
}

/// Where the parameter a *Connect Invalid Parameters* completion complains about sits: DW0 of that
/// completion carries IPO (bits 15:0, the byte offset of the field) and IATTR (bits 23:16; `1` if the
/// offset is into the Connect data, `0` if into the SQE).
///
/// This is the encoding of Linux nvmet (`IPO_IATTR_CONNECT_DATA(x)` = `(1 << 16) | offsetof(x)`,
/// `IPO_IATTR_CONNECT_SQE(x)` = `offsetof(x)`) and what the Linux host's `nvmf_log_connect_error`
/// decodes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum InvalidParameter {
    /// The field at byte `offset` of the Connect SQE.
    Sqe {
        /// Byte offset into the 64-byte SQE.
        offset: u16,
    },
    /// The field at byte `offset` of the Connect data.
    Data {
        /// Byte offset into the 1024-byte Connect data.
        offset: u16,
    },
}

const IATTR_DATA: u32 = 1 << 16;

impl InvalidParameter {
    /// Invalid QID (SQE byte 42).
    pub const QID: Self = Self::Sqe { offset: core::mem::offset_of!(ConnectCommand, qid) as u16 };
    /// Invalid SQSIZE (SQE byte 44).
    pub const SQSIZE: Self = Self::Sqe { offset: core::mem::offset_of!(ConnectCommand, sqsize) as u16 };
    /// Invalid CATTR (SQE byte 46).
    pub const CATTR: Self = Self::Sqe { offset: core::mem::offset_of!(ConnectCommand, cattr) as u16 };
    /// Invalid KATO (SQE byte 48).
    pub const KATO: Self = Self::Sqe { offset: core::mem::offset_of!(ConnectCommand, kato) as u16 };
    /// Invalid controller ID (data byte 16).
    pub const CNTLID: Self = Self::Data { offset: core::mem::offset_of!(ConnectData, cntlid) as u16 };
    /// Unknown or invalid subsystem NQN (data byte 256).
    pub const SUBNQN: Self = Self::Data { offset: core::mem::offset_of!(ConnectData, subnqn) as u16 };
    /// Invalid host NQN (data byte 512).
    pub const HOSTNQN: Self = Self::Data { offset: core::mem::offset_of!(ConnectData, hostnqn) as u16 };

    /// DW0 of the *Connect Invalid Parameters* completion.
    #[must_use]
    pub const fn to_dw0(self) -> u32 {
        match self {
            Self::Sqe { offset } => offset as u32,
            Self::Data { offset } => IATTR_DATA | offset as u32,
        }
    }

    /// Decodes DW0 of a *Connect Invalid Parameters* completion (IATTR bit 0, i.e. DW0 bit 16, selects
    /// the Connect data).
    #[must_use]
    pub const fn from_dw0(dw0: u32) -> Self {
        let offset = dw0 as u16;
        if dw0 & IATTR_DATA != 0 {
            Self::Data { offset }
        } else {
            Self::Sqe { offset }
        }
    }
}

/// Property Get command (FCTYPE `0x04`): reads a controller property; the value returns in CQE DW0
/// (and DW1 for 8-byte properties).
///
/// The Linux NVMe/TCP host sets PSDT in byte 1 and a zero-length Transport SGL in bytes 24..40 of every
/// command, these included: a target must not reject those reserved bytes.
///
/// | bytes | field |
/// | --- | --- |
/// | 0 | opcode (`0x7f`) |
/// | 1 | reserved |
/// | 2..4 | command identifier |
/// | 4 | FCTYPE (`0x04`) |
/// | 5..40 | reserved |
/// | 40 | ATTRIB: bits 2:0 size (0 = 4 bytes, 1 = 8 bytes) |
/// | 41..44 | reserved |
/// | 44..48 | OFST: property offset |
/// | 48..64 | reserved |
#[derive(Clone, Copy, Debug, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct PropertyGetCommand {
    /// Opcode: [`FABRICS_OPCODE`].
    pub opcode: u8,
    /// Reserved.
    pub flags: u8,
    /// Command identifier.
    pub cid: U16,
    /// Fabrics command type: Property Get (`0x04`).
    pub fctype: u8,
    /// Reserved.
    pub reserved1: [u8; 35],
    /// Attributes: access size in bits 2:0.
    pub attrib: u8,
    /// Reserved.
    pub reserved2: [u8; 3],
    /// Property offset.
    pub ofst: U32,
    /// Reserved.
    pub reserved3: [u8; 16],
}

sqe_view!(PropertyGetCommand);

impl PropertyGetCommand {
    /// A Property Get of `width` bytes at `offset`.
    #[must_use]
    pub fn new(cid: u16, offset: u32, width: PropertyWidth) -> Self {
        let mut cmd = Self::new_zeroed();
        cmd.opcode = FABRICS_OPCODE;
        cmd.cid = U16::new(cid);
        cmd.fctype = FabricsCommandType::PropertyGet as u8;
        cmd.attrib = width.to_attrib();
        cmd.ofst = U32::new(offset);
        cmd
    }

    /// Access size from ATTRIB; `None` for a reserved size value.
    #[must_use]
    pub fn width(&self) -> Option<PropertyWidth> {
        PropertyWidth::from_attrib(self.attrib)
    }

    /// The property offset.
    #[must_use]
    pub fn offset(&self) -> u32 {
        self.ofst.get()
    }
}

/// Property Set command (FCTYPE `0x00`): writes a controller property. As for Property Get, bytes
/// 1 and 24..40 may hold PSDT and an empty SGL rather than zeros.
///
/// | bytes | field |
/// | --- | --- |
/// | 0 | opcode (`0x7f`) |
/// | 1 | reserved |
/// | 2..4 | command identifier |
/// | 4 | FCTYPE (`0x00`) |
/// | 5..40 | reserved |
/// | 40 | ATTRIB: bits 2:0 size (0 = 4 bytes, 1 = 8 bytes) |
/// | 41..44 | reserved |
/// | 44..48 | OFST: property offset |
/// | 48..56 | VALUE (for a 4-byte property only bytes 48..52 count) |
/// | 56..64 | reserved |
#[derive(Clone, Copy, Debug, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct PropertySetCommand {
    /// Opcode: [`FABRICS_OPCODE`].
    pub opcode: u8,
    /// Reserved.
    pub flags: u8,
    /// Command identifier.
    pub cid: U16,
    /// Fabrics command type: Property Set (`0x00`).
    pub fctype: u8,
    /// Reserved.
    pub reserved1: [u8; 35],
    /// Attributes: access size in bits 2:0.
    pub attrib: u8,
    /// Reserved.
    pub reserved2: [u8; 3],
    /// Property offset.
    pub ofst: U32,
    /// Value to write.
    pub value: U64,
    /// Reserved.
    pub reserved3: [u8; 8],
}

sqe_view!(PropertySetCommand);

impl PropertySetCommand {
    /// A Property Set of `width` bytes at `offset` (for a 4-byte width the upper half of `value` is
    /// sent as zero).
    #[must_use]
    pub fn new(cid: u16, offset: u32, width: PropertyWidth, value: u64) -> Self {
        let mut cmd = Self::new_zeroed();
        cmd.opcode = FABRICS_OPCODE;
        cmd.cid = U16::new(cid);
        cmd.fctype = FabricsCommandType::PropertySet as u8;
        cmd.attrib = width.to_attrib();
        cmd.ofst = U32::new(offset);
        cmd.value = U64::new(match width {
            PropertyWidth::Four => value & u64::from(u32::MAX),
            PropertyWidth::Eight => value,
        });
        cmd
    }

    /// Access size from ATTRIB; `None` for a reserved size value.
    #[must_use]
    pub fn width(&self) -> Option<PropertyWidth> {
        PropertyWidth::from_attrib(self.attrib)
    }

    /// The property offset.
    #[must_use]
    pub fn offset(&self) -> u32 {
        self.ofst.get()
    }

    /// The value to write, truncated to the access size (`None` for a reserved size value).
    #[must_use]
    pub fn value_for_width(&self) -> Option<u64> {
        match self.width()? {
            PropertyWidth::Four => Some(self.value.get() & u64::from(u32::MAX)),
            PropertyWidth::Eight => Some(self.value.get()),
        }
    }
}

/// Disconnect command (FCTYPE `0x08`): deletes the I/O queue it is sent on.
///
/// | bytes | field |
/// | --- | --- |
/// | 0 | opcode (`0x7f`) |
/// | 1 | reserved |
/// | 2..4 | command identifier |
/// | 4 | FCTYPE (`0x08`) |
/// | 5..24 | reserved |
/// | 24..40 | SGL1 (no data) |
/// | 40..42 | RECFMT: record format (0) |
/// | 42..64 | reserved |
#[derive(Clone, Copy, Debug, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct DisconnectCommand {
    /// Opcode: [`FABRICS_OPCODE`].
    pub opcode: u8,
    /// Reserved / flags.
    pub flags: u8,
    /// Command identifier.
    pub cid: U16,
    /// Fabrics command type: Disconnect (`0x08`).
    pub fctype: u8,
    /// Reserved.
    pub reserved1: [u8; 19],
    /// SGL descriptor 1 (no data).
    pub sgl1: SglDescriptor,
    /// Record format (0).
    pub recfmt: U16,
    /// Reserved.
    pub reserved2: [u8; 22],
}

sqe_view!(DisconnectCommand);

impl DisconnectCommand {
    /// A Disconnect command.
    #[must_use]
    pub fn new(cid: u16) -> Self {
        let mut cmd = Self::new_zeroed();
        cmd.opcode = FABRICS_OPCODE;
        cmd.flags = SQE_FLAGS_PSDT_SGL;
        cmd.cid = U16::new(cid);
        cmd.fctype = FabricsCommandType::Disconnect as u8;
        cmd.sgl1 = SglDescriptor::transport(0);
        cmd.recfmt = U16::new(RECFMT_0);
        cmd
    }
}

/// Security Protocol (SECP) of NVMe in-band authentication in Authentication Send / Receive: `E9h`,
/// "NVMe" (both SPSP bytes are `01h`, the DH-HMAC-CHAP protocol).
pub const AUTH_SECP_NVME: u8 = 0xe9;

/// SPSP0 and SPSP1 of Authentication Send / Receive for DH-HMAC-CHAP.
pub const AUTH_SPSP_DHCHAP: u8 = 0x01;

/// Authentication Send command (FCTYPE `0x05`): carries one authentication message (TL bytes) from
/// the host to the controller, in-capsule or by data PDUs per SGL1. Authentication Receive (FCTYPE
/// `0x06`, [`AuthReceiveCommand`]) has the same layout with AL (the host's buffer) in place of TL.
///
/// | bytes | field |
/// | --- | --- |
/// | 0 | opcode (`0x7f`) |
/// | 1 | flags (PSDT) |
/// | 2..4 | command identifier |
/// | 4 | FCTYPE (`0x05`) |
/// | 5..24 | reserved |
/// | 24..40 | SGL1: the message |
/// | 40 | reserved (NSSF) |
/// | 41 | SPSP0: `01h` |
/// | 42 | SPSP1: `01h` |
/// | 43 | SECP: [`AUTH_SECP_NVME`] |
/// | 44..48 | TL: transfer length in bytes |
/// | 48..64 | reserved |
#[derive(Clone, Copy, Debug, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct AuthSendCommand {
    /// Opcode: [`FABRICS_OPCODE`].
    pub opcode: u8,
    /// Flags (PSDT in bits 7:6).
    pub flags: u8,
    /// Command identifier.
    pub cid: U16,
    /// Fabrics command type: Authentication Send (`0x05`).
    pub fctype: u8,
    /// Reserved.
    pub reserved1: [u8; 19],
    /// SGL descriptor of the message.
    pub sgl1: SglDescriptor,
    /// Reserved (NVMe Security Specific Field).
    pub nssf: u8,
    /// Security Protocol Specific 0.
    pub spsp0: u8,
    /// Security Protocol Specific 1.
    pub spsp1: u8,
    /// Security Protocol.
    pub secp: u8,
    /// Transfer length: bytes of the message.
    pub tl: U32,
    /// Reserved.
    pub reserved2: [u8; 16],
}

sqe_view!(AuthSendCommand);

impl AuthSendCommand {
    /// An Authentication Send of a `tl`-byte DH-HMAC-CHAP message described by `sgl1`.
    #[must_use]
    pub fn new(cid: u16, tl: u32, sgl1: SglDescriptor) -> Self {
        let mut cmd = Self::new_zeroed();
        cmd.opcode = FABRICS_OPCODE;
        cmd.flags = SQE_FLAGS_PSDT_SGL;
        cmd.cid = U16::new(cid);
        cmd.fctype = FabricsCommandType::AuthenticationSend as u8;
        cmd.sgl1 = sgl1;
        cmd.spsp0 = AUTH_SPSP_DHCHAP;
        cmd.spsp1 = AUTH_SPSP_DHCHAP;
        cmd.secp = AUTH_SECP_NVME;
        cmd.tl = U32::new(tl);
        cmd
    }

    /// True if SECP and both SPSP bytes name DH-HMAC-CHAP.
    #[must_use]
    pub fn is_dhchap(&self) -> bool {
        self.secp == AUTH_SECP_NVME && self.spsp0 == AUTH_SPSP_DHCHAP && self.spsp1 == AUTH_SPSP_DHCHAP
    }
}

/// Authentication Receive command (FCTYPE `0x06`): asks the controller for its next authentication
/// message, into a host buffer of AL bytes (returned by data PDUs per SGL1). Same layout as
/// [`AuthSendCommand`] with AL at bytes 44..48.
#[derive(Clone, Copy, Debug, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct AuthReceiveCommand {
    /// Opcode: [`FABRICS_OPCODE`].
    pub opcode: u8,
    /// Flags (PSDT in bits 7:6).
    pub flags: u8,
    /// Command identifier.
    pub cid: U16,
    /// Fabrics command type: Authentication Receive (`0x06`).
    pub fctype: u8,
    /// Reserved.
    pub reserved1: [u8; 19],
    /// SGL descriptor of the host's buffer.
    pub sgl1: SglDescriptor,
    /// Reserved (NVMe Security Specific Field).
    pub nssf: u8,
    /// Security Protocol Specific 0.
    pub spsp0: u8,
    /// Security Protocol Specific 1.
    pub spsp1: u8,
    /// Security Protocol.
    pub secp: u8,
    /// Allocation length: bytes the host can take.
    pub al: U32,
    /// Reserved.
    pub reserved2: [u8; 16],
}

sqe_view!(AuthReceiveCommand);

impl AuthReceiveCommand {
    /// An Authentication Receive into an `al`-byte buffer described by `sgl1`.
    #[must_use]
    pub fn new(cid: u16, al: u32, sgl1: SglDescriptor) -> Self {
        let mut cmd = Self::new_zeroed();
        cmd.opcode = FABRICS_OPCODE;
        cmd.flags = SQE_FLAGS_PSDT_SGL;
        cmd.cid = U16::new(cid);
        cmd.fctype = FabricsCommandType::AuthenticationReceive as u8;
        cmd.sgl1 = sgl1;
        cmd.spsp0 = AUTH_SPSP_DHCHAP;
        cmd.spsp1 = AUTH_SPSP_DHCHAP;
        cmd.secp = AUTH_SECP_NVME;
        cmd.al = U32::new(al);
        cmd
    }

    /// True if SECP and both SPSP bytes name DH-HMAC-CHAP.
    #[must_use]
    pub fn is_dhchap(&self) -> bool {
        self.secp == AUTH_SECP_NVME && self.spsp0 == AUTH_SPSP_DHCHAP && self.spsp1 == AUTH_SPSP_DHCHAP
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use core::mem::{offset_of, size_of};

    #[test]
    fn auth_commands_byte_exact() {
        // Authentication Send of a 72-byte AUTH_Negotiate in the capsule, as the Linux host sends it.
        let mut raw = [0u8; 64];
        raw[0] = 0x7f;
        raw[1] = 0x40;
        raw[2..4].copy_from_slice(&7u16.to_le_bytes());
        raw[4] = 0x05;
        raw[24..40].copy_from_slice(SglDescriptor::in_capsule(0, 72).as_bytes());
        raw[41] = 0x01;
        raw[42] = 0x01;
        raw[43] = 0xe9;
        raw[44..48].copy_from_slice(&72u32.to_le_bytes());
        let send = AuthSendCommand::new(7, 72, SglDescriptor::in_capsule(0, 72));
        assert_eq!(send.as_bytes(), &raw[..]);
        assert!(send.is_dhchap());
        assert_eq!(size_of::<AuthSendCommand>(), 64);
        assert_eq!(offset_of!(AuthSendCommand, secp), 43);
        assert_eq!(offset_of!(AuthSendCommand, tl), 44);

        raw[4] = 0x06;
        raw[24..40].copy_from_slice(SglDescriptor::transport(4096).as_bytes());
        raw[44..48].copy_from_slice(&4096u32.to_le_bytes());
        let recv = AuthReceiveCommand::new(7, 4096, SglDescriptor::transport(4096));
        assert_eq!(recv.as_bytes(), &raw[..]);
        assert_eq!(AuthReceiveCommand::from_sqe(&Sqe::read_from_bytes(&raw[..]).unwrap()).al.get(), 4096);
        let mut other = recv;
        other.secp = 0xea;
        assert!(!other.is_dhchap());
    }

    #[test]
    fn connect_dw0_with_authreq() {
        assert_eq!(connect_success_dw0_auth_required(0x1234), 0x0002_1234);
        assert_eq!(cntlid_from_dw0(connect_success_dw0_auth_required(0x1234)), 0x1234);
    }

    #[test]
    fn connect_layout_matches_spec() {
        assert_eq!(size_of::<ConnectCommand>(), 64);
        assert_eq!(offset_of!(ConnectCommand, cid), 2);
        assert_eq!(offset_of!(ConnectCommand, fctype), 4);
        assert_eq!(offset_of!(ConnectCommand, sgl1), 24);
        assert_eq!(offset_of!(ConnectCommand, recfmt), 40);
        assert_eq!(offset_of!(ConnectCommand, qid), 42);
        assert_eq!(offset_of!(ConnectCommand, sqsize), 44);
        assert_eq!(offset_of!(ConnectCommand, cattr), 46);
        assert_eq!(offset_of!(ConnectCommand, kato), 48);
        assert_eq!(offset_of!(ConnectCommand, reserved3), 52);
    }

    #[test]
    fn connect_data_layout_matches_spec() {
        assert_eq!(size_of::<ConnectData>(), CONNECT_DATA_LEN);
        assert_eq!(offset_of!(ConnectData, cntlid), 16);
        assert_eq!(offset_of!(ConnectData, reserved1), 18);
        assert_eq!(offset_of!(ConnectData, subnqn), 256);
        assert_eq!(offset_of!(ConnectData, hostnqn), 512);
        assert_eq!(offset_of!(ConnectData, reserved2), 768);
    }

    #[test]
    fn property_and_disconnect_layouts_match_spec() {
        assert_eq!(size_of::<PropertyGetCommand>(), 64);
        assert_eq!(offset_of!(PropertyGetCommand, fctype), 4);
        assert_eq!(offset_of!(PropertyGetCommand, attrib), 40);
        assert_eq!(offset_of!(PropertyGetCommand, ofst), 44);
        assert_eq!(size_of::<PropertySetCommand>(), 64);
        assert_eq!(offset_of!(PropertySetCommand, attrib), 40);
        assert_eq!(offset_of!(PropertySetCommand, ofst), 44);
        assert_eq!(offset_of!(PropertySetCommand, value), 48);
        assert_eq!(size_of::<DisconnectCommand>(), 64);
        assert_eq!(offset_of!(DisconnectCommand, sgl1), 24);
        assert_eq!(offset_of!(DisconnectCommand, recfmt), 40);
        assert_eq!(size_of::<FabricsCommandHeader>(), 64);
        assert_eq!(offset_of!(FabricsCommandHeader, fctype), 4);
        assert_eq!(offset_of!(FabricsCommandHeader, specific), 40);
    }

    /// A Connect SQE for an I/O queue as a Linux host sends it, written byte by byte.
    fn io_connect_bytes() -> [u8; 64] {
        let mut raw = [0u8; 64];
        raw[0] = 0x7f;
        raw[1] = 0x40; // PSDT: SGL
        raw[2..4].copy_from_slice(&0x1234u16.to_le_bytes());
        raw[4] = 0x01; // Connect
                       // SGL1: transport data block, 1024 bytes.
        raw[32..36].copy_from_slice(&1024u32.to_le_bytes());
        raw[39] = 0x5a;
        raw[40..42].copy_from_slice(&0u16.to_le_bytes()); // RECFMT
        raw[42..44].copy_from_slice(&3u16.to_le_bytes()); // QID
        raw[44..46].copy_from_slice(&127u16.to_le_bytes()); // SQSIZE (128 entries)
        raw[46] = 0x04; // CATTR: disable SQ flow control
        raw[48..52].copy_from_slice(&0u32.to_le_bytes()); // KATO: I/O queue
        raw
    }

    #[test]
    fn connect_view_reads_byte_exact_sqe() {
        let raw = io_connect_bytes();
        let sqe = Sqe::read_from_bytes(&raw[..]).unwrap();
        let cmd = ConnectCommand::from_sqe(&sqe);
        assert_eq!(cmd.opcode, FABRICS_OPCODE);
        assert_eq!(cmd.cid.get(), 0x1234);
        assert_eq!(cmd.fctype, FabricsCommandType::Connect as u8);
        assert_eq!(cmd.sgl1, SglDescriptor::transport(1024));
        assert_eq!(cmd.recfmt.get(), 0);
        assert_eq!(cmd.qid.get(), 3);
        assert!(!cmd.is_admin());
        assert_eq!(cmd.sqsize.get(), 127);
        assert_eq!(cmd.queue_size(), 128);
        assert!(cmd.sq_flow_control_disabled());
        assert_eq!(cmd.kato.get(), 0);

        // The builder produces the same bytes.
        let mut built = ConnectCommand::new(0x1234, 3, 128, 0, SglDescriptor::transport(1024));
        built.cattr = CATTR_DISABLE_SQ_FLOW_CONTROL;
        assert_eq!(built.as_bytes(), &raw[..]);
        assert_eq!(Sqe::from(built), sqe);
        assert_eq!(ConnectCommand::from(sqe), built);
        assert_eq!(built.to_sqe().as_bytes(), &raw[..]);
        assert_eq!(ConnectCommand::view(&sqe), &built);
        assert_eq!(FabricsCommandHeader::from_sqe(&sqe).command_type(), Some(FabricsCommandType::Connect));
    }

    #[test]
    fn admin_connect_kato() {
        let cmd = ConnectCommand::new(1, ADMIN_QID, 32, 120_000, SglDescriptor::in_capsule(0, 1024));
        let bytes = cmd.as_bytes();
        assert_eq!(&bytes[42..44], &[0, 0]);
        assert_eq!(&bytes[44..46], &[31, 0]);
        assert_eq!(&bytes[48..52], &120_000u32.to_le_bytes());
        assert!(cmd.is_admin());
        let mut sqe = cmd.to_sqe();
        ConnectCommand::view_mut(&mut sqe).kato = U32::new(5000);
        assert_eq!(sqe.cdw12.get(), 5000);
    }

    #[test]
    fn connect_data_byte_exact() {
        let hostid = [0x11u8; 16];
        let data = ConnectData::new(
            hostid,
            CNTLID_DYNAMIC,
            "nqn.2024-01.io.example:sub",
            "nqn.2014-08.org.nvmexpress:uuid:1b4e28ba-2fa1-11d2-883f-0016d3cca427",
        )
        .unwrap();
        let bytes = data.as_bytes();
        assert_eq!(bytes.len(), 1024);
        assert_eq!(&bytes[0..16], &hostid);
        assert_eq!(&bytes[16..18], &[0xff, 0xff]);
        assert!(bytes[18..256].iter().all(|&b| b == 0));
        assert_eq!(&bytes[256..282], b"nqn.2024-01.io.example:sub");
        assert!(bytes[282..512].iter().all(|&b| b == 0));
        assert_eq!(&bytes[512..544], b"nqn.2014-08.org.nvmexpress:uuid:");
        assert!(bytes[768..].iter().all(|&b| b == 0));

        let parsed = ConnectData::ref_from_data(bytes).unwrap();
        assert_eq!(parsed.subnqn(), Ok("nqn.2024-01.io.example:sub"));
        assert_eq!(
            parsed.hostnqn(),
            Ok("nqn.2014-08.org.nvmexpress:uuid:1b4e28ba-2fa1-11d2-883f-0016d3cca427")
        );
        assert_eq!(parsed.cntlid.get(), CNTLID_DYNAMIC);
        assert!(ConnectData::ref_from_data(&bytes[..1023]).is_none());
        assert!(format!("{parsed:?}").contains("nqn.2024-01.io.example:sub"));
    }

    #[test]
    fn nqn_parsing_rules() {
        let mut field = [0u8; 256];
        assert_eq!(nqn_str(&field), Err(NqnError::Empty));

        field[..3].copy_from_slice(b"nqn");
        assert_eq!(nqn_str(&field), Ok("nqn"));
        // Garbage after the terminator is ignored.
        field[10] = b'x';
        assert_eq!(nqn_str(&field), Ok("nqn"));

        let mut full = [b'a'; 256];
        assert_eq!(nqn_str(&full), Err(NqnError::NotTerminated));
        full[223] = 0;
        assert_eq!(nqn_str(&full).map(str::len), Ok(223));
        full[223] = b'a';
        full[224] = 0;
        assert_eq!(nqn_str(&full), Err(NqnError::TooLong { len: 224 }));

        let mut bad = [0u8; 256];
        bad[..2].copy_from_slice(&[0xc3, 0x28]);
        assert_eq!(nqn_str(&bad), Err(NqnError::InvalidUtf8));
    }

    #[test]
    fn nqn_setter_pads_and_rejects() {
        let mut field = [0xaau8; 256];
        set_nqn(&mut field, "nqn.x").unwrap();
        assert_eq!(&field[..5], b"nqn.x");
        assert!(field[5..].iter().all(|&b| b == 0));
        let long = "a".repeat(224);
        assert_eq!(set_nqn(&mut field, &long), Err(NqnError::TooLong { len: 224 }));
        assert_eq!(&field[..5], b"nqn.x"); // unchanged on error
        assert_eq!(set_nqn(&mut field, ""), Err(NqnError::Empty));
        assert_eq!(set_nqn(&mut field, "a\0b"), Err(NqnError::ContainsNul));
        set_nqn(&mut field, &"b".repeat(223)).unwrap();
        assert_eq!(nqn_str(&field).map(str::len), Ok(223));
    }

    #[test]
    fn cntlid_ranges() {
        assert!(!is_allocatable_cntlid(0));
        assert!(is_allocatable_cntlid(1));
        assert!(is_allocatable_cntlid(0xffef));
        assert!(!is_allocatable_cntlid(0xfff0));
        assert!(!is_allocatable_cntlid(CNTLID_STATIC_ANY));
        assert!(!is_allocatable_cntlid(CNTLID_DYNAMIC));
        assert_eq!(connect_success_dw0(0x0042), 0x0000_0042);
        assert_eq!(cntlid_from_dw0(0x0002_0042), 0x42); // ATR set
    }

    #[test]
    fn invalid_parameter_encoding_matches_linux() {
        // IPO_IATTR_CONNECT_DATA(subsysnqn) = (1 << 16) | 256
        assert_eq!(InvalidParameter::SUBNQN.to_dw0(), 0x0001_0100);
        // IPO_IATTR_CONNECT_DATA(hostnqn) = (1 << 16) | 512
        assert_eq!(InvalidParameter::HOSTNQN.to_dw0(), 0x0001_0200);
        // IPO_IATTR_CONNECT_DATA(cntlid) = (1 << 16) | 16
        assert_eq!(InvalidParameter::CNTLID.to_dw0(), 0x0001_0010);
        // IPO_IATTR_CONNECT_SQE(qid) = 42, IPO_IATTR_CONNECT_SQE(sqsize) = 44
        assert_eq!(InvalidParameter::QID.to_dw0(), 42);
        assert_eq!(InvalidParameter::SQSIZE.to_dw0(), 44);
        assert_eq!(InvalidParameter::CATTR.to_dw0(), 46);
        assert_eq!(InvalidParameter::KATO.to_dw0(), 48);
        for p in [
            InvalidParameter::QID,
            InvalidParameter::SUBNQN,
            InvalidParameter::Data { offset: 0xffff },
            InvalidParameter::Sqe { offset: 0 },
        ] {
            assert_eq!(InvalidParameter::from_dw0(p.to_dw0()), p);
        }
    }

    #[test]
    fn property_get_byte_exact() {
        let mut raw = [0u8; 64];
        raw[0] = 0x7f;
        raw[2..4].copy_from_slice(&7u16.to_le_bytes());
        raw[4] = 0x04;
        raw[40] = 1; // 8 bytes
        raw[44..48].copy_from_slice(&0u32.to_le_bytes()); // CAP
        let cmd = PropertyGetCommand::read_from_bytes(&raw[..]).unwrap();
        assert_eq!(cmd.width(), Some(PropertyWidth::Eight));
        assert_eq!(cmd.offset(), 0);
        assert_eq!(PropertyGetCommand::new(7, 0, PropertyWidth::Eight).as_bytes(), &raw[..]);

        raw[40] = 0;
        raw[44..48].copy_from_slice(&0x1cu32.to_le_bytes()); // CSTS
        let sqe = Sqe::read_from_bytes(&raw[..]).unwrap();
        let cmd = PropertyGetCommand::view(&sqe);
        assert_eq!(cmd.width(), Some(PropertyWidth::Four));
        assert_eq!(cmd.offset(), 0x1c);
        raw[40] = 2;
        assert_eq!(PropertyGetCommand::read_from_bytes(&raw[..]).unwrap().width(), None);
    }

    #[test]
    fn property_set_byte_exact() {
        let mut raw = [0u8; 64];
        raw[0] = 0x7f;
        raw[2..4].copy_from_slice(&9u16.to_le_bytes());
        raw[4] = 0x00;
        raw[40] = 0;
        raw[44..48].copy_from_slice(&0x14u32.to_le_bytes()); // CC
        raw[48..56].copy_from_slice(&0x0046_0001u64.to_le_bytes());
        let sqe = Sqe::read_from_bytes(&raw[..]).unwrap();
        let cmd = PropertySetCommand::from_sqe(&sqe);
        assert_eq!(cmd.fctype, FabricsCommandType::PropertySet as u8);
        assert_eq!(cmd.offset(), 0x14);
        assert_eq!(cmd.value_for_width(), Some(0x0046_0001));
        assert_eq!(sqe.cdw12.get(), 0x0046_0001);
        assert_eq!(
            PropertySetCommand::new(9, 0x14, PropertyWidth::Four, 0xdead_0000_0046_0001).as_bytes(),
            &raw[..]
        );
        let mut wide = cmd;
        wide.value = U64::new(0x1_0000_0002);
        assert_eq!(wide.value_for_width(), Some(2));
        wide.attrib = 1;
        assert_eq!(wide.value_for_width(), Some(0x1_0000_0002));
    }

    #[test]
    fn disconnect_byte_exact() {
        let mut raw = [0u8; 64];
        raw[0] = 0x7f;
        raw[1] = 0x40;
        raw[2..4].copy_from_slice(&0xabcdu16.to_le_bytes());
        raw[4] = 0x08;
        raw[39] = 0x5a;
        let cmd = DisconnectCommand::new(0xabcd);
        assert_eq!(cmd.as_bytes(), &raw[..]);
        let back = DisconnectCommand::from_sqe(&Sqe::read_from_bytes(&raw[..]).unwrap());
        assert_eq!(back.recfmt.get(), RECFMT_0);
        assert_eq!(back, cmd);
    }
}
