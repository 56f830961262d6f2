//! Allocation status of guest ranges, with the same meaning as `qemu-img map --output=json`:
//! which layer of the backing chain (depth) provides the data, whether it reads as zeros,
//! whether it is data, compressed, and where on the host it lives.

use super::geometry::Geometry;
use super::lookup::Mapping;
use super::{Backing, Image};
use crate::error::{Error, Result};
use crate::format::l2::{L2Entry, SubclusterState};
use crate::units::{GuestOffset, HostOffset, to_u32};

/// One extent of `map` output (field names as qemu-img prints them).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
pub struct Extent {
    /// Guest offset.
    pub start: u64,
    /// Length in bytes.
    pub length: u64,
    /// Layer of the backing chain that provides it (0 = this image).
    pub depth: u32,
    /// Allocated in some layer.
    pub present: bool,
    /// Reads as zeros.
    pub zero: bool,
    /// Backed by data (not just a zero flag).
    pub data: bool,
    /// Stored compressed.
    pub compressed: bool,
    /// Host offset in the layer's file, when meaningful.
    #[cfg_attr(feature = "serde", serde(skip_serializing_if = "Option::is_none"))]
    pub offset: Option<u64>,
}

/// How one piece of a cluster is mapped, for status purposes.
#[derive(Debug, Clone, Copy)]
enum Status {
    Data(HostOffset),
    Zero(Option<HostOffset>),
    Unallocated(Option<HostOffset>),
    Compressed,
}

impl Image {
    /// The extents covering `[offset, offset + len)`, merged the way qemu-img merges them.
    pub async fn map(&self, offset: u64, len: u64) -> Result<Vec<Extent>> {
        self.check_range(offset, len)?;
        let mut out: Vec<Extent> = Vec::new();
        let mut off = offset;
        while off < offset + len {
            let mut e = self
                .status_at(GuestOffset(off), offset + len - off, 0)
                .await?;
            off += e.length;
            if self.inner.encrypted {
                // Like QEMU: host offsets of encrypted data are not reported (the bytes
                // there are ciphertext), so allocated runs merge regardless of placement.
                e.offset = None;
            }
            match out.last_mut() {
                Some(last) if mergeable(last, &e) => last.length += e.length,
                _ => out.push(e),
            }
        }
        Ok(out)
    }

    /// The status of the run starting at `off` (at most `max` bytes) seen from layer `depth`.
    async fn status_at(&self, off: GuestOffset, max: u64, depth: u32) -> Result<Extent> {
        let geo = self.inner.geo;
        let gc = geo.guest_cluster(off);
        let (status, len) = match self.l2_table_of(gc)? {
            // No L2 table: everything the L1 entry covers is unallocated.
            None => {
                let cover = geo.l2_entries * geo.cluster_size;
                (Status::Unallocated(None), (cover - off.0 % cover).min(max))
            }
            Some(_) => {
                let m = self.lookup(gc).await?;
                status_piece(&geo, &m, off, max)?
            }
        };
        let ext = |present, zero, data, compressed, offset: Option<HostOffset>| Extent {
            start: off.0,
            length: len,
            depth,
            present,
            zero,
            data,
            compressed,
            offset: offset.map(|h| h.0),
        };
        match status {
            Status::Compressed => Ok(ext(true, false, true, true, None)),
            Status::Zero(host) => Ok(ext(true, true, false, false, host)),
            // Like QEMU, ask the host file about holes only for metadata-preallocated images.
            Status::Data(host) if self.metadata_preallocated().await? => {
                let (is_data, n) = (self.inner.data.block_status(host.0, len).await)
                    .map_err(|e| Error::io("querying host allocation", e).at_host(host))?;
                let n = n.clamp(1, len);
                Ok(Extent {
                    length: n,
                    ..ext(true, !is_data, true, false, Some(host))
                })
            }
            Status::Data(host) => Ok(ext(true, false, true, false, Some(host))),
            Status::Unallocated(host) => match &self.inner.backing {
                Some(b) if off.0 < b.size() => {
                    backing_status(b, off, len.min(b.size() - off.0), depth + 1).await
                }
                _ => Ok(ext(false, true, false, false, host)),
            },
        }
    }
}

async fn backing_status(b: &Backing, off: GuestOffset, len: u64, depth: u32) -> Result<Extent> {
    match b {
        Backing::Qcow2(img) => Box::pin(img.status_at(off, len, depth)).await,
        Backing::Raw { storage, .. } => {
            // A raw file's host offsets are its guest offsets.
            let host = HostOffset(off.0);
            let (is_data, n) = (storage.block_status(host.0, len).await)
                .map_err(|e| Error::io("querying backing allocation", e).at_host(host))?;
            Ok(Extent {
                start: off.0,
                length: n.clamp(1, len),
                depth,
                present: true,
                zero: !is_data,
                data: is_data,
                compressed: false,
                offset: Some(host.0),
            })
        }
    }
}

/// Status of the piece of one cluster at `off` (at most `max` bytes).
fn status_piece(geo: &Geometry, m: &Mapping, off: GuestOffset, max: u64) -> Result<(Status, u64)> {
    let in_c = geo.in_cluster(off);
    let to_end = (geo.cluster_size - in_c).min(max);
    let status = match m.entry {
        L2Entry::Compressed(_) => Status::Compressed,
        L2Entry::Zero { host, .. } => Status::Zero(host.map(|h| h.offset_by(in_c))),
        _ if geo.l2.extended => return subcluster_status(geo, m, in_c, to_end),
        L2Entry::Normal { host, .. } => Status::Data(host.offset_by(in_c)),
        L2Entry::Unallocated => Status::Unallocated(None),
    };
    Ok((status, to_end))
}

fn subcluster_status(geo: &Geometry, m: &Mapping, in_c: u64, to_end: u64) -> Result<(Status, u64)> {
    let sc = geo.subcluster_size();
    let first = to_u32(in_c / sc);
    let state = m.bitmap.state(first)?;
    let mut end = (u64::from(first) + 1) * sc;
    while end < in_c + to_end && m.bitmap.state(to_u32(end / sc))? == state {
        end += sc;
    }
    let host = m.entry.host().map(|h| h.offset_by(in_c));
    let status = match state {
        SubclusterState::Allocated => {
            Status::Data(host.ok_or_else(|| Error::corrupt("allocated subcluster without host"))?)
        }
        SubclusterState::Zero => Status::Zero(host),
        SubclusterState::Unallocated => Status::Unallocated(host),
    };
    Ok((status, (end - in_c).min(to_end)))
}

/// qemu-img merges neighbours with equal flags and depth whose host offsets (if any) continue.
fn mergeable(a: &Extent, b: &Extent) -> bool {
    let same = a.depth == b.depth
        && a.present == b.present
        && a.zero == b.zero
        && a.data == b.data
        && a.compressed == b.compressed;
    let offsets = match (a.offset, b.offset) {
        (None, None) => true,
        (Some(x), Some(y)) => x + a.length == y,
        _ => false,
    };
    same && offsets
}
