//! Commit: write an overlay's data into an image further down its backing chain
//! (`qemu-img commit`).
//!
//! ```text
//!  list the chain; pick the base (default: the overlay's backing file)
//!  open the base read-write, the layers above it each alone (no backing)
//!  for each chunk, top layer first: a range a layer allocates comes from that layer
//!      (data, or zeros for a zero cluster); what no layer above the base allocates is
//!      left alone; past the end of a shorter intermediate layer the chain reads zeros
//!  write those ranges into the base (growing it to the overlay's size first)
//!  flush the base (fsync)                       ── the base now holds the committed data
//!  empty the overlay (unless kept)              ── reads fall through to the same data
//! ```
//!
//! Crash-safe in that order: until the base is fsynced the overlay is untouched, and after
//! it every cluster the overlay drops reads the same through the base. Like qemu-img, naming
//! a base (`-b`) keeps the overlay (emptying it would leave the layers in between reading
//! the wrong data), and the intermediate layers are never changed.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::chain::{Layer, Target, backing_layers, open_alone};
use super::progress::{Job, Progress};
use super::throttle::Throttle;
use crate::error::{Error, Result};
use crate::image::{Image, OpenOptions};
use crate::units::to_usize;

/// Bytes handled per step (between progress reports and cancellation checks).
const CHUNK: u64 = 1 << 20;

/// What [`commit`] does.
#[derive(Debug, Clone)]
pub struct CommitOptions {
    /// How to open the images (reference policy, locking, IO backend); `writable` is
    /// ignored.
    pub open: OpenOptions,
    /// The image to commit into, which must be in the overlay's backing chain (default: the
    /// overlay's backing file). Naming one keeps the overlay (`qemu-img commit -b`).
    pub base: Option<PathBuf>,
    /// Keep the overlay's data instead of emptying it (`-d`).
    pub keep_overlay: bool,
    /// At most this many bytes written per second (`-r`); `None`: no limit.
    pub rate_limit: Option<u64>,
    /// Where to report progress; cancel through it.
    pub progress: Option<Arc<Progress>>,
}

impl CommitOptions {
    /// Commit into the backing file and empty the overlay, with `open`'s settings.
    pub fn new(open: OpenOptions) -> CommitOptions {
        CommitOptions {
            open,
            base: None,
            keep_overlay: false,
            rate_limit: None,
            progress: None,
        }
    }
}

/// Commit the overlay at `overlay` into its base (see the module docs).
///
/// Fails without changing anything when the overlay has no backing file or the base is not
/// in its chain. Cancel through [`CommitOptions::progress`] or by dropping the future: the
/// work stops at its next 1 MiB step and closes its images (the base then holds part of the
/// overlay's data; the overlay is unchanged).
///
/// ```no_run
/// # async fn demo() -> qcow2_engine::Result<()> {
/// use qcow2_engine::image::OpenOptions;
/// use qcow2_engine::ops::commit::{CommitOptions, commit};
/// commit("overlay.qcow2", &CommitOptions::new(OpenOptions::new())).await?;
/// # Ok(()) }
/// ```
pub async fn commit(overlay: impl AsRef<Path>, opts: &CommitOptions) -> Result<()> {
    let overlay = overlay.as_ref().to_path_buf();
    let opts = opts.clone();
    let progress = opts.progress.clone().unwrap_or_default();
    Job::new(progress.clone(), async move {
        run(&overlay, &opts, &progress).await
    })
    .await
}

/// Blocking [`commit`], for callers without an async runtime (cancel through the progress).
#[cfg(feature = "blocking")]
pub fn commit_blocking(overlay: impl AsRef<Path>, opts: &CommitOptions) -> Result<()> {
    crate::blocking::run(commit(overlay, opts))
}

async fn run(overlay: &Path, opts: &CommitOptions, progress: &Progress) -> Result<()> {
    let chain = backing_layers(overlay, &opts.open).await?;
    let depth = base_depth(overlay, &chain, opts.base.as_deref())?;
    let empty = !opts.keep_overlay && opts.base.is_none();
    let base = Target::open(&chain[depth], &opts.open).await?;
    let copied = copy_into_base(overlay, &chain[..depth], &base, (opts, empty), progress).await;
    let closed = base.close().await;
    let top = copied?;
    closed?;
    if let Some(top) = top {
        // The base is on disk (closed = flushed): now the overlay may drop its copy.
        let emptied = top.make_empty().await;
        let closed = top.close().await;
        emptied?;
        closed?;
    }
    Ok(())
}

