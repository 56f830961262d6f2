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

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{Context, Result, bail};
use qcow2_engine::Storage;
use qcow2_engine::storage::{FileStorage, LockRequest};

use super::convert_pipe::{Parallel, Pipeline, is_zero};
use crate::access::Access;
use crate::args::parse_size;
use crate::disk::{Disk, open_qcow2};

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
    /// Quiet (the default; accepted for qemu-img compatibility).
    #[arg(short = 'q')]
    quiet: bool,
    #[command(flatten)]
    access: Access,
    /// Source image.
    src: PathBuf,
    /// Destination image (created or truncated).
    dst: PathBuf,
}

/// Bytes read from the source at a time (one chunk of the pipeline).
const CHUNK: u64 = 2 << 20;
/// Default granularity of zero detection (qemu-img's `-S 4k`).
const DEFAULT_SPARSE: u64 = 4096;
/// Largest `-S` qemu-img accepts.
const MAX_SPARSE: u64 = 16 << 20;

/// How the copy treats zeros and backing data.
#[derive(Debug, Clone, Copy)]
struct Plan {
    /// All-zero blocks of this many bytes are not written as data (0: every block is).
    sparse: usize,
    /// The destination may hold data: zero ranges must be written as zeroes.
    zero_target: bool,
    /// Leave ranges the source's backing chain provides to the destination's backing.
    skip_backing: bool,
}

/// Run `qcow2 convert`.
pub async fn run(a: Args) -> Result<u8> {
    let plan = plan(&a)?;
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
    let src = match &a.snapshot {
        Some(l) => super::snapshot::open_source(&a.src, a.format.as_deref(), &a.access, l).await?,
        None => Disk::open(&a.src, a.format.as_deref(), false, &a.access).await?,
    };
    let bitmaps = match a.bitmaps {
        true => super::convert_bitmaps::plan(&src, &a.output_format, a.skip_broken_bitmaps).await?,
        false => Vec::new(),
    };
    let size = src.size();
    let dst = if a.no_create {
        open_existing(&a, size).await?
    } else {
        create_destination(&a, size).await?
    };
    let progress = a.progress && !a.quiet;
    let par = Parallel {
        requests: usize::from(a.requests),
        unordered: a.unordered,
    };
    let copied = if a.compress {
        super::convert_compress::copy(&src, &dst, progress, par).await
    } else {
        copy(&src, &dst, plan, progress, par).await
    };
    let copied = match copied {
        Ok(()) => super::convert_bitmaps::copy(&src, &dst, &bitmaps).await,
        e => e,
    };
    let closed = dst.close().await;
    copied?;
    closed.with_context(|| format!("closing '{}'", a.dst.display()))?;
    Ok(0)
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

/// The destination of `-n`: opened in the `-O` format, at least as large as the source.
async fn open_existing(a: &Args, size: u64) -> Result<Disk> {
    let dst = Disk::open(&a.dst, Some(&a.output_format), true, &Access::default()).await?;
    if dst.size() < size {
        let _ = dst.close().await;
        bail!("output file is smaller than input file");
    }
    Ok(dst)
}

/// Create the destination: a sparse raw file, or a qcow2 image with the `-o` options (and
/// the `-B` backing file).
async fn create_destination(a: &Args, size: u64) -> Result<Disk> {
    match a.output_format.as_str() {
        "raw" => create_raw(&a.dst, size).await,
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
            super::create::create_qcow2(&a.dst, size, options.as_deref()).await?;
            Ok(Disk::Qcow2(
                open_qcow2(&a.dst, true, &Access::default()).await?,
            ))
        }
        f => bail!("unsupported output format '{f}' (raw or qcow2)"),
    }
}

/// Create (or truncate) a sparse raw file of `size` bytes.
async fn create_raw(path: &std::path::Path, size: u64) -> Result<Disk> {
    let f = FileStorage::create(path)
        .with_context(|| format!("could not create '{}'", path.display()))?;
    f.lock(LockRequest::raw(true))
        .map_err(|e| qcow2_engine::Error::open("locking", path, e))?;
    f.set_len(size)
        .await
        .with_context(|| format!("sizing '{}'", path.display()))?;
    Ok(Disk::open_raw_storage(Arc::new(f), size))
}

