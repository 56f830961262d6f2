//! `qcow2 convert -c`: every destination cluster holding non-zero data is written compressed.
//!
//! The source map tells which ranges can hold data; each destination cluster touching such a
//! range is read whole (zeros past the data) and, unless it is all zeros, handed to
//! `Image::write_compressed`. A few clusters are in flight at once so that compression (CPU)
//! and IO of different clusters overlap on the multi-threaded runtime.

use anyhow::Result;
use tokio::task::JoinSet;

use super::convert::{is_zero, show_progress};
use crate::disk::Disk;

/// Clusters compressed concurrently (QEMU's convert also runs 8 requests at once).
const IN_FLIGHT: usize = 8;

/// Copy the data of `src` into the qcow2 `dst`, compressed.
pub async fn copy(src: &Disk, dst: &Disk, progress: bool) -> Result<()> {
    let Disk::Qcow2(img) = dst else {
        anyhow::bail!("compressed output needs a qcow2 destination");
    };
    let (size, cs) = (src.size(), img.cluster_size());
    let mut tasks = JoinSet::new();
    // The next cluster not yet queued: extents sharing a cluster queue it once.
    let mut next = 0u64;
    let mut off = 0;
    while off < size {
        let window = (size - off).min(1 << 30);
        for e in src.map(off, window).await? {
            if !e.zero {
                let first = (e.start / cs).max(next);
                let last = (e.start + e.length - 1) / cs;
                for c in first..=last {
                    if tasks.len() >= IN_FLIGHT {
                        tasks.join_next().await.expect("non-empty")??;
                    }
                    let (src, dst) = (src.clone(), dst.clone());
                    tasks.spawn(async move { one_cluster(&src, &dst, c * cs, cs).await });
                }
                next = next.max(last + 1);
            }
            show_progress(progress, e.start + e.length, size);
        }
        off += window;
    }
    while let Some(r) = tasks.join_next().await {
        r??;
    }
    if progress {
        outln!();
    }
    Ok(())
}

/// Copy the cluster at `start` (clipped to the disk's end), compressed unless all zeros.
async fn one_cluster(src: &Disk, dst: &Disk, start: u64, cs: u64) -> Result<()> {
    let len = cs.min(src.size() - start);
    let mut buf = vec![0u8; len as usize];
    src.read_at(&mut buf, start).await?;
    if !is_zero(&buf) {
        dst.write_compressed(&buf, start).await?;
    }
    Ok(())
}
