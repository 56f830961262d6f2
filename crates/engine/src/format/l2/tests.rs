use super::*;
use crate::error::ErrorKind;

/// v3, 64 KiB clusters, standard entries.
const STD: L2Geometry = L2Geometry {
    cluster_bits: 16,
    extended: false,
    version3: true,
};
/// v2, 64 KiB clusters.
const V2: L2Geometry = L2Geometry {
    cluster_bits: 16,
    extended: false,
    version3: false,
};
/// v3, 64 KiB clusters, extended entries (2 KiB subclusters).
const EXT: L2Geometry = L2Geometry {
    cluster_bits: 16,
    extended: true,
    version3: true,
};

#[test]
fn geometry() {
    assert_eq!(STD.entry_size(), 8);
    assert_eq!(STD.entries_per_cluster(), 8192);
    assert_eq!(STD.subclusters(), 1);
    assert_eq!(STD.subcluster_size(), 65536);
    assert_eq!(EXT.entry_size(), 16);
    assert_eq!(EXT.entries_per_cluster(), 4096);
    assert_eq!(EXT.subclusters(), 32);
    assert_eq!(EXT.subcluster_size(), 2048);
    let absurd = L2Geometry {
        cluster_bits: 99,
        extended: true,
        version3: true,
    };
    assert_eq!(absurd.entries_per_cluster(), 0);
}

#[test]
fn decode_literal_standard_entries() {
    #[rustfmt::skip]
    let buf = [
        // 0: COPIED | host 0x50000: normal, writable in place
        0x80, 0x00, 0x00, 0x00, 0x00, 0x05, 0x00, 0x00,
        // 1: all zero: unallocated
        0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00,
        // 2: ZERO only: plain zero cluster
        0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x01,
        // 3: COPIED | host 0x60000 | ZERO: preallocated zero cluster
        0x80, 0x00, 0x00, 0x00, 0x00, 0x06, 0x00, 0x01,
        // 4: host 0x70000 without COPIED: shared with a snapshot
        0x00, 0x00, 0x00, 0x00, 0x00, 0x07, 0x00, 0x00,
        // 5: COMPRESSED | 2 extra sectors (bits 54-61) | host 0x80123
        0x40, 0x80, 0x00, 0x00, 0x00, 0x08, 0x01, 0x23,
    ];
    let decode = |i| {
        let (raw, bm) = read_raw(&buf, i, &STD).unwrap();
        assert_eq!(bm, SubclusterBitmap(0));
        L2Entry::decode(raw, &STD).unwrap()
    };
    assert_eq!(
        decode(0),
        L2Entry::Normal {
            host: HostOffset(0x50000),
            copied: true
        }
    );
    assert_eq!(decode(1), L2Entry::Unallocated);
    assert_eq!(
        decode(2),
        L2Entry::Zero {
            host: None,
            copied: false
        }
    );
    assert_eq!(
        decode(3),
        L2Entry::Zero {
            host: Some(HostOffset(0x60000)),
            copied: true
        }
    );
    assert_eq!(
        decode(4),
        L2Entry::Normal {
            host: HostOffset(0x70000),
            copied: false
        }
    );
    let c = CompressedDescriptor {
        host: HostOffset(0x80123),
        sectors: 2,
    };
    assert_eq!(decode(5), L2Entry::Compressed(c));
    assert_eq!(read_raw(&buf, 6, &STD), None);
}

