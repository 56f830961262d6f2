//! Feature bits of the qcow2 v3 header and the feature name table extension.
//!
//! The header has three 64-bit feature masks (offsets 72, 80 and 88, see `header.rs`):
//!
//! ```text
//!  incompatible (72)  bit 0 dirty  1 corrupt  2 external data file  3 compression type
//!                     bit 4 extended L2 entries      -- unknown bit set => refuse to open
//!  compatible   (80)  bit 0 lazy refcounts           -- unknown bits may be ignored
//!  autoclear    (88)  bit 0 bitmaps  1 raw external data
//!                                                    -- unknown bits cleared on a RW open
//! ```
//!
//! The feature name table (header extension `0x6803f857`) is a list of 48-byte entries:
//!
//! ```text
//!  offset  size  field
//!  0       1     type: 0 incompatible, 1 compatible, 2 autoclear
//!  1       1     bit number within that mask (0..=63)
//!  2       46    name, zero padded, not NUL terminated when 46 bytes long
//! ```
//!
//! It lets an implementation that does not know a feature name it in an error message.

/// Incompatible bit 0: refcounts may be inconsistent (lazy refcounts in use, not closed cleanly).
pub const DIRTY: u64 = 1 << 0;
/// Incompatible bit 1: some metadata may be corrupt; the image must not be written.
pub const CORRUPT: u64 = 1 << 1;
/// Incompatible bit 2: guest data lives in an external data file.
pub const EXTERNAL_DATA_FILE: u64 = 1 << 2;
/// Incompatible bit 3: the `compression_type` header field is non-zero (not zlib).
pub const COMPRESSION_TYPE: u64 = 1 << 3;
/// Incompatible bit 4: L2 entries are 16 bytes with a subcluster bitmap.
pub const EXTENDED_L2: u64 = 1 << 4;

/// Compatible bit 0: refcount updates may be postponed (the image is marked dirty meanwhile).
pub const LAZY_REFCOUNTS: u64 = 1 << 0;

/// Autoclear bit 0: the bitmaps extension is consistent.
pub const BITMAPS: u64 = 1 << 0;
/// Autoclear bit 1: the external data file is a consistent raw image on its own.
pub const RAW_EXTERNAL: u64 = 1 << 1;

/// Every incompatible bit this library understands; any other set bit refuses the open.
pub const KNOWN_INCOMPATIBLE: u64 =
    DIRTY | CORRUPT | EXTERNAL_DATA_FILE | COMPRESSION_TYPE | EXTENDED_L2;
/// Every compatible bit this library understands.
pub const KNOWN_COMPATIBLE: u64 = LAZY_REFCOUNTS;
/// Every autoclear bit this library understands; the others are cleared on a read-write open.
pub const KNOWN_AUTOCLEAR: u64 = BITMAPS | RAW_EXTERNAL;

/// Size of one feature name table entry.
pub const FEATURE_NAME_ENTRY_SIZE: usize = 48;
/// Longest feature name an entry can hold.
pub const FEATURE_NAME_MAX: usize = FEATURE_NAME_ENTRY_SIZE - 2;

/// Which of the three feature masks a feature belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FeatureKind {
    /// `incompatible_features` (type byte 0).
    Incompatible,
    /// `compatible_features` (type byte 1).
    Compatible,
    /// `autoclear_features` (type byte 2).
    Autoclear,
    /// A type byte the spec does not define; kept so the table round-trips.
    Unknown(u8),
}

impl FeatureKind {
    /// The kind for a table entry's type byte.
    pub fn from_u8(v: u8) -> FeatureKind {
        match v {
            0 => FeatureKind::Incompatible,
            1 => FeatureKind::Compatible,
            2 => FeatureKind::Autoclear,
            other => FeatureKind::Unknown(other),
        }
    }

    /// The type byte written to the table.
    pub fn as_u8(self) -> u8 {
        match self {
            FeatureKind::Incompatible => 0,
            FeatureKind::Compatible => 1,
            FeatureKind::Autoclear => 2,
            FeatureKind::Unknown(v) => v,
        }
    }
}

/// One entry of the feature name table.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct FeatureName {
    /// Which mask the bit is in.
    pub kind: FeatureKind,
    /// Bit number within the mask (the spec allows 0..=63; other values are kept as read).
    pub bit: u8,
    /// Human-readable name (at most 46 bytes on disk; longer names are cut when written).
    pub name: String,
}

