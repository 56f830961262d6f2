//! Target `image_rw`: an image (in the corpus: made by qemu-img, then mutated) opened
//! read-write. The first [`SCRIPT_LEN`] input bytes pick a script of writes, zero-writes,
//! discards, compressed writes, resizes, flushes and reads; the rest is the image file.
//!
//! Oracles, beyond "no panic, no hang": when `check` found the image free of corruption
//! before, it must still be afterwards, the image must reopen, and every byte we know (from
//! reading the disk first and from the operations that succeeded) must read back the same,
//! during the script and after close + reopen. `QCOW2_FUZZ_TRACE=1` prints the script as it runs.

use std::sync::Arc;

use qcow2_engine::check::{CheckReport, check};
use qcow2_engine::image::{Image, OpenOptions, ZeroFlags};

use super::block_on;
use super::capped::CappedStorage;
use super::image_bytes::check_options;
use super::input::{Input, Rng};
use super::shadow::Shadow;

/// Bytes of script in front of the image: an 8-byte seed and 8 operation codes.
pub const SCRIPT_LEN: usize = 16;
/// Disks up to this size get a shadow (the whole disk is read first).
const SHADOW_MAX: u64 = 4 << 20;

/// Run the target on one input.
pub fn run(data: &[u8]) {
    if data.len() <= SCRIPT_LEN {
        return;
    }
    let (script, image) = data.split_at(SCRIPT_LEN);
    block_on(exercise(script, image.to_vec()));
}

/// Whether a check report shows no corruption.
fn clean(r: &qcow2_engine::Result<CheckReport>) -> bool {
    matches!(r, Ok(r) if r.corruptions == 0 && r.check_errors == 0)
}

fn options(writable: bool) -> OpenOptions {
    OpenOptions::new()
        .writable(writable)
        .follow_backing(false)
        .flush_interval(None)
}

async fn exercise(script: &[u8], image: Vec<u8>) {
    let storage = Arc::new(CappedStorage::new(image));
    let was_clean = clean(&check(storage.clone(), &check_options()).await);
    let Ok(img) = Image::open_storage(storage.clone(), &options(true)).await else {
        return;
    };
    let mut run = Script::new(script, &img, was_clean).await;
    run.play(&img).await;
    if img.flush().await.is_err() | img.close().await.is_err() {
        run.shadow = None;
    }
    drop(img);
    let reopened = Image::open_storage(storage.clone(), &options(false)).await;
    match reopened {
        Ok(img) => {
            if let Some(shadow) = &run.shadow {
                shadow.verify(&img).await;
            }
            let _ = img.close().await;
        }
        Err(e) => assert!(!was_clean, "a clean image no longer opens: {e}"),
    }
    if !was_clean {
        return;
    }
    let after = check(storage, &check_options()).await;
    assert!(
        clean(&after),
        "corruption after writing a clean image: {after:?}"
    );
    // No assertion on leaks: an image whose refcounts mark clusters past its end as used
    // checks clean (QEMU ignores refcounts past the end), and leaks once the file grows over
    // them. Leaks lose no data.
}

/// The operations to run and what we know about the disk.
struct Script {
    rng: Rng,
    ops: Vec<u8>,
    cluster: u64,
    shadow: Option<Shadow>,
}

impl Script {
    async fn new(script: &[u8], img: &Image, was_clean: bool) -> Script {
        let mut input = Input::new(script);
        let rng = Rng::new(input.u64());
        let ops = input.rest().to_vec();
        let shadow = if was_clean && img.virtual_size() <= SHADOW_MAX {
            Some(Shadow::load(img).await)
        } else {
            None
        };
        Script {
            rng,
            ops,
            cluster: img.cluster_size(),
            shadow,
        }
    }

