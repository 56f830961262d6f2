//! Cluster-0 fixtures with extensions and a backing file name, round trips, and one test per
//! malformed extension or rule.

use super::*;
use crate::ErrorKind;
use crate::format::features::FeatureKind;

/// A 512-byte cluster 0 of a v3 image with a backing file.
#[rustfmt::skip]
fn cluster0_fixture() -> Vec<u8> {
    let mut b = vec![
        0x51, 0x46, 0x49, 0xfb,                         // magic
        0, 0, 0, 3,                                     // version 3
        0, 0, 0, 0, 0, 0, 0, 0xe0,                      // backing_file_offset: 224
        0, 0, 0, 8,                                     // backing_file_size: 8
        0, 0, 0, 9,                                     // cluster_bits: 512-byte clusters
        0, 0, 0, 0, 0, 0x10, 0, 0,                      // size: 1 MiB
        0, 0, 0, 0,                                     // crypt_method: none
        0, 0, 0, 32,                                    // l1_size: 32 (32 KiB per entry)
        0, 0, 0, 0, 0, 0, 0x06, 0,                      // l1_table_offset: 0x600
        0, 0, 0, 0, 0, 0, 0x02, 0,                      // refcount_table_offset: 0x200
        0, 0, 0, 1,                                     // refcount_table_clusters: 1
        0, 0, 0, 0,                                     // nb_snapshots
        0, 0, 0, 0, 0, 0, 0, 0,                         // snapshots_offset
        0, 0, 0, 0, 0, 0, 0, 4,                         // incompatible: external data file
        0, 0, 0, 0, 0, 0, 0, 0,                         // compatible
        0, 0, 0, 0, 0, 0, 0, 0,                         // autoclear
        0, 0, 0, 4,                                     // refcount_order: 4
        0, 0, 0, 112,                                   // header_length: 112
        0, 0, 0, 0, 0, 0, 0, 0,                         // compression_type zlib + padding
        // extension at 112: backing format "qcow2"
        0xe2, 0x79, 0x2a, 0xca,                         // type
        0, 0, 0, 5,                                     // length 5
        b'q', b'c', b'o', b'w', b'2', 0, 0, 0,          // data + 3 bytes padding
        // extension at 128: external data file "data.raw"
        0x44, 0x41, 0x54, 0x41,                         // type
        0, 0, 0, 8,                                     // length 8
        b'd', b'a', b't', b'a', b'.', b'r', b'a', b'w', // data, no padding needed
        // extension at 144: unknown type 0x12345678, 3 bytes
        0x12, 0x34, 0x56, 0x78,                         // type
        0, 0, 0, 3,                                     // length 3
        0xaa, 0xbb, 0xcc, 0, 0, 0, 0, 0,                // data + padding
        // extension at 160: feature name table, one entry
        0x68, 0x03, 0xf8, 0x57,                         // type
        0, 0, 0, 48,                                    // length 48
        0, 2,                                           // incompatible, bit 2
    ];
    b.extend_from_slice(b"external data file");             // name
    b.resize(160 + 8 + 48, 0);                              // name zero padding
    b.extend_from_slice(&[0; 8]);                           // end marker at 216
    b.extend_from_slice(b"base.img");                       // backing file name at 224
    b.resize(512, 0);                                       // rest of the cluster
    b
}

fn fixture() -> Vec<u8> {
    cluster0_fixture()
}

fn parsed() -> ImageHeader {
    ImageHeader::parse(&fixture()).unwrap()
}

const FILE_LEN: u64 = 4 * 512;

#[test]
fn fixture_parses() {
    let ih = parsed();
    assert_eq!(ih.backing_file.as_deref(), Some("base.img"));
    assert_eq!(ih.backing_format(), Some("qcow2"));
    assert_eq!(ih.data_file(), Some("data.raw"));
    assert_eq!(ih.extensions.len(), 4);
    assert_eq!(
        ih.extensions[2],
        Extension::Unknown {
            kind: 0x1234_5678,
            data: vec![0xaa, 0xbb, 0xcc]
        }
    );
    assert_eq!(
        ih.feature_names(),
        &[FeatureName::new(
            FeatureKind::Incompatible,
            2,
            "external data file"
        )]
    );
    ih.validate(FILE_LEN).unwrap();
}

#[test]
fn parse_serialize_identity() {
    assert_eq!(parsed().to_cluster0().unwrap(), fixture());
}

