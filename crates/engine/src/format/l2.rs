//! L2 table entries, standard (64-bit) and extended (128-bit, with a subcluster bitmap).
//!
//! An L2 table is one cluster of entries, each mapping one guest cluster (qcow2.txt,
//! "Cluster mapping" and "Extended L2 Entries"). Standard entry, one big-endian `u64`:
//!
//! ```text
//!  bits    field          meaning
//!     0    ZERO           v3 standard entries only: the cluster reads as zeros; with a non-zero
//!                         offset the host cluster is preallocated. Reserved (0) in v2 images
//!                         and in extended entries.
//!  1 - 8   reserved       must be 0
//!  9 - 55  host offset    host cluster offset, cluster aligned; 0 = unallocated
//! 56 - 61  reserved       must be 0
//!     62   COMPRESSED     1 = bits 0-61 are a compressed descriptor (see `compressed.rs`)
//!     63   COPIED         1 = refcount is exactly one (write in place); never for compressed
//! ```
//!
//! An extended entry is the standard `u64` followed by a `u64` subcluster bitmap; the cluster
//! is divided into 32 subclusters:
//!
//! ```text
//!  bits     field               meaning
//!  0 - 31   allocated[i]        subcluster i holds data at host + i * subcluster_size
//! 32 - 63   reads-as-zero[i-32] subcluster i reads as zeros (allocated bit must be 0)
//! ```
//!
//! For a compressed entry the bitmap is reserved and must be 0.
//!
//! Choices that follow QEMU's behaviour (block/qcow2.h `qcow2_get_cluster_type`):
//! - In extended mode a set bit 0 is ignored when decoding (QEMU ignores it too);
//!   [`reserved_bits`] reports it so `check` can flag it.
//! - Reserved bits 1-8 and 56-61 are ignored when decoding and reported by [`reserved_bits`]
//!   (QEMU's read path ignores them, `qemu-img check` calls them corruption).
//! - Offset 0 with COPIED set is unallocated, except with an external data file where it is the
//!   normal cluster at host offset 0 ([`L2Entry::decode_external`]).
//!
//! Deliberate deviations: in v2 images bit 0 is ignored (the spec reserves it; QEMU's read path
//! would honour it), and a compressed entry with COPIED set is a Corrupt error (QEMU's read path
//! ignores the flag; `qemu-img check` reports it).

use crate::error::{Error, Result};
use crate::format::compressed::CompressedDescriptor;
use crate::units::HostOffset;

/// Bit 63: refcount exactly one.
pub const L2E_COPIED: u64 = 1 << 63;
/// Bit 62: compressed cluster.
pub const L2E_COMPRESSED: u64 = 1 << 62;
/// Bit 0: reads as zeros (v3 standard entries only).
pub const L2E_ZERO: u64 = 1;
/// Bits 9-55: host cluster offset of a standard entry.
pub const L2E_OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
/// Bits 1-8 and 56-61: reserved in standard (non-compressed) entries.
pub const L2E_STD_RESERVED_MASK: u64 = 0x3f00_0000_0000_01fe;
/// Subclusters per cluster with extended L2 entries.
pub const SUBCLUSTERS: u32 = 32;
/// Bitmap bits 0-31: every subcluster allocated.
pub const BITMAP_ALL_ALLOC: u64 = 0x0000_0000_ffff_ffff;
/// Bitmap bits 32-63: every subcluster reads as zeros.
pub const BITMAP_ALL_ZERO: u64 = 0xffff_ffff_0000_0000;

/// The parameters that decide how L2 entries are laid out and interpreted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct L2Geometry {
    /// log2 of the cluster size (9..=21 for images QEMU accepts).
    pub cluster_bits: u32,
    /// Extended L2 entries (incompatible feature bit 4).
    pub extended: bool,
    /// Image version 3 (bit 0 of standard entries means "zero").
    pub version3: bool,
}

impl L2Geometry {
    /// The cluster size in bytes (0 when `cluster_bits` is absurd, ≥ 64).
    pub fn cluster_size(&self) -> u64 {
        1u64.checked_shl(self.cluster_bits).unwrap_or(0)
    }

    /// Bytes per L2 entry: 8, or 16 with extended entries.
    pub fn entry_size(&self) -> usize {
        if self.extended { 16 } else { 8 }
    }

