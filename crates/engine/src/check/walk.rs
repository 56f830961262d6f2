//! The walk: every structure that references host clusters, counted into an [`Imrt`] the way
//! `qemu-img check` counts them (QEMU's `calculate_refcounts`), with the per-entry checks it
//! makes on the way.
//!
//! ```text
//!  cluster 0 (header, extensions, backing name)
//!  active L1 ─┬─ L2 tables ─┬─ data clusters (normal, preallocated zero)   [fragmentation
//!             │             └─ compressed payloads (every host cluster touched) info here]
//!  snapshot L1s (same, each reference counted again: shared clusters get one per reference)
//!  snapshot table, refcount table, LUKS header (encryption extension),
//!  bitmap directory/tables/data
//!  refcount blocks (each must end up with exactly one reference)
//! ```
//!
//! With an external data file, data clusters live there and are not counted.

use super::bitmaps;
use super::image::{Ctx, be_u64s};
use super::imrt::{Imrt, Inc};
use super::report::CheckReport;
use crate::error::Result;
use crate::format::compressed::CompressedDescriptor;
use crate::format::extensions::Extension;
use crate::format::l1::{L1E_OFFSET_MASK, L1E_RESERVED_MASK};
use crate::format::l2::{
    BITMAP_ALL_ALLOC, L2E_COMPRESSED, L2E_COPIED, L2E_OFFSET_MASK, L2E_STD_RESERVED_MASK, L2E_ZERO,
};
use crate::format::refcount::{REFT_OFFSET_MASK, REFT_RESERVED_MASK};
use crate::format::snapshot::MAX_L1_BYTES;

/// The walk's result: expected refcounts, and whether the refcount structures themselves are
/// broken (then only a rebuild can repair them).
#[derive(Debug)]
pub(crate) struct Walk {
    /// Expected refcount per host cluster.
    pub imrt: Imrt,
    /// A refcount table entry or block is unusable.
    pub rebuild: bool,
}

/// What an L2 entry references, by QEMU's classification (`qcow2_get_cluster_type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    /// No host cluster (unallocated, or a zero cluster without preallocation).
    None,
    /// A normal or preallocated-zero cluster at this (possibly misaligned) host offset.
    Host(u64),
    /// A compressed payload.
    Compressed(CompressedDescriptor),
}

/// Classify a raw L2 entry.
pub(crate) fn classify(ctx: &Ctx, raw: u64) -> Kind {
    if raw & L2E_COMPRESSED != 0 {
        return Kind::Compressed(CompressedDescriptor::decode(raw, ctx.bits));
    }
    let off = raw & L2E_OFFSET_MASK;
    if raw & L2E_ZERO != 0 && !ctx.geo.extended {
        return if off != 0 {
            Kind::Host(off)
        } else {
            Kind::None
        };
    }
    if off != 0 || (ctx.data_file && raw & L2E_COPIED != 0) {
        Kind::Host(off)
    } else {
        Kind::None
    }
}

/// Per-table walking state.
struct Walker<'a> {
    ctx: &'a Ctx,
    rep: &'a mut CheckReport,
    imrt: Imrt,
}

/// Count every reference in the image (QEMU's `calculate_refcounts`).
pub(crate) async fn calculate(ctx: &Ctx, rep: &mut CheckReport) -> Result<Walk> {
    let imrt = Imrt::new(ctx.file_clusters(), ctx.order, ctx.cs, ctx.limit)?;
    let mut w = Walker { ctx, rep, imrt };
    w.inc(0, ctx.cs)?;
    let h = ctx.header();
    ctx.meter.spend_table(ctx.l1.len() as u64).await?;
    w.walk_l1(h.l1_table_offset, &ctx.l1, true).await?;
    w.walk_snapshots().await?;
    w.inc(h.snapshots_offset, ctx.snapshots_size)?;
    w.inc(h.refcount_table_offset, ctx.reftable.len() as u64 * 8)?;
    w.count_crypto_header()?;
    bitmaps::count(ctx, w.rep, &mut w.imrt).await?;
    let rebuild = w.check_refblocks()?;
    Ok(Walk {
        imrt: w.imrt,
        rebuild,
    })
}

/// Add one reference to every cluster of `offset .. offset + size` (QEMU's
/// `qcow2_inc_refcounts_imrt`): a range reaching a cluster or more past the end of the file
/// is a corruption and is not counted.
pub(crate) fn inc_range(
    ctx: &Ctx,
    rep: &mut CheckReport,
    imrt: &mut Imrt,
    offset: u64,
    size: u64,
) -> Result<()> {
    if size == 0 {
        return Ok(());
    }
    let end = offset.saturating_add(size);
    if end >= ctx.file_len.saturating_add(ctx.cs) {
        rep.corruption(format!(
            "ERROR: counting reference for region exceeding the end of the file by one \
             cluster or more: offset {offset:#x} size {size:#x}"
        ));
        return Ok(());
    }
    for k in (offset >> ctx.bits)..=((end - 1) >> ctx.bits) {
        if imrt.inc(k)? == Inc::Overflow {
            rep.corruption(format!(
                "ERROR: overflow cluster offset={:#x}",
                k << ctx.bits
            ));
        }
    }
    Ok(())
}

