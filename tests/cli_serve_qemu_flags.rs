//! qemu-nbd's remaining flags on `qcow2 serve`: `--discard`, `--detect-zeroes`, `-s`,
//! `--cache`/`-n`, `--aio`, `-A`, the refusals (`-l`, `-c`) and `-T`; and `nbdinfo
//! --json` of ours against qemu-nbd's with the same flags. Data is judged by qemu-io's pattern
//! checks, `qemu-img map` and `qemu-img compare` once the server is gone.

use std::path::Path;
use std::time::Duration;

use crate::common::bg::Bg;
use crate::common::{path_in, qcow2, qemu_create, qemu_io, run, status};

const BIN: &str = env!("CARGO_BIN_EXE_qcow2");

fn uri(sock: &Path) -> String {
    format!("nbd+unix:///?socket={}", sock.display())
}

/// `qcow2 serve -t -k SOCK ARGS IMG` until dropped or stopped.
fn serve(sock: &Path, args: &[&str], img: &str) -> Bg {
    let mut full = vec!["serve", "-t", "-k", sock.to_str().unwrap()];
    full.extend_from_slice(args);
    full.push(img);
    Bg::serving(BIN, &full, sock)
}

/// qemu-io commands on the export (`-f raw`: the export is the guest's disk).
fn nbd_io(sock: &Path, cmds: &[&str]) -> String {
    let mut args = vec!["-f", "raw"];
    for c in cmds {
        args.extend_from_slice(&["-c", c]);
    }
    let u = uri(sock);
    args.push(&u);
    let out = run("qemu-io", &args);
    assert!(!out.contains("verification failed"), "{cmds:?}: {out}");
    out
}

/// `qemu-img map --output=json` of `img`, as (start, length, data, zero).
fn map(img: &str) -> Vec<(u64, u64, bool, bool)> {
    let text = run("qemu-img", &["map", "--output=json", img]);
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    v.as_array()
        .unwrap()
        .iter()
        .map(|e| {
            let n = |k: &str| e[k].as_u64().unwrap();
            let b = |k: &str| e[k].as_bool().unwrap();
            (n("start"), n("length"), b("data"), b("zero"))
        })
        .collect()
}

/// Whether `[start, start + len)` is mapped as data (every extent covering it).
fn is_data(m: &[(u64, u64, bool, bool)], start: u64, len: u64) -> bool {
    m.iter()
        .filter(|e| e.0 < start + len && start < e.0 + e.1)
        .all(|e| e.2)
}

fn setup() -> (tempfile::TempDir, String, std::path::PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let img = path_in(dir.path(), "a.qcow2");
    qemu_create(&img, "", "4M");
    qemu_io(&img, &["write -P 0x5a 0 2M"]);
    let sock = dir.path().join("s.sock");
    (dir, img, sock)
}

#[test]
fn discard_is_ignored_by_default_and_unmaps_with_discard_unmap() {
    let (_dir, img, sock) = setup();
    let srv = serve(&sock, &[], &img);
    nbd_io(&sock, &["discard 0 1M"]);
    assert_eq!(srv.stop(), 0);
    // qemu-nbd's default (--discard=ignore): the trim succeeded and changed nothing.
    qemu_io(&img, &["read -P 0x5a 0 2M"]);
    assert!(is_data(&map(&img), 0, 1 << 20));
    let srv = serve(&sock, &["--discard=unmap"], &img);
    nbd_io(&sock, &["discard 0 1M"]);
    assert_eq!(srv.stop(), 0);
    let out = qemu_io(&img, &["read -P 0 0 1M", "read -P 0x5a 1M 1M"]);
    assert!(!out.contains("verification failed"), "{out}");
    assert!(
        !is_data(&map(&img), 0, 1 << 20),
        "discarded clusters are freed"
    );
}

#[test]
fn detect_zeroes_turns_zero_writes_into_zero_clusters() {
    let (_dir, img, sock) = setup();
    let srv = serve(&sock, &["--detect-zeroes=on"], &img);
    nbd_io(&sock, &["write -P 0 3M 64k", "write -P 7 3200k 64k"]);
    assert_eq!(srv.stop(), 0);
    let m = map(&img);
    assert!(
        !is_data(&m, 3 << 20, 64 << 10),
        "all-zero write stored as zeros: {m:?}"
    );
    assert!(is_data(&m, 3200 << 10, 64 << 10));
    qemu_io(&img, &["read -P 0 3M 64k", "read -P 7 3200k 64k"]);
    // Off (the default): the zeros are written as data, as qemu-nbd does.
    let srv = serve(&sock, &[], &img);
    nbd_io(&sock, &["write -P 0 3584k 64k"]);
    assert_eq!(srv.stop(), 0);
    assert!(is_data(&map(&img), 3584 << 10, 64 << 10));
    // unmap needs --discard=unmap (qemu-nbd's rule and message).
    let r = qcow2(&[
        "serve",
        "-k",
        sock.to_str().unwrap(),
        "--detect-zeroes=unmap",
        &img,
    ]);
    assert_eq!(r.code, 1);
    assert!(
        r.stderr
            .contains("without setting discard operation to unmap"),
        "{}",
        r.stderr
    );
    let srv = serve(&sock, &["--detect-zeroes=unmap", "--discard=unmap"], &img);
    nbd_io(&sock, &["write -P 0 0 1M"]);
    assert_eq!(srv.stop(), 0);
    assert!(!is_data(&map(&img), 0, 1 << 20));
    qemu_io(&img, &["read -P 0 0 1M", "read -P 0x5a 1M 1M"]);
}

