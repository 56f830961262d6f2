//! Runtime independence: the engine needs no particular async runtime.
//!
//! `BlockingImage` is driven from inside tokio runtimes of every shape (as from a
//! `#[tokio::main]` function), and the async `Image` runs under a minimal executor with no
//! tokio runtime at all, its background flusher still writing metadata on its own thread.
//! QEMU checks every resulting image.

use crate::common;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use futures_lite::future::block_on;
use qcow2_engine::blocking::BlockingImage;
use qcow2_engine::image::create::{CreateOptions, create};
use qcow2_engine::image::{Flusher, Image, OpenOptions};

/// `qemu-img create -f qcow2 -o cluster_size=64k DIR/NAME 8M`.
fn qemu_create(dir: &Path, name: &str) -> PathBuf {
    let p = dir.join(name);
    common::run(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "cluster_size=65536",
            p.to_str().unwrap(),
            "8M",
        ],
    );
    p
}

/// `qemu-io -c 'read -P PATTERN OFF LEN'` succeeds (extra args such as `-U` first).
fn qemu_reads(img: &Path, extra: &[&str], pattern: u8, off: u64, len: u64) -> bool {
    let cmd = format!("read -P {pattern:#x} {off} {len}");
    let mut args = extra.to_vec();
    args.extend(["-f", "qcow2", "-c", &cmd, img.to_str().unwrap()]);
    let (code, text) = common::status("qemu-io", &args);
    code == 0 && !text.contains("Pattern verification failed")
}

/// Open/write/read/flush/close through `BlockingImage`, with more requests than a tokio task's
/// cooperative budget (128) within one poll of the caller's task; QEMU checks the result.
fn blocking_round_trip(p: &Path) {
    let d = BlockingImage::open(p, &OpenOptions::new().writable(true)).unwrap();
    for i in 0..300u64 {
        d.write_at(&[0x5a; 4096], i * 4096).unwrap();
    }
    let mut buf = vec![0u8; 300 * 4096];
    d.read_at(&mut buf, 0).unwrap();
    assert!(buf.iter().all(|&b| b == 0x5a), "read back what was written");
    d.flush_image().unwrap();
    d.close().unwrap();
    common::assert_check_clean(p);
    assert!(qemu_reads(p, &[], 0x5a, 0, 300 * 4096));
    assert!(qemu_reads(p, &[], 0, 300 * 4096, (8 << 20) - 300 * 4096));
}

/// `BlockingImage` called from within `rt.block_on` (what `#[tokio::main]` does). It runs on
/// a thread of its own so that a hang (tokio's cooperative budget running out inside the
/// caller's task used to spin for ever) fails the test instead of stalling the suite.
fn blocking_inside(rt: tokio::runtime::Runtime, name: &str) {
    let dir = tempfile::tempdir().unwrap();
    let p = qemu_create(dir.path(), name);
    let (done, finished) = std::sync::mpsc::channel();
    let caller = std::thread::spawn(move || {
        rt.block_on(async { blocking_round_trip(&p) });
        let _ = done.send(());
    });
    match finished.recv_timeout(Duration::from_secs(60)) {
        Ok(()) => caller.join().unwrap(),
        Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
            std::panic::resume_unwind(caller.join().unwrap_err())
        }
        Err(e) => panic!("BlockingImage inside a tokio runtime hung: {e}"),
    }
}

#[test]
fn blocking_image_inside_current_thread_runtime() {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    blocking_inside(rt, "ct.qcow2");
}

#[test]
fn blocking_image_inside_current_thread_runtime_without_time() {
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    blocking_inside(rt, "ct_notime.qcow2");
}

#[test]
fn blocking_image_inside_multi_thread_runtime() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    blocking_inside(rt, "mt.qcow2");
}

#[test]
fn blocking_image_inside_multi_thread_runtime_without_time() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .build()
        .unwrap();
    blocking_inside(rt, "mt_notime.qcow2");
}

