//! The metadata overlap check and the allocator's sanity checks, on images made by qemu-img
//! and then damaged by patching bytes (issue 8 item 3 and the allocator panic).
//!
//! Each refused case must leave the image exactly as it was apart from the corrupt bit
//! (incompatible feature bit 1): the file bytes are compared, and `qemu-img check` must report
//! exactly what it reported before. QEMU refuses the same writes ("Preventing invalid write
//! on metadata") and marks the image corrupt the same way.

use crate::common;

use std::path::{Path, PathBuf};

use common::{run, status};
use qcow2_engine::ErrorKind;
use qcow2_engine::image::{Image, OpenOptions};

/// Header offset of `incompatible_features`.
const INCOMPAT: usize = 72;
/// Incompatible feature bit 1: corrupt.
const CORRUPT: u64 = 2;
/// L2 entry flag: COPIED (refcount 1, writable in place).
const COPIED: u64 = 1 << 63;

/// A 4 MiB image with 64 KiB clusters; qemu-img lays it out as header 0x0, refcount table
/// 0x10000, refcount block 0x20000, L1 table 0x30000. `cmds` are qemu-io commands run on it.
fn image(dir: &Path, cmds: &[&str]) -> PathBuf {
    let p = dir.join("ov.qcow2");
    let s = p.to_str().unwrap();
    common::qemu_create(s, "", "4M");
    for c in cmds {
        common::qemu_io(s, &[c]);
    }
    p
}

fn be64(b: &[u8], at: u64) -> u64 {
    u64::from_be_bytes(b[at as usize..at as usize + 8].try_into().unwrap())
}

/// Overwrite 8 bytes at `at` with the big-endian `v`.
fn patch64(p: &Path, at: u64, v: u64) {
    let mut b = std::fs::read(p).unwrap();
    b[at as usize..at as usize + 8].copy_from_slice(&v.to_be_bytes());
    std::fs::write(p, b).unwrap();
}

/// (refcount table, refcount block 0, L1 table, L2 table of L1 entry 0 or 0).
fn layout(p: &Path) -> (u64, u64, u64, u64) {
    let b = std::fs::read(p).unwrap();
    let (l1, rt) = (be64(&b, 40), be64(&b, 48));
    let rb = be64(&b, rt);
    let l2 = be64(&b, l1) & 0x00ff_ffff_ffff_fe00;
    (rt, rb, l1, l2)
}

/// `qemu-img check` exit code and report.
fn qemu_check(p: &Path) -> (i32, String) {
    status("qemu-img", &["check", p.to_str().unwrap()])
}

async fn open_rw(p: &Path) -> qcow2_engine::Result<Image> {
    Image::open(p, &OpenOptions::new().writable(true)).await
}

/// What the image looked like before the refused operation.
struct Before {
    bytes: Vec<u8>,
    check: (i32, String),
}

fn before(p: &Path) -> Before {
    Before {
        bytes: std::fs::read(p).unwrap(),
        check: qemu_check(p),
    }
}

/// The operation was refused as a corruption, the image gained the corrupt bit and nothing
/// else, `qemu-img check` reports what it reported before, and a read-write open is refused
/// (as QEMU refuses it) while a read-only one works.
async fn assert_refused_and_marked(p: &Path, b: &Before, err: qcow2_engine::Error) {
    assert_eq!(err.kind(), ErrorKind::Corrupt, "{err}");
    let mut after = std::fs::read(p).unwrap();
    assert_eq!(
        be64(&after, INCOMPAT as u64),
        be64(&b.bytes, INCOMPAT as u64) | CORRUPT,
        "the corrupt bit is set"
    );
    after[INCOMPAT..INCOMPAT + 8].copy_from_slice(&b.bytes[INCOMPAT..INCOMPAT + 8]);
    assert_eq!(after.len(), b.bytes.len(), "the file length is unchanged");
    assert!(after == b.bytes, "nothing but the corrupt bit changed");
    assert_eq!(qemu_check(p), b.check, "qemu-img check reports nothing new");
    let e = open_rw(p)
        .await
        .expect_err("a corrupt image opens read-only only");
    assert_eq!(e.kind(), ErrorKind::Corrupt, "{e}");
    let (code, text) = status("qemu-io", &["-c", "write 0 4k", p.to_str().unwrap()]);
    assert_ne!(code, 0, "QEMU refuses it too: {text}");
    assert!(text.contains("Image is corrupt"), "{text}");
    let img = Image::open(p, &OpenOptions::new())
        .await
        .expect("read-only open");
    img.close().await.expect("closing the read-only image");
}

