//! `convert -c` writes each chunk's compressed clusters with few IOs (neighbouring payloads
//! packed back to back, incompressible neighbours as one normal write): checked with QEMU on
//! payloads of every size, which cross host cluster boundaries, next to zero and
//! incompressible clusters and a partial last cluster.

use crate::common;

use rand::{RngCore, SeedableRng, rngs::StdRng};

/// 4 KiB clusters, each with a random head of a different length and a repeated byte after
/// it (payloads from a few bytes to incompressible), every 11th all zero, every 13th wholly
/// random; the disk ends 5000 bytes into a cluster.
fn source() -> Vec<u8> {
    let mut rng = StdRng::seed_from_u64(12);
    let mut data = vec![0u8; (3 << 20) + 5000];
    for (k, c) in data.chunks_mut(4096).enumerate() {
        match (k % 11, k % 13) {
            (0, _) => {}
            (_, 0) => rng.fill_bytes(c),
            _ => {
                let head = (k * 397) % c.len();
                rng.fill_bytes(&mut c[..head]);
                c[head..].fill(k as u8);
            }
        }
    }
    data
}

#[test]
fn batched_compressed_writes_match_the_source() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src.raw");
    std::fs::write(&src, source()).unwrap();
    let s = src.to_str().unwrap();
    for codec in ["zlib", "zstd"] {
        let mut outputs = Vec::new();
        for m in ["1", "8"] {
            let out = dir.path().join(format!("{codec}-{m}.qcow2"));
            let o = out.to_str().unwrap();
            let opts = format!("cluster_size=4096,compression_type={codec}");
            common::qcow2_ok(&[
                "convert", "-c", "-m", m, "-o", &opts, "-O", "qcow2", "-f", "raw", s, o,
            ]);
            common::assert_check_clean(&out);
            common::run("qemu-img", &["compare", "-f", "raw", "-F", "qcow2", s, o]);
            outputs.push(std::fs::read(&out).unwrap());
        }
        assert!(outputs[0] == outputs[1], "{codec}: -m changed the output");
        // QEMU's map sees compressed clusters, normal ones and holes.
        let o = dir.path().join(format!("{codec}-1.qcow2"));
        let map = common::run("qemu-img", &["map", "--output=json", o.to_str().unwrap()]);
        let v: serde_json::Value = serde_json::from_str(&map).unwrap();
        let has = |key: &str, want: bool| {
            v.as_array()
                .unwrap()
                .iter()
                .any(|e| e[key].as_bool() == Some(want) && e["data"].as_bool() == Some(true))
        };
        assert!(has("compressed", true), "{codec}: no compressed cluster");
        assert!(has("compressed", false), "{codec}: no normal cluster");
    }
}
