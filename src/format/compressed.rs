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

/// Size of a compressed-data sector, the unit of the descriptor's sector count.
pub const SECTOR_SIZE: u64 = 512;
/// Bit 62 of an L2 entry: the cluster is compressed.
const COMPRESSED_FLAG: u64 = 1 << 62;
/// Compressed payloads must lie below 64 PiB (bits 0-55), like every other host offset.
const MAX_HOST_BITS: u32 = 56;
/// Window bits QEMU uses for raw deflate (4 KiB window).
const DEFLATE_WINDOW_BITS: u8 = 12;
/// Largest zstd window accepted when decompressing: 8 MiB, four times the largest cluster
/// (QEMU compresses one cluster per frame, so its windows never exceed 2 MiB).
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
                    .at(self.host.0),
            );
        }
        if self.sectors > low_mask(62 - x) {
            return Err(
                Error::invalid_arg("compressed cluster size too large for the L2 entry")
                    .at(self.host.0),
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
            .ok_or_else(|| Error::invalid_arg("compressed cluster end overflows").at(host.0))?;
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

/// Raw inflate. The decoder uses a 32 KiB window, a superset of the 4 KiB QEMU writes with.
fn inflate_raw(input: &[u8], out: &mut [u8]) -> Result<()> {
    use flate2::{Decompress, FlushDecompress, Status};
    let mut d = Decompress::new(false);
    loop {
        let (in_pos, out_pos) = (d.total_in() as usize, d.total_out() as usize);
        if out_pos >= out.len() {
            return Ok(());
        }
        let (src, dst) = (&input[in_pos.min(input.len())..], &mut out[out_pos..]);
        let status = d
            .decompress(src, dst, FlushDecompress::Finish)
            .map_err(|e| {
                Error::corrupt(format!("invalid deflate data in compressed cluster: {e}"))
            })?;
        let progressed = d.total_in() as usize != in_pos || d.total_out() as usize != out_pos;
        let full = d.total_out() as usize >= out.len();
        if !full && (status == Status::StreamEnd || !progressed) {
            return Err(Error::corrupt(
                "compressed cluster data ends before a full cluster",
            ));
        }
    }
}

/// Raw deflate with QEMU's 4 KiB window, default level. `None` when the output would not be
/// smaller than the input.
fn deflate_raw(input: &[u8]) -> Result<Option<Vec<u8>>> {
    use flate2::{Compress, Compression, FlushCompress, Status};
    let mut c = Compress::new_with_window_bits(Compression::default(), false, DEFLATE_WINDOW_BITS);
    // One byte less than the input: a result that does not fit is useless anyway.
    let mut out = Vec::with_capacity(input.len().saturating_sub(1));
    let status = c
        .compress_vec(input, &mut out, FlushCompress::Finish)
        .map_err(|e| Error::invalid_arg(format!("deflate failed: {e}")))?;
    Ok((status == Status::StreamEnd).then_some(out))
}

/// Decompress zstd frames until `out` is full, as QEMU does (several frames are allowed; a
/// frame that is still unfinished once the cluster is full means the data is too long).
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

/// zstd at the default level. `None` when the output would not be smaller than the input.
fn zstd_compress(input: &[u8]) -> Result<Option<Vec<u8>>> {
    let out = zstd::bulk::compress(input, 0).map_err(|e| Error::io("zstd compression", e))?;
    Ok(Some(out))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::ErrorKind;

    #[test]
    fn decode_literal_64k_descriptor() {
        // cluster_bits 16: x = 62 - 8 = 54; host bits 0-53, sectors bits 54-61.
        let raw: u64 = (1 << 62) // COMPRESSED
            | (3 << 54)          // 3 additional sectors
            | 0x0005_0123; // host byte offset 0x50123
        let d = CompressedDescriptor::decode(raw, 16);
        assert_eq!(
            d,
            CompressedDescriptor {
                host: HostOffset(0x50123),
                sectors: 3
            }
        );
        // 4 sectors from the sector holding 0x50123 (0x50000) end at 0x50800.
        assert_eq!(d.read_len(), 0x50800 - 0x50123);
        assert_eq!(d.encode(16).unwrap(), raw);
    }

    #[test]
    fn decode_literal_512_byte_cluster_descriptor() {
        // cluster_bits 9: x = 61; host bits 0-60, sector count is bit 61 alone.
        let raw: u64 = 0x6000_0000_0000_0e00; // COMPRESSED | 1 extra sector | host 0xe00
        let d = CompressedDescriptor::decode(raw, 9);
        assert_eq!(
            d,
            CompressedDescriptor {
                host: HostOffset(0xe00),
                sectors: 1
            }
        );
        assert_eq!(d.read_len(), 1024);
        assert_eq!(d.encode(9).unwrap(), raw);
    }

    #[test]
    fn decode_literal_2m_descriptor_ignores_flags() {
        // cluster_bits 21: x = 49; sectors are bits 49-61 (13 bits).
        let raw: u64 = (1 << 63) | (1 << 62) | (0x1fff << 49) | 0x1_0000_0200;
        let d = CompressedDescriptor::decode(raw, 21);
        assert_eq!(
            d,
            CompressedDescriptor {
                host: HostOffset(0x1_0000_0200),
                sectors: 0x1fff
            }
        );
    }

    #[test]
    fn encode_decode_identity_all_cluster_sizes() {
        for bits in 9..=21 {
            let x = 62 - (bits - 8);
            let max_sectors = (1u64 << (bits - 8)) - 1;
            let max_host = (1u64 << x.min(56)) - 1;
            for d in [
                CompressedDescriptor {
                    host: HostOffset(0),
                    sectors: 0,
                },
                CompressedDescriptor {
                    host: HostOffset(12345),
                    sectors: max_sectors,
                },
                CompressedDescriptor {
                    host: HostOffset(max_host),
                    sectors: 1,
                },
            ] {
                let raw = d.encode(bits).unwrap();
                assert_eq!(raw >> 62, 1, "bit 62 set, bit 63 clear");
                assert_eq!(CompressedDescriptor::decode(raw, bits), d);
            }
        }
    }

    #[test]
    fn encode_rejects_too_many_sectors() {
        let d = CompressedDescriptor {
            host: HostOffset(0),
            sectors: 256,
        };
        let err = d.encode(16).unwrap_err(); // 8 sector bits at 64 KiB clusters
        assert_eq!(err.kind(), ErrorKind::InvalidArgument);
    }

    #[test]
    fn encode_rejects_host_beyond_field() {
        // At 2 MiB clusters the host field is 49 bits wide.
        let d = CompressedDescriptor {
            host: HostOffset(1 << 49),
            sectors: 0,
        };
        assert_eq!(d.encode(21).unwrap_err().kind(), ErrorKind::InvalidArgument);
    }

    #[test]
    fn encode_rejects_host_beyond_bit_55() {
        // At 512-byte clusters the field is 61 bits, but bits 56+ must stay 0.
        let d = CompressedDescriptor {
            host: HostOffset(1 << 56),
            sectors: 0,
        };
        assert_eq!(d.encode(9).unwrap_err().kind(), ErrorKind::InvalidArgument);
    }

    #[test]
    fn new_counts_sectors_like_qemu() {
        // 100 bytes inside one sector: no additional sectors.
        let d = CompressedDescriptor::new(HostOffset(0x10010), 100, 16).unwrap();
        assert_eq!(d.sectors, 0);
        assert_eq!(d.read_len(), 512 - 0x10);
        // 0x1f0 + 0x20 crosses into the next sector.
        let d = CompressedDescriptor::new(HostOffset(0x101f0), 0x20, 16).unwrap();
        assert_eq!(d.sectors, 1);
        // Exactly one full sector.
        let d = CompressedDescriptor::new(HostOffset(0x10200), 512, 16).unwrap();
        assert_eq!(d.sectors, 0);
    }

    #[test]
    fn new_rejects_empty_and_oversized() {
        assert!(CompressedDescriptor::new(HostOffset(0), 0, 16).is_err());
        assert!(CompressedDescriptor::new(HostOffset(0), 257 * 512, 16).is_err());
        assert!(CompressedDescriptor::new(HostOffset(u64::MAX), 2, 16).is_err());
    }

    #[test]
    fn host_clusters_spanning_a_boundary() {
        // 64 KiB clusters; payload at 0x1ff00, 2 extra sectors → ends at 0x20400.
        let d = CompressedDescriptor {
            host: HostOffset(0x1ff00),
            sectors: 2,
        };
        assert_eq!(d.read_len(), 0x20400 - 0x1ff00);
        assert_eq!(d.host_clusters(16), (1, 2));
        // A payload ending exactly at the boundary stays in one cluster.
        let d = CompressedDescriptor {
            host: HostOffset(0x1fe00),
            sectors: 0,
        };
        assert_eq!(d.host_clusters(16), (1, 1));
    }

    #[test]
    fn read_len_and_host_clusters_never_overflow() {
        let d = CompressedDescriptor {
            host: HostOffset(u64::MAX),
            sectors: u64::MAX,
        };
        let _ = d.read_len();
        let _ = d.host_clusters(200);
        let _ = CompressedDescriptor::decode(u64::MAX, 0);
        let _ = CompressedDescriptor::decode(u64::MAX, 100);
    }

    #[test]
    fn compression_type_bytes() {
        assert_eq!(CompressionType::from_u8(0).unwrap(), CompressionType::Zlib);
        assert_eq!(CompressionType::from_u8(1).unwrap(), CompressionType::Zstd);
        assert_eq!(CompressionType::Zstd.to_u8(), 1);
        assert_eq!(u8::from(CompressionType::Zlib), 0);
        let err = CompressionType::try_from(2).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Unsupported);
    }

    fn sample_cluster() -> Vec<u8> {
        (0..65536u32).map(|i| (i / 7 % 13) as u8).collect()
    }

    #[test]
    fn round_trip_both_codecs_with_trailing_garbage() {
        let data = sample_cluster();
        for kind in [CompressionType::Zlib, CompressionType::Zstd] {
            let mut c = compress(kind, &data).unwrap().expect("compressible");
            assert!(c.len() < data.len());
            c.extend_from_slice(&[0xa5; 300]); // rest of the last sector
            let mut out = vec![0u8; data.len()];
            decompress(kind, &c, &mut out).unwrap();
            assert_eq!(out, data, "{kind:?}");
        }
    }

    #[test]
    fn incompressible_data_gives_none() {
        let mut x: u32 = 12345;
        let data: Vec<u8> = (0..4096)
            .map(|_| {
                x = x.wrapping_mul(1_103_515_245).wrapping_add(12345);
                (x >> 16) as u8
            })
            .collect();
        for kind in [CompressionType::Zlib, CompressionType::Zstd] {
            assert_eq!(compress(kind, &data).unwrap(), None, "{kind:?}");
        }
    }

    #[test]
    fn literal_raw_deflate_stream() {
        // A fixed-Huffman raw deflate block: "a" then a match of length 7 at distance 1,
        // end of block; produces "aaaaaaaa". Followed by padding garbage.
        let stream = [0x4b, 0x84, 0x02, 0x00, 0xff, 0xff];
        let mut out = [0u8; 8];
        decompress(CompressionType::Zlib, &stream, &mut out).unwrap();
        assert_eq!(&out, b"aaaaaaaa");
    }

    #[test]
    fn truncated_deflate_is_corrupt() {
        let data = sample_cluster();
        let c = compress(CompressionType::Zlib, &data).unwrap().unwrap();
        let mut out = vec![0u8; data.len()];
        let err = decompress(CompressionType::Zlib, &c[..c.len() / 2], &mut out).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Corrupt);
    }

    #[test]
    fn deflate_stream_shorter_than_cluster_is_corrupt() {
        let mut out = [0u8; 16]; // the literal stream only yields 8 bytes
        let err = decompress(CompressionType::Zlib, &[0x4b, 0x84, 0x02, 0x00], &mut out);
        assert_eq!(err.unwrap_err().kind(), ErrorKind::Corrupt);
    }

    #[test]
    fn garbage_deflate_is_corrupt() {
        let mut out = [0u8; 512];
        // BTYPE = 11 (reserved block type) is always invalid.
        let err = decompress(CompressionType::Zlib, &[0x07, 0, 0, 0], &mut out).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Corrupt);
        let err = decompress(CompressionType::Zlib, &[], &mut out).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Corrupt);
    }

    #[test]
    fn truncated_zstd_is_corrupt() {
        let data = sample_cluster();
        let c = compress(CompressionType::Zstd, &data).unwrap().unwrap();
        let mut out = vec![0u8; data.len()];
        let err = decompress(CompressionType::Zstd, &c[..c.len() / 2], &mut out).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Corrupt);
    }

    #[test]
    fn garbage_zstd_is_corrupt() {
        let mut out = [0u8; 512];
        let err = decompress(CompressionType::Zstd, &[0xde, 0xad, 0xbe, 0xef], &mut out);
        assert_eq!(err.unwrap_err().kind(), ErrorKind::Corrupt);
        let err = decompress(CompressionType::Zstd, &[], &mut out).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Corrupt);
    }

    #[test]
    fn zstd_frame_longer_than_cluster_is_corrupt() {
        let data = sample_cluster();
        let c = compress(CompressionType::Zstd, &data).unwrap().unwrap();
        let mut out = vec![0u8; 4096];
        let err = decompress(CompressionType::Zstd, &c, &mut out).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Corrupt);
    }

    #[test]
    fn zstd_window_over_8_mib_is_corrupt() {
        use std::io::Write;
        // A streamed frame (no content size) declaring a 32 MiB window.
        let mut enc = zstd::stream::Encoder::new(Vec::new(), 3).unwrap();
        enc.set_parameter(zstd::stream::raw::CParameter::WindowLog(25))
            .unwrap();
        enc.write_all(&[7u8; 4096]).unwrap();
        let frame = enc.finish().unwrap();
        let mut out = vec![0u8; 4096];
        let err = decompress(CompressionType::Zstd, &frame, &mut out).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Corrupt);
    }

    #[test]
    fn zstd_accepts_several_frames() {
        let (a, b) = (vec![1u8; 2048], vec![2u8; 2048]);
        let mut c = zstd::bulk::compress(&a, 0).unwrap();
        c.extend(zstd::bulk::compress(&b, 0).unwrap());
        let mut out = vec![0u8; 4096];
        decompress(CompressionType::Zstd, &c, &mut out).unwrap();
        assert_eq!(&out[..2048], &a[..]);
        assert_eq!(&out[2048..], &b[..]);
    }
    /// Guest data for the QEMU fixture: compressible but not trivial, different per cluster.
    fn fixture_data(len: usize) -> Vec<u8> {
        (0..len)
            .map(|i| b"qcow2 compressed cluster fixture "[i % 33] ^ (i >> 16) as u8)
            .collect()
    }

    /// Big-endian u64 at `off` of a file.
    fn be64(b: &[u8], off: usize) -> u64 {
        u64::from_be_bytes(b[off..off + 8].try_into().unwrap())
    }

    /// Convert raw data with `qemu-img convert -c` and decode every cluster through our
    /// L1/L2/descriptor/codec code. False when qemu-img is not installed.
    fn check_qemu_compressed(kind: CompressionType, opts: &str) -> bool {
        use crate::format::{l1, l2};
        let dir = tempfile::tempdir().unwrap();
        let (raw, img) = (dir.path().join("in.raw"), dir.path().join("out.qcow2"));
        let data = fixture_data(4 * 65536);
        std::fs::write(&raw, &data).unwrap();
        let status = std::process::Command::new("qemu-img")
            .args(["convert", "-c", "-f", "raw", "-O", "qcow2", "-o", opts])
            .arg(&raw)
            .arg(&img)
            .status();
        let Ok(status) = status else { return false };
        assert!(status.success());
        let file = std::fs::read(&img).unwrap();
        let cluster_bits = u32::from_be_bytes(file[20..24].try_into().unwrap());
        let geo = l2::L2Geometry {
            cluster_bits,
            extended: false,
            version3: true,
        };
        let cs = geo.cluster_size() as usize;
        let l1_off = be64(&file, 40) as usize;
        let l2_off = l1::parse_table(&file[l1_off..l1_off + 8])[0]
            .l2_offset()
            .unwrap()
            .0 as usize;
        for (i, want) in data.chunks(cs).enumerate() {
            let (raw_entry, _) = l2::read_raw(&file[l2_off..l2_off + cs], i, &geo).unwrap();
            let l2::L2Entry::Compressed(d) = l2::L2Entry::decode(raw_entry, &geo).unwrap() else {
                panic!("cluster {i} not compressed: {raw_entry:#x}");
            };
            let start = d.host.0 as usize;
            let end = (start + d.read_len() as usize).min(file.len());
            let mut out = vec![0u8; cs];
            decompress(kind, &file[start..end], &mut out).unwrap();
            assert_eq!(out, want, "cluster {i}");
        }
        true
    }

    #[test]
    fn decompress_qemu_made_zlib_clusters() {
        if !check_qemu_compressed(CompressionType::Zlib, "cluster_size=65536") {
            eprintln!("qemu-img not found; skipping");
        }
    }

    #[test]
    fn decompress_qemu_made_zstd_clusters() {
        let opts = "cluster_size=65536,compression_type=zstd";
        if !check_qemu_compressed(CompressionType::Zstd, opts) {
            eprintln!("qemu-img not found; skipping");
        }
    }
}
