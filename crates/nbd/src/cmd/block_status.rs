//! `NBD_CMD_BLOCK_STATUS` for every selected metadata context, from the same extents
//! `qemu-img map` prints:
//! - `base:allocation`: `HOLE` where no layer has data, `ZERO` where the range reads as zeros;
//! - `qemu:allocation-depth`: 0 where no layer allocates, 1 for this image, 2+ for backings;
//! - `qemu:dirty-bitmap:NAME`: 1 where the bitmap is dirty, 0 where clean (from the bitmap,
//!   not from the map; the map is skipped when only bitmaps are asked for).
//!
//! The range is mapped in windows and the reply stops after [`MAX_DESCRIPTORS`] extents (the
//! spec lets a server answer less than asked; clients continue where it stopped), so a 4 GiB
//! query over 512-byte clusters costs neither unbounded memory nor an unbounded reply.
//! Every context covers the same length: the contexts' descriptors are cut at the shortest.

use super::{Ctx, failed};
use crate::frame::{ContextStatus, Reply, Request};
use crate::meta::{Kind, MetaContext};
use crate::proto::*;
use qcow2_engine::Result;
use qcow2_engine::image::Extent;

/// Most descriptors in one reply.
pub const MAX_DESCRIPTORS: usize = 1024;
/// Bytes mapped per call into the image.
const WINDOW: u64 = 64 << 20;

/// The status of `[offset, offset + len)` (or of its first extent with `REQ_ONE`).
pub async fn run(ctx: &Ctx, req: &Request) -> Reply {
    let one = req.flags & CMD_FLAG_REQ_ONE != 0;
    let end = req.offset + u64::from(req.len);
    let mut out: Vec<ContextStatus> = ctx
        .contexts
        .iter()
        .map(|(id, _)| ContextStatus {
            context: *id,
            descriptors: Vec::new(),
        })
        .collect();
    let mut off = req.offset;
    while off < end && out.iter().all(|c| c.descriptors.len() < MAX_DESCRIPTORS) {
        let n = (end - off).min(WINDOW);
        if let Err(e) = window(ctx, off, n, &mut out).await {
            return failed(&e);
        }
        off += n;
        if one {
            break;
        }
    }
    // A success needs at least one nonzero descriptor, which a zero-length query cannot
    // have; the spec leaves such a query's outcome open, so it gets EINVAL.
    if out.iter().any(|c| c.descriptors.is_empty()) {
        return Reply::error(Errno::EINVAL, "empty block status request");
    }
    for c in &mut out {
        c.descriptors
            .truncate(if one { 1 } else { MAX_DESCRIPTORS });
    }
    equalize(&mut out);
    Reply::Extents(out)
}

/// Append every context's descriptors of `[off, off + n)` to `out`.
async fn window(ctx: &Ctx, off: u64, n: u64, out: &mut [ContextStatus]) -> Result<()> {
    let is_bitmap = |k: &Kind| matches!(k, Kind::Extra(MetaContext::DirtyBitmap(_)));
    let extents = match ctx.contexts.iter().all(|(_, k)| is_bitmap(k)) {
        true => Vec::new(),
        false => ctx.device.map(off, n).await?,
    };
    for ((_, kind), status) in ctx.contexts.iter().zip(out.iter_mut()) {
        if let Kind::Extra(MetaContext::DirtyBitmap(b)) = kind {
            let dirty = b.extents(ctx.device.as_ref(), off, n).await?;
            push_dirty(&mut status.descriptors, off, n, &dirty);
            continue;
        }
        for e in &extents {
            push(&mut status.descriptors, e.length, flags_of(kind, e));
        }
    }
    Ok(())
}

/// Append `[off, off + n)` as clean and dirty descriptors, from its sorted dirty ranges.
fn push_dirty(out: &mut Vec<(u32, u32)>, off: u64, n: u64, dirty: &[(u64, u64)]) {
    let mut pos = off;
    for &(s, l) in dirty {
        if s > pos {
            push(out, s - pos, 0);
        }
        push(out, l, STATE_DIRTY);
        pos = s + l;
    }
    if pos < off + n {
        push(out, off + n - pos, 0);
    }
}

/// The status flags of `e` in context `kind`.
fn flags_of(kind: &Kind, e: &Extent) -> u32 {
    match kind {
        Kind::Allocation => {
            (if e.data { 0 } else { STATE_HOLE }) | if e.zero { STATE_ZERO } else { 0 }
        }
        Kind::Extra(MetaContext::AllocationDepth) => match e.present {
            false => 0,
            true => e.depth.saturating_add(1),
        },
        // Bitmaps take their flags from the bitmap (see `window`), never from the map.
        Kind::Extra(MetaContext::DirtyBitmap(_)) => 0,
    }
}

/// Append `len` bytes of `flags`, merging into the previous descriptor when the flags match.
fn push(out: &mut Vec<(u32, u32)>, len: u64, flags: u32) {
    // Extents lie inside the request, whose length is a u32, so the sum fits.
    let len = u32::try_from(len).unwrap_or(u32::MAX);
    match out.last_mut() {
        Some((l, f)) if *f == flags => *l = l.saturating_add(len),
        _ => out.push((len, flags)),
    }
}

/// Cut every context's descriptors to the shortest total length, so that no context claims
/// more of the range than another (clients resume at the shortest anyway).
fn equalize(out: &mut [ContextStatus]) {
    let total = |c: &ContextStatus| c.descriptors.iter().map(|d| u64::from(d.0)).sum::<u64>();
    let Some(shortest) = out.iter().map(total).min() else {
        return;
    };
    for c in out {
        let mut covered = 0u64;
        let mut keep = 0;
        for d in &mut c.descriptors {
            if covered >= shortest {
                break;
            }
            let room = shortest - covered;
            if u64::from(d.0) > room {
                d.0 = u32::try_from(room).unwrap_or(u32::MAX);
            }
            covered += u64::from(d.0);
            keep += 1;
        }
        c.descriptors.truncate(keep);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dirty_ranges_become_descriptors() {
        let mut v = Vec::new();
        push_dirty(&mut v, 100, 100, &[(100, 10), (150, 20)]);
        assert_eq!(
            v,
            vec![(10, STATE_DIRTY), (40, 0), (20, STATE_DIRTY), (30, 0)]
        );
        // The next window continues the last descriptor when the flags match.
        push_dirty(&mut v, 200, 50, &[]);
        assert_eq!(v.last(), Some(&(80, 0)));
        let mut w = Vec::new();
        push_dirty(&mut w, 0, 64, &[(0, 64)]);
        assert_eq!(w, vec![(64, STATE_DIRTY)]);
    }

    #[test]
    fn contexts_are_cut_to_the_shortest() {
        let mut v = vec![
            ContextStatus {
                context: 1,
                descriptors: vec![(100, 0), (50, 1)],
            },
            ContextStatus {
                context: 2,
                descriptors: vec![(120, 1)],
            },
        ];
        equalize(&mut v);
        assert_eq!(v[0].descriptors, vec![(100, 0), (20, 1)]);
        assert_eq!(v[1].descriptors, vec![(120, 1)]);
    }
}
