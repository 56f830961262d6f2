//! Parsing and encoding of every NBD message, in one place.
//!
//! Nothing here does IO. A length read off the wire is never trusted: a request's payload
//! length is checked against [`MAX_PAYLOAD`] and the export's size before anyone allocates
//! for it, and an option's length against [`MAX_OPTION_LEN`].
//!
//! ```text
//! request (28 bytes)          simple reply (16)        structured chunk header (20)
//!  0  u32 magic 0x25609513     0 u32 magic 0x67446698   0  u32 magic 0x668e33ef
//!  4  u16 command flags        4 u32 error              4  u16 flags (DONE = 1)
//!  6  u16 type                 8 u64 cookie             6  u16 type
//!  8  u64 cookie                                        8  u64 cookie
//! 16  u64 offset                                        16 u32 payload length
//! 24  u32 length
//!
//! option (16 + len)            option reply (20 + len)
//!  0  u64 magic IHAVEOPT        0  u64 magic 0x3e889045565a9
//!  8  u32 option                8  u32 option
//! 12  u32 data length          12  u32 reply type
//!                              16  u32 data length
//! ```

use super::proto::*;

/// Size of a request header.
pub const REQUEST_LEN: usize = 28;
/// Size of an option header.
pub const OPTION_HEADER_LEN: usize = 16;
/// Largest option payload accepted: names are at most 4 KiB, so anything bigger is abuse.
pub const MAX_OPTION_LEN: u32 = 64 << 10;
/// Error messages are strings, which the spec caps at 4 KiB.
const MAX_MESSAGE: usize = 4096;

/// A malformed message the connection cannot recover from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    /// A request or option did not start with its magic number.
    #[error("bad magic {0:#x}")]
    BadMagic(u64),
}

/// A transmission request header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request {
    /// Command flags (`CMD_FLAG_*`).
    pub flags: u16,
    /// Command type (`CMD_*`).
    pub kind: u16,
    /// Opaque value echoed in the reply.
    pub cookie: u64,
    /// Byte offset into the export.
    pub offset: u64,
    /// Byte length.
    pub len: u32,
}

/// Why a request is refused before it reaches the export.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reject {
    /// The NBD error number for the reply.
    pub errno: Errno,
    /// A message for the human behind the client (structured replies only).
    pub message: &'static str,
}

/// What validation needs to know about the export and the negotiated session.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Export size in bytes.
    pub size: u64,
    /// Whether writes are allowed.
    pub writable: bool,
    /// Whether structured replies were negotiated.
    pub structured: bool,
    /// Whether a metadata context was selected (block status allowed).
    pub block_status: bool,
}

impl Request {
    /// Parse a request header; a bad magic means the stream is out of sync.
    pub fn parse(b: &[u8; REQUEST_LEN]) -> Result<Request, FrameError> {
        let magic = u32::from_be_bytes(b[0..4].try_into().unwrap());
        if magic != REQUEST_MAGIC {
            return Err(FrameError::BadMagic(magic.into()));
        }
        Ok(Request {
            flags: u16::from_be_bytes(b[4..6].try_into().unwrap()),
            kind: u16::from_be_bytes(b[6..8].try_into().unwrap()),
            cookie: u64::from_be_bytes(b[8..16].try_into().unwrap()),
            offset: u64::from_be_bytes(b[16..24].try_into().unwrap()),
            len: u32::from_be_bytes(b[24..28].try_into().unwrap()),
        })
    }

