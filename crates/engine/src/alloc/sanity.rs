//! The allocator's sanity checks: what it refuses to believe when the refcounts contradict
//! the rest of the image.
//!
//! - A cluster with refcount 0 that the metadata map knows as metadata is never handed out
//!   (`check_free_cluster`): the refcounts lie, and using it would overwrite a table.
//! - A refcount never drops to 0 on metadata the engine never frees (the header, snapshot
//!   and bitmap structures, the encryption header; `check_may_free`): someone still refers
//!   to it, so the refcount was too low.
//! - A range no refcount block covers reads as refcount 0, but only the part past the end
//!   of the file as it was at open is known to be free. The part inside the file may hold
//!   live clusters whose block was lost (a zeroed refcount-table entry), or clusters a
//!   crash left unaccounted, or holes left by a shrink; telling these apart would take a scan
//!   of every L2 table. So that part is never handed out (`untrusted_until`), and the block
//!   created for such a range goes past the old end of the file (`place_block`):
//!
//! ```text
//!  range of an empty table entry:  [ first ........ open_end | ..... first + per block )
//!                                    never allocated          block here, then free space
//! ```
//!   The cost is some space never reused in damaged or shrunk images; a healthy growing
//!   image meets only ranges past the end of the file, where nothing changes.

use super::{Kinds, RefState, Refcounts};
use crate::error::Result;
use crate::units::HostOffset;
use crate::units::to_usize;

impl Refcounts {
    /// Refuse to hand out cluster `c` (refcount 0) when it is known to hold metadata: the
    /// refcounts contradict the tables, and using it would overwrite them.
    pub(super) async fn check_free_cluster(&self, c: u64) -> Result<()> {
        if !self.map.holds_metadata(c) {
            return Ok(());
        }
        let host = c << self.cluster_bits;
        let msg = format!("cluster {c} holds metadata but its refcount is 0");
        Err(self.map.signal(msg).await.at_host(HostOffset(host)))
    }

    /// Refuse to drop the last reference to cluster `c` when it holds metadata the engine
    /// never frees: its other users (a snapshot, a bitmap) still refer to it.
    pub(super) async fn check_may_free(&self, c: u64) -> Result<()> {
        let k = Kinds(self.map.kinds_of(c).0 & Kinds::NEVER_FREED.0);
        if k == Kinds::NONE {
            return Ok(());
        }
        let msg = format!(
            "the refcount of cluster {c} would drop to 0 but it holds the {}; refusing to free it",
            k.name()
        );
        Err(self
            .map
            .signal(msg)
            .await
            .at_host(HostOffset(c << self.cluster_bits)))
    }

    /// When cluster `c` lies in a range that no refcount block covered at open and inside
    /// the file as it was then: the end of that stretch, which the allocator skips.
    pub(super) fn untrusted_until(&self, st: &RefState, c: u64) -> Option<u64> {
        if c >= self.open_end {
            return None;
        }
        let epb = self.entries_per_block();
        let ti = c / epb;
        let uncovered = st.table.get(to_usize(ti)).is_none_or(|&b| b == 0);
        (uncovered || st.untrusted.contains(&ti)).then(|| ((ti + 1) * epb).min(self.open_end))
    }

