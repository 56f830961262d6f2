//! [`Header::validate`]: the limits QEMU enforces when it opens an image, plus the spec's rules
//! on `header_length`. Each check names the offending field in its message.
//!
//! Kinds: [`ErrorKind::InvalidImage`](crate::ErrorKind::InvalidImage) for a field out of range;
//! [`ErrorKind::Unsupported`](crate::ErrorKind::Unsupported) for what is valid but not
//! implemented here (unknown incompatible features, unknown compression types, encryption).

use super::*;

/// Largest offset + length a table may reach (QEMU uses signed 64-bit file offsets).
const MAX_FILE_OFFSET: u64 = i64::MAX as u64;
/// QEMU refuses an image whose minimum L1 size exceeds INT_MAX.
const MAX_L1_INDEX: u64 = i32::MAX as u64;

impl Header {
    /// Check every field against what QEMU enforces at open. `file_len` is the image file's
    /// length: the L1, refcount and snapshot tables must lie inside it.
    pub fn validate(&self, file_len: u64) -> Result<()> {
        self.check_version_and_length()?;
        self.check_cluster_bits()?;
        self.check_header_fits()?;
        self.check_backing_name()?;
        self.check_features()?;
        self.check_compression_type()?;
        self.check_refcount_order()?;
        self.check_crypt_method()?;
        self.check_refcount_table(file_len)?;
        self.check_snapshot_table(file_len)?;
        self.check_l1_table(file_len)
    }

    /// Version 2 has a fixed 72-byte header and no v3 fields; version 3 needs at least 104
    /// bytes, a multiple of 8, and `unknown_tail` must match the length.
    fn check_version_and_length(&self) -> Result<()> {
        match self.version {
            2 => self.check_v2_implied_fields(),
            3 => self.check_v3_header_length(),
            v => Err(Error::unsupported(format!("qcow2 version {v}")).at(VERSION_OFFSET as u64)),
        }
    }

    /// The v3-only fields of a version 2 header must hold their implied values.
    fn check_v2_implied_fields(&self) -> Result<()> {
        if self.header_length != V2_HEADER_LENGTH_U32 {
            return Err(Error::invalid(format!(
                "header_length {} must be 72 for version 2",
                self.header_length
            )));
        }
        if self.refcount_order != 4 {
            return Err(Error::invalid(format!(
                "refcount_order {} must be 4 (16-bit refcounts) for version 2",
                self.refcount_order
            )));
        }
        let features = self.incompatible_features | self.compatible_features;
        if features | self.autoclear_features != 0 || self.compression_type != 0 {
            return Err(Error::invalid("version 2 header cannot carry feature bits"));
        }
        Ok(())
    }

    /// `header_length` of a version 3 header.
    fn check_v3_header_length(&self) -> Result<()> {
        let len = u32_to_usize(self.header_length);
        let at = HEADER_LENGTH_OFFSET as u64;
        if len < V3_MIN_HEADER_LENGTH {
            return Err(Error::invalid(format!("header_length {len} is less than 104")).at(at));
        }
        if len % 8 != 0 {
            return Err(
                Error::invalid(format!("header_length {len} is not a multiple of 8")).at(at),
            );
        }
        let tail = len.saturating_sub(KNOWN_HEADER_END);
        if self.unknown_tail.len() != tail {
            return Err(Error::invalid(format!(
                "header_length {len} disagrees with {} preserved unknown header bytes",
                self.unknown_tail.len()
            )));
        }
        Ok(())
    }

    /// cluster_bits 9..=21, and at least 14 with extended L2 (subclusters >= 512 bytes).
    fn check_cluster_bits(&self) -> Result<()> {
        let bits = self.cluster_bits;
        let at = CLUSTER_BITS_OFFSET as u64;
        if !(MIN_CLUSTER_BITS..=MAX_CLUSTER_BITS).contains(&bits) {
            return Err(Error::invalid(format!(
                "cluster_bits {bits} out of range {MIN_CLUSTER_BITS}..={MAX_CLUSTER_BITS}"
            ))
            .at(at));
        }
        if self.extended_l2() && bits < MIN_EXTENDED_L2_CLUSTER_BITS {
            return Err(Error::invalid(format!(
                "cluster_bits {bits} too small for extended L2 entries (needs >= 14)"
            ))
            .at(at));
        }
        Ok(())
    }

