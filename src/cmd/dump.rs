//! `qcow2 dump`: the on-disk structures, read straight from the file with `format/` parsers
//! (not the image engine), so it works on damaged images. Every list is bounded by `--limit`.

use std::path::PathBuf;

use anyhow::{Context, Result};
use qcow2_engine::Storage;
use qcow2_engine::format::extensions::{Extension, ImageHeader};
use qcow2_engine::format::header::{self, Header};

use super::dump_tables::{Budget, dump_l1_l2, dump_refcounts};
use crate::disk::open_file;

/// Arguments of `qcow2 dump`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Also decode every L2 table's non-empty entries.
    #[arg(long)]
    l2: bool,
    /// Also dump the refcount table and the non-zero refcounts.
    #[arg(long)]
    refcounts: bool,
    /// At most this many lines per table listing.
    #[arg(long, default_value_t = 10_000)]
    limit: u64,
    /// The image file.
    file: PathBuf,
}

/// Run `qcow2 dump`.
pub async fn run(a: Args) -> Result<u8> {
    let file = open_file(&a.file, false, None)?;
    let file_len = file.len().await.context("sizing the file")?;
    let mut first = vec![0u8; 4096];
    file.read_at(&mut first, 0)
        .await
        .context("reading the header")?;
    let h = Header::from_bytes(&first)?;
    outln!("file: {} ({file_len} bytes)", a.file.display());
    print_header(&h);
    if !(header::MIN_CLUSTER_BITS..=header::MAX_CLUSTER_BITS).contains(&h.cluster_bits) {
        outln!("cluster_bits out of range: the rest of the image cannot be located");
        return Ok(1);
    }
    let mut cluster0 = vec![0u8; h.cluster_size() as usize];
    file.read_at(&mut cluster0, 0)
        .await
        .context("reading cluster 0")?;
    match ImageHeader::parse(&cluster0) {
        Ok(ih) => print_extensions(&ih, file_len),
        Err(e) => outln!("extensions: error: {e:#}"),
    }
    let mut budget = Budget::new(a.limit);
    dump_l1_l2(&file, &h, file_len, a.l2, &mut budget).await?;
    if a.refcounts {
        dump_refcounts(&file, &h, file_len, &mut budget).await?;
    }
    dump_snapshots(&file, &h).await;
    Ok(0)
}

fn print_header(h: &Header) {
    outln!("magic                    QFI\\xfb");
    outln!("version                  {}", h.version);
    outln!("backing_file_offset      {:#x}", h.backing_file_offset);
    outln!("backing_file_size        {}", h.backing_file_size);
    outln!(
        "cluster_bits             {} ({} bytes)",
        h.cluster_bits,
        h.cluster_size()
    );
    outln!("size                     {}", h.size);
    outln!("crypt_method             {}", h.crypt_method);
    outln!("l1_size                  {}", h.l1_size);
    outln!("l1_table_offset          {:#x}", h.l1_table_offset);
    outln!("refcount_table_offset    {:#x}", h.refcount_table_offset);
    outln!("refcount_table_clusters  {}", h.refcount_table_clusters);
    outln!("nb_snapshots             {}", h.nb_snapshots);
    outln!("snapshots_offset         {:#x}", h.snapshots_offset);
    outln!("incompatible_features    {:#x}", h.incompatible_features);
    outln!("compatible_features      {:#x}", h.compatible_features);
    outln!("autoclear_features       {:#x}", h.autoclear_features);
    outln!(
        "refcount_order           {} ({} bits)",
        h.refcount_order,
        h.refcount_bits()
    );
    outln!("header_length            {}", h.header_length);
    outln!("compression_type         {}", h.compression_type);
}

fn print_extensions(ih: &ImageHeader, file_len: u64) {
    for e in &ih.extensions {
        out!("extension {:#010x}: ", e.kind());
        match e {
            Extension::BackingFormat(f) => outln!("backing format {f:?}"),
            Extension::ExternalDataFile(f) => outln!("external data file {f:?}"),
            Extension::FeatureNameTable(t) => {
                outln!("feature name table ({} entries)", t.len());
                for f in t {
                    outln!("    {:?} bit {}: {}", f.kind, f.bit, f.name);
                }
            }
            Extension::Bitmaps {
                nb_bitmaps,
                bitmap_directory_size,
                bitmap_directory_offset,
                ..
            } => {
                outln!(
                    "bitmaps: {nb_bitmaps} bitmaps, directory {bitmap_directory_size} bytes at \
                     {bitmap_directory_offset:#x}"
                )
            }
            Extension::FullDiskEncryption { offset, length } => {
                outln!("full disk encryption header: {length} bytes at {offset:#x}")
            }
            Extension::Unknown { data, .. } => outln!("unknown, {} bytes", data.len()),
        }
    }
    if let Some(b) = &ih.backing_file {
        outln!("backing file: {b:?}");
    }
    match ih.validate(file_len) {
        Ok(()) => outln!("header validation: ok"),
        Err(e) => outln!("header validation: {e:#}"),
    }
}

async fn dump_snapshots(file: &dyn Storage, h: &Header) {
    if h.nb_snapshots == 0 {
        return;
    }
    outln!("snapshots at {:#x}:", h.snapshots_offset);
    match super::snapshots::read_table(file, h).await {
        Ok(snaps) => {
            for s in snaps {
                let size = s.disk_size.map_or("unknown".into(), |d| d.to_string());
                outln!(
                    "    id {:?} name {:?}: L1 table {:#x} ({} entries), disk size {size}",
                    s.id,
                    s.name,
                    s.l1_table_offset,
                    s.l1_size
                );
            }
        }
        Err(e) => outln!("    error: {}", crate::output::error_text(&e)),
    }
}
