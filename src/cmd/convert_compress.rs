//! `qcow2 convert -c`: every destination cluster holding non-zero data is written compressed.
//!
//! The source map tells which ranges can hold data; the destination clusters touching such a
//! range are read in chunks of whole clusters ([`CHUNK_BYTES`], or one larger cluster; zeros
//! past the data), and each chunk's non-zero clusters are compressed on a blocking thread
//! (`Image::compress_run`), up to `-m` chunks at once, so compression uses every core.
//! The chunks are then written in source order (`Image::write_compressed_run`: a few IOs per
//! chunk, not one per cluster), so the output is the same whatever `-m` is; with `-W` each
//! chunk writes as soon as it is compressed. `-r` paces the writes (each cluster counts in full, as qemu-img counts it);
//! `--salvage` reads as `convert_copy.rs` does, a sector whose status is unreadable counting
//! as data.

use std::sync::Arc;

use anyhow::{Result, anyhow, bail};
use qcow2_engine::image::{CompressedRun, Image};
use qcow2_engine::ops::Throttle;
use tokio::sync::Mutex;

use super::convert::show_progress;
use super::convert_copy::Copy;
use super::convert_pipe::{Pipeline, is_zero};
use super::convert_sources::{SECTOR, Sources, strerror};
use super::convert_walk::{Step, Walk};
use crate::disk::Disk;

/// Bytes read and compressed together (one task, one read), unless a cluster is larger.
const CHUNK_BYTES: u64 = 2 << 20;
/// Chunk buffers kept for reuse beyond those in flight.
const SPARE_BUFFERS: usize = 4;

/// Copy the data of `src` into the qcow2 `dst`, compressed.
pub async fn copy(src: &Sources, dst: &Disk, c: &Copy) -> Result<()> {
    let Disk::Qcow2(img) = dst else {
        bail!("compressed output needs a qcow2 destination");
    };
    let (size, cs) = (src.size(), img.cluster_size());
    let mut pipe = Pipeline::new(c.par.requests);
    let per_chunk = (CHUNK_BYTES / cs).max(1);
    let bufs = Buffers::default();
    let mut out = Out {
        img,
        throttle: c.throttle.clone(),
        bufs: bufs.clone(),
    };
    // The next cluster not yet queued: extents sharing a cluster queue it once.
    let mut next = 0u64;
    let mut walk = Walk::new(src, c.salvage);
    while let Some(step) = walk.next().await? {
        for (start, length) in data_ranges(step, c.quiet) {
            let last = (start + length - 1) / cs;
            let mut cl = (start / cs).max(next);
            while cl <= last {
                let n = (last + 1 - cl).min(per_chunk);
                let at = cl * cs;
                let len = (n * cs).min(size - at);
                let job = chunk(
                    src.clone(),
                    img.clone(),
                    (at, len),
                    (c.clone(), bufs.clone()),
                );
                if let Some(done) = pipe.push(job).await? {
                    out.write(done).await?;
                }
                cl += n;
            }
            next = next.max(last + 1);
            show_progress(c.progress, start + length, size);
        }
    }
    while let Some(done) = pipe.next().await? {
        out.write(done).await?;
    }
    if c.progress {
        outln!();
    }
    Ok(())
}

/// The ranges of one walk step that may hold data; an unreadable sector counts as data (its
/// warning is printed here).
fn data_ranges(step: Step, quiet: bool) -> Vec<(u64, u64)> {
    match step {
        Step::Extents(v) => v
            .into_iter()
            .filter(|e| !e.zero)
            .map(|e| (e.start, e.length))
            .collect(),
        Step::Unreadable { start, warning } => {
            if !quiet {
                errln!("qcow2: warning: {warning}");
            }
            vec![(start, SECTOR)]
        }
    }
}

/// Read `[start, start + len)` (whole clusters, or up to the disk's end) and compress its
/// non-zero clusters; with `-W` (unordered), also write them (and return nothing).
async fn chunk(
    src: Sources,
    img: Image,
    (start, len): (u64, u64),
    (c, bufs): (Copy, Buffers),
) -> Result<Option<CompressedRun>> {
    let mut buf = bufs.take(usize::try_from(len)?);
    if c.salvage {
        for w in src.read_salvaging(&mut buf, start).await? {
            if !c.quiet {
                errln!("qcow2: warning: {w}");
            }
        }
    } else if let Err(e) = src.read_at(&mut buf, start).await {
        return Err(anyhow!(
            "error while reading at byte {start}: {}",
            strerror(&e)
        ));
    }
    let worker = img.clone();
    // All-zero clusters stay unallocated, as qemu-img leaves them.
    let run = tokio::task::spawn_blocking(move || worker.compress_run(buf, start, |d| !is_zero(d)))
        .await??;
    if c.par.unordered {
        let mut out = Out {
            img: &img,
            throttle: c.throttle.clone(),
            bufs,
        };
        out.write(Some(run)).await?;
        return Ok(None);
    }
    Ok(Some(run))
}

/// The writing end: the destination, the rate limit and the buffers to hand back.
struct Out<'a> {
    img: &'a Image,
    throttle: Arc<Mutex<Throttle>>,
    bufs: Buffers,
}

impl Out<'_> {
    /// Write a compressed chunk (nothing when it was written as soon as it was ready) within
    /// the rate limit (each stored cluster counts in full, as qemu-img counts it), and keep its
    /// buffer for a later chunk.
    async fn write(&mut self, run: Option<CompressedRun>) -> Result<()> {
        let Some(run) = run else {
            return Ok(());
        };
        // qemu-img writes (and throttles) compressed clusters one by one, each waiting for
        // those before it; waiting for all but the chunk's last cluster gives the same pace
        // with at most two sleeps per chunk.
        let (n, cs) = (run.stored_clusters() as u64, self.img.cluster_size());
        if n > 0 {
            let mut throttle = self.throttle.lock().await;
            throttle.admit((n - 1) * cs).await;
            throttle.admit(cs).await;
        }
        self.bufs.give(self.img.write_compressed_run(run).await?);
        Ok(())
    }
}

/// Chunk buffers to reuse: a fresh 2 MiB buffer per chunk would cost page faults and clearing.
#[derive(Clone, Default)]
struct Buffers(Arc<std::sync::Mutex<Vec<Vec<u8>>>>);

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