/// Open `p` read-write, run `request` (it must fail; its error must name `what` when given),
/// close, and check that the request was refused and the image marked corrupt.
async fn refused<F, Fut>(p: &Path, what: Option<&str>, request: F)
where
    F: FnOnce(Image) -> Fut,
    Fut: std::future::Future<Output = qcow2_engine::Result<()>>,
{
    let b = before(p);
    let img = open_rw(p).await.unwrap();
    let err = request(img.clone()).await.unwrap_err();
    if let Some(what) = what {
        assert!(err.what().contains(what), "{err}");
    }
    let _ = img.close().await;
    drop(img);
    assert_refused_and_marked(p, &b, err).await;
}

/// Point the L2 entry of guest cluster 0 at `host` (normal, COPIED), then rewrite 4 KiB of
/// guest cluster 0 in place: the write must be refused.
async fn in_place_write_onto(target: impl Fn((u64, u64, u64, u64)) -> u64) {
    let dir = tempfile::tempdir().unwrap();
    let p = image(dir.path(), &["write -P 0x11 0 64k"]);
    let lay = layout(&p);
    patch64(&p, lay.3, target(lay) | COPIED);
    let b = before(&p);
    let img = open_rw(&p).await.unwrap();
    let err = img.write_at(&[0xee; 4096], 0).await.unwrap_err();
    // The image latched the corruption: further writes and the closing flush are refused.
    assert!(img.write_at(&[1; 512], 1 << 20).await.is_err());
    let _ = img.close().await;
    drop(img);
    assert_refused_and_marked(&p, &b, err).await;
}

#[tokio::test]
async fn l2_entry_pointing_at_a_refcount_block_is_refused() {
    in_place_write_onto(|(_, rb, _, _)| rb).await;
}

#[tokio::test]
async fn l2_entry_pointing_at_the_refcount_table_is_refused() {
    in_place_write_onto(|(rt, _, _, _)| rt).await;
}

#[tokio::test]
async fn l2_entry_pointing_at_its_own_l2_table_is_refused() {
    in_place_write_onto(|(_, _, _, l2)| l2).await;
}

/// An internal snapshot's L1 table is metadata too (the check covers the snapshot table and
/// every snapshot's L1 table, as QEMU's does).
#[tokio::test]
async fn l2_entry_pointing_at_a_snapshot_l1_table_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let p = image(dir.path(), &["write -P 0x11 0 64k"]);
    run("qemu-img", &["snapshot", "-c", "s1", p.to_str().unwrap()]);
    let bytes = std::fs::read(&p).unwrap();
    let snap_l1 = be64(&bytes, be64(&bytes, 64));
    let (_, _, _, l2) = layout(&p);
    patch64(&p, l2, snap_l1 | COPIED);
    refused(&p, Some("inactive L1"), |img| async move {
        img.write_at(&[0xee; 4096], 0).await
    })
    .await;
}

/// A compressed write replacing an L2 entry that points at a refcount block: the block's
/// reference must not be dropped (it used to be freed and then reused).
#[tokio::test]
async fn compressed_rewrite_does_not_free_a_refcount_block() {
    let dir = tempfile::tempdir().unwrap();
    let p = image(dir.path(), &["write -P 0x11 0 64k"]);
    let (_, rb, _, l2) = layout(&p);
    patch64(&p, l2, rb); // normal, not COPIED: the write goes to the allocating path
    let data: Vec<u8> = (0..65536u32).map(|i| (i % 7) as u8).collect();
    refused(&p, None, |img| async move {
        img.write_compressed(&data, 0).await
    })
    .await;
}

