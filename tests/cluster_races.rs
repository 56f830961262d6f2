//! Concurrent, non-overlapping requests into the *same* guest cluster, in every mapping state.
//!
//! The random model test (`write_model.rs`) rarely lines two requests up inside one cluster
//! at the moment one of them copies old bytes. Here every iteration does exactly that: it
//! opens a fresh in-memory copy of a QEMU-made image whose clusters are in every state
//! (unallocated over a backing file, normal, zero, preallocated zero, compressed, shared with
//! an internal snapshot, and with extended L2 mixed subcluster states), picks one cluster and
//! runs 2–4 disjoint writes/zero-writes into it at once. The storage yields to the scheduler a
//! random number of times before each IO, so the requests interleave differently each time
//! (seeded: `QCOW2_TEST_SEED=<n>` replays a run). Every byte is compared to a shadow copy;
//! a sample of the results is checked by `qemu-img check` and `qemu-img compare`.
//!
//! Regression test for issue 7 item 2: with extended L2, a write spanning an allocated and an
//! unallocated subcluster copied the allocated subcluster's old bytes back over a concurrent
//! in-place write.

use crate::common;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use common::yielding::YieldingStorage;
use qcow2_engine::image::{Image, OpenOptions, ReferencePolicy, ZeroFlags};
use qcow2_engine::storage::MemoryStorage;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// Iterations per image variant; each is a fresh image and one burst of concurrent requests.
const ITERATIONS: u64 = 1000;
/// Every this many iterations the result also goes through `qemu-img check` and `compare`.
const QEMU_SAMPLE: u64 = 100;
/// Virtual disk size of the templates.
const DISK: u64 = 256 << 10;

/// A QEMU-made image (bytes) and its content (by `qemu-img convert`).
struct Template {
    name: &'static str,
    bytes: Vec<u8>,
    content: Vec<u8>,
    cluster: u64,
    /// Subcluster size (the cluster size without extended L2): where writes like to start/end.
    grain: u64,
}

/// One request of a burst.
#[derive(Clone)]
enum Op {
    Write(u64, Vec<u8>),
    Zero(u64, u64, bool),
}

impl std::fmt::Debug for Op {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Op::Write(off, data) => write!(f, "write {off}+{}", data.len()),
            Op::Zero(off, len, unmap) => write!(f, "zero {off}+{len} unmap={unmap}"),
        }
    }
}

/// Patterned raw backing file, shorter than the disk (reads past its end give zeros).
fn make_backing(dir: &Path) -> PathBuf {
    let len = DISK as usize * 3 / 4 + 1000;
    let data: Vec<u8> = (0..len).map(|i| (i % 251) as u8 | 0x80).collect();
    let path = dir.join("backing.raw");
    std::fs::write(&path, data).unwrap();
    path
}

/// `qemu-io` commands that leave cluster `c` in a state chosen by `(c + 3 * pass) % 8`:
/// untouched, data, zero (keeping the allocation), compressed, or (half the clusters) — with
/// subclusters of `grain` bytes — a per-subcluster mix of untouched, data and zero. (QEMU compresses only
/// into unallocated clusters: pass 1 compresses the clusters pass 0 left untouched.)
fn cluster_commands(c: u64, cs: u64, grain: u64, pass: u64) -> Vec<String> {
    let base = c * cs;
    let p = 0x10 + c + 0x40 * pass;
    match (c + 3 * pass) % 8 {
        0 => vec![],
        1 => vec![format!("write -q -P {p} {base} {cs}")],
        2 => vec![
            format!("write -q -P {p} {base} {cs}"),
            format!("write -q -z {base} {cs}"),
        ],
        3 => vec![format!("write -q -c -P {p} {base} {cs}")],
        _ => (0..cs / grain)
            .filter_map(|i| {
                let o = base + i * grain;
                match (i * 7 + c + pass) % 3 {
                    0 => None,
                    1 => Some(format!("write -q -P {p} {o} {grain}")),
                    _ => Some(format!("write -q -z {o} {grain}")),
                }
            })
            .collect(),
    }
}

/// Apply `cluster_commands` of pass `pass` to the clusters in `range` with one qemu-io run.
fn qemu_io_pass(img: &Path, cs: u64, grain: u64, pass: u64, range: std::ops::Range<u64>) {
    let cmds: Vec<String> = range
        .flat_map(|c| cluster_commands(c, cs, grain, pass))
        .collect();
    let mut args = vec!["-f", "qcow2"];
    for c in &cmds {
        args.extend(["-c", c.as_str()]);
    }
    args.push(img.to_str().unwrap());
    common::run("qemu-io", &args);
}

