//! Authentication Send and Authentication Receive on a queue: command checks, then the queue's
//! [`QueueAuth`](super::session::QueueAuth) state machine, then completions and teardown.

use std::sync::Arc;
use std::time::Instant;

use nvmeof_proto::nvme::discovery::DISCOVERY_NQN;
use nvmeof_proto::nvme::fabrics::{AuthReceiveCommand, AuthSendCommand};
use nvmeof_proto::nvme::opcode::{FabricsCommandType, FABRICS_OPCODE};
use nvmeof_proto::nvme::{DataLocation, Sqe, Status};
use nvmeof_proto::{CapsuleCmd, Payload};

use super::session::{AuthInfo, Ctx, ReceiveOutcome, SendOutcome};
use crate::connection::{AfterData, Connection, Queued};
use crate::controller::Controller;
use crate::subsystem::OpClass;
use crate::CloseReason;

/// Largest authentication message accepted (AUTH_Negotiate with a few descriptors, or a Reply with
/// an ffdhe8192 value and two SHA-512 values, are far below; the Linux host's buffer is 4 KiB).
pub(crate) const MAX_AUTH_MESSAGE: u32 = 8192;

fn fctype(sqe: &Sqe) -> Option<FabricsCommandType> {
    if sqe.opcode == FABRICS_OPCODE {
        FabricsCommandType::from_u8(sqe.fctype())
    } else {
        None
    }
}

/// True for Authentication Send and Authentication Receive.
pub(crate) fn is_auth_command(sqe: &Sqe) -> bool {
    matches!(
        fctype(sqe),
        Some(FabricsCommandType::AuthenticationSend | FabricsCommandType::AuthenticationReceive)
    )
}

/// True for Fabrics Disconnect (allowed before authentication).
pub(crate) fn is_disconnect(sqe: &Sqe) -> bool {
    fctype(sqe) == Some(FabricsCommandType::Disconnect)
}

impl Connection {
    /// Runs an Authentication Send or Receive (the caller checked [`is_auth_command`]).
    pub(crate) fn handle_auth_command(&mut self, cmd: &CapsuleCmd, now: Instant) {
        let cid = cmd.sqe.cid.get();
        if fctype(&cmd.sqe) == Some(FabricsCommandType::AuthenticationSend) {
            let c = AuthSendCommand::from_sqe(&cmd.sqe);
            let tl = c.tl.get();
            if !c.is_dhchap() || tl == 0 || tl > MAX_AUTH_MESSAGE {
                self.respond(cid, Status::INVALID_FIELD.with_dnr(), 0);
                return;
            }
            match self.data_location(cmd) {
                Ok(DataLocation::InCapsule { length, .. }) if length == tl => {
                    let msg = cmd.data.slice(..tl as usize).to_bytes();
                    let close = self.auth_send(&msg, now);
                    self.respond(cid, Status::SUCCESS, 0);
                    if let Some(reason) = close {
                        self.close(reason);
                    }
                }
                Ok(DataLocation::Transport { length }) if length == tl => {
                    let queued = Queued::Receive { total: tl, then: AfterData::AuthSend };
                    self.start_command(cid, None, OpClass::Other, queued, now);
                }
                Ok(_) => self.respond(cid, Status::DATA_SGL_LENGTH_INVALID.with_dnr(), 0),
                Err(status) => self.respond(cid, status, 0),
            }
            return;
        }
        let c = AuthReceiveCommand::from_sqe(&cmd.sqe);
        let al = c.al.get();
        if !c.is_dhchap() || al == 0 {
            self.respond(cid, Status::INVALID_FIELD.with_dnr(), 0);
            return;
        }
        match self.data_location(cmd) {
            Ok(DataLocation::Transport { length }) if length == al => self.auth_receive(cid, al, now),
            Ok(_) => self.respond(cid, Status::DATA_SGL_LENGTH_INVALID.with_dnr(), 0),
            Err(status) => self.respond(cid, status, 0),
        }
    }

    /// The message of an Authentication Send that came by R2T arrived.
    pub(crate) fn auth_send_data(&mut self, cid: u16, data: &Payload, now: Instant) {
        let msg = data.to_bytes();
        let close = self.auth_send(&msg, now);
        self.finish_registered(cid, Status::SUCCESS, now);
        if let Some(reason) = close {
            self.close(reason);
        }
    }

