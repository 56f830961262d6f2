//! The commands of `qcow2 io`: parsing a qemu-io command line and performing it.

use std::path::Path;
use std::time::Instant;

use anyhow::{Result, bail};

use crate::args::{parse_pattern, parse_size};
use crate::disk::Disk;
use crate::output::{error_text, io_size};

/// Largest read or write buffer one command may ask for.
const MAX_BUFFER: u64 = 1 << 30;

/// One parsed command.
#[derive(Debug)]
pub enum Op {
    /// Run now and wait.
    Sync(Request),
    /// Start concurrently.
    Aio(Request),
    /// Wait for all aio requests, then flush.
    AioFlush,
    /// qemu-io's `map`.
    Map,
    /// qemu-io's `info`.
    Info,
}

/// A data request.
#[derive(Debug)]
pub enum Request {
    Read {
        off: u64,
        len: u64,
        pattern: Option<u8>,
        verbose: bool,
        quiet: bool,
    },
    Write {
        off: u64,
        len: u64,
        pattern: u8,
        zero: bool,
        unmap: bool,
        /// `-c`: write compressed.
        compress: bool,
        quiet: bool,
    },
    Discard {
        off: u64,
        len: u64,
        quiet: bool,
    },
    Flush,
}

/// Flags given to a command: single letters, `-P` with a value.
#[derive(Debug, Default)]
struct Flags {
    letters: String,
    pattern: Option<u8>,
    positional: Vec<String>,
}

/// getopt-style split of `tokens` given the letters `allowed` (`P` takes a value).
fn getopt(cmd: &str, tokens: &[&str], allowed: &str) -> Result<Flags> {
    let mut f = Flags::default();
    let mut it = tokens.iter();
    while let Some(&t) = it.next() {
        let Some(letters) = t
            .strip_prefix('-')
            .filter(|l| !l.is_empty() && f.positional.is_empty())
        else {
            f.positional.push(t.to_string());
            continue;
        };
        for (i, c) in letters.char_indices() {
            if !allowed.contains(c) {
                bail!("{cmd}: invalid option -- '{c}'");
            }
            if c == 'P' {
                let rest = &letters[i + 1..];
                let v = if rest.is_empty() {
                    it.next().copied()
                } else {
                    Some(rest)
                };
                let Some(v) = v else {
                    bail!("{cmd}: option requires an argument -- 'P'")
                };
                f.pattern = Some(parse_pattern(v)?);
                break;
            }
            f.letters.push(c);
        }
    }
    Ok(f)
}

impl Flags {
    fn has(&self, c: char) -> bool {
        self.letters.contains(c)
    }

    /// The `OFF LEN` positional arguments.
    fn range(&self, cmd: &str) -> Result<(u64, u64)> {
        match self.positional.as_slice() {
            [off, len] => Ok((parse_size(off)?, parse_size(len)?)),
            _ => bail!("{cmd}: expected OFFSET LENGTH"),
        }
    }
}

/// Parse one command line.
pub fn parse(line: &str) -> Result<Op> {
    let tokens: Vec<&str> = line.split_whitespace().collect();
    let Some((&name, rest)) = tokens.split_first() else {
        bail!("empty command")
    };
    let req = |allowed| -> Result<Request> { request(name, rest, allowed) };
    Ok(match name {
        "read" | "write" | "discard" => Op::Sync(req(allowed_flags(name))?),
        "aio_read" | "aio_write" => Op::Aio(req(allowed_flags(name))?),
        "flush" => Op::Sync(Request::Flush),
        "aio_flush" => Op::AioFlush,
        "map" => Op::Map,
        "info" => Op::Info,
        _ => bail!("command \"{name}\" not found"),
    })
}

fn allowed_flags(name: &str) -> &'static str {
    match name {
        "read" | "aio_read" => "Pvq",
        "write" | "aio_write" => "Pzuqc",
        _ => "q",
    }
}

fn request(name: &str, rest: &[&str], allowed: &str) -> Result<Request> {
    let f = getopt(name, rest, allowed)?;
    let (off, len) = f.range(name)?;
    let quiet = f.has('q');
    let buffered = name.ends_with("read") || (name.ends_with("write") && !f.has('z'));
    if buffered && len > MAX_BUFFER {
        bail!("{name}: length {len} is too large (at most {MAX_BUFFER} bytes per request)");
    }
    Ok(match name.trim_start_matches("aio_") {
        "read" => Request::Read {
            off,
            len,
            pattern: f.pattern,
            verbose: f.has('v'),
            quiet,
        },
        "write" => {
            if f.has('z') && f.pattern.is_some() {
                bail!("{name}: -z and -P cannot be specified at the same time");
            }
            if f.has('u') && !f.has('z') {
                bail!("{name}: -u requires -z");
            }
            if f.has('c') && f.has('z') {
                bail!("{name}: -c and -z cannot be specified at the same time");
            }
            let pattern = f.pattern.unwrap_or(0xcd);
            Request::Write {
                off,
                len,
                pattern,
                zero: f.has('z'),
                unmap: f.has('u'),
                compress: f.has('c'),
                quiet,
            }
        }
        _ => Request::Discard { off, len, quiet },
    })
}

