//! How large a new qcow2 image would be: `qemu-img measure -O qcow2`'s two numbers.
//!
//! - **fully allocated**: every guest cluster mapped, plus the metadata that takes: the header
//!   cluster, L2 tables for every guest cluster, an L1 table rounded up to whole clusters of
//!   entries, and the refcount blocks and table covering all of it (themselves included).
//! - **required**: the same metadata, but only the data clusters the source really has
//!   (clusters that hold data somewhere in its backing chain; zero and unallocated ranges
//!   cost nothing). With no source it is the metadata alone. QEMU counts the full metadata
//!   here too, so `required` over-estimates slightly; we give its numbers, not better ones,
//!   because scripts compare them.
//!
//! A third number, the space persistent bitmaps copied from a qcow2 v3 source would take, is
//! given when both source and target can hold bitmaps ([`bitmaps_size`]).
//!
//! [`Measure`] takes the source's data ranges one at a time (in offset order), so measuring a
//! huge, fragmented source needs no list of all its extents.

use super::{Compat, CreateOptions, Preallocation};
use crate::error::{Error, Result};
use crate::format::extensions::{ImageHeader, MAX_BITMAP_DIRECTORY_SIZE};
use crate::format::header;
use crate::image::Image;
use crate::storage::Storage;

/// Bytes of an L1 entry.
const L1_ENTRY: u64 = 8;
/// Bytes of a refcount table entry.
const REFTABLE_ENTRY: u64 = 8;
/// Bytes of a bitmap table entry.
const BITMAP_TABLE_ENTRY: u64 = 8;
/// Fixed part of a bitmap directory entry (before the name, rounded to 8 with it).
const BITMAP_DIR_ENTRY_HEADER: u64 = 24;

/// The result of a measurement, in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Measurement {
    /// Size the new image needs for the source's data (or, without a source, when empty).
    pub required: u64,
    /// Size of the new image with every guest cluster allocated.
    pub fully_allocated: u64,
    /// Extra space for the source's persistent bitmaps; `None` when the source or the target
    /// cannot have them (raw source, no source, or a v2 image on either side).
    pub bitmaps: Option<u64>,
}

/// One persistent bitmap of a source image, as far as its size in a new image goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BitmapShape {
    /// Length of its name in bytes.
    pub name_len: u64,
    /// log2 of the bytes of guest data one bit covers.
    pub granularity_bits: u8,
}

/// A measurement in progress: feed the source's data ranges with [`Measure::add_data`], then
/// [`Measure::finish`].
///
/// ```
/// use qcow2_engine::image::create::{CreateOptions, Measure};
/// let opts = CreateOptions::default(); // 64 KiB clusters, 16-bit refcounts
/// let mut m = Measure::new(&opts, 1 << 30)?;
/// m.add_data(0, 4096); // one cluster of data
/// let r = m.finish(None);
/// assert_eq!(r.fully_allocated, 1_074_135_040); // qemu-img measure's numbers
/// assert_eq!(r.required, 393_216 + 65_536);
/// # Ok::<(), qcow2_engine::Error>(())
/// ```
#[derive(Debug, Clone)]
pub struct Measure {
    cluster_size: u64,
    /// Virtual size rounded up to whole clusters.
    virtual_size: u64,
    fully_allocated: u64,
    /// Data bytes counted so far (whole clusters).
    data: u64,
    /// End of the last cluster counted: ranges are counted from here on only.
    counted_to: u64,
    /// Every cluster counts, whatever the source holds (a backing file in the target, or
    /// full/falloc preallocation).
    all_clusters: bool,
}

impl Measure {
    /// Start measuring a new image with `opts` (cluster size, refcount width, extended L2,
    /// preallocation, backing file) for a source of `size` bytes (or `opts.size` when there
    /// is no source). Refuses sizes whose L1 table would exceed QEMU's 32 MiB limit, with
    /// qemu-img's message, and the option combinations `create` refuses.
    pub fn new(opts: &CreateOptions, size: u64) -> Result<Measure> {
        opts.validate(0)?;
        let cs = opts.cluster_size;
        let virtual_size = size
            .checked_next_multiple_of(cs)
            .ok_or_else(|| Error::invalid_arg("image size too large"))?;
        let l2_entry = if opts.extended_l2 { 16 } else { 8 };
        let l2_tables = (virtual_size / cs).div_ceil(cs / l2_entry);
        if l2_tables * L1_ENTRY > header::MAX_L1_BYTES {
            return Err(Error::invalid_arg(
                "The image size is too large (try using a larger cluster size)",
            ));
        }
        let fully_allocated = prealloc_size(virtual_size, cs, opts.refcount_bits, l2_entry)?;
        let all_clusters = opts.backing_file.is_some()
            || matches!(
                opts.preallocation,
                Preallocation::Full | Preallocation::Falloc
            );
        Ok(Measure {
            cluster_size: cs,
            virtual_size,
            fully_allocated,
            data: 0,
            counted_to: 0,
            all_clusters,
        })
    }