    /// Where the refcount block for the empty table entry `ti` goes: the first cluster of
    /// its range that is past the file's end at open (see the module docs). A range holding
    /// known metadata, or lying wholly inside the file, proves the entry wrong: the image is
    /// marked corrupt instead.
    pub(super) async fn place_block(&self, st: &mut RefState, ti: u64) -> Result<u64> {
        let epb = self.entries_per_block();
        let (first, end) = (ti * epb, (ti + 1) * epb);
        let host = first << self.cluster_bits;
        if let Some(k) = self.map.find(host, epb << self.cluster_bits, Kinds::NONE) {
            let msg = format!(
                "refcount table entry {ti} is empty but the clusters it covers hold metadata \
                 ({}); refusing to place a refcount block there",
                k.name()
            );
            return Err(self.map.signal(msg).await.at_host(HostOffset(host)));
        }
        if first < self.open_end {
            st.untrusted.insert(ti);
        }
        let at = first.max(self.open_end);
        if at >= end {
            let msg = format!(
                "refcount table entry {ti} is empty but the clusters it covers lie inside the \
                 file and may be in use; refusing to count them as free"
            );
            return Err(self.map.signal(msg).await.at_host(HostOffset(host)));
        }
        Ok(at << self.cluster_bits)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::super::{MetaWriter, MetadataMap, NewClusters, Refcounts};
    use crate::format::header::Header;
    use crate::format::refcount::{self, RefTableEntry};
    use crate::storage::{MemoryStorage, Storage};

    /// 512-byte clusters, 64-bit refcounts: 64 clusters per block. Block 0 (at cluster 1)
    /// counts clusters 0..64 as used; table entry 1 is empty; the file has 70 clusters.
    async fn refcounts() -> (Refcounts, Arc<dyn Storage>) {
        let file: Arc<dyn Storage> = Arc::new(MemoryStorage::new());
        let mut block = vec![0u8; 512];
        for i in 0..64 {
            refcount::set(&mut block, i, 6, 1).unwrap();
        }
        file.write_at(&block, 512).await.unwrap();
        file.write_at(&[0u8; 512], 69 * 512).await.unwrap();
        let mut hb = vec![0u8; 104];
        hb[..4].copy_from_slice(b"QFI\xfb");
        hb[4..8].copy_from_slice(&3u32.to_be_bytes());
        hb[20..24].copy_from_slice(&9u32.to_be_bytes());
        hb[96..100].copy_from_slice(&6u32.to_be_bytes());
        hb[100..104].copy_from_slice(&104u32.to_be_bytes());
        let mut h = Header::from_bytes(&hb).unwrap();
        h.refcount_table_offset = 2 * 512;
        h.refcount_table_clusters = 1;
        let table = vec![RefTableEntry(512), RefTableEntry(0)];
        let map = Arc::new(MetadataMap::new(file.clone(), 9));
        let meta = Arc::new(MetaWriter::new(file.clone()));
        let parts = (Arc::new(NewClusters::new()), map, meta);
        let rc = Refcounts::new(file.clone(), &h, table, 70 * 512, (512, 1 << 16), parts);
        (rc, file)
    }

    #[tokio::test]
    async fn clusters_inside_the_file_in_an_uncovered_range_are_never_handed_out() {
        let (rc, _) = refcounts().await;
        // The block for range 1 goes to cluster 70 (past the old end), the cluster to 71.
        assert_eq!(rc.alloc(1).await.unwrap().0, 71 * 512);
        assert_eq!(rc.lock_state().await.table[1], 70 * 512);
        assert_eq!(rc.alloc(1).await.unwrap().0, 72 * 512);
        let st = rc.lock_state().await;
        assert_eq!(rc.untrusted_until(&st, 64), Some(70));
        assert_eq!(rc.untrusted_until(&st, 70), None);
        assert_eq!(rc.untrusted_until(&st, 3), None);
    }

    #[tokio::test]
    async fn an_uncovered_range_holding_metadata_gets_no_block() {
        let (rc, file) = refcounts().await;
        rc.map().insert(100 * 512, 512, super::Kinds::SNAPSHOT_L2);
        let e = rc.alloc(1).await.unwrap_err();
        assert_eq!(e.kind(), crate::ErrorKind::Corrupt, "{e}");
        assert!(e.what().contains("inactive L2"), "{e}");
        assert!(rc.map().is_corrupt());
        let mut b = [0u8; 8];
        file.read_at(&mut b, 72).await.unwrap();
        assert_eq!(u64::from_be_bytes(b), crate::format::features::CORRUPT);
    }
}
