//! The fixed-newstyle handshake: greet, read the client's flags, then answer options until
//! the client picks an export (`OPT_EXPORT_NAME` or a successful `OPT_GO`) or leaves.
//!
//! ```text
//! S: NBDMAGIC IHAVEOPT flags(FIXED_NEWSTYLE|NO_ZEROES)     C: client flags
//! C: IHAVEOPT opt len data   S: REP_MAGIC opt reply len data   (repeated)
//! ```
//!
//! Every option's data is read whole (at most [`MAX_OPTION_LEN`] bytes, a larger one ends the
//! connection as abuse) before it is parsed, so a malformed option can be answered with
//! `NBD_REP_ERR_INVALID` and the stream stays in sync.

use std::io;
use std::sync::Arc;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use super::export::{Export, Exports};
use super::frame::{Cursor, MAX_OPTION_LEN, OPTION_HEADER_LEN, OptionHeader, option_reply};
use super::proto::*;

/// What the handshake agreed on.
#[derive(Debug, Clone)]
pub struct Session {
    /// The chosen export.
    pub export: Arc<Export>,
    /// Structured replies were negotiated.
    pub structured: bool,
    /// `base:allocation` was selected for this export.
    pub block_status: bool,
}

/// The transmission flags of `export` for a session with or without structured replies.
pub fn transmission_flags(export: &Export, structured: bool) -> u16 {
    // One Image (one cache) serves every connection and its flush covers all of them, so
    // flush/FUA on one connection are visible on all: multi-conn is safe.
    let mut f = FLAG_HAS_FLAGS | FLAG_SEND_FLUSH | FLAG_SEND_FUA | FLAG_CAN_MULTI_CONN;
    if export.device.is_writable() {
        f |= FLAG_SEND_TRIM | FLAG_SEND_WRITE_ZEROES;
    } else {
        f |= FLAG_READ_ONLY;
    }
    // Reads always answer with one data chunk, so "don't fragment" costs nothing; the
    // flag only exists with structured replies.
    if structured {
        f |= FLAG_SEND_DF;
    }
    f
}

fn protocol(msg: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg.to_string())
}

/// Run the handshake. `Ok(None)`: the client aborted or asked for an unknown export with
/// `OPT_EXPORT_NAME` (which cannot be answered with an error): close the connection.
pub async fn negotiate<R, W>(
    rd: &mut R,
    wr: &mut W,
    exports: &Exports,
) -> io::Result<Option<Session>>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut greeting = Vec::with_capacity(18);
    greeting.extend_from_slice(&INIT_MAGIC.to_be_bytes());
    greeting.extend_from_slice(&OPT_MAGIC.to_be_bytes());
    greeting.extend_from_slice(&(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes());
    wr.write_all(&greeting).await?;
    wr.flush().await?;
    let client = rd.read_u32().await?;
    if client & !(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES) != 0 {
        return Err(protocol("unknown client flags"));
    }
    let mut n = Negotiation {
        exports,
        no_zeroes: client & FLAG_C_NO_ZEROES != 0,
        structured: false,
        meta_export: None,
        out: Vec::new(),
    };
    loop {
        let (opt, data) = read_option(rd).await?;
        let done = n.option(opt, &data);
        wr.write_all(&n.out).await?;
        wr.flush().await?;
        n.out.clear();
        match done {
            Step::Continue => {}
            Step::Close => return Ok(None),
            Step::Transmit(session) => return Ok(Some(session)),
        }
    }
}

/// Read one option header and its data.
async fn read_option<R: AsyncRead + Unpin>(rd: &mut R) -> io::Result<(u32, Vec<u8>)> {
    let mut h = [0u8; OPTION_HEADER_LEN];
    rd.read_exact(&mut h).await?;
    let h = OptionHeader::parse(&h).map_err(|e| protocol(&e.to_string()))?;
    if h.len > MAX_OPTION_LEN {
        return Err(protocol("option data too large"));
    }
    let mut data = vec![0u8; h.len as usize];
    rd.read_exact(&mut data).await?;
    Ok((h.option, data))
}

