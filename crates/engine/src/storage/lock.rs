//! Image locking compatible with QEMU's: open file description (OFD) byte-range locks, one
//! byte per permission, so that our processes and QEMU's exclude each other's writers exactly
//! as two QEMU processes do.
//!
//! The scheme (QEMU's `file-posix` driver): every holder of an image file takes a *shared*
//! (read) lock on
//!
//! | byte            | meaning                                               |
//! |-----------------|-------------------------------------------------------|
//! | `100 + bit`     | "I use permission `bit`"                              |
//! | `200 + bit`     | "I do not let anyone else use permission `bit`"       |
//!
//! with the permission bits of [`Perms`]. Shared locks never conflict with each other, so the
//! locks only record who wants what; the exclusion comes from the check after taking them: a
//! would-be holder that wants permission `bit` looks for anyone else's lock on `200 + bit`, and
//! one that refuses to share `bit` looks for anyone else's lock on `100 + bit` (`F_OFD_GETLK`
//! with a write lock reports any other description's read lock). Locks are taken before the
//! check, as QEMU does, so two openers racing each other see at least one of the two locks.
//!
//! OFD locks belong to the open file description: they are released when the last descriptor
//! of it is closed (when the storage is dropped), and two opens in one process conflict just as
//! two processes do.

use std::fs::File;
use std::io;

/// A set of QEMU block permissions (`BLK_PERM_*`); bit `i` is lock byte `100 + i` / `200 + i`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Perms(u8);

impl Perms {
    /// No permission.
    pub const NONE: Perms = Perms(0);
    /// Reading data that nobody changes underneath (`BLK_PERM_CONSISTENT_READ`).
    pub const CONSISTENT_READ: Perms = Perms(1 << 0);
    /// Changing data (`BLK_PERM_WRITE`).
    pub const WRITE: Perms = Perms(1 << 1);
    /// Writing data that does not change what a reader sees (`BLK_PERM_WRITE_UNCHANGED`).
    pub const WRITE_UNCHANGED: Perms = Perms(1 << 2);
    /// Changing the file's size (`BLK_PERM_RESIZE`).
    pub const RESIZE: Perms = Perms(1 << 3);
    /// Every permission.
    pub const ALL: Perms = Perms(0x0f);

    /// The union of two sets.
    pub const fn or(self, other: Perms) -> Perms {
        Perms(self.0 | other.0)
    }

    /// Whether permission bit `i` is in the set.
    fn has_bit(self, i: u32) -> bool {
        self.0 & (1 << i) != 0
    }
}

/// QEMU's names of the permission bits, as its lock errors print them.
const NAMES: [&str; 4] = ["consistent read", "write", "write unchanged", "resize"];
/// Lock byte of "uses permission `i`" is `PERM_BASE + i`.
const PERM_BASE: u64 = 100;
/// Lock byte of "does not share permission `i`" is `SHARED_BASE + i`.
const SHARED_BASE: u64 = 200;

/// What a holder of a file uses (`perm`) and lets others use at the same time (`shared`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LockRequest {
    /// The permissions this holder uses.
    pub perm: Perms,
    /// The permissions others may use while this holder has the file.
    pub shared: Perms,
}

impl LockRequest {
    /// A qcow2 image file, as qemu-io/qemu-img/qemu-nbd lock it: writers use read, write and
    /// resize; everyone (read-only openers too) refuses to share write and resize, so a
    /// read-only open fails while another process writes. `force_share` (read-only only,
    /// qemu-img's `-U`) shares everything.
    pub fn image(writable: bool, force_share: bool) -> LockRequest {
        let base = Perms::CONSISTENT_READ.or(Perms::WRITE_UNCHANGED);
        match (writable, force_share) {
            (true, _) => LockRequest {
                perm: Perms::CONSISTENT_READ.or(Perms::WRITE).or(Perms::RESIZE),
                shared: base,
            },
            (false, false) => LockRequest {
                perm: Perms::CONSISTENT_READ,
                shared: base,
            },
            (false, true) => Self::shared_read(),
        }
    }

