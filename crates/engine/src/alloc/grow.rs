//! Growing the refcount table.
//!
//! ```text
//!  file:  [ ...existing clusters... | new table (T clusters) | new blocks (B clusters) ]
//!                                   ^ A = max(end of table coverage, end of file)
//! ```
//! The new blocks cover the new table and themselves (refcount 1 each). Order on disk:
//! existing dirty refcount slices → new blocks + new table → fsync → header points to the new
//! table → fsync → the old table's clusters are freed. A crash at any point leaves either the
//! old table (new clusters merely leaked) or the new one, both complete.

use super::{Kinds, RefState, Refcounts};
use crate::error::{Error, Result};
use crate::format::header::HeaderPatch;
use crate::format::refcount::{self, RefTableEntry};
use crate::units::to_usize;
/// The spec's bound on the refcount table size (QEMU refuses larger ones).
const MAX_TABLE_BYTES: u64 = 8 << 20;

impl Refcounts {
    /// Replace the refcount table by one with room for block index `needed` (and the blocks
    /// covering the new table itself).
    pub(super) async fn grow(&self, st: &mut RefState, needed: u64) -> Result<()> {
        let cs = self.cluster_size();
        let epb = self.entries_per_block();
        let a = st.end_cluster.max(st.table.len() as u64 * epb);
        let (entries, t, first_blk, b) = self.layout(st, needed, a)?;
        let (fresh, fresh_len) = (a << self.cluster_bits, (t + b) << self.cluster_bits);
        self.map.check(fresh, fresh_len, Kinds::NONE).await?;
        // Blocks referenced by the new table must already be valid on disk.
        self.write_dirty_slices().await?;
        let mut blocks = vec![0u8; to_usize(b * cs)];
        for c in a..a + t + b {
            let blk = c / epb - first_blk;
            let slot = &mut blocks[to_usize(blk * cs)..to_usize((blk + 1) * cs)];
            refcount::set(slot, c % epb, self.order, 1)?;
        }
        let mut table = st.table.clone();
        table.resize(to_usize(entries), 0);
        for i in 0..b {
            table[to_usize(first_blk + i)] = (a + t + i) << self.cluster_bits;
        }
        let mut tbuf = vec![0u8; to_usize(t * cs)];
        let ents: Vec<RefTableEntry> = table.iter().map(|&o| RefTableEntry(o)).collect();
        refcount::write_table(&ents, &mut tbuf);
        self.write(&blocks, (a + t) << self.cluster_bits).await?;
        self.write(&tbuf, a << self.cluster_bits).await?;
        self.sync().await?;
        let t32 = u32::try_from(t)
            .map_err(|_| Error::unsupported(format!("a refcount table of {t} clusters")))?;
        let hdr = HeaderPatch::refcount_table(a << self.cluster_bits, t32);
        (self.meta)
            .write_header(hdr, "switching the refcount table")
            .await?;
        let (old_off, old_clusters) = (st.table_offset, st.table_clusters);
        st.table = table;
        st.table_offset = a << self.cluster_bits;
        st.table_clusters = t;
        st.table_dirty = false;
        st.end_cluster = st.end_cluster.max(a + t + b);
        self.map
            .insert(fresh, t << self.cluster_bits, Kinds::REFTABLE);
        self.map.insert(
            (a + t) << self.cluster_bits,
            b << self.cluster_bits,
            Kinds::REFBLOCK,
        );
        for c in 0..old_clusters {
            let cl = (old_off >> self.cluster_bits) + c;
            let cur = self.get(st, cl).await?;
            self.set_in_block(st, cl, cur.saturating_sub(1)).await?;
        }
        Ok(())
    }

    /// Size the new table: (entries, table clusters T, first new block index, block count B).
    fn layout(&self, st: &RefState, needed: u64, a: u64) -> Result<(u64, u64, u64, u64)> {
        let cs = self.cluster_size();
        let epb = self.entries_per_block();
        let first = a / epb;
        let mut entries = (needed + 1).max(st.table.len() as u64 * 2).max(cs / 8);
        let mut b = 1;
        loop {
            let t = (entries * 8).div_ceil(cs);
            let need_b = (a + t + b - 1) / epb - first + 1;
            let need_e = entries.max(first + b.max(need_b)).max(needed + 1);
            if need_b <= b && need_e == entries {
                if t * cs > MAX_TABLE_BYTES {
                    return Err(Error::new(
                        crate::error::ErrorKind::NoSpace,
                        "the refcount table would exceed its 8 MiB limit",
                    ));
                }
                return Ok((entries, t, first, b));
            }
            b = b.max(need_b);
            entries = need_e;
        }
    }

    async fn write(&self, buf: &[u8], off: u64) -> Result<()> {
        self.meta
            .write(buf, off, "growing the refcount table")
            .await
    }
}
