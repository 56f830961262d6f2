//! An async, concurrent, crash-safe implementation of QEMU's qcow2 disk image format.
//!
//! The public API:
//!
//! - [`image`]: [`Image::open`](image::Image::open) with [`OpenOptions`](image::OpenOptions),
//!   then `read_at`/`write_at`/`write_zeroes`/`discard`/`flush`/`resize`/`close` from any
//!   number of tasks at once; [`create`](image::create::create) new images.
//! - [`check`]: `qemu-img check` and repair.
//! - `crypto` (feature `luks`): encrypted images: `crypto::Secret` for
//!   `OpenOptions::key_secret`, the LUKS1 structures, key slot changes (`crypto::amend`).
//! - `blocking` (feature `blocking`): a synchronous wrapper with `std::io::{Read, Write, Seek}`.
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
//!
//! # Flushing
//!
//! Writes change metadata (L2 tables, refcounts, the L1 table) in memory first; it reaches
//! the file, in crash-safe order, on [`image::Image::flush`], on [`image::Image::close`]
//! (always await it before dropping a writable image: there is no async drop), when the
//! metadata cache fills up, and in the background. The background flusher of a writable
//! image flushes every [`image::OpenOptions::flush_interval`] (default 1 s) and whenever a
//! cache is more dirty than [`image::OpenOptions::dirty_threshold_percent`]. Who runs it is
//! [`image::OpenOptions::flusher`]'s choice ([`image::Flusher`]):
//!
//! - `Flusher::Thread` (the default): a small thread of its own per image, which drives each
//!   flush with a minimal executor. It works under any async runtime, or none.
//! - `Flusher::Tokio(handle)` (feature `tokio`): a task on that tokio runtime, which must
//!   have timers enabled.
//! - `Flusher::None`: no background flushing.
//!
//! The flusher ends when its image is closed or its last handle is dropped.
//!
//! # Runtimes
//!
//! The engine needs no particular async runtime: its file IO completes on its own IO
//! threads (or io_uring ring thread), which wake whatever waker polled it, and it uses only
//! tokio's runtime-agnostic `sync` primitives. A dropped mutating future finishes its work in
//! the background (see [`image`]): with the `tokio` feature on the current tokio runtime if
//! there is one, else on a short-lived thread. `blocking::BlockingImage` (feature
//! `blocking`) drives the same futures on the calling thread, inside or outside a runtime.

#![deny(missing_docs)]
// Truncating casts hide overflow bugs on offsets read from untrusted images: convert with
// `try_from` (or `units::to_usize`/`to_u32` for values already bounded), or allow one with a
// comment saying why it cannot truncate. Tests may cast freely.
#![cfg_attr(not(test), deny(clippy::cast_possible_truncation))]

pub(crate) mod alloc;
#[cfg(feature = "blocking")]
pub mod blocking;
pub(crate) mod cache;
pub mod check;
#[cfg(feature = "luks")]
pub mod crypto;
mod detach;
pub mod error;
pub mod format;
pub mod image;
pub mod ops;
pub mod storage;
pub mod units;

pub use error::{Error, ErrorKind, Result};
pub use storage::Storage;
pub use units::{GuestOffset, HostOffset};
