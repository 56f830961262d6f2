//! A synchronous wrapper for callers without an async runtime: blocking methods mirroring
//! [`Image`]'s, and `std::io::{Read, Write, Seek}` over the virtual disk.
//!
//! It has no runtime of its own: each call drives its future on the calling thread with a
//! minimal executor, and the engine's IO completes on its own IO threads, which wake it. So
//! it works outside any runtime and inside one (a `#[tokio::main]` function, say), where it
//! blocks that runtime's thread for the duration of the call, as any blocking IO would.
//!
//! ```no_run
//! use std::io::{Read, Seek, SeekFrom, Write};
//! use qcow2_engine::blocking::BlockingImage;
//! use qcow2_engine::image::OpenOptions;
//!
//! let mut disk = BlockingImage::open("disk.qcow2", &OpenOptions::new().writable(true))?;
//! disk.seek(SeekFrom::Start(1 << 20))?;
//! disk.write_all(b"hello")?;
//! disk.close()?;
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

use std::future::Future;
use std::io;
use std::path::Path;

use crate::error::{Error, ErrorKind, Result};
use crate::image::{Image, OpenOptions, ZeroFlags};
use crate::units::{GuestOffset, to_usize};

/// An [`Image`] driven synchronously, with a cursor for `Read`/`Write`/`Seek`.
///
/// Dropping a writable image without [`BlockingImage::close`] still flushes and closes it
/// (errors are then lost); call `close` to see them.
#[derive(Debug)]
pub struct BlockingImage {
    image: Image,
    pos: u64,
    closed: bool,
}

impl BlockingImage {
    /// Open the image file at `path`.
    pub fn open(path: impl AsRef<Path>, opts: &OpenOptions) -> Result<BlockingImage> {
        let image = run(Image::open(path, opts))?;
        Ok(BlockingImage {
            image,
            pos: 0,
            closed: false,
        })
    }

    /// The async image inside (for `map`, `header`, ...).
    pub fn image(&self) -> &Image {
        &self.image
    }

    /// Virtual disk size in bytes.
    pub fn virtual_size(&self) -> u64 {
        self.image.virtual_size()
    }

    /// Blocking [`Image::read_at`].
    pub fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        run(self.image.read_at(buf, offset))
    }

    /// Blocking [`Image::write_at`].
    pub fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        run(self.image.write_at(buf, offset))
    }

    /// Blocking [`Image::write_zeroes`].
    pub fn write_zeroes(&self, offset: u64, len: u64, flags: ZeroFlags) -> Result<()> {
        run(self.image.write_zeroes(offset, len, flags))
    }

    /// Blocking [`Image::discard`].
    pub fn discard(&self, offset: u64, len: u64) -> Result<()> {
        run(self.image.discard(offset, len))
    }

    /// Blocking [`Image::flush`].
    pub fn flush_image(&self) -> Result<()> {
        run(self.image.flush())
    }

    /// Blocking [`Image::snapshots`].
    pub fn snapshots(&self) -> Result<Vec<crate::image::Snapshot>> {
        run(self.image.snapshots())
    }

    /// Blocking [`Image::create_snapshot`].
    pub fn create_snapshot(&self, name: &str) -> Result<crate::image::Snapshot> {
        run(self.image.create_snapshot(name))
    }

    /// Blocking [`Image::apply_snapshot`].
    pub fn apply_snapshot(&self, key: &str) -> Result<crate::image::Snapshot> {
        run(self.image.apply_snapshot(key))
    }

    /// Blocking [`Image::delete_snapshot`].
    pub fn delete_snapshot(&self, key: &str) -> Result<crate::image::Snapshot> {
        run(self.image.delete_snapshot(key))
    }

    /// Blocking [`Image::close`].
    pub fn close(mut self) -> Result<()> {
        self.closed = true;
        run(self.image.close())
    }
}

/// Drive `fut` to completion on this thread.
///
/// Inside a tokio task the future runs outside the task's cooperative budget: tokio's sync
/// primitives (which the engine uses) return `Pending` once the budget is spent, and the
/// budget is only refilled when the task yields — which it cannot while blocked here.
pub(crate) fn run<T>(fut: impl Future<Output = T>) -> T {
    futures_lite::future::block_on(tokio::task::coop::unconstrained(fut))
}

impl Drop for BlockingImage {
    fn drop(&mut self) {
        if !self.closed && self.image.is_writable() {
            let _ = run(self.image.close());
        }
    }
}

impl io::Read for BlockingImage {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = to_usize(
            self.virtual_size()
                .saturating_sub(self.pos)
                .min(buf.len() as u64),
        );
        self.read_at(&mut buf[..n], self.pos)?;
        self.pos += n as u64;
        Ok(n)
    }
}

impl io::Write for BlockingImage {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = to_usize(
            self.virtual_size()
                .saturating_sub(self.pos)
                .min(buf.len() as u64),
        );
        if n == 0 && !buf.is_empty() {
            let e = Error::new(
                ErrorKind::OutOfRange,
                "write past the end of the virtual disk",
            );
            return Err(e.at_guest(GuestOffset(self.pos)).into());
        }
        self.write_at(&buf[..n], self.pos)?;
        self.pos += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(self.flush_image()?)
    }
}

impl io::Seek for BlockingImage {
    fn seek(&mut self, pos: io::SeekFrom) -> io::Result<u64> {
        let target = match pos {
            io::SeekFrom::Start(p) => Some(p),
            io::SeekFrom::End(d) => self.virtual_size().checked_add_signed(d),
            io::SeekFrom::Current(d) => self.pos.checked_add_signed(d),
        };
        let p =
            target.ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "seek before 0"))?;
        self.pos = p;
        Ok(p)
    }
}
