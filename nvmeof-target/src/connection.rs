//! One TCP connection: the NVMe/TCP queue state machine.

use std::collections::VecDeque;
use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use bytes::{BufMut, Bytes, BytesMut};
use nvmeof_proto::nvme::opcode::{FabricsCommandType, FABRICS_OPCODE};
use nvmeof_proto::nvme::{Cqe, DataLocation, Status};
use nvmeof_proto::{
    C2hData, CapsuleCmd, CapsuleResp, DecodeError, DecoderConfig, EncodeOptions, EncodedPdu,
    FatalErrorStatus, IcReq, IcResp, Payload, Pdu, PduDecoder, PduInput, PduType, R2t, TermReq,
};
use smallvec::SmallVec;

use crate::auth::session::QueueAuth;
use crate::backend::{IoOp, IoOutput, IoResult, IoToken};
use crate::config::TransportParams;
use crate::controller::{Controller, Notifier};
use crate::hash::{IntMap, IntSet};
use crate::ratelimit::LogLimiter;
use crate::subsystem::{Namespace, OpClass};
use crate::target::Target;

/// What a connection asks its driver to do. See [`Connection`] for the order in which to poll.
#[derive(Debug)]
#[must_use]
#[non_exhaustive]
pub enum Event {
    /// Write these bytes to the socket, after everything transmitted before (vectored: header, then
    /// the payload segments, then the data digest).
    Transmit(EncodedPdu),
    /// Carry out a backend operation, then hand the result to [`Connection::complete_io`]. Requests
    /// may be executed concurrently and completed in any order.
    Io(IoRequest),
    /// Close the socket once every earlier [`Event::Transmit`] has been written. Backend requests
    /// already handed out must still be completed (their results are counted, so that the host's
    /// controller is not recreated while its old writes are still landing); keep the connection until
    /// [`Connection::is_drained`], then drop it.
    Close(CloseReason),
}

/// A backend operation the engine needs done.
#[must_use]
pub struct IoRequest {
    /// Identifies the request in [`Connection::complete_io`]. Unique among the requests of its
    /// connection that are in flight (not across connections: a driver that routes completions
    /// from several connections keys them by connection and token).
    pub token: IoToken,
    /// The namespace (and through it the backend) to operate on.
    pub namespace: Arc<Namespace>,
    /// The operation, in bytes.
    pub op: IoOp,
}

impl fmt::Debug for IoRequest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IoRequest")
            .field("token", &self.token)
            .field("nsid", &self.namespace.nsid())
            .field("op", &self.op)
            .finish()
    }
}

/// Why a connection ends.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum CloseReason {
    /// The host sent an H2CTermReq.
    HostTerminated {
        /// Its Fatal Error Status.
        fes: FatalErrorStatus,
    },
    /// The host broke the transport protocol; a C2HTermReq was sent (unless the offending PDU was
    /// itself a termination request).
    ProtocolError(DecodeError),
    /// The host violated the PDU sequence rules (FES as sent in the C2HTermReq).
    SequenceError {
        /// Fatal Error Status sent.
        fes: FatalErrorStatus,
        /// What went wrong.
        detail: &'static str,
    },
    /// No ICReq or Fabrics Connect within the connect timeout.
    ConnectTimeout,
    /// The controller's keep-alive timer expired; the controller was torn down.
    KeepAliveExpired,
    /// The host sent a Fabrics Disconnect.
    Disconnected,
    /// The controller this queue belongs to is gone (its admin queue closed, keep-alive expired on
    /// another connection, the controller was reset or removed by management).
    ControllerGone,
    /// The driver reported that the peer closed the socket (or dropped the connection).
    PeerClosed,
    /// In-band authentication failed: AUTH_Failure1 was sent, or the host sent AUTH_Failure2.
    AuthenticationFailed,
    /// The queue did not authenticate within [`crate::auth::AuthConfig::timeout`].
    AuthenticationTimeout,
}

