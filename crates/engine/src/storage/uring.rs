//! [`UringStorage`]: the Linux backend that moves data through io_uring.
//!
//! Same semantics as [`FileStorage`] (it wraps one, over the same open file): reads past the
//! end give zeros, `flush` is `fdatasync`, and `O_DIRECT` accepts requests of any alignment.
//! What changes is who waits for the disk. Reads, writes and flushes are queued to a ring
//! driven by one thread per storage (see `ring`), which submits everything queued since its
//! last wake-up with one `io_uring_enter` and completes the callers' futures from the CQEs.
//! Nothing needs a particular async runtime: a future is woken through a oneshot channel.
//!
//! | request                               | path                                          |
//! |---------------------------------------|-----------------------------------------------|
//! | read / write hitting the page cache   | inline `RWF_NOWAIT` (as `FileStorage`)        |
//! | other buffered read / write, flush    | the ring                                      |
//! | `O_DIRECT` read (any alignment)       | the ring, into an aligned bounce buffer       |
//! | `O_DIRECT` write of whole blocks      | the ring, from an aligned bounce buffer       |
//! | `O_DIRECT` write of partial blocks    | `FileStorage` (read-modify-write under locks) |
//! | zeroes, discard, allocate, len, …     | `FileStorage` (rare, several syscalls each)   |
//!
//! Buffers: like `FileStorage`, a request copies the caller's bytes into (or out of) a buffer
//! that the ring owns until the kernel's completion has been reaped, so dropping a future in
//! flight never leaves the kernel writing into freed or reused memory; the request still
//! completes, its result is thrown away. The copy is the price of safe cancellation.
//!
//! Setup fails (and [`UringStorage::open`] returns the error) where io_uring is unavailable:
//! kernels before 5.6, seccomp filters (containers commonly block it), or
//! `kernel.io_uring_disabled`. [`super::open_file`] with [`super::IoBackend::Auto`] then falls
//! back to [`FileStorage`].

mod op;
mod ring;
#[cfg(test)]
mod tests;

use std::io;
use std::path::Path;
use std::sync::Arc;

use tokio::sync::oneshot;

use super::file::{ALIGN, Bounce, FileStorage, OpenFlags, read_only_error};
use super::{IoFuture, Storage};
use op::{IoBuf, Kind, Op, Reply};
use ring::Ring;

/// A file whose data IO goes through io_uring. Cloning shares the file and the ring.
///
/// ```no_run
/// # async fn demo() -> std::io::Result<()> {
/// use qcow2_engine::Storage;
/// use qcow2_engine::storage::UringStorage;
///
/// let file = UringStorage::create("disk.raw")?; // fails where io_uring is unavailable
/// file.write_at(b"hello", 0).await?;
/// file.flush().await?;
/// let mut buf = [0u8; 5];
/// file.read_at(&mut buf, 0).await?;
/// assert_eq!(&buf, b"hello");
/// # Ok(())
/// # }
/// ```
#[derive(Clone, Debug)]
pub struct UringStorage {
    file: FileStorage,
    ring: Arc<Ring>,
    /// Try the inline page-cache paths first (tests turn this off to drive the ring).
    inline: bool,
}

impl UringStorage {
    /// Open an existing file and set up its ring.
    pub fn open(path: impl AsRef<Path>, flags: OpenFlags) -> io::Result<UringStorage> {
        Self::with_file(FileStorage::open(path, flags)?)
    }

    /// Create a file, or truncate an existing one, open it read-write and set up its ring.
    pub fn create(path: impl AsRef<Path>) -> io::Result<UringStorage> {
        Self::create_with(path, OpenFlags::default())
    }

    /// Like [`UringStorage::create`], with `flags.direct` honoured (`read_only` must be false).
    pub fn create_with(path: impl AsRef<Path>, flags: OpenFlags) -> io::Result<UringStorage> {
        Self::with_file(FileStorage::create_with(path, flags)?)
    }

    /// Drive an already open file through a new ring (sharing it with `file`'s other clones).
    pub fn with_file(file: FileStorage) -> io::Result<UringStorage> {
        let ring = Arc::new(Ring::start(file.clone())?);
        Ok(UringStorage {
            file,
            ring,
            inline: true,
        })
    }

    /// The path the file was opened with.
    pub fn path(&self) -> &Path {
        self.file.path()
    }

    /// The flags the file was opened with.
    pub fn flags(&self) -> OpenFlags {
        self.file.flags()
    }

    /// Queue a request on the ring; the IO starts now, whether or not the future is polled.
    fn queue(&self, kind: Kind, buf: IoBuf, offset: u64) -> oneshot::Receiver<Reply> {
        let (op, rx) = Op::new(kind, buf, offset);
        self.ring.submit(op);
        rx
    }

