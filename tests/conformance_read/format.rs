//! Variants of the format: cluster sizes, refcount widths, compat levels, compression
//! types, extended L2, odd sizes, lazy refcounts, images reshaped by `qemu-img`.

use crate::common;

use std::process::Command;

use super::check::*;
use super::harness::*;

/// Every cluster size from 512 B to 2 MiB (the first four are the ones the brief names; the
/// others are cheap). Small clusters give multi-cluster L1 tables, many L2 tables and writes
/// crossing L2 tables.
#[test]
fn cluster_sizes() {
    let variants: Vec<Variant> = (9..=21)
        .map(|bits| {
            let c = 1u64 << bits;
            std_variant(
                &format!("cluster_{c}"),
                &format!("cluster_size={c}"),
                c,
                true,
            )
        })
        .collect();
    run_variants(&variants);
}

/// Every refcount width, with 4 KiB clusters, and again with 512 B clusters where one
/// refcount block covers few clusters (64-bit: 64 clusters, 32 KiB) so QEMU grows the
/// refcount table past its first cluster.
#[test]
fn refcount_widths() {
    let mut variants = Vec::new();
    for bits in [1, 2, 4, 8, 16, 32, 64] {
        variants.push(std_variant(
            &format!("refcount_bits_{bits}"),
            &format!("refcount_bits={bits},cluster_size=4k"),
            4 * K,
            true,
        ));
        let mut v = std_variant(
            &format!("refcount_bits_{bits}_512"),
            &format!("refcount_bits={bits},cluster_size=512"),
            512,
            true,
        );
        // Enough host clusters (> 2 MiB) to need a second refcount-table cluster at 64 bits.
        v.io.push(format!("write -P 0x5c {} {}", M + 3, 2 * M));
        variants.push(v);
    }
    run_variants(&variants);
}

#[test]
fn compat_versions() {
    run_variants(&[
        std_variant("compat_0.10", "compat=0.10", 64 * K, true),
        std_variant("compat_0.10_4k", "compat=0.10,cluster_size=4k", 4 * K, true),
        std_variant("compat_1.1", "compat=1.1", 64 * K, true),
    ]);
}

#[test]
fn compression_types() {
    let mut variants = Vec::new();
    for ct in ["zlib", "zstd"] {
        for (c, cs) in [(64 * K, "64k"), (4 * K, "4k")] {
            // Compressed by qemu-img convert -c, then written by qemu-io (compressed writes,
            // overwrites of compressed clusters, zeroes and discards).
            let size = std_size(c);
            let mut v = Variant::new(
                format!("convert_c_{ct}_{cs}"),
                format!("compression_type={ct},cluster_size={cs}"),
                size,
                vec![
                    format!("write -c -P 0x5a {} {}", free_area(c, size), 2 * c),
                    format!("write -P 0x5b {} {}", 3 * c - 9, 20),
                    format!("write -z {} {}", 5 * c + 3, c),
                    format!("discard {} {}", 8 * c, c),
                    format!("write -z {} {}", 9 * c, c),
                ],
            );
            v.convert_c = Some((format!("cluster_size={cs}"), workload(c, size, false)));
            variants.push(v);
            // Compressed writes by qemu-io on a fresh image of that type.
            variants.push(std_variant(
                &format!("write_c_{ct}_{cs}"),
                &format!("compression_type={ct},cluster_size={cs}"),
                c,
                true,
            ));
        }
    }
    // Compressed clusters of 512 B and 2 MiB clusters.
    variants.push(std_variant(
        "write_c_zstd_512",
        "compression_type=zstd,cluster_size=512",
        512,
        true,
    ));
    variants.push(std_variant(
        "write_c_zstd_2M",
        "compression_type=zstd,cluster_size=2M",
        2 * M,
        true,
    ));
    run_variants(&variants);
}

