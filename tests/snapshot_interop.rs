//! Internal snapshots against QEMU, both ways: snapshots made by `qcow2 snapshot` are listed,
//! read (`convert -l`) and applied by `qemu-img snapshot`, and snapshots made by qemu-img are
//! listed, applied and deleted by ours; `qemu-img check` is clean (no leaks) after each step,
//! on several image variants.

use std::path::Path;

use crate::common::{self, qcow2, qcow2_ok, qemu_create, qemu_io, qemu_raw, run, status};

/// One image variant: `qemu-img create -o` options, and how to fill it.
struct Variant {
    name: &'static str,
    opts: &'static str,
    size: &'static str,
    /// qemu-io commands writing the first state (the snapshot's).
    before: &'static [&'static str],
    /// qemu-io commands changing it afterwards.
    after: &'static [&'static str],
}

const VARIANTS: &[Variant] = &[
    Variant {
        name: "64k",
        opts: "",
        size: "8M",
        before: &["write -P 1 0 192k", "write -P 2 1M 4k", "write -z 2M 64k"],
        after: &["write -P 3 64k 8k", "write -P 4 3M 64k", "discard 1M 64k"],
    },
    Variant {
        name: "512b",
        opts: "cluster_size=512",
        size: "2M",
        before: &["write -P 1 0 8k", "write -P 2 1M 1536"],
        after: &["write -P 3 512 1k", "write -P 4 1536k 2k", "discard 1M 512"],
    },
    Variant {
        name: "ext-l2",
        opts: "extended_l2=on,cluster_size=64k",
        size: "8M",
        before: &["write -P 1 0 4k", "write -P 2 70k 2k", "write -z 1M 8k"],
        after: &["write -P 3 2k 4k", "write -P 4 72k 4k", "write -z 0 2k"],
    },
    Variant {
        name: "compressed",
        opts: "cluster_size=4k",
        size: "4M",
        before: &[
            "write -c -P 1 0 4k",
            "write -c -P 2 4k 4k",
            "write -P 5 8k 4k",
        ],
        after: &[
            "write -P 3 2k 1k",
            "write -c -P 4 64k 4k",
            "write -P 6 1M 4k",
        ],
    },
    Variant {
        name: "refcount-bits-2",
        opts: "refcount_bits=2,cluster_size=4k",
        size: "1M",
        before: &["write -P 1 0 12k"],
        after: &["write -P 2 4k 4k"],
    },
];

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn check_clean(img: &Path, step: &str) {
    let (code, text) = status("qemu-img", &["check", s(img)]);
    assert_eq!(code, 0, "{step}: qemu-img check:\n{text}");
}

/// The content of snapshot `name` as `qemu-img convert -l` reads it.
fn qemu_snapshot_raw(img: &Path, name: &str) -> Vec<u8> {
    let out = img.with_extension("snap.raw");
    let arg = format!("snapshot.name={name}");
    run(
        "qemu-img",
        &["convert", "-l", &arg, "-O", "raw", s(img), s(&out)],
    );
    let data = std::fs::read(&out).unwrap();
    std::fs::remove_file(&out).ok();
    data
}

fn make(dir: &Path, v: &Variant) -> std::path::PathBuf {
    let img = dir.join(format!("{}.qcow2", v.name));
    qemu_create(&img, v.opts, v.size);
    qemu_io(&img, v.before);
    img
}

#[test]
fn ours_create_then_qemu_lists_reads_and_applies() {
    let dir = tempfile::tempdir().unwrap();
    for v in VARIANTS {
        let img = make(dir.path(), v);
        let first = qemu_raw(&img);
        qcow2_ok(&["snapshot", "-c", "s1", s(&img)]);
        check_clean(&img, v.name);
        qemu_io(&img, v.after);
        check_clean(&img, v.name);
        let second = qemu_raw(&img);
        assert_ne!(first, second, "{}", v.name);
        let list = run("qemu-img", &["snapshot", "-l", s(&img)]);
        assert!(list.contains(" s1 "), "{}: {list}", v.name);
        assert!(
            qemu_snapshot_raw(&img, "s1") == first,
            "{}: convert -l",
            v.name
        );
        run("qemu-img", &["snapshot", "-a", "s1", s(&img)]);
        check_clean(&img, v.name);
        assert!(qemu_raw(&img) == first, "{}: qemu-img snapshot -a", v.name);
        run("qemu-img", &["snapshot", "-d", "s1", s(&img)]);
        check_clean(&img, v.name);
    }
}

