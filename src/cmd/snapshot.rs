//! `qcow2 snapshot`: list, create, apply and delete internal snapshots, with `qemu-img
//! snapshot`'s flags, messages and exit codes. The work is the engine's
//! ([`Image::create_snapshot`], [`Image::apply_snapshot`], [`Image::delete_snapshot`]).

use std::path::PathBuf;

use anyhow::{Result, anyhow, bail};
use qcow2_engine::image::Image;

use crate::access::Access;
use crate::disk::{detect_format, open_qcow2};

/// Arguments of `qcow2 snapshot`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// List the snapshots (the default).
    #[arg(short = 'l')]
    list: bool,
    /// Create a snapshot named NAME.
    #[arg(short = 'c', value_name = "NAME")]
    create: Option<String>,
    /// Apply (revert the disk to) the snapshot NAME (an ID or a name).
    #[arg(short = 'a', value_name = "NAME")]
    apply: Option<String>,
    /// Delete the snapshot named NAME.
    #[arg(short = 'd', value_name = "NAME")]
    delete: Option<String>,
    /// Image format (qcow2 or raw); probed when omitted.
    #[arg(short = 'f')]
    format: Option<String>,
    /// Print nothing but errors.
    #[arg(short = 'q')]
    quiet: bool,
    #[command(flatten)]
    access: Access,
    /// The image file.
    file: PathBuf,
}

/// What to do.
enum Op {
    List,
    Create(String),
    Apply(String),
    Delete(String),
}

impl Args {
    /// The one operation asked for; qemu-img's message when several are.
    fn op(&self) -> Result<Op> {
        let given = usize::from(self.list)
            + usize::from(self.create.is_some())
            + usize::from(self.apply.is_some())
            + usize::from(self.delete.is_some());
        if given > 1 {
            bail!("Cannot mix '-l', '-a', '-c', '-d'");
        }
        Ok(match (&self.create, &self.apply, &self.delete) {
            (Some(n), _, _) => Op::Create(n.clone()),
            (_, Some(n), _) => Op::Apply(n.clone()),
            (_, _, Some(n)) => Op::Delete(n.clone()),
            _ => Op::List,
        })
    }
}

/// Run `qcow2 snapshot`.
pub async fn run(a: Args) -> Result<u8> {
    let op = a.op()?;
    let writable = !matches!(op, Op::List);
    if writable && a.access.force_share {
        bail!("--force-share (-U) can only be used with read-only images");
    }
    if detect_format(&a.file, a.format.as_deref()).await? != "qcow2" {
        // Raw images have no snapshots: an empty list, and no way to make one.
        return match op {
            Op::List => Ok(0),
            Op::Create(n) => bail!("Could not create snapshot '{n}': Operation not supported"),
            Op::Apply(n) => bail!("Could not apply snapshot '{n}': Operation not supported"),
            Op::Delete(n) => bail!("Could not delete snapshot '{n}': Operation not supported"),
        };
    }
    let img = open_qcow2(&a.file, writable, &a.access).await?;
    let r = run_op(&img, op).await;
    // Close even after a failure, so metadata written so far is consistent.
    let closed = img.close().await;
    r?;
    closed?;
    Ok(0)
}

