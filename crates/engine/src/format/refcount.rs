//! Refcount blocks and the refcount table (qcow2.txt, "Host cluster management").
//!
//! Every host cluster has a reference count; 0 = free, 1 = used, ≥ 2 = shared (writes COW).
//! The refcount table is a contiguous array of big-endian `u64` entries, each pointing at a
//! one-cluster refcount block:
//!
//! ```text
//!  refcount table entry
//!  bits    field               meaning
//!  0 - 8   reserved            must be 0
//!  9 - 63  refcount block      host offset of the block, cluster aligned; 0 = not allocated
//!                              (every refcount it would hold is 0)
//! ```
//!
//! A refcount block is an array of `cluster_size * 8 / refcount_bits` entries, with
//! `refcount_bits = 1 << refcount_order` (order 0..=6, widths 1..=64; v2 is always 16):
//!
//! ```text
//!  width     entry i lives at                                     encoding
//!  1, 2, 4   byte i*w/8, bits (i*w)%8 .. +w (bit 0 = LSB first)   packed little-end-first
//!  8         byte i                                               u8
//!  16/32/64  bytes i*w/8 .. +w/8                                  big-endian
//! ```
//!
//! e.g. 2-bit refcounts `[1, 2, 3, 0]` pack into the byte `0b00_11_10_01` = 0x39.
//!
//! Lookup: `block_index = (offset / cluster_size) % entries_per_block`,
//! `table_index = (offset / cluster_size) / entries_per_block`.

use crate::error::{Error, ErrorKind, Result};
use crate::units::HostOffset;

/// Bits 9-63 of a refcount table entry: the refcount block offset.
pub const REFT_OFFSET_MASK: u64 = 0xffff_ffff_ffff_fe00;
/// Bits 0-8 of a refcount table entry: reserved, must be 0.
pub const REFT_RESERVED_MASK: u64 = 0x1ff;
/// Largest valid `refcount_order`.
pub const MAX_REFCOUNT_ORDER: u32 = 6;
/// Size of one refcount table entry in bytes.
pub const REFT_ENTRY_SIZE: usize = 8;

/// The largest refcount a `1 << order`-bit entry holds; 0 for an invalid order (> 6).
pub fn max_refcount(order: u32) -> u64 {
    match order {
        0..=5 => (1u64 << (1u32 << order)) - 1,
        6 => u64::MAX,
        _ => 0,
    }
}

/// Refcount entries in one block of `cluster_size` bytes; 0 for an invalid order.
pub fn entries_per_block(cluster_size: u64, order: u32) -> u64 {
    if order > MAX_REFCOUNT_ORDER {
        return 0;
    }
    // cluster_size * 8 / width, without overflowing for absurd cluster sizes.
    (cluster_size >> order)
        .saturating_mul(8)
        .saturating_add(((cluster_size & ((1 << order) - 1)) * 8) >> order)
}

/// Where entry `index` of a block lives: (first byte, bit shift within it, width in bits).
/// `None` for an invalid order or an index whose bytes lie outside `len`.
fn locate(len: usize, index: u64, order: u32) -> Option<(usize, u32, u32)> {
    if order > MAX_REFCOUNT_ORDER {
        return None;
    }
    let width = 1u32 << order;
    let bit = index.checked_mul(u64::from(width))?;
    let byte = usize::try_from(bit / 8).ok()?;
    let bytes = (width as usize).div_ceil(8);
    (byte.checked_add(bytes)? <= len).then_some((byte, (bit % 8) as u32, width))
}

/// Refcount `index` of `block` with entry width `1 << order` bits. Returns 0 when the index
/// is outside the block or `order` > 6 (callers validate both against the header).
pub fn get(block: &[u8], index: u64, order: u32) -> u64 {
    let Some((byte, shift, width)) = locate(block.len(), index, order) else {
        return 0;
    };
    if width < 8 {
        return u64::from(block[byte] >> shift) & max_refcount(order);
    }
    let mut be = [0u8; 8];
    let n = width as usize / 8;
    be[8 - n..].copy_from_slice(&block[byte..byte + n]);
    u64::from_be_bytes(be)
}

/// Store `value` as refcount `index` of `block`. InvalidArgument when `value` exceeds
/// [`max_refcount`] or `order` > 6; OutOfRange when the index is outside the block.
pub fn set(block: &mut [u8], index: u64, order: u32, value: u64) -> Result<()> {
    if order > MAX_REFCOUNT_ORDER {
        return Err(Error::invalid_arg(format!("refcount order {order} > 6")));
    }
    if value > max_refcount(order) {
        return Err(Error::invalid_arg(format!(
            "refcount {value} does not fit {} bits",
            1u32 << order
        )));
    }
    let Some((byte, shift, width)) = locate(block.len(), index, order) else {
        return Err(Error::new(
            ErrorKind::OutOfRange,
            format!("refcount index {index} outside the block"),
        ));
    };
    if width < 8 {
        // Sub-byte widths: the maximum and the (range-checked) value fit in `width` bits.
        #[allow(clippy::cast_possible_truncation)]
        let (max, value) = (max_refcount(order) as u8, value as u8);
        let mask = max << shift;
        block[byte] = (block[byte] & !mask) | (value << shift);
    } else {
        let n = width as usize / 8;
        block[byte..byte + n].copy_from_slice(&value.to_be_bytes()[8 - n..]);
    }
    Ok(())
}

