//! Flushing metadata in soft-update order, and close (the background flusher is in
//! `flusher.rs`).
//!
//! ```text
//!  snapshot dirty L1 entries, then dirty L2 slices (copies; updates continue meanwhile)
//!  fsync data                      ── every mapping in the snapshot points at written data
//!  refcount blocks → fsync → refcount table → fsync
//!                                  ── every cluster in the snapshot has refcount ≥ 1
//!  zero new L2 clusters, write L2 snapshot → fsync
//!  write L1 snapshot → fsync
//!  apply frees whose dropping mapping is now on disk and whose readers are gone
//! ```
//! Refcount increments always happen before the mapping that uses the cluster is published,
//! so the refcounts written after the snapshot cover everything the snapshot references.
//! A crash can leak clusters, never leave a mapping without its refcount.

use std::collections::BTreeSet;

use super::Image;
use super::l1_table::{L1Sector, L1Table};
use crate::alloc::{DirtySlice, Kinds, NewKind, take_dirty};
use crate::error::{Error, Result};

/// Snapshot of dirty L2 slices: (slice, bytes, dirty generation).
type L2Snapshot = Vec<DirtySlice>;

impl Image {
    /// Make every write that completed before this call durable: data, then metadata in
    /// soft-update order, ending with fsync. On a read-only image this does nothing.
    ///
    /// Cancel-safe: a flush whose future is dropped still runs to its end in the background,
    /// so no dirty metadata it took over is lost.
    pub async fn flush(&self) -> Result<()> {
        self.detached(async move |img| img.flush_now().await).await
    }

    /// [`Image::flush`]'s work, run to completion by its caller.
    async fn flush_now(&self) -> Result<()> {
        let Some(w) = self.inner.write.as_ref() else {
            return Ok(());
        };
        w.check_poison()?;
        let _one = w.lock_flush().await;
        self.flush_held().await
    }

    /// [`Image::flush`]'s work, with `flush_lock` already held by the caller (resize).
    pub(crate) async fn flush_held(&self) -> Result<()> {
        let w = self.write_state_unpoisoned();
        w.check_poison()?;
        let generation = w.next_generation();
        let (l1_taken, l1) = self.inner.l1.take_dirty();
        let l2 = self.snapshot_l2();
        // Until the L1 sectors are written, the entries stay owed: if this future is dropped
        // (the runtime dropped the task finishing it) they go back to the dirty set.
        let mut owed = L1Owed(&self.inner.l1, Some(l1_taken));
        let writing: Vec<_> = l2.iter().map(|(s, _, _)| s.start_writing()).collect();
        let written = self.write_metadata(&l1, &l2).await;
        drop(writing);
        if let Err(e) = written {
            return Err(w.poison(e));
        }
        owed.1 = None;
        self.apply_frees(generation).await.map_err(|e| w.poison(e))
    }

    /// Wait for the requests in flight (including those whose callers dropped their futures),
    /// flush twice (the second persists the frees the first applied), stop the background
    /// flusher and release the image locks (of the backing chain and data file too), so the
    /// image can be opened again at once. Await this before dropping a writable image: there
    /// is no async drop, and unflushed metadata is lost (leaving leaked clusters at worst).
    /// Cancel-safe: a dropped close still finishes in the background.
    pub async fn close(&self) -> Result<()> {
        self.detached(async move |img| img.close_now().await).await
    }

    async fn close_now(&self) -> Result<()> {
        if let Some(w) = self.inner.write.as_ref() {
            w.requests_idle().await;
            self.store_bitmaps().await?;
        }
        self.flush_now().await?;
        self.flush_now().await?;
        if let Some(w) = self.inner.write.as_ref() {
            w.refcounts().trim_growth().await?;
            w.mark_closed();
        }
        self.release_locks();
        Ok(())
    }

    /// Drop the locks of this image, its data file and its backing chain. Errors are ignored:
    /// unlocking cannot fail on a valid descriptor, and the locks go with the file anyway.
    fn release_locks(&self) {
        let _ = self.inner.file.release_locks();
        let _ = self.inner.data.release_locks();
        match &self.inner.backing {
            Some(super::Backing::Qcow2(img)) => img.release_locks(),
            Some(super::Backing::Raw { storage, .. }) => {
                let _ = storage.release_locks();
            }
            None => {}
        }
    }

