//! Conformance of the read side against QEMU: images made by `qemu-img` and written by
//! `qemu-io` in every variant (cluster sizes, refcount widths, v2/v3, deflate/zstd
//! compression, extended L2, lazy refcounts, odd virtual sizes, backing chains, external data
//! files, preallocation, internal snapshots, empty and huge sparse images) must read back
//! byte-identical to `qemu-img convert -O raw` through the library (whole disk, odd chunks,
//! concurrent odd chunks, default and tiny caches) and through `qcow2 convert -O raw`;
//! `qcow2 map --output=json` and `qcow2 info --output=json` must print exactly what
//! `qemu-img map/info --output=json` print; and `qcow2 convert -O qcow2` of each must pass
//! `qemu-img check` and `qemu-img compare`.
//!
//! Each group test runs a table of variants and reports every failing variant by name with the
//! first differing offset.

use crate::common;

use std::fmt::Write as _;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use qcow2_engine::image::{Image, OpenOptions, ReferencePolicy};

const K: u64 = 1024;
const M: u64 = 1024 * 1024;

// ---------------------------------------------------------------------------------------------
// Building images

/// One image variant: `qemu-img create -f qcow2 -o OPTS IMG SIZE` (or, with `convert_c`, a
/// compressed `qemu-img convert -c` of an image written with `pre_io`), then `qemu-io` with
/// `io`.
#[derive(Debug, Clone)]
struct Variant {
    name: String,
    /// `-o` options for `qemu-img create` (or `qemu-img convert` with `convert_c`).
    opts: String,
    size: u64,
    /// With `Some`, the image is `qemu-img convert -c -O qcow2 -o OPTS SRC IMG` where SRC is a
    /// plain qcow2 (with these create options) written with `pre_io`.
    convert_c: Option<(String, Vec<String>)>,
    /// `qemu-io -c` commands applied to the image, in order.
    io: Vec<String>,
    /// Then these commands (program and arguments; `IMG` stands for the image file), each
    /// followed by `qemu-io` with `after_io` when that is not empty.
    after: Vec<Vec<String>>,
    after_io: Vec<String>,
}

impl Variant {
    fn new(name: impl Into<String>, opts: impl Into<String>, size: u64, io: Vec<String>) -> Self {
        Variant {
            name: name.into(),
            opts: opts.into(),
            size,
            convert_c: None,
            io,
            after: Vec::new(),
            after_io: Vec::new(),
        }
    }

    /// Build the image in `dir` (commands run with `dir` as the working directory, so relative
    /// names in the options are relative to it). Returns the image path.
    fn build(&self, dir: &Path) -> PathBuf {
        let file = format!("{}.qcow2", self.name.replace(['/', ' ', '='], "_"));
        let img = dir.join(&file);
        let size = self.size.to_string();
        match &self.convert_c {
            None => {
                let mut args = vec!["create", "-q", "-f", "qcow2"];
                if !self.opts.is_empty() {
                    args.extend(["-o", &self.opts]);
                }
                args.extend([file.as_str(), &size]);
                run_in(dir, "qemu-img", &args);
            }
            Some((src_opts, pre_io)) => {
                let src = format!("{file}.src");
                let mut args = vec!["create", "-q", "-f", "qcow2"];
                if !src_opts.is_empty() {
                    args.extend(["-o", src_opts]);
                }
                args.extend([src.as_str(), &size]);
                run_in(dir, "qemu-img", &args);
                qemu_io(dir, &src, pre_io);
                let mut args = vec!["convert", "-c", "-f", "qcow2", "-O", "qcow2"];
                if !self.opts.is_empty() {
                    args.extend(["-o", &self.opts]);
                }
                args.extend([src.as_str(), &file]);
                run_in(dir, "qemu-img", &args);
                std::fs::remove_file(dir.join(&src)).unwrap();
            }
        }
        qemu_io(dir, &file, &self.io);
        for cmd in &self.after {
            let args: Vec<&str> = cmd[1..]
                .iter()
                .map(|a| {
                    if a == "IMG" {
                        file.as_str()
                    } else {
                        a.as_str()
                    }
                })
                .collect();
            run_in(dir, &cmd[0], &args);
            qemu_io(dir, &file, &self.after_io);
        }
        img
    }
}

