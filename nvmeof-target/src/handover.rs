//! Handing live connections and their controllers to another process: the state a new version of a
//! target needs to go on serving a TCP connection it inherits, without the host noticing.
//!
//! ```text
//!  old process                                            new process
//!  Connection::begin_handover    new commands held, the rest runs to completion
//!  Connection::handover_ready    nothing in flight but AERs, nothing half-received, nothing to send
//!  Connection::export_handover ─┐
//!  Target::export_controller ───┴─▶ HandoverState::encode ─▶ bytes ─▶ HandoverState::decode
//!                                                          Target::import_controller (each)
//!                                                          Target::import_connection (each)
//!                                                          Connection::end_handover: held commands run
//! ```
//!
//! **Format.** [`HandoverState::encode`] writes a little-endian `u32` format version
//! ([`HANDOVER_FORMAT_VERSION`]), then the state in the `postcard` encoding of the serde data model
//! (the field order of the types below is the format). [`HandoverState::decode`] refuses any other
//! version with [`HandoverError::UnknownVersion`]: a new binary that cannot read the running one's
//! state says so before anything is handed over, and the running process keeps serving.
//!
//! **What is carried.** Per controller: its identity (subsystem NQN, CNTLID, host NQN and ID), the
//! keep-alive timeout and the time left of it, CC and CSTS, the enable generation, the granted I/O
//! queues, the asynchronous event configuration, the events not yet reported and the Changed
//! Namespace List, and whether its namespaces were taken away (prompt detach). Per connection: its
//! phase, digests and PDU alignment, MAXR2T, the PDU data limits the host was told (MAXH2CDATA,
//! in-capsule data), the queue (QID, size, SQ head, SQ flow control), the
//! Asynchronous Event Requests the host has outstanding, whether the queue authenticated, and the
//! commands that arrived while the handover was prepared (held, not started: they run in the new
//! process, once). Commands that were started run to completion in the old process first: their
//! responses are on the wire before the handover ([`Connection::handover_ready`]). Bytes of a
//! partial PDU are the driver's: it carries them in [`ConnectionState::unread_input`].
//!
//! What is not carried: statistics (per-namespace counters start again at zero), rate-limited log
//! state, and a queue in the middle of an authentication exchange (it is not ready until the
//! exchange is over).

use std::time::{Duration, Instant};

use bytes::Bytes;
use nvmeof_proto::nvme::discovery::DISCOVERY_NQN;
use nvmeof_proto::nvme::features::AsyncEvent;
use nvmeof_proto::nvme::Sqe;
use nvmeof_proto::{CapsuleCmd, Digests, EncodeOptions, Payload};
use serde::{Deserialize, Serialize};
use zerocopy::{FromBytes, IntoBytes};

use crate::auth::session::QueueAuth;
use crate::config::TransportParams;
use crate::connection::{Cmd, CmdState, Connection, Queue, State};
use crate::subsystem::OpClass;
use crate::target::Target;

/// The teardown reason of connections another process took over (not logged as a removal).
pub(crate) const HANDED_OVER: &str = "handed over to another process";

/// Largest PDU data size taken over from another process (16 MiB).
const MAX_CARRIED_PDU_DATA: u32 = 16 << 20;

/// The version of the handover format this build writes and reads.
pub const HANDOVER_FORMAT_VERSION: u32 = 1;

/// Why a handover state cannot be written or taken in.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum HandoverError {
    /// The state was written by a build with another format version.
    #[error("handover format version {found} is not supported by this build (it reads version {supported})")]
    UnknownVersion {
        /// The version found.
        found: u32,
        /// The version this build reads.
        supported: u32,
    },
    /// The bytes are not a handover state of this version.
    #[error("malformed handover state: {0}")]
    Malformed(String),
    /// The connection still has work in flight (see [`Connection::handover_ready`]).
    #[error("the connection is not ready for a handover")]
    NotReady,
    /// The connection is closed: there is nothing to hand over.
    #[error("the connection is closed")]
    Closed,
    /// The subsystem of a controller is not known here (not loaded and not in the source).
    #[error("subsystem {0} is not known to this target")]
    NoSuchSubsystem(String),
    /// The CNTLID of a controller is taken in its subsystem on this target.
    #[error("controller {cntlid} of {subnqn} already exists")]
    ControllerExists {
        /// Subsystem NQN.
        subnqn: String,
        /// Controller ID.
        cntlid: u16,
    },
    /// A connection names a controller that was not imported.
    #[error("controller {cntlid} of {subnqn} was not imported")]
    NoSuchController {
        /// Subsystem NQN.
        subnqn: String,
        /// Controller ID.
        cntlid: u16,
    },
    /// An I/O queue's QID cannot be claimed on its controller (taken, beyond the granted number, or
    /// the controller is not ready).
    #[error("queue {qid} of controller {cntlid} cannot be claimed")]
    QueueUnavailable {
        /// Controller ID.
        cntlid: u16,
        /// Queue ID.
        qid: u16,
    },
    /// A field is out of range (queue size, QID, CNTLID).
    #[error("invalid handover state: {0}")]
    Invalid(&'static str),
}

