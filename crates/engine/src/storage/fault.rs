//! [`FaultStorage`]: a wrapper that makes chosen requests fail (feature `test-utils`).
//!
//! io_uring requests are invisible to strace and `LD_PRELOAD`, so fault injection lives in the
//! storage layer itself. A [`FaultRule`] picks requests by kind and/or byte range, counts the
//! matching ones from the moment it is set, and fails the Nth (once) or every one from the Nth
//! on (sticky), with EIO, ENOSPC or any errno. A rule can also tear a write: pass the first few
//! bytes to the inner storage, then fail.
//!
//! ```
//! # async fn demo() {
//! use std::sync::Arc;
//! use qcow2_engine::Storage;
//! use qcow2_engine::storage::{FaultError, FaultRule, FaultStorage, MemoryStorage, OpKind};
//!
//! let s = FaultStorage::new(Arc::new(MemoryStorage::new()));
//! s.set_rule(FaultRule::on(OpKind::Flush).nth(2).sticky().with_error(FaultError::Enospc));
//! s.flush().await.unwrap();
//! assert!(s.flush().await.is_err());
//! assert_eq!(s.op_counts().flushes, 2);
//! # }
//! ```

use std::io;
use std::ops::Range;
use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use super::{IoFuture, Storage};

/// The kinds of request a rule can match (and [`OpCounts`] counts).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum OpKind {
    /// `read_at`.
    Read,
    /// `write_at`.
    Write,
    /// `write_zeroes`.
    WriteZeroes,
    /// `discard`.
    Discard,
    /// `flush`.
    Flush,
    /// `set_len`.
    SetLen,
    /// `allocate`.
    Allocate,
}

/// The error an injected fault returns.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FaultError {
    /// `EIO`: the device failed.
    Eio,
    /// `ENOSPC`: the device is full.
    Enospc,
    /// Any other errno.
    Errno(i32),
}

impl FaultError {
    /// The `io::Error` (with its raw OS error code) a faulted request returns.
    pub fn to_io_error(self) -> io::Error {
        io::Error::from_raw_os_error(match self {
            FaultError::Eio => libc::EIO,
            FaultError::Enospc => libc::ENOSPC,
            FaultError::Errno(e) => e,
        })
    }
}

/// Which requests fail, and how. Build with [`FaultRule::on`] or [`FaultRule::any`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FaultRule {
    /// Only requests of this kind match; `None` matches every kind.
    pub kind: Option<OpKind>,
    /// Only requests touching this byte range match; requests without a range (`flush`,
    /// `set_len`) never match a rule that has one.
    pub range: Option<Range<u64>>,
    /// The first matching request (1-based, counted from when the rule was set) that fails.
    pub nth: u64,
    /// Fail every matching request from the `nth` on, not just the `nth`.
    pub sticky: bool,
    /// What a failing request returns.
    pub error: FaultError,
    /// For writes: pass this many leading bytes to the inner storage before failing.
    pub short_write: Option<usize>,
}

impl FaultRule {
    /// Fail the first request of `kind` once, with EIO.
    pub fn on(kind: OpKind) -> FaultRule {
        FaultRule {
            kind: Some(kind),
            ..FaultRule::any()
        }
    }

    /// Fail the first request of any kind once, with EIO.
    pub fn any() -> FaultRule {
        FaultRule {
            kind: None,
            range: None,
            nth: 1,
            sticky: false,
            error: FaultError::Eio,
            short_write: None,
        }
    }

    /// Fail the `n`th matching request (1-based) instead of the first.
    pub fn nth(self, n: u64) -> FaultRule {
        FaultRule { nth: n, ..self }
    }

    /// Keep failing every matching request from the `nth` on.
    pub fn sticky(self) -> FaultRule {
        FaultRule {
            sticky: true,
            ..self
        }
    }

    /// Only match requests that touch `range`.
    pub fn in_range(self, range: Range<u64>) -> FaultRule {
        FaultRule {
            range: Some(range),
            ..self
        }
    }

    /// Fail with `error` instead of EIO.
    pub fn with_error(self, error: FaultError) -> FaultRule {
        FaultRule { error, ..self }
    }

    /// Tear failing writes: the first `bytes` reach the inner storage, then the error returns.
    pub fn short_write(self, bytes: usize) -> FaultRule {
        FaultRule {
            short_write: Some(bytes),
            ..self
        }
    }

