//! [`Allocator`]: the allocator lock held, with the operations that need it as methods.
//!
//! Everything that decides a refcount runs under one async mutex (`Refcounts::state`, lock 4
//! in LOCKS.md). Code outside `alloc` never sees the state behind it: it takes this guard
//! (`Refcounts::lock`) and calls its methods, so several refcount changes can form one
//! critical section (a flush's frees, resize's release of the old L1 table) without handing
//! `&mut` state around.

use tokio::sync::MutexGuard;

use super::{RefState, Refcounts};
use crate::error::Result;
use crate::units::{ClusterIndex, HostOffset};

/// The allocator with its lock held; dropping it releases the lock.
#[derive(Debug)]
pub struct Allocator<'a> {
    rc: &'a Refcounts,
    st: MutexGuard<'a, RefState>,
}

impl<'a> Allocator<'a> {
    pub(super) fn new(rc: &'a Refcounts, st: MutexGuard<'a, RefState>) -> Self {
        Allocator { rc, st }
    }

    /// Allocate `n` contiguous free clusters (refcount 1) and return the host offset of the
    /// first.
    pub async fn alloc_clusters(&mut self, n: u64) -> Result<HostOffset> {
        self.rc.alloc_locked(&mut self.st, n).await.map(HostOffset)
    }

    /// Reserve `size` bytes for a compressed payload (see `bytes.rs`); returns the host
    /// byte offset.
    pub async fn alloc_bytes(&mut self, size: u64) -> Result<HostOffset> {
        self.rc
            .alloc_bytes_locked(&mut self.st, size)
            .await
            .map(HostOffset)
    }

    /// The refcount of host cluster `c`.
    pub async fn refcount(&self, c: ClusterIndex) -> Result<u64> {
        self.rc.get(&self.st, c.0).await
    }

    /// Set the refcount of host cluster `c` to `v` (0 frees it).
    pub async fn set_refcount(&mut self, c: ClusterIndex, v: u64) -> Result<()> {
        self.rc.set(&mut self.st, c.0, v).await
    }

    /// Add `delta` to the refcount of host cluster `c`; returns the new refcount. Errors on
    /// underflow or overflow.
    pub async fn change_refcount(&mut self, c: ClusterIndex, delta: i64) -> Result<u64> {
        self.rc.add(&mut self.st, c.0, delta).await
    }

    /// Drop one reference to host cluster `c`; returns the refcount left.
    pub async fn free(&mut self, c: ClusterIndex) -> Result<u64> {
        self.change_refcount(c, -1).await
    }

    /// Write the refcount blocks and table to disk in order, with fsyncs (see
    /// `Refcounts::flush_locked`).
    pub async fn flush(&mut self) -> Result<()> {
        self.rc.flush_locked(&mut self.st).await
    }
}
