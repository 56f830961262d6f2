//! `qcow2 convert -t/-T` (cache modes), `-r` (rate limit), `-C` (copy offloading) and
//! `--salvage` against `qemu-img convert`: same exit codes and stderr (tool and destination
//! names aside), same output content (`qemu-img compare`); the system calls both make are
//! compared with strace (O_DIRECT opens, copy_file_range), the rate limit by wall time.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use crate::common::chain::run_tool;
use crate::common::{assert_check_clean, qemu_create_in, qemu_io_in, run};

const OURS: &str = env!("CARGO_BIN_EXE_qcow2");

/// Run `TOOL convert ARGS DST` in `dir`; exit code and stderr, with the tool's and the
/// destination's names normalized.
fn convert(program: &str, dir: &Path, args: &[&str], dst: &str) -> (i32, String) {
    let mut all = vec!["convert"];
    all.extend_from_slice(args);
    all.push(dst);
    let (code, _, err) = run_tool(program, dir, &all);
    (code, err.replace(dst, "DST"))
}

/// QEMU's qcow2 driver reports corruption it meets on its own line ("qcow2: Image is
/// corrupt: ...", normalized to "PROG: ..."), which is not qemu-img's.
fn without_driver_notes(stderr: &str) -> String {
    stderr
        .lines()
        .filter(|l| !l.starts_with("PROG: Image is corrupt"))
        .map(|l| format!("{l}\n"))
        .collect()
}

/// Both tools give the same exit code and stderr (into `t.out` and `o.out`); returns it.
fn same_as_qemu(dir: &Path, args: &[&str]) -> (i32, String) {
    let (tc, te) = convert("qemu-img", dir, args, "t.out");
    let (oc, oe) = convert(OURS, dir, args, "o.out");
    assert_eq!(
        (oc, oe.clone()),
        (tc, without_driver_notes(&te)),
        "{args:?}"
    );
    (oc, oe)
}

/// The two outputs read the same (and ours passes check when qcow2).
fn assert_same_output(dir: &Path, fmt: &str) {
    let (t, o) = (dir.join("t.out"), dir.join("o.out"));
    run(
        "qemu-img",
        &[
            "compare",
            "-f",
            fmt,
            "-F",
            fmt,
            t.to_str().unwrap(),
            o.to_str().unwrap(),
        ],
    );
    if fmt == "qcow2" {
        assert_check_clean(&o);
    }
}

/// A qcow2 source and a raw source of an odd size, both with data and holes.
fn sources(dir: &Path) {
    qemu_create_in(dir, "s.qcow2", "qcow2", "", "3M");
    qemu_io_in(
        dir,
        "s.qcow2",
        &["write -P 0x11 0 192k", "write -P 0x12 2M 64k"],
    );
    let mut raw = vec![0u8; 1_000_000];
    raw[..300_000].fill(0x22);
    raw[900_000..].fill(0x23);
    std::fs::write(dir.join("s.raw"), raw).unwrap();
}

/// `strace -f -e trace=SYSCALLS` of `TOOL convert ARGS DST` in `dir`: the trace.
fn strace(program: &str, dir: &Path, syscalls: &str, args: &[&str], dst: &str) -> String {
    let log = dir.join("strace.log");
    let out = Command::new("strace")
        .args(["-f", "-e", &format!("trace={syscalls}"), "-o"])
        .arg(&log)
        .arg(program)
        .arg("convert")
        .args(args)
        .arg(dst)
        .current_dir(dir)
        .output()
        .unwrap();
    assert!(out.status.success(), "{program} {args:?}: {out:?}");
    std::fs::read_to_string(&log).unwrap()
}

/// Whether the trace opens `name` with O_DIRECT.
fn opens_direct(trace: &str, name: &str) -> bool {
    trace
        .lines()
        .any(|l| l.contains(&format!("\"{name}\"")) && l.contains("O_DIRECT"))
}

/// `-t`/`-T none|directsync` open the destination/sources with O_DIRECT, the other modes do
/// not: both tools, every mode, raw and qcow2 on both sides (an odd-sized raw source too).
#[test]
fn cache_modes_open_as_qemu_img() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    sources(d);
    let modes = ["none", "directsync", "writeback", "writethrough", "unsafe"];
    for (src, fmt) in [("s.qcow2", "qcow2"), ("s.raw", "raw")] {
        for (i, mode) in modes.iter().enumerate() {
            let other = modes[(i + 1) % modes.len()];
            for (t, tt) in [(*mode, other), (other, *mode)] {
                let args = ["-t", t, "-T", tt, "-O", fmt, src];
                let theirs = strace("qemu-img", d, "openat", &args, "t.out");
                let ours = strace(OURS, d, "openat", &args, "o.out");
                let expect = (opens_direct(&theirs, "t.out"), opens_direct(&theirs, src));
                assert_eq!(expect.0, matches!(t, "none" | "directsync"), "{args:?}");
                assert_eq!(expect.1, matches!(tt, "none" | "directsync"), "{args:?}");
                let got = (opens_direct(&ours, "o.out"), opens_direct(&ours, src));
                assert_eq!(got, expect, "{args:?}");
                assert_same_output(d, fmt);
                let len = |n: &str| std::fs::metadata(d.join(n)).unwrap().len();
                if fmt == "raw" {
                    assert_eq!(len("o.out"), len("t.out"), "{args:?}");
                }
            }
        }
    }
}