impl CloseReason {
    /// A short description for logs.
    #[must_use]
    pub fn describe(&self) -> &'static str {
        match self {
            Self::HostTerminated { .. } => "host terminated the connection",
            Self::ProtocolError(_) => "transport protocol error",
            Self::SequenceError { .. } => "PDU sequence error",
            Self::ConnectTimeout => "no Connect in time",
            Self::KeepAliveExpired => "keep-alive timeout",
            Self::Disconnected => "host disconnected",
            Self::ControllerGone => "controller gone",
            Self::PeerClosed => "connection closed",
            Self::AuthenticationFailed => "authentication failed",
            Self::AuthenticationTimeout => "authentication timed out",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum State {
    AwaitIcReq,
    AwaitConnect,
    Live,
    Closed,
}

/// Data of an H2CData smaller than this is copied into one buffer instead of pinning a receive buffer
/// per PDU (a host sending tiny PDUs must not multiply the memory a command holds).
const COALESCE_BELOW: usize = 4096;

/// An R2T of a command and the data received for it.
#[derive(Debug)]
pub(crate) struct R2tSlot {
    offset: u32,
    len: u32,
    received: u32,
    data: Payload,
    small: BytesMut,
}

impl R2tSlot {
    fn append(&mut self, data: &Payload) {
        if data.len() < COALESCE_BELOW {
            for seg in data.segments() {
                self.small.put_slice(seg);
            }
        } else {
            self.flush_small();
            for seg in data.segments() {
                self.data.push(seg.clone());
            }
        }
    }

    fn flush_small(&mut self) {
        if !self.small.is_empty() {
            self.data.push(self.small.split().freeze());
        }
    }
}

#[derive(Debug)]
pub(crate) enum AfterData {
    Write { offset: u64, fua: bool },
    Dsm { ranges: usize, deallocate: bool },
    AuthSend,
}

#[derive(Debug)]
pub(crate) enum CmdState {
    /// Waiting for data budget before its first R2T (a write) or its read.
    Queued(Queued),
    /// Receiving host data through R2Ts.
    Receiving {
        total: u32,
        next_offset: u32,
        received: u32,
        slots: Vec<R2tSlot>,
        then: AfterData,
        /// Set when some of the data was corrupt: the rest of what was asked for is drained and the
        /// command then fails with this status.
        failed: Option<Status>,
    },
    /// The backend works on it.
    Io { read_len: Option<u32> },
    /// An Asynchronous Event Request waiting for an event.
    Aer,
}

#[derive(Debug)]
pub(crate) enum Queued {
    Read { offset: u64, len: u32 },
    Receive { total: u32, then: AfterData },
}

#[derive(Debug)]
pub(crate) struct Cmd {
    pub(crate) started: Instant,
    pub(crate) ns: Option<Arc<Namespace>>,
    pub(crate) class: OpClass,
    pub(crate) token: u64,
    /// Bytes charged to the connection's data budget.
    pub(crate) budget: usize,
    /// Bytes the command reads or writes (for statistics).
    pub(crate) bytes: u64,
    pub(crate) state: CmdState,
}

impl Cmd {
    pub(crate) fn new(now: Instant, ns: Option<Arc<Namespace>>, class: OpClass, state: CmdState) -> Self {
        Self { started: now, ns, class, token: 0, budget: 0, bytes: 0, state }
    }
}

/// The queue a connection became with its Fabrics Connect.
pub(crate) struct Queue {
    pub(crate) ctrl: Arc<Controller>,
    pub(crate) qid: u16,
    pub(crate) entries: u32,
    pub(crate) sqhd: u32,
    pub(crate) sq_flow_control: bool,
    pub(crate) enable_generation: u32,
    pub(crate) inflight: IntMap<u16, Cmd>,
    /// Commands waiting for data budget, oldest first.
    pub(crate) waiting: VecDeque<u16>,
    pub(crate) data_in_flight: usize,
    /// Tokens of a shutdown's flushes still outstanding.
    pub(crate) shutdown: Vec<u64>,
    /// In-band authentication of this queue.
    pub(crate) auth: QueueAuth,
}

/// Tokens with this bit belong to the engine's own requests (shutdown flushes), not to a command.
pub(crate) const INTERNAL_TOKEN: u64 = 1 << 63;

/// One NVMe/TCP connection (one queue: the admin queue or an I/O queue) as a sans-I/O state machine.
///
/// ```text
///  accept ──▶ AwaitIcReq ──ICReq/ICResp──▶ AwaitConnect ──Fabrics Connect──▶ Live ──▶ Closed
///               │ timeout                     │ timeout / wrong command        │ Disconnect, TermReq,
///               └──────────────────────────────┴────────────────────────────────┴ keep-alive, errors
/// ```
///
/// The driver owns the socket and the clock. Its loop, for each connection:
///
/// 1. bytes arrived: append them to a `BytesMut` and call [`Connection::handle_input`];
/// 2. a backend request finished: [`Connection::complete_io`];
/// 3. the deadline from [`Connection::poll_timeout`] passed: [`Connection::handle_timeout`] (re-read
///    `poll_timeout` after every call: it moves with keep-alive traffic and Set Features);
/// 4. the connection's notifier fired (see [`Connection::set_notifier`]): [`Connection::handle_wakeup`];
/// 5. after any of these, drain [`Connection::poll_event`] until `None`: write `Transmit`s in order,
///    start `Io`s, and on `Close` close the socket after the earlier transmits.
///
/// Backpressure is the driver's: stop calling `handle_input` while the bytes of earlier `Transmit`s
/// not yet written exceed what you are prepared to buffer (a host that sends reads but does not read
/// the data must not make the server buffer without limit). The engine bounds the data held for
/// commands it is still working on ([`crate::TargetConfig::max_data_in_flight_per_connection`]).
///
/// Methods come in four kinds, as in quinn-proto: getters, `handle_*` (input, each taking `now`),
/// commands, and `poll_*` (output). Nothing here blocks, reads a clock or spawns a thread. Dropping a
/// connection releases its queue (and, for an admin queue, its controller) as if the peer had closed.
pub struct Connection {
    pub(crate) target: Target,
    pub(crate) id: u64,
    pub(crate) params: TransportParams,
    pub(crate) span: tracing::Span,
    pub(crate) state: State,
    pub(crate) decoder: PduDecoder,
    pub(crate) encode: EncodeOptions,
    pub(crate) events: VecDeque<Event>,
    pub(crate) notifier: Option<Notifier>,
    pub(crate) connect_deadline: Option<Instant>,
    /// Most R2Ts outstanding per command: the host's MAXR2T + 1, capped by the configuration.
    pub(crate) max_r2t: u32,
    pub(crate) queue: Option<Queue>,
    next_token: u64,
    /// After close: backend requests still running, and the controller whose count they hold.
    draining: IntSet<u64>,
    drain_ctrl: Option<Arc<Controller>>,
    /// An admin Connect waiting for its subsystem to be activated on the target's activation runner,
    /// and the flag the runner sets when it is done.
    pub(crate) parked_connect: Option<Box<(CapsuleCmd, Arc<AtomicBool>)>>,
    /// The parked Connect's activation ran: the Connect does not activate again.
    pub(crate) activation_tried: bool,
    /// Rate limits of per-command warnings.
    io_error_log: LogLimiter,
    digest_log: LogLimiter,
    /// A handover to another process is being prepared: new commands are held here, in arrival
    /// order, instead of being started (see `handover.rs`).
    pub(crate) holding: bool,
    pub(crate) held: Vec<CapsuleCmd>,
}

impl fmt::Debug for Connection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Connection")
            .field("id", &self.id)
            .field("state", &self.state)
            .field("qid", &self.queue.as_ref().map(|q| q.qid))
            .field("cntlid", &self.queue.as_ref().map(|q| q.ctrl.cntlid))
            .finish_non_exhaustive()
    }
}

impl Drop for Connection {
    fn drop(&mut self) {
        self.teardown("connection dropped");
        // Requests the driver never completed: give up on them (the driver dropped the connection).
        if let Some(ctrl) = self.drain_ctrl.take() {
            for _ in self.draining.drain() {
                ctrl.io_finished();
            }
        }
    }
}

