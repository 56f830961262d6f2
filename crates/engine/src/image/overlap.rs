//! Building the metadata map at a read-write open, and the overlap checks of the write path
//! (see `crate::alloc::MetadataMap` for what a hit does).
//!
//! The map starts with every structure the header leads to: the header cluster, the active
//! L1 table and its L2 tables, the refcount table and its blocks, the snapshot table, the
//! snapshots' L1 tables and the L2 tables they point to, the bitmap directory and bitmap tables, the encryption header. The
//! allocator, the L2 table creation and the L1 move keep it current afterwards.

use std::sync::Arc;

use super::Image;
use crate::alloc::{Kinds, MetadataMap};
use crate::error::{Error, Result};
use crate::format::extensions::{Extension, ImageHeader, MAX_BITMAP_DIRECTORY_SIZE};
use crate::format::l1::{self, L1Entry};
use crate::format::l2::L2Entry;
use crate::format::refcount::RefTableEntry;
use crate::format::snapshot;
use crate::storage::Storage;
use crate::units::HostOffset;

/// The metadata map of an image being opened read-write.
pub(super) async fn build_map(
    file: &Arc<dyn Storage>,
    ih: &ImageHeader,
    l1: &[L1Entry],
    reftable: &[RefTableEntry],
) -> Arc<MetadataMap> {
    let h = &ih.header;
    let cs = h.cluster_size();
    let map = MetadataMap::new(file.clone(), h.cluster_bits);
    map.insert(0, cs, Kinds::HEADER);
    map.insert(h.l1_table_offset, u64::from(h.l1_size) * 8, Kinds::L1);
    for l2 in l1.iter().filter_map(|e| e.l2_offset()) {
        map.insert(l2.0, cs, Kinds::L2);
    }
    let rt_len = u64::from(h.refcount_table_clusters) * cs;
    map.insert(h.refcount_table_offset, rt_len, Kinds::REFTABLE);
    for b in reftable.iter().filter_map(|e| e.block_offset()) {
        map.insert(b.0, cs, Kinds::REFBLOCK);
    }
    let len = file.len().await.unwrap_or(0);
    let mut extra = Bounded {
        map: &map,
        file_len: len,
        budget: len >> h.cluster_bits,
    };
    add_snapshots(&mut extra, file.as_ref(), ih).await;
    add_bitmaps(&mut extra, file.as_ref(), ih).await;
    for e in &ih.extensions {
        if let Extension::FullDiskEncryption { offset, length } = e {
            extra.insert(*offset, *length, Kinds::CRYPTO_HEADER);
        }
    }
    Arc::new(map)
}

/// Inserts of ranges whose sizes come from untrusted fields (snapshot L1 sizes, bitmap table
/// sizes, the encryption header length): each must lie inside the file, and together they
/// may not cover more clusters than the file has — the tables of a sound image are disjoint,
/// so more means overlapping garbage, and the time spent stays bounded by the file size.
struct Bounded<'a> {
    map: &'a MetadataMap,
    file_len: u64,
    budget: u64,
}

impl Bounded<'_> {
    /// Insert the range if it passes; whether it did.
    fn insert(&mut self, off: u64, len: u64, kind: Kinds) -> bool {
        let inside = off.checked_add(len).is_some_and(|end| end <= self.file_len);
        let clusters = len.div_ceil(1 << self.map.cluster_bits()) + 1;
        if !inside || clusters > self.budget {
            return false;
        }
        self.budget -= clusters;
        self.map.insert(off, len, kind);
        true
    }
}

/// The snapshot table and each snapshot's L1 table. Best effort: the table is read entry by
/// entry and a malformed entry ends the walk (reading does not need it; only the overlap
/// check loses those entries).
async fn add_snapshots(map: &mut Bounded<'_>, file: &dyn Storage, ih: &ImageHeader) {
    let len = map.file_len;
    let h = &ih.header;
    let mut off = 0u64;
    for _ in 0..h.nb_snapshots {
        off = off.next_multiple_of(8);
        let at = h.snapshots_offset.saturating_add(off);
        let Some(hdr) = read(file, at, snapshot::ENTRY_HEADER_LEN as u64, len).await else {
            break;
        };
        let Ok(n) = snapshot::entry_len(&hdr) else {
            break;
        };
        let Some(entry) = read(file, at, n as u64, len).await else {
            break;
        };
        let Ok((snap, n)) = snapshot::parse_entry(&entry) else {
            break;
        };
        off += n as u64;
        if off > snapshot::MAX_TABLE_SIZE as u64 {
            break;
        }
        let l1_len = u64::from(snap.l1_size) * 8;
        if map.insert(snap.l1_table_offset, l1_len, Kinds::SNAPSHOT_L1) {
            add_snapshot_l2s(map, file, snap.l1_table_offset, l1_len).await;
        }
    }
    map.insert(h.snapshots_offset, off, Kinds::SNAPSHOT_TABLE);
}

