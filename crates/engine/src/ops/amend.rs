//! Amend: change the settings of an existing image (`qemu-img amend -o ...`), in QEMU's
//! order and with its refusals.
//!
//! ```text
//!  check every option against the image first (nothing changes when one is refused)
//!  upgrade to version 3 (header rewrite)
//!  refcount width: new table and blocks, one header switch   (check::change_refcount_width)
//!  data file name / data_file_raw off (header rewrite)
//!  backing file: only the current name and format are accepted (use rebase)
//!  lazy refcounts on/off (header rewrite; the open already made a dirty image clean)
//!  size (resize, shrinking allowed)
//!  downgrade to version 2: zero clusters become holes (no backing file) or zero data,
//!      then the header is rewritten in the version 2 layout
//! ```
//! Every step is crash-safe on its own: header rewrites come after the data and metadata
//! they describe are durable, and the refcount switch is a single write inside the first
//! sector. Options that only creation can set are refused by name (see [`AmendOptions`]).

use std::path::Path;
use std::sync::Arc;

use super::progress::{Job, Progress};
use crate::error::{Error, Result};
use crate::format::extensions::{EXT_FEATURE_TABLE, ImageHeader};
use crate::format::features;
use crate::format::header::V2_HEADER_LENGTH;
use crate::image::{Image, OpenOptions};
use crate::storage::LockRequest;

/// Header length QEMU writes for version 3 images (the compression type byte, padded).
const V3_HEADER_LENGTH: u32 = 112;

/// The changes [`amend`] makes; `None` leaves a setting as it is.
#[derive(Debug, Clone, Default)]
pub struct AmendOptions {
    /// How to open the image (references, locking, IO backend); `writable` is ignored.
    pub open: OpenOptions,
    /// Header version: 2 (`compat=0.10`) or 3 (`compat=1.1`).
    pub version: Option<u32>,
    /// `lazy_refcounts`.
    pub lazy_refcounts: Option<bool>,
    /// `refcount_bits`: 1, 2, 4, ..., 64 (version 3 only, except 16).
    pub refcount_bits: Option<u32>,
    /// `size`: the new virtual size (shrinking discards the end).
    pub size: Option<u64>,
    /// `data_file`: a new name for the image's external data file.
    pub data_file: Option<String>,
    /// `data_file_raw`: can only be turned off on an existing image.
    pub data_file_raw: Option<bool>,
    /// `backing_file`: accepted only when it is the current name (use rebase to change it).
    pub backing_file: Option<String>,
    /// `backing_fmt`: accepted only when it is the current format.
    pub backing_format: Option<String>,
    /// Where to report progress; cancel through it (between steps).
    pub progress: Option<Arc<Progress>>,
}

/// Amend the image at `path` (see the module docs). Refusals are
/// [`ErrorKind::InvalidArgument`](crate::ErrorKind::InvalidArgument) with qemu-img's words,
/// or [`ErrorKind::Unsupported`](crate::ErrorKind::Unsupported).
///
/// ```no_run
/// # async fn demo() -> qcow2_engine::Result<()> {
/// use qcow2_engine::ops::amend::{AmendOptions, amend};
/// let opts = AmendOptions { refcount_bits: Some(64), ..AmendOptions::default() };
/// amend("disk.qcow2", &opts).await?;
/// # Ok(()) }
/// ```
pub async fn amend(path: impl AsRef<Path>, opts: &AmendOptions) -> Result<()> {
    let path = path.as_ref().to_path_buf();
    let opts = opts.clone();
    let progress = opts.progress.clone().unwrap_or_default();
    Job::new(progress.clone(), async move {
        run(&path, &opts, &progress).await
    })
    .await
}

/// Blocking [`amend`], for callers without an async runtime.
#[cfg(feature = "blocking")]
pub fn amend_blocking(path: impl AsRef<Path>, opts: &AmendOptions) -> Result<()> {
    crate::blocking::run(amend(path, opts))
}

