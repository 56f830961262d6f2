//! The fixed-newstyle handshake: greet, read the client's flags, then answer options until
//! the client picks an export (`OPT_EXPORT_NAME` or a successful `OPT_GO`) or leaves.
//!
//! ```text
//! S: NBDMAGIC IHAVEOPT flags(FIXED_NEWSTYLE|NO_ZEROES)     C: client flags
//! C: IHAVEOPT opt len data   S: REP_MAGIC opt reply len data   (repeated)
//! ```
//!
//! With TLS configured (`NBD_OPT_STARTTLS`, qemu-nbd's `--tls-creds`) the client must
//! upgrade first: before TLS every option but `STARTTLS` and `ABORT` is refused with
//! `NBD_REP_ERR_TLS_REQD`, and `OPT_EXPORT_NAME` (which cannot be refused) ends the connection.
//! After the upgrade the negotiation starts afresh over the encrypted stream. Without TLS
//! configured `STARTTLS` is refused with `NBD_REP_ERR_POLICY`, as qemu-nbd does.
//!
//! Every option's data is read whole (at most [`MAX_OPTION_LEN`] bytes, a larger one ends the
//! connection as abuse) before it is parsed, so a malformed option can be answered with
//! `NBD_REP_ERR_INVALID` and the stream stays in sync.

use std::io;
use std::sync::Arc;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};

use super::connection::Stream;
use super::export::{Export, Exports};
use super::frame::{Cursor, MAX_OPTION_LEN, OPTION_HEADER_LEN, OptionHeader, option_reply};
use super::meta::{self, Kind};
use super::proto::*;
use super::tls::TlsConfig;

/// What the handshake agreed on.
#[derive(Debug, Clone)]
pub struct Session {
    /// The chosen export.
    pub export: Arc<Export>,
    /// Structured replies were negotiated.
    pub structured: bool,
    /// The metadata contexts selected for this export, with their ids.
    pub contexts: Vec<(u32, Kind)>,
}

/// What the server decides for every connection's handshake.
#[derive(Debug, Clone, Default)]
pub struct Setup {
    /// Require TLS before anything else.
    pub tls: Option<TlsConfig>,
    /// Advertise `NBD_FLAG_CAN_MULTI_CONN`.
    pub multi_conn: bool,
}

