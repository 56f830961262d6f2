//! Detecting metadata preallocation, the way QEMU decides whether `map` should look at the
//! image file's holes.
//!
//! An image created with `preallocation=metadata` maps every cluster although the file is
//! mostly holes; QEMU then reports such data clusters as reading zeros. It detects the case
//! by comparing how many clusters have a refcount with how many the file really occupies:
//! at least `max(real * 10 / 9, real + 2)` referenced clusters means "preallocated". We use
//! the same rule so `qcow2 map` prints what `qemu-img map` prints.

use super::Image;
use crate::error::{Error, Result};
use crate::format::refcount;

/// Header offset of `refcount_table_offset` (u64) then `refcount_table_clusters` (u32).
const REFTABLE_FIELDS: u64 = 48;
/// The spec's bound on the refcount table.
const MAX_TABLE_BYTES: u64 = 8 << 20;

impl Image {
    /// Whether the image looks metadata-preallocated (computed once).
    pub(crate) async fn metadata_preallocated(&self) -> Result<bool> {
        if let Some(v) = self.inner.prealloc.get() {
            return Ok(*v);
        }
        let v = self.detect_prealloc().await?;
        let _ = self.inner.prealloc.set(v);
        Ok(v)
    }

    async fn detect_prealloc(&self) -> Result<bool> {
        let file = &self.inner.file;
        let io = |e| Error::io("detecting metadata preallocation", e);
        let Some(real) = file.allocated_size().await.map_err(io)? else {
            return Ok(false);
        };
        let cb = self.inner.geo.cluster_bits;
        let real_clusters = real >> cb;
        let threshold = (real_clusters * 10 / 9).max(real_clusters + 2);
        let end_cluster = file.len().await.map_err(io)?.div_ceil(1 << cb);
        let order = self.inner.header.lock().unwrap().header.refcount_order;
        let epb = refcount::entries_per_block(1 << cb, order);
        let mut count = 0u64;
        for (ti, block) in self.read_reftable().await?.into_iter().enumerate() {
            let Some(block) = block else { continue };
            let first = ti as u64 * epb;
            if first >= end_cluster {
                break;
            }
            let mut buf = vec![0u8; 1 << cb];
            file.read_at(&mut buf, block).await.map_err(io)?;
            let n = epb.min(end_cluster - first);
            count += (0..n)
                .filter(|&i| refcount::get(&buf, i, order) > 0)
                .count() as u64;
            if count >= threshold {
                return Ok(true);
            }
        }
        Ok(false)
    }

    /// The refcount table as it is on disk now (the header may have moved it).
    async fn read_reftable(&self) -> Result<Vec<Option<u64>>> {
        let file = &self.inner.file;
        let io = |e| Error::io("reading the refcount table", e);
        let mut hdr = [0u8; 12];
        file.read_at(&mut hdr, REFTABLE_FIELDS).await.map_err(io)?;
        let off = u64::from_be_bytes(hdr[..8].try_into().expect("8 bytes"));
        let clusters = u64::from(u32::from_be_bytes(hdr[8..].try_into().expect("4 bytes")));
        let bytes = (clusters << self.inner.geo.cluster_bits).min(MAX_TABLE_BYTES);
        let mut buf = vec![0u8; crate::units::to_usize(bytes)]; // at most MAX_TABLE_BYTES
        file.read_at(&mut buf, off).await.map_err(io)?;
        let table = refcount::parse_table(&buf);
        Ok(table
            .iter()
            .map(|e| e.block_offset().map(|h| h.0))
            .collect())
    }
}
