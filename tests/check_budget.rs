//! The check's work budget and progress: small crafted images whose metadata names the same
//! tables over and over (QEMU's check algorithm walks a table once per reference) fail fast
//! with a clear error, in `check`, in `qcow2 check` and in the refcount rebuild of a dirty
//! image's writable open; honest images (snapshots sharing L2 tables, compressed clusters)
//! check exactly as `qemu-img check` does; a check can be dropped mid-walk.
//!
//! Before the budget, the first three images kept `qcow2 check` (and the writable open) busy
//! for over a minute each (measured with a 60 s timeout; the walk was hours long).

use crate::common;

use std::os::unix::fs::FileExt;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{path_in, run};
use qcow2_engine::ErrorKind;
use qcow2_engine::check::{CheckOptions, Progress, check};
use qcow2_engine::image::{Image, OpenOptions};
use qcow2_engine::storage::memory::MemoryStorage;

/// Generous bound on a budgeted check of the crafted images (they take well under a second
/// in a debug build; the old code did not finish in 60 s).
const FAST: Duration = Duration::from_secs(20);

/// A 512 TiB image of 64 KiB clusters (a 1 Mi-entry, 8 MiB L1 table) with its first cluster
/// written (0xab): returns (l1_size, l1_offset, l1 entry 0).
fn base(img: &str) -> (u32, u64, u64) {
    run("qemu-img", &["create", "-q", "-f", "qcow2", img, "512T"]);
    run("qemu-io", &["-c", "write -P 0xab 0 64k", img]);
    let f = std::fs::File::open(img).unwrap();
    let mut b = [0u8; 12];
    f.read_exact_at(&mut b, 36).unwrap();
    let l1_size = u32::from_be_bytes(b[..4].try_into().unwrap());
    let l1_offset = u64::from_be_bytes(b[4..].try_into().unwrap());
    let mut e = [0u8; 8];
    f.read_exact_at(&mut e, l1_offset).unwrap();
    (l1_size, l1_offset, u64::from_be_bytes(e))
}

/// Every one of the million L1 entries names the one L2 table: an 8 MiB file whose walk
/// visits 8 Gi L2 entries.
fn same_l2_everywhere(img: &str) {
    let (n, l1, e0) = base(img);
    let f = std::fs::OpenOptions::new().write(true).open(img).unwrap();
    f.write_all_at(&e0.to_be_bytes().repeat(n as usize), l1)
        .unwrap();
}

/// `count` snapshots that all name the active (8 MiB) L1 table: each makes the walk read and
/// scan it again.
fn snapshots_sharing_the_l1(img: &str, count: u32) {
    let (n, l1, _) = base(img);
    let f = std::fs::OpenOptions::new().write(true).open(img).unwrap();
    let table = f.metadata().unwrap().len().next_multiple_of(65536);
    let mut entry = Vec::new();
    entry.extend_from_slice(&l1.to_be_bytes());
    entry.extend_from_slice(&n.to_be_bytes());
    entry.extend_from_slice(&1u16.to_be_bytes()); // id length
    entry.extend_from_slice(&1u16.to_be_bytes()); // name length
    entry.extend_from_slice(&[0; 20]); // dates, VM clock, VM state size
    entry.extend_from_slice(&16u32.to_be_bytes()); // extra data: VM state, disk size
    entry.extend_from_slice(&0u64.to_be_bytes());
    entry.extend_from_slice(&(512u64 << 40).to_be_bytes());
    entry.extend_from_slice(b"1s");
    entry.resize(entry.len().next_multiple_of(8), 0);
    f.write_all_at(&entry.repeat(count as usize), table)
        .unwrap();
    f.write_all_at(&count.to_be_bytes(), 60).unwrap();
    f.write_all_at(&table.to_be_bytes(), 64).unwrap();
}

/// Set the dirty bit (lazy refcounts not written back).
fn mark_dirty(img: &str) {
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(img)
        .unwrap();
    let mut b = [0u8; 8];
    f.read_exact_at(&mut b, 72).unwrap();
    let bits = u64::from_be_bytes(b) | 1;
    f.write_all_at(&bits.to_be_bytes(), 72).unwrap();
}

