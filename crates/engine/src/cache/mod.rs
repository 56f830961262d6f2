//! The metadata cache: fixed-size slices of L2 tables and refcount blocks, keyed by their host
//! offset, with LRU eviction under a memory bound and dirty tracking.
//!
//! Invariants this module keeps:
//! - A slice that is in the map is never replaced by a load: a load only happens for a key that
//!   is absent, and eviction only removes slices that are clean and not in use. So a dirty or
//!   freshly created slice can never be overwritten by stale bytes from disk.
//! - The cache holds at most `capacity` slices, except for a small bounded overflow: when it is
//!   full and nothing can be evicted (every slice is dirty or in use), a new slice is still
//!   admitted while the map is below its hard limit (`capacity` plus at most 8 MiB / 256
//!   slices) and at most half the capacity is dirty. Why: with more requests in flight than
//!   slices, every slice may be clean but held by a reader; answering `Full` then makes the
//!   readers spin on flushes that cannot help (nothing is dirty) until one finishes. Beyond the
//!   hard limit, or when dirty slices are the reason, [`SliceCache::get`] returns
//!   [`Lookup::Full`] and the caller flushes (or waits) and retries instead of growing memory.
//!   Later inserts evict back down to `capacity` as soon as the held slices are released.
//! - Slices are always readable. A flush copies a slice's bytes under its lock and writes the
//!   copy, so updates made during the write simply leave the slice dirty again
//!   (see [`Slice::snapshot_dirty`] and [`Slice::mark_clean`]).
//!
//! Locks: the map lock and each slice's data lock are `std` mutexes, held only for memory
//! operations, never across an await.

mod slice;

pub use slice::Slice;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

/// At most this many slices of overflow beyond the configured capacity.
const OVERFLOW_SLICES: usize = 256;
/// At most this many bytes of overflow beyond the configured capacity.
const OVERFLOW_BYTES: usize = 8 << 20;
/// At least this many slices of overflow (a request in flight holds one or two slices).
const MIN_OVERFLOW_SLICES: usize = 16;

/// Counters describing the cache, for tests and `bench`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CacheStats {
    /// Slices currently held.
    pub slices: usize,
    /// Bytes of slice data currently held.
    pub bytes: usize,
    /// The most bytes ever held at once.
    pub peak_bytes: usize,
    /// The configured bound in bytes.
    pub capacity_bytes: usize,
    /// The hard bound in bytes: the configured one plus the bounded overflow for slices that
    /// are clean but in use (see the module docs).
    pub limit_bytes: usize,
    /// Slices currently dirty.
    pub dirty: usize,
}

/// Result of [`SliceCache::get`].
pub enum Lookup {
    /// The slice (maybe still loading: call [`Slice::ensure_loaded`]).
    Slice(Arc<Slice>),
    /// The cache is full of dirty or busy slices: flush, then retry.
    Full,
}

/// A bounded cache of equally sized metadata slices.
#[derive(Debug)]
pub struct SliceCache {
    /// "l2" or "refcount": shown by `Debug` (the field is read through the derive only).
    #[allow(dead_code)]
    name: &'static str,
    slice_size: usize,
    capacity: usize,
    /// `capacity` plus the bounded overflow for clean slices held by requests in flight.
    hard_limit: usize,
    clock: AtomicU64,
    map: Mutex<CacheMap>,
}

#[derive(Debug, Default)]
struct CacheMap {
    slices: HashMap<u64, Arc<Slice>>,
    peak: usize,
}

impl SliceCache {
    /// A cache of `slice_size`-byte slices holding at most `capacity_bytes` (at least 4 slices,
    /// so one request's lookups always fit).
    pub fn new(name: &'static str, slice_size: usize, capacity_bytes: usize) -> SliceCache {
        let capacity = (capacity_bytes / slice_size).max(4);
        let overflow = (OVERFLOW_BYTES / slice_size).clamp(MIN_OVERFLOW_SLICES, OVERFLOW_SLICES);
        SliceCache {
            name,
            slice_size,
            capacity,
            hard_limit: capacity + overflow,
            clock: AtomicU64::new(1),
            map: Mutex::new(CacheMap::default()),
        }
    }