    /// A backing file: read only, refusing writers (QEMU's default for backing children).
    pub fn backing(force_share: bool) -> LockRequest {
        Self::image(false, force_share)
    }

    /// An external data file: writers use read, write and resize; it shares write (the qcow2
    /// layer above arbitrates) but not resize.
    pub fn data_file(writable: bool, force_share: bool) -> LockRequest {
        let shared = Perms::CONSISTENT_READ
            .or(Perms::WRITE)
            .or(Perms::WRITE_UNCHANGED);
        match (writable, force_share) {
            (true, _) => LockRequest {
                perm: Perms::CONSISTENT_READ.or(Perms::WRITE).or(Perms::RESIZE),
                shared,
            },
            (false, false) => LockRequest {
                perm: Perms::CONSISTENT_READ,
                shared,
            },
            (false, true) => Self::shared_read(),
        }
    }

    /// A raw image, as qemu-io and qemu-img lock it: the permissions used, everything shared.
    pub fn raw(writable: bool) -> LockRequest {
        let perm = match writable {
            true => Perms::CONSISTENT_READ.or(Perms::WRITE),
            false => Perms::CONSISTENT_READ,
        };
        LockRequest {
            perm,
            shared: Perms::ALL,
        }
    }

    /// Read, sharing everything (qemu-img's `-U`).
    fn shared_read() -> LockRequest {
        LockRequest {
            perm: Perms::CONSISTENT_READ,
            shared: Perms::ALL,
        }
    }
}

/// Take the locks of `req` on `file` and check that no other holder conflicts. A conflict is an
/// [`io::ErrorKind::ResourceBusy`] error with QEMU's wording (`Failed to get "write" lock`); the
/// locks taken are then released again.
pub(crate) fn lock(file: &File, req: LockRequest) -> io::Result<()> {
    apply(file, req)?;
    if let Err(e) = check(file, req) {
        let _ = unlock(file);
        return Err(e);
    }
    Ok(())
}

/// Drop every lock byte `file` holds.
pub(crate) fn unlock(file: &File) -> io::Result<()> {
    apply(
        file,
        LockRequest {
            perm: Perms::NONE,
            shared: Perms::ALL,
        },
    )
}

/// Lock (or unlock) each permission byte to match `req`.
fn apply(file: &File, req: LockRequest) -> io::Result<()> {
    // A handful of permission names: the count fits.
    #[allow(clippy::cast_possible_truncation)]
    for i in 0..NAMES.len() as u32 {
        set_read_lock(file, PERM_BASE + u64::from(i), req.perm.has_bit(i))?;
        set_read_lock(file, SHARED_BASE + u64::from(i), !req.shared.has_bit(i))?;
    }
    Ok(())
}

/// Fail if another holder refuses what `req` uses, or uses what `req` refuses to share.
fn check(file: &File, req: LockRequest) -> io::Result<()> {
    for (i, name) in NAMES.iter().enumerate() {
        #[allow(clippy::cast_possible_truncation)] // an index into NAMES (a handful)
        let i = i as u32;
        if req.perm.has_bit(i) && held_by_other(file, SHARED_BASE + u64::from(i))? {
            return Err(busy(format!("Failed to get \"{name}\" lock")));
        }
        if !req.shared.has_bit(i) && held_by_other(file, PERM_BASE + u64::from(i))? {
            return Err(busy(format!("Failed to get shared \"{name}\" lock")));
        }
    }
    Ok(())
}

fn busy(msg: String) -> io::Error {
    io::Error::new(io::ErrorKind::ResourceBusy, msg)
}

