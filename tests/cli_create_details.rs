//! `qcow2 create` details checked against `qemu-img create`: the backing format is required,
//! the size may be given once, `-o help`, the `Formatting` line shows the size as given, and
//! the new file has exactly qemu-img's bytes and length (not padded to a whole cluster).

use std::path::Path;
use std::process::Command;

/// Exit code and stdout+stderr of `PROGRAM create ARGS` (`X` = the image path), with the
/// program name and the image path replaced by placeholders so both tools compare equal.
fn create(program: &str, args: &[&str], img: &Path) -> (i32, String) {
    let args: Vec<String> = args
        .iter()
        .map(|a| a.replace('X', img.to_str().unwrap()))
        .collect();
    let out = Command::new(program)
        .arg("create")
        .args(&args)
        .current_dir(img.parent().unwrap())
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
    .replace(img.to_str().unwrap(), "IMG")
    .replace("qemu-img: ", "PROG: ")
    .replace("qcow2: ", "PROG: ");
    (out.status.code().unwrap_or(-1), text)
}

#[test]
fn create_matches_qemu_img() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base.qcow2");
    crate::common::run(
        "qemu-img",
        &["create", "-q", "-f", "qcow2", base.to_str().unwrap(), "3M"],
    );
    let (theirs, ours) = (
        dir.path().join("theirs.qcow2"),
        dir.path().join("ours.qcow2"),
    );
    for args in [
        &["-f", "qcow2", "X", "5M"][..],
        &["-f", "qcow2", "X", "1000"],
        &["-f", "raw", "X", "1000"],
        &["-f", "qcow2", "-o", "cluster_size=512", "X", "5M"],
        &["-f", "qcow2", "-o", "cluster_size=2M", "X", "5M"],
        &[
            "-f",
            "qcow2",
            "-o",
            "refcount_bits=1,cluster_size=4k",
            "X",
            "5M",
        ],
        &["-f", "qcow2", "-o", "extended_l2=on", "X", "5M"],
        &["-f", "qcow2", "-o", "compat=0.10", "X", "5M"],
        &["-f", "qcow2", "-o", "preallocation=metadata", "X", "5M"],
        &["-f", "qcow2", "X", "0"],
        &["-f", "qcow2", "-o", "size=1M,size=2M", "X"],
        &["-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", "X"],
    ] {
        let _ = std::fs::remove_file(&theirs);
        let _ = std::fs::remove_file(&ours);
        let q = create("qemu-img", args, &theirs);
        let o = create(env!("CARGO_BIN_EXE_qcow2"), args, &ours);
        assert_eq!(o, q, "create {args:?}");
        let (t, u) = (
            std::fs::read(&theirs).unwrap(),
            std::fs::read(&ours).unwrap(),
        );
        assert_eq!(u.len(), t.len(), "create {args:?}: file length");
        assert!(u == t, "create {args:?}: file bytes differ");
    }
}

#[test]
fn refusals_match_qemu_img() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base.qcow2");
    crate::common::run(
        "qemu-img",
        &["create", "-q", "-f", "qcow2", base.to_str().unwrap(), "3M"],
    );
    let img = dir.path().join("new.qcow2");
    for args in [
        &["-f", "qcow2", "-o", "size=1M", "X", "2M"][..],
        &["-f", "qcow2", "-u", "-b", "base.qcow2", "X", "1M"],
        &["-f", "qcow2", "-o", "backing_file=base.qcow2", "X"],
    ] {
        let (qc, q) = create("qemu-img", args, &img);
        let (oc, o) = create(env!("CARGO_BIN_EXE_qcow2"), args, &img);
        assert_eq!((oc, qc), (1, 1), "create {args:?}: {o}");
        // qemu-img also prints the probed backing format first; the error line is the same.
        let last = |s: &str| s.lines().next().unwrap_or_default().to_string();
        assert_eq!(last(&o), last(&q), "create {args:?}");
        assert!(!img.exists(), "create {args:?} left a file");
    }
}

#[test]
fn option_help_lists_what_we_support() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("unused.qcow2");
    for format in ["qcow2", "raw"] {
        let (code, ours) = create(
            env!("CARGO_BIN_EXE_qcow2"),
            &["-f", format, "-o", "help"],
            &img,
        );
        let (_, theirs) = create("qemu-img", &["-f", format, "-o", "help"], &img);
        assert_eq!(code, 0);
        // Every line we print is one of qemu-img's (we leave out the deprecated `encryption`).
        for line in ours.lines() {
            assert!(theirs.lines().any(|l| l == line), "{format}: {line:?}");
        }
        assert!(ours.contains("cluster_size") || format == "raw", "{ours}");
    }
}
