//! Opening an image: header, extensions, validation, L1 table, backing and data files.

use std::path::PathBuf;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};

use super::backing::{open_backing, resolve_relative};
use super::geometry::Geometry;
use super::state::WriteState;
use super::{Image, Inner, OpenOptions};
use crate::alloc::{MetaWriter, NewClusters, Refcounts};
use crate::cache::SliceCache;
use crate::error::{Error, ErrorKind, Result};
use crate::format::compressed::CompressionType;
use crate::format::extensions::ImageHeader;
use crate::format::header::Header;
use crate::format::l1;
use crate::format::refcount;
use crate::storage::{LockRequest, OpenFlags, Storage};
use crate::units::HostOffset;
use crate::units::to_usize;

impl Image {
    /// Open an image on `file`; `chain` holds the canonical paths of this image and the
    /// images above it (for loop detection in backing chains).
    pub(crate) async fn open_chain(
        file: Arc<dyn Storage>,
        opts: &OpenOptions,
        chain: Vec<PathBuf>,
    ) -> Result<Image> {
        let (ih, file_len) = read_header_for_open(&file, opts.writable).await?;
        let h = &ih.header;
        let geo = Geometry::new(
            h.cluster_bits,
            h.extended_l2(),
            h.version >= 3,
            opts.slice_size,
        );
        let compression = CompressionType::from_u8(h.compression_type)?;
        let l1 = read_l1(file.as_ref(), h).await?;
        let path = file.path().map(PathBuf::from);
        let backing = open_chain_backing(&ih, path.as_deref(), opts, &chain).await?;
        let (data, data_file_path) = open_data_file(&ih, &file, path.as_deref(), opts).await?;
        let (data, crypto) = super::encryption::setup(file.as_ref(), &ih, data, opts).await?;
        let new = Arc::new(NewClusters::new());
        let write = match opts.writable {
            true => Some(open_write_state(&file, &ih, file_len, opts, (&new, &l1)).await?),
            false => None,
        };
        let inner = Inner {
            new,
            write,
            flush_interval: opts.flush_interval,
            prealloc: std::sync::OnceLock::new(),
            bitmaps: Default::default(),
            dirty_threshold_percent: opts.dirty_threshold_percent,
            data,
            data_file_path,
            path,
            writable: opts.writable,
            geo,
            compression,
            encrypted: h.crypt_method != 0,
            crypto,
            size: AtomicU64::new(h.size),
            l1: super::l1_table::L1Table::new(l1, HostOffset(h.l1_table_offset)),
            l2_cache: SliceCache::new("l2", to_usize(geo.slice_size), opts.l2_cache_bytes),
            backing,
            header: Mutex::new(ih),
            file,
        };
        let img = Image {
            inner: Arc::new(inner),
        };
        if opts.writable {
            img.prepare_for_writing().await?;
            img.start_flusher(&opts.flusher)?;
        }
        Ok(img)
    }
}

/// Read the header and the file length. A dirty image (lazy refcounts, not closed cleanly)
/// opened for writing has its refcounts rebuilt first — the allocator trusts them — and the
/// header is read again (the rebuild may move the refcount table and clears the dirty bit).
/// A read-only open changes nothing: reads do not use refcounts.
async fn read_header_for_open(
    file: &Arc<dyn Storage>,
    writable: bool,
) -> Result<(ImageHeader, u64)> {
    let file_len = file
        .len()
        .await
        .map_err(|e| Error::io("sizing the image", e))?;
    let ih = read_image_header(file.as_ref(), file_len).await?;
    if !(writable && ih.header.is_dirty() && !ih.header.is_corrupt()) {
        return Ok((ih, file_len));
    }
    crate::check::rebuild_refcounts(file.clone()).await?;
    let file_len = file
        .len()
        .await
        .map_err(|e| Error::io("sizing the image", e))?;
    Ok((read_image_header(file.as_ref(), file_len).await?, file_len))
}

