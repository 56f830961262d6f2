//! The write path (DESIGN.md §3).
//!
//! Per guest cluster: if the cluster is normal with refcount 1 (COPIED) — and, with extended
//! L2, every touched subcluster is allocated — the data is written in place and nothing else
//! changes. Otherwise the request claims the cluster in the in-flight table, looks again
//! (another request may have just allocated it), and then allocates: it builds the cluster's
//! new content from the new data plus the old guest view (old data, decompressed data, the
//! backing image or zeros), writes it, and only then publishes the mapping in the cached L2
//! slice. The request completes when its data is written; metadata reaches disk later, in
//! soft-update order (see `flush.rs`).
//!
//! In-place writes do not take the in-flight guard, so a guard holder must never write back
//! bytes an in-place writer may be writing: it copies old bytes only into clusters no one can
//! write in place (a new host cluster, or zero, unallocated, compressed or shared ones) and,
//! with extended L2, only into the unallocated or zero subclusters of a kept host cluster.

use super::Image;
use super::lookup::Mapping;
use super::read::Source;
use crate::error::{Error, ErrorKind, Result};
use crate::format::l2::{L2Entry, SubclusterBitmap, SubclusterState};
use crate::units::to_usize;
use crate::units::{ClusterIndex, GuestCluster, GuestOffset, HostOffset, to_u32};

/// Zero runs at least this long are written with write-zeroes instead of zero buffers.
const ZERO_IO_THRESHOLD: u64 = 64 * 1024;

