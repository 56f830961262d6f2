//! The metadata overlap check (QEMU's `qcow2_check_metadata_overlap`).
//!
//! A map from host cluster index to the kinds of metadata the cluster holds, kept up to date
//! as L2 tables, refcount blocks and tables and L1 tables are allocated and freed (what the
//! engine never frees, `Kinds::NEVER_FREED`, is never removed: see `alloc/sanity.rs`). Every data
//! write, every metadata write and every allocation consults it. A hit means the image's
//! metadata contradicts itself (an L2 entry mapping data onto a table, refcounts claiming a
//! table is free, ...): the write is refused, the corrupt bit (incompatible feature bit 1) is
//! set on disk, and the image refuses all further writes — the same as QEMU, which refuses a
//! read-write open of a corrupt-marked image until `check -r` repairs it.
//!
//! Cost: the map holds one entry per metadata cluster (a few thousand for a TiB image with
//! 64 KiB clusters), so a check is one ordered-map range query under a read lock.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};

use crate::error::{Error, Result};
use crate::format::header::HeaderPatch;
use crate::storage::Storage;
use crate::units::HostOffset;

/// A set of metadata kinds (bit flags).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Kinds(pub u16);

impl Kinds {
    /// No kind: check against everything.
    pub const NONE: Kinds = Kinds(0);
    /// The header cluster.
    pub const HEADER: Kinds = Kinds(1);
    /// The active L1 table.
    pub const L1: Kinds = Kinds(1 << 1);
    /// An L2 table referenced by the active L1 table.
    pub const L2: Kinds = Kinds(1 << 2);
    /// The refcount table.
    pub const REFTABLE: Kinds = Kinds(1 << 3);
    /// A refcount block.
    pub const REFBLOCK: Kinds = Kinds(1 << 4);
    /// The snapshot table.
    pub const SNAPSHOT_TABLE: Kinds = Kinds(1 << 5);
    /// A snapshot's L1 table.
    pub const SNAPSHOT_L1: Kinds = Kinds(1 << 6);
    /// The bitmap directory.
    pub const BITMAP_DIRECTORY: Kinds = Kinds(1 << 7);
    /// A bitmap table.
    pub const BITMAP_TABLE: Kinds = Kinds(1 << 8);
    /// The encryption (LUKS) header.
    pub const CRYPTO_HEADER: Kinds = Kinds(1 << 9);
    /// An L2 table referenced by a snapshot's L1 table.
    pub const SNAPSHOT_L2: Kinds = Kinds(1 << 10);
    /// What the engine never frees while an image is open (it neither deletes snapshots nor
    /// bitmaps): a refcount dropping to 0 on one of these proves the refcounts wrong.
    pub const NEVER_FREED: Kinds = Kinds(
        Self::HEADER.0
            | Self::SNAPSHOT_TABLE.0
            | Self::SNAPSHOT_L1.0
            | Self::SNAPSHOT_L2.0
            | Self::BITMAP_DIRECTORY.0
            | Self::BITMAP_TABLE.0
            | Self::CRYPTO_HEADER.0,
    );

    const NAMES: [&'static str; 11] = [
        "qcow2_header",
        "active L1 table",
        "active L2 table",
        "refcount table",
        "refcount block",
        "snapshot table",
        "inactive L1 table",
        "bitmap directory",
        "bitmap table",
        "encryption header",
        "inactive L2 table",
    ];

    /// The name of the lowest kind in the set (QEMU's wording).
    pub fn name(self) -> &'static str {
        let i = self.0.trailing_zeros() as usize;
        Self::NAMES.get(i).copied().unwrap_or("metadata")
    }
}

const INCOMPATIBLE_FEATURES_OFFSET: u64 =
    crate::format::header::INCOMPATIBLE_FEATURES_OFFSET as u64;
const CORRUPT_BIT: u64 = crate::format::features::CORRUPT;

