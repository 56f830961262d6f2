//! `NBD_CMD_WRITE`: the payload was read by the connection (its length checked first).

use super::{Ctx, completed};
use crate::frame::{Reply, Request};

/// Write `payload` at `req.offset`; FUA flushes before the reply.
pub async fn run(ctx: &Ctx, req: &Request, payload: Vec<u8>) -> Reply {
    let r = ctx.device.write_at(&payload, req.offset).await;
    completed(ctx, req, r).await
}
