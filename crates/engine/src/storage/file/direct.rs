//! `O_DIRECT` IO: aligned bounce buffers, read-modify-write of partial blocks, and the two locks
//! that keep concurrent requests from losing each other's bytes.
//!
//! With `O_DIRECT` the kernel needs the memory address, the file offset and the length of every
//! transfer aligned to the device's logical block size. We use [`ALIGN`] (4096), which covers
//! every common device. A request that does not start or end on a block boundary is widened to
//! whole blocks: the partial head and tail blocks are read first and the caller's bytes are
//! patched in (read-modify-write).
//!
//! Two non-overlapping writes can share a block (two 512-byte writes into one 4 KiB block). If
//! both did RMW at once, the second writer would write back the block as it was before the
//! first, losing it. [`BlockLocks`] serializes RMW on a block. Only partial blocks are locked: a
//! write that covers a whole block overlaps every other write to that block, and the outcome of
//! overlapping concurrent writes is unspecified anyway.
//!
//! Widening also writes past the requested end. When the widened request passes the logical
//! length (the length the user set or wrote to), the file would grow to a block boundary, so
//! such writes hold the `size` lock, which also holds the logical length, and truncate back
//! afterwards. Writes that stay inside the logical length skip it.
//!
//! Lock order: block locks, then `size`. Nothing waits for a block lock while holding `size`.

use std::collections::HashSet;
use std::fs::File;
use std::io;
use std::sync::{Condvar, Mutex, MutexGuard, PoisonError};

use super::ZERO_CHUNK;
use super::sys::{self, Falloc};
use crate::units::to_usize;

/// Alignment of offsets, lengths and buffer addresses for `O_DIRECT` transfers.
pub(crate) const ALIGN: u64 = 4096;
const ALIGN_USIZE: usize = to_usize(ALIGN);

/// A heap buffer whose data area starts on an [`ALIGN`] boundary, covering the file range
/// `[aligned_offset, aligned_offset + span)`; the caller's bytes live at `skip..skip + len`.
pub(crate) struct Bounce {
    raw: Vec<u8>,
    base: usize,
    skip: usize,
    len: usize,
    span: usize,
    aligned_offset: u64,
}

impl Drop for Bounce {
    fn drop(&mut self) {
        super::super::pool::give(std::mem::take(&mut self.raw));
    }
}

impl Bounce {
    /// A zeroed buffer covering `len` bytes at `offset`, widened to whole blocks.
    pub(crate) fn new(offset: u64, len: usize) -> io::Result<Bounce> {
        let aligned_offset = align_down(offset);
        let skip = to_usize(offset - aligned_offset);
        let end = checked_end(offset, len as u64)?;
        let span = usize::try_from(align_up(end) - aligned_offset)
            .map_err(|_| sys::invalid_input("request too large"))?;
        // Over-allocate by one block and start at the first aligned address: safe code, and the
        // waste is small next to the transfer. The memory comes from the buffer pool.
        let mut raw = super::super::pool::take(span + ALIGN_USIZE);
        raw.resize(span + ALIGN_USIZE, 0);
        let base = (raw.as_ptr() as usize).wrapping_neg() % ALIGN_USIZE;
        Ok(Bounce {
            raw,
            base,
            skip,
            len,
            span,
            aligned_offset,
        })
    }

    /// A buffer for writing `data` at `offset`.
    pub(crate) fn with_data(data: &[u8], offset: u64) -> io::Result<Bounce> {
        if offset % ALIGN != 0 || data.len() % ALIGN_USIZE != 0 {
            let mut b = Bounce::new(offset, data.len())?;
            b.data_mut().copy_from_slice(data);
            return Ok(b);
        }
        // Whole blocks: the data fills the aligned area, so each byte is written once (no
        // zeroing first).
        let len = data.len();
        let mut raw = super::super::pool::take(len + ALIGN_USIZE);
        let base = (raw.as_ptr() as usize).wrapping_neg() % ALIGN_USIZE;
        raw.resize(base, 0);
        raw.extend_from_slice(data);
        raw.resize(len + ALIGN_USIZE, 0);
        Ok(Bounce {
            raw,
            base,
            skip: 0,
            len,
            span: len,
            aligned_offset: offset,
        })
    }

