//! A small pool of IO buffers, so that large requests do not allocate fresh memory each time.
//!
//! Each request copies the caller's bytes into a buffer it owns (for cancel safety, and for
//! `O_DIRECT` alignment). A fresh allocation of a megabyte comes from `mmap` or from a heap
//! the allocator later trims with `madvise`, so every request also page-faults its buffer in
//! and the kernel zeroes it: that cost more CPU than the copy itself. Buffers released here are
//! kept (up to [`MAX_IDLE_BYTES`] in all, none larger than [`MAX_BUF`]) and handed out again.

use std::sync::Mutex;

/// Largest buffer kept for reuse.
const MAX_BUF: usize = 8 << 20;
/// Most bytes kept idle in the pool.
const MAX_IDLE_BYTES: usize = 16 << 20;

/// Idle buffers and their total capacity.
static POOL: Mutex<(Vec<Vec<u8>>, usize)> = Mutex::new((Vec::new(), 0));

/// An empty buffer with room for at least `cap` bytes.
pub(crate) fn take(cap: usize) -> Vec<u8> {
    if cap <= MAX_BUF {
        // A poisoned pool only means another thread panicked while pushing or popping a
        // Vec: the list itself is still valid.
        let mut pool = POOL.lock().unwrap_or_else(|e| e.into_inner());
        let (bufs, idle) = &mut *pool;
        if let Some(i) = bufs.iter().position(|b| b.capacity() >= cap) {
            let mut b = bufs.swap_remove(i);
            *idle -= b.capacity();
            b.clear();
            return b;
        }
    }
    Vec::with_capacity(cap)
}

/// Give `buf` back for reuse (dropped if the pool is full or it is too large).
pub(crate) fn give(buf: Vec<u8>) {
    let cap = buf.capacity();
    if cap == 0 || cap > MAX_BUF {
        return;
    }
    let mut pool = POOL.lock().unwrap_or_else(|e| e.into_inner());
    let (bufs, idle) = &mut *pool;
    if *idle + cap <= MAX_IDLE_BYTES {
        *idle += cap;
        bufs.push(buf);
    }
}

/// A copy of some bytes in a pooled buffer, given back on drop.
#[derive(Debug)]
pub struct PooledBytes(Vec<u8>);

impl PooledBytes {
    /// Copy `data` into a pooled buffer.
    pub fn copy_of(data: &[u8]) -> PooledBytes {
        let mut b = take(data.len());
        b.extend_from_slice(data);
        PooledBytes(b)
    }
}

impl std::ops::Deref for PooledBytes {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        &self.0
    }
}

impl Drop for PooledBytes {
    fn drop(&mut self) {
        give(std::mem::take(&mut self.0));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffers_are_reused_and_the_pool_stays_bounded() {
        let b = PooledBytes::copy_of(&[7u8; 1000]);
        assert_eq!(&b[..3], &[7, 7, 7]);
        drop(b);
        let again = take(900);
        assert!(again.is_empty() && again.capacity() >= 900);
        give(again);
        for _ in 0..64 {
            give(Vec::with_capacity(1 << 20));
        }
        let idle = POOL.lock().unwrap().1;
        assert!(idle <= MAX_IDLE_BYTES, "{idle}");
        give(Vec::with_capacity(MAX_BUF + 1)); // too large: dropped
        assert!(
            POOL.lock()
                .unwrap()
                .0
                .iter()
                .all(|b| b.capacity() <= MAX_BUF)
        );
    }
}
