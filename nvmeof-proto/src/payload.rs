//! [`Payload`]: the data of a PDU as one or more [`Bytes`] segments, never copied by the codec.

use core::fmt;
use core::ops::{Bound, RangeBounds};

use bytes::{BufMut, Bytes, BytesMut};
use smallvec::SmallVec;

/// The data carried by a PDU: zero or more [`Bytes`] segments that together form one byte string.
///
/// Decoded PDUs carry a single segment that is a slice of the receive buffer. A sender may build a
/// payload from several segments (for example blocks of a thin volume stored apart) and the encoder
/// writes them with a vectored write and digests them in place. Equality compares contents, not
/// segmentation.
#[derive(Clone, Default)]
pub struct Payload {
    segments: SmallVec<[Bytes; 1]>,
    len: usize,
}

impl Payload {
    /// An empty payload.
    #[must_use]
    pub const fn new() -> Self {
        Self { segments: SmallVec::new_const(), len: 0 }
    }

    /// Appends a segment (empty segments are dropped).
    pub fn push(&mut self, segment: Bytes) {
        if !segment.is_empty() {
            self.len += segment.len();
            self.segments.push(segment);
        }
    }

    /// Total length in bytes.
    #[must_use]
    pub fn len(&self) -> usize {
        self.len
    }

    /// True if the payload has no bytes.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The segments, in order.
    #[must_use]
    pub fn segments(&self) -> &[Bytes] {
        &self.segments
    }

    /// The payload as one contiguous [`Bytes`]: free for zero or one segment, a copy otherwise.
    #[must_use]
    pub fn to_bytes(&self) -> Bytes {
        match self.segments.as_slice() {
            [] => Bytes::new(),
            [one] => one.clone(),
            many => {
                let mut out = BytesMut::with_capacity(self.len);
                for s in many {
                    out.put_slice(s);
                }
                out.freeze()
            }
        }
    }

    /// Copies the payload into `out`, which must be exactly [`Payload::len`] bytes long; returns false
    /// (and copies nothing) otherwise.
    pub fn copy_to_slice(&self, out: &mut [u8]) -> bool {
        if out.len() != self.len {
            return false;
        }
        let mut rest = out;
        for s in &self.segments {
            let (head, tail) = rest.split_at_mut(s.len());
            head.copy_from_slice(s);
            rest = tail;
        }
        true
    }

    /// A sub-range of the payload sharing its memory (no copy). Out-of-range bounds are clamped to the
    /// payload.
    #[must_use]
    pub fn slice(&self, range: impl RangeBounds<usize>) -> Payload {
        let start = match range.start_bound() {
            Bound::Included(&s) => s,
            Bound::Excluded(&s) => s.saturating_add(1),
            Bound::Unbounded => 0,
        }
        .min(self.len);
        let end = match range.end_bound() {
            Bound::Included(&e) => e.saturating_add(1),
            Bound::Excluded(&e) => e,
            Bound::Unbounded => self.len,
        }
        .clamp(start, self.len);
        let mut out = Payload::new();
        let mut pos = 0usize;
        for s in &self.segments {
            let (seg_start, seg_end) = (pos, pos + s.len());
            pos = seg_end;
            if seg_end <= start || seg_start >= end {
                continue;
            }
            let from = start.max(seg_start) - seg_start;
            let to = end.min(seg_end) - seg_start;
            out.push(s.slice(from..to));
        }
        out
    }

    /// CRC32C of the payload, computed segment by segment.
    #[must_use]
    pub fn crc32c(&self) -> u32 {
        crate::digest::crc32c_segments(&self.segments)
    }

    /// Iterates over the bytes of the payload (slow; for tests and diagnostics).
    pub fn iter_bytes(&self) -> impl Iterator<Item = u8> + '_ {
        self.segments.iter().flat_map(|s| s.iter().copied())
    }
}

impl From<Bytes> for Payload {
    fn from(b: Bytes) -> Self {
        let mut p = Payload::new();
        p.push(b);
        p
    }
}

impl From<Vec<u8>> for Payload {
    fn from(v: Vec<u8>) -> Self {
        Bytes::from(v).into()
    }
}

impl From<&'static [u8]> for Payload {
    fn from(v: &'static [u8]) -> Self {
        Bytes::from_static(v).into()
    }
}

impl FromIterator<Bytes> for Payload {
    fn from_iter<T: IntoIterator<Item = Bytes>>(iter: T) -> Self {
        let mut p = Payload::new();
        for b in iter {
            p.push(b);
        }
        p
    }
}

impl PartialEq for Payload {
    fn eq(&self, other: &Self) -> bool {
        self.len == other.len && self.iter_bytes().eq(other.iter_bytes())
    }
}

impl Eq for Payload {}

impl PartialEq<[u8]> for Payload {
    fn eq(&self, other: &[u8]) -> bool {
        self.len == other.len() && self.iter_bytes().eq(other.iter().copied())
    }
}

impl fmt::Debug for Payload {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Payload({} bytes in {} segments", self.len, self.segments.len())?;
        let head: Vec<u8> = self.iter_bytes().take(16).collect();
        if !head.is_empty() {
            write!(f, ", starts {head:02x?}")?;
        }
        f.write_str(")")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn three_segments() -> Payload {
        [
            Bytes::from_static(b"abc"),
            Bytes::from_static(b""),
            Bytes::from_static(b"defgh"),
            Bytes::from_static(b"ij"),
        ]
        .into_iter()
        .collect()
    }

    #[test]
    fn length_and_segments() {
        let p = three_segments();
        assert_eq!(p.len(), 10);
        assert_eq!(p.segments().len(), 3, "empty segments are dropped");
        assert_eq!(p.to_bytes(), Bytes::from_static(b"abcdefghij"));
        assert_eq!(p, Payload::from(Bytes::from_static(b"abcdefghij")));
    }

    #[test]
    fn slice_crosses_segments_without_copy() {
        let p = three_segments();
        let s = p.slice(2..9);
        assert_eq!(s.to_bytes(), Bytes::from_static(b"cdefghi"));
        assert_eq!(s.segments().len(), 3);
        assert_eq!(p.slice(..).len(), 10);
        let (hi, lo) = (8, 4);
        assert!(p.slice(hi..lo).is_empty());
        assert!(p.slice(50..).is_empty());
        assert_eq!(p.slice(..=0).to_bytes(), Bytes::from_static(b"a"));
    }

    #[test]
    fn copy_to_slice_checks_length() {
        let p = three_segments();
        let mut out = [0u8; 10];
        assert!(p.copy_to_slice(&mut out));
        assert_eq!(&out, b"abcdefghij");
        assert!(!p.copy_to_slice(&mut [0u8; 9]));
    }

    #[test]
    fn crc_matches_contiguous() {
        assert_eq!(three_segments().crc32c(), crate::digest::crc32c(b"abcdefghij"));
    }
}
