//! `NBD_CMD_BLOCK_STATUS` for `base:allocation`: `HOLE` where no layer has data, `ZERO` where
//! the range reads as zeros, from the same extents `qemu-img map` prints.
//!
//! The range is mapped in windows and the reply stops after [`MAX_DESCRIPTORS`] extents (the
//! spec lets a server answer less than asked; clients continue where it stopped), so a 4 GiB
//! query over 512-byte clusters costs neither unbounded memory nor an unbounded reply.

use super::{Ctx, failed};
use crate::frame::{Reply, Request};
use crate::proto::*;
use qcow2_engine::image::Extent;

/// Most descriptors in one reply.
pub const MAX_DESCRIPTORS: usize = 1024;
/// Bytes mapped per call into the image.
const WINDOW: u64 = 64 << 20;

/// The status of `[offset, offset + len)` (or of its first extent with `REQ_ONE`).
pub async fn run(ctx: &Ctx, req: &Request) -> Reply {
    let one = req.flags & CMD_FLAG_REQ_ONE != 0;
    let end = req.offset + u64::from(req.len);
    let mut descriptors: Vec<(u32, u32)> = Vec::new();
    let mut off = req.offset;
    while off < end && descriptors.len() < MAX_DESCRIPTORS {
        let n = (end - off).min(WINDOW);
        let extents = match ctx.device.map(off, n).await {
            Ok(e) => e,
            Err(e) => return failed(&e),
        };
        for e in &extents {
            push(&mut descriptors, e);
        }
        off += n;
        if one {
            break;
        }
    }
    // A success needs at least one nonzero descriptor, which a zero-length query cannot
    // have; the spec leaves such a query's outcome open, so it gets EINVAL.
    if descriptors.is_empty() {
        return Reply::error(Errno::EINVAL, "empty block status request");
    }
    descriptors.truncate(if one { 1 } else { MAX_DESCRIPTORS });
    Reply::Extents {
        context: BASE_ALLOCATION_ID,
        descriptors,
    }
}

/// Append an extent, merging it into the previous descriptor when the flags match.
fn push(out: &mut Vec<(u32, u32)>, e: &Extent) {
    let flags = if e.data { 0 } else { STATE_HOLE } | if e.zero { STATE_ZERO } else { 0 };
    // Extents lie inside the request, whose length is a u32, so the sum fits.
    let len = e.length as u32;
    match out.last_mut() {
        Some((l, f)) if *f == flags => *l += len,
        _ => out.push((len, flags)),
    }
}