/// Perform a request and print what qemu-io prints; true on success.
pub async fn perform(disk: &Disk, req: &Request) -> bool {
    let start = Instant::now();
    let r = match req {
        Request::Read {
            off,
            len,
            pattern,
            verbose,
            quiet,
        } => read(disk, *off, *len, *pattern, *verbose)
            .await
            .map(|ok| (ok, "read", *off, *len, *quiet)),
        Request::Write {
            off,
            len,
            pattern,
            zero,
            unmap,
            compress,
            quiet,
        } => {
            let r = if *zero {
                disk.write_zeroes(*off, *len, *unmap).await
            } else if *compress {
                disk.write_compressed(&vec![*pattern; *len as usize], *off)
                    .await
            } else {
                disk.write_at(&vec![*pattern; *len as usize], *off).await
            };
            r.map(|()| (true, "wrote", *off, *len, *quiet))
        }
        Request::Discard { off, len, quiet } => disk
            .discard(*off, *len)
            .await
            .map(|()| (true, "discard", *off, *len, *quiet)),
        Request::Flush => return super::io::report(disk.flush().await),
    };
    match r {
        Ok((ok, verb, off, len, quiet)) => {
            if !quiet {
                outln!("{verb} {len}/{len} bytes at offset {off}");
                print_timing(len, start.elapsed().as_secs_f64());
            }
            ok
        }
        Err(e) => {
            errln!("{} failed: {}", verb_of(req), error_text(&e));
            false
        }
    }
}

fn verb_of(req: &Request) -> &'static str {
    match req {
        Request::Read { .. } => "read",
        Request::Write { .. } => "write",
        Request::Discard { .. } => "discard",
        Request::Flush => "flush",
    }
}

/// Read, verify the pattern, dump with `-v`; `Ok(false)` when the pattern did not match.
async fn read(disk: &Disk, off: u64, len: u64, pattern: Option<u8>, verbose: bool) -> Result<bool> {
    let mut buf = vec![0u8; len as usize];
    disk.read_at(&mut buf, off).await?;
    let ok = pattern.is_none_or(|p| buf.iter().all(|&b| b == p));
    if !ok {
        outln!("Pattern verification failed at offset {off}, {len} bytes");
    }
    if verbose {
        hexdump(&buf, off);
    }
    Ok(ok)
}

/// qemu-io's `-v` dump: 16 bytes a line, offset, hex, printable characters.
fn hexdump(buf: &[u8], base: u64) {
    for (i, line) in buf.chunks(16).enumerate() {
        let hex: String = line.iter().map(|b| format!(" {b:02x}")).collect();
        let text: String = line
            .iter()
            .map(|&b| {
                if (0x20..0x7f).contains(&b) {
                    b as char
                } else {
                    '.'
                }
            })
            .collect();
        outln!("{:08x}: {hex}  {text}", base + 16 * i as u64);
    }
}

/// The timing line qemu-io prints after each request.
fn print_timing(len: u64, secs: f64) {
    let secs = secs.max(1e-9);
    let rate = io_size((len as f64 / secs) as u64);
    outln!(
        "{}, 1 ops; {secs:05.2} sec ({rate}/sec and {:.4} ops/sec)",
        io_size(len),
        1.0 / secs
    );
}

/// qemu-io's `map`: runs allocated in the top image, or not.
pub async fn print_map(disk: &Disk) -> Result<()> {
    let mut runs: Vec<(bool, u64, u64)> = Vec::new();
    for e in disk.map(0, disk.size()).await? {
        let alloc = e.depth == 0 && e.present;
        match runs.last_mut() {
            Some(last) if last.0 == alloc => last.2 += e.length,
            _ => runs.push((alloc, e.start, e.length)),
        }
    }
    for (alloc, start, len) in runs {
        let not = if alloc { "   " } else { "not" };
        outln!(
            "{} ({len:#x}) bytes {not} allocated at offset {} ({start:#x})",
            io_size(len),
            io_size(start)
        );
    }
    Ok(())
}

/// qemu-io's `info`.
pub async fn print_info(disk: &Disk, file: &Path) -> Result<()> {
    outln!("format name: {}", disk.format());
    if let Disk::Qcow2(img) = disk {
        outln!("cluster size: {}", io_size(img.cluster_size()));
    }
    outln!("image: {}", file.display());
    outln!("virtual size: {}", io_size(disk.size()));
    Ok(())
}
