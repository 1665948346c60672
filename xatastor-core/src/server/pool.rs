//! Aligned buffers for `O_DIRECT` devices, recycled instead of allocated per request: read data,
//! and write PDUs a direct-mode connection receives (see `conn.rs`).
//!
//! A read's data leaves the worker as a `Bytes` that owns a [`Pooled`] buffer; when the last
//! reference goes (the response was written to the socket), the buffer returns to its worker's pool.
//! A received write PDU does the same once the device has written its data.
//! Buffers come in power-of-two size classes from 4 KiB; each class keeps at most 1 MiB (and at
//! least 4 buffers), so a worker's pool holds a few MiB at most whatever the load was.

use std::sync::Arc;

use parking_lot::Mutex;

use crate::aligned::AlignedBuf;

/// Smallest size class (and the alignment every pooled buffer has).
pub(super) const MIN_CLASS: usize = 4096;
/// Size classes: 4 KiB … 2 MiB. Larger reads are not pooled.
const CLASSES: usize = 10;
/// Bytes a class keeps at most (but at least 4 buffers).
const CLASS_BYTES: usize = 1 << 20;

#[derive(Default)]
pub(super) struct ReadPool {
    classes: [Mutex<Class>; CLASSES],
}

/// One size class: its free buffers, and how many of its buffers exist (free or in use).
#[derive(Default)]
struct Class {
    free: Vec<AlignedBuf>,
    made: usize,
}

/// Buffers a class of `size`-byte buffers keeps.
fn cap_of(size: usize) -> usize {
    (CLASS_BYTES / size).max(4)
}

impl std::fmt::Debug for ReadPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReadPool").finish_non_exhaustive()
    }
}

/// The class of a request of `len` bytes, if pooled.
fn class_of(len: usize) -> Option<(usize, usize)> {
    let size = len.max(MIN_CLASS).checked_next_power_of_two()?;
    let class = (size / MIN_CLASS).trailing_zeros() as usize;
    (class < CLASSES).then_some((class, size))
}

impl ReadPool {
    /// A buffer of at least `len` bytes aligned to `align` (≤ 4096), from the pool when it has one.
    /// Its contents are stale: the read overwrites them (a short read's tail is zeroed on completion).
    pub(super) fn take(self: &Arc<Self>, len: usize, align: usize) -> Option<Pooled> {
        let Some((class, size)) = class_of(len).filter(|_| align <= MIN_CLASS) else {
            return Some(Pooled { buf: Some(AlignedBuf::zeroed(len, align)?), len, pool: None });
        };
        self.take_from(class, size, len, usize::MAX)
    }

    /// Like [`ReadPool::take`] with 4096 alignment, but only while the class has a free buffer or
    /// has made fewer than it keeps: past that, `None` (the caller uses memory of its own rather
    /// than a zeroed allocation of a whole class size).
    pub(super) fn take_kept(self: &Arc<Self>, len: usize) -> Option<Pooled> {
        let (class, size) = class_of(len)?;
        self.take_from(class, size, len, cap_of(size))
    }

    /// A free buffer of the class, or a new one while the class has made fewer than `limit`.
    fn take_from(self: &Arc<Self>, class: usize, size: usize, len: usize, limit: usize) -> Option<Pooled> {
        let c = self.classes.get(class)?;
        let recycled = {
            let mut c = c.lock();
            match c.free.pop() {
                Some(b) => Some(b),
                None if c.made < limit => {
                    c.made += 1;
                    None
                }
                None => return None,
            }
        };
        let buf = match recycled {
            Some(b) => b,
            None => AlignedBuf::zeroed(size, MIN_CLASS)?,
        };
        Some(Pooled { buf: Some(buf), len, pool: Some(self.clone()) })
    }

    fn give_back(&self, buf: AlignedBuf) {
        let Some((class, size)) = class_of(buf.len()) else { return };
        if buf.len() != size {
            return;
        }
        if let Some(c) = self.classes.get(class) {
            let mut c = c.lock();
            if c.free.len() < cap_of(size) {
                c.free.push(buf);
            } else {
                c.made = c.made.saturating_sub(1);
            }
        }
    }

    /// Buffers held for reuse (for tests and statistics).
    #[cfg(test)]
    pub(super) fn held(&self) -> usize {
        self.classes.iter().map(|c| c.lock().free.len()).sum()
    }
}

/// A buffer of the pool holding a read's data; it goes back to the pool when dropped.
pub(super) struct Pooled {
    buf: Option<AlignedBuf>,
    len: usize,
    pool: Option<Arc<ReadPool>>,
}