#[cfg(target_os = "linux")]
// F_RDLCK/F_WRLCK/F_UNLCK and SEEK_SET are small constants that `c_short` holds (the C
// struct declares those fields `short`).
#[allow(clippy::cast_possible_truncation)]
fn flock(kind: libc::c_int, byte: u64) -> libc::flock {
    // SAFETY: `flock` is a plain C struct of integers; all-zero is a valid value.
    let mut fl: libc::flock = unsafe { std::mem::zeroed() };
    fl.l_type = kind as libc::c_short;
    fl.l_whence = libc::SEEK_SET as libc::c_short;
    fl.l_start = byte as libc::off_t;
    fl.l_len = 1;
    fl
}

/// Take (`on`) or drop a shared lock on one byte.
#[cfg(target_os = "linux")]
fn set_read_lock(file: &File, byte: u64, on: bool) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    let fl = flock(if on { libc::F_RDLCK } else { libc::F_UNLCK }, byte);
    // SAFETY: `fl` is a valid `flock` that outlives the call; the descriptor is valid while
    // `file` is borrowed.
    let r = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_OFD_SETLK, &fl) };
    match r {
        0 => Ok(()),
        _ => Err(lock_error(io::Error::last_os_error())),
    }
}

/// Whether another open file description holds a lock on `byte`.
#[cfg(target_os = "linux")]
fn held_by_other(file: &File, byte: u64) -> io::Result<bool> {
    use std::os::fd::AsRawFd;
    let mut fl = flock(libc::F_WRLCK, byte);
    // SAFETY: `fl` is a valid, writable `flock` for the kernel to fill in; the descriptor is
    // valid while `file` is borrowed.
    let r = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_OFD_GETLK, &mut fl) };
    if r != 0 {
        return Err(lock_error(io::Error::last_os_error()));
    }
    #[allow(clippy::cast_possible_truncation)] // F_UNLCK is 2
    let unlocked = libc::F_UNLCK as libc::c_short;
    Ok(fl.l_type != unlocked)
}

/// A lock that could not be taken because another holder has an incompatible one is EAGAIN.
#[cfg(target_os = "linux")]
fn lock_error(e: io::Error) -> io::Error {
    match e.raw_os_error() {
        Some(libc::EAGAIN) | Some(libc::EACCES) => busy("Failed to lock byte".to_string()),
        _ => e,
    }
}

#[cfg(not(target_os = "linux"))]
fn set_read_lock(_file: &File, _byte: u64, _on: bool) -> io::Result<()> {
    Ok(())
}

#[cfg(not(target_os = "linux"))]
fn held_by_other(_file: &File, _byte: u64) -> io::Result<bool> {
    Ok(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn open(path: &std::path::Path) -> File {
        std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .unwrap()
    }

    /// Two descriptions of one file in one process exclude each other like two processes.
    #[cfg(target_os = "linux")]
    #[test]
    fn writers_exclude_each_other_and_readers() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f");
        std::fs::write(&p, b"x").unwrap();
        let (a, b) = (open(&p), open(&p));
        lock(&a, LockRequest::image(true, false)).unwrap();
        let e = lock(&b, LockRequest::image(true, false)).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::ResourceBusy);
        assert_eq!(e.to_string(), "Failed to get \"write\" lock");
        let e = lock(&b, LockRequest::image(false, false)).unwrap_err();
        assert_eq!(e.to_string(), "Failed to get shared \"write\" lock");
        lock(&b, LockRequest::image(false, true)).unwrap();
        drop(a);
        // The writer is gone; the force-share reader does not stop a new writer.
        let c = open(&p);
        lock(&c, LockRequest::image(true, false)).unwrap();
    }

    /// Readers share with readers; a reader refuses a later writer.
    #[cfg(target_os = "linux")]
    #[test]
    fn readers_share_and_refuse_writers() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f");
        std::fs::write(&p, b"x").unwrap();
        let (a, b, c) = (open(&p), open(&p), open(&p));
        lock(&a, LockRequest::image(false, false)).unwrap();
        lock(&b, LockRequest::backing(false)).unwrap();
        let e = lock(&c, LockRequest::image(true, false)).unwrap_err();
        assert_eq!(e.to_string(), "Failed to get \"write\" lock");
    }
}
