//! The copy loop of `qcow2 convert` (uncompressed): walk the sources' allocation status
//! (`convert_walk.rs`), read data ranges in chunks of up to 2 MiB (up to `-m` at once,
//! `convert_pipe.rs`), split each chunk into data and all-zero `-S` blocks, and write the
//! data (zeros too when the destination may hold something else).
//!
//! The writes pass through `-r`'s rate limit; with `-C` data ranges between raw files are
//! copied by the kernel instead (`convert_offload.rs`); with `--salvage` unreadable sectors
//! become zeros and warnings, printed in source order with the chunk that found them.

use std::sync::Arc;

use anyhow::{Result, anyhow};
use qcow2_engine::image::Extent;
use qcow2_engine::ops::Throttle;
use tokio::sync::Mutex;

use super::convert::show_progress;
use super::convert_offload::Offload;
use super::convert_pipe::{Parallel, Pipeline, is_zero};
use super::convert_sources::{SECTOR, Sources, strerror};
use super::convert_walk::{Step, Walk};
use crate::disk::Disk;

/// Bytes read from the source at a time (one chunk of the pipeline).
const CHUNK: u64 = 2 << 20;

/// How the copy treats zeros and backing data.
#[derive(Debug, Clone, Copy)]
pub struct Plan {
    /// All-zero blocks of this many bytes are not written as data (0: every block is).
    pub sparse: usize,
    /// The destination may hold data: zero ranges must be written as zeroes.
    pub zero_target: bool,
    /// Leave ranges the source's backing chain provides to the destination's backing.
    pub skip_backing: bool,
}

/// Everything the copy needs besides the source and the destination.
#[derive(Debug, Clone)]
pub struct Copy {
    /// Zeros and backing data.
    pub plan: Plan,
    /// `-m` and `-W`.
    pub par: Parallel,
    /// Print progress lines.
    pub progress: bool,
    /// `--salvage`: unreadable sectors become zeros.
    pub salvage: bool,
    /// `-q`: no warnings.
    pub quiet: bool,
    /// `-r`: the writes' rate limit, shared by the chunks (with `-W` they write themselves).
    pub throttle: Arc<Mutex<Throttle>>,
    /// `-C` between raw files.
    pub offload: Option<Arc<Offload>>,
}

/// Copy every range of `src` that the plan says to copy into `dst`.
pub async fn copy(src: &Sources, dst: &Disk, c: &Copy) -> Result<()> {
    let size = src.size();
    let mut out = Out::new(dst, c);
    let mut pipe = Pipeline::new(c.par.requests);
    let mut walk = Walk::new(src, c.salvage);
    while let Some(step) = walk.next().await? {
        let extents = match step {
            Step::Extents(v) => v,
            Step::Unreadable { start, warning } => {
                let job = read_job(src, dst, (start, SECTOR), c, vec![warning]);
                push(&mut pipe, &mut out, job).await?;
                continue;
            }
        };
        for e in extents {
            queue_extent(&mut pipe, &mut out, src, &e, c).await?;
            show_progress(c.progress, e.start + e.length, size);
        }
    }
    while let Some(done) = pipe.next().await? {
        out.apply(done).await?;
    }
    if c.progress {
        outln!();
    }
    Ok(())
}

/// Queue the chunks of one extent of the source's map.
async fn queue_extent(
    pipe: &mut Pipeline<Chunk>,
    out: &mut Out<'_>,
    src: &Sources,
    e: &Extent,
    c: &Copy,
) -> Result<()> {
    if c.plan.skip_backing && e.depth > 0 {
        // Provided by the source's backing chain: left to the new backing file.
        return Ok(());
    }
    if e.zero && c.plan.sparse > 0 {
        if c.plan.zero_target {
            let zeros = Chunk::zeros(e.start, e.length);
            push(pipe, out, async move { Ok(zeros) }).await?;
        }
        return Ok(());
    }
    // qemu-img reads compressed clusters one at a time (their status comes one by one), so
    // its "error while reading at byte N" names the failing cluster: do the same.
    let most = match e.compressed {
        true => src.cluster_size_at(e.start).unwrap_or(CHUNK),
        false => CHUNK,
    };
    let mut at = e.start;
    while at < e.start + e.length {
        let len = (e.start + e.length - at).min(most);
        let job = read_job(src, out.dst, (at, len), c, Vec::new());
        push(pipe, out, job).await?;
        at += len;
    }
    Ok(())
}

/// Start `job`; apply the oldest chunk if the pipeline is full.
async fn push(
    pipe: &mut Pipeline<Chunk>,
    out: &mut Out<'_>,
    job: impl Future<Output = Result<Chunk>> + Send + 'static,
) -> Result<()> {
    if let Some(done) = pipe.push(job).await? {
        out.apply(done).await?;
    }
    Ok(())
}

