//! Storing the bitmaps at close, in soft-update order (see the module docs of `bitmaps`).

use std::sync::atomic::Ordering;

use super::{DirtyBits, Tracked};
use crate::alloc::Kinds;
use crate::error::Result;
use crate::format::bitmap::{self, BitmapEntry, FLAG_IN_USE, TableEntry};
use crate::format::extensions::{EXT_BITMAPS, Extension, serialize_extensions};
use crate::format::features;
use crate::image::Image;

/// A bitmap at close: its entry, the bits to store (`None`: keep the entry as is) and the
/// clusters to free once the new directory is in place.
type ToStore = (
    BitmapEntry,
    Option<std::sync::Arc<DirtyBits>>,
    Vec<(u64, u64)>,
);

impl Image {
    /// Write every bitmap we own to new clusters, then a new directory, then point the
    /// header at it; then free the old clusters. Nothing to do when no bitmap changed.
    pub(crate) async fn store_bitmaps(&self) -> Result<()> {
        let set = &self.inner.bitmaps;
        if !set.changed.load(Ordering::Acquire) {
            return Ok(());
        }
        let w = self.write_state()?;
        let _one = w.lock_flush().await;
        let mut entries = Vec::new();
        let mut old = std::mem::take(&mut *set.removed.lock().unwrap_or_else(|p| p.into_inner()));
        for (entry, bits, clusters) in self.bitmaps_to_store() {
            match bits {
                Some(bits) => entries.push(self.store_one(entry, &bits).await?),
                None => entries.push(entry),
            }
            old.extend(clusters);
        }
        let dir = self.write_directory(&entries).await?;
        {
            // Everything the new directory references is counted before the header says so.
            w.refcounts().lock().await.flush().await?;
        }
        self.sync_file().await?;
        self.write_bitmaps_extension(dir.map(|(off, size)| (entries.len(), size, off)))
            .await?;
        self.sync_file().await?;
        if let Some((off, size, _)) = set.on_disk.lock().unwrap_or_else(|p| p.into_inner()).take() {
            old.push((off, size.div_ceil(self.cluster_size())));
        }
        self.free_bitmap_clusters(&old).await?;
        set.changed.store(false, Ordering::Release);
        Ok(())
    }

    /// (entry, bits to store or `None` to keep the entry as is, clusters to free) of each
    /// bitmap, in order. Owned bitmaps hand over their old clusters.
    fn bitmaps_to_store(&self) -> Vec<ToStore> {
        let mut list = self
            .inner
            .bitmaps
            .list
            .write()
            .unwrap_or_else(|p| p.into_inner());
        list.iter_mut()
            .map(|t: &mut Tracked| match (&t.bits, t.owned) {
                (Some(bits), true) => (
                    t.entry.clone(),
                    Some(bits.clone()),
                    std::mem::take(&mut t.old_clusters),
                ),
                _ => (t.entry.clone(), None, Vec::new()),
            })
            .collect()
    }

    /// Write one bitmap's data clusters and table; its new entry (in_use clear).
    async fn store_one(&self, mut entry: BitmapEntry, bits: &DirtyBits) -> Result<BitmapEntry> {
        let cs = self.cluster_size();
        let size = self.virtual_size();
        let n = bitmap::table_size_for(size, entry.granularity_bits, cs)?;
        let data_len = bitmap::data_bytes_for(size, entry.granularity_bits);
        let mut table = Vec::with_capacity(usize::try_from(n * 8).unwrap_or(0));
        for i in 0..n {
            let len = (data_len - i * cs).min(cs);
            let mut buf = bits.to_bytes(i * cs, usize::try_from(len).unwrap_or(0));
            let e = match buf.iter().all(|&b| b == 0) {
                true => TableEntry::Zeros,
                false => {
                    buf.resize(usize::try_from(cs).unwrap_or(0), 0);
                    TableEntry::Data(
                        self.write_new_clusters(&buf, Kinds::NONE, "writing bitmap data")
                            .await?,
                    )
                }
            };
            table.extend_from_slice(&e.to_u64().to_be_bytes());
        }
        entry.table_offset = self
            .write_new_clusters(&table, Kinds::BITMAP_TABLE, "writing a bitmap table")
            .await?;
        // table_size_for() bounded n to QEMU's 2^27 entries.
        entry.table_size = u32::try_from(n).unwrap_or(u32::MAX);
        entry.flags &= !FLAG_IN_USE;
        Ok(entry)
    }

