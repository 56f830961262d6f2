//! Protocol features beyond the basics, spoken by hand and checked against QEMU: fast zero
//! (`NBD_CMD_FLAG_FAST_ZERO`), `NBD_CMD_CACHE`, metadata-context listing with `qemu:` queries
//! and `qemu:allocation-depth` (also compared with qemu-nbd `-A` through `nbdinfo --map`).

use std::path::Path;
use std::sync::Arc;

use qcow2_engine::image::{Image, OpenOptions};
use qcow2_nbd::{Export, Listener, MetaContext, Server};
use tokio::sync::oneshot;

use crate::common::bg::Bg;
use crate::common::{path_in, qemu_create, qemu_create_in, qemu_io, status};
use crate::nbd_util::proto::*;
use crate::nbd_util::{Raw, info_data, meta_data};

const BOTH: u32 = FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES;
const BIN: &str = env!("CARGO_BIN_EXE_qcow2");

/// Serve `img` (with `contexts`) in this process until the returned sender is dropped.
async fn serve(
    dir: &Path,
    img: &str,
    writable: bool,
    contexts: Vec<MetaContext>,
) -> oneshot::Sender<()> {
    let image = Image::open(img, &OpenOptions::new().writable(writable))
        .await
        .unwrap();
    let mut export = Export::new("", Arc::new(image));
    export.contexts = contexts;
    let listener = Listener::unix(dir.join("nbd.sock")).unwrap();
    let (stop, stopped) = oneshot::channel::<()>();
    tokio::spawn(Server::new(vec![export]).run(listener, async {
        let _ = stopped.await;
    }));
    stop
}

