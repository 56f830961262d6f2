//! `qcow2 convert -C`: copy offloading. Between raw files, data ranges are copied by the
//! kernel (`copy_file_range`: no copy through user space, a reflink or server-side copy where
//! the filesystem can), as qemu-img does. Any other pair of formats, and any failure of the
//! call, falls back to reading and writing (qemu-img's fallback too); zero ranges are handled
//! as without `-C`.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::Result;

use super::convert_sources::Sources;
use crate::disk::Disk;

/// A source file and where it starts in the concatenation.
#[derive(Debug)]
struct Part {
    start: u64,
    size: u64,
    file: File,
}

/// Open files for `copy_file_range`, and whether it still works.
#[derive(Debug)]
pub struct Offload {
    parts: Vec<Part>,
    dst: File,
    working: AtomicBool,
}

impl Offload {
    /// Offloading between `paths` (the sources, opened as `src`) and the destination
    /// `dst_path` (opened as `dst`), when all of them are raw files; `None` otherwise.
    pub fn open(
        src: &Sources,
        paths: &[PathBuf],
        dst: &Disk,
        dst_path: &Path,
    ) -> Result<Option<Offload>> {
        let all_raw = src.disks().all(|d| matches!(d, Disk::Raw(_)));
        if !all_raw || !matches!(dst, Disk::Raw(_)) {
            return Ok(None);
        }
        let mut parts = Vec::new();
        let mut start = 0;
        for (disk, path) in src.disks().zip(paths) {
            let file = File::open(path)?;
            parts.push(Part {
                start,
                size: disk.size(),
                file,
            });
            start += disk.size();
        }
        let dst = File::options().write(true).open(dst_path)?;
        Ok(Some(Offload {
            parts,
            dst,
            working: AtomicBool::new(true),
        }))
    }

    /// Copy `[off, off + len)` of the concatenation to the same offset of the destination.
    /// Returns how many bytes were copied from the start: less than `len` where a source file
    /// ends early (a raw file's last partial sector) or offloading failed; the caller copies
    /// the rest itself. After a failure, offloading stays off, as in qemu-img.
    pub fn copy(&self, off: u64, len: u64) -> u64 {
        let mut done = 0;
        while done < len && self.working.load(Ordering::Relaxed) {
            let at = off + done;
            let Some(p) = self
                .parts
                .iter()
                .find(|p| p.start <= at && at < p.start + p.size)
            else {
                break;
            };
            let n = (len - done).min(p.start + p.size - at);
            match copy_range(&p.file, at - p.start, &self.dst, at, n) {
                Ok(0) => break,
                Ok(copied) => done += copied,
                Err(_) => self.working.store(false, Ordering::Relaxed),
            }
        }
        done
    }
}

/// One `copy_file_range` call: bytes copied (0 at the source's end of file).
fn copy_range(
    src: &File,
    src_off: u64,
    dst: &File,
    dst_off: u64,
    len: u64,
) -> std::io::Result<u64> {
    let mut off_in = libc::loff_t::try_from(src_off).map_err(std::io::Error::other)?;
    let mut off_out = libc::loff_t::try_from(dst_off).map_err(std::io::Error::other)?;
    let len = usize::try_from(len).map_err(std::io::Error::other)?;
    // SAFETY: both descriptors are open for the life of the borrows, and the offset pointers
    // point to live locals; the kernel reads and updates only those.
    let n = unsafe {
        libc::copy_file_range(
            src.as_raw_fd(),
            &mut off_in,
            dst.as_raw_fd(),
            &mut off_out,
            len,
            0,
        )
    };
    if n < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(n as u64)
}
