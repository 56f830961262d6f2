//! Crash simulation: run a randomized workload on a crash-recording storage, then cut the
//! power at every recorded point (with several choices of which unflushed writes survive),
//! reopen and verify:
//! - the image opens, and its metadata is consistent (`qemu-img check` on a sample of points:
//!   corruptions never, leaks allowed);
//! - everything written before the last completed flush reads back exactly;
//! - every other sector reads as one of the versions it had since that flush — never garbage
//!   or another region's data.
//!
//! Seeds are printed on failure; `QCOW2_TEST_SEED=<n>` replays one.

use crate::common;

use std::path::Path;
use std::sync::Arc;

use qcow2_engine::Storage;
use qcow2_engine::image::{BackingOverride, Image, OpenOptions, ZeroFlags};
use qcow2_engine::storage::{CrashPolicy, CrashStorage, MemoryStorage};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

const SECTOR: usize = 512;
/// Crash points cut per run for a 4 MiB disk (each with two policies); bigger disks get
/// proportionally fewer, since every cut copies and reads the whole disk. CI time scales
/// with this.
const POINTS_PER_4MIB: u64 = 3000;

/// One workload operation and where its storage IO sits in the crash log.
#[derive(Debug, Clone)]
struct Step {
    op: Op,
    log_before: usize,
    log_after: usize,
}

#[derive(Debug, Clone)]
enum Op {
    Write(u64, Vec<u8>),
    Zero(u64, u64),
    Flush,
}

struct Setup {
    initial_image: Vec<u8>,
    initial_disk: Vec<u8>,
    backing: Option<std::path::PathBuf>,
    size: u64,
    /// The image holds compressed clusters; the workload also writes compressed clusters.
    compressed: bool,
    /// LUKS-encrypted with the secret [`LUKS_SECRET`] (issue 14).
    encrypted: bool,
}

/// The passphrase of the encrypted variant.
const LUKS_SECRET: &str = "abc";

fn qemu_image(dir: &Path, opts: &str, size: u64, compressed: bool, backing: bool) -> Setup {
    let img = dir.join("img.qcow2");
    let p = img.to_str().unwrap();
    let mut disk = vec![0u8; size as usize];
    let mut backing_path = None;
    if compressed || backing {
        for (i, b) in disk.iter_mut().enumerate() {
            if (i / 40_000) % 3 != 0 {
                *b = ((i / 3) % 199) as u8 + 1;
            }
        }
        let raw = dir.join("content.raw");
        std::fs::write(&raw, &disk).unwrap();
        if compressed {
            common::run(
                "qemu-img",
                &[
                    "convert",
                    "-q",
                    "-c",
                    "-f",
                    "raw",
                    "-O",
                    "qcow2",
                    "-o",
                    opts,
                    raw.to_str().unwrap(),
                    p,
                ],
            );
        } else {
            let b = dir.join("backing.qcow2");
            common::run(
                "qemu-img",
                &[
                    "convert",
                    "-q",
                    "-f",
                    "raw",
                    "-O",
                    "qcow2",
                    raw.to_str().unwrap(),
                    b.to_str().unwrap(),
                ],
            );
            common::qemu_create(
                p,
                &format!(
                    "{opts},backing_file={},backing_fmt=qcow2",
                    b.to_str().unwrap()
                ),
                size,
            );
            backing_path = Some(b);
        }
    } else {
        common::qemu_create(p, opts, size);
    }
    Setup {
        initial_image: std::fs::read(&img).unwrap(),
        initial_disk: disk,
        backing: backing_path,
        size,
        compressed,
        encrypted: false,
    }
}

