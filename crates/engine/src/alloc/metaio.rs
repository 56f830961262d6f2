//! The one path for metadata IO: loading a cache slice, writing dirty slices back, zeroing
//! new metadata clusters, and every other metadata write (tables, header fields).
//!
//! [`MetaWriter`] latches the first failed metadata write or fsync: from then on the image
//! refuses writes until it is reopened (DESIGN.md §4), because the cache and the disk may
//! have diverged in a way no retry can repair (say a header switch that reached the disk
//! although its write reported an error). Every metadata write goes through it, so no path
//! can forget to latch.

#![deny(clippy::cast_possible_truncation)]

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use super::{Kinds, MetadataMap, NewClusters};
use crate::cache::{Slice, SliceCache};
use crate::error::{Error, ErrorKind, Result};
use crate::format::header::HeaderPatch;
use crate::storage::Storage;
use crate::units::HostOffset;

/// Writes metadata to the image file and latches the first failure.
#[derive(Debug)]
pub struct MetaWriter {
    file: Arc<dyn Storage>,
    failed: AtomicBool,
}

/// A dirty slice's bytes as they were when taken, and the generation they belong to.
pub type DirtySlice = (Arc<Slice>, Vec<u8>, u64);

impl MetaWriter {
    /// A writer for `file` (the image file).
    pub fn new(file: Arc<dyn Storage>) -> Self {
        MetaWriter {
            file,
            failed: AtomicBool::new(false),
        }
    }

    /// Refuse to go on after a failed metadata write.
    pub fn check(&self) -> Result<()> {
        if self.failed.load(Ordering::Acquire) {
            return Err(Error::new(
                ErrorKind::Poisoned,
                "an earlier metadata write failed; reopen the image",
            ));
        }
        Ok(())
    }

    /// Latch the failure `e` (so later writes are refused) and pass it through.
    pub fn latch(&self, e: Error) -> Error {
        self.failed.store(true, Ordering::Release);
        e
    }

    /// Write `buf` at `off`; `what` names the write in the error.
    pub async fn write(&self, buf: &[u8], off: u64, what: &'static str) -> Result<()> {
        self.file
            .write_at(buf, off)
            .await
            .map_err(|e| self.latch(Error::io(what, e).at_host(HostOffset(off))))
    }

    /// Make every completed metadata write durable.
    pub async fn sync(&self, what: &'static str) -> Result<()> {
        self.file
            .flush()
            .await
            .map_err(|e| self.latch(Error::io(what, e)))
    }

    /// Write header fields in place, then fsync.
    pub async fn write_header(&self, patch: HeaderPatch, what: &'static str) -> Result<()> {
        self.write(patch.bytes(), patch.offset(), what).await?;
        self.sync("syncing the header").await
    }

    /// Zero the new metadata clusters `hosts` on disk (each `len` bytes, of metadata kind
    /// `kind` for the overlap check), then forget them in `new`: from then on their slices
    /// may be loaded from disk.
    pub async fn zero_new(
        &self,
        hosts: &[u64],
        (len, kind): (u64, Kinds),
        (new, map): (&NewClusters, &MetadataMap),
        what: &'static str,
    ) -> Result<()> {
        for &host in hosts {
            map.check(host, len, kind).await?;
            self.file
                .write_zeroes(host, len)
                .await
                .map_err(|e| self.latch(Error::io(what, e).at_host(HostOffset(host))))?;
            new.remove(host);
        }
        Ok(())
    }

    /// Write the taken dirty slices back (checked against the metadata map as metadata of
    /// `kind`), marking each clean unless it was updated meanwhile.
    pub async fn write_back(
        &self,
        slices: &[DirtySlice],
        kind: Kinds,
        map: &MetadataMap,
        what: &'static str,
    ) -> Result<()> {
        for (s, bytes, gen_) in slices {
            map.check(s.offset(), bytes.len() as u64, kind).await?;
            // Keeps the slice unevictable also if this future is dropped mid-write.
            let writing = s.start_writing();
            let r = self.write(bytes, s.offset(), what).await;
            drop(writing);
            r?;
            s.mark_clean(*gen_);
        }
        Ok(())
    }
}

/// The dirty slices of `cache` with copies of their bytes, by host offset.
pub fn take_dirty(cache: &SliceCache) -> Vec<DirtySlice> {
    cache
        .dirty_slices()
        .into_iter()
        .filter_map(|s| s.snapshot_dirty().map(|(bytes, g)| (s, bytes, g)))
        .collect()
}

/// Load `slice` of `cache` (at its host offset) from `file` unless it is loaded already; a
/// slice of a `fresh` (new, not yet zeroed) cluster is zeros and never read. A failed load
/// drops the slice from the cache so the next lookup retries. `fresh` is only asked on a
/// load, keeping the hit path free of the new-cluster set's lock.
pub async fn load_slice(
    cache: &SliceCache,
    slice: Arc<Slice>,
    (file, fresh): (&Arc<dyn Storage>, impl FnOnce() -> bool),
    what: &'static str,
) -> Result<Arc<Slice>> {
    if slice.is_loaded() {
        return Ok(slice);
    }
    let off = slice.offset();
    let res = slice
        .ensure_loaded(|mut buf| async move {
            if !fresh() {
                file.read_at(&mut buf, off)
                    .await
                    .map_err(|e| Error::io(what, e).at_host(HostOffset(off)))?;
            }
            Ok(buf)
        })
        .await;
    if let Err(e) = res {
        drop(slice);
        cache.forget_failed(off);
        return Err(e);
    }
    Ok(slice)
}
