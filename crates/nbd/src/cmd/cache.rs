//! `NBD_CMD_CACHE`: the client will read this range soon. A hint: the device prefetches what
//! it can (an image loads the range's L2 tables into its cache) and the reply is a success
//! unless the device failed.

use super::{Ctx, failed};
use crate::frame::{Reply, Request};

/// Prefetch `[offset, offset + len)`.
pub async fn run(ctx: &Ctx, req: &Request) -> Reply {
    match ctx.device.prefetch(req.offset, req.len.into()).await {
        Ok(()) => Reply::Done,
        Err(e) => failed(&e),
    }
}
