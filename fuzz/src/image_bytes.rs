//! Target `image_bytes`: arbitrary bytes as an image file, opened read-only. What `qcow2 info`
//! reads (header, extensions, snapshot table), then open, read every allocated byte (up to a
//! cap), map, and check. Any error is fine; a panic, hang or huge allocation is a finding.

use std::sync::Arc;

use qcow2_engine::Storage;
use qcow2_engine::check::{CheckOptions, check};
use qcow2_engine::format::extensions::ImageHeader;
use qcow2_engine::format::header::Header;
use qcow2_engine::format::snapshot::{self, ENTRY_HEADER_LEN, Snapshot};
use qcow2_engine::image::{Image, OpenOptions};

use super::block_on;
use super::capped::CappedStorage;

/// At most this many guest bytes are read per image.
const READ_BUDGET: u64 = 8 << 20;
/// Reads go in pieces of this size.
const READ_CHUNK: u64 = 64 << 10;
/// `map` looks at no more of the virtual disk than this.
const MAP_LIMIT: u64 = 1 << 40;

/// Run the target on one input.
pub fn run(data: &[u8]) {
    block_on(exercise(data.to_vec()));
}

async fn exercise(bytes: Vec<u8>) {
    let storage = Arc::new(CappedStorage::new(bytes));
    let _ = info(storage.as_ref()).await;
    let ro = OpenOptions::new()
        .follow_backing(false)
        .flush_interval(None);
    if let Ok(img) = Image::open_storage(storage.clone(), &ro).await {
        read_allocated(&img).await;
        let _ = img.close().await;
    }
    let _ = check(storage, &check_options()).await;
}

/// Check options for fuzzing: a refcount array of at most 64 MiB.
pub fn check_options() -> CheckOptions {
    CheckOptions {
        max_memory: 64 << 20,
        ..CheckOptions::default()
    }
}

/// What `qcow2 info` parses before it prints anything: the header with its extensions
/// (validated against the file length) and the snapshot table, entry by entry.
async fn info(file: &dyn Storage) -> Option<Vec<Snapshot>> {
    let file_len = file.len().await.ok()?;
    let mut first = vec![0u8; 4096];
    file.read_at(&mut first, 0).await.ok()?;
    let h = Header::from_bytes(&first).ok()?;
    if !(9..=21).contains(&h.cluster_bits) {
        return None;
    }
    let mut cluster0 = vec![0u8; 1 << h.cluster_bits];
    file.read_at(&mut cluster0, 0).await.ok()?;
    let ih = ImageHeader::parse(&cluster0).ok()?;
    let _ = (ih.backing_format(), ih.data_file(), ih.bitmaps());
    let _ = ih.validate(file_len);
    snapshots(file, &h, file_len).await
}

/// The snapshot table as `qcow2 info` reads it.
async fn snapshots(file: &dyn Storage, h: &Header, file_len: u64) -> Option<Vec<Snapshot>> {
    if h.nb_snapshots > snapshot::MAX_SNAPSHOTS {
        return None;
    }
    let mut off = h.snapshots_offset;
    let mut out = Vec::new();
    for _ in 0..h.nb_snapshots {
        off = off.checked_next_multiple_of(8)?;
        if off >= file_len {
            return None;
        }
        let mut hdr = [0u8; ENTRY_HEADER_LEN];
        file.read_at(&mut hdr, off).await.ok()?;
        let mut entry = vec![0u8; snapshot::entry_len(&hdr).ok()?];
        file.read_at(&mut entry, off).await.ok()?;
        let (snap, len) = snapshot::parse_entry(&entry).ok()?;
        let _ = snap.validate(1 << h.cluster_bits);
        out.push(snap);
        off = off.checked_add(len as u64)?;
    }
    snapshot::fill_disk_size(&mut out, h.size);
    Some(out)
}

/// Map the disk and read what the map says holds data, up to [`READ_BUDGET`] bytes; then
/// the first and last chunk whatever they are.
async fn read_allocated(img: &Image) {
    let size = img.virtual_size();
    let mut budget = READ_BUDGET;
    let mut buf = vec![0u8; READ_CHUNK as usize];
    let extents = img.map(0, size.min(MAP_LIMIT)).await.unwrap_or_default();
    for e in extents.iter().filter(|e| e.data || e.compressed) {
        let mut off = e.start;
        let end = e.start.saturating_add(e.length);
        while off < end && budget > 0 {
            let n = (end - off).min(READ_CHUNK);
            let _ = img.read_at(&mut buf[..n as usize], off).await;
            off += n;
            budget = budget.saturating_sub(n);
        }
    }
    let head = size.min(READ_CHUNK);
    let _ = img.read_at(&mut buf[..head as usize], 0).await;
    let _ = img.read_at(&mut buf[..head as usize], size - head).await;
}