async fn run_op(img: &Image, op: Op) -> Result<()> {
    match op {
        Op::List => {
            let snaps = img.snapshots().await?;
            if !snaps.is_empty() {
                super::snapshots::print_human(&snaps);
            }
        }
        Op::Create(n) => {
            img.create_snapshot(&n)
                .await
                .map_err(|e| anyhow!("Could not create snapshot '{n}': {}", reason(&e)))?;
        }
        Op::Apply(n) => {
            // qemu-img refuses before looking the snapshot up, whatever the bitmaps' flags.
            if !img.bitmaps().await?.is_empty() {
                bail!("Could not apply snapshot '{n}': Device has active dirty bitmaps");
            }
            img.apply_snapshot(&n).await.map_err(|e| match e.kind() {
                qcow2_engine::ErrorKind::NotFound => anyhow!(
                    "Could not apply snapshot '{n}': Failed to load snapshot: No such file or directory"
                ),
                _ => anyhow!("Could not apply snapshot '{n}': {}", reason(&e)),
            })?;
        }
        Op::Delete(n) => {
            // qemu-img looks the snapshot up by name only (unlike -a, which tries IDs first).
            let snaps = img.snapshots().await?;
            let Some(s) = snaps.iter().find(|s| s.name == n) else {
                bail!("Could not delete snapshot '{n}': snapshot not found");
            };
            img.delete_snapshot(&s.id)
                .await
                .map_err(|e| anyhow!("Could not delete snapshot '{n}': {}", reason(&e)))?;
        }
    }
    Ok(())
}

/// The engine error as one line, with its cause.
fn reason(e: &qcow2_engine::Error) -> String {
    format!("{e:#}")
}

/// Which snapshot a `-l` argument names: qemu-img's `snapshot.id=ID,snapshot.name=NAME`
/// (either or both), or a bare ID-or-name.
#[derive(Debug, PartialEq, Eq)]
struct SnapshotSpec {
    id: Option<String>,
    name: Option<String>,
}

fn parse_spec(arg: &str) -> Result<SnapshotSpec> {
    if !arg.starts_with("snapshot.") {
        return Ok(SnapshotSpec {
            id: None,
            name: Some(arg.to_string()),
        });
    }
    let mut spec = SnapshotSpec {
        id: None,
        name: None,
    };
    for part in arg.split(',') {
        match part.split_once('=') {
            Some(("snapshot.id", v)) => spec.id = Some(v.to_string()),
            Some(("snapshot.name", v)) => spec.name = Some(v.to_string()),
            _ => bail!("Invalid parameter '{part}'"),
        }
    }
    Ok(spec)
}

impl SnapshotSpec {
    /// The ID of the snapshot this names: both fields must match when both are given; a
    /// bare argument is an ID first, then a name (qemu-img's order).
    fn resolve(&self, snaps: &[qcow2_engine::image::Snapshot], bare: bool) -> Option<String> {
        if bare {
            let key = self.name.as_deref()?;
            let i = qcow2_engine::image::find_by_id_or_name(snaps, key)?;
            return Some(snaps[i].id.clone());
        }
        snaps
            .iter()
            .find(|s| {
                self.id.as_ref().is_none_or(|id| *id == s.id)
                    && self.name.as_ref().is_none_or(|n| *n == s.name)
            })
            .map(|s| s.id.clone())
    }
}

/// Open the internal snapshot `arg` (a `-l` argument) of the qcow2 image at `path`,
/// read-only: what `convert -l`, `measure -l` and `serve -l` read.
pub async fn open_source(
    path: &std::path::Path,
    format: Option<&str>,
    access: &Access,
    arg: &str,
) -> Result<crate::disk::Disk> {
    let spec = parse_spec(arg)?;
    let not_found = || anyhow!("Failed to load snapshot: Can't find snapshot");
    if detect_format(path, format).await? != "qcow2" {
        return Err(not_found());
    }
    let opts = access.options(false);
    let img = Image::open(path, &opts).await?;
    let snaps = img.snapshots().await?;
    drop(img);
    let id = spec
        .resolve(&snaps, !arg.starts_with("snapshot."))
        .ok_or_else(not_found)?;
    Ok(crate::disk::Disk::Qcow2(
        Image::open_snapshot(path, &opts, &id).await?,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn snapshot_specs() {
        let bare = parse_spec("s1").unwrap();
        assert_eq!(bare.name.as_deref(), Some("s1"));
        let both = parse_spec("snapshot.id=3,snapshot.name=x").unwrap();
        assert_eq!(
            (both.id.as_deref(), both.name.as_deref()),
            (Some("3"), Some("x"))
        );
        assert!(parse_spec("snapshot.foo=1").is_err());
    }
}