/// Our check of `img` under a [`FAST`] timeout.
async fn timed_check(img: &str, opts: &CheckOptions) -> qcow2_engine::Result<()> {
    let s = common::storage(img.as_ref(), true);
    let t = Instant::now();
    let r = tokio::time::timeout(FAST, check(s, opts))
        .await
        .expect("the check must be bounded by its work budget");
    eprintln!("check took {:?}", t.elapsed());
    r.map(|_| ())
}

/// `qcow2 check IMG` under GNU time: (exit code, stderr, seconds, peak RSS KiB), or `None`
/// without /usr/bin/time.
fn cli_check_measured(img: &str) -> Option<(i32, String, f64, u64)> {
    let out = std::process::Command::new("/usr/bin/time")
        .args(["-f", "%e %M", "timeout", "60"])
        .args([env!("CARGO_BIN_EXE_qcow2"), "check", img])
        .output()
        .ok()?;
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    let last = stderr.lines().last()?.to_string();
    let (secs, rss) = last.split_once(' ')?;
    let code = out.status.code().unwrap_or(-1);
    Some((code, stderr, secs.parse().ok()?, rss.parse().ok()?))
}

fn assert_budget_error(r: qcow2_engine::Result<()>) {
    let err = r.expect_err("a crafted image must exceed the default work budget");
    assert_eq!(err.kind(), ErrorKind::Corrupt, "{err}");
    assert!(err.what().contains("max_work"), "{err}");
}

#[tokio::test]
async fn an_l1_naming_one_l2_table_a_million_times_fails_fast() {
    let dir = tempfile::tempdir().unwrap();
    let img = path_in(dir.path(), "same-l2.qcow2");
    same_l2_everywhere(&img);
    assert_budget_error(timed_check(&img, &CheckOptions::default()).await);
    let Some((code, stderr, secs, rss)) = cli_check_measured(&img) else {
        eprintln!("no /usr/bin/time: skipping the CLI measurement");
        return;
    };
    eprintln!("qcow2 check: {secs} s, {rss} KiB");
    assert_eq!(code, 1, "{stderr}");
    assert!(stderr.contains("max_work"), "{stderr}");
    assert!(secs < FAST.as_secs_f64(), "{secs} s");
    assert!(rss < 100 << 10, "peak RSS {rss} KiB");
}

#[tokio::test]
async fn snapshots_sharing_one_huge_l1_table_fail_fast() {
    let dir = tempfile::tempdir().unwrap();
    let img = path_in(dir.path(), "snapshots.qcow2");
    snapshots_sharing_the_l1(&img, 20000);
    assert_budget_error(timed_check(&img, &CheckOptions::default()).await);
}

#[tokio::test]
async fn a_dirty_crafted_image_fails_its_writable_open_fast_and_keeps_its_data() {
    let dir = tempfile::tempdir().unwrap();
    let img = path_in(dir.path(), "dirty.qcow2");
    same_l2_everywhere(&img);
    mark_dirty(&img);
    let before = std::fs::read(&img).unwrap();
    let rw = OpenOptions::new().writable(true);
    let open = tokio::time::timeout(FAST, Image::open(&img, &rw))
        .await
        .expect("the rebuild at open must be bounded by the work budget");
    let Err(err) = open else {
        panic!("the rebuild must refuse the image");
    };
    assert_eq!(err.kind(), ErrorKind::Corrupt, "{err}");
    assert!(err.what().contains("max_work"), "{err}");
    assert!(
        std::fs::read(&img).unwrap() == before,
        "the failed open changed the file"
    );
    // Read-only it still opens, and reads what QEMU reads.
    run("qemu-io", &["-r", "-c", "read -P 0xab 0 64k", &img]);
    let img = Image::open(&img, &OpenOptions::new()).await.unwrap();
    let mut buf = vec![0u8; 65536];
    img.read_at(&mut buf, 0).await.unwrap();
    assert!(buf.iter().all(|&b| b == 0xab));
    img.close().await.unwrap();
}

