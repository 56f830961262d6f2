//! The fast paths, checked against QEMU: growing the file ahead of allocations, multi-cluster
//! writes in runs (one IO per run), and `convert` with `-m`/`-W` and parallel compression.

use crate::common;

use std::path::Path;

use qcow2_engine::image::{Image, OpenOptions, ReferencePolicy};
use rand::{RngCore, SeedableRng, rngs::StdRng};

fn len(p: &Path) -> u64 {
    std::fs::metadata(p).unwrap().len()
}

/// `image-end-offset` from `qemu-img check --output=json`.
fn end_offset(img: &Path) -> u64 {
    let out = common::run(
        "qemu-img",
        &["check", "--output=json", img.to_str().unwrap()],
    );
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    v["image-end-offset"].as_u64().unwrap()
}

/// While open, the file is grown ahead of the allocations; a copy taken then (what a crash
/// would leave) checks clean under QEMU; after close the file is trimmed back to its last
/// cluster in use.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn growing_ahead_keeps_refcounts_right_and_close_trims() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("a.qcow2");
    common::qemu_create(&img, "", "256M");
    let image = Image::open(&img, &OpenOptions::new().writable(true))
        .await
        .unwrap();
    let mut shadow = vec![0u8; 8 << 20];
    StdRng::seed_from_u64(5).fill_bytes(&mut shadow);
    for (i, piece) in shadow.chunks(64 << 10).enumerate() {
        image.write_at(piece, (i as u64) << 20).await.unwrap();
    }
    image.flush().await.unwrap();
    let copy = dir.path().join("crashed.qcow2");
    std::fs::copy(&img, &copy).unwrap();
    common::assert_check_clean(&copy);
    assert!(
        len(&copy) >= end_offset(&copy) + (4 << 20),
        "the file was not grown ahead: {} bytes, {} in use",
        len(&copy),
        end_offset(&copy)
    );
    image.close().await.unwrap();
    common::assert_check_clean(&img);
    assert_eq!(len(&img), end_offset(&img), "close did not trim the file");
    let got = common::qemu_raw(&img);
    for (i, piece) in shadow.chunks(64 << 10).enumerate() {
        let at = i << 20;
        assert_eq!(&got[at..at + piece.len()], piece, "cluster at {at}");
    }
}

/// Large writes across every kind of mapping (allocated, zero with and without a host
/// cluster, compressed, backing, unallocated) leave what QEMU reads equal to a shadow copy,
/// and the image clean: runs of allocated clusters go in place, runs needing new clusters are
/// allocated together, and the rest fall back to one cluster at a time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn multi_cluster_writes_over_mixed_mappings_match_qemu() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base.qcow2");
    common::qemu_create(&base, "", "16M");
    common::qemu_io(&base, &["write -P 0x11 0 16M"]);
    for opts in ["", "extended_l2=on", "cluster_size=4096"] {
        let ours = dir.path().join("ours.qcow2");
        let before = dir.path().join("before.qcow2");
        let mut o = format!("backing_file={},backing_fmt=qcow2", base.display());
        if !opts.is_empty() {
            o = format!("{o},{opts}");
        }
        common::qemu_create(&ours, &o, "16M");
        // Every mapping kind, clusters apart: data, zero (allocated and not), compressed.
        common::qemu_io(
            &ours,
            &[
                "write -P 0x22 0 1M",
                "write -z 1M 256k",
                "write -P 0x33 2M 512k",
                "write -z 2M 256k",
                "write -c -P 0x44 3M 64k",
                "write -P 0x55 5M 8k",
            ],
        );
        std::fs::copy(&ours, &before).unwrap();
        let mut data = vec![0u8; 7 << 20];
        StdRng::seed_from_u64(9).fill_bytes(&mut data);
        let open = OpenOptions::new()
            .writable(true)
            .references(ReferencePolicy::Any);
        let image = Image::open(&ours, &open).await.unwrap();
        // Cluster-aligned and not, so runs start at both.
        image.write_at(&data[..6 << 20], 512 << 10).await.unwrap();
        image
            .write_at(&data[6 << 20..], (9 << 20) + 4096)
            .await
            .unwrap();
        image.close().await.unwrap();
        // The oracle: QEMU's view of the image before the writes, with the writes applied.
        let mut expect = common::qemu_raw(&before);
        expect[512 << 10..(512 << 10) + (6 << 20)].copy_from_slice(&data[..6 << 20]);
        let at = (9 << 20) + 4096;
        expect[at..at + (1 << 20)].copy_from_slice(&data[6 << 20..]);
        common::assert_check_clean(&ours);
        let got = common::qemu_raw(&ours);
        assert_eq!(
            common::first_difference(&got, &expect),
            None,
            "{opts}: content differs"
        );
    }
}

/// `convert -c` output is the same whatever `-m` is (compression runs on all cores, writes in
/// order), and with `-W` it still holds the source's bytes.
#[test]
fn parallel_compressed_convert_is_deterministic() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src.raw");
    let mut data = vec![0u8; 6 << 20];
    let mut rng = StdRng::seed_from_u64(3);
    for (i, c) in data.chunks_mut(64 << 10).enumerate() {
        match i % 4 {
            0 => rng.fill_bytes(c),
            1 => c.fill(b'x'),
            2 => {}
            _ => {
                rng.fill_bytes(&mut c[..16 << 10]);
            }
        }
    }
    std::fs::write(&src, &data).unwrap();
    let s = src.to_str().unwrap();
    for codec in ["zlib", "zstd"] {
        let mut outputs = Vec::new();
        for m in ["1", "8", "16"] {
            let out = dir.path().join(format!("{codec}-{m}.qcow2"));
            let o = out.to_str().unwrap();
            let ct = format!("compression_type={codec}");
            common::qcow2_ok(&[
                "convert", "-c", "-m", m, "-o", &ct, "-O", "qcow2", "-f", "raw", s, o,
            ]);
            common::assert_check_clean(&out);
            common::run("qemu-img", &["compare", "-f", "raw", "-F", "qcow2", s, o]);
            outputs.push(std::fs::read(&out).unwrap());
        }
        assert!(
            outputs.windows(2).all(|w| w[0] == w[1]),
            "{codec}: -m changed the output"
        );
        let out = dir.path().join(format!("{codec}-W.qcow2"));
        let o = out.to_str().unwrap();
        let ct = format!("compression_type={codec}");
        common::qcow2_ok(&[
            "convert", "-c", "-W", "-o", &ct, "-O", "qcow2", "-f", "raw", s, o,
        ]);
        common::assert_check_clean(&out);
        common::run("qemu-img", &["compare", "-f", "raw", "-F", "qcow2", s, o]);
    }
    // Uncompressed, out of order, into a qcow2 and a raw destination.
    for fmt in ["qcow2", "raw"] {
        let out = dir.path().join(format!("plain.{fmt}"));
        let o = out.to_str().unwrap();
        common::qcow2_ok(&["convert", "-W", "-m", "16", "-O", fmt, "-f", "raw", s, o]);
        common::run("qemu-img", &["compare", "-f", "raw", "-F", fmt, s, o]);
    }
}
