//! Making and writing images with QEMU's own tools: `qemu-img create` and `qemu-io`, the way
//! every test drives them (quiet, failing loudly, checking qemu-io's per-command output).

use std::fmt::Display;
use std::path::Path;
use std::process::Command;

/// Run `cmd args` in `dir`, panicking with its output when it fails.
pub fn run_in(dir: &Path, cmd: &str, args: &[&str]) -> String {
    let out = Command::new(cmd)
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap_or_else(|e| panic!("{cmd}: {e}"));
    assert!(
        out.status.success(),
        "{cmd} {args:?} (in {}) failed: {}\n{}",
        dir.display(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn path_str(p: &Path) -> &str {
    p.to_str().expect("test paths are UTF-8")
}

/// `qemu-img create -q -f qcow2 [-o OPTS] IMG SIZE` (no `-o` when `opts` is empty).
pub fn qemu_create(img: impl AsRef<Path>, opts: &str, size: impl Display) {
    qemu_create_fmt(img, "qcow2", opts, size);
}

/// `qemu-img create -q -f FMT [-o OPTS] IMG SIZE` (no `-o` when `opts` is empty). A backing
/// file goes into `opts` as `backing_file=NAME,backing_fmt=FMT` (what `-b`/`-F` set).
pub fn qemu_create_fmt(img: impl AsRef<Path>, fmt: &str, opts: &str, size: impl Display) {
    super::run(
        "qemu-img",
        &create_args(fmt, path_str(img.as_ref()), opts, &size.to_string()),
    );
}

/// [`qemu_create_fmt`] run in `dir`, so that relative names (the image, backing and data
/// files in `opts`) resolve there.
pub fn qemu_create_in(dir: &Path, img: &str, fmt: &str, opts: &str, size: impl Display) {
    run_in(
        dir,
        "qemu-img",
        &create_args(fmt, img, opts, &size.to_string()),
    );
}

fn create_args<'a>(fmt: &'a str, img: &'a str, opts: &'a str, size: &'a str) -> Vec<&'a str> {
    let mut args = vec!["create", "-q", "-f", fmt];
    if !opts.is_empty() {
        args.extend(["-o", opts]);
    }
    args.extend([img, size]);
    args
}

/// `qemu-io -f qcow2 -c CMD... IMG`: every command must succeed (see [`qemu_io_fmt`]).
/// Returns qemu-io's output.
pub fn qemu_io<S: AsRef<str>>(img: impl AsRef<Path>, cmds: &[S]) -> String {
    qemu_io_fmt("qcow2", img, cmds)
}

/// `qemu-io -f FMT -c CMD... IMG`. qemu-io runs every command even after one failed, so
/// besides its exit status its output must not report a failed command, an error or a
/// pattern mismatch.
pub fn qemu_io_fmt<S: AsRef<str>>(fmt: &str, img: impl AsRef<Path>, cmds: &[S]) -> String {
    let img = img.as_ref();
    let out = super::run("qemu-io", &io_args(fmt, path_str(img), cmds));
    assert_io_ok(&out, img, cmds);
    out
}

/// [`qemu_io`] run in `dir`, so that relative names (images, `write -s` pattern files)
/// resolve there.
pub fn qemu_io_in<S: AsRef<str>>(dir: &Path, img: &str, cmds: &[S]) -> String {
    let out = run_in(dir, "qemu-io", &io_args("qcow2", img, cmds));
    assert_io_ok(&out, Path::new(img), cmds);
    out
}

fn io_args<'a, S: AsRef<str>>(fmt: &'a str, img: &'a str, cmds: &'a [S]) -> Vec<&'a str> {
    let mut args = vec!["-f", fmt];
    for c in cmds {
        args.extend(["-c", c.as_ref()]);
    }
    args.push(img);
    args
}

fn assert_io_ok<S: AsRef<str>>(out: &str, img: &Path, cmds: &[S]) {
    let cmds: Vec<&str> = cmds.iter().map(AsRef::as_ref).collect();
    assert!(
        !out.contains("fail") && !out.contains("error") && !out.contains("differ"),
        "qemu-io {cmds:?} {}:\n{out}",
        img.display()
    );
}
