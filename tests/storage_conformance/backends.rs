//! How to make each backend with some initial content, plus an independent view of its bytes.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use qcow2_engine::Storage;
use qcow2_engine::storage::{
    CrashStorage, FaultStorage, FileStorage, MemoryStorage, OpenFlags, ParkStorage, UringStorage,
};

/// A storage under test.
pub struct Made {
    /// The storage, read-write.
    pub storage: Arc<dyn Storage>,
    /// The bytes as an independent reader sees them once `flush` has returned.
    pub durable: Box<dyn Fn() -> Vec<u8> + Send + Sync>,
    /// A read-only handle on the same bytes, where the backend has a read-only mode.
    pub read_only: Option<Arc<dyn Storage>>,
    /// Keeps a scratch directory alive.
    _dir: Option<tempfile::TempDir>,
}

/// Makes a backend holding `initial`; `None` when this machine lacks it (io_uring, `O_DIRECT`):
/// then each behaviour returns at once, after a note on stderr.
pub type Make = fn(&[u8]) -> Option<Made>;

const BUFFERED: OpenFlags = OpenFlags {
    read_only: false,
    direct: false,
};
const DIRECT: OpenFlags = OpenFlags {
    read_only: false,
    direct: true,
};
const READ_ONLY: OpenFlags = OpenFlags {
    read_only: true,
    direct: false,
};

pub fn memory(initial: &[u8]) -> Option<Made> {
    let mem = Arc::new(MemoryStorage::from_vec(initial.to_vec()));
    let view = Arc::clone(&mem);
    Some(Made {
        storage: mem,
        durable: Box::new(move || view.snapshot()),
        read_only: None,
        _dir: None,
    })
}

pub fn crash(initial: &[u8]) -> Option<Made> {
    let c = Arc::new(CrashStorage::new(initial.to_vec()));
    let view = Arc::clone(&c);
    Some(Made {
        storage: c,
        durable: Box::new(move || view.durable_image()),
        read_only: None,
        _dir: None,
    })
}

pub fn park_over_memory(initial: &[u8]) -> Option<Made> {
    let mut m = memory(initial)?;
    m.storage = Arc::new(ParkStorage::new(m.storage));
    Some(m)
}

pub fn fault_over_file(initial: &[u8]) -> Option<Made> {
    let mut m = file_buffered(initial)?;
    m.storage = Arc::new(FaultStorage::new(m.storage));
    m.read_only = m
        .read_only
        .map(|s| Arc::new(FaultStorage::new(s)) as Arc<dyn Storage>);
    Some(m)
}

pub fn file_buffered(initial: &[u8]) -> Option<Made> {
    on_file(
        initial,
        |p| FileStorage::open(p, BUFFERED).map(arc),
        |p| FileStorage::open(p, READ_ONLY).map(arc),
    )
}

pub fn file_direct(initial: &[u8]) -> Option<Made> {
    on_file(
        initial,
        |p| FileStorage::open(p, DIRECT).map(arc),
        |p| {
            FileStorage::open(
                p,
                OpenFlags {
                    read_only: true,
                    ..DIRECT
                },
            )
            .map(arc)
        },
    )
}

pub fn uring_buffered(initial: &[u8]) -> Option<Made> {
    on_file(
        initial,
        |p| UringStorage::open(p, BUFFERED).map(arc),
        |p| UringStorage::open(p, READ_ONLY).map(arc),
    )
}

pub fn uring_direct(initial: &[u8]) -> Option<Made> {
    on_file(
        initial,
        |p| UringStorage::open(p, DIRECT).map(arc),
        |p| {
            UringStorage::open(
                p,
                OpenFlags {
                    read_only: true,
                    ..DIRECT
                },
            )
            .map(arc)
        },
    )
}

fn arc<S: Storage + 'static>(s: S) -> Arc<dyn Storage> {
    Arc::new(s)
}

/// A file holding `initial` (written with `std::fs`, not through the storage), opened
/// read-write by `open` and read-only by `open_ro`. `None` where the open is unsupported here
/// (`O_DIRECT` on tmpfs, no io_uring in a container).
fn on_file(
    initial: &[u8],
    open: impl Fn(&Path) -> io::Result<Arc<dyn Storage>>,
    open_ro: impl Fn(&Path) -> io::Result<Arc<dyn Storage>>,
) -> Option<Made> {
    let dir = tempfile::tempdir().unwrap();
    let path: PathBuf = dir.path().join("disk.raw");
    std::fs::write(&path, initial).unwrap();
    let storage = unsupported_is_none(open(&path))?;
    let read_only = unsupported_is_none(open_ro(&path))?;
    Some(Made {
        storage,
        durable: Box::new(move || std::fs::read(&path).unwrap()),
        read_only: Some(read_only),
        _dir: Some(dir),
    })
}

fn unsupported_is_none<T>(r: io::Result<T>) -> Option<T> {
    match r {
        Ok(s) => Some(s),
        Err(e)
            if e.kind() == io::ErrorKind::Unsupported
                || matches!(
                    e.raw_os_error(),
                    Some(libc::EPERM | libc::ENOSYS | libc::EINVAL)
                ) =>
        {
            eprintln!("skipping: backend unavailable here: {e}");
            None
        }
        Err(e) => panic!("opening the backend: {e}"),
    }
}