#[test]
fn decode_literal_extended_entry() {
    #[rustfmt::skip]
    let buf = [
        // entry 0, standard part: COPIED | host 0x50000
        0x80, 0x00, 0x00, 0x00, 0x00, 0x05, 0x00, 0x00,
        // entry 0, bitmap: subclusters 0-1 zero (bits 32-33), 2-3 allocated (bits 2-3)
        0x00, 0x00, 0x00, 0x03, 0x00, 0x00, 0x00, 0x0c,
    ];
    let (raw, bm) = read_raw(&buf, 0, &EXT).unwrap();
    let e = L2Entry::decode(raw, &EXT).unwrap();
    assert_eq!(
        e,
        L2Entry::Normal {
            host: HostOffset(0x50000),
            copied: true
        }
    );
    bm.validate_for(&e).unwrap();
    assert_eq!(bm.state(0).unwrap(), SubclusterState::Zero);
    assert_eq!(bm.state(1).unwrap(), SubclusterState::Zero);
    assert_eq!(bm.state(2).unwrap(), SubclusterState::Allocated);
    assert_eq!(bm.state(3).unwrap(), SubclusterState::Allocated);
    assert_eq!(bm.state(4).unwrap(), SubclusterState::Unallocated);
    assert_eq!(bm.state(31).unwrap(), SubclusterState::Unallocated);
    assert_eq!(read_raw(&buf, 1, &EXT), None);
}

#[test]
fn encode_decode_identity() {
    let c = CompressedDescriptor {
        host: HostOffset(0x12_3456),
        sectors: 7,
    };
    let entries = [
        L2Entry::Unallocated,
        L2Entry::Normal {
            host: HostOffset(0x10000),
            copied: true,
        },
        L2Entry::Normal {
            host: HostOffset(0x00ff_ffff_ffff_0000),
            copied: false,
        },
        L2Entry::Zero {
            host: None,
            copied: false,
        },
        L2Entry::Zero {
            host: Some(HostOffset(0x20000)),
            copied: true,
        },
        L2Entry::Compressed(c),
    ];
    for e in entries {
        let raw = e.try_encode(&STD).unwrap();
        assert_eq!(raw, e.encode(&STD));
        assert_eq!(L2Entry::decode(raw, &STD).unwrap(), e, "{e:?}");
    }
}

#[test]
fn encode_literal_bits() {
    let e = L2Entry::Zero {
        host: Some(HostOffset(0x60000)),
        copied: true,
    };
    assert_eq!(e.encode(&STD), 0x8000_0000_0006_0001);
    let c = CompressedDescriptor {
        host: HostOffset(0x80123),
        sectors: 2,
    };
    assert_eq!(L2Entry::Compressed(c).encode(&STD), 0x4080_0000_0008_0123);
}

#[test]
fn write_raw_then_read_raw() {
    let mut buf = [0u8; 32];
    let bm = SubclusterBitmap(0x0000_0001_ffff_fffe);
    assert!(write_raw(&mut buf, 1, &EXT, 0x8000_0000_0005_0000, bm));
    assert_eq!(&buf[16..24], &[0x80, 0, 0, 0, 0, 0x05, 0, 0]);
    assert_eq!(&buf[24..32], &[0, 0, 0, 0x01, 0xff, 0xff, 0xff, 0xfe]);
    assert_eq!(read_raw(&buf, 1, &EXT), Some((0x8000_0000_0005_0000, bm)));
    assert!(!write_raw(&mut buf, 2, &EXT, 1, bm));
    assert!(!write_raw(&mut buf, usize::MAX, &EXT, 1, bm));
    assert_eq!(read_raw(&buf, usize::MAX, &EXT), None);
    // Standard mode: 8-byte entries, bitmap not written.
    let mut buf = [0u8; 16];
    assert!(write_raw(&mut buf, 1, &STD, 0x10000, bm));
    assert_eq!(buf, [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x01, 0, 0]);
    assert_eq!(
        read_raw(&buf, 1, &STD),
        Some((0x10000, SubclusterBitmap(0)))
    );
}

#[test]
fn unaligned_normal_offset_is_corrupt() {
    // host 0x50200: sector aligned, not cluster aligned
    let err = L2Entry::decode(0x8000_0000_0005_0200, &STD).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Corrupt);
    assert_eq!(err.offset(), Some(0x50200));
}

#[test]
fn unaligned_preallocated_zero_offset_is_corrupt() {
    let err = L2Entry::decode(0x0000_0000_0005_0201, &STD).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Corrupt);
}

#[test]
fn compressed_with_copied_is_corrupt() {
    let err = L2Entry::decode(0xc080_0000_0008_0123, &STD).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Corrupt);
}

