//! The format parsers and the blocking wrapper on images QEMU made: compressed clusters that
//! `qemu-img convert -c` wrote decode through our L1/L2/descriptor/codec code, a snapshot
//! table `qemu-img snapshot -c` wrote parses and re-encodes byte for byte, and
//! `BlockingImage` reads and writes a `qemu-img create` image. (Moved here from the engine's
//! unit tests, which stay free of QEMU.)

use crate::common;

use std::io::{Read, Seek, SeekFrom, Write};

use qcow2_engine::blocking::BlockingImage;
use qcow2_engine::format::compressed::{CompressionType, decompress};
use qcow2_engine::format::{l1, l2, snapshot};
use qcow2_engine::image::OpenOptions;

/// Guest data for the QEMU fixture: compressible but not trivial, different per cluster.
fn fixture_data(len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| b"qcow2 compressed cluster fixture "[i % 33] ^ (i >> 16) as u8)
        .collect()
}

fn be64(b: &[u8], off: usize) -> u64 {
    u64::from_be_bytes(b[off..off + 8].try_into().unwrap())
}

fn be32(b: &[u8], off: usize) -> u32 {
    u32::from_be_bytes(b[off..off + 4].try_into().unwrap())
}

/// Convert raw data with `qemu-img convert -c` and decode every cluster through our
/// L1/L2/descriptor/codec code.
fn check_qemu_compressed(kind: CompressionType, opts: &str) {
    let dir = tempfile::tempdir().unwrap();
    let (raw, img) = (dir.path().join("in.raw"), dir.path().join("out.qcow2"));
    let data = fixture_data(4 * 65536);
    std::fs::write(&raw, &data).unwrap();
    let (raw_s, img_s) = (raw.to_str().unwrap(), img.to_str().unwrap());
    common::run(
        "qemu-img",
        &[
            "convert", "-c", "-f", "raw", "-O", "qcow2", "-o", opts, raw_s, img_s,
        ],
    );
    let file = std::fs::read(&img).unwrap();
    let geo = l2::L2Geometry {
        cluster_bits: be32(&file, 20),
        extended: false,
        version3: true,
    };
    let cs = geo.cluster_size() as usize;
    let l1_off = be64(&file, 40) as usize;
    let l2_off = l1::parse_table(&file[l1_off..l1_off + 8])[0]
        .l2_offset()
        .unwrap()
        .0 as usize;
    for (i, want) in data.chunks(cs).enumerate() {
        let (raw_entry, _) = l2::read_raw(&file[l2_off..l2_off + cs], i, &geo).unwrap();
        let l2::L2Entry::Compressed(d) = l2::L2Entry::decode(raw_entry, &geo).unwrap() else {
            panic!("cluster {i} not compressed: {raw_entry:#x}");
        };
        let start = d.host.0 as usize;
        let end = (start + d.read_len() as usize).min(file.len());
        let mut out = vec![0u8; cs];
        decompress(kind, &file[start..end], &mut out).unwrap();
        assert_eq!(out, want, "cluster {i}");
    }
}

#[test]
fn decompress_qemu_made_zlib_clusters() {
    check_qemu_compressed(CompressionType::Zlib, "cluster_size=65536");
}

#[test]
fn decompress_qemu_made_zstd_clusters() {
    check_qemu_compressed(
        CompressionType::Zstd,
        "cluster_size=65536,compression_type=zstd",
    );
}

#[test]
fn parse_and_rewrite_qemu_made_snapshot_table() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("snap.qcow2");
    let p = path.to_str().unwrap();
    common::qemu_create(p, "", "10M");
    common::run("qemu-img", &["snapshot", "-c", "first", p]);
    common::run("qemu-img", &["snapshot", "-c", "the-second-one", p]);
    let file = std::fs::read(&path).unwrap();
    let count = be32(&file, 60);
    let offset = be64(&file, 64) as usize;
    assert_eq!(count, 2);
    let snaps = snapshot::parse_table(&file[offset..], count).unwrap();
    assert_eq!(
        (snaps[0].id.as_str(), snaps[0].name.as_str()),
        ("1", "first")
    );
    assert_eq!(
        (snaps[1].id.as_str(), snaps[1].name.as_str()),
        ("2", "the-second-one")
    );
    for s in &snaps {
        assert_eq!(s.disk_size, Some(10 << 20));
        assert_eq!(s.vm_state_size, 0);
        assert!(s.extra_unknown.is_empty());
        assert_eq!(s.l1_table_offset % 65536, 0);
    }
    let written = snapshot::write_table(&snaps);
    assert_eq!(
        written,
        &file[offset..offset + snapshot::table_size(&snaps)]
    );
}

/// `BlockingImage` through `std::io::{Read, Write, Seek}` on a qemu-img image; qemu-io then
/// reads what it wrote.
#[test]
fn blocking_read_write_seek_round_trip() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("b.qcow2");
    common::qemu_create(&p, "", "1M");
    let mut d = BlockingImage::open(&p, &OpenOptions::new().writable(true)).unwrap();
    d.seek(SeekFrom::Start(70_000)).unwrap();
    d.write_all(&[7u8; 100_000]).unwrap();
    d.seek(SeekFrom::End(-10)).unwrap();
    assert_eq!(
        d.write(&[1u8; 64]).unwrap(),
        10,
        "writes stop at the end of the disk"
    );
    assert!(d.write(&[1u8]).is_err());
    d.close().unwrap();
    let mut d = BlockingImage::open(&p, &OpenOptions::new()).unwrap();
    let mut all = Vec::new();
    d.read_to_end(&mut all).unwrap();
    assert_eq!(all.len(), 1 << 20);
    assert!(all[70_000..170_000].iter().all(|&b| b == 7));
    assert!(all[..70_000].iter().all(|&b| b == 0));
    assert!(all[(1 << 20) - 10..].iter().all(|&b| b == 1));
    d.close().unwrap();
    common::qemu_io(
        &p,
        &[
            "read -P 0 0 70000",
            "read -P 7 70000 100000",
            "read -P 1 1048566 10",
        ],
    );
    common::assert_check_clean(&p);
}
