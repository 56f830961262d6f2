//! Where each structure of a new image goes, and writing it.

use super::{CreateOptions, Preallocation, io};
use crate::error::{Error, Result};
use crate::format::header::{self, l1_entries_for};
use crate::storage::Storage;
use crate::units::to_usize;

/// L1/L2 entry flag: the cluster's refcount is exactly 1.
const COPIED: u64 = 1 << 63;
/// Size of a refcount table entry.
const REFTABLE_ENTRY_SIZE: u64 = 8;
/// Largest buffer of zeros written at once for `preallocation=full`.
const ZERO_CHUNK: u64 = 1 << 20;

/// The placement of every structure of a new image (all offsets in bytes, in the image file
/// unless noted).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Layout {
    /// Cluster size.
    pub cluster_size: u64,
    /// Refcount width in bits.
    pub refcount_bits: u32,
    /// Refcount table offset (always cluster 1).
    pub reftable_offset: u64,
    /// Clusters of the refcount table.
    pub reftable_clusters: u32,
    /// Offset of the first refcount block; the others follow.
    pub refblock_offset: u64,
    /// Number of refcount blocks.
    pub refblocks: u64,
    /// L1 table offset (0 when `l1_size` is 0, as QEMU writes it).
    pub l1_offset: u64,
    /// L1 entries.
    pub l1_size: u32,
    /// Clusters of the L1 table.
    pub l1_clusters: u64,
    /// Offset of the LUKS area (0 without encryption), right after the L1 table as in QEMU.
    pub luks_offset: u64,
    /// Clusters of the LUKS area (0 without encryption).
    pub luks_clusters: u64,
    /// Bytes of the LUKS area (the header extension's length).
    pub luks_len: u64,
    /// Offset of the first L2 table; the others follow (preallocation only).
    pub l2_offset: u64,
    /// Number of L2 tables (0 without preallocation).
    pub l2_tables: u64,
    /// Host offset of guest cluster 0: in the image file, or 0 in an external data file.
    pub data_offset: u64,
    /// Mapped guest clusters (0 without preallocation).
    pub data_clusters: u64,
    /// Data clusters live in the image file (no external data file).
    pub data_in_image: bool,
    /// Clusters of the image file in use, each with refcount 1.
    pub total_clusters: u64,
}

/// Refcount blocks and table clusters needed for `fixed` other clusters plus themselves.
pub(super) fn refcount_clusters(fixed: u64, per_block: u64, per_table_cluster: u64) -> (u64, u64) {
    let (mut blocks, mut table) = (0u64, 0u64);
    loop {
        let nb = (fixed + blocks + table).div_ceil(per_block);
        let nt = nb.div_ceil(per_table_cluster);
        if (nb, nt) == (blocks, table) {
            return (blocks, table);
        }
        (blocks, table) = (nb, nt);
    }
}

impl Layout {
    /// Lay out an image of `size` bytes (already validated against `opts`), unencrypted.
    #[cfg(test)]
    pub fn compute(
        opts: &CreateOptions,
        size: u64,
        prealloc: Preallocation,
        external_data: bool,
    ) -> Result<Layout> {
        Self::compute_with_luks(opts, size, prealloc, external_data, 0)
    }