#[test]
fn missing_end_marker_is_tolerated_when_area_is_full() {
    let mut b = fixture();
    b[15] = 216; // name right after the feature table, no end marker
    b[216..224].copy_from_slice(b"base.img");
    b[224..232].fill(0);
    let ih = ImageHeader::parse(&b).unwrap();
    assert_eq!(ih.extensions.len(), 4);
    assert_eq!(ih.backing_file.as_deref(), Some("base.img"));
}

#[test]
fn no_backing_file_means_area_runs_to_cluster_end() {
    let mut ih = parsed();
    ih.set_backing(None);
    let c0 = ih.to_cluster0().unwrap();
    let again = ImageHeader::parse(&c0).unwrap();
    assert_eq!(again.header.backing_file_offset, 0);
    assert_eq!(again.backing_file, None);
    assert_eq!(again.backing_format(), None);
    assert_eq!(again.extensions.len(), 3);
}

#[test]
fn set_backing_and_data_file_keep_qemu_order() {
    let mut ih = parsed();
    ih.set_data_file(None);
    ih.set_backing(Some(("other.qcow2".into(), Some("raw".into()))));
    ih.set_data_file(Some("d2".into()));
    assert_eq!(ih.extensions[0], Extension::BackingFormat("raw".into()));
    assert_eq!(ih.extensions[1], Extension::ExternalDataFile("d2".into()));
    let again = ImageHeader::parse(&ih.to_cluster0().unwrap()).unwrap();
    assert_eq!(
        again,
        ImageHeader {
            header: again.header.clone(),
            ..ih
        }
    );
    assert_eq!(again.backing_file.as_deref(), Some("other.qcow2"));
}

#[test]
fn bitmaps_and_fde_round_trip() {
    let exts = vec![
        Extension::Bitmaps {
            nb_bitmaps: 2,
            bitmap_directory_size: 100,
            bitmap_directory_offset: 0x10000,
            raw: vec![0; 24],
        },
        Extension::FullDiskEncryption {
            offset: 0x20000,
            length: 4096,
        },
    ];
    let bytes = serialize_extensions(&exts);
    assert_eq!(bytes.len(), 8 + 24 + 8 + 16 + 8);
    let back = parse_extensions(&bytes, 0).unwrap();
    assert_eq!(back[1], exts[1]);
    let Extension::Bitmaps {
        nb_bitmaps: 2,
        bitmap_directory_size: 100,
        raw,
        ..
    } = &back[0]
    else {
        panic!("{back:?}");
    };
    assert_eq!(raw, &bytes[8..32]);
    assert_eq!(serialize_extensions(&back), bytes);
}

#[test]
fn every_truncation_is_an_error_or_ok_never_a_panic() {
    let b = fixture();
    for n in 0..b.len() {
        let _ = ImageHeader::parse(&b[..n]);
    }
}

// ---- malformed extensions ----

#[test]
fn extension_length_past_area() {
    let mut b = fixture();
    b[112 + 7] = 200; // backing format length 200 runs into the backing name
    let e = ImageHeader::parse(&b).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InvalidImage);
    assert!(e.what().contains("too large"), "{e}");
}

#[test]
fn extension_prefix_truncated() {
    let mut b = fixture();
    b[15] = 220; // area ends 4 bytes into the end marker's prefix
    b[216..220].copy_from_slice(&[1, 2, 3, 4]);
    assert!(
        ImageHeader::parse(&b)
            .unwrap_err()
            .what()
            .contains("truncated")
    );
}

#[test]
fn bitmaps_wrong_length() {
    let bytes = [0x23, 0x85, 0x28, 0x75, 0, 0, 0, 8, 0, 0, 0, 0, 0, 0, 0, 0];
    let e = parse_extensions(&bytes, 0).unwrap_err();
    assert!(e.what().contains("bitmaps extension length"), "{e}");
}

#[test]
fn fde_wrong_length() {
    let bytes = [0x05, 0x37, 0xbe, 0x77, 0, 0, 0, 8, 0, 0, 0, 0, 0, 0, 0, 0];
    let e = parse_extensions(&bytes, 0).unwrap_err();
    assert!(e.what().contains("full disk encryption"), "{e}");
}

#[test]
fn backing_format_not_utf8() {
    let mut b = fixture();
    b[120] = 0xff;
    assert_eq!(
        ImageHeader::parse(&b).unwrap_err().kind(),
        ErrorKind::Unsupported
    );
}

