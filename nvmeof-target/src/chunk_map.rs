//! The chunk map of [`crate::MemoryBackend`]: 4 KiB chunks by number, in leaves of 64.
//!
//! ```text
//!   leaves: chunk_no / 64 ──(hash map, multiplicative hash)──▶ Leaf [Option<Bytes>; 64]
//!                                                                   └─ chunk_no % 64
//! ```
//!
//! A lookup hashes the leaf number (a multiply) and indexes the leaf: the leaf table of a 1 GiB
//! volume (4096 leaves) stays in cache, and the chunk's slot costs one more cache line — half the
//! misses of a map with an entry per chunk. An unwritten volume holds no leaf (an empty map does not
//! allocate); a leaf holds 64 slots of 16 bytes (1 KiB per 256 KiB of address space touched).
//!
//! A chunk a volume alone holds is [`Chunk::Own`]: a write changes it in place with no atomic
//! operation (on a large volume the chunk's memory is cold, and a reference count there would be
//! one more cache miss per write). Taking a snapshot or a clone turns the chunks of both sides into
//! [`Chunk::Shared`] (a reference-counted handle to the same memory; the data is not copied); a
//! write to a shared chunk that another volume still holds writes a new chunk.

use std::sync::Arc;

use crate::hash::IntMap;

/// Chunks per leaf.
const LEAF: u64 = 64;

/// Bytes per chunk.
pub(crate) const CHUNK: usize = 4096;

/// One chunk's data.
pub(crate) type Data = [u8; CHUNK];

/// A chunk: owned by one volume, or shared with snapshots and clones.
pub(crate) enum Chunk {
    Own(Box<Data>),
    /// The extra allocation is deliberate: sharing a chunk moves its data's `Box` into an `Arc`
    /// without copying the 4 KiB, and `Arc::try_unwrap` gives the same `Box` back.
    #[allow(clippy::redundant_allocation)]
    Shared(Arc<Box<Data>>),
}

/// A chunk of zeros, on the heap (no 4 KiB temporary on the stack).
fn zeroed() -> Box<Data> {
    let v: Box<[u8]> = vec![0u8; CHUNK].into_boxed_slice();
    v.try_into().unwrap_or_else(|_| Box::new([0; CHUNK]))
}

impl Chunk {
    /// A new chunk holding a copy of `data` (zeros after it).
    pub(crate) fn new(data: &[u8]) -> Chunk {
        let mut d = zeroed();
        let n = data.len().min(CHUNK);
        if let (Some(dst), Some(src)) = (d.get_mut(..n), data.get(..n)) {
            dst.copy_from_slice(src);
        }
        Chunk::Own(d)
    }

    /// The bytes.
    pub(crate) fn bytes(&self) -> &Data {
        match self {
            Chunk::Own(d) => d,
            Chunk::Shared(d) => d,
        }
    }

    /// True if no other volume holds the chunk (a write may change it in place).
    #[cfg(test)]
    pub(crate) fn is_own(&self) -> bool {
        matches!(self, Chunk::Own(_))
    }
}

/// Makes the chunk in `slot` shared (if it is not) and returns another handle to it.
fn share(slot: &mut Option<Chunk>) -> Option<Chunk> {
    let arc = match slot.take()? {
        Chunk::Own(d) => Arc::new(d),
        Chunk::Shared(a) => a,
    };
    *slot = Some(Chunk::Shared(arc.clone()));
    Some(Chunk::Shared(arc))
}

/// The bytes of the chunk in `slot`, to change: in place if no other volume holds it, else in a
/// private copy the slot takes.
fn make_mut(slot: &mut Option<Chunk>) -> Option<&mut Data> {
    let own = match slot.take()? {
        Chunk::Own(d) => d,
        Chunk::Shared(arc) => Arc::try_unwrap(arc).unwrap_or_else(|shared| {
            let mut copy = zeroed();
            copy.copy_from_slice(&shared[..]);
            copy
        }),
    };
    *slot = Some(Chunk::Own(own));
    match slot {
        Some(Chunk::Own(d)) => Some(d),
        _ => None,
    }
}

struct Leaf {
    slots: [Option<Chunk>; LEAF as usize],
    used: u8,
}

/// Chunks by number; see the module documentation.
#[derive(Default)]
pub(crate) struct ChunkMap {
    leaves: IntMap<u64, Box<Leaf>>,
    len: usize,
}

impl std::fmt::Debug for ChunkMap {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChunkMap").field("chunks", &self.len).field("leaves", &self.leaves.len()).finish()
    }
}

impl ChunkMap {
    /// Chunks held.
    pub(crate) fn len(&self) -> usize {
        self.len
    }

    /// The chunk `no`, if written.
    pub(crate) fn get(&self, no: u64) -> Option<&Chunk> {
        self.leaves.get(&(no / LEAF))?.slots.get((no % LEAF) as usize)?.as_ref()
    }

    /// A handle to chunk `no`'s memory for a reader that keeps it past the map's lock (the chunk
    /// becomes shared: a write before the handle is dropped writes a new chunk), if written.
    #[allow(clippy::redundant_allocation)] // see `Chunk::Shared`
    pub(crate) fn share_one(&mut self, no: u64) -> Option<Arc<Box<Data>>> {
        match share(self.leaves.get_mut(&(no / LEAF))?.slots.get_mut((no % LEAF) as usize)?)? {
            Chunk::Shared(a) => Some(a),
            Chunk::Own(_) => None,
        }
    }

