//! Whole-image operations on backing chains and headers, as qemu-img's commands: commit,
//! rebase and amend.
//!
//! Each is an async function taking the image's path and an options struct (with a
//! `_blocking` twin under the `blocking` feature). They report progress and can be cancelled
//! through a shared [`Progress`]; dropping the future cancels too (the work stops at its next
//! step and closes its images). Each keeps the crash-safety order its module documents.

pub mod amend;
mod chain;
pub mod commit;
mod progress;
pub mod rebase;
mod throttle;

pub use progress::Progress;
pub use throttle::Throttle;