impl Connection {
    pub(crate) fn new(target: Target, id: u64, params: TransportParams, now: Instant) -> Self {
        let cfg = &target.shared.config;
        let decoder = PduDecoder::new(DecoderConfig {
            max_capsule_data: cfg.inline_data_size,
            max_data_pdu: cfg.maxh2cdata,
            ..DecoderConfig::controller()
        });
        let span = tracing::debug_span!(
            "nvmet_conn",
            id,
            peer = %params.peer_addr,
            cntlid = tracing::field::Empty,
            qid = tracing::field::Empty
        );
        let deadline = now.checked_add(cfg.connect_timeout).unwrap_or(now);
        Self {
            target,
            id,
            params,
            span,
            state: State::AwaitIcReq,
            decoder,
            encode: EncodeOptions::default(),
            events: VecDeque::new(),
            notifier: None,
            connect_deadline: Some(deadline),
            max_r2t: 1,
            queue: None,
            next_token: 0,
            draining: IntSet::default(),
            drain_ctrl: None,
            parked_connect: None,
            activation_tried: false,
            io_error_log: LogLimiter::default(),
            digest_log: LogLimiter::default(),
            holding: false,
            held: Vec::new(),
        }
    }

    // ---- getters ----

    /// The connection's ID, unique within its target.
    #[must_use]
    pub fn id(&self) -> u64 {
        self.id
    }

    /// True once the connection has ended ([`Event::Close`] was emitted or is queued).
    #[must_use]
    pub fn is_closed(&self) -> bool {
        self.state == State::Closed
    }

    /// True once the connection is closed and every backend request it handed out was completed: the
    /// driver may drop it.
    #[must_use]
    pub fn is_drained(&self) -> bool {
        self.state == State::Closed && self.draining.is_empty()
    }

    /// The queue ID, once connected (0: admin queue).
    #[must_use]
    pub fn qid(&self) -> Option<u16> {
        self.queue.as_ref().map(|q| q.qid)
    }

    /// The controller ID, once connected.
    #[must_use]
    pub fn cntlid(&self) -> Option<u16> {
        self.queue.as_ref().map(|q| q.ctrl.cntlid)
    }

    /// Bytes the decoder needs before it can make progress: a hint for sizing the next read.
    #[must_use]
    pub fn read_hint(&self) -> usize {
        self.decoder.needed()
    }

    /// Largest PDU the connection accepts: a receive buffer must be able to hold this much.
    #[must_use]
    pub fn max_pdu_len(&self) -> usize {
        self.decoder.config().max_pdu_len()
    }

    /// Commands received and not yet completed.
    #[must_use]
    pub fn commands_in_flight(&self) -> usize {
        self.queue.as_ref().map_or(0, |q| q.inflight.len())
    }

    /// Gives back the memory a burst left in the connection's tables (commands in flight, events,
    /// waiting lists) if it is idle now: no command in flight and no event waiting. A driver calls
    /// this when the connection has gone quiet, so that an idle queue holds only its fixed state.
    /// Returns whether the connection was idle.
    pub fn release_idle_memory(&mut self) -> bool {
        if !self.events.is_empty() || !self.draining.is_empty() {
            return false;
        }
        if let Some(q) = self.queue.as_mut() {
            if !q.inflight.is_empty() || !q.waiting.is_empty() || !q.shutdown.is_empty() {
                return false;
            }
            q.inflight = IntMap::default();
            q.waiting = VecDeque::new();
            q.shutdown = Vec::new();
        }
        self.events = VecDeque::new();
        self.draining = IntSet::default();
        true
    }

    /// The memory alignment the data of this queue's commands should have so that a driver can hand
    /// it to the backend without a copy: for a live I/O queue, the largest alignment any namespace of
    /// its subsystem needs for direct I/O ([`crate::RawDevice::direct`]); 1 otherwise (admin and
    /// discovery queues, buffered devices, backends that do their own I/O).
    ///
    /// A driver may place received PDUs in memory so that their data starts at such an address
    /// (the data offset of a PDU is in its common header), instead of copying the data later.
    #[must_use]
    pub fn data_alignment(&self) -> usize {
        let Some(q) = self.queue.as_ref().filter(|q| q.qid != 0 && self.state == State::Live) else {
            return 1;
        };
        let Some(subsystem) = q.ctrl.subsystem.as_ref() else { return 1 };
        subsystem
            .namespaces()
            .values()
            .filter_map(|ns| ns.backend().raw_device())
            .filter(|d| d.direct)
            .map(|d| (d.alignment.max(1) as usize).next_power_of_two())
            .max()
            .unwrap_or(1)
    }

    // ---- commands ----

    /// Sets the callback the engine invokes when this connection must be woken to act on something
    /// that happened elsewhere (see [`Connection::handle_wakeup`]); replaces an earlier one.
    ///
    /// The callback may run on any thread, synchronously from inside any engine or [`Target`] call
    /// (including this connection's own `handle_*` calls). It must be quick, must not block, must not
    /// call back into the engine and must not take a lock the driver holds around engine calls:
    /// setting a flag and waking an event loop is what it is for. Without one, the driver must call
    /// `handle_wakeup` periodically to deliver asynchronous events.
    pub fn set_notifier(&mut self, notifier: Notifier) {
        if let Some(q) = &self.queue {
            q.ctrl.attach_connection(self.id, q.qid == 0, Some(notifier.clone()));
        }
        self.notifier = Some(notifier);
    }

    // ---- output ----

    /// The next thing the driver must do, in order.
    pub fn poll_event(&mut self) -> Option<Event> {
        self.events.pop_front()
    }

    /// The earliest time [`Connection::handle_timeout`] must be called.
    #[must_use]
    pub fn poll_timeout(&self) -> Option<Instant> {
        match self.state {
            State::AwaitIcReq | State::AwaitConnect => self.connect_deadline,
            State::Live => {
                let q = self.queue.as_ref()?;
                let keep_alive = if q.qid == 0 { q.ctrl.keep_alive_deadline() } else { None };
                match (keep_alive, q.auth.deadline()) {
                    (Some(a), Some(b)) => Some(a.min(b)),
                    (a, b) => a.or(b),
                }
            }
            State::Closed => None,
        }
    }

    // ---- input ----

    /// Consumes every complete PDU at the front of `buf`.
    pub fn handle_input(&mut self, buf: &mut BytesMut, now: Instant) {
        self.handle_input_pdus(buf, now, usize::MAX);
    }