    /// The caller's bytes.
    pub(crate) fn data(&self) -> &[u8] {
        &self.raw[self.base + self.skip..self.base + self.skip + self.len]
    }

    fn data_mut(&mut self) -> &mut [u8] {
        &mut self.raw[self.base + self.skip..self.base + self.skip + self.len]
    }

    /// The whole aligned area.
    pub(crate) fn aligned(&self) -> &[u8] {
        &self.raw[self.base..self.base + self.span]
    }

    pub(crate) fn aligned_mut(&mut self) -> &mut [u8] {
        &mut self.raw[self.base..self.base + self.span]
    }

    /// The file offset of the aligned area's first byte.
    #[cfg_attr(not(all(target_os = "linux", feature = "uring")), allow(dead_code))] // used by the io_uring backend
    pub(crate) fn aligned_offset(&self) -> u64 {
        self.aligned_offset
    }

    fn aligned_end(&self) -> u64 {
        self.aligned_offset + self.span as u64
    }

    fn end(&self) -> u64 {
        self.aligned_offset + (self.skip + self.len) as u64
    }

    /// Blocks only partly covered by the caller's bytes (at most two, deduplicated).
    fn partial_blocks(&self) -> Vec<u64> {
        let mut blocks = Vec::with_capacity(2);
        let first = self.aligned_offset / ALIGN;
        let last = (self.aligned_end() - 1) / ALIGN;
        if self.skip != 0 {
            blocks.push(first);
        }
        if self.end() % ALIGN != 0 && !blocks.contains(&last) {
            blocks.push(last);
        }
        blocks
    }
}

/// Per-block locks for read-modify-write. A request takes all its blocks at once, so there is
/// no hold-and-wait between block locks and no deadlock.
#[derive(Debug, Default)]
struct BlockLocks {
    held: Mutex<HashSet<u64>>,
    freed: Condvar,
}

struct BlockGuard<'a> {
    locks: &'a BlockLocks,
    blocks: Vec<u64>,
}

impl BlockLocks {
    fn lock(&self, blocks: Vec<u64>) -> BlockGuard<'_> {
        let mut held = lock(&self.held);
        while blocks.iter().any(|b| held.contains(b)) {
            held = self
                .freed
                .wait(held)
                .unwrap_or_else(PoisonError::into_inner);
        }
        held.extend(blocks.iter().copied());
        BlockGuard {
            locks: self,
            blocks,
        }
    }
}

impl Drop for BlockGuard<'_> {
    fn drop(&mut self) {
        if self.blocks.is_empty() {
            return;
        }
        let mut held = lock(&self.locks.held);
        for b in &self.blocks {
            held.remove(b);
        }
        drop(held);
        self.locks.freed.notify_all();
    }
}

/// State of a file opened with `O_DIRECT`.
#[derive(Debug)]
pub(crate) struct DirectIo {
    locks: BlockLocks,
    /// The logical length; held across any write that may grow the file.
    size: Mutex<u64>,
}

impl DirectIo {
    pub(super) fn new(file: &File) -> io::Result<DirectIo> {
        let size = file.metadata()?.len();
        Ok(DirectIo {
            locks: BlockLocks::default(),
            size: Mutex::new(size),
        })
    }

    pub(super) fn len(&self) -> u64 {
        *lock(&self.size)
    }

