//! Choosing the backend that does a file's IO: io_uring where the kernel allows it, the
//! portable thread pool otherwise.

use std::io;
use std::path::Path;
use std::str::FromStr;
use std::sync::Arc;

use super::{FileStorage, LockRequest, OpenFlags, Storage};

/// Which backend does file IO (see [`open_file`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum IoBackend {
    /// io_uring where available (Linux 5.6+, not blocked by seccomp), else threads, silently.
    #[default]
    Auto,
    /// The portable backend: blocking syscalls on a thread pool ([`FileStorage`]).
    Threads,
    /// io_uring only (`UringStorage`, Linux); opening fails where it is unavailable.
    Uring,
}

impl FromStr for IoBackend {
    type Err = String;

    /// `auto`, `threads`, or `io_uring` (also `uring`), as `qemu-img bench -i` spells them.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "auto" => Ok(IoBackend::Auto),
            "threads" => Ok(IoBackend::Threads),
            "io_uring" | "uring" => Ok(IoBackend::Uring),
            other => Err(format!(
                "unknown IO backend '{other}' (expected auto, threads or io_uring)"
            )),
        }
    }
}

/// Open the file at `path` with `backend`.
pub fn open_file(
    path: &Path,
    flags: OpenFlags,
    backend: IoBackend,
) -> io::Result<Arc<dyn Storage>> {
    open_file_locked(path, flags, backend, None)
}

/// Like [`open_file`], then take QEMU-compatible image locks (see [`FileStorage::lock`]).
pub fn open_file_locked(
    path: &Path,
    flags: OpenFlags,
    backend: IoBackend,
    lock: Option<LockRequest>,
) -> io::Result<Arc<dyn Storage>> {
    let file = FileStorage::open(path, flags)?;
    if let Some(req) = lock {
        file.lock(req)?;
    }
    match backend {
        IoBackend::Threads => Ok(Arc::new(file)),
        IoBackend::Uring => uring(file),
        IoBackend::Auto => match uring(file.clone()) {
            Ok(s) => Ok(s),
            Err(e) => {
                tracing::debug!("io_uring unavailable, using IO threads: {e}");
                Ok(Arc::new(file))
            }
        },
    }
}

#[cfg(all(target_os = "linux", feature = "uring"))]
fn uring(file: FileStorage) -> io::Result<Arc<dyn Storage>> {
    Ok(Arc::new(super::UringStorage::with_file(file)?))
}

#[cfg(not(all(target_os = "linux", feature = "uring")))]
fn uring(_file: FileStorage) -> io::Result<Arc<dyn Storage>> {
    Err(io::Error::new(
        io::ErrorKind::Unsupported,
        "io_uring is only available on Linux, with the engine's `uring` feature",
    ))
}
