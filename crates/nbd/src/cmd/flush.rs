//! `NBD_CMD_FLUSH`: every write already replied to must be durable before this reply.
//! `Image::flush` writes all dirty metadata in soft-update order and syncs the file, which
//! covers the writes of every connection (hence `NBD_FLAG_CAN_MULTI_CONN`).

use super::{Ctx, failed};
use crate::frame::Reply;

/// Flush the device.
pub async fn run(ctx: &Ctx) -> Reply {
    match ctx.device.flush().await {
        Ok(()) => Reply::Done,
        Err(e) => failed(&e),
    }
}
