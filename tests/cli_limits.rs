//! Resource caps on what an image claims: `qcow2 info` on a snapshot-table bomb (a small
//! sparse file whose header claims thousands of snapshots with 64 KiB names each) must refuse
//! the table as QEMU does (over 64 MiB) in bounded memory, not allocate what it claims.

use crate::common;

use std::os::unix::fs::FileExt;
use std::process::{Command, Stdio};

use common::path_in;

/// Peak RSS allowed for `qcow2 info` on a hostile image.
const MAX_RSS_KIB: i64 = 100 << 10;

/// Make a qcow2 image whose snapshot table claims `count` entries, each with the longest id
/// and name (65535 bytes), laid out in a sparse file so the entries are "inside" it.
fn snapshot_bomb(path: &str, count: u32) {
    snapshot_table(path, count, false);
}

/// [`snapshot_bomb`], optionally with every id and name byte 0xff (not UTF-8) written out.
fn snapshot_table(path: &str, count: u32, invalid_utf8: bool) {
    common::qemu_create(path, "", "1M");
    let f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    let table: u64 = 1 << 20; // cluster aligned, past QEMU's metadata
    let mut entry = [0u8; 40];
    entry[12..14].copy_from_slice(&u16::MAX.to_be_bytes()); // id length
    entry[14..16].copy_from_slice(&u16::MAX.to_be_bytes()); // name length
    let stride = (40 + 2 * u64::from(u16::MAX)).next_multiple_of(8);
    let mut names = Vec::new();
    if invalid_utf8 {
        names = vec![0xff; 2 * usize::from(u16::MAX)];
    }
    for i in 0..u64::from(count) {
        f.write_all_at(&entry, table + i * stride).unwrap();
        f.write_all_at(&names, table + i * stride + 40).unwrap();
    }
    f.set_len(table + u64::from(count) * stride).unwrap();
    f.write_all_at(&count.to_be_bytes(), 60).unwrap(); // nb_snapshots
    f.write_all_at(&table.to_be_bytes(), 64).unwrap(); // snapshots_offset
}

/// Run `qcow2 ARGS` (stdout discarded) under GNU time; its exit code, stderr and peak RSS
/// in KiB. The measurement goes through `/usr/bin/time` rather than our own `wait4`: Linux
/// carries a process's peak RSS across `execve`, so a child forked from this (large,
/// multi-threaded) test process would report the test process's peak, not its own.
/// CI installs GNU time (`.ci/run`); without it the test cannot measure and fails loudly.
fn run_measured(args: &[&str]) -> (i32, String, i64) {
    let out = Command::new("/usr/bin/time")
        .args(["-f", "%M", env!("CARGO_BIN_EXE_qcow2")])
        .args(args)
        .stdout(Stdio::null())
        .output()
        .expect("GNU time (/usr/bin/time, Debian package `time`) is needed to measure peak RSS");
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    let (ours, rss) = stderr
        .trim_end()
        .rsplit_once('\n')
        .unwrap_or(("", stderr.trim()));
    let rss: i64 = rss
        .trim()
        .parse()
        .unwrap_or_else(|_| panic!("no RSS in {stderr:?}"));
    (out.status.code().unwrap_or(-1), ours.to_string(), rss)
}

#[test]
fn info_refuses_a_snapshot_table_over_64_mib_in_bounded_memory() {
    let dir = tempfile::tempdir().unwrap();
    let img = path_in(dir.path(), "bomb.qcow2");
    // 2048 entries of ~128 KiB: a 256 MiB table in a file of a few hundred KiB on disk.
    snapshot_bomb(&img, 2048);
    let (code, _) = common::status("qemu-img", &["info", &img]);
    assert_ne!(code, 0, "QEMU refuses it too");
    for args in [&["info", &img][..], &["info", "--output=json", &img]] {
        let (code, stderr, rss) = run_measured(args);
        assert_eq!(code, 1, "{args:?}: {stderr}");
        assert!(stderr.contains("snapshot table too large"), "{stderr}");
        assert!(rss < MAX_RSS_KIB, "{args:?}: peak RSS {rss} KiB");
    }
}

#[test]
fn info_lists_a_large_but_legal_snapshot_table_in_bounded_memory() {
    let dir = tempfile::tempdir().unwrap();
    let img = path_in(dir.path(), "big.qcow2");
    // 256 entries of ~128 KiB names: 32 MiB, under QEMU's 64 MiB limit.
    snapshot_bomb(&img, 256);
    let (code, stderr, rss) = run_measured(&["info", "--output=json", &img]);
    assert_eq!(code, 0, "{stderr}");
    assert!(rss < MAX_RSS_KIB, "peak RSS {rss} KiB");
}

#[test]
fn info_bounds_names_that_grow_when_decoded() {
    let dir = tempfile::tempdir().unwrap();
    let img = path_in(dir.path(), "ff.qcow2");
    // 24 MiB of 0xff names, under the 64 MiB table limit, but 72 MiB once each byte
    // becomes a three-byte U+FFFD.
    snapshot_table(&img, 180, true);
    let (code, stderr, rss) = run_measured(&["info", "--output=json", &img]);
    assert_eq!(code, 1, "{stderr}");
    assert!(stderr.contains("snapshot names too large"), "{stderr}");
    assert!(rss < MAX_RSS_KIB, "peak RSS {rss} KiB");
}
