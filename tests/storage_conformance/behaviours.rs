//! The behaviours every backend must show, one async function each, taking the backend's
//! maker. Each keeps a shadow of the bytes the contract requires and compares the storage's
//! reads and (after a flush) its independent view with it.

use std::io;
use std::sync::Arc;

use qcow2_engine::Storage;
use tokio::task::JoinSet;

use super::backends::{Made, Make};

/// Bytes that differ at every offset in a cycle that is not a power of two, so a read from
/// the wrong place shows.
fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i % 251) as u8 ^ seed.wrapping_mul(37))
        .collect()
}

async fn read(s: &dyn Storage, off: u64, len: usize) -> Vec<u8> {
    let mut buf = vec![0xee; len];
    s.read_at(&mut buf, off)
        .await
        .unwrap_or_else(|e| panic!("read {off}+{len}: {e}"));
    buf
}

/// The storage's length, its reads of everything and its durable bytes after a flush all
/// equal `shadow`.
async fn assert_content(m: &Made, shadow: &[u8], what: &str) {
    let s = m.storage.as_ref();
    assert_eq!(s.len().await.unwrap(), shadow.len() as u64, "{what}: len");
    let got = read(s, 0, shadow.len()).await;
    assert!(
        got == shadow,
        "{what}: read differs at {:?}",
        diff(&got, shadow)
    );
    s.flush().await.unwrap();
    let durable = (m.durable)();
    assert!(
        durable == shadow,
        "{what}: durable bytes ({} long) differ at {:?}",
        durable.len(),
        diff(&durable, shadow)
    );
}

/// `len` bytes of `shadow` from `from`, reading zeros past its end (as the storage does).
fn window(shadow: &[u8], from: usize, len: usize) -> Vec<u8> {
    let mut w = vec![0; len];
    if from < shadow.len() {
        let n = len.min(shadow.len() - from);
        w[..n].copy_from_slice(&shadow[from..from + n]);
    }
    w
}

fn diff(a: &[u8], b: &[u8]) -> Option<usize> {
    crate::common::first_difference(a, b)
}

/// Write `data` at `off` into the storage and the shadow (growing it with zeros).
async fn write(m: &Made, shadow: &mut Vec<u8>, data: &[u8], off: u64) {
    m.storage
        .write_at(data, off)
        .await
        .unwrap_or_else(|e| panic!("write {off}+{}: {e}", data.len()));
    let (start, end) = (off as usize, off as usize + data.len());
    if shadow.len() < end {
        shadow.resize(end, 0);
    }
    shadow[start..end].copy_from_slice(data);
}

/// Writes and reads at aligned and unaligned offsets and lengths, one byte to 3 blocks,
/// inside one 4 KiB block, across block boundaries, overlapping earlier writes.
pub async fn write_read_unaligned(maker: Make) {
    let Some(m) = maker(&pattern(64 << 10, 1)) else {
        return;
    };
    let mut shadow = pattern(64 << 10, 1);
    let cases: [(u64, usize); 10] = [
        (0, 4096),
        (4095, 1),
        (4097, 510),
        (511, 4097),
        (8190, 12_292),
        (3, 3),
        (20_000, 1),
        (65_535, 1),
        (12_288, 8192),
        (30_001, 9_999),
    ];
    for (i, &(off, len)) in cases.iter().enumerate() {
        write(&m, &mut shadow, &pattern(len, i as u8 + 2), off).await;
        // Odd reads around the write: before, across and after it.
        let from = off.saturating_sub(7);
        let got = read(m.storage.as_ref(), from, len + 14).await;
        let want = window(&shadow, from as usize, len + 14);
        assert!(
            got == want,
            "read after write {off}+{len} differs at {:?}",
            diff(&got, &want)
        );
    }
    assert_content(&m, &shadow, "after unaligned writes").await;
}