impl FeatureName {
    /// A new entry.
    pub fn new(kind: FeatureKind, bit: u8, name: &str) -> FeatureName {
        FeatureName {
            kind,
            bit,
            name: name.to_string(),
        }
    }

    /// Decode one 48-byte entry. The name stops at the first NUL; invalid UTF-8 is replaced.
    pub fn from_entry(entry: &[u8; FEATURE_NAME_ENTRY_SIZE]) -> FeatureName {
        let raw = &entry[2..];
        let end = raw.iter().position(|&b| b == 0).unwrap_or(raw.len());
        FeatureName {
            kind: FeatureKind::from_u8(entry[0]),
            bit: entry[1],
            name: fit_name(String::from_utf8_lossy(&raw[..end]).into_owned()),
        }
    }

    /// Encode as a 48-byte entry (name truncated to 46 bytes, zero padded).
    pub fn to_entry(&self) -> [u8; FEATURE_NAME_ENTRY_SIZE] {
        let mut out = [0u8; FEATURE_NAME_ENTRY_SIZE];
        out[0] = self.kind.as_u8();
        out[1] = self.bit;
        let name = fit_name(self.name.clone());
        out[2..2 + name.len()].copy_from_slice(name.as_bytes());
        out
    }
}

/// `name` cut to at most [`FEATURE_NAME_MAX`] bytes on a character boundary. Invalid UTF-8
/// read from a file becomes U+FFFD (three bytes for one), which can overflow the field; cutting
/// inside a character would write bytes that read back as something else.
fn fit_name(mut name: String) -> String {
    let mut n = name.len().min(FEATURE_NAME_MAX);
    while !name.is_char_boundary(n) {
        n -= 1;
    }
    name.truncate(n);
    name
}

/// Decode a feature name table extension's data: every whole 48-byte entry, in order.
/// A trailing partial entry is ignored (QEMU ignores it too).
pub fn parse_feature_table(data: &[u8]) -> Vec<FeatureName> {
    data.chunks_exact(FEATURE_NAME_ENTRY_SIZE)
        .filter_map(|c| <&[u8; FEATURE_NAME_ENTRY_SIZE]>::try_from(c).ok())
        .map(FeatureName::from_entry)
        .collect()
}

/// Encode a feature name table extension's data.
pub fn serialize_feature_table(table: &[FeatureName]) -> Vec<u8> {
    table.iter().flat_map(|f| f.to_entry()).collect()
}

/// The feature name table QEMU writes into v3 images with clusters larger than 4 KiB
/// (and so do we, so that older tools can name our features).
pub fn standard_feature_table() -> Vec<FeatureName> {
    use FeatureKind::*;
    vec![
        FeatureName::new(Incompatible, 0, "dirty bit"),
        FeatureName::new(Incompatible, 1, "corrupt bit"),
        FeatureName::new(Incompatible, 2, "external data file"),
        FeatureName::new(Incompatible, 3, "compression type"),
        FeatureName::new(Incompatible, 4, "extended L2 entries"),
        FeatureName::new(Compatible, 0, "lazy refcounts"),
        FeatureName::new(Autoclear, 0, "bitmaps"),
        FeatureName::new(Autoclear, 1, "raw external data"),
    ]
}

/// Names for every set bit of `bits` (an incompatible-feature mask), taken from `table` when it
/// has an incompatible entry for the bit, else `"bit N"`. Lowest bit first.
pub fn incompatible_feature_names(bits: u64, table: &[FeatureName]) -> Vec<String> {
    (0..64u8)
        .filter(|&b| bits & (1u64 << b) != 0)
        .map(|b| {
            table
                .iter()
                .find(|f| f.kind == FeatureKind::Incompatible && f.bit == b && !f.name.is_empty())
                .map_or_else(|| format!("bit {b}"), |f| f.name.clone())
        })
        .collect()
}

