//! `qcow2 serve`: export an image over NBD until SIGINT or SIGTERM (or, without
//! `--persistent`, until the last client leaves), then shut down gracefully: finish the
//! requests in flight, flush and close the image. The command line is qemu-nbd's.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use qcow2_engine::ErrorKind;
use qcow2_nbd::{BlockDevice, DirtyBitmap, Event, Export, Listener, MetaContext, Server};

use super::serve_opts::QemuNbdFlags;
use crate::access::Access;
use crate::disk::Disk;

/// Arguments of `qcow2 serve`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Image format (qcow2 or raw); probed when omitted.
    #[arg(short = 'f')]
    pub(super) format: Option<String>,
    /// Export read-only (writes fail with EPERM).
    #[arg(short = 'r', long)]
    read_only: bool,
    /// Export this internal snapshot of the image, read-only (qemu-nbd's -l): a name or ID,
    /// or `snapshot.id=ID,snapshot.name=NAME`.
    #[arg(short = 'l', long = "load-snapshot", value_name = "SNAPSHOT_PARAM")]
    pub(super) load_snapshot: Option<String>,
    /// The export's name (clients use nbd://HOST/NAME); the empty name also selects it.
    #[arg(short = 'x', long, default_value = "")]
    pub(super) export_name: String,
    /// Listen on this Unix socket (created; removed on exit). With --list: connect to it.
    #[arg(short = 'k', long)]
    pub(super) socket: Option<PathBuf>,
    /// Listen on this TCP port (the default, 10809, when neither -k nor -p is given).
    /// With --list: the port to connect to.
    #[arg(short = 'p', long, conflicts_with = "socket")]
    pub(super) port: Option<u16>,
    /// Address to bind the TCP port to (qemu-nbd binds 0.0.0.0; we default to loopback).
    /// With --list: the server to connect to (default 0.0.0.0, as qemu-nbd).
    #[arg(short = 'b', long, conflicts_with = "socket")]
    pub(super) bind: Option<String>,
    /// Clients served at once; more wait until one leaves.
    #[arg(
        short = 'e',
        long = "shared",
        alias = "max-connections",
        default_value_t = 1
    )]
    max_connections: usize,
    /// Keep serving after the last client leaves (without it the server exits then).
    #[arg(short = 't', long)]
    persistent: bool,
    /// Write the server's pid to FILE once it listens (removed on exit).
    #[arg(long, value_name = "FILE")]
    pid_file: Option<PathBuf>,
    /// Accepted for qemu-nbd's command line, which prints nothing more for a server with one
    /// -v (QEMU's iotests compare stderr); -vv logs clients coming and going to stderr.
    #[arg(short = 'v', long, action = clap::ArgAction::Count)]
    verbose: u8,
    /// Run in the background: return once the socket is listening.
    #[arg(long)]
    pub fork: bool,
    /// Export a temporary overlay over FILE: writes go there and vanish on exit.
    #[arg(short = 's', long)]
    snapshot: bool,
    /// The export's description (shown by NBD_OPT_LIST and NBD_INFO_DESCRIPTION).
    #[arg(short = 'D', long, value_name = "TEXT", default_value = "")]
    pub(super) description: String,
    /// Drop a client that has not finished the handshake after SECS seconds (0: no limit).
    #[arg(long, value_name = "SECS", default_value_t = 10)]
    handshake_limit: u64,
    /// While all connection slots are taken, drop a client that has sent no request (and
    /// has none in flight) for SECS seconds (0: never).
    #[arg(long, value_name = "SECS", default_value_t = 60)]
    idle_timeout: u64,
    /// Images are untrusted here: backing and data files only inside the image's directory
    /// (named relatively, without '..'), data files read-only, unless --trusted.
    #[command(flatten)]
    access: Access,
    #[command(flatten)]
    pub(super) qemu: QemuNbdFlags,
    /// Client mode: list the exports of the server at -k SOCK or -b HOST -p PORT (in
    /// qemu-nbd -L's format) instead of serving an image.
    #[arg(short = 'L', long)]
    pub list: bool,
    /// The image file (none with --list).
    #[arg(required_unless_present = "list")]
    pub(super) file: Option<PathBuf>,
    /// With --fork: the pipe to the waiting parent (see [`crate::fork`]).
    #[arg(skip)]
    pub ready: Option<std::os::fd::OwnedFd>,
}

/// qemu-nbd's port when neither -k nor -p is given.
pub(super) const DEFAULT_PORT: u16 = 10809;

/// Where the server listens without -b: loopback only (qemu-nbd's is 0.0.0.0, which would
/// expose the image to the network by default).
const DEFAULT_BIND: &str = "127.0.0.1";

/// SECS from the command line as a limit: 0 means none.
fn seconds(secs: u64) -> Duration {
    match secs {
        0 => Duration::MAX,
        s => Duration::from_secs(s),
    }
}

