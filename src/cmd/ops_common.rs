//! What commit, rebase and amend share: qemu-img's cache mode names, its progress lines, and
//! showing the library's argument refusals in qemu-img's words.

use std::sync::Arc;

use anyhow::{Result, bail};
use qcow2_engine::ErrorKind;
use qcow2_engine::ops::Progress;

/// qemu-img's `-t`/`-T` cache modes. Commit, rebase and amend always use the page cache, so
/// for them only the name is checked (as qemu-img does first); convert opens files with
/// O_DIRECT for the modes that ask for it ([`cache_direct`]).
const CACHE_MODES: &[&str] = &["none", "writeback", "unsafe", "directsync", "writethrough"];

/// Check a cache mode name; `what` is qemu-img's word for the option in its refusal
/// ("cache" for `-t`, "source cache" for `-T`).
pub fn check_cache(mode: Option<&str>, what: &str) -> Result<()> {
    match mode {
        Some(m) if !CACHE_MODES.contains(&m) => bail!("Invalid {what} option: {m}"),
        _ => Ok(()),
    }
}

/// Whether a (checked) cache mode bypasses the page cache: `none` and `directsync` open the
/// file with O_DIRECT in QEMU.
pub fn cache_direct(mode: Option<&str>) -> bool {
    matches!(mode, Some("none" | "directsync"))
}

/// A progress counter printing qemu-img's `-p` lines (`    (12.50/100%)\r`), or a silent one.
pub fn progress(show: bool) -> Arc<Progress> {
    if !show {
        return Progress::new();
    }
    super::convert::show_progress(true, 0, 1);
    Progress::with_callback(|done, total| super::convert::show_progress(true, done, total))
}

/// End the progress line (qemu-img prints a newline after the last percentage).
pub fn end_progress(show: bool) {
    if show {
        outln!();
    }
}

/// The library's refusals of arguments carry qemu-img's message: print it alone.
pub fn plain(e: qcow2_engine::Error) -> anyhow::Error {
    match e.kind() {
        ErrorKind::InvalidArgument => anyhow::anyhow!("{}", e.what()),
        _ => e.into(),
    }
}
