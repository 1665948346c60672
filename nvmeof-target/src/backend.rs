//! Block backends: what a namespace reads from and writes to.
//!
//! The engine never performs I/O. It emits [`IoRequest`](crate::IoRequest)s; the driver carries them
//! out and hands the results back with [`Connection::complete_io`](crate::Connection::complete_io).
//! A [`BlockBackend`] supports three ways of doing that:
//!
//! 1. **Immediate completion** — [`BlockBackend::submit`] returns [`Submitted::Done`] (memory).
//! 2. **Asynchronous completion from another context** — `submit` keeps the [`Completer`], returns
//!    [`Submitted::Pending`] and calls [`Completer::complete`] later, from any thread.
//! 3. **Driver-executed I/O on a file descriptor** — [`BlockBackend::raw_device`] tells the driver where
//!    the bytes live (fd + offset), and a driver with its own io_uring runs the read/write with the PDU's
//!    buffers directly (no copy between socket and disk). Such backends still implement `submit`
//!    (blocking) for drivers without a ring.

use crate::chunk_map::{Chunk, ChunkMap, CHUNK};
use std::fmt;
use std::fs::File;
use std::io;
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use bytes::{Buf, Bytes, BytesMut};
use nvmeof_proto::nvme::Status;
use nvmeof_proto::Payload;
use parking_lot::Mutex;
use smallvec::SmallVec;

/// A byte range of a volume.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ByteRange {
    /// Offset of the first byte.
    pub offset: u64,
    /// Number of bytes.
    pub len: u64,
}

/// One operation on a volume, in bytes (the engine has already converted LBAs and checked bounds).
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum IoOp {
    /// Read `len` bytes at `offset`; complete with [`IoOutput::Data`].
    Read {
        /// Byte offset.
        offset: u64,
        /// Byte count.
        len: u32,
    },
    /// Write `data` at `offset`. With `fua`, the data must be durable when the write completes.
    Write {
        /// Byte offset.
        offset: u64,
        /// The data: slices of the receive buffers, in order.
        data: Payload,
        /// Force Unit Access.
        fua: bool,
    },
    /// Make every completed write durable.
    Flush,
    /// Make `len` bytes at `offset` read as zeros; with `deallocate`, the space may be given back.
    WriteZeroes {
        /// Byte offset.
        offset: u64,
        /// Byte count.
        len: u64,
        /// The host allows deallocation (thin volumes release the space).
        deallocate: bool,
    },
    /// Deallocate ranges (Dataset Management with AD): the space is given back; the ranges read as
    /// zeros afterwards.
    Discard {
        /// The ranges.
        ranges: SmallVec<[ByteRange; 1]>,
    },
}

impl IoOp {
    /// Bytes the operation reads or writes (for statistics).
    #[must_use]
    pub fn data_len(&self) -> u64 {
        match self {
            Self::Read { len, .. } => u64::from(*len),
            Self::Write { data, .. } => data.len() as u64,
            Self::Flush | Self::WriteZeroes { .. } | Self::Discard { .. } => 0,
        }
    }
}

/// What a successful operation returns.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum IoOutput {
    /// Nothing (writes, flushes, …).
    Done,
    /// The data of a read, exactly the requested length.
    Data(Payload),
}

/// Why a backend operation failed; turned into an NVMe status for the host.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum IoError {
    /// The device failed the operation.
    #[error("I/O error: {0}")]
    Io(#[from] io::Error),
    /// The backend has no space left (a thin volume whose pool is full).
    #[error("no space left on the backing store")]
    NoSpace,
    /// The backend does not support the operation.
    #[error("operation not supported by the backend")]
    Unsupported,
    /// The operation addresses bytes beyond the volume.
    #[error("out of range: {offset}+{len} beyond {size}")]
    OutOfRange {
        /// Offset asked for.
        offset: u64,
        /// Length asked for.
        len: u64,
        /// Size of the volume.
        size: u64,
    },
    /// A read returned fewer bytes than asked (truncated backing file).
    #[error("short read: {got} of {want} bytes")]
    ShortRead {
        /// Bytes asked for.
        want: u64,
        /// Bytes returned.
        got: u64,
    },
}

impl IoError {
    /// The NVMe status the host sees for this error, given whether the operation was a read.
    #[must_use]
    pub fn status(&self, is_read: bool) -> Status {
        match self {
            Self::NoSpace => Status::CAPACITY_EXCEEDED.with_dnr(),
            Self::Unsupported => Status::INVALID_OPCODE.with_dnr(),
            Self::OutOfRange { .. } => Status::LBA_OUT_OF_RANGE.with_dnr(),
            Self::Io(e) if e.raw_os_error() == Some(rustix::io::Errno::NOSPC.raw_os_error()) => {
                Status::CAPACITY_EXCEEDED.with_dnr()
            }
            Self::Io(e) if e.raw_os_error() == Some(rustix::io::Errno::ROFS.raw_os_error()) => {
                Status::WRITE_TO_READ_ONLY_RANGE.with_dnr()
            }
            Self::Io(_) | Self::ShortRead { .. } => {
                if is_read {
                    Status::UNRECOVERED_READ_ERROR
                } else {
                    Status::WRITE_FAULT
                }
            }
        }
    }
}

/// Result of a backend operation.
pub type IoResult = Result<IoOutput, IoError>;

/// Identifies one I/O request of one connection; hand it back with the result.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct IoToken(pub(crate) u64);

impl IoToken {
    /// The token's raw value (for drivers that need to store it, e.g. as io_uring user data).
    #[must_use]
    pub const fn to_raw(self) -> u64 {
        self.0
    }

    /// Rebuilds a token from [`IoToken::to_raw`].
    #[must_use]
    pub const fn from_raw(raw: u64) -> Self {
        Self(raw)
    }
}

