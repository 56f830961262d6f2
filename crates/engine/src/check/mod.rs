//! Consistency check and repair of qcow2 images, with results that match `qemu-img check`.
//!
//! The checker needs only a parseable, valid header (what QEMU needs to open an image); it
//! does not use the engine, so it works on images the engine refuses (dirty, corrupt).
//!
//! How it works (the same algorithm as QEMU's `qcow2_check_refcounts`):
//!
//! 1. **Walk** (`walk.rs`): count every reference to every host cluster — header, L1/L2 tables,
//!    data and compressed clusters, snapshots, refcount table and blocks, bitmaps — into an
//!    in-memory refcount array of bounded size, checking each entry on the way.
//! 2. **Compare** (`compare.rs`): recorded refcount lower than counted = corruption, higher =
//!    leak; then check every COPIED flag against the recorded refcount.
//! 3. **Repair** (optional, [`RepairMode`]), ordered so that a crash at any point leaves the
//!    image no worse: raise low refcounts → flush → lower leaked ones → flush → fix COPIED
//!    flags → flush → clear the dirty/corrupt bits. When the refcount structure itself is
//!    broken, `rebuild.rs` writes a new one past the end of the file and switches the header.
//! 4. **Double check**: after a repair, the image is checked again and that report is
//!    returned, with the `*_fixed` counters of the repair.
//!
//! Every pass counts its work (table entries scanned, clusters compared) against a budget and
//! reports it as progress (`budget.rs`): QEMU's algorithm walks a table once per reference,
//! which a small crafted file can make take hours.
//!
//! ```no_run
//! # async fn demo() -> qcow2_engine::Result<()> {
//! use std::sync::Arc;
//! use qcow2_engine::check::{check, repair, CheckOptions, RepairMode};
//! use qcow2_engine::storage::{FileStorage, OpenFlags};
//!
//! let flags = OpenFlags { read_only: false, direct: false };
//! let file = FileStorage::open("disk.qcow2", flags)
//!     .map_err(|e| qcow2_engine::Error::io("opening disk.qcow2", e))?;
//! let file: Arc<dyn qcow2_engine::Storage> = Arc::new(file);
//! let report = check(file.clone(), &CheckOptions::default()).await?;
//! if report.leaks > 0 {
//!     let (_before, after) = repair(file, RepairMode::Leaks).await?;
//!     assert_eq!(after.exit_code(), 0);
//! }
//! # Ok(()) }
//! ```

mod bitmaps;
mod budget;
mod compare;
mod image;
mod imrt;
mod ondisk;
mod rebuild;
mod reorder;
mod report;
mod walk;

use std::sync::Arc;

pub(crate) use bitmaps::parse_directory as bitmap_tables;
pub use budget::Progress;
pub use reorder::change_refcount_width;
pub use report::{CheckReport, MAX_MESSAGES};

use crate::error::Result;
use crate::format::extensions::Extension;
use crate::format::features;
use crate::format::header::HeaderPatch;
use crate::storage::Storage;
use compare::{Fix, check_copied, compare};
use image::Ctx;
use ondisk::OnDisk;

/// Default bound on the memory the checker uses for its refcount array and caches: 1 GiB.
/// The array takes `refcount_bits / 8` bytes per host cluster, so this covers a 2 TiB file of
/// 512-byte clusters with 16-bit refcounts, or 32 PiB of 64 KiB clusters.
pub const DEFAULT_MAX_MEMORY: u64 = 1 << 30;

