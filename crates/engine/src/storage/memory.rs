//! [`MemoryStorage`]: a growable byte vector, for tests and scratch images.
//!
//! Requests complete synchronously under a lock (memory copies do not need an IO thread), so the
//! returned futures are always ready. `flush` does nothing: there is nothing to make durable.

use std::io;
use std::sync::{PoisonError, RwLock, RwLockReadGuard, RwLockWriteGuard};

use super::{IoFuture, Storage};
use crate::units::to_usize;

/// Storage kept in memory. Reads past the end return zeros; writes past the end grow it.
#[derive(Debug, Default)]
pub struct MemoryStorage {
    data: RwLock<Vec<u8>>,
}

impl MemoryStorage {
    /// An empty storage.
    pub fn new() -> MemoryStorage {
        MemoryStorage::default()
    }

    /// A storage holding `data`.
    pub fn from_vec(data: Vec<u8>) -> MemoryStorage {
        MemoryStorage {
            data: RwLock::new(data),
        }
    }

    /// A copy of the current contents.
    pub fn snapshot(&self) -> Vec<u8> {
        self.read().clone()
    }

    /// The contents, consuming the storage.
    pub fn into_vec(self) -> Vec<u8> {
        self.data
            .into_inner()
            .unwrap_or_else(PoisonError::into_inner)
    }

    fn read(&self) -> RwLockReadGuard<'_, Vec<u8>> {
        self.data.read().unwrap_or_else(PoisonError::into_inner)
    }

    fn write(&self) -> RwLockWriteGuard<'_, Vec<u8>> {
        self.data.write().unwrap_or_else(PoisonError::into_inner)
    }

    fn read_sync(&self, buf: &mut [u8], offset: u64) {
        read_from(&self.read(), buf, offset);
    }

    fn write_sync(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        let (start, end) = range(offset, buf.len() as u64)?;
        let mut data = self.write();
        grow(&mut data, end);
        data[start..end].copy_from_slice(buf);
        Ok(())
    }

    fn write_zeroes_sync(&self, offset: u64, len: u64) -> io::Result<()> {
        let (start, end) = range(offset, len)?;
        let mut data = self.write();
        grow(&mut data, end);
        data[start..end].fill(0);
        Ok(())
    }

    fn discard_sync(&self, offset: u64, len: u64) -> io::Result<()> {
        let (start, end) = range(offset, len)?;
        let mut data = self.write();
        let end = end.min(data.len());
        if start < end {
            data[start..end].fill(0);
        }
        Ok(())
    }

    fn set_len_sync(&self, len: u64) -> io::Result<()> {
        let (_, len) = range(0, len)?;
        self.write().resize(len, 0);
        Ok(())
    }
}

/// Copy `data[offset..]` into `buf`, zero-filling what lies past the end of `data`.
pub(crate) fn read_from(data: &[u8], buf: &mut [u8], offset: u64) {
    let start = usize::try_from(offset)
        .unwrap_or(usize::MAX)
        .min(data.len());
    let n = buf.len().min(data.len() - start);
    buf[..n].copy_from_slice(&data[start..start + n]);
    buf[n..].fill(0);
}

/// The largest in-memory disk: a hostile image can point writes at any 56-bit offset, and
/// growing a `Vec` to match would abort the process instead of failing the request.
pub const MAX_MEMORY_LEN: u64 = 4 << 30;

/// `[offset, offset + len)` as in-memory indices; EFBIG past [`MAX_MEMORY_LEN`].
pub(crate) fn range(offset: u64, len: u64) -> io::Result<(usize, usize)> {
    let end = offset.checked_add(len).filter(|&e| e <= MAX_MEMORY_LEN);
    match end {
        Some(end) => Ok((to_usize(offset), to_usize(end))),
        None => Err(io::Error::from_raw_os_error(libc::EFBIG)),
    }
}

