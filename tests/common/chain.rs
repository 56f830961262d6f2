//! Backing chains made by QEMU, copied twice so that a qemu-img command and ours run on the
//! same input side by side (commit, rebase, amend tests).

use std::path::{Path, PathBuf};
use std::process::Command;

/// A layer to make: file name, `-o` options (with `backing_file=`/`backing_fmt=` for
/// overlays; relative names), format, and the qemu-io commands that fill it.
pub struct LayerSpec<'a> {
    pub name: &'a str,
    pub format: &'a str,
    pub opts: String,
    pub io: Vec<String>,
}

/// Make `layers` (bottom first) in `dir`, each `size` bytes (overlays take their backing's).
pub fn make_chain(dir: &Path, layers: &[LayerSpec<'_>], size: &str) {
    for l in layers {
        let size = if l.opts.contains("backing_file") {
            ""
        } else {
            size
        };
        let mut args = vec!["create", "-q", "-f", l.format];
        if !l.opts.is_empty() {
            args.extend(["-o", l.opts.as_str()]);
        }
        args.push(l.name);
        if !size.is_empty() {
            args.push(size);
        }
        super::run_in(dir, "qemu-img", &args);
        if !l.io.is_empty() {
            let mut args = vec!["-f", l.format];
            for c in &l.io {
                args.extend(["-c", c.as_str()]);
            }
            args.push(l.name);
            let out = super::run_in(dir, "qemu-io", &args);
            assert!(!out.contains("fail") && !out.contains("error"), "{out}");
        }
    }
}

/// Copy every file of `src` into new directories `theirs` and `ours` beside each other
/// (under `src`); relative backing names keep working.
pub fn twin(src: &Path) -> (PathBuf, PathBuf) {
    let (theirs, ours) = (src.join("theirs"), src.join("ours"));
    for d in [&theirs, &ours] {
        std::fs::create_dir(d).unwrap();
        for e in std::fs::read_dir(src).unwrap() {
            let p = e.unwrap().path();
            if p.is_file() {
                std::fs::copy(&p, d.join(p.file_name().unwrap())).unwrap();
            }
        }
    }
    (theirs, ours)
}

/// Exit code, stdout and stderr of `PROGRAM ARGS` run in `dir`, with the program names in
/// messages replaced by `PROG` so both tools compare equal.
pub fn run_tool(program: &str, dir: &Path, args: &[&str]) -> (i32, String, String) {
    let out = Command::new(program)
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap();
    let norm = |b: &[u8]| {
        String::from_utf8_lossy(b)
            .replace("qemu-img: ", "PROG: ")
            .replace("qcow2: ", "PROG: ")
    };
    (
        out.status.code().unwrap_or(-1),
        norm(&out.stdout),
        norm(&out.stderr),
    )
}

/// Run `qemu-img ARGS` in `theirs` and `qcow2 ARGS` in `ours`; both must give the same exit
/// code and stdout. Returns (code, our stderr, their stderr).
pub fn both(theirs: &Path, ours: &Path, args: &[&str]) -> (i32, String, String) {
    let (qc, qo, qe) = run_tool("qemu-img", theirs, args);
    let (oc, oo, oe) = run_tool(env!("CARGO_BIN_EXE_qcow2"), ours, args);
    assert_eq!(
        oc, qc,
        "{args:?}: exit code; ours: {oo}{oe} theirs: {qo}{qe}"
    );
    assert_eq!(oo, qo, "{args:?}: stdout; our stderr: {oe}");
    (qc, oe, qe)
}

/// `qemu-img compare` of the same file in both directories (guest content, read through the
/// backing chain each has) must say identical, and `qemu-img check` must be clean in ours.
pub fn assert_same_image(theirs: &Path, ours: &Path, name: &str, format: &str) {
    let (t, o) = (theirs.join(name), ours.join(name));
    let (t, o) = (t.to_str().unwrap(), o.to_str().unwrap());
    let out = Command::new("qemu-img")
        .args(["compare", "-f", format, "-F", format, t, o])
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{name}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    if format == "qcow2" {
        super::assert_check_clean(&ours.join(name));
    }
}

/// `-o` options of the image variants the chain tests run over (every layer of a chain uses
/// the same): 64 KiB and 512 B clusters, refcount_bits 1, extended L2, v2.
pub const VARIANTS: &[&str] = &[
    "",
    "cluster_size=512",
    "refcount_bits=1",
    "extended_l2=on",
    "compat=0.10",
];

/// qemu-io commands as owned strings (a [`LayerSpec`]'s `io`).
pub fn io(cmds: &[&str]) -> Vec<String> {
    cmds.iter().map(|c| c.to_string()).collect()
}

/// `opts` plus a qcow2 `backing` file.
pub fn with_backing(opts: &str, backing: &str) -> String {
    let b = format!("backing_file={backing},backing_fmt=qcow2");
    if opts.is_empty() {
        b
    } else {
        format!("{opts},{b}")
    }
}

/// base.qcow2 ← mid.qcow2 ← top.qcow2 with `opts`, every layer with data, zeros, compressed
/// clusters, discards and unaligned writes overlapping the others (callers may add layers or
/// commands before [`make_chain`]).
pub fn chain3_layers(opts: &str) -> Vec<LayerSpec<'static>> {
    vec![
        LayerSpec {
            name: "base.qcow2",
            format: "qcow2",
            opts: opts.to_string(),
            io: io(&["write -P 1 0 3M", "write -c -P 7 6M 64k"]),
        },
        LayerSpec {
            name: "mid.qcow2",
            format: "qcow2",
            opts: with_backing(opts, "base.qcow2"),
            io: io(&[
                "write -P 2 1M 1M",
                "write -z 2560k 256k",
                "write -P 6 7000 5000",
            ]),
        },
        LayerSpec {
            name: "top.qcow2",
            format: "qcow2",
            opts: with_backing(opts, "mid.qcow2"),
            io: io(&[
                "write -P 3 512k 600k",
                "write -z 3M 128k",
                "write -c -P 4 4M 64k",
                "discard 1M 64k",
                "write -P 5 6000 3000",
            ]),
        },
    ]
}
