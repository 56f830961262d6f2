//! Helpers for the NBD tests: an in-process server on a Unix socket, and a raw-byte client
//! that speaks the protocol by hand (so tests can also speak it wrong).
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use qcow2_engine::image::create::{CreateOptions, create};
use qcow2_engine::image::{Image, OpenOptions};
use qcow2_engine::storage::FileStorage;
pub mod pki;
pub mod proto;

use proto::*;
use qcow2_nbd::{Export, Listener, Server};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

/// Create a qcow2 image of `size` bytes at `path`.
pub async fn create_image(path: &Path, size: u64) {
    let storage = FileStorage::create(path).unwrap();
    let mut opts = CreateOptions::default();
    opts.apply_o(&format!("size={size}")).unwrap();
    create(&storage, None, &opts).await.unwrap();
}

/// A server running in this process.
pub struct TestServer {
    pub socket: PathBuf,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<qcow2_engine::Result<()>>>,
}

impl TestServer {
    /// Serve `exports` (name, image path, writable) on `dir/nbd.sock`.
    pub async fn start(dir: &Path, exports: &[(&str, &Path, bool)]) -> TestServer {
        Self::start_limited(dir, exports, 16).await
    }

    /// [`TestServer::start`] with at most `max` connections at once.
    pub async fn start_limited(
        dir: &Path,
        exports: &[(&str, &Path, bool)],
        max: usize,
    ) -> TestServer {
        Self::start_configured(dir, exports, |s| {
            s.handshake_timeout(Duration::from_secs(5))
                .max_connections(max)
        })
        .await
    }

    /// [`TestServer::start`] with the server's settings changed by `configure`.
    pub async fn start_configured(
        dir: &Path,
        exports: &[(&str, &Path, bool)],
        configure: impl FnOnce(Server) -> Server,
    ) -> TestServer {
        let mut list = Vec::new();
        for (name, path, writable) in exports {
            let img = Image::open(path, &OpenOptions::new().writable(*writable))
                .await
                .unwrap();
            list.push(Export::new(*name, Arc::new(img)));
        }
        let socket = dir.join("nbd.sock");
        let listener = Listener::unix(&socket).unwrap();
        let (stop, stopped) = oneshot::channel::<()>();
        let server = configure(Server::new(list));
        let task = tokio::spawn(server.run(listener, async {
            let _ = stopped.await;
        }));
        TestServer {
            socket,
            stop: Some(stop),
            task: Some(task),
        }
    }

    /// Shut down gracefully and return the server's result (within 10 s).
    pub async fn stop(mut self) -> qcow2_engine::Result<()> {
        let _ = self.stop.take().unwrap().send(());
        let task = self.task.take().unwrap();
        tokio::time::timeout(Duration::from_secs(10), task)
            .await
            .expect("graceful shutdown hangs")
            .unwrap()
    }

    /// `nbd+unix` URI of the default export.
    pub fn uri(&self) -> String {
        format!("nbd+unix:///?socket={}", self.socket.display())
    }
}

/// A raw-byte NBD client.
pub struct Raw {
    pub s: UnixStream,
}

/// A structured reply chunk.
#[derive(Debug)]
pub struct Chunk {
    pub flags: u16,
    pub kind: u16,
    pub cookie: u64,
    pub payload: Vec<u8>,
}

const T: Duration = Duration::from_secs(10);

impl Raw {
    /// Connect and check the greeting.
    pub async fn connect(socket: &Path) -> Raw {
        let mut r = Raw {
            s: UnixStream::connect(socket).await.unwrap(),
        };
        let g = r.read(18).await;
        assert_eq!(&g[0..8], b"NBDMAGIC");
        assert_eq!(&g[8..16], b"IHAVEOPT");
        assert_eq!(&g[16..18], &[0, 3], "FIXED_NEWSTYLE | NO_ZEROES");
        r
    }

    /// Connect and send the client flags.
    pub async fn connect_with(socket: &Path, client_flags: u32) -> Raw {
        let mut r = Raw::connect(socket).await;
        r.send(&client_flags.to_be_bytes()).await;
        r
    }

    pub async fn send(&mut self, b: &[u8]) {
        self.s.write_all(b).await.unwrap();
    }

    pub async fn read(&mut self, n: usize) -> Vec<u8> {
        let mut b = vec![0u8; n];
        tokio::time::timeout(T, self.s.read_exact(&mut b))
            .await
            .expect("server reply timed out")
            .unwrap();
        b
    }

    pub async fn u16(&mut self) -> u16 {
        u16::from_be_bytes(self.read(2).await.try_into().unwrap())
    }
    pub async fn u32(&mut self) -> u32 {
        u32::from_be_bytes(self.read(4).await.try_into().unwrap())
    }
    pub async fn u64(&mut self) -> u64 {
        u64::from_be_bytes(self.read(8).await.try_into().unwrap())
    }

