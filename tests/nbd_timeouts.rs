//! Clients that hold a connection slot without making progress: one stuck in the handshake
//! is dropped after the handshake limit, and silent clients filling every slot are dropped
//! after the idle timeout, so they cannot lock everybody else out.

use crate::nbd_util;

use std::time::{Duration, Instant};

use crate::nbd_util::proto::*;
use nbd_util::{Raw, TestServer, create_image};

const SIZE: u64 = 1 << 20;
const BOTH: u32 = FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES;

async fn server(dir: &std::path::Path, max: usize, handshake: u64, idle: u64) -> TestServer {
    let img = dir.join("a.qcow2");
    create_image(&img, SIZE).await;
    TestServer::start_configured(dir, &[("", &img, true)], |s| {
        s.max_connections(max)
            .handshake_timeout(Duration::from_millis(handshake))
            .idle_timeout(Duration::from_millis(idle))
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_stuck_in_the_handshake_is_dropped() {
    let dir = tempfile::tempdir().unwrap();
    let srv = server(dir.path(), 4, 300, 60_000).await;
    let start = Instant::now();
    // Greeted, sends its flags, then half an option, and stalls.
    let mut c = Raw::connect_with(&srv.socket, BOTH).await;
    c.send(&OPT_MAGIC.to_be_bytes()).await;
    assert!(c.closed().await, "not dropped");
    assert!(start.elapsed() >= Duration::from_millis(250));
    // One that never even sends its flags.
    let mut c = Raw::connect(&srv.socket).await;
    assert!(c.closed().await, "not dropped");
    srv.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_clients_filling_every_slot_are_dropped() {
    let dir = tempfile::tempdir().unwrap();
    let srv = server(dir.path(), 2, 5_000, 300).await;
    let mut silent = Vec::new();
    for _ in 0..2 {
        let mut c = Raw::connect_with(&srv.socket, BOTH).await;
        c.go("", false, false).await;
        silent.push(c);
    }
    // A third client is kept waiting only until the silent ones are dropped.
    let start = Instant::now();
    let mut third = tokio::time::timeout(Duration::from_secs(5), async {
        Raw::connect_with(&srv.socket, BOTH).await
    })
    .await
    .expect("locked out by silent clients");
    assert!(start.elapsed() >= Duration::from_millis(250));
    assert_eq!(third.go("", false, false).await.0, SIZE);
    for c in &mut silent {
        assert!(c.closed().await, "silent client not dropped");
    }
    srv.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_clients_stay_while_there_is_room() {
    let dir = tempfile::tempdir().unwrap();
    let srv = server(dir.path(), 4, 5_000, 100).await;
    let mut c = Raw::connect_with(&srv.socket, BOTH).await;
    c.go("", false, false).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    // Still served after five idle periods: a flush gets its reply.
    let mut req = REQUEST_MAGIC.to_be_bytes().to_vec();
    req.extend_from_slice(&0u16.to_be_bytes());
    req.extend_from_slice(&CMD_FLUSH.to_be_bytes());
    req.extend_from_slice(&7u64.to_be_bytes());
    req.extend_from_slice(&[0; 12]);
    c.send(&req).await;
    assert_eq!(c.u32().await, SIMPLE_REPLY_MAGIC);
    assert_eq!(c.u32().await, 0, "flush failed");
    assert_eq!(c.u64().await, 7);
    srv.stop().await.unwrap();
}

/// A `qcow2 serve` child process, killed and reaped on drop.
struct ServeProcess(std::process::Child);

impl Drop for ServeProcess {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_flags_set_both_limits() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("a.qcow2");
    create_image(&img, SIZE).await;
    let sock = dir.path().join("s.sock");
    let child = std::process::Command::new(env!("CARGO_BIN_EXE_qcow2"))
        .args([
            "serve",
            "-t",
            "-e",
            "2",
            "--handshake-limit",
            "1",
            "--idle-timeout",
            "1",
            "-k",
        ])
        .args([&sock, &img])
        .spawn()
        .unwrap();
    let _guard = ServeProcess(child);
    let deadline = Instant::now() + Duration::from_secs(10);
    while !sock.exists() {
        assert!(Instant::now() < deadline, "qcow2 serve did not start");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Never sends its flags: dropped after the one-second handshake limit.
    let start = Instant::now();
    let mut stuck = Raw::connect(&sock).await;
    assert!(stuck.closed().await, "handshake limit not applied");
    assert!(start.elapsed() >= Duration::from_millis(900));
    // Two silent clients fill both slots; a third waits. Silent clients are dropped while
    // the server is full: the third gets served, and the other silent one goes next.
    let mut a = Raw::connect_with(&sock, BOTH).await;
    a.go("", false, false).await;
    let mut b = Raw::connect_with(&sock, BOTH).await;
    b.go("", false, false).await;
    let mut c = tokio::time::timeout(Duration::from_secs(5), async {
        Raw::connect_with(&sock, BOTH).await
    })
    .await
    .expect("locked out by silent clients");
    assert_eq!(c.go("", false, false).await.0, SIZE);
    assert!(a.closed().await && b.closed().await, "idle clients kept");
}