/// Reads straddling the end return the data, then zeros; reads past the end return zeros;
/// neither changes the length.
pub async fn read_past_end(maker: Make) {
    let len = 10_000usize;
    let Some(m) = maker(&pattern(len, 3)) else {
        return;
    };
    let s = m.storage.as_ref();
    let got = read(s, 9_000, 5_000).await;
    assert_eq!(
        got[..1_000],
        pattern(len, 3)[9_000..],
        "data before the end"
    );
    assert!(got[1_000..].iter().all(|&b| b == 0), "zeros past the end");
    assert!(read(s, 1 << 20, 4096).await.iter().all(|&b| b == 0));
    assert!(read(s, 10_000, 1).await == [0]);
    assert_eq!(s.len().await.unwrap(), len as u64, "reads do not grow");
}

/// A write past the end grows the storage to its end; the gap reads as zeros.
pub async fn write_past_end_grows(maker: Make) {
    let Some(m) = maker(&pattern(5_000, 4)) else {
        return;
    };
    let mut shadow = pattern(5_000, 4);
    write(&m, &mut shadow, &pattern(3_000, 5), 20_001).await;
    assert_content(&m, &shadow, "write past the end").await;
    write(&m, &mut shadow, &pattern(100, 6), 22_950).await; // straddles the end
    assert_content(&m, &shadow, "write across the end").await;
}

/// `set_len` truncates and extends; extended bytes read zeros (old data does not come back).
pub async fn set_len_shrinks_and_grows_with_zeros(maker: Make) {
    let Some(m) = maker(&pattern(40_000, 7)) else {
        return;
    };
    let s = m.storage.as_ref();
    let mut shadow = pattern(40_000, 7);
    for new_len in [12_345u64, 12_288, 0, 70_001, 4_097] {
        s.set_len(new_len).await.unwrap();
        shadow.resize(new_len as usize, 0);
        assert_content(&m, &shadow, &format!("set_len({new_len})")).await;
        write(&m, &mut shadow, &pattern(1_000, new_len as u8), new_len / 2).await;
    }
    assert_content(&m, &shadow, "after set_len and writes").await;
}

/// `write_zeroes` zeroes unaligned ranges inside, across the end (growing) and past it.
pub async fn write_zeroes_inside_and_past_end(maker: Make) {
    let Some(m) = maker(&pattern(100_000, 8)) else {
        return;
    };
    let s = m.storage.as_ref();
    let mut shadow = pattern(100_000, 8);
    for (off, len) in [
        (1u64, 4094u64),
        (4096, 8192),
        (13_000, 70_001),
        (99_000, 5_000),
        (110_000, 3),
    ] {
        s.write_zeroes(off, len)
            .await
            .unwrap_or_else(|e| panic!("write_zeroes {off}+{len}: {e}"));
        let end = (off + len) as usize;
        if shadow.len() < end {
            shadow.resize(end, 0);
        }
        shadow[off as usize..end].fill(0);
        assert_content(&m, &shadow, &format!("write_zeroes {off}+{len}")).await;
    }
}

/// After `discard`, each byte of the range reads as the old data or zero; bytes outside the
/// range are untouched and the length is unchanged (also for a discard past the end).
pub async fn discard_reads_old_or_zeros(maker: Make) {
    let old = pattern(200_000, 9);
    let Some(m) = maker(&old) else { return };
    let s = m.storage.as_ref();
    // Aligned, unaligned, and one running past the end.
    const RANGES: [(u64, u64); 4] = [
        (0, 4096),
        (5_000, 70_000),
        (131_072, 65_536),
        (190_000, 50_000),
    ];
    for (off, len) in RANGES {
        s.discard(off, len)
            .await
            .unwrap_or_else(|e| panic!("discard {off}+{len}: {e}"));
    }
    s.discard(300_000, 4096).await.unwrap();
    assert_eq!(
        s.len().await.unwrap(),
        old.len() as u64,
        "discard changed the length"
    );
    let got = read(s, 0, old.len()).await;
    let in_range = |i: u64| RANGES.iter().any(|&(o, l)| i >= o && i < o + l);
    for (i, (&g, &o)) in got.iter().zip(&old).enumerate() {
        let ok = g == o || (g == 0 && in_range(i as u64));
        assert!(ok, "byte {i} reads {g:#x}, old {o:#x}");
    }
}

