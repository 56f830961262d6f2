//! Changing the refcount width of an image (`qemu-img amend -o refcount_bits=N`), built on
//! the checker's walk and rebuild.
//!
//! ```text
//!  check the image with its own width       ── refuse if anything is wrong
//!  walk the metadata again, counting in the new width (a count too big for it refuses)
//!  count the old refcount table and blocks as free (nothing will point at them)
//!  write the new blocks and table past the end of the file, fsync
//!  one header write inside the first sector: table offset + clusters and the new width
//!      (and the dirty bit cleared), fsync     ── the switch
//! ```
//! A power cut before the switch leaves the old structure in place and the new clusters
//! leaked past the end of the file; after it, the new structure, exact (the old clusters
//! are already free in it). There is never a state with a mapping whose cluster is not
//! counted.

use std::sync::Arc;

use super::image::Ctx;
use super::report::CheckReport;
use super::{CheckOptions, rebuild, walk};
use crate::error::{Error, Result};
use crate::format::features;
use crate::format::header::{HEADER_LENGTH_OFFSET, REFCOUNT_TABLE_OFFSET_OFFSET};
use crate::storage::Storage;

/// Rebuild the refcount structure of the (closed) image on `storage` with entries of
/// `bits` bits (1, 2, 4, ..., 64), crash-safely (see the module docs). The image must be
/// version 3 and check clean of corruptions (leaks are dropped by the rebuild).
///
/// Cancel-safe: once started it runs to the end in the background if dropped.
pub async fn change_refcount_width(storage: Arc<dyn Storage>, bits: u32) -> Result<()> {
    crate::detach::Detached::new(change_now(storage, bits)).await
}

async fn change_now(storage: Arc<dyn Storage>, bits: u32) -> Result<()> {
    if !bits.is_power_of_two() || bits > 64 {
        return Err(Error::invalid_arg(
            "Refcount width must be a power of two and may not exceed 64 bits",
        ));
    }
    let opts = CheckOptions::default();
    let mut ctx = Ctx::load(storage.clone(), &opts).await?;
    let order = bits.trailing_zeros();
    if order == ctx.order {
        return Ok(());
    }
    if ctx.header().version < 3 {
        return Err(Error::invalid_arg(
            "Refcount widths other than 16 bits require compatibility level 1.1 or above \
             (use compat=1.1 or greater)",
        ));
    }
    let before = super::check(storage, &opts).await?;
    if before.corruptions > 0 || before.check_errors > 0 {
        return Err(Error::corrupt(format!(
            "the image has {} corruptions; repair it first (check -r all)",
            before.corruptions + before.check_errors
        )));
    }
    if order < ctx.order {
        check_fits(&ctx, bits).await?;
    }
    ctx.order = order;
    let mut rep = CheckReport::new(String::new());
    let mut imrt = walk::calculate(&ctx, &mut rep).await?.imrt;
    if rep.corruptions > 0 {
        return Err(Error::corrupt(
            "counting the references in the new width failed",
        ));
    }
    free_old_structure(&ctx, &mut imrt)?;
    let (table_at, clusters) = rebuild::write_structure(&ctx, &mut imrt).await?;
    switch(&ctx, table_at, clusters, order).await
}

/// Refuse a narrower width when a cluster's count does not fit (qemu-img's message names
/// the first such cluster). The image checked clean, so the walk's counts are its refcounts.
async fn check_fits(ctx: &Ctx, bits: u32) -> Result<()> {
    let max = if bits == 64 {
        u64::MAX
    } else {
        (1u64 << bits) - 1
    };
    let mut rep = CheckReport::new(String::new());
    let imrt = walk::calculate(ctx, &mut rep).await?.imrt;
    match (0..imrt.len()).find(|&c| imrt.get(c) > max) {
        Some(c) => Err(Error::invalid_arg(format!(
            "Cannot decrease refcount entry width to {bits} bits: Cluster at offset {:#x} \
             has a refcount of {}",
            c << ctx.bits,
            imrt.get(c)
        ))),
        None => Ok(()),
    }
}

/// Count the clusters of the current refcount table and blocks as free.
fn free_old_structure(ctx: &Ctx, imrt: &mut super::imrt::Imrt) -> Result<()> {
    let h = ctx.header();
    let first = h.refcount_table_offset >> ctx.bits;
    for c in first..first + u64::from(h.refcount_table_clusters) {
        imrt.set(c, 0)?;
    }
    for e in &ctx.reftable {
        if let Some(block) = e.block_offset() {
            imrt.set(block.0 >> ctx.bits, 0)?;
        }
    }
    Ok(())
}

/// Point the header at the new table with the new width, clean, in one write inside the
/// first sector (the fields from the table offset up to the header length), durably.
async fn switch(ctx: &Ctx, table_at: u64, clusters: u32, order: u32) -> Result<()> {
    let mut h = ctx.header().clone();
    h.refcount_table_offset = table_at;
    h.refcount_table_clusters = clusters;
    h.refcount_order = order;
    h.incompatible_features &= !features::DIRTY;
    let bytes = h.to_bytes();
    let fields = &bytes[REFCOUNT_TABLE_OFFSET_OFFSET..HEADER_LENGTH_OFFSET];
    ctx.write(fields, REFCOUNT_TABLE_OFFSET_OFFSET as u64)
        .await?;
    ctx.flush().await
}
