//! One module per command.

pub mod amend;
mod amend_luks;
pub mod bench;
mod bench_stats;
pub mod bitmap;
pub mod check;
pub mod commit;
pub mod compare;
pub mod convert;
mod convert_bitmaps;
mod convert_compress;
mod convert_copy;
mod convert_offload;
mod convert_pipe;
mod convert_sources;
mod convert_walk;
pub mod create;
pub mod dd;
pub mod dump;
mod dump_tables;
pub mod info;
mod info_luks;
mod info_types;
pub mod io;
mod io_ops;
pub mod map;
pub mod measure;
mod ops_common;
pub mod rebase;
pub mod resize;
pub mod serve;
mod serve_device;
mod serve_list;
mod serve_opts;
mod serve_snapshot;
pub mod snapshot;
mod snapshots;

/// `--output=human|json`, shared by info, map and check.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum OutputFormat {
    /// Human-readable text.
    Human,
    /// JSON in qemu-img's layout.
    Json,
}
