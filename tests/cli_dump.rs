//! `qcow2 dump`: decodes QEMU images, and survives damaged or hostile ones with bounded output.

use crate::common;

use common::{path_in, qcow2, qcow2_ok, run};

#[test]
fn dumps_a_qemu_image() {
    let dir = tempfile::tempdir().unwrap();
    let base = path_in(dir.path(), "base.qcow2");
    let p = path_in(dir.path(), "a.qcow2");
    common::qemu_create(&base, "", "4M");
    common::qemu_overlay("base.qcow2", "qcow2", &p);
    common::qemu_io(&p, &["write -P 1 0 64k", "write -z 64k 64k"]);
    run("qemu-img", &["snapshot", "-c", "s1", &p]);
    let out = qcow2_ok(&["dump", "--l2", "--refcounts", &p]);
    for want in [
        "version                  3",
        "cluster_bits             16 (65536 bytes)",
        "backing format \"qcow2\"",
        "backing file: \"base.qcow2\"",
        "header validation: ok",
        "L1[0] = ",
        "L2[0] guest 0x0: data at 0x",
        "L2[1] guest 0x10000: zero",
        "refcount block 0 at ",
        "clusters 0..",
        "id \"1\" name \"s1\"",
    ] {
        assert!(out.contains(want), "missing {want:?} in:\n{out}");
    }
}

#[test]
fn compressed_and_extended_entries() {
    let dir = tempfile::tempdir().unwrap();
    let src = path_in(dir.path(), "src.qcow2");
    let c = path_in(dir.path(), "c.qcow2");
    common::qemu_create(&src, "extended_l2=on", "1M");
    common::qemu_io(&src, &["write -P 1 0 4k", "write -z 8k 4k"]);
    let out = qcow2_ok(&["dump", "--l2", &src]);
    assert!(
        out.contains("subclusters alloc 0x00000003 zero 0x00000030"),
        "{out}"
    );
    run("qemu-img", &["convert", "-c", "-O", "qcow2", &src, &c]);
    let out = qcow2_ok(&["dump", "--l2", &c]);
    assert!(out.contains("compressed at 0x"), "{out}");
}

/// Write a v3 header with the given fields; the rest of the cluster is left as `fill`.
fn hostile_image(
    path: &str,
    l1_size: u32,
    l1_off: u64,
    rt_off: u64,
    rt_clusters: u32,
    body: &[u8],
) {
    let mut b = vec![0u8; 65536];
    b[..4].copy_from_slice(b"QFI\xfb");
    b[4..8].copy_from_slice(&3u32.to_be_bytes());
    b[20..24].copy_from_slice(&16u32.to_be_bytes());
    b[24..32].copy_from_slice(&(1u64 << 40).to_be_bytes());
    b[36..40].copy_from_slice(&l1_size.to_be_bytes());
    b[40..48].copy_from_slice(&l1_off.to_be_bytes());
    b[48..56].copy_from_slice(&rt_off.to_be_bytes());
    b[56..60].copy_from_slice(&rt_clusters.to_be_bytes());
    b[96..100].copy_from_slice(&4u32.to_be_bytes());
    b[100..104].copy_from_slice(&104u32.to_be_bytes());
    b.extend_from_slice(body);
    std::fs::write(path, b).unwrap();
}

#[test]
fn hostile_images_give_bounded_output() {
    let dir = tempfile::tempdir().unwrap();
    let p = path_in(dir.path(), "evil.qcow2");
    // Every L1 and refcount table entry points at cluster 1, which is full of 0xff / 0x01.
    let mut body = Vec::new();
    for _ in 0..8192 {
        body.extend_from_slice(&0x8000_0000_0001_0000u64.to_be_bytes());
    }
    hostile_image(&p, u32::MAX, 65536, 65536, u32::MAX, &body);
    let r = qcow2(&["dump", "--l2", "--refcounts", "--limit", "50", &p]);
    assert!(!r.stderr.contains("panicked"), "{}", r.stderr);
    assert!(
        r.stdout.lines().count() < 400,
        "{} lines",
        r.stdout.lines().count()
    );
    assert!(r.stdout.contains("raise --limit"), "{}", r.stdout);
    // Garbage everywhere, and a truncated file.
    hostile_image(&p, 1 << 20, !0xffff, 0x7fff_0000, 7, &[0xff; 1000]);
    let r = qcow2(&["dump", "--l2", "--refcounts", &p]);
    assert!(!r.stderr.contains("panicked"), "{}", r.stderr);
    std::fs::write(&p, b"QFI\xfb\0\0\0\x03").unwrap();
    let r = qcow2(&["dump", &p]);
    assert_eq!(r.code, 1);
    assert_eq!(r.stderr.lines().count(), 1, "{}", r.stderr);
}