    fn matches(&self, kind: OpKind, span: Option<(u64, u64)>) -> bool {
        if self.kind.is_some_and(|k| k != kind) {
            return false;
        }
        match (&self.range, span) {
            (None, _) => true,
            (Some(_), None) => false,
            (Some(r), Some((offset, len))) => {
                offset < r.end && r.start < offset.saturating_add(len.max(1))
            }
        }
    }
}

/// How many requests of each kind reached the wrapper (failed ones included), and how many
/// faults it injected.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct OpCounts {
    /// `read_at` calls.
    pub reads: u64,
    /// `write_at` calls.
    pub writes: u64,
    /// `write_zeroes` calls.
    pub write_zeroes: u64,
    /// `discard` calls.
    pub discards: u64,
    /// `flush` calls.
    pub flushes: u64,
    /// `set_len` calls.
    pub set_lens: u64,
    /// `allocate` calls.
    pub allocates: u64,
    /// Requests that failed by a rule.
    pub faults: u64,
}

impl OpCounts {
    /// The count for `kind`.
    pub fn get(&self, kind: OpKind) -> u64 {
        *self.slot(kind)
    }

    fn slot(&self, kind: OpKind) -> &u64 {
        match kind {
            OpKind::Read => &self.reads,
            OpKind::Write => &self.writes,
            OpKind::WriteZeroes => &self.write_zeroes,
            OpKind::Discard => &self.discards,
            OpKind::Flush => &self.flushes,
            OpKind::SetLen => &self.set_lens,
            OpKind::Allocate => &self.allocates,
        }
    }

    fn bump(&mut self, kind: OpKind) {
        let slot = match kind {
            OpKind::Read => &mut self.reads,
            OpKind::Write => &mut self.writes,
            OpKind::WriteZeroes => &mut self.write_zeroes,
            OpKind::Discard => &mut self.discards,
            OpKind::Flush => &mut self.flushes,
            OpKind::SetLen => &mut self.set_lens,
            OpKind::Allocate => &mut self.allocates,
        };
        *slot += 1;
    }
}

/// Wraps any storage and fails requests according to the rules set on it.
#[derive(Debug)]
pub struct FaultStorage {
    inner: Arc<dyn Storage>,
    state: Mutex<State>,
}

#[derive(Debug, Default)]
struct State {
    rules: Vec<Armed>,
    counts: OpCounts,
}

/// A rule and how many requests it has matched so far.
#[derive(Debug)]
struct Armed {
    rule: FaultRule,
    seen: u64,
    spent: bool,
}

/// What to do to a request a rule caught.
struct Fault {
    error: FaultError,
    short_write: Option<usize>,
}

impl FaultStorage {
    /// Wrap `inner`, with no rules.
    pub fn new(inner: Arc<dyn Storage>) -> FaultStorage {
        FaultStorage {
            inner,
            state: Mutex::default(),
        }
    }

    /// The wrapped storage.
    pub fn inner(&self) -> &Arc<dyn Storage> {
        &self.inner
    }

    /// Replace all rules with `rule`.
    pub fn set_rule(&self, rule: FaultRule) {
        self.lock().rules = vec![Armed {
            rule,
            seen: 0,
            spent: false,
        }];
    }

    /// Add `rule` beside the existing ones (the first rule that fires decides the error).
    pub fn add_rule(&self, rule: FaultRule) {
        self.lock().rules.push(Armed {
            rule,
            seen: 0,
            spent: false,
        });
    }

    /// Remove all rules: requests pass through again.
    pub fn clear(&self) {
        self.lock().rules.clear();
    }

    /// The request counters since creation or [`FaultStorage::reset_counts`].
    pub fn op_counts(&self) -> OpCounts {
        self.lock().counts
    }