/// Everything a target hands over: the controllers, then the connections that serve them.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct HandoverState {
    /// The controllers the connections belong to.
    pub controllers: Vec<ControllerState>,
    /// The connections, in the order of the file descriptors that travel with them.
    pub connections: Vec<ConnectionState>,
}

impl HandoverState {
    /// The state as bytes: a little-endian `u32` format version, then the state.
    ///
    /// # Errors
    /// [`HandoverError::Malformed`] if the serializer fails (it does not for these types).
    pub fn encode(&self) -> Result<Vec<u8>, HandoverError> {
        let body = postcard::to_allocvec(self).map_err(|e| HandoverError::Malformed(e.to_string()))?;
        let mut out = Vec::with_capacity(4 + body.len());
        out.extend_from_slice(&HANDOVER_FORMAT_VERSION.to_le_bytes());
        out.extend_from_slice(&body);
        Ok(out)
    }

    /// Reads a state written by [`HandoverState::encode`] of the same format version.
    ///
    /// # Errors
    /// [`HandoverError::UnknownVersion`] for another version, [`HandoverError::Malformed`] for
    /// bytes that are not a state (truncated, trailing bytes, bad values).
    pub fn decode(bytes: &[u8]) -> Result<Self, HandoverError> {
        let (version, body) = bytes
            .split_first_chunk::<4>()
            .ok_or_else(|| HandoverError::Malformed("shorter than its version field".into()))?;
        let found = u32::from_le_bytes(*version);
        if found != HANDOVER_FORMAT_VERSION {
            return Err(HandoverError::UnknownVersion { found, supported: HANDOVER_FORMAT_VERSION });
        }
        let (state, rest) =
            postcard::take_from_bytes::<Self>(body).map_err(|e| HandoverError::Malformed(e.to_string()))?;
        if !rest.is_empty() {
            return Err(HandoverError::Malformed(format!("{} bytes after the state", rest.len())));
        }
        Ok(state)
    }
}

/// A controller, as [`Target::export_controller`] writes it down.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ControllerState {
    /// Subsystem NQN (the discovery NQN for a discovery controller).
    pub subnqn: String,
    /// Controller ID, unique within the subsystem.
    pub cntlid: u16,
    /// Host NQN.
    pub hostnqn: String,
    /// Host identifier.
    pub hostid: [u8; 16],
    /// Keep Alive Timeout in milliseconds (0: none).
    pub kato_ms: u32,
    /// Time left until the keep-alive timer expires, in milliseconds, when the state was written.
    pub keep_alive_left_ms: Option<u64>,
    /// Controller Configuration.
    pub cc: u32,
    /// Controller Status.
    pub csts: u32,
    /// How often the host disabled the controller (its I/O queues carry the generation they were
    /// created in).
    pub enable_generation: u32,
    /// I/O queues granted by Set Features (Number of Queues).
    pub io_queues_granted: u16,
    /// Asynchronous Event Configuration.
    pub async_event_config: u32,
    /// Events not yet reported to the host (completion dword 0 of each).
    pub pending_events: Vec<u32>,
    /// The Changed Namespace List.
    pub changed_namespaces: Vec<u32>,
    /// More namespaces changed than the list holds.
    pub changed_overflow: bool,
    /// The host may see no namespace any more (a prompt detach is in progress).
    pub namespaces_hidden: bool,
    /// The host read the active namespace list after they were hidden.
    pub detach_acknowledged: bool,
}

/// Where a connection is in its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ConnectionPhase {
    /// Waiting for the host's ICReq.
    AwaitIcReq,
    /// Initialized; waiting for the Fabrics Connect.
    AwaitConnect,
    /// Connected: an admin or I/O queue.
    Live,
}