    /// [`Layout::compute`] with a LUKS area of `luks_len` bytes after the L1 table.
    pub fn compute_with_luks(
        opts: &CreateOptions,
        size: u64,
        prealloc: Preallocation,
        external_data: bool,
        luks_len: u64,
    ) -> Result<Layout> {
        let cs = opts.cluster_size;
        let luks_clusters = luks_len.div_ceil(cs);
        let l1_size = l1_entries_for(size, cs.trailing_zeros(), opts.extended_l2);
        let l1_clusters = (l1_size * header::L1_ENTRY_SIZE).div_ceil(cs);
        let mapped = prealloc != Preallocation::Off;
        let l2_tables = if mapped { l1_size } else { 0 };
        let data_clusters = if mapped { size.div_ceil(cs) } else { 0 };
        let in_image = if external_data { 0 } else { data_clusters };
        let fixed = 1 + l1_clusters + luks_clusters + l2_tables + in_image;
        let per_block = cs * 8 / u64::from(opts.refcount_bits);
        let (refblocks, rt) = refcount_clusters(fixed, per_block, cs / REFTABLE_ENTRY_SIZE);
        if rt * cs > header::MAX_REFCOUNT_TABLE_BYTES {
            return Err(Error::invalid_arg(
                "image too large to preallocate with this cluster size and refcount width",
            ));
        }
        let too_big = || Error::invalid_arg("image too large for a qcow2 header");
        let reftable_clusters = u32::try_from(rt).map_err(|_| too_big())?;
        let l1_size_field = u32::try_from(l1_size).map_err(|_| too_big())?;
        let refblock_offset = cs * (1 + rt);
        let l1_at = refblock_offset + refblocks * cs;
        let luks_at = l1_at + l1_clusters * cs;
        let l2_offset = luks_at + luks_clusters * cs;
        Ok(Layout {
            cluster_size: cs,
            refcount_bits: opts.refcount_bits,
            reftable_offset: cs,
            reftable_clusters,
            refblock_offset,
            refblocks,
            l1_offset: if l1_size == 0 { 0 } else { l1_at },
            l1_size: l1_size_field,
            l1_clusters,
            luks_offset: if luks_clusters > 0 { luks_at } else { 0 },
            luks_clusters,
            luks_len,
            l2_offset,
            l2_tables,
            data_offset: if external_data {
                0
            } else {
                l2_offset + l2_tables * cs
            },
            data_clusters,
            data_in_image: !external_data,
            total_clusters: fixed + refblocks + rt,
        })
    }

    /// Write the refcount table and blocks, the L1 table and any L2 tables.
    pub async fn write_metadata(&self, image: &dyn Storage, extended_l2: bool) -> Result<()> {
        let table = self.reftable();
        io(
            image.write_at(&table, self.reftable_offset).await,
            "writing the refcount table",
        )?;
        self.write_refblocks(image).await?;
        if self.l1_size > 0 {
            io(
                image.write_at(&self.l1_table(), self.l1_offset).await,
                "writing the L1 table",
            )?;
        }
        for t in 0..self.l2_tables {
            let l2 = self.l2_table(t, extended_l2);
            let at = self.l2_offset + t * self.cluster_size;
            io(image.write_at(&l2, at).await, "writing an L2 table")?;
        }
        Ok(())
    }

    /// The refcount table: one entry per refcount block.
    fn reftable(&self) -> Vec<u8> {
        let mut t = vec![0u8; to_usize(u64::from(self.reftable_clusters) * self.cluster_size)];
        for (i, e) in t
            .chunks_exact_mut(8)
            .take(to_usize(self.refblocks))
            .enumerate()
        {
            e.copy_from_slice(&(self.refblock_offset + i as u64 * self.cluster_size).to_be_bytes());
        }
        t
    }

    /// Write every refcount block: refcount 1 for clusters `0..total_clusters`.
    async fn write_refblocks(&self, image: &dyn Storage) -> Result<()> {
        let per_block = self.cluster_size * 8 / u64::from(self.refcount_bits);
        let full = self.refblock(per_block);
        for i in 0..self.refblocks {
            let used = (self.total_clusters - i * per_block).min(per_block);
            let partial;
            let block = if used == per_block {
                &full
            } else {
                partial = self.refblock(used);
                &partial
            };
            let at = self.refblock_offset + i * self.cluster_size;
            io(image.write_at(block, at).await, "writing a refcount block")?;
        }
        Ok(())
    }

    /// A refcount block whose first `used` entries are 1. Sub-byte entries are packed from the
    /// least significant bit, as QEMU does; wider ones are big-endian.
    fn refblock(&self, used: u64) -> Vec<u8> {
        let mut b = vec![0u8; to_usize(self.cluster_size)];
        let bits = u64::from(self.refcount_bits);
        for i in 0..used {
            let bit = i * bits;
            if bits < 8 {
                b[(bit / 8) as usize] |= 1 << (bit % 8);
            } else {
                b[to_usize((bit + bits) / 8 - 1)] = 1;
            }
        }
        b
    }

