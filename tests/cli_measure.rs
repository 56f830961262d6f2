//! `qcow2 measure` against `qemu-img measure`: the same numbers (text and JSON) and exit
//! codes for sizes and for sources of every kind QEMU writes (sparse raw, odd-sized raw,
//! compressed, preallocated, backing chains, persistent bitmaps), and the same refusals.

use std::path::Path;
use std::process::Command;

use crate::common::run;

/// stdout and exit code of a command (stderr ignored: the program name prefix differs).
fn measure(program: &str, args: &[&str]) -> (String, i32) {
    let out = Command::new(program)
        .arg("measure")
        .args(args)
        .output()
        .unwrap();
    (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        out.status.code().unwrap_or(-1),
    )
}

/// Our stdout and exit code must be qemu-img's.
fn same_as_qemu(dir: &Path, args: &[&str]) {
    let p = |s: &str| {
        if s.ends_with(".qcow2") || s.ends_with(".raw") {
            dir.join(s).to_str().unwrap().to_string()
        } else {
            s.to_string()
        }
    };
    let args: Vec<String> = args.iter().map(|a| p(a)).collect();
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let qemu = measure("qemu-img", &args);
    let ours = measure(env!("CARGO_BIN_EXE_qcow2"), &args);
    assert_eq!(ours, qemu, "qcow2 measure {args:?}");
}

/// Source images of every kind, made by QEMU's tools.
fn sources(dir: &Path) {
    let d = |s: &str| dir.join(s).to_str().unwrap().to_string();
    let io = |fmt: &str, img: &str, cmds: &[&str]| {
        let mut args = vec!["-f".to_string(), fmt.to_string()];
        for c in cmds {
            args.push("-c".into());
            args.push((*c).into());
        }
        args.push(d(img));
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        run("qemu-io", &args);
    };
    run(
        "qemu-img",
        &["create", "-q", "-f", "qcow2", &d("a.qcow2"), "10M"],
    );
    io("qcow2", "a.qcow2", &["write -P 1 0 100k", "write -z 1M 1M"]);
    run(
        "qemu-img",
        &["create", "-q", "-f", "raw", &d("r.raw"), "10M"],
    );
    io("raw", "r.raw", &["write -P 1 1M 4k", "write -P 2 5M 100k"]);
    std::fs::write(d("odd.raw"), vec![7u8; 1000]).unwrap();
    let pm = d("pm.qcow2");
    run(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "preallocation=metadata",
            &pm,
            "4M",
        ],
    );
    let (a, ov) = (d("a.qcow2"), d("ov.qcow2"));
    run(
        "qemu-img",
        &["create", "-q", "-f", "qcow2", "-b", &a, "-F", "qcow2", &ov],
    );
    io("qcow2", "ov.qcow2", &["write -P 3 3M 64k"]);
    let bm = d("bm.qcow2");
    run("qemu-img", &["create", "-q", "-f", "qcow2", &bm, "100M"]);
    run("qemu-img", &["bitmap", "--add", &bm, "b0"]);
    run(
        "qemu-img",
        &["bitmap", "--add", "-g", "4k", &bm, "longername"],
    );
    let comp = d("comp.qcow2");
    run(
        "qemu-img",
        &["convert", "-c", "-O", "qcow2", &d("r.raw"), &comp],
    );
}

#[test]
fn sizes_match_qemu_img() {
    let dir = tempfile::tempdir().unwrap();
    for args in [
        &["--size", "1G", "-O", "qcow2"][..],
        &["--size", "1000"],
        &["-O", "qcow2", "--size", "1000"],
        &["-O", "qcow2", "--size", "0"],
        &["-O", "qcow2", "--size", "1G", "-o", "compat=0.10"],
        &["-O", "qcow2", "--size", "1G", "--output=json"],
        &["-O", "qcow2", "-o", "preallocation=full", "--size", "1M"],
        &[
            "-O",
            "qcow2",
            "-o",
            "preallocation=metadata",
            "--size",
            "3G",
        ],
        &[
            "-O",
            "qcow2",
            "-o",
            "cluster_size=2M,extended_l2=on,refcount_bits=64",
            "--size",
            "100G",
        ],
        &[
            "-O",
            "qcow2",
            "-o",
            "cluster_size=512,refcount_bits=1",
            "--size",
            "1G",
        ],
        &[
            "-O",
            "qcow2",
            "-o",
            "cluster_size=16k,extended_l2=on",
            "--size",
            "7G",
        ],
        &["-O", "raw", "-o", "preallocation=full", "--size", "1M"],
    ] {
        same_as_qemu(dir.path(), args);
    }
}

#[test]
fn sources_match_qemu_img() {
    let dir = tempfile::tempdir().unwrap();
    sources(dir.path());
    for args in [
        &["-O", "qcow2", "a.qcow2"][..],
        &["-O", "qcow2", "a.qcow2", "--output=json"],
        &["-O", "qcow2", "-o", "compat=0.10", "a.qcow2"],
        &["-O", "qcow2", "-o", "backing_file=x.qcow2", "a.qcow2"],
        &["-O", "qcow2", "-f", "raw", "a.qcow2"],
        &["-O", "qcow2", "r.raw"],
        &["-O", "qcow2", "-o", "cluster_size=4k", "r.raw"],
        &["-O", "qcow2", "odd.raw"],
        &["odd.raw"],
        &["a.qcow2"],
        &["-O", "qcow2", "pm.qcow2"],
        &["-O", "qcow2", "ov.qcow2"],
        &["-O", "qcow2", "-o", "cluster_size=512", "ov.qcow2"],
        &["-O", "qcow2", "bm.qcow2"],
        &["-O", "qcow2", "bm.qcow2", "--output=json"],
        &[
            "-O",
            "qcow2",
            "-o",
            "cluster_size=4k,refcount_bits=1",
            "comp.qcow2",
        ],
    ] {
        same_as_qemu(dir.path(), args);
    }
}

#[test]
fn refusals_match_qemu_img() {
    let dir = tempfile::tempdir().unwrap();
    sources(dir.path());
    for args in [
        &["-O", "qcow2", "-o", "cluster_size=512", "--size", "1P"][..],
        &["-O", "qcow2", "--size", "1x"],
        &["-O", "qcow2", "--size", "-5"],
        &["-O", "vmdk", "--size", "1M"],
        &["-O", "foo", "--size", "1M"],
        &["--size", "1M", "a.qcow2"],
        &[],
        &["-O", "qcow2", "missing.qcow2"],
        &["-O", "qcow2", "-o", "cluster_size=3000", "--size", "1M"],
        &["-O", "raw", "-o", "cluster_size=4k", "--size", "1M"],
    ] {
        same_as_qemu(dir.path(), args);
    }
}
