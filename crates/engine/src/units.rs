//! Newtypes for the offsets qcow2 code juggles. Mixing a guest offset with a host offset is the
//! classic qcow2 bug; distinct types let the compiler catch it.

use std::fmt;

/// A byte offset in the virtual disk the guest sees.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct GuestOffset(pub u64);

/// A byte offset in the image file (or the external data file).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct HostOffset(pub u64);

impl fmt::Display for GuestOffset {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "guest {:#x}", self.0)
    }
}

impl fmt::Display for HostOffset {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "host {:#x}", self.0)
    }
}

/// A host cluster number: a [`HostOffset`] divided by the cluster size (what refcounts are
/// indexed by).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct ClusterIndex(pub u64);

impl fmt::Display for ClusterIndex {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "host cluster {}", self.0)
    }
}

impl ClusterIndex {
    /// The host offset where this cluster starts, for clusters of `1 << cluster_bits` bytes.
    /// Cluster indices come from host offsets (at most 2^56), so the shift cannot overflow.
    pub fn offset(self, cluster_bits: u32) -> HostOffset {
        HostOffset(self.0 << cluster_bits)
    }

    /// The index `n` clusters further on.
    pub fn offset_by(self, n: u64) -> ClusterIndex {
        ClusterIndex(self.0 + n)
    }
}

impl HostOffset {
    /// The offset `n` bytes further on.
    pub fn offset_by(self, n: u64) -> HostOffset {
        HostOffset(self.0 + n)
    }

    /// The offset `n` bytes further on, or `None` on overflow.
    pub fn checked_add(self, n: u64) -> Option<HostOffset> {
        self.0.checked_add(n).map(HostOffset)
    }

    /// The number of the cluster holding this offset, for clusters of `1 << cluster_bits`.
    pub fn cluster_index(self, cluster_bits: u32) -> ClusterIndex {
        ClusterIndex(self.0 >> cluster_bits)
    }

    /// The start of the cluster holding this offset.
    pub fn to_cluster_offset(self, cluster_bits: u32) -> HostOffset {
        self.cluster_index(cluster_bits).offset(cluster_bits)
    }
}

/// A guest cluster number: a [`GuestOffset`] divided by the cluster size (what L1 and L2
/// tables are indexed by, and what the in-flight allocation table claims).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct GuestCluster(pub u64);

impl fmt::Display for GuestCluster {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "guest cluster {}", self.0)
    }
}

impl GuestCluster {
    /// The guest offset where this cluster starts, for clusters of `1 << cluster_bits` bytes.
    /// Guest cluster numbers come from guest offsets (below 2^63), so the shift cannot
    /// overflow.
    pub fn offset(self, cluster_bits: u32) -> GuestOffset {
        GuestOffset(self.0 << cluster_bits)
    }

    /// The cluster `n` clusters further on.
    pub fn offset_by(self, n: u64) -> GuestCluster {
        GuestCluster(self.0 + n)
    }
}

impl GuestOffset {
    /// The offset `n` bytes further on.
    pub fn offset_by(self, n: u64) -> GuestOffset {
        GuestOffset(self.0 + n)
    }

    /// The number of the guest cluster holding this offset, for clusters of
    /// `1 << cluster_bits` bytes.
    pub fn cluster(self, cluster_bits: u32) -> GuestCluster {
        GuestCluster(self.0 >> cluster_bits)
    }

    /// The bytes from `start` to this offset (`start` must not lie after it).
    pub fn since(self, start: GuestOffset) -> u64 {
        self.0 - start.0
    }

    /// The offset `n` bytes further on, or `None` on overflow.
    pub fn checked_add(self, n: u64) -> Option<GuestOffset> {
        self.0.checked_add(n).map(GuestOffset)
    }
}

/// A byte count, length or index the engine has already bounded (by a cluster size, a table
/// size limit, a buffer's length) as a `usize`. On 64-bit targets, which the engine is built
/// for, this is exact; where `usize` is narrower a value that does not fit saturates, so it
/// fails loudly (an allocation or bounds check) instead of silently wrapping.
#[allow(clippy::cast_possible_truncation)] // `n` is compared with `usize::MAX` first
pub(crate) const fn to_usize(n: u64) -> usize {
    if n > usize::MAX as u64 {
        usize::MAX
    } else {
        n as usize
    }
}

/// A 32-bit length or count read from the image as a `usize`: lossless on every target the
/// engine builds for (`usize` of 32 bits or more), and saturating rather than wrapping
/// elsewhere, so no `as` cast has to be checked by a reader.
pub(crate) fn u32_to_usize(n: u32) -> usize {
    usize::try_from(n).unwrap_or(usize::MAX)
}

/// `n` as a `usize` (a buffer length or an index into one), or an error naming `what` when it
/// does not fit: for sizes read from an untrusted image that nothing has bounded yet, where
/// [`to_usize`]'s saturation would only turn into a failed allocation.
pub(crate) fn checked_usize(n: u64, what: &str) -> crate::error::Result<usize> {
    usize::try_from(n).map_err(|_| {
        crate::error::Error::unsupported(format!(
            "{what} of {n} bytes does not fit in this platform's memory"
        ))
    })
}

/// A small count or index the engine has already bounded (a subcluster index, at most 32)
/// as a `u32`; a value that does not fit saturates, which every consumer rejects.
pub(crate) fn to_u32(n: u64) -> u32 {
    u32::try_from(n).unwrap_or(u32::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cluster_index_round_trips_and_floors() {
        let h = HostOffset(0x3_0123);
        assert_eq!(h.cluster_index(16), ClusterIndex(3));
        assert_eq!(h.to_cluster_offset(16), HostOffset(0x3_0000));
        assert_eq!(ClusterIndex(3).offset(16), HostOffset(0x3_0000));
        assert_eq!(HostOffset(u64::MAX).checked_add(1), None);
        assert_eq!(GuestOffset(1).checked_add(2), Some(GuestOffset(3)));
    }

    #[test]
    fn guest_cluster_round_trips_and_floors() {
        let g = GuestOffset(0x5_0123);
        assert_eq!(g.cluster(16), GuestCluster(5));
        assert_eq!(GuestCluster(5).offset(16), GuestOffset(0x5_0000));
        assert_eq!(GuestCluster(5).offset_by(2), GuestCluster(7));
        assert_eq!(g.since(GuestOffset(0x5_0000)), 0x123);
        assert_eq!(GuestCluster(5).to_string(), "guest cluster 5");
    }
}
