//! The `FileStorage` tests, run against the ring, plus what only a ring can get wrong:
//! short transfers, many requests in flight, and futures dropped while the kernel works.

use std::future::Future;
use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use super::*;
use crate::storage::{IoBackend, open_file};

const BUFFERED: OpenFlags = OpenFlags {
    read_only: false,
    direct: false,
};
const DIRECT: OpenFlags = OpenFlags {
    read_only: false,
    direct: true,
};

fn scratch() -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("disk.raw");
    (dir, path)
}

/// Whether `e` means "no io_uring here" (then the test is skipped, not failed).
fn no_uring(e: &io::Error) -> bool {
    e.kind() == io::ErrorKind::Unsupported
        || matches!(e.raw_os_error(), Some(libc::EPERM | libc::ENOSYS))
}

/// A new file under `base` with a ring; `inline: false` sends every read and write through
/// the ring (no page-cache fast path). `None`: io_uring or `O_DIRECT` unsupported; skip.
fn create_in(
    base: &Path,
    flags: OpenFlags,
    inline: bool,
) -> Option<(tempfile::TempDir, UringStorage)> {
    let dir = tempfile::tempdir_in(base).ok()?;
    let file = match FileStorage::create_with(dir.path().join("disk.raw"), flags) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::Unsupported => return None,
        Err(e) => panic!("creating a file under {}: {e}", base.display()),
    };
    match UringStorage::with_file(file) {
        Ok(mut s) => {
            s.inline = inline;
            Some((dir, s))
        }
        Err(e) if no_uring(&e) => {
            eprintln!("skipping: io_uring unavailable: {e}");
            None
        }
        Err(e) => panic!("setting up io_uring: {e}"),
    }
}

fn ring(inline: bool) -> Option<(tempfile::TempDir, UringStorage)> {
    create_in(&std::env::temp_dir(), BUFFERED, inline)
}

/// An `O_DIRECT` file, trying the temp dir, then `./target` (tmpfs refuses `O_DIRECT`).
fn direct_ring() -> Option<(tempfile::TempDir, UringStorage)> {
    let found = [std::env::temp_dir(), PathBuf::from("target")]
        .iter()
        .find_map(|base| create_in(base, DIRECT, true));
    if found.is_none() {
        eprintln!("skipping: no O_DIRECT scratch directory or no io_uring");
    }
    found
}

