//! The library's one public error type: a stable [`ErrorKind`], the context the error happened
//! in (file, offset, structure or operation) and the underlying cause.
//!
//! Callers match on [`Error::kind`]; the message is for humans and may change. The NBD server
//! maps the kind to an NBD errno.

use std::fmt;
use std::path::{Path, PathBuf};

use crate::units::{GuestOffset, HostOffset};

/// What went wrong, as a stable category.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ErrorKind {
    /// The image is not a valid qcow2 image (bad magic, header field out of range, ...).
    InvalidImage,
    /// The image uses a feature this library does not implement (e.g. encryption for data).
    Unsupported,
    /// The image's metadata is inconsistent (e.g. an L2 entry pointing into metadata).
    Corrupt,
    /// The storage returned an error.
    Io,
    /// A request reaches outside the virtual disk.
    OutOfRange,
    /// The storage ran out of space.
    NoSpace,
    /// A write was attempted on an image opened read-only.
    ReadOnly,
    /// A caller-supplied argument is invalid (bad size, option, combination).
    InvalidArgument,
    /// An earlier metadata write failed; the image refuses writes until it is reopened.
    Poisoned,
    /// Another holder of the file (this process or another, ours or QEMU) has it locked in a
    /// conflicting way (QEMU-compatible image locks).
    Locked,
    /// The image names a file (backing or data file) that the reference policy does not allow.
    Refused,
    /// A named object (an internal snapshot, a persistent bitmap) does not exist.
    NotFound,
}

impl ErrorKind {
    /// A short lowercase name, stable across releases.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorKind::InvalidImage => "invalid image",
            ErrorKind::Unsupported => "unsupported",
            ErrorKind::Corrupt => "corrupt image",
            ErrorKind::Io => "I/O error",
            ErrorKind::OutOfRange => "out of range",
            ErrorKind::NoSpace => "no space left",
            ErrorKind::ReadOnly => "read-only",
            ErrorKind::InvalidArgument => "invalid argument",
            ErrorKind::Poisoned => "image poisoned by an earlier metadata write failure",
            ErrorKind::Locked => "image is locked",
            ErrorKind::Refused => "reference refused",
            ErrorKind::NotFound => "not found",
        }
    }
}

/// The library's error: kind + context + optional cause.
///
/// `Display` shows the kind and the context only (file, what, offset); the cause is
/// [`source()`](std::error::Error::source), so a reporter that walks the chain (anyhow,
/// `qcow2`'s messages) prints each part once. The alternate form `{:#}` appends the cause too,
/// for one-line logs.
///
/// ```
/// use std::error::Error as _;
/// let cause = std::io::Error::other("disk on fire");
/// let e = qcow2_engine::Error::io("reading an L2 table", cause)
///     .at_host(qcow2_engine::HostOffset(0x50000))
///     .in_file("a.qcow2");
/// assert_eq!(e.to_string(), "a.qcow2: I/O error: reading an L2 table (host 0x50000)");
/// assert_eq!(e.source().unwrap().to_string(), "disk on fire");
/// assert_eq!(format!("{e:#}"), format!("{e}: disk on fire"));
/// ```
#[derive(Debug, thiserror::Error)]
pub struct Error {
    kind: ErrorKind,
    what: String,
    offset: Option<Location>,
    path: Option<PathBuf>,
    #[source]
    source: Option<std::io::Error>,
}

/// Where an error happened: a guest offset, a host offset, or a byte offset of another kind
/// (a header field, a stream position). `Display`: `guest 0x…`, `host 0x…`, `offset 0x…`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Location {
    /// An offset in the virtual disk.
    Guest(GuestOffset),
    /// An offset in the image file or the external data file.
    Host(HostOffset),
    /// A byte offset whose address space the message gives.
    Offset(u64),
}

impl Location {
    /// The offset as a number.
    pub fn value(self) -> u64 {
        match self {
            Location::Guest(g) => g.0,
            Location::Host(h) => h.0,
            Location::Offset(o) => o,
        }
    }
}