/// Subcluster-granular workload for extended L2 (32 subclusters per cluster).
fn subcluster_workload(c: u64) -> Vec<String> {
    let s = c / 32;
    vec![
        format!("write -P 0x21 {} {}", s, s),
        format!("write -P 0x22 {} {}", 3 * s + 5, 2 * s),
        format!("write -z {} {}", 8 * s, 3 * s),
        format!("write -P 0x23 {} {}", c + 31 * s, 2 * s),
        format!("write -z {} {}", 2 * c + s + 1, s + 7),
        format!("write -P 0x24 {} {}", 3 * c, c),
        format!("write -z {} {}", 3 * c + 4 * s, 4 * s),
        format!("discard {} {}", 3 * c + 16 * s, 8 * s),
        format!("write -z -u {} {}", 3 * c + 30 * s, 2 * s),
        format!("write -P 0x25 {} {}", 4 * c + 17, 1),
        format!("write -c -P 0x26 {} {}", 5 * c, c),
        format!("write -P 0x27 {} {}", 5 * c + 9 * s + 1, s),
        format!("write -z {} {}", 6 * c, 16 * s),
        format!("write -P 0x28 {} {}", 6 * c + 16 * s, s),
    ]
}

#[test]
fn extended_l2() {
    let mut sub32 = std_variant(
        "extended_l2_32k",
        "extended_l2=on,cluster_size=32k",
        32 * K,
        true,
    );
    sub32.io.extend(
        subcluster_workload(32 * K)
            .into_iter()
            .map(|c| shift_cmd(&c, 40 * 32 * K)),
    );
    let mut sub64 = std_variant(
        "extended_l2_64k",
        "extended_l2=on,cluster_size=64k",
        64 * K,
        true,
    );
    sub64.io.extend(
        subcluster_workload(64 * K)
            .into_iter()
            .map(|c| shift_cmd(&c, 20 * 64 * K)),
    );
    let mut sub2m_io = subcluster_workload(2 * M);
    sub2m_io.push(format!("write -P 0x29 {} {}", 16 * M - 3000, 3000));
    let sub2m = Variant::new(
        "extended_l2_2M_subclusters",
        "extended_l2=on,cluster_size=2M",
        16 * M,
        sub2m_io,
    );
    run_variants(&[
        sub32,
        sub64,
        sub2m,
        std_variant(
            "extended_l2_2M",
            "extended_l2=on,cluster_size=2M",
            2 * M,
            true,
        ),
        std_variant(
            "extended_l2_16k_zstd_refcount_2",
            "extended_l2=on,cluster_size=16k,compression_type=zstd,refcount_bits=2",
            16 * K,
            true,
        ),
    ]);
}

/// Move the offset (the next-to-last word) of a qemu-io command by `by` bytes.
fn shift_cmd(cmd: &str, by: u64) -> String {
    let mut words: Vec<String> = cmd.split(' ').map(str::to_string).collect();
    let n = words.len();
    let off: u64 = words[n - 2].parse().unwrap();
    words[n - 2] = (off + by).to_string();
    words.join(" ")
}

#[test]
fn odd_virtual_sizes() {
    let size = 5 * M + 1536;
    let io = |c: u64| {
        let mut w = workload(c, size, true);
        w.push(format!("write -P 0xcd {} {}", size - 3 * 512, 3 * 512));
        w.push(format!("write -z {} 512", size - 512));
        w
    };
    run_variants(&[
        Variant::new("size_5M+1536_64k", "cluster_size=64k", size, io(64 * K)),
        Variant::new("size_5M+1536_4k", "cluster_size=4k", size, io(4 * K)),
        Variant::new(
            "size_5M+1536_64k_v2",
            "cluster_size=64k,compat=0.10",
            size,
            io(64 * K),
        ),
        Variant::new(
            "size_5M+1536_32k_extl2",
            "cluster_size=32k,extended_l2=on",
            size,
            io(32 * K),
        ),
        Variant::new("size_1536_empty", "", 1536, vec![]),
        Variant::new(
            "size_1536_written",
            "cluster_size=4k",
            1536,
            vec!["write -P 7 3 1000".into(), "write -z 1024 512".into()],
        ),
    ]);
}

#[test]
fn lazy_refcounts_clean() {
    run_variants(&[
        std_variant("lazy_refcounts", "lazy_refcounts=on", 64 * K, true),
        std_variant(
            "lazy_refcounts_4k_refcount_1",
            "lazy_refcounts=on,cluster_size=4k,refcount_bits=1",
            4 * K,
            true,
        ),
    ]);
}

