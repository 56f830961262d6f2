//! In-place updates of the header fields an open image rewrites: the virtual size, the L1
//! table's location, the refcount table's location and the feature bits.
//!
//! Code outside `format/` never names a header offset: it asks for a [`HeaderPatch`] (the
//! field group encoded big-endian, with the offset it goes to) and writes that. Fields that
//! are switched together (L1 size + offset, refcount table offset + clusters) are adjacent on
//! disk, so each switch is one write inside the first sector: it reaches disk whole or not
//! at all, which is what makes those switches crash-safe.

#![deny(clippy::cast_possible_truncation)]

use super::{
    AUTOCLEAR_FEATURES_OFFSET, CRYPT_METHOD_OFFSET, INCOMPATIBLE_FEATURES_OFFSET, L1_SIZE_OFFSET,
    L1_TABLE_OFFSET_OFFSET, NB_SNAPSHOTS_OFFSET, REFCOUNT_TABLE_CLUSTERS_OFFSET,
    REFCOUNT_TABLE_OFFSET_OFFSET, SIZE_OFFSET, SNAPSHOTS_OFFSET_OFFSET,
};

// The grouped fields must be adjacent for their patch to be one contiguous write.
const _: () = assert!(L1_TABLE_OFFSET_OFFSET == L1_SIZE_OFFSET + 4);
const _: () = assert!(REFCOUNT_TABLE_CLUSTERS_OFFSET == REFCOUNT_TABLE_OFFSET_OFFSET + 8);
const _: () = assert!(SNAPSHOTS_OFFSET_OFFSET == NB_SNAPSHOTS_OFFSET + 4);
const _: () = assert!(CRYPT_METHOD_OFFSET == SIZE_OFFSET + 8 && L1_SIZE_OFFSET == SIZE_OFFSET + 12);

/// The largest field group: 24 bytes (size, crypt method, L1 size and offset).
const MAX_PATCH: usize = 24;

/// A few header bytes to write over the old ones at [`HeaderPatch::offset`].
///
/// ```
/// use qcow2_engine::format::header::HeaderPatch;
/// let p = HeaderPatch::size(1 << 30);
/// assert_eq!((p.offset(), p.bytes()), (24, &(1u64 << 30).to_be_bytes()[..]));
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HeaderPatch {
    offset: usize,
    len: usize,
    bytes: [u8; MAX_PATCH],
}

impl HeaderPatch {
    /// `size`: the virtual disk size in bytes.
    pub fn size(size: u64) -> HeaderPatch {
        Self::u64_at(SIZE_OFFSET, size)
    }

    /// `l1_size` and `l1_table_offset` together (bytes 36..48): switches the L1 table.
    pub fn l1_table(entries: u32, offset: u64) -> HeaderPatch {
        let mut p = Self::empty(L1_SIZE_OFFSET, 12);
        p.bytes[..4].copy_from_slice(&entries.to_be_bytes());
        p.bytes[4..12].copy_from_slice(&offset.to_be_bytes());
        p
    }

    /// `refcount_table_offset` and `refcount_table_clusters` together (bytes 48..60):
    /// switches the refcount table.
    pub fn refcount_table(offset: u64, clusters: u32) -> HeaderPatch {
        let mut p = Self::empty(REFCOUNT_TABLE_OFFSET_OFFSET, 12);
        p.bytes[..8].copy_from_slice(&offset.to_be_bytes());
        p.bytes[8..12].copy_from_slice(&clusters.to_be_bytes());
        p
    }

    /// `nb_snapshots` and `snapshots_offset` together (bytes 60..72): switches the snapshot
    /// table.
    pub fn snapshot_table(count: u32, offset: u64) -> HeaderPatch {
        let mut p = Self::empty(NB_SNAPSHOTS_OFFSET, 12);
        p.bytes[..4].copy_from_slice(&count.to_be_bytes());
        p.bytes[4..12].copy_from_slice(&offset.to_be_bytes());
        p
    }