/// Where completions of asynchronously completing backends go: implemented by the driver (e.g. push
/// onto the worker's queue and wake its event loop).
pub trait CompletionSink: Send + Sync {
    /// Delivers the result of the request identified by `token`.
    fn complete(&self, token: IoToken, result: IoResult);
}

/// The handle an asynchronous backend keeps to report a result later, from any thread.
#[must_use = "a pending request must be completed, or the host's command never finishes"]
pub struct Completer {
    token: IoToken,
    sink: Arc<dyn CompletionSink>,
}

impl Completer {
    /// A completer that reports to `sink`.
    pub fn new(token: IoToken, sink: Arc<dyn CompletionSink>) -> Self {
        Self { token, sink }
    }

    /// The request's token.
    #[must_use]
    pub fn token(&self) -> IoToken {
        self.token
    }

    /// Reports the result.
    pub fn complete(self, result: IoResult) {
        self.sink.complete(self.token, result);
    }
}

impl fmt::Debug for Completer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Completer").field("token", &self.token).finish_non_exhaustive()
    }
}

/// What [`BlockBackend::submit`] did with a request.
#[derive(Debug)]
#[must_use]
pub enum Submitted {
    /// Finished already; the completer was dropped.
    Done(IoResult),
    /// Will finish later through the [`Completer`].
    Pending,
}

/// A file descriptor a driver may run I/O on directly (see [`BlockBackend::raw_device`]), with what
/// the device can do, so that a driver knows where an operation can run without trying it first.
///
/// ```
/// # use std::os::fd::AsFd;
/// # let file = std::fs::File::open("/dev/null").unwrap();
/// use nvmeof_target::RawDevice;
/// let dev = RawDevice::new(file.as_fd()).direct(4096).punch_hole(true);
/// assert!(dev.direct && !dev.zero_range);
/// ```
#[derive(Clone, Copy, Debug)]
#[non_exhaustive]
pub struct RawDevice<'a> {
    /// The open device or file.
    pub fd: BorrowedFd<'a>,
    /// Byte offset of the volume's first byte within the file.
    pub base_offset: u64,
    /// The fd was opened with `O_DIRECT`: buffers and offsets must be aligned to `alignment`.
    pub direct: bool,
    /// Required alignment of buffers, offsets and lengths for direct I/O.
    pub alignment: u32,
    /// `fallocate(FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE)` works on the descriptor: deallocate
    /// (and Write Zeroes with DEAC) can run as that. Otherwise the backend's own
    /// [`BlockBackend::submit`] does it (writing zeros, an ioctl discard).
    pub punch_hole: bool,
    /// `fallocate(FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE)` works on the descriptor: Write Zeroes
    /// can run as that. Otherwise the backend's own [`BlockBackend::submit`] does it.
    pub zero_range: bool,
    /// The descriptor is a block device whose discard of whole blocks of this many bytes (counted
    /// from the start of the device) makes them read as zeros, as a zvol's does (`volblocksize`);
    /// partial blocks are left untouched by a discard and must be zeroed. A driver may then run
    /// deallocate (and Write Zeroes with DEAC, where `punch_hole` is not declared) as a discard of the
    /// whole blocks plus zero writes of the partial head and tail. `None`: no such promise (the
    /// backend's own [`BlockBackend::submit`] deallocates).
    pub discard_granularity: Option<u64>,
}

impl<'a> RawDevice<'a> {
    /// A buffered descriptor (no `O_DIRECT`), volume at offset 0, no `fallocate` modes and no
    /// discard granularity declared.
    #[must_use]
    pub fn new(fd: BorrowedFd<'a>) -> Self {
        Self {
            fd,
            base_offset: 0,
            direct: false,
            alignment: 1,
            punch_hole: false,
            zero_range: false,
            discard_granularity: None,
        }
    }

    /// The volume starts `offset` bytes into the file.
    #[must_use]
    pub fn base_offset(mut self, offset: u64) -> Self {
        self.base_offset = offset;
        self
    }

    /// The descriptor was opened `O_DIRECT`: buffers, offsets and lengths must be multiples of
    /// `alignment` (the logical block size).
    #[must_use]
    pub fn direct(mut self, alignment: u32) -> Self {
        self.direct = true;
        self.alignment = alignment.max(1);
        self
    }

    /// Whether `FALLOC_FL_PUNCH_HOLE` works on the descriptor.
    #[must_use]
    pub fn punch_hole(mut self, supported: bool) -> Self {
        self.punch_hole = supported;
        self
    }

    /// Whether `FALLOC_FL_ZERO_RANGE` works on the descriptor.
    #[must_use]
    pub fn zero_range(mut self, supported: bool) -> Self {
        self.zero_range = supported;
        self
    }

    /// Declares that discarding whole blocks of `granularity` bytes makes them read as zeros (see
    /// the field of the same name); `None` or `Some(0)` declares nothing.
    #[must_use]
    pub fn discard_granularity(mut self, granularity: Option<u64>) -> Self {
        self.discard_granularity = granularity.filter(|&g| g > 0);
        self
    }
}

/// Static facts about a backend that the engine turns into Identify data.
///
/// Made with [`BackendInfo::new`] and its `with_*` methods outside this crate (fields may be added).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct BackendInfo {
    /// Logical block size exposed to the host (512 or 4096).
    pub block_size: u32,
    /// The backend has a volatile write cache: writes are durable only after Flush (or with FUA).
    pub volatile_write_cache: bool,
    /// Deallocate (DSM) frees space.
    pub discard: bool,
    /// Write Zeroes is supported natively (the engine always offers it; a backend without it would be
    /// emulated by writing zeros).
    pub write_zeroes: bool,
}

