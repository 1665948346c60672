//! The worker's receive buffers: an io_uring provided-buffer ring.
//!
//! `entries` buffers of `size` bytes are shared by all the connections of a worker. For each
//! multishot receive completion the kernel picks a buffer and hands it to the worker, which either
//! decodes PDUs from it in place ([`BufRing::take`]: the buffer becomes a `Bytes` whose PDUs' data
//! are slices of it, and goes back to the kernel when the last of them is dropped) or copies the
//! bytes out and hands it back at once ([`BufRing::get`] + [`BufRing::recycle`]). An idle connection
//! holds no receive buffer.
//!
//! All of this module's `unsafe` is the memory shared with the kernel. The kernel writes a buffer
//! only while it is in the ring (between [`BufRing::recycle`] and the completion that names it);
//! the worker reads a buffer only between that completion and its recycling, so the two never touch
//! the same buffer at the same time.

use std::io;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU16, AtomicUsize, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use io_uring::types::BufRingEntry;
use parking_lot::Mutex;

/// The buffer group of the receive buffers.
pub(super) const BUF_GROUP: u16 = 0;

/// The buffers' memory, shared with the `Bytes` handed out by [`BufRing::take`]: it lives until the
/// last of them is dropped, even if the worker is gone.
struct Memory {
    ptr: NonNull<u8>,
    layout: std::alloc::Layout,
    size: usize,
    /// Buffers whose `Bytes` were dropped, to be given back to the kernel by the worker.
    returned: Mutex<Vec<u16>>,
    /// Buffers out as `Bytes` and not returned yet.
    held: AtomicUsize,
}

// SAFETY: the memory is plain bytes; access is coordinated as the module documentation says (a
// buffer is read by the worker and its `Bytes` only while the kernel does not write it).
unsafe impl Send for Memory {}
// SAFETY: as for `Send`: shared access only ever reads buffers the kernel is done with.
unsafe impl Sync for Memory {}

impl Memory {
    /// The first `len` bytes of buffer `bid`.
    ///
    /// # Safety
    /// The buffer must not be in the ring (the kernel must not be writing it) for as long as the
    /// returned slice lives.
    unsafe fn slice(&self, bid: u16, len: usize) -> &[u8] {
        let len = len.min(self.size);
        // SAFETY: `bid * size + len` is inside the allocation (bid < entries, len ≤ size, checked by
        // the callers and here); the caller guarantees nobody writes it meanwhile.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr().add(usize::from(bid) * self.size), len) }
    }
}

impl Drop for Memory {
    fn drop(&mut self) {
        // SAFETY: allocated in `BufRing::new` with this layout; the last reference is gone, and the
        // io_uring that wrote into it was dropped before the worker's `BufRing` (field order).
        unsafe { std::alloc::dealloc(self.ptr.as_ptr(), self.layout) };
    }
}

/// A received buffer decoded in place; returns it to the ring when dropped.
struct RingSlice {
    memory: Arc<Memory>,
    bid: u16,
    len: usize,
}

impl AsRef<[u8]> for RingSlice {
    fn as_ref(&self) -> &[u8] {
        // SAFETY: the buffer left the ring with the completion that named it and goes back only when
        // this `RingSlice` is dropped: the kernel does not write it while this borrow lives.
        unsafe { self.memory.slice(self.bid, self.len) }
    }
}

impl Drop for RingSlice {
    fn drop(&mut self) {
        self.memory.returned.lock().push(self.bid);
        self.memory.held.fetch_sub(1, Ordering::Release);
    }
}

pub(super) struct BufRing {
    ring: NonNull<BufRingEntry>,
    layout: std::alloc::Layout,
    memory: Arc<Memory>,
    entries: u16,
    tail: u16,
    /// Reused list of returned buffers (no allocation per reclaim).
    scratch: Vec<u16>,
}

impl BufRing {
    /// `count` buffers (rounded up to a power of two, at most 32768) of `size` bytes.
    pub(super) fn new(count: u16, size: usize) -> io::Result<Self> {
        let entries = count.clamp(1, 32768).next_power_of_two();
        let bytes = usize::from(entries) * std::mem::size_of::<BufRingEntry>();
        let layout = std::alloc::Layout::from_size_align(bytes.max(4096), 4096).map_err(io::Error::other)?;
        // SAFETY: the layout has a non-zero size.
        let raw = unsafe { std::alloc::alloc_zeroed(layout) };
        let ring = NonNull::new(raw.cast::<BufRingEntry>())
            .ok_or_else(|| io::Error::new(io::ErrorKind::OutOfMemory, "cannot allocate the buffer ring"))?;
        let total = usize::from(entries).checked_mul(size).filter(|&t| t > 0).ok_or_else(|| {
            io::Error::new(io::ErrorKind::InvalidInput, "receive buffers: size × count is out of range")
        })?;
        let buffers_layout = std::alloc::Layout::from_size_align(total, 4096).map_err(io::Error::other)?;
        // SAFETY: the layout has a non-zero size (checked above).
        let buffers = unsafe { std::alloc::alloc_zeroed(buffers_layout) };
        let Some(ptr) = NonNull::new(buffers) else {
            // SAFETY: allocated just above with this layout.
            unsafe { std::alloc::dealloc(raw, layout) };
            return Err(io::Error::new(io::ErrorKind::OutOfMemory, "cannot allocate the receive buffers"));
        };
        let memory = Arc::new(Memory {
            ptr,
            layout: buffers_layout,
            size,
            returned: Mutex::new(Vec::new()),
            held: AtomicUsize::new(0),
        });
        let mut r = Self { ring, layout, memory, entries, tail: 0, scratch: Vec::new() };
        for bid in 0..entries {
            r.put(bid);
        }
        r.publish();
        Ok(r)
    }

