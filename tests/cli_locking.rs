//! Image locking against QEMU, both ways: while one side (ours or QEMU's) holds an image
//! read-write, the other side's opens fail with QEMU's "Failed to get ... lock" message, exactly
//! as between two QEMU processes; `-U` read-only opens still work; backing files are locked
//! against writers; a read-only holder keeps writers out.

use crate::common;

use std::path::Path;

use common::bg::Bg;
use common::{assert_check_clean, path_in, qcow2, qcow2_ok, run, status};
use qcow2_engine::ErrorKind;
use qcow2_engine::image::{Image, OpenOptions};

const BIN: &str = env!("CARGO_BIN_EXE_qcow2");

/// base.qcow2 (pattern 0x11 in the first 64 KiB) ← top.qcow2, in a fresh directory.
fn chain(dir: &Path) -> (String, String) {
    let base = path_in(dir, "base.qcow2");
    let top = path_in(dir, "top.qcow2");
    common::qemu_create(&base, "", "1M");
    common::qemu_io(&base, &["write -P 0x11 0 64k"]);
    common::qemu_overlay("base.qcow2", "qcow2", &top);
    (base, top)
}

fn assert_locked(code: i32, text: &str, lock: &str) {
    assert_ne!(code, 0, "open succeeded on a locked image: {text}");
    assert!(
        text.contains(lock) && text.contains("Is another process using the image"),
        "expected {lock:?}: {text}"
    );
}

/// `qcow2 serve` holds top.qcow2 read-write: qemu-io can neither write nor read it (nor write
/// its backing file) without -U, exactly as if qemu-nbd held it.
#[test]
fn qemu_cannot_open_what_we_serve() {
    let dir = tempfile::tempdir().unwrap();
    let (base, top) = chain(dir.path());
    let sock = dir.path().join("s");
    let srv = Bg::serving(
        BIN,
        &["serve", "-t", "-k", sock.to_str().unwrap(), &top],
        &sock,
    );
    let (code, text) = status("qemu-io", &["-c", "write -P 0x22 0 4k", &top]);
    assert_locked(code, &text, "Failed to get \"write\" lock");
    let (code, text) = status("qemu-io", &["-r", "-c", "read 0 4k", &top]);
    assert_locked(code, &text, "Failed to get shared \"write\" lock");
    let (code, text) = status("qemu-img", &["info", &top]);
    assert_locked(code, &text, "Failed to get shared \"write\" lock");
    let (code, text) = status("qemu-io", &["-c", "write -P 0x22 0 4k", &base]);
    assert_locked(code, &text, "Failed to get \"write\" lock");
    // -U reads work; the backing file may be read by others.
    run("qemu-io", &["-U", "-r", "-c", "read -P 0x11 0 64k", &top]);
    run("qemu-io", &["-r", "-c", "read -P 0x11 0 64k", &base]);
    run("qemu-img", &["check", "-U", &top]);
    assert_eq!(srv.stop(), 0);
    assert_check_clean(Path::new(&top));
    common::qemu_io(&top, &["read -P 0x11 0 64k"]);
}

/// A read-only `qcow2 serve -r` keeps writers out, but not other readers.
#[test]
fn qemu_cannot_write_what_we_serve_read_only() {
    let dir = tempfile::tempdir().unwrap();
    let (_base, top) = chain(dir.path());
    let sock = dir.path().join("s");
    let srv = Bg::serving(
        BIN,
        &["serve", "-t", "-r", "-k", sock.to_str().unwrap(), &top],
        &sock,
    );
    let (code, text) = status("qemu-io", &["-c", "write -P 0x22 0 4k", &top]);
    assert_locked(code, &text, "Failed to get \"write\" lock");
    run("qemu-io", &["-r", "-c", "read -P 0x11 0 64k", &top]);
    assert_eq!(srv.stop(), 0);
}

/// qemu-nbd holds top.qcow2 read-write: our commands fail to open it (write or read) with
/// QEMU's message; with -U, read-only commands work; our server refuses to start.
#[test]
fn we_cannot_open_what_qemu_serves() {
    let dir = tempfile::tempdir().unwrap();
    let (base, top) = chain(dir.path());
    let sock = dir.path().join("q");
    let s = sock.to_str().unwrap();
    let qemu = Bg::serving("qemu-nbd", &["-t", "-k", s, "-f", "qcow2", &top], &sock);
    let r = qcow2(&["io", "-c", "write -P 0x22 0 4k", &top]);
    assert_locked(r.code, &r.stderr, "Failed to get \"write\" lock");
    let r = qcow2(&["io", "-r", "-c", "read 0 4k", &top]);
    assert_locked(r.code, &r.stderr, "Failed to get shared \"write\" lock");
    for cmd in [&["info", &top][..], &["map", &top], &["check", &top]] {
        let r = qcow2(cmd);
        assert_locked(r.code, &r.stderr, "Failed to get shared \"write\" lock");
    }
    let r = qcow2(&["io", "-c", "write -P 0x22 0 4k", &base]);
    assert_locked(r.code, &r.stderr, "Failed to get \"write\" lock");
    let sock2 = dir.path().join("ours");
    let r = qcow2(&["serve", "-t", "-k", sock2.to_str().unwrap(), &top]);
    assert_locked(r.code, &r.stderr, "Failed to get \"write\" lock");
    // -U is for reading only, and then works.
    qcow2_ok(&["io", "-U", "-r", "-c", "read -P 0x11 0 64k", &top]);
    qcow2_ok(&["info", "-U", &top]);
    qcow2_ok(&["map", "-U", &top]);
    qcow2_ok(&["check", "-U", &top]);
    let r = qcow2(&["io", "-U", "-c", "read 0 4k", &top]);
    assert!(
        r.code != 0 && r.stderr.contains("read-only"),
        "{}",
        r.stderr
    );
    drop(qemu);
    // Once QEMU is gone, we may write.
    qcow2_ok(&["io", "-c", "write -P 0x22 0 4k", &top]);
    assert_check_clean(Path::new(&top));
}

/// The library: two writers in one process exclude each other too; `locking(false)` opts out;
/// `force_share` is for read-only opens.
#[tokio::test]
async fn library_locks_and_opt_out() {
    let dir = tempfile::tempdir().unwrap();
    let (_base, top) = chain(dir.path());
    let rw = OpenOptions::new().writable(true);
    let a = Image::open(&top, &rw).await.unwrap();
    let e = Image::open(&top, &rw).await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Locked, "{e}");
    let e = Image::open(&top, &OpenOptions::new()).await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Locked, "{e}");
    let ro = Image::open(&top, &OpenOptions::new().force_share(true)).await;
    ro.unwrap().close().await.unwrap();
    let unlocked = Image::open(&top, &OpenOptions::new().locking(false)).await;
    unlocked.unwrap().close().await.unwrap();
    let e = Image::open(&top, &rw.clone().force_share(true)).await;
    assert_eq!(e.unwrap_err().kind(), ErrorKind::InvalidArgument);
    a.close().await.unwrap();
    drop(a);
    Image::open(&top, &rw).await.unwrap().close().await.unwrap();
}
