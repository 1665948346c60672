//! Backend operations of file-descriptor volumes, run on the worker's ring.
//!
//! A backend that exposes a [`RawDevice`] gets its reads, writes, flushes, (where the device
//! declares them) `fallocate` modes and (on a block device that declares its discard granularity)
//! deallocation executed by the worker with the request's own buffers:
//!
//! | operation | ring opcode | buffers |
//! |---|---|---|
//! | read | `Read` | a fresh buffer (for `O_DIRECT`: a sector-aligned one from the worker's pool), handed to the engine as `Bytes` without a copy |
//! | write | `Write` (one segment) / `Writev` | the PDUs' own data; for `O_DIRECT`, copied into an aligned buffer only if it is not aligned already |
//! | flush | `Fsync(DATASYNC)` | — |
//! | write zeroes / deallocate | `Fallocate` (`ZERO_RANGE` / `PUNCH_HOLE`) | — |
//! | deallocate, write zeroes with DEAC, on an `O_DIRECT` block device with a discard granularity and no `PUNCH_HOLE` (a zvol) | `UringCmd16` `BLOCK_URING_CMD_DISCARD` (Linux 6.12+) over the whole granularity blocks of each range, `Write`s over its partial head and tail | a static, shared zero buffer |
//!
//! What the ring cannot do (a mode the device does not declare, requests not aligned for an
//! `O_DIRECT` device) goes to the backend's own [`nvmeof_target::BlockBackend::submit`]. So does
//! an operation the device refuses on the ring although it declared it (`fallocate` failing with
//! `EOPNOTSUPP`; the discard command failing with `EOPNOTSUPP`, `ENOTTY`, `EINVAL` or `EAGAIN`,
//! as on kernels without it): [`Outcome::Refused`] hands the whole operation over, and the worker
//! sends the namespace's later deallocations straight there.

use std::io;
use std::os::fd::AsRawFd;
use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use io_uring::{opcode, squeue, types};
use nvmeof_proto::Payload;
use nvmeof_target::{ByteRange, IoError, IoOp, IoOutput, IoResult, IoToken, Namespace, RawDevice};
use smallvec::SmallVec;

use super::pool::{Pooled, ReadPool};
use super::slab::Key;
use crate::aligned::{is_aligned_ptr, AlignedBuf};

/// A backend operation in flight on the ring; its buffers live here until its last completion.
pub(super) struct DiskOp {
    pub(super) conn: Key,
    pub(super) token: IoToken,
    /// Keeps the backend, and so its file descriptor, alive until the operation completes.
    pub(super) namespace: Arc<Namespace>,
    pub(super) kind: DiskKind,
}

pub(super) enum DiskKind {
    /// Reads `len` bytes into `buf`.
    Read {
        buf: ReadBuf,
        len: usize,
    },
    /// Writes `len` bytes from `_data` (the PDUs' own buffers) or, for unaligned data on an
    /// `O_DIRECT` device, from `_bounce`; `iov` for more than one segment.
    Write {
        _data: Payload,
        _bounce: Option<AlignedBuf>,
        _iov: Vec<libc::iovec>,
        len: usize,
    },
    Flush,
    /// One `fallocate` per range; `op` is handed to the backend if the device refuses the mode.
    Allocate {
        remaining: usize,
        error: Option<i32>,
        op: IoOp,
    },
    /// Deallocation as discard commands over whole granularity blocks plus writes of [`ZEROS`]
    /// (`zero_bytes` in all) over the partial blocks; `op` is handed to the backend if the kernel
    /// refuses the command.
    Discard {
        remaining: usize,
        /// Bytes the zero writes must write in all, and what they wrote so far.
        zero_bytes: u64,
        written: u64,
        /// The first error that is not a refusal.
        error: Option<i32>,
        refused: bool,
        op: IoOp,
    },
}

