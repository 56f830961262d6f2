//! The `qcow2 serve` binary against real NBD clients: qemu-io and qemu-img (always), and
//! nbdinfo/nbdcopy from libnbd-bin when installed. After a SIGTERM shutdown the image must
//! pass `qemu-img check` and hold exactly what the clients wrote (a shadow copy).

use crate::common;
use crate::nbd_util;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{assert_check_clean, first_difference, qcow2_ok, qemu_raw, run, status};
use nbd_util::have;

const MIB: usize = 1 << 20;

/// `qcow2 serve ARGS...` running in the background.
struct Serve {
    child: Child,
}

impl Serve {
    /// Start the server and wait until `ready` (a socket path) exists or a port answers.
    fn start(args: &[&str], socket: Option<&Path>, port: Option<u16>) -> Serve {
        let child = Command::new(env!("CARGO_BIN_EXE_qcow2"))
            .args(["serve", "-t"])
            // The old default limit, for tests that do not set one.
            .args(if args.contains(&"-e") {
                &[][..]
            } else {
                &["-e", "16"][..]
            })
            .args(args)
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        // From here on, Drop reaps the child even if we panic.
        let srv = Serve { child };
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let up = match (socket, port) {
                (Some(s), _) => s.exists(),
                (None, Some(p)) => std::net::TcpStream::connect(("127.0.0.1", p)).is_ok(),
                _ => unreachable!(),
            };
            if up {
                return srv;
            }
            assert!(Instant::now() < deadline, "qcow2 serve did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGTERM, then the exit status (graceful shutdown must finish within 10 s).
    fn stop(mut self) -> i32 {
        // SAFETY: kill(2) on our own child's pid has no memory-safety preconditions.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                return s.code().unwrap_or(-1);
            }
            assert!(Instant::now() < deadline, "qcow2 serve ignores SIGTERM");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Serve {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn uri(sock: &Path) -> String {
    format!("nbd+unix:///?socket={}", sock.display())
}

/// `qemu-img convert` of the export at `uri` into the raw file `out` equals `shadow`.
fn assert_export_equals(uri: &str, out: &Path, shadow: &[u8]) {
    let args = [
        "convert",
        "-f",
        "raw",
        "-O",
        "raw",
        uri,
        out.to_str().unwrap(),
    ];
    run("qemu-img", &args);
    assert_eq!(
        first_difference(&std::fs::read(out).unwrap(), shadow),
        None,
        "{uri}"
    );
}

fn qemu_io(uri: &str, cmds: &[&str]) -> String {
    let mut args = vec!["-f", "raw"];
    for c in cmds {
        args.extend(["-c", c]);
    }
    args.push(uri);
    run("qemu-io", &args)
}

fn fill(shadow: &mut [u8], off: usize, len: usize, byte: u8) {
    shadow[off..off + len].fill(byte);
}

/// Extents as (start, length, zero, data), adjacent equal ones merged.
fn merged(v: impl IntoIterator<Item = (u64, u64, bool, bool)>) -> Vec<(u64, u64, bool, bool)> {
    let mut out: Vec<(u64, u64, bool, bool)> = Vec::new();
    for (s, l, z, d) in v {
        match out.last_mut() {
            Some(last) if (last.2, last.3) == (z, d) && last.0 + last.1 == s => last.1 += l,
            _ => out.push((s, l, z, d)),
        }
    }
    out
}

/// `qemu-img map --output=json`-style JSON lines → merged extents.
fn json_map(text: &str) -> Vec<(u64, u64, bool, bool)> {
    let v: serde_json::Value = serde_json::from_str(text).unwrap();
    merged(v.as_array().unwrap().iter().map(|e| {
        (
            e["start"].as_u64().unwrap(),
            e["length"].as_u64().unwrap(),
            e["zero"].as_bool().unwrap(),
            e["data"].as_bool().unwrap(),
        )
    }))
}

/// `nbdinfo --map` lines (`start length type description`) → merged extents.
fn nbdinfo_map(text: &str) -> Vec<(u64, u64, bool, bool)> {
    merged(text.lines().map(|l| {
        let f: Vec<u64> = l
            .split_whitespace()
            .take(3)
            .map(|x| x.parse().unwrap())
            .collect();
        (f[0], f[1], f[2] & 2 != 0, f[2] & 1 == 0)
    }))
}

/// The image content after shutdown must equal the shadow.
fn assert_content(img: &Path, shadow: &[u8]) {
    assert_check_clean(img);
    let raw = qemu_raw(img);
    assert_eq!(raw.len(), shadow.len());
    assert_eq!(
        first_difference(&raw, shadow),
        None,
        "image differs from the shadow"
    );
}

fn setup(size: &str) -> (tempfile::TempDir, PathBuf, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("disk.qcow2");
    common::qemu_create(&img, "", size);
    let sock = dir.path().join("nbd.sock");
    (dir, img, sock)
}

#[test]
fn qemu_io_convert_map_and_clean_shutdown() {
    let (dir, img, sock) = setup("64M");
    let mut shadow = vec![0u8; 64 * MIB];
    // Data written by QEMU before serving: served as is.
    common::qemu_io(img.to_str().unwrap(), &["write -P 0x11 8M 3M"]);
    fill(&mut shadow, 8 * MIB, 3 * MIB, 0x11);

    let srv = Serve::start(
        &["--socket", sock.to_str().unwrap(), img.to_str().unwrap()],
        Some(&sock),
        None,
    );
    let u = uri(&sock);
    qemu_io(
        &u,
        &[
            "write -P 0x5a 0 1M",
            "read -P 0x5a 0 1M",
            "write -z 1M 64k",
            "discard 2M 64k",
            "write -P 0x77 3000k 100k",
            "aio_write -P 0x21 20M 64k",
            "aio_write -P 0x22 21M 64k",
            "aio_write -P 0x23 9M 4k",
            "aio_flush",
            "write -z -u 10M 64k",
            "read -P 0x11 8M 1M",
            "read -P 0x23 9M 4k",
            "read -P 0 10M 64k",
        ],
    );
    fill(&mut shadow, 0, MIB, 0x5a);
    fill(&mut shadow, 3000 << 10, 100 << 10, 0x77);
    fill(&mut shadow, 20 * MIB, 64 << 10, 0x21);
    fill(&mut shadow, 21 * MIB, 64 << 10, 0x22);
    fill(&mut shadow, 9 * MIB, 4 << 10, 0x23);
    fill(&mut shadow, 10 * MIB, 64 << 10, 0);

    // The whole content through qemu-img's NBD client.
    let out = dir.path().join("out.raw");
    assert_export_equals(&u, &out, &shadow);

    // Block status agrees with our own map of the (flushed: qemu-io flushes on exit) file.
    // The server still holds the image: read it with -U, as qemu-img would need.
    let ours = json_map(&qcow2_ok(&[
        "map",
        "-U",
        "--output=json",
        img.to_str().unwrap(),
    ]));
    let theirs = json_map(&run("qemu-img", &["map", "-f", "raw", "--output=json", &u]));
    assert_eq!(theirs, ours, "qemu-img map over NBD vs qcow2 map");
    assert!(ours.iter().any(|e| e.3) && ours.iter().any(|e| !e.3));
    if have("nbdinfo") {
        let text = run("nbdinfo", &["--map", &u]);
        assert_eq!(
            nbdinfo_map(&text),
            ours,
            "nbdinfo --map vs qcow2 map:\n{text}"
        );
    } else {
        eprintln!("nbdinfo not installed (apt-get install libnbd-bin): skipping nbdinfo --map");
    }

    assert_eq!(srv.stop(), 0);
    assert!(!sock.exists(), "socket removed on exit");
    assert_content(&img, &shadow);
}

#[test]
fn concurrent_clients_write_disjoint_ranges() {
    let (_dir, img, sock) = setup("32M");
    let srv = Serve::start(
        &[
            "-k",
            sock.to_str().unwrap(),
            "-e",
            "8",
            img.to_str().unwrap(),
        ],
        Some(&sock),
        None,
    );
    let u = uri(&sock);
    let mut shadow = vec![0u8; 32 * MIB];
    // Each client owns 4 MiB: a large write, scattered unaligned aio writes, a zeroing.
    let cmds: Vec<Vec<String>> = (0..6u8)
        .map(|i| {
            let base = usize::from(i) * 4 * MIB;
            let p = 0x30 + i;
            let mut c = vec![format!("write -P {p} {base} 1M")];
            for k in 0..8 {
                c.push(format!(
                    "aio_write -P {} {} 5000",
                    p + 0x40,
                    base + MIB + k * 300_000
                ));
            }
            c.push("aio_flush".into());
            c.push(format!("write -z {} 128k", base + 3 * MIB));
            c.push(format!("read -P {p} {base} 1M"));
            c
        })
        .collect();
    for (i, _) in cmds.iter().enumerate() {
        let (base, p) = (i * 4 * MIB, 0x30 + i as u8);
        fill(&mut shadow, base, MIB, p);
        for k in 0..8 {
            fill(&mut shadow, base + MIB + k * 300_000, 5000, p + 0x40);
        }
        fill(&mut shadow, base + 3 * MIB, 128 << 10, 0);
    }
    let children: Vec<_> = cmds
        .iter()
        .map(|c| {
            let mut args = vec!["-f".to_string(), "raw".to_string()];
            for x in c {
                args.extend(["-c".to_string(), x.clone()]);
            }
            args.push(u.clone());
            Command::new("qemu-io").args(&args).output_async()
        })
        .collect();
    for (i, child) in children.into_iter().enumerate() {
        let out = child.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "client {i}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    // Every client's data, seen by one more client.
    let out = _dir.path().join("all.raw");
    assert_export_equals(&u, &out, &shadow);
    assert_eq!(srv.stop(), 0);
    assert_content(&img, &shadow);
}

#[test]
fn tcp_export_name_read_only_and_raw_format() {
    let dir = tempfile::tempdir().unwrap();
    let raw = dir.path().join("disk.raw");
    let mut content = vec![0u8; 4 * MIB];
    fill(&mut content, MIB, 64 << 10, 0xab);
    std::fs::write(&raw, &content).unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let ps = port.to_string();
    let srv = Serve::start(
        &[
            "-f",
            "raw",
            "--read-only",
            "--port",
            &ps,
            "--export-name",
            "foo",
            raw.to_str().unwrap(),
        ],
        None,
        Some(port),
    );
    let u = format!("nbd://127.0.0.1:{port}/foo");
    run(
        "qemu-io",
        &[
            "-f",
            "raw",
            "-r",
            "-c",
            "read -P 0xab 1M 64k",
            "-c",
            "read -P 0 0 1M",
            &u,
        ],
    );
    // Writes are refused: qemu sees a read-only export and will not open it for writing.
    let (code, _) = status("qemu-io", &["-f", "raw", "-c", "write -P 1 0 4k", &u]);
    assert_ne!(code, 0);
    // An unknown export name fails cleanly.
    let bad = format!("nbd://127.0.0.1:{port}/bar");
    let (code, _) = status("qemu-io", &["-f", "raw", "-r", "-c", "read 0 4k", &bad]);
    assert_ne!(code, 0);
    if have("nbdcopy") {
        let out = dir.path().join("copy.raw");
        run("nbdcopy", &[&u, out.to_str().unwrap()]);
        assert_eq!(std::fs::read(&out).unwrap(), content);
    } else {
        eprintln!("nbdcopy not installed (apt-get install libnbd-bin): skipping");
    }
    assert_eq!(srv.stop(), 0);
    assert_eq!(std::fs::read(&raw).unwrap(), content);
}

/// `Command::spawn` with captured output.
trait OutputAsync {
    fn output_async(&mut self) -> Child;
}

impl OutputAsync for Command {
    fn output_async(&mut self) -> Child {
        self.stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    }
}
