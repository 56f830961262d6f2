//! The qcow2 image header (the start of cluster 0), versions 2 and 3.
//!
//! ```text
//!  offset size field                    meaning
//!  0      4    magic                    "QFI\xfb"
//!  4      4    version                  2 or 3
//!  8      8    backing_file_offset      where the backing file name is (0 = no backing file)
//!  16     4    backing_file_size        name length, at most 1023 bytes
//!  20     4    cluster_bits             cluster size = 1 << cluster_bits (9..=21 in QEMU)
//!  24     8    size                     virtual disk size in bytes
//!  32     4    crypt_method             0 none, 1 AES, 2 LUKS
//!  36     4    l1_size                  entries in the active L1 table
//!  40     8    l1_table_offset          cluster aligned
//!  48     8    refcount_table_offset    cluster aligned
//!  56     4    refcount_table_clusters  clusters the refcount table occupies
//!  60     4    nb_snapshots             internal snapshots
//!  64     8    snapshots_offset         cluster aligned snapshot table
//!  ---- version 2 ends here (72 bytes) ----
//!  72     8    incompatible_features    see features.rs; unknown bit => refuse to open
//!  80     8    compatible_features      unknown bits may be ignored
//!  88     8    autoclear_features       unknown bits are cleared on a read-write open
//!  96     4    refcount_order           refcount width = 1 << refcount_order bits (<= 6)
//!  100    4    header_length            >= 104, multiple of 8
//!  ---- minimum version 3 header (104 bytes) ----
//!  104    1    compression_type         0 zlib, 1 zstd (present when header_length > 104)
//!  105    ...  unknown fields/padding   kept verbatim up to header_length (QEMU writes 112)
//! ```
//!
//! [`Header`] is the raw wire form: [`Header::from_bytes`] only checks what it needs to decode
//! (magic, version, length); [`Header::validate`] enforces the limits QEMU enforces at open.
//! Header extensions and the backing file name live in `extensions.rs`.

use crate::error::{Error, Result};
use crate::format::features;
use crate::units::u32_to_usize;

/// Offset of `magic`.
pub const MAGIC_OFFSET: usize = 0;
/// Offset of `version`.
pub const VERSION_OFFSET: usize = MAGIC_OFFSET + 4;
/// Offset of `backing_file_offset`.
pub const BACKING_FILE_OFFSET_OFFSET: usize = VERSION_OFFSET + 4;
/// Offset of `backing_file_size`.
pub const BACKING_FILE_SIZE_OFFSET: usize = BACKING_FILE_OFFSET_OFFSET + 8;
/// Offset of `cluster_bits`.
pub const CLUSTER_BITS_OFFSET: usize = BACKING_FILE_SIZE_OFFSET + 4;
/// Offset of `size`.
pub const SIZE_OFFSET: usize = CLUSTER_BITS_OFFSET + 4;
/// Offset of `crypt_method`.
pub const CRYPT_METHOD_OFFSET: usize = SIZE_OFFSET + 8;
/// Offset of `l1_size`.
pub const L1_SIZE_OFFSET: usize = CRYPT_METHOD_OFFSET + 4;
/// Offset of `l1_table_offset`.
pub const L1_TABLE_OFFSET_OFFSET: usize = L1_SIZE_OFFSET + 4;
/// Offset of `refcount_table_offset`.
pub const REFCOUNT_TABLE_OFFSET_OFFSET: usize = L1_TABLE_OFFSET_OFFSET + 8;
/// Offset of `refcount_table_clusters`.
pub const REFCOUNT_TABLE_CLUSTERS_OFFSET: usize = REFCOUNT_TABLE_OFFSET_OFFSET + 8;
/// Offset of `nb_snapshots`.
pub const NB_SNAPSHOTS_OFFSET: usize = REFCOUNT_TABLE_CLUSTERS_OFFSET + 4;
/// Offset of `snapshots_offset`.
pub const SNAPSHOTS_OFFSET_OFFSET: usize = NB_SNAPSHOTS_OFFSET + 4;
/// Length of a version 2 header.
pub const V2_HEADER_LENGTH: usize = SNAPSHOTS_OFFSET_OFFSET + 8;
/// [`V2_HEADER_LENGTH`] as the header field's type.
#[allow(clippy::cast_possible_truncation)] // 72
pub const V2_HEADER_LENGTH_U32: u32 = V2_HEADER_LENGTH as u32;
/// Offset of `incompatible_features` (version 3).
pub const INCOMPATIBLE_FEATURES_OFFSET: usize = V2_HEADER_LENGTH;
/// Offset of `compatible_features` (version 3).
pub const COMPATIBLE_FEATURES_OFFSET: usize = INCOMPATIBLE_FEATURES_OFFSET + 8;
/// Offset of `autoclear_features` (version 3).
pub const AUTOCLEAR_FEATURES_OFFSET: usize = COMPATIBLE_FEATURES_OFFSET + 8;
/// Offset of `refcount_order` (version 3).
pub const REFCOUNT_ORDER_OFFSET: usize = AUTOCLEAR_FEATURES_OFFSET + 8;
/// Offset of `header_length` (version 3).
pub const HEADER_LENGTH_OFFSET: usize = REFCOUNT_ORDER_OFFSET + 4;
/// Minimum length of a version 3 header.
pub const V3_MIN_HEADER_LENGTH: usize = HEADER_LENGTH_OFFSET + 4;
/// Offset of `compression_type` (version 3, present when `header_length` > 104).
pub const COMPRESSION_TYPE_OFFSET: usize = V3_MIN_HEADER_LENGTH;
/// End of the fields this library knows; bytes after it are kept in [`Header::unknown_tail`].
pub const KNOWN_HEADER_END: usize = COMPRESSION_TYPE_OFFSET + 1;
/// The version 3 header length QEMU writes (known fields padded to a multiple of 8).
pub const V3_HEADER_LENGTH: usize = KNOWN_HEADER_END.next_multiple_of(8);

