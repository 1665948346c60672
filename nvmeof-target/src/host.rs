//! A minimal sans-I/O NVMe/TCP host (initiator) for tests, tools and load generators.
//!
//! It speaks the host side of one queue: ICReq, command capsules with in-capsule data or R2T-driven
//! H2CData, and reassembly of C2HData into completions. Like the target it never touches a socket or
//! a clock: [`HostQueue::poll_transmit`] yields PDUs to write, [`HostQueue::handle_input`] consumes
//! received bytes, [`HostQueue::poll_completion`] yields finished commands.
//!
//! A queue whose Connect response asks for authentication (AUTHREQ.ATR) runs a
//! [`HostAuthenticator`] first: DH-HMAC-CHAP with a host secret, and optionally a controller secret
//! for bidirectional authentication ([`BlockingHost::authenticate`] drives one).
//!
//! ```text
//!  submit(sqe, data) ──▶ CapsuleCmd ──▶ (target) ──▶ R2T ──▶ H2CData … ──▶ CapsuleResp ──▶ Completion
//!                                                 └─▶ C2HData … (SUCCESS) ───────────────▶ Completion
//! ```

use std::collections::{HashMap, HashSet, VecDeque};

use bytes::BytesMut;
use nvmeof_proto::nvme::fabrics::{ConnectCommand, ConnectData, PropertyGetCommand, PropertySetCommand};
use nvmeof_proto::nvme::registers::PropertyWidth;
use nvmeof_proto::nvme::{Cqe, SglDescriptor, Sqe, Status};
use nvmeof_proto::{
    CapsuleCmd, DecodeError, DecoderConfig, Digests, EncodeOptions, EncodedPdu, H2cData, IcReq, Payload, Pdu,
    PduDecoder,
};
use zerocopy::IntoBytes;

mod auth;

pub use auth::{
    auth_receive_command, auth_send_command, AuthOutcome, HostAuthConfig, HostAuthError, HostAuthenticator,
    AUTH_RECEIVE_LEN,
};

/// How a host queue connects.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HostOptions {
    /// Digests to ask for.
    pub digests: Digests,
    /// Host PDU data alignment to ask for.
    pub hpda: u8,
    /// MAXR2T to announce (0's based).
    pub maxr2t: u32,
    /// Largest write data sent in the capsule; larger writes wait for R2Ts.
    pub max_inline_data: u32,
    /// Largest C2HData accepted.
    pub max_data_pdu: u32,
}

impl Default for HostOptions {
    fn default() -> Self {
        Self {
            digests: Digests::NONE,
            hpda: 0,
            maxr2t: 0,
            max_inline_data: 8192 - 64,
            max_data_pdu: 16 * 1024 * 1024,
        }
    }
}

/// A finished command.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Completion {
    /// The completion entry (synthesised from C2HData with SUCCESS when no CapsuleResp came).
    pub cqe: Cqe,
    /// Data the controller sent (reads, Identify, log pages).
    pub data: Payload,
    /// The command completed through a C2HData PDU with the SUCCESS flag (no response capsule).
    pub via_success_flag: bool,
}

impl Completion {
    /// The completion's status.
    #[must_use]
    pub fn status(&self) -> Status {
        self.cqe.status()
    }
}