#[test]
fn blocking_image_outside_any_runtime() {
    let dir = tempfile::tempdir().unwrap();
    let p = qemu_create(dir.path(), "plain.qcow2");
    blocking_round_trip(&p);
}

/// Wait (up to 5 s) until QEMU, reading the still-open image with `-U`, sees `pattern` at
/// `[0, len)`: the background flusher wrote the metadata that maps it.
fn flushed_in_background(p: &Path, pattern: u8, len: u64) -> bool {
    let until = Instant::now() + Duration::from_secs(5);
    while Instant::now() < until {
        if qemu_reads(p, &["-r", "-U"], pattern, 0, len) {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    false
}

/// On a current-thread runtime without timers, the background flusher still runs (it used to
/// be a tokio task that panicked in `tokio::time::sleep`).
#[test]
fn flusher_runs_under_current_thread_runtime_without_time() {
    let dir = tempfile::tempdir().unwrap();
    let p = qemu_create(dir.path(), "notime.qcow2");
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    let opts = OpenOptions::new()
        .writable(true)
        .flush_interval(Some(Duration::from_millis(50)));
    let img = rt.block_on(async {
        let img = Image::open(&p, &opts).await.unwrap();
        img.write_at(&[0x6b; 200_000], 0).await.unwrap();
        img
    });
    // The runtime is idle now: only a flusher of its own can write the metadata.
    assert!(
        flushed_in_background(&p, 0x6b, 200_000),
        "the flusher never wrote the mapping"
    );
    rt.block_on(img.close()).unwrap();
    common::assert_check_clean(&p);
}

/// Open `p` writable with `flusher` and a 50 ms flush interval, write `pattern` over
/// `[0, 200000)` and wait until QEMU sees it without any flush call of ours.
async fn write_and_wait_for_flusher(p: &Path, flusher: Flusher, pattern: u8) -> Image {
    let opts = OpenOptions::new()
        .writable(true)
        .flush_interval(Some(Duration::from_millis(50)))
        .flusher(flusher);
    let img = Image::open(p, &opts).await.unwrap();
    img.write_at(&[pattern; 200_000], 0).await.unwrap();
    img
}

/// No tokio runtime at all: a minimal executor drives create, write, read back and close,
/// and the background flusher (a thread) writes the metadata meanwhile.
#[test]
fn engine_under_a_minimal_executor_with_background_flusher() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("fl.qcow2");
    block_on(async {
        std::fs::File::create(&p).unwrap();
        let file = common::storage(&p, false);
        let mut co = CreateOptions::default();
        co.apply_o("size=8M,cluster_size=65536").unwrap();
        create(file.as_ref(), None, &co).await.unwrap();
    });
    let img = block_on(write_and_wait_for_flusher(&p, Flusher::Thread, 0x3c));
    let mut buf = vec![0u8; 200_000];
    block_on(img.read_at(&mut buf, 0)).unwrap();
    assert!(buf.iter().all(|&b| b == 0x3c));
    assert!(
        flushed_in_background(&p, 0x3c, 200_000),
        "the flusher never wrote the mapping"
    );
    let (code, _) = common::qemu_check(&p, &["-U"]);
    assert_eq!(
        code, 0,
        "qemu-img check -U of the flushed, still open image"
    );
    block_on(img.close()).unwrap();
    common::assert_check_clean(&p);
    assert!(qemu_reads(&p, &[], 0x3c, 0, 200_000));
}

/// The control for the test above: without a background flusher nothing reaches the file
/// until close (so what that test sees is the flusher's work).
#[test]
fn without_a_flusher_metadata_waits_for_close() {
    let dir = tempfile::tempdir().unwrap();
    let p = qemu_create(dir.path(), "none.qcow2");
    let img = block_on(write_and_wait_for_flusher(&p, Flusher::None, 0x3d));
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        !qemu_reads(&p, &["-r", "-U"], 0x3d, 0, 200_000),
        "nothing flushed the mapping yet"
    );
    block_on(img.close()).unwrap();
    common::assert_check_clean(&p);
    assert!(qemu_reads(&p, &[], 0x3d, 0, 200_000));
}

