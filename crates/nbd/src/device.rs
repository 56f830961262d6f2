//! What the server exports: anything that can read, write, zero, discard, flush and report
//! allocation. [`Image`] is the main implementation; [`RawDevice`] serves a plain file.
//!
//! The trait returns boxed futures so exports can be stored as `Arc<dyn BlockDevice>` and the
//! connection code stays free of generics; one allocation per request is noise next to IO.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use qcow2_engine::ErrorKind;
use qcow2_engine::Storage;
use qcow2_engine::error::{Error, Result};
use qcow2_engine::image::{Backing, Extent, Image, ZeroFlags};

/// A boxed, `Send` future of a library result.
pub type DeviceFuture<'a, T> = Pin<Box<dyn Future<Output = Result<T>> + Send + 'a>>;

/// A block device the NBD server can export. Requests are already range-checked against
/// [`BlockDevice::size`] when they arrive here.
pub trait BlockDevice: Send + Sync + std::fmt::Debug + 'static {
    /// Size in bytes.
    fn size(&self) -> u64;
    /// Whether writes are allowed.
    fn is_writable(&self) -> bool;
    /// Read `buf.len()` bytes at `offset`.
    fn read_at<'a>(&'a self, buf: &'a mut [u8], offset: u64) -> DeviceFuture<'a, ()>;
    /// Write `buf` at `offset`.
    fn write_at<'a>(&'a self, buf: &'a [u8], offset: u64) -> DeviceFuture<'a, ()>;
    /// Make a range read as zeros; `may_unmap` allows releasing its space.
    fn write_zeroes(&self, offset: u64, len: u64, may_unmap: bool) -> DeviceFuture<'_, ()>;
    /// Discard a range.
    fn discard(&self, offset: u64, len: u64) -> DeviceFuture<'_, ()>;
    /// Make completed writes durable.
    fn flush(&self) -> DeviceFuture<'_, ()>;
    /// Flush and close; called once when the server shuts down.
    fn close(&self) -> DeviceFuture<'_, ()>;
    /// Allocation status of a range, in `qemu-img map`'s terms.
    fn map(&self, offset: u64, len: u64) -> DeviceFuture<'_, Vec<Extent>>;
    /// Whether [`BlockDevice::write_zeroes`] of the range would only change metadata (no data
    /// written), for `NBD_CMD_FLAG_FAST_ZERO`. The default, `false`, makes fast zeroes fail
    /// with `ENOTSUP`, which clients take as "write the zeros yourself".
    fn zeroes_fast(&self, offset: u64, len: u64) -> DeviceFuture<'_, bool> {
        let _ = (offset, len);
        Box::pin(async { Ok(false) })
    }
    /// The dirty ranges of persistent bitmap `bitmap` that meet `[offset, offset + len)`,
    /// clipped to it, as (offset, length) pairs in order. Errors: kind
    /// [`NotFound`](qcow2_engine::ErrorKind::NotFound) when the device has no such bitmap (the
    /// default), [`Refused`](qcow2_engine::ErrorKind::Refused) when it is inconsistent.
    fn dirty_extents(
        &self,
        bitmap: &str,
        offset: u64,
        len: u64,
    ) -> DeviceFuture<'_, Vec<(u64, u64)>> {
        let _ = (offset, len);
        let e = Error::new(
            ErrorKind::NotFound,
            format!("Dirty bitmap '{bitmap}' not found"),
        );
        Box::pin(async move { Err(e) })
    }
    /// Prefetch a range (`NBD_CMD_CACHE`): a hint. The default maps it, which loads the
    /// metadata the range needs into the device's caches.
    fn prefetch(&self, offset: u64, len: u64) -> DeviceFuture<'_, ()> {
        Box::pin(async move { self.map(offset, len).await.map(drop) })
    }
}

