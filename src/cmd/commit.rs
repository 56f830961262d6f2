//! `qcow2 commit`: write an overlay's data into its backing file (or a base further down the
//! chain), then empty the overlay, with `qemu-img commit`'s flags, messages and exit codes.
//! The work is the library's [`qcow2_engine::ops::commit`].

use std::path::PathBuf;

use anyhow::{Result, bail};
use qcow2_engine::ops::commit::{CommitOptions, commit};

use super::ops_common::{check_cache, end_progress, plain, progress};
use crate::access::Access;
use crate::args::parse_size;
use crate::disk::detect_format;

/// Arguments of `qcow2 commit`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Format of the overlay (qcow2; probed when omitted).
    #[arg(short = 'f')]
    format: Option<String>,
    /// Cache mode (qemu-img's names; accepted, the page cache is always used).
    #[arg(short = 't')]
    cache: Option<String>,
    /// Commit into this image of the backing chain (default: the backing file); keeps the
    /// overlay, as -d does.
    #[arg(short = 'b')]
    base: Option<PathBuf>,
    /// Keep the overlay's data (do not empty it).
    #[arg(short = 'd')]
    keep: bool,
    /// Show progress.
    #[arg(short = 'p')]
    progress: bool,
    /// Print nothing on success.
    #[arg(short = 'q')]
    quiet: bool,
    /// Rate limit in bytes per second (size suffixes allowed).
    #[arg(short = 'r')]
    rate: Option<String>,
    #[command(flatten)]
    access: Access,
    /// The overlay image.
    file: PathBuf,
}

/// Run `qcow2 commit`.
pub async fn run(a: Args) -> Result<u8> {
    check_cache(a.cache.as_deref(), "cache")?;
    let rate = match &a.rate {
        Some(r) => Some(
            parse_size(r).map_err(|_| anyhow::anyhow!("Invalid rate limit specified: '{r}'."))?,
        ),
        None => None,
    };
    if detect_format(&a.file, a.format.as_deref()).await? != "qcow2" {
        // qemu-img's message: a raw image has no backing file to commit into.
        bail!("Image does not have a backing file");
    }
    let show = a.progress && !a.quiet;
    let opts = CommitOptions {
        open: a.access.options(true),
        base: a.base.clone(),
        keep_overlay: a.keep,
        rate_limit: rate,
        progress: Some(progress(show)),
    };
    let done = commit(&a.file, &opts).await;
    end_progress(show);
    done.map_err(plain)?;
    if !a.quiet {
        outln!("Image committed.");
    }
    Ok(0)
}
