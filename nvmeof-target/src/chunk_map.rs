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
//! allocate); a leaf holds 64 slots of 8 bytes (512 bytes per 256 KiB of address space touched).
//!
//! A chunk is an `Arc<Chunk>`, shared by a volume and its snapshots and clones until one of them
//! writes it; a write changes the chunk in place when nothing else holds it.

use std::sync::Arc;

use crate::hash::IntMap;

/// Chunks per leaf.
const LEAF: u64 = 64;

/// Bytes per chunk.
pub(crate) const CHUNK: usize = 4096;

/// One chunk's data.
pub(crate) struct Chunk(pub(crate) [u8; CHUNK]);

/// A new chunk holding a copy of `data` (zeros after it).
pub(crate) fn new_chunk(data: &[u8]) -> Arc<Chunk> {
    let mut chunk = Arc::new(Chunk([0; CHUNK]));
    if let Some(c) = Arc::get_mut(&mut chunk) {
        let n = data.len().min(CHUNK);
        if let (Some(dst), Some(src)) = (c.0.get_mut(..n), data.get(..n)) {
            dst.copy_from_slice(src);
        }
    }
    chunk
}

#[derive(Clone)]
struct Leaf {
    slots: [Option<Arc<Chunk>>; LEAF as usize],
    used: u8,
}

/// Chunks by number; see the module documentation.
#[derive(Clone, Default)]
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
    pub(crate) fn get(&self, no: u64) -> Option<&Arc<Chunk>> {
        self.leaves.get(&(no / LEAF))?.slots.get((no % LEAF) as usize)?.as_ref()
    }

    /// The chunk `no`, mutably (to replace or update it in place), if written.
    pub(crate) fn get_mut(&mut self, no: u64) -> Option<&mut Arc<Chunk>> {
        self.leaves.get_mut(&(no / LEAF))?.slots.get_mut((no % LEAF) as usize)?.as_mut()
    }

    /// Sets chunk `no`.
    pub(crate) fn insert(&mut self, no: u64, chunk: Arc<Chunk>) {
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
            m.insert(no, new_chunk(&[no as u8; 4]));
        }
        assert_eq!(m.len(), 6);
        m.insert(1, new_chunk(b"new!"));
        assert_eq!(m.len(), 6, "replacing does not count twice");
        assert_eq!(m.get(1).map(|c| &c.0[..4]), Some(&b"new!"[..]));
        assert!(m.get(2).is_none());
        assert_eq!(m.get(1 << 40).map(|c| c.0[0]), Some(0));
        m.remove(63);
        m.remove(63);
        assert_eq!(m.len(), 5);
        let copy = m.clone();
        m.truncate(64);
        assert_eq!(m.len(), 2, "chunks 0 and 1 stay");
        assert!(m.get(64).is_none() && m.get(1000).is_none() && m.get(1 << 40).is_none());
        assert_eq!(copy.len(), 5, "a clone is independent");
        m.remove(0);
        m.remove(1);
        assert_eq!(m.len(), 0);
        assert!(m.leaves.is_empty(), "empty leaves are freed");
    }
}