/// The flusher as a task on a tokio runtime the caller gives (`Flusher::Tokio`): it flushes,
/// and it ends when the image is closed (the runtime's task count drops back to zero).
#[test]
fn tokio_flusher_task_runs_and_ends_on_close() {
    let dir = tempfile::tempdir().unwrap();
    let p = qemu_create(dir.path(), "tk.qcow2");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let flusher = Flusher::Tokio(rt.handle().clone());
    let img = block_on(write_and_wait_for_flusher(&p, flusher, 0x4e));
    assert_eq!(rt.metrics().num_alive_tasks(), 1, "the flusher task");
    assert!(
        flushed_in_background(&p, 0x4e, 200_000),
        "the flusher never wrote the mapping"
    );
    block_on(img.close()).unwrap();
    assert!(
        eventually(|| rt.metrics().num_alive_tasks() == 0),
        "the flusher task outlived its image"
    );
    common::assert_check_clean(&p);
    assert!(qemu_reads(&p, &[], 0x4e, 0, 200_000));
}

/// `cond` becomes true within 5 s.
fn eventually(mut cond: impl FnMut() -> bool) -> bool {
    let until = Instant::now() + Duration::from_secs(5);
    while Instant::now() < until {
        if cond() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    false
}

/// Thread ids of this process's `qcow2-flusher` threads.
fn flusher_threads() -> BTreeSet<u64> {
    let tasks = std::fs::read_dir("/proc/self/task").unwrap();
    tasks
        .filter_map(|t| {
            let t = t.ok()?;
            let comm = std::fs::read_to_string(t.path().join("comm")).ok()?;
            let tid = t.file_name().to_str()?.parse().ok()?;
            (comm.trim_end() == "qcow2-flusher").then_some(tid)
        })
        .collect()
}

/// Open `p` and find the flusher thread it started (other tests of this binary start
/// flushers too: retry until exactly one new thread appeared).
fn open_with_own_flusher(p: &Path, interval: Option<Duration>) -> (Image, u64) {
    let opts = OpenOptions::new().writable(true).flush_interval(interval);
    for _ in 0..20 {
        let before = flusher_threads();
        let img = block_on(Image::open(p, &opts)).unwrap();
        // A new thread takes its name a moment after it started.
        let new = || -> Vec<u64> { flusher_threads().difference(&before).copied().collect() };
        eventually(|| !new().is_empty());
        if let [tid] = new()[..] {
            return (img, tid);
        }
        block_on(img.close()).unwrap();
    }
    panic!("could not tell this image's flusher thread from the others'");
}

/// Closing an image ends its flusher thread, and so does dropping it without close (even
/// with no flush interval, where the thread would otherwise wait for ever).
#[test]
fn close_and_drop_end_the_flusher_thread() {
    let dir = tempfile::tempdir().unwrap();
    let p = qemu_create(dir.path(), "th.qcow2");
    let (img, tid) = open_with_own_flusher(&p, Some(Duration::from_secs(3600)));
    block_on(img.write_at(&[0x21; 4096], 0)).unwrap();
    block_on(img.close()).unwrap();
    assert!(
        eventually(|| !flusher_threads().contains(&tid)),
        "close left the flusher running"
    );
    common::assert_check_clean(&p);
    assert!(qemu_reads(&p, &[], 0x21, 0, 4096));

    let (img, tid) = open_with_own_flusher(&p, None);
    block_on(img.write_at(&[0x22; 4096], 65536)).unwrap();
    block_on(img.flush()).unwrap();
    drop(img);
    assert!(
        eventually(|| !flusher_threads().contains(&tid)),
        "drop left the flusher running"
    );
    common::assert_check_clean(&p);
    assert!(qemu_reads(&p, &[], 0x22, 65536, 4096));
}
