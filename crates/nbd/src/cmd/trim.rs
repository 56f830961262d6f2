//! `NBD_CMD_TRIM`: a hint that the range is unused. We discard it for real: the clusters are
//! freed and the range reads as zeros afterwards (never the backing file's data).

use super::{Ctx, completed};
use crate::frame::{Reply, Request};

/// Discard `[offset, offset + len)`; FUA flushes before the reply.
pub async fn run(ctx: &Ctx, req: &Request) -> Reply {
    let r = ctx.device.discard(req.offset, req.len.into()).await;
    completed(ctx, req, r).await
}
