//! Create tests: option parsing and layout arithmetic. The images checked by QEMU's own tools
//! are tested in the integration tests (`tests/create_oracle.rs`).

use super::*;
use crate::ErrorKind;

fn block_on<F: std::future::Future>(f: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap()
        .block_on(f)
}

fn opts(o: &str) -> CreateOptions {
    let mut c = CreateOptions::default();
    c.apply_o(o).unwrap();
    c
}

// ---- option parsing ----

#[test]
fn parse_size_like_qemu_img() {
    let ok = [
        ("0", 0),
        ("1000", 1000),
        ("1001b", 1001),
        ("1B", 1),
        ("1k", 1024),
        ("1K", 1024),
        ("1.5k", 1536),
        ("1.k", 1024),
        (".5k", 512),
        ("012", 12),
        (" 12", 12),
        ("0x10", 16),
        ("1M", 1 << 20),
        ("2g", 2 << 30),
        ("1T", 1 << 40),
        ("1P", 1 << 50),
        ("7E", 7 << 60),
    ];
    for (s, v) in ok {
        assert_eq!(parse_size(s).unwrap(), v, "{s}");
    }
    for s in [
        "", "1x", "1.5", "1.5b", "0x1k", "1k5", "1 k", "12 ", "1e3", "1kb", "-1", "8E", ".",
    ] {
        assert_eq!(
            parse_size(s).unwrap_err().kind(),
            ErrorKind::InvalidArgument,
            "{s:?}"
        );
    }
}

#[test]
fn parse_o_splits_and_unescapes() {
    let v = CreateOptions::parse_o("cluster_size=4k,backing_file=a,,b,lazy_refcounts").unwrap();
    let want = [
        ("cluster_size", "4k"),
        ("backing_file", "a,b"),
        ("lazy_refcounts", "on"),
    ];
    let want: Vec<(String, String)> = want
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    assert_eq!(v, want);
    assert!(CreateOptions::parse_o("=x").is_err());
}

#[test]
fn apply_option_names_and_values() {
    let c = opts(
        "size=1G,cluster_size=16k,refcount_bits=0x8,compat=1.1,extended_l2=on,\
         compression_type=zstd,lazy_refcounts=yes,data_file=d,data_file_raw=true,\
         preallocation=falloc",
    );
    assert_eq!(c.size, Some(1 << 30));
    assert_eq!(c.cluster_size, 16384);
    assert_eq!(c.refcount_bits, 8);
    assert_eq!(c.compat, Compat::V3);
    assert!(c.extended_l2 && c.lazy_refcounts && c.data_file_raw);
    assert_eq!(c.compression_type, 1);
    assert_eq!(c.data_file.as_deref(), Some("d"));
    assert_eq!(c.preallocation, Preallocation::Falloc);
    assert_eq!(opts("compat=0.10").compat, Compat::V2);
    assert_eq!(opts("compat=v2").compat, Compat::V2);
    assert_eq!(opts("compat=v3").compat, Compat::V3);
    let mut c = CreateOptions::default();
    for bad in [
        "foo=bar",
        "compat=2",
        "lazy_refcounts=1",
        "compression_type=lz4",
        "preallocation=x",
    ] {
        assert_eq!(
            c.apply_o(bad).unwrap_err().kind(),
            ErrorKind::InvalidArgument,
            "{bad}"
        );
    }
    // Legacy AES is read-only: refused when parsed (without `luks`) or validated.
    let mut e = CreateOptions::default();
    let r = e
        .apply_o("encryption=on")
        .and_then(|()| e.validate(1 << 20));
    assert_eq!(r.unwrap_err().kind(), ErrorKind::Unsupported);
}

#[test]
fn size_rounds_up_to_512_and_falls_back_to_backing() {
    assert_eq!(opts("size=1000").size_or(None).unwrap(), 1024);
    assert_eq!(CreateOptions::default().size_or(Some(513)).unwrap(), 1024);
    assert_eq!(opts("size=0").size_or(Some(4096)).unwrap(), 0);
    assert!(CreateOptions::default().size_or(None).is_err());
}

#[test]
fn data_file_raw_implies_metadata_preallocation() {
    assert_eq!(
        opts("data_file=x,data_file_raw=on").effective_preallocation(),
        Preallocation::Metadata
    );
    assert_eq!(
        opts("preallocation=full").effective_preallocation(),
        Preallocation::Full
    );
}

