//! `qcow2 info`: what `qemu-img info` shows, in its human or JSON form.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use qcow2_engine::format::extensions::ImageHeader;
use qcow2_engine::storage::{FileStorage, LockRequest};

use super::info_types::{Child, FileInfo, FormatSpecific, ImageInfo, Qcow2Data, SpecificData};
use super::{OutputFormat, info_luks, snapshots};
use crate::access::Access;
use crate::disk::{detect_format, full_backing_name, open_file, read_image_header};
use crate::output::print_json;

/// Arguments of `qcow2 info`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Image format (qcow2 or raw); probed when omitted.
    #[arg(short = 'f')]
    format: Option<String>,
    /// Output format.
    #[arg(long, value_enum, default_value = "human")]
    output: OutputFormat,
    /// Show every image of the backing chain.
    #[arg(long)]
    backing_chain: bool,
    #[command(flatten)]
    access: Access,
    /// The image file.
    file: PathBuf,
}

/// The longest chain `--backing-chain` walks.
const MAX_CHAIN: usize = 64;

/// Run `qcow2 info`.
pub async fn run(a: Args) -> Result<u8> {
    let mut chain = Vec::new();
    let mut next = Some((a.file.clone(), a.format.clone()));
    let mut seen = Vec::new();
    while let Some((path, fmt)) = next.take() {
        if chain.len() >= MAX_CHAIN {
            bail!("backing chain longer than {MAX_CHAIN} images");
        }
        let canon = std::fs::canonicalize(&path)
            .with_context(|| format!("could not open '{}'", path.display()))?;
        if seen.contains(&canon) {
            bail!("backing chain of '{}' contains a loop", a.file.display());
        }
        seen.push(canon);
        let lock = match chain.is_empty() {
            true => a.access.image_lock(false),
            // Backing files are only read, as the image above them is.
            false => a
                .access
                .image_lock(false)
                .map(|_| LockRequest::backing(a.access.force_share)),
        };
        let (info, backing) = image_info(&path, fmt.as_deref(), lock).await?;
        warn_about_references(&info);
        if let (true, Some((full, _)), Some(name)) =
            (a.backing_chain, &backing, &info.backing_filename)
        {
            a.access
                .check_reference(&a.file, "backing file", name, full)?;
        }
        chain.push(info);
        next = backing.filter(|_| a.backing_chain);
    }
    match (a.output, a.backing_chain) {
        (OutputFormat::Json, true) => print_json(&chain)?,
        (OutputFormat::Json, false) => print_json(&chain[0])?,
        (OutputFormat::Human, _) => print_human_chain(&chain),
    }
    Ok(0)
}

fn print_human_chain(chain: &[ImageInfo]) {
    for (i, info) in chain.iter().enumerate() {
        if i > 0 {
            outln!();
        }
        info.print_human();
    }
}

/// Warn about names in the image that reach outside its directory: info itself opens no file
/// an image names (unless `--backing-chain` asks for it), but other tools may.
fn warn_about_references(info: &ImageInfo) {
    let data = match &info.format_specific {
        Some(FormatSpecific {
            data: SpecificData::Qcow2(q),
            ..
        }) => q.data_file.as_deref(),
        _ => None,
    };
    for (what, name) in [
        ("backing file", info.backing_filename.as_deref()),
        ("data file", data),
    ] {
        let Some(name) = name else { continue };
        let p = Path::new(name);
        if p.is_absolute() {
            errln!(
                "qcow2: warning: {} names the {what} '{name}' by an absolute name",
                info.filename
            );
        } else if p.components().any(|c| c == std::path::Component::ParentDir) {
            errln!(
                "qcow2: warning: {} names the {what} '{name}' outside its directory ('..')",
                info.filename
            );
        }
    }
}

