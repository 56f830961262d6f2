//! An image opened by a command: qcow2 through the library, or a raw file.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, Result, bail};
use qcow2_engine::Storage;
use qcow2_engine::format::extensions::ImageHeader;
use qcow2_engine::format::probe;
use qcow2_engine::image::{Extent, Image, ZeroFlags};
use qcow2_engine::storage::{FileStorage, LockRequest, OpenFlags};
use qcow2_nbd::{BlockDevice, RawDevice};

use crate::access::Access;

/// An open image of either format. Cloning shares the open image (for concurrent requests).
#[derive(Debug, Clone)]
pub enum Disk {
    /// A qcow2 image.
    Qcow2(Image),
    /// A raw file: guest offset = file offset (the NBD server's raw device, which also
    /// guards block 0 of a probed raw file and merges the file's data and hole runs for `map`).
    Raw(RawDevice),
}

/// qemu-nbd's and qemu-io's warning when a writable image's format was probed as raw.
fn probed_raw_warning(path: &Path) -> String {
    format!(
        "WARNING: Image format was not specified for '{}' and probing guessed raw.\n         \
         Automatically detecting the format is dangerous for raw images, write operations on \
         block 0 will be restricted.\n         Specify the 'raw' format explicitly to remove \
         the restrictions.",
        path.display()
    )
}

/// The format of `path`: `format` when given (checked), else probed from the magic.
pub async fn detect_format(path: &Path, format: Option<&str>) -> Result<&'static str> {
    match format {
        Some("qcow2") => Ok("qcow2"),
        Some("raw") => Ok("raw"),
        Some(f) => bail!("unsupported image format '{f}' (qcow2 or raw)"),
        None => {
            let s = open_file(path, false, None)?;
            let mut head = vec![0u8; probe::PROBE_LEN];
            s.read_at(&mut head, 0)
                .await
                .with_context(|| format!("could not read '{}'", path.display()))?;
            // The file name matters for dmg, which QEMU recognises by its suffix only.
            let found = probe::probe(&head, path.to_str());
            Ok(probe::readable(found).with_context(|| path.display().to_string())?)
        }
    }
}

/// Open `path` as a plain file, with `lock` taken on it.
pub fn open_file(path: &Path, writable: bool, lock: Option<LockRequest>) -> Result<FileStorage> {
    let flags = OpenFlags {
        read_only: !writable,
        direct: false,
    };
    open_file_with(path, flags, lock)
}

/// [`open_file`] with explicit open flags (O_DIRECT).
fn open_file_with(path: &Path, flags: OpenFlags, lock: Option<LockRequest>) -> Result<FileStorage> {
    let f = FileStorage::open(path, flags)
        .with_context(|| format!("could not open '{}'", path.display()))?;
    if let Some(req) = lock {
        f.lock(req)
            .map_err(|e| qcow2_engine::Error::open("locking", path, e))?;
    }
    Ok(f)
}

/// Open a qcow2 image with its backing chain, as `access` allows.
pub async fn open_qcow2(path: &Path, writable: bool, access: &Access) -> Result<Image> {
    let mut opts = access.options(writable);
    if let Some(secret) = crate::secrets::for_path(path)? {
        opts = opts.key_secret(secret);
    }
    Ok(Image::open(path, &opts).await?)
}

impl Disk {
    /// Open `path` in `format` (probed when `None`) with its backing chain, as `access` allows.
    pub async fn open(
        path: &Path,
        format: Option<&str>,
        writable: bool,
        access: &Access,
    ) -> Result<Disk> {
        if writable && access.force_share {
            bail!("--force-share (-U) can only be used with read-only images");
        }
        match detect_format(path, format).await? {
            "qcow2" => Ok(Disk::Qcow2(open_qcow2(path, writable, access).await?)),
            _ => {
                let probed = writable && format.is_none();
                if probed {
                    errln!("{}", probed_raw_warning(path));
                }
                let flags = OpenFlags {
                    read_only: !writable,
                    direct: access.direct,
                };
                let storage = open_file_with(path, flags, access.raw_lock(writable))?;
                // Like QEMU, a raw image's size is its length rounded up to whole sectors.
                let size = storage
                    .len()
                    .await
                    .with_context(|| path.display().to_string())?
                    .next_multiple_of(512);
                let raw = RawDevice::with_size(Arc::new(storage), size, writable);
                Ok(Disk::Raw(raw.format_probed(probed)))
            }
        }
    }

    /// A writable raw disk over an already open file of `size` bytes.
    pub fn open_raw_storage(storage: Arc<dyn Storage>, size: u64) -> Disk {
        Disk::Raw(RawDevice::with_size(storage, size, true))
    }

    /// The disk as a device for the NBD server.
    pub fn into_device(self) -> Arc<dyn BlockDevice> {
        match self {
            Disk::Qcow2(img) => Arc::new(img),
            Disk::Raw(raw) => Arc::new(raw),
        }
    }

