//! Emptying the active layer (`qemu-img commit`'s last step): every cluster becomes
//! unallocated, so the image reads through to its backing file again.
//!
//! Unlike [`Image::discard`] (after which a range reads as zeros), this *exposes* the backing
//! file: it is only right once the backing file holds the same data, which `commit` makes
//! sure of (base written and fsynced first). Each cluster is unmapped through the normal
//! mapping update, so the soft-update order holds: the freed host clusters lose their
//! refcount only after the unallocated entry is on disk, and a crash part-way leaves some
//! clusters mapped (reading the same data as the backing file) and at worst leaks.

use super::Image;
use crate::error::Result;
use crate::format::l2::{L2Entry, SubclusterBitmap};
use crate::units::{GuestCluster, GuestOffset};

impl Image {
    /// Make every guest cluster unallocated (reading through to the backing file, or as
    /// zeros without one) and free its host clusters; flushes before returning. Tables shared
    /// with internal snapshots are copied first, so snapshots keep their data.
    ///
    /// Cancel-safe: once started, it runs to the end in the background if dropped.
    ///
    /// ```no_run
    /// # async fn demo() -> qcow2_engine::Result<()> {
    /// use qcow2_engine::image::{Image, OpenOptions};
    /// let img = Image::open("overlay.qcow2", &OpenOptions::new().writable(true)).await?;
    /// img.make_empty().await?; // the overlay now shows its backing file unchanged
    /// img.close().await?;
    /// # Ok(()) }
    /// ```
    pub async fn make_empty(&self) -> Result<()> {
        self.detached(async move |img| img.make_empty_now().await)
            .await
    }

    async fn make_empty_now(&self) -> Result<()> {
        let w = self.write_state()?;
        self.check_data_access()?;
        let geo = self.inner.geo;
        let clusters = self.virtual_size().div_ceil(geo.cluster_size);
        let mut gc = GuestCluster(0);
        while gc.0 < clusters {
            let covered = geo.l2_entries - geo.l2_index(gc);
            if self.l2_table_of(gc)?.is_some() {
                let _epoch = w.enter_request();
                for c in gc.0..(gc.0 + covered).min(clusters) {
                    self.unmap_cluster(GuestCluster(c)).await?;
                }
                self.after_metadata_change();
            }
            gc = gc.offset_by(covered);
        }
        self.flush().await
    }

    /// Make guest cluster `gc` unallocated, releasing what it pointed at.
    async fn unmap_cluster(&self, gc: GuestCluster) -> Result<()> {
        let w = self.write_state()?;
        let _guard = w.lock_guest_cluster(gc).await;
        let m = self.lookup(gc).await?;
        if matches!(m.entry, L2Entry::Unallocated) && m.bitmap.0 == 0 {
            return Ok(());
        }
        self.check_entry_is_data(&m.entry).await?;
        let table = self.ensure_l2_table(gc).await?;
        self.set_l2(table, gc, L2Entry::Unallocated, SubclusterBitmap(0))
            .await?;
        self.release_old(&m.entry);
        Ok(())
    }
}

impl Image {
    /// Make the whole clusters of `[off, off + len)` unallocated (cluster-aligned range),
    /// releasing what they pointed at: `amend compat=0.10` turns zero clusters of an image
    /// without a backing file into holes (version 2 has no zero flag).
    pub(crate) async fn unmap_clusters(&self, off: u64, len: u64) -> Result<()> {
        let w = self.write_state()?;
        let geo = self.inner.geo;
        let _epoch = w.enter_request();
        let first = geo.guest_cluster(GuestOffset(off));
        let end = (off + len).div_ceil(geo.cluster_size);
        for gc in first.0..end {
            self.unmap_cluster(GuestCluster(gc)).await?;
        }
        self.after_metadata_change();
        Ok(())
    }
}
