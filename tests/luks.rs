//! Encrypted images (issue 14) against QEMU: LUKS images QEMU creates in each cipher mode
//! read identically through ours, images ours creates and writes read identically through
//! QEMU and pass `qemu-img check`, wrong secrets are refused by both, `check -r all` keeps the
//! key slots, `map` hides host offsets as QEMU does, legacy AES images convert identically.

use crate::common;

use std::path::Path;

use common::{qcow2, qcow2_ok, run, status};

/// The secret object every test uses.
const OBJ: &str = "secret,id=sec0,data=abc";

fn image_opts(p: &str) -> String {
    format!("driver=qcow2,file.filename={p},encrypt.key-secret=sec0")
}

/// `qemu-img create` a LUKS image (fast key derivation) with extra `encrypt.*` options.
fn qemu_create_luks(p: &str, extra: &str, size: &str) {
    let mut o = "encrypt.format=luks,encrypt.key-secret=sec0,encrypt.iter-time=1".to_string();
    if !extra.is_empty() {
        o = format!("{o},{extra}");
    }
    run(
        "qemu-img",
        &[
            "create", "-q", "-f", "qcow2", "--object", OBJ, "-o", &o, p, size,
        ],
    );
}

/// `qemu-io` on an encrypted image, panicking when a command fails (qemu-io exits 0 even
/// then, so the output is checked for the failure words).
fn qemu_io(p: &str, cmds: &[&str]) {
    let io = image_opts(p);
    let mut args = vec!["--object", OBJ, "--image-opts", &io];
    for c in cmds {
        args.extend(["-c", c]);
    }
    let out = run("qemu-io", &args);
    assert!(
        !out.contains("Pattern verification failed") && !out.contains("failed"),
        "qemu-io {cmds:?}: {out}"
    );
}

/// `TOOL convert -O raw` of an encrypted image (`qemu-img` or our binary).
fn raw_by(tool: &str, p: &str, out: &Path) -> Vec<u8> {
    let io = image_opts(p);
    let o = out.to_str().unwrap();
    let args = [
        "convert",
        "--object",
        OBJ,
        "--image-opts",
        &io,
        "-O",
        "raw",
        o,
    ];
    run(tool, &args);
    std::fs::read(out).unwrap()
}

/// `qemu-img convert -O raw` of an encrypted image.
fn qemu_raw(p: &str, out: &Path) -> Vec<u8> {
    raw_by("qemu-img", p, out)
}

/// `qcow2 convert -O raw` of an encrypted image.
fn our_raw(p: &str, out: &Path) -> Vec<u8> {
    raw_by(env!("CARGO_BIN_EXE_qcow2"), p, out)
}

fn assert_same(what: &str, a: &[u8], b: &[u8]) {
    if let Some(d) = common::first_difference(a, b) {
        panic!("{what}: differ at {d:#x}");
    }
}

/// `qemu-img check` with the secret must be clean.
fn qemu_check_clean(p: &str) {
    let io = image_opts(p);
    let (code, out) = status("qemu-img", &["check", "--object", OBJ, "--image-opts", &io]);
    assert_eq!(code, 0, "qemu-img check {p}:\n{out}");
}

/// Writes at unaligned offsets and lengths, across cluster boundaries, and one whole cluster.
const WRITES: &[&str] = &[
    "write -P 0x11 0 512",
    "write -P 0x22 1000 3000",
    "write -P 0x33 65530 20",
    "write -P 0x44 300001 7",
    "write -P 0x55 1048576 65536",
    "write -P 0x66 2000000 200000",
];

/// The same, as reads that check the pattern.
fn reads() -> Vec<String> {
    WRITES
        .iter()
        .map(|w| w.replacen("write", "read", 1))
        .collect()
}

