//! The export as qemu-nbd's `--cache`, `--discard` and `--detect-zeroes` shape it: a
//! [`BlockDevice`] that wraps the opened image and changes what its requests do.
//!
//! | flag | effect here |
//! |---|---|
//! | `--cache=writethrough/directsync` | every write is flushed before its reply (FUA) |
//! | `--cache=unsafe` | flushes (and FUA) do nothing; closing still writes everything |
//! | `--discard=ignore` (default) | trims succeed and change nothing; zeroing keeps space |
//! | `--discard=unmap` | trims discard, zeroing may release space |
//! | `--detect-zeroes=on/unmap` | an all-zero write becomes a write-zeroes (unmap: may release) |
//!
//! O_DIRECT (`--cache=none/directsync`) is an open option, not handled here.

use std::sync::Arc;

use qcow2_engine::image::Extent;
use qcow2_nbd::{BlockDevice, DeviceFuture};

/// qemu-nbd's `--detect-zeroes`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum DetectZeroes {
    /// Writes are written as they come.
    Off,
    /// All-zero writes become write-zeroes that keep the space.
    On,
    /// All-zero writes become write-zeroes that may release the space (needs --discard=unmap).
    Unmap,
}

/// How the export treats writes, flushes and discards.
#[derive(Debug, Clone, Copy)]
pub struct Policy {
    /// Flush after every write-like request (`writethrough`, `directsync`).
    pub writethrough: bool,
    /// Ignore flushes (`unsafe`).
    pub no_flush: bool,
    /// Discards and unmapping zero-writes really release space (`--discard=unmap`).
    pub unmap: bool,
    /// `--detect-zeroes`.
    pub detect_zeroes: DetectZeroes,
}

impl Policy {
    /// Whether the device needs wrapping at all.
    fn is_plain(&self) -> bool {
        !self.writethrough
            && !self.no_flush
            && self.unmap
            && self.detect_zeroes == DetectZeroes::Off
    }

    /// `inner` with this policy applied.
    pub fn apply(self, inner: Arc<dyn BlockDevice>) -> Arc<dyn BlockDevice> {
        if self.is_plain() {
            return inner;
        }
        Arc::new(PolicyDevice {
            inner,
            policy: self,
        })
    }
}

/// The wrapped device.
#[derive(Debug)]
struct PolicyDevice {
    inner: Arc<dyn BlockDevice>,
    policy: Policy,
}

impl PolicyDevice {
    /// With writethrough, make a successful write-like request durable before its reply.
    async fn settle(&self, r: qcow2_engine::Result<()>) -> qcow2_engine::Result<()> {
        r?;
        if self.policy.writethrough {
            self.inner.flush().await?;
        }
        Ok(())
    }

    async fn write(&self, buf: &[u8], offset: u64) -> qcow2_engine::Result<()> {
        let zero = self.policy.detect_zeroes != DetectZeroes::Off && buf.iter().all(|&b| b == 0);
        let r = if zero {
            let unmap = self.policy.detect_zeroes == DetectZeroes::Unmap;
            self.inner
                .write_zeroes(offset, buf.len() as u64, unmap)
                .await
        } else {
            self.inner.write_at(buf, offset).await
        };
        self.settle(r).await
    }
}

impl BlockDevice for PolicyDevice {
    fn size(&self) -> u64 {
        self.inner.size()
    }
    fn is_writable(&self) -> bool {
        self.inner.is_writable()
    }
    fn read_at<'a>(&'a self, buf: &'a mut [u8], offset: u64) -> DeviceFuture<'a, ()> {
        self.inner.read_at(buf, offset)
    }
    fn write_at<'a>(&'a self, buf: &'a [u8], offset: u64) -> DeviceFuture<'a, ()> {
        Box::pin(self.write(buf, offset))
    }
    fn write_zeroes(&self, offset: u64, len: u64, may_unmap: bool) -> DeviceFuture<'_, ()> {
        // As QEMU: a zeroing may only release space when discards are allowed to.
        let unmap = may_unmap && self.policy.unmap;
        Box::pin(async move {
            let r = self.inner.write_zeroes(offset, len, unmap).await;
            self.settle(r).await
        })
    }
    fn discard(&self, offset: u64, len: u64) -> DeviceFuture<'_, ()> {
        if !self.policy.unmap {
            // --discard=ignore: a trim is a hint the export may ignore.
            return Box::pin(async { Ok(()) });
        }
        Box::pin(async move {
            let r = self.inner.discard(offset, len).await;
            self.settle(r).await
        })
    }
    fn flush(&self) -> DeviceFuture<'_, ()> {
        if self.policy.no_flush {
            return Box::pin(async { Ok(()) });
        }
        self.inner.flush()
    }
    fn close(&self) -> DeviceFuture<'_, ()> {
        self.inner.close()
    }
    fn map(&self, offset: u64, len: u64) -> DeviceFuture<'_, Vec<Extent>> {
        self.inner.map(offset, len)
    }
    fn zeroes_fast(&self, offset: u64, len: u64) -> DeviceFuture<'_, bool> {
        self.inner.zeroes_fast(offset, len)
    }
    fn prefetch(&self, offset: u64, len: u64) -> DeviceFuture<'_, ()> {
        self.inner.prefetch(offset, len)
    }
    fn dirty_extents(
        &self,
        bitmap: &str,
        offset: u64,
        len: u64,
    ) -> DeviceFuture<'_, Vec<(u64, u64)>> {
        self.inner.dirty_extents(bitmap, offset, len)
    }
}
