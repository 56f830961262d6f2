//! [`ImageHeader`]: everything cluster 0 holds — the header, its extensions and the backing
//! file name — parsed, validated and written back as one unit.

use super::*;
use crate::format::header::{self, Header};

/// Cluster 0 decoded: header, extensions (in on-disk order) and backing file name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageHeader {
    /// The fixed header. Its `backing_file_offset`/`backing_file_size` are recomputed by
    /// [`ImageHeader::to_cluster0`].
    pub header: Header,
    /// Header extensions in on-disk order (without the end marker).
    pub extensions: Vec<Extension>,
    /// The backing file name, if any.
    pub backing_file: Option<String>,
}

impl ImageHeader {
    /// Decode cluster 0. `cluster0` should be the whole first cluster; the extension area is
    /// bounded by it, by the cluster size and by `backing_file_offset`. Only what is needed to
    /// decode is checked: call [`ImageHeader::validate`] before trusting the image.
    ///
    /// ```
    /// # use qcow2_engine::format::extensions::ImageHeader;
    /// assert!(ImageHeader::parse(b"not a qcow2 image").is_err());
    /// ```
    pub fn parse(cluster0: &[u8]) -> Result<ImageHeader> {
        let header = Header::from_bytes(cluster0)?;
        let extensions = parse_extensions(&cluster0[..ext_area_end(&header, cluster0)], {
            crate::units::u32_to_usize(header.header_length)
        })
        .map_err(|e| prefer_feature_error(&header, e))?;
        let backing_file = read_backing_name(&header, cluster0)?;
        Ok(ImageHeader {
            header,
            extensions,
            backing_file,
        })
    }

    /// Encode cluster 0: header (with the backing file fields recomputed), extensions, end
    /// marker, backing file name, zero padded to exactly one cluster. Fails with
    /// [`ErrorKind::InvalidArgument`](crate::ErrorKind::InvalidArgument) if it does not fit,
    /// if the backing name is longer than 1023 bytes, or if `cluster_bits` is out of range.
    pub fn to_cluster0(&self) -> Result<Vec<u8>> {
        let bits = self.header.cluster_bits;
        if !(header::MIN_CLUSTER_BITS..=header::MAX_CLUSTER_BITS).contains(&bits) {
            return Err(Error::invalid_arg(format!(
                "cluster_bits {bits} out of range"
            )));
        }
        let cluster = usize::try_from(self.header.cluster_size())
            .map_err(|_| Error::invalid_arg("cluster size does not fit in memory"))?;
        let mut h = self.header.clone();
        let tail = serialize_extensions(&self.extensions);
        let name = self.backing_file.as_deref().unwrap_or("").as_bytes();
        if name.len() > header::MAX_BACKING_FILE_NAME as usize {
            return Err(Error::invalid_arg(
                "backing file name longer than 1023 bytes",
            ));
        }
        let name_off = h.to_bytes().len() + tail.len();
        (h.backing_file_offset, h.backing_file_size) = match self.backing_file {
            // The name is at most 1023 bytes (checked above).
            Some(_) => (
                name_off as u64,
                u32::try_from(name.len()).unwrap_or(u32::MAX),
            ),
            None => (0, 0),
        };
        let mut out = [h.to_bytes(), tail, name.to_vec()].concat();
        if out.len() > cluster {
            return Err(Error::invalid_arg(format!(
                "header, extensions and backing file name need {} bytes, more than the \
                 {cluster}-byte cluster",
                out.len()
            )));
        }
        out.resize(cluster, 0);
        Ok(out)
    }

    /// [`Header::validate`] plus the extension rules QEMU enforces at open. Unknown
    /// incompatible features are reported first, named from the image's feature name table.
    pub fn validate(&self, file_len: u64) -> Result<()> {
        let incompat = self.header.incompatible_features;
        if let Some(msg) = features::unknown_incompatible_message(incompat, self.feature_names()) {
            return Err(Error::unsupported(msg));
        }
        self.header.validate(file_len)?;
        self.extensions
            .iter()
            .try_for_each(|e| self.check_extension(e))
    }

    /// One extension's rules.
    fn check_extension(&self, ext: &Extension) -> Result<()> {
        match ext {
            Extension::BackingFormat(f) if f.len() > MAX_BACKING_FORMAT => Err(Error::invalid(
                format!("backing format name {} bytes long (max 15)", f.len()),
            )),
            Extension::FullDiskEncryption { offset, .. } => self.check_fde(*offset),
            Extension::Bitmaps { .. } if self.header.bitmaps_consistent() => {
                check_bitmaps(ext, self.header.cluster_size())
            }
            _ => Ok(()),
        }
    }

    /// The encryption extension is only allowed with LUKS and must be cluster aligned.
    fn check_fde(&self, offset: u64) -> Result<()> {
        if self.header.crypt_method != header::CRYPT_LUKS {
            return Err(Error::invalid(
                "full disk encryption extension present but crypt_method is not LUKS",
            ));
        }
        if offset.checked_rem(self.header.cluster_size()) != Some(0) {
            return Err(Error::invalid(format!(
                "full disk encryption header offset {offset:#x} is not cluster aligned"
            )));
        }
        Ok(())
    }

    /// The backing file format, if recorded.
    pub fn backing_format(&self) -> Option<&str> {
        self.extensions.iter().rev().find_map(|e| match e {
            Extension::BackingFormat(f) => Some(f.as_str()),
            _ => None,
        })
    }

