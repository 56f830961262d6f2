//! Rebase: give an image another backing file (`qemu-img rebase`).
//!
//! ```text
//!  safe mode:
//!   open the image with its old chain (read-write) and the new backing file (read-only)
//!   per cluster that the image does not fully allocate: if the image's view (through the
//!       old chain) and the new backing file differ where the image does not allocate,
//!       write the image's view of the whole cluster into it (zeros as a zero cluster;
//!       compressed with `compress`)
//!   flush (fsync)                 ── the image now holds every differing range
//!   rewrite cluster 0 with the new backing name and format, fsync
//!  unsafe mode: only the last step
//! ```
//!
//! Crash-safe: what the first phase writes equals what the image already showed, so a crash
//! before the header switch changes no content; the header is written after the data is
//! durable. With no new backing file (`-b ""`) the image becomes standalone: every range
//! the old chain gave non-zero data is copied in.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::progress::{Job, Progress};
use crate::error::{Error, Result};
use crate::image::{Backing, BackingOverride, Image, OpenOptions, ZeroFlags, resolve_relative};
use crate::units::to_usize;

/// Bytes compared per step (between progress reports and cancellation checks); at least a
/// cluster.
const CHUNK: u64 = 1 << 20;

/// The backing file to switch to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewBacking {
    /// The name written into the header; a relative name is relative to the image's
    /// directory (as QEMU reads it).
    pub name: String,
    /// Its format (`"qcow2"` or `"raw"`), written into the header too.
    pub format: String,
}

/// What [`rebase`] does.
#[derive(Debug, Clone)]
pub struct RebaseOptions {
    /// How to open the image and the backing files (references, locking, IO backend);
    /// `writable` is ignored.
    pub open: OpenOptions,
    /// The new backing file; `None` makes the image standalone.
    pub backing: Option<NewBacking>,
    /// Only rewrite the header (`-u`): the caller promises the new backing file holds what
    /// the old one did.
    pub header_only: bool,
    /// Write the copied clusters compressed (`-c`).
    pub compress: bool,
    /// Where to report progress; cancel through it.
    pub progress: Option<Arc<Progress>>,
}

impl RebaseOptions {
    /// A safe rebase onto `backing` (`None`: flatten), uncompressed.
    pub fn new(open: OpenOptions, backing: Option<NewBacking>) -> RebaseOptions {
        RebaseOptions {
            open,
            backing,
            header_only: false,
            compress: false,
            progress: None,
        }
    }
}

/// Rebase the image at `path` (see the module docs).
///
/// Cancel through [`RebaseOptions::progress`] or by dropping the future: the copy stops at
/// its next step, the header is left as it was, and the image reads as before.
///
/// ```no_run
/// # async fn demo() -> qcow2_engine::Result<()> {
/// use qcow2_engine::image::OpenOptions;
/// use qcow2_engine::ops::rebase::{NewBacking, RebaseOptions, rebase};
/// let new = NewBacking { name: "new-base.qcow2".into(), format: "qcow2".into() };
/// rebase("overlay.qcow2", &RebaseOptions::new(OpenOptions::new(), Some(new))).await?;
/// # Ok(()) }
/// ```
pub async fn rebase(path: impl AsRef<Path>, opts: &RebaseOptions) -> Result<()> {
    let path = path.as_ref().to_path_buf();
    let opts = opts.clone();
    let progress = opts.progress.clone().unwrap_or_default();
    Job::new(progress.clone(), async move {
        run(&path, &opts, &progress).await
    })
    .await
}

/// Blocking [`rebase`], for callers without an async runtime (cancel through the progress).
#[cfg(feature = "blocking")]
pub fn rebase_blocking(path: impl AsRef<Path>, opts: &RebaseOptions) -> Result<()> {
    crate::blocking::run(rebase(path, opts))
}

async fn run(path: &Path, opts: &RebaseOptions, progress: &Progress) -> Result<()> {
    if let Some(b) = &opts.backing {
        check_format(&b.format)?;
    }
    let mut open = opts.open.clone().writable(true);
    if opts.header_only {
        open = open.backing(BackingOverride {
            path: None,
            format: None,
        });
    }
    let img = Image::open(path, &open).await?;
    let done = match opts.header_only {
        true => Ok(()),
        false => copy_differences(&img, path, opts, progress).await,
    };
    let done = match done {
        Ok(()) => switch_header(&img, opts.backing.clone()).await,
        Err(e) => Err(e),
    };
    let closed = img.close().await;
    done?;
    closed
}

