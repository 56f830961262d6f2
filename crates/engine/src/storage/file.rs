//! [`FileStorage`]: the portable backend over a regular file or block device.
//!
//! Every syscall blocks, so none runs on the caller's executor: each request is handed to the
//! `blocking` crate's thread pool (`blocking::unblock`) together with an `Arc` of the open file,
//! and the pool wakes the caller's task when it is done. This keeps the engine independent of
//! any async runtime. The IO is queued when the method is called, not when the returned future
//! is first polled; dropping the future does not undo an IO that has started.
//!
//! Buffers are copied into (writes) or out of (reads) a `Vec` the IO thread owns. Borrowing the
//! caller's buffer instead would be unsound: if the caller drops (cancels) the future, the
//! borrow ends, but the thread may still be writing into that memory. The copy is cheap next to
//! the syscall. With `O_DIRECT` the owned buffer is also the aligned bounce buffer, so each byte
//! is still copied once (see `direct`).
//!
//! Zeroing and discarding use `fallocate` where the filesystem supports it:
//!
//! | operation      | inside the file                               | past the end          |
//! |----------------|-----------------------------------------------|-----------------------|
//! | `write_zeroes` | `ZERO_RANGE`, else `PUNCH_HOLE`, else writes  | grow (stays a hole)   |
//! | `discard`      | `PUNCH_HOLE` (skipped where unsupported)      | nothing               |
//! | `allocate`     | `fallocate` mode 0 (content unchanged)        | grow, blocks reserved |
//!
//! `write_zeroes` prefers `ZERO_RANGE` because it keeps blocks the image already owns allocated
//! (no fragmentation when they are written again); `discard` is the call that frees space.

mod direct;
mod sys;
#[cfg(test)]
mod tests;

use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use super::{IoFuture, Storage};
use crate::units::to_usize;
use sys::Falloc;

#[cfg_attr(
    not(all(target_os = "linux", feature = "uring")),
    allow(unused_imports)
)]
pub(super) use direct::{ALIGN, Bounce, DirectIo};

/// Largest zero buffer written at once when zeroing must be done by writing.
const ZERO_CHUNK: u64 = 1 << 20;

/// How to open a [`FileStorage`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct OpenFlags {
    /// Open for reading only; writes fail with [`io::ErrorKind::PermissionDenied`].
    pub read_only: bool,
    /// Bypass the page cache (`O_DIRECT`). Requests of any alignment are accepted: they go
    /// through 4 KiB-aligned bounce buffers, with read-modify-write for partial blocks. Opening
    /// fails with [`io::ErrorKind::Unsupported`] where the filesystem refuses `O_DIRECT`.
    pub direct: bool,
}

/// A file opened for qcow2 IO. Cloning shares the open file.
///
/// ```no_run
/// # async fn demo() -> std::io::Result<()> {
/// use qcow2_engine::Storage;
/// use qcow2_engine::storage::file::{FileStorage, OpenFlags};
///
/// let file = FileStorage::create("disk.raw")?;
/// file.write_at(b"hello", 0).await?;
/// file.flush().await?;
///
/// let file = FileStorage::open("disk.raw", OpenFlags { read_only: true, direct: false })?;
/// let mut buf = [0u8; 5];
/// file.read_at(&mut buf, 0).await?;
/// assert_eq!(&buf, b"hello");
/// # Ok(())
/// # }
/// ```
#[derive(Clone, Debug)]
pub struct FileStorage {
    inner: Arc<Inner>,
    path: PathBuf,
    flags: OpenFlags,
}

/// What the IO threads share.
#[derive(Debug)]
struct Inner {
    file: File,
    /// Whether non-blocking buffered writes are worth trying (cleared on EOPNOTSUPP).
    nowait_writes: AtomicBool,
    /// `Some` when opened with `O_DIRECT`.
    direct: Option<DirectIo>,
}

/// A buffer owned by the IO thread (see the module docs for why it is not borrowed).
enum OwnedBuf {
    Plain(Vec<u8>),
    Aligned(Bounce),
}

