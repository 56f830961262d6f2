//! Header fixtures (taken from `qemu-img create -f qcow2 -o compression_type=zstd f 1G` and
//! the same with `compat=0.10`), round trips, and one test per malformed field or limit.

use super::*;
use crate::ErrorKind;

/// File length of the fixture image: header, refcount table, refcount block, 16-byte L1.
const FILE_LEN: u64 = 3 * 65536 + 16;

#[rustfmt::skip]
pub(super) fn v3_fixture() -> Vec<u8> {
    let mut b = vec![
        0x51, 0x46, 0x49, 0xfb,                         // magic "QFI\xfb"
        0, 0, 0, 3,                                     // version 3
        0, 0, 0, 0, 0, 0, 0, 0,                         // backing_file_offset: none
        0, 0, 0, 0,                                     // backing_file_size
        0, 0, 0, 16,                                    // cluster_bits: 64 KiB clusters
        0, 0, 0, 0, 0x40, 0, 0, 0,                      // size: 1 GiB
        0, 0, 0, 0,                                     // crypt_method: none
        0, 0, 0, 2,                                     // l1_size: 2 entries
        0, 0, 0, 0, 0, 3, 0, 0,                         // l1_table_offset: 0x30000
        0, 0, 0, 0, 0, 1, 0, 0,                         // refcount_table_offset: 0x10000
        0, 0, 0, 1,                                     // refcount_table_clusters: 1
        0, 0, 0, 0,                                     // nb_snapshots: 0
        0, 0, 0, 0, 0, 0, 0, 0,                         // snapshots_offset: 0
        0, 0, 0, 0, 0, 0, 0, 8,                         // incompatible: compression type
        0, 0, 0, 0, 0, 0, 0, 0,                         // compatible: none
        0, 0, 0, 0, 0, 0, 0, 0,                         // autoclear: none
        0, 0, 0, 4,                                     // refcount_order: 16-bit
        0, 0, 0, 112,                                   // header_length: 112
        1,                                              // compression_type: zstd
    ];
    b.extend_from_slice(&[0; 7]);                       // padding to header_length
    b
}

#[rustfmt::skip]
fn v2_fixture() -> Vec<u8> {
    vec![
        0x51, 0x46, 0x49, 0xfb,                         // magic
        0, 0, 0, 2,                                     // version 2
        0, 0, 0, 0, 0, 0, 0, 0,                         // backing_file_offset
        0, 0, 0, 0,                                     // backing_file_size
        0, 0, 0, 16,                                    // cluster_bits
        0, 0, 0, 0, 0x40, 0, 0, 0,                      // size: 1 GiB
        0, 0, 0, 0,                                     // crypt_method
        0, 0, 0, 2,                                     // l1_size
        0, 0, 0, 0, 0, 3, 0, 0,                         // l1_table_offset
        0, 0, 0, 0, 0, 1, 0, 0,                         // refcount_table_offset
        0, 0, 0, 1,                                     // refcount_table_clusters
        0, 0, 0, 0,                                     // nb_snapshots
        0, 0, 0, 0, 0, 0, 0, 0,                         // snapshots_offset
    ]
}

fn v3() -> Header {
    Header::from_bytes(&v3_fixture()).unwrap()
}

/// Assert that validating `h` fails with `kind` and a message mentioning `field`.
fn assert_rejects(h: &Header, kind: ErrorKind, field: &str) {
    let err = h.validate(FILE_LEN).expect_err("validate should fail");
    assert_eq!(err.kind(), kind, "{err}");
    assert!(
        err.what().contains(field),
        "message {:?} should name {field}",
        err.what()
    );
}

#[test]
fn layout_offsets_match_the_spec() {
    assert_eq!(BACKING_FILE_OFFSET_OFFSET, 8);
    assert_eq!(CLUSTER_BITS_OFFSET, 20);
    assert_eq!(L1_TABLE_OFFSET_OFFSET, 40);
    assert_eq!(SNAPSHOTS_OFFSET_OFFSET, 64);
    assert_eq!(V2_HEADER_LENGTH, 72);
    assert_eq!(REFCOUNT_ORDER_OFFSET, 96);
    assert_eq!(V3_MIN_HEADER_LENGTH, 104);
    assert_eq!(V3_HEADER_LENGTH, 112);
}

