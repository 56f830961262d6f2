//! Repairs are crash safe: cut the power at every point of a repair (dropping or tearing the
//! unflushed writes) and the image is never worse than before — it still opens, has no more
//! corruptions, a second repair makes it clean, and the guest data is unchanged.

use crate::common;
use common::bytes::poke;

use std::path::Path;
use std::sync::Arc;

use qcow2_engine::check::{CheckOptions, RepairMode, check, repair};
use qcow2_engine::storage::{CrashPolicy, CrashStorage, MemoryStorage};

/// Damage a fresh image with `damage(path, l2_table_offset, l1_table_offset)`.
fn damaged(dir: &Path, name: &str, damage: impl Fn(&Path, u64, u64)) -> Vec<u8> {
    let img = dir.join(name);
    let p = img.to_str().unwrap();
    let o = "cluster_size=4096";
    common::qemu_create(p, o, "4M");
    common::qemu_io(p, &["write -P 1 0 64k", "write -P 2 1M 8k"]);
    let bytes = std::fs::read(&img).unwrap();
    let be = |off: usize| u64::from_be_bytes(bytes[off..off + 8].try_into().unwrap());
    let l1 = be(40);
    let l2 = be(l1 as usize) & 0x00ff_ffff_ffff_fe00;
    damage(&img, l2, l1);
    std::fs::read(&img).unwrap()
}

async fn corruptions(image: Vec<u8>) -> u64 {
    let r = check(
        Arc::new(MemoryStorage::from_vec(image)),
        &CheckOptions::default(),
    )
    .await
    .unwrap();
    assert_eq!(r.check_errors, 0, "{:?}", r.messages);
    r.corruptions
}

/// Repair `image` under the crash simulator and examine every crash point.
async fn crash_everywhere(dir: &Path, image: Vec<u8>) {
    let raw_before = guest_data(dir, &image);
    let worst = corruptions(image.clone()).await;
    let crash = Arc::new(CrashStorage::new(image));
    repair(crash.clone(), RepairMode::All).await.unwrap();
    let points = crash.crash_points();
    assert!(points > 2, "the repair wrote something");
    for point in 0..points {
        for policy in [
            CrashPolicy::None,
            CrashPolicy::All,
            CrashPolicy::SubsetTorn(point as u64),
        ] {
            let cut = crash.image_at(point, policy);
            assert!(
                corruptions(cut.clone()).await <= worst,
                "point {point} {policy:?}"
            );
            let mem = Arc::new(MemoryStorage::from_vec(cut));
            let (_, after) = repair(mem.clone(), RepairMode::All).await.unwrap();
            assert!(
                after.is_clean(),
                "point {point} {policy:?}: {:?}",
                after.messages
            );
            if policy == CrashPolicy::SubsetTorn(point as u64) {
                assert_eq!(
                    guest_data(dir, &mem.snapshot()),
                    raw_before,
                    "point {point}"
                );
            }
        }
    }
}

/// The guest data of an image held in memory, by qemu-img.
fn guest_data(dir: &Path, image: &[u8]) -> Vec<u8> {
    let img = dir.join("probe.qcow2");
    std::fs::write(&img, image).unwrap();
    common::qemu_raw(&img)
}

#[tokio::test]
async fn rebuild_is_crash_safe() {
    let dir = tempfile::tempdir().unwrap();
    // Refcount block 0 pointing outside the file: only a rebuild repairs it.
    let image = damaged(dir.path(), "rb.qcow2", |img, _, _| {
        let bytes = std::fs::read(img).unwrap();
        let reftable = u64::from_be_bytes(bytes[48..56].try_into().unwrap());
        poke(img, reftable, &(1u64 << 30).to_be_bytes());
    });
    crash_everywhere(dir.path(), image).await;
}

#[tokio::test]
async fn raise_lower_and_flag_repairs_are_crash_safe() {
    let dir = tempfile::tempdir().unwrap();
    // An L2 entry pointing at the L1 table: raise, lower and COPIED repairs all happen.
    let image = damaged(dir.path(), "l2.qcow2", |img, l2, l1| {
        poke(img, l2 + 8, &((1u64 << 63) | l1).to_be_bytes());
    });
    crash_everywhere(dir.path(), image).await;
}
