//! `qcow2 serve` started and stopped with qemu-nbd's command line: QEMU's iotests start
//! line, stopping after the last client without `-t`, `--pid-file`, `--fork`, `-e`.
//! Data goes through qemu-io and is judged by qemu-io's pattern checks and `qemu-img check`.

use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::common::bg::Bg;
use crate::common::{assert_check_clean, path_in, qemu_create, qemu_io_fmt};

const BIN: &str = env!("CARGO_BIN_EXE_qcow2");

/// The NBD URI of a Unix socket, for qemu-io.
fn uri(sock: &Path) -> String {
    format!("nbd+unix:///?socket={}", sock.display())
}

/// Wait up to `d` for `cond`.
fn wait_for(d: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + d;
    while !cond() {
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    true
}

/// The pid in a pid file, if it holds one ("PID\n").
fn read_pid(path: &Path) -> Option<i32> {
    let text = std::fs::read_to_string(path).ok()?;
    text.strip_suffix('\n')?.parse().ok()
}

/// A process we did not spawn directly (a `--fork` child): SIGKILLed on drop.
struct Pid(i32);

impl Drop for Pid {
    fn drop(&mut self) {
        // SAFETY: kill(2) has no memory-safety preconditions; the pid is the server's.
        unsafe { libc::kill(self.0, libc::SIGKILL) };
    }
}

/// `qcow2 serve ARGS` in the foreground of its own child, with stdio detached.
fn spawn(args: &[&str]) -> Child {
    Command::new(BIN)
        .arg("serve")
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap()
}

#[test]
fn iotests_start_line_with_fork_serves_and_stops() {
    let dir = tempfile::tempdir().unwrap();
    let img = path_in(dir.path(), "a.qcow2");
    qemu_create(&img, "", "4M");
    let sock = dir.path().join("s.sock");
    let pid_file = dir.path().join("pid");
    let pf = format!("--pid-file={}", pid_file.display());
    let s = sock.to_str().unwrap();
    let mut parent = spawn(&[
        &pf, "--fork", "-v", "-t", "-k", s, "-f", "qcow2", "-e", "42", "-x", "", &img,
    ]);
    let status = parent.wait().unwrap();
    assert!(status.success(), "--fork parent: {status}");
    // The parent returned: the socket already listens and the pid file names the server.
    UnixStream::connect(&sock).expect("connectable as soon as the parent exits");
    let pid = read_pid(&pid_file).expect("pid file holds PID and a newline");
    let guard = Pid(pid);
    assert_ne!(
        pid as u32,
        parent.id(),
        "the pid file names the child, not the parent"
    );

    qemu_io_fmt("raw", uri(&sock), &["write -P 0x5a 64k 128k"]);
    // -t: still there for a second client.
    qemu_io_fmt(
        "raw",
        uri(&sock),
        &["read -P 0x5a 64k 128k", "read -P 0 0 64k"],
    );

    // SAFETY: kill(2) has no memory-safety preconditions.
    unsafe { libc::kill(pid, libc::SIGTERM) };
    let gone = wait_for(Duration::from_secs(10), || {
        !pid_file.exists() && !sock.exists()
    });
    assert!(gone, "SIGTERM: pid file and socket must be removed");
    // SAFETY: signal 0 only asks whether the pid exists.
    let alive = || unsafe { libc::kill(pid, 0) } == 0;
    assert!(
        wait_for(Duration::from_secs(10), || !alive()),
        "server still running"
    );
    drop(guard);
    assert_check_clean(Path::new(&img));
    qemu_io_fmt("qcow2", &img, &["read -P 0x5a 64k 128k"]);
}

#[test]
fn fork_reports_a_failed_start() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("s.sock");
    let missing = path_in(dir.path(), "missing.qcow2");
    let mut parent = spawn(&["--fork", "-k", sock.to_str().unwrap(), &missing]);
    let mut bg_status = None;
    assert!(wait_for(Duration::from_secs(10), || {
        bg_status = parent.try_wait().unwrap();
        bg_status.is_some()
    }));
    assert_eq!(bg_status.and_then(|s| s.code()), Some(1));
    assert!(!sock.exists());
}

