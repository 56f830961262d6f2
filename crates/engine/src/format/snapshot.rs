//! The internal snapshot table (qcow2.txt, "Snapshots").
//!
//! A contiguous run of `nb_snapshots` variable-length entries starting at `snapshots_offset`;
//! each entry starts 8-byte aligned (the last one needs no trailing padding). One entry:
//!
//! ```text
//!  offset   size  field              meaning
//!   0        8    l1_table_offset    the snapshot's L1 table, cluster aligned
//!   8        4    l1_size            entries in that L1 table
//!  12        2    id_str_size        length of the unique ID string
//!  14        2    name_size          length of the name
//!  16        4    date_sec           creation time, seconds since the Epoch
//!  20        4    date_nsec          sub-second part of the creation time
//!  24        8    vm_clock_nsec      guest run time when taken
//!  32        4    vm_state_size      VM state size (superseded by the 64-bit extra field)
//!  36        4    extra_data_size    bytes of extra data that follow (QEMU accepts ≤ 1024)
//!  40        n    extra data:        (offsets relative to the entry)
//!                   40  8  vm_state_size_large   64-bit VM state size
//!                   48  8  disk_size             virtual disk size of the snapshot
//!                   56  8  icount                record/replay instruction count, -1 = none
//!                   64  …  unknown               preserved as-is
//!  40+n      id_str_size   unique ID (not NUL terminated)
//!  …         name_size     name (not NUL terminated)
//!  …         0-7           padding to a multiple of 8 before the next entry
//! ```
//!
//! Version 3 images must carry at least 16 bytes of extra data (up to `disk_size`);
//! `qemu-img check` reports shorter entries as corrupt.

use crate::error::{Error, Result};
use crate::units::{HostOffset, u32_to_usize};

/// QEMU's limit on the number of snapshots.
pub const MAX_SNAPSHOTS: u32 = 65536;
/// QEMU's limit on the extra data of one entry.
pub const MAX_EXTRA_DATA: usize = 1024;
/// QEMU's limit on the whole table (1 KiB per snapshot on average).
pub const MAX_TABLE_SIZE: usize = 1024 * MAX_SNAPSHOTS as usize;
/// QEMU's limit on the size of an L1 table (also for snapshots).
pub const MAX_L1_BYTES: u64 = 32 << 20;
/// Size of the fixed part of an entry.
pub const ENTRY_HEADER_LEN: usize = 40;
/// Extra data this module understands: vm_state_size_large, disk_size, icount.
pub const KNOWN_EXTRA_LEN: usize = 24;

// Field offsets of the fixed header, each derived from the previous one.
const OFF_L1_OFFSET: usize = 0;
const OFF_L1_SIZE: usize = OFF_L1_OFFSET + 8;
const OFF_ID_LEN: usize = OFF_L1_SIZE + 4;
const OFF_NAME_LEN: usize = OFF_ID_LEN + 2;
const OFF_DATE_SEC: usize = OFF_NAME_LEN + 2;
const OFF_DATE_NSEC: usize = OFF_DATE_SEC + 4;
const OFF_VM_CLOCK: usize = OFF_DATE_NSEC + 4;
const OFF_VM_STATE32: usize = OFF_VM_CLOCK + 8;
const OFF_EXTRA_LEN: usize = OFF_VM_STATE32 + 4;
const _: () = assert!(OFF_EXTRA_LEN + 4 == ENTRY_HEADER_LEN);

/// One snapshot table entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Snapshot {
    /// Host offset of the snapshot's L1 table.
    pub l1_table_offset: u64,
    /// Entries in the snapshot's L1 table.
    pub l1_size: u32,
    /// Unique ID string (QEMU uses decimal numbers). Non-UTF-8 bytes are replaced on parse.
    pub id: String,
    /// Name (tag). Non-UTF-8 bytes are replaced on parse.
    pub name: String,
    /// Creation time, seconds since the Epoch.
    pub date_sec: u32,
    /// Creation time, nanoseconds part.
    pub date_nsec: u32,
    /// Guest run time in nanoseconds when the snapshot was taken.
    pub vm_clock_nsec: u64,
    /// VM state size: the 64-bit extra field when present, else the 32-bit one.
    pub vm_state_size: u64,
    /// Virtual disk size of the snapshot; `None` when the entry has no such field (QEMU then
    /// assumes the image's current virtual size — fill it in before writing a v3 table).
    pub disk_size: Option<u64>,
    /// Record/replay instruction count; `None` when absent or -1.
    pub icount: Option<u64>,
    /// Extra data beyond the 24 bytes understood here, preserved verbatim.
    pub extra_unknown: Vec<u8>,
}

