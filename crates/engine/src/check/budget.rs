//! The work budget and progress of a check pass.
//!
//! The walk's work is not bounded by the file's size: QEMU's algorithm walks an L2 table once
//! per reference to it, and a small crafted file can reference the same table millions of
//! times (an L1 table whose entries all name one L2 table, thousands of snapshots sharing one
//! L1 table, bitmaps sharing one bitmap table). So every pass counts its **work units** —
//! L1/L2/bitmap table entries scanned and clusters compared — in a [`Meter`] and stops with an
//! error once they exceed the budget.
//!
//! The default budget ([`honest_work`]) is twice the most work an image QEMU could have
//! written can need for its file size and snapshot count, so honest images never reach it:
//!
//! ```text
//!  F = file length, Fc = file clusters, E = entries per L2 table, S = snapshots
//!  L1, snapshot L1 and bitmap tables lie in the file without overlapping:   ≤ 3 · F/8
//!      (the active L1 is scanned twice: walk and COPIED check)
//!  compare passes (check, raise, lower, recount)                             ≤ 4 · (Fc + 1)
//!  L2 tables walked: one per non-zero L1 entry; one L1 table names each
//!  L2 table at most once, and there are at most min(S + 1, Fc) L1 tables
//!  (each takes a cluster of its own)       ≤ E · min(F/8, min(S + 1, Fc) · Fc)
//!  COPIED check of the active L2 tables                                      ≤ E · Fc
//! ```
//!
//! The bound is quadratic in the file size only through snapshots sharing L2 tables, which is
//! also what makes an honest image with many snapshots slow to check (in QEMU too). The
//! scans of L1 and bitmap tables alone are held to their linear share (twice `3 · F/8`, at
//! least [`MIN_WORK`]): thousands of snapshots naming one 32 MiB L1 table stop after a few.
//!
//! The meter also feeds the caller's [`Progress`] and yields to the executor every
//! [`YIELD_EVERY`] units, so a check future can be dropped (cancelled) or timed out even when
//! every read is served without waiting.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use crate::error::{Error, Result};

/// Work every image may use whatever its size (small images are never refused).
const MIN_WORK: u64 = 1 << 20;
/// Units of work between two yields to the executor.
const YIELD_EVERY: u64 = 1 << 16;

/// Progress of a check, shared with the caller (who polls it from any thread).
///
/// Both numbers are in work units (table entries scanned, clusters compared). `total` is an
/// estimate that grows as the checker discovers work (snapshot L1 tables, bitmap tables, the
/// passes of a repair); `done` never exceeds it, and equals it when a pass ends.
#[derive(Debug, Default)]
pub struct Progress {
    done: AtomicU64,
    total: AtomicU64,
}

impl Progress {
    /// A progress counter at 0/0, to put in [`CheckOptions`](super::CheckOptions).
    pub fn new() -> Arc<Progress> {
        Arc::new(Progress::default())
    }

    /// Work done so far.
    pub fn done(&self) -> u64 {
        self.done.load(Relaxed)
    }

    /// Work known so far (done included).
    pub fn total(&self) -> u64 {
        self.total.load(Relaxed).max(self.done())
    }
}

/// What an image's honest check can need, from its shape (see the module docs).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Shape {
    /// File length in bytes.
    pub file_len: u64,
    /// Cluster size in bytes.
    pub cluster_size: u64,
    /// Entries in one L2 table.
    pub l2_entries: u64,
    /// Internal snapshots.
    pub snapshots: u64,
}

/// The most work units an image QEMU could have written with this shape needs in one pass.
pub(crate) fn honest_work(s: Shape) -> u64 {
    let f8 = s.file_len / 8;
    let fc = s.file_len.div_ceil(s.cluster_size.max(1));
    let l1_tables = s.snapshots.saturating_add(1).min(fc.max(1));
    let l2_walks = f8.min(l1_tables.saturating_mul(fc));
    let tables = f8.saturating_mul(3);
    let compares = fc.saturating_add(1).saturating_mul(4);
    let l2 = s.l2_entries.saturating_mul(l2_walks.saturating_add(fc));
    tables.saturating_add(compares).saturating_add(l2)
}

/// A pass's limits, in work units.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Budget {
    /// All work.
    pub work: u64,
    /// The part of it spent scanning L1 and bitmap tables.
    pub tables: u64,
}

impl Budget {
    /// One limit for everything (a caller's `max_work`).
    pub(crate) fn uniform(work: u64) -> Budget {
        Budget { work, tables: work }
    }

    /// The default for an image of this shape: twice the honest bounds, at least
    /// [`MIN_WORK`] each.
    pub(crate) fn for_image(s: Shape) -> Budget {
        let twice = |n: u64| n.saturating_mul(2).saturating_add(MIN_WORK);
        Budget {
            work: twice(honest_work(s)),
            tables: twice((s.file_len / 8).saturating_mul(3)),
        }
    }
}

/// Counts one pass's work against its budget (module docs).
#[derive(Debug)]
pub(crate) struct Meter {
    used: AtomicU64,
    tables_used: AtomicU64,
    since_yield: AtomicU64,
    limit: Budget,
    /// The limit is the caller's (not derived from the image).
    explicit: bool,
    progress: Option<Arc<Progress>>,
}

