//! Snapshot create, delete and apply under the power-cut simulator: at every recorded crash
//! point (dropping, keeping, or keeping a torn subset of the unflushed writes) the image is
//! either the old state or the new one — the snapshot list, the active disk and every
//! snapshot's content, all read by QEMU — and `qemu-img check` finds no corruption. Leaks are
//! allowed, and so is the one window QEMU shares (see `image/snapshot/mod.rs`): a COPIED
//! flag disagreeing with a raised or lowered refcount, which `check -r all` repairs.

use std::path::Path;
use std::sync::Arc;

use crate::common::{self, qemu_create, qemu_io, run, status};
use qcow2_engine::Storage;
use qcow2_engine::image::{Image, OpenOptions};
use qcow2_engine::storage::{CrashPolicy, CrashStorage};

/// What QEMU sees in an image: snapshot names, active disk, each snapshot's disk.
#[derive(Debug, PartialEq, Eq)]
struct State {
    names: Vec<String>,
    active: Vec<u8>,
    snaps: Vec<Vec<u8>>,
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn raw_of(img: &Path, snapshot: Option<&str>) -> Vec<u8> {
    let out = img.with_extension("out.raw");
    let mut args = vec!["convert".to_string()];
    if let Some(n) = snapshot {
        args.extend(["-l".into(), format!("snapshot.name={n}")]);
    }
    args.extend(["-O", "raw", s(img), s(&out)].map(String::from));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    run("qemu-img", &args);
    let data = std::fs::read(&out).unwrap();
    std::fs::remove_file(&out).ok();
    data
}

fn state_of(img: &Path) -> State {
    let list = run("qemu-img", &["snapshot", "-l", s(img)]);
    let names: Vec<String> = list
        .lines()
        .skip(2)
        .filter_map(|l| l.split_whitespace().nth(1).map(String::from))
        .collect();
    let snaps = names.iter().map(|n| raw_of(img, Some(n))).collect();
    State {
        names,
        active: raw_of(img, None),
        snaps,
    }
}

/// `qemu-img check` finds no corruption but COPIED-flag disagreements, and `-r all` leaves
/// the image clean.
fn assert_no_corruption(img: &Path, at: &str) {
    let (code, text) = status("qemu-img", &["check", s(img)]);
    if code == 0 || code == 3 {
        return;
    }
    for line in text.lines().filter(|l| l.starts_with("ERROR")) {
        assert!(line.contains("OFLAG_COPIED"), "{at}: {text}");
    }
    let (code, text) = status("qemu-img", &["check", "-r", "all", s(img)]);
    assert_eq!(code, 0, "{at}: repair: {text}");
}

/// Run `op` on `image` under the crash simulator; check every cut against `old` and `new`.
async fn crash_everywhere<F, Fut>(dir: &Path, image: Vec<u8>, op: F)
where
    F: FnOnce(Image) -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    let probe = dir.join("probe.qcow2");
    std::fs::write(&probe, &image).unwrap();
    let old = state_of(&probe);
    let crash = Arc::new(CrashStorage::new(image));
    let storage: Arc<dyn Storage> = crash.clone();
    let opts = OpenOptions::new().writable(true).flush_interval(None);
    let img = Image::open_storage(storage, &opts).await.unwrap();
    op(img.clone()).await;
    img.close().await.unwrap();
    std::fs::write(
        &probe,
        crash.image_at(crash.crash_points() - 1, CrashPolicy::All),
    )
    .unwrap();
    let new = state_of(&probe);
    assert_ne!(old, new, "the operation changed nothing");
    let points = crash.crash_points();
    for point in 0..points {
        for policy in [
            CrashPolicy::None,
            CrashPolicy::All,
            CrashPolicy::SubsetTorn(point as u64),
        ] {
            let at = format!("point {point}/{points} {policy:?}");
            std::fs::write(&probe, crash.image_at(point, policy)).unwrap();
            let got = state_of(&probe);
            assert!(
                got == old || got == new,
                "{at}: neither old nor new: {:?}",
                got.names
            );
            assert_no_corruption(&probe, &at);
        }
    }
}

/// A 1 MiB image (`opts`, clusters of `cluster` bytes): data, a zero cluster, a compressed
/// cluster, and a snapshot made by qemu-img ("q") followed by more writes.
fn image_with(dir: &Path, opts: &str, cluster: &str) -> Vec<u8> {
    let img = dir.join("base.qcow2");
    qemu_create(&img, opts, "1M");
    let compressed = format!("write -c -P 2 64k {cluster}");
    qemu_io(&img, &["write -P 1 0 16k", &compressed, "write -z 128k 4k"]);
    run("qemu-img", &["snapshot", "-c", "q", s(&img)]);
    qemu_io(&img, &["write -P 3 4k 4k", "write -P 4 512k 8k"]);
    common::assert_check_clean(&img);
    std::fs::read(&img).unwrap()
}

fn image(dir: &Path) -> Vec<u8> {
    image_with(dir, "cluster_size=4k", "4k")
}

#[tokio::test]
async fn create_is_crash_safe() {
    let dir = tempfile::tempdir().unwrap();
    let image = image(dir.path());
    crash_everywhere(dir.path(), image, async |img| {
        img.create_snapshot("new").await.unwrap();
    })
    .await;
}

#[tokio::test]
async fn delete_is_crash_safe() {
    let dir = tempfile::tempdir().unwrap();
    let image = image(dir.path());
    crash_everywhere(dir.path(), image, async |img| {
        img.delete_snapshot("q").await.unwrap();
    })
    .await;
}

#[tokio::test]
async fn apply_is_crash_safe() {
    let dir = tempfile::tempdir().unwrap();
    let image = image(dir.path());
    crash_everywhere(dir.path(), image, async |img| {
        img.apply_snapshot("q").await.unwrap();
    })
    .await;
}

#[tokio::test]
async fn create_and_apply_are_crash_safe_on_512_byte_clusters() {
    let dir = tempfile::tempdir().unwrap();
    let image = image_with(dir.path(), "cluster_size=512", "512");
    crash_everywhere(dir.path(), image.clone(), async |img| {
        img.create_snapshot("new").await.unwrap();
    })
    .await;
    crash_everywhere(dir.path(), image, async |img| {
        img.apply_snapshot("q").await.unwrap();
    })
    .await;
}

#[tokio::test]
async fn delete_is_crash_safe_with_extended_l2() {
    let dir = tempfile::tempdir().unwrap();
    let image = image_with(dir.path(), "cluster_size=16k,extended_l2=on", "16k");
    crash_everywhere(dir.path(), image, async |img| {
        img.delete_snapshot("q").await.unwrap();
    })
    .await;
}