impl Image {
    /// Write all of `buf` at guest offset `offset`.
    ///
    /// Completes when the data is written (not yet durable: call [`Image::flush`]).
    /// Cancel-safe: if the future is dropped, the write still finishes in the background
    /// (on a copy of `buf`), so its data is either all old or all new per cluster.
    pub async fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        // The copy lives in a pooled buffer: large writes reuse memory instead of faulting in
        // fresh pages each time.
        let buf = crate::storage::pool::PooledBytes::copy_of(buf);
        self.detached(async move |img| img.write_at_now(&buf, offset).await)
            .await
    }

    /// [`Image::write_at`]'s work, run to completion by its caller.
    pub(crate) async fn write_at_now(&self, buf: &[u8], offset: u64) -> Result<()> {
        let w = self.write_state()?;
        self.check_range(offset, buf.len() as u64)?;
        self.check_data_access()?;
        self.inner.bitmaps.mark(offset, buf.len() as u64);
        let _epoch = w.enter_request();
        let cs = self.inner.geo.cluster_size;
        let offset = GuestOffset(offset);
        let mut done = 0usize;
        while done < buf.len() {
            let off = offset.offset_by(done as u64);
            let in_c = self.inner.geo.in_cluster(off);
            let whole = (buf.len() - done) as u64 / cs * cs;
            if in_c == 0 && whole >= 2 * cs {
                // Several whole clusters: written in runs of one IO each (`write_run.rs`).
                let end = done + to_usize(whole);
                done += self.write_run(&buf[done..end], off).await?;
                continue;
            }
            let n = to_usize(cs - in_c).min(buf.len() - done);
            self.write_piece(&buf[done..done + n], off).await?;
            done += n;
        }
        self.after_metadata_change();
        Ok(())
    }

    /// Write `data` (inside one cluster) at guest offset `off`.
    pub(crate) async fn write_piece(&self, data: &[u8], off: GuestOffset) -> Result<()> {
        let w = self.write_state()?;
        let gc = self.inner.geo.guest_cluster(off);
        let m = self.lookup(gc).await?;
        if let Some(host) = self.in_place_target(&m, off, data.len() as u64) {
            return self.write_data(data, host).await;
        }
        let _guard = w.lock_guest_cluster(gc).await;
        let m = self.lookup(gc).await?;
        if let Some(host) = self.in_place_target(&m, off, data.len() as u64) {
            return self.write_data(data, host).await;
        }
        self.allocate_and_write(gc, m, data, off).await
    }

    /// The host offset to write `len` bytes at `off` in place, if the mapping allows it.
    pub(super) fn in_place_target(
        &self,
        m: &Mapping,
        off: GuestOffset,
        len: u64,
    ) -> Option<HostOffset> {
        let L2Entry::Normal { host, copied: true } = m.entry else {
            return None;
        };
        let geo = &self.inner.geo;
        let in_c = geo.in_cluster(off);
        if geo.l2.extended {
            let sc = geo.subcluster_size();
            let (first, last) = (to_u32(in_c / sc), to_u32((in_c + len - 1) / sc));
            let all =
                (first..=last).all(|i| m.bitmap.state(i).ok() == Some(SubclusterState::Allocated));
            if !all {
                return None;
            }
        }
        Some(host.offset_by(in_c))
    }

    /// Write guest data at host offset `host` (image file or external data file), refusing
    /// to overwrite metadata.
    pub(crate) async fn write_data(&self, data: &[u8], host: HostOffset) -> Result<()> {
        self.check_data_write(host, data.len() as u64).await?;
        self.inner
            .data
            .write_at(data, host.0)
            .await
            .map_err(|e| Error::io("writing guest data", e).at_host(host))
    }

    /// The allocating path, with the cluster's in-flight guard held.
    pub(super) async fn allocate_and_write(
        &self,
        gc: GuestCluster,
        m: Mapping,
        data: &[u8],
        off: GuestOffset,
    ) -> Result<()> {
        let geo = self.inner.geo;
        let cstart = geo.cluster_floor(off);
        let len = data.len() as u64;
        // With extended L2, an unallocated or private normal cluster keeps its other
        // subclusters: only the touched ones are (re)written. Anything else is rewritten whole.
        let keeps_others = geo.l2.extended
            && matches!(
                m.entry,
                L2Entry::Unallocated | L2Entry::Normal { copied: true, .. }
            );
        let touched = if keeps_others {
            self.touched_subclusters(off, len)
        } else {
            (cstart, cstart.offset_by(geo.cluster_size))
        };
        self.check_entry_is_data(&m.entry).await?;
        let table = self.ensure_l2_table(gc).await?;
        let (host, reused, fresh) = match m.entry {
            L2Entry::Normal { host, copied: true } => (host, true, false),
            L2Entry::Zero {
                host: Some(h),
                copied: true,
            } => (h, true, false),
            _ => {
                let (host, fresh) = self.new_data_host(cstart).await?;
                (host, false, fresh)
            }
        };
        let span = if keeps_others && reused {
            self.skip_allocated_ends(m.bitmap, touched, off, len)
        } else {
            touched
        };
        let filled = self.write_with_fill(host, cstart, span, data, off).await;
        if let Err(e) = filled {
            if fresh {
                self.write_state()?.defer_free(host, false);
            }
            return Err(e);
        }
        let bitmap = self.bitmap_after_write(m.bitmap, keeps_others, touched);
        let entry = L2Entry::Normal { host, copied: true };
        self.set_l2(table, gc, entry, bitmap).await?;
        if !reused {
            self.release_old(&m.entry);
        }
        Ok(())
    }

    /// Where a new data cluster for the guest cluster starting at `cstart` goes, and whether
    /// it came from the allocator (then a failed write must give it back).
    async fn new_data_host(&self, cstart: GuestOffset) -> Result<(HostOffset, bool)> {
        if self.inner.data_file_path.is_some() {
            // An external data file holds every guest cluster at its guest offset and has no
            // refcounts: the metadata file's allocator knows nothing about it (qcow2.txt).
            return Ok((HostOffset(cstart.0), false));
        }
        Ok((self.write_state()?.refcounts().alloc(1).await?, true))
    }

    /// The guest range of the subclusters that `[off, off + len)` touches (one cluster).
    fn touched_subclusters(&self, off: GuestOffset, len: u64) -> (GuestOffset, GuestOffset) {
        let geo = &self.inner.geo;
        let cstart = geo.cluster_floor(off);
        let sc = geo.subcluster_size();
        let in_c = off.since(cstart);
        let s = in_c / sc * sc;
        let e = (in_c + len).div_ceil(sc) * sc;
        (cstart.offset_by(s), cstart.offset_by(e))
    }

    /// Narrow `span` (touched subclusters of a cluster that keeps its host cluster) so that
    /// an allocated subcluster at either end is not rewritten: its bytes outside
    /// `[off, off + len)` are already the guest's. It must not be rewritten from a copy
    /// either — writes into allocated subclusters go in place without the in-flight guard,
    /// so a copy read a moment ago can be stale, and writing it back would undo one.
    fn skip_allocated_ends(
        &self,
        bitmap: SubclusterBitmap,
        (mut start, mut end): (GuestOffset, GuestOffset),
        off: GuestOffset,
        len: u64,
    ) -> (GuestOffset, GuestOffset) {
        let geo = &self.inner.geo;
        let allocated = |at: GuestOffset| {
            let i = to_u32(geo.in_cluster(at) / geo.subcluster_size());
            bitmap.state(i).ok() == Some(SubclusterState::Allocated)
        };
        if allocated(start) {
            start = off;
        }
        if allocated(GuestOffset(end.0 - 1)) {
            end = off.offset_by(len);
        }
        (start, end)
    }

    /// The subcluster bitmap after writing the subclusters in `touched`.
    fn bitmap_after_write(
        &self,
        old: SubclusterBitmap,
        keeps_others: bool,
        (start, end): (GuestOffset, GuestOffset),
    ) -> SubclusterBitmap {
        let geo = &self.inner.geo;
        if keeps_others {
            let sc = geo.subcluster_size();
            let mut b = old;
            let first = to_u32(geo.in_cluster(start) / sc);
            b.set_range(
                first,
                to_u32(end.since(start) / sc),
                SubclusterState::Allocated,
            );
            b
        } else if geo.l2.extended {
            SubclusterBitmap::all(SubclusterState::Allocated)
        } else {
            SubclusterBitmap(0)
        }
    }

    /// Write `data` at guest `off` into host cluster `host` (guest cluster start `cstart`),
    /// filling the rest of `span` from the old guest view.
    async fn write_with_fill(
        &self,
        host: HostOffset,
        cstart: GuestOffset,
        (span_start, span_end): (GuestOffset, GuestOffset),
        data: &[u8],
        off: GuestOffset,
    ) -> Result<()> {
        let head = off.since(span_start);
        let tail_start = off.offset_by(data.len() as u64);
        let tail = span_end.since(tail_start);
        // Host and guest offsets share their place inside the cluster.
        let h = host.offset_by(span_start.since(cstart));
        if head == 0 && tail == 0 {
            // A whole (sub)cluster overwrite needs no fill and no bounce copy.
            return self.write_data(data, h).await;
        }
        let head_fill = self.old_view(span_start, head).await?;
        let tail_fill = self.old_view(tail_start, tail).await?;
        let mut buf = Vec::with_capacity(to_usize(span_end.since(span_start)));
        let mut buf_at = h;
        match head_fill {
            Some(b) => buf.extend_from_slice(&b),
            None if head >= ZERO_IO_THRESHOLD => {
                self.zero_data(h, head).await?;
                buf_at = h.offset_by(head);
            }
            None => buf.resize(to_usize(head), 0),
        }
        buf.extend_from_slice(data);
        let tail_h = h.offset_by(tail_start.since(span_start));
        match tail_fill {
            Some(b) => buf.extend_from_slice(&b),
            None if tail >= ZERO_IO_THRESHOLD => self.zero_data(tail_h, tail).await?,
            None => buf.resize(buf.len() + to_usize(tail), 0),
        }
        self.write_data(&buf, buf_at).await
    }

    /// The current guest content of `[off, off + len)`, or `None` when it reads as zeros.
    async fn old_view(&self, off: GuestOffset, len: u64) -> Result<Option<Vec<u8>>> {
        if len == 0 {
            return Ok(None);
        }
        let size = self.virtual_size();
        let inside = size.saturating_sub(off.0).min(len);
        if inside == 0 || self.reads_as_zero(off, inside).await? {
            return Ok(None);
        }
        let mut buf = vec![0u8; to_usize(len)];
        self.read_at(&mut buf[..to_usize(inside)], off.0).await?;
        Ok(Some(buf))
    }

    /// Whether `[off, off + len)` (inside one cluster) reads as zeros without reading data.
    pub(crate) async fn reads_as_zero(&self, off: GuestOffset, len: u64) -> Result<bool> {
        let run = self.next_run(off, len).await?;
        if run.len < len {
            return Ok(false);
        }
        Ok(match run.source {
            Source::Zero => true,
            Source::Backing => self
                .inner
                .backing
                .as_ref()
                .is_none_or(|b| off.0 >= b.size()),
            _ => false,
        })
    }

    /// Zero `len` bytes of guest data at host offset `host` (write-zeroes, not a buffer).
    pub(crate) async fn zero_data(&self, host: HostOffset, len: u64) -> Result<()> {
        self.check_data_write(host, len).await?;
        self.inner
            .data
            .write_zeroes(host.0, len)
            .await
            .map_err(|e| Error::io("zeroing guest data", e).at_host(host))
    }

    /// Schedule dropping the references the old entry held (after the new mapping is on disk).
    pub(crate) fn release_old(&self, old: &L2Entry) {
        if self.inner.data_file_path.is_some() {
            // Data-file clusters are not refcounted; the offsets in `old` are data-file
            // offsets, and dropping refcounts there would free live metadata clusters.
            return;
        }
        let Ok(w) = self.write_state() else { return };
        let cb = self.inner.geo.cluster_bits;
        match old {
            L2Entry::Normal { host, .. }
            | L2Entry::Zero {
                host: Some(host), ..
            } => w.defer_free(*host, true),
            L2Entry::Compressed(d) => {
                let (first, last) = d.host_clusters(cb);
                for c in first..=last {
                    w.defer_free(ClusterIndex(c).offset(cb), false);
                }
            }
            _ => {}
        }
    }

    pub(crate) fn write_state(&self) -> Result<&super::state::WriteState> {
        let w = self
            .inner
            .write
            .as_ref()
            .ok_or_else(|| Error::new(ErrorKind::ReadOnly, "the image is opened read-only"))?;
        w.check_poison()?;
        if w.is_closed() {
            return Err(Error::invalid_arg(
                "the image was closed; reopen it to write",
            ));
        }
        Ok(w)
    }
}