/// Cipher modes QEMU creates (and we implement).
const MODES: &[&str] = &[
    "",
    "encrypt.cipher-alg=aes-128",
    "encrypt.cipher-alg=aes-192,encrypt.cipher-mode=xts,encrypt.ivgen-alg=plain",
    "encrypt.cipher-mode=cbc,encrypt.ivgen-alg=essiv,encrypt.ivgen-hash-alg=sha256",
    "encrypt.cipher-alg=aes-128,encrypt.cipher-mode=cbc,encrypt.ivgen-alg=plain64,encrypt.hash-alg=sha1",
    "encrypt.cipher-mode=cbc,encrypt.ivgen-alg=plain,encrypt.hash-alg=sha512",
];

#[test]
fn qemu_written_images_read_identically_in_every_mode() {
    let dir = tempfile::tempdir().unwrap();
    for (i, mode) in MODES.iter().enumerate() {
        let p = common::path_in(dir.path(), &format!("q{i}.qcow2"));
        qemu_create_luks(&p, mode, "4M");
        qemu_io(&p, WRITES);
        let want = qemu_raw(&p, &dir.path().join("want.raw"));
        let got = our_raw(&p, &dir.path().join("got.raw"));
        assert_same(mode, &got, &want);
        // And our reads of single ranges, through qcow2 io.
        let io = image_opts(&p);
        let rs = reads();
        let mut args = vec!["io", "--object", OBJ, "--image-opts", &io];
        for r in &rs {
            args.extend(["-c", r.as_str()]);
        }
        let out = qcow2_ok(&args);
        assert!(!out.contains("fail"), "{mode}: {out}");
    }
}

#[test]
fn our_images_read_identically_in_qemu() {
    let dir = tempfile::tempdir().unwrap();
    for (i, mode) in MODES.iter().enumerate() {
        let p = common::path_in(dir.path(), &format!("o{i}.qcow2"));
        let mut o = "encrypt.format=luks,encrypt.key-secret=sec0,encrypt.iter-time=1".to_string();
        if !mode.is_empty() {
            o = format!("{o},{mode}");
        }
        qcow2_ok(&[
            "create", "-q", "-f", "qcow2", "--object", OBJ, "-o", &o, &p, "4M",
        ]);
        let io = image_opts(&p);
        let mut args = vec!["io", "--object", OBJ, "--image-opts", &io];
        for w in WRITES {
            args.extend(["-c", w]);
        }
        qcow2_ok(&args);
        let rs = reads();
        let rs: Vec<&str> = rs.iter().map(String::as_str).collect();
        qemu_io(&p, &rs);
        qemu_check_clean(&p);
        let want = our_raw(&p, &dir.path().join("ours.raw"));
        let got = qemu_raw(&p, &dir.path().join("qemu.raw"));
        assert_same(mode, &got, &want);
    }
}

#[test]
fn create_layout_matches_qemu() {
    let dir = tempfile::tempdir().unwrap();
    let q = common::path_in(dir.path(), "q.qcow2");
    let o = common::path_in(dir.path(), "o.qcow2");
    qemu_create_luks(&q, "", "16M");
    let opts = "encrypt.format=luks,encrypt.key-secret=sec0,encrypt.iter-time=1";
    qcow2_ok(&[
        "create", "-q", "-f", "qcow2", "--object", OBJ, "-o", opts, &o, "16M",
    ]);
    // Cluster 0 (header and extensions) byte for byte, the file length, and the LUKS
    // header's public fields as qemu-img shows them (uuids, salts and iterations differ).
    let head = |p: &str| common::bytes::read(Path::new(p), 0, 65536);
    assert_same("cluster 0", &head(&o), &head(&q));
    let len = |p: &str| std::fs::metadata(p).unwrap().len();
    assert_eq!(len(&o), len(&q));
    let info = |p: &str| {
        let j: serde_json::Value =
            serde_json::from_str(&run("qemu-img", &["info", "--output=json", p])).unwrap();
        let mut e = j["format-specific"]["data"]["encrypt"].clone();
        e.as_object_mut().unwrap().remove("uuid");
        e.as_object_mut().unwrap().remove("master-key-iters");
        for s in e["slots"].as_array_mut().unwrap() {
            s.as_object_mut().unwrap().remove("iters");
        }
        e
    };
    assert_eq!(info(&o), info(&q));
}

