//! `qcow2`: a command-line tool for qcow2 images, modelled on qemu-img and qemu-io.
//!
//! Every command is a small module under `cmd/`. Errors print one line, `qcow2: <message>`,
//! to stderr and exit with status 1 (or the command's documented status).

// std's print macros panic when the pipe is closed (`qcow2 info IMG | head -1`), which would
// abort a command half-way and lose its work. These shadow them for the whole binary, so a
// stray `println!` is a compile error; use `outln!`/`errln!` from `output` instead.
#[allow(unused_macros)]
macro_rules! print {
    ($($t:tt)*) => {
        compile_error!("print! can panic: use out!")
    };
}
#[allow(unused_macros)]
macro_rules! println {
    ($($t:tt)*) => {
        compile_error!("println! can panic: use outln!")
    };
}
#[allow(unused_macros)]
macro_rules! eprint {
    ($($t:tt)*) => {
        compile_error!("eprint! can panic: use err!")
    };
}
#[allow(unused_macros)]
macro_rules! eprintln {
    ($($t:tt)*) => {
        compile_error!("eprintln! can panic: use errln!")
    };
}

#[macro_use]
mod output;
mod access;
mod args;
mod cmd;
mod disk;
mod fork;
mod object;
mod secrets;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// qcow2 disk image tool.
#[derive(Debug, Parser)]
#[command(name = "qcow2", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Create a new image.
    Create(cmd::create::Args),
    /// Show information about an image.
    Info(cmd::info::Args),
    /// Check (and optionally repair) the consistency of a qcow2 image.
    Check(cmd::check::Args),
    /// Show the allocation map of an image.
    Map(cmd::map::Args),
    /// Compare the contents of two images (exit 0 same, 1 different, 2 error).
    Compare(cmd::compare::Args),
    /// Convert an image to another format.
    Convert(cmd::convert::Args),
    /// Change the virtual size of an image.
    Resize(cmd::resize::Args),
    /// Copy an image, or a range of its blocks, into a new image (qemu-img dd).
    Dd(cmd::dd::Args),
    /// How large a new image would be, for a size or a source image (qemu-img measure).
    Measure(cmd::measure::Args),
    /// Dump the on-disk structures of a qcow2 image (works on damaged images).
    Dump(cmd::dump::Args),
    /// Run qemu-io style commands on an image.
    Io(cmd::io::Args),
    /// Time a read or write workload (qemu-img bench's knobs).
    Bench(cmd::bench::Args),
    /// Export an image over NBD until SIGINT/SIGTERM.
    Serve(cmd::serve::Args),
    /// List, create, apply or delete internal snapshots (qemu-img snapshot).
    Snapshot(cmd::snapshot::Args),
    /// Write an overlay's data into its backing file (qemu-img commit).
    Commit(cmd::commit::Args),
    /// Change an image's backing file (qemu-img rebase).
    Rebase(cmd::rebase::Args),
    /// Change an image's settings (qemu-img amend).
    Amend(cmd::amend::Args),
    /// Add, remove, clear, enable, disable or merge persistent bitmaps (qemu-img bitmap).
    Bitmap(cmd::bitmap::Args),
}

impl Command {
    /// Run the command; `Ok` carries the exit status.
    async fn run(self) -> anyhow::Result<u8> {
        match self {
            Command::Create(a) => cmd::create::run(a).await,
            Command::Info(a) => cmd::info::run(a).await,
            Command::Check(a) => cmd::check::run(a).await,
            Command::Map(a) => cmd::map::run(a).await,
            Command::Compare(a) => cmd::compare::run(a).await,
            Command::Convert(a) => cmd::convert::run(a).await,
            Command::Resize(a) => cmd::resize::run(a).await,
            Command::Measure(a) => cmd::measure::run(a).await,
            Command::Dd(a) => cmd::dd::run(a).await,
            Command::Dump(a) => cmd::dump::run(a).await,
            Command::Io(a) => cmd::io::run(a).await,
            Command::Bench(a) => cmd::bench::run(a).await,
            Command::Serve(a) => cmd::serve::run(a).await,
            Command::Snapshot(a) => cmd::snapshot::run(a).await,
            Command::Commit(a) => cmd::commit::run(a).await,
            Command::Rebase(a) => cmd::rebase::run(a).await,
            Command::Amend(a) => cmd::amend::run(a).await,
            Command::Bitmap(a) => cmd::bitmap::run(a).await,
        }
    }
}

/// Print an error as one line.
fn report(msg: impl std::fmt::Display) {
    let text = msg.to_string().replace('\n', " ");
    errln!("qcow2: {}", text.trim());
}

/// Parse the command line; usage errors become one line and status 1.
fn parse() -> Result<Cli, ExitCode> {
    // `--object secret`, `--image-opts`, `--key-file`: taken out before clap (see `secrets`).
    let args = secrets::take_args(std::env::args_os()).map_err(|e| {
        report(format!("{e:#}"));
        ExitCode::from(1)
    })?;
    Cli::try_parse_from(args).map_err(|e| {
        use clap::error::ErrorKind::{
            DisplayHelp, DisplayHelpOnMissingArgumentOrSubcommand, DisplayVersion,
        };
        // Help and version are not errors; `qcow2` alone prints the help and fails.
        if matches!(
            e.kind(),
            DisplayHelp | DisplayVersion | DisplayHelpOnMissingArgumentOrSubcommand
        ) {
            let _ = e.print();
            return ExitCode::from(u8::from(e.use_stderr()));
        }
        // clap's message is a few lines before a blank line and the usage: join them.
        let rendered = e.to_string();
        let lines: Vec<&str> = rendered
            .lines()
            .take_while(|l| !l.trim().is_empty() && !l.starts_with("Usage:"))
            .map(str::trim)
            .collect();
        report(lines.join(" ").trim_start_matches("error: "));
        ExitCode::from(1)
    })
}

fn main() -> ExitCode {
    let mut cli = match parse() {
        Ok(c) => c,
        Err(code) => return code,
    };
    // `serve --fork` forks here, while the process has one thread (see `fork`).
    // (`--list` is a client: it refuses --fork itself, with qemu-nbd's message.)
    if let Command::Serve(a) = &mut cli.command
        && a.fork
        && !a.list
    {
        match fork::fork() {
            Ok(fork::Side::Parent(code)) => return ExitCode::from(code),
            Ok(fork::Side::Child(fd)) => a.ready = Some(fd),
            Err(e) => {
                report(format!("could not fork: {e}"));
                return ExitCode::from(1);
            }
        }
    }
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            report(format!("could not start the runtime: {e}"));
            return ExitCode::from(1);
        }
    };
    match rt.block_on(cli.command.run()) {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            report(output::error_text(&e));
            ExitCode::from(1)
        }
    }
}
