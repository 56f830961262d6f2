//! [`CrashStorage`]: a power-cut simulator (feature `test-utils`).
//!
//! It keeps two things: the current, volatile view that reads see (every write applied), and a
//! log of every operation that changes the disk, with its data. From the log it can build the
//! disk as a power cut would leave it after any prefix of the log:
//!
//! ```text
//!  log:    w0  w1  FLUSH  w2  z3  w4  FLUSH  w5  w6 | cut at point 9
//!          └ durable ──────┘                  └ pending ┘ (w2, z3, w4 are durable too: they
//!                                                          precede the last flush before 9)
//! ```
//!
//! Everything before the last flush preceding the cut is on disk. Of the pending operations
//! after it, a [`CrashPolicy`] decides which reached the disk: none, all, a pseudo-random subset
//! (a device may complete unflushed writes in any order), or a subset of 512-byte sectors (a
//! write may also tear). Kept operations are applied in log order.
//!
//! Memory: the log holds each write's data (shared, `Arc<[u8]>`) and the storage holds the
//! initial and the current image, so the cost grows with the amount written. Crash tests keep
//! their workloads small; a byte limit on the log (256 MiB unless set with
//! [`CrashStorage::with_log_limit`]) turns a runaway workload into write errors instead of
//! exhausting memory, and [`CrashStorage::checkpoint`] drops the log when earlier crash points
//! no longer matter.

use std::io;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use super::memory::{grow, range, read_from};
use super::{IoFuture, Storage};
use crate::units::to_usize;

/// Sector size at which [`CrashPolicy::SubsetTorn`] tears writes.
pub const SECTOR: u64 = 512;

const DEFAULT_LOG_LIMIT: usize = 256 << 20;

/// Accounting cost of one log entry besides its data.
const OP_OVERHEAD: usize = 32;

/// Which of the operations issued after the last flush reach the disk at a power cut.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CrashPolicy {
    /// None of them.
    None,
    /// All of them.
    All,
    /// Each operation is kept or dropped as a whole, chosen pseudo-randomly from the seed.
    Subset(u64),
    /// Like `Subset`, but writes and zero writes are kept or dropped per 512-byte sector, so a
    /// write larger than a sector may reach the disk only in part.
    SubsetTorn(u64),
}

/// One logged operation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LoggedOp {
    /// `write_at(data, offset)`.
    Write {
        /// Where.
        offset: u64,
        /// What.
        data: Arc<[u8]>,
    },
    /// `write_zeroes(offset, len)`.
    WriteZeroes {
        /// Where.
        offset: u64,
        /// How many bytes.
        len: u64,
    },
    /// `discard(offset, len)`; modelled as zeroing the part inside the disk.
    Discard {
        /// Where.
        offset: u64,
        /// How many bytes.
        len: u64,
    },
    /// `set_len(len)`.
    SetLen(u64),
    /// `flush()`.
    Flush,
}

/// Records every change to an in-memory disk so that tests can cut the power at any point.
/// See the module docs.
#[derive(Debug)]
pub struct CrashStorage {
    state: Mutex<State>,
    log_limit: usize,
}

#[derive(Debug)]
struct State {
    /// The disk at the start of the log: durable.
    base: Arc<[u8]>,
    /// Every logged operation applied: what reads see.
    current: Vec<u8>,
    log: Vec<LoggedOp>,
    log_bytes: usize,
}

impl CrashStorage {
    /// Start from `initial`, which counts as durable.
    pub fn new(initial: Vec<u8>) -> CrashStorage {
        CrashStorage::with_log_limit(initial, DEFAULT_LOG_LIMIT)
    }

    /// Like [`CrashStorage::new`]; once the log holds about `limit` bytes, modifying requests
    /// fail with an error.
    pub fn with_log_limit(initial: Vec<u8>, limit: usize) -> CrashStorage {
        let state = State {
            base: initial.clone().into(),
            current: initial,
            log: Vec::new(),
            log_bytes: 0,
        };
        CrashStorage {
            state: Mutex::new(state),
            log_limit: limit,
        }
    }

    /// The number of crash points. Point `p` (for `p` in `0..crash_points()`) is a power cut
    /// after the first `p` logged operations were issued: point 0 is the initial image, the last
    /// point is after the whole log.
    pub fn crash_points(&self) -> usize {
        self.lock().log.len() + 1
    }