/// How to check.
#[derive(Debug, Clone)]
pub struct CheckOptions {
    /// The name to report as `filename` (default: the storage's path, or empty).
    pub filename: Option<String>,
    /// Refuse (with [`ErrorKind::InvalidArgument`](crate::ErrorKind::InvalidArgument)) to
    /// check an image whose refcount array would need more bytes than this.
    pub max_memory: u64,
    /// Most work units (table entries scanned, clusters compared) one pass may take. `None`
    /// (the default) derives it from the image: twice the most an image QEMU could have
    /// written with this file size and snapshot count can need, so only crafted images (an
    /// L1 table naming one L2 table millions of times, snapshots sharing one huge L1 table)
    /// reach it; they fail with [`ErrorKind::Corrupt`](crate::ErrorKind::Corrupt). An
    /// explicit budget fails with
    /// [`ErrorKind::InvalidArgument`](crate::ErrorKind::InvalidArgument).
    pub max_work: Option<u64>,
    /// Where to report progress (work done / total), for the caller to poll.
    pub progress: Option<Arc<Progress>>,
}

impl Default for CheckOptions {
    fn default() -> Self {
        CheckOptions {
            filename: None,
            max_memory: DEFAULT_MAX_MEMORY,
            max_work: None,
            progress: None,
        }
    }
}

/// What a repair may change (`qemu-img check -r leaks|all`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RepairMode {
    /// Only lower refcounts that are higher than the number of references. Always safe.
    Leaks,
    /// Also raise refcounts that are too low, fix COPIED flags, and rebuild the refcount
    /// structure when it is broken.
    All,
}

/// Check `storage`'s image without changing it.
///
/// Errors when the image cannot be checked at all: unreadable, not qcow2, a header QEMU would
/// refuse to open, a refcount array over `opts.max_memory`, or more work than
/// `opts.max_work`. Everything else is reported in the [`CheckReport`].
///
/// Cancel-safe and cancellable: the check only reads, and dropping its future (e.g. under
/// `tokio::time::timeout`) stops the walk at its next yield.
pub async fn check(storage: Arc<dyn Storage>, opts: &CheckOptions) -> Result<CheckReport> {
    run(storage, opts, None, false).await
}

/// Check, repair per `mode`, and check again. Returns the report before the repair and the
/// report of the double check (whose `corruptions_fixed`/`leaks_fixed` say what was done).
pub async fn repair(
    storage: Arc<dyn Storage>,
    mode: RepairMode,
) -> Result<(CheckReport, CheckReport)> {
    repair_with(storage, &CheckOptions::default(), mode).await
}

/// [`repair`] with options.
///
/// Cancel-safe: once started, a repair whose future is dropped still runs to the end in the
/// background (a repair stopped half-way would leave refcounts half-rewritten).
pub async fn repair_with(
    storage: Arc<dyn Storage>,
    opts: &CheckOptions,
    mode: RepairMode,
) -> Result<(CheckReport, CheckReport)> {
    let opts = opts.clone();
    crate::detach::Detached::new(async move {
        let before = run(storage.clone(), &opts, None, false).await?;
        let fixed = run(storage.clone(), &opts, Some(mode), false).await?;
        let after = double_check(storage, &opts, fixed).await?;
        Ok((before, after))
    })
    .await
}

/// Rebuild the refcount structure from the metadata, fix COPIED flags and clear the dirty
/// bit: what the engine runs when it opens a dirty (lazy refcounts) image for writing.
/// Errors when the image still has corruptions afterwards, or when the rebuild needs more
/// work than the default budget ([`CheckOptions::max_work`]): a crafted image fails the
/// open quickly instead of keeping it busy for hours.
///
/// Cancel-safe like [`repair_with`]: a dropped rebuild (e.g. a dropped writable open) still
/// finishes in the background (bounded by the same budget).
pub async fn rebuild_refcounts(storage: Arc<dyn Storage>) -> Result<()> {
    crate::detach::Detached::new(rebuild_refcounts_now(storage)).await
}

async fn rebuild_refcounts_now(storage: Arc<dyn Storage>) -> Result<()> {
    let opts = CheckOptions::default();
    let fixed = run(storage.clone(), &opts, Some(RepairMode::All), true).await?;
    let after = double_check(storage, &opts, fixed).await?;
    if after.corruptions > 0 || after.check_errors > 0 {
        return Err(crate::Error::corrupt(format!(
            "{} corruptions and {} check errors remain after rebuilding the refcounts",
            after.corruptions, after.check_errors
        )));
    }
    Ok(())
}