impl Snapshot {
    /// Check the snapshot's L1 table reference the way QEMU does before using it: the offset
    /// must be cluster aligned and the table at most 32 MiB. Corrupt otherwise.
    pub fn validate(&self, cluster_size: u64) -> Result<()> {
        if self.l1_table_offset & cluster_size.wrapping_sub(1) != 0 {
            return Err(Error::corrupt(format!(
                "snapshot {:?}: L1 table not cluster aligned",
                self.id
            ))
            .at_host(HostOffset(self.l1_table_offset)));
        }
        if u64::from(self.l1_size) * 8 > MAX_L1_BYTES {
            return Err(Error::corrupt(format!(
                "snapshot {:?}: L1 table too large",
                self.id
            )));
        }
        Ok(())
    }
}

/// Parse `count` entries from `buf`, which starts at `snapshots_offset`. Errors:
/// InvalidImage for `count` > 65536; Corrupt for an entry running past `buf`, extra data over
/// 1024 bytes, or a table over 64 MiB. Memory use is bounded by `buf.len()`.
pub fn parse_table(buf: &[u8], count: u32) -> Result<Vec<Snapshot>> {
    if count > MAX_SNAPSHOTS {
        return Err(Error::invalid(format!(
            "{count} snapshots (at most {MAX_SNAPSHOTS})"
        )));
    }
    let mut snaps = Vec::with_capacity(u32_to_usize(count).min(buf.len() / ENTRY_HEADER_LEN));
    let mut off = 0usize;
    for i in 0..count {
        off = off.next_multiple_of(8);
        let entry = buf.get(off..).unwrap_or(&[]);
        let (snap, len) = parse_entry(entry).map_err(|e| {
            Error::corrupt(format!("snapshot {i} at table byte {off}: {}", e.what()))
        })?;
        off += len;
        if off > MAX_TABLE_SIZE {
            return Err(Error::corrupt("snapshot table larger than 64 MiB"));
        }
        snaps.push(snap);
    }
    Ok(snaps)
}

/// The length of the entry whose fixed 40-byte header starts `hdr`, without padding: lets a
/// caller read the table entry by entry. Corrupt when `hdr` is short or the extra data is
/// over 1024 bytes.
pub fn entry_len(hdr: &[u8]) -> Result<usize> {
    if hdr.len() < ENTRY_HEADER_LEN {
        return Err(Error::corrupt("truncated snapshot table entry header"));
    }
    let extra = u32_to_usize(be_u32(hdr, OFF_EXTRA_LEN));
    if extra > MAX_EXTRA_DATA {
        return Err(Error::corrupt(format!(
            "snapshot extra data of {extra} bytes (at most 1024)"
        )));
    }
    let id = usize::from(be_u16(hdr, OFF_ID_LEN));
    let name = usize::from(be_u16(hdr, OFF_NAME_LEN));
    Ok(ENTRY_HEADER_LEN + extra + id + name)
}

/// Parse one entry at the start of `buf`; returns it and its length without padding.
pub fn parse_entry(buf: &[u8]) -> Result<(Snapshot, usize)> {
    let len = entry_len(buf)?;
    let entry = buf
        .get(..len)
        .ok_or_else(|| Error::corrupt("truncated snapshot table entry"))?;
    let extra_end = ENTRY_HEADER_LEN + u32_to_usize(be_u32(entry, OFF_EXTRA_LEN));
    let id_end = extra_end + usize::from(be_u16(entry, OFF_ID_LEN));
    let extra = &entry[ENTRY_HEADER_LEN..extra_end];
    let field = |i: usize| extra.get(i * 8..i * 8 + 8).map(|b| be_u64(b, 0));
    let snap = Snapshot {
        l1_table_offset: be_u64(entry, OFF_L1_OFFSET),
        l1_size: be_u32(entry, OFF_L1_SIZE),
        id: String::from_utf8_lossy(&entry[extra_end..id_end]).into_owned(),
        name: String::from_utf8_lossy(&entry[id_end..]).into_owned(),
        date_sec: be_u32(entry, OFF_DATE_SEC),
        date_nsec: be_u32(entry, OFF_DATE_NSEC),
        vm_clock_nsec: be_u64(entry, OFF_VM_CLOCK),
        vm_state_size: field(0).unwrap_or(u64::from(be_u32(entry, OFF_VM_STATE32))),
        disk_size: field(1),
        icount: field(2).filter(|&v| v != u64::MAX),
        extra_unknown: extra.get(KNOWN_EXTRA_LEN..).unwrap_or(&[]).to_vec(),
    };
    Ok((snap, len))
}

