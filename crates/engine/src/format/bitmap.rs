//! Persistent dirty bitmaps (qcow2.txt, "Bitmaps"): the bitmap directory and bitmap tables.
//!
//! ```text
//!  bitmap directory entry (8-byte aligned, variable length)
//!   offset size field
//!    0     8   bitmap_table_offset   cluster aligned, not 0
//!    8     4   bitmap_table_size     entries (u64 each) of the bitmap table
//!   12     4   flags                 bit 0 in_use, 1 auto, 2 extra_data_compatible
//!   16     1   type                  1 = dirty tracking bitmap
//!   17     1   granularity_bits      one bit per 2^granularity_bits guest bytes
//!   18     2   name_size             1..=1023
//!   20     4   extra_data_size
//!   24     …   extra data, then the name (no NUL), then zero padding to a multiple of 8
//!
//!  bitmap table entry (u64)
//!   bit  0     all ones (only when bits 9-55 are 0; else reserved, 0)
//!   bits 1-8   reserved, 0
//!   bits 9-55  data cluster offset (0 = no cluster: all zeros, or all ones by bit 0)
//!   bits 56-63 reserved, 0
//!
//!  bitmap data: bit j of byte i describes guest chunk 8 * i + j (least significant first)
//! ```
//!
//! The limits are QEMU's (`block/qcow2-bitmap.c`): what QEMU refuses to load, we refuse too.

use crate::error::{Error, Result};
use crate::format::extensions::{MAX_BITMAP_DIRECTORY_SIZE, MAX_BITMAPS};

/// Fixed part of a directory entry.
pub const ENTRY_HEADER_SIZE: usize = 24;
/// Flag bit 0: the bitmap was not stored cleanly and may be inconsistent.
pub const FLAG_IN_USE: u32 = 1;
/// Flag bit 1: the bitmap is enabled (tracks every write).
pub const FLAG_AUTO: u32 = 1 << 1;
/// Flag bit 2: unknown extra data may be ignored.
pub const FLAG_EXTRA_DATA_COMPATIBLE: u32 = 1 << 2;
/// Flags we know; any other bit refuses the bitmap.
pub const KNOWN_FLAGS: u32 = FLAG_IN_USE | FLAG_AUTO | FLAG_EXTRA_DATA_COMPATIBLE;
/// The only bitmap type: dirty tracking.
pub const TYPE_DIRTY_TRACKING: u8 = 1;
/// Smallest granularity QEMU supports: 512 bytes.
pub const MIN_GRANULARITY_BITS: u8 = 9;
/// Largest granularity QEMU supports: 2 GiB.
pub const MAX_GRANULARITY_BITS: u8 = 31;
/// Longest bitmap name QEMU supports.
pub const MAX_NAME_SIZE: usize = 1023;
/// QEMU's limit on bitmap table entries.
pub const MAX_TABLE_SIZE: u64 = 0x800_0000;
/// QEMU's limit on one bitmap's data (bytes of bitmap, i.e. 2^32 bits).
pub const MAX_PHYS_SIZE: u64 = 0x2000_0000;
/// Bits 9-55 of a table entry: the data cluster offset.
const TABLE_OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
/// Reserved bits of a table entry (bit 0 is checked separately).
const TABLE_RESERVED_MASK: u64 = 0xff00_0000_0000_01fe;

/// One bitmap directory entry, decoded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BitmapEntry {
    /// Cluster aligned offset of the bitmap table.
    pub table_offset: u64,
    /// Entries in the bitmap table.
    pub table_size: u32,
    /// Flag bits ([`FLAG_IN_USE`], [`FLAG_AUTO`], [`FLAG_EXTRA_DATA_COMPATIBLE`]).
    pub flags: u32,
    /// Bitmap type ([`TYPE_DIRTY_TRACKING`]).
    pub kind: u8,
    /// log2 of the granularity in bytes.
    pub granularity_bits: u8,
    /// Type-specific extra data, kept verbatim.
    pub extra_data: Vec<u8>,
    /// The bitmap's name (unique in the directory).
    pub name: String,
}