impl BackendInfo {
    /// A backend with `block_size`-byte blocks, no volatile write cache, no deallocate, and
    /// native Write Zeroes.
    #[must_use]
    pub const fn new(block_size: u32) -> Self {
        Self { block_size, volatile_write_cache: false, discard: false, write_zeroes: true }
    }

    /// Sets [`BackendInfo::volatile_write_cache`].
    #[must_use]
    pub const fn with_volatile_write_cache(mut self, volatile: bool) -> Self {
        self.volatile_write_cache = volatile;
        self
    }

    /// Sets [`BackendInfo::discard`].
    #[must_use]
    pub const fn with_discard(mut self, discard: bool) -> Self {
        self.discard = discard;
        self
    }

    /// Sets [`BackendInfo::write_zeroes`].
    #[must_use]
    pub const fn with_write_zeroes(mut self, write_zeroes: bool) -> Self {
        self.write_zeroes = write_zeroes;
        self
    }
}

/// A volume behind a namespace.
///
/// Implementations must be thread safe: the admin path (resize) and several I/O queues on different
/// threads use one backend concurrently. Offsets and lengths passed in are within
/// [`BlockBackend::size_bytes`] and multiples of [`BackendInfo::block_size`].
pub trait BlockBackend: Send + Sync + fmt::Debug {
    /// Current size in bytes (a multiple of the block size). It may change at run time (resize).
    fn size_bytes(&self) -> u64;

    /// Block size and capabilities.
    fn info(&self) -> BackendInfo;

    /// Starts `op`. Return [`Submitted::Done`] to complete at once, or keep `completer`, return
    /// [`Submitted::Pending`] and call [`Completer::complete`] later from any thread.
    fn submit(&self, op: IoOp, completer: Completer) -> Submitted;

    /// For file-descriptor backends: the descriptor a driver may execute I/O on itself (io_uring, with
    /// the request's buffers). `None` (the default) for backends that do their own I/O.
    fn raw_device(&self) -> Option<RawDevice<'_>> {
        None
    }

    /// Changes the size (volume resize). Backends that cannot resize return an error.
    fn resize(&self, new_size_bytes: u64) -> io::Result<()> {
        let _ = new_size_bytes;
        Err(io::Error::new(io::ErrorKind::Unsupported, "this backend cannot be resized"))
    }

    /// A hint: requests for these ranges follow shortly (a driver that received a batch of commands
    /// says so before handing them in one by one). A backend whose lookups miss the CPU's caches may
    /// start them now, all at once, instead of one after the other later. The default does nothing.
    fn prefetch(&self, ranges: &[ByteRange]) {
        let _ = ranges;
    }
}

fn check_range(offset: u64, len: u64, size: u64) -> Result<(), IoError> {
    match offset.checked_add(len) {
        Some(end) if end <= size => Ok(()),
        _ => Err(IoError::OutOfRange { offset, len, size }),
    }
}

// ---------------------------------------------------------------------------------------------------
// MemoryBackend
// ---------------------------------------------------------------------------------------------------

/// Bytes `at..at + n` of `data` if one of its segments holds them all.
fn contiguous(data: &Payload, mut at: usize, n: usize) -> Option<&[u8]> {
    for seg in data.segments() {
        if at < seg.len() {
            return seg.get(at..at + n);
        }
        at -= seg.len();
    }
    None
}

/// Copies `dst.len()` bytes of `data` from `at` on into `dst`, across segments.
fn copy_out(data: &Payload, mut at: usize, dst: &mut [u8]) {
    let mut done = 0;
    for seg in data.segments() {
        if done == dst.len() {
            break;
        }
        if at >= seg.len() {
            at -= seg.len();
            continue;
        }
        let n = (seg.len() - at).min(dst.len() - done);
        if let (Some(d), Some(s)) = (dst.get_mut(done..done + n), seg.get(at..at + n)) {
            d.copy_from_slice(s);
        }
        done += n;
        at = 0;
    }
}

/// Reads of at least this many bytes hand out references to the chunks instead of copying them.
const ZERO_COPY_READ: usize = 32 * 1024;

/// A chunk's memory owned by a `Bytes` handed to a reader.
///
/// The box inside the `Arc` is the chunk's own allocation: sharing moves it in without a copy, and
/// `Arc::try_unwrap` gives it back for an in-place overwrite once the readers are done.
#[allow(clippy::redundant_allocation)]
struct SharedChunk(Arc<Box<[u8; CHUNK]>>);

impl AsRef<[u8]> for SharedChunk {
    fn as_ref(&self) -> &[u8] {
        &self.0[..]
    }
}

/// Writes of at least this many bytes are *streaming* writes: their whole chunks are copied with
/// the volume's [`StreamCopy`], if it has one.
const STREAM_WRITE: usize = 32 * 1024;

/// Copies the 4 KiB of a whole chunk of a streaming write (one of at least 32 KiB) into the chunk's
/// memory: `dst` is the chunk, `src` the written data. See [`MemoryBackend::with_stream_copy`].
pub type StreamCopy = fn(dst: &mut [u8; 4096], src: &[u8; 4096]);

/// 4 KiB of zeros: what unwritten chunks read as.
static ZERO_CHUNK: [u8; CHUNK] = [0; CHUNK];

/// A thin volume in memory: only written 4 KiB chunks take memory; unwritten and deallocated ranges
/// read as zeros. Volatile (for tests and scale runs). Completes every request immediately.
///
/// Chunks are reference-counted and shared with snapshots and clones: a write changes a chunk in
/// place when nothing else holds it, and writes a new chunk when a snapshot still holds the old
/// one. A read copies the bytes out into one buffer; a write copies its data in.
#[derive(Debug)]
pub struct MemoryBackend {
    block_size: u32,
    size: AtomicU64,
    chunks: Mutex<ChunkMap>,
    stream_copy: Option<StreamCopy>,
}

