//! The host side of DH-HMAC-CHAP for one queue, as a sans-I/O state machine: it hands out the
//! Authentication Send / Receive commands to submit and consumes their completions.
//!
//! ```text
//!  poll_command ─▶ Send AUTH_Negotiate ─▶ Receive (Challenge) ─▶ Send Reply ─▶ Receive (Success1)
//!       ▲                                                                         │ R2 checked if
//!       └──────────── handle_completion after each ◀──────────────────────────────┤ bidirectional
//!                                                         Send Success2 / Failure2 ◀┘
//! ```

use std::sync::Arc;

use nvmeof_proto::nvme::auth::{
    AuthMessage, Challenge, DhGroup, DhchapHash, Failure, FailureExplanation, Negotiate, ProtocolDescriptor,
    Reply, SC_C_NONE,
};
use nvmeof_proto::nvme::fabrics::{AuthReceiveCommand, AuthSendCommand};
use nvmeof_proto::nvme::{SglDescriptor, Sqe, Status};
use nvmeof_proto::Payload;
use zeroize::Zeroizing;

use super::Completion;
use crate::auth::dh::KeyPair;
use crate::auth::{DhchapSecret, Entropy, Response, CONTROLLER_LABEL, HOST_LABEL};

/// The buffer offered for the controller's messages (what the Linux host offers).
pub const AUTH_RECEIVE_LEN: u32 = 4096;

/// An Authentication Send command carrying `message` (the SGL is set on submission).
#[must_use]
pub fn auth_send_command(message: Vec<u8>) -> (Sqe, Payload) {
    let tl = message.len() as u32;
    let sqe = AuthSendCommand::new(0, tl, SglDescriptor::in_capsule(0, tl)).to_sqe();
    (sqe, Payload::from(message))
}

/// An Authentication Receive command for an `al`-byte buffer (the SGL is set on submission).
#[must_use]
pub fn auth_receive_command(al: u32) -> Sqe {
    AuthReceiveCommand::new(0, al, SglDescriptor::transport(al)).to_sqe()
}

/// How a host authenticates: its identity, its secrets, and what it offers.
#[derive(Clone, Debug)]
pub struct HostAuthConfig {
    /// The host NQN the queue connected with.
    pub hostnqn: String,
    /// The subsystem NQN the queue connected to.
    pub subnqn: String,
    /// The host's secret.
    pub secret: DhchapSecret,
    /// The controller's secret: with it the host asks the controller to authenticate itself too
    /// (bidirectional authentication).
    pub controller_secret: Option<DhchapSecret>,
    /// Hash functions offered (the controller picks).
    pub hashes: Vec<DhchapHash>,
    /// DH groups offered (the controller picks).
    pub dh_groups: Vec<DhGroup>,
}

impl HostAuthConfig {
    /// Offers every hash function and DH group, as the Linux host does.
    #[must_use]
    pub fn new(hostnqn: impl Into<String>, subnqn: impl Into<String>, secret: DhchapSecret) -> Self {
        Self {
            hostnqn: hostnqn.into(),
            subnqn: subnqn.into(),
            secret,
            controller_secret: None,
            hashes: vec![DhchapHash::Sha256, DhchapHash::Sha384, DhchapHash::Sha512],
            dh_groups: vec![
                DhGroup::Null,
                DhGroup::Ffdhe2048,
                DhGroup::Ffdhe3072,
                DhGroup::Ffdhe4096,
                DhGroup::Ffdhe6144,
                DhGroup::Ffdhe8192,
            ],
        }
    }
}

/// What a successful authentication used.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AuthOutcome {
    /// The hash function the controller chose.
    pub hash: DhchapHash,
    /// The DH group the controller chose.
    pub dh_group: DhGroup,
    /// The controller proved the controller secret too.
    pub bidirectional: bool,
}

/// Why authentication did not succeed.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum HostAuthError {
    /// An authentication command failed with this status.
    #[error("an authentication command failed: {}", .0.name().unwrap_or("unknown status"))]
    Status(Status),
    /// The controller refused (AUTH_Failure1).
    #[error("the controller refused authentication: {0}")]
    Refused(Failure),
    /// The controller's message was not what the protocol allows (AUTH_Failure2 was sent).
    #[error("invalid message from the controller: {0}")]
    Protocol(&'static str),
    /// The controller did not prove the controller secret (AUTH_Failure2 was sent).
    #[error("the controller failed to authenticate")]
    ControllerNotAuthenticated,
    /// No random bytes.
    #[error("the random number source failed")]
    Entropy,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Expect {
    NegotiateSent,
    Challenge,
    ReplySent,
    Success1,
    Success2Sent,
    Failure2Sent,
}

enum Next {
    Send(Vec<u8>),
    Receive,
}

/// The host side of one authentication transaction on one queue.
pub struct HostAuthenticator {
    config: Arc<HostAuthConfig>,
    entropy: Arc<dyn Entropy>,
    t_id: u16,
    next: Option<(Next, Expect)>,
    awaiting: Option<Expect>,
    outcome: Option<AuthOutcome>,
    expected_r2: Option<Zeroizing<Vec<u8>>>,
    /// The error to report once the AUTH_Failure2 that announces it has completed.
    after_failure2: Option<HostAuthError>,
    result: Option<Result<AuthOutcome, HostAuthError>>,
}

impl std::fmt::Debug for HostAuthenticator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HostAuthenticator")
            .field("t_id", &self.t_id)
            .field("awaiting", &self.awaiting)
            .field("result", &self.result)
            .finish_non_exhaustive()
    }
}

