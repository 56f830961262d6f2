//! `qcow2 compare`: do two images read the same? Modelled on `qemu-img compare`.
//!
//! Exit status: 0 identical, 1 different, 2 error. Messages go to stdout (unless `-q`):
//! - `Images are identical.`
//! - `Content mismatch at offset N!`: N is the start of the first differing 512-byte sector
//!   (qemu-img compares sector-wise and reports the sector, not the byte).
//! - `Warning: Image size mismatch!`: sizes differ and the common part matched; then the
//!   tail of the larger image must read as zeros.
//! - `-s` (strict): differing sizes fail (`Strict mode: Image size mismatch!`), and so does a
//!   differing allocation status (`Strict mode: Offset N block status mismatch!`).
//!
//! Regions that read as zeros in both images (per `map`) are skipped without reading.

use std::path::PathBuf;

use anyhow::Result;
use qcow2_engine::image::Extent;

use crate::access::Access;
use crate::disk::Disk;

/// Arguments of `qcow2 compare`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Format of the first image (qcow2 or raw); probed when omitted.
    #[arg(short = 'f')]
    format1: Option<String>,
    /// Format of the second image (qcow2 or raw); probed when omitted.
    #[arg(short = 'F')]
    format2: Option<String>,
    /// Strict mode: sizes and allocation status must match too.
    #[arg(short = 's')]
    strict: bool,
    /// Quiet: print nothing, report through the exit status only.
    #[arg(short = 'q')]
    quiet: bool,
    #[command(flatten)]
    access: Access,
    /// The first image.
    image1: PathBuf,
    /// The second image.
    image2: PathBuf,
}

/// Extents are queried in windows of this many bytes, so memory stays bounded.
const WINDOW: u64 = 1 << 30;
/// Largest read, per image.
const CHUNK: u64 = 4 << 20;
/// qemu-img compares and reports in sectors.
const SECTOR: u64 = 512;

/// Outcome of a comparison, before printing.
#[derive(Debug, PartialEq, Eq)]
enum Verdict {
    Identical,
    Mismatch(u64),
    StrictSize,
    StrictStatus(u64),
}

/// Run `qcow2 compare`. Errors exit with status 2, like qemu-img.
pub async fn run(a: Args) -> Result<u8> {
    match compare(&a).await {
        Ok(code) => Ok(code),
        Err(e) => {
            errln!(
                "qcow2: {}",
                crate::output::error_text(&e).replace('\n', " ")
            );
            Ok(2)
        }
    }
}

async fn compare(a: &Args) -> Result<u8> {
    let d1 = Disk::open(&a.image1, a.format1.as_deref(), false, &a.access).await?;
    let d2 = Disk::open(&a.image2, a.format2.as_deref(), false, &a.access).await?;
    let say = |s: String| {
        if !a.quiet {
            outln!("{s}");
        }
    };
    let verdict = match verdict(&d1, &d2, a.strict, &say).await? {
        Verdict::Identical => {
            say("Images are identical.".into());
            return Ok(0);
        }
        Verdict::Mismatch(off) => format!("Content mismatch at offset {off}!"),
        Verdict::StrictSize => "Strict mode: Image size mismatch!".into(),
        Verdict::StrictStatus(off) => format!("Strict mode: Offset {off} block status mismatch!"),
    };
    say(verdict);
    Ok(1)
}

async fn verdict(d1: &Disk, d2: &Disk, strict: bool, say: impl Fn(String)) -> Result<Verdict> {
    if strict && d1.size() != d2.size() {
        return Ok(Verdict::StrictSize);
    }
    let common = d1.size().min(d2.size());
    let mut off = 0;
    while off < common {
        let n = (common - off).min(WINDOW);
        if let Some(v) = compare_window(d1, d2, off, n, strict).await? {
            return Ok(v);
        }
        off += n;
    }
    if d1.size() == d2.size() {
        return Ok(Verdict::Identical);
    }
    // Like qemu-img, warn only once the common part matched.
    say("Warning: Image size mismatch!".into());
    let longer = if d1.size() > d2.size() { d1 } else { d2 };
    Ok(match first_nonzero(longer, common).await? {
        Some(at) => Verdict::Mismatch(at),
        None => Verdict::Identical,
    })
}

