use std::os::unix::fs::MetadataExt;
use std::sync::Arc;

use super::*;

/// Allocated bytes of the file behind `s` (`st_blocks` is in 512-byte units).
fn allocated(s: &FileStorage) -> u64 {
    std::fs::metadata(s.path()).unwrap().blocks() * 512
}

fn scratch() -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("disk.raw");
    (dir, path)
}

/// A new file opened with `O_DIRECT`, trying the system temp dir, then `./target` (the
/// temp dir may be a tmpfs without `O_DIRECT`). `None`: no candidate supports it; skip.
fn direct_scratch() -> Option<(tempfile::TempDir, FileStorage)> {
    let flags = OpenFlags {
        read_only: false,
        direct: true,
    };
    for base in [std::env::temp_dir(), PathBuf::from("target")] {
        let Ok(dir) = tempfile::tempdir_in(&base) else {
            continue;
        };
        match FileStorage::create_with(dir.path().join("direct.raw"), flags) {
            Ok(s) => return Some((dir, s)),
            Err(e) if e.kind() == io::ErrorKind::Unsupported => continue,
            Err(e) => panic!("creating an O_DIRECT file under {}: {e}", base.display()),
        }
    }
    eprintln!("skipping: no scratch directory supports O_DIRECT");
    None
}

/// Deterministic test bytes.
fn pattern(seed: u64, len: usize) -> Vec<u8> {
    (0..len as u64)
        .map(|i| (seed.wrapping_mul(31).wrapping_add(i * 7) % 251) as u8)
        .collect()
}

/// Compare big buffers, reporting the first difference instead of both buffers.
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

async fn read_all(s: &FileStorage) -> Vec<u8> {
    let mut buf = vec![0; s.len().await.unwrap() as usize];
    s.read_at(&mut buf, 0).await.unwrap();
    buf
}

#[tokio::test]
async fn write_read_roundtrip_and_reopen() {
    let (_dir, path) = scratch();
    let s = FileStorage::create(&path).unwrap();
    assert_eq!(s.path(), path);
    assert_eq!(Storage::path(&s), Some(path.as_path()));
    s.write_at(b"hello world", 3).await.unwrap();
    s.flush().await.unwrap();
    assert_eq!(s.len().await.unwrap(), 14);

    let r = FileStorage::open(
        &path,
        OpenFlags {
            read_only: true,
            direct: false,
        },
    )
    .unwrap();
    let mut buf = [0u8; 5];
    r.read_at(&mut buf, 9).await.unwrap();
    assert_eq!(&buf, b"world");
    let err = r.write_at(b"x", 0).await.unwrap_err();
    assert_eq!(err.kind(), io::ErrorKind::PermissionDenied);
    assert_eq!(
        r.set_len(0).await.unwrap_err().kind(),
        io::ErrorKind::PermissionDenied
    );
}

#[tokio::test]
async fn open_missing_file_fails() {
    let (_dir, path) = scratch();
    let err = FileStorage::open(&path, OpenFlags::default()).unwrap_err();
    assert_eq!(err.kind(), io::ErrorKind::NotFound);
    assert!(
        FileStorage::create_with(
            &path,
            OpenFlags {
                read_only: true,
                direct: false
            }
        )
        .is_err()
    );
}

#[tokio::test]
async fn reads_past_eof_are_zero() {
    let (_dir, path) = scratch();
    let s = FileStorage::create(&path).unwrap();
    s.write_at(&[7; 10], 0).await.unwrap();
    let mut buf = [0xffu8; 20];
    s.read_at(&mut buf, 5).await.unwrap();
    assert_eq!(buf[..5], [7; 5]);
    assert_eq!(buf[5..], [0; 15]);
    s.read_at(&mut buf, 1 << 40).await.unwrap();
    assert_eq!(buf, [0; 20]);
}

#[tokio::test]
async fn write_zeroes_inside_and_past_the_end() {
    let (_dir, path) = scratch();
    let s = FileStorage::create(&path).unwrap();
    s.write_at(&[1; 8192], 0).await.unwrap();
    s.write_zeroes(100, 5000).await.unwrap();
    let data = read_all(&s).await;
    assert!(data[..100].iter().all(|&b| b == 1));
    assert!(data[100..5100].iter().all(|&b| b == 0));
    assert!(data[5100..].iter().all(|&b| b == 1));

    // Growing by 64 MiB of zeros leaves (almost) nothing allocated.
    s.write_zeroes(8000, 64 << 20).await.unwrap();
    assert_eq!(s.len().await.unwrap(), 8000 + (64 << 20));
    assert!(allocated(&s) < 1 << 20, "{} bytes allocated", allocated(&s));
    let mut tail = vec![1u8; 4096];
    s.read_at(&mut tail, 8000 + (64 << 20) - 4096)
        .await
        .unwrap();
    assert!(tail.iter().all(|&b| b == 0));
}