/// Run `qcow2 serve`.
pub async fn run(mut a: Args) -> Result<u8> {
    if a.list {
        return super::serve_list::run(&a).await;
    }
    // clap requires the file unless --list.
    let file = a.file.clone().context("no image file given")?;
    a.qemu.check()?;
    let tls = a.qemu.tls()?;
    let device = a.qemu.policy().apply(open_device(&a, &file).await?);
    let (contexts, listener, _pid_file) = match prepare(&a, device.as_ref()).await {
        Ok(p) => p,
        Err(e) => {
            // Close what was opened: a writable open marked the image's enabled bitmaps
            // in use on disk, and only a close stores them clean again.
            let _ = device.close().await;
            return Err(e);
        }
    };
    if let Some(fd) = a.ready.take() {
        crate::fork::ready(fd);
    }
    let export = Export {
        description: a.description.clone(),
        contexts,
        ..Export::new(a.export_name.clone(), device)
    };
    let mut server = Server::new(vec![export])
        .max_connections(a.max_connections)
        .persistent(a.persistent)
        .handshake_timeout(seconds(a.handshake_limit))
        .idle_timeout(seconds(a.idle_timeout));
    if a.verbose >= 2 {
        server = server.on_event(log_event);
    }
    if let Some(tls) = tls {
        server = server.tls(tls);
    }
    server
        .run(listener, stop_signal())
        .await
        .with_context(|| format!("closing '{}'", file.display()))?;
    Ok(0)
}

/// Everything between opening the image and serving it: the contexts, the listening
/// socket and the pid file.
async fn prepare(
    a: &Args,
    device: &dyn BlockDevice,
) -> Result<(Vec<MetaContext>, Listener, Option<PidFile>)> {
    let contexts = contexts(a, device).await?;
    let listener = listen(a).await?;
    let pid_file = match &a.pid_file {
        Some(p) => Some(PidFile::write(p)?),
        None => None,
    };
    Ok((contexts, listener, pid_file))
}

/// The metadata contexts the export offers besides `base:allocation`: `-A`'s, then one per
/// `-B`, in qemu-nbd's order (it offers the last -B first).
async fn contexts(a: &Args, device: &dyn BlockDevice) -> Result<Vec<MetaContext>> {
    let mut out = Vec::new();
    if a.qemu.allocation_depth {
        out.push(MetaContext::AllocationDepth);
    }
    for name in a.qemu.bitmaps().iter().rev() {
        out.push(MetaContext::DirtyBitmap(dirty_bitmap(device, name).await?));
    }
    Ok(out)
}

/// Bitmap `name` of the device, refused with qemu-nbd's messages when it is missing or
/// inconsistent (in_use: not stored cleanly, so its bits cannot be trusted).
async fn dirty_bitmap(device: &dyn BlockDevice, name: &str) -> Result<DirtyBitmap> {
    DirtyBitmap::new(device, name)
        .await
        .map_err(|e| match e.kind() {
            ErrorKind::NotFound => anyhow!("Bitmap '{name}' is not found"),
            ErrorKind::Refused => anyhow!("Bitmap '{name}' is inconsistent and cannot be used"),
            _ => anyhow::Error::new(e).context(format!("reading bitmap '{name}'")),
        })
}

/// Bind the Unix socket or the TCP port the arguments name.
async fn listen(a: &Args) -> Result<Listener> {
    if let Some(path) = &a.socket {
        return Listener::unix(path)
            .with_context(|| format!("could not listen on '{}'", path.display()));
    }
    let port = a.port.unwrap_or(DEFAULT_PORT);
    let bind = a.bind.as_deref().unwrap_or(DEFAULT_BIND);
    let addr = if bind.contains(':') {
        format!("[{bind}]:{port}")
    } else {
        format!("{bind}:{port}")
    };
    Listener::tcp(&addr)
        .await
        .with_context(|| format!("could not listen on {addr}"))
}

/// `-v`: one line per client accepted or gone.
fn log_event(e: Event) {
    match e {
        Event::Accepted(n) => errln!("qcow2 serve: client {n} connected"),
        Event::Closed(n) => errln!("qcow2 serve: client {n} disconnected"),
    }
}

/// The `--pid-file`, removed when dropped (the server has stopped).
struct PidFile(PathBuf);

impl PidFile {
    fn write(path: &std::path::Path) -> Result<PidFile> {
        std::fs::write(path, format!("{}\n", std::process::id()))
            .with_context(|| format!("could not write the pid file '{}'", path.display()))?;
        Ok(PidFile(path.to_path_buf()))
    }
}

impl Drop for PidFile {
    /// Remove the file only while it still names this process: a script that restarts the
    /// server on the same pid file (QEMU's iotests: kill, rm, start) may already have a new
    /// server's pid in it, which the old server must not delete.
    fn drop(&mut self) {
        let ours = format!("{}\n", std::process::id());
        if std::fs::read_to_string(&self.0).is_ok_and(|t| t == ours) {
            let _ = std::fs::remove_file(&self.0);
        }
    }
}
/// Open the image as a device of its format (as every other command opens it: a raw file's
/// size rounded up to whole sectors, block 0 of a probed raw file guarded).
async fn open_device(a: &Args, file: &Path) -> Result<Arc<dyn BlockDevice>> {
    let writable = !a.read_only;
    let mut access = a.access.clone().untrusted_by_default();
    let tuning = a.qemu.tuning();
    (access.direct, access.io_backend) = (tuning.direct, tuning.io_backend);
    if writable && access.force_share {
        bail!("--force-share (-U) can only be used with read-only exports (-r)");
    }
    if let Some(snap) = &a.load_snapshot {
        let disk = super::snapshot::open_source(file, a.format.as_deref(), &access, snap);
        return Ok(disk.await?.into_device());
    }
    // With -r there is nothing for an overlay to catch: the image itself is served read-only.
    if a.snapshot && writable {
        let img = super::serve_snapshot::open_overlay(file, a.format.as_deref(), &access);
        return Ok(Arc::new(img.await?));
    }
    let disk = Disk::open(file, a.format.as_deref(), writable, &access).await?;
    Ok(disk.into_device())
}

/// Completes on the first SIGINT or SIGTERM.
async fn stop_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
        }
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}
