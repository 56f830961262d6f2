//! Cancellation (DESIGN.md §5c): every public future of the engine is dropped at every await
//! point, with its IO parked (`ParkStorage`), then other requests run, the late IO lands,
//! the image is closed and checked by QEMU: `qemu-img check` clean (no leaks either), and
//! `qemu-img convert` content equal to a shadow copy — data of completed calls exact, the
//! dropped call's range old or new (or zeros where the follow-up discarded it), and nothing
//! of the dropped call anywhere else.
//!
//! The follow-up after each drop discards the dropped call's clusters, flushes and writes
//! fresh clusters: the freed host clusters get reused, which is where a late write from a
//! dropped request that had stopped being tracked would land.

use crate::common;

use std::future::Future;
use std::ops::Range;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use qcow2_engine::image::{Image, OpenOptions, ZeroFlags};
use qcow2_engine::storage::{MemoryStorage, ParkStorage};

const CS: u64 = 4096;
const SIZE: u64 = 8 << 20;
/// Template data: clusters 0..16 hold the byte `cluster + 1`.
const FILLED: u64 = 16;
/// The byte the dropped call writes, and the byte the follow-up writes.
const DROPPED: u8 = 0xdd;
const FOLLOW: u8 = 0xee;
/// Follow-up writes go here: unallocated in the template, same L2 table as the template data.
const FRESH: Range<u64> = 40 * CS..44 * CS;

type BoxFut<'a> = Pin<Box<dyn Future<Output = qcow2_engine::Result<()>> + Send + 'a>>;

/// One public operation to cancel.
struct Case {
    name: &'static str,
    /// Run [`prep_writes`] (unparked) before the operation; their data must survive.
    prep: bool,
    op: fn(&Image) -> BoxFut<'_>,
    /// Guest range the operation may change (to its own data, or zeros).
    range: Range<u64>,
    /// What the range holds when the operation completes (per byte).
    new: fn(u64) -> u8,
}

/// Template content of guest byte `off`.
fn template(off: u64) -> u8 {
    let c = off / CS;
    if c < FILLED { c as u8 + 1 } else { 0 }
}

fn dropped(_: u64) -> u8 {
    DROPPED
}

fn zero(_: u64) -> u8 {
    0
}

/// Prep for the flush case: a write into a region without an L2 table (new L2 table, new L1
/// entry), plus an in-place rewrite.
const PREP_AT: u64 = 4 << 20;

fn prep_writes(img: &Image) -> BoxFut<'_> {
    Box::pin(async move {
        img.write_at(&[0xa1; CS as usize], PREP_AT + CS).await?;
        img.write_at(&[0xa2; 512], 3 * CS).await
    })
}

fn prep_content(off: u64) -> Option<u8> {
    if (PREP_AT + CS..PREP_AT + 2 * CS).contains(&off) {
        return Some(0xa1);
    }
    (3 * CS..3 * CS + 512).contains(&off).then_some(0xa2)
}

fn cases() -> Vec<Case> {
    vec![
        Case {
            name: "flush",
            prep: true,
            op: |img| Box::pin(img.flush()),
            range: 0..0,
            new: zero,
        },
        Case {
            name: "close",
            prep: true,
            op: |img| Box::pin(img.close()),
            range: 0..0,
            new: zero,
        },
        Case {
            name: "write_at in place",
            prep: false,
            op: |img| Box::pin(img.write_at(&[DROPPED; CS as usize], 3 * CS)),
            range: 3 * CS..4 * CS,
            new: dropped,
        },
        Case {
            name: "write_at allocating (new L2 table, zero fill)",
            prep: false,
            op: |img| Box::pin(img.write_at(&[DROPPED; 1024], PREP_AT + 1024)),
            range: PREP_AT..PREP_AT + CS,
            new: |off| {
                if (PREP_AT + 1024..PREP_AT + 2048).contains(&off) {
                    DROPPED
                } else {
                    0
                }
            },
        },
        Case {
            name: "write_at spanning clusters",
            prep: false,
            op: |img| Box::pin(img.write_at(&[DROPPED; 3 * CS as usize], 14 * CS + 512)),
            range: 14 * CS + 512..17 * CS + 512,
            new: dropped,
        },
        Case {
            name: "write_zeroes",
            prep: false,
            op: |img| {
                Box::pin(img.write_zeroes(5 * CS + 512, 2 * CS, ZeroFlags { may_unmap: true }))
            },
            range: 5 * CS + 512..7 * CS + 512,
            new: zero,
        },
        Case {
            name: "discard",
            prep: false,
            op: |img| Box::pin(img.discard(8 * CS, 2 * CS)),
            range: 8 * CS..10 * CS,
            new: zero,
        },
        Case {
            name: "write_compressed",
            prep: false,
            op: |img| Box::pin(img.write_compressed(&[DROPPED; CS as usize], 11 * CS)),
            range: 11 * CS..12 * CS,
            new: dropped,
        },
        Case {
            name: "resize (moves the L1 table)",
            prep: true,
            op: |img| Box::pin(img.resize(SIZE + (2 << 30))),
            range: 0..0,
            new: zero,
        },
    ]
}

