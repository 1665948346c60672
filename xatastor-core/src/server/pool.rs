//! Aligned read buffers for `O_DIRECT` devices, recycled instead of allocated per read.
//!
//! A read's data leaves the worker as a `Bytes` that owns a [`Pooled`] buffer; when the last
//! reference goes (the response was written to the socket), the buffer returns to its worker's pool.
//! Buffers come in power-of-two size classes from 4 KiB; each class keeps at most 1 MiB (and at
//! least 4 buffers), so a worker's pool holds a few MiB at most whatever the load was.

use std::sync::Arc;

use parking_lot::Mutex;

use crate::aligned::AlignedBuf;

/// Smallest size class (and the alignment every pooled buffer has).
const MIN_CLASS: usize = 4096;
/// Size classes: 4 KiB … 2 MiB. Larger reads are not pooled.
const CLASSES: usize = 10;
/// Bytes a class keeps at most (but at least 4 buffers).
const CLASS_BYTES: usize = 1 << 20;

#[derive(Default)]
pub(super) struct ReadPool {
    classes: [Mutex<Vec<AlignedBuf>>; CLASSES],
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
        let recycled = self.classes.get(class).and_then(|c| c.lock().pop());
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
            let mut free = c.lock();
            if free.len() < (CLASS_BYTES / size).max(4) {
                free.push(buf);
            }
        }
    }

    /// Buffers held for reuse (for tests and statistics).
    #[cfg(test)]
    fn held(&self) -> usize {
        self.classes.iter().map(|c| c.lock().len()).sum()
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

    /// Zeroes the bytes from `from` on (after a short read).
    pub(super) fn zero_from(&mut self, from: usize) {
        if let Some(tail) = self.buf.as_mut().and_then(|b| b.as_mut_slice().get_mut(from..self.len)) {
            tail.fill(0);
        }
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
}