    /// Zero the request counters.
    pub fn reset_counts(&self) {
        self.lock().counts = OpCounts::default();
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Count the request and decide whether it fails. Every matching rule counts it.
    fn check(&self, kind: OpKind, span: Option<(u64, u64)>) -> Option<Fault> {
        let mut state = self.lock();
        state.counts.bump(kind);
        let mut fault = None;
        for armed in state.rules.iter_mut().filter(|a| !a.spent) {
            if !armed.rule.matches(kind, span) {
                continue;
            }
            armed.seen += 1;
            let fires =
                armed.seen == armed.rule.nth || (armed.rule.sticky && armed.seen > armed.rule.nth);
            if fires {
                armed.spent = !armed.rule.sticky;
                let r = &armed.rule;
                fault.get_or_insert(Fault {
                    error: r.error,
                    short_write: r.short_write,
                });
            }
        }
        if fault.is_some() {
            state.counts.faults += 1;
        }
        fault
    }

    /// Start `op` unless a rule fails the request. `op` is a closure because some backends
    /// start the IO when the future is created, not when it is first polled.
    fn guard<'a>(
        &'a self,
        kind: OpKind,
        span: Option<(u64, u64)>,
        op: impl FnOnce() -> IoFuture<'a, ()>,
    ) -> IoFuture<'a, ()> {
        match self.check(kind, span) {
            Some(f) => Box::pin(std::future::ready(Err(f.error.to_io_error()))),
            None => op(),
        }
    }
}

impl Storage for FaultStorage {
    fn read_at<'a>(&'a self, buf: &'a mut [u8], offset: u64) -> IoFuture<'a, ()> {
        let span = Some((offset, buf.len() as u64));
        match self.check(OpKind::Read, span) {
            Some(f) => Box::pin(std::future::ready(Err(f.error.to_io_error()))),
            None => self.inner.read_at(buf, offset),
        }
    }

    fn write_at<'a>(&'a self, buf: &'a [u8], offset: u64) -> IoFuture<'a, ()> {
        match self.check(OpKind::Write, Some((offset, buf.len() as u64))) {
            None => self.inner.write_at(buf, offset),
            Some(Fault {
                error,
                short_write: Some(keep),
            }) => Box::pin(async move {
                let keep = keep.min(buf.len());
                self.inner.write_at(&buf[..keep], offset).await?;
                Err(error.to_io_error())
            }),
            Some(f) => Box::pin(std::future::ready(Err(f.error.to_io_error()))),
        }
    }