/// Run `cmd args` in `dir`, panicking with its output when it fails.
fn run_in(dir: &Path, cmd: &str, args: &[&str]) -> String {
    let out = Command::new(cmd)
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap_or_else(|e| panic!("{cmd}: {e}"));
    assert!(
        out.status.success(),
        "{cmd} {args:?} (in {}) failed: {}\n{}",
        dir.display(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `qemu-io -f qcow2 -c CMD... IMG` in `dir`; every command must succeed (qemu-io exits 1 if
/// one failed, and prints "failed" on its output).
fn qemu_io(dir: &Path, img: &str, cmds: &[String]) {
    if cmds.is_empty() {
        return;
    }
    pattern_file(dir);
    let mut args = vec!["-f", "qcow2"];
    for c in cmds {
        args.extend(["-c", c.as_str()]);
    }
    args.push(img);
    let out = run_in(dir, "qemu-io", &args);
    assert!(
        !out.contains("failed"),
        "qemu-io {args:?} in {}: {out}",
        dir.display()
    );
}

/// Name of the pattern file (in each image directory) for `qemu-io write -s`: data that
/// differs at every offset (so a read from the wrong place inside a cluster shows) and whose
/// compressibility varies from none to high every few hundred bytes (so compressed clusters
/// have varied sizes, straddle host clusters, and some stay uncompressed).
const PAT: &str = "mixed.pat";

/// Create `dir/PAT` if missing.
fn pattern_file(dir: &Path) {
    let path = dir.join(PAT);
    if path.exists() {
        return;
    }
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut next = || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    let len = M as usize + 4093;
    let mut data = Vec::with_capacity(len);
    let mut block = 0u64;
    while data.len() < len {
        let kind = next() % 4;
        let n = 200 + (next() % 3000) as usize;
        for i in 0..n {
            let r = next();
            data.push(match kind {
                0 => r as u8,
                1 => (r & 3) as u8,
                2 => b'a' + ((block + i as u64 / 7) % 26) as u8,
                _ => (i as u8) ^ (block as u8),
            });
        }
        block += 1;
    }
    data.truncate(len);
    std::fs::write(&path, data).unwrap();
}

/// The standard workload for cluster size `c` on an image of `size` bytes (at least
/// `std_size(c)`): full and partial patterned writes at unaligned offsets, in-place
/// overwrites, full and partial `write -z` (with and without unmap) over data and over
/// unallocated clusters, full and partial discards, and (with `compress`) compressed clusters,
/// partly overwritten and discarded ones included. Writes crossing L2-table boundaries for
/// small clusters, and the last bytes of the disk.
fn workload(c: u64, size: u64, compress: bool) -> Vec<String> {
    assert!(size >= std_size(c), "{size} too small for cluster {c}");
    let mut w = vec![
        format!("write -s {PAT} 0 {}", 3 * c),
        format!("write -P 0x22 {} {}", c + 7, c / 2 + 3),
        format!("write -s {PAT} {} {}", 3 * c + c / 3 + 1, 2 * c + 5),
        format!("write -z {} {}", 6 * c, 2 * c),
        format!("write -P 0x44 {} {}", 8 * c, 2 * c),
        format!("write -z {} {}", 8 * c + c / 4, c / 2 + 1),
        format!("write -z {} {}", 9 * c, c),
        format!("discard {} {}", c, c),
        format!("discard {} {}", 2 * c + 100, 300),
        format!("write -P 0x45 {} {}", 6 * c + c / 2 + 1, 17),
        format!("write -P 0x46 {} {}", 14 * c, c),
        format!("write -z -u {} {}", 14 * c, c),
        format!("write -z -u {} {}", 15 * c + 5, c / 2),
    ];
    if compress {
        w.extend([
            format!("write -c -s {PAT} {} {}", 10 * c, 2 * c),
            format!("write -P 0x66 {} {}", 10 * c + c / 2 - 3, 7),
            format!("write -c -P 0x77 {} {}", 12 * c, c),
            format!("write -c -s {PAT} {} {}", 13 * c, c),
            format!("discard {} {}", 13 * c, c),
        ]);
    } else {
        w.push(format!("write -P 0x55 {} {}", 10 * c + 1, 3 * c));
    }
    let big = if c <= 4 * K {
        300 * K + 7
    } else {
        c + c / 2 + 7
    };
    w.extend([
        format!("write -s {PAT} {} {}", 16 * c + 3, big),
        format!("write -P 0x99 {} {}", 2 * M - 5000, 10007),
        format!("write -P 0xaa {} {}", size - 1000, 1000),
        format!("write -P 0xab {} {}", size / 2 + 11, c + 2),
    ]);
    w
}

/// A cluster-aligned guest offset the standard workload leaves unallocated (at least 8
/// clusters before the tail writes).
fn free_area(c: u64, size: u64) -> u64 {
    let off = (size * 3 / 4) / c * c;
    assert!(off >= 18 * c && off + 8 * c <= size - 1000, "no free area");
    off
}

/// A virtual size that holds the standard workload for cluster size `c`.
fn std_size(c: u64) -> u64 {
    (4 * M).max(18 * c + M)
}

// ---------------------------------------------------------------------------------------------
// Checking images

/// Whether `qcow2 map` equals `qemu-img map`.
enum MapOutcome {
    Same,
    /// Differs only where QEMU reports data clusters as `"zero": false` and the engine, which
    /// consults host-file holes for every data cluster, reports `"zero": true` (known engine
    /// difference, being fixed: QEMU only asks the file system when it detects metadata
    /// preallocation).
    KnownHostHoles(String),
}

/// All the read-side checks for `img`: library reads (whole, odd chunks, concurrent odd
/// chunks; default and tiny cache), `qcow2 convert -O raw`, `qcow2 info --output=json` and
/// `qcow2 map --output=json` against QEMU, and `qcow2 convert -O qcow2` (our write path)
/// checked and compared by QEMU. The `qcow2` binary runs in another working
/// directory than the image's, to exercise relative names.
/// Returns the failures (empty when all is well); known map differences are printed.
fn check_image(name: &str, img: &Path) -> Vec<String> {
    let mut errors = Vec::new();
    let want = common::qemu_raw(img);
    if let Err(e) = check_library(img, &want) {
        errors.push(format!("{name}: library read: {e}"));
    }
    if let Err(e) = check_convert(img, &want) {
        errors.push(format!("{name}: qcow2 convert -O raw: {e}"));
    }
    if let Err(e) = check_convert_qcow2(img) {
        errors.push(format!("{name}: qcow2 convert -O qcow2: {e}"));
    }
    if let Err(e) = check_info(img) {
        errors.push(format!("{name}: qcow2 info --output=json: {e}"));
    }
    match check_map(img) {
        Ok(MapOutcome::Same) => {}
        Ok(MapOutcome::KnownHostHoles(d)) => {
            errors.push(format!("{name}: map differs in host-hole zero flags: {d}"))
        }
        Err(e) => errors.push(format!("{name}: qcow2 map --output=json: {e}")),
    }
    errors
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

/// Explain a content difference: the first differing offset and the bytes there.
fn diff(got: &[u8], want: &[u8], base: u64) -> Option<String> {
    let i = common::first_difference(got, want)?;
    if got.len() != want.len() && i == got.len().min(want.len()) {
        return Some(format!(
            "length {} instead of {} (first {} bytes equal)",
            got.len(),
            want.len(),
            i
        ));
    }
    let end = (i + 16).min(got.len());
    Some(format!(
        "first difference at offset {} (0x{:x}): got {:02x?}, want {:02x?}",
        base + i as u64,
        base + i as u64,
        &got[i..end],
        &want[i..end]
    ))
}

/// Odd chunk sizes for cluster size `c`: a cycle that straddles cluster boundaries.
fn odd_chunks(c: u64, total: u64) -> Vec<(u64, usize)> {
    let sizes = [c - 1, 3, 2 * c + 5, 4097, 1, 3 * c + 7, 65537, 511, c + 1];
    let mut out = Vec::new();
    let mut off = 0;
    let mut i = 0;
    while off < total {
        let len = sizes[i % sizes.len()].min(total - off);
        out.push((off, len as usize));
        off += len;
        i += 1;
    }
    out
}

fn check_library(img: &Path, want: &[u8]) -> Result<(), String> {
    // Default options, then the smallest cache (4 slices of 512 bytes) to force evictions
    // and reloads of L2 slices during the reads.
    // The images are our own: their absolute data file names are fine.
    let trusted = OpenOptions::new().references(ReferencePolicy::Any);
    let tiny = trusted.clone().slice_size(512).l2_cache_bytes(0);
    for (what, opts) in [("default cache", trusted), ("tiny cache", tiny)] {
        rt().block_on(check_library_with(img, want, &opts))
            .map_err(|e| format!("{what}: {e}"))?;
    }
    Ok(())
}

async fn check_library_with(img: &Path, want: &[u8], opts: &OpenOptions) -> Result<(), String> {
    let image = Image::open(img, opts)
        .await
        .map_err(|e| format!("open: {e}"))?;
    if image.virtual_size() != want.len() as u64 {
        return Err(format!(
            "virtual size {} instead of {}",
            image.virtual_size(),
            want.len()
        ));
    }
    let mut got = vec![0xeeu8; want.len()];
    image
        .read_at(&mut got, 0)
        .await
        .map_err(|e| format!("read_at(0, {}): {e}", want.len()))?;
    if let Some(d) = diff(&got, want, 0) {
        return Err(format!("whole-disk read: {d}"));
    }
    let chunks = odd_chunks(image.cluster_size(), want.len() as u64);
    for &(off, len) in &chunks {
        let mut buf = vec![0xeeu8; len];
        image
            .read_at(&mut buf, off)
            .await
            .map_err(|e| format!("read_at({off}, {len}): {e}"))?;
        if let Some(d) = diff(&buf, &want[off as usize..off as usize + len], off) {
            return Err(format!("read_at({off}, {len}): {d}"));
        }
    }
    // The same chunks again, all in flight at once.
    let mut set = tokio::task::JoinSet::new();
    for &(off, len) in chunks.iter().rev() {
        let image = image.clone();
        set.spawn(async move {
            let mut buf = vec![0xeeu8; len];
            let r = image.read_at(&mut buf, off).await;
            (off, buf, r)
        });
    }
    while let Some(r) = set.join_next().await {
        let (off, buf, r) = r.unwrap();
        r.map_err(|e| format!("concurrent read_at({off}, {}): {e}", buf.len()))?;
        if let Some(d) = diff(&buf, &want[off as usize..off as usize + buf.len()], off) {
            return Err(format!("concurrent read_at({off}, {}): {d}", buf.len()));
        }
    }
    image.close().await.map_err(|e| format!("close: {e}"))?;
    Ok(())
}

/// Run the `qcow2` binary in `cwd`.
fn qcow2_in(cwd: &Path, args: &[&str]) -> Result<String, String> {
    let out = Command::new(env!("CARGO_BIN_EXE_qcow2"))
        .args(args)
        .current_dir(cwd)
        .output()
        .unwrap();
    if !out.status.success() {
        return Err(format!(
            "qcow2 {args:?} exited {:?}: {}{}",
            out.status.code(),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// A working directory unrelated to the images'.
fn elsewhere() -> PathBuf {
    std::env::temp_dir()
}

fn check_convert(img: &Path, want: &[u8]) -> Result<(), String> {
    let out = img.with_extension("ours.raw");
    qcow2_in(
        &elsewhere(),
        &[
            "convert",
            "-O",
            "raw",
            img.to_str().unwrap(),
            out.to_str().unwrap(),
        ],
    )?;
    let got = std::fs::read(&out).unwrap();
    std::fs::remove_file(&out).ok();
    match diff(&got, want, 0) {
        Some(d) => Err(d),
        None => Ok(()),
    }
}

/// `qcow2 convert -O qcow2` (our write path, with the source's cluster size) gives an image
/// that passes `qemu-img check` and that `qemu-img compare` finds identical to the source.
fn check_convert_qcow2(img: &Path) -> Result<(), String> {
    let out = img.with_extension("ours.qcow2");
    let (p, o) = (img.to_str().unwrap(), out.to_str().unwrap());
    let info: serde_json::Value = serde_json::from_str(&run_in(
        &elsewhere(),
        "qemu-img",
        &["info", "--output=json", "-U", p],
    ))
    .unwrap();
    let opts = format!("cluster_size={}", info["cluster-size"]);
    qcow2_in(&elsewhere(), &["convert", "-O", "qcow2", "-o", &opts, p, o])?;
    let r = (|| {
        let (code, text) = common::status("qemu-img", &["check", o]);
        if code != 0 {
            return Err(format!("qemu-img check exit {code}: {text}"));
        }
        let (code, text) = common::status("qemu-img", &["compare", "-U", p, o]);
        if code != 0 {
            return Err(format!("qemu-img compare exit {code}: {text}"));
        }
        Ok(())
    })();
    std::fs::remove_file(&out).ok();
    r
}

/// One extent of a JSON map.
#[derive(Debug, Clone, PartialEq)]
struct MapExtent {
    start: u64,
    length: u64,
    depth: u64,
    present: bool,
    zero: bool,
    data: bool,
    compressed: bool,
    offset: Option<u64>,
}

fn parse_map(text: &str) -> Result<Vec<MapExtent>, String> {
    let v: serde_json::Value =
        serde_json::from_str(text).map_err(|e| format!("bad JSON map: {e}\n{text}"))?;
    let arr = v.as_array().ok_or("map is not an array")?;
    arr.iter()
        .map(|e| {
            let u = |k: &str| e[k].as_u64().ok_or(format!("no {k} in {e}"));
            let b = |k: &str| e[k].as_bool().ok_or(format!("no {k} in {e}"));
            Ok(MapExtent {
                start: u("start")?,
                length: u("length")?,
                depth: u("depth")?,
                present: b("present")?,
                zero: b("zero")?,
                data: b("data")?,
                compressed: b("compressed")?,
                offset: e["offset"].as_u64(),
            })
        })
        .collect()
}

/// The extent of `map` containing guest offset `off`.
fn extent_at(map: &[MapExtent], off: u64) -> Option<&MapExtent> {
    map.iter()
        .find(|e| e.start <= off && off < e.start + e.length)
}

/// Compare our JSON map text with QEMU's; tolerate (and describe) only the known host-hole
/// difference.
fn compare_maps(ours: &str, theirs: &str) -> Result<MapOutcome, String> {
    if ours == theirs {
        return Ok(MapOutcome::Same);
    }
    let first_line = ours
        .lines()
        .zip(theirs.lines())
        .position(|(a, b)| a != b)
        .unwrap_or(ours.lines().count().min(theirs.lines().count()));
    let show = format!(
        "first differing line {}:\n  ours:   {}\n  theirs: {}",
        first_line + 1,
        ours.lines().nth(first_line).unwrap_or("<none>"),
        theirs.lines().nth(first_line).unwrap_or("<none>")
    );
    let (a, b) = (parse_map(ours)?, parse_map(theirs)?);
    let mut cuts: Vec<u64> = a
        .iter()
        .chain(&b)
        .flat_map(|e| [e.start, e.start + e.length])
        .collect();
    cuts.sort_unstable();
    cuts.dedup();
    let mut known = Vec::new();
    for w in cuts.windows(2) {
        let (s, e) = (w[0], w[1]);
        let (x, y) = match (extent_at(&a, s), extent_at(&b, s)) {
            (Some(x), Some(y)) => (x, y),
            _ => return Err(format!("maps cover different ranges at {s}; {show}")),
        };
        let xo = x.offset.map(|o| o + (s - x.start));
        let yo = y.offset.map(|o| o + (s - y.start));
        let same = x.depth == y.depth
            && x.present == y.present
            && x.zero == y.zero
            && x.data == y.data
            && x.compressed == y.compressed
            && xo == yo;
        if same {
            continue;
        }
        let host_hole = x.depth == y.depth
            && x.present
            && y.present
            && x.data
            && y.data
            && x.zero
            && !y.zero
            && !x.compressed
            && !y.compressed
            && xo == yo;
        if host_hole {
            known.push(format!("[{s}, {e})"));
        } else {
            return Err(format!(
                "guest range [{s}, {e}): ours {x:?}, theirs {y:?}; {show}"
            ));
        }
    }
    if known.is_empty() {
        // Same extents, different text (e.g. different merging or formatting).
        return Err(format!("same extents, different text; {show}"));
    }
    Ok(MapOutcome::KnownHostHoles(format!(
        "ours zero:true where qemu says zero:false in {}",
        known.join(" ")
    )))
}

/// `qcow2 info --output=json` prints exactly what `qemu-img info --output=json` prints.
fn check_info(img: &Path) -> Result<(), String> {
    let p = img.to_str().unwrap();
    let theirs = run_in(
        &elsewhere(),
        "qemu-img",
        &["info", "--output=json", "-U", p],
    );
    let ours = qcow2_in(&elsewhere(), &["info", "--output=json", p])?;
    if ours == theirs {
        return Ok(());
    }
    let i = ours
        .lines()
        .zip(theirs.lines())
        .position(|(a, b)| a != b)
        .unwrap_or(ours.lines().count().min(theirs.lines().count()));
    Err(format!(
        "first differing line {}:\n  ours:   {}\n  theirs: {}",
        i + 1,
        ours.lines().nth(i).unwrap_or("<none>"),
        theirs.lines().nth(i).unwrap_or("<none>")
    ))
}

fn check_map(img: &Path) -> Result<MapOutcome, String> {
    let p = img.to_str().unwrap();
    let theirs = run_in(&elsewhere(), "qemu-img", &["map", "--output=json", p]);
    let ours = qcow2_in(&elsewhere(), &["map", "--output=json", p])?;
    compare_maps(&ours, &theirs)
}

/// Build and check every variant; panic listing every failure.
fn run_variants(variants: &[Variant]) {
    let dir = tempfile::tempdir().unwrap();
    let mut errors = Vec::new();
    for v in variants {
        let img = v.build(dir.path());
        errors.extend(check_image(&v.name, &img));
        std::fs::remove_file(&img).ok();
    }
    report(errors);
}

fn report(errors: Vec<String>) {
    if !errors.is_empty() {
        let mut msg = format!("{} failure(s):\n", errors.len());
        for e in &errors {
            let _ = writeln!(msg, "- {e}");
        }
        panic!("{msg}");
    }
}

/// A standard variant: the workload of its cluster size on a fresh image with `opts`.
fn std_variant(name: &str, opts: &str, c: u64, compress: bool) -> Variant {
    let size = std_size(c);
    Variant::new(name, opts, size, workload(c, size, compress))
}

// ---------------------------------------------------------------------------------------------
// Variants of the format

/// Every cluster size from 512 B to 2 MiB (the first four are the ones the brief names; the
/// others are cheap). Small clusters give multi-cluster L1 tables, many L2 tables and writes
/// crossing L2 tables.
#[test]
fn cluster_sizes() {
    let variants: Vec<Variant> = (9..=21)
        .map(|bits| {
            let c = 1u64 << bits;
            std_variant(
                &format!("cluster_{c}"),
                &format!("cluster_size={c}"),
                c,
                true,
            )
        })
        .collect();
    run_variants(&variants);
}

/// Every refcount width, with 4 KiB clusters, and again with 512 B clusters where one
/// refcount block covers few clusters (64-bit: 64 clusters, 32 KiB) so QEMU grows the
/// refcount table past its first cluster.
#[test]
fn refcount_widths() {
    let mut variants = Vec::new();
    for bits in [1, 2, 4, 8, 16, 32, 64] {
        variants.push(std_variant(
            &format!("refcount_bits_{bits}"),
            &format!("refcount_bits={bits},cluster_size=4k"),
            4 * K,
            true,
        ));
        let mut v = std_variant(
            &format!("refcount_bits_{bits}_512"),
            &format!("refcount_bits={bits},cluster_size=512"),
            512,
            true,
        );
        // Enough host clusters (> 2 MiB) to need a second refcount-table cluster at 64 bits.
        v.io.push(format!("write -P 0x5c {} {}", M + 3, 2 * M));
        variants.push(v);
    }
    run_variants(&variants);
}

#[test]
fn compat_versions() {
    run_variants(&[
        std_variant("compat_0.10", "compat=0.10", 64 * K, true),
        std_variant("compat_0.10_4k", "compat=0.10,cluster_size=4k", 4 * K, true),
        std_variant("compat_1.1", "compat=1.1", 64 * K, true),
    ]);
}

#[test]
fn compression_types() {
    let mut variants = Vec::new();
    for ct in ["zlib", "zstd"] {
        for (c, cs) in [(64 * K, "64k"), (4 * K, "4k")] {
            // Compressed by qemu-img convert -c, then written by qemu-io (compressed writes,
            // overwrites of compressed clusters, zeroes and discards).
            let size = std_size(c);
            let mut v = Variant::new(
                format!("convert_c_{ct}_{cs}"),
                format!("compression_type={ct},cluster_size={cs}"),
                size,
                vec![
                    format!("write -c -P 0x5a {} {}", free_area(c, size), 2 * c),
                    format!("write -P 0x5b {} {}", 3 * c - 9, 20),
                    format!("write -z {} {}", 5 * c + 3, c),
                    format!("discard {} {}", 8 * c, c),
                    format!("write -z {} {}", 9 * c, c),
                ],
            );
            v.convert_c = Some((format!("cluster_size={cs}"), workload(c, size, false)));
            variants.push(v);
            // Compressed writes by qemu-io on a fresh image of that type.
            variants.push(std_variant(
                &format!("write_c_{ct}_{cs}"),
                &format!("compression_type={ct},cluster_size={cs}"),
                c,
                true,
            ));
        }
    }
    // Compressed clusters of 512 B and 2 MiB clusters.
    variants.push(std_variant(
        "write_c_zstd_512",
        "compression_type=zstd,cluster_size=512",
        512,
        true,
    ));
    variants.push(std_variant(
        "write_c_zstd_2M",
        "compression_type=zstd,cluster_size=2M",
        2 * M,
        true,
    ));
    run_variants(&variants);
}

/// Subcluster-granular workload for extended L2 (32 subclusters per cluster).
fn subcluster_workload(c: u64) -> Vec<String> {
    let s = c / 32;
    vec![
        format!("write -P 0x21 {} {}", s, s),
        format!("write -P 0x22 {} {}", 3 * s + 5, 2 * s),
        format!("write -z {} {}", 8 * s, 3 * s),
        format!("write -P 0x23 {} {}", c + 31 * s, 2 * s),
        format!("write -z {} {}", 2 * c + s + 1, s + 7),
        format!("write -P 0x24 {} {}", 3 * c, c),
        format!("write -z {} {}", 3 * c + 4 * s, 4 * s),
        format!("discard {} {}", 3 * c + 16 * s, 8 * s),
        format!("write -z -u {} {}", 3 * c + 30 * s, 2 * s),
        format!("write -P 0x25 {} {}", 4 * c + 17, 1),
        format!("write -c -P 0x26 {} {}", 5 * c, c),
        format!("write -P 0x27 {} {}", 5 * c + 9 * s + 1, s),
        format!("write -z {} {}", 6 * c, 16 * s),
        format!("write -P 0x28 {} {}", 6 * c + 16 * s, s),
    ]
}

#[test]
fn extended_l2() {
    let mut sub32 = std_variant(
        "extended_l2_32k",
        "extended_l2=on,cluster_size=32k",
        32 * K,
        true,
    );
    sub32.io.extend(
        subcluster_workload(32 * K)
            .into_iter()
            .map(|c| shift_cmd(&c, 40 * 32 * K)),
    );
    let mut sub64 = std_variant(
        "extended_l2_64k",
        "extended_l2=on,cluster_size=64k",
        64 * K,
        true,
    );
    sub64.io.extend(
        subcluster_workload(64 * K)
            .into_iter()
            .map(|c| shift_cmd(&c, 20 * 64 * K)),
    );
    let mut sub2m_io = subcluster_workload(2 * M);
    sub2m_io.push(format!("write -P 0x29 {} {}", 16 * M - 3000, 3000));
    let sub2m = Variant::new(
        "extended_l2_2M_subclusters",
        "extended_l2=on,cluster_size=2M",
        16 * M,
        sub2m_io,
    );
    run_variants(&[
        sub32,
        sub64,
        sub2m,
        std_variant(
            "extended_l2_2M",
            "extended_l2=on,cluster_size=2M",
            2 * M,
            true,
        ),
        std_variant(
            "extended_l2_16k_zstd_refcount_2",
            "extended_l2=on,cluster_size=16k,compression_type=zstd,refcount_bits=2",
            16 * K,
            true,
        ),
    ]);
}

/// Move the offset (the next-to-last word) of a qemu-io command by `by` bytes.
fn shift_cmd(cmd: &str, by: u64) -> String {
    let mut words: Vec<String> = cmd.split(' ').map(str::to_string).collect();
    let n = words.len();
    let off: u64 = words[n - 2].parse().unwrap();
    words[n - 2] = (off + by).to_string();
    words.join(" ")
}

#[test]
fn odd_virtual_sizes() {
    let size = 5 * M + 1536;
    let io = |c: u64| {
        let mut w = workload(c, size, true);
        w.push(format!("write -P 0xcd {} {}", size - 3 * 512, 3 * 512));
        w.push(format!("write -z {} 512", size - 512));
        w
    };
    run_variants(&[
        Variant::new("size_5M+1536_64k", "cluster_size=64k", size, io(64 * K)),
        Variant::new("size_5M+1536_4k", "cluster_size=4k", size, io(4 * K)),
        Variant::new(
            "size_5M+1536_64k_v2",
            "cluster_size=64k,compat=0.10",
            size,
            io(64 * K),
        ),
        Variant::new(
            "size_5M+1536_32k_extl2",
            "cluster_size=32k,extended_l2=on",
            size,
            io(32 * K),
        ),
        Variant::new("size_1536_empty", "", 1536, vec![]),
        Variant::new(
            "size_1536_written",
            "cluster_size=4k",
            1536,
            vec!["write -P 7 3 1000".into(), "write -z 1024 512".into()],
        ),
    ]);
}

#[test]
fn lazy_refcounts_clean() {
    run_variants(&[
        std_variant("lazy_refcounts", "lazy_refcounts=on", 64 * K, true),
        std_variant(
            "lazy_refcounts_4k_refcount_1",
            "lazy_refcounts=on,cluster_size=4k,refcount_bits=1",
            4 * K,
            true,
        ),
    ]);
}

/// `qemu-io ... -c abort` leaves a lazy-refcounts image with the dirty bit set and refcounts
/// not updated; a read-only open must still read it (without repairing it).
#[test]
fn lazy_refcounts_dirty() {
    let dir = tempfile::tempdir().unwrap();
    let mut errors = Vec::new();
    for (name, opts, c) in [
        ("dirty_64k", "lazy_refcounts=on", 64 * K),
        ("dirty_4k", "lazy_refcounts=on,cluster_size=4k", 4 * K),
    ] {
        let v = std_variant(name, opts, c, true);
        let img = v.build(dir.path());
        let p = img.to_str().unwrap();
        let mut args = vec!["-f", "qcow2"];
        let cmds = [
            format!("write -P 0xd1 {} {}", free_area(c, v.size) + 5, 2 * c),
            format!("write -c -P 0xd2 {} {}", free_area(c, v.size) + 4 * c, c),
            format!("write -z {} {}", 5, c),
            format!("discard {} {}", 16 * c, c),
            "abort".to_string(),
        ];
        for c in &cmds {
            args.extend(["-c", c.as_str()]);
        }
        args.push(p);
        let out = Command::new("qemu-io").args(&args).output().unwrap();
        assert!(!out.status.success(), "qemu-io abort exited cleanly");
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(!text.contains("failed"), "{name}: qemu-io: {text}");
        let dirty = || {
            let info = common::run("qemu-img", &["info", "--output=json", "-U", p]);
            let v: serde_json::Value = serde_json::from_str(&info).unwrap();
            v["dirty-flag"].as_bool().unwrap()
        };
        assert!(dirty(), "{name}: the dirty bit is not set after abort");
        errors.extend(check_image(name, &img));
        assert!(
            dirty(),
            "{name}: the dirty bit was cleared by a read-only check"
        );
    }
    report(errors);
}

/// Images reshaped by `qemu-img amend`, `resize` and `snapshot -a/-d` (moved L1 tables, new
/// refcount structures, expanded zero clusters), written again after each step.
#[test]
fn reshaped_by_qemu_img() {
    let cmd = |args: &[&str]| args.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    let mut variants = Vec::new();
    let mut v = |name: &str, opts: &str, c: u64, compress: bool, after: Vec<Vec<String>>| {
        let mut v = std_variant(name, opts, c, compress);
        let size = v.size;
        v.after = after;
        v.after_io = vec![
            format!("write -s {PAT} {} {}", free_area(c, size) + 3, c + 5),
            format!("write -z {} {}", free_area(c, size) + 2 * c, c),
        ];
        variants.push(v);
    };
    v(
        "amend_refcount_bits_64",
        "cluster_size=4k",
        4 * K,
        true,
        vec![cmd(&["qemu-img", "amend", "-o", "refcount_bits=64", "IMG"])],
    );
    v(
        "amend_refcount_bits_2",
        "cluster_size=512,refcount_bits=16",
        512,
        false,
        vec![cmd(&["qemu-img", "amend", "-o", "refcount_bits=2", "IMG"])],
    );
    v(
        "amend_compat_0.10",
        "cluster_size=64k",
        64 * K,
        true,
        vec![cmd(&["qemu-img", "amend", "-o", "compat=0.10", "IMG"])],
    );
    v(
        "amend_compat_1.1_lazy",
        "cluster_size=64k,compat=0.10",
        64 * K,
        true,
        vec![cmd(&[
            "qemu-img",
            "amend",
            "-o",
            "compat=1.1,lazy_refcounts=on",
            "IMG",
        ])],
    );
    v(
        "resize_grow_512",
        "cluster_size=512",
        512,
        true,
        vec![
            cmd(&["qemu-img", "resize", "IMG", "+3M"]),
            cmd(&["qemu-img", "resize", "IMG", "9437696"]),
        ],
    );
    v(
        "resize_shrink_4k",
        "cluster_size=4k",
        4 * K,
        true,
        vec![cmd(&["qemu-img", "resize", "--shrink", "IMG", "3670528"])],
    );
    v(
        "snapshot_apply_delete",
        "cluster_size=4k",
        4 * K,
        true,
        vec![
            cmd(&["qemu-img", "snapshot", "-c", "a", "IMG"]),
            cmd(&["qemu-img", "snapshot", "-c", "b", "IMG"]),
            cmd(&["qemu-img", "snapshot", "-a", "a", "IMG"]),
            cmd(&["qemu-img", "snapshot", "-d", "b", "IMG"]),
        ],
    );
    run_variants(&variants);
}

// ---------------------------------------------------------------------------------------------
// Backing chains

/// A 3-deep chain with mixed cluster sizes and relative names: top (64k) over middle (4k)
/// over a raw base that is shorter than the overlays. Created from inside the tempdir with
/// relative names, read from another working directory.
#[test]
fn backing_chain_raw_base() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    std::fs::create_dir(d.join("sub")).unwrap();
    // base.raw: 3 MiB + 512, patterned.
    let base_size = 3 * M + 512;
    run_in(
        d,
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "raw",
            "sub/base.raw",
            &base_size.to_string(),
        ],
    );
    pattern_file(d);
    run_in(
        d,
        "qemu-io",
        &[
            "-f",
            "raw",
            "-c",
            "write -s mixed.pat 0 3M",
            "-c",
            "write -P 0xb2 1000 3000",
            "-c",
            "write -P 0xb3 3145728 512",
            "sub/base.raw",
        ],
    );
    // middle (4k clusters, 5 MiB) in sub/, backing "base.raw" (relative to sub/).
    run_in(
        d,
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "cluster_size=4k",
            "-b",
            "base.raw",
            "-F",
            "raw",
            "sub/middle.qcow2",
            "5M",
        ],
    );
    qemu_io(
        d,
        "sub/middle.qcow2",
        &[
            format!("write -s {PAT} 4096 8192"),
            "write -P 0xc2 10001 5000".into(),
            "write -z 65536 65536".into(),
            "discard 131072 8192".into(),
            format!("write -c -s {PAT} 1048576 8192"),
            "write -P 0xc4 3144000 5000".into(),
            "write -z 2097152 4096".into(),
            "write -P 0xc5 4194304 4096".into(),
        ],
    );
    // top (64k clusters, 6 MiB) in d, backing "sub/middle.qcow2".
    run_in(
        d,
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "cluster_size=64k",
            "-b",
            "sub/middle.qcow2",
            "-F",
            "qcow2",
            "top.qcow2",
            "6M",
        ],
    );
    qemu_io(
        d,
        "top.qcow2",
        &[
            "write -P 0xd1 7 100".into(),
            format!("write -s {PAT} 70000 1000"),
            "write -z 196608 65536".into(),
            "discard 2097152 65536".into(),
            format!("write -c -s {PAT} 2162688 65536"),
            "write -P 0xd4 3145000 2000".into(),
            "write -z 1048576 4096".into(),
            "write -P 0xd5 6291000 456".into(),
        ],
    );
    let mut errors = Vec::new();
    for img in ["sub/base.raw", "sub/middle.qcow2", "top.qcow2"] {
        if img.ends_with(".qcow2") {
            errors.extend(check_image(img, &d.join(img)));
        }
    }
    report(errors);
}

/// A qcow2 base in a chain (v2 overlay over v3 base over v3 base) with compressed and zero
/// clusters at every level, and an overlay larger than its backing file.
#[test]
fn backing_chain_qcow2_base() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    run_in(
        d,
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "cluster_size=512",
            "base.qcow2",
            "2M",
        ],
    );
    qemu_io(d, "base.qcow2", &workload_small(0xa0));
    run_in(
        d,
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "cluster_size=2M,compression_type=zstd",
            "-b",
            "base.qcow2",
            "-F",
            "qcow2",
            "mid.qcow2",
            "4M",
        ],
    );
    qemu_io(
        d,
        "mid.qcow2",
        &[
            "write -P 0xb1 1000 1000".into(),
            "write -c -P 0xb2 2097152 2097152".into(),
        ],
    );
    run_in(
        d,
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "compat=0.10,cluster_size=4k",
            "-b",
            "mid.qcow2",
            "-F",
            "qcow2",
            "top.qcow2",
            "5M",
        ],
    );
    qemu_io(
        d,
        "top.qcow2",
        &[
            "write -P 0xc1 3 5000".into(),
            "write -z 8192 4096".into(),
            "discard 16384 8192".into(),
            "write -c -P 0xc2 32768 8192".into(),
            "write -P 0xc3 2097000 1000".into(),
            "write -P 0xc4 4194300 10000".into(),
        ],
    );
    let mut errors = Vec::new();
    for img in ["base.qcow2", "mid.qcow2", "top.qcow2"] {
        errors.extend(check_image(img, &d.join(img)));
    }
    report(errors);
}

/// An overlay over a qcow2 base that was shrunk (`resize --shrink`) to a size that is not a
/// multiple of its cluster size, leaving stale data in its last cluster past the end: the
/// overlay reads zeros there, not the stale bytes.
#[test]
fn backing_shrunk_base() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    run_in(
        d,
        "qemu-img",
        &["create", "-q", "-f", "qcow2", "base.qcow2", "2M"],
    );
    qemu_io(d, "base.qcow2", &[format!("write -s {PAT} 0 2M")]);
    run_in(
        d,
        "qemu-img",
        &["resize", "-q", "--shrink", "base.qcow2", "1049088"],
    );
    run_in(
        d,
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "cluster_size=4k",
            "-b",
            "base.qcow2",
            "-F",
            "qcow2",
            "top.qcow2",
            "3M",
        ],
    );
    qemu_io(
        d,
        "top.qcow2",
        &[
            "write -P 8 1048000 600".into(),
            "write -P 9 1052672 4096".into(),
        ],
    );
    report(check_image("shrunk_base_overlay", &d.join("top.qcow2")));
}