/// Bad cache mode names: qemu-img's messages; `-t` is checked only after the destination
/// was created (both tools leave it behind), `-T` before anything.
#[test]
fn bad_cache_modes_as_qemu_img() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    sources(d);
    for (args, created) in [
        (&["-t", "bogus", "s.qcow2"][..], true),
        (&["-T", "bogus", "s.qcow2"][..], false),
        (&["-T", "bogus", "-t", "bogus", "s.qcow2"][..], false),
    ] {
        for f in ["t.out", "o.out"] {
            let _ = std::fs::remove_file(d.join(f));
        }
        assert_eq!(same_as_qemu(d, args).0, 1, "{args:?}");
        assert_eq!(d.join("o.out").exists(), created, "{args:?}");
        assert_eq!(d.join("t.out").exists(), created, "{args:?}");
    }
}

/// `-r` values qemu-img refuses, with its two messages.
#[test]
fn bad_rates_as_qemu_img() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    sources(d);
    for rate in [
        "xx",
        "-5",
        "-0",
        "-5k",
        "1.5",
        "1e3",
        "8E",
        "99999999999999999999",
        "",
    ] {
        assert_eq!(same_as_qemu(d, &["-r", rate, "s.qcow2"]).0, 1, "{rate}");
    }
    for rate in ["0", "0x10000000", "7.99E", " 64M"] {
        assert_eq!(same_as_qemu(d, &["-r", rate, "s.qcow2"]).0, 0, "{rate}");
        assert_same_output(d, "raw");
    }
}

/// Wall time of `TOOL convert ARGS DST` in `dir` (which must succeed).
fn timed(program: &str, dir: &Path, args: &[&str], dst: &str) -> Duration {
    let t = Instant::now();
    let (code, err) = convert(program, dir, args, dst);
    assert_eq!(code, 0, "{program} {args:?}: {err}");
    t.elapsed()
}

/// `-r RATE` paces the writes as qemu-img does: 8 MiB of data at 4 MiB/s takes about
/// 1.5 s with both (the first 2 MiB request goes at once, each later one waits for the ones
/// before it), at any `-m`, raw or qcow2, compressed too.
#[test]
fn rate_limit_paces_as_qemu_img() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    std::fs::write(d.join("data.raw"), vec![0x5au8; 8 << 20]).unwrap();
    let cases: &[(&str, &[&str])] = &[
        ("raw", &["-r", "4M", "-f", "raw", "-O", "raw", "data.raw"]),
        (
            "qcow2",
            &[
                "-r", "4M", "-m", "1", "-f", "raw", "-O", "qcow2", "data.raw",
            ],
        ),
        (
            "qcow2",
            &["-r", "4M", "-W", "-f", "raw", "-O", "qcow2", "data.raw"],
        ),
    ];
    for (fmt, args) in cases {
        let theirs = timed("qemu-img", d, args, "t.out");
        let ours = timed(OURS, d, args, "o.out");
        eprintln!("{args:?}: qemu-img {theirs:?}, ours {ours:?}");
        for t in [theirs, ours] {
            assert!(t >= Duration::from_millis(1400), "{args:?}: {t:?}");
            assert!(t < Duration::from_secs(6), "{args:?}: {t:?}");
        }
        assert_same_output(d, fmt);
    }
    // Compressed: each cluster counts in full (64 KiB requests, so nearly all wait).
    let args = ["-r", "8M", "-c", "-f", "raw", "-O", "qcow2", "data.raw"];
    let ours = timed(OURS, d, &args, "o.out");
    assert!(ours >= Duration::from_millis(800), "{ours:?}");
    let unlimited = timed(
        OURS,
        d,
        &["-c", "-f", "raw", "-O", "qcow2", "data.raw"],
        "o.out",
    );
    eprintln!("-c at 8M/s: {ours:?}, unlimited {unlimited:?}");
}

/// `-C` between raw files: both tools copy the data with copy_file_range, and the outputs
/// read the same; with qcow2 on either side ours falls back to reading and writing.
#[test]
fn copy_offloading_as_qemu_img() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    sources(d);
    let args = ["-C", "-f", "raw", "-O", "raw", "s.raw"];
    let theirs = strace("qemu-img", d, "copy_file_range", &args, "t.out");
    let ours = strace(OURS, d, "copy_file_range", &args, "o.out");
    let calls = |t: &str| t.lines().filter(|l| l.contains("copy_file_range(")).count();
    assert!(calls(&theirs) > 0, "{theirs}");
    assert!(calls(&ours) > 0, "{ours}");
    assert_same_output(d, "raw");
    // Several raw sources, into an existing file.
    for f in ["t.out", "o.out"] {
        std::fs::write(d.join(f), vec![0x77u8; 3 << 20]).unwrap();
    }
    let args = ["-C", "-n", "-f", "raw", "-O", "raw", "s.raw", "s.raw"];
    assert_eq!(same_as_qemu(d, &args).0, 0);
    assert_same_output(d, "raw");
    for (fmt, args) in [
        ("qcow2", &["-C", "-O", "qcow2", "s.qcow2"][..]),
        ("raw", &["-C", "-O", "raw", "s.qcow2"][..]),
        ("qcow2", &["-C", "-f", "raw", "-O", "qcow2", "s.raw"][..]),
    ] {
        assert_eq!(same_as_qemu(d, args).0, 0, "{args:?}");
        assert_same_output(d, fmt);
    }
}

