//! Raw-byte tests of the NBD handshake against an in-process server on a Unix socket:
//! every option we support, unknown and malformed options, and clients that misbehave.

use crate::nbd_util;

use crate::nbd_util::proto::*;
use nbd_util::{Raw, TestServer, create_image, info_data, meta_data};

const SIZE: u64 = 16 << 20;

async fn server(dir: &std::path::Path) -> TestServer {
    let img = dir.join("a.qcow2");
    create_image(&img, SIZE).await;
    let ro = dir.join("b.qcow2");
    create_image(&ro, SIZE / 2).await;
    TestServer::start(dir, &[("disk", &img, true), ("ro", &ro, false)]).await
}

const BOTH: u32 = FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn export_name_with_and_without_zeroes() {
    let dir = tempfile::tempdir().unwrap();
    let srv = server(dir.path()).await;
    for (client, zeroes) in [(BOTH, 0), (FLAG_C_FIXED_NEWSTYLE, 124)] {
        let mut c = Raw::connect_with(&srv.socket, client).await;
        c.option(OPT_EXPORT_NAME, b"disk").await;
        assert_eq!(c.u64().await, SIZE);
        let flags = c.u16().await;
        assert_eq!(
            flags,
            FLAG_HAS_FLAGS
                | FLAG_SEND_FLUSH
                | FLAG_SEND_FUA
                | FLAG_CAN_MULTI_CONN
                | FLAG_SEND_CACHE
                | FLAG_SEND_TRIM
                | FLAG_SEND_WRITE_ZEROES
                | FLAG_SEND_FAST_ZERO
        );
        assert_eq!(c.read(zeroes).await, vec![0u8; zeroes]);
        // In transmission now: a flush gets a simple reply.
        c.request(CMD_FLUSH, 0, 5, 0, 0, &[]).await;
        assert_eq!(c.simple().await, (0, 5));
    }
    // The empty name is the default (first) export.
    let mut c = Raw::connect_with(&srv.socket, BOTH).await;
    c.option(OPT_EXPORT_NAME, b"").await;
    assert_eq!(c.u64().await, SIZE);
    // An unknown name cannot be answered with an error: the server hangs up.
    let mut c = Raw::connect_with(&srv.socket, BOTH).await;
    c.option(OPT_EXPORT_NAME, b"nope").await;
    assert!(c.closed().await);
    srv.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_options_are_unsupported_and_negotiation_goes_on() {
    let dir = tempfile::tempdir().unwrap();
    let srv = server(dir.path()).await;
    let mut c = Raw::connect_with(&srv.socket, BOTH).await;
    for opt in [4, 11, 99, u32::MAX] {
        c.option(opt, b"some data").await;
        let (o, kind, _) = c.opt_reply().await;
        assert_eq!((o, kind), (opt, REP_ERR_UNSUP));
    }
    assert_eq!(c.go("disk", false, false).await.0, SIZE);
    srv.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn list_info_and_go() {
    let dir = tempfile::tempdir().unwrap();
    let srv = server(dir.path()).await;
    let mut c = Raw::connect_with(&srv.socket, BOTH).await;
    c.option(OPT_LIST, &[]).await;
    for name in ["disk", "ro"] {
        let (_, kind, data) = c.opt_reply().await;
        assert_eq!(kind, REP_SERVER);
        assert_eq!(&data[..4], &(name.len() as u32).to_be_bytes());
        assert_eq!(&data[4..], name.as_bytes());
    }
    assert_eq!(c.opt_reply().await.1, REP_ACK);
    c.option(OPT_LIST, b"x").await;
    assert_eq!(c.opt_reply().await.1, REP_ERR_INVALID);

    c.option(OPT_INFO, &info_data("ro", &[INFO_NAME, INFO_BLOCK_SIZE]))
        .await;
    let mut seen = Vec::new();
    loop {
        let (opt, kind, data) = c.opt_reply().await;
        assert_eq!(opt, OPT_INFO);
        if kind == REP_ACK {
            break;
        }
        assert_eq!(kind, REP_INFO);
        let info = u16::from_be_bytes([data[0], data[1]]);
        match info {
            INFO_EXPORT => {
                assert_eq!(data.len(), 12);
                assert_eq!(&data[2..10], &(SIZE / 2).to_be_bytes());
                let flags = u16::from_be_bytes([data[10], data[11]]);
                assert_ne!(flags & FLAG_READ_ONLY, 0);
                assert_eq!(flags & (FLAG_SEND_TRIM | FLAG_SEND_WRITE_ZEROES), 0);
            }
            INFO_BLOCK_SIZE => {
                let v: Vec<u32> = data[2..]
                    .chunks(4)
                    .map(|b| u32::from_be_bytes(b.try_into().unwrap()))
                    .collect();
                assert_eq!(v, [1, 4096, 32 << 20]);
            }
            INFO_NAME => assert_eq!(&data[2..], b"ro"),
            other => panic!("unexpected info {other}"),
        }
        seen.push(info);
    }
    seen.sort();
    assert_eq!(seen, [INFO_EXPORT, INFO_NAME, INFO_BLOCK_SIZE]);

    c.option(OPT_INFO, &info_data("missing", &[])).await;
    assert_eq!(c.opt_reply().await.1, REP_ERR_UNKNOWN);
    // Name length running past the data, and trailing garbage: both malformed.
    let mut bad = info_data("disk", &[]);
    bad[3] = 200;
    c.option(OPT_GO, &bad).await;
    assert_eq!(c.opt_reply().await.1, REP_ERR_INVALID);
    let mut bad = info_data("disk", &[]);
    bad.push(0);
    c.option(OPT_GO, &bad).await;
    assert_eq!(c.opt_reply().await.1, REP_ERR_INVALID);

    assert_eq!(c.go("disk", false, false).await.0, SIZE);
    srv.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn structured_replies_and_meta_contexts() {
    let dir = tempfile::tempdir().unwrap();
    let srv = server(dir.path()).await;
    let mut c = Raw::connect_with(&srv.socket, BOTH).await;
    // Meta contexts need structured replies first.
    c.option(
        OPT_SET_META_CONTEXT,
        &meta_data("disk", &["base:allocation"]),
    )
    .await;
    assert_eq!(c.opt_reply().await.1, REP_ERR_INVALID);
    c.option(OPT_STRUCTURED_REPLY, b"x").await;
    assert_eq!(c.opt_reply().await.1, REP_ERR_INVALID);
    c.option(OPT_STRUCTURED_REPLY, &[]).await;
    assert_eq!(c.opt_reply().await.1, REP_ACK);

    // Listing: no query and the "base:" wildcard both find base:allocation (id 0).
    for queries in [
        &[][..],
        &["base:"][..],
        &["x-other:thing", "base:allocation"][..],
    ] {
        c.option(OPT_LIST_META_CONTEXT, &meta_data("disk", queries))
            .await;
        let (_, kind, data) = c.opt_reply().await;
        assert_eq!(kind, REP_META_CONTEXT, "{queries:?}");
        assert_eq!(data, b"\0\0\0\0base:allocation");
        assert_eq!(c.opt_reply().await.1, REP_ACK);
    }
    // Unknown namespaces select nothing, without error.
    c.option(
        OPT_SET_META_CONTEXT,
        &meta_data("disk", &["qemu:dirty-bitmap:x"]),
    )
    .await;
    assert_eq!(c.opt_reply().await.1, REP_ACK);
    // A query count that lies about the data.
    let mut bad = meta_data("disk", &["base:allocation"]);
    bad[11] = 9;
    c.option(OPT_SET_META_CONTEXT, &bad).await;
    assert_eq!(c.opt_reply().await.1, REP_ERR_INVALID);
    c.option(
        OPT_SET_META_CONTEXT,
        &meta_data("nope", &["base:allocation"]),
    )
    .await;
    assert_eq!(c.opt_reply().await.1, REP_ERR_UNKNOWN);

    let (_, flags) = c.go("disk", false, true).await;
    assert_ne!(flags & FLAG_SEND_DF, 0, "DF comes with structured replies");
    c.request(CMD_BLOCK_STATUS, 0, 1, 0, SIZE as u32, &[]).await;
    let ch = c.chunk().await;
    assert_eq!(
        (ch.flags, ch.kind, ch.cookie),
        (REPLY_FLAG_DONE, REPLY_TYPE_BLOCK_STATUS, 1)
    );
    // One extent: the whole fresh image is a hole that reads as zeros.
    assert_eq!(
        ch.payload,
        [1u32, SIZE as u32, STATE_HOLE | STATE_ZERO]
            .iter()
            .flat_map(|v| v.to_be_bytes())
            .collect::<Vec<u8>>()
    );
    srv.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn misbehaving_clients_are_dropped() {
    let dir = tempfile::tempdir().unwrap();
    let srv = server(dir.path()).await;
    // Unknown client flags.
    let mut c = Raw::connect_with(&srv.socket, 1 << 7).await;
    assert!(c.closed().await);
    // Garbage instead of the option magic.
    let mut c = Raw::connect_with(&srv.socket, BOTH).await;
    c.send(b"GET / HTTP/1.1\r\n\r\n").await;
    assert!(c.closed().await);
    // A 4 GiB option: never allocated, the connection is dropped.
    let mut c = Raw::connect_with(&srv.socket, BOTH).await;
    let mut b = OPT_MAGIC.to_be_bytes().to_vec();
    b.extend_from_slice(&OPT_GO.to_be_bytes());
    b.extend_from_slice(&u32::MAX.to_be_bytes());
    c.send(&b).await;
    assert!(c.closed().await);
    // Hanging up mid-option.
    let mut c = Raw::connect_with(&srv.socket, BOTH).await;
    c.send(&b[..10]).await;
    drop(c);
    // Abort: acknowledged, then closed.
    let mut c = Raw::connect_with(&srv.socket, BOTH).await;
    c.option(OPT_ABORT, &[]).await;
    assert_eq!(c.opt_reply().await.1, REP_ACK);
    assert!(c.closed().await);
    // The server still serves.
    let mut c = Raw::connect_with(&srv.socket, BOTH).await;
    assert_eq!(c.go("", false, false).await.0, SIZE);
    srv.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_closes_idle_clients_and_handshakes() {
    let dir = tempfile::tempdir().unwrap();
    let srv = server(dir.path()).await;
    let mut idle = Raw::connect_with(&srv.socket, BOTH).await;
    idle.go("disk", true, false).await;
    let mut haggling = Raw::connect_with(&srv.socket, BOTH).await;
    let socket = srv.socket.clone();
    srv.stop().await.unwrap();
    assert!(idle.closed().await);
    assert!(haggling.closed().await);
    assert!(!socket.exists(), "the socket file is removed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_limit_queues_extra_clients() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("a.qcow2");
    create_image(&img, SIZE).await;
    let srv = TestServer::start_limited(dir.path(), &[("", &img, true)], 1).await;
    let mut first = Raw::connect_with(&srv.socket, BOTH).await;
    first.go("", false, false).await;
    // The second client is accepted by the kernel but not served: no greeting yet.
    let mut second = tokio::net::UnixStream::connect(&srv.socket).await.unwrap();
    let mut b = [0u8; 18];
    let early = tokio::time::timeout(
        std::time::Duration::from_millis(300),
        tokio::io::AsyncReadExt::read_exact(&mut second, &mut b),
    )
    .await;
    assert!(early.is_err(), "served beyond the connection limit");
    drop(first);
    tokio::time::timeout(
        std::time::Duration::from_secs(5),
        tokio::io::AsyncReadExt::read_exact(&mut second, &mut b),
    )
    .await
    .expect("queued client never served")
    .unwrap();
    assert_eq!(&b[..8], b"NBDMAGIC");
    srv.stop().await.unwrap();
}
