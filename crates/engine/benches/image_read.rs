//! Read-side micro-benchmarks through the public `Image` API on in-memory images:
//! L2 lookups with a warm and with an evicting slice cache, and compressed cluster reads.
//!
//! `cargo bench -p qcow2-engine --bench image_read` (README, "Benchmarks").

mod common;

use common::clock::Clock;
use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use qcow2_engine::image::Image;

use common::{BLOCK, runtime, time_async};

/// Cluster size of the lookup images (QEMU's default).
const CLUSTER: u64 = 64 << 10;
/// Guest bytes one 4 KiB L2 slice maps with 64 KiB clusters: 512 entries × 64 KiB.
const SLICE_SPAN: u64 = 512 * CLUSTER;
/// Clusters in the lookup working set, one per slice: 64 slices, far more than the 4 slices
/// of the small cache, all of them in the default 4 MiB cache.
const SPREAD: u64 = 64;
/// The smallest L2 cache the engine keeps: 4 slices of 4 KiB.
const SMALL_CACHE: usize = 4 * 4096;

/// The guest offset of working-set cluster `i`: the first cluster of slice `i % SPREAD`.
fn spread_offset(i: u64) -> u64 {
    (i % SPREAD) * SLICE_SPAN
}

/// An image with one data cluster in each of `SPREAD` L2 slices, opened with an L2 cache of
/// `cache_bytes`.
async fn spread_image(cache_bytes: usize) -> Image {
    let offsets: Vec<u64> = (0..SPREAD).map(spread_offset).collect();
    let opts = common::open_options().l2_cache_bytes(cache_bytes);
    let size = SPREAD * SLICE_SPAN;
    let img = common::populated_image(&format!("size={size}"), &offsets, &opts).await;
    common::assert_mapped(&img, spread_offset(SPREAD - 1), false).await;
    img
}

/// L2 lookup: `Image::map` of one allocated cluster (L1 entry, L2 slice from the cache, entry
/// decode, extent building), cycling over 64 clusters in 64 different L2 slices.
/// `warm`: every slice stays cached (hits only). `evicting`: a 4-slice cache, so the cyclic
/// pattern misses every time (LRU eviction + a 4 KiB slice read and parse per lookup).
fn l2_lookup(c: &mut Criterion<Clock>) {
    let rt = runtime();
    let mut g = c.benchmark_group("l2_lookup");
    for (name, cache) in [("warm", 4 << 20), ("evicting", SMALL_CACHE)] {
        let img = rt.block_on(spread_image(cache));
        g.bench_function(BenchmarkId::new("map", name), |b| {
            b.iter_custom(|iters| {
                time_async(&rt, iters, async |i| {
                    let e = img.map(spread_offset(i), CLUSTER).await.expect("map");
                    std::hint::black_box(e);
                })
            })
        });
        rt.block_on(img.close()).expect("close");
    }
    g.finish();
}

/// 4 KiB read of allocated data: the lookup above plus the data copy from storage into the
/// caller's buffer, same two cache cases.
fn read_4k(c: &mut Criterion<Clock>) {
    let rt = runtime();
    let mut g = c.benchmark_group("read_4k");
    g.throughput(Throughput::Bytes(BLOCK as u64));
    for (name, cache) in [("warm", 4 << 20), ("evicting", SMALL_CACHE)] {
        let img = rt.block_on(spread_image(cache));
        let mut buf = vec![0u8; BLOCK];
        g.bench_function(name, |b| {
            b.iter_custom(|iters| {
                time_async(&rt, iters, async |i| {
                    img.read_at(&mut buf, spread_offset(i)).await.expect("read");
                })
            })
        });
        rt.block_on(img.close()).expect("close");
    }
    g.finish();
}

/// Compressed clusters in the compressed-read images.
const COMPRESSED: u64 = 16;

/// An image of `COMPRESSED` clusters written compressed with `codec` (`zlib` or `zstd`).
async fn compressed_image(codec: &str) -> Image {
    let size = COMPRESSED * CLUSTER;
    let storage = common::create_image(&format!("size={size},compression_type={codec}")).await;
    let img = common::open(storage, &common::open_options()).await;
    let data = common::half_compressible(CLUSTER as usize);
    for i in 0..COMPRESSED {
        img.write_compressed(&data, i * CLUSTER)
            .await
            .expect("compressed write");
    }
    img.flush().await.expect("flush");
    common::assert_mapped(&img, 0, true).await;
    img
}

/// Compressed read: one whole 64 KiB cluster stored compressed (2:1 data) read through
/// `Image::read_at`: lookup, reading the compressed bytes, inflating them into the buffer.
/// Compare with `format/decompress` for the codec alone.
fn compressed_read(c: &mut Criterion<Clock>) {
    let rt = runtime();
    let mut g = c.benchmark_group("compressed_read_64k");
    g.throughput(Throughput::Bytes(CLUSTER));
    let mut codecs = vec!["zlib"];
    if cfg!(feature = "zstd") {
        codecs.push("zstd");
    }
    for codec in codecs {
        let img = rt.block_on(compressed_image(codec));
        let mut buf = vec![0u8; CLUSTER as usize];
        g.bench_function(codec, |b| {
            b.iter_custom(|iters| {
                time_async(&rt, iters, async |i| {
                    let off = (i % COMPRESSED) * CLUSTER;
                    img.read_at(&mut buf, off).await.expect("read");
                })
            })
        });
        rt.block_on(img.close()).expect("close");
    }
    g.finish();
}

criterion_group! {
    name = benches;
    config = common::clock::criterion();
    targets = l2_lookup, read_4k, compressed_read
}
criterion_main!(benches);