/// What qemu-img refuses with `-C`.
#[test]
fn copy_offloading_refusals_as_qemu_img() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    sources(d);
    for args in [
        &["-C", "-c", "-O", "qcow2", "s.qcow2"][..],
        &["-C", "-S", "4k", "s.qcow2"][..],
        &["-C", "-S", "0", "s.qcow2"][..],
        &["-C", "--salvage", "s.qcow2"][..],
    ] {
        assert_eq!(same_as_qemu(d, args).0, 1, "{args:?}");
    }
}

/// Overwrite the L2 entry of guest cluster 1 of the 64 KiB-cluster image `img` with `f` of
/// the entry it had.
fn patch_l2_entry(img: &Path, mut f: impl FnMut(u64) -> u64) {
    let bytes = std::fs::read(img).unwrap();
    let be = |at: usize| u64::from_be_bytes(bytes[at..at + 8].try_into().unwrap());
    let l1 = be(40) as usize;
    let l2 = (be(l1) & 0x00ff_ffff_ffff_fe00) as usize;
    let entry = f(be(l2 + 8));
    crate::common::bytes::poke(img, (l2 + 8) as u64, &entry.to_be_bytes());
}

/// Sources with unreadable parts: a compressed cluster whose payload is garbage (its read
/// fails), and a cluster whose L2 entry is unaligned (its status fails too).
fn damaged(dir: &Path) {
    qemu_create_in(dir, "plain.qcow2", "qcow2", "", "1M");
    qemu_io_in(
        dir,
        "plain.qcow2",
        &["write -P 0xaa 0 192k", "write -P 0x11 192k 64k"],
    );
    let (plain, z) = (dir.join("plain.qcow2"), dir.join("z.qcow2"));
    let (plain, z) = (plain.to_str().unwrap(), z.to_str().unwrap());
    run("qemu-img", &["convert", "-c", "-O", "qcow2", plain, z]);
    // The compressed descriptor's offset field is the low 54 bits (64 KiB clusters).
    let mut payload = 0;
    patch_l2_entry(&dir.join("z.qcow2"), |e| {
        payload = e & ((1 << 54) - 1);
        e
    });
    crate::common::bytes::poke(&dir.join("z.qcow2"), payload, &[0xff; 64]);
    std::fs::copy(dir.join("plain.qcow2"), dir.join("u.qcow2")).unwrap();
    patch_l2_entry(&dir.join("u.qcow2"), |e| e + 0x200);
}

/// `--salvage`: the same warnings as qemu-img (one per unreadable 512-byte sector, offsets in
/// the source that has it; status failures twice, as qemu-img walks the map twice), zeros in
/// their place; `-q` silences them; without `--salvage` both fail with the same message.
#[test]
fn salvage_as_qemu_img() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    damaged(d);
    let cases: &[(&str, &[&str])] = &[
        ("raw", &["--salvage", "z.qcow2"]),
        ("raw", &["--salvage", "u.qcow2"]),
        ("qcow2", &["--salvage", "-O", "qcow2", "u.qcow2"]),
        (
            "raw",
            &["--salvage", "-m", "1", "plain.qcow2", "z.qcow2", "u.qcow2"],
        ),
        ("raw", &["--salvage", "-q", "z.qcow2", "u.qcow2"]),
    ];
    for (fmt, args) in cases {
        let (code, stderr) = same_as_qemu(d, args);
        assert_eq!(code, 0, "{args:?}");
        let quiet = args.contains(&"-q");
        assert_eq!(stderr.is_empty(), quiet, "{args:?}: {stderr}");
        assert_same_output(d, fmt);
    }
    let (_, stderr) = same_as_qemu(d, &["--salvage", "z.qcow2"]);
    assert_eq!(
        stderr.lines().count(),
        128,
        "one warning per sector of a cluster"
    );
    assert_eq!(same_as_qemu(d, &["u.qcow2"]).0, 1);
    assert_eq!(same_as_qemu(d, &["plain.qcow2", "u.qcow2"]).0, 1);
    // qemu-img reads compressed clusters one by one: the message names the failing one.
    assert_eq!(same_as_qemu(d, &["z.qcow2"]).0, 1);
    assert_eq!(same_as_qemu(d, &["plain.qcow2", "z.qcow2"]).0, 1);
}
