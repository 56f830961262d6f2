//! Write-side state of an image opened read-write: allocator, new-cluster set, in-flight
//! allocations, request epochs, pending frees, and the poison latch.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use super::frees::{PendingFree, PendingFrees};
use crate::alloc::{Epochs, Inflight, MetaWriter, Refcounts};
use crate::error::{Error, Result};

#[derive(Debug)]
pub(crate) struct WriteState {
    /// The refcount table and blocks, and the cluster allocator (lock 4 in LOCKS.md).
    pub refcounts: Refcounts,
    /// Guest clusters whose mapping is being changed.
    pub inflight: Inflight,
    /// L1 indices whose L2 table is being allocated or copied.
    pub l1_inflight: Inflight,
    /// Request epochs: which requests started before a free, so it waits for them.
    pub epochs: Epochs,
    /// References to drop once safe (see `frees.rs`).
    frees: PendingFrees,
    /// One flush at a time.
    pub flush_lock: tokio::sync::Mutex<()>,
    /// Flush generation (see `frees.rs`).
    pub generation: AtomicU64,
    /// Every metadata write goes through it; it holds the poison latch.
    pub meta: Arc<MetaWriter>,
    /// Wakes the background flusher early (dirty threshold reached).
    pub flush_wanted: std::sync::Arc<tokio::sync::Notify>,
    /// Set by close(): the background flusher stops.
    pub closed: AtomicBool,
}

impl WriteState {
    pub fn new(refcounts: Refcounts) -> Self {
        WriteState {
            meta: refcounts.meta().clone(),
            refcounts,
            inflight: Inflight::new(),
            l1_inflight: Inflight::new(),
            epochs: Epochs::new(),
            frees: PendingFrees::default(),
            flush_lock: tokio::sync::Mutex::new(()),
            generation: AtomicU64::new(1),
            flush_wanted: std::sync::Arc::new(tokio::sync::Notify::new()),
            closed: AtomicBool::new(false),
        }
    }

    /// Refuse to continue after a metadata write failure.
    pub fn check_poison(&self) -> Result<()> {
        if self.refcounts.map().is_corrupt() {
            return Err(super::overlap::corrupt_latched());
        }
        self.meta.check()
    }

    /// Latch the poison after a metadata write failure; passes the error through.
    pub fn poison(&self, e: Error) -> Error {
        self.meta.latch(e)
    }

    /// Schedule dropping one reference to host cluster `host`.
    pub fn defer_free(&self, host: u64, punch: bool) {
        let generation = self.generation.load(Ordering::Acquire);
        let epoch = self.epochs.stamp();
        self.frees.push(host, punch, (epoch, generation));
    }

    /// Take the pending frees that are safe to apply once the flush of generation `upto`
    /// has completed.
    pub fn take_ready_frees(&self, upto: u64) -> Vec<PendingFree> {
        self.frees.take_ready(upto, &self.epochs)
    }
}
