//! Applying a snapshot (`qemu-img snapshot -a`): the active disk becomes the snapshot's
//! again. QEMU overwrites the active L1 table in place, which a power cut can leave half old
//! and half new; here the new active table goes to fresh clusters and one header write
//! switches table and virtual size together (see the module docs of `snapshot`).

use super::super::Image;
use super::Snapshot;
use super::table::{find_by_id_or_name, not_found};
use super::tree::{Direction, Tree, add_range};
use crate::alloc::Kinds;
use crate::error::{Error, Result};
use crate::format::header::{self, HeaderPatch};
use crate::format::l1::{self, L1Entry};
use crate::units::HostOffset;
use crate::units::to_usize;

impl Image {
    /// Revert the disk to the snapshot whose ID is `key`, or else the first whose name is
    /// `key` (QEMU's lookup), including its virtual size. The current state is discarded
    /// (clusters only it used are freed); the snapshot stays. Returns the applied entry.
    ///
    /// Errors: `NotFound`, `Unsupported` (a refcount would overflow the width, or the image
    /// has persistent bitmaps: as QEMU, which refuses because the bitmaps describe the
    /// current state, not the snapshot's), `ReadOnly`, `Corrupt` (the snapshot's tables are
    /// damaged) — all before anything changes.
    /// Cancel-safe.
    ///
    /// ```no_run
    /// # async fn demo(img: qcow2_engine::image::Image) -> qcow2_engine::Result<()> {
    /// img.apply_snapshot("before-upgrade").await?;
    /// # Ok(()) }
    /// ```
    pub async fn apply_snapshot(&self, key: &str) -> Result<Snapshot> {
        let key = key.to_string();
        self.detached(async move |img| img.apply_now(&key).await)
            .await
    }

    async fn apply_now(&self, key: &str) -> Result<Snapshot> {
        let w = self.write_state()?;
        self.check_snapshots_supported()?;
        if !self.bitmaps().await?.is_empty() {
            return Err(Error::unsupported(
                "applying a snapshot to an image with persistent dirty bitmaps",
            ));
        }
        let _quiet = self.quiesce().await?;
        let (snaps, _) = self.read_snapshot_table().await?;
        let idx = find_by_id_or_name(&snaps, key).ok_or_else(|| not_found(key))?;
        let snap = snaps[idx].clone();
        snap.validate(self.inner.geo.cluster_size)?;
        let snap_l1 = self.read_l1_at(snap.l1_table_offset, snap.l1_size).await?;
        let old_l1: Vec<L1Entry> = self.inner.l1.entries();
        let mut old_tree = self.load_tree(&old_l1).await?;
        let (old_off, cb) = (self.l1_place().0, self.inner.geo.cluster_bits);
        add_range(&mut old_tree, old_off, old_l1.len() as u64 * 8, cb);
        let (new_tree, old_tree) = Tree::diff(self.load_tree(&snap_l1).await?, old_tree);
        self.check_tree(&new_tree, Direction::Up).await?;
        self.check_tree(&old_tree, Direction::Down).await?;
        let size = snap.disk_size.unwrap_or(self.virtual_size());
        let new_l1 = self.new_active_l1(&snap_l1, old_l1.len(), size)?;
        self.apply_commit(new_l1, (&new_tree, &old_tree), size)
            .await
            .map_err(|e| w.poison(e))?;
        Ok(snap)
    }

