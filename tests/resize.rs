//! Resizing: growth that moves the L1 table (512-byte clusters, where one L1 entry covers
//! only 32 KiB), shrinking with and without permission, the CLI against `qemu-img resize`
//! (results compared with `qemu-img compare`), raw files, and power cuts during a grow.

use crate::common;

use std::path::Path;
use std::sync::Arc;

use common::{assert_check_clean, path_in, qcow2, qemu_raw, run, status};
use qcow2_engine::Storage;
use qcow2_engine::check::{CheckOptions, check};
use qcow2_engine::image::{Image, OpenOptions};
use qcow2_engine::storage::{CrashPolicy, CrashStorage, MemoryStorage};

fn virtual_size(img: &str) -> u64 {
    let out = run("qemu-img", &["info", "--output=json", img]);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    v["virtual-size"].as_u64().unwrap()
}

fn l1_fields(img: &str) -> (u32, u64) {
    let b = std::fs::read(img).unwrap();
    let l1_size = u32::from_be_bytes(b[36..40].try_into().unwrap());
    let l1_off = u64::from_be_bytes(b[40..48].try_into().unwrap());
    (l1_size, l1_off)
}

/// A byte pattern that differs per offset and per `seed`.
fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed) | 1)
        .collect()
}

async fn write(img: &Image, shadow: &mut [u8], off: u64, data: &[u8]) {
    img.write_at(data, off).await.unwrap();
    shadow[off as usize..off as usize + data.len()].copy_from_slice(data);
}

#[tokio::test]
async fn grow_moves_l1_and_keeps_data() {
    let d = tempfile::tempdir().unwrap();
    let p = path_in(d.path(), "g.qcow2");
    common::qemu_create(&p, "cluster_size=512", "16K");
    let (l1_size, l1_off) = l1_fields(&p);
    assert_eq!(l1_size, 1);
    let opts = OpenOptions::new()
        .writable(true)
        .slice_size(512)
        .l2_cache_bytes(2048);
    let img = Image::open(&p, &opts).await.unwrap();
    let mut shadow = vec![0u8; 16 << 10];
    write(&img, &mut shadow, 1000, &pattern(5000, 1)).await;
    // Grow in steps, with unflushed writes (dirty L1 entries) across each switch.
    for (new, at) in [
        (100u64 << 10, 30u64 << 10),
        (1 << 20, 500 << 10),
        (6 << 20, 5 << 20),
    ] {
        img.resize(new).await.unwrap();
        assert_eq!(img.virtual_size(), new);
        shadow.resize(new as usize, 0);
        write(&img, &mut shadow, at, &pattern(70_000, at as u8)).await;
        write(&img, &mut shadow, new - 700, &pattern(700, 9)).await;
        let mut back = vec![0u8; new as usize];
        img.read_at(&mut back, 0).await.unwrap();
        assert!(back == shadow, "content after growing to {new}");
    }
    assert!(img.write_at(&[1], 6 << 20).await.is_err(), "past the end");
    img.close().await.unwrap();
    drop(img);
    let (new_l1_size, new_l1_off) = l1_fields(&p);
    assert_eq!(new_l1_size, 192, "6 MiB / 32 KiB per entry");
    assert_ne!(new_l1_off, l1_off, "the L1 table moved");
    assert_check_clean(Path::new(&p));
    assert_eq!(virtual_size(&p), 6 << 20);
    assert!(
        qemu_raw(Path::new(&p)) == shadow,
        "qemu reads what we wrote"
    );
}

#[tokio::test]
async fn grow_without_l1_growth_and_read_only_refused() {
    let d = tempfile::tempdir().unwrap();
    let p = path_in(d.path(), "s.qcow2");
    common::qemu_create(&p, "cluster_size=65536", "1M");
    let ro = Image::open(&p, &OpenOptions::new()).await.unwrap();
    assert!(ro.resize(2 << 20).await.is_err());
    drop(ro);
    let img = Image::open(&p, &OpenOptions::new().writable(true))
        .await
        .unwrap();
    assert!(
        img.resize((2 << 20) + 1).await.is_err(),
        "not a multiple of 512"
    );
    img.resize(300 << 20).await.unwrap();
    img.write_at(&[7; 4096], (300 << 20) - 4096).await.unwrap();
    assert!(img.resize(1 << 20).await.is_err(), "shrink not allowed");
    img.close().await.unwrap();
    drop(img);
    assert_eq!(l1_fields(&p), (1, l1_fields(&p).1));
    assert_check_clean(Path::new(&p));
    assert_eq!(virtual_size(&p), 300 << 20);
}

