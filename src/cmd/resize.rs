//! `qcow2 resize`: change an image's virtual size, with `qemu-img resize`'s syntax: an
//! absolute size, or `+SIZE` / `-SIZE` relative to the current one. Shrinking needs
//! `--shrink`; `--preallocation` allocates the grown part. qcow2 images go through [`qcow2_engine::image::Image::resize_with`]; raw files
//! are truncated or extended.

use std::path::PathBuf;

use anyhow::{Context, Result, bail};

use crate::access::Access;
use crate::args::parse_size;
use crate::disk::{detect_format, open_file, open_qcow2};

/// Arguments of `qcow2 resize`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Image format (qcow2 or raw); probed when omitted.
    #[arg(short = 'f')]
    format: Option<String>,
    /// Allow making the image smaller (deletes the data past the new end).
    #[arg(long)]
    shrink: bool,
    /// Allocate the grown part: off (default), metadata, falloc or full (see `preallocate`).
    #[arg(long)]
    preallocation: Option<String>,
    /// Print nothing on success.
    #[arg(short = 'q')]
    quiet: bool,
    #[command(flatten)]
    access: Access,
    /// The image file.
    file: PathBuf,
    /// New size: `SIZE`, `+SIZE` or `-SIZE` (suffixes k, M, G, ...).
    #[arg(allow_hyphen_values = true)]
    size: String,
}

/// Run `qcow2 resize`.
pub async fn run(a: Args) -> Result<u8> {
    if let Some(m) = a.preallocation.as_deref()
        && !["off", "metadata", "falloc", "full"].contains(&m)
    {
        bail!("Invalid preallocation mode '{m}'");
    }
    let format = detect_format(&a.file, a.format.as_deref()).await?;
    match format {
        "qcow2" => {
            let img = open_qcow2(&a.file, true, &a.access).await?;
            let new = new_size(&a.size, img.virtual_size())?;
            check_shrink(&a, new, img.virtual_size())?;
            let old = img.virtual_size();
            check_prealloc(&a, new, old)?;
            let mut r = img.resize_with(new, a.shrink).await;
            if r.is_ok() && a.preallocation.as_deref().is_some_and(|m| m != "off") {
                r = preallocate(&img, old, new).await;
            }
            // Close even after a failure, so metadata written so far is consistent.
            let closed = img.close().await;
            r?;
            closed?;
        }
        _ => {
            let file = open_file(&a.file, true, a.access.raw_lock(true))?;
            let old = qcow2_engine::Storage::len(&file).await?;
            let new = new_size(&a.size, old)?;
            check_shrink(&a, new, old)?;
            check_prealloc(&a, new, old)?;
            if a.preallocation.as_deref() == Some("metadata") {
                bail!("Unsupported preallocation mode: metadata");
            }
            // `file` (and its lock) stays open until the resize is done.
            let f = std::fs::OpenOptions::new().write(true).open(&a.file)?;
            f.set_len(new)
                .and_then(|()| f.sync_all())
                .with_context(|| format!("could not resize '{}'", a.file.display()))?;
            if new > old {
                preallocate_raw(&file, a.preallocation.as_deref(), old, new).await?;
            }
            drop(file);
        }
    }
    if !a.quiet {
        outln!("Image resized.");
    }
    Ok(0)
}

/// The new size from `SIZE`, `+SIZE` or `-SIZE` and the current size.
fn new_size(arg: &str, old: u64) -> Result<u64> {
    let positive = || anyhow::anyhow!("New image size must be positive");
    if let Some(rel) = arg.strip_prefix('+') {
        return old
            .checked_add(parse_size(rel)?)
            .context("the new size is too large");
    }
    if let Some(rel) = arg.strip_prefix('-') {
        return match old.checked_sub(parse_size(rel)?) {
            Some(n) if n > 0 => Ok(n),
            _ => Err(positive()),
        };
    }
    parse_size(arg)
}

/// qemu-img's refusals of `--preallocation`.
fn check_prealloc(a: &Args, new: u64, old: u64) -> Result<()> {
    match a.preallocation.as_deref() {
        None | Some("off") => Ok(()),
        Some(_) if new < old => bail!("Preallocation can only be used for growing images"),
        Some(_) => Ok(()),
    }
}

/// Allocate `[old, new)` of a qcow2 image as data clusters holding zeros. qemu-img's
/// `metadata` and `falloc` map them to unwritten host space instead; the guest content is
/// the same (zeros) and the clusters are allocated either way.
async fn preallocate(
    img: &qcow2_engine::image::Image,
    old: u64,
    new: u64,
) -> qcow2_engine::Result<()> {
    let zeros = vec![0u8; 1 << 20];
    let mut off = old;
    while off < new {
        let n = (new - off).min(zeros.len() as u64);
        img.write_at(&zeros[..n as usize], off).await?;
        off += n;
    }
    img.flush().await
}

/// Allocate `[old, new)` of a raw file: `falloc` reserves the space, `full` writes zeros.
async fn preallocate_raw(
    file: &qcow2_engine::storage::FileStorage,
    mode: Option<&str>,
    old: u64,
    new: u64,
) -> Result<()> {
    use qcow2_engine::Storage;
    match mode {
        Some("falloc") => file.allocate(old, new - old).await?,
        Some("full") => {
            let zeros = vec![0u8; 1 << 20];
            let mut off = old;
            while off < new {
                let n = (new - off).min(zeros.len() as u64);
                file.write_at(&zeros[..n as usize], off).await?;
                off += n;
            }
        }
        _ => return Ok(()),
    }
    Ok(file.flush().await?)
}

fn check_shrink(a: &Args, new: u64, old: u64) -> Result<()> {
    if new < old {
        if !a.shrink {
            bail!("Use the --shrink option to perform a shrink operation.");
        }
        errln!(
            "qcow2: warning: Shrinking an image will delete all data beyond the shrunken \
             image's end. Before performing such an operation, make sure there is no \
             important data there."
        );
    }
    Ok(())
}
