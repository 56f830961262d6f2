//! Write-path scenarios that QEMU-made images bring: refcount-table growth, internal
//! snapshots (shared clusters), compressed clusters, preallocated zero clusters.

use crate::common;

use std::path::{Path, PathBuf};

use qcow2_engine::image::{Image, OpenOptions, ZeroFlags};

fn create(dir: &Path, name: &str, opts: &str, size: &str) -> PathBuf {
    let p = dir.join(name);
    common::qemu_create(&p, opts, size);
    p
}

async fn open_rw(p: &Path) -> Image {
    Image::open(p, &OpenOptions::new().writable(true))
        .await
        .unwrap()
}

fn assert_equals_shadow(p: &Path, shadow: &[u8]) {
    let got = common::qemu_raw(p);
    assert_eq!(
        common::first_difference(&got, shadow),
        None,
        "{} differs from the shadow",
        p.display()
    );
}

async fn refcount_growth(opts: &str) {
    let dir = tempfile::tempdir().unwrap();
    let p = create(dir.path(), "g.qcow2", opts, "64M");
    let table_before = reftable_location(&p);
    let img = open_rw(&p).await;
    let mut shadow = vec![0u8; 64 << 20];
    // 40 MiB of data in 1 MiB writes: the file outgrows the first refcount table cluster
    // several times over.
    for i in 0..40u64 {
        let off = (i * 1_572_869) % (63 << 20);
        let buf = vec![(i as u8) | 1; 1 << 20];
        img.write_at(&buf, off).await.unwrap();
        shadow[off as usize..off as usize + buf.len()].copy_from_slice(&buf);
        if i % 7 == 0 {
            img.flush().await.unwrap();
        }
    }
    img.close().await.unwrap();
    drop(img);
    common::assert_check_clean(&p);
    assert_equals_shadow(&p, &shadow);
    let table_after = reftable_location(&p);
    assert_ne!(table_before, table_after, "the refcount table moved (grew)");
    assert!(
        table_after.1 > 1,
        "the new table spans several clusters: {table_after:?}"
    );
}

/// (refcount_table_offset, refcount_table_clusters) from the header bytes.
fn reftable_location(p: &Path) -> (u64, u32) {
    let h = std::fs::read(p).unwrap();
    let off = u64::from_be_bytes(h[48..56].try_into().unwrap());
    let clusters = u32::from_be_bytes(h[56..60].try_into().unwrap());
    (off, clusters)
}

#[tokio::test]
async fn refcount_table_growth_512_byte_clusters() {
    refcount_growth("cluster_size=512").await;
}

#[tokio::test]
async fn refcount_table_growth_512_byte_clusters_64_bit_refcounts() {
    refcount_growth("cluster_size=512,refcount_bits=64").await;
}

#[tokio::test]
async fn refcount_table_growth_8_bit_refcounts() {
    refcount_growth("cluster_size=512,refcount_bits=8").await;
}

#[tokio::test]
async fn writes_leave_internal_snapshot_intact() {
    let dir = tempfile::tempdir().unwrap();
    let p = create(dir.path(), "s.qcow2", "cluster_size=65536", "8M");
    common::qemu_io(
        &p,
        &[
            "write -P 0x11 0 1M",
            "write -P 0x22 3M 256k",
            "write -z 5M 128k",
        ],
    );
    let before = common::qemu_raw(&p);
    common::run(
        "qemu-img",
        &["snapshot", "-c", "snap1", p.to_str().unwrap()],
    );
    let img = open_rw(&p).await;
    let mut shadow = before.clone();
    for (off, len, val) in [
        (4096u64, 100usize, 0xa1u8),
        (65536, 65536, 0xa2),
        (3 << 20, 1000, 0xa3),
        (7 << 20, 4096, 0xa4),
    ] {
        img.write_at(&vec![val; len], off).await.unwrap();
        shadow[off as usize..off as usize + len].fill(val);
    }
    img.discard(3 << 20, 128 << 10).await.unwrap();
    shadow[3 << 20..(3 << 20) + (128 << 10)].fill(0);
    img.write_zeroes(0, 65536, ZeroFlags { may_unmap: true })
        .await
        .unwrap();
    shadow[..65536].fill(0);
    img.close().await.unwrap();
    drop(img);
    common::assert_check_clean(&p);
    assert_equals_shadow(&p, &shadow);
    // Revert a copy to the snapshot: it must hold exactly the content from before.
    let copy = dir.path().join("copy.qcow2");
    std::fs::copy(&p, &copy).unwrap();
    common::run(
        "qemu-img",
        &["snapshot", "-a", "snap1", copy.to_str().unwrap()],
    );
    assert_equals_shadow(&copy, &before);
    common::assert_check_clean(&copy);
}