#[test]
fn snapshot_writes_go_to_a_temporary_overlay() {
    let (dir, img, sock) = setup();
    let copy = path_in(dir.path(), "copy.qcow2");
    std::fs::copy(&img, &copy).unwrap();
    let tmp = dir.path().join("tmp");
    std::fs::create_dir(&tmp).unwrap();
    let s = sock.to_str().unwrap();
    let mut srv = Bg::spawn_env(
        BIN,
        &["serve", "-t", "-s", "-k", s, &img],
        &[("TMPDIR", &tmp)],
    );
    srv.wait_for_socket(&sock);
    nbd_io(
        &sock,
        &[
            "write -P 0x77 1M 1M",
            "read -P 0x77 1M 1M",
            "read -P 0x5a 0 1M",
        ],
    );
    // The overlay is unlinked as soon as it is open.
    assert_eq!(std::fs::read_dir(&tmp).unwrap().count(), 0);
    assert_eq!(srv.stop(), 0);
    let (code, text) = status("qemu-img", &["compare", &img, &copy]);
    assert_eq!(code, 0, "the image changed under -s: {text}");
}

#[test]
fn every_cache_and_aio_mode_serves_the_same_data() {
    let (_dir, img, sock) = setup();
    let modes: [&[&str]; 8] = [
        &["-n"],
        &["--cache=none"],
        &["--cache=writeback"],
        &["--cache=writethrough"],
        &["--cache=directsync", "--aio=native"],
        &["--cache=unsafe"],
        &["--aio=threads"],
        &["--aio=io_uring"],
    ];
    for (i, args) in modes.iter().enumerate() {
        let off = format!("{}k", 2048 + i * 64);
        let srv = serve(&sock, args, &img);
        nbd_io(&sock, &[&format!("write -P {} {off} 64k", i + 1), "flush"]);
        assert_eq!(srv.stop(), 0, "{args:?}");
        qemu_io(&img, &[format!("read -P {} {off} 64k", i + 1)]);
    }
    let s = sock.to_str().unwrap();
    for (args, expect) in [
        (&["--aio=native"][..], "--aio=native needs"),
        (&["-n", "--cache=none"][..], "cannot be used with"),
        (&["--cache=fast"][..], "invalid value"),
    ] {
        let mut full = vec!["serve", "-k", s];
        full.extend_from_slice(args);
        full.push(&img);
        let r = qcow2(&full);
        assert_eq!(r.code, 1, "{args:?}");
        assert!(r.stderr.contains(expect), "{args:?}: {}", r.stderr);
    }
}

#[test]
fn unsupported_flags_are_refused_clearly_and_trace_is_ignored() {
    let (_dir, img, sock) = setup();
    let s = sock.to_str().unwrap();
    for (args, expect) in [
        // The image has no snapshots: -l names one that is not there.
        (
            &["-l", "snap1"][..],
            "Failed to load snapshot: Can't find snapshot",
        ),
        (
            &["-c", "/dev/nbd0"][..],
            "kernel NBD device is not supported",
        ),
    ] {
        let mut full = vec!["serve", "-k", s];
        full.extend_from_slice(args);
        full.push(&img);
        let r = qcow2(&full);
        assert_eq!(r.code, 1, "{args:?}");
        assert!(r.stderr.contains(expect), "{args:?}: {}", r.stderr);
        assert!(!sock.exists());
    }
    let srv = serve(&sock, &["-T", "nbd_*"], &img);
    nbd_io(&sock, &["read -P 0x5a 0 1M"]);
    let (code, err) = srv.stop_with_stderr();
    assert_eq!(code, 0);
    assert!(
        err.contains("-T/--trace is not supported and is ignored"),
        "{err}"
    );
}