impl Meter {
    /// A meter allowing `limit`; `explicit` when the caller chose it.
    pub(crate) fn new(limit: Budget, explicit: bool, progress: Option<Arc<Progress>>) -> Meter {
        Meter {
            used: AtomicU64::new(0),
            tables_used: AtomicU64::new(0),
            since_yield: AtomicU64::new(0),
            limit,
            explicit,
            progress,
        }
    }

    /// Announce `n` units of work to come (grows the progress total).
    pub(crate) fn expect(&self, n: u64) {
        if let Some(p) = &self.progress {
            p.total.fetch_add(n, Relaxed);
        }
    }

    /// [`Meter::spend`] for scanning `n` entries of an L1 or bitmap table.
    pub(crate) async fn spend_table(&self, n: u64) -> Result<()> {
        let used = self.tables_used.load(Relaxed).saturating_add(n);
        self.tables_used.store(used, Relaxed);
        if used > self.limit.tables {
            return Err(self.exceeded(used, self.limit.tables, "L1 and bitmap table entries"));
        }
        self.spend(n).await
    }

    /// Account for `n` units of work about to be done: an error once the pass is over its
    /// budget; now and then a yield to the executor (a chance to be cancelled).
    pub(crate) async fn spend(&self, n: u64) -> Result<()> {
        let used = self.used.load(Relaxed).saturating_add(n);
        self.used.store(used, Relaxed);
        if let Some(p) = &self.progress {
            p.done.fetch_add(n, Relaxed);
        }
        if used > self.limit.work {
            return Err(self.exceeded(used, self.limit.work, "table entries and clusters"));
        }
        let since = self.since_yield.load(Relaxed).saturating_add(n);
        if since >= YIELD_EVERY {
            self.since_yield.store(0, Relaxed);
            futures_lite::future::yield_now().await;
        } else {
            self.since_yield.store(since, Relaxed);
        }
        Ok(())
    }

    /// The pass is over: its progress reaches its total.
    pub(crate) fn finish(&self) {
        if let Some(p) = &self.progress {
            let done = p.done.load(Relaxed);
            p.total.fetch_max(done, Relaxed);
            p.done.store(p.total.load(Relaxed), Relaxed);
        }
    }

    /// The error for a pass that reached `used` units of `what`, over `limit`.
    fn exceeded(&self, used: u64, limit: u64, what: &str) -> Error {
        if self.explicit {
            return Error::invalid_arg(format!(
                "checking needs more than the work budget of {limit} {what} \
                 (CheckOptions::max_work; reached {used})"
            ));
        }
        Error::corrupt(format!(
            "checking or rebuilding the refcounts needs more than {limit} {what} (reached \
             {used}), more than any image of this size and snapshot count QEMU writes can \
             need: its metadata references the same tables over and over (raise \
             CheckOptions::max_work to check it anyway)"
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shape(file_len: u64, snapshots: u64) -> Shape {
        Shape {
            file_len,
            cluster_size: 65536,
            l2_entries: 8192,
            snapshots,
        }
    }

    #[test]
    fn the_budget_grows_with_the_file_and_the_snapshots() {
        // 1 GiB, no snapshots: every cluster an L2 table, walked twice (walk + COPIED).
        let fc = 16384;
        let lone = honest_work(shape(1 << 30, 0));
        assert!(lone >= 2 * fc * 8192, "{lone}");
        // Snapshots only count as far as the file has room for their L1 tables.
        let many = honest_work(shape(1 << 30, 100));
        assert!(many >= 101 * fc * 8192, "{many}");
        assert_eq!(
            honest_work(shape(1 << 20, 65535)),
            honest_work(shape(1 << 20, 15))
        );
        // An empty file: only the comparisons' extra cluster, on top of the minimum.
        let empty = Budget::for_image(shape(0, 0));
        assert_eq!((empty.work, empty.tables), (MIN_WORK + 8, MIN_WORK));
        assert_eq!(honest_work(shape(u64::MAX, u64::MAX)), u64::MAX);
    }

    #[tokio::test]
    async fn the_meter_stops_at_its_limit_and_reports_progress() {
        let p = Progress::new();
        let m = Meter::new(Budget::uniform(100), true, Some(p.clone()));
        m.expect(150);
        m.spend(60).await.unwrap();
        assert_eq!((p.done(), p.total()), (60, 150));
        let err = m.spend(60).await.unwrap_err();
        assert_eq!(err.kind(), crate::ErrorKind::InvalidArgument);
        assert!(err.what().contains("work budget of 100"), "{}", err.what());
        let limit = Budget {
            work: 100,
            tables: 10,
        };
        let m = Meter::new(limit, false, None);
        m.spend(11).await.unwrap();
        let err = m.spend_table(11).await.unwrap_err();
        assert_eq!(err.kind(), crate::ErrorKind::Corrupt);
        assert!(
            err.what().contains("than 10 L1 and bitmap"),
            "{}",
            err.what()
        );
    }
}
