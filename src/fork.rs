//! `qcow2 serve --fork`: run the server in a child process and return once it listens.
//!
//! The fork happens in `main` before the tokio runtime exists: forking a process with
//! threads leaves the child with only the forking thread and locks possibly held by the
//! vanished ones. A pipe carries the child's "ready" byte to the parent, which waits for it.

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{FromRawFd, OwnedFd};

/// Which side of the fork this process is on.
pub enum Side {
    /// The parent: exit with this status.
    Parent(u8),
    /// The child: go on serving; write to this end once listening ([`ready`]).
    Child(OwnedFd),
}

/// Fork. The parent waits until the child reports ready (status 0) or dies first
/// (status 1: the child has printed its error on the shared stderr).
pub fn fork() -> std::io::Result<Side> {
    let mut fds = [0; 2];
    // SAFETY: `fds` is a valid array of two ints for pipe2 to fill.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: pipe2 succeeded, so both descriptors are open and owned by nobody else.
    let (read_end, write_end) =
        unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    // SAFETY: called from `main` before the runtime (or any other thread) is started, so
    // the child is a complete copy of a single-threaded process.
    match unsafe { libc::fork() } {
        -1 => Err(std::io::Error::last_os_error()),
        0 => {
            drop(read_end);
            Ok(Side::Child(write_end))
        }
        child => {
            drop(write_end);
            Ok(Side::Parent(wait_ready(read_end, child)))
        }
    }
}

/// The parent's side: one byte means ready; EOF means the child exited before that.
fn wait_ready(read_end: OwnedFd, child: libc::pid_t) -> u8 {
    let mut byte = [0u8; 1];
    match File::from(read_end).read(&mut byte) {
        Ok(1) => 0,
        _ => {
            let mut status = 0;
            // SAFETY: `child` is our own child's pid; `status` is a valid int to fill.
            unsafe { libc::waitpid(child, &mut status, 0) };
            1
        }
    }
}

/// The child's side: tell the parent the server is listening.
pub fn ready(write_end: OwnedFd) {
    // A parent gone already (killed) is not the child's problem: keep serving.
    let _ = File::from(write_end).write_all(&[1]);
}