/// Set the 16-bit refcount of host cluster `c` to 0 in refcount block 0.
fn zero_refcount(p: &Path, c: u64) {
    let (_, rb, _, _) = layout(p);
    let mut b = std::fs::read(p).unwrap();
    let at = (rb + 2 * c) as usize;
    b[at..at + 2].copy_from_slice(&[0, 0]);
    std::fs::write(p, b).unwrap();
}

/// Refcounts claim a metadata cluster is free; the first allocation would hand it out (for
/// the new L2 table of the write) and overwrite it.
async fn allocation_onto_free_claimed(
    dir: &Path,
    cluster: impl Fn((u64, u64, u64, u64)) -> u64,
) -> PathBuf {
    let p = image(dir, &[]);
    let c = cluster(layout(&p)) >> 16;
    zero_refcount(&p, c);
    refused(&p, None, |img| async move {
        img.write_at(&[0xee; 4096], 0).await
    })
    .await;
    p
}

#[tokio::test]
async fn refcount_table_claimed_free_is_not_allocated() {
    let dir = tempfile::tempdir().unwrap();
    let p = allocation_onto_free_claimed(dir.path(), |(rt, _, _, _)| rt).await;
    // `check -r all` repairs the refcount and clears the corrupt bit: writable again.
    let storage = common::storage(&p, false);
    qcow2_engine::check::repair(storage, qcow2_engine::check::RepairMode::All)
        .await
        .unwrap();
    common::assert_check_clean(&p);
    assert_eq!(
        be64(&std::fs::read(&p).unwrap(), INCOMPAT as u64) & CORRUPT,
        0
    );
    let img = open_rw(&p).await.unwrap();
    img.write_at(&[0xee; 4096], 0).await.unwrap();
    img.close().await.unwrap();
    drop(img);
    common::assert_check_clean(&p);
}

#[tokio::test]
async fn l1_table_claimed_free_is_not_allocated() {
    // Clusters 1 and 2 (refcount table and block) stay referenced, so the scan reaches the
    // L1 table at cluster 3 first.
    let dir = tempfile::tempdir().unwrap();
    allocation_onto_free_claimed(dir.path(), |(_, _, l1, _)| l1).await;
}

/// A compressed L2 entry whose payload lies in the L1 table's cluster: rewriting the whole
/// guest cluster needs no old data, and used to free the L1 cluster on the next flush.
#[tokio::test]
async fn compressed_descriptor_into_the_l1_table_is_not_freed() {
    let dir = tempfile::tempdir().unwrap();
    let p = image(dir.path(), &["write -P 0x11 0 64k"]);
    let (_, _, l1, l2) = layout(&p);
    // Compressed (bit 62), one 512-byte sector (bits 54..61 hold sectors - 1), at the L1.
    patch64(&p, l2, (1 << 62) | l1);
    refused(&p, None, |img| async move {
        img.write_at(&[0xee; 65536], 0).await
    })
    .await;
}

/// Refcount table entry 0 is 0: the allocator used to place a new refcount block at
/// cluster 0 (the header) and then panic (`expect("just set")`). Found by fuzzing.
#[tokio::test]
async fn empty_first_refcount_table_entry_gives_an_error_not_a_panic() {
    let dir = tempfile::tempdir().unwrap();
    let p = image(dir.path(), &["write -P 0x11 0 64k"]);
    let (rt, _, _, _) = layout(&p);
    patch64(&p, rt, 0);
    refused(&p, None, |img| async move {
        img.write_at(&[0xee; 4096], 1 << 20).await
    })
    .await;
}

