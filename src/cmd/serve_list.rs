//! `qcow2 serve --list` (`-L`): qemu-nbd's client mode. Connect to the server at `-k SOCK`
//! or `-b HOST -p PORT`, list its exports and print them in `qemu-nbd -L`'s format, with
//! qemu-nbd's messages and exit status 1 when that fails.

use anyhow::{Result, bail};
use qcow2_nbd::client::{self, ExportInfo, ExportList, Mode};
use tokio::net::{TcpStream, UnixStream};

use super::serve::Args;

/// qemu-nbd's defaults in list mode: port 10809 on 0.0.0.0 (which Linux routes to the
/// local host), not the loopback address our server binds by default.
const DEFAULT_HOST: &str = "0.0.0.0";

/// Run `qcow2 serve --list`.
pub async fn run(a: &Args) -> Result<u8> {
    check(a)?;
    let list = match &a.socket {
        Some(path) => {
            let shown = path.display().to_string();
            let mut s = UnixStream::connect(path)
                .await
                .map_err(|e| connect_failed(&shown, &e))?;
            client::list_exports(&mut s).await?
        }
        None => {
            let host = a.bind.as_deref().unwrap_or(DEFAULT_HOST);
            let port = a.port.unwrap_or(super::serve::DEFAULT_PORT);
            let shown = format!("{host}:{port}");
            let mut s = TcpStream::connect((host, port))
                .await
                .map_err(|e| connect_failed(&shown, &e))?;
            client::list_exports(&mut s).await?
        }
    };
    print(&list);
    Ok(0)
}

/// qemu-nbd's refusals of server-only arguments in list mode.
fn check(a: &Args) -> Result<()> {
    if a.file.is_some() {
        bail!("List mode is incompatible with a file name");
    }
    let per_device = !a.export_name.is_empty()
        || !a.description.is_empty()
        || a.format.is_some()
        || a.load_snapshot.is_some()
        || a.qemu.per_device();
    if per_device {
        bail!("List mode is incompatible with per-device settings");
    }
    if a.fork {
        bail!("List mode is incompatible with forking");
    }
    if a.qemu.tls_requested() {
        bail!("--list over TLS (--tls-creds) is not supported yet");
    }
    Ok(())
}

fn connect_failed(addr: &str, e: &std::io::Error) -> anyhow::Error {
    // The C library's text alone, as QEMU prints it (no "(os error N)").
    let text = e.to_string();
    let text = text.split(" (os error").next().unwrap_or_default();
    anyhow::anyhow!("Failed to connect to '{addr}': {text}")
}

/// The listing, line for line as `qemu-nbd -L` prints it.
fn print(list: &ExportList) {
    outln!("exports available: {}", list.exports.len());
    for e in &list.exports {
        print_export(e, list.mode);
    }
}

fn print_export(e: &ExportInfo, mode: Mode) {
    outln!(" export: '{}'", e.name);
    if let Some(d) = &e.description {
        outln!("  description: {d}");
    }
    // Without NBD_FLAG_HAS_FLAGS, OPT_INFO did not work: there is no size either.
    if e.flags & 1 != 0 {
        outln!("  size:  {}", e.size);
        let names = client::flag_names(e.flags);
        let names: String = names.iter().map(|n| format!(" {n}")).collect();
        outln!("  flags: {:#x} ({names} )", e.flags);
    }
    if let Some((min, opt, max)) = e.block_sizes {
        outln!("  min block: {min}");
        outln!("  opt block: {opt}");
        outln!("  max block: {max}");
    }
    let bits = if mode >= Mode::Extended {
        "64-bit"
    } else {
        "32-bit"
    };
    outln!("  transaction size: {bits}");
    if !e.contexts.is_empty() {
        outln!("  available meta contexts: {}", e.contexts.len());
        for c in &e.contexts {
            outln!("   {c}");
        }
    }
}
