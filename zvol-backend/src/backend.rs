//! [`ZvolBackend`]: a zvol (or any block device, or a regular file) as a [`BlockBackend`].
//!
//! The device is opened `O_DIRECT`, so reads and writes go straight to the zvol without a second copy
//! in the page cache (ZFS caches in its ARC already). A driver with an io_uring executes reads, writes
//! and flushes itself on the descriptor from [`BlockBackend::raw_device`], and on a zvol deallocation
//! too: the descriptor declares its discard granularity (`volblocksize`), and the driver discards the
//! whole blocks (io_uring's block-device discard command, Linux 6.12+) and writes zeros over the
//! partial head and tail. Everything else — and all operations for drivers without a ring, or on
//! kernels without that command — goes through [`ZvolBackend::execute`], which is synchronous.
//!
//! | NVMe command | how (synchronous path) | zvol effect |
//! | --- | --- | --- |
//! | Read / Write | `pread` / `pwritev` (aligned bounce buffer for unaligned memory) | `zvol_read` / `zvol_write` |
//! | Write with FUA | `pwritev2(RWF_DSYNC)` (fallback: write + `fdatasync`) | the write is committed to the ZIL |
//! | Flush | `fdatasync` | `zil_commit`: every completed write is durable |
//! | Write Zeroes | `fallocate(ZERO_RANGE \| KEEP_SIZE)` (fallback: writing zeros) | zero blocks (holes with compression on) |
//! | Deallocate, Write Zeroes + DEAC | `fallocate(PUNCH_HOLE \| KEEP_SIZE)`; on a zvol, which refuses that, `BLKDISCARD` of the whole discard-granularity (`volblocksize`) blocks and zeroing of the partial head and tail (on a driver's ring: the discard command and zero writes, see [`RawDevice::discard_granularity()`]) | freed blocks return to the pool |
//!
//! ZFS only frees whole `volblocksize` blocks on discard and leaves partial blocks untouched, which is
//! why the partial head and tail of a range are zeroed explicitly: a deallocated range must read as
//! zeros afterwards (the engine advertises that). Other devices that refuse `PUNCH_HOLE` have their
//! deallocated ranges zeroed (`BLKDISCARD` does not promise zeros there); regular files fall back to
//! writing zeros where the filesystem has no `fallocate`.
//!
//! **Resize contract.** The backend never changes the size of its device: a zvol is resized by its
//! provisioner (`zfs set volsize`, see [`ZfsProvisioner`](crate::ZfsProvisioner)). After that,
//! [`BlockBackend::resize`] (or [`ZvolBackend::refresh_size`]) re-reads the device size with
//! `BLKGETSIZE64` and accepts it if it equals the requested size, waiting up to a second for the
//! device to catch up.

use std::fs::File;
use std::io::{self, IoSlice};
use std::os::fd::AsFd;
use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::time::Duration;

use nvmeof_target::{
    BackendInfo, BlockBackend, Completer, IoError, IoOp, IoOutput, IoResult, RawDevice, Submitted,
};
use rustix::fs::FallocateFlags;
use rustix::io::{Errno, ReadWriteFlags};

use crate::ioctl;
use xatastor_core::aligned::{is_aligned_ptr, AlignedBuf};

/// How [`ZvolBackend::open_with`] opens a device.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ZvolOptions {
    /// Logical block size exposed to hosts: 512 or 4096. It must be a multiple of the device's logical
    /// block size (a zvol reports 512).
    pub block_size: u32,
    /// Open with `O_DIRECT` (the default). A device that refuses it (`EINVAL`) is opened buffered,
    /// with a warning.
    pub direct: bool,
}

impl Default for ZvolOptions {
    fn default() -> Self {
        Self { block_size: 4096, direct: true }
    }
}

/// Deallocation strategies, tried in this order and remembered once one is refused.
const DEALLOC_PUNCH_HOLE: u8 = 0;
const DEALLOC_DISCARD_AND_ZERO: u8 = 1;
const DEALLOC_ZERO: u8 = 2;

/// How long [`BlockBackend::resize`] waits for the device to report the new size.
const RESIZE_WAIT: Duration = Duration::from_secs(1);

/// Largest chunk written when zeros have to be written explicitly.
const ZERO_CHUNK: usize = 1 << 20;