impl OwnedBuf {
    fn data(&self) -> &[u8] {
        match self {
            OwnedBuf::Plain(v) => v,
            OwnedBuf::Aligned(b) => b.data(),
        }
    }
}

impl FileStorage {
    /// Open an existing file. This blocks briefly (one `open` and, with `direct`, one `fstat`).
    pub fn open(path: impl AsRef<Path>, flags: OpenFlags) -> io::Result<FileStorage> {
        Self::open_inner(path.as_ref(), flags, false)
    }

    /// Create a file, or truncate an existing one, and open it read-write.
    pub fn create(path: impl AsRef<Path>) -> io::Result<FileStorage> {
        Self::create_with(path, OpenFlags::default())
    }

    /// Like [`FileStorage::create`], with `flags.direct` honoured (`read_only` must be false).
    pub fn create_with(path: impl AsRef<Path>, flags: OpenFlags) -> io::Result<FileStorage> {
        if flags.read_only {
            return Err(sys::invalid_input("cannot create a file read-only"));
        }
        Self::open_inner(path.as_ref(), flags, true)
    }

    fn open_inner(path: &Path, flags: OpenFlags, create: bool) -> io::Result<FileStorage> {
        let file = sys::open(path, !flags.read_only, create, flags.direct)?;
        let direct = if flags.direct {
            Some(DirectIo::new(&file)?)
        } else {
            None
        };
        let nowait_writes = AtomicBool::new(true);
        let inner = Arc::new(Inner {
            file,
            nowait_writes,
            direct,
        });
        Ok(FileStorage {
            inner,
            path: path.to_path_buf(),
            flags,
        })
    }

    /// Take QEMU-compatible image locks on the file (see [`super::lock`]); fails with
    /// [`io::ErrorKind::ResourceBusy`] (`Failed to get "write" lock`) when another holder
    /// (this process or another, ours or QEMU) conflicts. The locks last until the file is
    /// closed (every clone dropped).
    pub fn lock(&self, req: super::LockRequest) -> io::Result<()> {
        super::lock::lock(&self.inner.file, req)
    }

    /// The path the file was opened with.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The flags the file was opened with.
    pub fn flags(&self) -> OpenFlags {
        self.flags
    }

    /// The open file (for other backends of this module tree that drive it themselves).
    #[cfg_attr(not(all(target_os = "linux", feature = "uring")), allow(dead_code))] // used by the io_uring backend
    pub(super) fn file(&self) -> &File {
        &self.inner.file
    }

    /// The `O_DIRECT` state, when opened with `direct`.
    #[cfg_attr(not(all(target_os = "linux", feature = "uring")), allow(dead_code))] // used by the io_uring backend
    pub(super) fn direct_io(&self) -> Option<&DirectIo> {
        self.inner.direct.as_ref()
    }

    /// Read what the page cache holds without blocking (`preadv2(RWF_NOWAIT)`); returns how
    /// many leading bytes of `buf` are done (always 0 with `O_DIRECT`).
    pub(super) fn read_cached(&self, buf: &mut [u8], offset: u64) -> usize {
        match self.inner.direct {
            None => sys::read_nowait(&self.inner.file, buf, offset),
            Some(_) => 0,
        }
    }

    /// Write into the page cache without blocking (`pwritev2(RWF_NOWAIT)`); returns how many
    /// leading bytes of `buf` are done (always 0 with `O_DIRECT`, or once the filesystem has
    /// refused non-blocking writes).
    pub(super) fn write_cached(&self, buf: &[u8], offset: u64) -> usize {
        if self.inner.direct.is_some() || !self.inner.nowait_writes.load(Ordering::Relaxed) {
            return 0;
        }
        let (done, unsupported) = sys::write_nowait(&self.inner.file, buf, offset);
        if unsupported {
            self.inner.nowait_writes.store(false, Ordering::Relaxed);
        }
        done
    }

