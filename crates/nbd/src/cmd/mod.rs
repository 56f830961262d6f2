//! One module per transmission command. Each takes a request that already passed
//! [`Request::validate`](super::frame::Request::validate) (flags, size and range are sound)
//! and returns the [`Reply`] to send; the connection does the framing.

mod block_status;
mod cache;
pub mod disconnect;
mod flush;
mod read;
mod trim;
mod write;
mod write_zeroes;

use std::sync::Arc;

use super::device::BlockDevice;
use super::frame::{Reply, Request};
use super::meta::Kind;
use super::proto::*;
use qcow2_engine::error::{Error, ErrorKind, Result};

/// What a command needs from its connection.
#[derive(Debug, Clone)]
pub struct Ctx {
    /// The exported device.
    pub device: Arc<dyn BlockDevice>,
    /// The metadata contexts block status reports, with their ids.
    pub contexts: Arc<[(u32, Kind)]>,
}

/// Run one validated request (never `CMD_DISC`, which the connection handles itself).
pub async fn dispatch(ctx: &Ctx, req: &Request, payload: Vec<u8>) -> Reply {
    match req.kind {
        CMD_READ => read::run(ctx, req).await,
        CMD_WRITE => write::run(ctx, req, payload).await,
        CMD_FLUSH => flush::run(ctx).await,
        CMD_TRIM => trim::run(ctx, req).await,
        CMD_WRITE_ZEROES => write_zeroes::run(ctx, req).await,
        CMD_BLOCK_STATUS => block_status::run(ctx, req).await,
        CMD_CACHE => cache::run(ctx, req).await,
        _ => Reply::error(Errno::EINVAL, "unknown command"),
    }
}

/// The NBD error number for a library error.
pub fn errno_of(e: &Error) -> Errno {
    match e.kind() {
        ErrorKind::ReadOnly | ErrorKind::Refused => Errno::EPERM,
        ErrorKind::OutOfRange | ErrorKind::InvalidArgument => Errno::EINVAL,
        ErrorKind::NoSpace => Errno::ENOSPC,
        // Corruption, IO failures, a poisoned image, unsupported features (encrypted data):
        // the client can only learn that the IO failed. The message says more.
        _ => Errno::EIO,
    }
}

/// The reply for a write-like command's result; with FUA, success waits for a flush.
async fn completed(ctx: &Ctx, req: &Request, r: Result<()>) -> Reply {
    let r = match r {
        Ok(()) if req.flags & CMD_FLAG_FUA != 0 => ctx.device.flush().await,
        other => other,
    };
    match r {
        Ok(()) => Reply::Done,
        Err(e) => failed(&e),
    }
}

/// An error reply for a library error. The message leaves out the file path: the client
/// does not need to know where the server keeps its images.
fn failed(e: &Error) -> Reply {
    let mut msg = format!("{}: {}", e.kind().as_str(), e.what());
    if let Some(loc) = e.location() {
        msg.push_str(&format!(" ({loc})"));
    }
    Reply::error(errno_of(e), msg)
}
