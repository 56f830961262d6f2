//! The public bitmap API on [`Image`]: list, add, remove, clear, enable, disable, merge,
//! dirty extents. Changes reach disk at [`Image::close`] (as QEMU stores bitmaps on close);
//! a bitmap that already was on disk is marked in_use there before it changes.

use std::sync::Arc;

use super::load::{read_bits, read_directory};
use super::{DirtyBits, Tracked};
use crate::error::{Error, ErrorKind, Result};
use crate::format::bitmap::{
    self, BitmapEntry, FLAG_AUTO, FLAG_IN_USE, MAX_GRANULARITY_BITS, MIN_GRANULARITY_BITS,
    TYPE_DIRTY_TRACKING,
};
use crate::format::extensions::ImageHeader;
use crate::format::extensions::MAX_BITMAPS;
use crate::image::Image;
use crate::storage::Storage;

/// One persistent bitmap, as `qemu-img info` lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BitmapInfo {
    /// The bitmap's name.
    pub name: String,
    /// Bytes of guest disk per bit.
    pub granularity: u64,
    /// Flag `in_use`: not stored cleanly, may be inconsistent (never trusted).
    pub in_use: bool,
    /// Flag `auto`: enabled, records every write.
    pub auto: bool,
}

impl BitmapInfo {
    fn of(e: &BitmapEntry) -> BitmapInfo {
        BitmapInfo {
            name: e.name.clone(),
            granularity: e.granularity(),
            in_use: e.has(FLAG_IN_USE),
            auto: e.has(FLAG_AUTO),
        }
    }
}

fn not_found(name: &str) -> Error {
    Error::new(
        ErrorKind::NotFound,
        format!("Dirty bitmap '{name}' not found"),
    )
}

impl Image {
    /// The persistent bitmaps, in directory order. On a writable image the in_use flag is
    /// what QEMU would show while the image is open (set on the bitmaps we maintain).
    ///
    /// ```no_run
    /// # async fn demo(img: qcow2_engine::image::Image) -> qcow2_engine::Result<()> {
    /// for b in img.bitmaps().await? {
    ///     println!("{} every {} bytes, enabled: {}", b.name, b.granularity, b.auto);
    /// }
    /// # Ok(()) }
    /// ```
    pub async fn bitmaps(&self) -> Result<Vec<BitmapInfo>> {
        if self.inner.writable {
            let list = self
                .inner
                .bitmaps
                .list
                .read()
                .unwrap_or_else(|p| p.into_inner());
            return Ok(list
                .iter()
                .map(|t| {
                    let mut i = BitmapInfo::of(&t.entry);
                    i.in_use |= t.owned || t.bits.is_none();
                    i
                })
                .collect());
        }
        let file = self.inner.file.as_ref();
        let len = file
            .len()
            .await
            .map_err(|e| Error::io("sizing the image", e))?;
        let dir = read_directory(file, &self.header(), len).await?;
        Ok(dir.map_or_else(Vec::new, |(_, _, e)| e.iter().map(BitmapInfo::of).collect()))
    }

    /// Create an empty bitmap `name` with `granularity` bytes per bit (default: the cluster
    /// size clamped to 4 KiB..64 KiB, as QEMU), enabled unless `disabled`.
    pub async fn add_bitmap(
        &self,
        name: &str,
        granularity: Option<u64>,
        disabled: bool,
    ) -> Result<()> {
        self.check_bitmaps_writable()?;
        let g = granularity.unwrap_or_else(|| self.cluster_size().clamp(4096, 65536));
        let bits = granularity_bits(g)?;
        let entry = BitmapEntry {
            table_offset: 0,
            table_size: 0,
            flags: if disabled { 0 } else { FLAG_AUTO },
            kind: TYPE_DIRTY_TRACKING,
            granularity_bits: bits,
            extra_data: Vec::new(),
            name: name.to_string(),
        };
        if name.is_empty() || name.len() > bitmap::MAX_NAME_SIZE {
            return Err(Error::invalid_arg(format!(
                "bitmap name of {} bytes (1..=1023)",
                name.len()
            )));
        }
        bitmap::table_size_for(self.virtual_size(), bits, self.cluster_size())?;
        let set = &self.inner.bitmaps;
        let mut list = set.list.write().unwrap_or_else(|p| p.into_inner());
        if list.iter().any(|t| t.entry.name == name) {
            return Err(Error::new(
                ErrorKind::InvalidArgument,
                format!("Bitmap already exists: {name}"),
            ));
        }
        if list.len() >= MAX_BITMAPS as usize {
            return Err(Error::invalid_arg("an image holds at most 65535 bitmaps"));
        }
        list.push(Tracked {
            bits: Some(Arc::new(DirtyBits::new(self.virtual_size().div_ceil(g)))),
            entry,
            owned: true,
            old_clusters: Vec::new(),
        });
        set.refresh(&list);
        set.changed
            .store(true, std::sync::atomic::Ordering::Release);
        Ok(())
    }

