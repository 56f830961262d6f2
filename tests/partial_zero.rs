//! Partial-cluster discards and zero-writes over ranges that already read as zeros
//! (unallocated without a backing file, or zero clusters) change nothing: no data cluster is
//! allocated, the file does not grow. Over backing data they still make the range read zeros.

use crate::common;

use std::path::Path;

use qcow2_engine::image::{Image, OpenOptions, ZeroFlags};

const K: u64 = 1024;

/// Our partial discards and zero-writes, each inside one cluster and not covering it.
async fn partial_zeroes(img: &Path, cs: u64) {
    let image = Image::open(img, &OpenOptions::new().writable(true))
        .await
        .unwrap();
    let sub = cs / 16; // a whole subcluster with extended L2 (cs / 32), or more
    image.discard(sub, sub).await.unwrap();
    image.discard(cs + 512, 1000).await.unwrap();
    let keep = ZeroFlags { may_unmap: false };
    let unmap = ZeroFlags { may_unmap: true };
    image.write_zeroes(2 * cs + sub, sub, keep).await.unwrap();
    image
        .write_zeroes(3 * cs + 100, 4 * K, unmap)
        .await
        .unwrap();
    // Inside the zero clusters QEMU made at 16 and 17 clusters.
    image.discard(16 * cs + sub, sub).await.unwrap();
    image.write_zeroes(17 * cs + 7, 3 * K, keep).await.unwrap();
    image.close().await.unwrap();
}

/// Create an image with `opts`, let QEMU make zero clusters at clusters 16 (plain) and 17
/// (preallocated), then run our partial zeroes: the file must not grow and QEMU must read
/// zeros everywhere.
async fn no_allocation(opts: &str, cs: u64) {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("img.qcow2");
    let p = img.to_str().unwrap();
    common::qemu_create(p, opts, "4M");
    let (c16, c17) = (16 * cs, 17 * cs);
    common::qemu_io(
        &img,
        &[
            &format!("write -P 0x77 {c16} {}", 2 * cs),
            &format!("write -z -u {c16} {cs}"),
            &format!("write -z {c17} {cs}"),
        ],
    );
    let before = std::fs::metadata(&img).unwrap().len();
    partial_zeroes(&img, cs).await;
    let after = std::fs::metadata(&img).unwrap().len();
    assert_eq!(
        before,
        after,
        "{opts}: the image grew by {} bytes",
        after - before
    );
    common::assert_check_clean(&img);
    common::qemu_io(&img, &[&format!("read -P 0 0 {}", 18 * cs)]);
}

#[tokio::test]
async fn partial_zero_allocates_nothing_64k() {
    no_allocation("cluster_size=64k", 64 * K).await;
}

#[tokio::test]
async fn partial_zero_allocates_nothing_extended_l2() {
    no_allocation("cluster_size=64k,extended_l2=on", 64 * K).await;
}

#[tokio::test]
async fn partial_zero_allocates_nothing_v2() {
    // v2 has no zero flag: QEMU's write -z on v2 writes zeros; the test still holds.
    no_allocation("cluster_size=64k,compat=0.10", 64 * K).await;
}

/// Over a backing file the same partial ranges must read zeros afterwards (the backing data
/// must not show through), and the rest of each cluster still reads the backing data.
#[tokio::test]
async fn partial_zero_over_backing_reads_zeros() {
    for opts in ["cluster_size=64k", "cluster_size=64k,extended_l2=on"] {
        let cs = 64 * K;
        let dir = tempfile::tempdir().unwrap();
        let base = common::path_in(dir.path(), "base.raw");
        std::fs::write(&base, vec![0xaau8; (20 * cs) as usize]).unwrap();
        // Named relatively: the library's default reference policy refuses absolute names.
        let img = dir.path().join("img.qcow2");
        let p = img.to_str().unwrap();
        common::run(
            "qemu-img",
            &[
                "create", "-q", "-f", "qcow2", "-o", opts, "-b", "base.raw", "-F", "raw", p,
            ],
        );
        partial_zeroes(&img, cs).await;
        common::assert_check_clean(&img);
        let sub = cs / 16;
        let mut want = vec![0xaau8; (20 * cs) as usize];
        for (o, l) in [
            (sub, sub),
            (cs + 512, 1000),
            (2 * cs + sub, sub),
            (3 * cs + 100, 4 * K),
            (16 * cs + sub, sub),
            (17 * cs + 7, 3 * K),
        ] {
            want[o as usize..(o + l) as usize].fill(0);
        }
        let got = common::qemu_raw(&img);
        let d = common::first_difference(&got, &want);
        assert!(d.is_none(), "{opts}: QEMU reads a difference at {d:?}");
    }
}
