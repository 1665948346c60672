//! One TCP connection: the NVMe/TCP queue state machine.

use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::sync::Arc;
use std::time::Instant;

use bytes::{Bytes, BytesMut};
use nvmeof_proto::nvme::opcode::{FabricsCommandType, FABRICS_OPCODE};
use nvmeof_proto::nvme::{Cqe, DataLocation, Status};
use nvmeof_proto::{
    C2hData, CapsuleCmd, CapsuleResp, DecodeError, DecoderConfig, EncodeOptions, EncodedPdu,
    FatalErrorStatus, H2cData, IcReq, IcResp, Payload, Pdu, PduDecoder, R2t, TermReq,
};
use smallvec::SmallVec;

use crate::backend::{IoOp, IoOutput, IoResult, IoToken};
use crate::config::TransportParams;
use crate::controller::{Controller, Notifier};
use crate::subsystem::{Namespace, OpClass};
use crate::target::Target;

/// What a connection asks its driver to do. See [`Connection`] for the order in which to poll.
#[derive(Debug)]
#[must_use]
pub enum Event {
    /// Write these bytes to the socket, after everything transmitted before (vectored: header, then
    /// the payload segments, then the data digest).
    Transmit(EncodedPdu),
    /// Carry out a backend operation, then hand the result to [`Connection::complete_io`]. Requests
    /// may be executed concurrently and completed in any order.
    Io(IoRequest),
    /// Close the socket once every earlier [`Event::Transmit`] has been written. No further events
    /// follow; results of outstanding I/O may still be passed in and are ignored.
    Close(CloseReason),
}

/// A backend operation the engine needs done.
#[must_use]
pub struct IoRequest {
    /// Identifies the request in [`Connection::complete_io`].
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
    /// The host violated the PDU sequence rules (FES and FEI as sent in the C2HTermReq).
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
    /// The driver reported that the peer closed the socket.
    PeerClosed,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    AwaitIcReq,
    AwaitConnect,
    Live,
    Closed,
}

/// An outstanding R2T of a command and the data received for it.
#[derive(Debug)]
pub(crate) struct R2tSlot {
    offset: u32,
    len: u32,
    received: u32,
    data: Payload,
}

#[derive(Debug)]
pub(crate) enum AfterData {
    Write { offset: u64, fua: bool },
    Dsm { ranges: usize, deallocate: bool },
}