    /// Consumes at most `max_pdus` complete PDUs at the front of `buf` and returns how many it took
    /// (a fatal decode error counts as one). A driver that applies backpressure between PDUs (see the
    /// type's documentation) calls this with 1 and drains [`Connection::poll_event`] after each.
    ///
    /// `buf` is a reassembly buffer ([`BytesMut`]) or a [`bytes::Bytes`] decoded in place (see
    /// [`PduInput`]): PDU data are slices of its memory either way. Bytes left over (a partial PDU)
    /// are the driver's to keep and hand in again, in front of what arrives next.
    pub fn handle_input_pdus<B: PduInput>(&mut self, buf: &mut B, now: Instant, max_pdus: usize) -> usize {
        let span = self.span.clone();
        let _enter = span.enter();
        let mut taken = 0;
        while self.state != State::Closed && taken < max_pdus {
            if self.check_controller() {
                break;
            }
            match self.decoder.decode(buf) {
                Ok(Some(pdu)) => self.handle_pdu(pdu, now),
                Ok(None) => break,
                Err(err) => self.handle_decode_error(err, buf, now),
            }
            taken += 1;
        }
        taken
    }

    /// The driver saw the peer close the socket (or it failed).
    pub fn handle_peer_closed(&mut self) {
        self.close(CloseReason::PeerClosed);
    }

    /// Timers: the connect timeout and, on an admin queue, the controller's keep-alive timer.
    pub fn handle_timeout(&mut self, now: Instant) {
        match self.state {
            State::AwaitIcReq | State::AwaitConnect => {
                if self.connect_deadline.is_some_and(|d| now >= d) {
                    tracing::debug!(parent: &self.span, "no ICReq/Connect in time");
                    self.close(CloseReason::ConnectTimeout);
                }
            }
            State::Live => {
                if self.auth_timeout(now) {
                    return;
                }
                let expired = self
                    .queue
                    .as_ref()
                    .filter(|q| q.qid == 0)
                    .and_then(|q| q.ctrl.keep_alive_deadline())
                    .is_some_and(|d| now >= d);
                if expired {
                    tracing::info!(parent: &self.span, cntlid = self.cntlid(), "keep-alive timeout: controller torn down");
                    // Closing the admin queue tears the controller down (after detaching this
                    // connection, so its own notifier is not called from here).
                    self.close(CloseReason::KeepAliveExpired);
                }
            }
            State::Closed => {}
        }
    }

    /// Something happened outside this connection (see [`Connection::set_notifier`]): delivers
    /// pending asynchronous events, or closes the connection if its controller is gone.
    pub fn handle_wakeup(&mut self, now: Instant) {
        if self.parked_connect.as_ref().is_some_and(|p| p.1.load(Ordering::Acquire)) {
            if let Some(parked) = self.parked_connect.take() {
                let (cmd, _) = *parked;
                if self.state == State::AwaitConnect {
                    self.activation_tried = true;
                    self.handle_connect(&cmd, now);
                }
            }
            return;
        }
        if self.state != State::Live || self.check_controller() {
            return;
        }
        self.deliver_async_events();
    }

    /// Hands in the result of an [`Event::Io`] request. Results for requests of a closed connection
    /// are accepted (and only counted).
    pub fn complete_io(&mut self, token: IoToken, result: IoResult, now: Instant) {
        if self.state == State::Closed {
            if self.draining.remove(&token.0) {
                if let Some(c) = &self.drain_ctrl {
                    c.io_finished();
                }
            }
            return;
        }
        let Some(q) = self.queue.as_mut() else { return };
        if token.0 & INTERNAL_TOKEN != 0 {
            if let Some(pos) = q.shutdown.iter().position(|t| *t == token.0) {
                q.shutdown.swap_remove(pos);
                q.ctrl.io_finished();
                if let Err(e) = &result {
                    if let Some(suppressed) = self.target.shared.warnings.shutdown_flush.hit(now) {
                        tracing::warn!(error = %e, suppressed, "flush during shutdown failed");
                    }
                }
                if q.shutdown.is_empty() {
                    self.finish_shutdown();
                }
            }
            return;
        }
        let cid = (token.0 & 0xffff) as u16;
        let read_len = match q.inflight.get(&cid).filter(|c| c.token == token.0).map(|c| &c.state) {
            Some(CmdState::Io { read_len }) => *read_len,
            _ => {
                if let Some(suppressed) = self.target.shared.warnings.unknown_completion.hit(now) {
                    tracing::warn!(parent: &self.span, ?token, suppressed, "completion for an unknown request");
                }
                return;
            }
        };
        q.ctrl.io_finished();
        // Traffic-based keep alive: completions count as activity too.
        q.ctrl.touch(now);
        if self.check_controller() {
            return;
        }
        self.finish_io(cid, read_len, result, now);
    }

    // ---- internals ----

    /// Closes the connection if its controller was torn down elsewhere; true if closed.
    fn check_controller(&mut self) -> bool {
        let gone = self.queue.as_ref().is_some_and(|q| {
            q.ctrl.is_dead() || (q.qid != 0 && q.ctrl.enable_generation() != q.enable_generation)
        });
        if gone {
            self.close(CloseReason::ControllerGone);
        }
        gone
    }

    fn handle_decode_error<B: PduInput>(&mut self, err: DecodeError, buf: &mut B, now: Instant) {
        if let DecodeError::DataDigest { pdu_type, cccid, ttag, datao, datal, last, .. } = err {
            if let Some(suppressed) =
                self.digest_log.hit_shared(&self.target.shared.warnings.data_digest, now)
            {
                tracing::warn!(parent: &self.span, ?pdu_type, cccid, suppressed, "data digest error");
            }
            match pdu_type {
                PduType::CapsuleCmd => self.capsule_digest_error(cccid),
                PduType::H2cData => {
                    self.h2c_arrived(H2cArrival { cccid, ttag, datao, len: datal, last, data: None }, now)
                }
                _ => self.fatal(FatalErrorStatus::PDU_SEQUENCE_ERROR, "unexpected PDU"),
            }
            return;
        }
        tracing::warn!(parent: &self.span, %err, "fatal transport error");
        if let Some(term) = TermReq::for_error(&err, buf) {
            self.transmit(Pdu::C2hTermReq(term));
        }
        buf.clear_input();
        self.close(CloseReason::ProtocolError(err));
    }

