//! Reading the snapshot table of an open image, finding an entry, and switching the header
//! to a new table (written to fresh clusters first: the old table is never modified).

use super::super::Image;
use crate::alloc::Kinds;
use crate::error::{Error, ErrorKind, Result};
use crate::format::header::HeaderPatch;
use crate::format::snapshot::{self, ENTRY_HEADER_LEN, Snapshot};

/// Where a snapshot table lives: byte offset and length (offset 0, length 0 for none).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct TablePlace {
    pub offset: u64,
    pub len: u64,
    /// Some ID or name is not UTF-8: its parsed form replaced bytes, so writing the table
    /// again would change it.
    pub lossy: bool,
}

impl TablePlace {
    /// Refuse to rewrite a table whose names would not survive it.
    pub fn check_rewritable(&self) -> Result<()> {
        if self.lossy {
            return Err(Error::unsupported(
                "a snapshot ID or name is not UTF-8; rewriting the snapshot table would change it",
            ));
        }
        Ok(())
    }
}

impl Image {
    /// The snapshot table as the header describes it now, entry by entry. Memory and work
    /// are bounded by QEMU's limits (65536 entries, 64 MiB) and the file size, whatever the
    /// entries claim. Entries without a disk size get the current virtual size, as in QEMU.
    pub(super) async fn read_snapshot_table(&self) -> Result<(Vec<Snapshot>, TablePlace)> {
        let (count, start) = {
            let h = &self.inner.header.lock().unwrap().header;
            (h.nb_snapshots, h.snapshots_offset)
        };
        if count > snapshot::MAX_SNAPSHOTS {
            return Err(Error::invalid(format!("{count} snapshots (at most 65536)")));
        }
        let file_len = self.file_len().await?;
        let (mut off, mut snaps, mut lossy) = (0u64, Vec::new(), false);
        for i in 0..count {
            off = off.next_multiple_of(8);
            let (snap, len, exact) = self.read_entry(start, off, file_len).await.map_err(|e| {
                Error::corrupt(format!("snapshot {i} at table byte {off}: {}", e.what()))
            })?;
            off += len;
            lossy |= !exact;
            snaps.push(snap);
        }
        snapshot::fill_disk_size(&mut snaps, self.virtual_size());
        let place = TablePlace {
            offset: if count == 0 { 0 } else { start },
            len: off,
            lossy,
        };
        Ok((snaps, place))
    }

    /// One entry at byte `off` of the table at `start`, its length without padding, and
    /// whether its ID and name were UTF-8 (parsed exactly).
    async fn read_entry(
        &self,
        start: u64,
        off: u64,
        file_len: u64,
    ) -> Result<(Snapshot, u64, bool)> {
        let at = start.checked_add(off).filter(|a| *a < file_len);
        let at = at.ok_or_else(|| Error::corrupt("entry beyond the end of the file"))?;
        let mut hdr = [0u8; ENTRY_HEADER_LEN];
        self.read_meta(&mut hdr, at, "reading the snapshot table")
            .await?;
        let len = snapshot::entry_len(&hdr)?;
        if off + len as u64 > snapshot::MAX_TABLE_SIZE as u64 {
            return Err(Error::corrupt("snapshot table larger than 64 MiB"));
        }
        let mut entry = vec![0u8; len];
        self.read_meta(&mut entry, at, "reading the snapshot table")
            .await?;
        let (snap, len) = snapshot::parse_entry(&entry)?;
        let exact = snap.id.len() + snap.name.len() == strings_len(&hdr)
            && !snap.id.contains('\u{fffd}')
            && !snap.name.contains('\u{fffd}');
        Ok((snap, len as u64, exact))
    }

    /// Read `buf.len()` bytes of metadata at `off` from the image file.
    pub(super) async fn read_meta(&self, buf: &mut [u8], off: u64, what: &str) -> Result<()> {
        self.inner
            .file
            .read_at(buf, off)
            .await
            .map_err(|e| Error::io(what.to_string(), e).at(off))
    }

    pub(super) async fn file_len(&self) -> Result<u64> {
        self.inner
            .file
            .len()
            .await
            .map_err(|e| Error::io("sizing the image", e))
    }

