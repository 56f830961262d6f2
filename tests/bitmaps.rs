//! Persistent dirty bitmaps through our read-write opens, checked by QEMU: `qemu-img info`
//! (flags), `qemu-img check` (no leaks) and `qemu-nbd -B` + `nbdinfo --map` (the dirty
//! ranges QEMU reads from the image).

use crate::common::bg::Bg;
use crate::common::{self, path_in, run};

use std::path::Path;
use std::time::Duration;

use qcow2_engine::image::{Image, OpenOptions, ZeroFlags};

/// The dirty ranges (offset, length) of bitmap `name` as QEMU reads them.
pub fn qemu_dirty(img: &str, name: &str) -> Vec<(u64, u64)> {
    let sock = format!("{img}.{name}.sock");
    let args = ["-r", "-f", "qcow2", "-B", name, "-k", &sock, img];
    let mut server = Bg::serving("qemu-nbd", &args, Path::new(&sock));
    let uri = format!("nbd+unix:///?socket={sock}");
    let map = run(
        "nbdinfo",
        &[&format!("--map=qemu:dirty-bitmap:{name}"), &uri],
    );
    // It exits after its one client; wait, so that its image lock is gone.
    assert!(server.exited_within(Duration::from_secs(10)).is_some());
    parse_map(&map)
}

/// The "dirty" lines of an `nbdinfo --map` listing, adjacent ones joined.
pub fn parse_map(map: &str) -> Vec<(u64, u64)> {
    let mut out: Vec<(u64, u64)> = Vec::new();
    for l in map.lines() {
        let f: Vec<&str> = l.split_whitespace().collect();
        if f.len() >= 3 && f[2] == "1" {
            let (off, len) = (f[0].parse().unwrap(), f[1].parse().unwrap());
            match out.last_mut() {
                Some(last) if last.0 + last.1 == off => last.1 += len,
                _ => out.push((off, len)),
            }
        }
    }
    out
}

/// The ranges a bitmap of granularity `g` over a disk of `size` must show after `writes`
/// on top of `before`.
pub fn expected(
    before: &[(u64, u64)],
    writes: &[(u64, u64)],
    g: u64,
    size: u64,
) -> Vec<(u64, u64)> {
    let mut chunks = vec![false; size.div_ceil(g) as usize];
    for &(off, len) in before.iter().chain(writes) {
        for c in off / g..(off + len).div_ceil(g) {
            chunks[c as usize] = true;
        }
    }
    let mut out: Vec<(u64, u64)> = Vec::new();
    for (c, _) in chunks.iter().enumerate().filter(|(_, d)| **d) {
        let (off, end) = (c as u64 * g, ((c as u64 + 1) * g).min(size));
        match out.last_mut() {
            Some(last) if last.0 + last.1 == off => last.1 = end - last.0,
            _ => out.push((off, end - off)),
        }
    }
    out
}

fn info(img: &str) -> String {
    run("qemu-img", &["info", img])
}

const SIZE: u64 = 64 << 20;

/// (name, granularity, enabled) of the bitmaps `qemu_bitmaps` makes.
const BITMAPS: [(&str, u64, bool); 4] = [
    ("b64k", 65536, true),
    ("b4k", 4096, true),
    ("b512", 512, true),
    ("off", 65536, false),
];

/// An image with QEMU-made bitmaps, each already holding QEMU-written dirty ranges.
fn qemu_bitmaps(img: &str) {
    common::qemu_create(img, "", SIZE);
    for (name, g, _) in BITMAPS {
        run(
            "qemu-img",
            &["bitmap", "--add", "-g", &g.to_string(), img, name],
        );
    }
    common::qemu_io(img, &["write 1M 100k", "write 40M 1k"]);
    run("qemu-img", &["bitmap", "--disable", img, "off"]);
}

/// Our writes: plain, write-zeroes, discard, unaligned.
const WRITES: [(u64, u64); 4] = [
    (0, 1),
    (3 << 20 | 100, 5000),
    (50 << 20, 3000),
    (60 << 20, 128 << 10),
];

async fn our_writes(img: &str) {
    let w = Image::open(img, &OpenOptions::new().writable(true))
        .await
        .unwrap();
    w.write_at(&[7], WRITES[0].0).await.unwrap();
    w.write_at(&vec![8; 5000], WRITES[1].0).await.unwrap();
    w.write_zeroes(WRITES[2].0, WRITES[2].1, ZeroFlags { may_unmap: true })
        .await
        .unwrap();
    w.discard(WRITES[3].0, WRITES[3].1).await.unwrap();
    w.close().await.unwrap();
}

