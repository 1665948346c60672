//! NVMe in-band authentication messages: the DH-HMAC-CHAP protocol (NVMe Base Specification 2.x,
//! "Authentication" and "DH-HMAC-CHAP Protocol"; carried by the Fabrics commands Authentication Send
//! and Authentication Receive, [`super::fabrics::AuthSendCommand`] / [`super::fabrics::AuthReceiveCommand`]).
//!
//! ```text
//!  host                                              controller
//!   │── Auth Send:    AUTH_Negotiate (T_ID, hash and DH group lists) ──────▶│
//!   │── Auth Receive: ◀── DH-HMAC-CHAP_Challenge (hash, group, S1, C1, g^x) │
//!   │── Auth Send:    DH-HMAC-CHAP_Reply (R1, [S2, C2], g^y) ──────────────▶│
//!   │── Auth Receive: ◀── DH-HMAC-CHAP_Success1 ([R2])  or AUTH_Failure1    │
//!   │── Auth Send:    DH-HMAC-CHAP_Success2  or AUTH_Failure2 (if R2 sent) ▶│
//! ```
//!
//! Every message starts with AUTH-Type (byte 0), AUTH-Id (byte 1) and the transaction identifier
//! T_ID (bytes 4..6). The fixed parts are `zerocopy` structs; [`AuthMessage::parse`] reads a whole
//! message with its variable parts as slices of the input, [`AuthMessage::encode`] writes one.
//! Parsing never allocates and never trusts a length field beyond the bytes it was given.

use core::fmt;

use zerocopy::little_endian::{U16, U32};
use zerocopy::{FromBytes, FromZeros, Immutable, IntoBytes, KnownLayout, Unaligned};

use super::opcode::code_enum;

/// AUTH-Type of the messages common to all authentication protocols (AUTH_Negotiate, AUTH_Failure1/2).
pub const AUTH_TYPE_COMMON: u8 = 0x00;
/// AUTH-Type of the DH-HMAC-CHAP messages (Challenge, Reply, Success1, Success2).
pub const AUTH_TYPE_DHCHAP: u8 = 0x01;
/// AUTHID of the DH-HMAC-CHAP protocol in an AUTH_Negotiate protocol descriptor.
pub const AUTH_ID_DHCHAP: u8 = 0x01;
/// SC_C "no secure channel concatenation".
pub const SC_C_NONE: u8 = 0x00;
/// REASON CODE of AUTH_Failure1/2: "Authentication failure" (the only one defined).
pub const FAILURE_REASON_AUTHENTICATION: u8 = 0x01;
/// Hash and DH group lists of a protocol descriptor hold at most this many identifiers each.
pub const MAX_IDS_PER_LIST: usize = 30;
/// Largest hash length of the defined hash functions (SHA-512), in bytes.
pub const MAX_HASH_LEN: usize = 64;

code_enum! {
    /// AUTH-Id: which message this is (together with AUTH-Type, see [`AuthMessageId::auth_type`]).
    pub enum AuthMessageId {
        /// AUTH_Negotiate (common message, host to controller).
        Negotiate = 0x00 => "AUTH_Negotiate",
        /// DH-HMAC-CHAP_Challenge (controller to host).
        Challenge = 0x01 => "DH-HMAC-CHAP_Challenge",
        /// DH-HMAC-CHAP_Reply (host to controller).
        Reply = 0x02 => "DH-HMAC-CHAP_Reply",
        /// DH-HMAC-CHAP_Success1 (controller to host).
        Success1 = 0x03 => "DH-HMAC-CHAP_Success1",
        /// DH-HMAC-CHAP_Success2 (host to controller, bidirectional authentication only).
        Success2 = 0x04 => "DH-HMAC-CHAP_Success2",
        /// AUTH_Failure2 (common message, host to controller).
        Failure2 = 0xf0 => "AUTH_Failure2",
        /// AUTH_Failure1 (common message, controller to host).
        Failure1 = 0xf1 => "AUTH_Failure1",
    }
}

impl AuthMessageId {
    /// The AUTH-Type this message is sent with.
    #[must_use]
    pub const fn auth_type(self) -> u8 {
        match self {
            Self::Negotiate | Self::Failure1 | Self::Failure2 => AUTH_TYPE_COMMON,
            _ => AUTH_TYPE_DHCHAP,
        }
    }
}

code_enum! {
    /// DH-HMAC-CHAP hash function identifiers (HashID; also the `hh` of a DHHC-1 secret).
    pub enum DhchapHash {
        /// SHA-256 (HMAC-SHA-256, 32-byte values).
        Sha256 = 0x01 => "SHA-256",
        /// SHA-384 (48-byte values).
        Sha384 = 0x02 => "SHA-384",
        /// SHA-512 (64-byte values).
        Sha512 = 0x03 => "SHA-512",
    }
}

impl DhchapHash {
    /// Hash length in bytes (HL): the length of challenges and responses.
    #[must_use]
    pub const fn hash_len(self) -> usize {
        match self {
            Self::Sha256 => 32,
            Self::Sha384 => 48,
            Self::Sha512 => 64,
        }
    }
}