    /// Count `len` bytes of source data at `offset`: every target cluster it touches, once.
    /// Ranges must come in increasing offset order (overlaps with earlier ranges are fine).
    pub fn add_data(&mut self, offset: u64, len: u64) {
        if len == 0 {
            return;
        }
        let cs = self.cluster_size;
        let start = (offset / cs * cs).max(self.counted_to);
        let end = offset
            .saturating_add(len)
            .checked_next_multiple_of(cs)
            .unwrap_or(self.virtual_size)
            .min(self.virtual_size);
        if end > start {
            self.data += end - start;
            self.counted_to = end;
        }
    }

    /// The numbers; `bitmaps` is [`bitmaps_size`] of the source when both sides can hold
    /// bitmaps.
    pub fn finish(self, bitmaps: Option<u64>) -> Measurement {
        let data = if self.all_clusters {
            self.virtual_size
        } else {
            self.data
        };
        Measurement {
            required: self.fully_allocated - self.virtual_size + data,
            fully_allocated: self.fully_allocated,
            bitmaps,
        }
    }
}

/// Whether a target made with `opts` can hold persistent bitmaps (qcow2 v3).
pub fn target_has_bitmaps(opts: &CreateOptions) -> bool {
    opts.compat == Compat::V3
}

/// Space the persistent bitmaps of a source of `source_size` bytes take in a new image with
/// `cluster_size` clusters, as QEMU estimates it: each bitmap's data clusters all allocated,
/// its bitmap table, and the directory, each rounded up to whole clusters.
pub fn bitmaps_size(bitmaps: &[BitmapShape], source_size: u64, cluster_size: u64) -> u64 {
    let mut total = 0u64;
    let mut directory = 0u64;
    for b in bitmaps {
        let granularity = 1u64.checked_shl(u32::from(b.granularity_bits)).unwrap_or(0);
        let bits = source_size
            .checked_div(granularity)
            .map_or(0, |n| n + u64::from(source_size % granularity != 0));
        let clusters = bits.div_ceil(8).div_ceil(cluster_size);
        total = total
            .saturating_add(clusters * cluster_size)
            .saturating_add((clusters * BITMAP_TABLE_ENTRY).next_multiple_of(cluster_size));
        directory += (BITMAP_DIR_ENTRY_HEADER + b.name_len).next_multiple_of(8);
    }
    total.saturating_add(directory.next_multiple_of(cluster_size))
}

/// The persistent bitmaps of an open qcow2 image, for [`bitmaps_size`]. `None` for a v2 image (it cannot have bitmaps); empty
/// when the bitmaps extension is absent or marked inconsistent (QEMU then ignores it too).
/// The directory read is bounded by QEMU's 64 MiB limit; a malformed directory is an error.
pub async fn source_bitmaps(image: &Image) -> Result<Option<Vec<BitmapShape>>> {
    directory_shapes(&image.header(), image.inner.file.as_ref()).await
}

/// [`source_bitmaps`] of the image whose cluster 0 decodes as `ih`, in `storage`.
async fn directory_shapes(
    ih: &ImageHeader,
    storage: &dyn Storage,
) -> Result<Option<Vec<BitmapShape>>> {
    if ih.header.version < 3 {
        return Ok(None);
    }
    let Some((count, size, offset)) = ih.bitmaps().filter(|_| ih.header.bitmaps_consistent())
    else {
        return Ok(Some(Vec::new()));
    };
    if size > MAX_BITMAP_DIRECTORY_SIZE {
        return Err(Error::corrupt("bitmap directory larger than 64 MiB"));
    }
    let mut dir =
        vec![0u8; usize::try_from(size).map_err(|_| Error::corrupt("bitmap directory size"))?];
    storage
        .read_at(&mut dir, offset)
        .await
        .map_err(|e| Error::io("reading the bitmap directory", e))?;
    parse_directory(&dir, count)
        .map(Some)
        .ok_or_else(|| Error::corrupt("bitmap directory is corrupted"))
}

