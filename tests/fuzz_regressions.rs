//! The fuzz targets' bodies (fuzz/src, see README "Fuzzing") under plain `cargo test`: first
//! on images qemu-img made (their oracles must hold on valid input), then one test per input a
//! fuzzer found crashing, named after what went wrong, with the target that found it.

use crate::common;

#[allow(dead_code)]
#[path = "../fuzz/src/lib.rs"]
mod fuzz;

use std::path::Path;

/// A small qemu-img image with data, zeros, a compressed cluster and a discard.
fn qemu_image(dir: &Path, name: &str, opts: &str) -> Vec<u8> {
    let p = dir.join(name);
    let ps = p.to_str().unwrap();
    common::qemu_create(ps, opts, "1M");
    common::qemu_io(
        ps,
        &[
            "write -P 0x11 0 6k",
            "write -z 16k 4k",
            "write -c -P 0x22 64k 16k",
            "discard 4k 4k",
        ],
    );
    std::fs::read(&p).unwrap()
}

#[test]
fn every_target_accepts_qemu_images() {
    let dir = tempfile::tempdir().unwrap();
    let images = [
        qemu_image(dir.path(), "a", "cluster_size=4096"),
        qemu_image(
            dir.path(),
            "b",
            "cluster_size=4096,refcount_bits=1,compression_type=zstd",
        ),
        qemu_image(dir.path(), "c", "cluster_size=16384,extended_l2=on"),
    ];
    for img in &images {
        fuzz::image_bytes::run(img);
        fuzz::check_repair::run(img);
        for script in 0u8..4 {
            let mut input: Vec<u8> = (0u8..16).map(|i| i.wrapping_mul(37) ^ script).collect();
            input.extend_from_slice(img);
            fuzz::image_rw::run(&input);
        }
        let mut header = vec![1u8];
        header.extend_from_slice(&img[..4096]);
        fuzz::parsers::run(&header);
    }
    // NBD: canned handshake, framed requests (writes, reads, trims, zeroes, block status).
    let records: Vec<u8> = (0u32..40)
        .flat_map(|i| {
            let mut r = vec![i as u8, (i * 7) as u8];
            r.extend((i * 40_000).to_be_bytes());
            r.extend((i * 3000 + 1).to_be_bytes());
            r
        })
        .collect();
    for cfg in [0x05u8, 0x07, 0x25, 0x2d, 0x35, 0x3d] {
        let mut input = vec![cfg];
        input.extend_from_slice(&records);
        fuzz::nbd_server::run(&input);
    }
}

/// Replay one input: `QCOW2_FUZZ_REPLAY=TARGET:FILE cargo test --test fuzz_regressions replay
/// -- --ignored --nocapture` (add `QCOW2_FUZZ_TRACE=1` for the image_rw script).
#[test]
#[ignore = "manual: replays the input named by QCOW2_FUZZ_REPLAY"]
fn replay() {
    let spec = std::env::var("QCOW2_FUZZ_REPLAY").expect("QCOW2_FUZZ_REPLAY=TARGET:FILE");
    let (target, file) = spec.split_once(':').expect("TARGET:FILE");
    run_target(target, &std::fs::read(file).unwrap());
}

/// Run the body of the target named `target` on `data`.
fn run_target(target: &str, data: &[u8]) {
    match target {
        "image_bytes" => fuzz::image_bytes::run(data),
        "image_rw" => fuzz::image_rw::run(data),
        "check_repair" => fuzz::check_repair::run(data),
        "nbd_server" => fuzz::nbd_server::run(data),
        "parsers" => fuzz::parsers::run(data),
        _ => panic!("no target {target}"),
    }
}

/// Found by `image_rw` (libFuzzer, mutated 512-byte-cluster qemu-img image): refcount table
/// entry 0 is 0, so the header cluster has no refcount block; the first allocating write
/// panicked the allocator with `expect("just set")` (src/alloc/mod.rs). Fixed with the
/// metadata overlap checks: the allocation now fails with an error and marks the image corrupt.
#[test]
fn refcount_table_entry_zero_does_not_panic_the_allocator() {
    fuzz::image_rw::run(include_bytes!(
        "fuzz_inputs/image_rw-refcount-table-entry0-zero"
    ));
}

/// Found by `parsers` in a CI smoke run: a header naming an empty backing file at offset 3.
/// The encoder moves the name to after the extensions, so the first encoding differs from the
/// input; the oracle now requires a fixed point from the first encoding on.
#[test]
fn empty_backing_name_at_an_odd_offset_round_trips() {
    fuzz::parsers::run(include_bytes!(
        "fuzz_inputs/parsers-backing-name-offset-empty"
    ));
}