    /// Encode the header (the server never sends one: for tests and the fuzzer's round trip).
    #[cfg(any(test, feature = "fuzzing"))]
    pub fn encode(&self) -> [u8; REQUEST_LEN] {
        let mut b = [0u8; REQUEST_LEN];
        b[0..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
        b[4..6].copy_from_slice(&self.flags.to_be_bytes());
        b[6..8].copy_from_slice(&self.kind.to_be_bytes());
        b[8..16].copy_from_slice(&self.cookie.to_be_bytes());
        b[16..24].copy_from_slice(&self.offset.to_be_bytes());
        b[24..28].copy_from_slice(&self.len.to_be_bytes());
        b
    }

    /// Bytes of payload that follow the header on the wire (writes only).
    pub fn payload_len(&self) -> u32 {
        if self.kind == CMD_WRITE { self.len } else { 0 }
    }

    /// Check flags, size and range the way the spec asks (`Errors` section): unknown
    /// commands and flags give EINVAL, writes to a read-only export EPERM, reads and trims
    /// past the end EINVAL, writes past the end ENOSPC.
    pub fn validate(&self, lim: &Limits) -> Result<(), Reject> {
        let (allowed, past_end) = match self.kind {
            CMD_READ if lim.structured => (CMD_FLAG_DF, Errno::EINVAL),
            CMD_READ => (0, Errno::EINVAL),
            CMD_WRITE => (0, Errno::ENOSPC),
            CMD_FLUSH | CMD_DISC => (0, Errno::EINVAL),
            CMD_TRIM | CMD_CACHE => (0, Errno::EINVAL),
            CMD_WRITE_ZEROES => (CMD_FLAG_NO_HOLE | CMD_FLAG_FAST_ZERO, Errno::ENOSPC),
            CMD_BLOCK_STATUS => (CMD_FLAG_REQ_ONE, Errno::EINVAL),
            _ => return Err(reject(Errno::EINVAL, "unknown command")),
        };
        // FUA is valid on every command once advertised (the spec says so).
        if self.flags & !(allowed | CMD_FLAG_FUA) != 0 {
            return Err(reject(Errno::EINVAL, "flag not valid for this command"));
        }
        if matches!(self.kind, CMD_READ | CMD_WRITE) && self.len > MAX_PAYLOAD {
            return Err(reject(Errno::EINVAL, "request larger than 32 MiB"));
        }
        if matches!(self.kind, CMD_WRITE | CMD_TRIM | CMD_WRITE_ZEROES) && !lim.writable {
            return Err(reject(Errno::EPERM, "the export is read-only"));
        }
        if self.kind == CMD_BLOCK_STATUS && !lim.block_status {
            return Err(reject(Errno::EINVAL, "no metadata context was selected"));
        }
        if matches!(self.kind, CMD_FLUSH | CMD_DISC) {
            return match (self.offset, self.len) {
                (0, 0) => Ok(()),
                _ => Err(reject(Errno::EINVAL, "offset and length must be zero")),
            };
        }
        match self.offset.checked_add(self.len.into()) {
            Some(end) if end <= lim.size => Ok(()),
            _ => Err(reject(past_end, "request beyond the end of the export")),
        }
    }
}

fn reject(errno: Errno, message: &'static str) -> Reject {
    Reject { errno, message }
}

/// The outcome of one command, before encoding.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    /// Success without data.
    Done,
    /// Read data starting at `offset`.
    Data {
        /// Export offset of the first byte.
        offset: u64,
        /// The bytes.
        data: Vec<u8>,
    },
    /// Block status: the descriptors of each selected metadata context, in order.
    Extents(Vec<ContextStatus>),
    /// Failure.
    Error {
        /// The NBD error number.
        errno: Errno,
        /// A message (sent with structured replies only).
        message: String,
    },
}

/// Block status descriptors `(length, flags)` of one metadata context.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ContextStatus {
    /// The context id.
    pub context: u32,
    /// Consecutive extents from the request's offset.
    pub descriptors: Vec<(u32, u32)>,
}

/// An encoded reply: a header, then the payload written as is (saves copying read data).
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Encoded {
    /// Reply header (and small payloads).
    pub head: Vec<u8>,
    /// Bulk data following `head`.
    pub body: Vec<u8>,
}

impl Reply {
    /// An error reply.
    pub fn error(errno: Errno, message: impl Into<String>) -> Reply {
        Reply::Error {
            errno,
            message: message.into(),
        }
    }

