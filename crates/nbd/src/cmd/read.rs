//! `NBD_CMD_READ`: the data comes back in one piece (one structured chunk), which also
//! satisfies `NBD_CMD_FLAG_DF`.

use super::{Ctx, failed};
use crate::frame::{Reply, Request};

/// Read `req.len` bytes (≤ 32 MiB, checked by validation) at `req.offset`.
pub async fn run(ctx: &Ctx, req: &Request) -> Reply {
    let mut data = vec![0u8; req.len as usize];
    match ctx.device.read_at(&mut data, req.offset).await {
        Ok(()) => Reply::Data {
            offset: req.offset,
            data,
        },
        Err(e) => failed(&e),
    }
}
