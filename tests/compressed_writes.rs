//! Compressed cluster writes (`Image::write_compressed`, `qcow2 convert -c`, `qcow2 io`'s
//! `write -c`) checked against QEMU: `qemu-img check` clean (no leaks, no refcount below its
//! references), `qemu-img map` reports compressed extents, content equal to a shadow copy —
//! also after rewriting, overwriting and discarding compressed clusters with our write path
//! and with qemu-io, which exercises the shared-host-cluster refcounts (DESIGN.md §7).

use crate::common;

use std::path::{Path, PathBuf};

use qcow2_engine::image::{Image, OpenOptions, ReferencePolicy, ZeroFlags};
use rand::{Rng, SeedableRng, rngs::StdRng};

/// What a test cluster holds.
#[derive(Clone, Copy, PartialEq)]
enum Kind {
    /// Repetitive text: compresses well.
    Text,
    /// Random bytes: does not compress, stored as a normal cluster.
    Random,
    /// Random first half, zeros after: compresses to a bit more than half.
    Half,
    /// All zeros: never written.
    Zero,
}

/// The guest clusters of every scenario image; a partial text cluster follows when the
/// cluster size allows one.
const LAYOUT: [Kind; 10] = [
    Kind::Text,
    Kind::Random,
    Kind::Zero,
    Kind::Text,
    Kind::Half,
    Kind::Text,
    Kind::Text,
    Kind::Random,
    Kind::Text,
    Kind::Zero,
];

fn text(len: usize, seed: u64) -> Vec<u8> {
    let mut v = Vec::with_capacity(len + 64);
    let mut i = 0;
    while v.len() < len {
        v.extend_from_slice(format!("cluster {seed} line {} hello qcow2\n", i % 7).as_bytes());
        i += 1;
    }
    v.truncate(len);
    v
}

