//! `qcow2 compare` against `qemu-img compare`: the same stdout and exit status for identical
//! images, single differing bytes, qcow2 vs raw, differing sizes, strict mode, backing chains.

use crate::common;

use common::{path_in, qcow2, run, status};

/// Ours and qemu-img's compare must print the same and exit the same; returns the status.
fn same_compare(args: &[&str]) -> i32 {
    let (code, _) = status("qemu-img", &[&["compare"], args].concat());
    let out = std::process::Command::new("qemu-img")
        .arg("compare")
        .args(args)
        .output()
        .unwrap();
    let want = String::from_utf8_lossy(&out.stdout).into_owned();
    let ours = qcow2(&[&["compare"], args].concat());
    assert_eq!(
        ours.code, code,
        "status of compare {args:?}: {}",
        ours.stderr
    );
    assert_eq!(ours.stdout, want, "stdout of compare {args:?}");
    code
}

/// Write one byte of `value` at `off` of a raw file.
fn poke(path: &str, off: u64, value: u8) {
    use std::io::{Seek, SeekFrom, Write};
    let mut f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    f.seek(SeekFrom::Start(off)).unwrap();
    f.write_all(&[value]).unwrap();
}

#[test]
fn identical_images() {
    let d = tempfile::tempdir().unwrap();
    let (a, b) = (path_in(d.path(), "a.qcow2"), path_in(d.path(), "b.qcow2"));
    common::qemu_create_fmt(&a, "qcow2", "", "4M");
    common::qemu_io_fmt("qcow2", &a, &["write -P 0x5a 100k 300k"]);
    std::fs::copy(&a, &b).unwrap();
    assert_eq!(same_compare(&[&a, &b]), 0);
    assert_eq!(same_compare(&["-s", &a, &b]), 0);
    assert_eq!(same_compare(&["-q", &a, &b]), 0);
    // Empty images, and data vs zeros written explicitly.
    let (e1, e2) = (path_in(d.path(), "e1.qcow2"), path_in(d.path(), "e2.qcow2"));
    common::qemu_create_fmt(&e1, "qcow2", "", "1M");
    common::qemu_create_fmt(&e2, "qcow2", "", "1M");
    assert_eq!(same_compare(&[&e1, &e2]), 0);
    common::qemu_io_fmt("qcow2", &e2, &["write -P 0 64k 64k"]);
    common::qemu_io_fmt("qcow2", &e2, &["write -z 256k 64k"]);
    assert_eq!(same_compare(&[&e1, &e2]), 0);
    assert_eq!(same_compare(&["-s", &e1, &e2]), 1);
}

#[test]
fn one_differing_byte_at_various_offsets() {
    let d = tempfile::tempdir().unwrap();
    let a = path_in(d.path(), "a.qcow2");
    common::qemu_create_fmt(&a, "qcow2", "", "2M");
    common::qemu_io_fmt("qcow2", &a, &["write -P 0x11 0 1M"]);
    let raw = path_in(d.path(), "a.raw");
    run("qemu-img", &["convert", "-O", "raw", &a, &raw]);
    for off in [
        0u64,
        1,
        511,
        512,
        1000,
        65535,
        65536 + 7,
        (1 << 20) - 1,
        1 << 20,
        (2 << 20) - 1,
    ] {
        let b = path_in(d.path(), "b.raw");
        std::fs::copy(&raw, &b).unwrap();
        poke(&b, off, 0xee);
        assert_eq!(same_compare(&[&a, &b]), 1, "offset {off}");
        assert_eq!(same_compare(&["-f", "raw", "-F", "qcow2", &b, &a]), 1);
        assert_eq!(same_compare(&["-q", &a, &b]), 1);
    }
    // qcow2 vs the raw conversion of itself.
    assert_eq!(same_compare(&[&a, &raw]), 0);
    assert_eq!(same_compare(&["-f", "raw", &raw, &a]), 0);
}

#[test]
fn different_sizes() {
    let d = tempfile::tempdir().unwrap();
    let (small, big) = (path_in(d.path(), "s.qcow2"), path_in(d.path(), "b.raw"));
    common::qemu_create_fmt(&small, "qcow2", "", "1M");
    common::qemu_create_fmt(&big, "raw", "", "3M");
    common::qemu_io_fmt("qcow2", &small, &["write -P 7 4k 4k"]);
    common::qemu_io_fmt("raw", &big, &["write -P 7 4k 4k"]);
    assert_eq!(same_compare(&[&small, &big]), 0);
    assert_eq!(same_compare(&[&big, &small]), 0);
    assert_eq!(same_compare(&["-s", &small, &big]), 1);
    // A non-zero byte in the tail of the larger image.
    poke(&big, (2 << 20) + 1234, 1);
    assert_eq!(same_compare(&[&small, &big]), 1);
    assert_eq!(same_compare(&[&big, &small]), 1);
    // A difference in the common part is reported before the tail.
    common::qemu_io_fmt("qcow2", &small, &["write -P 8 8k 1k"]);
    assert_eq!(same_compare(&[&small, &big]), 1);
}