    /// The disk after a power cut at `point`, with `policy` deciding which unflushed operations
    /// made it. Deterministic for a given log, point and policy.
    ///
    /// # Panics
    /// If `point >= self.crash_points()`.
    pub fn image_at(&self, point: usize, policy: CrashPolicy) -> Vec<u8> {
        let state = self.lock();
        assert!(
            point <= state.log.len(),
            "crash point {point} past the log ({} ops)",
            state.log.len()
        );
        let ops = &state.log[..point];
        let (durable, pending) = match ops.iter().rposition(|op| *op == LoggedOp::Flush) {
            Some(f) => (&ops[..f], &ops[f + 1..]),
            None => (&ops[..0], ops),
        };
        let mut image = state.base.to_vec();
        durable.iter().for_each(|op| apply(&mut image, op));
        apply_pending(&mut image, pending, policy, point);
        image
    }

    /// The disk as reads see it now (every operation applied).
    pub fn current_image(&self) -> Vec<u8> {
        self.lock().current.clone()
    }

    /// The disk after a power cut now, keeping only flushed operations.
    pub fn durable_image(&self) -> Vec<u8> {
        let points = self.crash_points();
        self.image_at(points - 1, CrashPolicy::None)
    }

    /// A copy of the log (data is shared, not copied), to describe a failing crash point.
    pub fn log(&self) -> Vec<LoggedOp> {
        self.lock().log.clone()
    }

    /// Treat everything issued so far as durable and empty the log: later crash points start
    /// from the current image.
    pub fn checkpoint(&self) {
        let mut state = self.lock();
        state.base = state.current.clone().into();
        state.log.clear();
        state.log_bytes = 0;
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Log `op` and apply it to the volatile view.
    fn record(&self, op: LoggedOp) -> io::Result<()> {
        check_range(&op)?;
        let mut state = self.lock();
        let cost = OP_OVERHEAD
            + if let LoggedOp::Write { data, .. } = &op {
                data.len()
            } else {
                0
            };
        if state.log_bytes + cost > self.log_limit {
            return Err(io::Error::other(format!(
                "crash log limit of {} bytes reached; keep crash workloads small",
                self.log_limit
            )));
        }
        state.log_bytes += cost;
        apply(&mut state.current, &op);
        state.log.push(op);
        Ok(())
    }
}

/// Refuse operations whose range does not fit in memory, before anything is logged.
fn check_range(op: &LoggedOp) -> io::Result<()> {
    match op {
        LoggedOp::Write { offset, data } => range(*offset, data.len() as u64).map(drop),
        LoggedOp::WriteZeroes { offset, len } | LoggedOp::Discard { offset, len } => {
            range(*offset, *len).map(drop)
        }
        LoggedOp::SetLen(len) => range(0, *len).map(drop),
        LoggedOp::Flush => Ok(()),
    }
}

/// Apply `op` in full. Ranges were checked by [`check_range`] when the op was logged.
fn apply(image: &mut Vec<u8>, op: &LoggedOp) {
    match op {
        LoggedOp::Write { offset, data } => put(image, *offset, Some(&data[..]), data.len() as u64),
        LoggedOp::WriteZeroes { offset, len } => put(image, *offset, None, *len),
        LoggedOp::Discard { offset, len } => {
            let end = (*offset + *len).min(image.len() as u64);
            if *offset < end {
                image[to_usize(*offset)..to_usize(end)].fill(0);
            }
        }
        LoggedOp::SetLen(len) => image.resize(to_usize(*len), 0),
        LoggedOp::Flush => {}
    }
}

/// Write `data` (or zeros) over `[offset, offset + len)`, growing the image.
fn put(image: &mut Vec<u8>, offset: u64, data: Option<&[u8]>, len: u64) {
    let (start, end) = (to_usize(offset), to_usize(offset + len));
    grow(image, end);
    match data {
        Some(d) => image[start..end].copy_from_slice(d),
        None => image[start..end].fill(0),
    }
}

fn apply_pending(image: &mut Vec<u8>, pending: &[LoggedOp], policy: CrashPolicy, point: usize) {
    let (seed, torn) = match policy {
        CrashPolicy::None => return,
        CrashPolicy::All => return pending.iter().for_each(|op| apply(image, op)),
        CrashPolicy::Subset(seed) => (seed, false),
        CrashPolicy::SubsetTorn(seed) => (seed, true),
    };
    // Mix in the point so that one seed gives different subsets at different points.
    let mut rng = SplitMix64(seed ^ (point as u64).wrapping_mul(0xA076_1D64_78BD_642F));
    for op in pending {
        match op {
            LoggedOp::Write { offset, data } if torn => {
                for_kept_sectors(&mut rng, *offset, data.len() as u64, |s, e| {
                    let d = &data[to_usize(s - offset)..to_usize(e - offset)];
                    put(image, s, Some(d), e - s);
                })
            }
            LoggedOp::WriteZeroes { offset, len } if torn => {
                for_kept_sectors(&mut rng, *offset, *len, |s, e| put(image, s, None, e - s))
            }
            op if rng.coin() => apply(image, op),
            _ => {}
        }
    }
}

/// Call `f(start, end)` for each 512-byte-aligned piece of `[offset, offset + len)` that the
/// coin keeps.
fn for_kept_sectors(rng: &mut SplitMix64, offset: u64, len: u64, mut f: impl FnMut(u64, u64)) {
    let end = offset + len;
    let mut at = offset;
    while at < end {
        let next = ((at / SECTOR + 1) * SECTOR).min(end);
        if rng.coin() {
            f(at, next);
        }
        at = next;
    }
}

/// A small, fast, seedable generator (SplitMix64); the crate has no RNG dependency.
struct SplitMix64(u64);

impl SplitMix64 {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn coin(&mut self) -> bool {
        self.next() >> 63 == 1
    }
}

fn ready<T: Send + 'static>(r: io::Result<T>) -> IoFuture<'static, T> {
    Box::pin(std::future::ready(r))
}

impl Storage for CrashStorage {
    fn read_at<'a>(&'a self, buf: &'a mut [u8], offset: u64) -> IoFuture<'a, ()> {
        read_from(&self.lock().current, buf, offset);
        ready(Ok(()))
    }

