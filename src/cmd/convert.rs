//! `qcow2 convert`: copy an image's content into a new (or, with `-n`, an existing) raw or
//! qcow2 image.
//!
//! Only data is copied: ranges the source map reports as zero are skipped, and within data
//! ranges all-zero blocks of `-S` bytes (default 4 KiB) are skipped too, so the destination
//! stays sparse (holes in a raw file, unallocated clusters in a qcow2 image); `-S 0` writes
//! everything (a fully allocated output). When the destination may hold other data — an
//! existing image (`-n`, unless `--target-is-zero`) or a new image over a backing file
//! (`-B`) — zero ranges are written as zeroes instead of skipped. With `-B`, ranges the
//! source's own backing chain provides are left to the new backing file, as qemu-img does
//! (it assumes the new backing holds what the old one did). With `-c` (qcow2 only) every
//! cluster holding data is written compressed (`convert_compress.rs`).
//!
//! Several sources are concatenated (`convert_sources.rs`). `-t`/`-T none|directsync` open
//! the destination/sources with O_DIRECT, `-r` limits the write rate, `-C` lets the kernel
//! copy between raw files (`convert_offload.rs`), `--salvage` turns read errors into zeros and
//! warnings; the copy loop itself is `convert_copy.rs`.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, Result, bail};
use qcow2_engine::Storage;
use qcow2_engine::ops::Throttle;
use qcow2_engine::storage::{FileStorage, LockRequest};

use super::convert_copy::{Copy, Plan};
use super::convert_offload::Offload;
use super::convert_pipe::Parallel;
use super::convert_sources::{Sources, split_files};
use super::ops_common::{cache_direct, check_cache};
use crate::access::Access;
use crate::args::{parse_rate, parse_size};
use crate::disk::Disk;

/// Arguments of `qcow2 convert`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Source format (qcow2 or raw); probed when omitted.
    #[arg(short = 'f')]
    format: Option<String>,
    /// Destination format.
    #[arg(short = 'O', default_value = "raw")]
    output_format: String,
    /// Creation options for a qcow2 destination (as `qcow2 create -o`).
    #[arg(short = 'o')]
    options: Option<String>,
    /// Compress every data cluster of the destination (qcow2 only).
    #[arg(short = 'c')]
    compress: bool,
    /// Show progress.
    #[arg(short = 'p')]
    progress: bool,
    /// Write into an existing destination instead of creating it (`-O` is its format).
    #[arg(short = 'n')]
    no_create: bool,
    /// With `-n`: the destination already reads as zeros, so zero ranges need no writes.
    #[arg(long = "target-is-zero")]
    target_is_zero: bool,
    /// Zero-detection granularity in bytes: all-zero blocks of this size are not written
    /// (default 4k; 0 writes everything, fully allocating the destination).
    #[arg(short = 'S')]
    sparse: Option<String>,
    /// Create the destination (qcow2) over this backing file; ranges the source's backing
    /// chain provides are not copied.
    #[arg(short = 'B')]
    backing: Option<String>,
    /// Format of the `-B` backing file (required with `-B`).
    #[arg(short = 'F')]
    backing_format: Option<String>,
    /// Read this internal snapshot of the source instead of its active disk: a name or ID,
    /// or `snapshot.id=ID,snapshot.name=NAME`.
    #[arg(short = 'l', value_name = "SNAPSHOT_PARAMS")]
    snapshot: Option<String>,
    /// Copy the persistent bitmaps too (qcow2 to qcow2).
    #[arg(long)]
    bitmaps: bool,
    /// With `--bitmaps`: skip inconsistent bitmaps instead of failing.
    #[arg(long = "skip-broken-bitmaps")]
    skip_broken_bitmaps: bool,
    /// Chunks (reads, compression, writes) in flight at once (qemu-img's `-m`, 1 to 16).
    #[arg(short = 'm', default_value_t = 8, value_parser = clap::value_parser!(u8).range(1..=16))]
    requests: u8,
    /// Allow out-of-order writes: each chunk is written as soon as it is ready (the output's
    /// layout then depends on timing; without it, it is the same whatever `-m` is).
    #[arg(short = 'W')]
    unordered: bool,
    /// Cache mode of the destination (qemu-img's names; `none` and `directsync` open it with
    /// O_DIRECT, the others use the page cache).
    #[arg(short = 't', value_name = "CACHE")]
    cache: Option<String>,
    /// Cache mode of the sources (as `-t`).
    #[arg(short = 'T', value_name = "SRC_CACHE")]
    src_cache: Option<String>,
    /// Write at most this many bytes per second (size suffixes allowed; 0: no limit).
    #[arg(short = 'r', value_name = "RATE", allow_hyphen_values = true)]
    rate: Option<String>,
    /// Copy offloading: data ranges between raw files are copied by the kernel
    /// (copy_file_range); other formats fall back to reading and writing.
    #[arg(short = 'C')]
    copy_range: bool,
    /// Continue past read errors of the sources: unreadable 512-byte sectors are written as
    /// zeros, each reported with a warning.
    #[arg(long)]
    salvage: bool,
    /// Quiet: no progress and no warnings.
    #[arg(short = 'q')]
    quiet: bool,
    #[command(flatten)]
    access: Access,
    /// Source images, concatenated in order, then the destination image (created or
    /// truncated).
    #[arg(value_name = "SRC... DST", required = true)]
    files: Vec<PathBuf>,
}