    /// Run `f` on an IO thread.
    fn run<T, F>(&self, f: F) -> IoFuture<'_, T>
    where
        T: Send + 'static,
        F: FnOnce(&Inner) -> io::Result<T> + Send + 'static,
    {
        let inner = Arc::clone(&self.inner);
        Box::pin(blocking::unblock(move || f(&inner)))
    }

    /// Like [`FileStorage::run`], for requests that modify the file.
    fn run_write<F>(&self, f: F) -> IoFuture<'_, ()>
    where
        F: FnOnce(&Inner) -> io::Result<()> + Send + 'static,
    {
        if self.flags.read_only {
            return Box::pin(std::future::ready(Err(read_only_error())));
        }
        self.run(f)
    }
}

pub(super) fn read_only_error() -> io::Error {
    io::Error::new(
        io::ErrorKind::PermissionDenied,
        "storage is opened read-only",
    )
}

impl Storage for FileStorage {
    fn read_at<'a>(&'a self, buf: &'a mut [u8], offset: u64) -> IoFuture<'a, ()> {
        // Fast path: data in the page cache is copied right here, without a thread handoff.
        let done = self.read_cached(buf, offset);
        if done == buf.len() {
            return Box::pin(std::future::ready(Ok(())));
        }
        let rest = &mut buf[done..];
        let (len, at) = (rest.len(), offset + done as u64);
        let task = self.run(move |inner| inner.read(len, at));
        Box::pin(async move {
            rest.copy_from_slice(task.await?.data());
            Ok(())
        })
    }

    fn write_at<'a>(&'a self, buf: &'a [u8], offset: u64) -> IoFuture<'a, ()> {
        if self.flags.read_only {
            return Box::pin(std::future::ready(Err(read_only_error())));
        }
        // Fast path: a write the page cache takes without blocking completes right here.
        let done = self.write_cached(buf, offset);
        if done == buf.len() {
            return Box::pin(std::future::ready(Ok(())));
        }
        let (buf, offset) = (&buf[done..], offset + done as u64);
        let data = match self.inner.direct {
            None => Ok(OwnedBuf::Plain(buf.to_vec())),
            Some(_) => Bounce::with_data(buf, offset).map(OwnedBuf::Aligned),
        };
        match data {
            Ok(data) => self.run_write(move |inner| inner.write(data, offset)),
            Err(e) => Box::pin(std::future::ready(Err(e))),
        }
    }

    fn write_zeroes(&self, offset: u64, len: u64) -> IoFuture<'_, ()> {
        self.run_write(move |inner| inner.write_zeroes(offset, len))
    }

    fn discard(&self, offset: u64, len: u64) -> IoFuture<'_, ()> {
        self.run_write(move |inner| inner.discard(offset, len))
    }

    fn flush(&self) -> IoFuture<'_, ()> {
        self.run(|inner| inner.file.sync_data())
    }

    fn len(&self) -> IoFuture<'_, u64> {
        self.run(|inner| inner.len())
    }

    fn set_len(&self, len: u64) -> IoFuture<'_, ()> {
        self.run_write(move |inner| inner.set_len(len))
    }

    fn path(&self) -> Option<&Path> {
        Some(&self.path)
    }

    fn grows_ahead(&self) -> bool {
        true
    }

    fn allocated_size(&self) -> IoFuture<'_, Option<u64>> {
        use std::os::unix::fs::MetadataExt;
        self.run(|inner| Ok(Some(inner.file.metadata()?.blocks() * 512)))
    }

    fn block_status(&self, offset: u64, len: u64) -> IoFuture<'_, (bool, u64)> {
        self.run(move |inner| sys::data_status(&inner.file, offset, len))
    }

    fn allocate(&self, offset: u64, len: u64) -> IoFuture<'_, ()> {
        self.run_write(move |inner| inner.allocate(offset, len))
    }

    fn release_locks(&self) -> io::Result<()> {
        super::lock::unlock(&self.inner.file)
    }
}

