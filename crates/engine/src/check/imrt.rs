//! The in-memory refcount table ("IMRT"): the refcount every host cluster *should* have,
//! computed by walking the metadata.
//!
//! Entries are packed exactly like on-disk refcount block entries of the image's width
//! (`1 << refcount_order` bits), so the array is the concatenation of all the refcount blocks a
//! correct image would have: a rebuild writes cluster-sized slices of it straight to disk.
//! Because the width is the image's, a count saturates at the image's maximum refcount, as in
//! QEMU (where going past it is reported as an overflow corruption).
//!
//! Memory is bounded: the array only grows up to `limit` bytes, and every growth is checked.

use crate::error::{Error, Result};
use crate::format::refcount;

/// Packed expected refcounts, one entry per host cluster.
#[derive(Debug, Clone)]
pub(crate) struct Imrt {
    /// Packed entries; always a whole number of clusters long so block slices are complete.
    bytes: Vec<u8>,
    /// Number of clusters covered (entries that are meaningful).
    len: u64,
    /// log2 of the entry width in bits.
    order: u32,
    /// Cluster size in bytes (the unit the byte buffer grows by).
    cluster_size: u64,
    /// Most bytes the array may take.
    limit: u64,
}

/// What [`Imrt::inc`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Inc {
    /// The count went up by one.
    Done,
    /// The count is already at the largest value the width holds.
    Overflow,
}

impl Imrt {
    /// An all-zero table for `clusters` clusters. Errors when it would exceed `limit` bytes.
    pub(crate) fn new(clusters: u64, order: u32, cluster_size: u64, limit: u64) -> Result<Imrt> {
        let mut t = Imrt {
            bytes: Vec::new(),
            len: 0,
            order,
            cluster_size,
            limit,
        };
        t.grow(clusters)?;
        Ok(t)
    }

    /// Number of clusters covered.
    pub(crate) fn len(&self) -> u64 {
        self.len
    }

    /// Entries per cluster-sized block.
    pub(crate) fn entries_per_block(&self) -> u64 {
        refcount::entries_per_block(self.cluster_size, self.order)
    }

    /// Cover at least `clusters` clusters (new entries are 0).
    pub(crate) fn grow(&mut self, clusters: u64) -> Result<()> {
        if clusters <= self.len {
            return Ok(());
        }
        let need = self.bytes_for(clusters)?;
        if need > self.limit {
            return Err(Error::invalid_arg(format!(
                "checking {clusters} clusters needs {need} bytes of memory, more than the \
                 limit of {} bytes",
                self.limit
            )));
        }
        let need = usize::try_from(need).map_err(|_| Error::invalid_arg("image too large"))?;
        if need > self.bytes.len() {
            self.bytes
                .try_reserve_exact(need - self.bytes.len())
                .map_err(|_| {
                    Error::new(
                        crate::ErrorKind::NoSpace,
                        "out of memory for the refcount array",
                    )
                })?;
            self.bytes.resize(need, 0);
        }
        self.len = clusters;
        Ok(())
    }

    /// Bytes needed for `clusters` entries, rounded up to whole clusters.
    fn bytes_for(&self, clusters: u64) -> Result<u64> {
        let per_block = self.entries_per_block().max(1);
        clusters
            .div_ceil(per_block)
            .checked_mul(self.cluster_size)
            .ok_or_else(|| Error::invalid_arg("image too large to check"))
    }

    /// Expected refcount of `cluster` (0 beyond the end).
    pub(crate) fn get(&self, cluster: u64) -> u64 {
        if cluster >= self.len {
            return 0;
        }
        refcount::get(&self.bytes, cluster, self.order)
    }

    /// Set the count of `cluster`, growing the table if needed.
    pub(crate) fn set(&mut self, cluster: u64, value: u64) -> Result<()> {
        self.grow(cluster.saturating_add(1))?;
        refcount::set(&mut self.bytes, cluster, self.order, value)
    }

    /// Add one reference to `cluster`, growing the table if needed.
    pub(crate) fn inc(&mut self, cluster: u64) -> Result<Inc> {
        let v = self.get(cluster);
        if v == refcount::max_refcount(self.order) {
            return Ok(Inc::Overflow);
        }
        self.set(cluster, v + 1)?;
        Ok(Inc::Done)
    }

    /// The packed bytes of refcount block `index` (one cluster), if the table reaches it.
    pub(crate) fn block(&self, index: u64) -> Option<&[u8]> {
        let cs = usize::try_from(self.cluster_size).ok()?;
        let start = usize::try_from(index).ok()?.checked_mul(cs)?;
        self.bytes.get(start..start.checked_add(cs)?)
    }

    /// Whether any cluster of refcount block `index` has a non-zero count.
    pub(crate) fn block_in_use(&self, index: u64) -> bool {
        self.block(index).is_some_and(|b| b.iter().any(|&x| x != 0))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_saturate_at_the_width() {
        // 1-bit refcounts: the second reference overflows.
        let mut t = Imrt::new(10, 0, 512, 1 << 20).unwrap();
        assert_eq!(t.inc(3).unwrap(), Inc::Done);
        assert_eq!(t.inc(3).unwrap(), Inc::Overflow);
        assert_eq!(t.get(3), 1);
        assert_eq!(t.get(2), 0);
    }

    #[test]
    fn grows_in_whole_clusters_and_refuses_past_the_limit() {
        let mut t = Imrt::new(1, 4, 512, 1024).unwrap();
        assert_eq!(t.block(0).unwrap().len(), 512);
        assert!(t.block(1).is_none());
        t.set(300, 7).unwrap(); // 16-bit entries: 256 per block, so block 1 appears
        assert_eq!(t.get(300), 7);
        assert!(t.block_in_use(1));
        assert!(!t.block_in_use(0));
        assert!(t.set(600, 1).is_err()); // would need 1536 bytes
    }
}