/// When a repair changed something, check again and carry the fixed counts over (as
/// qemu-img does).
async fn double_check(
    storage: Arc<dyn Storage>,
    opts: &CheckOptions,
    fixed: CheckReport,
) -> Result<CheckReport> {
    if fixed.corruptions_fixed == 0 && fixed.leaks_fixed == 0 {
        return Ok(fixed);
    }
    let mut after = run(storage, opts, None, false).await?;
    after.corruptions_fixed = fixed.corruptions_fixed;
    after.leaks_fixed = fixed.leaks_fixed;
    let mut messages = fixed.messages;
    messages.append(&mut after.messages);
    messages.truncate(MAX_MESSAGES);
    after.messages = messages;
    Ok(after)
}

/// One check pass, repairing per `fix` (QEMU's `qcow2_co_check_locked`).
async fn run(
    storage: Arc<dyn Storage>,
    opts: &CheckOptions,
    fix: Option<RepairMode>,
    force_rebuild: bool,
) -> Result<CheckReport> {
    let name = opts.filename.clone().unwrap_or_else(|| {
        storage
            .path()
            .map(|p| p.display().to_string())
            .unwrap_or_default()
    });
    let mut ctx = Ctx::load(storage.clone(), opts).await?;
    if fix.is_some() {
        refuse_unknown_extensions(&ctx)?;
    }
    let mut rep = CheckReport::new(name);
    rep.total_clusters = ctx.header().size.div_ceil(ctx.cs);
    check_snapshot_entries(&ctx, &mut rep);
    let mut walk = walk::calculate(&ctx, &mut rep).await?;
    let pre = rep.clone();
    let mut disk = OnDisk::new();
    let cmp = compare(&ctx, &mut disk, &walk.imrt, &mut rep, Fix::default()).await?;
    let rebuild = walk.rebuild || cmp.rebuild || force_rebuild;
    let mut highest = cmp.highest;
    match fix {
        Some(RepairMode::All) if rebuild => {
            highest = rebuild_and_recount(&mut ctx, &mut walk.imrt, &mut rep).await?;
            disk = OnDisk::new();
        }
        Some(_) if rebuild => rep.check_error("ERROR need to rebuild refcount structures"),
        Some(mode) if rep.leaks > 0 || rep.corruptions > 0 => {
            let seen = std::mem::take(&mut rep.messages);
            rep = fix_refcounts(&ctx, &mut disk, &walk.imrt, pre, mode).await?;
            // QEMU prints the findings of the first comparison, then the repairs.
            rep.messages = [seen, rep.messages].concat();
            rep.messages.truncate(MAX_MESSAGES);
        }
        _ => {}
    }
    let repair_flags = match fix {
        Some(RepairMode::All) => true,
        // Only when the refcounts are known right: the flag is derived from them.
        Some(RepairMode::Leaks) => rep.nothing_found(),
        None => false,
    };
    check_copied(&ctx, &mut disk, &mut rep, repair_flags).await?;
    ctx.meter.finish();
    rep.image_end_offset = (highest + 1) * ctx.cs;
    if fix.is_some() && rep.check_errors == 0 && rep.corruptions == 0 {
        mark_clean(&ctx).await?;
    }
    Ok(rep)
}

/// Repair refcount mismatches in two durable steps, raising before lowering, and return the
/// report of the comparison that did it (based on `pre`, the report before comparing); its
/// messages are the repairs only.
async fn fix_refcounts(
    ctx: &Ctx,
    disk: &mut OnDisk,
    imrt: &imrt::Imrt,
    pre: CheckReport,
    mode: RepairMode,
) -> Result<CheckReport> {
    let base = pre.messages.len();
    let mut raised = pre.clone();
    if mode == RepairMode::All {
        let raise = Fix {
            raise: true,
            lower: false,
        };
        compare(ctx, disk, imrt, &mut raised, raise).await?;
        disk.write_back(ctx).await?;
    }
    let mut rep = pre;
    rep.corruptions_fixed = raised.corruptions_fixed;
    let lower = Fix {
        raise: false,
        lower: true,
    };
    compare(ctx, disk, imrt, &mut rep, lower).await?;
    disk.write_back(ctx).await?;
    let mut messages = raised.messages.split_off(base.min(raised.messages.len()));
    // The raising pass also reports the leaks it leaves to the lowering pass: once is enough.
    messages.retain(|m| !m.starts_with("Leaked cluster"));
    messages.extend(rep.messages.drain(base.min(rep.messages.len())..));
    rep.messages = messages;
    Ok(rep)
}

