//! A byte-rate limit (`qemu-img commit -r`, `convert -r`), without depending on an async
//! runtime's timers.

use std::time::{Duration, Instant};

/// Paces a stream of writes to at most `rate` bytes per second on average.
#[derive(Debug)]
pub struct Throttle {
    rate: Option<u64>,
    start: Instant,
    bytes: u64,
}

impl Throttle {
    /// No limit when `rate` is `None` or 0.
    pub fn new(rate: Option<u64>) -> Throttle {
        Throttle {
            rate: rate.filter(|&r| r > 0),
            start: Instant::now(),
            bytes: 0,
        }
    }

    /// Wait until the bytes admitted so far fit the rate, then admit `n` more: as QEMU's
    /// throttling, a request waits for the ones before it, not for itself (so the first one
    /// goes at once, and a copy of B bytes whose last request is L bytes takes (B - L) / rate).
    pub async fn admit(&mut self, n: u64) {
        let Some(rate) = self.rate else { return };
        let due = Duration::from_secs_f64(self.bytes as f64 / rate as f64);
        if let Some(wait) = due.checked_sub(self.start.elapsed()) {
            sleep(wait).await;
        }
        self.bytes += n;
    }

    /// Account `n` bytes written, then wait until the average rate is back under the limit.
    pub async fn account(&mut self, n: u64) {
        let Some(rate) = self.rate else { return };
        self.bytes += n;
        let due = Duration::from_secs_f64(self.bytes as f64 / rate as f64);
        if let Some(wait) = due.checked_sub(self.start.elapsed()) {
            sleep(wait).await;
        }
    }
}

/// Sleep without a runtime timer: a short-lived thread completes a channel. Rate-limited
/// copies sleep at most once per step, so the thread's cost does not matter.
async fn sleep(d: Duration) {
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let spawned = std::thread::Builder::new()
        .name("qcow2-throttle".into())
        .spawn(move || {
            std::thread::sleep(d);
            let _ = tx.send(());
        });
    if spawned.is_ok() {
        drop(rx.await);
    }
}