/// A LUKS-encrypted image made by qemu-img with the cheapest key derivation it allows
/// (every crash point reopens it).
fn luks_image(dir: &Path, opts: &str, size: u64) -> Setup {
    let img = dir.join("img.qcow2");
    let obj = format!("secret,id=sec0,data={LUKS_SECRET}");
    let o = format!("{opts},encrypt.format=luks,encrypt.key-secret=sec0,encrypt.iter-time=1");
    let size_s = size.to_string();
    let p = img.to_str().unwrap();
    common::run(
        "qemu-img",
        &[
            "create", "-q", "-f", "qcow2", "--object", &obj, "-o", &o, p, &size_s,
        ],
    );
    Setup {
        initial_image: std::fs::read(&img).unwrap(),
        initial_disk: vec![0u8; size as usize],
        backing: None,
        size,
        compressed: false,
        encrypted: true,
    }
}

fn open_opts(setup: &Setup) -> OpenOptions {
    let backing = &setup.backing;
    let mut o = OpenOptions::new()
        .slice_size(512)
        .l2_cache_bytes(4 * 512)
        .refcount_cache_bytes(4 * 512);
    o = o.flush_interval(None);
    if setup.encrypted {
        o = o.key_secret(qcow2_engine::crypto::Secret::new(LUKS_SECRET));
    }
    if let Some(b) = backing {
        o = o.backing(BackingOverride {
            path: Some(b.clone()),
            format: Some("qcow2".into()),
        });
    }
    o
}

async fn workload(
    setup: &Setup,
    seed: u64,
    ops: usize,
    max_len: u64,
) -> (Arc<CrashStorage>, Vec<Step>) {
    let crash = Arc::new(CrashStorage::new(setup.initial_image.clone()));
    let storage: Arc<dyn Storage> = crash.clone();
    let img = Image::open_storage(storage, &open_opts(setup).writable(true))
        .await
        .unwrap();
    let mut rng = StdRng::seed_from_u64(seed);
    let mut steps = Vec::new();
    for i in 0..ops {
        let len = rng.gen_range(1..=max_len);
        let off = rng.gen_range(0..=setup.size - len) & if rng.gen_bool(0.5) { !511 } else { !0 };
        // Compressed images also get compressed cluster writes (small payloads that pack
        // into shared host clusters; the step number varies the content).
        let compress = setup.compressed && rng.gen_bool(0.3);
        let op = match rng.gen_range(0..10) {
            _ if compress => {
                let cs = img.cluster_size();
                let c = rng.gen_range(0..setup.size / cs);
                let d = (0..cs).map(|k| ((k / 512) as u8) ^ (i as u8) | 0x40);
                Op::Write(c * cs, d.collect())
            }
            0..=5 => Op::Write(off, vec![(i as u8) | 0x40; len as usize]),
            6..=7 => Op::Zero(off, len),
            _ => Op::Flush,
        };
        let log_before = crash.crash_points() - 1;
        match &op {
            Op::Write(o, d) if compress => img.write_compressed(d, *o).await.unwrap(),
            Op::Write(o, d) => img.write_at(d, *o).await.unwrap(),
            Op::Zero(o, l) if i % 2 == 0 => img.discard(*o, *l).await.unwrap(),
            Op::Zero(o, l) => img
                .write_zeroes(
                    *o,
                    *l,
                    ZeroFlags {
                        may_unmap: rng.gen_bool(0.5),
                    },
                )
                .await
                .unwrap(),
            Op::Flush => img.flush().await.unwrap(),
        }
        steps.push(Step {
            op,
            log_before,
            log_after: crash.crash_points() - 1,
        });
    }
    (crash, steps)
}

fn apply(disk: &mut [u8], op: &Op) {
    match op {
        Op::Write(o, d) => disk[*o as usize..*o as usize + d.len()].copy_from_slice(d),
        Op::Zero(o, l) => disk[*o as usize..(*o + *l) as usize].fill(0),
        Op::Flush => {}
    }
}

/// Index of the first step not known durable at crash point `p` (everything before the last
/// flush that completed by then).
fn durable_upto(steps: &[Step], p: usize) -> usize {
    let last_flush = steps
        .iter()
        .rposition(|s| matches!(s.op, Op::Flush) && s.log_after <= p);
    last_flush.map_or(0, |f| f + 1)
}