#[test]
fn compressed_host_beyond_bit_55_is_corrupt() {
    // 512-byte clusters: host field is bits 0-60, bits 56-60 must be 0.
    let geo = L2Geometry {
        cluster_bits: 9,
        extended: false,
        version3: true,
    };
    let err = L2Entry::decode(L2E_COMPRESSED | (1 << 56), &geo).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Corrupt);
}

#[test]
fn v2_ignores_zero_bit() {
    assert_eq!(L2Entry::decode(1, &V2).unwrap(), L2Entry::Unallocated);
    assert_eq!(
        L2Entry::decode(0x8000_0000_0005_0001, &V2).unwrap(),
        L2Entry::Normal {
            host: HostOffset(0x50000),
            copied: true
        }
    );
    assert_eq!(reserved_bits(1, &V2), 1);
    let zero = L2Entry::Zero {
        host: None,
        copied: false,
    };
    assert_eq!(
        zero.try_encode(&V2).unwrap_err().kind(),
        ErrorKind::InvalidArgument
    );
}

#[test]
fn extended_ignores_zero_bit() {
    assert_eq!(L2Entry::decode(1, &EXT).unwrap(), L2Entry::Unallocated);
    assert_eq!(reserved_bits(0x8000_0000_0005_0001, &EXT), 1);
    assert_eq!(reserved_bits(0x8000_0000_0005_0001, &STD), 0);
    let zero = L2Entry::Zero {
        host: Some(HostOffset(0x50000)),
        copied: true,
    };
    assert_eq!(
        zero.try_encode(&EXT).unwrap_err().kind(),
        ErrorKind::InvalidArgument
    );
    assert_eq!(zero.encode(&EXT), 0x8000_0000_0005_0000);
}

#[test]
fn reserved_bits_are_reported_and_ignored() {
    // bits 1 and 56 set on a normal entry
    let raw = 0x8100_0000_0005_0002;
    assert_eq!(reserved_bits(raw, &STD), 0x0100_0000_0000_0002);
    let e = L2Entry::decode(raw, &STD).unwrap();
    assert_eq!(
        e,
        L2Entry::Normal {
            host: HostOffset(0x50000),
            copied: true
        }
    );
    assert_eq!(reserved_bits(0x4080_0000_0008_0123, &STD), 0);
}

#[test]
fn copied_without_offset() {
    // Internal data: unallocated. External data file: host offset 0.
    assert_eq!(
        L2Entry::decode(L2E_COPIED, &STD).unwrap(),
        L2Entry::Unallocated
    );
    assert_eq!(
        L2Entry::decode_external(L2E_COPIED, &STD).unwrap(),
        L2Entry::Normal {
            host: HostOffset(0),
            copied: true
        }
    );
    assert_eq!(
        L2Entry::decode_external(0, &STD).unwrap(),
        L2Entry::Unallocated
    );
}

#[test]
fn try_encode_rejects_bad_offsets() {
    let e = L2Entry::Normal {
        host: HostOffset(0x10200),
        copied: false,
    };
    assert_eq!(
        e.try_encode(&STD).unwrap_err().kind(),
        ErrorKind::InvalidArgument
    );
    let e = L2Entry::Normal {
        host: HostOffset(1 << 56),
        copied: false,
    };
    assert_eq!(
        e.try_encode(&STD).unwrap_err().kind(),
        ErrorKind::InvalidArgument
    );
    let c = CompressedDescriptor {
        host: HostOffset(0),
        sectors: 1 << 20,
    };
    let e = L2Entry::Compressed(c);
    assert!(e.try_encode(&STD).is_err());
    assert_eq!(e.encode(&STD) & L2E_COMPRESSED, L2E_COMPRESSED);
}

#[test]
fn host_and_copied_accessors() {
    let z = L2Entry::Zero {
        host: Some(HostOffset(0x20000)),
        copied: true,
    };
    assert_eq!(z.host(), Some(HostOffset(0x20000)));
    assert!(z.copied());
    let c = CompressedDescriptor {
        host: HostOffset(0x123),
        sectors: 0,
    };
    assert_eq!(L2Entry::Compressed(c).host(), None);
    assert!(!L2Entry::Compressed(c).copied());
    assert_eq!(L2Entry::Unallocated.host(), None);
}

