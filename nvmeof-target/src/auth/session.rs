//! The controller side of DH-HMAC-CHAP for one queue: a sans-I/O state machine fed with the
//! messages of Authentication Send and asked for the messages of Authentication Receive (see the
//! state diagram in the module above).

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Instant;

use nvmeof_proto::nvme::auth::{
    AuthDecodeError, AuthMessage, Challenge, DhGroup, DhchapHash, Failure, FailureExplanation, Negotiate,
    Reply, Success1, AUTH_ID_DHCHAP, SC_C_NONE,
};
use zeroize::Zeroizing;

use super::dh::{DhError, KeyPair};
use super::{AuthConfig, Entropy, HostKeys, HostSecrets, Response, CONTROLLER_LABEL, HOST_LABEL};

/// What a transaction runs with: the queue's identity and the target's facilities.
pub(crate) struct Ctx<'a> {
    pub(crate) subnqn: &'a str,
    pub(crate) hostnqn: &'a str,
    pub(crate) config: &'a AuthConfig,
    pub(crate) entropy: &'a dyn Entropy,
    /// The target's S1 counter (0: not seeded yet).
    pub(crate) seqnum: &'a AtomicU32,
    pub(crate) keys: Option<&'a dyn HostKeys>,
    pub(crate) now: Instant,
}

/// What was agreed in a successful transaction (for logs and tests).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct AuthInfo {
    pub(crate) hash: DhchapHash,
    pub(crate) group: DhGroup,
    pub(crate) bidirectional: bool,
}

/// The outcome of an Authentication Send (whose command itself completes successfully).
#[derive(Debug)]
pub(crate) enum SendOutcome {
    /// The message moved the transaction on.
    Continue,
    /// A check failed: the next Authentication Receive returns AUTH_Failure1. The text says why (for
    /// the log; it never contains a secret).
    Failed(FailureExplanation, &'static str),
    /// The queue is authenticated (DH-HMAC-CHAP_Success2 ended a bidirectional transaction).
    Authenticated(AuthInfo),
    /// The host gave up (AUTH_Failure2): tear the queue down.
    HostAborted(Failure),
}

/// The outcome of an Authentication Receive.
#[derive(Debug)]
pub(crate) enum ReceiveOutcome {
    /// Return this message.
    Message(Vec<u8>),
    /// Return this message (DH-HMAC-CHAP_Success1): the queue is authenticated.
    Authenticated(Vec<u8>, AuthInfo),
    /// Return this AUTH_Failure1, then tear the queue down. Carries the reason when it was not
    /// reported before (the failure was found by this Receive, not by an earlier Send).
    Failure1(Vec<u8>, Option<(FailureExplanation, &'static str)>),
    /// The host's buffer cannot hold even an AUTH_Failure1: fail the command, tear the queue down.
    BufferTooSmall,
}

enum State {
    /// No transaction runs.
    Idle,
    /// AUTH_Negotiate accepted; the Challenge is next.
    Negotiated { t_id: u16, hash: DhchapHash, group: DhGroup, secrets: Option<Arc<HostSecrets>> },
    /// The Challenge went out; the Reply is next.
    AwaitReply {
        t_id: u16,
        hash: DhchapHash,
        group: DhGroup,
        secrets: Option<Arc<HostSecrets>>,
        c1: Zeroizing<Vec<u8>>,
        s1: u32,
        keys: Option<KeyPair>,
    },
    /// The host's response was right; Success1 (with R2 if asked) is next.
    Success1 { t_id: u16, info: AuthInfo, r2: Option<Zeroizing<Vec<u8>>> },
    /// Success1 carried R2; the host's Success2 (or Failure2) is next.
    AwaitSuccess2 { t_id: u16, info: AuthInfo },
    /// A check failed; AUTH_Failure1 is next, then the end of the queue.
    Failed { t_id: u16, explanation: FailureExplanation },
}

/// Authentication state of one queue.
pub(crate) struct QueueAuth {
    state: State,
    /// The queue may carry commands other than authentication.
    authenticated: bool,
    deadline: Option<Instant>,
}

impl std::fmt::Debug for QueueAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let state = match &self.state {
            State::Idle => "idle",
            State::Negotiated { .. } => "negotiated",
            State::AwaitReply { .. } => "await-reply",
            State::Success1 { .. } => "success1",
            State::AwaitSuccess2 { .. } => "await-success2",
            State::Failed { .. } => "failed",
        };
        f.debug_struct("QueueAuth")
            .field("state", &state)
            .field("authenticated", &self.authenticated)
            .field("deadline", &self.deadline)
            .finish()
    }
}

fn failure_bytes(t_id: u16, explanation: FailureExplanation) -> Vec<u8> {
    AuthMessage::Failure1(Failure::new(t_id, explanation)).to_vec()
}

impl QueueAuth {
    /// A queue that needs no authentication.
    pub(crate) fn not_required() -> Self {
        Self { state: State::Idle, authenticated: true, deadline: None }
    }

