//! [`ParkStorage`]: a wrapper that holds requests back until the test releases them (feature
//! `test-utils`).
//!
//! While holding, every read, write, write-zeroes, discard and flush is *parked*: queued with
//! its own copy of the data, its future pending. [`ParkStorage::release_one`] runs the oldest
//! parked request against the inner storage, [`ParkStorage::release_all`] stops holding and
//! runs them all. A parked request runs when released whether or not its future still exists,
//! as with the real backends (an io_uring request, once queued, completes even if its caller
//! is gone). That is what cancellation tests need: drop an engine future while its IO is
//! parked, let other requests run, then let the late IO land.
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() {
//! use std::sync::Arc;
//! use qcow2_engine::Storage;
//! use qcow2_engine::storage::{MemoryStorage, ParkStorage};
//!
//! let mem = Arc::new(MemoryStorage::new());
//! let s = ParkStorage::new(mem.clone());
//! s.hold();
//! drop(s.write_at(b"late", 0)); // parked, then its future is dropped
//! assert_eq!(s.parked(), 1);
//! s.release_all().await;
//! assert_eq!(&mem.snapshot()[..4], b"late");
//! # }
//! ```

use std::collections::VecDeque;
use std::io;
use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use tokio::sync::oneshot;

use super::{IoFuture, Storage};

/// One parked request, with everything it needs to run later.
#[derive(Debug)]
enum ParkedOp {
    Read { offset: u64, len: usize },
    Write { offset: u64, data: Vec<u8> },
    Zeroes { offset: u64, len: u64 },
    Discard { offset: u64, len: u64 },
    Flush,
}

#[derive(Debug)]
struct Parked {
    op: ParkedOp,
    /// The result (a read's bytes) for the future, if it still waits.
    done: oneshot::Sender<io::Result<Vec<u8>>>,
}

#[derive(Debug, Default)]
struct ParkState {
    holding: bool,
    queue: VecDeque<Parked>,
}

/// Storage whose requests can be held back and released one by one (see the module docs).
#[derive(Debug)]
pub struct ParkStorage {
    inner: Arc<dyn Storage>,
    state: Mutex<ParkState>,
}

impl ParkStorage {
    /// Wrap `inner`; requests pass straight through until [`ParkStorage::hold`].
    pub fn new(inner: Arc<dyn Storage>) -> ParkStorage {
        ParkStorage {
            inner,
            state: Mutex::new(ParkState::default()),
        }
    }

    /// The wrapped storage.
    pub fn inner(&self) -> &Arc<dyn Storage> {
        &self.inner
    }

    /// Park every request from now on until [`ParkStorage::release_all`].
    pub fn hold(&self) {
        self.lock().holding = true;
    }

    /// Number of requests parked now.
    pub fn parked(&self) -> usize {
        self.lock().queue.len()
    }

    /// Run the oldest parked request (still holding). Returns `false` when none was parked.
    pub async fn release_one(&self) -> bool {
        let Some(p) = self.lock().queue.pop_front() else {
            return false;
        };
        self.run(p).await;
        true
    }

    /// Let new requests through again; those already parked stay parked.
    pub fn stop_holding(&self) {
        self.lock().holding = false;
    }

    /// Stop holding and run every parked request, oldest first.
    pub async fn release_all(&self) {
        self.stop_holding();
        while self.release_one().await {}
    }

    fn lock(&self) -> MutexGuard<'_, ParkState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    async fn run(&self, p: Parked) {
        let result = match p.op {
            ParkedOp::Read { offset, len } => {
                let mut buf = vec![0u8; len];
                self.inner.read_at(&mut buf, offset).await.map(|()| buf)
            }
            ParkedOp::Write { offset, data } => {
                self.inner.write_at(&data, offset).await.map(no_bytes)
            }
            ParkedOp::Zeroes { offset, len } => {
                self.inner.write_zeroes(offset, len).await.map(no_bytes)
            }
            ParkedOp::Discard { offset, len } => {
                self.inner.discard(offset, len).await.map(no_bytes)
            }
            ParkedOp::Flush => self.inner.flush().await.map(no_bytes),
        };
        // The caller may have dropped its future: the request ran anyway.
        let _ = p.done.send(result);
    }

    /// Park `op` if holding; `None` means run it now.
    fn park(
        &self,
        op: impl FnOnce() -> ParkedOp,
    ) -> Option<oneshot::Receiver<io::Result<Vec<u8>>>> {
        let mut st = self.lock();
        if !st.holding {
            return None;
        }
        let (done, rx) = oneshot::channel();
        st.queue.push_back(Parked { op: op(), done });
        Some(rx)
    }
}

/// A parked request without a value delivers an empty byte vector.
fn no_bytes((): ()) -> Vec<u8> {
    Vec::new()
}

/// Wait for a parked request's result.
async fn parked_result(rx: oneshot::Receiver<io::Result<Vec<u8>>>) -> io::Result<Vec<u8>> {
    rx.await
        .unwrap_or_else(|_| Err(io::Error::other("parked request dropped unrun")))
}

impl Storage for ParkStorage {
    fn read_at<'a>(&'a self, buf: &'a mut [u8], offset: u64) -> IoFuture<'a, ()> {
        let len = buf.len();
        match self.park(|| ParkedOp::Read { offset, len }) {
            None => self.inner.read_at(buf, offset),
            Some(rx) => Box::pin(async move {
                let data = parked_result(rx).await?;
                buf.copy_from_slice(&data);
                Ok(())
            }),
        }
    }

    fn write_at<'a>(&'a self, buf: &'a [u8], offset: u64) -> IoFuture<'a, ()> {
        let parked = self.park(|| ParkedOp::Write {
            offset,
            data: buf.to_vec(),
        });
        match parked {
            None => self.inner.write_at(buf, offset),
            Some(rx) => Box::pin(async move { parked_result(rx).await.map(drop) }),
        }
    }

    fn write_zeroes(&self, offset: u64, len: u64) -> IoFuture<'_, ()> {
        match self.park(|| ParkedOp::Zeroes { offset, len }) {
            None => self.inner.write_zeroes(offset, len),
            Some(rx) => Box::pin(async move { parked_result(rx).await.map(drop) }),
        }
    }

    fn discard(&self, offset: u64, len: u64) -> IoFuture<'_, ()> {
        match self.park(|| ParkedOp::Discard { offset, len }) {
            None => self.inner.discard(offset, len),
            Some(rx) => Box::pin(async move { parked_result(rx).await.map(drop) }),
        }
    }

    fn flush(&self) -> IoFuture<'_, ()> {
        match self.park(|| ParkedOp::Flush) {
            None => self.inner.flush(),
            Some(rx) => Box::pin(async move { parked_result(rx).await.map(drop) }),
        }
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

    fn allocate(&self, offset: u64, len: u64) -> IoFuture<'_, ()> {
        self.inner.allocate(offset, len)
    }
}
