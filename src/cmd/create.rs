//! `qcow2 create`: a new qcow2 (or raw) image, with qemu-img's options and messages.
//!
//! The size may be left out when there is a backing file: the backing image's virtual size is
//! used (opened with this library for qcow2, its length for raw). A relative backing file name
//! is resolved against the new image's directory, as QEMU does; a relative data file name is
//! created relative to the working directory and recorded as given.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use qcow2_engine::Storage;
use qcow2_engine::image::create::{self as lib, Compat, CreateOptions, Preallocation};
use qcow2_engine::storage::FileStorage;

use crate::access::Access;
use crate::disk::{Disk, full_backing_name};

/// Arguments of `qcow2 create`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Image format: qcow2 (default) or raw.
    #[arg(short = 'f', default_value = "qcow2")]
    format: String,
    /// Backing file (relative names are relative to the new image).
    #[arg(short = 'b')]
    backing: Option<String>,
    /// Backing file format (probed when omitted).
    #[arg(short = 'F')]
    backing_format: Option<String>,
    /// qemu-img creation options: cluster_size, compat, refcount_bits, extended_l2,
    /// lazy_refcounts, compression_type, preallocation, data_file, data_file_raw, ...
    #[arg(short = 'o')]
    options: Vec<String>,
    /// Do not open the backing file (the size must then be given).
    #[arg(short = 'u')]
    unsafe_backing: bool,
    /// Print nothing.
    #[arg(short = 'q')]
    quiet: bool,
    /// The image file to create (overwritten if it exists).
    file: Option<PathBuf>,
    /// Virtual size (k, M, G, T suffixes); default: the backing file's size.
    size: Option<String>,
}

/// Run `qcow2 create`.
pub async fn run(a: Args) -> Result<u8> {
    if a.options.iter().any(|o| wants_help(o)) {
        return print_option_help(&a.format);
    }
    let Some(file) = &a.file else {
        bail!("Expecting image file name");
    };
    let mut opts = CreateOptions::default();
    for o in &a.options {
        opts.apply_o(o)?;
    }
    if let Some(s) = &a.size {
        if opts.size.is_some() {
            bail!(
                "{}: The image size must be specified only once",
                file.display()
            );
        }
        opts.size = Some(lib::parse_size(s)?);
    }
    if a.backing.is_some() {
        opts.backing_file.clone_from(&a.backing);
    }
    if a.backing_format.is_some() {
        opts.backing_fmt.clone_from(&a.backing_format);
    }
    // QEMU no longer guesses a backing file's format when creating (a raw backing file
    // probed as qcow2 would be a security hole), with or without -u.
    if opts.backing_file.is_some() && opts.backing_fmt.is_none() {
        bail!(
            "{}: Backing file specified without backing format",
            file.display()
        );
    }
    match a.format.as_str() {
        "qcow2" => create_with(file, &mut opts, a.unsafe_backing, a.quiet).await?,
        "raw" => create_raw(file, &opts, a.quiet).await?,
        f => bail!("unsupported image format '{f}' (qcow2 or raw)"),
    }
    Ok(0)
}

/// `-o help` or `-o ?` among the options.
fn wants_help(options: &str) -> bool {
    options.split(',').any(|o| o == "help" || o == "?")
}

/// qemu-img's `-o help` text, listing the options this tool supports.
fn print_option_help(format: &str) -> Result<u8> {
    let options: &[(&str, &str, &str)] = match format {
        "qcow2" => &[
            ("backing_file", "<str>", "File name of a base image"),
            ("backing_fmt", "<str>", "Image format of the base image"),
            ("cluster_size", "<size>", "qcow2 cluster size"),
            (
                "compat",
                "<str>",
                "Compatibility level (v2 [0.10] or v3 [1.1])",
            ),
            (
                "compression_type",
                "<str>",
                "Compression method used for image cluster compression",
            ),
            ("data_file", "<str>", "File name of an external data file"),
            (
                "encrypt.cipher-alg",
                "<str>",
                "Name of encryption cipher algorithm",
            ),
            (
                "encrypt.cipher-mode",
                "<str>",
                "Name of encryption cipher mode",
            ),
            (
                "encrypt.format",
                "<str>",
                "Encrypt the image, format choices: 'aes', 'luks'",
            ),
            (
                "encrypt.hash-alg",
                "<str>",
                "Name of encryption hash algorithm",
            ),
            (
                "encrypt.iter-time",
                "<num>",
                "Time to spend in PBKDF in milliseconds",
            ),
            (
                "encrypt.ivgen-alg",
                "<str>",
                "Name of IV generator algorithm",
            ),
            (
                "encrypt.ivgen-hash-alg",
                "<str>",
                "Name of IV generator hash algorithm",
            ),
            (
                "encrypt.key-secret",
                "<str>",
                "ID of secret providing qcow AES key or LUKS passphrase",
            ),
            (
                "data_file_raw",
                "<bool (on/off)>",
                "The external data file must stay valid as a raw image",
            ),
            ("extended_l2", "<bool (on/off)>", "Extended L2 tables"),
            (
                "lazy_refcounts",
                "<bool (on/off)>",
                "Postpone refcount updates",
            ),
            (
                "preallocation",
                "<str>",
                "Preallocation mode (allowed values: off, metadata, falloc, full)",
            ),
            (
                "refcount_bits",
                "<num>",
                "Width of a reference count entry in bits",
            ),
            ("size", "<size>", "Virtual disk size"),
        ],
        "raw" => &[("size", "<size>", "Virtual disk size")],
        f => bail!("unsupported image format '{f}' (qcow2 or raw)"),
    };
    outln!("Supported {format} options:");
    for (name, kind, help) in options {
        outln!("  {:<22} - {help}", format!("{name}={kind}"));
    }
    outln!();
    outln!("The protocol level may support further options.");
    outln!("Specify the target filename to include those options.");
    Ok(0)
}