/// `l1_table_offset = 0`: the first L1 update would overwrite the header magic.
#[tokio::test]
async fn l1_table_in_the_header_cluster_is_refused_at_open() {
    let dir = tempfile::tempdir().unwrap();
    let p = image(dir.path(), &["write -P 0x11 0 64k"]);
    patch64(&p, 40, 0);
    let bytes = std::fs::read(&p).unwrap();
    for opts in [OpenOptions::new().writable(true), OpenOptions::new()] {
        let err = Image::open(&p, &opts).await.expect_err("open refused");
        assert_eq!(err.kind(), ErrorKind::InvalidImage, "{err}");
        assert!(err.what().contains("l1_table_offset"), "{err}");
    }
    assert!(
        std::fs::read(&p).unwrap() == bytes,
        "the image is untouched"
    );
}

/// A healthy image is not disturbed: the check knows the L2 tables, refcount blocks and
/// tables the engine creates as it goes, including a grown refcount table and a moved L1.
#[tokio::test]
async fn healthy_growth_passes_the_check() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("g.qcow2");
    let s = p.to_str().unwrap();
    let o = "cluster_size=512,refcount_bits=64";
    common::qemu_create(s, o, "1M");
    let img = open_rw(&p).await.unwrap();
    let mut shadow = vec![0u8; 8 << 20];
    let mut put = |off: u64, len: usize, v: u8| shadow[off as usize..][..len].fill(v);
    for i in 0..64u64 {
        let off = i * 61 * 512 % (1000 << 10);
        img.write_at(&[i as u8 + 1; 1536], off).await.unwrap();
        put(off, 1536, i as u8 + 1);
    }
    img.resize(8 << 20).await.unwrap(); // moves the L1 table
    for i in 0..4096u64 {
        // Every other cluster: each write needs a new data cluster, often a new L2 table
        // and refcount block, and the refcount table grows past its first cluster.
        let off = (1 << 20) + i * 1024;
        img.write_at(&[i as u8 | 1; 512], off).await.unwrap();
        put(off, 512, i as u8 | 1);
        if i % 512 == 0 {
            img.flush().await.unwrap();
        }
    }
    img.close().await.unwrap();
    drop(img);
    common::assert_check_clean(&p);
    assert!(
        common::qemu_raw(&p) == shadow,
        "content differs from the shadow"
    );
    let b = std::fs::read(&p).unwrap();
    assert_eq!(be64(&b, 72) & CORRUPT, 0);
    assert!(be64(&b, 56) >> 32 > 1, "the refcount table grew");
}

/// The host offset of a snapshot's L1 table and of the L2 table its entry 0 points to (the
/// first snapshot of the table at `snapshots_offset`).
fn snapshot_l1_and_l2(p: &Path) -> (u64, u64) {
    let b = std::fs::read(p).unwrap();
    let snap_l1 = be64(&b, be64(&b, 64));
    (snap_l1, be64(&b, snap_l1) & 0x00ff_ffff_ffff_fe00)
}

/// `qemu-img check`'s error lines, in order (leaks and summary lines left out).
fn check_errors(p: &Path) -> Vec<String> {
    let (_, text) = qemu_check(p);
    text.lines()
        .filter(|l| l.starts_with("ERROR"))
        .map(str::to_owned)
        .collect()
}

/// An image with snapshot `s1` (guest cluster 0 = 0x11) whose active layer then rewrote
/// guest cluster 1, so the active L1 entry 0 points to a private copy of the L2 table and
/// the original table is referenced by the snapshot's L1 table only.
fn snapshot_with_private_l2(dir: &Path) -> PathBuf {
    let p = image(dir, &["write -P 0x11 0 64k"]);
    run("qemu-img", &["snapshot", "-c", "s1", p.to_str().unwrap()]);
    run(
        "qemu-io",
        &[
            "-f",
            "qcow2",
            "-c",
            "write -P 0x22 64k 64k",
            p.to_str().unwrap(),
        ],
    );
    p
}

