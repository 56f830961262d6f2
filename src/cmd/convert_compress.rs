//! `qcow2 convert -c`: every destination cluster holding non-zero data is written compressed.
//!
//! The source map tells which ranges can hold data; the destination clusters touching such a
//! range are read in chunks of up to [`CHUNK_CLUSTERS`] whole clusters (zeros past the data),
//! and each chunk's non-zero clusters are compressed on a blocking thread
//! (`Image::compress_cluster`), up to `-m` chunks at once, so compression uses every core.
//! The compressed clusters are then written in source order (`Image::write_compressed_cluster`),
//! so the output is the same whatever `-m` is; with `-W` each chunk writes as soon as it is
//! compressed. `-r` paces the writes (each cluster counts in full, as qemu-img counts it);
//! `--salvage` reads as `convert_copy.rs` does, a sector whose status is unreadable counting
//! as data.

use std::sync::Arc;

use anyhow::{Result, anyhow, bail};
use qcow2_engine::image::{CompressedCluster, Image};
use qcow2_engine::ops::Throttle;
use tokio::sync::Mutex;

use super::convert::show_progress;
use super::convert_copy::Copy;
use super::convert_pipe::{Pipeline, is_zero};
use super::convert_sources::{SECTOR, Sources, strerror};
use super::convert_walk::{Step, Walk};
use crate::disk::Disk;

/// Clusters read and compressed together (one task, one read).
const CHUNK_CLUSTERS: u64 = 16;

/// Copy the data of `src` into the qcow2 `dst`, compressed.
pub async fn copy(src: &Sources, dst: &Disk, c: &Copy) -> Result<()> {
    let Disk::Qcow2(img) = dst else {
        bail!("compressed output needs a qcow2 destination");
    };
    let (size, cs) = (src.size(), img.cluster_size());
    let mut pipe = Pipeline::new(c.par.requests);
    let mut out = Out {
        img,
        throttle: c.throttle.clone(),
    };
    // The next cluster not yet queued: extents sharing a cluster queue it once.
    let mut next = 0u64;
    let mut walk = Walk::new(src, c.salvage);
    while let Some(step) = walk.next().await? {
        for (start, length) in data_ranges(step, c.quiet) {
            let last = (start + length - 1) / cs;
            let mut cl = (start / cs).max(next);
            while cl <= last {
                let n = (last + 1 - cl).min(CHUNK_CLUSTERS);
                let at = cl * cs;
                let len = (n * cs).min(size - at);
                let job = chunk(src.clone(), img.clone(), (at, len), c.clone());
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
/// non-zero clusters; with `write_now`, also write them (and return nothing).
async fn chunk(
    src: Sources,
    img: Image,
    (start, len): (u64, u64),
    c: Copy,
) -> Result<Vec<CompressedCluster>> {
    let mut buf = vec![0u8; usize::try_from(len)?];
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
    let cs = usize::try_from(img.cluster_size())?;
    let worker = img.clone();
    let clusters = tokio::task::spawn_blocking(move || -> Result<Vec<CompressedCluster>> {
        let mut out = Vec::new();
        for (i, data) in buf.chunks(cs).enumerate() {
            if !is_zero(data) {
                out.push(worker.compress_cluster(data, start + (i * cs) as u64)?);
            }
        }
        Ok(out)
    })
    .await??;
    if c.par.unordered {
        let mut out = Out {
            img: &img,
            throttle: c.throttle.clone(),
        };
        out.write(clusters).await?;
        return Ok(Vec::new());
    }
    Ok(clusters)
}

/// The writing end: the destination and the rate limit.
struct Out<'a> {
    img: &'a Image,
    throttle: Arc<Mutex<Throttle>>,
}

impl Out<'_> {
    /// Write compressed clusters in their order, within the rate limit.
    async fn write(&mut self, clusters: Vec<CompressedCluster>) -> Result<()> {
        if clusters.is_empty() {
            return Ok(());
        }
        let bytes = clusters.len() as u64 * self.img.cluster_size();
        self.throttle.lock().await.admit(bytes).await;
        for c in clusters {
            self.img.write_compressed_cluster(c).await?;
        }
        Ok(())
    }
}