    /// A queue that must authenticate before `deadline`.
    pub(crate) fn required(deadline: Instant) -> Self {
        Self { state: State::Idle, authenticated: false, deadline: Some(deadline) }
    }

    /// True once commands other than authentication may run.
    pub(crate) fn is_authenticated(&self) -> bool {
        self.authenticated
    }

    /// No authentication exchange is in progress.
    pub(crate) fn is_idle(&self) -> bool {
        matches!(self.state, State::Idle)
    }

    /// When the running authentication must be over.
    pub(crate) fn deadline(&self) -> Option<Instant> {
        self.deadline
    }

    /// The deadline passed. Returns true if the queue must be torn down (it never authenticated);
    /// otherwise the re-authentication in progress is dropped.
    pub(crate) fn handle_timeout(&mut self, now: Instant) -> bool {
        if self.deadline.is_none_or(|d| now < d) {
            return false;
        }
        self.deadline = None;
        self.state = State::Idle;
        !self.authenticated
    }

    fn fail(&mut self, t_id: u16, explanation: FailureExplanation, detail: &'static str) -> SendOutcome {
        self.state = State::Failed { t_id, explanation };
        self.authenticated = false;
        SendOutcome::Failed(explanation, detail)
    }

    fn current_t_id(&self) -> u16 {
        match &self.state {
            State::Idle => 0,
            State::Negotiated { t_id, .. }
            | State::AwaitReply { t_id, .. }
            | State::Success1 { t_id, .. }
            | State::AwaitSuccess2 { t_id, .. }
            | State::Failed { t_id, .. } => *t_id,
        }
    }

    /// An Authentication Send carried `msg` (its TL bytes).
    pub(crate) fn handle_send(&mut self, msg: &[u8], ctx: &Ctx<'_>) -> SendOutcome {
        if let State::Failed { .. } = self.state {
            // Already failed (and reported): nothing the host says changes that; Failure1 is next.
            return SendOutcome::Continue;
        }
        let t_id = self.current_t_id();
        let parsed = match AuthMessage::parse(msg) {
            Ok((m, len)) if len == msg.len() => m,
            Ok(_) => {
                return self.fail(
                    t_id,
                    FailureExplanation::IncorrectPayload,
                    "message longer than its fields say",
                )
            }
            Err(AuthDecodeError::UnknownMessage { .. }) => {
                return self.fail(t_id, FailureExplanation::IncorrectProtocolMessage, "unknown message")
            }
            Err(_) => return self.fail(t_id, FailureExplanation::IncorrectPayload, "truncated message"),
        };
        let awaiting_reply = matches!(self.state, State::AwaitReply { .. });
        let awaiting_success2 = match &self.state {
            State::AwaitSuccess2 { t_id, info } => Some((*t_id, *info)),
            _ => None,
        };
        match parsed {
            AuthMessage::Negotiate(n) => self.negotiate(&n, ctx),
            AuthMessage::Failure2(f) => {
                self.state = State::Idle;
                self.authenticated = false;
                SendOutcome::HostAborted(f)
            }
            AuthMessage::Reply(r) if awaiting_reply => self.reply(&r, ctx),
            AuthMessage::Success2 { t_id: got } => match awaiting_success2 {
                Some((expected, info)) if got == expected => {
                    self.finish();
                    SendOutcome::Authenticated(info)
                }
                Some((expected, _)) => {
                    self.fail(expected, FailureExplanation::IncorrectPayload, "wrong transaction ID")
                }
                None => self.fail(t_id, FailureExplanation::IncorrectProtocolMessage, "message out of order"),
            },
            _ => self.fail(t_id, FailureExplanation::IncorrectProtocolMessage, "message out of order"),
        }
    }

    fn finish(&mut self) {
        self.state = State::Idle;
        self.authenticated = true;
        self.deadline = None;
    }