impl Walker<'_> {
    fn inc(&mut self, offset: u64, size: u64) -> Result<()> {
        inc_range(self.ctx, self.rep, &mut self.imrt, offset, size)
    }

    /// The LUKS header (key slots included) that the full disk encryption extension points
    /// at: freeing it as a leak would destroy the keys.
    fn count_crypto_header(&mut self) -> Result<()> {
        for e in &self.ctx.ih.extensions {
            if let Extension::FullDiskEncryption { offset, length } = *e {
                self.inc(offset, length)?;
            }
        }
        Ok(())
    }

    /// An L1 table and everything below it; `frag` collects the allocation statistics (only
    /// for the active table, as QEMU does). The caller has paid for scanning `l1`.
    async fn walk_l1(&mut self, offset: u64, l1: &[u64], frag: bool) -> Result<()> {
        if l1.is_empty() {
            return Ok(());
        }
        self.inc(offset, l1.len() as u64 * 8)?;
        let table_span = self.ctx.l2_entries() as u64 * self.ctx.cs;
        for (idx, &e) in l1.iter().enumerate().filter(|(_, e)| **e != 0) {
            if e & L1E_RESERVED_MASK != 0 {
                self.rep.corruption(format!(
                    "ERROR found L1 entry with reserved bits set: {e:x}"
                ));
            }
            let l2 = e & L1E_OFFSET_MASK;
            self.inc(l2, self.ctx.cs)?;
            if self.ctx.misaligned(l2) {
                self.rep.corruption(format!(
                    "ERROR l2_offset={l2:x}: Table is not cluster aligned; L1 entry corrupted"
                ));
            }
            let guest = (idx as u64).saturating_mul(table_span);
            self.walk_l2(l2, guest, frag).await?;
        }
        Ok(())
    }

    /// One L2 table (QEMU's `check_refcounts_l2`); `guest` is the guest offset it starts at.
    async fn walk_l2(&mut self, offset: u64, guest: u64, frag: bool) -> Result<()> {
        // The same table may be named millions of times: every walk of it is paid for.
        self.ctx.meter.spend(self.ctx.l2_entries() as u64).await?;
        let table = self.ctx.read(offset, self.ctx.cs).await?;
        let words = be_u64s(&table);
        let step = self.ctx.l2_entry_size() / 8;
        let mut next_contiguous = 0u64;
        for i in 0..self.ctx.l2_entries() {
            let raw = words[i * step];
            let bitmap = if step == 2 { words[i * step + 1] } else { 0 };
            let at = guest.saturating_add(i as u64 * self.ctx.cs);
            self.l2_entry(i, at, (raw, bitmap), frag, &mut next_contiguous)?;
        }
        Ok(())
    }

    /// One L2 entry (`raw` and its subcluster `bitmap`), mapping guest offset `guest`.
    fn l2_entry(
        &mut self,
        i: usize,
        guest: u64,
        (raw, bitmap): (u64, u64),
        frag: bool,
        next: &mut u64,
    ) -> Result<()> {
        let kind = classify(self.ctx, raw);
        if !matches!(kind, Kind::Compressed(_)) && raw & L2E_STD_RESERVED_MASK != 0 {
            self.rep.corruption(format!(
                "ERROR found l2 entry with reserved bits set: {raw:x}"
            ));
        }
        match kind {
            Kind::Compressed(d) => self.compressed(i, raw, bitmap, d, frag),
            Kind::Host(off) => {
                self.data_file_offset(off, guest);
                self.host_cluster(raw, bitmap, off, frag, next)
            }
            Kind::None => {
                if bitmap & BITMAP_ALL_ALLOC != 0 {
                    self.rep.corruption(
                        "ERROR: Unallocated cluster has non-zero subcluster allocation map",
                    );
                }
                Ok(())
            }
        }
    }

    /// A compressed entry: one reference on every host cluster its payload touches.
    fn compressed(
        &mut self,
        i: usize,
        raw: u64,
        bitmap: u64,
        d: CompressedDescriptor,
        frag: bool,
    ) -> Result<()> {
        if raw & L2E_COPIED != 0 {
            self.rep.corruption(format!(
                "ERROR: coffset={:#x}: copied flag must never be set for compressed clusters",
                d.host.0
            ));
        }
        if self.ctx.data_file {
            self.rep.corruption(format!(
                "ERROR compressed cluster {i} with data file, entry={raw:#x}"
            ));
            return Ok(());
        }
        if bitmap != 0 {
            self.rep.corruption(format!(
                "ERROR compressed cluster {i} with non-zero subcluster allocation bitmap, \
                 entry={raw:#x}"
            ));
            return Ok(());
        }
        self.inc(d.host.0, d.read_len())?;
        if frag {
            // Compressed clusters count as fragmented: they are never read contiguously.
            self.rep.allocated_clusters += 1;
            self.rep.compressed_clusters += 1;
            self.rep.fragmented_clusters += 1;
        }
        Ok(())
    }

    /// With an external data file a cluster lives at its guest offset. QEMU refuses to read
    /// one that does not (and its check misses it); writing through such a mapping would
    /// overwrite another guest cluster's data, so it is a corruption.
    fn data_file_offset(&mut self, off: u64, guest: u64) {
        if self.ctx.data_file && off != guest {
            self.rep.corruption(format!(
                "ERROR: external data file host cluster offset {off:#x} does not match guest \
                 cluster offset {guest:#x}"
            ));
        }
    }

    /// A normal or preallocated zero cluster.
    fn host_cluster(
        &mut self,
        raw: u64,
        bitmap: u64,
        off: u64,
        frag: bool,
        next: &mut u64,
    ) -> Result<()> {
        if (bitmap >> 32) & bitmap != 0 {
            self.rep.corruption(format!(
                "ERROR offset={off:x}: Allocated cluster has corrupted subcluster allocation \
                 bitmap"
            ));
        }
        if self.ctx.misaligned(off) {
            let data = if self.ctx.geo.extended {
                bitmap & BITMAP_ALL_ALLOC != 0
            } else {
                raw & L2E_ZERO == 0
            };
            let what = if data { "Data" } else { "Preallocated" };
            self.rep.corruption(format!(
                "ERROR offset={off:x}: {what} cluster is not properly aligned; L2 entry corrupted."
            ));
        }
        if frag {
            self.rep.allocated_clusters += 1;
            if *next != 0 && off != *next {
                self.rep.fragmented_clusters += 1;
            }
            *next = off.wrapping_add(self.ctx.cs);
        }
        if !self.ctx.data_file {
            self.inc(off, self.ctx.cs)?;
        }
        Ok(())
    }

    /// Every snapshot's L1 table and what it references.
    async fn walk_snapshots(&mut self) -> Result<()> {
        let ctx = self.ctx;
        if ctx.data_file && !ctx.snapshots.is_empty() {
            self.rep.corruption(format!(
                "ERROR {} snapshots in image with data file",
                ctx.snapshots.len()
            ));
        }
        for sn in &ctx.snapshots {
            let (off, n) = (sn.l1_table_offset, u64::from(sn.l1_size));
            if ctx.misaligned(off) {
                self.rep.corruption(format!(
                    "ERROR snapshot {} ({}) l1_offset={off:#x}: L1 table is not cluster \
                     aligned; snapshot table entry corrupted",
                    sn.id, sn.name
                ));
                continue;
            }
            if n * 8 > MAX_L1_BYTES {
                self.rep.corruption(format!(
                    "ERROR snapshot {} ({}) l1_size={n:#x}: L1 table is too large; snapshot \
                     table entry corrupted",
                    sn.id, sn.name
                ));
                continue;
            }
            // Snapshots may all name one huge L1 table: pay before reading it.
            ctx.meter.spend_table(n).await?;
            let l1 = be_u64s(&ctx.read(off, n * 8).await?);
            let tables = l1.iter().filter(|&&e| e != 0).count() as u64;
            ctx.meter.expect(tables * ctx.l2_entries() as u64);
            self.walk_l1(off, &l1, false).await?;
        }
        Ok(())
    }

    /// The refcount blocks: each must be a valid, unshared cluster inside the file (QEMU's
    /// `check_refblocks`). Returns whether the refcount structure needs a rebuild.
    fn check_refblocks(&mut self) -> Result<bool> {
        let mut rebuild = false;
        for (i, e) in self.ctx.reftable.iter().enumerate() {
            let off = e.0 & REFT_OFFSET_MASK;
            if e.0 & REFT_RESERVED_MASK != 0 {
                self.rep.corruption(format!(
                    "ERROR refcount table entry {i} has reserved bits set"
                ));
                rebuild = true;
                continue;
            }
            if self.ctx.misaligned(off) {
                self.rep.corruption(format!(
                    "ERROR refcount block {i} is not cluster aligned; refcount table entry \
                     corrupted"
                ));
                rebuild = true;
                continue;
            }
            if off == 0 {
                continue;
            }
            let cluster = off >> self.ctx.bits;
            if cluster >= self.imrt.len() {
                // QEMU's repair grows the file to cover the block; we rebuild instead.
                self.rep
                    .corruption(format!("ERROR refcount block {i} is outside image"));
                rebuild = true;
                continue;
            }
            self.inc(off, self.ctx.cs)?;
            let count = self.imrt.get(cluster);
            if count != 1 {
                self.rep
                    .corruption(format!("ERROR refcount block {i} refcount={count}"));
                rebuild = true;
            }
        }
        Ok(rebuild)
    }
}
