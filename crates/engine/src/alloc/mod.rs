//! The cluster allocator: refcount table and refcount blocks (through a slice cache), free
//! space search, refcount-table growth, and the bookkeeping that makes freeing safe.
//!
//! Mind-map questions answered here:
//! - *"mutex is ok?"* Yes: one async mutex (`Refcounts::state`) serializes refcount
//!   decisions. Its critical sections are cache lookups and, on a miss, one slice load; data
//!   IO never happens under it, so it does not serialize requests' data transfers.
//! - *Where is free space?* A hint remembers where free space was last found; the search
//!   scans forward from it, and frees move it back.
//! - *Refcount table full?* `grow.rs` writes a bigger table plus the blocks covering it in
//!   fresh space at the end of the file, fsyncs, then switches the header to it.

mod ahead;
mod bytes;
mod epochs;
mod grow;
mod guard;
mod inflight;
mod metaio;
mod new_clusters;
mod overlap;
mod sanity;

pub use epochs::{EpochGuard, Epochs};
pub use guard::Allocator;
pub use inflight::{Inflight, InflightGuard};
pub(crate) use metaio::{DirtySlice, MetaWriter, load_slice, take_dirty};
pub use new_clusters::{NewClusters, NewKind};
pub use overlap::{Kinds, MetadataMap};

use std::collections::BTreeSet;
use std::sync::Arc;

use tokio::sync::{Mutex, MutexGuard};

use crate::cache::{Lookup, Slice, SliceCache};
use crate::error::{Error, Result};
use crate::format::header::Header;
use crate::format::refcount::{self, RefTableEntry};
use crate::storage::Storage;
use crate::units::HostOffset;
use crate::units::to_usize;

/// Refcount state guarded by the allocator mutex.
#[derive(Debug)]
pub struct RefState {
    /// Host offsets of the refcount blocks (0: no block).
    table: Vec<u64>,
    /// Where the refcount table lives.
    table_offset: u64,
    /// Its size in clusters.
    table_clusters: u64,
    /// Table entries changed since the table was last written.
    table_dirty: bool,
    /// Cluster index where the next free-space search starts.
    hint: u64,
    /// One past the highest cluster in use or in the file.
    end_cluster: u64,
    /// Next free byte in the host cluster being packed with compressed payloads (0: none);
    /// see `bytes.rs`.
    compress_cursor: u64,
    /// Table entries given a block by us over a range that reached into the file as it was
    /// at open (the part inside stays unallocated; see `sanity.rs`).
    untrusted: BTreeSet<u64>,
}

/// Refcounts of one image and the allocator built on them.
#[derive(Debug)]
pub struct Refcounts {
    file: Arc<dyn Storage>,
    cluster_bits: u32,
    order: u32,
    cache: SliceCache,
    new: Arc<NewClusters>,
    map: Arc<MetadataMap>,
    /// Clusters in the file at open: ranges no block covers are only known free past this.
    open_end: u64,
    meta: Arc<MetaWriter>,
    /// Grows the file ahead of allocations (see `ahead.rs`).
    ahead: ahead::GrowAhead,
    state: Mutex<RefState>,
}

impl Refcounts {
    /// Set up from the refcount table read at open.
    pub fn new(
        file: Arc<dyn Storage>,
        header: &Header,
        table: Vec<RefTableEntry>,
        file_len: u64,
        (slice_size, cache_bytes): (usize, usize),
        (new, map, meta): (Arc<NewClusters>, Arc<MetadataMap>, Arc<MetaWriter>),
    ) -> Refcounts {
        let (cluster_bits, order) = (header.cluster_bits, header.refcount_order);
        let table_offset = header.refcount_table_offset;
        let table_clusters = u64::from(header.refcount_table_clusters);
        let table = table
            .iter()
            .map(|e| e.block_offset().map_or(0, |h| h.0))
            .collect();
        let end_cluster = file_len.div_ceil(1 << cluster_bits);
        let ahead = ahead::GrowAhead::new(file.clone(), file_len);
        Refcounts {
            file,
            cluster_bits,
            order,
            cache: SliceCache::new("refcount", slice_size, cache_bytes),
            new,
            map,
            open_end: end_cluster,
            meta,
            ahead,
            state: Mutex::new(RefState {
                table,
                table_offset,
                table_clusters,
                table_dirty: false,
                hint: 0,
                end_cluster,
                compress_cursor: 0,
                untrusted: BTreeSet::new(),
            }),
        }
    }

