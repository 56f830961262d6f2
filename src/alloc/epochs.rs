//! Request epochs: when may a freed host cluster really be reused?
//!
//! A request looks a mapping up, then does its data IO some time later. If the cluster it
//! found were freed and handed to another guest cluster in between, the request would read
//! another region's data or, worse, overwrite it. So every request registers the epoch it
//! started in, a free is stamped with the epoch current when the mapping dropped the cluster,
//! and the free is applied only once no request from that epoch or earlier is still running.

use std::collections::BTreeMap;
use std::sync::Mutex;

/// Counts running requests per start epoch.
#[derive(Debug, Default)]
pub struct Epochs {
    inner: Mutex<EpochState>,
}

#[derive(Debug, Default)]
struct EpochState {
    current: u64,
    running: BTreeMap<u64, usize>,
}

/// A running request; leaves its epoch when dropped.
#[derive(Debug)]
pub struct EpochGuard<'a> {
    epochs: &'a Epochs,
    epoch: u64,
}

impl Epochs {
    /// A tracker with no requests running.
    pub fn new() -> Self {
        Self::default()
    }

    /// Register a request starting now.
    pub fn enter(&self) -> EpochGuard<'_> {
        let mut s = self.inner.lock().unwrap();
        let epoch = s.current;
        *s.running.entry(epoch).or_default() += 1;
        EpochGuard {
            epochs: self,
            epoch,
        }
    }

    /// Stamp for a free happening now; requests entering later get a larger epoch.
    pub fn stamp(&self) -> u64 {
        let mut s = self.inner.lock().unwrap();
        let e = s.current;
        s.current += 1;
        e
    }

    /// Whether every request that started at or before epoch `e` has finished.
    pub fn quiesced(&self, e: u64) -> bool {
        let s = self.inner.lock().unwrap();
        s.running.keys().next().is_none_or(|&oldest| oldest > e)
    }
}

impl Drop for EpochGuard<'_> {
    fn drop(&mut self) {
        let mut s = self.epochs.inner.lock().unwrap();
        if let Some(n) = s.running.get_mut(&self.epoch) {
            *n -= 1;
            if *n == 0 {
                s.running.remove(&self.epoch);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn free_waits_for_older_requests() {
        let e = Epochs::new();
        let old = e.enter();
        let stamp = e.stamp();
        let young = e.enter();
        assert!(!e.quiesced(stamp));
        drop(old);
        assert!(
            e.quiesced(stamp),
            "a request newer than the free does not hold it back"
        );
        drop(young);
        assert!(e.quiesced(stamp));
    }
}
