//! A minimal NBD client: the handshake only, to list a server's exports and describe each
//! (what `qemu-nbd --list` prints).
//!
//! It asks what QEMU's client asks, in the same order and with the same fallbacks, so one
//! server gives the same listing to both; the messages for what goes wrong are QEMU's too.
//!
//! ```text
//! server: NBDMAGIC IHAVEOPT flags(16)      client: flags(32)
//! OPT_EXTENDED_HEADERS, else OPT_STRUCTURED_REPLY    (an error only means "not supported")
//! OPT_LIST                                  -> REP_SERVER (name, description)* REP_ACK
//! for each export:
//!   OPT_INFO asking for INFO_BLOCK_SIZE     -> REP_INFO* REP_ACK
//!   OPT_LIST_META_CONTEXT, no query (= all) -> REP_META_CONTEXT* REP_ACK   (not simple mode)
//! OPT_ABORT, then hang up without waiting for its reply
//! ```
//!
//! The server is untrusted: every length it sends is checked before anything is allocated
//! for it, and what is skipped is read and dropped in small pieces.

use std::io;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use super::proto::*;

/// Names and descriptions are strings, which the spec caps at 4 KiB.
const MAX_STRING: u32 = 4096;
/// The most an option reply may carry (QEMU's limit too); larger is a broken server.
const MAX_REPLY: u32 = 32 << 20;

/// What the handshake settled on, from the richest to the poorest.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Mode {
    /// An oldstyle server: one unnamed export, no options.
    Oldstyle,
    /// Fixed newstyle, simple replies only.
    Simple,
    /// Structured replies.
    Structured,
    /// Extended (64-bit) headers.
    Extended,
}

/// One export as the server describes it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ExportInfo {
    /// The export's name.
    pub name: String,
    /// Its description, when the server gave a non-empty one.
    pub description: Option<String>,
    /// Size in bytes (0 when `NBD_OPT_INFO` was not supported).
    pub size: u64,
    /// Transmission flags; 0 when `NBD_OPT_INFO` was not supported.
    pub flags: u16,
    /// Minimum, preferred and maximum block sizes, when the server sent them.
    pub block_sizes: Option<(u32, u32, u32)>,
    /// The metadata contexts the export offers, in the server's order.
    pub contexts: Vec<String>,
}

/// A server's exports, from [`list_exports`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportList {
    /// What the handshake settled on (`Extended`: 64-bit transactions).
    pub mode: Mode,
    /// The exports in the server's order.
    pub exports: Vec<ExportInfo>,
}

/// Why the exports could not be listed. The message is QEMU's for the same failure.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ClientError {
    /// The connection failed or ended early while reading `what`.
    // The cause is in the message (QEMU's one line), not a `source` a caller would print
    // again after it.
    #[error("Failed to read {what}: {}", io_text(cause))]
    Read {
        /// The field being read.
        what: &'static str,
        /// The cause (an early end of the stream is `UnexpectedEof`).
        cause: io::Error,
    },
    /// Sending an option failed.
    #[error("Failed to send option request: {}", io_text(cause))]
    Write {
        /// The cause.
        cause: io::Error,
    },
    /// The server broke the protocol or refused what every listing needs.
    #[error("{0}")]
    Protocol(String),
}

/// An IO error as QEMU words it: the C library's text, without Rust's "(os error N)".
fn io_text(e: &io::Error) -> String {
    if e.kind() == io::ErrorKind::UnexpectedEof {
        return "Unexpected end-of-file before all data were read".into();
    }
    let text = e.to_string();
    match text.find(" (os error") {
        Some(i) => text[..i].to_string(),
        None => text,
    }
}

fn protocol(msg: impl Into<String>) -> ClientError {
    ClientError::Protocol(msg.into())
}

/// Shake hands with the server on `stream`, list its exports and describe each, then end
/// the negotiation (`NBD_OPT_ABORT`) without entering transmission.
///
/// ```no_run
/// # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
/// let mut s = tokio::net::UnixStream::connect("/tmp/disk.sock").await?;
/// for e in qcow2_nbd::client::list_exports(&mut s).await?.exports {
///     println!("{}: {} bytes", e.name, e.size);
/// }
/// # Ok(()) }
/// ```
pub async fn list_exports<S>(stream: &mut S) -> Result<ExportList, ClientError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let mut c = Conn { s: stream };
    let Some(mode) = c.start().await? else {
        let size = c.u64("export length").await?;
        let flags = c.u32("export flags").await?;
        if flags > 0xffff {
            return Err(protocol(format!("Unexpected export flags {flags:x}")));
        }
        let export = ExportInfo {
            size,
            flags: flags as u16,
            ..ExportInfo::default()
        };
        return Ok(ExportList {
            mode: Mode::Oldstyle,
            exports: vec![export],
        });
    };
    let mut exports = c.list().await?;
    for e in &mut exports {
        if !c.info(e).await? {
            // Without OPT_INFO, meta contexts will hardly work either (QEMU stops too).
            break;
        }
        if mode >= Mode::Structured {
            e.contexts = c.meta_contexts(&e.name).await?;
        }
    }
    // A courtesy: the server need not wait for our hang-up. Its reply is not awaited.
    let _ = c.send(OPT_ABORT, &[]).await;
    Ok(ExportList { mode, exports })
}