/// Big-endian integers from `b` at fixed offsets (the caller checked the length).
fn be<const N: usize>(b: &[u8], off: usize) -> [u8; N] {
    let mut a = [0u8; N];
    a.copy_from_slice(&b[off..off + N]);
    a
}

impl BitmapEntry {
    /// Decode the entry at the start of `b`; returns it and its padded length.
    pub fn from_bytes(b: &[u8]) -> Result<(BitmapEntry, usize)> {
        let Some(h) = b.get(..ENTRY_HEADER_SIZE) else {
            return Err(Error::invalid("bitmap directory entry truncated"));
        };
        let name_size = usize::from(u16::from_be_bytes(be(h, 18)));
        let extra_size = usize::try_from(u32::from_be_bytes(be(h, 20)))
            .map_err(|_| Error::invalid("bitmap extra data too large"))?;
        let end = ENTRY_HEADER_SIZE
            .checked_add(extra_size)
            .and_then(|n| n.checked_add(name_size))
            .filter(|&n| n <= b.len())
            .ok_or_else(|| Error::invalid("bitmap directory entry truncated"))?;
        let extra_end = ENTRY_HEADER_SIZE + extra_size;
        let name = String::from_utf8(b[extra_end..end].to_vec())
            .map_err(|_| Error::unsupported("bitmap name is not valid UTF-8"))?;
        let entry = BitmapEntry {
            table_offset: u64::from_be_bytes(be(h, 0)),
            table_size: u32::from_be_bytes(be(h, 8)),
            flags: u32::from_be_bytes(be(h, 12)),
            kind: h[16],
            granularity_bits: h[17],
            extra_data: b[ENTRY_HEADER_SIZE..extra_end].to_vec(),
            name,
        };
        Ok((entry, end.next_multiple_of(8)))
    }

    /// Encode the entry with its zero padding.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.encoded_len());
        out.extend_from_slice(&self.table_offset.to_be_bytes());
        out.extend_from_slice(&self.table_size.to_be_bytes());
        out.extend_from_slice(&self.flags.to_be_bytes());
        out.extend_from_slice(&[self.kind, self.granularity_bits]);
        // validate() bounds the name to 1023 bytes; a longer one is cut, never wrapped.
        let name_len = u16::try_from(self.name.len()).unwrap_or(u16::MAX);
        out.extend_from_slice(&name_len.to_be_bytes());
        let extra_len = u32::try_from(self.extra_data.len()).unwrap_or(u32::MAX);
        out.extend_from_slice(&extra_len.to_be_bytes());
        out.extend_from_slice(&self.extra_data);
        out.extend_from_slice(&self.name.as_bytes()[..usize::from(name_len)]);
        out.resize(out.len().next_multiple_of(8), 0);
        out
    }

    /// Length of [`BitmapEntry::to_bytes`].
    pub fn encoded_len(&self) -> usize {
        (ENTRY_HEADER_SIZE + self.extra_data.len() + self.name.len()).next_multiple_of(8)
    }

    /// Granularity in bytes.
    pub fn granularity(&self) -> u64 {
        1u64 << self.granularity_bits.min(63)
    }

    /// Whether `flag` is set.
    pub fn has(&self, flag: u32) -> bool {
        self.flags & flag != 0
    }

    /// QEMU's rules for an entry of an image with `cluster_size` and `virtual_size`.
    pub fn validate(&self, cluster_size: u64, virtual_size: u64) -> Result<()> {
        let bad = |what: String| Err(Error::invalid(format!("bitmap '{}': {what}", self.name)));
        if self.name.is_empty() || self.name.len() > MAX_NAME_SIZE {
            return bad(format!("name of {} bytes (1..=1023)", self.name.len()));
        }
        if self.flags & !KNOWN_FLAGS != 0 {
            return bad(format!("unknown flags {:#x}", self.flags & !KNOWN_FLAGS));
        }
        if self.kind != TYPE_DIRTY_TRACKING {
            return bad(format!("unknown type {}", self.kind));
        }
        if !(MIN_GRANULARITY_BITS..=MAX_GRANULARITY_BITS).contains(&self.granularity_bits) {
            return bad(format!("granularity bits {}", self.granularity_bits));
        }
        if !self.extra_data.is_empty() && !self.has(FLAG_EXTRA_DATA_COMPATIBLE) {
            return bad("incompatible extra data".into());
        }
        if self.table_offset == 0 || self.table_offset % cluster_size != 0 {
            return bad(format!("table offset {:#x} misaligned", self.table_offset));
        }
        let want = table_size_for(virtual_size, self.granularity_bits, cluster_size)?;
        if u64::from(self.table_size) != want {
            return bad(format!(
                "table of {} entries, expected {want}",
                self.table_size
            ));
        }
        Ok(())
    }
}

