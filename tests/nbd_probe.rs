//! Probe safety: a raw image whose format `qcow2 serve` guessed by probing must not let an NBD
//! client write block 0 so that the next probe sees another format (a qcow2 header naming
//! /etc/passwd as its backing file would give the client that file on the next serve). Such
//! writes get EPERM, as with qemu-nbd, and serve prints qemu-nbd's warning.

use crate::common;

use std::path::Path;

use common::bg::Bg;
use common::{path_in, run, status};

const BIN: &str = env!("CARGO_BIN_EXE_qcow2");

fn uri(sock: &Path) -> String {
    format!("nbd+unix:///?socket={}", sock.display())
}

/// The first 512 bytes of a qcow2 image naming /etc/passwd as its raw backing file.
fn evil_header(dir: &Path) -> String {
    let evil = path_in(dir, "evil.qcow2");
    run(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-u",
            "-b",
            "/etc/passwd",
            "-F",
            "raw",
            &evil,
            "1M",
        ],
    );
    evil
}

#[test]
fn probed_raw_refuses_format_changing_writes() {
    let dir = tempfile::tempdir().unwrap();
    let evil = evil_header(dir.path());
    let tenant = path_in(dir.path(), "tenant.raw");
    common::qemu_create_fmt(&tenant, "raw", "", "1M");
    let sock = dir.path().join("s");
    let srv = Bg::serving(
        BIN,
        &["serve", "-t", "-k", sock.to_str().unwrap(), &tenant],
        &sock,
    );
    let write_header = format!("write -s {evil} 0 512");
    let (code, text) = status("qemu-io", &["-f", "raw", "-c", &write_header, &uri(&sock)]);
    assert!(
        code != 0 && text.contains("Operation not permitted"),
        "{text}"
    );
    // Writes that leave block 0 raw, and writes past it, still work.
    let ok = [
        "write -P 0x51 0 512",
        "write -P 0x52 512 64k",
        "write -z 0 4k",
    ];
    for cmd in ok {
        common::qemu_io_fmt("raw", uri(&sock), &[cmd]);
    }
    let (code, stderr) = srv.stop_with_stderr();
    assert_eq!(code, 0);
    assert!(
        stderr.contains("WARNING: Image format was not specified for")
            && stderr.contains("write operations on block 0 will be restricted"),
        "{stderr}"
    );
    common::qemu_io_fmt("raw", &tenant, &["read -P 0 0 4k", "read -P 0x52 4k 60k"]);
    // Still raw: the next probing serve exports the tenant's data, not /etc/passwd.
    let srv = Bg::serving(
        BIN,
        &["serve", "-t", "-r", "-k", sock.to_str().unwrap(), &tenant],
        &sock,
    );
    run(
        "qemu-io",
        &["-f", "raw", "-r", "-c", "read -P 0 0 4k", &uri(&sock)],
    );
    assert_eq!(srv.stop(), 0);
}

/// With `-f raw` the format is known, not guessed: block 0 is the client's to write.
#[test]
fn explicit_raw_allows_any_block0() {
    let dir = tempfile::tempdir().unwrap();
    let evil = evil_header(dir.path());
    let tenant = path_in(dir.path(), "tenant.raw");
    common::qemu_create_fmt(&tenant, "raw", "", "1M");
    let sock = dir.path().join("s");
    let args = [
        "serve",
        "-t",
        "-f",
        "raw",
        "-k",
        sock.to_str().unwrap(),
        &tenant,
    ];
    let srv = Bg::serving(BIN, &args, &sock);
    common::qemu_io_fmt("raw", uri(&sock), &[&format!("write -s {evil} 0 512")]);
    let (code, stderr) = srv.stop_with_stderr();
    assert_eq!(code, 0);
    assert!(!stderr.contains("WARNING"), "{stderr}");
}

/// `qcow2 io` on a probed raw image follows qemu-io's rule too: a write completing the qcow2
/// magic in block 0 fails (as it does with qemu-io), other writes work, `-f raw` lifts it.
#[test]
fn cli_io_on_probed_raw_matches_qemu_io() {
    let dir = tempfile::tempdir().unwrap();
    let tenant = path_in(dir.path(), "tenant.raw");
    let mut data = vec![0u8; 1 << 20];
    // A qcow2 header (magic, version 3) but for the magic's last byte.
    data[..8].copy_from_slice(b"QFI\0\0\0\0\x03");
    std::fs::write(&tenant, &data).unwrap();
    let (code, text) = status("qemu-io", &["-c", "write -P 0xfb 3 1", &tenant]);
    assert!(
        code != 0 && text.contains("Operation not permitted"),
        "{text}"
    );
    let r = common::qcow2(&["io", "-c", "write -P 0xfb 3 1", &tenant]);
    assert!(
        r.code != 0 && r.stderr.contains("probe as qcow2"),
        "{}",
        r.stderr
    );
    assert!(r.stderr.contains("probing guessed raw"), "{}", r.stderr);
    common::qcow2_ok(&[
        "io",
        "-c",
        "write -P 0xfc 3 1",
        "-c",
        "write -P 0xfb 512 1",
        &tenant,
    ]);
    common::qcow2_ok(&["io", "-f", "raw", "-c", "write -P 0xfb 3 1", &tenant]);
    common::qemu_io_fmt("raw", &tenant, &["read -P 0xfb 3 1", "read -P 0xfb 512 1"]);
}

/// A raw file whose length is not a multiple of 512 is exported with its size rounded up to
/// whole sectors, as qemu-nbd exports it (`nbdinfo --size`; QEMU's own NBD client hides the
/// difference by rounding); the tail past the file reads as zeros.
#[test]
fn odd_sized_raw_export_is_rounded_like_qemu_nbd() {
    if !crate::nbd_util::have("nbdinfo") {
        eprintln!("nbdinfo not installed: skipping");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let raw = path_in(dir.path(), "odd.raw");
    std::fs::write(&raw, vec![0x5au8; 1000]).unwrap();
    let size_over_nbd = |server: &[&str]| {
        let sock = dir.path().join("s");
        let sock_arg = sock.to_str().unwrap();
        let args = [&server[1..], &["-k", sock_arg, "-f", "raw", "-r", &raw]].concat();
        let srv = Bg::serving(server[0], &args, &sock);
        let size = run("nbdinfo", &["--size", &uri(&sock)]);
        let reads = ["-c", "read -P 0x5a 0 1000", "-c", "read -P 0 1000 24"];
        let out = run(
            "qemu-io",
            &[&["-f", "raw", "-r"][..], &reads, &[&uri(&sock)]].concat(),
        );
        assert!(!out.contains("fail"), "{server:?}: {out}");
        assert_eq!(srv.stop(), 0, "{server:?}");
        size.trim().parse::<u64>().unwrap()
    };
    let theirs = size_over_nbd(&["qemu-nbd", "-t"]);
    let ours = size_over_nbd(&[BIN, "serve", "-t"]);
    assert_eq!(theirs, 1024, "qemu-nbd's rounding");
    assert_eq!(ours, theirs, "export size of a 1000-byte raw file");
}