async fn run(path: &Path, opts: &AmendOptions, progress: &Progress) -> Result<()> {
    progress.set_total(3);
    let img = Image::open(path, &opts.open.clone().writable(true)).await?;
    let first = prepare(&img, opts).await;
    let closed = img.close().await;
    let old_version = first?;
    closed?;
    progress.advance(1);
    progress.check()?;
    if let Some(bits) = opts.refcount_bits {
        let lock = opts.open.locking.then(|| LockRequest::image(true, false));
        let flags = crate::storage::OpenFlags {
            read_only: false,
            direct: false,
        };
        let file = crate::storage::open_file_locked(path, flags, opts.open.io_backend, lock)
            .map_err(|e| Error::open("opening the image", path, e))?;
        crate::check::change_refcount_width(file, bits).await?;
    }
    progress.advance(1);
    progress.check()?;
    let img = Image::open(path, &opts.open.clone().writable(true)).await?;
    let done = finish(&img, opts, old_version).await;
    let closed = img.close().await;
    done?;
    closed?;
    progress.advance(1);
    Ok(())
}

/// Refuse what cannot be done, then upgrade if asked. Returns the version before.
async fn prepare(img: &Image, opts: &AmendOptions) -> Result<u32> {
    let ih = img.header();
    let h = &ih.header;
    let new_version = opts.version.unwrap_or(h.version);
    if opts.data_file.is_some() && !h.has_external_data_file() {
        return Err(Error::invalid_arg(
            "data-file can only be set for images that use an external data file",
        ));
    }
    if opts.data_file_raw == Some(true) && !h.data_file_raw() {
        return Err(Error::invalid_arg(
            "data-file-raw cannot be set on existing images",
        ));
    }
    if let Some(bits) = opts.refcount_bits {
        if !bits.is_power_of_two() || bits > 64 {
            return Err(Error::invalid_arg(
                "Refcount width must be a power of two and may not exceed 64 bits",
            ));
        }
        if bits != h.refcount_bits() && new_version < 3 && bits != 16 {
            return Err(Error::invalid_arg(
                "Refcount widths other than 16 bits require compatibility level 1.1 or \
                 above (use compat=1.1 or greater)",
            ));
        }
    }
    if new_version > h.version {
        upgrade(img).await?;
    }
    Ok(h.version)
}

/// Rewrite the header as version 3 (QEMU's v3 defaults for the new fields).
async fn upgrade(img: &Image) -> Result<()> {
    if img.header().header.nb_snapshots > 0 {
        return Err(Error::unsupported(
            "upgrading an image with internal snapshots to compat=1.1",
        ));
    }
    img.rewrite_header(|ih| {
        let h = &mut ih.header;
        h.version = 3;
        h.header_length = V3_HEADER_LENGTH;
        h.refcount_order = 4;
        h.incompatible_features = 0;
        h.compatible_features = 0;
        h.autoclear_features = 0;
        h.compression_type = 0;
        Ok(())
    })
    .await
}

/// Every step after the refcount width.
async fn finish(img: &Image, opts: &AmendOptions, old_version: u32) -> Result<()> {
    let new_version = opts.version.unwrap_or(old_version);
    data_file_fields(img, opts).await?;
    check_backing(&img.header(), opts)?;
    lazy_refcounts(img, opts.lazy_refcounts, new_version).await?;
    if let Some(size) = opts.size.filter(|&s| s != img.virtual_size()) {
        img.resize_with(size, true).await?;
    }
    if new_version < img.header().header.version {
        downgrade(img).await?;
    }
    Ok(())
}

/// `data_file` (rename) and `data_file_raw=off`.
async fn data_file_fields(img: &Image, opts: &AmendOptions) -> Result<()> {
    let raw_off = opts.data_file_raw == Some(false) && img.header().header.data_file_raw();
    if opts.data_file.is_none() && !raw_off {
        return Ok(());
    }
    let name = opts.data_file.clone();
    img.rewrite_header(|ih| {
        if raw_off {
            ih.header.autoclear_features &= !features::RAW_EXTERNAL;
        }
        if let Some(n) = name.filter(|n| !n.is_empty()) {
            ih.set_data_file(Some(n));
        }
        Ok(())
    })
    .await
}

