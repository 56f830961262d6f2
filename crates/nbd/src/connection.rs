//! One client connection: the handshake, then the transmission loop.
//!
//! ```text
//!            ┌──────────── reader (this task) ────────────┐
//!  socket ──▶│ header ─▶ validate ─▶ payload ─▶ spawn ────┼──▶ request task ─┐
//!            └────────────────────────────────────────────┘    (any number)  │
//!  socket ◀── Replies (mutex: one whole reply at a time) ◀───────────────────┘
//! ```
//!
//! Requests run concurrently and reply in completion order (the spec allows it). Memory is
//! bounded per connection: a request takes its size out of a byte budget (64 MiB) before
//! its payload is read or its read buffer allocated, and gives it back after its reply, so
//! a client that pipelines more than the budget simply stops being read.

use std::io;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::sync::{Mutex, Notify, Semaphore, watch};
use tokio::task::JoinSet;

use super::cmd::{self, Ctx};
use super::export::Exports;
use super::frame::{Limits, REQUEST_LEN, Reply, Request};
use super::handshake::{Session, Setup, negotiate};
use super::proto::*;

/// Bytes of request payload and read data one connection may have in flight.
const BUDGET: u32 = 2 * MAX_PAYLOAD;
/// What a request without data counts against the budget (bounds the number of tasks).
const MIN_COST: u32 = 64 << 10;
/// A client that does not take a reply within this long is treated as gone.
const REPLY_TIMEOUT: Duration = Duration::from_secs(60);

type BoxWrite = Box<dyn AsyncWrite + Send + Unpin>;

fn protocol(msg: impl std::fmt::Display) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg.to_string())
}

/// How long a client may keep its connection slot without making progress.
#[derive(Debug, Clone)]
pub struct Patience {
    /// The whole handshake must finish within this (qemu-nbd's `--handshake-limit`).
    pub handshake: Duration,
    /// A client with nothing in flight that sends no request for this long is dropped, but
    /// only while `slots` has none left: an idle client on a server with room costs nothing,
    /// while silent clients on a full one would lock everybody else out.
    pub idle: Duration,
    /// The server's connection slots (its connection limit).
    pub slots: Arc<Semaphore>,
}