code_enum! {
    /// DH-HMAC-CHAP Diffie-Hellman group identifiers (DHGID): the finite-field groups of RFC 7919.
    pub enum DhGroup {
        /// No Diffie-Hellman exchange (challenge–response only).
        Null = 0x00 => "null",
        /// ffdhe2048.
        Ffdhe2048 = 0x01 => "ffdhe2048",
        /// ffdhe3072.
        Ffdhe3072 = 0x02 => "ffdhe3072",
        /// ffdhe4096.
        Ffdhe4096 = 0x03 => "ffdhe4096",
        /// ffdhe6144.
        Ffdhe6144 = 0x04 => "ffdhe6144",
        /// ffdhe8192.
        Ffdhe8192 = 0x05 => "ffdhe8192",
    }
}

impl DhGroup {
    /// Length of a DH value (DHVLEN) in bytes: the size of the group's prime, values left-padded with
    /// zeros to it; 0 for [`DhGroup::Null`].
    #[must_use]
    pub const fn value_len(self) -> usize {
        match self {
            Self::Null => 0,
            Self::Ffdhe2048 => 256,
            Self::Ffdhe3072 => 384,
            Self::Ffdhe4096 => 512,
            Self::Ffdhe6144 => 768,
            Self::Ffdhe8192 => 1024,
        }
    }
}

code_enum! {
    /// REASON CODE EXPLANATION of AUTH_Failure1/2 (with reason code [`FAILURE_REASON_AUTHENTICATION`]).
    pub enum FailureExplanation {
        /// Authentication failed (wrong response, no usable secret).
        Failed = 0x01 => "authentication failed",
        /// No authentication protocol offered is usable.
        ProtocolNotUsable = 0x02 => "authentication protocol not usable",
        /// Secure channel concatenation mismatch.
        ConcatenationMismatch = 0x03 => "secure channel concatenation mismatch",
        /// No hash function offered is usable.
        HashNotUsable = 0x04 => "hash function not usable",
        /// No DH group offered is usable.
        DhGroupNotUsable = 0x05 => "DH group not usable",
        /// A field of the message is wrong (length, transaction ID, value).
        IncorrectPayload = 0x06 => "incorrect payload",
        /// The message was not expected at this point of the protocol.
        IncorrectProtocolMessage = 0x07 => "incorrect protocol message",
    }
}

/// AUTH_Negotiate fixed part (8 bytes), followed by NAPD [`ProtocolDescriptor`]s.
///
/// | bytes | field |
/// | --- | --- |
/// | 0 | AUTH-Type (`00h`) |
/// | 1 | AUTH-Id (`00h`) |
/// | 2..4 | reserved |
/// | 4..6 | T_ID |
/// | 6 | SC_C: secure channel concatenation |
/// | 7 | NAPD: number of protocol descriptors |
#[derive(Clone, Copy, Debug, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct NegotiateHeader {
    /// AUTH-Type.
    pub auth_type: u8,
    /// AUTH-Id.
    pub auth_id: u8,
    /// Reserved.
    pub reserved: [u8; 2],
    /// Transaction identifier.
    pub t_id: U16,
    /// Secure channel concatenation.
    pub sc_c: u8,
    /// Number of authentication protocol descriptors that follow.
    pub napd: u8,
}

/// An authentication protocol descriptor of AUTH_Negotiate (64 bytes).
///
/// | bytes | field |
/// | --- | --- |
/// | 0 | AUTHID ([`AUTH_ID_DHCHAP`]) |
/// | 1 | reserved |
/// | 2 | HALEN: hash identifiers in use |
/// | 3 | DHLEN: DH group identifiers in use |
/// | 4..34 | hash identifier list |
/// | 34..64 | DH group identifier list |
#[derive(Clone, Copy, Debug, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct ProtocolDescriptor {
    /// Authentication protocol identifier.
    pub authid: u8,
    /// Reserved.
    pub reserved: u8,
    /// Number of hash identifiers in [`ProtocolDescriptor::hash_ids`].
    pub halen: u8,
    /// Number of DH group identifiers in [`ProtocolDescriptor::dh_group_ids`].
    pub dhlen: u8,
    /// Hash identifiers ([`DhchapHash`] values), HALEN of them used.
    pub hash_ids: [u8; MAX_IDS_PER_LIST],
    /// DH group identifiers ([`DhGroup`] values), DHLEN of them used.
    pub dh_group_ids: [u8; MAX_IDS_PER_LIST],
}

impl ProtocolDescriptor {
    /// A DH-HMAC-CHAP descriptor offering `hashes` and `groups` (at most 30 of each; more are cut).
    #[must_use]
    pub fn dhchap(hashes: &[DhchapHash], groups: &[DhGroup]) -> Self {
        let mut d = Self::new_zeroed();
        d.authid = AUTH_ID_DHCHAP;
        for (slot, h) in d.hash_ids.iter_mut().zip(hashes) {
            *slot = h.code();
        }
        for (slot, g) in d.dh_group_ids.iter_mut().zip(groups) {
            *slot = g.code();
        }
        d.halen = hashes.len().min(MAX_IDS_PER_LIST) as u8;
        d.dhlen = groups.len().min(MAX_IDS_PER_LIST) as u8;
        d
    }

    /// The hash identifiers in use; `None` if HALEN exceeds the list (30).
    #[must_use]
    pub fn hashes(&self) -> Option<&[u8]> {
        self.hash_ids.get(..usize::from(self.halen))
    }

