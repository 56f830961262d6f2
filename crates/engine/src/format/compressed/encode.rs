//! Compressing one cluster with codec state kept per thread.
//!
//! Building a deflate or zstd compressor allocates and clears its tables (hundreds of KiB),
//! which cost as much as compressing a 64 KiB cluster. Each thread therefore keeps one
//! compressor per codec and one output buffer, and resets them between clusters. A reset
//! compressor produces the same bytes as a new one (tested), so the output does not depend on
//! which thread compressed a cluster.

use std::cell::RefCell;

use crate::error::{Error, Result};

/// Window bits QEMU uses for raw deflate (4 KiB window).
const DEFLATE_WINDOW_BITS: u8 = 12;

thread_local! {
    /// This thread's raw deflate compressor (QEMU's settings), made on first use.
    static DEFLATE: RefCell<Option<flate2::Compress>> = const { RefCell::new(None) };
    /// This thread's zstd context at the default level, made on first use.
    #[cfg(feature = "zstd")]
    static ZSTD: RefCell<Option<zstd::bulk::Compressor<'static>>> = const { RefCell::new(None) };
    /// Output buffer the codecs write into; only the compressed bytes are copied out.
    static OUT: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
}

/// Raw deflate with QEMU's 4 KiB window, default level. `None` when the stream does not fit
/// in `input.len() - 1` bytes (QEMU's limit: such a cluster is stored uncompressed).
pub(super) fn deflate_raw(input: &[u8]) -> Result<Option<Vec<u8>>> {
    use flate2::{Compress, Compression, FlushCompress, Status};
    DEFLATE.with_borrow_mut(|slot| {
        let c = slot.get_or_insert_with(|| {
            Compress::new_with_window_bits(Compression::default(), false, DEFLATE_WINDOW_BITS)
        });
        c.reset();
        let done = OUT.with_borrow_mut(|out| {
            // Same length every cluster: the buffer is cleared once, not per call.
            out.resize(input.len().saturating_sub(1), 0);
            let status = c.compress(input, out, FlushCompress::Finish);
            let len = usize::try_from(c.total_out()).unwrap_or(usize::MAX);
            status.map(|s| (s == Status::StreamEnd).then(|| out[..len.min(out.len())].to_vec()))
        });
        // Only a stream that ended is reused: zlib-rs 0.6.8 panics in a stream reset after
        // running out of output room (seen with 4 KiB clusters), so that one is dropped.
        if !matches!(done, Ok(Some(_))) {
            *slot = None;
        }
        done.map_err(|e| Error::invalid_arg(format!("deflate failed: {e}")))
    })
}

/// zstd at the default level, one frame. The output buffer has zstd's worst-case bound, so
/// compression never fails for lack of room; the caller compares the size.
#[cfg(feature = "zstd")]
pub(super) fn zstd_compress(input: &[u8]) -> Result<Option<Vec<u8>>> {
    ZSTD.with_borrow_mut(|slot| {
        let c = match slot {
            Some(c) => c,
            None => slot.insert(
                zstd::bulk::Compressor::new(0)
                    .map_err(|e| Error::io("creating a zstd compressor", e))?,
            ),
        };
        OUT.with_borrow_mut(|out| {
            out.clear();
            out.reserve(zstd::zstd_safe::compress_bound(input.len()));
            c.compress_to_buffer(input, out)
                .map_err(|e| Error::io("zstd compression", e))?;
            Ok(Some(out.as_slice().to_vec()))
        })
    })
}

/// Without the `zstd` feature, clusters cannot be compressed with zstd.
#[cfg(not(feature = "zstd"))]
pub(super) fn zstd_compress(_input: &[u8]) -> Result<Option<Vec<u8>>> {
    Err(Error::unsupported(
        "zstd compression (qcow2-engine was built without its `zstd` feature)",
    ))
}
