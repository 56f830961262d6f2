//! `qcow2 create`: images QEMU accepts, with the settings qemu-img would give them.

use crate::common;

use std::path::Path;

use common::{assert_check_clean, path_in, qcow2, qcow2_ok, run};

/// `qemu-img info --output=json` of `img` as a JSON value.
fn qemu_info(img: &str) -> serde_json::Value {
    serde_json::from_str(&run("qemu-img", &["info", "--output=json", img])).unwrap()
}

#[test]
fn same_settings_as_qemu_img() {
    let dir = tempfile::tempdir().unwrap();
    for (i, opts) in [
        "",
        "compat=0.10",
        "cluster_size=4k,refcount_bits=1",
        "cluster_size=2M,refcount_bits=64,lazy_refcounts=on",
        "extended_l2=on,cluster_size=128k,compression_type=zstd",
        "preallocation=metadata",
        "preallocation=full,cluster_size=512",
    ]
    .iter()
    .enumerate()
    {
        let ours = path_in(dir.path(), &format!("ours{i}.qcow2"));
        let theirs = path_in(dir.path(), &format!("theirs{i}.qcow2"));
        let mut args = vec!["create", "-q", "-f", "qcow2"];
        if !opts.is_empty() {
            args.extend(["-o", opts]);
        }
        qcow2_ok(&[args.as_slice(), &[ours.as_str(), "3M"]].concat());
        run(
            "qemu-img",
            &[args.as_slice(), &[theirs.as_str(), "3M"]].concat(),
        );
        assert_check_clean(Path::new(&ours));
        let (a, b) = (qemu_info(&ours), qemu_info(&theirs));
        assert_eq!(a["virtual-size"], b["virtual-size"], "{opts}");
        assert_eq!(a["cluster-size"], b["cluster-size"], "{opts}");
        assert_eq!(a["format-specific"], b["format-specific"], "{opts}");
        common::qemu_io(&ours, &["write -P 3 1M 100k", "read -P 3 1M 100k"]);
        assert_check_clean(Path::new(&ours));
    }
}

#[test]
fn size_from_the_backing_file() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("sub")).unwrap();
    let base = path_in(dir.path(), "sub/base.qcow2");
    let raw = path_in(dir.path(), "sub/base.raw");
    let top = path_in(dir.path(), "sub/top.qcow2");
    let over_raw = path_in(dir.path(), "sub/over-raw.qcow2");
    common::qemu_create(&base, "", "5M");
    common::qemu_io(&base, &["write -P 4 0 64k"]);
    common::qemu_create_fmt(&raw, "raw", "", "3M");
    // Relative names are relative to the new image's directory.
    qcow2_ok(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        "base.qcow2",
        "-F",
        "qcow2",
        &top,
    ]);
    qcow2_ok(&["create", "-q", "-b", "base.raw", "-F", "raw", &over_raw]);
    let info = qemu_info(&top);
    assert_eq!(info["virtual-size"], 5 << 20);
    assert_eq!(info["backing-filename"], "base.qcow2");
    assert_eq!(info["backing-filename-format"], "qcow2");
    assert_eq!(qemu_info(&over_raw)["virtual-size"], 3 << 20);
    assert_check_clean(Path::new(&top));
    common::qemu_io(&top, &["read -P 4 0 64k"]);
    // An explicit size wins.
    qcow2_ok(&[
        "create",
        "-q",
        "-b",
        "base.qcow2",
        "-F",
        "qcow2",
        &top,
        "7M",
    ]);
    assert_eq!(qemu_info(&top)["virtual-size"], 7 << 20);
}

#[test]
fn data_file_and_raw() {
    let dir = tempfile::tempdir().unwrap();
    let img = path_in(dir.path(), "df.qcow2");
    let data = path_in(dir.path(), "df.data");
    let opts = format!("data_file={data},data_file_raw=on");
    qcow2_ok(&["create", "-q", "-o", &opts, &img, "1M"]);
    assert_check_clean(Path::new(&img));
    assert_eq!(std::fs::metadata(&data).unwrap().len(), 1 << 20);
    let raw = path_in(dir.path(), "r.raw");
    let out = qcow2_ok(&["create", "-f", "raw", &raw, "64k"]);
    assert_eq!(out, format!("Formatting '{raw}', fmt=raw size=65536\n"));
    assert_eq!(std::fs::metadata(&raw).unwrap().len(), 65536);
}

#[test]
fn formatting_line_like_qemu_img() {
    let dir = tempfile::tempdir().unwrap();
    let ours = path_in(dir.path(), "a.qcow2");
    let out = qcow2_ok(&[
        "create",
        "-o",
        "cluster_size=4k,lazy_refcounts=on",
        &ours,
        "1M",
    ]);
    let want = run(
        "qemu-img",
        &[
            "create",
            "-f",
            "qcow2",
            "-o",
            "cluster_size=4k,lazy_refcounts=on",
            &ours,
            "1M",
        ],
    );
    assert_eq!(out, want);
}

#[test]
fn refusals_are_one_line() {
    let dir = tempfile::tempdir().unwrap();
    let p = path_in(dir.path(), "x.qcow2");
    for args in [
        vec!["create", p.as_str()],
        vec!["create", p.as_str(), "1.5"],
        vec!["create", "-o", "cluster_size=3k", p.as_str(), "1M"],
        vec![
            "create",
            "-o",
            "compat=0.10,lazy_refcounts=on",
            p.as_str(),
            "1M",
        ],
        vec!["create", "-o", "bogus=1", p.as_str(), "1M"],
        vec!["create", "-b", "missing.qcow2", p.as_str()],
        vec!["create", "-f", "vmdk", p.as_str(), "1M"],
        vec!["create", p.as_str(), "99E"],
    ] {
        let r = qcow2(&args);
        assert_eq!(r.code, 1, "{args:?}: {}", r.stdout);
        assert!(
            r.stderr.starts_with("qcow2: ") && r.stderr.lines().count() == 1,
            "{args:?}: {}",
            r.stderr
        );
    }
}