#[tokio::test]
async fn qemu_bitmaps_track_our_writes() {
    let dir = tempfile::tempdir().unwrap();
    let img = path_in(dir.path(), "b.qcow2");
    qemu_bitmaps(&img);
    let before: Vec<_> = BITMAPS.iter().map(|b| qemu_dirty(&img, b.0)).collect();
    assert!(!before[3].is_empty());
    our_writes(&img).await;
    let i = info(&img);
    assert!(!i.contains("in-use"), "{i}");
    for (name, ..) in BITMAPS {
        assert!(i.contains(&format!("name: {name}")), "{i}");
    }
    common::assert_check_clean(Path::new(&img));
    for (k, (name, g, enabled)) in BITMAPS.into_iter().enumerate() {
        let want = match enabled {
            true => expected(&before[k], &WRITES, g, SIZE),
            false => before[k].clone(),
        };
        assert_eq!(qemu_dirty(&img, name), want, "bitmap {name}");
    }
    // A second session stores again: the old clusters are freed, nothing leaks.
    our_writes(&img).await;
    common::assert_check_clean(Path::new(&img));
    assert_eq!(
        qemu_dirty(&img, "b4k"),
        expected(&before[1], &WRITES, 4096, SIZE)
    );
}

#[tokio::test]
async fn open_image_shows_bitmaps_in_use_and_a_crash_leaves_them_so() {
    let dir = tempfile::tempdir().unwrap();
    let img = path_in(dir.path(), "b.qcow2");
    qemu_bitmaps(&img);
    let w = Image::open(&img, &OpenOptions::new().writable(true))
        .await
        .unwrap();
    w.write_at(&[1; 512], 0).await.unwrap();
    w.flush().await.unwrap();
    // While we hold the image, the enabled bitmaps are in use on disk; the disabled one not.
    let i = run("qemu-img", &["info", "-U", &img]);
    assert_eq!(i.matches("in-use").count(), 3, "{i}");
    drop(w); // a crash: no close
    let i = info(&img);
    assert_eq!(i.matches("in-use").count(), 3, "{i}");
    common::assert_check_clean(Path::new(&img));
    // In-use bitmaps are carried through another session unchanged; the rest stay sound.
    our_writes(&img).await;
    let i = info(&img);
    assert_eq!(i.matches("in-use").count(), 3, "{i}");
    common::assert_check_clean(Path::new(&img));
    assert!(!qemu_dirty(&img, "off").is_empty());
}

#[tokio::test]
async fn read_only_opens_change_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let img = path_in(dir.path(), "b.qcow2");
    qemu_bitmaps(&img);
    let bytes = std::fs::read(&img).unwrap();
    let r = Image::open(&img, &OpenOptions::new()).await.unwrap();
    let list = r.bitmaps().await.unwrap();
    assert_eq!(list.len(), 4);
    assert_eq!((list[2].name.as_str(), list[2].granularity), ("b512", 512));
    assert!(list[0].auto && !list[3].auto && !list[0].in_use);
    for (name, ..) in BITMAPS {
        assert_eq!(
            r.bitmap_extents(name).await.unwrap(),
            qemu_dirty(&img, name)
        );
    }
    r.close().await.unwrap();
    assert!(std::fs::read(&img).unwrap() == bytes);
}

#[tokio::test]
async fn our_bitmaps_read_identically_by_qemu() {
    let dir = tempfile::tempdir().unwrap();
    let img = path_in(dir.path(), "ours.qcow2");
    common::qemu_create(&img, "cluster_size=4k", SIZE);
    let w = Image::open(&img, &OpenOptions::new().writable(true))
        .await
        .unwrap();
    w.add_bitmap("a", None, false).await.unwrap();
    w.add_bitmap("fine", Some(512), false).await.unwrap();
    w.add_bitmap("later", Some(1 << 20), true).await.unwrap();
    assert!(w.add_bitmap("a", None, false).await.is_err());
    assert!(w.add_bitmap("bad", Some(1000), false).await.is_err());
    w.write_at(&[1; 9000], 7 << 20).await.unwrap();
    w.enable_bitmap("later", true).await.unwrap();
    w.write_at(&[1; 10], 20 << 20).await.unwrap();
    w.close().await.unwrap();
    common::assert_check_clean(Path::new(&img));
    let i = info(&img);
    assert!(
        !i.contains("in-use") && i.contains("granularity: 4096"),
        "{i}"
    );
    let writes = [(7 << 20, 9000), (20 << 20, 10)];
    assert_eq!(qemu_dirty(&img, "a"), expected(&[], &writes, 4096, SIZE));
    assert_eq!(qemu_dirty(&img, "fine"), expected(&[], &writes, 512, SIZE));
    assert_eq!(
        qemu_dirty(&img, "later"),
        expected(&[], &writes[1..], 1 << 20, SIZE)
    );
    // Merge, clear, remove, then QEMU again.
    let w = Image::open(&img, &OpenOptions::new().writable(true))
        .await
        .unwrap();
    w.merge_bitmap("later", &w, "fine").await.unwrap();
    w.clear_bitmap("a").await.unwrap();
    w.remove_bitmap("fine").await.unwrap();
    w.enable_bitmap("a", false).await.unwrap();
    w.write_at(&[1; 10], 30 << 20).await.unwrap();
    w.close().await.unwrap();
    common::assert_check_clean(Path::new(&img));
    let i = info(&img);
    assert!(!i.contains("fine") && !i.contains("in-use"), "{i}");
    assert_eq!(qemu_dirty(&img, "a"), vec![]);
    let later = [(7 << 20, 9000), (20 << 20, 10), (30 << 20, 10)];
    assert_eq!(
        qemu_dirty(&img, "later"),
        expected(&[], &later, 1 << 20, SIZE)
    );
    // Removing the last bitmaps drops the extension; QEMU agrees nothing is left.
    let w = Image::open(&img, &OpenOptions::new().writable(true))
        .await
        .unwrap();
    w.remove_bitmap("a").await.unwrap();
    w.remove_bitmap("later").await.unwrap();
    w.close().await.unwrap();
    common::assert_check_clean(Path::new(&img));
    assert!(!info(&img).contains("bitmaps:"));
}

