//! qemu-nbd's flags beyond the socket and export basics: caching and IO (`-n`, `--cache`,
//! `--aio`), `--discard`, `--detect-zeroes`, `-A`, TLS (`--object tls-creds-x509`,
//! `--tls-creds`, `--tls-hostname`), `-B` (dirty bitmaps), and the flags we accept only to
//! refuse clearly or to ignore (`-c`, `-T`).

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use qcow2_engine::storage::IoBackend;
use qcow2_nbd::TlsConfig;

use super::serve_device::{DetectZeroes, Policy};
use crate::object::Objects;

/// The flags (flattened into `serve`'s arguments).
#[derive(Debug, Clone, clap::Args)]
pub struct QemuNbdFlags {
    /// Bypass the host page cache (O_DIRECT): the same as --cache=none.
    #[arg(short = 'n', long, conflicts_with = "cache")]
    nocache: bool,
    /// Cache mode: none (O_DIRECT), writeback (page cache, the default), writethrough
    /// (every write flushed), directsync (O_DIRECT, every write flushed), unsafe (flushes
    /// ignored).
    #[arg(long, value_name = "MODE")]
    cache: Option<CacheMode>,
    /// IO backend: threads, io_uring, or native (kernel async IO: io_uring where available,
    /// as we have no Linux AIO; needs --cache=none or directsync, as in QEMU).
    #[arg(long, value_name = "MODE")]
    aio: Option<AioMode>,
    /// Trims: ignore (accepted, change nothing; the default, as qemu-nbd's) or unmap
    /// (discard: the range reads as zeros and its clusters are freed).
    #[arg(long, value_name = "MODE", default_value = "ignore")]
    discard: DiscardMode,
    /// All-zero writes: off, on (written as zeroes), unmap (zeroes that may free space;
    /// needs --discard=unmap).
    #[arg(long, value_name = "MODE", default_value = "off")]
    detect_zeroes: DetectZeroes,
    /// Offer the qemu:allocation-depth metadata context (0 unallocated, 1 this image, 2+ a
    /// backing file).
    #[arg(short = 'A', long)]
    pub allocation_depth: bool,
    /// Define an object: tls-creds-x509,id=ID,dir=DIR,endpoint=server[,verify-peer=on|off]
    /// (QEMU's syntax; repeatable).
    #[arg(long, value_name = "OBJECT")]
    object: Vec<String>,
    /// Require TLS, with the credentials of the tls-creds-x509 object ID.
    #[arg(long, value_name = "ID")]
    tls_creds: Option<String>,
    /// Only with --list in qemu-nbd (a client option): refused, as there.
    #[arg(long, value_name = "HOSTNAME")]
    tls_hostname: Option<String>,
    /// Offer persistent dirty bitmap NAME (of the image or, as in QEMU, of the first image
    /// of its backing chain that has it) as metadata context qemu:dirty-bitmap:NAME
    /// (repeatable).
    #[arg(short = 'B', long, value_name = "NAME")]
    bitmap: Vec<String>,
    /// Connect FILE to a kernel NBD device: refused (no kernel module is used).
    #[arg(short = 'c', long, value_name = "DEV")]
    connect: Option<PathBuf>,
    /// QEMU trace events: accepted and ignored with a warning.
    #[arg(short = 'T', long, value_name = "OPTS")]
    trace: Vec<String>,
}

/// `--cache` modes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum CacheMode {
    None,
    Writeback,
    Writethrough,
    Directsync,
    Unsafe,
}

/// `--aio` modes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum AioMode {
    Threads,
    Native,
    #[value(name = "io_uring")]
    IoUring,
}

/// `--discard` modes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum DiscardMode {
    #[value(alias = "off")]
    Ignore,
    #[value(alias = "on")]
    Unmap,
}

/// How to open the image, from the flags.
#[derive(Debug, Clone, Copy)]
pub struct OpenTuning {
    /// O_DIRECT.
    pub direct: bool,
    /// The IO backend.
    pub io_backend: IoBackend,
}

