//! The backing chain as separate files: which images it holds, and each opened on its own.
//!
//! Commit and rebase write into one image of a chain while reading others. An [`Image`]
//! opens its whole chain read-only (and locks it so), so these operations first list the
//! chain, then open each layer by itself: the layers they read without their backing files
//! (a layer's own clusters are what it contributes), the one they write read-write.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::error::{Error, Result};
use crate::image::{Backing, BackingOverride, Image, OpenOptions, ZeroFlags};
use crate::storage::{LockRequest, OpenFlags, Storage};

/// One image of a backing chain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Layer {
    /// Its path (as the chain resolved it).
    pub path: PathBuf,
    /// `"qcow2"` or `"raw"`.
    pub format: &'static str,
}

/// The images below `top` (its backing file first), as opening `top` with `opts` finds them.
pub(crate) async fn backing_layers(top: &Path, opts: &OpenOptions) -> Result<Vec<Layer>> {
    let img = Image::open(top, &opts.clone().writable(false)).await?;
    let mut out = Vec::new();
    let mut next = img.backing();
    while let Some(b) = next {
        let (path, nested) = match b {
            Backing::Qcow2(i) => (i.path().map(Path::to_path_buf), i.backing()),
            Backing::Raw { storage, .. } => (storage.path().map(Path::to_path_buf), None),
        };
        let path = path.ok_or_else(|| Error::invalid_arg("a backing image without a path"))?;
        out.push(Layer {
            path,
            format: b.format(),
        });
        next = nested;
    }
    img.close().await?;
    Ok(out)
}

/// Open `path` by itself: without its backing file, so reads of what it does not allocate
/// give zeros (callers use [`Image::map`] to know which ranges it does allocate).
pub(crate) async fn open_alone(path: &Path, opts: &OpenOptions, writable: bool) -> Result<Image> {
    let no_backing = BackingOverride {
        path: None,
        format: None,
    };
    Image::open(path, &opts.clone().writable(writable).backing(no_backing)).await
}

/// An image opened for writing whole ranges into: qcow2 (with its own backing chain) or raw.
#[derive(Debug)]
pub(crate) enum Target {
    /// A qcow2 image.
    Qcow2(Image),
    /// A raw file (guest offset = file offset).
    Raw(Arc<dyn Storage>),
}

impl Target {
    /// Open `layer` read-write.
    pub(crate) async fn open(layer: &Layer, opts: &OpenOptions) -> Result<Target> {
        if layer.format == "qcow2" {
            return Ok(Target::Qcow2(
                Image::open(&layer.path, &opts.clone().writable(true)).await?,
            ));
        }
        let flags = OpenFlags {
            read_only: false,
            direct: false,
        };
        let lock = opts.locking.then(|| LockRequest::raw(true));
        let s = crate::storage::open_file_locked(&layer.path, flags, opts.io_backend, lock)
            .map_err(|e| Error::open("opening the raw image", &layer.path, e))?;
        Ok(Target::Raw(s))
    }

    /// Virtual size (a raw file's length in whole sectors, as QEMU sees it).
    pub(crate) async fn size(&self) -> Result<u64> {
        match self {
            Target::Qcow2(img) => Ok(img.virtual_size()),
            Target::Raw(s) => Ok(s
                .len()
                .await
                .map_err(|e| Error::io("sizing the raw image", e))?
                .next_multiple_of(512)),
        }
    }

    /// Grow to at least `size` bytes.
    pub(crate) async fn grow_to(&self, size: u64) -> Result<()> {
        if self.size().await? >= size {
            return Ok(());
        }
        match self {
            Target::Qcow2(img) => img.resize(size).await,
            Target::Raw(s) => s
                .set_len(size)
                .await
                .map_err(|e| Error::io("growing the raw image", e)),
        }
    }

    pub(crate) async fn write_at(&self, buf: &[u8], off: u64) -> Result<()> {
        match self {
            Target::Qcow2(img) => img.write_at(buf, off).await,
            Target::Raw(s) => s
                .write_at(buf, off)
                .await
                .map_err(|e| Error::io("writing the raw image", e).at(off)),
        }
    }

    pub(crate) async fn write_zeroes(&self, off: u64, len: u64) -> Result<()> {
        match self {
            Target::Qcow2(img) => {
                img.write_zeroes(off, len, ZeroFlags { may_unmap: true })
                    .await
            }
            Target::Raw(s) => s
                .write_zeroes(off, len)
                .await
                .map_err(|e| Error::io("zeroing the raw image", e).at(off)),
        }
    }

    /// Make everything written durable (fsync).
    pub(crate) async fn flush(&self) -> Result<()> {
        match self {
            Target::Qcow2(img) => img.flush().await,
            Target::Raw(s) => s
                .flush()
                .await
                .map_err(|e| Error::io("syncing the raw image", e)),
        }
    }

    /// Flush and release the image.
    pub(crate) async fn close(self) -> Result<()> {
        match self {
            Target::Qcow2(img) => img.close().await,
            Target::Raw(s) => s
                .flush()
                .await
                .map_err(|e| Error::io("syncing the raw image", e)),
        }
    }
}
