//! Header extensions and the backing file name: the rest of cluster 0 after the header.
//!
//! ```text
//!  0 ........ header_length   Header (header.rs)
//!  header_length ...          extensions, each:
//!                               offset size field
//!                               0      4    type (magic below; 0 = end of the area)
//!                               4      4    length of the data
//!                               8      len  data
//!                               8+len  ...  zero padding to a multiple of 8
//!  ...                        end marker (type 0, length 0)
//!  backing_file_offset ...    backing file name (backing_file_size bytes, no NUL)
//!  ... cluster size           zeros
//! ```
//!
//! The extension area ends at `backing_file_offset` when there is a backing file, else at the
//! end of cluster 0; a missing end marker is tolerated when the area is exactly full (as QEMU
//! does). Unknown extensions are kept verbatim, in order, and written back.

use crate::error::{Error, Result};
use crate::format::features::{self, FeatureName};

/// Type of the end-of-extensions marker.
pub const EXT_END: u32 = 0;
/// Type of the backing file format name extension.
pub const EXT_BACKING_FORMAT: u32 = 0xe279_2aca;
/// Type of the feature name table extension.
pub const EXT_FEATURE_TABLE: u32 = 0x6803_f857;
/// Type of the bitmaps extension.
pub const EXT_BITMAPS: u32 = 0x2385_2875;
/// Type of the full disk encryption header pointer extension.
pub const EXT_FULL_DISK_ENCRYPTION: u32 = 0x0537_be77;
/// Type of the external data file name extension.
pub const EXT_EXTERNAL_DATA_FILE: u32 = 0x4441_5441;

/// Size of an extension's type + length prefix.
pub const EXT_HEADER_SIZE: usize = 8;
/// Data length of the bitmaps extension.
pub const BITMAPS_EXT_SIZE: usize = 24;
/// Data length of the full disk encryption extension.
pub const FDE_EXT_SIZE: usize = 16;
/// QEMU keeps the backing format in a 16-byte C string: at most 15 bytes.
pub const MAX_BACKING_FORMAT: usize = 15;
/// QEMU's limit on persistent bitmaps.
pub const MAX_BITMAPS: u32 = 65535;
/// QEMU's limit on the bitmap directory size.
pub const MAX_BITMAP_DIRECTORY_SIZE: u64 = 1024 * MAX_BITMAPS as u64;

/// One header extension.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Extension {
    /// `0xe2792aca`: format name of the backing file (e.g. "qcow2", "raw").
    BackingFormat(String),
    /// `0x6803f857`: names of feature bits, for error messages.
    FeatureNameTable(Vec<FeatureName>),
    /// `0x23852875`: persistent dirty bitmaps. `raw` is the 24 data bytes as read (so the
    /// reserved field round-trips); the named fields win when it is written.
    Bitmaps {
        /// Number of bitmaps (1..=65535).
        nb_bitmaps: u32,
        /// Size of the bitmap directory in bytes.
        bitmap_directory_size: u64,
        /// Cluster aligned offset of the bitmap directory.
        bitmap_directory_offset: u64,
        /// The extension data as read.
        raw: Vec<u8>,
    },
    /// `0x0537be77`: where the LUKS header lives.
    FullDiskEncryption {
        /// Cluster aligned offset of the encryption header.
        offset: u64,
        /// Length of the encryption header in bytes.
        length: u64,
    },
    /// `0x44415441`: name of the external data file.
    ExternalDataFile(String),
    /// Any other type, kept verbatim.
    Unknown {
        /// The extension type.
        kind: u32,
        /// The extension data (without padding).
        data: Vec<u8>,
    },
}

/// Big-endian u32 from 4 bytes at `off` of `b` (caller checked the length).
fn be32(b: &[u8], off: usize) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[off..off + 4]);
    u32::from_be_bytes(a)
}

/// Big-endian u64 from 8 bytes at `off` of `b` (caller checked the length).
fn be64(b: &[u8], off: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[off..off + 8]);
    u64::from_be_bytes(a)
}

/// A string extension's data as UTF-8.
fn ext_string(what: &str, data: &[u8]) -> Result<String> {
    String::from_utf8(data.to_vec())
        .map_err(|_| Error::unsupported(format!("{what} is not valid UTF-8")))
}

impl Extension {
    /// Decode one extension from its type and data (without padding).
    pub fn decode(kind: u32, data: &[u8]) -> Result<Extension> {
        Ok(match kind {
            EXT_BACKING_FORMAT => Extension::BackingFormat(ext_string("backing format", data)?),
            EXT_FEATURE_TABLE => Extension::FeatureNameTable(features::parse_feature_table(data)),
            EXT_BITMAPS => Self::decode_bitmaps(data)?,
            EXT_FULL_DISK_ENCRYPTION => Self::decode_fde(data)?,
            EXT_EXTERNAL_DATA_FILE => {
                Extension::ExternalDataFile(ext_string("external data file name", data)?)
            }
            kind => Extension::Unknown {
                kind,
                data: data.to_vec(),
            },
        })
    }

