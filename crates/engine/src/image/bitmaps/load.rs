//! Reading bitmaps from disk, and marking them in_use at a read-write open.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use super::{DirtyBits, Tracked};
use crate::alloc::Kinds;
use crate::error::{Error, Result};
use crate::format::bitmap::{self, BitmapEntry, FLAG_AUTO, FLAG_IN_USE, TableEntry};
use crate::format::extensions::ImageHeader;
use crate::image::Image;
use crate::storage::Storage;

/// The most bitmap memory (all bitmaps' bits, as if every bit were set) a writable open
/// accepts: the sum QEMU would allocate, bounded so a crafted directory cannot ask for
/// 65535 bitmaps of 512 MiB each.
const MAX_LOADED_BYTES: u64 = 1 << 30;

/// The directory on disk: (offset, size, entries).
pub(crate) type Directory = (u64, u64, Vec<BitmapEntry>);

/// Read and validate the bitmap directory of an image; `None` when it has no bitmaps or the
/// autoclear bit says they are stale (QEMU then ignores the extension).
pub(crate) async fn read_directory(
    file: &dyn Storage,
    ih: &ImageHeader,
    file_len: u64,
) -> Result<Option<Directory>> {
    let h = &ih.header;
    let Some((nb, size, off)) = ih.bitmaps().filter(|_| h.bitmaps_consistent()) else {
        return Ok(None);
    };
    // validate() bounded `size` to 64 MiB and aligned `off`.
    if off.checked_add(size).is_none_or(|end| end > file_len) {
        return Err(Error::invalid(
            "the bitmap directory lies past the end of the file",
        ));
    }
    let mut buf = vec![0u8; usize::try_from(size).map_err(|_| Error::invalid("bitmap directory"))?];
    read(file, &mut buf, off, "reading the bitmap directory").await?;
    let entries = bitmap::parse_directory(&buf, nb).map_err(|e| e.at(off))?;
    for e in &entries {
        e.validate(h.cluster_size(), h.size)
            .map_err(|e| e.at(off))?;
    }
    Ok(Some((off, size, entries)))
}

/// The bits of the bitmap `e` and the host clusters (offset, count) of its table and data.
pub(crate) async fn read_bits(
    file: &dyn Storage,
    e: &BitmapEntry,
    (cluster_size, virtual_size, file_len): (u64, u64, u64),
) -> Result<(DirtyBits, Vec<(u64, u64)>)> {
    let bits = DirtyBits::new(virtual_size.div_ceil(e.granularity()));
    let table_bytes = u64::from(e.table_size) * 8;
    if e.table_offset.saturating_add(table_bytes) > file_len {
        return Err(Error::invalid(format!(
            "bitmap '{}': table past the end of the file",
            e.name
        )));
    }
    // validate() bounded the table to QEMU's 512 MiB of bits: at most 8 MiB of entries.
    let mut table = vec![0u8; usize::try_from(table_bytes).unwrap_or(0)];
    read(file, &mut table, e.table_offset, "reading a bitmap table").await?;
    let mut clusters = vec![(e.table_offset, table_bytes.div_ceil(cluster_size))];
    let mut data = vec![0u8; usize::try_from(cluster_size).unwrap_or(0)];
    for (i, raw) in table.chunks_exact(8).enumerate() {
        let raw = u64::from_be_bytes(raw.try_into().unwrap_or_default());
        let at = i as u64 * cluster_size; // byte offset into the bitmap data
        match TableEntry::from_u64(raw, cluster_size).map_err(|err| err.at(e.table_offset))? {
            TableEntry::Zeros => {}
            TableEntry::Ones => bits.set_range(at * 8, (at + cluster_size) * 8),
            TableEntry::Data(off) => {
                if off.saturating_add(cluster_size) > file_len {
                    return Err(
                        Error::invalid("bitmap data cluster past the end of the file").at(off),
                    );
                }
                read(file, &mut data, off, "reading bitmap data").await?;
                bits.or_bytes(at, &data);
                clusters.push((off, 1));
            }
        }
    }
    Ok((bits, clusters))
}