    /// Write the directory to new clusters; its (offset, size), or `None` when empty.
    async fn write_directory(&self, entries: &[BitmapEntry]) -> Result<Option<(u64, u64)>> {
        if entries.is_empty() {
            return Ok(None);
        }
        let buf = bitmap::serialize_directory(entries);
        let off = self
            .write_new_clusters(
                &buf,
                Kinds::BITMAP_DIRECTORY,
                "writing the bitmap directory",
            )
            .await?;
        Ok(Some((off, buf.len() as u64)))
    }

    /// Allocate clusters for `buf` (padded with zeros to whole clusters), record them in the
    /// metadata map as `kind`, and write them. Returns the offset.
    async fn write_new_clusters(&self, buf: &[u8], kind: Kinds, what: &'static str) -> Result<u64> {
        let cs = self.cluster_size();
        let n = (buf.len() as u64).div_ceil(cs).max(1);
        let w = self.write_state()?;
        let off = w.refcounts().alloc(n).await?.0;
        let mut padded = buf.to_vec();
        padded.resize(usize::try_from(n * cs).unwrap_or(0), 0);
        self.check_metadata_write(off, n * cs, kind).await?;
        w.refcounts().map().insert(off, n * cs, kind);
        w.meta().write(&padded, off, what).await?;
        Ok(off)
    }

    /// Rewrite cluster 0 with the bitmaps extension `(nb, size, offset)` (or none) and the
    /// autoclear bit to match. Read from disk, so fields other writers changed are kept.
    async fn write_bitmaps_extension(&self, ext: Option<(usize, u64, u64)>) -> Result<()> {
        let mut ih = super::super::read_cluster0(self.inner.file.as_ref()).await?;
        let pos = ih.extensions.iter().position(|e| e.kind() == EXT_BITMAPS);
        ih.remove_extensions(EXT_BITMAPS);
        if let Some((nb, size, off)) = ext {
            let e = Extension::Bitmaps {
                // At most 65535 bitmaps (the API refuses more).
                nb_bitmaps: u32::try_from(nb).unwrap_or(u32::MAX),
                bitmap_directory_size: size,
                bitmap_directory_offset: off,
                raw: Vec::new(),
            };
            ih.extensions.insert(
                pos.unwrap_or(ih.extensions.len()).min(ih.extensions.len()),
                e,
            );
            ih.header.autoclear_features |= features::BITMAPS;
        } else {
            ih.header.autoclear_features &= !features::BITMAPS;
        }
        let cluster0 = ih.to_cluster0()?;
        let used = ih.header.to_bytes().len()
            + serialize_extensions(&ih.extensions).len()
            + ih.backing_file.as_ref().map_or(0, String::len);
        let len = used.next_multiple_of(512).min(cluster0.len());
        self.check_metadata_write(0, len as u64, Kinds::HEADER)
            .await?;
        let w = self.write_state()?;
        w.meta()
            .write(&cluster0[..len], 0, "writing the bitmaps extension")
            .await?;
        let mut mem = self.inner.header.lock().unwrap_or_else(|p| p.into_inner());
        mem.extensions = ih.extensions;
        mem.header.autoclear_features = ih.header.autoclear_features;
        Ok(())
    }

    /// Drop one reference to each cluster of the runs (old tables, data, directories).
    async fn free_bitmap_clusters(&self, runs: &[(u64, u64)]) -> Result<()> {
        let w = self.write_state()?;
        let cb = self.inner.geo.cluster_bits;
        let mut alloc = w.refcounts().lock().await;
        for &(off, n) in runs {
            for c in (off >> cb)..(off >> cb) + n {
                // A crafted table may name other metadata: leak it rather than free it.
                let k = w.refcounts().map().kinds_of(c).0;
                if k & !(Kinds::BITMAP_TABLE.0 | Kinds::BITMAP_DIRECTORY.0) != 0 {
                    continue;
                }
                w.refcounts().map().remove_cluster(c);
                alloc
                    .change_refcount(crate::units::ClusterIndex(c), -1)
                    .await?;
            }
        }
        Ok(())
    }
}
