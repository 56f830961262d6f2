//! `serve -s/--snapshot`: export a temporary qcow2 overlay whose backing file is the image,
//! so clients' writes never reach the image. The overlay lives in `$TMPDIR` and is unlinked
//! as soon as it is open: nothing is left behind, even if the server is killed.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};

use anyhow::{Context, Result};
use qcow2_engine::image::create::{CreateOptions, create};
use qcow2_engine::image::{BackingOverride, Image};
use qcow2_engine::storage::FileStorage;

use crate::access::Access;
use crate::disk::{Disk, detect_format};

/// Open a fresh overlay over `file` (format `format`, probed when `None`), writable.
pub async fn open_overlay(file: &Path, format: Option<&str>, access: &Access) -> Result<Image> {
    let fmt = detect_format(file, format).await?;
    let base = Disk::open(file, Some(fmt), false, access).await?;
    let size = base.size();
    base.close().await?;
    let base_path = std::fs::canonicalize(file)
        .with_context(|| format!("could not resolve '{}'", file.display()))?;
    let path = temp_path();
    let r = create_and_open(&path, &base_path, fmt, size, access).await;
    // Unlinked at once: the open file stays usable, and no crash can leave it behind.
    let _ = std::fs::remove_file(&path);
    r
}

async fn create_and_open(
    path: &Path,
    base: &Path,
    fmt: &str,
    size: u64,
    access: &Access,
) -> Result<Image> {
    // create_new: fails on anything already there, symlinks included (a shared /tmp).
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(path)
        .with_context(|| format!("could not create the overlay '{}'", path.display()))?;
    let storage = FileStorage::create(path)
        .with_context(|| format!("could not create the overlay '{}'", path.display()))?;
    let opts = CreateOptions {
        size: Some(size),
        backing_file: Some(base.display().to_string()),
        backing_fmt: Some(fmt.to_string()),
        ..CreateOptions::default()
    };
    create(&storage, None, &opts).await?;
    drop(storage);
    // The overlay names the image itself; the image's own references are held to the
    // policy of the image's directory, as without -s.
    let open = access
        .options_anchored(true, base)
        .backing(BackingOverride {
            path: Some(base.to_path_buf()),
            format: Some(fmt.to_string()),
        });
    Ok(Image::open(path, &open).await?)
}

/// A new name in the temporary directory.
fn temp_path() -> PathBuf {
    static N: AtomicU32 = AtomicU32::new(0);
    let n = N.fetch_add(1, Ordering::Relaxed);
    std::env::temp_dir().join(format!(
        "qcow2-serve-snapshot.{}.{n}.qcow2",
        std::process::id()
    ))
}
