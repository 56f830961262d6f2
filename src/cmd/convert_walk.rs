//! The walk of `qcow2 convert` over the allocation status of its sources, as qemu-img walks
//! it: up to 1 GiB at a time and never across the end of a source.
//!
//! When a status request fails, qemu-img retries it on a quarter of the range, down to one
//! 512-byte sector. Without `--salvage` a failing sector ends the convert ("error while
//! reading block status at offset N"); with it, the sector is reported as a warning and then
//! read as data (its read may fail too, and is salvaged like any read). qemu-img walks the map
//! twice with `--salvage` (once to count the work, once to copy), so each of these warnings is
//! printed twice: `warn_unreadable` is the first walk.

use anyhow::{Result, bail};
use qcow2_engine::image::Extent;

use super::convert_sources::{SECTOR, Sources, strerror};

/// The most a status request covers.
const WINDOW: u64 = 1 << 30;

/// What one step of the walk found.
pub enum Step {
    /// The status of the next range.
    Extents(Vec<Extent>),
    /// One sector whose status could not be read (only with salvage): its offset in the
    /// concatenation and qemu-img's warning.
    Unreadable { start: u64, warning: String },
}

/// A walk over `src`'s status, from offset 0.
pub struct Walk<'a> {
    src: &'a Sources,
    pos: u64,
    salvage: bool,
}

impl<'a> Walk<'a> {
    /// Start at offset 0; `salvage` turns status errors into [`Step::Unreadable`].
    pub fn new(src: &'a Sources, salvage: bool) -> Self {
        Walk {
            src,
            pos: 0,
            salvage,
        }
    }

    /// The next step, or `None` at the end.
    pub async fn next(&mut self) -> Result<Option<Step>> {
        let Some((disk, at)) = self.src.locate(self.pos) else {
            return Ok(None);
        };
        let mut n = (disk.size() - at).min(WINDOW);
        loop {
            match disk.map(at, n).await {
                Ok(mut extents) => {
                    for e in &mut extents {
                        e.start = e.start - at + self.pos;
                    }
                    self.pos += n;
                    return Ok(Some(Step::Extents(extents)));
                }
                Err(_) if n > SECTOR => n = (n / SECTOR).div_ceil(4) * SECTOR,
                Err(e) => {
                    let what = format!(
                        "error while reading block status at offset {at}: {}",
                        strerror(&e)
                    );
                    if !self.salvage {
                        bail!(what);
                    }
                    let start = self.pos;
                    self.pos += SECTOR;
                    return Ok(Some(Step::Unreadable {
                        start,
                        warning: what,
                    }));
                }
            }
        }
    }
}

/// qemu-img's first walk with `--salvage`: print the warning of every sector whose status
/// cannot be read (unless `quiet`).
pub async fn warn_unreadable(src: &Sources, quiet: bool) -> Result<()> {
    let mut walk = Walk::new(src, true);
    while let Some(step) = walk.next().await? {
        if let (Step::Unreadable { warning, .. }, false) = (step, quiet) {
            errln!("qcow2: warning: {warning}");
        }
    }
    Ok(())
}