#[test]
fn v3_fixture_decodes() {
    let h = v3();
    assert_eq!(h.version, 3);
    assert_eq!(h.cluster_bits, 16);
    assert_eq!(h.cluster_size(), 65536);
    assert_eq!(h.size, 1 << 30);
    assert_eq!(h.l1_size, 2);
    assert_eq!(h.l1_table_offset, 0x30000);
    assert_eq!(h.refcount_table_offset, 0x10000);
    assert_eq!(h.refcount_table_clusters, 1);
    assert_eq!(h.incompatible_features, features::COMPRESSION_TYPE);
    assert_eq!(h.refcount_bits(), 16);
    assert_eq!(h.header_length, 112);
    assert_eq!(h.compression_type, COMPRESSION_ZSTD);
    assert_eq!(h.unknown_tail, vec![0; 7]);
    assert_eq!(h.l2_entries(), 8192);
    assert_eq!(h.min_l1_size(), 2);
    h.validate(FILE_LEN).unwrap();
}

#[test]
fn v2_fixture_decodes_with_implied_v3_fields() {
    let h = Header::from_bytes(&v2_fixture()).unwrap();
    assert_eq!(h.version, 2);
    assert_eq!(h.refcount_order, 4);
    assert_eq!(h.header_length, 72);
    assert_eq!(
        h.incompatible_features | h.compatible_features | h.autoclear_features,
        0
    );
    h.validate(FILE_LEN).unwrap();
}

#[test]
fn v2_ignores_bytes_after_72() {
    let mut b = v2_fixture();
    b.extend_from_slice(&[0xff; 40]);
    let h = Header::from_bytes(&b).unwrap();
    assert_eq!(h.incompatible_features, 0);
    assert_eq!(h.to_bytes(), v2_fixture());
}

#[test]
fn parse_serialize_identity() {
    assert_eq!(v3().to_bytes(), v3_fixture());
    assert_eq!(
        Header::from_bytes(&v2_fixture()).unwrap().to_bytes(),
        v2_fixture()
    );
}

#[test]
fn unknown_header_fields_are_preserved() {
    let mut b = v3_fixture();
    b[HEADER_LENGTH_OFFSET + 3] = 128;
    b.extend_from_slice(&[0xa5; 16]);
    let h = Header::from_bytes(&b).unwrap();
    assert_eq!(h.unknown_tail.len(), 128 - 105);
    assert_eq!(&h.unknown_tail[7..], &[0xa5; 16]);
    assert_eq!(h.to_bytes(), b);
    h.validate(FILE_LEN).unwrap();
}

#[test]
fn header_length_104_has_no_compression_type() {
    let mut b = v3_fixture();
    b[HEADER_LENGTH_OFFSET + 3] = 104;
    b[INCOMPATIBLE_FEATURES_OFFSET + 7] = 0;
    let h = Header::from_bytes(&b).unwrap();
    assert_eq!(h.compression_type, 0);
    assert!(h.unknown_tail.is_empty());
    assert_eq!(h.to_bytes(), b[..104]);
    h.validate(FILE_LEN).unwrap();
}

#[test]
fn extended_l2_accessors() {
    let mut h = v3();
    h.incompatible_features |= features::EXTENDED_L2;
    assert!(h.extended_l2());
    assert_eq!(h.l2_entries(), 4096);
    assert_eq!(h.min_l1_size(), 4);
}

#[test]
fn feature_accessors() {
    let mut h = v3();
    assert!(!h.is_dirty() && !h.is_corrupt() && !h.lazy_refcounts());
    h.incompatible_features |= features::DIRTY | features::CORRUPT | features::EXTERNAL_DATA_FILE;
    h.compatible_features |= features::LAZY_REFCOUNTS;
    h.autoclear_features |= features::RAW_EXTERNAL;
    assert!(h.is_dirty() && h.is_corrupt() && h.lazy_refcounts());
    assert!(h.has_external_data_file() && h.data_file_raw());
    h.validate(FILE_LEN).unwrap();
}