    /// Delete bitmap `name` (its clusters are freed at close). Cancel-safe, as every call
    /// here that marks a bitmap in use on disk: a dropped call still finishes.
    pub async fn remove_bitmap(&self, name: &str) -> Result<()> {
        let name = name.to_string();
        self.detached(async move |img| img.remove_bitmap_now(&name).await)
            .await
    }

    async fn remove_bitmap_now(&self, name: &str) -> Result<()> {
        self.own_bitmap(name).await?;
        let set = &self.inner.bitmaps;
        let mut list = set.list.write().unwrap_or_else(|p| p.into_inner());
        let i = list
            .iter()
            .position(|t| t.entry.name == name)
            .ok_or_else(|| not_found(name))?;
        let t = list.remove(i);
        set.removed
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .extend(t.old_clusters);
        set.refresh(&list);
        Ok(())
    }

    /// Clear every bit of bitmap `name`.
    pub async fn clear_bitmap(&self, name: &str) -> Result<()> {
        self.change_bitmap(name, |t| {
            if let Some(b) = &t.bits {
                b.clear();
            }
        })
        .await
    }

    /// Enable (`true`: record writes, flag `auto`) or disable bitmap `name`.
    pub async fn enable_bitmap(&self, name: &str, enable: bool) -> Result<()> {
        self.change_bitmap(name, move |t| match enable {
            true => t.entry.flags |= FLAG_AUTO,
            false => t.entry.flags &= !FLAG_AUTO,
        })
        .await
    }

    /// OR the bits of bitmap `src_name` of `src` (this image or another, open read-only or
    /// not) into bitmap `name`. Granularities may differ: each set source bit sets every
    /// target bit its range touches.
    pub async fn merge_bitmap(&self, name: &str, src: &Image, src_name: &str) -> Result<()> {
        let extents = src.bitmap_extents(src_name).await?;
        self.change_bitmap(name, move |t| {
            let (Some(bits), g) = (&t.bits, t.entry.granularity_bits) else {
                return;
            };
            for (off, len) in &extents {
                bits.set_range(off >> g, (off + len).div_ceil(1u64 << g));
            }
        })
        .await
    }

    /// The dirty ranges of bitmap `name` as (guest offset, length) pairs, in order, each
    /// a whole number of granularity chunks (the last one ends at the virtual size).
    pub async fn bitmap_extents(&self, name: &str) -> Result<Vec<(u64, u64)>> {
        self.bitmap_extents_in(name, 0, self.virtual_size()).await
    }

    /// The dirty ranges of bitmap `name` that meet guest range `[offset, offset + len)`,
    /// clipped to it, as (guest offset, length) pairs in order. On a writable image this
    /// reads only the bits of the range, so it suits a per-request query (NBD block status);
    /// on a read-only one it reads the bitmap from disk at every call.
    pub async fn bitmap_extents_in(
        &self,
        name: &str,
        offset: u64,
        len: u64,
    ) -> Result<Vec<(u64, u64)>> {
        let (bits, g) = self.bitmap_bits(name).await?;
        let end = offset.saturating_add(len).min(self.virtual_size());
        if offset >= end {
            return Ok(Vec::new());
        }
        let clip = |bit: u64| (bit << g).clamp(offset, end);
        Ok(bits
            .extents_in(offset >> g, end.div_ceil(1u64 << g))
            .into_iter()
            .map(|(a, b)| (clip(a), clip(b) - clip(a)))
            .collect())
    }

