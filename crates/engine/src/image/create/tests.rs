//! Create tests: option parsing, layout arithmetic, and images checked by QEMU's own tools
//! (`qemu-img check`/`info`/`compare`, `qemu-io`). The QEMU tests are skipped with a message
//! when `qemu-img` is not installed.

use super::*;
use crate::ErrorKind;
use crate::storage::IoFuture;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;

/// A minimal file-backed Storage for these tests only (the real backend lives in storage/).
#[derive(Debug)]
struct TestFile(std::fs::File);

impl TestFile {
    fn create(path: &Path) -> TestFile {
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path);
        TestFile(f.unwrap())
    }
}

impl Storage for TestFile {
    fn read_at<'a>(&'a self, buf: &'a mut [u8], offset: u64) -> IoFuture<'a, ()> {
        Box::pin(async move {
            buf.fill(0);
            let mut done = 0;
            while done < buf.len() {
                match self.0.read_at(&mut buf[done..], offset + done as u64)? {
                    0 => break,
                    n => done += n,
                }
            }
            Ok(())
        })
    }
    fn write_at<'a>(&'a self, buf: &'a [u8], offset: u64) -> IoFuture<'a, ()> {
        Box::pin(async move { self.0.write_all_at(buf, offset) })
    }
    fn write_zeroes(&self, offset: u64, len: u64) -> IoFuture<'_, ()> {
        Box::pin(async move {
            let end = offset + len;
            if end > self.0.metadata()?.len() {
                self.0.set_len(end)?;
            }
            self.0.write_all_at(&vec![0; len as usize], offset)
        })
    }
    fn discard(&self, _offset: u64, _len: u64) -> IoFuture<'_, ()> {
        Box::pin(async { Ok(()) })
    }
    fn flush(&self) -> IoFuture<'_, ()> {
        Box::pin(async move { self.0.sync_all() })
    }
    fn len(&self) -> IoFuture<'_, u64> {
        Box::pin(async move { Ok(self.0.metadata()?.len()) })
    }
    fn set_len(&self, len: u64) -> IoFuture<'_, ()> {
        Box::pin(async move { self.0.set_len(len) })
    }
}

fn block_on<F: std::future::Future>(f: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap()
        .block_on(f)
}

fn opts(o: &str) -> CreateOptions {
    let mut c = CreateOptions::default();
    c.apply_o(o).unwrap();
    c
}

/// Create `dir/img.qcow2` with `-o o` (data_file names are taken relative to `dir`).
fn make_in(dir: &Path, o: &str) -> PathBuf {
    let mut c = opts(o);
    let path = dir.join("img.qcow2");
    let data = c.data_file.as_ref().map(|d| dir.join(d));
    if let Some(d) = &data {
        c.data_file = Some(d.to_string_lossy().into_owned());
    }
    let image = TestFile::create(&path);
    let data_storage = data.as_ref().map(|d| TestFile::create(d));
    let data_ref = data_storage.as_ref().map(|d| d as &dyn Storage);
    block_on(create(&image, data_ref, &c)).unwrap();
    path
}

fn have_qemu() -> bool {
    let ok = Command::new("qemu-img")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !ok {
        eprintln!("qemu-img not installed: skipping QEMU conformance test");
    }
    ok
}

fn run(cmd: &str, args: &[&str]) -> std::process::Output {
    Command::new(cmd).args(args).output().unwrap()
}

