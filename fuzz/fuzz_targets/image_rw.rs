//! cargo-fuzz entry point; the body lives in `src/image_rw.rs` so that `cargo test` can replay
//! findings (tests/fuzz_regressions.rs).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| qcow2_fuzz::image_rw::run(data));
