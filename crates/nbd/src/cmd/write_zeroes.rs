//! `NBD_CMD_WRITE_ZEROES`: the range must read as zeros. Without `NBD_CMD_FLAG_NO_HOLE` the
//! space may be released (zero clusters without a host cluster); with it, allocated
//! clusters keep their host space so later writes cannot fail for lack of it.
//!
//! With `NBD_CMD_FLAG_FAST_ZERO` the client would rather write zeros itself than wait for a
//! slow zeroing: unless the device can zero the range by changing metadata only, the request
//! fails at once with `ENOTSUP` and changes nothing.

use super::{Ctx, completed, failed};
use crate::frame::{Reply, Request};
use crate::proto::{CMD_FLAG_FAST_ZERO, CMD_FLAG_NO_HOLE, Errno};

/// Zero `[offset, offset + len)`; FUA flushes before the reply.
pub async fn run(ctx: &Ctx, req: &Request) -> Reply {
    let len = u64::from(req.len);
    if req.flags & CMD_FLAG_FAST_ZERO != 0 {
        match ctx.device.zeroes_fast(req.offset, len).await {
            Ok(true) => {}
            Ok(false) => return Reply::error(Errno::ENOTSUP, "zeroing this range would be slow"),
            Err(e) => return failed(&e),
        }
    }
    let may_unmap = req.flags & CMD_FLAG_NO_HOLE == 0;
    let r = ctx.device.write_zeroes(req.offset, len, may_unmap).await;
    completed(ctx, req, r).await
}
