//! `qcow2 serve`: export an image over NBD until SIGINT or SIGTERM, then shut down
//! gracefully: finish the requests in flight, flush and close the image.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use qcow2_nbd::{BlockDevice, Export, Listener, Server};

use crate::access::Access;
use crate::disk::Disk;

/// Arguments of `qcow2 serve`.
#[derive(Debug, clap::Args)]
#[command(group(clap::ArgGroup::new("address").required(true).args(["socket", "port"])))]
pub struct Args {
    /// Image format (qcow2 or raw); probed when omitted.
    #[arg(short = 'f')]
    format: Option<String>,
    /// Export read-only (writes fail with EPERM).
    #[arg(short = 'r', long)]
    read_only: bool,
    /// The export's name (clients use nbd://HOST/NAME); the empty name also selects it.
    #[arg(short = 'x', long, default_value = "")]
    export_name: String,
    /// Listen on this Unix socket (created; removed on exit).
    #[arg(short = 'k', long)]
    socket: Option<PathBuf>,
    /// Listen on this TCP port.
    #[arg(short = 'p', long)]
    port: Option<u16>,
    /// Address to bind the TCP port to.
    #[arg(short = 'b', long, default_value = "127.0.0.1", requires = "port")]
    bind: String,
    /// Clients served at once; more wait until one leaves.
    #[arg(short = 'e', long, default_value_t = 16)]
    max_connections: usize,
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
    /// The image file.
    file: PathBuf,
}

/// SECS from the command line as a limit: 0 means none.
fn seconds(secs: u64) -> Duration {
    match secs {
        0 => Duration::MAX,
        s => Duration::from_secs(s),
    }
}

/// Run `qcow2 serve`.
pub async fn run(a: Args) -> Result<u8> {
    let device = open_device(&a).await?;
    let listener = match (&a.socket, a.port) {
        (Some(path), _) => Listener::unix(path)
            .with_context(|| format!("could not listen on '{}'", path.display()))?,
        (None, Some(port)) => {
            let addr = if a.bind.contains(':') {
                format!("[{}]:{port}", a.bind)
            } else {
                format!("{}:{port}", a.bind)
            };
            Listener::tcp(&addr)
                .await
                .with_context(|| format!("could not listen on {addr}"))?
        }
        (None, None) => unreachable!("clap requires --socket or --port"),
    };
    let server = Server::new(vec![Export::new(a.export_name.clone(), device)])
        .max_connections(a.max_connections)
        .handshake_timeout(seconds(a.handshake_limit))
        .idle_timeout(seconds(a.idle_timeout));
    server
        .run(listener, stop_signal())
        .await
        .with_context(|| format!("closing '{}'", a.file.display()))?;
    Ok(0)
}

/// Open the image as a device of its format (as every other command opens it: a raw file's
/// size rounded up to whole sectors, block 0 of a probed raw file guarded).
async fn open_device(a: &Args) -> Result<Arc<dyn BlockDevice>> {
    let writable = !a.read_only;
    let access = a.access.clone().untrusted_by_default();
    if writable && access.force_share {
        bail!("--force-share (-U) can only be used with read-only exports (-r)");
    }
    let disk = Disk::open(&a.file, a.format.as_deref(), writable, &access).await?;
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