    /// A command capsule whose in-capsule data was corrupt: it takes its SQ entry and fails with
    /// Transient Transport Error (the host may retry), without touching any command in flight.
    fn capsule_digest_error(&mut self, cid: u16) {
        let Some(q) = self.queue.as_mut().filter(|_| self.state == State::Live) else {
            self.fatal(FatalErrorStatus::PDU_SEQUENCE_ERROR, "corrupt capsule before Connect");
            return;
        };
        if q.inflight.contains_key(&cid) || q.inflight.len() as u32 >= q.entries {
            self.fatal(FatalErrorStatus::PDU_SEQUENCE_ERROR, "corrupt capsule reusing a command ID");
            return;
        }
        q.sqhd = (q.sqhd + 1) % q.entries;
        self.respond(cid, Status::TRANSIENT_TRANSPORT_ERROR, 0);
    }

    /// Sends a C2HTermReq for a PDU sequence error and closes.
    pub(crate) fn fatal(&mut self, fes: FatalErrorStatus, detail: &'static str) {
        tracing::warn!(parent: &self.span, ?fes, detail, "fatal protocol error");
        self.transmit(Pdu::C2hTermReq(TermReq { fes, fei: 0, data: Bytes::new() }));
        self.close(CloseReason::SequenceError { fes, detail });
    }

    pub(crate) fn close(&mut self, reason: CloseReason) {
        if self.state == State::Closed {
            return;
        }
        tracing::debug!(parent: &self.span, ?reason, "closing");
        self.teardown(reason.describe());
        self.events.push_back(Event::Close(reason));
    }

    /// Leaves the queue: detaches from the controller (tearing it down for an admin queue) and keeps
    /// count of backend requests still running.
    pub(crate) fn teardown(&mut self, why: &'static str) {
        self.state = State::Closed;
        self.io_error_log.flush(&self.span, "backend I/O failed");
        self.digest_log.flush(&self.span, "data digest error");
        let Some(q) = self.queue.take() else { return };
        for cmd in q.inflight.values() {
            if matches!(cmd.state, CmdState::Io { .. }) && cmd.token != 0 {
                self.draining.insert(cmd.token);
            }
        }
        self.draining.extend(q.shutdown.iter().copied());
        q.ctrl.detach_connection(self.id, q.qid);
        if q.qid == 0 {
            // The admin queue is gone: so is the controller, and with it its I/O queues.
            self.target.remove_controller(&q.ctrl, why);
        }
        self.drain_ctrl = Some(q.ctrl);
    }

    pub(crate) fn transmit(&mut self, pdu: Pdu) {
        match pdu.encode(&self.encode) {
            Ok(enc) => self.events.push_back(Event::Transmit(enc)),
            Err(e) => tracing::error!(parent: &self.span, %e, "cannot encode a PDU"),
        }
    }

    fn handle_pdu(&mut self, pdu: Pdu, now: Instant) {
        match (self.state, pdu) {
            (State::AwaitIcReq, Pdu::IcReq(req)) => self.handle_icreq(req),
            (_, Pdu::H2cTermReq(t)) => {
                tracing::info!(parent: &self.span, fes = ?t.fes, fei = t.fei, "host terminated the connection");
                self.close(CloseReason::HostTerminated { fes: t.fes });
            }
            (State::AwaitConnect | State::Live, Pdu::CapsuleCmd(cmd)) => self.handle_capsule(cmd, now),
            (State::Live, Pdu::H2cData(d)) => {
                let arrival = H2cArrival {
                    cccid: d.cccid,
                    ttag: d.ttag,
                    datao: d.datao,
                    len: d.data.len() as u32,
                    last: d.last,
                    data: Some(d.data),
                };
                self.h2c_arrived(arrival, now);
            }
            _ => self.fatal(FatalErrorStatus::PDU_SEQUENCE_ERROR, "PDU not allowed in this state"),
        }
    }

    fn handle_icreq(&mut self, req: IcReq) {
        if let Err(err) = req.validate() {
            let fes = err.fatal_status().unwrap_or(FatalErrorStatus::UNSUPPORTED_PARAMETER);
            self.transmit(Pdu::C2hTermReq(TermReq { fes, fei: err.fei(), data: Bytes::new() }));
            self.close(CloseReason::ProtocolError(err));
            return;
        }
        let cfg = &self.target.shared.config;
        let digests = req.digests.intersect(cfg.digests);
        let resp = IcResp { pfv: 0, cpda: 0, digests, maxh2cdata: cfg.maxh2cdata };
        self.max_r2t = req.maxr2t.saturating_add(1).min(cfg.max_r2t_per_command);
        // ICResp goes out without digests; everything after uses the negotiated ones.
        self.transmit(Pdu::IcResp(resp));
        self.encode = EncodeOptions { digests, pda: req.hpda };
        let mut dc = *self.decoder.config();
        dc.digests = digests;
        self.decoder.set_config(dc);
        self.state = State::AwaitConnect;
        tracing::debug!(parent: &self.span, ?digests, hpda = req.hpda, maxr2t = req.maxr2t, "ICReq accepted");
    }

