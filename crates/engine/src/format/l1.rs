//! L1 table entries: the first level of the guest → host cluster mapping.
//!
//! The L1 table is a contiguous array of big-endian `u64` entries, one per L2 table
//! (qcow2.txt, "Cluster mapping"). Each entry:
//!
//! ```text
//!  bits    field              meaning
//!  0 - 8   reserved           must be 0 (QEMU's read path ignores them; `check` reports them)
//!  9 - 55  L2 table offset    host offset of the L2 table, cluster aligned; 0 = no L2 table,
//!                             every cluster it would describe is unallocated
//! 56 - 62  reserved           must be 0
//!     63   COPIED             1 = the L2 table's refcount is exactly one (write in place);
//!                             only accurate in the active L1 table
//! ```

use crate::error::{Error, Result};
use crate::units::HostOffset;

/// Bit 63: the L2 table's refcount is exactly one.
pub const L1E_COPIED: u64 = 1 << 63;
/// Bits 9-55: the host offset of the L2 table.
pub const L1E_OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
/// Bits 0-8 and 56-62: reserved, must be zero.
pub const L1E_RESERVED_MASK: u64 = 0x7f00_0000_0000_01ff;
/// Size of one L1 entry in bytes.
pub const L1E_SIZE: usize = 8;

/// One raw L1 table entry, exactly as stored on disk (host byte order in memory).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct L1Entry(pub u64);

impl L1Entry {
    /// An entry pointing at the L2 table at `l2` (only bits 9-55 are kept), with the COPIED flag.
    pub fn new(l2: HostOffset, copied: bool) -> L1Entry {
        let flag = if copied { L1E_COPIED } else { 0 };
        L1Entry((l2.0 & L1E_OFFSET_MASK) | flag)
    }

    /// The host offset of the L2 table, or `None` when the offset bits are 0 (no L2 table).
    pub fn l2_offset(self) -> Option<HostOffset> {
        match self.0 & L1E_OFFSET_MASK {
            0 => None,
            off => Some(HostOffset(off)),
        }
    }

    /// Whether the COPIED flag (bit 63) is set: the L2 table may be modified in place.
    pub fn copied(self) -> bool {
        self.0 & L1E_COPIED != 0
    }

    /// The reserved bits that are set (0 for a well-formed entry). QEMU ignores them when
    /// reading and `qemu-img check` counts them as corruption; [`validate`](Self::validate)
    /// does not reject them so images QEMU reads stay readable.
    pub fn reserved_bits(self) -> u64 {
        self.0 & L1E_RESERVED_MASK
    }

    /// Check the entry against the image's cluster size: the L2 offset must be cluster
    /// aligned (an unaligned L2 table is a [`Corrupt`](crate::error::ErrorKind::Corrupt) error,
    /// as in QEMU). `cluster_size` must be a power of two.
    pub fn validate(self, cluster_size: u64) -> Result<()> {
        let off = self.0 & L1E_OFFSET_MASK;
        if off & cluster_size.wrapping_sub(1) != 0 {
            return Err(
                Error::corrupt("L2 table offset in L1 entry is not cluster aligned")
                    .at_host(HostOffset(off)),
            );
        }
        Ok(())
    }
}

/// Decode an L1 table from its on-disk bytes: one entry per whole 8 bytes of `buf`
/// (a trailing partial entry is ignored).
pub fn parse_table(buf: &[u8]) -> Vec<L1Entry> {
    buf.chunks_exact(L1E_SIZE)
        .map(|c| L1Entry(be_u64(c)))
        .collect()
}

/// Encode `entries` into `out`, 8 big-endian bytes each, starting at `out[0]`.
/// Writes as many entries as fit in `out` and returns that count; bytes of `out` past the
/// last written entry are left untouched.
pub fn write_table(entries: &[L1Entry], out: &mut [u8]) -> usize {
    let mut n = 0;
    for (e, chunk) in entries.iter().zip(out.chunks_exact_mut(L1E_SIZE)) {
        chunk.copy_from_slice(&e.0.to_be_bytes());
        n += 1;
    }
    n
}

/// Read a big-endian `u64` from an 8-byte chunk.
fn be_u64(chunk: &[u8]) -> u64 {
    let mut b = [0u8; 8];
    b.copy_from_slice(chunk);
    u64::from_be_bytes(b)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::ErrorKind;

    const CLUSTER: u64 = 65536;

    #[test]
    fn parse_literal_entries() {
        #[rustfmt::skip]
        let buf = [
            // entry 0: COPIED | L2 table at 0x30000
            0x80, 0x00, 0x00, 0x00, 0x00, 0x03, 0x00, 0x00,
            // entry 1: no L2 table
            0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00,
            // entry 2: L2 table at 0x00ff_ffff_ffff_0000 without COPIED (shared)
            0x00, 0xff, 0xff, 0xff, 0xff, 0xff, 0x00, 0x00,
            // trailing partial entry: ignored
            0xaa, 0xbb,
        ];
        let t = parse_table(&buf);
        assert_eq!(t.len(), 3);
        assert_eq!(t[0].l2_offset(), Some(HostOffset(0x30000)));
        assert!(t[0].copied());
        assert_eq!(t[1].l2_offset(), None);
        assert!(!t[1].copied());
        assert_eq!(t[2].l2_offset(), Some(HostOffset(0x00ff_ffff_ffff_0000)));
        assert!(!t[2].copied());
        for e in &t {
            e.validate(CLUSTER).unwrap();
        }
    }

    #[test]
    fn new_then_write_then_parse_is_identity() {
        let entries = [
            L1Entry::new(HostOffset(0x30000), true),
            L1Entry::new(HostOffset(0), false),
            L1Entry::new(HostOffset(0x1234_0000), false),
        ];
        let mut out = [0u8; 24];
        assert_eq!(write_table(&entries, &mut out), 3);
        assert_eq!(&out[0..8], &[0x80, 0, 0, 0, 0, 0x03, 0, 0]);
        assert_eq!(parse_table(&out), entries);
    }

    #[test]
    fn new_masks_non_offset_bits() {
        let e = L1Entry::new(HostOffset(0xff00_0000_0003_01ff), false);
        assert_eq!(e.0, 0x0000_0000_0003_0000);
        assert_eq!(e.reserved_bits(), 0);
    }

    #[test]
    fn write_table_stops_at_end_of_buffer() {
        let entries = [L1Entry(1), L1Entry(2)];
        let mut out = [0xeeu8; 12];
        assert_eq!(write_table(&entries, &mut out), 1);
        assert_eq!(out, [0, 0, 0, 0, 0, 0, 0, 1, 0xee, 0xee, 0xee, 0xee]);
    }

    #[test]
    fn unaligned_l2_offset_is_corrupt() {
        // L2 table at 0x30200: 512-byte aligned but not 64 KiB aligned.
        let e = L1Entry(0x8000_0000_0003_0200);
        let err = e.validate(CLUSTER).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Corrupt);
        assert_eq!(err.offset(), Some(0x30200));
        // Fine with 512-byte clusters.
        e.validate(512).unwrap();
    }

    #[test]
    fn reserved_bits_are_reported_not_rejected() {
        // bit 0 and bit 56 set on an otherwise valid entry
        let e = L1Entry(0x0100_0000_0003_0001);
        assert_eq!(e.reserved_bits(), 0x0100_0000_0000_0001);
        assert_eq!(e.l2_offset(), Some(HostOffset(0x30000)));
        e.validate(CLUSTER).unwrap();
    }

    #[test]
    fn validate_with_bogus_cluster_size_does_not_panic() {
        let _ = L1Entry(0x30000).validate(0);
    }
}