fn content(kind: Kind, len: usize, rng: &mut StdRng, seed: u64) -> Vec<u8> {
    match kind {
        Kind::Text => text(len, seed),
        Kind::Random => (0..len).map(|_| rng.r#gen()).collect(),
        Kind::Half => {
            let mut v: Vec<u8> = (0..len / 2).map(|_| rng.r#gen()).collect();
            v.resize(len, 0);
            v
        }
        Kind::Zero => vec![0; len],
    }
}

/// One image configuration.
#[derive(Clone, Copy, Debug)]
struct Config {
    cluster: u64,
    refcount_bits: u32,
    zstd: bool,
    extended_l2: bool,
}

impl Config {
    fn options(&self) -> String {
        format!(
            "cluster_size={},refcount_bits={},compression_type={},extended_l2={}",
            self.cluster,
            self.refcount_bits,
            if self.zstd { "zstd" } else { "zlib" },
            if self.extended_l2 { "on" } else { "off" }
        )
    }

    /// Length of the partial last cluster (disk sizes are whole sectors).
    fn tail(&self) -> u64 {
        if self.cluster > 512 {
            self.cluster / 2
        } else {
            0
        }
    }

    fn size(&self) -> u64 {
        LAYOUT.len() as u64 * self.cluster + self.tail()
    }
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// Open our own test image read-write (absolute data file names included).
async fn open_rw(p: &Path) -> Image {
    let opts = OpenOptions::new()
        .writable(true)
        .references(ReferencePolicy::Any)
        .writable_data_file(true);
    Image::open(p, &opts).await.unwrap()
}

/// The shadow disk of a configuration.
fn shadow_of(cfg: &Config) -> Vec<u8> {
    let mut rng = StdRng::seed_from_u64(cfg.cluster ^ u64::from(cfg.refcount_bits));
    let cs = cfg.cluster as usize;
    let mut v = Vec::with_capacity(cfg.size() as usize);
    for (i, k) in LAYOUT.iter().enumerate() {
        v.extend(content(*k, cs, &mut rng, i as u64));
    }
    v.extend(text(cfg.tail() as usize, 99));
    v
}

/// Sum of the lengths of the extents `qemu-img map` reports as compressed.
fn compressed_bytes(p: &Path) -> u64 {
    let out = common::run("qemu-img", &["map", "--output=json", s(p)]);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    v.as_array()
        .unwrap()
        .iter()
        .filter(|e| e["compressed"].as_bool() == Some(true))
        .map(|e| e["length"].as_u64().unwrap())
        .sum()
}

/// Bytes `LAYOUT` should store compressed: text and half-random clusters and the tail.
fn expected_compressed(cfg: &Config) -> u64 {
    let n = LAYOUT
        .iter()
        .filter(|k| matches!(k, Kind::Text | Kind::Half))
        .count() as u64;
    n * cfg.cluster + cfg.tail()
}

/// `qemu-img check` clean, our own check clean, and QEMU reads exactly `shadow`.
fn assert_image(p: &Path, shadow: &[u8], what: &str) {
    common::assert_check_clean(p);
    common::qcow2_ok(&["check", s(p)]);
    let got = common::qemu_raw(p);
    assert_eq!(
        common::first_difference(&got, shadow),
        None,
        "{what}: {} differs from the shadow",
        p.display()
    );
}

/// Write the layout compressed with the library, check, then change it with our write path
/// and with qemu-io and check again.
async fn library_scenario(dir: &Path, cfg: Config) {
    let cs = cfg.cluster;
    let p = dir.join("lib.qcow2");
    common::qemu_create(&p, &cfg.options(), cfg.size());
    let mut shadow = shadow_of(&cfg);
    let img = open_rw(&p).await;
    for (i, k) in LAYOUT.iter().enumerate() {
        if *k != Kind::Zero {
            let off = i as u64 * cs;
            img.write_compressed(&shadow[off as usize..(off + cs) as usize], off)
                .await
                .unwrap();
        }
    }
    let tail_off = LAYOUT.len() as u64 * cs;
    if cfg.tail() > 0 {
        img.write_compressed(&shadow[tail_off as usize..], tail_off)
            .await
            .unwrap();
    }
    img.close().await.unwrap();
    assert_image(&p, &shadow, "after compressed writes");
    assert_eq!(compressed_bytes(&p), expected_compressed(&cfg), "{cfg:?}");

    // Our write path over compressed clusters: a partial overwrite (decompress + copy), a
    // discard, a zero write, compressed rewrites of a compressed, a normal and a zero cluster.
    let img = open_rw(&p).await;
    let at = |c: u64| (c * cs) as usize;
    let part = (cs / 3, (cs / 4).max(1));
    img.write_at(&[0x42; 1][..].repeat(part.1 as usize), part.0)
        .await
        .unwrap();
    shadow[part.0 as usize..(part.0 + part.1) as usize].fill(0x42);
    img.discard(3 * cs, cs).await.unwrap();
    shadow[at(3)..at(4)].fill(0);
    img.write_zeroes(5 * cs, cs, ZeroFlags { may_unmap: true })
        .await
        .unwrap();
    shadow[at(5)..at(6)].fill(0);
    for (c, seed) in [(6, 1000), (1, 1001), (2, 1002)] {
        let t = text(cs as usize, seed);
        img.write_compressed(&t, c * cs).await.unwrap();
        shadow[at(c)..at(c + 1)].copy_from_slice(&t);
    }
    img.close().await.unwrap();
    assert_image(&p, &shadow, "after our overwrites");

    // QEMU over our compressed clusters: partial overwrite and discard.
    common::qemu_io(
        &p,
        &[
            format!("write -P 0x5a {} {}", 8 * cs, cs / 2),
            format!("discard {} {}", 4 * cs, cs),
            format!("write -P 0x6b {} {}", 6 * cs, cs),
        ],
    );
    shadow[at(8)..at(8) + (cs / 2) as usize].fill(0x5a);
    shadow[at(4)..at(5)].fill(0);
    shadow[at(6)..at(7)].fill(0x6b);
    assert_image(&p, &shadow, "after qemu-io overwrites");

    // qemu-io style compressed writes through our CLI: aligned works, unaligned fails.
    let r = common::qcow2(&[
        "io",
        "-c",
        &format!("write -c -P 0x33 {} {cs}", 9 * cs),
        s(&p),
    ]);
    assert_eq!(r.code, 0, "{}{}", r.stdout, r.stderr);
    shadow[at(9)..at(10)].fill(0x33);
    let r = common::qcow2(&["io", "-c", &format!("write -c 256 {cs}"), s(&p)]);
    assert_ne!(r.code, 0, "an unaligned compressed write must fail");
    assert_image(&p, &shadow, "after qcow2 io write -c");
}

/// `qcow2 convert -c` of the layout, then QEMU's view of the result.
fn convert_scenario(dir: &Path, cfg: Config) {
    let shadow = shadow_of(&cfg);
    let src = dir.join("src.raw");
    std::fs::write(&src, &shadow).unwrap();
    let dst = dir.join("conv.qcow2");
    let o = cfg.options();
    common::qcow2_ok(&["convert", "-c", "-O", "qcow2", "-o", &o, s(&src), s(&dst)]);
    assert_image(&dst, &shadow, "convert -c");
    common::run("qemu-img", &["compare", "-q", s(&src), s(&dst)]);
    assert_eq!(compressed_bytes(&dst), expected_compressed(&cfg), "{cfg:?}");
    let hdr = common::run("qemu-img", &["info", "--output=json", s(&dst)]);
    let want = if cfg.zstd { "zstd" } else { "zlib" };
    assert!(
        hdr.contains(&format!("\"compression-type\": \"{want}\"")),
        "{hdr}"
    );
}

async fn matrix(cluster: u64, zstd: bool) {
    for refcount_bits in [1, 2, 16] {
        // QEMU requires 16 KiB clusters for extended L2.
        let ext: &[bool] = if cluster >= 16384 {
            &[false, true]
        } else {
            &[false]
        };
        for &extended_l2 in ext {
            let cfg = Config {
                cluster,
                refcount_bits,
                zstd,
                extended_l2,
            };
            let dir = tempfile::tempdir().unwrap();
            library_scenario(dir.path(), cfg).await;
            convert_scenario(dir.path(), cfg);
        }
    }
}

macro_rules! matrix_test {
    ($name:ident, $cluster:expr, $zstd:expr) => {
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn $name() {
            matrix($cluster, $zstd).await;
        }
    };
}

matrix_test!(c512_zlib, 512, false);
matrix_test!(c512_zstd, 512, true);
matrix_test!(c4k_zlib, 4096, false);
matrix_test!(c4k_zstd, 4096, true);
matrix_test!(c64k_zlib, 65536, false);
matrix_test!(c64k_zstd, 65536, true);
matrix_test!(c2m_zlib, 2 << 20, false);
matrix_test!(c2m_zstd, 2 << 20, true);

/// Size of a regular file.
fn file_len(p: &Path) -> u64 {
    std::fs::metadata(p).unwrap().len()
}

/// Small payloads share host clusters with wide refcounts, never with 1-bit refcounts; both
/// stay clean when the sharing payloads are freed one by one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn payloads_pack_unless_refcounts_are_one_bit() {
    for bits in [16, 1] {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("pack.qcow2");
        let cs = 65536u64;
        common::qemu_create(&p, &format!("refcount_bits={bits}"), 64 * cs);
        let before = file_len(&p);
        let img = open_rw(&p).await;
        let mut shadow = vec![0u8; (64 * cs) as usize];
        for c in 0..32u64 {
            let t = text(cs as usize, c);
            img.write_compressed(&t, c * cs).await.unwrap();
            shadow[(c * cs) as usize..((c + 1) * cs) as usize].copy_from_slice(&t);
        }
        // Closed: the file is trimmed back to its last cluster in use (while open it may be
        // grown ahead of the allocations).
        img.close().await.unwrap();
        let img = open_rw(&p).await;
        // One new L2 table plus the payloads' host clusters.
        let data_clusters = file_len(&p).div_ceil(cs) - before.div_ceil(cs) - 1;
        if bits == 1 {
            assert_eq!(data_clusters, 32, "one payload per host cluster");
        } else {
            assert!(
                data_clusters <= 2,
                "{data_clusters} host clusters for 32 payloads"
            );
        }
        // Free every other payload, then the rest, checking in between.
        for c in (0..32u64).step_by(2) {
            img.write_at(&vec![7; cs as usize], c * cs).await.unwrap();
            shadow[(c * cs) as usize..((c + 1) * cs) as usize].fill(7);
        }
        img.close().await.unwrap();
        assert_image(&p, &shadow, "half the payloads overwritten");
        let img = open_rw(&p).await;
        for c in (1..32u64).step_by(2) {
            img.discard(c * cs, cs).await.unwrap();
            shadow[(c * cs) as usize..((c + 1) * cs) as usize].fill(0);
        }
        img.close().await.unwrap();
        assert_image(&p, &shadow, "all payloads released");
    }
}

/// The packing cursor must not append to a host cluster that was freed and reused: free the
/// cursor's only payload, let a normal write take the freed cluster, then compress again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cursor_forgets_a_freed_cluster() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("cursor.qcow2");
    let cs = 4096u64;
    common::qemu_create(&p, "cluster_size=4096", 16 * cs);
    let img = open_rw(&p).await;
    let mut shadow = vec![0u8; (16 * cs) as usize];
    let t = text(cs as usize, 1);
    img.write_compressed(&t, 0).await.unwrap();
    shadow[..cs as usize].copy_from_slice(&t);
    // Overwrite: the payload's reference is dropped once the new mapping is on disk.
    img.write_at(&vec![1; cs as usize], 0).await.unwrap();
    shadow[..cs as usize].fill(1);
    img.flush().await.unwrap();
    img.flush().await.unwrap();
    // These normal writes reuse the freed cluster.
    for c in 1..4u64 {
        img.write_at(&vec![c as u8 + 1; cs as usize], c * cs)
            .await
            .unwrap();
        shadow[(c * cs) as usize..((c + 1) * cs) as usize].fill(c as u8 + 1);
    }
    let t = text(cs as usize, 2);
    img.write_compressed(&t, 5 * cs).await.unwrap();
    shadow[(5 * cs) as usize..(6 * cs) as usize].copy_from_slice(&t);
    img.close().await.unwrap();
    assert_image(
        &p,
        &shadow,
        "compressing after the cursor's cluster was freed",
    );
}

/// Many compressed and normal writes at once, to different clusters.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_compressed_and_normal_writes() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("conc.qcow2");
    let cs = 4096u64;
    let n = 256u64;
    common::qemu_create(&p, "cluster_size=4096,refcount_bits=2", n * cs);
    let img = open_rw(&p).await;
    let mut tasks = Vec::new();
    for c in 0..n {
        let img = img.clone();
        tasks.push(tokio::spawn(async move {
            let data = if c % 3 == 0 {
                vec![c as u8; cs as usize]
            } else {
                text(cs as usize, c)
            };
            if c % 3 == 0 {
                img.write_at(&data, c * cs).await.unwrap();
            } else {
                img.write_compressed(&data, c * cs).await.unwrap();
            }
            data
        }));
    }
    let mut shadow = Vec::new();
    for t in tasks {
        shadow.extend(t.await.unwrap());
    }
    img.close().await.unwrap();
    assert_image(&p, &shadow, "concurrent writes");
}

