//! One TCP connection as the worker keeps it: the engine's [`Connection`], the receive state (which
//! of two ways bytes arrive) and the send queue.
//!
//! **Receiving.** A connection starts in *ring* mode: a multishot receive into the worker's shared
//! provided buffers, whose bytes are copied into the connection's reassembly buffer and decoded from
//! there — no receive buffer is tied to an idle connection. An I/O queue whose namespace is an
//! `O_DIRECT` device (zvols, block devices) switches to *direct* mode once it is live: it reads each
//! PDU's 8-byte common header, then the rest of the PDU (plus the next common header) into memory
//! placed so that the PDU's data starts at an address aligned for the device. The write then goes
//! to the device straight from that memory: the kernel's copy out of the socket is the only copy.
//! A PDU with data of up to [`POOLED_PDU_MAX`] bytes (4 KiB and 8 KiB writes) is placed in a buffer
//! of the worker's pool, which comes back when the device is done with it: its only allocation is
//! the `Bytes` handle. Larger ones, and any past the buffers the pool keeps, get memory of their own.
//!
//! ```text
//!  ring:    RecvMulti ─▶ provided buffer ─copy─▶ buf ─▶ decode ─▶ (write data copied again for O_DIRECT)
//!  direct:  Recv 8 B ─▶ common header ─▶ Recv (PLEN - 8 + 8) ─▶ [pad][header][data, aligned][next CH]
//!                                                                  └─▶ decode ─▶ write from here
//! ```
//!
//! **Sending.** PDUs the engine emits are queued; the worker sends each connection's queue with one
//! `writev` per loop turn (header and payload `Bytes` as iovecs, no copy).

