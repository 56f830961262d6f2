//! Write-side micro-benchmarks through the public `Image` API on in-memory images:
//! allocating writes (refcount and L2 updates) and in-place overwrites.
//!
//! `cargo bench -p qcow2-engine --bench image_write` (README, "Benchmarks").

mod common;

use std::time::Duration;

use common::clock::Clock;
use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use tokio::runtime::Runtime;

use common::{BLOCK, runtime, time_async};

/// Virtual size of each allocating-write image. Criterion asks for up to millions of writes;
/// the bench moves on to a fresh image when one is full, so memory stays bounded.
const ALLOC_DISK: u64 = 64 << 20;

/// Time `iters` allocating writes of one whole cluster each (cluster size `cluster`), every
/// one at a guest cluster never written before, on as many fresh images as that takes.
/// Creating, opening and closing the images (and the final flush) is not timed.
fn time_allocating(rt: &Runtime, cluster: u64, iters: u64) -> Duration {
    let per_image = ALLOC_DISK / cluster;
    let data = vec![0xa5u8; cluster as usize];
    let mut total = Duration::ZERO;
    let mut done = 0;
    while done < iters {
        let n = per_image.min(iters - done);
        let img = rt.block_on(async {
            let o = format!("size={ALLOC_DISK},cluster_size={cluster}");
            common::open(common::create_image(&o).await, &common::open_options()).await
        });
        total += time_async(rt, n, async |i| {
            img.write_at(&data, i * cluster).await.expect("write");
        });
        rt.block_on(img.close()).expect("close");
        done += n;
    }
    total
}

/// Refcount update: an allocating write that fills exactly one new cluster (no COW), so each
/// write allocates a host cluster (refcount 0 → 1 in a cached refcount block), writes the
/// data and sets one L2 entry. New L2 tables and refcount blocks as they fill up (every 512
/// and 2048 writes with 4 KiB clusters) and the flushes a dirty cache forces are included.
/// 4 KiB clusters show the metadata cost; 64 KiB ones add a 64 KiB copy per write.
fn allocating_write(c: &mut Criterion<Clock>) {
    let rt = runtime();
    let mut g = c.benchmark_group("allocating_write");
    for cluster in [4u64 << 10, 64 << 10] {
        g.throughput(Throughput::Bytes(cluster));
        let id = BenchmarkId::new("cluster", format!("{}k", cluster >> 10));
        g.bench_function(id, |b| {
            b.iter_custom(|iters| time_allocating(&rt, cluster, iters))
        });
    }
    g.finish();
}

/// Clusters (64 KiB) allocated before the overwrite bench starts: a 16 MiB working set.
const WRITTEN: u64 = 256;

/// In-place overwrite: a 4 KiB write into an already allocated cluster whose COPIED flag is
/// set (refcount 1), cycling over every 4 KiB block of 16 MiB: lookup, in-flight tracking
/// and the data copy, no metadata change.
fn overwrite_4k(c: &mut Criterion<Clock>) {
    let rt = runtime();
    let cluster = 64u64 << 10;
    let offsets: Vec<u64> = (0..WRITTEN).map(|i| i * cluster).collect();
    let img = rt.block_on(async {
        let size = WRITTEN * cluster;
        let o = format!("size={size}");
        let img = common::populated_image(&o, &offsets, &common::open_options()).await;
        common::assert_mapped(&img, (WRITTEN - 1) * cluster, false).await;
        img
    });
    let blocks = WRITTEN * cluster / BLOCK as u64;
    let data = vec![0x3cu8; BLOCK];
    let mut g = c.benchmark_group("overwrite_4k");
    g.throughput(Throughput::Bytes(BLOCK as u64));
    g.bench_function("in_place", |b| {
        b.iter_custom(|iters| {
            time_async(&rt, iters, async |i| {
                let off = (i % blocks) * BLOCK as u64;
                img.write_at(&data, off).await.expect("write");
            })
        })
    });
    g.finish();
    rt.block_on(img.close()).expect("close");
}

criterion_group! {
    name = benches;
    config = common::clock::criterion();
    targets = allocating_write, overwrite_4k
}
criterion_main!(benches);
