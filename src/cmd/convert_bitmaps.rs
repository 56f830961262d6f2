//! `qcow2 convert --bitmaps [--skip-broken-bitmaps]`: copy the source's persistent bitmaps
//! into the destination after the data (so the copy itself dirties nothing), with
//! qemu-img's rules: qcow2 to qcow2 only; an inconsistent (in-use) bitmap fails the convert
//! before anything is written, unless `--skip-broken-bitmaps` skips it with a warning.

use anyhow::{Result, anyhow, bail};
use qcow2_engine::image::{BitmapInfo, Image};

use crate::disk::Disk;

/// The bitmaps to copy, in directory order, checked before the destination is created.
/// QEMU checks them newest first, so its messages name the last one first: so do we.
pub async fn plan(src: &Disk, output_format: &str, skip_broken: bool) -> Result<Vec<BitmapInfo>> {
    if output_format != "qcow2" {
        bail!("Format driver '{output_format}' does not support bitmaps");
    }
    let Disk::Qcow2(img) = src else {
        bail!("Source lacks bitmap support");
    };
    let mut out = Vec::new();
    for b in img.bitmaps().await?.into_iter().rev() {
        match (b.in_use, skip_broken) {
            (false, _) => out.push(b),
            (true, true) => errln!("qcow2: warning: Skipping inconsistent bitmap '{}'", b.name),
            (true, false) => bail!(
                "Cannot copy inconsistent bitmap '{}' Try --skip-broken-bitmaps, or use \
                 'qemu-img bitmap --remove' to delete it",
                b.name
            ),
        }
    }
    // QEMU's destination lists them in the source's order.
    out.reverse();
    Ok(out)
}

/// Create each bitmap in `dst` (same granularity and enabled state) and merge its bits.
pub async fn copy(src: &Disk, dst: &Disk, list: &[BitmapInfo]) -> Result<()> {
    let (Disk::Qcow2(from), Disk::Qcow2(to)) = (src, dst) else {
        return Ok(());
    };
    for b in list {
        copy_one(from, to, b)
            .await
            .map_err(|e| anyhow!("Failed to populate bitmap {}: {}", b.name, e.what()))?;
    }
    Ok(())
}

async fn copy_one(from: &Image, to: &Image, b: &BitmapInfo) -> qcow2_engine::Result<()> {
    to.add_bitmap(&b.name, Some(b.granularity), !b.auto).await?;
    to.merge_bitmap(&b.name, from, &b.name).await
}