#[tokio::test]
async fn discard_punches_a_hole() {
    let (_dir, path) = scratch();
    let s = FileStorage::create(&path).unwrap();
    s.write_at(&vec![3; 4 << 20], 0).await.unwrap();
    s.flush().await.unwrap();
    let before = allocated(&s);
    s.discard(1 << 20, 2 << 20).await.unwrap();
    s.discard(4 << 20, 1 << 20).await.unwrap(); // past the end: nothing happens
    assert_eq!(s.len().await.unwrap(), 4 << 20);
    let data = read_all(&s).await;
    // Discarded data reads as either the old bytes or zeros; ext4/xfs/btrfs punch.
    assert!(data[1 << 20..3 << 20].iter().all(|&b| b == 0 || b == 3));
    assert!(
        data[..1 << 20]
            .iter()
            .chain(&data[3 << 20..])
            .all(|&b| b == 3)
    );
    if data[1 << 20] == 0 {
        assert!(
            allocated(&s) + (2 << 20) <= before,
            "hole punched but blocks still allocated"
        );
    }
}

#[tokio::test]
async fn allocate_keeps_content_and_reserves() {
    let (_dir, path) = scratch();
    let s = FileStorage::create(&path).unwrap();
    s.write_at(&[4; 100], 0).await.unwrap();
    s.allocate(0, 1 << 20).await.unwrap();
    assert_eq!(s.len().await.unwrap(), 1 << 20);
    let data = read_all(&s).await;
    assert!(data[..100].iter().all(|&b| b == 4));
    assert!(data[100..].iter().all(|&b| b == 0));
    assert!(allocated(&s) >= 1 << 20 || cfg!(not(target_os = "linux")));
}

#[tokio::test]
async fn set_len_shrinks_and_grows() {
    let (_dir, path) = scratch();
    let s = FileStorage::create(&path).unwrap();
    s.write_at(&[5; 100], 0).await.unwrap();
    s.set_len(10).await.unwrap();
    s.set_len(50).await.unwrap();
    let data = read_all(&s).await;
    assert_eq!(data.len(), 50);
    assert_eq!(data[..10], [5; 10]);
    assert_eq!(data[10..], [0; 40]);
}

/// 16 tasks, each writing 32 chunks of odd sizes that interleave with the other tasks' chunks
/// (several share a 4 KiB block), then the whole file is checked.
async fn concurrent_writes(s: Arc<FileStorage>) {
    const TASKS: u64 = 16;
    const CHUNKS: u64 = 32;
    const SLOT: u64 = 700; // not a divisor of 4096: slots straddle blocks
    let mut handles = Vec::new();
    for t in 0..TASKS {
        let s = Arc::clone(&s);
        handles.push(tokio::spawn(async move {
            for c in 0..CHUNKS {
                let slot = c * TASKS + t;
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
    assert_eq!(data.len() as u64, TASKS * CHUNKS * SLOT);
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
    let (_dir, path) = scratch();
    concurrent_writes(Arc::new(FileStorage::create(&path).unwrap())).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_writes_direct() {
    if let Some((_dir, s)) = direct_scratch() {
        concurrent_writes(Arc::new(s)).await;
    }
}

/// Sequential unaligned writes, zeroes, discards and resizes against a `Vec` model.
#[tokio::test]
async fn direct_unaligned_io_matches_a_model() {
    let Some((_dir, s)) = direct_scratch() else {
        return;
    };
    let mut model = Vec::new();
    let ops: [(u64, usize); 8] = [
        (1000, 24),
        (0, 10),
        (4090, 12),
        (5000, 9000),
        (12288, 4096),
        (3, 1),
        (20000, 1),
        (8191, 2),
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
    // Unaligned reads, including past the end.
    let mut buf = vec![0xffu8; 5000];
    s.read_at(&mut buf, 18000).await.unwrap();
    let mut expect = model[18000..].to_vec();
    expect.resize(5000, 0);
    assert_same(&buf, &expect, "read past the end");

    s.write_zeroes(100, 10000).await.unwrap();
    model[100..10100].fill(0);
    s.write_zeroes(20000, 3000).await.unwrap();
    model.resize(23000, 0);
    model[20000..].fill(0);
    assert_same(&read_all(&s).await, &model, "after write_zeroes");

    s.discard(0, 23000).await.unwrap();
    let data = read_all(&s).await;
    assert!(data.iter().zip(&model).all(|(&d, &m)| d == m || d == 0));

    s.set_len(777).await.unwrap();
    s.allocate(700, 1000).await.unwrap();
    assert_eq!(s.len().await.unwrap(), 1700);
    let data = read_all(&s).await;
    assert!(data[777..].iter().all(|&b| b == 0));
    s.flush().await.unwrap();
}

/// Many tasks write disjoint 512-byte sectors of the same few 4 KiB blocks at once; without
/// the block locks, read-modify-write loses updates.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn direct_rmw_does_not_lose_updates() {
    let Some((_dir, s)) = direct_scratch() else {
        return;
    };
    let s = Arc::new(s);
    const SECTORS: u64 = 32; // 4 blocks
    for round in 0..4u8 {
        let mut handles = Vec::new();
        for sector in 0..SECTORS {
            let s = Arc::clone(&s);
            let byte = round.wrapping_mul(64).wrapping_add(sector as u8 + 1);
            handles.push(tokio::spawn(async move {
                s.write_at(&[byte; 512], sector * 512).await.unwrap();
            }));
        }
        for h in handles {
            h.await.unwrap();
        }
        let data = read_all(&s).await;
        for (sector, chunk) in data.chunks(512).enumerate() {
            let byte = round.wrapping_mul(64).wrapping_add(sector as u8 + 1);
            assert!(
                chunk.iter().all(|&b| b == byte),
                "round {round}: sector {sector} lost"
            );
        }
    }
}
