//! `qcow2 io`: qemu-io style commands (`-c 'write -P 0xab 0 64k'`), run in order.
//!
//! As with qemu-io, a failed command prints its error and the next one still runs; the exit
//! status is 1 if any command failed. `aio_*` requests run concurrently as tokio tasks;
//! `aio_flush` (and the end of the command list) waits for them. The image is always closed.

use std::path::PathBuf;

use anyhow::Result;
use tokio::task::JoinHandle;

use super::io_ops::{self, Op, Request};
use crate::access::Access;
use crate::disk::Disk;
use crate::output::error_text;

/// Arguments of `qcow2 io`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Image format (qcow2 or raw); probed when omitted.
    #[arg(short = 'f')]
    format: Option<String>,
    /// Open the image read-only.
    #[arg(short = 'r', long)]
    read_only: bool,
    /// A command to run (repeatable): read, write, discard, flush, aio_read, aio_write,
    /// aio_flush, map, info.
    #[arg(short = 'c', long = "cmd")]
    commands: Vec<String>,
    #[command(flatten)]
    access: Access,
    /// The image file.
    file: PathBuf,
}

/// The open image and the aio requests in flight.
struct Session {
    disk: Disk,
    file: PathBuf,
    in_flight: Vec<JoinHandle<bool>>,
    failed: bool,
}

/// Run `qcow2 io`.
pub async fn run(a: Args) -> Result<u8> {
    let disk = Disk::open(&a.file, a.format.as_deref(), !a.read_only, &a.access).await?;
    let mut s = Session {
        disk,
        file: a.file,
        in_flight: Vec::new(),
        failed: false,
    };
    for line in &a.commands {
        s.command(line).await;
    }
    s.drain().await;
    if let Err(e) = s.disk.close().await {
        errln!("qcow2: closing the image: {}", error_text(&e));
        s.failed = true;
    }
    Ok(u8::from(s.failed))
}

impl Session {
    /// Parse and run one command line, recording failure.
    async fn command(&mut self, line: &str) {
        let ok = match io_ops::parse(line) {
            Ok(op) => self.execute(op).await,
            Err(e) => {
                errln!("{}", error_text(&e));
                false
            }
        };
        self.failed |= !ok;
    }

    async fn execute(&mut self, op: Op) -> bool {
        match op {
            Op::Sync(req) => io_ops::perform(&self.disk, &req).await,
            Op::Aio(req) => {
                let disk = self.disk.clone();
                self.in_flight.push(tokio::spawn(
                    async move { io_ops::perform(&disk, &req).await },
                ));
                true
            }
            Op::AioFlush => {
                let ok = self.drain().await;
                ok & io_ops::perform(&self.disk, &Request::Flush).await
            }
            Op::Map => report(io_ops::print_map(&self.disk).await),
            Op::Info => report(io_ops::print_info(&self.disk, &self.file).await),
        }
    }

    /// Wait for every aio request; false if any failed.
    async fn drain(&mut self) -> bool {
        let mut ok = true;
        for h in std::mem::take(&mut self.in_flight) {
            ok &= h.await.unwrap_or(false);
        }
        self.failed |= !ok;
        ok
    }
}

/// Print a command's error; true on success.
pub fn report(r: Result<()>) -> bool {
    match r {
        Ok(()) => true,
        Err(e) => {
            errln!("{}", error_text(&e));
            false
        }
    }
}
