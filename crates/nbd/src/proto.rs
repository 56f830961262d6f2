//! Protocol constants of the NBD wire format (the NetworkBlockDevice project's `proto.md`).
//!
//! Every number here is sent big-endian. Names follow the specification, minus the `NBD_`
//! prefix, so a reader can grep the spec for them.

/// `NBDMAGIC`: first 8 bytes the server sends.
pub const INIT_MAGIC: u64 = 0x4e42_444d_4147_4943;
/// `IHAVEOPT`: second server magic, and the magic of every client option.
pub const OPT_MAGIC: u64 = 0x4948_4156_454f_5054;
/// Magic of every option reply (fixed newstyle).
pub const REP_MAGIC: u64 = 0x0003_e889_0455_65a9;
/// Second server magic of an oldstyle server (no options: size and flags follow).
pub const OLDSTYLE_MAGIC: u64 = 0x0000_4202_8186_1253;
/// Magic of a transmission request.
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
/// Magic of a simple reply.
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
/// Magic of a structured reply chunk.
pub const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;

// Handshake flags (server, 16 bits).
/// The server speaks fixed newstyle.
pub const FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
/// The server can omit the 124 zero bytes after `OPT_EXPORT_NAME`.
pub const FLAG_NO_ZEROES: u16 = 1 << 1;

// Client flags (32 bits).
/// The client speaks fixed newstyle.
pub const FLAG_C_FIXED_NEWSTYLE: u32 = 1 << 0;
/// The client does not want the 124 zero bytes.
pub const FLAG_C_NO_ZEROES: u32 = 1 << 1;

// Transmission flags (16 bits).
/// Always set.
pub const FLAG_HAS_FLAGS: u16 = 1 << 0;
/// The export refuses writes.
pub const FLAG_READ_ONLY: u16 = 1 << 1;
/// `CMD_FLUSH` is supported.
pub const FLAG_SEND_FLUSH: u16 = 1 << 2;
/// `CMD_FLAG_FUA` is supported.
pub const FLAG_SEND_FUA: u16 = 1 << 3;
/// The export is a rotating disk (a hint for request ordering).
pub const FLAG_ROTATIONAL: u16 = 1 << 4;
/// `CMD_TRIM` is supported.
pub const FLAG_SEND_TRIM: u16 = 1 << 5;
/// `CMD_WRITE_ZEROES` (and `CMD_FLAG_NO_HOLE`) is supported.
pub const FLAG_SEND_WRITE_ZEROES: u16 = 1 << 6;
/// `CMD_FLAG_DF` is honoured on reads (structured replies only).
pub const FLAG_SEND_DF: u16 = 1 << 7;
/// Flush and FUA on one connection cover writes completed on every connection.
pub const FLAG_CAN_MULTI_CONN: u16 = 1 << 8;
/// `CMD_RESIZE` is supported.
pub const FLAG_SEND_RESIZE: u16 = 1 << 9;
/// `CMD_CACHE` is supported.
pub const FLAG_SEND_CACHE: u16 = 1 << 10;
/// `CMD_FLAG_FAST_ZERO` is supported.
pub const FLAG_SEND_FAST_ZERO: u16 = 1 << 11;
/// `CMD_BLOCK_STATUS` takes a payload (extended headers only).
pub const FLAG_BLOCK_STAT_PAYLOAD: u16 = 1 << 12;

// Options.
/// Choose an export and enter transmission (no error possible).
pub const OPT_EXPORT_NAME: u32 = 1;
/// End the negotiation.
pub const OPT_ABORT: u32 = 2;
/// List the exports.
pub const OPT_LIST: u32 = 3;
/// Upgrade the connection to TLS.
pub const OPT_STARTTLS: u32 = 5;
/// Describe an export.
pub const OPT_INFO: u32 = 6;
/// Describe an export and enter transmission.
pub const OPT_GO: u32 = 7;
/// Use structured replies.
pub const OPT_STRUCTURED_REPLY: u32 = 8;
/// List metadata contexts.
pub const OPT_LIST_META_CONTEXT: u32 = 9;
/// Select metadata contexts.
pub const OPT_SET_META_CONTEXT: u32 = 10;
/// Use 64-bit request and reply headers (we serve without them; our client asks).
pub const OPT_EXTENDED_HEADERS: u32 = 11;

