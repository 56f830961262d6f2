//! Model-based randomized workload: many concurrent tasks issue random writes, zero-writes,
//! discards, reads and flushes against an image and an in-memory shadow disk. Reads must
//! always match the shadow; after close, `qemu-img check` must find no errors and no leaks
//! and `qemu-img compare` must find the image equal to the shadow.
//!
//! Concurrent requests never overlap in guest bytes (a range reservation models a guest that
//! doesn't issue conflicting IO), but they freely share clusters, L2 tables and refcount
//! blocks — which is what exercises in-flight allocation and the caches.

use crate::common;

use std::path::Path;
use std::sync::{Arc, Mutex};

use common::yielding::YieldingStorage;
use qcow2_engine::image::{Image, OpenOptions, ReferencePolicy, ZeroFlags};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// One variant of the workload.
#[derive(Clone, Debug)]
struct Variant {
    name: &'static str,
    create_opts: &'static str,
    size: u64,
    backing: Option<&'static str>,
    tasks: usize,
    ops_per_task: usize,
    max_len: usize,
    /// Open through [`YieldingStorage`], so requests interleave at every IO.
    yielding: bool,
    /// Place half the requests right beside a running one (sharing its (sub)cluster).
    beside_others: bool,
}

/// The shadow disk plus the set of guest ranges currently reserved by running requests.
struct Model {
    shadow: Mutex<Vec<u8>>,
    busy: Mutex<Vec<(u64, u64)>>,
}

impl Model {
    /// Reserve `[off, off + len)`; `false` if it overlaps a running request.
    fn try_reserve(&self, off: u64, len: u64) -> bool {
        let mut busy = self.busy.lock().unwrap();
        if busy.iter().any(|&(s, e)| off < e && s < off + len) {
            return false;
        }
        busy.push((off, off + len));
        true
    }

    /// An offset for a `len`-byte request just beside a running request (a small gap, or
    /// none), so the two share a cluster or subcluster; `None` when nothing is running.
    fn beside_busy(&self, rng: &mut StdRng, len: u64, size: u64) -> Option<u64> {
        let busy = self.busy.lock().unwrap();
        if busy.is_empty() {
            return None;
        }
        let (s, e) = busy[rng.gen_range(0..busy.len())];
        let gap = rng.gen_range(0..64);
        let off = if rng.gen_bool(0.5) {
            e + gap
        } else {
            s.checked_sub(len + gap)?
        };
        (off + len <= size).then_some(off)
    }

    fn release(&self, off: u64) {
        let mut busy = self.busy.lock().unwrap();
        let i = busy.iter().position(|&(s, _)| s == off).unwrap();
        busy.swap_remove(i);
    }
}

fn pick_len(rng: &mut StdRng, max: usize) -> usize {
    match rng.gen_range(0..10) {
        0..=3 => rng.gen_range(1..=4096.min(max)),
        4..=6 => rng.gen_range(1..=65536.min(max)),
        7..=8 => rng.gen_range(1..=max),
        _ => 4096 * rng.gen_range(1..=(max / 4096).max(1)),
    }
}