    /// The bits of bitmap `name` (from memory when writable, else read from disk).
    async fn bitmap_bits(&self, name: &str) -> Result<(Arc<DirtyBits>, u8)> {
        if self.inner.writable {
            let list = self
                .inner
                .bitmaps
                .list
                .read()
                .unwrap_or_else(|p| p.into_inner());
            let t = list
                .iter()
                .find(|t| t.entry.name == name)
                .ok_or_else(|| not_found(name))?;
            let bits = t.bits.clone().ok_or_else(|| inconsistent(name))?;
            return Ok((bits, t.entry.granularity_bits));
        }
        let file = self.inner.file.as_ref();
        let len = file
            .len()
            .await
            .map_err(|e| Error::io("sizing the image", e))?;
        let dir = read_directory(file, &self.header(), len).await?;
        let e = dir
            .and_then(|(_, _, es)| es.into_iter().find(|e| e.name == name))
            .ok_or_else(|| not_found(name))?;
        if e.has(FLAG_IN_USE) {
            return Err(inconsistent(name));
        }
        let geo = (self.cluster_size(), self.virtual_size(), len);
        Ok((
            Arc::new(read_bits(file, &e, geo).await?.0),
            e.granularity_bits,
        ))
    }

    /// Mark bitmap `name` in_use on disk, then apply `change` to it.
    /// (Cancel-safe: the marking and the change finish even if the caller goes away.)
    async fn change_bitmap(
        &self,
        name: &str,
        change: impl FnOnce(&mut Tracked) + Send + 'static,
    ) -> Result<()> {
        let name = name.to_string();
        self.detached(async move |img| img.change_bitmap_now(&name, change).await)
            .await
    }

    async fn change_bitmap_now(&self, name: &str, change: impl FnOnce(&mut Tracked)) -> Result<()> {
        self.own_bitmap(name).await?;
        let set = &self.inner.bitmaps;
        let mut list = set.list.write().unwrap_or_else(|p| p.into_inner());
        let t = list
            .iter_mut()
            .find(|t| t.entry.name == name)
            .ok_or_else(|| not_found(name))?;
        change(t);
        set.refresh(&list);
        Ok(())
    }

    /// Check that bitmap `name` exists and is consistent, and own it (see `own_bitmaps`).
    async fn own_bitmap(&self, name: &str) -> Result<()> {
        self.check_bitmaps_writable()?;
        {
            let list = self
                .inner
                .bitmaps
                .list
                .read()
                .unwrap_or_else(|p| p.into_inner());
            let t = list
                .iter()
                .find(|t| t.entry.name == name)
                .ok_or_else(|| not_found(name))?;
            if t.bits.is_none() {
                return Err(inconsistent(name));
            }
        }
        self.own_bitmaps(&[name.to_string()]).await
    }

    fn check_bitmaps_writable(&self) -> Result<()> {
        self.write_state()?;
        if self
            .inner
            .header
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .header
            .version
            < 3
        {
            return Err(Error::unsupported(
                "persistent bitmaps need a version 3 (compat=1.1) image",
            ));
        }
        Ok(())
    }
}

/// The persistent bitmaps of the image in `file` whose cluster 0 is `ih`, as on disk (for
/// `info`, without opening the image).
pub async fn list_bitmaps(file: &dyn Storage, ih: &ImageHeader) -> Result<Vec<BitmapInfo>> {
    let len = file
        .len()
        .await
        .map_err(|e| Error::io("sizing the image", e))?;
    let dir = read_directory(file, ih, len).await?;
    Ok(dir.map_or_else(Vec::new, |(_, _, e)| e.iter().map(BitmapInfo::of).collect()))
}

fn inconsistent(name: &str) -> Error {
    Error::new(
        ErrorKind::Refused,
        format!(
            "Bitmap '{name}' is inconsistent and cannot be used (it is in use or was not stored cleanly)"
        ),
    )
}

/// log2 of a granularity QEMU accepts (a power of two, 512 B..=2 GiB).
fn granularity_bits(g: u64) -> Result<u8> {
    let bits = g.trailing_zeros();
    if !g.is_power_of_two()
        || !(u32::from(MIN_GRANULARITY_BITS)..=u32::from(MAX_GRANULARITY_BITS)).contains(&bits)
    {
        return Err(Error::invalid_arg(
            "Granularity must be power of 2 and at least 512",
        ));
    }
    Ok(u8::try_from(bits).unwrap_or(MAX_GRANULARITY_BITS))
}