/// Bytes of bitmap data for a disk of `virtual_size` at 2^`granularity_bits` bytes per bit.
pub fn data_bytes_for(virtual_size: u64, granularity_bits: u8) -> u64 {
    let bits = virtual_size.div_ceil(1u64 << granularity_bits.min(63));
    bits.div_ceil(8)
}

/// Entries of the bitmap table of such a bitmap; refused past QEMU's limits.
pub fn table_size_for(virtual_size: u64, granularity_bits: u8, cluster_size: u64) -> Result<u64> {
    let bytes = data_bytes_for(virtual_size, granularity_bits);
    let entries = bytes.div_ceil(cluster_size);
    if bytes > MAX_PHYS_SIZE || entries > MAX_TABLE_SIZE {
        return Err(Error::invalid(format!(
            "a bitmap of {bytes} bytes is larger than QEMU's limit ({MAX_PHYS_SIZE})"
        )));
    }
    Ok(entries)
}

/// Decode the `nb` entries of a bitmap directory (`dir` is its whole area) and check that
/// names are unique. Entries are not validated against the image; see
/// [`BitmapEntry::validate`].
pub fn parse_directory(dir: &[u8], nb: u32) -> Result<Vec<BitmapEntry>> {
    if nb > MAX_BITMAPS || dir.len() as u64 > MAX_BITMAP_DIRECTORY_SIZE {
        return Err(Error::invalid("bitmap directory too large"));
    }
    let mut out: Vec<BitmapEntry> = Vec::new();
    let mut off = 0;
    for i in 0..nb {
        let (e, len) = BitmapEntry::from_bytes(dir.get(off..).unwrap_or(&[]))
            .map_err(|e| Error::invalid(format!("bitmap directory entry {i}: {}", e.what())))?;
        if out.iter().any(|o| o.name == e.name) {
            return Err(Error::invalid(format!("bitmap name '{}' twice", e.name)));
        }
        out.push(e);
        off += len;
    }
    Ok(out)
}

/// Encode a directory.
pub fn serialize_directory(entries: &[BitmapEntry]) -> Vec<u8> {
    entries.iter().flat_map(BitmapEntry::to_bytes).collect()
}

/// One bitmap table entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TableEntry {
    /// No data cluster: all bits of this cluster's range are 0.
    Zeros,
    /// No data cluster: all bits are 1.
    Ones,
    /// The data cluster at this host offset.
    Data(u64),
}

impl TableEntry {
    /// Decode an entry of an image with `cluster_size` (reserved bits and misaligned
    /// offsets refused).
    pub fn from_u64(e: u64, cluster_size: u64) -> Result<TableEntry> {
        let off = e & TABLE_OFFSET_MASK;
        let bad =
            e & TABLE_RESERVED_MASK != 0 || off % cluster_size != 0 || (off != 0 && e & 1 != 0);
        if bad {
            return Err(Error::invalid(format!(
                "bitmap table entry {e:#x} is corrupt"
            )));
        }
        Ok(match (off, e & 1) {
            (0, 0) => TableEntry::Zeros,
            (0, _) => TableEntry::Ones,
            (off, _) => TableEntry::Data(off),
        })
    }

    /// Encode.
    pub fn to_u64(self) -> u64 {
        match self {
            TableEntry::Zeros => 0,
            TableEntry::Ones => 1,
            TableEntry::Data(off) => off & TABLE_OFFSET_MASK,
        }
    }
}

#[cfg(test)]
mod tests;
