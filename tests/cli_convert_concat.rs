//! `qcow2 convert SRC1 SRC2 ... DST` against `qemu-img convert`: several sources are
//! concatenated. Both tools run on the same sources; exit codes, stderr (tool name and
//! destination name aside), the destination's content (`qemu-img compare`) and virtual size
//! must agree, and our qcow2 results must pass `qemu-img check`.

use std::path::Path;

use crate::common::chain::run_tool;
use crate::common::{assert_check_clean, qemu_create_in, qemu_io_in, run, run_in};

/// Sources of three kinds and sizes: a qcow2 image with data, a raw file whose size is not a
/// whole number of sectors (QEMU rounds it up), a qcow2 image with data, zeros and a
/// compressed cluster.
fn sources(dir: &Path) {
    qemu_create_in(dir, "a.qcow2", "qcow2", "", "1M");
    qemu_io_in(
        dir,
        "a.qcow2",
        &["write -P 0x11 0 64k", "write -P 0x12 960k 64k"],
    );
    std::fs::write(dir.join("b.raw"), vec![0x22u8; 1_000_000]).unwrap();
    qemu_create_in(dir, "c.qcow2", "qcow2", "cluster_size=4096", "3M");
    qemu_io_in(
        dir,
        "c.qcow2",
        &[
            "write -P 0x33 1M 64k",
            "write -z 1088k 8k",
            "write -c -P 0x34 2M 4k",
        ],
    );
}

/// Run `TOOL ARGS DST` in `dir`, DST being `t.out` for qemu-img and `o.out` for us; returns
/// the exit code and stderr with the tool and destination names normalized.
fn convert(program: &str, dir: &Path, args: &[&str], dst: &str) -> (i32, String) {
    let mut all = vec!["convert"];
    all.extend_from_slice(args);
    all.push(dst);
    let (code, _, err) = run_tool(program, dir, &all);
    (code, err.replace(dst, "DST"))
}

/// Both tools give the same exit code and stderr; returns the exit code.
fn same_as_qemu(dir: &Path, args: &[&str]) -> i32 {
    let theirs = convert("qemu-img", dir, args, "t.out");
    let ours = convert(env!("CARGO_BIN_EXE_qcow2"), dir, args, "o.out");
    assert_eq!(ours, theirs, "{args:?}");
    theirs.0
}

fn virtual_size(img: &Path, fmt: &str) -> u64 {
    let text = run(
        "qemu-img",
        &["info", "-f", fmt, "--output=json", img.to_str().unwrap()],
    );
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    v["virtual-size"].as_u64().unwrap()
}

/// Our output and qemu-img's read the same and have the same size (the sum of the sources').
fn assert_same_output(dir: &Path, fmt: &str, args: &[&str]) {
    let (t, o) = (dir.join("t.out"), dir.join("o.out"));
    let (ts, os) = (t.to_str().unwrap(), o.to_str().unwrap());
    run("qemu-img", &["compare", "-f", fmt, "-F", fmt, ts, os]);
    assert_eq!(virtual_size(&o, fmt), virtual_size(&t, fmt), "{args:?}");
    if fmt == "qcow2" {
        assert_check_clean(&o);
    }
}

#[test]
fn concatenates_as_qemu_img() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    sources(d);
    let srcs = ["a.qcow2", "b.raw", "c.qcow2"];
    let cases: &[(&str, &[&str])] = &[
        ("raw", &["-O", "raw"]),
        ("qcow2", &["-O", "qcow2"]),
        ("qcow2", &["-O", "qcow2", "-o", "cluster_size=512"]),
        ("qcow2", &["-O", "qcow2", "-c"]),
        ("qcow2", &["-O", "qcow2", "-S", "0"]),
        ("raw", &["-O", "raw", "-m", "1"]),
        ("raw", &["-O", "raw", "-W", "-m", "16"]),
    ];
    for (fmt, flags) in cases {
        let mut args = flags.to_vec();
        args.extend_from_slice(&srcs);
        assert_eq!(same_as_qemu(d, &args), 0, "{args:?}");
        assert_same_output(d, fmt, &args);
    }
    let size = virtual_size(&d.join("o.out"), "raw");
    assert_eq!(size, (1 << 20) + 1_000_448 + (3 << 20));
}

/// `-l snapshot.name=` (unlike a bare name) reads the first source's snapshot and
/// concatenates, as qemu-img does.
#[test]
fn snapshot_of_the_first_source() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    sources(d);
    run_in(d, "qemu-img", &["snapshot", "-c", "s1", "a.qcow2"]);
    qemu_io_in(d, "a.qcow2", &["write -P 0x77 0 4k"]);
    let args = ["-l", "snapshot.name=s1", "-O", "raw", "a.qcow2", "c.qcow2"];
    assert_eq!(same_as_qemu(d, &args), 0);
    assert_same_output(d, "raw", &args);
    let args = ["-l", "snapshot.name=nope", "a.qcow2", "c.qcow2"];
    assert_eq!(same_as_qemu(d, &args), 1);
}

/// The same source twice, and `-f` applying to every source.
#[test]
fn repeats_and_forced_formats() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    sources(d);
    let args = [
        "-f", "qcow2", "-O", "qcow2", "c.qcow2", "a.qcow2", "c.qcow2",
    ];
    assert_eq!(same_as_qemu(d, &args), 0);
    assert_same_output(d, "qcow2", &args);
    // -f qcow2 for a raw source: both refuse it (in different words).
    for program in ["qemu-img", env!("CARGO_BIN_EXE_qcow2")] {
        let (code, _) = convert(program, d, &["-f", "qcow2", "a.qcow2", "b.raw"], "x.out");
        assert_eq!(code, 1);
    }
}

/// `-n` into an existing image: large enough, or refused as too small for the sum.
#[test]
fn into_existing_images() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    sources(d);
    for (size, code) in [("8M", 0), ("2M", 1)] {
        for dst in ["t.out", "o.out"] {
            qemu_create_in(d, dst, "qcow2", "", size);
            qemu_io_in(d, dst, &["write -P 0x55 0 2M"]);
        }
        let args = ["-n", "-O", "qcow2", "a.qcow2", "b.raw", "c.qcow2"];
        assert_eq!(same_as_qemu(d, &args), code, "{size}");
        if code == 0 {
            assert_same_output(d, "qcow2", &args);
        }
    }
}

/// What qemu-img refuses with several sources, and with none, in its words.
#[test]
fn refusals_as_qemu_img() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    sources(d);
    run_in(d, "qemu-img", &["snapshot", "-c", "s1", "a.qcow2"]);
    let cases: &[&[&str]] = &[
        &["-l", "s1", "a.qcow2", "c.qcow2"],
        &[
            "-O", "qcow2", "-B", "a.qcow2", "-F", "qcow2", "a.qcow2", "c.qcow2",
        ],
        &[
            "-O",
            "qcow2",
            "-o",
            "backing_file=a.qcow2,backing_fmt=qcow2",
            "a.qcow2",
            "c.qcow2",
        ],
        &["-O", "qcow2", "--bitmaps", "a.qcow2", "c.qcow2"],
        &["-O", "raw"],
    ];
    for args in cases {
        assert_eq!(same_as_qemu(d, args), 1, "{args:?}");
    }
}
