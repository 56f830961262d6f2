//! Target `parsers`: the pure parsers, no IO. The first input byte picks one; the rest is its
//! input. Besides "no panic", decoders that have an encoder must round-trip: what decodes,
//! encodes to bytes that decode to the same value.

use qcow2_engine::format::compressed::{CompressedDescriptor, CompressionType, decompress};
use qcow2_engine::format::extensions::{ImageHeader, parse_extensions};
use qcow2_engine::format::header::Header;
use qcow2_engine::format::l2::{L2Entry, L2Geometry, SubclusterBitmap, read_raw};
use qcow2_engine::format::{features, l1, refcount, snapshot};
use qcow2_engine::image::create::{CreateOptions, parse_size};

use super::input::Input;

/// Run the target on one input.
pub fn run(data: &[u8]) {
    let mut input = Input::new(data);
    match input.u8() % 10 {
        0 => header(input.rest()),
        1 => image_header(input.rest()),
        2 => extensions(input),
        3 => snapshots(input),
        4 => l2_entries(input),
        5 => compressed(input),
        6 => refcounts(input),
        7 => tables(input.rest()),
        8 => nbd_frames(input),
        _ => text(input.rest()),
    }
}

fn header(b: &[u8]) {
    if let Ok(h) = Header::from_bytes(b) {
        let _ = (
            h.cluster_size(),
            h.refcount_bits(),
            h.l2_entries(),
            h.min_l1_size(),
        );
        let _ = h.refcount_block_entries();
        let again = Header::from_bytes(&h.to_bytes()).expect("an encoded header decodes");
        assert_eq!(again, h, "header round trip");
    }
}

fn image_header(b: &[u8]) {
    let Ok(ih) = ImageHeader::parse(b) else {
        return;
    };
    let _ = ih.validate(b.len() as u64);
    let _ = (
        ih.backing_format(),
        ih.data_file(),
        ih.bitmaps(),
        ih.feature_names(),
    );
    // The encoder lays the header out afresh (it may move the backing name, e.g. an empty one
    // the file placed elsewhere), so compare from the first encoding on: encoding what it
    // decodes must then be a fixed point.
    if let Ok(c0) = ih.to_cluster0() {
        let once = ImageHeader::parse(&c0).expect("an encoded image header parses");
        let c1 = once.to_cluster0().expect("a decoded encoding encodes");
        let twice = ImageHeader::parse(&c1).expect("an encoded image header parses");
        assert_eq!(twice, once, "image header round trip");
    }
}

fn extensions(mut input: Input) {
    let start = usize::from(input.u8()) * 8;
    let _ = parse_extensions(input.rest(), start);
}

fn snapshots(mut input: Input) {
    let count = u32::from(input.u8());
    let cluster_size = 1u64 << (9 + input.u8() % 13);
    let b = input.rest();
    if let Ok(snaps) = snapshot::parse_table(b, count) {
        for s in &snaps {
            let _ = s.validate(cluster_size);
        }
        let _ = snapshot::check_writable(&snaps);
        let table = snapshot::write_table(&snaps);
        assert_eq!(
            table.len(),
            snapshot::table_size(&snaps),
            "snapshot table size"
        );
        let again = snapshot::parse_table(&table, count).expect("a written table parses");
        assert_eq!(again, snaps, "snapshot table round trip");
    }
    let _ = snapshot::entry_len(b);
    let _ = snapshot::parse_entry(b);
}

fn l2_entries(mut input: Input) {
    let flags = input.u8();
    let geo = L2Geometry {
        cluster_bits: u32::from(input.u8() % 70),
        extended: flags & 1 != 0,
        version3: flags & 2 != 0,
    };
    let table = input.rest();
    let mut index = 0;
    while let Some((raw, bitmap)) = read_raw(table, index, &geo) {
        index += 1;
        // Each decoder must round-trip on its own (they differ on offset 0 with COPIED).
        let decoders: [fn(u64, &L2Geometry) -> qcow2_engine::Result<L2Entry>; 2] =
            [L2Entry::decode, L2Entry::decode_external];
        for decode in decoders {
            let Ok(e) = decode(raw, &geo) else { continue };
            let _ = (e.host(), e.copied(), bitmap.validate_for(&e));
            if let Ok(enc) = e.try_encode(&geo) {
                assert_eq!(
                    decode(enc, &geo).ok(),
                    Some(e),
                    "L2 entry {raw:#x} round trip"
                );
            }
        }
        for i in 0..40 {
            let _ = SubclusterBitmap(bitmap.0).state(i);
        }
    }
}

fn compressed(mut input: Input) {
    let raw = input.u64();
    let flags = input.u8();
    let cluster_bits = 9 + u32::from(flags % 13);
    let d = CompressedDescriptor::decode(raw, cluster_bits);
    let _ = (
        d.read_len(),
        d.host_clusters(cluster_bits),
        d.encode(cluster_bits),
    );
    let _ = d.encode_masked(cluster_bits);
    let Ok(kind) = CompressionType::from_u8(flags >> 4 & 1) else {
        return;
    };
    let mut out = vec![0u8; 1 << cluster_bits];
    let _ = decompress(kind, input.rest(), &mut out);
}

fn refcounts(mut input: Input) {
    let order = u32::from(input.u8() % 8);
    let value = input.u64();
    let mut block = input.rest().to_vec();
    let entries = (block.len() as u64 * 8) >> order.min(6);
    for i in 0..entries.min(4096) + 2 {
        let v = refcount::get(&block, i, order);
        if refcount::set(&mut block, i, order, value).is_ok() {
            assert_eq!(
                refcount::get(&block, i, order),
                value,
                "refcount {i} round trip"
            );
            refcount::set(&mut block, i, order, v).expect("restoring a value read back");
        }
    }
    let cluster_size = 1u64 << (9 + order);
    let _ = refcount::entries_per_block(cluster_size, order);
}

fn tables(b: &[u8]) {
    for cluster_size in [512, 65536, 1 << 21] {
        for e in l1::parse_table(b) {
            let _ = (
                e.l2_offset(),
                e.copied(),
                e.reserved_bits(),
                e.validate(cluster_size),
            );
        }
        for e in refcount::parse_table(b) {
            let _ = (e.block_offset(), e.validate(cluster_size));
        }
    }
    let names = features::parse_feature_table(b);
    let _ = features::serialize_feature_table(&names);
    let bits = u64::from_be_bytes(b.get(..8).and_then(|s| s.try_into().ok()).unwrap_or([0; 8]));
    let _ = features::incompatible_feature_names(bits, &names);
}

fn nbd_frames(mut input: Input) {
    let flags = input.u8();
    let size = input.u64();
    qcow2_nbd::fuzzing::frames(flags, size, input.rest());
}

fn text(b: &[u8]) {
    let Ok(s) = std::str::from_utf8(b) else {
        return;
    };
    let _ = parse_size(s);
    let _ = CreateOptions::parse_o(s);
    let mut o = CreateOptions::default();
    if o.apply_o(s).is_ok() {
        let _ = o.size_or(Some(1 << 20)).map(|size| o.validate(size));
    }
}