#[tokio::test]
async fn shrink_discards_the_tail() {
    let d = tempfile::tempdir().unwrap();
    let p = path_in(d.path(), "k.qcow2");
    common::qemu_create(&p, "cluster_size=4096", "4M");
    common::qemu_io(&p, &["write -P 5 0 4M"]);
    let img = Image::open(&p, &OpenOptions::new().writable(true))
        .await
        .unwrap();
    img.resize_with((1 << 20) + 1536, true).await.unwrap();
    assert!(img.read_at(&mut [0u8; 1], 2 << 20).await.is_err());
    // Growing again shows zeros past the old end, not the discarded data.
    img.resize(4 << 20).await.unwrap();
    let mut back = vec![0u8; 4 << 20];
    img.read_at(&mut back, 0).await.unwrap();
    let cut = (1 << 20) + 1536;
    assert!(back[..cut].iter().all(|&b| b == 5));
    assert!(back[cut..].iter().all(|&b| b == 0));
    img.close().await.unwrap();
    drop(img);
    assert_check_clean(Path::new(&p));
}

/// Run our resize on a copy and qemu-img's on another; both must be clean and identical.
fn same_as_qemu(d: &Path, src: &str, args: &[&str]) {
    let (ours, theirs) = (path_in(d, "ours.qcow2"), path_in(d, "theirs.qcow2"));
    std::fs::copy(src, &ours).unwrap();
    std::fs::copy(src, &theirs).unwrap();
    let mut a: Vec<&str> = vec!["resize"];
    a.extend_from_slice(&args[..args.len() - 1]);
    let size = args[args.len() - 1];
    let r = qcow2(&[a.as_slice(), &[ours.as_str(), size]].concat());
    let (code, _) = status(
        "qemu-img",
        &[a.as_slice(), &[theirs.as_str(), size]].concat(),
    );
    assert_eq!(r.code, code, "{args:?}: {}{}", r.stdout, r.stderr);
    if code == 0 {
        assert_eq!(r.stdout, "Image resized.\n");
    }
    assert_check_clean(Path::new(&ours));
    assert_eq!(virtual_size(&ours), virtual_size(&theirs), "{args:?}");
    // Not `-s`: allocation may differ (shrinking zeroes the partial last cluster, QEMU
    // keeps it as it is).
    let (c, text) = status("qemu-img", &["compare", &ours, &theirs]);
    assert_eq!(c, 0, "{args:?}: {text}");
}

#[test]
fn cli_matches_qemu_img_resize() {
    let d = tempfile::tempdir().unwrap();
    let src = path_in(d.path(), "src.qcow2");
    common::qemu_create(&src, "cluster_size=512", "40K");
    common::qemu_io(&src, &["write -P 3 0 40K"]);
    same_as_qemu(d.path(), &src, &["+3M"]);
    same_as_qemu(d.path(), &src, &["64M"]);
    same_as_qemu(d.path(), &src, &["40K"]);
    same_as_qemu(d.path(), &src, &["20K"]); // refused without --shrink
    same_as_qemu(d.path(), &src, &["--shrink", "20K"]);
    same_as_qemu(d.path(), &src, &["--shrink", "-8K"]);
    same_as_qemu(d.path(), &src, &["--shrink", "-1M"]); // not positive: refused
    let big = path_in(d.path(), "big.qcow2");
    common::qemu_create(&big, "cluster_size=65536", "64M");
    common::qemu_io(&big, &["write -P 4 10M 30M"]);
    same_as_qemu(d.path(), &big, &["--shrink", "20M"]);
    same_as_qemu(d.path(), &big, &["+10G"]);
}