/// The formats a backing file may have here.
fn check_format(format: &str) -> Result<()> {
    match format {
        "qcow2" | "raw" => Ok(()),
        f => Err(Error::unsupported(format!(
            "backing format '{f}' (qcow2 or raw)"
        ))),
    }
}

/// Write the new backing name and format into the header.
async fn switch_header(img: &Image, backing: Option<NewBacking>) -> Result<()> {
    img.rewrite_header(|ih| {
        ih.set_backing(backing.map(|b| (b.name, Some(b.format))));
        Ok(())
    })
    .await
}

/// Open the new backing file read-only.
async fn open_new_backing(path: &Path, b: &NewBacking, opts: &OpenOptions) -> Result<Backing> {
    let resolved: PathBuf = resolve_relative(Some(path), &b.name);
    let opts = opts.clone().writable(false);
    crate::image::open_backing(&resolved, Some(&b.format), &opts, &[])
        .await
        .map_err(|e| {
            Error::invalid_arg(format!("Could not open new backing file '{}': {e}", b.name))
        })
}

/// The safe-mode copy (module docs), then a flush.
async fn copy_differences(
    img: &Image,
    path: &Path,
    opts: &RebaseOptions,
    progress: &Progress,
) -> Result<()> {
    let new = match &opts.backing {
        Some(b) => Some(open_new_backing(path, b, &opts.open).await?),
        None => None,
    };
    let size = img.virtual_size();
    let cs = img.cluster_size();
    let chunk = CHUNK.max(cs);
    progress.set_total(size);
    let mut off = 0;
    while off < size {
        progress.check()?;
        let n = chunk.min(size - off);
        rebase_chunk(img, new.as_ref(), (off, n), opts.compress).await?;
        progress.advance(n);
        off += n;
    }
    if let Some(Backing::Qcow2(b)) = new {
        b.close().await?;
    }
    img.flush().await
}

/// One chunk of the copy: compare, then write the clusters that differ.
async fn rebase_chunk(
    img: &Image,
    new: Option<&Backing>,
    (off, n): (u64, u64),
    compress: bool,
) -> Result<()> {
    let holes: Vec<(u64, u64)> = img
        .map(off, n)
        .await?
        .into_iter()
        .filter(|e| !(e.present && e.depth == 0))
        .map(|e| (e.start - off, e.length))
        .collect();
    if holes.is_empty() {
        return Ok(());
    }
    let mut mine = vec![0u8; to_usize(n)];
    img.read_at(&mut mine, off).await?;
    let mut theirs = vec![0u8; to_usize(n)];
    if let Some(b) = new {
        b.read_at(&mut theirs, off).await?;
    }
    let cs = img.cluster_size();
    let mut c = 0;
    while c < n {
        let end = (c + cs).min(n);
        if differs_in_holes(&holes, (c, end), &mine, &theirs) {
            let data = &mine[to_usize(c)..to_usize(end)];
            write_cluster(img, data, off + c, compress).await?;
        }
        c = end;
    }
    Ok(())
}

/// Whether `a` and `b` differ anywhere in `[start, end)` that a hole covers.
fn differs_in_holes(holes: &[(u64, u64)], (start, end): (u64, u64), a: &[u8], b: &[u8]) -> bool {
    holes.iter().any(|&(h, len)| {
        let (s, e) = (h.max(start), (h + len).min(end));
        s < e && a[to_usize(s)..to_usize(e)] != b[to_usize(s)..to_usize(e)]
    })
}

/// Write one cluster's content (`data`, at `off`) into the image.
async fn write_cluster(img: &Image, data: &[u8], off: u64, compress: bool) -> Result<()> {
    let zero = data.iter().all(|&b| b == 0);
    // A v2 image has no zero clusters: over a backing file, zeros must be written as data.
    if zero && img.header().header.version >= 3 {
        return img
            .write_zeroes(off, data.len() as u64, ZeroFlags { may_unmap: true })
            .await;
    }
    match compress && !zero {
        true => img.write_compressed(data, off).await,
        false => img.write_at(data, off).await,
    }
}
