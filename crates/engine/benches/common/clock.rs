//! The benches' clock: wall time (criterion's default), or with `QCOW2_BENCH_CLOCK=cpu` the
//! CPU time of the bench thread.
//!
//! CPU time is for shared, loaded machines, where wall time also counts the time other
//! processes hold the cores. It is exact here because every bench runs on one thread: a
//! current-thread runtime over `MemoryStorage`, whose IO completes inline, so the engine's
//! background work (flushes) runs on that thread too and nothing blocks.

use std::sync::OnceLock;
use std::time::{Duration, Instant};

use criterion::Criterion;
use criterion::measurement::{Measurement, ValueFormatter, WallTime};

/// The environment variable that selects the clock (`cpu`; anything else: wall time).
const CLOCK_VAR: &str = "QCOW2_BENCH_CLOCK";

/// Whether the benches measure CPU time (read once).
fn cpu_clock() -> bool {
    static CPU: OnceLock<bool> = OnceLock::new();
    *CPU.get_or_init(|| std::env::var(CLOCK_VAR).is_ok_and(|v| v == "cpu"))
}

/// The current reading of the selected clock, from an arbitrary fixed start.
pub fn now() -> Duration {
    static START: OnceLock<Instant> = OnceLock::new();
    match cpu_clock() {
        true => thread_cpu_time(),
        false => START.get_or_init(Instant::now).elapsed(),
    }
}

/// CPU time used by the calling thread so far.
fn thread_cpu_time() -> Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid timespec that outlives the call, which only writes into it.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    assert_eq!(rc, 0, "clock_gettime(CLOCK_THREAD_CPUTIME_ID) failed");
    let secs = u64::try_from(ts.tv_sec).unwrap_or(0);
    let nanos = u32::try_from(ts.tv_nsec).unwrap_or(0);
    Duration::new(secs, nanos)
}

/// A criterion measurement reading [`now`]; values are durations, reported like wall time.
pub struct Clock {
    /// Only lends its duration formatter (criterion's own is private).
    wall: WallTime,
}

impl Measurement for Clock {
    type Intermediate = Duration;
    type Value = Duration;

    fn start(&self) -> Duration {
        now()
    }

    fn end(&self, start: Duration) -> Duration {
        now().saturating_sub(start)
    }

    fn add(&self, a: &Duration, b: &Duration) -> Duration {
        *a + *b
    }

    fn zero(&self) -> Duration {
        Duration::ZERO
    }

    fn to_f64(&self, d: &Duration) -> f64 {
        d.as_nanos() as f64
    }

    fn formatter(&self) -> &dyn ValueFormatter {
        self.wall.formatter()
    }
}

/// The criterion configuration every bench uses: the defaults, measured with [`Clock`].
pub fn criterion() -> Criterion<Clock> {
    if cpu_clock() {
        eprintln!("{CLOCK_VAR}=cpu: measuring the bench thread's CPU time, not wall time");
    }
    Criterion::default().with_measurement(Clock { wall: WallTime })
}
