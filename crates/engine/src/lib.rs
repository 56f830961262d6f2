//! An async, concurrent, crash-safe implementation of QEMU's qcow2 disk image format.
//!
//! The public API:
//!
//! - [`image`]: [`Image::open`](image::Image::open) with [`OpenOptions`](image::OpenOptions),
//!   then `read_at`/`write_at`/`write_zeroes`/`discard`/`flush`/`resize`/`close` from any
//!   number of tasks at once; [`create`](image::create::create) new images.
//! - [`check`]: `qemu-img check` and repair.
//! - [`blocking`]: a synchronous wrapper with `std::io::{Read, Write, Seek}`.
//! - [`storage`]: the [`Storage`] trait the engine does its IO through, and its backends.
//! - [`format`](mod@format): the on-disk structures, parsed and encoded without IO (for inspection tools).
//! - [`Error`]: a stable [`ErrorKind`] with context; the cause is its `source()`.
//!
//! ```no_run
//! # async fn demo() -> qcow2_engine::Result<()> {
//! use qcow2_engine::image::{Image, OpenOptions};
//! let img = Image::open("disk.qcow2", &OpenOptions::new().writable(true)).await?;
//! img.write_at(&[0xab; 4096], 1 << 20).await?;
//! let mut buf = vec![0u8; 4096];
//! img.read_at(&mut buf, 1 << 20).await?;
//! img.close().await?;
//! # Ok(()) }
//! ```
//!
//! The refcount allocator and the metadata cache are private on purpose: through them a
//! caller could set refcounts and corrupt an image. Layers, top to bottom (each depends only
//! on the ones below it):
//!
//! ```text
//!  image/    open/create, read path, write path, zero/discard, flush
//!  alloc/    cluster allocator, in-flight allocation tracking       (private)
//!  cache/    metadata cache: L2 and refcount-block slices           (private)
//!  format/   pure on-disk structures, no IO
//!  storage/  the Storage trait and its backends
//! ```
#![deny(missing_docs)]

pub(crate) mod alloc;
pub mod blocking;
pub(crate) mod cache;
pub mod check;
mod detach;
pub mod error;
pub mod format;
pub mod image;
pub mod storage;
pub mod units;

pub use error::{Error, ErrorKind, Result};
pub use storage::Storage;
pub use units::{GuestOffset, HostOffset};