    /// The bitmaps extension: exactly 24 bytes.
    fn decode_bitmaps(data: &[u8]) -> Result<Extension> {
        if data.len() != BITMAPS_EXT_SIZE {
            return Err(Error::invalid(format!(
                "bitmaps extension length {} (must be 24)",
                data.len()
            )));
        }
        Ok(Extension::Bitmaps {
            nb_bitmaps: be32(data, 0),
            bitmap_directory_size: be64(data, 8),
            bitmap_directory_offset: be64(data, 16),
            raw: data.to_vec(),
        })
    }

    /// The full disk encryption extension: exactly 16 bytes.
    fn decode_fde(data: &[u8]) -> Result<Extension> {
        if data.len() != FDE_EXT_SIZE {
            return Err(Error::invalid(format!(
                "full disk encryption extension length {} (must be 16)",
                data.len()
            )));
        }
        Ok(Extension::FullDiskEncryption {
            offset: be64(data, 0),
            length: be64(data, 8),
        })
    }

    /// The extension's type magic.
    pub fn kind(&self) -> u32 {
        match self {
            Extension::BackingFormat(_) => EXT_BACKING_FORMAT,
            Extension::FeatureNameTable(_) => EXT_FEATURE_TABLE,
            Extension::Bitmaps { .. } => EXT_BITMAPS,
            Extension::FullDiskEncryption { .. } => EXT_FULL_DISK_ENCRYPTION,
            Extension::ExternalDataFile(_) => EXT_EXTERNAL_DATA_FILE,
            Extension::Unknown { kind, .. } => *kind,
        }
    }

    /// The extension's data as written (without the type/length prefix and padding).
    pub fn data(&self) -> Vec<u8> {
        match self {
            Extension::BackingFormat(s) | Extension::ExternalDataFile(s) => s.as_bytes().to_vec(),
            Extension::FeatureNameTable(t) => features::serialize_feature_table(t),
            Extension::Bitmaps {
                nb_bitmaps,
                bitmap_directory_size,
                bitmap_directory_offset,
                raw,
            } => {
                let mut d = vec![0u8; BITMAPS_EXT_SIZE];
                if raw.len() == BITMAPS_EXT_SIZE {
                    d.copy_from_slice(raw);
                }
                d[0..4].copy_from_slice(&nb_bitmaps.to_be_bytes());
                d[8..16].copy_from_slice(&bitmap_directory_size.to_be_bytes());
                d[16..24].copy_from_slice(&bitmap_directory_offset.to_be_bytes());
                d
            }
            Extension::FullDiskEncryption { offset, length } => {
                [offset.to_be_bytes(), length.to_be_bytes()].concat()
            }
            Extension::Unknown { data, .. } => data.clone(),
        }
    }

    /// Append the encoded extension (prefix, data, zero padding to 8) to `out`.
    pub fn encode_into(&self, out: &mut Vec<u8>) {
        let data = self.data();
        out.extend_from_slice(&self.kind().to_be_bytes());
        // Extension data comes from cluster 0 or from fields bounded by it (≤ 2 MiB).
        let len = u32::try_from(data.len()).unwrap_or(u32::MAX);
        out.extend_from_slice(&len.to_be_bytes());
        out.extend_from_slice(&data);
        out.resize(out.len().next_multiple_of(8), 0);
    }
}

/// Decode the extensions in `area[start..]` up to the end marker or the end of `area`.
/// Offsets in errors are relative to the start of `area` (cluster 0).
pub fn parse_extensions(area: &[u8], start: usize) -> Result<Vec<Extension>> {
    let mut exts = Vec::new();
    let mut off = start;
    while off < area.len() {
        let Some(prefix) = area.get(off..off + EXT_HEADER_SIZE) else {
            return Err(Error::invalid("header extension prefix truncated").at(off as u64));
        };
        let (kind, len) = (be32(prefix, 0), crate::units::u32_to_usize(be32(prefix, 4)));
        let data_start = off + EXT_HEADER_SIZE;
        if len > area.len() - data_start {
            return Err(Error::invalid(format!(
                "header extension {kind:#010x} length {len} too large"
            ))
            .at(off as u64));
        }
        if kind == EXT_END {
            break;
        }
        let ext = Extension::decode(kind, &area[data_start..data_start + len])
            .map_err(|e| e.at(off as u64))?;
        exts.push(ext);
        off = data_start + len.next_multiple_of(8);
    }
    Ok(exts)
}

/// Encode `exts` followed by the end marker.
pub fn serialize_extensions(exts: &[Extension]) -> Vec<u8> {
    let mut out = Vec::new();
    for e in exts {
        e.encode_into(&mut out);
    }
    out.extend_from_slice(&[0u8; EXT_HEADER_SIZE]);
    out
}

mod image_header;
pub use image_header::ImageHeader;

#[cfg(test)]
mod tests;
