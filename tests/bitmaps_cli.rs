//! `qcow2 bitmap` and `qcow2 info` against `qemu-img bitmap` and `qemu-img info`: the same
//! command lines on copies of one image give the same bitmaps (names, flags, granularities,
//! dirty ranges as `qemu-nbd -B` reports them), the same listings and the same refusals.

use crate::bitmaps::qemu_dirty;
use crate::common::{self, path_in, qcow2, run, status};

/// Run `bitmap ARGS` with qemu-img on `theirs` and with ours on `ours`; both exit codes.
fn both(theirs: &str, ours: &str, args: &[&str]) -> (i32, i32) {
    let with = |img: &str| -> Vec<String> {
        let mut v: Vec<String> = vec!["bitmap".into()];
        v.extend(args.iter().map(|a| {
            if *a == "IMG" {
                img.to_string()
            } else {
                a.to_string()
            }
        }));
        v
    };
    let q = with(theirs);
    let q: Vec<&str> = q.iter().map(String::as_str).collect();
    let (qc, _) = status("qemu-img", &q);
    let o = with(ours);
    let o: Vec<&str> = o.iter().map(String::as_str).collect();
    (qc, qcow2(&o).code)
}

/// `info --output=json` minus the lines that name the file or its size on disk.
fn info_json(img: &str) -> String {
    let j = run("qemu-img", &["info", "--output=json", img]);
    j.lines()
        .filter(|l| !l.contains("filename") && !l.contains("actual-size"))
        // The file's length: our clusters are placed differently.
        .filter(|l| !l.starts_with("                \"virtual-size\""))
        .collect::<Vec<_>>()
        .join("\n")
}

#[test]
fn bitmap_commands_match_qemu_img() {
    let dir = tempfile::tempdir().unwrap();
    let (theirs, ours) = (
        path_in(dir.path(), "q.qcow2"),
        path_in(dir.path(), "o.qcow2"),
    );
    for img in [&theirs, &ours] {
        common::qemu_create(img, "cluster_size=4k", "16M");
    }
    let steps: &[&[&str]] = &[
        &["--add", "IMG", "a"],
        &["--add", "-g", "512", "IMG", "small"],
        &["--add", "--disable", "-g", "1M", "IMG", "big"],
        &["--add", "IMG", "a"],                 // exists
        &["--add", "-g", "1000", "IMG", "odd"], // not a power of 2
        &["--clear", "-g", "4k", "IMG", "a"],   // -g without --add
        &["--enable", "IMG", "nope"],           // not found
        &["--add", "IMG"],                      // no bitmap name
        &["IMG", "a"],                          // no action
        &["--add", "--remove", "IMG", "tmp"],
    ];
    for args in steps {
        let (q, o) = both(&theirs, &ours, args);
        assert_eq!(q, o, "bitmap {args:?}");
    }
    for img in [&theirs, &ours] {
        common::qemu_io(img, &["write 1M 5000", "write 9M 1"]);
    }
    for args in [
        &["--merge", "small", "IMG", "big"][..],
        &["--enable", "IMG", "big"],
        &["--disable", "IMG", "a"],
        &["--clear", "IMG", "small"],
    ] {
        assert_eq!(both(&theirs, &ours, args), (0, 0), "bitmap {args:?}");
    }
    for img in [&theirs, &ours] {
        common::qemu_io(img, &["write 12M 64k"]);
    }
    assert_eq!(info_json(&theirs), info_json(&ours));
    for name in ["a", "small", "big"] {
        assert_eq!(qemu_dirty(&theirs, name), qemu_dirty(&ours, name), "{name}");
    }
    common::assert_check_clean(std::path::Path::new(&ours));
}