async fn rewrite_compressed(compression: &str) {
    let dir = tempfile::tempdir().unwrap();
    let raw = dir.path().join("src.raw");
    let mut content = vec![0u8; 4 << 20];
    for (i, b) in content.iter_mut().enumerate() {
        *b = if (i / 65536) % 4 == 3 {
            0
        } else {
            ((i / 7) % 13) as u8 + 1
        };
    }
    std::fs::write(&raw, &content).unwrap();
    let p = dir.path().join("c.qcow2");
    let o = format!("compression_type={compression},cluster_size=65536");
    common::run(
        "qemu-img",
        &[
            "convert",
            "-q",
            "-c",
            "-f",
            "raw",
            "-O",
            "qcow2",
            "-o",
            &o,
            raw.to_str().unwrap(),
            p.to_str().unwrap(),
        ],
    );
    let map = common::run("qemu-img", &["map", "--output=json", p.to_str().unwrap()]);
    assert!(
        map.contains("\"compressed\": true"),
        "fixture has compressed clusters"
    );
    let img = open_rw(&p).await;
    // Partial rewrites (COW from decompressed data), whole-cluster rewrites, discards.
    for (off, len, val) in [
        (100u64, 10usize, 0xc1u8),
        (65536, 65536, 0xc2),
        (200_000, 300_000, 0xc3),
        (2 << 20, 1, 0xc4),
    ] {
        img.write_at(&vec![val; len], off).await.unwrap();
        content[off as usize..off as usize + len].fill(val);
    }
    img.discard(3 << 20, 65536).await.unwrap();
    content[3 << 20..(3 << 20) + 65536].fill(0);
    let mut got = vec![0u8; content.len()];
    img.read_at(&mut got, 0).await.unwrap();
    assert_eq!(common::first_difference(&got, &content), None);
    img.close().await.unwrap();
    drop(img);
    common::assert_check_clean(&p);
    assert_equals_shadow(&p, &content);
}

#[tokio::test]
async fn rewrite_zlib_compressed_clusters() {
    rewrite_compressed("zlib").await;
}

#[tokio::test]
async fn rewrite_zstd_compressed_clusters() {
    rewrite_compressed("zstd").await;
}

#[tokio::test]
async fn overwrite_preallocated_zero_cluster_reuses_host_cluster() {
    let dir = tempfile::tempdir().unwrap();
    let p = create(dir.path(), "z.qcow2", "cluster_size=65536", "1M");
    common::qemu_io(&p, &["write -P 0x33 0 128k"]);
    let img = open_rw(&p).await;
    img.write_zeroes(0, 65536, ZeroFlags { may_unmap: false })
        .await
        .unwrap();
    img.write_at(&[0x44; 512], 1024).await.unwrap();
    img.close().await.unwrap();
    drop(img);
    common::assert_check_clean(&p);
    // Still exactly two data clusters: the preallocated one was reused, nothing leaked.
    let check = common::run("qemu-img", &["check", "--output=json", p.to_str().unwrap()]);
    assert!(check.contains("\"allocated-clusters\": 2,"), "{check}");
    let mut want = vec![0u8; 1 << 20];
    want[1024..1536].fill(0x44);
    want[65536..131072].fill(0x33);
    assert_equals_shadow(&p, &want);
}

#[tokio::test]
async fn discard_on_overlay_never_exposes_backing() {
    let dir = tempfile::tempdir().unwrap();
    let base = create(dir.path(), "base.qcow2", "cluster_size=65536", "2M");
    common::qemu_io(&base, &["write -P 0x55 0 2M"]);
    let top = dir.path().join("top.qcow2");
    // A relative name: the library's default reference policy refuses absolute ones.
    common::qemu_overlay("base.qcow2", "qcow2", top.to_str().unwrap());
    let img = open_rw(&top).await;
    img.write_at(&[1u8; 4096], 65536).await.unwrap();
    img.discard(0, 1 << 20).await.unwrap();
    img.discard(1_500_000, 1000).await.unwrap();
    img.close().await.unwrap();
    drop(img);
    common::assert_check_clean(&top);
    let mut want = vec![0x55u8; 2 << 20];
    want[..1 << 20].fill(0);
    want[1_500_000..1_501_000].fill(0);
    assert_equals_shadow(&top, &want);
}