/// The backing file cannot be changed here: only the current name and format pass.
fn check_backing(ih: &ImageHeader, opts: &AmendOptions) -> Result<()> {
    if opts.backing_file.is_none() && opts.backing_format.is_none() {
        return Ok(());
    }
    if opts.backing_file.as_deref() != ih.backing_file.as_deref()
        || opts.backing_format.as_deref() != ih.backing_format()
    {
        return Err(Error::invalid_arg(
            "Cannot amend the backing file\nYou can use 'qemu-img rebase' instead.",
        ));
    }
    Ok(())
}

/// Turn lazy refcounts on or off (the compatible feature bit).
async fn lazy_refcounts(img: &Image, want: Option<bool>, new_version: u32) -> Result<()> {
    let Some(on) = want.filter(|&on| on != img.header().header.lazy_refcounts()) else {
        return Ok(());
    };
    if on && new_version < 3 {
        return Err(Error::invalid_arg(
            "Lazy refcounts only supported with compatibility level 1.1 and above (use \
             compat=1.1 or greater)",
        ));
    }
    img.rewrite_header(|ih| {
        match on {
            true => ih.header.compatible_features |= features::LAZY_REFCOUNTS,
            false => ih.header.compatible_features &= !features::LAZY_REFCOUNTS,
        }
        Ok(())
    })
    .await
}

/// Rewrite the image as version 2, refusing what version 2 cannot express.
async fn downgrade(img: &Image) -> Result<()> {
    let ih = img.header();
    let h = &ih.header;
    if h.refcount_order != 4 {
        return Err(Error::invalid_arg("compat=0.10 requires refcount_bits=16"));
    }
    if h.has_external_data_file() {
        return Err(Error::invalid_arg(
            "Cannot downgrade an image with a data file",
        ));
    }
    if h.nb_snapshots > 0 {
        return Err(Error::unsupported(
            "downgrading an image with internal snapshots",
        ));
    }
    if ih.bitmaps().is_some() {
        return Err(Error::unsupported(
            "Cannot downgrade an image with persistent bitmaps",
        ));
    }
    let incompat = h.incompatible_features & !(features::DIRTY | features::COMPRESSION_TYPE);
    if incompat != 0 {
        return Err(Error::invalid_arg(format!(
            "Cannot downgrade an image with incompatible features {incompat:#x} set"
        )));
    }
    let zstd = h.compression_type != 0;
    expand_zero_clusters(img, zstd).await?;
    img.rewrite_header(|ih| {
        let h = &mut ih.header;
        h.version = 2;
        h.header_length = crate::units::to_u32(V2_HEADER_LENGTH as u64);
        h.refcount_order = 4;
        h.incompatible_features = 0;
        h.compatible_features = 0;
        h.autoclear_features = 0;
        h.compression_type = 0;
        h.unknown_tail.clear();
        ih.remove_extensions(EXT_FEATURE_TABLE);
        Ok(())
    })
    .await
}

/// Version 2 has no zero flag: zero clusters become holes (reading zeros) without a backing
/// file, zero-filled data clusters over one. With zstd, compressed clusters refuse.
async fn expand_zero_clusters(img: &Image, zstd: bool) -> Result<()> {
    let size = img.virtual_size();
    let has_backing = img.backing().is_some();
    for e in img.map(0, size).await? {
        if zstd && e.depth == 0 && e.compressed {
            return Err(Error::invalid_arg(
                "Cannot downgrade an image with zstd compression type and existing \
                 compressed clusters",
            ));
        }
        if e.depth != 0 || !e.present || !e.zero || e.data {
            continue;
        }
        if !has_backing {
            img.unmap_clusters(e.start, e.length).await?;
            continue;
        }
        let mut off = e.start;
        while off < e.start + e.length {
            let n = (e.start + e.length - off).min(1 << 20);
            img.write_at(&vec![0u8; crate::units::to_usize(n)], off)
                .await?; // n ≤ 1 MiB
            off += n;
        }
    }
    img.flush().await
}