    fn write_at<'a>(&'a self, buf: &'a [u8], offset: u64) -> IoFuture<'a, ()> {
        ready(self.record(LoggedOp::Write {
            offset,
            data: buf.into(),
        }))
    }

    fn write_zeroes(&self, offset: u64, len: u64) -> IoFuture<'_, ()> {
        ready(self.record(LoggedOp::WriteZeroes { offset, len }))
    }

    fn discard(&self, offset: u64, len: u64) -> IoFuture<'_, ()> {
        ready(self.record(LoggedOp::Discard { offset, len }))
    }

    fn flush(&self) -> IoFuture<'_, ()> {
        ready(self.record(LoggedOp::Flush))
    }

    fn len(&self) -> IoFuture<'_, u64> {
        ready(Ok(self.lock().current.len() as u64))
    }

    fn set_len(&self, len: u64) -> IoFuture<'_, ()> {
        ready(self.record(LoggedOp::SetLen(len)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A storage with `a` written and flushed, then `b` written (unflushed), 512 bytes each.
    async fn flushed_then_pending() -> CrashStorage {
        let s = CrashStorage::new(vec![0; 2048]);
        s.write_at(&[0xaa; 512], 0).await.unwrap();
        s.flush().await.unwrap();
        s.write_at(&[0xbb; 512], 512).await.unwrap();
        s
    }

    const POLICIES: [CrashPolicy; 6] = [
        CrashPolicy::None,
        CrashPolicy::All,
        CrashPolicy::Subset(1),
        CrashPolicy::Subset(2),
        CrashPolicy::SubsetTorn(1),
        CrashPolicy::SubsetTorn(2),
    ];

    #[tokio::test]
    async fn reads_see_every_write() {
        let s = flushed_then_pending().await;
        let mut buf = [0u8; 4];
        s.read_at(&mut buf, 510).await.unwrap();
        assert_eq!(buf, [0xaa, 0xaa, 0xbb, 0xbb]);
        assert_eq!(s.current_image(), s.image_at(3, CrashPolicy::All));
    }

    #[tokio::test]
    async fn point_zero_is_the_initial_image() {
        let s = flushed_then_pending().await;
        assert_eq!(s.crash_points(), 4);
        for policy in POLICIES {
            assert_eq!(s.image_at(0, policy), vec![0; 2048]);
        }
    }

    #[tokio::test]
    async fn flushed_data_always_survives() {
        let s = flushed_then_pending().await;
        for _ in 0..8 {
            s.write_at(&[0xcc; 1024], 256).await.unwrap(); // overwrites part of `a`, unflushed
        }
        for point in 2..s.crash_points() {
            for seed in 0..32 {
                for policy in [CrashPolicy::Subset(seed), CrashPolicy::SubsetTorn(seed)] {
                    let img = s.image_at(point, policy);
                    assert!(
                        img[..256].iter().all(|&b| b == 0xaa),
                        "point {point} {policy:?}"
                    );
                }
            }
            assert_eq!(s.image_at(point, CrashPolicy::None)[..512], [0xaa; 512]);
        }
    }

    #[tokio::test]
    async fn none_drops_everything_unflushed() {
        let s = flushed_then_pending().await;
        s.write_zeroes(0, 100).await.unwrap();
        s.set_len(10).await.unwrap();
        let mut expect = vec![0; 2048];
        expect[..512].fill(0xaa);
        assert_eq!(s.image_at(s.crash_points() - 1, CrashPolicy::None), expect);
        assert_eq!(s.durable_image(), expect);
        assert_eq!(s.current_image().len(), 10);
    }

    #[tokio::test]
    async fn subsets_differ_by_seed_and_repeat_per_seed() {
        let s = CrashStorage::new(Vec::new());
        for i in 0..16u8 {
            s.write_at(&[i + 1; 512], u64::from(i) * 512).await.unwrap();
        }
        let last = s.crash_points() - 1;
        let images: std::collections::HashSet<_> = (0..8)
            .map(|seed| s.image_at(last, CrashPolicy::Subset(seed)))
            .collect();
        assert!(images.len() > 4, "only {} distinct subsets", images.len());
        assert_eq!(
            s.image_at(last, CrashPolicy::Subset(7)),
            s.image_at(last, CrashPolicy::Subset(7))
        );
        let all = s.image_at(last, CrashPolicy::All);
        for img in images {
            // Each kept write is whole: every sector is either its write's data or never written.
            for (i, sector) in img.chunks(512).enumerate() {
                assert!(sector == &all[i * 512..(i + 1) * 512] || sector.iter().all(|&b| b == 0));
            }
        }
    }

    #[tokio::test]
    async fn torn_writes_keep_some_sectors() {
        let s = CrashStorage::new(vec![0; 4096]);
        s.write_at(&[7; 3000], 100).await.unwrap(); // 7 sector pieces, unaligned at both ends
        let torn = (0..16).map(|seed| s.image_at(1, CrashPolicy::SubsetTorn(seed)));
        let partial = torn
            .filter(|img| {
                let kept = img.iter().filter(|&&b| b == 7).count();
                kept > 0 && kept < 3000
            })
            .count();
        assert!(partial > 0, "no seed tore the write");
        for seed in 0..16 {
            let img = s.image_at(1, CrashPolicy::SubsetTorn(seed));
            for sector in img.chunks(SECTOR as usize) {
                let first = sector.iter().position(|&b| b == 7);
                let last = sector.iter().rposition(|&b| b == 7);
                if let (Some(f), Some(l)) = (first, last) {
                    assert!(
                        sector[f..=l].iter().all(|&b| b == 7),
                        "torn inside a sector"
                    );
                }
            }
        }
    }

    #[tokio::test]
    async fn set_len_and_discard_replay() {
        let s = CrashStorage::new(vec![5; 4096]);
        s.discard(1024, 1024).await.unwrap();
        s.discard(4000, 1000).await.unwrap(); // past the end: no growth
        s.set_len(3000).await.unwrap();
        s.flush().await.unwrap();
        s.set_len(8192).await.unwrap();
        s.write_at(&[9; 8], 8000).await.unwrap();

        let mut flushed = vec![5; 3000];
        flushed[1024..2048].fill(0);
        assert_eq!(s.image_at(4, CrashPolicy::None), flushed);
        assert_eq!(s.image_at(6, CrashPolicy::None), flushed);
        let all = s.image_at(6, CrashPolicy::All);
        assert_eq!(all.len(), 8192);
        assert_eq!(&all[..3000], &flushed[..]);
        assert!(all[3000..8000].iter().all(|&b| b == 0));
        assert_eq!(all[8000..8008], [9; 8]);
        assert_eq!(all, s.current_image());
        // Before the flush, a subset may or may not have shrunk the disk.
        let lens: std::collections::HashSet<_> = (0..16)
            .map(|seed| s.image_at(3, CrashPolicy::Subset(seed)).len())
            .collect();
        assert_eq!(lens, [3000, 4096].into());
    }

    #[tokio::test]
    async fn checkpoint_makes_everything_durable() {
        let s = flushed_then_pending().await;
        s.checkpoint();
        assert_eq!(s.crash_points(), 1);
        assert_eq!(s.image_at(0, CrashPolicy::None)[512..1024], [0xbb; 512]);
    }

    #[tokio::test]
    async fn log_limit_turns_into_write_errors() {
        let s = CrashStorage::with_log_limit(Vec::new(), 4096);
        s.write_at(&[1; 2048], 0).await.unwrap();
        assert!(s.write_at(&[1; 4096], 0).await.is_err());
        assert_eq!(s.crash_points(), 2, "a refused write is not logged");
        assert!(s.write_zeroes(u64::MAX - 1, 8).await.is_err());
    }

    #[tokio::test]
    #[should_panic(expected = "past the log")]
    async fn image_at_past_the_log_panics() {
        CrashStorage::new(Vec::new()).image_at(1, CrashPolicy::All);
    }
}