/// `nbdinfo --json` of the export qemu-nbd or we serve with `args` (no `-t`: the server
/// exits by itself, status 0, once nbdinfo has gone).
///
/// This test was flaky in the full suite: the server used to be SIGKILLed right after
/// nbdinfo, in the middle of its own shutdown flush. Requests still in flight in io_uring
/// keep the image file open in the kernel for a moment after the process has been reaped, so
/// the image stayed locked; the next server, qemu-nbd, which creates its socket *before* it
/// opens the image, then failed with 'Failed to get "write" lock' and left a stale socket,
/// which nbdinfo found refusing connections. (Reproduced outside the suite: 6 of 160 such
/// restarts failed with our default io_uring backend, 0 of 160 with --aio=threads or when
/// the server is left to exit by itself.) So the server is left to exit, and a failure shows
/// the server's own error instead of retrying blindly.
fn nbdinfo_json(server: &str, sock: &Path, args: &[&str], img: &str) -> serde_json::Value {
    let mut full: Vec<&str> = if server == BIN { vec!["serve"] } else { vec![] };
    full.extend_from_slice(&["-k", sock.to_str().unwrap()]);
    full.extend_from_slice(args);
    full.push(img);
    let mut bg = Bg::serving(server, &full, sock);
    let uri = format!("nbd+unix:///name?socket={}", sock.display());
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let text = loop {
        let (code, text) = status("nbdinfo", &["--json", &uri]);
        if code == 0 {
            break text;
        }
        // The socket file appears at bind(), a moment before listen(): a connection in
        // between is refused. Only that is retried, and only while the server runs.
        if let Some((code, err)) = bg.exited_within(Duration::ZERO) {
            panic!("{server} {full:?} exited with {code}: {err}\nnbdinfo: {text}");
        }
        assert!(text.contains("Connection refused"), "nbdinfo {uri}: {text}");
        assert!(
            std::time::Instant::now() < deadline,
            "{server} never listened"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    let exited = bg.exited_within(Duration::from_secs(10));
    let (code, err) = exited.unwrap_or_else(|| panic!("{server} {full:?} kept running"));
    assert_eq!(code, 0, "{server} {full:?}: {err}");
    assert!(!sock.exists(), "{server} left its socket behind");
    serde_json::from_str(&text).unwrap()
}

#[test]
fn nbdinfo_json_matches_qemu_nbd() {
    if status("nbdinfo", &["--version"]).0 != 0 {
        eprintln!("skipped: nbdinfo not installed");
        return;
    }
    let (_dir, img, sock) = setup();
    let flags: [&[&str]; 3] = [
        &["-x", "name", "-D", "a disk"],
        &["-x", "name", "-r", "-A", "-e", "2"],
        &[
            "-x",
            "name",
            "--discard=unmap",
            "--detect-zeroes=on",
            "-e",
            "3",
            "-f",
            "qcow2",
        ],
    ];
    for args in flags {
        let mut ours = nbdinfo_json(BIN, &sock, args, &img);
        let theirs = nbdinfo_json("qemu-nbd", &sock, args, &img);
        // The one documented difference: our maximum request is 32 MiB (the size every
        // client must accept), qemu-nbd's is its own buffer limit.
        let ours_max = ours["exports"][0]["block_size_maximum"].take();
        assert_eq!(ours_max, 33554432);
        let mut theirs = theirs;
        theirs["exports"][0]["block_size_maximum"].take();
        assert_eq!(ours, theirs, "{args:?}");
    }
}

#[test]
fn one_v_is_quiet_like_qemu_nbd_and_two_log_clients() {
    // QEMU's iotests start the server with -v and compare its stderr with their expected
    // output, in which qemu-nbd prints nothing per client.
    let (_dir, img, sock) = setup();
    for (v, logs) in [("-v", false), ("-vv", true)] {
        let srv = serve(&sock, &[v], &img);
        nbd_io(&sock, &["read -P 0x5a 0 4k"]);
        std::thread::sleep(std::time::Duration::from_millis(200));
        let (code, err) = srv.stop_with_stderr();
        assert_eq!(code, 0);
        assert_eq!(err.contains("client 1 connected"), logs, "{v}: {err}");
    }
}

#[test]
fn exiting_server_leaves_a_pid_file_that_names_another_server() {
    // QEMU's iotests restart the server on the same pid file: `kill OLD; rm PIDFILE; start
    // NEW`. The old server, finishing its shutdown, must not delete the new one's pid file
    // (iotest 033 left a server running: its cleanup found no pid file to kill it by).
    let (dir, img, sock) = setup();
    let pid_file = dir.path().join("pid");
    let pf = format!("--pid-file={}", pid_file.display());
    let srv = serve(&sock, &[&pf], &img);
    // The pid file is written right after the socket is bound.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while std::fs::read_to_string(&pid_file).map_or(true, |t| !t.ends_with('\n')) {
        assert!(std::time::Instant::now() < deadline, "no pid file");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    std::fs::write(&pid_file, "999999\n").unwrap();
    assert_eq!(srv.stop(), 0);
    assert_eq!(std::fs::read_to_string(&pid_file).unwrap(), "999999\n");
    // Its own pid file it removes.
    let srv = serve(&sock, &[&pf], &img);
    assert_eq!(srv.stop(), 0);
    assert!(!pid_file.exists());
}
