//! Internal snapshots: list, create, delete, apply (`qemu-img snapshot -l|-c|-d|-a`), and
//! read-only views of a snapshot ([`Image::open_snapshot`]).
//!
//! A snapshot is a copy of the active L1 table plus one more reference on every cluster the
//! table reaches; the active tables lose their COPIED flags, so the write path copies a
//! shared cluster before changing it. Every operation changes the image in soft-update
//! order, the table switch being one header write (inside the first sector):
//!
//! ```text
//!  create:  new L1 copy + refcounts raised (fsync) → COPIED cleared in the active tables
//!           (fsync) → new snapshot table (fsync) → header switch (fsync) → old table freed
//!  delete:  new snapshot table (fsync) → header switch (fsync) → the snapshot's references,
//!           its L1 table and the old table freed (fsync) → COPIED recomputed (fsync)
//!  apply:   the snapshot's references raised (fsync) → its L1 copied to a new active L1
//!           (fsync) → header switch of size + L1 (fsync) → the old active tree and L1
//!           freed (fsync) → COPIED recomputed (fsync)
//! ```
//! A crash before a switch leaves the old state, after it the new one; in between only leaks
//! (refcounts above the references), which `check -r leaks` repairs — with one exception
//! QEMU shares: between raising or dropping refcounts and rewriting the COPIED flags, a
//! flag may disagree with its cluster's refcount. That is harmless (a flag set on a
//! cluster whose only reference is the active one, or clear on an unshared cluster, which
//! costs one copy on the next write), and `check -r all` rewrites it.
//!
//! The operations run on a quiet image: they wait for the requests in flight, flush, and
//! hold the flush lock throughout. Like resize, they are not meant to run beside other
//! requests on the same image. Each is cancel-safe (a dropped future finishes in the
//! background, see `crate::detach`); a failure half-way latches the image read-only until it
//! is reopened, as any metadata write failure does.

mod apply;
mod copied;
mod create;
mod delete;
mod table;
mod tree;
mod view;

pub use crate::format::snapshot::Snapshot;
pub use table::find_by_id_or_name;

use super::Image;
use crate::alloc::Kinds;
use crate::error::{Error, Result};

impl Image {
    /// The internal snapshots, in table order. Entries without a disk size report the
    /// current virtual size, as QEMU does.
    ///
    /// ```no_run
    /// # async fn demo(img: qcow2_engine::image::Image) -> qcow2_engine::Result<()> {
    /// for s in img.snapshots().await? {
    ///     println!("{} {} {:?}", s.id, s.name, s.disk_size);
    /// }
    /// # Ok(()) }
    /// ```
    pub async fn snapshots(&self) -> Result<Vec<Snapshot>> {
        Ok(self.read_snapshot_table().await?.0)
    }

    /// Wait for the requests in flight, take the flush lock and flush twice (the second
    /// flush persists the frees the first one applied), so that the file holds every table
    /// as the image sees it and no pending free remains.
    async fn quiesce(&self) -> Result<tokio::sync::MutexGuard<'_, ()>> {
        let w = self.write_state()?;
        w.requests_idle().await;
        let guard = w.lock_flush().await;
        self.flush_held().await?;
        self.flush_held().await?;
        Ok(guard)
    }

    /// Refuse snapshots where QEMU does: external data files (guest data is not refcounted
    /// there) and encrypted images (not writable here).
    fn check_snapshots_supported(&self) -> Result<()> {
        if self.inner.data_file_path.is_some() {
            return Err(Error::unsupported(
                "internal snapshots of an image with an external data file",
            ));
        }
        Ok(())
    }

    /// Record in the metadata map the tables of `snaps`: their L1 tables and the L2 tables
    /// these point to (so the overlap check and the free check protect them).
    async fn mark_snapshots(&self, snaps: &[Snapshot]) -> Result<()> {
        let map = self.write_state()?.refcounts().map().clone();
        let cs = self.inner.geo.cluster_size;
        for s in snaps {
            let l1 = self.read_l1_at(s.l1_table_offset, s.l1_size).await?;
            map.insert(
                s.l1_table_offset,
                u64::from(s.l1_size) * 8,
                Kinds::SNAPSHOT_L1,
            );
            for l2 in l1.iter().filter_map(|e| e.l2_offset()) {
                map.insert(l2.0, cs, Kinds::SNAPSHOT_L2);
            }
        }
        Ok(())
    }
}
