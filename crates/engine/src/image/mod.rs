//! A qcow2 image: open, the read path, the write path, zero/discard, flush, resize.
//!
//! [`Image`] is a cheap handle (`Clone` shares the same open image) whose methods all take
//! `&self`, so any number of requests can be in flight from many tasks and threads.
//!
//! Every future is cancel-safe (DESIGN.md §5c): dropping a mutating one after it started
//! hands the rest of its work to a background task (`crate::detach`), so it never loses
//! metadata a flush had taken over nor leaves data IO in flight to a cluster that could be
//! freed; [`Image::close`] waits for such work.
//!
//! Locks and their nesting order: `crates/engine/LOCKS.md`.
//!
//! ```no_run
//! # async fn demo() -> qcow2_engine::Result<()> {
//! use qcow2_engine::image::{Image, OpenOptions};
//! let img = Image::open("disk.qcow2", &OpenOptions::new()).await?;
//! let mut buf = vec![0u8; 4096];
//! img.read_at(&mut buf, 0).await?;
//! # Ok(()) }
//! ```

mod backing;
mod bitmaps;
mod cluster0;
mod compress;
pub mod create;
mod encryption;
mod flush;
mod flusher;
mod frees;
mod geometry;
mod header_update;
mod l1_table;
mod l2_update;
mod lookup;
mod make_empty;
mod map;
mod open;
mod options;
mod overlap;
mod prealloc;
mod prepare;
mod probe_guard;
mod read;
mod references;
mod resize;
mod snapshot;
mod state;
mod write;
mod write_run;
mod zero;

pub use crate::cache::CacheStats;
pub use crate::storage::IoBackend;
pub(crate) use backing::open_backing;
pub use backing::{Backing, probe_format, resolve_relative};
pub use bitmaps::{BitmapInfo, list_bitmaps};
pub use cluster0::read_cluster0;
pub use compress::CompressedRun;
pub use flusher::Flusher;
pub use map::Extent;
pub use options::{BackingOverride, OpenOptions};
pub use probe_guard::check_probed_raw_write;
pub use references::ReferencePolicy;
pub use snapshot::{Snapshot, find_by_id_or_name};
pub use zero::ZeroFlags;

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use crate::cache::SliceCache;
use crate::error::{Error, ErrorKind, Result};
use crate::format::compressed::CompressionType;
use crate::format::extensions::ImageHeader;
use crate::storage::{LockRequest, Storage};
use crate::units::GuestOffset;
use geometry::Geometry;

/// An open qcow2 image.
///
/// A cheap handle: `Clone` shares the one open image, and every method takes `&self`.
///
/// Await [`Image::close`] before dropping the last handle of a writable image: there is no
/// async drop, so a plain drop neither flushes nor waits for requests in flight. What was not
/// flushed is lost as in a crash (the image stays consistent; at worst clusters leak), and
/// the image locks are released only when the last internal user lets go.
#[derive(Debug, Clone)]
#[must_use = "an opened image does nothing unless used, and a writable one must be closed"]
pub struct Image {
    inner: Arc<Inner>,
}

#[derive(Debug)]
pub(crate) struct Inner {
    /// The image file: header, metadata, and guest data unless there is a data file.
    file: Arc<dyn Storage>,
    /// Where guest data lives: the image file, or the external data file.
    data: Arc<dyn Storage>,
    /// The path the image was opened from (`None` for caller-supplied storage).
    path: Option<PathBuf>,
    /// Opened read-write (then `write` is `Some`).
    writable: bool,
    /// Cluster, L2-slice and subcluster sizes, fixed at open.
    geo: Geometry,
    /// Codec of compressed clusters (header byte 104).
    compression: CompressionType,
    /// The image is encrypted (`crypt_method` 1 or 2).
    encrypted: bool,
    /// Its unlocked data cipher; without one, data access is refused.
    #[cfg_attr(not(feature = "luks"), allow(dead_code))]
    crypto: encryption::Crypto,
    /// The in-memory header and extensions (lock 6 in LOCKS.md); written to disk only
    /// through `format::header::HeaderPatch`.
    header: Mutex<ImageHeader>,
    /// Virtual size in bytes; changes only under resize.
    size: std::sync::atomic::AtomicU64,
    /// The active L1 table and its dirty entries (locks 5 and 7 in LOCKS.md).
    l1: l1_table::L1Table,
    /// Cached L2 slices, clean and dirty.
    l2_cache: SliceCache,
    /// The opened backing chain, if any.
    backing: Option<Backing>,
    /// The external data file's path, if any.
    data_file_path: Option<PathBuf>,
    /// Freshly allocated metadata clusters not yet zeroed on disk.
    new: Arc<crate::alloc::NewClusters>,
    /// Write-side state; `None` for read-only images.
    write: Option<state::WriteState>,
    /// How often the background flusher runs (`None`: only when woken by cache pressure).
    flush_interval: Option<std::time::Duration>,
    /// Cache fill (percent of dirty slices) that wakes the flusher early.
    dirty_threshold_percent: usize,
    /// Persistent dirty bitmaps maintained by a writable open (see `bitmaps/`).
    bitmaps: bitmaps::BitmapSet,
    /// Whether the image looks metadata-preallocated (see `prealloc.rs`), once computed.
    prealloc: std::sync::OnceLock<bool>,
}

