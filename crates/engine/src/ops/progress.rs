//! Progress, cancellation and the cancel-safe future of a long image operation.
//!
//! A caller shares one [`Progress`] with the operation: it reads bytes done/total (or gets a
//! callback on every step) and may [`Progress::cancel`] from any thread — the way to stop an
//! operation run from blocking code. Dropping the operation's future cancels it the same
//! way: the work (a [`Job`]) goes on in the background only to the next step boundary, then
//! flushes and closes the images it opened, so nothing is left half-written in a cache and
//! no lock stays taken.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::task::{Context, Poll};

use crate::detach::Detached;
use crate::error::{Error, Result};

/// The callback of [`Progress::with_callback`]: `(done, total)` in bytes.
type Callback = Box<dyn Fn(u64, u64) + Send + Sync>;

/// Progress of an operation (in bytes of the virtual disk) and its cancellation switch.
#[derive(Default)]
pub struct Progress {
    done: AtomicU64,
    total: AtomicU64,
    cancelled: AtomicBool,
    callback: Option<Callback>,
}

impl fmt::Debug for Progress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Progress")
            .field("done", &self.done())
            .field("total", &self.total())
            .field("cancelled", &self.is_cancelled())
            .finish()
    }
}

impl Progress {
    /// A progress counter at 0/0, for the caller to poll.
    pub fn new() -> Arc<Progress> {
        Arc::new(Progress::default())
    }

    /// A progress counter that also calls `f(done, total)` after every step (from the
    /// thread running the operation: keep it short).
    ///
    /// ```
    /// let p = qcow2_engine::ops::Progress::with_callback(|done, total| {
    ///     eprint!("\r{done}/{total}");
    /// });
    /// assert_eq!(p.done(), 0);
    /// ```
    pub fn with_callback(f: impl Fn(u64, u64) + Send + Sync + 'static) -> Arc<Progress> {
        Arc::new(Progress {
            callback: Some(Box::new(f)),
            ..Progress::default()
        })
    }

    /// Bytes done so far.
    pub fn done(&self) -> u64 {
        self.done.load(Relaxed)
    }

    /// Bytes to do in all (done included).
    pub fn total(&self) -> u64 {
        self.total.load(Relaxed).max(self.done())
    }

    /// Ask the operation to stop at its next step; it then fails with an
    /// [`ErrorKind::Io`](crate::ErrorKind::Io) error whose cause is `Interrupted`.
    pub fn cancel(&self) {
        self.cancelled.store(true, Relaxed);
    }

    /// Whether [`Progress::cancel`] was called (or the operation's future dropped).
    pub fn is_cancelled(&self) -> bool {
        self.cancelled.load(Relaxed)
    }

    pub(crate) fn set_total(&self, total: u64) {
        self.total.store(total, Relaxed);
        self.notify();
    }

    pub(crate) fn advance(&self, n: u64) {
        self.done.fetch_add(n, Relaxed);
        self.notify();
    }

    /// `Err` once cancelled: call between steps.
    pub(crate) fn check(&self) -> Result<()> {
        if self.is_cancelled() {
            let cause = std::io::Error::from(std::io::ErrorKind::Interrupted);
            return Err(Error::io("the operation was cancelled", cause));
        }
        Ok(())
    }

    fn notify(&self) {
        if let Some(f) = &self.callback {
            f(self.done(), self.total());
        }
    }
}

/// The future of an operation: dropping it cancels the work (see the module docs).
pub(crate) struct Job<T: Send + 'static> {
    work: Detached<Result<T>>,
    progress: Arc<Progress>,
    finished: bool,
}

impl<T: Send + 'static> Job<T> {
    /// Run `work`, which reports to and checks `progress`.
    pub(crate) fn new(
        progress: Arc<Progress>,
        work: impl Future<Output = Result<T>> + Send + 'static,
    ) -> Self {
        Job {
            work: Detached::new(work),
            progress,
            finished: false,
        }
    }
}

impl<T: Send + 'static> Future for Job<T> {
    type Output = Result<T>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<T>> {
        let out = Pin::new(&mut self.work).poll(cx);
        self.finished = out.is_ready();
        out
    }
}

impl<T: Send + 'static> Drop for Job<T> {
    fn drop(&mut self) {
        // An unfinished operation winds down at its next step.
        if !self.finished {
            self.progress.cancel();
        }
    }
}
