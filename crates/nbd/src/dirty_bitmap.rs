//! `qemu:dirty-bitmap:NAME`: a persistent dirty bitmap of the exported image, reported by
//! `NBD_CMD_BLOCK_STATUS` as qemu-nbd's `-B NAME` does (flag 1 = dirty, 0 = clean).
//!
//! On a writable export the client's own writes set bits, so every request asks the device.
//! On a read-only one nothing can change the bits while it is served, so they are read once
//! when the export is made and each request looks its range up in that list.

use std::sync::Arc;

use qcow2_engine::error::Result;

use crate::device::BlockDevice;

/// The prefix of every dirty bitmap context's name.
pub const DIRTY_BITMAP_PREFIX: &str = "qemu:dirty-bitmap:";

/// A persistent dirty bitmap offered as a metadata context (see the module docs).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DirtyBitmap {
    /// The bitmap's name in the image.
    name: String,
    /// For a read-only export: every dirty range, in order, read once.
    frozen: Option<Arc<[(u64, u64)]>>,
}

impl DirtyBitmap {
    /// The bitmap `name` of `device`: live when the device is writable, else read now.
    /// Fails as [`BlockDevice::dirty_extents`] does when the device has no such bitmap or
    /// the bitmap is inconsistent, so a server refuses to start rather than fail requests.
    pub async fn new(device: &dyn BlockDevice, name: &str) -> Result<DirtyBitmap> {
        let all = device.dirty_extents(name, 0, device.size()).await?;
        let frozen = (!device.is_writable()).then(|| all.into());
        Ok(DirtyBitmap {
            name: name.to_string(),
            frozen,
        })
    }

    /// The bitmap's name in the image.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The context's full name, `qemu:dirty-bitmap:NAME`.
    pub fn context_name(&self) -> String {
        format!("{DIRTY_BITMAP_PREFIX}{}", self.name)
    }

    /// The dirty ranges that meet `[offset, offset + len)`, clipped to it.
    pub(crate) async fn extents(
        &self,
        device: &dyn BlockDevice,
        offset: u64,
        len: u64,
    ) -> Result<Vec<(u64, u64)>> {
        match &self.frozen {
            Some(all) => Ok(clip(all, offset, len)),
            None => device.dirty_extents(&self.name, offset, len).await,
        }
    }
}

/// The ranges of the sorted, disjoint `all` that meet `[offset, offset + len)`, clipped.
fn clip(all: &[(u64, u64)], offset: u64, len: u64) -> Vec<(u64, u64)> {
    let end = offset.saturating_add(len);
    let first = all.partition_point(|&(s, l)| s + l <= offset);
    all[first..]
        .iter()
        .take_while(|&&(s, _)| s < end)
        .map(|&(s, l)| {
            let (a, b) = (s.max(offset), (s + l).min(end));
            (a, b - a)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::clip;

    #[test]
    fn lookups_are_clipped_to_the_range() {
        let all = [(0, 10), (20, 10), (40, 5)];
        assert_eq!(clip(&all, 5, 20), vec![(5, 5), (20, 5)]);
        assert_eq!(clip(&all, 10, 10), vec![]);
        assert_eq!(clip(&all, 29, 100), vec![(29, 1), (40, 5)]);
        assert_eq!(clip(&all, 45, 100), vec![]);
        assert_eq!(clip(&[], 0, 100), vec![]);
    }
}