/// A fast zero of `[off, off + len)`: the errno of the simple reply.
async fn fast_zero(c: &mut Raw, off: u64, len: u32) -> u32 {
    c.request(CMD_WRITE_ZEROES, CMD_FLAG_FAST_ZERO, 9, off, len, &[])
        .await;
    c.simple().await.0
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fast_zero_fails_where_zeroing_would_write_data() {
    let dir = tempfile::tempdir().unwrap();
    let img = path_in(dir.path(), "a.qcow2");
    qemu_create(&img, "cluster_size=65536", "4M");
    qemu_io(&img, &["write -P 0x11 0 128k", "write -P 0x22 1M 64k"]);
    let stop = serve(dir.path(), &img, true, vec![]).await;
    let mut c = Raw::connect_with(&dir.path().join("nbd.sock"), BOTH).await;
    let flags = c.go("", false, false).await.1;
    assert_ne!(flags & FLAG_SEND_FAST_ZERO, 0);
    // Whole clusters: a zero flag in the L2 entry.
    assert_eq!(fast_zero(&mut c, 0, 64 << 10).await, 0);
    // Part of a data cluster: zeros would have to be written.
    assert_eq!(
        fast_zero(&mut c, (1 << 20) + 512, 4096).await,
        95,
        "ENOTSUP"
    );
    // Part of an unallocated cluster already reads as zeros: nothing to write.
    assert_eq!(fast_zero(&mut c, (2 << 20) + 512, 4096).await, 0);
    // Without the flag the slow zeroing is done.
    c.request(CMD_WRITE_ZEROES, 0, 10, (64 << 10) + 512, 512, &[])
        .await;
    assert_eq!(c.simple().await.0, 0);
    drop(c);
    drop(stop);
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    // QEMU's reading: the refused request changed nothing, the others zeroed.
    let out = qemu_io(
        &img,
        &[
            "read -P 0 0 64k",
            "read -P 0x11 64k 512",
            "read -P 0 66048 512",
            "read -P 0x11 66560 64512",
            "read -P 0x22 1M 64k",
        ],
    );
    assert!(!out.contains("Pattern verification failed"), "{out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fast_zero_on_v2_with_a_backing_file_is_unsupported() {
    let dir = tempfile::tempdir().unwrap();
    qemu_create_in(dir.path(), "base.qcow2", "qcow2", "", "1M");
    let img = path_in(dir.path(), "top.qcow2");
    let opts = "compat=0.10,backing_file=base.qcow2,backing_fmt=qcow2";
    qemu_create_in(dir.path(), "top.qcow2", "qcow2", opts, "1M");
    let stop = serve(dir.path(), &img, true, vec![]).await;
    let mut c = Raw::connect_with(&dir.path().join("nbd.sock"), BOTH).await;
    c.go("", false, false).await;
    assert_eq!(fast_zero(&mut c, 0, 64 << 10).await, 95);
    drop(stop);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cache_is_accepted_and_range_checked() {
    let dir = tempfile::tempdir().unwrap();
    let img = path_in(dir.path(), "a.qcow2");
    qemu_create(&img, "", "1M");
    let stop = serve(dir.path(), &img, false, vec![]).await;
    let mut c = Raw::connect_with(&dir.path().join("nbd.sock"), BOTH).await;
    let flags = c.go("", false, false).await.1;
    assert_ne!(flags & FLAG_SEND_CACHE, 0);
    assert_eq!(
        flags & FLAG_SEND_FAST_ZERO,
        0,
        "read-only: no zeroing at all"
    );
    c.request(CMD_CACHE, 0, 1, 0, 1 << 20, &[]).await;
    assert_eq!(c.simple().await, (0, 1));
    c.request(CMD_CACHE, 0, 2, 1 << 20, 1, &[]).await;
    assert_eq!(c.simple().await, (22, 2), "past the end: EINVAL");
    drop(stop);
}

/// The names an `OPT_LIST_META_CONTEXT` with `queries` lists.
async fn listed(c: &mut Raw, queries: &[&str]) -> Vec<String> {
    c.option(OPT_LIST_META_CONTEXT, &meta_data("", queries))
        .await;
    let mut names = Vec::new();
    loop {
        let (_, kind, data) = c.opt_reply().await;
        match kind {
            REP_META_CONTEXT => names.push(String::from_utf8(data[4..].to_vec()).unwrap()),
            REP_ACK => return names,
            other => panic!("reply {other:#x}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn meta_contexts_list_by_namespace_and_report_together() {
    let dir = tempfile::tempdir().unwrap();
    qemu_create_in(dir.path(), "base.qcow2", "qcow2", "", "4M");
    qemu_io(dir.path().join("base.qcow2"), &["write -P 1 1M 1M"]);
    let img = path_in(dir.path(), "top.qcow2");
    qemu_create_in(
        dir.path(),
        "top.qcow2",
        "qcow2",
        "backing_file=base.qcow2,backing_fmt=qcow2",
        "4M",
    );
    qemu_io(&img, &["write -P 2 0 1M"]);
    let stop = serve(dir.path(), &img, false, vec![MetaContext::AllocationDepth]).await;
    let mut c = Raw::connect_with(&dir.path().join("nbd.sock"), BOTH).await;
    c.option(OPT_STRUCTURED_REPLY, &[]).await;
    assert_eq!(c.opt_reply().await.1, REP_ACK);
    let all = ["base:allocation", "qemu:allocation-depth"];
    assert_eq!(listed(&mut c, &[]).await, all);
    assert_eq!(listed(&mut c, &["qemu:"]).await, ["qemu:allocation-depth"]);
    assert_eq!(listed(&mut c, &["base:"]).await, ["base:allocation"]);
    assert!(listed(&mut c, &["qemu:dirty-bitmap:"]).await.is_empty());
    assert!(listed(&mut c, &["qemu:nope"]).await.is_empty());
    c.option(OPT_SET_META_CONTEXT, &meta_data("", &all)).await;
    let mut ids = Vec::new();
    for name in all {
        let (_, kind, data) = c.opt_reply().await;
        assert_eq!((kind, &data[4..]), (REP_META_CONTEXT, name.as_bytes()));
        ids.push(u32::from_be_bytes(data[..4].try_into().unwrap()));
    }
    assert_eq!(c.opt_reply().await.1, REP_ACK);
    c.option(OPT_GO, &info_data("", &[])).await;
    while c.opt_reply().await.1 != REP_ACK {}
    c.request(CMD_BLOCK_STATUS, 0, 3, 0, 4 << 20, &[]).await;
    let mut got = Vec::new();
    loop {
        let ch = c.chunk().await;
        assert_eq!(ch.kind, REPLY_TYPE_BLOCK_STATUS);
        let id = u32::from_be_bytes(ch.payload[..4].try_into().unwrap());
        let d: Vec<(u32, u32)> = ch.payload[4..]
            .chunks(8)
            .map(|p| {
                (
                    u32::from_be_bytes(p[..4].try_into().unwrap()),
                    u32::from_be_bytes(p[4..].try_into().unwrap()),
                )
            })
            .collect();
        got.push((id, d));
        if ch.flags & REPLY_FLAG_DONE != 0 {
            break;
        }
    }
    let mb = 1 << 20;
    assert_eq!(
        got[0],
        (ids[0], vec![(2 * mb, 0), (2 * mb, STATE_HOLE | STATE_ZERO)])
    );
    assert_eq!(got[1], (ids[1], vec![(mb, 1), (mb, 2), (2 * mb, 0)]));
    drop(stop);
}

fn have_nbdinfo() -> bool {
    status("nbdinfo", &["--version"]).0 == 0
}

/// `nbdinfo --map=CONTEXT` of the server `start` runs on `sock`.
fn map_of(server: &str, args: &[&str], sock: &Path, context: &str) -> String {
    let mut full: Vec<&str> = args.to_vec();
    full.extend_from_slice(&["-k", sock.to_str().unwrap()]);
    let mut run: Vec<&str> = Vec::new();
    if server == BIN {
        run.push("serve");
    }
    run.extend_from_slice(&full);
    let bg = Bg::serving(server, &run, sock);
    let uri = format!("nbd+unix:///?socket={}", sock.display());
    let (code, text) = status("nbdinfo", &[&format!("--map={context}"), &uri]);
    assert_eq!(code, 0, "{text}");
    drop(bg);
    let _ = std::fs::remove_file(sock);
    text
}

#[test]
fn allocation_depth_matches_qemu_nbd() {
    if !have_nbdinfo() {
        eprintln!("skipped: nbdinfo not installed");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    qemu_create_in(dir.path(), "base.qcow2", "qcow2", "", "8M");
    qemu_io(
        dir.path().join("base.qcow2"),
        &["write -P 1 1M 2M", "write -z 6M 1M"],
    );
    qemu_create_in(
        dir.path(),
        "mid.qcow2",
        "qcow2",
        "backing_file=base.qcow2,backing_fmt=qcow2",
        "8M",
    );
    qemu_io(dir.path().join("mid.qcow2"), &["write -P 2 2M 1M"]);
    let img = path_in(dir.path(), "top.qcow2");
    qemu_create_in(
        dir.path(),
        "top.qcow2",
        "qcow2",
        "backing_file=mid.qcow2,backing_fmt=qcow2",
        "8M",
    );
    qemu_io(
        &img,
        &["write -P 3 0 512k", "write -z 4M 64k", "discard 2560k 64k"],
    );
    let sock = dir.path().join("s.sock");
    let args = ["-r", "-A", "-f", "qcow2", &img];
    for context in ["qemu:allocation-depth", "base:allocation"] {
        let ours = map_of(BIN, &args, &sock, context);
        let theirs = map_of("qemu-nbd", &args, &sock, context);
        assert_eq!(ours, theirs, "{context}");
    }
}