async fn task(img: Image, model: Arc<Model>, seed: u64, v: Variant) {
    let mut rng = StdRng::seed_from_u64(seed);
    for _ in 0..v.ops_per_task {
        let len = pick_len(&mut rng, v.max_len).min(v.size as usize) as u64;
        let mut off = rng.gen_range(0..=v.size - len);
        if rng.gen_bool(0.3) {
            off &= !4095;
        }
        if v.beside_others && rng.gen_bool(0.5) {
            off = model.beside_busy(&mut rng, len, v.size).unwrap_or(off);
        }
        if !model.try_reserve(off, len) {
            tokio::task::yield_now().await;
            continue;
        }
        let op = rng.gen_range(0..100);
        let (o, l) = (off as usize, len as usize);
        match op {
            0..=49 => {
                let base = (seed as usize).wrapping_mul(31).wrapping_add(o);
                let data: Vec<u8> = (0..l).map(|i| base.wrapping_add(i) as u8 | 1).collect();
                img.write_at(&data, off)
                    .await
                    .unwrap_or_else(|e| panic!("write {off}+{len}: {e}"));
                model.shadow.lock().unwrap()[o..o + l].copy_from_slice(&data);
            }
            50..=59 => {
                let flags = ZeroFlags {
                    may_unmap: rng.gen_bool(0.5),
                };
                img.write_zeroes(off, len, flags)
                    .await
                    .unwrap_or_else(|e| panic!("zero {off}+{len}: {e}"));
                model.shadow.lock().unwrap()[o..o + l].fill(0);
            }
            60..=67 => {
                img.discard(off, len)
                    .await
                    .unwrap_or_else(|e| panic!("discard {off}+{len}: {e}"));
                model.shadow.lock().unwrap()[o..o + l].fill(0);
            }
            68..=95 => {
                let mut buf = vec![0u8; l];
                img.read_at(&mut buf, off)
                    .await
                    .unwrap_or_else(|e| panic!("read {off}+{len}: {e}"));
                let want = model.shadow.lock().unwrap()[o..o + l].to_vec();
                if let Some(d) = common::first_difference(&buf, &want) {
                    panic!(
                        "{}: read {off}+{len} differs at +{d}: got {} want {}",
                        v.name, buf[d], want[d]
                    );
                }
            }
            _ => img.flush().await.unwrap(),
        }
        model.release(off);
    }
}

fn make_backing(dir: &Path, kind: &str, size: u64) -> (std::path::PathBuf, Vec<u8>) {
    let mut data = vec![0u8; size as usize];
    // Patterned backing content over most of the disk, with holes, and shorter than the
    // overlay so reads past its end must give zeros.
    let blen = size as usize * 3 / 4 + 1234;
    for (i, b) in data[..blen].iter_mut().enumerate() {
        if (i / 100_000) % 3 != 1 {
            *b = (i % 251) as u8 | 0x80;
        }
    }
    let raw = dir.join("backing.raw");
    std::fs::write(&raw, &data[..blen]).unwrap();
    if kind == "raw" {
        return (raw, data);
    }
    let q = dir.join("backing.qcow2");
    common::run(
        "qemu-img",
        &[
            "convert",
            "-q",
            "-f",
            "raw",
            "-O",
            "qcow2",
            "-o",
            "cluster_size=4096",
            raw.to_str().unwrap(),
            q.to_str().unwrap(),
        ],
    );
    (q, data)
}

async fn run_variant(v: Variant, seed: u64) {
    let dir = tempfile::tempdir().unwrap();
    let img_path = dir.path().join("img.qcow2");
    let p = img_path.to_str().unwrap();
    let size = v.size.to_string();
    let mut initial = vec![0u8; v.size as usize];
    match v.backing {
        Some(kind) => {
            let (b, data) = make_backing(dir.path(), kind, v.size);
            initial = data;
            let fmt = if kind == "raw" { "raw" } else { "qcow2" };
            common::qemu_create(
                p,
                &format!(
                    "{},backing_file={},backing_fmt={fmt}",
                    v.create_opts,
                    b.to_str().unwrap()
                ),
                &size,
            );
        }
        None => {
            common::qemu_create(p, v.create_opts, &size);
        }
    }
    // Our own images: their absolute backing file names are fine.
    let opts = OpenOptions::new()
        .writable(true)
        .references(ReferencePolicy::Any)
        .slice_size(512)
        .l2_cache_bytes(8 * 512)
        .refcount_cache_bytes(4 * 512);
    let img = if v.yielding {
        let file = common::storage(&img_path, false);
        let storage = Arc::new(YieldingStorage::new(file, seed));
        Image::open_storage(storage, &opts).await.unwrap()
    } else {
        Image::open(&img_path, &opts).await.unwrap()
    };
    let model = Arc::new(Model {
        shadow: Mutex::new(initial),
        busy: Mutex::new(Vec::new()),
    });
    let mut handles = Vec::new();
    for t in 0..v.tasks {
        let task_seed = seed.wrapping_mul(1000).wrapping_add(t as u64);
        handles.push(tokio::spawn(task(
            img.clone(),
            model.clone(),
            task_seed,
            v.clone(),
        )));
    }
    for h in handles {
        h.await
            .unwrap_or_else(|e| panic!("{} seed {seed}: task failed: {e}", v.name));
    }
    let stats = img.l2_cache_stats();
    assert!(
        stats.peak_bytes <= stats.limit_bytes,
        "{}: L2 cache exceeded its bound: {stats:?}",
        v.name
    );
    let rstats = img.refcount_cache_stats().unwrap();
    assert!(
        rstats.peak_bytes <= rstats.limit_bytes,
        "{}: refcount cache exceeded its bound: {rstats:?}",
        v.name
    );
    img.close().await.unwrap();
    drop(img);
    let shadow = model.shadow.lock().unwrap().clone();
    let raw = dir.path().join("shadow.raw");
    std::fs::write(&raw, &shadow).unwrap();
    let (code, out) = common::status("qemu-img", &["check", p]);
    assert_eq!(code, 0, "{} seed {seed}: qemu-img check:\n{out}", v.name);
    let (code, out) = common::status(
        "qemu-img",
        &[
            "compare",
            "-f",
            "raw",
            "-F",
            "qcow2",
            raw.to_str().unwrap(),
            p,
        ],
    );
    assert_eq!(code, 0, "{} seed {seed}: qemu-img compare:\n{out}", v.name);
}

