//! `qcow2 convert`: the destination reads back exactly like the source (by `qemu-img
//! compare`), stays sparse, and qcow2 destinations pass `qemu-img check`.

use crate::common;

use std::os::unix::fs::MetadataExt;
use std::path::Path;

use common::{assert_check_clean, path_in, qcow2, qcow2_ok, run, status};

fn compare(a: &str, b: &str) {
    let (code, text) = status("qemu-img", &["compare", a, b]);
    assert_eq!(code, 0, "compare {a} {b}: {text}");
}

/// A QEMU image with data, zeros, a backing file and compressed clusters.
fn source(dir: &Path) -> String {
    let base = path_in(dir, "base.qcow2");
    let src = path_in(dir, "src.qcow2");
    common::qemu_create(&base, "", "8M");
    common::qemu_io(&base, &["write -P 1 0 1M", "write -P 2 6M 64k"]);
    common::qemu_overlay("base.qcow2", "qcow2", &src);
    common::qemu_io(
        &src,
        &["write -P 3 512k 8k", "write -z 6M 4k", "write -P 4 7M 3000"],
    );
    src
}

#[test]
fn qcow2_to_raw_is_sparse_and_equal() {
    let dir = tempfile::tempdir().unwrap();
    let src = source(dir.path());
    let out = path_in(dir.path(), "out.raw");
    std::fs::write(&out, vec![7u8; 100]).unwrap(); // an existing file is truncated
    qcow2_ok(&["convert", "-O", "raw", &src, &out]);
    let meta = std::fs::metadata(&out).unwrap();
    assert_eq!(meta.len(), 8 << 20);
    assert!(
        meta.blocks() * 512 < 2 << 20,
        "not sparse: {} bytes allocated",
        meta.blocks() * 512
    );
    compare(&src, &out);
    assert_eq!(
        std::fs::read(&out).unwrap(),
        common::qemu_raw(Path::new(&src))
    );
}

#[test]
fn raw_and_qcow2_to_qcow2() {
    let dir = tempfile::tempdir().unwrap();
    let src = source(dir.path());
    let raw = path_in(dir.path(), "mid.raw");
    let q1 = path_in(dir.path(), "q1.qcow2");
    let q2 = path_in(dir.path(), "q2.qcow2");
    qcow2_ok(&["convert", &src, &raw]);
    qcow2_ok(&["convert", "-O", "qcow2", "-o", "cluster_size=4k", &raw, &q1]);
    qcow2_ok(&[
        "convert",
        "-p",
        "-f",
        "qcow2",
        "-O",
        "qcow2",
        "-o",
        "extended_l2=on",
        &src,
        &q2,
    ]);
    for q in [&q1, &q2] {
        assert_check_clean(Path::new(q));
        compare(&src, q);
    }
    let (q1_size, raw_len) = (std::fs::metadata(&q1).unwrap().len(), 8u64 << 20);
    assert!(q1_size < raw_len / 4, "destination not sparse: {q1_size}");
}

#[test]
fn compressed_and_v2_sources() {
    let dir = tempfile::tempdir().unwrap();
    let src = source(dir.path());
    let comp = path_in(dir.path(), "comp.qcow2");
    run(
        "qemu-img",
        &[
            "convert",
            "-c",
            "-O",
            "qcow2",
            "-o",
            "compat=0.10",
            &src,
            &comp,
        ],
    );
    let out = path_in(dir.path(), "out.qcow2");
    qcow2_ok(&["convert", "-O", "qcow2", &comp, &out]);
    assert_check_clean(Path::new(&out));
    compare(&comp, &out);
}

#[test]
fn refusals() {
    let dir = tempfile::tempdir().unwrap();
    let src = source(dir.path());
    let out = path_in(dir.path(), "o");
    for args in [
        vec!["convert", "-O", "vmdk", src.as_str(), out.as_str()],
        vec!["convert", "-c", "-O", "raw", src.as_str(), out.as_str()],
        vec![
            "convert",
            "-O",
            "qcow2",
            "-o",
            "cluster_size=3",
            src.as_str(),
            out.as_str(),
        ],
        vec!["convert", "missing", out.as_str()],
    ] {
        let r = qcow2(&args);
        assert_eq!(r.code, 1, "{args:?}");
        assert_eq!(r.stderr.lines().count(), 1, "{args:?}: {}", r.stderr);
    }
}