impl MemoryBackend {
    /// A volume of `size_bytes` (rounded down to the block size) with 512- or 4096-byte blocks.
    ///
    /// A block size other than 512 or 4096 is replaced by 512.
    #[must_use]
    pub fn new(size_bytes: u64, block_size: u32) -> Self {
        let block_size = if block_size == 4096 { 4096 } else { 512 };
        Self {
            block_size,
            size: AtomicU64::new(size_bytes - size_bytes % u64::from(block_size)),
            chunks: Mutex::new(ChunkMap::default()),
            stream_copy: None,
        }
    }

    /// Copies the whole chunks of streaming writes (at least 32 KiB) with `copy` instead of an
    /// ordinary copy. A large sequential write goes to memory that has not been touched for a while
    /// (a volume larger than the caches): an ordinary copy first reads every destination line into
    /// the cache, and a copy with non-temporal stores (which this crate, free of `unsafe`, does not
    /// provide; the `xatastor-core` server passes one) writes them without reading them and leaves
    /// the caches to the data being worked on. Snapshots and clones of the volume keep the setting.
    /// Short writes and partial chunks are always copied the ordinary way.
    #[must_use]
    pub fn with_stream_copy(mut self, copy: StreamCopy) -> Self {
        self.stream_copy = Some(copy);
        self
    }

    /// Bytes of memory holding data (allocated chunks × 4 KiB).
    #[must_use]
    pub fn allocated_bytes(&self) -> u64 {
        self.chunks.lock().len() as u64 * CHUNK as u64
    }

    /// A copy-on-write copy of this volume (a snapshot, or a clone of one): same size and block size,
    /// sharing every chunk with `self` until one of the two writes it. Chunks are reference-counted
    /// [`Bytes`] (a shared one is never changed in place), so this copies the chunk map (a slot per
    /// written chunk), never the data.
    #[must_use]
    pub fn duplicate(&self) -> MemoryBackend {
        let mut chunks = self.chunks.lock();
        self.copy_of(&mut chunks)
    }