/// A raw file whose size is not a multiple of 512: QEMU rounds a raw image's size up to 512
/// bytes and reports the bytes past the end of the file as a zero extent of the raw image
/// (`qemu-img map`: `present, zero, depth of the raw layer, offset`); `qemu-img convert`
/// writes the rounded size. Checked on the raw file itself and through an overlay.
#[test]
fn raw_of_odd_byte_size() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    pattern_file(d);
    let mut data = std::fs::read(d.join(PAT)).unwrap();
    data.truncate(1_000_100);
    std::fs::write(d.join("base.raw"), &data).unwrap();
    run_in(
        d,
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            "base.raw",
            "-F",
            "raw",
            "top.qcow2",
            "2M",
        ],
    );
    qemu_io(d, "top.qcow2", &["write -P 3 4096 4096".into()]);
    let mut errors = Vec::new();
    let raw = d.join("base.raw");
    let want = common::qemu_raw(&raw);
    if let Err(e) = check_convert(&raw, &want) {
        errors.push(format!("base.raw: qcow2 convert -O raw: {e}"));
    }
    match check_map(&raw) {
        Ok(MapOutcome::Same) => {}
        Ok(MapOutcome::KnownHostHoles(e)) | Err(e) => {
            errors.push(format!("base.raw: qcow2 map: {e}"))
        }
    }
    errors.extend(check_image("overlay_over_odd_raw", &d.join("top.qcow2")));
    report(errors);
}