/// Copy every range of `src` that `plan` says to copy into `dst`, up to `par.requests` chunks
/// in flight (see `convert_pipe.rs`).
async fn copy(src: &Disk, dst: &Disk, plan: Plan, progress: bool, par: Parallel) -> Result<()> {
    let size = src.size();
    let mut pipe = Pipeline::new(par.requests);
    let mut off = 0;
    while off < size {
        let window = (size - off).min(1 << 30);
        for e in src.map(off, window).await? {
            if plan.skip_backing && e.depth > 0 {
                // Provided by the source's backing chain: left to the new backing file.
            } else if e.zero && plan.sparse > 0 {
                if plan.zero_target {
                    let zeros = Chunk {
                        off: e.start,
                        buf: Vec::new(),
                        runs: vec![(0, e.length, false)],
                    };
                    let job = async move { Ok(zeros) };
                    if let Some(done) = pipe.push(job).await? {
                        done.apply(dst, plan).await?;
                    }
                }
            } else {
                let mut at = e.start;
                while at < e.start + e.length {
                    let len = (e.start + e.length - at).min(CHUNK);
                    let job = read_chunk(src.clone(), dst.clone(), (at, len), plan, par.unordered);
                    if let Some(done) = pipe.push(job).await? {
                        done.apply(dst, plan).await?;
                    }
                    at += len;
                }
            }
            show_progress(progress, e.start + e.length, size);
        }
        off += window;
    }
    while let Some(done) = pipe.next().await? {
        done.apply(dst, plan).await?;
    }
    if progress {
        outln!();
    }
    Ok(())
}

/// A chunk read from the source: its bytes and its runs `(start, len, data)` relative to
/// `off` (`data` false: all-zero blocks of the `-S` size).
struct Chunk {
    off: u64,
    buf: Vec<u8>,
    runs: Vec<(u64, u64, bool)>,
}

impl Chunk {
    /// Write the data runs; zero runs become write-zeroes when the destination may hold data.
    async fn apply(self, dst: &Disk, plan: Plan) -> Result<()> {
        for (start, len, data) in self.runs {
            let at = self.off + start;
            if data {
                let (a, b) = (usize::try_from(start)?, usize::try_from(start + len)?);
                dst.write_at(&self.buf[a..b], at).await?;
            } else if plan.zero_target {
                dst.write_zeroes(at, len, true).await?;
            }
        }
        Ok(())
    }
}

/// Read `[at, at + len)` and split it into data and zero runs; with `write_now`, also write
/// it (and return an empty chunk).
async fn read_chunk(
    src: Disk,
    dst: Disk,
    (at, len): (u64, u64),
    plan: Plan,
    write_now: bool,
) -> Result<Chunk> {
    let mut buf = vec![0u8; usize::try_from(len)?];
    src.read_at(&mut buf, at).await?;
    let runs = zero_runs(&buf, plan.sparse);
    let chunk = Chunk { off: at, buf, runs };
    if write_now {
        chunk.apply(&dst, plan).await?;
        return Ok(Chunk {
            off: at,
            buf: Vec::new(),
            runs: Vec::new(),
        });
    }
    Ok(chunk)
}

/// Split `buf` into alternating runs of data and of all-zero `block`-byte blocks (`block` 0:
/// one data run).
fn zero_runs(buf: &[u8], block: usize) -> Vec<(u64, u64, bool)> {
    if block == 0 {
        return vec![(0, buf.len() as u64, true)];
    }
    let mut runs: Vec<(u64, u64, bool)> = Vec::new();
    for (i, b) in buf.chunks(block).enumerate() {
        let data = !is_zero(b);
        let start = (i * block) as u64;
        match runs.last_mut() {
            Some(last) if last.2 == data => last.1 += b.len() as u64,
            _ => runs.push((start, b.len() as u64, data)),
        }
    }
    runs
}

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