/// Extend `data` with zeros to at least `len` bytes.
pub(crate) fn grow(data: &mut Vec<u8>, len: usize) {
    if data.len() < len {
        data.resize(len, 0);
    }
}

impl Storage for MemoryStorage {
    fn read_at<'a>(&'a self, buf: &'a mut [u8], offset: u64) -> IoFuture<'a, ()> {
        self.read_sync(buf, offset);
        Box::pin(std::future::ready(Ok(())))
    }

    fn write_at<'a>(&'a self, buf: &'a [u8], offset: u64) -> IoFuture<'a, ()> {
        Box::pin(std::future::ready(self.write_sync(buf, offset)))
    }

    fn write_zeroes(&self, offset: u64, len: u64) -> IoFuture<'_, ()> {
        Box::pin(std::future::ready(self.write_zeroes_sync(offset, len)))
    }

    fn discard(&self, offset: u64, len: u64) -> IoFuture<'_, ()> {
        Box::pin(std::future::ready(self.discard_sync(offset, len)))
    }

    fn flush(&self) -> IoFuture<'_, ()> {
        Box::pin(std::future::ready(Ok(())))
    }

    fn len(&self) -> IoFuture<'_, u64> {
        Box::pin(std::future::ready(Ok(self.read().len() as u64)))
    }

    fn set_len(&self, len: u64) -> IoFuture<'_, ()> {
        Box::pin(std::future::ready(self.set_len_sync(len)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn reads_past_end_are_zero() {
        let m = MemoryStorage::from_vec(vec![1, 2, 3]);
        let mut buf = [9u8; 6];
        m.read_at(&mut buf, 1).await.unwrap();
        assert_eq!(buf, [2, 3, 0, 0, 0, 0]);
        m.read_at(&mut buf, 100).await.unwrap();
        assert_eq!(buf, [0; 6]);
        m.read_at(&mut buf, u64::MAX).await.unwrap();
        assert_eq!(buf, [0; 6]);
    }

    #[tokio::test]
    async fn writes_grow_and_zero_fill_the_gap() {
        let m = MemoryStorage::new();
        m.write_at(b"ab", 4).await.unwrap();
        assert_eq!(m.snapshot(), [0, 0, 0, 0, b'a', b'b']);
        assert_eq!(m.len().await.unwrap(), 6);
        m.write_at(b"", 100).await.unwrap();
        assert_eq!(m.len().await.unwrap(), 100);
    }

    #[tokio::test]
    async fn write_zeroes_discard_and_set_len() {
        let m = MemoryStorage::from_vec(vec![7; 8]);
        m.write_zeroes(2, 2).await.unwrap();
        assert_eq!(m.snapshot(), [7, 7, 0, 0, 7, 7, 7, 7]);
        m.write_zeroes(6, 4).await.unwrap();
        assert_eq!(m.snapshot(), [7, 7, 0, 0, 7, 7, 0, 0, 0, 0]);
        m.discard(0, 1).await.unwrap();
        m.discard(9, 100).await.unwrap(); // past the end: no growth
        assert_eq!(m.snapshot(), [0, 7, 0, 0, 7, 7, 0, 0, 0, 0]);
        m.set_len(3).await.unwrap();
        m.set_len(5).await.unwrap();
        assert_eq!(m.into_vec(), [0, 7, 0, 0, 0]);
    }

    #[tokio::test]
    async fn allocate_keeps_content_and_grows() {
        let m = MemoryStorage::from_vec(vec![5; 4]);
        m.allocate(0, 8).await.unwrap();
        assert_eq!(m.snapshot(), [5, 5, 5, 5, 0, 0, 0, 0]);
    }

    #[tokio::test]
    async fn huge_ranges_are_refused() {
        let m = MemoryStorage::new();
        assert!(m.write_zeroes(u64::MAX, 2).await.is_err());
        assert!(m.set_len(u64::MAX).await.is_err());
    }
}
