//! Compressed cluster writes (QEMU's `write -c`, `qemu-img convert -c`).
//!
//! Two steps, so that compression (CPU only) can run on many threads while the writes happen
//! in a fixed order: [`Image::compress_run`] compresses the clusters of one buffer with the
//! image's codec, and [`Image::write_compressed_run`] stores them. A cluster that does not
//! shrink is written normally, as QEMU does; neighbouring ones go out as one normal write.
//! Compressed payloads get bytes from the packing allocator (`alloc::bytes`: payloads share
//! host clusters, one reference per payload touching a cluster), which places the payloads of
//! neighbouring clusters back to back, so they too reach the disk in one IO. Only then are the
//! compressed L2 entries published and the old entries' references released — the same order
//! as the normal allocating write path.

use std::borrow::Cow;

use super::Image;
use crate::error::{Error, Result};
use crate::format::compressed::{self, CompressedDescriptor};
use crate::format::l2::{L2Entry, SubclusterBitmap};
use crate::units::to_usize;
use crate::units::{ClusterIndex, GuestCluster, GuestOffset, HostOffset};

/// Consecutive guest clusters prepared by [`Image::compress_run`] for
/// [`Image::write_compressed_run`].
#[derive(Debug)]
pub struct CompressedRun {
    /// Guest offset of the first cluster.
    offset: u64,
    /// The caller's bytes (clusters that do not compress are written from here).
    data: Vec<u8>,
    /// What to store for each cluster, in order.
    slots: Vec<Slot>,
}

impl CompressedRun {
    /// How many clusters of the run will be stored (compressed or not); the others are left
    /// as they are.
    pub fn stored_clusters(&self) -> usize {
        self.slots
            .iter()
            .filter(|s| !matches!(s, Slot::Skip))
            .count()
    }
}

/// The fate of one cluster of a [`CompressedRun`].
#[derive(Debug)]
enum Slot {
    /// Left alone (the caller's `keep` said no).
    Skip,
    /// Did not compress: written as a normal cluster.
    Plain,
    /// The compressed payload.
    Packed(Vec<u8>),
}

/// A compressed payload with its place: allocated, not yet published.
struct Placed {
    gc: GuestCluster,
    table: HostOffset,
    old: L2Entry,
    desc: CompressedDescriptor,
    len: u64,
}

impl Image {
    /// Write one guest cluster compressed.
    ///
    /// `offset` must be cluster-aligned and `buf` exactly one cluster long, or — for the last
    /// cluster of a disk whose size is not a multiple of the cluster size — exactly the rest
    /// of the disk (it is zero-padded for compression). Data that does not compress is
    /// written uncompressed. Unlike QEMU, an already allocated cluster may be overwritten;
    /// its old host references are released. Images with an external data file cannot hold
    /// compressed clusters and are refused. Cancel-safe (see [`Image::write_at`]).
    pub async fn write_compressed(&self, buf: &[u8], offset: u64) -> Result<()> {
        self.check_compressed_write(offset, buf.len() as u64)?;
        if buf.len() as u64 > self.inner.geo.cluster_size {
            return Err(one_cluster_error(offset));
        }
        let run = self.compress_run(buf.to_vec(), offset, |_| true)?;
        self.write_compressed_run(run).await.map(drop)
    }

    /// Compress the clusters of `data` (guest offset `offset`) for
    /// [`Image::write_compressed_run`], without touching the image: CPU work only, so many
    /// runs can be compressed at once on other threads and then written in a fixed order (the
    /// image's layout then does not depend on which compression finished first).
    ///
    /// `offset` must be cluster-aligned and `data` whole clusters, except that the last one
    /// may end at the end of the disk. Clusters for which `keep` returns false are left as
    /// they are (`qcow2 convert -c` skips all-zero clusters so they stay unallocated).
    ///
    /// ```no_run
    /// # async fn demo(img: qcow2_engine::image::Image, data: Vec<u8>) -> qcow2_engine::Result<()> {
    /// let img2 = img.clone();
    /// let run = std::thread::spawn(move || img2.compress_run(data, 0, |_| true))
    ///     .join()
    ///     .unwrap()?;
    /// img.write_compressed_run(run).await?;
    /// # Ok(())
    /// # }
    /// ```
    pub fn compress_run(
        &self,
        data: Vec<u8>,
        offset: u64,
        keep: impl Fn(&[u8]) -> bool,
    ) -> Result<CompressedRun> {
        self.check_compressed_write(offset, data.len() as u64)?;
        let cs = to_usize(self.inner.geo.cluster_size);
        let mut slots = Vec::with_capacity(data.len().div_ceil(cs));
        for (i, cluster) in data.chunks(cs).enumerate() {
            if !keep(cluster) {
                slots.push(Slot::Skip);
                continue;
            }
            let at = offset + (i * cs) as u64;
            self.inner.bitmaps.mark(at, cluster.len() as u64);
            slots.push(self.compress_one(cluster, cs)?);
        }
        Ok(CompressedRun {
            offset,
            data,
            slots,
        })
    }