#[test]
fn backing_name_outside_cluster0() {
    let mut b = fixture();
    b[14] = 1; // backing_file_offset 0x1e0 + 8 bytes fits; make it 0x1fc
    b[15] = 0xfc;
    let e = ImageHeader::parse(&b).unwrap_err();
    assert!(e.what().contains("backing file name"), "{e}");
}

#[test]
fn backing_format_too_long() {
    let mut ih = parsed();
    ih.set_backing(Some(("b".into(), Some("x".repeat(16)))));
    let e = ih.validate(FILE_LEN).unwrap_err();
    assert!(e.what().contains("backing format"), "{e}");
}

#[test]
fn unknown_feature_named_from_table() {
    let mut ih = parsed();
    ih.extensions
        .push(Extension::FeatureNameTable(vec![FeatureName::new(
            FeatureKind::Incompatible,
            9,
            "time travel",
        )]));
    ih.extensions
        .retain(|e| e.kind() != EXT_FEATURE_TABLE || e.data().len() == 48);
    ih.extensions.remove(3); // drop the fixture's own table so ours is the first
    ih.header.incompatible_features |= 1 << 9;
    let e = ih.validate(FILE_LEN).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Unsupported);
    assert!(e.what().contains("time travel"), "{e}");
}

#[test]
fn unknown_feature_wins_over_bad_extension() {
    let mut b = fixture();
    b[79] |= 0x80; // incompatible bit 7
    b[112 + 7] = 200; // and a broken extension
    let e = ImageHeader::parse(&b).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Unsupported);
    assert!(e.what().contains("bit 7"), "{e}");
}

#[test]
fn fde_without_luks() {
    let mut ih = parsed();
    ih.extensions.push(Extension::FullDiskEncryption {
        offset: 0,
        length: 0,
    });
    assert!(ih.validate(FILE_LEN).unwrap_err().what().contains("LUKS"));
}

fn with_bitmaps(nb: u32, size: u64, off: u64, reserved: u8) -> ImageHeader {
    let mut ih = parsed();
    ih.header.autoclear_features |= features::BITMAPS;
    let mut raw = vec![0; 24];
    raw[5] = reserved;
    ih.extensions.push(Extension::Bitmaps {
        nb_bitmaps: nb,
        bitmap_directory_size: size,
        bitmap_directory_offset: off,
        raw,
    });
    ih
}

#[test]
fn bitmaps_valid() {
    with_bitmaps(1, 64, 0x400, 0).validate(FILE_LEN).unwrap();
}

#[test]
fn bitmaps_zero_count() {
    assert!(with_bitmaps(0, 64, 0x400, 0).validate(FILE_LEN).is_err());
}

#[test]
fn bitmaps_too_many() {
    assert!(
        with_bitmaps(65536, 64, 0x400, 0)
            .validate(FILE_LEN)
            .is_err()
    );
}

#[test]
fn bitmaps_directory_unaligned() {
    let e = with_bitmaps(1, 64, 0x401, 0)
        .validate(FILE_LEN)
        .unwrap_err();
    assert!(e.what().contains("bitmap_directory_offset"));
}

#[test]
fn bitmaps_directory_too_large() {
    let e = with_bitmaps(1, MAX_BITMAP_DIRECTORY_SIZE + 1, 0x400, 0).validate(FILE_LEN);
    assert!(e.unwrap_err().what().contains("bitmap_directory_size"));
}

#[test]
fn bitmaps_reserved_nonzero() {
    let e = with_bitmaps(1, 64, 0x400, 1)
        .validate(FILE_LEN)
        .unwrap_err();
    assert!(e.what().contains("reserved"));
}

#[test]
fn inconsistent_bitmaps_are_not_checked() {
    let mut ih = with_bitmaps(0, 64, 0x401, 1);
    ih.header.autoclear_features = 0;
    ih.validate(FILE_LEN).unwrap();
}

#[test]
fn to_cluster0_refuses_overflow() {
    let mut ih = parsed();
    ih.extensions.push(Extension::Unknown {
        kind: 7,
        data: vec![0; 300],
    });
    assert_eq!(
        ih.to_cluster0().unwrap_err().kind(),
        ErrorKind::InvalidArgument
    );
}

#[test]
fn to_cluster0_refuses_long_backing_name() {
    let mut ih = parsed();
    ih.header.cluster_bits = 16;
    ih.set_backing(Some(("n".repeat(1024), None)));
    assert_eq!(
        ih.to_cluster0().unwrap_err().kind(),
        ErrorKind::InvalidArgument
    );
}
