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

/// The codecs this build has.
#[cfg(feature = "zstd")]
const CODECS: &[CompressionType] = &[CompressionType::Zlib, CompressionType::Zstd];
#[cfg(not(feature = "zstd"))]
const CODECS: &[CompressionType] = &[CompressionType::Zlib];

fn sample_cluster() -> Vec<u8> {
    (0..65536u32).map(|i| (i / 7 % 13) as u8).collect()
}

#[test]
fn round_trip_both_codecs_with_trailing_garbage() {
    let data = sample_cluster();
    for &kind in CODECS {
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
    for &kind in CODECS {
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

#[cfg(feature = "zstd")]
#[test]
fn truncated_zstd_is_corrupt() {
    let data = sample_cluster();
    let c = compress(CompressionType::Zstd, &data).unwrap().unwrap();
    let mut out = vec![0u8; data.len()];
    let err = decompress(CompressionType::Zstd, &c[..c.len() / 2], &mut out).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Corrupt);
}

#[cfg(feature = "zstd")]
#[test]
fn garbage_zstd_is_corrupt() {
    let mut out = [0u8; 512];
    let err = decompress(CompressionType::Zstd, &[0xde, 0xad, 0xbe, 0xef], &mut out);
    assert_eq!(err.unwrap_err().kind(), ErrorKind::Corrupt);
    let err = decompress(CompressionType::Zstd, &[], &mut out).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Corrupt);
}

#[cfg(feature = "zstd")]
#[test]
fn zstd_frame_longer_than_cluster_is_corrupt() {
    let data = sample_cluster();
    let c = compress(CompressionType::Zstd, &data).unwrap().unwrap();
    let mut out = vec![0u8; 4096];
    let err = decompress(CompressionType::Zstd, &c, &mut out).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Corrupt);
}

#[cfg(feature = "zstd")]
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

#[cfg(feature = "zstd")]
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

/// A fresh raw deflate compressor with QEMU's settings, for comparison with the reused one.
fn deflate_fresh(input: &[u8]) -> Vec<u8> {
    use flate2::{Compress, Compression, FlushCompress};
    let mut c = Compress::new_with_window_bits(Compression::default(), false, 12);
    let mut out = Vec::with_capacity(input.len() * 2 + 64);
    c.compress_vec(input, &mut out, FlushCompress::Finish)
        .unwrap();
    out
}

/// The per-thread compressors are reset between clusters: after a compressible cluster, an
/// incompressible one (which leaves the deflate stream unfinished) and a short tail, each
/// result is byte-identical to a brand-new compressor's, so output never depends on which
/// thread compressed a cluster or what it compressed before.
#[test]
fn reused_compressors_match_fresh_ones() {
    let mut x: u32 = 7;
    let random: Vec<u8> = (0..65536)
        .map(|_| {
            x = x.wrapping_mul(1_103_515_245).wrapping_add(12345);
            (x >> 16) as u8
        })
        .collect();
    let text: Vec<u8> = (0..65536u32)
        .map(|i| b"qcow2 cluster "[i as usize % 14])
        .collect();
    let tail: Vec<u8> = sample_cluster()[..5000].to_vec();
    let mut inputs = vec![
        sample_cluster(),
        random.clone(),
        text,
        tail,
        sample_cluster(),
    ];
    // 4 KiB clusters: incompressible ones (the stream runs out of output room) between
    // compressible ones.
    let small = sample_cluster()[..4096].to_vec();
    for r in random.chunks(4096).take(4) {
        inputs.extend([r.to_vec(), small.clone()]);
    }
    for &kind in CODECS {
        for input in &inputs {
            let fresh = match kind {
                CompressionType::Zlib => deflate_fresh(input),
                #[cfg(feature = "zstd")]
                CompressionType::Zstd => zstd::bulk::compress(input, 0).unwrap(),
                #[cfg(not(feature = "zstd"))]
                CompressionType::Zstd => unreachable!(),
            };
            let expect = (fresh.len() < input.len()).then_some(fresh);
            assert_eq!(compress(kind, input).unwrap(), expect, "{kind:?}");
        }
    }
}
