//! Images damaged on purpose: our check must count what `qemu-img check` counts, and our
//! repair must leave an image that `qemu-img check` finds clean, with the same guest data as a
//! copy repaired by `qemu-img check -r`.

use crate::common;
use common::bytes::{poke, read};

use std::fs::{self, OpenOptions};
use std::path::{Path, PathBuf};

use qcow2_engine::check::{CheckOptions, CheckReport, RepairMode, check, repair};
use qcow2_engine::format::header::Header;
use qcow2_engine::format::l1::L1E_OFFSET_MASK;
use qcow2_engine::format::l2::{L2E_COPIED, L2E_OFFSET_MASK};
use qcow2_engine::format::refcount;

/// Offsets of the structures a test damages, found with the library's format parsers.
struct Meta {
    cs: u64,
    order: u32,
    extended: bool,
    reftable: u64,
    refblock0: u64,
    l1_table: u64,
    l1: Vec<u64>,
    /// The first L2 table and its raw entries.
    l2_table: u64,
    l2: Vec<u64>,
}

fn u64s(buf: &[u8]) -> Vec<u64> {
    buf.chunks_exact(8)
        .map(|c| u64::from_be_bytes(c.try_into().unwrap()))
        .collect()
}

fn meta(img: &Path) -> Meta {
    let h = Header::from_bytes(&read(img, 0, 4096)).unwrap();
    let cs = h.cluster_size();
    let reftable = h.refcount_table_offset;
    let l1 = u64s(&read(img, h.l1_table_offset, h.l1_size as usize * 8));
    let l2_table = l1[0] & L1E_OFFSET_MASK;
    Meta {
        cs,
        order: h.refcount_order,
        extended: h.extended_l2(),
        reftable,
        refblock0: u64s(&read(img, reftable, 8))[0],
        l1_table: h.l1_table_offset,
        l2: u64s(&read(img, l2_table, cs as usize)),
        l1,
        l2_table,
    }
}

impl Meta {
    /// Host cluster index of guest cluster `i` (a normal cluster of the first L2 table).
    fn data_cluster(&self, i: usize) -> u64 {
        (self.l2[i * self.l2_step()] & L2E_OFFSET_MASK) / self.cs
    }

    /// u64 words per L2 entry: 2 with extended L2 entries.
    fn l2_step(&self) -> usize {
        if self.extended { 2 } else { 1 }
    }

    /// Overwrite the recorded refcount of host cluster `c` (block 0 only).
    fn set_refcount(&self, img: &Path, c: u64, value: u64) {
        let mut block = read(img, self.refblock0, self.cs as usize);
        refcount::set(&mut block, c, self.order, value).unwrap();
        poke(img, self.refblock0, &block);
    }

    /// Overwrite L2 entry `i` of the first L2 table.
    fn set_l2(&self, img: &Path, i: usize, raw: u64) {
        poke(img, self.l2_table + i as u64 * 8, &raw.to_be_bytes());
    }
}

/// A 64 MiB image with 16 data clusters, one compressed cluster and (optionally) a snapshot.
fn base(dir: &Path, name: &str, snapshot: bool) -> PathBuf {
    base_with(dir, name, snapshot, "cluster_size=65536")
}

/// [`base`] with creation options.
fn base_with(dir: &Path, name: &str, snapshot: bool, opts: &str) -> PathBuf {
    let img = dir.join(name);
    let p = img.to_str().unwrap();
    common::qemu_create(p, opts, "64M");
    // One compressed cluster (compressed writes are whole clusters).
    let cs = Header::from_bytes(&read(&img, 0, 4096))
        .unwrap()
        .cluster_size();
    let compressed = format!("write -c -P 2 4M {cs}");
    common::qemu_io(p, &["write -P 1 0 1M", &compressed]);
    if snapshot {
        common::run("qemu-img", &["snapshot", "-c", "s1", p]);
    }
    img
}

fn numbers(r: &CheckReport) -> [u64; 7] {
    [
        r.check_errors,
        r.corruptions,
        r.leaks,
        r.image_end_offset,
        r.allocated_clusters,
        r.fragmented_clusters,
        r.compressed_clusters,
    ]
}