    /// The format name as qemu-img prints it.
    pub fn format(&self) -> &'static str {
        match self {
            Disk::Qcow2(_) => "qcow2",
            Disk::Raw(_) => "raw",
        }
    }

    /// Virtual size in bytes.
    pub fn size(&self) -> u64 {
        match self {
            Disk::Qcow2(img) => img.virtual_size(),
            Disk::Raw(r) => r.size(),
        }
    }

    /// Read `buf.len()` bytes at `off`.
    pub async fn read_at(&self, buf: &mut [u8], off: u64) -> Result<()> {
        self.check_range(off, buf.len() as u64)?;
        match self {
            Disk::Qcow2(img) => Ok(img.read_at(buf, off).await?),
            Disk::Raw(r) => Ok(r.read_at(buf, off).await?),
        }
    }

    /// Write `buf` at `off`.
    pub async fn write_at(&self, buf: &[u8], off: u64) -> Result<()> {
        self.check_range(off, buf.len() as u64)?;
        match self {
            Disk::Qcow2(img) => Ok(img.write_at(buf, off).await?),
            Disk::Raw(r) => Ok(r.write_at(buf, off).await?),
        }
    }

    /// Write `buf` at `off` compressed, cluster by cluster (qemu-io's `write -c`): `off` must
    /// be cluster-aligned and `buf` whole clusters, except that it may end at the disk's end.
    pub async fn write_compressed(&self, buf: &[u8], off: u64) -> Result<()> {
        self.check_range(off, buf.len() as u64)?;
        let Disk::Qcow2(img) = self else {
            bail!("compressed writes need a qcow2 image");
        };
        let cs = img.cluster_size();
        let end = off + buf.len() as u64;
        if off % cs != 0 || (buf.len() as u64 % cs != 0 && end != self.size()) {
            bail!("compressed writes must be cluster-aligned ({cs}-byte clusters)");
        }
        for (i, chunk) in buf.chunks(cs as usize).enumerate() {
            img.write_compressed(chunk, off + i as u64 * cs).await?;
        }
        Ok(())
    }

    /// Make `[off, off + len)` read as zeros.
    pub async fn write_zeroes(&self, off: u64, len: u64, may_unmap: bool) -> Result<()> {
        self.check_range(off, len)?;
        match self {
            Disk::Qcow2(img) => Ok(img.write_zeroes(off, len, ZeroFlags { may_unmap }).await?),
            Disk::Raw(r) => Ok(r.write_zeroes(off, len, may_unmap).await?),
        }
    }

    /// Discard `[off, off + len)`.
    pub async fn discard(&self, off: u64, len: u64) -> Result<()> {
        self.check_range(off, len)?;
        match self {
            Disk::Qcow2(img) => Ok(img.discard(off, len).await?),
            Disk::Raw(r) => Ok(r.discard(off, len).await?),
        }
    }

    /// Make completed writes durable.
    pub async fn flush(&self) -> Result<()> {
        match self {
            Disk::Qcow2(img) => Ok(img.flush().await?),
            Disk::Raw(r) => Ok(r.flush().await?),
        }
    }

    /// Flush and close (required before exit for writable qcow2 images).
    pub async fn close(&self) -> Result<()> {
        match self {
            Disk::Qcow2(img) => Ok(img.close().await?),
            Disk::Raw(r) => Ok(r.close().await?),
        }
    }

    /// The allocation map of `[off, off + len)`, as `qemu-img map` reports it.
    pub async fn map(&self, off: u64, len: u64) -> Result<Vec<Extent>> {
        self.check_range(off, len)?;
        match self {
            Disk::Qcow2(img) => Ok(img.map(off, len).await?),
            Disk::Raw(r) => Ok(r.map(off, len).await?),
        }
    }

    fn check_range(&self, off: u64, len: u64) -> Result<()> {
        match off.checked_add(len) {
            Some(end) if end <= self.size() => Ok(()),
            _ => bail!(
                "request {off}+{len} is beyond the end of the {}-byte image",
                self.size()
            ),
        }
    }
}

/// Read and validate cluster 0 of a qcow2 file without opening the image: works for
/// encrypted images without their secret, and without backing or data files.
pub async fn read_image_header(file: &dyn Storage) -> Result<ImageHeader> {
    let file_len = file.len().await.context("sizing the image")?;
    let ih = qcow2_engine::image::read_cluster0(file).await?;
    // Encryption is valid for info; the check below would refuse it as unsupported.
    let mut check = ih.clone();
    if matches!(check.header.crypt_method, 1 | 2) {
        check.header.crypt_method = 0;
        check.remove_extensions(qcow2_engine::format::extensions::EXT_FULL_DISK_ENCRYPTION);
    }
    check.validate(file_len)?;
    Ok(ih)
}

/// The directory-relative name of a backing file resolved the way QEMU does.
pub fn full_backing_name(image: &Path, name: &str) -> PathBuf {
    qcow2_engine::image::resolve_relative(Some(image), name)
}
