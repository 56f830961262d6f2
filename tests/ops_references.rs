//! The whole-image operations follow the reference policy too: an overlay that names a file
//! outside its directory (`../victim.raw`, a symlink out, an absolute path) must not make
//! `commit` write into that file, nor `rebase` copy that file's bytes into the image, unless
//! the caller trusts the image. The victim is checked through QEMU afterwards.

use crate::common;

use std::path::Path;

use common::{path_in, qcow2, run};
use qcow2_engine::ErrorKind;
use qcow2_engine::image::{OpenOptions, ReferencePolicy};
use qcow2_engine::ops::commit::{CommitOptions, commit};
use qcow2_engine::ops::rebase::{NewBacking, RebaseOptions, rebase};

/// `dir/victim.raw` (1 MiB of 0x5a) and `dir/tenant/NAME` (qcow2, 0x11 in its first 64 KiB)
/// naming `backing` as its raw backing file. Returns (victim, image).
fn tenant_image(dir: &Path, name: &str, backing: &str) -> (String, String) {
    let victim = path_in(dir, "victim.raw");
    if !Path::new(&victim).exists() {
        common::qemu_create_fmt(&victim, "raw", "", "1M");
        common::qemu_io_fmt("raw", &victim, &["write -P 0x5a 0 1M"]);
    }
    let sub = dir.join("tenant");
    std::fs::create_dir_all(&sub).unwrap();
    let img = path_in(&sub, name);
    run(
        "qemu-img",
        &[
            "create", "-q", "-f", "qcow2", "-u", "-b", backing, "-F", "raw", &img, "1M",
        ],
    );
    common::qemu_io_fmt("qcow2", &img, &["write -P 0x11 0 64k"]);
    (victim, img)
}

/// The victim still holds 0x5a everywhere; the image still holds its own 0x11 cluster.
fn untouched(victim: &str, img: &str) {
    common::qemu_io_fmt("raw", victim, &["read -P 0x5a 0 1M"]);
    run(
        "qemu-io",
        &["-r", "-U", "-c", "read -P 0x11 0 64k", &no_backing(img)],
    );
}

/// `img` opened by QEMU without its backing file (its own clusters only; the rest reads 0).
fn no_backing(img: &str) -> String {
    format!(
        r#"json:{{"driver":"qcow2","file":{{"driver":"file","filename":"{img}"}},"backing":null}}"#
    )
}

#[tokio::test]
async fn commit_refuses_a_backing_outside_the_image_directory() {
    let dir = tempfile::tempdir().unwrap();
    let victim_abs = path_in(dir.path(), "victim.raw");
    for (name, backing) in [
        ("dotdot.qcow2", "../victim.raw".to_string()),
        ("abs.qcow2", victim_abs.clone()),
    ] {
        let (victim, img) = tenant_image(dir.path(), name, &backing);
        let e = commit(&img, &CommitOptions::new(OpenOptions::new()))
            .await
            .unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Refused, "{name}: {e}");
        untouched(&victim, &img);
        // The CLI's untrusted mode refuses it as well.
        let r = qcow2(&["commit", "--untrusted", &img]);
        assert_ne!(r.code, 0, "{name}: {}", r.stderr);
        untouched(&victim, &img);
    }
    // A symlink inside the directory that leads out of it.
    let sub = dir.path().join("tenant");
    std::os::unix::fs::symlink(dir.path().join("victim.raw"), sub.join("link.raw")).unwrap();
    let (victim, img) = tenant_image(dir.path(), "link.qcow2", "link.raw");
    let e = commit(&img, &CommitOptions::new(OpenOptions::new()))
        .await
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Refused, "{e}");
    untouched(&victim, &img);

    // Trusting the image (the caller's explicit choice) commits into it: the refusal above
    // was the policy, not a broken commit.
    let trusted = OpenOptions::new().references(ReferencePolicy::Any);
    let (victim, img) = tenant_image(dir.path(), "trusted.qcow2", "../victim.raw");
    commit(&img, &CommitOptions::new(trusted)).await.unwrap();
    common::qemu_io_fmt(
        "raw",
        &victim,
        &["read -P 0x11 0 64k", "read -P 0x5a 64k 960k"],
    );
}

#[tokio::test]
async fn rebase_does_not_copy_from_a_backing_outside_the_image_directory() {
    let dir = tempfile::tempdir().unwrap();
    let (victim, img) = tenant_image(dir.path(), "up.qcow2", "../victim.raw");
    let own = path_in(&dir.path().join("tenant"), "base.raw");
    common::qemu_create_fmt(&own, "raw", "", "1M");
    let new = NewBacking {
        name: "base.raw".into(),
        format: "raw".into(),
    };
    // Safe mode would read the old backing (the victim) into the image: refused.
    let opts = RebaseOptions::new(OpenOptions::new(), Some(new));
    let e = rebase(&img, &opts).await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Refused, "{e}");
    // Flattening would copy all of the victim into the image: refused too.
    let e = rebase(&img, &RebaseOptions::new(OpenOptions::new(), None))
        .await
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Refused, "{e}");
    let r = qcow2(&["rebase", "--untrusted", "-b", "", &img]);
    assert_ne!(r.code, 0, "{}", r.stderr);
    // Nothing of the victim reached the image, and its header still names the old backing.
    untouched(&victim, &img);
    let info = run("qemu-img", &["info", "-U", "--output=json", &img]);
    assert!(info.contains("../victim.raw"), "{info}");
    // The image's 64 KiB..1 MiB must not hold the victim's bytes.
    let out = run(
        "qemu-io",
        &["-r", "-U", "-c", "read -P 0 64k 960k", &no_backing(&img)],
    );
    assert!(!out.contains("Pattern verification failed"), "{out}");
    // Trusted, flattening copies the old backing's bytes: the refusals above were the policy.
    let trusted = OpenOptions::new().references(ReferencePolicy::Any);
    rebase(&img, &RebaseOptions::new(trusted, None))
        .await
        .unwrap();
    run(
        "qemu-io",
        &["-r", "-U", "-c", "read -P 0x5a 64k 960k", &no_backing(&img)],
    );
}