/// Where the metadata of one image lives, and whether a hit has marked it corrupt.
#[derive(Debug)]
pub struct MetadataMap {
    cluster_bits: u32,
    clusters: RwLock<BTreeMap<u64, u16>>,
    corrupt: AtomicBool,
    file: Arc<dyn Storage>,
}

impl MetadataMap {
    /// An empty map for an image with `cluster_bits`, whose header lives in `file`.
    pub fn new(file: Arc<dyn Storage>, cluster_bits: u32) -> Self {
        MetadataMap {
            cluster_bits,
            clusters: RwLock::new(BTreeMap::new()),
            corrupt: AtomicBool::new(false),
            file,
        }
    }

    /// log2 of the cluster size.
    pub fn cluster_bits(&self) -> u32 {
        self.cluster_bits
    }

    /// Host clusters touched by `[host, host + len)` (`len` > 0), as an inclusive range.
    fn cluster_span(&self, host: u64, len: u64) -> (u64, u64) {
        let last = host.saturating_add(len.max(1) - 1);
        (host >> self.cluster_bits, last >> self.cluster_bits)
    }

    /// Record that `[host, host + len)` holds metadata of kind `kind`.
    pub fn insert(&self, host: u64, len: u64, kind: Kinds) {
        if len == 0 {
            return;
        }
        let (first, last) = self.cluster_span(host, len);
        let mut map = self.clusters.write().unwrap_or_else(|p| p.into_inner());
        for c in first..=last {
            *map.entry(c).or_insert(0) |= kind.0;
        }
    }

    /// Forget host cluster `c` (its refcount dropped to 0: it holds nothing any more).
    pub fn remove_cluster(&self, c: u64) {
        let mut map = self.clusters.write().unwrap_or_else(|p| p.into_inner());
        map.remove(&c);
    }

    /// Forget that `[host, host + len)` holds metadata of the kinds in `kinds` (a snapshot
    /// being deleted lets go of its tables; other kinds stay).
    pub fn remove_kinds(&self, host: u64, len: u64, kinds: Kinds) {
        if len == 0 {
            return;
        }
        let (first, last) = self.cluster_span(host, len);
        let mut map = self.clusters.write().unwrap_or_else(|p| p.into_inner());
        for c in first..=last {
            if let Some(k) = map.get_mut(&c) {
                *k &= !kinds.0;
                if *k == 0 {
                    map.remove(&c);
                }
            }
        }
    }

    /// The kinds other than `ignore` held in `[host, host + len)`, if any.
    pub fn find(&self, host: u64, len: u64, ignore: Kinds) -> Option<Kinds> {
        let (first, last) = self.cluster_span(host, len);
        let map = self.clusters.read().unwrap_or_else(|p| p.into_inner());
        map.range(first..=last)
            .map(|(_, &k)| k & !ignore.0)
            .find(|&k| k != 0)
            .map(Kinds)
    }

    /// The kinds host cluster `c` holds (`Kinds::NONE` for none).
    pub fn kinds_of(&self, c: u64) -> Kinds {
        let map = self.clusters.read().unwrap_or_else(|p| p.into_inner());
        Kinds(map.get(&c).copied().unwrap_or(0))
    }

    /// Whether host cluster `c` holds metadata of any kind.
    pub fn holds_metadata(&self, c: u64) -> bool {
        let map = self.clusters.read().unwrap_or_else(|p| p.into_inner());
        map.contains_key(&c)
    }

    /// Whether a hit has marked the image corrupt.
    pub fn is_corrupt(&self) -> bool {
        self.corrupt.load(Ordering::Acquire)
    }

    /// Refuse a write of `len` bytes at `host` that would land on metadata other than
    /// `ignore`: mark the image corrupt and return the error.
    pub async fn check(&self, host: u64, len: u64, ignore: Kinds) -> Result<()> {
        match self.find(host, len, ignore) {
            None => Ok(()),
            Some(k) => Err(self
                .signal(format!(
                    "Preventing invalid write on metadata (overlaps with {})",
                    k.name()
                ))
                .await
                .at_host(HostOffset(host))),
        }
    }