    /// The new active L1 table: the snapshot's entries (COPIED clear: they are shared with
    /// the snapshot) padded to the larger of the two tables and to what `size` needs.
    fn new_active_l1(
        &self,
        snap_l1: &[L1Entry],
        old_len: usize,
        size: u64,
    ) -> Result<Vec<L1Entry>> {
        let geo = self.inner.geo;
        let need = header::l1_entries_for(size, geo.cluster_bits, geo.l2.extended);
        let len = (snap_l1.len() as u64).max(old_len as u64).max(need).max(1);
        if len * 8 > header::MAX_L1_BYTES {
            return Err(Error::corrupt(
                "the snapshot's disk size needs an L1 table over 32 MiB",
            ));
        }
        let clusters = (len * 8).div_ceil(geo.cluster_size);
        let epb = self.write_state()?.refcounts().entries_per_block();
        if clusters >= epb {
            return Err(Error::unsupported(format!(
                "an L1 table of {clusters} clusters (a refcount block covers {epb})"
            )));
        }
        let mut l1: Vec<L1Entry> = snap_l1
            .iter()
            .map(|e| {
                e.l2_offset()
                    .map_or(L1Entry::default(), |h| L1Entry::new(h, false))
            })
            .collect();
        l1.resize(to_usize(len), L1Entry::default());
        Ok(l1)
    }

    /// The active L1 table's offset and entry count, from the header.
    fn l1_place(&self) -> (u64, u32) {
        let h = &self.inner.header.lock().unwrap().header;
        (h.l1_table_offset, h.l1_size)
    }

    /// The changes of an apply, once every check passed: `new` holds the references to add
    /// (and the new active L2 tables), `old` those to drop (and the old active L2 tables).
    async fn apply_commit(
        &self,
        new_l1: Vec<L1Entry>,
        (new, old): (&Tree, &Tree),
        size: u64,
    ) -> Result<()> {
        let w = self.write_state()?;
        let map = w.refcounts().map().clone();
        let (cs, len) = (self.inner.geo.cluster_size, new_l1.len() as u64 * 8);
        let (old_off, old_entries) = self.l1_place();
        self.change_tree(new, Direction::Up).await?;
        let offset = w.refcounts().alloc(len.div_ceil(cs)).await?.0;
        map.insert(offset, len, Kinds::L1);
        self.flush_refcounts().await?;
        let mut buf = vec![0u8; to_usize(len)];
        l1::write_table(&new_l1, &mut buf);
        self.check_metadata_write(offset, len, Kinds::L1).await?;
        w.meta()
            .write(&buf, offset, "writing the new L1 table")
            .await?;
        self.sync_file().await?;
        self.switch_active(new_l1, offset, size).await?;
        // The old active tables are no longer active; the new ones are.
        map.remove_kinds(old_off, u64::from(old_entries) * 8, Kinds::L1);
        old.l2_tables
            .iter()
            .for_each(|&t| map.remove_kinds(t, cs, Kinds::L2));
        new.l2_tables
            .iter()
            .for_each(|&t| map.insert(t, cs, Kinds::L2));
        self.change_tree(old, Direction::Down).await?;
        self.flush_refcounts().await?;
        for &t in old.l2_tables.iter().chain(&new.l2_tables) {
            self.inner.l2_cache.invalidate_range(t, cs);
        }
        self.recompute_active_copied().await
    }

    /// Switch the header to the new active L1 table and size in one write, fsync, then use
    /// them in memory.
    async fn switch_active(&self, l1: Vec<L1Entry>, offset: u64, size: u64) -> Result<()> {
        let w = self.write_state()?;
        let crypt = self.inner.header.lock().unwrap().header.crypt_method;
        let entries = u32::try_from(l1.len()).map_err(|_| Error::corrupt("L1 table too large"))?;
        let patch = HeaderPatch::size_and_l1_table(size, crypt, entries, offset);
        w.meta()
            .write(
                patch.bytes(),
                patch.offset(),
                "switching to the snapshot's L1 table",
            )
            .await?;
        self.sync_file().await?;
        // L1 (lock 5) then header (lock 6): readers see the new table, size and header
        // together.
        self.inner.l1.switch(l1, HostOffset(offset), || {
            let mut ih = self.inner.header.lock().unwrap();
            ih.header.l1_size = entries;
            ih.header.l1_table_offset = offset;
            ih.header.size = size;
            self.inner
                .size
                .store(size, std::sync::atomic::Ordering::Release);
        });
        Ok(())
    }
}