/// Create a qcow2 image of `size` bytes with `-o` options (the `convert` destination).
pub async fn create_qcow2(path: &Path, size: u64, options: Option<&str>) -> Result<()> {
    let mut opts = CreateOptions::default();
    if let Some(o) = options {
        opts.apply_o(o)?;
    }
    // A backing file is recorded, not opened: the caller (convert -B) copies accordingly.
    opts.size = Some(size);
    create_with(path, &mut opts, true, true).await
}

/// Fill the size and backing format from the backing file, then create.
async fn create_with(
    path: &Path,
    opts: &mut CreateOptions,
    unsafe_backing: bool,
    quiet: bool,
) -> Result<()> {
    if let Some(name) = opts.backing_file.clone() {
        let backing = full_backing_name(path, &name);
        if !unsafe_backing || opts.size.is_none() {
            let disk = Disk::open(
                &backing,
                opts.backing_fmt.as_deref(),
                false,
                &Access::default(),
            )
            .await
            .with_context(|| format!("could not open backing image '{}'", backing.display()))?;
            opts.backing_fmt
                .get_or_insert_with(|| disk.format().to_string());
            opts.size.get_or_insert(disk.size());
            disk.close().await?;
        }
    }
    attach_secret(path, opts)?;
    // qemu-img prints the size as given, and creates it rounded up to whole sectors.
    let shown = opts.clone();
    opts.size = Some(opts.size_or(None)?);
    opts.validate(opts.size.unwrap_or(0))?;
    if !quiet {
        outln!(
            "Formatting '{}', fmt=qcow2 {}",
            path.display(),
            describe(&shown)
        );
    }
    let image = FileStorage::create(path)
        .with_context(|| format!("could not create '{}'", path.display()))?;
    let data = match &opts.data_file {
        Some(d) => Some(
            FileStorage::create(d).with_context(|| format!("could not create data file '{d}'"))?,
        ),
        None => None,
    };
    let data_ref = data.as_ref().map(|d| d as &dyn Storage);
    lib::create(&image, data_ref, opts)
        .await
        .with_context(|| path.display().to_string())?;
    Ok(())
}

/// An encrypted image: look up the secret `encrypt.key-secret` names, and remember it for
/// opening the new image later in this command (convert writes into it).
fn attach_secret(path: &Path, opts: &mut CreateOptions) -> Result<()> {
    if !opts.encrypted() {
        return Ok(());
    }
    let Some(id) = opts.encrypt.key_secret.clone() else {
        bail!("Parameter 'encrypt.key-secret' is required for cipher");
    };
    opts.encrypt.secret = Some(crate::secrets::by_id(&id)?);
    crate::secrets::register(path, &id);
    Ok(())
}

/// Create a raw image: a sparse file of the given size.
async fn create_raw(path: &Path, opts: &CreateOptions, quiet: bool) -> Result<()> {
    if opts.backing_file.is_some() {
        bail!("raw images cannot have a backing file");
    }
    let size = opts.size_or(None)?;
    if !quiet {
        let shown = opts.size.unwrap_or(size);
        outln!("Formatting '{}', fmt=raw size={shown}", path.display());
    }
    let f = FileStorage::create(path)
        .with_context(|| format!("could not create '{}'", path.display()))?;
    f.set_len(size)
        .await
        .with_context(|| format!("sizing '{}'", path.display()))?;
    f.flush().await?;
    Ok(())
}

/// The option list of qemu-img's `Formatting ...` line, in its order.
fn describe(o: &CreateOptions) -> String {
    let onoff = |b: bool| if b { "on" } else { "off" };
    let e = &o.encrypt;
    let encrypt = [
        ("format", &e.format),
        ("key-secret", &e.key_secret),
        ("cipher-alg", &e.cipher_alg),
        ("cipher-mode", &e.cipher_mode),
        ("ivgen-alg", &e.ivgen_alg),
        ("ivgen-hash-alg", &e.ivgen_hash_alg),
        ("hash-alg", &e.hash_alg),
    ];
    let mut parts: Vec<String> = encrypt
        .iter()
        .filter_map(|(k, v)| v.as_ref().map(|v| format!("encrypt.{k}={v}")))
        .collect();
    if let Some(t) = e.iter_time {
        parts.push(format!("encrypt.iter-time={t}"));
    }
    parts.extend([
        format!("cluster_size={}", o.cluster_size),
        format!("extended_l2={}", onoff(o.extended_l2)),
    ]);
    let prealloc = match o.preallocation {
        Preallocation::Off => None,
        Preallocation::Metadata => Some("metadata"),
        Preallocation::Falloc => Some("falloc"),
        Preallocation::Full => Some("full"),
    };
    if let Some(p) = prealloc {
        parts.push(format!("preallocation={p}"));
    }
    parts.push(format!(
        "compression_type={}",
        if o.compression_type == 1 {
            "zstd"
        } else {
            "zlib"
        }
    ));
    parts.push(format!("size={}", o.size.unwrap_or(0)));
    let named = [
        ("backing_file", &o.backing_file),
        ("backing_fmt", &o.backing_fmt),
        ("data_file", &o.data_file),
    ];
    for (k, v) in named {
        if let Some(v) = v {
            parts.push(format!("{k}={v}"));
        }
    }
    if o.data_file_raw {
        parts.push("data_file_raw=on".into());
    }
    if o.compat == Compat::V2 {
        parts.push("compat=0.10".into());
    }
    parts.push(format!("lazy_refcounts={}", onoff(o.lazy_refcounts)));
    parts.push(format!("refcount_bits={}", o.refcount_bits));
    parts.join(" ")
}