use std::collections::VecDeque;
use std::net::{IpAddr, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Instant;

use bytes::{Buf, Bytes, BytesMut};
use nvmeof_proto::{BytesChain, EncodedPdu};
use nvmeof_target::{Connection, IoRequest};

use super::pool::{Pooled, ReadPool, MIN_CLASS};

/// Send at most this many PDUs in one `writev`.
const MAX_PDUS_PER_SEND: usize = 256;

/// Iovecs of one `writev` (Linux's `IOV_MAX`); one PDU has at most a few dozen (header, data
/// segments, digest), so a single PDU always fits.
const MAX_IOVECS: usize = 1024;

/// Length of a PDU's common header.
const CH_LEN: usize = 8;

/// Direct mode places a PDU with data in a pooled buffer when it needs at most this many bytes
/// (alignment padding, the PDU and the next common header): the pool's 4, 8 and 16 KiB classes,
/// which keep 256, 128 and 64 buffers. A 4 KiB write takes an 8 KiB buffer on a device with
/// 512-byte alignment, a 16 KiB one with 4096-byte alignment (the padding in front of its header
/// is then 4024 bytes). Larger PDUs are rarer per byte and get their own buffer.
pub(super) const POOLED_PDU_MAX: usize = 16 * 1024;

pub(super) struct Conn {
    pub(super) stream: TcpStream,
    pub(super) peer_ip: IpAddr,
    pub(super) engine: Connection,
    pub(super) rx: Rx,
    pub(super) tx: Tx,
    pub(super) woken: Arc<AtomicBool>,
    /// The engine's current deadline for this connection.
    pub(super) timer: Option<Instant>,
    /// The earliest entry this connection has in the worker's timer heap (a deadline that moved
    /// later keeps its old entry, which puts the current one back when it comes up).
    pub(super) queued: Option<Instant>,
    /// When input last arrived (for the worker's poll window).
    pub(super) last_input: Option<Instant>,
    /// The last input came within the worker's trim delay of the one before: the host keeps this
    /// queue busy (its burst memory is kept while it stays so).
    pub(super) busy: bool,
    /// Listed in the worker's list of connections with something to send.
    pub(super) dirty: bool,
    /// Listed in the worker's list of connections to trim when it next goes idle.
    pub(super) active: bool,
    /// The worker's loop turn in which `turn_pdus` PDUs were decoded (fairness budget).
    pub(super) turn: u64,
    pub(super) turn_pdus: u32,
    /// Decoded PDUs are waiting in the reassembly buffer for the next turn (the connection had its
    /// share of this one); listed in the worker's list of deferred connections.
    pub(super) deferred: bool,
    /// The data alignment of the queue was looked at (once it is a live I/O queue).
    pub(super) alignment_checked: bool,
    /// The engine closed the connection: flush, then close the socket.
    pub(super) closing: bool,
    /// The socket failed or the peer is gone: nothing more is sent.
    pub(super) dead: bool,
    /// A quiet admin queue: no receive stays armed on the ring; the worker's readiness set says
    /// when input is there (see `ServerConfig::admin_batch_window`).
    pub(super) dormant: bool,
    /// Backend operations of this connection on the worker's ring.
    pub(super) disk_inflight: usize,
    /// Backend requests waiting for this connection's share of the ring (see
    /// `ServerConfig::disk_share`), in arrival order.
    pub(super) disk_waiting: VecDeque<IoRequest>,
    /// The ring demand (operations in flight and waiting) of all the worker's connections to the
    /// volume of this connection's first ring request: the connections of one volume share a
    /// count, so that they are not held back by each other (see `ServerConfig::disk_share`).
    pub(super) ring_group: Option<Arc<AtomicUsize>>,
}

impl Conn {
    /// The ring demand of this connection's volume on its worker (its own, before it joined one).
    pub(super) fn group_demand(&self) -> usize {
        self.ring_group
            .as_ref()
            .map_or(self.disk_inflight + self.disk_waiting.len(), |g| g.load(Ordering::Relaxed))
    }

    /// One more (`up`) or one fewer ring operation of this connection's volume, in flight or
    /// waiting. Only the connection's worker touches the count.
    pub(super) fn group_add(&self, up: bool) {
        if up {
            self.group_change(1, 0);
        } else {
            self.group_change(0, 1);
        }
    }

    /// Adds `up` to and takes `down` from the ring demand of this connection's volume.
    pub(super) fn group_change(&self, up: usize, down: usize) {
        if let Some(g) = &self.ring_group {
            let n = g.load(Ordering::Relaxed);
            g.store((n + up).saturating_sub(down), Ordering::Relaxed);
        }
    }

    pub(super) fn new(
        stream: TcpStream,
        peer_ip: IpAddr,
        engine: Connection,
        woken: Arc<AtomicBool>,
    ) -> Self {
        Self {
            stream,
            peer_ip,
            engine,
            rx: Rx::default(),
            tx: Tx::default(),
            woken,
            timer: None,
            queued: None,
            last_input: None,
            busy: false,
            dirty: false,
            active: false,
            turn: 0,
            turn_pdus: 0,
            deferred: false,
            alignment_checked: false,
            closing: false,
            dead: false,
            dormant: false,
            disk_inflight: 0,
            disk_waiting: VecDeque::new(),
            ring_group: None,
        }
    }
}

/// How received bytes reach the connection.
#[derive(Debug, Default)]
pub(super) enum RxMode {
    /// Multishot receive into the worker's provided buffers, copied into [`Rx::buf`].
    #[default]
    Ring,
    /// Leaving ring mode: the multishot receive was cancelled; direct mode starts when it has ended.
    Switching {
        /// The alignment direct mode will use.
        align: usize,
    },
    /// Plain receives into memory placed for the data's alignment (boxed: most connections never
    /// use it, and each keeps its `RxMode`).
    Direct(Box<Direct>),
}

/// PLEN of the PDU whose common header starts `front` (`None` while fewer than 8 bytes are there).
pub(super) fn pdu_len(front: &[u8]) -> Option<usize> {
    front.get(4..8).and_then(|p| <[u8; 4]>::try_from(p).ok()).map(|p| u32::from_le_bytes(p) as usize)
}

/// Direct-mode state: which part of a PDU the next receive reads.
#[derive(Debug)]
pub(super) struct Direct {
    align: usize,
    /// The worker's pool of aligned buffers, for PDUs with data.
    pool: Arc<ReadPool>,
    /// The next PDU's common header, as far as received.
    ch: [u8; CH_LEN],
    ch_len: usize,
    /// Length of the PDU being assembled in [`Rx::buf`] or `placed` (0: the common header is being
    /// read).
    plen: usize,
    /// The PDU being assembled carries data (placed for the device's alignment).
    data: bool,
    /// The PDU is whole ([`DirectStep::Pdu`] was returned) and not decoded yet: only then may it be
    /// decoded (before, a receive may be writing into its buffer).
    ready: bool,
    /// The PDU with data being assembled, when it is in a pooled buffer (else it is in [`Rx::buf`]).
    placed: Option<Placed>,
}

/// What a direct-mode receive completion led to.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum DirectStep {
    /// Receive again.
    More,
    /// One whole PDU is in: in [`Rx::buf`] if it has no data (decode it from there), else taken
    /// with [`Rx::take_data_pdu`]; then call [`Rx::direct_next`].
    Pdu,
    /// The common header is not one to place (length out of bounds): the connection went back to
    /// ring mode with the bytes in [`Rx::buf`], where the decoder reports the error.
    Fallback,
}