/// Read the refcount table and set up the allocator.
async fn open_write_state(
    file: &Arc<dyn Storage>,
    ih: &ImageHeader,
    file_len: u64,
    opts: &OpenOptions,
    (new, l1): (&Arc<NewClusters>, &[l1::L1Entry]),
) -> Result<WriteState> {
    let h = &ih.header;
    if h.is_corrupt() {
        // QEMU's words: a corrupt-marked image opens read-only until `check -r` clears it.
        return Err(Error::corrupt(
            "qcow2: Image is corrupt; cannot be opened read/write (repair it with check -r all)",
        ));
    }
    let clusters = u64::from(h.refcount_table_clusters);
    // validate() bounded the table to 8 MiB.
    let mut buf = vec![0u8; to_usize(clusters << h.cluster_bits)];
    file.read_at(&mut buf, h.refcount_table_offset)
        .await
        .map_err(|e| {
            Error::io("reading the refcount table", e).at_host(HostOffset(h.refcount_table_offset))
        })?;
    let table = refcount::parse_table(&buf);
    for (i, e) in table.iter().enumerate() {
        e.validate(h.cluster_size())
            .map_err(|err| Error::corrupt(format!("refcount table entry {i}: {}", err.what())))?;
    }
    let slice = to_usize((opts.slice_size.next_power_of_two() as u64).clamp(512, h.cluster_size()));
    let cache = (slice, opts.refcount_cache_bytes);
    let map = super::overlap::build_map(file, ih, l1, &table).await;
    let meta = Arc::new(MetaWriter::new(file.clone()));
    let rc = Refcounts::new(
        file.clone(),
        h,
        table,
        file_len,
        cache,
        (new.clone(), map, meta),
    );
    Ok(WriteState::new(rc))
}

/// Read and validate cluster 0: header, extensions, backing file name.
async fn read_image_header(file: &dyn Storage, file_len: u64) -> Result<ImageHeader> {
    let ih = super::read_cluster0(file).await?;
    ih.validate(file_len)?;
    ih.header.check_tables_clear_of_header()?;
    Ok(ih)
}

/// Read the active L1 table.
async fn read_l1(file: &dyn Storage, h: &Header) -> Result<Vec<l1::L1Entry>> {
    // validate() bounded l1_size to 32 MiB of entries.
    let len = crate::units::checked_usize(u64::from(h.l1_size) * 8, "an L1 table")?;
    let mut buf = vec![0u8; len];
    file.read_at(&mut buf, h.l1_table_offset)
        .await
        .map_err(|e| Error::io("reading the L1 table", e).at_host(HostOffset(h.l1_table_offset)))?;
    let entries = l1::parse_table(&buf);
    let cluster_size = h.cluster_size();
    for (i, e) in entries.iter().enumerate() {
        e.validate(cluster_size)
            .map_err(|err| Error::corrupt(format!("L1 entry {i}: {}", err.what())))?;
    }
    Ok(entries)
}

/// Open the backing image: the caller's override as given, or the header's name if the
/// reference policy allows it.
async fn open_chain_backing(
    ih: &ImageHeader,
    path: Option<&std::path::Path>,
    opts: &OpenOptions,
    chain: &[PathBuf],
) -> Result<Option<super::Backing>> {
    let (name, format) = match &opts.backing_override {
        Some(o) => match &o.path {
            Some(p) => (p.clone(), o.format.clone()),
            None => return Ok(None),
        },
        None => match &ih.backing_file {
            Some(n) => {
                let resolved = resolve_relative(path, n);
                opts.references.check("backing file", n, &resolved)?;
                (resolved, ih.backing_format().map(str::to_string))
            }
            None => return Ok(None),
        },
    };
    Ok(Some(
        open_backing(&name, format.as_deref(), opts, chain).await?,
    ))
}

/// Open the external data file: the caller's as given (writable with the image), or the
/// header's name if the reference policy allows it (writable only if the caller opted in).
async fn open_data_file(
    ih: &ImageHeader,
    file: &Arc<dyn Storage>,
    path: Option<&std::path::Path>,
    opts: &OpenOptions,
) -> Result<(Arc<dyn Storage>, Option<PathBuf>)> {
    if !ih.header.has_external_data_file() {
        return Ok((file.clone(), None));
    }
    let (p, writable) = match (&opts.data_file, ih.data_file()) {
        (Some(p), _) => (p.clone(), opts.writable),
        (None, Some(name)) => {
            let resolved = resolve_relative(path, name);
            opts.references
                .check("external data file", name, &resolved)?;
            if opts.writable && !opts.writable_data_file {
                return Err(Error::new(
                    ErrorKind::Refused,
                    format!(
                        "not opening the external data file '{name}' that the image names for \
                         writing: writable data files are off (OpenOptions::writable_data_file)"
                    ),
                ));
            }
            (resolved, opts.writable)
        }
        (None, None) => {
            return Err(Error::invalid(
                "image needs an external data file but names none (pass one explicitly)",
            ));
        }
    };
    let flags = OpenFlags {
        read_only: !writable,
        direct: opts.direct,
    };
    let lock = opts
        .locking
        .then(|| LockRequest::data_file(writable, opts.force_share));
    let s = crate::storage::open_file_locked(&p, flags, opts.io_backend, lock)
        .map_err(|e| Error::open("opening the external data file", &p, e))?;
    Ok((s, Some(p)))
}