impl Image {
    /// Open the image file at `path`, taking QEMU-compatible locks on it (and on its backing
    /// and data files) unless [`OpenOptions::locking`] is off.
    ///
    /// ```no_run
    /// # async fn demo() -> qcow2_engine::Result<()> {
    /// use qcow2_engine::image::{Image, OpenOptions};
    /// let img = Image::open("disk.qcow2", &OpenOptions::new().writable(true)).await?;
    /// img.write_at(b"hello", 1 << 20).await?;
    /// img.close().await?; // flushes, waits for cancelled requests, releases the locks
    /// # Ok(()) }
    /// ```
    pub async fn open(path: impl AsRef<Path>, opts: &OpenOptions) -> Result<Image> {
        let path = path.as_ref();
        opts.validate()?;
        let flags = crate::storage::OpenFlags {
            read_only: !opts.writable,
            direct: opts.direct,
        };
        let lock = opts
            .locking
            .then(|| LockRequest::image(opts.writable, opts.force_share));
        let storage = crate::storage::open_file_locked(path, flags, opts.io_backend, lock)
            .map_err(|e| Error::open("opening the image", path, e))?;
        let chain = std::fs::canonicalize(path)
            .map(|p| vec![p])
            .unwrap_or_default();
        let opts = opts.anchored(Some(path));
        Self::open_chain(storage, &opts, chain)
            .await
            .map_err(|e| e.in_file(path))
    }

    /// Open an image on any storage. Relative backing and data file names are resolved
    /// against `storage.path()`'s directory when it has one. The caller opened `storage`, so
    /// no lock is taken on it (backing and data files are locked as usual).
    pub async fn open_storage(storage: Arc<dyn Storage>, opts: &OpenOptions) -> Result<Image> {
        opts.validate()?;
        let opts = opts.anchored(storage.path());
        Self::open_chain(storage, &opts, Vec::new()).await
    }

    /// Virtual disk size in bytes.
    pub fn virtual_size(&self) -> u64 {
        self.inner.size.load(std::sync::atomic::Ordering::Acquire)
    }

    /// Cluster size in bytes.
    pub fn cluster_size(&self) -> u64 {
        self.inner.geo.cluster_size
    }

    /// A copy of the parsed header, extensions and backing file name.
    pub fn header(&self) -> ImageHeader {
        self.inner.header.lock().unwrap().clone()
    }

    /// The backing image, if one is open.
    pub fn backing(&self) -> Option<&Backing> {
        self.inner.backing.as_ref()
    }

    /// The image file's path, if it was opened from a file.
    pub fn path(&self) -> Option<&Path> {
        self.inner.path.as_deref()
    }

    /// The external data file's path, if the image has one.
    pub fn data_file_path(&self) -> Option<&Path> {
        self.inner.data_file_path.as_deref()
    }

    /// Whether the image was opened for writing.
    pub fn is_writable(&self) -> bool {
        self.inner.writable
    }

    /// Whether the image's data is encrypted (data access needs [`OpenOptions::key_secret`]).
    pub fn is_encrypted(&self) -> bool {
        self.inner.encrypted
    }

    /// Accounting of the L2 slice cache.
    pub fn l2_cache_stats(&self) -> CacheStats {
        self.inner.l2_cache.stats()
    }

    /// Accounting of the refcount-block slice cache (`None` for read-only images).
    pub fn refcount_cache_stats(&self) -> Option<CacheStats> {
        self.inner
            .write
            .as_ref()
            .map(|w| w.refcounts().cache().stats())
    }

    /// Run `work` on a clone of this handle as a cancel-safe future: if the caller drops it
    /// after it started, the work finishes in the background (see `crate::detach`).
    fn detached<T, F>(&self, work: impl FnOnce(Image) -> F) -> crate::detach::Detached<T>
    where
        T: Send + 'static,
        F: std::future::Future<Output = T> + Send + 'static,
    {
        crate::detach::Detached::new(work(self.clone()))
    }

    /// Check that `[offset, offset + len)` lies inside the virtual disk.
    fn check_range(&self, offset: u64, len: u64) -> Result<()> {
        let size = self.virtual_size();
        match offset.checked_add(len) {
            Some(end) if end <= size => Ok(()),
            _ => Err(Error::new(
                ErrorKind::OutOfRange,
                format!("request of {len} bytes beyond the virtual size {size}"),
            )
            .at_guest(GuestOffset(offset))),
        }
    }
}