/// The magic at offset 0.
pub const MAGIC: [u8; 4] = *b"QFI\xfb";
/// Smallest cluster_bits (512-byte clusters).
pub const MIN_CLUSTER_BITS: u32 = 9;
/// Largest cluster_bits QEMU opens (2 MiB clusters).
pub const MAX_CLUSTER_BITS: u32 = 21;
/// Smallest cluster_bits with extended L2 entries (32 subclusters of at least 512 bytes).
pub const MIN_EXTENDED_L2_CLUSTER_BITS: u32 = 14;
/// Largest refcount_order (64-bit refcounts).
pub const MAX_REFCOUNT_ORDER: u32 = 6;
/// QEMU's limit on the active L1 table, in bytes.
pub const MAX_L1_BYTES: u64 = 32 << 20;
/// QEMU's limit on the refcount table, in bytes.
pub const MAX_REFCOUNT_TABLE_BYTES: u64 = 8 << 20;
/// QEMU's limit on the number of internal snapshots.
pub const MAX_SNAPSHOTS: u32 = 65536;
/// Size of the fixed part of a snapshot table entry (the smallest possible entry).
pub const MIN_SNAPSHOT_ENTRY_SIZE: u64 = 40;
/// Longest backing file name.
pub const MAX_BACKING_FILE_NAME: u32 = 1023;
/// `crypt_method` value: no encryption.
pub const CRYPT_NONE: u32 = 0;
/// `crypt_method` value: legacy AES-CBC.
pub const CRYPT_AES: u32 = 1;
/// `crypt_method` value: LUKS.
pub const CRYPT_LUKS: u32 = 2;
/// `compression_type` value: zlib/deflate.
pub const COMPRESSION_ZLIB: u8 = 0;
/// `compression_type` value: zstd.
pub const COMPRESSION_ZSTD: u8 = 1;
/// Size of an L1 entry.
pub const L1_ENTRY_SIZE: u64 = 8;