    /// Write `snaps` as a new table in fresh clusters, make their refcounts and the table
    /// durable, then switch the header to it in one write and fsync. The caller frees the
    /// old table afterwards. Nothing on disk refers to the new clusters before the switch,
    /// so a crash before it leaks them at worst.
    pub(super) async fn switch_snapshot_table(&self, snaps: &[Snapshot]) -> Result<TablePlace> {
        let w = self.write_state()?;
        snapshot::check_writable(snaps)?;
        let bytes = snapshot::write_table(snaps);
        let place = match bytes.is_empty() {
            true => TablePlace {
                offset: 0,
                len: 0,
                lossy: false,
            },
            false => {
                let cs = self.inner.geo.cluster_size;
                let offset = w
                    .refcounts()
                    .alloc((bytes.len() as u64).div_ceil(cs))
                    .await?
                    .0;
                let len = bytes.len() as u64;
                w.refcounts()
                    .map()
                    .insert(offset, len, Kinds::SNAPSHOT_TABLE);
                self.flush_refcounts().await?;
                self.check_metadata_write(offset, len, Kinds::SNAPSHOT_TABLE)
                    .await?;
                w.meta()
                    .write(&bytes, offset, "writing the snapshot table")
                    .await?;
                self.sync_file().await?;
                TablePlace {
                    offset,
                    len,
                    lossy: false,
                }
            }
        };
        let count =
            u32::try_from(snaps.len()).map_err(|_| Error::invalid_arg("too many snapshots"))?;
        let patch = HeaderPatch::snapshot_table(count, place.offset);
        w.meta()
            .write(
                patch.bytes(),
                patch.offset(),
                "switching the snapshot table",
            )
            .await?;
        self.sync_file().await?;
        let mut ih = self.inner.header.lock().unwrap();
        ih.header.nb_snapshots = count;
        ih.header.snapshots_offset = place.offset;
        Ok(place)
    }

    /// Write the dirty refcount blocks (and table) and fsync.
    pub(super) async fn flush_refcounts(&self) -> Result<()> {
        let w = self.write_state()?;
        w.refcounts().lock().await.flush().await
    }
}

/// Bytes of ID and name together, from an entry's fixed header.
fn strings_len(hdr: &[u8; ENTRY_HEADER_LEN]) -> usize {
    usize::from(u16::from_be_bytes([hdr[12], hdr[13]]))
        + usize::from(u16::from_be_bytes([hdr[14], hdr[15]]))
}

/// The index of the snapshot whose ID is `key`, else the first whose name is `key` (QEMU's
/// `find_snapshot_by_id_or_name`).
pub fn find_by_id_or_name(snaps: &[Snapshot], key: &str) -> Option<usize> {
    snaps
        .iter()
        .position(|s| s.id == key)
        .or_else(|| snaps.iter().position(|s| s.name == key))
}

/// The error for a snapshot that does not exist.
pub(super) fn not_found(key: &str) -> Error {
    Error::new(ErrorKind::NotFound, format!("snapshot '{key}' not found"))
}

/// The next free snapshot ID: one more than the largest numeric ID (QEMU's rule).
pub(super) fn next_id(snaps: &[Snapshot]) -> String {
    let max = snaps
        .iter()
        .filter_map(|s| s.id.parse::<u64>().ok())
        .max()
        .unwrap_or(0);
    (max + 1).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn snap(id: &str, name: &str) -> Snapshot {
        Snapshot {
            l1_table_offset: 0,
            l1_size: 0,
            id: id.into(),
            name: name.into(),
            date_sec: 0,
            date_nsec: 0,
            vm_clock_nsec: 0,
            vm_state_size: 0,
            disk_size: Some(0),
            icount: None,
            extra_unknown: vec![],
        }
    }

    #[test]
    fn ids_come_first_then_names() {
        let snaps = [snap("1", "2"), snap("2", "a"), snap("3", "a")];
        assert_eq!(find_by_id_or_name(&snaps, "2"), Some(1));
        assert_eq!(find_by_id_or_name(&snaps, "a"), Some(1));
        assert_eq!(find_by_id_or_name(&snaps, "x"), None);
    }

    #[test]
    fn next_id_is_one_past_the_largest_number() {
        assert_eq!(next_id(&[]), "1");
        assert_eq!(next_id(&[snap("2", ""), snap("x", ""), snap("7", "")]), "8");
    }
}