async fn read(file: &dyn Storage, buf: &mut [u8], off: u64, what: &'static str) -> Result<()> {
    file.read_at(buf, off)
        .await
        .map_err(|e| Error::io(what, e).at(off))
}

impl Image {
    /// At a read-write open: load every bitmap, then mark the enabled ones in_use on disk
    /// (see the module docs of `bitmaps`). A directory QEMU would refuse fails the open.
    pub(crate) async fn load_bitmaps(&self) -> Result<()> {
        let ih = self.header();
        let file = self.inner.file.as_ref();
        let file_len = file
            .len()
            .await
            .map_err(|e| Error::io("sizing the image", e))?;
        let Some((off, size, entries)) = read_directory(file, &ih, file_len).await? else {
            return Ok(());
        };
        let geo = (ih.header.cluster_size(), ih.header.size, file_len);
        let need: u64 = entries
            .iter()
            .map(|e| bitmap::data_bytes_for(geo.1, e.granularity_bits))
            .sum();
        if need > MAX_LOADED_BYTES {
            return Err(Error::unsupported(format!(
                "the bitmaps need {need} bytes of memory, more than {MAX_LOADED_BYTES}"
            )));
        }
        let mut list = Vec::with_capacity(entries.len());
        for e in &entries {
            list.push(load_one(file, e, geo).await?);
        }
        let set = &self.inner.bitmaps;
        *set.on_disk.lock().unwrap_or_else(|p| p.into_inner()) = Some((off, size, entries));
        let owned: Vec<String> = list
            .iter()
            .filter(|t| t.enabled())
            .map(|t| t.entry.name.clone())
            .collect();
        set.refresh(&list);
        *set.list.write().unwrap_or_else(|p| p.into_inner()) = list;
        self.own_bitmaps(&owned).await
    }

    /// Mark the named bitmaps in_use in the on-disk directory (in place) and fsync, so a
    /// crash from now on leaves them inconsistent; from then on they are stored at close.
    pub(super) async fn own_bitmaps(&self, names: &[String]) -> Result<()> {
        let set = &self.inner.bitmaps;
        let write = {
            let mut disk = set.on_disk.lock().unwrap_or_else(|p| p.into_inner());
            let mut list = set.list.write().unwrap_or_else(|p| p.into_inner());
            let mut changed = false;
            for t in list
                .iter_mut()
                .filter(|t| !t.owned && names.contains(&t.entry.name))
            {
                t.owned = true;
                if let Some((_, _, entries)) = disk.as_mut()
                    && let Some(d) = entries.iter_mut().find(|d| d.name == t.entry.name)
                {
                    changed |= !d.has(FLAG_IN_USE);
                    d.flags |= FLAG_IN_USE;
                }
            }
            match disk.as_ref() {
                Some((off, _, entries)) if changed => {
                    Some((*off, bitmap::serialize_directory(entries)))
                }
                _ => None,
            }
        };
        if !names.is_empty() {
            set.changed.store(true, Ordering::Release);
        }
        let Some((off, buf)) = write else {
            return Ok(());
        };
        self.check_metadata_write(off, buf.len() as u64, Kinds::BITMAP_DIRECTORY)
            .await?;
        let w = self.write_state()?;
        w.meta().write(&buf, off, "marking bitmaps in use").await?;
        self.sync_file().await
    }
}

/// Load one bitmap: its bits unless it was in_use (then it is carried as is).
async fn load_one(file: &dyn Storage, e: &BitmapEntry, geo: (u64, u64, u64)) -> Result<Tracked> {
    if e.has(FLAG_IN_USE) {
        return Ok(Tracked {
            entry: e.clone(),
            bits: None,
            owned: false,
            old_clusters: Vec::new(),
        });
    }
    let (bits, old_clusters) = read_bits(file, e, geo).await?;
    let mut entry = e.clone();
    entry.flags &= FLAG_AUTO | bitmap::FLAG_EXTRA_DATA_COMPATIBLE;
    Ok(Tracked {
        entry,
        bits: Some(Arc::new(bits)),
        owned: false,
        old_clusters,
    })
}
