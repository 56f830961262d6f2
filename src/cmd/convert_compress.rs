//! `qcow2 convert -c`: every destination cluster holding non-zero data is written compressed.
//!
//! The source map tells which ranges can hold data; the destination clusters touching such a
//! range are read in chunks of whole clusters ([`CHUNK_BYTES`], or one larger cluster; zeros
//! past the data), and each chunk's non-zero clusters are compressed on a blocking thread
//! (`Image::compress_run`), up to `-m` chunks at once, so compression uses every core.
//! The chunks are then written in source order (`Image::write_compressed_run`: a few IOs per
//! chunk, not one per cluster), so the output is the same whatever `-m` is; with `-W` each
//! chunk writes as soon as it is compressed.

use std::sync::{Arc, Mutex};

use anyhow::{Result, bail};
use qcow2_engine::image::{CompressedRun, Image};

use super::convert::show_progress;
use super::convert_pipe::{Parallel, Pipeline, is_zero};
use crate::disk::Disk;

/// Bytes read and compressed together (one task, one read), unless a cluster is larger.
const CHUNK_BYTES: u64 = 2 << 20;
/// Chunk buffers kept for reuse beyond those in flight.
const SPARE_BUFFERS: usize = 4;

/// Copy the data of `src` into the qcow2 `dst`, compressed.
pub async fn copy(src: &Disk, dst: &Disk, progress: bool, par: Parallel) -> Result<()> {
    let Disk::Qcow2(img) = dst else {
        bail!("compressed output needs a qcow2 destination");
    };
    let (size, cs) = (src.size(), img.cluster_size());
    let per_chunk = (CHUNK_BYTES / cs).max(1);
    let bufs = Buffers::default();
    let mut pipe = Pipeline::new(par.requests);
    // The next cluster not yet queued: extents sharing a cluster queue it once.
    let mut next = 0u64;
    let mut off = 0;
    while off < size {
        let window = (size - off).min(1 << 30);
        for e in src.map(off, window).await? {
            if !e.zero {
                let last = (e.start + e.length - 1) / cs;
                let mut c = (e.start / cs).max(next);
                while c <= last {
                    let n = (last + 1 - c).min(per_chunk);
                    let start = c * cs;
                    let len = (n * cs).min(size - start);
                    let (disks, b) = ((src.clone(), img.clone()), bufs.clone());
                    let job = chunk(disks, (start, len), b, par.unordered);
                    if let Some(done) = pipe.push(job).await? {
                        write_all(img, done, &bufs).await?;
                    }
                    c += n;
                }
                next = next.max(last + 1);
            }
            show_progress(progress, e.start + e.length, size);
        }
        off += window;
    }
    while let Some(done) = pipe.next().await? {
        write_all(img, done, &bufs).await?;
    }
    if progress {
        outln!();
    }
    Ok(())
}

/// Read `[start, start + len)` (whole clusters, or up to the disk's end) and compress its
/// non-zero clusters; with `write_now`, also write them (and return nothing).
async fn chunk(
    (src, img): (Disk, Image),
    (start, len): (u64, u64),
    bufs: Buffers,
    write_now: bool,
) -> Result<Option<CompressedRun>> {
    let mut buf = bufs.take(usize::try_from(len)?);
    src.read_at(&mut buf, start).await?;
    let worker = img.clone();
    // All-zero clusters stay unallocated, as qemu-img leaves them.
    let run = tokio::task::spawn_blocking(move || worker.compress_run(buf, start, |c| !is_zero(c)))
        .await??;
    if write_now {
        write_all(&img, Some(run), &bufs).await?;
        return Ok(None);
    }
    Ok(Some(run))
}

/// Write a compressed chunk (nothing when it was written as soon as it was ready), and keep
/// its buffer for a later chunk.
async fn write_all(img: &Image, run: Option<CompressedRun>, bufs: &Buffers) -> Result<()> {
    if let Some(run) = run {
        bufs.give(img.write_compressed_run(run).await?);
    }
    Ok(())
}

/// Chunk buffers to reuse: a fresh 2 MiB buffer per chunk would cost page faults and clearing.
#[derive(Clone, Default)]
struct Buffers(Arc<Mutex<Vec<Vec<u8>>>>);

impl Buffers {
    /// A buffer of `len` bytes; a reused one still holds an older chunk's bytes (the caller
    /// reads over all of them).
    fn take(&self, len: usize) -> Vec<u8> {
        let mut b = self.spares().pop().unwrap_or_default();
        b.resize(len, 0);
        b
    }

    /// Keep `b` for a later chunk (up to a few spares).
    fn give(&self, b: Vec<u8>) {
        let mut spares = self.spares();
        if spares.len() < SPARE_BUFFERS {
            spares.push(b);
        }
    }

    fn spares(&self) -> std::sync::MutexGuard<'_, Vec<Vec<u8>>> {
        // A panic elsewhere cannot leave the list of buffers inconsistent.
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }
}
