//! Power cuts while we maintain bitmaps: a session (open, writes, flush, more writes, close)
//! runs on the crash-recording storage; at every recorded point, with several choices of
//! which unflushed writes survive, the image must pass `qemu-img check` without corruption
//! (leaks allowed) and each bitmap must be either marked in use (inconsistent) or correct:
//! the enabled one covering what QEMU wrote before plus everything we wrote, the disabled one
//! unchanged. Our read-only reader checks every point; QEMU (`qemu-nbd -B`) a sample.

use crate::bitmaps::{expected, qemu_dirty};
use crate::common::{self, path_in, run};

use std::sync::Arc;

use qcow2_engine::Storage;
use qcow2_engine::image::{Image, OpenOptions, ZeroFlags};
use qcow2_engine::storage::crash::LoggedOp;
use qcow2_engine::storage::{CrashPolicy, CrashStorage, MemoryStorage};

const SIZE: u64 = 4 << 20;
const WRITES: [(u64, u64); 3] = [(100, 5000), (1 << 20, 64 << 10), (3 << 20, 1)];

fn opts() -> OpenOptions {
    OpenOptions::new().writable(true).locking(false)
}

/// The bitmaps (name, in_use, dirty ranges) our read-only reader sees in `bytes`.
async fn read_bitmaps(bytes: Vec<u8>) -> Vec<(String, bool, Vec<(u64, u64)>)> {
    let s: Arc<dyn Storage> = Arc::new(MemoryStorage::from_vec(bytes));
    let img = Image::open_storage(s, &OpenOptions::new().locking(false))
        .await
        .unwrap();
    let mut out = Vec::new();
    for b in img.bitmaps().await.unwrap() {
        let extents = match b.in_use {
            true => Vec::new(),
            false => img.bitmap_extents(&b.name).await.unwrap(),
        };
        out.push((b.name, b.in_use, extents));
    }
    out
}

#[tokio::test]
async fn every_power_cut_leaves_bitmaps_correct_or_in_use() {
    let dir = tempfile::tempdir().unwrap();
    let img = path_in(dir.path(), "c.qcow2");
    common::qemu_create(&img, "cluster_size=4k", SIZE);
    run("qemu-img", &["bitmap", "--add", "-g", "4k", &img, "on"]);
    run("qemu-img", &["bitmap", "--add", "-g", "512", &img, "off"]);
    common::qemu_io(&img, &["write 2M 10k"]);
    run("qemu-img", &["bitmap", "--disable", &img, "off"]);
    let before_on = qemu_dirty(&img, "on");
    let before_off = qemu_dirty(&img, "off");

    let crash = Arc::new(CrashStorage::new(std::fs::read(&img).unwrap()));
    let w = Image::open_storage(crash.clone(), &opts()).await.unwrap();
    w.write_at(&vec![1; WRITES[0].1 as usize], WRITES[0].0)
        .await
        .unwrap();
    w.flush().await.unwrap();
    w.write_zeroes(WRITES[1].0, WRITES[1].1, ZeroFlags { may_unmap: true })
        .await
        .unwrap();
    w.write_at(&[2], WRITES[2].0).await.unwrap();
    w.close().await.unwrap();

    let want_on = expected(&before_on, &WRITES, 4096, SIZE);
    let points = crash.crash_points();
    let first_flush = crash
        .log()
        .iter()
        .position(|op| *op == LoggedOp::Flush)
        .unwrap();
    let mut consistent_points = 0;
    for p in 0..points {
        let policies = [
            CrashPolicy::All,
            CrashPolicy::SubsetTorn(p as u64),
            CrashPolicy::None,
        ];
        for policy in policies {
            let bytes = crash.image_at(p, policy);
            let f = path_in(dir.path(), "cut.qcow2");
            std::fs::write(&f, &bytes).unwrap();
            let (code, out) = common::status("qemu-img", &["check", &f]);
            assert!(code == 0 || code == 3, "point {p} {policy:?}: {out}");
            for (name, in_use, got) in read_bitmaps(bytes).await {
                let want = if name == "on" { &want_on } else { &before_off };
                if name == "off" {
                    assert!(!in_use, "point {p}: the disabled bitmap was marked in use");
                }
                if !in_use {
                    // Before our open and after our close the stored bits are exact; in
                    // between the enabled bitmap is in use.
                    // Until the in-use mark is durable no guest write has been issued.
                    let early = p <= first_flush && name == "on" && got == before_on;
                    assert!(
                        got == *want || early,
                        "point {p} {policy:?}: bitmap {name}: {got:?}"
                    );
                    if name == "on" && !early {
                        consistent_points += 1;
                        if consistent_points % 8 == 1 {
                            assert_eq!(qemu_dirty(&f, "on"), *want, "point {p} {policy:?}");
                        }
                    }
                }
            }
        }
    }
    assert!(
        consistent_points > 0,
        "the close never stored the bitmap ({points} points)"
    );
}
