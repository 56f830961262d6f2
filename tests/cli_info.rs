//! `qcow2 info` against `qemu-img info` on the same images: identical JSON text.

use crate::common;

use common::{path_in, qcow2, qcow2_ok, run};

/// qemu-img's and our JSON for `args` + `img` must be the same text.
fn same_json(extra: &[&str], img: &str) {
    let mut args = vec!["info", "--output=json"];
    args.extend_from_slice(extra);
    args.push(img);
    let want = run("qemu-img", &args);
    let got = qcow2_ok(&args);
    assert_eq!(got, want, "info {extra:?} {img}");
}

/// Same check for the human output.
fn same_human(extra: &[&str], img: &str) {
    let mut args = vec!["info"];
    args.extend_from_slice(extra);
    args.push(img);
    assert_eq!(
        qcow2_ok(&args),
        run("qemu-img", &args),
        "info {extra:?} {img}"
    );
}

#[test]
fn plain_v2_v3_and_options() {
    let dir = tempfile::tempdir().unwrap();
    let cases: &[(&str, &str)] = &[
        ("v3.qcow2", "cluster_size=65536"),
        ("v2.qcow2", "compat=0.10"),
        (
            "opts.qcow2",
            "cluster_size=128k,extended_l2=on,lazy_refcounts=on,compression_type=zstd,refcount_bits=64",
        ),
        ("small.qcow2", "cluster_size=512,refcount_bits=1"),
    ];
    for (name, opts) in cases {
        let p = path_in(dir.path(), name);
        common::qemu_create(&p, opts, "3M");
        common::qemu_io(&p, &["write -P 1 0 100k"]);
        same_json(&[], &p);
        same_human(&[], &p);
    }
}

#[test]
fn data_file_snapshots_and_chain() {
    let dir = tempfile::tempdir().unwrap();
    let base = path_in(dir.path(), "base.qcow2");
    let raw = path_in(dir.path(), "base.raw");
    let mid = path_in(dir.path(), "mid.qcow2");
    let top = path_in(dir.path(), "top.qcow2");
    let df = path_in(dir.path(), "df.qcow2");
    common::qemu_create_fmt(&raw, "raw", "", "1M");
    run(
        "qemu-img",
        &[
            "create", "-q", "-f", "qcow2", "-b", &raw, "-F", "raw", &base,
        ],
    );
    common::qemu_overlay("base.qcow2", "qcow2", &mid);
    common::qemu_create(&top, "backing_file=mid.qcow2,backing_fmt=qcow2", "2M");
    common::qemu_io(&top, &["write -P 2 64k 64k"]);
    run("qemu-img", &["snapshot", "-c", "first", &top]);
    run("qemu-img", &["snapshot", "-c", "second", &top]);
    same_json(&[], &top);
    same_json(&["--backing-chain"], &top);
    same_json(&["-f", "raw"], &raw);
    same_human(&["--backing-chain"], &mid);
    let data = format!("data_file={}", path_in(dir.path(), "df.raw"));
    common::qemu_create(&df, &data, "1M");
    same_json(&[], &df);
    same_human(&[], &df);
}

#[test]
fn encrypted_image() {
    let dir = tempfile::tempdir().unwrap();
    let p = path_in(dir.path(), "enc.qcow2");
    run(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "--object",
            "secret,id=s0,data=pw",
            "-o",
            "encrypt.format=luks,encrypt.key-secret=s0,encrypt.iter-time=10",
            &p,
            "1M",
        ],
    );
    same_json(&[], &p);
    same_human(&[], &p);
}

#[test]
fn errors_are_one_line() {
    let dir = tempfile::tempdir().unwrap();
    let missing = path_in(dir.path(), "missing.qcow2");
    let r = qcow2(&["info", &missing]);
    assert_eq!(r.code, 1);
    assert!(
        r.stderr.starts_with("qcow2: ") && r.stderr.lines().count() == 1,
        "{}",
        r.stderr
    );
    let junk = path_in(dir.path(), "junk.qcow2");
    let mut bytes = b"QFI\xfb\0\0\0\x03".to_vec();
    bytes.resize(512, 0xff);
    std::fs::write(&junk, bytes).unwrap();
    let r = qcow2(&["info", &junk]);
    assert_eq!(r.code, 1, "{}", r.stdout);
    assert_eq!(r.stderr.lines().count(), 1, "{}", r.stderr);
    let r = qcow2(&["info", "--output=xml", &junk]);
    assert_eq!(r.code, 1);
    assert_eq!(r.stderr.lines().count(), 1, "{}", r.stderr);
}