    fn write_zeroes(&self, offset: u64, len: u64) -> IoFuture<'_, ()> {
        self.guard(OpKind::WriteZeroes, Some((offset, len)), || {
            self.inner.write_zeroes(offset, len)
        })
    }

    fn discard(&self, offset: u64, len: u64) -> IoFuture<'_, ()> {
        self.guard(OpKind::Discard, Some((offset, len)), || {
            self.inner.discard(offset, len)
        })
    }

    fn flush(&self) -> IoFuture<'_, ()> {
        self.guard(OpKind::Flush, None, || self.inner.flush())
    }

    fn len(&self) -> IoFuture<'_, u64> {
        self.inner.len()
    }

    fn set_len(&self, len: u64) -> IoFuture<'_, ()> {
        self.guard(OpKind::SetLen, None, || self.inner.set_len(len))
    }

    fn path(&self) -> Option<&Path> {
        self.inner.path()
    }

    fn grows_ahead(&self) -> bool {
        self.inner.grows_ahead()
    }

    fn allocate(&self, offset: u64, len: u64) -> IoFuture<'_, ()> {
        self.guard(OpKind::Allocate, Some((offset, len)), || {
            self.inner.allocate(offset, len)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::MemoryStorage;

    fn wrapped() -> (Arc<MemoryStorage>, FaultStorage) {
        let mem = Arc::new(MemoryStorage::from_vec(vec![0; 4096]));
        let fault = FaultStorage::new(mem.clone());
        (mem, fault)
    }

    fn errno(r: io::Result<()>) -> Option<i32> {
        r.err().and_then(|e| e.raw_os_error())
    }

    #[tokio::test]
    async fn nth_write_fails_once() {
        let (mem, s) = wrapped();
        s.set_rule(FaultRule::on(OpKind::Write).nth(3));
        let mut results = Vec::new();
        for i in 0..5u8 {
            results.push(errno(s.write_at(&[i + 1], u64::from(i)).await));
        }
        assert_eq!(results, [None, None, Some(libc::EIO), None, None]);
        assert_eq!(
            mem.snapshot()[..5],
            [1, 2, 0, 4, 5],
            "the failed write did nothing"
        );
        let counts = s.op_counts();
        assert_eq!((counts.writes, counts.faults), (5, 1));
    }

    #[tokio::test]
    async fn sticky_fails_from_n_on() {
        let (_, s) = wrapped();
        s.set_rule(
            FaultRule::on(OpKind::Flush)
                .nth(2)
                .sticky()
                .with_error(FaultError::Enospc),
        );
        let results: Vec<_> = [(); 4].iter().map(|_| s.flush()).collect();
        let mut errs = Vec::new();
        for f in results {
            errs.push(errno(f.await));
        }
        assert_eq!(
            errs,
            [
                None,
                Some(libc::ENOSPC),
                Some(libc::ENOSPC),
                Some(libc::ENOSPC)
            ]
        );
    }

    #[tokio::test]
    async fn counting_is_per_kind() {
        let (_, s) = wrapped();
        s.set_rule(FaultRule::on(OpKind::WriteZeroes).nth(2));
        s.write_at(&[1], 0).await.unwrap();
        s.flush().await.unwrap();
        s.write_zeroes(0, 8).await.unwrap();
        let mut buf = [0u8; 4];
        s.read_at(&mut buf, 0).await.unwrap();
        assert_eq!(errno(s.write_zeroes(0, 8).await), Some(libc::EIO));
        let c = s.op_counts();
        assert_eq!(
            (c.reads, c.writes, c.write_zeroes, c.flushes, c.faults),
            (1, 1, 2, 1, 1)
        );
        assert_eq!(c.get(OpKind::WriteZeroes), 2);
    }

    #[tokio::test]
    async fn range_rules_match_any_kind_touching_the_range() {
        let (_, s) = wrapped();
        s.set_rule(FaultRule::any().in_range(1024..2048).sticky());
        s.write_at(&[1; 1024], 0).await.unwrap(); // ends right before the range
        s.flush().await.unwrap(); // no range: never matches
        s.set_len(8192).await.unwrap();
        let mut buf = [0u8; 2];
        assert!(s.read_at(&mut buf, 1023).await.is_err());
        assert!(s.write_at(&[1; 1], 2047).await.is_err());
        assert!(s.discard(0, 4096).await.is_err());
        assert!(s.write_zeroes(2048, 10).await.is_ok());
        assert_eq!(s.op_counts().faults, 3);
    }

    #[tokio::test]
    async fn short_write_tears_then_fails() {
        let (mem, s) = wrapped();
        s.set_rule(FaultRule::on(OpKind::Write).short_write(3));
        assert_eq!(errno(s.write_at(&[9; 8], 100).await), Some(libc::EIO));
        assert_eq!(mem.snapshot()[99..109], [0, 9, 9, 9, 0, 0, 0, 0, 0, 0]);
    }

    /// A failed request must not reach the inner storage, even one that starts its IO when
    /// the future is created (the crash log records at call time).
    #[tokio::test]
    async fn failed_requests_never_reach_the_inner_storage() {
        let crash = Arc::new(crate::storage::CrashStorage::new(Vec::new()));
        let s = FaultStorage::new(crash.clone());
        s.set_rule(FaultRule::any().sticky());
        assert!(s.write_at(&[1], 0).await.is_err());
        assert!(s.write_zeroes(0, 8).await.is_err());
        assert!(s.discard(0, 8).await.is_err());
        assert!(s.set_len(8).await.is_err());
        assert!(s.flush().await.is_err());
        assert!(s.allocate(0, 8).await.is_err());
        assert_eq!(crash.crash_points(), 1, "log: {:?}", crash.log());
    }

    #[tokio::test]
    async fn rules_change_at_runtime() {
        let (_, s) = wrapped();
        s.set_rule(FaultRule::on(OpKind::Read).sticky());
        let mut buf = [0u8; 1];
        assert!(s.read_at(&mut buf, 0).await.is_err());
        s.clear();
        s.read_at(&mut buf, 0).await.unwrap();
        // A new rule counts from when it is set.
        s.set_rule(FaultRule::on(OpKind::Read).nth(2));
        s.read_at(&mut buf, 0).await.unwrap();
        assert!(s.read_at(&mut buf, 0).await.is_err());
        // Several rules: the first that fires decides the error.
        s.set_rule(FaultRule::on(OpKind::SetLen).with_error(FaultError::Errno(libc::EROFS)));
        s.add_rule(FaultRule::any().with_error(FaultError::Enospc));
        assert_eq!(errno(s.set_len(1).await), Some(libc::EROFS));
        assert_eq!(
            errno(s.allocate(0, 1).await),
            None,
            "`any` fired once already"
        );
        assert_eq!(s.op_counts().reads, 4);
        s.reset_counts();
        assert_eq!(s.op_counts(), OpCounts::default());
    }
}