    fn negotiate(&mut self, n: &Negotiate<'_>, ctx: &Ctx<'_>) -> SendOutcome {
        // A new transaction, with its own time limit (a first authentication keeps the Connect's).
        if self.authenticated {
            self.deadline = ctx.now.checked_add(ctx.config.timeout);
        }
        let t_id = n.t_id;
        if n.sc_c != SC_C_NONE {
            return self.fail(
                t_id,
                FailureExplanation::ConcatenationMismatch,
                "secure channel concatenation asked for",
            );
        }
        let Some(d) = n.protocols.iter().find(|d| d.authid == AUTH_ID_DHCHAP) else {
            return self.fail(
                t_id,
                FailureExplanation::ProtocolNotUsable,
                "no DH-HMAC-CHAP protocol descriptor",
            );
        };
        let (Some(hashes), Some(groups)) = (d.hashes(), d.dh_groups()) else {
            return self.fail(t_id, FailureExplanation::IncorrectPayload, "HALEN or DHLEN beyond 30");
        };
        let Some(hash) = ctx.config.hashes.iter().copied().find(|h| hashes.contains(&h.code())) else {
            return self.fail(t_id, FailureExplanation::HashNotUsable, "no hash function in common");
        };
        let Some(group) = ctx.config.dh_groups.iter().copied().find(|g| groups.contains(&g.code())) else {
            return self.fail(t_id, FailureExplanation::DhGroupNotUsable, "no DH group in common");
        };
        let secrets = ctx.keys.and_then(|k| k.host_secrets(ctx.subnqn, ctx.hostnqn));
        self.state = State::Negotiated { t_id, hash, group, secrets };
        SendOutcome::Continue
    }

    fn reply(&mut self, r: &Reply<'_>, ctx: &Ctx<'_>) -> SendOutcome {
        let State::AwaitReply { t_id, hash, group, secrets, c1, s1, keys } =
            std::mem::replace(&mut self.state, State::Idle)
        else {
            return SendOutcome::Continue;
        };
        let payload = |this: &mut Self, detail| this.fail(t_id, FailureExplanation::IncorrectPayload, detail);
        if r.t_id != t_id {
            return payload(self, "wrong transaction ID");
        }
        if r.response.len() != hash.hash_len() {
            return payload(self, "HL is not the hash length");
        }
        if r.cvalid > 1 || (r.cvalid == 1 && r.seqnum == 0) {
            return payload(self, "CVALID or S2 invalid");
        }
        if r.dh_value.len() != group.value_len() {
            return payload(self, "DH value of the wrong length");
        }
        let shared = match &keys {
            None => None,
            Some(kp) => match kp.shared_secret(r.dh_value) {
                Ok(s) => Some(s),
                Err(DhError::InvalidPeerValue) => {
                    return self.fail(t_id, FailureExplanation::DhGroupNotUsable, "DH value out of range")
                }
                Err(_) => return self.fail(t_id, FailureExplanation::Failed, "DH computation failed"),
            },
        };
        let Some(secrets) = secrets else {
            return self.fail(t_id, FailureExplanation::Failed, "no DH-HMAC-CHAP secret for this host");
        };
        let host_key = secrets.host.transformed_key(ctx.hostnqn);
        let expected = Response {
            hash,
            key: &host_key,
            challenge: &c1,
            shared_secret: shared.as_deref().map(|v| &v[..]),
            seqnum: s1,
            t_id,
            label: HOST_LABEL,
            nqn1: ctx.hostnqn,
            nqn2: ctx.subnqn,
        };
        if !expected.verify(r.response) {
            return self.fail(t_id, FailureExplanation::Failed, "wrong response (wrong secret)");
        }
        let bidirectional = r.cvalid == 1;
        let r2 = if bidirectional {
            let Some(ctrl_secret) = &secrets.controller else {
                return self.fail(
                    t_id,
                    FailureExplanation::Failed,
                    "host asked the controller to authenticate and no controller secret is set",
                );
            };
            let ctrl_key = ctrl_secret.transformed_key(ctx.subnqn);
            Some(
                Response {
                    hash,
                    key: &ctrl_key,
                    challenge: r.challenge,
                    shared_secret: shared.as_deref().map(|v| &v[..]),
                    seqnum: r.seqnum,
                    t_id,
                    label: CONTROLLER_LABEL,
                    nqn1: ctx.subnqn,
                    nqn2: ctx.hostnqn,
                }
                .compute(),
            )
        } else {
            None
        };
        self.state = State::Success1 { t_id, info: AuthInfo { hash, group, bidirectional }, r2 };
        SendOutcome::Continue
    }

