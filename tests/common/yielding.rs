//! [`YieldingStorage`]: a storage wrapper that yields to the async scheduler a random number
//! of times before each data request, so that concurrent requests interleave at every IO —
//! even over memory storage (whose futures are always ready) on a current-thread runtime.

use std::path::Path;
use std::sync::{Arc, Mutex};

use qcow2_engine::Storage;
use qcow2_engine::storage::IoFuture;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// Wraps `inner`; reads, writes and write-zeroes first yield 0–3 times (seeded).
#[derive(Debug)]
pub struct YieldingStorage {
    inner: Arc<dyn Storage>,
    rng: Mutex<StdRng>,
}

impl YieldingStorage {
    /// Wrap `inner`; `seed` makes the yield pattern reproducible.
    pub fn new(inner: Arc<dyn Storage>, seed: u64) -> YieldingStorage {
        YieldingStorage {
            inner,
            rng: Mutex::new(StdRng::seed_from_u64(seed)),
        }
    }

    async fn pause(&self) {
        let n = self.rng.lock().unwrap().gen_range(0..4);
        for _ in 0..n {
            tokio::task::yield_now().await;
        }
    }
}

impl Storage for YieldingStorage {
    fn read_at<'a>(&'a self, buf: &'a mut [u8], offset: u64) -> IoFuture<'a, ()> {
        Box::pin(async move {
            self.pause().await;
            self.inner.read_at(buf, offset).await
        })
    }
    fn write_at<'a>(&'a self, buf: &'a [u8], offset: u64) -> IoFuture<'a, ()> {
        Box::pin(async move {
            self.pause().await;
            self.inner.write_at(buf, offset).await
        })
    }
    fn write_zeroes(&self, offset: u64, len: u64) -> IoFuture<'_, ()> {
        Box::pin(async move {
            self.pause().await;
            self.inner.write_zeroes(offset, len).await
        })
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
        self.inner.set_len(len)
    }
    fn path(&self) -> Option<&Path> {
        self.inner.path()
    }
    fn grows_ahead(&self) -> bool {
        self.inner.grows_ahead()
    }
    fn block_status(&self, offset: u64, len: u64) -> IoFuture<'_, (bool, u64)> {
        self.inner.block_status(offset, len)
    }
    fn allocated_size(&self) -> IoFuture<'_, Option<u64>> {
        self.inner.allocated_size()
    }
    fn allocate(&self, offset: u64, len: u64) -> IoFuture<'_, ()> {
        self.inner.allocate(offset, len)
    }
}
