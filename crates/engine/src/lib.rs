//! qcow2-rs: an async, concurrent, crash-safe implementation of the qcow2 disk image format.
//!
//! Layers, top to bottom (each depends only on the ones below it):
//!
//! ```text
//!  nbd/      NBD server exporting images (uses only the public API below)
//!  image/    open/create, read path, write path, zero/discard, flush
//!  alloc/    cluster allocator, in-flight allocation tracking
//!  cache/    metadata cache: L2 and refcount-block slices, dirty tracking
//!  format/   pure on-disk structures, no IO
//!  storage/  the Storage trait and its backends
//! ```

pub mod alloc;
pub mod blocking;
pub mod cache;
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