#[test]
fn l1_entries_for_examples() {
    assert_eq!(l1_entries_for(0, 16, false), 0);
    assert_eq!(l1_entries_for(1, 16, false), 1);
    assert_eq!(l1_entries_for(512 << 20, 16, false), 1);
    assert_eq!(l1_entries_for((512 << 20) + 1, 16, false), 2);
    assert_eq!(l1_entries_for(256 << 20, 16, true), 1);
    assert_eq!(l1_entries_for(32 << 10, 9, false), 1);
    assert_eq!(l1_entries_for(u64::MAX, 40, false), 1);
    assert_eq!(l1_entries_for(u64::MAX, 9, false), 1 << 49);
}

// ---- from_bytes: one test per malformed field ----

#[test]
fn bad_magic() {
    let mut b = v3_fixture();
    b[3] = 0xfc;
    assert_eq!(
        Header::from_bytes(&b).unwrap_err().kind(),
        ErrorKind::InvalidImage
    );
    assert_eq!(
        Header::from_bytes(&[]).unwrap_err().kind(),
        ErrorKind::InvalidImage
    );
}

#[test]
fn bad_version() {
    for v in [0u8, 1, 4, 0xff] {
        let mut b = v3_fixture();
        b[7] = v;
        let e = Header::from_bytes(&b).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Unsupported);
        assert!(e.what().contains("version"));
    }
}

#[test]
fn truncated_v2_header() {
    let e = Header::from_bytes(&v2_fixture()[..71]).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InvalidImage);
    assert!(e.what().contains("truncated"));
}

#[test]
fn truncated_v3_header() {
    let e = Header::from_bytes(&v3_fixture()[..100]).unwrap_err();
    assert!(e.what().contains("truncated"));
}

#[test]
fn header_length_below_104() {
    let mut b = v3_fixture();
    b[HEADER_LENGTH_OFFSET + 3] = 96;
    let e = Header::from_bytes(&b).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InvalidImage);
    assert!(e.what().contains("header_length"));
}

#[test]
fn header_length_past_buffer() {
    let mut b = v3_fixture();
    b[HEADER_LENGTH_OFFSET + 2] = 1; // 0x170 > 112 bytes given
    assert!(
        Header::from_bytes(&b)
            .unwrap_err()
            .what()
            .contains("header_length")
    );
}

#[test]
fn every_prefix_parses_or_errors_without_panicking() {
    let b = v3_fixture();
    for n in 0..b.len() {
        assert!(Header::from_bytes(&b[..n]).is_err());
    }
}

// ---- validate: one test per field / limit ----

#[test]
fn header_length_not_multiple_of_8() {
    let mut h = v3();
    h.header_length = 108;
    h.unknown_tail = vec![0; 3];
    assert_rejects(&h, ErrorKind::InvalidImage, "multiple of 8");
}

#[test]
fn header_length_disagrees_with_tail() {
    let mut h = v3();
    h.unknown_tail.push(0);
    assert_rejects(&h, ErrorKind::InvalidImage, "header_length");
}

#[test]
fn v2_header_length_must_be_72() {
    let mut h = Header::from_bytes(&v2_fixture()).unwrap();
    h.header_length = 104;
    assert_rejects(&h, ErrorKind::InvalidImage, "header_length");
}

#[test]
fn v2_refcount_order_must_be_4() {
    let mut h = Header::from_bytes(&v2_fixture()).unwrap();
    h.refcount_order = 5;
    assert_rejects(&h, ErrorKind::InvalidImage, "refcount_order");
}

#[test]
fn v2_cannot_have_features() {
    let mut h = Header::from_bytes(&v2_fixture()).unwrap();
    h.compatible_features = features::LAZY_REFCOUNTS;
    assert_rejects(&h, ErrorKind::InvalidImage, "feature");
}

#[test]
fn cluster_bits_too_small() {
    let mut h = v3();
    h.cluster_bits = 8;
    assert_rejects(&h, ErrorKind::InvalidImage, "cluster_bits");
}