/// The decoded qcow2 header. For version 2 the version 3 fields hold their implied values
/// (no features, `refcount_order` 4, `header_length` 72, zlib).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    /// Format version, 2 or 3.
    pub version: u32,
    /// Offset of the backing file name in cluster 0, 0 for none.
    pub backing_file_offset: u64,
    /// Length of the backing file name in bytes.
    pub backing_file_size: u32,
    /// log2 of the cluster size.
    pub cluster_bits: u32,
    /// Virtual disk size in bytes.
    pub size: u64,
    /// 0 none, 1 AES, 2 LUKS.
    pub crypt_method: u32,
    /// Number of entries in the active L1 table.
    pub l1_size: u32,
    /// Host offset of the active L1 table.
    pub l1_table_offset: u64,
    /// Host offset of the refcount table.
    pub refcount_table_offset: u64,
    /// Clusters occupied by the refcount table.
    pub refcount_table_clusters: u32,
    /// Number of internal snapshots.
    pub nb_snapshots: u32,
    /// Host offset of the snapshot table.
    pub snapshots_offset: u64,
    /// Incompatible feature bits (see [`features`]).
    pub incompatible_features: u64,
    /// Compatible feature bits.
    pub compatible_features: u64,
    /// Autoclear feature bits.
    pub autoclear_features: u64,
    /// log2 of the refcount width in bits.
    pub refcount_order: u32,
    /// Header length in bytes (72 for version 2).
    pub header_length: u32,
    /// Compression type: 0 zlib, 1 zstd (0 when the field is absent).
    pub compression_type: u8,
    /// Header bytes from offset 105 up to `header_length`, preserved verbatim.
    pub unknown_tail: Vec<u8>,
}

/// Read a big-endian u32 at `off` of a buffer known to be long enough.
fn be32(b: &[u8; V3_MIN_HEADER_LENGTH], off: usize) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[off..off + 4]);
    u32::from_be_bytes(a)
}

/// Read a big-endian u64 at `off` of a buffer known to be long enough.
fn be64(b: &[u8; V3_MIN_HEADER_LENGTH], off: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[off..off + 8]);
    u64::from_be_bytes(a)
}

/// Check the magic and the version; return the version.
fn check_magic_and_version(buf: &[u8]) -> Result<u32> {
    if buf.len() < VERSION_OFFSET + 4 || buf[..4] != MAGIC {
        return Err(Error::invalid("not a qcow2 image (bad magic)").at(0));
    }
    let version = u32::from_be_bytes([buf[4], buf[5], buf[6], buf[7]]);
    if version != 2 && version != 3 {
        return Err(Error::unsupported(format!("qcow2 version {version}")).at(4));
    }
    Ok(version)
}

/// The header length a version 3 header claims, checked against `buf`.
fn v3_header_length(buf: &[u8]) -> Result<u32> {
    if buf.len() < V3_MIN_HEADER_LENGTH {
        return Err(Error::invalid(format!(
            "qcow2 v3 header truncated: {} bytes, need {V3_MIN_HEADER_LENGTH}",
            buf.len()
        )));
    }
    let off = HEADER_LENGTH_OFFSET;
    let len = u32::from_be_bytes([buf[off], buf[off + 1], buf[off + 2], buf[off + 3]]);
    if u32_to_usize(len) < V3_MIN_HEADER_LENGTH {
        return Err(Error::invalid(format!("header_length {len} is less than 104")).at(off as u64));
    }
    if u32_to_usize(len) > buf.len() {
        return Err(Error::invalid(format!(
            "header_length {len} reaches past the {} bytes of cluster 0 given",
            buf.len()
        ))
        .at(off as u64));
    }
    Ok(len)
}

impl Header {
    /// Decode a header from the start of cluster 0. Checks only the magic, the version and that
    /// `buf` holds the whole header; call [`Header::validate`] before trusting any field.
    pub fn from_bytes(buf: &[u8]) -> Result<Header> {
        let version = check_magic_and_version(buf)?;
        if buf.len() < V2_HEADER_LENGTH {
            return Err(Error::invalid(format!(
                "qcow2 header truncated: {} bytes, need {V2_HEADER_LENGTH}",
                buf.len()
            )));
        }
        let header_length = if version == 2 {
            V2_HEADER_LENGTH_U32
        } else {
            v3_header_length(buf)?
        };
        let mut h = [0u8; V3_MIN_HEADER_LENGTH];
        let n = buf.len().min(V3_MIN_HEADER_LENGTH);
        h[..n].copy_from_slice(&buf[..n]);
        let mut header = Self::decode_v2_fields(&h, version);
        if version == 3 {
            header.decode_v3_fields(&h, &buf[..u32_to_usize(header_length)]);
        }
        Ok(header)
    }