/// Most iovecs passed to one `pwritev` (Linux `UIO_MAXIOV`).
const MAX_IOVECS: usize = 1024;

/// A zvol (`/dev/zvol/<pool>/<name>`) as a [`BlockBackend`]; works with any block device and with
/// regular files (used in tests).
///
/// See the [module documentation](self) for how each NVMe command is carried out and for the resize
/// contract. Thread safe: all I/O is positioned (`pread`/`pwrite`), nothing is locked.
#[derive(Debug)]
pub struct ZvolBackend {
    file: File,
    path: PathBuf,
    dataset: Option<String>,
    block_size: u32,
    logical_block_size: u32,
    alignment: u32,
    direct: bool,
    is_block_device: bool,
    discard_granularity: u64,
    size: AtomicU64,
    dealloc: AtomicU8,
    dsync_writes: AtomicBool,
    zero_range: AtomicBool,
}

fn invalid_input(msg: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, msg)
}

fn open_file(path: &Path, direct: bool) -> io::Result<File> {
    let mut options = std::fs::OpenOptions::new();
    options.read(true).write(true);
    if direct {
        options.custom_flags(libc::O_DIRECT);
    }
    options.open(path)
}

/// Direct-I/O alignment of a regular file (`statx` `STATX_DIOALIGN`, Linux 6.1+).
fn file_dio_alignment(file: &File) -> Option<u32> {
    use rustix::fs::{statx, AtFlags, StatxFlags};
    let st = statx(file, "", AtFlags::EMPTY_PATH, StatxFlags::DIOALIGN).ok()?;
    if st.stx_mask & StatxFlags::DIOALIGN.bits() == 0 || st.stx_dio_offset_align == 0 {
        return None;
    }
    Some(st.stx_dio_offset_align.max(st.stx_dio_mem_align))
}

/// `queue/discard_granularity` of a block device from sysfs (0 if it cannot discard).
fn discard_granularity(file: &File) -> Option<u64> {
    let rdev = file.metadata().ok()?.rdev();
    let (major, minor) = (rustix::fs::major(rdev), rustix::fs::minor(rdev));
    let base = PathBuf::from(format!("/sys/dev/block/{major}:{minor}"));
    // Whole disks have `queue/`; partitions find it in their parent.
    [base.join("queue/discard_granularity"), base.join("../queue/discard_granularity")]
        .iter()
        .find_map(|p| std::fs::read_to_string(p).ok())
        .and_then(|s| s.trim().parse().ok())
}

fn is_errno(e: &io::Error, errno: Errno) -> bool {
    e.raw_os_error() == Some(errno.raw_os_error())
}

/// Errors meaning "this kind of request is not supported here" (as opposed to "this request failed").
fn is_unsupported(e: &io::Error) -> bool {
    is_errno(e, Errno::OPNOTSUPP) || is_errno(e, Errno::NOSYS) || is_errno(e, Errno::NOTTY)
}

fn check_range(offset: u64, len: u64, size: u64) -> Result<(), IoError> {
    match offset.checked_add(len) {
        Some(end) if end <= size => Ok(()),
        _ => Err(IoError::OutOfRange { offset, len, size }),
    }
}

impl ZvolBackend {
    /// Opens a zvol device (or another block device, or a regular file) `O_DIRECT` with the given
    /// logical block size (512 or 4096).
    pub fn open(path: impl AsRef<Path>, block_size: u32) -> io::Result<Self> {
        Self::open_with(path, ZvolOptions { block_size, ..ZvolOptions::default() })
    }

