//! `scripts/incremental-backup.sh` (README "Incremental backup") runs to the end: a full
//! backup, writes, an incremental backup of only the dirty ranges read through `qcow2 serve
//! -B`, and `qemu-img compare` finds full + incremental identical to the image.

use std::process::Command;

#[test]
fn the_incremental_backup_script_restores_an_identical_image() {
    for tool in ["nbdinfo", "nbdcopy"] {
        if Command::new(tool).arg("--version").output().is_err() {
            eprintln!("skipped: {tool} not installed (apt-get install libnbd-bin)");
            return;
        }
    }
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/incremental-backup.sh");
    let out = Command::new("bash")
        .arg(script)
        .env("QCOW2", env!("CARGO_BIN_EXE_qcow2"))
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{text}\n{err}");
    // qemu-img compare's own verdict, then the script's.
    assert!(text.contains("Images are identical."), "{text}");
    assert!(text.contains("restored image identical"), "{text}");
    // Only the dirty ranges were copied: 4 writes, a few granules each, of a 64 MiB disk.
    let copied: Vec<&str> = text
        .lines()
        .filter(|l| l.starts_with("copy dirty range"))
        .collect();
    assert_eq!(copied.len(), 4, "{text}");
}