/// `BLOCK_URING_CMD_DISCARD` (Linux 6.12+, `include/uapi/linux/blkdev.h`: `_IO(0x12, 0)`), the
/// `cmd_op` of an `IORING_OP_URING_CMD` on a block device: discards the range starting at byte
/// `sqe->addr`, `sqe->addr3` bytes long (both multiples of the logical block size); every other
/// field of the entry must be zero (`blkdev_uring_cmd` in `block/ioctl.c`). Completes with 0.
const BLOCK_URING_CMD_DISCARD: u32 = 0x12 << 8;

/// Bytes of [`ZEROS`]: larger partial blocks are zeroed with several writes.
const ZEROS_LEN: usize = 64 * 1024;

/// Alignment of [`ZEROS`]: enough for `O_DIRECT` on devices with logical blocks up to 4 KiB
/// (devices needing more have their deallocation done by the backend).
const ZEROS_ALIGN: usize = 4096;

#[repr(C, align(4096))]
struct Zeros([u8; ZEROS_LEN]);

/// The zeros written over the partial head and tail of a ring deallocation. Immutable and
/// `'static`: the kernel only reads it, so any number of operations of any worker may point into it.
static ZEROS: Zeros = Zeros([0; ZEROS_LEN]);

/// Most ring entries one deallocation may take; one with more (many ranges with partial blocks
/// larger than [`ZEROS_LEN`]) goes to the backend.
const MAX_DISCARD_SQES: usize = 1024;

/// Errors of the discard command that mean "not here", not "failed": no `uring_cmd` for the file
/// (`EOPNOTSUPP`, e.g. a regular file, or a block device before Linux 6.12), an unknown opcode or
/// command (`EINVAL`, before Linux 5.19), `ENOTTY`, and `EAGAIN` (the non-blocking attempt of some
/// kernels gave up). The backend's own path does the operation then.
fn is_refusal(errno: i32) -> bool {
    matches!(errno, libc::EOPNOTSUPP | libc::EINVAL | libc::ENOTTY | libc::EAGAIN)
}

pub(super) enum ReadBuf {
    /// Capacity `len`, filled by the kernel (length set on completion).
    Plain(BytesMut),
    /// For `O_DIRECT`: an aligned buffer of the worker's pool.
    Aligned(Pooled),
}

