//! `qcow2 amend` against `qemu-img amend` on copies of the same images: same exit code,
//! stdout and stderr; afterwards the same settings (`qemu-img info`'s format-specific data),
//! the same guest content (`qemu-img compare`) and a clean `qemu-img check`. Variants: 64 KiB
//! and 512 B clusters, refcount widths 1 and 16, v2 and v3, extended L2, compressed and zero
//! clusters, a backing file. Plus power cuts at every point of a refcount-width change.

use std::path::Path;
use std::sync::Arc;

use crate::common::chain::{LayerSpec, assert_same_image, both, io, make_chain, twin};
use crate::common::{qemu_raw, run};
use qcow2_engine::check::{CheckOptions, change_refcount_width, check};
use qcow2_engine::storage::{CrashPolicy, CrashStorage, MemoryStorage};

/// img.qcow2 (8 MiB, `opts`) with data, zero, compressed and discarded clusters, over
/// base.qcow2 when `backing`.
fn image(dir: &Path, opts: &str, backing: bool) {
    let mut top_opts = opts.to_string();
    if backing {
        let b = "backing_file=base.qcow2,backing_fmt=qcow2";
        top_opts = if opts.is_empty() {
            b.into()
        } else {
            format!("{opts},{b}")
        };
    }
    let layers = [
        LayerSpec {
            name: "base.qcow2",
            format: "qcow2",
            opts: String::new(),
            io: io(&["write -P 1 0 8M"]),
        },
        LayerSpec {
            name: "img.qcow2",
            format: "qcow2",
            opts: top_opts,
            io: io(&[
                "write -P 3 512k 600k",
                "write -z 3M 128k",
                "write -c -P 4 4M 64k",
                "discard 1M 64k",
                "write -P 5 6000 3000",
            ]),
        },
    ];
    make_chain(dir, &layers, "8M");
}

/// The settings `qemu-img info` reports.
fn settings(img: &Path) -> serde_json::Value {
    let info = run(
        "qemu-img",
        &["info", "--output=json", img.to_str().unwrap()],
    );
    let v: serde_json::Value = serde_json::from_str(&info).unwrap();
    let mut data = v["format-specific"]["data"].clone();
    data.as_object_mut().map(|o| o.remove("bitmaps"));
    serde_json::json!({"size": v["virtual-size"], "data": data, "backing": v["backing-filename"]})
}

/// `amend -o OPTS img.qcow2` with both tools on copies of a fresh image; everything must
/// match. Returns the exit code.
fn amend_both(opts: &str, backing: bool, amend: &str) -> i32 {
    let dir = tempfile::tempdir().unwrap();
    image(dir.path(), opts, backing);
    let (theirs, ours) = twin(dir.path());
    let (code, o, t) = both(&theirs, &ours, &["amend", "-o", amend, "img.qcow2"]);
    assert_eq!(o, t, "{opts} / {amend}: stderr");
    let (ti, oi) = (theirs.join("img.qcow2"), ours.join("img.qcow2"));
    assert_eq!(settings(&oi), settings(&ti), "{opts} / {amend}");
    assert_same_image(&theirs, &ours, "img.qcow2", "qcow2");
    code
}

#[test]
fn amend_matches_qemu_img() {
    let mut cases = Vec::new();
    for (opts, amends) in [
        (
            "",
            &[
                "compat=0.10",
                "lazy_refcounts=on",
                "refcount_bits=1",
                "refcount_bits=64",
            ][..],
        ),
        (
            "cluster_size=512",
            &["compat=0.10", "refcount_bits=8", "size=16M"],
        ),
        (
            "refcount_bits=1",
            &["refcount_bits=16", "refcount_bits=16,compat=0.10"],
        ),
        (
            "compat=0.10",
            &["compat=1.1", "compat=v3,lazy_refcounts=on", "size=4M"],
        ),
        ("extended_l2=on", &["refcount_bits=8", "lazy_refcounts=on"]),
        ("lazy_refcounts=on", &["lazy_refcounts=off", "compat=0.10"]),
    ] {
        for amend in amends {
            // A backing file changes what a downgrade writes (zero data, not holes).
            let backings: &[bool] = match amend.contains("compat=0.10") {
                true => &[false, true],
                false => &[false],
            };
            for &backing in backings {
                cases.push((opts, backing, *amend));
            }
        }
    }
    // Each case spends its time waiting on qemu-img/qemu-io processes: run a few side by side.
    for batch in cases.chunks(6) {
        std::thread::scope(|s| {
            let runs: Vec<_> = batch
                .iter()
                .map(|&(opts, backing, amend)| {
                    s.spawn(move || (opts, amend, amend_both(opts, backing, amend)))
                })
                .collect();
            for run in runs {
                let (opts, amend, code) = run.join().expect("amend case panicked");
                assert_eq!(code, 0, "{opts} / {amend}");
            }
        });
    }
}

