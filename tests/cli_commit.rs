//! `qcow2 commit` against `qemu-img commit` on the same chains: same exit code and stdout,
//! the resulting base and overlay read the same (`qemu-img compare`) and check clean, over
//! image variants (64 KiB and 512 B clusters, refcount_bits 1, extended L2, v2, compressed
//! clusters, zero clusters, discards, unaligned writes) and chains of 2 and 3 images.

use std::path::Path;

use crate::common::chain::{
    LayerSpec, VARIANTS, assert_same_image, both, chain3_layers, io, make_chain, twin,
};

/// base.qcow2 ← mid.qcow2 ← top.qcow2, 8 MiB, the top also writing past the middle's data.
fn chain3(dir: &Path, opts: &str) {
    let mut layers = chain3_layers(opts);
    layers[2].io.push("write -P 8 8000k 192k".into());
    make_chain(dir, &layers, "8M");
}

/// Run `commit ARGS` with both tools on copies of a fresh chain; compare every image.
fn commit_both(opts: &str, args: &[&str]) -> (i32, String, String) {
    let dir = tempfile::tempdir().unwrap();
    chain3(dir.path(), opts);
    let (theirs, ours) = twin(dir.path());
    let r = both(&theirs, &ours, args);
    for name in ["base.qcow2", "mid.qcow2", "top.qcow2"] {
        assert_same_image(&theirs, &ours, name, "qcow2");
    }
    r
}

#[test]
fn commit_into_backing_file_matches_qemu_img() {
    for opts in VARIANTS {
        let (code, err, _) = commit_both(opts, &["commit", "top.qcow2"]);
        assert_eq!(code, 0, "{opts}: {err}");
    }
}

#[test]
fn commit_keep_base_and_quiet_match_qemu_img() {
    for args in [
        &["commit", "-d", "top.qcow2"][..],
        &["commit", "-q", "-b", "base.qcow2", "top.qcow2"],
        &[
            "commit",
            "-b",
            "mid.qcow2",
            "-f",
            "qcow2",
            "-t",
            "none",
            "top.qcow2",
        ],
        &["commit", "-r", "100M", "mid.qcow2"],
    ] {
        for opts in ["", "cluster_size=512,refcount_bits=1"] {
            let (code, err, _) = commit_both(opts, args);
            assert_eq!(code, 0, "{args:?} {opts}: {err}");
        }
    }
}

#[test]
fn commit_refusals_match_qemu_img() {
    for args in [
        &["commit", "base.qcow2"][..],
        &["commit", "-b", "nonexistent", "top.qcow2"],
        &["commit", "-b", "top.qcow2", "top.qcow2"],
        &["commit", "-f", "raw", "top.qcow2"],
        &["commit", "-t", "foo", "top.qcow2"],
        &["commit", "-r", "abc", "top.qcow2"],
    ] {
        let (code, ours, theirs) = commit_both("", args);
        assert_eq!(code, 1, "{args:?}");
        assert_eq!(ours, theirs, "{args:?}");
    }
}

#[test]
fn commit_into_raw_backing_matches_qemu_img() {
    let dir = tempfile::tempdir().unwrap();
    let layers = [
        LayerSpec {
            name: "base.raw",
            format: "raw",
            opts: String::new(),
            io: io(&["write -P 1 0 1M", "write -P 9 3M 1M"]),
        },
        LayerSpec {
            name: "top.qcow2",
            format: "qcow2",
            opts: "backing_file=base.raw,backing_fmt=raw".into(),
            io: io(&[
                "write -P 5 0 64k",
                "write -z 512k 1M",
                "write -P 6 4000 100",
            ]),
        },
    ];
    make_chain(dir.path(), &layers, "4M");
    let (theirs, ours) = twin(dir.path());
    let (code, err, _) = both(&theirs, &ours, &["commit", "top.qcow2"]);
    assert_eq!(code, 0, "{err}");
    assert_same_image(&theirs, &ours, "base.raw", "raw");
    assert_same_image(&theirs, &ours, "top.qcow2", "qcow2");
}

#[test]
fn commit_grows_a_shorter_base() {
    let dir = tempfile::tempdir().unwrap();
    let layers = [
        LayerSpec {
            name: "base.qcow2",
            format: "qcow2",
            opts: String::new(),
            io: io(&["write -P 1 0 1M"]),
        },
        LayerSpec {
            name: "top.qcow2",
            format: "qcow2",
            opts: "backing_file=base.qcow2,backing_fmt=qcow2".into(),
            io: Vec::new(),
        },
    ];
    make_chain(dir.path(), &layers, "2M");
    crate::common::run_in(dir.path(), "qemu-img", &["resize", "-q", "top.qcow2", "6M"]);
    crate::common::qemu_io(dir.path().join("top.qcow2"), &["write -P 2 5M 512k"]);
    let (theirs, ours) = twin(dir.path());
    let (code, err, _) = both(&theirs, &ours, &["commit", "top.qcow2"]);
    assert_eq!(code, 0, "{err}");
    assert_same_image(&theirs, &ours, "base.qcow2", "qcow2");
    assert_same_image(&theirs, &ours, "top.qcow2", "qcow2");
}