fn assert_check_clean(path: &Path) {
    let out = run("qemu-img", &["check", path.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "qemu-img check {}: {}{}",
        path.display(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn info(path: &Path) -> serde_json::Value {
    let out = run(
        "qemu-img",
        &["info", "--output=json", path.to_str().unwrap()],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// Create with our code, check it, and return `qemu-img info`.
fn make_checked(dir: &Path, o: &str) -> serde_json::Value {
    let path = make_in(dir, o);
    assert_check_clean(&path);
    let c0 = std::fs::read(&path).unwrap();
    let ih = ImageHeader::parse(&c0).unwrap();
    ih.validate(c0.len() as u64).unwrap();
    info(&path)
}

fn spec(v: &serde_json::Value) -> &serde_json::Value {
    &v["format-specific"]["data"]
}

// ---- option parsing ----

#[test]
fn parse_size_like_qemu_img() {
    let ok = [
        ("0", 0),
        ("1000", 1000),
        ("1001b", 1001),
        ("1B", 1),
        ("1k", 1024),
        ("1K", 1024),
        ("1.5k", 1536),
        ("1.k", 1024),
        (".5k", 512),
        ("012", 12),
        (" 12", 12),
        ("0x10", 16),
        ("1M", 1 << 20),
        ("2g", 2 << 30),
        ("1T", 1 << 40),
        ("1P", 1 << 50),
        ("7E", 7 << 60),
    ];
    for (s, v) in ok {
        assert_eq!(parse_size(s).unwrap(), v, "{s}");
    }
    for s in [
        "", "1x", "1.5", "1.5b", "0x1k", "1k5", "1 k", "12 ", "1e3", "1kb", "-1", "8E", ".",
    ] {
        assert_eq!(
            parse_size(s).unwrap_err().kind(),
            ErrorKind::InvalidArgument,
            "{s:?}"
        );
    }
}

#[test]
fn parse_o_splits_and_unescapes() {
    let v = CreateOptions::parse_o("cluster_size=4k,backing_file=a,,b,lazy_refcounts").unwrap();
    let want = [
        ("cluster_size", "4k"),
        ("backing_file", "a,b"),
        ("lazy_refcounts", "on"),
    ];
    let want: Vec<(String, String)> = want
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    assert_eq!(v, want);
    assert!(CreateOptions::parse_o("=x").is_err());
}

#[test]
fn apply_option_names_and_values() {
    let c = opts(
        "size=1G,cluster_size=16k,refcount_bits=0x8,compat=1.1,extended_l2=on,\
         compression_type=zstd,lazy_refcounts=yes,data_file=d,data_file_raw=true,\
         preallocation=falloc",
    );
    assert_eq!(c.size, Some(1 << 30));
    assert_eq!(c.cluster_size, 16384);
    assert_eq!(c.refcount_bits, 8);
    assert_eq!(c.compat, Compat::V3);
    assert!(c.extended_l2 && c.lazy_refcounts && c.data_file_raw);
    assert_eq!(c.compression_type, 1);
    assert_eq!(c.data_file.as_deref(), Some("d"));
    assert_eq!(c.preallocation, Preallocation::Falloc);
    assert_eq!(opts("compat=0.10").compat, Compat::V2);
    assert_eq!(opts("compat=v2").compat, Compat::V2);
    assert_eq!(opts("compat=v3").compat, Compat::V3);
    let mut c = CreateOptions::default();
    for bad in [
        "foo=bar",
        "compat=2",
        "lazy_refcounts=1",
        "compression_type=lz4",
        "preallocation=x",
    ] {
        assert_eq!(
            c.apply_o(bad).unwrap_err().kind(),
            ErrorKind::InvalidArgument,
            "{bad}"
        );
    }
    assert_eq!(
        c.apply_o("encryption=on").unwrap_err().kind(),
        ErrorKind::Unsupported
    );
}

#[test]
fn size_rounds_up_to_512_and_falls_back_to_backing() {
    assert_eq!(opts("size=1000").size_or(None).unwrap(), 1024);
    assert_eq!(CreateOptions::default().size_or(Some(513)).unwrap(), 1024);
    assert_eq!(opts("size=0").size_or(Some(4096)).unwrap(), 0);
    assert!(CreateOptions::default().size_or(None).is_err());
}

#[test]
fn data_file_raw_implies_metadata_preallocation() {
    assert_eq!(
        opts("data_file=x,data_file_raw=on").effective_preallocation(),
        Preallocation::Metadata
    );
    assert_eq!(
        opts("preallocation=full").effective_preallocation(),
        Preallocation::Full
    );
}

/// Option sets qemu-img refuses; we must refuse them too.
const REFUSED: &[&str] = &[
    "extended_l2=on,cluster_size=8k",
    "refcount_bits=3",
    "refcount_bits=0",
    "refcount_bits=128",
    "compat=0.10,refcount_bits=8",
    "compat=0.10,lazy_refcounts=on",
    "compat=0.10,data_file=d.raw",
    "compat=0.10,compression_type=zstd",
    "compat=0.10,extended_l2=on",
    "data_file_raw=on",
    "data_file=d.raw,data_file_raw=on,backing_file=b.qcow2",
    "backing_file=b.qcow2,preallocation=metadata",
    "backing_file=b.qcow2,preallocation=full",
    "backing_fmt=raw",
    "cluster_size=1000",
    "cluster_size=256",
    "cluster_size=4M",
];

#[test]
fn refused_combinations() {
    for o in REFUSED {
        let c = opts(o);
        let e = c.validate(1 << 20).expect_err(o);
        assert_eq!(e.kind(), ErrorKind::InvalidArgument, "{o}: {e}");
    }
}

#[test]
fn refused_sizes() {
    let e = opts("cluster_size=512").validate(129 << 30).unwrap_err();
    assert!(e.what().contains("too large"), "{e}");
    opts("cluster_size=512").validate(128 << 30).unwrap();
    assert!(opts("").validate(1 << 60).is_err());
    assert!(
        opts("cluster_size=2M")
            .validate(MAX_IMAGE_SIZE + 512)
            .is_err()
    );
    opts("cluster_size=2M").validate(1 << 61).unwrap();
}

#[test]
fn backing_with_preallocation_allowed_with_extended_l2() {
    opts("backing_file=b,extended_l2=on,preallocation=metadata")
        .validate(1 << 20)
        .unwrap();
}

#[test]
fn qemu_img_refuses_the_same_combinations() {
    if !have_qemu() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    for o in REFUSED {
        let path = dir.path().join("q.qcow2");
        let out = run(
            "qemu-img",
            &[
                "create",
                "-q",
                "-u",
                "-f",
                "qcow2",
                "-o",
                o,
                path.to_str().unwrap(),
                "1M",
            ],
        );
        assert!(!out.status.success(), "qemu-img accepted {o}");
    }
}

// ---- layout ----

#[test]
fn refcount_fixed_point() {
    assert_eq!(layout::refcount_clusters_for_test(3, 32768, 8192), (1, 1));
    // 4096 entries per block: 4095 others + 1 block + 1 table need a second block.
    assert_eq!(layout::refcount_clusters_for_test(4095, 4096, 64), (2, 1));
}

#[test]
fn default_layout_matches_qemu() {
    let l = Layout::compute(&opts(""), 1 << 30, Preallocation::Off, false).unwrap();
    assert_eq!((l.reftable_offset, l.reftable_clusters), (0x10000, 1));
    assert_eq!((l.refblock_offset, l.refblocks), (0x20000, 1));
    assert_eq!((l.l1_offset, l.l1_size, l.l1_clusters), (0x30000, 2, 1));
    assert_eq!(l.total_clusters, 4);
    let empty = Layout::compute(&opts(""), 0, Preallocation::Off, false).unwrap();
    assert_eq!(
        (empty.l1_offset, empty.l1_size, empty.total_clusters),
        (0, 0, 3)
    );
}

#[test]
fn refblock_packing() {
    let mk = |bits: u32| {
        Layout::compute(
            &opts(&format!("refcount_bits={bits}")),
            0,
            Preallocation::Off,
            false,
        )
        .unwrap()
    };
    assert_eq!(&mk(1).refblock_for_test(10)[..2], &[0xff, 0x03]);
    assert_eq!(&mk(2).refblock_for_test(5)[..2], &[0x55, 0x01]);
    assert_eq!(&mk(4).refblock_for_test(3)[..2], &[0x11, 0x01]);
    assert_eq!(&mk(8).refblock_for_test(2)[..3], &[1, 1, 0]);
    assert_eq!(&mk(16).refblock_for_test(2)[..5], &[0, 1, 0, 1, 0]);
    assert_eq!(
        &mk(64).refblock_for_test(1)[..9],
        &[0, 0, 0, 0, 0, 0, 0, 1, 0]
    );
}

#[test]
fn missing_data_storage_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let image = TestFile::create(&dir.path().join("x"));
    let e = block_on(create(&image, None, &opts("size=1M,data_file=d"))).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InvalidArgument);
    let e = block_on(create(&image, None, &CreateOptions::default())).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InvalidArgument);
}

// ---- QEMU conformance ----

#[test]
fn every_cluster_size() {
    if !have_qemu() {
        return;
    }
    for bits in 9..=21 {
        let dir = tempfile::tempdir().unwrap();
        let v = make_checked(
            dir.path(),
            &format!("size=100M,cluster_size={}", 1u64 << bits),
        );
        assert_eq!(v["cluster-size"], 1u64 << bits);
        assert_eq!(v["virtual-size"], 100u64 << 20);
        assert_eq!(spec(&v)["compat"], "1.1");
    }
}

#[test]
fn every_refcount_width_with_many_refcount_blocks() {
    if !have_qemu() {
        return;
    }
    for order in 0..=6 {
        let dir = tempfile::tempdir().unwrap();
        let o = format!(
            "size=2M,cluster_size=512,refcount_bits={},preallocation=metadata",
            1 << order
        );
        let v = make_checked(dir.path(), &o);
        assert_eq!(spec(&v)["refcount-bits"], 1 << order);
    }
}

#[test]
fn compat_v2() {
    if !have_qemu() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let v = make_checked(dir.path(), "size=10M,compat=0.10");
    assert_eq!(spec(&v)["compat"], "0.10");
    assert_eq!(spec(&v)["refcount-bits"], 16);
}

#[test]
fn extended_l2_every_allowed_cluster_size() {
    if !have_qemu() {
        return;
    }
    for bits in 14..=21 {
        let dir = tempfile::tempdir().unwrap();
        let v = make_checked(
            dir.path(),
            &format!("size=1G,extended_l2=on,cluster_size={}", 1 << bits),
        );
        assert_eq!(spec(&v)["extended-l2"], true);
    }
}

#[test]
fn zstd_and_lazy_refcounts() {
    if !have_qemu() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let v = make_checked(
        dir.path(),
        "size=10M,compression_type=zstd,lazy_refcounts=on",
    );
    assert_eq!(spec(&v)["compression-type"], "zstd");
    assert_eq!(spec(&v)["lazy-refcounts"], true);
}

#[test]
fn external_data_file_and_raw() {
    if !have_qemu() {
        return;
    }
    for (o, raw) in [("", false), (",data_file_raw=on", true)] {
        let dir = tempfile::tempdir().unwrap();
        let v = make_checked(dir.path(), &format!("size=1000k,data_file=data.raw{o}"));
        let data = dir.path().join("data.raw");
        assert_eq!(spec(&v)["data-file"], data.to_str().unwrap());
        assert_eq!(spec(&v)["data-file-raw"], raw);
        let want = if raw { 1 << 20 } else { 1000 << 10 };
        assert_eq!(std::fs::metadata(&data).unwrap().len(), want);
    }
}

#[test]
fn every_preallocation_mode() {
    if !have_qemu() {
        return;
    }
    for mode in ["off", "metadata", "falloc", "full"] {
        for extra in ["cluster_size=512", "", "extended_l2=on", "data_file=d.raw"] {
            let dir = tempfile::tempdir().unwrap();
            let o = format!("size=3146240,preallocation={mode},{extra}");
            let v = make_checked(dir.path(), &o);
            assert_eq!(v["virtual-size"], 3146240, "{o}");
            let path = dir.path().join("img.qcow2");
            let out = run(
                "qemu-io",
                &[
                    "-f",
                    "qcow2",
                    "-c",
                    "read -P 0 0 3146240",
                    path.to_str().unwrap(),
                ],
            );
            assert!(
                out.status.success(),
                "{o}: {}",
                String::from_utf8_lossy(&out.stdout)
            );
            if mode == "full" && extra.is_empty() {
                assert!(v["actual-size"].as_u64().unwrap() >= 3146240, "{o}");
            }
        }
    }
}

#[test]
fn backing_file_and_format() {
    if !have_qemu() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base.qcow2");
    let b = base.to_str().unwrap();
    assert!(
        run("qemu-img", &["create", "-q", "-f", "qcow2", b, "4M"])
            .status
            .success()
    );
    assert!(
        run("qemu-io", &["-f", "qcow2", "-c", "write -P 0xcd 0 1M", b])
            .status
            .success()
    );
    for extra in ["", ",extended_l2=on,preallocation=metadata", ",compat=0.10"] {
        let v = make_checked(
            dir.path(),
            &format!("size=4M,backing_file={b},backing_fmt=qcow2{extra}"),
        );
        assert_eq!(v["backing-filename"], b);
        assert_eq!(v["backing-filename-format"], "qcow2");
        let img = dir.path().join("img.qcow2");
        let out = run(
            "qemu-io",
            &[
                "-f",
                "qcow2",
                "-c",
                "read -P 0xcd 0 1M",
                img.to_str().unwrap(),
            ],
        );
        assert!(
            out.status.success(),
            "{extra}: {}",
            String::from_utf8_lossy(&out.stdout)
        );
    }
}

#[test]
fn qemu_io_writes_and_reads_our_image() {
    if !have_qemu() {
        return;
    }
    for o in [
        "size=1M",
        "size=1M,cluster_size=512,refcount_bits=1",
        "size=1M,compat=0.10",
    ] {
        let dir = tempfile::tempdir().unwrap();
        let path = make_in(dir.path(), o);
        let p = path.to_str().unwrap();
        let cmds = ["-c", "write -P 0xab 0 64k", "-c", "read -P 0xab 0 64k"];
        let out = run("qemu-io", &[&["-f", "qcow2"][..], &cmds, &[p]].concat());
        assert!(
            out.status.success(),
            "{o}: {}",
            String::from_utf8_lossy(&out.stdout)
        );
        assert!(!String::from_utf8_lossy(&out.stdout).contains("fail"));
        assert_check_clean(&path);
    }
}

/// For option sets without preallocation our cluster 0 is byte-identical to qemu-img's, and
/// qemu-img's cluster 0 round-trips through ImageHeader.
#[test]
fn cluster0_identical_to_qemu_img() {
    if !have_qemu() {
        return;
    }
    let cases = [
        "cluster_size=64k",
        "compat=0.10",
        "compression_type=zstd,lazy_refcounts=on",
        "extended_l2=on",
        "cluster_size=4k",
        "cluster_size=512,refcount_bits=1",
        "cluster_size=2M,refcount_bits=64",
    ];
    for o in cases {
        let dir = tempfile::tempdir().unwrap();
        let theirs = dir.path().join("q.qcow2");
        let args = [
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            o,
            theirs.to_str().unwrap(),
            "1G",
        ];
        assert!(run("qemu-img", &args).status.success(), "{o}");
        let ours = make_in(dir.path(), &format!("size=1G,{o}"));
        let (t, u) = (
            std::fs::read(&theirs).unwrap(),
            std::fs::read(&ours).unwrap(),
        );
        let cs = ImageHeader::parse(&t).unwrap().header.cluster_size() as usize;
        let diff = (0..cs).find(|&i| u[i] != t[i]);
        assert_eq!(diff, None, "{o}: first difference in cluster 0");
        let ih = ImageHeader::parse(&t[..cs]).unwrap();
        ih.validate(t.len() as u64).unwrap();
        assert_eq!(ih.to_cluster0().unwrap(), &t[..cs], "{o}");
    }
}

#[test]
fn qemu_backing_header_round_trips() {
    if !have_qemu() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("o.qcow2");
    let args = [
        "create",
        "-q",
        "-u",
        "-f",
        "qcow2",
        "-b",
        "some/base.img",
        "-F",
        "raw",
    ];
    assert!(
        run(
            "qemu-img",
            &[&args[..], &[img.to_str().unwrap(), "1G"]].concat()
        )
        .status
        .success()
    );
    let t = std::fs::read(&img).unwrap();
    let ih = ImageHeader::parse(&t[..65536]).unwrap();
    assert_eq!(ih.backing_file.as_deref(), Some("some/base.img"));
    assert_eq!(ih.backing_format(), Some("raw"));
    assert_eq!(ih.to_cluster0().unwrap(), &t[..65536]);
}
