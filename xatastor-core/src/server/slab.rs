//! Operations in flight on the ring, each in a slot named by a generation-checked key.
//!
//! An io_uring completion carries the 64-bit `user_data` its submission was given. Every operation
//! the worker has on the ring (a connection's receive or send, a disk operation) lives in a [`Slab`]
//! slot until its last completion is reaped, and its `user_data` names that slot completely:
//!
//! ```text
//!   63        56 55                    32 31                            0
//!  ┌────────────┬────────────────────────┬───────────────────────────────┐
//!  │ kind (8)   │ generation (24)        │ slot index (32)               │
//!  └────────────┴────────────────────────┴───────────────────────────────┘
//! ```
//!
//! A slot is only freed once the kernel is done with everything its operation pointed to, so a
//! completion can never name a freed slot; the generation (bumped on every reuse of a slot) is a
//! second line of defence: a completion whose generation does not match is ignored instead of
//! touching a newer operation. Slot indexes are bounded by `u32::MAX` (insert refuses beyond), so no
//! index is ever truncated.

/// A slot's key: index and generation (24 bits).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(super) struct Key {
    index: u32,
    generation: u32,
}

const GENERATION_MASK: u32 = 0x00ff_ffff;

impl Key {
    /// The `user_data` of an operation of `kind` on this slot.
    pub(super) fn user_data(self, kind: u8) -> u64 {
        (u64::from(kind) << 56) | (u64::from(self.generation & GENERATION_MASK) << 32) | u64::from(self.index)
    }

    /// The kind and key a `user_data` was built from.
    pub(super) fn from_user_data(user_data: u64) -> (u8, Key) {
        let kind = (user_data >> 56) as u8;
        let generation = ((user_data >> 32) as u32) & GENERATION_MASK;
        (kind, Key { index: user_data as u32, generation })
    }

    /// The key as one number (for tokens handed to other threads).
    pub(super) fn to_u64(self) -> u64 {
        (u64::from(self.generation) << 32) | u64::from(self.index)
    }

    /// The key [`Key::to_u64`] made.
    pub(super) fn from_u64(v: u64) -> Key {
        Key { index: v as u32, generation: ((v >> 32) as u32) & GENERATION_MASK }
    }
}

struct Slot<T> {
    generation: u32,
    value: Option<T>,
}

/// Values in slots with generation-checked keys; freed slots are reused (most recently freed first).
pub(super) struct Slab<T> {
    slots: Vec<Slot<T>>,
    free: Vec<u32>,
    len: usize,
}

impl<T> Default for Slab<T> {
    fn default() -> Self {
        Self { slots: Vec::new(), free: Vec::new(), len: 0 }
    }
}

impl<T> Slab<T> {
    /// The key the next [`Slab::insert`] will return (None if the slab is full).
    pub(super) fn next_key(&self) -> Option<Key> {
        match self.free.last() {
            Some(&index) => {
                let generation = self.slots.get(index as usize).map_or(1, |s| s.generation);
                Some(Key { index, generation })
            }
            None => {
                let index = u32::try_from(self.slots.len()).ok().filter(|&i| i < u32::MAX)?;
                Some(Key { index, generation: 1 })
            }
        }
    }

    /// Stores `value`; None (and `value` dropped) if the slab holds `u32::MAX` values already.
    pub(super) fn insert(&mut self, value: T) -> Option<Key> {
        let key = self.next_key()?;
        match self.slots.get_mut(key.index as usize) {
            Some(slot) => {
                self.free.pop();
                slot.value = Some(value);
            }
            None => self.slots.push(Slot { generation: key.generation, value: Some(value) }),
        }
        self.len += 1;
        Some(key)
    }

    /// The value under `key`, if it is still there.
    pub(super) fn get(&self, key: Key) -> Option<&T> {
        self.slots.get(key.index as usize).filter(|s| s.generation == key.generation)?.value.as_ref()
    }

    /// The value under `key`, mutably, if it is still there.
    pub(super) fn get_mut(&mut self, key: Key) -> Option<&mut T> {
        self.slots.get_mut(key.index as usize).filter(|s| s.generation == key.generation)?.value.as_mut()
    }

    /// Takes the value under `key` out and frees its slot (its next user gets a new generation).
    pub(super) fn remove(&mut self, key: Key) -> Option<T> {
        let slot = self.slots.get_mut(key.index as usize).filter(|s| s.generation == key.generation)?;
        let value = slot.value.take()?;
        slot.generation = match slot.generation.wrapping_add(1) & GENERATION_MASK {
            0 => 1,
            g => g,
        };
        self.free.push(key.index);
        self.len -= 1;
        Some(value)
    }

    /// Values stored.
    pub(super) fn len(&self) -> usize {
        self.len
    }

    /// True if nothing is stored.
    pub(super) fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The keys of every stored value.
    pub(super) fn keys(&self) -> impl Iterator<Item = Key> + '_ {
        self.slots
            .iter()
            .enumerate()
            .filter(|(_, s)| s.value.is_some())
            .map(|(i, s)| Key { index: i as u32, generation: s.generation })
    }

    /// Every stored value with its key, mutable.
    pub(super) fn iter_mut(&mut self) -> impl Iterator<Item = (Key, &mut T)> + '_ {
        self.slots
            .iter_mut()
            .enumerate()
            .filter_map(|(i, s)| Some((Key { index: i as u32, generation: s.generation }, s.value.as_mut()?)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_generation_checked_and_round_trip_through_user_data() {
        let mut slab = Slab::default();
        let a = slab.insert("a").unwrap();
        let b = slab.insert("b").unwrap();
        assert_eq!(slab.len(), 2);
        assert_eq!(slab.remove(a), Some("a"));
        assert_eq!(slab.get(a), None, "a removed key finds nothing");
        let predicted = slab.next_key().unwrap();
        let c = slab.insert("c").unwrap();
        assert_eq!(c, predicted);
        assert_ne!(c, a, "the reused slot has a new generation");
        assert_eq!(slab.get(a), None, "a stale key does not find the slot's new value");
        assert_eq!(slab.get(c), Some(&"c"));
        for kind in [1u8, 5, 255] {
            let ud = c.user_data(kind);
            assert_eq!(Key::from_user_data(ud), (kind, c));
        }
        assert_eq!(Key::from_u64(b.to_u64()), b);
        let keys: Vec<Key> = slab.keys().collect();
        assert_eq!(keys.len(), 2);
        assert!(keys.contains(&b) && keys.contains(&c));
    }

    #[test]
    fn generations_wrap_without_zero() {
        let mut slab = Slab::default();
        let mut key = slab.insert(0u32).unwrap();
        for i in 0..(GENERATION_MASK as usize + 5) {
            slab.remove(key).unwrap();
            key = slab.insert(i as u32).unwrap();
            assert_ne!(key.generation, 0);
            assert_eq!(key.index, 0);
        }
        assert_eq!(slab.get(key), Some(&(GENERATION_MASK + 4)));
    }
}
