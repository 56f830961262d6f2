//! Changing the virtual size (`qemu-img resize` semantics).
//!
//! Growing past what the L1 table covers moves the L1 table, in crash-safe order:
//! ```text
//!  new table clusters allocated → refcount blocks written + fsync  (they are counted)
//!  new table = on-disk old table + zeros, written + fsync           (complete before use)
//!  header l1_size + l1_table_offset (one 12-byte write) + fsync     (the switch)
//!  header size + fsync                                              (bigger L1 is valid
//!                                                                    for the old size)
//!  old table clusters freed (refcount − 1, in the cache)            (nothing points there)
//! ```
//! A crash before the switch leaks the new clusters; after it, the old ones. Nothing is ever
//! referenced without a refcount, and the old size stays valid until the size is written.
//!
//! Shrinking (only when asked for) discards everything past the new end through the normal
//! discard path, flushes, then writes the smaller size. The L1 table keeps its length.
//!
//! Concurrency: resize holds the flush lock, so no flush interleaves with the table switch.
//! It is meant to run with no other requests in flight; a request that does run concurrently
//! is checked against either the old or the new size, and L1 entries it changes during the
//! switch stay dirty and are written to the new table by the next flush.

use std::sync::atomic::Ordering;

use super::Image;
use crate::alloc::Kinds;
use crate::error::{Error, ErrorKind, Result};
use crate::format::header::{self, HeaderPatch, L1_ENTRY_SIZE, MAX_L1_BYTES};
use crate::units::to_usize;
use crate::units::{ClusterIndex, HostOffset};

impl Image {
    /// Grow the virtual disk to `new_size` bytes (a multiple of 512). Shrinking is refused;
    /// see [`Image::resize_with`].
    pub async fn resize(&self, new_size: u64) -> Result<()> {
        self.resize_with(new_size, false).await
    }

    /// Change the virtual size to `new_size` bytes (a multiple of 512). With `allow_shrink`
    /// a smaller size discards all data past the new end (`qemu-img resize --shrink`);
    /// without it a smaller size is refused. The new size is durable when this returns.
    /// Cancel-safe: a dropped resize still finishes in the background.
    pub async fn resize_with(&self, new_size: u64, allow_shrink: bool) -> Result<()> {
        self.detached(async move |img| img.resize_now(new_size, allow_shrink).await)
            .await
    }

    async fn resize_now(&self, new_size: u64, allow_shrink: bool) -> Result<()> {
        let w = self.write_state()?;
        self.check_resizable(new_size)?;
        let old = self.virtual_size();
        if new_size != old {
            self.bitmaps_before_resize().await?;
        }
        if new_size < old {
            if !allow_shrink {
                return Err(Error::invalid_arg(
                    "shrinking would delete data past the new end; allow it explicitly (--shrink)",
                ));
            }
            if self.inner.header.lock().unwrap().header.nb_snapshots > 0 {
                return Err(Error::unsupported(
                    "cannot shrink an image which has internal snapshots",
                ));
            }
            // Before taking the flush lock: a discard under cache pressure flushes.
            self.zero_range(new_size, old - new_size, true).await?;
        }
        let _one = w.lock_flush().await;
        w.check_poison()?;
        if new_size < old {
            // The discarded mappings reach disk before the smaller size does.
            self.flush_held().await?;
        } else {
            let geo = self.inner.geo;
            let need = header::l1_entries_for(new_size, geo.cluster_bits, geo.l2.extended);
            let have = self.inner.l1.len() as u64;
            if need > have {
                self.grow_l1(need).await.map_err(|e| w.poison(e))?;
            }
        }
        if new_size != old {
            self.write_size(new_size).await.map_err(|e| w.poison(e))?;
        }
        Ok(())
    }

