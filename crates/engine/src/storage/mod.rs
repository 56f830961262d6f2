//! The storage layer: the only code that touches the OS.
//!
//! Everything above is written against the object-safe [`Storage`] trait, so the engine runs
//! unchanged over a file, memory, or (with the `test-utils` feature) the fault-injecting and
//! crash-simulating wrappers. Futures are boxed so that backends of different types can be
//! mixed in one backing chain (`Arc<dyn Storage>`); the allocation is small next to an IO.
//!
//! Backends bring their own IO threads (or io_uring ring thread) and wake the caller's task, so
//! the engine does not depend on any particular async runtime. [`open_file`] picks the file
//! backend: [`UringStorage`] where io_uring works (Linux), else [`FileStorage`].

use std::future::Future;
use std::io;
use std::path::Path;
use std::pin::Pin;

mod backend;
pub mod file;
pub mod lock;
pub mod memory;
pub(crate) mod pool;
#[cfg(all(target_os = "linux", feature = "uring"))]
pub mod uring;

#[cfg(feature = "test-utils")]
pub mod crash;
#[cfg(feature = "test-utils")]
pub mod fault;
#[cfg(feature = "test-utils")]
pub mod park;

pub use backend::{IoBackend, open_file, open_file_locked};
pub use file::{FileStorage, OpenFlags};
pub use lock::{LockRequest, Perms};
pub use memory::MemoryStorage;
#[cfg(all(target_os = "linux", feature = "uring"))]
pub use uring::UringStorage;

#[cfg(feature = "test-utils")]
pub use crash::{CrashPolicy, CrashStorage};
#[cfg(feature = "test-utils")]
pub use fault::{FaultError, FaultRule, FaultStorage, OpCounts, OpKind};
#[cfg(feature = "test-utils")]
pub use park::ParkStorage;

/// A boxed, `Send` future returned by [`Storage`] methods.
pub type IoFuture<'a, T> = Pin<Box<dyn Future<Output = io::Result<T>> + Send + 'a>>;

/// Byte-addressed, random-access storage (a file, a block device, memory).
///
/// Semantics every backend must keep:
/// - `read_at` fills the whole buffer; bytes beyond the end of the storage read as zeros.
/// - `write_at` writes the whole buffer, extending the storage if needed.
/// - `write_zeroes` makes the range read as zeros (by fallocate/punch or by writing zeros),
///   extending the storage if needed.
/// - `discard` is a hint that the range's content no longer matters; it may do nothing, and
///   afterwards the range reads as either the old data or zeros.
/// - `flush` makes every write that completed before it durable (fsync).
// `len` is a byte count that needs an IO to learn; an `is_empty` would add nothing.
#[allow(clippy::len_without_is_empty)]
pub trait Storage: Send + Sync + std::fmt::Debug {
    /// Read `buf.len()` bytes at `offset`; past the end reads zeros.
    fn read_at<'a>(&'a self, buf: &'a mut [u8], offset: u64) -> IoFuture<'a, ()>;
    /// Write all of `buf` at `offset`.
    fn write_at<'a>(&'a self, buf: &'a [u8], offset: u64) -> IoFuture<'a, ()>;
    /// Make `len` bytes at `offset` read as zeros.
    fn write_zeroes(&self, offset: u64, len: u64) -> IoFuture<'_, ()>;
    /// Tell the storage that `len` bytes at `offset` are unused (punch a hole if possible).
    fn discard(&self, offset: u64, len: u64) -> IoFuture<'_, ()>;
    /// Make all completed writes durable.
    fn flush(&self) -> IoFuture<'_, ()>;
    /// Current length in bytes.
    fn len(&self) -> IoFuture<'_, u64>;
    /// Truncate or extend to `len` bytes (new bytes read as zeros).
    fn set_len(&self, len: u64) -> IoFuture<'_, ()>;
    /// The file behind this storage, if any (used to resolve relative backing file names).
    fn path(&self) -> Option<&Path> {
        None
    }
    /// Whether `offset` starts a run of data (`true`) or of a hole (`false`) in the storage,
    /// and how long that run is (≤ `len`, > 0). Backends without hole information report
    /// data for the whole range. Used by `map` to report zero runs the way qemu-img does.
    fn block_status(&self, offset: u64, len: u64) -> IoFuture<'_, (bool, u64)> {
        let _ = offset;
        Box::pin(async move { Ok((true, len)) })
    }
    /// Bytes the storage really occupies (a sparse file's allocated blocks), if known.
    fn allocated_size(&self) -> IoFuture<'_, Option<u64>> {
        Box::pin(async { Ok(None) })
    }
    /// Drop the image locks taken on the storage (see [`FileStorage::lock`]), so that the
    /// file can be opened again at once even while clones of this handle live on. Storage
    /// without locks does nothing.
    fn release_locks(&self) -> io::Result<()> {
        Ok(())
    }
    /// Whether the image engine should grow this storage ahead of its allocations with
    /// [`Storage::allocate`] in large steps, instead of letting each write past the end
    /// extend it. Worth it for files (filesystems serialize extending writes); not for memory
    /// (a step would be real memory) — the default is `false`.
    fn grows_ahead(&self) -> bool {
        false
    }
    /// Allocate (reserve) `len` bytes at `offset` without changing their content where possible.
    /// The default writes zeros past the current end only, via `write_zeroes`; bytes already
    /// inside the storage keep their content.
    fn allocate(&self, offset: u64, len: u64) -> IoFuture<'_, ()> {
        Box::pin(async move {
            let end = offset
                .checked_add(len)
                .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "range overflows"))?;
            let from = self.len().await?.max(offset);
            if end > from {
                self.write_zeroes(from, end - from).await?;
            }
            Ok(())
        })
    }
}