    /// Encode for a session with or without structured replies. Structured sessions get
    /// structured replies throughout, so errors carry their message.
    pub fn encode(self, cookie: u64, structured: bool) -> Encoded {
        match (self, structured) {
            (Reply::Done, false) => head(simple_reply(cookie, Errno(0)).to_vec()),
            (Reply::Data { data, .. }, false) => Encoded {
                head: simple_reply(cookie, Errno(0)).to_vec(),
                body: data,
            },
            (Reply::Error { errno, .. }, false) => head(simple_reply(cookie, errno).to_vec()),
            // Block status only exists with structured replies; validation ensures it.
            (Reply::Extents(_), false) => head(simple_reply(cookie, Errno::EINVAL).to_vec()),
            (Reply::Done, true) => head(none_chunk(cookie).to_vec()),
            (Reply::Data { data, .. }, true) if data.is_empty() => {
                head(none_chunk(cookie).to_vec())
            }
            (Reply::Data { offset, data }, true) => Encoded {
                head: offset_data_header(cookie, offset, data.len() as u32).to_vec(),
                body: data,
            },
            (Reply::Extents(contexts), true) => head(block_status_chunks(cookie, &contexts)),
            (Reply::Error { errno, message }, true) => head(error_chunk(cookie, errno, &message)),
        }
    }
}

fn head(head: Vec<u8>) -> Encoded {
    Encoded {
        head,
        body: Vec::new(),
    }
}

/// A simple reply header.
pub fn simple_reply(cookie: u64, errno: Errno) -> [u8; 16] {
    let mut b = [0u8; 16];
    b[0..4].copy_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
    b[4..8].copy_from_slice(&errno.0.to_be_bytes());
    b[8..16].copy_from_slice(&cookie.to_be_bytes());
    b
}

/// A structured chunk header announcing `len` payload bytes.
pub fn chunk_header(flags: u16, kind: u16, cookie: u64, len: u32) -> [u8; 20] {
    let mut b = [0u8; 20];
    b[0..4].copy_from_slice(&STRUCTURED_REPLY_MAGIC.to_be_bytes());
    b[4..6].copy_from_slice(&flags.to_be_bytes());
    b[6..8].copy_from_slice(&kind.to_be_bytes());
    b[8..16].copy_from_slice(&cookie.to_be_bytes());
    b[16..20].copy_from_slice(&len.to_be_bytes());
    b
}

/// The final, empty chunk.
pub fn none_chunk(cookie: u64) -> [u8; 20] {
    chunk_header(REPLY_FLAG_DONE, REPLY_TYPE_NONE, cookie, 0)
}

/// Header of a final `OFFSET_DATA` chunk carrying `data_len` bytes (≤ [`MAX_PAYLOAD`], so
/// the chunk length cannot overflow).
pub fn offset_data_header(cookie: u64, offset: u64, data_len: u32) -> [u8; 28] {
    let mut b = [0u8; 28];
    let h = chunk_header(
        REPLY_FLAG_DONE,
        REPLY_TYPE_OFFSET_DATA,
        cookie,
        8 + data_len,
    );
    b[..20].copy_from_slice(&h);
    b[20..28].copy_from_slice(&offset.to_be_bytes());
    b
}

/// One `BLOCK_STATUS` chunk per context, the last one flagged DONE (none: a NONE chunk).
pub fn block_status_chunks(cookie: u64, contexts: &[ContextStatus]) -> Vec<u8> {
    let Some(last) = contexts.len().checked_sub(1) else {
        return none_chunk(cookie).to_vec();
    };
    let mut b = Vec::new();
    for (i, c) in contexts.iter().enumerate() {
        let len = 4 + 8 * c.descriptors.len();
        let flags = if i == last { REPLY_FLAG_DONE } else { 0 };
        // Descriptors are capped at a few thousand per context: the length fits in a u32.
        let len32 = u32::try_from(len).unwrap_or(u32::MAX);
        b.extend_from_slice(&chunk_header(flags, REPLY_TYPE_BLOCK_STATUS, cookie, len32));
        b.extend_from_slice(&c.context.to_be_bytes());
        for (length, flags) in &c.descriptors {
            b.extend_from_slice(&length.to_be_bytes());
            b.extend_from_slice(&flags.to_be_bytes());
        }
    }
    b
}

