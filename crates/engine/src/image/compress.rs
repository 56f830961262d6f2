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
        let w = self.write_state()?;
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
        if geo.in_cluster(offset) != 0 || !(whole || tail) {
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
        let Some(payload) = compressed::compress(self.inner.compression, &input)? else {
            // As QEMU: incompressible data is stored as a normal cluster.
            return self.write_at_now(buf, offset).await;
        };
        let _epoch = w.enter_request();
        let gc = geo.guest_cluster(offset);
        let _guard = w.lock_guest_cluster(gc).await;
        let old = self.lookup(gc).await?;
        self.check_entry_is_data(&old.entry).await?;
        let table = self.ensure_l2_table(gc).await?;
        let host = w.refcounts().alloc_bytes(payload.len() as u64).await?;
        let desc = CompressedDescriptor::new(host, payload.len() as u64, geo.cluster_bits);
        let written = match desc {
            Ok(d) => self.write_data(&payload, host.0).await.map(|()| d),
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
