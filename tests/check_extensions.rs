//! `qcow2 check` on images whose header extensions point at clusters: the LUKS header of an
//! encrypted image and persistent bitmaps must be counted exactly as `qemu-img check` counts
//! them, and `-r leaks`/`-r all` must never free them. An extension we do not understand makes
//! the repair refuse rather than free clusters it might own.

use crate::common;

use std::os::unix::fs::FileExt;
use std::path::Path;

use common::{path_in, qcow2, qemu_check, run};
use qcow2_engine::check::CheckReport;

const SECRET: &str = "secret,id=sec0,data=abc";

/// qemu-img's/qemu-io's `--image-opts` spelling of an encrypted image.
fn luks_opts(img: &str) -> String {
    format!("driver=qcow2,encrypt.key-secret=sec0,file.filename={img}")
}

/// Our `check --output=json [extra] IMG`: exit code and report.
fn our_check(img: &str, extra: &[&str]) -> (i32, CheckReport) {
    let mut args = vec!["check", "--output=json"];
    args.extend_from_slice(extra);
    args.push(img);
    let r = qcow2(&args);
    let rep = serde_json::from_str(&r.stdout)
        .unwrap_or_else(|e| panic!("{args:?}: {e}\n{}{}", r.stdout, r.stderr));
    (r.code, rep)
}

/// The numbers both tools report must agree.
fn assert_same_numbers(ours: &CheckReport, theirs: &CheckReport) {
    let nums = |r: &CheckReport| {
        (
            r.check_errors,
            r.corruptions,
            r.leaks,
            r.image_end_offset,
            r.allocated_clusters,
            r.total_clusters,
        )
    };
    assert_eq!(nums(ours), nums(theirs), "ours {ours:?}\ntheirs {theirs:?}");
}

/// An encrypted image with some data written through QEMU.
fn luks_image(dir: &Path) -> String {
    let img = path_in(dir, "luks.qcow2");
    run(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "--object",
            SECRET,
            "-o",
            "encrypt.format=luks,encrypt.key-secret=sec0,encrypt.iter-time=10",
            &img,
            "1M",
        ],
    );
    let opts = luks_opts(&img);
    run(
        "qemu-io",
        &[
            "--object",
            SECRET,
            "--image-opts",
            "-c",
            "write -P 0x5c 0 192k",
            &opts,
        ],
    );
    img
}

/// QEMU's check of the encrypted image, and its data still reads back.
fn qemu_verifies_luks(img: &str) -> CheckReport {
    let opts = luks_opts(img);
    let (code, rep) = qemu_check(Path::new(&opts), &["--object", SECRET, "--image-opts"]);
    assert_eq!(code, 0, "{rep:?}");
    run(
        "qemu-io",
        &[
            "--object",
            SECRET,
            "--image-opts",
            "-c",
            "read -P 0x5c 0 192k",
            &opts,
        ],
    );
    rep
}

#[test]
fn luks_header_is_not_a_leak() {
    let dir = tempfile::tempdir().unwrap();
    let img = luks_image(dir.path());
    let theirs = qemu_verifies_luks(&img);
    let (code, ours) = our_check(&img, &[]);
    assert_eq!(code, 0, "{ours:?}");
    assert_same_numbers(&ours, &theirs);
    for mode in ["leaks", "all"] {
        let (code, ours) = our_check(&img, &["-r", mode]);
        assert_eq!(code, 0, "-r {mode}: {ours:?}");
        assert_eq!(ours.leaks_fixed + ours.corruptions_fixed, 0, "-r {mode}");
        assert_same_numbers(&ours, &qemu_verifies_luks(&img));
    }
}

#[test]
fn bitmaps_are_not_leaks() {
    let dir = tempfile::tempdir().unwrap();
    let img = path_in(dir.path(), "bitmaps.qcow2");
    common::qemu_create(&img, "", "4M");
    run("qemu-img", &["bitmap", "--add", &img, "b0"]);
    run("qemu-img", &["bitmap", "--add", "-g", "4k", &img, "b1"]);
    // Writes through qemu-io dirty the enabled bitmaps, which QEMU stores on close.
    common::qemu_io(&img, &["write -P 0x11 0 1M", "write 3M 64k"]);
    let (code, theirs) = qemu_check(Path::new(&img), &[]);
    assert_eq!(code, 0, "{theirs:?}");
    let (code, ours) = our_check(&img, &[]);
    assert_eq!(code, 0, "{ours:?}");
    assert_same_numbers(&ours, &theirs);
    for mode in ["leaks", "all"] {
        let (code, ours) = our_check(&img, &["-r", mode]);
        assert_eq!(code, 0, "-r {mode}: {ours:?}");
        let (code, theirs) = qemu_check(Path::new(&img), &[]);
        assert_eq!(code, 0, "after -r {mode}: {theirs:?}");
        assert_same_numbers(&ours, &theirs);
    }
    let info = run("qemu-img", &["info", &img]);
    assert!(info.contains("b0") && info.contains("b1"), "{info}");
}

