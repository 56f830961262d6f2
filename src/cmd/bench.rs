//! `qcow2 bench`: `qemu-img bench`'s workload knobs, run on our engine (or, with `-f raw`,
//! straight on a file through our storage backends), so the two can be compared on the same
//! image in one script (see `scripts/bench-compare.sh`).
//!
//! `depth` workers share one request counter; request `i` goes to the offset qemu-img bench
//! would use (or, with `--random SEED`, a pseudo-random request-aligned offset that depends
//! only on `SEED` and `i`, so every run touches the same offsets). Each worker records its
//! requests' latencies in its own histogram (`bench_stats.rs`).

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use qcow2_engine::image::{Image, IoBackend};
use qcow2_engine::storage::{OpenFlags, open_file_locked};
use qcow2_nbd::RawDevice;
use tokio::sync::RwLock;

use super::bench_stats::{Histogram, Report};
use crate::access::Access;
use crate::args::parse_size;
use crate::disk::Disk;

/// Arguments of `qcow2 bench`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Number of requests.
    #[arg(short = 'c', long, default_value_t = 75000)]
    count: u64,
    /// Requests in flight at once.
    #[arg(short = 'd', long, default_value_t = 64)]
    depth: u64,
    /// Request size (qemu-img size syntax).
    #[arg(short = 's', long, alias = "buffer-size", default_value = "4k", value_parser = parse_size)]
    size: u64,
    /// Distance between the offsets of consecutive requests (default: the request size).
    #[arg(short = 'S', long, alias = "step-size", value_parser = parse_size)]
    step: Option<u64>,
    /// First offset.
    #[arg(short = 'o', long, default_value = "0", value_parser = parse_size)]
    offset: u64,
    /// Pseudo-random request-aligned offsets from this seed instead of `-o`/`-S` steps.
    #[arg(long, value_name = "SEED", conflicts_with_all = ["step", "offset"])]
    random: Option<u64>,
    /// Write instead of read.
    #[arg(short = 'w', long)]
    write: bool,
    /// The byte written (default 0, as qemu-img bench).
    #[arg(long, default_value_t = 0, value_parser = parse_pattern)]
    pattern: u8,
    /// Flush after every this many write requests (0: only at the end).
    #[arg(long, default_value_t = 0)]
    flush_interval: u64,
    /// With --flush-interval: flush without first waiting for the requests in flight.
    #[arg(long, requires = "flush_interval")]
    no_drain: bool,
    /// Cache mode: `none` opens with O_DIRECT, `writeback` (default) uses the page cache.
    #[arg(short = 't', long, default_value = "writeback")]
    cache: String,
    /// Image format: qcow2 or raw (probed when omitted).
    #[arg(short = 'f', long)]
    format: Option<String>,
    /// IO backend: `io_uring`, `threads`, or `native` (= the default: io_uring where
    /// available, else threads).
    #[arg(short = 'i', long)]
    aio: Option<String>,
    /// Native AIO (qemu-img bench's `-n`): our default backend already is; accepted.
    #[arg(short = 'n', long)]
    native: bool,
    /// Bound of the L2 table cache (qemu's `l2-cache-size`; default: the library's 4 MiB).
    #[arg(long, value_parser = parse_size)]
    l2_cache_size: Option<u64>,
    /// Do not print the "Sending ..." line.
    #[arg(short = 'q', long)]
    quiet: bool,
    /// Print one JSON object (IOPS, MiB/s, p50/p99 latency) instead of qemu-img's lines.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    access: Access,
    /// The image.
    file: PathBuf,
}

/// `--pattern`: a byte, decimal or 0x-hex.
fn parse_pattern(s: &str) -> Result<u8, String> {
    let v = match s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        Some(hex) => u8::from_str_radix(hex, 16),
        None => s.parse(),
    };
    v.map_err(|_| format!("invalid pattern byte '{s}'"))
}

/// Run the benchmark and print qemu-img bench's lines (or `--json`).
pub async fn run(a: Args) -> Result<u8> {
    if a.size == 0 || a.depth == 0 {
        bail!("request size and depth must be positive");
    }
    let disk = open(&a).await?;
    let ran = bench(&a, &disk).await;
    let closed = disk.close().await;
    let report = ran?;
    closed?;
    if a.json {
        outln!("{}", serde_json::to_string(&report)?);
    } else {
        outln!("Run completed in {:.3} seconds.", report.seconds);
    }
    Ok(0)
}

