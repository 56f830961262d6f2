//! One request on the ring: the buffer it owns, how far it got, and where its result goes.
//!
//! An [`Op`] owns its buffer from the moment it is queued until its last completion has been
//! reaped, and only then hands the buffer back through the reply channel. If the caller's
//! future was dropped meanwhile, the send fails and the buffer is freed on the ring thread,
//! after the kernel is done with it.

use std::io;

use io_uring::{opcode, squeue, types};
use tokio::sync::oneshot;

use crate::storage::file::{ALIGN, Bounce};
use crate::units::to_usize;

/// Largest transfer submitted at once (an SQE's length is 32 bits); longer requests go on as
/// "short" transfers, resubmitted for the rest.
const MAX_CHUNK: usize = 1 << 30;

/// How often a request that fails with `EINTR` or `EAGAIN` is resubmitted before giving up.
const MAX_RETRIES: u32 = 1000;

/// A buffer the ring owns while the kernel may use it.
pub(crate) enum IoBuf {
    /// No data (fsync).
    Empty,
    /// A plain heap buffer covering exactly the request (buffered IO).
    Plain(Vec<u8>),
    /// An aligned bounce buffer covering the request widened to whole blocks (`O_DIRECT`).
    Aligned(Bounce),
}

impl IoBuf {
    /// The caller's bytes.
    pub(crate) fn data(&self) -> &[u8] {
        match self {
            IoBuf::Empty => &[],
            IoBuf::Plain(v) => v,
            IoBuf::Aligned(b) => b.data(),
        }
    }

    /// The bytes the kernel transfers.
    fn region(&mut self) -> &mut [u8] {
        match self {
            IoBuf::Empty => &mut [],
            IoBuf::Plain(v) => v,
            IoBuf::Aligned(b) => b.aligned_mut(),
        }
    }

    fn is_direct(&self) -> bool {
        matches!(self, IoBuf::Aligned(_))
    }
}

/// What an [`Op`] asks the kernel to do.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Kind {
    Read,
    Write,
    Fsync,
}

/// The outcome sent back to the waiting future, with the buffer.
pub(crate) type Reply = (io::Result<()>, IoBuf);

/// A request on its way through the ring.
pub(crate) struct Op {
    kind: Kind,
    buf: IoBuf,
    /// File offset of the buffer's first byte.
    offset: u64,
    /// Bytes transferred so far.
    done: usize,
    retries: u32,
    reply: oneshot::Sender<Reply>,
}

/// What to do with an [`Op`] after a completion.
pub(crate) enum Step {
    /// Submit it again (the rest of a short transfer, or a retry).
    Again,
    /// It is finished.
    Done(io::Result<()>),
}

impl Op {
    /// A request transferring `buf` at `offset` (ignored for fsync), and the receiver of its
    /// reply.
    pub(crate) fn new(kind: Kind, buf: IoBuf, offset: u64) -> (Op, oneshot::Receiver<Reply>) {
        let (reply, rx) = oneshot::channel();
        let offset = match &buf {
            IoBuf::Aligned(b) => b.aligned_offset(),
            _ => offset,
        };
        let op = Op {
            kind,
            buf,
            offset,
            done: 0,
            retries: 0,
            reply,
        };
        (op, rx)
    }

    /// The SQE for the part not done yet. The pointer in it points into `self.buf`'s heap
    /// allocation, which does not move when the `Op` itself is moved.
    pub(crate) fn sqe(&mut self, fd: types::Fd) -> squeue::Entry {
        let at = self.offset + self.done as u64;
        let rest = &mut self.buf.region()[self.done..];
        #[allow(clippy::cast_possible_truncation)] // at most MAX_CHUNK (1 GiB)
        let n = rest.len().min(MAX_CHUNK) as u32;
        match self.kind {
            Kind::Read => opcode::Read::new(fd, rest.as_mut_ptr(), n)
                .offset(at)
                .build(),
            Kind::Write => opcode::Write::new(fd, rest.as_ptr(), n).offset(at).build(),
            Kind::Fsync => opcode::Fsync::new(fd)
                .flags(types::FsyncFlags::DATASYNC)
                .build(),
        }
    }

    /// Account for a completion with result `res` (bytes, or a negated errno).
    pub(crate) fn step(&mut self, res: i32) -> Step {
        if res < 0 {
            return self.failed(io::Error::from_raw_os_error(-res));
        }
        let n = res as usize;
        let len = self.buf.region().len();
        match self.kind {
            Kind::Fsync => Step::Done(Ok(())),
            Kind::Read if n == 0 => self.end_of_file(),
            Kind::Write if n == 0 => Step::Done(Err(io::ErrorKind::WriteZero.into())),
            Kind::Read | Kind::Write => {
                self.done += n;
                if self.done >= len {
                    return Step::Done(Ok(()));
                }
                if self.buf.is_direct() && self.done % to_usize(ALIGN) != 0 {
                    // An unaligned `O_DIRECT` transfer cannot go on: a read hit the end of the
                    // file, a write ran out of space.
                    return match self.kind {
                        Kind::Read => self.end_of_file(),
                        _ => Step::Done(Err(io::Error::other("short O_DIRECT write"))),
                    };
                }
                Step::Again
            }
        }
    }

    /// Hand the result and the buffer back to the waiting future, if it still waits.
    pub(crate) fn finish(self, result: io::Result<()>) {
        // A failed send means the future was dropped: the buffer is simply freed here.
        let _ = self.reply.send((result, self.buf));
    }

    /// Fail the request but leak its buffer, which the kernel may still be using (the ring
    /// thread is unwinding with the request in flight).
    pub(crate) fn abandon(self) {
        std::mem::forget(self.buf);
        let err = io::Error::other("the io_uring thread panicked");
        let _ = self.reply.send((Err(err), IoBuf::Empty));
    }

    fn failed(&mut self, err: io::Error) -> Step {
        let transient = matches!(err.raw_os_error(), Some(libc::EINTR | libc::EAGAIN));
        if transient && self.retries < MAX_RETRIES {
            self.retries += 1;
            return Step::Again;
        }
        Step::Done(Err(err))
    }

    /// A read reached the end of the file: the rest reads as zeros.
    fn end_of_file(&mut self) -> Step {
        let done = self.done;
        self.buf.region()[done..].fill(0);
        Step::Done(Ok(()))
    }
}
