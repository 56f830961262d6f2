//! A long-running process (a server holding an image open) for tests that need another
//! process to hold an image while they try to open it.

use std::io::Read;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A background process, killed and reaped on drop.
pub struct Bg {
    child: Child,
}

impl Bg {
    /// Start `cmd args...` with stderr captured.
    pub fn spawn(cmd: &str, args: &[&str]) -> Bg {
        let child = Command::new(cmd)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("{cmd}: {e}"));
        Bg { child }
    }

    /// [`Bg::spawn`] with extra environment variables.
    pub fn spawn_env(cmd: &str, args: &[&str], env: &[(&str, &Path)]) -> Bg {
        let child = Command::new(cmd)
            .args(args)
            .envs(env.iter().map(|(k, v)| (*k, *v)))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("{cmd}: {e}"));
        Bg { child }
    }

    /// Wait (up to 10 s) until `socket` exists; panic if the process exits first.
    pub fn wait_for_socket(&mut self, socket: &Path) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !socket.exists() {
            if let Some((code, err)) = self.exited_within(Duration::ZERO) {
                panic!("exited with {code}: {err}");
            }
            assert!(Instant::now() < deadline, "did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Start `cmd args...` and wait (up to 10 s) until `socket` exists.
    pub fn serving(cmd: &str, args: &[&str], socket: &Path) -> Bg {
        let mut bg = Bg::spawn(cmd, args);
        let deadline = Instant::now() + Duration::from_secs(10);
        while !socket.exists() {
            if let Some((code, err)) = bg.exited_within(Duration::ZERO) {
                panic!("{cmd} {args:?} exited with {code}: {err}");
            }
            assert!(Instant::now() < deadline, "{cmd} did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
        bg
    }

    /// The exit code and stderr if the process ends within `d`; `None` if it still runs.
    pub fn exited_within(&mut self, d: Duration) -> Option<(i32, String)> {
        let deadline = Instant::now() + d;
        loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                let mut err = String::new();
                if let Some(mut e) = self.child.stderr.take() {
                    e.read_to_string(&mut err).ok();
                }
                return Some((s.code().unwrap_or(-1), err));
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The process id.
    pub fn id(&self) -> u32 {
        self.child.id()
    }

    /// SIGTERM and wait (up to 10 s) for the exit code.
    pub fn stop(self) -> i32 {
        self.stop_with_stderr().0
    }

    /// SIGTERM and wait (up to 10 s) for the exit code and what the process wrote to stderr.
    pub fn stop_with_stderr(mut self) -> (i32, String) {
        // SAFETY: kill(2) on our own child's pid has no memory-safety preconditions.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        match self.exited_within(Duration::from_secs(10)) {
            Some(r) => r,
            None => panic!("process ignores SIGTERM"),
        }
    }
}

impl Drop for Bg {
    /// SIGTERM and a few seconds to exit, then SIGKILL. A server killed outright in the middle
    /// of IO keeps its image locked for a moment after it has been reaped (the kernel drops
    /// the file references of its io_uring requests later): a test that opens the image next
    /// would see it locked. A graceful exit closes the image first.
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            // SAFETY: kill(2) on our own child, not yet reaped, has no memory-safety
            // preconditions.
            unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
            let _ = self.exited_within(Duration::from_secs(5));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
