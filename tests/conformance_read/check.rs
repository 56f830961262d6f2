//! The read-side checks of one image against QEMU: library reads, `qcow2 convert`,
//! `qcow2 info` and `qcow2 map`.

use crate::common::{self, run_in};

use std::path::{Path, PathBuf};
use std::process::Command;

use qcow2_engine::image::{Image, OpenOptions, ReferencePolicy};

use super::map::*;

/// Whether `qcow2 map` equals `qemu-img map`.
pub(super) enum MapOutcome {
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
pub(super) fn check_image(name: &str, img: &Path) -> Vec<String> {
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

pub(super) fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

/// Explain a content difference: the first differing offset and the bytes there.
pub(super) fn diff(got: &[u8], want: &[u8], base: u64) -> Option<String> {
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
pub(super) fn odd_chunks(c: u64, total: u64) -> Vec<(u64, usize)> {
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

pub(super) fn check_library(img: &Path, want: &[u8]) -> Result<(), String> {
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

pub(super) async fn check_library_with(
    img: &Path,
    want: &[u8],
    opts: &OpenOptions,
) -> Result<(), String> {
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
pub(super) fn qcow2_in(cwd: &Path, args: &[&str]) -> Result<String, String> {
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
pub(super) fn elsewhere() -> PathBuf {
    std::env::temp_dir()
}

pub(super) fn check_convert(img: &Path, want: &[u8]) -> Result<(), String> {
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
pub(super) fn check_convert_qcow2(img: &Path) -> Result<(), String> {
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

/// `qcow2 info --output=json` prints exactly what `qemu-img info --output=json` prints.
pub(super) fn check_info(img: &Path) -> Result<(), String> {
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

pub(super) fn check_map(img: &Path) -> Result<MapOutcome, String> {
    let p = img.to_str().unwrap();
    let theirs = run_in(&elsewhere(), "qemu-img", &["map", "--output=json", p]);
    let ours = qcow2_in(&elsewhere(), &["map", "--output=json", p])?;
    compare_maps(&ours, &theirs)
}