    /// L2 entries in one cluster-sized L2 table.
    pub fn entries_per_cluster(&self) -> u64 {
        self.cluster_size() / self.entry_size() as u64
    }

    /// Subclusters per cluster: 32 with extended entries, else 1.
    pub fn subclusters(&self) -> u32 {
        if self.extended { SUBCLUSTERS } else { 1 }
    }

    /// Bytes per subcluster (the cluster size without extended entries).
    pub fn subcluster_size(&self) -> u64 {
        self.cluster_size() / u64::from(self.subclusters())
    }

    /// Whether bit 0 of a standard entry means "reads as zero" in this image.
    fn zero_bit_valid(&self) -> bool {
        self.version3 && !self.extended
    }
}

/// A decoded L2 entry (the standard 64-bit part; the bitmap is a [`SubclusterBitmap`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum L2Entry {
    /// No host cluster: read the backing file (or zeros). With extended entries the bitmap
    /// may still mark subclusters as reading zeros.
    Unallocated,
    /// Standard v3 entries only: reads as zeros; `host` is a preallocated cluster (or `None`).
    Zero {
        /// Preallocated host cluster, kept for later writes.
        host: Option<HostOffset>,
        /// COPIED flag of the entry.
        copied: bool,
    },
    /// Data at a cluster-aligned host offset (with extended entries, per the bitmap).
    Normal {
        /// Host cluster offset.
        host: HostOffset,
        /// COPIED flag: refcount exactly one, writable in place.
        copied: bool,
    },
    /// A compressed cluster.
    Compressed(CompressedDescriptor),
}

impl L2Entry {
    /// Decode the 64-bit part of an L2 entry of an image without an external data file.
    /// Corrupt when a normal or preallocated-zero host offset is not cluster aligned, or a
    /// compressed entry has COPIED set. Never returns `Zero` in v2 or extended mode.
    pub fn decode(raw: u64, geo: &L2Geometry) -> Result<L2Entry> {
        Self::decode_inner(raw, geo, false)
    }

    /// Like [`decode`](Self::decode), for images with an external data file: offset 0 with
    /// COPIED set is the normal cluster at host offset 0 (QEMU's rule).
    pub fn decode_external(raw: u64, geo: &L2Geometry) -> Result<L2Entry> {
        Self::decode_inner(raw, geo, true)
    }

    fn decode_inner(raw: u64, geo: &L2Geometry, external: bool) -> Result<L2Entry> {
        if raw & L2E_COMPRESSED != 0 {
            return decode_compressed(raw, geo);
        }
        let copied = raw & L2E_COPIED != 0;
        let off = raw & L2E_OFFSET_MASK;
        if off & geo.cluster_size().wrapping_sub(1) != 0 {
            return Err(
                Error::corrupt("L2 entry host offset is not cluster aligned")
                    .at_host(HostOffset(off)),
            );
        }
        let host = (off != 0).then_some(HostOffset(off));
        if raw & L2E_ZERO != 0 && geo.zero_bit_valid() {
            return Ok(L2Entry::Zero { host, copied });
        }
        Ok(match host {
            Some(host) => L2Entry::Normal { host, copied },
            None if external && copied => L2Entry::Normal {
                host: HostOffset(0),
                copied,
            },
            None => L2Entry::Unallocated,
        })
    }

    /// Encode the 64-bit part. Best effort for entries [`try_encode`](Self::try_encode)
    /// rejects: `Zero` outside v3 standard mode is written without bit 0 (the caller must use
    /// the bitmap in extended mode), offsets are masked to bits 9-55, and a compressed
    /// descriptor that does not fit has its fields masked. Entries from `decode` always
    /// re-encode to the same bits, minus reserved and ignored bits.
    pub fn encode(&self, geo: &L2Geometry) -> u64 {
        match self {
            L2Entry::Unallocated => 0,
            L2Entry::Zero { host, copied } => {
                let zero = if geo.zero_bit_valid() { L2E_ZERO } else { 0 };
                std_bits(host.map_or(0, |h| h.0), *copied) | zero
            }
            L2Entry::Normal { host, copied } => std_bits(host.0, *copied),
            L2Entry::Compressed(d) => d.encode_masked(geo.cluster_bits),
        }
    }