/// Whether zeroing `[offset, offset + len)` of `img` changes metadata only: zero clusters are
/// usable (v3, extended L2, or no backing file to hide) and the parts of clusters (or
/// subclusters) at either end, which would be zeroed by writing zeros, already read as zeros.
async fn image_zeroes_fast(img: &Image, offset: u64, len: u64) -> Result<bool> {
    let h = img.header().header;
    let extended = h.extended_l2();
    if !(h.version >= 3 || extended || img.backing().is_none()) {
        return Ok(false);
    }
    let grain = if extended {
        img.cluster_size() / 32
    } else {
        img.cluster_size()
    };
    let end = offset + len;
    let head_end = offset.next_multiple_of(grain).min(end);
    // The last cluster of the disk may be short: zeroing it whole is still a metadata change.
    let tail_start = if end == img.virtual_size() {
        end
    } else {
        end - end % grain
    };
    for (from, to) in [(offset, head_end), (tail_start.max(head_end), end)] {
        if from < to && !img.map(from, to - from).await?.iter().all(|e| e.zero) {
            return Ok(false);
        }
    }
    Ok(true)
}

/// The dirty ranges of bitmap `name` in `img` or, as QEMU looks for an exported bitmap,
/// in the first image of its backing chain that has one of that name.
async fn image_dirty_extents(
    img: &Image,
    name: &str,
    offset: u64,
    len: u64,
) -> Result<Vec<(u64, u64)>> {
    let mut cur = img;
    loop {
        match cur.bitmap_extents_in(name, offset, len).await {
            Err(e) if e.kind() == ErrorKind::NotFound => match cur.backing() {
                Some(Backing::Qcow2(b)) => cur = b,
                _ => return Err(e),
            },
            r => return r,
        }
    }
}

impl BlockDevice for Image {
    fn size(&self) -> u64 {
        self.virtual_size()
    }
    fn is_writable(&self) -> bool {
        Image::is_writable(self)
    }
    fn read_at<'a>(&'a self, buf: &'a mut [u8], offset: u64) -> DeviceFuture<'a, ()> {
        Box::pin(Image::read_at(self, buf, offset))
    }
    fn write_at<'a>(&'a self, buf: &'a [u8], offset: u64) -> DeviceFuture<'a, ()> {
        Box::pin(Image::write_at(self, buf, offset))
    }
    fn write_zeroes(&self, offset: u64, len: u64, may_unmap: bool) -> DeviceFuture<'_, ()> {
        Box::pin(Image::write_zeroes(
            self,
            offset,
            len,
            ZeroFlags { may_unmap },
        ))
    }
    fn discard(&self, offset: u64, len: u64) -> DeviceFuture<'_, ()> {
        Box::pin(Image::discard(self, offset, len))
    }
    fn flush(&self) -> DeviceFuture<'_, ()> {
        Box::pin(Image::flush(self))
    }
    fn close(&self) -> DeviceFuture<'_, ()> {
        Box::pin(Image::close(self))
    }
    fn map(&self, offset: u64, len: u64) -> DeviceFuture<'_, Vec<Extent>> {
        Box::pin(Image::map(self, offset, len))
    }
    fn zeroes_fast(&self, offset: u64, len: u64) -> DeviceFuture<'_, bool> {
        Box::pin(image_zeroes_fast(self, offset, len))
    }
    fn dirty_extents(
        &self,
        bitmap: &str,
        offset: u64,
        len: u64,
    ) -> DeviceFuture<'_, Vec<(u64, u64)>> {
        let name = bitmap.to_string();
        Box::pin(async move { image_dirty_extents(self, &name, offset, len).await })
    }
}

/// A raw disk: guest offset = storage offset.
#[derive(Debug, Clone)]
pub struct RawDevice {
    storage: Arc<dyn Storage>,
    size: u64,
    writable: bool,
    /// The format was guessed by probing (see [`RawDevice::format_probed`]).
    probed: bool,
}

