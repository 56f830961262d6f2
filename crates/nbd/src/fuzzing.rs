//! A door for the fuzzer into the private wire parsers (feature `fuzzing`, not a stable API).
//!
//! The parsers see client bytes first, so they are fuzzed directly as well as through
//! [`serve`](crate::connection::serve); this one function keeps them private otherwise.

use super::frame::{Cursor, Limits, OPTION_HEADER_LEN, OptionHeader, REQUEST_LEN, Request};

/// Feed `bytes` to every NBD frame parser, as request headers (validated against an export of
/// `size` bytes; `flags` bit 0 = writable, bit 1 = structured replies, bit 2 = block status),
/// as an option header, and as option data. Panics only on a bug: a request that parses must
/// encode back to the same bytes.
pub fn frames(flags: u8, size: u64, bytes: &[u8]) {
    let lim = Limits {
        size,
        writable: flags & 1 != 0,
        structured: flags & 2 != 0,
        block_status: flags & 4 != 0,
    };
    for chunk in bytes.chunks_exact(REQUEST_LEN) {
        let Ok(buf) = <&[u8; REQUEST_LEN]>::try_from(chunk) else {
            continue;
        };
        if let Ok(req) = Request::parse(buf) {
            let _ = (req.validate(&lim), req.payload_len());
            assert_eq!(&req.encode(), buf, "request round trip");
        }
    }
    if let Some(Ok(h)) = bytes
        .get(..OPTION_HEADER_LEN)
        .and_then(|s| <&[u8; OPTION_HEADER_LEN]>::try_from(s).ok())
        .map(OptionHeader::parse)
    {
        let _ = (h.option, h.len);
    }
    let mut c = Cursor::new(bytes);
    while c.remaining() > 0 {
        if c.string().is_none() && c.u16().is_none() && c.take(1).is_none() {
            break;
        }
    }
}