#[test]
fn ours_create_apply_delete_round_trip() {
    let dir = tempfile::tempdir().unwrap();
    for v in VARIANTS {
        let img = make(dir.path(), v);
        let first = qemu_raw(&img);
        qcow2_ok(&["snapshot", "-c", "s1", s(&img)]);
        qemu_io(&img, v.after);
        let second = qemu_raw(&img);
        qcow2_ok(&["snapshot", "-c", "s2", s(&img)]);
        check_clean(&img, v.name);
        qcow2_ok(&["snapshot", "-a", "s1", s(&img)]);
        check_clean(&img, v.name);
        assert!(qemu_raw(&img) == first, "{}: apply s1", v.name);
        qcow2_ok(&["snapshot", "-a", "2", s(&img)]);
        check_clean(&img, v.name);
        assert!(qemu_raw(&img) == second, "{}: apply ID 2", v.name);
        qcow2_ok(&["snapshot", "-d", "s1", s(&img)]);
        check_clean(&img, v.name);
        assert!(
            qemu_snapshot_raw(&img, "s2") == second,
            "{}: s2 after deleting s1",
            v.name
        );
        qcow2_ok(&["snapshot", "-d", "s2", s(&img)]);
        check_clean(&img, v.name);
        assert!(
            qemu_raw(&img) == second,
            "{}: active after deleting all",
            v.name
        );
        // No snapshot left: every cluster has one user again, and writes go in place.
        qemu_io(&img, &["write -P 9 0 4k", "write -P 9 8k 1k"]);
        check_clean(&img, v.name);
    }
}

#[test]
fn qemu_create_then_ours_lists_applies_and_deletes() {
    let dir = tempfile::tempdir().unwrap();
    for v in VARIANTS {
        let img = make(dir.path(), v);
        let first = qemu_raw(&img);
        run("qemu-img", &["snapshot", "-c", "q1", s(&img)]);
        qemu_io(&img, v.after);
        run("qemu-img", &["snapshot", "-c", "q2", s(&img)]);
        let theirs = run("qemu-img", &["snapshot", "-l", s(&img)]);
        assert_eq!(qcow2_ok(&["snapshot", "-l", s(&img)]), theirs, "{}", v.name);
        qcow2_ok(&["snapshot", "-a", "q1", s(&img)]);
        check_clean(&img, v.name);
        assert!(qemu_raw(&img) == first, "{}: apply q1", v.name);
        qcow2_ok(&["snapshot", "-d", "q1", s(&img)]);
        check_clean(&img, v.name);
        qcow2_ok(&["snapshot", "-d", "q2", s(&img)]);
        check_clean(&img, v.name);
        assert!(qemu_raw(&img) == first, "{}: after deletes", v.name);
    }
}

#[test]
fn snapshot_of_an_overlay_keeps_reading_through_the_backing_file() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base.qcow2");
    qemu_create(&base, "", "4M");
    qemu_io(&base, &["write -P 7 0 1M"]);
    let top = dir.path().join("top.qcow2");
    common::qemu_overlay(s(&base), "qcow2", s(&top));
    qemu_io(&top, &["write -P 1 64k 64k"]);
    let first = qemu_raw(&top);
    qcow2_ok(&["snapshot", "-c", "s1", s(&top)]);
    qemu_io(&top, &["write -P 2 0 128k", "write -z 512k 64k"]);
    check_clean(&top, "overlay");
    assert!(qemu_snapshot_raw(&top, "s1") == first);
    qcow2_ok(&["snapshot", "-a", "s1", s(&top)]);
    check_clean(&top, "overlay");
    assert!(qemu_raw(&top) == first);
}