/// `allocate` keeps the content of the bytes it covers and grows the storage with zeros.
pub async fn allocate_keeps_content(maker: Make) {
    let Some(m) = maker(&pattern(10_000, 10)) else {
        return;
    };
    let s = m.storage.as_ref();
    let mut shadow = pattern(10_000, 10);
    s.allocate(1_000, 5_000).await.unwrap();
    assert_content(&m, &shadow, "allocate inside").await;
    s.allocate(9_999, 30_002).await.unwrap();
    shadow.resize(40_001, 0);
    assert_content(&m, &shadow, "allocate across the end").await;
}

/// Zero-length reads, writes, zeroes, discards and allocations inside the storage and at its
/// end succeed and change nothing. (Past the end the backends differ: the memory-based ones
/// grow to the offset on an empty write, files do not; the contract leaves it open.)
pub async fn zero_length_requests(maker: Make) {
    let Some(m) = maker(&pattern(8_192, 11)) else {
        return;
    };
    let s = m.storage.as_ref();
    let mut failed = Vec::new();
    for off in [0u64, 100, 4_096, 8_192] {
        let results = [
            ("read_at", s.read_at(&mut [], off).await),
            ("write_at", s.write_at(&[], off).await),
            ("write_zeroes", s.write_zeroes(off, 0).await),
            ("discard", s.discard(off, 0).await),
            ("allocate", s.allocate(off, 0).await),
        ];
        for (what, r) in results {
            if let Err(e) = r {
                failed.push(format!("{what} at {off}: {e}"));
            }
        }
    }
    assert!(
        failed.is_empty(),
        "zero-length requests failed: {failed:#?}"
    );
    assert_content(&m, &pattern(8_192, 11), "after zero-length requests").await;
}

/// What completed before a flush is what an independent reader sees after it.
pub async fn flush_makes_writes_visible(maker: Make) {
    let Some(m) = maker(&[]) else { return };
    let mut shadow = Vec::new();
    for i in 0..8u64 {
        write(&m, &mut shadow, &pattern(3_000, i as u8), i * 2_500).await;
        assert_content(&m, &shadow, &format!("flush {i}")).await;
    }
}

/// 64 concurrent writes of odd sizes into disjoint ranges (several sharing 4 KiB blocks),
/// then 64 concurrent reads.
pub async fn concurrent_disjoint_writes(maker: Make) {
    let size = 64 * 3_000;
    let Some(m) = maker(&vec![0; size]) else {
        return;
    };
    let mut shadow = vec![0u8; size];
    let mut set = JoinSet::new();
    for i in 0..64u64 {
        let (s, off, data) = (
            Arc::clone(&m.storage),
            i * 3_000 + i % 7,
            pattern(2_990, i as u8),
        );
        shadow[off as usize..off as usize + data.len()].copy_from_slice(&data);
        set.spawn(async move { s.write_at(&data, off).await });
    }
    while let Some(r) = set.join_next().await {
        r.unwrap().unwrap();
    }
    let mut reads = JoinSet::new();
    for i in 0..64u64 {
        let s = Arc::clone(&m.storage);
        reads.spawn(async move {
            let mut buf = vec![0; 3_000];
            s.read_at(&mut buf, i * 3_000).await.map(|()| (i, buf))
        });
    }
    while let Some(r) = reads.join_next().await {
        let (i, buf) = r.unwrap().unwrap();
        let at = (i * 3_000) as usize;
        assert!(buf == shadow[at..at + 3_000], "concurrent read {i}");
    }
    assert_content(&m, &shadow, "after concurrent writes").await;
}