#[test]
fn amend_refusals_match_qemu_img() {
    for (opts, amend) in [
        ("compat=0.10", "refcount_bits=1"),
        ("", "refcount_bits=3"),
        ("cluster_size=512", "refcount_bits=2"),
        ("", "cluster_size=4k"),
        ("", "extended_l2=on"),
        ("", "preallocation=full"),
        ("", "backing_file=other.qcow2"),
        ("", "data_file=d.raw"),
        ("", "data_file_raw=on"),
        ("", "foo=bar"),
        ("", "compat=2"),
        ("", "lazy_refcounts=maybe"),
        ("", "refcount_bits=abc"),
        ("", "lazy_refcounts=on,compat=0.10"),
        ("refcount_bits=1", "compat=0.10"),
        ("extended_l2=on", "compat=0.10"),
        ("", ""),
    ] {
        assert_eq!(amend_both(opts, false, amend), 1, "{opts} / {amend}");
    }
    let dir = tempfile::tempdir().unwrap();
    image(dir.path(), "", false);
    let (theirs, ours) = twin(dir.path());
    for args in [
        &["amend", "img.qcow2"][..],
        &["amend", "-f", "raw", "-o", "compat=0.10", "base.qcow2"],
    ] {
        let (code, o, t) = both(&theirs, &ours, args);
        assert_eq!(code, 1);
        assert_eq!(o.lines().next(), t.lines().next(), "{args:?}");
    }
}

/// Power cuts at every point of a refcount-width change: the image never has a corruption
/// (leaks at most), reads the same, and has the old or the new width.
#[tokio::test]
async fn refcount_width_change_is_crash_safe() {
    let dir = tempfile::tempdir().unwrap();
    // 16 compressed payloads share a host cluster: 8 bits hold their count, 1 would not.
    for (opts, bits) in [
        ("cluster_size=4096", 8u32),
        ("cluster_size=4096,refcount_bits=1", 64),
    ] {
        image(dir.path(), opts, false);
        let path = dir.path().join("img.qcow2");
        let before = qemu_raw(&path);
        let crash = Arc::new(CrashStorage::new(std::fs::read(&path).unwrap()));
        change_refcount_width(crash.clone(), bits).await.unwrap();
        let points = crash.crash_points();
        assert!(points > 2);
        for point in 0..points {
            for policy in [
                CrashPolicy::None,
                CrashPolicy::All,
                CrashPolicy::SubsetTorn(point as u64),
            ] {
                let cut = crash.image_at(point, policy);
                let r = check(
                    Arc::new(MemoryStorage::from_vec(cut.clone())),
                    &CheckOptions::default(),
                )
                .await
                .unwrap();
                assert_eq!(
                    (r.corruptions, r.check_errors),
                    (0, 0),
                    "{opts} point {point} {policy:?}"
                );
                let order = u32::from_be_bytes(cut[96..100].try_into().unwrap());
                assert!(
                    [0, 3, 4, 6].contains(&order),
                    "point {point}: order {order}"
                );
                let probe = dir.path().join("probe.qcow2");
                std::fs::write(&probe, &cut).unwrap();
                assert!(
                    qemu_raw(&probe) == before,
                    "{opts} point {point} {policy:?}: content"
                );
            }
        }
        let done = crash.current_image();
        std::fs::write(&path, &done).unwrap();
        crate::common::assert_check_clean(&path);
        for f in ["img.qcow2", "base.qcow2", "probe.qcow2"] {
            let _ = std::fs::remove_file(dir.path().join(f));
        }
    }
}