/// The outcome of one damaged-image scenario.
struct Outcome {
    /// qemu-img's report after `qemu-img check -r`.
    qemu_fixed: CheckReport,
    /// Our double-check report after our repair.
    ours_fixed: CheckReport,
}

/// Check `img` with both tools (the numbers must agree), then repair one copy each way and
/// compare the results.
async fn scenario(img: &Path, mode: RepairMode) -> Outcome {
    let (qcode, want) = common::qemu_check(img, &[]);
    let got = check(common::storage(img, true), &CheckOptions::default())
        .await
        .unwrap();
    assert_eq!(
        numbers(&got),
        numbers(&want),
        "{}: ours {:?}\nqemu {want:?}",
        img.display(),
        got.messages
    );
    assert_eq!(got.exit_code(), qcode);
    assert_ne!(qcode, 0, "the damage must be visible");

    let ours = img.with_extension("ours.qcow2");
    let theirs = img.with_extension("qemu.qcow2");
    fs::copy(img, &ours).unwrap();
    fs::copy(img, &theirs).unwrap();
    let (before, ours_fixed) = repair(common::storage(&ours, false), mode).await.unwrap();
    assert_eq!(numbers(&before), numbers(&got));
    assert!(
        ours_fixed.is_clean(),
        "{}: {:?}",
        img.display(),
        ours_fixed.messages
    );
    common::assert_check_clean(&ours);

    let flag = match mode {
        RepairMode::Leaks => "leaks",
        RepairMode::All => "all",
    };
    let (_, qemu_fixed) = common::qemu_check(&theirs, &["-r", flag]);
    if qemu_fixed.is_clean() {
        let (o, t) = (ours.to_str().unwrap(), theirs.to_str().unwrap());
        let (code, text) = common::status("qemu-img", &["compare", "-q", o, t]);
        assert_eq!(code, 0, "guest data differs after repair: {text}");
    }
    eprintln!(
        "{}:\n  before {:?}\n  ours   {:?}\n  qemu   {:?}\n  msgs {:?}",
        img.display(),
        numbers(&before),
        [
            ours_fixed.corruptions_fixed,
            ours_fixed.leaks_fixed,
            ours_fixed.image_end_offset
        ],
        [
            qemu_fixed.corruptions_fixed,
            qemu_fixed.leaks_fixed,
            qemu_fixed.image_end_offset
        ],
        &before.messages[..before.messages.len().min(4)]
    );
    Outcome {
        qemu_fixed,
        ours_fixed,
    }
}

#[tokio::test]
async fn leak_of_an_appended_cluster_repaired_by_leaks_mode() {
    let dir = tempfile::tempdir().unwrap();
    let img = base(dir.path(), "leak.qcow2", false);
    let m = meta(&img);
    // The file may end inside its last cluster (compressed data): leak the two after it.
    let end = fs::metadata(&img).unwrap().len().div_ceil(m.cs);
    let f = OpenOptions::new().write(true).open(&img).unwrap();
    f.set_len((end + 2) * m.cs).unwrap();
    m.set_refcount(&img, end, 1);
    m.set_refcount(&img, end + 1, 1);
    let out = scenario(&img, RepairMode::Leaks).await;
    assert_eq!(out.ours_fixed.leaks_fixed, 2);
    assert_eq!(out.ours_fixed.leaks_fixed, out.qemu_fixed.leaks_fixed);
    assert_eq!(
        out.ours_fixed.image_end_offset,
        out.qemu_fixed.image_end_offset
    );
}

#[tokio::test]
async fn refcount_above_references_is_a_leak_and_a_copied_error() {
    let dir = tempfile::tempdir().unwrap();
    let img = base(dir.path(), "high.qcow2", false);
    let m = meta(&img);
    m.set_refcount(&img, m.data_cluster(3), 2);
    let out = scenario(&img, RepairMode::All).await;
    assert_eq!(
        (out.ours_fixed.leaks_fixed, out.ours_fixed.corruptions_fixed),
        (out.qemu_fixed.leaks_fixed, out.qemu_fixed.corruptions_fixed)
    );
}