/// What happens after an option.
enum Step {
    Continue,
    Close,
    Transmit(Session),
}

/// Option-haggling state; replies are collected in `out` and sent after each option.
struct Negotiation<'a> {
    exports: &'a Exports,
    no_zeroes: bool,
    structured: bool,
    /// The export `base:allocation` was last selected for, if it was.
    meta_export: Option<Arc<Export>>,
    out: Vec<u8>,
}

impl Negotiation<'_> {
    fn reply(&mut self, opt: u32, kind: u32, data: &[u8]) {
        self.out.extend_from_slice(&option_reply(opt, kind, data));
    }

    fn error(&mut self, opt: u32, kind: u32, msg: &str) -> Step {
        self.reply(opt, kind, msg.as_bytes());
        Step::Continue
    }

    fn option(&mut self, opt: u32, data: &[u8]) -> Step {
        match opt {
            OPT_EXPORT_NAME => self.export_name(data),
            OPT_ABORT => {
                self.reply(opt, REP_ACK, &[]);
                Step::Close
            }
            OPT_LIST => self.list(data),
            OPT_INFO | OPT_GO => self.info(opt, data),
            OPT_STRUCTURED_REPLY => self.structured_reply(data),
            OPT_LIST_META_CONTEXT | OPT_SET_META_CONTEXT => self.meta_context(opt, data),
            _ => self.error(opt, REP_ERR_UNSUP, "option not supported"),
        }
    }

    fn session(&self, export: &Arc<Export>) -> Session {
        let block_status = self
            .meta_export
            .as_ref()
            .is_some_and(|m| Arc::ptr_eq(m, export));
        Session {
            export: export.clone(),
            structured: self.structured,
            block_status,
        }
    }

    /// `OPT_EXPORT_NAME`: size, flags and (unless refused) 124 zero bytes; no error path.
    fn export_name(&mut self, name: &[u8]) -> Step {
        let Some(export) = self.exports.find(name).cloned() else {
            return Step::Close;
        };
        self.out
            .extend_from_slice(&export.device.size().to_be_bytes());
        let flags = transmission_flags(&export, self.structured);
        self.out.extend_from_slice(&flags.to_be_bytes());
        if !self.no_zeroes {
            self.out.extend_from_slice(&[0u8; 124]);
        }
        Step::Transmit(self.session(&export))
    }

    fn list(&mut self, data: &[u8]) -> Step {
        if !data.is_empty() {
            return self.error(OPT_LIST, REP_ERR_INVALID, "OPT_LIST takes no data");
        }
        for e in self.exports.iter().cloned().collect::<Vec<_>>() {
            let mut d = (e.name.len() as u32).to_be_bytes().to_vec();
            d.extend_from_slice(e.name.as_bytes());
            d.extend_from_slice(e.description.as_bytes());
            self.reply(OPT_LIST, REP_SERVER, &d);
        }
        self.reply(OPT_LIST, REP_ACK, &[]);
        Step::Continue
    }

    fn structured_reply(&mut self, data: &[u8]) -> Step {
        let opt = OPT_STRUCTURED_REPLY;
        if !data.is_empty() {
            return self.error(opt, REP_ERR_INVALID, "OPT_STRUCTURED_REPLY takes no data");
        }
        if self.structured {
            return self.error(
                opt,
                REP_ERR_INVALID,
                "structured replies already negotiated",
            );
        }
        self.structured = true;
        self.reply(opt, REP_ACK, &[]);
        Step::Continue
    }

    /// `OPT_INFO` / `OPT_GO`: name, then a list of u16 information requests.
    fn info(&mut self, opt: u32, data: &[u8]) -> Step {
        let Some((name, requests)) = parse_info(data) else {
            return self.error(opt, REP_ERR_INVALID, "malformed info request");
        };
        let Some(export) = self.exports.find(name).cloned() else {
            return self.error(opt, REP_ERR_UNKNOWN, "no such export");
        };
        let mut d = INFO_EXPORT.to_be_bytes().to_vec();
        d.extend_from_slice(&export.device.size().to_be_bytes());
        d.extend_from_slice(&transmission_flags(&export, self.structured).to_be_bytes());
        self.reply(opt, REP_INFO, &d);
        // Sent unasked too: our maximum (32 MiB) is not the default (unlimited).
        let mut b = INFO_BLOCK_SIZE.to_be_bytes().to_vec();
        for v in [1, PREFERRED_BLOCK, MAX_PAYLOAD] {
            b.extend_from_slice(&v.to_be_bytes());
        }
        self.reply(opt, REP_INFO, &b);
        for (kind, text) in [
            (INFO_NAME, &export.name),
            (INFO_DESCRIPTION, &export.description),
        ] {
            if requests.contains(&kind) && !text.is_empty() {
                let mut d = kind.to_be_bytes().to_vec();
                d.extend_from_slice(text.as_bytes());
                self.reply(opt, REP_INFO, &d);
            }
        }
        self.reply(opt, REP_ACK, &[]);
        match opt {
            OPT_GO => Step::Transmit(self.session(&export)),
            _ => Step::Continue,
        }
    }

    /// `OPT_LIST_META_CONTEXT` / `OPT_SET_META_CONTEXT` for the one context we know.
    fn meta_context(&mut self, opt: u32, data: &[u8]) -> Step {
        if opt == OPT_SET_META_CONTEXT {
            // The spec: the selection is replaced even when the option fails.
            self.meta_export = None;
        }
        if !self.structured {
            return self.error(opt, REP_ERR_INVALID, "negotiate structured replies first");
        }
        let Some((name, queries)) = parse_meta(data) else {
            return self.error(opt, REP_ERR_INVALID, "malformed meta context request");
        };
        let Some(export) = self.exports.find(name).cloned() else {
            return self.error(opt, REP_ERR_UNKNOWN, "no such export");
        };
        let list = opt == OPT_LIST_META_CONTEXT;
        // Listing also takes the namespace alone as a wildcard, and no query means "all".
        let matches = |q: &[u8]| q == BASE_ALLOCATION.as_bytes() || (list && q == b"base:");
        let selected = (list && queries.is_empty()) || queries.iter().any(|q| matches(q));
        if selected {
            // Listed ids are reserved and should be zero; selected ones are ours.
            let id = if list { 0 } else { BASE_ALLOCATION_ID };
            let mut d = id.to_be_bytes().to_vec();
            d.extend_from_slice(BASE_ALLOCATION.as_bytes());
            self.reply(opt, REP_META_CONTEXT, &d);
            if !list {
                self.meta_export = Some(export);
            }
        }
        self.reply(opt, REP_ACK, &[]);
        Step::Continue
    }
}

/// Parse `OPT_INFO`/`OPT_GO` data: u32 name length, name, u16 count, count × u16. The data
/// must end exactly there.
fn parse_info(data: &[u8]) -> Option<(&[u8], Vec<u16>)> {
    let mut c = Cursor::new(data);
    let name = c.string()?;
    let n = c.u16()?;
    let requests = (0..n).map(|_| c.u16()).collect::<Option<Vec<_>>>()?;
    (c.remaining() == 0).then_some((name, requests))
}

/// Parse meta-context data: u32 name length, name, u32 count, count × (u32 length, query).
fn parse_meta(data: &[u8]) -> Option<(&[u8], Vec<&[u8]>)> {
    let mut c = Cursor::new(data);
    let name = c.string()?;
    let n = c.u32()?;
    let mut queries = Vec::new();
    // Each query takes at least 4 bytes, so a lying count fails fast instead of looping.
    for _ in 0..n {
        queries.push(c.string()?);
    }
    (c.remaining() == 0).then_some((name, queries))
}