#[test]
fn bitmap_set_state_and_range() {
    let mut b = SubclusterBitmap::default();
    b.set_range(4, 8, SubclusterState::Allocated); // bits 4-11
    assert_eq!(b.0, 0x0000_0000_0000_0ff0);
    b.set_range(8, 4, SubclusterState::Zero); // 8-11 become zero
    assert_eq!(b.0, 0x0000_0f00_0000_00f0);
    b.set_state(4, SubclusterState::Unallocated);
    assert_eq!(b.0, 0x0000_0f00_0000_00e0);
    b.set_range(30, 10, SubclusterState::Allocated); // clipped to 30-31
    assert_eq!(b.0, 0x0000_0f00_c000_00e0);
    b.set_state(32, SubclusterState::Zero); // ignored
    b.set_range(32, 1, SubclusterState::Zero); // ignored
    b.set_range(u32::MAX, u32::MAX, SubclusterState::Zero); // ignored
    assert_eq!(b.0, 0x0000_0f00_c000_00e0);
    assert_eq!(b.alloc_bits(), 0xc000_00e0);
    assert_eq!(b.zero_bits(), 0x0000_0f00);
}

#[test]
fn bitmap_all() {
    assert_eq!(
        SubclusterBitmap::all(SubclusterState::Allocated).0,
        BITMAP_ALL_ALLOC
    );
    assert_eq!(
        SubclusterBitmap::all(SubclusterState::Zero).0,
        BITMAP_ALL_ZERO
    );
    assert_eq!(SubclusterBitmap::all(SubclusterState::Unallocated).0, 0);
}

#[test]
fn bitmap_both_bits_is_corrupt() {
    let b = SubclusterBitmap(0x0000_0004_0000_0004); // subcluster 2 allocated and zero
    assert_eq!(b.state(2).unwrap_err().kind(), ErrorKind::Corrupt);
    let normal = L2Entry::Normal {
        host: HostOffset(0x10000),
        copied: true,
    };
    assert_eq!(
        b.validate_for(&normal).unwrap_err().kind(),
        ErrorKind::Corrupt
    );
}

#[test]
fn bitmap_index_out_of_range_is_invalid_argument() {
    let err = SubclusterBitmap(0).state(32).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::InvalidArgument);
}

#[test]
fn compressed_with_bitmap_is_corrupt() {
    let c = L2Entry::Compressed(CompressedDescriptor {
        host: HostOffset(0x123),
        sectors: 0,
    });
    SubclusterBitmap(0).validate_for(&c).unwrap();
    let err = SubclusterBitmap(1 << 40).validate_for(&c).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Corrupt);
}

#[test]
fn unallocated_with_alloc_bits_is_corrupt() {
    let zeros = SubclusterBitmap(BITMAP_ALL_ZERO);
    zeros.validate_for(&L2Entry::Unallocated).unwrap();
    let err = SubclusterBitmap(1)
        .validate_for(&L2Entry::Unallocated)
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Corrupt);
}

#[test]
fn normal_with_any_bitmap_without_overlap_is_valid() {
    let normal = L2Entry::Normal {
        host: HostOffset(0x10000),
        copied: true,
    };
    for bm in [0, BITMAP_ALL_ALLOC, BITMAP_ALL_ZERO, 0xffff_0000_0000_ffff] {
        SubclusterBitmap(bm).validate_for(&normal).unwrap();
    }
}

#[test]
fn decode_never_panics_on_any_bits() {
    let geos = [
        STD,
        V2,
        EXT,
        L2Geometry {
            cluster_bits: 0,
            extended: false,
            version3: true,
        },
    ];
    for geo in geos {
        for raw in [
            u64::MAX,
            0x7fff_ffff_ffff_ffff,
            1 << 62,
            0x8000_0000_0000_01ff,
        ] {
            let _ = L2Entry::decode(raw, &geo);
            let _ = reserved_bits(raw, &geo);
        }
    }
}
