//! `qcow2 convert`: copy an image's content into a new raw or qcow2 image.
//!
//! Only data is copied: ranges the source map reports as zero are skipped, and within data
//! ranges all-zero 4 KiB blocks are skipped too, so the destination stays sparse (holes in a
//! raw file, unallocated clusters in a qcow2 image). With `-c` (qcow2 only) every cluster
//! holding data is written compressed (`convert_compress.rs`).

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{Context, Result, bail};
use qcow2_engine::Storage;
use qcow2_engine::storage::{FileStorage, LockRequest};

use crate::access::Access;
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

/// Bytes read from the source at a time.
const CHUNK: u64 = 1 << 20;
/// Granularity of zero detection.
const BLOCK: usize = 4096;

/// Run `qcow2 convert`.
pub async fn run(a: Args) -> Result<u8> {
    if a.compress && a.output_format != "qcow2" {
        bail!("compressed output (-c) needs -O qcow2");
    }
    if a.options.is_some() && a.output_format != "qcow2" {
        bail!("-o is only supported with -O qcow2");
    }
    let src = Disk::open(&a.src, a.format.as_deref(), false, &a.access).await?;
    let size = src.size();
    let dst = match a.output_format.as_str() {
        "raw" => create_raw(&a.dst, size).await?,
        "qcow2" => {
            super::create::create_qcow2(&a.dst, size, a.options.as_deref()).await?;
            Disk::Qcow2(open_qcow2(&a.dst, true, &Access::default()).await?)
        }
        f => bail!("unsupported output format '{f}' (raw or qcow2)"),
    };
    let progress = a.progress && !a.quiet;
    let copied = if a.compress {
        super::convert_compress::copy(&src, &dst, progress).await
    } else {
        copy(&src, &dst, progress).await
    };
    let closed = dst.close().await;
    copied?;
    closed.with_context(|| format!("closing '{}'", a.dst.display()))?;
    Ok(0)
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

/// Copy every data range of `src` to `dst`.
async fn copy(src: &Disk, dst: &Disk, progress: bool) -> Result<()> {
    let size = src.size();
    let mut off = 0;
    let mut buf = vec![0u8; CHUNK as usize];
    while off < size {
        let window = (size - off).min(1 << 30);
        for e in src.map(off, window).await? {
            if !e.zero {
                copy_range(src, dst, e.start, e.length, &mut buf).await?;
            }
            show_progress(progress, e.start + e.length, size);
        }
        off += window;
    }
    if progress {
        outln!();
    }
    Ok(())
}

/// Copy `[start, start + len)`, skipping all-zero blocks.
async fn copy_range(src: &Disk, dst: &Disk, start: u64, len: u64, buf: &mut [u8]) -> Result<()> {
    let mut off = start;
    while off < start + len {
        let n = (start + len - off).min(buf.len() as u64) as usize;
        let chunk = &mut buf[..n];
        src.read_at(chunk, off).await?;
        let mut i = 0;
        while i < n {
            let run_start = i;
            while i < n && !is_zero(&chunk[i..(i + BLOCK).min(n)]) {
                i = (i + BLOCK).min(n);
            }
            if i > run_start {
                dst.write_at(&chunk[run_start..i], off + run_start as u64)
                    .await?;
            }
            while i < n && is_zero(&chunk[i..(i + BLOCK).min(n)]) {
                i = (i + BLOCK).min(n);
            }
        }
        off += n as u64;
    }
    Ok(())
}

pub(super) fn is_zero(b: &[u8]) -> bool {
    b.iter().all(|&x| x == 0)
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
