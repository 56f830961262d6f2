//! Creating a snapshot (`qemu-img snapshot -c`): see the module docs of `snapshot` for the
//! order of the writes.

use super::super::Image;
use super::Snapshot;
use super::table::{TablePlace, next_id};
use super::tree::{Direction, Tree};
use crate::alloc::Kinds;
use crate::error::Result;
use crate::format::l1::{self, L1Entry};
use crate::units::to_usize;

impl Image {
    /// Create an internal snapshot of the current disk state named `name`, with the next
    /// free numeric ID (as `qemu-img snapshot -c NAME`; names need not be unique, as in
    /// QEMU). Returns the new table entry.
    ///
    /// Errors: `Unsupported` when a shared cluster's refcount would overflow the image's
    /// refcount width (`refcount_bits=1` images can snapshot only an empty disk) or the image
    /// has an external data file; `ReadOnly` on a read-only image. Those leave the image
    /// untouched. Cancel-safe: a dropped call finishes in the background.
    ///
    /// ```no_run
    /// # async fn demo() -> qcow2_engine::Result<()> {
    /// use qcow2_engine::image::{Image, OpenOptions};
    /// let img = Image::open("disk.qcow2", &OpenOptions::new().writable(true)).await?;
    /// let snap = img.create_snapshot("before-upgrade").await?;
    /// println!("snapshot {} created", snap.id);
    /// img.close().await?;
    /// # Ok(()) }
    /// ```
    pub async fn create_snapshot(&self, name: &str) -> Result<Snapshot> {
        let name = name.to_string();
        self.detached(async move |img| img.create_now(&name).await)
            .await
    }

    async fn create_now(&self, name: &str) -> Result<Snapshot> {
        let w = self.write_state()?;
        self.check_snapshots_supported()?;
        let _quiet = self.quiesce().await?;
        let (mut snaps, old_place) = self.read_snapshot_table().await?;
        old_place.check_rewritable()?;
        let l1: Vec<L1Entry> = self.inner.l1.entries();
        let tree = self.load_tree(&l1).await?;
        self.check_tree(&tree, Direction::Up).await?;
        let mut snap = new_entry(name, &snaps, self.virtual_size(), &l1);
        snaps.push(snap.clone());
        crate::format::snapshot::check_writable(&snaps)?;
        snaps.pop();
        let l1_offset = self
            .create_commit(l1, &tree, (&mut snaps, old_place), snap.clone())
            .await
            .map_err(|e| w.poison(e))?;
        snap.l1_table_offset = l1_offset;
        Ok(snap)
    }

    /// The changes of a create, once every check passed. Returns the new L1 copy's offset.
    async fn create_commit(
        &self,
        l1: Vec<L1Entry>,
        tree: &Tree,
        (snaps, old_place): (&mut Vec<Snapshot>, TablePlace),
        mut snap: Snapshot,
    ) -> Result<u64> {
        let l1_offset = self.write_l1_copy(&l1).await?;
        self.change_tree(tree, Direction::Up).await?;
        // The copy's clusters and the raised refcounts are durable before anything else.
        self.flush_refcounts().await?;
        let map = self.write_state()?.refcounts().map().clone();
        let cs = self.inner.geo.cluster_size;
        tree.l2_tables
            .iter()
            .for_each(|&t| map.insert(t, cs, Kinds::SNAPSHOT_L2));
        let mut active = l1;
        if self.recompute_copied(&mut active).await? {
            self.write_active_l1(active).await?;
        }
        snap.l1_table_offset = l1_offset;
        snaps.push(snap);
        self.switch_snapshot_table(snaps).await?;
        map.remove_kinds(old_place.offset, old_place.len, Kinds::SNAPSHOT_TABLE);
        self.free_range(old_place.offset, old_place.len).await?;
        self.flush_refcounts().await?;
        Ok(l1_offset)
    }

    /// Write a copy of `l1` (COPIED flags clear: they mean nothing in a snapshot's table)
    /// to fresh clusters; its refcounts are in the cache, the caller flushes them.
    async fn write_l1_copy(&self, l1: &[L1Entry]) -> Result<u64> {
        let w = self.write_state()?;
        let cs = self.inner.geo.cluster_size;
        let len = l1.len() as u64 * 8;
        if len == 0 {
            return Ok(0);
        }
        let offset = w.refcounts().alloc(len.div_ceil(cs)).await?.0;
        w.refcounts().map().insert(offset, len, Kinds::SNAPSHOT_L1);
        let copy: Vec<L1Entry> = l1
            .iter()
            .map(|e| {
                e.l2_offset()
                    .map_or(L1Entry::default(), |h| L1Entry::new(h, false))
            })
            .collect();
        let mut buf = vec![0u8; to_usize(len)];
        l1::write_table(&copy, &mut buf);
        self.check_metadata_write(offset, len, Kinds::SNAPSHOT_L1)
            .await?;
        w.meta()
            .write(&buf, offset, "writing a snapshot L1 table")
            .await?;
        Ok(offset)
    }
}

/// The table entry of a new snapshot, with the fields `qemu-img snapshot -c` writes: the
/// current time (microsecond precision), VM clock and state size 0, icount 0.
fn new_entry(name: &str, snaps: &[Snapshot], disk_size: u64, l1: &[L1Entry]) -> Snapshot {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    Snapshot {
        l1_table_offset: 0,
        l1_size: u32::try_from(l1.len()).unwrap_or(u32::MAX),
        id: next_id(snaps),
        name: name.to_string(),
        date_sec: u32::try_from(now.as_secs()).unwrap_or(u32::MAX),
        date_nsec: now.subsec_micros() * 1000,
        vm_clock_nsec: 0,
        vm_state_size: 0,
        disk_size: Some(disk_size),
        icount: Some(0),
        extra_unknown: Vec::new(),
    }
}
