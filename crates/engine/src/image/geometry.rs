//! Fixed numbers derived from the header: cluster size, L2 layout, slice size, and the index
//! arithmetic that turns a guest offset into an L1 index, an L2 index and a cache slice.

use crate::format::l2::L2Geometry;
use crate::units::to_usize;

/// Layout constants of one open image.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Geometry {
    pub cluster_bits: u32,
    pub cluster_size: u64,
    pub l2: L2Geometry,
    /// Entries per L2 table.
    pub l2_entries: u64,
    /// Bytes per L2 entry (8 or 16).
    pub entry_size: u64,
    /// Bytes per cache slice (≤ cluster size).
    pub slice_size: u64,
}

impl Geometry {
    pub fn new(cluster_bits: u32, extended: bool, version3: bool, slice: usize) -> Self {
        let l2 = L2Geometry {
            cluster_bits,
            extended,
            version3,
        };
        let cluster_size = 1u64 << cluster_bits;
        let entry_size = if extended { 16 } else { 8 };
        let slice_size = (slice.next_power_of_two() as u64).clamp(512, cluster_size);
        Geometry {
            cluster_bits,
            cluster_size,
            l2,
            l2_entries: cluster_size / entry_size,
            entry_size,
            slice_size,
        }
    }

    /// Guest cluster number of a guest offset.
    pub fn guest_cluster(&self, guest: u64) -> u64 {
        guest >> self.cluster_bits
    }

    /// Offset within its cluster.
    pub fn in_cluster(&self, off: u64) -> u64 {
        off & (self.cluster_size - 1)
    }

    /// L1 index of a guest cluster.
    pub fn l1_index(&self, gcluster: u64) -> usize {
        to_usize(gcluster / self.l2_entries)
    }

    /// Index in its L2 table of a guest cluster.
    pub fn l2_index(&self, gcluster: u64) -> u64 {
        gcluster % self.l2_entries
    }

    /// Entries in one cache slice.
    pub fn slice_entries(&self) -> u64 {
        self.slice_size / self.entry_size
    }

    /// Host offset of the slice holding L2 entry `l2_index` of the table at `l2_table`, and
    /// the entry's index within that slice.
    pub fn l2_slice(&self, l2_table: u64, l2_index: u64) -> (u64, usize) {
        let per = self.slice_entries();
        (
            l2_table + (l2_index / per) * self.slice_size,
            to_usize(l2_index % per),
        )
    }

    /// Size of a subcluster (the cluster size without extended L2).
    pub fn subcluster_size(&self) -> u64 {
        self.cluster_size / u64::from(self.l2.subclusters())
    }

    /// Round `off` down to a cluster boundary.
    pub fn cluster_floor(&self, off: u64) -> u64 {
        off & !(self.cluster_size - 1)
    }
}
