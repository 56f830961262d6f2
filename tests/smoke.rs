use crate::common;

use qcow2_engine::image::{Image, OpenOptions};

#[tokio::test]
async fn reads_a_qemu_image() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("a.qcow2");
    let p = img.to_str().unwrap();
    common::qemu_create(p, "", "4M");
    common::qemu_io(
        p,
        &[
            "write -P 0xab 0 64k",
            "write -P 0x11 1M 100k",
            "write -z 96k 64k",
        ],
    );
    let want = common::qemu_raw(&img);
    let image = Image::open(&img, &OpenOptions::new()).await.unwrap();
    let mut got = vec![0u8; want.len()];
    image.read_at(&mut got, 0).await.unwrap();
    assert_eq!(common::first_difference(&got, &want), None);
}

#[tokio::test]
async fn writes_and_checks_clean() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("w.qcow2");
    let p = img.to_str().unwrap();
    common::qemu_create(p, "", "8M");
    let image = Image::open(&img, &OpenOptions::new().writable(true))
        .await
        .unwrap();
    let mut shadow = vec![0u8; 8 << 20];
    for (i, (off, len)) in [
        (0u64, 4096usize),
        (70_000, 100_000),
        (3 << 20, 65536),
        (5_000_000, 7),
    ]
    .iter()
    .enumerate()
    {
        let data = vec![i as u8 + 1; *len];
        image.write_at(&data, *off).await.unwrap();
        shadow[*off as usize..*off as usize + len].copy_from_slice(&data);
    }
    image.discard(3 << 20, 65536).await.unwrap();
    shadow[3 << 20..(3 << 20) + 65536].fill(0);
    let mut got = vec![0u8; 8 << 20];
    image.read_at(&mut got, 0).await.unwrap();
    assert_eq!(common::first_difference(&got, &shadow), None);
    image.close().await.unwrap();
    let err = image.write_at(&[1], 0).await.unwrap_err();
    assert_eq!(
        err.kind(),
        qcow2_engine::ErrorKind::InvalidArgument,
        "{err}"
    );
    drop(image);
    common::assert_check_clean(&img);
    assert_eq!(
        common::first_difference(&common::qemu_raw(&img), &shadow),
        None
    );
}

#[tokio::test]
async fn encrypted_images_open_for_info_but_refuse_data_access() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("enc.qcow2");
    let p = img.to_str().unwrap();
    common::run(
        "qemu-img",
        &[
            "create",
            "-q",
            "--object",
            "secret,id=sec0,data=123456",
            "-f",
            "qcow2",
            "-o",
            "encrypt.format=luks,encrypt.key-secret=sec0",
            p,
            "1M",
        ],
    );
    let image = Image::open(&img, &OpenOptions::new()).await.unwrap();
    assert!(image.is_encrypted());
    assert_eq!(image.virtual_size(), 1 << 20);
    let mut buf = [0u8; 512];
    let err = image.read_at(&mut buf, 0).await.unwrap_err();
    assert_eq!(
        err.kind(),
        qcow2_engine::ErrorKind::InvalidArgument,
        "{err}"
    );
    assert!(err.to_string().contains("key secret"), "{err}");
    // A read-only holder keeps writers out (image locks): let go first.
    drop(image);
    let err = Image::open(&img, &OpenOptions::new().writable(true))
        .await
        .unwrap_err();
    assert_eq!(
        err.kind(),
        qcow2_engine::ErrorKind::InvalidArgument,
        "{err}"
    );
    assert!(err.to_string().contains("key secret"), "{err}");
}

#[tokio::test]
async fn backing_loops_and_overlong_chains_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let a = dir.path().join("a.qcow2");
    let b = dir.path().join("b.qcow2");
    common::qemu_create(&a, "", "1M");
    common::qemu_overlay("a.qcow2", "qcow2", b.to_str().unwrap());
    // Point a at b: a -> b -> a.
    common::run(
        "qemu-img",
        &[
            "rebase",
            "-u",
            "-b",
            "b.qcow2",
            "-F",
            "qcow2",
            a.to_str().unwrap(),
        ],
    );
    let err = Image::open(&b, &OpenOptions::new()).await.unwrap_err();
    assert!(err.to_string().contains("loop"), "{err}");

    // A chain of 5 with a depth limit of 3.
    let mut prev = dir.path().join("c0.qcow2");
    common::qemu_create(&prev, "", "1M");
    for i in 1..5 {
        let next = dir.path().join(format!("c{i}.qcow2"));
        let name = prev.file_name().unwrap().to_str().unwrap();
        common::qemu_overlay(name, "qcow2", next.to_str().unwrap());
        prev = next;
    }
    let err = Image::open(&prev, &OpenOptions::new().max_chain_depth(3))
        .await
        .unwrap_err();
    assert!(err.to_string().contains("backing chain longer"), "{err}");
    let ok = Image::open(&prev, &OpenOptions::new()).await.unwrap();
    let mut buf = [1u8; 512];
    ok.read_at(&mut buf, 0).await.unwrap();
    assert_eq!(buf, [0u8; 512]);
}
