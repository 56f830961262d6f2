//! `qcow2 rebase`: give an image another backing file (or none), with `qemu-img rebase`'s
//! flags, messages and exit codes. Safe mode copies into the image every range where the old
//! and the new backing file differ; `-u` only rewrites the header. The work is the library's
//! [`qcow2_engine::ops::rebase`].

use std::path::PathBuf;

use anyhow::{Result, bail};
use qcow2_engine::ops::rebase::{NewBacking, RebaseOptions, rebase};

use super::ops_common::{check_cache, end_progress, plain, progress};
use crate::access::Access;
use crate::disk::detect_format;

/// Format names qemu-img knows (a name outside this list is "Invalid format name").
const KNOWN_FORMATS: &[&str] = &[
    "qcow2",
    "raw",
    "vmdk",
    "vdi",
    "vhdx",
    "vpc",
    "qed",
    "qcow",
    "parallels",
    "luks",
    "file",
    "bochs",
    "cloop",
    "dmg",
    "nbd",
];

/// Arguments of `qcow2 rebase`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Format of the image (qcow2; probed when omitted).
    #[arg(short = 'f')]
    format: Option<String>,
    /// Cache mode of the image (qemu-img's names; accepted, the page cache is always used).
    #[arg(short = 't')]
    cache: Option<String>,
    /// Cache mode of the backing files (accepted, as -t).
    #[arg(short = 'T')]
    src_cache: Option<String>,
    /// Show progress.
    #[arg(short = 'p')]
    progress: bool,
    /// Print nothing on success.
    #[arg(short = 'q')]
    quiet: bool,
    /// Unsafe mode: only rewrite the backing file name and format in the header.
    #[arg(short = 'u')]
    header_only: bool,
    /// Write the copied clusters compressed.
    #[arg(short = 'c')]
    compress: bool,
    /// The new backing file ("" for none: the image becomes standalone); relative names are
    /// relative to the image's directory.
    #[arg(short = 'b')]
    backing: Option<String>,
    /// Format of the new backing file (required with a backing file).
    #[arg(short = 'F')]
    backing_format: Option<String>,
    #[command(flatten)]
    access: Access,
    /// The image to rebase.
    file: PathBuf,
}

/// Run `qcow2 rebase`.
pub async fn run(a: Args) -> Result<u8> {
    if a.backing.is_none() && !a.header_only {
        errln!("qcow2: Must specify backing file (-b) or use unsafe mode (-u)");
        errln!("Try 'qcow2 rebase --help' for more info");
        return Ok(1);
    }
    check_cache(a.cache.as_deref(), "cache")?;
    check_cache(a.src_cache.as_deref(), "source cache")?;
    let backing = new_backing(&a)?;
    match detect_format(&a.file, a.format.as_deref()).await? {
        "qcow2" => {}
        _ => bail!(
            "Could not change the backing file to '{}': Operation not supported",
            a.backing.as_deref().unwrap_or_default()
        ),
    }
    let show = a.progress && !a.quiet;
    let opts = RebaseOptions {
        open: a.access.options(true),
        backing,
        header_only: a.header_only,
        compress: a.compress,
        progress: Some(progress(show)),
    };
    let done = rebase(&a.file, &opts).await;
    end_progress(show);
    done.map_err(plain)?;
    Ok(0)
}

/// The new backing file from `-b`/`-F`, with qemu-img's refusals.
fn new_backing(a: &Args) -> Result<Option<NewBacking>> {
    if let Some(f) = &a.backing_format
        && !KNOWN_FORMATS.contains(&f.as_str())
    {
        bail!("Invalid format name: '{f}'");
    }
    let name = match a.backing.as_deref() {
        None | Some("") => return Ok(None),
        Some(n) => n,
    };
    match &a.backing_format {
        Some(f) => Ok(Some(NewBacking {
            name: name.to_string(),
            format: f.clone(),
        })),
        None => {
            bail!("Could not change the backing file to '{name}': backing format must be specified")
        }
    }
}
