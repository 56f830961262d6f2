//! Output helpers: printing that survives a closed pipe, JSON in qemu-img's layout and
//! human-readable sizes.
//!
//! `qcow2 io -c 'write ...' IMG | head -1` must still finish its writes and close the image
//! when the reader goes away, so nothing here may panic on a failed write (std's `println!`
//! does). The first failed write to stdout (EPIPE, ENOSPC, ...) switches stdout off for the
//! rest of the run; the command carries on and its exit status is unchanged, as with qemu-io.
//! `main.rs` shadows `print!`/`println!`/`eprint!`/`eprintln!` so they cannot creep back in.

use std::fmt;
use std::io::Write;
use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::Result;
use serde::Serialize;

/// Set once a write to stdout failed; later output is dropped.
static STDOUT_GONE: AtomicBool = AtomicBool::new(false);
/// Set once a write to stderr failed.
static STDERR_GONE: AtomicBool = AtomicBool::new(false);

/// Write to stdout; a failure silences stdout instead of panicking.
pub fn write_stdout(args: fmt::Arguments<'_>) {
    write_to(&mut std::io::stdout().lock(), &STDOUT_GONE, args);
}

/// Write to stderr; a failure silences stderr instead of panicking.
pub fn write_stderr(args: fmt::Arguments<'_>) {
    write_to(&mut std::io::stderr().lock(), &STDERR_GONE, args);
}

/// Write `args` to `w` unless `gone`; flush (stdout is line-buffered, and a reader must see
/// progress lines such as `convert -p`'s without a newline); remember a failure in `gone`.
fn write_to(w: &mut impl Write, gone: &AtomicBool, args: fmt::Arguments<'_>) {
    if gone.load(Ordering::Relaxed) {
        return;
    }
    if w.write_fmt(args).and_then(|()| w.flush()).is_err() {
        gone.store(true, Ordering::Relaxed);
    }
}

/// `print!` that never panics (see the module doc).
macro_rules! out {
    ($($arg:tt)*) => { $crate::output::write_stdout(format_args!($($arg)*)) };
}

/// `println!` that never panics (see the module doc).
macro_rules! outln {
    () => { $crate::output::write_stdout(format_args!("\n")) };
    ($($arg:tt)*) => {
        $crate::output::write_stdout(format_args!("{}\n", format_args!($($arg)*)))
    };
}

/// `eprintln!` that never panics (see the module doc).
macro_rules! errln {
    () => { $crate::output::write_stderr(format_args!("\n")) };
    ($($arg:tt)*) => {
        $crate::output::write_stderr(format_args!("{}\n", format_args!($($arg)*)))
    };
}

/// Print `value` as JSON the way qemu-img lays it out, streamed to stdout (a snapshot table
/// alone may hold 64 MiB of names: never build the whole text in memory).
pub fn print_json<T: Serialize>(value: &T) -> Result<()> {
    let mut out = std::io::BufWriter::new(StdoutSink);
    let mut ser = serde_json::Serializer::with_formatter(&mut out, QemuJson::default());
    value.serialize(&mut ser)?;
    out.write_all(b"\n")?;
    out.flush()?;
    Ok(())
}

/// stdout as an `io::Write` that never fails: a closed stdout swallows the rest (see the
/// module doc), so serializing simply runs to its end.
struct StdoutSink;

impl Write for StdoutSink {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if !STDOUT_GONE.load(Ordering::Relaxed) && std::io::stdout().write_all(buf).is_err() {
            STDOUT_GONE.store(true, Ordering::Relaxed);
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        if !STDOUT_GONE.load(Ordering::Relaxed) && std::io::stdout().flush().is_err() {
            STDOUT_GONE.store(true, Ordering::Relaxed);
        }
        Ok(())
    }
}

/// serde_json's pretty layout with qemu-img's two differences: 4-space indents, and empty
/// arrays and objects written over two lines (`[` then an indented `]`).
#[derive(Default)]
struct QemuJson {
    /// Nesting depth: the indent of the current line.
    depth: usize,
}

impl QemuJson {
    fn newline_indent<W: ?Sized + Write>(&self, w: &mut W) -> std::io::Result<()> {
        w.write_all(b"\n")?;
        for _ in 0..self.depth {
            w.write_all(b"    ")?;
        }
        Ok(())
    }

    fn open<W: ?Sized + Write>(&mut self, w: &mut W, bracket: &[u8]) -> std::io::Result<()> {
        self.depth += 1;
        w.write_all(bracket)
    }

    fn close<W: ?Sized + Write>(&mut self, w: &mut W, bracket: &[u8]) -> std::io::Result<()> {
        self.depth -= 1;
        // Unlike serde_json, an empty container also gets its closing bracket on a new line.
        self.newline_indent(w)?;
        w.write_all(bracket)
    }