/// A PDU with data being assembled in a pooled buffer (direct mode). The PDU starts at `start`,
/// placed so that its data lands aligned; the buffer shows (its length) what was received of it.
#[derive(Debug)]
pub(super) struct Placed {
    buf: Pooled,
    start: usize,
}

impl Placed {
    /// The PDU as far as received (and possibly the first bytes of the next common header).
    fn received(&self) -> &[u8] {
        self.buf.as_ref().get(self.start..).unwrap_or_default()
    }

    /// Room for `want` more bytes right after what was received (`None` past the buffer's end).
    fn room(&mut self, want: usize) -> Option<&mut [u8]> {
        let at = self.buf.as_ref().len();
        self.buf.as_mut_full().get_mut(at..at + want)
    }

    /// `n` more bytes were written into the [`Placed::room`] (the bytes are initialised memory of
    /// the buffer either way; the length says which of them are the PDU's).
    fn grow(&mut self, n: usize) {
        let len = self.buf.as_ref().len() + n;
        self.buf.set_len(len);
    }
}

#[derive(Debug, Default)]
pub(super) struct Rx {
    /// Undecoded input (ring mode) or the PDU being assembled (direct mode) unless it is placed in
    /// a pooled buffer.
    pub(super) buf: BytesMut,
    /// Ring mode: a long PDU arriving over several receive buffers, kept as slices of them (and,
    /// once started, everything received after it, in order). Decoded before `buf`.
    pub(super) chain: BytesChain,
    pub(super) mode: RxMode,
    /// A receive is in flight (the multishot one, or a direct one).
    pub(super) armed: bool,
    /// Input waits undecoded because the send queue is over its limit.
    pub(super) held: bool,
    /// Ring mode: the receive was cancelled because the peer does not read its responses.
    pub(super) paused: bool,
    /// Ring mode: the receive ended because every receive buffer was out; armed again when some
    /// come back.
    pub(super) starved: bool,
}

impl Rx {
    /// Gives back the reassembly buffer if no partial PDU is in it (an idle connection holds no
    /// receive memory: receive buffers come from the worker's ring).
    pub(super) fn release_idle(&mut self) {
        if self.buf.is_empty() && self.chain.is_empty() && matches!(self.mode, RxMode::Ring) {
            self.buf = BytesMut::new();
        }
    }