#[tokio::test]
async fn resize_carries_bitmaps_as_qemu_does() {
    let dir = tempfile::tempdir().unwrap();
    let img = path_in(dir.path(), "b.qcow2");
    qemu_bitmaps(&img);
    let before: Vec<_> = BITMAPS.iter().map(|b| qemu_dirty(&img, b.0)).collect();
    let big = 2 * SIZE;
    let w = Image::open(&img, &OpenOptions::new().writable(true))
        .await
        .unwrap();
    w.resize(big).await.unwrap();
    w.write_at(&[3; 4096], SIZE + 12345).await.unwrap();
    w.close().await.unwrap();
    common::assert_check_clean(Path::new(&img));
    assert!(!info(&img).contains("in-use"));
    let writes = [(SIZE + 12345, 4096)];
    for (k, (name, g, enabled)) in BITMAPS.into_iter().enumerate() {
        let want = match enabled {
            true => expected(&before[k], &writes, g, big),
            false => before[k].clone(),
        };
        assert_eq!(qemu_dirty(&img, name), want, "bitmap {name}");
    }
    // QEMU accepts what we wrote: it resizes the bitmaps back down itself.
    run("qemu-img", &["resize", "--shrink", &img, &SIZE.to_string()]);
    common::assert_check_clean(Path::new(&img));
}

/// Where the bitmap directory of `img` starts (from the bitmaps extension).
fn directory_offset(img: &str) -> u64 {
    let b = std::fs::read(img).unwrap();
    let mut at = u32::from_be_bytes(b[100..104].try_into().unwrap()) as usize;
    loop {
        let kind = u32::from_be_bytes(b[at..at + 4].try_into().unwrap());
        let len = u32::from_be_bytes(b[at + 4..at + 8].try_into().unwrap()) as usize;
        assert_ne!(kind, 0, "no bitmaps extension");
        if kind == 0x2385_2875 {
            return u64::from_be_bytes(b[at + 24..at + 32].try_into().unwrap());
        }
        at += 8 + len.next_multiple_of(8);
    }
}

/// Directory entries QEMU refuses ("doesn't satisfy the constraints") fail our writable open
/// too, with an error and without touching the file (never a panic or a huge allocation).
#[tokio::test]
async fn entries_qemu_refuses_fail_a_writable_open() {
    let dir = tempfile::tempdir().unwrap();
    let good = path_in(dir.path(), "good.qcow2");
    common::qemu_create(&good, "", "8M");
    run("qemu-img", &["bitmap", "--add", &good, "b0"]);
    let d = directory_offset(&good);
    let cases: [(&str, u64, &[u8]); 5] = [
        ("granularity 256", 17, &[8]),
        ("unknown flag", 15, &[8]),
        ("type 2", 16, &[2]),
        ("table of 2^32-1 entries", 8, &[0xff; 4]),
        ("name past the directory", 18, &[0xff, 0xff]),
    ];
    for (what, at, bytes) in cases {
        let img = path_in(dir.path(), "bad.qcow2");
        std::fs::copy(&good, &img).unwrap();
        common::bytes::poke(Path::new(&img), d + at, bytes);
        let before = std::fs::read(&img).unwrap();
        let (code, _) = common::status("qemu-io", &["-c", "write 0 512", &img]);
        assert_ne!(code, 0, "{what}: QEMU refuses it");
        let r = Image::open(&img, &OpenOptions::new().writable(true)).await;
        assert!(r.is_err(), "{what}: opened");
        assert!(
            std::fs::read(&img).unwrap() == before,
            "{what}: the file changed"
        );
    }
}
