//! Format probing: files in formats qemu-img recognises but we cannot read (vmdk, vhdx, ...)
//! are refused with an error naming the format, never read as raw disks; `-f raw` still
//! forces raw.

use crate::common;

use common::{path_in, qcow2, run};

/// `qemu-img create` options for each foreign format QEMU can create.
const FOREIGN: &[(&str, &[&str])] = &[
    ("vmdk", &[]),
    ("vhdx", &[]),
    ("vpc", &[]),
    ("vdi", &[]),
    ("qed", &[]),
    ("qcow", &[]),
    ("parallels", &[]),
    (
        "luks",
        &[
            "--object",
            "secret,id=sec0,data=abc",
            "-o",
            "key-secret=sec0,iter-time=10",
        ],
    ),
];

/// Make a 1 MiB image of `format` with qemu-img in `dir`.
fn foreign_image(dir: &std::path::Path, format: &str, opts: &[&str]) -> String {
    let img = path_in(dir, &format!("disk.{format}"));
    let mut args = vec!["create", "-q", "-f", format];
    args.extend_from_slice(opts);
    args.extend_from_slice(&[&img, "1M"]);
    run("qemu-img", &args);
    img
}

#[test]
fn foreign_formats_are_refused_by_name() {
    let dir = tempfile::tempdir().unwrap();
    for (format, opts) in FOREIGN {
        let img = foreign_image(dir.path(), format, opts);
        let out = path_in(dir.path(), &format!("out-{format}.qcow2"));
        for args in [
            &["info", &img][..],
            &["convert", "-O", "qcow2", &img, &out],
            &["map", &img],
            &["io", "-c", "read 0 512", &img],
        ] {
            let r = qcow2(args);
            assert_eq!(r.code, 1, "{args:?} on {format}: {}{}", r.stdout, r.stderr);
            let named = format!("image format '{format}' is not supported");
            assert!(r.stderr.contains(&named), "{args:?}: {}", r.stderr);
        }
        assert!(
            !std::path::Path::new(&out).exists(),
            "convert created {out}"
        );
        // `-f raw` still reads the container as bytes, as qemu-img does.
        let raw = qcow2(&["info", "-f", "raw", &img]);
        assert_eq!(raw.code, 0, "{}", raw.stderr);
        assert!(raw.stdout.contains("file format: raw"), "{}", raw.stdout);
    }
}

#[test]
fn dmg_is_recognised_by_its_name() {
    let dir = tempfile::tempdir().unwrap();
    let img = path_in(dir.path(), "disk.dmg");
    std::fs::write(&img, vec![0u8; 4096]).unwrap();
    let r = qcow2(&["info", &img]);
    assert_eq!(r.code, 1, "{}", r.stdout);
    assert!(r.stderr.contains("'dmg'"), "{}", r.stderr);
}

#[test]
fn raw_and_qcow2_still_probe() {
    let dir = tempfile::tempdir().unwrap();
    let raw = path_in(dir.path(), "disk.img");
    std::fs::write(&raw, b"just some bytes, not a magic").unwrap();
    assert!(common::qcow2_ok(&["info", &raw]).contains("file format: raw"));
    let q = path_in(dir.path(), "disk.qcow2");
    common::qemu_create(&q, "", "1M");
    assert!(common::qcow2_ok(&["info", &q]).contains("file format: qcow2"));
}