    /// Encode, refusing what the image cannot represent: `Zero` in v2 or extended mode,
    /// unaligned or too large host offsets, compressed descriptors that do not fit.
    /// Errors are [`InvalidArgument`](crate::error::ErrorKind::InvalidArgument).
    pub fn try_encode(&self, geo: &L2Geometry) -> Result<u64> {
        if let L2Entry::Zero { .. } = self {
            if !geo.zero_bit_valid() {
                return Err(Error::invalid_arg(
                    "zero L2 entries need a v3 image without extended L2",
                ));
            }
        }
        if let L2Entry::Compressed(d) = self {
            return d.encode(geo.cluster_bits);
        }
        if let Some(h) = self.host() {
            if h.0 & !L2E_OFFSET_MASK != 0 || h.0 & geo.cluster_size().wrapping_sub(1) != 0 {
                return Err(Error::invalid_arg("L2 host offset unaligned or too large").at_host(h));
            }
        }
        Ok(self.encode(geo))
    }

    /// The host cluster of a normal or preallocated zero cluster.
    pub fn host(&self) -> Option<HostOffset> {
        match self {
            L2Entry::Normal { host, .. } => Some(*host),
            L2Entry::Zero { host, .. } => *host,
            _ => None,
        }
    }

    /// The COPIED flag (always false for unallocated and compressed entries).
    pub fn copied(&self) -> bool {
        match self {
            L2Entry::Normal { copied, .. } | L2Entry::Zero { copied, .. } => *copied,
            _ => false,
        }
    }
}

/// Standard entry bits for a host offset and COPIED flag.
fn std_bits(host: u64, copied: bool) -> u64 {
    (host & L2E_OFFSET_MASK) | if copied { L2E_COPIED } else { 0 }
}

/// Decode a compressed entry; COPIED or a host offset beyond bit 55 is corrupt.
fn decode_compressed(raw: u64, geo: &L2Geometry) -> Result<L2Entry> {
    let d = CompressedDescriptor::decode(raw, geo.cluster_bits);
    if raw & L2E_COPIED != 0 {
        return Err(Error::corrupt("compressed L2 entry has the COPIED flag").at_host(d.host));
    }
    if d.host.0 >> 56 != 0 {
        return Err(Error::corrupt("compressed cluster offset beyond 64 PiB").at_host(d.host));
    }
    Ok(L2Entry::Compressed(d))
}

/// Reserved bits set in a raw entry (0 for a well-formed entry): bits 1-8 and 56-61 of
/// standard entries, plus bit 0 in v2 and extended mode. Compressed entries have none
/// (their upper host bits are checked by [`L2Entry::decode`]).
pub fn reserved_bits(raw: u64, geo: &L2Geometry) -> u64 {
    if raw & L2E_COMPRESSED != 0 {
        return 0;
    }
    let bit0 = if geo.zero_bit_valid() { 0 } else { L2E_ZERO };
    raw & (L2E_STD_RESERVED_MASK | bit0)
}

/// The state of one subcluster according to the bitmap alone.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SubclusterState {
    /// Neither bit: read the backing file (or zeros).
    Unallocated,
    /// The reads-as-zero bit.
    Zero,
    /// The allocated bit: data at the entry's host cluster.
    Allocated,
}

/// The 64-bit subcluster bitmap of an extended L2 entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct SubclusterBitmap(pub u64);

impl SubclusterBitmap {
    /// The state of subcluster `i` (0..32). Both bits set is Corrupt; `i` ≥ 32 is
    /// InvalidArgument.
    pub fn state(self, i: u32) -> Result<SubclusterState> {
        if i >= SUBCLUSTERS {
            return Err(Error::invalid_arg(format!(
                "subcluster index {i} out of range"
            )));
        }
        let alloc = self.0 >> i & 1 != 0;
        let zero = self.0 >> (i + 32) & 1 != 0;
        match (alloc, zero) {
            (true, true) => Err(Error::corrupt(format!(
                "subcluster {i} is both allocated and zero in the L2 bitmap"
            ))),
            (true, false) => Ok(SubclusterState::Allocated),
            (false, true) => Ok(SubclusterState::Zero),
            (false, false) => Ok(SubclusterState::Unallocated),
        }
    }

    /// Set subcluster `i` to `s` (clearing the other bit). `i` ≥ 32 is ignored.
    pub fn set_state(&mut self, i: u32, s: SubclusterState) {
        if i < SUBCLUSTERS {
            self.set_mask(1u64 << i, s);
        }
    }

