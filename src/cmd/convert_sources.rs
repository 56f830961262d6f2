//! The source of `qcow2 convert`: one or more images read as one disk, concatenated in
//! command-line order (qemu-img's `convert A B C DST`: the destination's size is the sum of
//! the sources' sizes, B's first byte follows A's last).
//!
//! Requests are split at the boundaries between sources. With `--salvage`, read errors do not
//! stop the copy: the unreadable 512-byte sectors read as zeros and each is reported with its
//! offset in its own source, as qemu-img reports them (`convert_salvage.rs` does the same for
//! allocation-status errors).

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Result;

use crate::disk::Disk;

/// qemu-img's unit of salvaging: a failed read is retried sector by sector.
pub const SECTOR: u64 = 512;

/// One source and where it starts in the concatenation.
#[derive(Debug)]
struct Part {
    disk: Disk,
    start: u64,
}

/// The sources, concatenated. Cloning shares them (for concurrent chunks).
#[derive(Debug, Clone)]
pub struct Sources {
    parts: Arc<Vec<Part>>,
    size: u64,
}

/// A piece of a request that falls in one source: the source, the offset in it, the length,
/// and where the piece starts relative to the request.
struct Piece<'a> {
    disk: &'a Disk,
    at: u64,
    len: u64,
    rel: u64,
}

impl Sources {
    /// The concatenation of `disks`, in order.
    pub fn new(disks: Vec<Disk>) -> Sources {
        let mut size = 0;
        let parts = disks
            .into_iter()
            .map(|disk| {
                let start = size;
                size += disk.size();
                Part { disk, start }
            })
            .collect();
        Sources {
            parts: Arc::new(parts),
            size,
        }
    }

    /// Total size in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// The first source (the only one when there is one).
    pub fn first(&self) -> &Disk {
        &self.parts[0].disk
    }

    /// The sources, in order.
    pub fn disks(&self) -> impl Iterator<Item = &Disk> {
        self.parts.iter().map(|p| &p.disk)
    }

    /// The pieces of `[off, off + len)`, one per source it touches.
    fn pieces(&self, off: u64, len: u64) -> Vec<Piece<'_>> {
        let end = off + len;
        self.parts
            .iter()
            .filter(|p| p.start < end && off < p.start + p.disk.size())
            .map(|p| {
                let from = off.max(p.start);
                let to = end.min(p.start + p.disk.size());
                Piece {
                    disk: &p.disk,
                    at: from - p.start,
                    len: to - from,
                    rel: from - off,
                }
            })
            .collect()
    }

    /// Read `buf.len()` bytes at `off`.
    pub async fn read_at(&self, buf: &mut [u8], off: u64) -> Result<()> {
        for p in self.pieces(off, buf.len() as u64) {
            let (a, b) = (usize::try_from(p.rel)?, usize::try_from(p.rel + p.len)?);
            p.disk.read_at(&mut buf[a..b], p.at).await?;
        }
        Ok(())
    }

    /// Read `buf.len()` bytes at `off`; where a read fails, retry sector by sector and leave
    /// the sectors that still fail zeroed. Returns qemu-img's warning for each such sector.
    pub async fn read_salvaging(&self, buf: &mut [u8], off: u64) -> Result<Vec<String>> {
        let mut warnings = Vec::new();
        for p in self.pieces(off, buf.len() as u64) {
            let (a, b) = (usize::try_from(p.rel)?, usize::try_from(p.rel + p.len)?);
            let piece = &mut buf[a..b];
            if p.disk.read_at(piece, p.at).await.is_ok() {
                continue;
            }
            for (i, sector) in piece.chunks_mut(SECTOR as usize).enumerate() {
                let at = p.at + i as u64 * SECTOR;
                if let Err(e) = p.disk.read_at(sector, at).await {
                    sector.fill(0);
                    warnings.push(format!("error while reading offset {at}: {}", strerror(&e)));
                }
            }
        }
        Ok(warnings)
    }

    /// The cluster size of the qcow2 source holding concatenated offset `off`.
    pub fn cluster_size_at(&self, off: u64) -> Option<u64> {
        match self.locate(off)? {
            (Disk::Qcow2(img), _) => Some(img.cluster_size()),
            _ => None,
        }
    }

    /// The source holding concatenated offset `off` and the offset in it.
    pub fn locate(&self, off: u64) -> Option<(&Disk, u64)> {
        self.parts
            .iter()
            .find(|p| p.start <= off && off < p.start + p.disk.size())
            .map(|p| (&p.disk, off - p.start))
    }
}

/// The C library's text for the OS error behind `e` (as qemu-img's messages show it), or
/// "Input/output error" when the engine found the problem itself (a corrupt entry, a failed
/// decompression): QEMU reports those as EIO.
pub fn strerror(e: &anyhow::Error) -> String {
    let os = e.chain().find_map(|c| {
        c.downcast_ref::<std::io::Error>()
            .and_then(|io| io.raw_os_error())
            .or_else(|| {
                c.downcast_ref::<qcow2_engine::Error>()
                    .and_then(|q| q.raw_os_error())
            })
    });
    let text = std::io::Error::from_raw_os_error(os.unwrap_or(libc::EIO)).to_string();
    // Rust appends " (os error N)" to the C library's text.
    match text.rfind(" (os error") {
        Some(i) => text[..i].to_string(),
        None => text,
    }
}

/// The paths of the sources and of the destination: every name but the last is a source.
pub fn split_files(files: &[PathBuf]) -> Result<(&[PathBuf], &PathBuf)> {
    match files.split_last() {
        Some((dst, srcs)) if !srcs.is_empty() => Ok((srcs, dst)),
        _ => anyhow::bail!("Must specify image file name"),
    }
}
