//! `qcow2 amend -o encrypt.*` against `qemu-img amend` (issue 14): on copies of one QEMU-made
//! LUKS image, both tools given the same arguments exit alike with the same message, and QEMU
//! then opens each result with the same secrets (and refuses the erased ones).

use std::process::Command;

use crate::common;

/// Secrets: s0 is the image's passphrase, s1 one to add, s2 one it never had.
const OBJS: [&str; 6] = [
    "--object",
    "secret,id=s0,data=OLD",
    "--object",
    "secret,id=s1,data=NEW",
    "--object",
    "secret,id=s2,data=BAD",
];

/// A 1 MiB LUKS image by qemu-img with passphrase s0 and a pattern written by qemu-io.
fn qemu_luks(p: &str) {
    let mut args = vec!["create", "-q", "-f", "qcow2"];
    args.extend(OBJS);
    let o = "encrypt.format=luks,encrypt.key-secret=s0,encrypt.iter-time=1";
    args.extend(["-o", o, p, "1M"]);
    common::run("qemu-img", &args);
    let mut args = OBJS.to_vec();
    let io = image_opts(p, "s0");
    args.extend(["--image-opts", &io, "-c", "write -P 0x5a 0 64k"]);
    common::run("qemu-io", &args);
}

fn image_opts(p: &str, secret: &str) -> String {
    format!("driver=qcow2,file.filename={p},encrypt.key-secret={secret}")
}

/// `TOOL amend` with the secrets and `--image-opts` (unlocked with s0): exit code and the
/// message after the program name.
fn amend(tool: &str, p: &str, extra: &[&str]) -> (i32, String) {
    let mut args = vec!["amend"];
    args.extend(OBJS);
    let io = image_opts(p, "s0");
    args.extend(["--image-opts", &io]);
    args.extend(extra);
    let out = Command::new(tool).args(&args).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    let msg = err.split_once(": ").map_or("", |(_, m)| m).trim_end();
    (out.status.code().unwrap_or(-1), msg.to_string())
}

/// QEMU reads the pattern back with secret `id`.
fn qemu_reads_with(p: &str, id: &str) -> bool {
    let mut args = OBJS.to_vec();
    let io = image_opts(p, id);
    args.extend(["--image-opts", &io, "-c", "read -P 0x5a 0 64k"]);
    let (code, out) = common::status("qemu-io", &args);
    code == 0 && !out.contains("fail") && !out.contains("Invalid password")
}

/// `qemu-img check` of the image, unlocked with whichever of s0/s1 opens it, is clean.
fn qemu_check_clean(p: &str) {
    let id = if qemu_reads_with(p, "s0") { "s0" } else { "s1" };
    let mut args = vec!["check"];
    args.extend(OBJS);
    let io = image_opts(p, id);
    args.extend(["--image-opts", &io]);
    common::run("qemu-img", &args);
}

/// Run `before` (set-up amends, by qemu-img) then `args` with both tools on copies of `base`;
/// compare; return the two result paths.
fn both(dir: &std::path::Path, base: &str, before: &[&[&str]], args: &[&str]) -> [String; 2] {
    let tools = ["qemu-img", env!("CARGO_BIN_EXE_qcow2")];
    let mut results = Vec::new();
    let mut paths = Vec::new();
    for (n, tool) in tools.iter().enumerate() {
        let p = common::path_in(dir, &format!("t{n}.qcow2"));
        std::fs::copy(base, &p).unwrap();
        for b in before {
            assert_eq!(amend("qemu-img", &p, b).0, 0, "set-up {b:?}");
        }
        results.push(amend(tool, &p, args));
        paths.push(p);
    }
    assert_eq!(results[0], results[1], "qemu-img vs qcow2 for {args:?}");
    [paths[0].clone(), paths[1].clone()]
}

const ADD: &str = "encrypt.state=active,encrypt.new-secret=s1,encrypt.iter-time=1";

#[test]
fn key_slot_changes_match_qemu_img() {
    let dir = tempfile::tempdir().unwrap();
    let base = common::path_in(dir.path(), "base.qcow2");
    qemu_luks(&base);
    // Add s1 (first free slot, then an explicit one): both secrets open the results.
    for args in [
        vec!["-o", ADD],
        vec!["-o", &format!("{ADD},encrypt.keyslot=5")],
    ] {
        for p in both(dir.path(), &base, &[], &args) {
            assert!(qemu_reads_with(&p, "s1") && qemu_reads_with(&p, "s0"));
            qemu_check_clean(&p);
        }
    }
    // Erase s0's slot (by secret and by number) once s1 is in: only s1 opens the results.
    for args in [
        ["-o", "encrypt.state=inactive,encrypt.old-secret=s0"],
        ["-o", "encrypt.state=inactive,encrypt.keyslot=0"],
    ] {
        for p in both(dir.path(), &base, &[&["-o", ADD]], &args) {
            assert!(!qemu_reads_with(&p, "s0"), "{args:?}: s0 still opens");
            assert!(qemu_reads_with(&p, "s1"));
            qemu_check_clean(&p);
        }
    }
    // With other options in the same list.
    let args = ["-o", &format!("{ADD},lazy_refcounts=on")];
    for p in both(dir.path(), &base, &[], &args) {
        assert!(qemu_reads_with(&p, "s1"));
        qemu_check_clean(&p);
    }
}

#[test]
fn key_slot_refusals_match_qemu_img() {
    let dir = tempfile::tempdir().unwrap();
    let base = common::path_in(dir.path(), "base.qcow2");
    qemu_luks(&base);
    let refusals: &[&[&str]] = &[
        &["-o", &format!("{ADD},encrypt.keyslot=0")],
        &["-o", &format!("{ADD},encrypt.keyslot=8")],
        &["-o", "encrypt.state=active,encrypt.new-secret=s9"],
        &["-o", "encrypt.state=active"],
        &["-o", "encrypt.state=inactive,encrypt.keyslot=0"],
        &["-o", "encrypt.state=inactive,encrypt.keyslot=3"],
        &["-o", "encrypt.state=inactive,encrypt.old-secret=s2"],
        &["-o", "encrypt.state=inactive,encrypt.old-secret=s0"],
        &["-o", "encrypt.state=inactive"],
        &["-o", "encrypt.state=bogus"],
        &["-o", "encrypt.keyslot=1"],
        &["-o", "encrypt.state=active,encrypt.keyslot=x"],
        &["-o", "encrypt.foo=1"],
    ];
    for args in refusals {
        for p in both(dir.path(), &base, &[], args) {
            assert!(qemu_reads_with(&p, "s0"), "{args:?} changed the image");
        }
    }
    // A slot that the old secret does not open.
    let args = [
        "-o",
        "encrypt.state=inactive,encrypt.keyslot=1,encrypt.old-secret=s0",
    ];
    both(dir.path(), &base, &[&["-o", ADD]], &args);
    // --force erases the last slot: nothing opens the image any more.
    let args = ["--force", "-o", "encrypt.state=inactive,encrypt.keyslot=0"];
    for p in both(dir.path(), &base, &[], &args) {
        assert!(!qemu_reads_with(&p, "s0"));
    }
}
