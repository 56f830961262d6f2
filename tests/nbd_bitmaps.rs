//! `qcow2 serve -B NAME` against `qemu-nbd -B NAME`: the `qemu:dirty-bitmap:NAME` contexts of
//! an image whose bitmaps qemu-img made and qemu-io dirtied (granularities 4 KiB, 64 KiB and
//! 1 MiB, one bitmap disabled after some writes), read by `nbdinfo --map=CONTEXT` and by
//! `qemu-img map` with `x-dirty-bitmap`, listed by `nbdinfo --list --json`; writes through a
//! writable export; and the refusals (unknown bitmap, bitmap in use). Needs nbdinfo
//! (libnbd-bin): skipped with a message without it.

use std::path::Path;
use std::time::Duration;

use crate::common::bg::Bg;
use crate::common::{path_in, qcow2, qemu_create, qemu_io, run, status};

const BIN: &str = env!("CARGO_BIN_EXE_qcow2");

/// The bitmaps of [`image`]: every granularity, and one disabled.
const BITMAPS: [&str; 4] = ["g64k", "g4k", "g1m", "off"];

/// Whether nbdinfo is there; prints why a test is skipped when not.
fn have_nbdinfo() -> bool {
    let ok = std::process::Command::new("nbdinfo")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !ok {
        eprintln!("skipped: nbdinfo not installed (apt-get install libnbd-bin)");
    }
    ok
}

/// A 10 MiB + 4 KiB image (the last 1 MiB chunk is partial) with bitmaps qemu-img added
/// and writes qemu-io made: "off" saw the first writes only, then was disabled.
fn image(dir: &Path) -> String {
    let img = path_in(dir, "a.qcow2");
    qemu_create(&img, "", 10 * 1024 * 1024 + 4096);
    let add = |name: &str, extra: &[&str]| {
        let mut full = vec!["bitmap", "--add"];
        full.extend_from_slice(extra);
        full.extend_from_slice(&[img.as_str(), name]);
        run("qemu-img", &full);
    };
    add("g64k", &["-g", "65536"]);
    add("g4k", &["-g", "4096"]);
    add("g1m", &["-g", "1M"]);
    add("off", &[]);
    qemu_io(&img, &["write -P 1 100k 10k", "write -P 2 3M 200k"]);
    run("qemu-img", &["bitmap", "--disable", &img, "off"]);
    qemu_io(
        &img,
        &[
            "write -P 3 5000k 1k",
            "write -z 7M 64k",
            "discard 8M 128k",
            "write -P 4 10M 4k",
        ],
    );
    img
}

fn uri(sock: &Path) -> String {
    format!("nbd+unix:///?socket={}", sock.display())
}

