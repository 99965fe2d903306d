//! What the profiler keeps per binary, and how much of it.
//!
//! [`BinaryId`] is the one identity of a binary's contents that symbolization
//! ([`symbols`](super::symbols)), unwinding ([`unwind`](super::unwind)) and the frame-pointer
//! check ([`fpcheck`](super::fpcheck)) key their per-binary state by. [`ByteLru`] is the one cache
//! they keep it in: bounded by an estimate of the bytes each entry holds, least recently used
//! out first, with its size, budget and evictions exported as metrics ([`CacheStat`]).
//!
//! A budget, not an entry count, because entries differ by orders of magnitude: the unwind
//! sections of a small tool are a few KiB, those of a browser tens of MiB.

use std::{
    collections::{BTreeMap, HashMap},
    fs::Metadata,
    hash::Hash,
    os::unix::fs::MetadataExt,
};

/// Default of `--profile-cache-bytes`: what the profiler's caches may hold together.
pub use crate::targeting::config::DEFAULT_PROFILE_CACHE_BYTES as DEFAULT_CACHE_BYTES;

/// What identifies the contents of a binary without trusting its path: device and inode, plus
/// size and modification time so a file rewritten in place (or a reused inode) is not mistaken
/// for its old self.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BinaryId {
    pub dev: u64,
    pub ino: u64,
    pub size: u64,
    pub mtime: i64,
    pub mtime_nsec: i64,
}

impl BinaryId {
    pub fn of(md: &Metadata) -> Self {
        Self {
            dev: md.dev(),
            ino: md.ino(),
            size: md.size(),
            mtime: md.mtime(),
            mtime_nsec: md.mtime_nsec(),
        }
    }
}

impl From<&Metadata> for BinaryId {
    fn from(md: &Metadata) -> Self {
        Self::of(md)
    }
}

/// Size, budget and evictions of one cache, for `ws1_probe_agent_cache_*`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CacheStat {
    /// The `cache` label.
    pub name: &'static str,
    /// Estimated bytes held.
    pub bytes: u64,
    pub entries: u64,
    /// Bytes it may hold; 0 for a structure bounded otherwise (e.g. the kallsyms index, bounded
    /// by its symbol count).
    pub budget: u64,
    pub evictions: u64,
}

struct Slot<V> {
    value: V,
    bytes: usize,
    /// Position in the recency order.
    tick: u64,
}

/// A map bounded by the estimated bytes of its entries; inserting past the budget evicts the
/// least recently used entries and hands them back (callers may have to release what they
/// stand for, e.g. close a file).
///
/// Every operation is O(log n). Recency is a counter, not a clock, so the order is deterministic.
pub struct ByteLru<K, V> {
    name: &'static str,
    budget: usize,
    entries: HashMap<K, Slot<V>>,
    /// Recency order: tick → key, oldest first.
    order: BTreeMap<u64, K>,
    tick: u64,
    bytes: usize,
    evictions: u64,
}