    /// Starts direct mode with whatever ring mode left in [`Rx::buf`]: at most one partial PDU, copied
    /// once into the placed buffer. If a whole PDU is waiting (or the header is not one to place), the
    /// connection stays in ring mode ([`DirectStep::Fallback`]).
    pub(super) fn start_direct(&mut self, align: usize, max_pdu: usize, pool: Arc<ReadPool>) -> DirectStep {
        let plen = pdu_len(&self.buf);
        if plen.is_some_and(|plen| self.buf.len() >= plen || !(CH_LEN..=max_pdu).contains(&plen)) {
            self.mode = RxMode::Ring;
            return DirectStep::Fallback;
        }
        let leftover = std::mem::take(&mut self.buf);
        let mut d = Box::new(Direct {
            align,
            pool,
            ch: [0; CH_LEN],
            ch_len: 0,
            plen: 0,
            data: false,
            ready: false,
            placed: None,
        });
        let n = leftover.len().min(CH_LEN);
        if let (Some(dst), Some(src)) = (d.ch.get_mut(..n), leftover.get(..n)) {
            dst.copy_from_slice(src);
        }
        d.ch_len = n;
        self.mode = RxMode::Direct(d);
        if n < CH_LEN {
            return DirectStep::More;
        }
        if self.place(max_pdu) == DirectStep::Pdu {
            return DirectStep::Pdu;
        }
        // The rest of the partial PDU ring mode had received (a one-time copy at the switch; it is
        // shorter than the PDU, so it fits where the PDU goes).
        let rest = leftover.get(CH_LEN..).unwrap_or_default();
        let RxMode::Direct(d) = &mut self.mode else { return DirectStep::More };
        match &mut d.placed {
            Some(p) => {
                if let Some(dst) = p.room(rest.len()) {
                    dst.copy_from_slice(rest);
                    p.grow(rest.len());
                }
            }
            None => self.buf.extend_from_slice(rest),
        }
        self.after_body()
    }

    /// Where the next direct-mode receive writes, and how many bytes it may take.
    pub(super) fn direct_target(&mut self) -> Option<(*mut u8, usize)> {
        let RxMode::Direct(d) = &mut self.mode else { return None };
        if d.plen == 0 {
            let rest = d.ch.get_mut(d.ch_len..)?;
            return Some((rest.as_mut_ptr(), rest.len()));
        }
        // The rest of this PDU and the next common header (a short read is fine).
        if let Some(p) = &mut d.placed {
            let want = (d.plen + CH_LEN).saturating_sub(p.received().len());
            let room = p.room(want)?;
            return (want > 0).then_some((room.as_mut_ptr(), want));
        }
        let want = (d.plen + CH_LEN).saturating_sub(self.buf.len());
        let spare = self.buf.spare_capacity_mut();
        (spare.len() >= want && want > 0).then(|| (spare.as_mut_ptr().cast::<u8>(), want))
    }

    /// A direct-mode receive wrote `n` (> 0) bytes where [`Rx::direct_target`] said.
    ///
    /// # Safety
    /// The kernel must have written `n` bytes at the target [`Rx::direct_target`] returned, and
    /// nothing may have touched [`Rx::buf`] since.
    pub(super) unsafe fn direct_received(&mut self, n: usize, max_pdu: usize) -> DirectStep {
        let RxMode::Direct(d) = &mut self.mode else { return DirectStep::More };
        if d.plen == 0 {
            d.ch_len = (d.ch_len + n).min(CH_LEN);
            if d.ch_len < CH_LEN {
                return DirectStep::More;
            }
            return self.place(max_pdu);
        }
        if let Some(p) = &mut d.placed {
            p.grow(n);
            return self.after_body();
        }
        let len = (self.buf.len() + n).min(self.buf.capacity());
        // SAFETY: the caller guarantees the kernel initialised these `n` bytes of spare capacity
        // right after the current length (and `len` is capped by the capacity).
        unsafe { self.buf.set_len(len) };
        self.after_body()
    }

    /// After bytes of a PDU body arrived: the PDU is whole (the next common header's bytes moved
    /// out of the buffer), or more is needed.
    fn after_body(&mut self) -> DirectStep {
        let RxMode::Direct(d) = &mut self.mode else { return DirectStep::More };
        let pdu = d.placed.as_ref().map_or(&self.buf[..], Placed::received);
        if pdu.len() < d.plen {
            return DirectStep::More;
        }
        let extra = pdu.get(d.plen..).unwrap_or_default();
        d.ch_len = extra.len().min(CH_LEN);
        if let (Some(dst), Some(src)) = (d.ch.get_mut(..d.ch_len), extra.get(..d.ch_len)) {
            dst.copy_from_slice(src);
        }
        match &mut d.placed {
            Some(p) => p.buf.set_len(p.start + d.plen),
            None => self.buf.truncate(d.plen),
        }
        d.ready = true;
        DirectStep::Pdu
    }