impl HostAuthenticator {
    /// A transaction with identifier `t_id` (the Linux host counts them per controller).
    #[must_use]
    pub fn new(config: Arc<HostAuthConfig>, t_id: u16, entropy: Arc<dyn Entropy>) -> Self {
        let negotiate = AuthMessage::Negotiate(Negotiate {
            t_id,
            sc_c: SC_C_NONE,
            protocols: &[ProtocolDescriptor::dhchap(&config.hashes, &config.dh_groups)],
        })
        .to_vec();
        Self {
            config,
            entropy,
            t_id,
            next: Some((Next::Send(negotiate), Expect::NegotiateSent)),
            awaiting: None,
            outcome: None,
            expected_r2: None,
            after_failure2: None,
            result: None,
        }
    }

    /// The next command to submit (the SQE, its data, and the bytes to read); `None` while one is
    /// outstanding or once the transaction is over.
    pub fn poll_command(&mut self) -> Option<(Sqe, Option<Payload>, u32)> {
        if self.awaiting.is_some() || self.result.is_some() {
            return None;
        }
        let (next, expect) = self.next.take()?;
        self.awaiting = Some(expect);
        Some(match next {
            Next::Send(msg) => {
                let (sqe, data) = auth_send_command(msg);
                (sqe, Some(data), 0)
            }
            Next::Receive => (auth_receive_command(AUTH_RECEIVE_LEN), None, AUTH_RECEIVE_LEN),
        })
    }

    /// The outcome, once the transaction is over.
    #[must_use]
    pub fn result(&self) -> Option<&Result<AuthOutcome, HostAuthError>> {
        self.result.as_ref()
    }

    fn finish(&mut self, r: Result<AuthOutcome, HostAuthError>) {
        self.next = None;
        self.result = Some(r);
    }

    /// Ends the transaction with AUTH_Failure2 (`explanation`), then `error`.
    fn refuse(&mut self, explanation: FailureExplanation, error: HostAuthError) {
        let msg = AuthMessage::Failure2(Failure::new(self.t_id, explanation)).to_vec();
        self.after_failure2 = Some(error);
        self.next = Some((Next::Send(msg), Expect::Failure2Sent));
    }

    /// Hands in the completion of the command last returned by [`HostAuthenticator::poll_command`].
    pub fn handle_completion(&mut self, c: &Completion) {
        let Some(expect) = self.awaiting.take() else { return };
        if expect == Expect::Failure2Sent {
            let e = self.after_failure2.take().unwrap_or(HostAuthError::Protocol("refused"));
            self.finish(Err(e));
            return;
        }
        if !c.status().is_success() {
            self.finish(Err(HostAuthError::Status(c.status())));
            return;
        }
        match expect {
            Expect::NegotiateSent => self.next = Some((Next::Receive, Expect::Challenge)),
            Expect::ReplySent => self.next = Some((Next::Receive, Expect::Success1)),
            Expect::Success2Sent => {
                let r = self.outcome.ok_or(HostAuthError::Protocol("no outcome"));
                self.finish(r);
            }
            Expect::Challenge => self.challenge(&c.data.to_bytes()),
            Expect::Success1 => self.success1(&c.data.to_bytes()),
            Expect::Failure2Sent => {}
        }
    }

    fn challenge(&mut self, data: &[u8]) {
        let c = match AuthMessage::parse(data) {
            Ok((AuthMessage::Challenge(c), _)) => c,
            Ok((AuthMessage::Failure1(f), _)) => return self.finish(Err(HostAuthError::Refused(f))),
            _ => {
                return self.refuse(
                    FailureExplanation::IncorrectProtocolMessage,
                    HostAuthError::Protocol("expected DH-HMAC-CHAP_Challenge"),
                )
            }
        };
        match self.reply(&c) {
            Ok(reply) => self.next = Some((Next::Send(reply), Expect::ReplySent)),
            Err((explanation, e)) => self.refuse(explanation, e),
        }
    }

