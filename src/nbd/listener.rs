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

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, UnixListener};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, watch};
use tokio::task::JoinSet;

use super::connection;
use super::device::BlockDevice;
use super::export::{Export, Exports};
use crate::error::Result;

/// A bound socket to serve on.
#[derive(Debug)]
pub enum Listener {
    /// TCP.
    Tcp(TcpListener),
    /// A Unix socket; its path is removed when the server stops.
    Unix(UnixListener, PathBuf),
}

/// A byte stream to one client.
trait Stream: AsyncRead + AsyncWrite + Send + Unpin {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin> Stream for T {}

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
/// use qcow2_rs::image::{Image, OpenOptions};
/// use qcow2_rs::nbd::{Export, Listener, Server};
/// let img = Image::open("disk.qcow2", &OpenOptions::new().writable(true)).await?;
/// let server = Server::new(vec![Export::new("disk", Arc::new(img))]);
/// let listener = Listener::unix("/tmp/disk.sock")?;
/// // Serve until Ctrl-C, then finish the requests in flight and close the image.
/// server.run(listener, async { tokio::signal::ctrl_c().await.ok(); }).await?;
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct Server {
    exports: Exports,
    max_connections: usize,
    handshake_timeout: Duration,
}

impl Server {
    /// A server for `exports`; the first one is also the default (empty-name) export.
    pub fn new(exports: Vec<Export>) -> Server {
        Server {
            exports: Exports::new(exports),
            max_connections: 16,
            handshake_timeout: Duration::from_secs(30),
        }
    }

    /// Serve at most `n` clients at once (default 16); more wait in the listen backlog.
    pub fn max_connections(mut self, n: usize) -> Server {
        self.max_connections = n.max(1);
        self
    }

    /// Drop a client that has not finished the handshake after `d` (default 30 s).
    pub fn handshake_timeout(mut self, d: Duration) -> Server {
        self.handshake_timeout = d;
        self
    }

    /// Serve until `shutdown` completes, then shut down gracefully: stop accepting, let
    /// every connection finish its requests in flight, then flush and close the exported
    /// devices. The error is the first close failure.
    pub async fn run(self, listener: Listener, shutdown: impl Future<Output = ()>) -> Result<()> {
        let (stop, stopped) = watch::channel(false);
        let limit = Arc::new(Semaphore::new(self.max_connections));
        let mut conns = JoinSet::new();
        tokio::pin!(shutdown);
        loop {
            let next = accept_within(&listener, &limit);
            tokio::select! {
                biased;
                _ = &mut shutdown => break,
                Some(r) = conns.join_next(), if !conns.is_empty() => report_panic(r),
                (permit, r) = next => match r {
                    Ok(s) => {
                        let h = self.handler(s, permit, stopped.clone());
                        conns.spawn(h);
                    }
                    // Out of file descriptors and the like: back off instead of spinning.
                    Err(e) => {
                        tracing::warn!("nbd: accept failed: {e}");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                },
            }
        }
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
    ) -> impl Future<Output = ()> + Send + 'static {
        let (exports, timeout) = (self.exports.clone(), self.handshake_timeout);
        async move {
            if let Err(e) = connection::serve(stream, exports, stopped, timeout).await {
                tracing::debug!("nbd: connection closed: {e}");
            }
            drop(permit);
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

/// Wait for a free connection slot, then for a client.
async fn accept_within(
    listener: &Listener,
    limit: &Arc<Semaphore>,
) -> (OwnedSemaphorePermit, io::Result<Box<dyn Stream>>) {
    let permit = limit.clone().acquire_owned().await;
    let permit = permit.expect("the connection semaphore is never closed");
    (permit, listener.accept().await)
}

fn report_panic(r: std::result::Result<(), tokio::task::JoinError>) {
    if let Err(e) = r {
        tracing::error!("nbd: connection task failed: {e}");
    }
}
