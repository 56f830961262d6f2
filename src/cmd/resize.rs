//! `qcow2 resize`: change an image's virtual size, with `qemu-img resize`'s syntax: an
//! absolute size, or `+SIZE` / `-SIZE` relative to the current one. Shrinking needs
//! `--shrink`. qcow2 images go through [`qcow2_engine::image::Image::resize_with`]; raw files
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
    let format = detect_format(&a.file, a.format.as_deref()).await?;
    match format {
        "qcow2" => {
            let img = open_qcow2(&a.file, true, &a.access).await?;
            let new = new_size(&a.size, img.virtual_size())?;
            check_shrink(&a, new, img.virtual_size())?;
            let r = img.resize_with(new, a.shrink).await;
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
            // `file` (and its lock) stays open until the resize is done.
            let f = std::fs::OpenOptions::new().write(true).open(&a.file)?;
            f.set_len(new)
                .and_then(|()| f.sync_all())
                .with_context(|| format!("could not resize '{}'", a.file.display()))?;
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