/// The message for an image whose incompatible mask has bits outside [`KNOWN_INCOMPATIBLE`],
/// or `None` when there are none.
pub fn unknown_incompatible_message(incompatible: u64, table: &[FeatureName]) -> Option<String> {
    let unknown = incompatible & !KNOWN_INCOMPATIBLE;
    if unknown == 0 {
        return None;
    }
    let names = incompatible_feature_names(unknown, table).join(", ");
    Some(format!(
        "unsupported incompatible feature(s) in incompatible_features: {names}"
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Found by the `parsers` fuzz target (CI smoke run): a name of invalid UTF-8 bytes
    /// decodes to U+FFFD characters, three bytes each, longer than the 46-byte field; the
    /// encoder cut the last one in half and the entry read back differently.
    #[test]
    fn invalid_utf8_name_round_trips() {
        let mut entry = [0u8; FEATURE_NAME_ENTRY_SIZE];
        entry[2..17].copy_from_slice(b"compression typ");
        entry[17..].fill(0xff);
        let name = FeatureName::from_entry(&entry);
        assert!(name.name.len() <= FEATURE_NAME_MAX);
        assert_eq!(FeatureName::from_entry(&name.to_entry()), name);
        // A user-made name with a multi-byte character at the cut stays valid.
        let long = FeatureName::new(FeatureKind::Compatible, 0, &"é".repeat(40));
        assert_eq!(
            FeatureName::from_entry(&long.to_entry()).name,
            "é".repeat(23)
        );
    }

    #[test]
    fn bit_values_match_the_spec() {
        assert_eq!(DIRTY, 1);
        assert_eq!(CORRUPT, 2);
        assert_eq!(EXTERNAL_DATA_FILE, 4);
        assert_eq!(COMPRESSION_TYPE, 8);
        assert_eq!(EXTENDED_L2, 16);
        assert_eq!(KNOWN_INCOMPATIBLE, 0x1f);
        assert_eq!(LAZY_REFCOUNTS, 1);
        assert_eq!(KNOWN_AUTOCLEAR, 0x3);
    }

    #[test]
    fn entry_fixture_parses_and_round_trips() {
        let mut e = [0u8; 48];
        e[0] = 0; // type: incompatible
        e[1] = 4; // bit 4
        e[2..21].copy_from_slice(b"extended L2 entries"); // name, zero padded
        let f = FeatureName::from_entry(&e);
        assert_eq!(
            f,
            FeatureName::new(FeatureKind::Incompatible, 4, "extended L2 entries")
        );
        assert_eq!(f.to_entry(), e);
    }

    #[test]
    fn full_length_name_has_no_terminator() {
        let mut e = [b'x'; 48];
        e[0] = 2; // autoclear
        e[1] = 63; // bit 63
        let f = FeatureName::from_entry(&e);
        assert_eq!(f.name.len(), 46);
        assert_eq!(f.kind, FeatureKind::Autoclear);
        assert_eq!(f.to_entry(), e);
    }

    #[test]
    fn unknown_kind_is_preserved() {
        let mut e = [0u8; 48];
        e[0] = 7;
        assert_eq!(FeatureName::from_entry(&e).kind, FeatureKind::Unknown(7));
        assert_eq!(FeatureName::from_entry(&e).to_entry(), e);
    }

    #[test]
    fn long_name_is_truncated_when_written() {
        let f = FeatureName::new(FeatureKind::Compatible, 1, &"y".repeat(60));
        let e = f.to_entry();
        assert_eq!(FeatureName::from_entry(&e).name, "y".repeat(46));
    }

    #[test]
    fn table_round_trips_and_ignores_partial_tail() {
        let table = standard_feature_table();
        let mut bytes = serialize_feature_table(&table);
        assert_eq!(bytes.len(), 8 * 48);
        assert_eq!(parse_feature_table(&bytes), table);
        bytes.extend_from_slice(&[1, 2, 3]);
        assert_eq!(parse_feature_table(&bytes), table);
    }

    #[test]
    fn unknown_bits_are_named_from_the_table_or_by_number() {
        let table = vec![
            FeatureName::new(FeatureKind::Incompatible, 9, "future thing"),
            FeatureName::new(FeatureKind::Compatible, 10, "not this one"),
        ];
        let msg = unknown_incompatible_message(DIRTY | (1 << 9) | (1 << 10), &table).unwrap();
        assert!(msg.contains("future thing"), "{msg}");
        assert!(msg.contains("bit 10"), "{msg}");
        assert!(!msg.contains("dirty"), "{msg}");
        assert_eq!(
            unknown_incompatible_message(KNOWN_INCOMPATIBLE, &table),
            None
        );
    }
}