    pub(crate) fn handle_capsule(&mut self, cmd: CapsuleCmd, now: Instant) {
        if self.holding && self.should_hold(&cmd) {
            self.held.push(cmd);
            return;
        }
        let cid = cmd.sqe.cid.get();
        if self.state == State::AwaitConnect {
            let is_connect = cmd.sqe.opcode == FABRICS_OPCODE
                && FabricsCommandType::from_u8(cmd.sqe.fctype()) == Some(FabricsCommandType::Connect);
            if self.parked_connect.is_some() {
                self.fatal(FatalErrorStatus::PDU_SEQUENCE_ERROR, "a command while Connect is pending");
            } else if is_connect {
                if !self.park_connect_for_activation(&cmd) {
                    self.handle_connect(&cmd, now);
                }
            } else {
                self.respond(cid, Status::INVALID_OPCODE.with_dnr(), 0);
            }
            return;
        }
        let Some(q) = self.queue.as_mut() else { return };
        if q.inflight.contains_key(&cid) {
            self.respond(cid, Status::COMMAND_ID_CONFLICT.with_dnr(), 0);
            return;
        }
        if q.inflight.len() as u32 >= q.entries {
            self.fatal(FatalErrorStatus::PDU_SEQUENCE_ERROR, "more commands than the queue has entries");
            return;
        }
        q.sqhd = (q.sqhd + 1) % q.entries;
        q.ctrl.touch(now);
        // Authentication commands run on any queue; until the queue has authenticated, they (and
        // Disconnect) are all it may carry.
        if crate::auth::commands::is_auth_command(&cmd.sqe) {
            self.handle_auth_command(&cmd, now);
            return;
        }
        if !q.auth.is_authenticated() && !crate::auth::commands::is_disconnect(&cmd.sqe) {
            self.respond(cid, Status::AUTHENTICATION_REQUIRED.with_dnr(), 0);
            return;
        }
        if q.qid == 0 {
            self.handle_admin(cmd, now);
        } else {
            self.handle_io(cmd, now);
        }
    }

    /// An admin Connect to a subsystem that must be activated first, on a target with an activation
    /// runner: hands the activation to the runner and keeps the command until it is done (see
    /// [`Target::set_activation_runner`]). Returns false if the Connect should be handled now (no
    /// runner or notifier, the subsystem is loaded, or the command is malformed: `handle_connect`
    /// answers that).
    fn park_connect_for_activation(&mut self, cmd: &CapsuleCmd) -> bool {
        use nvmeof_proto::nvme::discovery::DISCOVERY_NQN;
        use nvmeof_proto::nvme::fabrics::{ConnectCommand, ConnectData};
        if ConnectCommand::from_sqe(&cmd.sqe).qid.get() != 0 {
            return false;
        }
        let Some(notifier) = self.notifier.clone() else { return false };
        let Some(runner) = self.target.activation_runner() else { return false };
        let Ok(data) = self.connect_data(cmd) else { return false };
        let Some(subnqn) = ConnectData::ref_from_data(&data).and_then(|cd| cd.subnqn().ok()) else {
            return false;
        };
        if subnqn == DISCOVERY_NQN || !self.target.needs_activation(subnqn) {
            return false;
        }
        let done = Arc::new(AtomicBool::new(false));
        let (target, nqn, flag) = (self.target.clone(), subnqn.to_owned(), done.clone());
        tracing::debug!(parent: &self.span, subsystem = %nqn, "Connect waits for the subsystem's activation");
        self.parked_connect = Some(Box::new((cmd.clone(), done)));
        runner(Box::new(move || {
            let _ = target.subsystem_or_activate(&nqn);
            flag.store(true, Ordering::Release);
            notifier();
        }));
        true
    }

    /// Where a command's data is, checked against what the capsule carried.
    pub(crate) fn data_location(&self, cmd: &CapsuleCmd) -> Result<DataLocation, Status> {
        use nvmeof_proto::nvme::sqe::SQE_FLAGS_PSDT_SGL;
        if cmd.sqe.psdt() != SQE_FLAGS_PSDT_SGL >> 6 {
            return Err(Status::INVALID_FIELD.with_dnr());
        }
        match cmd.sqe.dptr.data_location() {
            None => Err(Status::SGL_DESCRIPTOR_TYPE_INVALID.with_dnr()),
            Some(DataLocation::InCapsule { offset, length }) => {
                if offset != 0 {
                    return Err(Status::SGL_OFFSET_INVALID.with_dnr());
                }
                if length as usize > cmd.data.len() {
                    return Err(Status::DATA_SGL_LENGTH_INVALID.with_dnr());
                }
                Ok(DataLocation::InCapsule { offset, length })
            }
            Some(loc) => Ok(loc),
        }
    }

    /// Completes a command that has no data to send.
    pub(crate) fn respond(&mut self, cid: u16, status: Status, result: u64) {
        let (sqid, sqhd) = self.queue.as_ref().map_or((0, 0), |q| (q.qid, q.sqhd as u16));
        let mut cqe = Cqe::new(cid, sqid, sqhd, status);
        cqe.set_result_u64(result);
        self.transmit(Pdu::CapsuleResp(CapsuleResp { cqe }));
    }

    /// Sends `data` to the host in C2HData PDUs, then the completion (folded into the last data PDU
    /// with SUCCESS when the host disabled SQ flow control).
    pub(crate) fn send_data(&mut self, cid: u16, data: Payload, status: Status, result: u64) {
        let chunk = self.target.shared.config.maxh2cdata as usize;
        let fold =
            status.is_success() && result == 0 && self.queue.as_ref().is_some_and(|q| !q.sq_flow_control);
        let total = data.len();
        if total > 0 && total <= chunk {
            // One PDU: the payload moves into it (no reference count to take).
            self.transmit(Pdu::C2hData(C2hData { cccid: cid, datao: 0, last: true, success: fold, data }));
            if !fold {
                self.respond(cid, status, result);
            }
            return;
        }
        let mut off = 0usize;
        while off < total {
            let n = chunk.min(total - off);
            let last = off + n == total;
            self.transmit(Pdu::C2hData(C2hData {
                cccid: cid,
                datao: off as u32,
                last,
                success: last && fold,
                data: data.slice(off..off + n),
            }));
            off += n;
        }
        if !fold || total == 0 {
            self.respond(cid, status, result);
        }
    }

    // ---- commands with data and backend I/O ----

    /// A token unique among this connection's requests in flight: the CID (a command's CID is not
    /// reused while the command is in flight), a per-connection sequence number (tells a stale
    /// completion from the current command's) and the low bits of the connection ID (for logs).
    pub(crate) fn new_token(&mut self, cid: u16) -> u64 {
        self.next_token = self.next_token.wrapping_add(1) & 0xff_ffff;
        ((self.id & 0x7f_ffff) << 40) | (self.next_token << 16) | u64::from(cid)
    }