/// Argument errors: misaligned offsets and short buffers are refused; images with an
/// external data file cannot hold compressed clusters.
#[tokio::test]
async fn refuses_what_qemu_refuses() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("args.qcow2");
    common::qemu_create(&p, "cluster_size=4096", 1 << 20);
    let img = open_rw(&p).await;
    let t = text(4096, 0);
    assert!(img.write_compressed(&t, 512).await.is_err());
    assert!(img.write_compressed(&t[..2048], 0).await.is_err());
    assert!(img.write_compressed(&t, 1 << 20).await.is_err());
    img.close().await.unwrap();

    let ext = dir.path().join("ext.qcow2");
    let data = dir.path().join("ext.data");
    common::qemu_create(&ext, &format!("data_file={}", s(&data)), 1 << 20);
    let img = open_rw(&ext).await;
    assert!(img.write_compressed(&t[..4096], 0).await.is_err());
    img.close().await.unwrap();
}

/// `qcow2 convert -c` against `qemu-img convert -c` on the same mixed source: same content,
/// similar size (printed for the record).
#[test]
fn convert_size_close_to_qemu() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("mixed.raw");
    // Real binary data (this crate's CLI), text, random and zero ranges.
    let mut data = std::fs::read(env!("CARGO_BIN_EXE_qcow2")).unwrap();
    data.truncate(8 << 20);
    data.extend(text(2 << 20, 5));
    let mut rng = StdRng::seed_from_u64(7);
    data.extend((0..(1 << 20)).map(|_| rng.r#gen::<u8>()));
    data.resize(data.len() + (1 << 20), 0);
    std::fs::write(&src, &data).unwrap();
    for (cluster, ctype) in [(65536, "zlib"), (65536, "zstd"), (4096, "zlib")] {
        let o = format!("cluster_size={cluster},compression_type={ctype}");
        let ours = dir.path().join("ours.qcow2");
        let theirs: PathBuf = dir.path().join("qemu.qcow2");
        common::qcow2_ok(&["convert", "-c", "-O", "qcow2", "-o", &o, s(&src), s(&ours)]);
        let args = [
            "convert",
            "-c",
            "-O",
            "qcow2",
            "-o",
            &o,
            s(&src),
            s(&theirs),
        ];
        common::run("qemu-img", &args);
        common::assert_check_clean(&ours);
        common::run("qemu-img", &["compare", "-q", s(&ours), s(&theirs)]);
        let (a, b) = (file_len(&ours), file_len(&theirs));
        eprintln!("convert -c {o}: ours {a} bytes, qemu-img {b} bytes");
        assert!(a <= b + b / 20, "ours {a} vs qemu-img {b}");
    }
}