// Option reply types.
/// Success / end of a list.
pub const REP_ACK: u32 = 1;
/// One export of `OPT_LIST`.
pub const REP_SERVER: u32 = 2;
/// One piece of information for `OPT_INFO` / `OPT_GO`.
pub const REP_INFO: u32 = 3;
/// One metadata context.
pub const REP_META_CONTEXT: u32 = 4;
/// The option is unknown.
pub const REP_ERR_UNSUP: u32 = (1 << 31) + 1;
/// The server's configuration forbids the option.
pub const REP_ERR_POLICY: u32 = (1 << 31) + 2;
/// The option is malformed or not allowed in this state.
pub const REP_ERR_INVALID: u32 = (1 << 31) + 3;
/// The server cannot do it on this platform.
pub const REP_ERR_PLATFORM: u32 = (1 << 31) + 4;
/// The option needs TLS first.
pub const REP_ERR_TLS_REQD: u32 = (1 << 31) + 5;
/// The export does not exist.
pub const REP_ERR_UNKNOWN: u32 = (1 << 31) + 6;
/// The server is shutting down.
pub const REP_ERR_SHUTDOWN: u32 = (1 << 31) + 7;
/// The export needs the client to ask for `INFO_BLOCK_SIZE`.
pub const REP_ERR_BLOCK_SIZE_REQD: u32 = (1 << 31) + 8;

// Information types of `REP_INFO`.
/// Size and transmission flags.
pub const INFO_EXPORT: u16 = 0;
/// Canonical export name.
pub const INFO_NAME: u16 = 1;
/// Human-readable description.
pub const INFO_DESCRIPTION: u16 = 2;
/// Minimum, preferred and maximum block sizes.
pub const INFO_BLOCK_SIZE: u16 = 3;

// Commands.
/// Read data.
pub const CMD_READ: u16 = 0;
/// Write data (payload follows the request).
pub const CMD_WRITE: u16 = 1;
/// Disconnect after the requests in flight (no reply).
pub const CMD_DISC: u16 = 2;
/// Make completed writes durable.
pub const CMD_FLUSH: u16 = 3;
/// Discard a range.
pub const CMD_TRIM: u16 = 4;
/// Zero a range.
pub const CMD_WRITE_ZEROES: u16 = 6;
/// Prefetch a range.
pub const CMD_CACHE: u16 = 5;
/// Query metadata contexts for a range.
pub const CMD_BLOCK_STATUS: u16 = 7;

// Command flags.
/// Force unit access: persist before replying.
pub const CMD_FLAG_FUA: u16 = 1 << 0;
/// Write zeroes without punching holes.
pub const CMD_FLAG_NO_HOLE: u16 = 1 << 1;
/// Reply to a read with a single content chunk.
pub const CMD_FLAG_DF: u16 = 1 << 2;
/// Block status: one extent only.
pub const CMD_FLAG_REQ_ONE: u16 = 1 << 3;
/// Write zeroes: fail with `ENOTSUP` rather than zero slowly.
pub const CMD_FLAG_FAST_ZERO: u16 = 1 << 4;

// Structured reply flags and types.
/// Last chunk of a reply.
pub const REPLY_FLAG_DONE: u16 = 1 << 0;
/// Empty final chunk.
pub const REPLY_TYPE_NONE: u16 = 0;
/// Data at an offset.
pub const REPLY_TYPE_OFFSET_DATA: u16 = 1;
/// Block status descriptors of one context.
pub const REPLY_TYPE_BLOCK_STATUS: u16 = 5;
/// An error with a message.
pub const REPLY_TYPE_ERROR: u16 = (1 << 15) + 1;

// `base:allocation` status flags.
/// Not allocated.
pub const STATE_HOLE: u32 = 1 << 0;
/// Reads as zeros.
pub const STATE_ZERO: u32 = 1 << 1;
/// `qemu:dirty-bitmap:NAME`'s flag: the range is dirty.
pub const STATE_DIRTY: u32 = 1 << 0;

/// The metadata context every export offers.
pub const BASE_ALLOCATION: &str = "base:allocation";

/// Largest read or write payload (2^25, the size every client must accept).
pub const MAX_PAYLOAD: u32 = 32 << 20;
/// Preferred request size: the page size and the usual cluster granularity.
pub const PREFERRED_BLOCK: u32 = 4096;

/// An NBD error number (the values the spec fixes, which match Linux errno).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Errno(pub u32);

impl Errno {
    /// Operation not permitted (write to a read-only export).
    pub const EPERM: Errno = Errno(1);
    /// Input/output error.
    pub const EIO: Errno = Errno(5);
    /// Invalid argument.
    pub const EINVAL: Errno = Errno(22);
    /// No space left (also: write beyond the end).
    pub const ENOSPC: Errno = Errno(28);
    /// Not supported (a fast zero that would be slow).
    pub const ENOTSUP: Errno = Errno(95);
}
