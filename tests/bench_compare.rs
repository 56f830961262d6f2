//! `scripts/bench-compare.sh --quick` runs and prints its table (a smoke test: the script
//! drives `qcow2 bench`, `qcow2 convert`, `qcow2 serve`, qemu-img bench and convert, qemu-nbd
//! and fio; timings are not checked).

use std::path::Path;
use std::process::Command;

#[test]
fn quick_compare_prints_a_table() {
    if !Path::new("/usr/bin/time").exists() {
        eprintln!("no /usr/bin/time: skipping the bench-compare smoke test");
        return;
    }
    let scratch = tempfile::tempdir().unwrap();
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/bench-compare.sh");
    let out = Command::new("bash")
        .args([script, "--quick", "a", "g", "h", "i"])
        .env("QCOW2_BIN", env!("CARGO_BIN_EXE_qcow2"))
        .env("BENCH_DIR", scratch.path())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let lines: Vec<&str> = stdout.lines().collect();
    assert!(lines.iter().any(|l| l.starts_with("workload ")), "{stdout}");
    let mut rows = vec![
        "a alloc 4k d1 ",
        "a alloc 4k d32 ",
        "g read 4k small L2",
        "i -c zstd (qemu -m 8) ",
    ];
    if fio_has_nbd() {
        rows.extend([
            "h nbd 4k randread QD32 1 conn",
            "h nbd 4k randwrite QD32 4 conns",
        ]);
    } else {
        eprintln!("no fio with the nbd engine: workload h not checked");
    }
    for row in rows {
        let line = lines
            .iter()
            .find(|l| l.starts_with(row))
            .unwrap_or_else(|| panic!("no row '{row}' in\n{stdout}"));
        // Every row has both medians and their ratio: three numbers at least.
        let numbers = line
            .split_whitespace()
            .filter(|w| w.parse::<f64>().is_ok())
            .count();
        assert!(numbers >= 6, "{line}");
    }
    // The scratch directory is left empty (the script removes its images).
    assert_eq!(std::fs::read_dir(scratch.path()).unwrap().count(), 0);
}

/// Whether fio is installed with its `nbd` engine (CI installs it; workload h needs it).
fn fio_has_nbd() -> bool {
    Command::new("fio")
        .arg("--enghelp")
        .output()
        .is_ok_and(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .any(|l| l.trim() == "nbd")
        })
}