/// Build a template: create over a backing file, fill clusters in every state, take an
/// internal snapshot (so the first half is shared with it), then rewrite part of the disk.
fn make_template(dir: &Path, name: &'static str, opts: &str, cs: u64, grain: u64) -> Template {
    let backing = make_backing(dir);
    let img = dir.join(format!("{name}.qcow2"));
    let (b, i) = (backing.to_str().unwrap(), img.to_str().unwrap());
    let size = DISK.to_string();
    common::qemu_create(
        i,
        &format!("{opts},backing_file={b},backing_fmt=raw"),
        &size,
    );
    let clusters = DISK / cs;
    qemu_io_pass(&img, cs, grain, 0, 0..clusters);
    common::run("qemu-img", &["snapshot", "-c", "snap", i]);
    qemu_io_pass(&img, cs, grain, 1, clusters / 2..clusters);
    common::assert_check_clean(&img);
    Template {
        name,
        bytes: std::fs::read(&img).unwrap(),
        content: common::qemu_raw(&img),
        cluster: cs,
        grain,
    }
}

/// A point in `[lo, hi]`, usually near a subcluster boundary (where mixed spans start).
fn pick_point(rng: &mut StdRng, t: &Template, lo: u64, hi: u64) -> u64 {
    if rng.gen_bool(0.3) {
        return rng.gen_range(lo..=hi);
    }
    let b = lo + rng.gen_range(0..=(hi - lo) / t.grain) * t.grain;
    let jitter = rng.gen_range(0..=64u64);
    let p = if rng.gen_bool(0.5) {
        b.saturating_sub(jitter)
    } else {
        b + jitter
    };
    p.clamp(lo, hi)
}

/// 2–4 disjoint requests around cluster `c` (the outer ones may reach into neighbours).
/// Half the bursts are built around one subcluster boundary: a request that stays inside
/// one (sub)cluster, and right beside it, sharing that (sub)cluster, a request that crosses
/// the boundary — the shape that made a copy of old bytes overwrite an in-place write.
fn make_burst(rng: &mut StdRng, t: &Template, c: u64) -> Vec<Op> {
    let cs = t.cluster;
    let lo = (c * cs).saturating_sub(cs / 4);
    let hi = ((c + 1) * cs + cs / 4).min(DISK);
    let mut points = if rng.gen_bool(0.5) {
        straddle(rng, t, c)
    } else {
        Vec::new()
    };
    let k = rng.gen_range(2..=4);
    while points.len() < 2 * k {
        points.push(pick_point(rng, t, lo, hi));
    }
    points.sort_unstable();
    points.dedup();
    points
        .chunks_exact(2)
        .map(|pair| make_op(rng, pair[0], pair[1] - pair[0]))
        .collect()
}

/// Four points `a < b < d < e` around a subcluster boundary of cluster `c`: `[a, b)` inside
/// the subcluster on one side, `[d, e)` from the same subcluster across the boundary (or
/// mirrored). Other random points may split these ranges further, which is fine.
fn straddle(rng: &mut StdRng, t: &Template, c: u64) -> Vec<u64> {
    let g = t.grain;
    let n = t.cluster / g;
    let x = c * t.cluster + rng.gen_range(0..n) * g; // the subcluster holding both requests
    let inner = |rng: &mut StdRng| x + rng.gen_range(1..g);
    let (p, mut q) = (inner(rng), inner(rng));
    while p == q {
        q = inner(rng);
    }
    let (p, q) = (p.min(q), p.max(q));
    let far = rng.gen_range(1..=2 * g);
    if rng.gen_bool(0.5) {
        // In-place candidate at the start of the subcluster, the crossing request after it.
        let a = if rng.gen_bool(0.5) {
            x
        } else {
            x + (p - x) / 2
        };
        vec![a, p, q, (x + g + far).min(DISK)]
    } else {
        // The crossing request comes from the previous subcluster and ends inside this one.
        let e = if rng.gen_bool(0.5) {
            x + g
        } else {
            q + (x + g - q) / 2
        };
        vec![x.saturating_sub(far), p, q, e]
    }
}

fn make_op(rng: &mut StdRng, off: u64, len: u64) -> Op {
    if rng.gen_range(0..5) == 0 {
        return Op::Zero(off, len, rng.gen_bool(0.5));
    }
    let tag = rng.r#gen::<u8>() | 1;
    let data = (0..len).map(|i| tag.wrapping_add(i as u8) | 1).collect();
    Op::Write(off, data)
}

