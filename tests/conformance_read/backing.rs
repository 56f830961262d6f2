//! Backing chains: raw and qcow2 bases, shrunk bases, odd-sized raw files, v2 overlays.

use crate::common::{self, run_in};

use super::check::*;
use super::harness::*;

/// A 3-deep chain with mixed cluster sizes and relative names: top (64k) over middle (4k)
/// over a raw base that is shorter than the overlays. Created from inside the tempdir with
/// relative names, read from another working directory.
#[test]
fn backing_chain_raw_base() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    std::fs::create_dir(d.join("sub")).unwrap();
    // base.raw: 3 MiB + 512, patterned.
    let base_size = 3 * M + 512;
    common::qemu_create_in(d, "sub/base.raw", "raw", "", base_size);
    pattern_file(d);
    run_in(
        d,
        "qemu-io",
        &[
            "-f",
            "raw",
            "-c",
            "write -s mixed.pat 0 3M",
            "-c",
            "write -P 0xb2 1000 3000",
            "-c",
            "write -P 0xb3 3145728 512",
            "sub/base.raw",
        ],
    );
    // middle (4k clusters, 5 MiB) in sub/, backing "base.raw" (relative to sub/).
    common::qemu_create_in(
        d,
        "sub/middle.qcow2",
        "qcow2",
        "cluster_size=4k,backing_file=base.raw,backing_fmt=raw",
        "5M",
    );
    qemu_io(
        d,
        "sub/middle.qcow2",
        &[
            format!("write -s {PAT} 4096 8192"),
            "write -P 0xc2 10001 5000".into(),
            "write -z 65536 65536".into(),
            "discard 131072 8192".into(),
            format!("write -c -s {PAT} 1048576 8192"),
            "write -P 0xc4 3144000 5000".into(),
            "write -z 2097152 4096".into(),
            "write -P 0xc5 4194304 4096".into(),
        ],
    );
    // top (64k clusters, 6 MiB) in d, backing "sub/middle.qcow2".
    common::qemu_create_in(
        d,
        "top.qcow2",
        "qcow2",
        "cluster_size=64k,backing_file=sub/middle.qcow2,backing_fmt=qcow2",
        "6M",
    );
    qemu_io(
        d,
        "top.qcow2",
        &[
            "write -P 0xd1 7 100".into(),
            format!("write -s {PAT} 70000 1000"),
            "write -z 196608 65536".into(),
            "discard 2097152 65536".into(),
            format!("write -c -s {PAT} 2162688 65536"),
            "write -P 0xd4 3145000 2000".into(),
            "write -z 1048576 4096".into(),
            "write -P 0xd5 6291000 456".into(),
        ],
    );
    let mut errors = Vec::new();
    for img in ["sub/base.raw", "sub/middle.qcow2", "top.qcow2"] {
        if img.ends_with(".qcow2") {
            errors.extend(check_image(img, &d.join(img)));
        }
    }
    report(errors);
}

/// A qcow2 base in a chain (v2 overlay over v3 base over v3 base) with compressed and zero
/// clusters at every level, and an overlay larger than its backing file.
#[test]
fn backing_chain_qcow2_base() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    common::qemu_create_in(d, "base.qcow2", "qcow2", "cluster_size=512", "2M");
    qemu_io(d, "base.qcow2", &workload_small(0xa0));
    common::qemu_create_in(
        d,
        "mid.qcow2",
        "qcow2",
        "cluster_size=2M,compression_type=zstd,backing_file=base.qcow2,backing_fmt=qcow2",
        "4M",
    );
    qemu_io(
        d,
        "mid.qcow2",
        &[
            "write -P 0xb1 1000 1000".into(),
            "write -c -P 0xb2 2097152 2097152".into(),
        ],
    );
    common::qemu_create_in(
        d,
        "top.qcow2",
        "qcow2",
        "compat=0.10,cluster_size=4k,backing_file=mid.qcow2,backing_fmt=qcow2",
        "5M",
    );
    qemu_io(
        d,
        "top.qcow2",
        &[
            "write -P 0xc1 3 5000".into(),
            "write -z 8192 4096".into(),
            "discard 16384 8192".into(),
            "write -c -P 0xc2 32768 8192".into(),
            "write -P 0xc3 2097000 1000".into(),
            "write -P 0xc4 4194300 10000".into(),
        ],
    );
    let mut errors = Vec::new();
    for img in ["base.qcow2", "mid.qcow2", "top.qcow2"] {
        errors.extend(check_image(img, &d.join(img)));
    }
    report(errors);
}

