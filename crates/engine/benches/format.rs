//! Format-parser micro-benchmarks: pure decoding of on-disk structures, no IO or runtime.
//!
//! `cargo bench -p qcow2-engine --bench format` (README, "Benchmarks").

mod common;

use std::hint::black_box;

use common::clock::Clock;
use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use qcow2_engine::format::compressed::{self, CompressedDescriptor, CompressionType};
use qcow2_engine::format::extensions::ImageHeader;
use qcow2_engine::format::header::Header;
use qcow2_engine::format::l2::{self, L2Entry, L2Geometry, SubclusterBitmap};
use qcow2_engine::units::HostOffset;

/// Bytes in one L2 cache slice (the engine's default slice size).
const SLICE: usize = 4096;

/// A slice of L2 entries as a busy image has them: mostly normal clusters, with a compressed,
/// a zero and an unallocated entry in every eight (so the decoder's branches all run).
fn l2_slice(geo: &L2Geometry) -> Vec<u8> {
    let mut buf = vec![0u8; SLICE];
    let cs = geo.cluster_size();
    for i in 0..SLICE / geo.entry_size() {
        let host = HostOffset((i as u64 + 16) * cs);
        let (entry, bitmap) = match i % 8 {
            0 => (L2Entry::Unallocated, 0),
            1 if geo.extended => (L2Entry::Unallocated, l2::BITMAP_ALL_ZERO),
            1 => (
                L2Entry::Zero {
                    host: None,
                    copied: false,
                },
                0,
            ),
            2 => {
                let d = CompressedDescriptor::new(host, 1000, geo.cluster_bits)
                    .expect("a compressed descriptor that fits");
                (L2Entry::Compressed(d), 0)
            }
            _ => (L2Entry::Normal { host, copied: true }, l2::BITMAP_ALL_ALLOC),
        };
        let raw = entry.try_encode(geo).expect("an encodable entry");
        assert!(l2::write_raw(
            &mut buf,
            i,
            geo,
            raw,
            SubclusterBitmap(bitmap)
        ));
    }
    buf
}

/// L2 entry decode: every entry of one 4 KiB slice read from its big-endian bytes and
/// decoded (with extended L2, its subcluster bitmap checked against the entry too), the work
/// of a lookup after the slice is cached. Standard: 512 entries of 8 bytes, 64 KiB clusters;
/// extended: 256 entries of 16 bytes, 64 KiB clusters with 32 subclusters.
fn l2_decode(c: &mut Criterion<Clock>) {
    let mut g = c.benchmark_group("format/l2_decode_slice");
    for (name, extended) in [("standard", false), ("extended", true)] {
        let geo = L2Geometry {
            cluster_bits: 16,
            extended,
            version3: true,
        };
        let buf = l2_slice(&geo);
        let entries = SLICE / geo.entry_size();
        g.throughput(Throughput::Elements(entries as u64));
        g.bench_function(name, |b| {
            b.iter(|| {
                for i in 0..entries {
                    let (raw, bitmap) = l2::read_raw(black_box(&buf), i, &geo).expect("in range");
                    let e = L2Entry::decode(raw, &geo).expect("valid entry");
                    if geo.extended {
                        bitmap.validate_for(&e).expect("valid bitmap");
                    }
                    black_box(e);
                }
            })
        });
    }
    g.finish();
}

/// Cluster 0 of a new image as `qemu-img create -o <create_o>` writes it.
fn cluster0(create_o: &str) -> Vec<u8> {
    common::runtime().block_on(async {
        let storage = common::create_image(create_o).await;
        let mut buf = vec![0u8; 64 << 10];
        storage
            .read_at(&mut buf, 0)
            .await
            .expect("reading cluster 0");
        buf
    })
}

/// Header parse: `Header::from_bytes` (the fixed fields) and `ImageHeader::parse` (fields,
/// the extension area and the backing file name) of a v3 image's cluster 0 with a backing
/// file, a backing-format extension and the 8-entry feature-name table, as at every open.
fn header_parse(c: &mut Criterion<Clock>) {
    let buf = cluster0("size=1G,backing_file=base.qcow2,backing_fmt=qcow2");
    let mut g = c.benchmark_group("format/header_parse");
    g.bench_function("header_fields", |b| {
        b.iter(|| Header::from_bytes(black_box(&buf)).expect("valid header"))
    });
    g.bench_function("with_extensions", |b| {
        b.iter(|| ImageHeader::parse(black_box(&buf)).expect("valid cluster 0"))
    });
    g.finish();
}

/// Codec alone: inflating one 64 KiB cluster of 2:1 data from its compressed bytes, the part
/// of `compressed_read_64k` (benches/image_read.rs) that is not the engine's own.
fn decompress(c: &mut Criterion<Clock>) {
    let data = common::half_compressible(64 << 10);
    let mut g = c.benchmark_group("format/decompress_64k");
    g.throughput(Throughput::Bytes(data.len() as u64));
    let mut codecs = vec![CompressionType::Zlib];
    if cfg!(feature = "zstd") {
        codecs.push(CompressionType::Zstd);
    }
    for kind in codecs {
        let packed = compressed::compress(kind, &data)
            .expect("compressing")
            .expect("2:1 data compresses");
        let mut out = vec![0u8; data.len()];
        g.bench_function(BenchmarkId::from_parameter(format!("{kind:?}")), |b| {
            b.iter(|| compressed::decompress(kind, black_box(&packed), &mut out).expect("inflate"))
        });
    }
    g.finish();
}

criterion_group! {
    name = benches;
    config = common::clock::criterion();
    targets = l2_decode, header_parse, decompress
}
criterion_main!(benches);