    /// Take the allocator lock (lock 4 in LOCKS.md).
    pub async fn lock(&self) -> Allocator<'_> {
        Allocator::new(self, self.lock_state().await)
    }

    /// The state behind the allocator lock (for this module's own multi-step operations).
    async fn lock_state(&self) -> MutexGuard<'_, RefState> {
        self.state.lock().await
    }

    /// Where the image's metadata lives (the overlap check).
    pub fn map(&self) -> &Arc<MetadataMap> {
        &self.map
    }

    /// The metadata writer (shared with the image: one failure latch).
    pub(crate) fn meta(&self) -> &Arc<MetaWriter> {
        &self.meta
    }

    /// The refcount-block slice cache (for accounting and flushing).
    pub fn cache(&self) -> &SliceCache {
        &self.cache
    }

    fn cluster_size(&self) -> u64 {
        1 << self.cluster_bits
    }

    /// Refcount entries per block.
    pub fn entries_per_block(&self) -> u64 {
        refcount::entries_per_block(self.cluster_size(), self.order)
    }

    /// The largest refcount the width can hold.
    pub fn max_refcount(&self) -> u64 {
        refcount::max_refcount(self.order)
    }

    /// Where cluster `c`'s refcount lives: (slice offset, index in slice), or `None` if no
    /// block covers it (refcount 0).
    fn locate(&self, st: &RefState, c: u64) -> Option<(u64, u64)> {
        let epb = self.entries_per_block();
        let block = *st.table.get(to_usize(c / epb))?;
        if block == 0 {
            return None;
        }
        let per_slice = (self.cache.slice_size() as u64 * 8) >> self.order;
        let idx = c % epb;
        let slice_off = block + (idx / per_slice) * self.cache.slice_size() as u64;
        Some((slice_off, idx % per_slice))
    }

    async fn slice(&self, off: u64) -> Result<Arc<Slice>> {
        let slice = loop {
            match self.cache.get(off) {
                Lookup::Slice(s) => break s,
                // Refcount slices are only dirtied under the allocator lock, which the caller
                // holds, so flushing here is safe and is what frees room.
                Lookup::Full => self.write_dirty_slices().await?,
            }
        };
        let fresh = || self.new.contains(off & !(self.cluster_size() - 1));
        load_slice(
            &self.cache,
            slice,
            (&self.file, fresh),
            "loading a refcount block",
        )
        .await
    }

    /// The refcount of host cluster `c`.
    async fn get(&self, st: &RefState, c: u64) -> Result<u64> {
        let Some((off, idx)) = self.locate(st, c) else {
            return Ok(0);
        };
        let s = self.slice(off).await?;
        Ok(s.read(|b| refcount::get(b, idx, self.order)))
    }

    /// Set the refcount of host cluster `c`, creating its refcount block (and growing the
    /// table) when needed.
    async fn set(&self, st: &mut RefState, c: u64, v: u64) -> Result<()> {
        self.ensure_block(st, c / self.entries_per_block()).await?;
        self.set_in_block(st, c, v).await
    }

    /// Set the refcount of cluster `c`, whose refcount block must exist.
    async fn set_in_block(&self, st: &mut RefState, c: u64, v: u64) -> Result<()> {
        let (off, idx) = self
            .locate(st, c)
            .ok_or_else(|| Error::corrupt(format!("no refcount block for cluster {c}")))?;
        let s = self.slice(off).await?;
        s.update(|b| refcount::set(b, idx, self.order, v))?;
        if v == 0 {
            self.check_may_free(c).await?;
            // A free cluster holds no metadata any more (old tables after a move, freed L2s).
            self.map.remove_cluster(c);
            st.hint = st.hint.min(c);
            // A free cluster may be reallocated for anything: never pack into it again.
            if st.compress_cursor >> self.cluster_bits == c {
                st.compress_cursor = 0;
            }
        }
        st.end_cluster = st.end_cluster.max(c + 1);
        Ok(())
    }

    /// Add `delta` to the refcount of cluster `c`; errors on underflow or overflow.
    async fn add(&self, st: &mut RefState, c: u64, delta: i64) -> Result<u64> {
        let cur = self.get(st, c).await?;
        let new = cur
            .checked_add_signed(delta)
            .filter(|v| *v <= self.max_refcount())
            .ok_or_else(|| {
                Error::corrupt(format!(
                    "refcount of cluster {c} would become {cur}{delta:+}"
                ))
                .at_host(HostOffset(c << self.cluster_bits))
            })?;
        self.set(st, c, new).await?;
        Ok(new)
    }

    /// Make sure refcount block `ti` exists. A missing block covers clusters whose refcount
    /// reads as 0; it goes where `place_block` says, which refuses a range that contradicts
    /// the metadata map.
    async fn ensure_block(&self, st: &mut RefState, ti: u64) -> Result<()> {
        if to_usize(ti) >= st.table.len() {
            self.grow(st, ti).await?;
        }
        let slot = st
            .table
            .get(to_usize(ti))
            .copied()
            .ok_or_else(|| Error::corrupt(format!("refcount table has no entry {ti}")))?;
        if slot != 0 {
            return Ok(());
        }
        let host = self.place_block(st, ti).await?;
        let c = host >> self.cluster_bits;
        self.new.insert(host, NewKind::Refblock);
        self.map.insert(host, self.cluster_size(), Kinds::REFBLOCK);
        st.table[to_usize(ti)] = host;
        st.table_dirty = true;
        st.end_cluster = st.end_cluster.max(c + 1);
        let (off, idx) = self
            .locate(st, c)
            .ok_or_else(|| Error::corrupt(format!("no refcount block for cluster {c}")))?;
        let s = self.slice(off).await?;
        s.update(|b| refcount::set(b, idx, self.order, 1))
    }

    /// Allocate `n` contiguous free clusters, set their refcounts to 1 and return the host
    /// offset of the first.
    pub async fn alloc(&self, n: u64) -> Result<HostOffset> {
        self.lock().await.alloc_clusters(n).await
    }

    /// [`Refcounts::alloc`] with the lock already held ([`Allocator::alloc_clusters`]).
    async fn alloc_locked(&self, st: &mut RefState, n: u64) -> Result<u64> {
        let mut c = st.hint.max(1);
        'search: loop {
            for k in 0..n {
                if let Some(end) = self.untrusted_until(st, c + k) {
                    c = end;
                    continue 'search;
                }
                if self.get(st, c + k).await? != 0 {
                    c += k + 1;
                    continue 'search;
                }
            }
            // Creating blocks may take clusters inside the run: then search again.
            let epb = self.entries_per_block();
            for ti in c / epb..=(c + n - 1) / epb {
                self.ensure_block(st, ti).await?;
            }
            for k in 0..n {
                if self.get(st, c + k).await? != 0 {
                    continue 'search;
                }
            }
            for k in 0..n {
                self.check_free_cluster(c + k).await?;
            }
            for k in 0..n {
                self.set(st, c + k, 1).await?;
            }
            st.hint = c + n;
            self.ahead.cover((c + n) << self.cluster_bits).await;
            return Ok(c << self.cluster_bits);
        }
    }

    /// Cut the file back to its last allocated cluster if growing ahead left it longer. Call
    /// only with nothing in flight and everything flushed (at close).
    pub async fn trim_growth(&self) -> Result<()> {
        let st = self.lock_state().await;
        let used = st.end_cluster << self.cluster_bits;
        (self.ahead.trim(used).await).map_err(|e| Error::io("trimming the image file", e))
    }

    /// Write every dirty refcount slice, zeroing new blocks first, then fsync, then the
    /// refcount table if it changed, then fsync again. Call with the lock held.
    async fn flush_locked(&self, st: &mut RefState) -> Result<()> {
        self.write_dirty_slices().await?;
        if st.table_dirty {
            self.sync().await?;
            self.write_table(st).await?;
            st.table_dirty = false;
        }
        self.sync().await
    }

    async fn write_dirty_slices(&self) -> Result<()> {
        let new_blocks = self.new.of_kind(NewKind::Refblock);
        let block = (self.cluster_size(), Kinds::REFBLOCK);
        let sets = (self.new.as_ref(), self.map.as_ref());
        (self.meta)
            .zero_new(&new_blocks, block, sets, "zeroing a new refcount block")
            .await?;
        let dirty = take_dirty(&self.cache);
        (self.meta)
            .write_back(
                &dirty,
                Kinds::REFBLOCK,
                &self.map,
                "writing a refcount block",
            )
            .await
    }

    async fn write_table(&self, st: &RefState) -> Result<()> {
        let mut buf = vec![0u8; to_usize(st.table_clusters << self.cluster_bits)];
        let entries: Vec<RefTableEntry> = st.table.iter().map(|&o| RefTableEntry(o)).collect();
        refcount::write_table(&entries, &mut buf);
        self.map
            .check(st.table_offset, buf.len() as u64, Kinds::REFTABLE)
            .await?;
        (self.meta)
            .write(&buf, st.table_offset, "writing the refcount table")
            .await
    }

    async fn sync(&self) -> Result<()> {
        self.meta.sync("syncing refcount metadata").await
    }
}
