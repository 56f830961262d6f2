//! Random and half-valid request streams thrown at a `qcow2 serve` process: it must never
//! panic, hang or lose framing for the next client, and the image must stay consistent.
//! `QCOW2_TEST_SEED=<n>` replays a run.
//!
//! The server runs in a child process so that a panic in any of its tasks is seen without
//! touching this process's global state: tokio catches a task's panic, but Rust's default
//! hook has printed it to the server's stderr by then. (A panic hook installed here would
//! also catch, and be replaced by, other tests running in parallel in this binary.)

use crate::common;
use crate::common::bg::Bg;
use crate::nbd_util;

use std::time::Duration;

use crate::nbd_util::proto::*;
use nbd_util::{Raw, create_image};
use rand::{Rng, SeedableRng, rngs::StdRng};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const SIZE: u64 = 8 << 20;
const BIN: &str = env!("CARGO_BIN_EXE_qcow2");

/// `qcow2 serve` on `sock` as the in-process test server is set up: 16 connections, a 5 s
/// handshake limit, and trims that really discard (the CLI ignores them by default).
fn serve(sock: &std::path::Path, img: &std::path::Path) -> Bg {
    let (s, i) = (sock.to_str().unwrap(), img.to_str().unwrap());
    let args = [
        "serve",
        "-t",
        "-e",
        "16",
        "--handshake-limit",
        "5",
        "--discard=unmap",
        "-f",
        "qcow2",
        "-k",
        s,
        i,
    ];
    Bg::serving(BIN, &args, sock)
}

/// A request that is valid, slightly off, or nonsense.
fn random_request(rng: &mut StdRng) -> (Request, usize) {
    let kind = if rng.gen_bool(0.8) {
        rng.gen_range(0..8)
    } else {
        rng.r#gen()
    };
    let flags = if rng.gen_bool(0.7) {
        rng.gen_range(0..4)
    } else {
        rng.r#gen()
    };
    let offset = match rng.gen_range(0..10) {
        0 => rng.r#gen(),
        1 => SIZE - rng.gen_range(0..4096),
        _ => rng.gen_range(0..SIZE),
    };
    let len: u32 = match rng.gen_range(0..10) {
        0 => rng.r#gen(),
        1 => (32 << 20) + rng.gen_range(0..2),
        _ => rng.gen_range(0..256 << 10),
    };
    // Sometimes the payload of a write is cut short (the client then hangs up).
    let payload = if kind == CMD_WRITE {
        let full = len.min(1 << 20) as usize;
        if rng.gen_bool(0.1) {
            rng.gen_range(0..=full)
        } else {
            full
        }
    } else {
        0
    };
    let cookie = rng.r#gen();
    (
        Request {
            flags,
            kind,
            cookie,
            offset,
            len,
        },
        payload,
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_streams_never_break_the_server() {
    let seed = std::env::var("QCOW2_TEST_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(rand::random::<u64>);
    eprintln!("QCOW2_TEST_SEED={seed}");
    let mut rng = StdRng::seed_from_u64(seed);
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("a.qcow2");
    create_image(&img, SIZE).await;
    let sock = dir.path().join("nbd.sock");
    let srv = serve(&sock, &img);

    let mut replies = 0usize;
    for _ in 0..40 {
        let mut c = Raw::connect_with(&sock, FLAG_C_FIXED_NEWSTYLE).await;
        let structured = rng.gen_bool(0.5);
        c.go("", structured, false).await;
        for _ in 0..rng.gen_range(1..20) {
            let (req, payload) = random_request(&mut rng);
            let mut b = req.encode().to_vec();
            b.resize(b.len() + payload, 0xa5);
            if rng.gen_bool(0.02) {
                b[0] ^= 0xff; // lose the framing
            }
            if c.s.write_all(&b).await.is_err() {
                break;
            }
        }
        // Hang up our side; the server must answer what it can and close.
        let _ = c.s.shutdown().await;
        let mut sink = Vec::new();
        let r = tokio::time::timeout(Duration::from_secs(20), c.s.read_to_end(&mut sink)).await;
        assert!(
            r.is_ok(),
            "server did not close the connection (seed {seed})"
        );
        replies += sink.len();
    }
    // Most requests are answered: the stream is really parsed, not dropped at once.
    assert!(replies > 1000, "only {replies} reply bytes (seed {seed})");
    // A well-behaved client is still served correctly.
    let mut c = Raw::connect_with(&sock, FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES).await;
    c.go("", false, false).await;
    c.request(CMD_WRITE, CMD_FLAG_FUA, 1, 0, 3, b"end").await;
    assert_eq!(c.simple().await, (0, 1));
    drop(c);
    let (code, err) = srv.stop_with_stderr();
    assert!(
        !err.contains("panicked"),
        "the server panicked (seed {seed}): {err}"
    );
    assert_eq!(code, 0, "graceful shutdown failed (seed {seed}): {err}");
    common::assert_check_clean(&img);
}