/// A byte stream to one client.
pub(crate) trait Stream: AsyncRead + AsyncWrite + Send + Unpin {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin> Stream for T {}

/// Serve one client until it disconnects, misbehaves, idles while its slot is wanted (see
/// [`Patience`]), or `shutdown` turns true. No TLS: `NBD_OPT_STARTTLS` is refused.
pub async fn serve<S>(
    stream: S,
    exports: Exports,
    shutdown: watch::Receiver<bool>,
    patience: Patience,
) -> io::Result<()>
where
    S: AsyncRead + AsyncWrite + Send + Unpin + 'static,
{
    let setup = Setup {
        tls: None,
        multi_conn: true,
    };
    serve_stream(Box::new(stream), exports, shutdown, patience, setup).await
}

/// [`serve`], with TLS required before anything else (`NBD_OPT_STARTTLS`, see
/// [`TlsConfig`](crate::TlsConfig)).
#[cfg(feature = "tls")]
pub async fn serve_tls<S>(
    stream: S,
    exports: Exports,
    shutdown: watch::Receiver<bool>,
    patience: Patience,
    tls: crate::TlsConfig,
) -> io::Result<()>
where
    S: AsyncRead + AsyncWrite + Send + Unpin + 'static,
{
    let setup = Setup {
        tls: Some(tls),
        multi_conn: true,
    };
    serve_stream(Box::new(stream), exports, shutdown, patience, setup).await
}

/// The handshake (upgrading to TLS if asked), then the transmission phase.
pub(crate) async fn serve_stream(
    stream: Box<dyn Stream>,
    exports: Exports,
    mut shutdown: watch::Receiver<bool>,
    patience: Patience,
    setup: Setup,
) -> io::Result<()> {
    let handshake = tokio::time::timeout(patience.handshake, negotiate(stream, &exports, &setup));
    let (stream, session) = tokio::select! {
        r = handshake => r.map_err(|_| protocol("handshake timed out"))??,
        _ = shutdown.wait_for(|&s| s) => return Ok(()),
    };
    let Some(session) = session else {
        return Ok(());
    };
    let (rd, wr) = tokio::io::split(stream);
    let mut rd = BufReader::with_capacity(64 << 10, rd);
    let mut t = Transmission::new(session, Box::new(wr), patience);
    let r = t.requests(&mut rd, &mut shutdown).await;
    // Whether the client said NBD_CMD_DISC, hung up, or we are shutting down: requests
    // already started finish (their writes land) before the connection closes.
    cmd::disconnect::run(&mut t.inflight).await;
    r
}

/// The transmission phase of one connection.
struct Transmission {
    ctx: Ctx,
    limits: Limits,
    replies: Arc<Replies>,
    budget: Arc<Semaphore>,
    inflight: JoinSet<()>,
    patience: Patience,
}

impl Transmission {
    fn new(s: Session, writer: BoxWrite, patience: Patience) -> Self {
        let device = s.export.device.clone();
        let limits = Limits {
            size: device.size(),
            writable: device.is_writable(),
            structured: s.structured,
            block_status: !s.contexts.is_empty(),
        };
        Transmission {
            ctx: Ctx {
                device,
                contexts: s.contexts.into(),
            },
            limits,
            replies: Arc::new(Replies {
                writer: Mutex::new(Some(writer)),
                structured: s.structured,
                broken: Notify::new(),
            }),
            budget: Arc::new(Semaphore::new(BUDGET as usize)),
            inflight: JoinSet::new(),
            patience,
        }
    }

    /// Completes once this client counts as idle while its slot is wanted: nothing in flight
    /// (the whole budget is back), no new request for `patience.idle`, and every slot taken.
    async fn idle_and_wanted(&self) {
        loop {
            tokio::time::sleep(self.patience.idle).await;
            let quiet = self.budget.available_permits() == BUDGET as usize;
            if quiet && self.patience.slots.available_permits() == 0 {
                return;
            }
        }
    }

    /// Read requests until the client leaves (`Ok`) or breaks the protocol (`Err`).
    async fn requests<R>(
        &mut self,
        rd: &mut R,
        shutdown: &mut watch::Receiver<bool>,
    ) -> io::Result<()>
    where
        R: AsyncRead + Unpin,
    {
        loop {
            while self.inflight.try_join_next().is_some() {}
            let mut h = [0u8; REQUEST_LEN];
            tokio::select! {
                biased;
                _ = shutdown.wait_for(|&s| s) => return Ok(()),
                _ = self.replies.broken.notified() => return Err(protocol("reply stream broken")),
                _ = self.idle_and_wanted() => return Err(protocol("idle while the server is full")),
                r = rd.read_exact(&mut h) => match r {
                    Ok(_) => {}
                    Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(()),
                    Err(e) => return Err(e),
                },
            }
            // A bad magic means we lost the framing: nothing after it can be trusted.
            let req = Request::parse(&h).map_err(protocol)?;
            if req.kind == CMD_DISC {
                return Ok(());
            }
            // A client that stalls mid-payload (or a full budget) must not hold up shutdown.
            tokio::select! {
                biased;
                _ = shutdown.wait_for(|&s| s) => return Ok(()),
                r = self.request(rd, req) => r?,
            }
        }
    }

