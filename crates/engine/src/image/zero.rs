//! Zeroing and discarding guest ranges.
//!
//! Whole clusters change their mapping (zero clusters on v3, unallocated on images without a
//! backing file); partial clusters get zeros written through the normal write path. With
//! extended L2, whole subclusters get their "reads as zero" bit. After either call the range
//! reads as zeros — discard never lets the backing file's data show through.

use super::Image;
use crate::error::Result;
use crate::format::l2::{L2Entry, SubclusterBitmap, SubclusterState};
use crate::units::{GuestOffset, HostOffset, to_u32, to_usize};

/// Options of [`Image::write_zeroes`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ZeroFlags {
    /// The host space may be released (zero clusters without an allocation). Without it,
    /// allocated clusters keep their host cluster (preallocated zero clusters).
    pub may_unmap: bool,
}

impl Image {
    /// Make `[offset, offset + len)` read as zeros. Cancel-safe (see [`Image::write_at`]).
    pub async fn write_zeroes(&self, offset: u64, len: u64, flags: ZeroFlags) -> Result<()> {
        self.detached(async move |img| img.zero_range(offset, len, flags.may_unmap).await)
            .await
    }

    /// Discard `[offset, offset + len)`: it reads as zeros afterwards, its clusters are freed
    /// (once the new mapping is on disk) and their host space is punched. Cancel-safe.
    pub async fn discard(&self, offset: u64, len: u64) -> Result<()> {
        self.detached(async move |img| img.zero_range(offset, len, true).await)
            .await
    }

    pub(crate) async fn zero_range(&self, offset: u64, len: u64, unmap: bool) -> Result<()> {
        let w = self.write_state()?;
        self.check_range(offset, len)?;
        self.check_data_access()?;
        self.inner.bitmaps.mark(offset, len);
        let _epoch = w.enter_request();
        let geo = self.inner.geo;
        let end = GuestOffset(offset + len);
        let mut off = GuestOffset(offset);
        while off < end {
            let n = (geo.cluster_size - geo.in_cluster(off)).min(end.since(off));
            let whole = n == geo.cluster_size || off.0 + n == self.virtual_size();
            if whole && geo.in_cluster(off) == 0 && self.zero_flag_usable() {
                self.zero_cluster(off, n, unmap).await?;
            } else if geo.l2.extended {
                self.zero_subclusters(off, n).await?;
            } else {
                self.write_zero_bytes(off, n).await?;
            }
            off = off.offset_by(n);
        }
        self.after_metadata_change();
        Ok(())
    }

    /// Whether whole clusters can be turned into zero clusters (v3), or — on v2 without a
    /// backing file — made unallocated.
    fn zero_flag_usable(&self) -> bool {
        self.inner.geo.l2.version3 || self.inner.backing.is_none()
    }

    /// Zero part of one cluster through the write path, unless it already reads as zeros
    /// (unallocated without backing data, or a zero (sub)cluster): writing zeros there would
    /// only allocate a cluster of zeros (QEMU leaves such ranges alone too).
    async fn write_zero_bytes(&self, off: GuestOffset, n: u64) -> Result<()> {
        if self.reads_as_zero(off, n).await? {
            return Ok(());
        }
        let zeros = vec![0u8; to_usize(n)];
        self.write_piece(&zeros, off).await
    }

    /// Zero one whole cluster (`n` bytes at `off`: less only at the end of the disk) by
    /// changing its mapping.
    async fn zero_cluster(&self, off: GuestOffset, n: u64, unmap: bool) -> Result<()> {
        let w = self.write_state()?;
        let geo = self.inner.geo;
        let gc = geo.guest_cluster(off);
        let _guard = w.lock_guest_cluster(gc).await;
        self.zero_raw_data_file(off, n).await?;
        let m = self.lookup(gc).await?;
        let has_backing = self
            .inner
            .backing
            .as_ref()
            .is_some_and(|b| geo.cluster_start(gc).0 < b.size());
        if matches!(m.entry, L2Entry::Unallocated) && m.bitmap.alloc_bits() == 0 && !has_backing {
            let all_unalloc = m.bitmap.zero_bits() == 0;
            if all_unalloc || !geo.l2.extended {
                return Ok(()); // already reads as zeros with nothing allocated
            }
        }
        // Preallocated zeros need the zero flag (v3) or a zero bitmap (extended L2).
        let can_keep = !unmap && (geo.l2.version3 || geo.l2.extended);
        let keep = match m.entry {
            L2Entry::Normal { host, copied: true } if can_keep => Some(host),
            L2Entry::Zero {
                host: Some(h),
                copied: true,
            } if can_keep => Some(h),
            _ => None,
        };
        let (entry, bitmap) = zero_entry(&geo.l2, keep, has_backing);
        if entry == m.entry && bitmap == m.bitmap {
            return Ok(());
        }
        if keep.is_none() {
            self.check_entry_is_data(&m.entry).await?;
        }
        let table = self.ensure_l2_table(gc).await?;
        self.set_l2(table, gc, entry, bitmap).await?;
        if keep.is_none() {
            self.release_old(&m.entry);
        }
        Ok(())
    }

