//! Compressed cluster descriptors and the two compression codecs (raw deflate, zstd).
//!
//! An L2 entry with bit 62 set describes a compressed cluster (qcow2.txt, "Compressed
//! Clusters Descriptor"), with `x = 62 - (cluster_bits - 8)`:
//!
//! ```text
//!  bits     field            meaning
//!  0 - x-1  host offset      byte offset of the compressed data; usually NOT aligned to a
//!                            cluster or sector. Bits beyond 55 must be 0.
//!  x - 61   sectors          number of additional 512-byte sectors used beyond the sector
//!                            holding the host offset; they may run into the next host cluster
//!     62    COMPRESSED       always 1
//!     63    COPIED           never set for compressed clusters
//! ```
//!
//! The compressed bytes run from `host` to the end of its last sector: `read_len()` =
//! `(sectors + 1) * 512 - host % 512`. The stream usually ends before that; decoders stop once
//! a whole cluster is produced and must accept the trailing bytes (another cluster's payload
//! may start in the same final sector). Every host cluster the range touches carries one
//! reference per compressed payload touching it — a payload can span two host clusters that
//! are shared with neighbouring payloads.
//!
//! Codecs (header field `compression_type`, byte 104): 0 = zlib, which in qcow2 means a RAW
//! deflate stream (no zlib header or checksum) written with a 4 KiB window; 1 = zstd, one or
//! more zstd frames.

use crate::error::{Error, Result};
use crate::units::HostOffset;

mod encode;
use encode::{deflate_raw, zstd_compress};

/// Size of a compressed-data sector, the unit of the descriptor's sector count.
pub const SECTOR_SIZE: u64 = 512;
/// Bit 62 of an L2 entry: the cluster is compressed.
const COMPRESSED_FLAG: u64 = 1 << 62;
/// Compressed payloads must lie below 64 PiB (bits 0-55), like every other host offset.
const MAX_HOST_BITS: u32 = 56;
/// Largest zstd window accepted when decompressing: 8 MiB, four times the largest cluster
/// (QEMU compresses one cluster per frame, so its windows never exceed 2 MiB).
#[cfg(feature = "zstd")]
const ZSTD_WINDOW_LOG_MAX: u32 = 23;

/// A decoded compressed cluster descriptor (the L2 entry without its flag bits).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CompressedDescriptor {
    /// Byte offset of the compressed data in the image file (not aligned).
    pub host: HostOffset,
    /// Number of additional 512-byte sectors beyond the first one holding `host`.
    pub sectors: u64,
}

/// `x` of the spec: the first bit of the sector-count field, `62 - (cluster_bits - 8)`.
/// `cluster_bits` outside the valid range is clamped so that no shift overflows.
fn sector_shift(cluster_bits: u32) -> u32 {
    62 - cluster_bits.clamp(9, 62).saturating_sub(8)
}

/// Mask of `n` low bits (`n` ≤ 64).
fn low_mask(n: u32) -> u64 {
    if n >= 64 { u64::MAX } else { (1u64 << n) - 1 }
}

impl CompressedDescriptor {
    /// Decode the descriptor from a raw L2 entry (flag bits 62/63 are ignored).
    pub fn decode(raw: u64, cluster_bits: u32) -> CompressedDescriptor {
        let x = sector_shift(cluster_bits);
        CompressedDescriptor {
            host: HostOffset(raw & low_mask(x)),
            sectors: (raw >> x) & low_mask(62 - x),
        }
    }

    /// Encode as a raw L2 entry: bit 62 set, COPIED clear. Fails with
    /// [`InvalidArgument`](crate::error::ErrorKind::InvalidArgument) when the host offset or the
    /// sector count does not fit its field (or the host offset reaches bit 56).
    pub fn encode(&self, cluster_bits: u32) -> Result<u64> {
        let x = sector_shift(cluster_bits);
        let host_bits = x.min(MAX_HOST_BITS);
        if self.host.0 > low_mask(host_bits) {
            return Err(
                Error::invalid_arg("compressed cluster offset too large for the L2 entry")
                    .at_host(self.host),
            );
        }
        if self.sectors > low_mask(62 - x) {
            return Err(
                Error::invalid_arg("compressed cluster size too large for the L2 entry")
                    .at_host(self.host),
            );
        }
        Ok(self.encode_masked(cluster_bits))
    }

