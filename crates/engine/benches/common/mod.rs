//! Setup shared by the image benches: in-memory images built through the public API, a
//! current-thread runtime to drive them, and a timer for async loops.
//!
//! Everything runs on [`MemoryStorage`], so the numbers are the engine's own CPU cost (lookups,
//! cache, refcounts, codecs, memory copies), not a disk's.

// Each bench binary uses its own subset of these helpers.
#![allow(dead_code)]

pub mod clock;

use std::sync::Arc;
use std::time::Duration;

use qcow2_engine::Storage;
use qcow2_engine::image::create::{CreateOptions, create};
use qcow2_engine::image::{Image, OpenOptions};
use qcow2_engine::storage::MemoryStorage;
use tokio::runtime::Runtime;

/// A 4 KiB request, the size most guests issue.
pub const BLOCK: usize = 4096;

/// A single-threaded runtime: no work-stealing noise, and background tasks (the dirty-cache
/// flush) run on the same thread, so their cost lands in the timed loop as it would in use.
pub fn runtime() -> Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("building a current-thread tokio runtime")
}

/// Options for every bench image: read-write, and no timer-driven flush (a flush every second
/// would land in random samples; flushes forced by a dirty cache still happen).
pub fn open_options() -> OpenOptions {
    OpenOptions::new().writable(true).flush_interval(None)
}

/// A new empty image in memory, made with `qemu-img create`'s `-o` syntax (`"size=64M,..."`).
pub async fn create_image(create_o: &str) -> Arc<dyn Storage> {
    let mut opts = CreateOptions::default();
    opts.apply_o(create_o).expect("valid create options");
    let storage: Arc<dyn Storage> = Arc::new(MemoryStorage::new());
    create(storage.as_ref(), None, &opts)
        .await
        .expect("creating an in-memory image");
    storage
}

/// Open `storage` with `opts`.
pub async fn open(storage: Arc<dyn Storage>, opts: &OpenOptions) -> Image {
    Image::open_storage(storage, opts)
        .await
        .expect("opening an in-memory image")
}

/// An image whose clusters at `offsets` hold data (written whole, uncompressed), reopened
/// with `opts` so that its caches start cold and sized as `opts` says.
pub async fn populated_image(create_o: &str, offsets: &[u64], opts: &OpenOptions) -> Image {
    let storage = create_image(create_o).await;
    let img = open(storage.clone(), &open_options()).await;
    let cluster = vec![0x5a; img.cluster_size() as usize];
    for &off in offsets {
        img.write_at(&cluster, off).await.expect("populating");
    }
    img.close().await.expect("closing after populating");
    drop(img);
    open(storage, opts).await
}

/// Check that the cluster at `offset` is mapped the way the bench assumes (data, compressed or
/// not), so that a change in the engine cannot silently turn a bench into a different one.
pub async fn assert_mapped(img: &Image, offset: u64, compressed: bool) {
    let extents = img.map(offset, img.cluster_size()).await.expect("map");
    let e = extents.first().expect("one extent");
    assert!(
        e.data && e.compressed == compressed,
        "cluster at {offset}: {e:?}"
    );
}

/// Time `iters` sequential calls of `op(i)` in one `block_on` (so the runtime's entry cost is
/// paid once per sample, not once per call), on the benches' [`clock`].
pub fn time_async(rt: &Runtime, iters: u64, mut op: impl AsyncFnMut(u64)) -> Duration {
    rt.block_on(async {
        let start = clock::now();
        for i in 0..iters {
            op(i).await;
        }
        clock::now().saturating_sub(start)
    })
}

/// Bytes that compress about 2:1 with zlib and zstd (4 bits of entropy per byte, no long
/// repeats), like ordinary file data rather than zeros or noise.
pub fn half_compressible(len: usize) -> Vec<u8> {
    let mut state: u32 = 0x1234_5678;
    (0..len)
        .map(|_| {
            // A 32-bit LCG (Numerical Recipes constants); its high bits pick one of 16 bytes.
            state = state.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
            b"etaoinshrdlucmfw"[(state >> 28) as usize]
        })
        .collect()
}