#[test]
fn cli_raw_files() {
    let d = tempfile::tempdir().unwrap();
    let raw = path_in(d.path(), "r.raw");
    std::fs::write(&raw, [9u8; 1000]).unwrap();
    let r = qcow2(&["resize", "-f", "raw", &raw, "+24"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert_eq!(std::fs::metadata(&raw).unwrap().len(), 1024);
    assert_eq!(qcow2(&["resize", &raw, "100"]).code, 1);
    let r = qcow2(&["resize", "--shrink", &raw, "-1000"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert_eq!(std::fs::read(&raw).unwrap(), vec![9u8; 24]);
}

/// Power cuts at every point of a grow that moves the L1 table: the image always opens, has
/// no corruption, keeps its old data, and has the new size once resize returned.
#[tokio::test]
async fn crash_during_grow() {
    let d = tempfile::tempdir().unwrap();
    let p = path_in(d.path(), "c.qcow2");
    common::qemu_create(&p, "cluster_size=512,refcount_bits=16", "16K");
    common::qemu_io(&p, &["write -P 0x21 0 9K"]);
    let old = std::fs::read(&p).unwrap();
    let crash = Arc::new(CrashStorage::new(old));
    let storage: Arc<dyn Storage> = crash.clone();
    let opts = OpenOptions::new()
        .writable(true)
        .slice_size(512)
        .l2_cache_bytes(2048);
    let img = Image::open_storage(storage, &opts).await.unwrap();
    // Unflushed work in flight when the resize starts.
    img.write_at(&[0x77; 3000], 12 << 10).await.unwrap();
    img.resize(4 << 20).await.unwrap();
    let resized_at = crash.crash_points();
    img.write_at(&[0x55; 5000], (4 << 20) - 5000).await.unwrap();
    img.close().await.unwrap();
    drop(img);
    for point in 0..crash.crash_points() {
        for policy in [
            CrashPolicy::None,
            CrashPolicy::All,
            CrashPolicy::Subset(point as u64),
            CrashPolicy::SubsetTorn(point as u64),
        ] {
            let cut = crash.image_at(point, policy);
            let mem: Arc<dyn Storage> = Arc::new(MemoryStorage::from_vec(cut.clone()));
            let r = check(mem.clone(), &CheckOptions::default()).await.unwrap();
            assert_eq!(
                (r.corruptions, r.check_errors),
                (0, 0),
                "point {point} {policy:?}: {:?}",
                r.messages
            );
            let img = Image::open_storage(mem, &OpenOptions::new())
                .await
                .unwrap_or_else(|e| panic!("point {point} {policy:?}: {e}"));
            let mut back = vec![0u8; 9 << 10];
            img.read_at(&mut back, 0).await.unwrap();
            assert!(back.iter().all(|&b| b == 0x21), "old data at {point}");
            let size = img.virtual_size();
            assert!(size == 16 << 10 || size == 4 << 20, "size {size}");
            if point >= resized_at {
                assert_eq!(size, 4 << 20, "resize returned before point {point}");
            }
        }
    }
}

/// Writes running while the L1 table moves: the L2 tables they create in the old range
/// (dirty L1 entries during the switch) must reach the new table.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn writes_concurrent_with_grow() {
    let d = tempfile::tempdir().unwrap();
    let p = path_in(d.path(), "w.qcow2");
    common::qemu_create(&p, "cluster_size=512", "256K");
    let img = Image::open(&p, &OpenOptions::new().writable(true))
        .await
        .unwrap();
    let mut tasks = Vec::new();
    for i in 0..8u64 {
        let img = img.clone();
        tasks.push(tokio::spawn(async move {
            for k in 0..8u64 {
                let off = i * (32 << 10) + k * 4096;
                img.write_at(&pattern(1024, (i * 8 + k) as u8), off)
                    .await
                    .unwrap();
            }
        }));
    }
    img.resize(8 << 20).await.unwrap();
    for t in tasks {
        t.await.unwrap();
    }
    img.close().await.unwrap();
    drop(img);
    assert_check_clean(Path::new(&p));
    let data = qemu_raw(Path::new(&p));
    assert_eq!(data.len(), 8 << 20);
    for i in 0..8u64 {
        for k in 0..8u64 {
            let off = (i * (32 << 10) + k * 4096) as usize;
            let want = pattern(1024, (i * 8 + k) as u8);
            assert!(data[off..off + 1024] == want[..], "write {i}/{k}");
        }
    }
}