fn opts() -> OpenOptions {
    // No background flusher: the test decides when flushes happen.
    OpenOptions::new()
        .writable(true)
        .flush_interval(None)
        .dirty_threshold_percent(100)
}

/// A fresh qcow2 image (4 KiB clusters) with the template data, as bytes.
async fn make_template(dir: &std::path::Path) -> Vec<u8> {
    let path = dir.join("template.qcow2");
    let p = path.to_str().unwrap();
    common::qemu_create(p, "cluster_size=4k", "8M");
    let img = Image::open(&path, &opts()).await.unwrap();
    for c in 0..FILLED {
        img.write_at(&[c as u8 + 1; CS as usize], c * CS)
            .await
            .unwrap();
    }
    img.close().await.unwrap();
    std::fs::read(&path).unwrap()
}

/// Poll `fut` once with a waker that does nothing (the test drives progress itself).
fn poll_once(fut: &mut BoxFut<'_>) -> Poll<qcow2_engine::Result<()>> {
    fut.as_mut().poll(&mut Context::from_waker(Waker::noop()))
}

/// Run the case's operation with parked IO for at most `steps` polls (releasing one parked
/// request between two polls), then drop it. Returns whether it completed.
async fn start_and_drop(img: &Image, park: &ParkStorage, case: &Case, steps: usize) -> bool {
    park.hold();
    let mut fut = (case.op)(img);
    for i in 0..steps {
        // Drop right after the last poll, with whatever IO it queued still parked.
        if i > 0 && !park.release_one().await {
            tokio::task::yield_now().await;
        }
        if let Poll::Ready(r) = poll_once(&mut fut) {
            r.unwrap_or_else(|e| panic!("{}: {e}", case.name));
            park.release_all().await;
            return true;
        }
    }
    drop(fut);
    false
}

/// After the drop: discard the dropped call's clusters, flush, write fresh clusters (reusing
/// what was freed), flush — while the dropped call's IO is still parked; then let it land.
async fn follow_up(img: &Image, park: &ParkStorage, case: &Case) {
    park.stop_holding();
    let (img2, range) = (img.clone(), case.range.clone());
    let task = tokio::spawn(async move {
        if !range.is_empty() {
            let start = range.start / CS * CS;
            let end = range.end.div_ceil(CS) * CS;
            img2.discard(start, end - start).await?;
        }
        img2.flush().await?;
        let fresh = vec![FOLLOW; (FRESH.end - FRESH.start) as usize];
        img2.write_at(&fresh, FRESH.start).await?;
        img2.flush().await
    });
    // The follow-up may wait for the dropped call (which waits for its parked IO): give it
    // time to get as far as it can, then let the parked IO land.
    let mut task = task;
    let early = tokio::time::timeout(Duration::from_millis(20), &mut task).await;
    park.release_all().await;
    let done = match early {
        Ok(done) => done,
        Err(_) => task.await,
    }
    .unwrap();
    done.unwrap_or_else(|e| panic!("{}: follow-up: {e}", case.name));
}

/// Writes are refused after a close: the close case has no follow-up.
fn has_follow_up(case: &Case) -> bool {
    case.name != "close"
}

/// Whether the case's follow-up discards guest byte `off`.
fn discarded(case: &Case, off: u64) -> bool {
    let (start, end) = (case.range.start / CS * CS, case.range.end.div_ceil(CS) * CS);
    (start..end).contains(&off)
}