/// Concurrent writes and zeroes that each grow the storage: the final length is the largest
/// end and every write's data is there (no grower cuts off another's data).
pub async fn concurrent_growth(maker: Make) {
    let Some(m) = maker(&[]) else { return };
    // The last request (index 47, a write) ends furthest: 47 * 5000 + 3 + 4000.
    let mut shadow = vec![0u8; 47 * 5_000 + 3 + 4_000];
    let mut set: JoinSet<io::Result<()>> = JoinSet::new();
    for i in (0..48u64).rev() {
        let (s, off) = (Arc::clone(&m.storage), i * 5_000 + 3);
        if i % 3 == 0 {
            set.spawn(async move { s.write_zeroes(off, 4_997).await });
        } else {
            let data = pattern(4_000, i as u8);
            shadow[off as usize..off as usize + 4_000].copy_from_slice(&data);
            set.spawn(async move { s.write_at(&data, off).await });
        }
    }
    while let Some(r) = set.join_next().await {
        r.unwrap().unwrap();
    }
    assert_content(&m, &shadow, "after concurrent growth").await;
}

/// `block_status` always makes progress within the range, and what it calls a hole reads as
/// zeros.
pub async fn block_status_is_sane(maker: Make) {
    let Some(m) = maker(&[]) else { return };
    let s = m.storage.as_ref();
    s.write_at(&pattern(4096, 12), 1 << 20).await.unwrap();
    s.write_zeroes(0, 4 << 20).await.unwrap_or(());
    s.write_at(&pattern(8192, 13), 2 << 20).await.unwrap();
    let end = s.len().await.unwrap();
    let mut pos = 0;
    while pos < end {
        let (data, n) = s.block_status(pos, end - pos).await.unwrap();
        assert!(
            n > 0 && n <= end - pos,
            "block_status({pos}) returned length {n}"
        );
        if !data {
            let got = read(s, pos, n as usize).await;
            assert!(got.iter().all(|&b| b == 0), "hole at {pos}+{n} holds data");
        }
        pos += n;
    }
}

/// Ranges whose end overflows or lies absurdly far fail with an error (or, for reads, give
/// zeros) instead of panicking or allocating without bound; the content is unchanged.
pub async fn huge_offsets_fail_cleanly(maker: Make) {
    let Some(m) = maker(&pattern(4_096, 14)) else {
        return;
    };
    let s = m.storage.as_ref();
    let mut buf = [0xeeu8; 16];
    if s.read_at(&mut buf, u64::MAX - 8).await.is_ok() {
        assert_eq!(buf, [0; 16], "a read past any end must give zeros");
    }
    assert!(
        s.write_at(&[1; 16], u64::MAX - 8).await.is_err(),
        "write_at overflow"
    );
    assert!(
        s.write_zeroes(u64::MAX - 8, 16).await.is_err(),
        "write_zeroes overflow"
    );
    assert!(
        s.allocate(u64::MAX - 8, 16).await.is_err(),
        "allocate overflow"
    );
    s.discard(u64::MAX - 8, 16).await.ok();
    assert!(s.set_len(u64::MAX).await.is_err(), "set_len(u64::MAX)");
    assert_content(&m, &pattern(4_096, 14), "after refused requests").await;
}

/// A read-only handle reads the data but refuses every change with `PermissionDenied`,
/// leaving the bytes as they were.
pub async fn read_only_refuses_changes(maker: Make) {
    let Some(m) = maker(&pattern(9_000, 15)) else {
        return;
    };
    let Some(ro) = &m.read_only else { return };
    let ro = ro.as_ref();
    assert_eq!(read(ro, 100, 8_000).await, pattern(9_000, 15)[100..8_100]);
    let denied = |r: io::Result<()>, what: &str| match r {
        Err(e) => assert_eq!(e.kind(), io::ErrorKind::PermissionDenied, "{what}: {e}"),
        Ok(()) => panic!("{what} succeeded on a read-only storage"),
    };
    denied(ro.write_at(&[1; 10], 0).await, "write_at");
    denied(ro.write_at(&[1; 10], 20_000).await, "write_at past the end");
    denied(ro.write_zeroes(0, 4096).await, "write_zeroes");
    denied(ro.discard(0, 4096).await, "discard");
    denied(ro.set_len(1).await, "set_len");
    denied(ro.allocate(0, 100_000).await, "allocate");
    assert_eq!(ro.len().await.unwrap(), 9_000);
    assert_content(&m, &pattern(9_000, 15), "after refused read-only changes").await;
}
