//! Error handling under injected storage faults ([`FaultStorage`] under the engine).
//!
//! The rules checked (DESIGN.md §4, STYLE.md "Errors"):
//! - a failed data write or read fails that request only; the image goes on working and
//!   closes clean;
//! - a failed metadata write or fsync during `flush()` poisons the image: that flush errors,
//!   every later write, zero, discard and flush errors with [`ErrorKind::Poisoned`], reads
//!   still work; and what reached the storage is consistent (no corruption, leaks allowed),
//!   with everything flushed before the failure readable;
//! - ENOSPC is [`ErrorKind::NoSpace`]; torn writes are errors; nothing panics.
//!
//! Images start as `qemu-img create` files read into a [`MemoryStorage`].

use crate::common;

use std::sync::Arc;

use qcow2_engine::check::{CheckOptions, CheckReport, RepairMode, check, repair};
use qcow2_engine::image::{Image, OpenOptions, ZeroFlags};
use qcow2_engine::storage::{FaultError, FaultRule, FaultStorage, MemoryStorage, OpKind};
use qcow2_engine::{ErrorKind, Storage};

const KIB: u64 = 1024;
const MIB: u64 = 1024 * KIB;

/// An engine image over fault-injecting memory storage.
struct Rig {
    mem: Arc<MemoryStorage>,
    fault: Arc<FaultStorage>,
    img: Image,
}

/// The bytes of a fresh 64 MiB qcow2 image made by `qemu-img create -o opts`.
fn qemu_image(opts: &str) -> Vec<u8> {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("t.qcow2");
    let p = p.to_str().unwrap();
    common::qemu_create(p, opts, "64M");
    std::fs::read(p).unwrap()
}

/// Options that keep the background flusher out of the way: every flush is the test's.
fn rw_options() -> OpenOptions {
    OpenOptions::new()
        .writable(true)
        .flush_interval(None)
        .dirty_threshold_percent(100)
}

/// Open `bytes` read-write under a fault wrapper with no rules.
async fn rig(bytes: Vec<u8>) -> Rig {
    let mem = Arc::new(MemoryStorage::from_vec(bytes));
    let fault = Arc::new(FaultStorage::new(mem.clone()));
    let img = Image::open_storage(fault.clone(), &rw_options())
        .await
        .unwrap();
    Rig { mem, fault, img }
}

fn pattern(byte: u8, len: u64) -> Vec<u8> {
    vec![byte; len as usize]
}

async fn read(img: &Image, off: u64, len: u64) -> Vec<u8> {
    let mut buf = vec![0u8; len as usize];
    img.read_at(&mut buf, off).await.unwrap();
    buf
}

async fn assert_reads(img: &Image, off: u64, byte: u8, len: u64) {
    let got = read(img, off, len).await;
    assert!(
        got.iter().all(|&b| b == byte),
        "{len} bytes at {off:#x} should read {byte:#x}, first differing at {:?}",
        got.iter().position(|&b| b != byte)
    );
}

/// Our check of image bytes.
async fn check_bytes(bytes: Vec<u8>) -> CheckReport {
    let s: Arc<dyn Storage> = Arc::new(MemoryStorage::from_vec(bytes));
    check(s, &CheckOptions::default()).await.unwrap()
}

/// `qemu-img check` of image bytes must find them clean.
fn assert_qemu_clean(bytes: &[u8]) {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("out.qcow2");
    std::fs::write(&p, bytes).unwrap();
    common::assert_check_clean(&p);
}

/// Reopen the storage's bytes read-only, without faults.
async fn reopen(bytes: Vec<u8>) -> Image {
    let s: Arc<dyn Storage> = Arc::new(MemoryStorage::from_vec(bytes));
    Image::open_storage(s, &OpenOptions::new()).await.unwrap()
}

// ---------------------------------------------------------------------------------------------
// (a) data writes

#[tokio::test]
async fn failed_data_writes_fail_only_their_request() {
    let r = rig(qemu_image("cluster_size=65536")).await;
    r.img.write_at(&pattern(1, 128 * KIB), 0).await.unwrap();
    r.img.flush().await.unwrap();

    // In place: the only storage write of the request is its data.
    r.fault.set_rule(FaultRule::on(OpKind::Write));
    let err = r.img.write_at(&pattern(2, 64 * KIB), 0).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Io, "{err}");
    r.img.write_at(&pattern(3, 64 * KIB), 0).await.unwrap();

    // Allocating: the data write fails, the mapping is never published.
    r.fault.set_rule(FaultRule::on(OpKind::Write));
    let err = r
        .img
        .write_at(&pattern(4, 64 * KIB), MIB)
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Io, "{err}");
    assert_reads(&r.img, MIB, 0, 64 * KIB).await;
    r.img.write_at(&pattern(5, 64 * KIB), MIB).await.unwrap();
    r.img
        .write_at(&pattern(6, 64 * KIB), 2 * MIB)
        .await
        .unwrap();
    r.img.flush().await.unwrap();

    assert_reads(&r.img, 0, 3, 64 * KIB).await;
    assert_reads(&r.img, 64 * KIB, 1, 64 * KIB).await;
    assert_reads(&r.img, MIB, 5, 64 * KIB).await;
    assert_reads(&r.img, 2 * MIB, 6, 64 * KIB).await;
    r.img.close().await.unwrap();
    let bytes = r.mem.snapshot();
    let report = check_bytes(bytes.clone()).await;
    assert!(report.is_clean(), "{report:?}");
    assert_qemu_clean(&bytes);
}