    /// After the PDU in [`Rx::buf`] was decoded: set up the next one.
    pub(super) fn direct_next(&mut self, max_pdu: usize) -> DirectStep {
        let RxMode::Direct(d) = &mut self.mode else { return DirectStep::More };
        d.plen = 0;
        d.ready = false;
        if d.ch_len < CH_LEN {
            return DirectStep::More;
        }
        self.place(max_pdu)
    }

    /// A whole common header is in `ch`: make room for its PDU so that the data lands aligned, and
    /// put the header in front. Headers with a length out of bounds go back to ring mode.
    fn place(&mut self, max_pdu: usize) -> DirectStep {
        let RxMode::Direct(d) = &mut self.mode else { return DirectStep::More };
        let plen = u32::from_le_bytes([d.ch[4], d.ch[5], d.ch[6], d.ch[7]]) as usize;
        if !(CH_LEN..=max_pdu).contains(&plen) {
            self.buf = BytesMut::from(&d.ch[..]);
            self.mode = RxMode::Ring;
            return DirectStep::Fallback;
        }
        // Data offset (PDO) if the PDU has data; headers without data need no placement.
        let pdo = usize::from(d.ch[3]);
        let data_at = if pdo >= CH_LEN && pdo < plen { pdo } else { 0 };
        let align = if data_at > 0 { d.align } else { 1 };
        d.plen = plen;
        d.data = data_at > 0;
        d.ch_len = 0;
        self.buf.clear();
        d.placed = None;
        // A small PDU with data goes into a pooled buffer (4096-aligned, so padding the header to
        // the device's alignment aligns the data), which goes back to the pool after the write.
        let pad = (align - data_at % align) % align;
        let need = pad + plen + CH_LEN;
        if data_at > 0 && align <= MIN_CLASS && need <= POOLED_PDU_MAX {
            if let Some(mut buf) = d.pool.take_kept(need) {
                if let Some(dst) = buf.as_mut_full().get_mut(pad..pad + CH_LEN) {
                    dst.copy_from_slice(&d.ch);
                    buf.set_len(pad + CH_LEN);
                    d.placed = Some(Placed { buf, start: pad });
                    d.ready = plen == CH_LEN;
                    return if d.ready { DirectStep::Pdu } else { DirectStep::More };
                }
            }
        }
        // A buffer of our own per PDU with data (the data leaves with it); a data-less PDU reuses it.
        self.buf.reserve(plen + CH_LEN + align);
        let base = self.buf.as_ptr() as usize;
        let pad = (align - (base + data_at) % align) % align;
        self.buf.resize(pad, 0);
        self.buf.advance(pad);
        self.buf.extend_from_slice(&d.ch);
        d.ready = plen == CH_LEN;
        if d.ready {
            return DirectStep::Pdu;
        }
        DirectStep::More
    }

    /// The bytes received and not decoded yet, in stream order (a handover carries them to the
    /// process that takes the connection over). `None` while leaving ring mode (the receive that
    /// ends it may still add bytes).
    pub(super) fn unread(&self) -> Option<Vec<u8>> {
        match &self.mode {
            RxMode::Switching { .. } => None,
            RxMode::Ring => {
                let mut out = vec![0; self.chain.total()];
                nvmeof_proto::PduInput::peek_at(&self.chain, 0, &mut out);
                out.extend_from_slice(&self.buf);
                Some(out)
            }
            // A common header being read, or a PDU being assembled (its header is at the front).
            RxMode::Direct(d) if d.plen == 0 => Some(d.ch.get(..d.ch_len).unwrap_or_default().to_vec()),
            RxMode::Direct(d) => Some(d.placed.as_ref().map_or(&self.buf[..], Placed::received).to_vec()),
        }
    }

    /// Direct mode, and the PDU in [`Rx::buf`] carries data: its buffer must go with the PDU. A
    /// PDU without data (a read's command capsule, say) is decoded from the buffer, which stays for
    /// the next PDU.
    pub(super) fn direct_pdu_has_data(&self) -> bool {
        matches!(&self.mode, RxMode::Direct(d) if d.data)
    }