/// Open the image as `-f`/`-t`/`-i` say.
async fn open(a: &Args) -> Result<Disk> {
    let direct = match a.cache.as_str() {
        "none" | "directsync" => true,
        "writeback" | "writethrough" | "unsafe" => false,
        other => bail!("unknown cache mode '{other}'"),
    };
    let backend = match a.aio.as_deref() {
        None | Some("native") => IoBackend::Auto,
        Some(other) => other.parse().map_err(anyhow::Error::msg)?,
    };
    if a.write && a.access.force_share {
        bail!("--force-share (-U) can only be used with read-only images");
    }
    match crate::disk::detect_format(&a.file, a.format.as_deref()).await? {
        "qcow2" => {
            let mut opts = a.access.options(a.write).direct(direct).io_backend(backend);
            if let Some(n) = a.l2_cache_size {
                opts = opts.l2_cache_bytes(usize::try_from(n)?);
            }
            Ok(Disk::Qcow2(Image::open(&a.file, &opts).await?))
        }
        _ => {
            let flags = OpenFlags {
                read_only: !a.write,
                direct,
            };
            let lock = a.access.raw_lock(a.write);
            let storage = open_file_locked(&a.file, flags, backend, lock)
                .with_context(|| format!("could not open '{}'", a.file.display()))?;
            let size = storage.len().await?.next_multiple_of(512);
            Ok(Disk::Raw(RawDevice::with_size(storage, size, a.write)))
        }
    }
}

/// Issue the requests and time them (the final flush of a write run included, as qemu-img).
async fn bench(a: &Args, disk: &Disk) -> Result<Report> {
    if a.size > disk.size() {
        bail!(
            "request size {} is larger than the image ({} bytes)",
            a.size,
            disk.size()
        );
    }
    let step = a.step.unwrap_or(a.size);
    let kind = if a.write { "write" } else { "read" };
    if !a.quiet && !a.json {
        outln!(
            "Sending {} {kind} requests, {} bytes each, {} in parallel (starting at offset {}, step size {step})",
            a.count,
            a.size,
            a.depth,
            a.offset
        );
    }
    let shared = Arc::new(Shared {
        disk: disk.clone(),
        next: AtomicU64::new(0),
        drain: (a.flush_interval > 0 && !a.no_drain).then(|| RwLock::new(())),
        order: match a.random {
            Some(seed) => Order::Random(seed),
            None => Order::Steps(a.offset, step),
        },
        count: a.count,
        size: a.size,
        write: a.write.then_some(a.flush_interval),
    });
    let start = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..a.depth.min(a.count) {
        let (shared, pattern) = (shared.clone(), a.pattern);
        tasks.push(tokio::spawn(async move { shared.worker(pattern).await }));
    }
    let mut hist = Histogram::default();
    for t in tasks {
        hist.merge(&t.await??);
    }
    if a.write {
        disk.flush().await?;
    }
    let elapsed = start.elapsed();
    Ok(Report::new(
        kind,
        (a.count, a.size, a.depth),
        elapsed,
        &hist,
    ))
}

/// Which offsets the requests go to.
#[derive(Debug, Clone, Copy)]
enum Order {
    /// qemu-img bench's: start, step, wrapping before the end.
    Steps(u64, u64),
    /// Request-aligned offsets drawn from this seed.
    Random(u64),
}

/// What the workers share.
struct Shared {
    disk: Disk,
    next: AtomicU64,
    /// With a draining flush interval: requests hold it shared, the flush exclusively.
    drain: Option<RwLock<()>>,
    order: Order,
    count: u64,
    size: u64,
    /// `Some(flush interval)` for a write run.
    write: Option<u64>,
}

impl Shared {
    /// Take request numbers until `count` are issued; returns the latencies.
    async fn worker(&self, pattern: u8) -> Result<Histogram> {
        let mut hist = Histogram::default();
        let len = usize::try_from(self.size)?;
        let mut buf = vec![pattern; len];
        loop {
            let i = self.next.fetch_add(1, Ordering::Relaxed);
            if i >= self.count {
                return Ok(hist);
            }
            let off = self.offset(i);
            let took = self.request(&mut buf, off).await?;
            hist.record(took);
            if self.write.is_some_and(|n| n > 0 && (i + 1) % n == 0) {
                self.flush().await?;
            }
        }
    }

    /// One request, timed.
    async fn request(&self, buf: &mut [u8], off: u64) -> Result<Duration> {
        let _shared = match &self.drain {
            Some(l) => Some(l.read().await),
            None => None,
        };
        let t = Instant::now();
        if self.write.is_some() {
            self.disk.write_at(buf, off).await?;
        } else {
            self.disk.read_at(buf, off).await?;
        }
        Ok(t.elapsed())
    }

    /// The interval flush: with draining, once no request is in flight.
    async fn flush(&self) -> Result<()> {
        let _all = match &self.drain {
            Some(l) => Some(l.write().await),
            None => None,
        };
        self.disk.flush().await
    }

    /// The offset of request `i`.
    fn offset(&self, i: u64) -> u64 {
        let (disk, span) = (self.disk.size(), self.disk.size() - self.size);
        match self.order {
            // qemu-img bench 10.0 adds the step and wraps modulo the image size (a request
            // that then crosses the end fails, as qemu-img's does).
            Order::Steps(first, step) if disk > 0 => {
                let at = u128::from(first) + u128::from(i) * u128::from(step);
                (at % u128::from(disk)) as u64
            }
            Order::Steps(..) => 0,
            Order::Random(seed) => {
                let slots = span / self.size + 1;
                (mix(seed ^ mix(i)) % slots) * self.size
            }
        }
    }
}

/// splitmix64's finaliser: a well-spread 64-bit hash, so offsets depend only on seed and index.
fn mix(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}