/// A queue (a connected connection).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueueState {
    /// Subsystem NQN of its controller.
    pub subnqn: String,
    /// Controller ID.
    pub cntlid: u16,
    /// Queue ID (0: admin queue).
    pub qid: u16,
    /// Queue size (entries).
    pub entries: u32,
    /// Submission queue head pointer reported in completions.
    pub sqhd: u32,
    /// SQ flow control is on (the host did not disable it in its Connect).
    pub sq_flow_control: bool,
    /// The controller's enable generation the queue was created in.
    pub enable_generation: u32,
    /// Command IDs of the host's outstanding Asynchronous Event Requests.
    pub aer_cids: Vec<u16>,
    /// The queue may carry commands other than authentication.
    pub authenticated: bool,
    /// Time left to authenticate, in milliseconds, for a queue that must and has not yet.
    pub auth_left_ms: Option<u64>,
}

/// A command that arrived while the handover was prepared: it runs in the process that takes over.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HeldCommand {
    /// The 64-byte submission queue entry.
    pub sqe: Vec<u8>,
    /// In-capsule data.
    pub data: Vec<u8>,
}

/// A connection, as [`Connection::export_handover`] writes it down.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConnectionState {
    /// Where it is in its life.
    pub phase: ConnectionPhase,
    /// Time left to send the ICReq or the Connect, in milliseconds (before [`ConnectionPhase::Live`]).
    pub connect_left_ms: Option<u64>,
    /// Header digest negotiated.
    pub header_digest: bool,
    /// Data digest negotiated.
    pub data_digest: bool,
    /// The host's PDU data alignment (HPDA).
    pub hpda: u8,
    /// R2Ts outstanding per command at most (the host's MAXR2T + 1, capped).
    pub max_r2t: u32,
    /// Largest H2CData PDU data the host was told it may send (MAXH2CDATA in its ICResp).
    pub maxh2cdata: u32,
    /// Largest in-capsule data accepted (what the host learned from Identify: IOCCSZ).
    pub max_capsule_data: u32,
    /// The admin Connect already had its subsystem activated.
    pub activation_tried: bool,
    /// The queue, once connected.
    pub queue: Option<QueueState>,
    /// Commands received while the handover was prepared, in arrival order.
    pub held: Vec<HeldCommand>,
    /// Bytes the driver received from the socket and did not hand to the connection yet (a partial
    /// PDU): the new process decodes them before anything it reads from the socket. The engine
    /// leaves this empty; the driver fills it.
    pub unread_input: Vec<u8>,
}

fn millis_left(deadline: Option<Instant>, now: Instant) -> Option<u64> {
    deadline.map(|d| u64::try_from(d.saturating_duration_since(now).as_millis()).unwrap_or(u64::MAX))
}

fn deadline_in(ms: Option<u64>, now: Instant) -> Option<Instant> {
    ms.map(|ms| now.checked_add(Duration::from_millis(ms)).unwrap_or(now))
}

impl Connection {
    /// Starts preparing a handover: commands that arrive from now on are held (not started) until
    /// [`Connection::end_handover`] or [`Connection::export_handover`]; commands already started go
    /// on to completion, and so does the data they still need (H2CData), as well as
    /// authentication exchanges. Keep feeding input, completions and wake-ups as usual, and wait
    /// for [`Connection::handover_ready`].
    pub fn begin_handover(&mut self) {
        self.holding = true;
    }

    /// True if the connection can be written down now: no command started and unfinished (an
    /// Asynchronous Event Request waiting for an event is carried), no Connect waiting for its
    /// subsystem, no authentication exchange in progress, nothing left to send in
    /// [`Connection::poll_event`]. A closed connection is not ready: let it drain and drop it.
    #[must_use]
    pub fn handover_ready(&self) -> bool {
        if self.state == State::Closed || !self.events.is_empty() || self.parked_connect.is_some() {
            return false;
        }
        match &self.queue {
            None => true,
            Some(q) => {
                q.waiting.is_empty()
                    && q.shutdown.is_empty()
                    && q.auth.is_idle()
                    && q.inflight.values().all(|c| matches!(c.state, CmdState::Aer))
            }
        }
    }

    /// Commands held since [`Connection::begin_handover`].
    #[must_use]
    pub fn held_commands(&self) -> usize {
        self.held.len()
    }