    /// Opens with explicit [`ZvolOptions`].
    ///
    /// Fails with `InvalidInput` for a block size other than 512 or 4096, for a block device whose
    /// logical block size does not divide the block size, and for paths that are neither block devices
    /// nor regular files.
    pub fn open_with(path: impl AsRef<Path>, options: ZvolOptions) -> io::Result<Self> {
        let path = path.as_ref();
        let block_size = options.block_size;
        if !matches!(block_size, 512 | 4096) {
            return Err(invalid_input(format!("block size must be 512 or 4096, not {block_size}")));
        }
        let (mut file, mut direct) = match open_file(path, options.direct) {
            Ok(f) => (f, options.direct),
            Err(e) if options.direct && is_errno(&e, Errno::INVAL) => {
                tracing::warn!(path = %path.display(), "device refuses O_DIRECT; opening it buffered");
                (open_file(path, false)?, false)
            }
            Err(e) => return Err(e),
        };
        let meta = file.metadata()?;
        let is_block_device = meta.file_type().is_block_device();
        let (logical_block_size, raw_size) = if is_block_device {
            (ioctl::logical_block_size(&file)?, ioctl::block_device_size(&file)?)
        } else if meta.is_file() {
            (file_dio_alignment(&file).unwrap_or(4096), meta.len())
        } else {
            return Err(invalid_input(format!("{} is neither a block device nor a file", path.display())));
        };
        if logical_block_size == 0 || block_size % logical_block_size != 0 {
            if is_block_device {
                return Err(invalid_input(format!(
                    "block size {block_size} is not a multiple of the logical block size \
                     {logical_block_size} of {}",
                    path.display()
                )));
            }
            if direct {
                // A file on a filesystem with a coarser direct-I/O alignment than the block size:
                // sub-alignment writes would need a read-modify-write, so do buffered I/O instead.
                tracing::warn!(
                    path = %path.display(),
                    block_size,
                    alignment = logical_block_size,
                    "direct I/O alignment exceeds the block size; opening the file buffered"
                );
                file = open_file(path, false)?;
                direct = false;
            }
        }
        let dataset = if is_block_device { ioctl::zvol_dataset_name(&file).ok() } else { None };
        let discard_granularity = if is_block_device {
            discard_granularity(&file).filter(|&g| g > 0).unwrap_or(u64::from(logical_block_size))
        } else {
            u64::from(logical_block_size)
        };
        let alignment = if direct { logical_block_size.max(1) } else { 1 };
        Ok(Self {
            file,
            path: path.to_owned(),
            dataset,
            block_size,
            logical_block_size,
            alignment,
            direct,
            is_block_device,
            discard_granularity: discard_granularity.max(u64::from(logical_block_size.max(1))),
            size: AtomicU64::new(raw_size - raw_size % u64::from(block_size)),
            dealloc: AtomicU8::new(DEALLOC_PUNCH_HOLE),
            dsync_writes: AtomicBool::new(true),
            zero_range: AtomicBool::new(true),
        })
    }

    /// The path the device was opened by.
    #[must_use]
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The ZFS dataset behind the device (`BLKZNAME`); `None` for devices that are not zvols.
    #[must_use]
    pub fn dataset(&self) -> Option<&str> {
        self.dataset.as_deref()
    }

    /// Whether the device is open `O_DIRECT`.
    #[must_use]
    pub fn is_direct(&self) -> bool {
        self.direct
    }

    /// The device's logical block size (`BLKSSZGET`; for files the direct-I/O alignment or 4096).
    #[must_use]
    pub fn logical_block_size(&self) -> u32 {
        self.logical_block_size
    }

    /// The granularity the device discards in (a zvol's `volblocksize`).
    #[must_use]
    pub fn discard_granularity(&self) -> u64 {
        self.discard_granularity
    }

    /// Re-reads the device size (`BLKGETSIZE64`, or the file length), rounds it down to the block
    /// size, makes it the backend's size and returns it.
    pub fn refresh_size(&self) -> io::Result<u64> {
        let size = self.device_size()?;
        self.size.store(size, Ordering::Release);
        Ok(size)
    }

    /// The device's current size, rounded down to the block size.
    fn device_size(&self) -> io::Result<u64> {
        let raw = if self.is_block_device {
            ioctl::block_device_size(&self.file)?
        } else {
            self.file.metadata()?.len()
        };
        Ok(raw - raw % u64::from(self.block_size))
    }