/// One raw refcount table entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct RefTableEntry(pub u64);

impl RefTableEntry {
    /// An entry pointing at the refcount block at `block` (bits 0-8 are dropped).
    pub fn new(block: HostOffset) -> RefTableEntry {
        RefTableEntry(block.0 & REFT_OFFSET_MASK)
    }

    /// The refcount block's host offset, or `None` when not allocated.
    pub fn block_offset(self) -> Option<HostOffset> {
        match self.0 & REFT_OFFSET_MASK {
            0 => None,
            off => Some(HostOffset(off)),
        }
    }

    /// Corrupt when reserved bits 0-8 are set or the block offset is not cluster aligned
    /// (`cluster_size` is a power of two).
    pub fn validate(self, cluster_size: u64) -> Result<()> {
        if self.0 & REFT_RESERVED_MASK != 0 {
            return Err(Error::corrupt("refcount table entry has reserved bits set")
                .at_host(HostOffset(self.0)));
        }
        if self.0 & cluster_size.wrapping_sub(1) != 0 {
            return Err(
                Error::corrupt("refcount block offset is not cluster aligned")
                    .at_host(HostOffset(self.0)),
            );
        }
        Ok(())
    }
}

/// Decode a refcount table: one entry per whole 8 bytes of `buf`.
pub fn parse_table(buf: &[u8]) -> Vec<RefTableEntry> {
    buf.chunks_exact(REFT_ENTRY_SIZE)
        .map(|c| {
            let mut b = [0u8; 8];
            b.copy_from_slice(c);
            RefTableEntry(u64::from_be_bytes(b))
        })
        .collect()
}