#[derive(Debug)]
pub(crate) enum CmdState {
    /// Waiting for data budget before its first R2T (a write) or its read.
    Queued(Queued),
    /// Receiving host data through R2Ts.
    Receiving {
        total: u32,
        next_offset: u32,
        slots: Vec<R2tSlot>,
        then: AfterData,
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

/// The queue a connection became with its Fabrics Connect.
pub(crate) struct Queue {
    pub(crate) ctrl: Arc<Controller>,
    pub(crate) qid: u16,
    pub(crate) entries: u32,
    pub(crate) sqhd: u32,
    pub(crate) sq_flow_control: bool,
    pub(crate) enable_generation: u32,
    pub(crate) inflight: HashMap<u16, Cmd>,
    /// Commands waiting for data budget, oldest first.
    pub(crate) waiting: VecDeque<u16>,
    pub(crate) data_in_flight: usize,
    pub(crate) next_token: u64,
    /// A shutdown's flushes: their shared token and how many are outstanding.
    pub(crate) shutdown: Option<(u64, usize)>,
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
/// 3. the deadline from [`Connection::poll_timeout`] passed: [`Connection::handle_timeout`];
/// 4. the connection's notifier fired (see [`Connection::set_notifier`]): [`Connection::handle_wakeup`];
/// 5. after any of these, drain [`Connection::poll_event`] until `None`: write `Transmit`s in order,
///    start `Io`s, and on `Close` close the socket after the earlier transmits.
///
/// Methods come in four kinds, as in quinn-proto: getters, `handle_*` (input, each taking `now`),
/// commands, and `poll_*` (output). Nothing here blocks, reads a clock or spawns a thread.
pub struct Connection {
    pub(crate) target: Target,
    pub(crate) id: u64,
    pub(crate) params: TransportParams,
    pub(crate) span: tracing::Span,
    state: State,
    decoder: PduDecoder,
    pub(crate) encode: EncodeOptions,
    scratch: BytesMut,
    events: VecDeque<Event>,
    notifier: Option<Notifier>,
    connect_deadline: Option<Instant>,
    /// Most R2Ts outstanding per command: the host's MAXR2T + 1, capped by the configuration.
    max_r2t: u32,
    pub(crate) queue: Option<Queue>,
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
        let deadline = now + cfg.connect_timeout;
        Self {
            target,
            id,
            params,
            span,
            state: State::AwaitIcReq,
            decoder,
            encode: EncodeOptions::default(),
            scratch: BytesMut::new(),
            events: VecDeque::new(),
            notifier: None,
            connect_deadline: Some(deadline),
            max_r2t: 1,
            queue: None,
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

    // ---- commands ----

    /// Sets the callback the engine invokes, from any thread, when this connection must be woken to
    /// act on something that happened elsewhere (see [`Connection::handle_wakeup`]). Without one, the
    /// driver must call `handle_wakeup` periodically to deliver asynchronous events.
    pub fn set_notifier(&mut self, notifier: Notifier) {
        if let Some(q) = &self.queue {
            q.ctrl
                .attach_connection(self.id, q.qid == 0, Some(notifier.clone()));
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
            State::Live => self
                .queue
                .as_ref()
                .filter(|q| q.qid == 0)
                .and_then(|q| q.ctrl.keep_alive_deadline()),
            State::Closed => None,
        }
    }

    // ---- input ----

    /// Consumes every complete PDU at the front of `buf`.
    pub fn handle_input(&mut self, buf: &mut BytesMut, now: Instant) {
        let span = self.span.clone();
        let _enter = span.enter();
        while self.state != State::Closed {
            if self.check_controller() {
                return;
            }
            match self.decoder.decode(buf) {
                Ok(Some(pdu)) => self.handle_pdu(pdu, now),
                Ok(None) => return,
                Err(err) => self.handle_decode_error(err, buf, now),
            }
        }
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
                let expired = self
                    .queue
                    .as_ref()
                    .filter(|q| q.qid == 0)
                    .and_then(|q| q.ctrl.keep_alive_deadline())
                    .is_some_and(|d| now >= d);
                if expired {
                    tracing::info!(parent: &self.span, cntlid = self.cntlid(), "keep-alive timeout: controller torn down");
                    if let Some(q) = &self.queue {
                        self.target.remove_controller(&q.ctrl);
                    }
                    self.close(CloseReason::KeepAliveExpired);
                }
            }
            State::Closed => {}
        }
    }

    /// Something happened outside this connection (see [`Connection::set_notifier`]): delivers
    /// pending asynchronous events, or closes the connection if its controller is gone.
    pub fn handle_wakeup(&mut self, now: Instant) {
        let _ = now;
        if self.state != State::Live || self.check_controller() {
            return;
        }
        self.deliver_async_events();
    }

    /// Hands in the result of an [`Event::Io`] request.
    pub fn complete_io(&mut self, token: IoToken, result: IoResult, now: Instant) {
        if self.state == State::Closed {
            return;
        }
        let Some(q) = self.queue.as_mut() else { return };
        if token.0 & INTERNAL_TOKEN != 0 {
            if let Some((t, remaining)) = q.shutdown.as_mut().filter(|(t, _)| *t == token.0) {
                let _ = t;
                if let Err(e) = &result {
                    tracing::warn!(error = %e, "flush during shutdown failed");
                }
                *remaining = remaining.saturating_sub(1);
                if *remaining == 0 {
                    self.finish_shutdown();
                }
            }
            return;
        }
        let cid = (token.0 & 0xffff) as u16;
        match q
            .inflight
            .get(&cid)
            .filter(|c| c.token == token.0)
            .map(|c| &c.state)
        {
            Some(CmdState::Io { read_len }) => {
                let read_len = *read_len;
                self.finish_io(cid, read_len, result, now);
            }
            _ => tracing::warn!(parent: &self.span, ?token, "completion for an unknown request"),
        }
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

    fn handle_decode_error(&mut self, err: DecodeError, buf: &mut BytesMut, now: Instant) {
        if let DecodeError::DataDigest { pdu_type, cccid, .. } = err {
            tracing::warn!(parent: &self.span, ?pdu_type, cccid, "data digest error");
            // The command fails with Transient Transport Error; the stream stays in sync.
            self.fail_command_on_digest_error(cccid, now);
            return;
        }
        tracing::warn!(parent: &self.span, %err, "fatal transport error");
        if let Some(term) = TermReq::for_error(&err, buf) {
            self.transmit(Pdu::C2hTermReq(term));
        }
        buf.clear();
        self.close(CloseReason::ProtocolError(err));
    }

    /// Sends a C2HTermReq for a PDU sequence error and closes.
    pub(crate) fn fatal(&mut self, fes: FatalErrorStatus, detail: &'static str) {
        tracing::warn!(parent: &self.span, ?fes, detail, "fatal protocol error");
        self.transmit(Pdu::C2hTermReq(TermReq {
            fes,
            fei: 0,
            data: Bytes::new(),
        }));
        self.close(CloseReason::SequenceError { fes, detail });
    }

    pub(crate) fn close(&mut self, reason: CloseReason) {
        if self.state == State::Closed {
            return;
        }
        tracing::debug!(parent: &self.span, ?reason, "closing");
        self.state = State::Closed;
        if let Some(q) = self.queue.take() {
            q.ctrl.detach_connection(self.id, q.qid);
            if q.qid == 0 {
                // The admin queue is gone: so is the controller, and with it its I/O queues.
                self.target.remove_controller(&q.ctrl);
            }
        }
        self.events.push_back(Event::Close(reason));
    }

    pub(crate) fn transmit(&mut self, pdu: Pdu) {
        match pdu.encode_with(&self.encode, &mut self.scratch) {
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
            (State::Live, Pdu::H2cData(data)) => self.handle_h2c_data(data, now),
            _ => self.fatal(
                FatalErrorStatus::PDU_SEQUENCE_ERROR,
                "PDU not allowed in this state",
            ),
        }
    }

    fn handle_icreq(&mut self, req: IcReq) {
        if let Err(err) = req.validate() {
            // Quote the ICReq's common header fields as we understood them.
            let term = TermReq {
                fes: err
                    .fatal_status()
                    .unwrap_or(FatalErrorStatus::UNSUPPORTED_PARAMETER),
                fei: err.fei(),
                data: Bytes::new(),
            };
            self.transmit(Pdu::C2hTermReq(term));
            self.close(CloseReason::ProtocolError(err));
            return;
        }
        let cfg = &self.target.shared.config;
        let digests = req.digests.intersect(cfg.digests);
        let resp = IcResp {
            pfv: 0,
            cpda: 0,
            digests,
            maxh2cdata: cfg.maxh2cdata,
        };
        self.max_r2t = req.maxr2t.saturating_add(1).min(cfg.max_r2t_per_command);
        // ICResp goes out without digests; everything after uses the negotiated ones.
        self.transmit(Pdu::IcResp(resp));
        self.encode = EncodeOptions {
            digests,
            pda: req.hpda,
        };
        let mut dc = *self.decoder.config();
        dc.digests = digests;
        self.decoder.set_config(dc);
        self.state = State::AwaitConnect;
        tracing::debug!(parent: &self.span, ?digests, hpda = req.hpda, maxr2t = req.maxr2t, "ICReq accepted");
    }

    fn handle_capsule(&mut self, cmd: CapsuleCmd, now: Instant) {
        let cid = cmd.sqe.cid.get();
        if self.state == State::AwaitConnect {
            let is_connect = cmd.sqe.opcode == FABRICS_OPCODE
                && FabricsCommandType::from_u8(cmd.sqe.fctype()) == Some(FabricsCommandType::Connect);
            if is_connect {
                self.handle_connect(&cmd, now);
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
            self.fatal(
                FatalErrorStatus::PDU_SEQUENCE_ERROR,
                "more commands than the queue has entries",
            );
            return;
        }
        q.sqhd = (q.sqhd + 1) % q.entries;
        q.ctrl.touch(now);
        if q.qid == 0 {
            self.handle_admin(cmd, now);
        } else {
            self.handle_io(cmd, now);
        }
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

    pub(crate) fn new_token(&mut self, cid: u16) -> u64 {
        let seq = self.queue.as_mut().map_or(0, |q| {
            q.next_token = q.next_token.wrapping_add(1) & ((1 << 47) - 1);
            q.next_token
        });
        (seq << 16) | u64::from(cid)
    }

    /// Registers a command that goes straight to the backend (no data budget needed).
    pub(crate) fn register(&mut self, cid: u16, ns: Option<Arc<Namespace>>, class: OpClass, now: Instant) {
        if let Some(q) = self.queue.as_mut() {
            q.inflight.insert(
                cid,
                Cmd {
                    started: now,
                    ns,
                    class,
                    token: 0,
                    budget: 0,
                    bytes: 0,
                    state: CmdState::Io { read_len: None },
                },
            );
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
        q.inflight.insert(
            cid,
            Cmd {
                started: now,
                ns,
                class,
                token: 0,
                budget: 0,
                bytes: 0,
                state: CmdState::Queued(queued),
            },
        );
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
            let Some(cmd) = q.inflight.get_mut(&cid) else {
                continue;
            };
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
                        slots: Vec::new(),
                        then,
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
        let Some(cmd) = self.queue.as_mut().and_then(|q| q.inflight.get_mut(&cid)) else {
            return;
        };
        let Some(ns) = cmd.ns.clone() else { return };
        cmd.token = token;
        cmd.bytes = op.data_len();
        cmd.state = CmdState::Io { read_len };
        self.events.push_back(Event::Io(IoRequest {
            token: IoToken(token),
            namespace: ns,
            op,
        }));
    }

    /// Issues R2Ts up to the per-command limit, each at most MAXH2CDATA.
    fn issue_r2ts(&mut self, cid: u16) {
        let chunk = self.target.shared.config.maxh2cdata;
        let max_r2t = self.max_r2t as usize;
        let mut r2ts = SmallVec::<[R2t; 4]>::new();
        if let Some(Cmd {
            state:
                CmdState::Receiving {
                    total,
                    next_offset,
                    slots,
                    ..
                },
            ..
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
                });
                r2ts.push(R2t {
                    cccid: cid,
                    ttag: cid,
                    r2to: *next_offset,
                    r2tl: len,
                });
                *next_offset += len;
            }
        }
        for r in r2ts {
            self.transmit(Pdu::R2t(r));
        }
    }

    fn handle_h2c_data(&mut self, d: H2cData, now: Instant) {
        enum Outcome {
            More,
            Done,
            Error(FatalErrorStatus, &'static str),
        }
        let outcome = match self.queue.as_mut().and_then(|q| q.inflight.get_mut(&d.ttag)) {
            Some(Cmd {
                state:
                    CmdState::Receiving {
                        total,
                        next_offset,
                        slots,
                        ..
                    },
                ..
            }) if d.cccid == d.ttag => {
                let len = d.data.len() as u32;
                match slots
                    .iter_mut()
                    .find(|s| s.offset + s.received == d.datao && s.received < s.len)
                {
                    Some(slot) if len <= slot.len - slot.received => {
                        slot.received += len;
                        for seg in d.data.segments() {
                            slot.data.push(seg.clone());
                        }
                        let all_in = *next_offset >= *total && slots.iter().all(|s| s.received == s.len);
                        if all_in {
                            Outcome::Done
                        } else {
                            Outcome::More
                        }
                    }
                    _ => Outcome::Error(
                        FatalErrorStatus::DATA_TRANSFER_OUT_OF_RANGE,
                        "H2CData outside its R2T",
                    ),
                }
            }
            _ => Outcome::Error(
                FatalErrorStatus::PDU_SEQUENCE_ERROR,
                "H2CData without a matching R2T",
            ),
        };
        match outcome {
            Outcome::Error(fes, detail) => self.fatal(fes, detail),
            Outcome::More => {
                // A slot may have completed: keep the R2T window full.
                self.issue_r2ts(d.ttag);
            }
            Outcome::Done => {
                let Some(cmd) = self.queue.as_mut().and_then(|q| q.inflight.get_mut(&d.ttag)) else {
                    return;
                };
                let state = std::mem::replace(&mut cmd.state, CmdState::Io { read_len: None });
                if let CmdState::Receiving { slots, then, .. } = state {
                    let mut data = Payload::new();
                    for s in slots {
                        for seg in s.data.segments() {
                            data.push(seg.clone());
                        }
                    }
                    self.data_received(d.ttag, data, then, now);
                }
            }
        }
    }

    /// A command's data arrived (in the capsule or through R2Ts): act on it.
    pub(crate) fn data_received(&mut self, cid: u16, data: Payload, then: AfterData, now: Instant) {
        match then {
            AfterData::Write { offset, fua } => self.submit_io(cid, IoOp::Write { offset, data, fua }, None),
            AfterData::Dsm { ranges, deallocate } => self.dsm_data(cid, &data, ranges, deallocate, now),
        }
    }

    fn finish_io(&mut self, cid: u16, read_len: Option<u32>, result: IoResult, now: Instant) {
        let Some(cmd) = self.queue.as_mut().and_then(|q| q.inflight.remove(&cid)) else {
            return;
        };
        let (status, data) = match (result, read_len) {
            (Ok(IoOutput::Data(data)), Some(len)) if data.len() == len as usize => {
                (Status::SUCCESS, Some(data))
            }
            (Ok(IoOutput::Data(_)), Some(_)) => (Status::INTERNAL_ERROR, None),
            (Ok(_), Some(_)) => (Status::INTERNAL_ERROR, None),
            (Ok(_), None) => (Status::SUCCESS, None),
            (Err(e), read) => {
                tracing::warn!(parent: &self.span, cid, error = %e, "backend I/O failed");
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

    /// Completes a registered command without (further) backend I/O, and records it.
    pub(crate) fn finish_registered(&mut self, cid: u16, status: Status, now: Instant) {
        if let Some(cmd) = self.queue.as_mut().and_then(|q| q.inflight.remove(&cid)) {
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

    fn fail_command_on_digest_error(&mut self, cid: u16, now: Instant) {
        let known = self.queue.as_ref().is_some_and(|q| q.inflight.contains_key(&cid));
        if known {
            self.finish_registered(cid, Status::TRANSIENT_TRANSPORT_ERROR, now);
        } else if self.state == State::Live {
            // A capsule whose in-capsule data was corrupt: the command was never registered.
            self.respond(cid, Status::TRANSIENT_TRANSPORT_ERROR, 0);
        } else {
            self.fatal(
                FatalErrorStatus::HEADER_DIGEST_ERROR,
                "data digest error before Connect",
            );
        }
    }

    pub(crate) fn push_event(&mut self, ev: Event) {
        self.events.push_back(ev);
    }

    pub(crate) fn set_live(&mut self, queue: Queue) {
        self.span.record("cntlid", queue.ctrl.cntlid);
        self.span.record("qid", queue.qid);
        if let Some(n) = &self.notifier {
            queue
                .ctrl
                .attach_connection(self.id, queue.qid == 0, Some(n.clone()));
        } else {
            queue.ctrl.attach_connection(self.id, queue.qid == 0, None);
        }
        self.queue = Some(queue);
        self.state = State::Live;
        self.connect_deadline = None;
    }
}