    /// Registers a command that goes straight to the backend (no data budget needed).
    pub(crate) fn register(&mut self, cid: u16, ns: Option<Arc<Namespace>>, class: OpClass, now: Instant) {
        if let Some(q) = self.queue.as_mut() {
            q.inflight.insert(cid, Cmd::new(now, ns, class, CmdState::Io { read_len: None }));
        }
    }

    /// Registers a command and starts it, or queues it until the connection's data budget allows.
    pub(crate) fn start_command(
        &mut self,
        cid: u16,
        ns: Option<Arc<Namespace>>,
        class: OpClass,
        queued: Queued,
        now: Instant,
    ) {
        let Some(q) = self.queue.as_mut() else { return };
        q.inflight.insert(cid, Cmd::new(now, ns, class, CmdState::Queued(queued)));
        q.waiting.push_back(cid);
        self.run_waiting();
    }

    /// Starts queued commands, oldest first, while the data budget allows.
    fn run_waiting(&mut self) {
        let max = self.target.shared.config.max_data_in_flight_per_connection;
        loop {
            let Some(q) = self.queue.as_mut() else { return };
            let Some(&cid) = q.waiting.front() else { return };
            let need = match q.inflight.get(&cid).map(|c| &c.state) {
                Some(CmdState::Queued(Queued::Read { len, .. })) => *len as usize,
                Some(CmdState::Queued(Queued::Receive { total, .. })) => *total as usize,
                _ => {
                    q.waiting.pop_front();
                    continue;
                }
            };
            if q.data_in_flight + need > max && q.data_in_flight > 0 {
                return;
            }
            q.waiting.pop_front();
            q.data_in_flight += need;
            let Some(cmd) = q.inflight.get_mut(&cid) else { continue };
            cmd.budget = need;
            let queued = std::mem::replace(&mut cmd.state, CmdState::Io { read_len: None });
            match queued {
                CmdState::Queued(Queued::Read { offset, len }) => {
                    self.submit_io(cid, IoOp::Read { offset, len }, Some(len));
                }
                CmdState::Queued(Queued::Receive { total, then }) => {
                    cmd.state = CmdState::Receiving {
                        total,
                        next_offset: 0,
                        received: 0,
                        slots: Vec::new(),
                        then,
                        failed: None,
                    };
                    self.issue_r2ts(cid);
                }
                other => cmd.state = other,
            }
        }
    }

    /// Emits an I/O request for a registered command.
    pub(crate) fn submit_io(&mut self, cid: u16, op: IoOp, read_len: Option<u32>) {
        let token = self.new_token(cid);
        let Some(q) = self.queue.as_mut() else { return };
        let Some(cmd) = q.inflight.get_mut(&cid) else { return };
        let Some(ns) = cmd.ns.clone() else { return };
        cmd.token = token;
        cmd.bytes = op.data_len();
        cmd.state = CmdState::Io { read_len };
        q.ctrl.io_started();
        self.events.push_back(Event::Io(IoRequest { token: IoToken(token), namespace: ns, op }));
    }

    /// Emits an engine-internal I/O request (shutdown flush) counted against the controller.
    pub(crate) fn submit_internal(&mut self, namespace: Arc<Namespace>, op: IoOp) {
        let token = self.new_token(0) | INTERNAL_TOKEN;
        let Some(q) = self.queue.as_mut() else { return };
        q.shutdown.push(token);
        q.ctrl.io_started();
        self.events.push_back(Event::Io(IoRequest { token: IoToken(token), namespace, op }));
    }

    /// Issues R2Ts up to the per-command limit. A host that takes one R2T at a time (Linux: MAXR2T 0)
    /// gets one R2T for the whole transfer (it sends the data in H2CData PDUs of at most MAXH2CDATA);
    /// a host that takes several gets R2Ts of MAXH2CDATA each, several outstanding.
    fn issue_r2ts(&mut self, cid: u16) {
        let chunk = if self.max_r2t <= 1 { u32::MAX } else { self.target.shared.config.maxh2cdata };
        let max_r2t = self.max_r2t as usize;
        let mut r2ts = SmallVec::<[R2t; 4]>::new();
        if let Some(Cmd {
            state: CmdState::Receiving { total, next_offset, slots, failed: None, .. }, ..
        }) = self.queue.as_mut().and_then(|q| q.inflight.get_mut(&cid))
        {
            let outstanding = slots.iter().filter(|s| s.received < s.len).count();
            for _ in outstanding..max_r2t {
                if *next_offset >= *total {
                    break;
                }
                let len = chunk.min(*total - *next_offset);
                slots.push(R2tSlot {
                    offset: *next_offset,
                    len,
                    received: 0,
                    data: Payload::new(),
                    small: BytesMut::new(),
                });
                r2ts.push(R2t { cccid: cid, ttag: cid, r2to: *next_offset, r2tl: len });
                *next_offset += len;
            }
        }
        for r in r2ts {
            self.transmit(Pdu::R2t(r));
        }
    }

