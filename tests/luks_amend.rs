//! LUKS key slot changes (issue 14): `crypto::amend::amend_key_slots` against QEMU, and
//! QEMU's `qemu-img amend` key slots opened by ours.

use crate::common;

use qcow2_engine::crypto::Secret;
use qcow2_engine::crypto::amend::{KeySlotChange, amend_key_slots};
use qcow2_engine::image::{Image, OpenOptions};

const OBJS: [&str; 4] = [
    "--object",
    "secret,id=sec0,data=abc",
    "--object",
    "secret,id=sec1,data=xyz",
];

fn create(p: &str) {
    let o = "encrypt.format=luks,encrypt.key-secret=sec0,encrypt.iter-time=1";
    let mut args = vec!["create", "-q", "-f", "qcow2"];
    args.extend(OBJS);
    args.extend(["-o", o, p, "1M"]);
    common::run("qemu-img", &args);
    let io = format!("driver=qcow2,file.filename={p},encrypt.key-secret=sec0");
    let mut args = OBJS.to_vec();
    args.extend(["--image-opts", &io, "-c", "write -P 0x3c 0 4096"]);
    common::run("qemu-io", &args);
}

/// qemu-io reads the pattern back with secret `id`; `false` if QEMU refuses the secret.
fn qemu_reads_with(p: &str, id: &str) -> bool {
    let io = format!("driver=qcow2,file.filename={p},encrypt.key-secret={id}");
    let mut args = OBJS.to_vec();
    args.extend(["--image-opts", &io, "-c", "read -P 0x3c 0 4096"]);
    let (code, out) = common::status("qemu-io", &args);
    code == 0 && !out.contains("fail") && !out.contains("Invalid password")
}

async fn amend(p: &str, secret: &str, change: KeySlotChange) -> qcow2_engine::Result<()> {
    let file = common::storage(std::path::Path::new(p), false);
    let ih = qcow2_engine::image::read_cluster0(file.as_ref()).await?;
    amend_key_slots(file.as_ref(), &ih, &Secret::new(secret), &change).await
}

async fn we_read_with(p: &str, secret: &str) -> bool {
    let opts = OpenOptions::new().key_secret(Secret::new(secret));
    let Ok(img) = Image::open(p, &opts).await else {
        return false;
    };
    let mut buf = vec![0u8; 4096];
    img.read_at(&mut buf, 0).await.is_ok() && buf.iter().all(|&b| b == 0x3c)
}

#[tokio::test]
async fn our_key_slot_changes_work_in_qemu() {
    let dir = tempfile::tempdir().unwrap();
    let p = common::path_in(dir.path(), "a.qcow2");
    create(&p);
    let add = KeySlotChange::Activate {
        new_secret: Secret::new("xyz"),
        keyslot: None,
        iter_time_ms: 1,
    };
    amend(&p, "abc", add.clone()).await.unwrap();
    assert!(
        qemu_reads_with(&p, "sec1"),
        "QEMU cannot use the added slot"
    );
    assert!(qemu_reads_with(&p, "sec0"));
    // Slot 1 now holds it: adding there again is refused.
    let again = KeySlotChange::Activate {
        new_secret: Secret::new("xyz"),
        keyslot: Some(1),
        iter_time_ms: 1,
    };
    let e = amend(&p, "abc", again).await.unwrap_err();
    assert!(
        e.to_string()
            .contains("Refusing to overwrite active keyslot 1"),
        "{e}"
    );
    // Erase the old passphrase's slot: only the new one opens the image now.
    let erase = KeySlotChange::Deactivate {
        keyslot: None,
        old_secret: Some(Secret::new("abc")),
        force: false,
    };
    amend(&p, "xyz", erase).await.unwrap();
    assert!(!qemu_reads_with(&p, "sec0"));
    assert!(qemu_reads_with(&p, "sec1"));
    assert!(!we_read_with(&p, "abc").await);
    assert!(we_read_with(&p, "xyz").await);
    // The last active slot is never erased.
    let last = KeySlotChange::Deactivate {
        keyslot: Some(1),
        old_secret: None,
        force: false,
    };
    let e = amend(&p, "xyz", last).await.unwrap_err();
    assert!(e.to_string().contains("refusing"), "{e}");
    let io = format!("driver=qcow2,file.filename={p},encrypt.key-secret=sec1");
    let mut args = vec!["check"];
    args.extend(OBJS);
    args.extend(["--image-opts", &io]);
    common::run("qemu-img", &args);
}

#[tokio::test]
async fn qemu_key_slots_open_in_ours() {
    let dir = tempfile::tempdir().unwrap();
    let p = common::path_in(dir.path(), "b.qcow2");
    create(&p);
    let io = format!("driver=qcow2,file.filename={p},encrypt.key-secret=sec0");
    let mut args = vec!["amend"];
    args.extend(OBJS);
    args.extend([
        "--image-opts",
        &io,
        "-o",
        "encrypt.state=active,encrypt.new-secret=sec1,encrypt.keyslot=5,encrypt.iter-time=1",
    ]);
    common::run("qemu-img", &args);
    assert!(we_read_with(&p, "xyz").await, "slot 5 added by QEMU");
    assert!(we_read_with(&p, "abc").await);
    assert!(!we_read_with(&p, "abd").await);
}