#[test]
fn apply_restores_the_snapshot_disk_size() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("grow.qcow2");
    qemu_create(&img, "", "1M");
    qemu_io(&img, &["write -P 1 0 64k"]);
    let first = qemu_raw(&img);
    qcow2_ok(&["snapshot", "-c", "small", s(&img)]);
    qcow2_ok(&["resize", s(&img), "64M"]);
    qemu_io(&img, &["write -P 2 40M 64k"]);
    qcow2_ok(&["snapshot", "-c", "big", s(&img)]);
    let big = qemu_raw(&img);
    qcow2_ok(&["snapshot", "-a", "small", s(&img)]);
    check_clean(&img, "small");
    assert!(qemu_raw(&img) == first);
    qcow2_ok(&["snapshot", "-a", "big", s(&img)]);
    check_clean(&img, "big");
    assert!(qemu_raw(&img) == big);
}

#[test]
fn messages_and_exit_codes_match_qemu_img() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("m.qcow2");
    qemu_create(&img, "", "1M");
    // No snapshots: an empty list prints nothing.
    assert_eq!(qcow2_ok(&["snapshot", "-l", s(&img)]), "");
    assert_eq!(qcow2_ok(&["snapshot", s(&img)]), "");
    let r = qcow2(&["snapshot", "-d", "nope", s(&img)]);
    assert_eq!(r.code, 1);
    assert!(
        r.stderr
            .contains("Could not delete snapshot 'nope': snapshot not found"),
        "{}",
        r.stderr
    );
    let r = qcow2(&["snapshot", "-a", "nope", s(&img)]);
    assert_eq!(r.code, 1);
    assert!(
        r.stderr.contains("Could not apply snapshot 'nope'"),
        "{}",
        r.stderr
    );
    let r = qcow2(&["snapshot", "-l", "-c", "x", s(&img)]);
    assert_eq!(r.code, 1);
    assert!(
        r.stderr.contains("Cannot mix '-l', '-a', '-c', '-d'"),
        "{}",
        r.stderr
    );
    // -d looks names up, not IDs (as qemu-img does); -a takes either.
    qcow2_ok(&["snapshot", "-q", "-c", "x", s(&img)]);
    assert_eq!(qcow2(&["snapshot", "-d", "1", s(&img)]).code, 1);
    qcow2_ok(&["snapshot", "-a", "1", s(&img)]);
    qcow2_ok(&["snapshot", "-d", "x", s(&img)]);
    check_clean(&img, "messages");
}

#[test]
fn refcount_overflow_is_refused_and_leaves_the_image_untouched() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("r1.qcow2");
    qemu_create(&img, "refcount_bits=1", "1M");
    // An empty disk shares nothing: that snapshot fits.
    qcow2_ok(&["snapshot", "-c", "empty", s(&img)]);
    qemu_io(&img, &["write -P 1 0 64k"]);
    let before = std::fs::read(&img).unwrap();
    let r = qcow2(&["snapshot", "-c", "full", s(&img)]);
    assert_eq!(r.code, 1, "{}", r.stderr);
    assert!(
        r.stderr.contains("Could not create snapshot 'full'"),
        "{}",
        r.stderr
    );
    assert!(std::fs::read(&img).unwrap() == before, "the image changed");
    check_clean(&img, "refcount_bits=1");
}

#[test]
fn raw_images_have_no_snapshots() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("r.raw");
    std::fs::write(&img, vec![0u8; 65536]).unwrap();
    assert_eq!(qcow2_ok(&["snapshot", "-f", "raw", "-l", s(&img)]), "");
    let r = qcow2(&["snapshot", "-f", "raw", "-c", "x", s(&img)]);
    assert_eq!(r.code, 1);
    assert!(
        r.stderr
            .contains("Could not create snapshot 'x': Operation not supported")
    );
}
