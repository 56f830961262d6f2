//! Persistent dirty bitmaps of an image opened read-write (qcow2.txt, "Bitmaps"; QEMU's
//! `docs/interop/bitmaps.rst`).
//!
//! ```text
//!  open   read the directory, load every bitmap not in_use; write the directory back in
//!         place with in_use set on the enabled (auto) ones + fsync   (before any guest write)
//!  write  every write, write-zeroes and discard sets its range's bits in the enabled
//!         bitmaps (memory only)
//!  change an API call that changes a bitmap not yet in_use marks it in_use on disk first
//!  close  new data clusters + new tables + new directory, refcounts → fsync
//!         header extension (points at the new directory, in_use clear) → fsync
//!         old tables, data clusters and directory freed
//! ```
//! A crash before the header switch leaves the old directory, whose bitmaps we changed are
//! marked in_use (= inconsistent, QEMU's semantics), and leaks the new clusters; after it,
//! it leaks the old ones. Bitmaps found in_use at open (an earlier crash) are never loaded:
//! they are carried through unchanged, still in_use. Read-only opens change nothing.

mod api;
mod dirty;
mod load;
mod store;

pub use api::{BitmapInfo, list_bitmaps};
pub(crate) use dirty::DirtyBits;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use crate::format::bitmap::BitmapEntry;

/// One bitmap of a writable image.
#[derive(Debug)]
pub(crate) struct Tracked {
    /// The directory entry; for a bitmap we own, the flags we will store.
    pub entry: BitmapEntry,
    /// The bits; `None` for a bitmap that was in_use at open (inconsistent, carried as is).
    pub bits: Option<Arc<DirtyBits>>,
    /// Marked in_use on disk by us (or new): stored anew at close.
    pub owned: bool,
    /// Host clusters (offset, count) of its on-disk table and data, freed once stored anew.
    pub old_clusters: Vec<(u64, u64)>,
}

impl Tracked {
    /// Whether writes set its bits.
    fn enabled(&self) -> bool {
        self.bits.is_some() && self.entry.has(crate::format::bitmap::FLAG_AUTO)
    }
}

/// The bitmaps of a writable image (empty for read-only ones).
#[derive(Debug, Default)]
pub(crate) struct BitmapSet {
    /// Every bitmap, in directory order.
    list: RwLock<Vec<Tracked>>,
    /// Some bitmap is enabled (the write path's fast check).
    any_enabled: AtomicBool,
    /// The directory as on disk: (offset, size, entries); `None` without one.
    on_disk: Mutex<Option<(u64, u64, Vec<BitmapEntry>)>>,
    /// Clusters of removed bitmaps, freed once the directory without them is on disk.
    removed: Mutex<Vec<(u64, u64)>>,
    /// The directory must be written at close (something was added, removed or owned).
    changed: AtomicBool,
}

impl BitmapSet {
    /// Set the bits of guest range `[offset, offset + len)` in every enabled bitmap.
    pub fn mark(&self, offset: u64, len: u64) {
        if len == 0 || !self.any_enabled.load(Ordering::Acquire) {
            return;
        }
        let list = self.list.read().unwrap_or_else(|p| p.into_inner());
        for t in list.iter().filter(|t| t.enabled()) {
            if let Some(bits) = &t.bits {
                let g = t.entry.granularity_bits;
                let end = offset.saturating_add(len);
                bits.set_range(offset >> g, end.div_ceil(1u64 << g));
            }
        }
    }

    /// Recompute `any_enabled` after a change of the list.
    fn refresh(&self, list: &[Tracked]) {
        let any = list.iter().any(Tracked::enabled);
        self.any_enabled.store(any, Ordering::Release);
    }
}

impl BitmapSet {
    /// Follow a new virtual size: every bitmap gets as many bits (new ones clear).
    pub fn resize(&self, virtual_size: u64) {
        let list = self.list.read().unwrap_or_else(|p| p.into_inner());
        for t in list.iter() {
            if let Some(bits) = &t.bits {
                bits.resize(virtual_size.div_ceil(t.entry.granularity()));
            }
        }
    }
}

impl crate::image::Image {
    /// Before a resize: refuse while a bitmap is inconsistent (its table could not follow
    /// the new size), and mark every other one in_use (they all change size).
    pub(crate) async fn bitmaps_before_resize(&self) -> crate::error::Result<()> {
        let names: Vec<String> = {
            let list = self
                .inner
                .bitmaps
                .list
                .read()
                .unwrap_or_else(|p| p.into_inner());
            if let Some(t) = list.iter().find(|t| t.bits.is_none()) {
                return Err(crate::error::Error::unsupported(format!(
                    "cannot resize an image whose bitmap '{}' is inconsistent (remove it first)",
                    t.entry.name
                )));
            }
            list.iter().map(|t| t.entry.name.clone()).collect()
        };
        self.own_bitmaps(&names).await
    }
}
