//! Compressed cluster writes (QEMU's `write -c`, `qemu-img convert -c`).
//!
//! One guest cluster at a time: compress it with the image's codec; if that does not shrink
//! it, write it normally. Otherwise reserve bytes for the payload with the packing allocator
//! (`alloc::bytes`: payloads share host clusters, one reference per payload touching a
//! cluster), write the payload, then publish the compressed L2 entry and release the old
//! entry's references once the new mapping is on disk — the same order as the normal
//! allocating write path.

use std::borrow::Cow;

use super::Image;
use crate::error::{Error, Result};
use crate::format::compressed::{self, CompressedDescriptor};
use crate::format::l2::{L2Entry, SubclusterBitmap};
use crate::units::to_usize;
use crate::units::{ClusterIndex, GuestOffset, HostOffset};

/// One guest cluster prepared by [`Image::compress_cluster`] for
/// [`Image::write_compressed_cluster`].
#[derive(Debug)]
pub struct CompressedCluster {
    /// Guest offset of the cluster.
    offset: u64,
    /// The compressed payload, or `None` when the data did not compress.
    payload: Option<Vec<u8>>,
    /// The caller's bytes when they did not compress (written as a normal cluster).
    data: Vec<u8>,
}

impl CompressedCluster {
    /// Whether the cluster compressed (else it is written as a normal cluster).
    pub fn is_compressed(&self) -> bool {
        self.payload.is_some()
    }
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
        let buf = buf.to_vec();
        self.detached(async move |img| img.write_compressed_now(&buf, offset).await)
            .await
    }

    async fn write_compressed_now(&self, buf: &[u8], offset: u64) -> Result<()> {
        let c = self.compress_cluster(buf, offset)?;
        self.store_compressed_now(&c).await
    }

    /// Compress one guest cluster for [`Image::write_compressed_cluster`], without touching
    /// the image: CPU work only, so many clusters can be compressed at once on other threads
    /// and then written in a fixed order (the image's layout then does not depend on which
    /// compression finished first). `buf` and `offset` as for [`Image::write_compressed`].
    ///
    /// ```no_run
    /// # async fn demo(img: qcow2_engine::image::Image, data: Vec<u8>) -> qcow2_engine::Result<()> {
    /// let img2 = img.clone();
    /// let c = std::thread::spawn(move || img2.compress_cluster(&data, 0)).join().unwrap()?;
    /// img.write_compressed_cluster(c).await?;
    /// # Ok(())
    /// # }
    /// ```
    pub fn compress_cluster(&self, buf: &[u8], offset: u64) -> Result<CompressedCluster> {
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
        let geo = self.inner.geo;
        let cs = geo.cluster_size;
        let len = buf.len() as u64;
        self.check_range(offset, len)?;
        self.inner.bitmaps.mark(offset, len);
        let whole = len == cs;
        let tail = len > 0 && len < cs && offset + len == self.virtual_size();
        if geo.in_cluster(GuestOffset(offset)) != 0 || !(whole || tail) {
            return Err(Error::invalid_arg(
                "compressed writes must cover exactly one aligned cluster",
            )
            .at_guest(GuestOffset(offset)));
        }
        let input: Cow<[u8]> = if whole {
            Cow::Borrowed(buf)
        } else {
            let mut v = buf.to_vec();
            v.resize(to_usize(cs), 0);
            Cow::Owned(v)
        };
        let payload = compressed::compress(self.inner.compression, &input)?;
        let data = match payload {
            // As QEMU: incompressible data is stored as a normal cluster.
            None => buf.to_vec(),
            Some(_) => Vec::new(),
        };
        Ok(CompressedCluster {
            offset,
            payload,
            data,
        })
    }

    /// Write a cluster [`Image::compress_cluster`] prepared (compressed, or normally if it
    /// did not compress). Cancel-safe (see [`Image::write_at`]).
    pub async fn write_compressed_cluster(&self, c: CompressedCluster) -> Result<()> {
        self.detached(async move |img| img.store_compressed_now(&c).await)
            .await
    }

    async fn store_compressed_now(&self, c: &CompressedCluster) -> Result<()> {
        let Some(payload) = &c.payload else {
            return self.write_at_now(&c.data, c.offset).await;
        };
        let w = self.write_state()?;
        let geo = self.inner.geo;
        let _epoch = w.enter_request();
        let gc = geo.guest_cluster(GuestOffset(c.offset));
        let _guard = w.lock_guest_cluster(gc).await;
        let old = self.lookup(gc).await?;
        self.check_entry_is_data(&old.entry).await?;
        let table = self.ensure_l2_table(gc).await?;
        let host = w.refcounts().alloc_bytes(payload.len() as u64).await?;
        let desc = CompressedDescriptor::new(host, payload.len() as u64, geo.cluster_bits);
        let written = match desc {
            Ok(d) => self.write_data(payload, host).await.map(|()| d),
            Err(e) => Err(e),
        };
        let desc = match written {
            Ok(d) => d,
            Err(e) => {
                self.release_payload(host, payload.len() as u64);
                return Err(e);
            }
        };
        // Extended L2: the subcluster bitmap of a compressed entry must be 0.
        self.set_l2(table, gc, L2Entry::Compressed(desc), SubclusterBitmap(0))
            .await?;
        self.release_old(&old.entry);
        self.after_metadata_change();
        Ok(())
    }

    /// Drop the references [`Refcounts::alloc_bytes`](crate::alloc::Refcounts::alloc_bytes)
    /// took for a payload that never got a mapping.
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
