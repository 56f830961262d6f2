//! Thin, synchronous wrappers over the syscalls the file backend needs: positional reads and
//! writes that loop over short transfers, `fallocate`, and opening with `O_DIRECT`.
//!
//! Everything here blocks; callers run it on an IO thread, never on the async executor.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::Path;

/// `fallocate` modes used by the backend (Linux values; unused elsewhere).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Falloc {
    /// Mode 0: allocate blocks, extending the size if the range passes the end.
    Allocate,
    /// `FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE`: make the range read as zeros, keep blocks.
    ZeroRange,
    /// `FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE`: deallocate; the range reads as zeros.
    PunchHole,
}

/// Whether `err` means "this filesystem or kernel cannot do that" (as opposed to a real failure).
pub(super) fn is_unsupported(err: &io::Error) -> bool {
    if err.kind() == io::ErrorKind::Unsupported {
        return true;
    }
    matches!(
        err.raw_os_error(),
        Some(libc::EOPNOTSUPP) | Some(libc::ENOSYS)
    )
}

#[cfg(target_os = "linux")]
pub(super) fn fallocate(file: &File, mode: Falloc, offset: u64, len: u64) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    let flags = match mode {
        Falloc::Allocate => 0,
        Falloc::ZeroRange => libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE,
        Falloc::PunchHole => libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
    };
    let off = to_off_t(offset)?;
    let n = to_off_t(len)?;
    loop {
        // SAFETY: `fallocate` takes no pointers; the descriptor is valid for as long as `file` is
        // borrowed, so it cannot be closed (and reused) during the call.
        let ret = unsafe { libc::fallocate(file.as_raw_fd(), flags, off, n) };
        if ret == 0 {
            return Ok(());
        }
        let err = io::Error::last_os_error();
        if err.kind() != io::ErrorKind::Interrupted {
            return Err(err);
        }
    }
}

#[cfg(not(target_os = "linux"))]
pub(super) fn fallocate(_file: &File, _mode: Falloc, _offset: u64, _len: u64) -> io::Result<()> {
    Err(io::ErrorKind::Unsupported.into())
}

#[cfg(target_os = "linux")]
fn to_off_t(v: u64) -> io::Result<libc::off_t> {
    libc::off_t::try_from(v).map_err(|_| invalid_input("offset or length too large"))
}

