//! "Where does this guest cluster live": L1 → L2 slice (through the cache) → entry.
//!
//! Loading an L2 slice is the only metadata IO on the read path.

use std::sync::Arc;

use super::Image;
use crate::cache::{Lookup, Slice, SliceCache};
use crate::error::{Error, Result};
use crate::format::l2::{self, L2Entry, SubclusterBitmap};
use crate::storage::Storage;
use crate::units::{GuestCluster, GuestOffset, HostOffset};

/// The decoded L2 entry of one guest cluster.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Mapping {
    pub entry: L2Entry,
    /// Subcluster states (extended L2 only; 0 otherwise).
    pub bitmap: SubclusterBitmap,
}

impl Mapping {
    pub const UNALLOCATED: Mapping = Mapping {
        entry: L2Entry::Unallocated,
        bitmap: SubclusterBitmap(0),
    };
}

impl Image {
    /// The host offset of the L2 table for guest cluster `gc`, if there is one.
    pub(crate) fn l2_table_of(&self, gc: GuestCluster) -> Result<Option<HostOffset>> {
        let idx = self.inner.geo.l1_index(gc);
        match self.inner.l1.get(idx) {
            Some(e) => Ok(e.l2_offset()),
            None => Err(Error::corrupt(format!("{gc} beyond the L1 table"))),
        }
    }

    /// Look up the mapping of guest cluster `gc`.
    pub(crate) async fn lookup(&self, gc: GuestCluster) -> Result<Mapping> {
        let Some(table) = self.l2_table_of(gc)? else {
            return Ok(Mapping::UNALLOCATED);
        };
        let geo = &self.inner.geo;
        let (slice_off, idx) = geo.l2_slice(table, geo.l2_index(gc));
        let slice = self.l2_slice(slice_off).await?;
        let (raw, bitmap) = slice
            .read(|b| l2::read_raw(b, idx, &geo.l2))
            .ok_or_else(|| Error::corrupt("L2 index outside its slice"))?;
        let entry = if self.inner.data_file_path.is_some() {
            L2Entry::decode_external(raw, &geo.l2)
        } else {
            L2Entry::decode(raw, &geo.l2)
        }
        .map_err(|e| e.at_host(slice_off))?;
        if self.inner.data_file_path.is_some() {
            check_external(&entry, geo.cluster_start(gc)).map_err(|e| e.at_host(slice_off))?;
        }
        if geo.l2.extended {
            bitmap
                .validate_for(&entry)
                .map_err(|e| e.at_host(slice_off))?;
        }
        Ok(Mapping { entry, bitmap })
    }

    /// The loaded L2 slice at host offset `off` (from the cache, loading it on a miss).
    pub(crate) async fn l2_slice(&self, off: HostOffset) -> Result<Arc<Slice>> {
        let file = self.inner.file.clone();
        get_slice(self, &self.inner.l2_cache, off, file).await
    }

    /// Called when the L2 cache is full of dirty or busy slices: flush (which makes dirty
    /// slices clean and evictable) instead of growing, or yield while slices are busy.
    pub(crate) async fn relieve_cache_pressure(&self) -> Result<()> {
        if self.inner.write.is_some() && self.inner.l2_cache.dirty_count() > 0 {
            return self.flush().await;
        }
        futures_lite::future::yield_now().await;
        Ok(())
    }
}

/// With an external data file a cluster's host offset is its guest offset (`guest`), and
/// nothing is compressed. QEMU treats anything else as corruption; so do we, rather than read
/// or overwrite another guest cluster's data.
fn check_external(entry: &L2Entry, guest: GuestOffset) -> Result<()> {
    let host = match entry {
        L2Entry::Normal { host, .. }
        | L2Entry::Zero {
            host: Some(host), ..
        } => *host,
        L2Entry::Compressed(_) => {
            return Err(Error::corrupt(
                "compressed cluster entry in an image with an external data file",
            ));
        }
        _ => return Ok(()),
    };
    // The one place a host offset is compared with a guest offset: in a data file they are
    // the same number by definition.
    if host.0 != guest.0 {
        return Err(Error::corrupt(format!(
            "external data file host cluster offset {:#x} does not match guest cluster \
             offset {:#x}",
            host.0, guest.0
        )));
    }
    Ok(())
}

/// Get the slice at `off` from `cache`, loading it from `file` on a miss.
pub(crate) async fn get_slice(
    img: &Image,
    cache: &SliceCache,
    off: HostOffset,
    file: Arc<dyn Storage>,
) -> Result<Arc<Slice>> {
    let slice = loop {
        match cache.get(off.0) {
            Lookup::Slice(s) => break s,
            Lookup::Full => img.relieve_cache_pressure().await?,
        }
    };
    // A slice of a new, not yet zeroed metadata cluster must not be read from disk.
    let cb = img.inner.geo.cluster_bits;
    let fresh = || img.inner.new.contains(off.to_cluster_offset(cb).0);
    crate::alloc::load_slice(cache, slice, (&file, fresh), "loading an L2 slice").await
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The typed offsets print as the plain numbers the message always had.
    #[test]
    fn external_mismatch_names_both_offsets() {
        let entry = |h| L2Entry::Normal {
            host: HostOffset(h),
            copied: true,
        };
        assert!(check_external(&entry(0x10000), GuestOffset(0x10000)).is_ok());
        let e = check_external(&entry(0x20000), GuestOffset(0x10000)).unwrap_err();
        assert_eq!(
            e.to_string(),
            "corrupt image: external data file host cluster offset 0x20000 does not match \
             guest cluster offset 0x10000"
        );
    }
}