/// Open the layers above the base, copy, flush the base. Returns the overlay, still open
/// read-write, when it is to be emptied.
async fn copy_into_base(
    overlay: &Path,
    between: &[Layer],
    base: &Target,
    (opts, empty): (&CommitOptions, bool),
    progress: &Progress,
) -> Result<Option<Image>> {
    let mut layers = vec![open_alone(overlay, &opts.open, empty).await?];
    for l in between {
        layers.push(open_alone(&l.path, &opts.open, false).await?);
    }
    let copied = copy_layers(&layers, base, opts.rate_limit, progress).await;
    let flushed = match copied {
        Ok(()) => base.flush().await,
        Err(e) => Err(e),
    };
    let top = layers.remove(0);
    for l in layers {
        l.close().await?;
    }
    match flushed {
        Ok(()) if empty => Ok(Some(top)),
        Ok(()) => top.close().await.map(|()| None),
        Err(e) => {
            top.close().await?;
            Err(e)
        }
    }
}

/// Index in `chain` of the base: `base` (by path), else the backing file.
fn base_depth(overlay: &Path, chain: &[Layer], base: Option<&Path>) -> Result<usize> {
    if chain.is_empty() {
        return Err(Error::invalid_arg("Image does not have a backing file"));
    }
    let Some(base) = base else { return Ok(0) };
    let wanted = std::fs::canonicalize(base).ok();
    chain
        .iter()
        .position(|l| wanted.is_some() && std::fs::canonicalize(&l.path).ok() == wanted)
        .ok_or_else(|| {
            Error::invalid_arg(format!(
                "Did not find '{}' in the backing chain of '{}'",
                base.display(),
                overlay.display()
            ))
        })
}

/// Where a piece of the committed range comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Source {
    /// Data of layer `n` (0 = the overlay).
    Layer(usize),
    /// Zeros (a zero cluster, or past the end of a shorter layer).
    Zero,
}

/// Copy what `layers` (overlay first) allocate into `base`, chunk by chunk.
async fn copy_layers(
    layers: &[Image],
    base: &Target,
    rate: Option<u64>,
    progress: &Progress,
) -> Result<()> {
    let size = layers[0].virtual_size();
    base.grow_to(size).await?;
    progress.set_total(size);
    let mut throttle = Throttle::new(rate);
    let mut off = 0;
    while off < size {
        progress.check()?;
        let n = CHUNK.min(size - off);
        for (start, len, src) in resolve(layers, off, n).await? {
            write_piece(layers, base, (start, len), src).await?;
            throttle.account(len).await;
        }
        progress.advance(n);
        off += n;
    }
    Ok(())
}

/// Which layer provides each piece of `[off, off + len)`; pieces no layer allocates are
/// left out.
async fn resolve(layers: &[Image], off: u64, len: u64) -> Result<Vec<(u64, u64, Source)>> {
    let mut out = Vec::new();
    let mut pending = vec![(off, len)];
    for (i, img) in layers.iter().enumerate() {
        let mut below = Vec::new();
        for (start, n) in pending {
            let inside = img.virtual_size().saturating_sub(start).min(n);
            if inside < n {
                out.push((start + inside, n - inside, Source::Zero));
            }
            if inside == 0 {
                continue;
            }
            for e in img.map(start, inside).await? {
                match (e.present, e.zero) {
                    (false, _) => below.push((e.start, e.length)),
                    (true, true) => out.push((e.start, e.length, Source::Zero)),
                    (true, false) => out.push((e.start, e.length, Source::Layer(i))),
                }
            }
        }
        pending = below;
    }
    out.sort_unstable_by_key(|p| p.0);
    Ok(out)
}

async fn write_piece(
    layers: &[Image],
    base: &Target,
    (off, len): (u64, u64),
    src: Source,
) -> Result<()> {
    match src {
        Source::Zero => base.write_zeroes(off, len).await,
        Source::Layer(i) => {
            let mut buf = vec![0u8; to_usize(len)];
            layers[i].read_at(&mut buf, off).await?;
            base.write_at(&buf, off).await
        }
    }
}