/// The names `qemu-nbd --list` gives the transmission flags set in `flags`, in bit order.
pub fn flag_names(flags: u16) -> Vec<&'static str> {
    const NAMES: [(u16, &str); 12] = [
        (FLAG_READ_ONLY, "readonly"),
        (FLAG_SEND_FLUSH, "flush"),
        (FLAG_SEND_FUA, "fua"),
        (FLAG_ROTATIONAL, "rotational"),
        (FLAG_SEND_TRIM, "trim"),
        (FLAG_SEND_WRITE_ZEROES, "zeroes"),
        (FLAG_SEND_DF, "df"),
        (FLAG_CAN_MULTI_CONN, "multi"),
        (FLAG_SEND_RESIZE, "resize"),
        (FLAG_SEND_CACHE, "cache"),
        (FLAG_SEND_FAST_ZERO, "fast-zero"),
        (FLAG_BLOCK_STAT_PAYLOAD, "block-status-payload"),
    ];
    NAMES
        .iter()
        .filter(|(bit, _)| flags & bit != 0)
        .map(|(_, name)| *name)
        .collect()
}

/// An option reply header (the payload, `len` bytes, is still on the wire).
struct Reply {
    option: u32,
    kind: u32,
    len: u32,
}

impl Reply {
    fn is_error(&self) -> bool {
        self.kind & (1 << 31) != 0
    }
}

/// The client side of one connection during the handshake.
struct Conn<'a, S> {
    s: &'a mut S,
}

