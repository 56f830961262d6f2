//! A qcow2 image: open/create, the read path and (later) the write path.

pub mod create;
