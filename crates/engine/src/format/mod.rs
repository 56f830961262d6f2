//! Pure on-disk structures of the qcow2 format (QEMU's `docs/interop/qcow2.txt`).
//!
//! No IO and no async here: every parser takes bytes and returns a value or a typed
//! [`crate::Error`], never panics, and never allocates from an untrusted length without a bound.
//! qcow2 is big-endian everywhere.
//!
//! Truncating casts are denied here: a length or offset from the file that silently wraps is
//! how parsers go wrong. Where a cast truncates on purpose, it says why (tests are exempt).
#![cfg_attr(not(test), deny(clippy::cast_possible_truncation))]

pub mod bitmap;
pub mod compressed;
pub mod extensions;
pub mod features;
pub mod header;
pub mod l1;
pub mod l2;
pub mod probe;
pub mod refcount;
pub mod snapshot;