/// An overlay over a qcow2 base that was shrunk (`resize --shrink`) to a size that is not a
/// multiple of its cluster size, leaving stale data in its last cluster past the end: the
/// overlay reads zeros there, not the stale bytes.
#[test]
fn backing_shrunk_base() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    common::qemu_create_in(d, "base.qcow2", "qcow2", "", "2M");
    qemu_io(d, "base.qcow2", &[format!("write -s {PAT} 0 2M")]);
    run_in(
        d,
        "qemu-img",
        &["resize", "-q", "--shrink", "base.qcow2", "1049088"],
    );
    common::qemu_create_in(
        d,
        "top.qcow2",
        "qcow2",
        "cluster_size=4k,backing_file=base.qcow2,backing_fmt=qcow2",
        "3M",
    );
    qemu_io(
        d,
        "top.qcow2",
        &[
            "write -P 8 1048000 600".into(),
            "write -P 9 1052672 4096".into(),
        ],
    );
    report(check_image("shrunk_base_overlay", &d.join("top.qcow2")));
}

/// A raw file whose size is not a multiple of 512: QEMU rounds a raw image's size up to 512
/// bytes and reports the bytes past the end of the file as a zero extent of the raw image
/// (`qemu-img map`: `present, zero, depth of the raw layer, offset`); `qemu-img convert`
/// writes the rounded size. Checked on the raw file itself and through an overlay.
#[test]
fn raw_of_odd_byte_size() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    pattern_file(d);
    let mut data = std::fs::read(d.join(PAT)).unwrap();
    data.truncate(1_000_100);
    std::fs::write(d.join("base.raw"), &data).unwrap();
    common::qemu_create_in(
        d,
        "top.qcow2",
        "qcow2",
        "backing_file=base.raw,backing_fmt=raw",
        "2M",
    );
    qemu_io(d, "top.qcow2", &["write -P 3 4096 4096".into()]);
    let mut errors = Vec::new();
    let raw = d.join("base.raw");
    let want = common::qemu_raw(&raw);
    if let Err(e) = check_convert(&raw, &want) {
        errors.push(format!("base.raw: qcow2 convert -O raw: {e}"));
    }
    match check_map(&raw) {
        Ok(MapOutcome::Same) => {}
        Ok(MapOutcome::KnownHostHoles(e)) | Err(e) => {
            errors.push(format!("base.raw: qcow2 map: {e}"))
        }
    }
    errors.extend(check_image("overlay_over_odd_raw", &d.join("top.qcow2")));
    report(errors);
}

/// A small mixed workload for a 2 MiB image with pattern bytes starting at `p`.
fn workload_small(p: u8) -> Vec<String> {
    vec![
        format!("write -s {PAT} 0 100000"),
        format!("write -P {} 512 513", p + 1),
        "write -z 4096 4096".to_string(),
        "discard 20480 4096".to_string(),
        format!("write -c -s {PAT} 131072 8192"),
        format!("write -c -P {} 139264 4096", p + 2),
        format!("write -P {} 1048000 5000", p + 3),
        "write -z -u 1050000 3000".to_string(),
    ]
}

/// v2 images with a backing file (an implementation refused them): discard and write -z on
/// v2 overlays, where no zero flag exists.
#[test]
fn v2_with_backing() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    common::qemu_create_in(d, "base.qcow2", "qcow2", "compat=0.10", "4M");
    qemu_io(d, "base.qcow2", &["write -P 0x61 0 4M".into()]);
    common::qemu_create_in(
        d,
        "top.qcow2",
        "qcow2",
        "compat=0.10,backing_file=base.qcow2,backing_fmt=qcow2",
        "4M",
    );
    qemu_io(
        d,
        "top.qcow2",
        &[
            "write -P 0x62 100 1000".into(),
            "write -z 131072 65536".into(),
            "write -z 300000 1000".into(),
            "write -c -P 0x63 1048576 65536".into(),
            "write -P 0x64 2097152 65536".into(),
            "discard 2097152 65536".into(),
        ],
    );
    report(check_image("v2_overlay", &d.join("top.qcow2")));
}