impl<S: AsyncRead + AsyncWrite + Unpin> Conn<'_, S> {
    /// The greeting and the reply mode; `None` for an oldstyle server (size and flags
    /// follow at once).
    async fn start(&mut self) -> Result<Option<Mode>, ClientError> {
        let magic = self.u64("initial magic").await?;
        if magic != INIT_MAGIC {
            return Err(protocol(format!("Bad initial magic received: {magic:#x}")));
        }
        match self.u64("server magic").await? {
            OPT_MAGIC => {}
            OLDSTYLE_MAGIC => return Ok(None),
            m => return Err(protocol(format!("Bad server magic received: {m:#x}"))),
        }
        let server = self.u16("server flags").await?;
        let mut ours = 0;
        if server & FLAG_FIXED_NEWSTYLE != 0 {
            ours |= FLAG_C_FIXED_NEWSTYLE;
        }
        if server & FLAG_NO_ZEROES != 0 {
            ours |= FLAG_C_NO_ZEROES;
        }
        self.write(&ours.to_be_bytes()).await?;
        if server & FLAG_FIXED_NEWSTYLE == 0 {
            // Only OPT_EXPORT_NAME exists there: there is no list to ask for.
            return Err(protocol("Server does not support export lists"));
        }
        if self.simple_option(OPT_EXTENDED_HEADERS).await? {
            return Ok(Some(Mode::Extended));
        }
        if self.simple_option(OPT_STRUCTURED_REPLY).await? {
            return Ok(Some(Mode::Structured));
        }
        Ok(Some(Mode::Simple))
    }

    /// Ask for an option without data that the server acknowledges; any error reply means
    /// "not supported".
    async fn simple_option(&mut self, opt: u32) -> Result<bool, ClientError> {
        self.send(opt, &[]).await?;
        let r = self.reply(opt).await?;
        if r.is_error() {
            self.skip(r.len, "option error message").await?;
            return Ok(false);
        }
        if r.kind != REP_ACK {
            return Err(protocol(format!(
                "Server answered option {opt} ({}) with unexpected reply {} ({})",
                opt_name(opt),
                r.kind,
                rep_name(r.kind)
            )));
        }
        if r.len != 0 {
            return Err(protocol(format!(
                "Option {opt} ('{}') response length is {} (it should be zero)",
                opt_name(opt),
                r.len
            )));
        }
        Ok(true)
    }

    /// `OPT_LIST`: every export's name and description.
    async fn list(&mut self) -> Result<Vec<ExportInfo>, ClientError> {
        self.send(OPT_LIST, &[]).await?;
        let mut exports = Vec::new();
        loop {
            let r = self.reply(OPT_LIST).await?;
            if !self.check_error(&r, true).await? {
                return Ok(exports);
            }
            match r.kind {
                REP_ACK if r.len == 0 => return Ok(exports),
                REP_ACK => return Err(protocol("length too long for option end")),
                REP_SERVER => exports.push(self.listed_export(r.len).await?),
                k => return Err(unexpected(k, REP_SERVER)),
            }
        }
    }

    /// The payload of one `REP_SERVER`: name length, name, description (the rest).
    async fn listed_export(&mut self, len: u32) -> Result<ExportInfo, ClientError> {
        if !(4..=MAX_REPLY).contains(&len) {
            return Err(protocol(format!("incorrect option length {len}")));
        }
        let name_len = self.u32("option name length").await?;
        let rest = len - 4;
        if rest < name_len || name_len > MAX_STRING {
            return Err(protocol("incorrect name length in server's list response"));
        }
        let name = self.string(name_len, "export name").await?;
        let desc_len = rest - name_len;
        if desc_len > MAX_STRING {
            return Err(protocol(
                "incorrect description length in server's list response",
            ));
        }
        let desc = self.string(desc_len, "export description").await?;
        Ok(ExportInfo {
            name,
            description: (!desc.is_empty()).then_some(desc),
            ..ExportInfo::default()
        })
    }

    /// `OPT_INFO` for `e`, asking for block sizes; `false` if the server does not know it.
    async fn info(&mut self, e: &mut ExportInfo) -> Result<bool, ClientError> {
        let mut data = (e.name.len() as u32).to_be_bytes().to_vec();
        data.extend_from_slice(e.name.as_bytes());
        data.extend_from_slice(&1u16.to_be_bytes());
        data.extend_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
        self.send(OPT_INFO, &data).await?;
        loop {
            let r = self.reply(OPT_INFO).await?;
            if !self.check_error(&r, true).await? {
                return Ok(false);
            }
            match r.kind {
                REP_ACK if r.len != 0 => return Err(protocol("server sent invalid NBD_REP_ACK")),
                REP_ACK if e.flags == 0 => {
                    return Err(protocol("broken server omitted NBD_INFO_EXPORT"));
                }
                REP_ACK => return Ok(true),
                REP_INFO => self.info_item(e, r.len).await?,
                k => return Err(unexpected(k, REP_INFO)),
            }
        }
    }

    /// One `REP_INFO`: export size and flags or block sizes; anything else is skipped.
    async fn info_item(&mut self, e: &mut ExportInfo, len: u32) -> Result<(), ClientError> {
        if len < 2 {
            return Err(protocol(format!("NBD_REP_INFO length {len} is too short")));
        }
        let kind = self.u16("info type").await?;
        let len = len - 2;
        let wrong = || {
            protocol(format!(
                "remaining export info len {len} is unexpected size"
            ))
        };
        match kind {
            INFO_EXPORT if len != 10 => Err(wrong()),
            INFO_EXPORT => {
                e.size = self.u64("info size").await?;
                e.flags = self.u16("info flags").await?;
                Ok(())
            }
            INFO_BLOCK_SIZE if len != 12 => Err(wrong()),
            INFO_BLOCK_SIZE => {
                let min = self.u32("info minimum block size").await?;
                let opt = self.u32("info preferred block size").await?;
                let max = self.u32("info maximum block size").await?;
                check_block_sizes(min, opt, max)?;
                e.block_sizes = Some((min, opt, max));
                Ok(())
            }
            _ => self.skip(len, "info payload").await,
        }
    }

    /// `OPT_LIST_META_CONTEXT` without a query: every context of `export`. A server that
    /// answers with contexts but none in the `qemu:` namespace is asked again for `qemu:`
    /// (QEMU 3.0 forgot those on an empty query; QEMU's client asks the same).
    async fn meta_contexts(&mut self, export: &str) -> Result<Vec<String>, ClientError> {
        self.send(OPT_LIST_META_CONTEXT, &meta_query(export, None))
            .await?;
        let (mut contexts, mut asked_qemu) = (Vec::new(), false);
        loop {
            match self.meta_context().await? {
                Some(c) => {
                    asked_qemu |= c.starts_with("qemu:");
                    contexts.push(c);
                }
                None if !contexts.is_empty() && !asked_qemu => {
                    asked_qemu = true;
                    let q = meta_query(export, Some("qemu:"));
                    self.send(OPT_LIST_META_CONTEXT, &q).await?;
                }
                None => return Ok(contexts),
            }
        }
    }

    /// One reply to `OPT_LIST_META_CONTEXT`: a context's name, or `None` at the end (an
    /// error reply ends the list too).
    async fn meta_context(&mut self) -> Result<Option<String>, ClientError> {
        let r = self.reply(OPT_LIST_META_CONTEXT).await?;
        if !self.check_error(&r, false).await? {
            return Ok(None);
        }
        match r.kind {
            REP_ACK if r.len == 0 => return Ok(None),
            REP_ACK => return Err(protocol("Unexpected length to ACK response")),
            REP_META_CONTEXT => {}
            k => return Err(unexpected(k, REP_META_CONTEXT)),
        }
        if r.len <= 4 || r.len > 4 + MAX_STRING {
            return Err(protocol(format!(
                "Failed to negotiate meta context, server answered with unexpected length {}",
                r.len
            )));
        }
        self.u32("context id").await?;
        Ok(Some(self.string(r.len - 4, "context name").await?))
    }

    /// For an error reply: skip its message and return `Ok(false)` if it only means "not
    /// supported" (`strict`: only `REP_ERR_UNSUP` does), else fail with QEMU's message.
    /// `Ok(true)` for a reply that is not an error.
    async fn check_error(&mut self, r: &Reply, strict: bool) -> Result<bool, ClientError> {
        if !r.is_error() {
            return Ok(true);
        }
        if r.len > MAX_REPLY {
            return Err(protocol(format!(
                "server error {} ({}) message is too long",
                r.kind,
                rep_name(r.kind)
            )));
        }
        let msg = self.skip_message(r.len).await?;
        if r.kind == REP_ERR_UNSUP || !strict {
            return Ok(false);
        }
        Err(protocol(refusal(r.kind, r.option, &msg)))
    }

    /// Read an error message: the first 4 KiB kept (a string's limit), the rest dropped.
    async fn skip_message(&mut self, len: u32) -> Result<String, ClientError> {
        let kept = len.min(MAX_STRING);
        let msg = self.string(kept, "option error message").await?;
        self.skip(len - kept, "option error message").await?;
        Ok(msg)
    }

    /// An option reply header for `opt`.
    async fn reply(&mut self, opt: u32) -> Result<Reply, ClientError> {
        let magic = self.u64("option reply").await?;
        let option = self.u32("option reply").await?;
        let kind = self.u32("option reply").await?;
        let len = self.u32("option reply").await?;
        if magic != REP_MAGIC {
            return Err(protocol("Unexpected option reply magic"));
        }
        if option != opt {
            return Err(protocol(format!(
                "Unexpected option type {option} ({}), expected {opt} ({})",
                opt_name(option),
                opt_name(opt)
            )));
        }
        Ok(Reply { option, kind, len })
    }

    async fn send(&mut self, opt: u32, data: &[u8]) -> Result<(), ClientError> {
        let mut b = OPT_MAGIC.to_be_bytes().to_vec();
        b.extend_from_slice(&opt.to_be_bytes());
        b.extend_from_slice(&(data.len() as u32).to_be_bytes());
        b.extend_from_slice(data);
        self.write(&b).await
    }

    async fn write(&mut self, b: &[u8]) -> Result<(), ClientError> {
        let r = async {
            self.s.write_all(b).await?;
            self.s.flush().await
        };
        r.await.map_err(|cause| ClientError::Write { cause })
    }

    async fn bytes<const N: usize>(&mut self, what: &'static str) -> Result<[u8; N], ClientError> {
        let mut b = [0u8; N];
        self.s
            .read_exact(&mut b)
            .await
            .map_err(|cause| ClientError::Read { what, cause })?;
        Ok(b)
    }

    async fn u16(&mut self, what: &'static str) -> Result<u16, ClientError> {
        Ok(u16::from_be_bytes(self.bytes(what).await?))
    }

    async fn u32(&mut self, what: &'static str) -> Result<u32, ClientError> {
        Ok(u32::from_be_bytes(self.bytes(what).await?))
    }

    async fn u64(&mut self, what: &'static str) -> Result<u64, ClientError> {
        Ok(u64::from_be_bytes(self.bytes(what).await?))
    }

    /// `len` bytes (already checked against a string's limit) as text.
    async fn string(&mut self, len: u32, what: &'static str) -> Result<String, ClientError> {
        let mut b = vec![0u8; len as usize];
        self.s
            .read_exact(&mut b)
            .await
            .map_err(|cause| ClientError::Read { what, cause })?;
        Ok(String::from_utf8_lossy(&b).into_owned())
    }

    /// Read and drop `len` bytes, a little at a time.
    async fn skip(&mut self, len: u32, what: &'static str) -> Result<(), ClientError> {
        let mut sink = tokio::io::sink();
        let mut part = (&mut *self.s).take(len.into());
        let copied = tokio::io::copy(&mut part, &mut sink)
            .await
            .map_err(|cause| ClientError::Read { what, cause })?;
        match copied == u64::from(len) {
            true => Ok(()),
            false => Err(ClientError::Read {
                what,
                cause: io::ErrorKind::UnexpectedEof.into(),
            }),
        }
    }
}