    /// Executes `op` synchronously (what [`BlockBackend::submit`] does).
    pub fn execute(&self, op: IoOp) -> IoResult {
        let size = self.size_bytes();
        match op {
            IoOp::Read { offset, len } => {
                check_range(offset, u64::from(len), size)?;
                self.read(offset, len)
            }
            IoOp::Write { offset, data, fua } => {
                check_range(offset, data.len() as u64, size)?;
                let segments: Vec<&[u8]> = data.segments().iter().map(|s| s.as_ref()).collect();
                self.write(offset, &segments, data.len(), fua)?;
                Ok(IoOutput::Done)
            }
            IoOp::Flush => {
                rustix::fs::fdatasync(&self.file).map_err(io::Error::from)?;
                Ok(IoOutput::Done)
            }
            IoOp::WriteZeroes { offset, len, deallocate } => {
                check_range(offset, len, size)?;
                if deallocate {
                    self.deallocate(offset, len)?;
                } else {
                    self.zero(offset, len)?;
                }
                Ok(IoOutput::Done)
            }
            IoOp::Discard { ranges } => {
                for r in &ranges {
                    check_range(r.offset, r.len, size)?;
                }
                for r in &ranges {
                    self.deallocate(r.offset, r.len)?;
                }
                Ok(IoOutput::Done)
            }
            // `IoOp` is non-exhaustive: a future operation is refused rather than guessed at.
            _ => Err(IoError::Unsupported),
        }
    }

    fn check_aligned(&self, what: &str, offset: u64, len: u64) -> io::Result<()> {
        let a = u64::from(self.alignment);
        if offset % a != 0 || len % a != 0 {
            return Err(invalid_input(format!(
                "{what} of {len} bytes at {offset} is not aligned to {a} bytes (O_DIRECT on {})",
                self.path.display()
            )));
        }
        Ok(())
    }

    /// Reads the aligned span covering `offset..offset+len` into an aligned buffer and hands out the
    /// requested part without copying.
    fn read(&self, offset: u64, len: u32) -> IoResult {
        let align = u64::from(self.alignment);
        let start = offset - offset % align;
        let end = (offset + u64::from(len)).div_ceil(align) * align;
        let span =
            usize::try_from(end - start).map_err(|_| IoError::Io(io::ErrorKind::OutOfMemory.into()))?;
        let mut buf = AlignedBuf::zeroed(span, self.alignment as usize)
            .ok_or_else(|| IoError::Io(io::ErrorKind::OutOfMemory.into()))?;
        let got = self.pread_full(buf.as_mut_slice(), start)?;
        let head = (offset - start) as usize;
        let want_end = head + len as usize;
        if got < want_end && self.is_block_device {
            return Err(IoError::ShortRead { want: u64::from(len), got: got.saturating_sub(head) as u64 });
        }
        // A regular file shorter than the volume reads as zeros past its end (the buffer is zeroed).
        Ok(IoOutput::Data(buf.into_bytes().slice(head..want_end).into()))
    }

    fn pread_full(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        let mut done = 0usize;
        while let Some(rest) = buf.get_mut(done..).filter(|r| !r.is_empty()) {
            match rustix::io::pread(&self.file, rest, offset + done as u64) {
                Ok(0) => break,
                Ok(n) => done += n,
                Err(Errno::INTR) => {}
                Err(e) => return Err(e.into()),
            }
        }
        Ok(done)
    }

    /// Writes `segments` (`len` bytes in all) at `offset`; with `fua` durably.
    fn write(&self, offset: u64, segments: &[&[u8]], len: usize, fua: bool) -> io::Result<()> {
        if !self.direct {
            return self.write_durable(offset, segments, fua);
        }
        self.check_aligned("write", offset, len as u64)?;
        let align = self.alignment as usize;
        let aligned = segments.iter().all(|s| is_aligned_ptr(s.as_ptr(), align) && s.len() % align == 0);
        if aligned {
            return self.write_durable(offset, segments, fua);
        }
        // The network's buffers are not aligned: copy into an aligned bounce buffer.
        let mut bounce =
            AlignedBuf::zeroed(len, align).ok_or_else(|| io::Error::from(io::ErrorKind::OutOfMemory))?;
        let mut at = 0usize;
        for s in segments {
            let dst = bounce
                .as_mut_slice()
                .get_mut(at..at + s.len())
                .ok_or_else(|| invalid_input("write segments longer than the payload".into()))?;
            dst.copy_from_slice(s);
            at += s.len();
        }
        self.write_durable(offset, &[bounce.as_slice()], fua)
    }