/// Every sector must equal its durable version with some subset of the maybe-ops that touch
/// it applied in order: unflushed writes may be lost or reordered by the device, so a later
/// write can survive while an earlier one to the same sector is lost — but nothing else
/// (no stale data, no other region's data) may appear.
fn verify_sectors(got: &[u8], durable: &[u8], maybe: &[&Op]) -> Result<(), String> {
    for (s, chunk) in got.chunks(SECTOR).enumerate() {
        let start = s * SECTOR;
        let base = &durable[start..start + chunk.len()];
        if base == chunk {
            continue;
        }
        let touching: Vec<&Op> = maybe
            .iter()
            .copied()
            .filter(|op| touches(op, start, chunk.len()))
            .collect();
        if !some_subset_matches(base, start, &touching, chunk) {
            let desc: Vec<String> = touching.iter().map(|op| describe(op)).collect();
            let head: Vec<u8> = chunk.iter().take(8).copied().collect();
            return Err(format!(
                "sector {s} (guest offset {start}) matches no version: got {head:x?}, durable {:x?}, maybe-ops touching it: {desc:?}",
                &base[..8.min(base.len())]
            ));
        }
    }
    Ok(())
}

fn some_subset_matches(base: &[u8], start: usize, ops: &[&Op], want: &[u8]) -> bool {
    // Beyond 12 overlapping unflushed writes to one sector, accept (never seen in practice).
    if ops.len() > 12 {
        return true;
    }
    (0u32..1 << ops.len()).any(|mask| {
        let mut cur = base.to_vec();
        for (i, op) in ops.iter().enumerate() {
            if mask & (1 << i) != 0 {
                apply_to_sector(&mut cur, start, op);
            }
        }
        cur == want
    })
}

fn touches(op: &Op, start: usize, len: usize) -> bool {
    match op {
        Op::Write(o, d) => (*o as usize) < start + len && start < *o as usize + d.len(),
        Op::Zero(o, l) => (*o as usize) < start + len && start < (*o + *l) as usize,
        Op::Flush => false,
    }
}

fn describe(op: &Op) -> String {
    match op {
        Op::Write(o, d) => format!("write {o}+{} of {:#x}", d.len(), d[0]),
        Op::Zero(o, l) => format!("zero {o}+{l}"),
        Op::Flush => "flush".into(),
    }
}

/// Apply `op` to the copy `sec` of the sector starting at guest offset `start`.
fn apply_to_sector(sec: &mut [u8], start: usize, op: &Op) {
    let (o, l, data) = match op {
        Op::Write(o, d) => (*o as usize, d.len(), Some(d)),
        Op::Zero(o, l) => (*o as usize, *l as usize, None),
        Op::Flush => return,
    };
    let (a, b) = (o.max(start), (o + l).min(start + sec.len()));
    if a >= b {
        return;
    }
    match data {
        Some(d) => sec[a - start..b - start].copy_from_slice(&d[a - o..b - o]),
        None => sec[a - start..b - start].fill(0),
    }
}

async fn verify_point(
    setup: &Setup,
    crash: &CrashStorage,
    steps: &[Step],
    durable: &[u8],
    p: usize,
    policy: CrashPolicy,
) -> Result<Vec<u8>, String> {
    let bytes = crash.image_at(p, policy);
    let storage: Arc<dyn Storage> = Arc::new(MemoryStorage::from_vec(bytes.clone()));
    let img = Image::open_storage(storage, &open_opts(setup))
        .await
        .map_err(|e| format!("reopen failed: {e}"))?;
    let mut got = vec![0u8; setup.size as usize];
    img.read_at(&mut got, 0)
        .await
        .map_err(|e| format!("read failed: {e}"))?;
    let from = durable_upto(steps, p);
    let maybe: Vec<&Op> = steps[from..]
        .iter()
        .filter(|s| s.log_before < p)
        .map(|s| &s.op)
        .collect();
    verify_sectors(&got, durable, &maybe)?;
    Ok(bytes)
}

