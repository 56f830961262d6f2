//! Metadata contexts (`NBD_OPT_LIST_META_CONTEXT` / `SET_META_CONTEXT`, `NBD_CMD_BLOCK_STATUS`).
//!
//! Every export offers `base:allocation`, plus the [`MetaContext`]s listed in
//! [`Export::contexts`](crate::Export::contexts). Adding a context takes a variant here, its
//! name in [`MetaContext::name`] and its status flags in `cmd/block_status.rs`.
//!
//! Names are matched as qemu-nbd matches them: a query names a context exactly, or (when
//! listing) names a namespace or a prefix ending in `:` (`base:`, `qemu:`,
//! `qemu:dirty-bitmap:`) to list every context under it; listing with no query lists all.

use crate::dirty_bitmap::DirtyBitmap;
use crate::export::Export;
use crate::proto::BASE_ALLOCATION;

/// A metadata context an export can offer besides `base:allocation`.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum MetaContext {
    /// `qemu:allocation-depth`: 0 where no layer of the backing chain allocates the range, 1
    /// where this image does, 2 or more where a backing file does (qemu-nbd's `-A`).
    AllocationDepth,
    /// `qemu:dirty-bitmap:NAME`: 1 where the image's persistent bitmap NAME is dirty, 0
    /// where it is clean (qemu-nbd's `-B NAME`).
    DirtyBitmap(DirtyBitmap),
}

/// `qemu:allocation-depth`'s name.
pub const ALLOCATION_DEPTH: &str = "qemu:allocation-depth";

/// What one selected context reports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Kind {
    /// `base:allocation`.
    Allocation,
    /// One of the export's [`MetaContext`]s.
    Extra(MetaContext),
}

impl MetaContext {
    /// The context's full name.
    pub fn name(&self) -> String {
        match self {
            MetaContext::AllocationDepth => ALLOCATION_DEPTH.to_string(),
            MetaContext::DirtyBitmap(b) => b.context_name(),
        }
    }
}

impl Kind {
    fn name(&self) -> String {
        match self {
            Kind::Allocation => BASE_ALLOCATION.to_string(),
            Kind::Extra(c) => c.name(),
        }
    }
}

/// The contexts `export` offers, with their ids (position + 1: ids are only unique per
/// connection, and zero is kept for listing, where the spec wants no id).
pub fn offered(export: &Export) -> Vec<(u32, Kind, String)> {
    let all =
        std::iter::once(Kind::Allocation).chain(export.contexts.iter().cloned().map(Kind::Extra));
    all.enumerate()
        .map(|(i, k)| {
            let name = k.name();
            (u32::try_from(i + 1).unwrap_or(u32::MAX), k, name)
        })
        .collect()
}

/// Whether `query` selects the context `name`: exactly, or when `listing`, as a prefix
/// ending in `:` (a namespace or qemu's `qemu:dirty-bitmap:`).
pub fn matches(query: &[u8], name: &str, listing: bool) -> bool {
    if query == name.as_bytes() {
        return true;
    }
    listing && query.ends_with(b":") && name.as_bytes().starts_with(query)
}
