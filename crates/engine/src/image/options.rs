//! Options for opening an image.

use std::path::PathBuf;
use std::time::Duration;

use super::{Flusher, ReferencePolicy};
use crate::storage::IoBackend;

/// How to open an image. Build with [`OpenOptions::new`] and the setters.
///
/// ```no_run
/// # async fn demo() -> qcow2_engine::Result<()> {
/// use qcow2_engine::image::{Image, OpenOptions};
/// // Read-only next to a running VM, as `qemu-img info -U`: no write lock is asked for.
/// let opts = OpenOptions::new().force_share(true);
/// let img = Image::open("vm.qcow2", &opts).await?;
/// println!("{} bytes", img.virtual_size());
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
#[must_use = "OpenOptions does nothing until passed to Image::open"]
pub struct OpenOptions {
    pub(crate) writable: bool,
    pub(crate) references: ReferencePolicy,
    pub(crate) writable_data_file: bool,
    pub(crate) locking: bool,
    pub(crate) force_share: bool,
    pub(crate) backing_override: Option<BackingOverride>,
    pub(crate) data_file: Option<PathBuf>,
    pub(crate) l2_cache_bytes: usize,
    pub(crate) refcount_cache_bytes: usize,
    pub(crate) slice_size: usize,
    pub(crate) flush_interval: Option<Duration>,
    pub(crate) flusher: Flusher,
    pub(crate) dirty_threshold_percent: usize,
    pub(crate) max_chain_depth: usize,
    pub(crate) direct: bool,
    pub(crate) io_backend: IoBackend,
    #[cfg(feature = "luks")]
    pub(crate) key_secret: Option<crate::crypto::Secret>,
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
            references: ReferencePolicy::default(),
            writable_data_file: false,
            locking: true,
            force_share: false,
            backing_override: None,
            data_file: None,
            l2_cache_bytes: 4 << 20,
            refcount_cache_bytes: 1 << 20,
            slice_size: 4096,
            flush_interval: Some(Duration::from_secs(1)),
            flusher: Flusher::Thread,
            dirty_threshold_percent: 50,
            max_chain_depth: 64,
            direct: false,
            io_backend: IoBackend::Auto,
            #[cfg(feature = "luks")]
            key_secret: None,
        }
    }
}

impl OpenOptions {
    /// Read-only, QEMU-compatible locks, backing and data files only inside the image's
    /// directory ([`ReferencePolicy::ImageDirectory`]), data files read-only, 4 MiB L2 cache, 1 MiB refcount cache, 4 KiB slices.
    pub fn new() -> Self {
        Self::default()
    }

    /// Open for writing too.
    pub fn writable(mut self, on: bool) -> Self {
        self.writable = on;
        self
    }

    /// Which backing and data files named inside the image may be opened (default
    /// [`ReferencePolicy::ImageDirectory`]). An image is untrusted input: see
    /// [`ReferencePolicy`]. A refused reference fails the open with
    /// [`crate::ErrorKind::Refused`].
    pub fn references(mut self, p: ReferencePolicy) -> Self {
        self.references = p;
        self
    }

    /// `false` is [`OpenOptions::references`]`(`[`ReferencePolicy::Refuse`]`)` (no backing
    /// and no data files); `true` restores the default policy if references were refused.
    pub fn follow_backing(mut self, on: bool) -> Self {
        if !on {
            self.references = ReferencePolicy::Refuse;
        } else if self.references == ReferencePolicy::Refuse {
            self.references = ReferencePolicy::default();
        }
        self
    }

    /// Open the external data file named by the image read-write when the image is opened
    /// for writing (default `false`: a data file is another file the image points at, and a
    /// writable open of such an image fails unless the caller opts in here or passes the data
    /// file itself with [`OpenOptions::data_file`]).
    pub fn writable_data_file(mut self, on: bool) -> Self {
        self.writable_data_file = on;
        self
    }

    /// Take QEMU-compatible image locks (default `true`): while one holder writes an image,
    /// nobody else (ours or QEMU) can open it, and read-only holders keep writers out.
    /// Turn off only when the caller arbitrates access itself.
    pub fn locking(mut self, on: bool) -> Self {
        self.locking = on;
        self
    }

    /// Read-only opens only: let others write the image (and its backing files) while it is
    /// open (qemu-img's `-U`/`--force-share`). What is read may then be inconsistent.
    pub fn force_share(mut self, on: bool) -> Self {
        self.force_share = on;
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

    /// Who runs the background flusher of a writable image (default [`Flusher::Thread`]: a
    /// small thread of its own, under any async runtime or none). See the crate docs'
    /// "Flushing" section.
    pub fn flusher(mut self, f: Flusher) -> Self {
        self.flusher = f;
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

    /// The passphrase of an encrypted image (QEMU's `encrypt.key-secret`): LUKS images
    /// open read-write with it, legacy AES images read-only. Without it an encrypted image
    /// opens read-only for `info`/`map`, and data access is refused. A wrong one fails the
    /// open with "Invalid password, cannot unlock any keyslot".
    #[cfg(feature = "luks")]
    pub fn key_secret(mut self, secret: crate::crypto::Secret) -> Self {
        self.key_secret = Some(secret);
        self
    }

    /// Refuse contradictory options.
    pub(crate) fn validate(&self) -> crate::Result<()> {
        if self.force_share && self.writable {
            return Err(crate::Error::invalid_arg(
                "force-share (-U) can only be used with read-only opens",
            ));
        }
        Ok(())
    }

    /// These options with the reference policy held to `image_path`'s directory.
    pub(crate) fn anchored(&self, image_path: Option<&std::path::Path>) -> OpenOptions {
        let mut o = self.clone();
        o.references = self.references.anchored(image_path);
        o
    }
}