    /// Extended L2: whole subclusters get the zero bit, partial ones get zeros written.
    async fn zero_subclusters(&self, off: GuestOffset, n: u64) -> Result<()> {
        let geo = self.inner.geo;
        let sc = geo.subcluster_size();
        let end = off.offset_by(n);
        let first_full = GuestOffset(off.0.div_ceil(sc) * sc);
        let last_full = GuestOffset(end.0 / sc * sc);
        if first_full >= last_full {
            return self.write_zero_bytes(off, n).await;
        }
        if off < first_full {
            self.write_zero_bytes(off, first_full.since(off)).await?;
        }
        self.mark_zero_subclusters(first_full, last_full.since(first_full))
            .await?;
        if last_full < end {
            self.write_zero_bytes(last_full, end.since(last_full))
                .await?;
        }
        Ok(())
    }

    async fn mark_zero_subclusters(&self, off: GuestOffset, n: u64) -> Result<()> {
        let w = self.write_state()?;
        let geo = self.inner.geo;
        let gc = geo.guest_cluster(off);
        let _guard = w.lock_guest_cluster(gc).await;
        if self.reads_as_zero(off, n).await? {
            return Ok(()); // nothing to change, and no L2 table to allocate
        }
        self.zero_raw_data_file(off, n).await?;
        let m = self.lookup(gc).await?;
        if matches!(
            m.entry,
            L2Entry::Compressed(_) | L2Entry::Normal { copied: false, .. }
        ) {
            // Shared or compressed clusters are rewritten whole: zeros through the write path.
            drop(_guard);
            return self.write_zero_bytes(off, n).await;
        }
        let sc = geo.subcluster_size();
        let mut bitmap = m.bitmap;
        let first = to_u32(geo.in_cluster(off) / sc);
        bitmap.set_range(first, to_u32(n / sc), SubclusterState::Zero);
        let table = self.ensure_l2_table(gc).await?;
        self.set_l2(table, gc, m.entry, bitmap).await
    }

    /// With a raw external data file (`data_file_raw`), the data file must read as the guest
    /// disk on its own: a zero or discard made by the mapping alone would leave the old data
    /// there, so zero the data file too (host offset == guest offset), as QEMU does.
    async fn zero_raw_data_file(&self, off: GuestOffset, n: u64) -> Result<()> {
        let raw = self.inner.data_file_path.is_some()
            && self.inner.header.lock().unwrap().header.data_file_raw();
        if raw {
            self.zero_data(HostOffset(off.0), n).await
        } else {
            Ok(())
        }
    }
}

/// The entry that makes a whole cluster read as zeros. `keep` is a host cluster to keep
/// allocated (preallocated zeros). Without the zero flag (v2, no backing) it is unallocated.
fn zero_entry(
    geo: &crate::format::l2::L2Geometry,
    keep: Option<HostOffset>,
    has_backing: bool,
) -> (L2Entry, SubclusterBitmap) {
    if geo.extended {
        let entry = match keep {
            Some(host) => L2Entry::Normal { host, copied: true },
            None => L2Entry::Unallocated,
        };
        return (entry, SubclusterBitmap::all(SubclusterState::Zero));
    }
    if !geo.version3 {
        debug_assert!(!has_backing);
        return (L2Entry::Unallocated, SubclusterBitmap(0));
    }
    (
        L2Entry::Zero {
            host: keep,
            copied: keep.is_some(),
        },
        SubclusterBitmap(0),
    )
}