    /// The size of every slice in bytes.
    pub fn slice_size(&self) -> usize {
        self.slice_size
    }

    /// Find or insert the slice at host offset `key` (a multiple of the slice size). A new
    /// slice starts unloaded; the caller loads it with [`Slice::ensure_loaded`].
    pub fn get(&self, key: u64) -> Lookup {
        let tick = self.clock.fetch_add(1, Ordering::Relaxed);
        let mut map = self.map.lock().unwrap();
        if let Some(s) = map.slices.get(&key) {
            s.touch(tick);
            return Lookup::Slice(s.clone());
        }
        if !self.make_room(&mut map) {
            return Lookup::Full;
        }
        let s = Arc::new(Slice::new(key, self.slice_size, tick));
        map.slices.insert(key, s.clone());
        map.peak = map.peak.max(map.slices.len());
        Lookup::Slice(s)
    }

    /// The slice at `key` if it is cached, without inserting.
    #[cfg(test)]
    pub fn peek(&self, key: u64) -> Option<Arc<Slice>> {
        self.map.lock().unwrap().slices.get(&key).cloned()
    }

    /// Evict down below `capacity`; when nothing more can be evicted, say whether the bounded
    /// overflow may take one more slice (see the module docs).
    fn make_room(&self, map: &mut CacheMap) -> bool {
        while map.slices.len() >= self.capacity {
            if !Self::evict_one(map) {
                let dirty = map.slices.values().filter(|s| s.is_dirty()).count();
                return map.slices.len() < self.hard_limit && dirty * 2 < self.capacity;
            }
        }
        true
    }

    /// Remove the least recently used slice that is clean and not referenced outside the map.
    fn evict_one(map: &mut CacheMap) -> bool {
        let victim = map
            .slices
            .iter()
            .filter(|(_, s)| Arc::strong_count(s) == 1 && s.is_evictable())
            .min_by_key(|(_, s)| s.last_used())
            .map(|(k, _)| *k);
        match victim {
            Some(k) => {
                map.slices.remove(&k);
                true
            }
            None => false,
        }
    }

    /// Drop a slice whose loading failed, so the next lookup retries the load.
    pub fn forget_failed(&self, key: u64) {
        let mut map = self.map.lock().unwrap();
        if map.slices.get(&key).is_some_and(|s| !s.is_loaded()) {
            map.slices.remove(&key);
        }
    }

    /// Drop every clean slice inside `[start, start + len)` (used when a metadata cluster is
    /// freed, so a later reuse of the cluster never sees stale cached bytes). Dirty slices in
    /// the range are dropped too: their cluster no longer holds metadata.
    pub fn invalidate_range(&self, start: u64, len: u64) {
        let mut map = self.map.lock().unwrap();
        map.slices.retain(|k, _| *k < start || *k >= start + len);
    }

    /// All dirty slices, sorted by host offset (so flushes write sequentially).
    pub fn dirty_slices(&self) -> Vec<Arc<Slice>> {
        let map = self.map.lock().unwrap();
        let mut v: Vec<_> = map
            .slices
            .values()
            .filter(|s| s.is_dirty())
            .cloned()
            .collect();
        v.sort_by_key(|s| s.offset());
        v
    }

    /// Number of dirty slices.
    pub fn dirty_count(&self) -> usize {
        let map = self.map.lock().unwrap();
        map.slices.values().filter(|s| s.is_dirty()).count()
    }

    /// Whether the dirty slices fill at least `percent` % of the capacity.
    pub fn dirty_above(&self, percent: usize) -> bool {
        self.dirty_count() * 100 >= self.capacity * percent
    }