fn qemu_check_no_corruption(dir: &Path, bytes: &[u8], setup: &Setup) -> Result<(), String> {
    let backing = &setup.backing;
    let f = dir.join("crashed.qcow2");
    std::fs::write(&f, bytes).unwrap();
    let mut args = vec!["check".to_string()];
    if setup.encrypted {
        let io = format!(
            "driver=qcow2,file.filename={},encrypt.key-secret=sec0",
            f.display()
        );
        args.extend([
            format!("--object=secret,id=sec0,data={LUKS_SECRET}"),
            "--image-opts".into(),
            io,
        ]);
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        let (code, out) = common::status("qemu-img", &refs);
        return match code {
            0 | 3 => Ok(()),
            _ => Err(format!("qemu-img check exit {code}:\n{out}")),
        };
    }
    if let Some(b) = backing {
        // Point the header's relative name at the real backing file.
        let _ = b;
        args.push("-U".into());
    }
    args.push(f.to_str().unwrap().into());
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    let (code, out) = common::status("qemu-img", &refs);
    if code == 0 || code == 3 {
        Ok(())
    } else {
        Err(format!("qemu-img check exit {code}:\n{out}"))
    }
}

async fn run(
    name: &str,
    opts: &str,
    size: u64,
    compressed: bool,
    backing: bool,
    ops: usize,
    max_len: u64,
) -> usize {
    let seed = std::env::var("QCOW2_TEST_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(rand::random::<u64>);
    let dir = tempfile::tempdir().unwrap();
    let setup = qemu_image(dir.path(), opts, size, compressed, backing);
    run_setup(name, dir.path(), &setup, seed, (ops, max_len)).await
}

/// Run the workload on `setup`, then cut and verify.
async fn run_setup(
    name: &str,
    dir: &Path,
    setup: &Setup,
    seed: u64,
    (ops, max_len): (usize, u64),
) -> usize {
    let (crash, steps) = workload(setup, seed, ops, max_len).await;
    let points = crash.crash_points();
    if std::env::var("CRASH_DEBUG").is_ok() {
        for (i, st) in steps.iter().enumerate() {
            let d = match &st.op {
                Op::Write(o, d) => format!("write {o}+{}", d.len()),
                Op::Zero(o, l) => format!("zero {o}+{l}"),
                Op::Flush => "flush".into(),
            };
            eprintln!("step {i}: {d} log {}..{}", st.log_before, st.log_after);
        }
        for (i, op) in crash.log().iter().enumerate() {
            let d = match op {
                qcow2_engine::storage::crash::LoggedOp::Write { offset, data } => {
                    format!("W {offset:#x}+{:#x}", data.len())
                }
                other => format!("{other:?}"),
            };
            eprintln!("log {i}: {d}");
        }
    }
    // Every point when there are few, else an even sample plus every flush boundary.
    let budget = (POINTS_PER_4MIB * (4 << 20) / setup.size).max(100) as usize;
    let stride = points.div_ceil(budget).max(1);
    let (mut checked, mut distinct) = (0, 0);
    let (mut durable, mut durable_at) = (setup.initial_disk.clone(), 0usize);
    for p in 0..points {
        let near_flush = steps
            .iter()
            .any(|s| matches!(s.op, Op::Flush) && s.log_after.abs_diff(p) <= 1);
        if p % stride != 0 && !near_flush && p + 1 != points {
            continue;
        }
        let upto = durable_upto(&steps, p);
        while durable_at < upto {
            apply(&mut durable, &steps[durable_at].op);
            durable_at += 1;
        }
        distinct += 1;
        // Two power-cut variants per point, alternating so every policy is used often:
        // nothing / a random subset, or everything / a random subset with torn sectors.
        let salt = seed ^ (p as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15);
        let policies = match p % 2 {
            0 => [CrashPolicy::None, CrashPolicy::Subset(salt)],
            _ => [CrashPolicy::All, CrashPolicy::SubsetTorn(salt)],
        };
        for (k, policy) in policies.iter().enumerate() {
            let bytes = verify_point(setup, &crash, &steps, &durable, p, *policy)
                .await
                .unwrap_or_else(|e| {
                    panic!(
                        "{name} QCOW2_TEST_SEED={seed}: crash point {p}/{points} {policy:?}: {e}"
                    )
                });
            checked += 1;
            // qemu-img check is slow next to our in-memory checks: run it on a sample.
            if checked % 41 == 0 || (p + 1 == points && k == 0) {
                qemu_check_no_corruption(dir, &bytes, setup).unwrap_or_else(|e| {
                    panic!("{name} QCOW2_TEST_SEED={seed}: crash point {p} {policy:?}: {e}")
                });
            }
        }
    }
    eprintln!(
        "{name}: seed {seed}: {points} crash points, {distinct} cut, {checked} crash images verified"
    );
    checked
}

#[tokio::test]
async fn crash_4k_refcount_1() {
    run(
        "crash_4k_refcount_1",
        "cluster_size=4096,refcount_bits=1",
        4 << 20,
        false,
        false,
        150,
        200_000,
    )
    .await;
}

#[tokio::test]
async fn crash_64k_refcount_16() {
    run(
        "crash_64k_refcount_16",
        "cluster_size=65536,refcount_bits=16",
        4 << 20,
        false,
        false,
        600,
        300_000,
    )
    .await;
}

#[tokio::test]
async fn crash_64k_refcount_1_compressed() {
    run(
        "crash_64k_refcount_1_compressed",
        "cluster_size=65536,refcount_bits=1",
        2 << 20,
        true,
        false,
        400,
        100_000,
    )
    .await;
}

/// Compressed writes packing many payloads per host cluster (2-bit refcounts overflow after
/// three), over a QEMU-compressed image.
#[tokio::test]
async fn crash_4k_refcount_2_compressed() {
    run(
        "crash_4k_refcount_2_compressed",
        "cluster_size=4096,refcount_bits=2",
        2 << 20,
        true,
        false,
        300,
        60_000,
    )
    .await;
}

#[tokio::test]
async fn crash_64k_refcount_1() {
    run(
        "crash_64k_refcount_1",
        "cluster_size=65536,refcount_bits=1",
        4 << 20,
        false,
        false,
        600,
        200_000,
    )
    .await;
}

#[tokio::test]
async fn crash_4k_refcount_16() {
    run(
        "crash_4k_refcount_16",
        "cluster_size=4096,refcount_bits=16",
        4 << 20,
        false,
        false,
        150,
        150_000,
    )
    .await;
}

#[tokio::test]
async fn crash_4k_refcount_16_backing() {
    run(
        "crash_4k_refcount_16_backing",
        "cluster_size=4096,refcount_bits=16",
        2 << 20,
        false,
        true,
        120,
        100_000,
    )
    .await;
}

#[tokio::test]
async fn crash_512_refcount_table_growth() {
    run(
        "crash_512_refcount_table_growth",
        "cluster_size=512,refcount_bits=16",
        12 << 20,
        false,
        false,
        24,
        2 << 20,
    )
    .await;
}

/// Issue 14: LUKS-encrypted data survives power cuts like plain data (every write is whole
/// encrypted sectors, so a torn write loses or keeps each sector, never garbles it).
#[tokio::test]
async fn crash_4k_luks() {
    let seed = std::env::var("QCOW2_TEST_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(rand::random::<u64>);
    let dir = tempfile::tempdir().unwrap();
    let setup = luks_image(dir.path(), "cluster_size=4096,refcount_bits=16", 1 << 20);
    run_setup("crash_4k_luks", dir.path(), &setup, seed, (80, 50_000)).await;
}
