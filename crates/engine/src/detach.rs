//! Cancel-safe public futures (DESIGN.md §5c): work that must finish is owned by a task.
//!
//! A public operation that changes the image runs as a [`Detached`] future: an owned, boxed
//! future that the caller's task polls as usual (no task switch on the hot path). If the
//! caller drops it after it has started, the rest of the work is handed to a background task
//! ([`spawn`]) that drives it to completion and throws its result away. So dropping the
//! caller's future only stops the waiting: a flush that took the dirty L1 entries still writes
//! them, and a write whose data IO is queued keeps its in-flight tracking (and with it the
//! host cluster) until that IO is done.
//!
//! A future that was never polled has done nothing and is simply dropped.
//!
//! The one place that needs an executor is [`spawn`]: with the `tokio` feature the current
//! tokio runtime if there is one, else a short-lived thread that drives the work with a
//! minimal executor (the engine's IO wakes any waker, so no runtime is needed).

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

/// The boxed, owned future a [`Detached`] drives.
type Work<T> = Pin<Box<dyn Future<Output = T> + Send + 'static>>;

/// A future that finishes its work in the background when dropped mid-way (module docs).
#[must_use = "futures do nothing unless polled"]
pub(crate) struct Detached<T: Send + 'static> {
    work: Option<Work<T>>,
    started: bool,
}

impl<T: Send + 'static> Detached<T> {
    /// Wrap `work`, which must own everything it uses (copy borrowed buffers first).
    pub(crate) fn new(work: impl Future<Output = T> + Send + 'static) -> Self {
        Detached {
            work: Some(Box::pin(work)),
            started: false,
        }
    }
}

impl<T: Send + 'static> Future for Detached<T> {
    type Output = T;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<T> {
        // `Detached` is `Unpin` (the work is boxed), so plain field access is fine.
        let this = &mut *self;
        let Some(work) = this.work.as_mut() else {
            panic!("Detached polled after completion");
        };
        this.started = true;
        let out = work.as_mut().poll(cx);
        if out.is_ready() {
            this.work = None;
        }
        out
    }
}

impl<T: Send + 'static> Drop for Detached<T> {
    fn drop(&mut self) {
        if let Some(work) = self.work.take().filter(|_| self.started) {
            spawn(async move {
                drop(work.await);
            });
        }
    }
}

/// Run `fut` to completion in the background: on the current tokio runtime if there is one
/// (feature `tokio`), else on a thread of its own.
///
/// If no thread can be started, the work is dropped where it stands — the same outcome as a
/// crash at that point, which the flush order already makes safe on disk.
pub(crate) fn spawn(fut: impl Future<Output = ()> + Send + 'static) {
    #[cfg(feature = "tokio")]
    if let Ok(rt) = tokio::runtime::Handle::try_current() {
        drop(rt.spawn(fut));
        return;
    }
    let thread = std::thread::Builder::new()
        .name("qcow2-detached".into())
        .spawn(move || futures_lite::future::block_on(fut));
    if let Err(e) = thread {
        tracing::error!("cannot finish a cancelled operation: {e}");
    }
}
