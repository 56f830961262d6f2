//! Deleting a snapshot (`qemu-img snapshot -d`): see the module docs of `snapshot` for the
//! order of the writes.

use super::super::Image;
use super::Snapshot;
use super::table::{find_by_id_or_name, not_found};
use super::tree::{Direction, add_range};
use crate::alloc::Kinds;
use crate::error::Result;

impl Image {
    /// Delete the snapshot whose ID is `key`, or else the first whose name is `key`
    /// (QEMU's lookup): drop its references, free what reaches refcount 0 (its L1 table and
    /// the clusters only it used), and set COPIED again where the active image is now the
    /// only user. Returns the deleted entry.
    ///
    /// Errors: `NotFound` (image untouched), `ReadOnly`, `Corrupt` when its tables
    /// contradict the refcounts (checked before anything changes). Cancel-safe.
    ///
    /// ```no_run
    /// # async fn demo(img: qcow2_engine::image::Image) -> qcow2_engine::Result<()> {
    /// img.delete_snapshot("before-upgrade").await?;
    /// # Ok(()) }
    /// ```
    pub async fn delete_snapshot(&self, key: &str) -> Result<Snapshot> {
        let key = key.to_string();
        self.detached(async move |img| img.delete_now(&key).await)
            .await
    }

    async fn delete_now(&self, key: &str) -> Result<Snapshot> {
        let w = self.write_state()?;
        let _quiet = self.quiesce().await?;
        let (mut snaps, old_place) = self.read_snapshot_table().await?;
        old_place.check_rewritable()?;
        let idx = find_by_id_or_name(&snaps, key).ok_or_else(|| not_found(key))?;
        let snap = snaps.remove(idx);
        snap.validate(self.inner.geo.cluster_size)?;
        let l1 = self.read_l1_at(snap.l1_table_offset, snap.l1_size).await?;
        let mut tree = self.load_tree(&l1).await?;
        let (cb, l1_len) = (self.inner.geo.cluster_bits, u64::from(snap.l1_size) * 8);
        add_range(&mut tree, snap.l1_table_offset, l1_len, cb);
        add_range(&mut tree, old_place.offset, old_place.len, cb);
        self.check_tree(&tree, Direction::Down).await?;
        async {
            self.switch_snapshot_table(&snaps).await?;
            // Nothing on disk refers to the deleted snapshot's tables any more: take them out
            // of the map (so freeing them is allowed), then put back what other snapshots use.
            let map = self.write_state()?.refcounts().map().clone();
            map.remove_kinds(old_place.offset, old_place.len, Kinds::SNAPSHOT_TABLE);
            map.remove_kinds(snap.l1_table_offset, l1_len, Kinds::SNAPSHOT_L1);
            let cs = self.inner.geo.cluster_size;
            for &t in &tree.l2_tables {
                map.remove_kinds(t, cs, Kinds::SNAPSHOT_L2);
            }
            self.mark_snapshots(&snaps).await?;
            self.change_tree(&tree, Direction::Down).await?;
            self.flush_refcounts().await?;
            self.recompute_active_copied().await
        }
        .await
        .map_err(|e| w.poison(e))?;
        Ok(snap)
    }

    /// Recompute the COPIED flags of the active tables and write the L1 table if it changed.
    pub(super) async fn recompute_active_copied(&self) -> Result<()> {
        let mut active = self.inner.l1.entries();
        if self.recompute_copied(&mut active).await? {
            self.write_active_l1(active).await?;
        }
        Ok(())
    }
}
