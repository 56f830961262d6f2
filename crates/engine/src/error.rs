//! The library's one public error type: a stable [`ErrorKind`], the context the error happened
//! in (file, offset, structure or operation) and the underlying cause.
//!
//! Callers match on [`Error::kind`]; the message is for humans and may change. The NBD server
//! maps the kind to an NBD errno.

use std::fmt;
use std::path::{Path, PathBuf};

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
        }
    }
}

/// The library's error: kind + context + optional cause.
#[derive(Debug, thiserror::Error)]
pub struct Error {
    kind: ErrorKind,
    what: String,
    offset: Option<u64>,
    path: Option<PathBuf>,
    #[source]
    source: Option<std::io::Error>,
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

    /// Attach the byte offset (guest or host, as `what` says) the error is about.
    pub fn at(mut self, offset: u64) -> Self {
        self.offset = Some(offset);
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

    /// The offset the error is about, if known.
    pub fn offset(&self) -> Option<u64> {
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
        if let Some(off) = self.offset {
            write!(f, " (offset {off:#x})")?;
        }
        if let Some(src) = &self.source {
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
            _ => std::io::ErrorKind::Other,
        };
        std::io::Error::new(kind, e)
    }
}