/// Option sets qemu-img refuses; we must refuse them too.
const REFUSED: &[&str] = &[
    "extended_l2=on,cluster_size=8k",
    "refcount_bits=3",
    "refcount_bits=0",
    "refcount_bits=128",
    "compat=0.10,refcount_bits=8",
    "compat=0.10,lazy_refcounts=on",
    "compat=0.10,data_file=d.raw",
    "compat=0.10,compression_type=zstd",
    "compat=0.10,extended_l2=on",
    "data_file_raw=on",
    "data_file=d.raw,data_file_raw=on,backing_file=b.qcow2",
    "backing_file=b.qcow2,preallocation=metadata",
    "backing_file=b.qcow2,preallocation=full",
    "backing_fmt=raw",
    "cluster_size=1000",
    "cluster_size=256",
    "cluster_size=4M",
];

#[test]
fn refused_combinations() {
    for o in REFUSED {
        let c = opts(o);
        let e = c.validate(1 << 20).expect_err(o);
        assert_eq!(e.kind(), ErrorKind::InvalidArgument, "{o}: {e}");
    }
}

#[test]
fn refused_sizes() {
    let e = opts("cluster_size=512").validate(129 << 30).unwrap_err();
    assert!(e.what().contains("too large"), "{e}");
    opts("cluster_size=512").validate(128 << 30).unwrap();
    assert!(opts("").validate(1 << 60).is_err());
    assert!(
        opts("cluster_size=2M")
            .validate(MAX_IMAGE_SIZE + 512)
            .is_err()
    );
    opts("cluster_size=2M").validate(1 << 61).unwrap();
}

#[test]
fn backing_with_preallocation_allowed_with_extended_l2() {
    opts("backing_file=b,extended_l2=on,preallocation=metadata")
        .validate(1 << 20)
        .unwrap();
}

#[test]
fn refcount_fixed_point() {
    assert_eq!(layout::refcount_clusters_for_test(3, 32768, 8192), (1, 1));
    // 4096 entries per block: 4095 others + 1 block + 1 table need a second block.
    assert_eq!(layout::refcount_clusters_for_test(4095, 4096, 64), (2, 1));
}

#[test]
fn default_layout_matches_qemu() {
    let l = Layout::compute(&opts(""), 1 << 30, Preallocation::Off, false).unwrap();
    assert_eq!((l.reftable_offset, l.reftable_clusters), (0x10000, 1));
    assert_eq!((l.refblock_offset, l.refblocks), (0x20000, 1));
    assert_eq!((l.l1_offset, l.l1_size, l.l1_clusters), (0x30000, 2, 1));
    assert_eq!(l.total_clusters, 4);
    let empty = Layout::compute(&opts(""), 0, Preallocation::Off, false).unwrap();
    assert_eq!(
        (empty.l1_offset, empty.l1_size, empty.total_clusters),
        (0, 0, 3)
    );
}

#[test]
fn refblock_packing() {
    let mk = |bits: u32| {
        Layout::compute(
            &opts(&format!("refcount_bits={bits}")),
            0,
            Preallocation::Off,
            false,
        )
        .unwrap()
    };
    assert_eq!(&mk(1).refblock_for_test(10)[..2], &[0xff, 0x03]);
    assert_eq!(&mk(2).refblock_for_test(5)[..2], &[0x55, 0x01]);
    assert_eq!(&mk(4).refblock_for_test(3)[..2], &[0x11, 0x01]);
    assert_eq!(&mk(8).refblock_for_test(2)[..3], &[1, 1, 0]);
    assert_eq!(&mk(16).refblock_for_test(2)[..5], &[0, 1, 0, 1, 0]);
    assert_eq!(
        &mk(64).refblock_for_test(1)[..9],
        &[0, 0, 0, 0, 0, 0, 0, 1, 0]
    );
}

#[test]
fn missing_data_storage_is_an_error() {
    let image = crate::storage::MemoryStorage::new();
    let e = block_on(create(&image, None, &opts("size=1M,data_file=d"))).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InvalidArgument);
    let e = block_on(create(&image, None, &CreateOptions::default())).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InvalidArgument);
}
