//! The read path: split a request into runs of guest bytes that share one kind of mapping,
//! merging host-contiguous data clusters into one IO.

use super::Image;
use super::lookup::Mapping;
use crate::error::{Error, Result};
use crate::format::compressed::{self, CompressedDescriptor};
use crate::format::l2::{L2Entry, SubclusterState};
use crate::units::{GuestOffset, HostOffset, to_u32, to_usize};

/// Where a run of guest bytes reads from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Source {
    /// Host data at this offset (image file or external data file).
    Data(HostOffset),
    /// Reads as zeros (zero cluster or subcluster).
    Zero,
    /// Not allocated here: the backing image at the same guest offset (zeros without one).
    Backing,
    /// A compressed cluster; the run lies inside it.
    Compressed(CompressedDescriptor),
}

/// A run of guest bytes with one source.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Run {
    pub source: Source,
    pub len: u64,
}

impl Image {
    /// Read `buf.len()` bytes at guest offset `offset`.
    ///
    /// Any offset and length inside the virtual size; any number of reads (and writes) may
    /// be in flight at once. Dropping the future is safe: a read changes nothing (a flush it
    /// starts under cache pressure finishes on its own), and a host IO still in flight reads
    /// into a buffer the storage owns.
    pub async fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        self.check_range(offset, buf.len() as u64)?;
        self.check_data_access()?;
        // A cluster this read maps must not be freed and reused before the read is done.
        let _epoch = self.inner.write.as_ref().map(|w| w.enter_request());
        let offset = GuestOffset(offset);
        let mut done = 0usize;
        while done < buf.len() {
            let off = offset.offset_by(done as u64);
            let run = self.next_run(off, (buf.len() - done) as u64).await?;
            let piece = &mut buf[done..done + to_usize(run.len)];
            self.read_run(run.source, piece, off).await?;
            done += to_usize(run.len);
        }
        Ok(())
    }

    /// The longest run starting at `off` (at most `max` bytes) with one source, merging
    /// following clusters whose data is host-contiguous (or that are all zero / all backing).
    pub(crate) async fn next_run(&self, off: GuestOffset, max: u64) -> Result<Run> {
        let geo = self.inner.geo;
        let m = self.lookup(geo.guest_cluster(off)).await?;
        let mut run = piece(&geo, &m, off, max)?;
        while run.len < max && geo.in_cluster(off.offset_by(run.len)) == 0 {
            if matches!(run.source, Source::Compressed(_)) {
                break;
            }
            let next_off = off.offset_by(run.len);
            let m = self.lookup(geo.guest_cluster(next_off)).await?;
            let next = piece(&geo, &m, next_off, max - run.len)?;
            if !continues(run, next) {
                break;
            }
            run.len += next.len;
        }
        Ok(run)
    }

    async fn read_run(&self, source: Source, buf: &mut [u8], off: GuestOffset) -> Result<()> {
        match source {
            Source::Zero => {
                buf.fill(0);
                Ok(())
            }
            Source::Data(host) => self.read_data(buf, host, off).await,
            Source::Backing => match &self.inner.backing {
                Some(b) => b.read_at(buf, off.0).await,
                None => {
                    buf.fill(0);
                    Ok(())
                }
            },
            Source::Compressed(d) => {
                let cluster = self.read_compressed(d).await?;
                let start = to_usize(self.inner.geo.in_cluster(off));
                buf.copy_from_slice(&cluster[start..start + buf.len()]);
                Ok(())
            }
        }
    }

    /// Read and decompress one compressed cluster.
    pub(crate) async fn read_compressed(&self, d: CompressedDescriptor) -> Result<Vec<u8>> {
        let cs = self.inner.geo.cluster_size;
        let len = d.read_len();
        // A compressed cluster never needs more than a cluster plus the sector it starts in;
        // refuse larger descriptors rather than allocate what a hostile image asks for.
        if len > cs + 512 * 2 {
            return Err(
                Error::corrupt(format!("compressed cluster of {len} bytes")).at_host(d.host)
            );
        }
        let mut input = vec![0u8; to_usize(len)];
        self.inner
            .file
            .read_at(&mut input, d.host.0)
            .await
            .map_err(|e| Error::io("reading a compressed cluster", e).at_host(d.host))?;
        let mut out = vec![0u8; to_usize(cs)];
        compressed::decompress(self.inner.compression, &input, &mut out)
            .map_err(|e| e.at_host(d.host))?;
        Ok(out)
    }
}

/// Whether `next` can be appended to `run` as one IO.
fn continues(run: Run, next: Run) -> bool {
    match (run.source, next.source) {
        (Source::Data(a), Source::Data(b)) => a.checked_add(run.len) == Some(b),
        (Source::Zero, Source::Zero) | (Source::Backing, Source::Backing) => true,
        _ => false,
    }
}

/// The run at `off` inside its own cluster (at most `max` bytes).
fn piece(geo: &super::geometry::Geometry, m: &Mapping, off: GuestOffset, max: u64) -> Result<Run> {
    let in_c = geo.in_cluster(off);
    let to_end = (geo.cluster_size - in_c).min(max);
    let whole = |source| {
        Ok(Run {
            source,
            len: to_end,
        })
    };
    match m.entry {
        L2Entry::Compressed(d) => whole(Source::Compressed(d)),
        L2Entry::Zero { .. } => whole(Source::Zero),
        _ if !geo.l2.extended => match m.entry {
            L2Entry::Normal { host, .. } => whole(Source::Data(host.offset_by(in_c))),
            _ => whole(Source::Backing),
        },
        _ => subcluster_piece(geo, m, in_c, to_end),
    }
}

/// Extended L2: the run of subclusters sharing the state of the one holding `in_c`.
fn subcluster_piece(
    geo: &super::geometry::Geometry,
    m: &Mapping,
    in_c: u64,
    to_end: u64,
) -> Result<Run> {
    let sc = geo.subcluster_size();
    let first = to_u32(in_c / sc);
    let state = m.bitmap.state(first)?;
    let mut end = (u64::from(first) + 1) * sc;
    while end < in_c + to_end && m.bitmap.state(to_u32(end / sc))? == state {
        end += sc;
    }
    let len = (end - in_c).min(to_end);
    let source = match (state, m.entry) {
        (SubclusterState::Allocated, L2Entry::Normal { host, .. }) => {
            Source::Data(host.offset_by(in_c))
        }
        (SubclusterState::Allocated, _) => {
            return Err(Error::corrupt(
                "allocated subcluster without a host cluster",
            ));
        }
        (SubclusterState::Zero, _) => Source::Zero,
        (SubclusterState::Unallocated, _) => Source::Backing,
    };
    Ok(Run { source, len })
}
