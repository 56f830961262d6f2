//! The accept loop: a connection limit, one task per connection, graceful shutdown.
//!
//! Shutdown order (mini-redis's): stop accepting, tell every connection (a `watch` flag),
//! wait for them — each finishes the requests it has in flight — and only then flush and
//! close every exported device, so no write lands after the final flush.

use std::future::Future;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, UnixListener};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, watch};
use tokio::task::JoinSet;

use super::connection::{self, Patience, Stream};
use super::device::BlockDevice;
use super::export::{Export, Exports};
use super::handshake::Setup;
use super::tls::TlsConfig;
use qcow2_engine::error::Result;

/// A bound socket to serve on.
#[derive(Debug)]
pub enum Listener {
    /// TCP.
    Tcp(TcpListener),
    /// A Unix socket; its path is removed when the server stops.
    Unix(UnixListener, PathBuf),
}

impl Listener {
    /// Bind a TCP address (`"127.0.0.1:10809"`, `"[::]:0"`, ...).
    pub async fn tcp(addr: &str) -> io::Result<Listener> {
        Ok(Listener::Tcp(TcpListener::bind(addr).await?))
    }

    /// Bind a Unix socket at `path` (which must not exist yet).
    pub fn unix(path: impl AsRef<Path>) -> io::Result<Listener> {
        let path = path.as_ref().to_path_buf();
        Ok(Listener::Unix(UnixListener::bind(&path)?, path))
    }

    /// Where clients connect, for messages: `127.0.0.1:10809` or the socket path.
    pub fn address(&self) -> String {
        match self {
            Listener::Tcp(l) => l
                .local_addr()
                .map_or_else(|e| e.to_string(), |a| a.to_string()),
            Listener::Unix(_, p) => p.display().to_string(),
        }
    }

    async fn accept(&self) -> io::Result<Box<dyn Stream>> {
        match self {
            Listener::Tcp(l) => {
                let (s, _) = l.accept().await?;
                // Replies are header + data written separately: don't let Nagle hold them.
                s.set_nodelay(true)?;
                Ok(Box::new(s))
            }
            Listener::Unix(l, _) => Ok(Box::new(l.accept().await?.0)),
        }
    }
}

/// An NBD server for a set of exports.
///
/// ```no_run
/// # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
/// use std::sync::Arc;
/// use qcow2_engine::image::{Image, OpenOptions};
/// use qcow2_nbd::{Export, Listener, Server};
/// let img = Image::open("disk.qcow2", &OpenOptions::new().writable(true)).await?;
/// let server = Server::new(vec![Export::new("disk", Arc::new(img))]);
/// let listener = Listener::unix("/tmp/disk.sock")?;
/// // Serve until Ctrl-C, then finish the requests in flight and close the image.
/// server.run(listener, async { tokio::signal::ctrl_c().await.ok(); }).await?;
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
#[must_use = "a Server does nothing until `run`"]
pub struct Server {
    exports: Exports,
    max_connections: usize,
    handshake_timeout: Duration,
    idle_timeout: Duration,
    persistent: bool,
    on_event: Option<EventHook>,
    tls: Option<TlsConfig>,
}

/// A connection came or went: what [`Server::on_event`] hooks see.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event {
    /// Client number N (counted from 1) was accepted and given a slot.
    Accepted(u64),
    /// Client number N has gone (its requests in flight finished).
    Closed(u64),
}

/// The callback [`Server::on_event`] installs.
#[derive(Clone)]
struct EventHook(Arc<dyn Fn(Event) + Send + Sync>);

impl std::fmt::Debug for EventHook {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("EventHook")
    }
}

/// Default handshake limit: qemu-nbd's.
pub const DEFAULT_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Default idle timeout (applies only while every connection slot is taken).
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(60);

impl Server {
    /// A server for `exports`; the first one is also the default (empty-name) export.
    pub fn new(exports: Vec<Export>) -> Server {
        Server {
            exports: Exports::new(exports),
            max_connections: 16,
            handshake_timeout: DEFAULT_HANDSHAKE_TIMEOUT,
            idle_timeout: DEFAULT_IDLE_TIMEOUT,
            persistent: true,
            on_event: None,
            tls: None,
        }
    }

    /// Require TLS: clients must upgrade with `NBD_OPT_STARTTLS` before anything else
    /// (qemu-nbd's `--tls-creds`).
    #[cfg(feature = "tls")]
    pub fn tls(mut self, config: crate::TlsConfig) -> Server {
        self.tls = Some(config);
        self
    }

    /// With `false`, stop by itself (as if `shutdown` completed) once at least one client
    /// has been served and none is connected any more: qemu-nbd without `--persistent`.
    /// Default `true`: serve until `shutdown`.
    pub fn persistent(mut self, yes: bool) -> Server {
        self.persistent = yes;
        self
    }

    /// Call `f` as clients come and go (for a verbose log); it must not block.
    pub fn on_event(mut self, f: impl Fn(Event) + Send + Sync + 'static) -> Server {
        self.on_event = Some(EventHook(Arc::new(f)));
        self
    }