/// Default granularity of zero detection (qemu-img's `-S 4k`).
const DEFAULT_SPARSE: u64 = 4096;
/// Largest `-S` qemu-img accepts.
const MAX_SPARSE: u64 = 16 << 20;

/// Run `qcow2 convert`.
pub async fn run(a: Args) -> Result<u8> {
    let plan = plan(&a)?;
    let rate = a.rate.as_deref().map(parse_rate).transpose()?;
    check_offload(&a)?;
    let (src_paths, dst_path) = split_files(&a.files)?;
    check_cache(a.src_cache.as_deref(), "source cache")?;
    if a.compress && a.output_format != "qcow2" {
        bail!("compressed output (-c) needs -O qcow2");
    }
    if a.compress && (plan.zero_target || plan.skip_backing) {
        bail!(
            "compressed output (-c) into an existing image (-n) or over a backing file (-B) is not supported yet"
        );
    }
    if a.options.is_some() && a.output_format != "qcow2" {
        bail!("-o is only supported with -O qcow2");
    }
    if a.skip_broken_bitmaps && !a.bitmaps {
        bail!("Use of --skip-broken-bitmaps requires --bitmaps");
    }
    let src = open_sources(&a, src_paths).await?;
    check_concatenation(&a, &plan, src_paths.len())?;
    let bitmaps = match a.bitmaps {
        true => {
            super::convert_bitmaps::plan(src.first(), &a.output_format, a.skip_broken_bitmaps)
                .await?
        }
        false => Vec::new(),
    };
    let dst = open_destination(&a, dst_path, src.size()).await?;
    let copied = copy_all(&a, &src, &dst, plan, rate).await;
    let copied = match copied {
        Ok(()) => super::convert_bitmaps::copy(src.first(), &dst, &bitmaps).await,
        e => e,
    };
    let closed = dst.close().await;
    copied?;
    closed.with_context(|| format!("closing '{}'", dst_path.display()))?;
    Ok(0)
}

/// Copy the data: compressed (`-c`) or not.
async fn copy_all(
    a: &Args,
    src: &Sources,
    dst: &Disk,
    plan: Plan,
    rate: Option<u64>,
) -> Result<()> {
    let par = Parallel {
        requests: usize::from(a.requests),
        unordered: a.unordered,
    };
    let (src_paths, dst_path) = split_files(&a.files)?;
    let offload = match a.copy_range {
        true => Offload::open(src, src_paths, dst, dst_path)?.map(Arc::new),
        false => None,
    };
    let c = Copy {
        plan,
        par,
        progress: a.progress && !a.quiet,
        salvage: a.salvage,
        quiet: a.quiet,
        throttle: Arc::new(tokio::sync::Mutex::new(Throttle::new(rate))),
        offload,
    };
    if a.salvage {
        super::convert_walk::warn_unreadable(src, a.quiet).await?;
    }
    match a.compress {
        true => super::convert_compress::copy(src, dst, &c).await,
        false => super::convert_copy::copy(src, dst, &c).await,
    }
}

/// qemu-img's refusals of `-C` with flags it cannot combine with.
fn check_offload(a: &Args) -> Result<()> {
    if a.copy_range && a.compress {
        bail!("Cannot enable copy offloading when -c is used");
    }
    if a.copy_range && a.sparse.is_some() {
        bail!("Cannot enable copy offloading when -S is used");
    }
    if a.copy_range && a.salvage {
        bail!("Cannot use copy offloading in salvaging mode");
    }
    Ok(())
}

/// Open the sources (`-T` decides O_DIRECT); `-l` reads a snapshot of the first source. A
/// bare snapshot name is refused with several sources (`check_concatenation`), but as in
/// qemu-img the `snapshot.id=,snapshot.name=` form applies to the first and concatenates.
async fn open_sources(a: &Args, paths: &[PathBuf]) -> Result<Sources> {
    let mut access = a.access.clone();
    access.direct = cache_direct(a.src_cache.as_deref());
    let mut disks = Vec::new();
    for (i, path) in paths.iter().enumerate() {
        let disk = match &a.snapshot {
            Some(l) if i == 0 && (paths.len() == 1 || is_snapshot_opts(l)) => {
                super::snapshot::open_source(path, a.format.as_deref(), &access, l).await?
            }
            _ => Disk::open(path, a.format.as_deref(), false, &access).await?,
        };
        disks.push(disk);
    }
    Ok(Sources::new(disks))
}