#[test]
fn wrong_secret_is_refused_by_both() {
    let dir = tempfile::tempdir().unwrap();
    let p = common::path_in(dir.path(), "w.qcow2");
    qemu_create_luks(&p, "", "1M");
    let io = image_opts(&p);
    let bad = "secret,id=sec0,data=abd";
    let (code, out) = status(
        "qemu-io",
        &["--object", bad, "--image-opts", &io, "-c", "read 0 512"],
    );
    assert!(code != 0 || out.contains("Invalid password"), "{out}");
    assert!(
        out.contains("Invalid password, cannot unlock any keyslot"),
        "{out}"
    );
    let r = qcow2(&[
        "io",
        "--object",
        bad,
        "--image-opts",
        &io,
        "-c",
        "read 0 512",
    ]);
    assert_eq!(r.code, 1, "{}", r.stdout);
    assert!(
        r.stderr
            .contains("Invalid password, cannot unlock any keyslot"),
        "{}",
        r.stderr
    );
    assert!(
        !r.stderr.contains("abd"),
        "the secret leaked into: {}",
        r.stderr
    );
    // No secret at all: data access refused, info still works.
    let r = qcow2(&["io", "-r", &p, "-c", "read 0 512"]);
    assert_ne!(r.code, 0);
    assert!(r.stderr.contains("key secret"), "{}", r.stderr);
    qcow2_ok(&["info", &p]);
}

#[test]
fn secrets_from_file_base64_and_key_file() {
    let dir = tempfile::tempdir().unwrap();
    let p = common::path_in(dir.path(), "f.qcow2");
    qemu_create_luks(&p, "", "1M");
    qemu_io(&p, &["write -P 0x5a 0 4096"]);
    let f = dir.path().join("pw");
    std::fs::write(&f, "abc").unwrap();
    let obj = format!("secret,id=s1,file={}", f.display());
    let io = format!("driver=qcow2,file.filename={p},encrypt.key-secret=s1");
    qcow2_ok(&[
        "io",
        "--object",
        &obj,
        "--image-opts",
        &io,
        "-c",
        "read -P 0x5a 0 4096",
    ]);
    let obj = "secret,id=s2,data=YWJj,format=base64";
    let io = format!("driver=qcow2,file.filename={p},encrypt.key-secret=s2");
    qcow2_ok(&[
        "io",
        "--object",
        obj,
        "--image-opts",
        &io,
        "-c",
        "read -P 0x5a 0 4096",
    ]);
    let kf = f.to_str().unwrap();
    let out = qcow2_ok(&["io", "--key-file", kf, &p, "-c", "read -P 0x5a 0 4096"]);
    assert!(!out.contains("fail"), "{out}");
}

#[test]
fn convert_and_compare_across_encryption() {
    let dir = tempfile::tempdir().unwrap();
    let src = common::path_in(dir.path(), "src.qcow2");
    qemu_create_luks(&src, "", "4M");
    qemu_io(&src, WRITES);
    // Re-encrypt into a new image of another cipher, then compare both ways.
    let dst = common::path_in(dir.path(), "dst.qcow2");
    let (s, d) = (image_opts(&src), image_opts(&dst));
    let o = "encrypt.format=luks,encrypt.key-secret=sec0,encrypt.iter-time=1,encrypt.cipher-mode=cbc,encrypt.ivgen-alg=essiv";
    qcow2_ok(&[
        "convert",
        "--object",
        OBJ,
        "--image-opts",
        &s,
        "-O",
        "qcow2",
        "-o",
        o,
        &dst,
    ]);
    qemu_check_clean(&dst);
    run(
        "qemu-img",
        &["compare", "--object", OBJ, "--image-opts", &s, &d],
    );
    let out = qcow2_ok(&["compare", "--object", OBJ, "--image-opts", &s, &d]);
    assert!(out.contains("identical"), "{out}");
    // Decrypt into a plain qcow2: QEMU compares it with the encrypted source.
    let plain = common::path_in(dir.path(), "plain.qcow2");
    qcow2_ok(&[
        "convert",
        "--object",
        OBJ,
        "--image-opts",
        &s,
        "-O",
        "qcow2",
        &plain,
    ]);
    let pl = format!("driver=qcow2,file.filename={plain}");
    run(
        "qemu-img",
        &["compare", "--object", OBJ, "--image-opts", &s, &pl],
    );
}

