//! Options for opening an image.

use std::path::PathBuf;
use std::time::Duration;

use crate::storage::IoBackend;

/// How to open an image. Build with [`OpenOptions::new`] and the setters.
#[derive(Debug, Clone)]
pub struct OpenOptions {
    pub(crate) writable: bool,
    pub(crate) follow_backing: bool,
    pub(crate) backing_override: Option<BackingOverride>,
    pub(crate) data_file: Option<PathBuf>,
    pub(crate) l2_cache_bytes: usize,
    pub(crate) refcount_cache_bytes: usize,
    pub(crate) slice_size: usize,
    pub(crate) flush_interval: Option<Duration>,
    pub(crate) dirty_threshold_percent: usize,
    pub(crate) max_chain_depth: usize,
    pub(crate) direct: bool,
    pub(crate) io_backend: IoBackend,
}

/// Replaces the backing file named in the header.
#[derive(Debug, Clone)]
pub struct BackingOverride {
    /// Path of the backing file (`None`: open without a backing file).
    pub path: Option<PathBuf>,
    /// Its format (`"qcow2"` or `"raw"`); probed when `None`.
    pub format: Option<String>,
}

impl Default for OpenOptions {
    fn default() -> Self {
        OpenOptions {
            writable: false,
            follow_backing: true,
            backing_override: None,
            data_file: None,
            l2_cache_bytes: 4 << 20,
            refcount_cache_bytes: 1 << 20,
            slice_size: 4096,
            flush_interval: Some(Duration::from_secs(1)),
            dirty_threshold_percent: 50,
            max_chain_depth: 64,
            direct: false,
            io_backend: IoBackend::Auto,
        }
    }
}

impl OpenOptions {
    /// Read-only, follow backing files, 4 MiB L2 cache, 1 MiB refcount cache, 4 KiB slices.
    pub fn new() -> Self {
        Self::default()
    }

    /// Open for writing too.
    pub fn writable(mut self, on: bool) -> Self {
        self.writable = on;
        self
    }

    /// Whether to open the backing file named in the image. An image is untrusted input: a
    /// server exporting images it did not create may want to refuse backing references
    /// (the open then fails with [`crate::ErrorKind::Unsupported`] for images that have one).
    pub fn follow_backing(mut self, on: bool) -> Self {
        self.follow_backing = on;
        self
    }

    /// Use this backing file instead of the one named in the header.
    pub fn backing(mut self, b: BackingOverride) -> Self {
        self.backing_override = Some(b);
        self
    }

    /// Use this external data file instead of the one named in the header.
    pub fn data_file(mut self, p: impl Into<PathBuf>) -> Self {
        self.data_file = Some(p.into());
        self
    }

    /// Memory bound of the L2 slice cache, in bytes.
    pub fn l2_cache_bytes(mut self, n: usize) -> Self {
        self.l2_cache_bytes = n;
        self
    }

    /// Memory bound of the refcount-block slice cache, in bytes.
    pub fn refcount_cache_bytes(mut self, n: usize) -> Self {
        self.refcount_cache_bytes = n;
        self
    }

    /// Size of a cache slice (a power of two from 512 up to the cluster size; clamped).
    pub fn slice_size(mut self, n: usize) -> Self {
        self.slice_size = n;
        self
    }

    /// How often the background flusher writes dirty metadata (`None`: only on demand).
    pub fn flush_interval(mut self, d: Option<Duration>) -> Self {
        self.flush_interval = d;
        self
    }

    /// Start a background flush when this share (in %) of a cache is dirty.
    pub fn dirty_threshold_percent(mut self, p: usize) -> Self {
        self.dirty_threshold_percent = p.clamp(1, 100);
        self
    }

    /// Open files with O_DIRECT.
    pub fn direct(mut self, on: bool) -> Self {
        self.direct = on;
        self
    }

    /// Which backend does the IO of the image, backing and data files (default
    /// [`IoBackend::Auto`]: io_uring where available, else IO threads).
    pub fn io_backend(mut self, b: IoBackend) -> Self {
        self.io_backend = b;
        self
    }

    /// The longest backing chain accepted.
    pub fn max_chain_depth(mut self, n: usize) -> Self {
        self.max_chain_depth = n;
        self
    }
}
