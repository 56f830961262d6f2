//! In-flight mapping changes, per guest cluster.
//!
//! Two writes to the same unallocated cluster must not allocate twice. Whoever changes the
//! mapping of a guest cluster (allocation, COW, zeroing, discard) holds that cluster's
//! [`InflightGuard`]; a second request for the same cluster waits until the guard is dropped,
//! then looks the mapping up again — usually finding it ready and writing in place.
//!
//! This is a lock per guest cluster, created on demand and removed when released, so the
//! table only holds clusters with a change in progress.
//!
//! Writes that go in place (a private normal cluster, with extended L2 only into allocated
//! subclusters) do not take the lock. A holder may therefore change the mapping and fill
//! unallocated parts, but must not rewrite bytes of allocated subclusters from an old copy:
//! that would undo a concurrent in-place write (see `image/write.rs`).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use tokio::sync::Notify;

/// The table of guest clusters whose mapping is being changed.
#[derive(Debug, Default)]
pub struct Inflight {
    map: Mutex<HashMap<u64, Arc<Notify>>>,
}

/// Held while changing the mapping of one guest cluster; releases it on drop.
#[derive(Debug)]
pub struct InflightGuard<'a> {
    table: &'a Inflight,
    cluster: u64,
    notify: Arc<Notify>,
}

impl Inflight {
    /// An empty table.
    pub fn new() -> Self {
        Self::default()
    }

    /// Wait until no one else is changing guest cluster `cluster`, then claim it.
    pub async fn lock(&self, cluster: u64) -> InflightGuard<'_> {
        loop {
            let notified = {
                let mut map = self.map.lock().unwrap();
                match map.get(&cluster) {
                    // Created under the map lock, so it cannot miss the holder's
                    // notify_waiters(), which runs under the same lock.
                    Some(n) => n.clone().notified_owned(),
                    None => {
                        let notify = Arc::new(Notify::new());
                        map.insert(cluster, notify.clone());
                        return InflightGuard {
                            table: self,
                            cluster,
                            notify,
                        };
                    }
                }
            };
            notified.await;
        }
    }

    /// Claim guest cluster `cluster` if no one else is changing it; never waits. A request
    /// that already holds guards extends its claim this way, so it never waits while holding
    /// one (no lock-order deadlock between requests claiming several clusters).
    pub fn try_lock(&self, cluster: u64) -> Option<InflightGuard<'_>> {
        let mut map = self.map.lock().unwrap();
        if map.contains_key(&cluster) {
            return None;
        }
        let notify = Arc::new(Notify::new());
        map.insert(cluster, notify.clone());
        Some(InflightGuard {
            table: self,
            cluster,
            notify,
        })
    }

    /// Number of clusters currently claimed (for tests).
    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.map.lock().unwrap().len()
    }

    /// Whether no cluster is claimed.
    #[cfg(test)]
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl Drop for InflightGuard<'_> {
    fn drop(&mut self) {
        let mut map = self.table.map.lock().unwrap();
        map.remove(&self.cluster);
        self.notify.notify_waiters();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn serializes_one_cluster() {
        let t = Arc::new(Inflight::new());
        let active = Arc::new(AtomicUsize::new(0));
        let mut tasks = Vec::new();
        for _ in 0..16 {
            let (t, active) = (t.clone(), active.clone());
            tasks.push(tokio::spawn(async move {
                let _g = t.lock(7).await;
                assert_eq!(active.fetch_add(1, Ordering::SeqCst), 0);
                tokio::task::yield_now().await;
                active.fetch_sub(1, Ordering::SeqCst);
            }));
        }
        for task in tasks {
            task.await.unwrap();
        }
        assert!(t.is_empty());
    }

    #[tokio::test]
    async fn different_clusters_do_not_wait() {
        let t = Inflight::new();
        let _a = t.lock(1).await;
        let _b = t.lock(2).await;
        assert_eq!(t.len(), 2);
    }
}