impl RawDevice {
    /// Export `storage` (its current length is the export size).
    pub async fn new(storage: Arc<dyn Storage>, writable: bool) -> Result<RawDevice> {
        let size = io(storage.len().await, "sizing the raw file")?;
        Ok(RawDevice::with_size(storage, size, writable))
    }

    /// Export `storage` as a disk of `size` bytes, which may differ from the storage's length
    /// (qemu-img rounds a raw file's size up to whole 512-byte sectors; the storage reads
    /// zeros past its end).
    pub fn with_size(storage: Arc<dyn Storage>, size: u64, writable: bool) -> RawDevice {
        RawDevice {
            storage,
            size,
            writable,
            probed: false,
        }
    }

    /// Mark the raw format as guessed by probing: writes that would make block 0 probe as
    /// another format (a qcow2 header naming `/etc/passwd` as its backing file, say) then fail
    /// with [`qcow2_engine::ErrorKind::Refused`] (EPERM to NBD clients), as with qemu-nbd. Otherwise
    /// the next open of the file, also probing, would trust the client's header.
    pub fn format_probed(mut self, on: bool) -> RawDevice {
        self.probed = on;
        self
    }

    /// Refuse a write of `buf` at `offset` if block 0 would then probe as non-raw.
    async fn check_block0(&self, buf: &[u8], offset: u64) -> Result<()> {
        if !self.probed {
            return Ok(());
        }
        qcow2_engine::image::check_probed_raw_write(self.storage.as_ref(), buf, offset).await
    }

    /// Data and hole runs, merged; a hole reads as zeros.
    async fn runs(&self, offset: u64, len: u64) -> Result<Vec<Extent>> {
        let mut out: Vec<Extent> = Vec::new();
        let end = offset + len;
        let mut pos = offset;
        while pos < end {
            let (data, n) = io(
                self.storage.block_status(pos, end - pos).await,
                "block status",
            )?;
            // Never trust a backend to make progress.
            let n = n.clamp(1, end - pos);
            match out.last_mut() {
                Some(last) if last.data == data => last.length += n,
                _ => out.push(raw_extent(pos, n, data)),
            }
            pos += n;
        }
        Ok(out)
    }
}

fn raw_extent(start: u64, length: u64, data: bool) -> Extent {
    Extent {
        start,
        length,
        depth: 0,
        present: true,
        zero: !data,
        data,
        compressed: false,
        offset: Some(start),
    }
}

fn io<T>(r: std::io::Result<T>, what: &str) -> Result<T> {
    r.map_err(|e| Error::io(what, e))
}

impl BlockDevice for RawDevice {
    fn size(&self) -> u64 {
        self.size
    }
    fn is_writable(&self) -> bool {
        self.writable
    }
    fn read_at<'a>(&'a self, buf: &'a mut [u8], offset: u64) -> DeviceFuture<'a, ()> {
        Box::pin(async move { io(self.storage.read_at(buf, offset).await, "reading") })
    }
    fn write_at<'a>(&'a self, buf: &'a [u8], offset: u64) -> DeviceFuture<'a, ()> {
        Box::pin(async move {
            self.check_block0(buf, offset).await?;
            io(self.storage.write_at(buf, offset).await, "writing")
        })
    }
    fn write_zeroes(&self, offset: u64, len: u64, _may_unmap: bool) -> DeviceFuture<'_, ()> {
        Box::pin(async move { io(self.storage.write_zeroes(offset, len).await, "zeroing") })
    }
    fn discard(&self, offset: u64, len: u64) -> DeviceFuture<'_, ()> {
        Box::pin(async move { io(self.storage.discard(offset, len).await, "discarding") })
    }
    fn flush(&self) -> DeviceFuture<'_, ()> {
        Box::pin(async move { io(self.storage.flush().await, "flushing") })
    }
    fn close(&self) -> DeviceFuture<'_, ()> {
        self.flush()
    }
    fn map(&self, offset: u64, len: u64) -> DeviceFuture<'_, Vec<Extent>> {
        Box::pin(self.runs(offset, len))
    }
}
