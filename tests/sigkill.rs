//! Process crashes: `qcow2 io` runs a long random workload (writes, zero writes, discards,
//! flushes, concurrent aio writes) and is killed with SIGKILL at delays spread over its run.
//! Every time, `qemu-img check` must find no corruption (leaks are allowed: exit 0 or 3), and
//! `qcow2 check -r leaks` must leave an image that `qemu-img check` finds clean. The next
//! round runs on the repaired image.
//!
//! SIGKILL keeps the page cache, so this models a process crash; the crash-simulating storage
//! (tests/crash.rs) models power cuts.

use crate::common;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

const IMAGE_SIZE: u64 = 128 << 20;
const COMMANDS: usize = 4000;
const KILLS: u32 = 10;
/// Kills happen within this span even when the machine is slow and the full run is longer.
const MAX_SPAN: Duration = Duration::from_millis(1500);

/// One random qemu-io style command.
fn command(rng: &mut StdRng) -> String {
    let off = rng.gen_range(0..IMAGE_SIZE / 512) * 512;
    let len = (rng.gen_range(1..=512u64) * 512).min(IMAGE_SIZE - off);
    let pat = rng.gen_range(1..=255u8);
    match rng.gen_range(0..100) {
        0..45 => format!("aio_write -q -P {pat} {off} {len}"),
        45..60 => format!("write -q -P {pat} {off} {len}"),
        60..66 => format!("write -q -z {off} {len}"),
        66..70 => format!("write -q -z -u {off} {len}"),
        70..80 => format!("discard -q {off} {len}"),
        80..90 => "aio_flush".to_string(),
        _ => "flush".to_string(),
    }
}

/// The `qcow2 io` invocation for a random workload on `img`.
fn workload(img: &Path, rng: &mut StdRng) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_qcow2"));
    cmd.arg("io");
    for _ in 0..COMMANDS {
        cmd.arg("-c").arg(command(rng));
    }
    cmd.arg(img).stdout(Stdio::null()).stderr(Stdio::null());
    cmd
}

/// Run the workload, killing it after `delay` (or letting it finish when `None`). Returns
/// whether it was killed before it ended.
fn run(img: &Path, rng: &mut StdRng, delay: Option<Duration>) -> bool {
    let mut child = workload(img, rng).spawn().unwrap();
    let Some(delay) = delay else {
        assert!(child.wait().unwrap().success(), "the workload runs cleanly");
        return false;
    };
    std::thread::sleep(delay);
    let running = child.try_wait().unwrap().is_none();
    child.kill().unwrap();
    child.wait().unwrap();
    running
}

/// `qemu-img check`'s exit status.
///
/// The killed process's image lock can outlive it for a moment: the kernel tears an io_uring
/// ring down asynchronously, and requests still in it keep the file (and its OFD locks)
/// open. So a lock refusal right after the kill is retried for a while.
fn qemu_check(img: &Path) -> (i32, String) {
    let deadline = Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let (code, text) = common::status("qemu-img", &["check", img.to_str().unwrap()]);
        if !(code == 1 && text.contains("lock") && Instant::now() < deadline) {
            return (code, text);
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

#[test]
fn sigkill_during_random_workloads_never_corrupts() {
    let seed = std::env::var("SIGKILL_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(rand::random::<u64>);
    eprintln!("seed {seed} (set SIGKILL_SEED to replay)");
    let mut rng = StdRng::seed_from_u64(seed);
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("k.qcow2");
    let p = img.to_str().unwrap();
    let size = IMAGE_SIZE.to_string();
    common::qemu_create(p, "", &size);

    // One full run: the workload is valid, and how long it takes places the kills.
    let start = Instant::now();
    run(&img, &mut rng, None);
    let full = start.elapsed();
    let span = full.min(MAX_SPAN);
    common::assert_check_clean(&img);

    let (mut killed, mut leaky) = (0, 0);
    for k in 0..KILLS {
        let at = span.mul_f64((f64::from(k) + rng.gen_range(0.1..0.9)) / f64::from(KILLS));
        killed += u32::from(run(&img, &mut rng, Some(at)));
        let (code, text) = qemu_check(&img);
        assert!(
            code == 0 || code == 3,
            "seed {seed}, kill {k} at {at:?}: qemu-img check exit {code}\n{text}"
        );
        leaky += u32::from(code == 3);
        let r = common::qcow2(&["check", "-r", "leaks", p]);
        assert!(
            r.code == 0,
            "seed {seed}: qcow2 check -r leaks: {}",
            r.stdout
        );
        let (code, text) = qemu_check(&img);
        assert_eq!(code, 0, "seed {seed}, kill {k}: after repair\n{text}");
    }
    eprintln!(
        "full run {full:?}; {killed} of {KILLS} kills hit a running workload, {leaky} leaked"
    );
    assert!(killed >= KILLS / 2, "the kills must interrupt the workload");
}
