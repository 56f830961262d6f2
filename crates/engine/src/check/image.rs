//! [`Ctx`]: what the checker knows about an image before walking it — the validated header,
//! the refcount table, the active L1 table and the snapshot list — and its raw IO helpers.
//!
//! Only what QEMU also needs to open an image is required to be sane (the header and the
//! tables it names); everything below (L2 tables, refcount blocks, snapshot L1 tables) is read
//! by the walk and reported on, never trusted.

use std::sync::Arc;

use super::CheckOptions;
use super::budget::{Budget, Meter, Shape};
use crate::error::{Error, Result};
use crate::format::extensions::ImageHeader;
use crate::format::header::Header;
use crate::format::l2::L2Geometry;
use crate::format::refcount::{self, RefTableEntry};
use crate::format::snapshot::{self, Snapshot};
use crate::storage::Storage;
use crate::units::HostOffset;
use crate::units::to_usize;

/// The image being checked, as loaded from disk.
#[derive(Debug)]
pub(crate) struct Ctx {
    /// The image file.
    pub storage: Arc<dyn Storage>,
    /// Cluster 0, parsed and validated.
    pub ih: ImageHeader,
    /// log2 of the cluster size.
    pub bits: u32,
    /// Cluster size in bytes.
    pub cs: u64,
    /// log2 of the refcount width.
    pub order: u32,
    /// Length of the image file when loaded.
    pub file_len: u64,
    /// How L2 entries are laid out.
    pub geo: L2Geometry,
    /// Guest data lives in an external data file (data clusters have no refcounts here).
    pub data_file: bool,
    /// The refcount table entries, as stored.
    pub reftable: Vec<RefTableEntry>,
    /// The active L1 table, raw entries.
    pub l1: Vec<u64>,
    /// The internal snapshots.
    pub snapshots: Vec<Snapshot>,
    /// Bytes the snapshot table occupies (no padding after the last entry, as QEMU counts).
    pub snapshots_size: u64,
    /// Memory limit for the refcount arrays and caches.
    pub limit: u64,
    /// The options the check runs with (to load the image again after a rebuild).
    pub opts: CheckOptions,
    /// This pass's work so far, against its budget.
    pub meter: Meter,
}

impl Ctx {
    /// Read and validate what opening the image needs. Errors where QEMU could not open the
    /// image either (bad header, tables outside the file, unsupported features).
    pub(crate) async fn load(storage: Arc<dyn Storage>, opts: &CheckOptions) -> Result<Ctx> {
        let file_len = storage
            .len()
            .await
            .map_err(|e| Error::io("sizing the image", e))?;
        let ih = read_cluster0(storage.as_ref(), file_len).await?;
        let h = ih.header.clone();
        let cs = h.cluster_size();
        let mut ctx = Ctx {
            geo: L2Geometry {
                cluster_bits: h.cluster_bits,
                extended: h.extended_l2(),
                version3: h.version >= 3,
            },
            data_file: h.has_external_data_file(),
            bits: h.cluster_bits,
            order: h.refcount_order,
            cs,
            file_len,
            ih,
            storage,
            reftable: Vec::new(),
            l1: Vec::new(),
            snapshots: Vec::new(),
            snapshots_size: 0,
            limit: opts.max_memory,
            opts: opts.clone(),
            meter: Meter::new(Budget::uniform(0), true, None),
        };
        ctx.load_tables(&h).await?;
        ctx.meter = ctx.new_meter();
        Ok(ctx)
    }

    /// The work meter for one pass over this image, with the progress it expects to make
    /// up front: both scans of the active L1 table and its L2 tables (walk and COPIED check)
    /// and the snapshot L1 tables. Snapshot L2 tables, bitmap tables and comparisons are
    /// announced when they start.
    fn new_meter(&self) -> Meter {
        let shape = Shape {
            file_len: self.file_len,
            cluster_size: self.cs,
            l2_entries: self.l2_entries() as u64,
            snapshots: self.snapshots.len() as u64,
        };
        let limit = match self.opts.max_work {
            Some(work) => Budget::uniform(work),
            None => Budget::for_image(shape),
        };
        let meter = Meter::new(
            limit,
            self.opts.max_work.is_some(),
            self.opts.progress.clone(),
        );
        let l1 = self.l1.len() as u64;
        let l2 = self.l1.iter().filter(|&&e| e != 0).count() as u64 * shape.l2_entries;
        let snapshots: u64 = self.snapshots.iter().map(|s| u64::from(s.l1_size)).sum();
        meter.expect(2 * (l1 + l2) + snapshots);
        meter
    }