#[tokio::test]
async fn torn_data_writes_are_errors() {
    let r = rig(qemu_image("cluster_size=65536")).await;
    r.img.write_at(&pattern(1, 64 * KIB), 0).await.unwrap();
    for (i, off) in [0, 5 * MIB].into_iter().enumerate() {
        r.fault
            .set_rule(FaultRule::on(OpKind::Write).short_write(100 + i));
        let err = r
            .img
            .write_at(&pattern(7, 64 * KIB), off)
            .await
            .unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Io, "{err}");
    }
    r.img.write_at(&pattern(8, 4 * KIB), 8 * KIB).await.unwrap();
    assert_reads(&r.img, 8 * KIB, 8, 4 * KIB).await;
    r.img.close().await.unwrap();
    assert!(check_bytes(r.mem.snapshot()).await.is_clean());
}

// ---------------------------------------------------------------------------------------------
// (c) no space

#[tokio::test]
async fn enospc_is_no_space_and_recoverable_for_data() {
    let r = rig(qemu_image("cluster_size=65536")).await;
    r.img.write_at(&pattern(1, 64 * KIB), 0).await.unwrap();
    for kind in [
        OpKind::Write,
        OpKind::WriteZeroes,
        OpKind::SetLen,
        OpKind::Allocate,
    ] {
        let rule = FaultRule::on(kind).sticky().with_error(FaultError::Enospc);
        r.fault.add_rule(rule);
    }
    for off in [0, 3 * MIB, 40 * MIB] {
        let err = r
            .img
            .write_at(&pattern(2, 64 * KIB), off)
            .await
            .unwrap_err();
        assert_eq!(err.kind(), ErrorKind::NoSpace, "{err}");
    }
    r.fault.clear();
    r.img
        .write_at(&pattern(3, 64 * KIB), 40 * MIB)
        .await
        .unwrap();
    assert_reads(&r.img, 0, 1, 64 * KIB).await;
    assert_reads(&r.img, 40 * MIB, 3, 64 * KIB).await;
    r.img.close().await.unwrap();
    assert!(check_bytes(r.mem.snapshot()).await.is_clean());
}

// ---------------------------------------------------------------------------------------------
// (b), (d), (e) failures during flush

/// Cluster size of the flush tests: small, so that one L2 table covers only 2 MiB.
const FLUSH_CS: &str = "cluster_size=4096";

/// The workload before the fault: `A` flushed, `B` written but not flushed. Touches a new L2
/// table (and so the L1 table), an existing one, the refcount block, and frees.
async fn flushed_then_pending(img: &Image) {
    img.write_at(&pattern(0xa, 256 * KIB), 0).await.unwrap();
    img.write_at(&pattern(0xa, 64 * KIB), 4 * MIB)
        .await
        .unwrap();
    img.flush().await.unwrap();
    img.write_at(&pattern(0xb, 128 * KIB), 512 * KIB)
        .await
        .unwrap();
    img.write_at(&pattern(0xb, 64 * KIB), 33 * MIB)
        .await
        .unwrap();
    img.discard(4 * MIB, 64 * KIB).await.unwrap();
}

/// How many storage requests a successful flush of [`flushed_then_pending`] makes.
async fn flush_requests(bytes: &[u8]) -> u64 {
    let r = rig(bytes.to_vec()).await;
    flushed_then_pending(&r.img).await;
    r.fault.reset_counts();
    r.img.flush().await.unwrap();
    let c = r.fault.op_counts();
    assert_eq!(c.reads, 0, "a flush does not read: {c:?}");
    // Refcount block, two L2 slices, the L1 table; fsyncs between them.
    assert!(c.writes >= 4 && c.flushes >= 3, "{c:?}");
    c.writes + c.write_zeroes + c.flushes + c.discards + c.set_lens + c.allocates
}

