//! The discovery index: which volumes each host may see, readable by position so that a discovery
//! Get Log Page costs what its window holds, not what the catalog holds.
//!
//! ```text
//!   table `discovery`    "<list>\0<volume>" → ()     list: a host NQN, or "*" (any host)
//!
//!   PositionIndex (memory, per long list, built on first use):
//!     bucket lower bounds  "vol-000000"   "vol-000512"   "vol-001024"  …
//!     entries in bucket        512            497            530       …   (sum: the list's length)
//!
//!   entry at position p: add up bucket counts until p falls in bucket i, then read the table from
//!   "<list>\0<lower bound of i>", skipping at most one bucket's entries
//! ```
//!
//! A volume any host may use is listed under `*` only, never also under its allowed hosts, so a
//! host's discovery list is its own list followed by the `*` list, without duplicates. A list of at
//! most [`BUCKET`] entries is read directly; a longer one gets buckets, kept in step with every
//! committed change (a bucket that grows past twice [`BUCKET`] is split, an empty one dropped).
//! Memory: one bucket (its lower bound and a count) per [`BUCKET`] entries of the long lists in use.

use std::collections::HashMap;

use redb::{ReadableTable, TableDefinition};

use super::{store, CatalogError};

/// Every (list, volume) pair of the index; values are empty.
pub(super) const DISCOVERY: TableDefinition<'_, &str, ()> = TableDefinition::new("discovery");

/// Entries per bucket of a list's position index (a long list's buckets hold between one and twice
/// this many). Also the longest list read without an index.
pub(super) const BUCKET: u32 = 512;

/// Most long lists (hosts with more than [`BUCKET`] volumes, and `*`) indexed at once; beyond, one
/// is forgotten and rebuilt when next asked for.
const MAX_INDEXED_LISTS: usize = 4096;

#[cfg(test)]
thread_local! {
    /// Index entries read on this thread (tests check that a window reads a bounded number).
    pub(super) static ENTRIES_READ: std::cell::Cell<u64> = const { std::cell::Cell::new(0) };
}

/// The table key of `name` in `list`.
pub(super) fn entry_key(list: &str, name: &str) -> String {
    format!("{list}\0{name}")
}

/// A change to the table, to be applied to the position index once committed.
#[derive(Debug)]
pub(super) enum Delta {
    /// `name` was added to `list` (it was not in it).
    Add(String, String),
    /// `name` was removed from `list` (it was in it).
    Remove(String, String),
    /// The whole table was emptied.
    Reset,
}

/// Position indexes of the long lists (see the module docs). Callers keep it consistent with the
/// table they read: one lock over the index is held while a transaction commits (with its deltas
/// applied) and while a reader reads the table through it.
#[derive(Debug, Default)]
pub(super) struct PositionIndex {
    lists: HashMap<String, Buckets>,
}

#[derive(Debug)]
struct Buckets {
    /// Lower bound (a volume name, not necessarily still listed) of each bucket, ascending.
    lower: Vec<String>,
    /// Entries in each bucket: names ≥ its lower bound and < the next one's.
    count: Vec<u32>,
    total: u64,
}

impl Buckets {
    /// The bucket holding position `pos`, and the position of its first entry.
    fn locate(&self, pos: u64) -> Option<(usize, u64)> {
        let mut start = 0u64;
        for (i, &n) in self.count.iter().enumerate() {
            if pos < start + u64::from(n) {
                return Some((i, start));
            }
            start += u64::from(n);
        }
        None
    }
}

/// Names in `list` from `from` (a volume name, inclusive; the list's start if `None`), in order.
fn names<'t, T: ReadableTable<&'static str, ()>>(
    t: &'t T,
    list: &str,
    from: Option<&str>,
) -> Result<impl Iterator<Item = Result<String, CatalogError>> + 't, CatalogError> {
    let prefix = format!("{list}\0");
    let start = entry_key(list, from.unwrap_or(""));
    let end = format!("{list}\u{1}");
    let range = t.range::<&str>(start.as_str()..end.as_str()).map_err(store)?;
    Ok(range.map(move |r| {
        #[cfg(test)]
        ENTRIES_READ.with(|n| n.set(n.get() + 1));
        let (k, _) = r.map_err(store)?;
        Ok(k.value().strip_prefix(prefix.as_str()).unwrap_or_default().to_owned())
    }))
}

