//! `check` on clean images made by QEMU in many variants: every number must equal
//! `qemu-img check --output=json`'s.

use crate::common;

use std::path::Path;

use qcow2_engine::check::{CheckOptions, CheckReport, check};

/// The numbers qemu-img reports (everything but the names).
fn numbers(r: &CheckReport) -> [u64; 8] {
    [
        r.check_errors,
        r.corruptions,
        r.leaks,
        r.image_end_offset,
        r.total_clusters,
        r.allocated_clusters,
        r.fragmented_clusters,
        r.compressed_clusters,
    ]
}

/// Our report for `img` must carry qemu-img's numbers.
async fn assert_matches_qemu(img: &Path) -> CheckReport {
    let (_, want) = common::qemu_check(img, &["-U"]);
    let got = check(common::storage(img, true), &CheckOptions::default())
        .await
        .unwrap();
    assert_eq!(
        numbers(&got),
        numbers(&want),
        "{}: ours {got:?} qemu {want:?}",
        img.display()
    );
    got
}

/// Create an image with `opts`, run a mixed workload scaled to its cluster size `cs`.
fn make(img: &Path, opts: &str, cs: u64, compressed: bool) {
    let p = img.to_str().unwrap();
    let size = (64 * cs).max(64 << 20).to_string();
    common::qemu_create(p, opts, &size);
    let mut cmds = vec![
        "write -P 1 0 300k".to_string(),
        format!("write -P 2 {} {}", 20 * cs, 3 * cs),
        format!("write -z {} {}", 40 * cs, 2 * cs),
        format!("write -P 3 {} 4k", 33 << 20),
        format!("discard {} {}", 21 * cs, cs),
    ];
    if compressed {
        cmds.push(format!("write -c -P 4 {} {}", (48 << 20) + cs, cs));
        cmds.push(format!("write -c -P 5 {} {}", (48 << 20) + 2 * cs, cs));
    }
    let mut args = vec!["-f", "qcow2"];
    for c in &cmds {
        args.extend(["-c", c.as_str()]);
    }
    args.push(p);
    common::run("qemu-io", &args);
}

#[tokio::test]
async fn cluster_sizes_and_refcount_widths() {
    let dir = tempfile::tempdir().unwrap();
    let variants: &[(&str, u64, bool)] = &[
        ("cluster_size=512", 512, true),
        ("cluster_size=4096,refcount_bits=1", 4096, true),
        ("cluster_size=4096,refcount_bits=2", 4096, true),
        ("refcount_bits=64", 65536, true),
        ("cluster_size=2M", 2 << 20, true),
        ("cluster_size=1024,refcount_bits=8", 1024, true),
    ];
    for (i, (opts, cs, comp)) in variants.iter().enumerate() {
        let img = dir.path().join(format!("v{i}.qcow2"));
        make(&img, opts, *cs, *comp);
        let r = assert_matches_qemu(&img).await;
        assert!(r.is_clean(), "{opts}: {:?}", r.messages);
    }
}

#[tokio::test]
async fn features() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data.raw");
    let data_opt = format!("data_file={}", data.display());
    let variants: Vec<(String, u64, bool)> = vec![
        ("extended_l2=on".into(), 65536, true),
        ("extended_l2=on,cluster_size=16k".into(), 16384, true),
        ("compression_type=zstd".into(), 65536, true),
        ("compat=0.10".into(), 65536, true),
        ("lazy_refcounts=on".into(), 65536, false),
        (
            "preallocation=metadata,cluster_size=4096".into(),
            4096,
            false,
        ),
        (data_opt, 65536, false),
    ];
    for (i, (opts, cs, comp)) in variants.iter().enumerate() {
        let img = dir.path().join(format!("f{i}.qcow2"));
        make(&img, opts, *cs, *comp);
        assert_matches_qemu(&img).await;
    }
}

#[tokio::test]
async fn convert_compressed_zlib_and_zstd() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src.qcow2");
    make(&src, "cluster_size=4096", 4096, false);
    for ct in ["zlib", "zstd"] {
        let dst = dir.path().join(format!("{ct}.qcow2"));
        let o = format!("compression_type={ct},cluster_size=4096");
        let (s, d) = (src.to_str().unwrap(), dst.to_str().unwrap());
        common::run(
            "qemu-img",
            &["convert", "-c", "-O", "qcow2", "-o", &o, s, d],
        );
        let r = assert_matches_qemu(&dst).await;
        assert!(r.compressed_clusters > 50, "{ct}: {r:?}");
    }
}

#[tokio::test]
async fn snapshots_and_backing_chain() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("s.qcow2");
    let p = img.to_str().unwrap();
    make(&img, "cluster_size=65536", 65536, true);
    common::run("qemu-img", &["snapshot", "-c", "one", p]);
    common::qemu_io(p, &["write -P 7 64k 200k", "discard 0 64k"]);
    common::run("qemu-img", &["snapshot", "-c", "two", p]);
    common::qemu_io(p, &["write -P 8 1M 64k"]);
    assert_matches_qemu(&img).await;
    common::run("qemu-img", &["snapshot", "-d", "one", p]);
    assert_matches_qemu(&img).await;

    let top = dir.path().join("top.qcow2");
    let t = top.to_str().unwrap();
    common::run(
        "qemu-img",
        &["create", "-q", "-f", "qcow2", "-b", p, "-F", "qcow2", t],
    );
    common::qemu_io(t, &["write -P 9 100k 10k", "write -z 2M 64k"]);
    assert_matches_qemu(&top).await;
}

#[tokio::test]
async fn persistent_bitmap() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("b.qcow2");
    let p = img.to_str().unwrap();
    common::qemu_create(p, "", "64M");
    common::run("qemu-img", &["bitmap", "--add", p, "b0"]);
    common::qemu_io(p, &["write -P 1 0 1M", "write -P 2 40M 64k"]);
    let r = assert_matches_qemu(&img).await;
    assert!(r.is_clean());
}