/// An active L2 entry mapping guest cluster 0 onto the L2 table only the snapshot refers to
/// (an "inactive L2 table" in QEMU's words): the in-place write must not land there.
#[tokio::test]
async fn l2_entry_pointing_at_a_snapshot_l2_table_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let p = snapshot_with_private_l2(dir.path());
    let (_, snap_l2) = snapshot_l1_and_l2(&p);
    let (_, _, _, l2) = layout(&p);
    assert_ne!(l2, snap_l2, "the active layer has its own L2 table");
    patch64(&p, l2, snap_l2 | COPIED);
    refused(&p, Some("inactive L2"), |img| async move {
        img.write_at(&[0xee; 4096], 0).await
    })
    .await;
}

/// Refcounts claim the snapshot's L2 table is free: the first data allocation must not
/// take it.
#[tokio::test]
async fn snapshot_l2_table_claimed_free_is_not_allocated() {
    let dir = tempfile::tempdir().unwrap();
    let p = snapshot_with_private_l2(dir.path());
    let (_, snap_l2) = snapshot_l1_and_l2(&p);
    zero_refcount(&p, snap_l2 >> 16);
    // Guest 1 MiB is unallocated in the active (private) L2 table: one data cluster.
    refused(&p, None, |img| async move {
        img.write_at(&[0xee; 4096], 1 << 20).await
    })
    .await;
}

/// The L2 table shared by the active layer and a snapshot has a refcount of 1 instead of 2.
/// Copying it for the first write drops the active layer's reference: that must not free the
/// table (the snapshot still uses it), or the next allocation overwrites the snapshot's L2.
#[tokio::test]
async fn copying_a_shared_l2_table_does_not_free_the_snapshots_table() {
    let dir = tempfile::tempdir().unwrap();
    let p = image(dir.path(), &["write -P 0x11 0 64k"]);
    run("qemu-img", &["snapshot", "-c", "s1", p.to_str().unwrap()]);
    let (_, shared) = snapshot_l1_and_l2(&p);
    assert_eq!(layout(&p).3, shared, "the L2 table is shared");
    let (_, rb, _, _) = layout(&p);
    let mut bytes = std::fs::read(&p).unwrap();
    bytes[(rb + 2 * (shared >> 16)) as usize + 1] = 1; // refcount 2 -> 1
    std::fs::write(&p, bytes).unwrap();
    let img = open_rw(&p).await.unwrap();
    img.write_at(&[0xee; 4096], 0).await.unwrap();
    let flushed = img.flush().await;
    let _ = img.write_at(&[0xdd; 4096], 1 << 20).await;
    let _ = img.close().await;
    drop(img);
    // The snapshot still reads its data, the active layer its own, and QEMU finds no
    // corruption (leaks at most).
    let s = p.to_str().unwrap();
    let snap = dir.path().join("s1.raw");
    let sn = snap.to_str().unwrap();
    run(
        "qemu-img",
        &["convert", "-l", "snapshot.name=s1", "-O", "raw", s, sn],
    );
    let raw = std::fs::read(&snap).unwrap();
    assert!(
        raw[..65536].iter().all(|&x| x == 0x11),
        "snapshot data intact"
    );
    assert!(raw[65536..].iter().all(|&x| x == 0), "snapshot data intact");
    let reads = ["read -P 0xee 0 4k", "read -P 0x11 4k 60k"];
    for r in reads {
        run("qemu-io", &["-r", "-f", "qcow2", "-c", r, s]);
    }
    let err = flushed.expect_err("dropping the table's last reference is refused");
    assert_eq!(err.kind(), ErrorKind::Corrupt, "{err}");
    let b = std::fs::read(&p).unwrap();
    assert_eq!(
        be64(&b, INCOMPAT as u64) & CORRUPT,
        CORRUPT,
        "marked corrupt"
    );
    let (code, text) = qemu_check(&p);
    assert!(code == 0 || code == 3, "qemu-img check: {text}");
}