impl QemuNbdFlags {
    fn cache_mode(&self) -> CacheMode {
        match (self.nocache, self.cache) {
            (true, _) => CacheMode::None,
            (false, c) => c.unwrap_or(CacheMode::Writeback),
        }
    }

    /// Refuse what cannot work, warn about what is ignored.
    pub fn check(&self) -> Result<()> {
        if let Some(dev) = &self.connect {
            bail!(
                "-c/--connect {}: connecting to a kernel NBD device is not supported (no \
                 kernel module is used); serve on a socket and connect a client to it",
                dev.display()
            );
        }
        if !self.trace.is_empty() {
            errln!("qcow2 serve: warning: -T/--trace is not supported and is ignored");
        }
        if self.detect_zeroes == DetectZeroes::Unmap && self.discard != DiscardMode::Unmap {
            bail!(
                "setting detect-zeroes to unmap is not allowed without setting discard \
                 operation to unmap"
            );
        }
        let direct = matches!(self.cache_mode(), CacheMode::None | CacheMode::Directsync);
        if self.aio == Some(AioMode::Native) && !direct {
            bail!("--aio=native needs --cache=none or --cache=directsync (-n), as in QEMU");
        }
        match (&self.tls_creds, &self.tls_hostname) {
            (None, Some(_)) => bail!("--tls-hostname is not permitted without --tls-creds"),
            (Some(_), Some(_)) => bail!("TLS hostname is only supported with export list"),
            _ => Ok(()),
        }
    }

    /// Whether a flag about the image was given (qemu-nbd refuses them with --list).
    pub fn per_device(&self) -> bool {
        self.nocache
            || self.cache.is_some()
            || self.aio.is_some()
            || self.allocation_depth
            || !self.bitmap.is_empty()
            || self.connect.is_some()
    }

    /// Whether --tls-creds was given.
    pub fn tls_requested(&self) -> bool {
        self.tls_creds.is_some()
    }

    /// The `-B` bitmap names, in command-line order.
    pub fn bitmaps(&self) -> &[String] {
        &self.bitmap
    }

    /// O_DIRECT and the IO backend.
    pub fn tuning(&self) -> OpenTuning {
        let direct = matches!(self.cache_mode(), CacheMode::None | CacheMode::Directsync);
        let io_backend = match self.aio {
            None | Some(AioMode::Native) => IoBackend::Auto,
            Some(AioMode::Threads) => IoBackend::Threads,
            Some(AioMode::IoUring) => IoBackend::Uring,
        };
        OpenTuning { direct, io_backend }
    }

    /// What the export does with writes, flushes and trims.
    pub fn policy(&self) -> Policy {
        let mode = self.cache_mode();
        Policy {
            writethrough: matches!(mode, CacheMode::Writethrough | CacheMode::Directsync),
            no_flush: mode == CacheMode::Unsafe,
            unmap: self.discard == DiscardMode::Unmap,
            detect_zeroes: self.detect_zeroes,
        }
    }

    /// The TLS configuration `--tls-creds` names, if any.
    pub fn tls(&self) -> Result<Option<TlsConfig>> {
        let objects = Objects::parse(&self.object)?;
        let Some(id) = &self.tls_creds else {
            return Ok(None);
        };
        let creds = objects.get(id, "tls-creds-x509")?;
        creds.only(&["dir", "endpoint", "verify-peer"])?;
        match creds.get("endpoint") {
            Some("server") => {}
            _ => bail!(
                "Expecting TLS credentials with a server endpoint ('{id}': add endpoint=server)"
            ),
        }
        let Some(dir) = creds.get("dir") else {
            bail!("TLS credentials '{id}': dir=DIR is missing");
        };
        // QEMU's default: verify-peer=on (clients must show a certificate our CA signed).
        let verify = creds.flag("verify-peer", true)?;
        let config = TlsConfig::from_x509_dir(Path::new(dir), verify)
            .with_context(|| format!("Failed to get TLS creds '{id}'"))?;
        Ok(Some(config))
    }
}
