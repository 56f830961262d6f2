//! Write-side state of an image opened read-write: allocator, new-cluster set, in-flight
//! allocations, request epochs, pending frees, and the poison latch.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use super::frees::{PendingFree, PendingFrees};
use crate::alloc::{EpochGuard, Epochs, Inflight, InflightGuard, MetaWriter, Refcounts};
use crate::error::{Error, Result};
use crate::units::{GuestCluster, HostOffset};

#[derive(Debug)]
pub(crate) struct WriteState {
    /// The refcount table and blocks, and the cluster allocator (lock 4 in LOCKS.md).
    refcounts: Refcounts,
    /// Guest clusters whose mapping is being changed.
    inflight: Inflight,
    /// L1 indices whose L2 table is being allocated or copied.
    l1_inflight: Inflight,
    /// Request epochs: which requests started before a free, so it waits for them.
    epochs: Epochs,
    /// References to drop once safe (see `frees.rs`).
    frees: PendingFrees,
    /// One flush at a time.
    flush_lock: tokio::sync::Mutex<()>,
    /// Flush generation (see `frees.rs`).
    generation: AtomicU64,
    /// Every metadata write goes through it; it holds the poison latch.
    meta: Arc<MetaWriter>,
    /// Wakes the background flusher early (dirty threshold reached).
    flush_wanted: Arc<tokio::sync::Notify>,
    /// Set by close(): the background flusher stops.
    closed: AtomicBool,
}

impl WriteState {
    /// The write-side state of an image whose refcounts were read at open.
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
    pub fn defer_free(&self, host: HostOffset, punch: bool) {
        let generation = self.generation.load(Ordering::Acquire);
        let epoch = self.epochs.stamp();
        self.frees.push(host, punch, (epoch, generation));
    }

    /// Take the pending frees that are safe to apply once the flush of generation `upto`
    /// has completed.
    pub fn take_ready_frees(&self, upto: u64) -> Vec<PendingFree> {
        self.frees.take_ready(upto, &self.epochs)
    }

    /// The refcounts and the allocator built on them.
    pub fn refcounts(&self) -> &Refcounts {
        &self.refcounts
    }

    /// The metadata writer (every metadata write and fsync; the poison latch).
    pub fn meta(&self) -> &MetaWriter {
        &self.meta
    }

    /// Claim guest cluster `gc` while changing its mapping (lock 1 in LOCKS.md).
    pub async fn lock_guest_cluster(&self, gc: GuestCluster) -> InflightGuard<'_> {
        self.inflight.lock(gc.0).await
    }

    /// Claim guest cluster `gc` if no other request holds it (`None` otherwise).
    pub fn try_lock_guest_cluster(&self, gc: GuestCluster) -> Option<InflightGuard<'_>> {
        self.inflight.try_lock(gc.0)
    }

    /// Claim L1 entry `idx` while allocating or copying its L2 table (lock 2 in LOCKS.md).
    pub async fn lock_l1_entry(&self, idx: usize) -> InflightGuard<'_> {
        self.l1_inflight.lock(idx as u64).await
    }

    /// One flush (or resize) at a time (lock 3 in LOCKS.md).
    pub async fn lock_flush(&self) -> tokio::sync::MutexGuard<'_, ()> {
        self.flush_lock.lock().await
    }

    /// Register a request starting now (frees stamped later wait for it to end).
    pub fn enter_request(&self) -> EpochGuard<'_> {
        self.epochs.enter()
    }

    /// Wait until no request is running.
    pub async fn requests_idle(&self) {
        self.epochs.idle().await
    }

    /// Start a flush: returns its generation (frees deferred before it are applied by it).
    pub fn next_generation(&self) -> u64 {
        self.generation.fetch_add(1, Ordering::AcqRel)
    }

    /// Wake the background flusher now.
    pub fn want_flush(&self) {
        self.flush_wanted.notify_one()
    }

    /// The background flusher's wake-up signal.
    pub fn flush_wanted(&self) -> &Arc<tokio::sync::Notify> {
        &self.flush_wanted
    }

    /// Mark the image closed (the background flusher stops) and wake the flusher.
    pub fn mark_closed(&self) {
        self.closed.store(true, Ordering::Release);
        self.want_flush();
    }

    /// Whether `close()` has run.
    pub fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Acquire)
    }
}