/// Drop the file's pages from the page cache, so that reads really go to the disk.
async fn evict(s: &UringStorage) {
    s.flush().await.unwrap();
    // SAFETY: `posix_fadvise` takes no pointers; the descriptor is open while `s` is borrowed.
    unsafe { libc::posix_fadvise(s.file.file().as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
}

fn pattern(seed: u64, len: usize) -> Vec<u8> {
    (0..len as u64)
        .map(|i| (seed.wrapping_mul(31).wrapping_add(i * 7) % 251) as u8)
        .collect()
}

#[track_caller]
fn assert_same(got: &[u8], want: &[u8], what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    if let Some(i) = got.iter().zip(want).position(|(g, w)| g != w) {
        panic!(
            "{what}: first difference at byte {i}: got {}, want {}",
            got[i], want[i]
        );
    }
}

async fn read_all(s: &UringStorage) -> Vec<u8> {
    let mut buf = vec![0; s.len().await.unwrap() as usize];
    s.read_at(&mut buf, 0).await.unwrap();
    buf
}

#[tokio::test]
async fn write_read_roundtrip_and_reopen() {
    let Some((_dir, s)) = ring(false) else { return };
    s.write_at(b"hello world", 3).await.unwrap();
    s.flush().await.unwrap();
    assert_eq!(s.len().await.unwrap(), 14);
    evict(&s).await;
    let mut buf = [0u8; 14];
    s.read_at(&mut buf, 0).await.unwrap();
    assert_eq!(&buf, b"\0\0\0hello world");

    let r = UringStorage::open(
        s.path(),
        OpenFlags {
            read_only: true,
            direct: false,
        },
    )
    .unwrap();
    assert_eq!(Storage::path(&r), Some(s.path()));
    let mut buf = [0u8; 5];
    r.read_at(&mut buf, 9).await.unwrap();
    assert_eq!(&buf, b"world");
    let err = r.write_at(b"x", 0).await.unwrap_err();
    assert_eq!(err.kind(), io::ErrorKind::PermissionDenied);
    let err = r.write_zeroes(0, 1).await.unwrap_err();
    assert_eq!(err.kind(), io::ErrorKind::PermissionDenied);
    r.flush().await.unwrap();
}

#[tokio::test]
async fn reads_past_eof_are_zero() {
    for inline in [false, true] {
        let Some((_dir, s)) = ring(inline) else {
            return;
        };
        s.write_at(&[7; 10], 0).await.unwrap();
        evict(&s).await;
        let mut buf = [0xffu8; 20];
        // Through the ring: a short read, then a zero-length one, then the zero fill.
        s.read_at(&mut buf, 5).await.unwrap();
        assert_eq!(buf[..5], [7; 5]);
        assert_eq!(buf[5..], [0; 15]);
        buf.fill(0xff);
        s.read_at(&mut buf, 1 << 40).await.unwrap();
        assert_eq!(buf, [0; 20]);
        s.read_at(&mut [], 3).await.unwrap();
        s.write_at(&[], 3).await.unwrap();
        let err = s.read_at(&mut buf, u64::MAX - 4).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidInput);
    }
}

#[tokio::test]
async fn large_transfers_round_trip() {
    let Some((_dir, s)) = ring(false) else { return };
    let data = pattern(9, 24 << 20);
    s.write_at(&data, 12345).await.unwrap();
    evict(&s).await;
    let mut back = vec![0; data.len()];
    s.read_at(&mut back, 12345).await.unwrap();
    assert_same(&back, &data, "24 MiB");
}

#[tokio::test]
async fn write_zeroes_discard_allocate_set_len() {
    let Some((_dir, s)) = ring(false) else { return };
    s.write_at(&[1; 8192], 0).await.unwrap();
    s.write_zeroes(100, 5000).await.unwrap();
    let data = read_all(&s).await;
    assert!(data[..100].iter().all(|&b| b == 1));
    assert!(data[100..5100].iter().all(|&b| b == 0));
    assert!(data[5100..].iter().all(|&b| b == 1));

    s.write_zeroes(8000, 64 << 20).await.unwrap();
    assert_eq!(s.len().await.unwrap(), 8000 + (64 << 20));
    assert!(s.allocated_size().await.unwrap().unwrap() < 1 << 20);

    s.write_at(&vec![3; 4 << 20], 0).await.unwrap();
    s.discard(1 << 20, 2 << 20).await.unwrap();
    let data = read_all(&s).await;
    assert!(data[1 << 20..3 << 20].iter().all(|&b| b == 0 || b == 3));
    assert!(data[..1 << 20].iter().all(|&b| b == 3));
    let (is_data, run) = s.block_status(3 << 20, 1 << 20).await.unwrap();
    assert!(is_data && run > 0);

    s.set_len(10).await.unwrap();
    s.allocate(0, 1 << 20).await.unwrap();
    assert_eq!(s.len().await.unwrap(), 1 << 20);
    let data = read_all(&s).await;
    assert_eq!(data[..10], [3; 10]);
    assert!(data[10..].iter().all(|&b| b == 0));
    assert!(std::fs::metadata(s.path()).unwrap().blocks() * 512 >= 1 << 20);
}

/// `tasks` tasks each write `chunks` slots of 700 bytes (several share a 4 KiB block) at
/// interleaved offsets, then the whole file is checked.
async fn concurrent_writes(s: Arc<UringStorage>, tasks: u64, chunks: u64) {
    const SLOT: u64 = 700;
    let mut handles = Vec::new();
    for t in 0..tasks {
        let s = Arc::clone(&s);
        handles.push(tokio::spawn(async move {
            for c in 0..chunks {
                let slot = c * tasks + t;
                s.write_at(&pattern(slot, SLOT as usize), slot * SLOT)
                    .await
                    .unwrap();
            }
        }));
    }
    for h in handles {
        h.await.unwrap();
    }
    let data = read_all(&s).await;
    assert_eq!(data.len() as u64, tasks * chunks * SLOT);
    for (slot, chunk) in data.chunks(SLOT as usize).enumerate() {
        assert_same(
            chunk,
            &pattern(slot as u64, SLOT as usize),
            &format!("slot {slot}"),
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_writes_buffered() {
    if let Some((_dir, s)) = ring(false) {
        concurrent_writes(Arc::new(s), 300, 20).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_writes_direct() {
    if let Some((_dir, s)) = direct_ring() {
        concurrent_writes(Arc::new(s), 64, 16).await;
    }
}

/// Many concurrent readers of different regions, more than the ring holds at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn many_concurrent_reads() {
    let Some((_dir, s)) = ring(false) else { return };
    let data = pattern(3, 8 << 20);
    s.write_at(&data, 0).await.unwrap();
    evict(&s).await;
    let (s, data) = (Arc::new(s), Arc::new(data));
    let mut handles = Vec::new();
    for t in 0..1000u64 {
        let (s, data) = (Arc::clone(&s), Arc::clone(&data));
        handles.push(tokio::spawn(async move {
            let off = (t * 7919 % 2000) * 4000 + t % 13;
            let mut buf = vec![0; 5000];
            s.read_at(&mut buf, off).await.unwrap();
            assert_same(&buf, &data[off as usize..off as usize + 5000], "read");
        }));
    }
    for h in handles {
        h.await.unwrap();
    }
}

/// Sequential unaligned writes, zeroes, discards and resizes against a `Vec` model.
#[tokio::test]
async fn direct_unaligned_io_matches_a_model() {
    let Some((_dir, s)) = direct_ring() else {
        return;
    };
    let mut model = Vec::new();
    let ops: [(u64, usize); 10] = [
        (1000, 24),
        (0, 10),
        (4090, 12),
        (5000, 9000),
        (12288, 4096),
        (3, 1),
        (20000, 1),
        (8191, 2),
        (24576, 8192),
        (16384, 4096),
    ];
    for (i, &(offset, len)) in ops.iter().enumerate() {
        let data = pattern(i as u64, len);
        s.write_at(&data, offset).await.unwrap();
        let end = offset as usize + len;
        if model.len() < end {
            model.resize(end, 0);
        }
        model[offset as usize..end].copy_from_slice(&data);
        assert_eq!(
            s.len().await.unwrap(),
            model.len() as u64,
            "after write {i}"
        );
        assert_eq!(
            std::fs::metadata(s.path()).unwrap().len(),
            model.len() as u64
        );
        assert_same(&read_all(&s).await, &model, &format!("after write {i}"));
    }
    for (offset, len) in [(18000u64, 20000usize), (4095, 2), (1, 4096), (32760, 16)] {
        let mut buf = vec![0xffu8; len];
        s.read_at(&mut buf, offset).await.unwrap();
        let mut expect = model.get(offset as usize..).unwrap_or_default().to_vec();
        expect.resize(len, 0);
        assert_same(&buf, &expect, &format!("read {len} at {offset}"));
    }
    s.write_zeroes(100, 10000).await.unwrap();
    model[100..10100].fill(0);
    assert_same(&read_all(&s).await, &model, "after write_zeroes");
    s.set_len(777).await.unwrap();
    s.allocate(700, 1000).await.unwrap();
    assert_eq!(s.len().await.unwrap(), 1700);
    s.flush().await.unwrap();
}

/// Whole-block writes (the ring) and partial-block writes (RMW on the thread pool) growing the
/// file at once: a growing RMW must not truncate a block the ring wrote past its end.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn direct_mixed_appends_keep_every_write() {
    let Some((_dir, s)) = direct_ring() else {
        return;
    };
    let s = Arc::new(s);
    const BLOCKS: u64 = 64;
    let mut handles = Vec::new();
    for b in 0..BLOCKS {
        let s = Arc::clone(&s);
        handles.push(tokio::spawn(async move {
            if b % 2 == 0 {
                s.write_at(&pattern(b, 4096), b * 4096).await.unwrap();
            } else {
                // Two partial writes that together fill the block.
                let p = pattern(b, 4096);
                s.write_at(&p[..1000], b * 4096).await.unwrap();
                s.write_at(&p[1000..], b * 4096 + 1000).await.unwrap();
            }
        }));
    }
    for h in handles {
        h.await.unwrap();
    }
    let data = read_all(&s).await;
    assert_eq!(data.len() as u64, BLOCKS * 4096);
    for (b, block) in data.chunks(4096).enumerate() {
        assert_same(block, &pattern(b as u64, 4096), &format!("block {b}"));
    }
}

/// Dropping futures while their requests are in the kernel: the ring keeps the buffers, the
/// requests complete, and the storage goes on working.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropped_futures_do_not_corrupt() {
    for (what, made) in [("buffered", ring(false)), ("direct", direct_ring())] {
        let Some((_dir, s)) = made else { continue };
        s.write_at(&pattern(1, 4 << 20), 0).await.unwrap();
        evict(&s).await;
        // Reads: dropped unpolled, dropped after one poll, and their targets freed at once.
        for i in 0..64u64 {
            let mut buf = vec![0u8; 64 << 10];
            let mut fut = s.read_at(&mut buf, i * (64 << 10));
            if i % 2 == 0 {
                let _ = futures_poll_once(&mut fut).await;
            }
            drop(fut);
            drop(buf);
        }
        // Writes of a new pattern, all dropped: they still land, eventually.
        let new = pattern(2, 4 << 20);
        for i in 0..64usize {
            let chunk = &new[i * (64 << 10)..(i + 1) * (64 << 10)];
            drop(s.write_at(chunk, (i * (64 << 10)) as u64));
        }
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let data = read_all(&s).await;
            if data == new {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "{what}: dropped writes never landed"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        // Allocations after the drops are not scribbled on.
        let fresh: Vec<Vec<u8>> = (0..64).map(|i| vec![i as u8; 64 << 10]).collect();
        tokio::time::sleep(Duration::from_millis(50)).await;
        for (i, v) in fresh.iter().enumerate() {
            assert!(
                v.iter().all(|&b| b == i as u8),
                "{what}: buffer {i} overwritten"
            );
        }
    }
}

/// Poll a future once (then leave it pending).
async fn futures_poll_once<F: Future + Unpin>(fut: &mut F) -> Option<F::Output> {
    std::future::poll_fn(|cx| {
        std::task::Poll::Ready(match std::pin::Pin::new(&mut *fut).poll(cx) {
            std::task::Poll::Ready(v) => Some(v),
            std::task::Poll::Pending => None,
        })
    })
    .await
}

/// Dropping the storage with requests in flight lets them finish; the thread then exits.
#[tokio::test]
async fn dropping_the_storage_mid_flight() {
    let Some((_dir, s)) = ring(false) else { return };
    let path = s.path().to_path_buf();
    let data = pattern(5, 1 << 20);
    let fut = s.write_at(&data, 0);
    drop(fut);
    drop(s);
    let r = FileStorage::open(&path, BUFFERED).unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::fs::metadata(&path).unwrap().len() < 1 << 20 {
        assert!(Instant::now() < deadline, "the write never landed");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let mut back = vec![0; 1 << 20];
    r.read_at(&mut back, 0).await.unwrap();
    assert_same(&back, &data, "after drop");
}

#[tokio::test]
async fn auto_falls_back_to_threads_when_setup_fails() {
    let (_dir, path) = scratch();
    std::fs::write(&path, b"abc").unwrap();
    ring::FAIL_SETUP.with(|f| f.set(true));
    let err = open_file(&path, BUFFERED, IoBackend::Uring).unwrap_err();
    assert!(no_uring(&err));
    let s = open_file(&path, BUFFERED, IoBackend::Auto).unwrap();
    ring::FAIL_SETUP.with(|f| f.set(false));
    assert!(format!("{s:?}").starts_with("FileStorage"), "{s:?}");
    let mut buf = [0u8; 3];
    s.read_at(&mut buf, 0).await.unwrap();
    assert_eq!(&buf, b"abc");
    let s = open_file(&path, BUFFERED, IoBackend::Auto).unwrap();
    let uring_works = ring(true).is_some();
    assert_eq!(format!("{s:?}").starts_with("UringStorage"), uring_works);
}