#[tokio::test]
async fn honest_snapshots_check_like_qemu_with_progress_and_budget() {
    let dir = tempfile::tempdir().unwrap();
    let img = path_in(dir.path(), "honest.qcow2");
    run("qemu-img", &["create", "-q", "-f", "qcow2", &img, "64M"]);
    for i in 0..24 {
        let write = format!("write -P {i} {}M 64k", i % 8);
        run("qemu-io", &["-c", &write, &img]);
        run("qemu-img", &["snapshot", "-c", &format!("s{i}"), &img]);
    }
    run("qemu-io", &["-c", "write -c 8M 64k", &img]);
    let (_, want) = common::qemu_check(img.as_ref(), &[]);
    let progress = Progress::new();
    let opts = CheckOptions {
        progress: Some(progress.clone()),
        ..CheckOptions::default()
    };
    let got = check(common::storage(img.as_ref(), true), &opts)
        .await
        .unwrap();
    assert_eq!(
        (got.corruptions, got.leaks, got.check_errors),
        (want.corruptions, want.leaks, want.check_errors)
    );
    assert_eq!(
        (got.allocated_clusters, got.fragmented_clusters),
        (want.allocated_clusters, want.fragmented_clusters)
    );
    assert_eq!(got.compressed_clusters, want.compressed_clusters);
    assert_eq!(got.image_end_offset, want.image_end_offset);
    let done = progress.done();
    assert!(done > 0 && done == progress.total());
    // The snapshots' L2 walks are counted: an explicit budget below them is refused.
    let opts = CheckOptions {
        max_work: Some(done / 2),
        ..CheckOptions::default()
    };
    let err = check(common::storage(img.as_ref(), true), &opts)
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::InvalidArgument);
    assert!(err.what().contains("max_work"), "{err}");
}

#[tokio::test]
async fn a_dropped_check_stops_walking() {
    let dir = tempfile::tempdir().unwrap();
    let img = path_in(dir.path(), "cancel.qcow2");
    same_l2_everywhere(&img);
    // In memory every read completes at once: only the meter's yields let the timeout in.
    let mem = MemoryStorage::from_vec(std::fs::read(&img).unwrap());
    let progress = Progress::new();
    let opts = CheckOptions {
        max_work: Some(u64::MAX),
        progress: Some(progress.clone()),
        ..CheckOptions::default()
    };
    let r = tokio::time::timeout(Duration::from_millis(300), check(Arc::new(mem), &opts)).await;
    assert!(r.is_err(), "the unbounded walk cannot finish in 300 ms");
    let stopped = progress.done();
    assert!(stopped > 0 && stopped < progress.total());
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(progress.done(), stopped, "the dropped check kept walking");
}

#[test]
fn a_snapshot_table_over_64_mib_is_refused_in_bounded_memory() {
    let dir = tempfile::tempdir().unwrap();
    let img = path_in(dir.path(), "bomb.qcow2");
    run("qemu-img", &["create", "-q", "-f", "qcow2", &img, "1M"]);
    // 2048 entries with 64 KiB ids and names of 0xff (not UTF-8): a 256 MiB table.
    let f = std::fs::OpenOptions::new().write(true).open(&img).unwrap();
    let table: u64 = 1 << 20;
    let mut entry = vec![0u8; 40];
    entry[12..16].copy_from_slice(&[0xff; 4]); // id and name lengths: 65535
    entry.resize(40 + 2 * 65535, 0xff);
    let stride = (entry.len() as u64).next_multiple_of(8);
    for i in 0..2048 {
        f.write_all_at(&entry, table + i * stride).unwrap();
    }
    f.write_all_at(&2048u32.to_be_bytes(), 60).unwrap();
    f.write_all_at(&table.to_be_bytes(), 64).unwrap();
    drop(f);
    let (code, _) = common::status("qemu-img", &["check", &img]);
    assert_eq!(code, 1, "QEMU cannot check it either");
    let Some((code, stderr, _, rss)) = cli_check_measured(&img) else {
        eprintln!("no /usr/bin/time: skipping the CLI measurement");
        return;
    };
    assert_eq!(code, 1, "{stderr}");
    assert!(stderr.contains("larger than 64 MiB"), "{stderr}");
    assert!(rss < 100 << 10, "peak RSS {rss} KiB");
}