    /// Direct mode, a whole PDU with data is in ([`DirectStep::Pdu`]): takes it, with the memory it
    /// is in (a pooled buffer goes back to the pool when the last slice of it is dropped).
    pub(super) fn take_data_pdu(&mut self) -> Bytes {
        let placed = match &mut self.mode {
            RxMode::Direct(d) => d.placed.take(),
            _ => None,
        };
        match placed {
            Some(Placed { buf, start }) => {
                let mut pdu = Bytes::from_owner(buf);
                pdu.advance(start);
                pdu
            }
            None => std::mem::take(&mut self.buf).freeze(),
        }
    }

    /// Input waits to be decoded: in ring mode any bytes (the decoder takes whole PDUs and leaves
    /// a partial one); in direct mode only a whole PDU (a partial one may be in a receive's buffer).
    pub(super) fn has_input(&self) -> bool {
        match &self.mode {
            RxMode::Direct(d) => d.ready,
            _ => !self.buf.is_empty() || !self.chain.is_empty(),
        }
    }

    /// True while direct mode waits for a common header with nothing of a PDU received.
    pub(super) fn is_direct(&self) -> bool {
        matches!(self.mode, RxMode::Direct(_))
    }
}

/// The send queue.
#[derive(Default)]
pub(super) struct Tx {
    queued: VecDeque<EncodedPdu>,
    /// Bytes in `queued` and `sending` not written yet.
    pub(super) queued_bytes: usize,
    /// PDUs of the `writev` in flight, and its iovecs (both must stay put until it completes).
    sending: Vec<EncodedPdu>,
    iov: Vec<libc::iovec>,
    /// Bytes of `sending` already written by earlier partial writes.
    sent: usize,
    /// A `writev` is in flight.
    pub(super) inflight: bool,
}

impl Tx {
    /// Gives back the queue's vectors if nothing is queued or being sent (an idle connection holds
    /// no send memory).
    pub(super) fn release_idle(&mut self) {
        if self.is_empty() {
            self.queued = VecDeque::new();
            self.sending = Vec::new();
            self.iov = Vec::new();
        }
    }

    pub(super) fn push(&mut self, pdu: EncodedPdu) {
        self.queued_bytes += pdu.len();
        self.queued.push_back(pdu);
    }

    /// PDUs queued or being sent.
    pub(super) fn pdus(&self) -> usize {
        self.queued.len() + self.sending.len()
    }

    /// Nothing queued, nothing being sent.
    pub(super) fn is_empty(&self) -> bool {
        !self.inflight && self.sending.is_empty() && self.queued.is_empty()
    }

    /// Something waits to be sent and no `writev` is in flight.
    pub(super) fn ready(&self) -> bool {
        !self.inflight && (!self.sending.is_empty() || !self.queued.is_empty())
    }

    /// The iovecs of the next `writev`: as many queued PDUs as fit (after what partial writes left).
    /// Marks the write in flight. The pointers stay valid until [`Tx::complete`] or [`Tx::fail`].
    pub(super) fn prepare(&mut self) -> Option<(*const libc::iovec, u32)> {
        if self.inflight {
            return None;
        }
        if self.sending.is_empty() {
            let mut iovecs = 0;
            while let Some(p) = self.queued.front() {
                let n = p.chunk_count();
                if self.sending.len() >= MAX_PDUS_PER_SEND
                    || (iovecs + n > MAX_IOVECS && !self.sending.is_empty())
                {
                    break;
                }
                iovecs += n;
                if let Some(p) = self.queued.pop_front() {
                    self.sending.push(p);
                }
            }
            self.sent = 0;
        }
        if self.sending.is_empty() {
            return None;
        }
        self.iov.clear();
        let mut skip = self.sent;
        for pdu in &self.sending {
            for chunk in pdu.chunks() {
                if skip >= chunk.len() {
                    skip -= chunk.len();
                    continue;
                }
                let rest = chunk.get(skip..).unwrap_or_default();
                skip = 0;
                self.iov
                    .push(libc::iovec { iov_base: rest.as_ptr() as *mut libc::c_void, iov_len: rest.len() });
            }
        }
        self.inflight = true;
        Some((self.iov.as_ptr(), self.iov.len() as u32))
    }