#[test]
fn merge_from_another_image() {
    let dir = tempfile::tempdir().unwrap();
    let (src, dst) = (
        path_in(dir.path(), "src.qcow2"),
        path_in(dir.path(), "dst.qcow2"),
    );
    let copy = path_in(dir.path(), "copy.qcow2");
    for img in [&src, &dst] {
        common::qemu_create(img, "", "8M");
        run("qemu-img", &["bitmap", "--add", "-g", "64k", img, "b"]);
    }
    common::qemu_io(&src, &["write 3M 70k"]);
    std::fs::copy(&dst, &copy).unwrap();
    let args = |img: &str| {
        [
            "bitmap", "--merge", "b", "-b", &src, "-F", "qcow2", img, "b",
        ]
        .map(String::from)
    };
    run("qemu-img", &args(&copy).each_ref().map(String::as_str));
    let r = qcow2(&args(&dst).each_ref().map(String::as_str));
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert_eq!(qemu_dirty(&dst, "b"), qemu_dirty(&copy, "b"));
    assert_eq!(qemu_dirty(&dst, "b"), vec![(3 << 20, 128 << 10)]);
}

#[test]
fn info_lists_bitmaps_as_qemu_img() {
    let dir = tempfile::tempdir().unwrap();
    let img = path_in(dir.path(), "i.qcow2");
    common::qemu_create(&img, "", "8M");
    run("qemu-img", &["bitmap", "--add", &img, "on"]);
    run(
        "qemu-img",
        &["bitmap", "--add", "--disable", "-g", "512", &img, "off"],
    );
    for out in ["human", "json"] {
        let theirs = run("qemu-img", &["info", &format!("--output={out}"), &img]);
        let ours = qcow2(&["info", &format!("--output={out}"), &img]);
        let pick = |t: &str| -> String {
            let from = t
                .find("ormat specific")
                .or(t.find("format-specific"))
                .unwrap();
            t[from..].lines().take(30).collect::<Vec<_>>().join("\n")
        };
        assert_eq!(pick(&ours.stdout), pick(&theirs), "--output={out}");
    }
}

#[test]
fn convert_copies_bitmaps_as_qemu_img() {
    let dir = tempfile::tempdir().unwrap();
    let src = path_in(dir.path(), "src.qcow2");
    common::qemu_create(&src, "", "8M");
    run("qemu-img", &["bitmap", "--add", "-g", "4k", &src, "on"]);
    run("qemu-img", &["bitmap", "--add", "--disable", &src, "off"]);
    common::qemu_io(&src, &["write 1M 5000", "write 6M 64k"]);
    let (theirs, ours) = (
        path_in(dir.path(), "q.qcow2"),
        path_in(dir.path(), "o.qcow2"),
    );
    run(
        "qemu-img",
        &["convert", "--bitmaps", "-O", "qcow2", &src, &theirs],
    );
    let r = qcow2(&["convert", "--bitmaps", "-O", "qcow2", &src, &ours]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    common::assert_check_clean(std::path::Path::new(&ours));
    assert_eq!(info_json(&theirs), info_json(&ours));
    for name in ["on", "off"] {
        assert_eq!(qemu_dirty(&theirs, name), qemu_dirty(&ours, name), "{name}");
    }
    // Refusals: a raw target, --skip-broken-bitmaps alone, an inconsistent source bitmap.
    let raw = path_in(dir.path(), "o.raw");
    let cases: [&[&str]; 2] = [
        &["convert", "--bitmaps", "-O", "raw", &src, &raw],
        &[
            "convert",
            "--skip-broken-bitmaps",
            "-O",
            "qcow2",
            &src,
            &raw,
        ],
    ];
    for args in cases {
        assert_eq!(status("qemu-img", args).0, qcow2(args).code, "{args:?}");
    }
    let crashed = path_in(dir.path(), "crashed.qcow2");
    std::fs::copy(&src, &crashed).unwrap();
    let _ = status(
        "qemu-io",
        &["-c", "write 0 4k", "-c", "sigraise 9", &crashed],
    );
    let out = path_in(dir.path(), "skip.qcow2");
    let r = qcow2(&["convert", "--bitmaps", "-O", "qcow2", &crashed, &out]);
    assert_eq!(r.code, 1, "{}", r.stderr);
    assert!(
        r.stderr.contains("Cannot copy inconsistent bitmap"),
        "{}",
        r.stderr
    );
    let args = [
        "convert",
        "--bitmaps",
        "--skip-broken-bitmaps",
        "-O",
        "qcow2",
        &crashed,
        &out,
    ];
    let r = qcow2(&args);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(
        r.stderr.contains("Skipping inconsistent bitmap 'off'"),
        "{}",
        r.stderr
    );
    assert!(!run("qemu-img", &["info", &out]).contains("bitmaps:"));
}
