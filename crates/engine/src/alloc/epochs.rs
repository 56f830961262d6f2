//! Request epochs: when may a freed host cluster really be reused?
//!
//! A request looks a mapping up, then does its data IO some time later. If the cluster it
//! found were freed and handed to another guest cluster in between, the request would read
//! another region's data or, worse, overwrite it. So every request registers the epoch it
//! started in, a free is stamped with the epoch current when the mapping dropped the cluster,
//! and the free is applied only once no request from that epoch or earlier is still running.
//!
//! `close` also uses it to wait until no request is running (a request whose caller dropped
//! its future keeps running in the background until its IO is done; see `crate::detach`).

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use tokio::sync::Notify;

/// Counts running requests per start epoch.
#[derive(Debug, Default)]
pub struct Epochs {
    inner: Mutex<EpochState>,
    /// Woken when the last running request leaves while someone waits in [`Epochs::idle`].
    idle: Arc<Notify>,
}

#[derive(Debug, Default)]
struct EpochState {
    current: u64,
    running: BTreeMap<u64, usize>,
    /// Tasks waiting in [`Epochs::idle`] (so the hot path skips the notify when 0).
    waiting: usize,
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

    /// Wait until no request is running.
    pub async fn idle(&self) {
        loop {
            let notified = {
                let mut s = self.inner.lock().unwrap();
                if s.running.is_empty() {
                    return;
                }
                s.waiting += 1;
                // Created under the lock that the last leaving request notifies under, so
                // the wake-up cannot be missed.
                self.idle.clone().notified_owned()
            };
            let _leave = Waiting(self);
            notified.await;
        }
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
                if s.running.is_empty() && s.waiting > 0 {
                    self.epochs.idle.notify_waiters();
                }
            }
        }
    }
}

/// Counts a task waiting in [`Epochs::idle`] until it stops waiting (woken or dropped).
struct Waiting<'a>(&'a Epochs);

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.inner.lock().unwrap().waiting -= 1;
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

    #[tokio::test]
    async fn idle_waits_for_the_last_request() {
        let e = Arc::new(Epochs::new());
        e.idle().await; // nothing running
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let e2 = e.clone();
        let req = tokio::spawn(async move {
            let _g = e2.enter();
            let _ = rx.await;
        });
        tokio::task::yield_now().await;
        let waiter = tokio::spawn({
            let e = e.clone();
            async move { e.idle().await }
        });
        tokio::task::yield_now().await;
        assert!(!waiter.is_finished());
        tx.send(()).unwrap();
        req.await.unwrap();
        waiter.await.unwrap();
        assert_eq!(e.inner.lock().unwrap().waiting, 0);
    }
}