    /// [`MemoryBackend::duplicate`] of several volumes at one point in time: each is copied under its
    /// chunk-map lock, taken in address order (so concurrent calls cannot deadlock) and held until the
    /// last copy is made, so the copies are what all volumes held at that moment: a copy that has a
    /// write has every write completed before it, on any of the volumes. Returns the copies in the
    /// order of `volumes` (a volume listed twice is copied twice).
    #[must_use]
    pub fn duplicate_all(volumes: &[&MemoryBackend]) -> Vec<MemoryBackend> {
        let addr = |v: &MemoryBackend| std::ptr::from_ref(v) as usize;
        let mut order: Vec<(usize, &MemoryBackend)> = volumes.iter().copied().enumerate().collect();
        order.sort_by_key(|&(_, v)| addr(v));
        // Each volume is copied under its lock, and every lock is held until all copies are made: no
        // write can fall between two copies.
        let mut held = Vec::with_capacity(order.len());
        let mut current: Option<(usize, parking_lot::MutexGuard<'_, _>)> = None;
        let mut copies = Vec::with_capacity(order.len());
        for (i, v) in order {
            let mut guard = match current.take() {
                Some((a, guard)) if a == addr(v) => guard,
                previous => {
                    held.extend(previous.map(|(_, guard)| guard));
                    v.chunks.lock()
                }
            };
            copies.push((i, v.copy_of(&mut guard)));
            current = Some((addr(v), guard));
        }
        drop(current);
        drop(held);
        copies.sort_by_key(|&(i, _)| i);
        copies.into_iter().map(|(_, copy)| copy).collect()
    }

    /// A new volume like `self` holding `chunks` (the caller holds `self.chunks`' lock).
    fn copy_of(&self, chunks: &mut ChunkMap) -> MemoryBackend {
        MemoryBackend {
            block_size: self.block_size,
            size: AtomicU64::new(self.size_bytes()),
            chunks: Mutex::new(chunks.share_all()),
            stream_copy: self.stream_copy,
        }
    }

    /// Reads synchronously (also what [`BlockBackend::submit`] does).
    pub fn read(&self, offset: u64, len: u32) -> Result<Bytes, IoError> {
        self.read_payload(offset, len).map(|p| p.to_bytes())
    }

    /// Reads. A short read copies the chunks' bytes into one new buffer (a RAM disk's copy, like
    /// SPDK's malloc bdev): handing out a reference was measured slower at 4 KiB (the reference count
    /// is one more cache miss, and the socket copy then reads cold memory). A long read (from
    /// [`ZERO_COPY_READ`] bytes) hands out references to the chunks instead: the copy it saves is the
    /// larger cost there.
    fn read_payload(&self, offset: u64, len: u32) -> Result<Payload, IoError> {
        check_range(offset, u64::from(len), self.size_bytes())?;
        if len as usize >= ZERO_COPY_READ {
            let mut out = Payload::new();
            let mut chunks = self.chunks.lock();
            self.for_each_piece(offset, u64::from(len), |chunk_no, in_chunk, _, n| {
                out.push(match chunks.share_one(chunk_no) {
                    Some(chunk) => {
                        let mut b = Bytes::from_owner(SharedChunk(chunk));
                        b.advance(in_chunk);
                        b.truncate(n);
                        b
                    }
                    None => Bytes::from_static(ZERO_CHUNK.get(..n).unwrap_or_default()),
                });
            });
            return Ok(out);
        }
        let mut out = Vec::with_capacity(len as usize);
        let chunks = self.chunks.lock();
        self.for_each_piece(offset, u64::from(len), |chunk_no, in_chunk, _, n| {
            let piece = match chunks.get(chunk_no) {
                Some(chunk) => chunk.bytes().get(in_chunk..in_chunk + n),
                None => ZERO_CHUNK.get(..n),
            };
            out.extend_from_slice(piece.unwrap_or_default());
        });
        drop(chunks);
        Ok(Bytes::from(out).into())
    }

    /// Changes chunk `chunk_no` with `f`: in place when nothing else holds it (no read in flight, no
    /// snapshot shares it), else in a copy (zeros if the chunk was never written).
    fn modify_chunk(chunks: &mut ChunkMap, chunk_no: u64, f: impl FnOnce(&mut [u8])) {
        match chunks.make_mut(chunk_no) {
            Some(data) => f(data),
            None => {
                chunks.insert(chunk_no, Chunk::new(&[]));
                if let Some(data) = chunks.make_mut(chunk_no) {
                    f(data);
                }
            }
        }
    }

    /// Writes synchronously.
    pub fn write(&self, offset: u64, data: &Payload) -> Result<(), IoError> {
        check_range(offset, data.len() as u64, self.size_bytes())?;
        let copy = self.stream_copy.filter(|_| data.len() >= STREAM_WRITE);
        let mut chunks = self.chunks.lock();
        self.for_each_piece(offset, data.len() as u64, |chunk_no, in_chunk, at, n| {
            match contiguous(data, at, n).and_then(|src| <&[u8; CHUNK]>::try_from(src).ok()) {
                // A whole chunk in one segment: no need to keep the old bytes.
                Some(src) => chunks.overwrite(chunk_no, src, copy),
                None => Self::modify_chunk(&mut chunks, chunk_no, |c| {
                    if let Some(dst) = c.get_mut(in_chunk..in_chunk + n) {
                        copy_out(data, at, dst);
                    }
                }),
            }
        });
        Ok(())
    }

    /// Zeroes a range, freeing the chunks it covers entirely.
    pub fn zero(&self, offset: u64, len: u64) -> Result<(), IoError> {
        check_range(offset, len, self.size_bytes())?;
        let mut chunks = self.chunks.lock();
        self.for_each_piece(offset, len, |chunk_no, in_chunk, _, n| {
            if n == CHUNK {
                chunks.remove(chunk_no);
            } else if chunks.get(chunk_no).is_some() {
                Self::modify_chunk(&mut chunks, chunk_no, |c| {
                    if let Some(dst) = c.get_mut(in_chunk..in_chunk + n) {
                        dst.fill(0);
                    }
                });
            }
        });
        Ok(())
    }

    /// Calls `f(chunk number, offset in chunk, offset in the request, length)` for each chunk piece.
    fn for_each_piece(&self, offset: u64, len: u64, mut f: impl FnMut(u64, usize, usize, usize)) {
        let mut pos = offset;
        let end = offset + len;
        while pos < end {
            let chunk_no = pos / CHUNK as u64;
            let in_chunk = (pos % CHUNK as u64) as usize;
            let n = (CHUNK - in_chunk).min((end - pos) as usize);
            f(chunk_no, in_chunk, (pos - offset) as usize, n);
            pos += n as u64;
        }
    }

    fn execute(&self, op: IoOp) -> IoResult {
        match op {
            IoOp::Read { offset, len } => self.read_payload(offset, len).map(IoOutput::Data),
            IoOp::Write { offset, data, .. } => self.write(offset, &data).map(|()| IoOutput::Done),
            IoOp::Flush => Ok(IoOutput::Done),
            IoOp::WriteZeroes { offset, len, .. } => self.zero(offset, len).map(|()| IoOutput::Done),
            IoOp::Discard { ranges } => {
                for r in ranges {
                    self.zero(r.offset, r.len)?;
                }
                Ok(IoOutput::Done)
            }
        }
    }
}

impl BlockBackend for MemoryBackend {
    fn size_bytes(&self) -> u64 {
        self.size.load(Ordering::Acquire)
    }

    fn info(&self) -> BackendInfo {
        BackendInfo {
            block_size: self.block_size,
            volatile_write_cache: false,
            discard: true,
            write_zeroes: true,
        }
    }

    fn submit(&self, op: IoOp, completer: Completer) -> Submitted {
        drop(completer);
        Submitted::Done(self.execute(op))
    }

    /// Touches each range's first chunk (its slot in the map and its first bytes) so that the cache
    /// misses of a batch overlap, instead of each request of the batch waiting for its own.
    fn prefetch(&self, ranges: &[ByteRange]) {
        let chunks = self.chunks.lock();
        let mut sum = 0u8;
        for r in ranges.iter().take(256) {
            // One load per range: the map slot and the first line of the data (touching more lines
            // was measured slower: the hardware prefetcher streams the rest once the copy starts).
            if let Some(c) = chunks.get(r.offset / CHUNK as u64) {
                sum =
                    sum.wrapping_add(c.bytes().get((r.offset % CHUNK as u64) as usize).copied().unwrap_or(0));
            }
        }
        std::hint::black_box(sum);
    }

