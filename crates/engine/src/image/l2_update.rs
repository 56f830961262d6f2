//! Changing mappings: creating (or copying a shared) L2 table, and publishing an L2 entry in
//! the cached slice.

use super::Image;
use crate::alloc::{Kinds, NewKind};
use crate::error::{Error, Result};
use crate::format::l1::L1Entry;
use crate::format::l2::{self, L2Entry, SubclusterBitmap};
use crate::units::{GuestCluster, HostOffset};

impl Image {
    /// The host offset of a writable (refcount 1) L2 table for guest cluster `gc`: the
    /// existing one, a new zeroed one when the L1 entry is empty, or a private copy when the
    /// table is shared with a snapshot (L1 entry without COPIED).
    pub(crate) async fn ensure_l2_table(&self, gc: GuestCluster) -> Result<HostOffset> {
        let w = self.write_state()?;
        let idx = self.inner.geo.l1_index(gc);
        if let Some(t) = self.private_l2(idx)? {
            return Ok(t);
        }
        let _guard = w.lock_l1_entry(idx).await;
        if let Some(t) = self.private_l2(idx)? {
            return Ok(t);
        }
        let old = self.l1_entry(idx)?.l2_offset();
        let new = w.refcounts().alloc(1).await?;
        let cs = self.inner.geo.cluster_size;
        w.refcounts().map().insert(new.0, cs, Kinds::L2);
        self.inner.new.insert(new.0, NewKind::L2);
        if let Some(old) = old {
            self.copy_l2_table(old, new).await?;
        }
        self.inner.l1.set(idx, L1Entry::new(new, true));
        if let Some(old) = old {
            // The old table stays referenced by the snapshot; drop the active image's
            // reference once the new L1 entry is on disk.
            w.defer_free(old, false);
        }
        Ok(new)
    }

    /// The L2 table of L1 entry `idx` if it exists and is not shared.
    fn private_l2(&self, idx: usize) -> Result<Option<HostOffset>> {
        let e = self.l1_entry(idx)?;
        Ok(e.l2_offset().filter(|_| e.copied()))
    }

    /// L1 entry `idx` of the active table.
    fn l1_entry(&self, idx: usize) -> Result<L1Entry> {
        (self.inner.l1)
            .get(idx)
            .ok_or_else(|| Error::corrupt("guest offset beyond the L1 table"))
    }

    /// Copy the L2 table at `old` into the new table at `new`, slice by slice.
    async fn copy_l2_table(&self, old: HostOffset, new: HostOffset) -> Result<()> {
        let ss = self.inner.geo.slice_size;
        for i in 0..self.inner.geo.cluster_size / ss {
            let src = self.l2_slice(old.offset_by(i * ss)).await?;
            let bytes = src.read(|b| b.to_vec());
            let dst = self.l2_slice(new.offset_by(i * ss)).await?;
            dst.update(|b| b.copy_from_slice(&bytes));
        }
        Ok(())
    }

    /// Publish `entry` for guest cluster `gc` in the L2 table at `table` (cache only; the
    /// flush writes it).
    pub(crate) async fn set_l2(
        &self,
        table: HostOffset,
        gc: GuestCluster,
        entry: L2Entry,
        bitmap: SubclusterBitmap,
    ) -> Result<()> {
        let geo = self.inner.geo;
        let (off, idx) = geo.l2_slice(table, geo.l2_index(gc));
        let raw = entry.encode(&geo.l2);
        let slice = self.l2_slice(off).await?;
        let ok = slice.update(|b| l2::write_raw(b, idx, &geo.l2, raw, bitmap));
        if !ok {
            return Err(Error::corrupt("L2 index outside its slice"));
        }
        Ok(())
    }
}