    /// The checks of a compressed write of `len` bytes at `offset`.
    fn check_compressed_write(&self, offset: u64, len: u64) -> Result<()> {
        self.write_state()?;
        self.check_data_access()?;
        if self.inner.encrypted {
            return Err(Error::unsupported(
                "compressed writes to an encrypted image (QEMU refuses them too)",
            ));
        }
        if self.inner.data_file_path.is_some() {
            return Err(Error::unsupported(
                "compressed writes to an image with an external data file",
            ));
        }
        self.check_range(offset, len)?;
        let geo = self.inner.geo;
        let ends_disk = offset + len == self.virtual_size();
        if len == 0
            || geo.in_cluster(GuestOffset(offset)) != 0
            || !(len % geo.cluster_size == 0 || ends_disk)
        {
            return Err(one_cluster_error(offset));
        }
        Ok(())
    }

    /// Compress one cluster (a short tail is zero-padded to a whole cluster first).
    fn compress_one(&self, cluster: &[u8], cs: usize) -> Result<Slot> {
        let input: Cow<[u8]> = if cluster.len() == cs {
            Cow::Borrowed(cluster)
        } else {
            let mut v = cluster.to_vec();
            v.resize(cs, 0);
            Cow::Owned(v)
        };
        // As QEMU: data that does not shrink is stored as a normal cluster.
        Ok(
            match compressed::compress(self.inner.compression, &input)? {
                Some(p) => Slot::Packed(p),
                None => Slot::Plain,
            },
        )
    }

    /// Write a run [`Image::compress_run`] prepared, in cluster order. Returns the run's data
    /// buffer, so that a caller converting many runs can read the next one into it (a fresh
    /// buffer costs page faults and clearing). Cancel-safe (see [`Image::write_at`]).
    pub async fn write_compressed_run(&self, run: CompressedRun) -> Result<Vec<u8>> {
        self.detached(async move |img| img.store_run_now(&run).await.map(|()| run.data))
            .await
    }

    async fn store_run_now(&self, run: &CompressedRun) -> Result<()> {
        let cs = to_usize(self.inner.geo.cluster_size);
        let mut i = 0;
        while i < run.slots.len() {
            let same =
                |s: &Slot| std::mem::discriminant(s) == std::mem::discriminant(&run.slots[i]);
            let j = i + run.slots[i..].iter().take_while(|s| same(s)).count();
            let at = run.offset + (i * cs) as u64;
            match &run.slots[i] {
                Slot::Skip => i = j,
                Slot::Plain => {
                    let end = (j * cs).min(run.data.len());
                    self.write_at_now(&run.data[i * cs..end], at).await?;
                    i = j;
                }
                Slot::Packed(_) => {
                    let payloads: Vec<&[u8]> = run.slots[i..j].iter().map(payload).collect();
                    i += self.store_packed(at, &payloads).await?;
                }
            }
        }
        Ok(())
    }

