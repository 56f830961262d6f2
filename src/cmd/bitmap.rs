//! `qcow2 bitmap`: change an image's persistent bitmaps with `qemu-img bitmap`'s command
//! line: `(--merge SRC | --add | --remove | --clear | --enable | --disable)... [-f FMT]
//! [-b SRC_FILE [-F SRC_FMT]] [-g SIZE] FILE BITMAP`. The actions run in the order given, on
//! one read-write open; the first failure stops with qemu-img's message and status 1.
//! `--disabled` (with `--add`) is our shorthand for `--add --disable`.

use std::path::PathBuf;

use anyhow::{Result, anyhow, bail};
use qcow2_engine::image::Image;

use crate::access::Access;
use crate::args::parse_size;
use crate::disk::{detect_format, open_qcow2};

/// Arguments of `qcow2 bitmap` (parsed by hand: the actions' order matters).
#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(flatten)]
    access: Access,
    /// Actions and options, then FILE and BITMAP (see `qemu-img bitmap --help`).
    #[arg(trailing_var_arg = true, allow_hyphen_values = true, num_args = 0..)]
    rest: Vec<String>,
}

/// One action, in command-line order.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Action {
    Add,
    Remove,
    Clear,
    Enable,
    Disable,
    Merge(String),
}

impl Action {
    fn name(&self) -> &'static str {
        match self {
            Action::Add => "add",
            Action::Remove => "remove",
            Action::Clear => "clear",
            Action::Enable => "enable",
            Action::Disable => "disable",
            Action::Merge(_) => "merge",
        }
    }
}

/// The parsed command line.
#[derive(Debug, Default)]
struct Plan {
    actions: Vec<Action>,
    format: Option<String>,
    granularity: Option<u64>,
    source_file: Option<PathBuf>,
    source_format: Option<String>,
    positional: Vec<String>,
}

/// Parse qemu-img's options (`--opt VALUE`, `--opt=VALUE`, `-gVALUE`).
fn parse(args: &[String]) -> Result<Plan> {
    let mut p = Plan::default();
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let (key, inline) = match a.split_once('=') {
            Some((k, v)) if k.starts_with("--") => (k, Some(v.to_string())),
            _ => (a.as_str(), None),
        };
        let mut value = |name: &str| -> Result<String> {
            inline
                .clone()
                .or_else(|| it.next().cloned())
                .ok_or_else(|| anyhow!("option '{name}' requires an argument"))
        };
        match key {
            "--add" => p.actions.push(Action::Add),
            "--remove" => p.actions.push(Action::Remove),
            "--clear" => p.actions.push(Action::Clear),
            "--enable" => p.actions.push(Action::Enable),
            "--disable" => p.actions.push(Action::Disable),
            "--disabled" => p.actions.push(Action::Disable),
            "--merge" => p.actions.push(Action::Merge(value("--merge")?)),
            "-g" | "--granularity" => p.granularity = Some(parse_size(&value("-g")?)?),
            "-b" | "--source-file" => p.source_file = Some(value("-b")?.into()),
            "-F" | "--source-format" => p.source_format = Some(value("-F")?),
            "-f" | "--format" => p.format = Some(value("-f")?),
            s if s.starts_with("-g") && s.len() > 2 => p.granularity = Some(parse_size(&s[2..])?),
            s if s.starts_with('-') && s.len() > 1 => bail!("unrecognized option '{s}'"),
            _ => p.positional.push(a.clone()),
        }
    }
    Ok(p)
}

/// qemu-img's argument checks, in its order.
fn validate(p: &Plan) -> Result<()> {
    if p.granularity.is_some() && !p.actions.contains(&Action::Add) {
        bail!("granularity only supported with --add");
    }
    let merging = p.actions.iter().any(|a| matches!(a, Action::Merge(_)));
    if p.source_file.is_some() && !merging {
        bail!("Merge bitmap source file only supported with --merge");
    }
    if p.source_format.is_some() && p.source_file.is_none() {
        bail!("-F only supported with -b");
    }
    if p.positional.len() != 2 {
        bail!("Expecting filename and bitmap name");
    }
    if p.actions.is_empty() {
        bail!("Need at least one of --add, --remove, --clear, --enable, --disable, or --merge");
    }
    Ok(())
}

/// Run `qcow2 bitmap`.
pub async fn run(a: Args) -> Result<u8> {
    let p = parse(&a.rest)?;
    validate(&p)?;
    let (file, name) = (PathBuf::from(&p.positional[0]), p.positional[1].as_str());
    if detect_format(&file, p.format.as_deref()).await? != "qcow2" {
        bail!(
            "Operation {} on bitmap {name} failed: persistent bitmaps need a qcow2 image",
            p.actions[0].name()
        );
    }
    let img = open_qcow2(&file, true, &a.access).await?;
    let done = apply_all(&img, &p, name, &a.access).await;
    let closed = img.close().await;
    done?;
    closed?;
    Ok(0)
}

/// Apply the actions in order; stop at the first failure.
async fn apply_all(img: &Image, p: &Plan, name: &str, access: &Access) -> Result<()> {
    for action in &p.actions {
        apply(img, p, action, name, access)
            .await
            .map_err(|e| anyhow!("Operation {} on bitmap {name} failed: {e}", action.name()))?;
    }
    Ok(())
}

async fn apply(img: &Image, p: &Plan, action: &Action, name: &str, access: &Access) -> Result<()> {
    let r = match action {
        Action::Add => img.add_bitmap(name, p.granularity, false).await,
        Action::Remove => img.remove_bitmap(name).await,
        Action::Clear => img.clear_bitmap(name).await,
        Action::Enable => img.enable_bitmap(name, true).await,
        Action::Disable => img.enable_bitmap(name, false).await,
        Action::Merge(src) => return merge(img, p, name, src, access).await,
    };
    r.map_err(|e| anyhow!("{}", e.what()))
}

/// `--merge SRC [-b SRC_FILE [-F FMT]]`: from this image, or another opened read-only.
async fn merge(img: &Image, p: &Plan, name: &str, src: &str, access: &Access) -> Result<()> {
    let Some(path) = &p.source_file else {
        return img
            .merge_bitmap(name, img, src)
            .await
            .map_err(|e| anyhow!("{}", e.what()));
    };
    if detect_format(path, p.source_format.as_deref()).await? != "qcow2" {
        bail!("Dirty bitmap '{src}' not found");
    }
    let other = open_qcow2(path, false, access).await?;
    let r = img.merge_bitmap(name, &other, src).await;
    other.close().await?;
    r.map_err(|e| anyhow!("{}", e.what()))
}