#[test]
fn backing_chains() {
    let d = tempfile::tempdir().unwrap();
    let base = path_in(d.path(), "base.qcow2");
    let top = path_in(d.path(), "top.qcow2");
    common::qemu_create_fmt(&base, "qcow2", "", "2M");
    common::qemu_io_fmt("qcow2", &base, &["write -P 0x33 0 1536k"]);
    run(
        "qemu-img",
        &[
            "create", "-q", "-f", "qcow2", "-b", &base, "-F", "qcow2", &top,
        ],
    );
    let raw = path_in(d.path(), "base.raw");
    run("qemu-img", &["convert", "-O", "raw", &base, &raw]);
    assert_eq!(same_compare(&[&top, &raw]), 0);
    assert_eq!(same_compare(&[&top, &base]), 0);
    common::qemu_io_fmt("qcow2", &top, &["write -P 0x44 700k 1"]);
    assert_eq!(same_compare(&[&top, &base]), 1);
    assert_eq!(same_compare(&[&raw, &top]), 1);
    common::qemu_io_fmt("qcow2", &top, &["write -P 0x33 700k 1"]);
    assert_eq!(same_compare(&[&top, &base]), 0);
    // Discard on the overlay reads as zeros, not the backing data.
    common::qemu_io_fmt("qcow2", &top, &["discard 1M 64k"]);
    assert_eq!(same_compare(&[&top, &base]), 1);
}

#[test]
fn errors_exit_2() {
    let d = tempfile::tempdir().unwrap();
    let a = path_in(d.path(), "a.qcow2");
    common::qemu_create_fmt(&a, "qcow2", "", "1M");
    let missing = path_in(d.path(), "missing.qcow2");
    let ours = qcow2(&["compare", &a, &missing]);
    assert_eq!(ours.code, 2, "{}", ours.stderr);
    assert!(ours.stdout.is_empty());
    assert_eq!(status("qemu-img", &["compare", &a, &missing]).0, 2);
}

/// Large sparse images compare quickly: zero ranges are skipped by their map, not read.
#[test]
fn large_sparse_images() {
    let d = tempfile::tempdir().unwrap();
    let (a, b) = (path_in(d.path(), "a.qcow2"), path_in(d.path(), "b.qcow2"));
    common::qemu_create_fmt(&a, "qcow2", "", "200G");
    common::qemu_io_fmt("qcow2", &a, &["write -P 1 100G 64k"]);
    std::fs::copy(&a, &b).unwrap();
    let raw = path_in(d.path(), "big.raw");
    common::qemu_create_fmt(&raw, "raw", "", "300G");
    common::qemu_io_fmt("raw", &raw, &["write -P 1 100G 64k"]);
    let t = std::time::Instant::now();
    assert_eq!(same_compare(&[&a, &b]), 0);
    assert_eq!(same_compare(&[&a, &raw]), 0);
    common::qemu_io_fmt("qcow2", &b, &["write -P 2 150G 512"]);
    assert_eq!(same_compare(&[&a, &b]), 1);
    common::qemu_io_fmt("raw", &raw, &["write -P 2 250G 512"]);
    assert_eq!(same_compare(&[&a, &raw]), 1);
    assert!(t.elapsed().as_secs() < 60, "took {:?}", t.elapsed());
}

/// Strict mode across formats: allocated data matches a raw file's data; an empty qcow2
/// (unallocated) does not match an empty raw file (a hole is allocated for raw).
#[test]
fn strict_qcow2_vs_raw() {
    let d = tempfile::tempdir().unwrap();
    let (a, e) = (path_in(d.path(), "a.qcow2"), path_in(d.path(), "e.qcow2"));
    let (ar, er) = (path_in(d.path(), "a.raw"), path_in(d.path(), "e.raw"));
    common::qemu_create_fmt(&a, "qcow2", "", "1M");
    common::qemu_io_fmt("qcow2", &a, &["write -P 1 0 1M"]);
    run("qemu-img", &["convert", "-O", "raw", &a, &ar]);
    common::qemu_create_fmt(&e, "qcow2", "", "1M");
    common::qemu_create_fmt(&er, "raw", "", "1M");
    assert_eq!(same_compare(&["-s", &a, &ar]), 0);
    assert_eq!(same_compare(&["-s", &e, &er]), 1);
    assert_eq!(same_compare(&["-s", &er, &er]), 0);
}
