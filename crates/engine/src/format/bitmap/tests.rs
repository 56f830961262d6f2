use super::*;

/// The directory `qemu-img bitmap --add` wrote for a 128 MiB image with 64 KiB clusters:
/// b1 (auto, 64 KiB), b2 (disabled, 512 B), b3 (auto, 1 MiB).
#[rustfmt::skip]
const QEMU_DIR: [u8; 96] = [
    // b1: table 0xa0000, 1 entry, flags auto, type 1, granularity 2^16, name 2, extra 0
    0, 0, 0, 0, 0, 0x0a, 0, 0,  0, 0, 0, 1,  0, 0, 0, 2,  1, 16,  0, 2,  0, 0, 0, 0,
    b'b', b'1', 0, 0, 0, 0, 0, 0,
    // b2: table 0xc0000, flags 0, granularity 2^9
    0, 0, 0, 0, 0, 0x0c, 0, 0,  0, 0, 0, 1,  0, 0, 0, 0,  1, 9,  0, 2,  0, 0, 0, 0,
    b'b', b'2', 0, 0, 0, 0, 0, 0,
    // b3: table 0xe0000, flags auto, granularity 2^20
    0, 0, 0, 0, 0, 0x0e, 0, 0,  0, 0, 0, 1,  0, 0, 0, 2,  1, 20,  0, 2,  0, 0, 0, 0,
    b'b', b'3', 0, 0, 0, 0, 0, 0,
];

const CS: u64 = 65536;
const SIZE: u64 = 128 << 20;

#[test]
fn qemu_directory_parses_and_round_trips() {
    let d = parse_directory(&QEMU_DIR, 3).unwrap();
    assert_eq!(d.len(), 3);
    assert_eq!(d[0].table_offset, 0xa0000);
    assert_eq!(d[0].table_size, 1);
    assert!(d[0].has(FLAG_AUTO) && !d[0].has(FLAG_IN_USE));
    assert_eq!((d[0].granularity(), d[0].name.as_str()), (65536, "b1"));
    assert_eq!((d[1].flags, d[1].granularity_bits), (0, 9));
    assert_eq!(d[2].granularity(), 1 << 20);
    for e in &d {
        e.validate(CS, SIZE).unwrap();
    }
    assert_eq!(serialize_directory(&d), QEMU_DIR);
}

#[test]
fn truncated_or_duplicate_entries_are_refused() {
    assert!(parse_directory(&QEMU_DIR, 4).is_err());
    assert!(parse_directory(&QEMU_DIR[..20], 1).is_err());
    assert!(parse_directory(&QEMU_DIR[..25], 1).is_err()); // name cut
    let mut dup = QEMU_DIR;
    dup[57] = b'1'; // b2 renamed b1
    assert!(parse_directory(&dup, 2).is_err());
    assert!(parse_directory(&[], MAX_BITMAPS + 1).is_err());
}

/// Entry 0 of `QEMU_DIR` with one byte changed.
fn entry_with(at: usize, v: u8) -> BitmapEntry {
    let mut b = QEMU_DIR;
    b[at] = v;
    BitmapEntry::from_bytes(&b).unwrap().0
}

#[test]
fn each_bad_field_is_refused() {
    let bad = |e: BitmapEntry| e.validate(CS, SIZE).is_err();
    assert!(bad(entry_with(15, 8)), "unknown flag bit 3");
    assert!(bad(entry_with(16, 2)), "type 2");
    assert!(bad(entry_with(17, 8)), "granularity 256");
    assert!(bad(entry_with(17, 32)), "granularity 4 GiB");
    assert!(bad(entry_with(11, 2)), "table size 2 for 128 MiB at 64 KiB");
    assert!(bad(entry_with(7, 0x10)), "misaligned table");
    assert!(bad(entry_with(5, 0)), "table offset 0");
    let mut e = entry_with(15, 2);
    e.extra_data = vec![1, 2];
    assert!(bad(e.clone()), "extra data without the compatible flag");
    e.flags |= FLAG_EXTRA_DATA_COMPATIBLE;
    e.validate(CS, SIZE).unwrap();
    e.name = "x".repeat(1024);
    assert!(bad(e));
}

#[test]
fn extra_data_and_long_names_round_trip() {
    let mut e = entry_with(15, 6);
    e.extra_data = vec![9; 5];
    e.name = "n".repeat(MAX_NAME_SIZE);
    let b = e.to_bytes();
    assert_eq!(b.len(), (24 + 5 + 1023usize).next_multiple_of(8));
    assert_eq!(b.len(), e.encoded_len());
    assert_eq!(&b[20..24], &[0, 0, 0, 5]);
    assert_eq!(BitmapEntry::from_bytes(&b).unwrap(), (e, b.len()));
}

#[test]
fn table_sizes_follow_virtual_size_and_granularity() {
    // 128 MiB at 512 B per bit = 256 Ki bits = 32 KiB: one 64 KiB cluster.
    assert_eq!(table_size_for(SIZE, 9, CS).unwrap(), 1);
    // 1 TiB at 64 KiB: 16 Mi bits = 2 MiB = 32 clusters.
    assert_eq!(table_size_for(1 << 40, 16, CS).unwrap(), 32);
    assert_eq!(table_size_for(0, 16, CS).unwrap(), 0);
    assert_eq!(data_bytes_for(65536 * 9, 16), 2);
    // 2^32 bits is QEMU's limit: 2 TiB at 512 B passes, one more byte does not.
    assert!(table_size_for(1 << 41, 9, CS).is_ok());
    assert!(table_size_for((1 << 41) + 8 * 512, 9, CS).is_err());
}

#[test]
fn table_entries_decode_and_encode() {
    let d = |e| TableEntry::from_u64(e, CS);
    assert_eq!(d(0).unwrap(), TableEntry::Zeros);
    assert_eq!(d(1).unwrap(), TableEntry::Ones);
    assert_eq!(d(0x30000).unwrap(), TableEntry::Data(0x30000));
    assert!(d(0x30001).is_err(), "bit 0 with an offset");
    assert!(d(0x30200).is_err(), "misaligned");
    assert!(d(2).is_err(), "reserved bit 1");
    assert!(d(1 << 56).is_err(), "reserved bit 56");
    for e in [
        TableEntry::Zeros,
        TableEntry::Ones,
        TableEntry::Data(0x7f_0000),
    ] {
        assert_eq!(d(e.to_u64()).unwrap(), e);
    }
}
