//! The ring and the thread that drives it.
//!
//! ```text
//!  callers (any thread, any runtime)            ring thread (one per storage)
//!  ─────────────────────────────────            ─────────────────────────────
//!  queue.push(op)                               loop {
//!  if sleeping.swap(false) {                      take the queue → slots, backlog
//!      write(eventfd)        ── wakes ──▶         backlog → SQEs (up to ENTRIES in flight)
//!  }                                              sleeping = true; recheck queue
//!  await reply (oneshot)                          io_uring_enter(submit all, wait ≥ 1 CQE)
//!           ▲                                     sleeping = false
//!           └──────── reply.send(result, buf) ◀── reap CQEs: finish, or resubmit the rest
//!                                               }
//! ```
//!
//! The thread submits every SQE queued since its last wake-up in one `io_uring_enter`, so a
//! busy storage costs about one syscall per batch, plus one `eventfd` write per wake-up of an
//! idle ring. An `eventfd` read is always armed on the ring: that is how a caller wakes the
//! thread while it sleeps in the kernel waiting for completions.
//!
//! Lifetime rule: an [`Op`] (with its buffer) lives in `slots` from the moment it is queued
//! until its last CQE has been reaped; the file, the `eventfd` and the `eventfd` read buffer
//! live as long as the thread. The thread leaves only when nothing is in the kernel any more,
//! so no memory the kernel may still write is ever freed.

use std::collections::VecDeque;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use io_uring::{IoUring, opcode, types};

use super::op::{Op, Step};
use crate::storage::file::FileStorage;
use crate::units::to_usize;

/// Submission queue size, and the most requests in the kernel at once (the completion queue is
/// twice as large, so it cannot overflow).
const ENTRIES: u32 = 256;

/// `user_data` of the `eventfd` read; requests use their slot index.
const WAKE_TOKEN: u64 = u64::MAX;