    /// Encode like [`encode`](Self::encode), but mask out-of-range fields instead of failing
    /// (host to its field and bits 0-55, sectors to its field).
    pub fn encode_masked(&self, cluster_bits: u32) -> u64 {
        let x = sector_shift(cluster_bits);
        let host = self.host.0 & low_mask(x.min(MAX_HOST_BITS));
        COMPRESSED_FLAG | ((self.sectors & low_mask(62 - x)) << x) | host
    }

    /// The descriptor for `compressed_len` bytes of compressed data stored at `host`, computed
    /// as QEMU does: `sectors = (host + len - 1) / 512 - host / 512`. Fails when
    /// `compressed_len` is 0 or the result does not fit an L2 entry.
    pub fn new(host: HostOffset, compressed_len: u64, cluster_bits: u32) -> Result<Self> {
        if compressed_len == 0 {
            return Err(Error::invalid_arg("compressed cluster of length 0"));
        }
        let end = host
            .0
            .checked_add(compressed_len - 1)
            .ok_or_else(|| Error::invalid_arg("compressed cluster end overflows").at_host(host))?;
        let d = CompressedDescriptor {
            host,
            sectors: end / SECTOR_SIZE - host.0 / SECTOR_SIZE,
        };
        d.encode(cluster_bits)?;
        Ok(d)
    }

    /// Bytes to read from `host`: up to the end of the last sector,
    /// `(sectors + 1) * 512 - host % 512`. Saturates instead of overflowing.
    pub fn read_len(&self) -> u64 {
        self.sectors
            .saturating_add(1)
            .saturating_mul(SECTOR_SIZE)
            .saturating_sub(self.host.0 % SECTOR_SIZE)
    }

    /// Indices (host offset >> cluster_bits) of the first and last host clusters the payload's
    /// byte range `host .. host + read_len()` touches. Each of them holds one reference for
    /// this payload (they are equal unless the payload spans a cluster boundary).
    pub fn host_clusters(&self, cluster_bits: u32) -> (u64, u64) {
        let shift = cluster_bits.min(63);
        let last_byte = self
            .host
            .0
            .saturating_add(self.read_len().saturating_sub(1));
        (self.host.0 >> shift, last_byte >> shift)
    }
}

/// The image's compression codec (header byte 104).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum CompressionType {
    /// 0: raw deflate (called "zlib" by QEMU), the default.
    #[default]
    Zlib,
    /// 1: zstd.
    Zstd,
}

impl CompressionType {
    /// Decode the header's `compression_type` byte; other values are
    /// [`Unsupported`](crate::error::ErrorKind::Unsupported).
    pub fn from_u8(v: u8) -> Result<CompressionType> {
        match v {
            0 => Ok(CompressionType::Zlib),
            1 => Ok(CompressionType::Zstd),
            _ => Err(Error::unsupported(format!("compression type {v}"))),
        }
    }

    /// The header's `compression_type` byte for this codec.
    pub fn to_u8(self) -> u8 {
        match self {
            CompressionType::Zlib => 0,
            CompressionType::Zstd => 1,
        }
    }
}

impl TryFrom<u8> for CompressionType {
    type Error = Error;
    fn try_from(v: u8) -> Result<Self> {
        CompressionType::from_u8(v)
    }
}

impl From<CompressionType> for u8 {
    fn from(c: CompressionType) -> u8 {
        c.to_u8()
    }
}