    /// An Authentication Receive with a host buffer of `al` bytes.
    pub(crate) fn handle_receive(&mut self, al: u32, ctx: &Ctx<'_>) -> ReceiveOutcome {
        let al = al as usize;
        let state = std::mem::replace(&mut self.state, State::Idle);
        let (t_id, explanation, detail): (u16, FailureExplanation, Option<&'static str>) = match state {
            State::Negotiated { t_id, hash, group, secrets } => match challenge(t_id, hash, group, ctx) {
                Ok((msg, c1, s1, keys)) if msg.len() <= al => {
                    self.state = State::AwaitReply { t_id, hash, group, secrets, c1, s1, keys };
                    return ReceiveOutcome::Message(msg);
                }
                Ok(_) => (
                    t_id,
                    FailureExplanation::IncorrectPayload,
                    Some("host buffer too small for the challenge"),
                ),
                Err(_) => (t_id, FailureExplanation::Failed, Some("no random bytes for the challenge")),
            },
            State::Success1 { t_id, info, r2 } => {
                let msg = AuthMessage::Success1(Success1 {
                    t_id,
                    hl: info.hash.hash_len() as u8,
                    response: r2.as_deref().map(|v| &v[..]),
                })
                .to_vec();
                if msg.len() > al {
                    (t_id, FailureExplanation::IncorrectPayload, Some("host buffer too small for Success1"))
                } else if r2.is_some() {
                    self.state = State::AwaitSuccess2 { t_id, info };
                    return ReceiveOutcome::Message(msg);
                } else {
                    self.finish();
                    return ReceiveOutcome::Authenticated(msg, info);
                }
            }
            State::Failed { t_id, explanation } => (t_id, explanation, None),
            other => {
                let t_id = {
                    self.state = other;
                    self.current_t_id()
                };
                (
                    t_id,
                    FailureExplanation::IncorrectProtocolMessage,
                    Some("Authentication Receive out of order"),
                )
            }
        };
        self.state = State::Failed { t_id, explanation };
        self.authenticated = false;
        self.deadline = None;
        let msg = failure_bytes(t_id, explanation);
        if msg.len() > al {
            return ReceiveOutcome::BufferTooSmall;
        }
        ReceiveOutcome::Failure1(msg, detail.map(|d| (explanation, d)))
    }
}

type ChallengeParts = (Vec<u8>, Zeroizing<Vec<u8>>, u32, Option<KeyPair>);

/// Builds the Challenge: a fresh C1, the next S1 and, for an FFDHE group, a fresh key pair.
fn challenge(t_id: u16, hash: DhchapHash, group: DhGroup, ctx: &Ctx<'_>) -> Result<ChallengeParts, DhError> {
    let mut c1 = Zeroizing::new(vec![0u8; hash.hash_len()]);
    ctx.entropy.fill(&mut c1)?;
    let s1 = next_seqnum(ctx.seqnum, ctx.entropy);
    let keys = match group {
        DhGroup::Null => None,
        g => Some(KeyPair::generate(g, ctx.entropy)?),
    };
    let msg = AuthMessage::Challenge(Challenge {
        t_id,
        hash_id: hash.code(),
        dh_group_id: group.code(),
        seqnum: s1,
        challenge: &c1,
        dh_value: keys.as_ref().map_or(&[][..], KeyPair::public_value),
    })
    .to_vec();
    Ok((msg, c1, s1, keys))
}

/// The next nonzero sequence number of a counter that starts at a random value.
pub(crate) fn next_seqnum(counter: &AtomicU32, entropy: &dyn Entropy) -> u32 {
    let mut seed = [0u8; 4];
    let fresh = if entropy.fill(&mut seed).is_ok() { u32::from_le_bytes(seed) } else { 1 };
    let prev = counter
        .fetch_update(Ordering::AcqRel, Ordering::Acquire, |v| {
            Some(match v {
                0 => fresh.max(1),
                v => v.wrapping_add(1).max(1),
            })
        })
        .unwrap_or(0);
    match prev {
        0 => fresh.max(1),
        v => v.wrapping_add(1).max(1),
    }
}