    /// Serve at most `n` clients at once (default 16); more wait in the listen backlog.
    /// `NBD_FLAG_CAN_MULTI_CONN` is advertised only when `n` > 1.
    pub fn max_connections(mut self, n: usize) -> Server {
        self.max_connections = n.max(1);
        self
    }

    /// Drop a client that has not finished the handshake after `d` (default 10 s, as
    /// qemu-nbd; `Duration::MAX` for no limit).
    pub fn handshake_timeout(mut self, d: Duration) -> Server {
        self.handshake_timeout = d;
        self
    }

    /// While every connection slot is taken, drop a client that has had nothing in flight
    /// and sent no request for `d` (default 60 s; `Duration::MAX` never drops). Silent
    /// clients holding every slot would otherwise lock everyone else out; on a server with
    /// free slots an idle client is left alone.
    pub fn idle_timeout(mut self, d: Duration) -> Server {
        self.idle_timeout = d;
        self
    }

    /// Serve until `shutdown` completes, then shut down gracefully: stop accepting, let
    /// every connection finish its requests in flight, then flush and close the exported
    /// devices. The error is the first close failure.
    pub async fn run(self, listener: Listener, shutdown: impl Future<Output = ()>) -> Result<()> {
        let (stop, stopped) = watch::channel(false);
        let limit = Arc::new(Semaphore::new(self.max_connections));
        let patience = Patience {
            handshake: self.handshake_timeout,
            idle: self.idle_timeout,
            slots: limit.clone(),
        };
        let mut conns = JoinSet::new();
        tokio::pin!(shutdown);
        // Kept across iterations: once it has accepted a client it must not be dropped while
        // it waits for a slot (that would hang up on the client).
        let mut next = Box::pin(accept_within(&listener, &limit));
        let mut served: u64 = 0;
        loop {
            let accepted = tokio::select! {
                biased;
                _ = &mut shutdown => break,
                Some(r) = conns.join_next(), if !conns.is_empty() => {
                    report_panic(r);
                    if !self.persistent && conns.is_empty() {
                        break;
                    }
                    continue;
                }
                accepted = &mut next => accepted,
            };
            next = Box::pin(accept_within(&listener, &limit));
            match accepted {
                Ok((s, permit)) => {
                    served += 1;
                    self.emit(Event::Accepted(served));
                    let h = self.handler(s, permit, stopped.clone(), patience.clone(), served);
                    conns.spawn(h);
                }
                // Out of file descriptors and the like: back off instead of spinning.
                Err(e) => {
                    tracing::warn!("nbd: accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
        drop(next);
        let _ = stop.send(true);
        if let Listener::Unix(_, path) = &listener {
            let _ = std::fs::remove_file(path);
        }
        drop(listener);
        while let Some(r) = conns.join_next().await {
            report_panic(r);
        }
        self.close_devices().await
    }

    /// The task serving one connection; holds its connection-limit permit to the end.
    fn handler(
        &self,
        stream: Box<dyn Stream>,
        permit: OwnedSemaphorePermit,
        stopped: watch::Receiver<bool>,
        patience: Patience,
        number: u64,
    ) -> impl Future<Output = ()> + Send + 'static {
        let exports = self.exports.clone();
        let hook = self.on_event.clone();
        let setup = Setup {
            tls: self.tls.clone(),
            multi_conn: self.max_connections > 1,
        };
        async move {
            let r = connection::serve_stream(stream, exports, stopped, patience, setup);
            if let Err(e) = r.await {
                // `{e:#}`: an engine error inside shows its cause too (see `qcow2_engine::Error`).
                tracing::debug!("nbd: connection closed: {e:#}");
            }
            drop(permit);
            if let Some(f) = hook {
                (f.0)(Event::Closed(number));
            }
        }
    }

    fn emit(&self, e: Event) {
        if let Some(f) = &self.on_event {
            (f.0)(e);
        }
    }

    /// Flush and close each distinct device once.
    async fn close_devices(&self) -> Result<()> {
        let mut seen: Vec<&Arc<dyn BlockDevice>> = Vec::new();
        let mut first_err = None;
        for e in self.exports.iter() {
            if seen.iter().any(|d| Arc::ptr_eq(d, &e.device)) {
                continue;
            }
            seen.push(&e.device);
            if let Err(err) = e.device.close().await {
                first_err.get_or_insert(err);
            }
        }
        first_err.map_or(Ok(()), Err)
    }
}

/// Wait for a client, then for a free connection slot. In this order a slot is only ever
/// held by a served client, so "no slot left" means the server is full ([`Patience`]); a
/// client accepted while the server is full waits, unserved, like those in the backlog.
async fn accept_within(
    listener: &Listener,
    limit: &Arc<Semaphore>,
) -> io::Result<(Box<dyn Stream>, OwnedSemaphorePermit)> {
    let stream = listener.accept().await?;
    let permit = limit.clone().acquire_owned().await;
    let permit = permit.expect("the connection semaphore is never closed");
    Ok((stream, permit))
}

fn report_panic(r: std::result::Result<(), tokio::task::JoinError>) {
    if let Err(e) = r {
        tracing::error!("nbd: connection task failed: {e}");
    }
}