    fn reply(&mut self, c: &Challenge<'_>) -> Result<Vec<u8>, (FailureExplanation, HostAuthError)> {
        let payload = |what| (FailureExplanation::IncorrectPayload, HostAuthError::Protocol(what));
        if c.t_id != self.t_id {
            return Err(payload("wrong transaction ID in the challenge"));
        }
        let hash = DhchapHash::from_u8(c.hash_id).filter(|h| self.config.hashes.contains(h)).ok_or((
            FailureExplanation::HashNotUsable,
            HostAuthError::Protocol("hash function not offered"),
        ))?;
        let group = DhGroup::from_u8(c.dh_group_id)
            .filter(|g| self.config.dh_groups.contains(g))
            .ok_or((FailureExplanation::DhGroupNotUsable, HostAuthError::Protocol("DH group not offered")))?;
        if c.challenge.len() != hash.hash_len() {
            return Err(payload("HL is not the hash length"));
        }
        if c.dh_value.len() != group.value_len() {
            return Err(payload("DH value of the wrong length"));
        }
        let entropy_err = || (FailureExplanation::Failed, HostAuthError::Entropy);
        let keys = match group {
            DhGroup::Null => None,
            g => Some(KeyPair::generate(g, self.entropy.as_ref()).map_err(|_| entropy_err())?),
        };
        let shared = match &keys {
            None => None,
            Some(kp) => Some(kp.shared_secret(c.dh_value).map_err(|_| {
                (
                    FailureExplanation::DhGroupNotUsable,
                    HostAuthError::Protocol("controller DH value out of range"),
                )
            })?),
        };
        let cfg = Arc::clone(&self.config);
        let host_key = cfg.secret.transformed_key(&cfg.hostnqn);
        let r1 = Response {
            hash,
            key: &host_key,
            challenge: c.challenge,
            shared_secret: shared.as_deref().map(|v| &v[..]),
            seqnum: c.seqnum,
            t_id: self.t_id,
            label: HOST_LABEL,
            nqn1: &cfg.hostnqn,
            nqn2: &cfg.subnqn,
        }
        .compute();
        let mut c2 = Zeroizing::new(vec![0u8; hash.hash_len()]);
        let mut s2 = 0u32;
        if let Some(ctrl_secret) = &cfg.controller_secret {
            let mut seq = [0u8; 4];
            self.entropy.fill(&mut c2).map_err(|_| entropy_err())?;
            self.entropy.fill(&mut seq).map_err(|_| entropy_err())?;
            s2 = u32::from_le_bytes(seq).max(1);
            let ctrl_key = ctrl_secret.transformed_key(&cfg.subnqn);
            self.expected_r2 = Some(
                Response {
                    hash,
                    key: &ctrl_key,
                    challenge: &c2,
                    shared_secret: shared.as_deref().map(|v| &v[..]),
                    seqnum: s2,
                    t_id: self.t_id,
                    label: CONTROLLER_LABEL,
                    nqn1: &cfg.subnqn,
                    nqn2: &cfg.hostnqn,
                }
                .compute(),
            );
        }
        self.outcome =
            Some(AuthOutcome { hash, dh_group: group, bidirectional: cfg.controller_secret.is_some() });
        Ok(AuthMessage::Reply(Reply {
            t_id: self.t_id,
            cvalid: u8::from(cfg.controller_secret.is_some()),
            seqnum: s2,
            response: &r1,
            challenge: &c2,
            dh_value: keys.as_ref().map_or(&[][..], KeyPair::public_value),
        })
        .to_vec())
    }

    fn success1(&mut self, data: &[u8]) {
        let s = match AuthMessage::parse(data) {
            Ok((AuthMessage::Success1(s), _)) => s,
            Ok((AuthMessage::Failure1(f), _)) => return self.finish(Err(HostAuthError::Refused(f))),
            _ => {
                return self.refuse(
                    FailureExplanation::IncorrectProtocolMessage,
                    HostAuthError::Protocol("expected DH-HMAC-CHAP_Success1"),
                )
            }
        };
        let Some(outcome) = self.outcome else {
            return self.finish(Err(HostAuthError::Protocol("no outcome")));
        };
        if s.t_id != self.t_id || usize::from(s.hl) != outcome.hash.hash_len() {
            return self.refuse(
                FailureExplanation::IncorrectPayload,
                HostAuthError::Protocol("wrong transaction ID or HL in Success1"),
            );
        }
        match (&self.expected_r2, s.response) {
            (None, _) => self.finish(Ok(outcome)),
            (Some(expected), Some(r2)) if crate::auth::ct_eq(expected, r2) => {
                let msg = AuthMessage::Success2 { t_id: self.t_id }.to_vec();
                self.next = Some((Next::Send(msg), Expect::Success2Sent));
            }
            (Some(_), _) => {
                self.refuse(FailureExplanation::Failed, HostAuthError::ControllerNotAuthenticated)
            }
        }
    }
}
