//! `qcow2 bench`: the same workload knobs as `qemu-img bench`, run on our engine, so the two
//! can be compared on the same image in one script (see `scripts/bench.sh`).

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use anyhow::{Result, bail};
use qcow2_engine::image::{Image, IoBackend};

use crate::access::Access;

use crate::args::parse_size;

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
    #[arg(short = 's', long, default_value = "4k", value_parser = parse_size)]
    size: u64,
    /// Distance between the offsets of consecutive requests (default: the request size).
    #[arg(short = 'S', long, value_parser = parse_size)]
    step: Option<u64>,
    /// First offset.
    #[arg(short = 'o', long, default_value = "0", value_parser = parse_size)]
    offset: u64,
    /// Write instead of read.
    #[arg(short = 'w', long)]
    write: bool,
    /// Flush after every this many write requests (0: only at the end).
    #[arg(long, default_value_t = 0)]
    flush_interval: u64,
    /// Cache mode: `none` opens with O_DIRECT, `writeback` (default) uses the page cache.
    #[arg(short = 't', long, default_value = "writeback")]
    cache: String,
    /// Image format (only qcow2).
    #[arg(short = 'f', long)]
    format: Option<String>,
    /// IO backend: `io_uring`, `threads`, or `native` (= the default: io_uring where
    /// available, else threads).
    #[arg(short = 'i', long)]
    aio: Option<String>,
    #[command(flatten)]
    access: Access,
    /// The image.
    file: PathBuf,
}

/// Run the benchmark and print qemu-img bench's two lines.
pub async fn run(a: Args) -> Result<u8> {
    if a.format.as_deref().is_some_and(|f| f != "qcow2") {
        bail!("bench supports only qcow2 images");
    }
    if a.size == 0 || a.depth == 0 {
        bail!("request size and depth must be positive");
    }
    let direct = match a.cache.as_str() {
        "none" | "directsync" => true,
        "writeback" | "writethrough" | "unsafe" => false,
        other => bail!("unknown cache mode '{other}'"),
    };
    let backend = match a.aio.as_deref() {
        None | Some("native") => IoBackend::Auto,
        Some(other) => other.parse().map_err(anyhow::Error::msg)?,
    };
    let opts = a.access.options(a.write).direct(direct).io_backend(backend);
    let img = Image::open(&a.file, &opts).await?;
    let step = a.step.unwrap_or(a.size);
    let kind = if a.write { "write" } else { "read" };
    outln!(
        "Sending {} {kind} requests, {} bytes each, {} in parallel (starting at offset {}, step size {step})",
        a.count,
        a.size,
        a.depth,
        a.offset
    );
    let start = Instant::now();
    let next = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for _ in 0..a.depth.min(a.count) {
        let job = Job {
            img: img.clone(),
            next: next.clone(),
            count: a.count,
            size: a.size,
        };
        let (offset, write, flush_every) = (a.offset, a.write, a.flush_interval);
        tasks.push(tokio::spawn(async move {
            job.run(offset, step, write, flush_every).await
        }));
    }
    for t in tasks {
        t.await??;
    }
    if a.write {
        img.flush().await?;
    }
    outln!(
        "Run completed in {:.3} seconds.",
        start.elapsed().as_secs_f64()
    );
    img.close().await?;
    Ok(0)
}

/// One of the `depth` workers: takes request numbers until `count` are issued.
struct Job {
    img: Image,
    next: Arc<AtomicU64>,
    count: u64,
    size: u64,
}

impl Job {
    async fn run(self, offset: u64, step: u64, write: bool, flush_every: u64) -> Result<()> {
        let disk = self.img.virtual_size();
        if self.size > disk {
            bail!(
                "request size {} is larger than the image ({disk} bytes)",
                self.size
            );
        }
        let mut buf = vec![0xa5u8; self.size as usize];
        loop {
            let i = self.next.fetch_add(1, Ordering::Relaxed);
            if i >= self.count {
                return Ok(());
            }
            // Wrap around exactly like qemu-img bench, so both touch the same offsets.
            let span = disk - self.size;
            let off = if span == 0 {
                0
            } else {
                (offset + i * step) % span
            };
            if write {
                self.img.write_at(&buf, off).await?;
                if flush_every > 0 && (i + 1) % flush_every == 0 {
                    self.img.flush().await?;
                }
            } else {
                self.img.read_at(&mut buf, off).await?;
            }
        }
    }
}