    /// `size`, `crypt_method` (rewritten unchanged), `l1_size` and `l1_table_offset` together
    /// (bytes 24..48): switches the L1 table and the virtual size in one write, as applying a
    /// snapshot needs.
    pub fn size_and_l1_table(
        size: u64,
        crypt_method: u32,
        entries: u32,
        offset: u64,
    ) -> HeaderPatch {
        let mut p = Self::empty(SIZE_OFFSET, 24);
        p.bytes[..8].copy_from_slice(&size.to_be_bytes());
        p.bytes[8..12].copy_from_slice(&crypt_method.to_be_bytes());
        p.bytes[12..16].copy_from_slice(&entries.to_be_bytes());
        p.bytes[16..24].copy_from_slice(&offset.to_be_bytes());
        p
    }

    /// `incompatible_features` (version 3 only).
    pub fn incompatible_features(bits: u64) -> HeaderPatch {
        Self::u64_at(INCOMPATIBLE_FEATURES_OFFSET, bits)
    }

    /// `autoclear_features` (version 3 only).
    pub fn autoclear_features(bits: u64) -> HeaderPatch {
        Self::u64_at(AUTOCLEAR_FEATURES_OFFSET, bits)
    }

    /// Byte offset of the patch in the image file (inside the header).
    pub fn offset(&self) -> u64 {
        self.offset as u64
    }

    /// The encoded field bytes.
    pub fn bytes(&self) -> &[u8] {
        &self.bytes[..self.len]
    }

    /// Apply the patch to an encoded header (`buf` at least as long as the patched field).
    /// Returns `false`, leaving `buf` alone, when `buf` is too short.
    pub fn apply(&self, buf: &mut [u8]) -> bool {
        match buf.get_mut(self.offset..self.offset + self.len) {
            Some(dst) => {
                dst.copy_from_slice(self.bytes());
                true
            }
            None => false,
        }
    }

    fn empty(offset: usize, len: usize) -> HeaderPatch {
        HeaderPatch {
            offset,
            len,
            bytes: [0; MAX_PATCH],
        }
    }

    fn u64_at(offset: usize, v: u64) -> HeaderPatch {
        let mut p = Self::empty(offset, 8);
        p.bytes[..8].copy_from_slice(&v.to_be_bytes());
        p
    }
}

#[cfg(test)]
mod tests {
    use super::super::Header;
    use super::*;

    /// A patch applied to an encoded header gives the encoding of the updated header.
    fn assert_patch_encodes(p: HeaderPatch, update: impl FnOnce(&mut Header)) {
        let mut bytes = super::super::tests::v3_fixture();
        let mut h = Header::from_bytes(&bytes).unwrap();
        assert!(p.apply(&mut bytes));
        update(&mut h);
        assert_eq!(bytes, h.to_bytes());
    }

    #[test]
    fn each_patch_writes_exactly_its_fields() {
        assert_patch_encodes(HeaderPatch::size(5 << 40), |h| h.size = 5 << 40);
        assert_patch_encodes(HeaderPatch::l1_table(0x1234_5678, 0xdead_0000), |h| {
            h.l1_size = 0x1234_5678;
            h.l1_table_offset = 0xdead_0000;
        });
        assert_patch_encodes(HeaderPatch::refcount_table(0xbeef_0000, 7), |h| {
            h.refcount_table_offset = 0xbeef_0000;
            h.refcount_table_clusters = 7;
        });
        assert_patch_encodes(HeaderPatch::snapshot_table(3, 0xabc_0000), |h| {
            h.nb_snapshots = 3;
            h.snapshots_offset = 0xabc_0000;
        });
        assert_patch_encodes(
            HeaderPatch::size_and_l1_table(7 << 30, 0, 9, 0x5_0000),
            |h| {
                h.size = 7 << 30;
                h.l1_size = 9;
                h.l1_table_offset = 0x5_0000;
            },
        );
        assert_patch_encodes(HeaderPatch::incompatible_features(2), |h| {
            h.incompatible_features = 2
        });
        assert_patch_encodes(HeaderPatch::autoclear_features(3), |h| {
            h.autoclear_features = 3
        });
    }

    #[test]
    fn the_switches_are_one_write_inside_the_first_sector() {
        let l1 = HeaderPatch::l1_table(1, 2);
        let rt = HeaderPatch::refcount_table(1, 2);
        assert_eq!((l1.offset(), l1.bytes().len()), (36, 12));
        assert_eq!((rt.offset(), rt.bytes().len()), (48, 12));
        assert!(!HeaderPatch::autoclear_features(1).apply(&mut [0u8; 90]));
    }
}