#[tokio::test]
async fn refcount_zero_needs_a_rebuild() {
    let dir = tempfile::tempdir().unwrap();
    let img = base(dir.path(), "zero.qcow2", false);
    let m = meta(&img);
    m.set_refcount(&img, m.data_cluster(3), 0);
    let out = scenario(&img, RepairMode::All).await;
    assert_eq!(
        out.ours_fixed.corruptions_fixed,
        out.qemu_fixed.corruptions_fixed
    );
}

#[tokio::test]
async fn refcount_too_low_on_a_snapshot_shared_cluster_is_raised() {
    let dir = tempfile::tempdir().unwrap();
    let img = base(dir.path(), "shared.qcow2", true);
    let m = meta(&img);
    m.set_refcount(&img, m.data_cluster(5), 1);
    let out = scenario(&img, RepairMode::All).await;
    assert_eq!(
        out.ours_fixed.corruptions_fixed,
        out.qemu_fixed.corruptions_fixed
    );
    // Raising, not rebuilding: the file did not grow.
    assert_eq!(
        out.ours_fixed.image_end_offset,
        out.qemu_fixed.image_end_offset
    );
}

#[tokio::test]
async fn l2_entry_pointing_at_the_l1_table() {
    let dir = tempfile::tempdir().unwrap();
    let img = base(dir.path(), "meta.qcow2", false);
    let m = meta(&img);
    m.set_l2(&img, 3, L2E_COPIED | m.l1_table);
    let out = scenario(&img, RepairMode::All).await;
    assert_eq!(
        (out.ours_fixed.leaks_fixed, out.ours_fixed.corruptions_fixed),
        (out.qemu_fixed.leaks_fixed, out.qemu_fixed.corruptions_fixed)
    );
}

#[tokio::test]
async fn l2_entry_pointing_at_the_refcount_block() {
    let dir = tempfile::tempdir().unwrap();
    let img = base(dir.path(), "rb.qcow2", false);
    let m = meta(&img);
    m.set_l2(&img, 4, L2E_COPIED | m.refblock0);
    scenario(&img, RepairMode::All).await;
}

#[tokio::test]
async fn copied_flag_cleared_on_l2_and_l1_entries() {
    let dir = tempfile::tempdir().unwrap();
    let img = base(dir.path(), "copied.qcow2", false);
    let m = meta(&img);
    m.set_l2(&img, 3, m.l2[3] & !L2E_COPIED);
    poke(&img, m.l1_table, &(m.l1[0] & L1E_OFFSET_MASK).to_be_bytes());
    let out = scenario(&img, RepairMode::All).await;
    assert_eq!(out.ours_fixed.corruptions_fixed, 2);
    assert_eq!(
        out.ours_fixed.corruptions_fixed,
        out.qemu_fixed.corruptions_fixed
    );
}

#[tokio::test]
async fn refcount_block_pointer_outside_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let img = base(dir.path(), "out.qcow2", false);
    let m = meta(&img);
    poke(&img, m.reftable, &(1u64 << 32).to_be_bytes());
    let out = scenario(&img, RepairMode::All).await;
    // QEMU grows the file to 4 GiB to cover the bogus block; we rebuild instead.
    assert!(out.ours_fixed.image_end_offset < 4 << 20);
}

#[tokio::test]
async fn refcount_block_pointer_at_a_data_cluster() {
    let dir = tempfile::tempdir().unwrap();
    let img = base(dir.path(), "garbage.qcow2", false);
    let m = meta(&img);
    let data = m.data_cluster(1) * m.cs;
    poke(&img, m.reftable, &data.to_be_bytes());
    scenario(&img, RepairMode::All).await;
}