    /// Take in one request: consume its payload, then reject it or start it.
    async fn request<R: AsyncRead + Unpin>(&mut self, rd: &mut R, req: Request) -> io::Result<()> {
        let verdict = req.validate(&self.limits);
        if req.payload_len() > MAX_PAYLOAD {
            // Too big to buffer: skip it in small pieces so the stream stays in sync.
            drain(rd, req.payload_len()).await?;
        }
        let cost = match req.kind {
            CMD_READ | CMD_WRITE => req.len.clamp(MIN_COST, MAX_PAYLOAD),
            _ => MIN_COST,
        };
        let permit = self.budget.clone().acquire_many_owned(cost).await;
        let permit = permit.map_err(|_| protocol("budget closed"))?;
        let mut payload = Vec::new();
        if req.payload_len() <= MAX_PAYLOAD {
            payload.resize(req.payload_len() as usize, 0);
            rd.read_exact(&mut payload).await?;
        }
        if let Err(rej) = verdict {
            let reply = Reply::error(rej.errno, rej.message);
            self.replies.send(req.cookie, reply).await;
            return Ok(());
        }
        let (ctx, replies) = (self.ctx.clone(), self.replies.clone());
        self.inflight.spawn(async move {
            let mut guard = AnswerOnPanic(Some((req.cookie, replies.clone())));
            let reply = cmd::dispatch(&ctx, &req, payload).await;
            guard.0 = None;
            replies.send(req.cookie, reply).await;
            drop(permit);
        });
        Ok(())
    }
}

/// Answers a request whose task panicked (a bug in a device or a command) with `EIO`, so the
/// client gets an error instead of waiting forever for a reply that cannot come; the
/// connection and the other requests go on. Disarmed once the request has its reply.
struct AnswerOnPanic(Option<(u64, Arc<Replies>)>);

impl Drop for AnswerOnPanic {
    fn drop(&mut self) {
        let Some((cookie, replies)) = self.0.take() else {
            return;
        };
        if !std::thread::panicking() {
            return;
        }
        tracing::error!(cookie, "an NBD request panicked; answering EIO");
        // Drop cannot await: the reply goes out from a task of its own. Without a runtime
        // (it is shutting down) the connection is closing anyway.
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(async move {
                let reply = Reply::error(Errno::EIO, "internal server error");
                replies.send(cookie, reply).await;
            });
        }
    }
}

/// Read and drop `n` bytes with a fixed-size buffer.
async fn drain<R: AsyncRead + Unpin>(rd: &mut R, n: u32) -> io::Result<()> {
    let copied = tokio::io::copy(&mut rd.take(n.into()), &mut tokio::io::sink()).await?;
    if copied < n.into() {
        return Err(io::ErrorKind::UnexpectedEof.into());
    }
    Ok(())
}

/// The write side: whole replies, one at a time.
struct Replies {
    /// `None` once a write failed: a half-written reply leaves the stream unusable.
    writer: Mutex<Option<BoxWrite>>,
    structured: bool,
    /// Tells the reader to stop when the stream broke.
    broken: Notify,
}

