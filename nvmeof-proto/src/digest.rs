//! CRC32C header and data digests.
//!
//! NVMe/TCP digests are the CRC32C (Castagnoli) of the protected bytes, transmitted little endian. The
//! `crc32c` crate uses the SSE 4.2 / ARMv8 CRC instructions where the CPU has them and a table-driven
//! fallback elsewhere.

use bytes::Bytes;

/// Length in bytes of a header or data digest.
pub const DIGEST_LEN: usize = 4;

/// CRC32C of `data`.
#[must_use]
#[inline]
pub fn crc32c(data: &[u8]) -> u32 {
    crc32c::crc32c(data)
}

/// CRC32C over several segments, as if they were one contiguous buffer (no gathering copy).
#[must_use]
pub fn crc32c_segments<'a, I>(segments: I) -> u32
where
    I: IntoIterator<Item = &'a Bytes>,
{
    segments.into_iter().fold(0, |crc, seg| crc32c::crc32c_append(crc, seg))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn standard_check_value() {
        // The CRC32C check value from the CRC catalogue.
        assert_eq!(crc32c(b"123456789"), 0xe306_9283);
    }

    #[test]
    fn segments_equal_contiguous() {
        let data: Vec<u8> = (0..=255u8).cycle().take(10_000).collect();
        let whole = crc32c(&data);
        let b = Bytes::from(data);
        let segs = [b.slice(..1), b.slice(1..4097), b.slice(4097..)];
        assert_eq!(crc32c_segments(&segs), whole);
        assert_eq!(crc32c_segments(&[] as &[Bytes]), crc32c(&[]));
    }
}