/// Writes, zeroes and discards at the end of a disk whose size is not a multiple of the
/// cluster size (the last cluster is partly outside the disk).
async fn odd_size_tail(opts: &str) {
    let dir = tempfile::tempdir().unwrap();
    let size = (5 << 20) + 1536;
    let p = create(dir.path(), "odd.qcow2", opts, &size.to_string());
    let img = open_rw(&p).await;
    let mut shadow = vec![0u8; size];
    let ops: [(usize, usize, u8); 4] = [
        (size - 100, 100, 0x61),
        (size - 70_000, 3_000, 0x62),
        (size - 1536, 1536, 0x63),
        (size - 5000, 10, 0x64),
    ];
    for (off, len, val) in ops {
        img.write_at(&vec![val; len], off as u64).await.unwrap();
        shadow[off..off + len].fill(val);
    }
    img.write_zeroes((size - 1024) as u64, 512, ZeroFlags { may_unmap: true })
        .await
        .unwrap();
    shadow[size - 1024..size - 512].fill(0);
    img.discard((size - 1536) as u64, 1536).await.unwrap();
    shadow[size - 1536..].fill(0);
    img.write_at(&[0x65; 7], (size - 7) as u64).await.unwrap();
    shadow[size - 7..].fill(0x65);
    let err = img.write_at(&[1; 8], (size - 7) as u64).await.unwrap_err();
    assert_eq!(err.kind(), qcow2_engine::ErrorKind::OutOfRange);
    img.close().await.unwrap();
    drop(img);
    common::assert_check_clean(&p);
    assert_equals_shadow(&p, &shadow);
}

#[tokio::test]
async fn odd_size_tail_64k() {
    odd_size_tail("cluster_size=65536").await;
}

#[tokio::test]
async fn odd_size_tail_extended_l2() {
    odd_size_tail("cluster_size=65536,extended_l2=on").await;
}

#[tokio::test]
async fn odd_size_tail_v2() {
    odd_size_tail("compat=0.10,cluster_size=4096").await;
}

/// The background flusher writes metadata on its own: without any flush() call, a copy of
/// the file taken a little later already maps the written data.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn background_flusher_persists_metadata() {
    let dir = tempfile::tempdir().unwrap();
    let p = create(dir.path(), "bg.qcow2", "cluster_size=65536", "4M");
    let opts = OpenOptions::new()
        .writable(true)
        .flush_interval(Some(std::time::Duration::from_millis(50)));
    let img = Image::open(&p, &opts).await.unwrap();
    img.write_at(&[0x77; 100_000], 12345).await.unwrap();
    let copy = dir.path().join("copy.qcow2");
    let mut mapped = false;
    for _ in 0..100 {
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        std::fs::copy(&p, &copy).unwrap();
        let seen = Image::open(&copy, &OpenOptions::new()).await.unwrap();
        let mut buf = vec![0u8; 100_000];
        seen.read_at(&mut buf, 12345).await.unwrap();
        if buf.iter().all(|&b| b == 0x77) {
            mapped = true;
            break;
        }
    }
    assert!(mapped, "the background flusher never wrote the mapping");
    common::assert_check_clean(&copy);
    img.close().await.unwrap();
}

/// A corrupt L2 entry pointing at the L1 table: the write is refused with a Corrupt error and
/// the L1 table stays intact (QEMU's overlap check does the same).
#[tokio::test]
async fn data_write_onto_the_l1_table_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let p = create(dir.path(), "ov.qcow2", "cluster_size=65536", "4M");
    common::qemu_io(&p, &["write -P 0x11 0 64k"]);
    let mut bytes = std::fs::read(&p).unwrap();
    let be64 = |b: &[u8], at: usize| u64::from_be_bytes(b[at..at + 8].try_into().unwrap());
    let l1 = be64(&bytes, 40) as usize;
    let l2 = (be64(&bytes, l1) & 0x00ff_ffff_ffff_fe00) as usize;
    let evil = (l1 as u64) | (1 << 63); // normal, COPIED, host = the L1 table
    bytes[l2..l2 + 8].copy_from_slice(&evil.to_be_bytes());
    std::fs::write(&p, &bytes).unwrap();
    let l1_before = bytes[l1..l1 + 512].to_vec();
    let img = open_rw(&p).await;
    let err = img.write_at(&[0xee; 4096], 0).await.unwrap_err();
    assert_eq!(err.kind(), qcow2_engine::ErrorKind::Corrupt, "{err}");
    // The image is now marked corrupt: its closing flush is refused (tests/overlap.rs).
    let _ = img.close().await;
    drop(img);
    let after = std::fs::read(&p).unwrap();
    assert_eq!(
        &after[l1..l1 + 512],
        &l1_before[..],
        "the L1 table was not touched"
    );
}