    /// The header must fit in cluster 0.
    fn check_header_fits(&self) -> Result<()> {
        if u64::from(self.header_length) > self.cluster_size() {
            return Err(Error::invalid(format!(
                "header_length {} exceeds the cluster size {}",
                self.header_length,
                self.cluster_size()
            ))
            .at(HEADER_LENGTH_OFFSET as u64));
        }
        Ok(())
    }

    /// The backing file name: at most 1023 bytes, inside cluster 0.
    fn check_backing_name(&self) -> Result<()> {
        let (off, len) = (self.backing_file_offset, u64::from(self.backing_file_size));
        let cluster = self.cluster_size();
        if off > cluster {
            return Err(Error::invalid(format!(
                "backing_file_offset {off:#x} lies outside cluster 0"
            ))
            .at(BACKING_FILE_OFFSET_OFFSET as u64));
        }
        if off != 0 && (len > u64::from(MAX_BACKING_FILE_NAME) || len > cluster - off) {
            return Err(Error::invalid(format!(
                "backing_file_size {len} too long (max 1023 bytes, inside cluster 0)"
            ))
            .at(BACKING_FILE_SIZE_OFFSET as u64));
        }
        Ok(())
    }

    /// Unknown incompatible bits refuse the open (named `bit N` here; `ImageHeader::validate`
    /// names them from the feature name table first). Raw external data needs a data file.
    fn check_features(&self) -> Result<()> {
        if let Some(msg) = features::unknown_incompatible_message(self.incompatible_features, &[]) {
            return Err(Error::unsupported(msg).at(INCOMPATIBLE_FEATURES_OFFSET as u64));
        }
        if self.data_file_raw() && !self.has_external_data_file() {
            return Err(Error::invalid(
                "autoclear_features has raw external data (bit 1) without an external data file",
            )
            .at(AUTOCLEAR_FEATURES_OFFSET as u64));
        }
        Ok(())
    }

    /// compression_type is 0 or 1, it is non-zero exactly when incompatible bit 3 is set, and
    /// a non-zero value needs the field to be present (`header_length` > 104).
    fn check_compression_type(&self) -> Result<()> {
        let ct = self.compression_type;
        let at = COMPRESSION_TYPE_OFFSET as u64;
        if ct > COMPRESSION_ZSTD {
            return Err(Error::unsupported(format!("compression_type {ct} unknown")).at(at));
        }
        if ct != 0 && u32_to_usize(self.header_length) <= COMPRESSION_TYPE_OFFSET {
            return Err(Error::invalid(
                "compression_type set but header_length leaves it out",
            ));
        }
        let bit = self.incompatible_features & features::COMPRESSION_TYPE != 0;
        if bit != (ct != 0) {
            return Err(Error::invalid(format!(
                "compression_type {ct} disagrees with incompatible_features bit 3 ({})",
                if bit { "set" } else { "clear" }
            ))
            .at(at));
        }
        Ok(())
    }

    /// refcount_order at most 6 (64-bit refcounts).
    fn check_refcount_order(&self) -> Result<()> {
        if self.refcount_order > MAX_REFCOUNT_ORDER {
            return Err(Error::invalid(format!(
                "refcount_order {} exceeds 6 (64-bit refcounts)",
                self.refcount_order
            ))
            .at(REFCOUNT_ORDER_OFFSET as u64));
        }
        Ok(())
    }

    /// crypt_method 0, 1 or 2. Encrypted images are valid: the engine opens them (so `info`
    /// and `map` work) and refuses data access itself.
    fn check_crypt_method(&self) -> Result<()> {
        let at = CRYPT_METHOD_OFFSET as u64;
        match self.crypt_method {
            CRYPT_NONE | CRYPT_AES | CRYPT_LUKS => Ok(()),
            m => Err(Error::invalid(format!("crypt_method {m} unknown")).at(at)),
        }
    }