    /// Queue a write of `buf` at `offset` (page-cache fast path already tried).
    fn queue_write<'a>(&'a self, buf: &'a [u8], offset: u64) -> IoFuture<'a, ()> {
        let owned = match self.file.direct_io() {
            None => IoBuf::Plain(buf.to_vec()),
            // Whole blocks need no read-modify-write; raising the logical length first keeps
            // a concurrent growing RMW from truncating this write away.
            Some(d)
                if is_aligned(offset, buf.len()) && d.try_reserve(offset + buf.len() as u64) =>
            {
                match Bounce::with_data(buf, offset) {
                    Ok(b) => IoBuf::Aligned(b),
                    Err(e) => return ready(Err(e)),
                }
            }
            Some(_) => return self.file.write_at(buf, offset),
        };
        let rx = self.queue(Kind::Write, owned, offset);
        Box::pin(async move { reply(rx).await.map(drop) })
    }
}

impl Storage for UringStorage {
    fn read_at<'a>(&'a self, buf: &'a mut [u8], offset: u64) -> IoFuture<'a, ()> {
        if let Err(e) = check_range(offset, buf.len()) {
            return ready(Err(e));
        }
        let done = match self.inline {
            true => self.file.read_cached(buf, offset),
            false => 0,
        };
        if done == buf.len() {
            return ready(Ok(()));
        }
        let rest = &mut buf[done..];
        let at = offset + done as u64;
        let owned = match self.file.direct_io() {
            None => IoBuf::Plain(vec![0; rest.len()]),
            Some(_) => match Bounce::new(at, rest.len()) {
                Ok(b) => IoBuf::Aligned(b),
                Err(e) => return ready(Err(e)),
            },
        };
        let rx = self.queue(Kind::Read, owned, at);
        Box::pin(async move {
            rest.copy_from_slice(reply(rx).await?.data());
            Ok(())
        })
    }

    fn write_at<'a>(&'a self, buf: &'a [u8], offset: u64) -> IoFuture<'a, ()> {
        if self.flags().read_only {
            return ready(Err(read_only_error()));
        }
        if let Err(e) = check_range(offset, buf.len()) {
            return ready(Err(e));
        }
        let done = match self.inline {
            true => self.file.write_cached(buf, offset),
            false => 0,
        };
        if done == buf.len() {
            return ready(Ok(()));
        }
        self.queue_write(&buf[done..], offset + done as u64)
    }

    fn write_zeroes(&self, offset: u64, len: u64) -> IoFuture<'_, ()> {
        self.file.write_zeroes(offset, len)
    }

    fn discard(&self, offset: u64, len: u64) -> IoFuture<'_, ()> {
        self.file.discard(offset, len)
    }

    fn flush(&self) -> IoFuture<'_, ()> {
        let rx = self.queue(Kind::Fsync, IoBuf::Empty, 0);
        Box::pin(async move { reply(rx).await.map(drop) })
    }

    fn len(&self) -> IoFuture<'_, u64> {
        self.file.len()
    }

    fn set_len(&self, len: u64) -> IoFuture<'_, ()> {
        self.file.set_len(len)
    }

    fn path(&self) -> Option<&Path> {
        Some(self.file.path())
    }

    fn grows_ahead(&self) -> bool {
        true
    }

    fn block_status(&self, offset: u64, len: u64) -> IoFuture<'_, (bool, u64)> {
        self.file.block_status(offset, len)
    }

    fn allocated_size(&self) -> IoFuture<'_, Option<u64>> {
        self.file.allocated_size()
    }

    fn allocate(&self, offset: u64, len: u64) -> IoFuture<'_, ()> {
        self.file.allocate(offset, len)
    }

    fn release_locks(&self) -> io::Result<()> {
        self.file.release_locks()
    }
}

/// Wait for a request's reply; its buffer on success.
async fn reply(rx: oneshot::Receiver<Reply>) -> io::Result<IoBuf> {
    let (result, buf) = rx
        .await
        .map_err(|_| io::Error::other("the io_uring thread exited"))?;
    result.map(|()| buf)
}

fn ready<'a, T: Send + 'a>(r: io::Result<T>) -> IoFuture<'a, T> {
    Box::pin(std::future::ready(r))
}

fn is_aligned(offset: u64, len: usize) -> bool {
    offset % ALIGN == 0 && len as u64 % ALIGN == 0
}

/// Refuse ranges past the largest file offset: the kernel would take an offset of -1 as "the
/// file position" instead of failing.
fn check_range(offset: u64, len: usize) -> io::Result<()> {
    match offset.checked_add(len as u64) {
        Some(end) if end <= i64::MAX as u64 => Ok(()),
        _ => Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "offset + length past the largest file offset",
        )),
    }
}
