//! Images left dirty by QEMU (lazy refcounts, process killed): a read-only open changes no byte
//! and reads the right data; a read-write open rebuilds the refcounts first, so that after
//! our writes and close `qemu-img check` is clean and the dirty flag is gone.

use crate::common;

use std::path::{Path, PathBuf};

use qcow2_engine::image::{Image, OpenOptions};

const MIB: usize = 1 << 20;

/// A 64 MiB lazy-refcounts image that qemu-io wrote to and then died on (no clean close).
fn dirty_image(dir: &Path) -> PathBuf {
    let img = dir.join("lazy.qcow2");
    let p = img.to_str().unwrap();
    common::qemu_create(p, "lazy_refcounts=on,cluster_size=65536", "64M");
    // Kill qemu-io itself with SIGKILL: the image is never marked clean.
    let (code, out) = common::status(
        "qemu-io",
        &[
            "-c",
            "write -P 1 0 1M",
            "-c",
            "write -P 2 8M 192k",
            "-c",
            "flush",
            "-c",
            "write -P 3 20M 64k",
            "-c",
            "sigraise 9",
            p,
        ],
    );
    assert_ne!(code, 0, "qemu-io should have died: {out}");
    assert!(dirty_flag(&img), "the dirty flag must be set");
    img
}

/// `qemu-img info`'s `dirty-flag`.
fn dirty_flag(img: &Path) -> bool {
    let out = common::run(
        "qemu-img",
        &["info", "-U", "--output=json", img.to_str().unwrap()],
    );
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    v["dirty-flag"].as_bool().unwrap()
}

async fn read_all(img: &Image) -> Vec<u8> {
    let mut buf = vec![0u8; img.virtual_size() as usize];
    img.read_at(&mut buf, 0).await.unwrap();
    buf
}

#[tokio::test]
async fn read_only_open_of_a_dirty_image_writes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let img = dirty_image(dir.path());
    let before = std::fs::read(&img).unwrap();
    let want = common::qemu_raw(&img);
    let image = Image::open(&img, &OpenOptions::new()).await.unwrap();
    let got = read_all(&image).await;
    assert_eq!(common::first_difference(&got, &want), None);
    assert!(got[..MIB].iter().all(|&b| b == 1));
    image.flush().await.unwrap();
    drop(image);
    assert!(std::fs::read(&img).unwrap() == before, "no byte changed");
    assert!(dirty_flag(&img));
}

#[tokio::test]
async fn read_write_open_rebuilds_refcounts() {
    let dir = tempfile::tempdir().unwrap();
    let img = dirty_image(dir.path());
    let mut shadow = common::qemu_raw(&img);
    let image = Image::open(&img, &OpenOptions::new().writable(true))
        .await
        .unwrap();
    assert_eq!(read_all(&image).await, shadow, "reads before writing");
    // Overwrite QEMU's data in place and allocate new clusters.
    for (off, len, byte) in [(512 * 1024, MIB, 7u8), (30 * MIB, 3 * MIB, 8), (0, 4096, 9)] {
        image.write_at(&vec![byte; len], off as u64).await.unwrap();
        shadow[off..off + len].fill(byte);
    }
    image.close().await.unwrap();
    drop(image);
    common::assert_check_clean(&img);
    assert!(!dirty_flag(&img), "the dirty flag is cleared");
    assert_eq!(
        common::first_difference(&common::qemu_raw(&img), &shadow),
        None
    );
}