impl Pooled {
    /// Where the kernel writes the read's `len` bytes.
    pub(super) fn as_mut_ptr(&mut self) -> *mut u8 {
        self.buf.as_mut().map_or(std::ptr::null_mut(), |b| b.as_mut_slice().as_mut_ptr())
    }

    /// Bytes the buffer holds (its size class; at least the length asked for).
    pub(super) fn capacity(&self) -> usize {
        self.buf.as_ref().map_or(0, AlignedBuf::len)
    }

    /// The whole buffer, up to its capacity (initialised memory: zeros or an earlier use's bytes).
    pub(super) fn as_mut_full(&mut self) -> &mut [u8] {
        self.buf.as_mut().map_or(&mut [], AlignedBuf::as_mut_slice)
    }

    /// Sets how many bytes, from the start, the buffer shows ([`AsRef`]); at most its capacity.
    pub(super) fn set_len(&mut self, len: usize) {
        self.len = len.min(self.capacity());
    }

    /// Zeroes the bytes from `from` on (after a short read).
    pub(super) fn zero_from(&mut self, from: usize) {
        if let Some(tail) = self.buf.as_mut().and_then(|b| b.as_mut_slice().get_mut(from..self.len)) {
            tail.fill(0);
        }
    }
}

impl std::fmt::Debug for Pooled {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pooled").field("len", &self.len).field("capacity", &self.capacity()).finish()
    }
}

impl AsRef<[u8]> for Pooled {
    fn as_ref(&self) -> &[u8] {
        self.buf.as_ref().and_then(|b| b.as_slice().get(..self.len)).unwrap_or_default()
    }
}

impl Drop for Pooled {
    fn drop(&mut self) {
        if let (Some(pool), Some(buf)) = (self.pool.take(), self.buf.take()) {
            pool.give_back(buf);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffers_return_to_their_class_and_the_pool_is_bounded() {
        let pool = Arc::new(ReadPool::default());
        let mut a = pool.take(4096, 512).unwrap();
        let ptr = a.as_mut_ptr();
        assert_eq!(ptr as usize % 4096, 0);
        assert_eq!(a.as_ref().len(), 4096);
        drop(a);
        assert_eq!(pool.held(), 1);
        let mut b = pool.take(3000, 512).unwrap();
        assert_eq!(b.as_mut_ptr(), ptr, "the same buffer comes back");
        assert_eq!(b.as_ref().len(), 3000);
        b.zero_from(1000);
        assert!(b.as_ref()[1000..].iter().all(|&x| x == 0));
        drop(b);
        let many: Vec<Pooled> = (0..600).map(|_| pool.take(4096, 4096).unwrap()).collect();
        drop(many);
        assert_eq!(pool.held(), 256, "a class keeps 1 MiB at most");
        let big = pool.take(8 << 20, 4096).unwrap();
        assert_eq!(big.as_ref().len(), 8 << 20);
        drop(big);
        assert_eq!(pool.held(), 256, "reads beyond the largest class are not pooled");
    }

    #[test]
    fn take_kept_makes_no_more_buffers_than_a_class_keeps() {
        let pool = Arc::new(ReadPool::default());
        // The 16 KiB class keeps 64 buffers.
        let out: Vec<Pooled> = (0..64).map(|_| pool.take_kept(9000).expect("under the cap")).collect();
        assert!(pool.take_kept(9000).is_none(), "the 65th would be a zeroed allocation");
        assert!(pool.take_kept(5000).is_some(), "other classes have their own");
        drop(out);
        assert_eq!(pool.held(), 64 + 1);
        let again: Vec<Pooled> = (0..64).map(|_| pool.take_kept(16384).expect("free ones")).collect();
        assert!(pool.take_kept(16384).is_none());
        drop(again);
        // Reads may make more than the class keeps; what comes back beyond it is freed, and the
        // count follows, so the receive path can make buffers again.
        let reads: Vec<Pooled> = (0..70).map(|_| pool.take(16384, 4096).unwrap()).collect();
        assert!(pool.take_kept(16384).is_none());
        drop(reads);
        assert_eq!(pool.held(), 64 + 1);
        let mut held: Vec<Pooled> = (0..64).map(|_| pool.take_kept(16384).unwrap()).collect();
        assert!(pool.take_kept(16384).is_none());
        held.pop();
        assert!(pool.take_kept(16384).is_some());
    }
}