/// Extra data bytes [`write_table`] writes for `s`: all 24 known bytes plus the unknown ones
/// when `disk_size` is known; otherwise only vm_state_size_large (8 bytes), so that QEMU keeps
/// substituting the current disk size instead of reading a made-up one.
fn extra_len(s: &Snapshot) -> usize {
    match s.disk_size {
        Some(_) => KNOWN_EXTRA_LEN + s.extra_unknown.len(),
        None => 8,
    }
}

/// Bytes of a string field as written: at most 65535 (the length field is 16 bits).
fn str_bytes(s: &str) -> &[u8] {
    let b = s.as_bytes();
    &b[..b.len().min(usize::from(u16::MAX))]
}

/// Length of `s`'s entry as written, without padding.
fn written_len(s: &Snapshot) -> usize {
    ENTRY_HEADER_LEN + extra_len(s) + str_bytes(&s.id).len() + str_bytes(&s.name).len()
}

/// Size in bytes of the table [`write_table`] produces: entries 8-byte aligned, no padding
/// after the last one (as QEMU computes it).
pub fn table_size(snaps: &[Snapshot]) -> usize {
    snaps
        .iter()
        .fold(0, |off, s| off.next_multiple_of(8) + written_len(s))
}

/// Check that `snaps` can be written faithfully: at most 65536 entries, ID and name at most
/// 65535 bytes, extra data at most 1024 bytes, table at most 64 MiB. InvalidArgument otherwise.
pub fn check_writable(snaps: &[Snapshot]) -> Result<()> {
    if snaps.len() > MAX_SNAPSHOTS as usize {
        return Err(Error::invalid_arg("too many snapshots"));
    }
    for s in snaps {
        if s.id.len() > usize::from(u16::MAX) || s.name.len() > usize::from(u16::MAX) {
            return Err(Error::invalid_arg(format!(
                "snapshot ID or name too long: {:?}",
                s.id
            )));
        }
        if extra_len(s) > MAX_EXTRA_DATA {
            return Err(Error::invalid_arg("snapshot extra data over 1024 bytes"));
        }
    }
    if table_size(snaps) > MAX_TABLE_SIZE {
        return Err(Error::invalid_arg("snapshot table larger than 64 MiB"));
    }
    Ok(())
}

/// Fill in `disk_size` where it is missing, as QEMU does when it reads such an entry.
pub fn fill_disk_size(snaps: &mut [Snapshot], virtual_size: u64) {
    for s in snaps.iter_mut().filter(|s| s.disk_size.is_none()) {
        s.disk_size = Some(virtual_size);
    }
}

/// Serialize the table as QEMU does: 24 bytes of known extra data (icount -1 when `None`)
/// plus `extra_unknown`, the 32-bit VM state size truncated, zero padding between entries.
/// Entries with `disk_size == None` get only 8 bytes of extra data (see [`fill_disk_size`]).
/// Over-long IDs and names are cut at 65535 bytes; use [`check_writable`] first.
pub fn write_table(snaps: &[Snapshot]) -> Vec<u8> {
    let mut out = Vec::with_capacity(table_size(snaps));
    for s in snaps {
        out.resize(out.len().next_multiple_of(8), 0);
        write_entry(s, &mut out);
    }
    out
}

/// Append one entry (no padding) to `out`.
fn write_entry(s: &Snapshot, out: &mut Vec<u8>) {
    let (id, name) = (str_bytes(&s.id), str_bytes(&s.name));
    out.extend_from_slice(&s.l1_table_offset.to_be_bytes());
    out.extend_from_slice(&s.l1_size.to_be_bytes());
    // `str_bytes` caps both at u16::MAX.
    let len16 = |b: &[u8]| u16::try_from(b.len()).unwrap_or(u16::MAX);
    out.extend_from_slice(&len16(id).to_be_bytes());
    out.extend_from_slice(&len16(name).to_be_bytes());
    out.extend_from_slice(&s.date_sec.to_be_bytes());
    out.extend_from_slice(&s.date_nsec.to_be_bytes());
    out.extend_from_slice(&s.vm_clock_nsec.to_be_bytes());
    // The legacy 32-bit VM state size holds the low bits, as QEMU writes it; the full value
    // follows in the extra data.
    #[allow(clippy::cast_possible_truncation)]
    let vm_state_low = s.vm_state_size as u32;
    out.extend_from_slice(&vm_state_low.to_be_bytes());
    let extra = u32::try_from(extra_len(s)).unwrap_or(u32::MAX);
    out.extend_from_slice(&extra.to_be_bytes());
    out.extend_from_slice(&s.vm_state_size.to_be_bytes());
    if let Some(disk_size) = s.disk_size {
        out.extend_from_slice(&disk_size.to_be_bytes());
        out.extend_from_slice(&s.icount.unwrap_or(u64::MAX).to_be_bytes());
        out.extend_from_slice(&s.extra_unknown);
    }
    out.extend_from_slice(id);
    out.extend_from_slice(name);
}