/// The status qemu-img's strict mode compares: allocated, zero, data, compressed, and
/// whether the extent reaches the end of the image (QEMU's `BDRV_BLOCK_EOF`).
fn status(e: &Extent, len: u64, size: u64) -> (bool, bool, bool, bool, bool) {
    let eof = e.start + len == size;
    (e.present, e.zero, e.data, e.compressed, eof)
}

/// Compare `[off, off + n)` of both images; `None` when it is the same.
async fn compare_window(
    d1: &Disk,
    d2: &Disk,
    off: u64,
    n: u64,
    strict: bool,
) -> Result<Option<Verdict>> {
    let (m1, m2) = (d1.map(off, n).await?, d2.map(off, n).await?);
    let (mut i1, mut i2) = (m1.iter().peekable(), m2.iter().peekable());
    let mut pos = off;
    // A run still to be read and compared, merged across extents to read in large chunks.
    let mut pending: Option<(u64, u64)> = None;
    while let (Some(e1), Some(e2)) = (i1.peek(), i2.peek()) {
        let end = (e1.start + e1.length).min(e2.start + e2.length);
        if strict {
            let s1 = status(e1, e1.start + e1.length - pos, d1.size());
            let s2 = status(e2, e2.start + e2.length - pos, d2.size());
            if s1 != s2 {
                if let Some(v) = flush_pending(d1, d2, &mut pending).await? {
                    return Ok(Some(v));
                }
                return Ok(Some(Verdict::StrictStatus(pos)));
            }
        }
        if !(e1.zero && e2.zero) {
            pending = match pending {
                Some((s, l)) if s + l == pos => Some((s, l + end - pos)),
                other => {
                    let mut p = other;
                    if let Some(v) = flush_pending(d1, d2, &mut p).await? {
                        return Ok(Some(v));
                    }
                    Some((pos, end - pos))
                }
            };
        }
        pos = end;
        if e1.start + e1.length == end {
            i1.next();
        }
        if e2.start + e2.length == end {
            i2.next();
        }
    }
    flush_pending(d1, d2, &mut pending).await
}

/// Read and compare the pending run, if any.
async fn flush_pending(
    d1: &Disk,
    d2: &Disk,
    pending: &mut Option<(u64, u64)>,
) -> Result<Option<Verdict>> {
    let Some((start, len)) = pending.take() else {
        return Ok(None);
    };
    let mut pos = start;
    while pos < start + len {
        let n = (start + len - pos).min(CHUNK) as usize;
        let (mut b1, mut b2) = (vec![0u8; n], vec![0u8; n]);
        d1.read_at(&mut b1, pos).await?;
        d2.read_at(&mut b2, pos).await?;
        if let Some(i) = b1.iter().zip(&b2).position(|(x, y)| x != y) {
            return Ok(Some(Verdict::Mismatch(sector_floor(pos + i as u64))));
        }
        pos += n as u64;
    }
    Ok(None)
}

/// The first sector of `d` at or after `from` that does not read as zeros.
async fn first_nonzero(d: &Disk, from: u64) -> Result<Option<u64>> {
    let mut off = from;
    while off < d.size() {
        let n = (d.size() - off).min(WINDOW);
        for e in d.map(off, n).await?.iter().filter(|e| !e.zero) {
            let mut pos = e.start;
            while pos < e.start + e.length {
                let len = (e.start + e.length - pos).min(CHUNK) as usize;
                let mut buf = vec![0u8; len];
                d.read_at(&mut buf, pos).await?;
                if let Some(i) = buf.iter().position(|&b| b != 0) {
                    return Ok(Some(sector_floor(pos + i as u64)));
                }
                pos += len as u64;
            }
        }
        off += n;
    }
    Ok(None)
}

fn sector_floor(off: u64) -> u64 {
    off & !(SECTOR - 1)
}
