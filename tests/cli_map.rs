//! `qcow2 map` against `qemu-img map`: the same text, JSON and human, for every kind of
//! mapping (data, zero clusters, preallocation, compression, subclusters, backing chains).

use crate::common;

use common::{path_in, qcow2, qcow2_ok, run, status};

/// Our JSON and human map of `img` must equal qemu-img's, byte for byte.
fn same_map(img: &str) {
    let want = run("qemu-img", &["map", "--output=json", img]);
    assert_eq!(
        qcow2_ok(&["map", "--output=json", img]),
        want,
        "JSON map of {img}"
    );
    let (code, want) = status("qemu-img", &["map", img]);
    let ours = qcow2(&["map", img]);
    assert_eq!(
        ours.code, code,
        "human map status of {img}: {}",
        ours.stderr
    );
    if code == 0 {
        assert_eq!(ours.stdout, want, "human map of {img}");
    }
}

/// Cluster-aligned requests (for 512 B..64 KiB clusters). QEMU leaves holes in the host
/// clusters of partial writes, which the engine's map reports differently (see
/// `partial_cluster_writes`).
const WORKLOAD: &[&str] = &[
    "write -P 1 0 64k",
    "write -P 2 128k 64k",
    "write -z 256k 128k",
    "write -P 3 1M 192k",
    "discard 1088k 64k",
    "write -z -u 2M 64k",
];

#[test]
fn data_and_zero_clusters() {
    let dir = tempfile::tempdir().unwrap();
    for (name, opts) in [
        ("v3.qcow2", "cluster_size=64k"),
        ("v2.qcow2", "compat=0.10"),
        ("c512.qcow2", "cluster_size=512"),
        ("l2ext.qcow2", "extended_l2=on,cluster_size=128k"),
    ] {
        let p = path_in(dir.path(), name);
        common::qemu_create(&p, opts, "4M");
        common::qemu_io(&p, WORKLOAD);
        same_map(&p);
    }
}

/// Known engine mismatch (see the CLI report): QEMU's copy-on-write leaves file holes in the
/// rest of a partially written cluster; qemu-img map still reports one data extent (it only
/// asks the file system when it detects metadata preallocation), the engine splits it into
/// `zero: true` pieces.
#[test]
fn partial_cluster_writes() {
    let dir = tempfile::tempdir().unwrap();
    let p = path_in(dir.path(), "partial.qcow2");
    common::qemu_create(&p, "cluster_size=64k", "1M");
    common::qemu_io(&p, &["write -P 2 100k 20k"]);
    same_map(&p);
}

#[test]
fn preallocation_metadata_and_empty() {
    let dir = tempfile::tempdir().unwrap();
    let p = path_in(dir.path(), "meta.qcow2");
    common::qemu_create(&p, "preallocation=metadata", "2M");
    common::qemu_io(&p, &["write -P 9 64k 4k"]);
    same_map(&p);
    let z = path_in(dir.path(), "zero.qcow2");
    common::qemu_create(&z, "cluster_size=64k", "0");
    same_map(&z);
}

/// Known engine mismatch (see the CLI report): with `preallocation=falloc` qemu reports the
/// clusters as data (zero: false) because it only asks the file system when it detects
/// metadata preallocation; the engine always asks and reports zero: true.
#[test]
fn preallocation_falloc() {
    let dir = tempfile::tempdir().unwrap();
    let p = path_in(dir.path(), "falloc.qcow2");
    common::qemu_create(&p, "preallocation=falloc", "1M");
    same_map(&p);
}

#[test]
fn compressed_clusters() {
    let dir = tempfile::tempdir().unwrap();
    let src = path_in(dir.path(), "src.qcow2");
    common::qemu_create(&src, "cluster_size=64k", "2M");
    common::qemu_io(&src, WORKLOAD[..4].as_ref());
    for (name, opts) in [
        ("zlib.qcow2", "compression_type=zlib"),
        ("zstd.qcow2", "compression_type=zstd"),
    ] {
        let p = path_in(dir.path(), name);
        run(
            "qemu-img",
            &["convert", "-c", "-O", "qcow2", "-o", opts, &src, &p],
        );
        same_map(&p);
    }
}

#[test]
fn backing_chains() {
    let dir = tempfile::tempdir().unwrap();
    let raw = path_in(dir.path(), "base.raw");
    let base = path_in(dir.path(), "base.qcow2");
    let top = path_in(dir.path(), "top.qcow2");
    let over_raw = path_in(dir.path(), "over-raw.qcow2");
    common::qemu_create_fmt(&raw, "raw", "", "4M");
    common::qemu_io_fmt("raw", &raw, &["write -P 7 128k 64k", "write -P 7 3M 4k"]);
    run(
        "qemu-img",
        &[
            "create", "-q", "-f", "qcow2", "-b", &raw, "-F", "raw", &over_raw,
        ],
    );
    common::qemu_io(&over_raw, &["write -P 1 0 64k", "write -z 3M 64k"]);
    same_map(&over_raw);
    common::qemu_create(&base, "cluster_size=64k", "3M");
    common::qemu_io(&base, WORKLOAD);
    common::qemu_create(&top, "backing_file=base.qcow2,backing_fmt=qcow2", "5M");
    common::qemu_io(
        &top,
        &["write -P 5 64k 64k", "write -z 1M 64k", "discard 0 64k"],
    );
    same_map(&top);
}

#[test]
fn raw_images() {
    let dir = tempfile::tempdir().unwrap();
    let raw = path_in(dir.path(), "disk.raw");
    common::qemu_create_fmt(&raw, "raw", "", "1M");
    common::qemu_io_fmt("raw", &raw, &["write -P 7 128k 64k"]);
    let want = run("qemu-img", &["map", "-f", "raw", "--output=json", &raw]);
    assert_eq!(qcow2_ok(&["map", "-f", "raw", "--output=json", &raw]), want);
}

#[test]
fn after_our_own_writes() {
    let dir = tempfile::tempdir().unwrap();
    let p = path_in(dir.path(), "ours.qcow2");
    common::qemu_create(&p, "cluster_size=64k", "4M");
    let mut args = vec!["io"];
    for c in WORKLOAD {
        args.extend(["-c", c]);
    }
    args.push(&p);
    qcow2_ok(&args);
    same_map(&p);
}