/// Errors that end a host queue.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum HostError {
    /// The controller sent bytes that are not valid NVMe/TCP.
    #[error("invalid PDU from the controller: {0}")]
    Decode(#[from] DecodeError),
    /// The controller sent a valid PDU at a wrong time or for an unknown command.
    #[error("protocol error: {0}")]
    Protocol(&'static str),
    /// The controller terminated the connection.
    #[error("controller terminated the connection (FES {0:#x})")]
    Terminated(u16),
}

#[derive(Debug)]
struct Pending {
    /// Write data not sent in the capsule (sent on R2T).
    data_out: Option<Payload>,
    /// Read data received so far.
    data_in: Payload,
    /// C2HData with SUCCESS arrived: the command is complete without a CapsuleResp.
    done_early: bool,
}

/// The host side of one NVMe/TCP queue.
#[derive(Debug)]
pub struct HostQueue {
    options: HostOptions,
    decoder: PduDecoder,
    encode: EncodeOptions,
    ready: bool,
    maxh2cdata: u32,
    transmit: VecDeque<EncodedPdu>,
    pending: HashMap<u16, Pending>,
    completions: VecDeque<Completion>,
    /// CIDs of completions not yet taken with `poll_completion`: not reusable until then, so a caller
    /// that maps CIDs to its own records never sees one CID stand for two commands.
    unpolled: HashSet<u16>,
    next_cid: u16,
}

impl HostQueue {
    /// A queue that starts by sending ICReq.
    #[must_use]
    pub fn new(options: HostOptions) -> Self {
        let decoder =
            PduDecoder::new(DecoderConfig { max_data_pdu: options.max_data_pdu, ..DecoderConfig::host() });
        let mut q = Self {
            options,
            decoder,
            encode: EncodeOptions::default(),
            ready: false,
            maxh2cdata: 4096,
            transmit: VecDeque::new(),
            pending: HashMap::new(),
            completions: VecDeque::new(),
            unpolled: HashSet::new(),
            next_cid: 0,
        };
        q.send(Pdu::IcReq(IcReq {
            pfv: 0,
            hpda: options.hpda,
            digests: options.digests,
            maxr2t: options.maxr2t,
        }));
        q
    }

    /// True once ICResp arrived.
    #[must_use]
    pub fn is_ready(&self) -> bool {
        self.ready
    }

    /// Commands submitted and not completed.
    #[must_use]
    pub fn outstanding(&self) -> usize {
        self.pending.len()
    }

    /// The next PDU to write to the socket.
    pub fn poll_transmit(&mut self) -> Option<EncodedPdu> {
        self.transmit.pop_front()
    }

    /// The next finished command.
    pub fn poll_completion(&mut self) -> Option<Completion> {
        let c = self.completions.pop_front()?;
        self.unpolled.remove(&c.cqe.cid.get());
        Some(c)
    }

    fn in_use(&self, cid: u16) -> bool {
        self.pending.contains_key(&cid) || self.unpolled.contains(&cid)
    }

    fn complete(&mut self, c: Completion) {
        self.unpolled.insert(c.cqe.cid.get());
        self.completions.push_back(c);
    }

    /// A command ID neither outstanding nor waiting in an unpolled completion; `None` when all 65536
    /// are in use.
    pub fn next_cid(&mut self) -> Option<u16> {
        for _ in 0..=u16::MAX {
            self.next_cid = self.next_cid.wrapping_add(1);
            if !self.in_use(self.next_cid) {
                return Some(self.next_cid);
            }
        }
        None
    }

    fn send(&mut self, pdu: Pdu) {
        // Encoding only fails for PDUs this module never builds (empty data PDUs, oversize).
        if let Ok(enc) = pdu.encode(&self.encode) {
            self.transmit.push_back(enc);
        }
    }

    /// Submits a command. Its SGL is set here: in-capsule for write data up to
    /// [`HostOptions::max_inline_data`] (fabrics and admin commands may carry up to 8 KiB), otherwise a
    /// transport data block of `data.len()` bytes (sent on R2T) or of `read_len` bytes (received in
    /// C2HData). The SQE's CID is kept if not already in use, else replaced; returns the CID used.
    pub fn submit(&mut self, mut sqe: Sqe, data: Option<Payload>, read_len: u32) -> u16 {
        let mut cid = sqe.cid.get();
        if self.in_use(cid) {
            // All 65536 in use cannot happen with a sane queue depth; reuse the given CID then.
            cid = self.next_cid().unwrap_or(cid);
        }
        sqe.cid.set(cid);
        sqe.flags = (sqe.flags & 0x3f) | 0x40;
        let inline_max =
            self.options.max_inline_data.max(if sqe.opcode == 0x7f || !self.ready { 8192 } else { 0 });
        let (capsule_data, data_out) = match data {
            Some(d) if !d.is_empty() && d.len() <= inline_max as usize => {
                sqe.dptr = SglDescriptor::in_capsule(0, d.len() as u32);
                (d, None)
            }
            Some(d) if !d.is_empty() => {
                sqe.dptr = SglDescriptor::transport(d.len() as u32);
                (Payload::new(), Some(d))
            }
            _ => {
                sqe.dptr = SglDescriptor::transport(read_len);
                (Payload::new(), None)
            }
        };
        self.pending.insert(cid, Pending { data_out, data_in: Payload::new(), done_early: false });
        self.send(Pdu::CapsuleCmd(CapsuleCmd { sqe, data: capsule_data }));
        cid
    }

    /// Submits a command whose data goes by R2T/H2CData even where [`HostQueue::submit`] would put it
    /// in the capsule (Fabrics commands): for exercising a target's R2T path. Returns the CID used.
    pub fn submit_data_by_r2t(&mut self, mut sqe: Sqe, data: Payload) -> u16 {
        let mut cid = sqe.cid.get();
        if self.in_use(cid) {
            cid = self.next_cid().unwrap_or(cid);
        }
        sqe.cid.set(cid);
        sqe.flags = (sqe.flags & 0x3f) | 0x40;
        sqe.dptr = SglDescriptor::transport(data.len() as u32);
        self.pending
            .insert(cid, Pending { data_out: Some(data), data_in: Payload::new(), done_early: false });
        self.send(Pdu::CapsuleCmd(CapsuleCmd { sqe, data: Payload::new() }));
        cid
    }

    /// Consumes received bytes.
    pub fn handle_input(&mut self, buf: &mut BytesMut) -> Result<(), HostError> {
        loop {
            let pdu = match self.decoder.decode(buf) {
                Ok(Some(p)) => p,
                Ok(None) => return Ok(()),
                Err(DecodeError::DataDigest { cccid, success, .. }) => {
                    if success {
                        let mut cqe = Cqe::new(cccid, 0, 0, Status::TRANSIENT_TRANSPORT_ERROR);
                        cqe.cid.set(cccid);
                        self.pending.remove(&cccid);
                        self.complete(Completion { cqe, data: Payload::new(), via_success_flag: true });
                    } else if let Some(p) = self.pending.get_mut(&cccid) {
                        p.data_in = Payload::new();
                    }
                    continue;
                }
                Err(e) => return Err(e.into()),
            };
            self.handle_pdu(pdu)?;
        }
    }

    fn handle_pdu(&mut self, pdu: Pdu) -> Result<(), HostError> {
        match pdu {
            Pdu::IcResp(resp) if !self.ready => {
                resp.validate()?;
                if resp.digests != self.options.digests {
                    return Err(HostError::Protocol("ICResp digests differ from the request"));
                }
                self.ready = true;
                self.maxh2cdata = resp.maxh2cdata;
                self.encode = EncodeOptions { digests: resp.digests, pda: resp.cpda };
                let mut cfg = *self.decoder.config();
                cfg.digests = resp.digests;
                cfg.pda = self.options.hpda;
                self.decoder.set_config(cfg);
            }
            Pdu::C2hTermReq(t) => return Err(HostError::Terminated(t.fes.0)),
            Pdu::CapsuleResp(r) if self.ready => {
                let cid = r.cqe.cid.get();
                let p = self
                    .pending
                    .remove(&cid)
                    .ok_or(HostError::Protocol("response for an unknown command"))?;
                self.complete(Completion { cqe: r.cqe, data: p.data_in, via_success_flag: false });
            }
            Pdu::C2hData(d) if self.ready => {
                let p = self
                    .pending
                    .get_mut(&d.cccid)
                    .ok_or(HostError::Protocol("data for an unknown command"))?;
                if d.datao as usize != p.data_in.len() || p.done_early {
                    return Err(HostError::Protocol("C2HData out of order"));
                }
                for seg in d.data.segments() {
                    p.data_in.push(seg.clone());
                }
                if d.success {
                    p.done_early = true;
                    let cid = d.cccid;
                    let data = std::mem::take(&mut p.data_in);
                    self.pending.remove(&cid);
                    let mut cqe = Cqe::new(cid, 0, 0, Status::SUCCESS);
                    cqe.cid.set(cid);
                    self.complete(Completion { cqe, data, via_success_flag: true });
                }
            }
            Pdu::R2t(r) if self.ready => {
                let p =
                    self.pending.get(&r.cccid).ok_or(HostError::Protocol("R2T for an unknown command"))?;
                let data =
                    p.data_out.as_ref().ok_or(HostError::Protocol("R2T for a command without data"))?;
                let end = r.r2to as usize + r.r2tl as usize;
                if r.r2tl == 0 || end > data.len() {
                    return Err(HostError::Protocol("R2T outside the command's data"));
                }
                let mut off = r.r2to as usize;
                let chunk = self.maxh2cdata as usize;
                let mut pdus = Vec::new();
                while off < end {
                    let n = chunk.min(end - off);
                    pdus.push(Pdu::H2cData(H2cData {
                        cccid: r.cccid,
                        ttag: r.ttag,
                        datao: off as u32,
                        last: off + n == end,
                        data: data.slice(off..off + n),
                    }));
                    off += n;
                }
                for p in pdus {
                    self.send(p);
                }
            }
            _ => return Err(HostError::Protocol("unexpected PDU")),
        }
        Ok(())
    }
}

/// A Fabrics Connect command and its 1024 bytes of data. Set CATTR bit 2 in the returned SQE (byte
/// 46) to ask for SQ flow control to be disabled.
#[must_use]
pub fn connect_command(
    qid: u16,
    queue_entries: u16,
    kato_ms: u32,
    cntlid: u16,
    hostid: [u8; 16],
    subnqn: &str,
    hostnqn: &str,
) -> (Sqe, Payload) {
    let cmd = ConnectCommand::new(0, qid, queue_entries, kato_ms, SglDescriptor::in_capsule(0, 1024));
    let data = ConnectData::new(hostid, cntlid, subnqn, hostnqn)
        .map(|d| d.as_bytes().to_vec())
        .unwrap_or_else(|_| vec![0; 1024]);
    (cmd.to_sqe(), Payload::from(data))
}

/// An NVM Read (0x02), Write (0x01) or other LBA-range command (`opcode`) on namespace `nsid`:
/// `blocks` blocks from `slba`.
#[must_use]
pub fn rw_command(opcode: u8, nsid: u32, slba: u64, blocks: u32) -> Sqe {
    let mut sqe = Sqe::zeroed();
    sqe.opcode = opcode;
    sqe.nsid.set(nsid);
    nvmeof_proto::nvme::nvm::RwCommand::new(slba, blocks).apply(&mut sqe);
    sqe
}

/// A Property Get command.
#[must_use]
pub fn property_get(offset: u32, width: PropertyWidth) -> Sqe {
    PropertyGetCommand::new(0, offset, width).to_sqe()
}

/// A Property Set command.
#[must_use]
pub fn property_set(offset: u32, width: PropertyWidth, value: u64) -> Sqe {
    PropertySetCommand::new(0, offset, width, value).to_sqe()
}

/// A [`HostQueue`] driven over any blocking byte stream (a `TcpStream` in tests and tools): the
/// stream is the caller's, this only writes the queue's PDUs and feeds it what it reads.
///
/// ```no_run
/// use nvmeof_target::host::{BlockingHost, HostOptions};
/// let stream = std::net::TcpStream::connect("127.0.0.1:4420")?;
/// let mut admin = BlockingHost::new(stream, HostOptions::default())?; // ICReq/ICResp done
/// # Ok::<(), std::io::Error>(())
/// ```
#[derive(Debug)]
pub struct BlockingHost<S> {
    stream: S,
    queue: HostQueue,
    rx: BytesMut,
}

fn host_io_error(e: HostError) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidData, e)
}

