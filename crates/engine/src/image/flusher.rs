//! The background flusher: writes dirty metadata every flush interval, or sooner when a
//! cache is more dirty than its threshold, so that a crash loses little and caches stay
//! evictable.
//!
//! It needs no particular async runtime. By default it is a small thread of its own that
//! waits on a timer and drives each flush with a minimal executor (the engine's IO completes
//! on its own IO threads, which wake any waker); with the `tokio` feature the caller may give
//! it a tokio runtime instead ([`Flusher::Tokio`]).
//!
//! Either way it holds only a weak reference to the image between rounds, and it stops when
//! the image is closed (close sets `closed` and wakes it) or dropped (dropping the last handle
//! wakes it too: see `Drop for Inner`), so no thread or task outlives its image.

use std::future::Future;
use std::pin::pin;
use std::sync::{Arc, Weak};
use std::task::{Context, Wake, Waker};
use std::time::{Duration, Instant};

use tokio::sync::futures::OwnedNotified;

use super::{Image, Inner};

/// Who runs an image's background flusher ([`super::OpenOptions::flusher`]).
#[derive(Debug, Clone, Default)]
#[non_exhaustive]
pub enum Flusher {
    /// A small thread of its own (named `qcow2-flusher`), whatever runtime the caller uses,
    /// if any. The default.
    #[default]
    Thread,
    /// A task on this tokio runtime (feature `tokio`), which must have timers enabled
    /// (`enable_time` or `enable_all` on its builder): the task sleeps with
    /// `tokio::time::sleep`, and tokio cannot tell beforehand whether a runtime has them.
    #[cfg(feature = "tokio")]
    Tokio(tokio::runtime::Handle),
    /// No background flusher: dirty metadata is written by [`Image::flush`], by
    /// [`Image::close`], and when the metadata cache is full.
    None,
}

impl Image {
    /// Start the background flusher `how` chose (on a writable image).
    pub(crate) fn start_flusher(&self, how: &Flusher) -> crate::Result<()> {
        let weak = Arc::downgrade(&self.inner);
        let interval = self.inner.flush_interval;
        match how {
            Flusher::Thread => start_thread(weak, interval),
            #[cfg(feature = "tokio")]
            Flusher::Tokio(rt) => {
                drop(rt.spawn(run_on_tokio(weak, interval)));
                Ok(())
            }
            Flusher::None => Ok(()),
        }
    }
}

/// Dropping the last handle wakes the flusher, which then finds the image gone and stops
/// (instead of sleeping out its interval, or forever without one).
impl Drop for Inner {
    fn drop(&mut self) {
        if let Some(w) = self.write.as_ref() {
            w.want_flush();
        }
    }
}

fn start_thread(weak: Weak<Inner>, interval: Option<Duration>) -> crate::Result<()> {
    std::thread::Builder::new()
        .name("qcow2-flusher".into())
        .spawn(move || run_on_thread(weak, interval))
        .map(drop)
        .map_err(|e| crate::Error::io("starting the background flusher thread", e))
}

/// The flusher thread's loop: wait for a wake-up or the interval, then flush if dirty.
fn run_on_thread(weak: Weak<Inner>, interval: Option<Duration>) {
    while let Some(wanted) = next_wait(&weak) {
        wait_until(wanted, interval.map(|d| Instant::now() + d));
        if !futures_lite::future::block_on(flush_round(&weak)) {
            return;
        }
    }
}

/// The same loop as a task on a tokio runtime.
#[cfg(feature = "tokio")]
async fn run_on_tokio(weak: Weak<Inner>, interval: Option<Duration>) {
    while let Some(wanted) = next_wait(&weak) {
        let timer = async {
            match interval {
                Some(d) => tokio::time::sleep(d).await,
                None => std::future::pending().await,
            }
        };
        futures_lite::future::or(wanted, timer).await;
        if !flush_round(&weak).await {
            return;
        }
    }
}

/// The wake-up to wait for before the next round, or `None` when the image is gone or
/// closed. Holds no strong reference afterwards: the image stays droppable while we wait.
fn next_wait(weak: &Weak<Inner>) -> Option<OwnedNotified> {
    let inner = weak.upgrade()?;
    let w = inner.write.as_ref()?;
    if w.is_closed() {
        return None;
    }
    Some(w.flush_wanted().clone().notified_owned())
}

/// Flush if anything is dirty. `false`: stop (image gone or closed, or the flush failed —
/// the image is then poisoned and refuses writes, so there is nothing more to flush).
async fn flush_round(weak: &Weak<Inner>) -> bool {
    let Some(inner) = weak.upgrade() else {
        return false;
    };
    let img = Image { inner };
    let Some(w) = img.inner.write.as_ref() else {
        return false;
    };
    if w.is_closed() {
        return false;
    }
    let dirty = img.inner.l2_cache.dirty_count() > 0
        || w.refcounts().cache().dirty_count() > 0
        || img.inner.l1.has_dirty();
    !dirty || img.flush().await.is_ok()
}

/// Wakes the thread that polls a future (a waker for [`wait_until`]).
struct Unpark(std::thread::Thread);

impl Wake for Unpark {
    fn wake(self: Arc<Self>) {
        self.0.unpark();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.0.unpark();
    }
}

/// Poll `fut` on this thread until it is ready or `deadline` (if any) has passed.
fn wait_until(fut: impl Future<Output = ()>, deadline: Option<Instant>) {
    let waker = Waker::from(Arc::new(Unpark(std::thread::current())));
    let mut cx = Context::from_waker(&waker);
    let mut fut = pin!(fut);
    while fut.as_mut().poll(&mut cx).is_pending() {
        match deadline {
            None => std::thread::park(),
            Some(at) => {
                let now = Instant::now();
                if now >= at {
                    return;
                }
                std::thread::park_timeout(at - now);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wait_until_times_out_without_a_wake_up() {
        let t = Instant::now();
        wait_until(std::future::pending(), Some(t + Duration::from_millis(30)));
        assert!(t.elapsed() >= Duration::from_millis(30));
    }

    #[test]
    fn wait_until_returns_when_woken_from_another_thread() {
        let notify = Arc::new(tokio::sync::Notify::new());
        let wanted = notify.clone().notified_owned();
        let waker = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(20));
            notify.notify_one();
        });
        let t = Instant::now();
        wait_until(wanted, Some(t + Duration::from_secs(30)));
        assert!(t.elapsed() < Duration::from_secs(10));
        waker.join().unwrap();
    }
}