/// The job copying `[at, at + len)`: offloaded when it can be, else read (and, with `-W`,
/// written at once).
fn read_job(
    src: &Sources,
    dst: &Disk,
    (at, len): (u64, u64),
    c: &Copy,
    warnings: Vec<String>,
) -> impl Future<Output = Result<Chunk>> + Send + 'static {
    let (src, dst, c) = (src.clone(), dst.clone(), c.clone());
    async move {
        let mut skip = 0;
        if let Some(o) = c.offload.clone() {
            c.throttle.lock().await.admit(len).await;
            skip = tokio::task::spawn_blocking(move || o.copy(at, len)).await?;
        }
        let chunk = Chunk::read(&src, (at + skip, len - skip), &c, warnings).await?;
        if c.par.unordered {
            return Out::new(&dst, &c).write(chunk).await;
        }
        Ok(chunk)
    }
}

/// A chunk read from the source: its bytes and its runs `(start, len, data)` relative to
/// `off` (`data` false: all-zero blocks of the `-S` size), and the warnings its reads gave.
struct Chunk {
    off: u64,
    buf: Vec<u8>,
    runs: Vec<(u64, u64, bool)>,
    warnings: Vec<String>,
}

impl Chunk {
    /// A zero range (written as zeroes when the destination may hold data).
    fn zeros(off: u64, len: u64) -> Chunk {
        Chunk {
            off,
            buf: Vec::new(),
            runs: vec![(0, len, false)],
            warnings: Vec::new(),
        }
    }

    /// Read `[at, at + len)` (salvaging if asked) and split it into data and zero runs.
    async fn read(
        src: &Sources,
        (at, len): (u64, u64),
        c: &Copy,
        warnings: Vec<String>,
    ) -> Result<Chunk> {
        let mut buf = vec![0u8; usize::try_from(len)?];
        let mut warnings = warnings;
        if c.salvage {
            warnings.extend(src.read_salvaging(&mut buf, at).await?);
        } else if let Err(e) = src.read_at(&mut buf, at).await {
            return Err(anyhow!(
                "error while reading at byte {at}: {}",
                strerror(&e)
            ));
        }
        let runs = zero_runs(&buf, c.plan.sparse);
        Ok(Chunk {
            off: at,
            buf,
            runs,
            warnings,
        })
    }
}

/// The writing end: the destination, the rate limit, and where warnings go.
struct Out<'a> {
    dst: &'a Disk,
    plan: Plan,
    quiet: bool,
    throttle: Arc<Mutex<Throttle>>,
}

impl<'a> Out<'a> {
    fn new(dst: &'a Disk, c: &Copy) -> Self {
        Out {
            dst,
            plan: c.plan,
            quiet: c.quiet,
            throttle: c.throttle.clone(),
        }
    }

    /// Write a chunk read in order (a chunk of `-W` arrives written and empty).
    async fn apply(&mut self, chunk: Chunk) -> Result<()> {
        self.write(chunk).await.map(drop)
    }

    /// Print the chunk's warnings, then write its runs within the rate limit; returns the
    /// chunk emptied.
    async fn write(&mut self, chunk: Chunk) -> Result<Chunk> {
        for w in &chunk.warnings {
            if !self.quiet {
                errln!("qcow2: warning: {w}");
            }
        }
        let bytes = chunk
            .runs
            .iter()
            .filter(|r| r.2 || self.plan.zero_target)
            .map(|r| r.1)
            .sum();
        if bytes > 0 {
            self.throttle.lock().await.admit(bytes).await;
        }
        for &(start, len, data) in &chunk.runs {
            let at = chunk.off + start;
            let done = if data {
                let (a, b) = (usize::try_from(start)?, usize::try_from(start + len)?);
                self.dst.write_at(&chunk.buf[a..b], at).await
            } else if self.plan.zero_target {
                self.dst.write_zeroes(at, len, true).await
            } else {
                continue;
            };
            done.map_err(|e| {
                anyhow!(
                    "error while writing at byte {}: {}",
                    chunk.off,
                    strerror(&e)
                )
            })?;
        }
        Ok(Chunk {
            off: chunk.off,
            buf: Vec::new(),
            runs: Vec::new(),
            warnings: Vec::new(),
        })
    }
}

/// Split `buf` into alternating runs of data and of all-zero `block`-byte blocks (`block` 0:
/// one data run).
fn zero_runs(buf: &[u8], block: usize) -> Vec<(u64, u64, bool)> {
    if block == 0 {
        return vec![(0, buf.len() as u64, true)];
    }
    let mut runs: Vec<(u64, u64, bool)> = Vec::new();
    for (i, b) in buf.chunks(block).enumerate() {
        let data = !is_zero(b);
        let start = (i * block) as u64;
        match runs.last_mut() {
            Some(last) if last.2 == data => last.1 += b.len() as u64,
            _ => runs.push((start, b.len() as u64, data)),
        }
    }
    runs
}