    /// The DH group identifiers in use; `None` if DHLEN exceeds the list (30).
    #[must_use]
    pub fn dh_groups(&self) -> Option<&[u8]> {
        self.dh_group_ids.get(..usize::from(self.dhlen))
    }
}

/// DH-HMAC-CHAP_Challenge fixed part (16 bytes), followed by HL bytes of challenge C1 and DHVLEN bytes
/// of the controller's DH value.
///
/// | bytes | field |
/// | --- | --- |
/// | 0 | AUTH-Type (`01h`) |
/// | 1 | AUTH-Id (`01h`) |
/// | 2..4 | reserved |
/// | 4..6 | T_ID |
/// | 6 | HL: hash length |
/// | 7 | reserved |
/// | 8 | HASHID |
/// | 9 | DHGID |
/// | 10..12 | DHVLEN |
/// | 12..16 | SEQNUM (S1) |
#[derive(Clone, Copy, Debug, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct ChallengeHeader {
    /// AUTH-Type.
    pub auth_type: u8,
    /// AUTH-Id.
    pub auth_id: u8,
    /// Reserved.
    pub reserved1: [u8; 2],
    /// Transaction identifier.
    pub t_id: U16,
    /// Hash length.
    pub hl: u8,
    /// Reserved.
    pub reserved2: u8,
    /// Hash function identifier.
    pub hash_id: u8,
    /// DH group identifier.
    pub dh_group_id: u8,
    /// DH value length.
    pub dhvlen: U16,
    /// Sequence number S1.
    pub seqnum: U32,
}

/// DH-HMAC-CHAP_Reply fixed part (16 bytes), followed by HL bytes of response R1, HL bytes of
/// challenge C2 (zeros unless CVALID) and DHVLEN bytes of the host's DH value.
///
/// | bytes | field |
/// | --- | --- |
/// | 0 | AUTH-Type (`01h`) |
/// | 1 | AUTH-Id (`02h`) |
/// | 2..4 | reserved |
/// | 4..6 | T_ID |
/// | 6 | HL |
/// | 7 | reserved |
/// | 8 | CVALID: C2 valid (bidirectional authentication) |
/// | 9 | reserved |
/// | 10..12 | DHVLEN |
/// | 12..16 | SEQNUM (S2; 0 for unidirectional) |
#[derive(Clone, Copy, Debug, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct ReplyHeader {
    /// AUTH-Type.
    pub auth_type: u8,
    /// AUTH-Id.
    pub auth_id: u8,
    /// Reserved.
    pub reserved1: [u8; 2],
    /// Transaction identifier.
    pub t_id: U16,
    /// Hash length.
    pub hl: u8,
    /// Reserved.
    pub reserved2: u8,
    /// Challenge C2 valid.
    pub cvalid: u8,
    /// Reserved.
    pub reserved3: u8,
    /// DH value length.
    pub dhvlen: U16,
    /// Sequence number S2.
    pub seqnum: U32,
}

/// DH-HMAC-CHAP_Success1 fixed part (16 bytes), followed by HL bytes of response R2 when RVALID.
///
/// | bytes | field |
/// | --- | --- |
/// | 0 | AUTH-Type (`01h`) |
/// | 1 | AUTH-Id (`03h`) |
/// | 2..4 | reserved |
/// | 4..6 | T_ID |
/// | 6 | HL (set also without a response: the Linux host checks it) |
/// | 7 | reserved |
/// | 8 | RVALID |
/// | 9..16 | reserved |
#[derive(Clone, Copy, Debug, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct Success1Header {
    /// AUTH-Type.
    pub auth_type: u8,
    /// AUTH-Id.
    pub auth_id: u8,
    /// Reserved.
    pub reserved1: [u8; 2],
    /// Transaction identifier.
    pub t_id: U16,
    /// Hash length.
    pub hl: u8,
    /// Reserved.
    pub reserved2: u8,
    /// Response R2 valid.
    pub rvalid: u8,
    /// Reserved.
    pub reserved3: [u8; 7],
}

/// DH-HMAC-CHAP_Success2 (16 bytes): AUTH-Type `01h`, AUTH-Id `04h`, T_ID at 4..6, the rest reserved.
#[derive(Clone, Copy, Debug, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct Success2Message {
    /// AUTH-Type.
    pub auth_type: u8,
    /// AUTH-Id.
    pub auth_id: u8,
    /// Reserved.
    pub reserved1: [u8; 2],
    /// Transaction identifier.
    pub t_id: U16,
    /// Reserved.
    pub reserved2: [u8; 10],
}

/// AUTH_Failure1 / AUTH_Failure2 (8 bytes).
///
/// | bytes | field |
/// | --- | --- |
/// | 0 | AUTH-Type (`00h`) |
/// | 1 | AUTH-Id (`F1h` / `F0h`) |
/// | 2..4 | reserved |
/// | 4..6 | T_ID |
/// | 6 | REASON CODE ([`FAILURE_REASON_AUTHENTICATION`]) |
/// | 7 | REASON CODE EXPLANATION ([`FailureExplanation`]) |
#[derive(Clone, Copy, Debug, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct FailureMessage {
    /// AUTH-Type.
    pub auth_type: u8,
    /// AUTH-Id.
    pub auth_id: u8,
    /// Reserved.
    pub reserved: [u8; 2],
    /// Transaction identifier.
    pub t_id: U16,
    /// Reason code.
    pub reason_code: u8,
    /// Reason code explanation.
    pub explanation: u8,
}