/// The name length and granularity of each of the `count` entries of a bitmap directory
/// (layout in `check/bitmaps.rs`); `None` when an entry runs past the end.
fn parse_directory(dir: &[u8], count: u32) -> Option<Vec<BitmapShape>> {
    let mut out = Vec::new();
    let mut pos = 0usize;
    for _ in 0..count {
        let entry = dir.get(pos..pos.checked_add(24)?)?;
        let granularity_bits = entry[17];
        let name_len = u16::from_be_bytes([entry[18], entry[19]]);
        let extra = u32::from_be_bytes([entry[20], entry[21], entry[22], entry[23]]);
        let len = (24 + u64::from(extra) + u64::from(name_len)).next_multiple_of(8);
        pos = pos.checked_add(usize::try_from(len).ok()?)?;
        if pos > dir.len() {
            return None;
        }
        out.push(BitmapShape {
            name_len: u64::from(name_len),
            granularity_bits,
        });
    }
    Some(out)
}

/// Bytes of a fully allocated image of `virtual_size` (whole clusters): the header cluster,
/// L2 entries for every cluster rounded up to whole tables, the L1 table rounded up to whole
/// clusters, the refcount structures covering all of that and the data, and the data.
fn prealloc_size(virtual_size: u64, cs: u64, refcount_bits: u32, l2_entry: u64) -> Result<u64> {
    let too_large = || Error::invalid_arg("image size too large");
    let l2_entries = (virtual_size / cs).next_multiple_of(cs / l2_entry);
    let l1_entries = (l2_entries * l2_entry / cs).next_multiple_of(cs / L1_ENTRY);
    let meta = cs + l2_entries * l2_entry + l1_entries * L1_ENTRY;
    let clusters = meta.checked_add(virtual_size).ok_or_else(too_large)? / cs;
    let per_block = cs * 8 / u64::from(refcount_bits);
    let (blocks, table) =
        super::layout::refcount_clusters(clusters, per_block, cs / REFTABLE_ENTRY);
    (blocks + table)
        .checked_mul(cs)
        .and_then(|r| r.checked_add(meta))
        .and_then(|m| m.checked_add(virtual_size))
        .ok_or_else(too_large)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts(extra: &str) -> CreateOptions {
        let mut o = CreateOptions::default();
        if !extra.is_empty() {
            o.apply_o(extra).unwrap();
        }
        o
    }

    // The expected numbers are what `qemu-img measure -O qcow2 [-o ...] --size N` (QEMU
    // 10.0.2) prints.
    #[test]
    fn sizes_match_qemu_img() {
        let m = Measure::new(&opts(""), 1 << 30).unwrap().finish(None);
        assert_eq!((m.required, m.fully_allocated), (393_216, 1_074_135_040));
    }

    #[test]
    fn data_is_counted_in_whole_clusters_once() {
        let mut m = Measure::new(&opts(""), 10 << 20).unwrap();
        m.add_data(0, 100 << 10); // clusters 0 and 1
        m.add_data(100 << 10, 1); // cluster 1 again
        m.add_data(5 << 20, 1); // one more
        let r = m.finish(None);
        assert_eq!(r.required - (r.fully_allocated - (10 << 20)), 3 * 65536);
    }

    #[test]
    fn l1_limit_refused_with_qemus_message() {
        let e = Measure::new(&opts("cluster_size=512"), 1 << 50).unwrap_err();
        assert!(
            e.to_string().contains("try using a larger cluster size"),
            "{e}"
        );
    }

    #[test]
    fn bitmap_sizes() {
        // One bitmap, 64 KiB granularity over 1 GiB: 16384 bits = 2 KiB, one cluster of
        // data, one of table, one of directory.
        let b = [BitmapShape {
            name_len: 2,
            granularity_bits: 16,
        }];
        assert_eq!(bitmaps_size(&b, 1 << 30, 65536), 3 * 65536);
        assert_eq!(bitmaps_size(&[], 1 << 30, 65536), 0);
    }
}
