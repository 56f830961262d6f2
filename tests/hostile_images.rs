//! Hostile input: valid QEMU images with random bytes of their metadata corrupted must give
//! errors, never a panic, a hang or an unbounded allocation — through open, read, map,
//! writes + flush, and check. Seeds are printed; `QCOW2_TEST_SEED=<n>` replays a run.

use crate::common;

use std::sync::Arc;
use std::time::Duration;

use qcow2_engine::Storage;
use qcow2_engine::image::{Image, OpenOptions, ZeroFlags};
use qcow2_engine::storage::MemoryStorage;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// Header fields worth hitting on purpose: (offset, size).
const HEADER_FIELDS: &[(usize, usize)] = &[
    (4, 4),   // version
    (8, 8),   // backing_file_offset
    (16, 4),  // backing_file_size
    (20, 4),  // cluster_bits
    (24, 8),  // size
    (32, 4),  // crypt_method
    (36, 4),  // l1_size
    (40, 8),  // l1_table_offset
    (48, 8),  // refcount_table_offset
    (56, 4),  // refcount_table_clusters
    (60, 4),  // nb_snapshots
    (64, 8),  // snapshots_offset
    (72, 8),  // incompatible_features
    (88, 8),  // autoclear_features
    (96, 4),  // refcount_order
    (100, 4), // header_length
    (104, 1), // compression_type
];

fn fixture(dir: &std::path::Path, name: &str, create: &[&str], io: &[&str]) -> Vec<u8> {
    let p = dir.join(name);
    let ps = p.to_str().unwrap();
    let mut args = vec!["create", "-q", "-f", "qcow2"];
    args.extend_from_slice(create);
    args.extend_from_slice(&[ps, "4M"]);
    common::run("qemu-img", &args);
    let mut io_args = vec![];
    for c in io {
        io_args.extend_from_slice(&["-c", c]);
    }
    io_args.push(ps);
    common::run("qemu-io", &io_args);
    std::fs::read(&p).unwrap()
}

fn mutate(rng: &mut StdRng, img: &mut [u8]) {
    let meta_end = img.len().min(512 << 10);
    let header_too = rng.gen_bool(0.3);
    for _ in 0..rng.gen_range(1..=6) {
        if header_too && rng.gen_bool(0.5) {
            let (off, size) = HEADER_FIELDS[rng.gen_range(0..HEADER_FIELDS.len())];
            let v: u64 = match rng.gen_range(0..4) {
                0 => 0,
                1 => u64::MAX,
                2 => rng.gen_range(0..4096),
                _ => rng.r#gen(),
            };
            img[off..off + size].copy_from_slice(&v.to_be_bytes()[8 - size..]);
        } else {
            // Past the header fields: tables, extensions, refcounts, compressed data.
            let at = rng.gen_range(112..meta_end);
            img[at] = rng.r#gen();
        }
    }
}

/// Exercise the image the way a user would; any error is fine, panics are not. Returns
/// whether the image opened (to make sure the test reaches past the header checks).
async fn exercise(bytes: Vec<u8>) -> bool {
    let storage: Arc<dyn Storage> = Arc::new(MemoryStorage::from_vec(bytes.clone()));
    let ro = OpenOptions::new().follow_backing(false);
    let opened = Image::open_storage(storage.clone(), &ro).await;
    let ok = opened.is_ok();
    if let Ok(img) = opened {
        let size = img.virtual_size();
        let mut buf = vec![0u8; (size.min(1 << 20)) as usize];
        let _ = img.read_at(&mut buf, 0).await;
        let _ = img.map(0, size.min(64 << 20)).await;
    }
    let rw: Arc<dyn Storage> = Arc::new(MemoryStorage::from_vec(bytes.clone()));
    if let Ok(img) =
        Image::open_storage(rw, &OpenOptions::new().follow_backing(false).writable(true)).await
    {
        let size = img.virtual_size();
        if size >= 8192 {
            let _ = img.write_at(&[0x5a; 3000], 1000).await;
            let _ = img
                .write_zeroes(0, 4096, ZeroFlags { may_unmap: true })
                .await;
            let _ = img.discard(size / 2 / 512 * 512, 512).await;
        }
        let _ = img.close().await;
    }
    let _ = qcow2_engine::check::check(storage, &Default::default()).await;
    ok
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn corrupted_images_never_panic_or_hang() {
    let dir = tempfile::tempdir().unwrap();
    let fixtures = [
        fixture(
            dir.path(),
            "a.qcow2",
            &["-o", "cluster_size=4096"],
            &[
                "write -P 1 0 300k",
                "write -z 1M 64k",
                "write -c -P 2 2M 4k",
            ],
        ),
        fixture(
            dir.path(),
            "b.qcow2",
            &["-o", "cluster_size=65536,extended_l2=on"],
            &["write -P 3 4k 8k", "write -z 64k 32k"],
        ),
        fixture(
            dir.path(),
            "c.qcow2",
            &[
                "-o",
                "cluster_size=512,refcount_bits=1,compression_type=zstd",
            ],
            &["write -P 4 0 40k", "write -c -P 5 64k 512"],
        ),
        fixture(
            dir.path(),
            "d.qcow2",
            &["-o", "compat=0.10,cluster_size=1024"],
            &["write -P 6 0 100k"],
        ),
    ];
    let seed: u64 = std::env::var("QCOW2_TEST_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(rand::random);
    eprintln!("QCOW2_TEST_SEED={seed}");
    let mut rng = StdRng::seed_from_u64(seed);
    let mut opened = 0;
    for round in 0..400 {
        let mut img = fixtures[round % fixtures.len()].clone();
        mutate(&mut rng, &mut img);
        let task = tokio::spawn(exercise(img));
        match tokio::time::timeout(Duration::from_secs(20), task).await {
            Err(_) => panic!("QCOW2_TEST_SEED={seed} round {round}: hang"),
            Ok(Err(e)) if e.is_panic() => {
                panic!("QCOW2_TEST_SEED={seed} round {round}: panic: {e:?}")
            }
            Ok(Ok(true)) => opened += 1,
            _ => {}
        }
    }
    eprintln!("{opened} of 400 corrupted images opened");
    assert!(
        opened > 100,
        "most mutations should get past open: {opened}"
    );
}
