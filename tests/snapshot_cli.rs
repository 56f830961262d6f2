//! Reading a snapshot without applying it: `qcow2 convert -l`, `measure -l` and `serve -l`
//! give what qemu-img's `convert -l` and `measure -l` give, in each `-l` form.

use std::path::Path;

use crate::common::bg::Bg;
use crate::common::{qcow2, qcow2_ok, qemu_create, qemu_io, run, status};

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// An image with two snapshots ("one" = ID 1, "two" = ID 2) that differ from each other and
/// from the active disk, and a larger virtual size after "one".
fn image(dir: &Path) -> std::path::PathBuf {
    let img = dir.join("img.qcow2");
    qemu_create(&img, "", "2M");
    qemu_io(&img, &["write -P 1 0 256k"]);
    run("qemu-img", &["snapshot", "-c", "one", s(&img)]);
    run("qemu-img", &["resize", s(&img), "4M"]);
    qemu_io(&img, &["write -P 2 64k 64k", "write -P 3 3M 64k"]);
    qcow2_ok(&["snapshot", "-c", "two", s(&img)]);
    qemu_io(&img, &["write -P 4 0 1M"]);
    img
}

#[test]
fn convert_l_matches_qemu_img_in_every_form() {
    let dir = tempfile::tempdir().unwrap();
    let img = image(dir.path());
    let (ours, theirs) = (dir.path().join("ours.raw"), dir.path().join("theirs.raw"));
    for spec in [
        "one",
        "2",
        "snapshot.name=two",
        "snapshot.id=1",
        "snapshot.id=2,snapshot.name=two",
    ] {
        qcow2_ok(&["convert", "-l", spec, "-O", "raw", s(&img), s(&ours)]);
        run(
            "qemu-img",
            &["convert", "-l", spec, "-O", "raw", s(&img), s(&theirs)],
        );
        assert!(
            std::fs::read(&ours).unwrap() == std::fs::read(&theirs).unwrap(),
            "{spec}"
        );
    }
    // To qcow2 as well: qemu-img compare judges.
    let q = dir.path().join("one.qcow2");
    qcow2_ok(&["convert", "-l", "one", "-O", "qcow2", s(&img), s(&q)]);
    run(
        "qemu-img",
        &["convert", "-l", "one", "-O", "raw", s(&img), s(&theirs)],
    );
    run("qemu-img", &["compare", "-F", "raw", s(&q), s(&theirs)]);
    for bad in ["nope", "snapshot.id=1,snapshot.name=two"] {
        let r = qcow2(&["convert", "-l", bad, "-O", "raw", s(&img), s(&ours)]);
        assert_eq!(r.code, 1, "{bad}");
        assert!(
            r.stderr
                .contains("Failed to load snapshot: Can't find snapshot"),
            "{}",
            r.stderr
        );
        let (code, _) = status(
            "qemu-img",
            &["convert", "-l", bad, "-O", "raw", s(&img), s(&theirs)],
        );
        assert_eq!(code, 1, "qemu-img {bad}");
    }
}

#[test]
fn measure_l_matches_qemu_img() {
    let dir = tempfile::tempdir().unwrap();
    let img = image(dir.path());
    for spec in ["one", "two"] {
        let ours = qcow2_ok(&["measure", "-l", spec, "-O", "qcow2", s(&img)]);
        let theirs = run("qemu-img", &["measure", "-l", spec, "-O", "qcow2", s(&img)]);
        assert_eq!(ours, theirs, "{spec}");
    }
}

#[test]
fn serve_l_exports_the_snapshot_read_only() {
    let dir = tempfile::tempdir().unwrap();
    let img = image(dir.path());
    let sock = dir.path().join("nbd.sock");
    let _server = Bg::serving(
        env!("CARGO_BIN_EXE_qcow2"),
        &["serve", "-t", "-l", "one", "-k", s(&sock), s(&img)],
        &sock,
    );
    let uri = format!("nbd+unix:///?socket={}", sock.display());
    let theirs = dir.path().join("one.raw");
    run(
        "qemu-img",
        &["convert", "-l", "one", "-O", "raw", s(&img), s(&theirs)],
    );
    run(
        "qemu-img",
        &["compare", "-f", "raw", "-F", "raw", &uri, s(&theirs)],
    );
    let (code, out) = status("qemu-io", &["-f", "raw", "-c", "write 0 4k", &uri]);
    assert!(
        code != 0 || out.contains("failed"),
        "a write to a snapshot export: {out}"
    );
}

#[test]
fn info_json_lists_our_snapshots_as_qemu_img_does() {
    let dir = tempfile::tempdir().unwrap();
    let img = image(dir.path());
    let snaps = |text: &str| {
        let v: serde_json::Value = serde_json::from_str(text).unwrap();
        v["snapshots"].clone()
    };
    let ours = qcow2_ok(&["info", "--output=json", s(&img)]);
    let theirs = run("qemu-img", &["info", "--output=json", s(&img)]);
    assert_eq!(snaps(&ours), snaps(&theirs));
    assert_eq!(snaps(&ours).as_array().map(Vec::len), Some(2));
}