    fn resize(&self, new_size_bytes: u64) -> io::Result<()> {
        let new_size = new_size_bytes - new_size_bytes % u64::from(self.block_size);
        let old = self.size.swap(new_size, Ordering::AcqRel);
        if new_size < old {
            // Shrinking drops the data beyond the end, so growing again reads zeros there.
            let first_gone = new_size.div_ceil(CHUNK as u64);
            self.chunks.lock().truncate(first_gone);
            if new_size % CHUNK as u64 != 0 {
                let mut chunks = self.chunks.lock();
                let last = new_size / CHUNK as u64;
                if chunks.get(last).is_some() {
                    Self::modify_chunk(&mut chunks, last, |c| {
                        if let Some(tail) = c.get_mut((new_size % CHUNK as u64) as usize..) {
                            tail.fill(0);
                        }
                    });
                }
            }
        }
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------------------
// FileBackend
// ---------------------------------------------------------------------------------------------------

/// A volume in a regular file or a block device, with plain positioned reads and writes
/// (`pread`/`pwritev`), `fdatasync` for Flush and FUA, and `fallocate` for Write Zeroes and Deallocate
/// (punching holes gives space back on files and discards on block devices).
///
/// Completes every request synchronously in [`BlockBackend::submit`]; a driver with an io_uring uses
/// [`BlockBackend::raw_device`] instead and runs the same operations on its ring.
#[derive(Debug)]
pub struct FileBackend {
    file: File,
    size: AtomicU64,
    block_size: u32,
    is_block_device: bool,
    fallocate_modes: FallocateModes,
}

/// The `fallocate` modes a file supports, known from its file system (or device type).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct FallocateModes {
    punch_hole: bool,
    zero_range: bool,
}

impl FallocateModes {
    /// What the file system of `file` supports. Block devices (loop, NVMe, SCSI) support both
    /// (the block layer turns them into discard / write-zeroes, emulated where the hardware lacks
    /// them). For regular files, the file systems known to support both: XFS, ext4 (with extents,
    /// as made by mkfs.ext4), btrfs; tmpfs punches holes only. Anything else: neither (the backend's
    /// synchronous path writes zeros, and tries `fallocate` itself).
    fn of(file: &File, is_block_device: bool) -> Self {
        if is_block_device {
            return Self { punch_hole: true, zero_range: true };
        }
        const XFS: i64 = 0x5846_5342;
        const EXT4: i64 = 0xEF53;
        const BTRFS: i64 = 0x9123_683E;
        const TMPFS: i64 = 0x0102_1994;
        // `f_type`'s integer type differs between architectures.
        #[allow(clippy::unnecessary_cast)]
        match rustix::fs::fstatfs(file).map(|s| s.f_type as i64) {
            Ok(XFS | EXT4 | BTRFS) => Self { punch_hole: true, zero_range: true },
            Ok(TMPFS) => Self { punch_hole: true, zero_range: false },
            _ => Self::default(),
        }
    }
}

impl FileBackend {
    /// Opens an existing file or block device read-write. Its size is the file's size (rounded down to
    /// the block size).
    pub fn open(path: impl AsRef<Path>, block_size: u32) -> io::Result<Self> {
        let file = std::fs::OpenOptions::new().read(true).write(true).open(path.as_ref())?;
        Self::from_file(file, block_size)
    }

    /// Creates (or truncates to) a sparse file of `size_bytes`.
    pub fn create(path: impl AsRef<Path>, size_bytes: u64, block_size: u32) -> io::Result<Self> {
        let file =
            std::fs::OpenOptions::new().read(true).write(true).create(true).truncate(true).open(path)?;
        file.set_len(size_bytes)?;
        Self::from_file(file, block_size)
    }

    /// Wraps an open file or block device.
    pub fn from_file(mut file: File, block_size: u32) -> io::Result<Self> {
        use std::io::Seek;
        let block_size = if block_size == 4096 { 4096 } else { 512 };
        let meta = file.metadata()?;
        let is_block_device = std::os::unix::fs::FileTypeExt::is_block_device(&meta.file_type());
        let len = if is_block_device { file.seek(io::SeekFrom::End(0))? } else { meta.len() };
        let fallocate_modes = FallocateModes::of(&file, is_block_device);
        Ok(Self {
            file,
            size: AtomicU64::new(len - len % u64::from(block_size)),
            block_size,
            is_block_device,
            fallocate_modes,
        })
    }

    fn fallocate(&self, flags: rustix::fs::FallocateFlags, offset: u64, len: u64) -> Result<(), IoError> {
        rustix::fs::fallocate(&self.file, flags, offset, len).map_err(|e| IoError::Io(e.into()))
    }

    /// Executes `op` synchronously.
    pub fn execute(&self, op: IoOp) -> IoResult {
        use rustix::fs::FallocateFlags as F;
        let size = self.size_bytes();
        match op {
            IoOp::Read { offset, len } => {
                check_range(offset, u64::from(len), size)?;
                let mut buf = BytesMut::zeroed(len as usize);
                let mut done = 0usize;
                while done < buf.len() {
                    let rest = buf.get_mut(done..).unwrap_or_default();
                    match self.file.read_at(rest, offset + done as u64) {
                        Ok(0) => break,
                        Ok(n) => done += n,
                        Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                        Err(e) => return Err(e.into()),
                    }
                }
                if done < buf.len() && self.is_block_device {
                    return Err(IoError::ShortRead { want: u64::from(len), got: done as u64 });
                }
                // A regular file shorter than the volume reads as zeros past its end (sparse tail).
                Ok(IoOutput::Data(buf.freeze().into()))
            }
            IoOp::Write { offset, data, fua } => {
                check_range(offset, data.len() as u64, size)?;
                let mut pos = offset;
                for seg in data.segments() {
                    let mut rest: &[u8] = seg;
                    while !rest.is_empty() {
                        match self.file.write_at(rest, pos) {
                            Ok(0) => return Err(IoError::Io(io::ErrorKind::WriteZero.into())),
                            Ok(n) => {
                                rest = rest.get(n..).unwrap_or_default();
                                pos += n as u64;
                            }
                            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                            Err(e) => return Err(e.into()),
                        }
                    }
                }
                if fua {
                    self.file.sync_data()?;
                }
                Ok(IoOutput::Done)
            }
            IoOp::Flush => {
                self.file.sync_data()?;
                Ok(IoOutput::Done)
            }
            IoOp::WriteZeroes { offset, len, deallocate } => {
                check_range(offset, len, size)?;
                let flags =
                    if deallocate { F::PUNCH_HOLE | F::KEEP_SIZE } else { F::ZERO_RANGE | F::KEEP_SIZE };
                match self.fallocate(flags, offset, len) {
                    Err(IoError::Io(e))
                        if e.raw_os_error() == Some(rustix::io::Errno::OPNOTSUPP.raw_os_error()) =>
                    {
                        self.write_zeros(offset, len)
                    }
                    other => other.map(|()| IoOutput::Done),
                }
            }
            IoOp::Discard { ranges } => {
                for r in &ranges {
                    check_range(r.offset, r.len, size)?;
                }
                for r in ranges {
                    match self.fallocate(F::PUNCH_HOLE | F::KEEP_SIZE, r.offset, r.len) {
                        // Deallocation is advisory: a filesystem that cannot punch holes just keeps the
                        // data, and the range must still read as zeros (we advertise DLFEAT zeros).
                        Err(IoError::Io(e))
                            if e.raw_os_error() == Some(rustix::io::Errno::OPNOTSUPP.raw_os_error()) =>
                        {
                            self.write_zeros(r.offset, r.len)?;
                        }
                        other => other?,
                    }
                }
                Ok(IoOutput::Done)
            }
        }
    }