    /// The version 2 fields, with the v3 fields at their implied values.
    fn decode_v2_fields(h: &[u8; V3_MIN_HEADER_LENGTH], version: u32) -> Header {
        Header {
            version,
            backing_file_offset: be64(h, BACKING_FILE_OFFSET_OFFSET),
            backing_file_size: be32(h, BACKING_FILE_SIZE_OFFSET),
            cluster_bits: be32(h, CLUSTER_BITS_OFFSET),
            size: be64(h, SIZE_OFFSET),
            crypt_method: be32(h, CRYPT_METHOD_OFFSET),
            l1_size: be32(h, L1_SIZE_OFFSET),
            l1_table_offset: be64(h, L1_TABLE_OFFSET_OFFSET),
            refcount_table_offset: be64(h, REFCOUNT_TABLE_OFFSET_OFFSET),
            refcount_table_clusters: be32(h, REFCOUNT_TABLE_CLUSTERS_OFFSET),
            nb_snapshots: be32(h, NB_SNAPSHOTS_OFFSET),
            snapshots_offset: be64(h, SNAPSHOTS_OFFSET_OFFSET),
            incompatible_features: 0,
            compatible_features: 0,
            autoclear_features: 0,
            refcount_order: 4,
            header_length: V2_HEADER_LENGTH_U32,
            compression_type: COMPRESSION_ZLIB,
            unknown_tail: Vec::new(),
        }
    }

    /// Fill the version 3 fields; `whole` is exactly `header_length` bytes.
    fn decode_v3_fields(&mut self, h: &[u8; V3_MIN_HEADER_LENGTH], whole: &[u8]) {
        self.incompatible_features = be64(h, INCOMPATIBLE_FEATURES_OFFSET);
        self.compatible_features = be64(h, COMPATIBLE_FEATURES_OFFSET);
        self.autoclear_features = be64(h, AUTOCLEAR_FEATURES_OFFSET);
        self.refcount_order = be32(h, REFCOUNT_ORDER_OFFSET);
        // `whole` is `header_length` bytes, which was read as a u32.
        self.header_length = u32::try_from(whole.len()).unwrap_or(u32::MAX);
        self.compression_type = whole.get(COMPRESSION_TYPE_OFFSET).copied().unwrap_or(0);
        self.unknown_tail = whole.get(KNOWN_HEADER_END..).unwrap_or(&[]).to_vec();
    }

    /// Encode the header: 72 bytes for version 2; `header_length` bytes (at least 104) for
    /// version 3, with `unknown_tail` cut or zero-padded to fit. `compression_type` is only
    /// written when `header_length` > 104 ([`Header::validate`] rejects a lost non-zero value).
    pub fn to_bytes(&self) -> Vec<u8> {
        let len = if self.version == 2 {
            V2_HEADER_LENGTH
        } else {
            u32_to_usize(self.header_length).max(V3_MIN_HEADER_LENGTH)
        };
        let mut b = vec![0u8; len];
        self.encode_v2_fields(&mut b);
        if self.version != 2 {
            self.encode_v3_fields(&mut b);
        }
        b
    }

    /// Write the version 2 fields into `b` (at least 72 bytes).
    fn encode_v2_fields(&self, b: &mut [u8]) {
        b[MAGIC_OFFSET..MAGIC_OFFSET + 4].copy_from_slice(&MAGIC);
        put32(b, VERSION_OFFSET, self.version);
        put64(b, BACKING_FILE_OFFSET_OFFSET, self.backing_file_offset);
        put32(b, BACKING_FILE_SIZE_OFFSET, self.backing_file_size);
        put32(b, CLUSTER_BITS_OFFSET, self.cluster_bits);
        put64(b, SIZE_OFFSET, self.size);
        put32(b, CRYPT_METHOD_OFFSET, self.crypt_method);
        put32(b, L1_SIZE_OFFSET, self.l1_size);
        put64(b, L1_TABLE_OFFSET_OFFSET, self.l1_table_offset);
        put64(b, REFCOUNT_TABLE_OFFSET_OFFSET, self.refcount_table_offset);
        put32(
            b,
            REFCOUNT_TABLE_CLUSTERS_OFFSET,
            self.refcount_table_clusters,
        );
        put32(b, NB_SNAPSHOTS_OFFSET, self.nb_snapshots);
        put64(b, SNAPSHOTS_OFFSET_OFFSET, self.snapshots_offset);
    }