/// Decompress one cluster: fill all of `out` from the compressed bytes `input` (which may
/// carry trailing garbage after the end of the stream). Invalid data, or data that ends
/// before `out` is full, is a [`Corrupt`](crate::error::ErrorKind::Corrupt) error.
pub fn decompress(kind: CompressionType, input: &[u8], out: &mut [u8]) -> Result<()> {
    match kind {
        CompressionType::Zlib => inflate_raw(input, out),
        CompressionType::Zstd => zstd_decompress(input, out),
    }
}

/// Compress one cluster. Returns `None` when the result would not be smaller than `input`
/// (the caller then writes the cluster uncompressed, as QEMU does).
pub fn compress(kind: CompressionType, input: &[u8]) -> Result<Option<Vec<u8>>> {
    let out = match kind {
        CompressionType::Zlib => deflate_raw(input)?,
        CompressionType::Zstd => zstd_compress(input)?,
    };
    Ok(out.filter(|c| c.len() < input.len()))
}

/// A decoder's byte count as a slice index. The counts never exceed the buffers (at most
/// 2 MiB); saturating keeps a hypothetical larger one "past the end" rather than wrapping.
fn index(n: u64) -> usize {
    usize::try_from(n).unwrap_or(usize::MAX)
}

/// Raw inflate. The decoder uses a 32 KiB window, a superset of the 4 KiB QEMU writes with.
fn inflate_raw(input: &[u8], out: &mut [u8]) -> Result<()> {
    use flate2::{Decompress, FlushDecompress, Status};
    let mut d = Decompress::new(false);
    loop {
        let (in_pos, out_pos) = (index(d.total_in()), index(d.total_out()));
        if out_pos >= out.len() {
            return Ok(());
        }
        let (src, dst) = (&input[in_pos.min(input.len())..], &mut out[out_pos..]);
        let status = d
            .decompress(src, dst, FlushDecompress::Finish)
            .map_err(|e| {
                Error::corrupt(format!("invalid deflate data in compressed cluster: {e}"))
            })?;
        let progressed = index(d.total_in()) != in_pos || index(d.total_out()) != out_pos;
        let full = index(d.total_out()) >= out.len();
        if !full && (status == Status::StreamEnd || !progressed) {
            return Err(Error::corrupt(
                "compressed cluster data ends before a full cluster",
            ));
        }
    }
}

/// Decompress zstd frames until `out` is full, as QEMU does (several frames are allowed; a
/// frame that is still unfinished once the cluster is full means the data is too long).
#[cfg(feature = "zstd")]
fn zstd_decompress(input: &[u8], out: &mut [u8]) -> Result<()> {
    use zstd::stream::raw::{DParameter, Decoder, InBuffer, Operation, OutBuffer};
    let mut dec = Decoder::new().map_err(|e| Error::io("creating a zstd decoder", e))?;
    // Bound the window an untrusted frame can make us allocate (zstd's default is 128 MiB).
    dec.set_parameter(DParameter::WindowLogMax(ZSTD_WINDOW_LOG_MAX))
        .map_err(|e| Error::io("configuring the zstd decoder", e))?;
    let mut src = InBuffer::around(input);
    let mut dst = OutBuffer::around(out);
    let mut hint = 0;
    while dst.pos() < dst.capacity() {
        let (in_pos, out_pos) = (src.pos(), dst.pos());
        hint = dec
            .run(&mut src, &mut dst)
            .map_err(|e| Error::corrupt(format!("invalid zstd data in compressed cluster: {e}")))?;
        if src.pos() == in_pos && dst.pos() == out_pos {
            return Err(Error::corrupt(
                "compressed cluster data ends before a full cluster",
            ));
        }
    }
    if hint > 0 {
        return Err(Error::corrupt(
            "zstd data in compressed cluster is longer than a cluster",
        ));
    }
    Ok(())
}

/// Without the `zstd` feature, zstd-compressed clusters cannot be read.
#[cfg(not(feature = "zstd"))]
fn zstd_decompress(_input: &[u8], _out: &mut [u8]) -> Result<()> {
    Err(Error::unsupported(
        "zstd-compressed clusters (qcow2-engine was built without its `zstd` feature)",
    ))
}

#[cfg(test)]
mod tests;
