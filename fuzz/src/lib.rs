//! The bodies of the cargo-fuzz targets in `fuzz_targets/`, one module per target.
//!
//! They live in a library (not in the target files) so that `tests/fuzz_regressions.rs` in the
//! main package can include this directory with `#[path]` and replay every finding under plain
//! `cargo test`, without nightly or libFuzzer. They depend only on `qcow2_engine`,
//! `qcow2_nbd` (with its `fuzzing` feature) and `tokio`, which both packages have.
//!
//! Every target feeds untrusted bytes to the library through [`capped::CappedStorage`], so a
//! hostile offset fails with `EFBIG` instead of growing a vector until the process dies.

pub mod capped;
pub mod check_repair;
pub mod image_bytes;
pub mod image_rw;
pub mod input;
pub mod nbd_proto;
pub mod nbd_server;
pub mod parsers;
pub mod shadow;

use std::future::Future;

/// Run `fut` on a fresh single-threaded runtime. One thread keeps a run deterministic, so a
/// crash input replays the same way.
pub fn block_on<F: Future>(fut: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("building a tokio runtime")
        .block_on(fut)
}