    /// Refuse what resize does not support, before changing anything.
    fn check_resizable(&self, new_size: u64) -> Result<()> {
        if new_size % 512 != 0 {
            return Err(Error::invalid_arg(format!(
                "the new size {new_size} must be a multiple of 512"
            )));
        }
        if self.inner.data_file_path.is_some() {
            return Err(Error::unsupported(
                "resizing an image with an external data file",
            ));
        }
        let cb = self.inner.geo.cluster_bits;
        let need = header::l1_entries_for(new_size, cb, self.inner.geo.l2.extended);
        if need.saturating_mul(L1_ENTRY_SIZE) > MAX_L1_BYTES {
            return Err(Error::new(
                ErrorKind::OutOfRange,
                format!("the new size {new_size} needs an L1 table over QEMU's 32 MiB limit"),
            ));
        }
        let have = self.inner.l1.len() as u64;
        let clusters = (need * L1_ENTRY_SIZE).div_ceil(self.inner.geo.cluster_size);
        // The allocator places a missing refcount block at the start of the range it covers,
        // so it cannot hand out a contiguous run spanning a whole block's range.
        let epb = self.write_state()?.refcounts().entries_per_block();
        if need > have && clusters >= epb {
            return Err(Error::unsupported(format!(
                "an L1 table of {clusters} clusters (a refcount block covers {epb}); \
                 use larger clusters or a smaller size"
            )));
        }
        Ok(())
    }

    /// Move the L1 table to a new place with `need` entries (see the module comment).
    async fn grow_l1(&self, need: u64) -> Result<()> {
        let w = self.write_state()?;
        let cs = self.inner.geo.cluster_size;
        let (old_off, old_len) = {
            let h = &self.inner.header.lock().unwrap().header;
            (h.l1_table_offset, u64::from(h.l1_size))
        };
        let clusters = (need * L1_ENTRY_SIZE).div_ceil(cs);
        // Copy the table as it is on disk, not the cache: entries changed since the last
        // flush may point at L2 tables not written yet. They stay dirty and reach the new
        // table by the next flush (which writes to the offset in the header we update).
        let mut buf = vec![0u8; to_usize(clusters * cs)];
        let old_bytes = to_usize(old_len * L1_ENTRY_SIZE);
        self.inner
            .file
            .read_at(&mut buf[..old_bytes], old_off)
            .await
            .map_err(|e| Error::io("reading the L1 table", e).at_host(HostOffset(old_off)))?;
        let new_off = w.refcounts().alloc(clusters).await?.0;
        w.refcounts()
            .map()
            .insert(new_off, clusters * cs, Kinds::L1);
        // The new clusters' refcounts must be on disk before the header points there.
        w.refcounts().lock().await.flush().await?;
        self.check_metadata_write(new_off, buf.len() as u64, Kinds::L1)
            .await?;
        self.write_meta(&buf, new_off, "writing the new L1 table")
            .await?;
        self.sync_file().await?;
        // check_resizable bounded the table to 32 MiB (4 Mi entries).
        let l1_size = u32::try_from(need)
            .map_err(|_| Error::unsupported(format!("an L1 table of {need} entries")))?;
        let fields = HeaderPatch::l1_table(l1_size, new_off);
        self.write_meta(fields.bytes(), fields.offset(), "switching the L1 table")
            .await?;
        self.sync_file().await?;
        self.inner.l1.grow(to_usize(need), HostOffset(new_off));
        {
            let mut ih = self.inner.header.lock().unwrap();
            ih.header.l1_size = l1_size;
            ih.header.l1_table_offset = new_off;
        }
        // Nothing on disk points at the old table any more.
        let old_clusters = (old_len * L1_ENTRY_SIZE).div_ceil(cs);
        let mut alloc = w.refcounts().lock().await;
        for c in 0..old_clusters {
            alloc.free(ClusterIndex(old_off / cs + c)).await?;
        }
        Ok(())
    }

    /// Write the virtual size into the header, fsync, and start using it.
    async fn write_size(&self, new_size: u64) -> Result<()> {
        let field = HeaderPatch::size(new_size);
        self.write_meta(field.bytes(), field.offset(), "writing the new size")
            .await?;
        self.sync_file().await?;
        self.inner.header.lock().unwrap().header.size = new_size;
        self.inner.size.store(new_size, Ordering::Release);
        self.inner.bitmaps.resize(new_size);
        Ok(())
    }

    async fn write_meta(&self, buf: &[u8], off: u64, what: &'static str) -> Result<()> {
        self.write_state()?.meta().write(buf, off, what).await
    }
}
