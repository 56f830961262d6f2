//! `qcow2 serve -L` (qemu-nbd's client mode): its output must be `qemu-nbd -L`'s, byte for
//! byte, against the same server — ours or qemu-nbd — and its failures qemu-nbd's messages
//! and exit status.

use std::io::{Read, Write};
use std::os::unix::net::UnixListener;
use std::path::Path;
use std::process::Command;

use crate::common::bg::Bg;
use crate::common::{path_in, qemu_create, qemu_io};

const BIN: &str = env!("CARGO_BIN_EXE_qcow2");

/// Exit status, stdout and stderr of `cmd args` (stderr without the program's prefix).
fn listing(cmd: &str, args: &[&str]) -> (i32, String, String) {
    let mut full: Vec<&str> = if cmd == BIN { vec!["serve"] } else { vec![] };
    full.extend_from_slice(args);
    let out = Command::new(cmd).args(&full).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    let prefix = if cmd == BIN { "qcow2: " } else { "qemu-nbd: " };
    let err = err.strip_prefix(prefix).unwrap_or(&err).to_string();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    (out.status.code().unwrap_or(-1), stdout, err)
}

/// `qcow2 serve -L ARGS` and `qemu-nbd -L ARGS` print the same and exit the same; the
/// listing is returned.
fn same_listing(args: &[&str]) -> String {
    let mut full = vec!["-L"];
    full.extend_from_slice(args);
    let ours = listing(BIN, &full);
    let theirs = listing("qemu-nbd", &full);
    assert_eq!(ours.0, theirs.0, "exit status of -L {args:?}: {ours:?}");
    assert_eq!(ours.1, theirs.1, "-L {args:?}");
    ours.1
}

/// Both exit with 1 and print the same message, nothing on stdout. qemu-nbd's lines (a
/// message, then hints) are our one line, as every `qcow2` error is one line.
fn same_failure(args: &[&str]) -> String {
    let ours = listing(BIN, args);
    let theirs = listing("qemu-nbd", args);
    assert_eq!(
        (ours.0, theirs.0),
        (1, 1),
        "{args:?}: {ours:?} / {theirs:?}"
    );
    assert_eq!(ours.1, "", "{args:?}: nothing on stdout");
    let one_line = theirs.2.trim_end().replace('\n', " ");
    assert_eq!(ours.2.trim_end(), one_line, "{args:?}");
    one_line
}

fn image(dir: &Path) -> String {
    let img = path_in(dir, "a.qcow2");
    qemu_create(&img, "", "4M");
    qemu_io(&img, &["write -P 0x5a 0 1M"]);
    img
}

/// `server -t -k SOCK ARGS IMG`, ours or qemu-nbd, until dropped.
fn serve(server: &str, sock: &Path, args: &[&str], img: &str) -> Bg {
    let mut full: Vec<&str> = if server == BIN { vec!["serve"] } else { vec![] };
    full.extend_from_slice(&["-t", "-k", sock.to_str().unwrap()]);
    full.extend_from_slice(args);
    full.push(img);
    Bg::serving(server, &full, sock)
}

#[test]
fn listing_equals_qemu_nbd_against_both_servers() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("s.sock");
    let s = sock.to_str().unwrap();
    let configs: [&[&str]; 4] = [
        &[],
        &["-x", "name", "-D", "a disk"],
        &["-x", "ro", "-r", "-A", "-e", "3"],
        &["-x", "", "--discard=unmap", "-e", "2"],
    ];
    for server in [BIN, "qemu-nbd"] {
        // An image for each: a killed server's lock may outlive it for a moment.
        let sub = dir.path().join(if server == BIN { "ours" } else { "qemu" });
        std::fs::create_dir(&sub).unwrap();
        let img = image(&sub);
        for args in configs {
            let srv = serve(server, &sock, args, &img);
            let text = same_listing(&["-k", s]);
            assert!(text.starts_with("exports available: 1\n"), "{text}");
            drop(srv);
            let _ = std::fs::remove_file(&sock);
        }
    }
}

#[test]
fn listing_over_tcp_equals_qemu_nbd() {
    let dir = tempfile::tempdir().unwrap();
    for server in [BIN, "qemu-nbd"] {
        let sub = dir.path().join(if server == BIN { "ours" } else { "qemu" });
        std::fs::create_dir(&sub).unwrap();
        let img = image(&sub);
        let (srv, port) = serve_tcp(server, &img);
        let p = port.to_string();
        let text = same_listing(&["-b", "127.0.0.1", "-p", &p]);
        assert!(text.contains(" export: 'tcp'\n"), "{text}");
        drop(srv);
    }
}

/// `server -t -b 127.0.0.1 -p PORT -x tcp IMG` on a free port (tried again if another
/// process took the port between our probe and the server's bind).
fn serve_tcp(server: &str, img: &str) -> (Bg, u16) {
    for _ in 0..10 {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let p = port.to_string();
        let mut full: Vec<&str> = if server == BIN { vec!["serve"] } else { vec![] };
        full.extend_from_slice(&["-t", "-b", "127.0.0.1", "-p", &p, "-x", "tcp", img]);
        let mut bg = Bg::spawn(server, &full);
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while std::time::Instant::now() < deadline {
            if bg.exited_within(std::time::Duration::ZERO).is_some() {
                break;
            }
            if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
                return (bg, port);
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    }
    panic!("{server} did not start on a free port");
}

#[test]
fn nothing_listening_fails_like_qemu_nbd() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("missing.sock");
    let m = missing.to_str().unwrap();
    let msg = same_failure(&["-L", "-k", m]);
    assert_eq!(
        msg,
        format!("Failed to connect to '{m}': No such file or directory")
    );
    // A socket file nobody listens on any more.
    let stale = dir.path().join("stale.sock");
    drop(UnixListener::bind(&stale).unwrap());
    let msg = same_failure(&["-L", "-k", stale.to_str().unwrap()]);
    assert!(msg.ends_with("Connection refused"), "{msg}");
    // A TCP port nobody listens on.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let p = port.to_string();
    let msg = same_failure(&["-L", "-b", "127.0.0.1", "-p", &p]);
    assert_eq!(
        msg,
        format!("Failed to connect to '127.0.0.1:{p}': Connection refused")
    );
}