    /// Writes with `RWF_DSYNC` when `fua` (falling back to `fdatasync` after the write where the kernel
    /// lacks it).
    fn write_durable(&self, offset: u64, segments: &[&[u8]], fua: bool) -> io::Result<()> {
        if fua && self.dsync_writes.load(Ordering::Relaxed) {
            match self.write_all_vectored(offset, segments, ReadWriteFlags::DSYNC) {
                Err(e) if is_unsupported(&e) => {
                    tracing::debug!(path = %self.path.display(), "pwritev2(RWF_DSYNC) unsupported; using fdatasync");
                    self.dsync_writes.store(false, Ordering::Relaxed);
                }
                other => return other,
            }
        }
        self.write_all_vectored(offset, segments, ReadWriteFlags::empty())?;
        if fua {
            rustix::fs::fdatasync(&self.file)?;
        }
        Ok(())
    }

    fn write_all_vectored(&self, offset: u64, segments: &[&[u8]], flags: ReadWriteFlags) -> io::Result<()> {
        let mut rest: Vec<&[u8]> = segments.iter().copied().filter(|s| !s.is_empty()).collect();
        let mut pos = offset;
        let mut first = 0usize;
        while first < rest.len() {
            let window = rest.get(first..).unwrap_or_default();
            let iov: Vec<IoSlice<'_>> = window.iter().take(MAX_IOVECS).map(|s| IoSlice::new(s)).collect();
            let written = if flags.is_empty() {
                rustix::io::pwritev(&self.file, &iov, pos)
            } else {
                rustix::io::pwritev2(&self.file, &iov, pos, flags)
            };
            let mut n = match written {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => n,
                Err(Errno::INTR) => continue,
                Err(e) => return Err(e.into()),
            };
            pos += n as u64;
            // Skip the fully written segments and shorten a partly written one.
            while n > 0 {
                let Some(seg) = rest.get_mut(first) else { break };
                if n >= seg.len() {
                    n -= seg.len();
                    first += 1;
                } else {
                    *seg = seg.get(n..).unwrap_or_default();
                    n = 0;
                }
            }
        }
        Ok(())
    }

    /// Makes `len` bytes at `offset` read as zeros without (necessarily) freeing them.
    fn zero(&self, offset: u64, len: u64) -> io::Result<()> {
        if len == 0 {
            return Ok(());
        }
        if self.zero_range.load(Ordering::Relaxed) {
            match rustix::fs::fallocate(
                &self.file,
                FallocateFlags::ZERO_RANGE | FallocateFlags::KEEP_SIZE,
                offset,
                len,
            ) {
                Ok(()) => return Ok(()),
                Err(e) if is_unsupported(&e.into()) => {
                    tracing::debug!(path = %self.path.display(), "fallocate(ZERO_RANGE) unsupported; writing zeros");
                    self.zero_range.store(false, Ordering::Relaxed);
                }
                Err(e) => return Err(e.into()),
            }
        }
        self.write_zeros(offset, len)
    }

    fn write_zeros(&self, offset: u64, len: u64) -> io::Result<()> {
        if self.direct {
            self.check_aligned("write zeroes", offset, len)?;
        }
        let chunk = (len.min(ZERO_CHUNK as u64)) as usize;
        let zeros = AlignedBuf::zeroed(chunk, self.alignment as usize)
            .ok_or_else(|| io::Error::from(io::ErrorKind::OutOfMemory))?;
        let end = offset + len;
        let mut pos = offset;
        while pos < end {
            let n = (end - pos).min(chunk as u64) as usize;
            self.write_all_vectored(
                pos,
                &[zeros.as_slice().get(..n).unwrap_or_default()],
                ReadWriteFlags::empty(),
            )?;
            pos += n as u64;
        }
        Ok(())
    }

    /// Makes `len` bytes at `offset` read as zeros and gives the space back where the device can.
    fn deallocate(&self, offset: u64, len: u64) -> io::Result<()> {
        if len == 0 {
            return Ok(());
        }
        if self.dealloc.load(Ordering::Relaxed) == DEALLOC_PUNCH_HOLE {
            match rustix::fs::fallocate(
                &self.file,
                FallocateFlags::PUNCH_HOLE | FallocateFlags::KEEP_SIZE,
                offset,
                len,
            ) {
                Ok(()) => return Ok(()),
                Err(e) if is_unsupported(&e.into()) => {
                    // A zvol: no "write zeroes with unmap" in its queue, but discard frees whole blocks.
                    let next = if self.dataset.is_some() { DEALLOC_DISCARD_AND_ZERO } else { DEALLOC_ZERO };
                    tracing::debug!(path = %self.path.display(), next, "fallocate(PUNCH_HOLE) unsupported");
                    self.dealloc.store(next, Ordering::Relaxed);
                }
                Err(e) => return Err(e.into()),
            }
        }
        if self.dealloc.load(Ordering::Relaxed) == DEALLOC_DISCARD_AND_ZERO {
            return self.discard_and_zero(offset, len);
        }
        self.zero(offset, len)
    }