/// A final `ERROR` chunk with a message (cut to the spec's 4 KiB string limit).
pub fn error_chunk(cookie: u64, errno: Errno, message: &str) -> Vec<u8> {
    let msg = truncate_utf8(message, MAX_MESSAGE).as_bytes();
    let mut b = Vec::with_capacity(26 + msg.len());
    let len = 6 + msg.len() as u32;
    b.extend_from_slice(&chunk_header(
        REPLY_FLAG_DONE,
        REPLY_TYPE_ERROR,
        cookie,
        len,
    ));
    b.extend_from_slice(&errno.0.to_be_bytes());
    b.extend_from_slice(&(msg.len() as u16).to_be_bytes());
    b.extend_from_slice(msg);
    b
}

/// The longest prefix of `s` of at most `max` bytes that ends on a character boundary.
fn truncate_utf8(s: &str, max: usize) -> &str {
    let mut end = s.len().min(max);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// A client option header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OptionHeader {
    /// The option (`OPT_*`).
    pub option: u32,
    /// Length of the data that follows.
    pub len: u32,
}

impl OptionHeader {
    /// Parse an option header; a bad magic ends the negotiation.
    pub fn parse(b: &[u8; OPTION_HEADER_LEN]) -> Result<OptionHeader, FrameError> {
        let magic = u64::from_be_bytes(b[0..8].try_into().unwrap());
        if magic != OPT_MAGIC {
            return Err(FrameError::BadMagic(magic));
        }
        Ok(OptionHeader {
            option: u32::from_be_bytes(b[8..12].try_into().unwrap()),
            len: u32::from_be_bytes(b[12..16].try_into().unwrap()),
        })
    }
}

/// An option reply with its data.
pub fn option_reply(option: u32, kind: u32, data: &[u8]) -> Vec<u8> {
    let mut b = Vec::with_capacity(20 + data.len());
    b.extend_from_slice(&REP_MAGIC.to_be_bytes());
    b.extend_from_slice(&option.to_be_bytes());
    b.extend_from_slice(&kind.to_be_bytes());
    b.extend_from_slice(&(data.len() as u32).to_be_bytes());
    b.extend_from_slice(data);
    b
}

/// Reads big-endian fields and strings off option data, refusing to run past its end.
#[derive(Debug)]
pub struct Cursor<'a> {
    data: &'a [u8],
}

impl<'a> Cursor<'a> {
    /// A cursor over `data`.
    pub fn new(data: &'a [u8]) -> Self {
        Cursor { data }
    }

    /// The next `n` bytes, or `None` if fewer remain.
    pub fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if n > self.data.len() {
            return None;
        }
        let (head, rest) = self.data.split_at(n);
        self.data = rest;
        Some(head)
    }

    /// A big-endian u16.
    pub fn u16(&mut self) -> Option<u16> {
        Some(u16::from_be_bytes(self.take(2)?.try_into().ok()?))
    }

    /// A big-endian u32.
    pub fn u32(&mut self) -> Option<u32> {
        Some(u32::from_be_bytes(self.take(4)?.try_into().ok()?))
    }

    /// A string prefixed by its u32 length.
    pub fn string(&mut self) -> Option<&'a [u8]> {
        let n = self.u32()? as usize;
        self.take(n)
    }

    /// Bytes left.
    pub fn remaining(&self) -> usize {
        self.data.len()
    }
}

#[cfg(test)]
mod tests;