#[test]
fn server_arguments_are_refused_like_qemu_nbd() {
    let dir = tempfile::tempdir().unwrap();
    let img = image(dir.path());
    let sock = dir.path().join("s.sock");
    let s = sock.to_str().unwrap();
    let msg = same_failure(&["-L", "-k", s, &img]);
    assert_eq!(msg, "List mode is incompatible with a file name");
    for extra in [&["-x", "a"][..], &["-f", "qcow2"], &["-D", "d"], &["-A"]] {
        let mut args = vec!["-L", "-k", s];
        args.extend_from_slice(extra);
        let msg = same_failure(&args);
        assert_eq!(msg, "List mode is incompatible with per-device settings");
    }
    let msg = same_failure(&["-L", "--fork", "-k", s]);
    assert_eq!(msg, "List mode is incompatible with forking");
    assert!(!sock.exists());
}

/// A fake server on `sock` that answers each connection with `greeting`, reads `then` bytes
/// (so the client's writes up to there succeed) and hangs up.
fn fake_server(sock: &Path, greeting: Vec<u8>, then: usize) -> std::thread::JoinHandle<()> {
    let l = UnixListener::bind(sock).unwrap();
    std::thread::spawn(move || {
        // One connection per client: ours, then qemu-nbd's.
        for _ in 0..2 {
            let Ok((mut c, _)) = l.accept() else { return };
            let _ = c.write_all(&greeting);
            match then {
                usize::MAX => drop(c.read_to_end(&mut Vec::new())),
                n => drop(c.read_exact(&mut vec![0; n])),
            }
        }
    })
}

#[test]
fn broken_servers_fail_like_qemu_nbd() {
    let dir = tempfile::tempdir().unwrap();
    let newstyle = |flags: u8| [&b"NBDMAGICIHAVEOPT"[..], &[0, flags]].concat();
    let cases: [(&str, Vec<u8>, usize); 4] = [
        // Hangs up at once.
        ("Failed to read initial magic", vec![], 0),
        ("Bad initial magic received: 0x", b"NOTMAGIC".to_vec(), 0),
        // Newstyle without the fixed-newstyle flag: no options, so no list to ask for.
        ("Server does not support export lists", newstyle(0), 4),
        // Fixed newstyle; hangs up after the first option, whose reply never comes.
        ("Failed to read option reply", newstyle(3), 4 + 16),
    ];
    for (i, (expect, greeting, then)) in cases.into_iter().chain(lying_servers()).enumerate() {
        let sock = dir.path().join(format!("fake{i}.sock"));
        let t = fake_server(&sock, greeting, then);
        let msg = same_failure(&["-L", "-k", sock.to_str().unwrap()]);
        assert!(msg.starts_with(expect), "{msg}");
        t.join().unwrap();
    }
}

/// An option reply: magic, option, type, length, payload.
fn rep(opt: u32, kind: u32, len: u32, payload: &[u8]) -> Vec<u8> {
    let mut b = 0x0003_e889_0455_65a9u64.to_be_bytes().to_vec();
    for n in [opt, kind, len] {
        b.extend_from_slice(&n.to_be_bytes());
    }
    b.extend_from_slice(payload);
    b
}

/// Servers that get through the greeting and lie in their `OPT_LIST` answer. Their replies
/// are written at once: both clients send the same options in the same order (extended
/// headers, structured replies — both refused here — then the list).
fn lying_servers() -> Vec<(&'static str, Vec<u8>, usize)> {
    const UNSUP: u32 = (1 << 31) + 1;
    let start = [
        &b"NBDMAGICIHAVEOPT"[..],
        &[0, 3],
        &rep(11, UNSUP, 0, &[]),
        &rep(8, UNSUP, 0, &[]),
    ]
    .concat();
    let with = |reply: Vec<u8>| [start.clone(), reply].concat();
    vec![
        // A length nobody should allocate for.
        (
            "incorrect option length 4294967295",
            with(rep(3, 2, u32::MAX, &[])),
            usize::MAX,
        ),
        // A name longer than the reply.
        (
            "incorrect name length in server's list response",
            with(rep(3, 2, 8, &[0, 0, 0, 9, b'a', b'b', b'c', b'd'])),
            usize::MAX,
        ),
        (
            "TLS negotiation required before option 3 (list) Did you forget a valid tls-creds? \
             server reported: no TLS",
            with(rep(3, (1 << 31) + 5, 6, b"no TLS")),
            usize::MAX,
        ),
        (
            "Requested export not available",
            [
                with(rep(3, 2, 5, &[0, 0, 0, 1, b'x'])),
                rep(3, 1, 0, &[]),
                rep(6, (1 << 31) + 6, 0, &[]),
            ]
            .concat(),
            usize::MAX,
        ),
    ]
}