async fn apply(img: Image, op: Op) {
    let r = match &op {
        Op::Write(off, data) => img.write_at(data, *off).await,
        Op::Zero(off, len, unmap) => {
            let flags = ZeroFlags { may_unmap: *unmap };
            img.write_zeroes(*off, *len, flags).await
        }
    };
    if let Err(e) = r {
        panic!("{op:?}: {e}");
    }
}

fn apply_to_shadow(shadow: &mut [u8], op: &Op) {
    match op {
        Op::Write(off, data) => {
            shadow[*off as usize..*off as usize + data.len()].copy_from_slice(data)
        }
        Op::Zero(off, len, _) => shadow[*off as usize..(*off + *len) as usize].fill(0),
    }
}

/// `qemu-img check` and `qemu-img compare` of image bytes against the shadow.
fn qemu_verify(dir: &Path, bytes: &[u8], shadow: &[u8], what: &str) {
    let img = dir.join("result.qcow2");
    let raw = dir.join("result.raw");
    std::fs::write(&img, bytes).unwrap();
    std::fs::write(&raw, shadow).unwrap();
    let i = img.to_str().unwrap();
    let (code, out) = common::status("qemu-img", &["check", i]);
    assert_eq!(code, 0, "{what}: qemu-img check:\n{out}");
    let r = raw.to_str().unwrap();
    let (code, out) = common::status("qemu-img", &["compare", "-f", "raw", "-F", "qcow2", r, i]);
    assert_eq!(code, 0, "{what}: qemu-img compare:\n{out}");
}

/// One iteration: fresh image, one burst into one cluster, verify.
async fn iteration(t: &Template, dir: &Path, seed: u64, i: u64) {
    let mut rng = StdRng::seed_from_u64(seed ^ i.wrapping_mul(0x9e37_79b9_7f4a_7c15));
    // The second half was rewritten after the snapshot: there requests can write in place.
    let n = DISK / t.cluster;
    let first = if rng.gen_bool(0.5) { n / 2 } else { 0 };
    let c = rng.gen_range(first..n);
    let ops = make_burst(&mut rng, t, c);
    let what = format!("{} seed {seed} iteration {i} cluster {c}: {ops:?}", t.name);
    let mem = Arc::new(MemoryStorage::from_vec(t.bytes.clone()));
    let storage = Arc::new(YieldingStorage::new(mem.clone(), rng.r#gen()));
    // An in-memory image has no directory: its (absolute) backing name must be trusted.
    let opts = OpenOptions::new()
        .writable(true)
        .references(ReferencePolicy::Any)
        .flush_interval(None)
        .slice_size(512);
    let img = Image::open_storage(storage, &opts).await.unwrap();
    let tasks: Vec<_> = ops
        .iter()
        .map(|op| tokio::spawn(apply(img.clone(), op.clone())))
        .collect();
    for task in tasks {
        task.await.unwrap_or_else(|e| panic!("{what}: {e}"));
    }
    let mut shadow = t.content.clone();
    ops.iter().for_each(|op| apply_to_shadow(&mut shadow, op));
    let mut got = vec![0u8; DISK as usize];
    img.read_at(&mut got, 0).await.unwrap();
    if let Some(d) = common::first_difference(&got, &shadow) {
        panic!("{what}: byte {d} is {:#x}, want {:#x}", got[d], shadow[d]);
    }
    img.close().await.unwrap();
    drop(img);
    if i % QEMU_SAMPLE == 0 {
        qemu_verify(dir, &mem.snapshot(), &shadow, &what);
    }
}

fn seed() -> u64 {
    std::env::var("QCOW2_TEST_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(rand::random)
}

async fn run(name: &'static str, opts: &str, cs: u64, grain: u64) {
    let seed = seed();
    eprintln!("{name}: QCOW2_TEST_SEED={seed}");
    let dir = tempfile::tempdir().unwrap();
    let t = make_template(dir.path(), name, opts, cs, grain);
    for i in 0..ITERATIONS {
        iteration(&t, dir.path(), seed, i).await;
    }
}

/// Extended L2: requests spanning allocated, unallocated and zero subclusters of one
/// cluster while others write in place into the same cluster (issue 7 item 2).
#[tokio::test]
async fn extended_l2_mixed_subclusters() {
    run(
        "extended_l2",
        "cluster_size=16384,extended_l2=on",
        16384,
        512,
    )
    .await;
}

/// Standard L2: COW from backing, compressed and snapshot-shared clusters while other
/// requests to the same cluster wait for the new mapping or write in place.
#[tokio::test]
async fn standard_l2_cow_states() {
    run("standard_l2", "cluster_size=4096", 4096, 512).await;
}