    fn element<W: ?Sized + Write>(&mut self, w: &mut W, first: bool) -> std::io::Result<()> {
        if !first {
            w.write_all(b",")?;
        }
        self.newline_indent(w)
    }
}

impl serde_json::ser::Formatter for QemuJson {
    fn begin_array<W: ?Sized + Write>(&mut self, w: &mut W) -> std::io::Result<()> {
        self.open(w, b"[")
    }

    fn end_array<W: ?Sized + Write>(&mut self, w: &mut W) -> std::io::Result<()> {
        self.close(w, b"]")
    }

    fn begin_array_value<W: ?Sized + Write>(
        &mut self,
        w: &mut W,
        first: bool,
    ) -> std::io::Result<()> {
        self.element(w, first)
    }

    fn begin_object<W: ?Sized + Write>(&mut self, w: &mut W) -> std::io::Result<()> {
        self.open(w, b"{")
    }

    fn end_object<W: ?Sized + Write>(&mut self, w: &mut W) -> std::io::Result<()> {
        self.close(w, b"}")
    }

    fn begin_object_key<W: ?Sized + Write>(
        &mut self,
        w: &mut W,
        first: bool,
    ) -> std::io::Result<()> {
        self.element(w, first)
    }

    fn begin_object_value<W: ?Sized + Write>(&mut self, w: &mut W) -> std::io::Result<()> {
        w.write_all(b": ")
    }
}

/// The error and its causes joined by `: `, as qemu-img prints them: each error in the chain
/// shows only its own context (the library's `Display` leaves the cause to `source()`).
pub fn error_text(e: &anyhow::Error) -> String {
    let parts: Vec<String> = e.chain().map(ToString::to_string).collect();
    parts.join(": ")
}

/// Format `v` with three significant digits and no trailing zeros (C's `%.3g` for the
/// range 0.9 ≤ v < 1000 used by sizes).
fn three_digits(v: f64) -> String {
    let decimals = if v >= 100.0 {
        0
    } else if v >= 10.0 {
        1
    } else if v >= 1.0 {
        2
    } else {
        3
    };
    let s = format!("{v:.decimals$}");
    match s.contains('.') {
        true => s.trim_end_matches('0').trim_end_matches('.').to_string(),
        false => s,
    }
}

const UNITS: [&str; 7] = ["", "Ki", "Mi", "Gi", "Ti", "Pi", "Ei"];

/// A size the way qemu-img prints it in human output: `0 B`, `512 B`, `64 KiB`, `1.5 GiB`.
/// The next unit is used from 1000 of the smaller one, so there are at most three digits.
pub fn size_to_str(bytes: u64) -> String {
    let mut unit = 0;
    // Switch up when the value would print as 1000 or more in the current unit.
    while unit + 1 < UNITS.len()
        && bytes as f64 >= 1000.0 / 1024.0 * (1u64 << (10 * (unit + 1))) as f64
    {
        unit += 1;
    }
    let v = bytes as f64 / (1u64 << (10 * unit)) as f64;
    format!("{} {}B", three_digits(v), UNITS[unit])
}

/// A size the way qemu-io prints it: `512 bytes`, `4 KiB`, `1.500 MiB`.
pub fn io_size(bytes: u64) -> String {
    if bytes < 1024 {
        return format!("{bytes} bytes");
    }
    let mut unit = 1;
    while unit + 1 < UNITS.len() && bytes >= 1u64 << (10 * (unit + 1)) {
        unit += 1;
    }
    let s = format!("{:.3}", bytes as f64 / (1u64 << (10 * unit)) as f64);
    format!("{} {}B", s.strip_suffix(".000").unwrap_or(&s), UNITS[unit])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn qemu_img_sizes() {
        assert_eq!(size_to_str(0), "0 B");
        assert_eq!(size_to_str(512), "512 B");
        assert_eq!(size_to_str(999), "999 B");
        assert_eq!(size_to_str(1000), "0.977 KiB");
        assert_eq!(size_to_str(339968), "332 KiB");
        assert_eq!(size_to_str(459264), "448 KiB");
        assert_eq!(size_to_str(1 << 20), "1 MiB");
        assert_eq!(size_to_str(3 << 29), "1.5 GiB");
    }

    #[test]
    fn qemu_io_sizes() {
        assert_eq!(io_size(32), "32 bytes");
        assert_eq!(io_size(4096), "4 KiB");
        assert_eq!(io_size(128 << 10), "128 KiB");
        assert_eq!(io_size(1536 << 10), "1.500 MiB");
    }
}
