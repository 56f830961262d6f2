//! Rebuilding the refcount structure from scratch out of the walk's counts, for when the
//! refcount table or blocks themselves are broken.
//!
//! Crash safety: the new blocks and table are written past the end of everything in use
//! (past the end of the file), where nothing — old refcount structures included — can point,
//! then flushed; only then does one small header write (`HeaderPatch::refcount_table`: table
//! offset and cluster count, inside the first sector) switch to them, followed by another flush. A crash
//! before the switch leaves the old structure in place, a crash after it leaves a correct one.
//! The old structure's clusters become leaks, which the repair lowers afterwards.
//!
//! ```text
//!  file:  [ ... everything counted by the walk ... ][ new refblocks ... ][ new table ]
//!                                                   ^ start (cluster aligned, ≥ file end)
//! ```
//!
//! Unlike QEMU (which reuses free clusters inside the file), new structures always go at the
//! end: a cluster the walk did not count (e.g. something this checker does not understand)
//! is never overwritten. The file grows by the size of the new structure.

use std::collections::BTreeSet;

use super::image::Ctx;
use super::imrt::Imrt;
use crate::error::{Error, Result};
use crate::format::header::{HeaderPatch, MAX_REFCOUNT_TABLE_BYTES};
use crate::units::to_usize;

/// Where the new structure goes.
#[derive(Debug, PartialEq, Eq)]
struct Layout {
    /// First new cluster.
    start: u64,
    /// Indices of the refcount blocks to write, ascending; block `k` of this list goes to
    /// cluster `start + k`.
    blocks: Vec<u64>,
    /// Clusters of the new refcount table (right after the blocks).
    table_clusters: u64,
}

impl Layout {
    /// Cluster index of the new table.
    fn table_start(&self) -> u64 {
        self.start + self.blocks.len() as u64
    }

    /// One past the last new cluster.
    fn end(&self) -> u64 {
        self.table_start() + self.table_clusters
    }
}

/// Plan the structure: the blocks for every in-use range plus the ones that describe the new
/// clusters themselves, and a table big enough for all of them. Adding clusters can need
/// another block or table cluster, so iterate until the plan stops growing (it only grows,
/// and each block describes thousands of clusters, so this ends after a few rounds).
fn plan(imrt: &Imrt, start: u64, cluster_size: u64) -> Layout {
    let per_block = imrt.entries_per_block();
    let in_use: BTreeSet<u64> = (0..imrt.len().div_ceil(per_block))
        .filter(|&i| imrt.block_in_use(i))
        .collect();
    let mut layout = Layout {
        start,
        blocks: Vec::new(),
        table_clusters: 0,
    };
    loop {
        let mut blocks = in_use.clone();
        blocks.extend((start / per_block)..layout.end().max(start + 1).div_ceil(per_block));
        let last = blocks.last().copied().unwrap_or(0);
        let next = Layout {
            start,
            blocks: blocks.into_iter().collect(),
            table_clusters: ((last + 1) * 8).div_ceil(cluster_size),
        };
        if next == layout {
            return layout;
        }
        layout = next;
    }
}

/// Write a new refcount structure holding exactly the counts of `imrt` (plus the new
/// clusters themselves) and switch the header to it.
pub(crate) async fn rebuild(ctx: &Ctx, imrt: &mut Imrt) -> Result<()> {
    let (table_at, clusters) = write_structure(ctx, imrt).await?;
    switch_header(ctx, table_at, clusters).await
}

/// Write the new blocks and table of [`rebuild`] past the end of the file and flush; returns
/// the table's offset and cluster count, for the caller's header switch.
pub(crate) async fn write_structure(ctx: &Ctx, imrt: &mut Imrt) -> Result<(u64, u32)> {
    let start = imrt.len().max(ctx.file_clusters());
    let layout = plan(imrt, start, ctx.cs);
    if layout.table_clusters * ctx.cs > MAX_REFCOUNT_TABLE_BYTES {
        return Err(Error::unsupported(
            "the rebuilt refcount table would exceed 8 MiB",
        ));
    }
    for c in layout.start..layout.end() {
        imrt.set(c, 1)?;
    }
    let mut table = vec![0u8; to_usize(layout.table_clusters * ctx.cs)];
    for (k, &index) in layout.blocks.iter().enumerate() {
        let at = (layout.start + k as u64) * ctx.cs;
        let block = imrt
            .block(index)
            .expect("planned blocks lie inside the array");
        ctx.write(block, at).await?;
        table[to_usize(index) * 8..][..8].copy_from_slice(&at.to_be_bytes());
    }
    let table_at = layout.table_start() * ctx.cs;
    ctx.write(&table, table_at).await?;
    ctx.flush().await?;
    let clusters = layout.table_clusters;
    let clusters = u32::try_from(clusters)
        .map_err(|_| Error::unsupported(format!("a refcount table of {clusters} clusters")))?;
    Ok((table_at, clusters))
}

/// Point the header at the new table (one write inside the first sector), durably.
async fn switch_header(ctx: &Ctx, offset: u64, clusters: u32) -> Result<()> {
    let patch = HeaderPatch::refcount_table(offset, clusters);
    ctx.write(patch.bytes(), patch.offset()).await?;
    ctx.flush().await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plan_covers_used_ranges_and_itself() {
        // 512-byte clusters, 16-bit refcounts: 256 clusters per block.
        let mut imrt = Imrt::new(600, 4, 512, 1 << 20).unwrap();
        for c in [0, 1, 2, 520] {
            imrt.set(c, 1).unwrap();
        }
        let l = plan(&imrt, 600, 512);
        // Blocks 0 and 2 for the data, block 2 also holds clusters 600.. (the new ones).
        assert_eq!(l.blocks, vec![0, 2]);
        assert_eq!(l.table_clusters, 1);
        assert_eq!(l.end(), 603);
    }

    #[test]
    fn plan_adds_a_block_when_new_clusters_cross_a_boundary() {
        let mut imrt = Imrt::new(256, 4, 512, 1 << 20).unwrap();
        imrt.set(0, 1).unwrap();
        imrt.set(255, 1).unwrap();
        // The new clusters start at 255 (last of block 0) and spill into block 1.
        let l = plan(&imrt, 255, 512);
        assert_eq!(l.blocks, vec![0, 1]);
        assert_eq!((l.table_start(), l.end()), (257, 258));
    }
}
