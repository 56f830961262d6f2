//! External data files: guest data lives at host offset == guest offset in the data file, and
//! data clusters are never refcounted (in the metadata file or anywhere else).
//!
//! QEMU writes first, then ours runs concurrent random writes, zero-writes and discards
//! against a shadow, then QEMU writes again; QEMU must read the shadow back, `qemu-img check`
//! must be clean and QEMU must never mark the image corrupt. With `data_file_raw=on` the data
//! file itself must equal the shadow. Our `check` must flag a mapping that breaks
//! host == guest.

use crate::common;

use std::path::Path;
use std::sync::{Arc, Mutex};

use qcow2_engine::image::{Image, OpenOptions, ReferencePolicy, ZeroFlags};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

const SIZE: u64 = 8 << 20;

/// The shadow disk and the guest ranges of requests in flight (they never overlap).
struct Model {
    shadow: Mutex<Vec<u8>>,
    busy: Mutex<Vec<(u64, u64)>>,
}

impl Model {
    fn try_reserve(&self, off: u64, len: u64) -> bool {
        let mut busy = self.busy.lock().unwrap();
        if busy.iter().any(|&(s, e)| off < e && s < off + len) {
            return false;
        }
        busy.push((off, off + len));
        true
    }

    fn release(&self, off: u64) {
        let mut busy = self.busy.lock().unwrap();
        let i = busy.iter().position(|&(s, _)| s == off).unwrap();
        busy.swap_remove(i);
    }
}

/// QEMU's writes, mirrored into the shadow: patterns, zero-writes and discards.
fn qemu_writes(img: &Path, shadow: &mut [u8], salt: u8) {
    let pat = |p: u8| p.wrapping_add(salt) | 1;
    let cmds = [
        format!("write -P {} 0 192k", pat(0x11)),
        format!("write -P {} 1000k 70k", pat(0x22)),
        format!("write -P {} 3m 1m", pat(0x33)),
        "write -z 3200k 64k".to_string(),
        "discard 3392k 128k".to_string(),
        format!("write -P {} 7m 4k", pat(0x44)),
    ];
    let cmds: Vec<&str> = cmds.iter().map(String::as_str).collect();
    common::qemu_io(img, &cmds);
    let k = 1024usize;
    shadow[..192 * k].fill(pat(0x11));
    shadow[1000 * k..1070 * k].fill(pat(0x22));
    shadow[3072 * k..4096 * k].fill(pat(0x33));
    shadow[3200 * k..3264 * k].fill(0);
    shadow[3392 * k..3520 * k].fill(0);
    shadow[7168 * k..7172 * k].fill(pat(0x44));
}

fn pick_len(rng: &mut StdRng) -> u64 {
    match rng.gen_range(0..4) {
        0 => rng.gen_range(1..=4096),
        1 => rng.gen_range(1..=65536),
        2 => 4096 * rng.gen_range(1..=64),
        _ => rng.gen_range(1..=300_000),
    }
}

/// One task of random writes, zero-writes, discards and reads against the shadow.
async fn task(img: Image, model: Arc<Model>, seed: u64) {
    let mut rng = StdRng::seed_from_u64(seed);
    for _ in 0..50 {
        let len = pick_len(&mut rng);
        let mut off = rng.gen_range(0..=SIZE - len);
        if rng.gen_bool(0.3) {
            off &= !4095;
        }
        if !model.try_reserve(off, len) {
            tokio::task::yield_now().await;
            continue;
        }
        let (o, l) = (off as usize, len as usize);
        match rng.gen_range(0..100) {
            0..=49 => {
                let base = (seed as usize).wrapping_mul(31).wrapping_add(o);
                let data: Vec<u8> = (0..l).map(|i| base.wrapping_add(i) as u8 | 1).collect();
                img.write_at(&data, off).await.unwrap();
                model.shadow.lock().unwrap()[o..o + l].copy_from_slice(&data);
            }
            50..=64 => {
                let may_unmap = rng.gen_bool(0.5);
                img.write_zeroes(off, len, ZeroFlags { may_unmap })
                    .await
                    .unwrap();
                model.shadow.lock().unwrap()[o..o + l].fill(0);
            }
            65..=79 => {
                img.discard(off, len).await.unwrap();
                model.shadow.lock().unwrap()[o..o + l].fill(0);
            }
            80..=95 => {
                let mut buf = vec![0u8; l];
                img.read_at(&mut buf, off).await.unwrap();
                let want = model.shadow.lock().unwrap()[o..o + l].to_vec();
                let d = common::first_difference(&buf, &want);
                assert!(
                    d.is_none(),
                    "seed {seed}: read {off}+{len} differs at {d:?}"
                );
            }
            _ => img.flush().await.unwrap(),
        }
        model.release(off);
    }
}

/// Our random workload: 6 concurrent tasks, a small cache.
async fn our_writes(img_path: &Path, shadow: Vec<u8>, seed: u64) -> Vec<u8> {
    // Our own test image names its data file by an absolute path: trust it.
    let opts = OpenOptions::new()
        .writable(true)
        .references(ReferencePolicy::Any)
        .writable_data_file(true)
        .slice_size(512)
        .l2_cache_bytes(4 * 512)
        .refcount_cache_bytes(4 * 512);
    let img = Image::open(img_path, &opts).await.unwrap();
    let model = Arc::new(Model {
        shadow: Mutex::new(shadow),
        busy: Mutex::new(Vec::new()),
    });
    let handles: Vec<_> = (0..6)
        .map(|t| {
            tokio::spawn(task(
                img.clone(),
                model.clone(),
                seed.wrapping_mul(100).wrapping_add(t),
            ))
        })
        .collect();
    for h in handles {
        h.await.unwrap_or_else(|e| panic!("seed {seed}: {e}"));
    }
    img.close().await.unwrap();
    model.shadow.lock().unwrap().clone()
}