/// Check every byte of `raw` against what may be there.
fn verify(case: &Case, steps: usize, raw: &[u8]) {
    for (i, &b) in raw.iter().enumerate() {
        let off = i as u64;
        let base = prep_content(off).filter(|_| case.prep);
        let old = base.unwrap_or_else(|| template(off));
        let ok = if FRESH.contains(&off) && has_follow_up(case) {
            b == FOLLOW
        } else if discarded(case, off) {
            b == 0 || (case.range.contains(&off) && b == (case.new)(off))
        } else if case.range.contains(&off) {
            b == old || b == (case.new)(off)
        } else {
            b == old
        };
        assert!(
            ok,
            "{} dropped after {steps} steps: byte {b:#x} at {off:#x} (was {old:#x})",
            case.name
        );
    }
}

/// One case, dropped after `steps` steps. Returns whether the operation completed.
async fn run_case(dir: &std::path::Path, tpl: &[u8], case: &Case, steps: usize) -> bool {
    let mem = Arc::new(MemoryStorage::from_vec(tpl.to_vec()));
    let park = Arc::new(ParkStorage::new(mem.clone()));
    let img = Image::open_storage(park.clone(), &opts()).await.unwrap();
    if case.prep {
        prep_writes(&img).await.unwrap();
    }
    let completed = start_and_drop(&img, &park, case, steps).await;
    if has_follow_up(case) {
        follow_up(&img, &park, case).await;
    } else {
        park.release_all().await;
    }
    img.close().await.unwrap();
    drop(img);
    let path = dir.join("case.qcow2");
    std::fs::write(&path, mem.snapshot()).unwrap();
    let (code, text) = common::status("qemu-img", &["check", path.to_str().unwrap()]);
    assert_eq!(
        code, 0,
        "{} dropped after {steps} steps: qemu-img check:\n{text}",
        case.name
    );
    let raw = qemu_head(&path, SIZE);
    verify(case, steps, &raw);
    completed
}

/// The first `len` bytes of the image's content, read by QEMU.
fn qemu_head(img: &std::path::Path, len: u64) -> Vec<u8> {
    let out = img.with_extension("head.raw");
    let (i, o) = (img.to_str().unwrap(), out.to_str().unwrap());
    std::fs::remove_file(&out).ok();
    common::run(
        "qemu-img",
        &[
            "dd",
            "-f",
            "qcow2",
            "-O",
            "raw",
            "bs=1M",
            &format!("count={}", len >> 20),
            &format!("if={i}"),
            &format!("of={o}"),
        ],
    );
    let data = std::fs::read(&out).unwrap();
    std::fs::remove_file(&out).ok();
    data
}

/// Drop the named case's operation after 0, 1, 2, ... steps until it completes.
async fn cancel_everywhere(name: &str) {
    let dir = tempfile::tempdir().unwrap();
    let tpl = make_template(dir.path()).await;
    let case = cases()
        .into_iter()
        .find(|c| c.name.starts_with(name))
        .unwrap();
    let mut steps = 0;
    while !run_case(dir.path(), &tpl, &case, steps).await {
        steps += 1;
        assert!(steps < 200, "{} never completes", case.name);
    }
}

macro_rules! cancel_tests {
    ($($test:ident: $name:literal,)*) => {$(
        #[tokio::test(flavor = "current_thread")]
        async fn $test() {
            cancel_everywhere($name).await;
        }
    )*};
}

cancel_tests! {
    flush: "flush",
    close: "close",
    write_in_place: "write_at in place",
    write_allocating: "write_at allocating",
    write_spanning: "write_at spanning",
    write_zeroes: "write_zeroes",
    discard: "discard",
    write_compressed: "write_compressed",
    resize: "resize",
}