/// Whether `-l` is in the `snapshot.id=ID,snapshot.name=NAME` form.
fn is_snapshot_opts(l: &str) -> bool {
    l.starts_with("snapshot.")
}

/// qemu-img's refusals of what makes no sense with several sources.
fn check_concatenation(a: &Args, plan: &Plan, sources: usize) -> Result<()> {
    if sources < 2 {
        return Ok(());
    }
    if a.snapshot.as_deref().is_some_and(|l| !is_snapshot_opts(l)) {
        bail!("No support for concatenating multiple snapshot");
    }
    if plan.skip_backing {
        bail!(
            "Having a backing file for the target makes no sense when concatenating multiple \
             input images"
        );
    }
    if a.bitmaps {
        bail!("Copying bitmaps only possible with single source");
    }
    Ok(())
}

/// Check the flags against each other (qemu-img's messages) and derive the copy plan.
fn plan(a: &Args) -> Result<Plan> {
    if a.target_is_zero && !a.no_create {
        bail!("--target-is-zero requires use of -n flag");
    }
    // `-o backing_file=` is qemu-img's other spelling of -B.
    let mut created = qcow2_engine::image::create::CreateOptions::default();
    if let Some(o) = &a.options {
        created.apply_o(o)?;
    }
    if a.backing.is_some() && created.backing_file.is_some() {
        bail!("-B and -o backing_file are the same option: give one");
    }
    let backing = a.backing.is_some() || created.backing_file.is_some();
    if created.backing_file.is_some() && created.backing_fmt.is_none() {
        bail!("Use of backing file requires explicit backing format");
    }
    if a.backing.is_some() {
        if a.output_format != "qcow2" {
            bail!(
                "Backing file not supported for file format '{}'",
                a.output_format
            );
        }
        if a.backing_format.is_none() {
            bail!("Use of backing file requires explicit backing format");
        }
    }
    let sparse = match &a.sparse {
        None => DEFAULT_SPARSE,
        Some(s) => parse_size(s)
            .ok()
            .filter(|&v| v % 512 == 0 && v <= MAX_SPARSE)
            .with_context(|| {
                "Invalid buffer size for sparse output specified. Valid sizes are multiples \
                 of 512 up to 16777216. Select 0 to disable sparse detection (fully allocates \
                 output)."
            })?,
    };
    Ok(Plan {
        sparse: usize::try_from(sparse)?,
        zero_target: (a.no_create && !a.target_is_zero) || backing,
        skip_backing: backing,
    })
}

/// Open the destination (`-t` decides O_DIRECT): the existing image of `-n`, which must be
/// at least `size` bytes, or a new one. As qemu-img, a new destination is created before
/// `-t` is checked.
async fn open_destination(a: &Args, path: &Path, size: u64) -> Result<Disk> {
    if !a.no_create {
        create_destination(a, path, size).await?;
    }
    check_cache(a.cache.as_deref(), "cache")?;
    let access = Access {
        direct: cache_direct(a.cache.as_deref()),
        ..Access::default()
    };
    let dst = Disk::open(path, Some(&a.output_format), true, &access).await?;
    if a.no_create && dst.size() < size {
        let _ = dst.close().await;
        bail!("output file is smaller than input file");
    }
    Ok(dst)
}

/// Create the destination: a sparse raw file, or a qcow2 image with the `-o` options (and
/// the `-B` backing file).
async fn create_destination(a: &Args, path: &Path, size: u64) -> Result<()> {
    match a.output_format.as_str() {
        "raw" => create_raw(path, size).await,
        "qcow2" => {
            let mut options = a.options.clone().unwrap_or_default();
            if let (Some(b), Some(f)) = (&a.backing, &a.backing_format) {
                if b.contains(',') || f.contains(',') {
                    bail!("backing file names with commas are not supported");
                }
                let sep = if options.is_empty() { "" } else { "," };
                options = format!("{options}{sep}backing_file={b},backing_fmt={f}");
            }
            let options = (!options.is_empty()).then_some(options);
            super::create::create_qcow2(path, size, options.as_deref()).await
        }
        f => bail!("unsupported output format '{f}' (raw or qcow2)"),
    }
}

/// Create (or truncate) a sparse raw file of `size` bytes.
async fn create_raw(path: &Path, size: u64) -> Result<()> {
    let f = FileStorage::create(path)
        .with_context(|| format!("could not create '{}'", path.display()))?;
    f.lock(LockRequest::raw(true))
        .map_err(|e| qcow2_engine::Error::open("locking", path, e))?;
    f.set_len(size)
        .await
        .with_context(|| format!("sizing '{}'", path.display()))?;
    Ok(())
}

/// Print a progress line (`    (12.50/100%)\r`) when `on`.
pub(super) fn show_progress(on: bool, done: u64, total: u64) {
    if on {
        let pct = if total == 0 {
            100.0
        } else {
            done as f64 * 100.0 / total as f64
        };
        out!("    ({pct:.2}/100%)\r");
    }
}