impl<S: std::io::Read + std::io::Write> BlockingHost<S> {
    /// Sends ICReq on `stream` and waits for ICResp.
    pub fn new(stream: S, options: HostOptions) -> std::io::Result<Self> {
        let mut h = Self { stream, queue: HostQueue::new(options), rx: BytesMut::new() };
        h.flush()?;
        while !h.queue.is_ready() {
            h.receive()?;
        }
        Ok(h)
    }

    /// The queue (to submit without waiting, or to look at its state).
    pub fn queue(&mut self) -> &mut HostQueue {
        &mut self.queue
    }

    /// The stream.
    pub fn stream(&mut self) -> &mut S {
        &mut self.stream
    }

    /// Writes every PDU the queue has to send.
    pub fn flush(&mut self) -> std::io::Result<()> {
        while let Some(pdu) = self.queue.poll_transmit() {
            for chunk in pdu.chunks() {
                self.stream.write_all(chunk)?;
            }
        }
        self.stream.flush()
    }

    /// Reads once (blocking), feeds the queue and writes what it answers (H2CData for R2Ts).
    /// A closed stream is `UnexpectedEof`; a protocol error of the target is `InvalidData`.
    pub fn receive(&mut self) -> std::io::Result<()> {
        let mut buf = [0u8; 65536];
        let n = loop {
            match self.stream.read(&mut buf) {
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                r => break r?,
            }
        };
        if n == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        self.rx.extend_from_slice(buf.get(..n).unwrap_or_default());
        self.queue.handle_input(&mut self.rx).map_err(host_io_error)?;
        self.flush()
    }