    /// The `writev` in flight wrote `written` bytes.
    pub(super) fn complete(&mut self, written: usize) {
        self.inflight = false;
        self.sent += written;
        let total: usize = self.sending.iter().map(EncodedPdu::len).sum();
        if self.sent >= total {
            self.sending.clear();
            self.sent = 0;
            self.queued_bytes = self.queued_bytes.saturating_sub(total);
        }
    }

    /// The socket failed: drop everything.
    pub(super) fn fail(&mut self) {
        self.inflight = false;
        self.sending.clear();
        self.queued.clear();
        self.queued_bytes = 0;
        self.sent = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(pdu_type: u8, pdo: u8, plen: u32) -> [u8; 8] {
        let p = plen.to_le_bytes();
        [pdu_type, 0, 72, pdo, p[0], p[1], p[2], p[3]]
    }

    /// Plays the kernel: writes `bytes` where the receive state says, as several short reads.
    fn receive(rx: &mut Rx, mut bytes: &[u8], step: usize) -> Vec<Vec<u8>> {
        let mut pdus = Vec::new();
        while !bytes.is_empty() {
            let (ptr, room) = rx.direct_target().expect("a target");
            let n = room.min(step).min(bytes.len());
            // SAFETY: `ptr` has room for `room` ≥ n bytes (the receive state's promise).
            unsafe { std::ptr::copy_nonoverlapping(bytes.as_ptr(), ptr, n) };
            bytes = &bytes[n..];
            // SAFETY: n bytes were just written at the target.
            let mut step_now = unsafe { rx.direct_received(n, 1 << 20) };
            while step_now == DirectStep::Pdu {
                if rx.direct_pdu_has_data() {
                    pdus.push(rx.take_data_pdu().to_vec());
                } else {
                    pdus.push(rx.buf.to_vec());
                }
                rx.buf.clear();
                step_now = rx.direct_next(1 << 20);
            }
            assert_ne!(step_now, DirectStep::Fallback);
        }
        pdus
    }

    fn pool() -> Arc<ReadPool> {
        Arc::new(ReadPool::default())
    }

    fn placed(rx: &Rx) -> Option<&Placed> {
        match &rx.mode {
            RxMode::Direct(d) => d.placed.as_ref(),
            _ => None,
        }
    }

    #[test]
    fn direct_mode_places_each_pdus_data_aligned() {
        for align in [512usize, 4096] {
            let mut rx = Rx::default();
            assert_eq!(rx.start_direct(align, 1 << 20, pool()), DirectStep::More);
            // A capsule with 4 KiB of in-capsule data (PDO 72), a capsule without data, an
            // H2CData with 8 KiB (PDO 24) and one with 64 KiB (too large for the pool), back to back.
            let mut stream = Vec::new();
            let mut expect = Vec::new();
            for (t, pdo, hlen, dlen) in
                [(4u8, 72u8, 72usize, 4096usize), (4, 0, 72, 0), (6, 24, 24, 8192), (6, 24, 24, 65536)]
            {
                let plen = hlen + dlen;
                let mut pdu = header(t, pdo, plen as u32).to_vec();
                pdu.resize(hlen, 0xAA);
                pdu.extend((0..dlen).map(|i| (i % 251) as u8));
                expect.push(pdu.clone());
                stream.extend(pdu);
            }
            for step in [1usize, 7, 100, 1 << 20] {
                let mut rx2 = Rx::default();
                rx2.start_direct(align, 1 << 20, pool());
                let pdus = receive(&mut rx2, &stream, step);
                assert_eq!(pdus, expect, "align {align}, reads of {step} bytes");
            }
            // The data of a PDU with data starts aligned in the buffer handed to the decoder.
            let pdu = &expect[0];
            let (ptr, room) = rx.direct_target().unwrap();
            // SAFETY: room bytes are available at ptr.
            unsafe { std::ptr::copy_nonoverlapping(pdu.as_ptr(), ptr, 8.min(room)) };
            // SAFETY: 8 bytes written.
            assert_eq!(unsafe { rx.direct_received(8, 1 << 20) }, DirectStep::More);
            let (at, _) = rx.direct_target().unwrap();
            assert_eq!((at as usize + 72 - 8) % align, 0, "data lands aligned");
        }
    }

    #[test]
    fn small_data_pdus_are_placed_in_pooled_buffers_that_come_back() {
        let pool = pool();
        let mut rx = Rx::default();
        rx.start_direct(512, 1 << 20, pool.clone());
        let mut pdu = header(4, 72, 72 + 4096).to_vec();
        pdu.resize(72, 3);
        pdu.extend((0..4096).map(|i| (i % 13) as u8));
        let mut stream = pdu.clone();
        stream.extend_from_slice(&pdu);
        let mut taken = Vec::new();
        let mut bytes = &stream[..];
        while !bytes.is_empty() {
            let (ptr, room) = rx.direct_target().unwrap();
            // Short reads: the PDU is assembled over several receives.
            let n = room.min(bytes.len()).min(1000);
            // SAFETY: `ptr` has room for `room` ≥ n bytes.
            unsafe { std::ptr::copy_nonoverlapping(bytes.as_ptr(), ptr, n) };
            bytes = &bytes[n..];
            // SAFETY: n bytes were just written at the target.
            let mut step = unsafe { rx.direct_received(n, 1 << 20) };
            assert_eq!(rx.has_input(), step == DirectStep::Pdu, "only a whole PDU is input to decode");
            while step == DirectStep::Pdu {
                assert!(placed(&rx).is_some(), "a 4 KiB write is placed in a pooled buffer");
                let got = rx.take_data_pdu();
                assert_eq!(&got[..], &pdu[..]);
                assert_eq!((got.as_ptr() as usize + 72) % 512, 0, "its data is aligned");
                taken.push(got);
                rx.buf.clear();
                step = rx.direct_next(1 << 20);
                assert_eq!(rx.has_input(), step == DirectStep::Pdu);
            }
        }
        assert_eq!(taken.len(), 2);
        let (first, second) = (taken[0].as_ptr(), taken[1].as_ptr());
        drop(taken);
        assert_eq!(pool.held(), 2, "both buffers went back to the pool");
        // The next PDU reuses one of them.
        let (ptr, room) = rx.direct_target().unwrap();
        assert_eq!(room, 8, "a common header is read first");
        // SAFETY: 8 bytes of room.
        unsafe { std::ptr::copy_nonoverlapping(pdu.as_ptr(), ptr, 8) };
        // SAFETY: 8 bytes written.
        assert_eq!(unsafe { rx.direct_received(8, 1 << 20) }, DirectStep::More);
        assert_eq!(pool.held(), 1, "the next PDU took a buffer from the pool");
        let p = placed(&rx).unwrap();
        let reused = p.received().as_ptr();
        assert!(reused == first || reused == second, "one of the two buffers came back");
    }

    #[test]
    fn a_partial_pdu_from_ring_mode_carries_over_and_bad_lengths_fall_back() {
        let mut pdu = header(4, 72, 72 + 512).to_vec();
        pdu.resize(72, 1);
        pdu.extend([9u8; 512]);
        let mut rx = Rx::default();
        rx.buf.extend_from_slice(&pdu[..100]);
        assert_eq!(rx.start_direct(512, 1 << 20, pool()), DirectStep::More);
        assert!(placed(&rx).is_some(), "the rest of the PDU goes into a pooled buffer");
        let pdus = receive(&mut rx, &pdu[100..], 1 << 20);
        assert_eq!(pdus, vec![pdu.clone()]);

        let mut rx = Rx::default();
        rx.start_direct(512, 4096, pool());
        let bad = header(4, 72, 1 << 30);
        let (ptr, _) = rx.direct_target().unwrap();
        // SAFETY: the header target has room for 8 bytes.
        unsafe { std::ptr::copy_nonoverlapping(bad.as_ptr(), ptr, 8) };
        // SAFETY: 8 bytes written.
        assert_eq!(unsafe { rx.direct_received(8, 4096) }, DirectStep::Fallback);
        assert!(matches!(rx.mode, RxMode::Ring));
        assert_eq!(&rx.buf[..], &bad[..], "the header is kept for the decoder to reject");
    }
}