    /// Prepare a whole-block write ending at `end` that bypasses [`DirectIo::write`] (the
    /// io_uring backend submits those itself): raise the logical length to `end` first, so that
    /// a concurrent read-modify-write that grows the file cannot truncate below it. Never
    /// blocks: `false` when the length is locked by a write in progress (use
    /// [`DirectIo::write`] then, which waits).
    #[cfg_attr(not(all(target_os = "linux", feature = "uring")), allow(dead_code))] // used by the io_uring backend
    pub(crate) fn try_reserve(&self, end: u64) -> bool {
        match self.size.try_lock() {
            Ok(mut size) => {
                *size = (*size).max(end);
                true
            }
            Err(std::sync::TryLockError::Poisoned(p)) => {
                let mut size = p.into_inner();
                *size = (*size).max(end);
                true
            }
            Err(std::sync::TryLockError::WouldBlock) => false,
        }
    }

    pub(super) fn read(&self, file: &File, len: usize, offset: u64) -> io::Result<Bounce> {
        let mut b = Bounce::new(offset, len)?;
        let at = b.aligned_offset;
        read_aligned(file, b.aligned_mut(), at)?;
        Ok(b)
    }

    /// Write the caller's bytes in `b`, filling partial head/tail blocks from the file first.
    pub(super) fn write(&self, file: &File, mut b: Bounce) -> io::Result<()> {
        if b.len == 0 {
            return Ok(());
        }
        let _blocks = self.locks.lock(b.partial_blocks());
        let mut size = Some(lock(&self.size));
        let old_len = size.as_deref().copied().unwrap_or_default();
        if b.aligned_end() <= old_len {
            size = None; // Stays inside the file: let other writers proceed.
        }
        fill_partial_blocks(file, &mut b)?;
        sys::write_full(file, b.aligned(), b.aligned_offset)?;
        if let Some(mut size) = size {
            let new_len = old_len.max(b.end());
            if b.aligned_end() > new_len {
                file.set_len(new_len)?;
            }
            *size = new_len;
        }
        Ok(())
    }

    /// Zero `[offset, offset + len)`: partial edge blocks by RMW, whole blocks by `fallocate`.
    pub(super) fn write_zeroes(&self, file: &File, offset: u64, len: u64) -> io::Result<()> {
        let end = checked_end(offset, len)?;
        let (mid_start, mid_end) = (align_up(offset), align_down(end));
        if mid_start >= mid_end {
            return self.write_zero_bytes(file, offset, end);
        }
        self.write_zero_bytes(file, offset, mid_start)?;
        let within = {
            let mut size = lock(&self.size);
            let within = mid_end.min(*size);
            if mid_end > *size {
                file.set_len(mid_end)?;
                *size = mid_end;
            }
            within
        };
        if mid_start < within {
            self.zero_blocks(file, mid_start, within)?;
        }
        self.write_zero_bytes(file, mid_end, end)
    }

    /// Punch whole blocks inside the range; partial edge blocks are left alone (discard is a
    /// hint, and punching them would race with RMW on the same block).
    pub(super) fn discard(&self, file: &File, offset: u64, len: u64) -> io::Result<()> {
        let end = checked_end(offset, len)?.min(self.len());
        let (start, end) = (align_up(offset), align_down(end));
        if start < end {
            return ignore_unsupported(sys::fallocate(file, Falloc::PunchHole, start, end - start));
        }
        Ok(())
    }

    /// Reserve blocks for the range, growing the file if it passes the end.
    pub(super) fn allocate(&self, file: &File, offset: u64, len: u64) -> io::Result<()> {
        let end = checked_end(offset, len)?;
        if len == 0 {
            // fallocate refuses an empty range with EINVAL; there is nothing to reserve.
            return Ok(());
        }
        {
            let mut size = lock(&self.size);
            match sys::fallocate(file, Falloc::Allocate, offset, len) {
                Ok(()) => {
                    *size = (*size).max(end);
                    return Ok(());
                }
                Err(e) if !sys::is_unsupported(&e) => return Err(e),
                Err(_) => {}
            }
        }
        let cur = self.len();
        if end > cur {
            self.write_zeroes(file, cur.max(offset), end - cur.max(offset))?;
        }
        Ok(())
    }

