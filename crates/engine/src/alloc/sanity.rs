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

impl Refcounts {
    /// Refuse to hand out cluster `c` (refcount 0) when it is known to hold metadata: the
    /// refcounts contradict the tables, and using it would overwrite them.
    pub(super) async fn check_free_cluster(&self, c: u64) -> Result<()> {
        if !self.map.holds_metadata(c) {
            return Ok(());
        }
        let host = c << self.cluster_bits;
        let msg = format!("cluster {c} holds metadata but its refcount is 0");
        Err(self.map.signal(msg).await.at(host))
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
        Err(self.map.signal(msg).await.at(c << self.cluster_bits))
    }

    /// When cluster `c` lies in a range that no refcount block covered at open and inside
    /// the file as it was then: the end of that stretch, which the allocator skips.
    pub(super) fn untrusted_until(&self, st: &RefState, c: u64) -> Option<u64> {
        if c >= self.open_end {
            return None;
        }
        let epb = self.entries_per_block();
        let ti = c / epb;
        let uncovered = st.table.get(ti as usize).is_none_or(|&b| b == 0);
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
            return Err(self.map.signal(msg).await.at(host));
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
            return Err(self.map.signal(msg).await.at(host));
        }
        Ok(at << self.cluster_bits)
    }
}
