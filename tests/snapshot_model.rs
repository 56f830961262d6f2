//! A property test of internal snapshots: 50 random steps of writes, zeroes, discards,
//! snapshot creates, applies and deletes (with reopens in between) through the library, a
//! shadow copy of the disk per snapshot; then `qemu-img check` is clean and QEMU reads every
//! snapshot and the active disk as their shadows say. `QCOW2_TEST_SEED=<n>` replays a run.

use std::path::Path;

use crate::common::{self, qemu_create, run};
use qcow2_engine::image::{Image, OpenOptions, ZeroFlags};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

const SIZE: u64 = 1 << 20;
const STEPS: usize = 50;

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

async fn open(img: &Path) -> Image {
    let opts = OpenOptions::new().writable(true).flush_interval(None);
    Image::open(img, &opts).await.unwrap()
}

/// A random write, zero or discard on both the image and the shadow.
async fn change(img: &Image, shadow: &mut [u8], rng: &mut StdRng, step: usize) {
    let len = rng.gen_range(1..=16384u64);
    let off = rng.gen_range(0..=SIZE - len);
    let range = off as usize..(off + len) as usize;
    match rng.gen_range(0..4) {
        0 => {
            let flags = ZeroFlags {
                may_unmap: rng.gen_bool(0.5),
            };
            img.write_zeroes(off, len, flags).await.unwrap();
            shadow[range].fill(0);
        }
        1 => {
            img.discard(off, len).await.unwrap();
            shadow[range].fill(0);
        }
        _ => {
            let data = vec![(step as u8) | 0x80; len as usize];
            img.write_at(&data, off).await.unwrap();
            shadow[range].copy_from_slice(&data);
        }
    }
}

async fn read_all(img: &Image) -> Vec<u8> {
    let mut buf = vec![0u8; SIZE as usize];
    img.read_at(&mut buf, 0).await.unwrap();
    buf
}

/// QEMU's view of snapshot `id` (or of the active disk).
fn qemu_view(img: &Path, id: Option<&str>) -> Vec<u8> {
    let out = img.with_extension("view.raw");
    let snap = id.map(|i| format!("snapshot.id={i}"));
    let mut args = vec!["convert"];
    if let Some(a) = &snap {
        args.extend(["-l", a]);
    }
    args.extend(["-O", "raw", s(img), s(&out)]);
    run("qemu-img", &args);
    let data = std::fs::read(&out).unwrap();
    std::fs::remove_file(&out).ok();
    data
}

async fn model(opts: &str, seed: u64) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("m.qcow2");
    qemu_create(&path, opts, SIZE);
    let mut rng = StdRng::seed_from_u64(seed);
    let mut shadow = vec![0u8; SIZE as usize];
    // (id, shadow) of each snapshot.
    let mut snaps: Vec<(String, Vec<u8>)> = Vec::new();
    let mut img = open(&path).await;
    for step in 0..STEPS {
        let ctx = format!("{opts} seed {seed} step {step}");
        match rng.gen_range(0..10) {
            0..=3 => change(&img, &mut shadow, &mut rng, step).await,
            4..=5 if snaps.len() < 6 => {
                let snap = img.create_snapshot(&format!("s{step}")).await.unwrap();
                snaps.push((snap.id, shadow.clone()));
            }
            6..=7 if !snaps.is_empty() => {
                let i = rng.gen_range(0..snaps.len());
                img.apply_snapshot(&snaps[i].0).await.unwrap();
                shadow = snaps[i].1.clone();
                assert!(read_all(&img).await == shadow, "{ctx}: active after apply");
            }
            8 if !snaps.is_empty() => {
                let i = rng.gen_range(0..snaps.len());
                img.delete_snapshot(&snaps[i].0).await.unwrap();
                snaps.remove(i);
            }
            _ => {
                img.close().await.unwrap();
                img = open(&path).await;
            }
        }
    }
    assert!(read_all(&img).await == shadow, "{opts} seed {seed}: active");
    img.close().await.unwrap();
    common::assert_check_clean(&path);
    let ids: Vec<String> = Image::open(&path, &OpenOptions::new())
        .await
        .unwrap()
        .snapshots()
        .await
        .unwrap()
        .into_iter()
        .map(|s| s.id)
        .collect();
    assert_eq!(ids, snaps.iter().map(|s| s.0.clone()).collect::<Vec<_>>());
    for (id, data) in &snaps {
        assert!(
            qemu_view(&path, Some(id)) == *data,
            "{opts} seed {seed}: snapshot {id}"
        );
    }
    assert!(
        qemu_view(&path, None) == shadow,
        "{opts} seed {seed}: active by QEMU"
    );
}

fn seed() -> u64 {
    std::env::var("QCOW2_TEST_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(rand::random)
}

#[tokio::test]
async fn random_snapshot_cycles_4k_clusters() {
    model("cluster_size=4k", seed()).await;
}

#[tokio::test]
async fn random_snapshot_cycles_512b_clusters_refcount_16() {
    model("cluster_size=512,refcount_bits=16", seed()).await;
}

#[tokio::test]
async fn random_snapshot_cycles_extended_l2() {
    model("cluster_size=16k,extended_l2=on", seed()).await;
}

#[tokio::test]
async fn random_snapshot_cycles_v2_image() {
    model("compat=0.10,cluster_size=4k", seed()).await;
}