/// `qemu-io ... -c abort` leaves a lazy-refcounts image with the dirty bit set and refcounts
/// not updated; a read-only open must still read it (without repairing it).
#[test]
fn lazy_refcounts_dirty() {
    let dir = tempfile::tempdir().unwrap();
    let mut errors = Vec::new();
    for (name, opts, c) in [
        ("dirty_64k", "lazy_refcounts=on", 64 * K),
        ("dirty_4k", "lazy_refcounts=on,cluster_size=4k", 4 * K),
    ] {
        let v = std_variant(name, opts, c, true);
        let img = v.build(dir.path());
        let p = img.to_str().unwrap();
        let mut args = vec!["-f", "qcow2"];
        let cmds = [
            format!("write -P 0xd1 {} {}", free_area(c, v.size) + 5, 2 * c),
            format!("write -c -P 0xd2 {} {}", free_area(c, v.size) + 4 * c, c),
            format!("write -z {} {}", 5, c),
            format!("discard {} {}", 16 * c, c),
            "abort".to_string(),
        ];
        for c in &cmds {
            args.extend(["-c", c.as_str()]);
        }
        args.push(p);
        let out = Command::new("qemu-io").args(&args).output().unwrap();
        assert!(!out.status.success(), "qemu-io abort exited cleanly");
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(!text.contains("failed"), "{name}: qemu-io: {text}");
        let dirty = || {
            let info = common::run("qemu-img", &["info", "--output=json", "-U", p]);
            let v: serde_json::Value = serde_json::from_str(&info).unwrap();
            v["dirty-flag"].as_bool().unwrap()
        };
        assert!(dirty(), "{name}: the dirty bit is not set after abort");
        errors.extend(check_image(name, &img));
        assert!(
            dirty(),
            "{name}: the dirty bit was cleared by a read-only check"
        );
    }
    report(errors);
}

/// Images reshaped by `qemu-img amend`, `resize` and `snapshot -a/-d` (moved L1 tables, new
/// refcount structures, expanded zero clusters), written again after each step.
#[test]
fn reshaped_by_qemu_img() {
    let cmd = |args: &[&str]| args.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    let mut variants = Vec::new();
    let mut v = |name: &str, opts: &str, c: u64, compress: bool, after: Vec<Vec<String>>| {
        let mut v = std_variant(name, opts, c, compress);
        let size = v.size;
        v.after = after;
        v.after_io = vec![
            format!("write -s {PAT} {} {}", free_area(c, size) + 3, c + 5),
            format!("write -z {} {}", free_area(c, size) + 2 * c, c),
        ];
        variants.push(v);
    };
    v(
        "amend_refcount_bits_64",
        "cluster_size=4k",
        4 * K,
        true,
        vec![cmd(&["qemu-img", "amend", "-o", "refcount_bits=64", "IMG"])],
    );
    v(
        "amend_refcount_bits_2",
        "cluster_size=512,refcount_bits=16",
        512,
        false,
        vec![cmd(&["qemu-img", "amend", "-o", "refcount_bits=2", "IMG"])],
    );
    v(
        "amend_compat_0.10",
        "cluster_size=64k",
        64 * K,
        true,
        vec![cmd(&["qemu-img", "amend", "-o", "compat=0.10", "IMG"])],
    );
    v(
        "amend_compat_1.1_lazy",
        "cluster_size=64k,compat=0.10",
        64 * K,
        true,
        vec![cmd(&[
            "qemu-img",
            "amend",
            "-o",
            "compat=1.1,lazy_refcounts=on",
            "IMG",
        ])],
    );
    v(
        "resize_grow_512",
        "cluster_size=512",
        512,
        true,
        vec![
            cmd(&["qemu-img", "resize", "IMG", "+3M"]),
            cmd(&["qemu-img", "resize", "IMG", "9437696"]),
        ],
    );
    v(
        "resize_shrink_4k",
        "cluster_size=4k",
        4 * K,
        true,
        vec![cmd(&["qemu-img", "resize", "--shrink", "IMG", "3670528"])],
    );
    v(
        "snapshot_apply_delete",
        "cluster_size=4k",
        4 * K,
        true,
        vec![
            cmd(&["qemu-img", "snapshot", "-c", "a", "IMG"]),
            cmd(&["qemu-img", "snapshot", "-c", "b", "IMG"]),
            cmd(&["qemu-img", "snapshot", "-a", "a", "IMG"]),
            cmd(&["qemu-img", "snapshot", "-d", "b", "IMG"]),
        ],
    );
    run_variants(&variants);
}