/// Power cuts at every point of emptying the overlay (commit's last step, after the base was
/// written and fsynced): the overlay never has a corruption and always reads as before,
/// whichever of its clusters already fall through to the base.
#[tokio::test]
async fn emptying_the_overlay_is_crash_safe() {
    use qcow2_engine::image::{BackingOverride, Image, OpenOptions, ReferencePolicy};
    use qcow2_engine::storage::{CrashPolicy, CrashStorage};
    use std::sync::Arc;

    let dir = tempfile::tempdir().unwrap();
    chain3(dir.path(), "cluster_size=4096");
    let d = dir.path();
    // The base part of a commit, by qemu-img: mid now holds top's data, top is unchanged.
    crate::common::run_in(d, "qemu-img", &["commit", "-q", "-d", "top.qcow2"]);
    let top = d.join("top.qcow2");
    let before = crate::common::qemu_raw(&top);
    let crash = Arc::new(CrashStorage::new(std::fs::read(&top).unwrap()));
    // In-memory storage has no directory to hold references to: trust the test's files.
    let opts = OpenOptions::new()
        .writable(true)
        .references(ReferencePolicy::Any)
        .backing(BackingOverride {
            path: Some(d.join("mid.qcow2")),
            format: Some("qcow2".into()),
        });
    let img = Image::open_storage(crash.clone(), &opts).await.unwrap();
    img.make_empty().await.unwrap();
    img.close().await.unwrap();
    let points = crash.crash_points();
    assert!(points > 2);
    let probe = d.join("probe.qcow2");
    for point in 0..points {
        for policy in [CrashPolicy::None, CrashPolicy::SubsetTorn(point as u64)] {
            std::fs::write(&probe, crash.image_at(point, policy)).unwrap();
            let (code, text) =
                crate::common::status("qemu-img", &["check", probe.to_str().unwrap()]);
            assert!(code == 0 || code == 3, "point {point} {policy:?}: {text}");
            assert!(
                crate::common::qemu_raw(&probe) == before,
                "point {point} {policy:?}"
            );
        }
    }
    std::fs::write(&probe, crash.current_image()).unwrap();
    crate::common::assert_check_clean(&probe);
    let map = crate::common::run(
        "qemu-img",
        &["map", "--output=json", probe.to_str().unwrap()],
    );
    assert!(
        !map.contains("\"depth\": 0"),
        "the overlay still allocates: {map}"
    );
}

/// Cancelling a commit through its progress stops it between steps: the call fails, every
/// image checks clean, and the overlay still reads as before (its data was not dropped).
#[tokio::test]
async fn a_cancelled_commit_leaves_consistent_images() {
    use qcow2_engine::image::{OpenOptions, ReferencePolicy};
    use qcow2_engine::ops::Progress;
    use qcow2_engine::ops::commit::{CommitOptions, commit};
    use std::sync::{Arc, OnceLock};

    let dir = tempfile::tempdir().unwrap();
    chain3(dir.path(), "");
    let top = dir.path().join("top.qcow2");
    let before = crate::common::qemu_raw(&top);
    // The callback cancels its own progress after 2 of the 8 MiB (a test-only cycle).
    let me: Arc<OnceLock<Arc<Progress>>> = Arc::new(OnceLock::new());
    let slot = me.clone();
    let progress = Progress::with_callback(move |done, _| {
        if done >= 2 << 20
            && let Some(p) = slot.get()
        {
            p.cancel();
        }
    });
    me.set(progress.clone()).unwrap();
    let mut opts = CommitOptions::new(OpenOptions::new().references(ReferencePolicy::Any));
    opts.progress = Some(progress.clone());
    let err = commit(&top, &opts)
        .await
        .expect_err("the commit was cancelled");
    assert_eq!(err.kind(), qcow2_engine::ErrorKind::Io, "{err:#}");
    assert!(progress.done() < progress.total(), "stopped early");
    assert!(crate::common::qemu_raw(&top) == before);
    for name in ["base.qcow2", "mid.qcow2", "top.qcow2"] {
        crate::common::assert_check_clean(&dir.path().join(name));
    }
}