/// Insert an extension of unknown type `kind` with 8 bytes of data right after the header.
fn add_unknown_extension(img: &str, kind: u32) {
    let mut bytes = std::fs::read(img).unwrap();
    let hdr_len = u32::from_be_bytes(bytes[100..104].try_into().unwrap()) as usize;
    let mut ext = kind.to_be_bytes().to_vec();
    ext.extend_from_slice(&8u32.to_be_bytes());
    ext.extend_from_slice(&[0xee; 8]);
    bytes.splice(hdr_len..hdr_len, ext);
    // The extension area is followed by zeros up to the end of cluster 0: drop as many.
    bytes.drain(65536..65536 + 16);
    std::fs::write(img, bytes).unwrap();
}

#[test]
fn unknown_extension_refuses_repair() {
    let dir = tempfile::tempdir().unwrap();
    let img = path_in(dir.path(), "unknown.qcow2");
    common::qemu_create(&img, "", "1M");
    common::qemu_io(&img, &["write 0 64k"]);
    add_unknown_extension(&img, 0x1234_5678);
    let (code, theirs) = qemu_check(Path::new(&img), &[]);
    assert_eq!(code, 0, "QEMU accepts the extension: {theirs:?}");
    let (code, ours) = our_check(&img, &[]);
    assert_eq!(code, 0, "checking is fine: {ours:?}");
    let before = std::fs::read(&img).unwrap();
    for mode in ["leaks", "all"] {
        let r = qcow2(&["check", "-r", mode, &img]);
        assert_eq!(r.code, 1, "-r {mode}: {}{}", r.stdout, r.stderr);
        assert!(r.stderr.contains("0x12345678"), "{}", r.stderr);
        assert!(
            std::fs::read(&img).unwrap() == before,
            "-r {mode} changed the image"
        );
    }
}

/// Where the first bitmap directory entry of `img` is (from the bitmaps extension).
fn first_bitmap_entry(img: &str) -> u64 {
    let c0 = std::fs::read(img).unwrap();
    let hdr_len = u32::from_be_bytes(c0[100..104].try_into().unwrap()) as usize;
    let mut off = hdr_len;
    loop {
        let kind = u32::from_be_bytes(c0[off..off + 4].try_into().unwrap());
        let len = u32::from_be_bytes(c0[off + 4..off + 8].try_into().unwrap()) as usize;
        assert_ne!(kind, 0, "no bitmaps extension");
        if kind == 0x2385_2875 {
            return u64::from_be_bytes(c0[off + 24..off + 32].try_into().unwrap());
        }
        off += 8 + len.next_multiple_of(8);
    }
}

#[test]
fn a_huge_bitmap_table_is_read_in_bounded_memory() {
    let dir = tempfile::tempdir().unwrap();
    let img = path_in(dir.path(), "huge-bitmap.qcow2");
    common::qemu_create(&img, "", "4M");
    run("qemu-img", &["bitmap", "--add", &img, "b0"]);
    common::qemu_io(&img, &["write 0 64k"]);
    // Claim 2^25 table entries (256 MiB) and make the (sparse) file long enough to hold them.
    let entry = first_bitmap_entry(&img);
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&img)
        .unwrap();
    let mut table = [0u8; 8];
    f.read_exact_at(&mut table, entry).unwrap();
    let table = u64::from_be_bytes(table);
    let entries: u32 = 1 << 25;
    f.write_all_at(&entries.to_be_bytes(), entry + 8).unwrap();
    f.set_len(table + u64::from(entries) * 8).unwrap();
    drop(f);
    let out = std::process::Command::new("/usr/bin/time")
        .args(["-f", "%M", env!("CARGO_BIN_EXE_qcow2"), "check", "-q", &img])
        .output();
    let Ok(out) = out else {
        eprintln!("no /usr/bin/time: skipping the memory measurement");
        return;
    };
    let stderr = String::from_utf8_lossy(&out.stderr);
    let rss: u64 = stderr.lines().last().unwrap().trim().parse().unwrap();
    // Checked (the table's clusters have no refcount: corruptions), never allocated whole.
    assert_eq!(
        out.status.code(),
        Some(2),
        "{}",
        stderr.lines().next().unwrap_or("")
    );
    assert!(rss < 100 << 10, "peak RSS {rss} KiB");
}