/// Refcount table entry 1 was zeroed although guest data and the block itself lie in the
/// range it covers (4 KiB clusters, 64-bit refcounts: 512 clusters per block). The block
/// created for the next allocation used to land on the first cluster of that range, and
/// the allocation after it too, over live guest data. Clusters that were in the file at
/// open are never handed out from a range no refcount block covered: the new block and
/// the new clusters go past the old end of the file.
#[tokio::test]
async fn a_refcount_block_for_an_empty_table_entry_does_not_land_on_data() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("rb.qcow2");
    let s = p.to_str().unwrap();
    let o = "cluster_size=4096,refcount_bits=64";
    run(
        "qemu-img",
        &["create", "-q", "-f", "qcow2", "-o", o, s, "8M"],
    );
    run("qemu-io", &["-f", "qcow2", "-c", "write -P 0x11 0 2M", s]);
    let rt = be64(&std::fs::read(&p).unwrap(), 48);
    assert_ne!(
        be64(&std::fs::read(&p).unwrap(), rt + 8),
        0,
        "block 1 exists"
    );
    patch64(&p, rt + 8, 0);
    let errors = check_errors(&p);
    assert!(
        !errors.is_empty(),
        "the zeroed entry shows in qemu-img check"
    );
    let img = open_rw(&p).await.unwrap();
    img.write_at(&[0xee; 8192], 4 << 20).await.unwrap();
    img.close().await.unwrap();
    drop(img);
    run("qemu-io", &["-f", "qcow2", "-c", "read -P 0x11 0 2M", s]);
    run("qemu-io", &["-f", "qcow2", "-c", "read -P 0xee 4M 8k", s]);
    assert_eq!(
        check_errors(&p),
        errors,
        "qemu-img check reports nothing new"
    );
}

/// A compressed L2 entry whose payload lies in the snapshot's L2 table: discarding the guest
/// cluster drops the payload's references, which used to free the snapshot's table (and
/// hand it out to the next allocation).
#[tokio::test]
async fn discarding_a_compressed_descriptor_into_a_snapshot_l2_table_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let p = snapshot_with_private_l2(dir.path());
    let (_, snap_l2) = snapshot_l1_and_l2(&p);
    let (_, _, _, l2) = layout(&p);
    // Compressed (bit 62), one 512-byte sector, inside the snapshot's L2 table.
    patch64(&p, l2, (1 << 62) | snap_l2);
    refused(&p, Some("inactive L2"), |img| async move {
        img.discard(0, 65536).await
    })
    .await;
}

/// Host offset of the bitmap directory (bitmaps header extension 0x23852875: nb_bitmaps u32,
/// reserved u32, directory size u64, directory offset u64).
fn bitmap_directory(p: &Path) -> u64 {
    let b = std::fs::read(p).unwrap();
    let mut at = u32::from_be_bytes(b[100..104].try_into().unwrap()) as usize;
    loop {
        let kind = u32::from_be_bytes(b[at..at + 4].try_into().unwrap());
        let len = u32::from_be_bytes(b[at + 4..at + 8].try_into().unwrap()) as usize;
        assert_ne!(kind, 0, "no bitmaps extension");
        if kind == 0x2385_2875 {
            return be64(&b, at as u64 + 24);
        }
        at += 8 + len.next_multiple_of(8);
    }
}

/// The bitmap directory of a persistent bitmap is metadata too. The bitmap is disabled, so
/// that our read-write open leaves the directory as it is (enabled ones get marked in use).
#[tokio::test]
async fn l2_entry_pointing_at_the_bitmap_directory_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let p = image(dir.path(), &["write -P 0x11 0 64k"]);
    let args = ["bitmap", "--add", "--disable", p.to_str().unwrap(), "b0"];
    run("qemu-img", &args);
    open_rw(&p).await.unwrap().close().await.unwrap();
    let (_, _, _, l2) = layout(&p);
    patch64(&p, l2, bitmap_directory(&p) | COPIED);
    refused(&p, Some("bitmap directory"), |img| async move {
        img.write_at(&[0xee; 4096], 0).await
    })
    .await;
}