    /// The ring's address, for `register_buf_ring`.
    pub(super) fn ring_addr(&self) -> u64 {
        self.ring.as_ptr() as u64
    }

    /// Number of entries, for `register_buf_ring`.
    pub(super) fn entries(&self) -> u16 {
        self.entries
    }

    /// Buffers out as `Bytes` ([`BufRing::take`]) and not back in the ring yet.
    pub(super) fn held(&self) -> usize {
        self.memory.held.load(Ordering::Acquire)
    }

    /// Writes buffer `bid` into the next free ring entry (made visible by [`BufRing::publish`]).
    fn put(&mut self, bid: u16) {
        let index = usize::from(self.tail & (self.entries - 1));
        // SAFETY: `index` < `entries`, the number of entries allocated; the kernel only reads entries
        // between its head and the published tail, and this one is past the published tail.
        let entry = unsafe { &mut *self.ring.as_ptr().add(index) };
        let addr = self.memory.ptr.as_ptr() as u64 + u64::from(bid) * self.memory.size as u64;
        entry.set_addr(addr);
        entry.set_len(self.memory.size as u32);
        entry.set_bid(bid);
        self.tail = self.tail.wrapping_add(1);
    }

    /// Makes the entries written so far visible to the kernel.
    fn publish(&self) {
        // SAFETY: the ring's first entry exists and is initialised; its `resv` field is the ring's
        // tail, which the kernel reads with acquire semantics.
        let tail = unsafe { BufRingEntry::tail(self.ring.as_ptr()) };
        // SAFETY: the tail is a properly aligned u16 inside the ring's allocation; we are its only
        // writer, and an atomic view of it orders the entry writes before the tail update.
        unsafe { (*(tail as *const AtomicU16)).store(self.tail, Ordering::Release) };
    }

    /// The first `len` bytes of buffer `bid`, which a receive completion just handed over; call
    /// [`BufRing::recycle`] when done with them.
    pub(super) fn get(&self, bid: u16, len: usize) -> &[u8] {
        if bid >= self.entries {
            return &[];
        }
        // SAFETY: the buffer was handed over by a completion and is recycled only through
        // `&mut self`, which this borrow prevents while it lives.
        unsafe { self.memory.slice(bid, len) }
    }

    /// Buffer `bid`, which a receive completion just handed over with `len` bytes, as `Bytes` to
    /// decode in place; it returns to the ring (through [`BufRing::reclaim`]) once every `Bytes`
    /// made from it is dropped.
    pub(super) fn take(&self, bid: u16, len: usize) -> Bytes {
        if bid >= self.entries {
            return Bytes::new();
        }
        self.memory.held.fetch_add(1, Ordering::AcqRel);
        Bytes::from_owner(RingSlice { memory: self.memory.clone(), bid, len: len.min(self.memory.size) })
    }

    /// Gives buffer `bid` back to the kernel.
    pub(super) fn recycle(&mut self, bid: u16) {
        if bid < self.entries {
            self.put(bid);
            self.publish();
        }
    }

    /// Gives the buffers whose `Bytes` were dropped back to the kernel; returns how many.
    pub(super) fn reclaim(&mut self) -> usize {
        let mut returned = std::mem::take(&mut self.scratch);
        std::mem::swap(&mut *self.memory.returned.lock(), &mut returned);
        let n = returned.len();
        for bid in returned.drain(..) {
            if bid < self.entries {
                self.put(bid);
            }
        }
        if n > 0 {
            self.publish();
        }
        self.scratch = returned;
        n
    }
}

impl Drop for BufRing {
    fn drop(&mut self) {
        // SAFETY: allocated in `new` with this layout; the io_uring that used it was dropped first
        // (the worker declares its ring before its buffer ring).
        unsafe { std::alloc::dealloc(self.ring.as_ptr().cast(), self.layout) };
    }
}