#[test]
fn cluster_bits_too_large() {
    for bits in [22, 63, 64, u32::MAX] {
        let mut h = v3();
        h.cluster_bits = bits;
        assert_rejects(&h, ErrorKind::InvalidImage, "cluster_bits");
    }
}

#[test]
fn extended_l2_needs_16k_clusters() {
    let mut h = v3();
    h.incompatible_features |= features::EXTENDED_L2;
    h.cluster_bits = 13;
    assert_rejects(&h, ErrorKind::InvalidImage, "extended L2");
    h.cluster_bits = 14;
    h.refcount_table_offset = 0x4000;
    h.l1_table_offset = 0xc000;
    h.l1_size = 1 << 10;
    h.validate(FILE_LEN).unwrap();
}

#[test]
fn header_larger_than_cluster() {
    let mut h = v3();
    h.cluster_bits = 9;
    h.header_length = 520;
    h.unknown_tail = vec![0; 520 - 105];
    assert_rejects(&h, ErrorKind::InvalidImage, "header_length");
}

#[test]
fn backing_file_offset_outside_cluster0() {
    let mut h = v3();
    h.backing_file_offset = 65537;
    h.backing_file_size = 1;
    assert_rejects(&h, ErrorKind::InvalidImage, "backing_file_offset");
}

#[test]
fn backing_file_name_too_long() {
    let mut h = v3();
    h.backing_file_offset = 512;
    h.backing_file_size = 1024;
    assert_rejects(&h, ErrorKind::InvalidImage, "backing_file_size");
    h.backing_file_size = 1023;
    h.validate(FILE_LEN).unwrap();
}

#[test]
fn backing_file_name_past_cluster0() {
    let mut h = v3();
    h.backing_file_offset = 65536 - 10;
    h.backing_file_size = 11;
    assert_rejects(&h, ErrorKind::InvalidImage, "backing_file_size");
}

#[test]
fn unknown_incompatible_feature_is_unsupported() {
    let mut h = v3();
    h.incompatible_features |= 1 << 5;
    assert_rejects(&h, ErrorKind::Unsupported, "bit 5");
}

#[test]
fn unknown_compatible_and_autoclear_bits_are_accepted() {
    let mut h = v3();
    h.compatible_features = u64::MAX;
    h.autoclear_features = !features::RAW_EXTERNAL;
    h.validate(FILE_LEN).unwrap();
}

#[test]
fn raw_external_without_data_file() {
    let mut h = v3();
    h.autoclear_features = features::RAW_EXTERNAL;
    assert_rejects(&h, ErrorKind::InvalidImage, "raw external");
}

#[test]
fn compression_type_unknown() {
    let mut h = v3();
    h.compression_type = 2;
    assert_rejects(&h, ErrorKind::Unsupported, "compression_type");
}

#[test]
fn compression_type_without_bit() {
    let mut h = v3();
    h.incompatible_features = 0;
    assert_rejects(&h, ErrorKind::InvalidImage, "compression_type");
}

#[test]
fn compression_bit_without_type() {
    let mut h = v3();
    h.compression_type = 0;
    assert_rejects(&h, ErrorKind::InvalidImage, "compression_type");
}

#[test]
fn compression_type_absent_but_set() {
    let mut h = v3();
    h.header_length = 104;
    h.unknown_tail.clear();
    assert_rejects(&h, ErrorKind::InvalidImage, "compression_type");
}

#[test]
fn refcount_order_above_6() {
    let mut h = v3();
    h.refcount_order = 7;
    assert_rejects(&h, ErrorKind::InvalidImage, "refcount_order");
}

#[test]
fn crypt_method_unknown() {
    let mut h = v3();
    h.crypt_method = 3;
    assert_rejects(&h, ErrorKind::InvalidImage, "crypt_method");
}

#[test]
fn crypt_method_encrypted_is_valid() {
    // Encryption is a valid header setting; the engine refuses data access, not the open.
    for m in [CRYPT_AES, CRYPT_LUKS] {
        let mut h = v3();
        h.crypt_method = m;
        h.validate(1 << 20).unwrap();
    }
}

