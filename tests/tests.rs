//! The integration tests: one binary (see Cargo.toml, `autotests = false`), one module per
//! theme. Shared helpers live in `common` (images, qemu oracles, storages) and `nbd_util`
//! (an in-process NBD server and client).

mod common;
mod nbd_util;

mod cancel;
mod check_budget;
mod check_clean;
mod check_crash;
mod check_damage;
mod check_extensions;
mod cli_check;
mod cli_compare;
mod cli_convert;
mod cli_convert_flags;
mod cli_create;
mod cli_create_details;
mod cli_dd;
mod cli_dump;
mod cli_info;
mod cli_io;
mod cli_limits;
mod cli_locking;
mod cli_map;
mod cli_measure;
mod cli_pipe;
mod cli_probe;
mod cli_references;
mod cli_serve_flags;
mod cluster_races;
mod compressed_writes;
mod conformance_create;
mod conformance_read;
mod crash;
mod create_oracle;
mod data_file;
mod fault_injection;
mod format_oracle;
mod fuzz_regressions;
mod hostile_images;
mod lazy_refcounts;
mod nbd_garbage;
mod nbd_handshake;
mod nbd_probe;
mod nbd_qemu;
mod nbd_timeouts;
mod nbd_transmission;
mod overlap;
mod partial_zero;
mod resize;
mod runtimes;
mod sigkill;
mod smoke;
mod storage_conformance;
mod write_model;
mod write_scenarios;
