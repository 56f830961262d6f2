//! `qcow2 rebase` against `qemu-img rebase` on the same chains: same exit code and stdout,
//! same backing name and format afterwards, the rebased image reads the same as qemu-img's
//! (`qemu-img compare`, each over its own new chain) and as before the rebase, and checks
//! clean; over image variants (64 KiB and 512 B clusters, refcount_bits 1, extended L2, v2,
//! compressed and zero clusters) and chains of 3.

use std::path::Path;

use crate::common::chain::{
    LayerSpec, VARIANTS, assert_same_image, both, chain3_layers, io, make_chain, twin,
};
use crate::common::{qemu_raw, run};

/// base ← mid ← top (8 MiB) and a standalone other.qcow2 with different data.
fn chain3(dir: &Path, opts: &str) {
    let mut layers = chain3_layers(opts);
    layers.push(LayerSpec {
        name: "other.qcow2",
        format: "qcow2",
        opts: opts.to_string(),
        io: io(&["write -P 9 0 1M", "write -P 1 1M 2M", "write -P 10 5M 2M"]),
    });
    make_chain(dir, &layers, "8M");
}

/// The backing file name and format `qemu-img info` reports.
fn backing_of(img: &Path) -> (serde_json::Value, serde_json::Value) {
    let info = run(
        "qemu-img",
        &["info", "--output=json", img.to_str().unwrap()],
    );
    let v: serde_json::Value = serde_json::from_str(&info).unwrap();
    (
        v["backing-filename"].clone(),
        v["backing-filename-format"].clone(),
    )
}

/// Run `rebase ARGS ... top.qcow2` with both tools on copies of a fresh chain; the result
/// must match qemu-img's and, for a safe rebase, read as top.qcow2 did before.
fn rebase_both(opts: &str, args: &[&str]) -> (i32, String, String) {
    let dir = tempfile::tempdir().unwrap();
    chain3(dir.path(), opts);
    let before = qemu_raw(&dir.path().join("top.qcow2"));
    let (theirs, ours) = twin(dir.path());
    let mut full = vec!["rebase"];
    full.extend_from_slice(args);
    full.push("top.qcow2");
    let r = both(&theirs, &ours, &full);
    let (t, o) = (theirs.join("top.qcow2"), ours.join("top.qcow2"));
    assert_eq!(backing_of(&o), backing_of(&t), "{args:?} {opts}");
    assert_same_image(&theirs, &ours, "top.qcow2", "qcow2");
    if r.0 == 0 && !args.contains(&"-u") {
        assert!(qemu_raw(&o) == before, "{args:?} {opts}: content changed");
    }
    r
}

#[test]
fn rebase_safe_mode_matches_qemu_img() {
    for opts in VARIANTS {
        for args in [
            &["-b", "base.qcow2", "-F", "qcow2"][..],
            &["-b", "other.qcow2", "-F", "qcow2"],
            &["-b", ""],
        ] {
            let (code, err, _) = rebase_both(opts, args);
            assert_eq!(code, 0, "{args:?} {opts}: {err}");
        }
    }
}

#[test]
fn rebase_compressed_unsafe_and_flags_match_qemu_img() {
    for args in [
        &["-c", "-b", "", "-q"][..],
        &["-c", "-b", "other.qcow2", "-F", "qcow2"],
        &["-u", "-b", "base.qcow2", "-F", "qcow2"],
        &["-u"],
        &[
            "-t",
            "none",
            "-T",
            "writeback",
            "-f",
            "qcow2",
            "-b",
            "base.qcow2",
            "-F",
            "qcow2",
        ],
        &["-b", "other.qcow2", "-F", "raw"],
    ] {
        for opts in ["", "cluster_size=512,refcount_bits=1"] {
            let (code, err, _) = rebase_both(opts, args);
            assert_eq!(code, 0, "{args:?} {opts}: {err}");
        }
    }
}

#[test]
fn rebase_refusals_match_qemu_img() {
    for args in [
        &[][..],
        &["-t", "foo", "-b", ""],
        &["-T", "foo", "-b", ""],
        &["-b", "base.qcow2", "-F", "foo"],
        &["-b", "base.qcow2"],
        &["-u", "-b", "base.qcow2"],
    ] {
        let (code, ours, theirs) = rebase_both("", args);
        assert_eq!(code, 1, "{args:?}");
        // qemu-img's usage hint names itself on a second line.
        assert_eq!(ours.lines().next(), theirs.lines().next(), "{args:?}");
    }
    // The cause is worded by each tool; the refusal and its first words are the same.
    let (code, ours, _) = rebase_both("", &["-b", "nonexistent", "-F", "qcow2"]);
    assert_eq!(code, 1);
    assert!(
        ours.starts_with("PROG: Could not open new backing file 'nonexistent': "),
        "{ours}"
    );
}