#[cfg(test)]
thread_local! {
    /// Make ring setup fail on this thread, as under a seccomp filter (tests of the fallback).
    pub(crate) static FAIL_SETUP: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// What callers and the ring thread share.
struct Shared {
    queue: Mutex<Queue>,
    /// The thread is (about to be) asleep in `io_uring_enter` and needs an `eventfd` write.
    sleeping: AtomicBool,
    /// The last handle is gone: finish what is in flight, then exit.
    closing: AtomicBool,
    eventfd: OwnedFd,
}

/// Requests not yet taken by the ring thread.
#[derive(Default)]
struct Queue {
    ops: Vec<Op>,
    /// The thread has exited (only after a panic while requests were queued): refuse more.
    dead: bool,
}

impl Shared {
    fn queue(&self) -> MutexGuard<'_, Queue> {
        self.queue.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn wake(&self) {
        // The eventfd counter is a host-order u64: write one as such (not as bytes).
        let one: u64 = 1;
        // SAFETY: the pointer and length describe `one`, a live local the kernel only reads
        // during this synchronous call; the eventfd is open for as long as `self` lives.
        let r = unsafe {
            libc::write(
                self.eventfd.as_raw_fd(),
                std::ptr::from_ref(&one).cast(),
                size_of::<u64>(),
            )
        };
        // An eventfd write only fails if the counter would overflow, and then a wake-up is
        // pending anyway.
        let _ = r;
    }
}

/// The callers' side of a ring: queues requests. Dropping it lets the thread finish and exit,
/// and waits for that: the thread holds the file open, and the file's image locks must be gone
/// once the storage is dropped (so that the same process can open the image again).
pub(crate) struct Ring {
    shared: Arc<Shared>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl std::fmt::Debug for Ring {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ring").finish_non_exhaustive()
    }
}

impl Ring {
    /// Set up a ring for `file` and start its thread. Fails where io_uring is unavailable
    /// (old kernel, seccomp, `kernel.io_uring_disabled`) or lacks an opcode we need.
    pub(crate) fn start(file: FileStorage) -> io::Result<Ring> {
        #[cfg(test)]
        if FAIL_SETUP.with(std::cell::Cell::get) {
            return Err(io::Error::from_raw_os_error(libc::EPERM));
        }
        // SAFETY: `eventfd` takes no pointers; a non-negative result is a new descriptor that
        // nothing else owns.
        let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` was just returned by `eventfd` and is owned by nothing else.
        let eventfd = unsafe { OwnedFd::from_raw_fd(fd) };
        let shared = Arc::new(Shared {
            queue: Mutex::new(Queue::default()),
            sleeping: AtomicBool::new(false),
            closing: AtomicBool::new(false),
            eventfd,
        });
        // The ring is created on its own thread: with `SINGLE_ISSUER` only the creating thread
        // may submit.
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        let thread_shared = Arc::clone(&shared);
        let thread = std::thread::Builder::new()
            .name("qcow2-uring".into())
            .stack_size(256 << 10)
            .spawn(move || match Driver::new(thread_shared, file) {
                Ok(driver) => {
                    let _ = tx.send(Ok(()));
                    driver.run();
                }
                Err(e) => {
                    let _ = tx.send(Err(e));
                }
            })?;
        rx.recv()
            .map_err(|_| io::Error::other("io_uring thread died during setup"))??;
        Ok(Ring {
            shared,
            thread: Some(thread),
        })
    }

    /// Queue `op`; its reply arrives on the receiver [`Op::new`] returned.
    pub(crate) fn submit(&self, op: Op) {
        let mut queue = self.shared.queue();
        if queue.dead {
            // Dropping `op` drops its reply sender: the caller sees an error.
            return;
        }
        queue.ops.push(op);
        drop(queue);
        if self.shared.sleeping.swap(false, Ordering::SeqCst) {
            self.shared.wake();
        }
    }
}

impl Drop for Ring {
    fn drop(&mut self) {
        self.shared.closing.store(true, Ordering::SeqCst);
        self.shared.wake();
        // The thread exits once the requests in flight complete; never join from itself.
        if let Some(t) = self.thread.take() {
            if t.thread().id() != std::thread::current().id() {
                let _ = t.join();
            }
        }
    }
}

/// The ring thread's state.
struct Driver {
    ring: IoUring,
    shared: Arc<Shared>,
    /// Keeps the descriptor in the SQEs open (and not reused) while requests are queued.
    file: FileStorage,
    /// Requests by slot index (their `user_data`); `None` marks a free slot.
    slots: Vec<Option<Op>>,
    free: Vec<usize>,
    /// Slots waiting for room in the kernel.
    backlog: VecDeque<usize>,
    /// Requests in the kernel, not counting the `eventfd` read.
    in_kernel: usize,
    /// The `eventfd` read's target; heap-allocated so that its address is stable.
    wake_buf: Box<[u8; 8]>,
    wake_armed: bool,
    cqes: Vec<(u64, i32)>,
}

impl Driver {
    fn new(shared: Arc<Shared>, file: FileStorage) -> io::Result<Driver> {
        let ring = build_ring()?;
        check_opcodes(&ring)?;
        Ok(Driver {
            ring,
            shared,
            file,
            slots: Vec::new(),
            free: Vec::new(),
            backlog: VecDeque::new(),
            in_kernel: 0,
            wake_buf: Box::new([0; 8]),
            wake_armed: false,
            cqes: Vec::new(),
        })
    }

    fn run(mut self) {
        loop {
            self.take_queued();
            let closing = self.shared.closing.load(Ordering::SeqCst);
            if !closing && !self.wake_armed {
                self.arm_wake();
            }
            self.fill_sq();
            if closing && self.idle() {
                return;
            }
            let want = self.prepare_sleep();
            match self.ring.submit_and_wait(want) {
                Ok(_) => {}
                Err(e) if is_transient(&e) => {}
                Err(e) => {
                    // Not expected from a healthy ring; don't spin on it.
                    tracing::warn!("io_uring_enter failed: {e}");
                    std::thread::sleep(std::time::Duration::from_millis(1));
                }
            }
            self.shared.sleeping.store(false, Ordering::SeqCst);
            self.reap();
        }
    }

    /// Nothing left in the kernel or waiting for it (only checked once closing).
    fn idle(&self) -> bool {
        self.in_kernel == 0
            && !self.wake_armed
            && self.backlog.is_empty()
            && self.shared.queue().ops.is_empty()
    }

    /// Announce that the thread may sleep; returns how many completions to wait for (0 when
    /// a request arrived meanwhile: submit it without waiting).
    fn prepare_sleep(&self) -> usize {
        self.shared.sleeping.store(true, Ordering::SeqCst);
        // A caller that queued before the store above saw `sleeping == false` and did not wake
        // us: look again (the SeqCst pair makes sure one of the two sides sees the other).
        if self.shared.queue().ops.is_empty() {
            1
        } else {
            self.shared.sleeping.store(false, Ordering::SeqCst);
            0
        }
    }

    /// Move queued requests into slots and the backlog.
    fn take_queued(&mut self) {
        let ops = std::mem::take(&mut self.shared.queue().ops);
        for op in ops {
            let i = match self.free.pop() {
                Some(i) => {
                    self.slots[i] = Some(op);
                    i
                }
                None => {
                    self.slots.push(Some(op));
                    self.slots.len() - 1
                }
            };
            self.backlog.push_back(i);
        }
    }

    /// Push backlog requests to the submission queue while the kernel has room.
    fn fill_sq(&mut self) {
        let fd = types::Fd(self.file.file().as_raw_fd());
        let mut sq = self.ring.submission();
        while self.in_kernel < ENTRIES as usize && !sq.is_full() {
            let Some(i) = self.backlog.pop_front() else {
                break;
            };
            let Some(op) = self.slots[i].as_mut() else {
                continue;
            };
            let sqe = op.sqe(fd).user_data(i as u64);
            // SAFETY: the SQE points into `op`'s buffer, a heap allocation owned by
            // `self.slots[i]`; the slot is emptied only in `reap`, after this request's CQE has
            // arrived, so the buffer outlives the kernel's use even if the caller's future is
            // dropped. The thread returns only once `in_kernel` is 0. `fd` stays open as long
            // as `self.file`.
            if unsafe { sq.push(&sqe) }.is_err() {
                self.backlog.push_front(i);
                break;
            }
            self.in_kernel += 1;
        }
    }

    /// Arm the `eventfd` read that lets callers wake the thread.
    fn arm_wake(&mut self) {
        let fd = types::Fd(self.shared.eventfd.as_raw_fd());
        let sqe = opcode::Read::new(fd, self.wake_buf.as_mut_ptr(), 8)
            .build()
            .user_data(WAKE_TOKEN);
        // SAFETY: `wake_buf` is a heap allocation owned by the driver; the driver (and with it
        // the buffer and, through `shared`, the eventfd) lives until `run` returns, which it does
        // only after this read has completed (`wake_armed` is false).
        if unsafe { self.ring.submission().push(&sqe) }.is_ok() {
            self.wake_armed = true;
        }
    }

    /// Handle every available completion.
    fn reap(&mut self) {
        let mut cqes = std::mem::take(&mut self.cqes);
        cqes.extend(self.ring.completion().map(|c| (c.user_data(), c.result())));
        for &(token, res) in &cqes {
            if token == WAKE_TOKEN {
                self.wake_armed = false;
                continue;
            }
            self.in_kernel -= 1;
            let i = to_usize(token);
            let Some(op) = self.slots.get_mut(i).and_then(Option::as_mut) else {
                continue;
            };
            match op.step(res) {
                Step::Again => self.backlog.push_back(i),
                Step::Done(result) => {
                    if let Some(op) = self.slots[i].take() {
                        op.finish(result);
                    }
                    self.free.push(i);
                }
            }
        }
        cqes.clear();
        self.cqes = cqes;
    }
}

impl Drop for Driver {
    fn drop(&mut self) {
        // Normally empty by now; after a panic, fail whatever is still queued.
        let queued = {
            let mut queue = self.shared.queue();
            queue.dead = true;
            std::mem::take(&mut queue.ops)
        };
        drop(queued);
        if self.in_kernel > 0 || self.wake_armed {
            // Only reachable by unwinding out of `run`: the kernel may still write into these
            // buffers, so leak them rather than free memory it is using.
            for op in self.slots.drain(..).flatten() {
                op.abandon();
            }
            std::mem::forget(std::mem::take(&mut self.wake_buf));
        }
    }
}

/// A ring with the cheapest completion mode this kernel accepts: `SINGLE_ISSUER |
/// DEFER_TASKRUN` (6.1+: completions are processed only when this thread asks), else
/// `COOP_TASKRUN` (5.19+), else plain.
fn build_ring() -> io::Result<IoUring> {
    let cq = 2 * ENTRIES;
    if let Ok(r) = IoUring::builder()
        .setup_cqsize(cq)
        .setup_single_issuer()
        .setup_defer_taskrun()
        .build(ENTRIES)
    {
        return Ok(r);
    }
    if let Ok(r) = IoUring::builder()
        .setup_cqsize(cq)
        .setup_coop_taskrun()
        .build(ENTRIES)
    {
        return Ok(r);
    }
    IoUring::builder().setup_cqsize(cq).build(ENTRIES)
}

/// Refuse kernels without the opcodes we submit (`READ`/`WRITE` came in 5.6).
fn check_opcodes(ring: &IoUring) -> io::Result<()> {
    let mut probe = io_uring::Probe::new();
    ring.submitter().register_probe(&mut probe)?;
    for code in [opcode::Read::CODE, opcode::Write::CODE, opcode::Fsync::CODE] {
        if !probe.is_supported(code) {
            return Err(io::Error::new(
                io::ErrorKind::Unsupported,
                "io_uring lacks the read/write/fsync opcodes",
            ));
        }
    }
    Ok(())
}

fn is_transient(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EINTR | libc::EAGAIN | libc::EBUSY)
    )
}