    /// Submits a command and returns its CID without waiting.
    pub fn submit(&mut self, sqe: Sqe, data: Option<Payload>, read_len: u32) -> std::io::Result<u16> {
        let cid = self.queue.submit(sqe, data, read_len);
        self.flush()?;
        Ok(cid)
    }

    /// Waits for the next completion.
    pub fn next_completion(&mut self) -> std::io::Result<Completion> {
        loop {
            if let Some(c) = self.queue.poll_completion() {
                return Ok(c);
            }
            self.receive()?;
        }
    }

    /// Runs an authentication transaction to its end (after a Connect whose response had
    /// AUTHREQ.ATR set, or to re-authenticate a live queue). Completions of other commands that
    /// arrive meanwhile are dropped. A refusal is `PermissionDenied`.
    pub fn authenticate(&mut self, auth: &mut HostAuthenticator) -> std::io::Result<AuthOutcome> {
        while let Some((sqe, data, read_len)) = auth.poll_command() {
            let c = self.command(sqe, data, read_len)?;
            auth.handle_completion(&c);
        }
        match auth.result() {
            Some(Ok(outcome)) => Ok(*outcome),
            Some(Err(e)) => Err(std::io::Error::new(std::io::ErrorKind::PermissionDenied, e.clone())),
            None => Err(std::io::Error::other("authentication did not finish")),
        }
    }

    /// Submits a command and waits for its completion (completions of other commands that arrive
    /// meanwhile are dropped: use [`BlockingHost::submit`] and [`BlockingHost::next_completion`] for
    /// several at once).
    pub fn command(&mut self, sqe: Sqe, data: Option<Payload>, read_len: u32) -> std::io::Result<Completion> {
        let cid = self.submit(sqe, data, read_len)?;
        loop {
            let c = self.next_completion()?;
            if c.cqe.cid.get() == cid {
                return Ok(c);
            }
        }
    }
}