impl fmt::Display for Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Location::Guest(g) => g.fmt(f),
            Location::Host(h) => h.fmt(f),
            Location::Offset(o) => write!(f, "offset {o:#x}"),
        }
    }
}

/// Shorthand used throughout the crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// A new error of `kind` describing `what` happened.
    pub fn new(kind: ErrorKind, what: impl Into<String>) -> Self {
        Error {
            kind,
            what: what.into(),
            offset: None,
            path: None,
            source: None,
        }
    }

    /// [`ErrorKind::InvalidImage`] with a description.
    pub fn invalid(what: impl Into<String>) -> Self {
        Self::new(ErrorKind::InvalidImage, what)
    }

    /// [`ErrorKind::Unsupported`] with a description.
    pub fn unsupported(what: impl Into<String>) -> Self {
        Self::new(ErrorKind::Unsupported, what)
    }

    /// [`ErrorKind::Corrupt`] with a description.
    pub fn corrupt(what: impl Into<String>) -> Self {
        Self::new(ErrorKind::Corrupt, what)
    }

    /// [`ErrorKind::InvalidArgument`] with a description.
    pub fn invalid_arg(what: impl Into<String>) -> Self {
        Self::new(ErrorKind::InvalidArgument, what)
    }

    /// An I/O error during `what`; ENOSPC becomes [`ErrorKind::NoSpace`].
    pub fn io(what: impl Into<String>, source: std::io::Error) -> Self {
        let kind = if source.raw_os_error() == Some(libc::ENOSPC)
            || source.kind() == std::io::ErrorKind::StorageFull
        {
            ErrorKind::NoSpace
        } else {
            ErrorKind::Io
        };
        Error {
            source: Some(source),
            ..Self::new(kind, what)
        }
    }

    /// An error opening `path` for `what`: a lock conflict (an IO error of kind
    /// [`std::io::ErrorKind::ResourceBusy`]) becomes [`ErrorKind::Locked`] with QEMU's wording,
    /// anything else [`Error::io`].
    pub fn open(what: &str, path: &Path, source: std::io::Error) -> Self {
        if source.kind() != std::io::ErrorKind::ResourceBusy {
            return Self::io(what.to_string(), source).in_file(path);
        }
        let msg = format!(
            "{source}. Is another process using the image [{}]?",
            path.display()
        );
        Self::new(ErrorKind::Locked, msg)
    }

    /// Attach a byte offset the error is about, in the file named by `what`/the path (a
    /// header field, a position in a stream). Prefer [`Error::at_guest`] or
    /// [`Error::at_host`] when the address space is known.
    pub fn at(mut self, offset: u64) -> Self {
        self.offset = Some(Location::Offset(offset));
        self
    }

    /// Attach the guest (virtual disk) offset the error is about.
    pub fn at_guest(mut self, offset: GuestOffset) -> Self {
        self.offset = Some(Location::Guest(offset));
        self
    }

    /// Attach the host (image or data file) offset the error is about.
    pub fn at_host(mut self, offset: HostOffset) -> Self {
        self.offset = Some(Location::Host(offset));
        self
    }

    /// Attach the file the error is about.
    pub fn in_file(mut self, path: impl AsRef<Path>) -> Self {
        if self.path.is_none() {
            self.path = Some(path.as_ref().to_path_buf());
        }
        self
    }

    /// The stable category.
    pub fn kind(&self) -> ErrorKind {
        self.kind
    }

    /// The description of what happened.
    pub fn what(&self) -> &str {
        &self.what
    }

    /// The offset the error is about, if known (guest or host: see [`Error::location`]).
    pub fn offset(&self) -> Option<u64> {
        self.offset.map(Location::value)
    }

    /// The offset the error is about and its address space, if known.
    pub fn location(&self) -> Option<Location> {
        self.offset
    }

    /// The file the error is about, if known.
    pub fn path(&self) -> Option<&Path> {
        self.path.as_deref()
    }

    /// The OS error number behind this error, if any.
    pub fn raw_os_error(&self) -> Option<i32> {
        self.source.as_ref().and_then(|e| e.raw_os_error())
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(p) = &self.path {
            write!(f, "{}: ", p.display())?;
        }
        write!(f, "{}: {}", self.kind.as_str(), self.what)?;
        if let Some(loc) = self.offset {
            write!(f, " ({loc})")?;
        }
        // The cause is `source()`'s to print: showing it here too would print it twice in every
        // error chain. `{:#}` (anyhow's convention) appends it for one-line logs.
        if let Some(src) = self.source.as_ref().filter(|_| f.alternate()) {
            write!(f, ": {src}")?;
        }
        Ok(())
    }
}