/// Read `buf.len()` bytes at `offset`, looping over short reads; bytes past the end of the file
/// are zero-filled. Returns how many bytes came from the file.
pub(super) fn read_full(file: &File, buf: &mut [u8], offset: u64) -> io::Result<usize> {
    let mut done = 0;
    while done < buf.len() {
        match file.read_at(&mut buf[done..], offset + done as u64) {
            Ok(0) => break,
            Ok(n) => done += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    buf[done..].fill(0);
    Ok(done)
}

/// Write all of `buf` at `offset`, looping over short writes.
pub(super) fn write_full(file: &File, buf: &[u8], offset: u64) -> io::Result<()> {
    // `write_all_at` already loops over short writes and retries on EINTR.
    file.write_all_at(buf, offset)
}

/// Open `path` with the given access, optionally with `O_DIRECT` (a clear `Unsupported` error if
/// the filesystem refuses it, as tmpfs does).
///
/// Only regular files and block devices are accepted. The file is opened with `O_NONBLOCK` so
/// that a FIFO or a character device named by a hostile image cannot block the open (a FIFO
/// without a writer blocks `open` forever); the type is checked on the open descriptor (no
/// race with a rename), then `O_NONBLOCK` is cleared for ordinary blocking IO.
pub(super) fn open(path: &Path, write: bool, create: bool, direct: bool) -> io::Result<File> {
    let mut opts = OpenOptions::new();
    opts.read(true).write(write);
    if create {
        opts.create(true).truncate(true);
    }
    let direct_flag = if direct { direct_flag()? } else { 0 };
    opts.custom_flags(direct_flag | libc::O_NONBLOCK);
    let file = opts.open(path).map_err(|e| {
        if direct && e.raw_os_error() == Some(libc::EINVAL) {
            io::Error::new(
                io::ErrorKind::Unsupported,
                format!(
                    "O_DIRECT is not supported by the filesystem of {}",
                    path.display()
                ),
            )
        } else {
            e
        }
    })?;
    check_file_type(&file)?;
    clear_nonblock(&file)?;
    Ok(file)
}

/// Refuse anything but a regular file or a block device.
fn check_file_type(file: &File) -> io::Result<()> {
    use std::os::unix::fs::FileTypeExt;
    let t = file.metadata()?.file_type();
    if t.is_file() || t.is_block_device() {
        return Ok(());
    }
    let what = if t.is_fifo() {
        "a FIFO"
    } else if t.is_char_device() {
        "a character device"
    } else if t.is_socket() {
        "a socket"
    } else if t.is_dir() {
        "a directory"
    } else {
        "not a regular file"
    };
    Err(io::Error::new(
        io::ErrorKind::InvalidInput,
        format!("{what} is not an image (only regular files and block devices are opened)"),
    ))
}

/// Clear `O_NONBLOCK`, which `open` set only to make the open itself safe.
fn clear_nonblock(file: &File) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    let fd = file.as_raw_fd();
    // SAFETY: `fcntl(F_GETFL)` takes no pointer; `fd` is valid while `file` is borrowed.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    if flags < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: as above; `F_SETFL` takes an integer argument.
    if unsafe { libc::fcntl(fd, libc::F_SETFL, flags & !libc::O_NONBLOCK) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(target_os = "linux")]
fn direct_flag() -> io::Result<i32> {
    Ok(libc::O_DIRECT)
}

#[cfg(not(target_os = "linux"))]
fn direct_flag() -> io::Result<i32> {
    Err(io::Error::new(
        io::ErrorKind::Unsupported,
        "O_DIRECT is only supported on Linux",
    ))
}

pub(super) fn invalid_input(msg: &'static str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, msg)
}

/// Whether `offset` starts data (`true`) or a hole, and the length of that run (≤ `len`),
/// from `lseek(SEEK_DATA/SEEK_HOLE)`. Filesystems without hole support report all data.
#[cfg(target_os = "linux")]
pub(super) fn data_status(file: &File, offset: u64, len: u64) -> io::Result<(bool, u64)> {
    use std::os::unix::io::AsRawFd;
    let seek = |whence| {
        // SAFETY: lseek on a valid, open file descriptor has no memory-safety requirements.
        let r = unsafe { libc::lseek(file.as_raw_fd(), offset as libc::off_t, whence) };
        if r < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(r as u64)
        }
    };
    let data = match seek(libc::SEEK_DATA) {
        Ok(d) => d,
        // ENXIO: no data at or after offset — the rest is a hole.
        Err(e) if e.raw_os_error() == Some(libc::ENXIO) => return Ok((false, len)),
        Err(e) if is_unsupported(&e) || e.raw_os_error() == Some(libc::EINVAL) => {
            return Ok((true, len));
        }
        Err(e) => return Err(e),
    };
    if data > offset {
        return Ok((false, (data - offset).min(len)));
    }
    let hole = seek(libc::SEEK_HOLE)?;
    Ok((
        true,
        hole.saturating_sub(offset).clamp(1, len.max(1)).min(len),
    ))
}

/// Non-Linux: no hole information.
#[cfg(not(target_os = "linux"))]
pub(super) fn data_status(_file: &File, _offset: u64, len: u64) -> io::Result<(bool, u64)> {
    Ok((true, len))
}

/// Read from the page cache without blocking: `preadv2(RWF_NOWAIT)` loops until `buf` is full,
/// the file ends (rest zero-filled) or the kernel would have to wait for the disk. Returns how
/// many bytes of `buf` are done; the caller does the rest on an IO thread.
#[cfg(target_os = "linux")]
pub(super) fn read_nowait(file: &File, buf: &mut [u8], offset: u64) -> usize {
    use std::os::unix::io::AsRawFd;
    let mut done = 0;
    while done < buf.len() {
        let Ok(off) = to_off_t(offset + done as u64) else {
            return done;
        };
        let rest = &mut buf[done..];
        let iov = libc::iovec {
            iov_base: rest.as_mut_ptr().cast(),
            iov_len: rest.len(),
        };
        // SAFETY: `iov` describes `rest`, a live, exclusively borrowed buffer, and the call is
        // synchronous: the kernel is done with the buffer when it returns.
        let r = unsafe { libc::preadv2(file.as_raw_fd(), &iov, 1, off, libc::RWF_NOWAIT) };
        match r {
            0 => {
                buf[done..].fill(0);
                return buf.len();
            }
            n if n > 0 => done += n as usize,
            // EAGAIN (not cached), EOPNOTSUPP (no RWF_NOWAIT) or anything else: let the IO
            // thread do it the blocking way and report real errors.
            _ => return done,
        }
    }
    done
}

/// Non-Linux: never completes without blocking.
#[cfg(not(target_os = "linux"))]
pub(super) fn read_nowait(_file: &File, _buf: &mut [u8], _offset: u64) -> usize {
    0
}

/// Write into the page cache without blocking: `pwritev2(RWF_NOWAIT)`; returns how many bytes
/// were written (0 when the kernel would block) and whether the filesystem refuses
/// non-blocking buffered writes altogether (ext4 on older kernels: then stop trying).
#[cfg(target_os = "linux")]
pub(super) fn write_nowait(file: &File, buf: &[u8], offset: u64) -> (usize, bool) {
    use std::os::unix::io::AsRawFd;
    let mut done = 0;
    while done < buf.len() {
        let Ok(off) = to_off_t(offset + done as u64) else {
            return (done, false);
        };
        let rest = &buf[done..];
        let iov = libc::iovec {
            iov_base: rest.as_ptr() as *mut _,
            iov_len: rest.len(),
        };
        // SAFETY: `iov` describes `rest`, a live buffer the kernel only reads, and the call is
        // synchronous.
        let r = unsafe { libc::pwritev2(file.as_raw_fd(), &iov, 1, off, libc::RWF_NOWAIT) };
        if r <= 0 {
            let unsupported = io::Error::last_os_error().raw_os_error() == Some(libc::EOPNOTSUPP);
            return (done, r < 0 && unsupported);
        }
        done += r as usize;
    }
    (done, false)
}

/// Non-Linux: never completes without blocking.
#[cfg(not(target_os = "linux"))]
pub(super) fn write_nowait(_file: &File, _buf: &[u8], _offset: u64) -> (usize, bool) {
    (0, true)
}