/// Start `server ARGS -k SOCK IMG` (no `-t`), serve one qemu-io client, and expect the
/// server to exit by itself with status 0 and its socket removed.
fn exits_after_last_client(server: &[&str]) {
    let dir = tempfile::tempdir().unwrap();
    let img = path_in(dir.path(), "a.qcow2");
    qemu_create(&img, "", "1M");
    let sock = dir.path().join("s.sock");
    let mut args: Vec<&str> = server[1..].to_vec();
    args.extend(["-f", "qcow2", "-k", sock.to_str().unwrap(), &img]);
    let mut bg = Bg::serving(server[0], &args, &sock);
    qemu_io_fmt("raw", uri(&sock), &["write -P 0x33 0 4k"]);
    let exited = bg.exited_within(Duration::from_secs(10));
    let (code, err) = exited.unwrap_or_else(|| panic!("{server:?} kept running without -t"));
    assert_eq!(code, 0, "{server:?}: {err}");
    assert!(!sock.exists(), "{server:?} left its socket behind");
    assert_check_clean(Path::new(&img));
    qemu_io_fmt("qcow2", &img, &["read -P 0x33 0 4k"]);
}

#[test]
fn without_persistent_exits_after_the_last_client() {
    exits_after_last_client(&["qemu-nbd"]);
    exits_after_last_client(&[BIN, "serve"]);
}

#[test]
fn persistent_serves_a_second_client_until_sigterm() {
    let dir = tempfile::tempdir().unwrap();
    let img = path_in(dir.path(), "a.qcow2");
    qemu_create(&img, "", "1M");
    let sock = dir.path().join("s.sock");
    let pid_file = dir.path().join("pid");
    let pf = format!("--pid-file={}", pid_file.display());
    let s = sock.to_str().unwrap();
    let mut bg = Bg::serving(BIN, &["serve", "-t", &pf, "-k", s, &img], &sock);
    // The pid file is written before the socket is announced ready; it names this process.
    assert!(wait_for(Duration::from_secs(5), || read_pid(&pid_file).is_some()));
    assert_eq!(read_pid(&pid_file), Some(bg.id() as i32));
    qemu_io_fmt("raw", uri(&sock), &["write -P 0x44 0 8k"]);
    assert!(
        bg.exited_within(Duration::from_millis(300)).is_none(),
        "-t: must stay up"
    );
    qemu_io_fmt("raw", uri(&sock), &["read -P 0x44 0 8k"]);
    assert_eq!(bg.stop(), 0);
    assert!(
        !sock.exists() && !pid_file.exists(),
        "socket and pid file removed on exit"
    );
    assert_check_clean(Path::new(&img));
}

#[test]
fn shared_limits_concurrent_clients() {
    let dir = tempfile::tempdir().unwrap();
    let img = path_in(dir.path(), "a.qcow2");
    qemu_create(&img, "", "1M");
    let sock = dir.path().join("s.sock");
    let s = sock.to_str().unwrap();
    let bg = Bg::serving(BIN, &["serve", "-t", "-e", "1", "-k", s, &img], &sock);
    // The first client takes the only slot (it says nothing: the handshake limit is 10 s).
    let first = UnixStream::connect(&sock).unwrap();
    std::thread::sleep(Duration::from_millis(100));
    let mut second = Command::new("qemu-io")
        .args(["-f", "raw", "-c", "read 0 4k", &uri(&sock)])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let waited = !wait_for(Duration::from_millis(700), || {
        second.try_wait().unwrap().is_some()
    });
    drop(first);
    let mut code = None;
    let done = wait_for(Duration::from_secs(10), || {
        code = second.try_wait().unwrap().and_then(|s| s.code());
        code.is_some()
    });
    if !done {
        let _ = second.kill();
        let _ = second.wait();
    }
    assert!(
        waited,
        "-e 1: the second client must wait while the first holds the slot"
    );
    assert!(
        done,
        "the second client must be served once the first leaves"
    );
    assert_eq!(code, Some(0));
    assert_eq!(bg.stop(), 0);
}

#[test]
fn description_is_listed() {
    let dir = tempfile::tempdir().unwrap();
    let img = path_in(dir.path(), "a.qcow2");
    qemu_create(&img, "", "1M");
    let sock = dir.path().join("s.sock");
    let s = sock.to_str().unwrap();
    let bg = Bg::serving(
        BIN,
        &["serve", "-t", "-x", "exp", "-D", "a disk", "-k", s, &img],
        &sock,
    );
    let out = Command::new("qemu-nbd")
        .args(["-L", "-k", s])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("description: a disk"), "{text}");
    assert_eq!(bg.stop(), 0);
}