/// Information about one image (locked with `lock`), and its backing file (path, format) if
/// it has one.
pub async fn image_info(
    path: &Path,
    format: Option<&str>,
    lock: Option<LockRequest>,
) -> Result<(ImageInfo, Option<(PathBuf, Option<String>)>)> {
    let meta =
        std::fs::metadata(path).with_context(|| format!("could not open '{}'", path.display()))?;
    // QEMU's file driver reports lengths in whole 512-byte sectors.
    let sectors = meta.len().next_multiple_of(512);
    let file_info = FileInfo {
        children: Vec::new(),
        virtual_size: sectors,
        filename: path.display().to_string(),
        format: "file",
        actual_size: meta.blocks() * 512,
        format_specific: FormatSpecific {
            kind: "file",
            data: SpecificData::Empty {},
        },
        dirty_flag: false,
    };
    let mut info = ImageInfo {
        children: Vec::new(),
        backing_filename_format: None,
        virtual_size: sectors,
        filename: path.display().to_string(),
        cluster_size: None,
        format: "raw".into(),
        actual_size: file_info.actual_size,
        format_specific: None,
        full_backing_filename: None,
        backing_filename: None,
        encrypted: None,
        dirty_flag: false,
        raw_snapshots: Vec::new(),
    };
    info.children.push(Child {
        name: "file",
        info: file_info,
    });
    if detect_format(path, format).await? == "raw" {
        // Taken only to honour other holders' locks, as qemu-img does.
        let _file = open_file(path, false, lock.map(|_| LockRequest::raw(false)))?;
        return Ok((info, None));
    }
    let file = open_file(path, false, lock)?;
    let ih = read_image_header(&file)
        .await
        .with_context(|| path.display().to_string())?;
    let backing = fill_qcow2(&mut info, &file, &ih, path).await?;
    Ok((info, backing))
}

/// Fill the qcow2 fields; returns the backing file (resolved path, format).
async fn fill_qcow2(
    info: &mut ImageInfo,
    file: &FileStorage,
    ih: &ImageHeader,
    path: &Path,
) -> Result<Option<(PathBuf, Option<String>)>> {
    let h = &ih.header;
    info.format = "qcow2".into();
    info.virtual_size = h.size;
    info.cluster_size = Some(h.cluster_size());
    info.dirty_flag = h.is_dirty();
    info.raw_snapshots = snapshots::read_table(file, h).await?;
    info.format_specific = Some(FormatSpecific {
        kind: "qcow2",
        data: SpecificData::Qcow2(Box::new(qcow2_data(file, ih).await)),
    });
    info.encrypted = (h.crypt_method != 0).then_some(true);
    let Some(name) = ih.backing_file.clone() else {
        return Ok(None);
    };
    let full = full_backing_name(path, &name);
    info.backing_filename_format = ih.backing_format().map(str::to_string);
    info.full_backing_filename = Some(full.display().to_string());
    info.backing_filename = Some(name);
    Ok(Some((full, info.backing_filename_format.clone())))
}

/// qcow2's `format-specific.data`.
async fn qcow2_data(file: &FileStorage, ih: &ImageHeader) -> Qcow2Data {
    let h = &ih.header;
    let v3 = h.version >= 3;
    let data_file = h
        .has_external_data_file()
        .then(|| ih.data_file().unwrap_or("").to_string());
    Qcow2Data {
        compat: if v3 { "1.1" } else { "0.10" },
        compression_type: if h.compression_type == 1 {
            "zstd"
        } else {
            "zlib"
        },
        lazy_refcounts: v3.then(|| h.lazy_refcounts()),
        bitmaps: bitmaps(file, ih).await,
        refcount_bits: h.refcount_bits(),
        data_file_raw: data_file.as_ref().map(|_| h.data_file_raw()),
        data_file,
        encrypt: info_luks::encrypt_info(file, ih).await,
        corrupt: v3.then(|| h.is_corrupt()),
        extended_l2: v3.then(|| h.extended_l2()),
    }
}

/// The persistent bitmaps, when there are any (an unreadable directory lists none, as the
/// rest of `info` still has something to say).
async fn bitmaps(
    file: &FileStorage,
    ih: &ImageHeader,
) -> Option<Vec<super::info_types::BitmapJson>> {
    let list = qcow2_engine::image::list_bitmaps(file, ih).await.ok()?;
    (!list.is_empty()).then(|| list.into_iter().map(Into::into).collect())
}
