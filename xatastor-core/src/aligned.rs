//! [`AlignedBuf`]: zero-initialised heap memory with a chosen alignment, for `O_DIRECT` I/O.
//!
//! Direct I/O needs the buffer address, the file offset and the length to be multiples of the
//! device's logical block size. Buffers that arrive from the network (slices of a receive buffer) are
//! not aligned, so writes to an `O_DIRECT` device (the server's ring, zvol-backend's synchronous path)
//! copy them into an `AlignedBuf` ("bounce buffer") unless they happen to be aligned; reads land in
//! one and are handed to the engine without a copy via [`AlignedBuf::into_bytes`]
//! (`Bytes::from_owner`).

use std::alloc::{self, Layout};
use std::fmt;
use std::ptr::NonNull;

use bytes::Bytes;

/// A zero-initialised, fixed-size heap buffer whose address is a multiple of its alignment.
pub struct AlignedBuf {
    ptr: NonNull<u8>,
    len: usize,
    layout: Layout,
}

// SAFETY: `AlignedBuf` owns its allocation exclusively (like `Box<[u8]>`); nothing is shared between
// threads except through `&`/`&mut` borrows, which the borrow checker governs.
unsafe impl Send for AlignedBuf {}
// SAFETY: `&AlignedBuf` only gives out `&[u8]`; there is no interior mutability.
unsafe impl Sync for AlignedBuf {}

impl AlignedBuf {
    /// A buffer of `len` zero bytes aligned to `align` (a power of two; values below 1 are taken as 1).
    ///
    /// Returns `None` if `align` is not a power of two or the size overflows; aborts like `Vec` if the
    /// allocator fails.
    #[must_use]
    pub fn zeroed(len: usize, align: usize) -> Option<Self> {
        let align = align.max(1);
        // A zero-size allocation is not allowed; keep at least one aligned unit.
        let size = len.max(1).checked_next_multiple_of(align)?;
        let layout = Layout::from_size_align(size, align).ok()?;
        // SAFETY: `layout` has a non-zero size (at least `align` ≥ 1 bytes).
        let raw = unsafe { alloc::alloc_zeroed(layout) };
        let Some(ptr) = NonNull::new(raw) else { alloc::handle_alloc_error(layout) };
        Some(Self { ptr, len, layout })
    }

    /// A buffer holding a copy of `data`, aligned to `align`.
    #[must_use]
    pub fn copy_from(data: &[u8], align: usize) -> Option<Self> {
        let mut buf = Self::zeroed(data.len(), align)?;
        buf.as_mut_slice().copy_from_slice(data);
        Some(buf)
    }

    /// Length in bytes (as asked for; the allocation may be larger).
    #[must_use]
    pub fn len(&self) -> usize {
        self.len
    }

    /// True for a zero-length buffer.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The alignment of the buffer's address.
    #[must_use]
    pub fn align(&self) -> usize {
        self.layout.align()
    }

    /// The bytes.
    #[must_use]
    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: `ptr` points to an allocation of `layout.size() >= len` initialised (zeroed) bytes
        // that lives as long as `self`; the returned borrow is tied to `&self`.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }

    /// The bytes, mutably.
    #[must_use]
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: as in `as_slice`, and `&mut self` guarantees the borrow is unique.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }

    /// Shortens the buffer to `len` bytes (no effect if `len` is not shorter).
    pub fn truncate(&mut self, len: usize) {
        self.len = self.len.min(len);
    }

    /// Turns the buffer into [`Bytes`] without copying (the `Bytes` owns the allocation).
    #[must_use]
    pub fn into_bytes(self) -> Bytes {
        Bytes::from_owner(self)
    }
}

impl AsRef<[u8]> for AlignedBuf {
    fn as_ref(&self) -> &[u8] {
        self.as_slice()
    }
}

impl AsMut<[u8]> for AlignedBuf {
    fn as_mut(&mut self) -> &mut [u8] {
        self.as_mut_slice()
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        // SAFETY: `ptr` was returned by `alloc_zeroed(self.layout)` and is freed exactly once, here.
        unsafe { alloc::dealloc(self.ptr.as_ptr(), self.layout) };
    }
}

impl fmt::Debug for AlignedBuf {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AlignedBuf").field("len", &self.len).field("align", &self.align()).finish()
    }
}

/// True if `ptr` is a multiple of `align` (a power of two).
#[must_use]
pub fn is_aligned_ptr(ptr: *const u8, align: usize) -> bool {
    align <= 1 || (ptr as usize) % align == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aligned_zeroed_and_owned_by_bytes() {
        for (len, align) in [(0, 512), (1, 512), (4096, 4096), (5000, 512), (3, 1)] {
            let mut b = AlignedBuf::zeroed(len, align).unwrap();
            assert_eq!(b.len(), len);
            assert!(is_aligned_ptr(b.as_slice().as_ptr(), align));
            assert!(b.as_slice().iter().all(|&x| x == 0));
            b.as_mut_slice().fill(7);
            let bytes = b.into_bytes();
            assert_eq!(bytes.len(), len);
            assert!(bytes.iter().all(|&x| x == 7));
            assert!(is_aligned_ptr(bytes.as_ptr(), align), "no copy: the Bytes points at the aligned memory");
        }
        assert!(AlignedBuf::zeroed(10, 3).is_none(), "alignment must be a power of two");
        assert!(AlignedBuf::zeroed(usize::MAX, 4096).is_none(), "overflow is refused, not a panic");
        let c = AlignedBuf::copy_from(b"abc", 512).unwrap();
        assert_eq!(c.as_ref(), b"abc");
    }
}
