//! Image format probing: which format a file's first bytes announce.
//!
//! The same rules as qemu-img's probing (QEMU's `block/*.c` `*_probe` functions), so that a
//! file QEMU would open as vmdk, vhdx, ... is never mistaken for a raw disk here: treating a
//! container as raw would show (and copy) its metadata as disk content. Only `qcow2` and `raw`
//! are readable by this crate; [`probe`] names the others so callers can refuse them clearly.
//!
//! | format    | where                     | what                                              |
//! |-----------|---------------------------|---------------------------------------------------|
//! | qcow2     | 0                         | `QFI\xfb`, version ≥ 2 (big-endian u32 at 4)      |
//! | qcow      | 0                         | `QFI\xfb`, version 1                               |
//! | qed       | 0                         | `QED\0`                                           |
//! | vmdk      | 0                         | `KDMV` or `COWD`, or a text descriptor `version=N` |
//! | vhdx      | 0                         | `vhdxfile`                                        |
//! | vpc       | 0                         | `conectix`                                        |
//! | vdi       | 64                        | 0xbeda107f (little-endian u32)                    |
//! | parallels | 0                         | `WithoutFreeSpace`/`WithouFreSpacExt`, version 2 at 16 (LE u32) |
//! | bochs     | 0, 32, 48, 64             | `Bochs Virtual HD Image`, `Redolog`, `Growing`, version 1 or 2 |
//! | luks      | 0                         | `LUKS\xba\xbe`, version 1 (big-endian u16 at 6)   |
//! | cloop     | 0                         | its shell-script preamble                         |
//! | dmg       | file name                 | ends in `.dmg` (QEMU probes dmg by name only)     |

use crate::{Error, Result};

/// How many leading bytes [`probe`] looks at (QEMU's probe buffer size).
pub const PROBE_LEN: usize = 2048;

/// The format `head` (the first up to [`PROBE_LEN`] bytes of a file named `file_name`)
/// announces: `"qcow2"`, `"raw"` when nothing matches, or the name of a format this crate
/// cannot read (`"vmdk"`, `"luks"`, ...).
pub fn probe(head: &[u8], file_name: Option<&str>) -> &'static str {
    let head = &head[..head.len().min(PROBE_LEN)];
    let by_magic: [(&'static str, Test); 11] = [
        ("qcow2", |h| qcow_version(h).is_some_and(|v| v >= 2)),
        ("qcow", |h| qcow_version(h) == Some(1)),
        ("qed", |h| h.starts_with(b"QED\0")),
        ("vmdk", is_vmdk),
        ("vhdx", |h| h.starts_with(b"vhdxfile")),
        ("vpc", |h| h.starts_with(b"conectix")),
        ("vdi", |h| le32(h, 64) == Some(0xbeda_107f)),
        ("parallels", is_parallels),
        ("bochs", is_bochs),
        ("luks", |h| {
            h.starts_with(b"LUKS\xba\xbe") && be16(h, 6) == Some(1)
        }),
        ("cloop", |h| h.starts_with(CLOOP_PREAMBLE)),
    ];
    if let Some((name, _)) = by_magic.iter().find(|(_, test)| test(head)) {
        return name;
    }
    match file_name {
        Some(n) if n.len() > 4 && n.ends_with(".dmg") => "dmg",
        _ => "raw",
    }
}

/// A probe for one format: does this head carry its magic?
type Test = fn(&[u8]) -> bool;

/// The first line(s) of a cloop image: a shell script that mounts it.
const CLOOP_PREAMBLE: &[u8] =
    b"#!/bin/sh\n#V2.0 Format\nmodprobe cloop file=$0 && mount -r -t iso9660 /dev/cloop $1\n";

/// `format` (a [`probe`] result) if this crate can read it, else an
/// [`ErrorKind::Unsupported`](crate::ErrorKind::Unsupported) error naming it.
pub fn readable(format: &'static str) -> Result<&'static str> {
    match format {
        "qcow2" | "raw" => Ok(format),
        other => Err(Error::unsupported(format!(
            "image format '{other}' is not supported (only qcow2 and raw; \
             use -f raw to read the file as a raw disk)"
        ))),
    }
}

/// Big-endian u16 at `at`, if `h` is long enough.
fn be16(h: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_be_bytes(h.get(at..at + 2)?.try_into().ok()?))
}

/// Little-endian u32 at `at` (vdi, parallels and bochs are little-endian formats).
fn le32(h: &[u8], at: usize) -> Option<u32> {
    let b: [u8; 4] = h.get(at..at + 4)?.try_into().ok()?;
    // The formats probed here store these fields little-endian; qcow2 code never does.
    #[allow(clippy::little_endian_bytes)]
    Some(u32::from_le_bytes(b))
}