    /// Set subclusters `first .. first + count` to `s`; the range is clipped to 0..32.
    pub fn set_range(&mut self, first: u32, count: u32, s: SubclusterState) {
        let end = first.saturating_add(count).min(SUBCLUSTERS);
        if first < end {
            let bits = (1u64 << end) - (1u64 << first);
            self.set_mask(bits, s);
        }
    }

    /// A bitmap with every subcluster in state `s`.
    pub fn all(s: SubclusterState) -> SubclusterBitmap {
        let mut b = SubclusterBitmap(0);
        b.set_mask(BITMAP_ALL_ALLOC, s);
        b
    }

    /// Apply `s` to the subclusters in `alloc_bits` (a mask within bits 0-31).
    fn set_mask(&mut self, alloc_bits: u64, s: SubclusterState) {
        let zero_bits = alloc_bits << 32;
        self.0 &= !(alloc_bits | zero_bits);
        self.0 |= match s {
            SubclusterState::Unallocated => 0,
            SubclusterState::Zero => zero_bits,
            SubclusterState::Allocated => alloc_bits,
        };
    }

    /// The allocation bits (0-31) as a mask.
    #[allow(clippy::cast_possible_truncation)] // the low 32 bits are the field
    pub fn alloc_bits(self) -> u32 {
        self.0 as u32
    }

    /// The reads-as-zero bits (32-63) as a mask, bit i for subcluster i.
    pub fn zero_bits(self) -> u32 {
        (self.0 >> 32) as u32
    }

    /// Check the bitmap against its entry, as QEMU does (all Corrupt):
    /// - compressed: the bitmap is reserved and must be 0 (QEMU's read path ignores it,
    ///   `qemu-img check` reports it);
    /// - unallocated (and plain `Zero`): no allocation bit may be set (zero bits are fine);
    /// - normal (and preallocated `Zero`): no subcluster may be both allocated and zero.
    pub fn validate_for(&self, entry: &L2Entry) -> Result<()> {
        let bad = match entry {
            L2Entry::Compressed(_) => {
                (self.0 != 0).then_some("compressed cluster has a non-zero subcluster bitmap")
            }
            L2Entry::Unallocated | L2Entry::Zero { host: None, .. } => {
                (self.alloc_bits() != 0).then_some("unallocated cluster has allocated subclusters")
            }
            L2Entry::Normal { .. } | L2Entry::Zero { host: Some(_), .. } => {
                (self.alloc_bits() & self.zero_bits() != 0)
                    .then_some("subcluster both allocated and zero in the L2 bitmap")
            }
        };
        match bad {
            Some(msg) => Err(Error::corrupt(msg)),
            None => Ok(()),
        }
    }
}

/// Read entry `index` of an L2 table slice `buf` (whole entries, any slice of a table):
/// the raw 64-bit entry and its bitmap (0 in standard mode). `None` when out of range.
pub fn read_raw(buf: &[u8], index: usize, geo: &L2Geometry) -> Option<(u64, SubclusterBitmap)> {
    let size = geo.entry_size();
    let start = index.checked_mul(size)?;
    let entry = buf.get(start..start.checked_add(size)?)?;
    let raw = be_u64(&entry[..8]);
    let bitmap = if geo.extended {
        be_u64(&entry[8..16])
    } else {
        0
    };
    Some((raw, SubclusterBitmap(bitmap)))
}

/// Write entry `index` of an L2 table slice `buf`. The bitmap is ignored in standard mode.
/// Returns false (and writes nothing) when the entry does not fit in `buf`.
pub fn write_raw(
    buf: &mut [u8],
    index: usize,
    geo: &L2Geometry,
    raw: u64,
    bitmap: SubclusterBitmap,
) -> bool {
    let size = geo.entry_size();
    let Some(start) = index.checked_mul(size) else {
        return false;
    };
    let Some(entry) = start
        .checked_add(size)
        .and_then(|end| buf.get_mut(start..end))
    else {
        return false;
    };
    entry[..8].copy_from_slice(&raw.to_be_bytes());
    if geo.extended {
        entry[8..16].copy_from_slice(&bitmap.0.to_be_bytes());
    }
    true
}

/// Read a big-endian `u64` from an 8-byte slice.
fn be_u64(b: &[u8]) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(b);
    u64::from_be_bytes(a)
}

#[cfg(test)]
mod tests;