    /// Writes the connection down for another process (it stays as it is here: if the handover
    /// fails, [`Connection::end_handover`] resumes it). [`ConnectionState::unread_input`] is left
    /// empty for the driver to fill.
    ///
    /// # Errors
    /// [`HandoverError::Closed`] for a closed connection, [`HandoverError::NotReady`] when
    /// [`Connection::handover_ready`] is false.
    pub fn export_handover(&self, now: Instant) -> Result<ConnectionState, HandoverError> {
        if self.state == State::Closed {
            return Err(HandoverError::Closed);
        }
        if !self.handover_ready() {
            return Err(HandoverError::NotReady);
        }
        let phase = match self.state {
            State::AwaitIcReq => ConnectionPhase::AwaitIcReq,
            State::AwaitConnect => ConnectionPhase::AwaitConnect,
            State::Live | State::Closed => ConnectionPhase::Live,
        };
        let queue = self.queue.as_ref().map(|q| {
            let mut aer_cids: Vec<u16> = q
                .inflight
                .iter()
                .filter(|(_, c)| matches!(c.state, CmdState::Aer))
                .map(|(cid, _)| *cid)
                .collect();
            aer_cids.sort_unstable();
            QueueState {
                subnqn: q.ctrl.subsystem.as_ref().map_or(DISCOVERY_NQN, |s| s.nqn()).to_owned(),
                cntlid: q.ctrl.cntlid,
                qid: q.qid,
                entries: q.entries,
                sqhd: q.sqhd,
                sq_flow_control: q.sq_flow_control,
                enable_generation: q.enable_generation,
                aer_cids,
                authenticated: q.auth.is_authenticated(),
                auth_left_ms: if q.auth.is_authenticated() {
                    None
                } else {
                    millis_left(q.auth.deadline(), now)
                },
            }
        });
        let held = self
            .held
            .iter()
            .map(|c| {
                let mut data = Vec::with_capacity(c.data.len());
                for seg in c.data.segments() {
                    data.extend_from_slice(seg);
                }
                HeldCommand { sqe: c.sqe.as_bytes().to_vec(), data }
            })
            .collect();
        Ok(ConnectionState {
            phase,
            connect_left_ms: if self.state == State::Live {
                None
            } else {
                millis_left(self.connect_deadline, now)
            },
            header_digest: self.encode.digests.header,
            data_digest: self.encode.digests.data,
            hpda: self.encode.pda,
            max_r2t: self.max_r2t,
            maxh2cdata: self.decoder.config().max_data_pdu,
            max_capsule_data: self.decoder.config().max_capsule_data,
            activation_tried: self.activation_tried,
            queue,
            held,
            unread_input: Vec::new(),
        })
    }

    /// Ends the hold of [`Connection::begin_handover`]: the held commands run now, in the order
    /// they arrived (after a handover that failed, or in the new process after an import). Drain
    /// [`Connection::poll_event`] afterwards.
    pub fn end_handover(&mut self, now: Instant) {
        self.holding = false;
        let held = std::mem::take(&mut self.held);
        let _enter = self.span.clone().entered();
        for cmd in held {
            if self.state == State::Closed {
                break;
            }
            self.handle_capsule(cmd, now);
        }
        // Events that came while the connection was written down (or before, in the process it
        // came from) go to the Asynchronous Event Requests it carries.
        if self.state == State::Live {
            self.deliver_async_events();
        }
    }

    /// The connection was taken over by another process: this side lets go of it quietly (its
    /// controller, if it is the admin queue, leaves this target without being logged as removed).
    /// Drop it afterwards; nothing is sent.
    pub fn hand_off(&mut self) {
        if self.state != State::Closed {
            self.teardown(HANDED_OVER);
        }
        self.events.clear();
    }

    /// Whether a command arriving while a handover is prepared waits (true) or runs now. A host
    /// that sends more commands than its queue has entries is stopped here as it would be without
    /// the hold.
    pub(crate) fn should_hold(&mut self, cmd: &CapsuleCmd) -> bool {
        if crate::auth::commands::is_auth_command(&cmd.sqe) {
            return false;
        }
        match (self.state, &self.queue) {
            (State::AwaitConnect, None) => {
                if self.parked_connect.is_some() || !self.held.is_empty() {
                    return false; // answered as a sequence error, as without the hold
                }
                true
            }
            (State::Live, Some(q)) => {
                let cid = cmd.sqe.cid.get();
                if q.inflight.contains_key(&cid) || self.held.iter().any(|h| h.sqe.cid.get() == cid) {
                    return false; // Command ID Conflict, answered now
                }
                if (q.inflight.len() + self.held.len()) as u32 >= q.entries {
                    return false; // more than the queue holds: the usual sequence error
                }
                true
            }
            _ => false,
        }
    }
}