/// Start `server` (our binary or qemu-nbd) persistently on `sock` with `args`, and wait
/// until it accepts connections (the socket file appears at bind, a moment before listen).
fn start(server: &str, sock: &Path, args: &[&str], img: &str) -> Bg {
    let _ = std::fs::remove_file(sock);
    let mut full: Vec<&str> = if server == BIN { vec!["serve"] } else { vec![] };
    full.extend_from_slice(&["-t", "-k", sock.to_str().unwrap()]);
    full.extend_from_slice(args);
    full.push(img);
    let bg = Bg::serving(server, &full, sock);
    for _ in 0..200 {
        if std::os::unix::net::UnixStream::connect(sock).is_ok() {
            return bg;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    panic!("{server} does not accept connections");
}

/// What a client sees of the export: the contexts `nbdinfo --list --json` lists, then per
/// bitmap `nbdinfo --map=qemu:dirty-bitmap:NAME` and `qemu-img map` with `x-dirty-bitmap`.
fn observe(sock: &Path, names: &[&str]) -> Vec<String> {
    let list = run("nbdinfo", &["--list", "--json", &uri(sock)]);
    let v: serde_json::Value = serde_json::from_str(&list).unwrap();
    let mut out = vec![v["exports"][0]["contexts"].to_string()];
    for name in names {
        let ctx = format!("qemu:dirty-bitmap:{name}");
        out.push(run("nbdinfo", &[&format!("--map={ctx}"), &uri(sock)]));
        let opts = format!(
            "driver=nbd,server.type=unix,server.path={},x-dirty-bitmap={ctx}",
            sock.display()
        );
        out.push(run(
            "qemu-img",
            &["map", "--output=json", "--image-opts", &opts],
        ));
    }
    out
}

/// [`observe`] of `img` served by `server` with `args`.
fn observe_served(server: &str, sock: &Path, args: &[&str], img: &str) -> Vec<String> {
    let names: Vec<&str> = args
        .windows(2)
        .filter(|w| w[0] == "-B")
        .map(|w| w[1])
        .collect();
    let bg = start(server, sock, args, img);
    let seen = observe(sock, &names);
    assert_eq!(bg.stop(), 0, "{server} {args:?}");
    seen
}

#[test]
fn read_only_maps_match_qemu_nbd() {
    if !have_nbdinfo() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let img = image(dir.path());
    let sock = dir.path().join("s.sock");
    let all: Vec<&str> = BITMAPS.iter().flat_map(|b| ["-B", *b]).collect();
    let mut with_a = vec!["-A", "-B", "g4k", "-B", "off"];
    with_a.push("-r");
    let flag_sets: [Vec<&str>; 3] = [
        [&["-r"][..], &all].concat(),
        with_a,
        // -s: a writable overlay over the image; the bitmap is found in its backing file.
        vec!["-s", "-B", "g1m"],
    ];
    for args in &flag_sets {
        let ours = observe_served(BIN, &sock, args, &img);
        let theirs = observe_served("qemu-nbd", &sock, args, &img);
        assert_eq!(ours, theirs, "{args:?}");
    }
    // Not vacuous: the 4 KiB bitmap has dirty ranges and the disabled one fewer.
    let seen = observe_served(BIN, &sock, &["-r", "-B", "g4k", "-B", "off"], &img);
    let dirty = |map: &str| map.lines().filter(|l| l.ends_with("dirty")).count();
    assert_eq!(dirty(&seen[1]), 6, "{}", seen[1]);
    assert_eq!(dirty(&seen[3]), 2, "{}", seen[3]);
    crate::common::assert_check_clean(Path::new(&img));
}

#[test]
fn writes_to_a_writable_export_dirty_the_bitmap_as_with_qemu_nbd() {
    if !have_nbdinfo() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let img = image(dir.path());
    let sock = dir.path().join("s.sock");
    let mut seen = Vec::new();
    for server in [BIN, "qemu-nbd"] {
        let copy = path_in(dir.path(), "copy.qcow2");
        std::fs::copy(&img, &copy).unwrap();
        let args = ["-B", "g64k", "-B", "off"];
        let bg = start(server, &sock, &args, &copy);
        let w = ["-c", "write -P 9 6M 4k", "-c", "write -z 9M 70k"];
        run(
            "qemu-io",
            &[&["-f", "raw"][..], &w, &[&uri(&sock)]].concat(),
        );
        let live = observe(&sock, &["g64k", "off"]);
        assert_eq!(bg.stop(), 0, "{server}");
        // What the server stored at exit: qemu-nbd reads it back the same.
        let stored = observe_served("qemu-nbd", &sock, &["-r", "-B", "g64k", "-B", "off"], &copy);
        assert_eq!(
            live[1..],
            stored[1..],
            "{server}: stored bitmaps differ from live ones"
        );
        crate::common::assert_check_clean(Path::new(&copy));
        seen.push(live);
    }
    assert_eq!(seen[0], seen[1]);
}

#[test]
fn unknown_and_inconsistent_bitmaps_are_refused_as_by_qemu_nbd() {
    let dir = tempfile::tempdir().unwrap();
    let img = image(dir.path());
    let sock = dir.path().join("s.sock");
    let s = sock.to_str().unwrap();
    // A process killed while it has the image open leaves its bitmaps marked in use.
    let inuse = path_in(dir.path(), "inuse.qcow2");
    std::fs::copy(&img, &inuse).unwrap();
    let (code, _) = status("qemu-io", &["-c", "write 0 4k", "-c", "sigraise 9", &inuse]);
    assert_ne!(code, 0);
    let cases: [(&[&str], &str, &str); 4] = [
        (
            &["-r", "-B", "nosuch"],
            &img,
            "Bitmap 'nosuch' is not found",
        ),
        (
            &["-B", "g4k", "-B", "nosuch"],
            &img,
            "Bitmap 'nosuch' is not found",
        ),
        (
            &["-r", "-B", "g64k"],
            &inuse,
            "Bitmap 'g64k' is inconsistent and cannot be used",
        ),
        (
            &["-B", "g64k"],
            &inuse,
            "Bitmap 'g64k' is inconsistent and cannot be used",
        ),
    ];
    for (args, file, expect) in cases {
        let full = [&["-k", s][..], args, &[file]].concat();
        let (code, text) = status("qemu-nbd", &full);
        assert_eq!(
            (code, text.trim()),
            (1, format!("qemu-nbd: {expect}").as_str())
        );
        // (qemu-nbd leaves its socket file behind here; we fail before making it.)
        let _ = std::fs::remove_file(&sock);
        let r = qcow2(&[&["serve"][..], &full].concat());
        assert_eq!(
            (r.code, r.stderr.trim()),
            (1, format!("qcow2: {expect}").as_str())
        );
        assert!(!sock.exists(), "{args:?}");
    }
}

/// Regression: a writable `serve` that failed after opening the image (an unknown -B, a
/// socket it could not bind) exited without closing it, leaving the enabled bitmaps marked
/// in use on disk: unusable afterwards, as qemu-img info showed. qemu-nbd leaves them clean.
#[test]
fn a_failed_start_leaves_the_bitmaps_clean() {
    let dir = tempfile::tempdir().unwrap();
    let img = image(dir.path());
    let sock = path_in(dir.path(), "s.sock");
    let no_dir = path_in(dir.path(), "nonexistent/s.sock");
    let in_use = |f: &str| run("qemu-img", &["info", f]).matches("in-use").count();
    for (server, args) in [
        ("qemu-nbd", &["-k", &sock, "-B", "nosuch"][..]),
        (BIN, &["serve", "-k", &sock, "-B", "nosuch"][..]),
        (BIN, &["serve", "-k", &no_dir, "-B", "g4k"][..]),
    ] {
        let copy = path_in(dir.path(), "copy.qcow2");
        std::fs::copy(&img, &copy).unwrap();
        let (code, text) = status(server, &[args, &[copy.as_str()]].concat());
        assert_eq!(code, 1, "{server} {args:?}: {text}");
        assert_eq!(in_use(&copy), 0, "{server} {args:?}");
        let _ = std::fs::remove_file(&sock);
    }
}

/// Bitmaps made and changed by ours (`qcow2 bitmap`, writes through `qcow2 io`) are read by
/// QEMU identically: `qemu-nbd -B` and `qcow2 serve -B` show the same dirty extents.
#[test]
fn bitmaps_made_by_ours_read_the_same_through_qemu_nbd() {
    if !have_nbdinfo() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let img = path_in(dir.path(), "ours.qcow2");
    qemu_create(&img, "", 8 * 1024 * 1024);
    let ours = |args: &[&str]| crate::common::qcow2_ok(args);
    ours(&["bitmap", "--add", "-g", "65536", &img, "a"]);
    ours(&["bitmap", "--add", "-g", "4096", &img, "b"]);
    ours(&["bitmap", "--add", &img, "m"]);
    ours(&[
        "io",
        "-c",
        "write -P 1 100k 10k",
        "-c",
        "write -z 2M 8k",
        &img,
    ]);
    ours(&["bitmap", "--disable", &img, "b"]);
    ours(&[
        "io",
        "-c",
        "write -P 2 5M 300k",
        "-c",
        "discard 7M 64k",
        &img,
    ]);
    ours(&["bitmap", "--merge", "b", &img, "m"]);
    let sock = dir.path().join("s.sock");
    let args = ["-r", "-B", "a", "-B", "b", "-B", "m"];
    let served = observe_served(BIN, &sock, &args, &img);
    let by_qemu = observe_served("qemu-nbd", &sock, &args, &img);
    assert_eq!(served, by_qemu);
    // Not vacuous: "a" saw every write, "b" only the first two, "m" = its own + "b".
    let dirty = |map: &str| map.lines().filter(|l| l.ends_with("dirty")).count();
    assert_eq!(dirty(&by_qemu[1]), 4, "{}", by_qemu[1]);
    assert_eq!(dirty(&by_qemu[3]), 2, "{}", by_qemu[3]);
    assert_eq!(dirty(&by_qemu[5]), 4, "{}", by_qemu[5]);
    crate::common::assert_check_clean(Path::new(&img));
}
