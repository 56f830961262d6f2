//! Conformance of the read side against QEMU: images made by `qemu-img` and written by
//! `qemu-io` in every variant (cluster sizes, refcount widths, v2/v3, deflate/zstd
//! compression, extended L2, lazy refcounts, odd virtual sizes, backing chains, external data
//! files, preallocation, internal snapshots, empty and huge sparse images) must read back
//! byte-identical to `qemu-img convert -O raw` through the library (whole disk, odd chunks,
//! concurrent odd chunks, default and tiny caches) and through `qcow2 convert -O raw`;
//! `qcow2 map --output=json` and `qcow2 info --output=json` must print exactly what
//! `qemu-img map/info --output=json` print; and `qcow2 convert -O qcow2` of each must pass
//! `qemu-img check` and `qemu-img compare`.
//!
//! Each group test runs a table of variants and reports every failing variant by name with the
//! first differing offset.
//!
//! `harness` builds the variants, `check` and `map` compare with QEMU; the other modules are
//! the tests, by theme.

mod check;
mod harness;
mod map;

mod backing;
mod format;
mod kinds;