    /// Write the version 3 fields into `b` (at least 104 bytes).
    fn encode_v3_fields(&self, b: &mut [u8]) {
        put64(b, INCOMPATIBLE_FEATURES_OFFSET, self.incompatible_features);
        put64(b, COMPATIBLE_FEATURES_OFFSET, self.compatible_features);
        put64(b, AUTOCLEAR_FEATURES_OFFSET, self.autoclear_features);
        put32(b, REFCOUNT_ORDER_OFFSET, self.refcount_order);
        put32(b, HEADER_LENGTH_OFFSET, self.header_length);
        if let Some(ct) = b.get_mut(COMPRESSION_TYPE_OFFSET) {
            *ct = self.compression_type;
        }
        if let Some(tail) = b.get_mut(KNOWN_HEADER_END..) {
            let n = tail.len().min(self.unknown_tail.len());
            tail[..n].copy_from_slice(&self.unknown_tail[..n]);
        }
    }

    /// Cluster size in bytes (0 if `cluster_bits` is absurd; validate first).
    pub fn cluster_size(&self) -> u64 {
        1u64.checked_shl(self.cluster_bits).unwrap_or(0)
    }

    /// Refcount width in bits (0 if `refcount_order` is absurd; validate first).
    pub fn refcount_bits(&self) -> u32 {
        1u32.checked_shl(self.refcount_order).unwrap_or(0)
    }

    /// Size of one L2 entry: 16 bytes with extended L2, else 8.
    pub fn l2_entry_size(&self) -> u64 {
        if self.extended_l2() { 16 } else { 8 }
    }

    /// Entries in one L2 table (one cluster).
    pub fn l2_entries(&self) -> u64 {
        self.cluster_size() / self.l2_entry_size()
    }

    /// Refcount entries in one refcount block (one cluster).
    pub fn refcount_block_entries(&self) -> u64 {
        match self.refcount_bits() {
            0 => 0,
            bits => self.cluster_size() * 8 / u64::from(bits),
        }
    }

    /// Extended L2 entries (subclusters) are in use (incompatible bit 4).
    pub fn extended_l2(&self) -> bool {
        self.incompatible_features & features::EXTENDED_L2 != 0
    }

    /// Lazy refcounts may be used (compatible bit 0).
    pub fn lazy_refcounts(&self) -> bool {
        self.compatible_features & features::LAZY_REFCOUNTS != 0
    }

    /// The dirty bit (incompatible bit 0): refcounts may be stale.
    pub fn is_dirty(&self) -> bool {
        self.incompatible_features & features::DIRTY != 0
    }

    /// The corrupt bit (incompatible bit 1): the image must not be written.
    pub fn is_corrupt(&self) -> bool {
        self.incompatible_features & features::CORRUPT != 0
    }

    /// Guest data lives in an external data file (incompatible bit 2).
    pub fn has_external_data_file(&self) -> bool {
        self.incompatible_features & features::EXTERNAL_DATA_FILE != 0
    }

    /// The external data file is a standalone raw image (autoclear bit 1).
    pub fn data_file_raw(&self) -> bool {
        self.autoclear_features & features::RAW_EXTERNAL != 0
    }

    /// The bitmaps extension is consistent (autoclear bit 0).
    pub fn bitmaps_consistent(&self) -> bool {
        self.autoclear_features & features::BITMAPS != 0
    }

    /// The minimum `l1_size` for this header's `size`.
    pub fn min_l1_size(&self) -> u64 {
        l1_entries_for(self.size, self.cluster_bits, self.extended_l2())
    }
}

/// Write a big-endian u32 at `off`.
fn put32(b: &mut [u8], off: usize, v: u32) {
    b[off..off + 4].copy_from_slice(&v.to_be_bytes());
}

/// Write a big-endian u64 at `off`.
fn put64(b: &mut [u8], off: usize, v: u64) {
    b[off..off + 8].copy_from_slice(&v.to_be_bytes());
}

/// The minimum number of L1 entries for a `size`-byte disk: one entry per L2 table, an L2 table
/// being one cluster of 8-byte (16-byte with `extended_l2`) entries. Saturates instead of
/// overflowing for out-of-range `cluster_bits`.
pub fn l1_entries_for(size: u64, cluster_bits: u32, extended_l2: bool) -> u64 {
    let entry_bits = if extended_l2 { 4 } else { 3 };
    let l2_bits = cluster_bits.saturating_sub(entry_bits);
    let shift = cluster_bits.saturating_add(l2_bits);
    if shift >= 64 {
        return u64::from(size != 0);
    }
    size.div_ceil(1u64 << shift)
}

mod patch;
mod validate;

pub use patch::HeaderPatch;

#[cfg(test)]
mod tests;
