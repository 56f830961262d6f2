//! Byte-granular allocation for compressed payloads, as QEMU's `qcow2_alloc_bytes` does it.
//!
//! Consecutive compressed clusters are packed into the same host cluster: a cursor remembers
//! the next free byte of the host cluster being filled. A payload may run past that cluster's
//! end into the next host cluster when that one is free; otherwise it starts a fresh cluster
//! (the rest of the old one stays unused). Every host cluster a payload touches gets one
//! reference for it, so a host cluster's refcount is the number of payloads touching it, and
//! releasing a payload (`CompressedDescriptor::host_clusters`) drops exactly those references.
//!
//! Safety of reusing the cursor's cluster: it is forgotten as soon as that cluster's refcount
//! drops to 0 (`set_in_block`), since a free cluster may be handed out for anything. While the
//! refcount stays ≥ 1 the cluster still holds live compressed payloads and its bytes past the
//! cursor belong to nobody.

use super::{RefState, Refcounts};
use crate::error::{Error, Result};

impl Refcounts {
    /// Reserve `size` bytes (1 ..= one cluster) for a compressed payload and return the host
    /// byte offset (callers use [`Allocator::alloc_bytes`](super::Allocator::alloc_bytes)).
    /// The refcount of each host cluster the bytes touch is incremented (a new cluster starts
    /// at 1).
    pub(super) async fn alloc_bytes_locked(&self, st: &mut RefState, size: u64) -> Result<u64> {
        let cs = self.cluster_size();
        if size == 0 || size > cs {
            return Err(Error::invalid_arg(format!(
                "compressed payload of {size} bytes for {cs}-byte clusters"
            )));
        }
        let off = match self.append_at_cursor(st, size).await? {
            Some(off) => off,
            None => self.alloc_locked(st, size.div_ceil(cs)).await?,
        };
        let end = off + size;
        // A cursor on a cluster boundary would point into a cluster nobody reserved.
        st.compress_cursor = if end % cs == 0 { 0 } else { end };
        Ok(off)
    }

    /// Place `size` bytes at the cursor if its cluster can take another reference and any
    /// cluster the payload runs into is free; `None` when a fresh cluster is needed.
    async fn append_at_cursor(&self, st: &mut RefState, size: u64) -> Result<Option<u64>> {
        let off = st.compress_cursor;
        if off == 0 {
            return Ok(None);
        }
        let c = off >> self.cluster_bits;
        let rc = self.get(st, c).await?;
        // rc == 0 cannot happen (the cursor is dropped on free) but is checked defensively;
        // rc == max means another payload would overflow a narrow refcount (1 bit: one
        // payload per host cluster).
        if rc == 0 || rc >= self.max_refcount() {
            st.compress_cursor = 0;
            return Ok(None);
        }
        let cs = self.cluster_size();
        let free_here = cs - off % cs;
        let extra = size.saturating_sub(free_here).div_ceil(cs);
        for k in 1..=extra {
            if !self.claim_locked(st, c + k).await? {
                // Undo the clusters already claimed: the payload goes elsewhere.
                for j in 1..k {
                    self.set(st, c + j, 0).await?;
                }
                st.compress_cursor = 0;
                return Ok(None);
            }
        }
        self.add(st, c, 1).await?;
        Ok(Some(off))
    }

    /// Take the specific cluster `c` (refcount 0 → 1) if it is free. Creating its refcount
    /// block may place the block at `c` itself, hence the second look.
    async fn claim_locked(&self, st: &mut RefState, c: u64) -> Result<bool> {
        if self.untrusted_until(st, c).is_some() || self.get(st, c).await? != 0 {
            return Ok(false);
        }
        self.ensure_block(st, c / self.entries_per_block()).await?;
        if self.get(st, c).await? != 0 {
            return Ok(false);
        }
        self.check_free_cluster(c).await?;
        self.set(st, c, 1).await?;
        Ok(true)
    }
}
