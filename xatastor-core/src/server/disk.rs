//! Backend operations of file-descriptor volumes, run on the worker's ring.
//!
//! A backend that exposes a [`RawDevice`] gets its reads, writes, flushes and (where the device
//! declares them) `fallocate` modes executed by the worker with the request's own buffers:
//!
//! | operation | ring opcode | buffers |
//! |---|---|---|
//! | read | `Read` | a fresh buffer (for `O_DIRECT`: a sector-aligned one from the worker's pool), handed to the engine as `Bytes` without a copy |
//! | write | `Write` (one segment) / `Writev` | the PDUs' own data; for `O_DIRECT`, copied into an aligned buffer only if it is not aligned already |
//! | flush | `Fsync(DATASYNC)` | — |
//! | write zeroes / deallocate | `Fallocate` (`ZERO_RANGE` / `PUNCH_HOLE`) | — |
//!
//! What the ring cannot do (a mode the device does not declare, requests not aligned for an
//! `O_DIRECT` device) goes to the backend's own [`nvmeof_target::BlockBackend::submit`].

use std::io;
use std::os::fd::AsRawFd;
use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use io_uring::{opcode, squeue, types};
use nvmeof_proto::Payload;
use nvmeof_target::{IoError, IoOp, IoOutput, IoResult, IoToken, Namespace, RawDevice};
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

/// What a completion of a disk operation means.
pub(super) enum Outcome {
    /// More completions of the same operation are due.
    Pending,
    /// The operation is over with this result.
    Done(IoResult),
    /// The device refused the `fallocate` mode it declared: hand `op` to the backend instead.
    Refused(IoOp),
}

/// Books completion `res` of `kind`; the caller removes the operation when this is not `Pending`.
pub(super) fn on_completion(kind: &mut DiskKind, res: i32) -> Outcome {
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
        DiskKind::Write { .. } | DiskKind::Flush | DiskKind::Allocate { .. } => Ok(IoOutput::Done),
    })
}
