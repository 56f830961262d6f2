//! A read-only view of a snapshot: the image opened with the snapshot's L1 table and disk
//! size in place of the active ones (`qemu-img convert -l`, `qemu-nbd -l`).

use std::path::Path;

use super::super::{Image, OpenOptions};
use super::table::{find_by_id_or_name, not_found};
use crate::error::{Error, Result};
use crate::units::to_usize;

impl Image {
    /// Open the image at `path` read-only, showing the snapshot whose ID is `key` (or else
    /// the first whose name is `key`) instead of the active disk: reads and `map` are the
    /// snapshot's. As in QEMU (`qemu-img convert -l`, `qemu-nbd -l`), the virtual size and the
    /// backing file stay the image's current ones: past the snapshot's own size it reads
    /// zeros (or the backing file), and a snapshot larger than the image now is cut at the
    /// current size. `opts` must not be writable (`InvalidArgument`); `NotFound` when there
    /// is no such snapshot.
    ///
    /// ```no_run
    /// # async fn demo() -> qcow2_engine::Result<()> {
    /// use qcow2_engine::image::{Image, OpenOptions};
    /// let snap = Image::open_snapshot("disk.qcow2", &OpenOptions::new(), "before-upgrade").await?;
    /// let mut buf = vec![0u8; 4096];
    /// snap.read_at(&mut buf, 0).await?;
    /// # Ok(()) }
    /// ```
    pub async fn open_snapshot(
        path: impl AsRef<Path>,
        opts: &OpenOptions,
        key: &str,
    ) -> Result<Image> {
        if opts.writable {
            return Err(Error::invalid_arg(
                "a snapshot can only be opened read-only",
            ));
        }
        let img = Image::open(path, opts).await?;
        img.select_snapshot(key).await?;
        Ok(img)
    }

    /// Switch a read-only image's view to the snapshot `key`.
    async fn select_snapshot(&self, key: &str) -> Result<()> {
        let snaps = self.snapshots().await?;
        let idx = find_by_id_or_name(&snaps, key).ok_or_else(|| not_found(key))?;
        let snap = &snaps[idx];
        snap.validate(self.inner.geo.cluster_size)?;
        let mut l1 = self.read_l1_at(snap.l1_table_offset, snap.l1_size).await?;
        let size = self.virtual_size();
        let geo = self.inner.geo;
        let need = crate::format::header::l1_entries_for(size, geo.cluster_bits, geo.l2.extended);
        // Reads look up every guest cluster below the size: pad a short table with holes.
        if (l1.len() as u64) < need {
            l1.resize(to_usize(need), Default::default());
        }
        self.inner.l2_cache.invalidate_range(0, u64::MAX);
        self.inner.l1.replace(l1);
        self.inner
            .size
            .store(size, std::sync::atomic::Ordering::Release);
        Ok(())
    }
}