/// After a failed flush: every mutation fails with `Poisoned`, reads still see everything.
async fn assert_poisoned(img: &Image) {
    let errors = [
        img.write_at(&pattern(0xc, 4096), 0).await.unwrap_err(),
        img.write_at(&pattern(0xc, 4096), 50 * MIB)
            .await
            .unwrap_err(),
        img.write_zeroes(0, 4096, ZeroFlags::default())
            .await
            .unwrap_err(),
        img.discard(0, 64 * KIB).await.unwrap_err(),
        img.flush().await.unwrap_err(),
        img.close().await.unwrap_err(),
    ];
    for e in errors {
        assert_eq!(e.kind(), ErrorKind::Poisoned, "{e}");
        assert!(e.to_string().contains("reopen"), "a clear message: {e}");
    }
    assert_reads(img, 0, 0xa, 256 * KIB).await;
    assert_reads(img, 512 * KIB, 0xb, 128 * KIB).await;
    assert_reads(img, 33 * MIB, 0xb, 64 * KIB).await;
}

/// What reached the storage: no corruption (leaks allowed), the flushed data, and for the
/// unflushed writes whole clusters of either the old or the new content; `-r leaks` cleans it.
async fn assert_consistent_on_disk(bytes: Vec<u8>, what: &str) {
    let report = check_bytes(bytes.clone()).await;
    assert_eq!(
        (report.corruptions, report.check_errors),
        (0, 0),
        "{what}: {report:?}"
    );
    let img = reopen(bytes.clone()).await;
    assert_reads(&img, 0, 0xa, 256 * KIB).await;
    // Whole 4 KiB clusters of old (zero or 0xa) or new content.
    for (off, len, new) in [(512 * KIB, 128 * KIB, 0xb), (33 * MIB, 64 * KIB, 0xb)] {
        let got = read(&img, off, len).await;
        for (i, c) in got.chunks(4096).enumerate() {
            let whole = c.iter().all(|&b| b == new) || c.iter().all(|&b| b == 0);
            assert!(
                whole,
                "{what}: cluster at {:#x} is torn",
                off + i as u64 * 4096
            );
        }
    }
    let got = read(&img, 4 * MIB, 64 * KIB).await;
    for c in got.chunks(4096) {
        assert!(c.iter().all(|&b| b == 0xa) || c.iter().all(|&b| b == 0));
    }
    let s = Arc::new(MemoryStorage::from_vec(bytes));
    let (_, after) = repair(s.clone(), RepairMode::Leaks).await.unwrap();
    assert!(after.is_clean(), "{what}: after -r leaks {after:?}");
}

/// Fail the `n`th storage request of the flush with `rule`, for every `n`.
async fn fail_each_flush_step(rule: impl Fn(u64) -> FaultRule, want: ErrorKind) {
    let bytes = qemu_image(FLUSH_CS);
    let steps = flush_requests(&bytes).await;
    for n in 1..=steps {
        let r = rig(bytes.clone()).await;
        flushed_then_pending(&r.img).await;
        let rule = rule(n);
        let what = format!("{rule:?}");
        r.fault.set_rule(rule);
        let Err(err) = r.img.flush().await else {
            // Punching freed clusters is a hint: a failed discard is ignored. (A rule for one
            // kind may also match fewer than `steps` requests.)
            assert!(r.fault.op_counts().faults == 0 || r.fault.op_counts().discards > 0);
            r.fault.clear();
            r.img.write_at(&pattern(0xc, 4096), 0).await.unwrap();
            r.img.close().await.unwrap();
            assert!(check_bytes(r.mem.snapshot()).await.is_clean(), "{what}");
            continue;
        };
        assert_eq!(err.kind(), want, "{what}: {err}");
        r.fault.clear();
        assert_poisoned(&r.img).await;
        assert_consistent_on_disk(r.mem.snapshot(), &what).await;
    }
}

#[tokio::test]
async fn failed_metadata_write_or_fsync_during_flush_poisons() {
    fail_each_flush_step(|n| FaultRule::any().nth(n), ErrorKind::Io).await;
}

#[tokio::test]
async fn enospc_during_flush_is_no_space_and_poisons() {
    let rule = |n| FaultRule::any().nth(n).with_error(FaultError::Enospc);
    fail_each_flush_step(rule, ErrorKind::NoSpace).await;
}

#[tokio::test]
async fn torn_metadata_writes_poison() {
    let rule = |n| FaultRule::on(OpKind::Write).nth(n).short_write(8);
    fail_each_flush_step(rule, ErrorKind::Io).await;
}