    /// Store the compressed payloads of consecutive guest clusters from `offset`: as many as
    /// can be claimed without waiting (at least the first); returns how many were stored.
    async fn store_packed(&self, offset: u64, payloads: &[&[u8]]) -> Result<usize> {
        let w = self.write_state()?;
        let _epoch = w.enter_request();
        let gc = self.inner.geo.guest_cluster(GuestOffset(offset));
        // Wait for the first cluster only, so a request never waits while holding a guard.
        let mut guards = vec![w.lock_guest_cluster(gc).await];
        while guards.len() < payloads.len() {
            match w.try_lock_guest_cluster(gc.offset_by(guards.len() as u64)) {
                Some(g) => guards.push(g),
                None => break,
            }
        }
        let payloads = &payloads[..guards.len()];
        let placed = self.place_payloads(gc, payloads).await?;
        if let Err(e) = self.write_payloads(&placed, payloads).await {
            self.release_placed(&placed);
            return Err(e);
        }
        for p in &placed {
            // Extended L2: the subcluster bitmap of a compressed entry must be 0.
            let entry = L2Entry::Compressed(p.desc);
            self.set_l2(p.table, p.gc, entry, SubclusterBitmap(0))
                .await?;
            self.release_old(&p.old);
        }
        self.after_metadata_change();
        Ok(placed.len())
    }

    /// Look up the clusters from `gc` (their guards held), make their L2 tables, then reserve
    /// bytes for each payload under one hold of the allocator lock.
    async fn place_payloads(&self, gc: GuestCluster, payloads: &[&[u8]]) -> Result<Vec<Placed>> {
        let w = self.write_state()?;
        let mut olds = Vec::with_capacity(payloads.len());
        for k in 0..payloads.len() as u64 {
            let old = self.lookup(gc.offset_by(k)).await?;
            self.check_entry_is_data(&old.entry).await?;
            olds.push((old.entry, self.ensure_l2_table(gc.offset_by(k)).await?));
        }
        let cb = self.inner.geo.cluster_bits;
        let mut placed = Vec::with_capacity(payloads.len());
        let mut alloc = w.refcounts().lock().await;
        for (k, (p, (old, table))) in payloads.iter().zip(olds).enumerate() {
            let len = p.len() as u64;
            let got = match alloc.alloc_bytes(len).await {
                Ok(host) => CompressedDescriptor::new(host, len, cb).map_err(|e| (e, Some(host))),
                Err(e) => Err((e, None)),
            };
            match got {
                Ok(desc) => placed.push(Placed {
                    gc: gc.offset_by(k as u64),
                    table,
                    old,
                    desc,
                    len,
                }),
                Err((e, host)) => {
                    drop(alloc);
                    if let Some(h) = host {
                        self.release_payload(h, len);
                    }
                    self.release_placed(&placed);
                    return Err(e);
                }
            }
        }
        Ok(placed)
    }

    /// Write the payloads where they were placed: one IO per stretch of back-to-back ones.
    async fn write_payloads(&self, placed: &[Placed], payloads: &[&[u8]]) -> Result<()> {
        let mut i = 0;
        while i < placed.len() {
            let mut j = i + 1;
            while j < placed.len()
                && placed[j].desc.host.0 == placed[j - 1].desc.host.0 + placed[j - 1].len
            {
                j += 1;
            }
            let host = placed[i].desc.host;
            if j == i + 1 {
                self.write_data(payloads[i], host).await?;
            } else {
                self.write_data(&payloads[i..j].concat(), host).await?;
            }
            i = j;
        }
        Ok(())
    }

    /// Drop the references of payloads that never got a mapping.
    fn release_placed(&self, placed: &[Placed]) {
        for p in placed {
            self.release_payload(p.desc.host, p.len);
        }
    }

    /// Drop the references the packing allocator took for a payload that never got a mapping.
    fn release_payload(&self, host: HostOffset, len: u64) {
        let Ok(w) = self.write_state() else { return };
        let cb = self.inner.geo.cluster_bits;
        let (first, last) = (
            host.cluster_index(cb),
            host.offset_by(len - 1).cluster_index(cb),
        );
        for c in first.0..=last.0 {
            w.defer_free(ClusterIndex(c).offset(cb), false);
        }
    }
}

/// The payload of a [`Slot::Packed`] (callers pass only those).
fn payload(s: &Slot) -> &[u8] {
    match s {
        Slot::Packed(p) => p,
        _ => &[],
    }
}

/// The error for a compressed write that is not whole aligned clusters.
fn one_cluster_error(offset: u64) -> Error {
    Error::invalid_arg("compressed writes must cover exactly one aligned cluster")
        .at_guest(GuestOffset(offset))
}
