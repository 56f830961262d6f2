//! Creating a new qcow2 image, with the behaviour of `qemu-img create -f qcow2`.
//!
//! The image is laid out like QEMU lays it out, one region after the other:
//!
//! ```text
//!  cluster 0        header + extensions (backing format, data file name, feature names)
//!                   + end marker + backing file name
//!  1 ..             refcount table (as many clusters as needed)
//!  ..               refcount blocks covering every cluster below
//!  ..               L1 table (zeros unless preallocating)
//!  ..               L2 tables           (preallocation only)
//!  ..               data clusters       (preallocation only, not with an external data file)
//! ```
//!
//! Every cluster in use has refcount 1. Data clusters in an external data file are not
//! refcounted, and their L2 entries map each guest cluster to the same offset in that file.
//! Everything but the header is written first, then the header, then both files are flushed:
//! an interrupted create leaves a file without a valid header rather than a broken image.

#[cfg(feature = "luks")]
mod encrypt;
mod layout;
mod measure;
mod options;

use crate::error::{Error, Result};
use crate::format::extensions::{Extension, ImageHeader};
use crate::format::features::{self, standard_feature_table};
use crate::format::header::{self, Header};
use crate::storage::Storage;

#[cfg(feature = "luks")]
pub use encrypt::EncryptOptions;
pub(crate) use layout::Layout;
pub use measure::{
    BitmapShape, Measure, Measurement, bitmaps_size, source_bitmaps, target_has_bitmaps,
};
pub use options::{Compat, CreateOptions, MAX_IMAGE_SIZE, Preallocation, parse_bool, parse_size};

/// Create a qcow2 image in `image` (its previous content is discarded) as `qemu-img create`
/// would.
///
/// - `opts.size` must be set (the CLI fills it from the backing file when omitted, see
///   [`CreateOptions::size_or`]); it is rounded up to a multiple of 512.
/// - `data_file`: the already created/opened external data file when `opts.data_file` is set
///   (`opts.data_file` is only the name recorded in the header). It is truncated to the size,
///   and preallocated like the image would be.
/// - Backing files are only recorded, never opened.
///
/// Refuses the option combinations qemu-img refuses ([`CreateOptions::validate`]).
///
/// ```no_run
/// # async fn f(storage: &dyn qcow2_engine::Storage) -> qcow2_engine::Result<()> {
/// use qcow2_engine::image::create::{create, CreateOptions};
/// let mut opts = CreateOptions::default();
/// opts.apply_o("size=1G,cluster_size=64k,lazy_refcounts=on")?;
/// create(storage, None, &opts).await
/// # }
/// ```
pub async fn create(
    image: &dyn Storage,
    data_file: Option<&dyn Storage>,
    opts: &CreateOptions,
) -> Result<()> {
    let size = opts.size_or(None)?;
    opts.validate(size)?;
    let data_file = match (&opts.data_file, data_file) {
        (Some(_), Some(d)) => Some(d),
        (Some(_), None) => return Err(Error::invalid_arg("data_file set but no storage given")),
        (None, Some(_)) => return Err(Error::invalid_arg("data file storage without data_file")),
        (None, None) => None,
    };
    let prealloc = opts.effective_preallocation();
    let luks = luks_area(opts).await?;
    let layout =
        Layout::compute_with_luks(opts, size, prealloc, data_file.is_some(), luks.len() as u64)?;
    let cluster0 = image_header(opts, size, &layout).to_cluster0()?;
    io(image.set_len(0).await, "truncating the image")?;
    layout.write_metadata(image, opts.extended_l2).await?;
    if !luks.is_empty() {
        io(
            image.write_at(&luks, layout.luks_offset).await,
            "writing the LUKS header",
        )?;
    }
    layout.write_data(image, data_file, prealloc, size).await?;
    io(image.write_at(&cluster0, 0).await, "writing the header")?;
    if let Some(d) = data_file {
        io(d.flush().await, "flushing the data file")?;
    }
    io(image.flush().await, "flushing the image")
}