    fn snapshot_l2(&self) -> L2Snapshot {
        take_dirty(&self.inner.l2_cache)
    }

    async fn write_metadata(&self, l1: &[L1Sector], l2: &L2Snapshot) -> Result<()> {
        let w = self.write_state_unpoisoned();
        let new_l2 = self.inner.new.of_kind(NewKind::L2);
        self.sync_data().await?;
        {
            w.refcounts().lock().await.flush().await?;
        }
        let table = (self.inner.geo.cluster_size, Kinds::L2);
        let sets = (self.inner.new.as_ref(), w.refcounts().map().as_ref());
        w.meta()
            .zero_new(&new_l2, table, sets, "zeroing a new L2 table")
            .await?;
        let map = w.refcounts().map();
        w.meta()
            .write_back(l2, Kinds::L2, map, "writing an L2 slice")
            .await?;
        if !l2.is_empty() || !new_l2.is_empty() {
            self.sync_file().await?;
        }
        if !l1.is_empty() {
            self.write_l1(l1).await?;
            self.sync_file().await?;
        }
        Ok(())
    }

    /// Write the L1 sectors of the snapshot.
    async fn write_l1(&self, sectors: &[L1Sector]) -> Result<()> {
        let w = self.write_state_unpoisoned();
        let table_off = self.inner.l1.offset().0;
        for (sec, buf) in sectors {
            let at = table_off + *sec as u64 * 512;
            self.check_metadata_write(at, buf.len() as u64, Kinds::L1)
                .await?;
            w.meta().write(buf, at, "writing the L1 table").await?;
        }
        Ok(())
    }

    /// Drop the references whose dropping mappings are on disk (generation ≤ `upto`) and whose
    /// possible readers have finished.
    async fn apply_frees(&self, upto: u64) -> Result<()> {
        let w = self.write_state_unpoisoned();
        let ready = w.take_ready_frees(upto);
        if ready.is_empty() {
            return Ok(());
        }
        let cb = self.inner.geo.cluster_bits;
        let mut alloc = w.refcounts().lock().await;
        for f in ready {
            let c = f.host.cluster_index(cb);
            let cur = alloc.refcount(c).await?;
            if cur == 0 {
                let e = Error::corrupt("freeing a cluster whose refcount is already 0");
                return Err(e.at_host(f.host));
            }
            if cur == 1 {
                self.inner.l2_cache.invalidate_range(f.host.0, 1 << cb);
                if f.punch {
                    let _ = self.inner.data.discard(f.host.0, 1 << cb).await;
                }
            }
            alloc.set_refcount(c, cur - 1).await?;
        }
        Ok(())
    }

    async fn sync_data(&self) -> Result<()> {
        self.inner
            .data
            .flush()
            .await
            .map_err(|e| Error::io("syncing guest data", e))
    }

    pub(crate) async fn sync_file(&self) -> Result<()> {
        self.write_state()?.meta().sync("syncing metadata").await
    }

    fn write_state_unpoisoned(&self) -> &super::state::WriteState {
        self.inner
            .write
            .as_ref()
            .expect("flush on a writable image")
    }

    /// After a request changed metadata: wake the background flusher when enough is dirty.
    pub(crate) fn after_metadata_change(&self) {
        if let Some(w) = self.inner.write.as_ref() {
            let pct = self.inner.dirty_threshold_percent;
            if self.inner.l2_cache.dirty_above(pct) || w.refcounts().cache().dirty_above(pct) {
                w.want_flush();
            }
        }
    }
}

/// L1 entries a flush took from the dirty set and has not written yet; put back on drop.
struct L1Owed<'a>(&'a L1Table, Option<BTreeSet<usize>>);

impl Drop for L1Owed<'_> {
    fn drop(&mut self) {
        if let Some(owed) = self.1.take() {
            self.0.mark_dirty(owed);
        }
    }
}
