//! Persistent dirty bitmaps (qcow2.txt, "Bitmaps"): the directory, each bitmap's table and the
//! data clusters it points to all hold references (QEMU's `qcow2_check_bitmaps_refcounts`).
//!
//! ```text
//!  bitmap directory entry (8-byte aligned, variable length)
//!   0  8  bitmap_table_offset   cluster aligned
//!   8  4  bitmap_table_size     entries (u64 each)
//!  12  4  flags
//!  16  1  type, 17  1  granularity_bits
//!  18  2  name_size
//!  20  4  extra_data_size
//!  24  …  extra data, name, padding to 8
//!
//!  bitmap table entry: bits 9-55 data cluster offset (0 = none; bit 0 = all ones),
//!                      bits 1-8 and 56-63 reserved
//! ```
//!
//! Like QEMU, bitmaps only count when the autoclear "bitmaps" bit says the extension is
//! consistent (otherwise QEMU ignores the extension altogether).

use super::image::{Ctx, be_u64s};
use super::imrt::Imrt;
use super::report::CheckReport;
use super::walk::inc_range;
use crate::error::Result;
use crate::format::extensions::MAX_BITMAP_DIRECTORY_SIZE;

/// Fixed part of a directory entry.
const ENTRY_HEADER: usize = 24;
/// Bits 9-55 of a bitmap table entry.
const BME_OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
/// Reserved bits of a bitmap table entry.
const BME_RESERVED_MASK: u64 = 0xff00_0000_0000_01fe;
/// Bit 0: all bits of the cluster are set (only without an offset).
const BME_ALL_ONES: u64 = 1;
/// Bitmap table entries read at once (512 KiB), so memory does not follow the claimed size.
const TABLE_CHUNK_ENTRIES: u64 = 1 << 16;

/// Count the bitmap directory, tables and data clusters.
pub(crate) async fn count(ctx: &Ctx, rep: &mut CheckReport, imrt: &mut Imrt) -> Result<()> {
    if !ctx.header().bitmaps_consistent() {
        return Ok(());
    }
    let Some((nb, dir_size, dir_off)) = ctx.ih.bitmaps() else {
        return Ok(());
    };
    inc_range(ctx, rep, imrt, dir_off, dir_size)?;
    if dir_size > MAX_BITMAP_DIRECTORY_SIZE || dir_off.saturating_add(dir_size) > ctx.file_len {
        rep.corruption("ERROR bitmap directory is outside the image or too large");
        return Ok(());
    }
    let dir = ctx.read(dir_off, dir_size).await?;
    let Some(tables) = parse_directory(&dir, nb) else {
        rep.corruption("ERROR bitmap directory is corrupted");
        return Ok(());
    };
    for (offset, entries) in tables {
        count_table(ctx, rep, imrt, offset, entries).await?;
    }
    Ok(())
}

/// One bitmap table and its data clusters.
async fn count_table(
    ctx: &Ctx,
    rep: &mut CheckReport,
    imrt: &mut Imrt,
    offset: u64,
    entries: u64,
) -> Result<()> {
    let bytes = entries * 8;
    inc_range(ctx, rep, imrt, offset, bytes)?;
    if ctx.misaligned(offset) || offset.saturating_add(bytes) > ctx.file_len {
        rep.corruption(format!("ERROR bitmap table at {offset:#x} is corrupted"));
        return Ok(());
    }
    // A table may claim 2^32 entries of a sparse file: read it a piece at a time. Bitmaps
    // may all name one table: every piece is paid for.
    ctx.meter.expect(entries);
    let mut done = 0;
    while done < entries {
        let n = (entries - done).min(TABLE_CHUNK_ENTRIES);
        ctx.meter.spend_table(n).await?;
        for e in be_u64s(&ctx.read(offset + done * 8, n * 8).await?) {
            count_entry(ctx, rep, imrt, e)?;
        }
        done += n;
    }
    Ok(())
}

/// One bitmap table entry: check it, count its data cluster.
fn count_entry(ctx: &Ctx, rep: &mut CheckReport, imrt: &mut Imrt, e: u64) -> Result<()> {
    let data = e & BME_OFFSET_MASK;
    let bad =
        e & BME_RESERVED_MASK != 0 || ctx.misaligned(data) || (e & BME_ALL_ONES != 0 && data != 0);
    if bad {
        rep.corruption(format!("ERROR bitmap table entry {e:#x} is corrupted"));
    } else if data != 0 {
        inc_range(ctx, rep, imrt, data, ctx.cs)?;
    }
    Ok(())
}

/// The (table offset, table entries) of each of the `nb` directory entries, or `None` when
/// the directory is malformed.
pub(crate) fn parse_directory(dir: &[u8], nb: u32) -> Option<Vec<(u64, u64)>> {
    let mut out = Vec::new();
    let mut off = 0usize;
    for _ in 0..nb {
        let e = dir.get(off..off.checked_add(ENTRY_HEADER)?)?;
        let table_offset = u64::from_be_bytes(e[0..8].try_into().ok()?);
        let table_size = u32::from_be_bytes(e[8..12].try_into().ok()?);
        let name = u16::from_be_bytes(e[18..20].try_into().ok()?);
        let extra = u32::from_be_bytes(e[20..24].try_into().ok()?);
        let len = ENTRY_HEADER + usize::try_from(extra).ok()? + usize::from(name);
        off = off.checked_add(len)?.next_multiple_of(8);
        if off > dir.len().next_multiple_of(8) {
            return None;
        }
        out.push((table_offset, u64::from(table_size)));
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn directory_entries_are_walked_with_padding() {
        #[rustfmt::skip]
        let dir = [
            // entry 0: table at 0x30000, 2 entries, flags 1, type 1, granularity 16,
            // name "b0" (2 bytes), no extra data → 26 bytes, padded to 32
            0, 0, 0, 0, 0, 3, 0, 0,  0, 0, 0, 2,  0, 0, 0, 1,  1, 16,  0, 2,  0, 0, 0, 0,
            b'b', b'0', 0, 0, 0, 0, 0, 0,
            // entry 1: table at 0x40000, 1 entry, name "x"
            0, 0, 0, 0, 0, 4, 0, 0,  0, 0, 0, 1,  0, 0, 0, 0,  1, 16,  0, 1,  0, 0, 0, 0,
            b'x',
        ];
        assert_eq!(
            parse_directory(&dir, 2),
            Some(vec![(0x30000, 2), (0x40000, 1)])
        );
        assert_eq!(parse_directory(&dir, 3), None);
        assert_eq!(parse_directory(&dir[..20], 1), None);
    }
}