/// A small mixed workload for a 2 MiB image with pattern bytes starting at `p`.
fn workload_small(p: u8) -> Vec<String> {
    vec![
        format!("write -s {PAT} 0 100000"),
        format!("write -P {} 512 513", p + 1),
        "write -z 4096 4096".to_string(),
        "discard 20480 4096".to_string(),
        format!("write -c -s {PAT} 131072 8192"),
        format!("write -c -P {} 139264 4096", p + 2),
        format!("write -P {} 1048000 5000", p + 3),
        "write -z -u 1050000 3000".to_string(),
    ]
}

/// v2 images with a backing file (an implementation refused them): discard and write -z on
/// v2 overlays, where no zero flag exists.
#[test]
fn v2_with_backing() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    run_in(
        d,
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "compat=0.10",
            "base.qcow2",
            "4M",
        ],
    );
    qemu_io(d, "base.qcow2", &["write -P 0x61 0 4M".into()]);
    run_in(
        d,
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "compat=0.10",
            "-b",
            "base.qcow2",
            "-F",
            "qcow2",
            "top.qcow2",
            "4M",
        ],
    );
    qemu_io(
        d,
        "top.qcow2",
        &[
            "write -P 0x62 100 1000".into(),
            "write -z 131072 65536".into(),
            "write -z 300000 1000".into(),
            "write -c -P 0x63 1048576 65536".into(),
            "write -P 0x64 2097152 65536".into(),
            "discard 2097152 65536".into(),
        ],
    );
    report(check_image("v2_overlay", &d.join("top.qcow2")));
}

