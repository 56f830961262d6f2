//! Target `nbd_server`: a client byte stream sent to the NBD server over an in-memory duplex
//! pipe, exporting a fresh image in memory.
//!
//! The first input byte configures the run: bit 0 puts a canned fixed-newstyle handshake in
//! front (so the fuzzer starts in the transmission phase), bit 1 exports read-only, bit 2
//! turns the rest of the input into well-framed requests ([`frame_requests`]) instead of
//! sending it raw, bits 3-4 pick the cluster size, bit 5 asks for structured replies and
//! `base:allocation`. Oracles: no panic or hang; afterwards `check` finds no corruption and
//! no leak, and a read-only export's file is unchanged.

use std::sync::Arc;
use std::time::Duration;

use qcow2_engine::check::check;
use qcow2_engine::image::create::{CreateOptions, create};
use qcow2_engine::image::{Image, OpenOptions};
use qcow2_nbd::connection::{Patience, serve};
use qcow2_nbd::{Export, Exports};
use tokio::io::{AsyncWriteExt, split};
use tokio::sync::watch;

use super::block_on;
use super::capped::CappedStorage;
use super::image_bytes::check_options;
use super::input::Input;
use super::nbd_proto::{
    BASE_ALLOCATION, CMD_BLOCK_STATUS, CMD_FLUSH, CMD_READ, CMD_TRIM, CMD_WRITE, CMD_WRITE_ZEROES,
    FLAG_C_FIXED_NEWSTYLE, FLAG_C_NO_ZEROES, OPT_GO, OPT_MAGIC, OPT_SET_META_CONTEXT,
    OPT_STRUCTURED_REPLY, REQUEST_MAGIC,
};

/// Virtual size of the exported disk.
const DISK_SIZE: u64 = 1 << 20;
/// Longest request [`frame_requests`] builds.
const MAX_FRAMED_LEN: u64 = 256 << 10;

/// Run the target on one input.
pub fn run(data: &[u8]) {
    let mut input = Input::new(data);
    let cfg = input.u8();
    block_on(exercise(cfg, input.rest()));
}

async fn exercise(cfg: u8, rest: &[u8]) {
    let (read_only, structured) = (cfg & 2 != 0, cfg & 32 != 0);
    let storage = Arc::new(CappedStorage::new(Vec::new()));
    let opts = create_options(cfg >> 3);
    create(storage.as_ref(), None, &opts)
        .await
        .expect("creating the exported image");
    let pristine = storage.snapshot();
    let open = OpenOptions::new().writable(!read_only).flush_interval(None);
    let img = Image::open_storage(storage.clone(), &open)
        .await
        .expect("opening the exported image");

    let mut stream = Vec::new();
    if cfg & 1 != 0 {
        stream.extend(handshake(structured));
    }
    if cfg & 4 != 0 {
        stream.extend(frame_requests(rest));
    } else {
        stream.extend_from_slice(rest);
    }
    talk(&img, stream).await;

    img.close().await.expect("closing the exported image");
    let report = check(storage.clone(), &check_options())
        .await
        .expect("checking the exported image");
    assert_eq!(
        (report.corruptions, report.leaks, report.check_errors),
        (0, 0, 0),
        "image damaged by an NBD session: {report:?}"
    );
    if read_only {
        assert!(
            storage.snapshot() == pristine,
            "a read-only export changed its file"
        );
    }
}

/// Create options from two config bits: the cluster size (and extended L2 for one of them).
fn create_options(bits: u8) -> CreateOptions {
    let mut o = CreateOptions {
        size: Some(DISK_SIZE),
        ..CreateOptions::default()
    };
    match bits & 3 {
        0 => {}
        1 => o.cluster_size = 4096,
        2 => o.cluster_size = 512,
        _ => {
            o.cluster_size = 32 << 10;
            o.extended_l2 = true;
        }
    }
    o
}

/// Send `stream` to a server connection for `img`, reading (and dropping) every reply, until
/// the server hangs up after the client's end of the stream.
async fn talk(img: &Image, stream: Vec<u8>) {
    let exports = Exports::new(vec![Export::new("", Arc::new(img.clone()))]);
    let (client, server) = tokio::io::duplex(64 << 10);
    let (_stop, stopped) = watch::channel(false);
    // A free slot: the idle timeout never fires (the fuzzer is the only client).
    let patience = Patience {
        handshake: Duration::from_secs(5),
        idle: Duration::from_secs(5),
        slots: Arc::new(tokio::sync::Semaphore::new(1)),
    };
    let srv = tokio::spawn(serve(server, exports, stopped, patience));
    let (mut rd, mut wr) = split(client);
    let drain = tokio::spawn(async move { tokio::io::copy(&mut rd, &mut tokio::io::sink()).await });
    // The server may hang up early (bad magic, protocol error): then writing fails.
    if wr.write_all(&stream).await.is_ok() {
        let _ = wr.shutdown().await;
    }
    drop(wr);
    let _ = srv.await.expect("server task panicked");
    let _ = drain.await.expect("reply reader panicked");
}

/// The client half of a fixed-newstyle handshake ending in `NBD_OPT_GO` for the default
/// export, optionally with structured replies and `base:allocation`.
pub fn handshake(structured: bool) -> Vec<u8> {
    let mut b = (FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES)
        .to_be_bytes()
        .to_vec();
    if structured {
        option(&mut b, OPT_STRUCTURED_REPLY, &[]);
        let mut meta = 0u32.to_be_bytes().to_vec(); // export name ""
        meta.extend(1u32.to_be_bytes());
        meta.extend((BASE_ALLOCATION.len() as u32).to_be_bytes());
        meta.extend(BASE_ALLOCATION.as_bytes());
        option(&mut b, OPT_SET_META_CONTEXT, &meta);
    }
    // Export name "" and no information requests.
    option(&mut b, OPT_GO, &[0, 0, 0, 0, 0, 0]);
    b
}

fn option(out: &mut Vec<u8>, opt: u32, data: &[u8]) {
    out.extend(OPT_MAGIC.to_be_bytes());
    out.extend(opt.to_be_bytes());
    out.extend((data.len() as u32).to_be_bytes());
    out.extend(data);
}

/// Well-framed requests from 10-byte records (command, flags, offset, length); writes carry
/// their payload. Offsets reach a little past the end of the disk, to test the range checks.
pub fn frame_requests(data: &[u8]) -> Vec<u8> {
    const KINDS: [u16; 6] = [
        CMD_READ,
        CMD_WRITE,
        CMD_FLUSH,
        CMD_TRIM,
        CMD_WRITE_ZEROES,
        CMD_BLOCK_STATUS,
    ];
    let mut out = Vec::new();
    for (cookie, rec) in data.chunks_exact(10).enumerate() {
        let mut r = Input::new(rec);
        let kind = KINDS[usize::from(r.u8()) % KINDS.len()];
        let flags = u16::from(r.u8() & 0x0f);
        let offset = u64::from(r.u32()) % (DISK_SIZE + (64 << 10));
        let len = u64::from(r.u32()) % MAX_FRAMED_LEN;
        out.extend(REQUEST_MAGIC.to_be_bytes());
        out.extend(flags.to_be_bytes());
        out.extend(kind.to_be_bytes());
        out.extend((cookie as u64).to_be_bytes());
        out.extend(offset.to_be_bytes());
        out.extend((len as u32).to_be_bytes());
        if kind == CMD_WRITE {
            out.extend(std::iter::repeat_n(cookie as u8 | 1, len as usize));
        }
    }
    out
}