#[test]
fn map_hides_host_offsets_as_qemu_does() {
    let dir = tempfile::tempdir().unwrap();
    let p = common::path_in(dir.path(), "m.qcow2");
    qemu_create_luks(&p, "", "4M");
    qemu_io(&p, WRITES);
    let io = image_opts(&p);
    let args = ["map", "--output=json", "--object", OBJ, "--image-opts", &io];
    let ours: serde_json::Value = serde_json::from_str(&qcow2_ok(&args)).unwrap();
    let theirs: serde_json::Value = serde_json::from_str(&run("qemu-img", &args)).unwrap();
    assert_eq!(ours, theirs);
}

#[test]
fn check_repair_keeps_the_key_slots() {
    let dir = tempfile::tempdir().unwrap();
    let p = common::path_in(dir.path(), "c.qcow2");
    qemu_create_luks(&p, "", "4M");
    qemu_io(&p, WRITES);
    // Leak a cluster (a refcount the L2 tables do not explain) so that repair has work.
    let len = std::fs::metadata(&p).unwrap().len();
    let f = std::fs::OpenOptions::new().write(true).open(&p).unwrap();
    f.set_len(len + 65536).unwrap();
    drop(f);
    let r = qcow2(&["check", "-r", "all", &p]);
    assert!(r.code == 0, "{}{}", r.stdout, r.stderr);
    qemu_check_clean(&p);
    let rs = reads();
    let rs: Vec<&str> = rs.iter().map(String::as_str).collect();
    qemu_io(&p, &rs);
}

#[test]
fn legacy_aes_converts_like_qemu() {
    let dir = tempfile::tempdir().unwrap();
    let p = common::path_in(dir.path(), "aes.qcow2");
    let o = "encrypt.format=aes,encrypt.key-secret=sec0";
    run(
        "qemu-img",
        &[
            "create", "-q", "-f", "qcow2", "--object", OBJ, "-o", o, &p, "4M",
        ],
    );
    qemu_io(&p, WRITES);
    let want = qemu_raw(&p, &dir.path().join("want.raw"));
    let got = our_raw(&p, &dir.path().join("got.raw"));
    assert_same("legacy aes", &got, &want);
    // Read only: writing is refused, not silently done in a way QEMU cannot read.
    let io = image_opts(&p);
    let r = qcow2(&[
        "io",
        "--object",
        OBJ,
        "--image-opts",
        &io,
        "-c",
        "write 0 512",
    ]);
    assert_ne!(r.code, 0);
}

/// QEMU aborts on aes-192-cbc (its key material is not whole sectors): ours refuses to
/// create it rather than make an image QEMU cannot open.
#[test]
fn aes_192_cbc_is_not_created() {
    let dir = tempfile::tempdir().unwrap();
    let p = common::path_in(dir.path(), "x.qcow2");
    let o = "encrypt.format=luks,encrypt.key-secret=sec0,encrypt.cipher-alg=aes-192,encrypt.cipher-mode=cbc";
    let r = qcow2(&[
        "create", "-q", "-f", "qcow2", "--object", OBJ, "-o", o, &p, "1M",
    ]);
    assert_eq!(r.code, 1);
    assert!(r.stderr.contains("unsupported"), "{}", r.stderr);
}

#[test]
fn unsupported_cipher_modes_are_refused_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    let p = common::path_in(dir.path(), "ctr.qcow2");
    qemu_create_luks(&p, "encrypt.cipher-mode=ctr", "1M");
    let io = image_opts(&p);
    let r = qcow2(&[
        "io",
        "--object",
        OBJ,
        "--image-opts",
        &io,
        "-c",
        "read 0 512",
    ]);
    assert_eq!(r.code, 1);
    assert!(r.stderr.contains("unsupported"), "{}", r.stderr);
}
