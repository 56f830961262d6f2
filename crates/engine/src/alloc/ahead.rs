//! Growing the image file ahead of allocations.
//!
//! A write past the end of a file makes the filesystem extend it: ext4 and xfs serialize
//! such writes (with `O_DIRECT` each one waits for the previous ones), so an allocating
//! workload that writes one new cluster after another at the end of the file runs one IO at
//! a time. Instead, when an allocation reaches past the part of the file already grown, the
//! file is grown with one `fallocate` (mode 0: reserved blocks that read as zeros) by a step
//! of an eighth of its size, at least [`MIN_STEP`] and at most [`MAX_STEP`]; the data writes
//! then land inside the file and run concurrently.
//!
//! Crash safety: growing changes no metadata. The clusters past the last allocated one keep
//! refcount 0, so they are free space (`qemu-img check` reports nothing for them: neither a
//! leak nor an error); after a crash the image is merely longer. A clean close trims the file
//! back to its last allocated cluster ([`GrowAhead::trim`]), so the file has the length it
//! would have had without growing ahead.
//!
//! Only storage that asks for it ([`Storage::grows_ahead`]: files) is grown ahead: for
//! in-memory storage the step would be real memory, and it has no extending-write cost to
//! avoid.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use tokio::sync::Mutex;

use crate::storage::Storage;

/// Smallest growth step.
const MIN_STEP: u64 = 8 << 20;
/// Largest growth step.
const MAX_STEP: u64 = 128 << 20;

/// The part of the image file known to exist, and growing it.
#[derive(Debug)]
pub(crate) struct GrowAhead {
    file: Arc<dyn Storage>,
    /// Whether this storage is grown ahead at all.
    enabled: bool,
    /// Bytes the file is known to span (its length at open, or as grown since).
    grown: AtomicU64,
    /// Whether the file was grown past what the allocations use (then `trim` has work).
    extended: AtomicBool,
    /// Serializes growing, so concurrent allocations wait for one `fallocate`.
    lock: Mutex<()>,
}

impl GrowAhead {
    /// Track `file`, `len` bytes long at open.
    pub(crate) fn new(file: Arc<dyn Storage>, len: u64) -> GrowAhead {
        GrowAhead {
            enabled: file.grows_ahead(),
            file,
            grown: AtomicU64::new(len),
            extended: AtomicBool::new(false),
            lock: Mutex::new(()),
        }
    }

    /// Make sure the file spans `[0, end)` before data is written there. Growing is only an
    /// optimization: if `fallocate` fails (no space for the whole step, say), the writes
    /// extend the file themselves and report their own errors.
    pub(crate) async fn cover(&self, end: u64) {
        if !self.enabled || end <= self.grown.load(Ordering::Acquire) {
            return;
        }
        let _one = self.lock.lock().await;
        let have = self.grown.load(Ordering::Acquire);
        if end <= have {
            return;
        }
        let step = (have / 8).clamp(MIN_STEP, MAX_STEP);
        let target = (end + step).next_multiple_of(MIN_STEP);
        // Mark first: a trim racing with this growth must see that there may be a tail.
        self.extended.store(true, Ordering::Release);
        match self.file.allocate(have, target - have).await {
            Ok(()) => self.grown.store(target, Ordering::Release),
            Err(e) => {
                tracing::debug!("growing the image file ahead failed: {e}");
                // Writes up to `end` extend the file themselves; try again past it.
                self.grown.store(end, Ordering::Release);
            }
        }
    }

    /// After a clean flush with nothing in flight: cut the file back to `used` bytes (the end
    /// of its last allocated cluster) if growing ahead left it longer. Never shortens the file
    /// below its length at open or below `used`.
    pub(crate) async fn trim(&self, used: u64) -> std::io::Result<()> {
        if !self.extended.swap(false, Ordering::AcqRel) {
            return Ok(());
        }
        let _one = self.lock.lock().await;
        let len = self.file.len().await?;
        if len > used {
            self.file.set_len(used).await?;
            self.grown.store(used, Ordering::Release);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::{IoFuture, MemoryStorage};

    /// Memory storage that asks to be grown ahead, as a library user's own backend may.
    #[derive(Debug, Default)]
    struct Eager(MemoryStorage);

    impl Storage for Eager {
        fn read_at<'a>(&'a self, buf: &'a mut [u8], offset: u64) -> IoFuture<'a, ()> {
            self.0.read_at(buf, offset)
        }
        fn write_at<'a>(&'a self, buf: &'a [u8], offset: u64) -> IoFuture<'a, ()> {
            self.0.write_at(buf, offset)
        }
        fn write_zeroes(&self, offset: u64, len: u64) -> IoFuture<'_, ()> {
            self.0.write_zeroes(offset, len)
        }
        fn discard(&self, offset: u64, len: u64) -> IoFuture<'_, ()> {
            self.0.discard(offset, len)
        }
        fn flush(&self) -> IoFuture<'_, ()> {
            self.0.flush()
        }
        fn len(&self) -> IoFuture<'_, u64> {
            self.0.len()
        }
        fn set_len(&self, len: u64) -> IoFuture<'_, ()> {
            self.0.set_len(len)
        }
        fn grows_ahead(&self) -> bool {
            true
        }
    }

    #[tokio::test]
    async fn storage_decides_whether_it_is_grown_ahead() {
        // A path is not what decides: this storage has none and asks to be grown.
        let eager: Arc<dyn Storage> = Arc::new(Eager::default());
        let ahead = GrowAhead::new(eager.clone(), 0);
        ahead.cover(1 << 20).await;
        let grown = eager.len().await.unwrap();
        assert!(grown >= (1 << 20) + MIN_STEP, "grown to {grown}");
        ahead.trim(1 << 20).await.unwrap();
        assert_eq!(eager.len().await.unwrap(), 1 << 20);

        // Plain memory is never grown (a step would be real memory).
        let memory: Arc<dyn Storage> = Arc::new(MemoryStorage::new());
        let ahead = GrowAhead::new(memory.clone(), 0);
        ahead.cover(1 << 20).await;
        assert_eq!(memory.len().await.unwrap(), 0);
    }
}
