//! Comparing what the walk counted with what the refcount structures record (QEMU's
//! `compare_refcounts`), and the COPIED flags with the recorded refcounts
//! (`check_oflag_copied`). Both can repair what they find.
//!
//! | recorded vs counted          | finding                                  | repair           |
//! |------------------------------|------------------------------------------|------------------|
//! | recorded < counted           | corruption (`ERROR cluster N ...`)       | raise (`All`)    |
//! | recorded = 0 < counted       | corruption, and needs a refcount rebuild | rebuild (`All`)  |
//! | recorded > counted           | leak (`Leaked cluster N ...`)            | lower            |
//! | COPIED ≠ (recorded == 1)     | corruption (`OFLAG_COPIED ...`)          | rewrite the flag |
//!
//! Raising and lowering are separate passes ([`Fix`]) so a repair can put a barrier between
//! them: every reference keeps a refcount ≥ 1 at every instant.

use super::image::{Ctx, be_u64s};
use super::imrt::Imrt;
use super::ondisk::OnDisk;
use super::report::CheckReport;
use super::walk::{Kind, classify};
use crate::error::Result;
use crate::format::l1::{L1E_COPIED, L1E_OFFSET_MASK};
use crate::format::l2::L2E_COPIED;

/// Clusters compared between two payments to the work meter.
const COMPARE_STEP: u64 = 1024;

/// Which mismatches a comparison pass repairs.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Fix {
    /// Raise refcounts that are too low (but not 0: those need a rebuild).
    pub raise: bool,
    /// Lower refcounts that are too high.
    pub lower: bool,
}

/// What a comparison pass saw.
#[derive(Debug, Default)]
pub(crate) struct Compared {
    /// A cluster in use has recorded refcount 0: only a rebuild repairs that.
    pub rebuild: bool,
    /// Highest cluster with a recorded or counted reference.
    pub highest: u64,
}

/// Compare every cluster's recorded refcount with the counted one, repairing per `fix`
/// (changes stay in `disk`'s cache until [`OnDisk::write_back`]).
pub(crate) async fn compare(
    ctx: &Ctx,
    disk: &mut OnDisk,
    imrt: &Imrt,
    rep: &mut CheckReport,
    fix: Fix,
) -> Result<Compared> {
    let mut out = Compared::default();
    ctx.meter.expect(imrt.len());
    for i in 0..imrt.len() {
        if i % COMPARE_STEP == 0 {
            ctx.meter.spend(COMPARE_STEP.min(imrt.len() - i)).await?;
        }
        let Some(recorded) = disk.get(ctx, i).await? else {
            rep.check_error(format!(
                "Can't get refcount for cluster {i}: Input/output error"
            ));
            continue;
        };
        let counted = imrt.get(i);
        if recorded > 0 || counted > 0 {
            out.highest = i;
        }
        if recorded == counted {
            continue;
        }
        out.rebuild |= recorded == 0;
        mismatch(ctx, disk, rep, fix, (i, recorded, counted)).await?;
    }
    Ok(out)
}

/// Report (and per `fix`, repair) one cluster whose `(index, recorded, counted)` differ.
async fn mismatch(
    ctx: &Ctx,
    disk: &mut OnDisk,
    rep: &mut CheckReport,
    fix: Fix,
    (i, recorded, counted): (u64, u64, u64),
) -> Result<()> {
    let low = recorded < counted;
    let allowed = if low {
        fix.raise && recorded > 0
    } else {
        fix.lower
    };
    if allowed && disk.set(ctx, i, counted).await? {
        rep.note(format!(
            "Repairing cluster {i} refcount={recorded} reference={counted}"
        ));
        if low {
            rep.corruptions_fixed += 1;
        } else {
            rep.leaks_fixed += 1;
        }
        return Ok(());
    }
    let what = if low { "ERROR" } else { "Leaked" };
    rep.note(format!(
        "{what} cluster {i} refcount={recorded} reference={counted}"
    ));
    if low {
        rep.corruptions += 1;
    } else {
        rep.leaks += 1;
    }
    Ok(())
}

/// Check the COPIED flag of every active L1 and L2 entry against the recorded refcount
/// (flag set ⇔ refcount 1); with `repair`, rewrite wrong entries one by one (each an 8-byte
/// write, so a crash leaves every entry either old or new) and flush at the end.
pub(crate) async fn check_copied(
    ctx: &Ctx,
    disk: &mut OnDisk,
    rep: &mut CheckReport,
    repair: bool,
) -> Result<()> {
    let l1_offset = ctx.header().l1_table_offset;
    let mut wrote = false;
    ctx.meter.spend_table(ctx.l1.len() as u64).await?;
    for (i, &e) in ctx.l1.iter().enumerate() {
        let l2 = e & L1E_OFFSET_MASK;
        if l2 == 0 {
            continue;
        }
        if let Some(rc) = disk.get(ctx, l2 >> ctx.bits).await? {
            if (rc == 1) != (e & L1E_COPIED != 0) {
                let msg =
                    format!("OFLAG_COPIED L2 cluster: l1_index={i} l1_entry={e:x} refcount={rc}");
                let fixed = with_copied(e, L1E_COPIED, rc == 1);
                let at = l1_offset + i as u64 * 8;
                wrote |= flag_finding(ctx, rep, repair, msg, fixed, at).await?;
            }
        }
        wrote |= check_l2_copied(ctx, disk, rep, repair, l2).await?;
    }
    if wrote {
        ctx.flush().await?;
    }
    Ok(())
}

/// The COPIED flags of one L2 table's data clusters. Returns whether anything was written.
async fn check_l2_copied(
    ctx: &Ctx,
    disk: &mut OnDisk,
    rep: &mut CheckReport,
    repair: bool,
    l2: u64,
) -> Result<bool> {
    ctx.meter.spend(ctx.l2_entries() as u64).await?;
    let words = be_u64s(&ctx.read(l2, ctx.cs).await?);
    let step = ctx.l2_entry_size() / 8;
    let mut wrote = false;
    for j in 0..ctx.l2_entries() {
        let raw = words[j * step];
        let Kind::Host(off) = classify(ctx, raw) else {
            continue;
        };
        // With an external data file the data clusters have no refcount here: always 1.
        let rc = match ctx.data_file {
            true => Some(1),
            false => disk.get(ctx, off >> ctx.bits).await?,
        };
        let Some(rc) = rc else { continue };
        if (rc == 1) != (raw & L2E_COPIED != 0) {
            let msg = format!("OFLAG_COPIED data cluster: l2_entry={raw:x} refcount={rc}");
            let fixed = with_copied(raw, L2E_COPIED, rc == 1);
            let at = l2 + (j * ctx.l2_entry_size()) as u64;
            wrote |= flag_finding(ctx, rep, repair, msg, fixed, at).await?;
        }
    }
    Ok(wrote)
}

/// Report one wrong COPIED flag and, with `repair`, write the `fixed` entry at `at`.
async fn flag_finding(
    ctx: &Ctx,
    rep: &mut CheckReport,
    repair: bool,
    msg: String,
    fixed: u64,
    at: u64,
) -> Result<bool> {
    if !repair {
        rep.corruption(format!("ERROR {msg}"));
        return Ok(false);
    }
    ctx.write(&fixed.to_be_bytes(), at).await?;
    rep.note(format!("Repairing {msg}"));
    rep.corruptions_fixed += 1;
    Ok(true)
}

/// `entry` with the `flag` bit set or cleared.
fn with_copied(entry: u64, flag: u64, set: bool) -> u64 {
    if set { entry | flag } else { entry & !flag }
}