    /// The L1 table, whole clusters; entries point at the L2 tables when preallocating.
    fn l1_table(&self) -> Vec<u8> {
        let mut t = vec![0u8; to_usize(self.l1_clusters * self.cluster_size)];
        for (i, e) in t
            .chunks_exact_mut(8)
            .take(to_usize(self.l2_tables))
            .enumerate()
        {
            let l2 = self.l2_offset + i as u64 * self.cluster_size;
            e.copy_from_slice(&(l2 | COPIED).to_be_bytes());
        }
        t
    }

    /// L2 table `t`: every guest cluster below `data_clusters` mapped to its host cluster.
    /// Extended entries leave the subcluster bitmap zero (unallocated, reads as zeros or from
    /// the backing file), as QEMU's preallocation does.
    fn l2_table(&self, t: u64, extended_l2: bool) -> Vec<u8> {
        let entry = if extended_l2 { 16 } else { 8 };
        let per_table = self.cluster_size / entry;
        let mut b = vec![0u8; to_usize(self.cluster_size)];
        for (j, e) in b.chunks_exact_mut(to_usize(entry)).enumerate() {
            let g = t * per_table + j as u64;
            if g >= self.data_clusters {
                break;
            }
            let host = self.data_offset + g * self.cluster_size;
            e[..8].copy_from_slice(&(host | COPIED).to_be_bytes());
        }
        b
    }

    /// Size the files and preallocate the data clusters as `prealloc` asks.
    pub async fn write_data(
        &self,
        image: &dyn Storage,
        data_file: Option<&dyn Storage>,
        prealloc: Preallocation,
        size: u64,
    ) -> Result<()> {
        let len = self.data_clusters * self.cluster_size;
        let target = data_file.unwrap_or(image);
        match prealloc {
            Preallocation::Off | Preallocation::Metadata => {}
            Preallocation::Falloc => {
                io(
                    target.allocate(self.data_offset, len).await,
                    "preallocating data",
                )?;
            }
            Preallocation::Full => write_zeros(target, self.data_offset, len).await?,
        }
        if let Some(d) = data_file {
            let data_len = if prealloc == Preallocation::Off {
                size
            } else {
                len
            };
            io(d.set_len(data_len).await, "sizing the data file")?;
        }
        io(image.set_len(self.image_len()).await, "sizing the image")
    }

    /// Length of the new image file. Like QEMU, the file ends where its last structure ends:
    /// without preallocated L2 tables that is the last L1 entry, not a whole cluster.
    fn image_len(&self) -> u64 {
        let whole = self.total_clusters * self.cluster_size;
        // The LUKS area is zero-filled to whole clusters, as QEMU does.
        if self.l2_tables == 0 && self.l1_size > 0 && self.luks_clusters == 0 {
            self.l1_offset + u64::from(self.l1_size) * header::L1_ENTRY_SIZE
        } else {
            whole
        }
    }
}

/// Write `len` zero bytes at `offset`, in chunks.
async fn write_zeros(target: &dyn Storage, offset: u64, len: u64) -> Result<()> {
    let zeros = vec![0u8; to_usize(len.min(ZERO_CHUNK))];
    let mut done = 0;
    while done < len {
        let n = (len - done).min(ZERO_CHUNK);
        io(
            target.write_at(&zeros[..to_usize(n)], offset + done).await,
            "writing zeros",
        )?;
        done += n;
    }
    Ok(())
}

/// Test hook for the refcount fixed point.
#[cfg(test)]
pub(super) fn refcount_clusters_for_test(fixed: u64, per_block: u64, per_table: u64) -> (u64, u64) {
    refcount_clusters(fixed, per_block, per_table)
}

#[cfg(test)]
impl Layout {
    /// Test hook for the refcount block encoding.
    pub(super) fn refblock_for_test(&self, used: u64) -> Vec<u8> {
        self.refblock(used)
    }
}