    fn write_zeros(&self, offset: u64, len: u64) -> IoResult {
        static ZEROS: [u8; 64 * 1024] = [0; 64 * 1024];
        let mut pos = offset;
        let end = offset + len;
        while pos < end {
            let n = (end - pos).min(ZEROS.len() as u64) as usize;
            self.file.write_all_at(ZEROS.get(..n).unwrap_or_default(), pos)?;
            pos += n as u64;
        }
        Ok(IoOutput::Done)
    }
}

impl BlockBackend for FileBackend {
    fn size_bytes(&self) -> u64 {
        self.size.load(Ordering::Acquire)
    }

    fn info(&self) -> BackendInfo {
        BackendInfo {
            block_size: self.block_size,
            volatile_write_cache: true,
            discard: true,
            write_zeroes: true,
        }
    }

    fn submit(&self, op: IoOp, completer: Completer) -> Submitted {
        drop(completer);
        Submitted::Done(self.execute(op))
    }

    fn raw_device(&self) -> Option<RawDevice<'_>> {
        Some(
            RawDevice::new(self.file.as_fd())
                .punch_hole(self.fallocate_modes.punch_hole)
                .zero_range(self.fallocate_modes.zero_range),
        )
    }

    fn resize(&self, new_size_bytes: u64) -> io::Result<()> {
        let new_size = new_size_bytes - new_size_bytes % u64::from(self.block_size);
        if self.is_block_device {
            return Err(io::Error::new(io::ErrorKind::Unsupported, "a block device is resized by its owner"));
        }
        self.file.set_len(new_size)?;
        self.size.store(new_size, Ordering::Release);
        Ok(())
    }
}

/// Runs `op` on `backend` and waits for the result: for drivers without an event loop (the blocking
/// driver, tests). Backends that complete asynchronously are waited for on a channel.
pub fn execute_blocking(backend: &dyn BlockBackend, op: IoOp) -> IoResult {
    struct Channel(std::sync::mpsc::SyncSender<IoResult>);
    impl CompletionSink for Channel {
        fn complete(&self, _token: IoToken, result: IoResult) {
            let _ = self.0.send(result);
        }
    }
    let (tx, rx) = std::sync::mpsc::sync_channel(1);
    let completer = Completer::new(IoToken(0), Arc::new(Channel(tx)));
    match backend.submit(op, completer) {
        Submitted::Done(r) => r,
        Submitted::Pending => {
            rx.recv().unwrap_or_else(|_| Err(IoError::Io(io::Error::other("backend dropped the request"))))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(b: &dyn BlockBackend, op: IoOp) -> IoOutput {
        execute_blocking(b, op).unwrap()
    }

    fn read(b: &dyn BlockBackend, offset: u64, len: u32) -> Vec<u8> {
        match run(b, IoOp::Read { offset, len }) {
            IoOutput::Data(d) => d.to_bytes().to_vec(),
            IoOutput::Done => panic!("a read returns data"),
        }
    }

    static STREAM_COPIES: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

    fn counting_copy(dst: &mut [u8; 4096], src: &[u8; 4096]) {
        STREAM_COPIES.fetch_add(1, Ordering::Relaxed);
        dst.copy_from_slice(src);
    }

    #[test]
    fn streaming_writes_copy_whole_chunks_with_the_stream_copy_and_clones_keep_it() {
        let b = MemoryBackend::new(1 << 20, 512).with_stream_copy(counting_copy);
        let copies = || STREAM_COPIES.load(Ordering::Relaxed);
        let write = |b: &MemoryBackend, offset: u64, data: Vec<u8>| {
            b.write(offset, &Bytes::from(data).into()).unwrap();
        };
        // Chunks are overwritten in place once written: fill the first 128 KiB.
        write(&b, 0, vec![1; 128 * 1024]);
        let before = copies();
        // A 4 KiB write is not a streaming write.
        write(&b, 4096, vec![2; 4096]);
        assert_eq!(copies(), before);
        // 64 KiB starting 512 bytes into a chunk: 15 whole chunks, and two partial ones copied the
        // ordinary way.
        let data: Vec<u8> = (0..64 * 1024).map(|i| (i % 251) as u8).collect();
        write(&b, 512, data.clone());
        assert_eq!(copies(), before + 15);
        assert_eq!(read(&b, 512, 64 * 1024), data);
        assert_eq!(read(&b, 0, 512), vec![1; 512]);
        // A snapshot keeps the setting; its own chunks are shared until written, then private.
        let snap = b.duplicate();
        write(&snap, 0, vec![3; 64 * 1024]);
        write(&snap, 0, vec![4; 64 * 1024]);
        assert_eq!(copies(), before + 15 + 16, "the second write overwrote 16 private chunks");
        assert_eq!(read(&snap, 0, 4096), vec![4; 4096]);
        assert_eq!(read(&b, 0, 512), vec![1; 512], "the volume keeps its data");
    }

    #[test]
    fn memory_backend_is_thin() {
        let b = MemoryBackend::new(1 << 30, 512);
        assert_eq!(b.allocated_bytes(), 0);
        assert_eq!(read(&b, 123 * 512, 4096), vec![0; 4096], "unwritten reads as zeros");
        let data: Payload =
            [Bytes::from(vec![1u8; 1000]), Bytes::from(vec![2u8; 3096])].into_iter().collect();
        run(&b, IoOp::Write { offset: 10 * 512, data, fua: false });
        assert_eq!(b.allocated_bytes(), 2 * 4096, "a 4 KiB write straddling two chunks");
        let back = read(&b, 10 * 512, 4096);
        assert!(back[..1000].iter().all(|&x| x == 1) && back[1000..].iter().all(|&x| x == 2));
        run(&b, IoOp::Discard { ranges: [ByteRange { offset: 0, len: 64 * 1024 }].into_iter().collect() });
        assert_eq!(b.allocated_bytes(), 0, "deallocate gives the memory back");
        assert!(matches!(
            execute_blocking(&b, IoOp::Read { offset: (1 << 30) - 512, len: 1024 }),
            Err(IoError::OutOfRange { .. })
        ));
    }

    #[test]
    fn memory_backend_resize_drops_data_beyond_the_end() {
        let b = MemoryBackend::new(1 << 20, 512);
        run(&b, IoOp::Write { offset: (1 << 20) - 512, data: vec![9u8; 512].into(), fua: false });
        b.resize(512 * 1024).unwrap();
        assert_eq!(b.size_bytes(), 512 * 1024);
        b.resize(1 << 20).unwrap();
        assert_eq!(read(&b, (1 << 20) - 512, 512), vec![0; 512], "shrink then grow reads zeros");
    }

    #[test]
    fn file_backend_reads_writes_zeroes_and_punches_holes() {
        use std::os::unix::fs::MetadataExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("vol");
        let b = FileBackend::create(&path, 8 << 20, 4096).unwrap();
        assert_eq!(b.info().block_size, 4096);
        assert!(b.raw_device().is_some());
        let blocks_before = std::fs::metadata(&path).unwrap().blocks();
        let data: Vec<u8> = (0..1 << 20).map(|i| (i % 199) as u8 + 1).collect();
        let segs: Payload =
            [Bytes::from(data[..4096].to_vec()), Bytes::from(data[4096..].to_vec())].into_iter().collect();
        run(&b, IoOp::Write { offset: 1 << 20, data: segs, fua: true });
        run(&b, IoOp::Flush);
        assert_eq!(read(&b, 1 << 20, 1 << 20), data);
        let blocks_written = std::fs::metadata(&path).unwrap().blocks();
        assert!(blocks_written > blocks_before);
        run(&b, IoOp::WriteZeroes { offset: 1 << 20, len: 8192, deallocate: false });
        assert_eq!(read(&b, 1 << 20, 8192), vec![0; 8192]);
        run(
            &b,
            IoOp::Discard { ranges: [ByteRange { offset: 1 << 20, len: 1 << 20 }].into_iter().collect() },
        );
        assert_eq!(read(&b, 1 << 20, 1 << 20), vec![0; 1 << 20]);
        let blocks_after = std::fs::metadata(&path).unwrap().blocks();
        assert!(
            blocks_after < blocks_written,
            "punching holes gives space back ({blocks_after} < {blocks_written})"
        );
        b.resize(16 << 20).unwrap();
        assert_eq!(b.size_bytes(), 16 << 20);
        assert_eq!(std::fs::metadata(&path).unwrap().len(), 16 << 20);
    }

    #[test]
    fn io_errors_map_to_nvme_statuses() {
        assert_eq!(IoError::NoSpace.status(false), Status::CAPACITY_EXCEEDED.with_dnr());
        assert_eq!(IoError::Io(io::Error::other("x")).status(true), Status::UNRECOVERED_READ_ERROR);
        assert_eq!(IoError::Io(io::Error::other("x")).status(false), Status::WRITE_FAULT);
        let enospc = io::Error::from_raw_os_error(rustix::io::Errno::NOSPC.raw_os_error());
        assert_eq!(IoError::Io(enospc).status(false), Status::CAPACITY_EXCEEDED.with_dnr());
    }

    #[test]
    fn asynchronous_completion_from_another_thread() {
        #[derive(Debug)]
        struct Later;
        impl BlockBackend for Later {
            fn size_bytes(&self) -> u64 {
                4096
            }
            fn info(&self) -> BackendInfo {
                BackendInfo {
                    block_size: 512,
                    volatile_write_cache: false,
                    discard: false,
                    write_zeroes: false,
                }
            }
            fn submit(&self, _op: IoOp, completer: Completer) -> Submitted {
                std::thread::spawn(move || completer.complete(Ok(IoOutput::Done)));
                Submitted::Pending
            }
        }
        assert!(matches!(execute_blocking(&Later, IoOp::Flush), Ok(IoOutput::Done)));
    }
}