#[tokio::test]
async fn dirty_lazy_refcounts_image_after_a_crash() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("lazy.qcow2");
    let p = img.to_str().unwrap();
    common::qemu_create(p, "lazy_refcounts=on", "64M");
    // qemu-io kills itself without closing the image: the dirty bit stays set.
    let _ = common::status(
        "qemu-io",
        &[
            "-c",
            "write -P 1 0 1M",
            "-c",
            "flush",
            "-c",
            "sigraise 9",
            p,
        ],
    );
    let h = Header::from_bytes(&read(&img, 0, 4096)).unwrap();
    assert!(h.is_dirty());
    scenario(&img, RepairMode::All).await;
    let h = Header::from_bytes(&read(&img.with_extension("ours.qcow2"), 0, 4096)).unwrap();
    assert!(!h.is_dirty(), "the repair clears the dirty bit");
}

#[tokio::test]
async fn rebuild_refcounts_for_the_engine() {
    let dir = tempfile::tempdir().unwrap();
    let img = base(dir.path(), "rebuild.qcow2", true);
    let want = common::qemu_raw(&img);
    qcow2_engine::check::rebuild_refcounts(common::storage(&img, false))
        .await
        .unwrap();
    common::assert_check_clean(&img);
    assert_eq!(common::qemu_raw(&img), want);
    let p = img.to_str().unwrap();
    let (code, list) = common::status("qemu-img", &["snapshot", "-l", p]);
    assert!(code == 0 && list.contains("s1"), "{list}");
}

#[tokio::test]
async fn refcount_widths_and_cluster_sizes() {
    let dir = tempfile::tempdir().unwrap();
    for (i, opts) in [
        "refcount_bits=1,cluster_size=4096",
        "refcount_bits=2,cluster_size=1024",
        "refcount_bits=64",
        "cluster_size=2M",
        "compat=0.10",
    ]
    .iter()
    .enumerate()
    {
        // One cluster with refcount 0 (rebuild), one leaked appended cluster.
        let img = base_with(dir.path(), &format!("w{i}.qcow2"), false, opts);
        let m = meta(&img);
        m.set_refcount(&img, m.data_cluster(0), 0);
        let end = fs::metadata(&img).unwrap().len().div_ceil(m.cs);
        let f = OpenOptions::new().write(true).open(&img).unwrap();
        f.set_len((end + 1) * m.cs).unwrap();
        m.set_refcount(&img, end, 1);
        scenario(&img, RepairMode::All).await;
    }
}

#[tokio::test]
async fn extended_l2_bitmap_with_allocated_and_zero_bits() {
    let dir = tempfile::tempdir().unwrap();
    let img = base_with(dir.path(), "ext.qcow2", false, "extended_l2=on");
    let m = meta(&img);
    // Entry 2's bitmap: subcluster 0 both allocated and reads-as-zero.
    let bitmap = m.l2[2 * 2 + 1] | (1 << 32) | 1;
    poke(&img, m.l2_table + 2 * 16 + 8, &bitmap.to_be_bytes());
    // Entry 20 (unallocated) with an allocation bit.
    poke(&img, m.l2_table + 20 * 16 + 8, &1u64.to_be_bytes());
    let (_, want) = common::qemu_check(&img, &[]);
    let got = check(common::storage(&img, true), &CheckOptions::default())
        .await
        .unwrap();
    assert_eq!(numbers(&got), numbers(&want), "{:?}", got.messages);
    assert_eq!(got.corruptions, 2);
}

#[tokio::test]
async fn not_qcow2_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("raw.img");
    fs::write(&img, vec![0u8; 65536]).unwrap();
    let err = check(common::storage(&img, true), &CheckOptions::default())
        .await
        .unwrap_err();
    assert_eq!(err.kind(), qcow2_engine::ErrorKind::InvalidImage);
}

#[tokio::test]
async fn memory_limit_is_enforced() {
    let dir = tempfile::tempdir().unwrap();
    let img = base(dir.path(), "mem.qcow2", false);
    let opts = CheckOptions {
        max_memory: 1024,
        ..CheckOptions::default()
    };
    let err = check(common::storage(&img, true), &opts).await.unwrap_err();
    assert_eq!(err.kind(), qcow2_engine::ErrorKind::InvalidArgument);
}