    /// Current accounting.
    pub fn stats(&self) -> CacheStats {
        let map = self.map.lock().unwrap();
        CacheStats {
            slices: map.slices.len(),
            bytes: map.slices.len() * self.slice_size,
            peak_bytes: map.peak * self.slice_size,
            capacity_bytes: self.capacity * self.slice_size,
            limit_bytes: self.hard_limit * self.slice_size,
            dirty: map.slices.values().filter(|s| s.is_dirty()).count(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn slice(c: &SliceCache, key: u64) -> Arc<Slice> {
        match c.get(key) {
            Lookup::Slice(s) => s,
            Lookup::Full => panic!("cache full"),
        }
    }

    #[tokio::test]
    async fn evicts_lru_clean_and_never_dirty() {
        let c = SliceCache::new("t", 512, 4 * 512);
        for k in 0..4u64 {
            let s = slice(&c, k * 512);
            s.ensure_loaded(|b| async move { Ok(b) }).await.unwrap();
        }
        slice(&c, 0).update(|b| b[0] = 1);
        // Key 512 is the least recently used clean slice.
        let _ = slice(&c, 8 * 512);
        assert!(c.peek(512).is_none());
        assert!(c.peek(0).is_some());
        assert_eq!(c.stats().slices, 4);
    }

    #[tokio::test]
    async fn full_of_dirty_reports_full() {
        let c = SliceCache::new("t", 512, 4 * 512);
        for k in 0..4u64 {
            let s = slice(&c, k * 512);
            s.ensure_loaded(|b| async move { Ok(b) }).await.unwrap();
            s.update(|b| b[0] = 1);
        }
        assert!(matches!(c.get(9 * 512), Lookup::Full));
        for s in c.dirty_slices() {
            let (_, gen_) = s.snapshot_dirty().unwrap();
            s.mark_clean(gen_);
        }
        assert!(matches!(c.get(9 * 512), Lookup::Slice(_)));
        assert!(c.stats().peak_bytes <= c.stats().capacity_bytes);
    }

    async fn loaded(c: &SliceCache, key: u64) -> Arc<Slice> {
        let s = slice(c, key);
        s.ensure_loaded(|b| async move { Ok(b) }).await.unwrap();
        s
    }

    /// Regression: clean slices held by requests in flight used to make the cache answer
    /// `Full`, and readers spun on flushes that could not help.
    #[tokio::test]
    async fn in_use_clean_slices_overflow_then_shrink_back() {
        let c = SliceCache::new("t", 512, 4 * 512);
        let mut held = Vec::new();
        for k in 0..10u64 {
            held.push(loaded(&c, k * 512).await);
        }
        assert_eq!(c.stats().slices, 10);
        assert!(c.stats().bytes > c.stats().capacity_bytes);
        drop(held);
        // The next insert evicts back below the configured capacity.
        let _s = loaded(&c, 100 * 512).await;
        assert_eq!(c.stats().slices, 4);
        assert!(c.stats().peak_bytes <= c.stats().limit_bytes);
    }

    #[tokio::test]
    async fn overflow_is_bounded() {
        let c = SliceCache::new("t", 512, 4 * 512);
        let limit = c.stats().limit_bytes / 512;
        assert_eq!(limit, 4 + OVERFLOW_SLICES);
        let mut held = Vec::new();
        for k in 0..limit as u64 {
            held.push(loaded(&c, k * 512).await);
        }
        assert!(matches!(c.get(10_000 * 512), Lookup::Full));
        assert_eq!(c.stats().peak_bytes, c.stats().limit_bytes);
    }

    #[tokio::test]
    async fn mostly_dirty_does_not_overflow() {
        let c = SliceCache::new("t", 512, 4 * 512);
        let mut held = Vec::new();
        for k in 0..4u64 {
            let s = loaded(&c, k * 512).await;
            if k < 2 {
                s.update(|b| b[0] = 1);
            }
            held.push(s);
        }
        // Half the capacity is dirty: flushing is what helps, so no overflow.
        assert!(matches!(c.get(50 * 512), Lookup::Full));
    }

    #[test]
    fn overflow_bytes_bound_holds_for_big_slices() {
        let c = SliceCache::new("t", 1 << 20, 32 << 20);
        let over = c.stats().limit_bytes - c.stats().capacity_bytes;
        assert_eq!(over, MIN_OVERFLOW_SLICES << 20);
        let c = SliceCache::new("t", 4096, 1 << 20);
        let over = c.stats().limit_bytes - c.stats().capacity_bytes;
        assert_eq!(over, OVERFLOW_SLICES * 4096);
    }
}