// ---------------------------------------------------------------------------------------------
// Other image kinds

/// External data files, with and without `data_file_raw=on`, with relative names.
#[test]
fn external_data_file() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let mut errors = Vec::new();
    // A backing file for the overlay with a data file (data_file_raw=on excludes backing).
    run_in(
        d,
        "qemu-img",
        &["create", "-q", "-f", "qcow2", "dfbase.qcow2", "5M"],
    );
    qemu_io(d, "dfbase.qcow2", &[format!("write -s {PAT} 0 5M")]);
    for (name, extra, c) in [
        (
            "data_file_backing",
            ",backing_file=dfbase.qcow2,backing_fmt=qcow2",
            64 * K,
        ),
        ("data_file", "", 64 * K),
        ("data_file_raw", ",data_file_raw=on", 64 * K),
        ("data_file_4k", ",cluster_size=4k", 4 * K),
        (
            "data_file_raw_extl2",
            ",data_file_raw=on,extended_l2=on",
            64 * K,
        ),
    ] {
        let size = std_size(c);
        let v = Variant::new(
            name,
            format!(
                "data_file={}{extra}",
                d.join(format!("{name}.data")).display()
            ),
            size,
            workload(c, size, false),
        );
        let img = v.build(d);
        errors.extend(check_image(name, &img));
        if extra.contains("data_file_raw=on") {
            // The data file itself is the disk content.
            let mut data = std::fs::read(d.join(format!("{name}.data"))).unwrap();
            data.resize(size as usize, 0);
            if let Some(e) = diff(&data, &common::qemu_raw(&img), 0) {
                errors.push(format!(
                    "{name}: raw data file differs from the content: {e}"
                ));
            }
        }
    }
    report(errors);
}