    /// The refcount table, the active L1 table and the snapshot table.
    async fn load_tables(&mut self, h: &Header) -> Result<()> {
        // validate() bounded the refcount table to 8 MiB and the L1 table to 32 MiB.
        let rt_len = u64::from(h.refcount_table_clusters) * self.cs;
        let buf = self.read(h.refcount_table_offset, rt_len).await?;
        self.reftable = refcount::parse_table(&buf);
        let buf = self
            .read(h.l1_table_offset, u64::from(h.l1_size) * 8)
            .await?;
        self.l1 = be_u64s(&buf);
        self.load_snapshots(h).await
    }

    /// Read the snapshot table entry by entry (its length is only known that way). The
    /// entries' fixed parts are read first, so a table over QEMU's 64 MiB is refused before
    /// any name is kept (names that are not UTF-8 take up to three times their size).
    async fn load_snapshots(&mut self, h: &Header) -> Result<()> {
        let entries = self.snapshot_entries(h).await?;
        for (at, len) in entries {
            let entry = self.read(at, len).await?;
            let (snap, _) = snapshot::parse_entry(&entry)?;
            self.snapshots.push(snap);
        }
        Ok(())
    }

    /// The (offset, length) of every snapshot table entry, from their fixed parts; sets
    /// `snapshots_size`. Corrupt when the table is over 64 MiB.
    async fn snapshot_entries(&mut self, h: &Header) -> Result<Vec<(u64, u64)>> {
        let mut entries = Vec::new();
        let mut off = 0u64;
        for i in 0..h.nb_snapshots {
            off = off.next_multiple_of(8);
            let at = h.snapshots_offset.saturating_add(off);
            let hdr = self.read(at, snapshot::ENTRY_HEADER_LEN as u64).await?;
            let len = snapshot::entry_len(&hdr).map_err(|e| {
                Error::corrupt(format!("snapshot {i}: {}", e.what())).at_host(HostOffset(at))
            })?;
            off += len as u64;
            if off > snapshot::MAX_TABLE_SIZE as u64 {
                return Err(Error::corrupt("snapshot table larger than 64 MiB"));
            }
            entries.push((at, len as u64));
        }
        self.snapshots_size = off;
        Ok(entries)
    }

    /// Read `len` bytes at `offset` (zeros past the end of the file). `len` must already be
    /// bounded by the caller (a table size checked against QEMU's limits, or one cluster).
    pub(crate) async fn read(&self, offset: u64, len: u64) -> Result<Vec<u8>> {
        let n = usize::try_from(len).map_err(|_| Error::invalid("table too large"))?;
        let mut buf = vec![0u8; n];
        if n > 0 && offset < self.file_len {
            self.storage
                .read_at(&mut buf, offset)
                .await
                .map_err(|e| Error::io("reading metadata", e).at_host(HostOffset(offset)))?;
        }
        Ok(buf)
    }

    /// Write `buf` at `offset`.
    pub(crate) async fn write(&self, buf: &[u8], offset: u64) -> Result<()> {
        self.storage
            .write_at(buf, offset)
            .await
            .map_err(|e| Error::io("writing a repair", e).at_host(HostOffset(offset)))
    }

    /// Make every write so far durable: the barrier between repair steps.
    pub(crate) async fn flush(&self) -> Result<()> {
        self.storage
            .flush()
            .await
            .map_err(|e| Error::io("flushing a repair", e))
    }

    /// The header as parsed.
    pub(crate) fn header(&self) -> &Header {
        &self.ih.header
    }

    /// Clusters the file spans (a partial last cluster counts).
    pub(crate) fn file_clusters(&self) -> u64 {
        self.file_len.div_ceil(self.cs)
    }

    /// Offset within its cluster (non-zero = misaligned).
    pub(crate) fn misaligned(&self, offset: u64) -> bool {
        offset & (self.cs - 1) != 0
    }

    /// Bytes per L2 entry.
    pub(crate) fn l2_entry_size(&self) -> usize {
        self.geo.entry_size()
    }

    /// Entries in one L2 table.
    pub(crate) fn l2_entries(&self) -> usize {
        to_usize(self.cs / self.l2_entry_size() as u64)
    }

    /// Entries in one refcount block.
    pub(crate) fn refblock_entries(&self) -> u64 {
        refcount::entries_per_block(self.cs, self.order)
    }
}

/// Read cluster 0 and validate it the way QEMU does at open.
async fn read_cluster0(storage: &dyn Storage, file_len: u64) -> Result<ImageHeader> {
    let ih = crate::image::read_cluster0(storage).await?;
    ih.validate(file_len)?;
    Ok(ih)
}

/// Decode big-endian u64s (a trailing partial entry is ignored).
pub(crate) fn be_u64s(buf: &[u8]) -> Vec<u64> {
    buf.chunks_exact(8)
        .map(|c| u64::from_be_bytes(c.try_into().unwrap_or([0; 8])))
        .collect()
}