/// QEMU reads `shadow` back, finds the image clean and not corrupt; with a raw data file,
/// the data file alone equals `shadow`.
fn verify(img: &Path, data: &Path, shadow: &[u8], raw: bool, what: &str) {
    let (code, out) = common::status("qemu-img", &["check", img.to_str().unwrap()]);
    assert_eq!(code, 0, "{what}: qemu-img check:\n{out}");
    let info = common::run("qemu-img", &["info", img.to_str().unwrap()]);
    assert!(!info.contains("corrupt: true"), "{what}: {info}");
    let got = common::qemu_raw(img);
    let d = common::first_difference(&got, shadow);
    assert!(d.is_none(), "{what}: QEMU reads a difference at {d:?}");
    if raw {
        let file = std::fs::read(data).unwrap();
        let d = common::first_difference(&file[..shadow.len()], shadow);
        assert!(d.is_none(), "{what}: raw data file differs at {d:?}");
    }
}

async fn data_file_roundtrip(extra: &str, raw: bool) {
    let seed: u64 = std::env::var("QCOW2_TEST_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(rand::random);
    eprintln!("QCOW2_TEST_SEED={seed}");
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("img.qcow2");
    let data = dir.path().join("img.data");
    let opts = format!("data_file={}{extra}", data.display());
    let size = SIZE.to_string();
    common::qemu_create(&img, &opts, &size);
    let mut shadow = vec![0u8; SIZE as usize];
    qemu_writes(&img, &mut shadow, 0);
    let mut shadow = our_writes(&img, shadow, seed).await;
    verify(
        &img,
        &data,
        &shadow,
        raw,
        &format!("after ours, seed {seed}"),
    );
    qemu_writes(&img, &mut shadow, 0x40);
    verify(
        &img,
        &data,
        &shadow,
        raw,
        &format!("after QEMU, seed {seed}"),
    );
    let shadow = our_writes(&img, shadow, seed.wrapping_add(1)).await;
    verify(
        &img,
        &data,
        &shadow,
        raw,
        &format!("after ours again, seed {seed}"),
    );
    // Our own check agrees.
    let r = common::qcow2(&["check", img.to_str().unwrap()]);
    assert_eq!(r.code, 0, "qcow2 check:\n{}{}", r.stdout, r.stderr);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn data_file_not_raw() {
    data_file_roundtrip("", false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn data_file_raw() {
    data_file_roundtrip(",data_file_raw=on", true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn data_file_extended_l2() {
    data_file_roundtrip(",extended_l2=on,cluster_size=32k", false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn data_file_raw_extended_l2() {
    data_file_roundtrip(",data_file_raw=on,extended_l2=on", true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn data_file_raw_small_clusters() {
    data_file_roundtrip(",data_file_raw=on,cluster_size=4k", true).await;
}

/// Read the big-endian u64 at `off` of `f`.
fn be_u64_at(f: &Path, off: u64) -> u64 {
    let b = std::fs::read(f).unwrap();
    let o = off as usize;
    u64::from_be_bytes(b[o..o + 8].try_into().unwrap())
}

/// Write the big-endian u64 `v` at `off` of `f`.
fn put_be_u64(f: &Path, off: u64, v: u64) {
    use std::os::unix::fs::FileExt;
    let file = std::fs::OpenOptions::new().write(true).open(f).unwrap();
    file.write_all_at(&v.to_be_bytes(), off).unwrap();
}

/// A data-file mapping with host != guest is a corruption for our `check` (QEMU refuses to
/// read it), and our reads refuse it rather than return another cluster's data.
#[tokio::test]
async fn check_flags_data_file_mapping_off_guest_offset() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("img.qcow2");
    let data = dir.path().join("img.data");
    let opts = format!("data_file={}", data.display());
    common::qemu_create(&img, &opts, "1M");
    common::qemu_io(&img, &["write -P 0x5a 0 64k", "write -P 0x6b 64k 64k"]);
    let r = common::qcow2(&["check", img.to_str().unwrap()]);
    assert_eq!(
        r.code, 0,
        "clean before the damage:\n{}{}",
        r.stdout, r.stderr
    );
    // Point guest cluster 0 at host offset 64k (guest cluster 1's data).
    let l1 = be_u64_at(&img, 40);
    let l2 = be_u64_at(&img, l1) & 0x00ff_ffff_ffff_fe00;
    let e0 = be_u64_at(&img, l2);
    assert_eq!(e0 & 0x00ff_ffff_ffff_fe00, 0, "guest cluster 0 maps host 0");
    put_be_u64(&img, l2, (1 << 63) | 0x10000);
    let r = common::qcow2(&["check", img.to_str().unwrap()]);
    assert_eq!(
        r.code, 2,
        "qcow2 check must report corruption:\n{}{}",
        r.stdout, r.stderr
    );
    assert!(
        r.stderr.contains("does not match guest"),
        "qcow2 check stderr:\n{}",
        r.stderr
    );
    let opts = OpenOptions::new().references(ReferencePolicy::Any);
    let image = Image::open(&img, &opts).await.unwrap();
    let mut buf = vec![0u8; 512];
    let err = image.read_at(&mut buf, 0).await.unwrap_err();
    assert!(err.to_string().contains("does not match"), "{err}");
}
