//! The worker's receive buffers: an io_uring provided-buffer ring.
//!
//! `entries` buffers of `size` bytes are shared by all the connections of a worker. For each
//! multishot receive completion the kernel picks a buffer; the worker copies the bytes out (into the
//! connection's reassembly buffer) and hands the buffer back at once, so an idle connection holds no
//! receive buffer. All of this module's `unsafe` is the shared memory of the ring.

use std::io;
use std::sync::atomic::{AtomicU16, Ordering};

use io_uring::types::BufRingEntry;

/// The buffer group of the receive buffers.
pub(super) const BUF_GROUP: u16 = 0;

pub(super) struct BufRing {
    ring: std::ptr::NonNull<BufRingEntry>,
    layout: std::alloc::Layout,
    buffers: Box<[u8]>,
    size: usize,
    entries: u16,
    tail: u16,
}

impl BufRing {
    /// `count` buffers (rounded up to a power of two, at most 32768) of `size` bytes.
    pub(super) fn new(count: u16, size: usize) -> io::Result<Self> {
        let entries = count.clamp(1, 32768).next_power_of_two();
        let bytes = usize::from(entries) * std::mem::size_of::<BufRingEntry>();
        let layout = std::alloc::Layout::from_size_align(bytes.max(4096), 4096).map_err(io::Error::other)?;
        // SAFETY: the layout has a non-zero size.
        let raw = unsafe { std::alloc::alloc_zeroed(layout) };
        let ring = std::ptr::NonNull::new(raw.cast::<BufRingEntry>())
            .ok_or_else(|| io::Error::new(io::ErrorKind::OutOfMemory, "cannot allocate the buffer ring"))?;
        let buffers = vec![0u8; usize::from(entries) * size].into_boxed_slice();
        let mut r = Self { ring, layout, buffers, size, entries, tail: 0 };
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

    /// Writes buffer `bid` into the next free ring entry (made visible by [`BufRing::publish`]).
    fn put(&mut self, bid: u16) {
        let index = usize::from(self.tail & (self.entries - 1));
        // SAFETY: `index` < `entries`, the number of entries allocated; the kernel only reads entries
        // between its head and the published tail, and this one is past the published tail.
        let entry = unsafe { &mut *self.ring.as_ptr().add(index) };
        let addr = self.buffers.as_ptr() as u64 + u64::from(bid) * self.size as u64;
        entry.set_addr(addr);
        entry.set_len(self.size as u32);
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

    /// The first `len` bytes of buffer `bid`.
    pub(super) fn get(&self, bid: u16, len: usize) -> &[u8] {
        let start = usize::from(bid) * self.size;
        self.buffers.get(start..start + len.min(self.size)).unwrap_or_default()
    }

    /// Gives buffer `bid` back to the kernel.
    pub(super) fn recycle(&mut self, bid: u16) {
        if bid < self.entries {
            self.put(bid);
            self.publish();
        }
    }
}

impl Drop for BufRing {
    fn drop(&mut self) {
        // SAFETY: allocated in `new` with this layout; the io_uring that used it was dropped first
        // (the worker declares its ring before its buffer ring).
        unsafe { std::alloc::dealloc(self.ring.as_ptr().cast(), self.layout) };
    }
}
