//! A closed stdout (`qcow2 io ... | true`, `qcow2 info IMG | head -1`) must not panic or lose
//! work: the commands stop printing, finish, close the image and exit as they would have.

use crate::common;

use std::process::{Command, Stdio};

use common::path_in;

/// Run `qcow2 ARGS` with stdout a pipe whose reading end is already closed; return the exit
/// code and stderr.
fn with_closed_stdout(args: &[&str]) -> (i32, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_qcow2"))
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Close the reader before the child gets to print anything (it opens an image first).
    drop(child.stdout.take());
    let out = child.wait_with_output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn io_writes_survive_a_closed_stdout() {
    let dir = tempfile::tempdir().unwrap();
    let img = path_in(dir.path(), "a.qcow2");
    common::qemu_create(&img, "", "1M");
    let (code, stderr) = with_closed_stdout(&[
        "io",
        "-c",
        "write -P 0xab 0 4k",
        "-c",
        "write -P 0xcd 64k 4k",
        "-c",
        "read -P 0xab 0 4k",
        &img,
    ]);
    assert_eq!(code, 0, "stderr: {stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    // Both writes are on disk and the image was closed cleanly.
    common::qemu_io(&img, &["read -P 0xab 0 4k", "read -P 0xcd 64k 4k"]);
    common::assert_check_clean(std::path::Path::new(&img));
}

#[test]
fn read_only_commands_exit_quietly_on_a_closed_stdout() {
    let dir = tempfile::tempdir().unwrap();
    let img = path_in(dir.path(), "a.qcow2");
    common::qemu_create(&img, "", "1M");
    common::qemu_io(&img, &["write 0 64k"]);
    for args in [
        &["info", &img][..],
        &["info", "--output=json", &img],
        &["map", "--output=json", &img],
        &["check", &img],
        &["dump", &img],
    ] {
        let (code, stderr) = with_closed_stdout(args);
        assert_eq!(code, 0, "{args:?}: {stderr}");
        assert!(stderr.is_empty(), "{args:?}: {stderr}");
    }
}
