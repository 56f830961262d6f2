//! `qcow2 check` against `qemu-img check`: the same stdout (human and JSON), the same findings
//! on stderr and the same exit status, on clean images of several variants and on images
//! damaged on purpose; and `-r leaks` / `-r all` leave images that qemu-img finds clean, with
//! the guest data of a copy that qemu-img repaired.

use crate::common;
use common::bytes::{poke, read};

use std::fs::{self, OpenOptions};
use std::path::{Path, PathBuf};

use qcow2_engine::format::header::Header;
use qcow2_engine::format::l1::L1E_OFFSET_MASK;
use qcow2_engine::format::l2::{L2E_COPIED, L2E_OFFSET_MASK};
use qcow2_engine::format::refcount;

/// What one run printed and returned.
#[derive(Debug, PartialEq, Eq)]
struct Run {
    code: i32,
    stdout: String,
    /// Stderr (findings, errors) line by line, without the program name prefix.
    stderr: Vec<String>,
}

/// `qemu-img check ARGS IMG` and `qcow2 check ARGS IMG` on the same path, each on a fresh
/// copy of `img` (so repairs start from the same damage). Returns (qemu, ours); `img` ends
/// up as our tool left it, and qemu's result is kept at `img.qemu`.
fn both(img: &Path, args: &[&str]) -> (Run, Run) {
    let orig = img.with_extension("orig");
    fs::copy(img, &orig).unwrap();
    let mut full: Vec<&str> = vec!["check"];
    full.extend_from_slice(args);
    full.push(img.to_str().unwrap());
    let out = std::process::Command::new("qemu-img")
        .args(&full)
        .output()
        .unwrap();
    let qemu = Run {
        code: out.status.code().unwrap(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: stderr_lines(&String::from_utf8_lossy(&out.stderr), "qemu-img"),
    };
    fs::rename(img, img.with_extension("qemu")).unwrap();
    fs::copy(&orig, img).unwrap();
    let r = common::qcow2(&full);
    let ours = Run {
        code: r.code,
        stdout: r.stdout,
        stderr: stderr_lines(&r.stderr, "qcow2"),
    };
    (qemu, ours)
}

/// Stderr lines with the program's name prefix removed.
fn stderr_lines(text: &str, prog: &str) -> Vec<String> {
    let prefix = format!("{prog}: ");
    text.lines()
        .map(|l| l.strip_prefix(&prefix).unwrap_or(l).to_string())
        .collect()
}

/// Both tools print the same thing and exit the same way, for human and JSON output.
fn assert_same_check(img: &Path) -> i32 {
    let mut code = 0;
    for output in ["--output=human", "--output=json"] {
        let (qemu, ours) = both(img, &[output]);
        assert_eq!(ours, qemu, "{} {output}", img.display());
        code = qemu.code;
    }
    code
}

// ---------------------------------------------------------------------------------------------
// Building and damaging images

fn be64(img: &Path, off: u64) -> u64 {
    u64::from_be_bytes(read(img, off, 8).try_into().unwrap())
}

/// A 64 MiB image made by QEMU with `opts`: 1 MiB of data, one compressed cluster, and
/// optionally a snapshot (so that some clusters are shared).
fn image(dir: &Path, name: &str, opts: &str, snapshot: bool) -> PathBuf {
    let img = dir.join(name);
    let p = img.to_str().unwrap();
    common::qemu_create(p, opts, "64M");
    let cs = header(&img).cluster_size();
    let compressed = format!("write -c -P 2 4M {cs}");
    common::qemu_io(p, &["write -P 1 0 1M", &compressed]);
    if snapshot {
        common::run("qemu-img", &["snapshot", "-c", "s1", p]);
    }
    img
}

fn header(img: &Path) -> Header {
    Header::from_bytes(&read(img, 0, 4096)).unwrap()
}

/// Host offset of the first L2 table.
fn l2_table(img: &Path) -> u64 {
    be64(img, header(img).l1_table_offset) & L1E_OFFSET_MASK
}

/// Host offset of the data cluster of guest cluster `i` (in the first L2 table).
fn data_cluster(img: &Path, i: u64) -> u64 {
    be64(img, l2_table(img) + i * 8) & L2E_OFFSET_MASK
}

/// Set the recorded refcount of the cluster at host offset `host` (refcount block 0).
fn set_refcount(img: &Path, host: u64, value: u64) {
    let h = header(img);
    let block = be64(img, h.refcount_table_offset);
    let cs = h.cluster_size();
    let mut buf = read(img, block, cs as usize);
    refcount::set(&mut buf, host / cs, h.refcount_order, value).unwrap();
    poke(img, block, &buf);
}

/// Grow the file by two clusters whose refcount is 1: two leaks.
fn leak_two(img: &Path) {
    let cs = header(img).cluster_size();
    let end = fs::metadata(img).unwrap().len().div_ceil(cs);
    let f = OpenOptions::new().write(true).open(img).unwrap();
    f.set_len((end + 2) * cs).unwrap();
    set_refcount(img, end * cs, 1);
    set_refcount(img, (end + 1) * cs, 1);
}

// ---------------------------------------------------------------------------------------------
// Repairs

/// Repair a copy with each tool (`-r mode`): the same text and exit status, our result clean
/// by `qemu-img check` when qemu-img's is, and the same guest data. Returns (qemu, ours).
fn assert_same_repair(img: &Path, mode: &str) -> (Run, Run) {
    let (qemu, ours) = both(img, &["-r", mode]);
    assert_eq!(ours, qemu, "{} -r {mode}", img.display());
    let theirs = img.with_extension("qemu");
    if qemu.code == 0 {
        assert_eq!(common::qemu_raw(img), common::qemu_raw(&theirs));
    }
    if ours.code == 0 {
        common::assert_check_clean(img);
    }
    (qemu, ours)
}

#[test]
fn clean_images_of_several_variants() {
    let dir = tempfile::tempdir().unwrap();
    for (i, (opts, snap)) in [
        ("cluster_size=65536", false),
        ("cluster_size=4096,refcount_bits=1", false),
        ("compat=0.10", true),
        ("extended_l2=on", false),
        ("compression_type=zstd,refcount_bits=64", true),
        ("cluster_size=512", false),
    ]
    .into_iter()
    .enumerate()
    {
        let img = image(dir.path(), &format!("clean{i}.qcow2"), opts, snap);
        assert_eq!(assert_same_check(&img), 0, "{opts}");
    }
    // An empty image: no allocation line.
    let img = dir.path().join("empty.qcow2");
    common::qemu_create(&img, "", "1G");
    assert_eq!(assert_same_check(&img), 0);
}

#[test]
fn leaked_clusters_exit_3_and_repair_with_leaks() {
    let dir = tempfile::tempdir().unwrap();
    let img = image(dir.path(), "leak.qcow2", "cluster_size=65536", false);
    leak_two(&img);
    assert_eq!(assert_same_check(&img), 3);
    for mode in ["leaks", "all"] {
        let (_, ours) = assert_same_repair(&img, mode);
        assert_eq!(ours.code, 0);
        fs::copy(img.with_extension("orig"), &img).unwrap();
    }
    let (qemu, ours) = both(&img, &["-r", "leaks", "--output=json"]);
    assert_eq!(ours, qemu);
}

#[test]
fn refcount_too_low_on_a_shared_cluster() {
    let dir = tempfile::tempdir().unwrap();
    let img = image(dir.path(), "low.qcow2", "cluster_size=65536", true);
    set_refcount(&img, data_cluster(&img, 5), 1);
    assert_eq!(assert_same_check(&img), 2);
    // Leaks mode cannot fix a corruption: exit 2 after the repair too.
    let (qemu, ours) = assert_same_repair(&img, "leaks");
    assert_eq!((qemu.code, ours.code), (2, 2));
    fs::copy(img.with_extension("orig"), &img).unwrap();
    let (_, ours) = assert_same_repair(&img, "all");
    assert_eq!(ours.code, 0, "{ours:?}");
}

#[test]
fn refcount_zero_on_a_data_cluster_needs_a_rebuild() {
    let dir = tempfile::tempdir().unwrap();
    let img = image(dir.path(), "zero.qcow2", "cluster_size=65536", false);
    set_refcount(&img, data_cluster(&img, 3), 0);
    assert_eq!(assert_same_check(&img), 2);
    let (_, ours) = assert_same_repair(&img, "all");
    assert_eq!(ours.code, 0, "{ours:?}");
}

#[test]
fn l2_entry_pointing_at_metadata() {
    let dir = tempfile::tempdir().unwrap();
    let img = image(dir.path(), "meta.qcow2", "cluster_size=65536", false);
    let l1 = header(&img).l1_table_offset;
    poke(
        &img,
        l2_table(&img) + 3 * 8,
        &(L2E_COPIED | l1).to_be_bytes(),
    );
    assert_eq!(assert_same_check(&img), 2);
    let (_, ours) = assert_same_repair(&img, "all");
    assert_eq!(ours.code, 0, "{ours:?}");
}

#[test]
fn leaks_and_corruptions_together() {
    let dir = tempfile::tempdir().unwrap();
    let img = image(dir.path(), "both.qcow2", "cluster_size=4096", true);
    leak_two(&img);
    set_refcount(&img, data_cluster(&img, 7), 1);
    assert_eq!(assert_same_check(&img), 2);
    let (qemu, ours) = assert_same_repair(&img, "leaks");
    assert_eq!((qemu.code, ours.code), (2, 2));
    fs::copy(img.with_extension("orig"), &img).unwrap();
    assert_same_repair(&img, "all");
}

#[test]
fn raw_images_and_missing_files() {
    let dir = tempfile::tempdir().unwrap();
    let raw = dir.path().join("disk.raw");
    fs::write(&raw, vec![0u8; 65536]).unwrap();
    let (qemu, ours) = both(&raw, &[]);
    assert_eq!(ours.code, qemu.code);
    assert_eq!(ours.code, 63);
    let r = common::qcow2(&["check", dir.path().join("nope").to_str().unwrap()]);
    assert_eq!(r.code, 1);
    assert!(r.stderr.starts_with("qcow2: "), "{}", r.stderr);
}

#[test]
fn refcount_block_pointer_outside_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let img = image(dir.path(), "out.qcow2", "cluster_size=65536", false);
    poke(
        &img,
        header(&img).refcount_table_offset,
        &(1u64 << 32).to_be_bytes(),
    );
    let code = assert_same_check(&img);
    assert_ne!(code, 0);
}

#[test]
fn dirty_lazy_refcounts_image() {
    let dir = tempfile::tempdir().unwrap();
    let img = image(dir.path(), "lazy.qcow2", "lazy_refcounts=on", false);
    let p = img.to_str().unwrap();
    // qemu-io dies without closing the image: the dirty bit stays set.
    let cmds = [
        "-c",
        "write -P 5 2M 1M",
        "-c",
        "flush",
        "-c",
        "sigraise 9",
        p,
    ];
    common::status("qemu-io", &cmds);
    assert!(header(&img).is_dirty());
    assert_same_check(&img);
    let (_, ours) = assert_same_repair(&img, "all");
    assert_eq!(ours.code, 0, "{ours:?}");
    assert!(!header(&img).is_dirty());
}
