//! The worker's receive buffers: an io_uring provided-buffer ring.
//!
//! `entries` buffers of `size` bytes are shared by all the connections of a worker. For each
//! multishot receive completion the kernel picks a buffer and hands it to the worker, which either
//! decodes PDUs from it in place ([`BufRing::take`]: a slice of the buffer's `Bytes`, whose PDUs'
//! data are slices of it in turn) or copies the bytes out and hands it back at once
//! ([`BufRing::get`] + [`BufRing::recycle`]). An idle connection holds no receive buffer.
//!
//! Each buffer is a `Bytes` made once, when the ring is built. Taking a buffer clones it (a
//! reference count, no allocation); [`BufRing::reclaim`] gives a taken buffer back to the kernel
//! once the ring's own handle is the only one left.
//!
//! All of this module's `unsafe` is the memory shared with the kernel. The kernel writes a buffer
//! only while it is in the ring (between [`BufRing::recycle`] or [`BufRing::reclaim`] and the
//! completion that names it); the worker reads a buffer only between that completion and its
//! return to the ring, so the two never touch the same buffer at the same time.

use std::io;
use std::ptr::NonNull;
use std::sync::atomic::{fence, AtomicU16, Ordering};

use bytes::Bytes;
use io_uring::types::BufRingEntry;

/// The buffer group of the receive buffers.
pub(super) const BUF_GROUP: u16 = 0;

pub(super) struct BufRing {
    ring: NonNull<BufRingEntry>,
    layout: std::alloc::Layout,
    /// The buffers, by buffer id. A buffer in the ring is never dereferenced: the kernel may be
    /// writing it. Handles to a taken buffer keep its memory alive after the ring is gone.
    buffers: Vec<Bytes>,
    /// Where each buffer's memory starts, as the kernel is told it.
    addrs: Vec<u64>,
    /// Each buffer's size.
    size: usize,
    entries: u16,
    tail: u16,
    /// Buffers out as `Bytes` ([`BufRing::take`]) and not back in the ring yet.
    out: Vec<u16>,
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
        if size == 0 || usize::from(entries).checked_mul(size).is_none() {
            // SAFETY: allocated just above with this layout.
            unsafe { std::alloc::dealloc(raw, layout) };
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "receive buffers: size × count is out of range",
            ));
        }
        let mut buffers = Vec::with_capacity(usize::from(entries));
        let mut addrs = Vec::with_capacity(usize::from(entries));
        for _ in 0..entries {
            let mut memory = vec![0u8; size];
            // The address the kernel writes to, taken from the vector that owns the memory; turning
            // it into `Bytes` keeps the same allocation (its length equals its capacity).
            let addr = memory.as_mut_ptr() as u64;
            let buffer = Bytes::from(memory);
            if buffer.as_ptr() as u64 != addr {
                // SAFETY: allocated just above with this layout.
                unsafe { std::alloc::dealloc(raw, layout) };
                return Err(io::Error::other("receive buffer moved when shared"));
            }
            // Share it once now, so that taking it later clones a reference count and never
            // allocates.
            drop(buffer.clone());
            buffers.push(buffer);
            addrs.push(addr);
        }
        let mut r = Self {
            ring,
            layout,
            buffers,
            addrs,
            size,
            entries,
            tail: 0,
            out: Vec::with_capacity(usize::from(entries)),
        };
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
        self.out.len()
    }

    /// Writes buffer `bid` into the next free ring entry (made visible by [`BufRing::publish`]).
    ///
    /// From then on the kernel may write the buffer, until the completion that names it. The
    /// callers hand over only buffers nobody reads: fresh ones, ones whose [`BufRing::get`] borrow
    /// has ended, and taken ones whose handles [`BufRing::reclaim`] found all dropped. The ring's own
    /// handle is never dereferenced while the buffer is in the ring.
    fn put(&mut self, bid: u16) {
        let index = usize::from(self.tail & (self.entries - 1));
        let Some(&addr) = self.addrs.get(usize::from(bid)) else { return };
        // SAFETY: `index` < `entries`, the number of entries allocated; the kernel only reads entries
        // between its head and the published tail, and this one is past the published tail.
        let entry = unsafe { &mut *self.ring.as_ptr().add(index) };
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

    /// The first `len` bytes of buffer `bid`, which a receive completion just handed over; call
    /// [`BufRing::recycle`] when done with them.
    pub(super) fn get(&self, bid: u16, len: usize) -> &[u8] {
        match self.buffers.get(usize::from(bid)) {
            // The buffer left the ring with the completion that named it, and goes back only through
            // `&mut self`, which this borrow prevents while it lives.
            Some(buffer) => buffer.get(..len.min(self.size)).unwrap_or_default(),
            None => &[],
        }
    }

    /// Buffer `bid`, which a receive completion just handed over with `len` bytes, as `Bytes` to
    /// decode in place; it returns to the ring (through [`BufRing::reclaim`]) once every `Bytes`
    /// made from it is dropped. Allocates nothing.
    pub(super) fn take(&mut self, bid: u16, len: usize) -> Bytes {
        match self.buffers.get(usize::from(bid)) {
            Some(buffer) => {
                self.out.push(bid);
                buffer.slice(..len.min(self.size))
            }
            None => Bytes::new(),
        }
    }

    /// Gives buffer `bid` back to the kernel.
    pub(super) fn recycle(&mut self, bid: u16) {
        if bid < self.entries {
            self.put(bid);
            self.publish();
        }
    }

    /// Gives the taken buffers whose `Bytes` were all dropped back to the kernel; returns how many.
    pub(super) fn reclaim(&mut self) -> usize {
        let mut out = std::mem::take(&mut self.out);
        let before = out.len();
        out.retain(|&bid| {
            match self.buffers.get(usize::from(bid)) {
                Some(buffer) if !buffer.is_unique() => return true,
                Some(_) => {}
                None => return false,
            }
            // The last other handle may have been dropped on another thread: order its reads of
            // the buffer before the kernel's next write into it (the drop released the count).
            fence(Ordering::Acquire);
            self.put(bid);
            false
        });
        let n = before - out.len();
        self.out = out;
        if n > 0 {
            self.publish();
        }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_taken_buffer_goes_back_once_every_handle_is_dropped() {
        let mut ring = BufRing::new(4, 4096).unwrap();
        assert_eq!(ring.entries(), 4);
        let taken = ring.take(2, 100);
        assert_eq!(taken.len(), 100);
        let pdu = taken.slice(10..20);
        assert_eq!(ring.held(), 1);
        drop(taken);
        assert_eq!(ring.reclaim(), 0, "a slice of it is still alive");
        assert_eq!(ring.held(), 1);
        drop(pdu);
        assert_eq!(ring.reclaim(), 1);
        assert_eq!(ring.held(), 0);
        assert_eq!(ring.reclaim(), 0, "given back once");
    }

    #[test]
    fn lengths_and_ids_out_of_range_are_clamped_or_empty() {
        let mut ring = BufRing::new(2, 4096).unwrap();
        assert_eq!(ring.get(1, 1 << 20).len(), 4096);
        assert!(ring.get(7, 10).is_empty());
        assert!(ring.take(7, 10).is_empty());
        assert_eq!(ring.held(), 0);
        assert_eq!(ring.take(0, 1 << 20).len(), 4096);
    }

    #[test]
    fn taken_bytes_outlive_the_ring() {
        let mut ring = BufRing::new(2, 4096).unwrap();
        let taken = ring.take(1, 64);
        drop(ring);
        assert_eq!(&taken[..], &[0u8; 64][..]);
    }
}