#[test]
fn refcount_table_missing() {
    let mut h = v3();
    h.refcount_table_clusters = 0;
    assert_rejects(&h, ErrorKind::InvalidImage, "refcount_table_clusters");
}

#[test]
fn refcount_table_too_large() {
    let mut h = v3();
    h.refcount_table_clusters = 129; // 129 * 64 KiB > 8 MiB
    assert_rejects(&h, ErrorKind::InvalidImage, "refcount_table_clusters");
}

#[test]
fn refcount_table_unaligned() {
    let mut h = v3();
    h.refcount_table_offset = 0x10200;
    assert_rejects(&h, ErrorKind::InvalidImage, "refcount_table_offset");
}

#[test]
fn refcount_table_past_eof() {
    let mut h = v3();
    h.refcount_table_offset = 0x40000;
    assert_rejects(&h, ErrorKind::InvalidImage, "refcount_table_offset");
}

#[test]
fn refcount_table_offset_overflows() {
    let mut h = v3();
    h.refcount_table_offset = u64::MAX - 0xffff;
    assert_rejects(&h, ErrorKind::InvalidImage, "refcount_table_offset");
}

#[test]
fn too_many_snapshots() {
    let mut h = v3();
    h.nb_snapshots = 65537;
    assert_rejects(&h, ErrorKind::InvalidImage, "nb_snapshots");
}

#[test]
fn snapshots_offset_unaligned() {
    let mut h = v3();
    h.snapshots_offset = 0x20008;
    assert_rejects(&h, ErrorKind::InvalidImage, "snapshots_offset");
}

#[test]
fn snapshot_table_past_eof() {
    let mut h = v3();
    h.nb_snapshots = 10;
    h.snapshots_offset = 0x30000; // 400 bytes from there pass the 16-byte tail
    assert_rejects(&h, ErrorKind::InvalidImage, "snapshots_offset");
}

#[test]
fn l1_table_too_large() {
    let mut h = v3();
    h.l1_size = (32 << 20) / 8 + 1;
    assert_rejects(&h, ErrorKind::InvalidImage, "l1_size");
}

#[test]
fn l1_table_unaligned() {
    let mut h = v3();
    h.l1_table_offset = 0x30008;
    assert_rejects(&h, ErrorKind::InvalidImage, "l1_table_offset");
}

#[test]
fn l1_table_past_eof() {
    let mut h = v3();
    h.l1_size = 3;
    h.size = 3 << 29;
    assert_rejects(&h, ErrorKind::InvalidImage, "l1_table_offset");
}

#[test]
fn l1_table_too_small_for_size() {
    let mut h = v3();
    h.size = (1 << 30) + 1;
    assert_rejects(&h, ErrorKind::InvalidImage, "l1_size");
}

#[test]
fn size_too_big() {
    let mut h = v3();
    h.size = u64::MAX;
    assert_rejects(&h, ErrorKind::InvalidImage, "size");
}

#[test]
fn empty_l1_needs_only_alignment() {
    let mut h = v3();
    h.size = 0;
    h.l1_size = 0;
    h.l1_table_offset = 0;
    h.validate(FILE_LEN).unwrap();
}

#[test]
fn tables_in_the_header_cluster_are_refused_at_open() {
    assert!(v3().check_tables_clear_of_header().is_ok());
    let mut h = v3();
    h.l1_table_offset = 0;
    let err = h.check_tables_clear_of_header().unwrap_err();
    assert!(err.what().contains("l1_table_offset"), "{err}");
    h.l1_size = 0; // an empty L1 table is never written
    assert!(h.check_tables_clear_of_header().is_ok());
    let mut h = v3();
    h.refcount_table_offset = 0;
    let err = h.check_tables_clear_of_header().unwrap_err();
    assert!(err.what().contains("refcount_table_offset"), "{err}");
    let mut h = v3();
    h.nb_snapshots = 1;
    let err = h.check_tables_clear_of_header().unwrap_err();
    assert!(err.what().contains("snapshots_offset"), "{err}");
}