impl Target {
    /// Writes down controller `cntlid` of subsystem `subnqn` for another process.
    #[must_use]
    pub fn export_controller(&self, subnqn: &str, cntlid: u16, now: Instant) -> Option<ControllerState> {
        let c = self.find_controller(subnqn, cntlid).filter(|c| !c.is_dead())?;
        let s = c.snapshot();
        Some(ControllerState {
            subnqn: subnqn.to_owned(),
            cntlid,
            hostnqn: c.hostnqn.clone(),
            hostid: c.hostid,
            kato_ms: c.kato_ms(),
            keep_alive_left_ms: millis_left(c.keep_alive_deadline(), now),
            cc: c.cc().0,
            csts: c.csts().0,
            enable_generation: c.enable_generation(),
            io_queues_granted: c.io_queues_granted(),
            async_event_config: c.async_event_config(),
            pending_events: s.events.iter().map(|e| e.to_dw0()).collect(),
            changed_namespaces: s.changed_namespaces,
            changed_overflow: s.changed_overflow,
            namespaces_hidden: c.namespaces_hidden(),
            detach_acknowledged: c.detach_acknowledged(),
        })
    }

    /// Recreates a controller written down by [`Target::export_controller`] in another process,
    /// with the same CNTLID. Its subsystem is loaded from the target's source if need be (this may
    /// block: call it off any I/O thread). The keep-alive timer goes on from the time it had left.
    ///
    /// # Errors
    /// The subsystem is unknown, or the CNTLID is taken or out of range.
    pub fn import_controller(&self, state: &ControllerState, now: Instant) -> Result<(), HandoverError> {
        use nvmeof_proto::nvme::fabrics::{CNTLID_MAX, CNTLID_MIN};
        if !(CNTLID_MIN..=CNTLID_MAX).contains(&state.cntlid) {
            return Err(HandoverError::Invalid("CNTLID out of range"));
        }
        let subsystem = if state.subnqn == DISCOVERY_NQN {
            None
        } else {
            Some(
                self.subsystem_or_activate(&state.subnqn)
                    .ok_or_else(|| HandoverError::NoSuchSubsystem(state.subnqn.clone()))?,
            )
        };
        let kato = Duration::from_millis(u64::from(state.kato_ms));
        // The controller's clock starts so that its keep-alive timer has the time it had left.
        let spent = state
            .keep_alive_left_ms
            .map_or(Duration::ZERO, |left| kato.saturating_sub(Duration::from_millis(left)));
        let created = now.checked_sub(spent).unwrap_or(now);
        let ctrl = self
            .insert_controller(
                subsystem,
                state.cntlid,
                state.hostnqn.clone(),
                state.hostid,
                state.kato_ms,
                created,
            )
            .ok_or_else(|| HandoverError::ControllerExists {
                subnqn: state.subnqn.clone(),
                cntlid: state.cntlid,
            })?;
        let events = state.pending_events.iter().map(|&dw0| AsyncEvent::from_dw0(dw0)).collect();
        ctrl.restore(crate::controller::Restore {
            cc: state.cc,
            csts: state.csts,
            enable_generation: state.enable_generation,
            io_queues_granted: state.io_queues_granted,
            async_event_config: state.async_event_config,
            events,
            changed_namespaces: state.changed_namespaces.iter().copied().collect(),
            changed_overflow: state.changed_overflow,
        });
        if state.namespaces_hidden {
            ctrl.restore_detach(state.detach_acknowledged);
        }
        Ok(())
    }