/// Even the task that finishes a dropped flush can be dropped: when its runtime shuts down.
/// The flush then puts the L1 entries it took back into the dirty set (and clears the
/// "being written" marks of its slices), so a close on another runtime still writes them.
#[test]
fn flush_dropped_by_runtime_shutdown_keeps_its_l1_entries() {
    let dir = tempfile::tempdir().unwrap();
    let runtime = || {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
    };
    let first = runtime();
    let tpl = first.block_on(make_template(dir.path()));
    let mem = Arc::new(MemoryStorage::from_vec(tpl));
    let park = Arc::new(ParkStorage::new(mem.clone()));
    let img = first.block_on(async {
        let img = Image::open_storage(park.clone(), &opts()).await.unwrap();
        prep_writes(&img).await.unwrap();
        park.hold();
        let flushing = tokio::spawn({
            let img = img.clone();
            async move { img.flush().await }
        });
        while park.parked() == 0 {
            tokio::task::yield_now().await;
        }
        drop(flushing); // detached: only the runtime's shutdown stops it
        img
    });
    drop(first);
    runtime().block_on(async {
        park.release_all().await;
        img.close().await.unwrap();
    });
    drop(img);
    let path = dir.path().join("shutdown.qcow2");
    std::fs::write(&path, mem.snapshot()).unwrap();
    common::assert_check_clean(&path);
    let raw = qemu_head(&path, SIZE);
    for (i, &b) in raw.iter().enumerate() {
        let off = i as u64;
        let want = prep_content(off).unwrap_or_else(|| template(off));
        assert_eq!(b, want, "byte at {off:#x}");
    }
}

/// Append one cluster to an image's bytes and give it refcount 1 (16-bit refcounts,
/// qemu-img's default) without any mapping using it: a leak that `qemu-img check` reports.
fn append_leaked_cluster(bytes: &mut Vec<u8>) {
    let index = bytes.len() as u64 / CS;
    bytes.resize(bytes.len() + CS as usize, 0);
    let be = |b: &[u8], at: usize| u64::from_be_bytes(b[at..at + 8].try_into().unwrap());
    let block = be(bytes, be(bytes, 48) as usize) as usize;
    let at = block + 2 * index as usize;
    bytes[at..at + 2].copy_from_slice(&1u16.to_be_bytes());
}

/// A `check -r` repair (and, through the same wrapper, the refcount rebuild a writable open
/// of a dirty image runs) dropped after 0, 1, 2, ... steps still finishes: the image ends up
/// clean with its data intact. Before repairs were detached, a dropped repair left the leak.
#[tokio::test(flavor = "current_thread")]
async fn repair_dropped_at_each_step_still_finishes() {
    use qcow2_engine::check::{CheckOptions, RepairMode, repair_with};
    let dir = tempfile::tempdir().unwrap();
    let mut tpl = make_template(dir.path()).await;
    append_leaked_cluster(&mut tpl);
    let path = dir.path().join("repair.qcow2");
    // From one poll on: a future never polled has done nothing (the leak stays).
    for steps in 1..200usize {
        let mem = Arc::new(MemoryStorage::from_vec(tpl.clone()));
        let park = Arc::new(ParkStorage::new(mem.clone()));
        park.hold();
        let opts = CheckOptions::default();
        let mut fut: Pin<Box<dyn Future<Output = _> + Send>> =
            Box::pin(repair_with(park.clone(), &opts, RepairMode::Leaks));
        let mut completed = false;
        for i in 0..steps {
            if i > 0 && !park.release_one().await {
                tokio::task::yield_now().await;
            }
            if let Poll::Ready(r) = fut.as_mut().poll(&mut Context::from_waker(Waker::noop())) {
                r.unwrap();
                completed = true;
                break;
            }
        }
        drop(fut);
        park.release_all().await;
        // The background task owns a handle on the storage until the repair is done.
        for _ in 0..5000 {
            if Arc::strong_count(&park) == 1 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        assert_eq!(
            Arc::strong_count(&park),
            1,
            "repair still running after 5 s"
        );
        std::fs::write(&path, mem.snapshot()).unwrap();
        let (code, text) = common::status("qemu-img", &["check", path.to_str().unwrap()]);
        assert_eq!(code, 0, "repair dropped after {steps} steps:\n{text}");
        let raw = qemu_head(&path, SIZE);
        assert!(
            raw.iter()
                .enumerate()
                .all(|(i, &b)| b == template(i as u64)),
            "repair dropped after {steps} steps changed guest data"
        );
        if completed {
            return;
        }
    }
    panic!("the repair never completed in 200 steps");
}