/// The L2 tables of the snapshot L1 table at `[at, at + len)` (which `Bounded` accepted:
/// the work is bounded by the file size). Only the L1 table is read, 64 KiB at a time; many
/// snapshots share L2 tables, and the map keeps one entry per cluster.
async fn add_snapshot_l2s(map: &mut Bounded<'_>, file: &dyn Storage, at: u64, len: u64) {
    const CHUNK: u64 = 64 << 10;
    let cs = 1u64 << map.map.cluster_bits();
    let mut done = 0;
    while done < len {
        let n = CHUNK.min(len - done);
        let Some(buf) = read(file, at + done, n, map.file_len).await else {
            return;
        };
        for l2 in l1::parse_table(&buf).iter().filter_map(|e| e.l2_offset()) {
            if l2.0.checked_add(cs).is_some_and(|end| end <= map.file_len) {
                map.map.insert(l2.0, cs, Kinds::SNAPSHOT_L2);
            }
        }
        done += n;
    }
}

/// The bitmap directory and the bitmap tables it lists (best effort, as for snapshots).
async fn add_bitmaps(map: &mut Bounded<'_>, file: &dyn Storage, ih: &ImageHeader) {
    let len = map.file_len;
    let Some((nb, dir_size, dir_off)) = ih.bitmaps() else {
        return;
    };
    if dir_size > MAX_BITMAP_DIRECTORY_SIZE {
        return;
    }
    map.insert(dir_off, dir_size, Kinds::BITMAP_DIRECTORY);
    let Some(dir) = read(file, dir_off, dir_size, len).await else {
        return;
    };
    for (table, entries) in crate::check::bitmap_tables(&dir, nb).unwrap_or_default() {
        map.insert(table, entries.saturating_mul(8), Kinds::BITMAP_TABLE);
    }
}

/// `n` bytes at `at` if they lie inside the file (`n` is bounded by the caller).
async fn read(file: &dyn Storage, at: u64, n: u64, file_len: u64) -> Option<Vec<u8>> {
    if at.checked_add(n)? > file_len {
        return None;
    }
    let mut buf = vec![0u8; usize::try_from(n).ok()?];
    file.read_at(&mut buf, at).await.ok()?;
    Some(buf)
}

impl Image {
    /// The metadata map (writable images only).
    pub(crate) fn metadata_map(&self) -> Result<&Arc<MetadataMap>> {
        Ok(self.write_state()?.refcounts().map())
    }

    /// Refuse a guest data write onto metadata (a corrupt or hostile L2 entry maps data
    /// there; a healthy image never does, since refcounts keep them apart).
    pub(crate) async fn check_data_write(&self, host: HostOffset, len: u64) -> Result<()> {
        if self.inner.data_file_path.is_some() {
            return Ok(()); // guest data lives in another file
        }
        self.metadata_map()?.check(host.0, len, Kinds::NONE).await
    }

    /// Refuse to drop the references an L2 entry holds when its clusters hold metadata:
    /// freeing them would let the allocator hand out a live table.
    pub(crate) async fn check_entry_is_data(&self, entry: &L2Entry) -> Result<()> {
        if self.inner.data_file_path.is_some() && !matches!(entry, L2Entry::Compressed(_)) {
            return Ok(());
        }
        let cb = self.inner.geo.cluster_bits;
        let (first, last) = match entry {
            L2Entry::Normal { host, .. }
            | L2Entry::Zero {
                host: Some(host), ..
            } => (host.0 >> cb, host.0 >> cb),
            L2Entry::Compressed(d) => d.host_clusters(cb),
            _ => return Ok(()),
        };
        let map = self.metadata_map()?;
        let Some(k) = map.find(first << cb, (last - first + 1) << cb, Kinds::NONE) else {
            return Ok(());
        };
        let msg = format!(
            "an L2 entry points into the {}; refusing to free it",
            k.name()
        );
        Err(map.signal(msg).await.at_host(HostOffset(first << cb)))
    }

    /// Check a metadata write of `len` bytes at `host` against every kind but its own.
    pub(crate) async fn check_metadata_write(&self, host: u64, len: u64, own: Kinds) -> Result<()> {
        self.metadata_map()?.check(host, len, own).await
    }
}

/// The error a write gets once the image has been marked corrupt.
pub(crate) fn corrupt_latched() -> Error {
    Error::corrupt("the image was marked corrupt; repair it with check -r all before writing")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn untrusted_ranges_stay_inside_the_file_and_the_budget() {
        let file: Arc<dyn Storage> = Arc::new(crate::storage::MemoryStorage::new());
        let map = MetadataMap::new(file, 9);
        let mut b = Bounded {
            map: &map,
            file_len: 64 << 9,
            budget: 64,
        };
        b.insert(0, u64::MAX, Kinds::BITMAP_TABLE); // would wrap
        b.insert(1 << 40, 512, Kinds::SNAPSHOT_L1); // past the end of the file
        assert_eq!(map.find(0, 1 << 41, Kinds::NONE), None);
        b.insert(512, 40 << 9, Kinds::SNAPSHOT_L1); // 41 of the 64 clusters' budget
        b.insert(0, 40 << 9, Kinds::BITMAP_TABLE); // over the budget: overlapping garbage
        assert_eq!(map.find(0, 512, Kinds::NONE), None);
        assert_eq!(map.find(512, 512, Kinds::NONE), Some(Kinds::SNAPSHOT_L1));
    }
}
