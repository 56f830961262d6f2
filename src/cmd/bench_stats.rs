//! Latency statistics and the report of `qcow2 bench`.
//!
//! Latencies go into a log-linear histogram (16 sub-buckets per power of two of nanoseconds,
//! so a percentile is within ~6 % of the true value) of fixed size: memory does not grow with
//! the request count. Each worker keeps its own and they are merged at the end, so recording
//! costs one array increment and takes no lock.

use std::time::Duration;

/// Sub-buckets per power of two.
const SUB_BITS: u32 = 4;
const SUB: usize = 1 << SUB_BITS;
/// Buckets for every `u64` nanosecond count.
const BUCKETS: usize = 64 * SUB;

/// A fixed-size latency histogram.
#[derive(Debug, Clone)]
pub struct Histogram {
    counts: Box<[u64; BUCKETS]>,
    total: u64,
}

impl Default for Histogram {
    fn default() -> Self {
        Histogram {
            counts: Box::new([0; BUCKETS]),
            total: 0,
        }
    }
}

impl Histogram {
    /// Count one request that took `d`.
    pub fn record(&mut self, d: Duration) {
        let ns = u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
        self.counts[bucket(ns)] += 1;
        self.total += 1;
    }

    /// Add `other`'s counts to this one.
    pub fn merge(&mut self, other: &Histogram) {
        for (a, b) in self.counts.iter_mut().zip(other.counts.iter()) {
            *a += b;
        }
        self.total += other.total;
    }

    /// The latency below which `p` (0..=1) of the requests finished (a bucket's upper bound),
    /// or zero for an empty histogram.
    pub fn percentile(&self, p: f64) -> Duration {
        if self.total == 0 {
            return Duration::ZERO;
        }
        // The rank of the request that decides: at least the first, at most the last.
        let rank = ((p * self.total as f64).ceil() as u64).clamp(1, self.total);
        let mut seen = 0;
        for (i, &c) in self.counts.iter().enumerate() {
            seen += c;
            if seen >= rank {
                return Duration::from_nanos(upper_bound(i));
            }
        }
        Duration::from_nanos(u64::MAX)
    }
}

/// The bucket of `ns`: values below `SUB` have one bucket each; above, each power of two is
/// split into `SUB` equal parts.
fn bucket(ns: u64) -> usize {
    if ns < SUB as u64 {
        return ns as usize;
    }
    let top = 63 - ns.leading_zeros(); // ≥ SUB_BITS
    let sub = (ns >> (top - SUB_BITS)) as usize & (SUB - 1);
    (top - SUB_BITS + 1) as usize * SUB + sub
}

/// The largest value that falls in bucket `i`.
fn upper_bound(i: usize) -> u64 {
    if i < SUB {
        return i as u64;
    }
    let top = (i / SUB) as u32 + SUB_BITS - 1;
    let sub = (i % SUB) as u64;
    let low = (1u64 << top) | (sub << (top - SUB_BITS));
    low.saturating_add((1u64 << (top - SUB_BITS)) - 1)
}

/// What one run measured.
#[derive(Debug, serde::Serialize)]
pub struct Report {
    /// `read` or `write`.
    pub kind: &'static str,
    /// Requests completed.
    pub count: u64,
    /// Bytes per request.
    pub size: u64,
    /// Requests in flight at once.
    pub depth: u64,
    /// Wall time of the run in seconds (the requests and the final flush).
    pub seconds: f64,
    /// Requests per second.
    pub iops: f64,
    /// Mebibytes per second.
    pub mib_per_s: f64,
    /// Median request latency in microseconds.
    pub p50_us: f64,
    /// 99th-percentile request latency in microseconds.
    pub p99_us: f64,
}

impl Report {
    /// Derive the rates and percentiles.
    pub fn new(
        kind: &'static str,
        (count, size, depth): (u64, u64, u64),
        elapsed: Duration,
        h: &Histogram,
    ) -> Report {
        let seconds = elapsed.as_secs_f64();
        let per_s = |x: f64| if seconds > 0.0 { x / seconds } else { 0.0 };
        let us = |d: Duration| d.as_secs_f64() * 1e6;
        Report {
            kind,
            count,
            size,
            depth,
            seconds,
            iops: per_s(count as f64),
            mib_per_s: per_s((count * size) as f64 / f64::from(1u32 << 20)),
            p50_us: us(h.percentile(0.5)),
            p99_us: us(h.percentile(0.99)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_value_lies_within_its_bucket() {
        for ns in [0, 1, 15, 16, 17, 31, 32, 1000, 123_456, 1 << 40, u64::MAX] {
            let b = bucket(ns);
            assert!(upper_bound(b) >= ns, "{ns}");
            if b > 0 {
                assert!(upper_bound(b - 1) < ns, "{ns}");
            }
        }
    }

    #[test]
    fn percentiles_of_a_known_spread() {
        let mut h = Histogram::default();
        for us in 1..=100u64 {
            h.record(Duration::from_micros(us));
        }
        let p50 = h.percentile(0.5).as_secs_f64() * 1e6;
        let p99 = h.percentile(0.99).as_secs_f64() * 1e6;
        assert!((50.0..=54.0).contains(&p50), "{p50}");
        assert!((99.0..=105.0).contains(&p99), "{p99}");
        assert_eq!(Histogram::default().percentile(0.5), Duration::ZERO);
    }
}
