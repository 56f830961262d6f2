//! Helpers shared by the integration tests: running QEMU's tools and comparing images.
#![allow(dead_code)]

pub mod bg;
pub mod bytes;
pub mod chain;
mod qemu;

use std::path::Path;
use std::process::Command;

pub mod yielding;

pub use qemu::{
    qemu_create, qemu_create_fmt, qemu_create_in, qemu_io, qemu_io_fmt, qemu_io_in, run_in,
};

/// Run a command, panicking with its output when it fails.
pub fn run(cmd: &str, args: &[&str]) -> String {
    let out = Command::new(cmd)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{cmd}: {e}"));
    assert!(
        out.status.success(),
        "{cmd} {args:?} failed: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Exit code of a command.
pub fn status(cmd: &str, args: &[&str]) -> (i32, String) {
    let out = Command::new(cmd).args(args).output().unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.code().unwrap_or(-1), text)
}

/// `qemu-img check` must report no errors and no leaks.
pub fn assert_check_clean(img: &Path) {
    let (code, text) = status("qemu-img", &["check", img.to_str().unwrap()]);
    assert_eq!(code, 0, "qemu-img check {}:\n{text}", img.display());
}

/// The reference content of an image, by `qemu-img convert -O raw`.
pub fn qemu_raw(img: &Path) -> Vec<u8> {
    let out = img.with_extension("ref.raw");
    run(
        "qemu-img",
        &[
            "convert",
            "-O",
            "raw",
            img.to_str().unwrap(),
            out.to_str().unwrap(),
        ],
    );
    let data = std::fs::read(&out).unwrap();
    std::fs::remove_file(&out).ok();
    data
}

/// Find the first differing offset of two buffers, for readable assertion messages.
pub fn first_difference(a: &[u8], b: &[u8]) -> Option<usize> {
    if a.len() != b.len() {
        return Some(a.len().min(b.len()));
    }
    a.iter().zip(b).position(|(x, y)| x != y)
}

/// `qemu-img check --output=json [extra...] IMG`: the parsed report and the exit code.
pub fn qemu_check(img: &Path, extra: &[&str]) -> (i32, qcow2_engine::check::CheckReport) {
    let mut args = vec!["check", "--output=json"];
    args.extend_from_slice(extra);
    args.push(img.to_str().unwrap());
    let out = Command::new("qemu-img").args(&args).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let report = serde_json::from_str(&text).unwrap_or_else(|e| {
        panic!(
            "qemu-img {args:?}: {e}\n{text}\n{}",
            String::from_utf8_lossy(&out.stderr)
        )
    });
    (out.status.code().unwrap_or(-1), report)
}

/// Open an image file as storage for the library.
pub fn storage(img: &Path, read_only: bool) -> std::sync::Arc<dyn qcow2_engine::Storage> {
    let flags = qcow2_engine::storage::OpenFlags {
        read_only,
        direct: false,
    };
    std::sync::Arc::new(qcow2_engine::storage::FileStorage::open(img, flags).unwrap())
}

/// Output of one run of the `qcow2` binary.
pub struct Cli {
    /// Exit status (-1 when killed by a signal).
    pub code: i32,
    /// Standard output.
    pub stdout: String,
    /// Standard error.
    pub stderr: String,
}

/// Run the `qcow2` binary built for these tests.
pub fn qcow2(args: &[&str]) -> Cli {
    let out = Command::new(env!("CARGO_BIN_EXE_qcow2"))
        .args(args)
        .output()
        .unwrap();
    Cli {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// Run the `qcow2` binary and return its stdout, panicking unless it exits 0.
pub fn qcow2_ok(args: &[&str]) -> String {
    let r = qcow2(args);
    assert_eq!(
        r.code, 0,
        "qcow2 {args:?} failed:\n{}{}",
        r.stdout, r.stderr
    );
    r.stdout
}

/// A path inside `dir` as a `String`.
pub fn path_in(dir: &Path, name: &str) -> String {
    dir.join(name).to_str().unwrap().to_string()
}

/// `qemu-img create -f qcow2 -b BACKING -F FMT OVERLAY` (size taken from the backing file).
pub fn qemu_overlay(backing: &str, backing_fmt: &str, overlay: &str) {
    run(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            backing,
            "-F",
            backing_fmt,
            overlay,
        ],
    );
}
