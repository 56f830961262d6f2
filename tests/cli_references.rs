//! Files an image names (backing file, external data file) are untrusted references: the
//! reference policy refuses absolute names, `..` and names leading outside the image's
//! directory unless allowed; FIFOs never hang an open; data files stay read-only unless the
//! caller opts in; `serve` distrusts images by default; `info` warns about such names.

use crate::common;

use std::path::Path;
use std::time::Duration;

use common::bg::Bg;
use common::{path_in, qcow2, qcow2_ok, run};
use qcow2_engine::ErrorKind;
use qcow2_engine::image::{Image, OpenOptions, ReferencePolicy};

const BIN: &str = env!("CARGO_BIN_EXE_qcow2");

/// A 1 MiB qcow2 image naming `backing` (raw) without checking it exists.
fn naming_backing(img: &str, backing: &str) {
    run(
        "qemu-img",
        &[
            "create", "-q", "-f", "qcow2", "-u", "-b", backing, "-F", "raw", img, "1M",
        ],
    );
}

/// `qcow2 serve ARGS` must exit quickly with an error mentioning `why` (not serve).
fn serve_refuses(dir: &Path, args: &[&str], why: &str) {
    let sock = dir.join("s");
    let mut all = vec!["serve", "-t", "-k", sock.to_str().unwrap()];
    all.extend_from_slice(args);
    let mut srv = Bg::spawn(BIN, &all);
    let exited = srv.exited_within(Duration::from_secs(10));
    let (code, err) = exited.unwrap_or_else(|| panic!("serve {args:?} is serving"));
    assert_ne!(code, 0, "{err}");
    assert!(err.contains(why), "expected {why:?}: {err}");
}

/// An image naming /etc/passwd as its backing file: serve refuses it, the untrusted CLI modes
/// refuse it, the library refuses it by default; --trusted (the CLI default) follows it.
#[tokio::test]
async fn absolute_backing_name() {
    let dir = tempfile::tempdir().unwrap();
    let img = path_in(dir.path(), "evil.qcow2");
    naming_backing(&img, "/etc/passwd");
    serve_refuses(dir.path(), &["-r", &img], "absolute names are not allowed");
    for flag in ["--untrusted", "--no-backing"] {
        let r = qcow2(&["io", flag, "-r", "-c", "read 0 512", &img]);
        assert!(
            r.code != 0 && r.stderr.contains("backing file '/etc/passwd'"),
            "{}",
            r.stderr
        );
        let r = qcow2(&["convert", flag, &img, &path_in(dir.path(), "out.raw")]);
        assert!(
            r.code != 0 && r.stderr.contains("reference refused"),
            "{}",
            r.stderr
        );
    }
    let r = qcow2(&["map", "--references-under", "/etc", &img]);
    assert!(r.code != 0 && r.stderr.contains("absolute"), "{}", r.stderr);
    let e = Image::open(&img, &OpenOptions::new()).await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Refused, "{e}");
    // The user's own image: qemu-img's behaviour.
    let passwd = std::fs::read("/etc/passwd").unwrap();
    let n = passwd.len().min(512);
    let out = qcow2_ok(&["io", "-r", "-c", &format!("read -v 0 {n}"), &img]);
    assert!(
        out.contains("read 512/512") || out.contains(&format!("read {n}/{n}")),
        "{out}"
    );
}

/// `..` in a backing name, and a symlink out of the directory, are refused by serve and by
/// the library's default policy; a plain name in the same directory is followed.
#[tokio::test]
async fn dotdot_and_symlink_backing() {
    let dir = tempfile::tempdir().unwrap();
    let sub = dir.path().join("tenant");
    std::fs::create_dir(&sub).unwrap();
    let victim = path_in(dir.path(), "victim.raw");
    common::qemu_create_fmt(&victim, "raw", "", "1M");
    common::qemu_io_fmt("raw", &victim, &["write -P 0x5a 0 1M"]);
    let img = path_in(&sub, "up.qcow2");
    naming_backing(&img, "../victim.raw");
    serve_refuses(&sub, &["-r", &img], "names with '..' are not allowed");
    let e = Image::open(&img, &OpenOptions::new()).await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Refused, "{e}");

    std::os::unix::fs::symlink(&victim, sub.join("link.raw")).unwrap();
    let linked = path_in(&sub, "link.qcow2");
    naming_backing(&linked, "link.raw");
    serve_refuses(&sub, &["-r", &linked], "leads outside");

    let own = path_in(&sub, "base.raw");
    common::qemu_create_fmt(&own, "raw", "", "1M");
    let ok = path_in(&sub, "ok.qcow2");
    naming_backing(&ok, "base.raw");
    let img = Image::open(&ok, &OpenOptions::new()).await.unwrap();
    assert_eq!(img.backing().map(|b| b.format()), Some("raw"));
    img.close().await.unwrap();
    // Allowing the parent directory lets `..` through only with an explicit policy.
    let any = OpenOptions::new().references(ReferencePolicy::Any);
    let img = Image::open(&path_in(&sub, "up.qcow2"), &any).await.unwrap();
    let mut buf = vec![0u8; 512];
    img.read_at(&mut buf, 0).await.unwrap();
    assert_eq!(buf, vec![0x5a; 512]);
}

