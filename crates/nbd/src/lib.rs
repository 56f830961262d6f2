//! An NBD server exporting [`Image`](qcow2_engine::image::Image)s (or any [`BlockDevice`]) over TCP
//! and Unix sockets, speaking the fixed-newstyle protocol of the NetworkBlockDevice project.
//!
//! The shape is tokio's mini-redis: a [`Listener`] and a [`Server`] accept loop with a
//! connection limit and a shutdown signal, one task per connection ([`connection`]),
//! all parsing and encoding in one private module, and one small module per command.
//! The wire format stays private: the public API is what a program embedding a server needs
//! ([`Server`], [`Listener`], [`Export`], [`BlockDevice`], and [`connection::serve`] for one
//! connection over any byte stream).
//!
//! What is negotiated: `OPT_EXPORT_NAME`, `OPT_GO`/`OPT_INFO` (export size and flags, block
//! sizes 1 / 4096 / 32 MiB, name, description), `OPT_LIST`, `OPT_ABORT`, `OPT_STARTTLS`
//! (feature `tls`: `TlsConfig`, required before anything else once configured),
//! `OPT_STRUCTURED_REPLY`, and `OPT_LIST_META_CONTEXT`/`OPT_SET_META_CONTEXT` for
//! `base:allocation` and the export's [`MetaContext`]s (`qemu:allocation-depth`,
//! `qemu:dirty-bitmap:NAME`). Commands:
//! read, write (FUA), flush, trim, write zeroes (NO_HOLE, FAST_ZERO), cache, block status
//! (REQ_ONE), disconnect. Several requests of one connection run at once; every connection
//! shares the one open image, so `NBD_FLAG_CAN_MULTI_CONN` is true, and sent when the server
//! takes more than one client at a time. Not yet: `OPT_EXTENDED_HEADERS`.
//!
//! [`client`] is the other side, as far as `qemu-nbd --list` goes: a handshake that lists a
//! server's exports.
//!
//! A client is untrusted: lengths are checked before anything is allocated, a bad magic
//! closes the connection, and per-connection memory is bounded.
#![deny(missing_docs)]

pub mod client;
mod cmd;
pub mod connection;
pub mod device;
pub mod dirty_bitmap;
pub mod export;
mod frame;
#[cfg(feature = "fuzzing")]
pub mod fuzzing;
mod handshake;
pub mod listener;
pub mod meta;
mod proto;
#[cfg(feature = "tls")]
pub mod tls;
/// Without the `tls` feature: no configuration can exist, STARTTLS is always refused.
#[cfg(not(feature = "tls"))]
mod tls {
    use crate::connection::Stream;

    /// Uninhabited: a server without the `tls` feature has no TLS configuration.
    #[derive(Debug, Clone)]
    pub enum TlsConfig {}

    impl TlsConfig {
        pub(crate) async fn upgrade(&self, _: Box<dyn Stream>) -> std::io::Result<Box<dyn Stream>> {
            match *self {}
        }
    }
}

pub use device::{BlockDevice, DeviceFuture, RawDevice};
pub use dirty_bitmap::DirtyBitmap;
pub use export::{Export, Exports};
pub use listener::{Event, Listener, Server};
pub use meta::MetaContext;
#[cfg(feature = "tls")]
pub use tls::TlsConfig;
