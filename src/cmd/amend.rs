//! `qcow2 amend`: change an existing image's settings with `qemu-img amend`'s `-o` names,
//! messages and exit codes. The work is the library's [`qcow2_engine::ops::amend`]; this file
//! parses the option list (one `match` on the names); `encrypt.*` key slot changes go to
//! [`super::amend_luks`], after the other options (as qemu-img, both may be given at once).

use std::path::PathBuf;

use anyhow::{Result, bail};
use qcow2_engine::ops::amend::{AmendOptions, amend};

use super::amend_luks::{self, KeySlotOptions};
use super::ops_common::{end_progress, plain, progress};
use crate::access::Access;
use crate::args::parse_size;
use crate::disk::detect_format;

/// qemu-img's `amend -o help` for qcow2.
const HELP: &str = "Amend options for 'qcow2':
  backing_file=<str>     - File name of a base image
  backing_fmt=<str>      - Image format of the base image
  compat=<str>           - Compatibility level (v2 [0.10] or v3 [1.1])
  data_file=<str>        - File name of an external data file
  data_file_raw=<bool (on/off)> - The external data file must stay valid as a raw image
  encrypt.iter-time=<num> - Time to spend in PBKDF in milliseconds
  encrypt.keyslot=<num>  - Select a single keyslot to modify explicitly
  encrypt.new-secret=<str> - New secret to set in the matching keyslots. Empty string to erase
  encrypt.old-secret=<str> - Select all keyslots that match this password
  encrypt.state=<str>    - Select new state of affected keyslots (active/inactive)
  lazy_refcounts=<bool (on/off)> - Postpone refcount updates
  refcount_bits=<num>    - Width of a reference count entry in bits
  size=<size>            - Virtual disk size";

/// qcow2 creation options that amend cannot change (qemu-img names them in its refusal).
const CREATE_ONLY: &[&str] = &[
    "cluster_size",
    "extended_l2",
    "compression_type",
    "preallocation",
    "encryption",
    "encrypt.format",
];

/// Arguments of `qcow2 amend`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Image format (qcow2; probed when omitted).
    #[arg(short = 'f')]
    format: Option<String>,
    /// Options to change, `name=value,...` (`help` lists them).
    #[arg(short = 'o')]
    options: Vec<String>,
    /// Show progress.
    #[arg(short = 'p')]
    progress: bool,
    /// Print nothing on success.
    #[arg(short = 'q')]
    quiet: bool,
    /// Allow changes that may lose data (erasing the last active LUKS key slot).
    #[arg(long)]
    force: bool,
    #[command(flatten)]
    access: Access,
    /// The image.
    file: PathBuf,
}

/// Run `qcow2 amend`. Refusals print as qemu-img prints them: the first line after the
/// program name, hint lines below it.
pub async fn run(a: Args) -> Result<u8> {
    match amend_cmd(a).await {
        Ok(code) => Ok(code),
        Err(e) => {
            let text = crate::output::error_text(&e);
            let mut lines = text.lines();
            errln!("qcow2: {}", lines.next().unwrap_or_default());
            for l in lines {
                errln!("{l}");
            }
            Ok(1)
        }
    }
}

async fn amend_cmd(a: Args) -> Result<u8> {
    if a.options.is_empty() {
        errln!("qcow2: Must specify options (-o)");
        errln!("Try 'qcow2 amend --help' for more info");
        return Ok(1);
    }
    if a.options
        .iter()
        .any(|o| o.split(',').any(|p| p == "help" || p == "?"))
    {
        outln!("{HELP}");
        return Ok(0);
    }
    if detect_format(&a.file, a.format.as_deref()).await? != "qcow2" {
        bail!("Format driver 'raw' does not support option amendment");
    }
    let mut open = a.access.options(true);
    if let Some(secret) = crate::secrets::for_path(&a.file)? {
        open = open.key_secret(secret);
    }
    let mut opts = AmendOptions {
        open,
        ..AmendOptions::default()
    };
    let mut slots = KeySlotOptions::default();
    for list in &a.options {
        parse_list(list, &mut opts, &mut slots)?;
    }
    slots.validate()?;
    let show = a.progress && !a.quiet;
    opts.progress = Some(progress(show));
    let done = amend(&a.file, &opts).await;
    end_progress(show);
    done.map_err(plain)?;
    if slots.given() {
        amend_luks::apply(&a.file, &a.access, &slots, a.force).await?;
    }
    Ok(0)
}

/// Apply one `-o` list to `opts` (later values win, as in qemu-img).
fn parse_list(list: &str, opts: &mut AmendOptions, slots: &mut KeySlotOptions) -> Result<()> {
    if list.is_empty() {
        bail!("Invalid option list: {list}");
    }
    for item in list.split(',') {
        let Some((name, value)) = item.split_once('=') else {
            bail!("Invalid parameter '{item}'");
        };
        if !slots.set(name, value)? {
            set_option(name, value, opts)?;
        }
    }
    Ok(())
}

/// One `name=value`.
fn set_option(name: &str, value: &str, opts: &mut AmendOptions) -> Result<()> {
    match name {
        "compat" => opts.version = Some(compat(value)?),
        "lazy_refcounts" => opts.lazy_refcounts = Some(on_off(name, value)?),
        "data_file_raw" => opts.data_file_raw = Some(on_off(name, value)?),
        "refcount_bits" => match value.parse() {
            Ok(n) => opts.refcount_bits = Some(n),
            Err(_) => bail!("Parameter 'refcount_bits' expects a number"),
        },
        "size" => match parse_size(value) {
            Ok(n) => opts.size = Some(n),
            Err(_) => bail!(
                "Parameter 'size' expects a non-negative number below 2^64\n\
                 Optional suffix k, M, G, T, P or E means kilo-, mega-, giga-, tera-, peta-\n\
                 and exabytes, respectively."
            ),
        },
        "data_file" => opts.data_file = Some(value.to_string()),
        "backing_file" => opts.backing_file = Some(value.to_string()),
        "backing_fmt" => opts.backing_format = Some(value.to_string()),
        n if CREATE_ONLY.contains(&n) => {
            bail!("Invalid parameter '{n}'\nThis option is only supported for image creation")
        }
        n => bail!("Invalid parameter '{n}'"),
    }
    Ok(())
}

fn compat(value: &str) -> Result<u32> {
    match value {
        "0.10" | "v2" => Ok(2),
        "1.1" | "v3" => Ok(3),
        v => bail!("Unknown compatibility level {v}"),
    }
}

fn on_off(name: &str, value: &str) -> Result<bool> {
    match value {
        "on" => Ok(true),
        "off" => Ok(false),
        _ => bail!("Parameter '{name}' expects 'on' or 'off'"),
    }
}