fn variant(
    name: &'static str,
    create_opts: &'static str,
    backing: Option<&'static str>,
) -> Variant {
    Variant {
        name,
        create_opts,
        size: 24 << 20,
        backing,
        tasks: 16,
        ops_per_task: 40,
        max_len: 4 << 20,
        yielding: false,
        beside_others: false,
    }
}

/// Many short requests on a small disk: concurrent requests often share a cluster, and with
/// extended L2 a request often spans subclusters in different states while another one
/// writes into one of them (issue 7 item 2).
fn small_requests(
    name: &'static str,
    create_opts: &'static str,
    backing: Option<&'static str>,
) -> Variant {
    Variant {
        name,
        create_opts,
        size: 256 << 10,
        backing,
        tasks: 16,
        ops_per_task: 300,
        max_len: 3000,
        yielding: true,
        beside_others: true,
    }
}

fn seed() -> u64 {
    std::env::var("QCOW2_TEST_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(rand::random)
}

macro_rules! model_test {
    ($name:ident, $opts:expr, $backing:expr) => {
        model_test!($name, $opts, $backing, variant);
    };
    ($name:ident, $opts:expr, $backing:expr, $shape:ident) => {
        #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
        async fn $name() {
            let s = seed();
            eprintln!("{}: QCOW2_TEST_SEED={s}", stringify!($name));
            run_variant($shape(stringify!($name), $opts, $backing), s).await;
        }
    };
}

model_test!(cluster_64k, "cluster_size=65536", None);
model_test!(
    cluster_64k_backing_qcow2,
    "cluster_size=65536",
    Some("qcow2")
);
model_test!(cluster_4k_backing_raw, "cluster_size=4096", Some("raw"));
model_test!(
    cluster_512_refcount_1,
    "cluster_size=512,refcount_bits=1",
    None
);
model_test!(cluster_512_backing, "cluster_size=512", Some("qcow2"));
model_test!(
    cluster_2m_refcount_64,
    "cluster_size=2M,refcount_bits=64",
    None
);
model_test!(cluster_2m_backing, "cluster_size=2M", Some("raw"));
model_test!(refcount_16_4k, "cluster_size=4096,refcount_bits=16", None);
model_test!(extended_l2, "cluster_size=65536,extended_l2=on", None);
model_test!(
    extended_l2_backing,
    "cluster_size=32768,extended_l2=on",
    Some("qcow2")
);
model_test!(
    extended_l2_small_requests,
    "cluster_size=16384,extended_l2=on",
    None,
    small_requests
);
model_test!(
    extended_l2_small_requests_backing,
    "cluster_size=16384,extended_l2=on",
    Some("qcow2"),
    small_requests
);
model_test!(
    small_requests_backing,
    "cluster_size=4096",
    Some("qcow2"),
    small_requests
);
model_test!(v2_compat, "compat=0.10,cluster_size=4096", None);
model_test!(v2_backing, "compat=0.10", Some("qcow2"));

/// Issue 14: the same workload on a LUKS-encrypted image that QEMU created (with a backing
/// file when `v.backing` says so). Every write is encrypted by ours, small requests side by
/// side share 512-byte sectors (read-modify-write of a sector), and QEMU then checks the
/// image and compares it with the shadow, decrypting with the same secret.
async fn run_encrypted(v: Variant, seed: u64) {
    let dir = tempfile::tempdir().unwrap();
    let img_path = dir.path().join("img.qcow2");
    let p = img_path.to_str().unwrap();
    let mut o = format!(
        "{},encrypt.format=luks,encrypt.key-secret=sec0,encrypt.iter-time=1",
        v.create_opts
    );
    let mut initial = vec![0u8; v.size as usize];
    if let Some(kind) = v.backing {
        let (b, data) = make_backing(dir.path(), kind, v.size);
        initial = data;
        let fmt = if kind == "raw" { "raw" } else { "qcow2" };
        o = format!("{o},backing_file={},backing_fmt={fmt}", b.to_str().unwrap());
    }
    let obj = "secret,id=sec0,data=abc";
    let size = v.size.to_string();
    common::run(
        "qemu-img",
        &[
            "create", "-q", "-f", "qcow2", "--object", obj, "-o", &o, p, &size,
        ],
    );
    let opts = OpenOptions::new()
        .writable(true)
        .references(ReferencePolicy::Any)
        .key_secret(qcow2_engine::crypto::Secret::new("abc"))
        .slice_size(512)
        .l2_cache_bytes(8 * 512)
        .refcount_cache_bytes(4 * 512);
    let file = common::storage(&img_path, false);
    let storage = Arc::new(YieldingStorage::new(file, seed));
    let img = Image::open_storage(storage, &opts).await.unwrap();
    let model = Arc::new(Model {
        shadow: Mutex::new(initial),
        busy: Mutex::new(Vec::new()),
    });
    let handles: Vec<_> = (0..v.tasks)
        .map(|t| {
            let task_seed = seed.wrapping_mul(1000).wrapping_add(t as u64);
            tokio::spawn(task(img.clone(), model.clone(), task_seed, v.clone()))
        })
        .collect();
    for h in handles {
        h.await
            .unwrap_or_else(|e| panic!("{} seed {seed}: task failed: {e}", v.name));
    }
    img.close().await.unwrap();
    drop(img);
    let raw = dir.path().join("shadow.raw");
    std::fs::write(&raw, &*model.shadow.lock().unwrap()).unwrap();
    let io = format!("driver=qcow2,file.filename={p},encrypt.key-secret=sec0");
    let (code, out) = common::status("qemu-img", &["check", "--object", obj, "--image-opts", &io]);
    assert_eq!(code, 0, "{} seed {seed}: qemu-img check:\n{out}", v.name);
    let shadow = format!("driver=raw,file.filename={}", raw.to_str().unwrap());
    let (code, out) = common::status(
        "qemu-img",
        &["compare", "--object", obj, "--image-opts", &shadow, &io],
    );
    assert_eq!(code, 0, "{} seed {seed}: qemu-img compare:\n{out}", v.name);
}

macro_rules! encrypted_model_test {
    ($name:ident, $opts:expr, $backing:expr, $shape:ident) => {
        #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
        async fn $name() {
            let s = seed();
            eprintln!("{}: QCOW2_TEST_SEED={s}", stringify!($name));
            run_encrypted($shape(stringify!($name), $opts, $backing), s).await;
        }
    };
}

encrypted_model_test!(luks_cluster_64k, "cluster_size=65536", None, variant);
encrypted_model_test!(
    luks_small_requests_backing,
    "cluster_size=4096",
    Some("qcow2"),
    small_requests
);