/// An external data file named by absolute path (another tenant's disk): a writable serve
/// refuses it, so no NBD client write can land there; the library refuses it by default and
/// `follow_backing(false)` covers data files too.
#[tokio::test]
async fn data_file_references() {
    let dir = tempfile::tempdir().unwrap();
    let victim = path_in(dir.path(), "victim.raw");
    let img = path_in(dir.path(), "df.qcow2");
    let opt = format!("data_file={victim},data_file_raw=on");
    common::qemu_create(&img, &opt, "1M");
    common::qemu_io_fmt("raw", &victim, &["write -P 0x77 0 1M"]);
    serve_refuses(dir.path(), &[&img], "absolute names are not allowed");
    for opts in [OpenOptions::new(), OpenOptions::new().follow_backing(false)] {
        let e = Image::open(&img, &opts).await.unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Refused, "{e}");
    }
    // Trusted, but still read-only unless asked: a writable open needs the opt-in.
    let any = OpenOptions::new().references(ReferencePolicy::Any);
    let e = Image::open(&img, &any.clone().writable(true))
        .await
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Refused, "{e}");
    let img_rw = any.writable(true).writable_data_file(true);
    Image::open(&img, &img_rw)
        .await
        .unwrap()
        .close()
        .await
        .unwrap();
    common::qemu_io_fmt("raw", &victim, &["read -P 0x77 0 1M"]);

    // A relative data file next to the image: read-only serving works untrusted, writable
    // serving needs --trusted.
    let near = path_in(dir.path(), "near.qcow2");
    // qemu-img creates a relative data file name relative to its working directory.
    let made = std::process::Command::new("qemu-img")
        .args([
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "data_file=near.raw",
            "near.qcow2",
            "1M",
        ])
        .current_dir(dir.path())
        .status()
        .unwrap();
    assert!(made.success());
    serve_refuses(dir.path(), &[&near], "writable data files are off");
    let sock = dir.path().join("ro");
    let srv = Bg::serving(
        BIN,
        &["serve", "-t", "-r", "-k", sock.to_str().unwrap(), &near],
        &sock,
    );
    let uri = format!("nbd+unix:///?socket={}", sock.display());
    run(
        "qemu-io",
        &["-f", "raw", "-r", "-c", "read -P 0 0 64k", &uri],
    );
    assert_eq!(srv.stop(), 0);
}

/// A FIFO as backing file, data file or image fails at once with a clear error instead of
/// blocking `open` forever.
#[tokio::test]
async fn fifo_never_hangs() {
    let dir = tempfile::tempdir().unwrap();
    let fifo = dir.path().join("pipe");
    run("mkfifo", &[fifo.to_str().unwrap()]);
    let img = path_in(dir.path(), "fifo.qcow2");
    naming_backing(&img, "pipe");
    let mut io = Bg::spawn(BIN, &["io", "-r", "-c", "read 0 512", &img]);
    let (code, err) = io
        .exited_within(Duration::from_secs(10))
        .expect("opening a FIFO backing file hangs");
    assert!(code != 0 && err.contains("a FIFO is not an image"), "{err}");
    let opts = OpenOptions::new();
    let opened = tokio::time::timeout(Duration::from_secs(10), Image::open(&img, &opts));
    let e = opened.await.expect("library open hangs").unwrap_err();
    // The file type is the cause (`source()`), which `{:#}` appends to the context.
    assert!(format!("{e:#}").contains("FIFO"), "{e:#}");
    let r = qcow2(&["info", fifo.to_str().unwrap()]);
    assert_ne!(r.code, 0);
}

/// A missing backing file: the message is the error chain, qemu-img style, with the cause
/// once (the library's `Display` leaves the cause to `source()`, the CLI joins the chain).
#[test]
fn missing_backing_prints_its_cause_once() {
    let dir = tempfile::tempdir().unwrap();
    let img = path_in(dir.path(), "top.qcow2");
    naming_backing(&img, "gone.raw");
    let r = qcow2(&["io", "-c", "read 0 512", &img]);
    assert_ne!(r.code, 0, "{}", r.stderr);
    let cause = std::io::Error::from_raw_os_error(libc::ENOENT).to_string();
    let gone = dir.path().join("gone.raw");
    let want = format!(
        "qcow2: {}: I/O error: opening the backing file: {cause}",
        gone.display()
    );
    assert_eq!(r.stderr.trim_end(), want);
}

/// `info` opens no referenced file but warns about absolute and `..` names.
#[test]
fn info_warns_about_escaping_names() {
    let dir = tempfile::tempdir().unwrap();
    let img = path_in(dir.path(), "evil.qcow2");
    naming_backing(&img, "/etc/passwd");
    let r = qcow2(&["info", &img]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(
        r.stderr.contains("warning") && r.stderr.contains("absolute"),
        "{}",
        r.stderr
    );
    let up = path_in(dir.path(), "up.qcow2");
    naming_backing(&up, "../x.raw");
    let r = qcow2(&["info", &up]);
    assert!(r.code == 0 && r.stderr.contains("'..'"), "{}", r.stderr);
    let r = qcow2(&["info", "--untrusted", "--backing-chain", &img]);
    assert!(r.code != 0 && r.stderr.contains("absolute"), "{}", r.stderr);
}
