//! `qcow2 dd`: copy an image (or its first blocks, from a given block on) into a new image,
//! with `qemu-img dd`'s operands, messages and quirks.
//!
//! ```text
//! qcow2 dd [-U] [-f FMT] [-O raw|qcow2] [bs=BYTES] [count=BLOCKS] [skip=BLOCKS] if=INPUT of=OUTPUT
//! ```
//!
//! qemu-img's semantics, kept so that scripts get the same bytes: `bs` defaults to 512 and
//! takes size suffixes; `count` and `skip` are plain block counts; `count` limits where the
//! copy *ends* (`count × bs` bytes into the input), not how much it copies, so `skip=1
//! count=2` copies one block; a `skip` past the end prints "cannot skip to specified offset"
//! and creates an empty output (exit 0, like dd(1)). The output is always created anew, and
//! every block is written (a qcow2 output is fully allocated, as with qemu-img).

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{Context, Result, bail};
use qcow2_engine::image::create::parse_size;
use qcow2_engine::storage::{FileStorage, LockRequest};

use crate::access::Access;
use crate::disk::{Disk, open_qcow2};

/// Largest block size qemu-img accepts.
const MAX_BS: u64 = i32::MAX as u64;

/// Arguments of `qcow2 dd`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Input format (qcow2 or raw); probed when omitted.
    #[arg(short = 'f')]
    format: Option<String>,
    /// Output format: raw (default) or qcow2.
    #[arg(short = 'O', default_value = "raw")]
    output_format: String,
    #[command(flatten)]
    access: Access,
    /// Operands: `bs=BYTES`, `count=BLOCKS`, `skip=BLOCKS`, `if=INPUT`, `of=OUTPUT`.
    #[arg(allow_hyphen_values = true)]
    operands: Vec<String>,
}

/// The parsed operands (the last of each wins, as in qemu-img).
#[derive(Debug)]
struct Operands {
    bs: u64,
    count: Option<u64>,
    skip: Option<u64>,
    input: Option<PathBuf>,
    output: Option<PathBuf>,
}

/// Run `qcow2 dd`.
pub async fn run(a: Args) -> Result<u8> {
    let ops = parse_operands(&a.operands)?;
    let (Some(input), Some(output)) = (&ops.input, &ops.output) else {
        bail!("Must specify both input and output files");
    };
    if !matches!(a.output_format.as_str(), "raw" | "qcow2") {
        bail!(
            "unsupported output format '{}' (raw or qcow2)",
            a.output_format
        );
    }
    let src = Disk::open(input, a.format.as_deref(), false, &a.access).await?;
    let copied = copy_into(&a, &ops, &src, input, output).await;
    let closed = src.close().await;
    copied?;
    closed?;
    Ok(0)
}

/// Create the output and copy the blocks into it.
async fn copy_into(
    a: &Args,
    ops: &Operands,
    src: &Disk,
    input: &std::path::Path,
    output: &std::path::Path,
) -> Result<()> {
    let mut end = src.size();
    if let Some(count) = ops.count {
        end = end.min(count.saturating_mul(ops.bs));
    }
    let start = match ops.skip.map(|s| s.checked_mul(ops.bs)) {
        None => 0,
        Some(Some(s)) if s <= end => s,
        Some(_) => {
            errln!(
                "qcow2: {}: cannot skip to specified offset",
                input.display()
            );
            end
        }
    };
    let dst = create_output(&a.output_format, output, end - start).await?;
    let copied = copy_blocks(src, &dst, start, end, ops.bs).await;
    let closed = dst.close().await;
    copied?;
    closed.with_context(|| format!("closing '{}'", output.display()))
}

/// Copy `[start, end)` of `src` to offset 0 of `dst`, `bs` bytes at a time.
async fn copy_blocks(src: &Disk, dst: &Disk, start: u64, end: u64, bs: u64) -> Result<()> {
    // Blocks up to 2 GiB are allowed: move them in pieces of at most 1 MiB.
    let piece = bs.min(1 << 20);
    let mut buf = vec![0u8; usize::try_from(piece)?];
    let mut pos = start;
    while pos < end {
        let n = (end - pos).min(piece);
        let chunk = &mut buf[..usize::try_from(n)?];
        src.read_at(chunk, pos).await?;
        dst.write_at(chunk, pos - start).await?;
        pos += n;
    }
    Ok(())
}

