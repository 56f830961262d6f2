//! The set of freshly allocated metadata clusters (the seed's "clusters to be discarded").
//!
//! A new L2 table or refcount block cluster may hold stale bytes on disk. Until the flush
//! zeroes it, (1) loading one of its slices must produce zeros instead of reading the disk,
//! and (2) the whole cluster must be zeroed on disk before the first of its slices is written
//! (otherwise the unwritten slices would expose stale bytes as table entries).

use std::collections::BTreeMap;
use std::sync::Mutex;

/// What a new metadata cluster is used for (decides in which flush stage it is zeroed).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NewKind {
    /// An L2 table.
    L2,
    /// A refcount block.
    Refblock,
}

/// New metadata clusters not yet zeroed on disk, by host offset.
#[derive(Debug, Default)]
pub struct NewClusters {
    set: Mutex<BTreeMap<u64, NewKind>>,
}

impl NewClusters {
    /// An empty set.
    pub fn new() -> Self {
        Self::default()
    }

    /// Record a new cluster at host offset `host`.
    pub fn insert(&self, host: u64, kind: NewKind) {
        self.set.lock().unwrap().insert(host, kind);
    }

    /// Whether the cluster at `host` is new (its disk content must not be read).
    pub fn contains(&self, host: u64) -> bool {
        self.set.lock().unwrap().contains_key(&host)
    }

    /// The new clusters of `kind`, by offset.
    pub fn of_kind(&self, kind: NewKind) -> Vec<u64> {
        let set = self.set.lock().unwrap();
        set.iter()
            .filter(|(_, k)| **k == kind)
            .map(|(h, _)| *h)
            .collect()
    }

    /// Forget a cluster once it has been zeroed on disk (or freed).
    pub fn remove(&self, host: u64) {
        self.set.lock().unwrap().remove(&host);
    }
}