#[test]
fn preallocated() {
    let mut variants = Vec::new();
    for mode in ["metadata", "falloc", "full"] {
        for (c, cs) in [(64 * K, "64k"), (4 * K, "4k")] {
            // QEMU refuses compressed writes over allocated clusters.
            variants.push(std_variant(
                &format!("prealloc_{mode}_{cs}"),
                &format!("preallocation={mode},cluster_size={cs}"),
                c,
                false,
            ));
        }
    }
    variants.push(std_variant(
        "prealloc_metadata_extl2",
        "preallocation=metadata,extended_l2=on",
        64 * K,
        false,
    ));
    variants.push(std_variant(
        "prealloc_metadata_v2",
        "preallocation=metadata,compat=0.10",
        64 * K,
        false,
    ));
    variants.push(Variant::new(
        "prealloc_metadata_unwritten",
        "preallocation=metadata",
        3 * M,
        vec![],
    ));
    run_variants(&variants);
}

/// The active layer of an image with internal snapshots, after writes that COW clusters
/// shared with the snapshots (including compressed ones).
#[test]
fn internal_snapshots() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let mut errors = Vec::new();
    for (name, opts, c) in [
        ("snapshot_64k", "cluster_size=64k", 64 * K),
        (
            "snapshot_4k_refcount_4",
            "cluster_size=4k,refcount_bits=4",
            4 * K,
        ),
        ("snapshot_v2", "compat=0.10", 64 * K),
    ] {
        let v = std_variant(name, opts, c, true);
        let img = v.build(d);
        let p = img.to_str().unwrap();
        common::run("qemu-img", &["snapshot", "-c", "one", p]);
        qemu_io(
            d,
            p,
            &[
                format!("write -P 0xe1 {} {}", c / 2, c),
                format!("write -P 0xe2 {} {}", 10 * c + 3, 5),
                format!("write -z {} {}", 16 * c, c),
                format!("discard {} {}", 3 * c, c),
            ],
        );
        common::run("qemu-img", &["snapshot", "-c", "two", p]);
        qemu_io(d, p, &[format!("write -P 0xe3 {} {}", 2 * c + 1, 2 * c)]);
        errors.extend(check_image(name, &img));
    }
    report(errors);
}

