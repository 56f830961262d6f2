//! Reading the internal snapshot table straight from an image file, and its qemu-img forms.

use anyhow::{Context, Result, bail};
use qcow2_engine::Storage;
use qcow2_engine::format::header::Header;
use qcow2_engine::format::snapshot::{self, ENTRY_HEADER_LEN, Snapshot};
use serde::Serialize;

/// Read the `nb_snapshots` entries at `snapshots_offset`, entry by entry. Like QEMU, a table
/// over 64 MiB is refused before it is read; so are names taking over 64 MiB once decoded.
/// Memory stays bounded whatever the entries claim.
pub async fn read_table(file: &dyn Storage, h: &Header) -> Result<Vec<Snapshot>> {
    if h.nb_snapshots > snapshot::MAX_SNAPSHOTS {
        bail!(
            "{} snapshots (at most {})",
            h.nb_snapshots,
            snapshot::MAX_SNAPSHOTS
        );
    }
    let file_len = file.len().await?;
    let mut off = h.snapshots_offset;
    let mut out = Vec::new();
    let mut decoded = 0usize;
    for i in 0..h.nb_snapshots {
        off = off.next_multiple_of(8);
        if off >= file_len {
            bail!("snapshot {i} lies beyond the end of the file");
        }
        let mut hdr = [0u8; ENTRY_HEADER_LEN];
        file.read_at(&mut hdr, off)
            .await
            .context("reading the snapshot table")?;
        let len = snapshot::entry_len(&hdr)?;
        if off - h.snapshots_offset + len as u64 > snapshot::MAX_TABLE_SIZE as u64 {
            bail!(
                "snapshot table too large (over {} MiB at snapshot {i})",
                snapshot::MAX_TABLE_SIZE >> 20
            );
        }
        let mut entry = vec![0u8; len];
        file.read_at(&mut entry, off)
            .await
            .context("reading the snapshot table")?;
        let (snap, len) = snapshot::parse_entry(&entry)?;
        // Bytes that are not UTF-8 decode to three-byte U+FFFD: bound the decoded names too.
        decoded += snap.id.len() + snap.name.len();
        if decoded > snapshot::MAX_TABLE_SIZE {
            bail!("snapshot names too large (over 64 MiB once decoded, at snapshot {i})");
        }
        out.push(snap);
        off += len as u64;
    }
    Ok(out)
}

/// One snapshot as `qemu-img info --output=json` prints it (borrowing the names: a table
/// may hold up to 64 MiB of them).
#[derive(Debug, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct SnapshotInfo<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    icount: Option<u64>,
    vm_clock_nsec: u64,
    name: &'a str,
    date_sec: u32,
    date_nsec: u32,
    vm_clock_sec: u64,
    id: &'a str,
    vm_state_size: u64,
}

impl<'a> From<&'a Snapshot> for SnapshotInfo<'a> {
    fn from(s: &'a Snapshot) -> Self {
        SnapshotInfo {
            icount: s.icount,
            vm_clock_nsec: s.vm_clock_nsec % 1_000_000_000,
            name: &s.name,
            date_sec: s.date_sec,
            date_nsec: s.date_nsec,
            vm_clock_sec: s.vm_clock_nsec / 1_000_000_000,
            id: &s.id,
            vm_state_size: s.vm_state_size,
        }
    }
}

/// Serialize snapshots in their `qemu-img info` JSON form, one at a time.
pub fn serialize_json<S: serde::Serializer>(snaps: &[Snapshot], ser: S) -> Result<S::Ok, S::Error> {
    ser.collect_seq(snaps.iter().map(SnapshotInfo::from))
}

/// Seconds since the Epoch as local `YYYY-MM-DD HH:MM:SS`.
fn local_time(secs: u32) -> String {
    let t = libc::time_t::from(secs);
    // SAFETY: an all-zero `tm` is a valid value of this plain C struct.
    let mut tm: libc::tm = unsafe { std::mem::zeroed() };
    // SAFETY: both pointers are valid for the call; localtime_r is thread-safe.
    if unsafe { libc::localtime_r(&t, &mut tm) }.is_null() {
        return secs.to_string();
    }
    format!(
        "{:04}-{:02}-{:02} {:02}:{:02}:{:02}",
        tm.tm_year + 1900,
        tm.tm_mon + 1,
        tm.tm_mday,
        tm.tm_hour,
        tm.tm_min,
        tm.tm_sec
    )
}

/// Guest clock as `HHHH:MM:SS.mmm`.
fn vm_clock(nsec: u64) -> String {
    let ms = nsec / 1_000_000;
    let (h, m, s) = (ms / 3_600_000, ms / 60_000 % 60, ms / 1000 % 60);
    format!("{h:04}:{m:02}:{s:02}.{:03}", ms % 1000)
}

/// The snapshot list in qemu-img's human layout.
pub(crate) fn print_human(snaps: &[Snapshot]) {
    outln!("Snapshot list:");
    outln!(
        "{:<7} {:<16} {:>8} {:>19} {:>15} {:>10}",
        "ID",
        "TAG",
        "VM_SIZE",
        "DATE",
        "VM_CLOCK",
        "ICOUNT"
    );
    for s in snaps {
        let icount = s.icount.map(|i| i.to_string()).unwrap_or_default();
        outln!(
            "{:<7} {:<16} {:>8} {:>19} {:>15} {:>10}",
            s.id,
            s.name,
            crate::output::size_to_str(s.vm_state_size),
            local_time(s.date_sec),
            vm_clock(s.vm_clock_nsec),
            icount
        );
    }
}