/// Encode `entries` into `out` from its start, as many as fit; returns how many were written.
pub fn write_table(entries: &[RefTableEntry], out: &mut [u8]) -> usize {
    let mut n = 0;
    for (e, chunk) in entries.iter().zip(out.chunks_exact_mut(REFT_ENTRY_SIZE)) {
        chunk.copy_from_slice(&e.0.to_be_bytes());
        n += 1;
    }
    n
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn max_and_entries_per_block() {
        let max = [1, 3, 15, 255, 65535, 0xffff_ffff, u64::MAX];
        for (order, m) in max.iter().enumerate() {
            assert_eq!(max_refcount(order as u32), *m);
        }
        assert_eq!(max_refcount(7), 0);
        assert_eq!(entries_per_block(65536, 4), 32768);
        assert_eq!(entries_per_block(65536, 0), 524288);
        assert_eq!(entries_per_block(512, 6), 64);
        assert_eq!(entries_per_block(65536, 7), 0);
        assert_eq!(entries_per_block(u64::MAX, 0), u64::MAX);
    }

    #[test]
    fn one_bit_entries_lsb_first() {
        // refcounts of clusters 0..8 = 1,0,1,1,0,0,0,1 → bits 0,2,3,7 → 0x8d; cluster 8 = 1
        let block = [0x8d, 0x01];
        let got: Vec<u64> = (0..9).map(|i| get(&block, i, 0)).collect();
        assert_eq!(got, [1, 0, 1, 1, 0, 0, 0, 1, 1]);
    }

    #[test]
    fn two_bit_entries_lsb_first() {
        // byte 0 = 0b00_11_10_01: entry 0 = 1 (bits 0-1), 1 = 2, 2 = 3, 3 = 0 (bits 6-7)
        // byte 1 = 0b11_00_00_00: entry 7 = 3
        let block = [0x39, 0xc0];
        let got: Vec<u64> = (0..8).map(|i| get(&block, i, 1)).collect();
        assert_eq!(got, [1, 2, 3, 0, 0, 0, 0, 3]);
    }

    #[test]
    fn four_bit_entries_lsb_first() {
        // byte 0 = 0xa5: entry 0 = 5 (low nibble), entry 1 = 10 (high nibble)
        let block = [0xa5, 0x0f];
        let got: Vec<u64> = (0..4).map(|i| get(&block, i, 2)).collect();
        assert_eq!(got, [5, 10, 15, 0]);
    }

    #[test]
    fn byte_and_big_endian_entries() {
        let block = [0x01, 0x02, 0x03, 0x04, 0x05, 0x06, 0x07, 0x08];
        assert_eq!(get(&block, 2, 3), 0x03);
        assert_eq!(get(&block, 1, 4), 0x0304); // 16-bit entry 1 = bytes 2-3
        assert_eq!(get(&block, 1, 5), 0x0506_0708); // 32-bit entry 1 = bytes 4-7
        assert_eq!(get(&block, 0, 6), 0x0102_0304_0506_0708);
    }

    #[test]
    fn set_sub_byte_keeps_neighbours() {
        let mut block = [0xffu8; 2];
        set(&mut block, 1, 1, 0).unwrap(); // 2-bit entry 1 = bits 2-3 of byte 0
        assert_eq!(block, [0xf3, 0xff]);
        set(&mut block, 3, 2, 0x6).unwrap(); // 4-bit entry 3 = high nibble of byte 1
        assert_eq!(block, [0xf3, 0x6f]);
        set(&mut block, 9, 0, 0).unwrap(); // 1-bit entry 9 = bit 1 of byte 1
        assert_eq!(block, [0xf3, 0x6d]);
    }

    #[test]
    fn set_get_round_trip_every_width() {
        for order in 0..=6u32 {
            let mut block = vec![0u8; 64];
            let n = entries_per_block(64, order);
            let vals: Vec<u64> = (0..n)
                .map(|i| i.wrapping_mul(0x9e37_79b9_7f4a_7c15) & max_refcount(order))
                .collect();
            for (i, v) in vals.iter().enumerate() {
                set(&mut block, i as u64, order, *v).unwrap();
            }
            for (i, v) in vals.iter().enumerate() {
                assert_eq!(get(&block, i as u64, order), *v, "order {order} entry {i}");
            }
        }
    }

    #[test]
    fn set_big_endian_literal() {
        let mut block = [0u8; 4];
        set(&mut block, 1, 4, 0x1234).unwrap();
        assert_eq!(block, [0x00, 0x00, 0x12, 0x34]);
    }

    #[test]
    fn set_value_too_large_is_invalid_argument() {
        let mut block = [0u8; 8];
        let err = set(&mut block, 0, 1, 4).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::InvalidArgument);
        assert_eq!(block, [0u8; 8]);
        assert_eq!(
            set(&mut block, 0, 4, 0x1_0000).unwrap_err().kind(),
            ErrorKind::InvalidArgument
        );
    }

    #[test]
    fn bad_order_is_invalid_argument() {
        let mut block = [0u8; 8];
        assert_eq!(
            set(&mut block, 0, 7, 0).unwrap_err().kind(),
            ErrorKind::InvalidArgument
        );
        assert_eq!(get(&block, 0, 7), 0);
    }

    #[test]
    fn index_out_of_range() {
        let mut block = [0xffu8; 8];
        assert_eq!(get(&block, 4, 4), 0);
        assert_eq!(get(&block, 64, 0), 0);
        assert_eq!(get(&block, u64::MAX, 6), 0);
        assert_eq!(
            set(&mut block, 4, 4, 1).unwrap_err().kind(),
            ErrorKind::OutOfRange
        );
        assert_eq!(
            set(&mut block, u64::MAX, 0, 1).unwrap_err().kind(),
            ErrorKind::OutOfRange
        );
        assert_eq!(block, [0xffu8; 8]);
    }

    #[test]
    fn reftable_literal_and_identity() {
        #[rustfmt::skip]
        let buf = [
            // entry 0: refcount block at 0x10000
            0x00, 0x00, 0x00, 0x00, 0x00, 0x01, 0x00, 0x00,
            // entry 1: not allocated
            0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00,
            // entry 2: block at 0xff00_0000_0000_0000 (beyond 56 bits is allowed here)
            0xff, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00,
        ];
        let t = parse_table(&buf);
        assert_eq!(t[0].block_offset(), Some(HostOffset(0x10000)));
        assert_eq!(t[1].block_offset(), None);
        assert_eq!(t[2].block_offset(), Some(HostOffset(0xff00_0000_0000_0000)));
        for e in &t {
            e.validate(65536).unwrap();
        }
        let mut out = [0u8; 24];
        assert_eq!(write_table(&t, &mut out), 3);
        assert_eq!(out, buf);
        assert_eq!(RefTableEntry::new(HostOffset(0x10000)), t[0]);
    }

    #[test]
    fn reftable_reserved_bits_are_corrupt() {
        let err = RefTableEntry(0x1_0001).validate(65536).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Corrupt);
        // Even with no block.
        assert!(RefTableEntry(0x100).validate(65536).is_err());
    }

    #[test]
    fn reftable_unaligned_block_is_corrupt() {
        let err = RefTableEntry(0x1_0200).validate(65536).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Corrupt);
        RefTableEntry(0x1_0200).validate(512).unwrap();
    }

    #[test]
    fn write_table_stops_at_end_of_buffer() {
        let mut out = [0u8; 7];
        assert_eq!(write_table(&[RefTableEntry(1)], &mut out), 0);
    }
}