/// The transmission flags of `export` for a session with or without structured replies.
pub fn transmission_flags(export: &Export, structured: bool, setup: &Setup) -> u16 {
    let mut f = FLAG_HAS_FLAGS | FLAG_SEND_FLUSH | FLAG_SEND_FUA | FLAG_SEND_CACHE;
    // Multi-conn is true of our exports: one Image (one cache) serves every connection and
    // its flush covers all of them, so flush/FUA on one connection cover writes completed on
    // any. But it invites a client to open several connections, which a server taking one
    // client at a time would leave waiting in the backlog: the server says whether to send it
    // (qemu-nbd also sends it only when more than one client is allowed).
    if setup.multi_conn {
        f |= FLAG_CAN_MULTI_CONN;
    }
    if export.device.is_writable() {
        f |= FLAG_SEND_TRIM | FLAG_SEND_WRITE_ZEROES | FLAG_SEND_FAST_ZERO;
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

/// Run the handshake on `stream`, upgrading it to TLS when the client asks and `tls` is
/// configured. Returns the stream to transmit on (the TLS one after an upgrade) and the
/// session; `None`: the client aborted or asked for an unknown export with
/// `OPT_EXPORT_NAME` (which cannot be answered with an error): close the connection.
pub async fn negotiate(
    mut stream: Box<dyn Stream>,
    exports: &Exports,
    setup: &Setup,
) -> io::Result<(Box<dyn Stream>, Option<Session>)> {
    let mut greeting = Vec::with_capacity(18);
    greeting.extend_from_slice(&INIT_MAGIC.to_be_bytes());
    greeting.extend_from_slice(&OPT_MAGIC.to_be_bytes());
    greeting.extend_from_slice(&(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes());
    stream.write_all(&greeting).await?;
    stream.flush().await?;
    let client = stream.read_u32().await?;
    if client & !(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES) != 0 {
        return Err(protocol("unknown client flags"));
    }
    let mut n = Negotiation::new(exports, setup, client & FLAG_C_NO_ZEROES != 0);
    loop {
        let (opt, data) = read_option(&mut stream).await?;
        let done = n.option(opt, &data);
        stream.write_all(&n.out).await?;
        stream.flush().await?;
        n.out.clear();
        match done {
            Step::Continue => {}
            Step::Close => return Ok((stream, None)),
            Step::Transmit(session) => return Ok((stream, Some(session))),
            Step::StartTls => {
                // `Step::StartTls` only comes with TLS configured.
                let Some(tls) = &setup.tls else {
                    return Err(protocol("STARTTLS without TLS configured"));
                };
                stream = tls.upgrade(stream).await?;
                // Nothing said in the clear carries over (the spec's STARTTLS rules).
                n = Negotiation::new(exports, setup, n.no_zeroes);
                n.tls_required = false;
                n.tls_active = true;
            }
        }
    }
}

/// Read one option header and its data.
async fn read_option<R: AsyncRead + Unpin + ?Sized>(rd: &mut R) -> io::Result<(u32, Vec<u8>)> {
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

/// Metadata contexts selected, with their ids.
type Selected = Vec<(u32, Kind)>;

/// What happens after an option.
enum Step {
    Continue,
    Close,
    Transmit(Session),
    /// `STARTTLS` was acknowledged: run the TLS handshake, then negotiate afresh.
    StartTls,
}

/// Option-haggling state; replies are collected in `out` and sent after each option.
struct Negotiation<'a> {
    exports: &'a Exports,
    setup: &'a Setup,
    no_zeroes: bool,
    structured: bool,
    /// TLS is configured but not yet in place: every option but STARTTLS is refused.
    tls_required: bool,
    /// The stream is already encrypted.
    tls_active: bool,
    /// The export the last `SET_META_CONTEXT` was for, and what it selected.
    meta: Option<(Arc<Export>, Selected)>,
    out: Vec<u8>,
}

impl<'a> Negotiation<'a> {
    fn new(exports: &'a Exports, setup: &'a Setup, no_zeroes: bool) -> Self {
        Negotiation {
            exports,
            setup,
            no_zeroes,
            structured: false,
            tls_required: setup.tls.is_some(),
            tls_active: false,
            meta: None,
            out: Vec::new(),
        }
    }

    fn reply(&mut self, opt: u32, kind: u32, data: &[u8]) {
        self.out.extend_from_slice(&option_reply(opt, kind, data));
    }

    fn error(&mut self, opt: u32, kind: u32, msg: &str) -> Step {
        self.reply(opt, kind, msg.as_bytes());
        Step::Continue
    }

    fn option(&mut self, opt: u32, data: &[u8]) -> Step {
        if self.tls_required {
            return self.before_tls(opt, data);
        }
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
            OPT_STARTTLS if self.tls_active => {
                self.error(opt, REP_ERR_INVALID, "TLS is already in use")
            }
            OPT_STARTTLS => self.error(opt, REP_ERR_POLICY, "TLS is not configured"),
            _ => self.error(opt, REP_ERR_UNSUP, "option not supported"),
        }
    }

    /// An option while TLS is configured but not in place yet.
    fn before_tls(&mut self, opt: u32, data: &[u8]) -> Step {
        match opt {
            OPT_STARTTLS if !data.is_empty() => {
                self.error(opt, REP_ERR_INVALID, "OPT_STARTTLS takes no data")
            }
            OPT_STARTTLS => {
                self.reply(opt, REP_ACK, &[]);
                Step::StartTls
            }
            OPT_ABORT => {
                self.reply(opt, REP_ACK, &[]);
                Step::Close
            }
            // It cannot be answered with an error: hang up, as qemu-nbd does.
            OPT_EXPORT_NAME => Step::Close,
            _ => self.error(
                opt,
                REP_ERR_TLS_REQD,
                "TLS is required: use OPT_STARTTLS first",
            ),
        }
    }

    fn session(&self, export: &Arc<Export>) -> Session {
        let contexts = match &self.meta {
            Some((e, selected)) if Arc::ptr_eq(e, export) => selected.clone(),
            _ => Vec::new(),
        };
        Session {
            export: export.clone(),
            structured: self.structured,
            contexts,
        }
    }

    /// `OPT_EXPORT_NAME`: size, flags and (unless refused) 124 zero bytes; no error path.
    fn export_name(&mut self, name: &[u8]) -> Step {
        let Some(export) = self.exports.find(name).cloned() else {
            return Step::Close;
        };
        self.out
            .extend_from_slice(&export.device.size().to_be_bytes());
        let flags = transmission_flags(&export, self.structured, self.setup);
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
        d.extend_from_slice(
            &transmission_flags(&export, self.structured, self.setup).to_be_bytes(),
        );
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

    /// `OPT_LIST_META_CONTEXT` / `OPT_SET_META_CONTEXT` (see [`meta`] for the matching).
    fn meta_context(&mut self, opt: u32, data: &[u8]) -> Step {
        if opt == OPT_SET_META_CONTEXT {
            // The spec: the selection is replaced even when the option fails.
            self.meta = None;
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
        let mut selected = Vec::new();
        for (id, kind, cname) in meta::offered(&export) {
            let hit = (list && queries.is_empty())
                || queries.iter().any(|q| meta::matches(q, &cname, list));
            if !hit {
                continue;
            }
            // Listed ids are reserved and should be zero; selected ones are ours.
            let mut d = if list { 0 } else { id }.to_be_bytes().to_vec();
            d.extend_from_slice(cname.as_bytes());
            self.reply(opt, REP_META_CONTEXT, &d);
            selected.push((id, kind));
        }
        if !list {
            self.meta = Some((export, selected));
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