impl Replies {
    /// Send `reply` for `cookie`. Failures are not reported to the request: the reader
    /// learns of them through `broken` and closes the connection.
    async fn send(&self, cookie: u64, reply: Reply) {
        let enc = reply.encode(cookie, self.structured);
        let mut guard = self.writer.lock().await;
        let Some(w) = guard.as_mut() else {
            return;
        };
        let write = async {
            w.write_all(&enc.head).await?;
            w.write_all(&enc.body).await?;
            w.flush().await
        };
        if !matches!(tokio::time::timeout(REPLY_TIMEOUT, write).await, Ok(Ok(()))) {
            *guard = None;
            self.broken.notify_one();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::device::{BlockDevice, DeviceFuture};
    use crate::export::Export;
    use qcow2_engine::image::Extent;
    use tokio::io::DuplexStream;

    /// A device whose reads panic (a bug), everything else succeeding.
    #[derive(Debug)]
    struct PanickingReads;

    impl BlockDevice for PanickingReads {
        fn size(&self) -> u64 {
            1 << 20
        }
        fn is_writable(&self) -> bool {
            false
        }
        fn read_at<'a>(&'a self, _: &'a mut [u8], _: u64) -> DeviceFuture<'a, ()> {
            Box::pin(async { panic!("a device bug") })
        }
        fn write_at<'a>(&'a self, _: &'a [u8], _: u64) -> DeviceFuture<'a, ()> {
            Box::pin(async { Ok(()) })
        }
        fn write_zeroes(&self, _: u64, _: u64, _: bool) -> DeviceFuture<'_, ()> {
            Box::pin(async { Ok(()) })
        }
        fn discard(&self, _: u64, _: u64) -> DeviceFuture<'_, ()> {
            Box::pin(async { Ok(()) })
        }
        fn flush(&self) -> DeviceFuture<'_, ()> {
            Box::pin(async { Ok(()) })
        }
        fn close(&self) -> DeviceFuture<'_, ()> {
            Box::pin(async { Ok(()) })
        }
        fn map(&self, _: u64, _: u64) -> DeviceFuture<'_, Vec<Extent>> {
            Box::pin(async { Ok(Vec::new()) })
        }
    }

    /// The client side of a fixed-newstyle handshake with `NBD_OPT_EXPORT_NAME` "".
    async fn export_name_handshake(c: &mut DuplexStream) {
        let mut greeting = [0u8; 18];
        c.read_exact(&mut greeting).await.unwrap();
        assert_eq!(&greeting[..8], b"NBDMAGIC");
        // Client flags: fixed newstyle, no zeroes.
        c.write_all(&3u32.to_be_bytes()).await.unwrap();
        let mut opt = Vec::new();
        opt.extend_from_slice(b"IHAVEOPT");
        opt.extend_from_slice(&1u32.to_be_bytes()); // NBD_OPT_EXPORT_NAME
        opt.extend_from_slice(&0u32.to_be_bytes());
        c.write_all(&opt).await.unwrap();
        let mut info = [0u8; 10]; // size, transmission flags
        c.read_exact(&mut info).await.unwrap();
        assert_eq!(u64::from_be_bytes(info[..8].try_into().unwrap()), 1 << 20);
    }

    /// Regression: a request whose task panicked never got a reply, so the client waited
    /// forever; now it gets EIO and the connection keeps serving.
    #[tokio::test]
    async fn a_panicking_request_is_answered_with_eio() {
        let (mut client, server) = tokio::io::duplex(1 << 16);
        let exports = Exports::new(vec![Export::new("", Arc::new(PanickingReads))]);
        let (_stop, shutdown) = watch::channel(false);
        let patience = Patience {
            handshake: Duration::from_secs(5),
            idle: Duration::from_secs(60),
            slots: Arc::new(Semaphore::new(1)),
        };
        let task = tokio::spawn(serve(server, exports, shutdown, patience));
        export_name_handshake(&mut client).await;
        for cookie in [7u64, 8] {
            let mut req = Vec::new();
            req.extend_from_slice(&0x2560_9513u32.to_be_bytes());
            req.extend_from_slice(&0u16.to_be_bytes()); // flags
            req.extend_from_slice(&0u16.to_be_bytes()); // NBD_CMD_READ
            req.extend_from_slice(&cookie.to_be_bytes());
            req.extend_from_slice(&0u64.to_be_bytes());
            req.extend_from_slice(&4096u32.to_be_bytes());
            client.write_all(&req).await.unwrap();
            let mut reply = [0u8; 16];
            let read = tokio::time::timeout(Duration::from_secs(10), client.read_exact(&mut reply));
            read.await
                .expect("no reply to a request that panicked")
                .unwrap();
            assert_eq!(
                u32::from_be_bytes(reply[..4].try_into().unwrap()),
                0x6744_6698
            );
            assert_eq!(
                u32::from_be_bytes(reply[4..8].try_into().unwrap()),
                5,
                "EIO"
            );
            assert_eq!(u64::from_be_bytes(reply[8..].try_into().unwrap()), cookie);
        }
        drop(client);
        task.await.unwrap().unwrap();
    }
}
