//! `qcow2 resize --preallocation=MODE` against `qemu-img resize` on copies of the same image:
//! same exit code and messages, same content afterwards (`qemu-img compare`), a clean check;
//! grown parts are allocated (qcow2: mapped as data; raw falloc/full: disk blocks).

use std::path::Path;

use crate::common::chain::{LayerSpec, assert_same_image, both, make_chain, twin};
use crate::common::run;

fn image(dir: &Path) {
    let layers = [
        LayerSpec {
            name: "img.qcow2",
            format: "qcow2",
            opts: "cluster_size=4096".into(),
            io: vec!["write -P 1 0 1M".into()],
        },
        LayerSpec {
            name: "img.raw",
            format: "raw",
            opts: String::new(),
            io: vec!["write -P 1 0 1M".into()],
        },
    ];
    make_chain(dir, &layers, "1M");
}

/// Bytes of the grown range `[1M, 3M)` that `qemu-img map` reports as not allocated.
fn unallocated_tail(img: &Path) -> u64 {
    let map = run("qemu-img", &["map", "--output=json", img.to_str().unwrap()]);
    let v: serde_json::Value = serde_json::from_str(&map).unwrap();
    v.as_array()
        .unwrap()
        .iter()
        .filter(|e| e["start"].as_u64().unwrap() >= 1 << 20 && !e["data"].as_bool().unwrap())
        .map(|e| e["length"].as_u64().unwrap())
        .sum()
}

#[test]
fn resize_preallocation_matches_qemu_img() {
    for mode in ["off", "metadata", "falloc", "full", "foo"] {
        let dir = tempfile::tempdir().unwrap();
        image(dir.path());
        let (theirs, ours) = twin(dir.path());
        let arg = format!("--preallocation={mode}");
        for (name, fmt) in [("img.qcow2", "qcow2"), ("img.raw", "raw")] {
            let (code, o, t) = both(&theirs, &ours, &["resize", "-f", fmt, &arg, name, "3M"]);
            assert_eq!(o, t, "{mode} {name}");
            if code != 0 {
                continue;
            }
            assert_same_image(&theirs, &ours, name, fmt);
            if fmt == "qcow2" && mode != "off" {
                assert_eq!(
                    unallocated_tail(&ours.join(name)),
                    0,
                    "{mode}: grown part mapped"
                );
            }
            if fmt == "raw" && (mode == "falloc" || mode == "full") {
                use std::os::unix::fs::MetadataExt;
                let blocks = std::fs::metadata(ours.join(name)).unwrap().blocks() * 512;
                assert!(blocks >= 3 << 20, "{mode}: {blocks} bytes allocated");
            }
        }
        let shrink = ["resize", "--shrink", &arg, "img.qcow2", "512k"];
        // Same exit code and stdout; our shrink warning (older qemu-img's) may come first.
        let (_, o, t) = both(&theirs, &ours, &shrink);
        assert!(o.ends_with(&t), "{mode}: shrink: {o} / {t}");
    }
}
