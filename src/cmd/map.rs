//! `qcow2 map`: the allocation map, in `qemu-img map`'s exact text layout.

use std::path::{Path, PathBuf};

use anyhow::{Result, bail};
use qcow2_engine::image::Extent;

use super::OutputFormat;
use crate::access::Access;
use crate::args::parse_size;
use crate::disk::{Disk, full_backing_name};

/// Arguments of `qcow2 map`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Image format (qcow2 or raw); probed when omitted.
    #[arg(short = 'f')]
    format: Option<String>,
    /// Output format.
    #[arg(long, value_enum, default_value = "human")]
    output: OutputFormat,
    /// First guest offset to report.
    #[arg(short = 's', long, value_parser = parse_size, default_value = "0")]
    start_offset: u64,
    /// Bytes to report (default: up to the end of the image).
    #[arg(short = 'l', long, value_parser = parse_size)]
    max_length: Option<u64>,
    #[command(flatten)]
    access: Access,
    /// The image file.
    file: PathBuf,
}

/// Extents are queried in windows of this many bytes, so memory stays bounded.
const WINDOW: u64 = 1 << 30;

/// Run `qcow2 map`.
pub async fn run(a: Args) -> Result<u8> {
    let disk = Disk::open(&a.file, a.format.as_deref(), false, &a.access).await?;
    let start = a.start_offset.min(disk.size());
    let end = a
        .max_length
        .map_or(disk.size(), |l| start.saturating_add(l).min(disk.size()));
    let mut out = Printer::new(a.output, layer_names(&a.file, &disk));
    let mut pending: Option<Extent> = None;
    let mut off = start;
    while off < end {
        let n = (end - off).min(WINDOW);
        for e in disk.map(off, n).await? {
            pending = match pending {
                Some(mut p) if mergeable(&p, &e) => {
                    p.length += e.length;
                    Some(p)
                }
                Some(p) => {
                    out.extent(&p)?;
                    Some(e)
                }
                None => Some(e),
            };
        }
        off += n;
    }
    if let Some(p) = pending {
        out.extent(&p)?;
    }
    out.finish(start);
    Ok(0)
}

/// qemu-img's merge rule: same flags and depth, host offsets (if any) continue.
fn mergeable(a: &Extent, b: &Extent) -> bool {
    let offsets = match (a.offset, b.offset) {
        (None, None) => true,
        (Some(x), Some(y)) => x + a.length == y,
        _ => false,
    };
    offsets
        && (a.depth, a.present, a.zero, a.data, a.compressed)
            == (b.depth, b.present, b.zero, b.data, b.compressed)
}

/// File names of the chain's layers, by depth, as human output names them.
fn layer_names(file: &Path, disk: &Disk) -> Vec<String> {
    let mut names = vec![file.display().to_string()];
    let Disk::Qcow2(img) = disk else { return names };
    let mut cur = img.clone();
    let mut path = file.to_path_buf();
    while let (Some(name), Some(b)) = (cur.header().backing_file, cur.backing()) {
        path = full_backing_name(&path, &name);
        names.push(path.display().to_string());
        match b {
            qcow2_engine::image::Backing::Qcow2(next) => cur = next.clone(),
            qcow2_engine::image::Backing::Raw { .. } => break,
        }
    }
    names
}

/// Writes extents as they are produced.
struct Printer {
    format: OutputFormat,
    names: Vec<String>,
    count: u64,
}

impl Printer {
    fn new(format: OutputFormat, names: Vec<String>) -> Self {
        if format == OutputFormat::Human {
            outln!("{:<16}{:<16}{:<16}File", "Offset", "Length", "Mapped to");
        }
        Printer {
            format,
            names,
            count: 0,
        }
    }

    fn extent(&mut self, e: &Extent) -> Result<()> {
        match self.format {
            OutputFormat::Json => {
                let sep = if self.count == 0 { "[" } else { ",\n" };
                out!("{sep}{}", json_line(e));
            }
            OutputFormat::Human => self.human(e)?,
        }
        self.count += 1;
        Ok(())
    }

    fn human(&self, e: &Extent) -> Result<()> {
        // Zero extents are left out even when preallocated (data with zero).
        if !e.data || e.zero {
            return Ok(());
        }
        let Some(host) = e.offset else {
            bail!("File contains external, encrypted or compressed clusters.");
        };
        let file = self.names.get(e.depth as usize).map_or("?", String::as_str);
        outln!(
            "{:<16}{:<16}{:<16}{file}",
            hex(e.start),
            hex(e.length),
            hex(host)
        );
        Ok(())
    }

    /// Close the JSON list (an empty range prints qemu-img's single empty extent).
    fn finish(&self, start: u64) {
        if self.format != OutputFormat::Json {
            return;
        }
        if self.count == 0 {
            let e = Extent {
                start,
                length: 0,
                depth: 0,
                present: false,
                zero: false,
                data: false,
                compressed: false,
                offset: None,
            };
            out!("[{}", json_line(&e));
        }
        outln!("]");
    }
}

/// `%#x`: `0` for zero, else `0x…`.
fn hex(v: u64) -> String {
    if v == 0 {
        "0".into()
    } else {
        format!("{v:#x}")
    }
}

/// One extent in qemu-img's JSON line layout.
fn json_line(e: &Extent) -> String {
    let mut s = format!(
        "{{ \"start\": {}, \"length\": {}, \"depth\": {}, \"present\": {}, \"zero\": {}, \
         \"data\": {}, \"compressed\": {}",
        e.start, e.length, e.depth, e.present, e.zero, e.data, e.compressed
    );
    if let Some(o) = e.offset {
        s.push_str(&format!(", \"offset\": {o}"));
    }
    s.push('}');
    s
}