#[test]
fn blocking_code_creates_and_applies_snapshots() {
    use qcow2_engine::blocking::BlockingImage;
    use qcow2_engine::image::OpenOptions;
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("b.qcow2");
    qemu_create(&img, "", "1M");
    let b = BlockingImage::open(&img, &OpenOptions::new().writable(true)).unwrap();
    b.write_at(&[1; 4096], 0).unwrap();
    let snap = b.create_snapshot("one").unwrap();
    b.write_at(&[2; 4096], 0).unwrap();
    assert_eq!(b.snapshots().unwrap(), std::slice::from_ref(&snap));
    b.apply_snapshot("one").unwrap();
    let mut buf = [0u8; 4096];
    b.read_at(&mut buf, 0).unwrap();
    assert_eq!(buf, [1; 4096]);
    b.delete_snapshot(&snap.id).unwrap();
    b.close().unwrap();
    crate::common::assert_check_clean(&img);
    qemu_io(&img, &["read -P 1 0 4k"]);
}

/// A snapshot whose L1 table names the active L1 table as an L2 table (whose entries then
/// read as valid data mappings): deleting or applying it is refused before anything changes
/// (delete used to drop the active L1 table's refcount to 0, so the allocator could hand it
/// out as free space).
#[test]
fn snapshot_tables_pointing_at_metadata_are_refused() {
    use crate::common::bytes::{poke, read};
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("h.qcow2");
    qemu_create(&img, "", "1M");
    qemu_io(&img, &["write -P 1 0 64k"]);
    run("qemu-img", &["snapshot", "-c", "bad", s(&img)]);
    let be = |b: Vec<u8>| u64::from_be_bytes(b.try_into().unwrap());
    let active_l1 = be(read(&img, 40, 8));
    let snaps_at = be(read(&img, 64, 8));
    let snap_l1 = be(read(&img, snaps_at, 8));
    poke(&img, snap_l1, &active_l1.to_be_bytes());
    let before = std::fs::read(&img).unwrap();
    for op in ["-d", "-a"] {
        let r = qcow2(&["snapshot", op, "bad", s(&img)]);
        assert_eq!(r.code, 1, "{op}: {}", r.stderr);
        assert!(
            std::fs::read(&img).unwrap() == before,
            "{op} changed the image"
        );
    }
}

/// A snapshot name that is not UTF-8 would be rewritten with replacement characters by any
/// operation that writes the table again: those are refused, the image unchanged.
#[test]
fn non_utf8_names_are_never_rewritten() {
    use crate::common::bytes::{poke, read};
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("n.qcow2");
    qemu_create(&img, "", "1M");
    run("qemu-img", &["snapshot", "-c", "abc", s(&img)]);
    let snaps_at = u64::from_be_bytes(read(&img, 64, 8).try_into().unwrap());
    // The entry: 40 bytes, 24 of extra data, ID "1", then the name.
    poke(&img, snaps_at + 40 + 24 + 1, &[0xff]);
    let before = std::fs::read(&img).unwrap();
    let r = qcow2(&["snapshot", "-c", "new", s(&img)]);
    assert_eq!(r.code, 1, "{}", r.stderr);
    assert!(r.stderr.contains("not UTF-8"), "{}", r.stderr);
    assert!(std::fs::read(&img).unwrap() == before);
    // Applying does not rewrite the table.
    qcow2_ok(&["snapshot", "-a", "1", s(&img)]);
    crate::common::assert_check_clean(&img);
}

/// qemu-img refuses to apply a snapshot while the image has persistent bitmaps (enabled or
/// not, and before looking the name up); so do we, with its message and status, leaving the
/// image as it was. Creating and deleting snapshots stays allowed, as there.
#[test]
fn apply_is_refused_while_bitmaps_exist() {
    let dir = tempfile::tempdir().unwrap();
    for flags in [&[][..], &["--disable"][..]] {
        let img = image(dir.path());
        let mut add = vec!["bitmap", "--add"];
        add.extend_from_slice(flags);
        add.extend([s(&img), "b0"]);
        run("qemu-img", &add);
        let copy = dir.path().join("copy.qcow2");
        std::fs::copy(&img, &copy).unwrap();
        for name in ["one", "nosuch"] {
            let (code, theirs) = status("qemu-img", &["snapshot", "-a", name, s(&copy)]);
            let ours = qcow2(&["snapshot", "-a", name, s(&img)]);
            assert_eq!(ours.code, code, "{flags:?} {name}: {}", ours.stderr);
            let want = theirs.trim().replace("qemu-img: ", "");
            assert!(ours.stderr.contains(&want), "{want:?} vs {:?}", ours.stderr);
        }
        // Unchanged: the active disk still reads the last write, the image checks clean.
        qemu_io(&img, &["read -P 4 0 1M", "read -P 3 3M 64k"]);
        crate::common::assert_check_clean(&img);
        qcow2_ok(&["snapshot", "-c", "three", s(&img)]);
        qcow2_ok(&["snapshot", "-d", "three", s(&img)]);
        std::fs::remove_file(&img).unwrap();
    }
}

/// The library refuses it too (the CLI's own check comes first), changing nothing.
#[tokio::test]
async fn library_apply_is_refused_while_bitmaps_exist() {
    use qcow2_engine::image::{Image, OpenOptions};
    let dir = tempfile::tempdir().unwrap();
    let img = image(dir.path());
    run("qemu-img", &["bitmap", "--add", s(&img), "b0"]);
    let opened = Image::open(&img, &OpenOptions::new().writable(true))
        .await
        .unwrap();
    let e = opened.apply_snapshot("one").await.unwrap_err();
    assert_eq!(e.kind(), qcow2_engine::ErrorKind::Unsupported, "{e}");
    opened.close().await.unwrap();
    qemu_io(&img, &["read -P 4 0 1M", "read -P 3 3M 64k"]);
    crate::common::assert_check_clean(&img);
}