    /// Mark the image corrupt (QEMU's `qcow2_signal_corruption`): set incompatible feature
    /// bit 1 on disk and latch, so that every later write is refused. Returns the error to
    /// report, which says whether the bit could be written.
    pub async fn signal(&self, what: String) -> Error {
        if self.corrupt.swap(true, Ordering::AcqRel) {
            return Error::corrupt(format!("{what}; the image is marked corrupt"));
        }
        match self.write_corrupt_bit().await {
            Ok(()) => Error::corrupt(format!(
                "{what}; image marked as corrupt (repair it with check -r all)"
            )),
            Err(e) => Error::corrupt(format!("{what}; marking the image corrupt failed too: {e}")),
        }
    }

    /// Read-modify-write the incompatible features field, then fsync. Nothing else rewrites
    /// that field while the image is open, and all writes stop after this.
    async fn write_corrupt_bit(&self) -> Result<()> {
        let mut b = [0u8; 8];
        let at = INCOMPATIBLE_FEATURES_OFFSET;
        self.file
            .read_at(&mut b, at)
            .await
            .map_err(|e| Error::io("reading the header", e).at_host(HostOffset(at)))?;
        let patch = HeaderPatch::incompatible_features(u64::from_be_bytes(b) | CORRUPT_BIT);
        self.file
            .write_at(patch.bytes(), patch.offset())
            .await
            .map_err(|e| Error::io("setting the corrupt bit", e).at_host(HostOffset(at)))?;
        self.file
            .flush()
            .await
            .map_err(|e| Error::io("syncing the header", e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map() -> MetadataMap {
        let file: Arc<dyn Storage> = Arc::new(crate::storage::MemoryStorage::new());
        MetadataMap::new(file, 16)
    }

    #[test]
    fn find_sees_every_cluster_of_a_range_and_honours_ignore() {
        let m = map();
        m.insert(0x30000, 0x20000, Kinds::L1);
        m.insert(0x40000, 0x10000, Kinds::REFBLOCK);
        assert_eq!(m.find(0x2ffff, 1, Kinds::NONE), None);
        assert_eq!(m.find(0x2ffff, 2, Kinds::NONE), Some(Kinds::L1));
        assert_eq!(m.find(0x40000, 512, Kinds::L1), Some(Kinds::REFBLOCK));
        assert_eq!(
            m.find(0x40000, 512, Kinds(Kinds::L1.0 | Kinds::REFBLOCK.0)),
            None
        );
        assert_eq!(m.find(0x50000, 0x10000, Kinds::NONE), None);
    }

    #[test]
    fn removing_a_cluster_forgets_all_its_kinds() {
        let m = map();
        m.insert(0x10000, 1, Kinds::L2);
        m.insert(0x10000, 1, Kinds::REFTABLE);
        assert!(m.holds_metadata(1));
        m.remove_cluster(1);
        assert!(!m.holds_metadata(1));
        assert_eq!(m.find(0x10000, 0x10000, Kinds::NONE), None);
    }

    #[test]
    fn a_hit_sets_the_corrupt_bit_once() {
        let m = map();
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        rt.block_on(async {
            m.file.write_at(&[0u8; 512], 0).await.unwrap();
            m.insert(0, 1, Kinds::HEADER);
            let e = m.check(100, 4096, Kinds::NONE).await.unwrap_err();
            assert_eq!(e.kind(), crate::ErrorKind::Corrupt);
            assert!(e.what().contains("qcow2_header"), "{e}");
            assert!(m.is_corrupt());
            let mut b = [0u8; 8];
            m.file.read_at(&mut b, 72).await.unwrap();
            assert_eq!(u64::from_be_bytes(b), CORRUPT_BIT);
        });
    }
}