    /// Recreates a connection written down by [`Connection::export_handover`] in another process.
    /// Its controller must have been imported first ([`Target::import_controller`]). The connection
    /// comes back holding its held commands: set its notifier, then call
    /// [`Connection::end_handover`] to run them, and feed it `state.unread_input` before any new input.
    ///
    /// # Errors
    /// The controller is missing, the QID cannot be claimed, or a field is out of range.
    pub fn import_connection(
        &self,
        state: &ConnectionState,
        params: TransportParams,
        now: Instant,
    ) -> Result<Connection, HandoverError> {
        let mut conn = self.accept(params, now);
        let digests = Digests { header: state.header_digest, data: state.data_digest };
        let max_r2t = self.shared.config.max_r2t_per_command;
        if state.max_r2t == 0 || state.max_r2t > max_r2t.max(1) {
            return Err(HandoverError::Invalid("MAXR2T out of range"));
        }
        let mut held = Vec::with_capacity(state.held.len());
        for h in &state.held {
            let sqe = Sqe::read_from_bytes(&h.sqe)
                .map_err(|_| HandoverError::Invalid("a held command's SQE is not 64 bytes"))?;
            held.push(CapsuleCmd { sqe, data: Payload::from(Bytes::copy_from_slice(&h.data)) });
        }
        // What the host was told holds on: PDUs as large as the old process accepted are accepted
        // here too (this build's limits may be lower; they hold from the host's next connection).
        if state.maxh2cdata == 0
            || state.maxh2cdata > MAX_CARRIED_PDU_DATA
            || state.max_capsule_data > MAX_CARRIED_PDU_DATA
        {
            return Err(HandoverError::Invalid("PDU data limits out of range"));
        }
        let mut dc = *conn.decoder.config();
        dc.max_data_pdu = dc.max_data_pdu.max(state.maxh2cdata);
        dc.max_capsule_data = dc.max_capsule_data.max(state.max_capsule_data);
        if state.phase != ConnectionPhase::AwaitIcReq {
            conn.encode = EncodeOptions { digests, pda: state.hpda };
            dc.digests = digests;
            conn.max_r2t = state.max_r2t;
        }
        conn.decoder.set_config(dc);
        conn.activation_tried = state.activation_tried;
        conn.holding = true;
        conn.held = held;
        match state.phase {
            ConnectionPhase::AwaitIcReq | ConnectionPhase::AwaitConnect => {
                if state.queue.is_some() {
                    return Err(HandoverError::Invalid("a queue on a connection that is not connected"));
                }
                conn.state = if state.phase == ConnectionPhase::AwaitIcReq {
                    State::AwaitIcReq
                } else {
                    State::AwaitConnect
                };
                conn.connect_deadline = deadline_in(state.connect_left_ms, now).or(conn.connect_deadline);
            }
            ConnectionPhase::Live => {
                let q = state
                    .queue
                    .as_ref()
                    .ok_or(HandoverError::Invalid("a connected connection without its queue"))?;
                let max_entries = self.shared.config.max_queue_entries;
                if q.entries < 2 || q.entries > max_entries || q.sqhd >= q.entries {
                    return Err(HandoverError::Invalid("queue size or head out of range"));
                }
                if q.aer_cids.len() > usize::from(self.shared.config.max_async_events)
                    || q.aer_cids.len() + conn.held.len() > q.entries as usize
                {
                    return Err(HandoverError::Invalid("more commands than the queue holds"));
                }
                let ctrl =
                    self.find_controller(&q.subnqn, q.cntlid).filter(|c| !c.is_dead()).ok_or_else(|| {
                        HandoverError::NoSuchController { subnqn: q.subnqn.clone(), cntlid: q.cntlid }
                    })?;
                if q.qid != 0 && !ctrl.claim_io_queue(q.qid, conn.id, q.enable_generation) {
                    return Err(HandoverError::QueueUnavailable { cntlid: q.cntlid, qid: q.qid });
                }
                let auth = if q.authenticated {
                    QueueAuth::not_required()
                } else {
                    let timeout = self.shared.config.auth.timeout;
                    QueueAuth::required(
                        deadline_in(q.auth_left_ms, now)
                            .unwrap_or_else(|| now.checked_add(timeout).unwrap_or(now)),
                    )
                };
                let mut inflight = crate::hash::IntMap::default();
                if q.qid == 0 {
                    for &cid in &q.aer_cids {
                        inflight.insert(cid, Cmd::new(now, None, OpClass::Other, CmdState::Aer));
                    }
                }
                conn.set_live(Queue {
                    ctrl,
                    qid: q.qid,
                    entries: q.entries,
                    sqhd: q.sqhd,
                    sq_flow_control: q.sq_flow_control,
                    enable_generation: q.enable_generation,
                    inflight,
                    waiting: Default::default(),
                    data_in_flight: 0,
                    shutdown: Vec::new(),
                    auth,
                });
            }
        }
        Ok(conn)
    }
}
