//! Building the image variants: `qemu-img create`/`convert -c` plus `qemu-io` workloads,
//! and running a table of them through every check.

use crate::common::{self, run_in};

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use super::check::check_image;

pub(super) const K: u64 = 1024;
pub(super) const M: u64 = 1024 * 1024;

// ---------------------------------------------------------------------------------------------
// Building images

/// One image variant: `qemu-img create -f qcow2 -o OPTS IMG SIZE` (or, with `convert_c`, a
/// compressed `qemu-img convert -c` of an image written with `pre_io`), then `qemu-io` with
/// `io`.
#[derive(Debug, Clone)]
pub(super) struct Variant {
    pub(super) name: String,
    /// `-o` options for `qemu-img create` (or `qemu-img convert` with `convert_c`).
    pub(super) opts: String,
    pub(super) size: u64,
    /// With `Some`, the image is `qemu-img convert -c -O qcow2 -o OPTS SRC IMG` where SRC is a
    /// plain qcow2 (with these create options) written with `pre_io`.
    pub(super) convert_c: Option<(String, Vec<String>)>,
    /// `qemu-io -c` commands applied to the image, in order.
    pub(super) io: Vec<String>,
    /// Then these commands (program and arguments; `IMG` stands for the image file), each
    /// followed by `qemu-io` with `after_io` when that is not empty.
    pub(super) after: Vec<Vec<String>>,
    pub(super) after_io: Vec<String>,
}

impl Variant {
    pub(super) fn new(
        name: impl Into<String>,
        opts: impl Into<String>,
        size: u64,
        io: Vec<String>,
    ) -> Self {
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
    pub(super) fn build(&self, dir: &Path) -> PathBuf {
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

/// `qemu-io -f qcow2 -c CMD... IMG` in `dir`; every command must succeed (qemu-io exits 1 if
/// one failed, and prints "failed" on its output).
pub(super) fn qemu_io(dir: &Path, img: &str, cmds: &[String]) {
    if cmds.is_empty() {
        return;
    }
    pattern_file(dir);
    common::qemu_io_in(dir, img, cmds);
}

/// Name of the pattern file (in each image directory) for `qemu-io write -s`: data that
/// differs at every offset (so a read from the wrong place inside a cluster shows) and whose
/// compressibility varies from none to high every few hundred bytes (so compressed clusters
/// have varied sizes, straddle host clusters, and some stay uncompressed).
pub(super) const PAT: &str = "mixed.pat";

/// Create `dir/PAT` if missing.
pub(super) fn pattern_file(dir: &Path) {
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
pub(super) fn workload(c: u64, size: u64, compress: bool) -> Vec<String> {
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
pub(super) fn free_area(c: u64, size: u64) -> u64 {
    let off = (size * 3 / 4) / c * c;
    assert!(off >= 18 * c && off + 8 * c <= size - 1000, "no free area");
    off
}

/// A virtual size that holds the standard workload for cluster size `c`.
pub(super) fn std_size(c: u64) -> u64 {
    (4 * M).max(18 * c + M)
}

/// Build and check every variant; panic listing every failure.
pub(super) fn run_variants(variants: &[Variant]) {
    let dir = tempfile::tempdir().unwrap();
    let mut errors = Vec::new();
    for v in variants {
        let img = v.build(dir.path());
        errors.extend(check_image(&v.name, &img));
        std::fs::remove_file(&img).ok();
    }
    report(errors);
}

pub(super) fn report(errors: Vec<String>) {
    if !errors.is_empty() {
        let mut msg = format!("{} failure(s):\n", errors.len());
        for e in &errors {
            let _ = writeln!(msg, "- {e}");
        }
        panic!("{msg}");
    }
}

/// A standard variant: the workload of its cluster size on a fresh image with `opts`.
pub(super) fn std_variant(name: &str, opts: &str, c: u64, compress: bool) -> Variant {
    let size = std_size(c);
    Variant::new(name, opts, size, workload(c, size, compress))
}