/// The blocking implementations, run on IO threads.
impl Inner {
    fn read(&self, len: usize, offset: u64) -> io::Result<OwnedBuf> {
        if let Some(d) = &self.direct {
            return d.read(&self.file, len, offset).map(OwnedBuf::Aligned);
        }
        let mut v = vec![0; len];
        sys::read_full(&self.file, &mut v, offset)?;
        Ok(OwnedBuf::Plain(v))
    }

    fn write(&self, data: OwnedBuf, offset: u64) -> io::Result<()> {
        match (data, &self.direct) {
            (OwnedBuf::Aligned(b), Some(d)) => d.write(&self.file, b),
            (data, _) => sys::write_full(&self.file, data.data(), offset),
        }
    }

    fn len(&self) -> io::Result<u64> {
        match &self.direct {
            Some(d) => Ok(d.len()),
            None => Ok(self.file.metadata()?.len()),
        }
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        match &self.direct {
            Some(d) => d.set_len(&self.file, len),
            None => self.file.set_len(len),
        }
    }

    fn write_zeroes(&self, offset: u64, len: u64) -> io::Result<()> {
        if let Some(d) = &self.direct {
            return d.write_zeroes(&self.file, offset, len);
        }
        let end = checked_end(offset, len)?;
        if len == 0 {
            return Ok(());
        }
        let file_len = self.file.metadata()?.len();
        if offset < file_len {
            self.zero_within(offset, end.min(file_len))?;
        }
        if end > file_len {
            // Grow by writing the last byte rather than `set_len(end)`: a concurrent write may
            // have grown the file past `end` since the `fstat`, and `set_len` would cut it off.
            // The skipped-over range stays a hole, which reads as zeros.
            sys::write_full(&self.file, &[0], end - 1)?;
        }
        Ok(())
    }

    /// Zero `[start, end)`, which lies inside the file: `fallocate`, else writes of zeros.
    fn zero_within(&self, start: u64, end: u64) -> io::Result<()> {
        for mode in [Falloc::ZeroRange, Falloc::PunchHole] {
            match sys::fallocate(&self.file, mode, start, end - start) {
                Ok(()) => return Ok(()),
                Err(e) if !sys::is_unsupported(&e) => return Err(e),
                Err(_) => {}
            }
        }
        let zeros = vec![0u8; to_usize(ZERO_CHUNK.min(end - start))];
        let mut at = start;
        while at < end {
            let n = to_usize(ZERO_CHUNK.min(end - at));
            sys::write_full(&self.file, &zeros[..n], at)?;
            at += n as u64;
        }
        Ok(())
    }

    fn discard(&self, offset: u64, len: u64) -> io::Result<()> {
        if let Some(d) = &self.direct {
            return d.discard(&self.file, offset, len);
        }
        let end = checked_end(offset, len)?.min(self.file.metadata()?.len());
        if offset >= end {
            return Ok(());
        }
        match sys::fallocate(&self.file, Falloc::PunchHole, offset, end - offset) {
            Err(e) if sys::is_unsupported(&e) => Ok(()),
            r => r,
        }
    }

    fn allocate(&self, offset: u64, len: u64) -> io::Result<()> {
        if let Some(d) = &self.direct {
            return d.allocate(&self.file, offset, len);
        }
        let end = checked_end(offset, len)?;
        if len == 0 {
            return Ok(());
        }
        match sys::fallocate(&self.file, Falloc::Allocate, offset, len) {
            Err(e) if sys::is_unsupported(&e) => {
                // Nothing to reserve with; make the part past the end exist (and read zeros).
                let file_len = self.file.metadata()?.len();
                let from = file_len.max(offset);
                if end > from {
                    self.write_zeroes(from, end - from)
                } else {
                    Ok(())
                }
            }
            r => r,
        }
    }
}

fn checked_end(offset: u64, len: u64) -> io::Result<u64> {
    offset
        .checked_add(len)
        .ok_or_else(|| sys::invalid_input("offset + length overflows"))
}