/// The new image's LUKS area (empty without encryption).
async fn luks_area(opts: &CreateOptions) -> Result<Vec<u8>> {
    #[cfg(feature = "luks")]
    if opts.encrypted() {
        return encrypt::luks_area(&opts.encrypt).await;
    }
    let _ = opts;
    Ok(Vec::new())
}

/// Map a storage error to the library error with what was being done.
fn io<T>(r: std::io::Result<T>, what: &str) -> Result<T> {
    r.map_err(|e| Error::io(what, e))
}

/// The header and extensions for the new image.
fn image_header(opts: &CreateOptions, size: u64, layout: &Layout) -> ImageHeader {
    let v3 = opts.compat == Compat::V3;
    let mut extensions = Vec::new();
    if let Some(f) = &opts.backing_fmt {
        extensions.push(Extension::BackingFormat(f.clone()));
    }
    if let Some(d) = &opts.data_file {
        extensions.push(Extension::ExternalDataFile(d.clone()));
    }
    if layout.luks_clusters > 0 {
        extensions.push(Extension::FullDiskEncryption {
            offset: layout.luks_offset,
            length: layout.luks_len,
        });
    }
    // Like QEMU: 8 names take 392 bytes, too much for clusters of 4 KiB and less.
    if v3 && opts.cluster_size > 4096 {
        extensions.push(Extension::FeatureNameTable(standard_feature_table()));
    }
    ImageHeader {
        header: header_fields(opts, size, layout),
        extensions,
        backing_file: opts.backing_file.clone(),
    }
}

/// The fixed header fields (backing fields are filled by `to_cluster0`).
fn header_fields(opts: &CreateOptions, size: u64, layout: &Layout) -> Header {
    let v3 = opts.compat == Compat::V3;
    let (incompatible, compatible, autoclear) = feature_bits(opts);
    Header {
        version: if v3 { 3 } else { 2 },
        backing_file_offset: 0,
        backing_file_size: 0,
        cluster_bits: opts.cluster_size.trailing_zeros(),
        size,
        crypt_method: if layout.luks_clusters > 0 {
            header::CRYPT_LUKS
        } else {
            header::CRYPT_NONE
        },
        l1_size: layout.l1_size,
        l1_table_offset: layout.l1_offset,
        refcount_table_offset: layout.reftable_offset,
        refcount_table_clusters: layout.reftable_clusters,
        nb_snapshots: 0,
        snapshots_offset: 0,
        incompatible_features: incompatible,
        compatible_features: compatible,
        autoclear_features: autoclear,
        refcount_order: opts.refcount_bits.trailing_zeros(),
        // Both lengths are small constants (104 and 72).
        #[allow(clippy::cast_possible_truncation)]
        header_length: if v3 {
            header::V3_HEADER_LENGTH
        } else {
            header::V2_HEADER_LENGTH
        } as u32,
        compression_type: opts.compression_type,
        unknown_tail: if v3 {
            vec![0; header::V3_HEADER_LENGTH - header::KNOWN_HEADER_END]
        } else {
            Vec::new()
        },
    }
}

/// (incompatible, compatible, autoclear) feature masks for `opts`.
fn feature_bits(opts: &CreateOptions) -> (u64, u64, u64) {
    let bit = |on: bool, b: u64| if on { b } else { 0 };
    let incompatible = bit(opts.data_file.is_some(), features::EXTERNAL_DATA_FILE)
        | bit(opts.compression_type != 0, features::COMPRESSION_TYPE)
        | bit(opts.extended_l2, features::EXTENDED_L2);
    let compatible = bit(opts.lazy_refcounts, features::LAZY_REFCOUNTS);
    let autoclear = bit(opts.data_file_raw, features::RAW_EXTERNAL);
    (incompatible, compatible, autoclear)
}

#[cfg(test)]
mod tests;