#[tokio::test]
async fn failed_fsync_poisons() {
    let r = rig(qemu_image(FLUSH_CS)).await;
    flushed_then_pending(&r.img).await;
    r.fault
        .set_rule(FaultRule::on(OpKind::Flush).with_error(FaultError::Eio));
    let err = r.img.flush().await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Io, "{err}");
    assert_eq!(err.raw_os_error(), Some(libc::EIO));
    assert_poisoned(&r.img).await;
    assert_consistent_on_disk(r.mem.snapshot(), "fsync").await;
    // A reopened image works again.
    let s: Arc<dyn Storage> = Arc::new(MemoryStorage::from_vec(r.mem.snapshot()));
    let img = Image::open_storage(s, &rw_options()).await.unwrap();
    img.write_at(&pattern(0xd, 4096), 0).await.unwrap();
    img.close().await.unwrap();
}

// ---------------------------------------------------------------------------------------------
// (f) reads

/// A metadata write that fails outside `flush()` poisons too: here the refcount table's
/// header switch, made inside a write request that grows the table. The switch reaches the
/// disk although its write reports an error, so disk and memory may disagree about which
/// table is live: going on would update refcounts the disk no longer uses.
#[tokio::test]
async fn failed_refcount_table_switch_during_a_write_poisons() {
    // 512-byte clusters, 16-bit refcounts: qemu-img's one-cluster refcount table covers 8 MiB
    // of file, so writing 8 MiB of data must grow it.
    let r = rig(qemu_image("cluster_size=512")).await;
    r.img.write_at(&pattern(0xa, 256 * KIB), 0).await.unwrap();
    r.img.flush().await.unwrap();
    let switch = FaultRule::on(OpKind::Write)
        .in_range(48..60)
        .short_write(12);
    r.fault.set_rule(switch);
    let err = r
        .img
        .write_at(&pattern(0xb, 8 * MIB), MIB)
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Io, "{err}");
    assert_eq!(
        r.fault.op_counts().faults,
        1,
        "the header switch was reached"
    );
    r.fault.clear();
    let again = r.img.write_at(&pattern(0xc, 4096), 0).await.unwrap_err();
    assert_eq!(again.kind(), ErrorKind::Poisoned, "{again}");
    assert_reads(&r.img, 0, 0xa, 256 * KIB).await;
    // The new table was complete and synced before the switch: no corruption on disk.
    let bytes = r.mem.snapshot();
    assert_qemu_clean_or_leaks(&bytes);
    assert_reads(&reopen(bytes).await, 0, 0xa, 256 * KIB).await;
}

/// `qemu-img check` of image bytes finds no corruption (leaked clusters allowed).
fn assert_qemu_clean_or_leaks(bytes: &[u8]) {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("out.qcow2");
    std::fs::write(&p, bytes).unwrap();
    let (code, report) = common::qemu_check(&p, &[]);
    assert!(
        code == 0 || code == 3,
        "qemu-img check exit {code}: {report:?}"
    );
    assert_eq!(
        (report.corruptions, report.check_errors),
        (0, 0),
        "{report:?}"
    );
}

#[tokio::test]
async fn read_errors_fail_only_that_read() {
    let mut bytes = qemu_image("cluster_size=65536");
    {
        let r = rig(bytes).await;
        r.img.write_at(&pattern(1, MIB), 0).await.unwrap();
        r.img.close().await.unwrap();
        bytes = r.mem.snapshot();
    }
    // Cold cache: the first read loads an L2 slice, and that load fails.
    let r = rig(bytes).await;
    r.fault.set_rule(FaultRule::on(OpKind::Read));
    let mut buf = vec![0u8; 4096];
    let err = r.img.read_at(&mut buf, 0).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Io, "{err}");
    assert_reads(&r.img, 0, 1, 4096).await;

    // A data read fails; the same read succeeds after the fault.
    let host = r.img.map(128 * KIB, 4096).await.unwrap()[0].offset.unwrap();
    r.fault
        .set_rule(FaultRule::on(OpKind::Read).in_range(host..host + 4096));
    let err = r.img.read_at(&mut buf, 128 * KIB).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Io, "{err}");
    assert_reads(&r.img, 256 * KIB, 1, 64 * KIB).await;
    assert_reads(&r.img, 128 * KIB, 1, 4096).await;

    // A failed metadata load inside a write fails the write only.
    r.fault.set_rule(FaultRule::on(OpKind::Read).sticky());
    let err = r.img.write_at(&pattern(2, 4096), 60 * MIB).await;
    r.fault.clear();
    if let Err(e) = err {
        assert_eq!(e.kind(), ErrorKind::Io, "{e}");
    }
    r.img.write_at(&pattern(3, 4096), 60 * MIB).await.unwrap();
    r.img.write_at(&pattern(3, 4096), 0).await.unwrap();
    assert_reads(&r.img, 60 * MIB, 3, 4096).await;
    r.img.close().await.unwrap();
    assert!(check_bytes(r.mem.snapshot()).await.is_clean());
}
