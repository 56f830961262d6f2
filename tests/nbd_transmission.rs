//! Raw-byte tests of the NBD transmission phase against an in-process server: simple and
//! structured replies, every error path of the framing (bad magic, oversized and
//! out-of-range requests, bad flags, unknown commands, read-only exports), pipelined
//! requests, disconnects mid-request, and a clean image after a graceful shutdown.

use crate::common;
use crate::nbd_util;

use crate::nbd_util::proto::*;
use nbd_util::{Raw, TestServer, create_image};

const SIZE: u64 = 16 << 20;
const BOTH: u32 = FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES;

/// A server with a writable export "" and a read-only one "ro".
async fn server(dir: &std::path::Path) -> (TestServer, std::path::PathBuf) {
    let img = dir.join("a.qcow2");
    create_image(&img, SIZE).await;
    let ro = dir.join("b.qcow2");
    create_image(&ro, SIZE).await;
    let srv = TestServer::start(dir, &[("disk", &img, true), ("ro", &ro, false)]).await;
    (srv, img)
}

async fn client(srv: &TestServer, name: &str, structured: bool) -> Raw {
    let mut c = Raw::connect_with(&srv.socket, BOTH).await;
    c.go(name, structured, false).await;
    c
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn simple_replies_and_error_paths() {
    let dir = tempfile::tempdir().unwrap();
    let (srv, img) = server(dir.path()).await;
    let mut c = client(&srv, "disk", false).await;

    c.request(CMD_WRITE, CMD_FLAG_FUA, 1, 4096, 8, b"abcdefgh")
        .await;
    assert_eq!(c.simple().await, (0, 1));
    c.request(CMD_READ, 0, 2, 4094, 12, &[]).await;
    assert_eq!(c.simple().await, (0, 2));
    assert_eq!(c.read(12).await, b"\0\0abcdefgh\0\0");

    // (kind, flags, offset, len, payload, errno)
    let cases: &[(u16, u16, u64, u32, usize, u32)] = &[
        (CMD_READ, 0, SIZE - 1, 2, 0, 22),          // read past the end
        (CMD_READ, 0, u64::MAX, 1, 0, 22),          // offset overflow
        (CMD_READ, 0, 0, (32 << 20) + 1, 0, 22),    // oversized read
        (CMD_WRITE, 0, SIZE, 4, 4, 28),             // write past the end: ENOSPC
        (CMD_WRITE_ZEROES, 0, SIZE - 1, 2, 0, 28),  // zeroes past the end: ENOSPC
        (CMD_TRIM, 0, SIZE, 1, 0, 22),              // trim past the end
        (CMD_READ, CMD_FLAG_DF, 0, 1, 0, 22),       // DF without structured replies
        (CMD_WRITE, CMD_FLAG_NO_HOLE, 0, 4, 4, 22), // flag of another command
        (CMD_READ, 1 << 12, 0, 1, 0, 22),           // unknown flag
        (CMD_BLOCK_STATUS, 0, 0, 512, 0, 22),       // no meta context negotiated
        (CMD_FLUSH, 0, 0, 512, 0, 22),              // flush with a length
        (42, 0, 0, 0, 0, 22),                       // unknown command
    ];
    for (i, &(kind, flags, off, len, payload, errno)) in cases.iter().enumerate() {
        let cookie = 100 + i as u64;
        c.request(kind, flags, cookie, off, len, &vec![0xee; payload])
            .await;
        assert_eq!(c.simple().await, (errno, cookie), "case {i}");
    }
    // An oversized write: its 33 MiB payload is skipped, not buffered, and the
    // connection stays in sync.
    let big = 33u32 << 20;
    c.request(CMD_WRITE, 0, 7, 0, big, &vec![0xcc; big as usize])
        .await;
    assert_eq!(c.simple().await, (22, 7));
    c.request(CMD_READ, 0, 8, 4096, 8, &[]).await;
    assert_eq!(c.simple().await, (0, 8));
    assert_eq!(c.read(8).await, b"abcdefgh");

    // Zero-length requests are harmless.
    c.request(CMD_READ, 0, 9, 0, 0, &[]).await;
    assert_eq!(c.simple().await, (0, 9));
    c.request(CMD_WRITE, 0, 10, 0, 0, &[]).await;
    assert_eq!(c.simple().await, (0, 10));

    // A bad magic ends the connection; the server keeps serving others.
    c.send(&[0xde; 28]).await;
    assert!(c.closed().await);
    let mut c = client(&srv, "disk", false).await;
    c.request(CMD_DISC, 0, 0, 0, 0, &[]).await;
    assert!(c.closed().await);

    srv.stop().await.unwrap();
    common::assert_check_clean(&img);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn structured_replies() {
    let dir = tempfile::tempdir().unwrap();
    let (srv, _) = server(dir.path()).await;
    let mut c = client(&srv, "disk", true).await;
    c.request(CMD_WRITE, 0, 1, 0, 3, b"xyz").await;
    let ch = c.chunk().await;
    assert_eq!(
        (ch.flags, ch.kind, ch.cookie),
        (REPLY_FLAG_DONE, REPLY_TYPE_NONE, 1)
    );
    c.request(CMD_READ, CMD_FLAG_DF, 2, 1, 4, &[]).await;
    let ch = c.chunk().await;
    assert_eq!(
        (ch.flags, ch.kind, ch.cookie),
        (REPLY_FLAG_DONE, REPLY_TYPE_OFFSET_DATA, 2)
    );
    assert_eq!(ch.payload, b"\0\0\0\0\0\0\0\x01yz\0\0");
    // Errors carry a message.
    c.request(CMD_READ, 0, 3, SIZE, 1, &[]).await;
    let ch = c.chunk().await;
    assert_eq!(
        (ch.flags, ch.kind, ch.cookie),
        (REPLY_FLAG_DONE, REPLY_TYPE_ERROR, 3)
    );
    assert_eq!(&ch.payload[..4], &22u32.to_be_bytes());
    let n = u16::from_be_bytes([ch.payload[4], ch.payload[5]]) as usize;
    assert_eq!(ch.payload.len(), 6 + n);
    assert!(String::from_utf8_lossy(&ch.payload[6..]).contains("beyond the end"));
    srv.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn read_only_export_refuses_writes() {
    let dir = tempfile::tempdir().unwrap();
    let (srv, _) = server(dir.path()).await;
    let mut c = client(&srv, "ro", false).await;
    c.request(CMD_WRITE, 0, 1, 0, 4, b"nope").await;
    assert_eq!(c.simple().await, (1, 1));
    c.request(CMD_TRIM, 0, 2, 0, 4096, &[]).await;
    assert_eq!(c.simple().await, (1, 2));
    c.request(CMD_WRITE_ZEROES, 0, 3, 0, 4096, &[]).await;
    assert_eq!(c.simple().await, (1, 3));
    c.request(CMD_READ, 0, 4, 0, 4, &[]).await;
    assert_eq!(c.simple().await, (0, 4));
    assert_eq!(c.read(4).await, [0; 4]);
    c.request(CMD_FLUSH, 0, 5, 0, 0, &[]).await;
    assert_eq!(c.simple().await, (0, 5));
    srv.stop().await.unwrap();
}

/// Many requests sent before any reply is read: every cookie is answered once, reads see
/// the writes that were acknowledged before them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipelined_requests() {
    let dir = tempfile::tempdir().unwrap();
    let (srv, img) = server(dir.path()).await;
    let mut c = client(&srv, "disk", true).await;
    const N: u64 = 64;
    const LEN: u32 = 96 << 10; // not a multiple of the cluster size: partial clusters
    for i in 0..N {
        let data = vec![i as u8 + 1; LEN as usize];
        c.request(CMD_WRITE, 0, i, i * u64::from(LEN), LEN, &data)
            .await;
    }
    let mut seen = vec![false; N as usize];
    for _ in 0..N {
        let ch = c.chunk().await;
        assert_eq!(ch.kind, REPLY_TYPE_NONE);
        assert!(!std::mem::replace(&mut seen[ch.cookie as usize], true));
    }
    for i in 0..N {
        c.request(CMD_READ, 0, 1000 + i, i * u64::from(LEN), LEN, &[])
            .await;
    }
    c.request(CMD_FLUSH, 0, 5000, 0, 0, &[]).await;
    for _ in 0..=N {
        let ch = c.chunk().await;
        if ch.cookie == 5000 {
            assert_eq!(ch.kind, REPLY_TYPE_NONE);
            continue;
        }
        let i = ch.cookie - 1000;
        assert_eq!(ch.kind, REPLY_TYPE_OFFSET_DATA);
        assert_eq!(&ch.payload[..8], &(i * u64::from(LEN)).to_be_bytes());
        assert!(
            ch.payload[8..].iter().all(|&b| b == i as u8 + 1),
            "read {i}"
        );
    }
    srv.stop().await.unwrap();
    common::assert_check_clean(&img);
}

/// Clients that vanish mid-request: the server drops them and keeps serving; the requests
/// they completed land; the image is clean after shutdown.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disconnect_mid_request() {
    let dir = tempfile::tempdir().unwrap();
    let (srv, img) = server(dir.path()).await;
    for cut in [3usize, 28, 28 + 1000] {
        let mut c = client(&srv, "disk", false).await;
        c.request(CMD_WRITE, 0, 1, 0, 4096, &[0x11; 4096]).await;
        let mut req = nbd_util::proto::Request {
            flags: 0,
            kind: CMD_WRITE,
            cookie: 2,
            offset: 8192,
            len: 1 << 20,
        }
        .encode()
        .to_vec();
        req.extend_from_slice(&[0x22; 4096]);
        c.send(&req[..cut]).await;
        drop(c);
    }
    // Write then disconnect at once: the write still completes before the close.
    let mut c = client(&srv, "disk", false).await;
    c.request(CMD_WRITE, 0, 3, 65536, 4096, &[0x33; 4096]).await;
    c.request(CMD_DISC, 0, 4, 0, 0, &[]).await;
    assert_eq!(c.simple().await, (0, 3));
    assert!(c.closed().await);

    let mut c = client(&srv, "disk", false).await;
    c.request(CMD_READ, 0, 5, 0, 4096, &[]).await;
    assert_eq!(c.simple().await, (0, 5));
    assert_eq!(c.read(4096).await, vec![0x11; 4096]);
    drop(c);
    srv.stop().await.unwrap();
    common::assert_check_clean(&img);
    let raw = common::qemu_raw(&img);
    assert!(raw[..4096].iter().all(|&b| b == 0x11));
    assert!(raw[65536..65536 + 4096].iter().all(|&b| b == 0x33));
}

/// Shutdown does not wait for a client stalled mid-payload, and still flushes and closes the
/// image cleanly with the acknowledged writes in it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_with_a_stalled_client() {
    let dir = tempfile::tempdir().unwrap();
    let (srv, img) = server(dir.path()).await;
    let mut c = client(&srv, "disk", false).await;
    c.request(CMD_WRITE, 0, 1, 0, 4096, &[0x44; 4096]).await;
    assert_eq!(c.simple().await, (0, 1));
    let req = nbd_util::proto::Request {
        flags: 0,
        kind: CMD_WRITE,
        cookie: 2,
        offset: 0,
        len: 1 << 20,
    };
    c.send(&req.encode()).await;
    c.send(&[0x55; 1000]).await;
    // Let the server get stuck waiting for the rest of the payload.
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    let t = std::time::Instant::now();
    srv.stop().await.unwrap();
    assert!(t.elapsed() < std::time::Duration::from_secs(5));
    assert!(c.closed().await);
    common::assert_check_clean(&img);
    let raw = common::qemu_raw(&img);
    assert!(raw[..4096].iter().all(|&b| b == 0x44));
}
