//! `qcow2 convert -c`: every destination cluster holding non-zero data is written compressed.
//!
//! The source map tells which ranges can hold data; the destination clusters touching such a
//! range are read in chunks of up to [`CHUNK_CLUSTERS`] whole clusters (zeros past the data),
//! and each chunk's non-zero clusters are compressed on a blocking thread
//! (`Image::compress_cluster`), up to `-m` chunks at once, so compression uses every core.
//! The compressed clusters are then written in source order (`Image::write_compressed_cluster`),
//! so the output is the same whatever `-m` is; with `-W` each chunk writes as soon as it is
//! compressed.

use anyhow::{Result, bail};
use qcow2_engine::image::{CompressedCluster, Image};

use super::convert::show_progress;
use super::convert_pipe::{Parallel, Pipeline, is_zero};
use crate::disk::Disk;

/// Clusters read and compressed together (one task, one read).
const CHUNK_CLUSTERS: u64 = 16;

/// Copy the data of `src` into the qcow2 `dst`, compressed.
pub async fn copy(src: &Disk, dst: &Disk, progress: bool, par: Parallel) -> Result<()> {
    let Disk::Qcow2(img) = dst else {
        bail!("compressed output needs a qcow2 destination");
    };
    let (size, cs) = (src.size(), img.cluster_size());
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
                    let n = (last + 1 - c).min(CHUNK_CLUSTERS);
                    let start = c * cs;
                    let len = (n * cs).min(size - start);
                    let job = chunk(src.clone(), img.clone(), (start, len), par.unordered);
                    if let Some(done) = pipe.push(job).await? {
                        write_all(img, done).await?;
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
        write_all(img, done).await?;
    }
    if progress {
        outln!();
    }
    Ok(())
}

/// Read `[start, start + len)` (whole clusters, or up to the disk's end) and compress its
/// non-zero clusters; with `write_now`, also write them (and return nothing).
async fn chunk(
    src: Disk,
    img: Image,
    (start, len): (u64, u64),
    write_now: bool,
) -> Result<Vec<CompressedCluster>> {
    let mut buf = vec![0u8; usize::try_from(len)?];
    src.read_at(&mut buf, start).await?;
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
    if write_now {
        write_all(&img, clusters).await?;
        return Ok(Vec::new());
    }
    Ok(clusters)
}

/// Write compressed clusters in their order.
async fn write_all(img: &Image, clusters: Vec<CompressedCluster>) -> Result<()> {
    for c in clusters {
        img.write_compressed_cluster(c).await?;
    }
    Ok(())
}