    /// An H2CData PDU arrived (`data` is `None` if its data digest was wrong).
    fn h2c_arrived(&mut self, a: H2cArrival, now: Instant) {
        enum Outcome {
            More,
            AllIn,
            Drained(Status),
            Error(FatalErrorStatus, &'static str),
        }
        let outcome = match self.queue.as_mut().and_then(|q| q.inflight.get_mut(&a.ttag)) {
            Some(Cmd {
                state: CmdState::Receiving { total, next_offset, received, slots, failed, .. },
                ..
            }) if a.cccid == a.ttag => {
                match slots.iter_mut().find(|s| s.offset + s.received == a.datao && s.received < s.len) {
                    Some(slot) if a.len <= slot.len - slot.received => {
                        slot.received += a.len;
                        *received += a.len;
                        if a.last != (slot.received == slot.len) {
                            Outcome::Error(
                                FatalErrorStatus::PDU_SEQUENCE_ERROR,
                                "LAST_PDU does not end the R2T",
                            )
                        } else {
                            match &a.data {
                                Some(data) if failed.is_none() => slot.append(data),
                                Some(_) => {}
                                None => *failed = Some(Status::TRANSIENT_TRANSPORT_ERROR),
                            }
                            let issued_done = slots.iter().all(|s| s.received == s.len);
                            match *failed {
                                Some(status) if issued_done => Outcome::Drained(status),
                                Some(_) => Outcome::More,
                                None if *received == *total && *next_offset >= *total => Outcome::AllIn,
                                None => Outcome::More,
                            }
                        }
                    }
                    _ => Outcome::Error(
                        FatalErrorStatus::DATA_TRANSFER_OUT_OF_RANGE,
                        "H2CData outside its R2T",
                    ),
                }
            }
            _ => Outcome::Error(FatalErrorStatus::PDU_SEQUENCE_ERROR, "H2CData without a matching R2T"),
        };
        match outcome {
            Outcome::Error(fes, detail) => self.fatal(fes, detail),
            // A slot may have completed: keep the R2T window full.
            Outcome::More => self.issue_r2ts(a.ttag),
            Outcome::Drained(status) => self.finish_registered(a.ttag, status, now),
            Outcome::AllIn => {
                let Some(cmd) = self.queue.as_mut().and_then(|q| q.inflight.get_mut(&a.ttag)) else { return };
                let state = std::mem::replace(&mut cmd.state, CmdState::Io { read_len: None });
                if let CmdState::Receiving { slots, then, .. } = state {
                    let mut data = Payload::new();
                    for mut s in slots {
                        s.flush_small();
                        for seg in s.data.segments() {
                            data.push(seg.clone());
                        }
                    }
                    self.data_received(a.ttag, data, then, now);
                }
            }
        }
    }

    /// A command's data arrived (in the capsule or through R2Ts): act on it.
    pub(crate) fn data_received(&mut self, cid: u16, data: Payload, then: AfterData, now: Instant) {
        match then {
            AfterData::Write { offset, fua } => self.submit_io(cid, IoOp::Write { offset, data, fua }, None),
            AfterData::Dsm { ranges, deallocate } => self.dsm_data(cid, &data, ranges, deallocate, now),
            AfterData::AuthSend => self.auth_send_data(cid, &data, now),
        }
    }

    fn finish_io(&mut self, cid: u16, read_len: Option<u32>, result: IoResult, now: Instant) {
        let Some(cmd) = self.take_command(cid) else { return };
        let (status, data) = match (result, read_len) {
            (Ok(IoOutput::Data(data)), Some(len)) if data.len() == len as usize => {
                (Status::SUCCESS, Some(data))
            }
            (Ok(_), Some(_)) => {
                if let Some(suppressed) = self.target.shared.warnings.read_length.hit(now) {
                    tracing::error!(parent: &self.span, cid, suppressed, "backend returned the wrong read length");
                }
                (Status::INTERNAL_ERROR, None)
            }
            (Ok(_), None) => (Status::SUCCESS, None),
            (Err(e), read) => {
                // A full or failing disk fails every command: one line, then a count per second, on
                // this connection and on the whole target.
                let limit = &self.target.shared.warnings.backend_failed;
                if let Some(suppressed) = self.io_error_log.hit_shared(limit, now) {
                    tracing::warn!(parent: &self.span, cid, error = %e, suppressed, "backend I/O failed");
                }
                (e.status(read.is_some()), None)
            }
        };
        if let Some(ns) = &cmd.ns {
            let bytes = if status.is_success() { cmd.bytes } else { 0 };
            ns.stats().record(
                cmd.class,
                bytes,
                status.is_success(),
                now.saturating_duration_since(cmd.started),
            );
        }
        match data {
            Some(d) => self.send_data(cid, d, status, 0),
            None => self.respond(cid, status, 0),
        }
        self.release_budget(cmd.budget);
    }

    /// Removes a command from the queue's books (in flight and waiting).
    fn take_command(&mut self, cid: u16) -> Option<Cmd> {
        let q = self.queue.as_mut()?;
        let cmd = q.inflight.remove(&cid)?;
        if matches!(cmd.state, CmdState::Queued(_)) {
            q.waiting.retain(|c| *c != cid);
        }
        Some(cmd)
    }

    /// Completes a registered command without (further) backend I/O, and records it.
    pub(crate) fn finish_registered(&mut self, cid: u16, status: Status, now: Instant) {
        if let Some(cmd) = self.take_command(cid) {
            if let Some(ns) = &cmd.ns {
                ns.stats().record(
                    cmd.class,
                    0,
                    status.is_success(),
                    now.saturating_duration_since(cmd.started),
                );
            }
            self.release_budget(cmd.budget);
        }
        self.respond(cid, status, 0);
    }

    fn release_budget(&mut self, bytes: usize) {
        if bytes == 0 {
            return;
        }
        if let Some(q) = self.queue.as_mut() {
            q.data_in_flight = q.data_in_flight.saturating_sub(bytes);
        }
        self.run_waiting();
    }

    /// Makes the connection a live queue of `queue.ctrl`; closes it at once if the controller was torn
    /// down or reset while the Connect was being answered.
    pub(crate) fn set_live(&mut self, queue: Queue) {
        self.span.record("cntlid", queue.ctrl.cntlid);
        self.span.record("qid", queue.qid);
        queue.ctrl.attach_connection(self.id, queue.qid == 0, self.notifier.clone());
        self.queue = Some(queue);
        self.state = State::Live;
        self.connect_deadline = None;
    }

    /// After the Connect response: a controller torn down meanwhile closes the new queue.
    pub(crate) fn recheck_after_connect(&mut self) {
        self.check_controller();
    }
}

/// The parts of an H2CData PDU the receive path needs.
struct H2cArrival {
    cccid: u16,
    ttag: u16,
    datao: u32,
    len: u32,
    last: bool,
    data: Option<Payload>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_h2c_data_is_coalesced() {
        let mut slot =
            R2tSlot { offset: 0, len: 100, received: 0, data: Payload::new(), small: BytesMut::new() };
        for i in 0..10u8 {
            slot.append(&Payload::from(vec![i; 10]));
        }
        slot.flush_small();
        assert_eq!(slot.data.segments().len(), 1, "ten tiny PDUs end up in one buffer");
        assert_eq!(slot.data.len(), 100);
        slot.append(&Payload::from(vec![0; 8192]));
        assert_eq!(slot.data.segments().len(), 2, "large PDUs keep their receive buffers");
    }
}