/// Create (or truncate) the output image of `size` bytes.
async fn create_output(format: &str, path: &std::path::Path, size: u64) -> Result<Disk> {
    let creating = || format!("{}: error while creating output image", path.display());
    if format == "qcow2" {
        super::create::create_qcow2(path, size, None)
            .await
            .with_context(creating)?;
        return Ok(Disk::Qcow2(
            open_qcow2(path, true, &Access::default()).await?,
        ));
    }
    // QEMU creates raw images in whole 512-byte sectors.
    let size = size.next_multiple_of(512);
    let f = FileStorage::create(path).with_context(creating)?;
    f.lock(LockRequest::raw(true))
        .map_err(|e| qcow2_engine::Error::open("locking", path, e))?;
    qcow2_engine::Storage::set_len(&f, size)
        .await
        .with_context(creating)?;
    Ok(Disk::open_raw_storage(Arc::new(f), size))
}

/// Parse `key=value` operands with qemu-img's messages.
fn parse_operands(args: &[String]) -> Result<Operands> {
    let mut ops = Operands {
        bs: 512,
        count: None,
        skip: None,
        input: None,
        output: None,
    };
    for arg in args {
        let Some((key, value)) = arg.split_once('=') else {
            bail!("unrecognized operand {arg}");
        };
        match key {
            "bs" => ops.bs = parse_bs(value)?,
            "count" => ops.count = Some(parse_blocks("count", value)?),
            "skip" => ops.skip = Some(parse_blocks("skip", value)?),
            "if" => ops.input = Some(PathBuf::from(value)),
            "of" => ops.output = Some(PathBuf::from(value)),
            _ => bail!("unrecognized operand {key}"),
        }
    }
    Ok(ops)
}

/// `bs=`: a size with suffixes, 1..=2^31-1.
fn parse_bs(value: &str) -> Result<u64> {
    let bs = parse_size(value).map_err(|_| anyhow::anyhow!("Invalid bs specified: '{value}'."))?;
    if !(1..=MAX_BS).contains(&bs) {
        bail!("Invalid bs specified. Must be between 1 and {MAX_BS}.");
    }
    Ok(bs)
}

/// `count=`/`skip=`: a plain decimal number of blocks.
fn parse_blocks(what: &str, value: &str) -> Result<u64> {
    match value.trim().parse::<i64>() {
        Ok(n) if n >= 0 => Ok(n.unsigned_abs()),
        Ok(_) => bail!(
            "Invalid {what} specified. Must be between 0 and {}.",
            i64::MAX
        ),
        Err(_) => bail!("Invalid {what} specified: '{value}'."),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ops(args: &[&str]) -> Result<Operands> {
        parse_operands(&args.iter().map(|s| s.to_string()).collect::<Vec<_>>())
    }

    #[test]
    fn operands_like_qemu_img() {
        let o = ops(&["bs=4k", "count=3", "bs=8k", "if=a", "of=b"]).unwrap();
        assert_eq!((o.bs, o.count, o.skip), (8192, Some(3), None));
        for (args, msg) in [
            (
                &["bs=0"][..],
                "Invalid bs specified. Must be between 1 and 2147483647.",
            ),
            (
                &["bs=3G"],
                "Invalid bs specified. Must be between 1 and 2147483647.",
            ),
            (&["bs=1x"], "Invalid bs specified: '1x'."),
            (&["count=1k"], "Invalid count specified: '1k'."),
            (
                &["skip=-1"],
                "Invalid skip specified. Must be between 0 and 9223372036854775807.",
            ),
            (&["conv=notrunc"], "unrecognized operand conv"),
            (&["bs"], "unrecognized operand bs"),
        ] {
            assert_eq!(ops(args).unwrap_err().to_string(), msg, "{args:?}");
        }
    }
}