    pub(super) fn set_len(&self, file: &File, len: u64) -> io::Result<()> {
        let mut size = lock(&self.size);
        file.set_len(len)?;
        *size = len;
        Ok(())
    }

    /// Write zeros to `[start, end)` through the RMW path (a few blocks at most).
    fn write_zero_bytes(&self, file: &File, start: u64, end: u64) -> io::Result<()> {
        if start >= end {
            return Ok(());
        }
        self.write(file, Bounce::new(start, to_usize(end - start))?)
    }

    /// Zero whole blocks inside the file: `fallocate`, else aligned writes of zeros.
    fn zero_blocks(&self, file: &File, start: u64, end: u64) -> io::Result<()> {
        for mode in [Falloc::ZeroRange, Falloc::PunchHole] {
            match sys::fallocate(file, mode, start, end - start) {
                Ok(()) => return Ok(()),
                Err(e) if !sys::is_unsupported(&e) => return Err(e),
                Err(_) => {}
            }
        }
        let zeros = Bounce::new(0, to_usize(ZERO_CHUNK.min(end - start)))?;
        let mut at = start;
        while at < end {
            let n = to_usize(ZERO_CHUNK.min(end - at));
            sys::write_full(file, &zeros.aligned()[..n], at)?;
            at += n as u64;
        }
        Ok(())
    }
}

/// Read the file's current content of the partial head/tail blocks around the caller's bytes.
fn fill_partial_blocks(file: &File, b: &mut Bounce) -> io::Result<()> {
    let blocks = b.partial_blocks();
    if blocks.is_empty() {
        return Ok(());
    }
    let mut old = Bounce::new(0, ALIGN_USIZE)?;
    let (data_start, data_end) = (b.skip, b.skip + b.len);
    for block in blocks {
        read_aligned(file, old.aligned_mut(), block * ALIGN)?;
        let at = to_usize((block * ALIGN) - b.aligned_offset);
        // Keep the caller's bytes `lo..hi` of this block; take the rest from the file.
        let lo = data_start.saturating_sub(at).min(ALIGN_USIZE);
        let hi = data_end.saturating_sub(at).min(ALIGN_USIZE);
        let dst = &mut b.aligned_mut()[at..at + ALIGN_USIZE];
        dst[..lo].copy_from_slice(&old.aligned()[..lo]);
        dst[hi..].copy_from_slice(&old.aligned()[hi..]);
    }
    Ok(())
}

/// Read an aligned range; the file ends where a read returns zero or an unaligned count (a
/// further read at an unaligned offset would fail), and the rest is zero-filled.
fn read_aligned(file: &File, buf: &mut [u8], offset: u64) -> io::Result<()> {
    use std::os::unix::fs::FileExt;
    let mut done = 0;
    while done < buf.len() {
        match file.read_at(&mut buf[done..], offset + done as u64) {
            Ok(0) => break,
            Ok(n) => {
                done += n;
                if done % ALIGN_USIZE != 0 {
                    break;
                }
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    buf[done..].fill(0);
    Ok(())
}

fn ignore_unsupported(r: io::Result<()>) -> io::Result<()> {
    match r {
        Err(e) if sys::is_unsupported(&e) => Ok(()),
        r => r,
    }
}

/// `offset + len`, refused when it passes the largest file offset (`i64::MAX`, rounded down to a
/// block so that aligning up cannot overflow).
fn checked_end(offset: u64, len: u64) -> io::Result<u64> {
    offset
        .checked_add(len)
        .filter(|&end| end <= align_down(i64::MAX as u64))
        .ok_or_else(|| sys::invalid_input("offset + length past the largest file offset"))
}

fn align_down(v: u64) -> u64 {
    v / ALIGN * ALIGN
}

fn align_up(v: u64) -> u64 {
    v.div_ceil(ALIGN) * ALIGN
}

/// Lock a mutex, ignoring poisoning: the data it guards (a length, a set of block numbers) is
/// always consistent between statements.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}