    async fn play(&mut self, img: &Image) {
        let trace = std::env::var_os("QCOW2_FUZZ_TRACE").is_some();
        for op in std::mem::take(&mut self.ops) {
            if trace {
                eprintln!("op {} on a disk of {} bytes", op % 8, img.virtual_size());
            }
            let size = img.virtual_size().min(super::capped::MAX_LEN);
            if size == 0 && op % 8 != 4 {
                continue;
            }
            match op % 8 {
                0 | 7 => self.write(img, size).await,
                1 => self.zero(img, size).await,
                2 => self.discard(img, size).await,
                3 => self.compressed(img, size).await,
                4 => self.resize(img, size).await,
                5 => {
                    let _ = img.flush().await;
                }
                _ => self.read(img, size).await,
            }
        }
    }

    /// A random range inside the disk: up to two clusters long, half the time aligned.
    fn range(&mut self, size: u64) -> (u64, u64) {
        let mut off = self.rng.below(size);
        let mut len = 1 + self.rng.below(2 * self.cluster);
        if self.rng.below(2) == 0 {
            off -= off % 512;
            len = len.next_multiple_of(512);
        }
        (off, len.min(size - off))
    }

    /// Record an operation's outcome: `Ok` applies `apply`, an error makes the clusters it
    /// touched unknown.
    fn record(&mut self, ok: bool, off: u64, len: u64, apply: impl FnOnce(&mut Shadow)) {
        if std::env::var_os("QCOW2_FUZZ_TRACE").is_some() {
            eprintln!("  [{off}, +{len}): {}", if ok { "ok" } else { "failed" });
        }
        let Some(shadow) = &mut self.shadow else {
            return;
        };
        if ok {
            apply(shadow);
        } else {
            let start = off - off % self.cluster;
            let end = off.saturating_add(len).next_multiple_of(self.cluster);
            shadow.fill(start, end - start, None);
        }
    }

    async fn write(&mut self, img: &Image, size: u64) {
        let (off, len) = self.range(size);
        let byte = self.rng.next_u64() as u8;
        let data = vec![byte; len as usize];
        let ok = img.write_at(&data, off).await.is_ok();
        self.record(ok, off, len, |s| s.write(off, &data));
    }

    async fn zero(&mut self, img: &Image, size: u64) {
        let (off, len) = self.range(size);
        let flags = ZeroFlags {
            may_unmap: self.rng.below(2) == 0,
        };
        let ok = img.write_zeroes(off, len, flags).await.is_ok();
        self.record(ok, off, len, |s| s.fill(off, len, Some(0)));
    }

    async fn discard(&mut self, img: &Image, size: u64) {
        let (off, len) = self.range(size);
        let ok = img.discard(off, len).await.is_ok();
        // A discarded range reads as its old content or as zeros: unknown either way.
        self.record(ok, off, len, |s| s.fill(off, len, None));
    }

    async fn compressed(&mut self, img: &Image, size: u64) {
        let off = self.rng.below(size.div_ceil(self.cluster)) * self.cluster;
        let len = self.cluster.min(size - off);
        // Compressible but not uniform, so the codec has work to do.
        let data: Vec<u8> = (0..len).map(|i| (i / 7) as u8 ^ off as u8).collect();
        let ok = img.write_compressed(&data, off).await.is_ok();
        self.record(ok, off, len, |s| s.write(off, &data));
    }

    async fn resize(&mut self, img: &Image, size: u64) {
        let grow = self.rng.below(2) == 0;
        let delta = self.rng.below(4) * self.cluster + self.rng.below(8) * 512;
        let new = if grow {
            (size + delta).min(SHADOW_MAX.max(size))
        } else {
            size.saturating_sub(delta)
        };
        match img.resize_with(new, true).await {
            Ok(()) => {
                let now = img.virtual_size();
                if let Some(s) = &mut self.shadow {
                    s.resize(now);
                }
            }
            // The size may be old or new: stop comparing.
            Err(_) => self.shadow = None,
        }
    }

    async fn read(&mut self, img: &Image, size: u64) {
        let (off, len) = self.range(size);
        let mut buf = vec![0u8; len as usize];
        let ok = img.read_at(&mut buf, off).await.is_ok();
        if let (true, Some(shadow)) = (ok, &self.shadow) {
            shadow.compare(off, &buf, "during the script");
        }
    }
}
