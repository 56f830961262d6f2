//! Runs of whole clusters in one write: one data IO for many clusters.
//!
//! A request that covers several whole clusters is cut into runs, each written with a single
//! IO instead of one per cluster:
//! - an *in-place run*: clusters the request may write in place (see `write.rs`) whose host
//!   clusters follow each other in the file;
//! - an *allocation run*: clusters that need a new host cluster anyway (unallocated, zero
//!   without a private host cluster, compressed, shared with a snapshot) and are wholly
//!   overwritten, so nothing of their old content is needed. The run claims each cluster's
//!   in-flight guard (the first by waiting, the others only if free at once, so a request
//!   never waits while holding a guard), allocates the run's host clusters (consecutive ones
//!   unless free space is fragmented), writes the data in one IO per consecutive stretch, and only then publishes each mapping, as
//!   the single-cluster path does.
//!
//! Anything else (a cluster whose host cluster is kept, an external data file, a cluster
//! another request is changing) goes through the single-cluster path, one cluster at a time.

use super::Image;
use super::lookup::Mapping;
use crate::alloc::InflightGuard;
use crate::error::Result;
use crate::format::l2::{L2Entry, SubclusterBitmap, SubclusterState};
use crate::units::to_usize;
use crate::units::{GuestCluster, GuestOffset, HostOffset};

/// Most bytes one run writes, and most clusters (bounds the guards held).
const MAX_RUN_BYTES: u64 = 8 << 20;
const MAX_RUN_CLUSTERS: u64 = 256;

impl Image {
    /// Write the first clusters of `buf` (whole clusters, `off` cluster-aligned) as one run;
    /// returns the bytes written (at least one cluster).
    pub(crate) async fn write_run(&self, buf: &[u8], off: GuestOffset) -> Result<usize> {
        let geo = self.inner.geo;
        let cs = geo.cluster_size;
        let max = (buf.len() as u64 / cs).min((MAX_RUN_BYTES / cs).clamp(1, MAX_RUN_CLUSTERS));
        let gc = geo.guest_cluster(off);
        let m = self.lookup(gc).await?;
        if let Some(host) = self.in_place_target(&m, off, cs) {
            let n = self.in_place_run(gc, host, max).await?;
            let len = to_usize(n * cs); // at most buf.len()
            self.write_data(&buf[..len], host).await?;
            return Ok(len);
        }
        let w = self.write_state()?;
        let first = w.lock_guest_cluster(gc).await;
        let m = self.lookup(gc).await?;
        let one = to_usize(cs); // a cluster: at most 2 MiB
        if let Some(host) = self.in_place_target(&m, off, cs) {
            drop(first);
            self.write_data(&buf[..one], host).await?;
            return Ok(one);
        }
        if !self.needs_new_host(&m) {
            self.allocate_and_write(gc, m, &buf[..one], off).await?;
            return Ok(one);
        }
        let mut run = vec![(first, m)];
        while (run.len() as u64) < max {
            let c = gc.offset_by(run.len() as u64);
            let Some(guard) = w.try_lock_guest_cluster(c) else {
                break;
            };
            let m = self.lookup(c).await?;
            if !self.needs_new_host(&m) {
                break;
            }
            run.push((guard, m));
        }
        let len = run.len() * one; // at most buf.len()
        self.allocate_run(gc, &run, &buf[..len]).await?;
        Ok(len)
    }

    /// How many clusters from `gc` (at most `max`) can be written in place at consecutive
    /// host clusters starting at `host`.
    async fn in_place_run(&self, gc: GuestCluster, host: HostOffset, max: u64) -> Result<u64> {
        let geo = self.inner.geo;
        let mut n = 1;
        while n < max {
            let c = gc.offset_by(n);
            let m = self.lookup(c).await?;
            let at = geo.cluster_start(c);
            let next_host = host.offset_by(n * geo.cluster_size);
            if self.in_place_target(&m, at, geo.cluster_size) != Some(next_host) {
                break;
            }
            n += 1;
        }
        Ok(n)
    }

    /// Allocate `n` host clusters, one allocator call each under one hold of the allocator
    /// lock: consecutive unless free space is fragmented. (Asking for `n` contiguous clusters
    /// at once would grow the refcount table past a run that reaches beyond its coverage.)
    async fn alloc_each(&self, n: usize) -> Result<Vec<HostOffset>> {
        let w = self.write_state()?;
        let mut hosts = Vec::with_capacity(n);
        let mut alloc = w.refcounts().lock().await;
        for _ in 0..n {
            match alloc.alloc_clusters(1).await {
                Ok(h) => hosts.push(h),
                Err(e) => {
                    drop(alloc);
                    for &h in &hosts {
                        w.defer_free(h, false);
                    }
                    return Err(e);
                }
            }
        }
        Ok(hosts)
    }

    /// Whether a whole-cluster write to a cluster mapped as `m` takes a new host cluster.
    fn needs_new_host(&self, m: &Mapping) -> bool {
        self.inner.data_file_path.is_none()
            && !matches!(
                m.entry,
                L2Entry::Normal { copied: true, .. }
                    | L2Entry::Zero {
                        host: Some(_),
                        copied: true
                    }
            )
    }

    /// Allocate contiguous host clusters for the claimed clusters of `run` (guest clusters
    /// from `gc`), write `data` there in one IO, then publish the mappings.
    async fn allocate_run(
        &self,
        gc: GuestCluster,
        run: &[(InflightGuard<'_>, Mapping)],
        data: &[u8],
    ) -> Result<()> {
        let w = self.write_state()?;
        let cs = self.inner.geo.cluster_size;
        let mut tables = Vec::with_capacity(run.len());
        for (k, (_, m)) in run.iter().enumerate() {
            self.check_entry_is_data(&m.entry).await?;
            tables.push(self.ensure_l2_table(gc.offset_by(k as u64)).await?);
        }
        let hosts = self.alloc_each(run.len()).await?;
        // One IO per stretch of consecutive host clusters (usually the whole run).
        let mut i = 0;
        while i < hosts.len() {
            let mut j = i + 1;
            while j < hosts.len() && hosts[j] == hosts[i].offset_by((j - i) as u64 * cs) {
                j += 1;
            }
            let (a, b) = (i * to_usize(cs), j * to_usize(cs));
            if let Err(e) = self.write_data(&data[a..b], hosts[i]).await {
                for &h in &hosts {
                    w.defer_free(h, false);
                }
                return Err(e);
            }
            i = j;
        }
        let bitmap = if self.inner.geo.l2.extended {
            SubclusterBitmap::all(SubclusterState::Allocated)
        } else {
            SubclusterBitmap(0)
        };
        for (k, ((_, m), table)) in run.iter().zip(tables).enumerate() {
            let entry = L2Entry::Normal {
                host: hosts[k],
                copied: true,
            };
            self.set_l2(table, gc.offset_by(k as u64), entry, bitmap)
                .await?;
            self.release_old(&m.entry);
        }
        Ok(())
    }
}