/// The data of `OPT_LIST_META_CONTEXT`: export name, then zero or one query.
fn meta_query(export: &str, query: Option<&str>) -> Vec<u8> {
    let mut d = (export.len() as u32).to_be_bytes().to_vec();
    d.extend_from_slice(export.as_bytes());
    d.extend_from_slice(&u32::from(query.is_some()).to_be_bytes());
    if let Some(q) = query {
        d.extend_from_slice(&(q.len() as u32).to_be_bytes());
        d.extend_from_slice(q.as_bytes());
    }
    d
}

/// Block sizes must be powers of two with min <= preferred and min <= max (the spec).
fn check_block_sizes(min: u32, opt: u32, max: u32) -> Result<(), ClientError> {
    if !min.is_power_of_two() {
        return Err(protocol(format!(
            "server minimum block size {min} is not a power of two"
        )));
    }
    if !opt.is_power_of_two() || opt < min {
        return Err(protocol(format!(
            "server preferred block size {opt} is not valid"
        )));
    }
    if max < min {
        return Err(protocol(format!(
            "server maximum block size {max} is not valid"
        )));
    }
    Ok(())
}

fn unexpected(kind: u32, want: u32) -> ClientError {
    protocol(format!(
        "Unexpected reply type {kind} ({}), expected {want} ({})",
        rep_name(kind),
        rep_name(want)
    ))
}