    /// Feeds an Authentication Send's message to the queue's state machine; `Some` if the queue must
    /// close once the command has completed.
    fn auth_send(&mut self, msg: &[u8], now: Instant) -> Option<CloseReason> {
        let ctrl = self.queue.as_ref()?.ctrl.clone();
        let target = self.target.clone();
        let keys = target.host_keys();
        let entropy = target.entropy();
        let ctx = Ctx {
            subnqn: subnqn(&ctrl),
            hostnqn: &ctrl.hostnqn,
            config: &target.shared.config.auth,
            entropy: entropy.as_ref(),
            seqnum: &target.shared.auth_seqnum,
            keys: keys.as_deref(),
            now,
        };
        let q = self.queue.as_mut()?;
        let qid = q.qid;
        match q.auth.handle_send(msg, &ctx) {
            SendOutcome::Continue => None,
            SendOutcome::Failed(explanation, detail) => {
                tracing::warn!(
                    parent: &self.span,
                    host = %ctrl.hostnqn,
                    subsystem = ctx.subnqn,
                    qid,
                    reason = detail,
                    %explanation,
                    "authentication failed"
                );
                None
            }
            SendOutcome::Authenticated(info) => {
                self.log_authenticated(&ctrl, qid, info);
                None
            }
            SendOutcome::HostAborted(failure) => {
                tracing::warn!(
                    parent: &self.span,
                    host = %ctrl.hostnqn,
                    subsystem = ctx.subnqn,
                    qid,
                    %failure,
                    "host ended authentication (AUTH_Failure2)"
                );
                Some(CloseReason::AuthenticationFailed)
            }
        }
    }

    /// Answers an Authentication Receive with the queue's next message.
    fn auth_receive(&mut self, cid: u16, al: u32, now: Instant) {
        let Some(ctrl) = self.queue.as_ref().map(|q| q.ctrl.clone()) else { return };
        let target = self.target.clone();
        let keys = target.host_keys();
        let entropy = target.entropy();
        let ctx = Ctx {
            subnqn: subnqn(&ctrl),
            hostnqn: &ctrl.hostnqn,
            config: &target.shared.config.auth,
            entropy: entropy.as_ref(),
            seqnum: &target.shared.auth_seqnum,
            keys: keys.as_deref(),
            now,
        };
        let Some(q) = self.queue.as_mut() else { return };
        let qid = q.qid;
        match q.auth.handle_receive(al, &ctx) {
            ReceiveOutcome::Message(msg) => self.send_data(cid, Payload::from(msg), Status::SUCCESS, 0),
            ReceiveOutcome::Authenticated(msg, info) => {
                self.log_authenticated(&ctrl, qid, info);
                self.send_data(cid, Payload::from(msg), Status::SUCCESS, 0);
            }
            ReceiveOutcome::Failure1(msg, unreported) => {
                if let Some((explanation, detail)) = unreported {
                    tracing::warn!(
                        parent: &self.span,
                        host = %ctrl.hostnqn,
                        subsystem = ctx.subnqn,
                        qid,
                        reason = detail,
                        %explanation,
                        "authentication failed"
                    );
                }
                self.send_data(cid, Payload::from(msg), Status::SUCCESS, 0);
                self.close(CloseReason::AuthenticationFailed);
            }
            ReceiveOutcome::BufferTooSmall => {
                tracing::warn!(
                    parent: &self.span,
                    host = %ctrl.hostnqn,
                    qid,
                    al,
                    "authentication failed: the host's buffer cannot hold AUTH_Failure1"
                );
                self.respond(cid, Status::INVALID_FIELD.with_dnr(), 0);
                self.close(CloseReason::AuthenticationFailed);
            }
        }
    }

    fn log_authenticated(&self, ctrl: &Arc<Controller>, qid: u16, info: AuthInfo) {
        // One line per controller at INFO; each I/O queue authenticates too (DEBUG).
        if qid == 0 {
            tracing::info!(
                parent: &self.span,
                host = %ctrl.hostnqn,
                subsystem = subnqn(ctrl),
                hash = %info.hash,
                dhgroup = %info.group,
                bidirectional = info.bidirectional,
                "host authenticated"
            );
        } else {
            tracing::debug!(
                parent: &self.span,
                qid,
                hash = %info.hash,
                dhgroup = %info.group,
                bidirectional = info.bidirectional,
                "queue authenticated"
            );
        }
    }

    /// The authentication deadline passed: tears the queue down if it never authenticated (true),
    /// or drops a re-authentication that did not finish.
    pub(crate) fn auth_timeout(&mut self, now: Instant) -> bool {
        let Some(q) = self.queue.as_mut() else { return false };
        if !q.auth.handle_timeout(now) {
            return false;
        }
        let (ctrl, qid) = (q.ctrl.clone(), q.qid);
        tracing::warn!(
            parent: &self.span,
            host = %ctrl.hostnqn,
            subsystem = subnqn(&ctrl),
            qid,
            "authentication timed out"
        );
        self.close(CloseReason::AuthenticationTimeout);
        true
    }
}

fn subnqn(ctrl: &Controller) -> &str {
    ctrl.subsystem.as_ref().map_or(DISCOVERY_NQN, |s| s.nqn())
}