    /// The refcount table: present, at most 8 MiB, cluster aligned, inside the file.
    fn check_refcount_table(&self, file_len: u64) -> Result<()> {
        if self.refcount_table_clusters == 0 {
            return Err(
                Error::invalid("refcount_table_clusters is 0 (no refcount table)")
                    .at(REFCOUNT_TABLE_CLUSTERS_OFFSET as u64),
            );
        }
        let bytes = u64::from(self.refcount_table_clusters) * self.cluster_size();
        if bytes > MAX_REFCOUNT_TABLE_BYTES {
            return Err(Error::invalid(format!(
                "refcount_table_clusters {} exceeds the 8 MiB refcount table limit",
                self.refcount_table_clusters
            ))
            .at(REFCOUNT_TABLE_CLUSTERS_OFFSET as u64));
        }
        self.check_table(
            "refcount_table_offset",
            self.refcount_table_offset,
            bytes,
            file_len,
        )
    }

    /// The snapshot table: at most 65536 snapshots, cluster aligned, inside the file.
    fn check_snapshot_table(&self, file_len: u64) -> Result<()> {
        if self.nb_snapshots > MAX_SNAPSHOTS {
            return Err(Error::invalid(format!(
                "nb_snapshots {} exceeds {MAX_SNAPSHOTS}",
                self.nb_snapshots
            ))
            .at(NB_SNAPSHOTS_OFFSET as u64));
        }
        let bytes = u64::from(self.nb_snapshots) * MIN_SNAPSHOT_ENTRY_SIZE;
        self.check_table("snapshots_offset", self.snapshots_offset, bytes, file_len)
    }

    /// The active L1 table: at most 32 MiB, big enough for `size`, aligned, inside the file.
    fn check_l1_table(&self, file_len: u64) -> Result<()> {
        let bytes = u64::from(self.l1_size) * L1_ENTRY_SIZE;
        if bytes > MAX_L1_BYTES {
            return Err(Error::invalid(format!(
                "l1_size {} exceeds the 32 MiB L1 table limit",
                self.l1_size
            ))
            .at(L1_SIZE_OFFSET as u64));
        }
        self.check_table("l1_table_offset", self.l1_table_offset, bytes, file_len)?;
        self.check_size_fits_l1()
    }

    /// `size` must be addressable: within QEMU's limits and covered by `l1_size` entries.
    fn check_size_fits_l1(&self) -> Result<()> {
        let need = self.min_l1_size();
        if self.size > MAX_FILE_OFFSET || need > MAX_L1_INDEX {
            return Err(
                Error::invalid(format!("size {} is too big", self.size)).at(SIZE_OFFSET as u64)
            );
        }
        if u64::from(self.l1_size) < need {
            return Err(Error::invalid(format!(
                "l1_size {} too small for size {} (needs {need})",
                self.l1_size, self.size
            ))
            .at(L1_SIZE_OFFSET as u64));
        }
        Ok(())
    }

    /// The engine's extra rule at open: no table may lie in the header cluster. (QEMU opens
    /// such an image and marks it corrupt at the first write, after its L1 or refcount
    /// update was refused; refusing at open says what is wrong before anything is tried.
    /// `check` does not call this, so it can still report on such an image.)
    pub fn check_tables_clear_of_header(&self) -> Result<()> {
        let tables = [
            ("l1_table_offset", self.l1_table_offset, self.l1_size > 0),
            ("refcount_table_offset", self.refcount_table_offset, true),
            (
                "snapshots_offset",
                self.snapshots_offset,
                self.nb_snapshots > 0,
            ),
        ];
        for (field, offset, present) in tables {
            if present && offset < self.cluster_size() {
                return Err(Error::invalid(format!(
                    "{field} {offset:#x} points into the header cluster"
                )));
            }
        }
        Ok(())
    }

    /// A table at `offset` of `bytes` bytes: cluster aligned, not wrapping, inside the file
    /// (an empty table only needs the alignment, as in QEMU).
    fn check_table(&self, field: &str, offset: u64, bytes: u64, file_len: u64) -> Result<()> {
        if offset % self.cluster_size() != 0 {
            return Err(Error::invalid(format!(
                "{field} {offset:#x} is not cluster aligned"
            )));
        }
        let end = offset.checked_add(bytes).filter(|&e| e <= MAX_FILE_OFFSET);
        let Some(end) = end else {
            return Err(Error::invalid(format!(
                "{field} {offset:#x} + {bytes} bytes overflows"
            )));
        };
        if bytes != 0 && end > file_len {
            return Err(Error::invalid(format!(
                "{field} {offset:#x}: table of {bytes} bytes ends past the end of the file \
                 ({file_len} bytes)"
            )));
        }
        Ok(())
    }
}