#[test]
fn empty_images() {
    run_variants(&[
        Variant::new("empty_0", "", 0, vec![]),
        Variant::new("empty_0_v2", "compat=0.10", 0, vec![]),
        Variant::new("empty_4M", "", 4 * M, vec![]),
        Variant::new("empty_4M_512", "cluster_size=512", 4 * M, vec![]),
        Variant::new("empty_4M_extl2", "extended_l2=on", 4 * M, vec![]),
        Variant::new("empty_4M_2M", "cluster_size=2M", 4 * M, vec![]),
        Variant::new(
            "discarded",
            "",
            4 * M,
            vec!["write -P 1 0 4M".into(), "discard 0 4M".into()],
        ),
    ]);
}

/// A 1 TiB sparse image: a few regions through `read_at`, the whole map, and the converted
/// raw file compared extent by extent (only where either side holds data).
#[test]
fn large_sparse() {
    const T: u64 = 1 << 40;
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let mut errors = Vec::new();
    for (name, opts) in [
        ("sparse_1T", "cluster_size=64k"),
        ("sparse_1T_2M_extl2", "cluster_size=2M,extended_l2=on"),
    ] {
        let v = Variant::new(
            name,
            opts,
            T,
            vec![
                "write -P 0x71 0 65536".into(),
                format!("write -P 0x72 {} {}", T / 2 - 3, 100 * K),
                format!("write -z {} {}", T / 4, 4 * M),
                format!("write -c -P 0x73 {} {}", 3 * T / 4, 2 * M),
                format!("write -P 0x74 {} {}", T - 5000, 5000),
                format!("write -P 0x75 {} {}", 600 * (1u64 << 30) + 12345, 3 * M),
            ],
        );
        let img = v.build(d);
        let p = img.to_str().unwrap();
        // Reference regions: qemu-io reads them into our comparison via qemu-img convert of
        // the whole disk (sparse, fast), then pread.
        let ref_raw = d.join(format!("{name}.ref.raw"));
        let our_raw = d.join(format!("{name}.ours.raw"));
        common::run(
            "qemu-img",
            &["convert", "-O", "raw", p, ref_raw.to_str().unwrap()],
        );
        let regions = [
            (0, 256 * K),
            (T / 2 - 64 * K, 256 * K),
            (T / 4 - 1, 4 * M + 2),
            (3 * T / 4 - 7, 2 * M + 14),
            (T - 3 * M, 3 * M),
            (600 * (1u64 << 30), 4 * M),
            (T / 3, 64 * K + 1),
        ];
        let reference = std::fs::File::open(&ref_raw).unwrap();
        let read_ref = |off: u64, len: u64| {
            let mut b = vec![0u8; len as usize];
            reference.read_exact_at(&mut b, off).unwrap();
            b
        };
        let lib = rt().block_on(async {
            let image = Image::open(&img, &OpenOptions::new())
                .await
                .map_err(|e| format!("open: {e}"))?;
            for &(off, len) in &regions {
                let mut buf = vec![0xeeu8; len as usize];
                image
                    .read_at(&mut buf, off)
                    .await
                    .map_err(|e| format!("read_at({off}, {len}): {e}"))?;
                if let Some(e) = diff(&buf, &read_ref(off, len), off) {
                    return Err(format!("read_at({off}, {len}): {e}"));
                }
            }
            image.close().await.map_err(|e| format!("close: {e}"))
        });
        if let Err(e) = lib {
            errors.push(format!("{name}: library read: {e}"));
        }
        match qcow2_in(
            &elsewhere(),
            &["convert", "-O", "raw", p, our_raw.to_str().unwrap()],
        ) {
            Err(e) => errors.push(format!("{name}: {e}")),
            Ok(_) => {
                if let Err(e) = sparse_equal(&our_raw, &ref_raw) {
                    errors.push(format!("{name}: qcow2 convert -O raw: {e}"));
                }
            }
        }
        match check_map(&img) {
            Ok(MapOutcome::Same) => {}
            Ok(MapOutcome::KnownHostHoles(d)) => {
                errors.push(format!("{name}: map differs in host-hole zero flags: {d}"))
            }
            Err(e) => errors.push(format!("{name}: qcow2 map --output=json: {e}")),
        }
        std::fs::remove_file(&our_raw).ok();
        std::fs::remove_file(&ref_raw).ok();
    }
    report(errors);
}

