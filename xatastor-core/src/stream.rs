//! [`stream_copy`]: a 4 KiB copy with non-temporal stores, for the memory volumes' streaming writes
//! ([`nvmeof_target::MemoryBackend::with_stream_copy`]).
//!
//! An ordinary copy into memory that is not in the cache reads every destination line first (the
//! cache needs the whole line before it can take part of it), so a large write into a volume bigger
//! than the caches moves each byte over the memory bus twice and pushes the working set out of the
//! caches. A non-temporal store writes whole lines to memory without reading them or keeping them.
//! Measured on a 2-core VM, 128 KiB sequential writes to a 1 GiB memory volume over loopback: about
//! 5% more MiB/s than with the ordinary copy.

/// Copies `src` into `dst` with non-temporal stores on x86-64 (SSE2, part of the architecture's
/// baseline) when `dst` is 16-byte aligned (heap chunks are), and with an ordinary copy otherwise
/// or on other architectures. The stores are fenced before it returns: whoever reads `dst` next
/// (under the volume's lock) sees the data.
pub(crate) fn stream_copy(dst: &mut [u8; 4096], src: &[u8; 4096]) {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::x86_64::{__m128i, _mm_loadu_si128, _mm_sfence, _mm_stream_si128};
        if dst.as_ptr().align_offset(16) == 0 {
            for (d, s) in dst.chunks_exact_mut(16).zip(src.chunks_exact(16)) {
                // SAFETY: `s` is 16 readable bytes and `d` 16 writable bytes (`chunks_exact(16)`);
                // `d` is 16-byte aligned, as `_mm_stream_si128` requires, because `dst` is and every
                // chunk starts at a multiple of 16 into it; `_mm_loadu_si128` needs no alignment. SSE2
                // is enabled on every x86-64 target. The `_mm_sfence` below orders these stores
                // before anything that follows, as non-temporal stores need.
                unsafe {
                    _mm_stream_si128(d.as_mut_ptr().cast::<__m128i>(), _mm_loadu_si128(s.as_ptr().cast()))
                };
            }
            // SAFETY: SSE is enabled on every x86-64 target; the fence has no other requirement.
            unsafe { _mm_sfence() };
            return;
        }
    }
    dst.copy_from_slice(src);
}

#[cfg(test)]
mod tests {
    use super::stream_copy;

    #[test]
    fn copies_every_byte_to_aligned_and_unaligned_destinations() {
        let src: Box<[u8; 4096]> = Box::new(std::array::from_fn(|i| (i * 7 + 3) as u8));
        let mut aligned: Box<[u8; 4096]> = Box::new([0xAA; 4096]);
        assert_eq!(aligned.as_ptr().align_offset(16), 0, "heap chunks are 16-byte aligned");
        stream_copy(&mut aligned, &src);
        assert_eq!(aligned[..], src[..]);
        // An unaligned destination (1 byte into a buffer) takes the ordinary copy.
        let mut backing = vec![0x55u8; 4096 + 16];
        let at = (backing.as_ptr().align_offset(16) + 1) % 16;
        let dst: &mut [u8; 4096] = (&mut backing[at..at + 4096]).try_into().unwrap();
        stream_copy(dst, &src);
        assert_eq!(&backing[at..at + 4096], &src[..]);
        assert!(backing[..at].iter().all(|&b| b == 0x55) && backing[at + 4096..].iter().all(|&b| b == 0x55));
    }
}