/// Rebuild the refcount structure, then count again against it and lower the leaks the
/// rebuild leaves behind (the old structure). Keeps QEMU's accounting: what the rebuild made
/// disappear counts as fixed. Returns the highest cluster in use.
async fn rebuild_and_recount(
    ctx: &mut Ctx,
    imrt: &mut imrt::Imrt,
    rep: &mut CheckReport,
) -> Result<u64> {
    rep.note("Rebuilding refcount structure");
    let old = rep.clone();
    rebuild::rebuild(ctx, imrt).await?;
    *ctx = Ctx::load(ctx.storage.clone(), &ctx.opts).await?;
    rep.corruptions = 0;
    rep.leaks = 0;
    let walk = walk::calculate(ctx, rep).await?;
    let mut fresh = CheckReport::default();
    let mut disk = OnDisk::new();
    let lower = Fix {
        raise: false,
        lower: true,
    };
    let cmp = compare(ctx, &mut disk, &walk.imrt, &mut fresh, lower).await?;
    disk.write_back(ctx).await?;
    if cmp.rebuild || walk.rebuild {
        rep.check_error("ERROR rebuilt refcount structure is still broken");
    }
    rep.corruptions_fixed += old.corruptions.saturating_sub(rep.corruptions);
    rep.leaks_fixed += old.leaks.saturating_sub(rep.leaks);
    rep.leaks += fresh.leaks;
    rep.corruptions += fresh.corruptions;
    for msg in fresh.messages {
        rep.note(msg);
    }
    Ok(cmp.highest)
}

/// An extension we do not understand may point at clusters the walk cannot see; a repair
/// would free them as leaks. Refuse to repair such an image rather than guess.
fn refuse_unknown_extensions(ctx: &Ctx) -> Result<()> {
    let unknown = ctx.ih.extensions.iter().find_map(|e| match e {
        Extension::Unknown { kind, .. } => Some(*kind),
        _ => None,
    });
    match unknown {
        Some(kind) => Err(crate::Error::unsupported(format!(
            "unknown header extension {kind:#010x}: refusing to repair an image whose \
             clusters cannot all be accounted for"
        ))),
        None => Ok(()),
    }
}

/// Version 3 snapshot entries need at least 16 bytes of extra data (up to the disk size);
/// QEMU counts a shorter entry as a corruption.
fn check_snapshot_entries(ctx: &Ctx, rep: &mut CheckReport) {
    if ctx.header().version < 3 {
        return;
    }
    for (i, sn) in ctx.snapshots.iter().enumerate() {
        if sn.disk_size.is_none() {
            rep.corruption(format!(
                "ERROR: Snapshot table entry {i} has insufficient extra data ({}: {})",
                sn.id, sn.name
            ));
        }
    }
}

/// Clear the dirty and corrupt incompatible bits after a successful repair (QEMU's
/// `qcow2_mark_clean` + `qcow2_mark_consistent`), durably.
async fn mark_clean(ctx: &Ctx) -> Result<()> {
    let h = ctx.header();
    let bits = features::DIRTY | features::CORRUPT;
    if h.version < 3 || h.incompatible_features & bits == 0 {
        return Ok(());
    }
    let value = h.incompatible_features & !bits;
    let patch = HeaderPatch::incompatible_features(value);
    ctx.write(patch.bytes(), patch.offset()).await?;
    ctx.flush().await
}
