//! [`OnDisk`]: the refcounts the image's own refcount structures record, read through a small
//! cache of refcount blocks, and the repairs written back to them.
//!
//! Lookups behave like QEMU's `qcow2_get_refcount`: a cluster past the refcount table or under
//! an empty table entry has refcount 0; a block past the end of the file reads as zeros; a
//! misaligned block offset cannot be read (the caller counts a check error).
//!
//! Repairs change cached blocks and mark them dirty; [`OnDisk::write_back`] writes them and
//! flushes, so a repair step is one barrier. The cache is bounded: clean blocks are dropped when
//! it exceeds the memory limit (dirty ones stay until written).

use std::collections::{BTreeSet, HashMap};

use super::image::Ctx;
use crate::error::Result;
use crate::format::refcount::{self, REFT_OFFSET_MASK};

/// Cached view of the on-disk refcount blocks.
#[derive(Debug, Default)]
pub(crate) struct OnDisk {
    /// Block contents by block host offset.
    blocks: HashMap<u64, Vec<u8>>,
    /// Offsets of blocks changed in memory but not yet written.
    dirty: BTreeSet<u64>,
}

impl OnDisk {
    /// An empty cache.
    pub(crate) fn new() -> OnDisk {
        OnDisk::default()
    }

    /// The offset of the block holding `cluster`'s refcount: `Ok(None)` when there is none
    /// (refcount 0), `Err(())` when the table entry is misaligned (unreadable).
    fn block_of(ctx: &Ctx, cluster: u64) -> std::result::Result<Option<u64>, ()> {
        let index = cluster / ctx.refblock_entries();
        let Some(entry) = usize::try_from(index)
            .ok()
            .and_then(|i| ctx.reftable.get(i))
        else {
            return Ok(None);
        };
        match entry.0 & REFT_OFFSET_MASK {
            0 => Ok(None),
            off if ctx.misaligned(off) => Err(()),
            off => Ok(Some(off)),
        }
    }

    /// Load the block at `off` into the cache (zeros past the end of the file).
    async fn load(&mut self, ctx: &Ctx, off: u64) -> Result<()> {
        if self.blocks.contains_key(&off) {
            return Ok(());
        }
        if (self.blocks.len() as u64 + 1).saturating_mul(ctx.cs) > ctx.limit {
            let dirty = &self.dirty;
            self.blocks.retain(|k, _| dirty.contains(k));
        }
        let buf = ctx.read(off, ctx.cs).await?;
        self.blocks.insert(off, buf);
        Ok(())
    }

    /// The recorded refcount of `cluster`; `None` when its block cannot be read.
    pub(crate) async fn get(&mut self, ctx: &Ctx, cluster: u64) -> Result<Option<u64>> {
        let off = match Self::block_of(ctx, cluster) {
            Err(()) => return Ok(None),
            Ok(None) => return Ok(Some(0)),
            Ok(Some(off)) => off,
        };
        self.load(ctx, off).await?;
        let index = cluster % ctx.refblock_entries();
        Ok(Some(refcount::get(&self.blocks[&off], index, ctx.order)))
    }

    /// Change the recorded refcount of `cluster` in memory. Returns false when the cluster has
    /// no readable block to record it in (only a rebuild can fix that).
    pub(crate) async fn set(&mut self, ctx: &Ctx, cluster: u64, value: u64) -> Result<bool> {
        let Ok(Some(off)) = Self::block_of(ctx, cluster) else {
            return Ok(false);
        };
        self.load(ctx, off).await?;
        let index = cluster % ctx.refblock_entries();
        let block = self.blocks.get_mut(&off).expect("block loaded above");
        refcount::set(block, index, ctx.order, value)?;
        self.dirty.insert(off);
        Ok(true)
    }

    /// Write every changed block, then flush: one repair step reaches the disk as a whole
    /// before the next one starts.
    pub(crate) async fn write_back(&mut self, ctx: &Ctx) -> Result<()> {
        if self.dirty.is_empty() {
            return Ok(());
        }
        for off in std::mem::take(&mut self.dirty) {
            ctx.write(&self.blocks[&off], off).await?;
        }
        ctx.flush().await
    }
}
