//! [`CappedStorage`]: in-memory storage that refuses to grow past a small limit.
//!
//! `MemoryStorage` already refuses offsets past 4 GiB, but 4 GiB is more than a fuzzer's RSS
//! limit: a hostile L2 entry pointing at 3 GiB must fail a write, not allocate 3 GiB.

use std::io;
use std::path::Path;

use qcow2_engine::Storage;
use qcow2_engine::storage::{IoFuture, MemoryStorage};

/// The largest a fuzzed image file may become: 64 MiB.
pub const MAX_LEN: u64 = 64 << 20;

/// A [`MemoryStorage`] whose writes, zero-writes and `set_len` fail with "file too large"
/// past [`MAX_LEN`]. Reads past the end still return zeros without allocating storage.
#[derive(Debug)]
pub struct CappedStorage {
    inner: MemoryStorage,
}

impl CappedStorage {
    /// A storage holding `data` (which may already be longer than the cap; it only stops growth).
    pub fn new(data: Vec<u8>) -> CappedStorage {
        CappedStorage {
            inner: MemoryStorage::from_vec(data),
        }
    }

    /// A copy of the current contents.
    pub fn snapshot(&self) -> Vec<u8> {
        self.inner.snapshot()
    }
}

/// `Ok` when `[offset, offset + len)` ends within [`MAX_LEN`].
fn fits(offset: u64, len: u64) -> io::Result<()> {
    match offset.checked_add(len) {
        Some(end) if end <= MAX_LEN => Ok(()),
        _ => Err(io::Error::new(
            io::ErrorKind::FileTooLarge,
            "fuzzing storage capped at 64 MiB",
        )),
    }
}

/// A future that fails at once.
fn refused<'a, T: Send + 'a>(e: io::Error) -> IoFuture<'a, T> {
    Box::pin(std::future::ready(Err(e)))
}

impl Storage for CappedStorage {
    fn read_at<'a>(&'a self, buf: &'a mut [u8], offset: u64) -> IoFuture<'a, ()> {
        self.inner.read_at(buf, offset)
    }

    fn write_at<'a>(&'a self, buf: &'a [u8], offset: u64) -> IoFuture<'a, ()> {
        match fits(offset, buf.len() as u64) {
            Ok(()) => self.inner.write_at(buf, offset),
            Err(e) => refused(e),
        }
    }

    fn write_zeroes(&self, offset: u64, len: u64) -> IoFuture<'_, ()> {
        match fits(offset, len) {
            Ok(()) => self.inner.write_zeroes(offset, len),
            Err(e) => refused(e),
        }
    }

    fn discard(&self, offset: u64, len: u64) -> IoFuture<'_, ()> {
        self.inner.discard(offset, len)
    }

    fn flush(&self) -> IoFuture<'_, ()> {
        self.inner.flush()
    }

    fn len(&self) -> IoFuture<'_, u64> {
        self.inner.len()
    }

    fn set_len(&self, len: u64) -> IoFuture<'_, ()> {
        match fits(0, len) {
            Ok(()) => self.inner.set_len(len),
            Err(e) => refused(e),
        }
    }

    fn path(&self) -> Option<&Path> {
        None
    }
}
