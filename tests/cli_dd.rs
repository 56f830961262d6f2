//! `qcow2 dd` against `qemu-img dd`: for each set of operands both tools run on the same
//! inputs; exit codes, output formats, file sizes (raw) and contents (`qemu-img compare`)
//! must agree, and a qcow2 output must pass `qemu-img check`.

use std::path::Path;
use std::process::Command;

use crate::common::{assert_check_clean, run};

/// Exit code of `PROGRAM dd ARGS`, with `OUT` in the operands replaced by `out`.
fn dd(program: &str, args: &[&str], out: &Path) -> i32 {
    let args: Vec<String> = args
        .iter()
        .map(|a| a.replace("OUT", out.to_str().unwrap()))
        .collect();
    Command::new(program)
        .arg("dd")
        .args(&args)
        .output()
        .unwrap()
        .status
        .code()
        .unwrap_or(-1)
}

fn format_of(img: &Path) -> String {
    let info = run("qemu-img", &["info", img.to_str().unwrap()]);
    info.lines()
        .find(|l| l.starts_with("file format:"))
        .unwrap_or_default()
        .to_string()
}

fn same_as_qemu(dir: &Path, args: &[&str]) {
    let (theirs, ours) = (dir.join("qemu.out"), dir.join("ours.out"));
    let _ = std::fs::remove_file(&theirs);
    let _ = std::fs::remove_file(&ours);
    let code = dd("qemu-img", args, &theirs);
    assert_eq!(
        dd(env!("CARGO_BIN_EXE_qcow2"), args, &ours),
        code,
        "{args:?}"
    );
    assert_eq!(theirs.exists(), ours.exists(), "{args:?}: output created?");
    if !theirs.exists() {
        return;
    }
    let format = format_of(&theirs);
    assert_eq!(format_of(&ours), format, "{args:?}");
    let (t, o) = (theirs.to_str().unwrap(), ours.to_str().unwrap());
    run("qemu-img", &["compare", "-q", t, o]);
    if format.ends_with("raw") {
        let len = |p: &Path| std::fs::metadata(p).unwrap().len();
        assert_eq!(len(&ours), len(&theirs), "{args:?}: raw output size");
    } else {
        assert_check_clean(&ours);
        let size = |p: &str| {
            let info = run("qemu-img", &["info", "--output=json", p]);
            serde_json::from_str::<serde_json::Value>(&info).unwrap()["virtual-size"].clone()
        };
        assert_eq!(size(o), size(t), "{args:?}: virtual size");
    }
}

#[test]
fn dd_matches_qemu_img() {
    let dir = tempfile::tempdir().unwrap();
    let d = |s: &str| dir.path().join(s).to_str().unwrap().to_string();
    let (a, r, ov, odd) = (d("a.qcow2"), d("r.raw"), d("ov.qcow2"), d("odd.raw"));
    run("qemu-img", &["create", "-q", "-f", "qcow2", &a, "10M"]);
    run(
        "qemu-io",
        &[
            "-c",
            "write -P 1 0 100k",
            "-c",
            "write -z 1M 1M",
            "-c",
            "write -P 9 3M 7k",
            &a,
        ],
    );
    run("qemu-img", &["create", "-q", "-f", "raw", &r, "10M"]);
    run("qemu-io", &["-f", "raw", "-c", "write -P 2 5M 100k", &r]);
    run(
        "qemu-img",
        &["create", "-q", "-f", "qcow2", "-b", &a, "-F", "qcow2", &ov],
    );
    run("qemu-io", &["-c", "write -P 3 3M 64k", &ov]);
    std::fs::write(&odd, vec![7u8; 1000]).unwrap();
    let (a, r, ov, odd) = (
        format!("if={a}"),
        format!("if={r}"),
        format!("if={ov}"),
        format!("if={odd}"),
    );
    for args in [
        &[&a[..], "of=OUT", "bs=64k", "count=2"][..],
        &["-O", "qcow2", &a, "of=OUT", "bs=4k", "skip=3"],
        &[&a, "of=OUT"],
        &[&a, "of=OUT", "bs=1000", "count=3"],
        &[&a, "of=OUT", "bs=64k", "count=2", "skip=1"],
        &[&a, "of=OUT", "skip=100000"],
        &[&a, "of=OUT", "bs=1M", "count=100"],
        &["-f", "raw", &a, "of=OUT"],
        &[&r, "of=OUT", "bs=3000", "skip=7"],
        &[&odd, "of=OUT", "bs=300"],
        &["-O", "qcow2", &ov, "of=OUT", "bs=1M", "skip=2", "count=5"],
        &[&a, "of=OUT", "bs=0"],
        &[&a, "of=OUT", "bs=4k", "bs=1x"],
        &[&a],
        &[&a, "of=OUT", "conv=notrunc"],
        &["if=/nonexistent/input", "of=OUT"],
    ] {
        same_as_qemu(dir.path(), args);
    }
}
