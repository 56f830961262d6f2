//! One cached metadata slice: its bytes, whether it is loaded, and a dirty generation.
//!
//! Dirty tracking uses a generation counter instead of a flag so that a flush can write a copy
//! while updates continue: the flusher snapshots `(bytes, gen)`, writes the bytes, then marks
//! the slice clean only if no update happened meanwhile (`gen` unchanged).

use std::future::Future;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use tokio::sync::OnceCell;

use crate::error::Result;

/// A cached slice of an L2 table or refcount block.
#[derive(Debug)]
pub struct Slice {
    offset: u64,
    data: Mutex<SliceData>,
    loaded: OnceCell<()>,
    last_used: AtomicU64,
    /// Set while a flush is writing this slice (keeps it from being evicted mid-write).
    writing: AtomicBool,
}

#[derive(Debug)]
struct SliceData {
    bytes: Box<[u8]>,
    /// 0 when clean; otherwise increases with every update.
    dirty_gen: u64,
    next_gen: u64,
}

impl Slice {
    pub(super) fn new(offset: u64, size: usize, tick: u64) -> Slice {
        Slice {
            offset,
            data: Mutex::new(SliceData {
                bytes: vec![0; size].into_boxed_slice(),
                dirty_gen: 0,
                next_gen: 1,
            }),
            loaded: OnceCell::new(),
            last_used: AtomicU64::new(tick),
            writing: AtomicBool::new(false),
        }
    }

    /// Host offset of the slice.
    pub fn offset(&self) -> u64 {
        self.offset
    }

    /// Load the slice once: the first caller runs `load` (which receives a buffer to fill and
    /// returns it); concurrent callers wait for it. If loading fails, the next caller retries.
    pub async fn ensure_loaded<F, Fut>(&self, load: F) -> Result<()>
    where
        F: FnOnce(Vec<u8>) -> Fut,
        Fut: Future<Output = Result<Vec<u8>>>,
    {
        if self.loaded.initialized() {
            return Ok(());
        }
        self.loaded
            .get_or_try_init(|| async {
                let size = self.data.lock().unwrap().bytes.len();
                let buf = load(vec![0u8; size]).await?;
                let mut d = self.data.lock().unwrap();
                // A slice is only ever loaded while absent from the map's point of view
                // (it was just inserted unloaded), so nobody can have updated it yet.
                debug_assert_eq!(d.dirty_gen, 0);
                d.bytes.copy_from_slice(&buf);
                Ok(())
            })
            .await
            .map(|_| ())
    }

    /// Whether the content is loaded.
    pub fn is_loaded(&self) -> bool {
        self.loaded.initialized()
    }

    /// Run `f` on the bytes (read-only).
    pub fn read<R>(&self, f: impl FnOnce(&[u8]) -> R) -> R {
        f(&self.data.lock().unwrap().bytes)
    }

    /// Run `f` on the bytes and mark the slice dirty.
    pub fn update<R>(&self, f: impl FnOnce(&mut [u8]) -> R) -> R {
        let mut d = self.data.lock().unwrap();
        let r = f(&mut d.bytes);
        d.dirty_gen = d.next_gen;
        d.next_gen += 1;
        r
    }

    /// Whether the slice has updates not yet written.
    pub fn is_dirty(&self) -> bool {
        self.data.lock().unwrap().dirty_gen != 0
    }

    /// A copy of the bytes and the dirty generation they correspond to, or `None` if clean.
    pub fn snapshot_dirty(&self) -> Option<(Vec<u8>, u64)> {
        let d = self.data.lock().unwrap();
        (d.dirty_gen != 0).then(|| (d.bytes.to_vec(), d.dirty_gen))
    }

    /// After writing the snapshot of generation `gen_`: clean unless updated since.
    pub fn mark_clean(&self, gen_: u64) {
        let mut d = self.data.lock().unwrap();
        if d.dirty_gen == gen_ {
            d.dirty_gen = 0;
        }
    }

    /// Flag the slice as being written by a flush until the guard is dropped — also when the
    /// flush's future is dropped mid-write, so the slice never stays unevictable.
    pub fn start_writing(&self) -> WritingGuard<'_> {
        self.writing.store(true, Ordering::Release);
        WritingGuard(self)
    }

    pub(super) fn is_evictable(&self) -> bool {
        self.is_loaded() && !self.is_dirty() && !self.writing.load(Ordering::Acquire)
    }

    pub(super) fn touch(&self, tick: u64) {
        self.last_used.store(tick, Ordering::Relaxed);
    }

    pub(super) fn last_used(&self) -> u64 {
        self.last_used.load(Ordering::Relaxed)
    }
}

/// A slice flagged as being written (see [`Slice::start_writing`]); clears the flag on drop.
#[derive(Debug)]
pub struct WritingGuard<'a>(&'a Slice);

impl Drop for WritingGuard<'_> {
    fn drop(&mut self) {
        self.0.writing.store(false, Ordering::Release);
    }
}
