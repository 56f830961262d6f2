//! The backing image of an overlay: another qcow2 image or a raw file, read-only.
//!
//! Reads past the end of a backing image return zeros: a backing file may be shorter than the
//! overlay, and the caller's buffer must never be left untouched.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::{Image, OpenOptions};
use crate::error::{Error, Result};
use crate::format::probe;
use crate::storage::{LockRequest, OpenFlags, Storage};
use crate::units::HostOffset;
use crate::units::to_usize;

/// A backing image, as the read path sees it.
#[derive(Debug)]
pub enum Backing {
    /// A qcow2 image (which may have its own backing image).
    Qcow2(Image),
    /// A raw file of `size` bytes.
    Raw {
        /// The file.
        storage: Arc<dyn Storage>,
        /// Its length at open time.
        size: u64,
    },
}

impl Backing {
    /// Virtual size of the backing image.
    pub fn size(&self) -> u64 {
        match self {
            Backing::Qcow2(img) => img.virtual_size(),
            Backing::Raw { size, .. } => *size,
        }
    }

    /// The format name as qemu-img prints it.
    pub fn format(&self) -> &'static str {
        match self {
            Backing::Qcow2(_) => "qcow2",
            Backing::Raw { .. } => "raw",
        }
    }

    /// Read `buf.len()` bytes at guest offset `off`; zeros past the backing image's end.
    pub async fn read_at(&self, buf: &mut [u8], off: u64) -> Result<()> {
        let size = self.size();
        let inside = to_usize(size.saturating_sub(off).min(buf.len() as u64));
        buf[inside..].fill(0);
        if inside == 0 {
            return Ok(());
        }
        let part = &mut buf[..inside];
        match self {
            Backing::Qcow2(img) => Box::pin(img.read_at(part, off)).await,
            Backing::Raw { storage, .. } => storage
                .read_at(part, off)
                .await
                .map_err(|e| Error::io("reading the raw backing file", e).at_host(HostOffset(off))),
        }
    }
}

/// Resolve a backing (or data) file name the way QEMU does: absolute names as they are,
/// relative names against the directory of the image that names them (never the process's
/// working directory).
pub fn resolve_relative(image_path: Option<&Path>, name: &str) -> PathBuf {
    let p = Path::new(name);
    if p.is_absolute() {
        return p.to_path_buf();
    }
    match image_path.and_then(Path::parent) {
        Some(dir) => dir.join(p),
        None => p.to_path_buf(),
    }
}

/// Guess the format of a file from its first bytes as qemu-img does: `"qcow2"` or `"raw"`.
/// A file in another format QEMU knows (vmdk, vhdx, luks, ...) is refused with an
/// `Unsupported` error naming it, rather than read as a raw disk.
pub async fn probe_format(storage: &dyn Storage) -> Result<&'static str> {
    let mut head = vec![0u8; probe::PROBE_LEN];
    storage
        .read_at(&mut head, 0)
        .await
        .map_err(|e| Error::io("probing the format", e))?;
    probe::readable(probe::probe(&head, None))
}

/// Open `path` as a read-only backing image of format `format` (probed when `None`).
/// `chain` holds the canonical paths of the images above it, for loop detection.
pub async fn open_backing(
    path: &Path,
    format: Option<&str>,
    opts: &OpenOptions,
    chain: &[PathBuf],
) -> Result<Backing> {
    if chain.len() >= opts.max_chain_depth {
        return Err(Error::invalid(format!(
            "backing chain longer than {} images",
            opts.max_chain_depth
        ))
        .in_file(path));
    }
    let canon = std::fs::canonicalize(path)
        .map_err(|e| Error::io("opening the backing file", e).in_file(path))?;
    if chain.contains(&canon) {
        return Err(Error::invalid("backing chain contains a loop").in_file(path));
    }
    let flags = OpenFlags {
        read_only: true,
        direct: opts.direct,
    };
    let lock = opts.locking.then(|| LockRequest::backing(opts.force_share));
    let storage = crate::storage::open_file_locked(path, flags, opts.io_backend, lock)
        .map_err(|e| Error::open("opening the backing file", path, e))?;
    let fmt = match format {
        Some(f) => f.to_string(),
        None => probe_format(storage.as_ref()).await?.to_string(),
    };
    match fmt.as_str() {
        "raw" => {
            // QEMU sees a raw file as whole 512-byte sectors: the partial last sector is
            // padded with zeros (and counts as part of the backing image for `map`).
            let size = storage
                .len()
                .await
                .map_err(|e| Error::io("sizing the backing file", e))?
                .next_multiple_of(512);
            Ok(Backing::Raw { storage, size })
        }
        "qcow2" => {
            let mut sub = opts.clone().writable(false);
            sub.backing_override = None;
            sub.data_file = None;
            let mut chain = chain.to_vec();
            chain.push(canon);
            let img = Box::pin(Image::open_chain(storage, &sub, chain)).await?;
            Ok(Backing::Qcow2(img))
        }
        other => Err(Error::unsupported(format!("backing file format '{other}'")).in_file(path)),
    }
}