/// Why bytes are not an authentication message.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum AuthDecodeError {
    /// The message (by its fixed part and length fields) needs more bytes than were given.
    #[error("authentication message truncated: {needed} bytes needed, {got} given")]
    Truncated {
        /// Bytes the message needs.
        needed: usize,
        /// Bytes given.
        got: usize,
    },
    /// AUTH-Type / AUTH-Id name no message this crate knows.
    #[error("unknown authentication message type {auth_type:#04x} id {auth_id:#04x}")]
    UnknownMessage {
        /// AUTH-Type.
        auth_type: u8,
        /// AUTH-Id.
        auth_id: u8,
    },
}

/// AUTH_Negotiate.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Negotiate<'a> {
    /// Transaction identifier chosen by the host.
    pub t_id: u16,
    /// Secure channel concatenation ([`SC_C_NONE`]).
    pub sc_c: u8,
    /// The protocol descriptors (NAPD of them).
    pub protocols: &'a [ProtocolDescriptor],
}

/// DH-HMAC-CHAP_Challenge.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Challenge<'a> {
    /// Transaction identifier.
    pub t_id: u16,
    /// Hash function identifier ([`DhchapHash`] value).
    pub hash_id: u8,
    /// DH group identifier ([`DhGroup`] value).
    pub dh_group_id: u8,
    /// Sequence number S1.
    pub seqnum: u32,
    /// Challenge C1 (HL bytes).
    pub challenge: &'a [u8],
    /// The controller's DH value g^x mod p (DHVLEN bytes; empty for the null group).
    pub dh_value: &'a [u8],
}

/// DH-HMAC-CHAP_Reply.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Reply<'a> {
    /// Transaction identifier.
    pub t_id: u16,
    /// CVALID: nonzero when the host asks the controller to authenticate itself (C2 valid).
    pub cvalid: u8,
    /// Sequence number S2 (0 for unidirectional authentication).
    pub seqnum: u32,
    /// Response R1 (HL bytes).
    pub response: &'a [u8],
    /// Challenge C2 (HL bytes; zeros unless CVALID).
    pub challenge: &'a [u8],
    /// The host's DH value g^y mod p (DHVLEN bytes).
    pub dh_value: &'a [u8],
}

/// DH-HMAC-CHAP_Success1.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Success1<'a> {
    /// Transaction identifier.
    pub t_id: u16,
    /// HL field.
    pub hl: u8,
    /// Response R2 (HL bytes) when RVALID is set.
    pub response: Option<&'a [u8]>,
}

/// AUTH_Failure1 or AUTH_Failure2.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Failure {
    /// Transaction identifier.
    pub t_id: u16,
    /// REASON CODE.
    pub reason_code: u8,
    /// REASON CODE EXPLANATION ([`FailureExplanation`] value).
    pub explanation: u8,
}