/// Big-endian integers at `off` of a slice the caller has bounds-checked.
fn be_u64(b: &[u8], off: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[off..off + 8]);
    u64::from_be_bytes(a)
}

fn be_u32(b: &[u8], off: usize) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[off..off + 4]);
    u32::from_be_bytes(a)
}

fn be_u16(b: &[u8], off: usize) -> u16 {
    u16::from_be_bytes([b[off], b[off + 1]])
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::ErrorKind;

    /// The first entry of a table written by `qemu-img snapshot -c snap1` (QEMU 10.0).
    const QEMU_ENTRY: [u8; 70] = [
        0x00, 0x00, 0x00, 0x00, 0x00, 0x04, 0x00, 0x00, // l1_table_offset 0x40000
        0x00, 0x00, 0x00, 0x01, //                         l1_size 1
        0x00, 0x01, //                                     id_str_size 1
        0x00, 0x05, //                                     name_size 5
        0x6b, 0x05, 0x66, 0x57, //                         date_sec
        0x25, 0x61, 0x2e, 0xf0, //                         date_nsec
        0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, // vm_clock_nsec 0
        0x00, 0x00, 0x00, 0x00, //                         vm_state_size (32-bit) 0
        0x00, 0x00, 0x00, 0x18, //                         extra_data_size 24
        0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, // vm_state_size_large 0
        0x00, 0x00, 0x00, 0x00, 0x00, 0xa0, 0x00, 0x00, // disk_size 10 MiB
        0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, // icount 0
        b'1', //                                           id
        b's', b'n', b'a', b'p', b'1', //                   name
    ];

    fn qemu_snapshot() -> Snapshot {
        Snapshot {
            l1_table_offset: 0x40000,
            l1_size: 1,
            id: "1".into(),
            name: "snap1".into(),
            date_sec: 0x6b05_6657,
            date_nsec: 0x2561_2ef0,
            vm_clock_nsec: 0,
            vm_state_size: 0,
            disk_size: Some(10 << 20),
            icount: Some(0),
            extra_unknown: vec![],
        }
    }

    #[test]
    fn parse_literal_qemu_entry() {
        let snaps = parse_table(&QEMU_ENTRY, 1).unwrap();
        assert_eq!(snaps, [qemu_snapshot()]);
        assert_eq!(entry_len(&QEMU_ENTRY).unwrap(), 70);
    }

    #[test]
    fn parse_write_identity_with_padding() {
        // Two entries: 70 bytes, 2 bytes of padding, 70 bytes.
        let mut buf = QEMU_ENTRY.to_vec();
        buf.extend_from_slice(&[0, 0]);
        buf.extend_from_slice(&QEMU_ENTRY);
        let snaps = parse_table(&buf, 2).unwrap();
        assert_eq!(snaps.len(), 2);
        assert_eq!(table_size(&snaps), buf.len());
        assert_eq!(write_table(&snaps), buf);
        check_writable(&snaps).unwrap();
    }

    #[test]
    fn empty_table() {
        assert!(parse_table(&[], 0).unwrap().is_empty());
        assert_eq!(table_size(&[]), 0);
        assert!(write_table(&[]).is_empty());
    }

    #[test]
    fn unknown_extra_data_is_preserved() {
        let mut s = qemu_snapshot();
        s.extra_unknown = vec![1, 2, 3, 4, 5];
        s.icount = None;
        let buf = write_table(&[s.clone()]);
        assert_eq!(&buf[36..40], &[0, 0, 0, 29]); // extra_data_size 24 + 5
        assert_eq!(&buf[56..64], &[0xff; 8]); // icount -1
        assert_eq!(&buf[64..69], &[1, 2, 3, 4, 5]);
        assert_eq!(parse_table(&buf, 1).unwrap(), [s]);
    }

    #[test]
    fn large_vm_state_overrides_32_bit_field() {
        let mut s = qemu_snapshot();
        s.vm_state_size = 0x1_2345_6789;
        let buf = write_table(&[s.clone()]);
        assert_eq!(&buf[32..36], &[0x23, 0x45, 0x67, 0x89]); // truncated, as QEMU does
        assert_eq!(
            parse_table(&buf, 1).unwrap()[0].vm_state_size,
            0x1_2345_6789
        );
    }

    #[test]
    fn v2_entry_without_extra_data() {
        let mut buf = QEMU_ENTRY[..40].to_vec();
        buf[32..36].copy_from_slice(&[0, 0, 0x10, 0]); // vm_state_size 4096
        buf[36..40].copy_from_slice(&[0, 0, 0, 0]); //    no extra data
        buf.extend_from_slice(b"1snap1");
        let s = &parse_table(&buf, 1).unwrap()[0];
        assert_eq!(s.vm_state_size, 4096);
        assert_eq!(s.disk_size, None);
        assert_eq!(s.icount, None);
        assert_eq!(s.name, "snap1");
    }

    #[test]
    fn entry_with_16_bytes_of_extra_data() {
        let mut buf = QEMU_ENTRY[..56].to_vec();
        buf[39] = 16; // extra_data_size 16: no icount
        buf.extend_from_slice(b"1snap1");
        let s = &parse_table(&buf, 1).unwrap()[0];
        assert_eq!(s.disk_size, Some(10 << 20));
        assert_eq!(s.icount, None);
    }

    #[test]
    fn missing_disk_size_is_written_without_it() {
        let mut s = qemu_snapshot();
        s.disk_size = None;
        s.icount = None;
        let buf = write_table(&[s.clone()]);
        assert_eq!(&buf[36..40], &[0, 0, 0, 8]);
        assert_eq!(buf.len(), 40 + 8 + 6);
        assert_eq!(parse_table(&buf, 1).unwrap(), [s.clone()]);
        let mut snaps = [s];
        fill_disk_size(&mut snaps, 4096);
        assert_eq!(snaps[0].disk_size, Some(4096));
    }

    #[test]
    fn validate_l1_reference() {
        let mut s = qemu_snapshot();
        s.validate(65536).unwrap();
        s.l1_table_offset = 0x40200;
        assert_eq!(s.validate(65536).unwrap_err().kind(), ErrorKind::Corrupt);
        s.l1_table_offset = 0x40000;
        s.l1_size = (4 << 20) + 1;
        assert_eq!(s.validate(65536).unwrap_err().kind(), ErrorKind::Corrupt);
    }

    #[test]
    fn too_many_snapshots_is_invalid() {
        let err = parse_table(&QEMU_ENTRY, 65537).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::InvalidImage);
    }

    #[test]
    fn truncated_header_is_corrupt() {
        let err = parse_table(&QEMU_ENTRY[..39], 1).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Corrupt);
    }

    #[test]
    fn truncated_name_is_corrupt() {
        let err = parse_table(&QEMU_ENTRY[..69], 1).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Corrupt);
    }

    #[test]
    fn missing_second_entry_is_corrupt() {
        let err = parse_table(&QEMU_ENTRY, 2).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Corrupt);
        assert!(err.what().contains("snapshot 1"), "{}", err.what());
    }

    #[test]
    fn too_much_extra_data_is_corrupt() {
        let mut buf = vec![0u8; 40 + 1025];
        buf[36..40].copy_from_slice(&1025u32.to_be_bytes());
        let err = parse_table(&buf, 1).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Corrupt);
        // Huge length fields never allocate.
        buf[36..40].copy_from_slice(&u32::MAX.to_be_bytes());
        assert!(parse_table(&buf, 1).is_err());
    }

    #[test]
    fn huge_count_with_small_buffer_is_corrupt_not_oom() {
        assert_eq!(
            parse_table(&[], 65536).unwrap_err().kind(),
            ErrorKind::Corrupt
        );
    }

    #[test]
    fn non_utf8_name_is_replaced() {
        let mut buf = QEMU_ENTRY.to_vec();
        buf[69] = 0xff;
        assert_eq!(parse_table(&buf, 1).unwrap()[0].name, "snap\u{fffd}");
    }

    #[test]
    fn over_long_name_is_not_writable() {
        let mut s = qemu_snapshot();
        s.name = "x".repeat(70000);
        assert_eq!(
            check_writable(&[s.clone()]).unwrap_err().kind(),
            ErrorKind::InvalidArgument
        );
        let buf = write_table(&[s]);
        assert_eq!(&buf[14..16], &[0xff, 0xff]);
        assert_eq!(parse_table(&buf, 1).unwrap()[0].name.len(), 65535);
    }
}