impl<K: Clone + Eq + Hash, V> ByteLru<K, V> {
    /// An empty cache called `name` (its metric label) that holds at most `budget` bytes.
    pub fn new(name: &'static str, budget: usize) -> Self {
        Self {
            name,
            budget,
            entries: HashMap::new(),
            order: BTreeMap::new(),
            tick: 0,
            bytes: 0,
            evictions: 0,
        }
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Estimated bytes held.
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    pub fn budget(&self) -> usize {
        self.budget
    }

    pub fn contains(&self, key: &K) -> bool {
        self.entries.contains_key(key)
    }

    fn touch(&mut self, key: &K) {
        let Some(slot) = self.entries.get_mut(key) else {
            return;
        };
        self.tick += 1;
        if let Some(k) = self.order.remove(&slot.tick) {
            self.order.insert(self.tick, k);
        }
        slot.tick = self.tick;
    }

    /// The entry for `key`, now the most recently used.
    pub fn get(&mut self, key: &K) -> Option<&V> {
        self.touch(key);
        self.entries.get(key).map(|s| &s.value)
    }

    /// Like [`get`](Self::get), mutable. Call [`resize`](Self::resize) if the change alters the
    /// entry's size.
    pub fn get_mut(&mut self, key: &K) -> Option<&mut V> {
        self.touch(key);
        self.entries.get_mut(key).map(|s| &mut s.value)
    }

    /// The entry for `key` without changing its recency.
    pub fn peek(&self, key: &K) -> Option<&V> {
        self.entries.get(key).map(|s| &s.value)
    }

    /// Stores `value` as `bytes` bytes, most recently used, and evicts least recently used
    /// entries until the cache is within its budget again. Returns what was evicted (and the
    /// entry it replaced, if `key` was present). An entry larger than the whole budget is not
    /// kept: it comes back at once.
    pub fn insert(&mut self, key: K, value: V, bytes: usize) -> Vec<(K, V)> {
        let mut out: Vec<(K, V)> = self
            .remove(&key)
            .map(|v| (key.clone(), v))
            .into_iter()
            .collect();
        if bytes > self.budget {
            self.evictions += 1;
            out.push((key, value));
            return out;
        }
        self.tick += 1;
        self.order.insert(self.tick, key.clone());
        self.entries.insert(
            key,
            Slot {
                value,
                bytes,
                tick: self.tick,
            },
        );
        self.bytes += bytes;
        out.extend(self.shrink());
        out
    }

    /// Changes the estimate of `key`'s size and evicts others (never `key` itself, which was just
    /// used) if the cache went over its budget.
    pub fn resize(&mut self, key: &K, bytes: usize) -> Vec<(K, V)> {
        let Some(slot) = self.entries.get_mut(key) else {
            return Vec::new();
        };
        self.bytes = self.bytes - slot.bytes + bytes;
        slot.bytes = bytes;
        self.touch(key);
        self.shrink()
    }

    pub fn remove(&mut self, key: &K) -> Option<V> {
        let slot = self.entries.remove(key)?;
        self.order.remove(&slot.tick);
        self.bytes -= slot.bytes;
        Some(slot.value)
    }

    /// Removes the entries `keep` says no to (not counted as evictions: the caller knows they
    /// are useless, e.g. their processes are gone) and returns them.
    pub fn retain(&mut self, mut keep: impl FnMut(&K, &V) -> bool) -> Vec<(K, V)> {
        let gone: Vec<K> = self
            .entries
            .iter()
            .filter(|(k, s)| !keep(k, &s.value))
            .map(|(k, _)| k.clone())
            .collect();
        gone.into_iter()
            .filter_map(|k| self.remove(&k).map(|v| (k, v)))
            .collect()
    }

    /// Empties the cache, returning every entry.
    pub fn clear(&mut self) -> Vec<(K, V)> {
        self.order.clear();
        self.bytes = 0;
        self.entries.drain().map(|(k, s)| (k, s.value)).collect()
    }

    /// Evicts the least recently used entry (for a bound other than bytes, e.g. open files).
    pub fn pop_lru(&mut self) -> Option<(K, V)> {
        let (_, key) = self.order.pop_first()?;
        let slot = self.entries.remove(&key)?;
        self.bytes -= slot.bytes;
        self.evictions += 1;
        Some((key, slot.value))
    }

    /// The values, mutable, without touching them. Changes must not alter an entry's size.
    pub fn values_mut(&mut self) -> impl Iterator<Item = &mut V> {
        self.entries.values_mut().map(|s| &mut s.value)
    }

    /// Iterates over the entries in no particular order, without touching them.
    pub fn iter(&self) -> impl Iterator<Item = (&K, &V)> {
        self.entries.iter().map(|(k, s)| (k, &s.value))
    }

    /// Evicts least recently used entries, but not the most recent one, until within budget.
    fn shrink(&mut self) -> Vec<(K, V)> {
        let mut out = Vec::new();
        while self.bytes > self.budget && self.entries.len() > 1 {
            let Some((_, key)) = self.order.pop_first() else {
                break;
            };
            if let Some(slot) = self.entries.remove(&key) {
                self.bytes -= slot.bytes;
                self.evictions += 1;
                out.push((key, slot.value));
            }
        }
        out
    }

    pub fn stat(&self) -> CacheStat {
        CacheStat {
            name: self.name,
            bytes: self.bytes as u64,
            entries: self.entries.len() as u64,
            budget: self.budget as u64,
            evictions: self.evictions,
        }
    }

    /// Keys in recency order, least recently used first (tests and debugging).
    pub fn keys_by_age(&self) -> impl Iterator<Item = &K> {
        self.order.values()
    }
}

/// Shares of the profiler's cache budget (`--profile-cache-bytes`) per cache.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CacheBudgets {
    /// Symbolized frames by (binary, file offset).
    pub frames: usize,
    /// Binaries open in blazesym (estimated from their symbol and debug sections).
    pub symbol_binaries: usize,
    /// Parsed unwind sections of binaries (exact: they are copies).
    pub unwind_binaries: usize,
    /// JIT perf maps of live processes.
    pub perf_maps: usize,
}

impl CacheBudgets {
    /// Splits `total` bytes: 3/8 to the binaries open for symbolization, 3/8 to unwind sections,
    /// 1/8 each to symbolized frames and perf maps.
    pub fn split(total: u64) -> Self {
        let total = usize::try_from(total).unwrap_or(usize::MAX);
        let eighth = total / 8;
        Self {
            frames: eighth,
            symbol_binaries: eighth * 3,
            unwind_binaries: eighth * 3,
            perf_maps: eighth,
        }
    }
}