/// One authentication message, its variable parts borrowed from the bytes it was parsed from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AuthMessage<'a> {
    /// AUTH_Negotiate.
    Negotiate(Negotiate<'a>),
    /// DH-HMAC-CHAP_Challenge.
    Challenge(Challenge<'a>),
    /// DH-HMAC-CHAP_Reply.
    Reply(Reply<'a>),
    /// DH-HMAC-CHAP_Success1.
    Success1(Success1<'a>),
    /// DH-HMAC-CHAP_Success2.
    Success2 {
        /// Transaction identifier.
        t_id: u16,
    },
    /// AUTH_Failure1 (controller to host).
    Failure1(Failure),
    /// AUTH_Failure2 (host to controller).
    Failure2(Failure),
}

/// Splits `len` bytes off the front of `rest`, or reports how many the message needs in total.
fn take<'a>(
    rest: &mut &'a [u8],
    len: usize,
    needed_total: usize,
    got: usize,
) -> Result<&'a [u8], AuthDecodeError> {
    if rest.len() < len {
        return Err(AuthDecodeError::Truncated { needed: needed_total, got });
    }
    let (head, tail) = rest.split_at(len);
    *rest = tail;
    Ok(head)
}

fn header<T: FromBytes + KnownLayout + Immutable>(bytes: &[u8]) -> Result<(&T, &[u8]), AuthDecodeError> {
    T::ref_from_prefix(bytes)
        .map_err(|_| AuthDecodeError::Truncated { needed: core::mem::size_of::<T>(), got: bytes.len() })
}

impl<'a> AuthMessage<'a> {
    /// Parses the message at the start of `bytes`; returns it and its length. Bytes after the
    /// message (a receive buffer larger than the message) are not looked at: a controller that needs
    /// an exact length compares the returned length with what it received.
    pub fn parse(bytes: &'a [u8]) -> Result<(Self, usize), AuthDecodeError> {
        let got = bytes.len();
        let (&auth_type, &auth_id) = match bytes {
            [t, i, ..] => (t, i),
            _ => return Err(AuthDecodeError::Truncated { needed: 2, got }),
        };
        let id = AuthMessageId::from_u8(auth_id)
            .filter(|id| id.auth_type() == auth_type)
            .ok_or(AuthDecodeError::UnknownMessage { auth_type, auth_id })?;
        match id {
            AuthMessageId::Negotiate => {
                let (h, mut rest) = header::<NegotiateHeader>(bytes)?;
                let napd = usize::from(h.napd);
                let needed = size_of_val(h) + napd * core::mem::size_of::<ProtocolDescriptor>();
                let raw = take(&mut rest, needed - size_of_val(h), needed, got)?;
                let protocols = <[ProtocolDescriptor]>::ref_from_bytes(raw)
                    .map_err(|_| AuthDecodeError::Truncated { needed, got })?;
                let msg = Negotiate { t_id: h.t_id.get(), sc_c: h.sc_c, protocols };
                Ok((Self::Negotiate(msg), needed))
            }
            AuthMessageId::Challenge => {
                let (h, mut rest) = header::<ChallengeHeader>(bytes)?;
                let hl = usize::from(h.hl);
                let dhvlen = usize::from(h.dhvlen.get());
                let needed = size_of_val(h) + hl + dhvlen;
                let challenge = take(&mut rest, hl, needed, got)?;
                let dh_value = take(&mut rest, dhvlen, needed, got)?;
                let msg = Challenge {
                    t_id: h.t_id.get(),
                    hash_id: h.hash_id,
                    dh_group_id: h.dh_group_id,
                    seqnum: h.seqnum.get(),
                    challenge,
                    dh_value,
                };
                Ok((Self::Challenge(msg), needed))
            }
            AuthMessageId::Reply => {
                let (h, mut rest) = header::<ReplyHeader>(bytes)?;
                let hl = usize::from(h.hl);
                let dhvlen = usize::from(h.dhvlen.get());
                let needed = size_of_val(h) + 2 * hl + dhvlen;
                let response = take(&mut rest, hl, needed, got)?;
                let challenge = take(&mut rest, hl, needed, got)?;
                let dh_value = take(&mut rest, dhvlen, needed, got)?;
                let msg = Reply {
                    t_id: h.t_id.get(),
                    cvalid: h.cvalid,
                    seqnum: h.seqnum.get(),
                    response,
                    challenge,
                    dh_value,
                };
                Ok((Self::Reply(msg), needed))
            }
            AuthMessageId::Success1 => {
                let (h, mut rest) = header::<Success1Header>(bytes)?;
                let hl = usize::from(h.hl);
                let (response, needed) = if h.rvalid != 0 {
                    let needed = size_of_val(h) + hl;
                    (Some(take(&mut rest, hl, needed, got)?), needed)
                } else {
                    (None, size_of_val(h))
                };
                Ok((Self::Success1(Success1 { t_id: h.t_id.get(), hl: h.hl, response }), needed))
            }
            AuthMessageId::Success2 => {
                let (h, _) = header::<Success2Message>(bytes)?;
                Ok((Self::Success2 { t_id: h.t_id.get() }, size_of_val(h)))
            }
            AuthMessageId::Failure1 | AuthMessageId::Failure2 => {
                let (h, _) = header::<FailureMessage>(bytes)?;
                let f =
                    Failure { t_id: h.t_id.get(), reason_code: h.reason_code, explanation: h.explanation };
                let msg = if id == AuthMessageId::Failure1 { Self::Failure1(f) } else { Self::Failure2(f) };
                Ok((msg, size_of_val(h)))
            }
        }
    }

    /// The message's identifier.
    #[must_use]
    pub fn id(&self) -> AuthMessageId {
        match self {
            Self::Negotiate(_) => AuthMessageId::Negotiate,
            Self::Challenge(_) => AuthMessageId::Challenge,
            Self::Reply(_) => AuthMessageId::Reply,
            Self::Success1(_) => AuthMessageId::Success1,
            Self::Success2 { .. } => AuthMessageId::Success2,
            Self::Failure1(_) => AuthMessageId::Failure1,
            Self::Failure2(_) => AuthMessageId::Failure2,
        }
    }

    /// The transaction identifier.
    #[must_use]
    pub fn t_id(&self) -> u16 {
        match self {
            Self::Negotiate(m) => m.t_id,
            Self::Challenge(m) => m.t_id,
            Self::Reply(m) => m.t_id,
            Self::Success1(m) => m.t_id,
            Self::Success2 { t_id } => *t_id,
            Self::Failure1(f) | Self::Failure2(f) => f.t_id,
        }
    }

    /// Length of the encoded message in bytes.
    #[must_use]
    pub fn encoded_len(&self) -> usize {
        match self {
            Self::Negotiate(m) => 8 + 64 * m.protocols.len(),
            Self::Challenge(m) => 16 + m.challenge.len() + m.dh_value.len(),
            Self::Reply(m) => 16 + m.response.len() + m.challenge.len() + m.dh_value.len(),
            Self::Success1(m) => 16 + m.response.map_or(0, <[u8]>::len),
            Self::Success2 { .. } => 16,
            Self::Failure1(_) | Self::Failure2(_) => 8,
        }
    }

    /// Appends the encoded message to `out`. Lengths that do not fit their fields (HL over 255,
    /// DHVLEN over 65535, more than 255 descriptors, a C2 of another length than R1) are written
    /// truncated to the field: build messages from values of the defined sizes.
    pub fn encode(&self, out: &mut Vec<u8>) {
        out.reserve(self.encoded_len());
        let id = self.id();
        match self {
            Self::Negotiate(m) => {
                let h = NegotiateHeader {
                    auth_type: id.auth_type(),
                    auth_id: id.code(),
                    reserved: [0; 2],
                    t_id: U16::new(m.t_id),
                    sc_c: m.sc_c,
                    napd: m.protocols.len().min(255) as u8,
                };
                out.extend_from_slice(h.as_bytes());
                for d in m.protocols.iter().take(255) {
                    out.extend_from_slice(d.as_bytes());
                }
            }
            Self::Challenge(m) => {
                let h = ChallengeHeader {
                    auth_type: id.auth_type(),
                    auth_id: id.code(),
                    reserved1: [0; 2],
                    t_id: U16::new(m.t_id),
                    hl: m.challenge.len() as u8,
                    reserved2: 0,
                    hash_id: m.hash_id,
                    dh_group_id: m.dh_group_id,
                    dhvlen: U16::new(m.dh_value.len() as u16),
                    seqnum: U32::new(m.seqnum),
                };
                out.extend_from_slice(h.as_bytes());
                out.extend_from_slice(m.challenge);
                out.extend_from_slice(m.dh_value);
            }
            Self::Reply(m) => {
                let h = ReplyHeader {
                    auth_type: id.auth_type(),
                    auth_id: id.code(),
                    reserved1: [0; 2],
                    t_id: U16::new(m.t_id),
                    hl: m.response.len() as u8,
                    reserved2: 0,
                    cvalid: m.cvalid,
                    reserved3: 0,
                    dhvlen: U16::new(m.dh_value.len() as u16),
                    seqnum: U32::new(m.seqnum),
                };
                out.extend_from_slice(h.as_bytes());
                out.extend_from_slice(m.response);
                out.extend_from_slice(m.challenge);
                out.extend_from_slice(m.dh_value);
            }
            Self::Success1(m) => {
                let h = Success1Header {
                    auth_type: id.auth_type(),
                    auth_id: id.code(),
                    reserved1: [0; 2],
                    t_id: U16::new(m.t_id),
                    hl: m.hl,
                    reserved2: 0,
                    rvalid: u8::from(m.response.is_some()),
                    reserved3: [0; 7],
                };
                out.extend_from_slice(h.as_bytes());
                if let Some(r) = m.response {
                    out.extend_from_slice(r);
                }
            }
            Self::Success2 { t_id } => {
                let mut m = Success2Message::new_zeroed();
                m.auth_type = id.auth_type();
                m.auth_id = id.code();
                m.t_id = U16::new(*t_id);
                out.extend_from_slice(m.as_bytes());
            }
            Self::Failure1(f) | Self::Failure2(f) => {
                let m = FailureMessage {
                    auth_type: id.auth_type(),
                    auth_id: id.code(),
                    reserved: [0; 2],
                    t_id: U16::new(f.t_id),
                    reason_code: f.reason_code,
                    explanation: f.explanation,
                };
                out.extend_from_slice(m.as_bytes());
            }
        }
    }

    /// The encoded message.
    #[must_use]
    pub fn to_vec(&self) -> Vec<u8> {
        let mut v = Vec::new();
        self.encode(&mut v);
        v
    }
}

impl Failure {
    /// An authentication failure with `explanation` in transaction `t_id`.
    #[must_use]
    pub fn new(t_id: u16, explanation: FailureExplanation) -> Self {
        Self { t_id, reason_code: FAILURE_REASON_AUTHENTICATION, explanation: explanation.code() }
    }
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match FailureExplanation::from_u8(self.explanation) {
            Some(e) => write!(f, "{e}"),
            None => write!(f, "reason {:#04x}/{:#04x}", self.reason_code, self.explanation),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use core::mem::{offset_of, size_of};

    #[test]
    fn layouts_match_the_specification() {
        assert_eq!(size_of::<NegotiateHeader>(), 8);
        assert_eq!(offset_of!(NegotiateHeader, t_id), 4);
        assert_eq!(offset_of!(NegotiateHeader, napd), 7);
        assert_eq!(size_of::<ProtocolDescriptor>(), 64);
        assert_eq!(offset_of!(ProtocolDescriptor, hash_ids), 4);
        assert_eq!(offset_of!(ProtocolDescriptor, dh_group_ids), 34);
        assert_eq!(size_of::<ChallengeHeader>(), 16);
        assert_eq!(offset_of!(ChallengeHeader, hl), 6);
        assert_eq!(offset_of!(ChallengeHeader, hash_id), 8);
        assert_eq!(offset_of!(ChallengeHeader, dh_group_id), 9);
        assert_eq!(offset_of!(ChallengeHeader, dhvlen), 10);
        assert_eq!(offset_of!(ChallengeHeader, seqnum), 12);
        assert_eq!(size_of::<ReplyHeader>(), 16);
        assert_eq!(offset_of!(ReplyHeader, cvalid), 8);
        assert_eq!(offset_of!(ReplyHeader, dhvlen), 10);
        assert_eq!(offset_of!(ReplyHeader, seqnum), 12);
        assert_eq!(size_of::<Success1Header>(), 16);
        assert_eq!(offset_of!(Success1Header, rvalid), 8);
        assert_eq!(size_of::<Success2Message>(), 16);
        assert_eq!(size_of::<FailureMessage>(), 8);
        assert_eq!(offset_of!(FailureMessage, explanation), 7);
    }

    /// AUTH_Negotiate exactly as the Linux host builds it: T_ID, no secure channel concatenation, one
    /// DH-HMAC-CHAP descriptor offering SHA-256/384/512 and the null group plus all five FFDHE groups
    /// (72 bytes).
    #[test]
    fn negotiate_byte_exact() {
        let mut raw = vec![0u8; 72];
        raw[0] = 0x00;
        raw[1] = 0x00;
        raw[4..6].copy_from_slice(&0x0102u16.to_le_bytes());
        raw[6] = 0;
        raw[7] = 1;
        raw[8] = 0x01; // AUTHID
        raw[10] = 3; // HALEN
        raw[11] = 6; // DHLEN
        raw[12..15].copy_from_slice(&[1, 2, 3]);
        raw[42..48].copy_from_slice(&[0, 1, 2, 3, 4, 5]);
        let d = ProtocolDescriptor::dhchap(
            &[DhchapHash::Sha256, DhchapHash::Sha384, DhchapHash::Sha512],
            &[
                DhGroup::Null,
                DhGroup::Ffdhe2048,
                DhGroup::Ffdhe3072,
                DhGroup::Ffdhe4096,
                DhGroup::Ffdhe6144,
                DhGroup::Ffdhe8192,
            ],
        );
        let msg = AuthMessage::Negotiate(Negotiate { t_id: 0x0102, sc_c: SC_C_NONE, protocols: &[d] });
        assert_eq!(msg.to_vec(), raw);
        let (back, len) = AuthMessage::parse(&raw).unwrap();
        assert_eq!(len, 72);
        assert_eq!(back, msg);
        let AuthMessage::Negotiate(n) = back else { panic!() };
        assert_eq!(n.protocols[0].hashes(), Some(&[1u8, 2, 3][..]));
        assert_eq!(n.protocols[0].dh_groups(), Some(&[0u8, 1, 2, 3, 4, 5][..]));
    }

    #[test]
    fn challenge_reply_success_failure_byte_exact() {
        let c1 = [0xc1u8; 32];
        let dh = [0xd4u8; 256];
        let mut raw = vec![0x01, 0x01, 0, 0, 0x34, 0x12, 32, 0, 0x01, 0x01];
        raw.extend_from_slice(&256u16.to_le_bytes());
        raw.extend_from_slice(&0xdead_beefu32.to_le_bytes());
        raw.extend_from_slice(&c1);
        raw.extend_from_slice(&dh);
        let msg = AuthMessage::Challenge(Challenge {
            t_id: 0x1234,
            hash_id: 1,
            dh_group_id: 1,
            seqnum: 0xdead_beef,
            challenge: &c1,
            dh_value: &dh,
        });
        assert_eq!(msg.to_vec(), raw);
        assert_eq!(AuthMessage::parse(&raw).unwrap(), (msg, 16 + 32 + 256));

        let r1 = [0x11u8; 48];
        let c2 = [0x22u8; 48];
        let mut raw = vec![0x01, 0x02, 0, 0, 0x34, 0x12, 48, 0, 1, 0, 0, 0];
        raw.extend_from_slice(&7u32.to_le_bytes());
        raw.extend_from_slice(&r1);
        raw.extend_from_slice(&c2);
        let msg = AuthMessage::Reply(Reply {
            t_id: 0x1234,
            cvalid: 1,
            seqnum: 7,
            response: &r1,
            challenge: &c2,
            dh_value: &[],
        });
        assert_eq!(msg.to_vec(), raw);
        assert_eq!(AuthMessage::parse(&raw).unwrap(), (msg, 112));

        let r2 = [0x33u8; 64];
        let mut raw = vec![0x01, 0x03, 0, 0, 0x34, 0x12, 64, 0, 1, 0, 0, 0, 0, 0, 0, 0];
        raw.extend_from_slice(&r2);
        let msg = AuthMessage::Success1(Success1 { t_id: 0x1234, hl: 64, response: Some(&r2) });
        assert_eq!(msg.to_vec(), raw);
        assert_eq!(AuthMessage::parse(&raw).unwrap(), (msg, 80));
        // Without a response: 16 bytes, HL still set.
        let raw = [0x01, 0x03, 0, 0, 0x34, 0x12, 32, 0, 0, 0, 0, 0, 0, 0, 0, 0];
        let msg = AuthMessage::Success1(Success1 { t_id: 0x1234, hl: 32, response: None });
        assert_eq!(msg.to_vec(), raw);

        let raw = [0x01, 0x04, 0, 0, 0x34, 0x12, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0];
        assert_eq!(AuthMessage::Success2 { t_id: 0x1234 }.to_vec(), raw);
        assert_eq!(AuthMessage::parse(&raw).unwrap(), (AuthMessage::Success2 { t_id: 0x1234 }, 16));

        let raw = [0x00, 0xf1, 0, 0, 0x34, 0x12, 0x01, 0x07];
        let f = Failure::new(0x1234, FailureExplanation::IncorrectProtocolMessage);
        assert_eq!(AuthMessage::Failure1(f).to_vec(), raw);
        assert_eq!(AuthMessage::parse(&raw).unwrap(), (AuthMessage::Failure1(f), 8));
        let raw = [0x00, 0xf0, 0, 0, 0x34, 0x12, 0x01, 0x01];
        assert_eq!(
            AuthMessage::parse(&raw).unwrap().0,
            AuthMessage::Failure2(Failure::new(0x1234, FailureExplanation::Failed))
        );
        assert_eq!(f.to_string(), "incorrect protocol message");
    }

    #[test]
    fn truncated_and_unknown_messages_are_errors() {
        assert_eq!(AuthMessage::parse(&[]), Err(AuthDecodeError::Truncated { needed: 2, got: 0 }));
        assert_eq!(
            AuthMessage::parse(&[0x01, 0x09, 0, 0]),
            Err(AuthDecodeError::UnknownMessage { auth_type: 1, auth_id: 9 })
        );
        // A DH-HMAC-CHAP id with the common type is not that message.
        assert_eq!(
            AuthMessage::parse(&[0x00, 0x02, 0, 0]),
            Err(AuthDecodeError::UnknownMessage { auth_type: 0, auth_id: 2 })
        );
        // NAPD says two descriptors, one given.
        let mut raw = vec![0u8; 72];
        raw[7] = 2;
        assert_eq!(AuthMessage::parse(&raw), Err(AuthDecodeError::Truncated { needed: 136, got: 72 }));
        // DHVLEN of 65535 with nothing behind it.
        let mut raw = vec![0x01, 0x02, 0, 0, 0, 0, 32, 0, 0, 0, 0xff, 0xff, 0, 0, 0, 0];
        raw.extend_from_slice(&[0; 64]);
        assert_eq!(
            AuthMessage::parse(&raw),
            Err(AuthDecodeError::Truncated { needed: 16 + 64 + 65535, got: 80 })
        );
        assert_eq!(
            AuthMessage::parse(&[0x01, 0x04, 0, 0]),
            Err(AuthDecodeError::Truncated { needed: 16, got: 4 })
        );
    }

    #[test]
    fn trailing_bytes_are_left_alone() {
        let mut raw = AuthMessage::Success2 { t_id: 9 }.to_vec();
        raw.extend_from_slice(&[0; 100]);
        assert_eq!(AuthMessage::parse(&raw).unwrap(), (AuthMessage::Success2 { t_id: 9 }, 16));
    }

    use proptest::prelude::*;

    proptest! {
        /// parse(encode(m)) == m for every message, with any bytes after it left alone; and parsing
        /// arbitrary bytes never panics and never claims more bytes than it was given.
        #[test]
        fn encode_parse_round_trip(
            kind in 0u8..7,
            t_id in any::<u16>(),
            seqnum in any::<u32>(),
            small in any::<u8>(),
            hl in prop::sample::select(vec![32usize, 48, 64]),
            dh in prop::collection::vec(any::<u8>(), 0..300),
            tail in prop::collection::vec(any::<u8>(), 0..20),
        ) {
            let a = vec![0xa5u8; hl];
            let b = vec![0x5au8; hl];
            let d = ProtocolDescriptor::dhchap(&[DhchapHash::Sha256], &[DhGroup::Null, DhGroup::Ffdhe4096]);
            let protocols = [d, d];
            let msg = match kind {
                0 => AuthMessage::Negotiate(Negotiate { t_id, sc_c: small, protocols: &protocols[..usize::from(small % 3)] }),
                1 => AuthMessage::Challenge(Challenge { t_id, hash_id: small, dh_group_id: small, seqnum, challenge: &a, dh_value: &dh }),
                2 => AuthMessage::Reply(Reply { t_id, cvalid: small, seqnum, response: &a, challenge: &b, dh_value: &dh }),
                3 => AuthMessage::Success1(Success1 { t_id, hl: hl as u8, response: (small % 2 == 0).then_some(&a[..]) }),
                4 => AuthMessage::Success2 { t_id },
                5 => AuthMessage::Failure1(Failure { t_id, reason_code: small, explanation: small.wrapping_add(1) }),
                _ => AuthMessage::Failure2(Failure { t_id, reason_code: 1, explanation: small }),
            };
            let mut bytes = msg.to_vec();
            prop_assert_eq!(bytes.len(), msg.encoded_len());
            let len = bytes.len();
            bytes.extend_from_slice(&tail);
            prop_assert_eq!(AuthMessage::parse(&bytes).unwrap(), (msg, len));
        }

        #[test]
        fn parsing_garbage_never_panics(bytes in prop::collection::vec(any::<u8>(), 0..400)) {
            if let Ok((_, len)) = AuthMessage::parse(&bytes) {
                prop_assert!(len <= bytes.len());
            }
        }
    }

    #[test]
    fn identifier_tables() {
        assert_eq!(DhchapHash::Sha384.hash_len(), 48);
        assert_eq!(DhGroup::Ffdhe6144.value_len(), 768);
        assert_eq!(DhGroup::from_u8(6), None);
        assert_eq!(AuthMessageId::Failure1.auth_type(), AUTH_TYPE_COMMON);
        assert_eq!(AuthMessageId::Success2.auth_type(), AUTH_TYPE_DHCHAP);
        let d = ProtocolDescriptor { halen: 31, ..ProtocolDescriptor::new_zeroed() };
        assert_eq!(d.hashes(), None);
    }
}