impl PositionIndex {
    /// Number of entries in `list`.
    pub(super) fn len<T: ReadableTable<&'static str, ()>>(
        &mut self,
        t: &T,
        list: &str,
    ) -> Result<u64, CatalogError> {
        if let Some(b) = self.lists.get(list) {
            return Ok(b.total);
        }
        // Short lists are counted by reading them (at most BUCKET + 1 entries are read here).
        let mut n = 0u64;
        for name in names(t, list, None)? {
            name?;
            n += 1;
            if n > u64::from(BUCKET) {
                return Ok(self.build(t, list)?.total);
            }
        }
        Ok(n)
    }

    /// Builds the buckets of a long list (reads it once).
    fn build<T: ReadableTable<&'static str, ()>>(
        &mut self,
        t: &T,
        list: &str,
    ) -> Result<&Buckets, CatalogError> {
        let mut b = Buckets { lower: Vec::new(), count: Vec::new(), total: 0 };
        let (start, end) = (format!("{list}\0"), format!("{list}\u{1}"));
        // One pass over the list; only the names that start a bucket are copied.
        for entry in t.range::<&str>(start.as_str()..end.as_str()).map_err(store)? {
            let (k, _) = entry.map_err(store)?;
            match b.count.last_mut() {
                Some(n) if *n < BUCKET => *n += 1,
                _ => {
                    b.lower.push(k.value().strip_prefix(start.as_str()).unwrap_or_default().to_owned());
                    b.count.push(1);
                }
            }
            b.total += 1;
        }
        if self.lists.len() >= MAX_INDEXED_LISTS {
            if let Some(k) = self.lists.keys().find(|k| k.as_str() != super::ANY_HOST).cloned() {
                self.lists.remove(&k);
            }
        }
        Ok(self.lists.entry(list.to_owned()).or_insert(b))
    }

    /// Names at positions `first .. first + count` of `list` (fewer where it ends). Reads at most
    /// one bucket's entries besides those returned.
    pub(super) fn range<T: ReadableTable<&'static str, ()>>(
        &mut self,
        t: &T,
        list: &str,
        first: u64,
        count: usize,
    ) -> Result<Vec<String>, CatalogError> {
        let len = self.len(t, list)?;
        if first >= len || count == 0 {
            return Ok(Vec::new());
        }
        let (from, skip) = match self.lists.get(list).and_then(|b| Some((b, b.locate(first)?))) {
            Some((b, (i, start))) => (b.lower.get(i).cloned(), first - start),
            None => (None, first), // a short list: first < len ≤ BUCKET
        };
        let skip = usize::try_from(skip).unwrap_or(usize::MAX);
        names(t, list, from.as_deref())?.skip(skip).take(count).collect()
    }

    /// Brings the buckets in step with a transaction's changes; `t` shows the table with all of them
    /// applied. Counts first, then the splits (which read the table, so they must see it and the
    /// counts at the same point).
    pub(super) fn apply<T: ReadableTable<&'static str, ()>>(&mut self, t: &T, deltas: &[Delta]) {
        let mut touched: Vec<&str> = Vec::new();
        for d in deltas {
            let (list, ok) = match d {
                Delta::Reset => {
                    self.lists.clear();
                    touched.clear();
                    continue;
                }
                Delta::Add(list, name) => (list, self.add(list, name)),
                Delta::Remove(list, name) => (list, self.remove(list, name)),
            };
            if !ok {
                // Out of step (should not happen): forget the list, it is rebuilt when next asked for.
                self.lists.remove(list);
            } else if self.lists.contains_key(list) && !touched.contains(&list.as_str()) {
                touched.push(list);
            }
        }
        for list in touched {
            if !self.split_large(t, list) {
                self.lists.remove(list);
            }
        }
    }

    fn add(&mut self, list: &str, name: &str) -> bool {
        let Some(b) = self.lists.get_mut(list) else { return true };
        let pos = b.lower.partition_point(|l| l.as_str() <= name);
        if pos == 0 {
            match b.lower.first_mut() {
                Some(l) => *l = name.to_owned(),
                None => return false,
            }
        }
        let Some(n) = b.count.get_mut(pos.saturating_sub(1)) else { return false };
        *n += 1;
        b.total += 1;
        true
    }

    /// Splits every bucket of `list` holding more than twice [`BUCKET`] entries in halves.
    fn split_large<T: ReadableTable<&'static str, ()>>(&mut self, t: &T, list: &str) -> bool {
        let Some(b) = self.lists.get_mut(list) else { return true };
        let mut i = 0;
        while let Some(&n) = b.count.get(i) {
            if n <= 2 * BUCKET {
                i += 1;
                continue;
            }
            // The second half starts at the entry half-way through the bucket.
            let Some(lower) = b.lower.get(i) else { return false };
            let half = n / 2;
            let mid = match names(t, list, Some(lower)).map(|mut it| it.nth(half as usize)) {
                Ok(Some(Ok(m))) => m,
                _ => return false,
            };
            if let Some(c) = b.count.get_mut(i) {
                *c = half;
            }
            b.lower.insert(i + 1, mid);
            b.count.insert(i + 1, n - half);
        }
        true
    }

    fn remove(&mut self, list: &str, name: &str) -> bool {
        let Some(b) = self.lists.get_mut(list) else { return true };
        let pos = b.lower.partition_point(|l| l.as_str() <= name);
        let Some(i) = pos.checked_sub(1) else { return false };
        let Some(n) = b.count.get_mut(i).filter(|n| **n > 0) else { return false };
        *n -= 1;
        b.total -= 1;
        if *n == 0 && b.count.len() > 1 {
            b.count.remove(i);
            b.lower.remove(i);
        }
        if b.total <= u64::from(BUCKET / 2) {
            self.lists.remove(list); // short again: read directly
        }
        true
    }

    /// Number of lists with buckets (for tests).
    #[cfg(test)]
    pub(super) fn indexed_lists(&self) -> usize {
        self.lists.len()
    }
}