/// The data segments (`SEEK_DATA`/`SEEK_HOLE`) of a sparse file.
fn data_segments(f: &std::fs::File) -> Vec<(u64, u64)> {
    use std::os::fd::AsRawFd;
    let len = f.metadata().unwrap().len();
    let fd = f.as_raw_fd();
    let mut segs = Vec::new();
    let mut pos = 0i64;
    while (pos as u64) < len {
        // SAFETY: lseek on a valid descriptor has no memory effects.
        let data = unsafe { libc::lseek(fd, pos, libc::SEEK_DATA) };
        if data < 0 {
            break;
        }
        // SAFETY: as above.
        let hole = unsafe { libc::lseek(fd, data, libc::SEEK_HOLE) };
        segs.push((data as u64, hole as u64));
        pos = hole;
    }
    segs
}

/// Two (sparse) files have the same size and content; only the ranges where either holds
/// data are read.
fn sparse_equal(a: &Path, b: &Path) -> Result<(), String> {
    let (fa, fb) = (
        std::fs::File::open(a).unwrap(),
        std::fs::File::open(b).unwrap(),
    );
    let (la, lb) = (fa.metadata().unwrap().len(), fb.metadata().unwrap().len());
    if la != lb {
        return Err(format!("length {la} instead of {lb}"));
    }
    let mut segs = data_segments(&fa);
    segs.extend(data_segments(&fb));
    segs.sort_unstable();
    let mut pos = 0u64;
    for (s, e) in segs {
        let s = s.max(pos);
        let mut off = s;
        while off < e {
            let n = (e - off).min(4 * M);
            let mut x = vec![0u8; n as usize];
            let mut y = vec![0u8; n as usize];
            fa.read_exact_at(&mut x, off).unwrap();
            fb.read_exact_at(&mut y, off).unwrap();
            if let Some(d) = diff(&x, &y, off) {
                return Err(d);
            }
            off += n;
        }
        pos = pos.max(e);
    }
    Ok(())
}

/// The images whose maps differ only by the known host-hole difference (tolerated, and printed,
/// by the other tests), compared strictly: run with `--ignored` once the engine's map asks the
/// file system only when QEMU does (metadata preallocation detected).
#[test]
fn map_strict_host_holes() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let size = std_size(64 * K);
    let variants = [
        Variant::new(
            "partial_write",
            "cluster_size=64k",
            M,
            vec!["write -P 2 100k 20k".into()],
        ),
        Variant::new("falloc", "preallocation=falloc", M, vec![]),
        Variant::new(
            "data_file_raw",
            format!("data_file={},data_file_raw=on", d.join("r.data").display()),
            size,
            workload(64 * K, size, false),
        ),
    ];
    let mut errors = Vec::new();
    for v in &variants {
        let p = v.build(d);
        let p = p.to_str().unwrap();
        let theirs = run_in(d, "qemu-img", &["map", "--output=json", p]);
        match qcow2_in(d, &["map", "--output=json", p]) {
            Ok(ours) if ours == theirs => {}
            Ok(ours) => errors.push(format!("{}:\nours:\n{ours}theirs:\n{theirs}", v.name)),
            Err(e) => errors.push(format!("{}: {e}", v.name)),
        }
    }
    report(errors);
}

// ---------------------------------------------------------------------------------------------
// The checker itself

#[test]
fn map_comparison_classifies_differences() {
    let line = |s: u64, l: u64, zero: bool, off: u64| {
        format!(
            "{{ \"start\": {s}, \"length\": {l}, \"depth\": 0, \"present\": true, \"zero\": {zero}, \"data\": true, \"compressed\": false, \"offset\": {off}}}"
        )
    };
    let theirs = format!("[{}]\n", line(0, 65536, false, 327680));
    assert!(matches!(
        compare_maps(&theirs, &theirs),
        Ok(MapOutcome::Same)
    ));
    let holes = format!(
        "[{},\n{}]\n",
        line(0, 4096, true, 327680),
        line(4096, 61440, false, 331776)
    );
    assert!(matches!(
        compare_maps(&holes, &theirs),
        Ok(MapOutcome::KnownHostHoles(_))
    ));
    let moved = format!("[{}]\n", line(0, 65536, false, 393216));
    assert!(compare_maps(&moved, &theirs).is_err());
    let hole_elsewhere = format!(
        "[{},\n{}]\n",
        line(0, 4096, true, 0),
        line(4096, 61440, false, 331776)
    );
    assert!(compare_maps(&hole_elsewhere, &theirs).is_err());
    assert!(diff(b"abcd", b"abxd", 10).unwrap().contains("offset 12"));
    assert!(diff(b"abc", b"abcd", 0).unwrap().contains("length 3"));
    assert_eq!(diff(b"abc", b"abc", 0), None);
}
