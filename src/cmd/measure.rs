//! `qcow2 measure`: how large a new image would be, with `qemu-img measure`'s flags, numbers,
//! messages and JSON keys.
//!
//! ```text
//! qcow2 measure [--output=human|json] [-O raw|qcow2] [-o OPTIONS] (--size SIZE | [-f FMT] [-U] FILE)
//! ```
//!
//! The target format defaults to raw, as in qemu-img. For a qcow2 target the numbers come
//! from the engine ([`qcow2_engine::image::create::Measure`]); the source's data ranges are
//! its allocation map across the backing chain (ranges that read as zeros cost nothing).

use std::path::PathBuf;

use anyhow::{Result, bail};
use qcow2_engine::image::create::{
    self as lib, CreateOptions, Measure, Measurement, bitmaps_size, source_bitmaps,
    target_has_bitmaps,
};
use serde::Serialize;

use super::OutputFormat;
use crate::access::Access;
use crate::disk::Disk;
use crate::output::print_json;

/// Formats QEMU knows but cannot measure: qemu-img names the driver in its refusal.
const NOT_MEASURABLE: &[&str] = &[
    "vmdk",
    "vdi",
    "vhdx",
    "vpc",
    "qed",
    "qcow",
    "parallels",
    "nbd",
    "file",
    "host_device",
    "luks",
];

/// Arguments of `qcow2 measure`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Output format.
    #[arg(long = "output", value_enum, default_value = "human")]
    output: OutputFormat,
    /// Format of the image to measure for: raw (default) or qcow2.
    #[arg(short = 'O', default_value = "raw")]
    out_format: String,
    /// Creation options of the new image (cluster_size, refcount_bits, extended_l2,
    /// compat, preallocation, backing_file, ...), as for `create`.
    #[arg(short = 'o')]
    options: Vec<String>,
    /// Measure for a new, empty image of this virtual size (instead of a source image).
    #[arg(long = "size", allow_hyphen_values = true)]
    size: Option<String>,
    /// Format of the source image (qcow2 or raw); probed when omitted.
    #[arg(short = 'f')]
    format: Option<String>,
    /// Measure an internal snapshot of the source: a name or ID, or
    /// `snapshot.id=ID,snapshot.name=NAME`.
    #[arg(short = 'l')]
    snapshot: Option<String>,
    #[command(flatten)]
    access: Access,
    /// The source image.
    file: Option<PathBuf>,
}

/// qemu-img's JSON form (`BlockMeasureInfo`); `bitmaps` only when both sides can hold them.
#[derive(Debug, Serialize)]
struct Json {
    #[serde(skip_serializing_if = "Option::is_none")]
    bitmaps: Option<u64>,
    required: u64,
    #[serde(rename = "fully-allocated")]
    fully_allocated: u64,
}

/// Run `qcow2 measure`.
pub async fn run(a: Args) -> Result<u8> {
    let size = match (&a.size, &a.file) {
        (Some(_), Some(_)) => bail!("--size N cannot be used together with a filename."),
        (None, None) => bail!("Either --size N or one filename must be specified."),
        (Some(s), None) => Some(parse_size_arg(s)?),
        (None, Some(_)) => None,
    };
    let m = match a.out_format.as_str() {
        "raw" => measure_raw(&a, size).await?,
        "qcow2" => measure_qcow2(&a, size).await?,
        f if NOT_MEASURABLE.contains(&f) => {
            bail!("Block driver '{f}' does not support size measurement")
        }
        f => bail!("Unknown file format '{f}'"),
    };
    print(&m, a.output)?;
    Ok(0)
}

/// A raw image is as large as its virtual size, whatever it holds (sectors of 512 bytes).
async fn measure_raw(a: &Args, size: Option<u64>) -> Result<Measurement> {
    for o in &a.options {
        for (key, _) in CreateOptions::parse_o(o)? {
            if key != "size" && key != "preallocation" {
                bail!("Invalid parameter '{key}' (invalid options for file format 'raw')");
            }
        }
    }
    let bytes = match size {
        Some(s) => s.next_multiple_of(512),
        None => open_source(a).await?.size(),
    };
    Ok(Measurement {
        required: bytes,
        fully_allocated: bytes,
        bitmaps: None,
    })
}

/// A qcow2 image: metadata for the whole virtual size plus the source's data clusters.
async fn measure_qcow2(a: &Args, size: Option<u64>) -> Result<Measurement> {
    let mut opts = CreateOptions::default();
    for o in &a.options {
        opts.apply_o(o)?;
    }
    if opts.size.is_some() && size.is_none() && a.file.is_none() {
        bail!("Either --size N or one filename must be specified.");
    }
    let Some(path) = &a.file else {
        return Ok(Measure::new(&opts, size.unwrap_or(0))?.finish(None));
    };
    let source = open_source(a).await?;
    let result = measure_source(&opts, &source, path).await;
    let closed = source.close().await;
    let m = result?;
    closed?;
    Ok(m)
}

/// Count the data clusters of an open source image.
async fn measure_source(
    opts: &CreateOptions,
    source: &Disk,
    path: &std::path::Path,
) -> Result<Measurement> {
    let mut m = Measure::new(opts, source.size())?;
    // A backing file in the target: QEMU cannot tell what it shares with the source, so
    // every cluster counts and the map is not needed.
    if opts.backing_file.is_none() {
        for e in source.map(0, source.size()).await? {
            if e.data && !e.zero {
                m.add_data(e.start, e.length);
            }
        }
    }
    let bitmaps = match source {
        Disk::Qcow2(img) if target_has_bitmaps(opts) => source_bitmaps(img)
            .await
            .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?
            .map(|b| bitmaps_size(&b, source.size(), opts.cluster_size)),
        _ => None,
    };
    Ok(m.finish(bitmaps))
}

/// Open the source image read-only, as `-f` and the access flags say.
async fn open_source(a: &Args) -> Result<Disk> {
    let Some(path) = &a.file else {
        bail!("Either --size N or one filename must be specified.");
    };
    if let Some(snap) = &a.snapshot {
        return super::snapshot::open_source(path, a.format.as_deref(), &a.access, snap).await;
    }
    Disk::open(path, a.format.as_deref(), false, &a.access).await
}

/// `--size`: qemu-img's messages for a negative or unparsable size.
fn parse_size_arg(s: &str) -> Result<u64> {
    if s.trim_start().starts_with('-') {
        bail!("Invalid image size specified. Must be between 0 and 9223372036854775807.");
    }
    match lib::parse_size(s) {
        Ok(v) if v <= i64::MAX as u64 => Ok(v),
        Ok(_) => {
            bail!("Invalid image size specified. Must be between 0 and 9223372036854775807.")
        }
        Err(_) => bail!("Invalid image size specified: '{s}'."),
    }
}

/// qemu-img's text or JSON.
fn print(m: &Measurement, format: OutputFormat) -> Result<()> {
    match format {
        OutputFormat::Human => {
            outln!("required size: {}", m.required);
            outln!("fully allocated size: {}", m.fully_allocated);
            if let Some(b) = m.bitmaps {
                outln!("bitmaps size: {b}");
            }
            Ok(())
        }
        OutputFormat::Json => print_json(&Json {
            bitmaps: m.bitmaps,
            required: m.required,
            fully_allocated: m.fully_allocated,
        }),
    }
}
