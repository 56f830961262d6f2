//! `qcow2 check`: check (and optionally repair) a qcow2 image, printing exactly what
//! `qemu-img check` prints and exiting with its status.
//!
//! | status | meaning                                                   |
//! |--------|-----------------------------------------------------------|
//! | 0      | no errors (after a repair: none left)                     |
//! | 1      | the image could not be checked, or the check had errors   |
//! | 2      | corruptions (possibly with leaks)                         |
//! | 3      | leaked clusters only                                      |
//! | 63     | the format does not support checks (raw)                  |
//!
//! Findings (`Leaked cluster 9 refcount=1 reference=0`, ...) go to stderr as the check runs,
//! the report to stdout. After a repair, the report describes the image as it is afterwards
//! (qemu-img's "double check"), with the repaired counts in the JSON `*-fixed` fields.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{Context, Result};
use qcow2_engine::Storage;
use qcow2_engine::check::{CheckOptions, CheckReport, RepairMode, check, repair_with};
use serde::Serialize;

use super::OutputFormat;
use crate::access::Access;
use crate::disk::{detect_format, open_file};
use crate::output::print_json;

/// Exit status for a format without consistency checks, as qemu-img uses.
const EXIT_NOT_SUPPORTED: u8 = 63;

/// Arguments of `qcow2 check`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Image format (qcow2 or raw); probed when omitted.
    #[arg(short = 'f')]
    format: Option<String>,
    /// Repair: `leaks` lowers leaked refcounts only, `all` repairs everything it can.
    #[arg(short = 'r', long = "repair", value_enum)]
    repair: Option<Repair>,
    /// Output format.
    #[arg(long, value_enum, default_value = "human")]
    output: OutputFormat,
    /// Print nothing on stdout (findings still go to stderr).
    #[arg(short = 'q', long)]
    quiet: bool,
    #[command(flatten)]
    access: Access,
    /// The image file.
    file: PathBuf,
}

/// `-r leaks|all`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Repair {
    /// Repair leaked clusters only (always safe).
    Leaks,
    /// Repair leaks and corruptions.
    All,
}

impl From<Repair> for RepairMode {
    fn from(r: Repair) -> RepairMode {
        match r {
            Repair::Leaks => RepairMode::Leaks,
            Repair::All => RepairMode::All,
        }
    }
}

/// Run `qcow2 check`.
pub async fn run(a: Args) -> Result<u8> {
    if detect_format(&a.file, a.format.as_deref()).await? != "qcow2" {
        errln!("qcow2: This image format does not support checks");
        return Ok(EXIT_NOT_SUPPORTED);
    }
    let storage: Arc<dyn Storage> = Arc::new(open_file(
        &a.file,
        a.repair.is_some(),
        a.access.image_lock(a.repair.is_some()),
    )?);
    let opts = CheckOptions {
        filename: Some(a.file.display().to_string()),
        ..CheckOptions::default()
    };
    let report = match a.repair {
        None => check(storage, &opts).await,
        Some(mode) => repair_with(storage, &opts, mode.into())
            .await
            .map(|(_, after)| after),
    }
    .with_context(|| format!("could not check '{}'", a.file.display()))?;
    for msg in &report.messages {
        errln!("{msg}");
    }
    if !a.quiet {
        print_report(&report, a.output)?;
    }
    if report.check_errors > 0 {
        errln!("qcow2: Check failed");
    }
    Ok(report.exit_code() as u8)
}

/// The report on stdout, in qemu-img's human or JSON form.
fn print_report(report: &CheckReport, output: OutputFormat) -> Result<()> {
    match output {
        OutputFormat::Human => {
            out!("{}{report}", report.repair_summary());
            Ok(())
        }
        OutputFormat::Json => print_json(&JsonReport::from(report)),
    }
}

/// `CheckReport` with its keys in the order qemu-img prints them: QEMU's QDict iterates its
/// hash buckets in order, which for these twelve keys gives this fixed order. Zero counters
/// (except `check-errors`) are left out, as QEMU does.
#[derive(Serialize)]
#[serde(rename_all = "kebab-case")]
struct JsonReport<'a> {
    #[serde(skip_serializing_if = "is_zero")]
    image_end_offset: u64,
    #[serde(skip_serializing_if = "is_zero")]
    compressed_clusters: u64,
    #[serde(skip_serializing_if = "is_zero")]
    total_clusters: u64,
    #[serde(skip_serializing_if = "is_zero")]
    corruptions: u64,
    #[serde(skip_serializing_if = "is_zero")]
    corruptions_fixed: u64,
    check_errors: u64,
    #[serde(skip_serializing_if = "is_zero")]
    leaks: u64,
    #[serde(skip_serializing_if = "is_zero")]
    leaks_fixed: u64,
    #[serde(skip_serializing_if = "is_zero")]
    allocated_clusters: u64,
    filename: &'a str,
    format: &'a str,
    #[serde(skip_serializing_if = "is_zero")]
    fragmented_clusters: u64,
}

fn is_zero(v: &u64) -> bool {
    *v == 0
}

impl<'a> From<&'a CheckReport> for JsonReport<'a> {
    fn from(r: &'a CheckReport) -> Self {
        JsonReport {
            image_end_offset: r.image_end_offset,
            compressed_clusters: r.compressed_clusters,
            total_clusters: r.total_clusters,
            corruptions: r.corruptions,
            corruptions_fixed: r.corruptions_fixed,
            check_errors: r.check_errors,
            leaks: r.leaks,
            leaks_fixed: r.leaks_fixed,
            allocated_clusters: r.allocated_clusters,
            filename: &r.filename,
            format: &r.format,
            fragmented_clusters: r.fragmented_clusters,
        }
    }
}