impl CacheBudgets {
    /// No limit, for one-shot commands: a run of seconds gains nothing from eviction and wants
    /// DWARF for every binary, however large.
    pub fn unbounded() -> Self {
        Self::split(u64::MAX)
    }
}

impl Default for CacheBudgets {
    fn default() -> Self {
        Self::split(DEFAULT_CACHE_BYTES)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys(c: &ByteLru<u32, &'static str>) -> Vec<u32> {
        c.keys_by_age().copied().collect()
    }

    #[test]
    fn evicts_least_recently_used_past_the_budget() {
        let mut c = ByteLru::new("t", 100);
        assert!(c.insert(1, "a", 40).is_empty());
        assert!(c.insert(2, "b", 40).is_empty());
        // Using 1 makes 2 the oldest.
        assert_eq!(c.get(&1), Some(&"a"));
        let evicted = c.insert(3, "c", 40);
        assert_eq!(evicted, vec![(2, "b")]);
        assert_eq!(keys(&c), vec![1, 3]);
        assert_eq!(c.bytes(), 80);
        assert_eq!(
            c.stat(),
            CacheStat {
                name: "t",
                bytes: 80,
                entries: 2,
                budget: 100,
                evictions: 1
            }
        );
    }

    #[test]
    fn peek_keeps_the_order() {
        let mut c = ByteLru::new("t", 100);
        c.insert(1, "a", 50);
        c.insert(2, "b", 50);
        assert_eq!(c.peek(&1), Some(&"a"));
        assert_eq!(c.insert(3, "c", 50), vec![(1, "a")]);
    }

    #[test]
    fn an_entry_larger_than_the_budget_is_not_kept() {
        let mut c = ByteLru::new("t", 100);
        c.insert(1, "a", 10);
        assert_eq!(c.insert(2, "huge", 101), vec![(2, "huge")]);
        assert_eq!(keys(&c), vec![1]);
        assert_eq!(c.bytes(), 10);
        assert_eq!(c.stat().evictions, 1);
    }

    #[test]
    fn replacing_returns_the_old_value_and_fixes_the_size() {
        let mut c = ByteLru::new("t", 100);
        c.insert(1, "a", 30);
        assert_eq!(c.insert(1, "b", 50), vec![(1, "a")]);
        assert_eq!(c.bytes(), 50);
        assert_eq!(c.len(), 1);
        assert_eq!(c.stat().evictions, 0);
    }

    #[test]
    fn resize_evicts_others_not_the_resized_entry() {
        let mut c = ByteLru::new("t", 100);
        c.insert(1, "a", 30);
        c.insert(2, "b", 30);
        assert_eq!(c.resize(&1, 90), vec![(2, "b")]);
        assert_eq!(keys(&c), vec![1]);
        assert_eq!(c.bytes(), 90);
        // Alone and over budget, it stays: it is the entry in use.
        assert!(c.resize(&1, 150).is_empty());
        assert_eq!(c.bytes(), 150);
    }

    #[test]
    fn retain_and_remove_are_not_evictions() {
        let mut c = ByteLru::new("t", 1000);
        for k in 0..10 {
            c.insert(k, "x", 10);
        }
        let gone = c.retain(|k, _| k % 2 == 0);
        assert_eq!(gone.len(), 5);
        assert_eq!(c.remove(&0), Some("x"));
        assert_eq!(keys(&c), vec![2, 4, 6, 8]);
        assert_eq!(c.bytes(), 40);
        assert_eq!(c.stat().evictions, 0);
        assert_eq!(c.clear().len(), 4);
        assert_eq!((c.len(), c.bytes()), (0, 0));
    }

    #[test]
    fn many_inserts_stay_within_budget() {
        let mut c = ByteLru::new("t", 1000);
        let mut evicted = 0;
        for k in 0..10_000u32 {
            evicted += c.insert(k, "x", 1 + (k as usize % 97)).len();
            assert!(c.bytes() <= 1000);
        }
        assert_eq!(evicted as u64, c.stat().evictions);
        assert_eq!(c.len() + evicted, 10_000);
        assert_eq!(c.order.len(), c.entries.len());
    }

    #[test]
    fn budgets_split_the_total() {
        let b = CacheBudgets::split(8 << 20);
        assert_eq!(
            b.frames + b.symbol_binaries + b.unwind_binaries + b.perf_maps,
            8 << 20
        );
        assert_eq!(b.frames, 1 << 20);
    }
}
