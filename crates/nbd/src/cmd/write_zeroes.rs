//! `NBD_CMD_WRITE_ZEROES`: the range must read as zeros. Without `NBD_CMD_FLAG_NO_HOLE` the
//! space may be released (zero clusters without a host cluster); with it, allocated
//! clusters keep their host space so later writes cannot fail for lack of it.

use super::{Ctx, completed};
use crate::frame::{Reply, Request};
use crate::proto::CMD_FLAG_NO_HOLE;

/// Zero `[offset, offset + len)`; FUA flushes before the reply.
pub async fn run(ctx: &Ctx, req: &Request) -> Reply {
    let may_unmap = req.flags & CMD_FLAG_NO_HOLE == 0;
    let r = ctx
        .device
        .write_zeroes(req.offset, req.len.into(), may_unmap)
        .await;
    completed(ctx, req, r).await
}