    /// Whether the server closed the connection (EOF within the timeout).
    pub async fn closed(&mut self) -> bool {
        let mut b = [0u8; 1];
        matches!(
            tokio::time::timeout(T, self.s.read(&mut b)).await,
            Ok(Ok(0)) | Ok(Err(_))
        )
    }

    /// Send an option.
    pub async fn option(&mut self, opt: u32, data: &[u8]) {
        let mut b = OPT_MAGIC.to_be_bytes().to_vec();
        b.extend_from_slice(&opt.to_be_bytes());
        b.extend_from_slice(&(data.len() as u32).to_be_bytes());
        b.extend_from_slice(data);
        self.send(&b).await;
    }

    /// Read one option reply: (option, reply type, data).
    pub async fn opt_reply(&mut self) -> (u32, u32, Vec<u8>) {
        assert_eq!(self.u64().await, REP_MAGIC);
        let opt = self.u32().await;
        let kind = self.u32().await;
        let len = self.u32().await as usize;
        (opt, kind, self.read(len).await)
    }

    /// Negotiate (optionally structured replies and base:allocation), then `OPT_GO` to
    /// `name`. Returns the export size and transmission flags.
    pub async fn go(&mut self, name: &str, structured: bool, meta: bool) -> (u64, u16) {
        if structured {
            self.option(OPT_STRUCTURED_REPLY, &[]).await;
            assert_eq!(self.opt_reply().await.1, REP_ACK);
        }
        if meta {
            self.option(OPT_SET_META_CONTEXT, &meta_data(name, &["base:allocation"]))
                .await;
            let (_, kind, data) = self.opt_reply().await;
            assert_eq!(kind, REP_META_CONTEXT);
            assert_eq!(&data[4..], b"base:allocation");
            assert_eq!(self.opt_reply().await.1, REP_ACK);
        }
        self.option(OPT_GO, &info_data(name, &[])).await;
        let mut export = None;
        loop {
            let (opt, kind, data) = self.opt_reply().await;
            assert_eq!(opt, OPT_GO);
            match kind {
                REP_INFO if data[..2] == [0, 0] => {
                    let size = u64::from_be_bytes(data[2..10].try_into().unwrap());
                    let flags = u16::from_be_bytes(data[10..12].try_into().unwrap());
                    export = Some((size, flags));
                }
                REP_INFO => {}
                REP_ACK => return export.expect("NBD_INFO_EXPORT before ACK"),
                other => panic!(
                    "OPT_GO failed: {other:#x} {:?}",
                    String::from_utf8_lossy(&data)
                ),
            }
        }
    }

    /// Send a request (with its payload for writes).
    pub async fn request(
        &mut self,
        kind: u16,
        flags: u16,
        cookie: u64,
        offset: u64,
        len: u32,
        payload: &[u8],
    ) {
        let req = proto::Request {
            flags,
            kind,
            cookie,
            offset,
            len,
        };
        let mut b = req.encode().to_vec();
        b.extend_from_slice(payload);
        self.send(&b).await;
    }

    /// Read a simple reply header: (errno, cookie).
    pub async fn simple(&mut self) -> (u32, u64) {
        assert_eq!(self.u32().await, SIMPLE_REPLY_MAGIC);
        (self.u32().await, self.u64().await)
    }

    /// Read one structured chunk.
    pub async fn chunk(&mut self) -> Chunk {
        assert_eq!(self.u32().await, STRUCTURED_REPLY_MAGIC);
        let flags = self.u16().await;
        let kind = self.u16().await;
        let cookie = self.u64().await;
        let len = self.u32().await as usize;
        Chunk {
            flags,
            kind,
            cookie,
            payload: self.read(len).await,
        }
    }
}

/// `OPT_INFO`/`OPT_GO` data.
pub fn info_data(name: &str, requests: &[u16]) -> Vec<u8> {
    let mut d = (name.len() as u32).to_be_bytes().to_vec();
    d.extend_from_slice(name.as_bytes());
    d.extend_from_slice(&(requests.len() as u16).to_be_bytes());
    for r in requests {
        d.extend_from_slice(&r.to_be_bytes());
    }
    d
}

/// Meta-context option data.
pub fn meta_data(name: &str, queries: &[&str]) -> Vec<u8> {
    let mut d = (name.len() as u32).to_be_bytes().to_vec();
    d.extend_from_slice(name.as_bytes());
    d.extend_from_slice(&(queries.len() as u32).to_be_bytes());
    for q in queries {
        d.extend_from_slice(&(q.len() as u32).to_be_bytes());
        d.extend_from_slice(q.as_bytes());
    }
    d
}

/// Whether an external tool is installed.
pub fn have(tool: &str) -> bool {
    std::process::Command::new(tool)
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
}