/// The version of a qcow/qcow2 header (`QFI\xfb` magic), if `h` has one.
fn qcow_version(h: &[u8]) -> Option<u32> {
    if !h.starts_with(b"QFI\xfb") {
        return None;
    }
    Some(u32::from_be_bytes(h.get(4..8)?.try_into().ok()?))
}

/// A sparse vmdk (`KDMV`, `COWD`) or a vmdk text descriptor: only comment and blank lines
/// before a `version=1|2|3` line.
fn is_vmdk(h: &[u8]) -> bool {
    if h.starts_with(b"KDMV") || h.starts_with(b"COWD") {
        return true;
    }
    for line in h.split(|&b| b == b'\n') {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        if line.starts_with(b"#") || line.iter().all(|&b| b == b' ') {
            continue;
        }
        return matches!(line, b"version=1" | b"version=2" | b"version=3");
    }
    false
}

/// A parallels image: one of its two magics and version 2.
fn is_parallels(h: &[u8]) -> bool {
    (h.starts_with(b"WithoutFreeSpace") || h.starts_with(b"WithouFreSpacExt"))
        && le32(h, 16) == Some(2)
}

/// A bochs growing redolog, version 1 or 2 (the strings are NUL-terminated in the header).
fn is_bochs(h: &[u8]) -> bool {
    h.len() >= 512
        && h.starts_with(b"Bochs Virtual HD Image\0")
        && h[32..].starts_with(b"Redolog\0")
        && h[48..].starts_with(b"Growing\0")
        && matches!(le32(h, 64), Some(0x0001_0000 | 0x0002_0000))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `bytes` at the start of an otherwise zero 2 KiB block.
    fn head(at: usize, bytes: &[u8]) -> Vec<u8> {
        let mut h = vec![0u8; PROBE_LEN];
        h[at..at + bytes.len()].copy_from_slice(bytes);
        h
    }

    #[test]
    fn magics() {
        assert_eq!(probe(&head(0, b"QFI\xfb\0\0\0\x03"), None), "qcow2");
        assert_eq!(probe(&head(0, b"QFI\xfb\0\0\0\x02"), None), "qcow2");
        assert_eq!(probe(&head(0, b"QFI\xfb\0\0\0\x01"), None), "qcow");
        assert_eq!(probe(&head(0, b"QED\0"), None), "qed");
        assert_eq!(probe(&head(0, b"KDMV"), None), "vmdk");
        assert_eq!(probe(&head(0, b"COWD"), None), "vmdk");
        assert_eq!(probe(&head(0, b"vhdxfile"), None), "vhdx");
        assert_eq!(probe(&head(0, b"conectix"), None), "vpc");
        assert_eq!(probe(&head(64, b"\x7f\x10\xda\xbe"), None), "vdi");
        assert_eq!(probe(&head(0, b"LUKS\xba\xbe\0\x01"), None), "luks");
        assert_eq!(probe(CLOOP_PREAMBLE, None), "cloop");
        let mut p = head(0, b"WithoutFreeSpace");
        p[16] = 2;
        assert_eq!(probe(&p, None), "parallels");
        let mut b = head(0, b"Bochs Virtual HD Image\0");
        b[32..40].copy_from_slice(b"Redolog\0");
        b[48..56].copy_from_slice(b"Growing\0");
        b[64..68].copy_from_slice(&[0, 0, 2, 0]);
        assert_eq!(probe(&b, None), "bochs");
    }

    #[test]
    fn near_misses_are_raw() {
        assert_eq!(probe(&[], None), "raw");
        assert_eq!(probe(b"QFI", None), "raw");
        assert_eq!(probe(&head(0, b"QFI\xfb\0\0\0\0"), None), "raw");
        assert_eq!(probe(&head(0, b"LUKS\xba\xbe\0\x02"), None), "raw");
        assert_eq!(probe(&head(0, b"WithoutFreeSpace"), None), "raw");
        assert_eq!(probe(&head(0, b"Bochs Virtual HD Image\0"), None), "raw");
        assert_eq!(probe(&head(0, b"x.dmg"), Some(".dmg")), "raw");
    }

    #[test]
    fn vmdk_descriptor() {
        let d = b"# Disk DescriptorFile\n\n   \r\nversion=1\nCID=fffffffe\n";
        assert_eq!(probe(d, None), "vmdk");
        assert_eq!(probe(b"# c\r\nversion=3\r\n", None), "vmdk");
        assert_eq!(probe(b"# c\nCID=1\nversion=1\n", None), "raw");
        assert_eq!(probe(b"version=4\n", None), "raw");
    }

    #[test]
    fn dmg_by_name() {
        assert_eq!(probe(&[0; 512], Some("/tmp/disk.dmg")), "dmg");
        assert_eq!(probe(&[0; 512], Some("/tmp/disk.img")), "raw");
    }
}