impl From<Error> for std::io::Error {
    fn from(e: Error) -> Self {
        let kind = match e.kind {
            ErrorKind::OutOfRange | ErrorKind::InvalidArgument => std::io::ErrorKind::InvalidInput,
            ErrorKind::ReadOnly | ErrorKind::Refused => std::io::ErrorKind::PermissionDenied,
            ErrorKind::Locked => std::io::ErrorKind::ResourceBusy,
            ErrorKind::Unsupported => std::io::ErrorKind::Unsupported,
            ErrorKind::NoSpace => std::io::ErrorKind::StorageFull,
            ErrorKind::NotFound => std::io::ErrorKind::NotFound,
            _ => std::io::ErrorKind::Other,
        };
        std::io::Error::new(kind, e)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::error::Error as _;

    /// The cause is printed by whoever walks the chain, so Display must not repeat it.
    #[test]
    fn display_leaves_the_cause_to_source() {
        let cause = std::io::Error::from_raw_os_error(libc::EIO);
        let cause_text = cause.to_string();
        let e = Error::io("reading an L2 table", cause)
            .at(0x50000)
            .in_file("img.qcow2");
        let shown = e.to_string();
        assert_eq!(
            shown,
            "img.qcow2: I/O error: reading an L2 table (offset 0x50000)"
        );
        assert!(!shown.contains(&cause_text), "{shown}");
        let src = e.source().expect("the cause is the source");
        assert_eq!(src.to_string(), cause_text);
        assert_eq!(format!("{e:#}"), format!("{shown}: {cause_text}"));
    }

    /// Through `std::io::Error` (the `Read`/`Write` impls and the NBD server) the chain is the
    /// same: the wrapper shows our Display, its source is our cause.
    #[test]
    fn io_error_wrapper_keeps_the_chain() {
        let e = Error::io("flushing", std::io::Error::from_raw_os_error(libc::ENOSPC));
        let io: std::io::Error = e.into();
        assert_eq!(io.kind(), std::io::ErrorKind::StorageFull);
        assert_eq!(io.to_string(), "no space left: flushing");
        let src = io.source().expect("the cause survives the wrapping");
        assert_eq!(
            src.to_string(),
            std::io::Error::from_raw_os_error(libc::ENOSPC).to_string()
        );
    }

    /// An error without a cause prints the same in both forms.
    #[test]
    fn no_cause_no_suffix() {
        let e = Error::corrupt("L2 entry points into the header").at(0x10000);
        assert_eq!(e.to_string(), format!("{e:#}"));
        assert!(e.source().is_none());
    }

    /// The context names the address space of the offset.
    #[test]
    fn offsets_say_guest_or_host() {
        let g = Error::corrupt("x").at_guest(GuestOffset(0x2000));
        let h = Error::corrupt("x").at_host(HostOffset(0x30000));
        assert_eq!(g.to_string(), "corrupt image: x (guest 0x2000)");
        assert_eq!(h.to_string(), "corrupt image: x (host 0x30000)");
        assert_eq!(g.location(), Some(Location::Guest(GuestOffset(0x2000))));
        assert_eq!((g.offset(), h.offset()), (Some(0x2000), Some(0x30000)));
    }
}
