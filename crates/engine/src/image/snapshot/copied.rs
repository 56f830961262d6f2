//! Recomputing the COPIED flags of the active tables from the refcounts: set exactly where
//! the refcount is 1 (the write path then writes in place), clear where a cluster is shared
//! (the write path copies it first). QEMU's `qemu-img check` reports any other combination.
//!
//! Creating a snapshot shares every active cluster (all flags go clear), deleting or
//! applying one can leave clusters with a single reference again (their flags go set).

use super::super::Image;
use crate::alloc::Kinds;
use crate::error::Result;
use crate::format::l1::{self, L1Entry};
use crate::format::l2::{self, L2E_COPIED, L2Entry};
use crate::units::to_usize;

impl Image {
    /// Make the COPIED flags of `l1` and its L2 tables agree with the refcounts (as they are
    /// in the refcount cache). Changed L2 tables are written in place and fsynced, and leave
    /// the L2 cache; `l1` is updated in memory only. Whether `l1` changed.
    pub(super) async fn recompute_copied(&self, l1: &mut [L1Entry]) -> Result<bool> {
        let mut l2_written = false;
        let mut l1_changed = false;
        for e in l1.iter_mut() {
            let Some(l2) = e.l2_offset() else {
                continue;
            };
            l2_written |= self.recompute_l2(l2.0).await?;
            let want = self.refcount_of(l2.0).await? == 1;
            if e.copied() != want {
                *e = L1Entry::new(l2, want);
                l1_changed = true;
            }
        }
        if l2_written {
            self.sync_file().await?;
        }
        Ok(l1_changed)
    }

    /// Fix the COPIED flags of the L2 table at `table`; whether it was written.
    async fn recompute_l2(&self, table: u64) -> Result<bool> {
        let geo = self.inner.geo.l2;
        let mut buf = self.read_l2_table(table).await?;
        let mut changed = false;
        for i in 0..to_usize(geo.entries_per_cluster()) {
            let Some((raw, bitmap)) = l2::read_raw(&buf, i, &geo) else {
                break;
            };
            let entry = L2Entry::decode(raw, &geo).map_err(|e| e.at(table))?;
            let Some(host) = entry.host() else {
                continue;
            };
            let want = self.refcount_of(host.0).await? == 1;
            if entry.copied() != want {
                let raw = if want {
                    raw | L2E_COPIED
                } else {
                    raw & !L2E_COPIED
                };
                l2::write_raw(&mut buf, i, &geo, raw, bitmap);
                changed = true;
            }
        }
        if changed {
            let w = self.write_state()?;
            let len = buf.len() as u64;
            // The table may be shared with snapshots: QEMU rewrites shared tables' flags too.
            let own = Kinds(Kinds::L2.0 | Kinds::SNAPSHOT_L2.0);
            self.check_metadata_write(table, len, own).await?;
            w.meta()
                .write(&buf, table, "writing COPIED flags of an L2 table")
                .await?;
            self.inner.l2_cache.invalidate_range(table, len);
        }
        Ok(changed)
    }

    /// The refcount of the host cluster at byte offset `host`.
    pub(super) async fn refcount_of(&self, host: u64) -> Result<u64> {
        let w = self.write_state()?;
        let c = crate::units::ClusterIndex(host >> self.inner.geo.cluster_bits);
        w.refcounts().lock().await.refcount(c).await
    }

    /// Write the whole active L1 table `l1` at the header's L1 offset, fsync, and make it
    /// the in-memory table.
    pub(super) async fn write_active_l1(&self, l1: Vec<L1Entry>) -> Result<()> {
        let w = self.write_state()?;
        let off = self.inner.header.lock().unwrap().header.l1_table_offset;
        let mut buf = vec![0u8; l1.len() * 8];
        l1::write_table(&l1, &mut buf);
        self.check_metadata_write(off, buf.len() as u64, Kinds::L1)
            .await?;
        w.meta().write(&buf, off, "writing the L1 table").await?;
        self.sync_file().await?;
        self.inner.l1.replace(l1);
        Ok(())
    }
}