    /// Replaces all of chunk `no` with `src` (`CHUNK` bytes): in its memory if no other volume holds
    /// it (with `copy`, if given), else (or if it was never written) in new memory, without copying
    /// the old bytes first.
    pub(crate) fn overwrite(&mut self, no: u64, src: &Data, copy: Option<fn(&mut Data, &Data)>) {
        let slot = self.leaves.get_mut(&(no / LEAF)).and_then(|l| l.slots.get_mut((no % LEAF) as usize));
        if let Some(slot) = slot {
            let own = match slot.take() {
                Some(Chunk::Own(d)) => Some(d),
                Some(Chunk::Shared(arc)) => Arc::try_unwrap(arc).ok(),
                None => None,
            };
            if let Some(mut d) = own {
                match copy {
                    Some(copy) => copy(&mut d, src),
                    None => d.copy_from_slice(src),
                }
                *slot = Some(Chunk::Own(d));
                return;
            }
        }
        // Allocated and copied in one go (no zeroing, no copy through the stack).
        let fresh: Box<[u8]> = Box::from(&src[..]);
        self.insert(no, Chunk::Own(fresh.try_into().unwrap_or_else(|_| Box::new(*src))));
    }

    /// The bytes of chunk `no` to change (in place, or in a private copy if it is shared), if
    /// written.
    pub(crate) fn make_mut(&mut self, no: u64) -> Option<&mut Data> {
        make_mut(self.leaves.get_mut(&(no / LEAF))?.slots.get_mut((no % LEAF) as usize)?)
    }

    /// Sets chunk `no`.
    pub(crate) fn insert(&mut self, no: u64, chunk: Chunk) {
        let leaf = self
            .leaves
            .entry(no / LEAF)
            .or_insert_with(|| Box::new(Leaf { slots: std::array::from_fn(|_| None), used: 0 }));
        if let Some(slot) = leaf.slots.get_mut((no % LEAF) as usize) {
            if slot.replace(chunk).is_none() {
                leaf.used += 1;
                self.len += 1;
            }
        }
    }

    /// Forgets chunk `no` (it reads as zeros again).
    pub(crate) fn remove(&mut self, no: u64) {
        let Some(leaf) = self.leaves.get_mut(&(no / LEAF)) else { return };
        if leaf.slots.get_mut((no % LEAF) as usize).and_then(Option::take).is_some() {
            leaf.used -= 1;
            self.len -= 1;
            if leaf.used == 0 {
                self.leaves.remove(&(no / LEAF));
            }
        }
    }

    /// A copy of the map sharing every chunk with this one (both sides' chunks become shared: the
    /// data is not copied, a later write to either side copies the chunk it writes).
    pub(crate) fn share_all(&mut self) -> ChunkMap {
        let mut leaves = IntMap::default();
        leaves.reserve(self.leaves.len());
        for (&no, leaf) in &mut self.leaves {
            let slots = std::array::from_fn(|i| leaf.slots.get_mut(i).and_then(share));
            leaves.insert(no, Box::new(Leaf { slots, used: leaf.used }));
        }
        ChunkMap { leaves, len: self.len }
    }

    /// Forgets every chunk numbered `first` or higher.
    pub(crate) fn truncate(&mut self, first: u64) {
        let doomed: Vec<u64> = self.leaves.keys().copied().filter(|&l| (l + 1) * LEAF > first).collect();
        for leaf in doomed {
            for no in (leaf * LEAF).max(first)..(leaf + 1) * LEAF {
                self.remove(no);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn insert_get_remove_truncate_and_count() {
        let mut m = ChunkMap::default();
        for no in [0u64, 1, 63, 64, 1000, 1 << 40] {
            m.insert(no, Chunk::new(&[no as u8; 4]));
        }
        assert_eq!(m.len(), 6);
        m.insert(1, Chunk::new(b"new!"));
        assert_eq!(m.len(), 6, "replacing does not count twice");
        assert_eq!(m.get(1).map(|c| &c.bytes()[..4]), Some(&b"new!"[..]));
        assert!(m.get(2).is_none());
        assert_eq!(m.get(1 << 40).map(|c| c.bytes()[0]), Some(0));
        m.remove(63);
        m.remove(63);
        assert_eq!(m.len(), 5);
        let copy = m.share_all();
        m.truncate(64);
        assert_eq!(m.len(), 2, "chunks 0 and 1 stay");
        assert!(m.get(64).is_none() && m.get(1000).is_none() && m.get(1 << 40).is_none());
        assert_eq!(copy.len(), 5, "a clone is independent");
        m.remove(0);
        m.remove(1);
        assert_eq!(m.len(), 0);
        assert!(m.leaves.is_empty(), "empty leaves are freed");
    }

    #[test]
    fn shared_chunks_are_copied_on_write_and_owned_ones_changed_in_place() {
        let mut a = ChunkMap::default();
        a.insert(7, Chunk::new(b"aaaa"));
        assert!(a.get(7).unwrap().is_own());
        let before = a.get(7).unwrap().bytes().as_ptr();
        a.make_mut(7).unwrap()[0] = b'A';
        assert_eq!(a.get(7).unwrap().bytes().as_ptr(), before, "an owned chunk changes in place");
        let mut b = a.share_all();
        assert!(!a.get(7).unwrap().is_own() && !b.get(7).unwrap().is_own());
        assert_eq!(b.get(7).unwrap().bytes().as_ptr(), before, "sharing copies no data");
        b.make_mut(7).unwrap()[1] = b'B';
        assert_eq!(&a.get(7).unwrap().bytes()[..4], b"Aaaa", "the other side keeps its data");
        assert_eq!(&b.get(7).unwrap().bytes()[..4], b"ABaa");
        // `a` holds the old chunk alone now: it takes it back without a copy.
        a.make_mut(7).unwrap()[2] = b'C';
        assert!(a.get(7).unwrap().is_own());
        assert_eq!(a.get(7).unwrap().bytes().as_ptr(), before);
    }
}