    /// The external data file name, if recorded.
    pub fn data_file(&self) -> Option<&str> {
        self.extensions.iter().rev().find_map(|e| match e {
            Extension::ExternalDataFile(f) => Some(f.as_str()),
            _ => None,
        })
    }

    /// The image's feature name table (empty when it has none).
    pub fn feature_names(&self) -> &[FeatureName] {
        self.extensions
            .iter()
            .find_map(|e| match e {
                Extension::FeatureNameTable(t) => Some(t.as_slice()),
                _ => None,
            })
            .unwrap_or(&[])
    }

    /// The bitmaps extension's (nb_bitmaps, directory size, directory offset), if present.
    pub fn bitmaps(&self) -> Option<(u32, u64, u64)> {
        self.extensions.iter().find_map(|e| match e {
            Extension::Bitmaps {
                nb_bitmaps,
                bitmap_directory_size,
                bitmap_directory_offset,
                ..
            } => Some((
                *nb_bitmaps,
                *bitmap_directory_size,
                *bitmap_directory_offset,
            )),
            _ => None,
        })
    }

    /// Set or remove the backing file `(name, format)`. The format extension goes first, as
    /// QEMU writes it. The header's backing fields are updated by [`ImageHeader::to_cluster0`].
    pub fn set_backing(&mut self, backing: Option<(String, Option<String>)>) {
        self.remove_extensions(EXT_BACKING_FORMAT);
        let (name, format) = backing.map_or((None, None), |(n, f)| (Some(n), f));
        if let Some(f) = format {
            self.extensions.insert(0, Extension::BackingFormat(f));
        }
        self.backing_file = name;
    }

    /// Set or remove the external data file name extension. The incompatible feature bit is
    /// the caller's to set or clear.
    pub fn set_data_file(&mut self, name: Option<String>) {
        self.remove_extensions(EXT_EXTERNAL_DATA_FILE);
        if let Some(n) = name {
            let at = usize::from(self.backing_format().is_some());
            self.extensions.insert(at, Extension::ExternalDataFile(n));
        }
    }

    /// Drop every extension of type `kind` (e.g. a stale bitmaps extension).
    pub fn remove_extensions(&mut self, kind: u32) {
        self.extensions.retain(|e| e.kind() != kind);
    }
}

/// Where the extension area ends: the backing file name, else the cluster end, within `buf`.
fn ext_area_end(h: &Header, buf: &[u8]) -> usize {
    let cluster = usize::try_from(h.cluster_size()).unwrap_or(usize::MAX);
    let mut end = buf
        .len()
        .min(if cluster == 0 { usize::MAX } else { cluster });
    if h.backing_file_offset != 0 {
        end = end.min(usize::try_from(h.backing_file_offset).unwrap_or(usize::MAX));
    }
    end
}

/// An image with unknown incompatible features must be refused as such even if its
/// extensions do not parse (QEMU reports the feature, not the extension).
fn prefer_feature_error(h: &Header, e: Error) -> Error {
    match features::unknown_incompatible_message(h.incompatible_features, &[]) {
        Some(msg) => Error::unsupported(msg),
        None => e,
    }
}

/// The backing file name stored in cluster 0, if the header points at one.
fn read_backing_name(h: &Header, cluster0: &[u8]) -> Result<Option<String>> {
    if h.backing_file_offset == 0 {
        return Ok(None);
    }
    let len = u64::from(h.backing_file_size);
    let start = h.backing_file_offset;
    let limit = (cluster0.len() as u64).min(h.cluster_size());
    if len > u64::from(header::MAX_BACKING_FILE_NAME) || start > limit || len > limit - start {
        return Err(Error::invalid(format!(
            "backing file name ({len} bytes at {start:#x}) does not fit in cluster 0"
        ))
        .at(header::BACKING_FILE_OFFSET_OFFSET as u64));
    }
    // Both ends are within `limit`, itself at most `cluster0.len()`.
    let (from, to) = (usize::try_from(start), usize::try_from(start + len));
    let (Ok(from), Ok(to)) = (from, to) else {
        return Err(Error::invalid("backing file name offset out of range"));
    };
    let bytes = &cluster0[from..to];
    ext_string("backing file name", bytes).map(Some)
}

/// The bitmaps extension's fields, when the bitmaps autoclear bit says they are consistent.
fn check_bitmaps(ext: &Extension, cluster_size: u64) -> Result<()> {
    let Extension::Bitmaps {
        nb_bitmaps,
        bitmap_directory_size,
        bitmap_directory_offset,
        raw,
    } = ext
    else {
        return Ok(());
    };
    if raw.get(4..8).is_some_and(|r| r != [0; 4]) {
        return Err(Error::invalid(
            "bitmaps extension reserved field is not zero",
        ));
    }
    if *nb_bitmaps == 0 || *nb_bitmaps > MAX_BITMAPS {
        return Err(Error::invalid(format!(
            "bitmaps extension nb_bitmaps {nb_bitmaps} out of range"
        )));
    }
    if bitmap_directory_offset.checked_rem(cluster_size) != Some(0) {
        return Err(Error::invalid(
            "bitmaps extension bitmap_directory_offset not cluster aligned",
        ));
    }
    if *bitmap_directory_size > MAX_BITMAP_DIRECTORY_SIZE {
        return Err(Error::invalid(
            "bitmaps extension bitmap_directory_size too large",
        ));
    }
    Ok(())
}