/// How a request will run.
pub(super) enum Plan {
    /// On the ring: the operation and its submission entries (without `user_data`).
    Ring(DiskKind, SmallVec<[squeue::Entry; 1]>),
    /// Through the backend's own `submit`.
    Backend(IoOp),
    /// Cannot run (a buffer too large to allocate).
    Fail(&'static str),
}

/// Decides where `op` runs on `dev` and, for the ring, builds it. The entries point into the
/// operation's heap buffers, which do not move when the operation itself is moved into a slab.
pub(super) fn plan(op: IoOp, dev: &RawDevice<'_>, pool: &Arc<ReadPool>) -> Plan {
    let align = if dev.direct { (dev.alignment.max(1) as usize).next_power_of_two() } else { 1 };
    let aligned = |offset: u64, len: u64| offset % align as u64 == 0 && len % align as u64 == 0;
    let fd = types::Fd(dev.fd.as_raw_fd());
    let base = dev.base_offset;
    let mut sqes = SmallVec::new();
    match op {
        IoOp::Read { offset, len } if aligned(offset, u64::from(len)) => {
            let len = len as usize;
            let (buf, ptr) = if align > 1 {
                let Some(mut b) = pool.take(len, align) else {
                    return Plan::Fail("read buffer too large");
                };
                let ptr = b.as_mut_ptr();
                (ReadBuf::Aligned(b), ptr)
            } else {
                let mut b = BytesMut::with_capacity(len);
                let ptr = b.spare_capacity_mut().as_mut_ptr().cast::<u8>();
                (ReadBuf::Plain(b), ptr)
            };
            sqes.push(opcode::Read::new(fd, ptr, len as u32).offset(base + offset).build());
            Plan::Ring(DiskKind::Read { buf, len }, sqes)
        }
        IoOp::Write { offset, data, fua } if aligned(offset, data.len() as u64) => {
            let len = data.len();
            let flags = if fua { libc::RWF_DSYNC } else { 0 };
            let in_place =
                data.segments().iter().all(|s| is_aligned_ptr(s.as_ptr(), align) && s.len() % align == 0);
            if in_place {
                let mut iov = Vec::new();
                match data.segments() {
                    [one] => sqes.push(
                        opcode::Write::new(fd, one.as_ptr(), one.len() as u32)
                            .offset(base + offset)
                            .rw_flags(flags)
                            .build(),
                    ),
                    segments => {
                        iov = segments
                            .iter()
                            .map(|s| libc::iovec {
                                iov_base: s.as_ptr() as *mut libc::c_void,
                                iov_len: s.len(),
                            })
                            .collect();
                        sqes.push(
                            opcode::Writev::new(fd, iov.as_ptr(), iov.len() as u32)
                                .offset(base + offset)
                                .rw_flags(flags)
                                .build(),
                        );
                    }
                }
                Plan::Ring(DiskKind::Write { _data: data, _bounce: None, _iov: iov, len }, sqes)
            } else {
                let Some(mut b) = AlignedBuf::zeroed(len, align) else {
                    return Plan::Fail("write buffer too large");
                };
                let mut at = 0;
                for seg in data.segments() {
                    if let Some(dst) = b.as_mut_slice().get_mut(at..at + seg.len()) {
                        dst.copy_from_slice(seg);
                    }
                    at += seg.len();
                }
                sqes.push(
                    opcode::Write::new(fd, b.as_mut_slice().as_mut_ptr(), len as u32)
                        .offset(base + offset)
                        .rw_flags(flags)
                        .build(),
                );
                Plan::Ring(
                    DiskKind::Write { _data: Payload::new(), _bounce: Some(b), _iov: Vec::new(), len },
                    sqes,
                )
            }
        }
        IoOp::Flush => {
            sqes.push(opcode::Fsync::new(fd).flags(types::FsyncFlags::DATASYNC).build());
            Plan::Ring(DiskKind::Flush, sqes)
        }
        op @ (IoOp::WriteZeroes { deallocate: true, .. } | IoOp::Discard { .. }) if !dev.punch_hole => {
            plan_discard(op, dev)
        }
        IoOp::WriteZeroes { offset, len, deallocate } => {
            let (supported, mode) = if deallocate {
                (dev.punch_hole, libc::FALLOC_FL_PUNCH_HOLE)
            } else {
                (dev.zero_range, libc::FALLOC_FL_ZERO_RANGE)
            };
            let op = IoOp::WriteZeroes { offset, len, deallocate };
            if !supported {
                return Plan::Backend(op);
            }
            let mode = mode | libc::FALLOC_FL_KEEP_SIZE;
            sqes.push(opcode::Fallocate::new(fd, len).offset(base + offset).mode(mode).build());
            Plan::Ring(DiskKind::Allocate { remaining: 1, error: None, op }, sqes)
        }
        IoOp::Discard { ranges } => {
            if !dev.punch_hole || ranges.is_empty() {
                return Plan::Backend(IoOp::Discard { ranges });
            }
            let mode = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
            for r in &ranges {
                sqes.push(opcode::Fallocate::new(fd, r.len).offset(base + r.offset).mode(mode).build());
            }
            let remaining = sqes.len();
            Plan::Ring(DiskKind::Allocate { remaining, error: None, op: IoOp::Discard { ranges } }, sqes)
        }
        // Not aligned for this O_DIRECT device: the backend handles it (with its own buffers).
        op => Plan::Backend(op),
    }
}

/// Plans the deallocation `op` (Deallocate, or Write Zeroes with DEAC) on a block device that
/// declared its discard granularity; without one, or when [`discard_entries`] cannot, the backend
/// does it.
fn plan_discard(op: IoOp, dev: &RawDevice<'_>) -> Plan {
    let planned = match &op {
        IoOp::Discard { ranges } => discard_entries(ranges, dev),
        &IoOp::WriteZeroes { offset, len, deallocate: true } => {
            discard_entries(&[ByteRange { offset, len }], dev)
        }
        _ => None,
    };
    match planned {
        Some((sqes, zero_bytes)) => {
            let remaining = sqes.len();
            let kind =
                DiskKind::Discard { remaining, zero_bytes, written: 0, error: None, refused: false, op };
            Plan::Ring(kind, sqes)
        }
        None => Plan::Backend(op),
    }
}

/// The ring entries of a deallocation of `ranges` (and the bytes its zero writes write): per range,
/// one discard command over its whole granularity blocks (counted from the start of the device) and
/// zero writes over the partial blocks at its ends (the whole range if it holds no whole block).
///
/// `None` — the backend does it — without a declared granularity, on a buffered descriptor (a
/// discard racing the page cache's read-modify-write of a partly zeroed page could bring old data
/// back), for a device or request not aligned for [`ZEROS`], and beyond [`MAX_DISCARD_SQES`].
fn discard_entries(ranges: &[ByteRange], dev: &RawDevice<'_>) -> Option<(SmallVec<[squeue::Entry; 1]>, u64)> {
    let g = dev.discard_granularity.filter(|&g| g > 0)?;
    let align = (dev.alignment.max(1) as usize).next_power_of_two();
    let a = align as u64;
    if !dev.direct || align > ZEROS_ALIGN || g % a != 0 || dev.base_offset % a != 0 {
        return None;
    }
    // The partial blocks of one range alone must fit (the bound is checked after each range).
    if g / ZEROS_LEN as u64 >= MAX_DISCARD_SQES as u64 / 2 {
        return None;
    }
    let fd = types::Fd(dev.fd.as_raw_fd());
    let mut sqes: SmallVec<[squeue::Entry; 1]> = SmallVec::new();
    let mut zero_bytes = 0u64;
    let mut zero = |sqes: &mut SmallVec<[squeue::Entry; 1]>, mut from: u64, to: u64| {
        while from < to {
            let n = (to - from).min(ZEROS_LEN as u64);
            sqes.push(opcode::Write::new(fd, ZEROS.0.as_ptr(), n as u32).offset(from).build());
            zero_bytes += n;
            from += n;
        }
    };
    for r in ranges {
        if r.offset % a != 0 || r.len % a != 0 {
            return None;
        }
        let start = dev.base_offset.checked_add(r.offset)?;
        let end = start.checked_add(r.len)?;
        let first = start.div_ceil(g).checked_mul(g)?;
        let last = end / g * g;
        if first < last {
            zero(&mut sqes, start, first);
            let mut cmd = [0u8; 16];
            // `cmd` overlays `addr3` (and the padding after it): the length, in native byte order.
            if let Some(len) = cmd.get_mut(..8) {
                len.copy_from_slice(&(last - first).to_ne_bytes());
            }
            sqes.push(
                opcode::UringCmd16::new(fd, BLOCK_URING_CMD_DISCARD).addr(Some(first)).cmd(cmd).build(),
            );
            zero(&mut sqes, last, end);
        } else {
            zero(&mut sqes, start, end);
        }
        if sqes.len() > MAX_DISCARD_SQES {
            return None;
        }
    }
    if sqes.is_empty() {
        return None;
    }
    Some((sqes, zero_bytes))
}

/// What a completion of a disk operation means.
pub(super) enum Outcome {
    /// More completions of the same operation are due.
    Pending,
    /// The operation is over with this result.
    Done(IoResult),
    /// The device refused the `fallocate` mode it declared, or the kernel the discard command:
    /// hand `op` to the backend instead (it has not been done).
    Refused(IoOp),
}

/// Books completion `res` of `kind`; the caller removes the operation when this is not `Pending`.
pub(super) fn on_completion(kind: &mut DiskKind, res: i32) -> Outcome {
    if let DiskKind::Discard { .. } = kind {
        return on_discard_completion(kind, res);
    }
    if let DiskKind::Allocate { remaining, error, .. } = kind {
        *remaining = remaining.saturating_sub(1);
        if res < 0 && error.is_none() {
            *error = Some(-res);
        }
        if *remaining > 0 {
            return Outcome::Pending;
        }
    }
    let kind = std::mem::replace(kind, DiskKind::Flush);
    Outcome::Done(match kind {
        DiskKind::Allocate { error: Some(e), op, .. } if e == libc::EOPNOTSUPP => {
            return Outcome::Refused(op)
        }
        DiskKind::Allocate { error: Some(e), .. } => Err(IoError::Io(io::Error::from_raw_os_error(e))),
        _ if res < 0 => Err(IoError::Io(io::Error::from_raw_os_error(-res))),
        DiskKind::Read { buf: ReadBuf::Plain(mut b), len } => {
            let got = (res as usize).min(len).min(b.capacity());
            // SAFETY: the kernel wrote `res` bytes at the start of the spare capacity, which was
            // `len` bytes long; `got` is at most that.
            unsafe { b.set_len(got) };
            // A regular file shorter than the volume reads as zeros past its end.
            b.resize(len, 0);
            Ok(IoOutput::Data(b.freeze().into()))
        }
        DiskKind::Read { buf: ReadBuf::Aligned(mut b), len } => {
            if (res as usize) < len {
                b.zero_from(res as usize);
            }
            Ok(IoOutput::Data(Bytes::from_owner(b).into()))
        }
        DiskKind::Write { len, .. } if (res as usize) < len => {
            Err(IoError::Io(io::Error::new(io::ErrorKind::WriteZero, "short write")))
        }
        DiskKind::Write { .. } | DiskKind::Flush | DiskKind::Allocate { .. } | DiskKind::Discard { .. } => {
            Ok(IoOutput::Done)
        }
    })
}

/// Books completion `res` of a [`DiskKind::Discard`]. Its entries share one `user_data`, so a
/// completion is told apart by its value: the discard command completes with 0 and each zero write
/// with the bytes it wrote (at most its length, never 0 for a full one). The operation succeeds
/// only if nothing failed and the writes wrote exactly `zero_bytes` in all — every write whole.
/// A refusal (see [`is_refusal`]) hands the whole operation to the backend, unless another
/// completion failed for real: then that error is the result.
fn on_discard_completion(kind: &mut DiskKind, res: i32) -> Outcome {
    let DiskKind::Discard { remaining, zero_bytes, written, error, refused, .. } = kind else {
        return Outcome::Pending;
    };
    *remaining = remaining.saturating_sub(1);
    if res < 0 {
        if is_refusal(-res) {
            *refused = true;
        } else if error.is_none() {
            *error = Some(-res);
        }
    } else {
        *written += res as u64;
    }
    if *remaining > 0 {
        return Outcome::Pending;
    }
    let (zero_bytes, written, error, refused) = (*zero_bytes, *written, *error, *refused);
    let DiskKind::Discard { op, .. } = std::mem::replace(kind, DiskKind::Flush) else {
        // Not reached (`kind` was a discard above); fail rather than leave the request hanging.
        return Outcome::Done(Err(IoError::Io(io::Error::other("discard state lost"))));
    };
    Outcome::Done(match error {
        Some(e) => Err(IoError::Io(io::Error::from_raw_os_error(e))),
        None if refused => return Outcome::Refused(op),
        None if written != zero_bytes => {
            Err(IoError::Io(io::Error::new(io::ErrorKind::WriteZero, "short write of zeros")))
        }
        None => Ok(IoOutput::Done),
    })
}