/// QEMU's message for an error reply to option `opt`, which must succeed; the hints QEMU
/// prints after it are on lines of their own.
fn refusal(kind: u32, opt: u32, server_msg: &str) -> String {
    let what = match kind {
        REP_ERR_UNKNOWN => return "Requested export not available".into(),
        REP_ERR_POLICY => "Denied by server for",
        REP_ERR_INVALID => "Invalid parameters for",
        REP_ERR_PLATFORM => "Server lacks support for",
        REP_ERR_TLS_REQD => "TLS negotiation required before",
        REP_ERR_SHUTDOWN => "Server shutting down before",
        REP_ERR_BLOCK_SIZE_REQD => "Server requires INFO_BLOCK_SIZE for",
        _ => "Unknown error code when asking for",
    };
    let mut m = format!("{what} option {opt} ({})", opt_name(opt));
    if kind == REP_ERR_TLS_REQD {
        m.push_str("\nDid you forget a valid tls-creds?");
    }
    if !server_msg.is_empty() {
        m.push_str(&format!("\nserver reported: {server_msg}"));
    }
    m
}

/// QEMU's name for an option, for messages.
fn opt_name(opt: u32) -> &'static str {
    match opt {
        OPT_EXPORT_NAME => "export name",
        OPT_ABORT => "abort",
        OPT_LIST => "list",
        OPT_STARTTLS => "starttls",
        OPT_INFO => "info",
        OPT_GO => "go",
        OPT_STRUCTURED_REPLY => "structured reply",
        OPT_LIST_META_CONTEXT => "list meta context",
        OPT_SET_META_CONTEXT => "set meta context",
        OPT_EXTENDED_HEADERS => "extended headers",
        _ => "<unknown>",
    }
}

/// QEMU's name for an option reply type, for messages.
fn rep_name(kind: u32) -> &'static str {
    match kind {
        REP_ACK => "ack",
        REP_SERVER => "server",
        REP_INFO => "info",
        REP_META_CONTEXT => "meta context",
        REP_ERR_UNSUP => "unsupported",
        REP_ERR_POLICY => "denied by policy",
        REP_ERR_INVALID => "invalid",
        REP_ERR_PLATFORM => "platform lacks support",
        REP_ERR_TLS_REQD => "TLS required",
        REP_ERR_UNKNOWN => "export unknown",
        REP_ERR_SHUTDOWN => "server shutting down",
        REP_ERR_BLOCK_SIZE_REQD => "block size required",
        _ => "<unknown>",
    }
}
