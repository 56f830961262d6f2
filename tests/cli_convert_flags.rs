//! `qcow2 convert -n / --target-is-zero / -S / -B / -F / -o backing_file` against qemu-img
//! convert: both tools run on the same sources into fresh copies of the same destination;
//! exit codes, contents (`qemu-img compare`), qcow2 allocation maps and backing files must
//! agree, and qcow2 results must pass `qemu-img check`.

use std::path::Path;
use std::process::Command;

use crate::common::{assert_check_clean, run};

fn convert(program: &str, args: &[&str], dst: &Path) -> i32 {
    Command::new(program)
        .arg("convert")
        .args(args)
        .arg(dst)
        .output()
        .unwrap()
        .status
        .code()
        .unwrap_or(-1)
}

/// `qemu-img map --output=json` without host offsets (they may differ).
fn map(img: &str) -> serde_json::Value {
    let text = run("qemu-img", &["map", "--output=json", img]);
    let mut v: serde_json::Value = serde_json::from_str(&text).unwrap();
    for e in v.as_array_mut().unwrap() {
        e.as_object_mut().unwrap().remove("offset");
    }
    v
}

fn backing_of(img: &str) -> serde_json::Value {
    let text = run("qemu-img", &["info", "--output=json", img]);
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    v["backing-filename"].clone()
}

/// What the destination is before the convert.
#[derive(Clone, Copy)]
enum Before {
    Missing,
    /// A qcow2 (or raw) image full of 0x55 data, larger than every source.
    Full(&'static str),
    /// A raw file smaller than the sources.
    Small,
}

fn same_as_qemu(dir: &Path, before: Before, args: &[&str]) {
    let (theirs, ours) = (dir.join("theirs.img"), dir.join("ours.img"));
    let d = |s: &str| dir.join(s).to_str().unwrap().to_string();
    for t in [&theirs, &ours] {
        let _ = std::fs::remove_file(t);
        let t = t.to_str().unwrap();
        match before {
            Before::Missing => {}
            Before::Full(fmt) => {
                run("qemu-img", &["convert", "-O", fmt, &d("full.qcow2"), t]);
            }
            Before::Small => {
                run("qemu-img", &["create", "-q", "-f", "raw", t, "5M"]);
            }
        }
    }
    let args: Vec<String> = args
        .iter()
        .map(|a| {
            if a.contains('.') && !a.contains('=') {
                d(a)
            } else {
                a.to_string()
            }
        })
        .collect();
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let code = convert("qemu-img", &args, &theirs);
    assert_eq!(
        convert(env!("CARGO_BIN_EXE_qcow2"), &args, &ours),
        code,
        "{args:?}"
    );
    if code != 0 {
        return;
    }
    let (t, o) = (theirs.to_str().unwrap(), ours.to_str().unwrap());
    run("qemu-img", &["compare", "-q", t, o]);
    if args.windows(2).any(|w| w == ["-O", "qcow2"]) {
        assert_eq!(map(o), map(t), "{args:?}: allocation");
        assert_eq!(backing_of(o), backing_of(t), "{args:?}: backing file");
        assert_check_clean(&ours);
    }
}

#[test]
fn convert_flags_match_qemu_img() {
    let dir = tempfile::tempdir().unwrap();
    let d = |s: &str| dir.path().join(s).to_str().unwrap().to_string();
    run(
        "qemu-img",
        &["create", "-q", "-f", "qcow2", &d("a.qcow2"), "10M"],
    );
    run(
        "qemu-io",
        &[
            "-c",
            "write -P 1 0 100k",
            "-c",
            "write -z 1M 1M",
            &d("a.qcow2"),
        ],
    );
    run(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            &d("a.qcow2"),
            "-F",
            "qcow2",
            &d("ov.qcow2"),
        ],
    );
    run(
        "qemu-io",
        &[
            "-c",
            "write -P 3 3M 64k",
            "-c",
            "write -z 0 4k",
            &d("ov.qcow2"),
        ],
    );
    run(
        "qemu-img",
        &["create", "-q", "-f", "raw", &d("r.raw"), "10M"],
    );
    run(
        "qemu-io",
        &["-f", "raw", "-c", "write -P 2 5M 100k", &d("r.raw")],
    );
    run(
        "qemu-img",
        &["create", "-q", "-f", "qcow2", &d("full.qcow2"), "12M"],
    );
    run("qemu-io", &["-c", "write -P 0x55 0 12M", &d("full.qcow2")]);
    let b = d("a.qcow2");
    let ob = format!("backing_file={b},backing_fmt=qcow2");
    use Before::*;
    for (before, args) in [
        (Missing, &["-O", "raw", "a.qcow2"][..]),
        (Missing, &["-S", "0", "-O", "raw", "a.qcow2"]),
        (Missing, &["-S", "0", "-O", "qcow2", "a.qcow2"]),
        (Missing, &["-S", "64k", "-O", "qcow2", "r.raw"]),
        (Missing, &["-S", "1000", "-O", "raw", "a.qcow2"]),
        (Missing, &["--target-is-zero", "-O", "raw", "a.qcow2"]),
        (Missing, &["-O", "qcow2", "-B", &b, "ov.qcow2"]),
        (
            Missing,
            &["-O", "qcow2", "-B", &b, "-F", "qcow2", "ov.qcow2"],
        ),
        (Missing, &["-O", "qcow2", "-o", &ob, "ov.qcow2"]),
        (Missing, &["-O", "qcow2", "-B", &b, "-F", "qcow2", "r.raw"]),
        (
            Missing,
            &["-O", "qcow2", "-B", &b, "-F", "qcow2", "full.qcow2"],
        ),
        (Missing, &["-O", "raw", "-B", &b, "-F", "qcow2", "ov.qcow2"]),
        (Full("qcow2"), &["-n", "-O", "qcow2", "a.qcow2"]),
        (Full("qcow2"), &["-n", "-O", "qcow2", "ov.qcow2"]),
        (
            Full("qcow2"),
            &["-n", "--target-is-zero", "-O", "qcow2", "a.qcow2"],
        ),
        (Full("raw"), &["-n", "-O", "raw", "ov.qcow2"]),
        (Small, &["-n", "-O", "raw", "a.qcow2"]),
        (
            Full("qcow2"),
            &["-n", "-B", &b, "-F", "qcow2", "-O", "qcow2", "ov.qcow2"],
        ),
    ] {
        same_as_qemu(dir.path(), before, args);
    }
}