    /// Discards the whole discard-granularity blocks of the range and zeroes its partial head and tail
    /// (ZFS leaves partial blocks of a discard untouched).
    fn discard_and_zero(&self, offset: u64, len: u64) -> io::Result<()> {
        let g = self.discard_granularity;
        let end = offset + len;
        let first = offset.div_ceil(g) * g;
        let last = end / g * g;
        if first >= last {
            return self.zero(offset, len);
        }
        self.zero(offset, first - offset)?;
        match ioctl::discard(&self.file, first, last - first) {
            Ok(()) => {}
            Err(e) if is_unsupported(&e) => {
                tracing::debug!(path = %self.path.display(), "BLKDISCARD unsupported; zeroing instead");
                self.dealloc.store(DEALLOC_ZERO, Ordering::Relaxed);
                self.zero(first, last - first)?;
            }
            Err(e) => return Err(e),
        }
        self.zero(last, end - last)
    }

    /// Whether deallocation discards the whole discard-granularity blocks and zeroes the rest: on a
    /// zvol (which refuses `PUNCH_HOLE`) and on a device forced to it, until a discard was refused.
    fn discards_zeroing(&self) -> bool {
        self.is_block_device
            && match self.dealloc.load(Ordering::Relaxed) {
                DEALLOC_DISCARD_AND_ZERO => true,
                DEALLOC_PUNCH_HOLE => self.dataset.is_some(),
                _ => false,
            }
    }

    /// Test hook: use the zvol deallocation path (discard whole blocks, zero the rest) on any device;
    /// a block device then declares it in [`BlockBackend::raw_device`] too.
    #[doc(hidden)]
    pub fn __force_discard_and_zero(&self) {
        self.dealloc.store(DEALLOC_DISCARD_AND_ZERO, Ordering::Relaxed);
    }
}

impl BlockBackend for ZvolBackend {
    fn size_bytes(&self) -> u64 {
        self.size.load(Ordering::Acquire)
    }

    fn info(&self) -> BackendInfo {
        // zvol writes are durable only after a flush (ZIL commit) or with FUA.
        BackendInfo::new(self.block_size)
            .with_volatile_write_cache(true)
            .with_discard(true)
            .with_write_zeroes(true)
    }

    fn submit(&self, op: IoOp, completer: Completer) -> Submitted {
        drop(completer);
        Submitted::Done(self.execute(op))
    }

    fn raw_device(&self) -> Option<RawDevice<'_>> {
        // zvols refuse fallocate (no PUNCH_HOLE / ZERO_RANGE): write zeroes go to `submit` (zero
        // writes); deallocation is declared as "discard whole blocks, zero the partial ones" for as
        // long as `deallocate` would do that (until the device turns out not to discard).
        let dev = RawDevice::new(self.file.as_fd())
            .discard_granularity(self.discards_zeroing().then_some(self.discard_granularity));
        Some(if self.direct { dev.direct(self.alignment) } else { dev })
    }

    /// Accepts `new_size_bytes` once the device reports it (see the module's resize contract): the
    /// size is re-read, waiting up to a second for it to change; a different size is an error and
    /// leaves the backend's size as it was.
    fn resize(&self, new_size_bytes: u64) -> io::Result<()> {
        if new_size_bytes % u64::from(self.block_size) != 0 {
            return Err(invalid_input(format!(
                "new size {new_size_bytes} is not a multiple of the block size {}",
                self.block_size
            )));
        }
        let mut backoff =
            crate::backoff::Backoff::new(RESIZE_WAIT, Duration::from_millis(1), Duration::from_millis(50));
        loop {
            let size = self.device_size()?;
            if size == new_size_bytes {
                self.size.store(size, Ordering::Release);
                return Ok(());
            }
            if !backoff.wait() {
                return Err(invalid_input(format!(
                    "{} is {size} bytes, not {new_size_bytes}: resize the zvol (volsize) first; the \
                     backend only takes over the device's size",
                    self.path.display()
                )));
            }
        }
    }
}
